//! The simulated world: a daemon (the real [`LockTable`] plus the daemon's shell logic around it),
//! VMs with their holder (supervisor) and guest processes, a shared pool of disks, a rogue root
//! client that lies, and the faults. One [`World::step`] is one event; after each, the
//! invariants are checked against the simulated kernel, never against the table's own view.

use crate::kernel::{FileId, Kernel, KernelRef, LockSnapshot, Process, SimFd, SimHost, SimProc};
use crate::rng::Rng;
use std::collections::{BTreeMap, BTreeSet};
use vmlock::{DiskMode, LockFailureAction, Resource};
use vmlock_core::types::{AcquireFlags, HeldLock, LockKey, VmIdentity};
use vmlock_core::{
    Caller, Effects, LinkId, LockKind, LockTable, Opened, Persisted, Policy, ProcInfo, Push,
    Sabotage, Ticket,
};

/// The init process: parent of every supervisor.
const INIT_PID: u32 = 1;
/// The `st_dev` every simulated disk lives on.
const DEVICE: u64 = 42;

/// How a world is built.
#[derive(Debug, Clone)]
pub struct Config {
    /// VMs (each with its own supervisor and guest when running).
    pub vms: usize,
    /// Disks in the shared pool; the first two thirds exclusive, the rest shared.
    pub disks: usize,
    /// A deliberate bug in the core, to show the simulator catches it.
    pub sabotage: Sabotage,
    /// Settle (deliver everything, reconnect everyone) and check for leaked locks this often.
    pub settle_every: u64,
    /// Also try an attack the core has no defence against yet (docs/RELIABILITY.md, "Known
    /// gaps"): the rogue reads the current lock versions from `status` (root may) and hands
    /// them to `acquire_incoming` as a migration destination. Without it the rogue's versions
    /// are made up, always stale.
    pub gap_versions_from_status: bool,
    /// Also try the other known gap: a process that got a dead supervisor's pid speaks for its
    /// VM before the daemon has seen (or when it never sees) that supervisor's connection
    /// close. Without it, such a process speaks only once the daemon knows.
    pub gap_pid_reuse_window: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            vms: 5,
            disks: 8,
            sabotage: Sabotage::None,
            settle_every: 500,
            gap_versions_from_status: false,
            gap_pid_reuse_window: false,
        }
    }
}

/// Why a guest ended: the invariants allow some causes and not others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeathCause {
    /// The simulator's own fault (a guest crash).
    Fault,
    /// A clean shutdown.
    Shutdown,
    /// Its supervisor died (PDEATHSIG).
    ParentDied,
    /// The daemon's `kill` effect, after the supervisor died.
    KillEffect,
    /// The VM's own lock-failure action (poweroff) after its storage vanished.
    LockFailure,
    /// The migration finished elsewhere, or the destination was cancelled.
    Migration,
}

/// One description a holder keeps, and what it locks.
#[derive(Debug)]
struct Kept {
    lock: HeldLock,
    fd: SimFd,
    /// Handed over by an acquire not yet answered (the sim's own acquire id).
    pending: Option<u64>,
}

/// A supervisor process: keeps the descriptions, talks to the daemon over `link`.
#[derive(Debug)]
struct Holder {
    process: Process,
    link: Option<LinkId>,
    kept: Vec<Kept>,
    /// Answers pushes; a holder that stops acking makes acquires time out.
    acking: bool,
}

#[derive(Debug)]
struct Incoming {
    holder: Holder,
    guest: Process,
    taken: bool,
}

#[derive(Debug)]
struct Migration {
    /// What the source's prepare returned.
    versions: Vec<(Resource, u64)>,
    /// The hand-over secret it returned.
    token: String,
    incoming: Option<Incoming>,
}

/// One VM (or the rogue, which runs a process pair of its own and lies).
#[derive(Debug)]
struct Vm {
    uuid: String,
    name: String,
    id: u32,
    holder: Option<Holder>,
    guest: Option<Process>,
    /// The ground truth of who writes: disks this VM's guest was granted (acked and committed)
    /// and uses, until it releases them or exits.
    granted: BTreeMap<usize, LockKind>,
    flags: AcquireFlags,
    migration: Option<Migration>,
    /// The last release, to send again (a duplicated request).
    last_release: Option<Resource>,
    /// The last acquire, to send again.
    last_acquire: Vec<usize>,
}

#[derive(Debug)]
struct Disk {
    file: FileId,
    mode: DiskMode,
    /// Its storage vanished (NFS gone, file removed): opens fail, lease checks find it lost.
    gone: bool,
}

/// A notification to the daemon, delivered later and in any order (a connection's EOF, a pidfd
/// firing).
#[derive(Debug)]
enum Event {
    HolderClosed { link: LinkId, holder: Process },
    GuestExited { uuid: String, start_time: u64 },
}

#[derive(Debug)]
struct PendingAcquire {
    id: u64,
    slot: usize,
    uuid: String,
    ticket: Ticket,
    link: LinkId,
    handover: Vec<(HeldLock, SimFd)>,
}

#[derive(Debug)]
struct Daemon {
    table: LockTable<SimHost>,
}

/// What a refused request must leave as it was (owners whose guest has exited aside, since any
/// request may clear those).
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    persisted: String,
    locks: LockSnapshot,
    dead: BTreeSet<String>,
    /// Files (every byte: the disk's and QEMU's) the dead owners hold.
    dead_files: BTreeSet<FileId>,
}

/// The kinds of step, for choosing and counting.
pub const STEP_KINDS: &[(&str, u32)] = &[
    ("vm_start", 8),
    ("hotplug", 8),
    ("complete_acquire", 14),
    ("unplug", 5),
    ("shutdown", 3),
    ("guest_death", 2),
    ("supervisor_death", 2),
    ("connection_drop", 2),
    ("toggle_acking", 2),
    ("migrate", 8),
    ("migrate_cancel", 1),
    ("daemon_crash", 1),
    ("daemon_restart", 4),
    ("reconnect", 6),
    ("deliver_event", 12),
    ("storage_gone", 1),
    ("storage_back", 2),
    ("lease_check", 2),
    ("pid_churn", 3),
    ("lie", 10),
    ("duplicate", 4),
    ("reap", 4),
    ("delegate", 4),
];

/// The world.
#[derive(Debug)]
pub struct World {
    rng: Rng,
    kernel: KernelRef,
    host: SimHost,
    policy: Policy,
    daemon: Option<Daemon>,
    /// The daemon's state file: survives crashes (or not: see `daemon_crash`).
    state_file: Persisted,
    vms: Vec<Vm>,
    /// Index of the rogue in `vms`.
    rogue: usize,
    disks: Vec<Disk>,
    pending: Vec<PendingAcquire>,
    events: Vec<Event>,
    next_link: u64,
    next_acquire: u64,
    settle_every: u64,
    gap_versions_from_status: bool,
    gap_pid_reuse_window: bool,
    /// Step counter.
    pub step: u64,
    /// Steps and faults by kind.
    pub counts: BTreeMap<&'static str, u64>,
    /// The last steps, for a failure report.
    trace: Vec<String>,
}

/// The caller a request from `pid` carries, as the daemon reads it (`SO_PEERCRED`, then the
/// start time from `/proc`): that pid's live process; a dead pid matches nobody.
fn caller_of(kernel: &KernelRef, pid: u32) -> Caller {
    let start_time = kernel
        .borrow()
        .process(pid)
        .map_or(u64::MAX, |p| p.start_time);
    Caller { pid, start_time }
}

fn key_of(disk: usize) -> LockKey {
    LockKey {
        dev: DEVICE,
        ino: disk as u64 + 1,
        byte: 0,
    }
}

fn disk_of(key: &LockKey) -> Option<usize> {
    (key.dev == DEVICE && key.byte == 0 && key.ino > 0).then(|| key.ino as usize - 1)
}

fn kind_of(mode: DiskMode) -> LockKind {
    match mode {
        DiskMode::Shared => LockKind::Shared,
        _ => LockKind::Exclusive,
    }
}

/// What the daemon reads from `/proc` about a process it is told about: the live parent, so a
/// stale record cannot claim a child it no longer has.
fn proc_info(kernel: &KernelRef, p: &Process) -> ProcInfo<SimProc> {
    let ppid = kernel
        .borrow()
        .process(p.pid)
        .filter(|live| live.start_time == p.start_time)
        .map_or(p.ppid, |live| live.ppid);
    ProcInfo {
        pid: p.pid,
        start_time: p.start_time,
        ppid,
        // The simulated supervisors start their guests; none is started by its guest.
        parent_of_caller: false,
        handle: SimProc {
            pid: p.pid,
            start_time: p.start_time,
        },
    }
}

/// The pid of `vm`'s holder, for messages.
fn holder_pid(vm: &Vm) -> u32 {
    vm.holder.as_ref().map_or(0, |h| h.process.pid)
}

