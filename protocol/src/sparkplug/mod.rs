//! Eclipse Sparkplug B 3.0, as a host application hears it: the payload schema ([`proto`]),
//! topics and device ids ([`topic`]), metric values as JSON ([`value`]), and the per edge
//! node memory of births, sequences and aliases ([`host`]). Pure: the agent does the I/O.

pub mod host;
pub mod proto;
pub mod topic;
pub mod value;

pub use host::{Command, Host, HostSettings, Issue, Outcome, Refused, StateUpdate};
