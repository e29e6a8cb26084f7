//! What the core, the wire protocol and the state files share: VM identities, lock keys, grants.

use serde::{Deserialize, Serialize};
use std::time::SystemTime;
use vmlock::{LockFailureAction, Resource};

/// A VM as the daemon knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmIdentity {
    /// uuid, canonical text.
    pub uuid: String,
    /// name.
    pub name: String,
    /// domain id.
    pub id: u32,
    /// guest pid.
    pub pid: u32,
}

/// One held resource as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldResource {
    /// What is held.
    pub resource: Resource,
    /// Lock version (grows when another owner takes it).
    pub version: u64,
    /// When it was granted.
    pub since: SystemTime,
    /// False while the daemon waits for the holder to hand the description back after a restart.
    pub confirmed: bool,
    /// The lease was lost under the running guest (its lock file removed or replaced, or its
    /// storage gone); the VM's lock-failure action was taken.
    #[serde(default)]
    pub lost: bool,
}

/// One VM in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerStatus {
    /// Who.
    pub vm: VmIdentity,
    /// Pid of the process keeping its lock descriptions, when connected.
    pub holder_pid: Option<u32>,
    /// What it holds.
    pub resources: Vec<HeldResource>,
}

/// A descriptor handed to or from a holder, and what it locks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLock {
    /// The resource.
    pub resource: Resource,
    /// `(device, inode, byte)` of the lock.
    pub key: LockKey,
}

/// Identifies one lock: a byte of one inode. Two paths to one file give one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LockKey {
    /// `st_dev` of the locked file.
    pub dev: u64,
    /// `st_ino` of the locked file.
    pub ino: u64,
    /// The byte locked.
    pub byte: u64,
}

/// Options of an acquire.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcquireFlags {
    /// Register only, take nothing.
    pub register_only: bool,
    /// Restrict this connection afterwards.
    pub restrict: bool,
    /// What to do to the guest when a lease is lost.
    pub on_lock_failure: LockFailureAction,
    /// Also hold QEMU's "writer" lock bytes on exclusive disks, so that a QEMU or qemu-img started
    /// outside vmlock refuses to open them (for guests that are not QEMU).
    #[serde(default)]
    pub hold_qemu_bytes: bool,
    /// The guest's QMP socket, for the `pause` action.
    #[serde(default)]
    pub qmp_socket: Option<std::path::PathBuf>,
    /// The requester is the VM's holder process: hand the new descriptions back in the reply
    /// (a `Kept` reply) instead of pushing them over the holder connection and waiting for its
    /// ack. Ignored for any other requester.
    #[serde(default)]
    pub reply_with_fds: bool,
    /// The VM's supervisor carries the lock-failure action out itself (libvirt's holder, through
    /// libvirt): the daemon asks it over its control socket, and acts itself only if that fails.
    #[serde(default)]
    pub supervisor_acts: bool,
}