impl World {
    /// A world decided entirely by `seed`.
    pub fn new(seed: u64, config: &Config) -> World {
        let kernel = Kernel::new_ref();
        let host = SimHost {
            kernel: kernel.clone(),
        };
        let policy = Policy {
            sabotage: config.sabotage,
            ..Policy::default()
        };
        let disks = (0..config.disks)
            .map(|i| Disk {
                file: i as u64 + 1,
                mode: if i < config.disks * 2 / 3 {
                    DiskMode::Exclusive
                } else {
                    DiskMode::Shared
                },
                gone: false,
            })
            .collect();
        let vm = |i: usize| Vm {
            uuid: format!("00000000-0000-4000-8000-{:012x}", i + 1),
            name: format!("vm{i}"),
            id: i as u32 + 1,
            holder: None,
            guest: None,
            granted: BTreeMap::new(),
            flags: AcquireFlags::default(),
            migration: None,
            last_release: None,
            last_acquire: Vec::new(),
        };
        let mut vms: Vec<Vm> = (0..config.vms).map(vm).collect();
        let rogue = vms.len();
        vms.push(vm(rogue));
        vms[rogue].name = "rogue".into();
        let mut world = World {
            rng: Rng::new(seed),
            kernel,
            host,
            policy: policy.clone(),
            daemon: Some(Daemon {
                table: LockTable::new(policy, "sim".into()),
            }),
            state_file: Persisted::default(),
            vms,
            rogue,
            disks,
            pending: Vec::new(),
            events: Vec::new(),
            next_link: 0,
            next_acquire: 0,
            settle_every: config.settle_every.max(1),
            gap_versions_from_status: config.gap_versions_from_status,
            gap_pid_reuse_window: config.gap_pid_reuse_window,
            step: 0,
            counts: BTreeMap::new(),
            trace: Vec::new(),
        };
        world.spawn_rogue();
        world
    }

    /// The last steps taken, oldest first.
    pub fn trace(&self) -> &[String] {
        &self.trace
    }

    fn note(&mut self, what: String) {
        if self.trace.len() >= 40 {
            self.trace.remove(0);
        }
        self.trace.push(what);
    }

    fn count(&mut self, what: &'static str) {
        *self.counts.entry(what).or_insert(0) += 1;
    }

    fn alive(&self, p: &Process) -> bool {
        self.kernel.borrow().is_alive(p.pid, p.start_time)
    }

    fn new_link(&mut self) -> LinkId {
        self.next_link += 1;
        LinkId(self.next_link)
    }

    fn resource(&self, disk: usize) -> Resource {
        Resource::Disk {
            path: format!("/sim/disk{disk}").into(),
            mode: self.disks[disk].mode,
        }
    }

    fn identity(&self, slot: usize, guest: &Process) -> VmIdentity {
        let vm = &self.vms[slot];
        VmIdentity {
            uuid: vm.uuid.clone(),
            name: vm.name.clone(),
            id: vm.id,
            pid: guest.pid,
        }
    }

    fn slot_of_uuid(&self, uuid: &str) -> Option<usize> {
        self.vms.iter().position(|v| v.uuid == uuid)
    }

    fn spawn_rogue(&mut self) {
        let mut k = self.kernel.borrow_mut();
        let holder = k.spawn(INIT_PID);
        let guest = k.spawn(holder.pid);
        drop(k);
        let link = self.new_link();
        let rogue = &mut self.vms[self.rogue];
        rogue.holder = Some(Holder {
            process: holder,
            link: Some(link),
            kept: Vec::new(),
            acking: true,
        });
        rogue.guest = Some(guest);
        rogue.granted.clear();
    }

    // ---- processes -------------------------------------------------------------------------

    /// Ends a guest: it writes nothing more; the daemon's watcher will notice.
    fn kill_guest(&mut self, slot: usize, cause: DeathCause) {
        let Some(guest) = self.vms[slot].guest else {
            return;
        };
        if !self.kernel.borrow_mut().exit(guest.pid, guest.start_time) {
            return;
        }
        self.count(match cause {
            DeathCause::Fault => "death:guest_fault",
            DeathCause::Shutdown => "death:shutdown",
            DeathCause::ParentDied => "death:pdeathsig",
            DeathCause::KillEffect => "death:kill_effect",
            DeathCause::LockFailure => "death:lock_failure_poweroff",
            DeathCause::Migration => "death:migrated",
        });
        self.vms[slot].granted.clear();
        if self.daemon.is_some() {
            self.events.push(Event::GuestExited {
                uuid: self.vms[slot].uuid.clone(),
                start_time: guest.start_time,
            });
        }
    }

    /// Ends a supervisor: the kernel closes its descriptors; its connection closes.
    fn kill_holder(
        holder: &mut Holder,
        kernel: &KernelRef,
        daemon_up: bool,
        events: &mut Vec<Event>,
    ) {
        if !kernel
            .borrow_mut()
            .exit(holder.process.pid, holder.process.start_time)
        {
            return;
        }
        holder.kept.clear();
        if let (Some(link), true) = (holder.link.take(), daemon_up) {
            events.push(Event::HolderClosed {
                link,
                holder: holder.process,
            });
        }
    }

    fn end_incoming(&mut self, mut incoming: Incoming, uuid: &str) {
        let daemon_up = self.daemon.is_some();
        if self
            .kernel
            .borrow_mut()
            .exit(incoming.guest.pid, incoming.guest.start_time)
        {
            self.count("death:migration_destination");
            if daemon_up {
                self.events.push(Event::GuestExited {
                    uuid: uuid.to_owned(),
                    start_time: incoming.guest.start_time,
                });
            }
        }
        World::kill_holder(
            &mut incoming.holder,
            &self.kernel,
            daemon_up,
            &mut self.events,
        );
    }

    // ---- the daemon's shell ----------------------------------------------------------------

    /// Carries out what a table call asks, as the daemon does after letting go of the table.
    fn apply(&mut self, fx: Effects<SimFd>) -> Result<(), String> {
        drop(fx.close);
        for (link, push) in fx.pushes {
            self.push(link, push);
        }
        for (pid, start_time) in fx.kill {
            self.kill_effect(pid, start_time)?;
        }
        if !fx.changed.is_empty() {
            self.persist();
        }
        self.follow_handovers();
        Ok(())
    }

    fn persist(&mut self) {
        if let Some(d) = &self.daemon {
            self.state_file = d.table.persisted();
        }
    }

    fn holder_by_link(&mut self, link: LinkId) -> Option<&mut Holder> {
        for vm in &mut self.vms {
            if vm.holder.as_ref().is_some_and(|h| h.link == Some(link)) {
                return vm.holder.as_mut();
            }
            if let Some(i) = vm.migration.as_mut().and_then(|m| m.incoming.as_mut()) {
                if i.holder.link == Some(link) {
                    return Some(&mut i.holder);
                }
            }
        }
        None
    }

    fn push(&mut self, link: LinkId, push: Push) {
        let Some(holder) = self.holder_by_link(link) else {
            return; // that connection is gone: the push is lost with it
        };
        // A holder that stopped acking still reads its pushes (they need no answer).
        match push {
            Push::Close(keys) if keys.is_empty() => holder.kept.retain(|k| k.pending.is_none()),
            Push::Close(keys) => holder.kept.retain(|k| !keys.contains(&k.lock.key)),
            Push::Finished => holder.kept.clear(),
        }
    }

    /// The daemon kills a guest whose supervisor died. Killing a guest whose supervisor lives
    /// breaks the promise (nothing vmlock does kills a running VM).
    fn kill_effect(&mut self, pid: u32, start_time: u64) -> Result<(), String> {
        self.count("fx:kill");
        for slot in 0..self.vms.len() {
            let Some(guest) = self.vms[slot].guest else {
                continue;
            };
            if guest.pid != pid || guest.start_time != start_time || !self.alive(&guest) {
                continue;
            }
            let holder_alive = self.vms[slot]
                .holder
                .as_ref()
                .is_some_and(|h| self.alive(&h.process));
            if holder_alive {
                return Err(format!(
                    "invariant 4: the daemon killed guest {pid} of {} whose supervisor still runs",
                    self.vms[slot].name
                ));
            }
            self.kill_guest(slot, DeathCause::KillEffect);
            return Ok(());
        }
        // A pidfd that already fired, or a destination guest: pid reuse cannot fool a pidfd,
        // so a kill of a process that is not that process is a no-op.
        Ok(())
    }

    /// The state a refused request must not change.
    fn snapshot(&self) -> Option<Snapshot> {
        self.snapshot_excluding(None)
    }

    /// Any request may first clear owners whose guest has exited (and unlock their keys): those
    /// owners and keys are left out, as found before the request (`excluded`), so that the same
    /// set is compared before and after.
    fn snapshot_excluding(&self, excluded: Option<&Snapshot>) -> Option<Snapshot> {
        let daemon = self.daemon.as_ref()?;
        let kernel = self.kernel.borrow();
        let mut persisted = daemon.table.persisted();
        let (dead, dead_files) = match excluded {
            Some(s) => (s.dead.clone(), s.dead_files.clone()),
            None => {
                let dead: BTreeSet<String> = persisted
                    .owners
                    .iter()
                    .filter(|o| !kernel.is_alive(o.vm.pid, o.start_time))
                    .map(|o| o.vm.uuid.clone())
                    .collect();
                let dead_files: BTreeSet<FileId> = daemon
                    .table
                    .grants()
                    .into_iter()
                    .filter(|(u, _, _, _)| dead.contains(*u))
                    .map(|(_, k, _, _)| k.ino)
                    .collect();
                (dead, dead_files)
            }
        };
        persisted.owners.retain(|o| !dead.contains(&o.vm.uuid));
        // Clearing a dead owner that was migrating hands it to its destination, a new
        // generation of its keys' versions.
        persisted
            .versions
            .retain(|(k, _, _)| !dead_files.contains(&k.ino));
        let mut locks = kernel.lock_snapshot();
        locks.retain(|((file, _), _)| !dead_files.contains(file));
        Some(Snapshot {
            persisted: format!("{:?}", (persisted.owners, persisted.versions)),
            locks,
            dead,
            dead_files,
        })
    }

