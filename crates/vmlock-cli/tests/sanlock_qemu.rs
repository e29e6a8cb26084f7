//! A real QEMU guest under `vmlock --driver sanlock run`, with real sanlock daemons as two hosts
//! sharing one lease directory: the disk's lease is held while QEMU runs, a second `vmlock run`
//! of the same disk (on the same host and on host B) is refused and names the VM, and the lease
//! is free once QEMU quits over QMP.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use vmlock_client::qmp::Qmp;
use vmlock_sanlock::proto::{flags, LockspaceSpec};
use vmlock_testkit::process::wait_until;
use vmlock_testkit::qemu::{self, QemuLine, Supervised};
use vmlock_testkit::sanlock::{self, SanlockDaemon};

const IO_TIMEOUT: u32 = 1;
const LOCKSPACE: &str = "vmlock-disks";

/// One host: its daemon and the driver configuration `vmlock` is given.
struct Host {
    daemon: SanlockDaemon,
    config: PathBuf,
    runtime: PathBuf,
}

impl Host {
    fn start(base: &Path, name: &str, host_id: u64) -> Self {
        let daemon = SanlockDaemon::start(base, name);
        let config = base.join(format!("sanlock-{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "host_id = {host_id}\nlease_dir = \"{}\"\nrun_dir = \"{}\"\nio_timeout = {IO_TIMEOUT}\nhost_name = \"{name}\"\nlockspace = \"{LOCKSPACE}\"\n",
                base.join("leases").display(),
                daemon.run_dir.display()
            ),
        )
        .unwrap();
        Host {
            daemon,
            config,
            runtime: base.join(format!("vmlock-{name}")),
        }
    }

    fn vmlock(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vmlock"));
        c.arg("--runtime-dir")
            .arg(&self.runtime)
            .args(["--driver", "sanlock", "--driver-config"])
            .arg(&self.config)
            .env("VMLOCK_LOG", "warn");
        c
    }

    /// `vmlock run` of a guest that leaves a mark if it ever starts.
    fn try_start(&self, name: &str, disk: &Path) -> (Output, bool) {
        let marker = disk.with_file_name(format!("{name}.started"));
        qemu::try_run(self.vmlock(), name, disk, &marker)
    }

    /// Joins the lockspace directly (the file exists once host A's driver created it) and waits
    /// until this host's daemon has seen `host_id` renew: before that, a lease of that host is
    /// "retry later", not "held by a live host". sanlock has no event for it: bounded poll.
    fn join_and_see_live(&self, base: &Path, my_id: u64, other_id: u64) {
        let ls = LockspaceSpec {
            name: LOCKSPACE.into(),
            host_id: my_id,
            flags: flags::ALIGN1M | flags::SECTOR512,
            path: base.join("leases").join(LOCKSPACE),
            offset: 0,
        };
        self.daemon.client().add_lockspace(&ls, IO_TIMEOUT).unwrap();
        self.daemon.wait_sees_live(LOCKSPACE, other_id);
    }
}

/// QEMU under `vmlock run`; QEMU and the supervisor are SIGKILLed and reaped by pid on drop.
struct Vm {
    run: Supervised,
    qemu_pid: u32,
    qmp_path: PathBuf,
}

impl Vm {
    fn start(host: &Host, name: &str, uuid: &str, disk: &Path) -> Self {
        Self::launch(host, name, uuid, disk, &[], &[])
    }

    fn launch(
        host: &Host,
        name: &str,
        uuid: &str,
        disk: &Path,
        options: &[&str],
        extra_qemu: &[&str],
    ) -> Self {
        let qmp_path = disk.with_file_name(format!("{name}-{}.qmp", uuid::Uuid::new_v4().simple()));
        let mut cmd = host.vmlock();
        cmd.args(["run", "--name", name, "--uuid", uuid])
            .args(options)
            .arg("--disk")
            .arg(disk)
            .arg("--")
            .args(QemuLine::new(disk).qmp(&qmp_path).extra(extra_qemu).argv());
        // Returns once the supervisor says "... guest pid N": lease held, QEMU started.
        let run = Supervised::spawn(cmd);
        Vm {
            qemu_pid: run.guest_pid,
            run,
            qmp_path,
        }
    }

