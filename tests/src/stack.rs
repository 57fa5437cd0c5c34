//! The whole path as separate processes: devices -> Mosquitto -> agent -> (fault proxy) ->
//! controller -> kube-apiserver, in a namespace of its own.

use std::path::PathBuf;

use edgesync_crds::Device;
use kube::Api;

use crate::agent::{AgentConfig, spawn_agent};
use crate::cluster::{ControlPlane, TestNamespace};
use crate::controller::{Controller, create_node};
use crate::mosquitto::Mosquitto;
use crate::process::ManagedProcess;
use crate::proxy::FaultProxy;

/// What to vary between end-to-end tests.
#[derive(Debug, Default, Clone)]
pub struct StackOptions {
    /// YAML appended to the EdgeNode spec (two-space indented lines).
    pub node_spec: String,
    /// Extra `edgesync-controller run` options.
    pub controller_args: Vec<String>,
    /// Extra agent TOML (sections).
    pub agent_toml: String,
    /// Run a second controller replica; the proxy spreads connections over both.
    pub two_replicas: bool,
    /// Run the controller with the identity `deploy/` gives it (its ServiceAccount's RBAC
    /// and FlowSchema, see [`ControlPlane::deployed_controller_kubeconfig`]) instead of the
    /// harness's admin, which RBAC never refuses and API Priority and Fairness exempts.
    pub deployed_identity: bool,
}

/// A running end-to-end stack.
pub struct Stack<'a> {
    /// The control plane.
    pub cp: &'a ControlPlane,
    /// The test's namespace.
    pub ns: TestNamespace<'a>,
    /// Node name.
    pub node: String,
    /// The node's token.
    pub token: String,
    /// The controller process.
    pub controller: Controller,
    /// The second replica, with [`StackOptions::two_replicas`].
    pub second: Option<Controller>,
    /// The broker.
    pub broker: Mosquitto,
    /// The fault proxy between agent and controller.
    pub proxy: FaultProxy,
    /// The agent's config (its data dir holds the SQLite database and the log).
    pub agent_config: AgentConfig,
    /// The agent process.
    pub agent: ManagedProcess,
    _dir: tempfile::TempDir,
}

impl<'a> Stack<'a> {
    /// Starts everything and waits until the controller is ready and the agent answers
    /// devices.
    pub async fn start(cp: &'a ControlPlane, hint: &str, opts: StackOptions) -> Stack<'a> {
        let ns = cp.namespace(hint);
        let node = "edge-1".to_owned();
        let token = format!("token-{}", ns.name);
        create_node(cp, &ns.name, &node, &token, &opts.node_spec);
        // A Lease of its own, so this stack's controller leads its liveness loop at once
        // instead of waiting for another test's (possibly killed) controller to expire. The
        // deployed RBAC allows Leases in the controller's own namespace only.
        let (lease_name, lease_namespace) = if opts.deployed_identity {
            (format!("stack-{}", ns.name), "edgesync-system".to_owned())
        } else {
            ("edgesync-stack".to_owned(), ns.name.clone())
        };
        let mut args: Vec<&str> = vec![
            "--lease-name",
            &lease_name,
            "--lease-namespace",
            &lease_namespace,
        ];
        args.extend(opts.controller_args.iter().map(String::as_str));
        let start = |args: &[&str]| {
            if opts.deployed_identity {
                Controller::start_deployed(cp, args)
            } else {
                Controller::start(cp, args)
            }
        };
        let controller = start(&args);
        let second = opts.two_replicas.then(|| start(&args));
        let mut upstreams = vec![controller.addr];
        upstreams.extend(second.as_ref().map(|c| c.addr));
        let proxy = FaultProxy::start_balanced(upstreams).await;
        let broker = Mosquitto::start();
        let dir = tempfile::tempdir().expect("stack temp dir");
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, format!("{token}\n")).expect("write token file");
        let mut agent_config = AgentConfig::new(&dir.path().join("agent"), &broker.url());
        agent_config.node = node.clone();
        agent_config.namespace = ns.name.clone();
        agent_config.cloud = Some((proxy.http_url(), token_file));
        agent_config.extra = opts.agent_toml.clone();
        let agent = spawn_agent(&agent_config);
        // The agent subscribes once it has started: a message published before that finds
        // no subscriber on a fresh broker and is gone. Wait until it answers a device.
        let probe_topic = "edgesync/stack-probe/shadow/#";
        let mut probe =
            crate::device::TestDevice::connect("stack-probe", broker.port(), probe_topic).await;
        probe.wait_for_agent("edgesync", "stack-probe").await;
        drop(probe);
        Stack {
            cp,
            ns,
            node,
            token,
            controller,
            second,
            broker,
            proxy,
            agent_config,
            agent,
            _dir: dir,
        }
    }

