//! `edgesync-sim` (the shop-floor simulator) as a process against a test's broker, and
//! waiting until its machines are Devices In-Sync.

use std::time::Duration;

use edgesync_crds::{Device, condition_status};
use kube::api::ListParams;
use kube::{Api, ResourceExt};

use crate::process::{ManagedProcess, ProcessSpec};
use crate::{release_binary, wait};

/// `edgesync-sim` with `machines` machines (`machine-0` ...) on the broker at `port`, each
/// publishing its state every `interval_ms`, with extra arguments (`--max-speed` ...). The
/// temporary directory holds its log; keep it as long as the process.
pub fn spawn(
    port: u16,
    machines: usize,
    interval_ms: u64,
    extra: &[&str],
) -> (ManagedProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("simulator temp dir");
    let mut spec = ProcessSpec::new(
        "edgesync-sim",
        release_binary("edgesync-examples", "edgesync-sim", "examples"),
    )
    .arg("--port")
    .arg(port.to_string())
    .arg("--devices")
    .arg(machines.to_string())
    .arg("--interval-ms")
    .arg(interval_ms.to_string());
    for a in extra {
        spec = spec.arg(*a);
    }
    (ManagedProcess::spawn(spec, dir.path()), dir)
}

/// Whether a Device's `InSync` condition is True.
pub fn in_sync(d: &Device) -> bool {
    d.status
        .as_ref()
        .is_some_and(|s| condition_status(&s.conditions, "InSync") == Some("True"))
}

/// Waits until `machines` simulated machines are registered as Devices and In-Sync.
pub async fn wait_in_sync(devices: &Api<Device>, machines: usize, deadline: Duration) {
    wait::until(
        &format!("{machines} simulated machines registered and In-Sync"),
        deadline,
        || {
            let devices = devices.clone();
            async move {
                let list = devices.list(&ListParams::default()).await.ok()?;
                let ready = list
                    .items
                    .iter()
                    .filter(|d| d.name_any().starts_with("machine-") && in_sync(d))
                    .count();
                (ready >= machines).then_some(())
            }
        },
    )
    .await;
}
