//! The driver conformance kit: the seed's lifecycle scenarios, written once and run against every
//! driver, honouring the capabilities it declares.
//!
//! A driver crate implements [`Harness`] and expands [`conformance_tests!`](crate::conformance_tests)
//! in a test file declared `harness = false`; each scenario becomes its own trial (libtest-mimic),
//! which fails on a panic or after [`SCENARIO_TIMEOUT`], and shows as *ignored*, with the
//! reason, when the driver's capabilities leave its point untested ([`Outcome::Skipped`]).
//! Guests are real processes (`sleep`), so owner death is a real `SIGKILL`.
//!
//! Rules every driver must keep, checked here:
//! - dropping a [`Manager`] releases nothing: locks follow the guest, not the manager object;
//! - acquire is all or nothing; the same owner acquiring again succeeds;
//! - a conflict names the disk and the holding VM;
//! - a guest's death frees its locks; a running guest's shutdown is refused;
//! - steps outside the capabilities fail with [`Error::Unsupported`].

use crate::domain;
use crate::driver::{AcquireOptions, MigrationOutcome};
use crate::error::{Error, ForeignHolder};
use crate::lockstate::LockState;
use crate::manager::Manager;
use crate::params::{StartMode, VmParams};
use crate::registry::Plugin;
use crate::resource::{DiskMode, Resource};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// What a scenario found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every check ran and held (a failed check panics).
    Passed,
    /// The driver's capabilities left the scenario's point untested; reported as ignored, with
    /// the reason.
    Skipped(String),
}

fn no_exclusion() -> Outcome {
    Outcome::Skipped("the driver declares no exclusion".into())
}

fn no_migration() -> Outcome {
    Outcome::Skipped(
        "the driver declares no migration (checked: migration steps are refused as unsupported)"
            .into(),
    )
}

/// What a driver provides to the kit.
pub trait Harness: Send + Sync {
    /// The driver under test, as loaded on "this host".
    fn plugin(&self) -> Plugin;
    /// A directory for disk images; the kit creates files in it.
    fn disk_dir(&self) -> &Path;
}

/// A guest process (a real `sleep`), killed and reaped when dropped.
#[derive(Debug)]
pub struct Guest {
    child: Child,
}

