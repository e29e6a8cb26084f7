//! Three sanlock daemons as three hosts (host_id 1, 2, 3) sharing one lease directory: a VM
//! migrates from A to B while C tries to take its disk at every step of the hand-off.
//!
//! The hand-off (docs/sanlock.md §6): A converts its exclusive lease to shared at prepare, B
//! takes it shared at the incoming acquire, A releases at its finish, B converts to exclusive at
//! its finish. At every instant some live host holds the lease, exclusively or shared, so sanlock
//! grants C no exclusive lease. While the lease is shared, a side of the hand-off holds its gate
//! lease exclusively (A from before its prepare to its finish, B from before its incoming acquire
//! to its convert), and every other shared acquire passes both gates shared: sanlock grants C no
//! shared lease either.

mod common;

use common::{workdir, Host};
use std::path::Path;
use std::time::{Duration, Instant};
use vmlock::conformance::{assert_busy, disk, vm, Guest, Harness};
use vmlock::{
    domain, AcquireOptions, DiskMode, Error, LockState, Manager, MigrationOutcome, Plugin,
    Resource, VmParams,
};
use vmlock_sanlock::driver::lease_name;

struct Three {
    a: Host,
    b: Host,
    c: Host,
    dir: tempfile::TempDir,
}

struct Disks<'a>(&'a Path, Plugin);

impl Harness for Disks<'_> {
    fn plugin(&self) -> Plugin {
        self.1.clone()
    }
    fn disk_dir(&self) -> &Path {
        self.0
    }
}

impl Three {
    fn start() -> Self {
        let dir = workdir();
        let a = Host::start(dir.path(), "host-a", 1);
        let b = Host::start(dir.path(), "host-b", 2);
        let c = Host::start(dir.path(), "host-c", 3);
        for h in [&a, &b, &c] {
            h.wait_joined();
        }
        for (h, others) in [(&a, [2, 3]), (&b, [1, 3]), (&c, [1, 2])] {
            for id in others {
                h.wait_sees_live(id);
            }
        }
        Three { a, b, c, dir }
    }

    fn disk(&self, name: &str) -> Resource {
        let disks = self.dir.path().join("disks");
        disk(
            &Disks(&disks, self.a.plugin.clone()),
            name,
            DiskMode::Exclusive,
        )
    }
}

fn start(plugin: &Plugin, vm: VmParams, disks: &[Resource]) -> vmlock::Result<Manager> {
    domain::process_start(
        plugin,
        vm,
        disks.iter().cloned(),
        &AcquireOptions::default(),
    )
}

fn with_mode(d: &Resource, mode: DiskMode) -> Resource {
    match d {
        Resource::Disk { path, .. } => Resource::Disk {
            path: path.clone(),
            mode,
        },
        other => other.clone(),
    }
}

/// Host C tries to take `d` exclusively (a VM "vm-x"): refused, naming the disk and the
/// migrating VM, and C's daemon lists no lease.
fn c_is_refused(p: &Three, d: &Resource, step: &str) {
    let g = Guest::spawn();
    let t = Instant::now();
    let r = start(&p.c.plugin, vm("vm-x", &g), std::slice::from_ref(d));
    eprintln!(
        "{step}: C's exclusive attempt answered in {:?}: {r:?}",
        t.elapsed()
    );
    assert_busy(r, d, "vm-m");
    assert_c_holds_nothing(p, d, step);
}

fn assert_c_holds_nothing(p: &Three, d: &Resource, step: &str) {
    let Resource::Disk { path, .. } = d else {
        unreachable!()
    };
    let name = lease_name(&std::fs::canonicalize(path).expect("canonical disk path"));
    let status = p.c.daemon.status_text();
    assert!(
        !status.contains(&name),
        "{step}: C holds the lease: {status}"
    );
}

fn incoming(p: &Three, vm_b: VmParams, d: &Resource, state: &LockState) -> vmlock::Result<Manager> {
    domain::migration_incoming(
        &p.b.plugin,
        vm_b,
        [d.clone()],
        &state.to_string().parse().expect("state parses"),
        &AcquireOptions::default(),
    )
}

