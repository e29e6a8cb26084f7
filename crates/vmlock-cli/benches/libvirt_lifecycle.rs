//! What a libvirt user feels: `virsh start` until the domain runs, `virsh destroy` until its disk
//! is free, with libvirt's `nop` lock manager, stock `lockd` (virtlockd) and `vmlock`, side by
//! side in one run.
//!
//! `cargo bench -p vmlock-cli --bench libvirt_lifecycle [-- RUNS] [lock-step]` (or
//! `VMLOCK_BENCH_RUNS=RUNS`; default 20; `lock-step`: only the second table) — as root, with libvirtd, virsh, virtlockd and QEMU installed
//! (scripts/install-test-deps.sh); it skips, saying why, when they are missing.
//!
//! Each manager gets its own private libvirtd (`vmlock_testkit::libvirt::LibvirtDaemon`), one
//! domain (64 MiB, TCG, one qcow2 disk on virtio-blk) and its own disk. The rounds interleave
//! the managers (the order rotates each round), so drift in the machine's load spreads over all
//! three. One unmeasured warm-up start and destroy per manager comes first.
//!
//! - **start**: `virsh start` spawned until it exits (it returns once the domain runs; checked).
//! - **destroy returns**: `virsh destroy` spawned until it exits.
//! - **destroy → disk free**: from the same spawn until a new open file description of the image
//!   can take an OFD write lock on bytes 0–299. One definition for the three managers: byte 0 is
//!   where vmlockd (an OFD lock) and virtlockd (a POSIX lock on the whole file) lock a disk, and
//!   bytes 100–299 are QEMU's own image locks (the only lock under `nop`). The first round checks
//!   that a running domain's disk is locked where it should be.
//! - **QEMU's exit → disk free**: from QEMU's exit (seen on its pidfd) until the disk is free:
//!   the lock manager's own share of destroy (libvirt's own teardown runs on after it).
//!
//! A second table times vmlock's lock step in libvirt's pre-exec child alone, without libvirt:
//! a forked child runs the plugin's own code as that child does and times it from the inside,
//! both ways: taking the leases itself and handing them down to the holder it starts (the
//! default), and starting the holder and waiting for its report (the fallback, for a migration
//! destination or when no vmlockd answers).

#![allow(clippy::unwrap_used, clippy::print_stdout)] // a benchmark program: failures abort it

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmlock_client::runtime::{spawn_daemon, RuntimeDir};
use vmlock_sys::ofd::{self, LockKind};
use vmlock_sys::pidfd::ProcessHandle;
use vmlock_testkit::libvirt::{self, domain_xml, LibvirtBuilder, LibvirtDaemon};
use vmlock_testkit::process::read_line;
use vmlock_testkit::qemu;
use vmlock_testkit::vmlockd as vmlockd_kit;

const DEFAULT_RUNS: usize = 20;
/// How long a disk may take to be free after `virsh destroy` returned.
const FREE_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause between two probes of the disk (bounded by [`FREE_TIMEOUT`]): the managers free it
/// asynchronously, with no event a client outside them could wait on.
const PROBE_PAUSE: Duration = Duration::from_micros(500);
const DOMAIN: &str = "bench";

/// `RUNS` from the first numeric argument (cargo adds `--bench`), else `VMLOCK_BENCH_RUNS`.
fn runs() -> usize {
    std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .or_else(|| std::env::var("VMLOCK_BENCH_RUNS").ok()?.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_RUNS)
}

/// Whether a new description of `disk` can take an OFD write lock on `[start, start+len)`
/// (taken and dropped at once).
fn lockable(disk: &Path, start: u64, len: u64) -> bool {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .unwrap();
    let ok = ofd::try_lock(f.as_fd(), LockKind::Exclusive, start, len).unwrap();
    if ok {
        ofd::unlock(f.as_fd(), start, len).unwrap();
    }
    ok
}

