//! The processor: hands each message to the dialect whose topic it is on, which validates it
//! against the limits and queues it to the store without waiting for the commit, so many
//! messages share one commit.

use std::sync::Arc;

use edgesync_protocol::Limits;
use edgesync_protocol::mqtt::{IngestPattern, Rejected};
use edgesync_protocol::shadow::ShadowError;
use rumqttc::Publish;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Job, Sparkplug, Twins, Waiting};
use crate::metrics::Metrics;
use crate::store::Store;

pub(super) struct Processor {
    pub(super) prefix: String,
    pub(super) ingest: Vec<IngestPattern>,
    pub(super) sparkplug: Option<Arc<Sparkplug>>,
    pub(super) twins: Option<Arc<Twins>>,
    pub(super) limits: Limits,
    pub(super) store: Store,
    pub(super) metrics: Arc<Metrics>,
}

impl Processor {
    pub(super) async fn run(
        self,
        mut intake: mpsc::Receiver<(Publish, Instant)>,
        jobs: mpsc::Sender<Job>,
    ) {
        while let Some((publish, received)) = intake.recv().await {
            let waiting = self.take(&publish).await;
            let job = Job {
                publish,
                waiting,
                received,
            };
            if jobs.send(job).await.is_err() {
                break;
            }
        }
    }

    /// Asks each dialect in turn whether the message is on its topic: shadow topics first,
    /// then the plain mappings, Sparkplug B and KubeEdge twins.
    async fn take(&self, publish: &Publish) -> Waiting {
        if let Some(w) = self.shadow(publish).await {
            return Waiting::Shadow(w);
        }
        if let Some(w) = self.plain(publish).await {
            return Waiting::Plain(w);
        }
        if let Some(w) = self.sparkplug(publish).await {
            return Waiting::Sparkplug(w);
        }
        if let Some(w) = self.twin(publish).await {
            return Waiting::Twin(w);
        }
        Waiting::Nothing
    }

    /// Counts a refusal and the answer that says why.
    pub(super) fn reject(&self, err: &ShadowError, client_token: Option<String>) -> Rejected {
        self.metrics.reject(err.reason());
        Rejected::from_error(err, client_token)
    }
}

pub(super) fn store_unavailable(client_token: Option<String>) -> Rejected {
    Rejected {
        code: 503,
        message: "shadow store unavailable; retry later".to_owned(),
        client_token,
    }
}
