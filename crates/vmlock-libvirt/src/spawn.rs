//! Starting a domain's holder from libvirt's pre-exec child.
//!
//! That child is a fork of the multi-threaded libvirtd: only the calling thread exists, and any
//! lock another thread held at the fork stays held forever. So nothing here starts a thread or
//! takes a lock; it allocates (glibc's fork resets the allocator's locks) and makes plain system
//! calls. The holder starts through `posix_spawn` (`vmlock_sys::child::spawn_clean`), or, on the
//! fast start, through a `clone` that does not wait for its exec
//! (`vmlock_sys::child::spawn_unwaited`); neither copies libvirtd's page tables, and the holder
//! gets only the descriptors it needs.
//!
//! The report travels on a socket pair, so that with its `OK` the holder sends copies of the
//! lock descriptions it took: the child keeps them open across its exec, and QEMU holds its own
//! locks for as long as it runs — even if its holder and vmlockd both die.

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};
use vmlock_client::holder::StartRefused;
use vmlock_client::proto::{AcquireFlags, Request, VmIdentity};

/// The descriptor number the holder reports its start on.
pub const READY_FD: i32 = 3;
/// How long the child waits for the holder's report (an acquire on slow storage included).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts `args[0]` with `args` as the holder (a child of this process, which then execs QEMU)
/// and waits for its report: once it holds the leases, copies of their descriptions (close on
/// exec; the caller decides what QEMU inherits), else its reason.
pub fn start_holder(args: &[String], timeout: Duration) -> Result<Vec<OwnedFd>, String> {
    let (program, argv, env) = command(args)?;
    let (read_end, write_end) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| format!("socketpair: {e}"))?;
    let read_end = UnixStream::from(read_end);
    let child = spawn(
        &program,
        &argv,
        &env,
        &[write_end.as_raw_fd()],
        Wait::ForExec,
    )?;
    drop(write_end);
    match read_report(&read_end, timeout) {
        Ok(fds) => Ok(fds),
        Err(reason) => {
            // A holder that did not report must not keep anything: it would be a holder without
            // a guest.
            let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(child, None);
            Err(reason)
        }
    }
}

/// The holder's program, arguments and environment, ready for `posix_spawn`.
#[allow(clippy::type_complexity)]
fn command(args: &[String]) -> Result<(CString, Vec<CString>, [CString; 1]), String> {
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
    Ok((program, argv, env))
}

/// Whether [`spawn`] returns once the holder's program is loaded (reporting why it could not
/// be), or at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// `posix_spawn` (`vmlock_sys::child::spawn_clean`): the start waits for the report anyway.
    ForExec,
    /// `vmlock_sys::child::spawn_unwaited`: this child returns to libvirt at once. With
    /// `after_ours`, the holder execs only after this child's own exec (or exit), when its
    /// hand-down socket, `fds[0]`, hangs up (our end is close-on-exec), so that nothing of its
    /// start-up runs beside libvirt's remaining work here; without, at once (a hand-down too
    /// large to wait in the socket needs the holder reading it).
    No { after_ours: bool },
}

