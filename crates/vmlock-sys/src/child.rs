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
    let high = copies_above(fds, first + fds.len() as RawFd)?;
    let result = spawn_placed(program, argv, env, &high[..fds.len()], first);
    close_copies(&high);
    result
}

/// Copies of `fds` above every target number from `above` down, so placing one never
/// overwrites another still to be placed; close-on-exec, so they end with the exec (`dup2`/
/// `dup3` clears it on the targets). Unused slots are -1; [`close_copies`] closes them.
fn copies_above(fds: &[RawFd], above: RawFd) -> io::Result<[RawFd; MAX_HANDED]> {
    let mut high = [-1 as RawFd; MAX_HANDED];
    for (slot, fd) in high.iter_mut().zip(fds) {
        // SAFETY: fcntl on a descriptor number; the copy is closed by `close_copies`.
        let copy = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, above) };
        if copy < 0 {
            let e = io::Error::last_os_error();
            close_copies(&high);
            return Err(e);
        }
        *slot = copy;
    }
    Ok(high)
}

/// Closes the copies [`copies_above`] made.
fn close_copies(high: &[RawFd]) {
    for copy in high.iter().filter(|c| **c >= 0) {
        // SAFETY: closes only copies made by `copies_above`, each once.
        unsafe { libc::close(*copy) };
    }
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

/// [`spawn_clean`]'s child, without waiting for its exec, for a process that must not stop for
/// it (libvirt's pre-exec child, whose every microsecond delays the domain's start).
///
/// `posix_spawn` returns only once the new program is loaded: on two idle CPUs that is two
/// cross-CPU wake-ups and the exec, 0.2–0.7 ms measured in libvirt's child. Here the child is a
/// `clone(CLONE_VM)` without `CLONE_VFORK`: it shares the parent's memory until its exec, reads
/// only what this call leaked for it (its stack, the program, the argument and environment
/// arrays, which the parent never frees or writes again), makes raw system calls only (no
/// `errno`, no allocation, no lock, nothing thread-local: it shares the parent's thread pointer),
/// and starts with every signal blocked, so no handler of the parent's ever runs on it. The
/// parent's later exec or exit does not take that memory from it: it keeps its own reference to
/// the address space until it execs.
///
/// When the child execs is [`UnwaitedStart`]'s: at once, or only once the parent is done
/// (`exec_after_hangup`).
///
/// Costs: the leak (a 64 KiB stack and the arrays), meant for a process that execs or exits
/// soon; and a program that cannot be executed is found by `access` before the clone, not by the
/// exec (a program removed in between makes the child exit 127). Only on x86-64, where the raw
/// system calls are written out; elsewhere it is [`spawn_clean`].
pub fn spawn_unwaited(
    program: &std::ffi::CStr,
    argv: &[&std::ffi::CStr],
    env: &[&std::ffi::CStr],
    fds: &[RawFd],
    start: UnwaitedStart,
) -> io::Result<libc::pid_t> {
    #[cfg(target_arch = "x86_64")]
    {
        unwaited::spawn(program, argv, env, fds, start)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = start;
        spawn_clean(program, argv, env, fds)
    }
}

/// How [`spawn_unwaited`]'s child starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwaitedStart {
    /// Before its exec, the child waits (at most the duration, asleep, with its descriptors in
    /// place) until the peer of `fds[i]` hangs up: the parent keeps that peer open, close-on-exec,
    /// until its own exec or exit. Meanwhile the child uses no CPU at all, so nothing of its
    /// start-up (the exec, dynamic linking) runs beside the parent's remaining work, where even
    /// an idle-priority task on an otherwise idle CPU delays the kernel's RCU grace periods that
    /// the parent's mount and namespace calls wait for (about 1 ms measured in libvirt's child).
    pub exec_after_hangup: Option<(usize, std::time::Duration)>,
}

#[cfg(target_arch = "x86_64")]
mod unwaited {
    use super::{check, close_copies, copies_above, UnwaitedStart, MAX_HANDED};
    use nix::libc;
    use std::ffi::{c_void, CStr, CString};
    use std::io;
    use std::os::fd::RawFd;

    const STACK_SIZE: usize = 64 * 1024;

    /// What the child reads: leaked by the parent, never freed or written again.
    struct Plan {
        program: CString,
        argv: Vec<*const libc::c_char>,
        env: Vec<*const libc::c_char>,
        /// Copies of the handed descriptors, above every target number, close-on-exec.
        sources: [RawFd; MAX_HANDED],
        count: usize,
        /// The descriptor number (in the child) whose peer's hang-up it waits for, and how long.
        hangup: Option<(usize, libc::timespec)>,
        /// The descriptor limit, for closing one by one where `close_range` is missing.
        fd_limit: usize,
    }

