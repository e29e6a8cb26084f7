//! Two sanlock daemons on one machine acting as two hosts (host_id 1 and 2) that share the
//! same lease directory: what one host holds, the other cannot take.

mod common;

use common::{workdir, Host};
use std::path::Path;
use std::time::Duration;
use vmlock::conformance::{assert_busy, disk, vm, Guest, Harness};
use vmlock::{
    domain, AcquireOptions, DiskMode, Error, LockState, Manager, MigrationOutcome, Plugin,
    Resource, StartMode,
};
use vmlock_sanlock::proto::{flags, ResourceSpec};
use vmlock_sanlock::{SanlockConfig, SanlockDriver};
use vmlock_testkit::process::KillOnDrop;

const WAIT: Duration = Duration::from_secs(10);

struct Pair {
    a: Host,
    b: Host,
    dir: tempfile::TempDir,
}

/// Lets `disk()` create images in the shared directory.
struct Disks<'a>(&'a Path, Plugin);

impl Harness for Disks<'_> {
    fn plugin(&self) -> Plugin {
        self.1.clone()
    }
    fn disk_dir(&self) -> &Path {
        self.0
    }
}

impl Pair {
    fn start() -> Self {
        let dir = workdir();
        let a = Host::start(dir.path(), "host-a", 1);
        let b = Host::start(dir.path(), "host-b", 2);
        a.wait_joined();
        b.wait_joined();
        a.wait_sees_live(2);
        b.wait_sees_live(1);
        Pair { a, b, dir }
    }

    fn disk(&self, name: &str, mode: DiskMode) -> Resource {
        let disks = self.dir.path().join("disks");
        disk(&Disks(&disks, self.a.plugin.clone()), name, mode)
    }
}

fn start(
    plugin: &Plugin,
    name: &str,
    guest: &Guest,
    disks: &[Resource],
) -> vmlock::Result<Manager> {
    domain::process_start(
        plugin,
        vm(name, guest),
        disks.iter().cloned(),
        &AcquireOptions::default(),
    )
}

#[test]
fn host_b_cannot_take_a_disk_of_a_vm_on_host_a_until_its_guest_exits() {
    let p = Pair::start();
    let d = p.disk("root", DiskMode::Exclusive);
    let mut ga = Guest::spawn();
    let vm_a = vm("vm-a", &ga);
    let mut a = domain::process_start(
        &p.a.plugin,
        vm_a.clone(),
        [d.clone()],
        &AcquireOptions::default(),
    )
    .unwrap();
    let gb = Guest::spawn();
    let refused = start(&p.b.plugin, "vm-b", &gb, std::slice::from_ref(&d));
    let text = format!("{:?}", refused.as_ref().err());
    assert_busy(refused, &d, "vm-a");
    assert!(
        text.contains("host-a"),
        "the holder's host is named: {text}"
    );

    // Another name of the same image (a symlink) shares its lease.
    let alias = p.dir.path().join("disks").join("alias.img");
    std::os::unix::fs::symlink(d.path(), &alias).unwrap();
    let alias = Resource::disk(&alias, DiskMode::Exclusive).unwrap();
    let e = start(&p.b.plugin, "vm-b", &gb, &[alias]).expect_err("an alias is the same disk");
    assert!(matches!(e, Error::Busy { .. }), "{e}");
    assert!(e.to_string().contains("vm-a"), "{e}");

    // The guest exits on its own terms (SIGTERM), the VM manager shuts down, B gets the disk.
    ga.kill();
    a.shutdown().unwrap();
    assert!(p.a.driver.wait_released(&vm_a.uuid.to_string(), WAIT));
    start(&p.b.plugin, "vm-b", &gb, &[d]).expect("B takes the disk once A's guest is gone");
}

#[test]
fn a_guest_killed_with_sigkill_frees_its_lease_for_the_other_host() {
    let p = Pair::start();
    let d = p.disk("orphan", DiskMode::Exclusive);
    let mut ga = Guest::spawn();
    let vm_a = vm("vm-a", &ga);
    // The manager is dropped at once: nothing but the guest's life keeps the lease.
    drop(
        domain::process_start(
            &p.a.plugin,
            vm_a.clone(),
            [d.clone()],
            &AcquireOptions::default(),
        )
        .unwrap(),
    );
    let gb = Guest::spawn();
    assert_busy(
        start(&p.b.plugin, "vm-b", &gb, std::slice::from_ref(&d)),
        &d,
        "vm-a",
    );
    ga.kill(); // SIGKILL and reap
    assert!(
        p.a.driver.wait_released(&vm_a.uuid.to_string(), WAIT),
        "host A released the lease of its dead guest"
    );
    start(&p.b.plugin, "vm-b", &gb, &[d]).expect("free once A's guest was killed");
}

