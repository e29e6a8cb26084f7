//! The fencing deadline that vmlockd hands to supervisors, so that a guest holding cluster-wide
//! (etcd) locks stops in time even when vmlockd itself cannot act: stopped (SIGSTOP), hung, or
//! dead.
//!
//! vmlockd writes `RUNTIME/fence.json` whenever its etcd lease is renewed — in place, one
//! fixed-size record written by one `pwrite` at offset 0, so that a full runtime file system
//! cannot keep the daemon from moving the deadline (a rename would need new blocks, and the
//! supervisors would fence a healthy daemon's guests on the stale deadline): the lease's deadline D on `CLOCK_BOOTTIME`, and `fence_lead` (T_stop). It fences
//! its own guests at D − T_stop. Each supervisor of a VM with exclusive or shared disks
//! ([`watch`]) reads the file and, if D − T_stop/2 arrives without the file moving D forward,
//! stops its guest itself: the second line of defence, which needs nothing from the daemon but
//! the file it wrote while it could. `CLOCK_BOOTTIME` keeps counting across suspend, as the
//! lease does on the cluster. No file means no cluster locks: nothing to watch.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What `fence.json` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceDeadline {
    /// The etcd lease it belongs to.
    pub lease: i64,
    /// D: `CLOCK_BOOTTIME` milliseconds before which the cluster cannot have expired the lease.
    pub deadline_boot_ms: u64,
    /// T_stop: how long before D the daemon starts stopping guests.
    pub fence_lead_ms: u64,
}

impl FenceDeadline {
    /// When a supervisor acts if D has not moved: D − T_stop/2, after the daemon's own turn.
    pub fn supervisor_acts_at(&self) -> Duration {
        Duration::from_millis(self.deadline_boot_ms.saturating_sub(self.fence_lead_ms / 2))
    }
}

/// `CLOCK_BOOTTIME` now.
pub fn boot_time() -> Duration {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// The deadline file in `runtime_dir`.
pub fn path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("fence.json")
}

/// Size of the record: the JSON, padded with spaces.
const RECORD: usize = 128;

/// Writes `deadline` (vmlockd), in place: once the file exists, writing needs no new block. A
/// reader racing the write may see a torn record; it does not parse, and the reader looks again.
pub fn write(runtime_dir: &Path, deadline: &FenceDeadline) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut record = serde_json::to_vec(deadline).map_err(std::io::Error::other)?;
    if record.len() > RECORD {
        return Err(std::io::Error::other("fence record too long"));
    }
    record.resize(RECORD, b' ');
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path(runtime_dir))?;
    file.write_all_at(&record, 0)?;
    file.set_len(RECORD as u64)
}

/// Removes the file (vmlockd without etcd: a file left by an earlier configuration would make
/// supervisors fence for a lease nobody renews).
pub fn remove(runtime_dir: &Path) {
    let _ = std::fs::remove_file(path(runtime_dir));
}

/// What the file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// No file: no cluster locks.
    Absent,
    /// A record that does not parse (torn by a concurrent write, or damaged).
    Unreadable,
    /// The deadline.
    Deadline(FenceDeadline),
}

/// Reads the file.
pub fn read_file(runtime_dir: &Path) -> Reading {
    match std::fs::read(path(runtime_dir)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Reading::Absent,
        Err(_) => Reading::Unreadable,
        Ok(bytes) => serde_json::from_slice(bytes.trim_ascii_end())
            .map_or(Reading::Unreadable, Reading::Deadline),
    }
}

/// The deadline in the file, if there is a readable one.
pub fn read(runtime_dir: &Path) -> Option<FenceDeadline> {
    match read_file(runtime_dir) {
        Reading::Deadline(d) => Some(d),
        Reading::Absent | Reading::Unreadable => None,
    }
}

/// How often a watching supervisor looks at the file while its deadline is far.
const LOOK_EVERY: Duration = Duration::from_millis(250);

