//! vmlock-etcd against a real etcd cluster (Debian's etcd-server) on loopback: two `HostLease`s
//! act as two hosts. Every cluster is the testkit's, stopped by pid when dropped. The tests run
//! one at a time (`serial()`): several three-member clusters electing leaders at once on a
//! 2-core machine would measure the machine, not the driver.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vmlock_etcd::{
    BootTime, Config, Error, Etcd, HostLease, LockKey, LockRequest, LossReason, Owner, Revision,
    SourceKey,
};
use vmlock_testkit::etcd::EtcdCluster;

fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Bound on a takeover after a lease ends by expiry: TTL plus election and scheduling slack.
const TAKEOVER_SLACK: Duration = Duration::from_secs(5);

fn config(cluster: &EtcdCluster, host: &str, ttl: u64) -> Config {
    let mut c = Config::new(cluster.endpoints(), host);
    c.ttl = ttl;
    if ttl < 5 {
        c.margin_ms = 500;
        c.fence_lead_ms = 500;
    }
    c
}

/// A host: its connection and its lease.
fn host(cluster: &EtcdCluster, name: &str, ttl: u64) -> HostLease {
    let etcd = Etcd::connect(&config(cluster, name, ttl)).expect("connect");
    HostLease::grant(&etcd).expect("grant the host lease")
}

fn owner(lease: &HostLease, vm: &str) -> Owner {
    Owner {
        host: lease.etcd().config().host.clone(),
        vm_name: vm.to_owned(),
        vm_uuid: format!("uuid-{vm}"),
        pid: Some(4242),
    }
}

fn req(lease: &HostLease, disk: &str, vm: &str, exclusive: bool) -> LockRequest {
    LockRequest {
        key: LockKey::new(disk, &format!("uuid-{vm}")),
        exclusive,
        owner: owner(lease, vm),
    }
}

#[track_caller]
fn assert_conflict(r: Result<Revision, Error>, host: &str, vm: &str) {
    match r {
        Err(Error::Conflict { holder, .. }) => {
            assert_eq!((holder.host.as_str(), holder.vm_name.as_str()), (host, vm));
        }
        other => panic!("expected a conflict with {vm} on {host}, got {other:?}"),
    }
}

#[test]
fn exclusion_shared_all_or_nothing_and_release() {
    let _s = serial();
    let cluster = EtcdCluster::three();
    let a = host(&cluster, "host-a", 10);
    let b = host(&cluster, "host-b", 10);

    // Exclusive both ways.
    let r1 = a
        .acquire(&[req(&a, "rbd:pool/d1", "web1", true)])
        .expect("A takes d1");
    assert_conflict(
        b.acquire(&[req(&b, "rbd:pool/d1", "db1", true)]),
        "host-a",
        "web1",
    );
    assert_conflict(
        b.acquire(&[req(&b, "rbd:pool/d1", "db1", false)]),
        "host-a",
        "web1",
    );
    b.acquire(&[req(&b, "rbd:pool/d9", "db1", true)])
        .expect("B takes d9");
    assert_conflict(
        a.acquire(&[req(&a, "rbd:pool/d9", "web1", true)]),
        "host-b",
        "db1",
    );
    let msg = b
        .acquire(&[req(&b, "rbd:pool/d1", "db1", true)])
        .expect_err("refused")
        .to_string();
    assert!(
        msg.contains("rbd:pool/d1") && msg.contains("web1") && msg.contains("host-a"),
        "{msg}"
    );

    // Shared: several holders; exclusive refused while any exists, and the reverse.
    a.acquire(&[req(&a, "d2", "web1", false)])
        .expect("A shares d2");
    b.acquire(&[req(&b, "d2", "db1", false)])
        .expect("B shares d2");
    // The first conflicting key in key order is named.
    assert_conflict(a.acquire(&[req(&a, "d2", "web2", true)]), "host-b", "db1");
    assert_eq!(a.etcd().holders("d2").expect("holders").len(), 2);

    // All or nothing: d3 is free, d1 is A's: B gets neither.
    assert_conflict(
        b.acquire(&[
            req(&b, "d3", "db1", true),
            req(&b, "rbd:pool/d1", "db1", true),
        ]),
        "host-a",
        "web1",
    );
    assert!(
        b.etcd().holders("d3").expect("holders").is_empty(),
        "d3 left taken"
    );

    // A retry of a granted request (a lost reply) is that grant.
    assert_eq!(
        a.acquire(&[req(&a, "rbd:pool/d1", "web1", true)])
            .expect("again"),
        r1
    );

    // Release frees at once; releasing a key of another lease leaves it alone.
    let d1 = LockKey::new("rbd:pool/d1", "uuid-web1");
    let rel = a.release(std::slice::from_ref(&d1)).expect("release");
    assert!(rel.not_held.is_empty());
    b.acquire(&[req(&b, "rbd:pool/d1", "db1", true)])
        .expect("B takes d1 at once");
    let rel = a
        .release(&[LockKey::new("rbd:pool/d1", "uuid-db1")])
        .expect("release");
    assert_eq!(rel.not_held.len(), 1);
    assert_eq!(b.etcd().holders("rbd:pool/d1").expect("holders").len(), 1);

    // Bad requests change nothing.
    assert!(matches!(
        a.acquire(&[req(&a, "d4", "x", true), req(&a, "d4", "y", true)]),
        Err(Error::Invalid(_))
    ));
    assert!(a.etcd().holders("d4").expect("holders").is_empty());
}

