//! Losing the lockspace (its storage fails, or the daemon dies) stops the guest through sanlock's killpath, and the
//! driver then releases the guest's leases, so the daemon never escalates to killing the VM
//! manager (the registered process: this test binary). Own test binary: if that went wrong,
//! only this binary would die.

mod common;

use std::time::Duration;
use vmlock::conformance::{disk, vm, Guest, Harness};
use vmlock::{domain, AcquireOptions, DiskMode, MigrationOutcome, Plugin};
use vmlock_sys::pidfd::ProcessHandle;

struct Disks<'a>(&'a std::path::Path, Plugin);

impl Harness for Disks<'_> {
    fn plugin(&self) -> Plugin {
        self.1.clone()
    }
    fn disk_dir(&self) -> &std::path::Path {
        self.0
    }
}

/// One host with a guest that holds one disk through the driver. Fields drop in this order, as
/// a test's locals would: the guest's manager and the guest before the host, the directory last.
struct GuestOnHost {
    /// Its guest's exit.
    exit: ProcessHandle,
    _manager: vmlock::Manager,
    _guest: Guest,
    vm: vmlock::VmParams,
    host: common::Host,
    dir: tempfile::TempDir,
}

impl GuestOnHost {
    /// The guest ends within `within` of `cause`, and the driver forgets its leases.
    fn assert_killed_and_released(&self, within: Duration, cause: &str) {
        assert!(
            self.exit.wait_exit(Some(within)),
            "the guest was killed within {within:?} of {cause}"
        );
        assert!(
            self.host
                .driver
                .wait_released(&self.vm.uuid.to_string(), Duration::from_secs(10)),
            "the dead guest's leases were released"
        );
    }
}

fn guest_on_host(disk_name: &str) -> GuestOnHost {
    let dir = common::workdir();
    let host = common::Host::start(dir.path(), "host-a", 1);
    host.wait_joined();
    let d = disk(
        &Disks(&dir.path().join("disks"), host.plugin.clone()),
        disk_name,
        DiskMode::Exclusive,
    );
    let guest = Guest::spawn();
    let vm_a = vm("vm-a", &guest);
    let manager =
        domain::process_start(&host.plugin, vm_a.clone(), [d], &AcquireOptions::default())
            .expect("the guest's disk acquired");
    let exit = ProcessHandle::open(guest.pid(), None).expect("a pidfd of the guest");
    GuestOnHost {
        dir,
        host,
        vm: vm_a,
        exit,
        _manager: manager,
        _guest: guest,
    }
}

#[test]
fn lost_lockspace_kills_the_guest_and_releases_its_leases() {
    // Bound whole: a destructuring `let` would drop the guest and its manager at once.
    let g = guest_on_host("lost");
    let (dir, host) = (&g.dir, &g.host);

    // The storage of the delta leases "fails": renewals read nothing any more.
    let ls_file = dir
        .path()
        .join("leases")
        .join(&host.driver.config().lockspace);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&ls_file)
        .unwrap()
        .set_len(0)
        .unwrap();

    // After 8 × io_timeout without renewal the daemon runs `kill -KILL GUEST`.
    g.assert_killed_and_released(Duration::from_secs(40), "losing the lockspace");
}

/// A sanlock daemon that dies takes the leases of its clients with it, and runs no kill path any
/// more: the driver sees the daemon close the VM's connection and runs the VM's kill path itself
/// (here `kill -KILL GUEST`), so the guest does not go on writing without a lease. Found by the
/// torture campaign against sanlock (`vmlock-torture --driver sanlock`: guests still running 15 s
/// after their host's daemon was SIGKILLed).
#[test]
fn a_dead_daemon_gets_the_guest_killed_and_its_lease_forgotten() {
    let mut g = guest_on_host("dead-daemon");
    g.host.daemon.kill(); // SIGKILL and reap, by pid
    g.assert_killed_and_released(Duration::from_secs(10), "its sanlock daemon's death");
}

/// As under `vmlock run`, the VM's leases are acquired before its guest exists (no guest pid,
/// the kill path is vmlock's helper): the daemon's death still gets the helper run, with the VM's
/// uuid, so the supervisor stops the guest.
#[test]
fn a_dead_daemon_runs_the_helper_for_a_vm_acquired_before_its_guest() {
    let dir = common::workdir();
    let marker = dir.path().join("helper-ran");
    let (mut daemon, plugin) = host_with_helper(
        dir.path(),
        "helper.sh",
        &marking_script(&marker, "\"$@\"", ""),
    );
    let uuid = uuid::Uuid::new_v4();
    let _m = acquired_before_guest(&plugin, dir.path(), "before-guest", uuid);

    kill_and_wait_for_helper(&mut daemon, &marker, "the lock-failure helper to run");
    let args = std::fs::read_to_string(&marker).unwrap();
    assert!(
        args.contains(&format!("lock-failure --uuid {uuid}")),
        "{args}"
    );
}

