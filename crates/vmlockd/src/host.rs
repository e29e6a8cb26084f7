//! The lock core's host on Linux, and the work the daemon does *outside* the table lock before
//! and after it asks the core: opening lock targets, reading processes, naming foreign holders.
//!
//! [`LinuxHost`]'s calls answer at once (OFD lock calls on local descriptions, pidfd polls), so
//! the core may run under the table lock; everything here that can wait (an open on a hung
//! mount, a `/proc` scan) is a free function the daemon calls with the table unlocked.

use crate::config::Config;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::SystemTime;
use vmlock::{Error, Resource};
use vmlock_core::types::LockKey;
use vmlock_core::{Caller, Conflict, Host, LockKind, Opened, ProcInfo};
use vmlock_sys::pidfd::ProcessHandle;
use vmlock_sys::procfs;
use vmlock_sys::{disk, ofd};

/// Linux under the core: descriptions are `OwnedFd`s, processes pidfds.
#[derive(Debug, Default)]
pub struct LinuxHost;

fn ofd_kind(kind: LockKind) -> ofd::LockKind {
    match kind {
        LockKind::Shared => ofd::LockKind::Shared,
        LockKind::Exclusive => ofd::LockKind::Exclusive,
    }
}

impl Host for LinuxHost {
    type Desc = OwnedFd;
    type Proc = ProcessHandle;

    fn try_lock(&mut self, desc: &OwnedFd, kind: LockKind, byte: u64) -> std::io::Result<bool> {
        ofd::try_lock(desc.as_fd(), ofd_kind(kind), byte, 1)
    }

    fn unlock(&mut self, desc: &OwnedFd) {
        if let Err(e) = ofd::unlock(desc.as_fd(), 0, 0) {
            tracing::error!("unlocking a description: {e}");
        }
    }

    fn probe(&mut self, desc: &OwnedFd, byte: u64) -> Option<Conflict> {
        match ofd::probe(desc.as_fd(), ofd::LockKind::Exclusive, byte, 1) {
            Ok(Some(c)) => Some(Conflict {
                posix_pid: c.posix_pid,
            }),
            _ => None,
        }
    }

    fn duplicate(&mut self, desc: &OwnedFd) -> std::io::Result<OwnedFd> {
        desc.try_clone()
    }

    fn has_exited(&mut self, process: &ProcessHandle) -> bool {
        process.has_exited()
    }

    fn now(&mut self) -> SystemTime {
        SystemTime::now()
    }
}

/// The core's policy from the daemon's configuration.
pub fn policy(config: &Config) -> vmlock_core::Policy {
    vmlock_core::Policy {
        auto_disk_leases: config.auto_disk_leases,
        require_lease_for_disks: config.requires_lease(),
        indirect: config.file_lockspace_dir.is_some(),
        sabotage: vmlock_core::Sabotage::None,
    }
}

/// Where a resource's lock lives: file, byte, and whether to create the file.
fn target(config: &Config, resource: &Resource) -> Result<(PathBuf, u64, bool), Error> {
    if let Some(id) = resource.network_id() {
        // No file on this host: a lock file named by the disk's name stands for it.
        let dir = config
            .network_lockspace_dir
            .as_ref()
            .ok_or_else(|| Error::InvalidResource {
                resource: resource.label(),
                reason: "network disks need network_lockspace_dir".into(),
            })?;
        let digest = Sha256::digest(format!("network:{id}").as_bytes());
        let name: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        return Ok((dir.join(name), 0, true));
    }
    match resource {
        Resource::Lease(l) => Ok((l.path.clone(), l.offset, true)),
        Resource::Disk { path, .. } => match &config.file_lockspace_dir {
            None => Ok((path.clone(), 0, false)),
            Some(dir) => {
                // By inode, as direct mode: a hard link or bind mount reaches the same name.
                let (_, id) = disk::identify(path).map_err(|e| {
                    Error::io_for_resource(
                        resource.label(),
                        format!("resolving disk {}", path.display()),
                        &e,
                    )
                })?;
                Ok((dir.join(lockspace_name(&id)), 0, true))
            }
        },
    }
}

/// Opens the lock target of `resource` (and, in indirect mode, the image to probe QEMU's bytes
/// on). May block on a hung mount: call with the table unlocked.
pub fn open_target(config: &Config, resource: &Resource) -> Result<Opened<OwnedFd>, Error> {
    resource.validate()?;
    let (path, byte, create) = target(config, resource)?;
    // Only regular files and block devices, never blocking on a FIFO (vmlock_sys::disk).
    let opened = if create {
        disk::open_or_create(&path, 0o600)
    } else {
        disk::open(&path, resource.mode() == vmlock::DiskMode::Exclusive)
    };
    let (file, id) = opened.map_err(|e| {
        Error::io_for_resource(
            resource.label(),
            format!("opening {} to lock {}", path.display(), resource.label()),
            &e,
        )
    })?;
    let image = match (resource, config.file_lockspace_dir.is_some()) {
        (Resource::Disk { path, .. }, true) if resource.network_id().is_none() => {
            disk::open(path, false).ok().map(|(f, _)| OwnedFd::from(f))
        }
        _ => None,
    };
    Ok(Opened {
        resource: resource.clone(),
        key: LockKey {
            dev: id.dev,
            ino: id.ino,
            byte,
        },
        desc: OwnedFd::from(file),
        image,
    })
}

