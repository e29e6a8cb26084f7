//! The daemon enforces ownership itself (issue 11, item 4): a process that is not a VM's holder
//! cannot release its disks, shut it down, name a guest for it, acquire for it or walk its
//! migration — even as root, and whatever the client library would have checked. Each refusal
//! changes nothing: the disk stays locked in the kernel and listed in `status`.
//!
//! The stranger is a separate process (this test binary re-run as `stranger_process`), so the
//! daemon sees another peer pid, exactly as it would for any other root client.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{locked_by_someone, Daemon, Fixture};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use vmlock::conformance::{disk, vm, Guest};
use vmlock::{domain, AcquireOptions, DiskMode, Error};
use vmlock_client::proto::{write_frame, Reply, Request, VmIdentity};

const STRANGER_ENV: &str = "VMLOCK_OWNERSHIP_STRANGER";

/// Sends each of `requests` from a process of its own (not this one) and returns its replies.
fn as_stranger(socket: &Path, requests: &[Request]) -> Vec<Reply> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "stranger_process",
            "--ignored",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(STRANGER_ENV, socket)
        .env(
            "VMLOCK_OWNERSHIP_REQUESTS",
            serde_json::to_string(requests).unwrap(),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let replies: Vec<Reply> = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| l.split_once("REPLY ").map(|(_, r)| r.to_owned()))
            .map(|r| serde_json::from_str(&r).unwrap())
            .collect();
        let _ = tx.send(replies);
    });
    let replies = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the stranger process answered in time");
    let _ = child.wait();
    assert_eq!(replies.len(), requests.len(), "{replies:?}");
    replies
}

/// Not a test of its own: the body of the stranger process.
#[test]
#[ignore = "not a test: the body of the stranger process that other tests start"]
fn stranger_process() {
    let Some(socket) = std::env::var_os(STRANGER_ENV) else {
        return;
    };
    let requests: Vec<Request> =
        serde_json::from_str(&std::env::var("VMLOCK_OWNERSHIP_REQUESTS").unwrap()).unwrap();
    // One connection per request: a `Hold` turns its connection into a holder connection, kept
    // open until the process ends. A `Hold` naming pid 0 names this process as its guest.
    let mut holders = Vec::new();
    for mut request in requests {
        if let Request::Hold { vm, .. } = &mut request {
            if vm.pid == 0 {
                vm.pid = std::process::id();
            }
        }
        let stream = common::raw_connection(Path::new(&socket));
        let is_hold = matches!(request, Request::Hold { .. });
        write_frame(&stream, &request, &[]).unwrap();
        let reply = common::read_reply(&stream).expect("a reply");
        println!("REPLY {}", serde_json::to_string(&reply).unwrap());
        if is_hold {
            holders.push(stream);
        }
    }
}

fn denied(reply: &Reply) -> bool {
    matches!(reply, Reply::Error(Error::PermissionDenied { .. }))
}