/// Starts a thread that calls `stop_guest` once, if the deadline in `runtime_dir`'s file passes
/// its supervisor's turn without being renewed. Returns `false` (and starts nothing) when there
/// is no file: vmlockd holds no cluster locks.
pub fn watch(runtime_dir: &Path, stop_guest: impl FnOnce() + Send + 'static) -> bool {
    let Some(first) = read(runtime_dir) else {
        return false;
    };
    let dir = runtime_dir.to_path_buf();
    std::thread::Builder::new()
        .name("fence-watch".into())
        .spawn(move || {
            // The last deadline read stays in force while the file cannot be read (a write
            // racing the read, or a damaged file): a damaged file never keeps a guest from its
            // fencing, nor makes this thread spin.
            let mut last = first;
            loop {
                let d = match read_file(&dir) {
                    // Removed: the daemon runs without etcd now. Nothing to fence for.
                    Reading::Absent => return,
                    Reading::Deadline(d) => d,
                    Reading::Unreadable => last,
                };
                last = d;
                let now = boot_time();
                let acts_at = d.supervisor_acts_at();
                if now >= acts_at {
                    // First the guest, then the message: standard error may be a closed pipe,
                    // and a report must never stand between a guest and its fencing.
                    stop_guest();
                    let _ = writeln!(
                        std::io::stderr(),
                        "vmlock: the lock daemon did not renew its etcd lease {:x} in time \
                         (its deadline passed on CLOCK_BOOTTIME): the guest was stopped before \
                         another host could take its disks",
                        d.lease
                    );
                    return;
                }
                // A timer, not an event: the daemon renews by rewriting the file.
                std::thread::sleep((acts_at - now).min(LOOK_EVERY));
            }
        })
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn the_record_is_rewritten_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = |ms| FenceDeadline {
            lease: 1,
            deadline_boot_ms: ms,
            fence_lead_ms: 2,
        };
        write(dir.path(), &d(123_456_789)).expect("write");
        let ino = std::os::unix::fs::MetadataExt::ino(
            &std::fs::metadata(path(dir.path())).expect("meta"),
        );
        write(dir.path(), &d(5)).expect("rewrite");
        let meta = std::fs::metadata(path(dir.path())).expect("meta");
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&meta),
            ino,
            "a new file"
        );
        assert_eq!(meta.len(), RECORD as u64);
        assert_eq!(
            read(dir.path()),
            Some(d(5)),
            "the shorter record left no trailing bytes"
        );
        std::fs::write(path(dir.path()), b"{\"lease\":1,\"dead").expect("torn");
        assert_eq!(read_file(dir.path()), Reading::Unreadable);
    }

    /// A damaged file after the watch began: the last deadline read still stops the guest in
    /// time (before, a watcher that had read nothing yet retried every 10 ms and never acted).
    #[test]
    fn a_damaged_file_keeps_the_last_deadline_in_force() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let deadline = FenceDeadline {
            lease: 9,
            deadline_boot_ms: ms(boot_time() + Duration::from_millis(600)),
            fence_lead_ms: 400,
        };
        write(dir.path(), &deadline).expect("write");
        let (tx, rx) = mpsc::channel();
        assert!(watch(dir.path(), move || tx
            .send(boot_time())
            .unwrap_or(())));
        std::fs::write(path(dir.path()), b"garbage").expect("damage");
        let acted = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("a damaged file kept the guest from its fencing");
        assert!(acted >= deadline.supervisor_acts_at(), "acted early");
        assert!(
            acted < Duration::from_millis(deadline.deadline_boot_ms),
            "acted after D itself"
        );
    }

    #[test]
    fn a_renewed_deadline_is_kept_and_a_stale_one_stops_the_guest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, rx) = mpsc::channel();
        assert!(!watch(dir.path(), || {}), "no file, no watch");

        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let renew = |ahead: Duration| {
            write(
                dir.path(),
                &FenceDeadline {
                    lease: 7,
                    deadline_boot_ms: ms(boot_time() + ahead),
                    fence_lead_ms: 400,
                },
            )
            .expect("write");
        };
        renew(Duration::from_millis(1000));
        let started = boot_time();
        assert!(watch(dir.path(), move || tx
            .send(boot_time())
            .unwrap_or(())));
        // Renewed three times, each before the watcher's turn (D − 200 ms): it does not act.
        for _ in 0..3 {
            assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
            renew(Duration::from_millis(1000));
        }
        let last = read(dir.path()).expect("file");
        let acted = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the watcher never acted on a stale deadline");
        assert!(acted >= last.supervisor_acts_at(), "acted early: {acted:?}");
        assert!(
            acted < Duration::from_millis(last.deadline_boot_ms),
            "acted after D itself"
        );
        assert!(acted - started > Duration::from_millis(1500));
    }
}
