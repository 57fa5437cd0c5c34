//! The agent's storage on a bad day: the data_dir's filesystem fills up while devices
//! publish, then space comes back; the database file is damaged; the agent fails to start
//! after opening it. Real agent process with its embedded broker, a real (small) tmpfs, raw
//! MQTT devices counting their PUBACKs.

// Integration tests: a failed unwrap is a failed test with its location.
#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use edgesync_e2e::agent::{AgentConfig, http_get, spawn_agent};
use edgesync_e2e::raw_mqtt::{RawClient, connect_packet, connect_when_up};
use edgesync_e2e::wait;
use rumqttc::{Packet, Publish, QoS};

/// A tmpfs of `size` mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount ({e})"));
        assert!(
            out.status.success(),
            "mounting a {size} tmpfs failed ({}): this test fills a real filesystem and needs root (or CAP_SYS_ADMIN); run it as root or in a container with --privileged",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Self(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem holding `path` with one file until it refuses more.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 64 * 1024];
    while f.write_all(&block).is_ok() {}
    let small = [0u8; 512];
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
}

fn publish(device: &str, pkid: u16, n: u64) -> Packet {
    // About 1 KB per new device, so the database grows quickly.
    let body = format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(1000));
    let mut p = Publish::new(format!("factory/{device}/state"), QoS::AtLeastOnce, body);
    p.pkid = pkid;
    Packet::Publish(p)
}

async fn acked(c: &mut RawClient, pkid: u16, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match c.recv(left).await {
            Some(Packet::PubAck(a)) if a.pkid == pkid => return true,
            Some(_) => {}
            None => return false,
        }
    }
    false
}

