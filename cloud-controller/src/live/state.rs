//! The live state the controller shares between the report handler (which applies each
//! accepted report at once), the Device watch (statuses written by any replica, label and
//! desired changes, deletions) and the live API (lists and watches).
//!
//! One mutex guards the [`LiveStore`]; every hold is short (one change, or one page or chunk
//! of a watch). Watchers are woken through a `watch` channel carrying the newest resource
//! version, so a change costs one send whatever the number of watchers, and a slow watcher
//! holds no buffer of its own: it reads the store's window at its own pace, and when it
//! falls out of the window it is ended with 410 and lists again.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use edgesync_crds::{CONDITION_ONLINE, Device, condition_status};
use kube::ResourceExt as _;
use kube::runtime::watcher;
use tokio::sync::watch;

use super::store::{DeviceState, Key, LiveStore};
use crate::device_status::in_sync;
use crate::doc::Doc;
use crate::stamp::{Stamp, Stamped};

/// The live states, shared.
#[derive(Debug)]
pub struct Live {
    store: Mutex<LiveStore>,
    changed: watch::Sender<u64>,
}

impl Live {
    /// An empty live state with a watch window of `window_len` changes and at most
    /// `window_bytes` of states. `incarnation` (random per process) tells its resource
    /// versions apart from another replica's or an earlier run's (see
    /// `LiveStore::with_incarnation`).
    pub fn new(window_len: usize, window_bytes: usize, incarnation: u64) -> Self {
        Self {
            store: Mutex::new(LiveStore::with_incarnation(
                window_len,
                window_bytes,
                incarnation,
            )),
            changed: watch::channel(0).0,
        }
    }

