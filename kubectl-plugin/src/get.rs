//! `kubectl edgesync get DEVICE`: desired, reported and delta side by side.

use std::collections::BTreeMap;

use edgesync_crds::Device;
use kube::{Api, Client};

use crate::cli::Output;
use crate::device::{conditions, flatten, state, view};
use crate::table::{cell, print};

/// Prints the device.
///
/// # Errors
/// When it does not exist or the API server refuses.
pub async fn run(
    client: Client,
    namespace: &str,
    name: &str,
    output: Option<Output>,
) -> anyhow::Result<()> {
    let d = Api::<Device>::namespaced(client, namespace)
        .get_opt(name)
        .await?
        .ok_or_else(|| anyhow::anyhow!("device {name:?} not found in namespace {namespace:?}"))?;
    if matches!(output, Some(Output::Json | Output::Yaml)) {
        print(output, &[], &[], view(&d));
        return Ok(());
    }
    let (desired, reported, delta) = state(&d);
    let (online, in_sync) = conditions(&d);
    let s = d.status.clone().unwrap_or_default();
    println!(
        "Device {namespace}/{name}   node {}   Online {online}   In-Sync {in_sync}   version {}   last report {}",
        d.spec.node_name,
        cell(s.reported_version),
        cell(s.last_report_time.map(|t| t.0.to_string())),
    );
    let mut rows: BTreeMap<String, [String; 3]> = BTreeMap::new();
    for (k, v) in flatten(&desired) {
        rows.entry(k).or_default()[0] = v;
    }
    for (k, v) in flatten(&reported) {
        rows.entry(k).or_default()[1] = v;
    }
    for (k, _) in flatten(&delta) {
        rows.entry(k).or_default()[2] = "differs".into();
    }
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|(k, [desired, reported, delta])| {
            let blank = |s: String| if s.is_empty() { "-".to_owned() } else { s };
            vec![k, blank(desired), blank(reported), blank(delta)]
        })
        .collect();
    if rows.is_empty() {
        println!("(no desired or reported state yet)");
        return Ok(());
    }
    print(
        output,
        &["KEY", "DESIRED", "REPORTED", "DELTA"],
        &rows,
        serde_json::Value::Null,
    );
    Ok(())
}
