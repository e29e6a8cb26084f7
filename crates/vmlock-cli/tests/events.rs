//! `vmlock events --json --follow`, followed while guests start, conflict and die and the daemon
//! is killed and started again: each event is seen once, in order.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::Path;
use std::process::{Child, ChildStdout, Stdio};
use std::time::Duration;
use vmlock_testkit::process::{kill_and_wait, kill_child, read_line};
use vmlock_testkit::vmlockd as vmlockd_kit;

const WAIT: Duration = Duration::from_secs(30);

type Env = vmlockd_kit::CliEnv;

/// A `sleep` guest under `vmlock run` on `disk`, once it holds the disk.
fn guest(env: &Env, name: &str, disk: &Path) -> Child {
    let mut child = env
        .vmlock()
        .args(["run", "--name", name, "--disk"])
        .arg(disk)
        .args(["--", "sleep", "600"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    loop {
        match read_line(&mut stderr, WAIT) {
            Ok(Some(line)) if line.contains("holds") => return child,
            Ok(Some(_)) => {}
            other => {
                kill_child(&mut child);
                panic!("the supervisor of {name} did not start: {other:?}");
            }
        }
    }
}

/// The next event the follower prints.
fn next(out: &mut ChildStdout) -> serde_json::Value {
    let line = read_line(out, WAIT).unwrap().expect("the follower exited");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

#[test]
fn a_follower_sees_each_event_once_in_order_across_a_daemon_restart() {
    let env = Env::new(Path::new(env!("CARGO_BIN_EXE_vmlock")));
    let disk = env.dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    assert!(env.vmlock().arg("status").status().unwrap().success());
    let mut follower = env
        .vmlock()
        .args(["events", "--json", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = follower.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut expect = |out: &mut ChildStdout, kind: &str| -> serde_json::Value {
        let e = next(out);
        assert_eq!(e["kind"], kind, "after {seen:?}: {e}");
        seen.push((e["boot"].as_u64().unwrap(), e["seq"].as_u64().unwrap()));
        e
    };
    expect(&mut out, "daemon_started");

    let mut a = guest(&env, "first", &disk);
    let e = expect(&mut out, "acquired");
    assert_eq!(e["vm"]["name"], "first");
    let refused = env
        .vmlock()
        .args(["run", "--name", "second", "--disk"])
        .arg(&disk)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let e = expect(&mut out, "refused");
    assert!(e["holder"].as_str().unwrap().contains("\"first\""), "{e}");
    // The supervisor is killed: its guest dies with it, and only the daemon acts.
    kill_and_wait(a.id());
    let _ = a.wait();
    let e = expect(&mut out, "owner_died");
    assert_eq!(e["vm"]["name"], "first");

    // The daemon is killed and started again; the follower goes on with the new one.
    vmlockd_kit::kill_in(&env.run_dir());
    assert!(env.vmlock().arg("status").status().unwrap().success());
    expect(&mut out, "daemon_restarted");
    let mut c = guest(&env, "third", &disk);
    let e = expect(&mut out, "acquired");
    assert_eq!(e["vm"]["name"], "third");

    // Each once, in order.
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted, seen, "events out of order or repeated");
    kill_child(&mut follower);
    kill_child(&mut c);
}
