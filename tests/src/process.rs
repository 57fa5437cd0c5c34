//! Child processes for tests: output captured to a log file, printed when the test fails,
//! killed when the handle drops.
//!
//! Two lifetimes exist. Per-test processes ([`ManagedProcess::spawn`]) are plain children that
//! the test can `kill -9` and restart; their `Drop` kills them, which covers panicking tests.
//! Processes that outlive any single test (the shared control plane, held in a `static` that
//! is never dropped) run under a small shell watchdog ([`ManagedProcess::spawn_tied`]) that
//! kills them when the test binary's end of a pipe closes, which happens however the test
//! binary exits.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::Duration;

/// How many trailing log lines to print when a test fails.
const LOG_TAIL_LINES: usize = 200;

/// Kills the wrapped command when stdin reaches EOF (the test binary exited), and optionally
/// removes a directory afterwards. `$1` is the cleanup dir (or empty), the rest the command.
const WATCHDOG: &str = r#"
cleanup="$1"; shift
exec 3<&0
"$@" </dev/null &
child=$!
( read -r _ <&3; kill -TERM "$child" 2>/dev/null; sleep 5; kill -KILL "$child" 2>/dev/null ) &
watcher=$!
wait "$child"; rc=$?
kill "$watcher" 2>/dev/null
if [ -n "$cleanup" ]; then rm -rf "$cleanup"; fi
exit "$rc"
"#;

/// What to run.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// Short name used in log file names and failure output.
    pub name: String,
    /// Executable.
    pub program: PathBuf,
    /// Arguments.
    pub args: Vec<OsString>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

impl ProcessSpec {
    /// A spec with no arguments.
    pub fn new(name: &str, program: impl Into<PathBuf>) -> Self {
        Self {
            name: name.to_owned(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Adds an argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }
}

/// A running (or stopped) child process with its log.
#[derive(Debug)]
pub struct ManagedProcess {
    spec: ProcessSpec,
    log_path: PathBuf,
    child: Option<Child>,
    /// Write end of the watchdog pipe; dropping it stops a tied process.
    tie: Option<ChildStdin>,
    cleanup_dir: Option<PathBuf>,
    starts: u32,
}

impl ManagedProcess {
    /// Starts a per-test process, logging to `<log_dir>/<name>.log`.
    pub fn spawn(spec: ProcessSpec, log_dir: &Path) -> Self {
        let mut p = Self::new(spec, log_dir, None);
        p.start(false);
        p
    }

    /// Starts a process that is killed when the test binary exits, however it exits, and
    /// removes `cleanup_dir` once it has stopped.
    pub fn spawn_tied(spec: ProcessSpec, log_dir: &Path, cleanup_dir: Option<PathBuf>) -> Self {
        let mut p = Self::new(spec, log_dir, cleanup_dir);
        p.start(true);
        p
    }

    fn new(spec: ProcessSpec, log_dir: &Path, cleanup_dir: Option<PathBuf>) -> Self {
        let log_path = log_dir.join(format!("{}.log", spec.name));
        Self {
            spec,
            log_path,
            child: None,
            tie: None,
            cleanup_dir,
            starts: 0,
        }
    }

    fn start(&mut self, tied: bool) {
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("open log {}: {e}", self.log_path.display()));
        self.starts += 1;
        let _ = writeln!(
            log,
            "===== start #{} of {} =====",
            self.starts, self.spec.name
        );
        let err = log.try_clone().expect("clone log file handle");
        let mut cmd = if tied {
            let mut c = Command::new("sh");
            c.arg("-c").arg(WATCHDOG).arg("edgesync-watchdog");
            c.arg(self.cleanup_dir.as_deref().unwrap_or(Path::new("")));
            c.arg(&self.spec.program).args(&self.spec.args);
            c.stdin(Stdio::piped());
            c
        } else {
            let mut c = Command::new(&self.spec.program);
            c.args(&self.spec.args).stdin(Stdio::null());
            c
        };
        cmd.stdout(log).stderr(err);
        for (k, v) in &self.spec.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {} ({}): {e}",
                self.spec.name,
                self.spec.program.display()
            )
        });
        self.tie = child.stdin.take();
        self.child = Some(child);
    }

    /// The process id of the running child (for tied processes, the watchdog's).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// `kill -9`: no chance to clean up, exactly like a crash or power cut of that process.
    ///
    /// # Panics
    /// For tied processes, whose real pid sits behind the watchdog; use [`Self::stop`].
    pub fn kill9(&mut self) {
        assert!(self.tie.is_none(), "kill9 is for per-test processes");
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the process with SIGTERM (SIGKILL after a grace period) and waits for it; returns
    /// how it exited (for tied processes, how their watchdog did), or `None` when it was not
    /// running.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if let Some(tie) = self.tie.take() {
            // Closing the pipe makes the watchdog send SIGTERM, then SIGKILL after 5 s.
            drop(tie);
            return self.child.take().and_then(|mut c| c.wait().ok());
        }
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        c.wait().ok()
    }

    /// Starts the same command again (after [`Self::kill9`] or [`Self::stop`]).
    pub fn restart(&mut self) {
        let tied = self.tie.is_some();
        if self.child.is_some() {
            self.stop();
        }
        self.start(tied);
    }

    /// Path of the log file (stdout and stderr of every start).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let Ok(f) = File::open(&self.log_path) else {
            return String::new();
        };
        let lines: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Prints the end of the log to the test's output.
    pub fn dump_log(&self) {
        eprintln!(
            "----- last {LOG_TAIL_LINES} lines of {} ({}) -----\n{}\n----- end of {} -----",
            self.spec.name,
            self.log_path.display(),
            self.log_tail(LOG_TAIL_LINES),
            self.spec.name
        );
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_log();
        }
        if self.tie.is_some() {
            self.stop();
        } else if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
