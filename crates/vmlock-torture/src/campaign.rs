//! The campaign: seeded operations and faults against real guests under the real `vmlock run`,
//! and the checks after things settle.
//!
//! Every choice (which operation, which VM, which disks, which fault variant, how long a pause)
//! comes from the seeded [`Rng`]; what the system answers (a refusal, a timing) can differ between
//! two runs of one seed, and the state the next choice is made from with it.
//!
//! The guests' life (start, stop, hotplug, unplug, kills of supervisors and guests, the guests'
//! findings) is the same for every driver; what is driver-specific lives apart: here the `lockd`
//! campaign (vmlockd's faults, its probes, the kernel's OFD locks as the holdings), in [`sanlock`]
//! the `sanlock` one (two sanlock daemons as two hosts, their faults, sanlock's own lease lists as
//! the holdings).

mod sanlock;

use crate::guest::{ack_path, ctl_path, log_path, write_atomic};
use crate::locks::{locked_by_process, locked_files, path_locked, FileId};
use crate::rng::Rng;
use anyhow::Context as _;
use rustix::process::Signal;
use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmlock::{DiskMode, Resource};
use vmlock_client::proto::{AcquireFlags, Reply, Request, VmIdentity};
use vmlock_client::{Connection, HoldConnection, RuntimeDir};
use vmlock_sys::pidfd::ProcessHandle;
use vmlock_testkit::fuse::HangFs;
use vmlock_testkit::process::{read_line, wait_child};

/// How long `vmlock run` may take to report its guest started (or to give up).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long any other `vmlock` command may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// After a finished migration, rounds of both guests (the destination writing, the source not)
/// before the source is ended.
const MIGRATION_OVERLAP_ROUNDS: u32 = 3;
/// How long a signalled process may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a SIGKILLed vmlockd may take to exit while storage hangs before the campaign resumes
/// the storage it may be waiting in.
const HUNG_EXIT_GRACE: Duration = Duration::from_secs(1);
/// How long a guest may take to apply a hotplug or unplug.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the daemon may take to serve again after it was killed.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long things may take to settle before the final checks.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Lost and leaked locks are also checked (after settling) every this many operations, so a leak
/// that a later daemon restart would hide is seen.
const CHECK_EVERY: u64 = 250;
/// Size of each disk file.
const DISK_SIZE: u64 = 64 * 1024;
/// A daemon probe slower than this while another client is stuck is a stall (issue 13).
pub const STALL: Duration = Duration::from_millis(100);
/// A hang of the storage lasts at least this long: more than one round of vmlockd's lease check
/// (once a second), so the daemon's own stat of a hung disk is stuck in it too.
const MIN_HANG: Duration = Duration::from_millis(1200);
/// One stop in three lasts at least this long: past vmlockd's 5 s wait for a holder's ack
/// (`vmlockd::holder::ACK_TIMEOUT`), so the daemon gives the hotplug pushed to the stopped
/// supervisor up while it is still stopped.
const LONG_STOP: Duration = Duration::from_millis(5500);
/// How long the foreign-holder probe waits for its refusal.
const FOREIGN_BOUND: Duration = Duration::from_secs(1);
/// How long a supervisor may take, once continued, to drop what a refused hotplug had pushed to
/// it while it was stopped.
const DROP_TIMEOUT: Duration = Duration::from_secs(5);

/// The driver a campaign runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Driver {
    /// `lockd` (vmlockd, OFD locks), optionally with cluster locks in etcd.
    #[default]
    Lockd,
    /// `sanlock`: two real sanlock daemons as two hosts sharing one lease directory.
    Sanlock,
}

/// What the campaign is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The driver under test.
    pub driver: Driver,
    /// The seed of every choice.
    pub seed: u64,
    /// How many operations (faults included).
    pub ops: u64,
    /// Stop earlier once this much time has passed.
    pub duration: Option<Duration>,
    /// The `vmlock` binary under test.
    pub vmlock: PathBuf,
    /// A program that runs the guest as `PROGRAM guest ARGS...` ([`crate::guest::main`]).
    pub guest_program: PathBuf,
    /// How many disks the VMs fight over.
    pub disks: usize,
    /// How many VMs (uuids) exist; at most this many guests run at once.
    pub vms: usize,
    /// Keep the working directory (disks, guests' findings) at the end.
    pub keep_dir: bool,
    /// Print each operation.
    pub verbose: bool,
    /// Run vmlockd with cluster locks in the etcd cluster at these endpoints (empty: local only).
    /// Every grant then also holds a key; after the campaign no key may be left.
    pub etcd_endpoints: Vec<String>,
    /// vmlockd (and every `vmlock` the campaign runs) inside this network namespace, reaching
    /// the etcd cluster through it (the endpoints must be the cluster's addresses as seen from
    /// it); [`Op::Partition`] cuts it now and then.
    pub etcd_net: Option<Arc<vmlock_testkit::netns::NetHost>>,
    /// Sabotage, to show the stall row can fail: while something is stuck, the campaign itself
    /// SIGSTOPs vmlockd for 150 ms during each status probe.
    pub sabotage_stall: bool,
    /// One idle-connections fault in four opens 2,000–3,000 at once (when none are held). On by
    /// default: it found the next client waiting 140–180 ms behind vmlockd's accept loop
    /// (docs/RELIABILITY.md, torture campaign, "Found"), fixed by vmlockd's lobby.
    pub idle_burst: bool,
    /// Also probe a refused acquire: the probe VM asks for a disk the campaign locked itself,
    /// outside vmlock, so the refusal names a foreign holder. On by default: it found naming
    /// such a holder stalled on hung storage (docs/RELIABILITY.md, torture campaign, "Found").
    pub probe_foreign_holder: bool,
}

impl Options {
    /// Defaults: 6 disks, 4 VMs.
    pub fn new(seed: u64, ops: u64, vmlock: PathBuf, guest_program: PathBuf) -> Self {
        Options {
            driver: Driver::Lockd,
            seed,
            ops,
            duration: None,
            vmlock,
            guest_program,
            disks: 6,
            vms: 4,
            keep_dir: false,
            verbose: false,
            etcd_endpoints: Vec::new(),
            etcd_net: None,
            sabotage_stall: false,
            idle_burst: true,
            probe_foreign_holder: true,
        }
    }
}

/// The kinds of operation, faults included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    /// `vmlock run` of a guest on 1–2 random disks (refusals expected).
    Start,
    /// SIGTERM to a supervisor (forwarded to its guest).
    Stop,
    /// `vmlock attach-disk`, then the guest plugs the disk in.
    Attach,
    /// The guest unplugs a disk, then `vmlock detach-disk`.
    Detach,
    /// Fault: SIGKILL vmlockd (the next CLI call starts a new one).
    KillDaemon,
    /// Fault: SIGSTOP vmlockd for 20–300 ms while a client asks it something, then SIGCONT.
    PauseDaemon,
    /// Fault: SIGKILL a supervisor (`vmlock run`).
    KillSupervisor,
    /// Fault: SIGKILL a guest.
    KillGuest,
    /// Fault: delete `state.json` (or every state file), then SIGKILL vmlockd.
    DeleteState,
    /// Fault: corrupt a state file (truncate, flip bytes, garbage, empty), then SIGKILL vmlockd.
    CorruptState,
    /// Fault: open 50–400 idle connections (with [`Options::idle_burst`], one time in four when
    /// none are held: 2,000–3,000 at once), kept for the next 1–10 operations.
    IdleConnections,
    /// Fault: a malformed frame (oversized length, bad JSON, wrong shape, cut short, noise).
    MalformedFrame,
    /// Fault: SIGKILL vmlockd 0–20 ms into a start or a hotplug.
    KillDaemonMidRequest,
    /// Fault: SIGKILL a supervisor 0–20 ms into a hotplug of its VM.
    KillSupervisorMidRequest,
    /// Fault: 1–3 frames (a hello, a status request, noise) each carrying 250 descriptors the
    /// daemon never asked for; after settling, none may be left open in vmlockd.
    DescriptorFlood,
    /// Fault: the runtime directory's file system (a 2 MiB tmpfs in the campaign's own mount
    /// namespace) filled to the last byte for the next 1–10 operations (becomes a start where
    /// no private mount namespace can be made).
    FillRuntimeFs,
    /// Fault: the storage of 1–2 of the disks (a FUSE mount, [`vmlock_testkit::fuse::HangFs`], in
    /// the campaign's own mount namespace) stops answering for the next 1–10 operations and at
    /// least [`MIN_HANG`]; guests holding those disks block in it and keep their locks. Skipped
    /// (a start instead, counted as skipped) where no FUSE mount can be made.
    HangStorage,
    /// Fault: SIGSTOP a supervisor (a holder that stops reading and acking) for the next 1–10
    /// operations, with a hotplug for its VM pushed to it meanwhile, then SIGCONT.
    StuckSupervisor,
    /// Fault (sanlock): SIGKILL one host's sanlock daemon. Its leases are gone with it: every guest
    /// of that host must be stopped by the driver's lock-failure path (an expected kill, by the
    /// lock service), then the daemon is restarted and the host rejoins the lockspace.
    KillLockService,
    /// Fault (sanlock): SIGSTOP one host's sanlock daemon for 20–300 ms while a hotplug of a VM of
    /// that host (or a status request) waits on it, then SIGCONT.
    PauseLockService,
    /// Fault (sanlock): SIGKILL one host's sanlock daemon 0–20 ms into a start or a hotplug on
    /// that host, then as [`Op::KillLockService`].
    KillLockServiceMidRequest,
    /// Fault (sanlock): a malformed request on a sanlock daemon's socket (bad magic, unknown
    /// command, oversized length, cut-short header, noise, a registration followed by garbage).
    MalformedLockService,
    /// Fault (sanlock): a malformed frame on a supervisor's control socket (the frames of
    /// [`Op::MalformedFrame`]).
    MalformedControl,
    /// A live migration of a guest to a new supervisor and guest on the same host:
    /// `migrate-prepare`, the destination `vmlock run --incoming STATE` (its guest writes nothing
    /// yet), the source guest paused, then `migrate-finish` (the destination writes, the source
    /// is ended) or, one time in four, `migrate-cancel` (the destination is ended, the source
    /// writes again). Now and then with a fault in it: vmlockd SIGKILLed between two steps, or
    /// the destination's supervisor SIGKILLed before the finish (see [`MigrationFault`]).
    Migrate,
    /// Fault (etcd, with [`Options::etcd_net`]): the network between vmlockd and the etcd cluster
    /// cut for 0.3–3 s (shorter than the lease can outlive: no guest may be fenced), healed by a
    /// timer whatever the campaign is doing then. Drawn one operation in [`PARTITION_ONE_IN`],
    /// apart from the weights (so a campaign without it makes the same choices as before).
    Partition,
}

/// One operation in this many is an etcd partition (with [`Options::etcd_net`]).
pub const PARTITION_ONE_IN: u64 = 40;

/// How long after a partition heals a request to etcd may still wait for it: TCP's
/// retransmission backoff and the client's reconnection.
const PARTITION_RECOVERY: Duration = Duration::from_secs(5);

/// A fault injected into a migration ([`Op::Migrate`]), drawn from the seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationFault {
    /// SIGKILL vmlockd after `migrate-prepare` (the destination's `vmlock run` starts a new one).
    KillDaemonAfterPrepare,
    /// SIGKILL vmlockd once the destination runs (before the pause).
    KillDaemonAfterDestination,
    /// SIGKILL vmlockd once the source is paused (before finish or cancel).
    KillDaemonAfterPause,
    /// SIGKILL the destination's supervisor before the finish (the source must keep its locks
    /// and keep running).
    KillDestination,
}

impl Op {
    const ALL: [(Op, u64); 19] = [
        (Op::Start, 300),
        (Op::Stop, 120),
        (Op::Attach, 160),
        (Op::Detach, 140),
        (Op::KillDaemon, 12),
        (Op::PauseDaemon, 10),
        (Op::KillSupervisor, 10),
        (Op::KillGuest, 10),
        (Op::DeleteState, 4),
        (Op::CorruptState, 4),
        (Op::IdleConnections, 5),
        (Op::MalformedFrame, 8),
        (Op::KillDaemonMidRequest, 8),
        (Op::KillSupervisorMidRequest, 6),
        (Op::DescriptorFlood, 6),
        (Op::FillRuntimeFs, 5),
        (Op::HangStorage, 6),
        (Op::StuckSupervisor, 6),
        (Op::Migrate, 20),
    ];

    /// Its name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Op::Start => "start",
            Op::Stop => "stop (SIGTERM supervisor)",
            Op::Attach => "hotplug (attach-disk)",
            Op::Detach => "unplug (detach-disk)",
            Op::KillDaemon => "SIGKILL vmlockd",
            Op::PauseDaemon => "SIGSTOP/SIGCONT vmlockd",
            Op::KillSupervisor => "SIGKILL supervisor",
            Op::KillGuest => "SIGKILL guest",
            Op::DeleteState => "state files deleted + SIGKILL vmlockd",
            Op::CorruptState => "state file corrupted + SIGKILL vmlockd",
            Op::IdleConnections => "idle connections",
            Op::MalformedFrame => "malformed frame",
            Op::KillDaemonMidRequest => "SIGKILL vmlockd mid-request (start/hotplug)",
            Op::KillSupervisorMidRequest => "SIGKILL supervisor mid-hotplug",
            Op::DescriptorFlood => "descriptor flood",
            Op::FillRuntimeFs => "runtime file system full",
            Op::HangStorage => "hung disk storage (FUSE)",
            Op::Partition => "etcd network partition (0.3-3 s)",
            Op::StuckSupervisor => "SIGSTOP/SIGCONT supervisor",
            Op::KillLockService => "SIGKILL sanlock daemon (+ restart)",
            Op::PauseLockService => "SIGSTOP/SIGCONT sanlock daemon",
            Op::KillLockServiceMidRequest => {
                "SIGKILL sanlock daemon mid-request (start/hotplug) (+ restart)"
            }
            Op::MalformedLockService => "malformed request to sanlock's socket",
            Op::MalformedControl => "malformed frame to a supervisor's control socket",
            Op::Migrate => "live migration (same host)",
        }
    }

    /// Whether it is a fault.
    pub fn is_fault(self) -> bool {
        !matches!(
            self,
            Op::Start | Op::Stop | Op::Attach | Op::Detach | Op::Migrate
        )
    }
}

