//! Metrics and the event stream of a real daemon process, over its real sockets (the Unix socket
//! and the `metrics_address` HTTP endpoint), while the test starts, refuses, kills and restarts.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{raw_connection, read_reply, start, Daemon, Fixture};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use vmlock::conformance::{disk, Guest};
use vmlock::{domain, DiskMode, Error};
use vmlock_client::proto::{
    write_frame, AcquireFlags, Event, EventKind, EventPosition, Reply, Request,
};
use vmlock_client::{Connection, EventStream};

/// How long any awaited event may take.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A free TCP port on the loopback (bound, read, released: the daemon binds it next).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Samples of a text exposition: `name{labels}` → value.
fn parse(text: &str) -> HashMap<String, f64> {
    assert!(
        text.ends_with("# EOF\n"),
        "an OpenMetrics exposition: {text}"
    );
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap();
            (name.to_owned(), value.parse::<f64>().unwrap())
        })
        .collect()
}

/// `GET /metrics` over HTTP/1.0.
fn scrape(port: u16) -> HashMap<String, f64> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    assert!(head.contains("openmetrics-text"), "{head}");
    parse(body)
}

fn metrics(d: &Daemon) -> HashMap<String, f64> {
    parse(
        &Connection::connect(&d.runtime())
            .unwrap()
            .metrics()
            .unwrap(),
    )
}

fn subscribe(d: &Daemon, after: Option<EventPosition>) -> EventStream {
    Connection::connect(&d.runtime())
        .unwrap()
        .subscribe(after)
        .unwrap()
}

/// Reads `stream` until an event matching `want` arrives (bounded), appending all to `seen`.
fn until(
    stream: &mut EventStream,
    seen: &mut Vec<Event>,
    what: &str,
    want: impl Fn(&Event) -> bool,
) {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        if seen.iter().any(&want) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no {what} event within {EVENT_TIMEOUT:?}; saw {seen:#?}"
        );
        if let Some(batch) = stream.next(Some(left)).unwrap() {
            seen.extend(batch.events);
        }
    }
}

fn is(kind: &'static str, vm: &'static str) -> impl Fn(&Event) -> bool {
    move |e| {
        e.kind.name() == kind
            && match &e.kind {
                EventKind::Acquired { vm: v, .. }
                | EventKind::Released { vm: v, .. }
                | EventKind::Refused { vm: v, .. }
                | EventKind::OwnerDied { vm: v, .. } => v.name == vm,
                _ => true,
            }
    }
}

