//! Staged rollouts of desired state (`DeviceRollout`, docs/rollouts.md).
//!
//! | module | job |
//! |---|---|
//! | [`plan`] | the arithmetic: counts and shares, the order, the breach rule, revert, conflicts |
//! | [`wave`] | where a rollout stands and what it does next (pure, injected time) |
//! | [`mark`] | the label and annotation a rollout leaves on each Device it patches |
//! | [`reconcile`] | the leader's loop: reads rollouts and Devices, writes patches and status |

pub mod mark;
pub mod plan;
pub mod reconcile;
pub mod wave;