/// What a campaign found.
#[derive(Debug, Default)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Operations done, faults included.
    pub ops: u64,
    /// Operations by kind.
    pub by_kind: BTreeMap<Op, u64>,
    /// Guests started.
    pub started: u64,
    /// Starts refused (expected: the disk was taken).
    pub refused: u64,
    /// Hotplugs that succeeded / were refused.
    pub attached: u64,
    /// Hotplugs refused.
    pub attach_refused: u64,
    /// Unplugs that succeeded.
    pub detached: u64,
    /// Unplugs refused or failed.
    pub detach_failed: u64,
    /// Unplugs refused because vmlock's table did not know the VM held the disk.
    pub detach_unknown: u64,
    /// CLI calls (including starts) that did not end within their bound.
    pub cli_timeouts: u64,
    /// Guests that saw another guest's mark on a disk they held.
    pub double_writers: u64,
    /// Live guests that saw no lock on a disk they were writing.
    pub no_lock: u64,
    /// The same, seen by a guest whose supervisor had died (the moment before PDEATHSIG).
    pub orphan_no_lock: u64,
    /// Disks a live guest holds with no lock left on them (after settling).
    pub locks_lost: u64,
    /// Locks on the campaign's disks that no live guest's supervisor keeps (after settling, and
    /// after every guest was stopped).
    pub locks_leaked: u64,
    /// With etcd: keys left on the campaign's disks after every guest was stopped.
    pub keys_leaked: u64,
    /// Descriptors of a flood (a file of the campaign's own) still open in vmlockd after
    /// settling.
    pub descriptors_leaked: u64,
    /// The most idle connections the campaign held open at once.
    pub most_idle: usize,
    /// Guests that ended without the campaign ending them.
    pub killed_by_vmlock: u64,
    /// Guests' own errors (open, write, /proc).
    pub guest_errors: u64,
    /// Rounds in which a guest's `F_OFD_GETLK` saw its lock but its read of `/proc/locks` did not.
    pub proc_locks_misses: u64,
    /// From each daemon kill to the next successful acquire, by fault kind.
    pub recovery: BTreeMap<Op, Vec<Duration>>,
    /// Daemon kills after which no acquire succeeded within the bound.
    pub recovery_failures: u64,
    /// Hung-storage faults drawn but skipped (no FUSE mount), and why.
    pub hang_skipped: (u64, String),
    /// How long each hang of the storage lasted (wall time).
    pub hang_durations: Vec<Duration>,
    /// How long each etcd partition lasted (the cut chosen; healed by a timer).
    pub partitions: Vec<Duration>,
    /// Acquire probes (acquire + release, the refused one) taken while vmlockd was cut off from
    /// etcd: they wait for etcd by design, so they are not counted as stalls.
    pub probes_partitioned: Vec<Duration>,
    /// Hangs during which a live guest held a disk on the hung storage.
    pub hangs_with_guest: u64,
    /// Hangs during which a vmlockd thread was seen waiting in the hung storage (its `wchan`).
    pub hangs_with_daemon_waiting: u64,
    /// SIGKILLs of vmlockd whose exit waited in the hung storage until the campaign resumed it
    /// (the kernel flushes every descriptor a dying process closes, FUSE ones included).
    pub kills_waiting_for_hung_storage: u64,
    /// From each resume to every guest on the storage having run a round again (acked a
    /// control write).
    pub hang_recovery: Vec<Duration>,
    /// Guests on the storage that did not run a round again within the bound after a resume.
    pub hang_recovery_failures: u64,
    /// How long each supervisor stayed stopped (wall time).
    pub stop_durations: Vec<Duration>,
    /// Hotplugs pushed to a stopped supervisor: granted (after SIGCONT) / refused.
    pub stuck_hotplugs: (u64, u64),
    /// From SIGCONT to the answer of the hotplug pushed to the stopped supervisor, when it was
    /// still pending.
    pub stop_recovery: Vec<Duration>,
    /// Daemon probes (status on a fresh connection; an acquire and release of the probe disk by
    /// a holder of the campaign's own) while something was stuck.
    pub probes_stuck: Probes,
    /// The same with nothing stuck.
    pub probes_free: Probes,
    /// Probes longer than [`STALL`] while another client was stuck.
    pub stalls: u64,
    /// Probes longer than [`STALL`] with nothing stuck (not a violation: the machine's own noise).
    pub slow_free_probes: u64,
    /// Probes that got no answer (no daemon, an error other than a refusal).
    pub probe_failures: u64,
    /// Wall-clock time.
    pub elapsed: Duration,
    /// One line per violation or anomaly.
    pub details: Vec<String>,
    /// The driver the campaign ran against.
    pub driver: Driver,
    /// sanlock: guests ended by the driver's lock-failure path after their host's sanlock daemon
    /// was killed (expected: their leases went with the daemon).
    pub fenced_by_lock_service: u64,
    /// sanlock: from each daemon kill to the end of each guest of its host.
    pub fence_times: Vec<Duration>,
    /// sanlock: guests still running a while after their host's sanlock daemon was killed
    /// (running without leases).
    pub unfenced: u64,
    /// sanlock: leases listed as granted by the daemons of both hosts at once.
    pub double_held: u64,
    /// sanlock: status requests that a daemon the campaign had neither killed nor stopped did
    /// not answer.
    pub lock_service_unanswered: u64,
    /// sanlock: outages of their host's daemon seen by guests (from their findings).
    pub lease_service_gone: u64,
    /// sanlock: supervisors that did not answer a request right after a malformed frame on their
    /// control socket.
    pub control_unanswered: u64,
    /// Kinds of fault of the other driver that do not apply to this one, and why.
    pub not_applicable: Vec<(Op, &'static str)>,
    /// Migrations finished (the destination owns the VM and writes; the source was ended).
    pub migrations_finished: u64,
    /// Migrations cancelled by the seed's choice (the source writes again).
    pub migrations_cancelled: u64,
    /// Migrations that failed (a step refused or failed, a fault; cancelled, the source writes
    /// again).
    pub migrations_failed: u64,
    /// Migrations that failed with no fault injected in them.
    pub migrations_failed_unfaulted: u64,
    /// Faults injected into migrations, by kind.
    pub migration_faults: BTreeMap<&'static str, u64>,
    /// Migration sources that stopped running (or were not writing again) after a cancelled or
    /// failed migration.
    pub migration_sources_lost: u64,
}

/// Latencies of the daemon probes.
#[derive(Debug, Default)]
pub struct Probes {
    /// `Status` on a fresh connection (connect and hello included).
    pub status: Vec<Duration>,
    /// A holder registering for a new VM (connect and hello included).
    pub hold: Vec<Duration>,
    /// That VM acquiring the probe disk and releasing it.
    pub round_trip: Vec<Duration>,
    /// With [`Options::probe_foreign_holder`]: that VM refused a disk locked outside vmlock.
    pub foreign: Vec<Duration>,
}

impl Probes {
    fn summary(&self) -> String {
        let p = |v: &[Duration]| {
            let mut v = v.to_vec();
            v.sort();
            format!(
                "{:.1} / {:.1} / {:.1} ms",
                ms(percentile(&v, 0.5)),
                ms(percentile(&v, 0.99)),
                ms(v.last().copied().unwrap_or_default())
            )
        };
        let foreign = if self.foreign.is_empty() {
            String::new()
        } else {
            format!("; refused (foreign holder) {}", p(&self.foreign))
        };
        format!(
            "status {}; hold {}; acquire+release {}{foreign}; n {}",
            p(&self.status),
            p(&self.hold),
            p(&self.round_trip),
            self.status.len()
        )
    }
}

/// Times the laps of a probe, and how long this thread waited for a CPU meanwhile (from
/// `/proc/thread-self/schedstat`: time runnable but not running), to tell a daemon that did not
/// answer from a machine that did not run the campaign.
struct ProbeTimer {
    at: Instant,
    waited: Duration,
}

impl ProbeTimer {
    fn start() -> Self {
        ProbeTimer {
            at: Instant::now(),
            waited: cpu_wait(),
        }
    }

    /// The time since the last lap (or the start), and the CPU wait in it.
    fn lap(&mut self) -> (Duration, Duration) {
        let (at, waited) = (Instant::now(), cpu_wait());
        let lap = (at - self.at, waited.saturating_sub(self.waited));
        (self.at, self.waited) = (at, waited);
        lap
    }
}

/// How long this thread has waited on a run queue in all (0 where schedstat is unavailable).
fn cpu_wait() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

impl Report {
    /// Faults injected.
    pub fn faults(&self) -> u64 {
        self.by_kind
            .iter()
            .filter(|(k, _)| k.is_fault())
            .map(|(_, n)| n)
            .sum()
    }

    /// Whether every must-be-0 row is 0.
    pub fn passed(&self) -> bool {
        self.double_writers == 0
            && self.no_lock == 0
            && self.locks_lost == 0
            && self.locks_leaked == 0
            && self.keys_leaked == 0
            && self.descriptors_leaked == 0
            && self.killed_by_vmlock == 0
            && self.stalls == 0
            && self.unfenced == 0
            && self.double_held == 0
            && self.lock_service_unanswered == 0
            && self.control_unanswered == 0
            && self.migration_sources_lost == 0
    }

    /// A test's verdict on campaign `name`: `Err` says why it failed (a must-be-0 row is not 0,
    /// or no fault was injected, so nothing was tried).
    pub fn verdict(&self, name: &str) -> Result<(), String> {
        if !self.passed() {
            return Err(format!(
                "{name}: a must-be-0 row is not 0 (seed {})",
                self.seed
            ));
        }
        if self.faults() == 0 {
            return Err(format!("{name}: no fault was injected"));
        }
        Ok(())
    }

    /// The table and, after it, the details of every finding.
    pub fn summary(&self) -> String {
        let mut out = self.table();
        for d in &self.details {
            out.push_str(d);
            out.push('\n');
        }
        out
    }

    /// The table (Markdown).
    pub fn table(&self) -> String {
        if self.driver == Driver::Sanlock {
            return self.sanlock_table();
        }
        let mut rows: Vec<(String, String)> = Vec::new();
        let mut row = |k: &str, v: String| rows.push((k.to_owned(), v));
        row("seed", self.seed.to_string());
        row("operations", self.ops.to_string());
        row("wall time", format!("{:.1} s", self.elapsed.as_secs_f64()));
        for (k, n) in &self.by_kind {
            if !k.is_fault() {
                row(&format!("  {}", k.name()), n.to_string());
            }
        }
        row(
            "guests started / starts refused",
            format!("{} / {}", self.started, self.refused),
        );
        row(
            "hotplugs ok / refused; unplugs ok / failed",
            format!(
                "{} / {}; {} / {}",
                self.attached, self.attach_refused, self.detached, self.detach_failed
            ),
        );
        row(
            "unplugs refused as \"not locked by VM\" (held, attached, never released)",
            self.detach_unknown.to_string(),
        );
        row("faults", self.faults().to_string());
        for (k, n) in &self.by_kind {
            if k.is_fault() {
                row(&format!("  {}", k.name()), n.to_string());
            }
        }
        if self.hang_skipped.0 > 0 {
            row(
                &format!("  {}", Op::HangStorage.name()),
                format!(
                    "skipped ({} drawn, each a start instead): {}",
                    self.hang_skipped.0, self.hang_skipped.1
                ),
            );
        }
        row(
            "migrations finished / cancelled / failed",
            format!(
                "{} / {} / {}",
                self.migrations_finished, self.migrations_cancelled, self.migrations_failed
            ),
        );
        for (k, n) in &self.migration_faults {
            row(&format!("  migration fault: {k}"), n.to_string());
        }
        row(
            "migrations failed with no fault in them",
            self.migrations_failed_unfaulted.to_string(),
        );
        row(
            "migration sources not running after cancel or failure (must be 0)",
            self.migration_sources_lost.to_string(),
        );
        row(
            "double writers (must be 0)",
            self.double_writers.to_string(),
        );
        row(
            "live guests seen without their lock (must be 0)",
            self.no_lock.to_string(),
        );
        row("locks lost (must be 0)", self.locks_lost.to_string());
        row("locks leaked (must be 0)", self.locks_leaked.to_string());
        row("etcd keys leaked (must be 0)", self.keys_leaked.to_string());
        row(
            "flooded descriptors left open in vmlockd (must be 0)",
            self.descriptors_leaked.to_string(),
        );
        row(
            "most idle connections held open at once",
            self.most_idle.to_string(),
        );
        row(
            "guests killed by vmlock's own restart (must be 0)",
            self.killed_by_vmlock.to_string(),
        );
        row(
            "daemon stalls longer than 100 ms while another client was stuck (must be 0)",
            self.stalls.to_string(),
        );
        row(
            "no lock seen by a guest whose supervisor had died",
            self.orphan_no_lock.to_string(),
        );
        row("CLI calls over their bound", self.cli_timeouts.to_string());
        row("guest errors", self.guest_errors.to_string());
        row(
            "locks missing from a /proc/locks read but held (F_OFD_GETLK)",
            self.proc_locks_misses.to_string(),
        );
        for (k, v) in &self.recovery {
            let mut v = v.clone();
            v.sort();
            row(
                &format!("recovery after {} (p50 / p99, n)", k.name()),
                format!(
                    "{} ms / {} ms, {}",
                    percentile(&v, 0.5).as_millis(),
                    percentile(&v, 0.99).as_millis(),
                    v.len()
                ),
            );
        }
        row(
            "daemon kills without recovery within 30 s",
            self.recovery_failures.to_string(),
        );
        let p50_p99 = |v: &[Duration]| {
            let mut v = v.to_vec();
            v.sort();
            format!(
                "{} ms / {} ms, {}",
                percentile(&v, 0.5).as_millis(),
                percentile(&v, 0.99).as_millis(),
                v.len()
            )
        };
        if !self.partitions.is_empty() {
            row(
                "etcd partitions: cut for (p50 / p99, n)",
                p50_p99(&self.partitions),
            );
            if !self.probes_partitioned.is_empty() {
                row(
                    "acquire probes during a partition (wait for etcd by design; p50 / p99, n)",
                    p50_p99(&self.probes_partitioned),
                );
            }
        }
        if !self.hang_durations.is_empty() {
            row(
                "storage hung for (p50 / p99, n)",
                p50_p99(&self.hang_durations),
            );
            row(
                "hangs with a guest on the storage / with a vmlockd thread waiting in it",
                format!(
                    "{} / {}",
                    self.hangs_with_guest, self.hangs_with_daemon_waiting
                ),
            );
            row(
                "SIGKILLed vmlockd exits that waited for the hung storage (resumed)",
                self.kills_waiting_for_hung_storage.to_string(),
            );
            row(
                "recovery after hung storage: resume to its guests' next round (p50 / p99, n)",
                p50_p99(&self.hang_recovery),
            );
            row(
                "guests on hung storage not running again within 5 s of the resume",
                self.hang_recovery_failures.to_string(),
            );
        }
        if !self.stop_durations.is_empty() {
            row(
                "supervisor stopped for (p50 / p99, n)",
                p50_p99(&self.stop_durations),
            );
            row(
                "hotplugs pushed to a stopped supervisor: granted after SIGCONT / refused",
                format!("{} / {}", self.stuck_hotplugs.0, self.stuck_hotplugs.1),
            );
            row(
                "recovery after a stopped supervisor: SIGCONT to its hotplug's answer (p50 / p99, n)",
                p50_p99(&self.stop_recovery),
            );
        }
        row(
            "daemon probe with a client stuck (p50 / p99 / max)",
            self.probes_stuck.summary(),
        );
        row(
            "daemon probe with nothing stuck (p50 / p99 / max)",
            self.probes_free.summary(),
        );
        row(
            "daemon probes over 100 ms with nothing stuck",
            self.slow_free_probes.to_string(),
        );
        row(
            "daemon probes without an answer",
            self.probe_failures.to_string(),
        );
        render(rows)
    }
}

