//! vmlock-etcd against a real etcd (Debian's 3.4) that requires TLS with client certificates,
//! authentication, or both: the testkit's clusters with `ClusterOptions::tls` (certificates made
//! by `openssl` in the cluster's temp dir) and `EtcdCluster::enable_auth`. One test at a time
//! (`serial()`), as in cluster.rs.

use std::io::ErrorKind;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vmlock_etcd::{Config, Error, Etcd, HostLease, LockKey, LockRequest, Owner};
use vmlock_testkit::etcd::{ClusterOptions, EtcdCluster};

fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The connect timeout of the refusal checks, and the slack a refusal may take beyond it.
const CONNECT_TIMEOUT_MS: u64 = 2000;
const SLACK: Duration = Duration::from_secs(3);

const ROOT_PASSWORD: &str = "root-secret";

/// A configuration for `cluster` with no TLS files and no user, TTL 3 s (K 0.6 s).
fn base(cluster: &EtcdCluster, host: &str) -> Config {
    let mut c = Config::new(cluster.endpoints(), host);
    c.ttl = 3;
    c.margin_ms = 500;
    c.fence_lead_ms = 800;
    c.connect_timeout_ms = CONNECT_TIMEOUT_MS;
    c
}

/// `base` with the cluster's CA and client certificate.
fn with_cert(cluster: &EtcdCluster, host: &str) -> Config {
    let tls = cluster.tls().expect("a TLS cluster");
    let mut c = base(cluster, host);
    c.ca_file = Some(tls.ca.clone());
    c.cert_file = Some(tls.client_cert.clone());
    c.key_file = Some(tls.client_key.clone());
    c
}

fn with_user(mut c: Config, user: &str, password: &str) -> Config {
    c.user = Some(user.to_owned());
    c.password = Some(password.to_owned());
    c
}

fn req(lease: &HostLease, disk: &str, vm: &str) -> LockRequest {
    LockRequest {
        key: LockKey::new(disk, &format!("uuid-{vm}")),
        exclusive: true,
        owner: Owner {
            host: lease.etcd().config().host.clone(),
            vm_name: vm.to_owned(),
            vm_uuid: format!("uuid-{vm}"),
            pid: None,
        },
    }
}

/// Grant, acquire (and a second host refused), release, and the keep-alive renewing.
fn locks_work(a: &Config, b: &Config) {
    let a = HostLease::grant(&Etcd::connect(a).expect("connect A")).expect("grant A");
    let b = HostLease::grant(&Etcd::connect(b).expect("connect B")).expect("grant B");
    a.acquire(&[req(&a, "rbd:pool/d1", "web1")])
        .expect("A takes d1");
    match b.acquire(&[req(&b, "rbd:pool/d1", "db1")]) {
        Err(Error::Conflict { holder, .. }) => assert_eq!(holder.vm_name, "web1"),
        other => panic!("B not refused d1: {other:?}"),
    }
    let released = a
        .release(&[LockKey::new("rbd:pool/d1", "uuid-web1")])
        .expect("A releases d1");
    assert!(released.not_held.is_empty());
    b.acquire(&[req(&b, "rbd:pool/d1", "db1")])
        .expect("B takes d1 after A released it");
    assert!(
        a.wait_renewals(3, Duration::from_secs(10)),
        "A's lease not renewed: {:?}",
        a.state()
    );
    assert!(b.wait_renewals(3, Duration::from_secs(10)));
    b.revoke().expect("revoke B");
}

/// Connects with `config`, which the cluster must refuse: the error, checked to come within the
/// connect timeout (plus slack) and to name the endpoints.
#[track_caller]
fn refused_at_connect(config: &Config, what: &str) -> Error {
    let t = Instant::now();
    let e = Etcd::connect(config).expect_err(what);
    let took = t.elapsed();
    println!("{what}: {:?} after {took:?}: {e}", e.kind());
    assert!(
        took < Duration::from_millis(CONNECT_TIMEOUT_MS) + SLACK,
        "{what}: refused only after {took:?}"
    );
    assert!(
        e.to_string().contains(&config.endpoints_text()),
        "{what}: the error does not name the endpoints: {e}"
    );
    e
}

#[test]
fn tls_with_client_certificates() {
    let _s = serial();
    let cluster = EtcdCluster::single_tls();
    let tls = cluster.tls().expect("TLS files").clone();
    assert!(cluster.endpoints()[0].starts_with("https://127.0.0.1:"));

    locks_work(
        &with_cert(&cluster, "host-a"),
        &with_cert(&cluster, "host-b"),
    );

    // The right CA, no client certificate: the member refuses the handshake.
    let mut no_cert = base(&cluster, "host-c");
    no_cert.ca_file = Some(tls.ca.clone());
    let e = refused_at_connect(&no_cert, "no client certificate");
    assert!(matches!(e, Error::Unreachable { .. }), "{e:?}");
    assert_eq!(e.kind(), ErrorKind::NotConnected);

    // A client certificate, but a CA that did not sign the member's: we refuse the member.
    let mut other_ca = with_cert(&cluster, "host-c");
    other_ca.ca_file = Some(tls.other_ca.clone());
    let e = refused_at_connect(&other_ca, "a CA that did not sign the server");
    assert!(matches!(e, Error::Unreachable { .. }), "{e:?}");

    // Plain http to the TLS port.
    let mut plain = base(&cluster, "host-c");
    plain.endpoints = cluster
        .endpoints()
        .iter()
        .map(|e| e.replacen("https://", "http://", 1))
        .collect();
    let e = refused_at_connect(&plain, "plain http to a TLS member");
    assert!(matches!(e, Error::Unreachable { .. }), "{e:?}");

    // A user for a cluster without authentication: a configuration error, said at once.
    let e = refused_at_connect(
        &with_user(with_cert(&cluster, "host-c"), "root", ROOT_PASSWORD),
        "a user where authentication is off",
    );
    assert!(matches!(e, Error::Refused { .. }), "{e:?}");
    assert!(
        e.to_string().contains("authentication is not enabled"),
        "{e}"
    );
}

