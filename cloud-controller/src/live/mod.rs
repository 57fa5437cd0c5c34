//! Live device state: `devicestates.live.edgesync.io`, each Device's newest report served from
//! memory through the API aggregation layer, without an etcd write per update
//! (docs/design/live-state.md).
//!
//! | module | job |
//! |---|---|
//! | [`store`] | the states in memory: resource versions, the watch window, pages |
//! | [`state`] | the shared store, fed by reports and the Device watch |
//! | [`query`] | what a list or watch selects (labels, fields, `where` comparisons) |
//! | [`watch`] | what a watch sends next, chunk by chunk |
//! | [`wire`] | the shapes the API answers in (objects, Tables, events, Status) |
//! | [`authn`] | who is asking (front-proxy headers), SubjectAccessReviews and their cache |
//! | [`tls`] | the serving certificate, and the front proxy's certificate name |
//! | [`api`] | the HTTP handlers |
//! | [`serve`] | start-up: settings from the cluster, TLS, listener |

pub mod api;
pub mod authn;
pub mod query;
pub mod serve;
pub mod state;
pub mod store;
pub mod tls;
pub mod watch;
pub mod wire;
