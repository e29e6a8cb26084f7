//! The lock table: which VM holds which lock, and the rules for granting, releasing and
//! recovering them.
//!
//! The kernel's OFD locks are the truth about exclusion; this table names holders, keeps versions,
//! and maps each grant to the daemon's copy of its open file description. Each grant's description
//! is also kept by the VM's *holder* (its supervisor process), so the lock survives the daemon.

use crate::config::Config;
use crate::holder::HolderLink;
use crate::proto::{AcquireFlags, HeldLock, HeldResource, LockKey, OwnerStatus, VmIdentity};
use crate::sys::disk;
use crate::sys::ofd::{self, LockKind};
use crate::sys::pidfd::ProcessHandle;
use crate::sys::procfs;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;
use vmlock::{DiskMode, Error, ForeignHolder, Holder, Resource, ResourceFailure};

/// One granted lock.
#[derive(Debug)]
struct Grant {
    resource: Resource,
    /// The daemon's copy of the description; `None` after a restart until the holder hands it back.
    fd: Option<OwnedFd>,
    since: SystemTime,
    version: u64,
    /// The lease was found lost and the VM's action taken.
    lost: bool,
}

/// Descriptions handed back in a reply, with what each locks.
pub type KeptLocks = Vec<(HeldLock, OwnedFd)>;

/// What to do about a VM whose lease was lost (carried out by the server, outside the table lock).
#[derive(Debug)]
pub struct LostLease {
    /// The VM.
    pub vm: VmIdentity,
    /// The resources lost.
    pub resources: Vec<String>,
    /// The VM's action and QMP socket.
    pub flags: AcquireFlags,
    /// A handle on the guest process.
    pub process: ProcessHandle,
}
#[derive(Debug)]
struct Owner {
    vm: VmIdentity,
    /// The process keeping the descriptions (the supervisor).
    holder_pid: u32,
    process: ProcessHandle,
    holder: Option<Arc<HolderLink>>,
    flags: AcquireFlags,
    /// Whether `flags` came from the VM's first acquire (hotplug acquires do not change them).
    flags_set: bool,
    grants: BTreeMap<LockKey, Grant>,
    /// A migration prepared on this (source) VM, and its destination once it registered.
    migration: Option<Migration>,
}

/// An outgoing migration: the source keeps owning everything until it completes.
#[derive(Debug, Default)]
struct Migration {
    incoming: Option<Incoming>,
}

/// The destination side of a migration on this host.
#[derive(Debug)]
struct Incoming {
    link: Arc<HolderLink>,
    holder_pid: u32,
    process: ProcessHandle,
    /// The destination's holder keeps copies of every description.
    taken: bool,
}

impl Owner {
    fn holder_identity(&self, host: &str) -> Holder {
        Holder {
            name: self.vm.name.clone(),
            uuid: self.vm.uuid.clone(),
            pid: Some(self.vm.pid),
            host: host.to_owned(),
        }
    }
}

/// What survives a daemon restart (see [`crate::store`]).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Persisted {
    pub(crate) owners: Vec<PersistedOwner>,
    versions: Vec<(LockKey, String, u64)>,
}

impl Persisted {
    /// Keeps the highest version seen per lock, so versions never go back across restarts.
    pub(crate) fn note_versions(&mut self, owner: &PersistedOwner) {
        for (key, _, _, version) in &owner.grants {
            match self.versions.iter_mut().find(|(k, _, _)| k == key) {
                Some(v) if v.2 >= *version => {}
                Some(v) => *v = (*key, owner.vm.uuid.clone(), *version),
                None => self.versions.push((*key, owner.vm.uuid.clone(), *version)),
            }
        }
    }
}

/// One VM as persisted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PersistedOwner {
    pub(crate) vm: VmIdentity,
    holder_pid: u32,
    start_time: u64,
    flags: AcquireFlags,
    grants: Vec<(LockKey, Resource, SystemTime, u64)>,
}

/// The table.
#[derive(Debug)]
pub struct Table {
    config: Config,
    host: String,
    owners: HashMap<String, Owner>,
    /// Which owners hold each key (several for shared locks).
    index: HashMap<LockKey, Vec<String>>,
    /// Last owner and version per key: the version grows when another owner takes the key.
    versions: HashMap<LockKey, (String, u64)>,
}

/// A lock opened and taken but not yet committed to the table.
struct Pending {
    key: LockKey,
    resource: Resource,
    file: File,
}

impl Table {
    /// An empty table.
    pub fn new(config: Config, host: String) -> Self {
        Table {
            config,
            host,
            owners: HashMap::new(),
            index: HashMap::new(),
            versions: HashMap::new(),
        }
    }