/// What a client without a valid user gets: the first refusal among connect, grant and acquire,
/// and which step it was.
fn first_refusal(config: &Config) -> (&'static str, Error) {
    let etcd = match Etcd::connect(config) {
        Ok(etcd) => etcd,
        Err(e) => return ("connect", e),
    };
    let lease = match HostLease::grant(&etcd) {
        Ok(l) => l,
        Err(e) => return ("grant", e),
    };
    match lease.acquire(&[req(&lease, "rbd:pool/d9", "intruder")]) {
        Ok(r) => panic!("acquired without a valid user at revision {r}"),
        Err(e) => ("acquire", e),
    }
}

/// Authentication on `cluster` (already enabled), over TLS with the client certificate or not.
fn check_auth(cluster: &EtcdCluster, with_tls: bool) {
    let config = |host: &str| {
        if with_tls {
            with_cert(cluster, host)
        } else {
            base(cluster, host)
        }
    };
    locks_work(
        &with_user(config("host-a"), "root", ROOT_PASSWORD),
        &with_user(config("host-b"), "root", ROOT_PASSWORD),
    );

    // A wrong password: refused at connect, at once (not retried until the connect timeout),
    // naming the endpoints and etcd's reason.
    let t = Instant::now();
    let (step, e) = first_refusal(&with_user(config("host-c"), "root", "wrong"));
    let took = t.elapsed();
    println!("wrong password: refused at {step} after {took:?}: {e}");
    assert_eq!(step, "connect");
    assert!(matches!(e, Error::Refused { .. }), "{e:?}");
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    let msg = e.to_string();
    assert!(
        msg.contains("authentication failed") && msg.contains(&cluster.endpoints()[0]),
        "{msg}"
    );
    assert!(took < Duration::from_millis(CONNECT_TIMEOUT_MS), "{took:?}");

    // No user: etcd 3.4 answers the status request and grants a lease to anyone, but refuses
    // the lock's transaction: over plain http "user name is empty"; over TLS the client
    // certificate's CN (vmlock-client, no such user) is taken as the user: "permission denied".
    let (step, e) = first_refusal(&config("host-c"));
    println!("no user: refused at {step}: {e}");
    assert_eq!(step, "acquire");
    assert!(matches!(e, Error::Refused { .. }), "{e:?}");
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    let why = if with_tls {
        "permission denied"
    } else {
        "user name is empty"
    };
    assert!(e.to_string().contains(why), "{e}");
}

#[test]
fn authentication_over_plain_http() {
    let _s = serial();
    let mut cluster = EtcdCluster::single();
    cluster.enable_auth(ROOT_PASSWORD);
    check_auth(&cluster, false);
}

#[test]
fn authentication_with_tls() {
    let _s = serial();
    let mut cluster = EtcdCluster::single_tls();
    cluster.enable_auth(ROOT_PASSWORD);
    check_auth(&cluster, true);
}

/// etcd forgets a (simple) token after `--auth-token-ttl` without use — keep-alives do not use
/// it — and when the member restarts. The client must authenticate again; it did not (every
/// request after that failed with "invalid auth token"), until `with_auto_token_refresh`.
#[test]
fn an_expired_auth_token_is_renewed() {
    let _s = serial();
    let mut cluster = EtcdCluster::start_opts(
        1,
        &ClusterOptions {
            extra_args: vec!["--auth-token-ttl=1".into()],
            ..ClusterOptions::default()
        },
    );
    cluster.enable_auth(ROOT_PASSWORD);
    let mut config = with_user(base(&cluster, "host-a"), "root", ROOT_PASSWORD);
    // TTL 10 s, renewed every 0.5 s: the lease outlives the member's restart below.
    config.ttl = 10;
    config.keepalive_interval_ms = Some(500);
    let a = HostLease::grant(&Etcd::connect(&config).expect("connect")).expect("grant");
    a.acquire(&[req(&a, "d1", "web1")]).expect("acquire d1");
    // Only keep-alives for 2.5 s: the token, unused, expires after 1 s.
    assert!(
        a.wait_renewals(5, Duration::from_secs(10)),
        "{:?}",
        a.state()
    );
    a.acquire(&[req(&a, "d2", "web2")])
        .expect("acquire d2 after the token expired");

    // The member restarted: it knows no token at all.
    cluster.restart_member(0);
    a.acquire(&[req(&a, "d3", "web3")])
        .expect("acquire d3 after the member restarted");
    let renewals = a.state().renewals;
    assert!(
        a.wait_renewals(renewals + 3, Duration::from_secs(10)),
        "keep-alive after the restart: {:?}",
        a.state()
    );
    let released = a
        .release(&[
            LockKey::new("d1", "uuid-web1"),
            LockKey::new("d2", "uuid-web2"),
            LockKey::new("d3", "uuid-web3"),
        ])
        .expect("release");
    assert!(released.not_held.is_empty(), "{released:?}");
    assert_eq!(a.state().lost, None);
}
