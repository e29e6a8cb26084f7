//! The thread-free client (`vmlock_client::HoldConnection` and `Connection`) against a real
//! daemon, run where the libvirt plugin will run it: in a child forked from this multi-threaded
//! test process, before any exec. The child must end with exactly the one thread fork gave it.

mod common;

use common::Daemon;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmlock::{DiskMode, Resource};
use vmlock_client::proto::{AcquireFlags, Reply, Request, VmIdentity};
use vmlock_client::{Connection, HoldConnection, RuntimeDir};
use vmlock_sys::ofd::{self, LockKind};

/// The threads of this process.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

fn locked_by_someone(path: &Path) -> bool {
    let file = std::fs::File::open(path).expect("open disk");
    ofd::probe(file.as_fd(), LockKind::Exclusive, 0, 1)
        .expect("probe")
        .is_some()
}

fn disk(dir: &Path, name: &str) -> (PathBuf, Resource) {
    let path = dir.join(name);
    std::fs::write(&path, b"disk").expect("create disk");
    let r = Resource::disk(&path, DiskMode::Exclusive).expect("disk");
    (path, r)
}

fn vm(pid: u32) -> VmIdentity {
    VmIdentity {
        uuid: uuid::Uuid::new_v4().to_string(),
        name: "forked".into(),
        id: 7,
        pid,
    }
}

/// Waits (bounded) until the holder socket is readable.
fn wait_readable(holder: &HoldConnection) -> Result<(), String> {
    let fd = holder.fd();
    let mut pfd = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    let five = rustix::time::Timespec {
        tv_sec: 5,
        tv_nsec: 0,
    };
    match rustix::event::poll(&mut pfd, Some(&five)) {
        Ok(n) if n > 0 => Ok(()),
        other => Err(format!("no push within 5 s: {other:?}")),
    }
}

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// The whole exchange, in the forked child.
fn scenario(runtime: &RuntimeDir, dir: &Path) -> Result<(), String> {
    let e = |e: vmlock::Error| e.to_string();
    ensure!(
        threads() == 1,
        "the child starts with {} threads",
        threads()
    );
    let (a_path, a) = disk(dir, "a.img");
    let (b_path, b) = disk(dir, "b.img");
    let me = vm(std::process::id());
    let uuid = me.uuid.clone();

    let mut holder = HoldConnection::register(runtime, me, None).map_err(e)?;
    let mut conn = Connection::connect(runtime).map_err(e)?;

    // With reply_with_fds the descriptions come in the reply: no push.
    let direct = AcquireFlags {
        reply_with_fds: true,
        ..AcquireFlags::default()
    };
    let request = Request::Acquire {
        uuid: uuid.clone(),
        resources: vec![a.clone()],
        flags: direct.clone(),
    };
    match conn.call_with_fds(&request, &[]).map_err(e)? {
        (Reply::Kept { locks, .. }, fds) => holder.keep_local(locks, fds).map_err(e)?,
        (other, _) => return Err(format!("acquire of a: {other:?}")),
    }
    holder.acquired(&direct);
    ensure!(locked_by_someone(&a_path), "a is not locked");
    ensure!(holder.descriptions().count() == 1, "a is not kept");

    // Without it the daemon pushes the descriptions to the holder and answers only once it
    // acked: call_serving serves the push while it waits.
    let request = Request::Acquire {
        uuid: uuid.clone(),
        resources: vec![b.clone()],
        flags: AcquireFlags::default(),
    };
    match conn.call_serving(&request, &[], &mut holder).map_err(e)? {
        (Reply::Held(held), _) => ensure!(held.len() == 1, "acquire of b: {held:?}"),
        (other, _) => return Err(format!("acquire of b: {other:?}")),
    }
    ensure!(locked_by_someone(&b_path), "b is not locked");
    ensure!(
        holder.descriptions().count() == 2,
        "b was not kept by serve_ready"
    );

    // A release pushes Close without waiting for its ack: served from our own poll.
    conn.call(
        &Request::Release {
            uuid: uuid.clone(),
            resources: Some(vec![b]),
        },
        &[],
    )
    .map_err(e)?;
    wait_readable(&holder)?;
    let served = holder.serve_ready().map_err(e)?;
    ensure!(served.closed == 1, "release of b: {served:?}");
    ensure!(!locked_by_someone(&b_path), "b is still locked");
    ensure!(holder.descriptions().count() == 1, "b is still kept");
    // Nothing more is ready: serve_ready returns at once.
    let idle = holder.serve_ready().map_err(e)?;
    ensure!(idle == vmlock_client::Served::default(), "idle: {idle:?}");

    // Releasing everything closes the rest; the holder stays registered until it goes.
    conn.call(
        &Request::Release {
            uuid,
            resources: None,
        },
        &[],
    )
    .map_err(e)?;
    wait_readable(&holder)?;
    let served = holder.serve_ready().map_err(e)?;
    ensure!(served.closed == 1, "release of a: {served:?}");
    ensure!(holder.descriptions().count() == 0, "descriptions left");
    ensure!(!locked_by_someone(&a_path), "a is still locked");
    ensure!(holder.is_connected(), "the holder was dropped");
    drop(holder);
    ensure!(threads() == 1, "the child now has {} threads", threads());
    Ok(())
}