/// C tries a VM with `d` as a shared disk: refused while a host holds the lease exclusively
/// (by the lease) and during the hand-off (by the gate).
fn c_is_refused_shared(p: &Three, d: &Resource, step: &str) {
    let g = Guest::spawn();
    let t = Instant::now();
    let r = start(
        &p.c.plugin,
        vm("vm-s", &g),
        &[with_mode(d, DiskMode::Shared)],
    );
    eprintln!(
        "{step}: C's shared attempt answered in {:?}: {r:?}",
        t.elapsed()
    );
    assert_busy(r, &with_mode(d, DiskMode::Shared), "vm-m");
    assert_c_holds_nothing(p, d, step);
}

fn version(m: &mut Manager) -> u64 {
    let s = m.inquire().expect("inquire");
    assert_eq!(s.entries.len(), 1, "{s}");
    s.entries[0].version
}

#[test]
fn a_third_host_never_takes_the_lease_at_any_step_of_the_hand_off() {
    let p = Three::start();
    let d = p.disk("mig");
    let mut ga = Guest::spawn();
    let vm_a = vm("vm-m", &ga);
    let mut src = start(&p.a.plugin, vm_a.clone(), std::slice::from_ref(&d)).unwrap();
    let v0 = version(&mut src);
    c_is_refused(&p, &d, "before prepare");
    c_is_refused_shared(&p, &d, "before prepare");

    // A goes shared; C's exclusive ballot fails against A's live shared mode block, but it moved
    // the lease version: the destination then refuses the state (fail-safe) and the source
    // cancels, which makes it exclusive again.
    let state = domain::migration_begin(&mut src, "vmlock://host-b").unwrap();
    assert_eq!(
        state.entries[0].version, v0,
        "the state carries A's version"
    );
    c_is_refused_shared(&p, &d, "after prepare");
    c_is_refused(&p, &d, "after prepare");
    let gb = Guest::spawn();
    let e = incoming(&p, vm_a.clone().with_pid(gb.pid()), &d, &state)
        .expect_err("C's ballot moved the version");
    assert!(matches!(e, Error::InvalidLockState { .. }), "{e}");
    domain::migration_cancel(&mut src, None).expect("source cancel");
    let v1 = version(&mut src);
    assert!(v1 > v0, "A is exclusive again, at a new version: {v1}");
    c_is_refused(&p, &d, "after the source's cancel");
    c_is_refused_shared(&p, &d, "after the source's cancel");

    // The hand-off again, C trying after every step.
    let t = Instant::now();
    let state = domain::migration_begin(&mut src, "vmlock://host-b").unwrap();
    let prepare = t.elapsed();
    assert_eq!(state.entries[0].version, v1);
    // Refused at the source's gate: the lease itself is untouched, so the state stays good.
    c_is_refused_shared(&p, &d, "A shared (prepared)");
    let t = Instant::now();
    let mut dst = incoming(&p, vm_a.clone().with_pid(gb.pid()), &d, &state)
        .expect("the destination takes the lease shared");
    let accept = t.elapsed();
    assert_eq!(
        dst.inquire().unwrap().entries.len(),
        1,
        "B holds it (shared)"
    );
    c_is_refused(&p, &d, "A and B shared");
    c_is_refused_shared(&p, &d, "A and B shared");
    let t = Instant::now();
    src.complete_migration(MigrationOutcome::Success)
        .expect("source releases");
    let release = t.elapsed();
    assert!(src.inquire().unwrap().entries.is_empty(), "A holds nothing");
    c_is_refused(&p, &d, "B shared alone");
    c_is_refused_shared(&p, &d, "B shared alone");
    let t = Instant::now();
    dst.complete_migration(MigrationOutcome::Success)
        .expect("B converts to exclusive");
    let convert = t.elapsed();
    let v2 = version(&mut dst);
    assert!(v2 > v1, "B's convert ran a ballot: {v2} > {v1}");
    c_is_refused(&p, &d, "B exclusive");
    c_is_refused_shared(&p, &d, "B exclusive");
    eprintln!(
        "hand-off steps: prepare {prepare:?}, destination accept {accept:?}, source release {release:?}, destination convert {convert:?}"
    );

    ga.kill();
    src.shutdown().expect("source shutdown");
    let g = Guest::spawn();
    let err = start(&p.c.plugin, vm("vm-x", &g), std::slice::from_ref(&d)).unwrap_err();
    assert!(err.to_string().contains("host-b"), "{err}");
    // The finished migration's state is stale.
    let g2 = Guest::spawn();
    let e = incoming(&p, vm_a.with_pid(g2.pid()), &d, &state).expect_err("stale state");
    assert!(matches!(e, Error::InvalidLockState { .. }), "{e}");
    assert_eq!(version(&mut dst), v2, "B still holds it");
}

