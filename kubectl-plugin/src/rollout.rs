//! `kubectl edgesync rollout status|pause|resume|abort NAME`: a DeviceRollout's progress
//! step by step, and the three patches of its spec an operator steers it with.

use std::time::Duration;

use edgesync_crds::{DeviceRollout, DeviceRolloutStatus, RolloutPhase};
use futures_util::TryStreamExt as _;
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use serde_json::json;

use crate::cli::{Output, RolloutAction};

/// Runs one `rollout` action.
///
/// # Errors
/// The rollout is missing, a patch is refused, or (`status -w`) it ends Halted or Aborted.
pub async fn run(
    client: Client,
    namespace: &str,
    action: RolloutAction,
    output: Option<Output>,
) -> anyhow::Result<()> {
    let api: Api<DeviceRollout> = Api::namespaced(client, namespace);
    match action {
        RolloutAction::Status {
            name,
            watch,
            timeout,
        } => status(&api, &name, watch, timeout, output).await,
        RolloutAction::Pause { name } => {
            steer(&api, &name, json!({"spec": {"paused": true}})).await?;
            println!(
                "devicerollout/{name} paused: no further device is patched until `kubectl edgesync rollout resume {name}`"
            );
            Ok(())
        }
        RolloutAction::Resume { name } => {
            steer(&api, &name, json!({"spec": {"paused": false}})).await?;
            println!("devicerollout/{name} resumed");
            Ok(())
        }
        RolloutAction::Abort { name } => {
            let rollout = steer(&api, &name, json!({"spec": {"abort": true}})).await?;
            let after = if rollout.spec.strategy.revert_on_failure {
                "the patched devices get their previous values back"
            } else {
                "the patched devices keep the rollout's values (revertOnFailure is false)"
            };
            println!("devicerollout/{name} aborted: no further device is patched; {after}");
            Ok(())
        }
    }
}

async fn steer(
    api: &Api<DeviceRollout>,
    name: &str,
    patch: serde_json::Value,
) -> anyhow::Result<DeviceRollout> {
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| match e {
            kube::Error::Api(s) if s.code == 404 => anyhow::anyhow!(
                "devicerollout {name:?} not found in namespace {:?} (kubectl get dro)",
                api.namespace().unwrap_or_default()
            ),
            e => e.into(),
        })
}

async fn status(
    api: &Api<DeviceRollout>,
    name: &str,
    watch: bool,
    timeout: Duration,
    output: Option<Output>,
) -> anyhow::Result<()> {
    let get = || async {
        api.get(name).await.map_err(|e| match e {
            kube::Error::Api(s) if s.code == 404 => anyhow::anyhow!(
                "devicerollout {name:?} not found in namespace {:?} (kubectl get dro)",
                api.namespace().unwrap_or_default()
            ),
            e => e.into(),
        })
    };
    let rollout = get().await?;
    if !watch {
        return show(&rollout, output);
    }
    let mut last = describe(&rollout);
    println!("{last}");
    if let Some(end) = ended(&rollout) {
        return end;
    }
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = std::pin::pin!(watcher(api.clone(), config).applied_objects());
    let followed = tokio::time::timeout(timeout, async {
        while let Some(rollout) = stream.try_next().await? {
            let now = describe(&rollout);
            if now != last {
                println!("{now}");
                last = now;
            }
            if let Some(end) = ended(&rollout) {
                return end;
            }
        }
        anyhow::bail!("the watch of devicerollout {name:?} ended")
    })
    .await;
    followed.unwrap_or_else(|_| {
        anyhow::bail!(
            "devicerollout {name:?} did not end within {} s (--timeout)",
            timeout.as_secs()
        )
    })
}

/// `Some(Ok)` once Complete, `Some(Err)` once Halted or Aborted, `None` while it goes on.
fn ended(rollout: &DeviceRollout) -> Option<anyhow::Result<()>> {
    let status = rollout.status.clone().unwrap_or_default();
    match status.phase? {
        RolloutPhase::Complete => Some(Ok(())),
        RolloutPhase::Halted | RolloutPhase::Aborted => Some(Err(anyhow::anyhow!(
            "devicerollout {} is {}: {}",
            rollout.metadata.name.as_deref().unwrap_or_default(),
            phase_text(&status),
            condition_message(&status)
        ))),
        _ => None,
    }
}

fn phase_text(status: &DeviceRolloutStatus) -> String {
    status
        .phase
        .map_or_else(|| "New".to_owned(), |p| format!("{p:?}"))
}

fn condition_message(status: &DeviceRolloutStatus) -> String {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == edgesync_crds::CONDITION_PROGRESSING)
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

/// One line: phase, step, counts.
fn describe(rollout: &DeviceRollout) -> String {
    let status = rollout.status.clone().unwrap_or_default();
    // The controller adds a last step of every device when the spec's last covers fewer.
    let written = &rollout.spec.strategy.steps;
    let steps = written.len()
        + usize::from(
            written
                .last()
                .is_none_or(|s| s.devices.text().trim() != "100%"),
        );
    let mut line = format!(
        "{}  step {}/{}  selected {}  patched {}  in-sync {}  failed {}",
        phase_text(&status),
        status.current_step.unwrap_or(0),
        steps,
        status.selected.unwrap_or(0),
        status.touched,
        status.updated,
        status.failed
    );
    if let Some(r) = status.reverted {
        line.push_str(&format!("  reverted {r}"));
    }
    line
}

fn show(rollout: &DeviceRollout, output: Option<Output>) -> anyhow::Result<()> {
    if matches!(output, Some(Output::Json | Output::Yaml)) {
        crate::table::print(output, &[], &[], serde_json::to_value(rollout)?);
        return Ok(());
    }
    let status = rollout.status.clone().unwrap_or_default();
    println!("{}", describe(rollout));
    let message = condition_message(&status);
    if !message.is_empty() {
        println!("{message}");
    }
    if !status.failures.is_empty() {
        let rows: Vec<Vec<String>> = status
            .failures
            .iter()
            .map(|f| {
                vec![
                    f.device.clone(),
                    f.step.to_string(),
                    f.code.clone(),
                    f.message.clone(),
                ]
            })
            .collect();
        println!();
        crate::table::print(
            None,
            &["DEVICE", "STEP", "CODE", "MESSAGE"],
            &rows,
            json!(null),
        );
    }
    Ok(())
}
