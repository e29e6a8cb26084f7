//! The world of the model (the real table over [`ModelHost`], supervisors, notifications, the
//! daemon's state file), its actions and its properties.

use crate::host::{Fd, ModelHost};
use crate::properties as p;
use stateright::{Model, Property};
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use vmlock::{DiskMode, Resource};
use vmlock_core::types::{AcquireFlags, HeldLock, LockKey, VmIdentity};
use vmlock_core::{
    Caller, Effects, LinkId, LockKind, LockTable, Opened, Persisted, Policy, ProcInfo, Push,
    Sabotage, Ticket,
};

/// A supervisor (holder process) and its guest. VM A has two: its migration source and
/// destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// VM A's supervisor on the source side; starts holding both disks.
    Source,
    /// VM A's migration destination's supervisor.
    Dest,
    /// VM B, which wants disk 0.
    B,
    /// VM C, which wants disks 0 and 1.
    C,
}

const ROLES: [Role; 4] = [Role::Source, Role::Dest, Role::B, Role::C];
const DISKS: [u8; 2] = [0, 1];

impl Role {
    fn idx(self) -> usize {
        self as usize
    }
    fn holder_pid(self) -> u32 {
        10 * (self.idx() as u32 + 1)
    }
    fn guest_pid(self) -> u32 {
        self.holder_pid() + 1
    }
    /// Index of its VM: A = 0, B = 1, C = 2.
    fn vm(self) -> usize {
        match self {
            Role::Source | Role::Dest => 0,
            Role::B => 1,
            Role::C => 2,
        }
    }
    fn uuid(self) -> &'static str {
        UUIDS[self.vm()]
    }
    fn wants(self) -> &'static [u8] {
        match self {
            Role::B => &[0],
            _ => &[0, 1],
        }
    }
    fn caller(self) -> Caller {
        Caller {
            pid: self.holder_pid(),
            start_time: start_time(self.holder_pid()),
        }
    }
    fn identity(self) -> VmIdentity {
        VmIdentity {
            uuid: self.uuid().into(),
            name: ["a", "b", "c"][self.vm()].into(),
            id: self.vm() as u32 + 1,
            pid: self.guest_pid(),
        }
    }
    fn guest(self) -> ProcInfo<u32> {
        ProcInfo {
            pid: self.guest_pid(),
            start_time: start_time(self.guest_pid()),
            ppid: self.holder_pid(),
            parent_of_caller: false,
            handle: self.guest_pid(),
        }
    }
}

const UUIDS: [&str; 3] = [
    "00000000-0000-4000-8000-00000000000a",
    "00000000-0000-4000-8000-00000000000b",
    "00000000-0000-4000-8000-00000000000c",
];

fn start_time(pid: u32) -> u64 {
    1000 + u64::from(pid)
}

fn key(disk: u8) -> LockKey {
    LockKey {
        dev: 1,
        ino: u64::from(disk) + 1,
        byte: 0,
    }
}

fn disk_of(key: &LockKey) -> Option<u8> {
    DISKS.into_iter().find(|d| self::key(*d) == *key)
}

fn resource(disk: u8) -> Resource {
    Resource::Disk {
        path: format!("/images/d{disk}.qcow2").into(),
        mode: DiskMode::Exclusive,
    }
}

fn disk_of_resource(r: &Resource) -> Option<u8> {
    DISKS.into_iter().find(|d| resource(*d) == *r)
}

/// What the destination presents to `acquire_incoming`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Presented {
    /// The state the source's prepare handed out.
    Current,
    /// Its versions with a made-up token.
    ForgedToken,
    /// Its versions without a token (as the public `status` shows them).
    NoToken,
    /// Its token with every version one lower (a state from before a hand-over).
    OldVersions,
    /// Its token and versions, leaving out one of the VM's disks.
    LeavesOutDisk,
}

const PRESENTED: [Presented; 5] = [
    Presented::Current,
    Presented::ForgedToken,
    Presented::NoToken,
    Presented::OldVersions,
    Presented::LeavesOutDisk,
];

/// A notification the daemon has not handled yet (delivered in any order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Event {
    /// A holder connection closed (`holder_closed`).
    HolderClosed {
        /// Which connection.
        link: u64,
        /// Whether its process still runs.
        alive: bool,
    },
    /// A guest's pidfd fired (`guest_exited`).
    GuestExited(Role),
}

