//! `vmlock audit` with real QEMUs (TCG): one under `vmlock run`, one started by hand. The audit
//! scans every QEMU on the host, and other tests run QEMUs at the same time, so content checks
//! look only at this test's pids and the exit status is taken with `--pid`.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use serde_json::Value;
use std::path::Path;
use std::process::Output;
use std::time::Duration;
use vmlock_client::qmp::Qmp;
use vmlock_testkit::qemu::{self, DaemonizedQemu, QemuLine, Supervised};
use vmlock_testkit::vmlockd as vmlockd_kit;

type Env = vmlockd_kit::CliEnv;

/// `vmlock audit --json` restricted to `pids`: its exit code, and its rows.
fn audit(env: &Env, pids: &[u32]) -> (i32, Vec<Value>, Output) {
    let mut cmd = env.vmlock();
    cmd.args(["audit", "--json"]);
    for pid in pids {
        cmd.arg("--pid").arg(pid.to_string());
    }
    let out = cmd.output().unwrap();
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "audit printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), rows, out)
}

fn rows_of(rows: &[Value], pid: u32) -> Vec<&Value> {
    rows.iter().filter(|r| r["pid"] == pid).collect()
}

fn disk_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn audit_names_a_hand_started_qemu_and_passes_once_it_is_gone() {
    let env = Env::new(Path::new(env!("CARGO_BIN_EXE_vmlock")));
    let disk_a = qemu::qcow2(env.dir.path(), "a.qcow2");
    let disk_b = qemu::qcow2(env.dir.path(), "b.qcow2");
    let uuid = uuid::Uuid::new_v4().to_string();

    // A: under `vmlock run` (returns once the leases are held and QEMU was started).
    let qmp_a = env.dir.path().join("a.qmp");
    let mut run = env.vmlock();
    run.args(["run", "--name", "audited", "--uuid", &uuid, "--disk"])
        .arg(&disk_a)
        .arg("--")
        .args(QemuLine::new(&disk_a).qmp(&qmp_a).argv());
    let leased = Supervised::spawn(run);
    let pid_a = leased.guest_pid;
    // QEMU answers QMP only from its main loop, after its disks are open: once the handshake
    // is done, A's disk is in /proc/PID/fd. (connect_when_ready is a bounded retry: QEMU gives
    // no event for its socket's creation.)
    Qmp::connect_when_ready(&qmp_a, Duration::from_secs(20)).unwrap();

    // B: by hand, with a pid file and a log QEMU opens write-only (neither is a disk).
    // -daemonize returns once QEMU is set up with its disk open.
    let log = env.dir.path().join("b.log");
    let line = QemuLine::new(&disk_b).extra(&[
        "-name",
        "guest=by-hand,debug-threads=on",
        "-D",
        log.to_str().unwrap(),
    ]);
    let foreign = DaemonizedQemu::start(&line, &env.dir.path().join("b.pid"));
    let pid_b = foreign.pid;

    // The whole host: this test's QEMUs are there, whatever else runs.
    let (code, rows, out) = audit(&env, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code, 2, "an unprotected disk runs: {rows:?} {stderr}");
    let a = rows_of(&rows, pid_a);
    assert_eq!(a.len(), 1, "A writes only its disk: {a:?}");
    assert_eq!(a[0]["disk"], disk_str(&disk_a));
    assert_eq!(a[0]["status"], "leased", "{a:?}");
    assert_eq!(a[0]["lease"]["vm_name"], "audited");
    assert_eq!(a[0]["lease"]["vm_uuid"], uuid.as_str());
    assert_eq!(a[0]["lease"]["vm_pid"], pid_a);
    assert_eq!(a[0]["daemon_checked"], true);
    assert_eq!(
        a[0]["byte0_lock"], "write",
        "vmlock's exclusive lock on byte 0"
    );
    assert_eq!(a[0]["qemu_image_locks"], true);
    let b = rows_of(&rows, pid_b);
    assert_eq!(
        b.len(),
        1,
        "B writes only its disk (not its pid file or log): {b:?}"
    );
    assert_eq!(b[0]["disk"], disk_str(&disk_b));
    assert_eq!(b[0]["status"], "unprotected", "{b:?}");
    assert_eq!(b[0]["lease"], Value::Null);
    assert_eq!(b[0]["byte0_lock"], "none");
    assert_eq!(b[0]["name"], "by-hand");

    // The table names B's pid and disk too.
    let table = env
        .vmlock()
        .args([
            "audit",
            "--pid",
            &pid_a.to_string(),
            "--pid",
            &pid_b.to_string(),
        ])
        .output()
        .unwrap();
    assert_eq!(table.status.code(), Some(2));
    let text = String::from_utf8_lossy(&table.stdout);
    let line_b = text
        .lines()
        .find(|l| l.contains(disk_str(&disk_b)))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line_b.trim_start().starts_with(&pid_b.to_string()) && line_b.contains("UNPROTECTED"),
        "{line_b}"
    );
    let line_a = text
        .lines()
        .find(|l| l.contains(disk_str(&disk_a)))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line_a.contains(&format!("leased by VM audited ({uuid}")),
        "{line_a}"
    );

    // Only A left: --pid keeps other tests' QEMUs out of the exit status.
    drop(foreign); // SIGKILLed and waited for by pid
    let (code, rows, out) = audit(&env, &[pid_a, pid_b]);
    assert_eq!(
        code,
        0,
        "only a leased disk runs: {rows:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(rows_of(&rows, pid_b).is_empty(), "{rows:?}");
    assert_eq!(rows_of(&rows, pid_a)[0]["status"], "leased");

    drop(leased); // guest and supervisor SIGKILLed and waited for by pid; then env's daemon
}

