//! Processes started by tests: kill-and-wait by pid, bounded waits, reading a readiness line.

use rustix::event::{poll, PollFd, PollFlags};
use std::io::Read;
use std::os::fd::AsFd;
use std::process::Child;
use std::time::{Duration, Instant};
use vmlock_sys::pidfd::ProcessHandle;

/// How long a killed process may take to be gone.
pub const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// SIGKILL `pid` (if it still exists; it need not be our child) and wait, through a pidfd, until
/// it is gone. Panics if it is still there after [`KILL_TIMEOUT`].
pub fn kill_and_wait(pid: u32) {
    if let Ok(h) = ProcessHandle::open(pid, None) {
        let _ = h.signal(rustix::process::Signal::KILL);
        // Not while unwinding (a drop during a failed test): a second panic would abort.
        if !h.wait_exit(Some(KILL_TIMEOUT)) && !std::thread::panicking() {
            panic!("pid {pid} still running {KILL_TIMEOUT:?} after SIGKILL");
        }
    }
}

/// SIGKILL and reap a child (nothing if already reaped).
pub fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends `signal` to our child and waits (at most `timeout`, else panics) until it exits.
pub fn signal_and_wait(
    child: &mut Child,
    signal: rustix::process::Signal,
    timeout: Duration,
) -> std::process::ExitStatus {
    let pid = i32::try_from(child.id())
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .expect("a child's pid");
    rustix::process::kill_process(pid, signal).expect("signal the child");
    wait_child(child, timeout).unwrap_or_else(|| {
        panic!(
            "pid {} still running {timeout:?} after {signal:?}",
            child.id()
        )
    })
}

/// Waits (at most `timeout`) for our child to exit, on its pidfd (no polling), and reaps it;
/// `None` if it still runs.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    if let Ok(handle) = vmlock_sys::pidfd::ProcessHandle::open(child.id(), None) {
        handle.wait_exit(Some(timeout));
    }
    // Exited (or already reaped, when the pidfd could not be opened): reap it.
    child.try_wait().expect("wait for the child")
}

/// A child SIGKILLed and reaped by pid when dropped.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill_child(&mut self.0);
    }
}

/// Polls `cond` until it holds; panics naming `what` after `timeout`. For states that come with
/// no event to wait on.
pub fn wait_until(what: &str, timeout: Duration, pause: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(pause);
    }
}

/// Reads one line (without its newline) from a child's pipe, waiting at most `timeout` in all.
/// `Ok(None)` at end of file. Reads byte by byte, so nothing past the line is taken from the
/// pipe: the caller can go on reading it.
pub fn read_line(
    from: &mut (impl Read + AsFd),
    timeout: Duration,
) -> std::io::Result<Option<String>> {
    let deadline = Instant::now() + timeout;
    let mut line = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ts = rustix::time::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut fds = [PollFd::new(from, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no complete line in {timeout:?} (got {:?})",
                        String::from_utf8_lossy(&line)
                    ),
                ))
            }
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let mut byte = [0u8; 1];
        match from.read(&mut byte)? {
            0 if line.is_empty() => return Ok(None),
            0 => return Ok(Some(String::from_utf8_lossy(&line).into_owned())),
            _ if byte[0] == b'\n' => return Ok(Some(String::from_utf8_lossy(&line).into_owned())),
            _ => line.push(byte[0]),
        }
    }
}
