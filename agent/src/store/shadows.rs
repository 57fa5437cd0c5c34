//! The device shadows: the in-memory documents (equal to the `shadows` table after every
//! commit), which dialect owns each device id (`claims`), and the devices updated in the
//! current transaction, written once each before it commits.
//!
//! Every method runs inside the writer's current transaction; a failed commit reads
//! everything again ([`Shadows::reload`]), so the cache never holds anything uncommitted.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use edgesync_protocol::Limits;
use edgesync_protocol::identity::Dialect;
use edgesync_protocol::rejection::RejectRequest;
use edgesync_protocol::shadow::{Applied, ShadowDocument, ShadowError, UpdateRequest};
use rusqlite::{Connection, params};
use serde_json::{Map, Value};

use super::outbox::Outbox;
use super::{
    DesiredOutcome, StoreError, UpdateOutcome, claims, now_secs, read_shadows, sqlite_err,
};

const UPSERT_SHADOW: &str = "INSERT INTO shadows (device, version, doc) VALUES (?1, ?2, ?3)
     ON CONFLICT (device) DO UPDATE SET version = excluded.version, doc = excluded.doc";

/// The shadows and their owners.
pub(super) struct Shadows {
    docs: HashMap<String, ShadowDocument>,
    /// The dialect each device id belongs to (`claims.rs`).
    claims: HashMap<String, Dialect>,
    /// Devices updated in the current transaction, written once each before it commits: a
    /// device updated many times in one group costs one serialization and two row writes.
    dirty: HashSet<String>,
    limits: Limits,
    max_devices: usize,
}

