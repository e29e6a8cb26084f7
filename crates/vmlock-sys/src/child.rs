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

/// Most descriptors [`spawn_clean`] hands to a child.
pub const MAX_HANDED: usize = 8;

/// Starts `argv[0]` (by path, not searched) with `argv` and `env` as a clean child: empty signal
/// mask, every catchable signal at its default action, a session of its own, and no descriptor
/// but standard input, output and error and `fds`, which it gets as 3, 4, … in order.
///
/// Through `posix_spawn`, which glibc runs as `clone(CLONE_VM | CLONE_VFORK)`: no copy of the
/// parent's page tables (a fork of libvirtd's pre-exec child copies libvirtd's), and the call
/// returns once the new program is loaded, or with the reason it could not be. It allocates
/// nothing in the parent and starts no thread, so it may run in a forked child before exec.
pub fn spawn_clean(
    program: &std::ffi::CStr,
    argv: &[&std::ffi::CStr],
    env: &[&std::ffi::CStr],
    fds: &[RawFd],
) -> io::Result<libc::pid_t> {
    const MOST_ARGS: usize = 64;
    if fds.len() > MAX_HANDED || argv.len() >= MOST_ARGS || env.len() >= MOST_ARGS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors, arguments or environment entries",
        ));
    }
    let first = 3;
    let above = first + fds.len() as RawFd;
    // Copies above every target number, so placing one never overwrites another still to be
    // placed; close-on-exec, so they end with the exec (dup2 clears it on the targets).
    let mut high = [-1 as RawFd; MAX_HANDED];
    let mut result = Ok(0);
    for (slot, fd) in high.iter_mut().zip(fds) {
        // SAFETY: fcntl on a descriptor number; the copy is closed below.
        let copy = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, above) };
        if copy < 0 {
            result = Err(io::Error::last_os_error());
            break;
        }
        *slot = copy;
    }
    if result.is_ok() {
        result = spawn_placed(program, argv, env, &high[..fds.len()], first);
    }
    for copy in high.iter().filter(|c| **c >= 0) {
        // SAFETY: closes only the copies made above.
        unsafe { libc::close(*copy) };
    }
    result
}

