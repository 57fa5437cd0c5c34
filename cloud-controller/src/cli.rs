//! Command line: `edgesync-controller run [OPTIONS]`. `--help` is the reference for every option;
//! each can also be set through the environment variable it names.

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand};

use crate::telemetry::LogFormat;

/// The edgesync cloud controller.
///
/// Receives report batches from edge agents over HTTP, authenticates each node with the token in
/// the Secret its EdgeNode names, writes Device status through a rate-limited, coalescing writer
/// and streams `spec.desired` changes back to the agents. Stateless: run several replicas behind
/// one Service; singleton loops (offline detection) elect a leader through a Lease.
///
/// Kubernetes credentials are found the usual way: `KUBECONFIG`, `~/.kube/config`, or the
/// in-cluster service account.
#[derive(Debug, Parser)]
#[command(name = "edgesync-controller", version)]
pub struct Cli {
    /// Log format: `text` for people, `json` for log collectors. `RUST_LOG` filters (default: info, without kube's own line for each failed request, which the controller logs itself with context).
    #[arg(
        long,
        value_enum,
        default_value = "text",
        global = true,
        env = "EDGESYNC_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the agent API and run the status writer and reconcilers until SIGTERM/SIGINT.
    Run(RunOptions),
}

/// Options of `run`.
#[derive(Debug, Clone, Args)]
pub struct RunOptions {
    /// Address for the agent API and `/healthz`, `/readyz` (and `/metrics`, unless
    /// `--metrics-listen` is set).
    #[arg(long, default_value = "0.0.0.0:8080", env = "EDGESYNC_LISTEN")]
    pub listen: SocketAddr,

    /// Serve `/metrics` (and `/healthz`, `/readyz`) on this address only, plain HTTP, off the
    /// port agents use: scrapers and probes then need no route to the agent API, and agents
    /// cannot read the controller's metrics.
    #[arg(long, env = "EDGESYNC_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Connections served at once on each listener; one more is accepted and closed at once
    /// (counted in edgesync_controller_connections_refused_total). Keep it below the
    /// open-files limit, which the controller raises to its hard limit at start.
    #[arg(long, default_value_t = 4096, env = "EDGESYNC_MAX_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Seconds a client has for a TLS handshake and for each request's headers; an HTTP/1
    /// connection idle between requests is closed after the same time.
    #[arg(long, default_value_t = 10, env = "EDGESYNC_HTTP_HEADER_TIMEOUT_SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub http_header_timeout_seconds: u64,

    /// Seconds a client has to send a report batch's whole body (more: 408).
    #[arg(long, default_value_t = 30, env = "EDGESYNC_HTTP_BODY_TIMEOUT_SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub http_body_timeout_seconds: u64,

    /// Seconds a connection may go without a byte moving either way before it is closed
    /// (desired-state streams send a bookmark every --bookmark-seconds, well within it).
    #[arg(long, default_value_t = 120, env = "EDGESYNC_HTTP_IDLE_TIMEOUT_SECONDS", value_parser = clap::value_parser!(u64).range(2..=86_400))]
    pub http_idle_timeout_seconds: u64,

    /// Request bodies held in memory at once, all nodes together, in bytes. A batch that would
    /// go over it is answered 503 with Retry-After before its body is read.
    #[arg(long, default_value_t = 64 * 1024 * 1024, env = "EDGESYNC_MAX_BODY_BYTES_IN_FLIGHT")]
    pub max_body_bytes_in_flight: usize,

    /// Request bodies held in memory at once for one node, in bytes (part of
    /// `--max-body-bytes-in-flight`), so one node's slow or large bodies cannot hold the whole
    /// budget and have other nodes' batches refused. Over it, that node gets 503 with
    /// Retry-After before its body is read. Bodies larger than this are never admitted.
    #[arg(long, default_value_t = 16 * 1024 * 1024, env = "EDGESYNC_MAX_BODY_BYTES_IN_FLIGHT_PER_NODE", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_body_bytes_in_flight_per_node: usize,

