//! The lock table: which VM holds which lock, and every rule for granting, refusing, releasing,
//! handing over and recovering locks. A state machine: each method is one event, checks
//! everything before it changes anything, and returns what the caller must do outside the table
//! ([`Effects`]: descriptions to close, pushes to holders, guests to kill, records to persist).
//!
//! The kernel's locks are the truth about exclusion; the table names holders, keeps versions, and
//! keeps the daemon's copy of each grant's description. The VM's *holder* (its supervisor) keeps
//! another copy, so a lock survives the daemon.
//!
//! Ownership is checked here, not trusted from the client: every change to a VM comes from the
//! process registered as its holder (`caller` is the peer's pid from the kernel, `SO_PEERCRED`,
//! with that process's start time, so a later process given the same pid is someone else).

use crate::host::{Caller, Host, LockKind, ProcInfo};
use crate::types::{AcquireFlags, HeldLock, HeldResource, LockKey, OwnerStatus, VmIdentity};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::SystemTime;
use vmlock::{DiskMode, Error, ForeignHolder, Holder, Resource};

/// Identifies one holder connection (assigned by the daemon, never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LinkId(pub u64);

/// Identifies one two-phase acquire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(u64);

/// QEMU's lock bytes that a read-write QEMU holds shared on its image.
pub const QEMU_WRITER_BYTES: [u64; 5] = [100, 101, 103, 201, 203];
/// QEMU's "I write" byte.
pub const QEMU_WRITE_BYTE: u64 = 101;
/// QEMU's "no one else may write" byte.
pub const QEMU_NO_SHARED_WRITE_BYTE: u64 = 201;

/// What the table needs of the daemon's configuration.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Take locks for plain disks (not only explicit leases).
    pub auto_disk_leases: bool,
    /// Refuse writable disks of a VM that holds no explicit lease.
    pub require_lease_for_disks: bool,
    /// Indirect mode: lock files stand for disks (QEMU's bytes are probed on the image).
    pub indirect: bool,
    /// A deliberate bug, so the simulator can show it catches one. Always `None` in the daemon.
    #[doc(hidden)]
    pub sabotage: Sabotage,
}

/// Deliberate bugs for the simulator's self-test.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Sabotage {
    /// The real core.
    #[default]
    None,
    /// Unlock a VM's locks as soon as its holder connection closes, while the guest still runs
    /// (the bug issue 11 found in the old daemon).
    UnlockOnHolderClose,
    /// Skip the kernel lock (trust the table alone).
    SkipKernelLock,
    /// Let any child of a VM's guest take the VM over, not only a child of a guest that holds
    /// its own locks: a supervised guest's child takes its supervisor's place.
    TakeoverByAnyChild,
}

/// A lock target the daemon opened (outside the table lock) for one resource.
#[derive(Debug)]
pub struct Opened<D> {
    /// The resource.
    pub resource: Resource,
    /// The lock file's identity and byte.
    pub key: LockKey,
    /// The description to lock.
    pub desc: D,
    /// In indirect mode, the image itself, to probe QEMU's bytes on.
    pub image: Option<D>,
}

/// What the caller must do once it has let go of the table.
#[derive(Debug)]
pub struct Effects<D> {
    /// Descriptions the table let go of (already unlocked where they held a lock): close them.
    pub close: Vec<D>,
    /// Pushes to holders: close these keys / the VM holds nothing any more.
    pub pushes: Vec<(LinkId, Push)>,
    /// Guests `(pid, start time)` whose holder died while they still ran: kill them (their locks
    /// stay until they have exited).
    pub kill: Vec<(u32, u64)>,
    /// VMs whose record changed: persist them.
    pub changed: BTreeSet<String>,
    /// The set of processes to watch changed.
    pub rewatch: bool,
    /// VMs the table forgot because their guest exited (or was found gone), with the number of
    /// locks that went with them: the daemon reports each as an owner death.
    pub gone: Vec<(VmIdentity, usize)>,
}

impl<D> Default for Effects<D> {
    fn default() -> Self {
        Effects {
            close: Vec::new(),
            pushes: Vec::new(),
            kill: Vec::new(),
            changed: BTreeSet::new(),
            rewatch: false,
            gone: Vec::new(),
        }
    }
}

impl<D> Effects<D> {
    /// Adds `other`'s effects to these (two calls under one table lock).
    pub fn absorb(&mut self, other: Effects<D>) {
        self.close.extend(other.close);
        self.pushes.extend(other.pushes);
        self.kill.extend(other.kill);
        self.changed.extend(other.changed);
        self.rewatch |= other.rewatch;
        self.gone.extend(other.gone);
    }
}

/// A push to a holder that needs no acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    /// Close the descriptions of these keys (the daemon already unlocked them).
    Close(Vec<LockKey>),
    /// The VM holds nothing any more: close everything.
    Finished,
}

/// A refusal of an acquire. A lock held outside vmlock is named by the caller, outside the table
/// (naming it scans `/proc`).
#[derive(Debug)]
pub enum Refusal {
    /// A plain error.
    Error(Error),
    /// The kernel refused a lock that no VM in the table holds.
    Foreign {
        /// The resource refused.
        resource: String,
        /// The lock (for a QEMU byte, that byte).
        key: LockKey,
        /// What is held, e.g. "QEMU write lock (byte 101)".
        what: String,
        /// The owner pid of a POSIX lock, from the probe.
        posix_pid: Option<u32>,
    },
}

impl From<Error> for Refusal {
    fn from(e: Error) -> Self {
        Refusal::Error(e)
    }
}

impl Refusal {
    /// The error, with the foreign holder named by `name` (pid, command) when it can.
    pub fn into_error(self, name: impl FnOnce(LockKey) -> Option<(u32, String)>) -> Error {
        match self {
            Refusal::Error(e) => e,
            Refusal::Foreign {
                resource,
                key,
                what,
                posix_pid,
            } => {
                let found = match posix_pid {
                    Some(pid) => Some((pid, String::new())),
                    None => name(key),
                };
                let holder = match found {
                    Some((pid, command)) => ForeignHolder::Process { pid, command, what },
                    None => ForeignHolder::Unknown,
                };
                Error::Busy { resource, holder }
            }
        }
    }
}

/// The first half of an acquire: kernel locks taken and the grants marked pending. The caller
/// hands `handover` copies to the VM's holder (outside the table), then calls
/// [`LockTable::commit`] or [`LockTable::abort`].
#[derive(Debug)]
pub struct Reservation<D> {
    /// Which acquire.
    pub ticket: Ticket,
    /// The holder connection to push the copies to, unless `direct`.
    pub link: LinkId,
    /// The caller is the holder's own process: the copies go in the reply.
    pub direct: bool,
    /// What each copy locks, and the copies.
    pub handover: Vec<(HeldLock, D)>,
}

/// The first half of a migration hand-off on the destination's side.
#[derive(Debug)]
pub struct Handover<D> {
    /// The destination holder's connection.
    pub link: LinkId,
    /// What each copy locks, and copies of the source's very descriptions.
    pub handover: Vec<(HeldLock, D)>,
}

/// A lease found lost under a running guest; the caller carries out the VM's action.
#[derive(Debug, Clone)]
pub struct LostLease {
    /// The VM.
    pub vm: VmIdentity,
    /// Start time of its guest.
    pub start_time: u64,
    /// The resources lost.
    pub resources: Vec<String>,
    /// Its action and QMP socket.
    pub flags: AcquireFlags,
}

#[derive(Debug)]
#[cfg_attr(feature = "model", derive(Clone))]
struct Grant<D> {
    resource: Resource,
    /// The daemon's copy; `None` while pending, or after a restart until the holder hands it back.
    desc: Option<D>,
    /// Pending: reserved by this acquire, not yet kept by the holder.
    pending: Option<Ticket>,
    since: SystemTime,
    version: u64,
    lost: bool,
}

#[derive(Debug)]
#[cfg_attr(feature = "model", derive(Clone))]
struct Guest<P> {
    pid: u32,
    start_time: u64,
    handle: P,
}