#[test]
fn shared_disks_across_hosts() {
    let p = Pair::start();
    let d = p.disk("cluster", DiskMode::Shared);
    let (ga, gb, gc) = (Guest::spawn(), Guest::spawn(), Guest::spawn());
    let _a = start(&p.a.plugin, "vm-a", &ga, std::slice::from_ref(&d)).unwrap();
    let _b = start(&p.b.plugin, "vm-b", &gb, std::slice::from_ref(&d)).unwrap();
    let exclusive = Resource::disk(d.path(), DiskMode::Exclusive).unwrap();
    let e = start(&p.b.plugin, "vm-c", &gc, &[exclusive]).expect_err("exclusive over shared");
    assert!(matches!(e, Error::Busy { .. }), "{e}");
}

#[test]
fn lock_state_versions_detect_a_holder_in_between() {
    let p = Pair::start();
    let d = p.disk("state", DiskMode::Exclusive);
    let ga = Guest::spawn();
    let mut a = start(&p.a.plugin, "vm-a", &ga, std::slice::from_ref(&d)).unwrap();
    let held = a.inquire().unwrap();
    assert_eq!(held.entries.len(), 1);
    assert!(
        held.entries[0].version > 0,
        "sanlock's lease version: {held}"
    );

    // Pause and resume with nobody in between: the versions still match.
    let state = a.release().unwrap();
    assert_eq!(
        state.entries, held.entries,
        "release returns the versions held"
    );
    let text = state.to_string();
    a.resume(&text.parse().unwrap(), &AcquireOptions::default())
        .expect("resume with a current state");
    let v2 = a.inquire().unwrap().entries[0].version;
    assert!(
        v2 > held.entries[0].version,
        "each acquire bumps the version"
    );

    // Pause again; host B takes and gives back the disk; the old state is now stale.
    let stale = a.release().unwrap();
    {
        let mut gb = Guest::spawn();
        let vm_b = vm("vm-b", &gb);
        let mut b = domain::process_start(
            &p.b.plugin,
            vm_b.clone(),
            [d.clone()],
            &AcquireOptions::default(),
        )
        .unwrap();
        gb.kill();
        b.shutdown().unwrap();
        assert!(p.b.driver.wait_released(&vm_b.uuid.to_string(), WAIT));
    }
    let e = a
        .resume(&stale, &AcquireOptions::default())
        .expect_err("sanlock refuses: someone held the disk in between");
    assert!(matches!(e, Error::InvalidLockState { .. }), "{e}");
    assert!(e.to_string().contains(&d.label()), "{e}");
    // A state from another driver is refused before sanlock is asked.
    let e = a
        .resume(&LockState::empty("lockd"), &AcquireOptions::default())
        .expect_err("driver mismatch");
    assert!(matches!(e, Error::DriverMismatch { .. }), "{e}");
}

#[test]
fn explicit_leases_and_no_cap_from_readonly_disks() {
    let p = Pair::start();
    // An explicit lease in the same lockspace, formatted through host A's daemon at offset 1 MiB
    // of a file of its own.
    let lease_file = p.dir.path().join("leases").join("explicit.leases");
    std::fs::File::create(&lease_file)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let ls = p.a.driver.config().lockspace.clone();
    p.a.daemon
        .client()
        .write_resource(&ResourceSpec {
            lockspace: ls.clone(),
            name: "vm-lease-1".into(),
            path: lease_file.clone(),
            offset: 1 << 20,
            lver: 0,
            flags: flags::ALIGN1M | flags::SECTOR512,
        })
        .unwrap();
    let lease = Resource::lease(&ls, "vm-lease-1", &lease_file, 1 << 20).unwrap();

    // Nine writable disks and ten read-only ones: more than sanlock's 8 leases per call, and the
    // read-only disks take nothing at all.
    let mut disks: Vec<Resource> = (0..9)
        .map(|i| p.disk(&format!("rw{i}"), DiskMode::Exclusive))
        .collect();
    for i in 0..10 {
        let ro = p.disk(&format!("ro{i}"), DiskMode::Exclusive);
        disks.push(Resource::disk(ro.path(), DiskMode::ReadOnly).unwrap());
    }
    disks.push(lease.clone());
    let ga = Guest::spawn();
    let mut a = start(&p.a.plugin, "vm-a", &ga, &disks).unwrap();
    assert_eq!(
        a.inquire().unwrap().entries.len(),
        10,
        "9 disks and 1 lease"
    );
    for ro in &disks[9..19] {
        assert!(
            !p.a.driver.lease_path(ro.path()).exists(),
            "no lease file for read-only {}",
            ro.label()
        );
    }

    let gb = Guest::spawn();
    assert_busy(
        start(&p.b.plugin, "vm-b", &gb, std::slice::from_ref(&lease)),
        &lease,
        "vm-a",
    );
    // A read-only user of A's disk on host B is not refused.
    start(&p.b.plugin, "vm-r", &gb, &disks[9..19]).expect("readers are not refused");
    drop(a.release().unwrap());
    start(&p.b.plugin, "vm-c", &gb, &[lease]).expect("lease free after A released it");
}

