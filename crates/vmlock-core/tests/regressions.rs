//! Regressions found by the simulator (crates/vmlock-sim), each replayed here as the shortest
//! sequence of table calls over a minimal host.

use std::collections::{BTreeSet, HashMap};
use std::time::SystemTime;
use vmlock::{DiskMode, LockFailureAction, Resource};
use vmlock_core::types::{AcquireFlags, LockKey, VmIdentity};
use vmlock_core::{Caller, Conflict, Host, LinkId, LockKind, LockTable, Opened, Policy, ProcInfo};

/// A description: its id and file (no reference counting needed here).
#[derive(Debug)]
struct Desc {
    ofd: u64,
    file: u64,
}

#[derive(Debug, Default)]
struct TinyHost {
    locks: HashMap<(u64, u64), Vec<(u64, LockKind)>>,
    exited: BTreeSet<(u32, u64)>,
    next_ofd: u64,
}

impl TinyHost {
    fn open(&mut self, file: u64) -> Desc {
        self.next_ofd += 1;
        Desc {
            ofd: self.next_ofd,
            file,
        }
    }
    fn locked_by_anyone(&self, file: u64) -> bool {
        self.locks.get(&(file, 0)).is_some_and(|v| !v.is_empty())
    }
}

impl Host for TinyHost {
    type Desc = Desc;
    type Proc = (u32, u64);
    fn try_lock(&mut self, desc: &Desc, kind: LockKind, byte: u64) -> std::io::Result<bool> {
        let holders = self.locks.entry((desc.file, byte)).or_default();
        if holders.iter().any(|(o, k)| {
            *o != desc.ofd && (kind == LockKind::Exclusive || *k == LockKind::Exclusive)
        }) {
            return Ok(false);
        }
        holders.retain(|(o, _)| *o != desc.ofd);
        holders.push((desc.ofd, kind));
        Ok(true)
    }
    fn unlock(&mut self, desc: &Desc) {
        for holders in self.locks.values_mut() {
            holders.retain(|(o, _)| *o != desc.ofd);
        }
    }
    fn probe(&mut self, _desc: &Desc, _byte: u64) -> Option<Conflict> {
        None
    }
    fn duplicate(&mut self, desc: &Desc) -> std::io::Result<Desc> {
        Ok(Desc {
            ofd: desc.ofd,
            file: desc.file,
        })
    }
    fn has_exited(&mut self, process: &(u32, u64)) -> bool {
        self.exited.contains(process)
    }
    fn now(&mut self) -> SystemTime {
        SystemTime::UNIX_EPOCH
    }
}

const UUID: &str = "00000000-0000-4000-8000-000000000001";

/// A request from process `pid` (its start time as `proc` gives it).
fn who(pid: u32) -> Caller {
    Caller {
        pid,
        start_time: 100 + u64::from(pid),
    }
}

fn proc(pid: u32, start_time: u64, ppid: u32) -> ProcInfo<(u32, u64)> {
    ProcInfo {
        pid,
        start_time,
        ppid,
        parent_of_caller: false,
        handle: (pid, start_time),
    }
}

fn identity(guest_pid: u32) -> VmIdentity {
    VmIdentity {
        uuid: UUID.into(),
        name: "vm".into(),
        id: 1,
        pid: guest_pid,
    }
}

fn disk() -> Resource {
    Resource::Disk {
        path: "/images/a.qcow2".into(),
        mode: DiskMode::Exclusive,
    }
}

/// VM `UUID` with holder 10 (link 1) and guest 11, holding `disk()` on file 1.
fn running_vm(host: &mut TinyHost, flags: AcquireFlags) -> LockTable<TinyHost> {
    vm_holding_disk(host, 10, proc(11, 111, 10), flags)
}