#[test]
fn cancel_on_either_side_gives_the_source_its_exclusive_lease_back() {
    let p = Three::start();
    let d = p.disk("cancel");
    let ga = Guest::spawn();
    let vm_a = vm("vm-m", &ga);
    let mut src = start(&p.a.plugin, vm_a.clone(), std::slice::from_ref(&d)).unwrap();
    let v0 = version(&mut src);

    // Cancelled on the destination, then on the source.
    let state = domain::migration_begin(&mut src, "vmlock://host-b").unwrap();
    let gb = Guest::spawn();
    let mut dst = incoming(&p, vm_a.clone().with_pid(gb.pid()), &d, &state).unwrap();
    c_is_refused(&p, &d, "A and B shared");
    c_is_refused_shared(&p, &d, "A and B shared");
    dst.complete_migration(MigrationOutcome::Cancel)
        .expect("destination cancel");
    assert!(
        dst.inquire().unwrap().entries.is_empty(),
        "B dropped its shared lease"
    );
    c_is_refused(&p, &d, "A shared after B's cancel");
    c_is_refused_shared(&p, &d, "A shared after B's cancel");
    src.complete_migration(MigrationOutcome::Cancel)
        .expect("source cancel");
    let v1 = version(&mut src);
    assert!(v1 > v0, "A is exclusive again: {v1}");
    c_is_refused(&p, &d, "after both cancels");
    c_is_refused_shared(&p, &d, "after both cancels");
    let g = Guest::spawn();
    assert_busy(
        start(&p.b.plugin, vm("vm-y", &g), std::slice::from_ref(&d)),
        &d,
        "vm-m",
    );
    let e = incoming(&p, vm_a.clone().with_pid(gb.pid()), &d, &state)
        .expect_err("a cancelled migration's state is stale");
    assert!(matches!(e, Error::InvalidLockState { .. }), "{e}");

    // Cancelled on the source alone (the destination never came).
    let _state = domain::migration_begin(&mut src, "vmlock://host-b").unwrap();
    c_is_refused_shared(&p, &d, "A shared");
    c_is_refused(&p, &d, "A shared");
    domain::migration_cancel(&mut src, None).expect("source cancel");
    assert!(version(&mut src) > v1);
    c_is_refused_shared(&p, &d, "after the source's cancel");
}