/// A storm of acquires, conflicts, unknown-VM requests, unplugs and guest kills from several
/// threads, scraped over HTTP and `Request::Metrics` throughout: counters only grow, and at the
/// end each equals what the test did.
#[test]
fn metrics_count_exactly_what_a_storm_did() {
    let port = free_port();
    let f = Fixture::new(Daemon::start_with_config(Some(&format!(
        "metrics_address = \"127.0.0.1:{port}\""
    ))));
    let before = scrape(port);
    assert_eq!(before["vmlock_grants_total"], 0.0);
    assert_eq!(before["vmlock_vms"], 0.0);
    const THREADS: usize = 4;
    const ROUNDS: usize = 3;
    let mut subscription = subscribe(&f.daemon, None);
    let (mut grants, mut busy, mut invalid, mut releases, mut deaths) = (0, 0, 0, 0, 0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let f = &f;
                s.spawn(move || {
                    let mut done = (0, 0, 0, 0, 0);
                    let mut dead_guests = Vec::new();
                    for round in 0..ROUNDS {
                        let d = disk(f, &format!("s{t}-{round}"), DiskMode::Exclusive);
                        let mut ga = Guest::spawn();
                        let mut a =
                            start(f, &format!("a{t}-{round}"), &ga, std::slice::from_ref(&d))
                                .unwrap();
                        done.0 += 1;
                        let gb = Guest::spawn();
                        let e = start(f, &format!("b{t}-{round}"), &gb, std::slice::from_ref(&d))
                            .unwrap_err();
                        assert!(matches!(e, Error::Busy { .. }), "{e}");
                        done.1 += 1;
                        // An acquire for a VM the daemon does not know.
                        let raw = raw_connection(&f.daemon.runtime().socket());
                        write_frame(
                            &raw,
                            &Request::Acquire {
                                uuid: uuid::Uuid::new_v4().to_string(),
                                resources: vec![d.clone()],
                                flags: AcquireFlags::default(),
                            },
                            &[],
                        )
                        .unwrap();
                        assert!(matches!(
                            read_reply(&raw),
                            Some(Reply::Error(Error::UnknownOwner { .. }))
                        ));
                        done.2 += 1;
                        if round % 2 == 0 {
                            domain::disk_detach(&mut a, &d).unwrap();
                            done.3 += 1;
                        } else {
                            ga.kill();
                            done.4 += 1;
                        }
                        dead_guests.push((ga, gb, a));
                    }
                    done
                })
            })
            .collect();
        // Scrape both ways while the storm runs: every scrape parses, no counter goes back.
        let mut last = before.clone();
        while !workers.iter().all(|w| w.is_finished()) {
            for now in [scrape(port), metrics(&f.daemon)] {
                for (name, value) in &last {
                    if name.ends_with("_total") || name.ends_with("_count") {
                        assert!(now[name] >= *value, "{name} went back");
                    }
                }
                last = now;
            }
        }
        for w in workers {
            let (g, b, i, r, d) = w.join().unwrap();
            (grants, busy, invalid, releases, deaths) =
                (grants + g, busy + b, invalid + i, releases + r, deaths + d);
        }
    });
    // Owner deaths are seen by the daemon's watcher: wait for their events, then compare.
    let mut seen = Vec::new();
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while seen
        .iter()
        .filter(|e: &&Event| e.kind.name() == "owner_died")
        .count()
        < deaths
    {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "owner deaths not all reported: {seen:#?}");
        if let Some(b) = subscription.next(Some(left)).unwrap() {
            seen.extend(b.events);
        }
    }
    for m in [scrape(port), metrics(&f.daemon)] {
        assert_eq!(m["vmlock_grants_total"], grants as f64);
        assert_eq!(m["vmlock_refusals_total{reason=\"busy\"}"], busy as f64);
        assert_eq!(
            m["vmlock_refusals_total{reason=\"invalid\"}"],
            invalid as f64
        );
        assert_eq!(m["vmlock_refusals_total{reason=\"owner_exists\"}"], 0.0);
        assert_eq!(m["vmlock_refusals_total{reason=\"other\"}"], 0.0);
        assert_eq!(m["vmlock_releases_total"], releases as f64);
        assert_eq!(m["vmlock_owner_deaths_total"], deaths as f64);
        assert_eq!(
            m["vmlock_acquire_duration_seconds_count"],
            (grants + busy + invalid) as f64,
            "one observation per Acquire request"
        );
        assert!(m["vmlock_release_duration_seconds_count"] >= releases as f64);
        // Every disk is free now: the detached ones and those of the dead guests.
        assert_eq!(m["vmlock_locks_held"], 0.0);
        assert_eq!(m["vmlock_daemon_restarts_total"], 0.0);
    }
    // The stream holds exactly those events (after daemon_started), each once.
    let expected = 1 + grants + busy + invalid + releases + deaths;
    while seen.len() < expected {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "events missing: {seen:#?}");
        if let Some(b) = subscription.next(Some(left)).unwrap() {
            seen.extend(b.events);
        }
    }
    assert!(subscription
        .next(Some(Duration::from_millis(1)))
        .unwrap()
        .is_none());
    assert_eq!(seen.len(), expected);
    let count = |kind: &str| seen.iter().filter(|e| e.kind.name() == kind).count();
    assert!(seen.iter().enumerate().all(|(i, e)| e.seq == i as u64 + 1));
    assert_eq!(count("acquired"), grants);
    assert_eq!(count("refused"), busy + invalid);
    assert_eq!(count("released"), releases);
    assert_eq!(count("owner_died"), deaths);
    // The busy refusals name the VM that holds the disk.
    for e in &seen {
        if let EventKind::Refused { reason, holder, .. } = &e.kind {
            if reason == "busy" {
                assert!(
                    holder.as_deref().is_some_and(|h| h.contains("\"a")),
                    "{e:?}"
                );
            }
        }
    }
}

