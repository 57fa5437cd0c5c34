//! The store against a real SQLite file: commits, outbox, batch numbers, reopen, failures.

use super::*;
use crate::config::Durability;
use serde_json::json;

fn settings(dir: &Path) -> StoreSettings {
    StoreSettings {
        path: dir.join("t.db"),
        durability: Durability::PowerLossSafe,
        max_commit_batch: 64,
        min_commit_interval: std::time::Duration::ZERO,
        max_devices: 3,
    }
}

/// The next batch of up to 10 reports, with nothing in flight; there must be one.
async fn read_batch(store: &Store) -> PendingBatch {
    store
        .next_batch(10, 1 << 20, Arc::default())
        .await
        .unwrap()
        .expect("a pending batch")
}

fn req(v: Value) -> UpdateRequest {
    UpdateRequest {
        reported: Some(v.as_object().unwrap().clone()),
        client_token: None,
        version: None,
        connected: None,
        dialect: Dialect::Native,
    }
}

#[tokio::test]
async fn outbox_figures_follow_commits_and_a_queued_ack_applies_before_the_next_read() {
    let dir = tempfile::tempdir().unwrap();
    let (store, h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
    assert_eq!(store.health().outbox(), (0, 0));
    for d in ["a", "b"] {
        store.update(d.into(), req(json!({"n": 1}))).await.unwrap();
    }
    assert_eq!(store.health().outbox().0, 2);
    let batch = read_batch(&store).await;
    let covered = batch.covered();
    // Not awaited; the read queued right behind it must not see the rows it removes.
    store.queue_ack(batch.seq, covered).await.unwrap();
    assert!(
        store
            .next_batch(10, 1 << 20, Arc::default())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(store.health().outbox(), (0, 0));
    drop(store);
    h.join().unwrap();
}

#[tokio::test]
async fn a_device_in_flight_goes_again_only_when_newer_and_after_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (store, h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
    for d in ["a", "b"] {
        store.update(d.into(), req(json!({"n": 1}))).await.unwrap();
    }
    let first = read_batch(&store).await;
    let in_flight: Arc<InFlight> = Arc::new(first.covered().into_iter().collect());
    assert_eq!(in_flight.len(), 2);
    // Nothing newer than what is in flight: nothing to send.
    assert!(
        store
            .next_batch(10, 1 << 20, in_flight.clone())
            .await
            .unwrap()
            .is_none()
    );
    // "a" (the oldest) changes while in flight, then "c" appears: "c" goes first, and with
    // room for one report only, alone.
    store
        .update("a".into(), req(json!({"n": 2})))
        .await
        .unwrap();
    store
        .update("c".into(), req(json!({"n": 1})))
        .await
        .unwrap();
    let devices =
        |b: PendingBatch| -> Vec<String> { b.reports.into_iter().map(|r| r.device).collect() };
    let one = store
        .next_batch(1, 1 << 20, in_flight.clone())
        .await
        .unwrap();
    assert_eq!(devices(one.unwrap()), ["c"]);
    let both = store.next_batch(10, 1 << 20, in_flight).await.unwrap();
    assert_eq!(devices(both.unwrap()), ["c", "a"]);
    drop(store);
    h.join().unwrap();
}

/// The writer follows its `Pacer` (whose rules `pacing.rs` tests on injected time).
#[tokio::test]
async fn a_stream_of_updates_is_paced_but_an_idle_store_and_the_uplink_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let interval = std::time::Duration::from_millis(800);
    let s = StoreSettings {
        min_commit_interval: interval,
        ..settings(dir.path())
    };
    let (store, h) = Store::open(&s, Limits::default()).unwrap();
    let start = std::time::Instant::now();
    store
        .update("d".into(), req(json!({"n": 1})))
        .await
        .unwrap();
    let first = start.elapsed();
    // Right behind a commit of an update: the next one waits out the interval.
    store
        .update("d".into(), req(json!({"n": 2})))
        .await
        .unwrap();
    let second = start.elapsed();
    // The uplink's batch read, right behind that: at once.
    let batch = store.next_batch(10, 1 << 20, Arc::default()).await.unwrap();
    let read = start.elapsed() - second;
    assert!(first < interval / 2, "idle: committed after {first:?}");
    assert!(second >= interval, "paced: committed after {second:?}");
    assert!(read < interval / 2, "the batch read waited {read:?}");
    assert!(batch.is_some());
    // Many messages at once (clients waiting on their acknowledgements) make a large
    // group; after one, the next commit is not held back.
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..40 {
        let store = store.clone();
        burst.spawn(async move { store.update("d".into(), req(json!({"n": i}))).await });
    }
    while let Some(r) = burst.join_next().await {
        r.unwrap().unwrap();
    }
    let after_burst = std::time::Instant::now();
    store
        .update("d".into(), req(json!({"n": 3})))
        .await
        .unwrap();
    let waited = after_burst.elapsed();
    assert!(
        waited < interval / 2,
        "after a large group, waited {waited:?}"
    );
    drop(store);
    h.join().unwrap();
}

fn synced_commits(store: &Store) -> u64 {
    let metrics = crate::metrics::Metrics::new();
    metrics.register_collector(store.health());
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix("edgesync_agent_store_synced_commits_total "))
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn batch_reads_cost_no_fsync_and_seq_never_goes_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let (store, h) = Store::open(&s, Limits::default()).unwrap();
    let mut last = 0;
    for n in 0..5 {
        store
            .update("a".into(), req(json!({ "n": n })))
            .await
            .unwrap();
        let synced = synced_commits(&store);
        let batch = read_batch(&store).await;
        assert!(batch.seq > last);
        last = batch.seq;
        let covered = vec![("a".to_owned(), batch.reports[0].version)];
        store.ack(batch.seq, covered).await.unwrap();
        // Only the first read reserves numbers, durably; acknowledgements need no fsync.
        let fsyncs = synced_commits(&store) - synced;
        assert_eq!(fsyncs, u64::from(n == 0), "batch {n}");
    }
    drop(store);
    h.join().unwrap();
    // As if a power cut had lost the last batch reads' seq writes.
    let conn = Connection::open(&s.path).unwrap();
    let stale = conn.execute("UPDATE meta SET value = '1' WHERE key = 'seq'", []);
    assert_eq!(stale.unwrap(), 1);
    drop(conn);
    let (store, h) = Store::open(&s, Limits::default()).unwrap();
    let seq = store.heartbeat_seq().await.unwrap();
    assert!(seq > last, "seq went back from {last} to {seq}");
    drop(store);
    h.join().unwrap();
}