/// The disk-free definition of every column: bytes 0–299 (manager's byte 0, QEMU's 100–299).
fn disk_free(disk: &Path) -> bool {
    lockable(disk, 0, 300)
}

/// Polls [`disk_free`]; the instant it first held.
fn wait_free(disk: &Path) -> Instant {
    let deadline = Instant::now() + FREE_TIMEOUT;
    loop {
        if disk_free(disk) {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{} not free {FREE_TIMEOUT:?} after destroy",
            disk.display()
        );
        // Bounded poll (FREE_TIMEOUT): the kernel announces no lock release.
        std::thread::sleep(PROBE_PAUSE);
    }
}

/// A private vmlockd (started by the CLI in a private runtime directory, killed at the end) and
/// the plugin where libvirtd loads it, as crates/vmlock-cli/tests/libvirt.rs sets it up.
struct VmlockHost {
    dir: tempfile::TempDir,
}

impl VmlockHost {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let host = VmlockHost { dir };
        // `vmlock daemon`, this build's daemon, named explicitly: `vmlock status` would prefer
        // a `vmlockd` beside the binary, which in a shared target directory may be older.
        let runtime = RuntimeDir::resolve(Some(&host.run_dir())).unwrap();
        let vmlock = Path::new(env!("CARGO_BIN_EXE_vmlock"));
        spawn_daemon(&runtime, vmlock, &["daemon".into()], None).unwrap();
        host
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn libvirtd(&self) -> LibvirtDaemon {
        debug_log(
            libvirt::vmlock_builder(
                self.dir.path(),
                &self.run_dir(),
                Path::new(env!("CARGO_BIN_EXE_vmlock")),
            ),
            "vmlock",
        )
        .start()
    }
}

impl Drop for VmlockHost {
    fn drop(&mut self) {
        vmlockd_kit::kill_in(&self.run_dir());
    }
}

/// With `VMLOCK_BENCH_LIBVIRT_LOG=DIR`, libvirtd writes a debug log of its process start-up, lock
/// manager and command code to `DIR/libvirtd-NAME.log` (timestamps in ms: where a start's time
/// goes). Logging slows libvirtd: not for the numbers.
fn debug_log(builder: LibvirtBuilder, name: &str) -> LibvirtBuilder {
    match std::env::var_os("VMLOCK_BENCH_LIBVIRT_LOG") {
        Some(dir) => builder
            .env("LIBVIRT_LOG_FILTERS", "1:qemu.qemu_process 1:locking 3:*")
            .env(
                "LIBVIRT_LOG_OUTPUTS",
                format!("1:file:{}/libvirtd-{name}.log", Path::new(&dir).display()),
            ),
        None => builder,
    }
}

/// Milliseconds of the day of a libvirt log line (`2026-11-30 18:10:17.424+0000: TID: ...`) and
/// its thread id and text.
fn log_line(line: &str) -> Option<(f64, &str, &str)> {
    let (h, m, s) = (line.get(11..13)?, line.get(14..16)?, line.get(17..23)?);
    let t = (h.parse::<f64>().ok()? * 60.0 + m.parse::<f64>().ok()?) * 60_000.0
        + s.parse::<f64>().ok()? * 1000.0;
    let rest = line.get(30..)?;
    let (tid, text) = rest.split_once(": ")?;
    Some((t, tid, text))
}

