//! Live device state: what `devicestates.live.edgesync.io` is to serve from memory, without
//! an etcd write per update.
//!
//! Built so far: [`query`], what a list or watch selects. The in-memory store, the
//! aggregated API and the agent's durable acknowledgements are to build on it.

pub mod query;
