//! The command line, following kubectl's conventions: `-n`, `-A`, `--context`, `-o`.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// kubectl edgesync: watch and steer an edgesync fleet from kubectl.
///
/// Installed as `kubectl-edgesync` on the PATH, it runs as `kubectl edgesync ...`. It uses
/// the kubeconfig kubectl uses (KUBECONFIG or ~/.kube/config). Exit codes: 0 success, 1 an
/// error (not found, refused, timed out), 2 bad usage.
#[derive(Debug, Parser)]
#[command(name = "kubectl edgesync", version, about, long_about)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub struct Global {
    /// The kubeconfig context to use (default: the current one).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// The namespace (default: the context's, else "default").
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// Output format: a table (default), wide (more columns), json or yaml.
    #[arg(short = 'o', long, global = true, value_enum)]
    pub output: Option<Output>,
}

/// `-o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// More columns.
    Wide,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fleet summary per namespace and edge node: Ready, devices Online and In-Sync, pending
    /// reports, the oldest pending report's age, the last heartbeat.
    Status {
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// One device's desired, reported and delta side by side, one row per value; or, with
    /// --where or -l, the live state of every matching device (from the controller's live
    /// API, devicestates.live.edgesync.io), with the values the query names.
    Get {
        /// The Device name.
        #[arg(required_unless_present_any = ["where_", "selector"], conflicts_with_all = ["where_", "selector"])]
        device: Option<String>,
        /// Comparisons on numeric reported values, all of which must hold:
        /// 'temperature>80', 'pressure<=2.5,motor.rpm>=1000' (>, >=, <, <=, ==, !=).
        #[arg(long = "where", value_name = "EXPR")]
        where_: Option<String>,
        /// A label selector on the Devices' labels, as kubectl's -l.
        #[arg(short = 'l', long)]
        selector: Option<String>,
    },
    /// Sets desired values (merge-patches spec.desired), then follows the Device until it is
    /// In-Sync, or until the device refuses them (exit code 1, with the device's reason).
    /// VALUE is JSON when it parses as JSON (5, true, "on", {"a":1}), else a string;
    /// KEY may be a dotted path (motor.speed=1500); KEY=null removes the key.
    Set {
        /// The Device name.
        device: String,
        /// KEY=VALUE pairs.
        #[arg(required = true, value_name = "KEY=VALUE")]
        values: Vec<String>,
        /// How long to follow the Device before giving up (exit code 1).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
        /// Patch and return at once, without following the Device.
        #[arg(long)]
        no_wait: bool,
    },
    /// DeviceRollouts (kubectl get dro): a staged change of many Devices' desired state.
    Rollout {
        #[command(subcommand)]
        action: RolloutAction,
    },
    /// Follows a device's status: one line per change (version, time, Online, In-Sync,
    /// reported state), until interrupted.
    Tail {
        /// The Device name.
        device: String,
        /// Stop after this many changes (default: never).
        #[arg(long)]
        count: Option<usize>,
    },
}

/// What to do with a DeviceRollout.
#[derive(Debug, Subcommand)]
pub enum RolloutAction {
    /// Phase, step, devices patched, In-Sync and failed, and the failures with the devices'
    /// reasons. With -w, one line per change until it ends: exit code 0 when Complete, 1 when
    /// Halted or Aborted.
    Status {
        /// The DeviceRollout name.
        name: String,
        /// Follow it until it ends.
        #[arg(short = 'w', long)]
        watch: bool,
        /// With -w, how long to follow before giving up (exit code 1).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Stops patching further devices (spec.paused=true); the devices already patched go on.
    Pause {
        /// The DeviceRollout name.
        name: String,
    },
    /// Goes on after a pause, whether from `pause` or from a step with `pause: true`.
    Resume {
        /// The DeviceRollout name.
        name: String,
    },
    /// Ends the rollout (spec.abort=true): no further device is patched, and with
    /// revertOnFailure the patched ones get their previous values back.
    Abort {
        /// The DeviceRollout name.
        name: String,
    },
}

/// `90s`, `2m`, `500ms` or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("not a duration: {s:?} (e.g. 90s, 2m)"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("unknown unit in {s:?}: use ms, s, m or h")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3d").is_err());
    }

    #[test]
    fn the_cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
