//! Leader election over a `coordination.k8s.io/v1` Lease, for the loops that must run once per
//! cluster (offline detection). Ingestion and desired streams run on every replica.
//!
//! As client-go's leader election does, nothing compares another host's clock with ours:
//! - a candidate treats the holder's Lease as expired when the record (holder, renew time,
//!   resourceVersion) has not changed for `LEASE_DURATION` by its own monotonic clock, counted
//!   from when it first saw that record;
//! - the leader holds leadership until `RENEW_DEADLINE` after the start of its last successful
//!   renewal, by its monotonic clock, whatever happens meanwhile: [`Leadership::is_leader`]
//!   turns false on time even when the process was stopped (SIGSTOP, a frozen VM) or an API
//!   call hangs, because no API call is needed to step down.
//!
//! `RENEW_DEADLINE` < `LEASE_DURATION`, so a leader stops acting before anyone else may take
//! over. Every update carries the Lease's resourceVersion, so two candidates cannot both win
//! the same round.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How long a Lease whose record does not change is honoured.
pub(crate) const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How long a leader keeps acting after the start of its last successful renewal.
pub(crate) const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How often the holder renews, and candidates look.
pub(crate) const RETRY_PERIOD: Duration = Duration::from_secs(2);

/// Whether this replica leads, by a deadline on the monotonic clock.
#[derive(Debug)]
pub struct Leadership {
    epoch: Instant,
    /// Leader until this many ms after `epoch` (0: not leader).
    until_ms: AtomicU64,
}

impl Default for Leadership {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            until_ms: AtomicU64::new(0),
        }
    }
}

impl Leadership {
    /// Whether this replica may act as the leader now.
    pub fn is_leader(&self) -> bool {
        let until = self.until_ms.load(Ordering::Acquire);
        until > 0 && (self.epoch.elapsed().as_millis() as u64) < until
    }

    /// Leads until `RENEW_DEADLINE` after `renew_started`.
    pub(crate) fn renewed(&self, renew_started: Instant) {
        let until = renew_started + RENEW_DEADLINE;
        if until <= Instant::now() {
            self.step_down();
            return;
        }
        let ms = until.saturating_duration_since(self.epoch).as_millis() as u64;
        self.until_ms.store(ms.max(1), Ordering::Release);
    }

    pub(crate) fn step_down(&self) {
        self.until_ms.store(0, Ordering::Release);
    }
}

/// What tells one Lease record from the next: holder, renew time, resourceVersion.
pub(crate) type Record = (String, Option<String>, Option<String>);

/// The holder's record as last seen, and when it was first seen (local monotonic clock).
#[derive(Debug)]
pub(crate) struct Observed {
    record: Record,
    since: Instant,
}

impl Observed {
    /// Notes `lease`'s record as seen now; returns its holder and how long the record has
    /// gone unchanged by this replica's clock (zero when it just changed).
    pub(crate) fn see(slot: &mut Option<Self>, lease: &Lease) -> (String, Duration) {
        let spec = lease.spec.as_ref();
        let holder = spec
            .and_then(|s| s.holder_identity.clone())
            .unwrap_or_default();
        let record = (
            holder.clone(),
            spec.and_then(|s| s.renew_time.as_ref())
                .map(|t| t.0.to_string()),
            lease.metadata.resource_version.clone(),
        );
        if slot.as_ref().is_none_or(|o| o.record != record) {
            *slot = Some(Self {
                record,
                since: Instant::now(),
            });
        }
        let unchanged_for = slot.as_ref().map_or(Duration::ZERO, |o| o.since.elapsed());
        (holder, unchanged_for)
    }
}

/// Runs the election until shutdown, then gives the Lease up if this replica holds it.
pub async fn run(
    client: Client,
    namespace: String,
    name: String,
    identity: String,
    leadership: Arc<Leadership>,
    shutdown: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let lease = format!("{namespace}/{name}");
    let mut observed: Option<Observed> = None;
    let mut was_leader = false;
    loop {
        let started = Instant::now();
        // An attempt that outlives the renew deadline cannot extend leadership anyway.
        let attempt = tokio::time::timeout(
            RENEW_DEADLINE,
            try_acquire(&api, &name, &identity, &mut observed),
        )
        .await;
        match attempt {
            Ok(Ok(true)) => leadership.renewed(started),
            Ok(Ok(false)) => leadership.step_down(),
            Ok(Err(e)) => debug!(lease, error = %e, "Lease attempt failed"),
            Err(_) => debug!(lease, "Lease attempt timed out"),
        }
        let leads = leadership.is_leader();
        if leads && !was_leader {
            info!(lease, identity, "Became leader");
        } else if !leads && was_leader {
            warn!(
                lease,
                identity, "No longer leader (lost the Lease or could not renew it in time)"
            );
        }
        was_leader = leads;
        tokio::select! {
            _ = shutdown.cancelled() => {
                if leadership.is_leader() {
                    leadership.step_down();
                    release(&api, &name, &identity).await;
                }
                return;
            }
            _ = tokio::time::sleep(RETRY_PERIOD) => {}
        }
    }
}

/// One round: creates the Lease, renews it, or takes it over once its record has not changed
/// for `LEASE_DURATION`. Returns whether this replica holds it now.
async fn try_acquire(
    api: &Api<Lease>,
    name: &str,
    identity: &str,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let now = MicroTime(Timestamp::now());
    let Some(mut lease) = api.get_opt(name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(identity.to_owned()),
                lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let (holder, unchanged_for) = Observed::see(observed, &lease);
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let held_by_other = !holder.is_empty() && holder != identity;
    if held_by_other && unchanged_for < LEASE_DURATION {
        return Ok(false);
    }
    if holder != identity {
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.holder_identity = Some(identity.to_owned());
    spec.lease_duration_seconds = Some(LEASE_DURATION.as_secs() as i32);
    spec.renew_time = Some(now);
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the Lease up on shutdown so another replica takes over at once.
async fn release(api: &Api<Lease>, name: &str, identity: &str) {
    let Ok(Some(mut lease)) = api.get_opt(name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(identity) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => info!(lease = name, "Leader Lease released"),
        Err(e) => {
            warn!(lease = name, error = %e, "Could not release the leader Lease; another replica takes over when it expires")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leadership_ends_at_its_deadline_without_any_call() {
        let l = Leadership::default();
        assert!(!l.is_leader());
        l.renewed(Instant::now());
        assert!(l.is_leader());
        // A renewal that started longer ago than the renew deadline grants nothing.
        l.renewed(Instant::now() - RENEW_DEADLINE - Duration::from_millis(1));
        assert!(!l.is_leader());
        l.renewed(Instant::now());
        l.step_down();
        assert!(!l.is_leader());
        const { assert!(RENEW_DEADLINE.as_secs() < LEASE_DURATION.as_secs()) };
    }
}
