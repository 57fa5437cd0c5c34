//! A node's agent epochs: which one is current, and the switch to a new one.
//!
//! Every agent database has an epoch. The EdgeNode's status records the one now reporting
//! (`agentEpoch`), how many the node has had (`agentEpochGeneration`), and the ones it
//! superseded (`retiredAgentEpochs`). A batch with:
//! - the current epoch gets its generation, which stamps its reports (see `stamp`);
//! - a retired epoch is refused with 409 and changes nothing, heartbeat included: a second
//!   agent running with the node's identity would otherwise flip the node between two
//!   epochs, each superseding the other's reports;
//! - an epoch never seen makes it current: the EdgeNode status is written with its
//!   `resourceVersion` as precondition before any of the batch's reports is, so replicas
//!   agree on one order of epochs even when their caches lag. A node may retire an epoch at
//!   most once per `--agent-epoch-switch-seconds` (429 before that).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgesync_crds::{EdgeNode, EdgeNodeStatus};
use kube::api::PostParams;
use kube::{Api, Client};
use tracing::info;

use crate::metrics::Metrics;

/// Retired epochs kept per node. A node reinstalled more often than this could see an old
/// agent's epoch accepted again; 16 covers years of reinstalls.
pub const MAX_RETIRED_EPOCHS: usize = 16;

/// Re-reads after a resourceVersion conflict before the switch is left to the next batch.
const MAX_SWITCH_ATTEMPTS: usize = 5;

/// What an EdgeNode's status says about its epochs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EpochRecord {
    /// The epoch now reporting.
    pub current: Option<String>,
    /// How many epochs the node has had.
    pub generation: u64,
    /// Superseded epochs, newest first.
    pub retired: Vec<String>,
}

/// Where a batch's epoch stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// The node's current epoch, with its generation.
    Current(u64),
    /// Superseded by `current`.
    Retired {
        /// The epoch that superseded it.
        current: String,
    },
    /// Never seen: it becomes the current epoch.
    New,
}

impl EpochRecord {
    /// The record held by an EdgeNode's status.
    pub fn of(status: Option<&EdgeNodeStatus>) -> Self {
        status.map_or_else(Self::default, |s| Self {
            current: s.agent_epoch.clone(),
            generation: s.agent_epoch_generation.unwrap_or(0),
            retired: s.retired_agent_epochs.clone(),
        })
    }

    /// Where `epoch` (non-empty) stands.
    pub fn standing(&self, epoch: &str) -> Standing {
        match &self.current {
            Some(c) if c == epoch => Standing::Current(self.generation),
            Some(c) if self.retired.iter().any(|r| r == epoch) => {
                Standing::Retired { current: c.clone() }
            }
            _ => Standing::New,
        }
    }

    /// The record once `epoch` supersedes the current one.
    pub fn succeeded_by(&self, epoch: &str) -> Self {
        let mut retired = Vec::with_capacity(MAX_RETIRED_EPOCHS);
        retired.extend(self.current.clone());
        retired.extend(self.retired.iter().filter(|r| *r != epoch).cloned());
        retired.dedup();
        retired.truncate(MAX_RETIRED_EPOCHS);
        Self {
            current: Some(epoch.to_owned()),
            generation: self.generation + 1,
            retired,
        }
    }

    /// Writes the record into an EdgeNode status.
    pub fn write_into(&self, status: &mut EdgeNodeStatus) {
        status.agent_epoch.clone_from(&self.current);
        status.agent_epoch_generation = Some(self.generation);
        status.retired_agent_epochs.clone_from(&self.retired);
    }
}

/// Why a batch's epoch has no generation.
#[derive(Debug)]
pub enum EpochError {
    /// A retired epoch: refuse the batch (409).
    Superseded(String),
    /// The EdgeNode could not be read or written: retry later (503).
    Unavailable(String),
    /// The node switched epochs less than the minimum interval ago: retry after this (429).
    TooSoon(Duration),
}