/// Rows as a Markdown table.
fn render(rows: Vec<(String, String)>) -> String {
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = format!("| {:w$} | value |\n|{}|---|\n", "row", "-".repeat(w + 2));
    for (k, v) in rows {
        out.push_str(&format!("| {k:w$} | {v} |\n"));
    }
    out
}

/// `p50 ms / p99 ms, n` of some durations.
fn p50_p99(v: &[Duration]) -> String {
    let mut v = v.to_vec();
    v.sort();
    format!(
        "{} ms / {} ms, {}",
        percentile(&v, 0.5).as_millis(),
        percentile(&v, 0.99).as_millis(),
        v.len()
    )
}

/// A guest the campaign started and still tracks.
struct Live {
    id: u64,
    slot: usize,
    /// The host it runs on (index of a sanlock host; 0 under lockd).
    host: usize,
    /// sanlock: its host's daemon was killed at this time, so its leases are gone and the
    /// driver's lock-failure path must end it.
    fenced_at: Option<Instant>,
    supervisor: Child,
    guest: Option<ProcessHandle>,
    guest_pid: u32,
    disks: Vec<usize>,
    generation: u64,
    /// It writes its mark (false: a migration destination not yet told to, or a paused source).
    writing: bool,
    /// The campaign ended (or is ending) it: SIGTERM or SIGKILL to it or its supervisor.
    signalled: bool,
    said: Arc<Mutex<String>>,
}

impl Live {
    fn guest_gone(&self) -> bool {
        self.guest.as_ref().map_or(true, ProcessHandle::has_exited)
    }

    /// SIGTERM to its supervisor (by the pid of our own child, so never another process).
    fn terminate_supervisor(&self) {
        if let Some(pid) = i32::try_from(self.supervisor.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, Signal::TERM);
        }
    }
}

enum Started {
    Yes(Box<Live>),
    Refused,
    TimedOut,
}

#[derive(Debug)]
enum Cli {
    Ok,
    /// It failed, saying this.
    Failed(String),
    TimedOut,
}

/// The storage hangs (a [`Op::HangStorage`] in force).
struct Hung {
    since: Instant,
    /// It is resumed before this operation (and not before [`MIN_HANG`]).
    until: u64,
}

/// A supervisor stopped by [`Op::StuckSupervisor`].
struct Stopped {
    guest_id: u64,
    pid: u32,
    since: Instant,
    /// It is continued before this operation (and, if set, not before this much time).
    until: u64,
    at_least: Option<Duration>,
    /// The hotplug for its VM started while it was stopped: `vmlock attach-disk`, the disk.
    hotplug: Option<(Child, usize)>,
}

struct Campaign {
    /// The FUSE storage that the last 1–2 disks live on, when it could be mounted (declared
    /// first: dropped, i.e. unmounted, before the directory it is mounted in is removed).
    hang: Option<HangFs>,
    /// The timer thread that heals the current etcd partition, if one is in force.
    partition: Option<std::thread::JoinHandle<()>>,
    /// Until when the last partition may still hold up a request to etcd: its heal plus
    /// [`PARTITION_RECOVERY`].
    partition_affects_until: Option<Instant>,
    /// The disks on it.
    hung_disks: Vec<usize>,
    /// While it hangs.
    hung: Option<Hung>,
    /// With [`Options::probe_foreign_holder`]: a disk of the campaign's own, and the description
    /// through which the campaign itself holds its lock, outside vmlock.
    foreign: Option<(PathBuf, std::fs::File)>,
    /// The supervisor stopped now, if any.
    stopped: Option<Stopped>,
    opts: Options,
    rng: Rng,
    dir: tempfile::TempDir,
    disks: Vec<PathBuf>,
    disk_ids: Vec<FileId>,
    probe_disk: PathBuf,
    uuids: Vec<String>,
    live: Vec<Live>,
    next_id: u64,
    idle: Vec<(u64, Vec<UnixStream>)>,
    ops_log: Option<std::io::BufWriter<std::fs::File>>,
    report: Report,
    /// `--driver-config` naming the daemon's configuration (with `[etcd]`), if any.
    driver_config: Option<PathBuf>,
    /// The etcd key prefix of this campaign.
    etcd_prefix: String,
    /// The runtime directory is a small tmpfs of the campaign's own (a private mount namespace).
    small_runtime_fs: bool,
    /// The filler that fills it, and the operation after which it is removed.
    filler: Option<u64>,
    /// sanlock: the two hosts (their daemons, configurations, runtime directories).
    sanlock: Option<sanlock::Hosts>,
}

/// Mounts a 2 MiB tmpfs on `run_dir` in a mount namespace of this thread's own (needs root).
fn small_runtime_fs(run_dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(run_dir)?;
    vmlock_sys::mountns::enter_private()?;
    nix::mount::mount(
        Some("tmpfs"),
        run_dir,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=2m,mode=0700"),
    )
    .map_err(std::io::Error::from)
}

impl Campaign {
    /// A campaign in `dir` with its disks (and the probe's) and its VMs' uuids; nothing of a
    /// driver set up yet.
    fn new(opts: Options, dir: tempfile::TempDir) -> anyhow::Result<Self> {
        let mut disks = Vec::new();
        let mut disk_ids = Vec::new();
        for i in 0..=opts.disks {
            let p = dir.path().join(format!("disk{i}.img"));
            let f =
                std::fs::File::create(&p).with_context(|| format!("creating {}", p.display()))?;
            f.set_len(DISK_SIZE)?;
            disk_ids.push(FileId::of(&p)?);
            disks.push(p);
        }
        // The last disk is the recovery probe's own, so a probe is never refused by a guest.
        let probe_disk = disks.pop().context("no probe disk")?;
        let uuids = (0..=opts.vms)
            .map(|_| uuid::Uuid::new_v4().to_string())
            .collect();
        Ok(Campaign {
            hang: None,
            hung_disks: Vec::new(),
            hung: None,
            foreign: None,
            stopped: None,
            rng: Rng::new(opts.seed),
            report: Report {
                seed: opts.seed,
                ..Report::default()
            },
            opts,
            dir,
            disks,
            disk_ids,
            probe_disk,
            uuids,
            live: Vec::new(),
            next_id: 1,
            idle: Vec::new(),
            ops_log: None,
            driver_config: None,
            etcd_prefix: String::new(),
            small_runtime_fs: false,
            filler: None,
            sanlock: None,
            partition: None,
            partition_affects_until: None,
        })
    }
}

/// Runs a campaign and returns what it found. Errors are failures of the campaign itself (its
/// directory, spawning `vmlock`), not findings.
pub fn run(opts: Options) -> anyhow::Result<Report> {
    if opts.driver == Driver::Sanlock {
        return sanlock::run(opts);
    }
    let dir = tempfile::Builder::new()
        .prefix("vmlock-torture-")
        .tempdir()
        .context("creating the campaign's directory")?;
    let mut c = Campaign::new(opts, dir)?;
    // The runtime directory on a 2 MiB tmpfs that this thread alone sees (and every process it
    // starts): the "file system full" fault fills it without touching the host.
    match small_runtime_fs(&c.run_dir()) {
        Ok(()) => c.small_runtime_fs = true,
        Err(e) => c.report.details.push(format!(
            "no runtime file system of its own ({e}): no \"file system full\" faults"
        )),
    }
    // The last 1–2 disks on FUSE storage that hangs on command, mounted in the same private
    // mount namespace (so no other process on the host ever sees it hang).
    if c.small_runtime_fs {
        if let Err(e) = c.mount_hang_fs() {
            c.report.hang_skipped.1 = format!("no FUSE mount ({e})");
        }
    } else {
        c.report.hang_skipped.1 = "no mount namespace of its own".into();
    }
    if c.opts.probe_foreign_holder {
        let path = c.dir.path().join("foreign.img");
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        file.set_len(DISK_SIZE)?;
        let locked = vmlock_sys::ofd::try_lock(
            std::os::fd::AsFd::as_fd(&file),
            vmlock_sys::ofd::LockKind::Exclusive,
            0,
            1,
        )?;
        anyhow::ensure!(locked, "{} is locked already", path.display());
        c.foreign = Some((path, file));
    }
    if !c.report.hang_skipped.1.is_empty() {
        c.report.details.push(format!(
            "{}: no \"hung storage\" faults",
            c.report.hang_skipped.1
        ));
    }
    if !c.opts.etcd_endpoints.is_empty() {
        c.etcd_prefix = format!("/vmlock-torture/{}-{}", c.opts.seed, std::process::id());
        let endpoints: Vec<String> = c
            .opts
            .etcd_endpoints
            .iter()
            .map(|e| format!("{e:?}"))
            .collect();
        let daemon = c.dir.path().join("vmlockd.toml");
        std::fs::write(
            &daemon,
            format!(
                "host_name = \"torture\"\n[etcd]\nendpoints = [{}]\nprefix = {:?}\n{}",
                endpoints.join(", "),
                c.etcd_prefix,
                // Partitioned, a request gives up in a second rather than five: starts and
                // hotplugs then are refused quickly, and the campaign's bounds hold.
                if c.opts.etcd_net.is_some() {
                    "request_timeout_ms = 1000\nconnect_timeout_ms = 1000\n"
                } else {
                    ""
                }
            ),
        )?;
        let driver = c.dir.path().join("driver.toml");
        std::fs::write(&driver, format!("daemon_config = {daemon:?}\n"))?;
        c.driver_config = Some(driver);
    }
    c.ops_log = std::fs::File::create(c.dir.path().join("ops.log"))
        .ok()
        .map(std::io::BufWriter::new);
    let t0 = Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.campaign(t0)));
    // Whatever happened (a panic too): nothing stays stuck (a process waiting in the hung
    // storage or stopped could not be reaped), every guest ends, the daemon is killed by pid.
    if let Some(fs) = &c.hang {
        fs.resume();
    }
    c.hung = None;
    c.continue_supervisor();
    c.stop_all();
    if result.is_ok() {
        c.check_etcd_keys();
    }
    c.kill_daemon();
    // Unmounted once nothing of the campaign's uses it any more.
    c.hang = None;
    match result {
        Ok(r) => r?,
        Err(panic) => std::panic::resume_unwind(panic),
    }
    c.report.elapsed = t0.elapsed();
    if c.opts.keep_dir || !c.report.passed() {
        let kept = c.dir.keep();
        c.report
            .details
            .push(format!("campaign directory kept: {}", kept.display()));
    }
    Ok(c.report)
}

