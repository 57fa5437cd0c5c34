//! Live device state: what `devicestates.live.edgesync.io` is to serve from memory, without
//! an etcd write per update (docs/design/live-state.md).
//!
//! Built so far: [`query`], what a list or watch selects; [`store`], the states in memory
//! with resource versions, a watch window and pages; [`wire`], the shapes the API answers
//! in; [`authn`], who is asking (front-proxy headers) and what they may do
//! (SubjectAccessReviews, cached). Serving them through the aggregation layer, and the
//! agent's durable acknowledgements, are to build on them.

pub mod authn;
pub mod query;
pub mod state;
pub mod store;
pub mod tls;
pub mod watch;
pub mod wire;