/// Writes to standard error without std's lock (another thread of the parent may have held it
/// at fork).
fn say(msg: &str) {
    let _ = rustix::io::write(std::io::stderr(), msg.as_bytes());
}

#[test]
fn a_forked_child_holds_acquires_and_releases_without_a_thread() {
    let daemon = Daemon::start();
    let runtime = daemon.runtime();
    let dir = daemon.disk_dir().to_path_buf();
    // SAFETY: the child runs only the thread-free client (the contract this test checks, with
    // glibc's fork-safe allocator) and leaves with _exit, never returning into the harness.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let result = std::panic::catch_unwind(|| scenario(&runtime, &dir));
            let code = match result {
                Ok(Ok(())) => 0,
                Ok(Err(msg)) => {
                    say(&format!("thread-free client: {msg}\n"));
                    1
                }
                Err(_) => 2,
            };
            // SAFETY: _exit is async-signal-safe; skipping atexit handlers and destructors is
            // the point (the parent's harness owns them).
            unsafe { nix::libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            let handle = vmlock_sys::pidfd::ProcessHandle::open(child.as_raw() as u32, None)
                .expect("a pidfd of the forked child");
            if !handle.wait_exit(Some(Duration::from_secs(60))) {
                let _ = nix::sys::signal::kill(child, nix::sys::signal::SIGKILL);
                let _ = waitpid(child, None);
                panic!("the forked child did not finish in 60 s");
            }
            let status = waitpid(child, Some(WaitPidFlag::WNOHANG)).expect("waitpid");
            assert_eq!(
                status,
                WaitStatus::Exited(child, 0),
                "the forked child failed"
            );
        }
    }
}

#[test]
fn a_thread_free_holder_hands_its_descriptions_to_a_restarted_daemon() {
    let mut daemon = Daemon::start();
    let runtime = daemon.runtime();
    let (a_path, a) = disk(daemon.disk_dir(), "a.img");
    let me = vm(std::process::id());
    let uuid = me.uuid.clone();
    let mut holder = HoldConnection::register(&runtime, me, None).expect("register");
    let mut conn = Connection::connect(&runtime).expect("connect");
    let request = Request::Acquire {
        uuid: uuid.clone(),
        resources: vec![a.clone()],
        flags: AcquireFlags::default(),
    };
    let (reply, _) = conn
        .call_serving(&request, &[], &mut holder)
        .expect("acquire");
    assert!(matches!(reply, Reply::Held(_)), "{reply:?}");

    daemon.kill();
    wait_readable(&holder).expect("the close is seen");
    let served = holder.serve_ready().expect("serve");
    assert!(served.disconnected, "{served:?}");
    assert!(!holder.is_connected());
    assert!(locked_by_someone(&a_path), "the kernel keeps the lock");
    assert!(holder.reconnect(&runtime).is_err(), "no daemon answers yet");

    daemon.restart();
    holder.reconnect(&runtime).expect("reconnect");
    assert!(holder.is_connected());
    let mut conn = Connection::connect(&runtime).expect("connect");
    match conn
        .call(&Request::Inquire { uuid: uuid.clone() }, &[])
        .expect("inquire")
    {
        Reply::Held(held) => assert_eq!(held.len(), 1, "{held:?}"),
        other => panic!("inquire: {other:?}"),
    }
    // The next daemon pushes to the re-registered holder as to a new one.
    let (_, b) = disk(daemon.disk_dir(), "b.img");
    let request = Request::Acquire {
        uuid,
        resources: vec![b],
        flags: AcquireFlags::default(),
    };
    conn.call_serving(&request, &[], &mut holder)
        .expect("acquire after restart");
    assert_eq!(holder.descriptions().count(), 2);
}
