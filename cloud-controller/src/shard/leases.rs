//! The shard Leases: each round (every `RETRY_PERIOD`), a replica lists the Leases of its
//! group, renews its member Lease (how replicas see each other), and renews, takes or
//! releases shard Leases as [`plan`](super::plan::plan) says.
//!
//! Timing is the leader election's (`lease.rs`), per shard: a Lease whose record has not
//! changed for `LEASE_DURATION` by this replica's own clock is free; a replica owns a shard
//! until `RENEW_DEADLINE` after the start of its last successful renewal, whatever happens
//! meanwhile, so it stops acting for a shard before anyone else may take it. Every update
//! carries the Lease's resourceVersion: two replicas cannot both take one shard.
//!
//! Cost: one list per replica per round, one write per held shard per round, one for the
//! member Lease.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use futures_util::StreamExt as _;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::plan::{View, plan};
use super::route::{Owners, Route};
use super::{fnv1a, shard_of};
use crate::lease::{LEASE_DURATION, Leadership, Observed, RENEW_DEADLINE, RETRY_PERIOD};
use crate::metrics::Metrics;

/// Label naming a Lease's group (the `--lease-name` of the replicas that share it).
pub const GROUP_LABEL: &str = "edgesync.io/lease-group";
/// Label saying what a Lease stands for: `shard` or `member`.
pub const KIND_LABEL: &str = "edgesync.io/lease-kind";
/// Label of a shard Lease: its shard number.
pub const SHARD_LABEL: &str = "edgesync.io/shard";
/// Annotation of a member Lease: where that replica takes requests forwarded to it.
pub const ADDRESS_ANNOTATION: &str = "edgesync.io/peer-address";

/// Concurrent Lease writes per round: a round's writes finish well within the renew deadline.
const WRITE_CONCURRENCY: usize = 8;

/// Which shards this replica owns, each by a deadline on the monotonic clock, and who owns
/// the others.
#[derive(Debug)]
pub struct Shards {
    owned: Vec<Leadership>,
    identity: String,
    owners: Owners,
    /// Bumped when the shards owned here change (caches follow; desired streams of lost
    /// shards end).
    changed: watch::Sender<u64>,
    /// The shards each cache (by kind) holds in full.
    cached: RwLock<HashMap<&'static str, BTreeSet<u32>>>,
}

/// The caches a shard must be in before its requests are served here.
pub const CACHE_KINDS: [&str; 2] = ["devices", "nodes"];

impl Shards {
    /// `count` shards (at least 1), none owned yet, for the replica named `identity`.
    pub fn new(count: u32, identity: &str) -> Self {
        Self {
            owned: (0..count.max(1)).map(|_| Leadership::default()).collect(),
            identity: identity.to_owned(),
            owners: Owners::new(count.max(1)),
            changed: watch::Sender::new(0),
            cached: RwLock::default(),
        }
    }

    /// Records the shards cache `kind` holds in full.
    pub fn set_cached(&self, kind: &'static str, shards: BTreeSet<u32>) {
        self.cached
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(kind, shards);
    }

    /// The shards cache `kind` holds in full.
    pub fn cached(&self, kind: &'static str) -> BTreeSet<u32> {
        self.cached
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(kind)
            .cloned()
            .unwrap_or_default()
    }

    /// Whether every cache holds `shard` in full: until then its requests are not served
    /// here (a report for a device not yet cached would look like one for an unknown device).
    fn is_cached(&self, shard: u32) -> bool {
        let cached = self.cached.read().unwrap_or_else(|e| e.into_inner());
        CACHE_KINDS
            .iter()
            .all(|k| cached.get(k).is_some_and(|s| s.contains(&shard)))
    }

    /// Where requests for EdgeNode `namespace/name` are served now.
    pub fn route(&self, namespace: &str, name: &str) -> Route {
        let shard = shard_of(namespace, name, self.count());
        self.owners.route(
            shard,
            self.owns(shard) && self.is_cached(shard),
            &self.identity,
        )
    }

    /// Changes whenever the shards owned here change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// How many shards the fleet is split into.
    pub fn count(&self) -> u32 {
        self.owned.len() as u32
    }

    /// Whether this replica owns `shard` now.
    pub fn owns(&self, shard: u32) -> bool {
        self.owned
            .get(shard as usize)
            .is_some_and(Leadership::is_leader)
    }

