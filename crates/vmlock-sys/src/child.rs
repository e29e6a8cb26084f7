//! A clean start for a process vmlock spawns to outlive its parent (the embedded daemon).
//!
//! A child inherits its parent's signal mask, ignored signals, session and every descriptor not
//! marked close-on-exec. `vmlock run` blocks SIGHUP, SIGINT, SIGQUIT and SIGTERM (it forwards them
//! to the guest) and keeps lock descriptions: a daemon it starts must inherit none of that, or it
//! cannot be stopped and keeps copies of a VM's locks.

use nix::libc;
use std::io;
use std::os::fd::RawFd;

/// The signals that ask a process to stop.
const STOP_SIGNALS: [libc::c_int; 4] = [libc::SIGHUP, libc::SIGINT, libc::SIGQUIT, libc::SIGTERM];

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// In a forked child, before `exec`: empty signal mask, every disposition default, a session of
/// its own (so it is no longer stopped by its parent's terminal or process group), and every
/// descriptor above 2 marked close-on-exec, so only standard input, output and error reach the
/// new program.
///
/// # Safety
///
/// Only between `fork` and `exec` (e.g. in `CommandExt::pre_exec`): it changes process-wide state.
/// It is async-signal-safe: it allocates nothing, takes no lock, and makes only the system calls
/// `sigprocmask`, `sigaction`, `setsid`, `close_range`, `getrlimit` and `fcntl`.
pub unsafe fn reset_before_exec() -> io::Result<()> {
    // SAFETY: plain system calls on stack memory; see the function's contract.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        check(libc::sigemptyset(&mut empty))?;
        check(libc::sigprocmask(
            libc::SIG_SETMASK,
            &empty,
            std::ptr::null_mut(),
        ))?;
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        // Linux has 64 signals (_NSIG).
        for sig in 1..=64 {
            // SIGKILL, SIGSTOP and the C library's internal signals refuse; nothing to reset there.
            let _ = libc::sigaction(sig, &dfl, std::ptr::null_mut());
        }
        check(libc::setsid())?;
        if libc::close_range(
            3,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
        ) == 0
        {
            return Ok(());
        }
        // Before Linux 5.11: mark each possible descriptor by hand.
        let mut limit: libc::rlimit = std::mem::zeroed();
        let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            RawFd::try_from(limit.rlim_cur).unwrap_or(RawFd::MAX)
        } else {
            1024
        };
        for fd in 3..max {
            let _ = libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
    Ok(())
}

/// At a daemon's start (before any thread exists): SIGHUP, SIGINT, SIGQUIT and SIGTERM
/// unblocked and at their default action, so they stop it however it was started.
pub fn default_stop_signals() -> io::Result<()> {
    // SAFETY: sigset and sigaction on stack memory; installing SIG_DFL runs no handler code.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        check(libc::sigemptyset(&mut set))?;
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for sig in STOP_SIGNALS {
            check(libc::sigaddset(&mut set, sig))?;
            check(libc::sigaction(sig, &dfl, std::ptr::null_mut()))?;
        }
        check(libc::sigprocmask(
            libc::SIG_UNBLOCK,
            &set,
            std::ptr::null_mut(),
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    /// A hex mask line of /proc/PID/status, e.g. `SigBlk`.
    fn mask(status: &str, field: &str) -> u64 {
        let line = status
            .lines()
            .find(|l| l.starts_with(field))
            .unwrap_or_else(|| panic!("{field} in {status}"));
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    }

    #[test]
    fn a_child_starts_with_no_mask_no_ignored_signal_no_session_and_no_stray_fd() {
        // Parent state as `vmlock run` has it, on a thread of its own: stop signals blocked, and a
        // descriptor without close-on-exec.
        let out = std::thread::spawn(|| {
            // SAFETY: stack memory; blocks signals on this test thread only.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                for s in STOP_SIGNALS {
                    libc::sigaddset(&mut set, s);
                }
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            let stray = nix::fcntl::open(
                "/dev/null",
                nix::fcntl::OFlag::O_RDONLY,
                nix::sys::stat::Mode::empty(),
            )
            .unwrap();
            let mut cmd = Command::new("sh");
            cmd.arg("-c").arg(format!(
                "cat /proc/self/status; echo sid $(cut -d' ' -f6 /proc/self/stat) pid $$; \
                 [ -e /proc/self/fd/{stray} ] && echo STRAY"
            ));
            // SAFETY: reset_before_exec is async-signal-safe, as pre_exec requires.
            unsafe { cmd.pre_exec(|| reset_before_exec()) };
            let out = cmd.output().unwrap();
            let _ = nix::unistd::close(stray);
            String::from_utf8(out.stdout).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(mask(&out, "SigBlk:"), 0, "{out}");
        // Standard signals (1-31) at default; the C library keeps 32 and 33 for itself.
        assert_eq!(mask(&out, "SigIgn:") & 0x7fff_ffff, 0, "{out}");
        assert!(!out.contains("STRAY"), "{out}");
        let last = out.lines().rev().find(|l| l.starts_with("sid")).unwrap();
        let words: Vec<_> = last.split_whitespace().collect();
        assert_eq!(words[1], words[3], "own session: {last}");
    }
}
