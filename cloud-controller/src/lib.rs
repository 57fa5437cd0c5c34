//! The edgesync cloud controller.
//!
//! | module | job |
//! |---|---|
//! | [`cli`] | command line options |
//! | [`api`] | HTTP API: report batches, desired streams, health, metrics |
//! | [`auth`] | node tokens checked against the EdgeNode's Secret |
//! | [`lookups`] | negative cache and budget for EdgeNodes missing from the cache |
//! | [`ratelimit`] | per-node token buckets (429) |
//! | [`cache`] | Device and EdgeNode reflectors |
//! | [`writer`] | coalescing, budgeted, never-regressing Device status writer |
//! | [`budget`] | the global write budget, adapted to the API server's answers |
//! | [`stamp`] | a report's `(epoch generation, version)` and how it compares with a status |
//! | [`epoch`] | a node's agent epochs: the current one, retired ones, the switch |
//! | [`durable`] | durable versions owed to agents answered live |
//! | [`device_status`] | what a report writes into a Device's status and conditions |
//! | [`heartbeat`] | EdgeNode status from agent heartbeats |
//! | [`events`] | Kubernetes Events on Devices and EdgeNodes, paced per object |
//! | [`desired`] | per-node desired-state fan-out with resumable cursors |
//! | [`liveness`] | leader-only loop: offline nodes, Online/InSync conditions |
//! | [`lease`] | Lease-based leader election |
//! | [`live`] | live device state: the `devicestates` aggregated API |
//! | [`rollout`] | leader-only loop: DeviceRollouts, desired-state changes in waves with halt and revert |
//! | [`shard`] | scale-out: shards and their Leases, requests forwarded to owners, shard labels |
//! | [`server`] | connections: cap, header and idle timeouts, graceful drain |
//! | [`tls`] | TLS server configuration for the agent API |