    fn check_unchanged(&self, before: Option<Snapshot>, what: &str, e: &str) -> Result<(), String> {
        let Some(before) = before else {
            return Ok(());
        };
        let after = self.snapshot_excluding(Some(&before));
        if after.as_ref() != Some(&before) {
            return Err(format!(
                "invariant 3: a refused {what} changed the table or the kernel's locks ({e})\n  before: {before:?}\n  after:  {after:?}"
            ));
        }
        Ok(())
    }

    fn refused(&mut self, what: &'static str) {
        self.count("refused");
        self.count(what);
    }

    // ---- requests --------------------------------------------------------------------------

    /// An acquire of `disks` for VM `slot`, sent by process `caller`.
    fn request_acquire(&mut self, slot: usize, caller: u32, disks: &[usize]) -> Result<(), String> {
        if self.daemon.is_none() {
            return Ok(());
        }
        // Opened outside the table; a vanished storage fails the open and the request.
        if disks.iter().any(|d| self.disks[*d].gone) {
            self.count("open_failed");
            return Ok(());
        }
        let opened: Vec<Opened<SimFd>> = disks
            .iter()
            .map(|&d| Opened {
                resource: self.resource(d),
                key: key_of(d),
                desc: Kernel::open(&self.kernel, self.disks[d].file),
                image: None,
            })
            .collect();
        let before = self.snapshot();
        let uuid = self.vms[slot].uuid.clone();
        let flags = self.vms[slot].flags.clone();
        let from_holder = self.vms[slot]
            .holder
            .as_ref()
            .is_some_and(|h| h.process.pid == caller && self.alive(&h.process));
        let daemon = self.daemon.as_mut().expect("checked above");
        let (result, fx) = daemon.table.reserve(
            &mut self.host,
            caller_of(&self.kernel, caller),
            &uuid,
            opened,
            &flags,
        );
        self.apply(fx)?;
        if result.is_ok() && !from_holder {
            return Err(format!(
                "invariant 3: pid {caller}, not its supervisor, acquired for {}",
                self.vms[slot].name
            ));
        }
        match result {
            Err(refusal) => {
                self.refused("refused:acquire");
                let e = refusal.into_error(|_| None);
                self.check_unchanged(before, "acquire", &e.to_string())?;
            }
            Ok(None) => self.count("acquire:nothing_new"),
            Ok(Some(r)) => {
                self.next_acquire += 1;
                self.pending.push(PendingAcquire {
                    id: self.next_acquire,
                    slot,
                    uuid,
                    ticket: r.ticket,
                    link: r.link,
                    handover: r.handover,
                });
                // Half of them are answered at once; the rest race other steps.
                if self.rng.chance(50) {
                    let last = self.pending.len() - 1;
                    self.complete_acquire(last)?;
                }
            }
        }
        Ok(())
    }

    /// The holder acks (it keeps the copies; commit) or does not (abort).
    fn complete_acquire(&mut self, index: usize) -> Result<(), String> {
        let p = self.pending.swap_remove(index);
        let holder_ok = {
            let holder = self.vms[p.slot].holder.as_ref();
            holder.is_some_and(|h| h.acking && h.link == Some(p.link) && self.alive(&h.process))
        };
        let late_ack = self.rng.chance(5);
        let Some(daemon) = self.daemon.as_mut() else {
            return Ok(());
        };
        if holder_ok && !late_ack {
            let holder = self.vms[p.slot].holder.as_mut().expect("checked above");
            holder
                .kept
                .extend(p.handover.into_iter().map(|(lock, fd)| Kept {
                    lock,
                    fd,
                    pending: Some(p.id),
                }));
            let (result, fx) = daemon.table.commit(&p.uuid, p.ticket);
            self.apply(fx)?;
            match result {
                Ok(granted) => {
                    self.count("acquire:committed");
                    let vm = &mut self.vms[p.slot];
                    if let Some(h) = vm.holder.as_mut() {
                        for k in &mut h.kept {
                            if k.pending == Some(p.id) {
                                k.pending = None;
                            }
                        }
                    }
                    for g in granted {
                        let Some(disk) = self.disks.iter().position(|d| {
                            Resource::Disk {
                                path: format!("/sim/disk{}", d.file - 1).into(),
                                mode: d.mode,
                            } == g.resource
                        }) else {
                            continue;
                        };
                        vm.granted.insert(disk, kind_of(self.disks[disk].mode));
                    }
                }
                Err(_) => self.count("acquire:commit_failed"),
            }
        } else {
            if holder_ok {
                // The ack came after the daemon gave up: the holder kept copies anyway.
                let holder = self.vms[p.slot].holder.as_mut().expect("checked above");
                holder
                    .kept
                    .extend(p.handover.into_iter().map(|(lock, fd)| Kept {
                        lock,
                        fd,
                        pending: Some(p.id),
                    }));
            } else {
                drop(p.handover);
            }
            let fx = daemon.table.abort(&mut self.host, &p.uuid, p.ticket);
            self.count("acquire:aborted");
            self.apply(fx)?;
        }
        Ok(())
    }

    fn release(&mut self, slot: usize, caller: u32, resource: Resource) -> Result<(), String> {
        let before = self.snapshot();
        let uuid = self.vms[slot].uuid.clone();
        let holder_drops = self.rng.chance(30);
        let Some(daemon) = self.daemon.as_mut() else {
            return Ok(());
        };
        let list = [resource.clone()];
        let (result, fx) = daemon.table.release(
            &mut self.host,
            caller_of(&self.kernel, caller),
            &uuid,
            Some(&list),
            holder_drops,
        );
        self.apply(fx)?;
        match result {
            Ok(_) => {
                self.count("release:ok");
                if holder_drops {
                    if let Some(h) = self.vms[slot].holder.as_mut() {
                        if h.process.pid == caller {
                            h.kept.retain(|k| k.lock.resource != resource);
                        }
                    }
                }
            }
            Err(e) => {
                self.refused("refused:release");
                // One resource per release: a partial release released nothing either.
                self.check_unchanged(before, "release", &e.to_string())?;
            }
        }
        Ok(())
    }

    // ---- steps -----------------------------------------------------------------------------

    /// One random step, then the invariants.
    pub fn step(&mut self) -> Result<(), String> {
        self.step += 1;
        self.kernel.borrow_mut().tick();
        let total: u32 = STEP_KINDS.iter().map(|(_, w)| w).sum();
        let mut roll = self.rng.below(total as usize) as u32;
        let mut kind = STEP_KINDS[0].0;
        for (k, w) in STEP_KINDS {
            if roll < *w {
                kind = k;
                break;
            }
            roll -= w;
        }
        self.count(kind);
        let target = self.rng.below(self.rogue);
        self.note(format!("step {}: {kind} vm{target}", self.step));
        match kind {
            "vm_start" => self.vm_start(target)?,
            "hotplug" => self.hotplug(target)?,
            "complete_acquire" if !self.pending.is_empty() => {
                let i = self.rng.below(self.pending.len());
                self.complete_acquire(i)?;
            }
            "unplug" => self.unplug(target)?,
            "shutdown" => self.shutdown(target)?,
            "guest_death" => self.kill_guest(target, DeathCause::Fault),
            "supervisor_death" => self.supervisor_death(target),
            "connection_drop" => self.connection_drop(target),
            "toggle_acking" => {
                if let Some(h) = self.vms[target].holder.as_mut() {
                    h.acking = !h.acking;
                }
            }
            "migrate" => self.migrate(target)?,
            "migrate_cancel" => self.migrate_cancel(target)?,
            "daemon_crash" => self.daemon_crash(),
            "daemon_restart" => self.daemon_restart()?,
            "reconnect" => self.reconnect(target)?,
            "deliver_event" => self.deliver_event()?,
            "storage_gone" => {
                let d = self.rng.below(self.disks.len());
                self.disks[d].gone = true;
            }
            "storage_back" => {
                let gone: Vec<usize> = (0..self.disks.len())
                    .filter(|d| self.disks[*d].gone)
                    .collect();
                if let Some(&d) = self.rng.pick(&gone) {
                    self.disks[d].gone = false;
                }
            }
            "lease_check" => self.lease_check()?,
            "pid_churn" => self.pid_churn(),
            "lie" => self.lie(target)?,
            "duplicate" => self.duplicate(target)?,
            "reap" => self.reap(target)?,
            "delegate" => self.delegate(target)?,
            _ => {}
        }
        self.check()?;
        if self.step % self.settle_every == 0 {
            self.settle()?;
        }
        Ok(())
    }

    fn random_disks(&mut self, max: usize) -> Vec<usize> {
        let n = 1 + self.rng.below(max);
        let mut disks: Vec<usize> = (0..n).map(|_| self.rng.below(self.disks.len())).collect();
        disks.sort_unstable();
        disks.dedup();
        disks
    }