    /// The store, for reading (a page, a chunk of changes). Hold it briefly.
    pub fn read(&self) -> MutexGuard<'_, LiveStore> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes on every change (the value is the newest resource version).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn change(&self, f: impl FnOnce(&mut LiveStore) -> Option<u64>) {
        let rv = f(&mut self.read());
        if let Some(rv) = rv {
            self.changed.send_replace(rv);
        }
    }

    /// Applies an accepted report of `device`, received at `received_at_ms`: `stamped`,
    /// whose document is `reported` (judged against the desired state as it is parsed).
    pub fn apply_report(
        &self,
        device: &Device,
        reported: &serde_json::Map<String, serde_json::Value>,
        stamped: &Stamped,
        received_at_ms: i64,
    ) {
        let Some(key) = key_of(device) else { return };
        let in_sync = synced(device, stamped.observed_desired_version, reported);
        let state = DeviceState {
            labels: Arc::new(device.labels().clone()),
            node: device.spec.node_name.as_str().into(),
            reported: stamped.reported.clone(),
            stamp: stamped.stamp,
            reported_at: stamped.reported_at.clone(),
            observed_desired_generation: stamped.observed_desired_version,
            received_at_ms,
            online: Some(stamped.connected != Some(false)),
            in_sync: Some(in_sync),
        };
        self.change(|s| s.apply(key, state));
    }

    /// Follows the Device watch: a status newer than the live state (written by another
    /// replica, or read at start: the live state is rebuilt from the statuses), labels and
    /// desired changes, deletions.
    pub fn on_device_event(&self, event: &watcher::Event<Device>) {
        match event {
            watcher::Event::Apply(d) | watcher::Event::InitApply(d) => self.on_device(d),
            watcher::Event::Delete(d) => {
                if let Some(key) = key_of(d) {
                    self.change(|s| s.remove(&key));
                }
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }

    /// Drops the states `keep` refuses, with no change a watch would see (their shard went to
    /// another replica, which serves them now).
    pub fn forget(&self, keep: impl FnMut(&Key, &DeviceState) -> bool) -> usize {
        self.read().forget(keep)
    }

    /// Drops `device`'s state with no change a watch would see: it left this replica's
    /// Device watch because its node moved it to another replica's shard, not because it was
    /// deleted.
    pub fn forget_device(&self, device: &Device) {
        if let Some(key) = key_of(device) {
            self.read().forget_one(&key);
        }
    }

    fn on_device(&self, device: &Device) {
        let Some(key) = key_of(device) else { return };
        let status = from_status(device);
        self.change(|s| {
            if let Some(state) = status
                && let Some(rv) = s.apply(key.clone(), state)
            {
                return Some(rv);
            }
            // Not a newer report: the labels, or the desired state the held report is
            // judged against, may have changed.
            let (held, _) = s.get(&key)?;
            let synced = synced(
                device,
                held.observed_desired_generation,
                &held.reported.parse(),
            );
            s.set_meta(&key, device.labels(), Some(synced))
        });
    }
}

/// Whether `reported`, from an agent that applied desired generation `observed`, holds
/// every value `device` desires now.
fn synced(
    device: &Device,
    observed: i64,
    reported: &serde_json::Map<String, serde_json::Value>,
) -> bool {
    in_sync(
        device.metadata.generation.unwrap_or(0),
        observed,
        device
            .spec
            .desired
            .as_ref()
            .unwrap_or(&serde_json::Map::new()),
        reported,
    )
    .0
}

fn key_of(device: &Device) -> Option<Key> {
    Some((
        device.metadata.namespace.clone()?,
        device.metadata.name.clone()?,
    ))
}

/// The live state a Device's status holds, if it holds a report.
pub fn from_status(device: &Device) -> Option<DeviceState> {
    let status = device.status.as_ref()?;
    let reported = status.reported.as_ref()?;
    let reported_at = status.last_report_time.as_ref();
    let observed = status.observed_desired_generation.unwrap_or(0);
    Some(DeviceState {
        labels: Arc::new(device.labels().clone()),
        node: device.spec.node_name.as_str().into(),
        stamp: Stamp::of_status(Some(status)),
        reported_at: reported_at.map(|t| t.0.to_string()).unwrap_or_default(),
        observed_desired_generation: observed,
        // The status does not say when the controller received it: the report time is the
        // closest it knows.
        received_at_ms: reported_at.map_or(0, |t| t.0.as_millisecond()),
        online: condition_status(&status.conditions, CONDITION_ONLINE).map(|s| s == "True"),
        in_sync: Some(synced(device, observed, reported)),
        reported: Doc::of(reported),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgesync_crds::{DeviceSpec, DeviceStatus};
    use edgesync_protocol::wire::Report;
    use kube::api::ObjectMeta;
    use serde_json::json;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    type Labels = BTreeMap<String, String>;

    fn device(generation: i64, desired: serde_json::Value) -> Device {
        Device {
            metadata: ObjectMeta {
                name: Some("press-1".into()),
                namespace: Some("plant-a".into()),
                generation: Some(generation),
                labels: Some(Labels::from([("line".into(), "a".into())])),
                ..ObjectMeta::default()
            },
            spec: DeviceSpec {
                node_name: "edge-1".into(),
                desired: desired.as_object().cloned(),
                reporting: None,
            },
            status: None,
        }
    }

    /// Applies a report of `d` at `version` (epoch generation 1).
    fn report(live: &Live, d: &Device, version: u64, reported: serde_json::Value, at: i64) {
        let report = Report {
            device: "press-1".into(),
            version,
            reported: reported.as_object().cloned().unwrap_or_default(),
            reported_at: "2026-12-07T08:00:00Z".into(),
            observed_desired_version: 2,
            connected: None,
            rejection: None,
        };
        let stamped = Stamped::new(&report, Arc::from("e1"), Stamp::new(1, version));
        live.apply_report(d, &report.reported, &stamped, at);
    }

    #[test]
    fn reports_statuses_labels_and_deletions_reach_the_live_state() {
        let live = Live::new(100, usize::MAX, 3);
        let mut rx = live.subscribe();
        let d = device(2, json!({"speed": 3}));
        report(&live, &d, 5, json!({"speed": 3}), 1_000);
        assert!(rx.has_changed().unwrap());
        let first = *rx.borrow_and_update();
        assert_eq!(first, live.read().resource_version());
        let key = ("plant-a".to_owned(), "press-1".to_owned());
        let (s, _) = live.read().get(&key).unwrap();
        assert_eq!(
            (s.stamp, s.online, s.in_sync, &*s.node),
            (Stamp::new(1, 5), Some(true), Some(true), "edge-1")
        );

        // An older status (the writer catching up) changes nothing; a newer one (another
        // replica) does.
        let mut written = d.clone();
        written.status = Some(DeviceStatus {
            reported: json!({"speed": 2}).as_object().cloned(),
            reported_version: Some(4),
            reported_epoch_generation: Some(1),
            observed_desired_generation: Some(2),
            ..DeviceStatus::default()
        });
        live.on_device_event(&watcher::Event::Apply(written.clone()));
        assert!(!rx.has_changed().unwrap());
        written.status.as_mut().unwrap().reported_version = Some(6);
        live.on_device_event(&watcher::Event::Apply(written.clone()));
        let (s, _) = live.read().get(&key).unwrap();
        assert_eq!((s.stamp.version, s.in_sync), (6, Some(false)));

        // A desired change makes it out of sync without a report; a relabel shows.
        let mut relabelled = written.clone();
        relabelled.metadata.labels = Some(Labels::from([("line".into(), "b".into())]));
        relabelled.spec.desired = json!({"speed": 2}).as_object().cloned();
        live.on_device_event(&watcher::Event::Apply(relabelled.clone()));
        let (s, rv) = live.read().get(&key).unwrap();
        assert_eq!(
            (s.labels["line"].as_str(), s.in_sync, rv),
            ("b", Some(true), first + 2)
        );

        live.on_device_event(&watcher::Event::Delete(relabelled));
        assert!(live.read().is_empty());
        // A Device that never reported is not a live state.
        live.on_device_event(&watcher::Event::Apply(device(1, json!({}))));
        assert!(live.read().is_empty());
    }
}