/// One step of the model, named after the core call it makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// `hold`: B or C registers.
    Hold(Role),
    /// Opens the disks the VM wants and calls `reserve`; the copies go to its supervisor.
    Reserve(Role),
    /// `commit` of the VM's pending acquire.
    Commit(Role),
    /// `abort` of the VM's pending acquire (its supervisor did not ack).
    Abort(Role),
    /// `release` of everything (the guest stops writing first).
    Release(Role),
    /// `shutdown`: the supervisor says its guest ended.
    Shutdown(Role),
    /// The guest process exits (its `guest_exited` is queued).
    GuestExits(Role),
    /// The supervisor exits after its guest did, closing its copies.
    SupervisorExits(Role),
    /// The supervisor dies while its guest runs (the guest lives on only while the daemon
    /// will hear of it and holds copies of its locks; else PDEATHSIG kills it too).
    SupervisorDies(Role),
    /// The holder connection drops; the supervisor lives (`holder_closed(alive)` queued).
    ConnectionDrops(Role),
    /// `hold` with `adopt`: a supervisor hands back every description it keeps (each re-checked
    /// in the kernel first, as the daemon does).
    Reconnect(Role),
    /// The daemon handles one queued notification.
    Deliver(Event),
    /// `migrate_prepare` on the source.
    Prepare,
    /// `hold_incoming` of the destination.
    HoldIncoming,
    /// `acquire_incoming` with what the destination presents; the copies go to it.
    AcquireIncoming(Presented),
    /// `incoming_taken`: the destination keeps its copies.
    IncomingTaken,
    /// `migrate_complete` from the source or the destination.
    Complete {
        /// Who asks.
        by: Role,
        /// Finish (true) or cancel.
        success: bool,
    },
    /// The daemon crashes: its descriptions close; the state file survives.
    DaemonCrash,
    /// A new daemon: `recover` from the state file.
    DaemonRecover,
}

/// The core under check, or a deliberately broken one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// The real core and a faithful daemon shell.
    Real,
    /// The core with `Sabotage::UnlockOnHolderClose`.
    UnlockOnHolderClose,
    /// The core with `Sabotage::SkipKernelLock`.
    SkipKernelLock,
    /// A daemon shell that trusts the destination: it passes `acquire_incoming` the current
    /// versions and the token it handed out itself, whatever the destination presented (as a
    /// hand-off without a fencing check would).
    TrustingShell,
}

/// How far the check goes.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Actions on every path.
    pub depth: usize,
    /// Daemon crashes on every path.
    pub crashes: u8,
}

/// The model: the real core's hand-off, with `variant`, within `bounds`.
#[derive(Debug, Clone)]
pub struct HandoffModel {
    /// Which core.
    pub variant: Variant,
    /// How far.
    pub bounds: Bounds,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Kept {
    fd: Fd,
    /// Copies of a reservation not yet committed.
    pending: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
struct Sup {
    registered: bool,
    link: Option<u64>,
    links_made: u64,
    kept: Vec<Kept>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
struct Migration {
    /// What the source's prepare handed out: token and versions.
    prepared: Option<(String, Vec<(u8, u64)>)>,
    dest_ended: bool,
}

#[derive(Debug, Clone)]
struct World {
    host: ModelHost,
    table: Option<LockTable<ModelHost>>,
    state_file: Persisted,
    sups: [Sup; 4],
    events: BTreeSet<Event>,
    pending: BTreeMap<Role, Ticket>,
    /// Ground truth: the disks each VM's guest writes (acquire committed, not released).
    granted: [BTreeSet<u8>; 3],
    /// VM A runs as its destination's guest (the migration finished).
    a_on_dest: bool,
    migration: Migration,
    crashes: u8,
    violations: BTreeSet<&'static str>,
}

/// A state of the model: the world, identified by its rendering (computed once), and the number
/// of actions that led to it. The depth is not part of the identity: breadth first on one
/// thread, a state is first reached by a shortest path, so a later, longer path to it has
/// nothing new to explore.
#[derive(Clone)]
pub struct State {
    world: World,
    id: String,
    depth: usize,
}

impl PartialEq for State {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}
impl Eq for State {}
impl Hash for State {
    fn hash<S: Hasher>(&self, h: &mut S) {
        self.id.hash(h);
    }
}
impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.id)
    }
}