    fn vm_start(&mut self, slot: usize) -> Result<(), String> {
        if self.daemon.is_none() || self.vms[slot].holder.is_some() {
            return Ok(());
        }
        // Some guests hold their own locks first, as libvirt's pre-exec child does before it
        // execs QEMU; a `delegate` step later hands them down to the guest's child.
        let self_holding = self.rng.chance(25);
        let (holder, guest) = {
            let mut k = self.kernel.borrow_mut();
            let holder = k.spawn(INIT_PID);
            if self_holding {
                (holder, holder)
            } else {
                (holder, k.spawn(holder.pid))
            }
        };
        let link = self.new_link();
        let action = *self
            .rng
            .pick(&[
                LockFailureAction::Poweroff,
                LockFailureAction::Pause,
                LockFailureAction::Ignore,
            ])
            .expect("non-empty");
        let flags = AcquireFlags {
            on_lock_failure: action,
            // Some VMs also hold QEMU's writer bytes (shared, on the same description).
            hold_qemu_bytes: self.rng.chance(20),
            ..AcquireFlags::default()
        };
        let identity = self.identity(slot, &guest);
        let before = self.snapshot();
        let daemon = self.daemon.as_mut().expect("checked above");
        let (result, fx) = daemon.table.hold(
            &mut self.host,
            caller_of(&self.kernel, holder.pid),
            link,
            identity,
            proc_info(&self.kernel, &guest),
            Vec::new(),
            Some(flags.clone()),
        );
        self.apply(fx)?;
        if let Err(e) = result {
            self.refused("refused:hold");
            let mut k = self.kernel.borrow_mut();
            k.exit(guest.pid, guest.start_time);
            k.exit(holder.pid, holder.start_time);
            drop(k);
            return self.check_unchanged(before, "hold", &e.to_string());
        }
        self.note(format!(
            "  started: holder {} guest {} action {action:?}",
            holder.pid, guest.pid
        ));
        let vm = &mut self.vms[slot];
        vm.holder = Some(Holder {
            process: holder,
            link: Some(link),
            kept: Vec::new(),
            acking: true,
        });
        vm.guest = Some(guest);
        vm.granted.clear();
        vm.flags = flags;
        vm.migration = None;
        let disks = self.random_disks(4);
        self.vms[slot].last_acquire = disks.clone();
        self.request_acquire(slot, holder.pid, &disks)
    }

    /// The VM's supervisor if it runs with a live guest.
    fn running_holder(&self, slot: usize) -> Option<u32> {
        let vm = &self.vms[slot];
        let holder = vm.holder.as_ref()?;
        let guest = vm.guest.as_ref()?;
        (self.alive(&holder.process) && self.alive(guest)).then_some(holder.process.pid)
    }

    fn hotplug(&mut self, slot: usize) -> Result<(), String> {
        let Some(pid) = self.running_holder(slot) else {
            return Ok(());
        };
        let disks = self.random_disks(2);
        self.vms[slot].last_acquire = disks.clone();
        self.request_acquire(slot, pid, &disks)
    }

    fn unplug(&mut self, slot: usize) -> Result<(), String> {
        let Some(pid) = self.running_holder(slot) else {
            return Ok(());
        };
        let granted: Vec<usize> = self.vms[slot].granted.keys().copied().collect();
        let Some(&disk) = self.rng.pick(&granted) else {
            return Ok(());
        };
        // The guest lets go of the disk before its lock is released.
        self.vms[slot].granted.remove(&disk);
        let resource = self.resource(disk);
        self.vms[slot].last_release = Some(resource.clone());
        self.release(slot, pid, resource)
    }

    /// A clean shutdown: the guest exits, then its supervisor reports it and exits.
    fn shutdown(&mut self, slot: usize) -> Result<(), String> {
        if self.vms[slot].holder.is_none() {
            return Ok(());
        }
        self.kill_guest(slot, DeathCause::Shutdown);
        self.holder_finishes(slot)
    }

    /// The supervisor of a VM whose guest has exited says so and exits.
    fn holder_finishes(&mut self, slot: usize) -> Result<(), String> {
        let Some(holder) = self.vms[slot].holder.as_ref() else {
            return Ok(());
        };
        let pid = holder.process.pid;
        let holder_alive = self.alive(&holder.process);
        let guest_pid = self.vms[slot].guest.map_or(0, |g| g.pid);
        if holder_alive && self.daemon.is_some() {
            let before = self.snapshot();
            let uuid = self.vms[slot].uuid.clone();
            let daemon = self.daemon.as_mut().expect("checked above");
            let (result, fx) = daemon.table.shutdown(
                &mut self.host,
                caller_of(&self.kernel, pid),
                &uuid,
                guest_pid,
            );
            self.apply(fx)?;
            if let Err(e) = result {
                self.refused("refused:shutdown");
                self.check_unchanged(before, "shutdown", &e.to_string())?;
            }
        }
        let daemon_up = self.daemon.is_some();
        if let Some(mut holder) = self.vms[slot].holder.take() {
            World::kill_holder(&mut holder, &self.kernel, daemon_up, &mut self.events);
        }
        if let Some(m) = self.vms[slot].migration.take() {
            if let Some(i) = m.incoming {
                let uuid = self.vms[slot].uuid.clone();
                self.end_incoming(i, &uuid);
            }
        }
        Ok(())
    }

    fn supervisor_death(&mut self, slot: usize) {
        let daemon_up = self.daemon.is_some();
        let guest = self.vms[slot].guest;
        let Some(holder) = self.vms[slot].holder.as_mut() else {
            return;
        };
        // The daemon learns of the death only through the holder's connection.
        let daemon_will_know = daemon_up && holder.link.is_some();
        let self_holding = guest == Some(holder.process);
        World::kill_holder(holder, &self.kernel, daemon_up, &mut self.events);
        if self_holding {
            // A guest that holds its own locks died: its pidfd tells the daemon.
            self.count("death:self_holding_guest");
            self.vms[slot].granted.clear();
            if let (Some(g), true) = (guest, daemon_up) {
                self.events.push(Event::GuestExited {
                    uuid: self.vms[slot].uuid.clone(),
                    start_time: g.start_time,
                });
            }
            return;
        }
        // PDEATHSIG: the kernel sends it as the supervisor exits. The simulator lets the guest
        // run on (until the daemon kills it) only while something else still keeps its locks,
        // the daemon's copies: that is the window the core must cover. With no daemon, or a
        // daemon that has no copies yet (restarted, supervisor not reconnected), or a daemon
        // that will never hear of it (the connection was already gone), the guest dies with
        // its supervisor (see RELIABILITY.md).
        if !daemon_will_know || !self.kernel_keeps_granted(slot) || self.rng.chance(40) {
            self.kill_guest(slot, DeathCause::ParentDied);
        }
    }

    fn connection_drop(&mut self, slot: usize) {
        if self.daemon.is_none() {
            return;
        }
        let Some(holder) = self.vms[slot].holder.as_mut() else {
            return;
        };
        if let Some(link) = holder.link.take() {
            self.events.push(Event::HolderClosed {
                link,
                holder: holder.process,
            });
        }
    }

    fn deliver_event(&mut self) -> Result<(), String> {
        if self.events.is_empty() || self.daemon.is_none() {
            return Ok(());
        }
        let i = self.rng.below(self.events.len());
        // Now and then a notification arrives twice.
        let event = if self.rng.chance(5) {
            match &self.events[i] {
                Event::HolderClosed { link, holder } => Event::HolderClosed {
                    link: *link,
                    holder: *holder,
                },
                Event::GuestExited { uuid, start_time } => Event::GuestExited {
                    uuid: uuid.clone(),
                    start_time: *start_time,
                },
            }
        } else {
            self.events.swap_remove(i)
        };
        self.deliver(event)
    }

    fn deliver(&mut self, event: Event) -> Result<(), String> {
        let Some(daemon) = self.daemon.as_mut() else {
            return Ok(());
        };
        let fx = match event {
            Event::HolderClosed { link, holder } => {
                let alive = self.kernel.borrow().is_alive(holder.pid, holder.start_time);
                daemon.table.holder_closed(&mut self.host, link, alive)
            }
            Event::GuestExited { uuid, start_time } => {
                daemon.table.guest_exited(&mut self.host, &uuid, start_time)
            }
        };
        self.apply(fx)
    }

    /// A source supervisor's death can hand a migrating VM to its destination (the core does so
    /// when the destination keeps copies): follow the table's decision in the world.
    fn follow_handovers(&mut self) {
        for slot in 0..self.rogue {
            let Some(dest_guest) = self.vms[slot]
                .migration
                .as_ref()
                .and_then(|m| m.incoming.as_ref())
                .map(|i| i.guest.pid)
            else {
                continue;
            };
            let owner_guest = self
                .daemon
                .as_ref()
                .and_then(|d| d.table.guest_of(&self.vms[slot].uuid))
                .map(|(g, _)| g);
            if owner_guest == Some(dest_guest) {
                self.count("migration:handed_over_by_the_core");
                self.promote_destination(slot);
            }
        }
    }

    /// The destination becomes the VM: the source's guest stops (it migrated away).
    fn promote_destination(&mut self, slot: usize) {
        let Some(incoming) = self.vms[slot].migration.take().and_then(|m| m.incoming) else {
            return;
        };
        let granted = std::mem::take(&mut self.vms[slot].granted);
        self.kill_guest(slot, DeathCause::Migration);
        let daemon_up = self.daemon.is_some();
        if let Some(mut old) = self.vms[slot].holder.take() {
            World::kill_holder(&mut old, &self.kernel, daemon_up, &mut self.events);
        }
        let vm = &mut self.vms[slot];
        vm.holder = Some(incoming.holder);
        vm.guest = Some(incoming.guest);
        vm.granted = granted;
        // Only what the destination keeps copies of.
        let kept: BTreeSet<usize> = vm
            .holder
            .as_ref()
            .map(|h| h.kept.iter().filter_map(|k| disk_of(&k.lock.key)).collect())
            .unwrap_or_default();
        vm.granted.retain(|d, _| kept.contains(d));
    }