#[test]
fn only_a_vms_holder_can_change_it() {
    let daemon = Daemon::start();
    let f = Fixture::new(daemon);
    let d = disk(&f, "owned", DiskMode::Exclusive);
    let other = disk(&f, "other", DiskMode::Exclusive);
    let guest = Guest::spawn();
    let params = vm("owned-vm", &guest);
    let uuid = params.uuid.to_string();
    let _manager =
        domain::process_start(&f.plugin, params, [d.clone()], &AcquireOptions::default()).unwrap();
    assert!(locked_by_someone(d.path()));

    let socket = f.daemon.runtime().socket();
    let stranger_vm = VmIdentity {
        uuid: uuid::Uuid::new_v4().to_string(),
        name: "stranger".into(),
        id: 9,
        // Not the stranger's child: the test's guest.
        pid: guest.pid(),
    };
    let replies = as_stranger(
        &socket,
        &[
            Request::Release {
                uuid: uuid.clone(),
                resources: None,
            },
            Request::Release {
                uuid: uuid.clone(),
                resources: Some(vec![d.clone()]),
            },
            Request::Shutdown {
                uuid: uuid.clone(),
                guest_pid: guest.pid(),
            },
            Request::GuestStarted {
                uuid: uuid.clone(),
                pid: std::process::id(),
            },
            Request::Acquire {
                uuid: uuid.clone(),
                resources: vec![other.clone()],
                flags: Default::default(),
            },
            Request::MigratePrepare { uuid: uuid.clone() },
            Request::MigrateComplete {
                uuid: uuid.clone(),
                success: true,
                source: true,
            },
            Request::Hold {
                vm: stranger_vm,
                adopt: Vec::new(),
                incoming: false,
                flags: None,
                acquire: None,
            },
        ],
    );
    for (i, reply) in replies.iter().enumerate() {
        assert!(denied(reply), "request {i} from a stranger: {reply:?}");
    }
    // Nothing changed: the disk is still locked, the VM still holds it, its guest is unchanged,
    // no migration was prepared, the other disk is free.
    assert!(locked_by_someone(d.path()));
    assert!(!locked_by_someone(other.path()));
    let mut conn = f.daemon.endpoint().connect().unwrap();
    match conn
        .call(&Request::Inquire { uuid: uuid.clone() }, &[])
        .unwrap()
    {
        Reply::Held(held) => assert_eq!(held.len(), 1, "{held:?}"),
        other => panic!("{other:?}"),
    }
    match conn
        .call(&Request::Lookup { uuid: uuid.clone() }, &[])
        .unwrap()
    {
        Reply::Vm(v) => assert_eq!(v.pid, guest.pid()),
        other => panic!("{other:?}"),
    }

    // Even the holder may not shut the VM down while its guest runs.
    let shutdown = conn.call(
        &Request::Shutdown {
            uuid: uuid.clone(),
            guest_pid: guest.pid(),
        },
        &[],
    );
    assert!(
        matches!(shutdown, Err(Error::GuestRunning { .. })),
        "shutdown under a running guest: {shutdown:?}"
    );
    assert!(locked_by_someone(d.path()));
}

/// A process that registers as the destination of a prepared migration and presents the
/// versions `status` shows, without the source's hand-over token, gets no copy of the VM's locks.
#[test]
fn a_migration_is_taken_over_only_with_the_sources_token() {
    let daemon = Daemon::start();
    let f = Fixture::new(daemon);
    let d = disk(&f, "migrating", DiskMode::Exclusive);
    let guest = Guest::spawn();
    let params = vm("migrating-vm", &guest);
    let uuid = params.uuid.to_string();
    let mut manager =
        domain::process_start(&f.plugin, params, [d.clone()], &AcquireOptions::default()).unwrap();
    let state = manager.prepare_migration("vmlock://elsewhere").unwrap();
    assert!(state.handover.is_some(), "{state}");
    let versions: Vec<(vmlock::Resource, u64)> = state
        .entries
        .iter()
        .map(|e| (e.resource.clone(), e.version))
        .collect();
    let socket = f.daemon.runtime().socket();
    let take_over = |token: Option<&str>| Request::AcquireIncoming {
        uuid: uuid.clone(),
        versions: versions.clone(),
        token: token.map(str::to_owned),
    };
    let replies = as_stranger(
        &socket,
        &[
            Request::Hold {
                vm: VmIdentity {
                    uuid: uuid.clone(),
                    name: "migrating-vm".into(),
                    id: 1,
                    pid: 0,
                },
                adopt: Vec::new(),
                incoming: true,
                flags: None,
                acquire: None,
            },
            take_over(None),
            take_over(Some("0123456789abcdef0123456789abcdef")),
        ],
    );
    assert_eq!(
        replies[0],
        Reply::Ok,
        "any process may register as a destination"
    );
    for reply in &replies[1..] {
        assert!(
            matches!(reply, Reply::Error(Error::InvalidLockState { reason }) if reason.contains("hand-over token")),
            "{reply:?}"
        );
    }
    // The source still owns everything.
    assert!(locked_by_someone(d.path()));
    let mut conn = f.daemon.endpoint().connect().unwrap();
    match conn
        .call(&Request::Lookup { uuid: uuid.clone() }, &[])
        .unwrap()
    {
        Reply::Vm(v) => assert_eq!(v.pid, guest.pid()),
        other => panic!("{other:?}"),
    }
    manager
        .complete_migration(vmlock::MigrationOutcome::Cancel)
        .unwrap();
    assert!(locked_by_someone(d.path()));
}