/// SIGKILLs the sanlock daemon (and reaps it, by pid), then waits for the driver to run the VM's
/// kill path, which leaves `marker` (the helper's only trace: a bounded poll, no event).
fn kill_and_wait_for_helper(daemon: &mut common::Daemon, marker: &std::path::Path, what: &str) {
    daemon.kill();
    vmlock_testkit::process::wait_until(
        what,
        Duration::from_secs(10),
        Duration::from_millis(20),
        || marker.exists(),
    );
}

/// A VM whose disk `disk_name` is acquired before its guest exists (`vmlock run`'s order).
fn acquired_before_guest(
    plugin: &Plugin,
    dir: &std::path::Path,
    disk_name: &str,
    uuid: uuid::Uuid,
) -> vmlock::Manager {
    let d = disk(
        &Disks(&dir.join("disks"), plugin.clone()),
        disk_name,
        DiskMode::Exclusive,
    );
    let mut m = vmlock::Manager::new(
        plugin,
        vmlock::VmParams::new(1, uuid, "vm-a").expect("VM parameters"),
        vmlock::StartMode::Start,
    )
    .expect("a manager for the VM");
    m.register_resource(d).expect("the disk registered");
    m.acquire(&AcquireOptions::default())
        .expect("the disk acquired");
    m
}

/// A host whose lock-failure helper (the kill path's program, `vmlock lock-failure` in
/// production) is the shell script `script`, written as `dir/name`.
fn host_with_helper(dir: &std::path::Path, name: &str, script: &str) -> (common::Daemon, Plugin) {
    use std::os::unix::fs::PermissionsExt;
    let daemon = common::Daemon::start(dir, "host-a");
    let helper = dir.join(name);
    std::fs::write(&helper, script).expect("write the helper");
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755))
        .expect("make the helper executable");
    let mut c = common::config(dir, &daemon, 1);
    c.lock_failure_helper = Some((helper, dir.join("control")));
    let driver =
        std::sync::Arc::new(vmlock_sanlock::SanlockDriver::start(c).expect("driver start"));
    driver
        .wait_joined(Duration::from_secs(60))
        .expect("lockspace joined");
    (daemon, Plugin::from_driver(driver))
}

/// A helper script that writes `what` to `marker` (whole: written aside, then renamed, so a
/// reader never sees half of it), then runs `then`.
fn marking_script(marker: &std::path::Path, what: &str, then: &str) -> String {
    format!(
        "#!/bin/sh\necho {what} > {0}.tmp && mv {0}.tmp {0}\n{then}\n",
        marker.display()
    )
}

/// A host with a helper that fails (as `vmlock lock-failure` does while the supervisor has no
/// control socket yet) and counts its runs in `marker`.
fn host_with_failing_helper(
    dir: &std::path::Path,
    marker: &std::path::Path,
) -> (common::Daemon, Plugin) {
    host_with_helper(
        dir,
        "failing-helper.sh",
        &format!("#!/bin/sh\necho \"$@\" >> {}\nexit 1\n", marker.display()),
    )
}

/// A VM manager that acquires, then starts its guest (`vmlock run`'s order): a daemon that died in
/// between took the leases with it, so the guest's start is refused rather than let it run
/// without them.
#[test]
fn a_guest_started_after_the_daemon_died_is_refused() {
    let dir = common::workdir();
    let marker = dir.path().join("helper-runs");
    let (mut daemon, plugin) = host_with_failing_helper(dir.path(), &marker);
    let mut m = acquired_before_guest(&plugin, dir.path(), "late-guest", uuid::Uuid::new_v4());
    kill_and_wait_for_helper(&mut daemon, &marker, "the kill path to run");
    let guest = Guest::spawn();
    let e = m
        .guest_started(guest.pid())
        .expect_err("the leases are gone: the guest must not run");
    assert!(e.to_string().contains("sanlock daemon"), "{e}");
}

/// The kill path that cannot reach the supervisor yet (its control socket comes after the
/// guest's start) is run again, as sanlock repeats its own, and a guest still alive
/// `LOST_KILL_GRACE` after the daemon's death is SIGKILLed by the driver.
#[test]
fn a_failing_kill_path_is_repeated_and_the_guest_killed_after_the_grace() {
    let dir = common::workdir();
    let marker = dir.path().join("helper-runs");
    let (mut daemon, plugin) = host_with_failing_helper(dir.path(), &marker);
    let mut m = acquired_before_guest(&plugin, dir.path(), "grace", uuid::Uuid::new_v4());
    let guest = Guest::spawn();
    m.guest_started(guest.pid()).unwrap();
    let exit = ProcessHandle::open(guest.pid(), None).unwrap();
    daemon.kill(); // SIGKILL and reap, by pid
    assert!(
        exit.wait_exit(Some(Duration::from_secs(
            vmlock_sanlock::driver::LOST_KILL_GRACE.as_secs() + 5
        ))),
        "the guest was SIGKILLed after the grace"
    );
    let runs = std::fs::read_to_string(&marker).unwrap_or_default();
    assert!(
        runs.lines().count() >= 2,
        "the failing kill path was run again: {runs:?}"
    );
}

