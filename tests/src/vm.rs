//! The agent on ARM, under full-system emulation: boots the image `make arm` built
//! (hack/build-arm.sh: Debian's kernel, a busybox initramfs holding the cross-built agent) in
//! qemu-system, with host ports forwarded to the guest and a command loop on its serial console.
//!
//! qemu-user is not used: on some hosts it hangs at the first `pthread_create` of any threaded
//! program, a five-line C program included (docs/arm.md).

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a boot may take under emulation before the test fails.
const BOOT_DEADLINE: Duration = Duration::from_secs(180);

/// The guest's view of the host's loopback (QEMU user-mode networking).
pub const HOST_FROM_GUEST: &str = "10.0.2.2";

/// The directory `make arm` writes `triple`'s boot image to.
pub fn image_dir(triple: &str) -> PathBuf {
    crate::workspace_root()
        .join("target/cross")
        .join(triple)
        .join("vm")
}

/// The cross-built agent binary for `triple` (release-small profile).
pub fn arm_agent_binary(triple: &str) -> PathBuf {
    crate::workspace_root()
        .join("target/cross")
        .join(triple)
        .join("release-small/edgesync-agent")
}

/// Console output so far, and a signal for each new line.
#[derive(Default)]
struct Console {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

/// A booted emulated ARM machine.
pub struct Vm {
    triple: String,
    child: Child,
    stdin: ChildStdin,
    console: Arc<Console>,
    /// Console lines already consumed by [`Vm::run`].
    read: usize,
    forwards: Vec<(u16, u16)>,
    disk: Option<PathBuf>,
    /// Holds the initrd with the test's files.
    scratch: tempfile::TempDir,
}

impl Vm {
    /// Boots `triple`'s image with `files` (guest path, contents) added to its root file system
    /// and the guest TCP ports `forward` reachable on host loopback ports; returns when the
    /// guest's command loop is ready.
    ///
    /// # Panics
    /// When the image is missing (run `make arm`) or the guest does not boot in time.
    pub fn boot(triple: &str, files: &[(&str, &str)], forward: &[u16]) -> Vm {
        Self::boot_with_disk(triple, files, forward, None)
    }

    /// [`Vm::boot`] with `disk` (a raw image holding an ext4 file system, see [`make_disk`])
    /// as the guest's persistent `/var/lib/edgesync`.
    pub fn boot_with_disk(
        triple: &str,
        files: &[(&str, &str)],
        forward: &[u16],
        disk: Option<&Path>,
    ) -> Vm {
        let scratch = tempfile::tempdir().expect("vm scratch dir");
        let dir = image_dir(triple);
        write_initrd(
            &dir.join("initrd.gz"),
            files,
            &scratch.path().join("initrd"),
            scratch.path(),
        );
        let forwards = forward
            .iter()
            .map(|&guest| (crate::free_port(), guest))
            .collect();
        Self::start(triple, scratch, forwards, disk.map(Path::to_owned))
    }

    /// Cuts the machine's power (SIGKILL to the emulator: whatever the guest had not written
    /// to its disk is gone, as on a real power loss) and boots it again with the same files,
    /// ports and disk.
    pub fn power_cycle(self) -> Vm {
        let mut this = self;
        let _ = this.child.kill();
        let _ = this.child.wait();
        let triple = std::mem::take(&mut this.triple);
        let forwards = std::mem::take(&mut this.forwards);
        let disk = this.disk.take();
        let scratch = std::mem::replace(
            &mut this.scratch,
            tempfile::tempdir().expect("vm scratch dir"),
        );
        drop(this);
        Self::start(&triple, scratch, forwards, disk)
    }