impl<P> From<ProcInfo<P>> for Guest<P> {
    fn from(p: ProcInfo<P>) -> Self {
        Guest {
            pid: p.pid,
            start_time: p.start_time,
            handle: p.handle,
        }
    }
}

#[derive(Debug)]
#[cfg_attr(feature = "model", derive(Clone))]
struct Owner<D, P> {
    vm: VmIdentity,
    /// The process keeping the descriptions (the supervisor).
    holder: Caller,
    /// Its connection, while connected.
    link: Option<LinkId>,
    guest: Guest<P>,
    flags: AcquireFlags,
    /// Whether `flags` came from the VM's first acquire (hotplug acquires do not change them).
    flags_set: bool,
    grants: BTreeMap<LockKey, Grant<D>>,
    migration: Option<Migration<P>>,
    /// The holder died while the guest ran: the guest is being killed; its locks stay until it
    /// has exited.
    orphaned: bool,
}

impl<D, P> Owner<D, P> {
    /// Whether `caller` is this VM's holder. Once the holder is known dead (`orphaned`), its
    /// pid may already name another process (pid reuse): nobody speaks for the VM any more.
    fn is_holder(&self, caller: Caller) -> bool {
        self.holder.is(caller) && !self.orphaned
    }
    /// Whether `caller`, registering with `guest` as its guest, takes this VM over from a guest
    /// that is its own holder. The guest's own registration exists only so it holds its disks
    /// before it execs (QEMU's pre-exec child takes them in microseconds, and its child, started
    /// without waiting for it, becomes the long-lived holder). A child of the guest runs in the
    /// guest's trust domain and could already act for it; it gains no disk the guest did not
    /// hold. Not while migrating or orphaned, and never from a holder that is not the guest.
    fn delegates_to<Q>(&self, guest: &ProcInfo<Q>, caller: Caller) -> bool {
        self.holder.pid == self.guest.pid
            && self.holder.start_time == self.guest.start_time
            && guest.pid == self.guest.pid
            && guest.start_time == self.guest.start_time
            && guest.parent_of_caller
            && caller.pid != self.guest.pid
            && !self.orphaned
            && self.migration.is_none()
    }
    fn holder_identity(&self, host: &str) -> Holder {
        Holder {
            name: self.vm.name.clone(),
            uuid: self.vm.uuid.clone(),
            pid: Some(self.vm.pid),
            host: host.to_owned(),
        }
    }
    fn label(&self) -> String {
        format!("\"{}\" ({})", self.vm.name, self.vm.uuid)
    }
}

#[derive(Debug)]
#[cfg_attr(feature = "model", derive(Clone))]
struct Migration<P> {
    incoming: Option<Incoming<P>>,
    /// The hand-over secret the source's prepare handed out; the destination must present it.
    token: String,
}

#[derive(Debug)]
#[cfg_attr(feature = "model", derive(Clone))]
struct Incoming<P> {
    link: LinkId,
    holder: Caller,
    guest: Guest<P>,
    /// The destination's holder keeps copies of every description.
    taken: bool,
}

/// What survives a daemon restart.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Persisted {
    /// Every VM.
    pub owners: Vec<PersistedOwner>,
    /// The last owner and version of every lock, so versions never go back.
    pub versions: Vec<(LockKey, String, u64)>,
}

/// One VM as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedOwner {
    /// Who (its `pid` is the guest's).
    pub vm: VmIdentity,
    /// The process keeping its descriptions.
    pub holder_pid: u32,
    /// Its start time, so a later process given the same pid is not taken for it.
    #[serde(default)]
    pub holder_start: Option<u64>,
    /// The guest's start time.
    pub start_time: u64,
    /// Its acquire flags (lock-failure action, QMP socket).
    pub flags: AcquireFlags,
    /// Its grants.
    pub grants: Vec<(LockKey, Resource, SystemTime, u64)>,
}

/// The lock table over a host `H`.
#[derive(Debug)]
pub struct LockTable<H: Host> {
    policy: Policy,
    host_name: String,
    owners: HashMap<String, Owner<H::Desc, H::Proc>>,
    /// Which owners hold (or have reserved) each key; several for shared locks.
    index: HashMap<LockKey, Vec<String>>,
    /// Last owner and version per key: the version grows when another owner takes the key.
    versions: HashMap<LockKey, (String, u64)>,
    next_ticket: u64,
}

type Fx<H> = Effects<<H as Host>::Desc>;

/// A copy of the whole table, for a model checker (`vmlock-model`) that explores every branch
/// from one state. Only a host whose descriptions and process handles are plain values can have
/// it: the daemon's (`OwnedFd`, pidfds) cannot.
#[cfg(feature = "model")]
impl<H: Host> Clone for LockTable<H>
where
    H::Desc: Clone,
    H::Proc: Clone,
{
    fn clone(&self) -> Self {
        LockTable {
            policy: self.policy.clone(),
            host_name: self.host_name.clone(),
            owners: self.owners.clone(),
            index: self.index.clone(),
            versions: self.versions.clone(),
            next_ticket: self.next_ticket,
        }
    }
}

#[cfg(feature = "model")]
impl<H: Host> LockTable<H> {
    /// Everything the table holds, rendered in a fixed order (its maps sorted), so that two
    /// tables that would decide alike render alike: a model checker's state identity. The ticket
    /// counter is left out (only the tickets of pending grants matter, and they are shown).
    pub fn fingerprint(&self) -> String {
        let mut owners: Vec<_> = self.owners.iter().collect();
        owners.sort_by(|a, b| a.0.cmp(b.0));
        let mut index: Vec<(&LockKey, Vec<&String>)> = self
            .index
            .iter()
            .map(|(k, v)| {
                let mut v: Vec<&String> = v.iter().collect();
                v.sort();
                (k, v)
            })
            .collect();
        index.sort();
        let mut versions: Vec<_> = self.versions.iter().collect();
        versions.sort();
        format!("{:?};{owners:?};{index:?};{versions:?}", self.policy)
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
        "take the leases over",
        format!("VM {uuid} has no migration prepared on this host"),
    )
}

/// A finish of a migration that is not in progress (see [`LockTable::migrate_complete`]).
fn not_in_progress(vm: &str) -> Error {
    Error::invalid_state(
        "finish the migration",
        format!(
            "VM {vm} has no migration in progress (a daemon restart cancels one): the source keeps its leases"
        ),
    )
}

fn not_holder(what: &str, owner_label: &str, caller: Caller, holder: u32) -> Error {
    let caller = caller.pid;
    Error::PermissionDenied {
        reason: format!(
            "{what} of VM {owner_label} may only come from its holder (pid {holder}), not pid {caller}"
        ),
    }
}

fn unindex(index: &mut HashMap<LockKey, Vec<String>>, key: LockKey, uuid: &str) {
    if let Some(v) = index.get_mut(&key) {
        v.retain(|u| u != uuid);
        if v.is_empty() {
            index.remove(&key);
        }
    }
}

fn held<D, P>(owner: &Owner<D, P>) -> Vec<HeldResource> {
    owner
        .grants
        .values()
        .filter(|g| g.pending.is_none())
        .map(|g| HeldResource {
            resource: g.resource.clone(),
            version: g.version,
            since: g.since,
            confirmed: g.desc.is_some(),
            lost: g.lost,
        })
        .collect()
}

impl<H: Host> LockTable<H> {
    /// An empty table; `host_name` names this host in refusals.
    pub fn new(policy: Policy, host_name: String) -> Self {
        LockTable {
            policy,
            host_name,
            owners: HashMap::new(),
            index: HashMap::new(),
            versions: HashMap::new(),
            next_ticket: 1,
        }
    }

    /// This host's name.
    pub fn host_name(&self) -> &str {
        &self.host_name
    }

    /// The number of VMs.
    pub fn owner_count(&self) -> usize {
        self.owners.len()
    }

    /// The number of distinct locks held or reserved (a shared disk held by several VMs counts
    /// once). O(1): the daemon reads it under the table lock after every call.
    pub fn lock_count(&self) -> usize {
        self.index.len()
    }

