//! vmlockd with `[etcd]`: two daemons as two hosts (their own runtime and lockspace directories
//! and host names) sharing one disk directory and one real etcd cluster. Only etcd stands between
//! them: each host's local lock is a file in its own lockspace.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{start, Daemon, Fixture};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vmlock::conformance::Guest;
use vmlock::{DiskMode, Error, ForeignHolder, Resource};
use vmlock_testkit::etcd::EtcdCluster;

/// One etcd-using test at a time: their clusters and timelines must not compete for 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Lease TTL of the test hosts, in seconds (etcd's minimum is 2).
const TTL: u64 = 3;
/// Keep-alive interval.
const KEEPALIVE: Duration = Duration::from_millis(500);

/// A host: a daemon with its own lockspace and host name.
struct Host {
    f: Fixture,
    _lockspace: tempfile::TempDir,
}

fn host_config(endpoints: &[String], name: &str, lockspace: &Path, ttl: u64) -> String {
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    format!(
        "file_lockspace_dir = {:?}\nhost_name = {name:?}\n\n[etcd]\nendpoints = [{}]\nttl = {ttl}\n\
         keepalive_interval_ms = {}\nmargin_ms = 500\nfence_lead_ms = 800\nrequest_timeout_ms = 2000\n\
         connect_timeout_ms = 2000\n",
        lockspace.display(),
        endpoints.join(", "),
        KEEPALIVE.as_millis()
    )
}

fn host(endpoints: &[String], name: &str) -> Host {
    host_with_ttl(endpoints, name, TTL)
}

fn host_with_ttl(endpoints: &[String], name: &str, ttl: u64) -> Host {
    let lockspace = tempfile::tempdir().unwrap();
    let config = host_config(endpoints, name, lockspace.path(), ttl);
    Host {
        f: Fixture::new(Daemon::start_with_config(Some(&config))),
        _lockspace: lockspace,
    }
}

/// A disk both hosts see, by its real path.
fn shared_disk(dir: &Path, name: &str, mode: DiskMode) -> Resource {
    let path: PathBuf = std::fs::canonicalize(dir)
        .unwrap()
        .join(format!("{name}.img"));
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    Resource::disk(path, mode).unwrap()
}