#[test]
fn lockspace_failures_are_reported() {
    let dir = workdir();
    let daemon = common::Daemon::start(dir.path(), "host-x");
    // A lockspace file that exists but was never formatted: the join fails, and says why.
    let leases = dir.path().join("leases");
    std::fs::create_dir_all(&leases).unwrap();
    std::fs::write(leases.join("broken"), vec![0u8; 1 << 20]).unwrap();
    let mut c = common::config(dir.path(), &daemon, 1);
    c.lockspace = "broken".into();
    let driver = SanlockDriver::start(c).expect("start does not wait for the join");
    let e = driver
        .wait_joined(Duration::from_secs(60))
        .expect_err("join of an unformatted lockspace");
    let text = e.to_string();
    assert!(
        text.contains("broken") && text.contains("host_id 1"),
        "{text}"
    );
    // An acquire that needs the lockspace reports the same failure.
    let plugin = Plugin::from_driver(std::sync::Arc::new(driver));
    let g = Guest::spawn();
    let d = disk(
        &Disks(&dir.path().join("disks"), plugin.clone()),
        "d",
        DiskMode::Exclusive,
    );
    let e = start(&plugin, "vm-a", &g, &[d]).expect_err("lockspace not joined");
    assert!(e.to_string().contains("broken"), "{e}");

    // No daemon at all: a clear error naming the socket.
    let mut c = SanlockConfig::new(&leases, 1);
    c.run_dir = dir.path().join("nowhere");
    let e = SanlockDriver::start(c).expect_err("no daemon").to_string();
    assert!(e.contains("nowhere/sanlock.sock"), "{e}");
    // host_id out of range.
    let mut c = common::config(dir.path(), &daemon, 2001);
    c.lockspace = "other".into();
    let e = SanlockDriver::start(c)
        .expect_err("bad host_id")
        .to_string();
    assert!(e.contains("2001"), "{e}");
}

#[test]
fn attach_mode_finds_the_running_guest() {
    let p = Pair::start();
    let d = p.disk("att", DiskMode::Exclusive);
    let ga = Guest::spawn();
    let vm_a = vm("vm-a", &ga);
    drop(start_vm(&p.a.plugin, vm_a.clone(), &d));
    let (_m, pid) = domain::process_reattach(&p.a.plugin, vm_a).unwrap();
    assert_eq!(pid, Some(ga.pid()));
    let g = Guest::spawn();
    let e = Manager::new(&p.b.plugin, vm("vm-unknown", &g), StartMode::Attach)
        .expect_err("host B knows no such VM");
    assert!(matches!(e, Error::UnknownOwner { .. }), "{e}");
}

fn start_vm(plugin: &Plugin, vm: vmlock::VmParams, d: &Resource) -> Manager {
    domain::process_start(plugin, vm, [d.clone()], &AcquireOptions::default()).expect("start")
}