    /// Whether this replica owns the shard of EdgeNode `namespace/name` now.
    pub fn owns_node(&self, namespace: &str, name: &str) -> bool {
        self.owns(shard_of(namespace, name, self.count()))
    }

    /// How many shards are owned and served now (their caches have listed them).
    pub fn served(&self) -> usize {
        self.served_shards().len()
    }

    /// The shards owned and served now, in order.
    pub fn served_shards(&self) -> Vec<u32> {
        (0..self.count())
            .filter(|s| self.owns(*s) && self.is_cached(*s))
            .collect()
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The other live replicas and where they take requests (from their member Leases).
    pub fn peers(&self) -> Vec<(Arc<str>, Arc<str>)> {
        self.owners.peers(&self.identity)
    }

    /// The shards owned now, in order.
    pub fn owned(&self) -> Vec<u32> {
        (0..self.count()).filter(|s| self.owns(*s)).collect()
    }
}

/// Where the Leases live and who this replica is.
#[derive(Debug, Clone)]
pub struct Group {
    /// Namespace of the Leases.
    pub namespace: String,
    /// The group's name (`--lease-name`), the prefix of every Lease name.
    pub name: String,
    /// This replica's identity.
    pub identity: String,
    /// Where this replica takes forwarded requests (`host:port`), advertised to the others.
    pub address: Option<String>,
}

impl Group {
    fn shard_lease(&self, shard: u32) -> String {
        format!("{}-shard-{shard}", self.name)
    }

    /// The member Lease's name: the identity made a valid name, with a hash of the identity
    /// so two identities never share one.
    fn member_lease(&self) -> String {
        let clean: String = self
            .identity
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(40)
            .collect();
        format!(
            "{}-member-{}-{:08x}",
            self.name,
            clean.trim_matches('-'),
            fnv1a(&[self.identity.as_bytes()]) as u32
        )
    }

    fn lease(&self, name: String, kind: &str, shard: Option<u32>) -> Lease {
        let mut labels = std::collections::BTreeMap::from([
            (GROUP_LABEL.to_owned(), self.name.clone()),
            (KIND_LABEL.to_owned(), kind.to_owned()),
        ]);
        if let Some(s) = shard {
            labels.insert(SHARD_LABEL.to_owned(), s.to_string());
        }
        Lease {
            metadata: ObjectMeta {
                name: Some(name),
                labels: Some(labels),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec::default()),
        }
    }
}

/// Every Lease of the group as last listed, with how long each record has gone unchanged.
#[derive(Default)]
struct Seen {
    observed: HashMap<String, Option<Observed>>,
    leases: HashMap<String, Lease>,
}

/// Runs the shard Leases until shutdown, then releases every shard this replica holds and
/// deletes its member Lease, so the others take over at once.
pub async fn run(
    client: Client,
    group: Group,
    shards: Arc<Shards>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(client, &group.namespace);
    let mut seen = Seen::default();
    let mut held_before: BTreeSet<u32> = BTreeSet::new();
    // Between rounds, a watch of the group's Leases keeps the owners' table current (a
    // request follows a moved shard at once) and starts a round early when a shard is freed
    // or a replica joins or leaves. Renewals change no holder and wake nobody.
    let group_selector = format!("{GROUP_LABEL}={}", group.name);
    let events = watcher(
        api.clone(),
        watcher::Config::default().labels(&group_selector),
    )
    .default_backoff();
    let mut events = std::pin::pin!(events);
    loop {
        let started = Instant::now();
        let round = tokio::time::timeout(
            RENEW_DEADLINE,
            round(&api, &group, &shards, &mut seen, started),
        )
        .await;
        match round {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(error = %e, "Shard Lease round failed"),
            Err(_) => debug!("Shard Lease round timed out"),
        }
        let held: BTreeSet<u32> = shards.owned().into_iter().collect();
        for s in held.difference(&held_before) {
            info!(shard = s, "Shard taken");
            metrics.shard_changes("taken");
        }
        for s in held_before.difference(&held) {
            info!(shard = s, "Shard given up");
            metrics.shard_changes("given_up");
        }
        if held != held_before {
            shards.changed.send_modify(|n| *n += 1);
        }
        held_before = held;
        let next_round = tokio::time::sleep(RETRY_PERIOD);
        tokio::pin!(next_round);
        let stop = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break true,
                () = &mut next_round => break false,
                Some(event) = events.next() => {
                    if let Ok(event) = event && see(&shards, &event) {
                        let soon = (started + MIN_ROUND_GAP).max(Instant::now());
                        if tokio::time::Instant::from_std(soon) < next_round.deadline() {
                            next_round.as_mut().reset(tokio::time::Instant::from_std(soon));
                        }
                    }
                }
            }
        };
        if stop {
            break;
        }
    }
    // Stop acting for every shard first, then let the others have them.
    let held = shards.owned();
    for s in &held {
        shards.owned[*s as usize].step_down();
    }
    let names: Vec<String> = held.iter().map(|s| group.shard_lease(*s)).collect();
    let released = futures_util::stream::iter(names)
        .map(|name| {
            let api = api.clone();
            let identity = group.identity.clone();
            async move { give_up(&api, &name, &identity).await }
        })
        .buffer_unordered(WRITE_CONCURRENCY)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await;
    let _ = api.delete(&group.member_lease(), &Default::default()).await;
    info!(
        released,
        held = held.len(),
        "Shard Leases released for the other replicas"
    );
}