#[tokio::test]
async fn a_database_behind_its_witness_raises_a_lost_commits_alarm_until_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let (store, h) = Store::open(&s, Limits::default()).unwrap();
    for n in 0..3 {
        store
            .update("d".into(), req(json!({ "n": n })))
            .await
            .unwrap();
    }
    assert!(store.health().lost_commits().is_none());
    drop(store);
    h.join().unwrap();
    let witness = witness::path_for(&s.path);
    let recorded: u64 = std::fs::read_to_string(&witness)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(recorded >= 3, "every commit is witnessed: {recorded}");
    // As if the last 40 commits had been in a deleted -wal file.
    std::fs::write(&witness, format!("{}\n", recorded + 40)).unwrap();
    let (store, h) = Store::open(&s, Limits::default()).unwrap();
    let (lost, detail) = store.health().lost_commits().unwrap();
    assert_eq!(lost, 40);
    assert!(detail.contains("40 commits behind"), "{detail}");
    drop(store);
    h.join().unwrap();
    // Sticky: a restart does not hide it.
    let (store, h) = Store::open(&s, Limits::default()).unwrap();
    assert_eq!(store.health().lost_commits().unwrap().0, 40);
    drop(store);
    h.join().unwrap();
    assert_eq!(clear_lost_commits(&s.path).unwrap(), Some(40));
    let (store, _h) = Store::open(&s, Limits::default()).unwrap();
    assert!(store.health().lost_commits().is_none());
}

