//! Test harness for edgesync: real parts, started and stopped by the tests themselves.
//!
//! - [`bystander`]: another client of the API server, for what a load costs everyone else.
//! - [`cluster`]: one real Kubernetes control plane (etcd + kube-apiserver, built from the
//!   official Go modules by `hack/ensure-k8s.sh`) shared by all tests of a test binary, with
//!   the CRDs applied and one namespace per test.
//! - [`mosquitto`]: Debian's Mosquitto, one instance per test on a free port, with
//!   persistence on and an unlimited queue so QoS1 sessions survive client crashes.
//! - [`proxy`]: a TCP fault proxy tests can cut, delay, black-hole and restore.
//! - [`process`]: child processes that die with the test (even on panic or abort), keep
//!   their logs, and print them when a test fails.
//! - [`raw_mqtt`]: a raw MQTT 3.1.1 client over TCP that can lie, flood and stall, for
//!   attacking the embedded broker.
//! - [`pki`]: a throwaway CA (openssl CLI) issuing server and client certificates.
//! - [`wait`]: waiting on conditions with deadlines, never on fixed sleeps.
//! - [`contract`]: a server speaking the controller's HTTP contract, for agent tests.
//! - [`agent`]: agent configs and the release agent binary as a process.
//! - [`stack`]: the whole path (Mosquitto, agent, fault proxy, controller) for end-to-end tests.
//! - [`live`]: the controller's live API registered with the aggregation layer.
//! - [`sim`]: `edgesync-sim`, the shop-floor simulator, and waiting for its machines.
//! - [`controller`]: the release controller binary as a process, EdgeNodes and their tokens,
//!   and a small client for its HTTP API.
//!
//! Everything here panics with a message saying what failed and how to fix the machine:
//! it is test infrastructure, and a test that cannot get its prerequisites must fail loudly.

#![allow(clippy::print_stdout)]

pub mod agent;
pub mod bystander;
pub mod cluster;
pub mod contract;
pub mod controller;
pub mod crash_publisher;
pub mod device;
pub mod live;
pub mod measure;
pub mod mosquitto;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod raw_mqtt;
pub mod sim;
pub mod sparkplug;
pub mod stack;
pub mod vm;
pub mod wait;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Command;

/// The workspace root (where `Cargo.toml`, `crds/` and `hack/` live).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("invariant: tests/ sits inside the workspace")
        .to_path_buf()
}

/// A loopback port that was free a moment ago, for a server a test is about to start.
///
/// The port comes from below the kernel's ephemeral range (`ip_local_port_range`), never from
/// it: an ephemeral port released here can be taken at once as the local end of any outgoing
/// connection (a flood test opens thousands), and the server then fails with "Address already
/// in use". Below the range only servers bind. One counter per process hands out each port
/// once; its start depends on the process id, so test binaries that overlap rarely meet, and a
/// port something else holds is skipped.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = server_port_range();
    let span = u32::from(high - low);
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = low + u16::try_from(offset).expect("invariant: offset < span <= u16::MAX");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {low}..{high}: every one is in use");
}

/// The ports servers in tests use: from 10000 up to the start of the ephemeral range.
fn server_port_range() -> (u16, u16) {
    const LOW: u16 = 10_000;
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    assert!(
        ephemeral_start > LOW + 1_000,
        "the ephemeral port range starts at {ephemeral_start}, leaving too few ports below it \
         for test servers; raise it with `sysctl net.ipv4.ip_local_port_range=\"32768 60999\"`"
    );
    (LOW, ephemeral_start)
}

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Runs a `hack/ensure-*.sh` script (fast when its result is cached) and returns the path it
/// prints as its last line.
///
/// # Panics
/// When the script fails, with its explanation (printed above) and how to retry.
pub fn ensured(script: &str, what: &str) -> PathBuf {
    let script = workspace_root().join(script);
    let out = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed (see its message above). It {what}; run `make deps` to retry.",
        script.display()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(stdout.lines().last().unwrap_or_default().trim())
}

/// Builds the release binary `bin` of `package` and returns its path (cargo makes a rebuild
/// of an unchanged package a no-op).
///
/// Each binary gets a target dir of its own (`target/<dir>`): built alone, a package resolves
/// its dependencies' features differently than inside the test build, and a shared dir would
/// rebuild it every time.
///
/// # Panics
/// When the build fails.
pub fn release_binary(package: &str, bin: &str, dir: &str) -> PathBuf {
    let target = workspace_root().join("target").join(dir);
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "-q", "-p", package, "--bin", bin])
        .arg("--target-dir")
        .arg(&target)
        .current_dir(workspace_root())
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo build for {package}: {e}"));
    assert!(status.success(), "building the release {package} failed");
    target.join("release").join(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_and_outside_the_ephemeral_range() {
        let (low, high) = server_port_range();
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        assert!(ports.iter().all(|p| (low..high).contains(p)), "{ports:?}");
        let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
    }
}
