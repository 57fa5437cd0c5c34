//! The controller's live API (`devicestates.live.edgesync.io`) behind the harness API
//! server's aggregation layer: an ExternalName Service naming `localhost`, which
//! kube-apiserver routes to as it would to a Service's endpoints, and the APIService.

use std::time::Duration;

use kube::api::{Api, ApiResource, DynamicObject};

use crate::cluster::ControlPlane;
use crate::wait::until_blocking;

/// The APIService's name.
pub const APISERVICE: &str = "v1alpha1.live.edgesync.io";

/// The DeviceStates of namespace `ns`, read through the API server.
pub fn devicestates(client: kube::Client, ns: &str) -> Api<DynamicObject> {
    let resource = ApiResource {
        group: "live.edgesync.io".into(),
        version: "v1alpha1".into(),
        api_version: "live.edgesync.io/v1alpha1".into(),
        kind: "DeviceState".into(),
        plural: "devicestates".into(),
    };
    Api::namespaced_with(client, ns, &resource)
}

/// Registers the live API served on loopback `port` (the controller's `--live-listen`) and
/// waits until the API server finds it Available.
///
/// # Panics
/// When the objects are refused or the APIService is not Available within 60 s (printing
/// its conditions).
pub fn register(cp: &ControlPlane, port: u16) {
    let yaml = format!(
        "apiVersion: v1
kind: Namespace
metadata:
  name: edgesync-live
---
apiVersion: v1
kind: Service
metadata:
  name: edgesync-live
  namespace: edgesync-live
spec:
  type: ExternalName
  externalName: localhost
  ports:
  - port: {port}
    protocol: TCP
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata:
  name: {APISERVICE}
spec:
  group: live.edgesync.io
  version: v1alpha1
  service:
    namespace: edgesync-live
    name: edgesync-live
    port: {port}
  # The controller made its own certificate at start, as metrics-server does.
  insecureSkipTLSVerify: true
  groupPriorityMinimum: 1000
  versionPriority: 15
"
    );
    let out = cp.kubectl_stdin(
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        &yaml,
    );
    assert!(
        out.status.success(),
        "registering the live API: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let available = until_blocking(
        "the live APIService to be Available",
        Duration::from_secs(60),
        || {
            let out = cp.kubectl_ok(&[
                "get",
                "apiservice",
                APISERVICE,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Available\")].status}",
            ]);
            (out.trim() == "True").then_some(())
        },
    );
    if let Err(e) = available {
        let conditions = cp.kubectl(&["get", "apiservice", APISERVICE, "-o", "yaml"]);
        panic!("{e}\n{}", String::from_utf8_lossy(&conditions.stdout));
    }
}
