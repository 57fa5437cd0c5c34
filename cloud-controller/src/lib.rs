//! The edgesync cloud controller.
//!
//! | module | job |
//! |---|---|
//! | [`cli`] | command line options |
//! | [`api`] | HTTP API: report batches, desired streams, health, metrics |
//! | [`auth`] | node tokens checked against the EdgeNode's Secret |
//! | [`ratelimit`] | per-node token buckets (429) |
//! | [`cache`] | Device and EdgeNode reflectors |
//! | [`writer`] | coalescing, budgeted, never-regressing Device status writer |
//! | [`heartbeat`] | EdgeNode status from agent heartbeats |
//! | [`desired`] | per-node desired-state fan-out with resumable cursors |
//! | [`liveness`] | leader-only loop: offline nodes, Online/InSync conditions |
//! | [`lease`] | Lease-based leader election |
//! | [`tls`] | optional TLS for the agent API |

pub mod api;
pub mod auth;
pub mod cache;
pub mod cli;
pub mod desired;
pub mod heartbeat;
pub mod lease;
pub mod liveness;
pub mod metrics;
pub mod ratelimit;
pub mod telemetry;
pub mod tls;
pub mod writer;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::cli::RunOptions;

/// Runs the controller until SIGTERM/SIGINT.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let config = kube::Config::infer().await.context(
        "no Kubernetes credentials found: set KUBECONFIG, provide ~/.kube/config, or run in a pod \
         with a service account",
    )?;
    // Watches hold connections open for minutes; request/response calls must fail fast so a
    // stopped API server turns into a quick 503 rather than a hung batch.
    let mut watch_config = config.clone();
    watch_config.connect_timeout = Some(Duration::from_secs(5));
    let watch_client =
        kube::Client::try_from(watch_config).context("building the Kubernetes client")?;
    let mut call_config = config;
    call_config.connect_timeout = Some(Duration::from_secs(3));
    call_config.read_timeout = Some(Duration::from_secs(10));
    call_config.write_timeout = Some(Duration::from_secs(10));
    let client = kube::Client::try_from(call_config).context("building the Kubernetes client")?;

    let shutdown = CancellationToken::new();
    let metrics = Arc::new(metrics::Metrics::default());
    let hub = Arc::new(desired::DesiredHub::new());
    let caches = cache::Caches::start(&watch_client, Arc::clone(&hub), &shutdown);
    let budget = Arc::new(writer::WriteBudget::new(opts.write_qps, opts.write_burst));
    let status_writer = writer::StatusWriter::new(
        client.clone(),
        caches.clone(),
        Arc::clone(&budget),
        Arc::clone(&metrics),
    );
    status_writer.spawn_workers(opts.write_concurrency, &shutdown);

    let leader = Arc::new(AtomicBool::new(false));
    let identity = opts.identity.clone().unwrap_or_else(default_identity);
    let lease_namespace = opts
        .lease_namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or_else(|| "default".to_owned());
    tokio::spawn(lease::run(
        client.clone(),
        lease_namespace,
        opts.lease_name.clone(),
        identity.clone(),
        Arc::clone(&leader),
        shutdown.clone(),
    ));
    let liveness = liveness::Liveness {
        client: client.clone(),
        caches: caches.clone(),
        budget,
        leader: Arc::clone(&leader),
        offline_after: Duration::from_secs(opts.offline_after_seconds),
        metrics: Arc::clone(&metrics),
    };
    tokio::spawn(liveness.run(shutdown.clone()));
    // The leader flag lives in the metrics too.
    {
        let leader = Arc::clone(&leader);
        let metrics = Arc::clone(&metrics);
        let token = shutdown.clone();
        tokio::spawn(async move {
            loop {
                metrics.leader.store(
                    leader.load(std::sync::atomic::Ordering::Relaxed),
                    std::sync::atomic::Ordering::Relaxed,
                );
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
    }

    let state = Arc::new(api::AppState {
        verifier: auth::TokenVerifier::new(
            client.clone(),
            Duration::from_secs(opts.token_cache_seconds),
        ),
        limiter: ratelimit::NodeLimiter::default(),
        heartbeats: heartbeat::Heartbeats::new(
            client.clone(),
            Duration::from_secs(opts.heartbeat_write_seconds),
            Arc::clone(&metrics),
        ),
        writer: status_writer,
        hub,
        caches,
        client,
        metrics,
        shutdown: shutdown.clone(),
        opts: opts.clone(),
    });
    // Certificate problems are start-up errors, before anything listens.
    let tls = match (&opts.tls_cert, &opts.tls_key) {
        (Some(cert), Some(key)) => Some(tls::server_config(cert, key)?),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", opts.listen))?;
    info!(
        listen = %listener.local_addr()?,
        tls = tls.is_some(),
        identity,
        write_qps = opts.write_qps,
        write_burst = opts.write_burst,
        version = env!("CARGO_PKG_VERSION"),
        "edgesync-controller serving"
    );
    let token = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("Shutting down");
        token.cancel();
    });
    let router = api::router(state);
    match tls {
        Some(config) => axum::serve(tls::TlsListener::new(listener, config)?, router)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .await
            .context("HTTPS server failed")?,
        None => axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .await
            .context("HTTP server failed")?,
    }
    // Give the Lease release a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

fn default_identity() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "controller".to_owned());
        format!("{host}-{}", std::process::id())
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
