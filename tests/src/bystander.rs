//! Another client of the API server, for the benches that ask what a load costs everyone else:
//! an operator's tool or another controller reading one ConfigMap in a loop.
//!
//! It is a ServiceAccount, so its requests fall in the API server's usual priority level for
//! service accounts (the harness admin's would be exempt from API Priority and Fairness), and
//! it runs on a thread and runtime of its own, as another program would: on a bench's runtime
//! its replies would wait behind the load, and that wait would be counted as the API server's.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;

use crate::cluster::ControlPlane;

/// Creates the other client in `ns`: a ConfigMap `bystander` and a ServiceAccount allowed to
/// read only that. Returns the path of its kubeconfig.
///
/// # Panics
/// When the objects are refused.
pub fn identity(cp: &ControlPlane, ns: &str) -> PathBuf {
    cp.kubectl_ok(&["-n", ns, "create", "configmap", "bystander"]);
    let rbac = format!(
        "apiVersion: v1
kind: ServiceAccount
metadata:
  name: bystander
  namespace: {ns}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: bystander
  namespace: {ns}
rules:
  - apiGroups: [\"\"]
    resources: [\"configmaps\"]
    resourceNames: [\"bystander\"]
    verbs: [\"get\"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: bystander
  namespace: {ns}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: bystander
subjects:
  - kind: ServiceAccount
    name: bystander
    namespace: {ns}
"
    );
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], &rbac);
    assert!(
        out.status.success(),
        "the bystander's RBAC: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    cp.service_account_kubeconfig(ns, "bystander")
}

/// GETs the ConfigMap of [`identity`] in a loop (20 ms apart) for `run`, on a thread of its
/// own; returns the sorted latencies.
///
/// # Panics
/// When every GET failed.
pub async fn get_latencies(kubeconfig: &Path, ns: &str, run: Duration) -> Vec<Duration> {
    let (kubeconfig, ns) = (kubeconfig.to_owned(), ns.to_owned());
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("bystander runtime")
            .block_on(get_loop(&kubeconfig, &ns, run))
    })
    .await
    .expect("bystander thread")
}

async fn get_loop(kubeconfig: &Path, ns: &str, run: Duration) -> Vec<Duration> {
    // Made here: a client belongs to the runtime that made it.
    let api: Api<ConfigMap> = Api::namespaced(ControlPlane::client_from(kubeconfig).await, ns);
    let started = Instant::now();
    let mut latencies = Vec::new();
    while started.elapsed() < run {
        let t = Instant::now();
        if api.get("bystander").await.is_ok() {
            latencies.push(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!latencies.is_empty(), "the bystander's GETs all failed");
    latencies.sort();
    latencies
}