pub mod api;
pub mod auth;
pub mod budget;
pub mod cache;
pub mod cli;
pub mod desired;
pub mod device_status;
pub mod doc;
pub mod durable;
pub mod epoch;
pub mod events;
pub mod heartbeat;
pub mod lease;
pub mod live;
pub mod liveness;
pub mod lookups;
pub mod metrics;
pub mod ratelimit;
pub mod rollout;
pub mod server;
pub mod shard;
pub mod stamp;
pub mod telemetry;
pub mod tls;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
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

    let max_connections = connection_cap(&opts, raise_open_files_limit());
    let shutdown = CancellationToken::new();
    // Every task the controller starts, so shutdown can wait for all of them.
    let tasks = TaskTracker::new();
    let metrics = Arc::new(metrics::Metrics::new());
    let hub = Arc::new(desired::DesiredHub::new());
    // Names this process in live answers and live resource versions.
    let incarnation = fastrand::u64(..);
    let live = opts.live_listen.map(|_| {
        let live = Arc::new(live::state::Live::new(
            opts.live_window_changes,
            opts.live_window_bytes,
            incarnation,
        ));
        metrics.watch_live(Arc::clone(&live));
        live
    });
    let identity = opts.identity.clone().unwrap_or_else(default_identity);
    // With shards: which this replica owns (through their Leases, run below), and the caches
    // hold only those.
    let shards =
        (opts.shards > 0).then(|| Arc::new(shard::leases::Shards::new(opts.shards, &identity)));
    let labeller = shards
        .as_ref()
        .map(|s| Arc::new(shard::labeller::Labeller::new(s.count())));
    let scope = match (&shards, &labeller) {
        (Some(shards), Some(labeller)) => cache::Scope::Shards {
            shards: Arc::clone(shards),
            labeller: Arc::clone(labeller),
        },
        _ => cache::Scope::All,
    };
    let caches = cache::Caches::start(
        &watch_client,
        scope,
        Arc::clone(&hub),
        live.clone(),
        &shutdown,
        &tasks,
    );
    let budget = Arc::new(budget::WriteBudget::new(
        opts.write_qps,
        opts.write_burst,
        budget::Bounds {
            min: opts.write_qps_min,
            max: opts.write_qps_max.max(opts.write_qps_min),
            latency_target: Duration::from_millis(opts.write_latency_target_ms),
        },
    ));
    metrics.watch_budget(Arc::clone(&budget));
    let status_writer = writer::StatusWriter::new(
        client.clone(),
        caches.clone(),
        Arc::clone(&budget),
        Arc::clone(&metrics),
        Duration::from_secs(opts.status_min_interval_seconds),
    );
    // The writers outlive the servers' drain: a batch in flight at SIGTERM (a rolling
    // restart) is still written and answered, not left waiting for writers that are gone.
    let writers_stop = CancellationToken::new();
    status_writer.spawn_workers(opts.write_concurrency, &writers_stop, &tasks);

    let leader = Arc::new(lease::Leadership::default());
    if let Some(labeller) = &labeller {
        tasks.spawn(
            shard::labeller::Labelling {
                labeller: Arc::clone(labeller),
                client: client.clone(),
                watch_client: watch_client.clone(),
                budget: Arc::clone(&budget),
                leader: Arc::clone(&leader),
                metrics: Arc::clone(&metrics),
            }
            .run(shutdown.clone()),
        );
    }
    // Ends once every handle is dropped: the API state's and the liveness loop's.
    let (events, events_task) =
        events::Events::new(client.clone(), Some(identity.clone()), Arc::clone(&metrics));
    tasks.spawn(events_task);
    let lease_namespace = opts
        .lease_namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or_else(|| "default".to_owned());
    tasks.spawn(lease::run(
        client.clone(),
        lease_namespace.clone(),
        opts.lease_name.clone(),
        identity.clone(),
        Arc::clone(&leader),
        shutdown.clone(),
    ));
    let liveness = liveness::Liveness {
        client: client.clone(),
        caches: caches.clone(),
        budget: Arc::clone(&budget),
        leader: Arc::clone(&leader),
        shards: shards.clone(),
        offline_after: Duration::from_secs(opts.offline_after_seconds),
        out_of_sync_after: Duration::from_secs(opts.out_of_sync_event_seconds),
        metrics: Arc::clone(&metrics),
        events: events.clone(),
        out_of_sync_seen: std::sync::Mutex::default(),
    };
    tasks.spawn(liveness.run(shutdown.clone()));
    tasks.spawn(
        rollout::reconcile::Rollouts {
            client: client.clone(),
            caches: caches.clone(),
            sharded: shards.is_some(),
            budget: Arc::clone(&budget),
            leader: Arc::clone(&leader),
            events: events.clone(),
            metrics: Arc::clone(&metrics),
        }
        .run(shutdown.clone()),
    );
    metrics.watch_leadership(Arc::clone(&leader));
    metrics.watch_caches(caches.clone());

    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", opts.listen))?;
    // With shards: which this replica owns (through their Leases), and the way to the others.
    let sharding = if let Some(shards) = shards {
        let address = advertise_address(&opts, listener.local_addr()?)?;
        metrics.watch_shards(Arc::clone(&shards));
        tasks.spawn(shard::leases::run(
            client.clone(),
            shard::leases::Group {
                namespace: lease_namespace.clone(),
                name: opts.lease_name.clone(),
                identity: identity.clone(),
                address: Some(address),
            },
            Arc::clone(&shards),
            Arc::clone(&metrics),
            shutdown.clone(),
        ));
        let forwarder = shard::forward::Forwarder::new(
            &identity,
            opts.tls_cert.as_deref().zip(opts.tls_key.as_deref()),
            opts.max_forwards,
            Duration::from_secs(opts.forward_timeout_seconds),
            Arc::clone(&metrics),
        )?;
        Some(api::Sharding {
            shards,
            forwarder: Arc::new(forwarder),
        })
    } else {
        None
    };
    // The live API's watches, counted together with the other replicas' watches of this one.
    let live_watches = Arc::new(tokio::sync::Semaphore::new(opts.live_max_watches));
    // With shards and the live API: reads merged from every replica, and the internal routes
    // the others read this one's part on, both behind the group's peer token.
    let (fleet, peer_api) = match (&sharding, &live) {
        (Some(sh), Some(live)) => {
            let token = shard::peer_token::get_or_create(
                client.clone(),
                &lease_namespace,
                &opts.lease_name,
            )
            .await?;
            let fleet = live::fleet::Fleet::new(
                Arc::clone(live),
                Arc::clone(&sh.shards),
                Arc::clone(&sh.forwarder),
                &token,
            );
            let peer_api = live::peer::PeerApi {
                live: Arc::clone(live),
                shards: Arc::clone(&sh.shards),
                token,
                watches: Arc::clone(&live_watches),
                metrics: Arc::clone(&metrics),
                shutdown: shutdown.clone(),
            };
            (Some(Arc::new(fleet)), Some(Arc::new(peer_api)))
        }
        _ => (None, None),
    };
    let (client_for_live, metrics_for_live, caches_for_live) =
        (client.clone(), Arc::clone(&metrics), caches.clone());
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
            tasks.clone(),
            events.clone(),
        ),
        events,
        lookups: lookups::NodeLookups::new(Duration::from_secs(opts.unknown_node_cache_seconds)),
        epochs: epoch::NodeEpochs::new(
            client.clone(),
            Duration::from_secs(opts.agent_epoch_switch_seconds),
            Arc::clone(&metrics),
        ),
        bodies: api::BodyBudget::new(
            opts.max_body_bytes_in_flight,
            opts.max_body_bytes_in_flight_per_node,
        ),
        tasks: tasks.clone(),
        auth_log: std::sync::Mutex::new(edgesync_protocol::rate::LogThrottle::new(
            Duration::from_secs(10),
        )),
        writer: status_writer,
        hub,
        live: live.clone(),
        durable: Arc::new(durable::DurableAcks::new(opts.max_durable_acks)),
        incarnation: format!("{incarnation:016x}"),
        sharding,
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
    let live_api = match (opts.live_listen, &live) {
        (Some(addr), Some(live)) => Some(
            live::serve::prepare(
                addr,
                &opts,
                client_for_live,
                live::serve::Serving {
                    live: Arc::clone(live),
                    metrics: Arc::clone(&metrics_for_live),
                    shutdown: shutdown.clone(),
                    ready: Box::new(move || caches_for_live.is_ready()),
                    watches: live_watches,
                    fleet,
                },
            )
            .await?,
        ),
        _ => None,
    };
    let metrics_listener = match opts.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--metrics-listen)"))?,
        ),
        None => None,
    };
    info!(
        listen = %listener.local_addr()?,
        metrics_listen = ?opts.metrics_listen,
        live_listen = ?live_api.as_ref().and_then(|l| l.listener.local_addr().ok()),
        tls = tls.is_some(),
        identity,
        write_qps = opts.write_qps,
        write_qps_min = opts.write_qps_min,
        write_qps_max = opts.write_qps_max,
        write_burst = opts.write_burst,
        version = env!("CARGO_PKG_VERSION"),
        "edgesync-controller serving"
    );
    let token = shutdown.clone();
    tasks.spawn(async move {
        tokio::select! {
            _ = wait_for_signal() => info!("Shutting down"),
            _ = token.cancelled() => {}
        }
        token.cancel();
    });
    let limits = server::Limits {
        max_connections,
        header_timeout: Duration::from_secs(opts.http_header_timeout_seconds),
        idle_timeout: Duration::from_secs(opts.http_idle_timeout_seconds),
        drain: SHUTDOWN_DRAIN,
    };
    let mut servers = tokio::task::JoinSet::new();
    if let Some(l) = metrics_listener {
        servers.spawn(server::serve(
            l,
            None,
            api::ops_router(Arc::clone(&state)),
            limits.clone(),
            Arc::clone(&state.metrics),
            shutdown.clone(),
        ));
    }
    if let Some(l) = live_api {
        servers.spawn(server::serve(
            l.listener,
            Some(l.tls),
            l.router,
            limits.clone(),
            Arc::clone(&state.metrics),
            shutdown.clone(),
        ));
    }
    let mut router = api::router(Arc::clone(&state), opts.metrics_listen.is_none());
    if let Some(peer_api) = peer_api {
        router = router.merge(live::peer::router(peer_api));
    }
    servers.spawn(server::serve(
        listener,
        tls,
        router,
        limits,
        Arc::clone(&state.metrics),
        shutdown.clone(),
    ));
    // A server that stops on its own (it should not) takes the controller down with it.
    if servers.join_next().await.is_some() {
        shutdown.cancel();
    }
    while servers.join_next().await.is_some() {}
    writers_stop.cancel();
    drop(state);
    // The Lease is released, watches and writers stop, heartbeat writes finish.
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_DRAIN, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = tasks.len(),
            "Some tasks did not stop within the shutdown deadline"
        );
    }
    info!("Stopped");
    Ok(())
}

