//! The network-namespace fixture: a cut link stalls an established TCP connection (data is
//! dropped, not refused) and a restored one carries it again; etcd listening on a host's root
//! address answers `etcdctl` run inside the namespace, stops answering when the link is cut and
//! answers again when it is restored; two hosts get distinct links and addresses and their links
//! are gone once they are dropped. Skipped (with `SKIPPED:`) where namespaces cannot be created.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};
use vmlock_testkit::etcd::EtcdCluster;
use vmlock_testkit::netns::NetHost;
use vmlock_testkit::process::{kill_child, wait_child};

/// The reason to skip, printed; `true` when the test should return.
fn skip() -> bool {
    match NetHost::unavailable() {
        Some(why) => {
            println!("SKIPPED: {why}");
            true
        }
        None => false,
    }
}

/// Reads exactly `want.len()` bytes within `timeout` and checks them.
fn expect_data(s: &mut TcpStream, want: &[u8], timeout: Duration) {
    s.set_read_timeout(Some(timeout))
        .expect("set a read timeout");
    let mut got = vec![0u8; want.len()];
    s.read_exact(&mut got)
        .unwrap_or_else(|e| panic!("no {want:?} within {timeout:?}: {e}"));
    assert_eq!(got, want);
}

/// Checks that nothing arrives within `window` (a deliberate, bounded wait: absence has no event).
fn expect_silence(s: &mut TcpStream, window: Duration) {
    s.set_read_timeout(Some(window))
        .expect("set a read timeout");
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("expected nothing through a cut link, got {other:?}"),
    }
}

/// Accepts one connection, waiting at most `timeout`.
fn accept(l: &TcpListener, timeout: Duration) -> TcpStream {
    l.set_nonblocking(true).expect("nonblocking listener");
    let deadline = Instant::now() + timeout;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).expect("blocking stream");
                return s;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no connection in {timeout:?}");
                // The connection is normally already queued (connect returned): bounded poll.
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

#[test]
fn a_cut_link_drops_an_established_connections_data_and_a_restored_one_carries_it() {
    if skip() {
        return;
    }
    let host = NetHost::create();
    let listener = TcpListener::bind((host.root_addr(), 0)).expect("listen at the root address");
    let to: SocketAddr = listener.local_addr().expect("listener address");
    let mut inside = host.in_namespace(|| {
        TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect from inside")
    });
    assert_eq!(
        inside.local_addr().expect("local address").ip(),
        host.addr(),
        "the connection leaves the namespace over its link"
    );
    let mut outside = accept(&listener, Duration::from_secs(5));
    let short = Duration::from_secs(5);

    inside.write_all(b"up1").expect("send from inside");
    expect_data(&mut outside, b"up1", short);
    outside.write_all(b"dn1").expect("send from outside");
    expect_data(&mut inside, b"dn1", short);

    host.cut();
    // Both sends only fill the socket buffers: nothing tells the senders the link is down.
    inside
        .write_all(b"up2")
        .expect("send from inside while cut");
    outside
        .write_all(b"dn2")
        .expect("send from outside while cut");
    let window = Duration::from_millis(1500);
    expect_silence(&mut outside, window);
    expect_silence(&mut inside, window);
    // Not reset either: the connection stalls, as on a real partition.
    assert!(outside.take_error().expect("socket error").is_none());

    host.restore();
    // Delivered at the next retransmission; TCP's backoff after the cut keeps that within seconds.
    let retransmit = Duration::from_secs(30);
    expect_data(&mut outside, b"up2", retransmit);
    expect_data(&mut inside, b"dn2", retransmit);
}