/// Whether the lock of a grant (`key`) is still reachable through its resource's path: false
/// when the file was removed or replaced, or its storage is gone. Walks the path (may wait on a
/// hung mount): call with the table unlocked. Indirect mode cannot name the lock file once the
/// disk itself is gone; the lock file is what matters there, so that case counts as reachable.
pub fn lease_intact(config: &Config, resource: &Resource, key: LockKey) -> bool {
    let path = match target(config, resource) {
        Ok((path, _, _)) => path,
        Err(_) => return config.file_lockspace_dir.is_some(),
    };
    std::fs::metadata(path).is_ok_and(|m| m.dev() == key.dev && m.ino() == key.ino)
}

/// A process as the core needs it: pid, start time, parent, and a pidfd. Reads `/proc`.
pub fn process(pid: u32, expected_start: Option<u64>) -> Result<ProcInfo<ProcessHandle>, Error> {
    let handle = ProcessHandle::open(pid, expected_start)
        .map_err(|e| Error::io(format!("process {pid}"), &e))?;
    Ok(ProcInfo {
        pid,
        start_time: handle.start_time,
        ppid: handle.ppid,
        parent_of_caller: false,
        handle,
    })
}

/// [`process`], and whether it is `caller`'s parent. The caller's parent is read while the
/// process's pidfd is open and after its start time was checked, so a pid reused meanwhile is
/// not taken for it (a process's parent changes only when that parent dies).
pub fn process_for(pid: u32, caller: Caller) -> Result<ProcInfo<ProcessHandle>, Error> {
    let mut info = process(pid, None)?;
    info.parent_of_caller = vmlock::process::stat(caller.pid).is_some_and(|s| s.ppid == pid)
        && !info.handle.has_exited();
    Ok(info)
}

/// Names the process holding a lock on `key` (scans `/proc`; call with the table unlocked).
pub fn name_holder(key: LockKey) -> Option<(u32, String)> {
    procfs::lock_holders(key.dev, key.ino, key.byte, key.byte, std::process::id())
        .into_iter()
        .next()
        .map(|h| (h.pid, vmlock::process::command(h.pid)))
}

/// Re-checks a description a holder handed back after a restart: it is the locked file and
/// still holds its lock (re-taking a lock a description holds is a no-op; failing means it was
/// lost). Call with the table unlocked (`fstat` may wait on a hung mount).
pub fn recheck_kept(lock: &vmlock_core::types::HeldLock, fd: &OwnedFd) -> Result<(), Error> {
    let meta = File::from(fd.try_clone().map_err(|e| Error::io("dup", &e))?)
        .metadata()
        .map_err(|e| {
            Error::io(
                format!("checking the kept description of {}", lock.resource.label()),
                &e,
            )
        })?;
    if meta.dev() != lock.key.dev || meta.ino() != lock.key.ino {
        return Err(Error::InvalidResource {
            resource: lock.resource.label(),
            reason: "the kept descriptor is not the locked file".into(),
        });
    }
    let kind = match lock.resource.mode() {
        vmlock::DiskMode::Shared => ofd::LockKind::Shared,
        _ => ofd::LockKind::Exclusive,
    };
    if !ofd::try_lock(fd.as_fd(), kind, lock.key.byte, 1)
        .map_err(|e| Error::io("re-checking a kept lock", &e))?
    {
        return Err(Error::InvalidResource {
            resource: lock.resource.label(),
            reason: "the kept lock was lost while the daemon was down".into(),
        });
    }
    Ok(())
}

/// The indirect-mode lock file name of a disk: lowercase hex SHA-256 of `"DEV:INO"` (decimal
/// `st_dev` and `st_ino`), or of `"block:RDEV"` for a block device (decimal `st_rdev`, shared by
/// every device node of it), so every alias of one disk names one lock file.
pub fn lockspace_name(id: &disk::Identity) -> String {
    let text = match id.block_device {
        Some(rdev) => format!("block:{rdev}"),
        None => format!("{}:{}", id.dev, id.ino),
    };
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockspace_names_are_sha256_hex() {
        let id = |dev, ino, block_device| disk::Identity {
            dev,
            ino,
            block_device,
        };
        assert_eq!(lockspace_name(&id(2049, 131, None)).len(), 64);
        assert_ne!(
            lockspace_name(&id(2049, 131, None)),
            lockspace_name(&id(2049, 132, None))
        );
        assert_ne!(
            lockspace_name(&id(1, 23, None)),
            lockspace_name(&id(12, 3, None))
        );
        // Two nodes of one block device share a name.
        assert_eq!(
            lockspace_name(&id(5, 100, Some(2048))),
            lockspace_name(&id(5, 200, Some(2048)))
        );
    }
}
