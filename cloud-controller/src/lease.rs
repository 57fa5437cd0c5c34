//! Leader election over a `coordination.k8s.io/v1` Lease, for the loops that must run once per
//! cluster (offline detection). Ingestion and desired streams run on every replica.
//!
//! The holder renews every `LEASE_SECONDS / 3`; another replica takes over once the renew time
//! is older than `LEASE_SECONDS`. Every update carries the Lease's resourceVersion, so two
//! replicas cannot both win the same round. A leader that cannot renew steps down before the
//! Lease expires, so at most one replica acts at any time (given sane clocks).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Lease duration in seconds.
const LEASE_SECONDS: i32 = 15;

/// Runs the election until shutdown; `leader` tells whether this replica holds the Lease.
pub async fn run(
    client: Client,
    namespace: String,
    name: String,
    identity: String,
    leader: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let renew_every = Duration::from_secs((LEASE_SECONDS / 3) as u64);
    let mut last_renewed: Option<Instant> = None;
    loop {
        match try_acquire(&api, &name, &identity).await {
            Ok(true) => {
                if !leader.swap(true, Ordering::Relaxed) {
                    info!(lease = %format!("{namespace}/{name}"), identity, "Became leader");
                }
                last_renewed = Some(Instant::now());
            }
            Ok(false) => {
                if leader.swap(false, Ordering::Relaxed) {
                    info!(identity, "Lost leadership to another replica");
                }
                last_renewed = None;
            }
            Err(e) => {
                // Step down well before the Lease could be taken over by someone else.
                let expired = last_renewed.is_none_or(|t| {
                    t.elapsed() > Duration::from_secs((LEASE_SECONDS * 2 / 3) as u64)
                });
                if expired && leader.swap(false, Ordering::Relaxed) {
                    warn!(error = %e, "Cannot renew the leader Lease; stepping down");
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                if leader.swap(false, Ordering::Relaxed) {
                    release(&api, &name, &identity).await;
                }
                return;
            }
            _ = tokio::time::sleep(renew_every) => {}
        }
    }
}

async fn try_acquire(api: &Api<Lease>, name: &str, identity: &str) -> Result<bool, kube::Error> {
    let now = MicroTime(Timestamp::now());
    let Some(mut lease) = api.get_opt(name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(identity.to_owned()),
                lease_duration_seconds: Some(LEASE_SECONDS),
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
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS));
    let expired = spec
        .renew_time
        .as_ref()
        .is_none_or(|t| now.0.as_second() - t.0.as_second() > duration);
    if holder != identity && !holder.is_empty() && !expired {
        return Ok(false);
    }
    if holder != identity {
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.holder_identity = Some(identity.to_owned());
    spec.lease_duration_seconds = Some(LEASE_SECONDS);
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
    let _ = api.replace(name, &PostParams::default(), &lease).await;
}