    fn daemon_crash(&mut self) {
        let Some(daemon) = self.daemon.take() else {
            return;
        };
        // The daemon's descriptors close with it; so do replies it had not sent.
        drop(daemon);
        self.pending.clear();
        self.events.clear();
        match self.rng.below(4) {
            0 => {
                self.count("fault:state_lost");
                self.state_file = Persisted::default();
            }
            1 => {
                self.count("fault:state_truncated");
                let keep = self.rng.below(self.state_file.owners.len() + 1);
                self.state_file.owners.truncate(keep);
            }
            _ => self.count("fault:state_intact"),
        }
        for slot in 0..self.vms.len() {
            if let Some(h) = self.vms[slot].holder.as_mut() {
                h.link = None;
            }
            if let Some(m) = self.vms[slot].migration.take() {
                if let Some(i) = m.incoming {
                    let uuid = self.vms[slot].uuid.clone();
                    self.end_incoming(i, &uuid);
                }
            }
            // An orphaned guest (supervisor dead, kill not yet done) is gone by now: PDEATHSIG.
            let orphan = self.vms[slot].guest.is_some_and(|g| self.alive(&g))
                && !self.vms[slot]
                    .holder
                    .as_ref()
                    .is_some_and(|h| self.alive(&h.process));
            if orphan {
                self.kill_guest(slot, DeathCause::ParentDied);
            }
        }
        self.events.clear();
    }

    fn daemon_restart(&mut self) -> Result<(), String> {
        if self.daemon.is_some() {
            return Ok(());
        }
        let mut table = LockTable::new(self.policy.clone(), "sim".into());
        let kernel = self.kernel.clone();
        table.recover(self.state_file.clone(), |pid, start_time| {
            kernel
                .borrow()
                .is_alive(pid, start_time)
                .then_some(SimProc { pid, start_time })
        });
        // 4: what was recorded of a VM whose guest still runs is back (its locks are waiting
        // for its supervisor to hand them back).
        for owner in &self.state_file.owners {
            let alive = self
                .kernel
                .borrow()
                .is_alive(owner.vm.pid, owner.start_time);
            if alive && table.lookup(&owner.vm.uuid).is_err() {
                return Err(format!(
                    "invariant 4: the restarted daemon dropped {}, whose guest {} runs",
                    owner.vm.name, owner.vm.pid
                ));
            }
        }
        self.daemon = Some(Daemon { table });
        self.persist();
        // The rogue reconnects at once (it has nothing to hand back).
        let link = self.new_link();
        if let Some(h) = self.vms[self.rogue].holder.as_mut() {
            h.link = Some(link);
        }
        Ok(())
    }

    /// A supervisor reconnects and hands back every description it kept.
    fn reconnect(&mut self, slot: usize) -> Result<(), String> {
        if self.daemon.is_none() || slot == self.rogue {
            return Ok(());
        }
        let Some(holder) = self.vms[slot].holder.as_ref() else {
            return Ok(());
        };
        let Some(guest) = self.vms[slot].guest else {
            return Ok(());
        };
        if holder.link.is_some() || !self.alive(&holder.process) || !self.alive(&guest) {
            return Ok(());
        }
        let caller = holder.process.pid;
        let link = LinkId(self.next_link + 1);
        // Each description is passed over the socket (a new reference) and re-checked in the
        // kernel by the daemon: one whose lock went to another VM meanwhile is not adopted.
        let adopt = self.adoptable(&holder.kept);
        let identity = self.identity(slot, &guest);
        let flags = self.vms[slot].flags.clone();
        let uuid = self.vms[slot].uuid.clone();
        self.next_link += 1;
        let daemon = self.daemon.as_mut().expect("checked above");
        let (result, fx) = daemon.table.hold(
            &mut self.host,
            caller_of(&self.kernel, caller),
            link,
            identity,
            proc_info(&self.kernel, &guest),
            adopt,
            Some(flags.clone()),
        );
        let recorded = daemon.table.persisted_owner(&uuid).map(|o| o.flags);
        self.apply(fx)?;
        match result {
            Ok(()) => {
                self.count("reconnect:ok");
                let h = self.vms[slot].holder.as_mut().expect("checked above");
                h.link = Some(link);
                for k in &mut h.kept {
                    k.pending = None;
                }
                if recorded.as_ref().map(|f| &f.on_lock_failure) != Some(&flags.on_lock_failure) {
                    return Err(format!(
                        "invariant 4: after a restart {} records lock-failure action {:?}, it was started with {:?}",
                        self.vms[slot].name,
                        recorded.map(|f| f.on_lock_failure),
                        flags.on_lock_failure
                    ));
                }
            }
            Err(e) => {
                self.count("reconnect:refused");
                self.note(format!("reconnect of vm{slot} refused: {e}"));
            }
        }
        Ok(())
    }

    /// Copies of `kept` as a holder hands them back (each a new reference, passed over the
    /// socket), with the daemon's re-check in the kernel: one whose lock went to another VM
    /// meanwhile is left out.
    fn adoptable(&self, kept: &[Kept]) -> Vec<(HeldLock, SimFd)> {
        let mut adopt = Vec::new();
        for k in kept {
            let copy = k.fd.duplicate();
            let kind = kind_of(k.lock.resource.mode());
            if self
                .kernel
                .borrow_mut()
                .try_lock(copy.ofd(), kind, k.lock.key.byte)
            {
                adopt.push((k.lock.clone(), copy));
            }
        }
        adopt
    }

    /// What the daemon reads from `/proc` about `guest` for a request from `caller`: whether the
    /// guest is the caller's parent comes from the live kernel, never from the caller.
    fn guest_info_for(&self, guest: &Process, caller: &Process) -> ProcInfo<SimProc> {
        let mut info = proc_info(&self.kernel, guest);
        let k = self.kernel.borrow();
        info.parent_of_caller = k
            .process(caller.pid)
            .is_some_and(|c| c.start_time == caller.start_time && c.ppid == guest.pid)
            && k.is_alive(guest.pid, guest.start_time);
        info
    }

    /// libvirt's start, second half: the guest, which took its locks itself (the pre-exec
    /// child), starts a child that takes the VM over as its holder with copies of the
    /// descriptions; the guest's own connection then closes (its exec), in any order with the
    /// takeover. A child of a guest that does not hold its own locks tries the same and must be
    /// refused.
    fn delegate(&mut self, slot: usize) -> Result<(), String> {
        if self.daemon.is_none() || slot == self.rogue {
            return Ok(());
        }
        let (Some(guest), Some(holder)) = (self.vms[slot].guest, self.vms[slot].holder.as_ref())
        else {
            return Ok(());
        };
        if !self.alive(&guest)
            || self.pending.iter().any(|p| p.slot == slot)
            || holder.kept.iter().any(|k| k.pending.is_some())
        {
            return Ok(());
        }
        let self_holding = holder.process == guest;
        let uuid = self.vms[slot].uuid.clone();
        let known = self
            .daemon
            .as_ref()
            .is_some_and(|d| d.table.lookup(&uuid).is_ok());
        if !self_holding && !known {
            // A guest's child may register a VM the daemon does not know (libvirt's holder
            // does): no takeover to try.
            return Ok(());
        }
        let child = self.kernel.borrow_mut().spawn(guest.pid);
        // The child got copies of the guest's descriptions; the daemon re-checks each in the
        // kernel (as after a restart) before it adopts it.
        let adopt = if self_holding {
            self.adoptable(&holder.kept)
        } else {
            Vec::new()
        };
        // The child keeps copies of what it hands over.
        let keep: Vec<Kept> = adopt
            .iter()
            .map(|(lock, fd)| Kept {
                lock: lock.clone(),
                fd: fd.duplicate(),
                pending: None,
            })
            .collect();
        let link = self.new_link();
        let identity = self.identity(slot, &guest);
        let info = self.guest_info_for(&guest, &child);
        // The VM's options go with the takeover (a daemon that lost its state files meanwhile
        // learns them from it, never falls back to defaults).
        let flags = self.vms[slot].flags.clone();
        let before = self.snapshot();
        let daemon = self.daemon.as_mut().expect("checked above");
        let (result, fx) = daemon.table.hold(
            &mut self.host,
            caller_of(&self.kernel, child.pid),
            link,
            identity,
            info,
            adopt,
            Some(flags),
        );
        self.apply(fx)?;
        match result {
            Ok(()) if !self_holding => Err(format!(
                "invariant 2: pid {}, a child of {}'s guest {}, took the VM from its supervisor {}",
                child.pid,
                self.vms[slot].name,
                guest.pid,
                holder_pid(&self.vms[slot])
            )),
            Ok(()) => {
                self.count("delegate:taken_over");
                self.note(format!(
                    "  vm{slot}: guest {} delegated to its child {}",
                    guest.pid, child.pid
                ));
                let old = self.vms[slot].holder.replace(Holder {
                    process: child,
                    link: Some(link),
                    kept: keep,
                    acking: true,
                });
                // The guest's own connection closes at its exec. (Its copies of the
                // descriptions, which QEMU keeps, are not modelled: fewer copies, a harder case.)
                if let Some(old_link) = old.and_then(|o| o.link) {
                    self.events.push(Event::HolderClosed {
                        link: old_link,
                        holder: guest,
                    });
                }
                Ok(())
            }
            Err(e) => {
                self.refused("refused:delegate");
                self.kernel.borrow_mut().exit(child.pid, child.start_time);
                self.check_unchanged(before, "takeover", &e.to_string())
            }
        }
    }

    fn lease_check(&mut self) -> Result<(), String> {
        let Some(daemon) = self.daemon.as_mut() else {
            return Ok(());
        };
        // stat() of every grant, outside the table; a vanished storage is a lost lease.
        let findings: Vec<(String, LockKey)> = daemon
            .table
            .lease_targets()
            .into_iter()
            .filter(|(_, key, _)| disk_of(key).is_some_and(|d| self.disks[d].gone))
            .map(|(u, k, _)| (u, k))
            .collect();
        let lost = daemon.table.leases_lost(&findings);
        for l in lost {
            self.count("lease_lost");
            let Some(slot) = self.slot_of_uuid(&l.vm.uuid) else {
                continue;
            };
            let recorded = l.flags.on_lock_failure;
            let started = self.vms[slot].flags.on_lock_failure;
            let same_guest = self.vms[slot]
                .guest
                .is_some_and(|g| g.start_time == l.start_time);
            if same_guest && recorded != started {
                return Err(format!(
                    "invariant 4: {} lost a lease and would get action {recorded:?}, it was started with {started:?}",
                    self.vms[slot].name
                ));
            }
            if same_guest && recorded == LockFailureAction::Poweroff {
                self.kill_guest(slot, DeathCause::LockFailure);
            }
        }
        Ok(())
    }