/// Resolves batch epochs to generations, switching a node to a new epoch when one appears.
pub struct NodeEpochs {
    client: Client,
    /// The newest record this replica read or wrote per node: the cache may lag behind a
    /// switch made a moment ago.
    known: Mutex<HashMap<(String, String), EpochRecord>>,
    /// Switches are rare (a reinstall); one at a time keeps a burst of batches from one new
    /// agent to a single write.
    switching: tokio::sync::Mutex<()>,
    /// When this replica last retired an epoch of each node. An agent is reinstalled rarely;
    /// a node presenting new epochs batch after batch would otherwise cost two API calls per
    /// batch, outside the write budget, and retire every epoch it has had.
    last_switch: Mutex<HashMap<(String, String), Instant>>,
    min_interval: Duration,
    metrics: Arc<Metrics>,
}

impl NodeEpochs {
    /// Resolver using `client` for the EdgeNode reads and writes of a switch; a node may
    /// retire an epoch at most once per `min_interval`.
    pub fn new(client: Client, min_interval: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            known: Mutex::new(HashMap::new()),
            switching: tokio::sync::Mutex::new(()),
            last_switch: Mutex::new(HashMap::new()),
            min_interval,
            metrics,
        }
    }

    /// How long until `key` may retire an epoch again (zero: now).
    fn switch_wait(&self, key: &(String, String)) -> Duration {
        let last = self.last_switch.lock().unwrap_or_else(|e| e.into_inner());
        last.get(key).map_or(Duration::ZERO, |t| {
            self.min_interval.saturating_sub(t.elapsed())
        })
    }

    /// The generation of `epoch` for `node` (the cached EdgeNode); 0 for an empty epoch (an
    /// agent that predates epochs).
    ///
    /// # Errors
    /// [`EpochError`] when the epoch is retired or the switch could not be written.
    pub async fn generation(&self, node: &EdgeNode, epoch: &str) -> Result<u64, EpochError> {
        if epoch.is_empty() {
            return Ok(0);
        }
        let key = (
            node.metadata.namespace.clone().unwrap_or_default(),
            node.metadata.name.clone().unwrap_or_default(),
        );
        let record = self.freshest(&key, EpochRecord::of(node.status.as_ref()));
        match record.standing(epoch) {
            Standing::Current(g) => Ok(g),
            Standing::Retired { current } => Err(self.superseded(&key, epoch, &current)),
            Standing::New => {
                // The first epoch a node ever has retires nothing and is not throttled.
                let wait = self.switch_wait(&key);
                if record.current.is_some() && !wait.is_zero() {
                    self.metrics.epoch_switches_throttled.inc();
                    return Err(EpochError::TooSoon(wait));
                }
                self.switch(&key, epoch).await
            }
        }
    }

    /// `seen`, or what this replica learnt since, whichever is newer.
    fn freshest(&self, key: &(String, String), seen: EpochRecord) -> EpochRecord {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        match known.get(key) {
            Some(k) if k.generation > seen.generation => k.clone(),
            _ => seen,
        }
    }

    fn remember(&self, key: &(String, String), record: &EpochRecord) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let entry = known.entry(key.clone()).or_default();
        if record.generation >= entry.generation {
            *entry = record.clone();
        }
    }

    fn superseded(&self, key: &(String, String), epoch: &str, current: &str) -> EpochError {
        self.metrics.superseded_epoch_batches.inc();
        let (ns, node) = key;
        EpochError::Superseded(format!(
            "agent epoch {epoch} of node {ns}/{node} was superseded by epoch {current} (the agent \
             was reinstalled or its database recreated). Another agent is running with this \
             node's name and token, or this one's data_dir was restored from an old copy: stop \
             it. To let this database report again instead, remove its epoch from the \
             EdgeNode's status.retiredAgentEpochs (kubectl edit --subresource=status)"
        ))
    }

    async fn switch(&self, key: &(String, String), epoch: &str) -> Result<u64, EpochError> {
        let _one_at_a_time = self.switching.lock().await;
        let (ns, name) = key;
        let api: Api<EdgeNode> = Api::namespaced(self.client.clone(), ns);
        for _ in 0..MAX_SWITCH_ATTEMPTS {
            // A quorum read: the cache may not show a switch another replica just made.
            let mut fresh = match api.get_opt(name).await {
                Ok(Some(n)) => n,
                Ok(None) => {
                    return Err(EpochError::Unavailable(format!(
                        "EdgeNode {ns}/{name} was deleted"
                    )));
                }
                Err(e) => {
                    return Err(EpochError::Unavailable(format!(
                        "cannot read EdgeNode {ns}/{name}: {e}"
                    )));
                }
            };
            let record = EpochRecord::of(fresh.status.as_ref());
            self.remember(key, &record);
            match record.standing(epoch) {
                Standing::Current(g) => return Ok(g),
                Standing::Retired { current } => return Err(self.superseded(key, epoch, &current)),
                Standing::New => {}
            }
            let next = record.succeeded_by(epoch);
            next.write_into(fresh.status.get_or_insert_with(EdgeNodeStatus::default));
            fresh.metadata.managed_fields = None;
            match api
                .replace_status(name, &PostParams::default(), &fresh)
                .await
            {
                Ok(_) => {
                    self.remember(key, &next);
                    if record.current.is_some() {
                        self.last_switch
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(key.clone(), Instant::now());
                    }
                    self.metrics.agent_epoch_changes.inc();
                    info!(
                        namespace = %ns,
                        node = %name,
                        epoch,
                        generation = next.generation,
                        previous = record.current.as_deref().unwrap_or("none"),
                        "Edge node reports with a new agent epoch (first report, reinstall or new database): its reports now supersede the previous epoch's"
                    );
                    return Ok(next.generation);
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => {
                    return Err(EpochError::Unavailable(format!(
                        "cannot record the new agent epoch on EdgeNode {ns}/{name}: {e}"
                    )));
                }
            }
        }
        Err(EpochError::Unavailable(format!(
            "EdgeNode {ns}/{name} kept changing while its new agent epoch was recorded; retry"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(current: &str, generation: u64, retired: &[&str]) -> EpochRecord {
        EpochRecord {
            current: Some(current.to_owned()),
            generation,
            retired: retired.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn the_current_epoch_has_its_generation_and_a_retired_one_is_refused() {
        let r = record("b", 2, &["a"]);
        assert_eq!(r.standing("b"), Standing::Current(2));
        assert_eq!(
            r.standing("a"),
            Standing::Retired {
                current: "b".into()
            }
        );
        assert_eq!(r.standing("c"), Standing::New);
        assert_eq!(EpochRecord::default().standing("a"), Standing::New);
    }

    #[test]
    fn a_new_epoch_retires_the_current_one_newest_first_and_bounded() {
        let first = EpochRecord::default().succeeded_by("a");
        assert_eq!(first, record("a", 1, &[]));
        let second = first.succeeded_by("b");
        assert_eq!(second, record("b", 2, &["a"]));
        let mut r = second;
        for i in 0..40 {
            r = r.succeeded_by(&format!("e{i}"));
        }
        assert_eq!(r.generation, 42);
        assert_eq!(r.retired.len(), MAX_RETIRED_EPOCHS);
        assert_eq!(r.retired[0], "e38");
    }

    #[test]
    fn the_record_round_trips_through_the_status() {
        let r = record("b", 2, &["a"]);
        let mut status = EdgeNodeStatus::default();
        r.write_into(&mut status);
        assert_eq!(EpochRecord::of(Some(&status)), r);
        assert_eq!(EpochRecord::of(None), EpochRecord::default());
    }
}
