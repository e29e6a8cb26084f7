//! QEMU for tests: qcow2 images, the guest's command line, a QEMU started outside vmlock, and a
//! guest under `vmlock run`. Waiting for QMP is `vmlock_client::qmp::Qmp::connect_when_ready` (bounded).

use crate::process::{kill_and_wait, kill_child, read_line};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Output, Stdio};
use std::time::Duration;

/// The emulator (TCG, so no KVM is needed).
pub const PROGRAM: &str = "qemu-system-x86_64";

/// How long `vmlock run` may take to report its guest started (sanlock joins take seconds).
pub const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Creates an empty 16 MiB qcow2 image `dir/name`.
pub fn qcow2(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&p)
        .arg("16M")
        .status()
        .expect("run qemu-img (is QEMU installed?)");
    assert!(ok.success(), "qemu-img create {}", p.display());
    p
}

/// Whether QEMU can be run here.
pub fn available() -> bool {
    Command::new(PROGRAM).arg("--version").output().is_ok()
}

/// A guest's command line: no OS, no display, qcow2 disks, QMP sockets.
#[derive(Debug, Clone)]
pub struct QemuLine {
    /// Memory in MiB.
    pub memory_mb: u32,
    /// QMP server sockets (QEMU serves one client per socket).
    pub qmp: Vec<PathBuf>,
    /// Disks, `f{i}` (file) under `d{i}` (qcow2).
    pub disks: Vec<PathBuf>,
    /// Disks as `scsi-hd` on the SCSI controller instead of `virtio-blk-pci`.
    pub scsi_disks: bool,
    /// A `virtio-scsi-pci` controller `scsi0` (for hotplug, or `scsi_disks`).
    pub scsi_controller: bool,
    /// Arguments appended as they are.
    pub extra: Vec<String>,
}

impl QemuLine {
    /// One virtio-blk disk, 32 MiB, nothing else.
    pub fn new(disk: &Path) -> Self {
        QemuLine {
            memory_mb: 32,
            qmp: Vec::new(),
            disks: vec![disk.to_owned()],
            scsi_disks: false,
            scsi_controller: false,
            extra: Vec::new(),
        }
    }

    /// Adds a QMP server socket.
    pub fn qmp(mut self, path: &Path) -> Self {
        self.qmp.push(path.to_owned());
        self
    }

    /// Adds the SCSI controller `scsi0`.
    pub fn scsi_controller(mut self) -> Self {
        self.scsi_controller = true;
        self
    }

    /// Appends arguments.
    pub fn extra<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.extra
            .extend(args.iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// The arguments, without the program.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = [
            "-nodefaults",
            "-display",
            "none",
            "-machine",
            "q35,accel=tcg",
            "-m",
        ]
        .map(String::from)
        .to_vec();
        a.push(self.memory_mb.to_string());
        for q in &self.qmp {
            a.push("-qmp".into());
            a.push(format!("unix:{},server=on,wait=off", q.display()));
        }
        if self.scsi_controller || self.scsi_disks {
            a.extend(["-device".into(), "virtio-scsi-pci,id=scsi0".into()]);
        }
        for (i, d) in self.disks.iter().enumerate() {
            a.push("-blockdev".into());
            a.push(format!(
                "driver=file,filename={},node-name=f{i}",
                d.display()
            ));
            a.push("-blockdev".into());
            a.push(format!("driver=qcow2,file=f{i},node-name=d{i}"));
            a.push("-device".into());
            a.push(if self.scsi_disks {
                format!("scsi-hd,drive=d{i},bus=scsi0.0,id=hd{i}")
            } else {
                format!("virtio-blk-pci,drive=d{i}")
            });
        }
        a.extend(self.extra.iter().cloned());
        a
    }

    /// The program followed by the arguments (for `vmlock run -- ...`).
    pub fn argv(&self) -> Vec<String> {
        let mut v = vec![PROGRAM.to_owned()];
        v.extend(self.args());
        v
    }

    /// A command running it.
    pub fn command(&self) -> Command {
        let mut c = Command::new(PROGRAM);
        c.args(self.args());
        c
    }
}

/// A QEMU started outside vmlock with `-daemonize`, which returns only once the guest is set up
/// with its disks open, so no waiting is needed. Killed by the pid of its pid file on drop.
#[derive(Debug)]
pub struct DaemonizedQemu {
    /// Its pid.
    pub pid: u32,
}