impl State {
    fn seal(world: World, depth: usize) -> State {
        let w = &world;
        let id = format!(
            "host {:?}\nsups {:?}\nevents {:?}\npending {:?}\ngranted {:?} a_on_dest {}\nmigration {:?} crashes {}\nviolations {:?}\nstate file {:?}\ntable {}",
            w.host,
            w.sups,
            w.events,
            w.pending,
            w.granted,
            w.a_on_dest,
            w.migration,
            w.crashes,
            w.violations,
            w.state_file,
            w.table.as_ref().map_or("down".into(), |t| t.fingerprint()),
        );
        State { world, id, depth }
    }

    /// Property names this state's path broke on the way (event properties).
    pub fn violations(&self) -> impl Iterator<Item = &&'static str> {
        self.world.violations.iter()
    }
}

impl World {
    fn policy(variant: Variant) -> Policy {
        Policy {
            sabotage: match variant {
                Variant::UnlockOnHolderClose => Sabotage::UnlockOnHolderClose,
                Variant::SkipKernelLock => Sabotage::SkipKernelLock,
                Variant::Real | Variant::TrustingShell => Sabotage::None,
            },
            ..Policy::default()
        }
    }

    /// VM A's source holds both disks; B and C run, unregistered; the destination's processes
    /// run, unregistered.
    fn initial(variant: Variant) -> World {
        let mut w = World {
            host: ModelHost::default(),
            table: Some(LockTable::new(World::policy(variant), "model".into())),
            state_file: Persisted::default(),
            sups: Default::default(),
            events: BTreeSet::new(),
            pending: BTreeMap::new(),
            granted: Default::default(),
            a_on_dest: false,
            migration: Migration::default(),
            crashes: 0,
            violations: BTreeSet::new(),
        };
        w.hold(Role::Source);
        w.reserve(Role::Source);
        w.commit(Role::Source);
        w
    }

    fn holder_alive(&self, r: Role) -> bool {
        self.host.alive(r.holder_pid())
    }

    fn guest_alive(&self, r: Role) -> bool {
        self.host.alive(r.guest_pid())
    }

    /// The role that is its VM's supervisor now.
    fn current(&self, r: Role) -> bool {
        match r {
            Role::Source => !self.a_on_dest,
            Role::Dest => self.a_on_dest,
            Role::B | Role::C => true,
        }
    }

    fn writer_role(&self, vm: usize) -> Role {
        match vm {
            0 if self.a_on_dest => Role::Dest,
            0 => Role::Source,
            1 => Role::B,
            _ => Role::C,
        }
    }

    fn new_link(&mut self, r: Role) -> u64 {
        let s = &mut self.sups[r.idx()];
        s.links_made += 1;
        (r.idx() as u64 + 1) * 100 + s.links_made
    }

    fn role_of_link(&self, link: u64) -> Option<Role> {
        ROLES
            .into_iter()
            .find(|r| self.sups[r.idx()].link == Some(link))
    }

    fn drop_kept(&mut self, r: Role, mut which: impl FnMut(&Kept) -> bool) {
        let kept = std::mem::take(&mut self.sups[r.idx()].kept);
        let (gone, stay): (Vec<Kept>, Vec<Kept>) = kept.into_iter().partition(|k| which(k));
        self.sups[r.idx()].kept = stay;
        for k in gone {
            self.host.close(k.fd);
        }
    }

    /// Carries out a call's effects, as the daemon does after letting go of the table.
    fn apply(&mut self, fx: Effects<Fd>) {
        for d in fx.close {
            self.host.close(d);
        }
        for (link, push) in fx.pushes {
            let Some(r) = self.role_of_link(link.0) else {
                continue; // that connection is gone: the push is lost with it
            };
            match push {
                Push::Close(keys) => {
                    let disks: Vec<u8> = keys.iter().filter_map(disk_of).collect();
                    self.drop_kept(r, |k| disks.contains(&k.fd.disk));
                }
                Push::Finished => self.drop_kept(r, |_| true),
            }
        }
        for (pid, _) in fx.kill {
            let Some(r) = ROLES.into_iter().find(|r| r.guest_pid() == pid) else {
                continue;
            };
            if self.holder_alive(r) {
                self.violations.insert(p::NO_KILL_OF_A_SUPERVISED_GUEST);
            }
            if self.guest_alive(r) {
                self.guest_exits(r);
            }
        }
        self.persist();
        // The core may hand a migrating VM to its destination by itself (its source died).
        if !self.a_on_dest
            && self.table.as_ref().and_then(|t| t.guest_of(UUIDS[0]))
                == Some((Role::Dest.guest_pid(), Role::Dest.holder_pid()))
        {
            self.a_on_dest = true;
            self.migration.prepared = None;
        }
    }

