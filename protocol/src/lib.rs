//! The edgesync protocol: the device shadow document model and the wire types spoken between
//! the edge agent and the cloud controller.
//!
//! This crate owns the *rules* (JSON merge patch, delta, version bumps, optimistic concurrency,
//! limits) and the *shapes* (MQTT shadow messages, HTTP batch envelope, desired-state stream
//! events, error bodies), plus small pure helpers both binaries share (token bucket, an error's causes as one
//! line), and the Sparkplug B host application's rules and schema. It performs no
//! I/O and depends only on serde and prost, so the agent, the
//! controller and tests agree on one definition.
//!
//! Every entry point that takes untrusted bytes ([`shadow::UpdateRequest::parse`],
//! [`limits::validate_device_id`], [`limits::check_state`]) returns a typed error and never
//! panics, whatever the input.

pub mod errors;
#[cfg(test)]
mod fuzzing;
pub mod identity;
pub mod kubeedge;
pub mod limits;
pub mod merge;
pub mod mqtt;
pub mod rate;
pub mod rejection;
pub mod secret;
pub mod shadow;
pub mod sparkplug;
pub mod wire;

pub use limits::{LimitError, Limits};
pub use shadow::{ShadowDocument, ShadowError, UpdateRequest};