#[tokio::test]
async fn a_v4_database_upgrades_to_the_current_schema_keeping_its_pending_reports() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let (store, h) = Store::open(&s, Limits::default()).unwrap();
    store
        .update("press-1".into(), req(json!({"n": 1})))
        .await
        .unwrap();
    drop(store);
    h.join().unwrap();
    // As a v4 agent left it: the outbox's age index, no device claims, user_version 4.
    let side = Connection::open(&s.path).unwrap();
    side.execute_batch(
        "CREATE INDEX outbox_by_age ON outbox (enqueued_at_ms); DROP TABLE device_claims;
         PRAGMA user_version = 4;",
    )
    .unwrap();
    drop(side);

    let (store, _h) = Store::open(&s, Limits::default()).unwrap();
    let side = Connection::open(&s.path).unwrap();
    let (version, indexes): (i64, i64) = side
        .query_row(
            "SELECT (SELECT user_version FROM pragma_user_version),
                    (SELECT count(*) FROM sqlite_schema WHERE name = 'outbox_by_age')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((version, indexes), (6, 0));
    let batch = read_batch(&store).await;
    assert_eq!(batch.covered(), vec![("press-1".to_owned(), 1)]);
}

#[tokio::test]
async fn a_device_changing_while_its_report_is_in_flight_restarts_its_pending_age() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
    store
        .update("busy".into(), req(json!({"n": 1})))
        .await
        .unwrap();
    let batch = read_batch(&store).await;
    // Its first change, long ago (as if the link had been busy with it for an hour).
    // (The table only: the writer's copy in memory keeps the real time.)
    let side = Connection::open(dir.path().join("t.db")).unwrap();
    side.execute(
        "UPDATE outbox SET enqueued_at_ms = enqueued_at_ms - 3600000",
        [],
    )
    .unwrap();
    let table_age_s = || {
        let at: i64 = side
            .query_row("SELECT enqueued_at_ms FROM outbox", [], |r| r.get(0))
            .unwrap();
        (now_ms() - at) / 1000
    };
    assert!(table_age_s() >= 3600);
    // It changes again before the report is acknowledged.
    store
        .update("busy".into(), req(json!({"n": 2})))
        .await
        .unwrap();
    let covered = batch.covered();
    store.ack(batch.seq, covered).await.unwrap();
    let stats = store.stats().await.unwrap();
    assert_eq!(
        stats.pending_devices, 1,
        "the newer change is still pending"
    );
    assert!(
        stats.oldest_pending_age_seconds < 60,
        "age {} s: it restarts when the batch was read",
        stats.oldest_pending_age_seconds
    );
    assert!(
        table_age_s() < 60,
        "the table's age {} s: it restarts when the batch was read",
        table_age_s()
    );
}

#[test]
fn rfc3339_formats_utc() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(1_795_848_182), "2026-11-28T06:43:02Z");
    assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
}

#[tokio::test]
async fn outbox_coalesces_to_one_row_per_device_and_acks_only_covered_versions() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
    for i in 0..50 {
        store
            .update("press-1".into(), req(json!({"n": i})))
            .await
            .unwrap();
    }
    store
        .update("press-2".into(), req(json!({"n": 0})))
        .await
        .unwrap();
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.pending_devices, 2);

    let batch = read_batch(&store).await;
    assert_eq!(batch.seq, 1);
    assert_eq!(batch.reports.len(), 2);
    let p1 = batch
        .reports
        .iter()
        .find(|r| r.device == "press-1")
        .unwrap();
    assert_eq!((p1.version, p1.reported.get("n")), (50, Some(&json!(49))));

    // press-1 changes while the batch is in flight: its ack must not drop the new version.
    store
        .update("press-1".into(), req(json!({"n": 50})))
        .await
        .unwrap();
    store.ack(batch.seq, batch.covered()).await.unwrap();
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.pending_devices, stats.last_acked_seq), (1, 1));
    let next = read_batch(&store).await;
    assert_eq!(next.seq, 2);
    assert_eq!(
        (next.reports[0].device.as_str(), next.reports[0].version),
        ("press-1", 51)
    );
}

