//! Wiring and lifecycle: opens the store, starts MQTT, uplink, downlink and the HTTP
//! endpoint as tasks of one `JoinSet`, and shuts them down in order.
//!
//! Shutdown order: stop MQTT intake (messages in the pipeline are still committed), let the
//! uplink make one bounded attempt to deliver, then close the store. A component that exits
//! on its own (a fatal error) cancels everything else, and a start-up failure stops what had
//! started the same way.

use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::{Broker, Settings};
use crate::downlink::Downlink;
use crate::metrics::Metrics;
use crate::mqtt::Mqtt;
use crate::store::Store;
use crate::uplink::Uplink;

/// Runs the agent until `shutdown` is cancelled.
///
/// # Errors
/// Start-up failures (database, HTTP port, TLS), with context saying what was being done,
/// and a component that stopped on its own.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    // rustls needs one process-wide crypto provider; ring keeps the build free of C/cmake.
    let _ = rustls::crypto::ring::default_provider().install_default();
    info!(
        node = settings.node,
        namespace = settings.namespace,
        data_dir = %settings.data_dir.display(),
        broker = ?settings.mqtt.broker,
        cloud = settings.cloud.as_ref().map(|c| c.url.as_str()).unwrap_or("none (local only)"),
        durability = ?settings.store.durability,
        "Starting edgesync-agent {}",
        env!("CARGO_PKG_VERSION")
    );
    raise_open_files_limit(&settings);
    let _lock = crate::lock::acquire(&settings.data_dir)?;
    let (store, store_thread) = Store::open(&settings.store, settings.limits)
        .with_context(|| format!("opening the database {}", settings.store.path.display()))?;
    let metrics = Arc::new(Metrics::new());
    metrics.register_collector(store.health());
    let mut parts = Parts {
        tasks: JoinSet::new(),
        intake_stop: shutdown.child_token(),
        uplink_stop: CancellationToken::new(),
        broker_stop: CancellationToken::new(),
        broker_task: None,
    };
    // A start-up failure (a port in use, a bad TLS file) after some parts have started stops
    // them in the same order as a shutdown: every task is joined and the store is closed.
    let failure = match start(&settings, &shutdown, &store, &metrics, &mut parts).await {
        Ok(()) => wait(&mut parts.tasks, &shutdown)
            .await
            .map(|reason| anyhow::anyhow!("{reason}; see the log above")),
        Err(e) => {
            shutdown.cancel();
            Some(e)
        }
    };
    parts.stop().await;
    drop(store);
    let _ = tokio::task::spawn_blocking(move || store_thread.join()).await;
    info!("Stopped");
    // A supervisor (systemd, the kubelet) sees the failure in the exit status.
    failure.map_or(Ok(()), Err)
}

/// What [`run`] starts, and the tokens that stop it in order.
struct Parts {
    tasks: JoinSet<()>,
    /// Stops MQTT intake; a child of the shutdown token.
    intake_stop: CancellationToken,
    /// Cancelled once intake has stopped: the uplink then makes its last bounded attempt.
    uplink_stop: CancellationToken,
    /// Cancelled once every other task has ended.
    broker_stop: CancellationToken,
    broker_task: Option<tokio::task::JoinHandle<()>>,
}

impl Parts {
    /// Stops intake and the uplink, joins every task, then stops the embedded broker.
    async fn stop(self) {
        let Parts {
            mut tasks,
            intake_stop,
            uplink_stop,
            broker_stop,
            broker_task,
        } = self;
        intake_stop.cancel();
        uplink_stop.cancel();
        while let Some(res) = tasks.join_next().await {
            if let Err(e) = res {
                error!(error = %e, "Component failed during shutdown");
            }
        }
        broker_stop.cancel();
        if let Some(task) = broker_task {
            let _ = task.await;
        }
    }
}

/// Starts the embedded broker (when configured), MQTT intake, the uplink and downlink (when
/// a cloud is configured) and the HTTP endpoint into `parts`.
async fn start(
    settings: &Settings,
    shutdown: &CancellationToken,
    store: &Store,
    metrics: &Arc<Metrics>,
    parts: &mut Parts,
) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    // The embedded broker stops last, after the agent's own MQTT client has acked what it
    // committed, so a clean shutdown leaves no device message unacknowledged needlessly.
    let mut mqtt_settings = settings.mqtt.clone();
    if let Broker::Embedded { listen } = settings.mqtt.broker {
        let (local, agent_credentials, task) = start_embedded_broker(
            settings,
            listen,
            store.clone(),
            metrics.clone(),
            parts.broker_stop.clone(),
        )
        .await?;
        parts.broker_task = Some(task);
        mqtt_settings.broker = Broker::Embedded { listen: local };
        // The agent's own client proves itself with the per-process secret; the configured
        // credentials are the devices'.
        mqtt_settings.credentials = Some(agent_credentials);
    }
    let mqtt = Mqtt::new(&mqtt_settings, &settings.ingest, settings.limits, metrics)
        .context("setting up MQTT")?;
    let publisher = mqtt.publisher(metrics.clone());
    parts.tasks.spawn(mqtt.run(
        store.clone(),
        metrics.clone(),
        changed.clone(),
        parts.intake_stop.clone(),
    ));

    if let Some(cloud) = &settings.cloud {
        let uplink = Uplink::new(
            settings.uplink.clone(),
            cloud.clone(),
            &settings.namespace,
            &settings.node,
            store.clone(),
            metrics.clone(),
            changed.clone(),
        )
        .context("setting up the uplink HTTP client (an https:// cloud.url needs the system's CA certificates, e.g. the ca-certificates package, or cloud.ca_file)")?;
        parts
            .tasks
            .spawn(uplink.run(parts.uplink_stop.clone(), settings.shutdown_timeout));
        let downlink = Downlink::new(
            cloud,
            &settings.namespace,
            &settings.node,
            store.clone(),
            publisher,
            metrics.clone(),
            changed,
        )
        .context("setting up the downlink HTTP client (an https:// cloud.url needs the system's CA certificates, e.g. the ca-certificates package, or cloud.ca_file)")?;
        parts.tasks.spawn(downlink.run(shutdown.child_token()));
    }
    if let Some(addr) = settings.http_listen {
        let listener = crate::http::bind(addr)
            .await
            .with_context(|| format!("binding http.listen {addr}"))?;
        info!(%addr, "Serving /healthz, /readyz and /metrics");
        parts.tasks.spawn(crate::http::run(
            listener,
            metrics.clone(),
            store.health(),
            shutdown.child_token(),
        ));
    }
    Ok(())
}

