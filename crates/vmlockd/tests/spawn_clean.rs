//! A daemon started by a client (as `vmlock run` starts it) starts clean — no blocked or ignored
//! stop signal, no inherited descriptor, a session of its own — and SIGTERM stops it however it
//! was started.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use nix::libc;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use vmlock_client::runtime::{spawn_daemon, RuntimeDir};
use vmlock_sys::pidfd::ProcessHandle;

const STOP_SIGNALS: [libc::c_int; 4] = [libc::SIGHUP, libc::SIGINT, libc::SIGQUIT, libc::SIGTERM];

/// A daemon this test started (our child), SIGKILLed and reaped if the test fails first.
struct Spawned(Pid);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGKILL);
        let _ = waitpid(self.0, None);
    }
}

impl Spawned {
    /// Sends SIGTERM and waits (bounded) for the daemon to die of it.
    fn terminate(self) {
        let handle = ProcessHandle::open(self.0.as_raw() as u32, None).unwrap();
        kill(self.0, Signal::SIGTERM).unwrap();
        assert!(
            handle.wait_exit(Some(Duration::from_secs(10))),
            "vmlockd {} ignored SIGTERM for 10 s",
            self.0
        );
        match waitpid(self.0, Some(WaitPidFlag::WNOHANG)).unwrap() {
            WaitStatus::Signaled(_, Signal::SIGTERM, _) => {}
            other => panic!("vmlockd ended otherwise: {other:?}"),
        }
        std::mem::forget(self);
    }
}

/// Blocks the stop signals on the calling thread, as `vmlock run` does before it starts anything.
fn block_stop_signals() {
    // SAFETY: stack memory; changes only this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        assert_eq!(
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()),
            0
        );
    }
}

/// A hex mask line of /proc/PID/status.
fn mask(pid: Pid, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
}

/// The stop signals the daemon's main thread blocks, once it is not creating a thread: glibc
/// blocks every signal in a thread while it creates another, so one reading may catch that
/// instant; a mask inherited from the parent would never clear.
fn blocked_stop_signals(pid: Pid) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let blocked = mask(pid, "SigBlk:") & stop_bits();
        if blocked == 0 || std::time::Instant::now() > deadline {
            return blocked;
        }
        // Bounded poll (deadline above): a signal mask changes without an event.
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn stop_bits() -> u64 {
    STOP_SIGNALS.iter().map(|s| 1u64 << (s - 1)).sum()
}

#[test]
fn a_daemon_spawned_by_a_supervisor_inherits_nothing_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("marker");
    std::fs::write(&marker, b"").unwrap();
    let runtime = RuntimeDir::resolve(Some(&dir.path().join("run"))).unwrap();
    let rt = runtime.clone();
    let m = marker.clone();
    // Spawned from a thread in the supervisor's state: stop signals blocked, and a descriptor
    // without close-on-exec (like a received lock description).
    let (done, spawned) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        block_stop_signals();
        let stray = nix::fcntl::open(
            &m,
            nix::fcntl::OFlag::O_RDONLY,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        let r = spawn_daemon(&rt, Path::new(env!("CARGO_BIN_EXE_vmlockd")), &[], None);
        let _ = nix::unistd::close(stray);
        let _ = done.send(r.map_err(|e| e.to_string()));
    });
    spawned
        .recv_timeout(Duration::from_secs(20))
        .expect("the daemon never said READY")
        .unwrap();
    let pid = Pid::from_raw(runtime.daemon_pid().unwrap() as i32);
    let daemon = Spawned(pid);

    assert_eq!(blocked_stop_signals(pid), 0, "stop signals blocked");
    assert_eq!(
        mask(pid, "SigIgn:") & stop_bits(),
        0,
        "stop signals ignored"
    );
    assert_eq!(nix::unistd::getsid(Some(pid)).unwrap(), pid, "own session");
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let target = std::fs::read_link(entry.unwrap().path()).unwrap_or_default();
        assert_ne!(
            target, marker,
            "the daemon inherited the spawner's descriptor"
        );
    }
    daemon.terminate();
}

#[test]
fn sigterm_stops_a_daemon_started_with_stop_signals_blocked_and_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmlockd"));
    cmd.arg("--runtime-dir")
        .arg(dir.path().join("run"))
        .arg("--notify-stdout")
        .env("VMLOCK_LOG", "warn")
        .stdout(Stdio::piped());
    // SAFETY: sigprocmask and sigaction only, async-signal-safe as pre_exec requires.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in STOP_SIGNALS {
                libc::sigaddset(&mut set, s);
                libc::signal(s, libc::SIG_IGN);
            }
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    #[allow(clippy::zombie_processes)] // reaped by pid in `Spawned`
    let mut child = cmd.spawn().unwrap();
    let daemon = Spawned(Pid::from_raw(child.id() as i32));
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "READY");
    assert_eq!(blocked_stop_signals(daemon.0), 0);
    assert_eq!(mask(daemon.0, "SigIgn:") & stop_bits(), 0);
    daemon.terminate();
}
