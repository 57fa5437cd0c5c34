//! Where a watch's events come from: this replica's store, read chunk by chunk as it
//! changes ([`local`]), or another replica's internal watch stream (`fleet`), both as a
//! stream of [`Step`]s that the public watch turns into event lines.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::stream::BoxStream;

use super::state::Live;
use super::watch::{Cursor, Item};
use crate::shard::leases::Shards;
use crate::shard::shard_of;

/// Events one step holds at most (one hold of the store's lock).
pub const CHUNK: usize = 256;
/// How often a source says how far it has read, events or not: a merged watch's resource
/// version advances for every replica, and a quiet stream is not taken for a dead one.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// What a source says next.
#[derive(Debug)]
pub enum Step {
    /// Events, each at the source's resource version.
    Items(Vec<Item>),
    /// Every change up to this resource version has been read.
    Progress(u64),
    /// The watch asked for changes the source no longer holds (410: list again).
    Gone(String),
}

/// A source's steps; the stream ends when the source does.
pub type Steps = BoxStream<'static, Step>;

/// Steps read from this replica's `live` state from `cursor`. With `owned`, only devices of
/// the shards this replica owns at the moment each event is read: once a shard has gone to
/// another replica, that one speaks for its devices.
pub fn local(live: Arc<Live>, cursor: Cursor, owned: Option<Arc<Shards>>) -> Steps {
    let state = Local {
        changed: live.subscribe(),
        live,
        cursor,
        owned,
        next_progress: tokio::time::Instant::now() + PROGRESS_EVERY,
        done: false,
    };
    futures_util::stream::unfold(state, Local::next).boxed()
}

struct Local {
    live: Arc<Live>,
    changed: tokio::sync::watch::Receiver<u64>,
    cursor: Cursor,
    owned: Option<Arc<Shards>>,
    next_progress: tokio::time::Instant,
    /// Said [`Step::Gone`]: nothing follows.
    done: bool,
}

impl Local {
    /// The next step. The stream is polled only as fast as its reader reads, so a slow
    /// client holds nothing but its place in the window.
    async fn next(mut self) -> Option<(Step, Self)> {
        loop {
            if self.done {
                return None;
            }
            // Marked seen before the store is read: a change after the read wakes the wait.
            self.changed.borrow_and_update();
            let (step, more) = {
                let store = self.live.read();
                let step = self.cursor.next(&store, CHUNK);
                (step, self.cursor.has_more(&store))
            };
            match step {
                Ok(mut items) => {
                    if let Some(shards) = &self.owned {
                        items.retain(|(_, key, state, _)| {
                            shards.owns(shard_of(&key.0, &state.node, shards.count()))
                        });
                    }
                    if !items.is_empty() {
                        return Some((Step::Items(items), self));
                    }
                    // Changes not looked at yet (a selective watch reads a bounded number per
                    // hold of the lock): read on, without waiting for another change.
                    if more {
                        tokio::task::yield_now().await;
                        continue;
                    }
                }
                Err(gone) => {
                    self.done = true;
                    return Some((Step::Gone(gone.to_string()), self));
                }
            }
            tokio::select! {
                changed = self.changed.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                () = tokio::time::sleep_until(self.next_progress) => {
                    self.next_progress += PROGRESS_EVERY;
                    let rv = self.cursor.resource_version();
                    return Some((Step::Progress(rv), self));
                }
            }
        }
    }
}