/// VM `UUID` registered by `holder` (link 1) with `guest`, holding `disk()` on file 1.
fn vm_holding_disk(
    host: &mut TinyHost,
    holder: u32,
    guest: ProcInfo<(u32, u64)>,
    flags: AcquireFlags,
) -> LockTable<TinyHost> {
    let mut table = LockTable::new(Policy::default(), "test".into());
    let (r, _) = table.hold(
        host,
        who(holder),
        LinkId(1),
        identity(guest.pid),
        guest,
        Vec::new(),
        Some(flags.clone()),
    );
    r.expect("hold");
    let opened = vec![Opened {
        resource: disk(),
        key: LockKey {
            dev: 1,
            ino: 1,
            byte: 0,
        },
        desc: host.open(1),
        image: None,
    }];
    let (r, _) = table.reserve(host, who(holder), UUID, opened, &flags);
    let reservation = r.ok().flatten().expect("reserved");
    let (r, _) = table.commit(UUID, reservation.ticket);
    r.expect("committed");
    table
}

/// The VM migrates: its source (pid 10) prepared, a process (pid 20) registered as the
/// destination. Returns the source's hand-over token and the versions `status` shows.
fn prepared_with_a_destination(table: &mut LockTable<TinyHost>) -> (String, Vec<(Resource, u64)>) {
    let (_, token) = table
        .migrate_prepare(who(10), UUID, "secret".into())
        .expect("prepared");
    table
        .hold_incoming(who(20), LinkId(2), &identity(21), proc(21, 121, 20))
        .expect("any process may register as the destination");
    let versions = table
        .inquire(UUID)
        .expect("status")
        .into_iter()
        .map(|h| (h.resource, h.version))
        .collect();
    (token, versions)
}

/// Seed 1 of the first simulator run: a root process registered as the destination of a
/// migration its source had prepared, took the descriptions with versions read from `status`,
/// and finished the migration itself: the running source guest lost its disks.
#[test]
fn only_the_source_may_finish_a_migration() {
    let mut host = TinyHost::default();
    let mut table = running_vm(&mut host, AcquireFlags::default());
    // Even a destination that got the source's whole state (token included) cannot finish.
    let (token, versions) = prepared_with_a_destination(&mut table);
    let handover = table
        .acquire_incoming(&mut host, who(20), UUID, &versions, Some(&token))
        .expect("current versions");
    table.incoming_taken(UUID, handover.link).expect("taken");
    assert!(
        table.migrate_complete(who(20), UUID, true).0.is_err(),
        "the destination finished the migration of a running VM"
    );
    assert_eq!(table.holder_pid(UUID), Some(10));
    // The destination may still cancel; the source's own success hands over.
    table
        .migrate_complete(who(10), UUID, true)
        .0
        .expect("source finishes");
    assert_eq!(table.holder_pid(UUID), Some(20));
}

/// Found by the torture campaign (issue 13, `vmlock-torture --seed 2 --ops 2000`): vmlockd was
/// SIGKILLed while a same-host migration waited for its finish. The new daemon knew no migration
/// (a restart cancels one: the source re-adopts its locks), yet the source's `migrate-finish` was
/// answered Ok; the VM manager then ended the source, whose shutdown released the disks under the
/// running destination guest (seen by the guest as no lock). A finish with no migration in
/// progress must be refused, so the source keeps running and holding; a cancel stays idempotent.
#[test]
fn a_finish_with_no_migration_in_progress_is_refused() {
    let mut host = TinyHost::default();
    let mut table = running_vm(&mut host, AcquireFlags::default());
    assert!(
        table.migrate_complete(who(10), UUID, true).0.is_err(),
        "a migration that is not in progress (cancelled by a daemon restart) was finished"
    );
    assert_eq!(table.holder_pid(UUID), Some(10));
    table
        .migrate_complete(who(10), UUID, false)
        .0
        .expect("a cancel with no migration in progress is a no-op");
    assert_eq!(table.holder_pid(UUID), Some(10));
}

