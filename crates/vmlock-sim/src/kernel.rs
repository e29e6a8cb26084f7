//! A simulated kernel: files, open file descriptions (OFDs) with reference counts, OFD byte-range
//! locks with Linux's semantics, processes with pids that get reused, and a clock.
//!
//! [`SimHost`] is the core's [`Host`] over it. A [`SimFd`] is one reference to a description (one
//! file descriptor); dropping it closes that reference, exactly as dropping an `OwnedFd` does, so
//! a description the daemon, a holder or a pending message forgets is closed without the
//! simulator having to remember to. When a description's last reference closes, its locks go.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::rc::Rc;
use std::time::{Duration, SystemTime};
use vmlock_core::{Conflict, Host, LockKind};

/// Identifies a file (its inode).
pub type FileId = u64;
/// Identifies an open file description.
pub type OfdId = u64;
/// Every lock in the machine: `(file, byte)` and the descriptions holding it, sorted.
pub type LockSnapshot = Vec<((FileId, u64), Vec<(OfdId, LockKind)>)>;

#[derive(Debug)]
struct Ofd {
    file: FileId,
    references: u32,
    /// The bytes this description has locked, and how.
    locked: BTreeMap<u64, LockKind>,
}

/// One process as the kernel knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Process {
    /// Its pid (reused after it dies).
    pub pid: u32,
    /// Its start time, unique per process, which tells it from a later process with its pid.
    pub start_time: u64,
    /// Its parent's pid.
    pub ppid: u32,
}

/// The state of the simulated machine.
#[derive(Debug, Default)]
pub struct Kernel {
    ofds: HashMap<OfdId, Ofd>,
    next_ofd: OfdId,
    /// Who holds which lock on each (file, byte): the truth the invariants are checked against.
    locks: BTreeMap<(FileId, u64), Vec<(OfdId, LockKind)>>,
    /// The live process of each pid.
    live: HashMap<u32, Process>,
    /// Pids that have been used and are free again, reused first (to provoke pid reuse).
    free_pids: Vec<u32>,
    next_pid: u32,
    next_start_time: u64,
    /// Simulated seconds since the epoch.
    clock: u64,
}

/// A shared handle on the kernel (the daemon, the holders and the simulator all use one).
pub type KernelRef = Rc<RefCell<Kernel>>;

/// One reference to an open file description; closes it when dropped.
pub struct SimFd {
    kernel: KernelRef,
    ofd: OfdId,
}

impl fmt::Debug for SimFd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SimFd(ofd {})", self.ofd)
    }
}

impl SimFd {
    /// Which description this references.
    pub fn ofd(&self) -> OfdId {
        self.ofd
    }

    /// Another reference to the same description (`dup`, or a descriptor passed over a socket).
    pub fn duplicate(&self) -> SimFd {
        self.kernel.borrow_mut().reference(self.ofd);
        SimFd {
            kernel: self.kernel.clone(),
            ofd: self.ofd,
        }
    }
}

impl Drop for SimFd {
    fn drop(&mut self) {
        // A SimFd is never dropped inside a kernel call, so the kernel is free here; failing
        // loudly beats silently leaking a reference (and with it a lock).
        self.kernel
            .try_borrow_mut()
            .expect("a SimFd was dropped while the kernel was borrowed")
            .close(self.ofd);
    }
}

/// A handle on a process that pid reuse cannot fool (a pidfd).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimProc {
    /// Pid.
    pub pid: u32,
    /// Start time.
    pub start_time: u64,
}

impl Kernel {
    /// A new machine, behind a shared handle.
    pub fn new_ref() -> KernelRef {
        Rc::new(RefCell::new(Kernel {
            next_pid: 100,
            next_start_time: 1,
            clock: 1_700_000_000,
            ..Default::default()
        }))
    }

    fn reference(&mut self, ofd: OfdId) {
        self.ofds
            .get_mut(&ofd)
            .expect("a SimFd references a live description")
            .references += 1;
    }

