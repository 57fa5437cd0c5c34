//! Live device state: what `devicestates.live.edgesync.io` is to serve from memory, without
//! an etcd write per update (docs/design/live-state.md).
//!
//! Built so far: [`query`], what a list or watch selects, and [`store`], the states in memory
//! with resource versions, a watch window and pages. Serving them, the
//! aggregated API, and the agent's durable acknowledgements are to build on them.

pub mod query;
pub mod store;
