//! A real Kubernetes control plane for tests: etcd and kube-apiserver built from the official
//! Go modules (see `hack/ensure-k8s.sh`, versions pinned in `hack/versions.env`), started on
//! free loopback ports, with the edgesync CRDs applied.
//!
//! Tests normally share one control plane per test binary ([`ControlPlane::shared`]) and get
//! their own namespace each ([`ControlPlane::namespace`]). Tests that stop the API server get
//! their own ([`ControlPlane::start`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::process::{ManagedProcess, ProcessSpec};
use crate::{free_port, wait, workspace_root};

/// How long the API server may take to become ready before the harness gives up.
const READY_DEADLINE: Duration = Duration::from_secs(90);
/// Bearer token of the harness's cluster-admin user.
const ADMIN_TOKEN: &str = "edgesync-test-admin-token";

/// A running etcd + kube-apiserver pair.
pub struct ControlPlane {
    dir: PathBuf,
    bin_dir: PathBuf,
    kubeconfig: PathBuf,
    server: String,
    // Field order is drop order: the API server stops before etcd, whose watchdog then
    // removes the data directory.
    apiserver: Mutex<ManagedProcess>,
    etcd: Mutex<ManagedProcess>,
    started_in: Duration,
    /// See [`ControlPlane::deployed_controller_kubeconfig`]; set up on first use.
    deployed_kubeconfig: OnceLock<PathBuf>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("server", &self.server)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The common name of the API server's front-proxy client certificate (its only allowed
/// request-header name).
pub const FRONT_PROXY_CLIENT: &str = "front-proxy-client";

/// The shared control plane, or why it could not start (remembered so that the other tests of
/// the binary fail at once instead of retrying a broken start each).
static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
static NAMESPACE_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Runs `hack/ensure-k8s.sh` (fast when cached) and returns the directory holding
/// kube-apiserver, kubectl and etcd.
///
/// # Panics
/// When the binaries cannot be built, with the script's explanation.
pub fn k8s_bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        crate::ensured(
            "hack/ensure-k8s.sh",
            "builds kube-apiserver, kubectl and etcd with Go from the Go module proxy",
        )
    })
    .clone()
}

