//! Two hosts on one machine, each a network namespace joined to a real three-member etcd cluster
//! by a veth pair, each with its own vmlockd (runtime directory, lockspace, host name) started by
//! `vmlock run` inside its namespace. The disk directory is shared, as shared storage would be;
//! only etcd stands between the hosts (their local locks are files in their own lockspaces).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vmlock_client::qmp::Qmp;
use vmlock_testkit::etcd::EtcdCluster;
use vmlock_testkit::netns::NetHost;
use vmlock_testkit::process::{kill_and_wait, kill_child, read_line};
use vmlock_testkit::qemu::{QemuLine, Supervised};
use vmlock_testkit::vmlockd::CliEnv;

/// One at a time: the timelines below must not compete for 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The hosts' lease TTL (s), keep-alive interval, margin and fence lead (ms).
const TTL: u64 = 3;
const KEEPALIVE_MS: u64 = 500;
const WAIT: Duration = Duration::from_secs(30);

/// A host: its namespace and its CLI environment (the daemon the CLI starts is killed by pid).
struct Host {
    name: &'static str,
    net: NetHost,
    env: CliEnv,
    driver_config: PathBuf,
}

impl Host {
    /// `vmlock` with this host's runtime directory and configuration, in its namespace.
    fn vmlock(&self) -> Command {
        let mut c = self.env.vmlock();
        c.arg("--driver-config").arg(&self.driver_config);
        self.net.enter(&mut c);
        c
    }

    /// A guest (`sh` that writes its pid, then sleeps) under `vmlock run` on `disk`, once it
    /// holds the disk; and the guest's pid.
    fn guest(&self, vm: &str, disk: &Path) -> (Child, u32) {
        let pid_file = self.env.dir.path().join(format!("{vm}.pid"));
        let mut child = self
            .vmlock()
            .args(["run", "--name", vm, "--disk"])
            .arg(disk)
            .args(["--", "sh", "-c", "echo $$ > \"$0\"; exec sleep 600"])
            .arg(&pid_file)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = child.stderr.take().unwrap();
        loop {
            match read_line(&mut stderr, WAIT) {
                Ok(Some(line)) if line.contains("holds") => break,
                Ok(Some(_)) => {}
                other => {
                    kill_child(&mut child);
                    panic!("{vm} on {} did not start: {other:?}", self.name);
                }
            }
        }
        let until = Instant::now() + WAIT;
        let pid = loop {
            if let Some(pid) = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break pid;
            }
            assert!(Instant::now() < until, "{vm} wrote no pid");
            // Bounded poll: the guest writes its pid right after it starts.
            std::thread::sleep(Duration::from_millis(10));
        };
        (child, pid)
    }

    /// `vmlock ARGS` on this host, which must succeed; what it printed, trimmed.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.vmlock().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "vmlock {args:?} on {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// One try to run a guest that exits at once on `disk`: whether the disk was acquired, and
    /// the refusal's text if not.
    fn try_acquire(&self, vm: &str, disk: &Path) -> Result<(), String> {
        let out = self
            .vmlock()
            .args(["run", "--name", vm, "--disk"])
            .arg(disk)
            .args(["--", "true"])
            .output()
            .unwrap();
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Tries until the disk is acquired (bounded by `limit`): when the successful try began.
    fn acquire_when_free(&self, vm: &str, disk: &Path, limit: Duration) -> Instant {
        let began = Instant::now();
        loop {
            let attempt = Instant::now();
            match self.try_acquire(vm, disk) {
                Ok(()) => return attempt,
                Err(e) if e.contains("locked by") && began.elapsed() < limit => {
                    // Bounded poll: another host's key ending is no event here.
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!(
                    "{} did not acquire in {:?}: {e}",
                    self.name,
                    began.elapsed()
                ),
            }
        }
    }
}

/// Two hosts and the cluster they share (`None`, printed as skipped, without namespaces).
fn setup() -> Option<(EtcdCluster, Host, Host, tempfile::TempDir)> {
    let (cluster, mut hosts, disks) = setup_hosts(&["host-a", "host-b"])?;
    let b = hosts.pop()?;
    let a = hosts.pop()?;
    Some((cluster, a, b, disks))
}

/// Hosts named `names`, the cluster they share and a shared disk directory.
fn setup_hosts(names: &[&'static str]) -> Option<(EtcdCluster, Vec<Host>, tempfile::TempDir)> {
    if let Some(why) = NetHost::unavailable() {
        println!("SKIPPED: {why}");
        return None;
    }
    let nets: Vec<NetHost> = names.iter().map(|_| NetHost::create()).collect();
    let addrs: Vec<std::net::Ipv4Addr> = nets.iter().map(NetHost::root_addr).collect();
    let cluster = EtcdCluster::start_with(3, &addrs);
    let make = |name: &'static str, net: NetHost| {
        let env = CliEnv::new(Path::new(env!("CARGO_BIN_EXE_vmlock")));
        let lockspace = env.dir.path().join("lockspace");
        std::fs::create_dir(&lockspace).unwrap();
        let endpoints: Vec<String> = cluster
            .endpoints_via(net.root_addr())
            .iter()
            .map(|e| format!("{e:?}"))
            .collect();
        let daemon_config = env.dir.path().join("vmlockd.toml");
        std::fs::write(
            &daemon_config,
            format!(
                "file_lockspace_dir = {:?}\nhost_name = {name:?}\n\n[etcd]\nendpoints = [{}]\n\
                 ttl = {TTL}\nkeepalive_interval_ms = {KEEPALIVE_MS}\nmargin_ms = 500\n\
                 fence_lead_ms = 800\nrequest_timeout_ms = 2000\nconnect_timeout_ms = 2000\n",
                lockspace,
                endpoints.join(", ")
            ),
        )
        .unwrap();
        let driver_config = env.dir.path().join("driver.toml");
        std::fs::write(
            &driver_config,
            format!("daemon_config = {daemon_config:?}\n"),
        )
        .unwrap();
        Host {
            name,
            net,
            env,
            driver_config,
        }
    };
    let hosts = names
        .iter()
        .zip(nets)
        .map(|(n, net)| make(n, net))
        .collect();
    let disks = tempfile::tempdir().unwrap();
    Some((cluster, hosts, disks))
}

fn disk(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    let path = std::fs::canonicalize(dir.path()).unwrap().join(name);
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    path
}

/// Waits for process `pid` (a guest: not our child) on a thread of its own, through a pidfd;
/// the receiver gets the moment it was seen to exit.
fn exit_time(pid: u32) -> mpsc::Receiver<Instant> {
    let guest = vmlock_sys::pidfd::ProcessHandle::open(pid, None).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        guest.wait_exit(None);
        let _ = tx.send(Instant::now());
    });
    rx
}

