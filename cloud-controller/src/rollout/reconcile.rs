//! The rollout loop: the leader's, once a second, over every `DeviceRollout` (docs/rollouts.md).
//!
//! Level-triggered from the cluster's state: the rollout's status says which step it is on,
//! the marks on the Devices say which of them it patched, and the Devices' status says how
//! each took it. A new leader, or this one after a restart, therefore goes on exactly where
//! the last one stopped: no device is patched twice and no finished wave runs again.
//!
//! Every write (a Device patch, a revert, a status) takes a unit of the shared write budget,
//! so a rollout never starves the status writes of reports. Device patches carry the
//! Device's resourceVersion: a concurrent edit makes the patch fail and the device is taken
//! again next round from its new state, never overwritten.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgesync_crds::{
    CONDITION_BLOCKED, CONDITION_HALTED, CONDITION_IN_SYNC, CONDITION_ONLINE,
    CONDITION_PROGRESSING, Device, DeviceRollout, DeviceRolloutStatus, RolloutPhase,
    condition_status, set_condition,
};
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::events::EventType;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::mark::{self, Mark};
use super::plan;
use super::wave::{self, DeviceView, Next, Position, Strategy};
use crate::budget::{Signal, WriteBudget};
use crate::cache::Caches;
use crate::events::Events;
use crate::lease::Leadership;
use crate::metrics::Metrics;

/// How often the loop runs.
const TICK: Duration = Duration::from_secs(1);
/// While patching a wave, the breach check runs again at least this often: a device of the
/// wave that refuses meanwhile stops the wave within this time of its status showing it.
const RECHECK: Duration = Duration::from_millis(200);
/// How long a patch this loop wrote stands in for the cache's copy of the Device, until the
/// watch brings the Device with its mark.
const REMEMBER: Duration = Duration::from_secs(60);
/// Device patches a rollout has in flight at once: one at a time, a patch's round trip
/// (tens of milliseconds on a loaded API server) would cap a wave at a few dozen devices a
/// second, far below the write budget.
const IN_FLIGHT: usize = 8;
/// How often `status.touched` is written while a wave is patched.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Devices a list page holds, with shards (the loop then reads Devices from the API server).
const PAGE: u32 = 500;

/// Everything the loop needs.
pub struct Rollouts {
    /// API client.
    pub client: Client,
    /// Caches (every Device, without shards).
    pub caches: Caches,
    /// With shards, this replica caches only its own shards' Devices: the loop lists the
    /// selected Devices from the API server instead.
    pub sharded: bool,
    /// Shared write budget.
    pub budget: Arc<WriteBudget>,
    /// Whether this replica is the leader.
    pub leader: Arc<Leadership>,
    /// Kubernetes Events.
    pub events: Events,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// The wave being patched: the strategy, where the rollout is, its selected Devices.
#[derive(Clone, Copy)]
struct Wave<'a> {
    strategy: &'a Strategy,
    at: Position,
    devices: &'a [Arc<Device>],
}

/// Marks this leader wrote that the cache may not show yet, by (rollout uid, device).
type Written = HashMap<(String, String), (Mark, Instant)>;