impl ControlPlane {
    /// The control plane shared by all tests in this test binary, started on first use.
    ///
    /// # Panics
    /// When the control plane cannot start; every later caller panics with the same reason.
    pub fn shared() -> &'static ControlPlane {
        let result = SHARED.get_or_init(|| {
            std::panic::catch_unwind(ControlPlane::start).map_err(|e| {
                e.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "unknown panic".to_owned())
            })
        });
        match result {
            Ok(cp) => cp,
            Err(e) => panic!("the shared control plane failed to start: {e}"),
        }
    }

    /// Starts a dedicated control plane (for tests that stop or restart the API server).
    /// Its processes stop when it drops, or when the test binary exits.
    ///
    /// # Panics
    /// When a binary is missing or the API server does not become ready in time, printing
    /// the processes' logs.
    pub fn start() -> ControlPlane {
        let started = Instant::now();
        let bin_dir = k8s_bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("edgesync-k8s-")
            .tempdir()
            .expect("create control plane temp dir")
            .keep();
        let etcd_client = free_port();
        let etcd_peer = free_port();
        let secure_port = free_port();

        generate_sa_key(&dir);
        // The front proxy, as clusters with API aggregation have it: the API server proxies
        // requests to aggregated servers with this client certificate and names the user in
        // X-Remote-* headers, which those servers trust only from it.
        let front_proxy = crate::pki::TestCa::new(&dir, "front-proxy");
        let proxy_client = front_proxy.client(FRONT_PROXY_CLIENT, None);
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{ADMIN_TOKEN},edgesync-admin,edgesync-admin,\"system:masters\"\n"),
        )
        .expect("write token file");

        let etcd = ProcessSpec::new("etcd", bin_dir.join("etcd"))
            .arg("--name=edgesync-test")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!(
                "--listen-client-urls=http://127.0.0.1:{etcd_client}"
            ))
            .arg(format!(
                "--advertise-client-urls=http://127.0.0.1:{etcd_client}"
            ))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"
            ))
            .arg(format!(
                "--initial-cluster=edgesync-test=http://127.0.0.1:{etcd_peer}"
            ))
            .arg("--listen-metrics-urls=")
            // Test data is thrown away with the temp dir: skipping fsync keeps tests fast
            // without weakening anything the tests check.
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        let etcd = ManagedProcess::spawn_tied(etcd, &dir, Some(dir.clone()));

        let apiserver = ProcessSpec::new("kube-apiserver", bin_dir.join("kube-apiserver"))
            .arg(format!("--etcd-servers=http://127.0.0.1:{etcd_client}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            // A loopback advertise address is only allowed without the endpoint reconciler,
            // which matters for in-cluster clients only: there are none here.
            .arg("--endpoint-reconciler-type=none")
            .arg(format!("--secure-port={secure_port}"))
            .arg(format!("--cert-dir={}", dir.join("certs").display()))
            .arg(format!(
                "--token-auth-file={}",
                dir.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!(
                "--service-account-key-file={}",
                dir.join("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                dir.join("sa.key").display()
            ))
            .arg("--service-cluster-ip-range=10.96.0.0/24")
            .arg(format!(
                "--requestheader-client-ca-file={}",
                front_proxy.cert().display()
            ))
            .arg(format!(
                "--requestheader-allowed-names={FRONT_PROXY_CLIENT}"
            ))
            .arg("--requestheader-username-headers=X-Remote-User")
            .arg("--requestheader-group-headers=X-Remote-Group")
            .arg("--requestheader-extra-headers-prefix=X-Remote-Extra-")
            .arg(format!(
                "--proxy-client-cert-file={}",
                proxy_client.cert.display()
            ))
            .arg(format!(
                "--proxy-client-key-file={}",
                proxy_client.key.display()
            ))
            .arg("--v=1");
        let apiserver = ManagedProcess::spawn_tied(apiserver, &dir, None);

        let server = format!("https://127.0.0.1:{secure_port}");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            kubeconfig_yaml(&server, "edgesync-admin", ADMIN_TOKEN),
        )
        .expect("write kubeconfig");

        let cp = ControlPlane {
            dir,
            bin_dir,
            kubeconfig,
            server,
            apiserver: Mutex::new(apiserver),
            etcd: Mutex::new(etcd),
            started_in: Duration::ZERO,
            deployed_kubeconfig: OnceLock::new(),
        };
        cp.wait_ready();
        cp.apply_crds();
        let cp = ControlPlane {
            started_in: started.elapsed(),
            ..cp
        };
        eprintln!(
            "control plane ready at {} in {:.2?} (k8s binaries: {})",
            cp.server,
            cp.started_in,
            cp.bin_dir.display()
        );
        cp
    }

    /// The front proxy's client certificate and key, which aggregated API servers trust to
    /// name users in X-Remote-* headers (for requests that bypass the API server in tests).
    pub fn front_proxy_client(&self) -> crate::pki::Issued {
        let file = |suffix: &str| {
            self.dir
                .join(format!("front-proxy-{FRONT_PROXY_CLIENT}.{suffix}"))
        };
        crate::pki::Issued {
            cert: file("pem"),
            key: file("key"),
        }
    }

    /// Time from start to API server ready with CRDs established.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// API server URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Path of an admin kubeconfig for this control plane.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Path of a kubeconfig that acts as the controller deployed from `deploy/` does: the
    /// `edgesync-controller` ServiceAccount of `edgesync-system`, allowed exactly what
    /// `deploy/base/rbac.yaml` grants, its writes classified by `deploy/base/flowcontrol.yaml`
    /// into a priority level of their own. (The admin kubeconfig is `system:masters`, which
    /// RBAC never refuses and API Priority and Fairness exempts.) Applied on first use, with
    /// server-side apply, which has no read-then-create race with another test applying
    /// the same objects.
    ///
    /// Such a controller may take its Lease only in `edgesync-system`.
    ///
    /// # Panics
    /// When the manifests are refused, the FlowSchema finds no priority level, or no token
    /// can be issued.
    pub fn deployed_controller_kubeconfig(&self) -> &Path {
        self.deployed_kubeconfig.get_or_init(|| {
            let namespace = "apiVersion: v1
kind: Namespace
metadata:
  name: edgesync-system
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: edgesync-controller
  namespace: edgesync-system
";
            let out = self.kubectl_stdin(&["apply", "--server-side", "-f", "-"], namespace);
            assert!(
                out.status.success(),
                "apply the controller's namespace and ServiceAccount: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let base = workspace_root().join("deploy/base");
            self.kubectl_ok(&[
                "apply",
                "--server-side",
                "-f",
                &base.join("rbac.yaml").to_string_lossy(),
                "-f",
                &base.join("flowcontrol.yaml").to_string_lossy(),
            ]);
            assert_eq!(
                self.flowschema_dangling("edgesync-controller"),
                "False",
                "the edgesync-controller FlowSchema finds no priority level"
            );
            self.service_account_kubeconfig("edgesync-system", "edgesync-controller")
        })
    }

    /// Path of a new kubeconfig acting as ServiceAccount `name` of namespace `ns` (which
    /// must exist), with a token the API server issues for a day.
    pub fn service_account_kubeconfig(&self, ns: &str, name: &str) -> PathBuf {
        let token = self.kubectl_ok(&["-n", ns, "create", "token", name, "--duration=24h"]);
        let path = self.dir.join(format!("{ns}.{name}.kubeconfig"));
        let user = format!("system:serviceaccount:{ns}:{name}");
        std::fs::write(&path, kubeconfig_yaml(&self.server, &user, token.trim()))
            .expect("write a service account's kubeconfig");
        path
    }

    /// The status of FlowSchema `name`'s Dangling condition ("False" once its priority level
    /// exists), waiting until the API server's flow control has judged it.
    ///
    /// # Panics
    /// When no status appears within 30 s.
    pub fn flowschema_dangling(&self, name: &str) -> String {
        wait::until_blocking(
            &format!("the {name} FlowSchema's Dangling condition"),
            Duration::from_secs(30),
            || {
                let out = self.kubectl_ok(&[
                    "get",
                    "flowschema",
                    name,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Dangling\")].status}",
                ]);
                let status = out.trim().to_owned();
                (!status.is_empty()).then_some(status)
            },
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Path of the kubectl binary.
    pub fn kubectl_path(&self) -> PathBuf {
        self.bin_dir.join("kubectl")
    }

    fn wait_ready(&self) {
        let result = wait::until_blocking("kube-apiserver /readyz", READY_DEADLINE, || {
            for (name, p) in [("etcd", &self.etcd), ("kube-apiserver", &self.apiserver)] {
                let running = p.lock().map(|mut p| p.is_running()).unwrap_or(false);
                if !running {
                    self.dump_logs();
                    panic!("{name} exited during start-up; its log is printed above");
                }
            }
            let out = self.kubectl(&["get", "--raw", "/readyz"]);
            (out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok")
                .then_some(())
        });
        if let Err(e) = result {
            self.dump_logs();
            panic!("{e}");
        }
    }

    fn apply_crds(&self) {
        let crds = workspace_root().join("crds");
        self.kubectl_ok(&[
            "apply",
            "-f",
            &crds.join("device.yaml").to_string_lossy(),
            "-f",
            &crds.join("edgenode.yaml").to_string_lossy(),
            "-f",
            &crds.join("devicerollout.yaml").to_string_lossy(),
        ]);
        self.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/devices.edgesync.io",
            "crd/edgenodes.edgesync.io",
            "crd/devicerollouts.edgesync.io",
        ]);
    }

    /// Runs kubectl against this control plane.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_cmd(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run kubectl: {e}"))
    }

    /// Runs kubectl with `input` on stdin.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Output {
        let mut child = self
            .kubectl_cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run kubectl: {e}"));
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input.as_bytes())
            .expect("write kubectl stdin");
        child.wait_with_output().expect("wait for kubectl")
    }

    /// `kubectl patch device` with a JSON merge patch (e.g. `{"spec":{"desired":{..}}}`),
    /// as an operator would edit a Device.
    pub fn patch_device(&self, namespace: &str, device: &str, merge_patch: &str) {
        self.kubectl_ok(&[
            "-n",
            namespace,
            "patch",
            "device",
            device,
            "--type=merge",
            "-p",
            merge_patch,
        ]);
    }

    /// Runs kubectl and returns stdout, panicking with stderr when it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.kubectl_path());
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args);
        cmd
    }

    /// A kube-rs client for this control plane. Create one per test: clients hold connections
    /// bound to the runtime that created them.
    pub async fn client(&self) -> kube::Client {
        Self::client_from(&self.kubeconfig).await
    }

    /// A kube-rs client from the kubeconfig at `path` (one of this control plane's).
    pub async fn client_from(path: &Path) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::read_from(path).expect("read a kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("the kubeconfig is valid");
        kube::Client::try_from(config).expect("build kube client")
    }

    /// Creates a fresh namespace for one test; it is deleted when the handle drops.
    pub fn namespace(&self, hint: &str) -> TestNamespace<'_> {
        let n = NAMESPACE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let hint: String = hint
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(40)
            .collect();
        let name = format!("{}-{}-{n}", hint.trim_matches('-'), std::process::id());
        self.kubectl_ok(&["create", "namespace", &name]);
        TestNamespace { cp: self, name }
    }

    /// The API server's process id (for CPU measurements).
    pub fn apiserver_pid(&self) -> Option<u32> {
        self.apiserver.lock().ok().and_then(|p| p.pid())
    }

    /// etcd's process id (for CPU measurements).
    pub fn etcd_pid(&self) -> Option<u32> {
        self.etcd.lock().ok().and_then(|p| p.pid())
    }

    /// Stops the API server (etcd keeps running), as in an API server outage.
    pub fn stop_apiserver(&self) {
        self.apiserver.lock().expect("apiserver lock").stop();
    }

    /// Starts the API server again and waits until it is ready.
    pub fn restart_apiserver(&self) {
        self.apiserver.lock().expect("apiserver lock").restart();
        self.wait_ready();
    }

    /// Prints the end of the etcd and API server logs.
    pub fn dump_logs(&self) {
        if let Ok(p) = self.etcd.lock() {
            p.dump_log();
        }
        if let Ok(p) = self.apiserver.lock() {
            p.dump_log();
        }
    }
}

/// A namespace owned by one test.
#[derive(Debug)]
pub struct TestNamespace<'a> {
    cp: &'a ControlPlane,
    /// The namespace name.
    pub name: String,
}

impl Drop for TestNamespace<'_> {
    fn drop(&mut self) {
        // Without kube-controller-manager the namespace stays Terminating; that is fine, the
        // control plane is thrown away with the test binary.
        let _ = self
            .cp
            .kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

fn kubeconfig_yaml(server: &str, user: &str, token: &str) -> String {
    // The serving certificate is self-signed by kube-apiserver in --cert-dir; the harness
    // skips verification on loopback rather than wiring a CA it does not otherwise need.
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: edgesync-test
  cluster:
    server: {server}
    insecure-skip-tls-verify: true
users:
- name: {user}
  user:
    token: {token}
contexts:
- name: edgesync-test
  context:
    cluster: edgesync-test
    user: {user}
current-context: edgesync-test
"
    )
}

/// The service-account signing key kube-apiserver insists on, made with the openssl CLI.
fn generate_sa_key(dir: &Path) {
    let run = |args: &[&str]| crate::pki::openssl(dir, args);
    run(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "sa.key",
    ]);
    run(&["ec", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
}