#[test]
fn host_b_cannot_take_host_a_disk_until_a_guest_exits_or_is_killed() {
    let _s = serial();
    let Some((_cluster, a, b, disks)) = setup() else {
        return;
    };
    let d = disk(&disks, "d.img");
    let (mut web1, web1_guest) = a.guest("web1", &d);
    let refusal = b.try_acquire("db1", &d).expect_err("B took A's disk");
    assert!(
        refusal.contains("\"web1\"") && refusal.contains("host-a"),
        "the refusal does not name A's VM and host: {refusal}"
    );

    // A's guest exits: B acquires at once.
    kill_and_wait(web1_guest);
    let exited = Instant::now();
    let _ = web1.wait();
    let took = b.acquire_when_free("db1", &d, Duration::from_secs(2));
    println!(
        "B acquired {:?} after A's guest exited",
        took.saturating_duration_since(exited)
    );

    // B's guest is SIGKILLed: A acquires within one keep-alive interval.
    let (mut db1, db1_guest) = b.guest("db1", &d);
    kill_and_wait(db1_guest);
    let killed = Instant::now();
    a.acquire_when_free("web2", &d, Duration::from_millis(KEEPALIVE_MS));
    println!(
        "A acquired {:?} after B's guest was killed",
        killed.elapsed()
    );
    let _ = db1.wait();
}

