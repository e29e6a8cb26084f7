//! vmlockd's limits, each against a real daemon: descriptors nobody expects are closed, idle
//! connections time out, a connection limit answers clearly, any number of disks per VM works,
//! running out of descriptors does not flood the log, and a restart without state files keeps
//! what the VM was started with.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{locked_by_someone, raw_connection, read_reply, Daemon, Fixture};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmlock::conformance::{disk, vm, Guest};
use vmlock::{domain, AcquireOptions, DiskMode, Error, LockFailureAction, Resource};
use vmlock_client::proto::{write_frame, AcquireFlags, Reply, Request, VmIdentity};
use vmlock_client::{Connection, Holder};

fn fixture(config: Option<&str>) -> Fixture {
    Fixture::new(Daemon::start_with_config(config))
}

/// Waits (bounded) for a state of the daemon that comes with no event: descriptors it closed, a
/// lease check it ran.
fn eventually(what: &str, cond: impl FnMut() -> bool) {
    vmlock_testkit::process::wait_until(
        what,
        Duration::from_secs(10),
        Duration::from_millis(10),
        cond,
    );
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn status(conn: &mut Connection) -> Vec<vmlock_client::proto::OwnerStatus> {
    match conn.call(&Request::Status, &[]).unwrap() {
        Reply::Status(s) => s,
        other => panic!("{other:?}"),
    }
}

fn descriptors(n: usize) -> Vec<OwnedFd> {
    let file = OwnedFd::from(tempfile::tempfile().unwrap());
    (0..n).map(|_| file.try_clone().unwrap()).collect()
}

#[test]
fn descriptors_a_message_does_not_expect_are_closed_at_once() {
    let f = fixture(None);
    let pid = f.daemon.pid();
    let socket = f.daemon.runtime().socket();
    let s = raw_connection(&socket);
    let before = open_fds(pid);
    let fds = descriptors(200);
    let refs: Vec<&OwnedFd> = fds.iter().collect();

    // Requests that expect none, on a connection that stays open.
    for _ in 0..5 {
        write_frame(&s, &Request::Status, &refs).unwrap();
        assert!(matches!(read_reply(&s), Some(Reply::Status(_))));
    }
    let uuid = uuid::Uuid::new_v4().to_string();
    write_frame(&s, &Request::Inquire { uuid }, &refs[..3]).unwrap();
    assert!(matches!(
        read_reply(&s),
        Some(Reply::Error(Error::UnknownOwner { .. }))
    ));
    let now = open_fds(pid);
    assert!(
        now <= before + 2,
        "the daemon kept descriptors nobody expected: {before} open before, {now} after"
    );

    // A Hold that adopts nothing keeps none of what came with it; its connection stays open
    // (the socket and its writing clone, pidfds of the holder and of the guest, and the
    // watcher's copy of the latter), and so do the acks it sends.
    let guest = Guest::spawn();
    let h = raw_connection(&socket);
    let mut hold = Request::Hold {
        vm: VmIdentity {
            uuid: uuid::Uuid::new_v4().to_string(),
            name: "holder".into(),
            id: 1,
            pid: guest.pid(),
        },
        adopt: Vec::new(),
        incoming: false,
        flags: None,
        acquire: None,
    };
    write_frame(&h, &hold, &refs[..10]).unwrap();
    assert!(matches!(read_reply(&h), Some(Reply::Ok)));
    write_frame(&h, &Request::Ack { seq: 99 }, &refs).unwrap();
    write_frame(&s, &Request::Status, &[]).unwrap();
    assert!(matches!(read_reply(&s), Some(Reply::Status(_))));
    eventually("the holder's extra descriptors to be closed", || {
        open_fds(pid) <= before + 6
    });

    // A Hold whose descriptors do not match what it adopts is refused and keeps nothing.
    let h2 = raw_connection(&socket);
    if let Request::Hold { vm, adopt, .. } = &mut hold {
        vm.uuid = uuid::Uuid::new_v4().to_string();
        adopt.push(vmlock_client::proto::HeldLock {
            resource: disk(&f, "x", DiskMode::Exclusive),
            key: vmlock_client::proto::LockKey {
                dev: 1,
                ino: 1,
                byte: 0,
            },
        });
    }
    write_frame(&h2, &hold, &refs[..2]).unwrap();
    assert!(matches!(
        read_reply(&h2),
        Some(Reply::Error(Error::Protocol { .. }))
    ));
    drop(h2);
    eventually("the refused holder's descriptors to be closed", || {
        open_fds(pid) <= before + 6
    });
    drop((s, h));
}

#[test]
fn one_vm_with_a_thousand_disks_acquires_them_in_one_request() {
    let f = fixture(None);
    let disks: Vec<Resource> = (0..1000)
        .map(|i| disk(&f, &format!("d{i}"), DiskMode::Exclusive))
        .collect();
    let ga = Guest::spawn();
    let started = domain::process_start(
        &f.plugin,
        vm("many", &ga),
        disks.iter().cloned(),
        &AcquireOptions::default(),
    );
    let mut a = started.unwrap();
    assert_eq!(a.inquire().unwrap().entries.len(), 1000);

    // Another VM is refused each of them (one request each on one connection).
    let gb = Guest::spawn();
    let endpoint = f.daemon.endpoint();
    let other = VmIdentity {
        uuid: uuid::Uuid::new_v4().to_string(),
        name: "other".into(),
        id: 2,
        pid: gb.pid(),
    };
    let holder = Holder::start(&endpoint, other.clone()).unwrap();
    let mut conn = endpoint.connect().unwrap();
    for d in &disks {
        let e = conn
            .call(
                &Request::Acquire {
                    uuid: other.uuid.clone(),
                    resources: vec![d.clone()],
                    flags: AcquireFlags::default(),
                },
                &[],
            )
            .unwrap_err();
        assert!(
            matches!(&e, Error::Busy { resource, .. } if *resource == d.label()),
            "{e}"
        );
    }
    for d in &disks {
        assert!(locked_by_someone(d.path()), "{} not locked", d.label());
    }

    // Release all: every disk is free again.
    a.release().unwrap();
    for d in &disks {
        assert!(!locked_by_someone(d.path()), "{} still locked", d.label());
    }
    holder.stop();
}

#[test]
fn the_connection_limit_answers_too_many_clients_and_never_refuses_a_holder() {
    let f = fixture(Some("max_clients = 4"));
    let endpoint = f.daemon.endpoint();
    let mut open: Vec<Connection> = (0..4).map(|_| endpoint.connect().unwrap()).collect();
    for c in &mut open {
        status(c);
    }
    let mut fifth = endpoint.connect().unwrap();
    let e = fifth.call(&Request::Status, &[]).unwrap_err();
    assert!(
        matches!(&e, Error::ServiceUnavailable { reason } if reason.contains("too many clients (max_clients = 4)")),
        "{e}"
    );
    // The others are still served.
    for c in &mut open {
        status(c);
    }
    // A VM's holder is not refused by the limit, nor is its start.
    let g = Guest::spawn();
    let d = disk(&f, "h", DiskMode::Exclusive);
    let identity = VmIdentity {
        uuid: uuid::Uuid::new_v4().to_string(),
        name: "held".into(),
        id: 3,
        pid: g.pid(),
    };
    let holder = Holder::start(&endpoint, identity.clone()).unwrap();
    let reply = open[0]
        .call(
            &Request::Acquire {
                uuid: identity.uuid.clone(),
                resources: vec![d.clone()],
                flags: AcquireFlags::default(),
            },
            &[],
        )
        .unwrap();
    assert!(matches!(reply, Reply::Held(_)), "{reply:?}");
    assert!(locked_by_someone(d.path()));
    // A closed connection frees its place.
    open.pop();
    eventually("a free place", || {
        endpoint
            .connect()
            .and_then(|mut c| c.call(&Request::Status, &[]))
            .is_ok()
    });
    holder.stop();
}

#[test]
fn idle_request_connections_time_out_and_holders_do_not() {
    let f = fixture(Some("idle_timeout_ms = 300"));
    let socket = f.daemon.runtime().socket();
    let g = Guest::spawn();
    let d = disk(&f, "i", DiskMode::Exclusive);
    let mut m = domain::process_start(
        &f.plugin,
        vm("idle", &g),
        [d.clone()],
        &AcquireOptions::default(),
    )
    .unwrap();

    // Said hello, then nothing: told why, then closed.
    let started = Instant::now();
    let mut s = raw_connection(&socket);
    match read_reply(&s) {
        Some(Reply::Error(Error::ServiceUnavailable { reason })) => {
            assert!(reason.contains("idle"), "{reason}")
        }
        other => panic!("an idle connection was not closed: {other:?}"),
    }
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap_or(0), 0, "closed");
    assert!(started.elapsed() < Duration::from_secs(5));

    // Not even hello: closed.
    let mut quiet = UnixStream::connect(&socket).unwrap();
    quiet
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(quiet.read_to_end(&mut rest).unwrap_or(1), 0, "closed");

    // The holder connection outlived several idle timeouts: the VM's lock is kept, and a change
    // pushed to it still works. (What is tested is that nothing happens, so time must pass.)
    std::thread::sleep(Duration::from_millis(1000));
    assert!(locked_by_someone(d.path()));
    let mut conn = f.daemon.endpoint().connect().unwrap();
    let listed = status(&mut conn);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(listed[0].holder_pid.is_some(), "holder disconnected");
    domain::disk_detach(&mut m, &d).unwrap();
    assert!(!locked_by_someone(d.path()));
}

