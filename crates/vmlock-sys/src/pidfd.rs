//! Process handles that cannot be fooled by pid reuse.

use rustix::event::{poll, PollFd, PollFlags};
use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};
use std::os::fd::{AsFd, OwnedFd};

/// A pidfd plus the process start time it was opened for.
#[derive(Debug)]
pub struct ProcessHandle {
    /// The pid.
    pub pid: u32,
    /// `/proc/PID/stat` start time when the handle was opened.
    pub start_time: u64,
    /// The parent pid, read with the start time (it changes only if the parent dies).
    pub ppid: u32,
    fd: OwnedFd,
}

impl ProcessHandle {
    /// Opens a handle on `pid`; if `expected_start` is given, the process must have started then
    /// (otherwise the pid was reused and the original process is gone).
    pub fn open(pid: u32, expected_start: Option<u64>) -> std::io::Result<Self> {
        let raw = i32::try_from(pid)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("invalid pid {pid}"),
                )
            })?;
        let fd = pidfd_open(raw, PidfdFlags::empty())?;
        // Read the start time after the pidfd exists: if the pid was reused before pidfd_open,
        // the start time differs and we refuse; after it, the pidfd pins the right process.
        let stat = vmlock::process::stat(pid)
            .ok_or_else(|| std::io::Error::from_raw_os_error(nix::libc::ESRCH))?;
        if let Some(expected) = expected_start {
            if stat.start_time != expected {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "pid {pid} was reused (started at {}, expected {expected})",
                        stat.start_time
                    ),
                ));
            }
        }
        Ok(ProcessHandle {
            pid,
            start_time: stat.start_time,
            ppid: stat.ppid,
            fd,
        })
    }

    /// The pidfd, readable once the process has exited.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Whether the process has exited (zombie or reaped).
    pub fn has_exited(&self) -> bool {
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        matches!(poll(&mut fds, Some(&rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 })), Ok(n) if n > 0)
    }

    /// Waits until the process has exited, at most `timeout` (forever when `None`); true if it
    /// has. Works for processes that are not our children.
    pub fn wait_exit(&self, timeout: Option<std::time::Duration>) -> bool {
        let timeout = timeout.map(|t| rustix::time::Timespec {
            tv_sec: t.as_secs() as i64,
            tv_nsec: i64::from(t.subsec_nanos()),
        });
        loop {
            let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
            match poll(&mut fds, timeout.as_ref()) {
                Ok(n) => return n > 0,
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => return self.has_exited(),
            }
        }
    }

    /// Sends `signal` to exactly this process.
    pub fn signal(&self, signal: Signal) -> std::io::Result<()> {
        pidfd_send_signal(self.fd.as_fd(), signal)?;
        Ok(())
    }
}

/// SIGKILL the process `pid` (if it still exists) and wait until it is gone.
pub fn kill_and_wait(pid: u32) {
    if let Ok(h) = ProcessHandle::open(pid, None) {
        let _ = h.signal(Signal::KILL);
        h.wait_exit(None);
    }
}