/// Seed 19: a supervisor that got a dead supervisor's pid started the VM again (its record
/// empty, waiting) with `pause`; the table kept the dead guest's `ignore`.
#[test]
fn a_new_guest_brings_its_own_lock_failure_action() {
    let mut host = TinyHost::default();
    let mut table = LockTable::new(Policy::default(), "test".into());
    let ignore = AcquireFlags {
        on_lock_failure: LockFailureAction::Ignore,
        ..AcquireFlags::default()
    };
    let (r, _) = table.hold(
        &mut host,
        who(10),
        LinkId(1),
        identity(11),
        proc(11, 111, 10),
        Vec::new(),
        Some(ignore),
    );
    r.expect("hold");
    let _ = table.holder_closed(&mut host, LinkId(1), true);
    let pause = AcquireFlags {
        on_lock_failure: LockFailureAction::Pause,
        ..AcquireFlags::default()
    };
    let (r, _) = table.hold(
        &mut host,
        who(10),
        LinkId(2),
        identity(12),
        proc(12, 222, 10),
        Vec::new(),
        Some(pause),
    );
    r.expect("hold of the new guest");
    let recorded = table.persisted_owner(UUID).expect("recorded").flags;
    assert_eq!(recorded.on_lock_failure, LockFailureAction::Pause);
}

/// Seed 7: a VM's supervisor died (its guest still running, being killed); another process got
/// the dead supervisor's pid and released the VM's disks under the running guest.
#[test]
fn a_dead_supervisors_pid_no_longer_speaks_for_its_vm() {
    let mut host = TinyHost::default();
    let mut table = running_vm(&mut host, AcquireFlags::default());
    let fx = table.holder_closed(&mut host, LinkId(1), false);
    assert_eq!(fx.kill, vec![(11, 111)], "the orphaned guest is killed");
    let (r, _) = table.release(&mut host, who(10), UUID, None, false);
    assert!(r.is_err(), "pid 10 now names another process");
    assert!(host.locked_by_anyone(1), "the running guest keeps its lock");
    let (r, _) = table.shutdown(&mut host, who(10), UUID, 11);
    assert!(r.is_err());
    host.exited.insert((11, 111));
    let _ = table.guest_exited(&mut host, UUID, 111);
    assert!(
        !host.locked_by_anyone(1),
        "unlocked once the guest has exited"
    );
}

/// Seed 1879: a disk hotplugged while the migration was under way passed to the destination
/// with no copy the destination keeps (only the daemon's): a daemon restart would lose it
/// under the running guest.
#[test]
fn no_acquire_while_migrating() {
    let mut host = TinyHost::default();
    let mut table = running_vm(&mut host, AcquireFlags::default());
    table
        .migrate_prepare(who(10), UUID, "secret".into())
        .expect("prepared");
    let opened = vec![Opened {
        resource: Resource::Disk {
            path: "/images/b.qcow2".into(),
            mode: DiskMode::Exclusive,
        },
        key: LockKey {
            dev: 1,
            ino: 2,
            byte: 0,
        },
        desc: host.open(2),
        image: None,
    }];
    let (r, _) = table.reserve(&mut host, who(10), UUID, opened, &AcquireFlags::default());
    assert!(r.is_err(), "hotplug during a migration");
    assert!(!host.locked_by_anyone(2));
    // Once the migration is cancelled, hotplug works again.
    table
        .migrate_complete(who(10), UUID, false)
        .0
        .expect("cancelled");
    let opened = vec![Opened {
        resource: disk(),
        key: LockKey {
            dev: 1,
            ino: 1,
            byte: 0,
        },
        desc: host.open(1),
        image: None,
    }];
    let (r, _) = table.reserve(&mut host, who(10), UUID, opened, &AcquireFlags::default());
    assert!(r.is_ok(), "the same disk again is a no-op");
}

/// The versions are public (`status` shows them): a process that registers as the destination of
/// a prepared migration and presents them, without the source's hand-over token, gets nothing.
/// Found by the simulator with `--gap versions-from-status` (seed 4, step 311).
#[test]
fn versions_from_status_do_not_take_a_vm_over() {
    let mut host = TinyHost::default();
    let mut table = running_vm(&mut host, AcquireFlags::default());
    let (token, versions) = prepared_with_a_destination(&mut table);
    for guess in [None, Some("guess")] {
        let e = table
            .acquire_incoming(&mut host, who(20), UUID, &versions, guess)
            .expect_err("no copies without the token");
        assert!(e.to_string().contains("hand-over token"), "{e}");
    }
    // A second prepare hands out the same token (prepare is idempotent).
    let (_, again) = table
        .migrate_prepare(who(10), UUID, "other".into())
        .expect("prepared");
    assert_eq!(again, token);
    assert!(table
        .acquire_incoming(&mut host, who(20), UUID, &versions, Some(&token))
        .is_ok());
}

