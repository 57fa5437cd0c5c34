//! `kubectl edgesync` against a real API server with a running controller, run the way
//! operators run it: `kubectl edgesync ...`, found by kubectl on the PATH.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::controller::{Controller, batch, create_node, post_batch, report};
use edgesync_e2e::{release_binary, wait};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The environment kubectl needs to find the plugin and the test cluster.
fn env(cp: &ControlPlane) -> Vec<(String, String)> {
    let plugin: PathBuf = release_binary("kubectl-edgesync", "kubectl-edgesync", "plugin");
    let path = format!(
        "{}:{}",
        plugin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    vec![
        ("PATH".into(), path),
        ("KUBECONFIG".into(), cp.kubeconfig().display().to_string()),
    ]
}

fn command(cp: &ControlPlane, args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(cp.kubectl_path());
    c.arg("edgesync")
        .args(args)
        .envs(env(cp))
        .kill_on_drop(true);
    c
}

async fn run(cp: &ControlPlane, args: &[&str]) -> Output {
    command(cp, args).output().await.unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn ok(cp: &ControlPlane, args: &[&str]) -> String {
    let out = run(cp, args).await;
    assert!(
        out.status.success(),
        "kubectl edgesync {args:?}: {}",
        text(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A report from an agent that has applied the registered Device's first generation.
fn observed(mut r: edgesync_protocol::wire::Report) -> edgesync_protocol::wire::Report {
    r.observed_desired_version = 1;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_get_set_and_tail_against_a_running_controller() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("plugin");
    let n = ns.name.as_str();
    create_node(cp, n, "edge-1", "t1", "  autoRegisterDevices: true");
    // Built first: the first build takes minutes, longer than a node stays Ready unheard.
    let _ = env(cp);
    let c = Controller::start(
        cp,
        &[
            "--lease-name",
            "plugin-test",
            "--lease-namespace",
            n,
            "--offline-after-seconds",
            "600",
        ],
    );
    let url = c.url();
    let a = post_batch(
        &url,
        n,
        "edge-1",
        "t1",
        &batch(
            1,
            vec![
                observed(report(
                    "press-1",
                    1,
                    json!({"speed": 3, "motor": {"mode": "auto"}}),
                )),
                observed(report("press-2", 1, json!({"speed": 1}))),
            ],
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    let _ = wait::until("both devices Online", Duration::from_secs(30), || async {
        let out = cp.kubectl_ok(&["-n", n, "get", "devices", "--no-headers"]);
        (out.lines()
            .filter(|l| l.split_whitespace().nth(2) == Some("True"))
            .count()
            == 2)
            .then_some(())
    })
    .await;

    // status: the table, and -A -o json.
    let table = ok(cp, &["status", "-n", n]).await;
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("edge-1"))
        .unwrap_or_else(|| panic!("{table}"))
        .split_whitespace()
        .collect();
    assert_eq!(&row[..5], ["edge-1", "True", "2", "2", "2"], "{table}");
    assert!(table.starts_with("NODE "), "{table}");
    let all: Value = serde_json::from_str(&ok(cp, &["status", "-A", "-o", "json"]).await).unwrap();
    let mine = all
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["namespace"] == n)
        .unwrap_or_else(|| panic!("{all}"));
    assert_eq!(
        (mine["node"].as_str(), mine["devices"].as_u64()),
        (Some("edge-1"), Some(2))
    );

    // get: side by side, and -o yaml.
    let got = ok(cp, &["get", "press-1", "-n", n]).await;
    assert!(
        got.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["motor.mode", "-", "auto", "-"]),
        "{got}"
    );
    let yaml = ok(cp, &["get", "press-1", "-n", n, "-o", "yaml"]).await;
    assert!(
        yaml.contains("reported:") && yaml.contains("speed: 3"),
        "{yaml}"
    );

    // set follows the device until In-Sync; tail prints each change.
    // No --count: besides the new report, the controller may first publish In-Sync turning
    // False for the new generation (or not, when the report is quicker), so the test reads
    // lines until the one it waits for.
    let mut tail = command(cp, &["tail", "press-1", "-n", n])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(tail.stdout.take().unwrap()).lines();
    // Its first line (the state at start) before anything changes, so a slow start of tail
    // cannot make it begin at the new state.
    let first = tokio::time::timeout(Duration::from_secs(30), out.next_line())
        .await
        .expect("tail prints the state at start within 30 s")
        .unwrap()
        .unwrap_or_default();
    assert!(
        first.contains("version=1") && first.contains("\"speed\":3"),
        "the first line is the state at start: {first}"
    );
    let set = command(
        cp,
        &["set", "press-1", "speed=5", "-n", n, "--timeout", "60s"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let devices: kube::Api<edgesync_crds::Device> = kube::Api::namespaced(cp.client().await, n);
    let generation = wait::until(
        "the desired patch lands",
        Duration::from_secs(30),
        || async {
            let d = devices.get("press-1").await.ok()?;
            (d.spec.desired.as_ref()?.get("speed") == Some(&json!(5)))
                .then_some(d.metadata.generation?)
        },
    )
    .await;
    let mut applied = report("press-1", 2, json!({"speed": 5, "motor": {"mode": "auto"}}));
    applied.observed_desired_version = generation;
    let a = post_batch(&url, n, "edge-1", "t1", &batch(2, vec![applied])).await;
    assert_eq!(a.status, 200, "{a:?}");
    let set = tokio::time::timeout(Duration::from_secs(60), set.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(set.status.success(), "{}", text(&set));
    assert!(
        String::from_utf8_lossy(&set.stdout).contains("in sync with generation"),
        "{}",
        text(&set)
    );
    let mut lines = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = out.next_line().await.unwrap() {
            lines.push(line);
            let l = lines.last().unwrap();
            if l.contains("version=2") && l.contains("\"speed\":5") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "tail printed after {first:?}: {lines:#?}");
    tail.kill().await.unwrap();
    // --count ends the follow.
    let once = ok(cp, &["tail", "press-2", "-n", n, "--count", "1"]).await;
    assert_eq!(once.lines().count(), 1, "{once}");
    assert!(once.contains("version=1"), "{once}");

    // Errors: exit code 1 and a message that says what is wrong.
    let missing = run(cp, &["get", "nope", "-n", n]).await;
    assert_eq!(missing.status.code(), Some(1), "{}", text(&missing));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("\"nope\" not found"),
        "{}",
        text(&missing)
    );
    let stuck = run(
        cp,
        &["set", "press-2", "speed=9", "-n", n, "--timeout", "2s"],
    )
    .await;
    assert_eq!(stuck.status.code(), Some(1), "{}", text(&stuck));
    assert!(
        String::from_utf8_lossy(&stuck.stderr).contains("not in sync"),
        "{}",
        text(&stuck)
    );
    let context = run(cp, &["status", "--context", "no-such-context"]).await;
    assert_eq!(context.status.code(), Some(1), "{}", text(&context));
    assert!(
        String::from_utf8_lossy(&context.stderr).contains("no-such-context"),
        "{}",
        text(&context)
    );
    let usage = run(cp, &["set", "press-2"]).await;
    assert_eq!(usage.status.code(), Some(2), "{}", text(&usage));
}