/// A member Lease unchanged for this long belongs to a replica gone for good: it stopped
/// counting after the Lease duration, and is deleted after four.
const MEMBER_GONE: std::time::Duration =
    std::time::Duration::from_secs(4 * LEASE_DURATION.as_secs());

/// Rounds start at most this often, however many Leases change.
const MIN_ROUND_GAP: std::time::Duration = std::time::Duration::from_millis(250);

/// Records what a Lease event says in the owners' table; whether a round should start early
/// (a shard freed, a replica new or gone).
fn see(shards: &Shards, event: &watcher::Event<Lease>) -> bool {
    let (lease, deleted) = match event {
        watcher::Event::Apply(l) | watcher::Event::InitApply(l) => (l, false),
        watcher::Event::Delete(l) => (l, true),
        watcher::Event::Init | watcher::Event::InitDone => return false,
    };
    let labels = lease.metadata.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    let holder = lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty() && !deleted);
    match (
        label(KIND_LABEL),
        label(SHARD_LABEL).and_then(|s| s.parse::<u32>().ok()),
    ) {
        (Some("shard"), Some(s)) => shards.owners.set_holder(s, holder) && holder.is_none(),
        (Some("member"), _) => {
            let Some(id) = lease
                .spec
                .as_ref()
                .and_then(|s| s.holder_identity.as_deref())
            else {
                return false;
            };
            let address = lease
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ADDRESS_ANNOTATION))
                .filter(|_| !deleted);
            shards.owners.set_address(id, address.map(String::as_str)) || deleted
        }
        _ => false,
    }
}