/// libvirt's holder is started by its guest-to-be (QEMU's pre-exec child), so it names its
/// parent as its guest; a process that is neither its child nor its parent is refused.
#[test]
fn a_holder_may_name_its_parent_as_guest_but_not_a_stranger() {
    let mut host = TinyHost::default();
    let mut table = LockTable::new(Policy::default(), "test".into());
    let stranger = proc(11, 111, 1);
    let (r, _) = table.hold(
        &mut host,
        who(10),
        LinkId(1),
        identity(11),
        stranger,
        Vec::new(),
        None,
    );
    assert!(r.is_err(), "a stranger was accepted as the guest");
    let mut parent = proc(11, 111, 1);
    parent.parent_of_caller = true;
    let (r, _) = table.hold(
        &mut host,
        who(10),
        LinkId(1),
        identity(11),
        parent,
        Vec::new(),
        None,
    );
    r.expect("the holder's parent is its guest");
    assert!(table
        .guest_started(who(10), UUID, proc(12, 112, 1))
        .is_err());
    let mut parent = proc(11, 111, 1);
    parent.parent_of_caller = true;
    table
        .guest_started(who(10), UUID, parent)
        .expect("naming the parent again");
}

/// Found by reading while the model checker was written: a success the destination had not
/// earned (it never took the copies over) cancels the migration, and the destination must be
/// told so even though the call fails; its Finished push was lost with the error.
#[test]
fn an_unearned_success_still_tells_the_destination() {
    let mut host = TinyHost::default();
    let mut table = running_vm(&mut host, AcquireFlags::default());
    let _ = prepared_with_a_destination(&mut table);
    let (r, fx) = table.migrate_complete(who(10), UUID, true);
    assert!(
        r.is_err(),
        "a migration finished that the destination never took over"
    );
    assert!(
        fx.pushes
            .iter()
            .any(|(_, p)| matches!(p, vmlock_core::Push::Finished)),
        "the destination was not told"
    );
    assert_eq!(table.holder_pid(UUID), Some(10));
}

/// Found by the torture campaign (seed 14): the state files lost the record of the holder naming
/// its guest (and what came after). The holder, reconnecting, names its guest and hands back
/// every description it keeps: it must be taken back, with the guest it names.
#[test]
fn a_holder_is_taken_back_when_the_record_of_its_guest_was_lost() {
    let mut host = TinyHost::default();
    let mut table = LockTable::new(Policy::default(), "test".into());
    // The record as the journal left it: holder 10 is its own guest, and holds disk() only.
    let (r, _) = table.hold(
        &mut host,
        who(10),
        LinkId(1),
        identity(10),
        proc(10, 110, 1),
        Vec::new(),
        Some(AcquireFlags::default()),
    );
    r.expect("hold");
    let a_key = LockKey {
        dev: 1,
        ino: 1,
        byte: 0,
    };
    let opened = vec![Opened {
        resource: disk(),
        key: a_key,
        desc: host.open(1),
        image: None,
    }];
    let (r, _) = table.reserve(&mut host, who(10), UUID, opened, &AcquireFlags::default());
    let reservation = r.ok().flatten().expect("reserved");
    table.commit(UUID, reservation.ticket).0.expect("committed");
    let _ = table.holder_closed(&mut host, LinkId(1), true);

    // It comes back naming its child 11 as the guest, with both descriptions it keeps.
    let b = Resource::Disk {
        path: "/images/b.qcow2".into(),
        mode: DiskMode::Exclusive,
    };
    let b_key = LockKey {
        dev: 1,
        ino: 2,
        byte: 0,
    };
    let b_desc = host.open(2);
    host.try_lock(&b_desc, LockKind::Exclusive, 0).ok();
    let adopt = vec![
        (
            vmlock_core::types::HeldLock {
                resource: disk(),
                key: a_key,
            },
            host.open(1),
        ),
        (
            vmlock_core::types::HeldLock {
                resource: b,
                key: b_key,
            },
            b_desc,
        ),
    ];
    let (r, _) = table.hold(
        &mut host,
        who(10),
        LinkId(2),
        identity(11),
        proc(11, 111, 10),
        adopt,
        None,
    );
    r.expect("the holder is taken back");
    assert_eq!(table.guest_of(UUID).map(|(g, _)| g), Some(11));
}