impl Campaign {
    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn vmlock(&self) -> Command {
        let mut c = Command::new(&self.opts.vmlock);
        if let Some(net) = &self.opts.etcd_net {
            net.enter(&mut c);
        }
        if let Some(d) = &self.driver_config {
            c.arg("--driver-config").arg(d);
        }
        c.arg("--runtime-dir")
            .arg(self.run_dir())
            .env("VMLOCK_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        c
    }

    /// Notes what is done in `DIR/ops.log` (and on stderr with `verbose`), time-stamped like the
    /// guests' findings.
    fn log(&mut self, what: &str) {
        let line = format!("op {} @{}: {what}", self.report.ops, crate::now_ms());
        if self.opts.verbose {
            eprintln!("torture: {line}");
        }
        if let Some(f) = &mut self.ops_log {
            let _ = writeln!(f, "{line}");
        }
    }

    fn campaign(&mut self, t0: Instant) -> anyhow::Result<()> {
        let weights: Vec<u64> = Op::ALL.iter().map(|(_, w)| *w).collect();
        while self.report.ops < self.opts.ops {
            if self.opts.duration.is_some_and(|d| t0.elapsed() >= d) {
                break;
            }
            let ops = self.report.ops;
            self.idle.retain(|(until, _)| *until > ops);
            if self.filler.is_some_and(|until| until <= ops) {
                self.empty_runtime_fs();
            }
            if self
                .hung
                .as_ref()
                .is_some_and(|h| h.until <= ops && h.since.elapsed() >= MIN_HANG)
            {
                self.resume_storage();
            }
            if self.stopped.as_ref().is_some_and(|s| {
                s.until <= ops && s.at_least.map_or(true, |t| s.since.elapsed() >= t)
            }) {
                self.continue_supervisor();
            }
            self.reap();
            if self.partition.as_ref().is_some_and(|h| h.is_finished()) {
                self.end_partition();
            }
            let op = if self.opts.etcd_net.is_some()
                && self.partition.is_none()
                && self.rng.range(0, PARTITION_ONE_IN) == 0
            {
                Op::Partition
            } else {
                Op::ALL[self.rng.weighted(&weights)].0
            };
            let done = self.step(op)?;
            self.report.ops += 1;
            *self.report.by_kind.entry(done).or_default() += 1;
            self.probe_daemon();
            if self.report.ops % CHECK_EVERY == 0 {
                // The checks open every disk: the storage answers again first (and etcd).
                self.end_partition();
                self.resume_storage();
                self.continue_supervisor();
                let when = format!("at op {}", self.report.ops);
                self.settle_and_check(&when, false);
            }
        }
        self.idle.clear();
        self.end_partition();
        self.empty_runtime_fs();
        self.resume_storage();
        self.continue_supervisor();
        self.settle_and_check("after the campaign", true);
        self.read_findings();
        Ok(())
    }

    /// Does `op`, or another when it cannot be done now (no guest to stop, say); returns what
    /// was done.
    fn step(&mut self, op: Op) -> anyhow::Result<Op> {
        let needs_guest = matches!(
            op,
            Op::Stop
                | Op::Attach
                | Op::Detach
                | Op::KillSupervisor
                | Op::KillGuest
                | Op::KillSupervisorMidRequest
                | Op::StuckSupervisor
                | Op::Migrate
        );
        // Guests that are stuck (on hung storage, or their supervisor stopped) are left alone.
        let guests = self.eligible();
        if needs_guest && guests.is_empty() {
            return self.step(Op::Start);
        }
        if op == Op::FillRuntimeFs && !self.small_runtime_fs {
            return self.step(Op::Start);
        }
        if op == Op::HangStorage && self.hang.is_none() {
            self.report.hang_skipped.0 += 1;
            return self.step(Op::Start);
        }
        if (op == Op::HangStorage && self.hung.is_some())
            || (op == Op::StuckSupervisor && self.stopped.is_some())
        {
            // One at a time.
            return self.step(Op::Start);
        }
        if op == Op::HangStorage && self.hotplug_waits_for_hung_disk() {
            // A hotplug pushed to a stopped supervisor opens its disk once continued: on hung
            // storage it would wait (rightly) for the storage, not end after the SIGCONT.
            return self.step(Op::Start);
        }
        let i = if needs_guest || op == Op::KillDaemonMidRequest {
            self.rng.pick(&guests).copied().unwrap_or(0)
        } else {
            0
        };
        match op {
            Op::Start => {
                if !self.start_random()? {
                    if guests.is_empty() {
                        // Every slot taken, every guest stuck: nothing to start or stop.
                        self.log("no free slot and every guest stuck: nothing done");
                        return Ok(op);
                    }
                    return self.step(Op::Stop);
                }
            }
            Op::Stop => {
                self.log(&format!("stop guest {}", self.live[i].id));
                self.stop(i);
            }
            Op::Attach => self.attach(i)?,
            Op::Detach => self.detach(i)?,
            Op::Migrate => self.migrate(i)?,
            Op::KillDaemon | Op::DeleteState | Op::CorruptState => {
                if !self.ensure_daemon() {
                    self.report
                        .details
                        .push(format!("op {}: no daemon to kill", self.report.ops));
                    return Ok(op);
                }
                if op == Op::DeleteState {
                    self.delete_state();
                } else if op == Op::CorruptState {
                    self.corrupt_state()?;
                }
                self.log(op.name());
                let t = Instant::now();
                self.kill_daemon();
                self.recover(op, t)?;
            }
            Op::PauseDaemon => self.pause_daemon()?,
            Op::KillSupervisor => self.kill_supervisor(i),
            Op::KillGuest => self.kill_guest(i),
            Op::IdleConnections => {
                // Thousands at once now and then, but never with other idle ones still held: the
                // daemon's client limit (4,096) must stay out of reach of the campaign's own.
                let thousands =
                    self.opts.idle_burst && self.idle.is_empty() && self.rng.range(0, 4) == 0;
                let n = if thousands {
                    self.rng.range(2000, 3000)
                } else {
                    self.rng.range(50, 400)
                };
                let keep = self.rng.range(1, 10);
                let sock = self.run_dir().join("vmlockd.sock");
                let conns: Vec<UnixStream> = (0..n)
                    .filter_map(|_| UnixStream::connect(&sock).ok())
                    .collect();
                self.log(&format!("{} idle connections", conns.len()));
                self.idle.push((self.report.ops + keep, conns));
                let held: usize = self.idle.iter().map(|(_, c)| c.len()).sum();
                self.report.most_idle = self.report.most_idle.max(held);
            }
            Op::MalformedFrame => self.malformed(),
            Op::DescriptorFlood => self.descriptor_flood(),
            Op::FillRuntimeFs => self.fill_runtime_fs(),
            Op::KillDaemonMidRequest => {
                if !self.ensure_daemon() {
                    return Ok(op);
                }
                let Some(daemon) = self.daemon() else {
                    return Ok(op);
                };
                let delay = Duration::from_micros(self.rng.range(0, 20_000));
                self.log(&format!("SIGKILL vmlockd {delay:?} into a request"));
                // While storage hangs, vmlockd's exit may wait in it (see kill_daemon).
                let exit_wait = if self.hung.is_some() {
                    HUNG_EXIT_GRACE
                } else {
                    EXIT_TIMEOUT
                };
                let killer = std::thread::spawn(move || {
                    // Deliberate: the fault lands a random time into the request.
                    std::thread::sleep(delay);
                    let _ = daemon.signal(Signal::KILL);
                    let at = Instant::now();
                    let exited = daemon.wait_exit(Some(exit_wait));
                    (at, exited.then_some(()).ok_or(daemon))
                });
                if guests.is_empty() || self.rng.below(2) == 0 {
                    if !self.start_random()? && !guests.is_empty() {
                        self.attach(i)?;
                    }
                } else {
                    self.attach(i)?;
                }
                let killed_at = match killer.join() {
                    Ok((at, Ok(()))) => at,
                    Ok((at, Err(daemon))) => {
                        if self.hung.is_some() {
                            self.report.kills_waiting_for_hung_storage += 1;
                            self.log("vmlockd's exit waits in the hung storage: resuming it");
                            self.resume_storage();
                        }
                        if !daemon.wait_exit(Some(EXIT_TIMEOUT)) {
                            self.report.details.push(format!(
                                "op {}: vmlockd (pid {}) still running {EXIT_TIMEOUT:?} after SIGKILL",
                                self.report.ops, daemon.pid
                            ));
                        }
                        at
                    }
                    Err(_) => Instant::now(),
                };
                self.recover(op, killed_at)?;
            }
            Op::KillSupervisorMidRequest => self.kill_supervisor_mid_hotplug(i)?,
            Op::HangStorage => self.hang_storage(),
            Op::Partition => self.partition_etcd(),
            Op::StuckSupervisor => self.stop_supervisor(i)?,
            Op::KillLockService
            | Op::KillLockServiceMidRequest
            | Op::PauseLockService
            | Op::MalformedLockService
            | Op::MalformedControl => {
                anyhow::bail!("{} is not a lockd operation", op.name())
            }
        }
        Ok(op)
    }

    // -----------------------------------------------------------------------------------------
    // Guests

    /// `vmlock` for a command on `host`: under sanlock, that host's driver configuration and
    /// runtime directory; under lockd, [`Campaign::vmlock`].
    fn vmlock_on(&self, host: usize) -> Command {
        match &self.sanlock {
            Some(hosts) => hosts.vmlock(&self.opts.vmlock, host),
            None => self.vmlock(),
        }
    }

    /// SIGKILL to guest `i`'s supervisor.
    fn kill_supervisor(&mut self, i: usize) {
        self.log(&format!("SIGKILL supervisor of guest {}", self.live[i].id));
        let mut l = self.live.swap_remove(i);
        l.signalled = true;
        let _ = l.supervisor.kill();
        self.finish(l);
    }

    /// SIGKILL to guest `i`.
    fn kill_guest(&mut self, i: usize) {
        self.log(&format!("SIGKILL guest {}", self.live[i].id));
        let mut l = self.live.swap_remove(i);
        l.signalled = true;
        if let Some(h) = &l.guest {
            let _ = h.signal(Signal::KILL);
        }
        self.finish(l);
    }

    /// Starts a guest in a free slot on 1–2 random disks; false if no slot is free.
    fn start_random(&mut self) -> anyhow::Result<bool> {
        self.start_random_on(None)
    }

    /// [`Campaign::start_random`] on `host` (under sanlock; `None`: drawn from the seed).
    fn start_random_on(&mut self, host: Option<usize>) -> anyhow::Result<bool> {
        let free: Vec<usize> = (0..self.opts.vms)
            .filter(|s| !self.live.iter().any(|l| l.slot == *s))
            .collect();
        let Some(&slot) = self.rng.pick(&free) else {
            return Ok(false);
        };
        // A start on hung storage would only wait for its bound: none while it hangs.
        let usable: Vec<usize> = (0..self.disks.len())
            .filter(|d| self.usable_disk(*d))
            .collect();
        let n = self.rng.range(1, 2.min(usable.len() as u64));
        let mut chosen = Vec::new();
        while chosen.len() < n as usize {
            let d = usable[self.rng.below(usable.len() as u64) as usize];
            if !chosen.contains(&d) {
                chosen.push(d);
            }
        }
        // Under sanlock, on either host (lockd has one).
        let host = match &self.sanlock {
            Some(hosts) => {
                let host = host.unwrap_or_else(|| self.rng.below(hosts.count() as u64) as usize);
                self.log(&format!("start vm{slot} on host {host} on {chosen:?}"));
                host
            }
            None => {
                self.log(&format!("start vm{slot} on {chosen:?}"));
                0
            }
        };
        self.start_and_track(slot, host, &chosen)?;
        Ok(true)
    }

    fn start_and_track(
        &mut self,
        slot: usize,
        host: usize,
        disks: &[usize],
    ) -> anyhow::Result<bool> {
        match self.start(slot, host, disks)? {
            Started::Yes(l) => {
                self.report.started += 1;
                self.live.push(*l);
                Ok(true)
            }
            Started::Refused => {
                self.report.refused += 1;
                Ok(false)
            }
            Started::TimedOut => Ok(false),
        }
    }

    fn disk_path(&self, d: usize) -> &Path {
        self.disks.get(d).unwrap_or(&self.probe_disk)
    }

    /// `vmlock run` of a new guest in `slot` on `host` on `disks` (index `self.disks.len()` is
    /// the probe's).
    fn start(&mut self, slot: usize, host: usize, disks: &[usize]) -> anyhow::Result<Started> {
        self.start_as(slot, host, disks, None)
    }

    /// [`Campaign::start`]; with `incoming`, as a migration destination: `vmlock run --incoming
    /// STATE`, its guest started with `--incoming` (it writes nothing until told to).
    fn start_as(
        &mut self,
        slot: usize,
        host: usize,
        disks: &[usize],
        incoming: Option<&str>,
    ) -> anyhow::Result<Started> {
        let id = self.next_id;
        self.next_id += 1;
        let mut cmd = self.vmlock_on(host);
        cmd.args(["run", "--name", &format!("vm{slot}"), "--uuid"])
            .arg(&self.uuids[slot]);
        if let Some(state) = incoming {
            cmd.args(["--incoming", state]);
        }
        for d in disks {
            cmd.arg("--disk").arg(self.disk_path(*d));
        }
        cmd.arg("--")
            .arg(&self.opts.guest_program)
            .args(["guest", "--id", &id.to_string(), "--dir"])
            .arg(self.dir.path());
        if incoming.is_some() {
            cmd.arg("--incoming");
        }
        if let Some(hosts) = &self.sanlock {
            cmd.arg("--sanlock").arg(hosts.run_dir(host));
        }
        for d in disks {
            cmd.arg("--disk").arg(self.disk_path(*d));
        }
        let mut supervisor = cmd
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning vmlock run")?;
        let mut stderr = supervisor.stderr.take().context("piped stderr")?;
        let deadline = Instant::now() + START_TIMEOUT;
        let mut said = String::new();
        let guest_pid = loop {
            match read_line(
                &mut stderr,
                deadline.saturating_duration_since(Instant::now()),
            ) {
                Ok(Some(line)) => {
                    if let Some((_, pid)) = line.rsplit_once("guest pid ") {
                        break pid.trim().parse::<u32>().ok();
                    }
                    said.push_str(&line);
                    said.push('\n');
                }
                Ok(None) => break None,
                Err(_) => {
                    let waits = self.where_waiting(supervisor.id());
                    let _ = supervisor.kill();
                    let _ = wait_child(&mut supervisor, EXIT_TIMEOUT);
                    self.report.cli_timeouts += 1;
                    self.report.details.push(format!(
                        "op {}: vmlock run of vm{slot} on {disks:?} did not answer within {START_TIMEOUT:?}; it said: {said}; {waits}",
                        self.report.ops
                    ));
                    return Ok(Started::TimedOut);
                }
            }
        };
        let Some(guest_pid) = guest_pid else {
            if wait_child(&mut supervisor, EXIT_TIMEOUT).is_none() {
                let _ = supervisor.kill();
                let _ = wait_child(&mut supervisor, EXIT_TIMEOUT);
                self.report.cli_timeouts += 1;
            }
            self.log(&format!("refused: {}", said.trim()));
            return Ok(Started::Refused);
        };
        let guest = ProcessHandle::open(guest_pid, None).ok();
        self.log(&format!(
            "guest {id} (vm{slot}) started on {disks:?}: supervisor {}, guest pid {guest_pid}",
            supervisor.id()
        ));
        let said = Arc::new(Mutex::new(said));
        drain(stderr, Arc::clone(&said));
        Ok(Started::Yes(Box::new(Live {
            id,
            slot,
            host,
            fenced_at: None,
            supervisor,
            guest,
            guest_pid,
            disks: disks.to_vec(),
            generation: 0,
            writing: incoming.is_none(),
            signalled: false,
            said,
        })))
    }

    /// A guest the campaign ended or saw end: waits (bounded) for its supervisor and its guest,
    /// and counts it if the campaign did not end it.
    fn finish(&mut self, mut l: Live) {
        // A process waiting in the hung storage, or stopped, cannot be reaped: free it first.
        if self.holds_hung(&l) {
            self.resume_storage();
        }
        if self.stopped.as_ref().is_some_and(|s| s.guest_id == l.id) {
            self.continue_supervisor();
        }
        self.log(&format!(
            "guest {} ends (ended by the campaign: {})",
            l.id, l.signalled
        ));
        if wait_child(&mut l.supervisor, EXIT_TIMEOUT).is_none() {
            self.report.details.push(format!(
                "op {}: supervisor of guest {} still running {EXIT_TIMEOUT:?} after its end began; SIGKILLed",
                self.report.ops, l.id
            ));
            let _ = l.supervisor.kill();
            let _ = wait_child(&mut l.supervisor, EXIT_TIMEOUT);
        }
        if let Some(h) = &l.guest {
            if !h.wait_exit(Some(EXIT_TIMEOUT)) {
                self.report.details.push(format!(
                    "op {}: guest {} (pid {}) outlived its supervisor by {EXIT_TIMEOUT:?}; SIGKILLed",
                    self.report.ops, l.id, l.guest_pid
                ));
                let _ = h.signal(Signal::KILL);
                h.wait_exit(Some(EXIT_TIMEOUT));
            }
        }
        if let (false, Some(at)) = (l.signalled, l.fenced_at) {
            // Its host's sanlock daemon was killed: the lock service's failure path ended it.
            self.report.fenced_by_lock_service += 1;
            self.log(&format!(
                "guest {} ended by the lock-failure path, {:?} after its host's daemon died",
                l.id,
                at.elapsed()
            ));
        } else if !l.signalled {
            self.report.killed_by_vmlock += 1;
            let said = l.said.lock().map(|s| s.clone()).unwrap_or_default();
            self.report.details.push(format!(
                "op {}: guest {} (vm{}, disks {:?}, pid {}) ended without the campaign ending it; its log: {:?}; its supervisor said: {}",
                self.report.ops,
                l.id,
                l.slot,
                l.disks,
                l.guest_pid,
                std::fs::read_to_string(log_path(self.dir.path(), l.id)).unwrap_or_default(),
                said.trim()
            ));
        }
    }

    /// Takes every guest that ended on its own out of the live set.
    fn reap(&mut self) {
        let mut i = 0;
        while i < self.live.len() {
            let l = &mut self.live[i];
            let sup_gone = matches!(l.supervisor.try_wait(), Ok(Some(_)));
            if sup_gone || l.guest_gone() {
                let l = self.live.swap_remove(i);
                self.finish(l);
            } else {
                i += 1;
            }
        }
    }

    fn stop(&mut self, i: usize) {
        let mut l = self.live.swap_remove(i);
        l.signalled = true;
        l.terminate_supervisor();
        self.finish(l);
    }

    fn stop_all(&mut self) {
        while !self.live.is_empty() {
            self.stop(0);
        }
    }

    /// Tells guest `i` its disks and waits (bounded) until it applied them; false if it did not.
    fn plug(&mut self, i: usize) -> anyhow::Result<bool> {
        self.live[i].generation += 1;
        let l = &self.live[i];
        let mut text = format!("{}\nwrite {}\n", l.generation, u8::from(l.writing));
        for d in &l.disks {
            text.push_str(&format!("{}\n", self.disk_path(*d).display()));
        }
        let (id, generation) = (l.id, l.generation);
        write_atomic(&ctl_path(self.dir.path(), id), &text).context("writing a guest's ctl")?;
        let deadline = Instant::now() + ACK_TIMEOUT;
        loop {
            let acked = std::fs::read_to_string(ack_path(self.dir.path(), id))
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok())
                .is_some_and(|g| g >= generation);
            if acked {
                return Ok(true);
            }
            if self.live[i].guest_gone() || Instant::now() >= deadline {
                return Ok(false);
            }
            // Bounded poll (deadline above): the guest's state is read from its files.
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Hotplugs a random disk (not on hung storage) into guest `i`.
    fn attach(&mut self, i: usize) -> anyhow::Result<()> {
        let absent = self.absent_disks(i);
        let Some(&d) = self.rng.pick(&absent) else {
            return Ok(());
        };
        let uuid = self.uuids[self.live[i].slot].clone();
        self.log(&format!("attach disk {d} to guest {}", self.live[i].id));
        let mut cmd = self.vmlock_on(self.live[i].host);
        cmd.args(["attach-disk", "--uuid", &uuid, "--disk"])
            .arg(&self.disks[d]);
        let answer = self.cli(cmd, "attach-disk")?;
        self.log(&format!("attach-disk: {answer:?}"));
        match answer {
            Cli::Ok => {
                self.report.attached += 1;
                self.live[i].disks.push(d);
                if !self.plug(i)? && !self.live[i].guest_gone() {
                    self.report.details.push(format!(
                        "op {}: guest {} did not plug disk {d} in within {ACK_TIMEOUT:?}",
                        self.report.ops, self.live[i].id
                    ));
                }
            }
            Cli::Failed(_) => self.report.attach_refused += 1,
            Cli::TimedOut => {}
        }
        Ok(())
    }

    /// SIGKILLs guest `i`'s supervisor 0–20 ms after a `vmlock attach-disk` for its VM started.
    fn kill_supervisor_mid_hotplug(&mut self, i: usize) -> anyhow::Result<()> {
        let absent = self.absent_disks(i);
        let d = self.rng.pick(&absent).copied();
        let delay = Duration::from_micros(self.rng.range(0, 20_000));
        self.log(&format!(
            "SIGKILL supervisor of guest {} {delay:?} into a hotplug of disk {d:?}",
            self.live[i].id
        ));
        let mut attach = match d {
            Some(d) => {
                let uuid = self.uuids[self.live[i].slot].clone();
                let mut cmd = self.vmlock_on(self.live[i].host);
                cmd.args(["attach-disk", "--uuid", &uuid, "--disk"])
                    .arg(&self.disks[d])
                    .stderr(Stdio::null());
                Some(cmd.spawn().context("spawning vmlock attach-disk")?)
            }
            None => None,
        };
        // Deliberate: the supervisor is killed a random time into the hotplug.
        std::thread::sleep(delay);
        let mut l = self.live.swap_remove(i);
        l.signalled = true;
        let _ = l.supervisor.kill();
        if let Some(child) = &mut attach {
            if wait_child(child, CLI_TIMEOUT).is_none() {
                let _ = child.kill();
                let _ = wait_child(child, EXIT_TIMEOUT);
                self.report.cli_timeouts += 1;
                self.report.details.push(format!(
                    "op {}: attach-disk racing a supervisor's SIGKILL did not end within {CLI_TIMEOUT:?}",
                    self.report.ops
                ));
            }
        }
        self.finish(l);
        Ok(())
    }

    /// Unplugs a random disk of guest `i`.
    fn detach(&mut self, i: usize) -> anyhow::Result<()> {
        let Some(&d) = self.rng.pick(&self.live[i].disks) else {
            return Ok(());
        };
        self.log(&format!("detach disk {d} from guest {}", self.live[i].id));
        self.live[i].disks.retain(|x| *x != d);
        if !self.plug(i)? {
            if !self.live[i].guest_gone() {
                // It may still write the disk: keep it and do not release it.
                self.live[i].disks.push(d);
                self.report.details.push(format!(
                    "op {}: guest {} did not unplug disk {d} within {ACK_TIMEOUT:?}",
                    self.report.ops, self.live[i].id
                ));
            }
            return Ok(());
        }
        let uuid = self.uuids[self.live[i].slot].clone();
        let mut cmd = self.vmlock_on(self.live[i].host);
        cmd.args(["detach-disk", "--uuid", &uuid, "--disk"])
            .arg(&self.disks[d]);
        let answer = self.cli(cmd, "detach-disk")?;
        self.log(&format!("detach-disk: {answer:?}"));
        match answer {
            Cli::Ok => self.report.detached += 1,
            Cli::Failed(said) if said.contains("is not locked by VM") => {
                // vmlock's table says the VM does not hold a disk it attached and never
                // released: the table is out of step with the kernel (and with the holder).
                self.report.detach_failed += 1;
                self.report.detach_unknown += 1;
                let locked = path_locked(&self.disks[d]).unwrap_or(false);
                let kept =
                    locked_by_process(self.live[i].supervisor.id()).contains(&self.disk_ids[d]);
                self.report.details.push(format!(
                    "op {} (seed {}): detach-disk of disk {d} from guest {} refused as not locked by its VM; kernel lock held: {locked}, kept by its supervisor: {kept}",
                    self.report.ops, self.opts.seed, self.live[i].id
                ));
            }
            Cli::Failed(_) | Cli::TimedOut => self.report.detach_failed += 1,
        }
        Ok(())
    }

    /// Runs a `vmlock` command, bounded.
    fn cli(&mut self, mut cmd: Command, what: &str) -> anyhow::Result<Cli> {
        let mut child = cmd
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning vmlock {what}"))?;
        match wait_child(&mut child, CLI_TIMEOUT) {
            Some(status) if status.success() => Ok(Cli::Ok),
            Some(_) => {
                // It has exited: what it said is in the pipe (read with a bound all the same).
                let said = stderr_said(&mut child);
                self.log(&format!("vmlock {what} failed: {}", said.trim()));
                Ok(Cli::Failed(said))
            }
            None => {
                let waits = self.where_waiting(child.id());
                let _ = child.kill();
                let _ = wait_child(&mut child, EXIT_TIMEOUT);
                self.report.cli_timeouts += 1;
                self.report.details.push(format!(
                    "op {}: vmlock {what} did not end within {CLI_TIMEOUT:?}; {waits}",
                    self.report.ops
                ));
                Ok(Cli::TimedOut)
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Stuck clients: hung storage, a stopped supervisor

    /// Whether guest `l` holds a disk on the storage while it hangs.
    fn holds_hung(&self, l: &Live) -> bool {
        self.hung.is_some() && l.disks.iter().any(|d| self.hung_disks.contains(d))
    }

    /// The live guests that are not stuck (on hung storage, or under a stopped supervisor): the
    /// ones operations may pick.
    fn eligible(&self) -> Vec<usize> {
        (0..self.live.len())
            .filter(|i| {
                let l = &self.live[*i];
                !self.holds_hung(l) && self.stopped.as_ref().map_or(true, |s| s.guest_id != l.id)
            })
            .collect()
    }

    /// Whether the hotplug pushed to the stopped supervisor is of a disk on the FUSE storage.
    fn hotplug_waits_for_hung_disk(&self) -> bool {
        self.stopped
            .as_ref()
            .and_then(|s| s.hotplug.as_ref())
            .is_some_and(|(_, d)| self.hung_disks.contains(d))
    }

    /// Whether disk `d` may be named by a new operation now (not on hung storage).
    fn usable_disk(&self, d: usize) -> bool {
        self.hung.is_none() || !self.hung_disks.contains(&d)
    }

    /// The disks guest `i` does not have that a hotplug may name now.
    fn absent_disks(&self, i: usize) -> Vec<usize> {
        (0..self.disks.len())
            .filter(|d| !self.live[i].disks.contains(d) && self.usable_disk(*d))
            .collect()
    }

    /// Moves the last 1–2 disks onto a [`HangFs`] mounted in the campaign's directory (the
    /// caller is in the campaign's private mount namespace).
    fn mount_hang_fs(&mut self) -> std::io::Result<()> {
        let n = if self.disks.len() >= 4 { 2 } else { 1 };
        let first = self.disks.len() - n;
        let names: Vec<String> = (first..self.disks.len())
            .map(|i| format!("disk{i}.img"))
            .collect();
        let mount = self.dir.path().join("hung");
        std::fs::create_dir_all(&mount)?;
        let files: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), DISK_SIZE)).collect();
        let fs = HangFs::mount_with(&mount, &files)?;
        let ids = names
            .iter()
            .map(|n| FileId::of(&fs.file(n)))
            .collect::<std::io::Result<Vec<_>>>()?;
        for ((i, name), id) in (first..self.disks.len()).zip(&names).zip(ids) {
            let _ = std::fs::remove_file(&self.disks[i]);
            self.disks[i] = fs.file(name);
            self.disk_ids[i] = id;
            self.hung_disks.push(i);
        }
        self.hang = Some(fs);
        Ok(())
    }

    /// Hangs the storage for the next 1–10 operations (and at least [`MIN_HANG`]).
    fn hang_storage(&mut self) {
        let keep = self.rng.range(1, 10);
        let Some(fs) = &self.hang else {
            return;
        };
        fs.hang();
        self.hung = Some(Hung {
            since: Instant::now(),
            until: self.report.ops + keep,
        });
        let on_it: Vec<u64> = self
            .live
            .iter()
            .filter(|l| self.holds_hung(l))
            .map(|l| l.id)
            .collect();
        self.log(&format!(
            "storage of disks {:?} hangs for {keep} operations (at least {MIN_HANG:?}); guests on it: {on_it:?}",
            self.hung_disks
        ));
    }

    /// Cuts the network between vmlockd and etcd for 0.3–3 s; a timer thread heals it.
    fn partition_etcd(&mut self) {
        let Some(net) = self.opts.etcd_net.clone() else {
            return;
        };
        let cut_for = Duration::from_millis(self.rng.range(300, 3_000));
        self.log(&format!("etcd partition for {cut_for:?}"));
        net.cut();
        self.report.partitions.push(cut_for);
        self.partition_affects_until = Some(Instant::now() + cut_for + PARTITION_RECOVERY);
        self.partition = Some(std::thread::spawn(move || {
            // Deliberate: the partition lasts this long, whatever the campaign does meanwhile.
            std::thread::sleep(cut_for);
            net.restore();
        }));
    }

    /// Waits for the current partition's heal (its timer), if one is in force.
    fn end_partition(&mut self) {
        if let Some(healer) = self.partition.take() {
            let _ = healer.join();
            self.log("etcd partition healed");
        }
    }

    /// Ends a hang (if one is in force): resumes the storage and waits (bounded) until every
    /// guest on it has run a round again.
    fn resume_storage(&mut self) {
        if self.hung.is_none() {
            return;
        }
        let daemon_waiting = self.daemon_waits_in_fuse();
        let on_it: Vec<u64> = self
            .live
            .iter()
            .filter(|l| self.holds_hung(l) && !l.guest_gone())
            .map(|l| l.id)
            .collect();
        let Some(h) = self.hung.take() else {
            return;
        };
        if let Some(fs) = &self.hang {
            fs.resume();
        }
        let resumed = Instant::now();
        self.report.hang_durations.push(h.since.elapsed());
        if daemon_waiting {
            self.report.hangs_with_daemon_waiting += 1;
        }
        self.log(&format!(
            "storage resumed after {:?}; guests on it: {on_it:?}; a vmlockd thread waited in it: {daemon_waiting}",
            h.since.elapsed()
        ));
        if on_it.is_empty() {
            return;
        }
        self.report.hangs_with_guest += 1;
        let mut all = true;
        for id in on_it {
            let Some(i) = self.live.iter().position(|l| l.id == id) else {
                continue;
            };
            // A control write with the same disks: acked once the guest's round got through.
            if !self.plug(i).unwrap_or(false) && !self.live[i].guest_gone() {
                all = false;
                self.report.hang_recovery_failures += 1;
                self.report.details.push(format!(
                    "op {}: guest {id} did not run a round within {ACK_TIMEOUT:?} of its storage's resume",
                    self.report.ops
                ));
            }
        }
        if all {
            self.report.hang_recovery.push(resumed.elapsed());
        }
    }

    /// Where the threads of process `pid` (a `vmlock` that did not answer) and of vmlockd wait
    /// now: each thread's name, `wchan` and innermost kernel frames, for the report.
    fn where_waiting(&self, pid: u32) -> String {
        let threads = |pid: u32| -> String {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                return "gone".into();
            };
            let mut out = Vec::new();
            for t in tasks.flatten() {
                let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
                let stack: Vec<String> = read("stack")
                    .lines()
                    .take(4)
                    .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
                    .collect();
                out.push(format!(
                    "{}[{}] {} {}",
                    read("comm").trim(),
                    t.file_name().to_string_lossy(),
                    read("wchan").trim(),
                    stack.join("<")
                ));
            }
            out.join("; ")
        };
        let daemon = self
            .daemon()
            .map_or_else(|| "none".to_owned(), |d| threads(d.pid));
        format!("its threads wait in: {}; vmlockd's: {daemon}", threads(pid))
    }

    /// Whether a thread of vmlockd sleeps in a FUSE request now (`/proc/PID/task/*/wchan`).
    fn daemon_waits_in_fuse(&self) -> bool {
        let Some(daemon) = self.daemon() else {
            return false;
        };
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", daemon.pid)) else {
            return false;
        };
        tasks.flatten().any(|t| {
            std::fs::read_to_string(t.path().join("wchan"))
                .is_ok_and(|w| w.contains("fuse") || w.contains("request_wait_answer"))
        })
    }