/// How long open connections, then the remaining tasks, get to finish at shutdown.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(10);

/// Raises the soft open-files limit to the hard one (systemd and containerd start services
/// at 1,024); returns the limit in effect.
fn raise_open_files_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(soft) => Some(soft),
        Err(e) => {
            tracing::warn!(error = %e, "Could not raise the open-files limit");
            None
        }
    }
}

/// Files kept free of connections: the API client, watches, logs, the listeners.
const RESERVED_FILES: u64 = 256;

/// `--max-connections`, lowered to fit the open-files limit: past that limit `accept` fails
/// and every client waits, instead of one more being closed at once and counted.
fn connection_cap(opts: &RunOptions, open_files: Option<u64>) -> usize {
    let listeners =
        1 + u64::from(opts.metrics_listen.is_some()) + u64::from(opts.live_listen.is_some());
    let wanted = u64::from(opts.max_connections);
    let Some(files) = open_files else {
        return wanted as usize;
    };
    let fits = files.saturating_sub(RESERVED_FILES) / listeners;
    if fits < wanted {
        tracing::warn!(
            open_files = files,
            max_connections = wanted,
            using = fits.max(1),
            "The open-files limit is too low for --max-connections: serving fewer connections; raise LimitNOFILE (or ulimit -n) to serve more"
        );
        return fits.max(1) as usize;
    }
    tracing::debug!(
        open_files = files,
        max_connections = wanted,
        "Open-files limit"
    );
    wanted as usize
}

/// `--advertise-address`, or the pod's address with the bound port, or the bound address
/// when it names one host.
fn advertise_address(opts: &RunOptions, bound: std::net::SocketAddr) -> anyhow::Result<String> {
    if let Some(a) = &opts.advertise_address {
        return Ok(a.clone());
    }
    if let Ok(ip) = std::env::var("POD_IP") {
        let ip: std::net::IpAddr = ip
            .trim()
            .parse()
            .with_context(|| format!("POD_IP `{ip}` is not an IP address"))?;
        return Ok(std::net::SocketAddr::new(ip, bound.port()).to_string());
    }
    anyhow::ensure!(
        !bound.ip().is_unspecified(),
        "--shards needs an address the other replicas can forward requests to: set \
         --advertise-address (or POD_IP, as the deployment's manifest does), or --listen on \
         one address"
    );
    Ok(bound.to_string())
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
