//! The lock core's host on Linux, and the work the daemon does *outside* the table lock before
//! and after it asks the core: opening lock targets, reading processes, naming foreign holders.
//!
//! [`LinuxHost`]'s calls answer at once (OFD lock calls on local descriptions, pidfd polls), so
//! the core may run under the table lock; everything here that can wait (an open on a hung
//! mount, a `/proc` scan) is a free function the daemon calls with the table unlocked.

use crate::config::Config;
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use vmlock::{Error, Resource};
use vmlock_core::types::LockKey;
use vmlock_core::{Conflict, Host, LockKind, Opened, ProcInfo};
use vmlock_sys::ofd;
use vmlock_sys::pidfd::ProcessHandle;
use vmlock_sys::procfs;

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
    match resource {
        Resource::Lease(l) => Ok((l.path.clone(), l.offset, true)),
        Resource::Disk { path, .. } => match &config.file_lockspace_dir {
            None => Ok((path.clone(), 0, false)),
            Some(dir) => {
                let canonical = std::fs::canonicalize(path)
                    .map_err(|e| Error::io(format!("resolving disk {}", path.display()), &e))?;
                Ok((dir.join(lockspace_name(&canonical)), 0, true))
            }
        },
    }
}

/// Opens the lock target of `resource` (and, in indirect mode, the image to probe QEMU's bytes
/// on). May block on a hung mount: call with the table unlocked.
pub fn open_target(config: &Config, resource: &Resource) -> Result<Opened<OwnedFd>, Error> {
    resource.validate()?;
    let (path, byte, create) = target(config, resource)?;
    let mut options = OpenOptions::new();
    options.read(true).custom_flags(nix::libc::O_NOCTTY);
    if resource.mode() == vmlock::DiskMode::Exclusive {
        options.write(true);
    }
    if create {
        options.write(true).create(true).mode(0o600);
    }
    let file = options.open(&path).map_err(|e| {
        Error::io(
            format!("opening {} to lock {}", path.display(), resource.label()),
            &e,
        )
    })?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("stat {}", path.display()), &e))?;
    let image = match (resource, config.file_lockspace_dir.is_some()) {
        (Resource::Disk { path, .. }, true) => File::open(path).ok().map(OwnedFd::from),
        _ => None,
    };
    Ok(Opened {
        resource: resource.clone(),
        key: LockKey {
            dev: meta.dev(),
            ino: meta.ino(),
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
    let ppid = vmlock::process::stat(pid).map(|s| s.ppid).ok_or_else(|| {
        Error::io(
            format!("process {pid}"),
            &std::io::Error::from_raw_os_error(nix::libc::ESRCH),
        )
    })?;
    Ok(ProcInfo {
        pid,
        start_time: handle.start_time,
        ppid,
        handle,
    })
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

/// Indirect mode's lock-file name for a disk: SHA-256 of its canonical path, in hex.
pub fn lockspace_name(canonical: &Path) -> String {
    let digest = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockspace_names_are_sha256_hex() {
        let name = lockspace_name(Path::new("/var/lib/images/a.qcow2"));
        assert_eq!(name.len(), 64);
        assert!(name.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(name, lockspace_name(Path::new("/var/lib/images/b.qcow2")));
    }
}