/// Either side dying in the middle of the hand-off: the other side's gate still keeps C out.
#[test]
fn a_side_that_dies_mid_hand_off_leaves_the_other_sides_gate_closed() {
    let p = Three::start();

    // The source's guest dies after B took the lease shared: A's lease and gate go with it, B's
    // gate still refuses C, and B converts to exclusive alone.
    let d = p.disk("src-dies");
    let mut ga = Guest::spawn();
    let vm_a = vm("vm-m", &ga);
    let mut src = start(&p.a.plugin, vm_a.clone(), std::slice::from_ref(&d)).unwrap();
    let state = domain::migration_begin(&mut src, "vmlock://host-b").unwrap();
    let gb = Guest::spawn();
    let mut dst = incoming(&p, vm_a.clone().with_pid(gb.pid()), &d, &state).unwrap();
    ga.kill();
    assert!(
        p.a.driver
            .wait_released(&vm_a.uuid.to_string(), Duration::from_secs(5)),
        "A's watcher released"
    );
    c_is_refused_shared(&p, &d, "A died, B shared");
    c_is_refused(&p, &d, "A died, B shared");
    dst.complete_migration(MigrationOutcome::Success)
        .expect("B converts to exclusive without A");
    c_is_refused_shared(&p, &d, "A died, B exclusive");

    // The destination's guest dies after it took the lease shared: B's lease and gate go, A's
    // gate still refuses C, and A's cancel makes it exclusive again.
    let d = p.disk("dst-dies");
    let ga = Guest::spawn();
    let vm_a = vm("vm-m", &ga);
    let mut src = start(&p.a.plugin, vm_a.clone(), std::slice::from_ref(&d)).unwrap();
    let state = domain::migration_begin(&mut src, "vmlock://host-b").unwrap();
    let mut gb = Guest::spawn();
    let vm_b = vm_a.clone().with_pid(gb.pid());
    let _dst = incoming(&p, vm_b, &d, &state).unwrap();
    gb.kill();
    c_is_refused_shared(&p, &d, "B died, A shared");
    domain::migration_cancel(&mut src, None).expect("source cancel");
    c_is_refused_shared(&p, &d, "B died, A exclusive again");
    c_is_refused(&p, &d, "B died, A exclusive again");
}

/// A disk shared by VMs on three hosts, no migration: every shared acquire passes the gate.
/// Also times a gated shared acquire against an exclusive one (same daemons, same files).
#[test]
fn a_shared_disk_is_still_shared_by_vms_on_every_host() {
    let p = Three::start();
    let d = with_mode(&p.disk("shared"), DiskMode::Shared);
    let guests: Vec<Guest> = (0..3).map(|_| Guest::spawn()).collect();
    let mut ms = Vec::new();
    for (i, h) in [&p.a, &p.b, &p.c].into_iter().enumerate() {
        let t = Instant::now();
        let m = start(
            &h.plugin,
            vm(&format!("vm-s{i}"), &guests[i]),
            std::slice::from_ref(&d),
        )
        .expect("a shared disk is shared");
        eprintln!("shared acquire on host {i}: {:?}", t.elapsed());
        ms.push(m);
    }
    // Two VMs of one host share it too.
    let g = Guest::spawn();
    let mut m = start(&p.a.plugin, vm("vm-s3", &g), std::slice::from_ref(&d)).unwrap();
    assert_eq!(m.inquire().unwrap().entries.len(), 1);
    // An exclusive request is refused while they hold it.
    let gx = Guest::spawn();
    assert!(matches!(
        start(
            &p.b.plugin,
            vm("vm-x", &gx),
            &[with_mode(&d, DiskMode::Exclusive)]
        ),
        Err(Error::Busy { .. })
    ));

    // Cost of the gate: a VM start (register + acquire) on C, shared against exclusive, on a
    // disk nobody else holds (its lease and gate files exist after the first round).
    let rounds = 20;
    let time = |mode: DiskMode, disk: &Resource| {
        let mut total = Duration::ZERO;
        for _ in 0..rounds {
            let mut g = Guest::spawn();
            let vm_t = vm("vm-t", &g);
            let t = Instant::now();
            let mut m = start(&p.c.plugin, vm_t.clone(), &[with_mode(disk, mode)]).unwrap();
            total += t.elapsed();
            g.kill();
            assert!(p
                .c
                .driver
                .wait_released(&vm_t.uuid.to_string(), Duration::from_secs(5)));
            m.shutdown().unwrap();
        }
        total / rounds
    };
    let own = p.disk("timing");
    time(DiskMode::Shared, &own); // creates the files
    let excl = time(DiskMode::Exclusive, &own);
    let shared = time(DiskMode::Shared, &own);
    eprintln!("mean VM start on C: exclusive {excl:?}, shared through the gate {shared:?}");
    drop(ms);
}