/// A QEMU with one disk on local storage and one on storage that stops answering (a FUSE
/// filesystem held on command): the audit reports the local disk and names the hung one as not
/// audited, within its bound, instead of waiting with it.
#[test]
fn a_disk_whose_storage_hangs_costs_the_audit_only_that_disk() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::Instant;
    use vmlock_testkit::fuse::{private_mount_namespace, HangFs, DISK_NAME};

    private_mount_namespace().unwrap();
    let env = Env::new(Path::new(env!("CARGO_BIN_EXE_vmlock")));
    let local = qemu::qcow2(env.dir.path(), "local.qcow2");
    let mountpoint = env.dir.path().join("hung");
    std::fs::create_dir(&mountpoint).unwrap();
    let fs = HangFs::mount(&mountpoint).unwrap();
    let remote = fs.file(DISK_NAME);
    let line = QemuLine::new(&local).extra(&[
        "-blockdev".to_owned(),
        format!("driver=file,filename={},node-name=hf", remote.display()),
        "-blockdev".to_owned(),
        "driver=raw,file=hf,node-name=hd".to_owned(),
        "-device".to_owned(),
        "virtio-blk-pci,drive=hd".to_owned(),
    ]);
    let guest = DaemonizedQemu::start(&line, &env.dir.path().join("q.pid"));
    fs.hang();

    let started = Instant::now();
    let mut audit = env
        .vmlock()
        .args(["audit", "--json", "--storage-timeout-ms", "500", "--pid"])
        .arg(guest.pid.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The report is complete at its closing bracket. (The process itself can end only once the
    // hung request is answered: a FUSE request its server has read waits uninterruptibly.)
    let stdout = audit.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let end = line == "]";
            text.push_str(&line);
            text.push('\n');
            if end {
                break;
            }
        }
        let _ = tx.send(text);
    });
    let report = rx.recv_timeout(Duration::from_secs(30));
    let took = started.elapsed();
    // Answer again before anything waits on the QEMU or the audit.
    fs.resume();
    let report =
        report.expect("the audit printed no report within 30 s: it waited on the hung disk");
    let status = audit.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut audit.stderr.take().unwrap(), &mut stderr).unwrap();
    let rows: Vec<Value> = serde_json::from_str(&report).unwrap();
    let mine = rows_of(&rows, guest.pid);
    let status_of = |disk: &Path| {
        mine.iter()
            .find(|r| r["disk"] == disk_str(disk))
            .map(|r| r["status"].clone())
    };
    assert_eq!(
        status_of(&local),
        Some("unprotected".into()),
        "{rows:?} {stderr}"
    );
    assert_eq!(
        status_of(&remote),
        Some("unanswered".into()),
        "{rows:?} {stderr}"
    );
    assert!(
        stderr.contains(remote.to_str().unwrap()) && stderr.contains("did not answer"),
        "{stderr}"
    );
    assert_eq!(status.code(), Some(2), "an unprotected disk runs: {stderr}");
    assert!(took < Duration::from_secs(10), "the audit took {took:?}");
    drop(guest);
    drop(fs);
}