/// One round: list, renew the member Lease, plan, write.
async fn round(
    api: &Api<Lease>,
    group: &Group,
    shards: &Shards,
    seen: &mut Seen,
    started: Instant,
) -> Result<(), kube::Error> {
    let list = api
        .list(&ListParams::default().labels(&format!("{GROUP_LABEL}={}", group.name)))
        .await?;
    let mut observed = std::mem::take(&mut seen.observed);
    seen.leases.clear();
    let mut members = BTreeSet::from([group.identity.clone()]);
    let mut addresses: HashMap<String, Arc<str>> = HashMap::new();
    let mut holders: Vec<Option<String>> = vec![None; shards.count() as usize];
    // Member Leases of replicas gone for good (killed, or scaled in without a clean stop):
    // name and version, deleted below by one replica.
    let mut gone: Vec<(String, String, String)> = Vec::new();
    for lease in list.items {
        let Some(name) = lease.metadata.name.clone() else {
            continue;
        };
        let slot = observed.remove(&name).unwrap_or_default();
        let mut slot = slot;
        let (holder, unchanged_for) = Observed::see(&mut slot, &lease);
        seen.observed.insert(name.clone(), slot);
        let live =
            !holder.is_empty() && (holder == group.identity || unchanged_for < LEASE_DURATION);
        let labels = lease.metadata.labels.as_ref();
        let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
        match (
            label(KIND_LABEL),
            label(SHARD_LABEL).and_then(|s| s.parse::<u32>().ok()),
        ) {
            (Some("member"), _) if live => {
                let address = lease
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(ADDRESS_ANNOTATION));
                if let Some(a) = address {
                    addresses.insert(holder.clone(), a.as_str().into());
                }
                members.insert(holder);
            }
            (Some("shard"), Some(s)) if (s as usize) < holders.len() && live => {
                holders[s as usize] = Some(holder);
            }
            (Some("member"), _) if holder != group.identity && unchanged_for >= MEMBER_GONE => {
                if let Some(rv) = lease.metadata.resource_version.clone() {
                    gone.push((name.clone(), rv, holder));
                }
            }
            _ => {}
        }
        seen.leases.insert(name, lease);
    }
    // One replica cleans up (the first live member by identity), each deletion on the version
    // listed: a replica that renewed meanwhile keeps its Lease (409).
    if members.first() == Some(&group.identity) {
        for (name, rv, holder) in gone {
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: Some(rv),
                    uid: None,
                }),
                ..DeleteParams::default()
            };
            match api.delete(&name, &params).await {
                Ok(_) => {
                    info!(
                        replica = holder,
                        "Deleted the member Lease of a replica gone for a minute"
                    );
                    seen.leases.remove(&name);
                    seen.observed.remove(&name);
                }
                Err(e) => debug!(lease = name, error = %e, "Member Lease not deleted"),
            }
        }
    }

    shards.owners.set(
        holders
            .iter()
            .map(|h| h.as_deref().map(Into::into))
            .collect(),
        addresses
            .iter()
            .map(|(id, a)| (id.as_str().into(), Arc::clone(a)))
            .collect(),
    );

    // The member Lease: renewed first, so the others count this replica.
    let member = group.member_lease();
    if let Err(e) = write(api, group, seen, member, "member", None).await {
        debug!(error = %e, "Member Lease not renewed");
    }

    let plan = plan(View {
        me: &group.identity,
        members: &members,
        holders: &holders,
    });
    // Shards held by this replica but no longer its own in the Leases: lost (another replica
    // took one whose renewals failed for too long); stop acting for them now.
    for s in 0..shards.count() {
        if shards.owns(s) && holders[s as usize].as_deref() != Some(group.identity.as_str()) {
            warn!(
                shard = s,
                "Shard Lease held by another replica now; giving the shard up"
            );
            shards.owned[s as usize].step_down();
        }
    }
    for s in &plan.release {
        shards.owned[*s as usize].step_down();
    }
    let mut writes = Vec::new();
    for s in plan.renew.iter().chain(&plan.acquire) {
        writes.push((*s, true));
    }
    for s in &plan.release {
        writes.push((*s, false));
    }
    let seen_ref = &*seen;
    let results: Vec<(u32, bool, Result<(), kube::Error>)> = futures_util::stream::iter(writes)
        .map(|(s, hold)| async move {
            let name = group.shard_lease(s);
            let r = if hold {
                write(api, group, seen_ref, name, "shard", Some(s)).await
            } else {
                release(api, seen_ref, &name).await
            };
            (s, hold, r)
        })
        .buffer_unordered(WRITE_CONCURRENCY)
        .collect()
        .await;
    for (s, hold, r) in results {
        match (hold, r) {
            (true, Ok(())) => shards.owned[s as usize].renewed(started),
            (true, Err(e)) => debug!(shard = s, error = %e, "Shard Lease not taken or renewed"),
            (false, Ok(())) => debug!(shard = s, "Shard Lease released (above the fair share)"),
            (false, Err(e)) => debug!(shard = s, error = %e, "Shard Lease not released"),
        }
    }
    Ok(())
}

/// Holds Lease `name` for this replica: created, or updated from the version last listed
/// (a 409 means another replica wrote it first: not held this round).
async fn write(
    api: &Api<Lease>,
    group: &Group,
    seen: &Seen,
    name: String,
    kind: &str,
    shard: Option<u32>,
) -> Result<(), kube::Error> {
    let now = MicroTime(Timestamp::now());
    let advertise = |lease: &mut Lease| {
        if let (true, Some(address)) = (kind == "member", &group.address) {
            lease
                .metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(ADDRESS_ANNOTATION.to_owned(), address.clone());
        }
    };
    let Some(mut lease) = seen.leases.get(&name).cloned() else {
        let mut lease = group.lease(name, kind, shard);
        advertise(&mut lease);
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(group.identity.clone()),
            lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(0),
            ..LeaseSpec::default()
        });
        return api.create(&PostParams::default(), &lease).await.map(drop);
    };
    advertise(&mut lease);
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(group.identity.as_str()) {
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.holder_identity = Some(group.identity.clone());
    spec.lease_duration_seconds = Some(LEASE_DURATION.as_secs() as i32);
    spec.renew_time = Some(now);
    api.replace(&name, &PostParams::default(), &lease)
        .await
        .map(drop)
}

