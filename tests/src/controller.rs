//! Running the cloud controller in tests: the release binary as a process against the harness
//! control plane, EdgeNodes with their token Secrets, and a client for the controller's API.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use edgesync_protocol::wire::{self, AgentHealth, Report, ReportBatch};
use serde_json::{Map, Value};

use crate::cluster::ControlPlane;
use crate::process::{ManagedProcess, ProcessSpec};
use crate::wait::until_blocking;
use crate::{free_port, loopback};

/// The controller's usual `RUST_LOG` in tests. The harness API server has a self-signed
/// certificate the kubeconfig skips verifying; kube warns about that on every connection.
pub const DEFAULT_LOG: &str = "info,edgesync_controller=debug,kube_client::client::tls=error";

/// Path of the release controller binary, building it once per test binary if needed.
/// `EDGESYNC_CONTROLLER_BIN` runs a given binary instead (another build, for an A/B bench).
pub fn controller_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match std::env::var_os("EDGESYNC_CONTROLLER_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => crate::release_binary("edgesync-controller", "edgesync-controller", "controller"),
    })
    .clone()
}

/// A controller process on a loopback port.
#[derive(Debug)]
pub struct Controller {
    /// The process (kill9, restart, logs).
    pub process: ManagedProcess,
    /// Where it listens.
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Controller {
    /// Starts a controller against `cp` with extra `run` options, and waits until it is ready.
    ///
    /// # Panics
    /// When it does not become ready within 30 s (its log is printed).
    pub fn start(cp: &ControlPlane, extra: &[&str]) -> Controller {
        let c = Self::spawn(cp, extra);
        c.wait_ready();
        c
    }

    /// Starts a controller without waiting for it (for TLS, where readiness is checked over
    /// HTTPS by the caller, or to see it refuse to start).
    pub fn spawn(cp: &ControlPlane, extra: &[&str]) -> Controller {
        Self::spawn_with(cp.kubeconfig(), extra, None, DEFAULT_LOG)
    }

    /// Starts a controller logging with the `RUST_LOG` filter `log`, and waits until it is
    /// ready.
    pub fn start_with_log(cp: &ControlPlane, extra: &[&str], log: &str) -> Controller {
        let c = Self::spawn_with_log(cp, extra, log);
        c.wait_ready();
        c
    }

    /// Starts a controller logging with the `RUST_LOG` filter `log`, without waiting for it.
    pub fn spawn_with_log(cp: &ControlPlane, extra: &[&str], log: &str) -> Controller {
        Self::spawn_with(cp.kubeconfig(), extra, None, log)
    }

    /// Starts a controller whose open-files limit (soft and hard) is `limit`, as under
    /// systemd's or containerd's default of 1,024, and waits until it is ready.
    pub fn start_with_open_files(cp: &ControlPlane, extra: &[&str], limit: u64) -> Controller {
        let c = Self::spawn_with(cp.kubeconfig(), extra, Some(limit), DEFAULT_LOG);
        c.wait_ready();
        c
    }

    /// Starts a controller with the identity `deploy/` gives it (its ServiceAccount, allowed
    /// only what `deploy/base/rbac.yaml` grants, its writes in the priority level of
    /// `deploy/base/flowcontrol.yaml`), and waits until it is ready. Its Lease must be in
    /// `edgesync-system`.
    pub fn start_deployed(cp: &ControlPlane, extra: &[&str]) -> Controller {
        let c = Self::spawn_with(
            cp.deployed_controller_kubeconfig(),
            extra,
            None,
            DEFAULT_LOG,
        );
        c.wait_ready();
        c
    }

    /// Starts a controller against the kubeconfig at `kubeconfig` (e.g. one naming an API
    /// server that is not there) with the `RUST_LOG` filter `log` (empty: the controller's
    /// own default), without waiting for it.
    pub fn spawn_with_kubeconfig(kubeconfig: &Path, extra: &[&str], log: &str) -> Controller {
        Self::spawn_with(kubeconfig, extra, None, log)
    }

    /// Starts a controller with the identity `deploy/` gives it (as
    /// [`Controller::start_deployed`]) that lives as long as the test binary, for one held in
    /// a `static` (never dropped): it is stopped when the binary exits, however it exits.
    pub fn start_deployed_for_binary(cp: &ControlPlane, extra: &[&str]) -> Controller {
        let c = Self::spawn_inner(
            cp.deployed_controller_kubeconfig(),
            extra,
            None,
            DEFAULT_LOG,
            true,
        );
        c.wait_ready();
        c
    }

    fn spawn_with(kubeconfig: &Path, extra: &[&str], limit: Option<u64>, log: &str) -> Controller {
        Self::spawn_inner(kubeconfig, extra, limit, log, false)
    }

    fn spawn_inner(
        kubeconfig: &Path,
        extra: &[&str],
        limit: Option<u64>,
        log: &str,
        for_binary: bool,
    ) -> Controller {
        let dir = tempfile::tempdir().expect("controller temp dir");
        let addr = loopback(free_port());
        // prlimit (util-linux) sets the limit and then runs the controller in its place.
        let spec = match limit {
            Some(n) => ProcessSpec::new("edgesync-controller", "prlimit")
                .arg(format!("--nofile={n}:{n}"))
                .arg("--")
                .arg(controller_binary()),
            None => ProcessSpec::new("edgesync-controller", controller_binary()),
        };
        let mut spec = spec
            .arg("run")
            .arg("--listen")
            .arg(addr.to_string())
            .env("KUBECONFIG", &kubeconfig.display().to_string())
            .env("RUST_LOG", log);
        for a in extra {
            spec = spec.arg(*a);
        }
        let process = if for_binary {
            ManagedProcess::spawn_tied(spec, dir.path(), Some(dir.path().to_path_buf()))
        } else {
            ManagedProcess::spawn(spec, dir.path())
        };
        Controller {
            process,
            addr,
            _dir: dir,
        }
    }

    /// Waits until `/readyz` answers 200.
    ///
    /// # Panics
    /// After 30 s, printing the controller's log.
    pub fn wait_ready(&self) {
        self.wait_for_200("/readyz");
    }

    /// Waits until `/healthz` answers 200 (serving, whether or not it can reach Kubernetes).
    ///
    /// # Panics
    /// After 30 s, printing the controller's log.
    pub fn wait_serving(&self) {
        self.wait_for_200("/healthz");
    }

    fn wait_for_200(&self, path: &str) {
        let addr = self.addr;
        if let Err(e) = until_blocking(
            &format!("controller {path}"),
            Duration::from_secs(30),
            || (http_get_status(addr, path) == Some(200)).then_some(()),
        ) {
            self.process.dump_log();
            panic!("{e}");
        }
    }

    /// The controller's process id (for CPU measurements).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        client()
            .get(format!("{}/metrics", self.url()))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// One metric value (first sample whose line starts with `series`), or 0.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }
}

/// The value of the first sample of `series` (name plus labels, exactly) in Prometheus text,
/// or 0 when absent.
pub fn metric_value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Status code of a plain HTTP/1.0 GET, without an async runtime.
fn http_get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    std::str::from_utf8(&buf[..n])
        .ok()?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

/// An HTTP client for the controller (plain HTTP on loopback).
pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("build HTTP client")
}