/// Guest 30 holds its own disk (libvirt's pre-exec child, which becomes QEMU), on link 1.
fn self_holding_guest(host: &mut TinyHost) -> LockTable<TinyHost> {
    vm_holding_disk(host, 30, proc(30, 130, 1), AcquireFlags::default())
}

/// The guest as a caller whose parent it is sees it.
fn parent_guest() -> ProcInfo<(u32, u64)> {
    let mut guest = proc(30, 130, 1);
    guest.parent_of_caller = true;
    guest
}

#[test]
fn a_self_holding_guest_delegates_to_its_child_and_to_nobody_else() {
    let mut host = TinyHost::default();
    let mut table = self_holding_guest(&mut host);

    // A stranger (the guest is not its parent) cannot take the VM over.
    let (r, fx) = table.hold(
        &mut host,
        who(40),
        LinkId(4),
        identity(30),
        proc(30, 130, 1),
        Vec::new(),
        None,
    );
    assert!(r.is_err(), "a stranger took the VM over");
    assert!(fx.kill.is_empty() && fx.close.is_empty());

    // The guest's child does, with the guest's own link still open.
    let (r, _) = table.hold(
        &mut host,
        who(31),
        LinkId(2),
        identity(30),
        parent_guest(),
        Vec::new(),
        None,
    );
    r.expect("the guest's child takes over");
    let status = table.status();
    assert_eq!(status[0].holder_pid, Some(31));
    assert_eq!(status[0].resources.len(), 1, "the grant moved with it");

    // The guest's own link closing (its exec) is no longer the holder's: nothing changes.
    let fx = table.holder_closed(&mut host, LinkId(1), false);
    assert!(fx.kill.is_empty() && fx.close.is_empty());
    assert_eq!(table.status()[0].holder_pid, Some(31));
    assert!(host.locked_by_anyone(1));

    // The guest no longer speaks for the VM, and a second child cannot take it again.
    let (r, _) = table.release(&mut host, who(30), UUID, None, false);
    assert!(r.is_err(), "the delegating guest still released its disk");
    let (r, _) = table.hold(
        &mut host,
        who(32),
        LinkId(3),
        identity(30),
        parent_guest(),
        Vec::new(),
        None,
    );
    assert!(r.is_err(), "a second child took the VM from its holder");

    // The new holder dies while the guest runs: the guest is killed before anything unlocks.
    let fx = table.holder_closed(&mut host, LinkId(2), false);
    assert_eq!(fx.kill, vec![(30, 130)]);
    assert!(host.locked_by_anyone(1));
}

#[test]
fn a_guest_under_a_supervisor_is_not_delegated_by_its_child() {
    let mut host = TinyHost::default();
    // Holder 10, guest 11: a child of the guest is nobody.
    let mut table = running_vm(&mut host, AcquireFlags::default());
    let mut guest = proc(11, 111, 10);
    guest.parent_of_caller = true;
    let (r, _) = table.hold(
        &mut host,
        who(12),
        LinkId(5),
        identity(11),
        guest,
        Vec::new(),
        None,
    );
    assert!(
        r.is_err(),
        "the guest's child took the VM from its supervisor"
    );
    assert_eq!(table.status()[0].holder_pid, Some(10));
}