impl DaemonizedQemu {
    /// Starts `line` daemonized, its pid file in `pidfile`.
    pub fn start(line: &QemuLine, pidfile: &Path) -> Self {
        let status = line
            .command()
            .arg("-daemonize")
            .arg("-pidfile")
            .arg(pidfile)
            .status()
            .expect("run qemu-system-x86_64 (is QEMU installed?)");
        assert!(status.success(), "QEMU did not start");
        let pid = std::fs::read_to_string(pidfile)
            .expect("QEMU's pid file")
            .trim()
            .parse()
            .expect("a pid in QEMU's pid file");
        DaemonizedQemu { pid }
    }
}

impl Drop for DaemonizedQemu {
    fn drop(&mut self) {
        // Not our child: wait for its exit through a pidfd.
        kill_and_wait(self.pid);
    }
}

/// `vmlock run` of a guest that only leaves a mark if it ever starts: `vmlock` is the `vmlock`
/// command with its global options; returns its output and whether the guest ran. Panics if it
/// takes over [`START_TIMEOUT`] (after killing it).
pub fn try_run(mut vmlock: Command, name: &str, disk: &Path, marker: &Path) -> (Output, bool) {
    let child = vmlock
        .args(["run", "--name", name, "--disk"])
        .arg(disk)
        .arg("--")
        .arg("touch")
        .arg(marker)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmlock run");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(START_TIMEOUT) {
        Ok(out) => (out.expect("wait for vmlock run"), marker.exists()),
        Err(_) => {
            kill_and_wait(pid);
            panic!("vmlock run of {name} still running after {START_TIMEOUT:?}");
        }
    }
}

/// A guest under `vmlock run`: the supervisor is our child, the guest its child. Both are
/// SIGKILLed and waited for by pid on drop.
#[derive(Debug)]
pub struct Supervised {
    /// The `vmlock run` process.
    pub supervisor: Child,
    stderr: ChildStderr,
    /// The guest's pid, as the supervisor reported it.
    pub guest_pid: u32,
}

impl Supervised {
    /// Spawns `vmlock_run` (a `vmlock ... run ... -- GUEST` command) with its stderr piped and
    /// returns once the supervisor says "... guest pid N" (the leases are held and the guest
    /// started); panics with what it said if it ends first or takes over [`START_TIMEOUT`].
    pub fn spawn(mut vmlock_run: Command) -> Self {
        let mut supervisor = vmlock_run
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmlock run");
        let mut stderr = supervisor.stderr.take().expect("piped stderr");
        let mut seen = String::new();
        let guest_pid = loop {
            let line = match read_line(&mut stderr, START_TIMEOUT) {
                Ok(Some(line)) => line,
                Ok(None) => {
                    let _ = supervisor.wait();
                    panic!("vmlock run ended before its guest started: {seen}");
                }
                Err(e) => {
                    kill_child(&mut supervisor);
                    panic!("vmlock run: {e}; it said: {seen}");
                }
            };
            seen.push_str(&line);
            seen.push('\n');
            if let Some((_, pid)) = line.rsplit_once("guest pid ") {
                break pid
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("no guest pid in {line:?}"));
            }
        };
        Supervised {
            supervisor,
            stderr,
            guest_pid,
        }
    }

    /// Waits (at most `timeout`) for the supervisor to exit; its exit code (-1 for a signal) and
    /// the rest of its stderr. Panics on the timeout.
    pub fn wait(&mut self, timeout: Duration) -> (i32, String) {
        let deadline = std::time::Instant::now() + timeout;
        let status = crate::process::wait_child(&mut self.supervisor, timeout)
            .unwrap_or_else(|| panic!("vmlock run still running after {timeout:?}"));
        // The rest of stderr, bounded too: a guest that outlived its supervisor keeps the pipe
        // open.
        let mut rest = String::new();
        while let Ok(Some(line)) = read_line(
            &mut self.stderr,
            deadline.saturating_duration_since(std::time::Instant::now()),
        ) {
            rest.push_str(&line);
            rest.push('\n');
        }
        (status.code().unwrap_or(-1), rest)
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        kill_and_wait(self.guest_pid);
        kill_child(&mut self.supervisor);
    }
}