/// Starts the holder as a clean child (its own session, no signal blocked or ignored, nothing
/// of libvirtd's but `fds`, as its descriptors 3, 4, …), with no copy of libvirtd's page tables,
/// as a fork of this child would make.
fn spawn(
    program: &CString,
    argv: &[CString],
    env: &[CString],
    fds: &[RawFd],
    wait: Wait,
) -> Result<nix::unistd::Pid, String> {
    let argv: Vec<&std::ffi::CStr> = argv.iter().map(CString::as_c_str).collect();
    let env: Vec<&std::ffi::CStr> = env.iter().map(CString::as_c_str).collect();
    match wait {
        Wait::ForExec => vmlock_sys::child::spawn_clean(program, &argv, &env, fds),
        Wait::No { after_ours } => {
            let start = vmlock_sys::child::UnwaitedStart {
                exec_after_hangup: after_ours.then_some((0, READY_TIMEOUT)),
            };
            vmlock_sys::child::spawn_unwaited(program, &argv, &env, fds, start)
        }
    }
    .map(nix::unistd::Pid::from_raw)
    .map_err(|e| format!("starting {}: {e}", program.to_string_lossy()))
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
        // A holder that cannot start is named, not waited for.
        let missing = start_holder(&["/nonexistent/vmlock".to_owned()], t).unwrap_err();
        assert!(
            missing.contains("starting /nonexistent/vmlock") && missing.contains("No such file"),
            "{missing}"
        );
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

/// What the fast start came to.
#[derive(Debug)]
pub enum TakeOutcome {
    /// Every lease is held: the descriptions, for QEMU to keep across its exec (close-on-exec:
    /// the caller decides), and the holder was started to take over.
    Held(Vec<OwnedFd>),
    /// vmlockd refused (a disk is held, a bad resource): nothing is held.
    Refused(vmlock::Error),
    /// Not for the fast start (no daemon answers, or the domain is registered already, as a
    /// migration destination's is): start the holder and wait for it instead.
    UseHolder,
}

/// What the fast start needs, prepared by the caller.
#[derive(Debug)]
pub struct TakeRequest<'a> {
    /// vmlockd's runtime directory.
    pub runtime: &'a vmlock_client::RuntimeDir,
    /// The domain, with this process (QEMU-to-be) as its guest.
    pub vm: VmIdentity,
    /// Every resource to take, all or nothing.
    pub resources: Vec<vmlock::Resource>,
    /// The VM's options (lock-failure action, whether libvirt carries it out).
    pub flags: AcquireFlags,
    /// The holder's command line, taking over (`--takeover-fd`, `--control-fd`).
    pub holder_args: &'a [String],
    /// The domain's control socket.
    pub control: &'a Path,
}