    /// Unrelated processes come and go, so dead guests' and supervisors' pids get reused.
    fn pid_churn(&mut self) {
        let mut k = self.kernel.borrow_mut();
        let p = k.spawn(INIT_PID);
        if self.rng.chance(50) {
            k.exit(p.pid, p.start_time);
        }
    }

    /// A supervisor whose guest has gone finishes; a destination whose guest died leaves.
    fn reap(&mut self, slot: usize) -> Result<(), String> {
        if slot == self.rogue {
            return Ok(());
        }
        let guest_dead = self.vms[slot].guest.is_some_and(|g| !self.alive(&g));
        let holder_dead = self.vms[slot]
            .holder
            .as_ref()
            .is_some_and(|h| !self.alive(&h.process));
        if self.vms[slot].holder.is_some() && (guest_dead || holder_dead) {
            if holder_dead && !guest_dead {
                return Ok(()); // an orphan waits for the daemon's kill
            }
            return self.holder_finishes(slot);
        }
        let dest_dead = self.vms[slot]
            .migration
            .as_ref()
            .and_then(|m| m.incoming.as_ref())
            .is_some_and(|i| !self.alive(&i.guest) || !self.alive(&i.holder.process));
        if dest_dead {
            if let Some(i) = self.vms[slot]
                .migration
                .as_mut()
                .and_then(|m| m.incoming.take())
            {
                let uuid = self.vms[slot].uuid.clone();
                self.end_incoming(i, &uuid);
            }
        }
        Ok(())
    }

    // ---- migration on one host -------------------------------------------------------------

    fn migrate(&mut self, slot: usize) -> Result<(), String> {
        let Some(source) = self.running_holder(slot) else {
            return Ok(());
        };
        if self.daemon.is_none()
            || self.vms[slot]
                .holder
                .as_ref()
                .is_some_and(|h| h.link.is_none())
        {
            return Ok(());
        }
        let uuid = self.vms[slot].uuid.clone();
        let stage = match &self.vms[slot].migration {
            None => 0,
            Some(m) => match &m.incoming {
                None => 1,
                Some(i) if !i.taken => 2,
                Some(_) => 3,
            },
        };
        let before = self.snapshot();
        self.note(format!("  migration stage {stage}"));
        match stage {
            0 => {
                let fresh = format!("{:016x}", self.rng.next_u64());
                let daemon = self.daemon.as_mut().expect("checked above");
                match daemon
                    .table
                    .migrate_prepare(caller_of(&self.kernel, source), &uuid, fresh)
                {
                    Ok((held, token)) => {
                        self.count("migration:prepared");
                        self.vms[slot].migration = Some(Migration {
                            versions: held.into_iter().map(|h| (h.resource, h.version)).collect(),
                            token,
                            incoming: None,
                        });
                    }
                    Err(e) => {
                        self.refused("refused:migrate_prepare");
                        self.check_unchanged(before, "migrate_prepare", &e.to_string())?;
                    }
                }
            }
            1 => {
                let (holder, guest) = {
                    let mut k = self.kernel.borrow_mut();
                    let holder = k.spawn(INIT_PID);
                    (holder, k.spawn(holder.pid))
                };
                let link = self.new_link();
                let identity = self.identity(slot, &guest);
                let daemon = self.daemon.as_mut().expect("checked above");
                match daemon.table.hold_incoming(
                    caller_of(&self.kernel, holder.pid),
                    link,
                    &identity,
                    proc_info(&self.kernel, &guest),
                ) {
                    Ok(fx) => {
                        self.apply(fx)?;
                        self.count("migration:incoming");
                        if let Some(m) = self.vms[slot].migration.as_mut() {
                            m.incoming = Some(Incoming {
                                holder: Holder {
                                    process: holder,
                                    link: Some(link),
                                    kept: Vec::new(),
                                    acking: true,
                                },
                                guest,
                                taken: false,
                            });
                        }
                    }
                    Err(e) => {
                        self.refused("refused:hold_incoming");
                        let mut k = self.kernel.borrow_mut();
                        k.exit(guest.pid, guest.start_time);
                        k.exit(holder.pid, holder.start_time);
                        drop(k);
                        self.check_unchanged(before, "hold_incoming", &e.to_string())?;
                    }
                }
            }
            2 => {
                let mut versions = self.vms[slot]
                    .migration
                    .as_ref()
                    .map(|m| m.versions.clone())
                    .unwrap_or_default();
                // Now and then the destination carries a stale state.
                if self.rng.chance(10) {
                    if let Some(v) = versions.first_mut() {
                        v.1 = v.1.wrapping_sub(1);
                    }
                }
                let Some(incoming) = self.vms[slot]
                    .migration
                    .as_ref()
                    .and_then(|m| m.incoming.as_ref())
                else {
                    return Ok(());
                };
                let dest = incoming.holder.process.pid;
                let link = incoming.holder.link;
                let token = self.vms[slot].migration.as_ref().map(|m| m.token.clone());
                let daemon = self.daemon.as_mut().expect("checked above");
                match daemon.table.acquire_incoming(
                    &mut self.host,
                    caller_of(&self.kernel, dest),
                    &uuid,
                    &versions,
                    token.as_deref(),
                ) {
                    Ok(handover) => {
                        let Some(link) = link.filter(|l| *l == handover.link) else {
                            return Ok(());
                        };
                        let result = daemon.table.incoming_taken(&uuid, link);
                        let incoming = self.vms[slot]
                            .migration
                            .as_mut()
                            .and_then(|m| m.incoming.as_mut())
                            .expect("checked above");
                        incoming
                            .holder
                            .kept
                            .extend(handover.handover.into_iter().map(|(lock, fd)| Kept {
                                lock,
                                fd,
                                pending: None,
                            }));
                        if result.is_ok() {
                            incoming.taken = true;
                            self.count("migration:taken");
                        }
                    }
                    Err(e) => {
                        self.refused("refused:acquire_incoming");
                        self.check_unchanged(before, "acquire_incoming", &e.to_string())?;
                    }
                }
            }
            _ => {
                let success = self.rng.chance(70);
                let dest = self.vms[slot]
                    .migration
                    .as_ref()
                    .and_then(|m| m.incoming.as_ref())
                    .map(|i| i.holder.process.pid)
                    .expect("stage 3 has a destination");
                // As `vmlock::domain::migration_finish` does, the source says success first;
                // now and then the destination tries first (refused).
                let caller = if self.rng.chance(80) { source } else { dest };
                self.complete_migration(slot, caller, success)?;
            }
        }
        Ok(())
    }

    fn migrate_cancel(&mut self, slot: usize) -> Result<(), String> {
        if self.vms[slot].migration.is_none() {
            return Ok(());
        }
        let Some(source) = self.running_holder(slot) else {
            return Ok(());
        };
        self.complete_migration(slot, source, false)
    }

    fn complete_migration(
        &mut self,
        slot: usize,
        caller: u32,
        success: bool,
    ) -> Result<(), String> {
        let uuid = self.vms[slot].uuid.clone();
        if self.daemon.is_none() {
            return Ok(());
        }
        let taken = self.vms[slot]
            .migration
            .as_ref()
            .and_then(|m| m.incoming.as_ref())
            .is_some_and(|i| i.taken);
        let dest_guest = self.vms[slot]
            .migration
            .as_ref()
            .and_then(|m| m.incoming.as_ref())
            .map(|i| i.guest.pid);
        let before = self.snapshot();
        let daemon = self.daemon.as_mut().expect("checked above");
        let (result, fx) = daemon.table.migrate_complete_idempotent(
            caller_of(&self.kernel, caller),
            &uuid,
            success,
        );
        let owner_guest = daemon.table.guest_of(&uuid).map(|(g, _)| g);
        match result {
            Ok(()) => {
                // Follow the table before carrying out its pushes (the source's Finished).
                if success && dest_guest.is_some() && owner_guest == dest_guest {
                    self.count("migration:completed");
                    self.promote_destination(slot);
                } else {
                    self.count("migration:cancelled");
                    if let Some(i) = self.vms[slot].migration.take().and_then(|m| m.incoming) {
                        self.end_incoming(i, &uuid);
                    }
                }
                self.apply(fx)?;
            }
            Err(e) if taken => {
                // Success from the destination: only the source may say so. Nothing changed.
                self.count("migration:refused_complete");
                self.check_unchanged(before, "migrate_complete", &e.to_string())?;
            }
            Err(_) => {
                // "Not taken over": the core cancelled it and the source keeps everything; the
                // destination is told (its Finished push).
                self.count("migration:cancelled_not_taken");
                if let Some(i) = self.vms[slot].migration.take().and_then(|m| m.incoming) {
                    self.end_incoming(i, &uuid);
                }
                self.apply(fx)?;
            }
        }
        Ok(())
    }

    // ---- lies and duplicates ---------------------------------------------------------------

    /// Whether the daemon has yet to process the connection close of an earlier (dead) process
    /// with `process`'s pid.
    fn close_pending_for_pid(&self, process: Process) -> bool {
        self.events.iter().any(|e| {
            matches!(e, Event::HolderClosed { holder, .. }
                if holder.pid == process.pid && holder.start_time != process.start_time)
        })
    }