#[tokio::test]
async fn batches_take_devices_in_the_tables_order_through_acks_and_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let names =
        |b: &PendingBatch| -> Vec<String> { b.reports.iter().map(|r| r.device.clone()).collect() };
    let table = || {
        let ro = open_read_only(&dir.path().join("t.db")).unwrap();
        let (_, rows) = ro.outbox().unwrap();
        rows.into_iter().map(|(d, _)| d).collect::<Vec<_>>()
    };
    // Enqueue times are in ms: waiting until the clock has passed the current one makes
    // the next enqueue later, so the order is by age and not by name.
    let next_ms = || {
        let now = now_ms();
        while now_ms() <= now {
            std::hint::spin_loop();
        }
    };
    {
        let (store, h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
        for d in ["c", "b", "a"] {
            store.update(d.into(), req(json!({"n": 1}))).await.unwrap();
            next_ms();
        }
        let first = read_batch(&store).await;
        assert_eq!(names(&first), ["c", "b", "a"]);
        assert_eq!(names(&first), table());
        // "b" changes while in flight: acknowledged, it stays pending from the read on.
        store
            .update("b".into(), req(json!({"n": 2})))
            .await
            .unwrap();
        store.ack(first.seq, first.covered()).await.unwrap();
        next_ms();
        store
            .update("a".into(), req(json!({"n": 2})))
            .await
            .unwrap();
        let next = read_batch(&store).await;
        assert_eq!(names(&next), ["b", "a"]);
        assert_eq!(names(&next), table());
        drop(store);
        h.join().unwrap();
    }
    let (store, _h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
    let again = read_batch(&store).await;
    assert_eq!(names(&again), ["b", "a"]);
    assert_eq!(store.health().outbox().0, 2);
}

#[tokio::test]
async fn a_store_that_cannot_read_its_tables_again_applies_nothing_until_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
    store
        .update("a".into(), req(json!({"n": 1})))
        .await
        .unwrap();
    // Another connection takes the outbox away: the next transaction fails, and so does
    // reading the outbox again after it.
    let other = Connection::open(dir.path().join("t.db")).unwrap();
    other
        .busy_timeout(std::time::Duration::from_secs(5))
        .unwrap();
    other
        .execute_batch("ALTER TABLE outbox RENAME TO outbox_away")
        .unwrap();
    for n in 2..4 {
        assert!(
            store
                .update("a".into(), req(json!({"n": n})))
                .await
                .is_err(),
            "an update must fail while the outbox cannot be written or read"
        );
        assert!(store.health().is_failing());
    }
    other
        .execute_batch("ALTER TABLE outbox_away RENAME TO outbox")
        .unwrap();
    // The next group reads the tables again first, then applies.
    store
        .update("b".into(), req(json!({"n": 1})))
        .await
        .unwrap();
    assert!(!store.health().is_failing());
    let batch = read_batch(&store).await;
    let got: Vec<_> = batch
        .reports
        .iter()
        .map(|r| (r.device.as_str(), r.version, r.reported.get("n").cloned()))
        .collect();
    // Nothing of the failed updates was kept, in the database or in memory.
    assert_eq!(got, [("a", 1, Some(json!(1))), ("b", 1, Some(json!(1)))]);
    assert_eq!(store.health().outbox().0, 2);
}

#[tokio::test]
async fn state_and_seq_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
        store
            .update("a".into(), req(json!({"x": 1})))
            .await
            .unwrap();
        read_batch(&store).await;
        drop(store);
        h.join().unwrap();
    }
    let (store, _h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
    let doc = store.get("a".into()).await.unwrap().unwrap();
    assert_eq!(
        (doc.version, doc.state.reported.get("x")),
        (1, Some(&json!(1)))
    );
    // The seq is reserved durably, so it keeps increasing across restarts.
    assert!(read_batch(&store).await.seq > 1);
    let ro = open_read_only(&dir.path().join("t.db")).unwrap();
    assert_eq!(ro.list().unwrap(), vec![("a".to_owned(), 1)]);
    assert_eq!(ro.outbox().unwrap().0.pending_devices, 1);
}

