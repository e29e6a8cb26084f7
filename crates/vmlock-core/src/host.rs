//! What the core asks of the machine it runs on: the kernel's lock calls on descriptions it was
//! handed, and whether a process it watches has exited. Every call here answers at once (no
//! path lookup, no open, no `/proc` scan, no socket I/O): those happen outside the core, before or
//! after it runs, so the core may run under the daemon's table lock.

use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::time::SystemTime;

/// The two kinds of byte-range lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LockKind {
    /// Many holders (a read lock).
    Shared,
    /// One holder (a write lock).
    Exclusive,
}

/// A lock found on a byte by a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict {
    /// The owning process, for a classic POSIX lock (as virtlockd takes); `None` for OFD locks.
    pub posix_pid: Option<u32>,
}

/// The machine under the core: Linux in the daemon, a simulated kernel in the simulator.
pub trait Host {
    /// An open file description the daemon keeps (an `OwnedFd` on Linux).
    type Desc: Debug;
    /// A handle on a process that cannot be fooled by pid reuse (a pidfd on Linux).
    type Proc: Debug;

    /// Takes a lock on one byte of `desc` without waiting; `Ok(false)` when another description
    /// holds a conflicting lock. Taking a lock a description already holds succeeds.
    fn try_lock(&mut self, desc: &Self::Desc, kind: LockKind, byte: u64) -> std::io::Result<bool>;
    /// Drops every lock `desc` holds (other copies of the description lose them too).
    fn unlock(&mut self, desc: &Self::Desc);
    /// A lock on `byte` that conflicts with an exclusive one, held by another description.
    fn probe(&mut self, desc: &Self::Desc, byte: u64) -> Option<Conflict>;
    /// A second reference to the same description (`dup`), to hand to a holder.
    fn duplicate(&mut self, desc: &Self::Desc) -> std::io::Result<Self::Desc>;
    /// Whether the process has exited.
    fn has_exited(&mut self, process: &Self::Proc) -> bool;
    /// The wall clock, for `since` stamps.
    fn now(&mut self) -> SystemTime;
}

/// A process as the daemon found it before asking the core (read outside the table lock).
#[derive(Debug)]
pub struct ProcInfo<P> {
    /// Its pid.
    pub pid: u32,
    /// Its start time (clock ticks after boot), which tells it from a later process with its pid.
    pub start_time: u64,
    /// Its parent's pid.
    pub ppid: u32,
    /// It is the parent of the process asking (read from the caller's `/proc` entry while this
    /// process's handle was held): a holder started by its guest-to-be before that execs, as
    /// libvirt's plugin starts one from QEMU's pre-exec child.
    pub parent_of_caller: bool,
    /// A handle to watch it by.
    pub handle: P,
}

impl<P> ProcInfo<P> {
    /// Whether holder `caller` may name this process as its guest: it is the holder itself, the
    /// holder's child (a supervisor started it) or the holder's parent (it started the holder).
    /// Any other process is someone else's, and naming it would let a client aim the daemon's
    /// lock-failure kill at a stranger.
    pub fn guarded_by(&self, caller: Caller) -> bool {
        self.pid == caller.pid || self.ppid == caller.pid || self.parent_of_caller
    }
}

/// Who sent a request: a process, by pid and start time (a later process given the same pid has
/// another start time, so it is someone else).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Caller {
    /// Its pid (from `SO_PEERCRED`).
    pub pid: u32,
    /// Its start time (clock ticks after boot); 0 = unknown (a record from before start times
    /// were kept), which matches any process with that pid.
    pub start_time: u64,
}

impl Caller {
    /// Whether `other` is this very process.
    pub fn is(&self, other: Caller) -> bool {
        self.pid == other.pid && (self.start_time == 0 || self.start_time == other.start_time)
    }
}
