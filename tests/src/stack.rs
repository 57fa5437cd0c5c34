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
    /// Starts everything and waits until the controller is ready.
    pub async fn start(cp: &'a ControlPlane, hint: &str, opts: StackOptions) -> Stack<'a> {
        let ns = cp.namespace(hint);
        let node = "edge-1".to_owned();
        let token = format!("token-{}", ns.name);
        create_node(cp, &ns.name, &node, &token, &opts.node_spec);
        let args: Vec<&str> = opts.controller_args.iter().map(String::as_str).collect();
        let controller = Controller::start(cp, &args);
        let proxy = FaultProxy::start(controller.addr).await;
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
        Stack {
            cp,
            ns,
            node,
            token,
            controller,
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
        self.broker.dump_log();
    }
}