#[test]
fn lease_end_frees_its_keys() {
    let _s = serial();
    let cluster = EtcdCluster::three();
    let b = host(&cluster, "host-b", 10);

    // Revoked: B takes the disk at once.
    let a = host(&cluster, "host-a", 10);
    a.acquire(&[req(&a, "d1", "web1", true)])
        .expect("A takes d1");
    a.revoke().expect("revoke");
    b.acquire(&[req(&b, "d1", "db1", true)])
        .expect("B after A's revoke");

    // Expired: A stops renewing (a crashed host); B gets the disk only after A's fencing
    // deadline, and within TTL plus slack.
    let mut a = host(&cluster, "host-a", 2);
    a.acquire(&[req(&a, "d2", "web1", true)])
        .expect("A takes d2");
    a.stop_keepalive();
    let stopped = Instant::now();
    let deadline = a.deadline();
    let ttl = a.state().ttl;
    loop {
        match b.acquire(&[req(&b, "d2", "db1", true)]) {
            Ok(_) => break,
            Err(Error::Conflict { .. }) => {}
            Err(e) => panic!("{e}"),
        }
        assert!(
            stopped.elapsed() < ttl + TAKEOVER_SLACK,
            "B still refused {:?} after A stopped renewing (TTL {ttl:?})",
            stopped.elapsed()
        );
        // No event tells a host another's lease expired: bounded poll.
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        BootTime::now() > deadline,
        "B acquired before A's fencing deadline: the timing rule is broken"
    );
    println!(
        "takeover after A stopped renewing: {:?} (TTL {ttl:?})",
        stopped.elapsed()
    );
}