    fn owner(&self, uuid: &str) -> Result<&Owner<H::Desc, H::Proc>, Error> {
        self.owners.get(uuid).ok_or_else(|| unknown_owner(uuid))
    }

    fn owner_mut(&mut self, uuid: &str) -> Result<&mut Owner<H::Desc, H::Proc>, Error> {
        self.owners.get_mut(uuid).ok_or_else(|| unknown_owner(uuid))
    }

    /// Only the VM's holder process may change it.
    fn check_holder(&self, uuid: &str, caller: Caller, what: &str) -> Result<(), Error> {
        let owner = self.owner(uuid)?;
        if !owner.is_holder(caller) {
            return Err(not_holder(what, &owner.label(), caller, owner.holder.pid));
        }
        Ok(())
    }

    /// Registers connection `link` of process `caller` as the holder of `vm`, whose guest is
    /// `guest` (the caller itself, or its child); on a refusal the adopted descriptions come back
    /// in the effects, to close. After a restart the same process hands back the
    /// descriptions it kept (`adopt`, each already re-checked in the kernel by the caller) and,
    /// if the state files were lost, its VM's `flags`.
    #[allow(clippy::too_many_arguments)]
    pub fn hold(
        &mut self,
        host: &mut H,
        caller: Caller,
        link: LinkId,
        vm: VmIdentity,
        guest: ProcInfo<H::Proc>,
        adopt: Vec<(HeldLock, H::Desc)>,
        flags: Option<AcquireFlags>,
    ) -> (Result<(), Error>, Fx<H>) {
        let refuse = |e: Error, adopt: Vec<(HeldLock, H::Desc)>| {
            let fx = Fx::<H> {
                close: adopt.into_iter().map(|(_, d)| d).collect(),
                ..Default::default()
            };
            (Err(e), fx)
        };
        if let Err(e) = vmlock::params::parse_uuid(&vm.uuid)
            .and_then(|_| vmlock::params::validate_name(&vm.name))
        {
            return refuse(e, adopt);
        }
        if guest.pid != vm.pid || !guest.guarded_by(caller) {
            return refuse(
                Error::PermissionDenied {
                    reason: format!(
                        "process {} is neither the holder (pid {}) nor its child or parent",
                        vm.pid, caller.pid
                    ),
                },
                adopt,
            );
        }
        let mut fx = Fx::<H>::default();
        let uuid = vm.uuid.clone();
        match self.owners.get_mut(&uuid) {
            Some(existing) => {
                // A guest that holds its own locks (libvirt's pre-exec child, which becomes
                // QEMU) delegates them to its child, which takes over as the holder: see
                // `delegates_to`.
                if existing.delegates_to(&guest, caller)
                    || (self.policy.sabotage == Sabotage::TakeoverByAnyChild
                        && guest.parent_of_caller
                        && guest.pid == existing.guest.pid)
                {
                    existing.holder = caller;
                    existing.link = None;
                }
                // Only the process that kept the descriptions may take them back.
                if existing.link.is_some() || !existing.holder.is(caller) {
                    let holder = existing.holder_identity(&self.host_name);
                    return refuse(Error::OwnerExists { uuid, holder }, adopt);
                }
                // The record still names the holder itself as the guest: it predates the holder
                // naming its guest (the journal lost the GuestStarted record). This
                // re-registration names it, with GuestStarted's checks (`guarded_by` above).
                let guest_unnamed = existing.guest.pid == existing.holder.pid
                    && (existing.holder.start_time == 0
                        || existing.guest.start_time == existing.holder.start_time);
                if (existing.guest.start_time != guest.start_time
                    || existing.guest.pid != guest.pid)
                    && guest_unnamed
                {
                    existing.guest = Guest::from(guest);
                    existing.vm.pid = vm.pid;
                    fx.rewatch = true;
                    fx.changed.insert(uuid.clone());
                } else if existing.guest.start_time != guest.start_time
                    || existing.guest.pid != guest.pid
                {
                    if !adopt.is_empty() || !existing.grants.is_empty() {
                        return refuse(
                            Error::PermissionDenied {
                                reason: format!(
                                    "VM {} runs as guest pid {}, not {}",
                                    existing.label(),
                                    existing.guest.pid,
                                    guest.pid
                                ),
                            },
                            adopt,
                        );
                    }
                    existing.guest = Guest::from(guest);
                    existing.vm.pid = vm.pid;
                    fx.rewatch = true;
                    // A new guest (the record holds nothing): its flags are the new guest's,
                    // not the previous one's (a supervisor that got a dead one's pid starts a
                    // VM with another lock-failure action).
                    existing.flags_set = false;
                }
                existing.link = Some(link);
                if let (Some(f), false) = (flags, existing.flags_set) {
                    existing.flags = f;
                    existing.flags_set = true;
                }
            }
            None => {
                let flags_set = flags.is_some();
                self.owners.insert(
                    uuid.clone(),
                    Owner {
                        vm,
                        holder: caller,
                        link: Some(link),
                        guest: Guest::from(guest),
                        flags: flags.unwrap_or_default(),
                        flags_set,
                        grants: BTreeMap::new(),
                        migration: None,
                        orphaned: false,
                    },
                );
                fx.rewatch = true;
            }
        }
        let now = host.now();
        for (lock, desc) in adopt {
            // Another VM in the table on the same key: the kernel let this description keep its
            // lock, so the two must be compatible (shared); otherwise refuse to adopt it.
            let clash = self.index.get(&lock.key).is_some_and(|others| {
                others.iter().any(|u| {
                    u != &uuid
                        && self.owners.get(u).is_some_and(|o| {
                            o.grants.get(&lock.key).is_some_and(|g| {
                                kind_of(&g.resource) == LockKind::Exclusive
                                    || kind_of(&lock.resource) == LockKind::Exclusive
                            })
                        })
                })
            });
            let Some(owner) = self.owners.get_mut(&uuid) else {
                fx.close.push(desc);
                continue;
            };
            if clash {
                fx.close.push(desc);
                continue;
            }
            let version = self.versions.get(&lock.key).map_or(1, |(_, v)| *v);
            let grant = owner.grants.entry(lock.key).or_insert_with(|| Grant {
                resource: lock.resource.clone(),
                desc: None,
                pending: None,
                since: now,
                version,
                lost: false,
            });
            if let Some(old) = grant.desc.replace(desc) {
                fx.close.push(old);
            }
            let holders = self.index.entry(lock.key).or_default();
            if !holders.iter().any(|u| u == &uuid) {
                holders.push(uuid.clone());
            }
        }
        // Grants the holder did not hand back were lost with it: forget them.
        if let Some(owner) = self.owners.get_mut(&uuid) {
            let lost: Vec<LockKey> = owner
                .grants
                .iter()
                .filter(|(_, g)| g.desc.is_none() && g.pending.is_none())
                .map(|(k, _)| *k)
                .collect();
            for key in lost {
                owner.grants.remove(&key);
                unindex(&mut self.index, key, &uuid);
            }
        }
        fx.changed.insert(uuid);
        (Ok(()), fx)
    }

    /// First half of an acquire by `caller` for VM `uuid`: checks ownership and the table,
    /// clears owners whose guest is gone, takes the kernel locks and marks the grants pending.
    /// Every refusal leaves the table and the kernel as they were; the caller closes the opened
    /// descriptions it gets back.
    #[allow(clippy::type_complexity)]
    pub fn reserve(
        &mut self,
        host: &mut H,
        caller: Caller,
        uuid: &str,
        opened: Vec<Opened<H::Desc>>,
        flags: &AcquireFlags,
    ) -> (Result<Option<Reservation<H::Desc>>, Refusal>, Fx<H>) {
        let mut fx = Fx::<H>::default();
        let mut leftovers = Vec::new();
        let result = self.reserve_inner(host, caller, uuid, opened, flags, &mut fx, &mut leftovers);
        for o in leftovers {
            fx.close.push(o.desc);
            fx.close.extend(o.image);
        }
        (result, fx)
    }