    /// The host name used in holder names.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Registers `link` as the holder of `vm`, adopting descriptions it kept across a restart.
    pub fn hold(
        &mut self,
        vm: VmIdentity,
        adopt: Vec<(HeldLock, OwnedFd)>,
        link: Arc<HolderLink>,
        incoming: bool,
    ) -> Result<(), Error> {
        vmlock::params::parse_uuid(&vm.uuid)?;
        vmlock::params::validate_name(&vm.name)?;
        if incoming {
            return self.hold_incoming(vm, link);
        }
        if let Some(existing) = self.owners.get_mut(&vm.uuid) {
            // After a restart only the process that kept the descriptions may take them back.
            if existing.holder.as_ref().is_some_and(|h| h.is_connected())
                || existing.holder_pid != link.pid()
            {
                return Err(Error::OwnerExists {
                    uuid: vm.uuid.clone(),
                    holder: existing.holder_identity(&self.host),
                });
            }
            existing.holder = Some(link);
        } else {
            let process = ProcessHandle::open(vm.pid, None).map_err(|e| {
                Error::io(
                    format!("guest process {} of VM \"{}\"", vm.pid, vm.name),
                    &e,
                )
            })?;
            self.owners.insert(
                vm.uuid.clone(),
                Owner {
                    vm: vm.clone(),
                    holder_pid: link.pid(),
                    process,
                    holder: Some(link),
                    flags: AcquireFlags::default(),
                    flags_set: false,
                    grants: BTreeMap::new(),
                    migration: None,
                },
            );
        }
        let mut failures = Vec::new();
        for (lock, fd) in adopt {
            if let Err(e) = self.adopt(&vm.uuid, lock.clone(), fd) {
                failures.push(ResourceFailure {
                    resource: lock.resource.label(),
                    error: Box::new(e),
                });
            }
        }
        // Grants the holder did not hand back were lost with it: forget them.
        if let Some(owner) = self.owners.get_mut(&vm.uuid) {
            let lost: Vec<LockKey> = owner
                .grants
                .iter()
                .filter(|(_, g)| g.fd.is_none())
                .map(|(k, _)| *k)
                .collect();
            for key in lost {
                owner.grants.remove(&key);
                unindex(&mut self.index, key, &vm.uuid);
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(Error::PartialRelease { failures })
        }
    }

    fn adopt(&mut self, uuid: &str, lock: HeldLock, fd: OwnedFd) -> Result<(), Error> {
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
        // Re-taking a lock on the description that holds it is a no-op; failing means it was lost.
        let kind = kind_of(&lock.resource);
        if !ofd::try_lock(fd.as_fd(), kind, lock.key.byte, 1)
            .map_err(|e| Error::io("re-checking a kept lock", &e))?
        {
            return Err(Error::InvalidResource {
                resource: lock.resource.label(),
                reason: "the kept lock was lost while the daemon was down".into(),
            });
        }
        let owner = self
            .owners
            .get_mut(uuid)
            .ok_or_else(|| unknown_owner(uuid))?;
        let grant = owner.grants.entry(lock.key).or_insert_with(|| Grant {
            resource: lock.resource.clone(),
            fd: None,
            since: SystemTime::now(),
            version: 0,
            lost: false,
        });
        grant.fd = Some(fd);
        let holders = self.index.entry(lock.key).or_default();
        if !holders.iter().any(|u| u == uuid) {
            holders.push(uuid.to_owned());
        }
        Ok(())
    }

    /// The resolved lock target of a resource: file, byte, and whether to create it.
    fn target(&self, resource: &Resource) -> Result<(PathBuf, u64, bool), Error> {
        match resource {
            Resource::Lease(l) => Ok((l.path.clone(), l.offset, true)),
            Resource::Disk { path, .. } => match &self.config.file_lockspace_dir {
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

    fn open_target(&self, resource: &Resource) -> Result<(File, LockKey), Error> {
        let (path, byte, create) = self.target(resource)?;
        let opened = if create {
            disk::open_or_create(&path, 0o600)
        } else {
            disk::open(&path, kind_of(resource) == LockKind::Exclusive)
        };
        let (file, id) = opened.map_err(|e| {
            Error::io_for_resource(
                resource.label(),
                format!("opening {} to lock {}", path.display(), resource.label()),
                &e,
            )
        })?;
        Ok((
            file,
            LockKey {
                dev: id.dev,
                ino: id.ino,
                byte,
            },
        ))
    }

    /// Takes `resources` for VM `uuid`, all or nothing, and hands the descriptions to its holder.
    /// With `reply_with_fds` from the holder's own process (`caller_pid`), the descriptions are
    /// returned for the reply instead of being pushed to the holder.
    pub fn acquire(
        &mut self,
        uuid: &str,
        resources: &[Resource],
        flags: &AcquireFlags,
        caller_pid: u32,
    ) -> Result<(Vec<HeldResource>, KeptLocks), Error> {
        let holder = {
            let owner = self.owners.get(uuid).ok_or_else(|| unknown_owner(uuid))?;
            owner
                .holder
                .clone()
                .filter(|h| h.is_connected())
                .ok_or_else(|| Error::ServiceUnavailable {
                    reason: format!(
                        "the supervisor keeping the locks of VM \"{}\" is not connected",
                        owner.vm.name
                    ),
                })?
        };
        for r in resources {
            r.validate()?;
        }
        if let Some(owner) = self.owners.get_mut(uuid) {
            if !owner.flags_set {
                owner.flags = flags.clone();
                owner.flags_set = true;
            }
        }
        if flags.register_only {
            return Ok((Vec::new(), Vec::new()));
        }
        if self.config.requires_lease()
            && resources.iter().any(|r| {
                matches!(
                    r,
                    Resource::Disk {
                        mode: DiskMode::Exclusive,
                        ..
                    }
                )
            })
            && !resources.iter().any(|r| matches!(r, Resource::Lease(_)))
            && self.owners.get(uuid).is_some_and(|o| {
                !o.grants
                    .values()
                    .any(|g| matches!(g.resource, Resource::Lease(_)))
            })
        {
            return Err(Error::Config {
                source_name: "vmlockd configuration".into(),
                reason: "require_lease_for_disks is set and the VM has writable disks but no lease"
                    .into(),
            });
        }
        let auto_disks = self.config.auto_disk_leases;
        let wanted = resources
            .iter()
            .filter(|r| r.is_locked() && (auto_disks || matches!(r, Resource::Lease(_))));
        let mut pending: Vec<Pending> = Vec::new();
        for resource in wanted {
            let (file, key) = self.open_target(resource)?;
            if let Some(grant) = self.owners.get(uuid).and_then(|o| o.grants.get(&key)) {
                if kind_of(&grant.resource) == kind_of(resource) {
                    continue; // Same owner, same lock: idempotent.
                }
                return Err(Error::InvalidResource {
                    resource: resource.label(),
                    reason: format!(
                        "already held by this VM as {}; release it first",
                        grant.resource
                    ),
                });
            }
            if pending.iter().any(|p| p.key == key) {
                continue;
            }
            self.take(uuid, resource, &file, key)?;
            if flags.hold_qemu_bytes
                && key.byte == 0
                && matches!(
                    resource,
                    Resource::Disk {
                        mode: DiskMode::Exclusive,
                        ..
                    }
                )
            {
                for byte in QEMU_WRITER_BYTES {
                    // Shared locks, exactly as a read-write QEMU holds them; a failure closes
                    // `file` on return, which drops whatever it took (all or nothing).
                    if !ofd::try_lock(file.as_fd(), LockKind::Shared, byte, 1)
                        .map_err(|e| Error::io("locking QEMU's bytes", &e))?
                    {
                        return Err(Error::Busy {
                            resource: resource.label(),
                            holder: name_foreign_holder(&file, LockKey { byte, ..key }),
                        });
                    }
                }
            }
            pending.push(Pending {
                key,
                resource: resource.clone(),
                file,
            });
        }
        if pending.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let locks: Vec<HeldLock> = pending
            .iter()
            .map(|p| HeldLock {
                resource: p.resource.clone(),
                key: p.key,
            })
            .collect();
        let fds: Vec<OwnedFd> = pending.into_iter().map(|p| OwnedFd::from(p.file)).collect();
        let mut reply_fds = Vec::new();
        if flags.reply_with_fds && holder.pid() == caller_pid {
            // The holder's own process gets the copies in the reply; once the reply is sent they
            // are in its socket queue, which outlives a daemon crash.
            for (lock, fd) in locks.iter().zip(&fds) {
                let copy = fd
                    .try_clone()
                    .map_err(|e| Error::io("duplicating a lock description", &e))?;
                reply_fds.push((lock.clone(), copy));
            }
        } else {
            // Until the holder has its copies, a daemon crash would drop these locks: wait for
            // its ack. On failure the descriptions are closed here, which unlocks them (all or
            // nothing).
            holder.keep(&locks, &fds)?;
        }
        let now = SystemTime::now();
        let mut granted = Vec::new();
        for (lock, fd) in locks.into_iter().zip(fds) {
            let version = self.bump_version(lock.key, uuid);
            let owner = self
                .owners
                .get_mut(uuid)
                .ok_or_else(|| unknown_owner(uuid))?;
            owner.grants.insert(
                lock.key,
                Grant {
                    resource: lock.resource.clone(),
                    fd: Some(fd),
                    since: now,
                    version,
                    lost: false,
                },
            );
            self.index
                .entry(lock.key)
                .or_default()
                .push(uuid.to_owned());
            granted.push(HeldResource {
                resource: lock.resource,
                version,
                since: now,
                confirmed: true,
                lost: false,
            });
        }
        Ok((granted, reply_fds))
    }

    fn bump_version(&mut self, key: LockKey, uuid: &str) -> u64 {
        let entry = self
            .versions
            .entry(key)
            .or_insert_with(|| (uuid.to_owned(), 1));
        if entry.0 != uuid {
            entry.0 = uuid.to_owned();
            entry.1 += 1;
        }
        entry.1
    }

    /// Takes the kernel lock on `file`, clearing dead holders first; names the holder on conflict.
    fn take(
        &mut self,
        uuid: &str,
        resource: &Resource,
        file: &File,
        key: LockKey,
    ) -> Result<(), Error> {
        let kind = kind_of(resource);
        for _ in 0..2 {
            // The table first: a grant whose description is not back yet after a restart must
            // still exclude, and a holder that died is cleared now rather than when the watcher runs.
            let others: Vec<String> = self
                .index
                .get(&key)
                .map(|v| v.iter().filter(|u| *u != uuid).cloned().collect())
                .unwrap_or_default();
            let mut blocking = None;
            let mut cleared = false;
            for other in others {
                let Some(owner) = self.owners.get(&other) else {
                    continue;
                };
                if owner.process.has_exited()
                    || owner
                        .holder
                        .as_ref()
                        .is_some_and(|h| !h.is_connected() && h.is_gone())
                {
                    self.remove_owner(&other);
                    cleared = true;
                    continue;
                }
                let theirs = owner.grants.get(&key).map(|g| kind_of(&g.resource));
                if kind == LockKind::Exclusive || theirs == Some(LockKind::Exclusive) {
                    blocking = Some(owner.holder_identity(&self.host));
                }
            }
            if let Some(holder) = blocking {
                return Err(Error::Busy {
                    resource: resource.label(),
                    holder: ForeignHolder::Vm(holder),
                });
            }
            if ofd::try_lock(file.as_fd(), kind, key.byte, 1)
                .map_err(|e| Error::io(format!("locking {}", resource.label()), &e))?
            {
                if let Some(holder) = self.foreign_qemu_writer(resource, file) {
                    let _ = ofd::unlock(file.as_fd(), key.byte, 1);
                    return Err(Error::Busy {
                        resource: resource.label(),
                        holder,
                    });
                }
                return Ok(());
            }
            if !cleared {
                return Err(Error::Busy {
                    resource: resource.label(),
                    holder: name_foreign_holder(file, key),
                });
            }
        }
        Err(Error::Busy {
            resource: resource.label(),
            holder: name_foreign_holder(file, key),
        })
    }

    /// Releases `resources` of VM `uuid` (everything when `None`); every failure is reported.
    pub fn release(
        &mut self,
        uuid: &str,
        resources: Option<&[Resource]>,
    ) -> Result<Vec<HeldResource>, Error> {
        self.release_for(uuid, resources, None)
    }

    /// [`Table::release`]; when `caller_pid` is the holder's process, it drops its own copies and
    /// is not told to.
    pub fn release_for(
        &mut self,
        uuid: &str,
        resources: Option<&[Resource]>,
        caller_pid: Option<u32>,
    ) -> Result<Vec<HeldResource>, Error> {
        let owner = self
            .owners
            .get_mut(uuid)
            .ok_or_else(|| unknown_owner(uuid))?;
        let mut keys = Vec::new();
        let mut failures = Vec::new();
        match resources {
            None => keys.extend(owner.grants.keys().copied()),
            Some(list) => {
                for r in list.iter().filter(|r| r.is_locked()) {
                    let found = owner
                        .grants
                        .iter()
                        .find(|(_, g)| g.resource == *r || g.resource.path() == r.path())
                        .map(|(k, _)| *k);
                    match found {
                        Some(k) => keys.push(k),
                        None => failures.push(ResourceFailure {
                            resource: r.label(),
                            error: Box::new(Error::NotHeld {
                                resource: r.label(),
                                owner: format!("\"{}\" ({})", owner.vm.name, owner.vm.uuid),
                            }),
                        }),
                    }
                }
            }
        }
        let mut released = Vec::new();
        let mut closed = Vec::new();
        for key in keys {
            let Some(grant) = owner.grants.get(&key) else {
                continue;
            };
            let Some(fd) = &grant.fd else {
                failures.push(ResourceFailure {
                    resource: grant.resource.label(),
                    error: Box::new(Error::ServiceUnavailable {
                        reason:
                            "waiting for the VM's supervisor to reconnect after a daemon restart"
                                .into(),
                    }),
                });
                continue;
            };
            if let Err(e) = ofd::unlock(fd.as_fd(), 0, 0) {
                failures.push(ResourceFailure {
                    resource: grant.resource.label(),
                    error: Box::new(Error::io("unlocking", &e)),
                });
                continue;
            }
            if let Some(grant) = owner.grants.remove(&key) {
                released.push(HeldResource {
                    resource: grant.resource,
                    version: grant.version,
                    since: grant.since,
                    confirmed: true,
                    lost: false,
                });
            }
            closed.push(key);
            unindex(&mut self.index, key, uuid);
        }
        if let Some(holder) = owner
            .holder
            .as_ref()
            .filter(|h| Some(h.pid()) != caller_pid)
        {
            holder.close(&closed);
        }
        if failures.is_empty() {
            Ok(released)
        } else {
            Err(Error::PartialRelease { failures })
        }
    }

    /// Forgets VM `uuid`, unlocking everything it held (its guest died, its holder went away, or
    /// it was shut down).
    pub fn remove_owner(&mut self, uuid: &str) -> bool {
        // A source that dies while its destination keeps copies of every description hands the
        // VM over instead: unlocking would leave the destination guest unprotected.
        let handover = self
            .owners
            .get(uuid)
            .and_then(|o| o.migration.as_ref())
            .and_then(|m| m.incoming.as_ref())
            .is_some_and(|i| i.taken && i.link.is_connected() && !i.process.has_exited());
        if handover && self.migrate_complete(uuid, true).is_ok() {
            tracing::warn!(
                uuid,
                "migration source ended; the destination now owns the VM's locks"
            );
            return false;
        }
        let Some(owner) = self.owners.remove(uuid) else {
            return false;
        };
        for (key, grant) in owner.grants {
            if let Some(fd) = grant.fd {
                // The holder may still have a copy of the description: unlock, do not just close.
                let _ = ofd::unlock(fd.as_fd(), 0, 0);
            }
            unindex(&mut self.index, key, uuid);
        }
        if let Some(holder) = owner.holder {
            holder.finished();
        }
        true
    }

    fn hold_incoming(&mut self, vm: VmIdentity, link: Arc<HolderLink>) -> Result<(), Error> {
        let host = self.host.clone();
        let owner = self
            .owners
            .get_mut(&vm.uuid)
            .ok_or_else(|| not_migrating(&vm.uuid))?;
        let migration = owner
            .migration
            .as_mut()
            .ok_or_else(|| not_migrating(&vm.uuid))?;
        if migration
            .incoming
            .as_ref()
            .is_some_and(|i| i.link.is_connected())
        {
            return Err(Error::OwnerExists {
                uuid: vm.uuid.clone(),
                holder: owner.holder_identity(&host),
            });
        }
        let process = ProcessHandle::open(vm.pid, None).map_err(|e| {
            Error::io(
                format!("destination guest process {} of VM \"{}\"", vm.pid, vm.name),
                &e,
            )
        })?;
        migration.incoming = Some(Incoming {
            holder_pid: link.pid(),
            link,
            process,
            taken: false,
        });
        Ok(())
    }

    /// Source side: the versions to hand to the destination; marks the VM as migrating.
    pub fn migrate_prepare(&mut self, uuid: &str) -> Result<Vec<HeldResource>, Error> {
        let owner = self
            .owners
            .get_mut(uuid)
            .ok_or_else(|| unknown_owner(uuid))?;
        if owner.grants.values().any(|g| g.fd.is_none()) {
            return Err(Error::ServiceUnavailable {
                reason: "the VM's supervisor has not reconnected since the daemon restarted".into(),
            });
        }
        owner.migration.get_or_insert_with(Migration::default);
        Ok(held(owner))
    }

    /// Destination side: takes copies of the source's descriptions, if `versions` are current.
    pub fn acquire_incoming(
        &mut self,
        uuid: &str,
        versions: &[(Resource, u64)],
    ) -> Result<Vec<HeldResource>, Error> {
        let owner = self
            .owners
            .get_mut(uuid)
            .ok_or_else(|| not_migrating(uuid))?;
        let incoming = owner
            .migration
            .as_mut()
            .and_then(|m| m.incoming.as_mut())
            .ok_or_else(|| not_migrating(uuid))?;
        let stale = |reason: String| Error::InvalidLockState {
            reason: format!("stale or forged migration state: {reason}"),
        };
        let mut locks = Vec::new();
        let mut fds = Vec::new();
        for (resource, version) in versions {
            let (key, grant) = owner
                .grants
                .iter()
                .find(|(_, g)| g.resource == *resource)
                .ok_or_else(|| stale(format!("{} is not held by the source", resource.label())))?;
            if grant.version != *version {
                return Err(stale(format!(
                    "{} is at version {}, the state says {version}",
                    resource.label(),
                    grant.version
                )));
            }
            let fd = grant.fd.as_ref().ok_or_else(|| Error::ServiceUnavailable {
                reason: "the source's supervisor has not reconnected".into(),
            })?;
            fds.push(
                fd.try_clone()
                    .map_err(|e| Error::io("duplicating a lock description", &e))?,
            );
            locks.push(HeldLock {
                resource: grant.resource.clone(),
                key: *key,
            });
        }
        if locks.len() != owner.grants.len() {
            let missing: Vec<String> = owner
                .grants
                .values()
                .filter(|g| !versions.iter().any(|(r, _)| *r == g.resource))
                .map(|g| g.resource.label())
                .collect();
            return Err(stale(format!("it leaves out {}", missing.join(", "))));
        }
        // The destination keeps copies of the very descriptions that hold the locks: there is no
        // instant at which the disks are unlocked.
        incoming.link.keep(&locks, &fds)?;
        incoming.taken = true;
        Ok(held(owner))
    }

    /// Ends a migration (see [`crate::proto::Request::MigrateComplete`]).
    pub fn migrate_complete(&mut self, uuid: &str, success: bool) -> Result<(), Error> {
        let Some(owner) = self.owners.get_mut(uuid) else {
            return Ok(());
        };
        let Some(migration) = owner.migration.take() else {
            return Ok(());
        };
        if !success {
            if let Some(incoming) = migration.incoming {
                incoming.link.finished(); // the destination drops its copies; nothing is unlocked
            }
            return Ok(());
        }
        let Some(incoming) = migration.incoming.filter(|i| i.taken) else {
            owner.migration = None;
            return Err(Error::invalid_state("finish the migration", "the destination has not taken the leases over; the migration is cancelled and the source keeps them"));
        };
        let old = owner.holder.replace(Arc::clone(&incoming.link));
        owner.holder_pid = incoming.holder_pid;
        owner.vm.pid = incoming.process.pid;
        owner.process = incoming.process;
        // New generation: the state the source handed out is stale from now on.
        for (key, grant) in owner.grants.iter_mut() {
            grant.version += 1;
            self.versions.insert(*key, (uuid.to_owned(), grant.version));
        }
        if let Some(old) = old {
            old.finished(); // the source drops its copies; the destination's keep the locks
        }
        Ok(())
    }

    /// The guest `guest_pid` of `uuid` ended: release everything, unless the VM now runs as
    /// another guest (migrated away).
    pub fn shutdown(&mut self, uuid: &str, guest_pid: u32) -> Result<Vec<HeldResource>, Error> {
        match self.owners.get(uuid) {
            None => Ok(Vec::new()),
            Some(o) if o.vm.pid != guest_pid => Ok(Vec::new()),
            Some(_) => self.release(uuid, None),
        }
    }

    /// The holder connection of `uuid` closed: if it is still that VM's holder, the VM is gone.
    pub fn holder_closed(&mut self, uuid: &str, link: &Arc<HolderLink>) -> bool {
        if let Some(migration) = self.owners.get_mut(uuid).and_then(|o| o.migration.as_mut()) {
            if migration
                .incoming
                .as_ref()
                .is_some_and(|i| Arc::ptr_eq(&i.link, link))
            {
                migration.incoming = None; // the destination went away: the source keeps all
                return false;
            }
        }
        let is_current = self
            .owners
            .get(uuid)
            .and_then(|o| o.holder.as_ref())
            .is_some_and(|h| Arc::ptr_eq(h, link));
        is_current && self.remove_owner(uuid)
    }

    /// The holder of `uuid` (pid `holder_pid`) started the guest `pid`: locks follow it from now on.
    /// Only the holder's own child may be named, so no client can tie a VM to a stranger's process.
    pub fn guest_started(&mut self, uuid: &str, pid: u32, caller_pid: u32) -> Result<(), Error> {
        let owner = self
            .owners
            .get_mut(uuid)
            .ok_or_else(|| unknown_owner(uuid))?;
        if let Some(incoming) = owner.migration.as_mut().and_then(|m| m.incoming.as_mut()) {
            if incoming.holder_pid == caller_pid {
                if vmlock::process::stat(pid).map(|s| s.ppid) != Some(caller_pid) {
                    return Err(Error::PermissionDenied {
                        reason: format!(
                            "process {pid} is not a child of the destination supervisor"
                        ),
                    });
                }
                incoming.process = ProcessHandle::open(pid, None)
                    .map_err(|e| Error::io(format!("guest process {pid}"), &e))?;
                return Ok(());
            }
        }
        let holder_pid = owner.holder.as_ref().map(|h| h.pid());
        let parent = vmlock::process::stat(pid).map(|s| s.ppid);
        if parent.is_none() || (parent != holder_pid && parent != Some(caller_pid)) {
            return Err(Error::PermissionDenied {
                reason: format!(
                    "process {pid} is not a child of the supervisor of VM \"{}\"",
                    owner.vm.name
                ),
            });
        }
        owner.process = ProcessHandle::open(pid, None)
            .map_err(|e| Error::io(format!("guest process {pid}"), &e))?;
        owner.vm.pid = pid;
        Ok(())
    }

    /// What VM `uuid` holds.
    pub fn inquire(&self, uuid: &str) -> Result<Vec<HeldResource>, Error> {
        let owner = self.owners.get(uuid).ok_or_else(|| unknown_owner(uuid))?;
        Ok(held(owner))
    }

    /// VM `uuid`'s identity.
    pub fn lookup(&self, uuid: &str) -> Result<VmIdentity, Error> {
        self.owners
            .get(uuid)
            .map(|o| o.vm.clone())
            .ok_or_else(|| unknown_owner(uuid))
    }

    /// Everything, sorted by VM name.
    pub fn status(&self) -> Vec<OwnerStatus> {
        let mut all: Vec<OwnerStatus> = self
            .owners
            .values()
            .map(|o| OwnerStatus {
                vm: o.vm.clone(),
                holder_pid: o
                    .holder
                    .as_ref()
                    .filter(|h| h.is_connected())
                    .map(|h| h.pid()),
                resources: held(o),
            })
            .collect();
        all.sort_by(|a, b| a.vm.name.cmp(&b.vm.name).then(a.vm.uuid.cmp(&b.vm.uuid)));
        all
    }

    /// `(uuid, pidfd copy)` of every owner, for the watcher.
    pub fn watch_list(&self) -> Vec<(String, u64, OwnedFd)> {
        self.owners
            .iter()
            .filter_map(|(u, o)| {
                o.process
                    .fd()
                    .try_clone()
                    .ok()
                    .map(|fd| (u.clone(), o.process.start_time, fd))
            })
            .collect()
    }

    /// The owner `uuid` whose guest started at `start_time` died.
    pub fn guest_exited(&mut self, uuid: &str, start_time: u64) -> bool {
        let same = self
            .owners
            .get(uuid)
            .is_some_and(|o| o.process.start_time == start_time && o.process.has_exited());
        same && self.remove_owner(uuid)
    }

    /// Finds leases lost under running guests: the locked file was removed or replaced (its path
    /// no longer reaches the locked inode) or cannot be reached. Each loss is reported once.
    pub fn check_leases(&mut self) -> Vec<LostLease> {
        let mut lost = Vec::new();
        let indirect = self.config.file_lockspace_dir.is_some();
        let mut findings: Vec<(String, LockKey)> = Vec::new();
        for (uuid, owner) in &self.owners {
            for (key, grant) in &owner.grants {
                if grant.lost || grant.fd.is_none() {
                    continue;
                }
                let target = match self.target(&grant.resource) {
                    Ok((path, _, _)) => path,
                    // Indirect mode cannot name the lock file once the disk is gone; the lock
                    // file itself is what matters there.
                    Err(_) if indirect => continue,
                    Err(_) => {
                        findings.push((uuid.clone(), *key));
                        continue;
                    }
                };
                let same = std::fs::metadata(&target)
                    .is_ok_and(|m| m.dev() == key.dev && m.ino() == key.ino);
                if !same {
                    findings.push((uuid.clone(), *key));
                }
            }
        }
        for (uuid, key) in findings {
            let Some(owner) = self.owners.get_mut(&uuid) else {
                continue;
            };
            let Some(grant) = owner.grants.get_mut(&key) else {
                continue;
            };
            grant.lost = true;
            let label = grant.resource.label();
            let Ok(process) = ProcessHandle::open(owner.vm.pid, Some(owner.process.start_time))
            else {
                continue;
            };
            match lost.iter_mut().find(|l: &&mut LostLease| l.vm.uuid == uuid) {
                Some(l) => l.resources.push(label),
                None => lost.push(LostLease {
                    vm: owner.vm.clone(),
                    resources: vec![label],
                    flags: owner.flags.clone(),
                    process,
                }),
            }
        }
        lost
    }

    /// VM `uuid` as persisted; `None` if it is gone.
    pub fn persisted_owner(&self, uuid: &str) -> Option<PersistedOwner> {
        self.owners.get(uuid).map(|o| PersistedOwner {
            vm: o.vm.clone(),
            holder_pid: o.holder_pid,
            start_time: o.process.start_time,
            flags: o.flags.clone(),
            grants: o
                .grants
                .iter()
                .map(|(k, g)| (*k, g.resource.clone(), g.since, g.version))
                .collect(),
        })
    }

    /// The whole table as persisted.
    pub fn persisted(&self) -> Persisted {
        Persisted {
            owners: self
                .owners
                .keys()
                .filter_map(|u| self.persisted_owner(u))
                .collect(),
            versions: self
                .versions
                .iter()
                .map(|(k, (u, v))| (*k, u.clone(), *v))
                .collect(),
        }
    }

    /// The number of VMs.
    pub fn owner_count(&self) -> usize {
        self.owners.len()
    }

    /// Rebuilds the table from a state file after a restart. Owners whose guest is gone (or
    /// whose pid now names another process) are dropped; the others wait for their holder.
    pub fn recover(&mut self, persisted: Persisted) -> usize {
        for (key, uuid, version) in persisted.versions {
            self.versions.insert(key, (uuid, version));
        }
        let mut kept = 0;
        for p in persisted.owners {
            let Ok(process) = ProcessHandle::open(p.vm.pid, Some(p.start_time)) else {
                continue;
            };
            if process.has_exited() {
                continue;
            }
            let uuid = p.vm.uuid.clone();
            let grants = p
                .grants
                .into_iter()
                .map(|(key, resource, since, version)| {
                    self.index.entry(key).or_default().push(uuid.clone());
                    (
                        key,
                        Grant {
                            resource,
                            fd: None,
                            since,
                            version,
                            lost: false,
                        },
                    )
                })
                .collect();
            self.owners.insert(
                uuid,
                Owner {
                    vm: p.vm,
                    holder_pid: p.holder_pid,
                    process,
                    holder: None,
                    flags: p.flags,
                    flags_set: true,
                    migration: None,
                    grants,
                },
            );
            kept += 1;
        }
        kept
    }
}

fn held(owner: &Owner) -> Vec<HeldResource> {
    owner
        .grants
        .values()
        .map(|g| HeldResource {
            resource: g.resource.clone(),
            version: g.version,
            since: g.since,
            confirmed: g.fd.is_some(),
            lost: g.lost,
        })
        .collect()
}

fn unindex(index: &mut HashMap<LockKey, Vec<String>>, key: LockKey, uuid: &str) {
    if let Some(list) = index.get_mut(&key) {
        list.retain(|u| u != uuid);
        if list.is_empty() {
            index.remove(&key);
        }
    }
}

fn kind_of(resource: &Resource) -> LockKind {
    match resource.mode() {
        DiskMode::Shared => LockKind::Shared,
        _ => LockKind::Exclusive,
    }
}

fn unknown_owner(uuid: &str) -> Error {
    Error::UnknownOwner {
        uuid: uuid.to_owned(),
    }
}

fn not_migrating(uuid: &str) -> Error {
    Error::invalid_state(
        "receive an incoming migration",
        format!("VM {uuid} is not being migrated from this host: run migrate-prepare on the source first"),
    )
}

/// QEMU's per-permission lock bytes (`block/file-posix.c`): 100 + i "holds", 200 + i "does not
/// share" for consistent-read, write, write-unchanged, resize, graph-mod.
pub const QEMU_WRITE_BYTE: u64 = 101;
/// QEMU's "does not share write" byte.
pub const QEMU_NO_SHARED_WRITE_BYTE: u64 = 201;
/// The bytes a read-write QEMU holds on its image: what vmlock holds for a non-QEMU guest.
pub const QEMU_WRITER_BYTES: [u64; 5] = [100, 101, 103, 201, 203];

impl Table {
    /// A process outside vmlock that writes the disk through QEMU's locks (an active read-write
    /// open holds byte 101), or forbids writers (byte 201). Names it from `/proc` when it can.
    fn foreign_qemu_writer(&self, resource: &Resource, opened: &File) -> Option<ForeignHolder> {
        let Resource::Disk { path, mode } = resource else {
            return None;
        };
        // Direct mode probes through the description it just locked (a description never conflicts
        // with itself); indirect mode has the lock file open, so open the image.
        let own;
        let file = if self.config.file_lockspace_dir.is_none() {
            opened
        } else {
            own = disk::open(path, false).ok()?.0;
            &own
        };
        for (byte, what) in [
            (QEMU_WRITE_BYTE, "QEMU write lock (byte 101)"),
            (
                QEMU_NO_SHARED_WRITE_BYTE,
                "QEMU no-shared-write lock (byte 201)",
            ),
        ] {
            // A shared disk tolerates other writers that share write (byte 101) but not byte 201.
            if *mode == DiskMode::Shared && byte == QEMU_WRITE_BYTE {
                continue;
            }
            if let Ok(Some(_)) = ofd::probe(file.as_fd(), LockKind::Exclusive, byte, 1) {
                let meta = file.metadata().ok()?;
                let holder =
                    procfs::lock_holders(meta.dev(), meta.ino(), byte, byte, std::process::id())
                        .into_iter()
                        .next();
                return Some(match holder {
                    Some(h) => ForeignHolder::Process {
                        pid: h.pid,
                        command: vmlock::process::command(h.pid),
                        what: what.into(),
                    },
                    None => ForeignHolder::Process {
                        pid: 0,
                        command: "unknown".into(),
                        what: what.into(),
                    },
                });
            }
        }
        None
    }
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

/// Names whoever outside vmlock holds a lock on `key`: a POSIX lock's pid (virtlockd), or a process
/// whose fdinfo shows a lock on that byte.
fn name_foreign_holder(file: &File, key: LockKey) -> ForeignHolder {
    if let Ok(Some(conflict)) = ofd::probe(file.as_fd(), LockKind::Exclusive, key.byte, 1) {
        if let Some(pid) = conflict.posix_pid {
            return ForeignHolder::Process {
                pid,
                command: vmlock::process::command(pid),
                what: format!("POSIX lock on byte {} (as virtlockd takes)", key.byte),
            };
        }
    }
    match procfs::lock_holders(key.dev, key.ino, key.byte, key.byte, std::process::id())
        .into_iter()
        .next()
    {
        Some(h) => ForeignHolder::Process {
            pid: h.pid,
            command: vmlock::process::command(h.pid),
            what: format!("lock on byte {}", key.byte),
        },
        None => ForeignHolder::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn persisted_owner(pid: u32, start_time: u64) -> Persisted {
        Persisted {
            owners: vec![PersistedOwner {
                vm: VmIdentity {
                    uuid: "7c9e6679-7425-40de-944b-e07fc1f90ae7".into(),
                    name: "vm".into(),
                    id: 1,
                    pid,
                },
                holder_pid: pid,
                start_time,
                flags: AcquireFlags::default(),
                grants: Vec::new(),
            }],
            versions: Vec::new(),
        }
    }

    #[test]
    fn recovery_refuses_a_reused_pid() {
        let me = std::process::id();
        let started = vmlock::process::stat(me).unwrap().start_time;
        let mut table = Table::new(Config::default(), "h".into());
        // Same pid, another start time: the pid now names a different process.
        assert_eq!(table.recover(persisted_owner(me, started + 1)), 0);
        assert!(table.status().is_empty());
        assert_eq!(table.recover(persisted_owner(me, started)), 1);
        assert_eq!(table.status().len(), 1);
        assert!(!table.status()[0].resources.iter().any(|r| r.confirmed));
    }

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

/// Random sequences of acquires, releases and owner deaths against real files, real OFD locks
/// and real guest processes: after every step no disk is held exclusively by two VMs or by one
/// VM beside a shared holder, and the kernel agrees with the table about what is locked.
#[cfg(test)]
mod model {
    use super::*;
    use crate::proto::{write_frame, FrameReader, Push, Request};
    use proptest::prelude::*;
    use std::os::unix::net::UnixStream;
    use std::process::{Child, Command};

    const VMS: usize = 3;
    const DISKS: usize = 3;

    #[derive(Debug, Clone)]
    enum Op {
        Acquire {
            vm: usize,
            disks: Vec<(usize, bool)>,
        },
        Release {
            vm: usize,
            disk: usize,
        },
        Die {
            vm: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..VMS, proptest::collection::vec((0..DISKS, any::<bool>()), 1..3))
                .prop_map(|(vm, disks)| Op::Acquire { vm, disks }),
            2 => (0..VMS, 0..DISKS).prop_map(|(vm, disk)| Op::Release { vm, disk }),
            1 => (0..VMS).prop_map(|vm| Op::Die { vm }),
        ]
    }

    struct Vm {
        guest: Child,
        uuid: String,
    }

    impl Drop for Vm {
        fn drop(&mut self) {
            let _ = self.guest.kill();
            let _ = self.guest.wait();
        }
    }

    /// A holder that acknowledges every push and keeps what it is given, on a thread.
    fn holder() -> Arc<HolderLink> {
        let (daemon_side, holder_side) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let mut frames = FrameReader::new();
            while let Ok((push, fds)) = frames.read::<Push>(&holder_side) {
                kept.extend(fds);
                if let Push::Keep { seq, .. } | Push::Close { seq, .. } = push {
                    let _ = write_frame(&holder_side, &Request::Ack { seq }, &[]);
                }
            }
        });
        let reader = daemon_side.try_clone().unwrap();
        let link = Arc::new(HolderLink::new(daemon_side, std::process::id()));
        let acks = Arc::clone(&link);
        std::thread::spawn(move || {
            let mut frames = FrameReader::new();
            while let Ok((Request::Ack { seq }, _)) = frames.read::<Request>(&reader) {
                acks.acked(seq);
            }
        });
        link
    }

    fn start_vm(table: &mut Table, i: usize) -> Vm {
        let guest = Command::new("sleep").arg("600").spawn().unwrap();
        let uuid = uuid::Uuid::new_v4().to_string();
        let vm = VmIdentity {
            uuid: uuid.clone(),
            name: format!("vm{i}"),
            id: 1,
            pid: guest.id(),
        };
        table.hold(vm, Vec::new(), holder(), false).unwrap();
        Vm { guest, uuid }
    }

    fn check(table: &Table, disks: &[Resource]) {
        let status = table.status();
        for d in disks {
            let holders: Vec<(&str, DiskMode)> = status
                .iter()
                .flat_map(|o| {
                    o.resources
                        .iter()
                        .filter(|r| r.resource.path() == d.path())
                        .map(move |r| (o.vm.uuid.as_str(), r.resource.mode()))
                })
                .collect();
            let exclusive = holders
                .iter()
                .filter(|(_, m)| *m == DiskMode::Exclusive)
                .count();
            assert!(
                exclusive <= 1,
                "{} held exclusively twice: {holders:?}",
                d.label()
            );
            assert!(
                exclusive == 0 || holders.len() == 1,
                "{} exclusive beside others: {holders:?}",
                d.label()
            );
            let probe = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(d.path())
                .unwrap();
            let kernel = ofd::probe(probe.as_fd(), LockKind::Exclusive, 0, 1)
                .unwrap()
                .is_some();
            assert_eq!(
                kernel,
                !holders.is_empty(),
                "kernel and table disagree about {}",
                d.label()
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn no_disk_is_ever_written_by_two_vms(ops in proptest::collection::vec(op(), 1..25)) {
            let dir = tempfile::tempdir().unwrap();
            let disks: Vec<Resource> = (0..DISKS)
                .map(|i| {
                    let p = dir.path().join(format!("d{i}"));
                    std::fs::write(&p, [0u8; 512]).unwrap();
                    Resource::disk(p, DiskMode::Exclusive).unwrap()
                })
                .collect();
            let mut table = Table::new(Config::default(), "h".into());
            let mut vms: Vec<Vm> = (0..VMS).map(|i| start_vm(&mut table, i)).collect();
            for op in ops {
                match op {
                    Op::Acquire { vm, disks: wanted } => {
                        let resources: Vec<Resource> = wanted
                            .iter()
                            .map(|(d, shared)| Resource::disk(disks[*d].path(), if *shared { DiskMode::Shared } else { DiskMode::Exclusive }).unwrap())
                            .collect();
                        let before = table.status();
                        if table.acquire(&vms[vm].uuid, &resources, &AcquireFlags::default(), 0).is_err() {
                            // All or nothing: a refused acquire changes nothing.
                            prop_assert_eq!(table.status(), before);
                        }
                    }
                    Op::Release { vm, disk } => {
                        let _ = table.release(&vms[vm].uuid, Some(std::slice::from_ref(&disks[disk])));
                    }
                    Op::Die { vm } => {
                        let _ = vms[vm].guest.kill();
                        let _ = vms[vm].guest.wait();
                        let uuid = vms[vm].uuid.clone();
                        let start = table.owners.get(&uuid).map(|o| o.process.start_time).unwrap_or(0);
                        table.guest_exited(&uuid, start);
                        vms[vm] = start_vm(&mut table, vm);
                    }
                }
                check(&table, &disks);
            }
        }
    }
}