impl Shadows {
    /// Reads every shadow and claim.
    pub(super) fn load(
        conn: &Connection,
        path: &Path,
        limits: Limits,
        max_devices: usize,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            docs: read_shadows(conn, path)?,
            claims: claims::load(conn).map_err(sqlite_err(path))?,
            dirty: HashSet::new(),
            limits,
            max_devices,
        })
    }

    /// Reads everything again (a transaction failed); updates not yet written are dropped.
    pub(super) fn reload(&mut self, conn: &Connection, path: &Path) -> Result<(), StoreError> {
        self.dirty.clear();
        self.docs = read_shadows(conn, path)?;
        self.claims = claims::load(conn).map_err(sqlite_err(path))?;
        Ok(())
    }

    /// Every document, by device.
    pub(super) fn docs(&self) -> &HashMap<String, ShadowDocument> {
        &self.docs
    }

    /// Devices stored, and the cap.
    pub(super) fn count(&self) -> (usize, usize) {
        (self.docs.len(), self.max_devices)
    }

    /// Merges a device's reported state (written at [`Shadows::flush`]).
    pub(super) fn update(
        &mut self,
        conn: &Connection,
        device: String,
        request: &UpdateRequest,
        full_reply: bool,
    ) -> rusqlite::Result<UpdateOutcome> {
        let claimed = self.claims.get(&device).copied();
        if let Some(owner) = claimed
            && owner != request.dialect
        {
            return Ok(UpdateOutcome::Rejected(ShadowError::IdentityTaken {
                device,
                owner,
                by: request.dialect,
            }));
        }
        let is_new = !self.docs.contains_key(&device);
        if is_new && self.docs.len() >= self.max_devices {
            return Ok(UpdateOutcome::DeviceLimit);
        }
        // Applied to the cached document in place: apply_reported leaves it untouched on
        // error, and a failed commit reloads the cache from disk, so the cache never holds
        // anything uncommitted. Documents are the hot allocation on this path: they are
        // copied only when a reply needs them.
        let doc = self.docs.entry(device.clone()).or_default();
        Ok(
            match doc.apply_reported_with(request, &self.limits, now_secs(), full_reply) {
                Ok(applied) => {
                    let current =
                        (full_reply || !doc.state.desired.is_empty()).then(|| doc.clone());
                    if applied.changed {
                        if claimed.is_none() {
                            // Written now, inside this transaction: a failed commit reloads
                            // the claims with the shadows.
                            claims::record(conn, &device, request.dialect)?;
                            self.claims.insert(device.clone(), request.dialect);
                        }
                        self.dirty.insert(device);
                    } else if is_new {
                        self.docs.remove(&device);
                    }
                    UpdateOutcome::Accepted { applied, current }
                }
                Err(e) => {
                    if is_new {
                        self.docs.remove(&device);
                    }
                    UpdateOutcome::Rejected(e)
                }
            },
        )
    }

    /// Records a device's refusal of its desired generation (written at [`Shadows::flush`],
    /// with its pending report). Only a device of the native dialect can refuse: the others
    /// have no such message, and their ids are theirs.
    pub(super) fn reject(&mut self, device: String, request: &RejectRequest) -> UpdateOutcome {
        if let Some(owner) = self.claims.get(&device).copied()
            && owner != Dialect::Native
        {
            return UpdateOutcome::Rejected(ShadowError::IdentityTaken {
                device,
                owner,
                by: Dialect::Native,
            });
        }
        // A device without a shadow holds no desired generation: refused below, and no
        // document is made for it (a refusal never counts against the device cap).
        let mut none = ShadowDocument::default();
        let doc = self.docs.get_mut(&device).unwrap_or(&mut none);
        match doc.apply_rejection(request, now_secs()) {
            Ok(changed) => {
                let current = Some(doc.clone());
                if changed {
                    self.dirty.insert(device);
                }
                UpdateOutcome::Accepted {
                    applied: Applied {
                        changed,
                        previous: None,
                    },
                    current,
                }
            }
            Err(e) => UpdateOutcome::Rejected(e),
        }
    }

    /// Sets a device's desired state from the cloud, written at once.
    pub(super) fn set_desired(
        &mut self,
        conn: &Connection,
        path: &Path,
        outbox: &mut Outbox,
        device: String,
        desired: Map<String, Value>,
        generation: i64,
    ) -> Result<Result<DesiredOutcome, ShadowError>, StoreError> {
        let mut doc = self.docs.get(&device).cloned().unwrap_or_default();
        let before_version = doc.version;
        let changed = match doc.set_desired(desired, generation, &self.limits, now_secs()) {
            Ok(changed) => changed,
            Err(e) => return Ok(Err(e)),
        };
        // A new generation bumps the version even when the document is unchanged, so it is
        // reported and the controller learns it was observed.
        if doc.version != before_version {
            write(conn, path, outbox, &device, &doc)?;
            self.docs.insert(device, doc.clone());
        }
        Ok(Ok(DesiredOutcome {
            changed,
            current: doc,
        }))
    }

    /// A device's document, as `dialect` sees it: another dialect's device is not found,
    /// since its grants do not reach it.
    pub(super) fn get(&self, device: &str, dialect: Dialect) -> Option<ShadowDocument> {
        let visible = self
            .claims
            .get(device)
            .is_none_or(|owner| *owner == dialect);
        visible.then(|| self.docs.get(device).cloned()).flatten()
    }

    /// Writes the devices updated since the last flush, and their pending reports.
    pub(super) fn flush(
        &mut self,
        conn: &Connection,
        path: &Path,
        outbox: &mut Outbox,
    ) -> Result<(), StoreError> {
        // Taken and put back so the set keeps its capacity from group to group.
        let mut dirty = std::mem::take(&mut self.dirty);
        let result = dirty
            .drain()
            .try_for_each(|device| match self.docs.get(&device) {
                Some(doc) => write(conn, path, outbox, &device, doc),
                None => Ok(()),
            });
        self.dirty = dirty;
        result
    }
}

/// Writes a device's shadow and its pending report.
fn write(
    conn: &Connection,
    path: &Path,
    outbox: &mut Outbox,
    device: &str,
    doc: &ShadowDocument,
) -> Result<(), StoreError> {
    let err = sqlite_err(path);
    let text = serde_json::to_string(doc).map_err(|source| StoreError::Corrupt {
        device: device.to_owned(),
        source,
    })?;
    conn.prepare_cached(UPSERT_SHADOW)
        .and_then(|mut s| s.execute(params![device, doc.version as i64, text]))
        .map_err(&err)?;
    outbox.enqueue(conn, device, doc.version).map_err(&err)
}
