//! Three sanlock daemons as three hosts (host_id 1, 2, 3) sharing one lease directory: a VM
//! migrates from A to B while C tries to take its disk at every step of the hand-off.
//!
//! The hand-off (docs/sanlock.md §6): A converts its exclusive lease to shared at prepare, B
//! takes it shared at the incoming acquire, A releases at its finish, B converts to exclusive at
//! its finish. At every instant some live host holds the lease, exclusively or shared, so sanlock
//! grants C no exclusive lease.

mod common;

use common::{workdir, Host};
use std::path::Path;
use std::time::Instant;
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

/// C tries a VM with `d` as a shared disk: refused while a host holds the lease exclusively.
fn c_is_refused_shared(p: &Three, d: &Resource, step: &str) {
    let g = Guest::spawn();
    let r = start(
        &p.c.plugin,
        vm("vm-s", &g),
        &[with_mode(d, DiskMode::Shared)],
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
    let t = Instant::now();
    src.complete_migration(MigrationOutcome::Success)
        .expect("source releases");
    let release = t.elapsed();
    assert!(src.inquire().unwrap().entries.is_empty(), "A holds nothing");
    c_is_refused(&p, &d, "B shared alone");
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
    dst.complete_migration(MigrationOutcome::Cancel)
        .expect("destination cancel");
    assert!(
        dst.inquire().unwrap().entries.is_empty(),
        "B dropped its shared lease"
    );
    c_is_refused(&p, &d, "A shared after B's cancel");
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
    c_is_refused(&p, &d, "A shared");
    domain::migration_cancel(&mut src, None).expect("source cancel");
    assert!(version(&mut src) > v1);
    c_is_refused_shared(&p, &d, "after the source's cancel");
}