/// Waits for shutdown, or for a component to stop on its own (which is fatal); returns why
/// in that case. Components stop on child tokens of `shutdown`, so one may end before this
/// task sees the signal: shutdown is looked at first, and a component ending once it is
/// requested is stopping, not failing.
async fn wait(tasks: &mut JoinSet<()>, shutdown: &CancellationToken) -> Option<String> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => {
            info!("Shutting down");
            None
        }
        done = tasks.join_next() => {
            if shutdown.is_cancelled() {
                info!("Shutting down");
                return None;
            }
            let reason = match done {
                Some(Err(e)) => format!("a component failed: {e}"),
                _ => "a component stopped unexpectedly".to_owned(),
            };
            error!(reason = reason.as_str(), "Shutting down after a fatal error");
            shutdown.cancel();
            Some(reason)
        }
    }
}

/// Starts the embedded broker; returns the address the agent's client connects to.
#[cfg(feature = "embedded-broker")]
async fn start_embedded_broker(
    settings: &Settings,
    listen: std::net::SocketAddr,
    store: Store,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> anyhow::Result<(
    std::net::SocketAddr,
    (String, edgesync_protocol::secret::Secret),
    tokio::task::JoinHandle<()>,
)> {
    use crate::broker::access::{AGENT_USERNAME, AgentSecret};
    use crate::broker::{BrokerSettings, EmbeddedBroker};
    let agent_secret = AgentSecret::generate().context("generating the agent's broker secret")?;
    let broker = EmbeddedBroker::bind(
        &BrokerSettings {
            listen,
            credentials: settings.mqtt.credentials.clone(),
            agent_client_id: settings.mqtt.client_id.clone(),
            agent_secret: agent_secret.clone(),
            config: settings.mqtt.embedded.clone(),
            topic_prefix: settings.mqtt.topic_prefix.clone(),
            ingest_topics: settings.ingest.device_topics(),
            sparkplug_group: settings
                .ingest
                .sparkplug
                .as_ref()
                .map(|s| s.group.clone().unwrap_or_else(|| "+".to_owned())),
            kubeedge_twin: settings.ingest.kubeedge_twin,
            agent_filters: crate::mqtt::agent_filters(
                &settings.mqtt.topic_prefix,
                &settings.ingest,
            ),
        },
        store,
        metrics,
        stop,
    )
    .await
    .with_context(|| format!("starting the embedded broker on mqtt.listen {listen}"))?;
    // The agent connects to its own loopback listener, out of the devices' way.
    let local = broker.agent_addr()?;
    let credentials = (
        AGENT_USERNAME.to_owned(),
        edgesync_protocol::secret::Secret::new(agent_secret.expose()),
    );
    Ok((local, credentials, tokio::spawn(broker.run())))
}

#[cfg(not(feature = "embedded-broker"))]
async fn start_embedded_broker(
    _: &Settings,
    _: std::net::SocketAddr,
    _: Store,
    _: Arc<Metrics>,
    _: CancellationToken,
) -> anyhow::Result<(
    std::net::SocketAddr,
    (String, edgesync_protocol::secret::Secret),
    tokio::task::JoinHandle<()>,
)> {
    anyhow::bail!(
        "mqtt.embedded = true, but this edgesync-agent was built without the embedded broker (cargo feature `embedded-broker`); set mqtt.url to a broker, or use a default build"
    )
}

/// Raises the soft open-files limit to the hard one: systemd and containerd start services
/// at 1,024, which the broker's connections and the agent's own files would exhaust.
fn raise_open_files_limit(settings: &Settings) {
    let limits = &settings.mqtt.embedded.limits;
    let wanted = (limits.max_connections + limits.max_pending_connections) as u64 + 256;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(soft) if matches!(settings.mqtt.broker, Broker::Embedded { .. }) && soft < wanted => {
            tracing::warn!(
                open_files = soft,
                wanted,
                "The open-files limit is below broker.max_connections + broker.max_pending_connections + 256: raise LimitNOFILE (systemd) or ulimit -n, or lower broker.max_connections"
            );
        }
        Ok(soft) => tracing::debug!(open_files = soft, "Open-files limit"),
        Err(e) => tracing::warn!(error = %e, "Could not raise the open-files limit"),
    }
}