/// Empties Lease `name`'s holder as it is now, if this replica holds it (at shutdown: the
/// version last listed is older than this replica's own last renewal).
async fn give_up(api: &Api<Lease>, name: &str, identity: &str) -> bool {
    let Ok(Some(mut lease)) = api.get_opt(name).await else {
        return false;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return false;
    };
    if spec.holder_identity.as_deref() != Some(identity) {
        return false;
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    api.replace(name, &PostParams::default(), &lease)
        .await
        .is_ok()
}

/// Empties Lease `name`'s holder, from the version last listed.
async fn release(api: &Api<Lease>, seen: &Seen, name: &str) -> Result<(), kube::Error> {
    let Some(mut lease) = seen.leases.get(name).cloned() else {
        return Ok(());
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = None;
    spec.renew_time = None;
    api.replace(name, &PostParams::default(), &lease)
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn lease_names_are_valid_and_distinct() {
        let g = |identity: &str| Group {
            namespace: "edgesync".into(),
            name: "edgesync-controller".into(),
            identity: identity.into(),
            address: None,
        };
        let a = g("Pod_A.1").member_lease();
        let b = g("pod-a-1").member_lease();
        assert!(a.starts_with("edgesync-controller-member-pod-a-1-"), "{a}");
        assert_ne!(a, b);
        assert!(a.len() <= 253);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        );
        assert_eq!(g("x").shard_lease(7), "edgesync-controller-shard-7");
    }

    fn lease(kind: &str, shard: Option<u32>, holder: &str, address: Option<&str>) -> Lease {
        let g = Group {
            namespace: "ns".into(),
            name: "g".into(),
            identity: holder.into(),
            address: None,
        };
        let mut l = g.lease("x".into(), kind, shard);
        l.spec = Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            ..LeaseSpec::default()
        });
        if let Some(a) = address {
            l.metadata.annotations = Some([(ADDRESS_ANNOTATION.to_owned(), a.to_owned())].into());
        }
        l
    }

    #[test]
    fn lease_events_keep_the_owners_current_and_wake_rounds_only_for_changes() {
        let s = Shards::new(4, "me");
        let apply = |l: Lease| see(&s, &watcher::Event::Apply(l));
        assert!(
            apply(lease("member", None, "b", Some("10.0.0.2:80"))),
            "a replica joins"
        );
        assert!(
            !apply(lease("member", None, "b", Some("10.0.0.2:80"))),
            "its renewal"
        );
        assert!(!apply(lease("shard", Some(2), "b", None)), "a shard taken");
        assert!(!apply(lease("shard", Some(2), "b", None)), "its renewal");
        assert_eq!(
            s.owners.route(2, false, "me"),
            Route::Peer(super::super::route::Owner {
                identity: "b".into(),
                address: Some("10.0.0.2:80".into()),
            })
        );
        assert!(apply(lease("shard", Some(2), "", None)), "a shard released");
        assert_eq!(s.owners.route(2, false, "me"), Route::Moving);
        assert!(
            see(
                &s,
                &watcher::Event::Delete(lease("member", None, "b", Some("10.0.0.2:80")))
            ),
            "a replica leaves"
        );
        assert!(!see(&s, &watcher::Event::InitDone));
    }

    #[test]
    fn shards_are_owned_only_until_their_deadline() {
        let s = Shards::new(4, "me");
        assert!(s.owned().is_empty());
        s.owned[2].renewed(Instant::now());
        assert_eq!(s.owned(), vec![2]);
        assert!(!s.owns(9));
        s.owned[2].renewed(Instant::now() - RENEW_DEADLINE - Duration::from_millis(1));
        assert!(s.owned().is_empty());
    }
}
