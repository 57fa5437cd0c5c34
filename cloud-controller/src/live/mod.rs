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
//! | [`source`] | a watch's events: this replica's store, read as it changes |
//! | [`api`] | the HTTP handlers |
//! | [`merge`] | with shards: pages and resource versions merged from every replica (pure) |
//! | [`fleet`] | with shards: reads fanned out to every replica and merged |
//! | [`peer`] | with shards: the internal routes the other replicas read this one's part on |
//! | [`serve`] | start-up: settings from the cluster, TLS, listener |

pub mod api;
pub mod authn;
pub mod fleet;
pub mod merge;
pub mod peer;
pub mod query;
pub mod serve;
pub mod source;
pub mod state;
pub mod store;
pub mod tls;
pub mod watch;
pub mod wire;
