//! A real QEMU guest (TCG, no OS) under `vmlock run` through its whole life: start, conflict,
//! shutdown, daemon restart with the guest running, hotplug and unplug, a foreign QEMU writer.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use vmlock_client::qmp::Qmp;
use vmlock_testkit::process::kill_and_wait;
use vmlock_testkit::qemu::{self, DaemonizedQemu, QemuLine, Supervised};
use vmlock_testkit::vmlockd as vmlockd_kit;

/// How long a supervisor may take to exit once its guest was told to.
const WAIT: Duration = Duration::from_secs(60);

/// A private runtime directory; the daemon the CLI starts there is killed by pid at the end.
struct Env {
    dir: tempfile::TempDir,
    driver_config: Option<PathBuf>,
}

impl Env {
    fn new() -> Self {
        Env {
            dir: tempfile::tempdir().unwrap(),
            driver_config: None,
        }
    }

    /// An environment whose auto-started daemon uses `daemon_toml`.
    fn with_daemon_config(daemon_toml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let daemon = dir.path().join("vmlockd.toml");
        std::fs::write(&daemon, daemon_toml).unwrap();
        let driver = dir.path().join("lockd.toml");
        std::fs::write(
            &driver,
            format!("daemon_config = \"{}\"\n", daemon.display()),
        )
        .unwrap();
        Env {
            dir,
            driver_config: Some(driver),
        }
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn vmlock(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vmlock"));
        c.arg("--runtime-dir")
            .arg(self.run_dir())
            .env("VMLOCK_LOG", "warn");
        if let Some(d) = &self.driver_config {
            c.arg("--driver-config").arg(d);
        }
        c
    }

    fn output(&self, args: &[&str]) -> Output {
        self.vmlock().args(args).output().unwrap()
    }

    fn qcow2(&self, name: &str) -> PathBuf {
        qemu::qcow2(self.dir.path(), name)
    }

    fn kill_daemon(&self) {
        vmlockd_kit::kill_in(&self.run_dir());
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.kill_daemon();
    }
}

/// A QEMU guest under `vmlock run`.
struct Vm {
    run: Supervised,
    qemu_pid: u32,
    qmp_path: PathBuf,
    uuid: String,
}

fn qemu_line(disk: &Path, qmp: &Path) -> QemuLine {
    QemuLine::new(disk).qmp(qmp).scsi_controller()
}

impl Vm {
    fn start(env: &Env, name: &str, disk: &Path) -> Self {
        Self::start_with(env, name, disk, &[])
    }

    fn start_with(env: &Env, name: &str, disk: &Path, options: &[&str]) -> Self {
        Self::launch(
            env,
            name,
            &uuid::Uuid::new_v4().to_string(),
            disk,
            options,
            &[],
        )
    }

    /// `vmlock run` of a QEMU guest; returns once the supervisor reports the guest started.
    fn launch(
        env: &Env,
        name: &str,
        uuid: &str,
        disk: &Path,
        options: &[&str],
        extra_qemu: &[&str],
    ) -> Self {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let qmp_path = env.dir.path().join(format!("{name}-{tag}.qmp"));
        // QEMU serves one client per QMP socket: vmlock gets its own, the test keeps the other.
        let vmlock_qmp = env.dir.path().join(format!("{name}-{tag}.vmlock.qmp"));
        let qemu = qemu_line(disk, &qmp_path)
            .qmp(&vmlock_qmp)
            .extra(extra_qemu)
            .argv();
        let mut cmd = env.vmlock();
        cmd.args(["run", "--name", name, "--uuid", uuid, "--qmp"])
            .arg(&vmlock_qmp)
            .args(options)
            .arg("--disk")
            .arg(disk)
            .arg("--")
            .args(qemu);
        // Returns once the supervisor says "... guest pid N": leases held, QEMU started.
        let run = Supervised::spawn(cmd);
        Vm {
            qemu_pid: run.guest_pid,
            run,
            qmp_path,
            uuid: uuid.to_owned(),
        }
    }

    /// QEMU creates its QMP socket shortly after exec; it offers no event to wait on, so retry
    /// the connection (bounded).
    fn qmp(&self) -> Qmp {
        Qmp::connect_when_ready(&self.qmp_path, Duration::from_secs(20)).unwrap()
    }