fn stored_n(db: &Path, device: &str) -> Option<u64> {
    edgesync_agent::cli::shadow_get(db, device)
        .unwrap()
        .and_then(|s| s["state"]["reported"]["n"].as_u64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_acknowledgements_and_ingest_resumes_by_itself_when_space_returns() {
    let root = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&root.path().join("fs"), "12m");
    let data = fs.0.join("data");
    let http = edgesync_e2e::free_port();
    let port = edgesync_e2e::free_port();
    let mut config = AgentConfig::embedded(&data, port);
    config.http_port = Some(http);
    let mut agent = spawn_agent(&config);
    let db = data.join(edgesync_agent::config::DB_FILE);
    let mut dev = connect_when_up(
        port,
        connect_packet("line-1", false, None, None),
        Duration::from_secs(30),
    )
    .await;

    // Healthy: every message acknowledged.
    let mut acknowledged: Vec<(String, u64)> = Vec::new();
    let mut pkid = 0u16;
    let next = |pkid: &mut u16| {
        *pkid = pkid.wrapping_add(1).max(1);
        *pkid
    };
    for i in 0..100 {
        let device = format!("dev-{i}");
        let id = next(&mut pkid);
        dev.send(&publish(&device, id, 1)).await;
        assert!(
            acked(&mut dev, id, Duration::from_secs(10)).await,
            "healthy publish {i}"
        );
        acknowledged.push((device, 1));
    }

    // The filesystem fills up: publishing goes on until a message is not acknowledged.
    fill(&fs.0.join("filler"));
    let mut stuck = None;
    for i in 100..2000 {
        let device = format!("dev-{i}");
        let id = next(&mut pkid);
        dev.send(&publish(&device, id, 1)).await;
        if acked(&mut dev, id, Duration::from_secs(3)).await {
            acknowledged.push((device, 1));
        } else {
            stuck = Some((device, id));
            break;
        }
    }
    let (stuck_device, stuck_id) = stuck.expect("a full disk must stop acknowledgements");
    let ready = wait::until(
        "/readyz failing with the reason",
        Duration::from_secs(20),
        || async {
            let r = http_get(http, "/readyz");
            (r.starts_with("HTTP/1.1 503") && r.contains("cannot commit")).then_some(r)
        },
    )
    .await;
    assert!(ready.contains("free space"), "{ready}");
    assert!(
        edgesync_e2e::controller::metric_value(
            &edgesync_e2e::agent::metrics(http),
            "edgesync_agent_store_commit_failing"
        ) == 1.0
    );

    // Space returns: the stuck message is acknowledged without any restart or reconnect by
    // the device, and new ones flow again.
    std::fs::remove_file(fs.0.join("filler")).unwrap();
    let freed = Instant::now();
    assert!(
        acked(&mut dev, stuck_id, Duration::from_secs(60)).await,
        "the message held while the disk was full is acknowledged once space is back"
    );
    eprintln!(
        "ingest resumed {} ms after space returned",
        freed.elapsed().as_millis()
    );
    acknowledged.push((stuck_device, 1));
    for i in 0..100 {
        let device = format!("after-{i}");
        let id = next(&mut pkid);
        dev.send(&publish(&device, id, 2)).await;
        assert!(
            acked(&mut dev, id, Duration::from_secs(10)).await,
            "publish {i} after recovery"
        );
        acknowledged.push((device, 2));
    }
    wait::until("/readyz ok again", Duration::from_secs(20), || async {
        http_get(http, "/readyz")
            .starts_with("HTTP/1.1 200")
            .then_some(())
    })
    .await;
    // Every acknowledged message is stored.
    let missing: Vec<_> = acknowledged
        .iter()
        .filter(|(d, n)| stored_n(&db, d) != Some(*n))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not stored: {missing:?}"
    );
    assert!(agent.is_running());
    agent.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_on_the_same_data_dir_refuses_to_start_and_names_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let port = edgesync_e2e::free_port();
    let config = AgentConfig::embedded(dir.path(), port);
    let mut first = spawn_agent(&config);
    wait::port_open("the first agent's broker", port, Duration::from_secs(30)).await;
    // Same data_dir, another port.
    let mut second = AgentConfig::embedded(dir.path(), edgesync_e2e::free_port());
    second.data_dir = dir.path().to_owned();
    let path = dir.path().join("second.toml");
    std::fs::write(&path, second.to_toml()).unwrap();
    let out = Command::new("timeout")
        .arg("30")
        .arg(edgesync_e2e::agent::agent_binary())
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second agent must not run");
    let pid = first.pid().unwrap();
    assert!(
        stderr.contains("in use by") && stderr.contains(&format!("pid {pid}")),
        "the error must name the agent holding the data_dir: {stderr}"
    );
    // The read-only CLI still works while the first agent runs.
    let list = Command::new(edgesync_e2e::agent::agent_binary())
        .args(["shadow", "list", "--config"])
        .arg(dir.path().join("agent.toml"))
        .output()
        .unwrap();
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    assert!(first.is_running());
    first.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_durability_mode_runs_with_its_sqlite_settings() {
    for (mode, synchronous) in [("power-loss-safe", "full"), ("crash-safe", "normal")] {
        let dir = tempfile::tempdir().unwrap();
        let http = edgesync_e2e::free_port();
        let mut config = AgentConfig::embedded(dir.path(), edgesync_e2e::free_port());
        config.http_port = Some(http);
        config.extra = format!("[store]\ndurability = \"{mode}\"\n");
        let mut agent = spawn_agent(&config);
        // Read back by the agent from its own connection (synchronous is per connection).
        let expected = format!(
            "edgesync_agent_store_info{{journal_mode=\"wal\",synchronous=\"{synchronous}\"}}"
        );
        wait::until(
            &format!("{mode}: {expected}"),
            Duration::from_secs(30),
            || async {
                let m = edgesync_e2e::agent::metrics(http);
                (edgesync_e2e::controller::metric_value(&m, &expected) == 1.0).then_some(())
            },
        )
        .await;
        // The journal mode is also in the file itself.
        let db = dir.path().join(edgesync_agent::config::DB_FILE);
        let conn =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
        let journal: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(journal, "wal", "{mode}");
        agent.stop();
    }
}

/// A start-up failure after the store and the embedded broker have started (here the HTTP
/// port is taken) stops what had started as a shutdown would: the error says what failed,
/// every task is joined and the database is closed. SQLite removes the `-wal` file when its
/// last connection closes; a process that ends with the store's thread still running leaves
/// it behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_up_failure_stops_what_had_started_and_closes_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = AgentConfig::embedded(dir.path(), edgesync_e2e::free_port());
    config.http_port = Some(taken.local_addr().unwrap().port());
    let (status, stderr) = run_to_exit(&config.write());
    assert!(!status.success(), "the agent ran without its HTTP port");
    assert!(
        stderr.contains("binding http.listen"),
        "the error must say what failed: {stderr}"
    );
    assert!(
        stderr.contains("Stopped"),
        "the agent did not stop what had started: {stderr}"
    );
    let db = dir.path().join(edgesync_agent::config::DB_FILE);
    assert!(db.exists(), "the store was not opened before the failure");
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    assert!(
        !wal.exists(),
        "the database was not closed: {} is left behind",
        wal.display()
    );
}