    fn persist(&mut self) {
        if let Some(t) = &self.table {
            self.state_file = t.persisted();
        }
    }

    fn guest_exits(&mut self, r: Role) {
        self.host.exit(r.guest_pid());
        if self.table.is_some() {
            self.events.insert(Event::GuestExited(r));
        }
    }

    fn holder_exits(&mut self, r: Role) {
        self.host.exit(r.holder_pid());
        self.drop_kept(r, |_| true);
        if let Some(link) = self.sups[r.idx()].link.take() {
            self.events
                .insert(Event::HolderClosed { link, alive: false });
        }
    }

    /// The destination goes away (its QEMU quits, its supervisor exits).
    fn end_dest(&mut self) {
        if self.guest_alive(Role::Dest) {
            self.guest_exits(Role::Dest);
        }
        if self.holder_alive(Role::Dest) {
            self.holder_exits(Role::Dest);
        }
        self.migration.dest_ended = true;
        self.migration.prepared = None;
    }

    fn hold(&mut self, r: Role) {
        let link = self.new_link(r);
        let Some(table) = self.table.as_mut() else {
            return;
        };
        let (result, fx) = table.hold(
            &mut self.host,
            r.caller(),
            LinkId(link),
            r.identity(),
            r.guest(),
            Vec::new(),
            Some(AcquireFlags::default()),
        );
        if result.is_ok() {
            let s = &mut self.sups[r.idx()];
            s.registered = true;
            s.link = Some(link);
        }
        self.apply(fx);
    }

    fn reserve(&mut self, r: Role) {
        let opened: Vec<Opened<Fd>> = r
            .wants()
            .iter()
            .map(|d| Opened {
                resource: resource(*d),
                key: key(*d),
                desc: self.host.open(*d),
                image: None,
            })
            .collect();
        let Some(table) = self.table.as_mut() else {
            return;
        };
        let (result, fx) = table.reserve(
            &mut self.host,
            r.caller(),
            r.uuid(),
            opened,
            &AcquireFlags::default(),
        );
        self.apply(fx);
        if let Ok(Some(reservation)) = result {
            for (_, fd) in reservation.handover {
                self.sups[r.idx()].kept.push(Kept { fd, pending: true });
            }
            self.pending.insert(r, reservation.ticket);
        }
    }

    fn commit(&mut self, r: Role) {
        let (Some(ticket), Some(table)) = (self.pending.remove(&r), self.table.as_mut()) else {
            return;
        };
        let (result, fx) = table.commit(r.uuid(), ticket);
        self.apply(fx);
        match result {
            Ok(granted) => {
                for g in granted {
                    if let Some(d) = disk_of_resource(&g.resource) {
                        self.granted[r.vm()].insert(d);
                    }
                }
                for k in &mut self.sups[r.idx()].kept {
                    k.pending = false;
                }
            }
            // The acquire failed: the supervisor closes what it got for it.
            Err(_) => self.drop_kept(r, |k| k.pending),
        }
    }

    fn abort(&mut self, r: Role) {
        let (Some(ticket), Some(table)) = (self.pending.remove(&r), self.table.as_mut()) else {
            return;
        };
        let fx = table.abort(&mut self.host, r.uuid(), ticket);
        self.apply(fx);
        self.drop_kept(r, |k| k.pending);
    }

    fn reconnect(&mut self, r: Role) {
        let link = self.new_link(r);
        // Each description is passed over the socket (a new reference) and re-checked in the
        // kernel by the daemon: one whose lock went elsewhere meanwhile is not adopted.
        let mut adopt = Vec::new();
        for k in self.sups[r.idx()].kept.clone() {
            let copy = k.fd;
            let _ = vmlock_core::Host::duplicate(&mut self.host, &copy);
            match vmlock_core::Host::try_lock(&mut self.host, &copy, LockKind::Exclusive, 0) {
                Ok(true) => adopt.push((
                    HeldLock {
                        resource: resource(copy.disk),
                        key: key(copy.disk),
                    },
                    copy,
                )),
                _ => self.host.close(copy),
            }
        }
        let Some(table) = self.table.as_mut() else {
            return;
        };
        let (result, fx) = table.hold(
            &mut self.host,
            r.caller(),
            LinkId(link),
            r.identity(),
            r.guest(),
            adopt,
            Some(AcquireFlags::default()),
        );
        if result.is_ok() {
            let s = &mut self.sups[r.idx()];
            s.link = Some(link);
            for k in &mut s.kept {
                k.pending = false;
            }
        }
        self.apply(fx);
    }