    /// A root client that is not VM `slot`'s supervisor (the rogue, or another VM's supervisor)
    /// asks to change it.
    fn lie(&mut self, slot: usize) -> Result<(), String> {
        if self.daemon.is_none() {
            return Ok(());
        }
        let rogue_alive = self.vms[self.rogue]
            .holder
            .as_ref()
            .is_some_and(|h| self.alive(&h.process));
        if !rogue_alive {
            self.spawn_rogue();
        }
        let other = self.rng.below(self.rogue);
        // Another VM's live supervisor (a dead one's pid may belong to anyone now, even to
        // this VM's own supervisor), or the rogue.
        let other_alive = self.vms[other]
            .holder
            .as_ref()
            .is_some_and(|h| self.alive(&h.process));
        let liar_slot = if other != slot && other_alive && self.rng.chance(30) {
            other
        } else {
            self.rogue
        };
        let Some(liar) = self.vms[liar_slot].holder.as_ref().map(|h| h.process) else {
            return Ok(());
        };
        let liar_child = self.vms[liar_slot]
            .guest
            .filter(|g| self.alive(g))
            .unwrap_or(liar);
        let uuid = self.vms[slot].uuid.clone();
        // The daemon reads a named pid from /proc: only a live guest is worth naming.
        let victim_guest = self.vms[slot].guest.filter(|g| self.alive(g));
        let before = self.snapshot();
        let lie = self.rng.below(10);
        const LIES: [&str; 10] = [
            "lie:release",
            "lie:shutdown",
            "lie:acquire",
            "lie:guest_started",
            "lie:migrate_prepare",
            "lie:hold_foreign_guest",
            "lie:migration_walk",
            "lie:acquire_incoming",
            "lie:migrate_complete",
            "lie:reused_holder_pid",
        ];
        self.count(LIES[lie]);
        let table_holder = self.daemon.as_ref().and_then(|d| d.table.holder_pid(&uuid));
        let sim_holder = self.vms[slot].holder.as_ref().map(|h| h.process);
        // The liar got the pid of the VM's dead supervisor: the table names holders by pid
        // alone, and until it has seen that supervisor's connection close (if it ever does:
        // the connection may have been gone already) it cannot tell the two apart. The known
        // pid-reuse gap (docs/RELIABILITY.md); `reused_holder_pid` below covers the case the
        // core does handle.
        let pid_reused = table_holder == Some(liar.pid) && sim_holder != Some(liar);
        if pid_reused && lie != 9 && !self.gap_pid_reuse_window {
            self.count("lie:skipped_in_pid_reuse_window");
            return Ok(());
        }
        self.note(format!(
            "  {} by pid {} (vm{liar_slot}); victim's holder: table {table_holder:?}, sim {sim_holder:?}",
            LIES[lie], liar.pid
        ));
        let impostor_in_window = self.vms[slot]
            .holder
            .as_ref()
            .and_then(|h| self.kernel.borrow().process(h.process.pid))
            .is_some_and(|p| self.close_pending_for_pid(p))
            && !self.gap_pid_reuse_window;
        let daemon = self.daemon.as_mut().expect("checked above");
        let refusal: Option<String> = match lie {
            0 => {
                let (r, fx) = daemon.table.release(
                    &mut self.host,
                    caller_of(&self.kernel, liar.pid),
                    &uuid,
                    None,
                    false,
                );
                self.apply(fx)?;
                match r {
                    Ok(_) => {
                        return Err(format!(
                            "invariant 3: pid {} released {}'s locks for its supervisor",
                            liar.pid, self.vms[slot].name
                        ))
                    }
                    Err(e) => Some(e.to_string()),
                }
            }
            1 => {
                let guest_pid = victim_guest.map_or(0, |g| g.pid);
                let known = daemon.table.lookup(&uuid).is_ok();
                let (r, fx) = daemon.table.shutdown(
                    &mut self.host,
                    caller_of(&self.kernel, liar.pid),
                    &uuid,
                    guest_pid,
                );
                self.apply(fx)?;
                match r {
                    // No such VM: nothing to shut down, nothing changed.
                    Ok(_) if !known => None,
                    Ok(_) => {
                        return Err(format!(
                            "invariant 3: pid {} shut down {} for its supervisor",
                            liar.pid, self.vms[slot].name
                        ))
                    }
                    Err(e) => Some(e.to_string()),
                }
            }
            2 => {
                let disks = self.random_disks(2);
                return self.request_acquire(slot, liar.pid, &disks);
            }
            3 => {
                // Names its own child (or, from a VM's supervisor, someone else's guest).
                let named = if self.rng.chance(50) {
                    liar_child
                } else {
                    victim_guest.unwrap_or(liar_child)
                };
                let owner_guest = daemon.table.guest_of(&uuid).map(|(g, _)| g);
                let r = daemon.table.guest_started(
                    caller_of(&self.kernel, liar.pid),
                    &uuid,
                    proc_info(&self.kernel, &named),
                );
                let owner_guest_now = daemon.table.guest_of(&uuid).map(|(g, _)| g);
                match r {
                    Ok(fx) => {
                        self.apply(fx)?;
                        // A destination the liar registered as may name its own child; the
                        // VM's running guest must stay the one its supervisor named.
                        if liar_slot != slot && owner_guest_now != owner_guest {
                            return Err(format!(
                                "invariant 3: pid {} renamed the guest of {} to {}",
                                liar.pid, self.vms[slot].name, named.pid
                            ));
                        }
                        None
                    }
                    Err(e) => Some(e.to_string()),
                }
            }
            4 => match daemon.table.migrate_prepare(
                caller_of(&self.kernel, liar.pid),
                &uuid,
                "liar".into(),
            ) {
                Ok(_) => {
                    return Err(format!(
                        "invariant 3: pid {} prepared a migration of {} for its supervisor",
                        liar.pid, self.vms[slot].name
                    ))
                }
                Err(e) => Some(e.to_string()),
            },
            5 => {
                // Registers a VM of its own whose "guest" is another VM's running guest.
                let Some(foreign) =
                    victim_guest.filter(|g| g.ppid != liar.pid && g.pid != liar.pid)
                else {
                    return Ok(());
                };
                let identity = VmIdentity {
                    uuid: self.vms[self.rogue].uuid.clone(),
                    name: "rogue".into(),
                    id: 999,
                    pid: foreign.pid,
                };
                let link = LinkId(u64::MAX - self.step);
                let (r, fx) = daemon.table.hold(
                    &mut self.host,
                    caller_of(&self.kernel, liar.pid),
                    link,
                    identity,
                    proc_info(&self.kernel, &foreign),
                    Vec::new(),
                    None,
                );
                self.apply(fx)?;
                match r {
                    Ok(()) => {
                        return Err(format!(
                            "invariant 3: pid {} registered {}'s guest {} as its own",
                            liar.pid, self.vms[slot].name, foreign.pid
                        ))
                    }
                    Err(e) => Some(e.to_string()),
                }
            }
            6 => return self.migration_walk(slot, liar_slot),
            9 => {
                // A process that got the pid of the VM's dead supervisor (pid reuse) asks to
                // release the VM's locks: the kernel's peer credentials name that pid.
                let Some(dead) = self.vms[slot]
                    .holder
                    .as_ref()
                    .map(|h| h.process)
                    .filter(|p| !self.kernel.borrow().is_alive(p.pid, p.start_time))
                else {
                    return Ok(());
                };
                let Some(impostor) = self.kernel.borrow().process(dead.pid) else {
                    return Ok(());
                };
                if impostor_in_window {
                    return Ok(());
                }
                let (r, fx) = daemon.table.release(
                    &mut self.host,
                    caller_of(&self.kernel, impostor.pid),
                    &uuid,
                    None,
                    false,
                );
                self.count("lie:reused_holder_pid:sent");
                self.apply(fx)?;
                r.err().map(|e| e.to_string())
            }
            7 => {
                // Versions read from `status` (public to root), or made up.
                let mut versions: Vec<(Resource, u64)> = daemon
                    .table
                    .inquire(&uuid)
                    .map(|h| h.into_iter().map(|h| (h.resource, h.version)).collect())
                    .unwrap_or_default();
                if !self.gap_versions_from_status || self.rng.chance(50) {
                    for v in &mut versions {
                        v.1 += 1;
                    }
                }
                // The liar never saw the source's prepare reply: no token, or a guess.
                match daemon.table.acquire_incoming(
                    &mut self.host,
                    caller_of(&self.kernel, liar.pid),
                    &uuid,
                    &versions,
                    Some("0123456789abcdef"),
                ) {
                    // Only the registered destination gets copies (the rogue may be one, see
                    // `migration_walk`); dropping them unlocks nothing, and what it could do
                    // with them is for invariants 1 and 2 to judge.
                    Ok(h) => {
                        drop(h);
                        None
                    }
                    Err(e) => Some(e.to_string()),
                }
            }
            _ => {
                let success = self.rng.chance(50);
                let (result, fx) = daemon.table.migrate_complete_idempotent(
                    caller_of(&self.kernel, liar.pid),
                    &uuid,
                    success,
                );
                match result {
                    Ok(()) => {
                        self.apply(fx)?;
                        None
                    }
                    Err(e) => Some(e.to_string()),
                }
            }
        };
        if let Some(e) = refusal {
            self.refused("refused:lie");
            self.check_unchanged(before, "lie", &e)?;
        }
        Ok(())
    }

