//! The `deploy/` manifests: the API server accepts them (server-side dry run), and the RBAC
//! grants the controller exactly what it uses: what it needs is allowed, the rest refused.

#![allow(clippy::unwrap_used)]

use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::workspace_root;

#[test]
fn manifests_pass_server_dry_run_and_rbac_is_least_privilege() {
    let cp = ControlPlane::shared();
    let deploy = workspace_root().join("deploy");
    let controller = deploy.join("controller.yaml").display().to_string();
    let rbac = deploy.join("rbac.yaml").display().to_string();
    let flowcontrol = deploy.join("flowcontrol.yaml").display().to_string();
    // Namespaced objects cannot be dry-run into a namespace that does not exist yet.
    let _ = cp.kubectl(&["create", "namespace", "edgesync-system"]);
    let out = cp.kubectl_ok(&[
        "apply",
        "--dry-run=server",
        "-f",
        &controller,
        "-f",
        &rbac,
        "-f",
        &flowcontrol,
    ]);
    for kind in [
        "deployment.apps/edgesync-controller",
        "service/edgesync-controller",
        "serviceaccount/edgesync-controller",
        "clusterrole.rbac.authorization.k8s.io/edgesync-controller",
        "poddisruptionbudget.policy/edgesync-controller",
        "prioritylevelconfiguration.flowcontrol.apiserver.k8s.io/edgesync-controller",
        "flowschema.flowcontrol.apiserver.k8s.io/edgesync-controller",
    ] {
        assert!(out.contains(kind), "{kind} missing from dry run:\n{out}");
    }
    // The FlowSchema finds its priority level (the API server marks it Dangling otherwise).
    cp.kubectl_ok(&["apply", "-f", &flowcontrol]);
    let dangling = edgesync_e2e::wait::until_blocking(
        "the FlowSchema's Dangling condition",
        std::time::Duration::from_secs(30),
        || {
            let out = cp.kubectl_ok(&[
                "get",
                "flowschema",
                "edgesync-controller",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Dangling\")].status}",
            ]);
            let status = out.trim().to_owned();
            (!status.is_empty()).then_some(status)
        },
    );
    assert_eq!(dangling, Ok("False".to_owned()));

    cp.kubectl_ok(&["apply", "-f", &rbac]);
    let sa = "system:serviceaccount:edgesync-system:edgesync-controller";
    let can = |verb: &str, resource: &str, ns: &str| {
        let mut args = vec!["auth", "can-i", verb, "--as", sa, "-n", ns];
        match resource.split_once('/') {
            Some((r, sub)) => args.extend([r, "--subresource", sub]),
            None => args.push(resource),
        }
        let out = cp.kubectl(&args);
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    for (verb, resource, ns) in [
        ("watch", "devices.edgesync.io", "plant-a"),
        ("create", "devices.edgesync.io", "plant-a"),
        ("update", "devices.edgesync.io/status", "plant-a"),
        ("patch", "edgenodes.edgesync.io/status", "plant-a"),
        ("update", "edgenodes.edgesync.io/status", "plant-a"),
        ("list", "edgenodes.edgesync.io", "plant-a"),
        ("get", "secrets", "plant-a"),
        ("update", "leases.coordination.k8s.io", "edgesync-system"),
    ] {
        assert!(
            can(verb, resource, ns),
            "the controller needs {verb} {resource} in {ns}"
        );
    }
    for (verb, resource, ns) in [
        ("list", "secrets", "plant-a"),
        ("watch", "secrets", "plant-a"),
        ("update", "devices.edgesync.io", "plant-a"),
        ("delete", "devices.edgesync.io", "plant-a"),
        ("update", "edgenodes.edgesync.io", "plant-a"),
        ("update", "leases.coordination.k8s.io", "plant-a"),
        ("get", "configmaps", "plant-a"),
    ] {
        assert!(
            !can(verb, resource, ns),
            "the controller must not {verb} {resource} in {ns}"
        );
    }
}

/// The agent's systemd unit passes `systemd-analyze verify` with no warning (an unknown key or
/// a misspelt section is only a warning to systemd, and would silently drop a hardening line).
#[test]
fn agent_systemd_unit_verifies_cleanly() {
    let unit =
        std::fs::read_to_string(workspace_root().join("deploy/edgesync-agent.service")).unwrap();
    let agent = edgesync_e2e::agent::agent_binary();
    // verify checks that ExecStart's program exists: point it at the binary just built.
    let unit = unit.replace(
        "/usr/local/bin/edgesync-agent",
        &agent.display().to_string(),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgesync-agent.service");
    std::fs::write(&path, unit).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian's systemd package: apt-get install systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}
