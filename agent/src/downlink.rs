//! The downlink: follows the controller's desired-state stream for this node, stores desired
//! state in the shadows, and publishes deltas to devices.
//!
//! The stream is NDJSON (`GET .../desired?since=CURSOR`): a snapshot when the cursor is
//! missing or too old, then changes and periodic bookmarks. The cursor is persisted after
//! each event, so a restarted agent resumes instead of re-reading everything; replaying an
//! event is harmless (same desired, same generation: no change). A silent stream (no line for
//! three heartbeat intervals) is treated as dead and reconnected.

use std::sync::Arc;
use std::time::Duration;

use edgesync_protocol::wire::{self, DesiredEvent};
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::config::CloudSettings;
use crate::metrics::Metrics;
use crate::mqtt::DevicePublisher;
use crate::store::{META_DESIRED_CURSOR, Store};

/// A stream that sends nothing for this long is considered dead (the controller sends
/// bookmarks more often than that).
const SILENCE_TIMEOUT: Duration = Duration::from_secs(45);
/// Longest line accepted from the stream (a desired document is at most a few KiB).
const MAX_LINE_BYTES: usize = 1024 * 1024;
const RECONNECT_MIN: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// The downlink task.
pub struct Downlink {
    url: String,
    token: edgesync_protocol::secret::Secret,
    http: reqwest::Client,
    store: Store,
    publisher: DevicePublisher,
    metrics: Arc<Metrics>,
    uplink_notify: Arc<Notify>,
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamEnd {
    #[error("request failed: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("controller answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("no data for {0:?}")]
    Silent(Duration),
    #[error("stream closed by the controller")]
    Closed,
    #[error("line longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong,
    #[error("store unavailable: {0}")]
    Store(#[from] crate::store::StoreError),
}

impl Downlink {
    /// Builds the downlink (no I/O).
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(
        cloud: &CloudSettings,
        namespace: &str,
        node: &str,
        store: Store,
        publisher: DevicePublisher,
        metrics: Arc<Metrics>,
        uplink_notify: Arc<Notify>,
    ) -> reqwest::Result<Self> {
        // No overall timeout: the stream is long-lived; silence is detected per line instead.
        let http =
            crate::cloud_client::http_client(cloud, |b| b.connect_timeout(cloud.request_timeout))?;
        Ok(Self {
            url: format!("{}{}", cloud.url, wire::desired_path(namespace, node)),
            token: cloud.token.clone(),
            http,
            store,
            publisher,
            metrics,
            uplink_notify,
        })
    }

    /// Follows the stream until `shutdown`, reconnecting with capped, jittered backoff.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut reconnect = Backoff::new(RECONNECT_MIN, RECONNECT_MAX);
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.follow(&mut reconnect) => r,
            };
            match result {
                Ok(()) => reconnect.reset(),
                Err(StreamEnd::Status { status: 410, .. }) => {
                    info!("Desired-state cursor expired; resubscribing from a snapshot");
                    let _ = self
                        .store
                        .set_meta(META_DESIRED_CURSOR, String::new())
                        .await;
                    reconnect.reset();
                    continue;
                }
                Err(e) => {
                    let delay = reconnect.failed();
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Desired-state stream ended, reconnecting");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn follow(&self, reconnect: &mut Backoff) -> Result<(), StreamEnd> {
        let cursor = self
            .store
            .get_meta(META_DESIRED_CURSOR)
            .await?
            .unwrap_or_default();
        let url = since_url(&self.url, &cursor);
        let resp = self
            .http
            .get(url)
            .bearer_auth(self.token.expose())
            .send()
            .await?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let body = resp.text().await.unwrap_or_default();
            return Err(StreamEnd::Status {
                status,
                body: body.chars().take(512).collect(),
            });
        }
        info!(
            resumed = !cursor.is_empty(),
            "Following desired-state stream"
        );
        // Connected: a later drop starts its backoff from the minimum again.
        reconnect.reset();
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let chunk = match tokio::time::timeout(SILENCE_TIMEOUT, stream.next()).await {
                Err(_) => return Err(StreamEnd::Silent(SILENCE_TIMEOUT)),
                Ok(None) => return Err(StreamEnd::Closed),
                Ok(Some(chunk)) => chunk?,
            };
            buf.extend_from_slice(&chunk);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let line = &line[..line.len() - 1];
                if !line.iter().all(u8::is_ascii_whitespace) {
                    self.handle_line(line).await?;
                }
            }
            if buf.len() > MAX_LINE_BYTES {
                return Err(StreamEnd::LineTooLong);
            }
        }
    }

    async fn handle_line(&self, line: &[u8]) -> Result<(), StreamEnd> {
        let event: DesiredEvent = match serde_json::from_slice(line) {
            Ok(e) => e,
            Err(e) => {
                // An unknown event type from a newer controller is skipped, not fatal.
                debug!(error = %e, "Skipping unreadable desired-state line");
                return Ok(());
            }
        };
        self.metrics.desired_events.inc();
        let cursor = match event {
            DesiredEvent::Desired {
                device,
                generation,
                desired,
                cursor,
            } => {
                match self
                    .store
                    .set_desired(device.clone(), desired, generation)
                    .await?
                {
                    Ok(outcome) => {
                        self.uplink_notify.notify_one();
                        if outcome.changed {
                            self.publisher
                                .publish_delta(&device, &outcome.current)
                                .await;
                        }
                    }
                    Err(e) => {
                        warn!(device, error = %e, "Desired state refused by the agent's limits")
                    }
                }
                cursor
            }
            DesiredEvent::Removed { cursor, .. }
            | DesiredEvent::SnapshotComplete { cursor }
            | DesiredEvent::Bookmark { cursor } => cursor,
        };
        self.store.set_meta(META_DESIRED_CURSOR, cursor).await?;
        Ok(())
    }
}

/// The stream's URL, resuming after `cursor` (none when empty).
fn since_url(base: &str, cursor: &str) -> String {
    if cursor.is_empty() {
        return base.to_owned();
    }
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("since", cursor)
        .finish();
    format!("{base}?{query}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn cursor_is_query_safe() {
        let base = "https://cloud:8443/v1/namespaces/ns/nodes/n/desired";
        assert_eq!(super::since_url(base, ""), base);
        assert_eq!(
            super::since_url(base, "12345"),
            format!("{base}?since=12345")
        );
        assert_eq!(
            super::since_url(base, "a b&c=d"),
            format!("{base}?since=a+b%26c%3Dd")
        );
    }
}
