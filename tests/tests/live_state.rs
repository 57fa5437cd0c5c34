//! The live API (`devicestates.live.edgesync.io`) through a real kube-apiserver's aggregation
//! layer: reports become DeviceStates that kubectl gets, prints, selects and watches; only the
//! front proxy is served and users see what RBAC lets them; watches resume from a version and
//! get 410 once it has left the window.
//!
//! One controller with `--live-listen`, running with the RBAC deploy/ grants, serves every
//! test of this binary: an APIService is
//! cluster-wide, so the tests share it and keep to namespaces of their own.

// Integration tests: a failed unwrap is a failed test with its location.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

use edgesync_e2e::agent::{AgentConfig, spawn_agent};
use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::controller::{
    Controller, batch, create_devices, create_node, live_batch, post_batch, report,
};
use edgesync_e2e::live::devicestates;
use edgesync_e2e::mosquitto::Mosquitto;
use edgesync_e2e::stack::publish_acked;
use edgesync_e2e::{free_port, live, pki, wait};
use futures_util::StreamExt as _;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use serde_json::{Value, json};

/// Changes the shared controller keeps for watches to resume from.
const WINDOW: usize = 50;
/// The shared controller's shortest time between two status writes of one Device: long
/// enough that a second report's DeviceState is seen well before its status.
const STATUS_INTERVAL_SECS: u64 = 4;

struct Live {
    controller: Controller,
    port: u16,
}

/// The controller serving the live API, registered with the shared control plane.
fn live_api() -> &'static Live {
    static LIVE: OnceLock<Live> = OnceLock::new();
    LIVE.get_or_init(|| {
        let cp = ControlPlane::shared();
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let window = WINDOW.to_string();
        // With the identity deploy/ gives it: its RBAC must let it read the front proxy's
        // settings and ask SubjectAccessReviews.
        let controller = Controller::start_deployed_for_binary(
            cp,
            &[
                "--live-listen",
                &listen,
                "--live-window-changes",
                &window,
                "--lease-namespace",
                "edgesync-system",
                "--status-min-interval-seconds",
                &STATUS_INTERVAL_SECS.to_string(),
            ],
        );
        live::register(cp, port);
        Live { controller, port }
    })
}