#[test]
fn a_partitioned_host_stops_its_guest_before_another_host_can_take_its_disk() {
    let _s = serial();
    let Some((_cluster, a, b, disks)) = setup() else {
        return;
    };
    let d = disk(&disks, "d.img");
    let (_web1, web1_guest) = a.guest("web1", &d);
    let web1_exit = exit_time(web1_guest);
    assert!(b.try_acquire("db1", &d).is_err(), "B took A's disk");

    a.net.cut();
    let cut = Instant::now();
    let took = b.acquire_when_free("db1", &d, Duration::from_secs(TTL + 5));
    let exited = web1_exit
        .recv_timeout(WAIT)
        .expect("A's guest still runs after B took its disk");
    println!(
        "partition: A's guest stopped {:?} after the cut; B acquired {:?} after the cut",
        exited.saturating_duration_since(cut),
        took.saturating_duration_since(cut)
    );
    assert!(
        exited < took,
        "B's successful acquire began {:?} before A's guest was seen to exit",
        exited.saturating_duration_since(took)
    );
    assert!(
        took.saturating_duration_since(cut) < Duration::from_secs(TTL + 3),
        "B waited longer than TTL + 3 s"
    );

    // Healed: A serves again under a new lease (B's guest has exited: the disk is free).
    a.net.restore();
    let until = Instant::now() + WAIT;
    loop {
        match a.try_acquire("web1-again", &d) {
            Err(e) if e.contains("locked by") => {
                panic!("A was refused a disk nobody holds: {e}")
            }
            Ok(()) => break,
            Err(e) => {
                assert!(Instant::now() < until, "A never served again: {e}");
                // Bounded poll: A's new lease after the heal has no event here.
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

#[test]
fn a_stopped_daemon_cannot_keep_its_guest_running_past_the_lease() {
    let _s = serial();
    let Some((_cluster, a, b, disks)) = setup() else {
        return;
    };
    let d = disk(&disks, "d.img");
    let (_web1, web1_guest) = a.guest("web1", &d);
    let web1_exit = exit_time(web1_guest);
    let daemon_a = vmlock_testkit::vmlockd::pid_in(&a.env.run_dir()).expect("A's daemon pid");
    let signal = |sig| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon_a as i32), sig).unwrap();
    };

    signal(nix::sys::signal::Signal::SIGSTOP);
    let stopped = Instant::now();
    let took = b.acquire_when_free("db1", &d, Duration::from_secs(TTL + 5));
    let exited = web1_exit.recv_timeout(WAIT);
    let (db1, _db1_guest) = b.guest("db1", &d);
    signal(nix::sys::signal::Signal::SIGCONT);
    let exited = exited.expect("A's guest still runs after B took its disk");
    println!(
        "vmlockd stopped: A's guest stopped {:?} after, by its supervisor; B acquired {:?} after",
        exited.saturating_duration_since(stopped),
        took.saturating_duration_since(stopped)
    );
    assert!(
        exited < took,
        "B's successful acquire began {:?} before A's guest was seen to exit",
        exited.saturating_duration_since(took)
    );

    // Running again, A grants nothing it lost: B's VM holds the disk.
    let refusal = a
        .try_acquire("web1-again", &d)
        .expect_err("A granted a lost disk");
    assert!(
        refusal.contains("host-b") || refusal.contains("etcd"),
        "refused for another reason: {refusal}"
    );
    let mut db1 = db1;
    kill_child(&mut db1);
}

/// `vmlock run` of a QEMU guest on `host` (QMP sockets for vmlock and for the test); returns once
/// the guest started, with the test's QMP socket path.
fn qemu_vm(
    host: &Host,
    name: &str,
    uuid: &str,
    disk: &Path,
    options: &[&str],
    extra_qemu: &[&str],
) -> (Supervised, PathBuf) {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let qmp = host.env.dir.path().join(format!("{name}-{tag}.qmp"));
    let vmlock_qmp = host.env.dir.path().join(format!("{name}-{tag}.vmlock.qmp"));
    let qemu = QemuLine::new(disk)
        .qmp(&qmp)
        .qmp(&vmlock_qmp)
        .extra(extra_qemu)
        .argv();
    let mut cmd = host.vmlock();
    cmd.args(["run", "--name", name, "--uuid", uuid, "--qmp"])
        .arg(&vmlock_qmp)
        .args(options)
        .arg("--disk")
        .arg(disk)
        .arg("--")
        .args(qemu);
    (Supervised::spawn(cmd), qmp)
}

#[test]
fn a_live_migration_between_hosts_leaves_the_disk_to_no_third_host() {
    let _s = serial();
    if !vmlock_testkit::qemu::available() {
        println!("SKIPPED: no qemu-system-x86_64");
        return;
    }
    let Some((_cluster, hosts, disks)) = setup_hosts(&["host-a", "host-b", "host-c"]) else {
        return;
    };
    let (a, b, c) = (&hosts[0], &hosts[1], &hosts[2]);
    let disk =
        vmlock_testkit::qemu::qcow2(&std::fs::canonicalize(disks.path()).unwrap(), "m.qcow2");
    let third = |step: &str| {
        let refusal = c
            .try_acquire("intruder", &disk)
            .expect_err(&format!("a third host got the disk {step}"));
        assert!(refusal.contains("locked by"), "{step}: {refusal}");
    };
    let uuid = uuid::Uuid::new_v4().to_string();
    let (mut src, src_qmp_path) = qemu_vm(a, "mover", &uuid, &disk, &[], &[]);
    let mut src_qmp = Qmp::connect_when_ready(&src_qmp_path, WAIT).unwrap();
    third("before the migration");

    let state = a.ok(&["migrate-prepare", "--uuid", &uuid]);
    third("after prepare");

    let (mut dst, dst_qmp_path) = qemu_vm(
        b,
        "mover",
        &uuid,
        &disk,
        &["--incoming", &state],
        &["-incoming", "defer"],
    );
    let mut dst_qmp = Qmp::connect_when_ready(&dst_qmp_path, WAIT).unwrap();
    third("with both hosts holding keys");

    let uri = format!("unix:{}", b.env.dir.path().join("migration.sock").display());
    assert_eq!(src_qmp.migrate_to(&mut dst_qmp, &uri).unwrap(), "completed");
    third("between switchover and finish");
    a.ok(&["migrate-finish", "--uuid", &uuid]);
    dst_qmp.execute("cont", serde_json::json!({})).unwrap();
    src_qmp
        .execute("quit", serde_json::json!({}))
        .unwrap_or(serde_json::json!(null));
    assert_eq!(src.wait(WAIT).0, 0, "the source's QEMU exits");
    third("after the source quit");

    // The source's state is stale now: replaying it on the third host is refused.
    let out = c
        .vmlock()
        .args([
            "run",
            "--name",
            "replay",
            "--uuid",
            &uuid,
            "--incoming",
            &state,
            "--disk",
        ])
        .arg(&disk)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a stale state was taken");

    dst_qmp
        .execute("quit", serde_json::json!({}))
        .unwrap_or(serde_json::json!(null));
    assert_eq!(dst.wait(WAIT).0, 0, "the destination's QEMU exits");
    c.acquire_when_free("after", &disk, Duration::from_secs(5));
}