    fn close(&mut self, ofd: OfdId) {
        let entry = self
            .ofds
            .get_mut(&ofd)
            .expect("a SimFd references a live description");
        entry.references -= 1;
        if entry.references == 0 {
            self.unlock(ofd);
            self.ofds.remove(&ofd);
        }
    }

    /// Opens `file`: a new description with one reference.
    pub fn open(kernel: &KernelRef, file: FileId) -> SimFd {
        let mut k = kernel.borrow_mut();
        k.next_ofd += 1;
        let ofd = k.next_ofd;
        k.ofds.insert(
            ofd,
            Ofd {
                file,
                references: 1,
                locked: BTreeMap::new(),
            },
        );
        SimFd {
            kernel: kernel.clone(),
            ofd,
        }
    }

    /// `F_OFD_SETLK`: a description never conflicts with itself and re-locking replaces the kind.
    pub fn try_lock(&mut self, ofd: OfdId, kind: LockKind, byte: u64) -> bool {
        let file = self
            .ofds
            .get(&ofd)
            .expect("locking a live description")
            .file;
        let holders = self.locks.entry((file, byte)).or_default();
        let conflict = holders.iter().any(|(other, theirs)| {
            *other != ofd && (kind == LockKind::Exclusive || *theirs == LockKind::Exclusive)
        });
        if conflict {
            if holders.is_empty() {
                self.locks.remove(&(file, byte));
            }
            return false;
        }
        holders.retain(|(other, _)| *other != ofd);
        holders.push((ofd, kind));
        if let Some(entry) = self.ofds.get_mut(&ofd) {
            entry.locked.insert(byte, kind);
        }
        true
    }

    /// Drops every lock of the description (all its references lose them).
    pub fn unlock(&mut self, ofd: OfdId) {
        let Some(entry) = self.ofds.get_mut(&ofd) else {
            return;
        };
        let file = entry.file;
        for byte in std::mem::take(&mut entry.locked).into_keys() {
            if let Some(holders) = self.locks.get_mut(&(file, byte)) {
                holders.retain(|(other, _)| *other != ofd);
                if holders.is_empty() {
                    self.locks.remove(&(file, byte));
                }
            }
        }
    }

    /// `F_OFD_GETLK` for a write lock: another description's lock on the byte.
    pub fn probe(&self, ofd: OfdId, byte: u64) -> bool {
        let Some(entry) = self.ofds.get(&ofd) else {
            return false;
        };
        self.locks
            .get(&(entry.file, byte))
            .is_some_and(|holders| holders.iter().any(|(other, _)| *other != ofd))
    }

    /// The lock description `ofd` holds on `byte`, if any.
    pub fn lock_of(&self, ofd: OfdId, byte: u64) -> Option<LockKind> {
        self.ofds
            .get(&ofd)
            .and_then(|e| e.locked.get(&byte).copied())
    }

    /// The file a description is open on.
    pub fn file_of(&self, ofd: OfdId) -> Option<FileId> {
        self.ofds.get(&ofd).map(|e| e.file)
    }

    /// The descriptions holding a lock on `byte` of `file`, and how.
    pub fn holders_of(&self, file: FileId, byte: u64) -> &[(OfdId, LockKind)] {
        self.locks.get(&(file, byte)).map_or(&[], |v| v.as_slice())
    }

    /// Every lock in the machine: `(file, byte) -> [(description, kind)]`, sorted.
    pub fn lock_snapshot(&self) -> LockSnapshot {
        self.locks
            .iter()
            .map(|(k, v)| {
                let mut v = v.clone();
                v.sort_by_key(|(o, _)| *o);
                (*k, v)
            })
            .collect()
    }

    /// Starts a process, reusing a dead process's pid when one is free (as a busy host does).
    pub fn spawn(&mut self, ppid: u32) -> Process {
        let pid = if self.free_pids.is_empty() {
            self.next_pid += 1;
            self.next_pid
        } else {
            // Oldest free pid first, like the kernel's cyclic allocator once it wrapped.
            self.free_pids.remove(0)
        };
        self.next_start_time += 1;
        let process = Process {
            pid,
            start_time: self.next_start_time,
            ppid,
        };
        self.live.insert(pid, process);
        process
    }

