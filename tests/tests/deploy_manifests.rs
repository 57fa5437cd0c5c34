//! The `deploy/` manifests: the API server accepts them (server-side dry run), and the RBAC
//! grants the controller exactly what it uses: what it needs is allowed, the rest refused.

#![allow(clippy::unwrap_used)]

use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::workspace_root;

/// The tests that apply (or dry-run) the same objects take turns: kubectl's apply reads, then
/// creates, and an object created by the other test in between fails the create.
static APPLYING: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn manifests_pass_server_dry_run_and_rbac_is_least_privilege() {
    let _turn = APPLYING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let cp = ControlPlane::shared();
    let deploy = workspace_root().join("deploy/base");
    let controller = deploy.join("controller.yaml").display().to_string();
    let rbac = deploy.join("rbac.yaml").display().to_string();
    let flowcontrol = deploy.join("flowcontrol.yaml").display().to_string();
    let live = deploy.join("live.yaml").display().to_string();
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
        "-f",
        &live,
    ]);
    for kind in [
        "deployment.apps/edgesync-controller",
        "service/edgesync-controller",
        "serviceaccount/edgesync-controller",
        "clusterrole.rbac.authorization.k8s.io/edgesync-controller",
        "poddisruptionbudget.policy/edgesync-controller",
        "prioritylevelconfiguration.flowcontrol.apiserver.k8s.io/edgesync-controller",
        "flowschema.flowcontrol.apiserver.k8s.io/edgesync-controller",
        "service/edgesync-live",
        "apiservice.apiregistration.k8s.io/v1alpha1.live.edgesync.io",
        "clusterrole.rbac.authorization.k8s.io/edgesync-devicestates-reader",
        "clusterrolebinding.rbac.authorization.k8s.io/edgesync-controller-auth-delegator",
        "rolebinding.rbac.authorization.k8s.io/edgesync-controller-authentication-reader",
    ] {
        assert!(out.contains(kind), "{kind} missing from dry run:\n{out}");
    }
    // The FlowSchema finds its priority level (the API server marks it Dangling otherwise).
    cp.kubectl_ok(&["apply", "-f", &flowcontrol]);
    assert_eq!(cp.flowschema_dangling("edgesync-controller"), "False");

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
        // The shard labels (--shards).
        ("patch", "devices.edgesync.io", "plant-a"),
        ("patch", "edgenodes.edgesync.io", "plant-a"),
        // DeviceRollouts: read, status, and spec.paused at a pause step.
        ("list", "devicerollouts.edgesync.io", "plant-a"),
        ("patch", "devicerollouts.edgesync.io", "plant-a"),
        ("update", "devicerollouts.edgesync.io/status", "plant-a"),
        ("get", "secrets", "plant-a"),
        ("update", "leases.coordination.k8s.io", "edgesync-system"),
        ("watch", "leases.coordination.k8s.io", "edgesync-system"),
        // The replicas' peer token (--shards with --live-listen), next to the Leases.
        ("create", "secrets", "edgesync-system"),
        ("create", "events.events.k8s.io", "plant-a"),
        ("patch", "events.events.k8s.io", "plant-a"),
        // The live API's delegated authorisation.
        (
            "create",
            "subjectaccessreviews.authorization.k8s.io",
            "plant-a",
        ),
    ] {
        assert!(
            can(verb, resource, ns),
            "the controller needs {verb} {resource} in {ns}"
        );
    }
    // The front proxy's settings, by name (not the other ConfigMaps of kube-system).
    let settings = cp.kubectl(&[
        "auth",
        "can-i",
        "get",
        "configmaps/extension-apiserver-authentication",
        "--as",
        sa,
        "-n",
        "kube-system",
    ]);
    assert_eq!(String::from_utf8_lossy(&settings.stdout).trim(), "yes");
    for (verb, resource, ns) in [
        ("list", "secrets", "plant-a"),
        ("watch", "secrets", "plant-a"),
        ("create", "secrets", "plant-a"),
        ("update", "devices.edgesync.io", "plant-a"),
        ("delete", "devices.edgesync.io", "plant-a"),
        ("update", "edgenodes.edgesync.io", "plant-a"),
        ("create", "devicerollouts.edgesync.io", "plant-a"),
        ("delete", "devicerollouts.edgesync.io", "plant-a"),
        ("update", "leases.coordination.k8s.io", "plant-a"),
        ("get", "configmaps", "plant-a"),
        ("get", "configmaps", "kube-system"),
        ("delete", "events.events.k8s.io", "plant-a"),
        ("list", "events.events.k8s.io", "plant-a"),
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

/// `kubectl apply -k deploy/` and its overlays: kustomize builds them, the API server accepts
/// them (server-side dry run), and each overlay sets what it promises.
#[test]
fn kustomize_base_and_overlays_build_and_pass_server_dry_run() {
    let _turn = APPLYING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let cp = ControlPlane::shared();
    let _ = cp.kubectl(&["create", "namespace", "edgesync-system"]);
    let dir = |d: &str| workspace_root().join(d).display().to_string();
    for (overlay, replicas) in [
        ("deploy", 2),
        ("deploy/overlays/single", 1),
        ("deploy/overlays/ha", 3),
    ] {
        let built = cp.kubectl_ok(&["kustomize", &dir(overlay)]);
        assert!(
            built.contains(&format!("replicas: {replicas}\n")),
            "{overlay}: {replicas} replicas:\n{built}"
        );
        assert_eq!(
            built.contains("kind: PodDisruptionBudget"),
            replicas > 1,
            "{overlay}: a PodDisruptionBudget only with more than one replica"
        );
        assert_eq!(
            built.contains("topologySpreadConstraints"),
            overlay.ends_with("ha"),
            "{overlay}"
        );
        let out = cp.kubectl_ok(&["apply", "--dry-run=server", "-k", &dir(overlay)]);
        assert!(
            out.contains("deployment.apps/edgesync-controller"),
            "{overlay} dry run:\n{out}"
        );
    }
    let monitoring = cp.kubectl_ok(&["kustomize", &dir("deploy/monitoring")]);
    assert!(monitoring.contains("kind: PrometheusRule"), "{monitoring}");
    assert!(
        monitoring.contains("grafana_dashboard: \"1\""),
        "{monitoring}"
    );
}

/// Every metric the alerts and the dashboard query is one the binaries export: a renamed
/// metric would otherwise leave an alert that can never fire. Both binaries' `/metrics` pass
/// `promtool check metrics` (Prometheus' own parser and linter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_and_dashboard_query_only_metrics_the_binaries_export() {
    use edgesync_e2e::agent::{AgentConfig, metrics, spawn_agent};
    use edgesync_e2e::controller::Controller;
    let cp = ControlPlane::shared();
    let controller = Controller::start(cp, &[]);
    let dir = tempfile::tempdir().unwrap();
    let http = edgesync_e2e::free_port();
    let mut config = AgentConfig::embedded(dir.path(), edgesync_e2e::free_port());
    config.http_port = Some(http);
    let _agent = spawn_agent(&config);
    let agent_text = edgesync_e2e::wait::until(
        "the agent serves /metrics",
        std::time::Duration::from_secs(30),
        || async move {
            let m = metrics(http);
            m.contains("edgesync_agent_").then_some(m)
        },
    )
    .await;
    let controller_text = controller.metrics().await;
    promtool_check_metrics("edgesync-controller", &controller_text);
    // The agent helper returns the whole HTTP response.
    let agent_body = agent_text
        .split_once("\r\n\r\n")
        .map_or(agent_text.as_str(), |(_, body)| body);
    promtool_check_metrics("edgesync-agent", agent_body);
    let exported: std::collections::BTreeSet<String> = [controller_text, agent_text]
        .iter()
        .flat_map(|text| text.lines().map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|l| {
            let mut words = l.strip_prefix("# TYPE ")?.split_whitespace();
            Some((words.next()?.to_owned(), words.next()?.to_owned()))
        })
        .flat_map(|(name, kind)| {
            // The sample names of each OpenMetrics family.
            match kind.as_str() {
                "counter" => vec![format!("{name}_total")],
                "histogram" => ["_bucket", "_sum", "_count"]
                    .map(|s| format!("{name}{s}"))
                    .to_vec(),
                _ => vec![name],
            }
        })
        .collect();
    let monitoring = workspace_root().join("deploy/monitoring");
    let rules = std::fs::read_to_string(monitoring.join("prometheusrule.yaml")).unwrap();
    let dashboard = std::fs::read_to_string(monitoring.join("edgesync-dashboard.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    assert!(
        parsed["panels"].as_array().is_some_and(|p| p.len() > 5),
        "the dashboard has panels"
    );
    let mut queried = std::collections::BTreeSet::new();
    for text in [&rules, &dashboard] {
        for (i, _) in text.match_indices("edgesync_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if name.starts_with("edgesync_agent_") || name.starts_with("edgesync_controller_") {
                queried.insert(name);
            }
        }
    }
    assert!(queried.len() > 20, "queried: {queried:?}");
    let missing: Vec<_> = queried.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "queried but not exported: {missing:?}\nexported: {exported:?}"
    );
}

