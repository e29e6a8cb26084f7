//! The private libvirtd fixture with stock lockd: a TCG domain on a qcow2 disk starts, virtlockd
//! holds a whole-file POSIX lock on the disk until the domain is destroyed, and a domain survives
//! a libvirtd restart (in a fresh mount namespace) and can still be destroyed.

use std::path::Path;
use std::time::{Duration, Instant};
use vmlock_sys::pidfd::ProcessHandle;
use vmlock_testkit::libvirt::{self, domain_xml, LibvirtDaemon};
use vmlock_testkit::process::wait_until;
use vmlock_testkit::qemu;

/// Pids holding a POSIX lock on `file`'s inode, from /proc/locks.
fn posix_lockers(file: &Path) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(file).expect("stat the image").ino();
    std::fs::read_to_string("/proc/locks")
        .expect("read /proc/locks")
        .lines()
        .filter_map(|l| {
            // "1: POSIX  ADVISORY  WRITE 1234 fe:01:5678 0 EOF" ("->" marks a blocked waiter).
            let f: Vec<&str> = l.split_whitespace().filter(|w| *w != "->").collect();
            let inode = f.get(5)?.rsplit(':').next()?.parse::<u64>().ok()?;
            (f.get(1) == Some(&"POSIX") && inode == ino).then(|| f.get(4)?.parse().ok())?
        })
        .collect()
}

fn alive(pid: u32) -> bool {
    ProcessHandle::open(pid, None).is_ok_and(|h| !h.has_exited())
}

#[test]
fn lockd_domain_locks_its_disk_and_survives_a_libvirtd_restart() {
    if !libvirt::available() {
        println!("skipped: libvirtd or virsh not installed (scripts/install-test-deps.sh)");
        return;
    }
    let t = Instant::now();
    let mut d = LibvirtDaemon::lockd();
    println!("timing: daemon start {:?}", t.elapsed());
    let virtlockd = d.virtlockd_pid().expect("virtlockd started");
    let img = qemu::qcow2(d.dir(), "a.qcow2");

    d.define(&domain_xml("t1", None, &[&img]));
    let t = Instant::now();
    d.virsh_ok(&["start", "t1"]);
    println!("timing: virsh start {:?}", t.elapsed());
    assert_eq!(d.domstate("t1"), "running", "{}", d.diagnostics());
    let qemu_pid = d.qemu_pid("t1").expect("QEMU's pid file");
    assert!(alive(qemu_pid));
    assert_eq!(
        posix_lockers(&img),
        vec![virtlockd],
        "virtlockd's whole-file lock on the disk"
    );

    let t = Instant::now();
    d.virsh_ok(&["destroy", "t1"]);
    println!("timing: virsh destroy {:?}", t.elapsed());
    assert!(!alive(qemu_pid), "QEMU gone after destroy");
    // Bounded poll: virtlockd drops the lock when it sees QEMU's connection close, with no
    // event we could wait on from here.
    wait_until(
        "virtlockd to release the disk",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || posix_lockers(&img).is_empty(),
    );
    assert_eq!(d.domstate("t1"), "shut off");

    // A running domain across a libvirtd restart.
    d.virsh_ok(&["start", "t1"]);
    let qemu_pid = d.qemu_pid("t1").expect("QEMU's pid file");
    let old_libvirtd = d.libvirtd_pid();
    let t = Instant::now();
    d.restart();
    println!("timing: libvirtd restart {:?}", t.elapsed());
    assert_ne!(d.libvirtd_pid(), old_libvirtd);
    assert!(!alive(old_libvirtd));
    assert!(alive(qemu_pid), "QEMU survives the libvirtd restart");
    assert_eq!(d.domstate("t1"), "running", "{}", d.diagnostics());
    assert_eq!(d.qemu_pid("t1"), Some(qemu_pid));
    assert_eq!(
        posix_lockers(&img),
        vec![virtlockd],
        "lock kept over the restart"
    );
    d.virsh_ok(&["destroy", "t1"]);
    assert!(
        !alive(qemu_pid),
        "QEMU gone after destroy by the new libvirtd"
    );
    assert_eq!(d.domstate("t1"), "shut off");
    wait_until(
        "virtlockd to release the disk after the restart",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || posix_lockers(&img).is_empty(),
    );

    // Started again so that drop has a running QEMU to stop.
    d.virsh_ok(&["start", "t1"]);
    let qemu_pid = d.qemu_pid("t1").expect("QEMU's pid file");
    let libvirtd = d.libvirtd_pid();
    let dir = d.dir().to_owned();
    let t = Instant::now();
    drop(d);
    println!("timing: drop with a running domain {:?}", t.elapsed());
    for pid in [qemu_pid, libvirtd, virtlockd] {
        assert!(!alive(pid), "pid {pid} gone after drop");
    }
    assert!(!dir.exists(), "instance directory removed");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(&*dir.to_string_lossy()),
        "no mounts left on the host"
    );
}

#[test]
fn two_daemons_side_by_side_with_the_nop_manager() {
    if !libvirt::available() {
        println!("skipped: libvirtd or virsh not installed (scripts/install-test-deps.sh)");
        return;
    }
    // Started in parallel, as parallel tests do (beside the other test of this file).
    let daemons: Vec<LibvirtDaemon> = std::thread::scope(|s| {
        let started: Vec<_> = (0..2)
            .map(|i| {
                s.spawn(move || {
                    LibvirtDaemon::builder()
                        .etc_file("qemu-extra.conf", format!("instance = {i}\n"))
                        .start()
                })
            })
            .collect();
        started
            .into_iter()
            .map(|h| h.join().expect("daemon started"))
            .collect()
    });
    for (i, d) in daemons.iter().enumerate() {
        assert_eq!(
            std::fs::read_to_string(d.dir().join("etc/qemu-extra.conf")).expect("extra file"),
            format!("instance = {i}\n")
        );
        assert_eq!(d.virtlockd_pid(), None);
        let img = qemu::qcow2(d.dir(), "a.qcow2");
        // The same name and uuid in both: the daemons share nothing.
        d.define(&domain_xml(
            "same",
            Some("5b7c2c6e-0d1f-4a55-9d0e-3f6f1f6a2b11"),
            &[&img],
        ));
        d.virsh_ok(&["start", "same"]);
        assert!(
            posix_lockers(&img).is_empty(),
            "no lock manager: no whole-file lock"
        );
    }
    for d in &daemons {
        assert_eq!(d.domstate("same"), "running", "{}", d.diagnostics());
    }
    let pids: Vec<u32> = daemons
        .iter()
        .map(|d| d.qemu_pid("same").expect("QEMU's pid"))
        .collect();
    assert_ne!(pids[0], pids[1]);
    drop(daemons);
    assert!(pids.iter().all(|&p| !alive(p)), "QEMUs stopped by drop");
}