/// A restarted daemon takes its lease over: the keys stay, a keep-alive moves the deadline, and
/// `held_by` lists exactly that lease's keys. An expired lease cannot be taken over.
#[test]
fn a_lease_is_taken_over_by_id() {
    let _s = serial();
    let cluster = EtcdCluster::single();
    let b = host(&cluster, "host-b", 10);
    b.acquire(&[req(&b, "other", "db1", true)])
        .expect("B takes another disk");
    let mut a = host(&cluster, "host-a", 10);
    a.acquire(&[req(&a, "d1", "web1", true), req(&a, "d2", "web1", false)])
        .expect("A takes d1 and d2");
    let id = a.id();
    let before = a.deadline();
    a.stop_keepalive();
    drop(a);

    let etcd = Etcd::connect(&config(&cluster, "host-a", 10)).expect("connect");
    let a = HostLease::adopt(&etcd, id).expect("take the lease over");
    assert_eq!(a.id(), id);
    assert!(a.deadline() > before, "the take-over's keep-alive moved D");
    let mut held: Vec<String> = etcd
        .held_by(id)
        .expect("held_by")
        .into_iter()
        .map(|h| format!("{}:{}", h.key.disk, h.exclusive))
        .collect();
    held.sort();
    assert_eq!(held, ["d1:true", "d2:false"]);
    assert_conflict(b.acquire(&[req(&b, "d1", "db1", true)]), "host-a", "web1");

    a.revoke().expect("revoke");
    match HostLease::adopt(&etcd, id) {
        Err(Error::LeaseLost { lease, .. }) => assert_eq!(lease, id),
        other => panic!("a revoked lease was taken over: {other:?}"),
    }
}

#[test]
fn transfer_is_fenced_by_revision() {
    let _s = serial();
    let cluster = EtcdCluster::three();
    let a = host(&cluster, "host-a", 10);
    let b = host(&cluster, "host-b", 10);
    let c = host(&cluster, "host-c", 10);
    let key = LockKey::new("rbd:pool/vm1-disk", "uuid-vm1");
    let mut on_b = owner(&b, "vm1");
    on_b.pid = Some(777);

    let r1 = a
        .acquire(&[req(&a, "rbd:pool/vm1-disk", "vm1", true)])
        .expect("A");
    let r2 = b.transfer(&key, true, r1, &on_b).expect("transfer to B");
    assert!(r2 > r1);
    let held = b.etcd().holders("rbd:pool/vm1-disk").expect("holders");
    assert_eq!(held.len(), 1);
    assert_eq!(
        (held[0].lease, &held[0].owner, held[0].revision),
        (b.id(), &on_b, r2)
    );

    // The source's state is stale now: nobody can move the key with it.
    match c.transfer(&key, true, r1, &owner(&c, "vm1")) {
        Err(Error::Stale {
            expected, current, ..
        }) => {
            assert_eq!((expected, current), (r1, Some(r2)));
        }
        other => panic!("stale transfer: {other:?}"),
    }
    // A retry of B's own transfer (lost reply) is that transfer.
    assert_eq!(b.transfer(&key, true, r1, &on_b).expect("retry"), r2);
    // The source cannot release what moved; a third host cannot take it.
    assert_eq!(
        a.release(std::slice::from_ref(&key))
            .expect("release")
            .not_held,
        vec![key.clone()]
    );
    assert_conflict(
        c.acquire(&[req(&c, "rbd:pool/vm1-disk", "vm9", true)]),
        "host-b",
        "vm1",
    );
    // A's lease ending takes nothing from B.
    a.revoke().expect("revoke A");
    assert_eq!(
        b.etcd()
            .holders("rbd:pool/vm1-disk")
            .expect("holders")
            .len(),
        1
    );
}

