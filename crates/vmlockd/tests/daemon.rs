//! vmlockd end to end: a real daemon process over its real socket.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{locked_by_someone, raw_connection, read_reply, start, Daemon, Fixture};
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmlock::conformance::{disk, vm, Guest};
use vmlock::{domain, AcquireOptions, DiskMode, Error, ForeignHolder, Resource};
use vmlock_client::proto::{write_frame, Reply, Request};
use vmlock_sys::ofd::{self, LockKind};
use vmlock_testkit::process::wait_until;
use vmlock_testkit::qemu::{DaemonizedQemu, QemuLine};

fn fixture() -> Fixture {
    Fixture::new(Daemon::start())
}

fn status(f: &Fixture) -> Vec<vmlock_client::proto::OwnerStatus> {
    match f
        .daemon
        .endpoint()
        .connect()
        .unwrap()
        .call(&Request::Status, &[])
        .unwrap()
    {
        Reply::Status(s) => s,
        other => panic!("{other:?}"),
    }
}

/// Waits (bounded) for a condition the daemon reaches asynchronously and exposes no event for.
fn eventually(what: &str, cond: impl FnMut() -> bool) {
    wait_until(
        what,
        Duration::from_secs(10),
        Duration::from_millis(5),
        cond,
    );
}

#[test]
fn daemon_killed_and_restarted_keeps_every_lock_and_every_guest() {
    let mut f = fixture();
    let (ga, gb) = (Guest::spawn(), Guest::spawn());
    let a_disks = [
        disk(&f, "a1", DiskMode::Exclusive),
        disk(&f, "a2", DiskMode::Exclusive),
    ];
    let b_disk = disk(&f, "b", DiskMode::Shared);
    let vm_a = start(&f, "vm-a", &ga, &a_disks).unwrap().vm().clone();
    let _b = start(&f, "vm-b", &gb, std::slice::from_ref(&b_disk)).unwrap();

    f.daemon.kill();
    // No daemon at all now: the kernel still holds every lock through the holders' descriptions.
    for d in &a_disks {
        assert!(
            locked_by_someone(d.path()),
            "{} lost its lock with the daemon",
            d.label()
        );
    }
    let outsider = OpenOptions::new()
        .read(true)
        .write(true)
        .open(b_disk.path())
        .unwrap();
    assert!(
        !ofd::try_lock(outsider.as_fd(), LockKind::Exclusive, 0, 1).unwrap(),
        "shared lock kept"
    );
    drop(outsider);

    f.daemon.restart();
    // The new daemon lists every holder at once, from its state file...
    let listed = status(&f);
    assert_eq!(listed.len(), 2, "{listed:?}");
    let a = listed.iter().find(|o| o.vm.name == "vm-a").unwrap();
    assert_eq!(a.vm.pid, ga.pid());
    assert_eq!(a.resources.len(), 2);
    // ...refuses a conflicting start naming the holder...
    let gc = Guest::spawn();
    let e = start(&f, "vm-c", &gc, std::slice::from_ref(&a_disks[0])).unwrap_err();
    assert!(
        matches!(&e, Error::Busy { holder: ForeignHolder::Vm(h), .. } if h.name == "vm-a"),
        "{e}"
    );
    // ...and gets every description back from the holders.
    eventually("holders to hand their locks back", || {
        status(&f)
            .iter()
            .all(|o| o.resources.iter().all(|r| r.confirmed))
    });
    // No guest was touched.
    assert!(vmlock::process::is_running(ga.pid()) && vmlock::process::is_running(gb.pid()));
    // And the locks still work normally: unplug through a re-attached manager frees the disk.
    let (mut again, pid) = domain::process_reattach(&f.plugin, vm_a).unwrap();
    assert_eq!(pid, Some(ga.pid()));
    domain::disk_detach(&mut again, &a_disks[0]).unwrap();
    assert!(!locked_by_someone(a_disks[0].path()));
    assert!(locked_by_someone(a_disks[1].path()));
}

#[test]
fn stopping_the_daemon_with_sigterm_kills_no_guest_and_drops_no_lock() {
    let mut f = fixture();
    let g = Guest::spawn();
    let d = disk(&f, "t", DiskMode::Exclusive);
    let _a = start(&f, "vm-a", &g, std::slice::from_ref(&d)).unwrap();
    f.daemon.terminate();
    assert!(
        vmlock::process::is_running(g.pid()),
        "virtlockd kills guests on stop; vmlockd must not"
    );
    assert!(locked_by_someone(d.path()));
}