impl Guest {
    /// Starts one.
    pub fn spawn() -> Self {
        let child = Command::new("sleep")
            .arg("600")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn a sleep guest");
        Guest { child }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and reap: when this returns the process and its files are gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}

static VM_COUNTER: AtomicU32 = AtomicU32::new(1);

/// A VM identity with a fresh uuid and the given guest.
pub fn vm(name: &str, guest: &Guest) -> VmParams {
    let id = VM_COUNTER.fetch_add(1, Ordering::Relaxed);
    VmParams::new(id, uuid::Uuid::new_v4(), name)
        .expect("valid vm params")
        .with_pid(guest.pid())
}

/// A fresh disk image file named `name` under the harness' directory.
pub fn disk(h: &dyn Harness, name: &str, mode: DiskMode) -> Resource {
    let path: PathBuf = h
        .disk_dir()
        .join(format!("{name}-{}.img", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, vec![0u8; 4096]).expect("create disk image");
    Resource::disk(path, mode).expect("valid disk")
}

fn start(h: &dyn Harness, vm: VmParams, disks: &[Resource]) -> crate::Result<Manager> {
    domain::process_start(
        &h.plugin(),
        vm,
        disks.iter().cloned(),
        &AcquireOptions::default(),
    )
}

fn excludes(h: &dyn Harness) -> bool {
    h.plugin().driver().capabilities().exclusion
}

/// Asserts `result` is a conflict on `disk` naming VM `holder`.
pub fn assert_busy<T: std::fmt::Debug>(result: crate::Result<T>, disk: &Resource, holder: &str) {
    let err = result.expect_err("a conflicting acquire must fail");
    match &err {
        Error::Busy {
            resource,
            holder: h,
        } => {
            assert_eq!(resource, &disk.label(), "conflict names the disk: {err}");
            match h {
                ForeignHolder::Vm(vm) => {
                    assert_eq!(vm.name, holder, "conflict names the holder: {err}")
                }
                other => panic!("expected VM {holder} as holder, got {other}"),
            }
        }
        other => panic!("expected Busy, got {other}"),
    }
    let text = err.to_string();
    assert!(
        text.contains(&disk.label()) && text.contains(holder),
        "message: {text}"
    );
}

/// Start, status, shutdown: a guest's disks are held while it runs and free after shutdown;
/// shutdown is refused while the guest runs.
pub fn start_and_shutdown(h: &dyn Harness) -> Outcome {
    let d = disk(h, "boot", DiskMode::Exclusive);
    let mut guest = Guest::spawn();
    let mut a = start(h, vm("vm-a", &guest), std::slice::from_ref(&d)).expect("start");
    let state = a.inquire().expect("inquire");
    if h.plugin().driver().capabilities().disk_resources {
        assert!(
            state.entries.iter().any(|e| e.resource == d),
            "inquire lists the disk: {state}"
        );
    }
    let refused = a.shutdown();
    assert!(
        matches!(refused, Err(Error::GuestRunning { .. })),
        "{refused:?}"
    );
    guest.kill();
    a.shutdown().expect("shutdown after the guest exited");
    let other = Guest::spawn();
    start(h, vm("vm-b", &other), &[d]).expect("disk free after shutdown");
    Outcome::Passed
}

/// A second VM asking for a held disk is refused, is told who holds it, and holds nothing
/// afterwards (all or nothing).
pub fn conflicting_second_vm(h: &dyn Harness) -> Outcome {
    let d = disk(h, "data", DiskMode::Exclusive);
    let free = disk(h, "free", DiskMode::Exclusive);
    let ga = Guest::spawn();
    let _a = start(h, vm("vm-a", &ga), std::slice::from_ref(&d)).expect("start A");
    let gb = Guest::spawn();
    let second = start(h, vm("vm-b", &gb), &[free.clone(), d.clone()]);
    if !excludes(h) {
        second.expect("a driver without exclusion grants everything");
        return no_exclusion();
    }
    assert_busy(second, &d, "vm-a");
    let gc = Guest::spawn();
    start(h, vm("vm-c", &gc), &[free]).expect("B's failed start left nothing held");
    Outcome::Passed
}

/// Shared disks are held by several VMs; an exclusive request then fails.
pub fn shared_disks(h: &dyn Harness) -> Outcome {
    let d = disk(h, "cluster", DiskMode::Shared);
    let (ga, gb, gc) = (Guest::spawn(), Guest::spawn(), Guest::spawn());
    let _a = start(h, vm("vm-a", &ga), std::slice::from_ref(&d)).expect("A shared");
    let _b = start(h, vm("vm-b", &gb), std::slice::from_ref(&d)).expect("B shared");
    let exclusive = Resource::disk(d.path(), DiskMode::Exclusive).expect("disk");
    let c = start(h, vm("vm-c", &gc), std::slice::from_ref(&exclusive));
    if !excludes(h) {
        return no_exclusion();
    }
    let err = c.expect_err("exclusive over shared holders must fail");
    assert!(matches!(err, Error::Busy { .. }), "{err}");
    Outcome::Passed
}

/// Read-only disks take no lock: a reader starts beside a writer.
pub fn readonly_disks(h: &dyn Harness) -> Outcome {
    let d = disk(h, "base", DiskMode::Exclusive);
    let (ga, gb) = (Guest::spawn(), Guest::spawn());
    let _a = start(h, vm("vm-a", &ga), std::slice::from_ref(&d)).expect("writer");
    let ro = Resource::disk(d.path(), DiskMode::ReadOnly).expect("disk");
    start(h, vm("vm-b", &gb), &[ro]).expect("a read-only user is not refused");
    Outcome::Passed
}

/// The same owner acquiring what it holds succeeds; dropping its manager releases nothing.
pub fn idempotent_and_drop_keeps_locks(h: &dyn Harness) -> Outcome {
    let d = disk(h, "idem", DiskMode::Exclusive);
    let ga = Guest::spawn();
    let vm_a = vm("vm-a", &ga);
    let mut a = start(h, vm_a.clone(), std::slice::from_ref(&d)).expect("start");
    if h.plugin().driver().capabilities().hotplug {
        a.acquire_resource(d.clone())
            .expect("re-acquire by the same owner");
    }
    drop(a);
    if !excludes(h) {
        return no_exclusion();
    }
    let gb = Guest::spawn();
    assert_busy(
        start(h, vm("vm-b", &gb), std::slice::from_ref(&d)),
        &d,
        "vm-a",
    );
    Outcome::Passed
}

/// The VM manager restarts while the guest runs: a manager in attach mode finds the guest's pid
/// and goes on with hotplug and release (the seed's `NEW_ATTACH` + `GetChild`).
pub fn restart_with_running_guest(h: &dyn Harness) -> Outcome {
    let d = disk(h, "root", DiskMode::Exclusive);
    let extra = disk(h, "extra", DiskMode::Exclusive);
    let ga = Guest::spawn();
    let vm_a = vm("vm-a", &ga);
    drop(start(h, vm_a.clone(), std::slice::from_ref(&d)).expect("start"));
    let (mut again, pid) = domain::process_reattach(&h.plugin(), vm_a).expect("attach");
    assert_eq!(pid, Some(ga.pid()), "GetChild finds the running guest");
    if excludes(h) {
        let gb = Guest::spawn();
        assert_busy(
            start(h, vm("vm-b", &gb), std::slice::from_ref(&d)),
            &d,
            "vm-a",
        );
    }
    if h.plugin().driver().capabilities().hotplug {
        domain::disk_attach(&mut again, extra.clone()).expect("hotplug after attach");
        domain::disk_detach(&mut again, &extra).expect("unplug after attach");
    }
    Outcome::Passed
}

/// Hotplug takes a disk for the running VM, refuses one another VM holds, and unplug frees it;
/// releasing a disk not held is an error that changes nothing.
pub fn hotplug_and_unplug(h: &dyn Harness) -> Outcome {
    let caps = h.plugin().driver().capabilities();
    let d = disk(h, "root", DiskMode::Exclusive);
    let hot = disk(h, "hot", DiskMode::Exclusive);
    let ga = Guest::spawn();
    let mut a = start(h, vm("vm-a", &ga), std::slice::from_ref(&d)).expect("start");
    if !caps.hotplug {
        let e = domain::disk_attach(&mut a, hot).expect_err("hotplug unsupported");
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        return Outcome::Skipped(
            "the driver declares no hotplug (checked: hotplug is refused as unsupported)".into(),
        );
    }
    domain::disk_attach(&mut a, hot.clone()).expect("hotplug");
    let gb = Guest::spawn();
    let vm_b = vm("vm-b", &gb);
    if excludes(h) {
        assert_busy(
            start(h, vm_b.clone(), std::slice::from_ref(&hot)),
            &hot,
            "vm-a",
        );
        let mut b = start(h, vm_b.clone(), &[]).expect("B with no disks");
        assert_busy(domain::disk_attach(&mut b, hot.clone()), &hot, "vm-a");
    }
    domain::disk_detach(&mut a, &hot).expect("unplug");
    let never = disk(h, "never", DiskMode::Exclusive);
    let e = domain::disk_detach(&mut a, &never).expect_err("unplug of a disk not held");
    assert!(e.to_string().contains(&never.label()), "{e}");
    let gc = Guest::spawn();
    start(h, vm("vm-c", &gc), &[hot]).expect("unplugged disk is free");
    if excludes(h) {
        let gd = Guest::spawn();
        assert_busy(
            start(h, vm("vm-d", &gd), std::slice::from_ref(&d)),
            &d,
            "vm-a",
        );
    }
    Outcome::Passed
}

/// A guest killed with SIGKILL frees its locks: the next VM gets the disk at once.
pub fn owner_death(h: &dyn Harness) -> Outcome {
    let d = disk(h, "orphan", DiskMode::Exclusive);
    let mut ga = Guest::spawn();
    let _a = start(h, vm("vm-a", &ga), std::slice::from_ref(&d)).expect("start");
    ga.kill();
    let gb = Guest::spawn();
    start(h, vm("vm-b", &gb), &[d]).expect("disk free once its guest died");
    Outcome::Passed
}

fn migration_pair(
    h: &dyn Harness,
) -> Option<(Manager, VmParams, Vec<Resource>, Guest, Guest, LockState)> {
    let caps = h.plugin().driver().capabilities();
    let d = disk(h, "mig", DiskMode::Exclusive);
    let src_guest = Guest::spawn();
    let vm_src = vm("vm-m", &src_guest);
    let mut src = start(h, vm_src.clone(), std::slice::from_ref(&d)).expect("source start");
    if !caps.migration {
        let e = src
            .prepare_migration("dst")
            .expect_err("migration unsupported");
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        let e = Manager::new(&h.plugin(), vm_src, StartMode::IncomingMigration)
            .expect_err("unsupported");
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        return None;
    }
    let state = src
        .prepare_migration("vmlock://destination")
        .expect("prepare");
    let dst_guest = Guest::spawn();
    let vm_dst = vm_src.with_pid(dst_guest.pid());
    Some((src, vm_dst, vec![d], src_guest, dst_guest, state))
}

/// Migration that succeeds: the destination holds the disks, the source none.
pub fn migration_success(h: &dyn Harness) -> Outcome {
    let Some((mut src, vm_dst, disks, mut src_guest, _dst_guest, state)) = migration_pair(h) else {
        return no_migration();
    };
    let text = state.to_string();
    let mut dst = domain::migration_incoming(
        &h.plugin(),
        vm_dst,
        disks.clone(),
        &text.parse().expect("state"),
        &AcquireOptions::default(),
    )
    .expect("destination acquire");
    if excludes(h) {
        let g = Guest::spawn();
        assert_busy(start(h, vm("vm-x", &g), &disks), &disks[0], "vm-m");
    }
    domain::migration_finish(&mut src, &mut dst).expect("finish");
    src_guest.kill();
    src.shutdown().expect("source shutdown");
    let held = dst.inquire().expect("inquire");
    if h.plugin().driver().capabilities().disk_resources {
        assert_eq!(held.entries.len(), 1, "destination holds the disk: {held}");
    }
    if excludes(h) {
        let g = Guest::spawn();
        assert_busy(start(h, vm("vm-y", &g), &disks), &disks[0], "vm-m");
    }
    Outcome::Passed
}

/// Migration cancelled on the destination side first, then the source: the source keeps all.
pub fn migration_cancel_on_destination(h: &dyn Harness) -> Outcome {
    let Some((mut src, vm_dst, disks, _sg, _dg, state)) = migration_pair(h) else {
        return no_migration();
    };
    let mut dst = domain::migration_incoming(
        &h.plugin(),
        vm_dst,
        disks.clone(),
        &state,
        &AcquireOptions::default(),
    )
    .expect("destination acquire");
    dst.complete_migration(MigrationOutcome::Cancel)
        .expect("cancel destination");
    src.complete_migration(MigrationOutcome::Cancel)
        .expect("cancel source");
    assert_eq!(src.phase(), crate::Phase::Held);
    if h.plugin().driver().capabilities().disk_resources {
        assert_eq!(src.inquire().expect("inquire").entries.len(), 1);
    }
    if excludes(h) {
        let g = Guest::spawn();
        assert_busy(start(h, vm("vm-x", &g), &disks), &disks[0], "vm-m");
    }
    Outcome::Passed
}

/// Migration cancelled on the source before the destination acquired: nothing moves.
pub fn migration_cancel_on_source(h: &dyn Harness) -> Outcome {
    let Some((mut src, _vm_dst, disks, _sg, _dg, _state)) = migration_pair(h) else {
        return no_migration();
    };
    domain::migration_cancel(&mut src, None).expect("cancel");
    assert_eq!(src.phase(), crate::Phase::Held);
    if excludes(h) {
        let g = Guest::spawn();
        assert_busy(start(h, vm("vm-x", &g), &disks), &disks[0], "vm-m");
    }
    Outcome::Passed
}

/// A destination given another driver's state is refused.
pub fn migration_driver_mismatch(h: &dyn Harness) -> Outcome {
    let caps = h.plugin().driver().capabilities();
    if !caps.migration {
        return no_migration();
    }
    let g = Guest::spawn();
    let other = if h.plugin().driver().name() == "nop" {
        "lockd"
    } else {
        "nop"
    };
    let e = domain::migration_incoming(
        &h.plugin(),
        vm("vm-z", &g),
        [],
        &LockState::empty(other),
        &AcquireOptions::default(),
    )
    .expect_err("mismatched driver");
    assert!(matches!(e, Error::DriverMismatch { .. }), "{e}");
    Outcome::Passed
}

/// A destination presenting a forged state (a version that is not current), or the state of a
/// migration that already completed, is refused (drivers that keep lock state).
pub fn migration_stale_or_forged_state(h: &dyn Harness) -> Outcome {
    let caps = h.plugin().driver().capabilities();
    if !caps.migration {
        return no_migration();
    }
    if !caps.lock_state {
        return Outcome::Skipped("the driver keeps no lock state (versions)".into());
    }
    let Some((mut src, vm_dst, disks, mut src_guest, _dst_guest, state)) = migration_pair(h) else {
        return no_migration();
    };
    let mut forged = state.clone();
    for e in &mut forged.entries {
        e.version += 7;
    }
    let e = domain::migration_incoming(
        &h.plugin(),
        vm_dst.clone(),
        disks.clone(),
        &forged,
        &AcquireOptions::default(),
    )
    .expect_err("forged versions");
    assert!(matches!(e, Error::InvalidLockState { .. }), "{e}");
    let mut dst = domain::migration_incoming(
        &h.plugin(),
        vm_dst.clone(),
        disks.clone(),
        &state,
        &AcquireOptions::default(),
    )
    .expect("the true state works");
    domain::migration_finish(&mut src, &mut dst).expect("finish");
    src_guest.kill();
    src.shutdown().expect("source shutdown");
    let g = Guest::spawn();
    let e = domain::migration_incoming(
        &h.plugin(),
        vm_dst.with_pid(g.pid()),
        disks,
        &state,
        &AcquireOptions::default(),
    )
    .expect_err("a completed migration's state is stale");
    assert!(
        matches!(
            e,
            Error::InvalidLockState { .. } | Error::InvalidState { .. }
        ),
        "{e}"
    );
    Outcome::Passed
}

/// Steps in the wrong order and bad input are refused with clear errors and change nothing.
pub fn bad_input_changes_nothing(h: &dyn Harness) -> Outcome {
    let g = Guest::spawn();
    let mut m = Manager::new(&h.plugin(), vm("vm-q", &g), StartMode::Start).expect("manager");
    let d = disk(h, "q", DiskMode::Exclusive);
    let e = m
        .acquire_resource(d.clone())
        .expect_err("hotplug before acquire");
    assert!(
        matches!(e, Error::InvalidState { .. } | Error::Unsupported { .. }),
        "{e}"
    );
    let e = m.register_resource(Resource::Disk {
        path: "relative.img".into(),
        mode: DiskMode::Exclusive,
    });
    assert!(matches!(e, Err(Error::InvalidResource { .. })), "{e:?}");
    let e = m.release().expect_err("release before acquire");
    assert!(matches!(e, Error::InvalidState { .. }), "{e}");
    let opts = AcquireOptions {
        on_lock_failure: crate::LockFailureAction::Pause,
        ..Default::default()
    };
    let e = m.acquire(&opts).expect_err("pause without QMP");
    assert!(e.to_string().contains("QMP"), "{e}");
    m.register_resource(d.clone()).expect("register");
    m.acquire(&AcquireOptions::default())
        .expect("acquire after refusals");
    Outcome::Passed
}

/// One scenario of the kit.
pub type Scenario = fn(&dyn Harness) -> Outcome;

/// Every scenario, by name: one trial each.
pub const SCENARIOS: &[(&str, Scenario)] = &[
    ("start_and_shutdown", start_and_shutdown),
    ("conflicting_second_vm", conflicting_second_vm),
    ("shared_disks", shared_disks),
    ("readonly_disks", readonly_disks),
    (
        "idempotent_and_drop_keeps_locks",
        idempotent_and_drop_keeps_locks,
    ),
    ("restart_with_running_guest", restart_with_running_guest),
    ("hotplug_and_unplug", hotplug_and_unplug),
    ("owner_death", owner_death),
    ("migration_success", migration_success),
    (
        "migration_cancel_on_destination",
        migration_cancel_on_destination,
    ),
    ("migration_cancel_on_source", migration_cancel_on_source),
    ("migration_driver_mismatch", migration_driver_mismatch),
    (
        "migration_stale_or_forged_state",
        migration_stale_or_forged_state,
    ),
    ("bad_input_changes_nothing", bad_input_changes_nothing),
];

/// How long one scenario may take, harness set-up included, before it fails instead of hanging
/// (a driver that never answers, a guest that never dies). `VMLOCK_CONFORMANCE_TIMEOUT_SECS`
/// overrides it.
pub const SCENARIO_TIMEOUT: Duration = Duration::from_secs(300);

fn scenario_timeout() -> Duration {
    std::env::var("VMLOCK_CONFORMANCE_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(SCENARIO_TIMEOUT)
}

/// The `main` of a conformance test (`harness = false`): one libtest-mimic trial per scenario,
/// each with a fresh harness from `make`. Scenarios that the driver's capabilities skip show as
/// ignored, with the reason.
pub fn run_all<H: Harness + 'static>(
    make: impl Fn() -> H + Send + Sync + 'static,
) -> std::process::ExitCode {
    let args = libtest_mimic::Arguments::from_args();
    let make = Arc::new(make);
    let timeout = scenario_timeout();
    let trials = SCENARIOS
        .iter()
        .map(|&(name, scenario)| {
            let make = Arc::clone(&make);
            libtest_mimic::Trial::ignorable_test(name, move || {
                match run_bounded(name, timeout, move || scenario(&make()))? {
                    Outcome::Passed => Ok(libtest_mimic::Completion::Completed),
                    Outcome::Skipped(reason) => Ok(libtest_mimic::Completion::ignored_with(reason)),
                }
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}

/// Runs `body` on a thread of its own and waits at most `timeout`: a panic is an error with its
/// message, and so is a body still running at the deadline (its thread is abandoned and ends
/// with the test process), so a hung scenario fails instead of hanging the run.
fn run_bounded(
    name: &str,
    timeout: Duration,
    body: impl FnOnce() -> Outcome + Send + 'static,
) -> Result<Outcome, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
            let _ = tx.send(result.map_err(|p| panic_message(&*p)));
        })
        .map_err(|e| format!("starting the scenario thread: {e}"))?;
    match rx.recv_timeout(timeout) {
        Ok(result) => result,
        Err(_) => Err(format!("{name} did not finish within {timeout:?}")),
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panicked".to_owned()
    }
}

/// Expands to the `main` of a conformance test file, which must be declared with
/// `harness = false` in its crate's `Cargo.toml`: one trial per scenario in [`SCENARIOS`]
/// (filter them as with `cargo test`); `$harness` is an expression giving a [`Harness`],
/// evaluated once per trial.
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        fn main() -> ::std::process::ExitCode {
            $crate::conformance::run_all(|| $harness)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scenario_passes_skips_fails_or_times_out() {
        let t = Duration::from_secs(5);
        assert_eq!(run_bounded("p", t, || Outcome::Passed), Ok(Outcome::Passed));
        assert_eq!(
            run_bounded("s", t, || Outcome::Skipped("why".into())),
            Ok(Outcome::Skipped("why".into()))
        );
        let e = run_bounded("f", t, || panic!("check failed")).unwrap_err();
        assert!(e.contains("check failed"), "{e}");
        let e = run_bounded("h", Duration::from_millis(50), || {
            // A scenario that hangs (longer than its bound).
            std::thread::sleep(Duration::from_secs(2));
            Outcome::Passed
        })
        .unwrap_err();
        assert!(e.contains("did not finish"), "{e}");
    }
}