/// Kills one member (`leader` or a follower) while two hosts hold locks: operations go on,
/// no lock is lost, the lease keeps being renewed.
fn survives_member_loss(kill_leader: bool) {
    let mut cluster = EtcdCluster::three();
    let a = host(&cluster, "host-a", 10);
    let b = host(&cluster, "host-b", 10);
    a.acquire(&[req(&a, "d1", "web1", true)]).expect("A d1");
    b.acquire(&[req(&b, "d2", "db1", false)]).expect("B d2");
    let victim = if kill_leader {
        cluster.leader()
    } else {
        cluster.follower()
    };
    cluster.kill_member(victim);
    let killed = Instant::now();

    // Requests are retried on the other members (and wait out an election) within their bound.
    assert_conflict(b.acquire(&[req(&b, "d1", "db1", true)]), "host-a", "web1");
    a.acquire(&[req(&a, "d3", "web1", true)])
        .expect("A d3 with a member down");
    assert_conflict(a.acquire(&[req(&a, "d2", "web1", true)]), "host-b", "db1");
    let renewals = a.state().renewals;
    assert!(
        a.wait_renewals(renewals + 2, Duration::from_secs(15)),
        "A's lease not renewed after member {victim} was killed: {:?}",
        a.state()
    );
    assert_eq!(a.state().lost, None);
    assert_eq!(b.state().lost, None);
    println!(
        "member {victim} ({}) killed: operations and keep-alives went on; {:?} to the checks",
        if kill_leader { "leader" } else { "follower" },
        killed.elapsed()
    );
    let new_leader = cluster.leader();
    assert_ne!(new_leader, victim);
    cluster.restart_member(victim);
    for (disk, n) in [("d1", 1), ("d2", 1), ("d3", 1)] {
        assert_eq!(a.etcd().holders(disk).expect("holders").len(), n, "{disk}");
    }
    b.release(&[LockKey::new("d2", "uuid-db1")])
        .expect("release");
    a.acquire(&[req(&a, "d2", "web1", true)])
        .expect("A d2 after B released");
}

#[test]
fn follower_killed_loses_no_lock() {
    let _s = serial();
    survives_member_loss(false);
}

#[test]
fn leader_killed_loses_no_lock() {
    let _s = serial();
    survives_member_loss(true);
}

#[test]
fn loss_is_reported_after_the_deadline() {
    let _s = serial();
    let mut cluster = EtcdCluster::single();
    let a = host(&cluster, "host-a", 2);
    a.acquire(&[req(&a, "d1", "web1", true)]).expect("A d1");
    assert!(
        a.wait_renewals(1, Duration::from_secs(5)),
        "first keep-alive"
    );
    cluster.kill_member(0);
    let reason = a.wait_lost(Duration::from_secs(10));
    assert_eq!(reason, Some(LossReason::DeadlinePassed));
    let s = a.state();
    assert!(
        BootTime::now() >= s.deadline,
        "lost reported before the deadline"
    );
    assert!(
        s.deadline <= s.renewed_at.after(s.ttl),
        "deadline past t_s + TTL"
    );
    assert!(matches!(
        a.acquire(&[req(&a, "d2", "web1", true)]),
        Err(Error::LeaseLost { .. })
    ));
}

#[test]
fn unreachable_cluster_names_the_endpoints() {
    let _s = serial();
    // Ports nothing listens on: bound, read and released.
    let ports: Vec<u16> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port()
        })
        .collect();
    let endpoints: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let mut c = Config::new(endpoints.clone(), "host-a");
    c.connect_timeout_ms = 1000;
    let started = Instant::now();
    let e = Etcd::connect(&c).expect_err("nothing listens");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "connect not bounded"
    );
    let msg = e.to_string();
    assert!(matches!(e, Error::Unreachable { .. }), "{e:?}");
    assert_eq!(e.kind(), std::io::ErrorKind::NotConnected);
    for ep in &endpoints {
        assert!(msg.contains(ep), "{msg}");
    }
    println!("{msg}");
}

#[test]
fn latency_acquire_release_beside_put_delete() {
    let _s = serial();
    let cluster = EtcdCluster::three();
    let a = host(&cluster, "host-a", 10);
    const N: usize = 200;
    let median = |mut v: Vec<Duration>| {
        v.sort();
        (v[v.len() / 2], v[v.len() * 9 / 10])
    };
    let mut floor = Vec::with_capacity(N);
    let mut locks = Vec::with_capacity(N);
    let key = LockKey::new("bench", "uuid-b");
    for i in 0..N {
        let t = Instant::now();
        a.etcd()
            .put_delete(&format!("/bench/k{i}"))
            .expect("put+delete");
        floor.push(t.elapsed());
        let t = Instant::now();
        a.acquire(&[req(&a, "bench", "b", true)]).expect("acquire");
        a.release(std::slice::from_ref(&key)).expect("release");
        locks.push(t.elapsed());
    }
    let (f50, f90) = median(floor);
    let (l50, l90) = median(locks);
    println!(
        "three members, {N} rounds: acquire+release p50 {l50:?} p90 {l90:?}; bare put+delete p50 {f50:?} p90 {f90:?}"
    );
}