#[test]
fn a_vm_with_64_disks_is_one_request_and_all_or_nothing() {
    let f = fixture();
    let disks: Vec<Resource> = (0..64)
        .map(|i| disk(&f, &format!("d{i}"), DiskMode::Exclusive))
        .collect();
    let ga = Guest::spawn();
    let _blocker = start(&f, "blocker", &ga, std::slice::from_ref(&disks[63])).unwrap();
    let gb = Guest::spawn();
    let e = start(&f, "big", &gb, &disks).unwrap_err();
    assert!(
        matches!(&e, Error::Busy { resource, .. } if *resource == disks[63].label()),
        "{e}"
    );
    for d in &disks[..63] {
        assert!(
            !locked_by_someone(d.path()),
            "{} left held after a refused start",
            d.label()
        );
    }
    drop(_blocker);
    let gc = Guest::spawn();
    let mut m = start(&f, "big2", &gc, &disks[..63]).unwrap();
    assert_eq!(m.inquire().unwrap().entries.len(), 63);
}

#[test]
fn release_of_several_releases_what_it_can_and_reports_every_failure() {
    let f = fixture();
    let g = Guest::spawn();
    let held = disk(&f, "held", DiskMode::Exclusive);
    let (x, y) = (
        disk(&f, "x", DiskMode::Exclusive),
        disk(&f, "y", DiskMode::Exclusive),
    );
    let mut m = start(&f, "vm-a", &g, std::slice::from_ref(&held)).unwrap();
    let mut conn = f.daemon.endpoint().connect().unwrap();
    let uuid = m.vm().uuid.to_string();
    let e = conn
        .call(
            &Request::Release {
                uuid: uuid.clone(),
                resources: Some(vec![x.clone(), held.clone(), y.clone()]),
            },
            &[],
        )
        .unwrap_err();
    match e {
        Error::PartialRelease { failures } => {
            let names: Vec<_> = failures.iter().map(|f| f.resource.clone()).collect();
            assert_eq!(names, vec![x.label(), y.label()]);
        }
        other => panic!("{other}"),
    }
    assert!(
        !locked_by_someone(held.path()),
        "the held disk was released despite the others failing"
    );
    assert!(m.inquire().unwrap().entries.is_empty());
}

#[test]
fn restricted_connection_can_do_nothing_more() {
    let f = fixture();
    let g = Guest::spawn();
    let d = disk(&f, "r", DiskMode::Exclusive);
    let m = start(&f, "vm-a", &g, &[]).unwrap();
    let mut conn = f.daemon.endpoint().connect().unwrap();
    let flags = vmlock_client::proto::AcquireFlags {
        restrict: true,
        ..Default::default()
    };
    let uuid = m.vm().uuid.to_string();
    conn.call(
        &Request::Acquire {
            uuid: uuid.clone(),
            resources: vec![d.clone()],
            flags,
        },
        &[],
    )
    .unwrap();
    for req in [
        Request::Status,
        Request::Release {
            uuid: uuid.clone(),
            resources: None,
        },
        Request::Inquire { uuid },
    ] {
        assert_eq!(conn.call(&req, &[]).unwrap_err(), Error::Restricted);
    }
    assert!(
        locked_by_someone(d.path()),
        "the restricted connection still holds through its VM"
    );
}

