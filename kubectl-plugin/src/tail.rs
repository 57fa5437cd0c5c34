//! `kubectl edgesync tail DEVICE`: one line per status change, as it happens.

use edgesync_crds::Device;
use futures_util::TryStreamExt as _;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};

use crate::device::{conditions, state};
use crate::table::cell;

/// Follows the device until `count` changes were printed (forever when `None`).
///
/// # Errors
/// When the device does not exist or the watch fails.
pub async fn run(
    client: Client,
    namespace: &str,
    name: &str,
    count: Option<usize>,
) -> anyhow::Result<()> {
    let api: Api<Device> = Api::namespaced(client, namespace);
    if api.get_opt(name).await?.is_none() {
        anyhow::bail!("device {name:?} not found in namespace {namespace:?}");
    }
    let stream = watcher(
        api,
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .applied_objects();
    let mut stream = std::pin::pin!(stream);
    let mut last = None;
    let mut printed = 0;
    while let Some(d) = stream.try_next().await? {
        let (_, reported, _) = state(&d);
        let (online, in_sync) = conditions(&d);
        let s = d.status.clone().unwrap_or_default();
        let line = format!(
            "version={}  online={online}  in-sync={in_sync}  reported={}",
            cell(s.reported_version),
            serde_json::Value::Object(reported)
        );
        if last.as_ref() == Some(&line) {
            continue;
        }
        println!(
            "{}  {line}",
            cell(s.last_report_time.map(|t| t.0.to_string()))
        );
        last = Some(line);
        printed += 1;
        if count.is_some_and(|c| printed >= c) {
            break;
        }
    }
    Ok(())
}