    /// SIGSTOPs guest `i`'s supervisor for the next 1–10 operations and starts a hotplug for its
    /// VM meanwhile (the daemon pushes the new description to the stopped holder and waits for
    /// an ack that does not come).
    fn stop_supervisor(&mut self, i: usize) -> anyhow::Result<()> {
        let keep = self.rng.range(1, 10);
        let at_least = (self.rng.below(3) == 0).then_some(LONG_STOP);
        let absent = self.absent_disks(i);
        let d = self.rng.pick(&absent).copied();
        let (id, pid, uuid) = (
            self.live[i].id,
            self.live[i].supervisor.id(),
            self.uuids[self.live[i].slot].clone(),
        );
        self.log(&format!(
            "SIGSTOP supervisor {pid} of guest {id} for {keep} operations (at least {at_least:?}); hotplug of disk {d:?} meanwhile"
        ));
        if let Some(p) = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(p, Signal::STOP);
        }
        let hotplug = match d {
            Some(d) => {
                let mut cmd = self.vmlock();
                cmd.args(["attach-disk", "--uuid", &uuid, "--disk"])
                    .arg(&self.disks[d])
                    .stderr(Stdio::piped());
                Some((cmd.spawn().context("spawning vmlock attach-disk")?, d))
            }
            None => None,
        };
        self.stopped = Some(Stopped {
            guest_id: id,
            pid,
            since: Instant::now(),
            until: self.report.ops + keep,
            at_least,
            hotplug,
        });
        Ok(())
    }

    /// Ends a stop (if one is in force): SIGCONT, then the hotplug started meanwhile is awaited
    /// (bounded) and, if granted, plugged into the guest.
    fn continue_supervisor(&mut self) {
        let Some(s) = self.stopped.take() else {
            return;
        };
        if let Some(p) = i32::try_from(s.pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(p, Signal::CONT);
        }
        let continued = Instant::now();
        self.report.stop_durations.push(s.since.elapsed());
        self.log(&format!(
            "SIGCONT supervisor {} of guest {} after {:?}",
            s.pid,
            s.guest_id,
            s.since.elapsed()
        ));
        let Some((mut child, d)) = s.hotplug else {
            return;
        };
        let pending = matches!(child.try_wait(), Ok(None));
        let Some(status) = wait_child(&mut child, CLI_TIMEOUT) else {
            let _ = child.kill();
            let _ = wait_child(&mut child, EXIT_TIMEOUT);
            self.report.cli_timeouts += 1;
            self.report.details.push(format!(
                "op {}: attach-disk pushed to a stopped supervisor did not end within {CLI_TIMEOUT:?} of SIGCONT",
                self.report.ops
            ));
            return;
        };
        if pending {
            self.report.stop_recovery.push(continued.elapsed());
        }
        if !status.success() {
            let mut said = String::new();
            if let Some(mut err) = child.stderr.take() {
                while let Ok(Some(line)) = read_line(&mut err, Duration::from_secs(1)) {
                    said.push_str(&line);
                    said.push(' ');
                }
            }
            self.report.stuck_hotplugs.1 += 1;
            self.log(&format!(
                "attach-disk of disk {d} pushed to the stopped supervisor: refused: {}",
                said.trim()
            ));
            // Refused: the supervisor, reading the push it missed, must not keep the disk's
            // lock (bounded wait: it drops it as it catches up).
            let deadline = Instant::now() + DROP_TIMEOUT;
            while locked_by_process(s.pid).contains(&self.disk_ids[d]) {
                if Instant::now() >= deadline {
                    self.report.locks_leaked += 1;
                    self.report.details.push(format!(
                        "op {} (seed {}): a hotplug of disk {d} refused while the supervisor of guest {} was stopped left the disk locked by that supervisor",
                        self.report.ops, self.opts.seed, s.guest_id
                    ));
                    break;
                }
                // Bounded poll (deadline above): the supervisor's catching up has no event.
                std::thread::sleep(Duration::from_millis(10));
            }
            return;
        }
        self.report.stuck_hotplugs.0 += 1;
        self.log(&format!(
            "attach-disk of disk {d} pushed to the stopped supervisor: granted"
        ));
        let Some(i) = self.live.iter().position(|l| l.id == s.guest_id) else {
            return;
        };
        self.report.attached += 1;
        self.live[i].disks.push(d);
        if !self.plug(i).unwrap_or(false) && !self.live[i].guest_gone() {
            self.report.details.push(format!(
                "op {}: guest {} did not plug disk {d} in within {ACK_TIMEOUT:?}",
                self.report.ops, s.guest_id
            ));
        }
    }

    /// What is stuck now, if anything.
    fn stuck_now(&self) -> Option<String> {
        let mut what = Vec::new();
        if self.hung.is_some() {
            what.push(format!("storage of disks {:?} hung", self.hung_disks));
        }
        if let Some(s) = &self.stopped {
            what.push(format!("supervisor of guest {} stopped", s.guest_id));
        }
        (!what.is_empty()).then(|| what.join(", "))
    }

    /// Probes the daemon directly and times it, on fresh connections: `Status` (connect, hello,
    /// status); a holder of the campaign's own registering for a VM of its own (connect, hello,
    /// hold); that VM acquiring the probe disk (its descriptions come in the reply) and releasing
    /// it. While something is stuck, each of the three over [`STALL`] is a stall.
    fn probe_daemon(&mut self) {
        let runtime = match RuntimeDir::resolve(Some(&self.run_dir())) {
            Ok(r) => r,
            Err(e) => {
                self.report.probe_failures += 1;
                self.report.details.push(format!("probe: {e}"));
                return;
            }
        };
        let stuck = self.stuck_now();
        let sabotage = match (self.opts.sabotage_stall, &stuck) {
            (true, Some(_)) => self.daemon().map(|daemon| {
                let _ = daemon.signal(Signal::STOP);
                std::thread::spawn(move || {
                    // Deliberate (sabotage): the daemon stays stopped this long under the probe.
                    std::thread::sleep(Duration::from_millis(150));
                    let _ = daemon.signal(Signal::CONT);
                })
            }),
            _ => None,
        };
        let mut timer = ProbeTimer::start();
        let conn = Connection::connect(&runtime).and_then(|mut c| {
            c.call(&Request::Status, &[])?;
            Ok(c)
        });
        let status = timer.lap();
        if let Some(sabotage) = sabotage {
            let _ = sabotage.join();
        }
        let mut timings = Vec::new();
        match conn {
            Ok(conn) => {
                timings.push(("status", status));
                if let Err(e) = self.probe_round_trip(&runtime, conn, &mut timings) {
                    self.report.probe_failures += 1;
                    self.report
                        .details
                        .push(format!("op {}: probe: {e}", self.report.ops));
                }
            }
            Err(e) => {
                self.report.probe_failures += 1;
                self.report.details.push(format!(
                    "op {}: status probe: {e} (after {:?})",
                    self.report.ops, status.0
                ));
            }
        }
        // While vmlockd is cut off from etcd, an acquire waits for etcd (up to the configured
        // request timeout) by design: that wait is the partition's, not a stall.
        let partitioned = self
            .partition_affects_until
            .is_some_and(|t| Instant::now() < t);
        for (what, (took, cpu_wait)) in timings {
            if partitioned && what != "status" && what != "hold" {
                self.report.probes_partitioned.push(took);
                continue;
            }
            let probes = if stuck.is_some() {
                &mut self.report.probes_stuck
            } else {
                &mut self.report.probes_free
            };
            match what {
                "status" => probes.status.push(took),
                "hold" => probes.hold.push(took),
                "refused" => probes.foreign.push(took),
                _ => probes.round_trip.push(took),
            }
            if took <= STALL {
                continue;
            }
            let line = format!(
                "{what} probe took {took:?} (this thread waited {cpu_wait:?} of it for a CPU)"
            );
            match &stuck {
                Some(stuck) => {
                    self.report.stalls += 1;
                    self.report.details.push(format!(
                        "op {} (seed {}): {line} while {stuck}",
                        self.report.ops, self.opts.seed
                    ));
                    self.log(&format!("stall: {line} while {stuck}"));
                }
                None => {
                    self.report.slow_free_probes += 1;
                    self.log(&format!("{line} with nothing stuck"));
                }
            }
        }
    }

    /// The rest of a probe, on `conn` (hello and status done): a new VM (a `sleep` of the
    /// campaign's own as its guest, so that this process, its parent, may hold for it) registers
    /// its holder, acquires the probe disk and releases it; then its guest is killed, so the
    /// daemon forgets the VM. Only the requests are timed. `Err` when the daemon gave no answer;
    /// a refusal is an answer (logged).
    fn probe_round_trip(
        &mut self,
        runtime: &RuntimeDir,
        mut conn: Connection,
        timings: &mut Vec<(&'static str, (Duration, Duration))>,
    ) -> Result<(), String> {
        let mut guest = Command::new("sleep")
            .arg("infinity")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting the probe's guest: {e}"))?;
        let uuid = uuid::Uuid::new_v4().to_string();
        let vm = VmIdentity {
            uuid: uuid.clone(),
            name: "stall-probe".into(),
            id: 1,
            pid: guest.id(),
        };
        let disk = Resource::disk(&self.probe_disk, DiskMode::Exclusive)
            .map_err(|e| format!("probe disk: {e}"))?;
        let flags = AcquireFlags {
            reply_with_fds: true,
            ..AcquireFlags::default()
        };
        let answer = |e: vmlock::Error| match e {
            vmlock::Error::ServiceUnavailable { .. } => Err(e.to_string()),
            refused => Ok(Some(refused.to_string())),
        };
        let mut timer = ProbeTimer::start();
        let result = match HoldConnection::register(runtime, vm, None) {
            Err(e) => {
                timings.push(("hold", timer.lap()));
                answer(e)
            }
            Ok(mut holder) => {
                timings.push(("hold", timer.lap()));
                let acquire = Request::Acquire {
                    uuid: uuid.clone(),
                    resources: vec![disk.clone()],
                    flags: flags.clone(),
                };
                let release = Request::ReleaseKept {
                    uuid: uuid.clone(),
                    resources: vec![disk],
                };
                let mut result = match conn.call_with_fds(&acquire, &[]) {
                    Ok((Reply::Kept { locks, .. }, fds)) => {
                        let kept = holder.keep_local(locks, fds).map_err(|e| e.to_string());
                        holder.acquired(&flags);
                        kept.and_then(|()| match conn.call(&release, &[]) {
                            Ok(Reply::Held(held)) => {
                                let released: Vec<Resource> =
                                    held.into_iter().map(|h| h.resource).collect();
                                holder.forget_local(&released);
                                Ok(None)
                            }
                            Ok(other) => Err(format!("release answered {other:?}")),
                            Err(e) => answer(e),
                        })
                    }
                    Ok((other, _)) => Err(format!("acquire answered {other:?}")),
                    Err(e) => answer(e),
                };
                timings.push(("acquire+release", timer.lap()));
                if let (Ok(None), Some((path, _))) = (&result, &self.foreign) {
                    let refused = Request::Acquire {
                        uuid,
                        resources: vec![Resource::disk(path, DiskMode::Exclusive)
                            .map_err(|e| format!("foreign disk: {e}"))?],
                        flags: flags.clone(),
                    };
                    // Bounded: a refusal that does not come within FOREIGN_BOUND is a stall
                    // of that long already (the connection is not used again).
                    let _ = nix::sys::socket::setsockopt(
                        &conn.fd(),
                        nix::sys::socket::sockopt::ReceiveTimeout,
                        &nix::sys::time::TimeVal::new(FOREIGN_BOUND.as_secs() as i64, 0),
                    );
                    timer.lap();
                    let answer_to_refused = conn.call_with_fds(&refused, &[]);
                    let lap = timer.lap();
                    timings.push(("refused", lap));
                    result = match answer_to_refused {
                        Ok((other, _)) => Err(format!(
                            "an acquire of a disk locked outside vmlock answered {other:?}"
                        )),
                        Err(vmlock::Error::Busy { .. }) => Ok(None),
                        // Counted as a stall by its time; not also as a probe without answer.
                        Err(e) if lap.0 >= FOREIGN_BOUND => {
                            Ok(Some(format!("no refusal within {FOREIGN_BOUND:?}: {e}")))
                        }
                        Err(e) => answer(e),
                    };
                }
                drop(holder);
                result
            }
        };
        let _ = guest.kill();
        let _ = wait_child(&mut guest, EXIT_TIMEOUT);
        match result {
            Ok(Some(refused)) => {
                self.log(&format!("probe: refused: {refused}"));
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Live migration on the same host

    /// Migrates guest `i` to a new supervisor and guest ([`Op::Migrate`]), the way QEMU and a VM
    /// manager do: prepare, the destination started `--incoming`, the source paused, then finish
    /// (or cancel), with a [`MigrationFault`] now and then.
    fn migrate(&mut self, i: usize) -> anyhow::Result<()> {
        let fault = match self.rng.below(8) {
            0 => Some(match self.rng.below(3) {
                0 => MigrationFault::KillDaemonAfterPrepare,
                1 => MigrationFault::KillDaemonAfterDestination,
                _ => MigrationFault::KillDaemonAfterPause,
            }),
            1 => Some(MigrationFault::KillDestination),
            _ => None,
        };
        let cancel = self.rng.below(4) == 0;
        let (src_id, slot, host, disks) = {
            let l = &self.live[i];
            (l.id, l.slot, l.host, l.disks.clone())
        };
        let uuid = self.uuids[slot].clone();
        self.log(&format!(
            "migrate guest {src_id} (vm{slot}) on {disks:?}: {}, fault {fault:?}",
            if cancel { "cancel" } else { "finish" }
        ));
        if let Some(f) = fault {
            *self
                .report
                .migration_faults
                .entry(migration_fault_name(f))
                .or_default() += 1;
        }
        // 1. prepare on the source.
        let mut cmd = self.vmlock_on(host);
        cmd.args(["migrate-prepare", "--uuid", &uuid]);
        let (answer, state) = self.cli_stdout(cmd, "migrate-prepare")?;
        let state = state.trim().to_owned();
        if !matches!(answer, Cli::Ok) || state.is_empty() {
            let why = format!("migrate-prepare: {answer:?}");
            return self.abort_migration(i, None, None, &why);
        }
        if fault == Some(MigrationFault::KillDaemonAfterPrepare) {
            self.log("SIGKILL vmlockd after migrate-prepare");
            self.kill_daemon();
        }
        // 2. the destination, writing nothing yet.
        let dst = match self.start_as(slot, host, &disks, Some(&state))? {
            Started::Yes(l) => *l,
            Started::Refused => {
                return self.abort_migration(i, None, fault, "the destination was refused");
            }
            Started::TimedOut => {
                return self.abort_migration(i, None, fault, "the destination timed out");
            }
        };
        self.log(&format!(
            "destination guest {} of guest {src_id} runs",
            dst.id
        ));
        if fault == Some(MigrationFault::KillDaemonAfterDestination) {
            self.log("SIGKILL vmlockd with the destination running");
            self.kill_daemon();
        }
        // 3. the source stops writing (acked: no write after this).
        self.live[i].writing = false;
        if !self.plug(i)? {
            return self.abort_migration(i, Some(dst), fault, "the source did not pause");
        }
        if fault == Some(MigrationFault::KillDaemonAfterPause) {
            self.log("SIGKILL vmlockd with the source paused");
            self.kill_daemon();
        }
        if fault == Some(MigrationFault::KillDestination) {
            let mut dst = dst;
            self.log(&format!(
                "SIGKILL destination supervisor of guest {}",
                dst.id
            ));
            dst.signalled = true;
            let _ = dst.supervisor.kill();
            self.finish(dst);
            return self.abort_migration(i, None, fault, "the destination was killed");
        }
        if cancel {
            let mut cmd = self.vmlock_on(host);
            cmd.args(["migrate-cancel", "--uuid", &uuid]);
            let answer = self.cli(cmd, "migrate-cancel")?;
            self.log(&format!("migrate-cancel: {answer:?}"));
            if !matches!(answer, Cli::Ok) {
                let why = format!("migrate-cancel: {answer:?}");
                return self.abort_migration(i, Some(dst), fault, &why);
            }
            self.end_destination(dst);
            if self.resume_source(i)? {
                self.report.migrations_cancelled += 1;
            }
            return Ok(());
        }
        // 4. finish: the destination owns the VM and writes, the source is ended.
        let mut cmd = self.vmlock_on(host);
        cmd.args(["migrate-finish", "--uuid", &uuid]);
        let answer = self.cli(cmd, "migrate-finish")?;
        self.log(&format!("migrate-finish: {answer:?}"));
        if !matches!(answer, Cli::Ok) {
            let why = format!("migrate-finish: {answer:?}");
            return self.abort_migration(i, Some(dst), fault, &why);
        }
        let dst_id = dst.id;
        self.live.push(dst);
        let d = self.live.len() - 1;
        self.live[d].writing = true;
        let resumed = self.plug(d)?;
        if !resumed && !self.live[d].guest_gone() {
            self.report.details.push(format!(
                "op {}: migration destination guest {dst_id} did not start writing within {ACK_TIMEOUT:?}",
                self.report.ops
            ));
        }
        // The source lingers a few rounds while the destination writes (as a source QEMU runs
        // until it is told to quit): each ack is a round of the guest, and a destination's
        // rounds after its first write re-read its mark, so a source that still wrote would be
        // seen (by either guest) as a double writer.
        for _ in 0..MIGRATION_OVERLAP_ROUNDS {
            if !self.plug(d)? || !self.plug(i)? {
                break;
            }
        }
        self.log(&format!("stop migration source guest {src_id}"));
        self.stop(i);
        self.report.migrations_finished += 1;
        Ok(())
    }

    /// A migration of guest `i` that did not go through: `migrate-cancel` on the source, the
    /// destination (if any) ended, the source writing again. `fault`: the one injected, if any.
    fn abort_migration(
        &mut self,
        i: usize,
        dst: Option<Live>,
        fault: Option<MigrationFault>,
        why: &str,
    ) -> anyhow::Result<()> {
        self.report.migrations_failed += 1;
        self.log(&format!(
            "migration of guest {} failed: {why}",
            self.live[i].id
        ));
        let expected = fault.is_some_and(|f| {
            f != MigrationFault::KillDestination || why == "the destination was killed"
        });
        if !expected {
            self.report.migrations_failed_unfaulted += 1;
            self.report.details.push(format!(
                "op {} (seed {}): migration of guest {} failed with no fault in it: {why}",
                self.report.ops, self.opts.seed, self.live[i].id
            ));
        }
        let uuid = self.uuids[self.live[i].slot].clone();
        let mut cmd = self.vmlock_on(self.live[i].host);
        cmd.args(["migrate-cancel", "--uuid", &uuid]);
        let answer = self.cli(cmd, "migrate-cancel")?;
        self.log(&format!("migrate-cancel: {answer:?}"));
        if let Some(mut dst) = dst {
            // After a daemon kill vmlock may end the destination itself: expected then.
            if fault.is_some() {
                dst.signalled = true;
            }
            self.end_destination(dst);
        }
        self.resume_source(i)?;
        Ok(())
    }

    /// Ends a migration destination that does not take over (SIGTERM to its supervisor).
    fn end_destination(&mut self, mut dst: Live) {
        self.log(&format!("end migration destination guest {}", dst.id));
        if !dst.guest_gone() {
            dst.signalled = true;
        }
        dst.terminate_supervisor();
        self.finish(dst);
    }

    /// The source of a migration that did not go through writes again; whether it does.
    fn resume_source(&mut self, i: usize) -> anyhow::Result<bool> {
        self.live[i].writing = true;
        if self.plug(i)? {
            return Ok(true);
        }
        self.report.migration_sources_lost += 1;
        self.report.details.push(format!(
            "op {}: migration source guest {} did not write again (gone: {})",
            self.report.ops,
            self.live[i].id,
            self.live[i].guest_gone()
        ));
        Ok(false)
    }

    /// [`Campaign::cli`], also returning what the command printed on stdout.
    fn cli_stdout(&mut self, mut cmd: Command, what: &str) -> anyhow::Result<(Cli, String)> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning vmlock {what}"))?;
        let status = wait_child(&mut child, CLI_TIMEOUT);
        let mut out = String::new();
        if status.is_some() {
            // It has exited: what it printed is in the pipe (read with a bound all the same).
            if let Some(mut o) = child.stdout.take() {
                while let Ok(Some(line)) = read_line(&mut o, Duration::from_secs(1)) {
                    out.push_str(&line);
                    out.push('\n');
                }
            }
        }
        let answer = match status {
            Some(s) if s.success() => Cli::Ok,
            Some(_) => {
                let said = stderr_said(&mut child);
                self.log(&format!("vmlock {what} failed: {}", said.trim()));
                Cli::Failed(said)
            }
            None => {
                let _ = child.kill();
                let _ = wait_child(&mut child, EXIT_TIMEOUT);
                self.report.cli_timeouts += 1;
                self.report.details.push(format!(
                    "op {}: vmlock {what} did not end within {CLI_TIMEOUT:?}",
                    self.report.ops
                ));
                Cli::TimedOut
            }
        };
        Ok((answer, out))
    }

    // -----------------------------------------------------------------------------------------
    // The daemon

    /// The daemon's pid, if its pid file names a live process running in our runtime directory
    /// (so a stale pid file never makes us signal a stranger).
    fn daemon(&self) -> Option<ProcessHandle> {
        let pid = vmlock_testkit::vmlockd::pid_in(&self.run_dir())?;
        let h = ProcessHandle::open(pid, None).ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let run = self.run_dir();
        let ours = String::from_utf8_lossy(&cmdline).contains(&*run.to_string_lossy());
        ours.then_some(h)
    }

    /// Makes sure a daemon runs (`vmlock status` starts one); whether one does.
    fn ensure_daemon(&mut self) -> bool {
        if self.daemon().is_some() {
            return true;
        }
        let mut cmd = self.vmlock();
        cmd.arg("status");
        let _ = self.cli(cmd, "status");
        self.daemon().is_some()
    }

    fn kill_daemon(&mut self) {
        if let Some(h) = self.daemon() {
            let _ = h.signal(Signal::KILL);
            // A dying process closes its descriptors, and the kernel flushes each one to its file
            // system: one on hung storage (a granted disk) keeps vmlockd from exiting until the
            // storage answers. So while a hang is in force it gets a short grace, then the
            // storage is resumed; otherwise the campaign would wait for its own fault.
            if self.hung.is_some() && !h.wait_exit(Some(HUNG_EXIT_GRACE)) {
                self.report.kills_waiting_for_hung_storage += 1;
                self.log("vmlockd's exit waits in the hung storage: resuming it");
                self.resume_storage();
            }
            if !h.wait_exit(Some(EXIT_TIMEOUT)) {
                self.report.details.push(format!(
                    "op {}: vmlockd (pid {}) still running {EXIT_TIMEOUT:?} after SIGKILL",
                    self.report.ops, h.pid
                ));
            }
        }
    }

    /// After a daemon kill at `since`: starts a probe guest on the probe's own disk until one
    /// starts (a successful acquire), records the time, and stops it.
    fn recover(&mut self, kind: Op, since: Instant) -> anyhow::Result<()> {
        let probe_slot = self.opts.vms;
        let probe_disk = self.disks.len();
        loop {
            match self.start(probe_slot, 0, &[probe_disk])? {
                Started::Yes(l) => {
                    self.report
                        .recovery
                        .entry(kind)
                        .or_default()
                        .push(since.elapsed());
                    self.live.push(*l);
                    let i = self.live.len() - 1;
                    self.stop(i);
                    return Ok(());
                }
                Started::Refused if since.elapsed() < RECOVERY_TIMEOUT => {
                    // Bounded retry (RECOVERY_TIMEOUT): recovery is measured by polling starts.
                    std::thread::sleep(Duration::from_millis(5));
                }
                Started::Refused | Started::TimedOut => {
                    self.report.recovery_failures += 1;
                    self.report.details.push(format!(
                        "op {}: no acquire succeeded within {RECOVERY_TIMEOUT:?} after {}",
                        self.report.ops,
                        kind.name()
                    ));
                    return Ok(());
                }
            }
        }
    }

    fn pause_daemon(&mut self) -> anyhow::Result<()> {
        if !self.ensure_daemon() {
            return Ok(());
        }
        let Some(h) = self.daemon() else {
            return Ok(());
        };
        let pause = Duration::from_millis(self.rng.range(20, 300));
        self.log(&format!("SIGSTOP vmlockd for {pause:?}"));
        let _ = h.signal(Signal::STOP);
        let mut cmd = self.vmlock();
        let asking = cmd
            .arg("status")
            .stderr(Stdio::null())
            .spawn()
            .context("spawning vmlock status");
        // Deliberate: the daemon stays stopped this long while a client waits on it.
        std::thread::sleep(pause);
        let _ = h.signal(Signal::CONT);
        let mut asking = asking?;
        if wait_child(&mut asking, CLI_TIMEOUT).is_none() {
            let _ = asking.kill();
            let _ = wait_child(&mut asking, EXIT_TIMEOUT);
            self.report.cli_timeouts += 1;
            self.report.details.push(format!(
                "op {}: vmlock status asked during a SIGSTOP did not end within {CLI_TIMEOUT:?} of SIGCONT",
                self.report.ops
            ));
        }
        Ok(())
    }

    fn state_files(&self) -> Vec<PathBuf> {
        ["state.json", "state.journal", "state.journal.1"]
            .iter()
            .map(|f| self.run_dir().join(f))
            .collect()
    }

    fn delete_state(&mut self) {
        let files = self.state_files();
        if self.rng.below(2) == 0 {
            self.log("delete state.json");
            let _ = std::fs::remove_file(&files[0]);
        } else {
            self.log("delete every state file");
            for f in &files {
                let _ = std::fs::remove_file(f);
            }
        }
    }

    fn corrupt_state(&mut self) -> anyhow::Result<()> {
        let files: Vec<PathBuf> = self
            .state_files()
            .into_iter()
            .filter(|f| std::fs::metadata(f).is_ok_and(|m| m.len() > 0))
            .collect();
        let variant = self.rng.below(4);
        let Some(f) = self.rng.pick(&files).cloned() else {
            return Ok(());
        };
        let mut data = std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
        match variant {
            0 => data.truncate(data.len() / 2),
            1 => {
                for _ in 0..8 {
                    let at = self.rng.below(data.len() as u64) as usize;
                    data[at] = self.rng.next_u64() as u8;
                }
            }
            2 => data = b"{\"garbage\": [1, 2,".to_vec(),
            _ => data.clear(),
        }
        self.log(&format!("corrupt {} (variant {variant})", f.display()));
        std::fs::write(&f, &data).with_context(|| format!("writing {}", f.display()))?;
        Ok(())
    }

    /// A malformed frame of vmlock's framing (4-byte length, JSON): oversized length, bad JSON,
    /// wrong shape, cut short, noise; with its variant.
    fn malformed_frame(&mut self) -> (u64, Vec<u8>) {
        let variant = self.rng.below(5);
        let mut noise = vec![0u8; self.rng.range(1, 64) as usize];
        for b in &mut noise {
            *b = self.rng.next_u64() as u8;
        }
        let frame = |body: &[u8]| {
            let mut v = (body.len() as u32).to_be_bytes().to_vec();
            v.extend_from_slice(body);
            v
        };
        let bytes = match variant {
            0 => u32::MAX.to_be_bytes().to_vec(),
            1 => frame(b"not json at all"),
            2 => frame(b"{\"Bogus\":{\"uuid\":42}}"),
            3 => {
                let mut v = frame(b"{\"Hello\":{\"version\":1}}");
                v.truncate(9);
                v
            }
            _ => noise,
        };
        (variant, bytes)
    }

    fn malformed(&mut self) {
        let (variant, bytes) = self.malformed_frame();
        self.log(&format!("malformed frame (variant {variant})"));
        let Ok(mut s) = UnixStream::connect(self.run_dir().join("vmlockd.sock")) else {
            return;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let _ = s.write_all(&bytes);
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf);
    }

    fn filler_path(&self) -> PathBuf {
        self.run_dir().join("filler")
    }

    /// Fills the runtime directory's file system to the last byte, until a later operation.
    fn fill_runtime_fs(&mut self) {
        let keep = self.rng.range(1, 10);
        let Ok(mut f) = std::fs::File::create(self.filler_path()) else {
            return;
        };
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        // Whole chunks, then single bytes: to the very last byte the file system has.
        while f.write_all(&chunk).is_ok() {
            written += chunk.len() as u64;
        }
        while f.write_all(&[0]).is_ok() {
            written += 1;
        }
        self.log(&format!(
            "runtime file system filled ({written} bytes) for {keep} operations"
        ));
        self.filler = Some(self.report.ops + keep);
    }

    fn empty_runtime_fs(&mut self) {
        if self.filler.take().is_some() {
            let _ = std::fs::remove_file(self.filler_path());
            self.log("runtime file system emptied");
        }
    }

    /// The file whose descriptors a flood sends (created on first use).
    fn flood_marker(&self) -> PathBuf {
        self.dir.path().join("flood-marker")
    }

    fn descriptor_flood(&mut self) {
        let marker = self.flood_marker();
        let Ok(file) = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&marker)
        else {
            return;
        };
        let copies: Vec<std::os::fd::OwnedFd> = (0..vmlock_sys::fdpass::MAX_FDS)
            .filter_map(|_| std::os::fd::AsFd::as_fd(&file).try_clone_to_owned().ok())
            .collect();
        let raw: Vec<std::os::fd::RawFd> =
            copies.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        let frames = self.rng.range(1, 4);
        self.log(&format!(
            "descriptor flood: {frames} frame(s) of {} descriptors",
            raw.len()
        ));
        let Ok(mut s) = UnixStream::connect(self.run_dir().join("vmlockd.sock")) else {
            return;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let frame = |body: &[u8]| {
            let mut v = (body.len() as u32).to_be_bytes().to_vec();
            v.extend_from_slice(body);
            v
        };
        let bodies: [&[u8]; 3] = [b"{\"Hello\":{\"version\":1}}", b"\"Status\"", b"noise"];
        for body in bodies.iter().take(frames as usize) {
            if vmlock_sys::fdpass::send_with_fds(&s, &frame(body), &raw).is_err() {
                break;
            }
        }
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf);
    }

    /// Descriptors of the flood marker open in vmlockd now.
    fn flooded_descriptors(&self) -> u64 {
        let Some(daemon) = self.daemon() else {
            return 0;
        };
        let marker = self.flood_marker();
        let Ok(entries) = std::fs::read_dir(format!("/proc/{}/fd", daemon.pid)) else {
            return 0;
        };
        entries
            .flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == marker))
            .count() as u64
    }

    // -----------------------------------------------------------------------------------------
    // Checks

    /// Locks lost (a live guest's disk without a lock) and leaked (a lock no live guest's
    /// supervisor keeps), now.
    fn violations(&self) -> (Vec<String>, Vec<String>) {
        if self.sanlock.is_some() {
            return self.sanlock_violations();
        }
        let mut lost = Vec::new();
        let mut leaked = Vec::new();
        let Ok(locked) = locked_files() else {
            return (vec!["/proc/locks unreadable".into()], leaked);
        };
        let live: Vec<&Live> = self.live.iter().filter(|l| !l.guest_gone()).collect();
        for l in &live {
            for d in &l.disks {
                // A miss in /proc/locks is confirmed with F_OFD_GETLK (its reads are not atomic).
                if !locked.contains(&self.disk_ids[*d])
                    && !path_locked(self.disk_path(*d)).unwrap_or(false)
                {
                    lost.push(format!("guest {} (vm{}) disk {d}", l.id, l.slot));
                }
            }
        }
        let kept: HashSet<FileId> = live
            .iter()
            .flat_map(|l| locked_by_process(l.supervisor.id()))
            .collect();
        for (d, id) in self.disk_ids.iter().enumerate() {
            if (locked.contains(id) || path_locked(self.disk_path(d)).unwrap_or(false))
                && !kept.contains(id)
            {
                leaked.push(format!("disk {d}"));
            }
        }
        (lost, leaked)
    }

    /// Waits (bounded) until no lock is lost or leaked, then counts what is left; with
    /// `then_stop`, stops every guest and checks no lock is left at all.
    fn settle_and_check(&mut self, when: &str, then_stop: bool) {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let (lost, leaked) = loop {
            self.reap();
            let (lost, leaked) = self.violations();
            if (lost.is_empty() && leaked.is_empty()) || Instant::now() >= deadline {
                break (lost, leaked);
            }
            // Bounded poll (deadline above): settling has no event.
            std::thread::sleep(Duration::from_millis(50));
        };
        self.report.locks_lost += lost.len() as u64;
        self.report.locks_leaked += leaked.len() as u64;
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let flooded = loop {
            let n = self.flooded_descriptors();
            if n == 0 || Instant::now() >= deadline {
                break n;
            }
            // Bounded poll (deadline above): the daemon closes them as it reads the frames.
            std::thread::sleep(Duration::from_millis(50));
        };
        if flooded > 0 {
            self.report.descriptors_leaked += flooded;
            self.report.details.push(format!(
                "{when}: {flooded} flooded descriptors still open in vmlockd"
            ));
        }
        for v in lost {
            self.report.details.push(format!("{when}: lock lost: {v}"));
        }
        for v in leaked {
            self.report
                .details
                .push(format!("{when}: lock leaked: {v}"));
        }
        if then_stop {
            self.stop_all();
            if self.sanlock.is_some() {
                self.sanlock_leases_left();
                return;
            }
            let deadline = Instant::now() + SETTLE_TIMEOUT;
            let left = loop {
                let locked = locked_files().unwrap_or_default();
                let left: Vec<usize> = (0..self.disk_ids.len())
                    .filter(|d| {
                        locked.contains(&self.disk_ids[*d])
                            || path_locked(self.disk_path(*d)).unwrap_or(false)
                    })
                    .collect();
                if left.is_empty() || Instant::now() >= deadline {
                    break left;
                }
                // Bounded poll (deadline above): settling has no event.
                std::thread::sleep(Duration::from_millis(50));
            };
            self.report.locks_leaked += left.len() as u64;
            for d in left {
                self.report.details.push(format!(
                    "after every guest stopped: lock leaked on disk {d}"
                ));
            }
        }
    }

    /// With etcd, once every guest was stopped (and the daemon still runs): no key may be left
    /// on any disk of the campaign (bounded wait: keys go on the daemon's release thread).
    fn check_etcd_keys(&mut self) {
        if self.opts.etcd_endpoints.is_empty() {
            return;
        }
        let mut config =
            vmlock_etcd::Config::new(self.opts.etcd_endpoints.clone(), "torture-check");
        config.prefix = self.etcd_prefix.clone();
        let etcd = match vmlock_etcd::Etcd::connect(&config) {
            Ok(e) => e,
            Err(e) => {
                self.report.details.push(format!("checking etcd keys: {e}"));
                self.report.keys_leaked += 1;
                return;
            }
        };
        let disks: Vec<String> = self
            .disks
            .iter()
            .chain(std::iter::once(&self.probe_disk))
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let left = loop {
            let left: Vec<String> = disks
                .iter()
                .flat_map(|d| match etcd.holders(d) {
                    Ok(held) => held
                        .into_iter()
                        .map(|h| format!("{d} held by {} ({})", h.owner.vm_name, h.key.holder))
                        .collect(),
                    Err(e) => vec![format!("{d}: {e}")],
                })
                .collect();
            if left.is_empty() || Instant::now() >= deadline {
                break left;
            }
            // Bounded poll (deadline above): the daemon's release thread has no event for us.
            std::thread::sleep(Duration::from_millis(50));
        };
        self.report.keys_leaked += left.len() as u64;
        for l in left {
            self.report
                .details
                .push(format!("after every guest stopped: etcd key left: {l}"));
        }
    }

    /// Counts what the guests wrote in their logs.
    fn read_findings(&mut self) {
        for id in 1..self.next_id {
            let Ok(text) = std::fs::read_to_string(log_path(self.dir.path(), id)) else {
                continue;
            };
            for line in text.lines() {
                let counter = match line.split_whitespace().next() {
                    Some("double-writer") => &mut self.report.double_writers,
                    Some("no-lock") => &mut self.report.no_lock,
                    Some("orphan-no-lock") => &mut self.report.orphan_no_lock,
                    Some("lease-service-gone") => &mut self.report.lease_service_gone,
                    Some("proc-locks-miss") => {
                        self.report.proc_locks_misses += 1;
                        continue;
                    }
                    Some("error") => &mut self.report.guest_errors,
                    Some("lock-back") => {
                        self.report.details.push(format!("guest {id}: {line}"));
                        continue;
                    }
                    _ => continue,
                };
                *counter += 1;
                self.report.details.push(format!("guest {id}: {line}"));
            }
        }
    }
}