    #[allow(clippy::too_many_arguments)]
    fn reserve_inner(
        &mut self,
        host: &mut H,
        caller: Caller,
        uuid: &str,
        opened: Vec<Opened<H::Desc>>,
        flags: &AcquireFlags,
        fx: &mut Fx<H>,
        leftovers: &mut Vec<Opened<H::Desc>>,
    ) -> Result<Option<Reservation<H::Desc>>, Refusal> {
        let owner = match self.owner(uuid) {
            Ok(o) => o,
            Err(e) => {
                leftovers.extend(opened);
                return Err(e.into());
            }
        };
        if !owner.is_holder(caller) {
            let e = not_holder("an acquire", &owner.label(), caller, owner.holder.pid);
            leftovers.extend(opened);
            return Err(e.into());
        }
        let Some(link) = owner.link.filter(|_| !owner.orphaned) else {
            let e = Error::ServiceUnavailable {
                reason: format!(
                    "the supervisor keeping the locks of VM \"{}\" is not connected",
                    owner.vm.name
                ),
            };
            leftovers.extend(opened);
            return Err(e.into());
        };
        if owner.migration.is_some() && !flags.register_only {
            // The destination took copies of the descriptions at `acquire_incoming`: a lock
            // taken now would pass to it without a copy it keeps, held by the daemon alone.
            let e =
                Error::invalid_state("acquire", format!("VM \"{}\" is migrating", owner.vm.name));
            leftovers.extend(opened);
            return Err(e.into());
        }
        if let Err(e) = opened.iter().try_for_each(|o| o.resource.validate()) {
            leftovers.extend(opened);
            return Err(e.into());
        }
        let needs_lease = self.policy.require_lease_for_disks
            && opened.iter().any(|o| {
                matches!(
                    o.resource,
                    Resource::Disk {
                        mode: DiskMode::Exclusive,
                        ..
                    }
                )
            })
            && !opened
                .iter()
                .any(|o| matches!(o.resource, Resource::Lease(_)))
            && !owner
                .grants
                .values()
                .any(|g| matches!(g.resource, Resource::Lease(_)));
        if needs_lease && !flags.register_only {
            leftovers.extend(opened);
            return Err(Error::Config {
                source_name: "vmlockd configuration".into(),
                reason: "require_lease_for_disks is set and the VM has writable disks but no lease"
                    .into(),
            }
            .into());
        }
        if let Ok(owner) = self.owner_mut(uuid) {
            if !owner.flags_set {
                owner.flags = flags.clone();
                owner.flags_set = true;
                fx.changed.insert(uuid.to_owned());
            }
        }
        if flags.register_only {
            leftovers.extend(opened);
            return Ok(None);
        }
        // Table checks first, for every resource: nothing is taken unless all are free.
        let mut wanted: Vec<Opened<H::Desc>> = Vec::new();
        for o in opened {
            if !o.resource.is_locked() {
                leftovers.push(o);
                continue;
            }
            if let Some(mine) = self.owners.get(uuid).and_then(|w| w.grants.get(&o.key)) {
                if kind_of(&mine.resource) == kind_of(&o.resource) {
                    leftovers.push(o); // same owner, same lock: idempotent
                    continue;
                }
                let e = Error::InvalidResource {
                    resource: o.resource.label(),
                    reason: format!(
                        "already held by this VM as {}; release it first",
                        mine.resource
                    ),
                };
                leftovers.push(o);
                leftovers.append(&mut wanted);
                return Err(e.into());
            }
            if wanted.iter().any(|w| w.key == o.key) {
                leftovers.push(o);
                continue;
            }
            if let Err(e) = self.check_free(host, uuid, &o, fx) {
                leftovers.push(o);
                leftovers.append(&mut wanted);
                return Err(e.into());
            }
            wanted.push(o);
        }
        if wanted.is_empty() {
            return Ok(None);
        }
        // The kernel: take every lock; on a refusal, drop what this acquire took.
        let mut taken: Vec<usize> = Vec::new();
        let mut refusal = None;
        for (i, o) in wanted.iter().enumerate() {
            match self.take_in_kernel(host, o, flags) {
                Ok(()) => taken.push(i),
                Err(r) => {
                    refusal = Some(r);
                    break;
                }
            }
        }
        if let Some(r) = refusal {
            for i in taken {
                host.unlock(&wanted[i].desc);
            }
            leftovers.append(&mut wanted);
            return Err(r);
        }
        // Copies for the holder, then mark pending.
        let mut handover = Vec::with_capacity(wanted.len());
        for o in &wanted {
            match host.duplicate(&o.desc) {
                Ok(copy) => handover.push((
                    HeldLock {
                        resource: o.resource.clone(),
                        key: o.key,
                    },
                    copy,
                )),
                Err(e) => {
                    for o in &wanted {
                        host.unlock(&o.desc);
                    }
                    fx.close.extend(handover.into_iter().map(|(_, d)| d));
                    leftovers.append(&mut wanted);
                    return Err(Error::io("duplicating a lock description", &e).into());
                }
            }
        }
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        let now = host.now();
        let Some(owner) = self.owners.get_mut(uuid) else {
            leftovers.append(&mut wanted);
            return Err(unknown_owner(uuid).into());
        };
        for o in wanted {
            owner.grants.insert(
                o.key,
                Grant {
                    resource: o.resource,
                    desc: Some(o.desc),
                    pending: Some(ticket),
                    since: now,
                    version: 0,
                    lost: false,
                },
            );
            fx.close.extend(o.image);
            self.index.entry(o.key).or_default().push(uuid.to_owned());
        }
        Ok(Some(Reservation {
            ticket,
            link,
            direct: flags.reply_with_fds,
            handover,
        }))
    }

    /// The table's view of key `o.key`: refuses if another VM holds or reserved it in a
    /// conflicting mode; forgets owners whose guest has exited on the way.
    fn check_free(
        &mut self,
        host: &mut H,
        uuid: &str,
        o: &Opened<H::Desc>,
        fx: &mut Fx<H>,
    ) -> Result<(), Error> {
        let kind = kind_of(&o.resource);
        let others: Vec<String> = self
            .index
            .get(&o.key)
            .map(|v| v.iter().filter(|u| *u != uuid).cloned().collect())
            .unwrap_or_default();
        for other in others {
            let Some(owner) = self.owners.get_mut(&other) else {
                continue;
            };
            if host.has_exited(&owner.guest.handle) {
                // Cleared now rather than when the watcher gets to it.
                let more = self.remove_owner(host, &other);
                fx.absorb(more);
                continue;
            }
            let theirs = owner.grants.get(&o.key).map(|g| kind_of(&g.resource));
            if kind == LockKind::Exclusive || theirs == Some(LockKind::Exclusive) {
                return Err(Error::Busy {
                    resource: o.resource.label(),
                    holder: ForeignHolder::Vm(owner.holder_identity(&self.host_name)),
                });
            }
        }
        Ok(())
    }