    /// The agent's SQLite database.
    pub fn agent_db(&self) -> PathBuf {
        self.agent_config.data_dir.join("edgesync-agent.db")
    }

    /// A Device API for the test namespace.
    pub async fn devices(&self) -> Api<Device> {
        Api::namespaced(self.cp.client().await, &self.ns.name)
    }

    /// Prints the logs of every process of the stack.
    pub fn dump_logs(&self) {
        self.agent.dump_log();
        self.controller.process.dump_log();
        if let Some(c) = &self.second {
            c.process.dump_log();
        }
        self.broker.dump_log();
    }
}

/// Records every `status.reportedVersion` the API server shows for each Device of a namespace,
/// to prove that none ever went backwards.
pub struct VersionObserver {
    seen: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u64>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl VersionObserver {
    /// Starts watching the Devices of `api`'s namespace.
    pub fn start(api: Api<Device>) -> VersionObserver {
        use futures_util::StreamExt as _;
        use kube::runtime::{WatchStreamExt as _, watcher};
        let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
            String,
            Vec<u64>,
        >::new()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            let stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects();
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                let Ok(d) = item else { continue };
                let Some(v) = d.status.and_then(|s| s.reported_version) else {
                    continue;
                };
                let name = d.metadata.name.unwrap_or_default();
                let mut seen = record.lock().expect("observer lock");
                let list = seen.entry(name).or_default();
                if list.last() != Some(&v) {
                    list.push(v);
                }
            }
        });
        VersionObserver { seen, task }
    }

    /// Panics naming the first device whose version ever decreased; returns how many
    /// distinct versions were observed in total.
    pub fn assert_never_regressed(&self) -> usize {
        let seen = self.seen.lock().expect("observer lock");
        for (device, versions) in seen.iter() {
            assert!(
                versions.windows(2).all(|w| w[0] < w[1]),
                "{device}'s reportedVersion went backwards: {versions:?}"
            );
        }
        seen.values().map(Vec::len).sum()
    }
}

impl Drop for VersionObserver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Publishes every `(topic, payload)` at QoS1 from one client and returns once the broker has
/// acknowledged all of them (each is then the broker's responsibility).
pub async fn publish_acked(port: u16, client_id: &str, messages: Vec<(String, String)>) {
    use rumqttc::{AsyncClient, MqttOptions, Packet, QoS};
    let total = messages.len();
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(std::time::Duration::from_secs(30))
        .set_inflight(100);
    let (client, mut el) = AsyncClient::new(opts, 1000);
    let pump = tokio::spawn(async move {
        let mut acked = 0usize;
        while acked < total {
            if let rumqttc::Event::Incoming(Packet::PubAck(_)) =
                el.poll().await.expect("publisher connection")
            {
                acked += 1;
            }
        }
    });
    for (topic, payload) in messages {
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("queue publish");
    }
    tokio::time::timeout(std::time::Duration::from_secs(120), pump)
        .await
        .expect("the broker acknowledges every publish within 120 s")
        .expect("publisher task");
}

/// Waits until every listed Device's `status.reported[key]` equals its expected value.
pub async fn wait_reported(
    api: &Api<Device>,
    key: &str,
    expected: &std::collections::HashMap<String, serde_json::Value>,
    deadline: std::time::Duration,
) {
    crate::wait::until(
        "every Device to show its last published state",
        deadline,
        || async {
            let list = api.list(&Default::default()).await.ok()?;
            let done = list
                .items
                .iter()
                .filter(|d| {
                    let name = d.metadata.name.as_deref().unwrap_or_default();
                    expected.get(name).is_some_and(|want| {
                        d.status
                            .as_ref()
                            .and_then(|s| s.reported.as_ref())
                            .and_then(|r| r.get(key))
                            == Some(want)
                    })
                })
                .count();
            (done == expected.len()).then_some(())
        },
    )
    .await;
}