/// A kill path that hangs is not waited for forever: the guest is still SIGKILLed after the
/// grace, and the hung helper is SIGKILLed too, so none stays behind.
#[test]
fn a_hung_kill_path_is_killed_and_the_guest_with_it() {
    let dir = common::workdir();
    let marker = dir.path().join("helper-pid");
    let (mut daemon, plugin) = host_with_helper(
        dir.path(),
        "hung-helper.sh",
        &marking_script(&marker, "$$", "exec sleep 600"),
    );
    let mut m = acquired_before_guest(&plugin, dir.path(), "hung", uuid::Uuid::new_v4());
    let guest = Guest::spawn();
    m.guest_started(guest.pid()).unwrap();
    let exit = ProcessHandle::open(guest.pid(), None).unwrap();
    kill_and_wait_for_helper(&mut daemon, &marker, "the kill path to start");
    let helper: u32 = std::fs::read_to_string(&marker)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let helper = ProcessHandle::open(helper, None).expect("the hung helper runs");
    let bound = Duration::from_secs(vmlock_sanlock::driver::LOST_KILL_GRACE.as_secs() + 5);
    assert!(
        exit.wait_exit(Some(bound)),
        "the guest was SIGKILLed after the grace"
    );
    let helper_ended = helper.wait_exit(Some(bound));
    if !helper_ended {
        vmlock_testkit::process::kill_and_wait(helper.pid);
    }
    assert!(helper_ended, "the hung kill path was left running");
}

/// A kill path that succeeds carried out the VM's action (`pause` leaves the guest alive on
/// purpose): it is not run again, the guest is not SIGKILLed after the grace, and a release of
/// the lost leases (what vmlock's helper asks for) succeeds.
#[test]
fn a_successful_kill_path_is_trusted() {
    let dir = common::workdir();
    let marker = dir.path().join("helper-runs");
    let (mut daemon, plugin) = host_with_helper(
        dir.path(),
        "pausing-helper.sh",
        &format!("#!/bin/sh\necho \"$@\" >> {}\n", marker.display()),
    );
    let mut m = acquired_before_guest(&plugin, dir.path(), "paused", uuid::Uuid::new_v4());
    let guest = Guest::spawn();
    m.guest_started(guest.pid()).unwrap();
    let exit = ProcessHandle::open(guest.pid(), None).unwrap();
    kill_and_wait_for_helper(&mut daemon, &marker, "the kill path to run");
    m.release().expect("the lost leases release at once");
    // The guest must live past the grace: wait (bounded) for an exit that must not come.
    assert!(
        !exit.wait_exit(Some(Duration::from_secs(
            vmlock_sanlock::driver::LOST_KILL_GRACE.as_secs() + 2
        ))),
        "the guest was killed although its kill path succeeded"
    );
    let runs = std::fs::read_to_string(&marker).unwrap();
    assert_eq!(runs.lines().count(), 1, "run once: {runs:?}");
}

/// The driver's own end of a VM's connection (a migration destination cancelled while its guest
/// runs: its connection is closed) is not mistaken for the daemon's death: the guest is left alone.
#[test]
fn closing_the_connection_ourselves_is_not_a_dead_daemon() {
    let dir = common::workdir();
    let host = common::Host::start(dir.path(), "host-a", 1);
    host.wait_joined();
    let d = disk(
        &Disks(&dir.path().join("disks"), host.plugin.clone()),
        "own-close",
        DiskMode::Exclusive,
    );
    let source = Guest::spawn();
    let vm_a = vm("vm-m", &source);
    let mut src = domain::process_start(
        &host.plugin,
        vm_a.clone(),
        [d.clone()],
        &AcquireOptions::default(),
    )
    .unwrap();
    let state = domain::migration_begin(&mut src, "vmlock://localhost").unwrap();
    let dest = Guest::spawn();
    let mut dst = domain::migration_incoming(
        &host.plugin,
        vm_a.with_pid(dest.pid()),
        [d],
        &state,
        &AcquireOptions::default(),
    )
    .unwrap();
    let exit = ProcessHandle::open(dest.pid(), None).unwrap();
    dst.complete_migration(MigrationOutcome::Cancel).unwrap();
    // The destination's guest must not exit: wait (bounded) for an exit that must not come.
    assert!(
        !exit.wait_exit(Some(Duration::from_secs(2))),
        "the guest was killed after the driver closed its own connection"
    );
}
