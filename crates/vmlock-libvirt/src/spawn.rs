//! Starting a domain's holder from libvirt's pre-exec child.
//!
//! That child is a fork of the multi-threaded libvirtd: only the calling thread exists, and any
//! lock another thread held at the fork stays held forever. So everything that allocates is done
//! first; then `fork`, and in the new process only `dup2`, `close_range`, `sigprocmask`,
//! `setsid` and `execve` (async-signal-safe system calls); the child then waits for the holder's
//! one-line report with `poll` and `recvmsg`. No thread, no lock, no runtime.
//!
//! The report travels on a socket pair, so that with its `OK` the holder sends copies of the
//! lock descriptions it took: the child keeps them open across its exec, and QEMU holds its own
//! locks for as long as it runs — even if its holder and vmlockd both die.

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, SigmaskHow};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::unistd::ForkResult;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The descriptor number the holder reports its start on.
pub const READY_FD: i32 = 3;
/// How long the child waits for the holder's report (an acquire on slow storage included).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts `args[0]` with `args` as the holder (a child of this process, which then execs QEMU)
/// and waits for its report: once it holds the leases, copies of their descriptions (close on
/// exec; the caller decides what QEMU inherits), else its reason.
pub fn start_holder(args: &[String], timeout: Duration) -> Result<Vec<OwnedFd>, String> {
    let argv: Vec<CString> = args
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|_| "an argument of the holder contains a NUL byte".to_owned())?;
    let program = argv
        .first()
        .cloned()
        .ok_or_else(|| "no holder program".to_owned())?;
    let env = [
        CString::new("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .map_err(|_| "environment".to_owned())?,
    ];
    let (read_end, write_end) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| format!("socketpair: {e}"))?;
    let read_end = UnixStream::from(read_end);
    // SAFETY: this process is single-threaded (libvirt's pre-exec child) and the new process
    // runs only async-signal-safe system calls on values prepared above before it execs or
    // exits.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(format!("fork: {e}")),
        Ok(ForkResult::Child) => exec_holder(&program, &argv, &env, &write_end),
        Ok(ForkResult::Parent { child }) => {
            drop(write_end);
            match read_report(&read_end, timeout) {
                Ok(fds) => Ok(fds),
                Err(reason) => {
                    // A holder that did not report must not keep anything: it would be a
                    // holder without a guest.
                    let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                    let _ = nix::sys::wait::waitpid(child, None);
                    Err(reason)
                }
            }
        }
    }
}

/// In the forked process: becomes the holder, or exits 127.
fn exec_holder(program: &CString, argv: &[CString], env: &[CString], ready: &OwnedFd) -> ! {
    let fd = ready.as_raw_fd();
    let ok = if fd == READY_FD {
        // dup2 onto itself keeps close-on-exec: clear it by hand.
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .is_ok()
    } else {
        // SAFETY: dup2 on descriptor numbers only; READY_FD is replaced by the report socket's end
        // (dup2 leaves the copy without close-on-exec).
        unsafe { nix::libc::dup2(fd, READY_FD) == READY_FD }
    };
    if ok {
        // Nothing of libvirtd's reaches the holder: every descriptor above READY_FD goes.
        // SAFETY: close_range only closes descriptors; none is used by this process again.
        unsafe {
            nix::libc::syscall(
                nix::libc::SYS_close_range,
                READY_FD + 1,
                nix::libc::c_uint::MAX,
                0,
            );
        }
        let _ =
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
        let _ = nix::unistd::setsid();
        let _ = nix::unistd::execve(program, argv, env);
    }
    // SAFETY: _exit ends this forked process without running libvirtd's atexit handlers.
    unsafe { nix::libc::_exit(127) }
}

/// Reads the holder's one line: `OK` (with the descriptions it sends along), or `ERR reason`;
/// end of file without it means the holder died.
fn read_report(stream: &UnixStream, timeout: Duration) -> Result<Vec<OwnedFd>, String> {
    let deadline = Instant::now() + timeout;
    let mut line = Vec::new();
    let mut fds = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "the vmlock holder did not report within {} s",
                timeout.as_secs()
            ));
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut poll_fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
        match poll(&mut poll_fds, PollTimeout::from(ms)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("poll: {e}")),
        }
        let mut buf = [0u8; 512];
        match vmlock_sys::fdpass::recv_with_fds(stream, &mut buf, &mut fds, false) {
            Ok(0) => {
                return Err(if line.is_empty() {
                    "the vmlock holder exited without a word (see the domain's log)".to_owned()
                } else {
                    String::from_utf8_lossy(&line).into_owned()
                })
            }
            Ok(n) => line.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("reading the holder's report: {e}")),
        }
        if let Some(end) = line.iter().position(|b| *b == b'\n') {
            let text = String::from_utf8_lossy(&line[..end]).into_owned();
            if text == "OK" || text.starts_with("OK ") {
                return Ok(fds);
            }
            return match text.strip_prefix("ERR ") {
                Some(reason) => Err(reason.to_owned()),
                None => Err(format!("the vmlock holder said {text:?}")),
            };
        }
        if line.len() > 64 * 1024 {
            return Err("the vmlock holder's report is too long".to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    #[test]
    fn ok_err_silence_and_death_are_told_apart() {
        let t = Duration::from_secs(10);
        assert!(start_holder(&sh("echo OK >&3; sleep 0.2"), t)
            .unwrap()
            .is_empty());
        assert_eq!(
            start_holder(&sh("echo 'ERR disk held by VM x' >&3"), t).unwrap_err(),
            "disk held by VM x"
        );
        assert!(start_holder(&sh("exit 3"), t)
            .unwrap_err()
            .contains("without a word"));
        assert!(start_holder(&sh("sleep 5"), Duration::from_millis(200))
            .unwrap_err()
            .contains("did not report"));
        assert!(start_holder(&["/nonexistent/vmlock".to_owned()], t)
            .unwrap_err()
            .contains("without a word"));
    }

    #[test]
    fn the_holder_inherits_only_its_report_socket() {
        let file = std::fs::File::open("/dev/null").unwrap();
        // Above the report's descriptor number, and without close-on-exec, so that only
        // close_range can keep it from the holder.
        let fd = nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD(20)).unwrap();
        // SAFETY: F_DUPFD just made this descriptor for us alone.
        let _keep = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let script = format!(
            "if [ -e /proc/self/fd/{fd} ]; then echo 'ERR leaked' >&3; else echo OK >&3; fi"
        );
        start_holder(&sh(&script), Duration::from_secs(10)).unwrap();
    }
}