    /// QEMU creates its QMP socket shortly after exec and offers no event to wait on: retry the
    /// connection (bounded).
    fn qmp(&self) -> Qmp {
        Qmp::connect_when_ready(&self.qmp_path, Duration::from_secs(20)).unwrap()
    }

    fn wait(&mut self) -> (i32, String) {
        self.run.wait(Duration::from_secs(60))
    }
}

#[test]
fn qemu_runs_with_its_disk_leased_and_a_second_run_is_refused() {
    // O_DIRECT lease I/O needs a real filesystem: /var/tmp, not tmpfs.
    let dir = sanlock::workdir("vmlock-sanlock-qemu-");
    let base = dir.path();
    let a = Host::start(base, "host-a", 1);
    let disk = qemu::qcow2(base, "vm1.qcow2");
    let uuid = uuid::Uuid::new_v4().to_string();

    // The first `vmlock run` creates the lockspace, joins it (2-5 x io_timeout) and takes the
    // disk's lease before QEMU starts.
    let mut vm = Vm::start(&a, "vm1", &uuid, &disk);
    let mut qmp = vm.qmp();
    assert_eq!(
        qmp.execute("query-status", json!({})).unwrap()["status"],
        "running"
    );
    let status = a.daemon.status_text();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("r ") && l.contains(LOCKSPACE)),
        "sanlock lists the disk lease: {status}"
    );

    // Same host, another `vmlock run`: refused before its guest starts, naming vm1.
    let (out, started) = a.try_start("vm2", &disk);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && !started,
        "vm2 must not start: {err}"
    );
    assert!(
        err.contains(disk.to_str().unwrap()) && err.contains("\"vm1\"") && err.contains(&uuid),
        "{err}"
    );

    // Host B (its own daemon, host_id 2): refused too, and told the holder runs on host A.
    let b = Host::start(base, "host-b", 2);
    b.join_and_see_live(base, 2, 1);
    let (out, started) = b.try_start("vm3", &disk);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && !started,
        "vm3 must not start: {err}"
    );
    assert!(err.contains("\"vm1\"") && err.contains("host-a"), "{err}");

    // Later commands reach the VM through its supervisor's control socket (sanlock leases belong
    // to the supervisor process): pid, inquire, hotplug, unplug.
    let out = a.vmlock().args(["pid", "--uuid", &uuid]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        vm.qemu_pid.to_string(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = a
        .vmlock()
        .args(["inquire", "--uuid", &uuid])
        .output()
        .unwrap();
    let state = String::from_utf8_lossy(&out.stdout);
    assert!(
        state.starts_with("vmlock1;sanlock;d:") && state.contains("vm1.qcow2"),
        "{state}"
    );
    let out = a.vmlock().args(["status"]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let line = table
        .lines()
        .find(|l| l.contains("vm1.qcow2"))
        .unwrap_or_else(|| panic!("status lists the disk: {table}"));
    assert!(
        line.contains("vm1") && line.contains(&uuid) && line.contains(&vm.qemu_pid.to_string()),
        "{line}"
    );
    let hot = qemu::qcow2(base, "hot.qcow2");
    let out = a
        .vmlock()
        .args([
            "attach-disk",
            "--uuid",
            &uuid,
            "--disk",
            hot.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (out, started) = b.try_start("thief", &hot);
    assert!(
        !out.status.success() && !started,
        "the hotplugged disk is leased"
    );
    let out = a
        .vmlock()
        .args([
            "detach-disk",
            "--uuid",
            &uuid,
            "--disk",
            hot.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (out, started) = b.try_start("thief", &hot);
    assert!(
        out.status.success() && started,
        "unplugged disk is free: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // QEMU quits over QMP; the supervisor releases and exits with QEMU's status.
    qmp.execute("quit", json!({})).unwrap_or(json!(null));
    let (code, rest) = vm.wait();
    assert_eq!(code, 0, "{rest}");

    // The disk is free, for host B as well.
    let (out, started) = b.try_start("vm3", &disk);
    assert!(
        out.status.success() && started,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cli_migration_from_host_a_to_host_b_hands_the_lease_over_with_its_version() {
    let dir = sanlock::workdir("vmlock-sanlock-mig-");
    let base = dir.path();
    let a = Host::start(base, "host-a", 1);
    let disk = qemu::qcow2(base, "mig.qcow2");
    let uuid = uuid::Uuid::new_v4().to_string();
    let mut src = Vm::start(&a, "mover", &uuid, &disk);
    let mut src_qmp = src.qmp();
    let b = Host::start(base, "host-b", 2);
    b.join_and_see_live(base, 2, 1);

    let out = a
        .vmlock()
        .args(["migrate-prepare", "--uuid", &uuid])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(state.starts_with("vmlock1;sanlock;d:"), "{state}");
    let dst = Vm::launch(
        &b,
        "mover",
        &uuid,
        &disk,
        &["--incoming", &state],
        &["-incoming", "defer"],
    );
    let mut dst_qmp = dst.qmp();
    let (out, started) = b.try_start("third", &disk);
    assert!(
        !out.status.success() && !started,
        "the source still holds the lease"
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let uri = format!("tcp:127.0.0.1:{port}");
    assert_eq!(src_qmp.migrate_to(&mut dst_qmp, &uri).unwrap(), "completed");

    // The source lets go, then the destination takes the lease with the version from the state.
    for host in [&a, &b] {
        let out = host
            .vmlock()
            .args(["migrate-finish", "--uuid", &uuid])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dst_qmp.execute("cont", json!({})).unwrap();
    src_qmp.execute("quit", json!({})).unwrap_or(json!(null));
    let (code, rest) = src.wait();
    assert_eq!(code, 0, "{rest}");
    let (out, started) = a.try_start("third", &disk);
    assert!(
        !out.status.success() && !started,
        "host B holds the lease now"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("host-b"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = b
        .vmlock()
        .args(["inquire", "--uuid", &uuid])
        .output()
        .unwrap();
    let now = String::from_utf8(out.stdout).unwrap();
    assert_ne!(now.trim(), state, "the lease version moved on");

    // The old state is stale: a destination presenting it is refused before its guest starts.
    let marker = base.join("stale.started");
    let out = a
        .vmlock()
        .args([
            "run",
            "--name",
            "mover",
            "--uuid",
            &uuid,
            "--incoming",
            &state,
            "--disk",
        ])
        .arg(&disk)
        .arg("--")
        .arg("touch")
        .arg(&marker)
        .output()
        .unwrap();
    assert!(
        !out.status.success() && !marker.exists(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(dst);
}

#[test]
fn a_lost_lockspace_pauses_the_guest_through_vmlocks_helper_and_releases_its_lease() {
    let dir = sanlock::workdir("vmlock-sanlock-fail-");
    let base = dir.path();
    let a = Host::start(base, "host-a", 1);
    let disk = qemu::qcow2(base, "pause.qcow2");
    let uuid = uuid::Uuid::new_v4().to_string();
    // QEMU serves one client per QMP socket: vmlock gets its own.
    let vmlock_qmp = base.join("pause.vmlock.qmp");
    let qmp_arg = format!("unix:{},server=on,wait=off", vmlock_qmp.display());
    let mut vm = Vm::launch(
        &a,
        "pausable",
        &uuid,
        &disk,
        &[
            "--on-lock-failure",
            "pause",
            "--qmp",
            vmlock_qmp.to_str().unwrap(),
        ],
        &["-qmp", &qmp_arg],
    );
    let mut qmp = vm.qmp();
    assert_eq!(
        qmp.execute("query-status", json!({})).unwrap()["status"],
        "running"
    );

    // The storage of the delta leases "fails": renewals read nothing any more. After 8 x
    // io_timeout sanlock runs the kill path, `vmlock lock-failure`, and the supervisor pauses
    // QEMU over QMP and releases the lease.
    let lockspace = base.join("leases").join(LOCKSPACE);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&lockspace)
        .unwrap()
        .set_len(0)
        .unwrap();
    qmp.wait_event("STOP").unwrap();
    assert_eq!(
        qmp.execute("query-status", json!({})).unwrap()["status"],
        "paused"
    );

    // The lease goes right after the pause (no event to wait on: bounded poll of sanlock).
    wait_until(
        "the lease to be released",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || !a.daemon.status_text().lines().any(|l| l.starts_with("r ")),
    );
    // Neither the paused guest nor its supervisor was killed.
    assert!(vmlock::process::is_running(vm.qemu_pid));
    assert!(
        vm.run.supervisor.try_wait().unwrap().is_none(),
        "the supervisor is still running"
    );
}