fn names(list: &Value) -> Vec<String> {
    let mut names: Vec<String> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

fn raw(cp: &ControlPlane, ns: &str, query: &str) -> Value {
    let path = format!("/apis/live.edgesync.io/v1alpha1/namespaces/{ns}/devicestates?{query}");
    serde_json::from_str(&cp.kubectl_ok(&["get", "--raw", &path])).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_become_devicestates_that_kubectl_gets_selects_and_watches() {
    let cp = ControlPlane::shared();
    let live = live_api();
    let ns = cp.namespace("live-get");
    let n = ns.name.as_str();
    create_node(cp, n, "edge-1", "token-1", "");
    create_devices(
        cp,
        n,
        "edge-1",
        &["hot".into(), "warm".into(), "cold".into()],
    );
    cp.kubectl_ok(&["-n", n, "label", "device", "hot", "line=a"]);
    cp.kubectl_ok(&["-n", n, "label", "device", "warm", "cold", "line=b"]);
    // The label reaches the controller's cache before the report is applied.
    let devices: Api<edgesync_crds::Device> = Api::namespaced(cp.client().await, n);
    let url = live.controller.url();
    let reports = vec![
        report("hot", 1, json!({"temperature": 90, "mode": "auto"})),
        report("warm", 1, json!({"temperature": 80.5, "mode": "auto"})),
        report("cold", 1, json!({"temperature": 20, "mode": "manual"})),
    ];
    let answer = post_batch(&url, n, "edge-1", "token-1", &batch(1, reports)).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(devices.get("hot").await.unwrap().status.is_some());

    // kubectl prints the server's Table.
    let table = cp.kubectl_ok(&["-n", n, "get", "devicestates"]);
    let header = table.lines().next().unwrap();
    for column in ["NAME", "NODE", "ONLINE", "IN-SYNC", "STATE-AGE"] {
        assert!(header.contains(column), "{table}");
    }
    assert_eq!(table.lines().count(), 4, "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("hot ") && l.contains("edge-1") && l.contains("True")),
        "{table}"
    );
    let one: Value =
        serde_json::from_str(&cp.kubectl_ok(&["-n", n, "get", "devicestate", "hot", "-o", "json"]))
            .unwrap();
    assert_eq!(one["kind"], "DeviceState");
    assert_eq!(one["reported"]["temperature"], 90);
    assert_eq!(one["version"]["version"], 1);
    assert_eq!(one["node"], "edge-1");
    let missing = cp.kubectl(&["-n", n, "get", "devicestate", "nope"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));

    // Selectors: labels, fields on reported values, and comparisons.
    let labelled = cp.kubectl_ok(&["-n", n, "get", "devicestates", "-l", "line=a", "-o", "name"]);
    assert_eq!(labelled.trim(), "devicestate.live.edgesync.io/hot");
    let auto = cp.kubectl_ok(&[
        "-n",
        n,
        "get",
        "devicestates",
        "--field-selector",
        "reported.mode=auto",
        "-o",
        "json",
    ]);
    assert_eq!(
        names(&serde_json::from_str(&auto).unwrap()),
        ["hot", "warm"]
    );
    assert_eq!(
        names(&raw(cp, n, "where=temperature%3E80")),
        ["hot", "warm"]
    );
    assert_eq!(names(&raw(cp, n, "where=temperature%3E80.5")), ["hot"]);
    assert_eq!(
        names(&raw(cp, n, "where=temperature%3C50&labelSelector=line%3Db")),
        ["cold"]
    );
    let bad = cp.kubectl(&[
        "get",
        "--raw",
        &format!(
            "/apis/live.edgesync.io/v1alpha1/namespaces/{n}/devicestates?where=temperature%3E%3Ex"
        ),
    ]);
    assert!(!bad.status.success());

    // The plugin's query: the matching live states, with the values compared.
    let plugin = edgesync_e2e::release_binary("kubectl-edgesync", "kubectl-edgesync", "plugin");
    let out = Command::new(&plugin)
        .args(["get", "--where", "temperature>80", "-n", n])
        .env("KUBECONFIG", cp.kubeconfig())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let header = text.lines().next().unwrap_or_default();
    assert!(header.contains("TEMPERATURE"), "{text}");
    let rows: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert!(
        rows[0].starts_with("hot ") && rows[0].contains("90"),
        "{text}"
    );
    assert!(
        rows[1].starts_with("warm ") && rows[1].contains("80.5"),
        "{text}"
    );

    // Pages.
    let first = raw(cp, n, "limit=2");
    assert_eq!(names(&first), ["cold", "hot"]);
    let token = first["metadata"]["continue"].as_str().unwrap();
    let rest = raw(cp, n, &format!("limit=2&continue={token}"));
    assert_eq!(names(&rest), ["warm"]);
    assert!(rest["metadata"]["continue"].is_null());

    // kubectl's watch prints a new version as it is reported.
    let mut watch = Command::new(cp.kubectl_path())
        .arg(format!("--kubeconfig={}", cp.kubeconfig().display()))
        .args(["-n", n, "get", "devicestates", "-w", "-o"])
        .arg("jsonpath={.metadata.name}:{.version.version}{\"\\n\"}")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // The watch lists first: three lines, then it is watching.
    for _ in 0..3 {
        rx.recv_timeout(Duration::from_secs(30))
            .expect("kubectl -w lists the devices");
    }
    let answer = post_batch(
        &url,
        n,
        "edge-1",
        "token-1",
        &batch(
            2,
            vec![report("hot", 2, json!({"temperature": 95, "mode": "auto"}))],
        ),
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("kubectl -w prints the change");
    assert_eq!(line, "hot:2");
    let _ = watch.kill();
    let _ = watch.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_front_proxy_is_served_and_users_see_what_rbac_allows() {
    let cp = ControlPlane::shared();
    let live = live_api();
    let a = cp.namespace("live-rbac-a");
    let b = cp.namespace("live-rbac-b");
    for ns in [&a.name, &b.name] {
        create_node(cp, ns, "edge-1", "token-1", "");
        create_devices(cp, ns, "edge-1", &["press".into()]);
        let one = batch(1, vec![report("press", 1, json!({"speed": 3}))]);
        let answer = post_batch(&live.controller.url(), ns, "edge-1", "token-1", &one).await;
        assert_eq!(answer.status, 200, "{answer:?}");
    }
    let rbac = format!(
        "apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: devicestate-reader
  namespace: {a}
rules:
- apiGroups: [live.edgesync.io]
  resources: [devicestates]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: alice-reads-devicestates
  namespace: {a}
subjects:
- kind: User
  name: alice
  apiGroup: rbac.authorization.k8s.io
roleRef:
  kind: Role
  name: devicestate-reader
  apiGroup: rbac.authorization.k8s.io
",
        a = a.name
    );
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], &rbac);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // As alice (impersonated: the API server then proxies with X-Remote-User: alice).
    let allowed = wait::until_blocking(
        "alice may list A's devicestates",
        Duration::from_secs(30),
        || {
            let out = cp.kubectl(&[
                "--as=alice",
                "-n",
                &a.name,
                "get",
                "devicestates",
                "-o",
                "name",
            ]);
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        },
    )
    .unwrap();
    assert_eq!(allowed.trim(), "devicestate.live.edgesync.io/press");
    for args in [
        vec!["get", "devicestates"],
        vec!["get", "devicestate", "press"],
    ] {
        let mut full = vec!["--as=alice", "-n", b.name.as_str()];
        full.extend(args);
        let refused = cp.kubectl(&full);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success());
        assert!(
            stderr.contains("forbidden") && stderr.contains("alice"),
            "{stderr}"
        );
    }
    let everywhere = cp.kubectl(&["--as=alice", "get", "devicestates", "-A"]);
    assert!(!everywhere.status.success());

    // Straight to the controller's port: without the front proxy's certificate a request is
    // refused whatever headers it sets; with a certificate of another CA, the handshake fails.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let url = format!(
        "https://127.0.0.1:{}/apis/live.edgesync.io/v1alpha1/namespaces/{}/devicestates",
        live.port, a.name
    );
    let bare = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let answer = bare
        .get(&url)
        .header("X-Remote-User", "system:admin")
        .header("X-Remote-Group", "system:masters")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 401);
    let body: Value = serde_json::from_str(&answer.text().await.unwrap()).unwrap();
    assert_eq!(body["kind"], "Status");
    assert!(
        body["message"].as_str().unwrap().contains("front proxy"),
        "{body}"
    );

    let dir = tempfile::tempdir().unwrap();
    let rogue = pki::TestCa::new(dir.path(), "rogue");
    let issued = rogue.client(edgesync_e2e::cluster::FRONT_PROXY_CLIENT, None);
    let mut pem = std::fs::read(&issued.cert).unwrap();
    pem.extend(std::fs::read(&issued.key).unwrap());
    let impostor = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let refused = impostor
        .get(&url)
        .header("X-Remote-User", "system:admin")
        .send()
        .await;
    assert!(
        refused.as_ref().is_err() || refused.as_ref().unwrap().status() == 401,
        "{refused:?}"
    );

    // With the front proxy's certificate, the controller asks the API server itself whether
    // the named user may read (the API server checks too, before it proxies).
    let proxy = cp.front_proxy_client();
    let mut pem = std::fs::read(&proxy.cert).unwrap();
    pem.extend(std::fs::read(&proxy.key).unwrap());
    let front_proxy = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let as_alice = |ns: &str| {
        front_proxy
            .get(format!(
                "https://127.0.0.1:{}/apis/live.edgesync.io/v1alpha1/namespaces/{ns}/devicestates",
                live.port
            ))
            .header("X-Remote-User", "alice")
            .header("X-Remote-Group", "system:authenticated")
            .send()
    };
    assert_eq!(as_alice(&a.name).await.unwrap().status(), 200);
    let denied = as_alice(&b.name).await.unwrap();
    assert_eq!(denied.status(), 403);
    let body: Value = serde_json::from_str(&denied.text().await.unwrap()).unwrap();
    assert_eq!(body["reason"], "Forbidden", "{body}");
    let nobody = front_proxy.get(&url).send().await.unwrap();
    assert_eq!(nobody.status(), 401, "a proxied request must name its user");

    let metrics = live.controller.metrics().await;
    for reason in ["unauthenticated", "forbidden"] {
        let series = format!("edgesync_controller_live_refused_total{{reason=\"{reason}\"}}");
        assert!(
            edgesync_e2e::controller::metric_value(&metrics, &series) >= 1.0,
            "{series}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumes_from_its_version_and_is_gone_once_it_left_the_window() {
    let cp = ControlPlane::shared();
    let live = live_api();
    let ns = cp.namespace("live-watch");
    let n = ns.name.as_str();
    create_node(cp, n, "edge-1", "token-1", "  autoRegisterDevices: true");
    let url = live.controller.url();
    let post = |seq: u64, reports| {
        let url = url.clone();
        async move {
            let answer = post_batch(&url, n, "edge-1", "token-1", &batch(seq, reports)).await;
            assert_eq!(answer.status, 200, "{answer:?}");
        }
    };
    post(1, vec![report("d1", 1, json!({"v": 1}))]).await;
    let api = devicestates(cp.client().await, n);
    let listed = api.list(&ListParams::default()).await.unwrap();
    let since = listed.metadata.resource_version.unwrap();
    post(2, vec![report("d1", 2, json!({"v": 2}))]).await;
    post(3, vec![report("d1", 3, json!({"v": 3}))]).await;

    let mut events = api
        .watch(&WatchParams::default(), &since)
        .await
        .unwrap()
        .boxed();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let event = tokio::time::timeout(Duration::from_secs(30), events.next())
            .await
            .expect("watch events within 30 s")
            .expect("the watch goes on")
            .unwrap();
        match event {
            WatchEvent::Modified(o) => seen.push(o.data["reported"]["v"].as_i64().unwrap()),
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(seen, [2, 3]);
    drop(events);

    // More changes than the window holds: resuming from `since` is 410 Expired.
    let many = (0..=WINDOW)
        .map(|i| report(&format!("m{i}"), 1, json!({"i": i})))
        .collect();
    post(4, many).await;
    let mut events = api
        .watch(&WatchParams::default(), &since)
        .await
        .unwrap()
        .boxed();
    let event = tokio::time::timeout(Duration::from_secs(30), events.next())
        .await
        .expect("an answer within 30 s")
        .expect("one event")
        .unwrap();
    match event {
        WatchEvent::Error(e) => {
            assert_eq!(e.code, 410, "{e:?}");
            assert_eq!(e.reason, "Expired", "{e:?}");
        }
        other => panic!("expected 410, got {other:?}"),
    }
    assert!(
        live.controller
            .metric("edgesync_controller_live_watches_expired_total")
            .await
            >= 1.0
    );
}

/// A Device's status version, if it has one.
async fn status_version(api: &Api<edgesync_crds::Device>, name: &str) -> Option<u64> {
    api.get(name).await.ok()?.status?.reported_version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_state_is_a_devicestate_before_its_status_is_written() {
    let cp = ControlPlane::shared();
    let live = live_api();
    let ns = cp.namespace("live-agent");
    let n = ns.name.as_str();
    create_node(cp, n, "edge-1", "token-1", "");
    create_devices(cp, n, "edge-1", &["press".into()]);
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "token-1\n").unwrap();
    let mut config = AgentConfig::new(&dir.path().join("agent"), &broker.url());
    config.namespace = n.to_owned();
    config.cloud = Some((live.controller.url(), token_file));
    let _agent = spawn_agent(&config);
    let devices: Api<edgesync_crds::Device> = Api::namespaced(cp.client().await, n);
    let states = devicestates(cp.client().await, n);
    let publish = |speed: u32| {
        publish_acked(
            broker.port(),
            "press-publisher",
            vec![(
                "factory/press/state".into(),
                json!({"speed": speed}).to_string(),
            )],
        )
    };

    // The agent subscribes once it has started: publish until the first state arrives.
    wait::until(
        "the first state in the live state",
        Duration::from_secs(30),
        || async {
            publish(1).await;
            states.get_opt("press").await.ok().flatten().map(|_| ())
        },
    )
    .await;
    wait::until(
        "the first status write",
        Duration::from_secs(30),
        || async { status_version(&devices, "press").await },
    )
    .await;
    let written = status_version(&devices, "press").await.unwrap();

    // A second state within the status interval: live at once, its status later.
    publish(2).await;
    let live_version = wait::until(
        "the new state in the live state",
        Duration::from_secs(10),
        || async {
            let o = states.get("press").await.ok()?;
            (o.data["reported"]["speed"] == 2)
                .then(|| o.data["version"]["version"].as_u64().unwrap())
        },
    )
    .await;
    assert!(live_version > written);
    assert_eq!(
        status_version(&devices, "press").await,
        Some(written),
        "the status is written no sooner than --status-min-interval-seconds after the last"
    );
    wait::until(
        "the status to follow",
        Duration::from_secs(STATUS_INTERVAL_SECS + 20),
        || async { (status_version(&devices, "press").await? >= live_version).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_answers_come_first_and_durable_versions_follow_across_a_restart() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("live-contract");
    let n = ns.name.as_str();
    create_node(cp, n, "edge-1", "token-1", "");
    create_devices(cp, n, "edge-1", &["a".into(), "b".into()]);
    // A controller of its own, killed below; it serves no live API (the answers do not
    // depend on one).
    let mut c = Controller::start(cp, &["--status-min-interval-seconds", "1"]);
    let devices: Api<edgesync_crds::Device> = Api::namespaced(cp.client().await, n);
    let epoch = "0123456789abcdef0123456789abcdef";
    let post = |url: String, seq: u64, reports| async move {
        let a = post_batch(
            &url,
            n,
            "edge-1",
            "token-1",
            &live_batch(seq, epoch, reports),
        )
        .await;
        assert_eq!(a.status, 200, "{a:?}");
        a.body
    };
    let durable_of = |body: &Value| -> Vec<(String, u64)> {
        body["durable"]
            .as_array()
            .map(|d| {
                d.iter()
                    .map(|x| {
                        (
                            x["device"].as_str().unwrap().to_owned(),
                            x["version"].as_u64().unwrap(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };

    let first = post(
        c.url(),
        1,
        vec![
            report("a", 1, json!({"t": 1})),
            report("b", 1, json!({"t": 1})),
        ],
    )
    .await;
    let id = first["live"].as_str().unwrap().to_owned();
    assert_eq!(first["results"][0]["status"], "accepted");
    // Durable versions are told only once written, in a later answer (an empty batch).
    let told = std::sync::Mutex::new(durable_of(&first));
    let seq = std::sync::atomic::AtomicU64::new(2);
    let url = c.url();
    wait::until(
        "both versions told durable",
        Duration::from_secs(30),
        || {
            let (told, seq, devices, url) = (&told, &seq, &devices, url.clone());
            async move {
                let n = seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                let body = post(url, n, Vec::new()).await;
                for (device, version) in durable_of(&body) {
                    // Told only once it is in the Device's status.
                    assert!(status_version(devices, &device).await.unwrap_or(0) >= version);
                    told.lock().unwrap().push((device, version));
                }
                (told.lock().unwrap().len() == 2).then_some(())
            }
        },
    )
    .await;
    let mut told = told.into_inner().unwrap();
    told.sort();
    assert_eq!(told, [("a".to_owned(), 1), ("b".to_owned(), 1)]);

    // A report answered live, then the controller killed before its write (the interval
    // holds it): the restarted controller names another live state, and the agent's resend
    // is written.
    let held = post(c.url(), 100, vec![report("a", 2, json!({"t": 2}))]).await;
    assert_eq!(held["results"][0]["status"], "accepted");
    c.process.kill9();
    c.process.restart();
    c.wait_ready();
    let again = post(c.url(), 101, vec![report("a", 2, json!({"t": 2}))]).await;
    assert_ne!(
        again["live"].as_str().unwrap(),
        id,
        "a restart is another live state"
    );
    wait::until(
        "the resent version durable",
        Duration::from_secs(30),
        || async { (status_version(&devices, "a").await? == 2).then_some(()) },
    )
    .await;
    // Already durable: a resend is told so in its own answer.
    let resent = post(c.url(), 102, vec![report("b", 1, json!({"t": 1}))]).await;
    assert_eq!(resent["results"][0]["status"], "accepted");
    assert!(
        durable_of(&resent).contains(&("b".to_owned(), 1)),
        "{resent}"
    );
}