/// Creates the token Secret and EdgeNode `node` in `ns`. `spec_extra` is YAML spliced into the
/// EdgeNode spec (e.g. `"autoRegisterDevices: true"`), indented by the caller's text as-is.
pub fn create_node(cp: &ControlPlane, ns: &str, node: &str, token: &str, spec_extra: &str) {
    let yaml = format!(
        "apiVersion: v1
kind: Secret
metadata:
  name: {node}-token
  namespace: {ns}
stringData:
  token: {token}
---
apiVersion: edgesync.io/v1alpha1
kind: EdgeNode
metadata:
  name: {node}
  namespace: {ns}
spec:
  tokenSecretRef:
    name: {node}-token
{spec_extra}
"
    );
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], &yaml);
    assert!(
        out.status.success(),
        "creating EdgeNode {ns}/{node}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creates Devices owned by `node` in `ns`.
pub fn create_devices(cp: &ControlPlane, ns: &str, node: &str, names: &[String]) {
    let yaml: String = names
        .iter()
        .map(|n| {
            format!(
                "apiVersion: edgesync.io/v1alpha1\nkind: Device\nmetadata:\n  name: {n}\n  namespace: {ns}\nspec:\n  nodeName: {node}\n---\n"
            )
        })
        .collect();
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], &yaml);
    assert!(
        out.status.success(),
        "creating devices: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A report of `reported` at `version`.
pub fn report(device: &str, version: u64, reported: Value) -> Report {
    Report {
        device: device.to_owned(),
        version,
        reported: reported.as_object().cloned().unwrap_or_else(Map::new),
        reported_at: "2026-11-28T10:00:00Z".to_owned(),
        observed_desired_version: 0,
        connected: None,
        rejection: None,
    }
}

/// A batch of `reports` with a default agent health, from an agent that predates epochs
/// (and live answers: it is answered once its reports are durable).
pub fn batch(seq: u64, reports: Vec<Report>) -> ReportBatch {
    ReportBatch {
        seq,
        epoch: String::new(),
        agent: AgentHealth {
            version: "test".into(),
            mqtt_connected: true,
            ..AgentHealth::default()
        },
        reports,
        live: false,
    }
}

/// A batch from an agent of epoch `epoch` that takes live answers.
pub fn live_batch(seq: u64, epoch: &str, reports: Vec<Report>) -> ReportBatch {
    ReportBatch {
        epoch: epoch.to_owned(),
        live: true,
        ..batch(seq, reports)
    }
}

/// An answer from the controller: status, `Retry-After` if any, JSON body.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After` in seconds.
    pub retry_after: Option<u64>,
    /// Body as JSON (`Null` if not JSON).
    pub body: Value,
}