/// From the debug logs of [`debug_log`]: per manager, the medians of libvirt's pre-exec child's
/// hook (`qemuProcessHook`, which libvirtd waits for before it lets QEMU exec) and of the lock
/// manager's acquire in it (for vmlock: the holder's fork, exec, acquire and report), of
/// libvirtd's own wait for that child's handshake, and of the acquire at CPU start (`Resume`).
fn log_breakdown(dir: &Path, managers: &[Manager]) {
    println!();
    println!("From libvirtd's debug logs (ms, p50 / mean; the log's clock has 1 ms resolution, so a p50 is a whole ms, while the mean of many such differences estimates the true mean to a fraction of one; logging slows libvirtd):");
    println!();
    println!("| manager | pre-exec hook | its lock acquire | libvirtd waits for the handshake | acquire at CPU start | n |");
    println!("|---|---|---|---|---|---|");
    for m in managers {
        let Ok(text) = std::fs::read_to_string(dir.join(format!("libvirtd-{}.log", m.name))) else {
            continue;
        };
        let (mut hook, mut acquire, mut wait, mut resume) = (vec![], vec![], vec![], vec![]);
        let mut open: std::collections::HashMap<String, f64> = std::collections::HashMap::new();
        for line in text.lines() {
            let Some((t, tid, text)) = log_line(line) else {
                continue;
            };
            let key = |what: &str| format!("{what}/{tid}");
            if text.contains("qemuProcessHook") && text.contains("Obtaining domain lock") {
                open.insert(key("hook"), t);
            } else if text.contains("qemuProcessHook") && text.contains("Hook complete") {
                hook.extend(open.remove(&key("hook")).map(|s| t - s));
            } else if text.contains("Waiting for handshake from child") {
                open.insert(key("wait"), t);
            } else if text.contains("Building domain mount namespace") {
                wait.extend(open.remove(&key("wait")).map(|s| t - s));
            } else if text.contains("virLockManagerAcquire") && text.contains("flags=0x0") {
                open.insert(key("resume"), t);
            } else if text.contains("virLockManagerAcquire") && text.contains("flags=0x3") {
                open.insert(key("acquire"), t);
            } else if text.contains("virLockManagerFree") {
                resume.extend(open.remove(&key("resume")).map(|s| t - s));
                acquire.extend(open.remove(&key("acquire")).map(|s| t - s));
            }
        }
        if hook.is_empty() {
            continue;
        }
        let both = |v: &[f64]| format!("{:.0} / {:.2}", pct(v, 50.0), mean(v));
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            m.name,
            both(&hook),
            both(&acquire),
            both(&wait),
            both(&resume),
            hook.len()
        );
    }
}

/// One lock manager's libvirtd, domain and disk, and its samples (ms).
struct Manager {
    name: &'static str,
    libvirtd: LibvirtDaemon,
    disk: PathBuf,
    start: Vec<f64>,
    destroy: Vec<f64>,
    free: Vec<f64>,
    after_exit: Vec<f64>,
}

impl Manager {
    fn new(name: &'static str, libvirtd: LibvirtDaemon) -> Self {
        let disk = qemu::qcow2(libvirtd.dir(), "disk.qcow2");
        let uuid = uuid::Uuid::new_v4().to_string();
        libvirtd.define(&domain_xml(DOMAIN, Some(&uuid), &[&disk]));
        Manager {
            name,
            libvirtd,
            disk,
            start: Vec::new(),
            destroy: Vec::new(),
            free: Vec::new(),
            after_exit: Vec::new(),
        }
    }