    /// Serve the agent API over TLS with this PEM certificate chain (needs `--tls-key`).
    #[arg(long, env = "EDGESYNC_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key for `--tls-cert`.
    #[arg(long, env = "EDGESYNC_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// Serve the live API (`devicestates.live.edgesync.io`: each Device's newest report, from
    /// memory, fresh within milliseconds) on this address, over HTTPS, to the Kubernetes API
    /// server's aggregation layer (an APIService; see deploy/). Only requests that present the
    /// API server's front-proxy client certificate are served; users are authorised with
    /// SubjectAccessReviews.
    #[arg(long, env = "EDGESYNC_LIVE_LISTEN")]
    pub live_listen: Option<SocketAddr>,

    /// PEM certificate chain of the live API (needs `--live-tls-key-file`). Without one, a
    /// self-signed certificate is made at start: set `insecureSkipTLSVerify` on the
    /// APIService, or give a certificate and put its CA in the APIService's `caBundle`.
    #[arg(
        long,
        env = "EDGESYNC_LIVE_TLS_CERT_FILE",
        requires = "live_tls_key_file"
    )]
    pub live_tls_cert_file: Option<std::path::PathBuf>,

    /// PEM private key for `--live-tls-cert-file`.
    #[arg(
        long,
        env = "EDGESYNC_LIVE_TLS_KEY_FILE",
        requires = "live_tls_cert_file"
    )]
    pub live_tls_key_file: Option<std::path::PathBuf>,

    /// Changes the live API keeps for watches to resume from; a watch further behind is ended
    /// with 410 Gone and lists again (counted in edgesync_controller_live_watches_expired_total).
    #[arg(long, default_value_t = 100_000, env = "EDGESYNC_LIVE_WINDOW_CHANGES", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000_000))]
    pub live_window_changes: usize,

    /// Bytes of replaced states the live watch window may keep (reported documents as JSON);
    /// the oldest changes leave first.
    #[arg(long, default_value_t = 64 * 1024 * 1024, env = "EDGESYNC_LIVE_WINDOW_BYTES", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub live_window_bytes: usize,

    /// Open watches of the live API at once; one more is answered 429.
    #[arg(long, default_value_t = 1000, env = "EDGESYNC_LIVE_MAX_WATCHES", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub live_max_watches: usize,

    /// Seconds a SubjectAccessReview answer for the live API is reused (allowed and denied
    /// alike), as the API server's webhook authoriser does.
    #[arg(long, default_value_t = 10, env = "EDGESYNC_LIVE_AUTHZ_CACHE_SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub live_authz_cache_seconds: u64,

    /// Starting global budget of Kubernetes status writes per second (all nodes, all devices).
    /// Reports beyond it are coalesced: each device is written with its latest state when its
    /// turn comes. The budget then adapts, once a second: it grows while writes wait for it
    /// and the API server answers fast (doubling each second until it first has to shrink,
    /// then by a quarter), is cut by a fifth when writes get slower than
    /// `--write-latency-target-ms`, and halves on a 429 (API Priority and Fairness), a 5xx or
    /// a timeout; always within `--write-qps-min` and `--write-qps-max`.
    #[arg(long, default_value_t = 200.0, env = "EDGESYNC_WRITE_QPS", value_parser = positive_f64)]
    pub write_qps: f64,

    /// A node may switch to a new agent epoch (a reinstalled agent, or a new database) at
    /// most once per this many seconds; a batch with yet another new epoch before that is
    /// answered 429. Each switch costs a read and a write of the EdgeNode.
    #[arg(long, default_value_t = 10, env = "EDGESYNC_AGENT_EPOCH_SWITCH_SECONDS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub agent_epoch_switch_seconds: u64,

    /// Lowest write budget, writes per second.
    #[arg(long, default_value_t = 10.0, env = "EDGESYNC_WRITE_QPS_MIN", value_parser = positive_f64)]
    pub write_qps_min: f64,

    /// Highest write budget, writes per second (equal to `--write-qps-min` for a fixed budget).
    #[arg(long, default_value_t = 1000.0, env = "EDGESYNC_WRITE_QPS_MAX", value_parser = positive_f64)]
    pub write_qps_max: f64,

    /// A status write slower than this is a sign of a saturated API server: when more than a
    /// tenth of a second's writes are, the budget shrinks.
    #[arg(long, default_value_t = 200, env = "EDGESYNC_WRITE_LATENCY_TARGET_MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub write_latency_target_ms: u64,

    /// Writes allowed in a burst above `--write-qps`.
    #[arg(long, default_value_t = 400, env = "EDGESYNC_WRITE_BURST", value_parser = clap::value_parser!(u32).range(1..))]
    pub write_burst: u32,

    /// Status writes in flight at once. More than the API server needs to reach its write
    /// ceiling adds no writes, only queueing in the API server, which every other client's
    /// requests then wait behind: on a 2-core control plane, 8 writes the same as 32 with a
    /// third of the latency for the others.
    #[arg(long, default_value_t = 8, env = "EDGESYNC_WRITE_CONCURRENCY", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub write_concurrency: u32,

    /// How long a batch waits for its reports to become durable before it is answered 429
    /// (the writes continue; the agent's retry then finds them done).
    #[arg(long, default_value_t = 10, env = "EDGESYNC_DURABLE_WAIT_SECONDS", value_parser = clap::value_parser!(u64).range(1..=300))]
    pub durable_wait_seconds: u64,

    /// Shortest time between two status writes of one Device (0: as the write budget
    /// allows). For large fleets: each Device's status then trails its live state (the
    /// live API, `--live-listen`) by up to this long, and the API server's writes are
    /// bounded by devices / interval. Agents that take live answers are not held back;
    /// older agents wait for their reports' writes, up to `--durable-wait-seconds`.
    #[arg(long, default_value_t = 0, env = "EDGESYNC_STATUS_MIN_INTERVAL_SECONDS", value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub status_min_interval_seconds: u64,

    /// Durable versions owed to agents that take live answers, at most (one per device whose
    /// report was answered live and then written, until its node's next answer tells it).
    /// Past it, a write is not told and its agent sends the report again after its timeout.
    #[arg(long, default_value_t = 1_000_000, env = "EDGESYNC_MAX_DURABLE_ACKS", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_durable_acks: usize,

    /// Reports per second per node when its EdgeNode sets no `limits.reportsPerSecond`.
    #[arg(long, default_value_t = 5000, env = "EDGESYNC_NODE_REPORTS_PER_SECOND", value_parser = clap::value_parser!(u32).range(1..))]
    pub node_reports_per_second: u32,

    /// Per-node burst when the EdgeNode sets no `limits.burst`.
    #[arg(long, default_value_t = 10000, env = "EDGESYNC_NODE_BURST", value_parser = clap::value_parser!(u32).range(1..))]
    pub node_burst: u32,

    /// Reports per batch when the EdgeNode sets no `limits.maxReportsPerBatch` (more: 413).
    #[arg(long, default_value_t = 5000, env = "EDGESYNC_MAX_REPORTS_PER_BATCH", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_reports_per_batch: u32,

    /// Largest request body in bytes, after gzip decoding (more: 413).
    #[arg(long, default_value_t = 16 * 1024 * 1024, env = "EDGESYNC_MAX_BODY_BYTES")]
    pub max_body_bytes: usize,

    /// Largest reported state of one device in bytes (more: that report is rejected).
    #[arg(long, default_value_t = 64 * 1024, env = "EDGESYNC_MAX_REPORTED_BYTES")]
    pub max_reported_bytes: usize,

    /// Deepest nesting of a reported state (more: that report is rejected).
    #[arg(long, default_value_t = 16, env = "EDGESYNC_MAX_DEPTH")]
    pub max_depth: usize,

    /// A node is offline (EdgeNode Ready=False, its Devices Online=False) after this many seconds
    /// without a batch, unless its EdgeNode sets `limits.offlineAfterSeconds`.
    #[arg(long, default_value_t = 60, env = "EDGESYNC_OFFLINE_AFTER_SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub offline_after_seconds: u64,

    /// A Device whose InSync condition has been False this many seconds gets a Warning event
    /// (OutOfSync), once per time it falls out of sync.
    #[arg(long, default_value_t = 300, env = "EDGESYNC_OUT_OF_SYNC_EVENT_SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub out_of_sync_event_seconds: u64,

    /// Shortest interval between two EdgeNode status (heartbeat) writes for one node.
    #[arg(long, default_value_t = 5, env = "EDGESYNC_HEARTBEAT_WRITE_SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_write_seconds: u64,

    /// Interval of bookmark lines on idle desired-state streams (agents treat 45 s of silence
    /// as a dead stream).
    #[arg(long, default_value_t = 15, env = "EDGESYNC_BOOKMARK_SECONDS", value_parser = clap::value_parser!(u64).range(1..=40))]
    pub bookmark_seconds: u64,

    /// Seconds an EdgeNode found missing (a request naming an unknown node) is remembered, so
    /// requests for it are answered 401 without asking the API server again.
    #[arg(long, default_value_t = 10, env = "EDGESYNC_UNKNOWN_NODE_CACHE_SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub unknown_node_cache_seconds: u64,

    /// How long a node token read from its Secret is trusted before it is read again. A token
    /// that does not match is re-checked against the Secret at once (at most once a second), so
    /// a rotated token works immediately and the old one stops working within this time.
    #[arg(long, default_value_t = 10, env = "EDGESYNC_TOKEN_CACHE_SECONDS")]
    pub token_cache_seconds: u64,

    /// Namespace of the leader-election Lease (default: the pod's namespace from
    /// `POD_NAMESPACE`, else `default`).
    #[arg(long, env = "EDGESYNC_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// Name of the leader-election Lease.
    #[arg(
        long,
        default_value = "edgesync-controller",
        env = "EDGESYNC_LEASE_NAME"
    )]
    pub lease_name: String,

    /// This replica's identity in the Lease (default: `POD_NAME`, else host name and pid).
    #[arg(long, env = "EDGESYNC_IDENTITY")]
    pub identity: Option<String>,

    /// Split the fleet's EdgeNodes into this many shards, each owned by one replica at a time
    /// through a Lease of its own (`<lease-name>-shard-<n>`, next to the leader Lease);
    /// replicas share the shards fairly and take over a stopped replica's within the Lease
    /// duration (15 s). Every replica of a deployment must use the same number. A replica
    /// serves report batches and desired streams of its own shards' nodes and forwards the
    /// others' to their owner (`--advertise-address`). 0: no shards (every replica serves
    /// every node).
    #[arg(long, default_value_t = 0, env = "EDGESYNC_SHARDS", value_parser = clap::value_parser!(u32).range(0..=4096))]
    pub shards: u32,

    /// With `--shards`: where the other replicas reach this one's agent API to forward
    /// requests for its shards (`host:port`; put in its member Lease). Default: the pod's
    /// address (`POD_IP`) with the `--listen` port, else the `--listen` address itself when
    /// it names one host.
    #[arg(long, env = "EDGESYNC_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,

    /// With `--shards`: requests forwarded to other replicas at once (a desired stream counts
    /// for as long as it is open); more are answered 503 and counted in
    /// `edgesync_controller_forwarded_requests_total{result="busy"}`.
    #[arg(long, default_value_t = 4096, env = "EDGESYNC_MAX_FORWARDS", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub max_forwards: usize,

    /// With `--shards`: how long the owner of a forwarded request's shard has to begin its
    /// answer (a batch answer waits for its reports' writes: keep it above
    /// `--http-body-timeout-seconds` plus `--durable-wait-seconds`).
    #[arg(long, default_value_t = 60, env = "EDGESYNC_FORWARD_TIMEOUT_SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub forward_timeout_seconds: u64,
}

fn positive_f64(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("`{s}` is not a positive number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bad_values_name_the_option() {
        let err = Cli::try_parse_from(["edgesync-controller", "run", "--write-qps", "0"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--write-qps"), "{err}");
        assert!(err.contains("not a positive number"), "{err}");
    }
}
