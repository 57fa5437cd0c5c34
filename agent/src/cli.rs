//! Read-only commands (`shadow get`, `shadow list`, `outbox`): they open the database
//! read-only, which is safe while the agent runs (WAL mode), and print JSON.

use std::path::Path;

use serde_json::json;

use crate::store::{StoreError, open_read_only};

/// `edgesync-agent shadow get DEVICE`: the document, or `None` if the device is unknown.
///
/// # Errors
/// When the database cannot be read.
pub fn shadow_get(db: &Path, device: &str) -> Result<Option<serde_json::Value>, StoreError> {
    let store = open_read_only(db)?;
    Ok(store
        .get(device)?
        .map(|doc| serde_json::to_value(doc).unwrap_or_default()))
}

/// `edgesync-agent shadow list`: every device with its version.
///
/// # Errors
/// When the database cannot be read.
pub fn shadow_list(db: &Path) -> Result<serde_json::Value, StoreError> {
    let store = open_read_only(db)?;
    let devices: Vec<_> = store
        .list()?
        .into_iter()
        .map(|(d, v)| json!({"device": d, "version": v}))
        .collect();
    Ok(json!({ "devices": devices }))
}

/// `edgesync-agent outbox`: pending devices, oldest pending age, last acknowledged seq, and
/// the database's epoch.
///
/// # Errors
/// When the database cannot be read.
pub fn outbox(db: &Path) -> Result<serde_json::Value, StoreError> {
    let store = open_read_only(db)?;
    let (stats, pending) = store.outbox()?;
    let pending: Vec<_> = pending
        .into_iter()
        .map(|(d, v)| json!({"device": d, "version": v}))
        .collect();
    let mut v = serde_json::to_value(stats).unwrap_or_default();
    v["pending"] = serde_json::Value::Array(pending);
    v["epoch"] = store
        .epoch()?
        .map_or(serde_json::Value::Null, serde_json::Value::String);
    Ok(v)
}