/// The name of a migration fault in the table.
fn migration_fault_name(f: MigrationFault) -> &'static str {
    match f {
        MigrationFault::KillDaemonAfterPrepare => "SIGKILL vmlockd after prepare",
        MigrationFault::KillDaemonAfterDestination => "SIGKILL vmlockd, destination running",
        MigrationFault::KillDaemonAfterPause => "SIGKILL vmlockd, source paused",
        MigrationFault::KillDestination => "SIGKILL destination supervisor before finish",
    }
}

/// Reads the rest of a supervisor's stderr on a thread of its own (so it never blocks on a full
/// pipe), keeping the last few KiB for reports. Ends when the supervisor and its guest are gone.
fn drain(mut from: ChildStderr, into: Arc<Mutex<String>>) {
    let _ = std::thread::Builder::new()
        .name("drain".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = into.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    if s.len() > 8192 {
                        let cut = s.len() - 4096;
                        let cut = (cut..s.len()).find(|i| s.is_char_boundary(*i)).unwrap_or(0);
                        s.drain(..cut);
                    }
                }
            }
        });
}

/// What an exited child wrote to its piped stderr, on one line (each read bounded).
fn stderr_said(child: &mut Child) -> String {
    let mut said = String::new();
    if let Some(mut err) = child.stderr.take() {
        while let Ok(Some(line)) = read_line(&mut err, Duration::from_secs(1)) {
            said.push_str(&line);
            said.push(' ');
        }
    }
    said
}