/// Prometheus' own checker, built from the Go module proxy.
fn promtool() -> std::path::PathBuf {
    edgesync_e2e::ensured(
        "hack/ensure-promtool.sh",
        "builds promtool with Go from the Go module proxy",
    )
}

/// `promtool check metrics` accepts `text` (an OpenMetrics scrape of `who`): it parses and
/// lints it.
///
/// promtool reads only the Prometheus text format (prometheus/prometheus#8932), which differs
/// from OpenMetrics in two ways that matter here: a counter's HELP and TYPE name the samples
/// (`x_total`) rather than the family (`x`), and there is no `# EOF`. Those are rewritten;
/// everything else (names, help, labels, values, histogram buckets) is checked as served.
fn promtool_check_metrics(who: &str, text: &str) {
    assert!(
        text.ends_with("# EOF\n"),
        "{who}'s /metrics is not a complete OpenMetrics exposition:\n{text}"
    );
    let counters: std::collections::BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let text: String = text
        .lines()
        .filter(|l| *l != "# EOF")
        .map(|l| {
            for prefix in ["# HELP ", "# TYPE "] {
                if let Some((name, rest)) = l.strip_prefix(prefix).and_then(|r| r.split_once(' '))
                    && counters.contains(name)
                {
                    return format!("{prefix}{name}_total {rest}\n");
                }
            }
            format!("{l}\n")
        })
        .collect();
    use std::io::Write as _;
    let mut child = std::process::Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics refuses {who}'s /metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// promtool accepts every alert rule.
#[test]
fn alert_rules_pass_promtool() {
    let promtool = promtool();
    let rule =
        std::fs::read_to_string(workspace_root().join("deploy/monitoring/prometheusrule.yaml"))
            .unwrap();
    // A PrometheusRule's spec is a Prometheus rules file, indented under `spec:`.
    let (_, spec) = rule
        .split_once("\nspec:\n")
        .expect("the PrometheusRule has a spec");
    let rules: String = spec
        .lines()
        .map(|l| format!("{}\n", l.strip_prefix("  ").unwrap_or(l)))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.yaml");
    std::fs::write(&file, rules).unwrap();
    let out = std::process::Command::new(promtool)
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check rules:\n{text}");
    assert!(text.contains("SUCCESS: 17 rules found"), "{text}");
}