#[tokio::test]
async fn a_device_id_belongs_to_the_first_dialect_that_writes_it() {
    let dir = tempfile::tempdir().unwrap();
    let sparkplug = |v| UpdateRequest {
        dialect: Dialect::Sparkplug,
        ..req(v)
    };
    {
        let (store, _h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
        let first = store.update("gw1".into(), sparkplug(json!({"a": 1})));
        assert!(matches!(
            first.await.unwrap(),
            UpdateOutcome::Accepted { .. }
        ));
        let taken = store
            .update("gw1".into(), req(json!({"a": 2})))
            .await
            .unwrap();
        let UpdateOutcome::Rejected(e) = taken else {
            panic!("another dialect wrote gw1: {taken:?}");
        };
        assert_eq!(e.code(), 409);
        assert!(e.to_string().contains("Sparkplug B"), "{e}");
        assert_eq!(store.get("gw1".into()).await.unwrap(), None, "hidden");
        let own = store.submit_get("gw1".into(), Dialect::Sparkplug).await;
        let doc = own.unwrap().await.unwrap().unwrap().unwrap();
        assert_eq!(doc.state.reported["a"], json!(1));
    }
    // The claim outlives a restart, whichever dialect speaks first then.
    let (store, _h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
    let again = store
        .update("gw1".into(), req(json!({"a": 3})))
        .await
        .unwrap();
    assert!(matches!(
        again,
        UpdateOutcome::Rejected(ShadowError::IdentityTaken { .. })
    ));
    let other = store
        .update("gw2".into(), req(json!({"a": 3})))
        .await
        .unwrap();
    assert!(matches!(other, UpdateOutcome::Accepted { .. }));
    let late = store
        .update("gw2".into(), sparkplug(json!({"a": 4})))
        .await
        .unwrap();
    assert!(matches!(
        late,
        UpdateOutcome::Rejected(ShadowError::IdentityTaken { .. })
    ));
}

#[tokio::test]
async fn rejected_updates_and_device_cap_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
    let bad = UpdateRequest {
        version: Some(9),
        ..req(json!({"a": 1}))
    };
    assert!(matches!(
        store.update("a".into(), bad).await.unwrap(),
        UpdateOutcome::Rejected(_)
    ));
    assert!(store.get("a".into()).await.unwrap().is_none());
    for d in ["a", "b", "c"] {
        store.update(d.into(), req(json!({"v": 1}))).await.unwrap();
    }
    assert!(matches!(
        store
            .update("d".into(), req(json!({"v": 1})))
            .await
            .unwrap(),
        UpdateOutcome::DeviceLimit
    ));
    assert_eq!(store.stats().await.unwrap().pending_devices, 3);
}

#[tokio::test]
async fn desired_generation_is_reported_even_without_a_change() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
    let set = |generation| {
        let store = store.clone();
        async move {
            let desired = json!({"speed": 5}).as_object().unwrap().clone();
            store
                .set_desired("a".into(), desired, generation)
                .await
                .unwrap()
                .unwrap()
        }
    };
    let pending = || store.next_batch(10, 1 << 20, Arc::default());

    assert!(set(2).await.changed);
    let b = pending().await.unwrap().unwrap();
    store
        .ack(b.seq, vec![("a".into(), b.reports[0].version)])
        .await
        .unwrap();
    assert!(!set(3).await.changed);
    let b = pending().await.unwrap().unwrap();
    assert_eq!(b.reports[0].observed_desired_version, 3);
}