    pub(super) fn spawn(
        program: &CStr,
        argv: &[&CStr],
        env: &[&CStr],
        fds: &[RawFd],
        start: UnwaitedStart,
    ) -> io::Result<libc::pid_t> {
        if fds.len() > MAX_HANDED {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many descriptors",
            ));
        }
        if let Some((i, _)) = start.exec_after_hangup.filter(|(i, _)| *i >= fds.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no descriptor {i} to wait on: {} handed", fds.len()),
            ));
        }
        // SAFETY: access reads the NUL-terminated path only.
        check(unsafe { libc::access(program.as_ptr(), libc::X_OK) })?;
        let sources = copies_above(fds, FIRST + fds.len() as RawFd)?;
        // The strings and the pointer arrays into them: leaked with the plan.
        let strings: &'static [CString] = Vec::leak(
            argv.iter()
                .chain(env)
                .map(|s| CString::from(*s))
                .collect::<Vec<_>>(),
        );
        let (arg_strings, env_strings) = strings.split_at(argv.len());
        let nul_terminated = |list: &'static [CString]| {
            list.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        let plan: &'static Plan = Box::leak(Box::new(Plan {
            program: CString::from(program),
            argv: nul_terminated(arg_strings),
            env: nul_terminated(env_strings),
            sources,
            count: fds.len(),
            hangup: start.exec_after_hangup.map(|(i, wait)| {
                (
                    FIRST as usize + i,
                    libc::timespec {
                        tv_sec: libc::time_t::try_from(wait.as_secs()).unwrap_or(libc::time_t::MAX),
                        tv_nsec: libc::c_long::from(wait.subsec_nanos()),
                    },
                )
            }),
            fd_limit: fd_limit(),
        }));
        let stack: &'static mut [u8] = Vec::leak(vec![0u8; STACK_SIZE]);
        // The stack grows down from its end, 16-byte aligned as the ABI wants at a call.
        let top = (stack.as_mut_ptr() as usize + STACK_SIZE) & !15;
        // SAFETY: the signal sets are stack memory; `clone` runs `child` on the leaked stack
        // with the leaked plan, both alive for the rest of the process; every signal is blocked
        // around it so the child starts with all of them blocked, and the parent's mask is put
        // back at once.
        let pid = unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            let pid = libc::clone(
                child,
                top as *mut c_void,
                libc::CLONE_VM | libc::SIGCHLD,
                plan as *const Plan as *mut c_void,
            );
            let e = io::Error::last_os_error();
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            if pid < 0 {
                Err(e)
            } else {
                Ok(pid)
            }
        };
        // The child has copies of its own (its descriptor table is a copy, not shared).
        close_copies(&plan.sources);
        pid
    }

    /// The first descriptor number the child gets its descriptors at.
    const FIRST: RawFd = 3;

    /// The soft limit on descriptors (1024 if it cannot be read).
    fn fd_limit() -> usize {
        // SAFETY: getrlimit writes the stack struct only.
        unsafe {
            let mut limit: libc::rlimit = std::mem::zeroed();
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
            } else {
                1024
            }
        }
    }

    /// A system call with up to four arguments, its result or `-errno`; writes no `errno`.
    ///
    /// # Safety
    ///
    /// As the system call `number` itself: the arguments must be valid for it.
    unsafe fn raw(number: libc::c_long, a: usize, b: usize, c: usize, d: usize) -> isize {
        let result: isize;
        // SAFETY: the `syscall` instruction with the kernel's x86-64 convention; it clobbers
        // rcx and r11 and touches no stack.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") number as isize => result,
                in("rdi") a,
                in("rsi") b,
                in("rdx") c,
                in("r10") d,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        result
    }

    /// The kernel's `struct sigaction` on x86-64 (not the C library's).
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }

    /// The child, on its leaked stack, in the parent's memory: raw system calls only.
    extern "C" fn child(arg: *mut c_void) -> libc::c_int {
        // SAFETY: `arg` is the leaked plan, alive and unwritten for the rest of the process;
        // every call below is a raw system call on that plan or on this stack.
        unsafe {
            let plan = &*(arg as *const Plan);
            let exit = |code: usize| -> ! {
                raw(libc::SYS_exit_group, code, 0, 0, 0);
                loop {
                    std::hint::spin_loop();
                }
            };
            for i in 0..plan.count {
                let target = FIRST as usize + i;
                if raw(libc::SYS_dup3, plan.sources[i] as usize, target, 0, 0) < 0 {
                    exit(127);
                }
            }
            let keep = FIRST as usize + plan.count;
            if raw(libc::SYS_close_range, keep, u32::MAX as usize, 0, 0) < 0 {
                // Before Linux 5.9: one by one.
                for fd in keep..plan.fd_limit {
                    raw(libc::SYS_close, fd, 0, 0, 0);
                }
            }
            raw(libc::SYS_setsid, 0, 0, 0, 0);
            if let Some((fd, timeout)) = &plan.hangup {
                // Every signal is blocked: no EINTR; a timeout or an error goes on to the exec.
                let mut watch = libc::pollfd {
                    fd: *fd as libc::c_int,
                    events: libc::POLLRDHUP,
                    revents: 0,
                };
                raw(
                    libc::SYS_ppoll,
                    &mut watch as *mut libc::pollfd as usize,
                    1,
                    timeout as *const libc::timespec as usize,
                    0,
                );
            }
            let default = KernelSigaction {
                handler: libc::SIG_DFL,
                flags: 0,
                restorer: 0,
                mask: 0,
            };
            for sig in 1..=64usize {
                // SIGKILL and SIGSTOP refuse; nothing to reset there.
                raw(
                    libc::SYS_rt_sigaction,
                    sig,
                    &default as *const KernelSigaction as usize,
                    0,
                    8,
                );
            }
            let empty: u64 = 0;
            raw(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK as usize,
                &empty as *const u64 as usize,
                0,
                8,
            );
            raw(
                libc::SYS_execve,
                plan.program.as_ptr() as usize,
                plan.argv.as_ptr() as usize,
                plan.env.as_ptr() as usize,
                0,
            );
            exit(127)
        }
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

    type Spawn = fn(
        &std::ffi::CStr,
        &[&std::ffi::CStr],
        &[&std::ffi::CStr],
        &[RawFd],
    ) -> io::Result<libc::pid_t>;

    #[test]
    fn a_spawned_child_gets_its_descriptors_in_order_and_nothing_else() {
        spawned_cleanly(spawn_clean);
    }

    #[test]
    fn an_unwaited_child_starts_as_cleanly() {
        spawned_cleanly(|p, a, e, f| spawn_unwaited(p, a, e, f, UnwaitedStart::default()));
    }

    /// Spawns a shell with `spawn` as [`spawn_clean`] promises to, and checks what it promises.
    fn spawned_cleanly(spawn: Spawn) {
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
        let pid = spawn(
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
    fn an_unwaited_child_can_wait_for_its_parents_hang_up_before_its_exec() {
        use std::ffi::CString;
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let (ours, watched) = std::os::unix::net::UnixStream::pair().unwrap();
        let (mut report, report_child) = std::os::unix::net::UnixStream::pair().unwrap();
        let program = CString::new("/bin/sh").unwrap();
        let args = [
            CString::new("sh").unwrap(),
            CString::new("-c").unwrap(),
            CString::new("echo ran >&4").unwrap(),
        ];
        let argv: Vec<&std::ffi::CStr> = args.iter().map(|a| a.as_c_str()).collect();
        let start = UnwaitedStart {
            exec_after_hangup: Some((0, std::time::Duration::from_secs(60))),
        };
        let pid = spawn_unwaited(
            &program,
            &argv,
            &[],
            &[watched.as_raw_fd(), report_child.as_raw_fd()],
            start,
        )
        .unwrap();
        drop(watched);
        drop(report_child);
        // While our end is open the child has not exec'd: it still bears this test's name.
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
        assert_ne!(comm.trim(), "sh", "exec'd before the hang-up");
        drop(ours);
        let mut out = String::new();
        report
            .set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        report.read_to_string(&mut out).unwrap();
        assert_eq!(out, "ran\n");
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    }

    #[test]
    fn a_missing_program_is_an_error_not_a_child() {
        let program = std::ffi::CString::new("/nonexistent/vmlock").unwrap();
        let e = spawn_clean(&program, &[program.as_c_str()], &[], &[]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        let e = spawn_unwaited(
            &program,
            &[program.as_c_str()],
            &[],
            &[],
            UnwaitedStart::default(),
        )
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    }
}