    fn start(
        triple: &str,
        scratch: tempfile::TempDir,
        forwards: Vec<(u16, u16)>,
        disk: Option<PathBuf>,
    ) -> Vm {
        let dir = image_dir(triple);
        let qemu = std::fs::read_to_string(dir.join("qemu")).unwrap_or_else(|_| {
            panic!(
                "no emulator image for {triple} in {}: run `make arm` (hack/build-arm.sh) first",
                dir.display()
            )
        });
        let mut netdev = "user,id=n0".to_owned();
        for (host, guest) in &forwards {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
        }
        let mut append = "console=ttyAMA0 rdinit=/init quiet".to_owned();
        let mut words = qemu.split_whitespace();
        let program = words.next().expect("qemu file names the emulator");
        let mut cmd = Command::new(program);
        cmd.args(words)
            .args(["-smp", "2", "-m", "512", "-nographic", "-monitor", "none"])
            .arg("-no-reboot")
            .args(["-netdev", &netdev])
            // romfile= : Debian's qemu-system-arm lacks the virtio-net option ROM, and the
            // kernel is booted directly, so none is needed.
            .args(["-device", "virtio-net-pci,netdev=n0,romfile="]);
        if let Some(disk) = &disk {
            cmd.arg("-drive")
                .arg(format!("file={},if=none,format=raw,id=d0", disk.display()))
                .args(["-device", "virtio-blk-pci,drive=d0,romfile="]);
            // The guest's /init mounts it on the data dir.
            append.push_str(" edgesync.disk");
        }
        let mut child = cmd
            .arg("-kernel")
            .arg(dir.join("vmlinuz"))
            .arg("-initrd")
            .arg(scratch.path().join("initrd"))
            .args(["-append", &append])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program} (run `make arm`): {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let console = Arc::new(Console::default());
        let sink = console.clone();
        // Detached on purpose: it ends at EOF, when the emulator exits or is killed.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_owned();
                sink.lines.lock().expect("console lock").push(line);
                sink.grew.notify_all();
            }
            sink.grew.notify_all();
        });
        let mut vm = Vm {
            triple: triple.to_owned(),
            child,
            stdin,
            console,
            read: 0,
            forwards,
            disk,
            scratch,
        };
        let started = Instant::now();
        vm.wait_line(BOOT_DEADLINE, |l| l.starts_with("EDGESYNC-VM-READY"))
            .unwrap_or_else(|| {
                panic!(
                    "{triple} guest not ready within {BOOT_DEADLINE:?}; console:\n{}",
                    vm.console_text()
                )
            });
        eprintln!("vm: {triple} booted in {:?}", started.elapsed());
        vm
    }

    /// The host loopback port forwarded to guest port `guest`.
    ///
    /// # Panics
    /// When `guest` was not forwarded at boot.
    pub fn host_port(&self, guest: u16) -> u16 {
        self.forwards
            .iter()
            .find(|(_, g)| *g == guest)
            .map(|(h, _)| *h)
            .unwrap_or_else(|| panic!("guest port {guest} was not forwarded"))
    }

    /// Runs `command` with the guest's shell; returns its exit code and output (stdout and
    /// stderr). Commands run one at a time, in order.
    ///
    /// # Panics
    /// When no answer comes within `deadline`.
    pub fn run(&mut self, command: &str, deadline: Duration) -> (i32, String) {
        assert!(!command.contains('\n'), "one line per command");
        writeln!(self.stdin, "{command}").expect("write to the guest console");
        self.stdin.flush().expect("flush the guest console");
        let from = self.read;
        let Some(done) = self.wait_line(deadline, |l| l.starts_with("@@done ")) else {
            panic!(
                "guest did not finish `{command}` within {deadline:?}; console:\n{}",
                self.console_text()
            )
        };
        let lines = self.console.lines.lock().expect("console lock");
        let code = lines[done]
            .trim_start_matches("@@done ")
            .trim()
            .parse()
            .unwrap_or(-1);
        (code, lines[from..done].join("\n"))
    }

    /// Runs `command` and returns its output; panics unless it exits 0.
    pub fn sh(&mut self, command: &str) -> String {
        let (code, out) = self.run(command, Duration::from_secs(60));
        assert_eq!(code, 0, "guest `{command}` failed:\n{out}");
        out
    }

    /// Everything the guest printed on its console.
    pub fn console_text(&self) -> String {
        self.console.lines.lock().expect("console lock").join("\n")
    }

    /// Waits for the first unread console line matching `pred`; marks it and everything before
    /// it read and returns its index.
    fn wait_line(&mut self, deadline: Duration, pred: impl Fn(&str) -> bool) -> Option<usize> {
        let end = Instant::now() + deadline;
        let mut lines = self.console.lines.lock().expect("console lock");
        loop {
            if let Some(i) = lines[self.read..].iter().position(|l| pred(l)) {
                let at = self.read + i;
                self.read = at + 1;
                return Some(at);
            }
            let now = Instant::now();
            if now >= end || self.child.try_wait().ok().flatten().is_some() {
                return None;
            }
            lines = self
                .console
                .grew
                .wait_timeout(lines, (end - now).min(Duration::from_secs(1)))
                .expect("console lock")
                .0;
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw disk image of `mib` MiB at `path` holding an empty ext4 file system, for
/// [`Vm::boot_with_disk`].
///
/// # Panics
/// When `mkfs.ext4` (Debian's e2fsprogs) fails.
pub fn make_disk(path: &Path, mib: u64) {
    let file = std::fs::File::create(path).expect("create disk image");
    file.set_len(mib << 20).expect("size disk image");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(path)
        .output()
        .expect("mkfs.ext4 (Debian's e2fsprogs)");
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The image's initrd with `files` appended as a second cpio archive: the kernel unpacks
/// concatenated archives in order, so the base image is built once per agent binary.
fn write_initrd(base: &Path, files: &[(&str, &str)], out: &Path, scratch: &Path) {
    let mut bytes = std::fs::read(base).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}): run `make arm` (hack/build-arm.sh) first",
            base.display()
        )
    });
    let root = scratch.join("extra");
    let mut names = String::new();
    for (path, contents) in files {
        let rel = path.trim_start_matches('/');
        let dest = root.join(rel);
        std::fs::create_dir_all(dest.parent().expect("a file has a parent"))
            .expect("create extra dir");
        std::fs::write(&dest, contents).expect("write extra file");
        names.push_str(rel);
        names.push('\n');
    }
    let mut cpio = Command::new("cpio")
        .args(["-o", "-H", "newc", "-R", "0:0", "--quiet"])
        .current_dir(&root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("cpio (Debian's cpio package; `make arm` installs it)");
    cpio.stdin
        .take()
        .expect("piped")
        .write_all(names.as_bytes())
        .expect("write cpio file list");
    let archive = cpio.wait_with_output().expect("cpio output");
    assert!(archive.status.success(), "cpio failed");
    // An uncompressed archive after a compressed one must start 4-byte aligned; the kernel
    // skips the zero padding.
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    bytes.extend_from_slice(&archive.stdout);
    std::fs::write(out, bytes).expect("write initrd");
}
