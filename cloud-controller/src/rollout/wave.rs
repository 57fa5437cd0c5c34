//! Where a rollout stands and what it does next, from its spec, its status, the Devices it
//! selected and the time (docs/design/rollouts.md). Pure: the reconcile loop reads the
//! Devices and the clock and writes what this decides.

use edgesync_crds::{DeviceRolloutSpec, OfflinePolicy, RolloutFailure};

use super::mark::Mark;
use super::plan::{Count, breached};

/// Failures kept in the status for `kubectl edgesync rollout status`.
pub const MAX_LISTED_FAILURES: usize = 20;

/// The failure code of a device that did not become In-Sync in time.
pub const DEADLINE_EXCEEDED: &str = "deadline_exceeded";

/// One wave, read from the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Devices patched once the step is done, counting the steps before.
    pub target: Count,
    /// Seconds to wait after the wave.
    pub pause_seconds: u32,
    /// Wait for a resume after the wave.
    pub pause: bool,
}

/// A rollout's strategy, checked and read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Strategy {
    /// The waves; the last always covers every selected device.
    pub steps: Vec<Step>,
    /// Failures a wave may have.
    pub max_failures: Count,
    /// Whether an offline device counts as done for its wave.
    pub offline_wait: bool,
    /// Seconds from a device's patch to In-Sync.
    pub deadline: i64,
}

impl Strategy {
    /// Reads the spec's strategy. Without steps, one wave of every device; when the last
    /// step covers less than every device, a final step of "100%" follows it (a rollout
    /// ends with the whole selection changed, or halted).
    ///
    /// # Errors
    /// What is wrong, in a sentence for the rollout's condition.
    pub fn read(spec: &DeviceRolloutSpec) -> Result<Self, String> {
        let mut steps = Vec::with_capacity(spec.strategy.steps.len() + 1);
        for (i, step) in spec.strategy.steps.iter().enumerate() {
            let target = Count::parse(&step.devices.text())
                .map_err(|e| format!("strategy.steps[{i}].devices: {e}"))?;
            steps.push(Step {
                target,
                pause_seconds: step.pause_seconds.unwrap_or(0),
                pause: step.pause,
            });
        }
        if steps.last().map(|s| s.target) != Some(Count::Percent(100)) {
            steps.push(Step {
                target: Count::Percent(100),
                pause_seconds: 0,
                pause: false,
            });
        }
        let max_failures = match &spec.strategy.max_failures {
            Some(m) => Count::parse(&m.text()).map_err(|e| format!("strategy.maxFailures: {e}"))?,
            None => Count::Devices(0),
        };
        if spec.desired.is_empty() {
            return Err("desired is empty: there is nothing to roll out".into());
        }
        Ok(Self {
            steps,
            max_failures,
            offline_wait: spec.strategy.offline == OfflinePolicy::Wait,
            deadline: i64::from(spec.progress_deadline_seconds),
        })
    }

    /// Devices patched once step `step` (1-based) is done, of `selected`; never fewer than
    /// the step before (a step written smaller than an earlier one adds none).
    pub fn target(&self, step: u32, selected: u64) -> u64 {
        self.steps
            .iter()
            .take(step as usize)
            .map(|s| s.target.of(selected))
            .max()
            .unwrap_or(0)
    }

    /// How many devices step `step`'s wave patches.
    pub fn wave(&self, step: u32, selected: u64) -> u64 {
        self.target(step, selected) - self.target(step.saturating_sub(1), selected)
    }

    /// The number of steps.
    pub fn last(&self) -> u32 {
        self.steps.len() as u32
    }
}

/// What the loop knows of one selected Device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceView<'a> {
    /// The Device's name.
    pub name: &'a str,
    /// This rollout's mark on it, once patched.
    pub mark: Option<Mark>,
    /// `status.observedDesiredGeneration`.
    pub observed: i64,
    /// Whether its `InSync` condition is True.
    pub in_sync: bool,
    /// `status.desiredRejection`: the generation, code and message.
    pub rejection: Option<(i64, &'a str, &'a str)>,
    /// Whether its `Online` condition is True.
    pub online: bool,
    /// When `Online` last turned True (Unix seconds).
    pub online_since: Option<i64>,
}