/// Starts `name` on `host` with `disks`, retrying while the host's daemon has no lease yet (it
/// connects to etcd in the background after it starts serving).
fn start_vm(
    host: &Host,
    name: &str,
    guest: &Guest,
    disks: &[Resource],
) -> vmlock::Result<vmlock::Manager> {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        match start(&host.f, name, guest, disks) {
            Err(Error::ServiceUnavailable { reason })
                if reason.contains("not connected yet") && Instant::now() < until =>
            {
                // Bounded poll: the daemon's first lease has no event a client can wait on.
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

fn assert_held_by(result: vmlock::Result<vmlock::Manager>, host: &str, vm: &str) {
    match result {
        Err(Error::Busy {
            holder: ForeignHolder::Vm(h),
            resource,
        }) => {
            assert_eq!(
                (h.host.as_str(), h.name.as_str()),
                (host, vm),
                "on {resource}"
            );
        }
        Err(other) => panic!("expected the disk held by {vm} on {host}, got: {other}"),
        Ok(_) => panic!("acquired a disk {vm} on {host} holds"),
    }
}

/// Acquires `disk` on `host` as soon as it can (bounded by `limit`); how long it took.
fn acquire_when_free(
    host: &Host,
    disk: &Resource,
    limit: Duration,
) -> (Duration, Guest, vmlock::Manager) {
    let began = Instant::now();
    loop {
        let g = Guest::spawn();
        match start_vm(host, "taker", &g, std::slice::from_ref(disk)) {
            Ok(m) => return (began.elapsed(), g, m),
            Err(Error::Busy { .. }) if began.elapsed() < limit => {
                // Bounded poll: another host's key ending has no event here.
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("not acquired after {:?}: {e}", began.elapsed()),
        }
    }
}

#[test]
fn two_hosts_exclude_each_other_and_a_release_or_a_guest_death_frees_at_once() {
    let _s = serial();
    let cluster = EtcdCluster::three();
    let disks = tempfile::tempdir().unwrap();
    let a = host(&cluster.endpoints(), "host-a");
    let b = host(&cluster.endpoints(), "host-b");
    let d = shared_disk(disks.path(), "d", DiskMode::Exclusive);

    let ga = Guest::spawn();
    let mut web1 = start_vm(&a, "web1", &ga, std::slice::from_ref(&d)).expect("A takes the disk");
    let gb = Guest::spawn();
    assert_held_by(
        start_vm(&b, "db1", &gb, std::slice::from_ref(&d)),
        "host-a",
        "web1",
    );

    // Shared and read-only: shared with shared, never with exclusive; read-only takes no key.
    let s = shared_disk(disks.path(), "s", DiskMode::Shared);
    let ro = Resource::disk(d.path(), DiskMode::ReadOnly).unwrap();
    let gs = Guest::spawn();
    let _s1 = start_vm(&a, "shared-a", &gs, &[s.clone(), ro.clone()]).expect("A shared");
    let gs2 = Guest::spawn();
    let _s2 = start_vm(&b, "shared-b", &gs2, &[s.clone(), ro]).expect("B shared beside it");
    let s_excl = Resource::disk(s.path(), DiskMode::Exclusive).unwrap();
    let gx = Guest::spawn();
    assert!(
        matches!(
            start_vm(&b, "excl-b", &gx, &[s_excl]),
            Err(Error::Busy { .. })
        ),
        "an exclusive lock beside shared ones"
    );

    // A's VM lets the disk go (an unplug): B takes it at once.
    web1.release_resource(&d).expect("unplug");
    let (took, _g, mut taker) = acquire_when_free(&b, &d, Duration::from_secs(2));
    println!("B took the disk {took:?} after A released it");

    // B's guest is SIGKILLed: A takes the disk within one keep-alive interval.
    drop(_g);
    let (took, _g2, _m) = acquire_when_free(&a, &d, KEEPALIVE);
    println!("A took the disk {took:?} after B's guest was killed");
    drop(taker.shutdown());
}

#[test]
fn a_daemon_restart_keeps_its_keys_and_its_guests() {
    let _s = serial();
    let cluster = EtcdCluster::single();
    let disks = tempfile::tempdir().unwrap();
    let mut a = host(&cluster.endpoints(), "host-a");
    let b = host(&cluster.endpoints(), "host-b");
    let d = shared_disk(disks.path(), "d", DiskMode::Exclusive);
    let ga = Guest::spawn();
    let _web1 = start_vm(&a, "web1", &ga, std::slice::from_ref(&d)).expect("A takes the disk");

    a.f.daemon.kill();
    a.f.daemon.restart();
    // Longer than the TTL: the restarted daemon took its lease over and keeps it alive.
    let settle = Instant::now() + Duration::from_secs(TTL + 1);
    while Instant::now() < settle {
        let g = Guest::spawn();
        assert_held_by(
            start_vm(&b, "db1", &g, std::slice::from_ref(&d)),
            "host-a",
            "web1",
        );
        // Deliberate pacing: keep asking across the old lease's TTL.
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        vmlock::process::is_running(ga.pid()),
        "the restart killed the guest"
    );
}

#[test]
fn an_unreachable_etcd_refuses_starts_naming_the_endpoints() {
    let _s = serial();
    let nobody = ["http://127.0.0.1:9".to_owned()];
    let a = host(&nobody, "host-a");
    let disks = tempfile::tempdir().unwrap();
    let d = shared_disk(disks.path(), "d", DiskMode::Exclusive);
    let g = Guest::spawn();
    let e = start(&a.f, "web1", &g, std::slice::from_ref(&d)).expect_err("no etcd, no start");
    let text = e.to_string();
    assert!(text.contains("http://127.0.0.1:9"), "{text}");
    // A read-only disk needs no key: it starts.
    let ro = Resource::disk(d.path(), DiskMode::ReadOnly).unwrap();
    start(&a.f, "reader", &g, &[ro]).expect("a read-only start needs no etcd");
}

/// With one member of three SIGKILLed (a follower, then the leader), nothing is lost: A's guest
/// keeps its disk past several TTLs, B is refused throughout (with the disk's holder named, or
/// while the members elect a new leader, with "no leader"), new disks are granted again after.
/// TTL 6 s: a leader election takes 1–3 s here, which a 3 s lease's fencing margin does not
/// cover (nor should it: the default TTL is 10 s).
#[test]
fn a_member_or_the_leader_killed_loses_no_lock() {
    let _s = serial();
    let mut cluster = EtcdCluster::three();
    let disks = tempfile::tempdir().unwrap();
    let a = host_with_ttl(&cluster.endpoints(), "host-a", 6);
    let b = host_with_ttl(&cluster.endpoints(), "host-b", 6);
    let d = shared_disk(disks.path(), "d", DiskMode::Exclusive);
    let ga = Guest::spawn();
    let _web1 = start_vm(&a, "web1", &ga, std::slice::from_ref(&d)).expect("A takes the disk");
    for (round, victim) in ["follower", "leader"].into_iter().enumerate() {
        let i = if victim == "leader" {
            cluster.leader()
        } else {
            cluster.follower()
        };
        cluster.kill_member(i);
        // Across two TTLs: A's lease is renewed by the members left (its guest is not fenced).
        let until = Instant::now() + Duration::from_secs(12);
        while Instant::now() < until {
            let g = Guest::spawn();
            match start_vm(&b, "db1", &g, std::slice::from_ref(&d)) {
                Ok(_) => panic!("B acquired A's disk with a {victim} down"),
                Err(Error::Busy { .. }) | Err(Error::ServiceUnavailable { .. }) => {}
                // While the members elect a leader, a request can fail after its retries.
                Err(e) if e.to_string().contains("etcd acquire failed") => {}
                Err(e) => panic!("{e}"),
            }
            // Deliberate pacing across the TTLs.
            std::thread::sleep(Duration::from_millis(250));
        }
        assert!(
            vmlock::process::is_running(ga.pid()),
            "A's guest was fenced with a {victim} down"
        );
        let g = Guest::spawn();
        assert_held_by(
            start_vm(&b, "db1", &g, std::slice::from_ref(&d)),
            "host-a",
            "web1",
        );
        let other = shared_disk(disks.path(), &format!("new{round}"), DiskMode::Exclusive);
        let g = Guest::spawn();
        start_vm(&b, "db2", &g, &[other]).unwrap_or_else(|e| panic!("{victim} down: {e}"));
        cluster.restart_member(i);
    }
}

/// Migration from host A to host B: B's keys come beside A's, fenced by A's state; a third host
/// never gets the disk; a stale or forged state is refused; after A finishes and its guest exits,
/// B alone holds the disk.
#[test]
fn a_migration_between_hosts_leaves_the_disk_to_no_third_host() {
    let _s = serial();
    let cluster = EtcdCluster::single();
    let disks = tempfile::tempdir().unwrap();
    let a = host(&cluster.endpoints(), "host-a");
    let b = host(&cluster.endpoints(), "host-b");
    let c = host(&cluster.endpoints(), "host-c");
    let d = shared_disk(disks.path(), "d", DiskMode::Exclusive);
    let third = |step: &str| {
        let g = Guest::spawn();
        match start_vm(&c, "intruder", &g, std::slice::from_ref(&d)) {
            Err(Error::Busy { .. }) => {}
            other => panic!(
                "{step}: a third host was not refused: {:?}",
                other.map(|_| ())
            ),
        }
    };
    let mut src_guest = Guest::spawn();
    let vm_src = vmlock::conformance::vm("vm-m", &src_guest);
    let mut src = vmlock::domain::process_start(
        &a.f.plugin,
        vm_src.clone(),
        [d.clone()],
        &vmlock::AcquireOptions::default(),
    )
    .expect("A starts the VM");
    let state = src.prepare_migration("vmlock://host-b").expect("prepare");
    third("prepared");
    let token = state.handover.clone().expect("a hand-over token");
    assert!(token.contains("~host-a~"), "no cluster part: {token}");

    // Forged: another secret; stale: another revision. Both refused, nothing taken.
    let dst_guest = Guest::spawn();
    let vm_dst = vm_src.clone().with_pid(dst_guest.pid());
    let incoming = |state: &vmlock::LockState| {
        vmlock::domain::migration_incoming(
            &b.f.plugin,
            vm_dst.clone(),
            [d.clone()],
            state,
            &vmlock::AcquireOptions::default(),
        )
    };
    let mut forged = state.clone();
    forged.handover = Some(format!("x{token}"));
    assert!(incoming(&forged).is_err(), "a forged secret was taken");
    let (head, revision) = token.rsplit_once('~').unwrap();
    let mut stale = state.clone();
    stale.handover = Some(format!("{head}~{}", revision.parse::<i64>().unwrap() - 1));
    let e = incoming(&stale)
        .map(|_| ())
        .expect_err("a stale state was taken");
    assert!(e.to_string().contains("not current"), "{e}");
    third("refused hand-overs");

    let mut dst = incoming(&state).expect("B takes its keys beside A's");
    third("both hold");
    vmlock::domain::migration_finish(&mut src, &mut dst).expect("finish");
    third("finished");
    src_guest.kill();
    src.shutdown().expect("the source lets go");
    third("the source gone");
    drop(dst_guest);
    drop(dst);
    let g = Guest::spawn();
    let took = Instant::now();
    loop {
        match start_vm(&c, "after", &g, std::slice::from_ref(&d)) {
            Ok(_) => break,
            Err(Error::Busy { .. }) if took.elapsed() < Duration::from_secs(5) => {
                // Bounded poll: B's release of its key after its guest exited.
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("the disk stayed held after both sides ended: {e}"),
        }
    }
}