#[test]
fn out_of_descriptors_the_daemon_backs_off_quietly_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("run");
    let log = dir.path().join("vmlockd.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmlockd"))
        .arg("--runtime-dir")
        .arg(&runtime)
        .arg("--notify-stdout")
        .env("VMLOCK_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "READY");
    let pid = child.id();
    let socket = runtime.join("vmlockd.sock");
    // Only the soft limit moves: raising a hard limit again may need a capability we lack.
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    let set_limit = |n: u64| {
        let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
        rustix::process::prlimit(
            Some(pid),
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: Some(n),
                maximum: hard,
            },
        )
        .unwrap();
    };
    let check = || {
        // Whatever happens, kill the daemon we started.
        let ok = std::panic::catch_unwind(|| {
            set_limit(open_fds(pid) as u64 + 3);
            let clients: Vec<UnixStream> = (0..10)
                .map(|_| UnixStream::connect(&socket).unwrap())
                .collect();
            // The test counts log lines over a window: time must pass, no event marks its end.
            std::thread::sleep(Duration::from_millis(1500));
            let text = std::fs::read_to_string(&log).unwrap();
            let lines = text.lines().filter(|l| l.contains("accept")).count();
            assert!(
                (1..=3).contains(&lines),
                "{lines} accept lines logged in 1.5 s:\n{}",
                text.lines().take(5).collect::<Vec<_>>().join("\n")
            );
            drop(clients);
            set_limit(hard.unwrap_or(4096));
            // Serves again: a fresh connection says hello within the back-off.
            let s = raw_connection(&socket);
            write_frame(&s, &Request::Status, &[]).unwrap();
            assert!(matches!(read_reply(&s), Some(Reply::Status(_))));
        });
        ok
    };
    let result = check();
    let _ = child.kill();
    let _ = child.wait();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn a_restart_without_state_files_keeps_the_guest_pid_and_the_lock_failure_action() {
    let mut f = fixture(Some("lease_check_interval_ms = 50"));
    let g = Guest::spawn();
    let d = disk(&f, "r", DiskMode::Exclusive);
    // Started as `vmlock run` does: the supervisor (here the test) is the pid until the guest
    // starts as its child.
    let params = vmlock::VmParams::new(7, uuid::Uuid::new_v4(), "restarted").unwrap();
    let options = AcquireOptions {
        on_lock_failure: LockFailureAction::Ignore,
        ..AcquireOptions::default()
    };
    let mut m = domain::process_start(&f.plugin, params, [d.clone()], &options).unwrap();
    m.guest_started(g.pid()).unwrap();

    f.daemon.kill();
    let runtime = f.daemon.runtime();
    let state = runtime.state_file();
    std::fs::remove_file(&state).unwrap();
    let _ = std::fs::remove_file(state.with_extension("journal"));
    f.daemon.restart();

    let mut conn = f.daemon.endpoint().connect().unwrap();
    eventually("the holder to register again", || {
        status(&mut conn).iter().any(|o| o.vm.name == "restarted")
    });
    let listed = status(&mut conn);
    assert_eq!(
        listed[0].vm.pid,
        g.pid(),
        "re-registered with a wrong guest pid"
    );
    assert!(locked_by_someone(d.path()));

    // The disk is replaced under the running guest: its action is still `ignore`.
    let fresh = d.path().with_extension("new");
    std::fs::write(&fresh, vec![0u8; 4096]).unwrap();
    std::fs::rename(&fresh, d.path()).unwrap();
    eventually("the lost lease to be noticed", || {
        status(&mut conn)[0].resources.iter().any(|r| r.lost)
    });
    // `ignore` means nothing happens to the guest: give a wrongly taken action time to show.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        vmlock::process::is_running(g.pid()),
        "the guest was powered off: the VM's `ignore` was forgotten"
    );
    drop(m);
}
