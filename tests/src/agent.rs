//! Running the edge agent in tests: config files, the release binary as a process (for
//! kill -9), and helpers to read its shadows.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::process::{ManagedProcess, ProcessSpec};

/// A minimal agent config for tests.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Node name.
    pub node: String,
    /// Namespace.
    pub namespace: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Broker URL (ignored when `embedded_port` is set).
    pub mqtt_url: String,
    /// Run the agent's embedded broker on this loopback port instead.
    pub embedded_port: Option<u16>,
    /// Controller URL and token file, if any.
    pub cloud: Option<(String, PathBuf)>,
    /// Extra TOML appended verbatim (sections such as `[uplink]`).
    pub extra: String,
    /// `cloud.ca_file`, for an https:// controller with a private CA.
    pub cloud_ca: Option<PathBuf>,
    /// Serve `/metrics` and the health endpoints on this loopback port (off by default).
    pub http_port: Option<u16>,
    /// Extra keys for the `[mqtt]` section.
    pub mqtt_extra: String,
    /// `RUST_LOG` for the agent process.
    pub log_filter: String,
    /// The address the embedded broker and the HTTP endpoint bind to (`0.0.0.0` inside an
    /// emulated machine, whose ports the host reaches through forwarding).
    pub listen_host: String,
    /// Extra environment variables for the agent process.
    pub env: Vec<(String, String)>,
}

impl AgentConfig {
    /// A config for `node` in `data_dir` against the broker at `mqtt_url`.
    pub fn new(data_dir: &Path, mqtt_url: &str) -> Self {
        Self {
            node: "edge-1".into(),
            namespace: "plant-a".into(),
            data_dir: data_dir.to_owned(),
            mqtt_url: mqtt_url.to_owned(),
            embedded_port: None,
            cloud: None,
            extra: String::new(),
            cloud_ca: None,
            http_port: None,
            mqtt_extra: String::new(),
            log_filter: "info".into(),
            listen_host: "127.0.0.1".into(),
            env: Vec::new(),
        }
    }

    /// A config for an agent running its embedded broker on loopback `port`.
    pub fn embedded(data_dir: &Path, port: u16) -> Self {
        Self {
            embedded_port: Some(port),
            ..Self::new(data_dir, "")
        }
    }

    /// The TOML text.
    pub fn to_toml(&self) -> String {
        let mqtt = match self.embedded_port {
            Some(port) => format!("embedded = true\nlisten = \"{}:{port}\"", self.listen_host),
            None => format!("url = \"{}\"", self.mqtt_url),
        };
        let mqtt = format!("{mqtt}\n{}", self.mqtt_extra);
        let mut s = format!(
            "node = \"{}\"\nnamespace = \"{}\"\ndata_dir = \"{}\"\n\n[mqtt]\n{mqtt}\n\n[[ingest]]\ntopic = \"factory/{{device}}/state\"\n\n[http]\nlisten = \"{}\"\n\n",
            self.node,
            self.namespace,
            self.data_dir.display(),
            self.http_port
                .map(|p| format!("{}:{p}", self.listen_host))
                .unwrap_or_default(),
        );
        if let Some((url, token_file)) = &self.cloud {
            s.push_str(&format!(
                "[cloud]\nurl = \"{url}\"\ntoken_file = \"{}\"\nrequest_timeout_secs = 5\n",
                token_file.display()
            ));
            if let Some(ca) = &self.cloud_ca {
                s.push_str(&format!("ca_file = \"{}\"\n", ca.display()));
            }
            s.push('\n');
        }
        s.push_str(&self.extra);
        s
    }

    /// Writes the config to `<data_dir>/agent.toml` and returns its path.
    pub fn write(&self) -> PathBuf {
        std::fs::create_dir_all(&self.data_dir).expect("create data dir");
        let path = self.data_dir.join("agent.toml");
        std::fs::write(&path, self.to_toml()).expect("write agent config");
        path
    }
}

/// Path of the release agent binary, building it once per test binary if needed.
/// `EDGESYNC_AGENT_BIN` runs a given binary instead (a profiling build, a wrapper script).
pub fn agent_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match std::env::var_os("EDGESYNC_AGENT_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => crate::release_binary("edgesync-agent", "edgesync-agent", "agent"),
    })
    .clone()
}

/// Starts the agent binary with `config`, logging into the config's data dir.
pub fn spawn_agent(config: &AgentConfig) -> ManagedProcess {
    let path = config.write();
    let mut spec = ProcessSpec::new("edgesync-agent", agent_binary())
        .arg("run")
        .arg("--config")
        .arg(path.as_os_str())
        .env("RUST_LOG", &config.log_filter);
    for (k, v) in &config.env {
        spec = spec.env(k, v);
    }
    ManagedProcess::spawn(spec, &config.data_dir)
}

/// The agent's Prometheus text from `/metrics` on loopback `port` (empty when unreachable).
pub fn metrics(port: u16) -> String {
    http_get(port, "/metrics")
}

/// The value of the unlabelled metric `name` on the agent's loopback `port`.
pub fn metric(port: u16, name: &str) -> Option<f64> {
    metrics(port).lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|v| v.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// The whole HTTP response (status line, headers, body) of `GET path` on the agent's loopback
/// `port`; empty when unreachable.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}