    fn wait(mut self) -> i32 {
        self.run.wait(WAIT).0
    }
}

fn status_text(env: &Env) -> String {
    let out = env.output(&["status"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `vmlock run` of a guest that would leave a mark if it ever started.
fn try_start(env: &Env, name: &str, disk: &Path) -> (Output, bool) {
    let marker = env.dir.path().join(format!("{name}.started"));
    qemu::try_run(env.vmlock(), name, disk, &marker)
}

#[test]
fn start_conflict_and_shutdown_with_qmp_quit() {
    let env = Env::new();
    let disk = env.qcow2("a.qcow2");
    let vm = Vm::start(&env, "web1", &disk);
    let mut qmp = vm.qmp();
    assert_eq!(
        qmp.execute("query-status", json!({})).unwrap()["status"],
        "running"
    );

    let status = status_text(&env);
    let line = status
        .lines()
        .find(|l| l.contains(disk.to_str().unwrap()))
        .unwrap_or_else(|| panic!("{status}"));
    assert!(
        line.contains("web1")
            && line.contains(&vm.qemu_pid.to_string())
            && line.contains("exclusive"),
        "{line}"
    );

    let (out, started) = try_start(&env, "web2", &disk);
    assert!(
        !out.status.success() && !started,
        "second VM must not start"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(disk.to_str().unwrap()) && err.contains("\"web1\"") && err.contains(&vm.uuid),
        "{err}"
    );

    qmp.execute("quit", json!({})).unwrap_or(json!(null));
    assert_eq!(vm.wait(), 0);
    let (out, started) = try_start(&env, "web2", &disk);
    assert!(
        out.status.success() && started,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sigkill_of_qemu_frees_the_disk_at_once() {
    let env = Env::new();
    let disk = env.qcow2("k.qcow2");
    let vm = Vm::start(&env, "doomed", &disk);
    kill_and_wait(vm.qemu_pid);
    assert_eq!(vm.wait(), 128 + 9);
    let (out, started) = try_start(&env, "next", &disk);
    assert!(
        out.status.success() && started,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn daemon_killed_and_restarted_while_the_guest_runs() {
    let env = Env::new();
    let disk = env.qcow2("r.qcow2");
    let vm = Vm::start(&env, "steady", &disk);
    let mut qmp = vm.qmp();
    env.kill_daemon();
    // Any CLI command starts a new daemon, which knows the guest at once.
    let status = status_text(&env);
    assert!(
        status.contains("steady") && status.contains(disk.to_str().unwrap()),
        "{status}"
    );
    assert_eq!(
        qmp.execute("query-status", json!({})).unwrap()["status"],
        "running",
        "the guest must survive"
    );
    let (out, started) = try_start(&env, "intruder", &disk);
    assert!(!out.status.success() && !started);
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"steady\""));
    let pid = env.output(&["pid", "--uuid", &vm.uuid]);
    assert_eq!(
        String::from_utf8_lossy(&pid.stdout).trim(),
        vm.qemu_pid.to_string()
    );
    let state = env.output(&["inquire", "--uuid", &vm.uuid]);
    assert!(
        state.status.success(),
        "{}",
        String::from_utf8_lossy(&state.stderr)
    );
    let state = String::from_utf8_lossy(&state.stdout);
    assert!(
        state.starts_with("vmlock1;lockd;d:") && state.contains("r.qcow2"),
        "{state}"
    );
}

#[test]
fn hotplug_and_unplug_a_disk_of_a_running_guest() {
    let env = Env::new();
    let root = env.qcow2("root.qcow2");
    let hot = env.qcow2("hot.qcow2");
    let other_root = env.qcow2("other.qcow2");
    let theirs = env.qcow2("theirs.qcow2");
    let vm = Vm::start(&env, "host1", &root);
    let other = Vm::start(&env, "host2", &other_root);
    let out = env.output(&[
        "attach-disk",
        "--uuid",
        &other.uuid,
        "--disk",
        theirs.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A disk another VM holds is refused before QEMU is touched.
    let out = env.output(&[
        "attach-disk",
        "--uuid",
        &vm.uuid,
        "--disk",
        theirs.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"host2\""));

    let out = env.output(&[
        "attach-disk",
        "--uuid",
        &vm.uuid,
        "--disk",
        hot.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut qmp = vm.qmp();
    qmp.execute(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "h0", "file": {"driver": "file", "filename": hot}}),
    )
    .unwrap();
    qmp.execute(
        "device_add",
        json!({"driver": "scsi-hd", "drive": "h0", "id": "hd1", "bus": "scsi0.0"}),
    )
    .unwrap();
    let (out, _) = try_start(&env, "thief", &hot);
    assert!(!out.status.success(), "hotplugged disk is held");

    qmp.execute("device_del", json!({"id": "hd1"})).unwrap();
    qmp.wait_event("DEVICE_DELETED").unwrap();
    qmp.execute("blockdev-del", json!({"node-name": "h0"}))
        .unwrap();
    let out = env.output(&[
        "detach-disk",
        "--uuid",
        &vm.uuid,
        "--disk",
        hot.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (out, started) = try_start(&env, "thief", &hot);
    assert!(
        out.status.success() && started,
        "unplugged disk is free: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (out, _) = try_start(&env, "thief2", &root);
    assert!(!out.status.success(), "the root disk is still held");
}

#[test]
fn a_qemu_started_outside_vmlock_blocks_vmlock_run_and_is_named() {
    let env = Env::new();
    let disk = env.qcow2("f.qcow2");
    let pidfile = env.dir.path().join("foreign.pid");
    let qmp = env.dir.path().join("foreign.qmp");
    // -daemonize returns once QEMU is set up with its disk open.
    let foreign = DaemonizedQemu::start(&qemu_line(&disk, &qmp), &pidfile);
    let (out, started) = try_start(&env, "mine", &disk);
    let foreign_pid = foreign.pid;
    drop(foreign); // killed and waited for by pid

    assert!(!out.status.success() && !started);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("process {foreign_pid}"))
            && err.contains("qemu")
            && err.contains("QEMU write lock"),
        "{err}"
    );
}

const FAST_CHECKS: &str = "lease_check_interval_ms = 50\nlock_failure_grace_ms = 3000\n";

#[test]
fn lock_file_removed_under_a_running_guest_powers_it_off() {
    let lockspace = tempfile::tempdir().unwrap();
    let env = Env::with_daemon_config(&format!(
        "{FAST_CHECKS}file_lockspace_dir = \"{}\"\n",
        lockspace.path().display()
    ));
    let disk = env.qcow2("p.qcow2");
    let vm = Vm::start_with(&env, "victim", &disk, &["--on-lock-failure", "poweroff"]);
    let lock_file = std::fs::read_dir(lockspace.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_file(&lock_file).unwrap();
    // QEMU ends on the daemon's SIGTERM; the supervisor exits with it.
    let code = vm.wait();
    assert!(code == 0 || code == 128 + 15, "exit code {code}");
}

#[test]
fn lease_broken_under_a_running_guest_pauses_it_over_qmp() {
    let env = Env::with_daemon_config(FAST_CHECKS);
    let disk = env.qcow2("s.qcow2");
    let vm = Vm::start_with(&env, "pausable", &disk, &["--on-lock-failure", "pause"]);
    let mut qmp = vm.qmp();
    assert_eq!(
        qmp.execute("query-status", json!({})).unwrap()["status"],
        "running"
    );
    // Replace the image under the guest: the path no longer reaches the inode vmlock locked.
    std::fs::rename(&disk, disk.with_extension("moved")).unwrap();
    qmp.wait_event("STOP").unwrap();
    assert_eq!(
        qmp.execute("query-status", json!({})).unwrap()["status"],
        "paused"
    );
    let out = env.output(&["status", "--json"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"lost\": true"));
}

#[test]
fn pause_without_a_qmp_socket_is_refused_before_the_guest_starts() {
    let env = Env::new();
    let disk = env.qcow2("n.qcow2");
    let marker = env.dir.path().join("never");
    let out = env
        .vmlock()
        .args(["run", "--name", "x", "--on-lock-failure", "pause", "--disk"])
        .arg(&disk)
        .arg("--")
        .arg("touch")
        .arg(&marker)
        .output()
        .unwrap();
    assert!(!out.status.success() && !marker.exists());
    assert!(String::from_utf8_lossy(&out.stderr).contains("QMP"));
    let out = env
        .vmlock()
        .args([
            "run",
            "--name",
            "x",
            "--on-lock-failure",
            "restart",
            "--disk",
        ])
        .arg(&disk)
        .arg("--")
        .arg("touch")
        .arg(&marker)
        .output()
        .unwrap();
    assert!(!out.status.success() && !marker.exists());
    assert!(String::from_utf8_lossy(&out.stderr).contains("restart"));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The destination of a migration: the same VM (uuid, name, disk) under `vmlock run --incoming`.
fn start_destination(env: &Env, src: &Vm, name: &str, disk: &Path, state: &str) -> Vm {
    Vm::launch(
        env,
        name,
        &src.uuid,
        disk,
        &["--incoming", state],
        &["-incoming", "defer"],
    )
}

fn prepare(env: &Env, uuid: &str) -> String {
    let out = env.output(&["migrate-prepare", "--uuid", uuid]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn assert_refused(env: &Env, disk: &Path, step: &str) {
    let (out, started) = try_start(env, "third", disk);
    assert!(
        !out.status.success() && !started,
        "a third VM got the disk {step}"
    );
}

#[test]
fn live_migration_hands_the_lease_over_and_a_third_vm_never_gets_it() {
    let env = Env::new();
    let disk = env.qcow2("m.qcow2");
    let src = Vm::start(&env, "mover", &disk);
    let mut src_qmp = src.qmp();
    assert_refused(&env, &disk, "before migration");

    let state = prepare(&env, &src.uuid);
    assert!(state.starts_with("vmlock1;lockd;d:"), "{state}");
    assert_refused(&env, &disk, "after prepare");

    let dst = start_destination(&env, &src, "mover", &disk, &state);
    let mut dst_qmp = dst.qmp();
    assert_refused(&env, &disk, "with the destination holding copies");

    let uri = format!("tcp:127.0.0.1:{}", free_port());
    assert_eq!(src_qmp.migrate_to(&mut dst_qmp, &uri).unwrap(), "completed");
    assert_refused(&env, &disk, "between switchover and finish");

    let out = env.output(&["migrate-finish", "--uuid", &src.uuid]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dst_qmp.execute("cont", json!({})).unwrap();
    assert_eq!(
        dst_qmp.execute("query-status", json!({})).unwrap()["status"],
        "running"
    );
    src_qmp.execute("quit", json!({})).unwrap_or(json!(null));
    assert_eq!(src.wait(), 0, "the source's QEMU exits");
    assert_refused(&env, &disk, "after the source quit");

    let pid = env.output(&["pid", "--uuid", &dst.uuid]);
    assert_eq!(
        String::from_utf8_lossy(&pid.stdout).trim(),
        dst.qemu_pid.to_string(),
        "the destination owns the VM"
    );
    // The state the source handed out is stale now: replaying it is refused.
    let out = env
        .vmlock()
        .args([
            "run",
            "--name",
            "replay",
            "--uuid",
            &dst.uuid,
            "--incoming",
            &state,
            "--disk",
        ])
        .arg(&disk)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn cancelled_migration_leaves_the_source_holding_and_running() {
    let env = Env::new();
    let disk = env.qcow2("c.qcow2");
    let src = Vm::start(&env, "stayer", &disk);
    let mut src_qmp = src.qmp();

    // Cancel on the destination side: the destination lets go, its QEMU is killed.
    let state = prepare(&env, &src.uuid);
    let dst = start_destination(&env, &src, "stayer", &disk, &state);
    let out = env.output(&["migrate-cancel", "--uuid", &src.uuid]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(dst);
    assert_refused(&env, &disk, "after cancel on the destination");

    // A migration that fails in QEMU (nobody listens), then cancel on the source.
    let state = prepare(&env, &src.uuid);
    let dst = start_destination(&env, &src, "stayer", &disk, &state);
    src_qmp
        .execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events", "state": true}]}),
        )
        .unwrap();
    src_qmp
        .execute(
            "migrate",
            json!({"uri": format!("tcp:127.0.0.1:{}", free_port())}),
        )
        .unwrap();
    assert_eq!(src_qmp.migration_result().unwrap(), "failed");
    let out = env.output(&["migrate-cancel", "--uuid", &src.uuid]);
    assert!(out.status.success());
    drop(dst);
    assert_eq!(
        src_qmp.execute("query-status", json!({})).unwrap()["status"],
        "running"
    );
    assert_refused(&env, &disk, "after a failed migration");
    let pid = env.output(&["pid", "--uuid", &src.uuid]);
    assert_eq!(
        String::from_utf8_lossy(&pid.stdout).trim(),
        src.qemu_pid.to_string(),
        "the source still owns the VM"
    );

    // A forged state (wrong version) is refused and never starts the destination's guest.
    let state = prepare(&env, &src.uuid);
    let forged: Vec<String> = state
        .split(';')
        .map(|entry| match entry.strip_prefix("d:") {
            Some(_) => entry
                .rsplit_once(':')
                .map(|(head, v)| format!("{head}:{}", v.parse::<u64>().unwrap() + 1))
                .unwrap(),
            None => entry.to_owned(),
        })
        .collect();
    let forged = forged.join(";");
    let marker = env.dir.path().join("forged-started");
    let out = env
        .vmlock()
        .args([
            "run",
            "--name",
            "stayer",
            "--uuid",
            &src.uuid,
            "--incoming",
            &forged,
            "--disk",
        ])
        .arg(&disk)
        .arg("--")
        .arg("touch")
        .arg(&marker)
        .output()
        .unwrap();
    assert!(!out.status.success() && !marker.exists());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stale or forged"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = env.output(&["migrate-cancel", "--uuid", &src.uuid]);
    assert!(out.status.success());
    src_qmp.execute("quit", json!({})).unwrap_or(json!(null));
    assert_eq!(src.wait(), 0);
    let (out, started) = try_start(&env, "after", &disk);
    assert!(out.status.success() && started, "free once the source quit");
}
