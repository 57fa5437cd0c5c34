//! Staged rollouts of desired state (`DeviceRollout`, docs/design/rollouts.md). Built so far:
//! the pure arithmetic the reconcile loop will follow ([`plan`]).

pub mod plan;