/// The holder that takes over gets the hand-down socket as this descriptor, and its control
/// socket, already listening, as the next.
pub const TAKEOVER_FD: i32 = READY_FD;
/// See [`TAKEOVER_FD`].
pub const CONTROL_FD: i32 = READY_FD + 1;
/// How long the child waits to hand the descriptions down (the holder reads at once; the bound
/// only keeps a holder that hangs before reading from hanging the start).
const HAND_DOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// The fast start, in libvirt's pre-exec child: this process (the QEMU-to-be) registers as its
/// own holder and takes every lease itself, in one round trip to vmlockd; then it starts the
/// holder, hands the descriptions down to it and returns without waiting: the holder takes over
/// from its parent (QEMU by then) while libvirt goes on. Until it has, vmlockd and QEMU keep the
/// descriptions, and vmlockd unlocks when QEMU exits.
///
/// Nothing of the holder's start-up runs beside this process (docs/BENCHMARKS.md): it is
/// cloned once vmlockd has answered (a holder started earlier ran its exec on this CPU while this
/// process slept for the reply, and the scheduler let it finish its time slice first: 1.5–3 ms
/// in a third of the starts), nothing waits for its exec, and it execs only once this process
/// has (or has exited), since a busy CPU beside libvirt's remaining work here (mount namespace
/// calls that wait for RCU grace periods) cost that work about 1 ms.
pub fn take_and_hand_down(request: &TakeRequest<'_>) -> TakeOutcome {
    let own_pid = std::process::id();
    if request.vm.pid != own_pid {
        return TakeOutcome::UseHolder;
    }
    let Ok((program, argv, env)) = command(request.holder_args) else {
        return TakeOutcome::UseHolder;
    };
    // First the holder's control socket, bound under a name of its own (it takes the domain's
    // name only once the domain is ours: a migration destination's source serves under it), and
    // the hand-down socket; then the request, after which this process only waits. (Made while
    // vmlockd worked, they delayed it: the scheduler wakes vmlockd's thread on this CPU, the
    // sender's, expecting the sender to wait at once.)
    let staged = staged_path(request.control, own_pid);
    let unstage = || {
        let _ = std::fs::remove_file(&staged);
    };
    let sockets = bind_control(&staged).and_then(|listener| {
        socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map(|pair| (listener, pair))
        .map_err(std::io::Error::from)
    });
    let Ok((listener, (ours, theirs))) = sockets else {
        // The holder's own start binds the socket too, and names what fails.
        unstage();
        return TakeOutcome::UseHolder;
    };
    // One connection, one round trip: hello, then the registration with its acquire, without
    // waiting in between (the daemon answers in order); the descriptions come in the reply.
    let sent = vmlock_client::Connection::open(request.runtime)
        .map_err(StartRefused::Registration)
        .and_then(|opening| {
            vmlock_client::HoldConnection::send_start(
                opening,
                request.vm.clone(),
                request.resources.clone(),
                request.flags.clone(),
            )
        });
    let Ok(sent) = sent else {
        // No daemon: the holder's own start may start one.
        unstage();
        return TakeOutcome::UseHolder;
    };
    let (hold, locks, fds) = match sent.finish() {
        Ok(started) => started,
        // The domain is known (a migration destination, or a record being cleaned up): the
        // holder's own start sorts these out and names them.
        Err(StartRefused::Registration(_)) => {
            unstage();
            return TakeOutcome::UseHolder;
        }
        // Refused (a disk is held): nothing stays registered.
        Err(StartRefused::Acquire(e)) => {
            unstage();
            // vmlockd forgets a refused start itself; a failure after its acquire (a reply cut
            // short, descriptions that could not be copied) leaves grants for this process,
            // which the shutdown drops at once instead of at its exit.
            return refuse(request.runtime, &request.vm, e);
        }
    };
    let fail = |e: vmlock::Error| {
        unstage();
        refuse(request.runtime, &request.vm, e)
    };
    if let Err(e) = std::fs::rename(&staged, request.control) {
        return fail(vmlock::Error::io(
            format!("the domain's control socket {}", request.control.display()),
            &e,
        ));
    }
    let forget_control = || {
        let _ = std::fs::remove_file(request.control);
    };
    let handed = [theirs.as_raw_fd(), listener.as_raw_fd()];
    let wait = Wait::No {
        after_ours: vmlock_client::handdown::fits_unread(&locks),
    };
    let holder = match spawn(&program, &argv, &env, &handed, wait) {
        Ok(pid) => pid,
        Err(reason) => {
            forget_control();
            return fail(vmlock::Error::ServiceUnavailable { reason });
        }
    };
    drop(theirs);
    drop(listener);
    let ours = UnixStream::from(ours);
    // Queued in the socket's buffer, where it fits (the holder reads it once it runs), else read
    // by the holder as it comes.
    if let Err(e) = vmlock_client::handdown::send(&ours, &locks, &fds, HAND_DOWN_TIMEOUT) {
        // The holder died before it read: QEMU would run with nobody to serve libvirt's later
        // calls. Fail the start instead.
        let _ = nix::sys::signal::kill(holder, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(holder, None);
        forget_control();
        return fail(e);
    }
    // Our end of the hand-down socket stays open until our exec (it is close-on-exec): its end
    // tells the holder's clone that libvirt's work in this child is over, and only then does it
    // exec the holder, which takes over, so that none of that work competes with this child's.
    let _ = ours.into_raw_fd();
    // The registration connection closes now: nobody here would read what vmlockd sent on it.
    // vmlockd keeps the grants for the guest, which is alive, until the holder has taken over.
    drop(hold);
    TakeOutcome::Held(fds)
}

/// Where the control socket is bound before it takes the domain's name.
fn staged_path(control: &Path, pid: u32) -> std::path::PathBuf {
    let mut name = control.as_os_str().to_owned();
    name.push(format!(".{pid}.staged"));
    std::path::PathBuf::from(name)
}

/// A failure after the leases were taken: this process was its own guest and keeps nothing
/// (the start fails), so it shuts its registration down at once (the daemon allows a guest
/// that to itself) and reports `e`. Were the daemon unreachable now, the guest's exit would
/// free everything as well.
fn refuse(runtime: &vmlock_client::RuntimeDir, vm: &VmIdentity, e: vmlock::Error) -> TakeOutcome {
    if let Ok(mut conn) = vmlock_client::Connection::connect(runtime) {
        let _ = conn.call(
            &Request::Shutdown {
                uuid: vm.uuid.clone(),
                guest_pid: vm.pid,
            },
            &[],
        );
    }
    TakeOutcome::Refused(e)
}

/// Binds a control socket (root only) at `path`, a name of this process's own (a file left
/// there by an earlier process with this pid is nobody's).
fn bind_control(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(listener)
}
