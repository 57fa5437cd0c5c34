//! A Sparkplug B edge node from an independent implementation (pysparkplug, from PyPI,
//! installed by `hack/ensure-pysparkplug.sh`), driven line by line: the script is
//! `tests/python/sparkplug_edge_node.py`, which lists its commands and events.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::workspace_root;

/// Runs `hack/ensure-pysparkplug.sh` (fast when cached) and returns the environment's python.
///
/// # Panics
/// When the environment cannot be made, with the script's explanation.
pub fn python() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        crate::ensured(
            "hack/ensure-pysparkplug.sh",
            "installs pysparkplug from PyPI into a virtual environment",
        )
    })
    .clone()
}

/// The running edge node.
pub struct EdgeNode {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    /// Every line it printed, for failure messages.
    pub seen: Vec<String>,
}

impl EdgeNode {
    /// Starts edge node `node` of `group` against the broker on loopback `port`, and waits
    /// until it is connected and subscribed to its commands.
    pub async fn start(port: u16, group: &str, node: &str) -> EdgeNode {
        let script = workspace_root().join("tests/python/sparkplug_edge_node.py");
        let mut child = tokio::process::Command::new(python())
            .arg(&script)
            .args([
                "--port",
                &port.to_string(),
                "--group",
                group,
                "--node",
                node,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", script.display()));
        let stdin = child.stdin.take().expect("piped stdin");
        let lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let mut node = EdgeNode {
            child,
            stdin,
            lines,
            seen: Vec::new(),
        };
        node.expect("connected", Duration::from_secs(30)).await;
        node
    }

    /// Sends one command and waits until the script has published it.
    pub async fn send(&mut self, command: &str) {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .expect("edge node stdin");
        let verb = command.split_whitespace().next().unwrap_or_default();
        self.expect(&format!("done {verb}"), Duration::from_secs(20))
            .await;
    }

    /// Waits for a printed line starting with `prefix` and returns it.
    ///
    /// # Panics
    /// When none comes within `deadline`, listing what was printed.
    pub async fn expect(&mut self, prefix: &str, deadline: Duration) -> String {
        let found = tokio::time::timeout(deadline, async {
            while let Ok(Some(line)) = self.lines.next_line().await {
                self.seen.push(line.clone());
                if line.starts_with("error") {
                    return Err(line);
                }
                if line.starts_with(prefix) {
                    return Ok(line);
                }
            }
            Err("the edge node exited".to_owned())
        })
        .await;
        match found {
            Ok(Ok(line)) => line,
            Ok(Err(why)) => panic!("edge node: {why}; it printed {:?}", self.seen),
            Err(_) => panic!(
                "edge node printed no line starting with {prefix:?} within {deadline:?}; it printed {:?}",
                self.seen
            ),
        }
    }

    /// Whether any line printed so far starts with `prefix`.
    pub fn printed(&self, prefix: &str) -> bool {
        self.seen.iter().any(|l| l.starts_with(prefix))
    }
}

impl Drop for EdgeNode {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