    fn take_in_kernel(
        &self,
        host: &mut H,
        o: &Opened<H::Desc>,
        flags: &AcquireFlags,
    ) -> Result<(), Refusal> {
        let kind = kind_of(&o.resource);
        let label = o.resource.label();
        let io = |e: std::io::Error| Refusal::Error(Error::io(format!("locking {label}"), &e));
        if self.policy.sabotage == Sabotage::SkipKernelLock {
            return Ok(());
        }
        if !host.try_lock(&o.desc, kind, o.key.byte).map_err(io)? {
            let posix_pid = host.probe(&o.desc, o.key.byte).and_then(|c| c.posix_pid);
            let what = match posix_pid {
                Some(_) => format!("POSIX lock on byte {} (as virtlockd takes)", o.key.byte),
                None => format!("lock on byte {}", o.key.byte),
            };
            return Err(Refusal::Foreign {
                resource: o.resource.label(),
                key: o.key,
                what,
                posix_pid,
            });
        }
        let undo = |host: &mut H, r: Refusal| {
            host.unlock(&o.desc);
            Err(r)
        };
        // A QEMU writing the image outside vmlock (its lock bytes), probed on the image.
        if let Resource::Disk { mode, .. } = &o.resource {
            let image = if self.policy.indirect {
                o.image.as_ref()
            } else {
                Some(&o.desc)
            };
            if let Some(image) = image {
                for (byte, what) in [
                    (QEMU_WRITE_BYTE, "QEMU write lock (byte 101)"),
                    (
                        QEMU_NO_SHARED_WRITE_BYTE,
                        "QEMU no-shared-write lock (byte 201)",
                    ),
                ] {
                    // A shared disk tolerates writers that share write (101) but not byte 201.
                    if *mode == DiskMode::Shared && byte == QEMU_WRITE_BYTE {
                        continue;
                    }
                    if host.probe(image, byte).is_some() {
                        return undo(
                            host,
                            Refusal::Foreign {
                                resource: o.resource.label(),
                                key: LockKey { byte, ..o.key },
                                what: what.into(),
                                posix_pid: None,
                            },
                        );
                    }
                }
            }
        }
        if flags.hold_qemu_bytes
            && o.key.byte == 0
            && matches!(
                o.resource,
                Resource::Disk {
                    mode: DiskMode::Exclusive,
                    ..
                }
            )
        {
            for byte in QEMU_WRITER_BYTES {
                // Shared, exactly as a read-write QEMU holds them.
                match host.try_lock(&o.desc, LockKind::Shared, byte) {
                    Ok(true) => {}
                    Ok(false) => {
                        return undo(
                            host,
                            Refusal::Foreign {
                                resource: o.resource.label(),
                                key: LockKey { byte, ..o.key },
                                what: format!("lock on QEMU byte {byte}"),
                                posix_pid: None,
                            },
                        )
                    }
                    Err(e) => return undo(host, io(e)),
                }
            }
        }
        Ok(())
    }

    /// Second half of an acquire: the holder keeps its copies, so the grants are committed (a
    /// version bump for a lock another VM held last). Fails if the VM went away meanwhile (its
    /// locks were then dropped with it).
    pub fn commit(
        &mut self,
        uuid: &str,
        ticket: Ticket,
    ) -> (Result<Vec<HeldResource>, Error>, Fx<H>) {
        let mut fx = Fx::<H>::default();
        let Some(owner) = self.owners.get_mut(uuid) else {
            return (Err(gone_during_acquire(uuid)), fx);
        };
        let keys: Vec<LockKey> = owner
            .grants
            .iter()
            .filter(|(_, g)| g.pending == Some(ticket))
            .map(|(k, _)| *k)
            .collect();
        if keys.is_empty() {
            return (Err(gone_during_acquire(uuid)), fx);
        }
        let mut granted = Vec::new();
        for key in keys {
            let entry = self
                .versions
                .entry(key)
                .or_insert_with(|| (uuid.to_owned(), 1));
            if entry.0 != uuid {
                entry.0 = uuid.to_owned();
                entry.1 += 1;
            }
            let version = entry.1;
            if let Some(g) = owner.grants.get_mut(&key) {
                g.pending = None;
                g.version = version;
                granted.push(HeldResource {
                    resource: g.resource.clone(),
                    version,
                    since: g.since,
                    confirmed: true,
                    lost: false,
                });
            }
        }
        fx.changed.insert(uuid.to_owned());
        (Ok(granted), fx)
    }

    /// The holder did not take the copies: unlock and forget what `ticket` reserved. Nothing stays
    /// held.
    pub fn abort(&mut self, host: &mut H, uuid: &str, ticket: Ticket) -> Fx<H> {
        let mut fx = Fx::<H>::default();
        let Some(owner) = self.owners.get_mut(uuid) else {
            return fx;
        };
        let keys: Vec<LockKey> = owner
            .grants
            .iter()
            .filter(|(_, g)| g.pending == Some(ticket))
            .map(|(k, _)| *k)
            .collect();
        for key in &keys {
            if let Some(g) = owner.grants.remove(key) {
                if let Some(d) = g.desc {
                    host.unlock(&d);
                    fx.close.push(d);
                }
            }
            unindex(&mut self.index, *key, uuid);
        }
        if let (Some(link), false) = (owner.link, keys.is_empty()) {
            // The holder may have kept some copies before failing: they hold nothing now, and it
            // should not keep them open.
            fx.pushes.push((link, Push::Close(keys)));
        }
        fx
    }