/// A lock for VM `vm` named by its holder on `lease`'s host (`uuid@host`), as vmlockd names them.
fn host_req(lease: &HostLease, disk: &str, vm: &str, exclusive: bool) -> LockRequest {
    let host = lease.etcd().config().host.clone();
    LockRequest {
        key: LockKey::new(disk, &format!("uuid-{vm}@{host}")),
        exclusive,
        owner: owner(lease, vm),
    }
}

/// Migration A → B: the destination's keys come beside the source's, fenced by the source's
/// revisions and secret; a third host is refused at every step; either host's lease ending
/// midway leaves the disk held by the other.
#[test]
fn a_hand_over_leaves_no_window() {
    let _s = serial();
    let cluster = EtcdCluster::single();
    let a = host(&cluster, "host-a", 10);
    let b = host(&cluster, "host-b", 10);
    let c = host(&cluster, "host-c", 10);
    let third = |disk: &str| {
        assert!(
            matches!(
                c.acquire(&[req(&c, disk, "intruder", true)]),
                Err(Error::Conflict { .. })
            ),
            "a third host took {disk}"
        );
    };
    let a_d1 = host_req(&a, "d1", "web1", true);
    let a_d2 = host_req(&a, "d2", "web1", false);
    a.acquire(&[a_d1.clone(), a_d2.clone()])
        .expect("A takes d1, d2");
    let locks = [(a_d1.key.clone(), true), (a_d2.key.clone(), false)];
    let revs = a
        .prepare_handover("uuid-web1", "hash-1", &locks)
        .expect("prepare");
    third("d1");
    let sources: Vec<SourceKey> = locks
        .iter()
        .zip(&revs)
        .map(|((key, exclusive), r)| SourceKey {
            key: key.clone(),
            exclusive: *exclusive,
            revision: *r,
        })
        .collect();
    let wanted = [
        host_req(&b, "d1", "web1", true),
        host_req(&b, "d2", "web1", false),
    ];

    // A wrong secret, a stale revision: refused, nothing created.
    assert!(matches!(
        b.acquire_incoming("uuid-web1", "hash-x", &sources, &wanted),
        Err(Error::Stale { .. })
    ));
    let mut stale = sources.clone();
    stale[0].revision = Revision(stale[0].revision.0 - 1);
    match b.acquire_incoming("uuid-web1", "hash-1", &stale, &wanted) {
        Err(Error::Stale { key, current, .. }) => {
            assert_eq!(key.disk, "d1");
            assert_eq!(current, Some(revs[0]));
        }
        other => panic!("a stale state was taken: {other:?}"),
    }
    assert_eq!(
        cluster_keys(&a, "d1"),
        1,
        "a refused hand-over created a key"
    );

    // The right state: both hold, the third host is still refused.
    b.acquire_incoming("uuid-web1", "hash-1", &sources, &wanted)
        .expect("B takes its keys beside A's");
    b.acquire_incoming("uuid-web1", "hash-1", &sources, &wanted)
        .expect("a retry is the same success");
    third("d1");
    third("d2");

    // A's lease ends midway (the source host dies): B's keys still hold the disks.
    a.revoke().expect("A's host is gone");
    third("d1");
    third("d2");
    assert_eq!(cluster_keys(&b, "d1"), 1);
}

fn cluster_keys(lease: &HostLease, disk: &str) -> usize {
    lease.etcd().holders(disk).expect("holders").len()
}