/// Runs `edgesync-agent run` on `config` to its end (at most 30 s): the exit status and
/// stderr.
fn run_to_exit(config: &Path) -> (std::process::ExitStatus, String) {
    let out = Command::new("timeout")
        .arg("30")
        .arg(edgesync_e2e::agent::agent_binary())
        .args(["run", "--config"])
        .arg(config)
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Connects as a device and has update `n` of dev-1 acknowledged (so committed).
async fn update_acknowledged(port: u16, n: u16) {
    let mut dev = connect_when_up(
        port,
        connect_packet("line-1", false, None, None),
        Duration::from_secs(30),
    )
    .await;
    dev.send(&publish("dev-1", n, u64::from(n))).await;
    assert!(
        acked(&mut dev, n, Duration::from_secs(10)).await,
        "update {n} of dev-1 was not acknowledged"
    );
}

/// A database a flash card damaged: the agent refuses it with a message that says it is
/// damaged and what to do, writes nothing to it, and starts on a new database once the
/// operator has moved the damaged one aside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_database_is_refused_untouched_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let port = edgesync_e2e::free_port();
    let config = AgentConfig::embedded(dir.path(), port);
    let config_path = config.write();
    let db = dir.path().join(edgesync_agent::config::DB_FILE);
    let mut agent = spawn_agent(&config);
    update_acknowledged(port, 1).await;
    assert_eq!(agent.stop().and_then(|s| s.code()), Some(0));

    // Garbage over the page the outbox's table starts on.
    let (root, page_size): (i64, i64) = {
        let c = rusqlite::Connection::open(&db).unwrap();
        let root = c
            .query_row(
                "SELECT rootpage FROM sqlite_master WHERE name = 'outbox'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        (
            root,
            c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap(),
        )
    };
    let mut bytes = std::fs::read(&db).unwrap();
    let page = ((root - 1) * page_size) as usize;
    bytes[page..page + 64].fill(0xA5);
    std::fs::write(&db, &bytes).unwrap();

    let (status, stderr) = run_to_exit(&config_path);
    assert!(!status.success(), "the agent ran on a damaged database");
    assert!(
        stderr.contains(&format!("{} is damaged", db.display()))
            && stderr.contains("move it aside with its -wal and -shm files"),
        "the error must say the database is damaged and what to do: {stderr}"
    );
    assert_eq!(
        std::fs::read(&db).unwrap(),
        bytes,
        "the damaged file was written to"
    );

    // Moved aside, as the message says: the agent starts on a new database.
    std::fs::rename(&db, db.with_extension("db.damaged")).unwrap();
    let mut agent = spawn_agent(&config);
    update_acknowledged(port, 2).await;
    assert_eq!(stored_n(&db, "dev-1"), Some(2));
    agent.stop();
}