    /// The source's supervisor must keep a locked description of every disk VM A writes, and
    /// the table must still grant them to A.
    fn check_source_keeps_all(&mut self) {
        if self.a_on_dest || !self.holder_alive(Role::Source) || !self.guest_alive(Role::Source) {
            return;
        }
        let grants: BTreeSet<u8> = self.table.as_ref().map_or_else(BTreeSet::new, |t| {
            t.grants()
                .into_iter()
                .filter(|(u, ..)| *u == UUIDS[0])
                .filter_map(|(_, k, ..)| disk_of(&k))
                .collect()
        });
        for d in self.granted[0].clone() {
            if !self.keeps_lock(Role::Source, d) || !grants.contains(&d) {
                self.violations.insert(p::CANCEL_KEEPS_SOURCE);
            }
        }
    }

    /// Whether supervisor `r` keeps a description holding the exclusive lock on `disk`.
    fn keeps_lock(&self, r: Role, disk: u8) -> bool {
        let lockers = self.host.lockers(disk);
        self.sups[r.idx()]
            .kept
            .iter()
            .any(|k| k.fd.disk == disk && lockers.contains(&(k.fd.ofd, LockKind::Exclusive)))
    }

    fn acquire_incoming(&mut self, presented: Presented, variant: Variant) {
        let Some((token, versions)) = self.migration.prepared.clone() else {
            return;
        };
        let mut versions: Vec<(Resource, u64)> = versions
            .into_iter()
            .map(|(d, v)| (resource(d), v))
            .collect();
        let mut token = Some(token);
        match presented {
            Presented::Current => {}
            Presented::ForgedToken => token = Some("forged".into()),
            Presented::NoToken => token = None,
            Presented::OldVersions => {
                for v in &mut versions {
                    v.1 = v.1.saturating_sub(1);
                }
            }
            Presented::LeavesOutDisk => {
                versions.pop();
            }
        }
        let Some(table) = self.table.as_mut() else {
            return;
        };
        if variant == Variant::TrustingShell {
            versions = table
                .inquire(UUIDS[0])
                .unwrap_or_default()
                .into_iter()
                .map(|h| (h.resource, h.version))
                .collect();
            token = self.migration.prepared.as_ref().map(|p| p.0.clone());
        }
        let before = self.host.clone();
        match table.acquire_incoming(
            &mut self.host,
            Role::Dest.caller(),
            UUIDS[0],
            &versions,
            token.as_deref(),
        ) {
            Ok(handover) => {
                if presented != Presented::Current {
                    self.violations.insert(p::STALE_OR_FORGED_REFUSED);
                }
                for (_, fd) in handover.handover {
                    self.sups[Role::Dest.idx()]
                        .kept
                        .push(Kept { fd, pending: true });
                }
            }
            // The copies made before the refusal were dropped (closed) by the core; nothing
            // else in the kernel changed.
            Err(_) => self.host = before,
        }
    }

    fn complete(&mut self, by: Role, success: bool) {
        let Some(table) = self.table.as_mut() else {
            return;
        };
        let (result, fx) = table.migrate_complete_idempotent(by.caller(), UUIDS[0], success);
        let ok = result.is_ok();
        self.apply(fx);
        let cancelled = if success {
            // Refused because the destination had not taken the copies: the core cancelled the
            // migration, and the source is told so; the destination goes away.
            !ok && by == Role::Source && !self.a_on_dest
        } else {
            ok && !self.a_on_dest && self.migration.prepared.is_some()
        };
        if cancelled {
            self.check_source_keeps_all();
            self.end_dest();
        }
    }