/// [`spawn_clean`] once the descriptors are where `dup2` cannot clobber them.
fn spawn_placed(
    program: &std::ffi::CStr,
    argv: &[&std::ffi::CStr],
    env: &[&std::ffi::CStr],
    sources: &[RawFd],
    first: RawFd,
) -> io::Result<libc::pid_t> {
    const MOST: usize = 64;
    let mut argv_ptrs = [std::ptr::null_mut::<libc::c_char>(); MOST];
    for (p, a) in argv_ptrs.iter_mut().zip(argv) {
        *p = a.as_ptr().cast_mut();
    }
    let mut env_ptrs = [std::ptr::null_mut::<libc::c_char>(); MOST];
    for (p, e) in env_ptrs.iter_mut().zip(env) {
        *p = e.as_ptr().cast_mut();
    }
    let spawn_error = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    };
    // SAFETY: the attribute and file-action objects live on this stack frame, are initialised
    // before use and destroyed on every path; the argument and environment arrays are
    // NULL-terminated (one slot more than used, checked by the caller) and point into `argv` and
    // `env`, which outlive the call.
    unsafe {
        let mut actions: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        spawn_error(libc::posix_spawn_file_actions_init(&mut actions))?;
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        if let Err(e) = spawn_error(libc::posix_spawnattr_init(&mut attr)) {
            libc::posix_spawn_file_actions_destroy(&mut actions);
            return Err(e);
        }
        let mut result = Ok(());
        for (i, src) in sources.iter().enumerate() {
            result = result.and_then(|()| {
                spawn_error(libc::posix_spawn_file_actions_adddup2(
                    &mut actions,
                    *src,
                    first + i as RawFd,
                ))
            });
        }
        result = result.and_then(|()| {
            spawn_error(libc::posix_spawn_file_actions_addclosefrom_np(
                &mut actions,
                first + sources.len() as RawFd,
            ))
        });
        let mut empty: libc::sigset_t = std::mem::zeroed();
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigfillset(&mut all);
        let flags = libc::POSIX_SPAWN_SETSID as libc::c_short
            | libc::POSIX_SPAWN_SETSIGMASK as libc::c_short
            | libc::POSIX_SPAWN_SETSIGDEF as libc::c_short;
        result = result
            .and_then(|()| spawn_error(libc::posix_spawnattr_setflags(&mut attr, flags)))
            .and_then(|()| spawn_error(libc::posix_spawnattr_setsigmask(&mut attr, &empty)))
            .and_then(|()| spawn_error(libc::posix_spawnattr_setsigdefault(&mut attr, &all)));
        let mut pid: libc::pid_t = 0;
        if result.is_ok() {
            result = spawn_error(libc::posix_spawn(
                &mut pid,
                program.as_ptr(),
                &actions,
                &attr,
                argv_ptrs.as_ptr(),
                env_ptrs.as_ptr(),
            ));
        }
        libc::posix_spawnattr_destroy(&mut attr);
        libc::posix_spawn_file_actions_destroy(&mut actions);
        result.map(|()| pid)
    }
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

    #[test]
    fn a_spawned_child_gets_its_descriptors_in_order_and_nothing_else() {
        use std::ffi::CString;
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let (mut report, report_child) = std::os::unix::net::UnixStream::pair().unwrap();
        let marker = std::fs::File::open("/proc/self/stat").unwrap();
        // A stray descriptor without close-on-exec, and the handed ones at numbers that collide
        // with their targets (3 and 4 may already be taken by the harness): all must be sorted out.
        let stray = nix::fcntl::open(
            "/dev/null",
            nix::fcntl::OFlag::O_RDONLY,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        // SAFETY: stack memory; blocks SIGTERM on this thread, which the child must not inherit.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        let script = format!(
            "exec >&3; grep -E '^Sig(Blk|Ign)' /proc/self/status; echo sid $(cut -d' ' -f6 /proc/self/stat) pid $$; \
             ls /proc/self/fd | sort -n | tr '\\n' ' '; echo; readlink /proc/self/fd/4; \
             [ -e /proc/self/fd/{stray} ] && echo STRAY; exit 0"
        );
        let program = CString::new("/bin/sh").unwrap();
        let args = [
            CString::new("sh").unwrap(),
            CString::new("-c").unwrap(),
            CString::new(script).unwrap(),
        ];
        let argv: Vec<&std::ffi::CStr> = args.iter().map(|a| a.as_c_str()).collect();
        let path = CString::new("PATH=/usr/bin:/bin").unwrap();
        let pid = spawn_clean(
            &program,
            &argv,
            &[path.as_c_str()],
            &[report_child.as_raw_fd(), marker.as_raw_fd()],
        )
        .unwrap();
        drop(report_child);
        let mut out = String::new();
        report.read_to_string(&mut out).unwrap();
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        let _ = nix::unistd::close(stray);
        // SAFETY: unblock what this test blocked, on this thread.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
        assert_eq!(mask(&out, "SigBlk:"), 0, "{out}");
        assert_eq!(mask(&out, "SigIgn:") & 0x7fff_ffff, 0, "{out}");
        assert!(!out.contains("STRAY"), "{out}");
        let sid = out.lines().find(|l| l.starts_with("sid")).unwrap();
        let words: Vec<_> = sid.split_whitespace().collect();
        assert_eq!(words[1], words[3], "own session: {sid}");
        // 0-2, the two handed (3: the report socket, 4: the marker file), and the one `ls` opens
        // on /proc/self/fd itself.
        let fds = out.lines().find(|l| l.starts_with("0 ")).unwrap();
        let fds: Vec<u32> = fds.split_whitespace().map(|f| f.parse().unwrap()).collect();
        assert_eq!(&fds[..5], &[0, 1, 2, 3, 4], "{out}");
        assert!(fds.len() <= 6, "stray descriptors: {out}");
        assert!(
            out.contains("/proc/"),
            "descriptor 4 is not the marker: {out}"
        );
        drop(marker);
    }

    #[test]
    fn a_missing_program_is_an_error_not_a_child() {
        let program = std::ffi::CString::new("/nonexistent/vmlock").unwrap();
        let e = spawn_clean(&program, &[program.as_c_str()], &[], &[]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    }
}
