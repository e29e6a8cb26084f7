//! libvirt's `vmlock` lock-driver plugin in a real, private libvirtd running real QEMU (TCG)
//! domains: the lock taken before QEMU opens its disk, refusals that name the holder, the disk
//! freed when QEMU dies with no libvirt call, daemon and libvirtd restarts with domains running,
//! pause and resume, hotplug and unplug, and a live migration between two libvirt daemons.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use vmlock_client::runtime::{spawn_daemon, RuntimeDir};
use vmlock_testkit::libvirt::{self, domain_xml, LibvirtDaemon};
use vmlock_testkit::process::wait_until;
use vmlock_testkit::qemu;
use vmlock_testkit::vmlockd as vmlockd_kit;

/// How long a change the daemon makes on its own (a guest's exit seen on its pidfd) may take.
const SETTLE: Duration = Duration::from_secs(10);

/// One host: a private vmlockd (started by the CLI in a private runtime directory, killed by pid
/// at the end) and the plugin where libvirtd loads it.
struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Self {
        Self::with_daemon_config(None)
    }

    /// A host whose vmlockd runs with the configuration text `config`.
    fn with_daemon_config(config: Option<&str>) -> Self {
        let host = Host {
            dir: tempfile::tempdir().unwrap(),
        };
        let config = config.map(|text| {
            let path = host.dir.path().join("vmlockd.toml");
            std::fs::write(&path, text).unwrap();
            path
        });
        // This build's daemon, started from here (outside any libvirtd's namespace) and named
        // explicitly: a `vmlockd` beside the binary may be older in a shared target directory.
        let runtime = RuntimeDir::resolve(Some(&host.run_dir())).unwrap();
        let vmlock = Path::new(env!("CARGO_BIN_EXE_vmlock"));
        spawn_daemon(&runtime, vmlock, &["daemon".into()], config.as_deref()).unwrap();
        host
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn vmlock(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_vmlock"))
            .arg("--runtime-dir")
            .arg(self.run_dir())
            .args(args)
            .env("VMLOCK_LOG", "warn")
            .output()
            .unwrap()
    }

    /// `vmlock status --json`: (disk path, VM name) of every held disk.
    fn held(&self) -> Vec<(String, String)> {
        let out = self.vmlock(&["status", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["resource"].as_str().unwrap_or_default().to_owned(),
                    r["vm"]["name"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    fn holder_of(&self, disk: &Path) -> Option<String> {
        let disk = disk.display().to_string();
        self.held()
            .into_iter()
            .find(|(r, _)| r.contains(&disk))
            .map(|(_, vm)| vm)
    }

    /// A private libvirtd whose lock manager is vmlock, on this host's daemon.
    fn libvirtd(&self) -> LibvirtDaemon {
        libvirt::vmlock_builder(
            self.dir.path(),
            &self.run_dir(),
            Path::new(env!("CARGO_BIN_EXE_vmlock")),
        )
        .start()
    }

    fn qcow2(&self, name: &str) -> PathBuf {
        qemu::qcow2(self.dir.path(), name)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        vmlockd_kit::kill_in(&self.run_dir());
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Bounded poll until no VM holds `disk`: the daemon unlocks from a guest's pidfd or a
/// release, asynchronously to libvirt's return.
fn wait_freed(host: &Host, disk: &Path, what: &str) {
    wait_until(what, SETTLE, Duration::from_millis(10), || {
        host.holder_of(disk).is_none()
    });
}

/// `virsh attach-disk` of a qcow2 `disk` on the virtio-scsi bus as `sda` (a virtio-blk unplug
/// needs a guest OS to finish).
fn attach_scsi(libvirtd: &LibvirtDaemon, domain: &str, disk: &Path) {
    libvirtd.virsh_ok(&[
        "attach-disk",
        domain,
        &disk.display().to_string(),
        "sda",
        "--targetbus",
        "scsi",
        "--subdriver",
        "qcow2",
    ]);
}

fn skip() -> bool {
    if !libvirt::available() || !qemu::available() {
        eprintln!(
            "skipped: libvirtd, virsh or QEMU is not installed (scripts/install-test-deps.sh)"
        );
        return true;
    }
    false
}

fn define(libvirtd: &LibvirtDaemon, name: &str, disks: &[&Path]) -> String {
    let uuid = uuid::Uuid::new_v4().to_string();
    libvirtd.define(&domain_xml(name, Some(&uuid), disks));
    uuid
}

#[test]
fn a_domain_holds_its_disk_a_second_is_refused_by_name_and_destroy_frees_it() {
    if skip() {
        return;
    }
    let host = Host::new();
    let libvirtd = host.libvirtd();
    let disk = host.qcow2("a");
    define(&libvirtd, "first", &[&disk]);
    define(&libvirtd, "second", &[&disk]);

    libvirtd.virsh_ok(&["start", "first"]);
    assert_eq!(libvirtd.domstate("first"), "running");
    assert_eq!(
        host.holder_of(&disk).as_deref(),
        Some("first"),
        "{:?}",
        host.held()
    );
    // The pre-exec child took the disk itself and handed it down: the holder it started (QEMU's
    // child) took over, and vmlockd names it as the holder.
    let qemu_pid = libvirtd.qemu_pid("first").unwrap();
    let holder = holder_process(qemu_pid).expect("no holder process under QEMU");
    let command_line = std::fs::read(format!("/proc/{holder}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&command_line).contains("--takeover-fd"),
        "not the fast start: {}",
        String::from_utf8_lossy(&command_line)
    );
    // Bounded poll: nobody waits for the takeover; it follows the start by milliseconds.
    wait_until(
        "the holder took over from QEMU",
        SETTLE,
        Duration::from_millis(20),
        || status_holder_pid(&host, &disk) == Some(u64::from(holder)),
    );
    // It started at a lower priority (its start-up is off the domain's start) and serves at the
    // normal one once it took over. Bounded poll: it resets its priority right after.
    wait_until(
        "the holder serves at the normal priority",
        SETTLE,
        Duration::from_millis(20),
        || nice_of(holder) == Some(0),
    );

    // vmlock refuses in libvirt's pre-exec child, before QEMU opens the disk (QEMU's own image
    // locking would otherwise be what refuses, with its own message).
    let out = libvirtd.virsh(&["start", "second"]);
    assert!(!out.status.success(), "second started: {}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vmlock"), "not vmlock's refusal: {err}");
    assert!(err.contains("\"first\""), "the holder is not named: {err}");
    assert!(
        !err.contains("Failed to get \"write\" lock"),
        "QEMU refused, not vmlock: {err}"
    );
    assert_ne!(libvirtd.domstate("second"), "running");
    assert_eq!(host.holder_of(&disk).as_deref(), Some("first"));
    // The refused start left no control socket behind (it is bound under a name of its own and
    // renamed only once the domain holds its disks), and no holder: only the first domain's.
    let sockets: Vec<String> = std::fs::read_dir(host.run_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vm-"))
        .collect();
    assert_eq!(sockets.len(), 1, "{sockets:?}");

    // Destroy makes no plugin call: the disk is freed from QEMU's exit alone.
    libvirtd.virsh_ok(&["destroy", "first"]);
    // Bounded poll: the daemon unlocks on the guest's pidfd, asynchronously to virsh's return.
    wait_freed(&host, &disk, "the disk is freed");
    libvirtd.virsh_ok(&["start", "second"]);
    assert_eq!(host.holder_of(&disk).as_deref(), Some("second"));
    libvirtd.virsh_ok(&["destroy", "second"]);
}

/// Watches byte 0 of `disk` (vmlock's lock) from its own thread until stopped; counts the probes
/// that found no lock on it once one had been seen: each is a moment a third VM could have taken
/// the disk.
struct FreeWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<(u64, u64)>>,
}

impl FreeWatch {
    fn start(disk: &Path) -> Self {
        Self::watch(disk, None)
    }

    /// Counts instead the probes that found the disk free while process `guest` still ran.
    fn while_running(disk: &Path, guest: u32) -> Self {
        Self::watch(disk, Some(guest))
    }

    fn watch(disk: &Path, guest: Option<u32>) -> Self {
        use std::sync::atomic::Ordering;
        let file = std::fs::File::open(disk).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let (mut probes, mut free, mut seen) = (0, 0, false);
            while !flag.load(Ordering::Relaxed) {
                probes += 1;
                let held = vmlock_sys::ofd::probe(
                    std::os::fd::AsFd::as_fd(&file),
                    vmlock_sys::ofd::LockKind::Exclusive,
                    0,
                    1,
                )
                .unwrap();
                match (held, guest) {
                    (Some(_), _) => seen = true,
                    // Still running after the disk was seen free: it ran unprotected then.
                    (None, Some(pid)) if vmlock::process::is_running(pid) => free += 1,
                    (None, None) if seen => free += 1,
                    (None, _) => {}
                }
                // Deliberate pacing of a sampling probe, not a wait for an event.
                std::thread::sleep(Duration::from_micros(200));
            }
            (probes, free)
        });
        FreeWatch {
            stop,
            thread: Some(thread),
        }
    }

    /// (probes, probes that found the disk free after it had been locked).
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// A third party — a `vmlock run` guest that is not QEMU — asks for `disk`; it must be refused
/// with `holder` named.
fn assert_refused(host: &Host, disk: &Path, holder: &str) {
    let out = host.vmlock(&[
        "run",
        "--name",
        "intruder",
        "--disk",
        &disk.display().to_string(),
        "--",
        "/bin/true",
    ]);
    assert!(
        !out.status.success(),
        "intruder got {}: {}",
        disk.display(),
        text(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("\"{holder}\"")),
        "{holder} not named: {err}"
    );
}

#[test]
fn a_vmlockd_kill_and_a_libvirtd_restart_keep_every_domain_and_lock() {
    if skip() {
        return;
    }
    let host = Host::new();
    let mut libvirtd = host.libvirtd();
    let (a, b, c) = (host.qcow2("a"), host.qcow2("b"), host.qcow2("c"));
    define(&libvirtd, "one", &[&a]);
    define(&libvirtd, "two", &[&b]);
    libvirtd.virsh_ok(&["start", "one"]);
    libvirtd.virsh_ok(&["start", "two"]);
    let pids = [
        libvirtd.qemu_pid("one").unwrap(),
        libvirtd.qemu_pid("two").unwrap(),
    ];
    let watch_a = FreeWatch::start(&a);

    // kill -9 of the lock daemon: the holders keep the locks, nothing is killed.
    let daemon = vmlockd_kit::pid_in(&host.run_dir()).unwrap();
    vmlock_testkit::process::kill_and_wait(daemon);
    for (name, pid) in ["one", "two"].iter().zip(pids) {
        assert!(vmlock::process::is_running(pid), "{name}'s QEMU died");
        assert_eq!(libvirtd.domstate(name), "running");
    }
    // The intruder's CLI starts a new daemon, which refuses from its recovered table.
    assert_refused(&host, &a, "one");
    // Bounded poll: the holders reconnect by themselves and hand their descriptions back.
    wait_until(
        "both holders are back",
        SETTLE,
        Duration::from_millis(20),
        || {
            host.holder_of(&a).as_deref() == Some("one")
                && host.holder_of(&b).as_deref() == Some("two")
        },
    );

    // libvirtd restarted: no plugin call comes, the domains and their locks stay.
    libvirtd.restart();
    for (name, pid) in ["one", "two"].iter().zip(pids) {
        assert!(vmlock::process::is_running(pid), "{name}'s QEMU died");
        assert_eq!(libvirtd.domstate(name), "running");
    }
    assert_refused(&host, &b, "two");

    // Afterwards hotplug, unplug and destroy still work.
    attach_scsi(&libvirtd, "two", &c);
    assert_eq!(host.holder_of(&c).as_deref(), Some("two"));
    assert_refused(&host, &c, "two");
    libvirtd.virsh_ok(&["detach-disk", "two", "sda"]);
    wait_freed(&host, &c, "the unplugged disk is free");
    let (probes, free) = watch_a.finish();
    assert!(probes > 0);
    assert_eq!(
        free, 0,
        "one's disk was free {free} times of {probes} while it ran"
    );
    libvirtd.virsh_ok(&["destroy", "one"]);
    wait_freed(&host, &a, "one's disk is free");
    libvirtd.virsh_ok(&["destroy", "two"]);
}

#[test]
fn pause_resume_paused_start_and_hotplug_never_leave_the_disk_free() {
    if skip() {
        return;
    }
    let host = Host::new();
    let libvirtd = host.libvirtd();
    let (a, c) = (host.qcow2("a"), host.qcow2("c"));
    define(&libvirtd, "vm", &[&a]);

    // Started paused: the disk is locked from before QEMU opened it, not from the resume.
    let watch = FreeWatch::start(&a);
    libvirtd.virsh_ok(&["start", "vm", "--paused"]);
    assert_eq!(libvirtd.domstate("vm"), "paused");
    assert_eq!(host.holder_of(&a).as_deref(), Some("vm"));
    assert_refused(&host, &a, "vm");
    libvirtd.virsh_ok(&["resume", "vm"]);
    assert_eq!(libvirtd.domstate("vm"), "running");

    // Suspend releases (twice, from two libvirt threads) and resume acquires: both idempotent;
    // the leases stay while QEMU keeps its images open.
    for _ in 0..2 {
        libvirtd.virsh_ok(&["suspend", "vm"]);
        assert_eq!(libvirtd.domstate("vm"), "paused");
        assert_refused(&host, &a, "vm");
        libvirtd.virsh_ok(&["resume", "vm"]);
        assert_eq!(libvirtd.domstate("vm"), "running");
    }

    // A resume is answered by the domain's holder alone: it works while vmlockd cannot answer
    // (stopped here; the same holds while it restarts), and the disk stays locked.
    libvirtd.virsh_ok(&["suspend", "vm"]);
    let daemon = vmlockd_kit::pid_in(&host.run_dir()).unwrap();
    let stopped = nix::unistd::Pid::from_raw(daemon as i32);
    nix::sys::signal::kill(stopped, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let resumed = libvirtd.virsh(&["resume", "vm"]);
    nix::sys::signal::kill(stopped, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(resumed.status.success(), "resume: {}", text(&resumed));
    assert_eq!(libvirtd.domstate("vm"), "running");
    assert_refused(&host, &a, "vm");

    // Hotplug takes the new disk before QEMU opens it; unplug frees it.
    attach_scsi(&libvirtd, "vm", &c);
    assert_eq!(host.holder_of(&c).as_deref(), Some("vm"));
    libvirtd.virsh_ok(&["suspend", "vm"]);
    libvirtd.virsh_ok(&["resume", "vm"]); // re-acquire with the hotplugged disk held: no error
    libvirtd.virsh_ok(&["detach-disk", "vm", "sda"]);
    wait_freed(&host, &c, "the unplugged disk is free");
    assert_eq!(host.holder_of(&a).as_deref(), Some("vm"));
    let (probes, free) = watch.finish();
    assert_eq!(
        free, 0,
        "the disk was free {free} times of {probes} after it was locked"
    );
    libvirtd.virsh_ok(&["destroy", "vm"]);
}

#[test]
fn a_guest_under_vmlock_run_and_a_libvirt_domain_exclude_each_other() {
    if skip() {
        return;
    }
    let host = Host::new();
    let libvirtd = host.libvirtd();
    let (a, b) = (host.qcow2("a"), host.qcow2("b"));

    // A guest that is not QEMU holds a: QEMU's image locking plays no part in the refusal.
    let mut guest = Command::new(env!("CARGO_BIN_EXE_vmlock"))
        .arg("--runtime-dir")
        .arg(host.run_dir())
        .args([
            "run",
            "--name",
            "plain",
            "--disk",
            &a.display().to_string(),
            "--",
            "sleep",
            "600",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = guest.stderr.take().unwrap();
    // The supervisor announces the guest once it holds the disk.
    loop {
        let line = vmlock_testkit::process::read_line(&mut stderr, Duration::from_secs(30))
            .unwrap()
            .expect("the supervisor exited");
        if line.contains("holds") {
            break;
        }
    }
    define(&libvirtd, "dom", &[&a]);
    let out = libvirtd.virsh(&["start", "dom"]);
    assert!(
        !out.status.success(),
        "dom started on a held disk: {}",
        text(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vmlock") && err.contains("\"plain\""), "{err}");
    vmlock_testkit::process::kill_child(&mut guest);

    // The reverse: a domain holds b; `vmlock run` is refused with the domain named.
    define(&libvirtd, "dom2", &[&b]);
    libvirtd.virsh_ok(&["start", "dom2"]);
    assert_refused(&host, &b, "dom2");
    libvirtd.virsh_ok(&["destroy", "dom2"]);
}

/// Process `pid`'s nice value (field 19 of `/proc/PID/stat`).
fn nice_of(pid: u32) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(16)?.parse().ok()
}

/// A number of `status --json`'s row for `disk`, read by `field`.
fn status_number(
    host: &Host,
    disk: &Path,
    field: impl Fn(&serde_json::Value) -> Option<u64>,
) -> Option<u64> {
    let out = host.vmlock(&["status", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let disk = disk.display().to_string();
    rows.as_array()?
        .iter()
        .find(|r| r["resource"].as_str().is_some_and(|p| p.contains(&disk)))
        .and_then(field)
}

/// `status --json`'s guest pid of the VM holding `disk`.
fn holder_pid(host: &Host, disk: &Path) -> Option<u64> {
    status_number(host, disk, |r| r["vm"]["pid"].as_u64())
}

/// `status --json`'s holder pid for `disk`.
fn status_holder_pid(host: &Host, disk: &Path) -> Option<u64> {
    status_number(host, disk, |r| r["holder_pid"].as_u64())
}

fn socket_uri(libvirtd: &LibvirtDaemon) -> String {
    format!(
        "qemu+unix:///system?socket={}/run/libvirt/libvirt-sock",
        libvirtd.dir().display()
    )
}

#[test]
fn a_live_migration_between_two_libvirt_daemons_hands_the_lock_over_without_a_gap() {
    if skip() {
        return;
    }
    let host = Host::new();
    let mut source = host.libvirtd();
    let destination = host.libvirtd();
    let a = host.qcow2("a");
    define(&source, "mig", &[&a]);
    source.virsh_ok(&["start", "mig"]);
    let source_pid = source.qemu_pid("mig").unwrap();
    assert_eq!(holder_pid(&host, &a), Some(u64::from(source_pid)));
    // A libvirtd restarted with the domain running still migrates it (the plugin keeps nothing
    // between calls; the holder keeps the leases).
    source.restart();

    // Started on the destination while the source runs, without a migration: refused, with the
    // running domain named.
    destination.define(&domain_xml(
        "mig",
        Some(source.virsh_ok(&["domuuid", "mig"]).trim()),
        &[&a],
    ));
    let out = destination.virsh(&["start", "mig"]);
    assert!(
        !out.status.success(),
        "a second copy started: {}",
        text(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already runs") && err.contains("not migrating"),
        "{err}"
    );
    destination.virsh_ok(&["undefine", "mig"]);

    let watch = FreeWatch::start(&a);
    source.virsh_ok(&[
        "migrate",
        "--live",
        "--unsafe",
        "mig",
        &socket_uri(&destination),
    ]);
    assert_eq!(destination.domstate("mig"), "running");
    let destination_pid = destination.qemu_pid("mig").unwrap();
    // Bounded poll: the source QEMU's exit reaches the daemon on its pidfd.
    wait_until(
        "the destination owns the disk",
        SETTLE,
        Duration::from_millis(10),
        || holder_pid(&host, &a) == Some(u64::from(destination_pid)),
    );
    assert!(
        !vmlock::process::is_running(source_pid),
        "the source QEMU still runs"
    );
    let (probes, free) = watch.finish();
    assert_eq!(
        free, 0,
        "the disk was free {free} times of {probes} during the migration"
    );
    assert_refused(&host, &a, "mig");

    // And back: the destination's holder is now the owner and can migrate out in turn.
    destination.virsh_ok(&["migrate", "--live", "--unsafe", "mig", &socket_uri(&source)]);
    assert_eq!(source.domstate("mig"), "running");
    let back_pid = source.qemu_pid("mig").unwrap();
    wait_until(
        "the source owns the disk again",
        SETTLE,
        Duration::from_millis(10),
        || holder_pid(&host, &a) == Some(u64::from(back_pid)),
    );
    source.virsh_ok(&["destroy", "mig"]);
    wait_freed(&host, &a, "the disk is freed");
}

#[test]
fn a_failed_migration_leaves_the_source_holding_and_a_forged_state_is_refused() {
    if skip() {
        return;
    }
    let host = Host::new();
    let source = host.libvirtd();
    let destination = host.libvirtd();
    let (a, c) = (host.qcow2("a"), host.qcow2("c"));
    let uuid = define(&source, "mig", &[&a]);
    source.virsh_ok(&["start", "mig"]);
    let source_pid = source.qemu_pid("mig").unwrap();
    let watch = FreeWatch::start(&a);

    let mut migrate = Command::new("virsh")
        .args(["-c", &source.uri(), "migrate", "--live", "--unsafe", "mig"])
        .arg(socket_uri(&destination))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded poll: the destination's QEMU pid file appears as libvirt forks it, and its holder
    // serves once it registered as the destination (before QEMU's exec). Freezing QEMU then
    // keeps the migration from finishing.
    let mut destination_pid = None;
    let mut holder = None;
    wait_until(
        "the destination's holder",
        SETTLE,
        Duration::from_millis(2),
        || {
            destination_pid = destination.qemu_pid("mig");
            holder = destination_pid.and_then(|pid| {
                vmlock_client::control::find_serving(&host.run_dir(), &uuid, pid).ok()
            });
            holder.is_some()
        },
    );
    let (destination_pid, holder) = (destination_pid.unwrap(), holder.unwrap());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(destination_pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();

    // The destination's holder takes the leases over only with the source's hand-over secret:
    // the state anyone can read (`vmlock inquire`), with no secret or a made-up one, is refused.
    let readable = host.vmlock(&["inquire", "--uuid", &uuid]);
    assert!(readable.status.success(), "{}", text(&readable));
    let mut state: vmlock::LockState = String::from_utf8_lossy(&readable.stdout)
        .trim()
        .parse()
        .unwrap();
    for forged in [None, Some("00000000000000000000000000000000".to_owned())] {
        state.handover = forged;
        let r = vmlock_client::control::call_at(
            &holder,
            &vmlock_client::control::ControlRequest::Ensure {
                state: Some(state.to_string()),
                resources: vec![vmlock::Resource::disk(&a, vmlock::DiskMode::Exclusive).unwrap()],
            },
        );
        assert!(r.is_err(), "a forged state was taken: {r:?}");
    }
    assert_eq!(holder_pid(&host, &a), Some(u64::from(source_pid)));

    // The destination dies mid-migration: the migration fails, the source runs on and keeps
    // everything.
    vmlock_testkit::process::kill_and_wait(destination_pid);
    let failed = vmlock_testkit::process::wait_child(&mut migrate, Duration::from_secs(60))
        .expect("virsh migrate hangs");
    assert!(
        !failed.success(),
        "the migration succeeded with a dead destination"
    );
    assert_eq!(source.domstate("mig"), "running");
    assert!(vmlock::process::is_running(source_pid));
    assert_eq!(holder_pid(&host, &a), Some(u64::from(source_pid)));
    assert_refused(&host, &a, "mig");
    let (probes, free) = watch.finish();
    assert_eq!(
        free, 0,
        "the disk was free {free} times of {probes} during the failed migration"
    );

    // The source is whole again: hotplug works, and a second migration goes through.
    attach_scsi(&source, "mig", &c);
    assert_eq!(host.holder_of(&c).as_deref(), Some("mig"));
    source.virsh_ok(&["detach-disk", "mig", "sda"]);
    source.virsh_ok(&[
        "migrate",
        "--live",
        "--unsafe",
        "mig",
        &socket_uri(&destination),
    ]);
    assert_eq!(destination.domstate("mig"), "running");
    destination.virsh_ok(&["destroy", "mig"]);
    wait_freed(&host, &a, "the disk is freed");
}

#[test]
fn a_lost_lease_pauses_the_domain_through_libvirt() {
    if skip() {
        return;
    }
    let host = Host::new();
    let libvirtd = host.libvirtd();
    let a = host.qcow2("a");
    let xml = domain_xml("careful", None, &[&a]).replace(
        "  <devices>",
        "  <on_lockfailure>pause</on_lockfailure>\n  <devices>",
    );
    libvirtd.define(&xml);
    libvirtd.virsh_ok(&["start", "careful"]);
    let pid = libvirtd.qemu_pid("careful").unwrap();

    // The image is replaced under the running domain: its lease is lost.
    let replacement = host.qcow2("replacement");
    std::fs::rename(&replacement, &a).unwrap();
    // Bounded poll: vmlockd checks leases once a second, then asks the holder, which asks
    // libvirt to suspend the domain.
    wait_until(
        "the domain is paused",
        SETTLE,
        Duration::from_millis(50),
        || libvirtd.domstate("careful") == "paused",
    );
    assert!(
        vmlock::process::is_running(pid),
        "the domain was killed, not paused"
    );
    let reason = libvirtd.virsh_ok(&["domstate", "careful", "--reason"]);
    assert!(reason.contains("paused"), "{reason}");
    libvirtd.virsh_ok(&["destroy", "careful"]);
}

#[test]
fn a_domain_under_stock_lockd_and_one_under_vmlock_exclude_each_other() {
    if skip() {
        return;
    }
    let host = Host::new();
    let ours = host.libvirtd();
    let theirs = LibvirtDaemon::lockd();
    let (a, b) = (host.qcow2("a"), host.qcow2("b"));

    // vmlock first: the lockd domain cannot start on the disk.
    define(&ours, "ours", &[&a]);
    define(&theirs, "theirs", &[&a]);
    ours.virsh_ok(&["start", "ours"]);
    let out = theirs.virsh(&["start", "theirs"]);
    assert!(
        !out.status.success(),
        "lockd's domain started: {}",
        text(&out)
    );
    assert_ne!(theirs.domstate("theirs"), "running");
    assert_eq!(host.holder_of(&a).as_deref(), Some("ours"));
    ours.virsh_ok(&["destroy", "ours"]);

    // lockd first (virtlockd's whole-byte POSIX lock, QEMU's own lock bytes): vmlock refuses in
    // the child, naming the process that holds the disk.
    define(&theirs, "theirs-b", &[&b]);
    define(&ours, "ours-b", &[&b]);
    theirs.virsh_ok(&["start", "theirs-b"]);
    let out = ours.virsh(&["start", "ours-b"]);
    assert!(
        !out.status.success(),
        "vmlock's domain started: {}",
        text(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("vmlock") && err.contains("locked by process"),
        "{err}"
    );
    assert!(host.holder_of(&b).is_none());
    theirs.virsh_ok(&["destroy", "theirs-b"]);
}

#[test]
fn install_is_idempotent_and_uninstall_removes_only_what_install_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let (plugins, etc) = (dir.path().join("lock-driver"), dir.path().join("etc"));
    let built = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .join("libvmlock_libvirt.so");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_vmlock"))
            .args(["libvirt"])
            .args(args)
            .arg("--plugin-dir")
            .arg(&plugins)
            .arg("--config-dir")
            .arg(&etc)
            .arg("--plugin")
            .arg(&built)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    for _ in 0..2 {
        let (ok, said) = run(&["install"]);
        assert!(ok, "{said}");
        assert!(said.contains("lock_manager = \"vmlock\""), "{said}");
    }
    let conf = std::fs::read_to_string(etc.join("qemu-vmlock.conf")).unwrap();
    assert!(conf.contains("vmlock_binary = \""), "{conf}");
    assert_eq!(
        std::fs::read(plugins.join("vmlock.so")).unwrap(),
        std::fs::read(&built).unwrap()
    );
    // A configuration the user changed stays; the plugin goes.
    std::fs::write(
        etc.join("qemu-vmlock.conf"),
        conf.replace("auto_disk_leases = 1", "auto_disk_leases = 0"),
    )
    .unwrap();
    let (ok, said) = run(&["uninstall"]);
    assert!(ok, "{said}");
    assert!(!plugins.join("vmlock.so").exists());
    assert!(etc.join("qemu-vmlock.conf").exists(), "{said}");
    // A file of that name that is not ours is neither replaced nor removed.
    std::fs::write(plugins.join("vmlock.so"), b"someone else's").unwrap();
    let (ok, said) = run(&["install"]);
    assert!(!ok && said.contains("not vmlock's plugin"), "{said}");
    let (ok, said) = run(&["uninstall"]);
    assert!(ok, "{said}");
    assert_eq!(
        std::fs::read(plugins.join("vmlock.so")).unwrap(),
        b"someone else's"
    );
    // An untouched configuration is removed.
    std::fs::remove_file(etc.join("qemu-vmlock.conf")).unwrap();
    std::fs::remove_file(plugins.join("vmlock.so")).unwrap();
    assert!(run(&["install"]).0);
    assert!(run(&["uninstall"]).0);
    assert!(!etc.join("qemu-vmlock.conf").exists());
}

/// The holder of the domain whose QEMU is `qemu_pid`: QEMU's child running `vmlock`.
fn holder_process(qemu_pid: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = vmlock::process::stat(pid)?;
        (stat.ppid == qemu_pid && vmlock::process::command(pid).contains("vmlock")).then_some(pid)
    })
}

/// Domain `name` started on a fresh disk: the disk, QEMU's pid and its holder's pid.
fn running_domain(host: &Host, libvirtd: &LibvirtDaemon, name: &str) -> (PathBuf, u32, u32) {
    let disk = host.qcow2("a");
    define(libvirtd, name, &[&disk]);
    libvirtd.virsh_ok(&["start", name]);
    let qemu_pid = libvirtd.qemu_pid(name).unwrap();
    let holder = holder_process(qemu_pid).expect("no holder process under QEMU");
    (disk, qemu_pid, holder)
}

#[test]
fn a_killed_holder_takes_its_guest_with_it_so_no_guest_runs_unprotected() {
    if skip() {
        return;
    }
    let host = Host::new();
    let libvirtd = host.libvirtd();
    let (a, qemu_pid, holder) = running_domain(&host, &libvirtd, "fragile");
    let watch = FreeWatch::while_running(&a, qemu_pid);
    vmlock_testkit::process::kill_and_wait(holder);
    // Bounded poll: the daemon sees the holder gone and its guest still running, kills the
    // guest, and only then unlocks.
    wait_until(
        "the guest is killed",
        SETTLE,
        Duration::from_millis(10),
        || !vmlock::process::is_running(qemu_pid),
    );
    wait_freed(&host, &a, "the disk is freed");
    let (probes, free) = watch.finish();
    assert_eq!(
        free, 0,
        "the guest ran without its lock in {free} of {probes} probes"
    );
    wait_until(
        "libvirt sees the domain stop",
        SETTLE,
        Duration::from_millis(20),
        || libvirtd.domstate("fragile") == "shut off",
    );
}

#[test]
fn qemu_keeps_its_own_locks_when_its_holder_and_vmlockd_both_die() {
    if skip() {
        return;
    }
    let host = Host::new();
    let libvirtd = host.libvirtd();
    let (a, qemu_pid, holder) = running_domain(&host, &libvirtd, "sturdy");
    let watch = FreeWatch::while_running(&a, qemu_pid);

    // Both keepers outside QEMU die: vmlockd first (so nobody is left to kill the guest), then
    // the holder. QEMU inherited copies of its lock descriptions, so its lock stays.
    vmlock_testkit::process::kill_and_wait(vmlockd_kit::pid_in(&host.run_dir()).unwrap());
    vmlock_testkit::process::kill_and_wait(holder);
    assert!(vmlock::process::is_running(qemu_pid));
    // A new daemon recovers the domain from its state and refuses a third party at once.
    assert_refused(&host, &a, "sturdy");
    assert_eq!(libvirtd.domstate("sturdy"), "running");

    libvirtd.virsh_ok(&["destroy", "sturdy"]);
    let (probes, free) = watch.finish();
    assert_eq!(
        free, 0,
        "QEMU ran without its lock in {free} of {probes} probes"
    );
    wait_freed(&host, &a, "the disk is freed");
}

/// With `[etcd]` in vmlockd.toml, a libvirt domain's disk also holds its cluster key (named
/// after the domain), the domain's holder watches the fencing deadline, and destroy frees the
/// key with no plugin call.
#[test]
fn a_libvirt_domain_holds_a_cluster_key_when_vmlockd_uses_etcd() {
    if skip() {
        return;
    }
    let cluster = vmlock_testkit::etcd::EtcdCluster::single();
    let endpoints: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| format!("{e:?}"))
        .collect();
    let host = Host::with_daemon_config(Some(&format!(
        "host_name = \"host-a\"\n[etcd]\nendpoints = [{}]\n",
        endpoints.join(", ")
    )));
    let libvirtd = host.libvirtd();
    let disk = std::fs::canonicalize(host.qcow2("c")).unwrap();
    define(&libvirtd, "clustered", &[&disk]);
    libvirtd.virsh_ok(&["start", "clustered"]);
    assert_eq!(host.holder_of(&disk).as_deref(), Some("clustered"));

    let etcd = vmlock_etcd::Etcd::connect(&vmlock_etcd::Config::new(cluster.endpoints(), "check"))
        .unwrap();
    let keys = |disk: &Path| etcd.holders(&disk.to_string_lossy()).unwrap();
    let held = keys(&disk);
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(
        (held[0].owner.vm_name.as_str(), held[0].owner.host.as_str()),
        ("clustered", "host-a")
    );
    assert!(
        vmlock_client::fence::read(&host.run_dir()).is_some(),
        "no fencing deadline for the domain's holder"
    );

    libvirtd.virsh_ok(&["destroy", "clustered"]);
    wait_freed(&host, &disk, "the disk is freed");
    // Bounded poll: the daemon's release thread deletes the key after the grant ended.
    wait_until(
        "the cluster key is deleted",
        SETTLE,
        Duration::from_millis(10),
        || keys(&disk).is_empty(),
    );
}

/// The guest of [`a_holder_takes_over_after_its_guests_exec_and_leaves_when_it_exits_first`]:
/// this test binary, run again by that test, as libvirt's pre-exec child. It takes the domain's
/// leases and starts the holder with the plugin's own code, says `HELD`, then, on a line from its
/// standard input, execs `sleep` (as libvirt's child execs QEMU) or exits (as when libvirt gives
/// a start up after the lock step).
#[test]
#[ignore = "a guest process run by the test of the holder's takeover"]
fn pre_exec_guest() {
    use std::io::Write;
    use std::os::fd::{AsRawFd, IntoRawFd};
    use vmlock_libvirt::spawn::{take_and_hand_down, TakeOutcome, TakeRequest};
    let (Ok(run_dir), Ok(Ok(disks)), Ok(uuid)) = (
        std::env::var("VMLOCK_TEST_GUEST_RUN_DIR"),
        std::env::var("VMLOCK_TEST_GUEST_DISKS").map(std::fs::read_to_string),
        std::env::var("VMLOCK_TEST_GUEST_UUID"),
    ) else {
        panic!("run by the takeover test only");
    };
    let config = vmlock_libvirt::config::Config {
        runtime_dir: PathBuf::from(&run_dir),
        vmlock_binary: PathBuf::from(env!("CARGO_BIN_EXE_vmlock")),
        ..Default::default()
    };
    let domain = vmlock_libvirt::domain::Domain {
        uuid: uuid.clone(),
        name: "pre-exec".into(),
        id: 1,
        pid: std::process::id(),
        uri: None,
        resources: disks
            .lines()
            .map(|disk| vmlock::Resource::Disk {
                path: PathBuf::from(disk),
                mode: vmlock::DiskMode::Exclusive,
            })
            .collect(),
    };
    let action = vmlock::LockFailureAction::Poweroff;
    let (vm, flags) = domain.registration(action);
    let outcome = take_and_hand_down(&TakeRequest {
        runtime: &RuntimeDir::resolve(Some(Path::new(&run_dir))).unwrap(),
        vm,
        resources: domain.resources.clone(),
        flags,
        holder_args: &domain.takeover_args(&config, action),
        control: &vmlock_client::control::socket_path(Path::new(&run_dir), &uuid),
    });
    let TakeOutcome::Held(descriptions) = outcome else {
        panic!("the lock step did not hold: {outcome:?}");
    };
    println!("HELD");
    std::io::stdout().flush().unwrap();
    let mut order = String::new();
    std::io::stdin().read_line(&mut order).unwrap();
    if order.trim() == "exec" {
        // As the plugin does for QEMU: the descriptions stay open across the exec.
        for fd in descriptions {
            nix::fcntl::fcntl(
                fd.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )
            .unwrap();
            let _ = fd.into_raw_fd();
        }
        let sleep = std::ffi::CString::new("/bin/sleep").unwrap();
        let hour = std::ffi::CString::new("3600").unwrap();
        let e = nix::unistd::execv(&sleep, &[sleep.as_c_str(), hour.as_c_str()]).unwrap_err();
        panic!("exec sleep: {e}");
    }
    std::process::exit(0);
}

/// The children of process `parent`, from `/proc` (read only).
fn children_of(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| vmlock::process::stat(*pid).is_some_and(|s| s.ppid == parent))
        .collect()
}

#[test]
fn a_holder_takes_over_after_its_guests_exec_and_leaves_when_it_exits_first() {
    use std::io::{Read, Write};
    use std::process::Stdio;
    use vmlock_sys::pidfd::ProcessHandle;
    let host = Host::new();
    // The last: more disks than one message of descriptions carries, with paths of 800 bytes,
    // a hand-down (about 240 KiB) larger than a socket pair holds until the holder's exec.
    let deep = (0..4).fold(host.dir.path().to_path_buf(), |p, i| {
        p.join(format!("{i}{}", "d".repeat(199)))
    });
    std::fs::create_dir_all(&deep).unwrap();
    for (order, count) in [("exec", 1), ("exit", 1), ("exec", 260)] {
        let dir = if count > 1 { &deep } else { host.dir.path() };
        let disks: Vec<PathBuf> = (0..count)
            .map(|i| dir.join(format!("{order}-{count}-{i}.img")))
            .collect();
        for disk in &disks {
            std::fs::write(disk, vec![0u8; 4096]).unwrap();
        }
        let disk = &disks[0];
        // Listed in a file: 260 long paths exceed what one environment variable may hold.
        let listed: Vec<String> = disks.iter().map(|d| d.display().to_string()).collect();
        let list = host.dir.path().join(format!("{order}-{count}.disks"));
        std::fs::write(&list, listed.join("\n")).unwrap();
        let uuid = uuid::Uuid::new_v4().to_string();
        let mut guest = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "pre_exec_guest", "--nocapture"])
            .args(["--test-threads", "1"])
            .env("VMLOCK_TEST_GUEST_RUN_DIR", host.run_dir())
            .env("VMLOCK_TEST_GUEST_DISKS", &list)
            .env("VMLOCK_TEST_GUEST_UUID", &uuid)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = guest.stdout.take().unwrap();
        loop {
            match vmlock_testkit::process::read_line(&mut out, SETTLE).unwrap() {
                // After the harness's "test pre_exec_guest ... ", on the same line.
                Some(line) if line.ends_with("HELD") => break,
                Some(_) => {}
                None => panic!("the guest ended before it held ({order})"),
            }
        }
        // The holder is the guest's child; a pidfd on it outlives the guest's exit.
        let holders = children_of(guest.id());
        assert_eq!(holders.len(), 1, "the guest's children: {holders:?}");
        let holder = ProcessHandle::open(holders[0], None).unwrap();
        // Until the guest's exec the guest keeps its leases itself: the holder has not taken
        // over (it waits for the exec, which the guest waits for us to order).
        assert_eq!(status_holder_pid(&host, disk), Some(u64::from(guest.id())));
        let mut stdin = guest.stdin.take().unwrap();
        writeln!(stdin, "{order}").unwrap();
        if order == "exec" {
            wait_until(
                "the holder's takeover",
                SETTLE,
                Duration::from_millis(5),
                || {
                    // Taken over, and serving the domain's control socket (it does once it
                    // watches its guest).
                    status_holder_pid(&host, disk) == Some(u64::from(holder.pid))
                        && matches!(
                            vmlock_client::control::call(
                                &host.run_dir(),
                                &uuid,
                                &vmlock_client::control::ControlRequest::GuestPid
                            ),
                            Ok(vmlock_client::control::ControlReply::Pid(Some(p)))
                                if p == guest.id()
                        )
                },
            );
            let held = host.held();
            assert_eq!(
                held.iter().filter(|(_, vm)| vm == "pre-exec").count(),
                count,
                "{held:?}"
            );
            vmlock_testkit::process::kill_child(&mut guest);
        } else {
            assert!(
                vmlock_testkit::process::wait_child(&mut guest, SETTLE).is_some(),
                "the guest did not exit"
            );
        }
        // Either way the guest's exit frees the disk and ends the holder.
        wait_until(
            "the disk to be free",
            SETTLE,
            Duration::from_millis(5),
            || host.holder_of(disk).is_none(),
        );
        assert!(
            holder.wait_exit(Some(SETTLE)),
            "the holder outlived its guest ({order})"
        );
        let mut said = String::new();
        guest
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut said)
            .unwrap();
        if order == "exit" {
            assert!(
                said.contains("exited before QEMU started; nothing to hold"),
                "{said}"
            );
        } else {
            assert!(
                !said.contains("could not take over") && !said.contains("nothing to hold"),
                "{said}"
            );
        }
    }
}