#[test]
fn a_lease_held_by_another_sanlock_client_on_this_host() {
    let p = Pair::start();
    let d = p.disk("foreign", DiskMode::Exclusive);
    // A VM takes and gives back the disk once, which creates its lease file.
    {
        let g = Guest::spawn();
        let mut m = start(&p.a.plugin, "vm-once", &g, std::slice::from_ref(&d)).unwrap();
        m.release().unwrap();
    }
    let lease = p.a.driver.lease_path(d.path());
    let name = lease.file_name().unwrap().to_str().unwrap().to_owned();
    // Another sanlock client of host A's daemon (not vmlock) holds it: `sanlock client command`
    // registers, acquires and execs `sleep`.
    let res = format!(
        "{}:{}:{}:0",
        p.a.driver.config().lockspace,
        name,
        lease.display()
    );
    let other = std::process::Command::new("sanlock")
        .args(["client", "command", "-r", &res, "-c", "/bin/sleep", "600"])
        .env("SANLOCK_RUN_DIR", &p.a.daemon.run_dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut other = KillOnDrop(other);
    let other_pid = other.0.id();
    // It holds the lease once it has exec'd `sleep` (it acquires first; bounded poll).
    let deadline = std::time::Instant::now() + WAIT;
    while vmlock::process::command(other_pid) != "sleep" {
        assert!(
            other.0.try_wait().unwrap().is_none(),
            "sanlock client command failed"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the other client never got the lease"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let g = Guest::spawn();
    let err = start(&p.a.plugin, "vm-a", &g, std::slice::from_ref(&d)).unwrap_err();
    assert!(matches!(err, Error::Busy { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&d.label()) && text.contains("another sanlock client"),
        "{text}"
    );
    assert!(
        !text.contains("vm-once"),
        "a released VM's record is gone: {text}"
    );
}

#[test]
fn migration_hands_the_lease_to_the_other_host_with_its_version() {
    let p = Pair::start();
    let d = p.disk("mig", DiskMode::Exclusive);
    let mut ga = Guest::spawn();
    let vm_a = vm("vm-m", &ga);
    let mut src = start_vm(&p.a.plugin, vm_a.clone(), &d);
    let v0 = src.inquire().unwrap().entries[0].version;

    let state = domain::migration_begin(&mut src, "vmlock://host-b").unwrap();
    assert_eq!(state.entries.len(), 1);
    assert_eq!(
        state.entries[0].version, v0,
        "the state carries the held version"
    );
    let gb = Guest::spawn();
    let mut dst = domain::migration_incoming(
        &p.b.plugin,
        vm_a.clone().with_pid(gb.pid()),
        [d.clone()],
        &state.to_string().parse().unwrap(),
        &AcquireOptions::default(),
    )
    .expect("destination checks the state and takes the lease shared");
    let early = dst.inquire().unwrap();
    assert_eq!(early.entries.len(), 1, "B holds the lease shared: {early}");
    assert_eq!(early.entries[0].version, 0, "shared: no version: {early}");
    // While the migration runs, A's VM holds the disk.
    let g = Guest::spawn();
    assert_busy(
        start(&p.b.plugin, "vm-x", &g, std::slice::from_ref(&d)),
        &d,
        "vm-m",
    );

    domain::migration_finish(&mut src, &mut dst).expect("hand-off");
    let held = dst.inquire().unwrap();
    assert_eq!(held.entries.len(), 1, "B holds the disk: {held}");
    assert!(
        held.entries[0].version > v0,
        "B took it over the source's version {v0}: {held}"
    );
    assert!(src.inquire().unwrap().entries.is_empty(), "A holds nothing");
    // Now A is refused, and told the holder runs on host B.
    let err = start(&p.a.plugin, "vm-x", &g, std::slice::from_ref(&d)).unwrap_err();
    assert!(err.to_string().contains("host-b"), "{err}");
    assert_busy(Err::<(), _>(err), &d, "vm-m");
    ga.kill();
    src.shutdown().expect("source shutdown");

    // The state of a finished migration is stale: B refuses it at once.
    let g2 = Guest::spawn();
    let e = domain::migration_incoming(
        &p.b.plugin,
        vm_a.with_pid(g2.pid()),
        [d.clone()],
        &state,
        &AcquireOptions::default(),
    )
    .expect_err("stale state");
    assert!(matches!(e, Error::InvalidLockState { .. }), "{e}");
    assert!(e.to_string().contains(&d.label()), "{e}");
    assert_eq!(dst.inquire().unwrap().entries.len(), 1, "B still holds it");
}

#[test]
fn no_vm_takes_the_lease_between_the_source_release_and_the_destination_convert() {
    let p = Pair::start();
    let d = p.disk("race", DiskMode::Exclusive);
    let ga = Guest::spawn();
    let vm_a = vm("vm-m", &ga);
    let mut src = start_vm(&p.a.plugin, vm_a.clone(), &d);
    let state = domain::migration_begin(&mut src, "vmlock://host-b").unwrap();
    let gb = Guest::spawn();
    let mut dst = domain::migration_incoming(
        &p.b.plugin,
        vm_a.with_pid(gb.pid()),
        [d.clone()],
        &state,
        &AcquireOptions::default(),
    )
    .unwrap();
    src.complete_migration(MigrationOutcome::Success)
        .expect("source releases");
    // Between the source's release and the destination's convert, B holds the lease shared:
    // another VM on A is refused (it used to get the free lease here).
    let gc = Guest::spawn();
    assert_busy(
        start(&p.a.plugin, "vm-c", &gc, std::slice::from_ref(&d)),
        &d,
        "vm-m",
    );
    dst.complete_migration(MigrationOutcome::Success)
        .expect("B converts to exclusive");
    assert!(
        dst.inquire().unwrap().entries[0].version > state.entries[0].version,
        "B holds it exclusively at a new version"
    );
    let err = start(&p.a.plugin, "vm-c", &gc, std::slice::from_ref(&d)).unwrap_err();
    assert!(
        err.to_string().contains("host-b"),
        "B's record names it: {err}"
    );
}