    /// Ends a process (its descriptors are closed by whoever models its descriptor table).
    pub fn exit(&mut self, pid: u32, start_time: u64) -> bool {
        match self.live.get(&pid) {
            Some(p) if p.start_time == start_time => {
                self.live.remove(&pid);
                self.free_pids.push(pid);
                // Orphans are reparented to init, so a later process with this pid is never
                // their parent.
                for child in self.live.values_mut() {
                    if child.ppid == pid {
                        child.ppid = 1;
                    }
                }
                true
            }
            _ => false,
        }
    }

    /// Whether that very process (pid and start time) still runs.
    pub fn is_alive(&self, pid: u32, start_time: u64) -> bool {
        self.live
            .get(&pid)
            .is_some_and(|p| p.start_time == start_time)
    }

    /// The live process with `pid` (what `/proc/<pid>` shows).
    pub fn process(&self, pid: u32) -> Option<Process> {
        self.live.get(&pid).copied()
    }

    /// Advances the clock.
    pub fn tick(&mut self) {
        self.clock += 1;
    }
}

/// The core's host over the simulated kernel.
#[derive(Debug, Clone)]
pub struct SimHost {
    /// The machine.
    pub kernel: KernelRef,
}

impl Host for SimHost {
    type Desc = SimFd;
    type Proc = SimProc;

    fn try_lock(&mut self, desc: &SimFd, kind: LockKind, byte: u64) -> std::io::Result<bool> {
        Ok(self.kernel.borrow_mut().try_lock(desc.ofd, kind, byte))
    }

    fn unlock(&mut self, desc: &SimFd) {
        self.kernel.borrow_mut().unlock(desc.ofd);
    }

    fn probe(&mut self, desc: &SimFd, byte: u64) -> Option<Conflict> {
        self.kernel
            .borrow()
            .probe(desc.ofd, byte)
            .then_some(Conflict { posix_pid: None })
    }

    fn duplicate(&mut self, desc: &SimFd) -> std::io::Result<SimFd> {
        Ok(desc.duplicate())
    }

    fn has_exited(&mut self, process: &SimProc) -> bool {
        !self
            .kernel
            .borrow()
            .is_alive(process.pid, process.start_time)
    }

    fn now(&mut self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.kernel.borrow().clock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ofd_locks_follow_linux() {
        let k = Kernel::new_ref();
        let a = Kernel::open(&k, 1);
        let b = Kernel::open(&k, 1);
        let mut kk = k.borrow_mut();
        assert!(kk.try_lock(a.ofd(), LockKind::Shared, 0));
        assert!(kk.try_lock(b.ofd(), LockKind::Shared, 0));
        assert!(
            !kk.try_lock(b.ofd(), LockKind::Exclusive, 0),
            "a holds shared"
        );
        kk.unlock(a.ofd());
        assert!(
            kk.try_lock(b.ofd(), LockKind::Exclusive, 0),
            "upgrade in place"
        );
        assert!(!kk.try_lock(a.ofd(), LockKind::Shared, 0));
        assert!(
            kk.try_lock(b.ofd(), LockKind::Shared, 0),
            "downgrade in place"
        );
        drop(kk);
        let b2 = b.duplicate();
        drop(b);
        assert_eq!(k.borrow().lock_of(b2.ofd(), 0), Some(LockKind::Shared));
        drop(b2);
        assert!(
            k.borrow_mut().try_lock(a.ofd(), LockKind::Exclusive, 0),
            "last close unlocks"
        );
    }

    #[test]
    fn pids_are_reused_with_new_start_times() {
        let k = Kernel::new_ref();
        let mut kk = k.borrow_mut();
        let p = kk.spawn(1);
        assert!(kk.exit(p.pid, p.start_time));
        let q = kk.spawn(1);
        assert_eq!(p.pid, q.pid);
        assert_ne!(p.start_time, q.start_time);
        assert!(!kk.is_alive(p.pid, p.start_time));
    }
}