impl Answer {
    /// `results[i].status`.
    pub fn result(&self, i: usize) -> &str {
        self.body["results"][i]["status"].as_str().unwrap_or("")
    }

    /// `error.code`.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

/// POSTs raw bytes to a node's reports endpoint.
pub async fn post_raw(
    base: &str,
    ns: &str,
    node: &str,
    token: Option<&str>,
    body: Vec<u8>,
    gzip: bool,
) -> Answer {
    // One client for all: building one loads the system's CA certificates, and a test that
    // fires thousands of requests would spend its time (and the controller's header
    // timeout) doing that. Without idle connections: each test runs its own runtime, and a
    // pooled connection dies with the runtime of the test that opened it (another test
    // taking it got "connection closed before message completed").
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let mut req = CLIENT
        .get_or_init(|| {
            let _ = rustls::crypto::ring::default_provider().install_default();
            reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(0)
                .build()
                .expect("build HTTP client")
        })
        .post(format!("{base}{}", wire::reports_path(ns, node)))
        .header("content-type", "application/json")
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if gzip {
        req = req.header("content-encoding", "gzip");
    }
    let resp = req.send().await.expect("POST reports");
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let text = resp.text().await.unwrap_or_default();
    Answer {
        status,
        retry_after,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
    }
}

/// POSTs a batch to a node's reports endpoint.
pub async fn post_batch(
    base: &str,
    ns: &str,
    node: &str,
    token: &str,
    batch: &ReportBatch,
) -> Answer {
    post_raw(
        base,
        ns,
        node,
        Some(token),
        serde_json::to_vec(batch).expect("serialize batch"),
        false,
    )
    .await
}

/// A desired-state stream read line by line.
pub struct DesiredStream {
    body: std::pin::Pin<
        Box<dyn futures_util::Stream<Item = reqwest::Result<axum::body::Bytes>> + Send>,
    >,
    buf: Vec<u8>,
}

impl DesiredStream {
    /// Opens `GET .../desired[?since=cursor]`; returns the HTTP status on failure.
    pub async fn open(
        base: &str,
        ns: &str,
        node: &str,
        token: &str,
        since: Option<&str>,
    ) -> Result<DesiredStream, u16> {
        let mut url = format!("{base}{}", wire::desired_path(ns, node));
        if let Some(c) = since {
            url.push_str("?since=");
            url.push_str(c);
        }
        // No overall timeout (the stream is long-lived); the TLS provider must be installed
        // before any reqwest client is built, whichever test builds the first one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let resp = reqwest::Client::builder()
            .build()
            .expect("client")
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .expect("GET desired");
        if !resp.status().is_success() {
            return Err(resp.status().as_u16());
        }
        Ok(DesiredStream {
            body: Box::pin(resp.bytes_stream()),
            buf: Vec::new(),
        })
    }

    /// The next event, or panics after `deadline`.
    pub async fn next(&mut self, deadline: Duration) -> wire::DesiredEvent {
        use futures_util::StreamExt as _;
        let until = tokio::time::Instant::now() + deadline;
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return serde_json::from_slice(&line[..line.len() - 1]).unwrap_or_else(|e| {
                    panic!("bad desired line {:?}: {e}", String::from_utf8_lossy(&line))
                });
            }
            let chunk = tokio::time::timeout_at(until, self.body.next())
                .await
                .unwrap_or_else(|_| panic!("no desired-state event within {deadline:?}"))
                .expect("desired stream ended")
                .expect("desired stream failed");
            self.buf.extend_from_slice(&chunk);
        }
    }

    /// Whether the stream ends (closed, or failed) within `deadline`, events before that
    /// read and dropped.
    pub async fn ends_within(&mut self, deadline: Duration) -> bool {
        use futures_util::StreamExt as _;
        let until = tokio::time::Instant::now() + deadline;
        loop {
            match tokio::time::timeout_at(until, self.body.next()).await {
                Err(_) => return false,
                Ok(None | Some(Err(_))) => return true,
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// The next event that is not a bookmark.
    pub async fn next_change(&mut self, deadline: Duration) -> wire::DesiredEvent {
        loop {
            let e = self.next(deadline).await;
            if !matches!(e, wire::DesiredEvent::Bookmark { .. }) {
                return e;
            }
        }
    }
}

/// Writes a self-signed server certificate for `127.0.0.1` (`cert.pem`, `key.pem`) into `dir`
/// with the openssl CLI and returns their paths.
///
/// # Panics
/// When openssl is missing or fails.
pub fn self_signed_cert(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    crate::pki::openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            // A self-signed end-entity certificate (rustls refuses a CA certificate as a
            // server's).
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth",
        ],
    );
    (dir.join("cert.pem"), dir.join("key.pem"))
}
