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

#[test]
fn a_start_in_one_round_trip_takes_all_or_nothing_and_a_refusal_leaves_nothing_registered() {
    let daemon = Daemon::start();
    let runtime = daemon.runtime();
    let (a_path, a) = disk(daemon.disk_dir(), "a.img");
    let (b_path, b) = disk(daemon.disk_dir(), "b.img");
    let first = vm(std::process::id());
    let first_uuid = first.uuid.clone();
    let opening = Connection::open(&runtime).expect("open");
    let (holder, locks, copies) =
        HoldConnection::start_opened(opening, first, vec![a.clone()], AcquireFlags::default())
            .expect("the first start");
    assert_eq!(locks.len(), 1);
    assert_eq!(copies.len(), 1, "a copy of the description for the caller");
    assert!(locked_by_someone(&a_path));

    // A second VM (a guest of its own, this process's child) wants a and b: refused, nothing
    // taken, and no registration left behind.
    let guest = vmlock::conformance::Guest::spawn();
    let second = vm(guest.pid());
    let second_uuid = second.uuid.clone();
    let opening = Connection::open(&runtime).expect("open");
    let refused = HoldConnection::start_opened(
        opening,
        second.clone(),
        vec![b.clone(), a.clone()],
        AcquireFlags::default(),
    );
    match refused {
        Err(vmlock_client::holder::StartRefused::Acquire(e)) => {
            assert!(
                e.to_string().contains("forked"),
                "the holder is not named: {e}"
            )
        }
        other => panic!("not refused at the acquire: {other:?}"),
    }
    assert!(
        !locked_by_someone(&b_path),
        "b was taken by a refused start"
    );
    let mut conn = Connection::connect(&runtime).expect("connect");
    let owners = match conn.call(&Request::Status, &[]).expect("status") {
        Reply::Status(owners) => owners,
        other => panic!("status: {other:?}"),
    };
    assert!(
        owners.iter().all(|o| o.vm.uuid != second_uuid),
        "a refused start stayed registered: {owners:?}"
    );
    assert!(owners.iter().any(|o| o.vm.uuid == first_uuid));
    // So the same VM can start at once when the disk is free: the registration is refused only
    // while the VM is known.
    let opening = Connection::open(&runtime).expect("open");
    let (_again, _, _) =
        HoldConnection::start_opened(opening, second, vec![b], AcquireFlags::default())
            .expect("the second VM starts on a free disk");
    assert!(locked_by_someone(&b_path));
    drop(holder);
}