    /// The rogue walks a migration of VM `slot` to itself: registers as its destination while the
    /// real source has one prepared, takes the descriptions with versions read from `status`,
    /// and completes it.
    fn migration_walk(&mut self, slot: usize, liar_slot: usize) -> Result<(), String> {
        if liar_slot != self.rogue {
            return Ok(());
        }
        let uuid = self.vms[slot].uuid.clone();
        let Some(rogue) = self.vms[self.rogue].holder.as_ref().map(|h| h.process) else {
            return Ok(());
        };
        let Some(rogue_link) = self.vms[self.rogue].holder.as_ref().and_then(|h| h.link) else {
            return Ok(());
        };
        let rogue_guest = self.vms[self.rogue].guest.unwrap_or(rogue);
        let identity = self.identity(slot, &rogue_guest);
        let before = self.snapshot();
        let daemon = self.daemon.as_mut().expect("callers check");
        let registered = daemon.table.hold_incoming(
            caller_of(&self.kernel, rogue.pid),
            rogue_link,
            &identity,
            proc_info(&self.kernel, &rogue_guest),
        );
        let fx = match registered {
            Ok(fx) => fx,
            Err(e) => {
                self.refused("refused:lie");
                return self.check_unchanged(before, "hold_incoming", &e.to_string());
            }
        };
        self.apply(fx)?;
        self.count("lie:registered_as_destination");
        let daemon = self.daemon.as_mut().expect("callers check");
        let mut versions: Vec<(Resource, u64)> = daemon
            .table
            .inquire(&uuid)
            .map(|h| h.into_iter().map(|h| (h.resource, h.version)).collect())
            .unwrap_or_default();
        if !self.gap_versions_from_status {
            for v in &mut versions {
                v.1 += 1;
            }
        }
        // Versions are public (`status`); the source's hand-over token is not.
        let handover = match daemon.table.acquire_incoming(
            &mut self.host,
            caller_of(&self.kernel, rogue.pid),
            &uuid,
            &versions,
            None,
        ) {
            Ok(h) => h,
            Err(_) => return Ok(()),
        };
        let taken = daemon.table.incoming_taken(&uuid, handover.link).is_ok();
        let disks: Vec<usize> = handover
            .handover
            .iter()
            .filter_map(|(l, _)| disk_of(&l.key))
            .collect();
        if let Some(h) = self.vms[self.rogue].holder.as_mut() {
            h.kept
                .extend(handover.handover.into_iter().map(|(lock, fd)| Kept {
                    lock,
                    fd,
                    pending: None,
                }));
        }
        let daemon = self.daemon.as_mut().expect("callers check");
        if !taken {
            return Ok(());
        }
        if let (Ok(()), fx) = daemon.table.migrate_complete_idempotent(
            caller_of(&self.kernel, rogue.pid),
            &uuid,
            true,
        ) {
            self.apply(fx)?;
            let owner = self.daemon.as_ref().and_then(|d| d.table.holder_pid(&uuid));
            if owner == Some(rogue.pid) {
                self.count("lie:stole_a_vm");
                // The rogue's guest now writes the victim's disks.
                for d in disks {
                    let kind = kind_of(self.disks[d].mode);
                    self.vms[self.rogue].granted.insert(d, kind);
                }
            }
        }
        Ok(())
    }

    /// A request sent twice (a client retrying after a timeout).
    fn duplicate(&mut self, slot: usize) -> Result<(), String> {
        let Some(pid) = self.running_holder(slot) else {
            return Ok(());
        };
        if self.rng.chance(50) {
            let disks = self.vms[slot].last_acquire.clone();
            if disks.is_empty() {
                return Ok(());
            }
            self.request_acquire(slot, pid, &disks)
        } else {
            let Some(resource) = self.vms[slot].last_release.clone() else {
                return Ok(());
            };
            // Releasing what the guest still uses would be the client's bug, not a duplicate.
            let in_use = self.vms[slot]
                .granted
                .keys()
                .any(|d| self.resource(*d) == resource);
            if in_use {
                return Ok(());
            }
            self.release(slot, pid, resource)
        }
    }

    /// Whether every disk VM `slot` was granted is still locked in the kernel (by anyone's
    /// description) with the granted kind.
    fn kernel_keeps_granted(&self, slot: usize) -> bool {
        let kernel = self.kernel.borrow();
        self.vms[slot].granted.iter().all(|(&disk, &kind)| {
            let file = self.disks[disk].file;
            kernel
                .holders_of(file, key_of(disk).byte)
                .iter()
                .any(|(_, k)| *k == kind)
        })
    }

    // ---- invariants ------------------------------------------------------------------------

    /// Invariants 1 and 2 against the kernel.
    pub fn check(&self) -> Result<(), String> {
        let kernel = self.kernel.borrow();
        let live: Vec<usize> = (0..self.vms.len())
            .filter(|&s| {
                self.vms[s]
                    .guest
                    .is_some_and(|g| kernel.is_alive(g.pid, g.start_time))
            })
            .collect();
        // 2: never a live guest without its locks.
        for &s in &live {
            let vm = &self.vms[s];
            let holder = vm.holder.as_ref();
            let holder_alive =
                holder.is_some_and(|h| kernel.is_alive(h.process.pid, h.process.start_time));
            for (&disk, &kind) in &vm.granted {
                let key = key_of(disk);
                let file = self.disks[disk].file;
                let locked = if holder_alive {
                    holder.expect("alive").kept.iter().any(|k| {
                        k.lock.key == key
                            && kernel.file_of(k.fd.ofd()) == Some(file)
                            && kernel.lock_of(k.fd.ofd(), key.byte) == Some(kind)
                    })
                } else {
                    // An orphan: the daemon's own copy keeps it until the guest has exited.
                    kernel
                        .holders_of(file, key.byte)
                        .iter()
                        .any(|(_, k)| *k == kind)
                };
                if !locked {
                    return Err(format!(
                        "invariant 2: guest {} of {} runs without its {kind:?} lock on disk{disk} (supervisor {})",
                        vm.guest.map_or(0, |g| g.pid),
                        vm.name,
                        if holder_alive { "alive" } else { "dead" }
                    ));
                }
            }
        }
        // 1: never two writers.
        for (i, &a) in live.iter().enumerate() {
            for &b in &live[i + 1..] {
                for (disk, ka) in &self.vms[a].granted {
                    let Some(kb) = self.vms[b].granted.get(disk) else {
                        continue;
                    };
                    if *ka == LockKind::Exclusive || *kb == LockKind::Exclusive {
                        return Err(format!(
                            "invariant 1: {} and {} both write disk{disk} ({ka:?} / {kb:?})",
                            self.vms[a].name, self.vms[b].name
                        ));
                    }
                }
                // Through their supervisors' descriptions: one description, two VMs.
                let (Some(ha), Some(hb)) = (&self.vms[a].holder, &self.vms[b].holder) else {
                    continue;
                };
                for ka in &ha.kept {
                    let Some(kind) = kernel.lock_of(ka.fd.ofd(), ka.lock.key.byte) else {
                        continue;
                    };
                    if kind == LockKind::Exclusive
                        && hb.kept.iter().any(|kb| kb.fd.ofd() == ka.fd.ofd())
                    {
                        return Err(format!(
                            "invariant 1: {} and {} both keep the description holding the exclusive lock on {:?}",
                            self.vms[a].name, self.vms[b].name, ka.lock.key
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Lets everything in flight land (daemon up, events delivered, acquires answered,
    /// supervisors reconnected, finished VMs reaped), then checks invariant 5.
    pub fn settle(&mut self) -> Result<(), String> {
        self.daemon_restart()?;
        while !self.pending.is_empty() {
            self.complete_acquire(0)?;
        }
        for _ in 0..3 {
            while let Some(e) = self.events.pop() {
                self.deliver(e)?;
            }
            for slot in 0..self.rogue {
                self.reap(slot)?;
                self.reconnect(slot)?;
            }
        }
        self.check()?;
        // 5: every lock in the kernel belongs to a live guest's VM.
        let kernel = self.kernel.borrow();
        let daemon = self.daemon.as_ref().expect("restarted above");
        let table_grants = daemon.table.grants();
        for ((file, byte), holders) in kernel.lock_snapshot() {
            for (ofd, kind) in holders {
                let kept_by_live_vm = self.vms.iter().any(|vm| {
                    let guest_alive = vm
                        .guest
                        .is_some_and(|g| kernel.is_alive(g.pid, g.start_time));
                    let kept = |h: &Holder| h.kept.iter().any(|k| k.fd.ofd() == ofd);
                    (guest_alive && vm.holder.as_ref().is_some_and(kept))
                        || vm
                            .migration
                            .as_ref()
                            .and_then(|m| m.incoming.as_ref())
                            .is_some_and(|i| {
                                kernel.is_alive(i.guest.pid, i.guest.start_time) && kept(&i.holder)
                            })
                });
                let granted_to_live_owner = table_grants.iter().any(|(uuid, key, _, _)| {
                    key.ino == file
                        && key.byte == byte
                        && daemon
                            .table
                            .persisted_owner(uuid)
                            .is_some_and(|o| kernel.is_alive(o.vm.pid, o.start_time))
                });
                if !kept_by_live_vm && !granted_to_live_owner {
                    return Err(format!(
                        "invariant 5: after settling, description {ofd} still holds a {kind:?} lock on file {file} byte {byte} for no live guest; DEBUG vms: {:?} status: {:?}",
                        self.vms.iter().map(|v| (v.name.clone(), v.guest, v.holder.as_ref().map(|h| (h.process, h.link, h.kept.iter().map(|k| k.fd.ofd()).collect::<Vec<_>>())))).collect::<Vec<_>>(),
                        daemon.table.status()
                    ));
                }
            }
        }
        Ok(())
    }
}
