//! The oracle can fail: two guests on one disk without vmlock each see no lock, and one sees the
//! other's mark; a guest alone on a disk locked by someone else finds nothing; under sanlock, a
//! guest whose parent holds no lease in its host's daemon sees no lease, and sees the daemon go.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use vmlock_testkit::process::{signal_and_wait, wait_until, KillOnDrop};
use vmlock_torture::guest::{log_path, mark, MARK_LEN, MARK_OFFSET};

/// How long a guest may take to show what it found.
const WAIT: Duration = Duration::from_secs(10);

fn guest(dir: &Path, id: u64, disk: &Path) -> KillOnDrop {
    guest_with(dir, id, disk, &[])
}

fn guest_with(dir: &Path, id: u64, disk: &Path, extra: &[&std::ffi::OsStr]) -> KillOnDrop {
    KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_vmlock-torture"))
            .args(["guest", "--id", &id.to_string(), "--dir"])
            .arg(dir)
            .args(extra)
            .arg("--disk")
            .arg(disk)
            .spawn()
            .unwrap(),
    )
}

/// SIGTERM, and the guest must exit 0 (it records `exit term`).
fn stop(mut g: KillOnDrop) {
    let status = signal_and_wait(
        &mut g.0,
        rustix::process::Signal::TERM,
        Duration::from_secs(10),
    );
    assert!(status.success(), "{status:?}");
}

fn findings(dir: &Path, id: u64) -> String {
    std::fs::read_to_string(log_path(dir, id)).unwrap_or_default()
}

fn disk(dir: &Path) -> std::path::PathBuf {
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(65536)
        .unwrap();
    disk
}

#[test]
fn two_unlocked_guests_on_one_disk_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(dir.path());
    let (a, b) = (guest(dir.path(), 1, &disk), guest(dir.path(), 2, &disk));
    // Bounded poll: the guests' findings appear in their logs (no other event exists).
    wait_until(
        "both guests' findings",
        WAIT,
        Duration::from_millis(5),
        || {
            let (one, two) = (findings(dir.path(), 1), findings(dir.path(), 2));
            one.contains("no-lock")
                && two.contains("no-lock")
                && (one + &two).contains("double-writer")
        },
    );
    stop(a);
    stop(b);
    for id in [1, 2] {
        let log = findings(dir.path(), id);
        assert!(log.contains("no-lock"), "guest {id}: {log}");
        assert!(log.contains("exit term"), "guest {id}: {log}");
    }
    let both = findings(dir.path(), 1) + &findings(dir.path(), 2);
    assert!(both.contains("double-writer"), "{both}");
}

#[test]
fn a_locked_disk_written_by_one_guest_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(dir.path());
    // The lock vmlock holds: an OFD write lock on byte 0, from another description.
    let holder = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    // SAFETY: `flock` is a plain C struct; all zeroes is a valid value of it.
    let mut lock: nix::libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = nix::libc::F_WRLCK as i16;
    lock.l_len = 1;
    nix::fcntl::fcntl(holder.as_raw_fd(), nix::fcntl::FcntlArg::F_OFD_SETLK(&lock)).unwrap();
    let g = guest(dir.path(), 7, &disk);
    // Bounded poll: the guest's mark in the disk shows it finished a round, lock check included.
    wait_until(
        "the guest's first round",
        WAIT,
        Duration::from_millis(5),
        || {
            let mut seen = [0u8; MARK_LEN];
            std::fs::File::open(&disk)
                .and_then(|f| f.read_exact_at(&mut seen, MARK_OFFSET))
                .is_ok_and(|()| seen == mark(7))
        },
    );
    stop(g);
    let log = findings(dir.path(), 7);
    assert_eq!(log.lines().count(), 1, "{log}");
    assert!(log.starts_with("exit term"), "{log}");
}

#[test]
fn under_sanlock_a_guest_without_its_lease_is_caught_and_sees_its_daemon_go() {
    // O_DIRECT lease I/O needs a real file system: the test kit's work dir is under /var/tmp.
    let dir = vmlock_testkit::sanlock::workdir("vmlock-torture-oracle-");
    let mut daemon = vmlock_testkit::sanlock::SanlockDaemon::start(dir.path(), "host-a");
    let disk = disk(dir.path());
    // Its parent (this test) holds no lease of the disk in the daemon.
    let g = guest_with(
        dir.path(),
        5,
        &disk,
        &["--sanlock".as_ref(), daemon.run_dir.as_os_str()],
    );
    // Bounded poll: the guest's findings appear in its log (no other event exists).
    wait_until(
        "the guest's no-lock",
        WAIT,
        Duration::from_millis(5),
        || findings(dir.path(), 5).contains("no-lock"),
    );
    daemon.kill(); // SIGKILL and reap, by pid
    wait_until(
        "the guest to see its daemon gone",
        WAIT,
        Duration::from_millis(5),
        || findings(dir.path(), 5).contains("lease-service-gone"),
    );
    stop(g);
    let log = findings(dir.path(), 5);
    assert!(log.contains("exit term"), "{log}");
    assert!(!log.contains("double-writer"), "{log}");
}