    fn crash(&mut self) {
        self.table = None;
        self.crashes += 1;
        // The daemon's descriptions close with it: only the supervisors' references survive.
        let mut survivors: BTreeMap<u32, u32> = BTreeMap::new();
        for s in &self.sups {
            for k in &s.kept {
                *survivors.entry(k.fd.ofd).or_default() += 1;
            }
        }
        self.host.keep_only(&survivors);
        self.pending.clear();
        self.events.clear();
        for s in &mut self.sups {
            s.link = None;
        }
        // A restart cancels a migration: the destination fails and goes away.
        if self.sups[Role::Dest.idx()].registered && !self.a_on_dest {
            self.end_dest();
        }
        self.migration.prepared = None;
        // A guest whose supervisor died is gone by now (PDEATHSIG).
        for r in ROLES {
            if self.guest_alive(r) && !self.holder_alive(r) {
                self.host.exit(r.guest_pid());
            }
        }
    }

    fn recover(&mut self, variant: Variant) {
        let mut table = LockTable::new(World::policy(variant), "model".into());
        let host = &self.host;
        table.recover(self.state_file.clone(), |pid, _| {
            host.alive(pid).then_some(pid)
        });
        self.table = Some(table);
        self.persist();
    }

    fn step(&mut self, action: Action, variant: Variant) {
        match action {
            Action::Hold(r) => self.hold(r),
            Action::Reserve(r) => self.reserve(r),
            Action::Commit(r) => self.commit(r),
            Action::Abort(r) => self.abort(r),
            Action::Release(r) => {
                self.granted[r.vm()].clear(); // the guest stops writing first
                if let Some(table) = self.table.as_mut() {
                    let (_, fx) = table.release(&mut self.host, r.caller(), r.uuid(), None, false);
                    self.apply(fx);
                }
            }
            Action::Shutdown(r) => {
                if let Some(table) = self.table.as_mut() {
                    let (result, fx) =
                        table.shutdown(&mut self.host, r.caller(), r.uuid(), r.guest_pid());
                    self.apply(fx);
                    if result.is_ok() {
                        self.granted[r.vm()].clear();
                    }
                }
            }
            Action::GuestExits(r) => self.guest_exits(r),
            Action::SupervisorExits(r) => self.holder_exits(r),
            Action::SupervisorDies(r) => {
                let heard = self.table.is_some() && self.sups[r.idx()].link.is_some();
                self.holder_exits(r);
                if !heard || r == Role::Dest {
                    self.guest_exits(r);
                }
            }
            Action::ConnectionDrops(r) => {
                if let Some(link) = self.sups[r.idx()].link.take() {
                    self.events
                        .insert(Event::HolderClosed { link, alive: true });
                }
            }
            Action::Reconnect(r) => self.reconnect(r),
            Action::Deliver(e) => {
                self.events.remove(&e);
                let Some(table) = self.table.as_mut() else {
                    return;
                };
                let fx = match e {
                    Event::HolderClosed { link, alive } => {
                        table.holder_closed(&mut self.host, LinkId(link), alive)
                    }
                    Event::GuestExited(r) => {
                        table.guest_exited(&mut self.host, r.uuid(), start_time(r.guest_pid()))
                    }
                };
                self.apply(fx);
            }
            Action::Prepare => {
                let Some(table) = self.table.as_mut() else {
                    return;
                };
                let token = format!("token-{}", self.crashes);
                if let Ok((held, token)) =
                    table.migrate_prepare(Role::Source.caller(), UUIDS[0], token)
                {
                    let versions = held
                        .iter()
                        .filter_map(|h| disk_of_resource(&h.resource).map(|d| (d, h.version)))
                        .collect();
                    self.migration.prepared = Some((token, versions));
                }
            }
            Action::HoldIncoming => {
                let link = self.new_link(Role::Dest);
                let Some(table) = self.table.as_mut() else {
                    return;
                };
                let r = Role::Dest;
                if let Ok(fx) =
                    table.hold_incoming(r.caller(), LinkId(link), &r.identity(), r.guest())
                {
                    let s = &mut self.sups[r.idx()];
                    s.registered = true;
                    s.link = Some(link);
                    self.apply(fx);
                }
            }
            Action::AcquireIncoming(presented) => self.acquire_incoming(presented, variant),
            Action::IncomingTaken => {
                let (Some(table), Some(link)) =
                    (self.table.as_mut(), self.sups[Role::Dest.idx()].link)
                else {
                    return;
                };
                if table.incoming_taken(UUIDS[0], LinkId(link)).is_ok() {
                    for k in &mut self.sups[Role::Dest.idx()].kept {
                        k.pending = false;
                    }
                }
            }
            Action::Complete { by, success } => self.complete(by, success),
            Action::DaemonCrash => self.crash(),
            Action::DaemonRecover => self.recover(variant),
        }
    }