impl Rollouts {
    /// Runs until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = self.caches.wait_ready() => {}
        }
        debug!("Rollout loop started");
        let mut written = Written::new();
        loop {
            if self.leader.is_leader() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.round(&mut written) => {}
                }
            } else {
                // A leader that lost its Lease forgets what it wrote: the next one reads it
                // from the Devices.
                written.clear();
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    }

    async fn round(&self, written: &mut Written) {
        written.retain(|_, (_, at)| at.elapsed() < REMEMBER);
        let api: Api<DeviceRollout> = Api::all(self.client.clone());
        // From the API server's watch cache (resourceVersion 0), not etcd: a list a second
        // costs it next to nothing. A copy a moment old is safe: every write carries the
        // resourceVersion it was decided on, and a stale decision fails with a conflict.
        let mut rollouts = match api.list(&ListParams::default().match_any()).await {
            Ok(list) => list.items,
            Err(e) => {
                warn!(error = %e, "Cannot list DeviceRollouts");
                return;
            }
        };
        rollouts.sort_by(|a, b| {
            (
                a.metadata.creation_timestamp.as_ref().map(|t| t.0),
                a.name_any(),
            )
                .cmp(&(
                    b.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    b.name_any(),
                ))
        });
        for rollout in &rollouts {
            if !self.leader.is_leader() {
                return;
            }
            if let Err(e) = self.reconcile(rollout, &rollouts, written).await {
                warn!(
                    namespace = rollout.namespace().unwrap_or_default(),
                    rollout = rollout.name_any(),
                    error = %e,
                    "Cannot reconcile DeviceRollout"
                );
            }
        }
    }

    /// One rollout, one round.
    async fn reconcile(
        &self,
        rollout: &DeviceRollout,
        all: &[DeviceRollout],
        written: &mut Written,
    ) -> Result<(), kube::Error> {
        let status = rollout.status.clone().unwrap_or_default();
        let phase = status.phase;
        if phase == Some(RolloutPhase::Complete) || status.reverted.is_some() {
            return Ok(());
        }
        let ended = phase.is_some_and(RolloutPhase::ended);
        if ended && !rollout.spec.strategy.revert_on_failure {
            return Ok(());
        }
        let (strategy, selector) = match check(rollout) {
            Ok(ok) => ok,
            Err(why) => {
                if !ended {
                    self.invalid(rollout, &status, &why).await?;
                }
                return Ok(());
            }
        };
        let now = Timestamp::now().as_second();
        let devices = self
            .devices(rollout, &selector, status.start_time.as_ref())
            .await?;
        if ended {
            return self.revert(rollout, &status, &devices, written).await;
        }
        if rollout.spec.abort {
            let mut next = status.clone();
            next.phase = Some(RolloutPhase::Aborted);
            ended_conditions(
                &mut next,
                "Aborted",
                "Aborted by `kubectl edgesync rollout abort`",
            );
            if self.write_status(rollout, &status, next).await? {
                self.event(rollout, EventType::Normal, "Aborted", abort_note(rollout));
            }
            return Ok(());
        }
        if matches!(phase, None | Some(RolloutPhase::Pending)) {
            return self.start(rollout, &status, &devices, all).await;
        }
        let uid = rollout.uid().unwrap_or_default();
        let ordered = ordered_views(&uid, &mark::key(&rollout.name_any()), &devices, written);
        let step = status.current_step.unwrap_or(1);
        let progress = wave::progress(&ordered, &strategy, step, now);
        let mut next_status = status.clone();
        next_status.observed_generation = rollout.metadata.generation;
        count_into(&mut next_status, &progress);
        if rollout.spec.paused {
            next_status.phase = Some(RolloutPhase::Paused);
            set(
                &mut next_status,
                CONDITION_PROGRESSING,
                true,
                "Paused",
                "Paused: resume with `kubectl edgesync rollout resume`",
            );
            if self.write_status(rollout, &status, next_status).await?
                && phase != Some(RolloutPhase::Paused)
            {
                self.event(
                    rollout,
                    EventType::Normal,
                    "Paused",
                    format!("Paused at step {step}"),
                );
            }
            return Ok(());
        }
        next_status.phase = Some(RolloutPhase::Progressing);
        let untouched: Vec<&DeviceView<'_>> = ordered.iter().filter(|d| d.mark.is_none()).collect();
        let at = Position {
            step,
            selected: status.selected.unwrap_or(0),
            wave_done: status.step_done_time.as_ref().map(|t| t.0.as_second()),
            paused_step: status.paused_step,
        };
        match wave::next(&strategy, at, &progress, untouched.len() as u64, now) {
            Next::Touch(n) => {
                set(
                    &mut next_status,
                    CONDITION_PROGRESSING,
                    true,
                    "Patching",
                    &format!("Step {step}: patching devices"),
                );
                let names: Vec<&str> = untouched.iter().take(n as usize).map(|d| d.name).collect();
                let wave = Wave {
                    strategy: &strategy,
                    at,
                    devices: &devices,
                };
                let halted = self
                    .touch(rollout, wave, &names, progress.touched, written)
                    .await?;
                if halted {
                    // Counted again on the next round, with the breach: it halts there.
                    return Ok(());
                }
                self.write_status(rollout, &status, next_status).await?;
            }
            Next::Wait | Next::HoldUntil(_) => {
                set(
                    &mut next_status,
                    CONDITION_PROGRESSING,
                    true,
                    "WaveInProgress",
                    &format!("Step {step}: waiting for its devices"),
                );
                self.write_status(rollout, &status, next_status).await?;
            }
            Next::WaveDone => {
                next_status.step_done_time = Some(Time(Timestamp::now()));
                self.write_status(rollout, &status, next_status).await?;
            }
            Next::Halt => {
                next_status.phase = Some(RolloutPhase::Halted);
                let why = halt_message(&strategy, at, &progress);
                ended_conditions(&mut next_status, "FailuresExceeded", &why);
                set(
                    &mut next_status,
                    CONDITION_HALTED,
                    true,
                    "FailuresExceeded",
                    &why,
                );
                if self.write_status(rollout, &status, next_status).await? {
                    info!(
                        namespace = rollout.namespace().unwrap_or_default(),
                        rollout = rollout.name_any(),
                        why,
                        "DeviceRollout halted"
                    );
                    self.event(rollout, EventType::Warning, "Halted", why);
                }
            }
            Next::Pause => {
                // spec.paused first: a crash between the two writes pauses twice rather
                // than not at all. On the resourceVersion this was decided on, so a stale
                // copy never pauses again a rollout its operator has just resumed.
                let api: Api<DeviceRollout> = Api::namespaced(
                    self.client.clone(),
                    &rollout.namespace().unwrap_or_default(),
                );
                self.budget.acquire().await;
                let pause = json!({
                    "metadata": {"resourceVersion": rollout.resource_version()},
                    "spec": {"paused": true},
                });
                let updated = match api
                    .patch(
                        &rollout.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&pause),
                    )
                    .await
                {
                    Ok(updated) => updated,
                    Err(kube::Error::Api(s)) if s.code == 409 => return Ok(()),
                    Err(e) => return Err(e),
                };
                next_status.paused_step = Some(step);
                next_status.phase = Some(RolloutPhase::Paused);
                set(
                    &mut next_status,
                    CONDITION_PROGRESSING,
                    true,
                    "Paused",
                    &format!(
                        "Step {step} is done and asks for a resume: `kubectl edgesync rollout resume`"
                    ),
                );
                // Against the rollout as the spec write left it (its resourceVersion).
                if self.write_status(&updated, &status, next_status).await? {
                    self.event(
                        rollout,
                        EventType::Normal,
                        "Paused",
                        format!(
                            "Step {step} is done; waiting for `kubectl edgesync rollout resume`"
                        ),
                    );
                }
            }
            Next::Advance => {
                next_status.current_step = Some(step + 1);
                next_status.step_done_time = None;
                let note = format!(
                    "Step {step} done ({} of {} devices In-Sync); step {} patches up to {}",
                    progress.updated,
                    at.selected,
                    step + 1,
                    strategy.target(step + 1, at.selected)
                );
                if self.write_status(rollout, &status, next_status).await? {
                    self.event(rollout, EventType::Normal, "StepStarted", note);
                }
            }
            Next::Complete => {
                next_status.phase = Some(RolloutPhase::Complete);
                let note = format!(
                    "{} devices patched, {} In-Sync, {} failed",
                    progress.touched, progress.updated, progress.failed
                );
                ended_conditions(&mut next_status, "Complete", &note);
                if self.write_status(rollout, &status, next_status).await? {
                    self.event(rollout, EventType::Normal, "Complete", note);
                }
            }
        }
        Ok(())
    }

    /// Starts a rollout: freezes its selection, or waits for another that would interleave.
    async fn start(
        &self,
        rollout: &DeviceRollout,
        status: &DeviceRolloutStatus,
        devices: &[Arc<Device>],
        all: &[DeviceRollout],
    ) -> Result<(), kube::Error> {
        let mut next = status.clone();
        if let Some((other, keys)) = conflict(rollout, devices, all) {
            next.phase = Some(RolloutPhase::Pending);
            let why = format!(
                "Waits for DeviceRollout {other}, which selects some of the same Devices and sets {keys}; it starts once {other} is Complete or Aborted (or deleted)"
            );
            set(&mut next, CONDITION_BLOCKED, true, "ConflictsWith", &why);
            set(&mut next, CONDITION_PROGRESSING, false, "Blocked", &why);
            if self.write_status(rollout, status, next).await?
                && status.phase != Some(RolloutPhase::Pending)
            {
                self.event(rollout, EventType::Warning, "Blocked", why);
            }
            return Ok(());
        }
        next.phase = Some(RolloutPhase::Progressing);
        next.start_time = Some(Time(Timestamp::now()));
        next.selected = Some(devices.len() as u64);
        next.current_step = Some(1);
        next.observed_generation = rollout.metadata.generation;
        if status.phase == Some(RolloutPhase::Pending) {
            set(
                &mut next,
                CONDITION_BLOCKED,
                false,
                "NoConflict",
                "No other rollout sets the same keys on these Devices",
            );
        }
        set(&mut next, CONDITION_PROGRESSING, true, "Started", "Started");
        if self.write_status(rollout, status, next).await? {
            self.event(
                rollout,
                EventType::Normal,
                "Started",
                format!("Selected {} Devices", devices.len()),
            );
        }
        Ok(())
    }

    /// Patches `names` (untouched, in order) for the current step, [`IN_FLIGHT`] at a time.
    /// Before each patch is sent, at least every [`RECHECK`], the wave's failures are counted
    /// again from the cache; true when that found a breach (or leadership ended) and no
    /// further patch was sent. `touched` (the status's count when the round started) is
    /// brought up to date every [`PROGRESS_EVERY`] while a long wave is patched.
    async fn touch(
        &self,
        rollout: &DeviceRollout,
        wave: Wave<'_>,
        names: &[&str],
        touched: u64,
        written: &mut Written,
    ) -> Result<bool, kube::Error> {
        let devices = wave.devices;
        let uid = rollout.uid().unwrap_or_default();
        let key = mark::key(&rollout.name_any());
        let namespace = rollout.namespace().unwrap_or_default();
        let api: Api<Device> = Api::namespaced(self.client.clone(), &namespace);
        let by_name: HashMap<&str, &Arc<Device>> = devices
            .iter()
            .map(|d| (d.metadata.name.as_deref().unwrap_or(""), d))
            .collect();
        let (mut checked, mut reported) = (Instant::now(), Instant::now());
        let (mut stopped, mut patched) = (false, 0u64);
        let mut next = names.iter();
        let mut in_flight = FuturesUnordered::new();
        loop {
            while !stopped && in_flight.len() < IN_FLIGHT {
                if !self.leader.is_leader()
                    || checked.elapsed() >= RECHECK && self.breached(rollout, wave, written)
                {
                    stopped = true;
                    break;
                }
                if checked.elapsed() >= RECHECK {
                    checked = Instant::now();
                }
                let Some(name) = next.next() else { break };
                let Some(device) = by_name.get(name) else {
                    continue;
                };
                // The cache's copy, when newer than the one this round started from.
                let device = if self.sharded {
                    Arc::clone(device)
                } else {
                    self.caches
                        .device(&namespace, name)
                        .unwrap_or_else(|| Arc::clone(device))
                };
                let (mark, patch) = touch_patch(rollout, &uid, &key, wave.at.step, &device);
                let api = &api;
                in_flight.push(async move {
                    let result = self.write_device(api, name, &patch).await;
                    (*name, mark, result)
                });
            }
            let Some((name, mark, result)) = in_flight.next().await else {
                break;
            };
            match result {
                Ok(done) => {
                    if done.metadata.generation != Some(mark.generation) {
                        warn!(device = name, expected = mark.generation, got = ?done.metadata.generation, "A rollout's patch made another generation than expected");
                    }
                    written.insert((uid.clone(), name.to_owned()), (mark, Instant::now()));
                    patched += 1;
                }
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
                    debug!(
                        device = name,
                        "Device changed or gone under a rollout's patch; taken again next round"
                    );
                }
                // The patches in flight are drained by dropping them: each either reached
                // the API server (and its mark is read back next round) or not.
                Err(e) => return Err(e),
            }
            if reported.elapsed() >= PROGRESS_EVERY {
                reported = Instant::now();
                self.progress(rollout, touched + patched).await;
            }
        }
        Ok(stopped)
    }

    /// Whether the current wave's failures, counted again from the cache, pass `maxFailures`
    /// (never with shards: the cache does not hold the rollout's Devices).
    fn breached(&self, rollout: &DeviceRollout, wave: Wave<'_>, written: &Written) -> bool {
        if self.sharded {
            return false;
        }
        let Wave {
            strategy,
            at,
            devices,
        } = wave;
        let namespace = rollout.namespace().unwrap_or_default();
        let fresh: Vec<Arc<Device>> = devices
            .iter()
            .filter_map(|d| self.caches.device(&namespace, &d.name_any()))
            .collect();
        let uid = rollout.uid().unwrap_or_default();
        let views = ordered_views(&uid, &mark::key(&rollout.name_any()), &fresh, written);
        let p = wave::progress(&views, strategy, at.step, Timestamp::now().as_second());
        plan::breached(
            p.wave_failed,
            strategy.wave(at.step, at.selected),
            strategy.max_failures,
        )
    }

    /// `status.touched` while a wave is patched, for `kubectl get dro`. A merge patch without
    /// a resourceVersion: the count is recomputed from the Devices' marks every round, so a
    /// stale one is corrected within a second.
    async fn progress(&self, rollout: &DeviceRollout, touched: u64) {
        let api: Api<DeviceRollout> = Api::namespaced(
            self.client.clone(),
            &rollout.namespace().unwrap_or_default(),
        );
        self.budget.acquire().await;
        let patch = json!({"status": {"touched": touched}});
        if api
            .patch_status(
                &rollout.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .is_ok()
        {
            self.metrics.rollout_status_writes.inc();
        }
    }

    /// After a halt or an abort with `revertOnFailure`: puts back the previous values of each
    /// patched device that still holds the rollout's; then records the count.
    async fn revert(
        &self,
        rollout: &DeviceRollout,
        status: &DeviceRolloutStatus,
        devices: &[Arc<Device>],
        written: &mut Written,
    ) -> Result<(), kube::Error> {
        let uid = rollout.uid().unwrap_or_default();
        let key = mark::key(&rollout.name_any());
        let namespace = rollout.namespace().unwrap_or_default();
        let api: Api<Device> = Api::namespaced(self.client.clone(), &namespace);
        let (mut reverted, mut changed_since) = (0u64, Vec::new());
        for device in devices {
            let name = device.name_any();
            let Some(mut mark) = current_mark(&uid, &key, device, written) else {
                continue;
            };
            if mark.reverted {
                reverted += 1;
                continue;
            }
            let desired = device.spec.desired.clone().unwrap_or_default();
            if !plan::holds(&desired, &rollout.spec.desired) {
                changed_since.push(name);
                continue;
            }
            if !self.leader.is_leader() {
                return Ok(());
            }
            mark.reverted = true;
            let patch = json!({
                "metadata": {
                    "resourceVersion": device.resource_version(),
                    "annotations": {&key: mark.text()},
                },
                "spec": {"desired": mark.revert},
            });
            match self.write_device(&api, &name, &patch).await {
                Ok(_) => {
                    reverted += 1;
                    written.insert((uid.clone(), name), (mark, Instant::now()));
                }
                // Changed meanwhile: looked at again next round.
                Err(kube::Error::Api(s)) if s.code == 409 => return Ok(()),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let mut next = status.clone();
        next.reverted = Some(reverted);
        let mut note = format!("Put back the previous desired values of {reverted} Devices");
        if !changed_since.is_empty() {
            changed_since.sort();
            let shown: Vec<&str> = changed_since.iter().take(10).map(String::as_str).collect();
            note.push_str(&format!(
                "; left {} alone, changed since the rollout patched them: {}",
                changed_since.len(),
                shown.join(", ")
            ));
        }
        if self.write_status(rollout, status, next).await? {
            self.event(rollout, EventType::Normal, "Reverted", note);
        }
        Ok(())
    }

    /// A spec the loop cannot follow: the rollout halts before patching anything.
    async fn invalid(
        &self,
        rollout: &DeviceRollout,
        status: &DeviceRolloutStatus,
        why: &str,
    ) -> Result<(), kube::Error> {
        let mut next = status.clone();
        next.phase = Some(RolloutPhase::Halted);
        ended_conditions(&mut next, "InvalidSpec", why);
        set(&mut next, CONDITION_HALTED, true, "InvalidSpec", why);
        if self.write_status(rollout, status, next).await? {
            self.event(rollout, EventType::Warning, "InvalidSpec", why.to_owned());
        }
        Ok(())
    }

    /// The Devices the rollout selected: those its selector matches that existed when it
    /// started, and those it marked (whatever their labels are now).
    async fn devices(
        &self,
        rollout: &DeviceRollout,
        selector: &Selector,
        started: Option<&Time>,
    ) -> Result<Vec<Arc<Device>>, kube::Error> {
        let namespace = rollout.namespace().unwrap_or_default();
        let key = mark::key(&rollout.name_any());
        let in_selection = |d: &Device| {
            let labels = d.labels();
            labels.contains_key(&key)
                || selector.matches(labels)
                    && match (started, &d.metadata.creation_timestamp) {
                        (Some(start), Some(created)) => created.0 <= start.0,
                        _ => true,
                    }
        };
        if !self.sharded {
            return Ok(self
                .caches
                .devices
                .state()
                .into_iter()
                .filter(|d| d.metadata.namespace.as_deref() == Some(namespace.as_str()))
                .filter(|d| in_selection(d))
                .collect());
        }
        let api: Api<Device> = Api::namespaced(self.client.clone(), &namespace);
        let mut found: HashMap<String, Arc<Device>> = HashMap::new();
        for labels in [selector.to_string(), key.clone()] {
            let mut params = ListParams::default().labels(&labels).limit(PAGE);
            loop {
                let page = api.list(&params).await?;
                for d in page.items {
                    if in_selection(&d) {
                        found.insert(d.name_any(), Arc::new(d));
                    }
                }
                match page.metadata.continue_ {
                    Some(token) if !token.is_empty() => params = params.continue_token(&token),
                    _ => break,
                }
            }
        }
        Ok(found.into_values().collect())
    }

    /// One Device write, through the budget.
    async fn write_device(
        &self,
        api: &Api<Device>,
        name: &str,
        patch: &serde_json::Value,
    ) -> Result<Device, kube::Error> {
        self.budget.acquire().await;
        let started = Instant::now();
        let result = api
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await;
        self.budget.record(signal(&result, started));
        if result.is_ok() {
            self.metrics.rollout_device_writes.inc();
        }
        result
    }

    /// Writes `next` as the rollout's status when it differs from `current`; true when it
    /// wrote. A conflict (the rollout changed) is not an error: next round reads it again.
    async fn write_status(
        &self,
        rollout: &DeviceRollout,
        current: &DeviceRolloutStatus,
        next: DeviceRolloutStatus,
    ) -> Result<bool, kube::Error> {
        if &next == current {
            return Ok(false);
        }
        let api: Api<DeviceRollout> = Api::namespaced(
            self.client.clone(),
            &rollout.namespace().unwrap_or_default(),
        );
        let mut object = rollout.clone();
        object.status = Some(next);
        self.budget.acquire().await;
        let started = Instant::now();
        let result = api
            .replace_status(&rollout.name_any(), &PostParams::default(), &object)
            .await;
        self.budget.record(signal(&result, started));
        match result {
            Ok(_) => {
                self.metrics.rollout_status_writes.inc();
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn event(&self, rollout: &DeviceRollout, type_: EventType, reason: &str, note: String) {
        self.events.transition(rollout, type_, reason, note);
    }
}

/// How a write went, for the budget.
fn signal<T>(result: &Result<T, kube::Error>, started: Instant) -> Signal {
    match result {
        Err(kube::Error::Api(s)) if s.code == 429 || s.code >= 500 => Signal::Overloaded,
        Err(kube::Error::Api(_)) | Ok(_) => Signal::Answered(started.elapsed()),
        Err(_) => Signal::Overloaded,
    }
}

/// The strategy and selector, or why the spec cannot be followed.
fn check(rollout: &DeviceRollout) -> Result<(Strategy, Selector), String> {
    let name = rollout.name_any();
    if name.len() > mark::MAX_NAME {
        return Err(format!(
            "the name is {} characters long; a DeviceRollout's name is at most {} (it is a label key on the Devices it patches)",
            name.len(),
            mark::MAX_NAME
        ));
    }
    let strategy = Strategy::read(&rollout.spec)?;
    let selector =
        Selector::try_from(rollout.spec.selector.clone()).map_err(|e| format!("selector: {e}"))?;
    Ok((strategy, selector))
}

/// The mark and the patch that touch `device` at `step`: the rollout's document merged into
/// its `spec.desired`, the label and the annotation, one write conditioned on the Device's
/// resourceVersion.
fn touch_patch(
    rollout: &DeviceRollout,
    uid: &str,
    key: &str,
    step: u32,
    device: &Device,
) -> (Mark, serde_json::Value) {
    let desired = device.spec.desired.clone().unwrap_or_default();
    let changes = !plan::holds(&desired, &rollout.spec.desired);
    let mark = Mark {
        uid: uid.to_owned(),
        step,
        generation: device.metadata.generation.unwrap_or(1) + i64::from(changes),
        time: Timestamp::now().as_second(),
        revert: plan::revert_patch(&desired, &rollout.spec.desired),
        reverted: false,
    };
    let patch = json!({
        "metadata": {
            "resourceVersion": device.resource_version(),
            "labels": {key: step.to_string()},
            "annotations": {key: mark.text()},
        },
        "spec": {"desired": rollout.spec.desired},
    });
    (mark, patch)
}

/// This rollout's mark on `device`: what this leader wrote, until the cache shows it.
fn current_mark(uid: &str, key: &str, device: &Device, written: &Written) -> Option<Mark> {
    let cached = Mark::read(device.annotations().get(key)).filter(|m| m.uid == uid);
    let ours = written.get(&(uid.to_owned(), device.name_any()));
    match (cached, ours) {
        (Some(c), Some((w, _))) if c != *w => Some(w.clone()),
        (None, Some((w, _))) => Some(w.clone()),
        (c, _) => c,
    }
}

/// The Devices as the wave arithmetic sees them, in the rollout's order.
fn ordered_views<'a>(
    uid: &str,
    key: &str,
    devices: &'a [Arc<Device>],
    written: &Written,
) -> Vec<DeviceView<'a>> {
    let by_name: HashMap<&str, &'a Device> = devices
        .iter()
        .map(|d| (d.metadata.name.as_deref().unwrap_or(""), d.as_ref()))
        .collect();
    plan::order(uid, by_name.keys().copied())
        .into_iter()
        .filter_map(|name| by_name.get(name).map(|d| (name, *d)))
        .map(|(name, d)| {
            let status = d.status.as_ref();
            let conditions = status.map(|s| s.conditions.as_slice()).unwrap_or_default();
            let online = conditions.iter().find(|c| c.type_ == CONDITION_ONLINE);
            DeviceView {
                name,
                mark: current_mark(uid, key, d, written),
                observed: status
                    .and_then(|s| s.observed_desired_generation)
                    .unwrap_or(0),
                in_sync: condition_status(conditions, CONDITION_IN_SYNC) == Some("True"),
                rejection: status
                    .and_then(|s| s.desired_rejection.as_ref())
                    .map(|r| (r.generation, r.code.as_str(), r.message.as_str())),
                online: online.is_some_and(|c| c.status == "True"),
                online_since: online
                    .filter(|c| c.status == "True")
                    .map(|c| c.last_transition_time.0.as_second()),
            }
        })
        .collect()
}

/// Another rollout this one would interleave with: not ended (or halted, holding the
/// devices it patched), started before this one, setting a key this one sets, on a device both select.
/// Returns its name and the keys, for the condition.
fn conflict(
    rollout: &DeviceRollout,
    devices: &[Arc<Device>],
    all: &[DeviceRollout],
) -> Option<(String, String)> {
    let namespace = rollout.namespace();
    let uid = rollout.uid();
    for other in all {
        if other.namespace() != namespace || other.uid() == uid {
            continue;
        }
        let phase = other.status.as_ref().and_then(|s| s.phase);
        let touched = other.status.as_ref().map_or(0, |s| s.touched);
        if matches!(phase, Some(RolloutPhase::Complete | RolloutPhase::Aborted))
            || phase == Some(RolloutPhase::Halted) && touched == 0
        {
            continue;
        }
        // Two waiting rollouts: the older goes first (`all` is sorted oldest first).
        if matches!(phase, None | Some(RolloutPhase::Pending))
            && all.iter().position(|r| r.uid() == other.uid())
                > all.iter().position(|r| r.uid() == uid)
        {
            continue;
        }
        if !plan::overlaps(&rollout.spec.desired, &other.spec.desired) {
            continue;
        }
        let other_key = mark::key(&other.name_any());
        let Ok(other_selector) = Selector::try_from(other.spec.selector.clone()) else {
            continue;
        };
        let shared = devices.iter().any(|d| {
            let labels = d.labels();
            labels.contains_key(&other_key) || other_selector.matches(labels)
        });
        if shared {
            let mut keys: Vec<&str> = rollout
                .spec
                .desired
                .keys()
                .filter(|k| other.spec.desired.contains_key(*k))
                .map(String::as_str)
                .collect();
            keys.truncate(5);
            return Some((other.name_any(), keys.join(", ")));
        }
    }
    None
}

fn count_into(status: &mut DeviceRolloutStatus, progress: &wave::Progress) {
    status.touched = progress.touched;
    status.updated = progress.updated;
    status.failed = progress.failed;
    status.failures = progress.failures.clone();
}

fn set(status: &mut DeviceRolloutStatus, type_: &str, is_true: bool, reason: &str, message: &str) {
    // The time only moves when the status flips (set_condition keeps it otherwise).
    set_condition(
        &mut status.conditions,
        type_,
        is_true,
        reason,
        message,
        None,
        Time(Timestamp::now()),
    );
}

fn ended_conditions(status: &mut DeviceRolloutStatus, reason: &str, message: &str) {
    set(status, CONDITION_PROGRESSING, false, reason, message);
}

fn halt_message(strategy: &Strategy, at: Position, progress: &wave::Progress) -> String {
    let mut why = format!(
        "{} of the {} devices of step {} failed, more than maxFailures allows; no further device is patched",
        progress.wave_failed,
        strategy.wave(at.step, at.selected),
        at.step
    );
    if let Some(first) = progress.failures.iter().find(|f| f.step == at.step) {
        why.push_str(&format!(" (first: {} {}", first.device, first.code));
        if !first.message.is_empty() {
            why.push_str(&format!(": {}", first.message));
        }
        why.push(')');
    }
    why
}

fn abort_note(rollout: &DeviceRollout) -> String {
    if rollout.spec.strategy.revert_on_failure {
        "Aborted; putting back the previous values of the patched Devices".into()
    } else {
        "Aborted; the patched Devices keep the rollout's values".into()
    }
}
