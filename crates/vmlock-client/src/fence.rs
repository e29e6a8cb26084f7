//! The fencing deadline that vmlockd hands to supervisors, so that a guest holding cluster-wide
//! (etcd) locks stops in time even when vmlockd itself cannot act: stopped (SIGSTOP), hung, or
//! dead.
//!
//! vmlockd writes `RUNTIME/fence.json` (atomically: write, then rename) whenever its etcd lease
//! is renewed: the lease's deadline D on `CLOCK_BOOTTIME`, and `fence_lead` (T_stop). It fences
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

/// Writes `deadline` (vmlockd). Atomic: readers see the old or the new file, never a torn one.
pub fn write(runtime_dir: &Path, deadline: &FenceDeadline) -> std::io::Result<()> {
    let target = path(runtime_dir);
    let tmp = target.with_extension("json.tmp");
    let text = serde_json::to_vec(deadline).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &target)
}

/// Removes the file (vmlockd without etcd: a file left by an earlier configuration would make
/// supervisors fence for a lease nobody renews).
pub fn remove(runtime_dir: &Path) {
    let _ = std::fs::remove_file(path(runtime_dir));
}

/// Reads the file; `None` if there is none (no cluster locks) or it cannot be parsed.
pub fn read(runtime_dir: &Path) -> Option<FenceDeadline> {
    let text = std::fs::read(path(runtime_dir)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// How often a watching supervisor looks at the file while its deadline is far.
const LOOK_EVERY: Duration = Duration::from_millis(250);

/// Starts a thread that calls `stop_guest` once, if the deadline in `runtime_dir`'s file passes
/// its supervisor's turn without being renewed. Returns `false` (and starts nothing) when there
/// is no file: vmlockd holds no cluster locks.
pub fn watch(runtime_dir: &Path, stop_guest: impl FnOnce() + Send + 'static) -> bool {
    if read(runtime_dir).is_none() {
        return false;
    }
    let dir = runtime_dir.to_path_buf();
    std::thread::Builder::new()
        .name("fence-watch".into())
        .spawn(move || {
            loop {
                let Some(d) = read(&dir) else {
                    // Removed: the daemon runs without etcd now. Nothing to fence for.
                    return;
                };
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