    fn actions(&self, bounds: &Bounds, out: &mut Vec<Action>) {
        let up = self.table.is_some();
        if !up {
            out.push(Action::DaemonRecover);
        }
        for r in ROLES {
            let s = &self.sups[r.idx()];
            let holder = self.holder_alive(r);
            let guest = self.guest_alive(r);
            let linked = up && s.link.is_some();
            let current = self.current(r);
            if !s.registered {
                if up && holder && guest && matches!(r, Role::B | Role::C) {
                    out.push(Action::Hold(r));
                }
                continue;
            }
            if linked && holder && guest && matches!(r, Role::B | Role::C) {
                let all = r.wants().iter().all(|d| self.granted[r.vm()].contains(d));
                if !self.pending.contains_key(&r) && !all {
                    out.push(Action::Reserve(r));
                }
            }
            if up && self.pending.contains_key(&r) {
                out.push(Action::Commit(r));
                out.push(Action::Abort(r));
            }
            if linked && holder && current {
                if guest && !self.granted[r.vm()].is_empty() {
                    out.push(Action::Release(r));
                }
                if !guest {
                    out.push(Action::Shutdown(r));
                }
            }
            if guest {
                out.push(Action::GuestExits(r));
                if holder {
                    out.push(Action::SupervisorDies(r));
                }
            } else if holder {
                out.push(Action::SupervisorExits(r));
            }
            if linked && holder && current {
                out.push(Action::ConnectionDrops(r));
            }
            if up && !linked && holder && guest && current {
                out.push(Action::Reconnect(r));
            }
        }
        if up {
            let source_ready = self.sups[0].link.is_some()
                && self.holder_alive(Role::Source)
                && self.guest_alive(Role::Source)
                && !self.a_on_dest;
            let dest = &self.sups[Role::Dest.idx()];
            let dest_linked = dest.link.is_some() && self.holder_alive(Role::Dest);
            if source_ready && self.migration.prepared.is_none() && !self.migration.dest_ended {
                out.push(Action::Prepare);
            }
            if let Some((_, versions)) = &self.migration.prepared {
                if !dest.registered && self.holder_alive(Role::Dest) && self.guest_alive(Role::Dest)
                {
                    out.push(Action::HoldIncoming);
                }
                if dest_linked && dest.kept.is_empty() {
                    for presented in PRESENTED {
                        // With no disk held, old versions and a left-out disk are the
                        // current state itself.
                        let differs = !versions.is_empty()
                            || !matches!(
                                presented,
                                Presented::OldVersions | Presented::LeavesOutDisk
                            );
                        if differs {
                            out.push(Action::AcquireIncoming(presented));
                        }
                    }
                }
                if dest_linked && dest.kept.iter().any(|k| k.pending) {
                    out.push(Action::IncomingTaken);
                }
                if source_ready {
                    out.push(Action::Complete {
                        by: Role::Source,
                        success: true,
                    });
                    out.push(Action::Complete {
                        by: Role::Source,
                        success: false,
                    });
                }
                if dest_linked && !self.a_on_dest {
                    out.push(Action::Complete {
                        by: Role::Dest,
                        success: true,
                    });
                    out.push(Action::Complete {
                        by: Role::Dest,
                        success: false,
                    });
                }
            }
            for e in &self.events {
                out.push(Action::Deliver(*e));
            }
            if self.crashes < bounds.crashes {
                out.push(Action::DaemonCrash);
            }
        }
    }

    /// `(vm, disk, role)` for every disk a live guest writes.
    fn writers(&self) -> Vec<(usize, u8, Role)> {
        let mut all = Vec::new();
        for vm in 0..3 {
            let r = self.writer_role(vm);
            if self.guest_alive(r) {
                for d in &self.granted[vm] {
                    all.push((vm, *d, r));
                }
            }
        }
        all
    }