/// Runs `etcdctl endpoint health` against `endpoint` inside `host`, bounded by its own flags and,
/// should it hang anyway, by a 20 s wait after which it is killed.
fn etcdctl_health(host: &NetHost, endpoint: &str) -> (Output, Duration) {
    let t = Instant::now();
    let mut child = host
        .command("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint])
        .args(["--command-timeout=2s", "--dial-timeout=1s"])
        .args(["endpoint", "health"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn etcdctl (is etcd-client installed?)");
    // Its output is a line or two: it fits the pipes, so waiting before reading cannot block it.
    if wait_child(&mut child, Duration::from_secs(20)).is_none() {
        kill_child(&mut child);
        panic!("etcdctl still running after 20 s");
    }
    let out = child.wait_with_output().expect("etcdctl's output");
    (out, t.elapsed())
}

/// Whether etcdctl reported the endpoint healthy (etcd 3.4's etcdctl prints that on stderr).
fn healthy(out: &Output) -> bool {
    out.status.success() && show(out).contains("is healthy")
}

fn show(out: &Output) -> String {
    format!(
        "{}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn etcd_listening_on_the_root_address_is_reachable_from_inside_until_the_link_is_cut() {
    if skip() {
        return;
    }
    // The address must exist before etcd binds it.
    let host = NetHost::create();
    let etcd = EtcdCluster::start_with(1, &[host.root_addr()]);
    let ep = etcd.endpoints_via(host.root_addr()).remove(0);
    assert!(ep.starts_with(&format!("http://{}:", host.root_addr())));
    // Loopback stays as before.
    assert!(etcd.endpoints()[0].starts_with("http://127.0.0.1:"));

    let (out, _) = etcdctl_health(&host, &ep);
    assert!(healthy(&out), "{}", show(&out));
    // The namespace has its own loopback: etcd's 127.0.0.1 endpoint is not reachable from inside.
    let (out, _) = etcdctl_health(&host, &etcd.endpoints()[0]);
    assert!(!out.status.success(), "{}", show(&out));

    host.cut();
    let (out, took) = etcdctl_health(&host, &ep);
    assert!(
        !out.status.success(),
        "healthy through a cut link: {}",
        show(&out)
    );
    assert!(
        took < Duration::from_secs(10),
        "etcdctl took {took:?} to fail"
    );
    println!(
        "through the cut link, after {took:?}: {}",
        show(&out).trim()
    );

    host.restore();
    let (out, _) = etcdctl_health(&host, &ep);
    assert!(healthy(&out), "{}", show(&out));
}

/// Whether this (the root) namespace has a link named `name` (sysfs lists the links of the
/// namespace it was mounted in).
fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

#[test]
fn two_hosts_are_distinct_and_leave_no_links_behind() {
    if skip() {
        return;
    }
    let a = NetHost::create();
    let b = NetHost::create();
    assert_ne!(a.subnet(), b.subnet());
    assert_ne!(a.root_interface(), b.root_interface());
    assert_ne!(a.interface(), b.interface());
    let addrs = [a.root_addr(), a.addr(), b.root_addr(), b.addr()];
    for (i, x) in addrs.iter().enumerate() {
        assert!(x.octets()[..2] == [10, 213], "{x} outside 10.213.0.0/16");
        assert!(!addrs[i + 1..].contains(x), "{x} given twice: {addrs:?}");
    }
    for h in [&a, &b] {
        assert!(h.root_interface().len() <= 15 && h.interface().len() <= 15);
        assert!(
            link_exists(h.root_interface()),
            "{} missing",
            h.root_interface()
        );
        // The namespace end is only inside; the namespace sees its own end, not the root's.
        let inside = h.ip(&["-o", "addr", "show", "dev", h.interface()]);
        assert!(
            inside.contains(&format!("inet {}/30", h.addr())),
            "{inside}"
        );
        let routes = h.ip(&["route", "show", "default"]);
        assert!(
            routes.contains(&format!("via {}", h.root_addr())),
            "{routes}"
        );
        assert!(!link_exists(h.interface()));
    }
    // Each namespace reaches its own root address only through its own link: a listener on a's
    // root address is reachable from a.
    let l = TcpListener::bind((a.root_addr(), 0)).expect("listen on a's root address");
    let to = l.local_addr().expect("address");
    a.in_namespace(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))
        .expect("a reaches its root address");

    let names = [a.root_interface().to_owned(), b.root_interface().to_owned()];
    drop(a);
    drop(b);
    for n in &names {
        assert!(!link_exists(n), "{n} still listed after drop");
    }
}
