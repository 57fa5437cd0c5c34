//! What the benches measure about processes and samples: CPU time, percentiles.

use std::time::Duration;

/// Whether this is a smoke run (`EDGESYNC_BENCH_QUICK=1`, as `make bench QUICK=1` and
/// `make test` set): every bench then runs a small, short version of itself, so it cannot rot.
pub fn quick() -> bool {
    std::env::var("EDGESYNC_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `full`, or `smoke` in a [`quick`] run.
pub fn scaled<T>(full: T, smoke: T) -> T {
    if quick() { smoke } else { full }
}

/// Prints whether a target is met, as one line of a bench's report.
pub fn aim(target: &str, measured: &str, met: bool) {
    let verdict = if met { "met" } else { "missed" };
    println!("- aim: {target}; measured {measured}: **{verdict}**");
}

/// Clock ticks per second of `/proc/{pid}/stat` (USER_HZ, 100 on Linux).
pub const TICKS_PER_SECOND: f64 = 100.0;

/// CPU ticks (user + system) of a process and all its descendants (the harness starts the API
/// server under a small watchdog shell).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let after = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let own = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    own + children
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
        .map(cpu_ticks)
        .sum::<u64>()
}

/// The whole machine's CPU ticks since boot, as (busy, total) from `/proc/stat`; the share
/// busy between two readings tells whether a load left any CPU idle.
pub fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = f.iter().sum();
    // idle and iowait.
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// The share of the machine's CPU busy between two [`machine_ticks`] readings.
pub fn busy_share(before: (u64, u64), after: (u64, u64)) -> f64 {
    (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64
}

/// The `p` quantile (0..=1) of `sorted` in milliseconds, nearest rank; NaN when empty.
pub fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

/// A Prometheus histogram's cumulative buckets in a scrape, as (`le`, count) in the order
/// served (`+Inf` as infinity).
pub fn histogram_buckets(metrics: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&v, 0.5), 50.0);
        assert_eq!(percentile_ms(&v, 0.99), 99.0);
        assert_eq!(percentile_ms(&v, 1.0), 100.0);
        assert!(percentile_ms(&[], 0.5).is_nan());
        // Our own process has used some CPU.
        assert!(cpu_ticks(std::process::id()) < u64::MAX);
        let (busy, total) = machine_ticks();
        assert!(busy > 0 && busy <= total, "{busy} of {total}");
        assert_eq!(busy_share((10, 100), (60, 200)), 0.5);
    }
}