    /// Releases `resources` of VM `uuid` (everything when `None`), asked by its holder `caller`.
    /// With `holder_drops`, the holder closes its own copies and is not told to.
    pub fn release(
        &mut self,
        host: &mut H,
        caller: Caller,
        uuid: &str,
        resources: Option<&[Resource]>,
        holder_drops: bool,
    ) -> (Result<Vec<HeldResource>, Error>, Fx<H>) {
        let mut fx = Fx::<H>::default();
        if let Err(e) = self.check_holder(uuid, caller, "a release") {
            return (Err(e), fx);
        }
        let Some(owner) = self.owners.get_mut(uuid) else {
            return (Err(unknown_owner(uuid)), fx);
        };
        let mut keys = Vec::new();
        let mut failures = Vec::new();
        match resources {
            None => keys.extend(
                owner
                    .grants
                    .iter()
                    .filter(|(_, g)| g.pending.is_none())
                    .map(|(k, _)| *k),
            ),
            Some(list) => {
                for r in list.iter().filter(|r| r.is_locked()) {
                    let found = owner
                        .grants
                        .iter()
                        .find(|(_, g)| {
                            g.pending.is_none()
                                && (g.resource == *r || g.resource.path() == r.path())
                        })
                        .map(|(k, _)| *k);
                    match found {
                        Some(k) => keys.push(k),
                        None => failures.push(vmlock::ResourceFailure {
                            resource: r.label(),
                            error: Box::new(Error::NotHeld {
                                resource: r.label(),
                                owner: owner.label(),
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
            if grant.desc.is_none() {
                failures.push(vmlock::ResourceFailure {
                    resource: grant.resource.label(),
                    error: Box::new(Error::ServiceUnavailable {
                        reason:
                            "waiting for the VM's supervisor to reconnect after a daemon restart"
                                .into(),
                    }),
                });
                continue;
            }
            let Some(grant) = owner.grants.remove(&key) else {
                continue;
            };
            if let Some(d) = grant.desc {
                host.unlock(&d);
                fx.close.push(d);
            }
            released.push(HeldResource {
                resource: grant.resource,
                version: grant.version,
                since: grant.since,
                confirmed: true,
                lost: false,
            });
            closed.push(key);
            unindex(&mut self.index, key, uuid);
        }
        if let (Some(link), false) = (owner.link, holder_drops || closed.is_empty()) {
            fx.pushes.push((link, Push::Close(closed)));
        }
        fx.changed.insert(uuid.to_owned());
        if failures.is_empty() {
            (Ok(released), fx)
        } else {
            (Err(Error::PartialRelease { failures }), fx)
        }
    }

    /// The holder says its guest `guest_pid` ended: forget the VM. Refused while that guest runs.
    pub fn shutdown(
        &mut self,
        host: &mut H,
        caller: Caller,
        uuid: &str,
        guest_pid: u32,
    ) -> (Result<Vec<HeldResource>, Error>, Fx<H>) {
        let fx = Fx::<H>::default();
        let Some(owner) = self.owners.get_mut(uuid) else {
            return (Ok(Vec::new()), fx);
        };
        if !owner.is_holder(caller) {
            let e = not_holder("a shutdown", &owner.label(), caller, owner.holder.pid);
            return (Err(e), fx);
        }
        if owner.vm.pid != guest_pid {
            return (Ok(Vec::new()), fx); // it runs as another guest now (migrated here)
        }
        if !host.has_exited(&owner.guest.handle) && owner.guest.pid != caller.pid {
            let e = Error::GuestRunning {
                vm: owner.vm.name.clone(),
                pid: owner.guest.pid,
            };
            return (Err(e), fx);
        }
        self.release(host, caller, uuid, None, false)
    }

    /// Holder `caller` of VM `uuid` names its guest `guest`, which must be its child (a
    /// supervisor started it) or its parent (the guest-to-be started the holder).
    pub fn guest_started(
        &mut self,
        caller: Caller,
        uuid: &str,
        guest: ProcInfo<H::Proc>,
    ) -> Result<Fx<H>, Error> {
        let mut fx = Fx::<H>::default();
        let owner = self.owner_mut(uuid)?;
        let not_child = |who: &str| Error::PermissionDenied {
            reason: format!(
                "process {} is neither a child nor the parent of the {who}",
                guest.pid
            ),
        };
        if let Some(incoming) = owner.migration.as_mut().and_then(|m| m.incoming.as_mut()) {
            if incoming.holder.is(caller) {
                if !guest.guarded_by(caller) {
                    return Err(not_child("destination supervisor"));
                }
                incoming.guest = Guest::from(guest);
                fx.rewatch = true;
                return Ok(fx);
            }
        }
        if !owner.is_holder(caller) {
            return Err(not_holder(
                "naming the guest",
                &owner.label(),
                caller,
                owner.holder.pid,
            ));
        }
        if !guest.guarded_by(caller) {
            return Err(not_child(&format!(
                "supervisor of VM \"{}\"",
                owner.vm.name
            )));
        }
        owner.vm.pid = guest.pid;
        owner.guest = Guest::from(guest);
        fx.rewatch = true;
        fx.changed.insert(uuid.to_owned());
        Ok(fx)
    }

    /// Forgets VM `uuid`, unlocking everything it held — unless a migration destination keeps
    /// copies of every description, which then becomes the owner.
    fn remove_owner(&mut self, host: &mut H, uuid: &str) -> Fx<H> {
        let mut fx = Fx::<H>::default();
        let handover = self
            .owners
            .get_mut(uuid)
            .and_then(|o| o.migration.as_mut())
            .and_then(|m| m.incoming.as_mut())
            .map(|i| (i.taken, i.guest.pid));
        if let Some((true, _)) = handover {
            let alive = self
                .owners
                .get(uuid)
                .and_then(|o| o.migration.as_ref())
                .and_then(|m| m.incoming.as_ref())
                .is_some_and(|i| !host.has_exited(&i.guest.handle));
            if alive {
                if let Ok(more) = self.finish_migration(uuid) {
                    return more;
                }
            }
        }
        let Some(owner) = self.owners.remove(uuid) else {
            return fx;
        };
        fx.gone.push((owner.vm.clone(), owner.grants.len()));
        for (key, grant) in owner.grants {
            if let Some(d) = grant.desc {
                // The holder may still have a copy of the description: unlock, do not just close.
                host.unlock(&d);
                fx.close.push(d);
            }
            unindex(&mut self.index, key, uuid);
        }
        if let Some(link) = owner.link {
            fx.pushes.push((link, Push::Finished));
        }
        if let Some(i) = owner.migration.and_then(|m| m.incoming) {
            fx.pushes.push((i.link, Push::Finished));
        }
        fx.changed.insert(uuid.to_owned());
        fx.rewatch = true;
        fx
    }

    /// Forgets VM `uuid` if `caller` is its holder and it holds nothing (a destination whose
    /// hand-over from another host was refused: it must be able to try again at once). Anything
    /// else changes nothing.
    pub fn forget_empty(&mut self, caller: Caller, uuid: &str) -> Fx<H> {
        let mut fx = Fx::<H>::default();
        let empty = self
            .owners
            .get(uuid)
            .is_some_and(|o| o.is_holder(caller) && o.grants.is_empty() && o.migration.is_none());
        if !empty {
            return fx;
        }
        if let Some(owner) = self.owners.remove(uuid) {
            if let Some(link) = owner.link {
                fx.pushes.push((link, Push::Finished));
            }
            fx.changed.insert(uuid.to_owned());
            fx.rewatch = true;
        }
        fx
    }

    /// Holder connection `link` closed; `holder_alive` says whether its process still runs.
    /// A live holder will reconnect (locks kept). A dead holder's guest keeps its locks until it
    /// has exited; if it still runs it is killed first.
    pub fn holder_closed(&mut self, host: &mut H, link: LinkId, holder_alive: bool) -> Fx<H> {
        let mut fx = Fx::<H>::default();
        // A migration destination that went away: the source keeps everything.
        for owner in self.owners.values_mut() {
            if let Some(m) = owner.migration.as_mut() {
                if m.incoming.as_ref().is_some_and(|i| i.link == link) {
                    m.incoming = None;
                    fx.rewatch = true;
                    return fx;
                }
            }
        }
        let Some(uuid) = self
            .owners
            .iter()
            .find(|(_, o)| o.link == Some(link))
            .map(|(u, _)| u.clone())
        else {
            return fx;
        };
        let guest_gone = self
            .owners
            .get_mut(&uuid)
            .is_some_and(|o| host.has_exited(&o.guest.handle));
        if guest_gone || self.policy.sabotage == Sabotage::UnlockOnHolderClose {
            return self.remove_owner(host, &uuid);
        }
        let Some(owner) = self.owners.get_mut(&uuid) else {
            return fx;
        };
        owner.link = None;
        if !holder_alive && owner.guest.pid != owner.holder.pid {
            // A grant never outlives its guest, and a guest never runs without its grant: kill
            // the guest, unlock when it has exited.
            owner.orphaned = true;
            let taken = owner
                .migration
                .as_ref()
                .and_then(|m| m.incoming.as_ref())
                .is_some_and(|i| i.taken);
            if taken {
                // The destination keeps copies: hand over instead of killing anything.
                if let Ok(more) = self.finish_migration(&uuid) {
                    return more;
                }
            }
            if let Some(owner) = self.owners.get(&uuid) {
                fx.kill.push((owner.guest.pid, owner.guest.start_time));
            }
        }
        fx
    }

    /// The guest of `uuid` that started at `start_time` may have exited (its handle fired).
    pub fn guest_exited(&mut self, host: &mut H, uuid: &str, start_time: u64) -> Fx<H> {
        let fx = Fx::<H>::default();
        let Some(owner) = self.owners.get_mut(uuid) else {
            return fx;
        };
        if let Some(m) = owner.migration.as_mut() {
            if let Some(i) = m.incoming.as_ref() {
                if i.guest.start_time == start_time
                    && i.guest.pid != owner.guest.pid
                    && host.has_exited(&i.guest.handle)
                {
                    // The destination's guest died: the source keeps everything.
                    let link = i.link;
                    m.incoming = None;
                    let mut fx = fx;
                    fx.pushes.push((link, Push::Finished));
                    fx.rewatch = true;
                    return fx;
                }
            }
        }
        if owner.guest.start_time != start_time || !host.has_exited(&owner.guest.handle) {
            return fx;
        }
        self.remove_owner(host, uuid)
    }

    /// Source side: the versions to hand to the destination; marks the VM as migrating.
    /// `token` is a fresh secret (the daemon draws it from the kernel's random source); a
    /// migration already prepared keeps the one it handed out. Returns what the destination needs:
    /// the versions and the secret.
    pub fn migrate_prepare(
        &mut self,
        caller: Caller,
        uuid: &str,
        token: String,
    ) -> Result<(Vec<HeldResource>, String), Error> {
        self.check_holder(uuid, caller, "a migration")?;
        let owner = self.owner_mut(uuid)?;
        if owner
            .grants
            .values()
            .any(|g| g.desc.is_none() || g.pending.is_some())
        {
            return Err(Error::ServiceUnavailable {
                reason:
                    "the VM's locks are not all confirmed (a restart or an acquire in progress)"
                        .into(),
            });
        }
        let token = owner
            .migration
            .get_or_insert_with(|| Migration {
                incoming: None,
                token,
            })
            .token
            .clone();
        Ok((held(owner), token))
    }

    /// Destination side: registers holder `caller` (connection `link`) for VM `vm`, migrating in.
    pub fn hold_incoming(
        &mut self,
        caller: Caller,
        link: LinkId,
        vm: &VmIdentity,
        guest: ProcInfo<H::Proc>,
    ) -> Result<Fx<H>, Error> {
        if !guest.guarded_by(caller) {
            return Err(Error::PermissionDenied {
                reason: format!(
                    "process {} is neither the destination holder (pid {}) nor its child or parent",
                    guest.pid, caller.pid
                ),
            });
        }
        let host_name = self.host_name.clone();
        let owner = self
            .owners
            .get_mut(&vm.uuid)
            .ok_or_else(|| not_migrating(&vm.uuid))?;
        let migration = owner
            .migration
            .as_mut()
            .ok_or_else(|| not_migrating(&vm.uuid))?;
        let mut fx = Fx::<H> {
            rewatch: true,
            ..Default::default()
        };
        match &migration.incoming {
            // The same process retrying (say after a refused state) replaces its registration.
            Some(i) if i.holder.is(caller) && !i.taken => {
                fx.pushes.push((i.link, Push::Finished));
            }
            Some(_) => {
                return Err(Error::OwnerExists {
                    uuid: vm.uuid.clone(),
                    holder: owner.holder_identity(&host_name),
                })
            }
            None => {}
        }
        migration.incoming = Some(Incoming {
            link,
            holder: caller,
            guest: Guest::from(guest),
            taken: false,
        });
        Ok(fx)
    }

    /// Destination side, first half: if `versions` are current, copies of the source's very
    /// descriptions for the destination's holder (pushed outside the table, then
    /// [`LockTable::incoming_taken`]).
    pub fn acquire_incoming(
        &mut self,
        host: &mut H,
        caller: Caller,
        uuid: &str,
        versions: &[(Resource, u64)],
        token: Option<&str>,
    ) -> Result<Handover<H::Desc>, Error> {
        let owner = self.owners.get(uuid).ok_or_else(|| not_migrating(uuid))?;
        let migration = owner
            .migration
            .as_ref()
            .ok_or_else(|| not_migrating(uuid))?;
        let incoming = migration
            .incoming
            .as_ref()
            .ok_or_else(|| not_migrating(uuid))?;
        if !incoming.holder.is(caller) {
            return Err(not_holder(
                "taking the leases over",
                &owner.label(),
                caller,
                incoming.holder.pid,
            ));
        }
        let stale = |reason: String| Error::InvalidLockState {
            reason: format!("stale or forged migration state: {reason}"),
        };
        // The versions are no secret (`status` shows them); the source's hand-over token is.
        if token != Some(migration.token.as_str()) {
            return Err(stale(
                "it does not carry the hand-over token of the source's migrate-prepare".into(),
            ));
        }
        let mut handover = Vec::new();
        let mut refused = None;
        for (resource, version) in versions {
            let Some((key, grant)) = owner.grants.iter().find(|(_, g)| g.resource == *resource)
            else {
                refused = Some(stale(format!(
                    "{} is not held by the source",
                    resource.label()
                )));
                break;
            };
            if grant.version != *version || grant.pending.is_some() {
                refused = Some(stale(format!(
                    "{} is at version {}, the state says {version}",
                    resource.label(),
                    grant.version
                )));
                break;
            }
            let Some(desc) = grant.desc.as_ref() else {
                refused = Some(Error::ServiceUnavailable {
                    reason: "the source's supervisor has not reconnected".into(),
                });
                break;
            };
            match host.duplicate(desc) {
                Ok(copy) => handover.push((
                    HeldLock {
                        resource: grant.resource.clone(),
                        key: *key,
                    },
                    copy,
                )),
                Err(e) => {
                    refused = Some(Error::io("duplicating a lock description", &e));
                    break;
                }
            }
        }
        if refused.is_none() && handover.len() != owner.grants.len() {
            let missing: Vec<String> = owner
                .grants
                .values()
                .filter(|g| !versions.iter().any(|(r, _)| *r == g.resource))
                .map(|g| g.resource.label())
                .collect();
            refused = Some(stale(format!("it leaves out {}", missing.join(", "))));
        }
        match refused {
            // Dropping copies of descriptions the source keeps unlocks nothing.
            Some(e) => Err(e),
            None => Ok(Handover {
                link: incoming.link,
                handover,
            }),
        }
    }

    /// Destination side, second half: its holder keeps the copies.
    pub fn incoming_taken(&mut self, uuid: &str, link: LinkId) -> Result<Vec<HeldResource>, Error> {
        let owner = self.owner_mut(uuid)?;
        let incoming = owner
            .migration
            .as_mut()
            .and_then(|m| m.incoming.as_mut())
            .filter(|i| i.link == link)
            .ok_or_else(|| not_migrating(uuid))?;
        incoming.taken = true;
        Ok(held(owner))
    }

    /// Ends a migration, asked by the source's holder (or by the destination's, to cancel). A
    /// success with no migration in progress (never prepared, already ended, or cancelled by a
    /// daemon restart) is refused: an Ok would tell the VM manager that the destination owns the
    /// VM, and it would end the source, whose shutdown releases the disks under the destination.
    pub fn migrate_complete(
        &mut self,
        caller: Caller,
        uuid: &str,
        success: bool,
    ) -> (Result<(), Error>, Fx<H>) {
        self.complete(caller, uuid, success, true)
    }

    /// [`LockTable::migrate_complete`], where a success with no migration in progress is a no-op:
    /// a destination confirming a hand-off that the source's finish already carried out (or a
    /// client that does not say which side it is).
    pub fn migrate_complete_idempotent(
        &mut self,
        caller: Caller,
        uuid: &str,
        success: bool,
    ) -> (Result<(), Error>, Fx<H>) {
        self.complete(caller, uuid, success, false)
    }

    fn complete(
        &mut self,
        caller: Caller,
        uuid: &str,
        success: bool,
        strict: bool,
    ) -> (Result<(), Error>, Fx<H>) {
        let mut fx = Fx::<H>::default();
        let Some(owner) = self.owners.get_mut(uuid) else {
            if success && strict {
                return (Err(not_in_progress(uuid)), fx);
            }
            return (Ok(()), fx);
        };
        let is_destination = owner
            .migration
            .as_ref()
            .and_then(|m| m.incoming.as_ref())
            .is_some_and(|i| i.holder.is(caller));
        if !owner.is_holder(caller) && !is_destination {
            let e = not_holder(
                "ending a migration",
                &owner.label(),
                caller,
                owner.holder.pid,
            );
            return (Err(e), fx);
        }
        if owner.migration.is_none() {
            if success && strict {
                return (Err(not_in_progress(&owner.label())), fx);
            }
            // A cancel is idempotent.
            return (Ok(()), fx);
        }
        // Only the source may say the migration succeeded (it gives up first, see
        // `vmlock::domain::migration_finish`): any root process can register as the destination
        // of a prepared migration and read the versions from `status`, so a destination's word
        // would let it take a running VM's disks. A destination may still cancel.
        if success && !owner.is_holder(caller) {
            let e = not_holder(
                "finishing a migration",
                &owner.label(),
                caller,
                owner.holder.pid,
            );
            return (Err(e), fx);
        }
        let taken = owner
            .migration
            .as_ref()
            .and_then(|m| m.incoming.as_ref())
            .is_some_and(|i| i.taken);
        if !success || !taken {
            if let Some(i) = owner.migration.take().and_then(|m| m.incoming) {
                // The destination drops its copies; nothing is unlocked. Told even when this call
                // fails (a success the destination had not earned), since the migration ends
                // either way (a regression: the push was lost with the error).
                fx.pushes.push((i.link, Push::Finished));
            }
            fx.rewatch = true;
            if success {
                let e = Error::invalid_state(
                    "finish the migration",
                    "the destination has not taken the leases over; the migration is cancelled and the source keeps them",
                );
                return (Err(e), fx);
            }
            return (Ok(()), fx);
        }
        match self.finish_migration(uuid) {
            Ok(fx) => (Ok(()), fx),
            Err(e) => (Err(e), fx),
        }
    }

    /// The destination (which keeps copies of everything) becomes the owner.
    fn finish_migration(&mut self, uuid: &str) -> Result<Fx<H>, Error> {
        let mut fx = Fx::<H>::default();
        let owner = self.owner_mut(uuid)?;
        let incoming = owner
            .migration
            .take()
            .and_then(|m| m.incoming)
            .filter(|i| i.taken)
            .ok_or_else(|| not_migrating(uuid))?;
        let old = owner.link.replace(incoming.link);
        owner.holder = incoming.holder;
        owner.vm.pid = incoming.guest.pid;
        owner.guest = incoming.guest;
        owner.orphaned = false;
        // New generation: the state the source handed out is stale from now on.
        let mut bumped = Vec::new();
        for (key, grant) in owner.grants.iter_mut() {
            grant.version += 1;
            bumped.push((*key, grant.version));
        }
        for (key, version) in bumped {
            self.versions.insert(key, (uuid.to_owned(), version));
        }
        if let Some(old) = old {
            // The source drops its copies; the destination's keep the locks.
            fx.pushes.push((old, Push::Finished));
        }
        fx.changed.insert(uuid.to_owned());
        fx.rewatch = true;
        Ok(fx)
    }

    /// What VM `uuid` holds.
    pub fn inquire(&self, uuid: &str) -> Result<Vec<HeldResource>, Error> {
        self.owner(uuid).map(held)
    }

    /// VM `uuid`'s identity.
    pub fn lookup(&self, uuid: &str) -> Result<VmIdentity, Error> {
        self.owner(uuid).map(|o| o.vm.clone())
    }

    /// Whether VM `uuid` has a migration prepared on this host (its source is here).
    pub fn is_migrating(&self, uuid: &str) -> bool {
        self.owners.get(uuid).is_some_and(|o| o.migration.is_some())
    }

    /// The holder process of VM `uuid`.
    pub fn holder_pid(&self, uuid: &str) -> Option<u32> {
        self.owners.get(uuid).map(|o| o.holder.pid)
    }

    /// Everything, sorted by VM name.
    pub fn status(&self) -> Vec<OwnerStatus> {
        let mut all: Vec<OwnerStatus> = self
            .owners
            .values()
            .map(|o| OwnerStatus {
                vm: o.vm.clone(),
                holder_pid: o.link.map(|_| o.holder.pid),
                resources: held(o),
            })
            .collect();
        all.sort_by(|a, b| a.vm.name.cmp(&b.vm.name).then(a.vm.uuid.cmp(&b.vm.uuid)));
        all
    }

    /// Every guest to watch: `(uuid, start time, handle)`, the destination guests of migrations
    /// included.
    pub fn watched(&self) -> Vec<(&str, u64, &H::Proc)> {
        let mut all = Vec::new();
        for (u, o) in &self.owners {
            all.push((u.as_str(), o.guest.start_time, &o.guest.handle));
            if let Some(i) = o.migration.as_ref().and_then(|m| m.incoming.as_ref()) {
                all.push((u.as_str(), i.guest.start_time, &i.guest.handle));
            }
        }
        all
    }

    /// Every confirmed grant whose storage should be checked: `(uuid, key, resource)`.
    pub fn lease_targets(&self) -> Vec<(String, LockKey, Resource)> {
        let mut all = Vec::new();
        for (u, o) in &self.owners {
            for (k, g) in &o.grants {
                if !g.lost && g.desc.is_some() && g.pending.is_none() {
                    all.push((u.clone(), *k, g.resource.clone()));
                }
            }
        }
        all
    }

    /// `findings` (checked outside the table) are leases lost under running guests; marks each
    /// once and returns what to do per VM.
    pub fn leases_lost(&mut self, findings: &[(String, LockKey)]) -> Vec<LostLease> {
        let mut lost: Vec<LostLease> = Vec::new();
        for (uuid, key) in findings {
            let Some(owner) = self.owners.get_mut(uuid) else {
                continue;
            };
            let Some(grant) = owner.grants.get_mut(key) else {
                continue;
            };
            if grant.lost {
                continue;
            }
            grant.lost = true;
            let label = grant.resource.label();
            match lost.iter_mut().find(|l| &l.vm.uuid == uuid) {
                Some(l) => l.resources.push(label),
                None => lost.push(LostLease {
                    vm: owner.vm.clone(),
                    start_time: owner.guest.start_time,
                    resources: vec![label],
                    flags: owner.flags.clone(),
                }),
            }
        }
        lost
    }

    /// VM `uuid` as persisted; `None` if it is gone.
    pub fn persisted_owner(&self, uuid: &str) -> Option<PersistedOwner> {
        self.owners.get(uuid).map(|o| PersistedOwner {
            vm: o.vm.clone(),
            holder_pid: o.holder.pid,
            holder_start: Some(o.holder.start_time),
            start_time: o.guest.start_time,
            flags: o.flags.clone(),
            grants: o
                .grants
                .iter()
                .filter(|(_, g)| g.pending.is_none())
                .map(|(k, g)| (*k, g.resource.clone(), g.since, g.version))
                .collect(),
        })
    }

    /// The whole table as persisted.
    pub fn persisted(&self) -> Persisted {
        let mut owners: Vec<PersistedOwner> = self
            .owners
            .keys()
            .filter_map(|u| self.persisted_owner(u))
            .collect();
        owners.sort_by(|a, b| a.vm.uuid.cmp(&b.vm.uuid));
        let mut versions: Vec<(LockKey, String, u64)> = self
            .versions
            .iter()
            .map(|(k, (u, v))| (*k, u.clone(), *v))
            .collect();
        versions.sort();
        Persisted { owners, versions }
    }

    /// Rebuilds the table after a restart. `guest_of` opens each recorded guest (by pid and start
    /// time; `None` if it is gone or its pid now names another process): those owners are
    /// dropped, the others wait for their holder to hand the descriptions back.
    pub fn recover(
        &mut self,
        persisted: Persisted,
        mut guest_of: impl FnMut(u32, u64) -> Option<H::Proc>,
    ) -> usize {
        for (key, uuid, version) in persisted.versions {
            self.versions.insert(key, (uuid, version));
        }
        let mut kept = 0;
        for p in persisted.owners {
            let Some(handle) = guest_of(p.vm.pid, p.start_time) else {
                continue;
            };
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
                            desc: None,
                            pending: None,
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
                    guest: Guest {
                        pid: p.vm.pid,
                        start_time: p.start_time,
                        handle,
                    },
                    vm: p.vm,
                    holder: Caller {
                        pid: p.holder_pid,
                        // A record written before start times were kept names its holder by pid.
                        start_time: p.holder_start.unwrap_or(0),
                    },
                    link: None,
                    flags: p.flags,
                    flags_set: true,
                    grants,
                    migration: None,
                    orphaned: false,
                },
            );
            kept += 1;
        }
        kept
    }

    /// Every lock the table counts as held (pending included), for invariant checks:
    /// `(uuid, key, kind, confirmed)`.
    pub fn grants(&self) -> Vec<(&str, LockKey, LockKind, bool)> {
        let mut all = Vec::new();
        for (u, o) in &self.owners {
            for (k, g) in &o.grants {
                all.push((
                    u.as_str(),
                    *k,
                    kind_of(&g.resource),
                    g.desc.is_some() && g.pending.is_none(),
                ));
            }
        }
        all
    }

    /// What VM `uuid` holds or is acquiring (pending grants included): `(key, resource)`. A
    /// cluster backend keeps a key per grant and may drop only keys not listed here.
    pub fn vm_grants(&self, uuid: &str) -> Vec<(LockKey, Resource)> {
        self.owners.get(uuid).map_or_else(Vec::new, |o| {
            o.grants
                .iter()
                .map(|(k, g)| (*k, g.resource.clone()))
                .collect()
        })
    }

    /// The guest handle and holder pid of VM `uuid`, for invariant checks.
    pub fn guest_of(&self, uuid: &str) -> Option<(u32, u32)> {
        self.owners.get(uuid).map(|o| (o.guest.pid, o.holder.pid))
    }
}

fn gone_during_acquire(uuid: &str) -> Error {
    Error::ServiceUnavailable {
        reason: format!("VM {uuid} went away while its acquire was in progress; nothing is held"),
    }
}
