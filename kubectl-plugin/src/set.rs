//! `kubectl edgesync set DEVICE KEY=VALUE...`: merge-patches `spec.desired`, then follows the
//! Device until its agent has applied that generation and the device reports every value, or
//! the device refuses it.

use std::time::{Duration, Instant};

use edgesync_crds::{CONDITION_IN_SYNC, Device};
use futures_util::TryStreamExt as _;
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use serde_json::{Map, Value, json};

/// `KEY=VALUE` pairs as a merge patch: dotted keys nest, values are JSON when they parse.
///
/// # Errors
/// A pair without `=`, or an empty key segment.
pub fn patch(pairs: &[String]) -> anyhow::Result<Map<String, Value>> {
    let mut out = Map::new();
    for pair in pairs {
        let (key, raw) = pair
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("{pair:?} is not KEY=VALUE"))?;
        let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()));
        let segments: Vec<&str> = key.split('.').collect();
        if segments.iter().any(|s| s.is_empty()) {
            anyhow::bail!("{key:?} has an empty segment (use KEY or a.b.c)");
        }
        let (last, parents) = segments
            .split_last()
            .expect("split gives one segment at least");
        let mut at = &mut out;
        for p in parents {
            let slot = at.entry((*p).to_owned()).or_insert_with(|| json!({}));
            if !slot.is_object() {
                *slot = json!({});
            }
            at = slot.as_object_mut().expect("made an object above");
        }
        at.insert((*last).to_owned(), value);
    }
    Ok(out)
}

/// Where the Device stands with `generation`.
#[derive(Debug, PartialEq, Eq)]
enum Progress {
    /// Its InSync condition is True for it.
    InSync(String),
    /// Not yet, and why.
    Waiting(String),
    /// The device refused it (`status.desiredRejection`).
    Refused(String),
}

fn progress(d: &Device, generation: i64) -> Progress {
    if let Some(r) = d
        .status
        .as_ref()
        .and_then(|s| s.desired_rejection.as_ref())
        .filter(|r| r.generation == generation)
    {
        let message = if r.message.is_empty() {
            String::new()
        } else {
            format!(": {}", r.message)
        };
        return Progress::Refused(format!("{}{message}", r.code));
    }
    let c = d
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == CONDITION_IN_SYNC));
    let observed = d
        .status
        .as_ref()
        .and_then(|s| s.observed_desired_generation)
        .unwrap_or(0);
    match c {
        Some(c) if c.status == "True" && observed >= generation => {
            Progress::InSync(c.message.clone())
        }
        Some(c) => Progress::Waiting(format!("{} ({})", c.message, c.reason)),
        None => Progress::Waiting("no InSync condition yet".into()),
    }
}

/// Patches and follows.
///
/// # Errors
/// When the Device does not exist, the patch is refused, or `timeout` passes first.
pub async fn run(
    client: Client,
    namespace: &str,
    name: &str,
    pairs: &[String],
    timeout: Duration,
    no_wait: bool,
) -> anyhow::Result<()> {
    let desired = patch(pairs)?;
    let api: Api<Device> = Api::namespaced(client, namespace);
    if api.get_opt(name).await?.is_none() {
        anyhow::bail!("device {name:?} not found in namespace {namespace:?}");
    }
    let patched = api
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"desired": desired}})),
        )
        .await?;
    let generation = patched.metadata.generation.unwrap_or(0);
    println!("device/{name} patched (generation {generation})");
    if no_wait {
        return Ok(());
    }
    let started = Instant::now();
    let mut last = String::new();
    let stream = watcher(
        api,
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .applied_objects();
    let mut stream = std::pin::pin!(stream);
    let followed = tokio::time::timeout(timeout, async {
        while let Some(d) = stream.try_next().await? {
            let why = match progress(&d, generation) {
                Progress::InSync(_) => return Ok::<_, anyhow::Error>(()),
                Progress::Refused(why) => anyhow::bail!(
                    "device/{name} refused generation {generation}: {why} (its desired state stays \
                     as patched; set other values, or put the previous ones back)"
                ),
                Progress::Waiting(why) => why,
            };
            if why != last {
                eprintln!(
                    "  {:>5.1}s  waiting: {why}",
                    started.elapsed().as_secs_f64()
                );
                last = why;
            }
        }
        anyhow::bail!("the watch of device/{name} ended")
    })
    .await;
    match followed {
        Ok(Ok(())) => {
            println!(
                "device/{name} in sync with generation {generation} after {:.1}s",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => anyhow::bail!(
            "device/{name} not in sync with generation {generation} after {}s: {last}",
            timeout.as_secs()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_become_a_merge_patch() {
        let p = patch(&[
            "speed=1500".into(),
            "mode=auto".into(),
            "motor.enabled=true".into(),
            "motor.limits={\"max\":3}".into(),
            "old=null".into(),
        ])
        .unwrap();
        assert_eq!(
            Value::Object(p),
            json!({"speed": 1500, "mode": "auto", "motor": {"enabled": true, "limits": {"max": 3}}, "old": null})
        );
        assert!(patch(&["nope".into()]).is_err());
        assert!(patch(&["a..b=1".into()]).is_err());
    }

    #[test]
    fn a_refusal_of_the_patched_generation_ends_the_wait() {
        let mut d: Device = serde_json::from_value(json!({
            "apiVersion": "edgesync.io/v1alpha1", "kind": "Device",
            "metadata": {"name": "d", "generation": 4},
            "spec": {"nodeName": "n"},
            "status": {
                "observedDesiredGeneration": 4,
                "desiredRejection": {"generation": 4, "code": "out_of_range", "message": "too fast"},
                "conditions": [{"type": "InSync", "status": "False", "reason": "ReportedDiffers",
                    "message": "Reported state differs from desired at: speed",
                    "lastTransitionTime": "2026-12-01T00:00:00Z"}]
            }
        }))
        .unwrap();
        assert_eq!(
            progress(&d, 4),
            Progress::Refused("out_of_range: too fast".into())
        );
        // A refusal of an older generation is not an answer to this one.
        assert!(matches!(progress(&d, 5), Progress::Waiting(_)));
        d.status.as_mut().unwrap().desired_rejection = None;
        assert!(matches!(progress(&d, 4), Progress::Waiting(_)));
    }
}