    /// One start and destroy; `check`: the running domain's disk is locked where it should be.
    fn cycle(&mut self, record: bool, check: bool) {
        let t = Instant::now();
        self.libvirtd.virsh_ok(&["start", DOMAIN]);
        let start = t.elapsed();
        if check {
            assert_eq!(self.libvirtd.domstate(DOMAIN), "running");
            assert!(
                !lockable(&self.disk, 100, 200),
                "{}: QEMU holds no image lock",
                self.name
            );
            assert_eq!(
                lockable(&self.disk, 0, 1),
                self.name == "nop",
                "{}: byte 0 of a running domain's disk",
                self.name
            );
        }
        let qemu = self.libvirtd.qemu_pid(DOMAIN).expect("QEMU's pid");
        let qemu = ProcessHandle::open(qemu, None).unwrap();
        // virsh on a thread; here: QEMU's exit (its pidfd), then the disk's release.
        let libvirtd = &self.libvirtd;
        let t = Instant::now();
        let (destroy, exited, freed) = std::thread::scope(|s| {
            let virsh = s.spawn(move || {
                libvirtd.virsh_ok(&["destroy", DOMAIN]);
                t.elapsed()
            });
            assert!(qemu.wait_exit(Some(FREE_TIMEOUT)), "QEMU still runs");
            let exited = Instant::now();
            let freed = wait_free(&self.disk);
            (virsh.join().unwrap(), exited, freed)
        });
        let free = freed - t;
        let after_exit = freed - exited;
        if record {
            self.start.push(ms(start));
            self.destroy.push(ms(destroy));
            self.free.push(ms(free));
            self.after_exit.push(ms(after_exit));
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile `p` (0–100) of `v`.
fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// `p50 | p99 | mean | min | max | n` of `v`, for a table row.
fn stats(v: &[f64]) -> String {
    format!(
        "{:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {}",
        pct(v, 50.0),
        pct(v, 99.0),
        mean(v),
        pct(v, 0.0),
        pct(v, 100.0),
        v.len()
    )
}

fn row(step: &str, who: &str, v: &[f64]) {
    println!("| {step} | {who} | {} |", stats(v));
}

/// How the pre-exec child takes the leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LockStep {
    /// Itself, then hands them down to the holder it starts without waiting (the default).
    TakeAndHandDown,
    /// The holder's own start: fork + exec, connect, acquire, report (the fallback).
    HolderStart,
}

/// One pre-exec lock step as libvirt's child runs it, timed inside that child: a forked child
/// of this (single-threaded) bench becomes the domain's guest-to-be, runs the plugin's own code
/// for `step` on `disk`, writes its time in microseconds to a pipe, then execs a program that
/// waits to be killed, as QEMU would run. The disk must be locked while it waits, and free once it is killed.
fn lock_step_in_child(host: &VmlockHost, disk: &Path, step: LockStep) -> f64 {
    use vmlock_libvirt::spawn::{self, TakeOutcome, TakeRequest};
    let config = vmlock_libvirt::config::Config {
        runtime_dir: host.run_dir(),
        vmlock_binary: PathBuf::from(env!("CARGO_BIN_EXE_vmlock")),
        ..Default::default()
    };
    let runtime = RuntimeDir::resolve(Some(&host.run_dir())).unwrap();
    let mut domain = vmlock_libvirt::domain::Domain {
        uuid: uuid::Uuid::new_v4().to_string(),
        name: "bench-alone".into(),
        id: 1,
        pid: 0,
        uri: None,
        resources: vec![vmlock::Resource::Disk {
            path: disk.to_path_buf(),
            mode: vmlock::DiskMode::Exclusive,
        }],
    };
    let control = vmlock_client::control::socket_path(&host.run_dir(), &domain.uuid);
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    // SAFETY: the bench is single-threaded here (every libvirtd and thread of the first table
    // is gone); the child runs the plugin's pre-exec code, as libvirt's forked child does.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            drop(read_end);
            domain.pid = std::process::id();
            let action = vmlock::LockFailureAction::Poweroff;
            let t = Instant::now();
            let kept = match step {
                LockStep::TakeAndHandDown => {
                    let (vm, flags) = domain.registration(action);
                    let args = domain.takeover_args(&config, action);
                    match spawn::take_and_hand_down(&TakeRequest {
                        runtime: &runtime,
                        vm,
                        resources: domain.resources.clone(),
                        flags,
                        holder_args: &args,
                        control: &control,
                    }) {
                        TakeOutcome::Held(fds) => Some(fds),
                        _ => None,
                    }
                }
                LockStep::HolderStart => {
                    spawn::start_holder(&domain.holder_args(&config, action), spawn::READY_TIMEOUT)
                        .ok()
                }
            };
            let line = format!("{} {}\n", kept.is_some(), t.elapsed().as_micros());
            let _ = nix::unistd::write(&write_end, line.as_bytes());
            // Then QEMU's exec, as libvirt's child makes it: the lock descriptions kept across it
            // (as the plugin keeps them), everything else of the child's closed by it (the
            // holder takes over once the hand-down socket closes).
            for fd in kept.into_iter().flatten() {
                let _ = nix::fcntl::fcntl(
                    fd.as_raw_fd(),
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                );
                let _ = fd.into_raw_fd();
            }
            let sleep = std::ffi::CString::new("/bin/sleep").unwrap();
            let hour = std::ffi::CString::new("3600").unwrap();
            let _ = nix::unistd::execv(&sleep, &[sleep.as_c_str(), hour.as_c_str()]);
            // SAFETY: the forked child ends here without running the bench's destructors.
            unsafe { nix::libc::_exit(127) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(write_end);
            let mut out = std::fs::File::from(read_end);
            let line = read_line(&mut out, Duration::from_secs(60))
                .unwrap()
                .unwrap_or_default();
            let mut fields = line.split_whitespace();
            let ok = fields.next() == Some("true");
            let micros: f64 = fields
                .next()
                .and_then(|f| f.parse().ok())
                .unwrap_or(f64::NAN);
            let locked = !lockable(disk, 0, 1);
            if ok && step == LockStep::TakeAndHandDown {
                // Not timed: the holder takes over from the guest (as from QEMU) before the
                // guest goes, so every run also checks the takeover.
                wait_taken_over(&runtime, &domain.uuid, child.as_raw() as u32);
            }
            let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(child, None);
            assert!(ok, "{step:?} failed in the child: {line:?}");
            assert!(locked, "{step:?} reported success without the lock");
            // The guest's exit frees the disk (vmlockd watches its pidfd).
            wait_free(disk);
            micros / 1000.0
        }
    }
}

/// Waits (bounded) until vmlockd names a holder other than `guest` for VM `uuid`, and that
/// holder answers on the domain's control socket.
fn wait_taken_over(runtime: &RuntimeDir, uuid: &str, guest: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut conn = vmlock_client::Connection::connect(runtime).unwrap();
        let holder = match conn
            .call(&vmlock_client::proto::Request::Status, &[])
            .unwrap()
        {
            vmlock_client::proto::Reply::Status(owners) => owners
                .into_iter()
                .find(|o| o.vm.uuid == uuid)
                .and_then(|o| o.holder_pid),
            other => panic!("status: {other:?}"),
        };
        // Taken over, and serving its control socket (which it does once it watches the
        // guest): killing the guest before that would cut the holder's start short.
        let serves = || {
            matches!(
                vmlock_client::control::call(
                    runtime.path(),
                    uuid,
                    &vmlock_client::control::ControlRequest::GuestPid
                ),
                Ok(vmlock_client::control::ControlReply::Pid(Some(p))) if p == guest
            )
        };
        if holder.is_some_and(|h| h != guest) && serves() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the holder did not take VM {uuid} over from its guest {guest}"
        );
        // A bounded poll: vmlockd has no event for a takeover that a client could wait on.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The pre-exec lock step alone, `runs` times each way (after one warm-up), interleaved.
fn lock_step_alone(host: &VmlockHost, runs: usize) {
    let disk = qemu::qcow2(host.dir.path(), "alone.qcow2");
    let (mut fast, mut slow) = (vec![], vec![]);
    for run in 0..=runs {
        let t_fast = lock_step_in_child(host, &disk, LockStep::TakeAndHandDown);
        let t_slow = lock_step_in_child(host, &disk, LockStep::HolderStart);
        if run > 0 {
            fast.push(t_fast);
            slow.push(t_slow);
        }
    }
    println!();
    println!("vmlock's lock step in the pre-exec child alone ({runs} runs each after one warm-up; ms; timed inside the child, from the plugin's call until it returns):");
    println!();
    println!("| lock step | p50 | p99 | mean | min | max | n |");
    println!("|---|---|---|---|---|---|---|");
    row_of(
        "take the leases, start the holder, hand them down (default)",
        &fast,
    );
    row_of("start the holder and wait for its report (fallback)", &slow);
}

fn row_of(what: &str, v: &[f64]) {
    println!("| {what} | {} |", stats(v));
}

fn main() {
    if !libvirt::available() || !qemu::available() {
        println!(
            "skipped: libvirtd, virsh or QEMU is not installed (scripts/install-test-deps.sh)"
        );
        return;
    }
    if !Path::new(libvirt::STOCK_PLUGIN_DIR)
        .join("lockd.so")
        .is_file()
    {
        println!(
            "skipped: libvirt's stock lockd plugin is not installed (scripts/install-test-deps.sh)"
        );
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        println!("skipped: the private libvirtd needs root (a mount namespace, QEMU as root)");
        return;
    }
    let runs = runs();
    let started = Instant::now();
    let host = VmlockHost::new();
    if std::env::args().any(|a| a == "lock-step") {
        // Only the second table: seconds instead of minutes.
        lock_step_alone(&host, runs);
        return;
    }
    let mut managers = vec![
        Manager::new("nop", debug_log(LibvirtDaemon::builder(), "nop").start()),
        Manager::new(
            "lockd",
            debug_log(
                LibvirtDaemon::builder()
                    .lock_manager("lockd")
                    .virtlockd(true),
                "lockd",
            )
            .start(),
        ),
        Manager::new("vmlock", host.libvirtd()),
    ];
    for m in &mut managers {
        m.cycle(false, true);
    }
    for round in 0..runs {
        let n = managers.len();
        for k in 0..n {
            managers[(round + k) % n].cycle(true, false);
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "libvirt lifecycle: {runs} rounds (managers interleaved, one warm-up each), ms; {} s; load average {}",
        started.elapsed().as_secs(),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!("disk free = an OFD write lock on bytes 0-299 of the image succeeds (byte 0: vmlockd's OFD / virtlockd's POSIX lock; 100-299: QEMU's own)");
    println!();
    println!("| step | manager | p50 | p99 | mean | min | max | n |");
    println!("|---|---|---|---|---|---|---|---|");
    for (step, pick) in [
        ("`virsh start` → running", 0),
        ("`virsh destroy` returns", 1),
        ("`virsh destroy` → disk free", 2),
        ("QEMU's exit → disk free", 3),
    ] {
        for m in &managers {
            let v = [&m.start, &m.destroy, &m.free, &m.after_exit][pick];
            row(step, m.name, v);
        }
    }
    let by = |name: &str| managers.iter().find(|m| m.name == name).unwrap();
    let nop = by("nop");
    for other in ["vmlock", "lockd"] {
        let o = by(other);
        // Paired by round: both ran in the same round, minutes apart at most.
        let diff: Vec<f64> = o.start.iter().zip(&nop.start).map(|(a, b)| a - b).collect();
        println!(
            "| start, {other} − nop | per-round difference | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            pct(&diff, 50.0),
            pct(&diff, 99.0),
            mean(&diff),
            pct(&diff, 0.0),
            pct(&diff, 100.0),
            diff.len()
        );
    }
    println!(
        "start: vmlock − nop p50 {:+.1} ms, mean {:+.1} ms; vmlock − lockd p50 {:+.1} ms, mean {:+.1} ms",
        pct(&by("vmlock").start, 50.0) - pct(&nop.start, 50.0),
        mean(&by("vmlock").start) - mean(&nop.start),
        pct(&by("vmlock").start, 50.0) - pct(&by("lockd").start, 50.0),
        mean(&by("vmlock").start) - mean(&by("lockd").start),
    );
    if let Some(dir) = std::env::var_os("VMLOCK_BENCH_LIBVIRT_LOG") {
        log_breakdown(Path::new(&dir), &managers);
    }
    drop(managers);
    lock_step_alone(&host, runs);
}