#[test]
fn unauthorised_peer_is_refused() {
    let f = fixture();
    let run = f.daemon.runtime();
    // Open the file-system gate so that only the daemon's SO_PEERCRED check stands in the way.
    for p in [f.daemon.disk_dir().to_path_buf(), run.path().to_path_buf()] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(run.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let script = r#"
import socket, struct, sys, json
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
body = json.dumps({"Hello": {"version": 1}}).encode()
try:
    s.sendall(struct.pack(">I", len(body)) + body)
except (BrokenPipeError, ConnectionResetError):
    pass  # the daemon may refuse and close before reading: its answer is still queued
def exact(k):
    b = b""
    while len(b) < k:
        chunk = s.recv(k - len(b))
        if not chunk:
            break
        b += chunk
    return b
n = struct.unpack(">I", exact(4))[0]
print(exact(n).decode())
"#;
    // Debian's interpreter: a per-user one (pyenv under /root) is not readable by uid 65534.
    let python = ["/usr/bin/python3", "python3"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .unwrap_or("python3");
    let out = std::process::Command::new(python)
        .args(["-c", script])
        .arg(run.socket())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("PermissionDenied") && text.contains("uid 65534"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The daemon still serves its own user.
    assert!(status(&f).is_empty());
}

#[test]
fn malformed_oversized_and_truncated_frames_change_nothing() {
    let f = fixture();
    let g = Guest::spawn();
    let d = disk(&f, "m", DiskMode::Exclusive);
    let _m = start(&f, "vm-a", &g, std::slice::from_ref(&d)).unwrap();
    let before = status(&f);

    // Oversized: refused from the header alone, then closed.
    let mut s = raw_connection(&f.daemon.runtime().socket());
    s.write_all(&u32::MAX.to_be_bytes()).unwrap();
    assert!(matches!(
        read_reply(&s),
        Some(Reply::Error(Error::Protocol { .. }))
    ));
    let mut rest = Vec::new();
    assert_eq!(
        s.read_to_end(&mut rest).unwrap_or(0),
        0,
        "connection closed"
    );

    // Not JSON, and JSON of the wrong shape.
    for body in [
        &b"\xff\xfe garbage"[..],
        br#"{"Acquire": {"uuid": 7}}"#,
        br#"{"Release": null}"#,
    ] {
        let mut s = raw_connection(&f.daemon.runtime().socket());
        s.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
        s.write_all(body).unwrap();
        assert!(
            matches!(read_reply(&s), Some(Reply::Error(Error::Protocol { .. }))),
            "{body:?}"
        );
    }

    // Wrong protocol version and a first frame that is not Hello.
    let s = UnixStream::connect(f.daemon.runtime().socket()).unwrap();
    write_frame(&s, &Request::Hello { version: 99 }, &[]).unwrap();
    assert!(
        matches!(read_reply(&s), Some(Reply::Error(Error::Protocol { reason })) if reason.contains("99"))
    );
    let s = UnixStream::connect(f.daemon.runtime().socket()).unwrap();
    write_frame(&s, &Request::Status, &[]).unwrap();
    assert!(matches!(
        read_reply(&s),
        Some(Reply::Error(Error::Protocol { .. }))
    ));

    // A frame that stops halfway: the daemon gives up after its frame timeout, not never.
    let mut s = raw_connection(&f.daemon.runtime().socket());
    s.write_all(&100u32.to_be_bytes()).unwrap();
    s.write_all(b"{\"Sta").unwrap();
    let started = Instant::now();
    assert!(matches!(
        read_reply(&s),
        Some(Reply::Error(Error::Protocol { .. }))
    ));
    assert!(started.elapsed() < Duration::from_secs(30));

    // Unknown VM and bad resources are clear errors.
    let mut c = f.daemon.endpoint().connect().unwrap();
    let e = c
        .call(
            &Request::Inquire {
                uuid: "7c9e6679-7425-40de-944b-e07fc1f90ae7".into(),
            },
            &[],
        )
        .unwrap_err();
    assert!(matches!(e, Error::UnknownOwner { .. }), "{e}");

    assert_eq!(status(&f), before, "the lock table changed");
    assert!(locked_by_someone(d.path()));
}

#[test]
fn a_virtlockd_style_posix_lock_on_byte_0_makes_acquire_fail() {
    let f = fixture();
    let d = disk(&f, "posix", DiskMode::Exclusive);
    // virtlockd takes a classic POSIX write lock on byte 0 of the image; do the same from a child.
    let mut holder = Command::new("python3")
        .args(["-c", "import fcntl,sys,time; f=open(sys.argv[1],'r+'); fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB, 1, 0); print('locked', flush=True); sys.stdin.read()"])
        .arg(d.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "locked");
    let g = Guest::spawn();
    let e = start(&f, "vm-a", &g, std::slice::from_ref(&d)).unwrap_err();
    match &e {
        Error::Busy {
            holder: ForeignHolder::Process { pid, what, .. },
            ..
        } => {
            assert_eq!(*pid, holder.id());
            assert!(what.contains("POSIX"), "{what}");
        }
        other => panic!("{other}"),
    }
    let _ = holder.kill();
    let _ = holder.wait();
    start(&f, "vm-a2", &g, &[d]).unwrap();
}

fn qcow2(f: &Fixture, name: &str) -> Resource {
    let path = vmlock_testkit::qemu::qcow2(f.daemon.disk_dir(), name);
    Resource::disk(path, DiskMode::Exclusive).unwrap()
}

fn qemu_io_write(path: &Path) -> std::process::Output {
    Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 4k"])
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn qemu_reads_with_force_share_and_writes_despite_byte_0() {
    let f = fixture();
    let d = qcow2(&f, "q.qcow2");
    let g = Guest::spawn();
    let _m = start(&f, "vm-a", &g, std::slice::from_ref(&d)).unwrap();
    let info = Command::new("qemu-img")
        .args(["info", "-U"])
        .arg(d.path())
        .output()
        .unwrap();
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    // vmlock's byte 0 never touches QEMU's bytes 100+ and 200+: a writable QEMU open still works
    // (vmlock protects against other VMs through vmlock, not by blocking the VM's own QEMU).
    let w = qemu_io_write(d.path());
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
}

#[test]
fn holding_qemu_bytes_makes_a_stray_qemu_refuse_to_write() {
    let f = fixture();
    let d = qcow2(&f, "h.qcow2");
    let g = Guest::spawn();
    let options = AcquireOptions {
        hold_qemu_bytes: true,
        ..Default::default()
    };
    let _m = domain::process_start(&f.plugin, vm("vm-a", &g), [d.clone()], &options).unwrap();
    let w = qemu_io_write(d.path());
    assert!(!w.status.success());
    assert!(
        String::from_utf8_lossy(&w.stderr).contains("Failed to get \"write\" lock"),
        "{}",
        String::from_utf8_lossy(&w.stderr)
    );
    let info = Command::new("qemu-img")
        .args(["info", "-U"])
        .arg(d.path())
        .output()
        .unwrap();
    assert!(info.status.success(), "force-share readers still work");
}

#[test]
fn a_qemu_writer_outside_vmlock_is_detected_and_named() {
    let f = fixture();
    let d = qcow2(&f, "w.qcow2");
    // Started outside vmlock, daemonized: set up with its disk open when this returns.
    let qemu = DaemonizedQemu::start(
        &QemuLine::new(d.path()),
        &f.daemon.disk_dir().join("foreign-qemu.pid"),
    );
    let g = Guest::spawn();
    let e = start(&f, "vm-a", &g, std::slice::from_ref(&d)).unwrap_err();
    match &e {
        Error::Busy {
            holder: ForeignHolder::Process { pid, command, what },
            ..
        } => {
            assert_eq!(*pid, qemu.pid, "{e}");
            assert!(
                command.contains("qemu") && what.contains("QEMU write lock"),
                "{e}"
            );
        }
        other => panic!("{other}"),
    }
    assert!(
        !locked_by_someone(d.path()),
        "nothing left held after the refusal"
    );
    drop(qemu);
    start(&f, "vm-a", &g, &[d]).unwrap();
}

#[test]
fn aliases_of_one_disk_get_one_lock() {
    let f = fixture();
    let d = disk(&f, "alias", DiskMode::Exclusive);
    let link = f.daemon.disk_dir().join("alias-symlink.img");
    let hard = f.daemon.disk_dir().join("alias-hardlink.img");
    std::os::unix::fs::symlink(d.path(), &link).unwrap();
    std::fs::hard_link(d.path(), &hard).unwrap();
    let (ga, gb) = (Guest::spawn(), Guest::spawn());
    let _a = start(&f, "vm-a", &ga, std::slice::from_ref(&d)).unwrap();
    for alias in [link, hard] {
        let r = Resource::disk(&alias, DiskMode::Exclusive).unwrap();
        let e = start(&f, "vm-b", &gb, &[r]).unwrap_err();
        assert!(
            matches!(&e, Error::Busy { holder: ForeignHolder::Vm(h), .. } if h.name == "vm-a"),
            "{e}"
        );
    }
}

#[test]
fn indirect_mode_locks_a_hashed_file_and_excludes_aliases() {
    let dir = tempfile::tempdir().unwrap();
    let lockspace = dir.path().join("lockspace");
    std::fs::create_dir(&lockspace).unwrap();
    let f = Fixture::new(Daemon::start_with_config(Some(&format!(
        "file_lockspace_dir = \"{}\"",
        lockspace.display()
    ))));
    let d = disk(&f, "ind", DiskMode::Exclusive);
    let link = f.daemon.disk_dir().join("ind-link.img");
    std::os::unix::fs::symlink(d.path(), &link).unwrap();
    let (ga, gb) = (Guest::spawn(), Guest::spawn());
    let _a = start(&f, "vm-a", &ga, std::slice::from_ref(&d)).unwrap();
    let (_, id) = vmlock_sys::disk::identify(d.path()).unwrap();
    let lock_file = lockspace.join(vmlockd::host::lockspace_name(&id));
    assert!(
        locked_by_someone(&lock_file),
        "lock file {} not locked",
        lock_file.display()
    );
    assert!(
        !locked_by_someone(d.path()),
        "indirect mode must not lock the image itself"
    );
    let e = start(
        &f,
        "vm-b",
        &gb,
        &[Resource::disk(&link, DiskMode::Exclusive).unwrap()],
    )
    .unwrap_err();
    assert!(matches!(e, Error::Busy { .. }), "{e}");
}