/// A follower sees every event exactly once and in order, across guests starting, conflicting and
/// dying, and the daemon being killed and started again (it resumes from its last position).
#[test]
fn events_follow_starts_conflicts_deaths_and_a_restart_exactly_once_in_order() {
    let mut f = Fixture::new(Daemon::start());
    let mut stream = subscribe(&f.daemon, None);
    let mut seen = Vec::new();
    until(&mut stream, &mut seen, "daemon_started", |e| {
        e.kind.name() == "daemon_started"
    });

    let (d1, d2) = (
        disk(&f, "one", DiskMode::Exclusive),
        disk(&f, "two", DiskMode::Exclusive),
    );
    let mut ga = Guest::spawn();
    let _a = start(&f, "vm-a", &ga, std::slice::from_ref(&d1)).unwrap();
    until(&mut stream, &mut seen, "acquired", is("acquired", "vm-a"));
    let gb = Guest::spawn();
    let e = start(&f, "vm-b", &gb, std::slice::from_ref(&d1)).unwrap_err();
    assert!(matches!(e, Error::Busy { .. }), "{e}");
    until(&mut stream, &mut seen, "refused", is("refused", "vm-b"));
    ga.kill();
    until(
        &mut stream,
        &mut seen,
        "owner_died",
        is("owner_died", "vm-a"),
    );
    let gc = Guest::spawn();
    let mut c = start(&f, "vm-c", &gc, std::slice::from_ref(&d2)).unwrap();
    until(&mut stream, &mut seen, "acquired", is("acquired", "vm-c"));

    f.daemon.kill();
    let ended = stream.next(Some(EVENT_TIMEOUT));
    assert!(ended.is_err(), "the stream ends with its daemon: {ended:?}");
    f.daemon.restart();
    let last = seen.last().unwrap().position();
    let mut stream = subscribe(&f.daemon, Some(last));
    until(&mut stream, &mut seen, "daemon_restarted", |e| {
        e.kind.name() == "daemon_restarted"
    });
    // The holder of vm-c hands its description back; then it can unplug. No event reports a
    // reconnect: wait (bounded) on the daemon's status.
    vmlock_testkit::process::wait_until(
        "vm-c's holder to hand its lock back",
        EVENT_TIMEOUT,
        Duration::from_millis(5),
        || {
            let status = Connection::connect(&f.daemon.runtime())
                .unwrap()
                .call(&Request::Status, &[])
                .unwrap();
            matches!(status, Reply::Status(s) if s.iter().any(|o| o.vm.name == "vm-c"
                && o.resources.iter().all(|r| r.confirmed)))
        },
    );
    assert!(metrics(&f.daemon)["vmlock_holder_reconnects_total"] >= 1.0);
    domain::disk_detach(&mut c, &d2).unwrap();
    until(&mut stream, &mut seen, "released", is("released", "vm-c"));

    let summary: Vec<(u64, u64, &str)> = seen
        .iter()
        .map(|e| (e.boot, e.seq, e.kind.name()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, 1, "daemon_started"),
            (1, 2, "acquired"),
            (1, 3, "refused"),
            (1, 4, "owner_died"),
            (1, 5, "acquired"),
            (2, 1, "daemon_restarted"),
            (2, 2, "released"),
        ],
        "{seen:#?}"
    );
    match &seen[2].kind {
        EventKind::Refused {
            holder,
            resource,
            reason,
            ..
        } => {
            assert_eq!(reason, "busy");
            assert!(holder.as_deref().unwrap().contains("vm-a"), "{holder:?}");
            assert_eq!(resource.as_deref(), Some(d1.label().as_str()));
        }
        other => panic!("{other:?}"),
    }
    match &seen[3].kind {
        EventKind::OwnerDied { vm, locks } => assert_eq!((vm.pid, *locks), (ga.pid(), 1)),
        other => panic!("{other:?}"),
    }
    match &seen[5].kind {
        // vm-c's disk came back from the state files.
        EventKind::DaemonRestarted { locks, vms, pid } => {
            assert_eq!(*locks, 1);
            assert!(*vms >= 1);
            assert_eq!(*pid, f.daemon.pid());
        }
        other => panic!("{other:?}"),
    }
    // Timestamps never go back, and `vmlock events` (no follow) prints the same buffer.
    assert!(seen.windows(2).all(|w| w[0].time_ms <= w[1].time_ms));
    let (buffered, missed) = Connection::connect(&f.daemon.runtime())
        .unwrap()
        .events(None)
        .unwrap();
    assert_eq!((buffered.as_slice(), missed), (&seen[5..], 0));
    let m = metrics(&f.daemon);
    assert_eq!(m["vmlock_daemon_restarts_total"], 1.0);
    assert_eq!(m["vmlock_locks_recovered_total"], 1.0);
    drop(gb);
}

/// A subscriber that stops reading never slows the daemon: requests keep being answered at once,
/// and the subscriber is dropped with an error once it is too far behind.
#[test]
fn a_subscriber_that_stops_reading_is_dropped_and_stalls_nothing() {
    let f = Fixture::new(Daemon::start_with_config(Some(
        "event_subscriber_queue = 8\nevent_buffer = 100000",
    )));
    let socket = f.daemon.runtime().socket();
    let sleepy = raw_connection(&socket);
    write_frame(
        &sleepy,
        &Request::Events {
            after: None,
            follow: true,
        },
        &[],
    )
    .unwrap();
    // Refused acquires (an unknown VM) each record an event; the subscriber reads none of them.
    let raw = raw_connection(&socket);
    let mut slowest = Duration::ZERO;
    const EVENTS: usize = 3000;
    for _ in 0..EVENTS {
        let t = Instant::now();
        write_frame(
            &raw,
            &Request::Acquire {
                uuid: uuid::Uuid::new_v4().to_string(),
                resources: Vec::new(),
                flags: AcquireFlags::default(),
            },
            &[],
        )
        .unwrap();
        assert!(matches!(read_reply(&raw), Some(Reply::Error(_))));
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        slowest < Duration::from_millis(500),
        "a request waited {slowest:?} behind a subscriber that does not read"
    );
    // The subscriber now reads: what was queued in its socket, then an error (or, had a write
    // of the daemon timed out first, the end of the stream) — never all the events.
    let mut received = 0;
    let ending = loop {
        match vmlock_client::proto::read_frame::<Reply>(&sleepy) {
            Ok((Reply::Events(b), _)) => received += b.events.len(),
            Ok((Reply::Error(e), _)) => break Some(e),
            Ok((other, _)) => panic!("{other:?}"),
            Err(_) => break None,
        }
    };
    assert!(received < EVENTS + 1, "received {received}");
    if let Some(e) = ending {
        assert!(e.to_string().contains("fell behind"), "{e}");
    }
    // The daemon still serves subscribers that keep up.
    let (events, _) = Connection::connect(&f.daemon.runtime())
        .unwrap()
        .events(None)
        .unwrap();
    assert_eq!(events.len(), EVENTS + 1);
}