/// Where one patched device is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceState {
    /// Not patched by this rollout.
    Untouched,
    /// Patched, not yet In-Sync, within its deadline.
    Pending,
    /// In-Sync with the patch's generation or a later one.
    Updated,
    /// Offline with `offline: Wait`: done for its wave, takes the change when it returns.
    Waiting,
    /// Refused the change, or missed its deadline.
    Failed {
        /// The refusal's code, or [`DEADLINE_EXCEEDED`].
        code: String,
        /// The refusal's message, or how long it was waited for.
        message: String,
    },
}

impl DeviceState {
    /// Whether the device no longer holds up its wave.
    pub fn settled(&self) -> bool {
        !matches!(self, Self::Pending)
    }
}

/// Where `device` is at `now` (Unix seconds).
pub fn state(device: &DeviceView<'_>, strategy: &Strategy, now: i64) -> DeviceState {
    let Some(mark) = &device.mark else {
        return DeviceState::Untouched;
    };
    if device.observed >= mark.generation && device.in_sync {
        return DeviceState::Updated;
    }
    if let Some((generation, code, message)) = device.rejection
        && generation == mark.generation
    {
        return DeviceState::Failed {
            code: code.to_owned(),
            message: message.to_owned(),
        };
    }
    if strategy.offline_wait && !device.online {
        return DeviceState::Waiting;
    }
    // With `Wait`, a device back from being offline gets a whole deadline from its return.
    let since = match (strategy.offline_wait, device.online_since) {
        (true, Some(back)) => mark.time.max(back),
        _ => mark.time,
    };
    if now - since > strategy.deadline {
        return DeviceState::Failed {
            code: DEADLINE_EXCEEDED.to_owned(),
            message: format!("not In-Sync {} s after the patch", strategy.deadline),
        };
    }
    DeviceState::Pending
}

/// The counts a rollout's status shows, and those its next step depends on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Devices patched.
    pub touched: u64,
    /// Of those, In-Sync.
    pub updated: u64,
    /// Of those, failed.
    pub failed: u64,
    /// Failures of the current step's wave.
    pub wave_failed: u64,
    /// Patched devices not settled.
    pub pending: u64,
    /// The first failures, in the rollout's order.
    pub failures: Vec<RolloutFailure>,
}

/// Counts `devices` (in the rollout's order) at `now`, with `step` the current step.
pub fn progress(devices: &[DeviceView<'_>], strategy: &Strategy, step: u32, now: i64) -> Progress {
    let mut p = Progress::default();
    for device in devices {
        let Some(mark) = &device.mark else { continue };
        p.touched += 1;
        match state(device, strategy, now) {
            DeviceState::Updated => p.updated += 1,
            DeviceState::Pending => p.pending += 1,
            DeviceState::Waiting | DeviceState::Untouched => {}
            DeviceState::Failed { code, message } => {
                p.failed += 1;
                if mark.step == step {
                    p.wave_failed += 1;
                }
                if p.failures.len() < MAX_LISTED_FAILURES {
                    p.failures.push(RolloutFailure {
                        device: device.name.to_owned(),
                        step: mark.step,
                        code,
                        message,
                    });
                }
            }
        }
    }
    p
}

/// What the rollout does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Patch this many more devices, the next untouched ones in the rollout's order.
    Touch(u64),
    /// Wait: the wave's devices are not all settled.
    Wait,
    /// The wave's failures went past `maxFailures`: patch nothing more.
    Halt,
    /// The wave is done and its step asks for a resume: pause.
    Pause,
    /// The wave is done: record when, for `pauseSeconds`.
    WaveDone,
    /// The step's `pauseSeconds` run until then (Unix seconds).
    HoldUntil(i64),
    /// Go on to the next step.
    Advance,
    /// Every step is done.
    Complete,
}

/// Where the rollout is in its steps, from its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The current step (1-based).
    pub step: u32,
    /// Devices selected when it started.
    pub selected: u64,
    /// When the current wave was done (Unix seconds).
    pub wave_done: Option<i64>,
    /// The step whose pause was taken.
    pub paused_step: Option<u32>,
}

