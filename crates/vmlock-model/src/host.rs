//! A small deterministic host under the real core: open file descriptions with reference counts,
//! OFD locks on byte 0 of each disk, processes that exit. Every value is plain data, so a whole
//! world can be cloned, hashed and compared.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;
use vmlock_core::{Conflict, Host, LockKind};

/// One reference to an open file description (`ofd`) of disk `disk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fd {
    /// The description.
    pub ofd: u32,
    /// The disk it is open on.
    pub disk: u8,
}

/// The kernel of the model.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ModelHost {
    /// References per open description, and its disk.
    refs: BTreeMap<u32, (u8, u32)>,
    /// OFD locks on byte 0 of each disk: `(description, kind)`.
    locks: BTreeMap<u8, Vec<(u32, LockKind)>>,
    /// Pids of the processes that have exited (a pid is never reused in the model).
    exited: BTreeSet<u32>,
}

impl ModelHost {
    /// Opens disk `disk`: a new description (the smallest unused number, so that equal worlds
    /// number their descriptions alike) with one reference.
    pub fn open(&mut self, disk: u8) -> Fd {
        let ofd = (1..)
            .find(|n| !self.refs.contains_key(n))
            .unwrap_or(u32::MAX);
        self.refs.insert(ofd, (disk, 1));
        Fd { ofd, disk }
    }

    /// Closes one reference; the last one drops the description's locks.
    pub fn close(&mut self, fd: Fd) {
        let last = match self.refs.get_mut(&fd.ofd) {
            Some((_, n)) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => true,
            None => false,
        };
        if last {
            self.refs.remove(&fd.ofd);
            self.drop_locks(fd.ofd);
        }
    }

    /// A daemon crash: every description keeps only the references in `survivors` (those the
    /// supervisors keep); the daemon's go, and with the last one a description's locks.
    pub fn keep_only(&mut self, survivors: &BTreeMap<u32, u32>) {
        let gone: Vec<u32> = self
            .refs
            .keys()
            .filter(|o| !survivors.contains_key(o))
            .copied()
            .collect();
        for ofd in gone {
            self.refs.remove(&ofd);
            self.drop_locks(ofd);
        }
        for (ofd, (_, n)) in self.refs.iter_mut() {
            if let Some(k) = survivors.get(ofd) {
                *n = *k;
            }
        }
    }

    fn drop_locks(&mut self, ofd: u32) {
        for holders in self.locks.values_mut() {
            holders.retain(|(o, _)| *o != ofd);
        }
        self.locks.retain(|_, v| !v.is_empty());
    }

    /// The descriptions holding a lock on `disk`, with its kind.
    pub fn lockers(&self, disk: u8) -> &[(u32, LockKind)] {
        self.locks.get(&disk).map_or(&[], Vec::as_slice)
    }

    /// Every locked disk and its holders.
    pub fn all_locks(&self) -> impl Iterator<Item = (u8, &[(u32, LockKind)])> {
        self.locks.iter().map(|(d, v)| (*d, v.as_slice()))
    }

    /// Process `pid` exits.
    pub fn exit(&mut self, pid: u32) {
        self.exited.insert(pid);
    }

    /// Whether process `pid` runs.
    pub fn alive(&self, pid: u32) -> bool {
        !self.exited.contains(&pid)
    }
}

impl Host for ModelHost {
    type Desc = Fd;
    type Proc = u32;

    fn try_lock(&mut self, desc: &Fd, kind: LockKind, byte: u64) -> std::io::Result<bool> {
        if byte != 0 {
            return Ok(true); // only byte 0 is modelled (no QEMU bytes are asked for)
        }
        let holders = self.locks.entry(desc.disk).or_default();
        if holders.iter().any(|(o, k)| {
            *o != desc.ofd && (kind == LockKind::Exclusive || *k == LockKind::Exclusive)
        }) {
            return Ok(false);
        }
        holders.retain(|(o, _)| *o != desc.ofd);
        holders.push((desc.ofd, kind));
        holders.sort_by_key(|(o, _)| *o);
        Ok(true)
    }

    fn unlock(&mut self, desc: &Fd) {
        self.drop_locks(desc.ofd);
    }

    fn probe(&mut self, _desc: &Fd, _byte: u64) -> Option<Conflict> {
        None // no process outside vmlock locks the disks in the model
    }

    fn duplicate(&mut self, desc: &Fd) -> std::io::Result<Fd> {
        if let Some((_, n)) = self.refs.get_mut(&desc.ofd) {
            *n += 1;
        }
        Ok(*desc)
    }

    fn has_exited(&mut self, process: &u32) -> bool {
        self.exited.contains(process)
    }

    fn now(&mut self) -> SystemTime {
        SystemTime::UNIX_EPOCH
    }
}
