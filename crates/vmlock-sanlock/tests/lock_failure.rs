//! Losing the lockspace (its storage fails) stops the guest through sanlock's killpath, and the
//! driver then releases the guest's leases, so the daemon never escalates to killing the VM
//! manager (the registered process: this test binary). Own test binary: if that went wrong,
//! only this binary would die.

mod common;

use std::time::Duration;
use vmlock::conformance::{disk, vm, Guest, Harness};
use vmlock::{domain, AcquireOptions, DiskMode, Plugin};

struct Disks<'a>(&'a std::path::Path, Plugin);

impl Harness for Disks<'_> {
    fn plugin(&self) -> Plugin {
        self.1.clone()
    }
    fn disk_dir(&self) -> &std::path::Path {
        self.0
    }
}

#[test]
fn lost_lockspace_kills_the_guest_and_releases_its_leases() {
    let dir = common::workdir();
    let host = common::Host::start(dir.path(), "host-a", 1);
    host.wait_joined();
    let d = disk(
        &Disks(&dir.path().join("disks"), host.plugin.clone()),
        "lost",
        DiskMode::Exclusive,
    );
    let guest = Guest::spawn();
    let vm_a = vm("vm-a", &guest);
    let _m =
        domain::process_start(&host.plugin, vm_a.clone(), [d], &AcquireOptions::default()).unwrap();
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(guest.pid() as i32).unwrap(),
        rustix::process::PidfdFlags::empty(),
    )
    .unwrap();

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
    let mut fds = [rustix::event::PollFd::new(
        &pidfd,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::event::Timespec {
        tv_sec: 40,
        tv_nsec: 0,
    };
    let ready = rustix::event::poll(&mut fds, Some(&timeout)).unwrap();
    assert_eq!(
        ready, 1,
        "the guest was killed within 40 s of losing the lockspace"
    );
    assert!(
        host.driver
            .wait_released(&vm_a.uuid.to_string(), Duration::from_secs(10)),
        "the dead guest's leases were released"
    );
}
