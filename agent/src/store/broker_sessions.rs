//! The embedded broker's persistent sessions on disk: one row per session (when it was last
//! connected) and one row per subscription, so a SUBSCRIBE costs one row change, never a
//! rewrite of the session's whole filter set.
//!
//! Only the store's writer thread calls these, inside its group-commit transaction.

use std::collections::HashMap;

use rusqlite::{Connection, params};

/// v3 schema change: subscriptions get their own rows; sessions record when they were last
/// connected (for expiry). Filters saved by v2 as a JSON object are carried over.
pub(super) const MIGRATION_V3: &str = "CREATE TABLE broker_subscriptions (
        client_id TEXT NOT NULL,
        filter TEXT NOT NULL,
        qos INTEGER NOT NULL,
        PRIMARY KEY (client_id, filter)
    ) WITHOUT ROWID;
    INSERT OR IGNORE INTO broker_subscriptions (client_id, filter, qos)
        SELECT s.client_id, j.key, j.value FROM broker_sessions s, json_each(s.filters) j
        WHERE json_valid(s.filters);
    ALTER TABLE broker_sessions DROP COLUMN filters;
    ALTER TABLE broker_sessions ADD COLUMN last_seen_s INTEGER";

/// v4 schema change: the username that owns each session, so that after a restart a
/// session is still reserved to its owner (another user cannot take it over).
pub(super) const MIGRATION_V4: &str = "ALTER TABLE broker_sessions ADD COLUMN owner TEXT";

const UPSERT_SESSION: &str =
    "INSERT INTO broker_sessions (client_id, last_seen_s, owner) VALUES (?1, ?2, ?3)
     ON CONFLICT (client_id) DO UPDATE SET last_seen_s = coalesce(excluded.last_seen_s, last_seen_s),
         owner = coalesce(excluded.owner, owner)";
const DELETE_SESSION: &str = "DELETE FROM broker_sessions WHERE client_id = ?1";
const DELETE_SUBSCRIPTIONS: &str = "DELETE FROM broker_subscriptions WHERE client_id = ?1";
const UPSERT_SUBSCRIPTION: &str =
    "INSERT INTO broker_subscriptions (client_id, filter, qos) VALUES (?1, ?2, ?3)
     ON CONFLICT (client_id, filter) DO UPDATE SET qos = excluded.qos";
const DELETE_SUBSCRIPTION: &str =
    "DELETE FROM broker_subscriptions WHERE client_id = ?1 AND filter = ?2";
const SELECT_SESSIONS: &str = "SELECT client_id, last_seen_s, owner FROM broker_sessions";
const SELECT_SUBSCRIPTIONS: &str = "SELECT client_id, filter, qos FROM broker_subscriptions";

/// The changes to one persistent session since it was last written, applied in this order:
/// forget (all rows), record, then subscription changes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SessionDelta {
    /// Client id.
    pub client: String,
    /// Remove the session and its subscriptions first.
    pub forget: bool,
    /// Record the session (it exists after this delta).
    pub record: bool,
    /// When it was last connected (Unix seconds), if that changed.
    pub last_seen_s: Option<u64>,
    /// The authenticated username that owns it, if that changed.
    pub owner: Option<String>,
    /// Subscriptions added or changed (`Some(qos)`) or removed (`None`).
    pub filters: Vec<(String, Option<u8>)>,
}

/// A persistent session as read back at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    /// Client id.
    pub client: String,
    /// Last connected (Unix seconds); `None` for sessions written before v3.
    pub last_seen_s: Option<u64>,
    /// The username that owns it; `None` when anonymous or written before v4.
    pub owner: Option<String>,
    /// Subscriptions and their QoS.
    pub filters: Vec<(String, u8)>,
}

pub(super) fn write(conn: &Connection, deltas: &[SessionDelta]) -> rusqlite::Result<()> {
    for d in deltas {
        if d.forget {
            conn.prepare_cached(DELETE_SUBSCRIPTIONS)?
                .execute(params![d.client])?;
            conn.prepare_cached(DELETE_SESSION)?
                .execute(params![d.client])?;
        }
        if d.record || d.last_seen_s.is_some() || d.owner.is_some() {
            let seen = d.last_seen_s.map(|s| s as i64);
            conn.prepare_cached(UPSERT_SESSION)?
                .execute(params![d.client, seen, d.owner])?;
        }
        for (filter, qos) in &d.filters {
            match qos {
                Some(q) => conn
                    .prepare_cached(UPSERT_SUBSCRIPTION)?
                    .execute(params![d.client, filter, q])?,
                None => conn
                    .prepare_cached(DELETE_SUBSCRIPTION)?
                    .execute(params![d.client, filter])?,
            };
        }
    }
    Ok(())
}

pub(super) fn load(conn: &Connection) -> rusqlite::Result<Vec<StoredSession>> {
    let mut sessions: HashMap<String, StoredSession> = conn
        .prepare_cached(SELECT_SESSIONS)?
        .query_map([], |r| {
            let client: String = r.get(0)?;
            let seen: Option<i64> = r.get(1)?;
            let owner: Option<String> = r.get(2)?;
            Ok((client, seen, owner))
        })?
        .map(|row| {
            row.map(|(client, seen, owner)| {
                (
                    client.clone(),
                    StoredSession {
                        client,
                        last_seen_s: seen.and_then(|s| u64::try_from(s).ok()),
                        owner,
                        filters: Vec::new(),
                    },
                )
            })
        })
        .collect::<rusqlite::Result<_>>()?;
    let mut stmt = conn.prepare_cached(SELECT_SUBSCRIPTIONS)?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    for row in rows {
        let (client, filter, qos) = row?;
        // A subscription row without its session (written by hand, or a crash between
        // statements cannot cause it: both are in one transaction) is ignored.
        if let Some(s) = sessions.get_mut(&client) {
            s.filters.push((filter, u8::from(qos != 0)));
        }
    }
    Ok(sessions.into_values().collect())
}
