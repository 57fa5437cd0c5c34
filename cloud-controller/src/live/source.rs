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
    /// Events, each at the source's resource version; while the source lists, the version
    /// the list was read at (the position a watch may resume from).
    Items(Vec<Item>, Option<u64>),
    /// Every change up to this resource version has been read.
    Progress(u64),
    /// The watch asked for changes the source no longer holds (410: list again).
    Gone(String),
}

impl Step {
    /// The events it holds.
    pub fn len(&self) -> usize {
        match self {
            Self::Items(items, _) => items.len(),
            _ => 0,
        }
    }

    /// Whether it holds no event.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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
            let listing = self.cursor.is_listing();
            let (step, more, moved_at) = {
                let store = self.live.read();
                let step = self.cursor.next(&store, CHUNK);
                (step, self.cursor.has_more(&store), store.moved_at())
            };
            let listed_at = listing.then(|| self.cursor.resource_version());
            match step {
                Ok(mut items) => {
                    if let Some(shards) = &self.owned {
                        let mut lost = false;
                        items.retain(|(_, key, state, rv)| {
                            let owned = shards.owns(shard_of(&key.0, &state.node, shards.count()));
                            // A change made while its shard was here, read once the shard has
                            // gone: its new owner may never say it (a deletion, a device that
                            // stopped matching), so the watch must list again.
                            lost |= !owned && *rv <= moved_at;
                            owned
                        });
                        if lost {
                            self.done = true;
                            let why = "a shard this watch had changes of moved to another controller replica before they were sent: list again";
                            return Some((Step::Gone(why.to_owned()), self));
                        }
                    }
                    if !items.is_empty() {
                        return Some((Step::Items(items, listed_at), self));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::query::Query;
    use crate::live::store::test_state;

    #[tokio::test]
    async fn changes_of_a_shard_gone_elsewhere_end_a_watch_behind_them_with_gone() {
        let live = Arc::new(Live::new(100, usize::MAX, 1));
        live.read()
            .apply(("a".into(), "d1".into()), test_state(1, 1.0));
        live.read()
            .apply(("a".into(), "d1".into()), test_state(2, 1.0));
        // No shard is owned here any more: d1's shard went elsewhere.
        let shards = Arc::new(Shards::new(4, "r0"));
        assert_eq!(live.forget(|_, _| false), 1);

        // A watch that had read up to the first change has the second to send, which no
        // replica will send now: it must list again.
        let behind = Cursor::resuming(None, Query::default(), live.read().resource_version() - 1);
        let mut steps = local(Arc::clone(&live), behind, Some(Arc::clone(&shards)));
        assert!(matches!(steps.next().await, Some(Step::Gone(_))));
        assert!(steps.next().await.is_none(), "nothing after Gone");

        // A watch from after the move has nothing lost: it waits for changes.
        let after = Cursor::resuming(None, Query::default(), live.read().resource_version());
        let mut steps = local(live, after, Some(shards));
        let next = tokio::time::timeout(Duration::from_millis(100), steps.next()).await;
        assert!(next.is_err(), "no step: {next:?}");
    }

    #[tokio::test]
    async fn a_listing_watch_says_the_version_its_list_was_read_at() {
        let live = Arc::new(Live::new(100, usize::MAX, 1));
        live.read()
            .apply(("a".into(), "d1".into()), test_state(1, 1.0));
        let at = live.read().resource_version();
        let mut steps = local(
            Arc::clone(&live),
            Cursor::listing(None, Query::default()),
            None,
        );
        match steps.next().await {
            Some(Step::Items(items, listed_at)) => {
                assert_eq!(items.len(), 1);
                assert_eq!(listed_at, Some(at));
            }
            other => panic!("{other:?}"),
        }
    }
}