/// A device's refusal is committed with its shadow, reported upstream with the shadow's next
/// version, survives a reopen, and never makes a shadow for a device that has none.
#[tokio::test]
async fn a_refusal_is_stored_reported_and_kept_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let refuse = |generation: i64| edgesync_protocol::rejection::RejectRequest {
        desired_generation: generation,
        code: "out_of_range".into(),
        message: "speed 5 is below 10".into(),
        client_token: None,
    };
    {
        let (store, h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
        let outcome = store.submit_reject("ghost".into(), refuse(1)).await;
        assert!(matches!(
            outcome.await.unwrap().unwrap(),
            UpdateOutcome::Rejected(ShadowError::GenerationNotHeld { .. })
        ));
        assert_eq!(store.get("ghost".into()).await.unwrap(), None);

        let desired = json!({"speed": 5}).as_object().unwrap().clone();
        store
            .set_desired("a".into(), desired, 2)
            .await
            .unwrap()
            .unwrap();
        let b = read_batch(&store).await;
        store.ack(b.seq, b.covered()).await.unwrap();
        let outcome = store.submit_reject("a".into(), refuse(2)).await;
        let UpdateOutcome::Accepted { applied, current } = outcome.await.unwrap().unwrap() else {
            panic!("the held generation can be refused");
        };
        assert!(applied.changed);
        let version = current.unwrap().version;
        let b = read_batch(&store).await;
        assert_eq!(b.reports[0].version, version);
        let r = b.reports[0]
            .rejection
            .clone()
            .expect("the report carries it");
        assert_eq!((r.desired_generation, r.code.as_str()), (2, "out_of_range"));
        drop(store);
        h.join().unwrap();
    }
    let (store, h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
    let doc = store.get("a".into()).await.unwrap().unwrap();
    assert_eq!(doc.rejection.unwrap().message, "speed 5 is below 10");
    drop(store);
    h.join().unwrap();
}

mod throughput {
    use super::*;
    use crate::config::Durability;
    use serde_json::json;

    /// Not a benchmark (no assertion on speed); prints the store's pipelined rate so a
    /// regression is visible in test output with `--nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelined_updates_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let settings = StoreSettings {
            path: dir.path().join("t.db"),
            durability: Durability::PowerLossSafe,
            max_commit_batch: 2048,
            min_commit_interval: std::time::Duration::ZERO,
            max_devices: 10_000,
        };
        let (store, _h) = Store::open(&settings, Limits::default()).unwrap();
        let n = 5_000;
        let start = std::time::Instant::now();
        let mut pending = std::collections::VecDeque::new();
        for i in 0..n {
            let req = UpdateRequest {
                reported: Some(
                    json!({"seq": i, "t": 20.5, "state": "running"})
                        .as_object()
                        .unwrap()
                        .clone(),
                ),
                client_token: None,
                version: None,
                connected: None,
                dialect: Dialect::Native,
            };
            pending.push_back(
                store
                    .submit_update(format!("dev-{}", i % 1000), req, false)
                    .await,
            );
            if pending.len() > 4096 {
                pending.pop_front().unwrap().await.unwrap().unwrap();
            }
        }
        while let Some(p) = pending.pop_front() {
            p.await.unwrap().unwrap();
        }
        eprintln!(
            "store: {:.0} updates/s",
            f64::from(n) / start.elapsed().as_secs_f64()
        );
        assert_eq!(store.stats().await.unwrap().pending_devices, 1000);
    }
}

#[tokio::test]
async fn an_update_a_stopped_writer_cannot_take_ends_without_an_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (store, h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
    // A handle whose writer is gone, as when the writer thread has stopped.
    let (tx, rx) = mpsc::channel(1);
    drop(rx);
    let stopped = Store {
        tx,
        health: store.health(),
        epoch: store.epoch.clone(),
    };
    let reply = stopped
        .submit_update("dev-1".into(), req(json!({"t": 1})), false)
        .await;
    // The same as a transaction that failed before applying it: the caller sees no answer,
    // counts the message not committed and leaves it unacknowledged.
    assert!(reply.await.is_err());
    drop((stopped, store));
    h.join().unwrap();
}