/// The next thing to do, given the counts and `untouched` devices left to patch.
pub fn next(
    strategy: &Strategy,
    at: Position,
    progress: &Progress,
    untouched: u64,
    now: i64,
) -> Next {
    let wave = strategy.wave(at.step, at.selected);
    if breached(progress.wave_failed, wave, strategy.max_failures) {
        return Next::Halt;
    }
    let target = strategy.target(at.step, at.selected);
    if progress.touched < target && untouched > 0 {
        return Next::Touch((target - progress.touched).min(untouched));
    }
    if progress.pending > 0 {
        return Next::Wait;
    }
    if at.step >= strategy.last() {
        return Next::Complete;
    }
    let step = strategy.steps[at.step as usize - 1];
    if step.pause && at.paused_step != Some(at.step) {
        return Next::Pause;
    }
    if step.pause_seconds > 0 {
        let Some(done) = at.wave_done else {
            return Next::WaveDone;
        };
        let until = done + i64::from(step.pause_seconds);
        if now < until {
            return Next::HoldUntil(until);
        }
    }
    Next::Advance
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(strategy: serde_json::Value) -> DeviceRolloutSpec {
        serde_json::from_value(json!({
            "selector": {}, "desired": {"speed": 1500},
            "progressDeadlineSeconds": 60, "strategy": strategy
        }))
        .unwrap()
    }

    fn mark(step: u32, generation: i64, time: i64) -> Option<Mark> {
        Some(Mark {
            uid: "u".into(),
            step,
            generation,
            time,
            revert: serde_json::Map::new(),
            reverted: false,
        })
    }

    fn view(name: &str, mark: Option<Mark>) -> DeviceView<'_> {
        DeviceView {
            name,
            mark,
            observed: 1,
            in_sync: true,
            rejection: None,
            online: true,
            online_since: Some(0),
        }
    }

    #[test]
    fn steps_are_cumulative_and_end_with_every_device() {
        let s = Strategy::read(&spec(json!({"steps": [
            {"devices": 1}, {"devices": "10%", "pauseSeconds": 30}, {"devices": "50%", "pause": true}
        ]})))
        .unwrap();
        assert_eq!(s.last(), 4, "a final 100% step is added");
        assert_eq!(
            (1..=4).map(|k| s.target(k, 200)).collect::<Vec<_>>(),
            [1, 20, 100, 200]
        );
        assert_eq!(
            (1..=4).map(|k| s.wave(k, 200)).collect::<Vec<_>>(),
            [1, 19, 80, 100]
        );
        let one = Strategy::read(&spec(json!({}))).unwrap();
        assert_eq!((one.last(), one.target(1, 7)), (1, 7));
        // A step smaller than one before it adds nobody.
        let odd =
            Strategy::read(&spec(json!({"steps": [{"devices": 50}, {"devices": 10}]}))).unwrap();
        assert_eq!((odd.target(2, 100), odd.wave(2, 100)), (50, 0));
        let bad = Strategy::read(&spec(json!({"steps": [{"devices": "ten"}]}))).unwrap_err();
        assert!(bad.contains("strategy.steps[0].devices"), "{bad}");
        let bad = Strategy::read(&spec(json!({"maxFailures": "200%"}))).unwrap_err();
        assert!(bad.contains("maxFailures"), "{bad}");
    }

    #[test]
    fn a_device_is_updated_failed_waiting_or_pending() {
        let fail = Strategy::read(&spec(json!({}))).unwrap();
        let wait = Strategy::read(&spec(json!({"offline": "Wait"}))).unwrap();
        let mut d = view("a", None);
        assert_eq!(state(&d, &fail, 0), DeviceState::Untouched);
        d.mark = mark(1, 2, 100);
        d.observed = 1;
        assert_eq!(state(&d, &fail, 120), DeviceState::Pending);
        d.observed = 2;
        assert_eq!(state(&d, &fail, 120), DeviceState::Updated);
        d.in_sync = false;
        assert_eq!(state(&d, &fail, 120), DeviceState::Pending);
        // A refusal of an older generation is not a refusal of this change.
        d.rejection = Some((1, "out_of_range", "too fast"));
        assert_eq!(state(&d, &fail, 120), DeviceState::Pending);
        d.rejection = Some((2, "out_of_range", "too fast"));
        assert_eq!(
            state(&d, &fail, 120),
            DeviceState::Failed {
                code: "out_of_range".into(),
                message: "too fast".into()
            }
        );
        d.rejection = None;
        assert!(
            matches!(state(&d, &fail, 161), DeviceState::Failed { code, .. } if code == DEADLINE_EXCEEDED)
        );
        // Offline with Wait: done for the wave; back online, a whole deadline from its return.
        d.online = false;
        assert!(matches!(state(&d, &fail, 161), DeviceState::Failed { .. }));
        assert_eq!(state(&d, &wait, 1_000), DeviceState::Waiting);
        d.online = true;
        d.online_since = Some(990);
        assert_eq!(state(&d, &wait, 1_000), DeviceState::Pending);
        assert!(matches!(
            state(&d, &wait, 1_051),
            DeviceState::Failed { .. }
        ));
    }

    #[test]
    fn waves_go_in_order_and_halt_on_a_breach() {
        let s = Strategy::read(&spec(json!({"steps": [
            {"devices": 1}, {"devices": "10%", "pauseSeconds": 30}, {"devices": "50%", "pause": true}
        ], "maxFailures": "5%"})))
        .unwrap();
        let at = |step| Position {
            step,
            selected: 200,
            wave_done: None,
            paused_step: None,
        };
        let p = |touched, pending, wave_failed| Progress {
            touched,
            pending,
            wave_failed,
            ..Progress::default()
        };
        assert_eq!(next(&s, at(1), &p(0, 0, 0), 200, 0), Next::Touch(1));
        assert_eq!(next(&s, at(1), &p(1, 1, 0), 199, 0), Next::Wait);
        // The canary is one device: 5% of it is none, so its failure halts.
        assert_eq!(next(&s, at(1), &p(1, 0, 1), 199, 0), Next::Halt);
        assert_eq!(next(&s, at(1), &p(1, 0, 0), 199, 0), Next::Advance);
        assert_eq!(next(&s, at(2), &p(1, 0, 0), 199, 0), Next::Touch(19));
        // Fewer devices left than the step asks (some were deleted): the wave is what is left.
        assert_eq!(next(&s, at(2), &p(1, 0, 0), 5, 0), Next::Touch(5));
        assert_eq!(next(&s, at(2), &p(20, 0, 0), 180, 0), Next::WaveDone);
        let mut done = at(2);
        done.wave_done = Some(100);
        assert_eq!(next(&s, done, &p(20, 0, 0), 180, 110), Next::HoldUntil(130));
        assert_eq!(next(&s, done, &p(20, 0, 0), 180, 130), Next::Advance);
        assert_eq!(
            next(&s, at(3), &p(100, 0, 4), 100, 0),
            Next::Pause,
            "4 of 80 is within 5%"
        );
        assert_eq!(next(&s, at(3), &p(100, 0, 5), 100, 0), Next::Halt);
        let mut resumed = at(3);
        resumed.paused_step = Some(3);
        assert_eq!(next(&s, resumed, &p(100, 0, 0), 100, 0), Next::Advance);
        assert_eq!(next(&s, at(4), &p(100, 0, 0), 100, 0), Next::Touch(100));
        assert_eq!(next(&s, at(4), &p(200, 3, 0), 0, 0), Next::Wait);
        assert_eq!(next(&s, at(4), &p(200, 0, 0), 0, 0), Next::Complete);
    }

    #[test]
    fn progress_counts_each_state_and_lists_failures() {
        let s = Strategy::read(&spec(json!({}))).unwrap();
        let mut refused = view("b", mark(2, 2, 0));
        refused.observed = 1;
        refused.rejection = Some((2, "out_of_range", "too fast"));
        let mut old = view("c", mark(1, 2, 0));
        old.observed = 1;
        old.rejection = Some((2, "busy", ""));
        let mut pending = view("d", mark(2, 2, 0));
        pending.observed = 1;
        let devices = [
            view("a", mark(2, 1, 0)),
            refused,
            old,
            pending,
            view("e", None),
        ];
        let p = progress(&devices, &s, 2, 10);
        assert_eq!(
            (p.touched, p.updated, p.failed, p.wave_failed, p.pending),
            (4, 1, 2, 1, 1)
        );
        assert_eq!(
            p.failures
                .iter()
                .map(|f| (f.device.as_str(), f.step))
                .collect::<Vec<_>>(),
            [("b", 2), ("c", 1)]
        );
    }
}