    fn never_two_writers(&self) -> bool {
        for d in DISKS {
            let writing: BTreeSet<usize> = self
                .writers()
                .into_iter()
                .filter(|w| w.1 == d)
                .map(|w| w.0)
                .collect();
            if writing.len() > 1 {
                return false;
            }
            // In the kernel: the VMs whose live guests' supervisors keep a description holding
            // the exclusive lock.
            let lockers = self.host.lockers(d);
            let keeping: BTreeSet<usize> = ROLES
                .into_iter()
                .filter(|r| self.guest_alive(*r))
                .filter(|r| {
                    self.sups[r.idx()].kept.iter().any(|k| {
                        k.fd.disk == d && lockers.contains(&(k.fd.ofd, LockKind::Exclusive))
                    })
                })
                .map(Role::vm)
                .collect();
            if keeping.len() > 1 {
                return false;
            }
        }
        true
    }

    fn writers_keep_locks(&self) -> bool {
        self.writers().into_iter().all(|(_, d, r)| {
            if self.holder_alive(r) {
                self.keeps_lock(r, d)
            } else {
                !self.host.lockers(d).is_empty()
            }
        })
    }

    /// Every safety property holds.
    fn safe(&self) -> bool {
        self.violations.is_empty()
            && self.never_two_writers()
            && self.writers_keep_locks()
            && self.no_lock_outlives_its_guest()
    }

    fn quiet(&self) -> bool {
        self.table.is_some()
            && self.events.is_empty()
            && self.pending.is_empty()
            && ROLES
                .into_iter()
                .all(|r| !self.holder_alive(r) || self.guest_alive(r))
    }

    fn no_lock_outlives_its_guest(&self) -> bool {
        let Some(table) = &self.table else {
            return true;
        };
        if !self.quiet() {
            return true;
        }
        let granted = table.grants();
        self.host.all_locks().all(|(disk, lockers)| {
            lockers.iter().all(|(ofd, _)| {
                let kept = ROLES.into_iter().any(|r| {
                    self.guest_alive(r) && self.sups[r.idx()].kept.iter().any(|k| k.fd.ofd == *ofd)
                });
                let in_table = granted.iter().any(|(u, k, ..)| {
                    *k == key(disk)
                        && table
                            .guest_of(u)
                            .is_some_and(|(guest, _)| self.host.alive(guest))
                });
                kept || in_table
            })
        })
    }
}

impl Model for HandoffModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State::seal(World::initial(self.variant), 0)]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        // A path ends at its first broken property (its counterexample is then a shortest one).
        if state.depth < self.bounds.depth && state.world.safe() {
            state.world.actions(&self.bounds, actions);
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut world = last.world.clone();
        world.step(action, self.variant);
        Some(State::seal(world, last.depth + 1))
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(p::NEVER_TWO_WRITERS, |_, s: &State| {
                s.world.never_two_writers()
            }),
            Property::always(p::WRITER_KEEPS_LOCK, |_, s: &State| {
                s.world.writers_keep_locks()
            }),
            Property::always(p::STALE_OR_FORGED_REFUSED, |_, s: &State| {
                !s.world.violations.contains(p::STALE_OR_FORGED_REFUSED)
            }),
            Property::always(p::CANCEL_KEEPS_SOURCE, |_, s: &State| {
                !s.world.violations.contains(p::CANCEL_KEEPS_SOURCE)
            }),
            Property::always(p::NO_LOCK_OUTLIVES_ITS_GUEST, |_, s: &State| {
                s.world.no_lock_outlives_its_guest()
            }),
            Property::always(p::NO_KILL_OF_A_SUPERVISED_GUEST, |_, s: &State| {
                !s.world
                    .violations
                    .contains(p::NO_KILL_OF_A_SUPERVISED_GUEST)
            }),
            // Reachability: the bound is deep enough to see each of these at least once.
            Property::sometimes("a migration finishes", |_, s: &State| s.world.a_on_dest),
            Property::sometimes("a migration is cancelled", |_, s: &State| {
                s.world.migration.dest_ended
                    && !s.world.a_on_dest
                    && s.world.guest_alive(Role::Source)
            }),
            Property::sometimes("a third VM gets a disk", |_, s: &State| {
                !s.world.granted[1].is_empty() || !s.world.granted[2].is_empty()
            }),
            Property::sometimes(
                "the source re-adopts its locks after a crash",
                |_, s: &State| {
                    s.world.crashes > 0
                        && s.world.table.is_some()
                        && s.world.sups[0].link.is_some()
                        && !s.world.granted[0].is_empty()
                },
            ),
        ]
    }
}
