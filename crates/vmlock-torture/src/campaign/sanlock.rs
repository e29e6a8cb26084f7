//! The campaign against the `sanlock` driver (issue 13): two real sanlock daemons as two hosts
//! (the test kit's [`SanlockDaemon`], no watchdog, private `SANLOCK_RUN_DIR`s) share one lease
//! directory under /var/tmp; guests run under `vmlock --driver sanlock run` on either host and
//! fight over the same disks' leases.
//!
//! **Faults.** Those of the guests' life (SIGKILL supervisor, guest, supervisor mid-hotplug), and
//! the lock service's own: SIGKILL of one host's sanlock daemon (then its restart), a brief
//! SIGSTOP of one under a request, malformed requests on its socket, malformed frames on a
//! supervisor's control socket. vmlockd's faults do not apply (there is no vmlockd): they are
//! listed as not applicable, with why ([`NOT_APPLICABLE`]).
//!
//! **A killed daemon.** sanlock's leases live in the daemon: when it dies, the host holds none (on
//! disk they stay valid until the host's delta lease expires, which a real host's watchdog reset
//! precedes; these daemons run without one). Every guest of that host then writes with no lease,
//! so the driver's lock-failure path must end it; the campaign waits (bounded by
//! [`FENCE_TIMEOUT`]) for each to end, counts it as ended by the lock service (expected), not as
//! killed by vmlock, and counts one still running then as *unfenced* (must be 0). Then the daemon
//! is restarted; the host's next `vmlock run` rejoins the lockspace, and the time from the kill to
//! the first VM started on that host again is the recovery time.
//!
//! **Oracle**, independent of vmlock: the guests' marks in their disks (double writers); each
//! guest asks its host's daemon with `sanlock client status` whether its supervisor holds its
//! disks' leases ([`crate::guest`]); after every operation the campaign asks both daemons and
//! counts a lease both list as granted at once; after settling, every lease a daemon lists must belong
//! to a live guest's supervisor on that host for a disk the guest has, and every live guest's
//! disk must be listed ([`crate::sanlock_view`]: lease names computed here, not read from vmlock).

use super::*;
use crate::sanlock_view::{self, Lease, LeaseState};
use vmlock_sanlock::proto::{cmd, flags, LockspaceSpec, SM_MAGIC, SM_PROTO};
use vmlock_testkit::sanlock::SanlockDaemon;

/// The lockspace of the campaign's disk leases.
const LOCKSPACE: &str = "vmlock-torture";
/// The lockspace's io_timeout in seconds: a join takes about 3 s.
const IO_TIMEOUT: u32 = 1;
/// The hosts' names (and the sanlock `-e` names of their daemons).
const HOSTS: [&str; 2] = ["host-a", "host-b"];
/// How long the guests of a host whose daemon was killed may go on running (without leases)
/// before they count as unfenced: the supervisor's SIGTERM-then-SIGKILL takes at most 10 s.
const FENCE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a host may take, from its daemon's kill, to start a VM again (restart and rejoin).
const LOCK_SERVICE_RECOVERY: Duration = Duration::from_secs(60);
/// How long a daemon may take to answer a status request.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the hosts may take to see each other renew after joining.
const LIVE_TIMEOUT: Duration = Duration::from_secs(30);

/// The sanlock campaign's operations and their weights.
const OPS: [(Op, u64); 12] = [
    (Op::Start, 300),
    (Op::Stop, 120),
    (Op::Attach, 160),
    (Op::Detach, 140),
    (Op::KillSupervisor, 10),
    (Op::KillGuest, 10),
    (Op::KillSupervisorMidRequest, 6),
    (Op::KillLockService, 4),
    (Op::KillLockServiceMidRequest, 4),
    (Op::PauseLockService, 10),
    (Op::MalformedLockService, 8),
    (Op::MalformedControl, 8),
];

/// lockd's faults that do not apply to sanlock, and why (the table lists them).
pub(super) const NOT_APPLICABLE: [(Op, &str); 12] = [
    (Op::KillDaemon, "no vmlockd: SIGKILL of the lock service is \"SIGKILL sanlock daemon\""),
    (Op::KillDaemonMidRequest, "no vmlockd: see \"SIGKILL sanlock daemon mid-request\""),
    (Op::PauseDaemon, "no vmlockd: SIGSTOP of the lock service is \"SIGSTOP/SIGCONT sanlock daemon\""),
    (Op::DeleteState, "no vmlockd state files (sanlock keeps its state on the shared storage)"),
    (Op::CorruptState, "no vmlockd state files"),
    (Op::IdleConnections, "vmlockd's thread-per-connection accept; not aimed at sanlock"),
    (Op::MalformedFrame, "no vmlockd socket: see \"malformed request to sanlock's socket\" and \"... control socket\""),
    (Op::DescriptorFlood, "no vmlockd socket (sanlock's protocol passes no descriptors)"),
    (Op::FillRuntimeFs, "no vmlockd runtime state to write"),
    (Op::HangStorage, "the FUSE storage cannot hold sanlock's leases (O_DIRECT)"),
    (Op::StuckSupervisor, "vmlockd's push of a hotplug to a stopped holder; under sanlock the CLI asks the supervisor itself"),
    (Op::Migrate, "not built yet: a sanlock migration goes across hosts (two daemons, a destination on the other host)"),
];

/// The two hosts: their daemons, the driver configuration `vmlock` is given on each, and the
/// runtime directory of each host's supervisors.
pub(super) struct Hosts {
    base: PathBuf,
    daemons: Vec<SanlockDaemon>,
    configs: Vec<PathBuf>,
    runtimes: Vec<PathBuf>,
    /// The lease name of each disk (the probe's last), computed by the oracle.
    leases: Vec<String>,
}

impl Hosts {
    /// How many hosts.
    pub(super) fn count(&self) -> usize {
        self.daemons.len()
    }

    /// The `SANLOCK_RUN_DIR` of `host`'s daemon.
    pub(super) fn run_dir(&self, host: usize) -> &Path {
        &self.daemons[host].run_dir
    }

    /// `vmlock --driver sanlock` on `host`.
    pub(super) fn vmlock(&self, program: &Path, host: usize) -> Command {
        let mut c = Command::new(program);
        c.args(["--driver", "sanlock", "--driver-config"])
            .arg(&self.configs[host])
            .arg("--runtime-dir")
            .arg(&self.runtimes[host])
            .env("VMLOCK_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        c
    }

    /// What `host`'s daemon lists in the campaign's lockspace; `None` if it was killed.
    fn status(&self, host: usize) -> Option<std::io::Result<Vec<Lease>>> {
        self.daemons[host].running_pid()?;
        Some(
            sanlock_view::status(self.run_dir(host), STATUS_TIMEOUT)
                .map(|v| v.into_iter().filter(|l| l.lockspace == LOCKSPACE).collect()),
        )
    }
}

/// Starts the two hosts: daemons, the lockspace (formatted, joined by both, each seeing the other
/// renew), configurations.
fn start_hosts(base: &Path, disks: &[PathBuf]) -> anyhow::Result<Hosts> {
    let lease_dir = base.join("leases");
    std::fs::create_dir_all(&lease_dir)?;
    let daemons = HOSTS
        .iter()
        .map(|name| SanlockDaemon::try_start(base, name))
        .collect::<std::io::Result<Vec<_>>>()
        .context("starting the sanlock daemons")?;
    // The lockspace, formatted like the driver formats it (1 MiB align, 512-byte sectors).
    let ls_path = lease_dir.join(LOCKSPACE);
    std::fs::File::create(&ls_path)?.set_len(1 << 20)?;
    let spec = |host_id: u64| LockspaceSpec {
        name: LOCKSPACE.into(),
        host_id,
        flags: flags::ALIGN1M | flags::SECTOR512,
        path: ls_path.clone(),
        offset: 0,
    };
    daemons[0]
        .client()
        .write_lockspace(&spec(0), IO_TIMEOUT)
        .map_err(|e| anyhow::anyhow!("formatting the lockspace: {e}"))?;
    // Both hosts join at once (a join takes 2-5 io_timeouts).
    let joins: Vec<_> = daemons
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let (client, spec) = (d.client(), spec(i as u64 + 1));
            std::thread::spawn(move || client.add_lockspace(&spec, IO_TIMEOUT))
        })
        .collect();
    for (i, j) in joins.into_iter().enumerate() {
        j.join()
            .map_err(|_| anyhow::anyhow!("the join thread of {} panicked", HOSTS[i]))?
            .map_err(|e| anyhow::anyhow!("{} joining the lockspace: {e}", HOSTS[i]))?;
    }
    // Before a host has seen the other renew, the other's leases are "retry later", not "held by
    // a live host": wait (bounded poll; sanlock has no event for it).
    let deadline = Instant::now() + LIVE_TIMEOUT;
    for (i, d) in daemons.iter().enumerate() {
        let other = (1 - i) as u64 + 1;
        loop {
            let hosts = d.client().get_hosts(LOCKSPACE, 0).unwrap_or_default();
            if hosts
                .iter()
                .any(|h| h.host_id == other && h.state == vmlock_sanlock::proto::HostState::Live)
            {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} did not see host_id {other} live within {LIVE_TIMEOUT:?}",
                HOSTS[i]
            );
            // Bounded poll (deadline above).
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let mut configs = Vec::new();
    let mut runtimes = Vec::new();
    for (i, d) in daemons.iter().enumerate() {
        let config = base.join(format!("sanlock-{}.toml", HOSTS[i]));
        std::fs::write(
            &config,
            format!(
                "host_id = {}\nlease_dir = {:?}\nrun_dir = {:?}\nio_timeout = {IO_TIMEOUT}\nhost_name = {:?}\nlockspace = {LOCKSPACE:?}\njoin_timeout = 60\n",
                i + 1,
                lease_dir,
                d.run_dir,
                HOSTS[i],
            ),
        )?;
        let runtime = base.join(format!("vmlock-{}", HOSTS[i]));
        std::fs::create_dir_all(&runtime)?;
        configs.push(config);
        runtimes.push(runtime);
    }
    Ok(Hosts {
        base: base.to_owned(),
        daemons,
        configs,
        runtimes,
        leases: disks.iter().map(|d| sanlock_view::lease_name(d)).collect(),
    })
}

/// Runs a campaign against sanlock (see the module's text).
pub(super) fn run(opts: Options) -> anyhow::Result<Report> {
    anyhow::ensure!(
        sanlock_view::installed(),
        "sanlock is not installed (no `sanlock` program)"
    );
    // O_DIRECT lease I/O needs a real file system: /var/tmp, not tmpfs.
    let dir = tempfile::Builder::new()
        .prefix("vmlock-torture-sanlock-")
        .tempdir_in("/var/tmp")
        .context("creating the campaign's directory")?;
    let mut c = Campaign::new(opts, dir)?;
    c.report.driver = Driver::Sanlock;
    c.report.not_applicable = NOT_APPLICABLE.to_vec();
    let mut all_disks = c.disks.clone();
    all_disks.push(c.probe_disk.clone());
    c.sanlock = Some(start_hosts(c.dir.path(), &all_disks)?);
    c.ops_log = std::fs::File::create(c.dir.path().join("ops.log"))
        .ok()
        .map(std::io::BufWriter::new);
    let t0 = Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.sanlock_campaign(t0)));
    // Whatever happened (a panic too): every guest ends; the daemons are killed (by pid) with
    // the campaign.
    c.stop_all();
    match result {
        Ok(r) => r?,
        Err(panic) => std::panic::resume_unwind(panic),
    }
    c.report.elapsed = t0.elapsed();
    if c.opts.keep_dir || !c.report.passed() {
        c.sanlock = None;
        let kept = c.dir.keep();
        c.report
            .details
            .push(format!("campaign directory kept: {}", kept.display()));
    }
    Ok(c.report)
}

impl Campaign {
    fn hosts(&self) -> anyhow::Result<&Hosts> {
        self.sanlock.as_ref().context("not a sanlock campaign")
    }

    fn sanlock_campaign(&mut self, t0: Instant) -> anyhow::Result<()> {
        let weights: Vec<u64> = OPS.iter().map(|(_, w)| *w).collect();
        while self.report.ops < self.opts.ops {
            if self.opts.duration.is_some_and(|d| t0.elapsed() >= d) {
                break;
            }
            self.reap();
            let op = OPS[self.rng.weighted(&weights)].0;
            let done = self.sanlock_step(op)?;
            self.report.ops += 1;
            *self.report.by_kind.entry(done).or_default() += 1;
            self.check_double_held();
            if self.report.ops % CHECK_EVERY == 0 {
                let when = format!("at op {}", self.report.ops);
                self.settle_and_check(&when, false);
            }
        }
        self.settle_and_check("after the campaign", true);
        self.read_findings();
        Ok(())
    }

    /// Does `op`, or another when it cannot be done now; returns what was done.
    fn sanlock_step(&mut self, op: Op) -> anyhow::Result<Op> {
        let needs_guest = matches!(
            op,
            Op::Stop
                | Op::Attach
                | Op::Detach
                | Op::KillSupervisor
                | Op::KillGuest
                | Op::KillSupervisorMidRequest
                | Op::MalformedControl
        );
        let guests = self.eligible();
        if needs_guest && guests.is_empty() {
            return self.sanlock_step(Op::Start);
        }
        let i = if needs_guest {
            self.rng.pick(&guests).copied().unwrap_or(0)
        } else {
            0
        };
        match op {
            Op::Start => {
                if !self.start_random()? {
                    if guests.is_empty() {
                        self.log("no free slot: nothing done");
                        return Ok(op);
                    }
                    return self.sanlock_step(Op::Stop);
                }
            }
            Op::Stop => {
                self.log(&format!("stop guest {}", self.live[i].id));
                self.stop(i);
            }
            Op::Attach => self.attach(i)?,
            Op::Detach => self.detach(i)?,
            Op::KillSupervisor => self.kill_supervisor(i),
            Op::KillGuest => self.kill_guest(i),
            Op::KillSupervisorMidRequest => self.kill_supervisor_mid_hotplug(i)?,
            Op::KillLockService => self.kill_lock_service()?,
            Op::KillLockServiceMidRequest => self.kill_lock_service_mid_request()?,
            Op::PauseLockService => self.pause_lock_service()?,
            Op::MalformedLockService => self.malformed_lock_service()?,
            Op::MalformedControl => self.malformed_control(i)?,
            other => anyhow::bail!("{} does not apply to sanlock", other.name()),
        }
        Ok(op)
    }

    /// SIGKILLs one host's daemon, waits for its guests to be ended by the lock-failure path,
    /// restarts it and measures the recovery.
    fn kill_lock_service(&mut self) -> anyhow::Result<()> {
        let count = self.hosts()?.count();
        let host = self.rng.below(count as u64) as usize;
        let on_host: Vec<u64> = self
            .live
            .iter()
            .filter(|l| l.host == host && !l.guest_gone())
            .map(|l| l.id)
            .collect();
        self.log(&format!(
            "SIGKILL the sanlock daemon of host {host}; its guests {on_host:?} lose their leases"
        ));
        let killed = Instant::now();
        if let Some(hosts) = &mut self.sanlock {
            hosts.daemons[host].kill();
        }
        self.after_lock_service_kill(Op::KillLockService, host, killed)
    }

    /// SIGKILLs one host's daemon 0–20 ms into a start or a hotplug on that host, then goes on as
    /// [`Campaign::kill_lock_service`].
    fn kill_lock_service_mid_request(&mut self) -> anyhow::Result<()> {
        let count = self.hosts()?.count();
        let host = self.rng.below(count as u64) as usize;
        let delay = Duration::from_micros(self.rng.range(0, 20_000));
        let on_host: Vec<usize> = self
            .eligible()
            .into_iter()
            .filter(|i| self.live[*i].host == host)
            .collect();
        let hotplug = if on_host.is_empty() || self.rng.below(2) == 0 {
            None
        } else {
            self.rng.pick(&on_host).copied()
        };
        let Some(pid) = self.hosts()?.daemons[host].running_pid() else {
            return Ok(());
        };
        let daemon = ProcessHandle::open(pid, None).context("the sanlock daemon's pidfd")?;
        self.log(&format!(
            "SIGKILL the sanlock daemon of host {host} {delay:?} into a {}",
            if hotplug.is_some() {
                "hotplug"
            } else {
                "start"
            }
        ));
        let killer = std::thread::spawn(move || {
            // Deliberate: the fault lands a random time into the request.
            std::thread::sleep(delay);
            let _ = daemon.signal(Signal::KILL);
            let at = Instant::now();
            daemon.wait_exit(Some(EXIT_TIMEOUT));
            at
        });
        let request = match hotplug {
            Some(i) => self.attach(i),
            None => self.start_random_on(Some(host)).map(|_| ()),
        };
        let killed = killer.join().unwrap_or_else(|_| Instant::now());
        request?;
        // Reaps the killed daemon (our child).
        if let Some(hosts) = &mut self.sanlock {
            hosts.daemons[host].kill();
        }
        self.after_lock_service_kill(Op::KillLockServiceMidRequest, host, killed)
    }

    /// After `host`'s daemon was killed at `killed`: every guest of that host lost its leases and
    /// must be ended by the lock-failure path (bounded wait); then the daemon is restarted and the
    /// recovery measured.
    fn after_lock_service_kill(
        &mut self,
        kind: Op,
        host: usize,
        killed: Instant,
    ) -> anyhow::Result<()> {
        let on_host: Vec<u64> = self
            .live
            .iter()
            .filter(|l| l.host == host && !l.guest_gone())
            .map(|l| l.id)
            .collect();
        for l in self.live.iter_mut().filter(|l| l.host == host) {
            l.fenced_at = Some(killed);
        }
        for id in on_host {
            let Some(i) = self.live.iter().position(|l| l.id == id) else {
                continue;
            };
            let left = FENCE_TIMEOUT.saturating_sub(killed.elapsed());
            let ended = self.live[i]
                .guest
                .as_ref()
                .map_or(true, |g| g.wait_exit(Some(left)));
            if ended {
                self.report.fence_times.push(killed.elapsed());
                continue;
            }
            self.report.unfenced += 1;
            self.report.details.push(format!(
                "op {} (seed {}): guest {id} (host {host}) still running {FENCE_TIMEOUT:?} after its host's sanlock daemon was killed (it holds no lease)",
                self.report.ops, self.opts.seed
            ));
            // Ended by the campaign from here on, so the campaign goes on.
            let mut l = self.live.swap_remove(i);
            l.signalled = true;
            if let Some(g) = &l.guest {
                let _ = g.signal(Signal::KILL);
            }
            self.finish(l);
        }
        self.reap();
        let base = self.hosts()?.base.clone();
        let daemon = SanlockDaemon::try_start(&base, HOSTS[host])
            .with_context(|| format!("restarting the sanlock daemon of {}", HOSTS[host]))?;
        if let Some(hosts) = &mut self.sanlock {
            hosts.daemons[host] = daemon;
        }
        self.log(&format!("sanlock daemon of host {host} restarted"));
        self.recover_host(kind, host, killed)
    }

    /// After `host`'s daemon was killed at `since`: starts the probe VM on that host until one
    /// starts (its driver rejoins the lockspace first), records the time, and stops it.
    fn recover_host(&mut self, kind: Op, host: usize, since: Instant) -> anyhow::Result<()> {
        let probe_slot = self.opts.vms;
        let probe_disk = self.disks.len();
        loop {
            match self.start(probe_slot, host, &[probe_disk])? {
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
                Started::Refused if since.elapsed() < LOCK_SERVICE_RECOVERY => {
                    // Bounded retry (LOCK_SERVICE_RECOVERY): recovery is measured by polling
                    // starts.
                    std::thread::sleep(Duration::from_millis(100));
                }
                Started::Refused | Started::TimedOut => {
                    self.report.recovery_failures += 1;
                    self.report.details.push(format!(
                        "op {}: no VM started on host {host} within {LOCK_SERVICE_RECOVERY:?} of its sanlock daemon's kill",
                        self.report.ops
                    ));
                    return Ok(());
                }
            }
        }
    }

    /// SIGSTOPs one host's daemon for 20–300 ms while a hotplug of a VM of that host (or, with
    /// none, a status request) waits on it, then SIGCONT.
    fn pause_lock_service(&mut self) -> anyhow::Result<()> {
        let count = self.hosts()?.count();
        let host = self.rng.below(count as u64) as usize;
        let pause = Duration::from_millis(self.rng.range(20, 300));
        let on_host: Vec<usize> = self
            .eligible()
            .into_iter()
            .filter(|i| self.live[*i].host == host)
            .collect();
        let asking = self.rng.pick(&on_host).copied();
        let hosts = self.hosts()?;
        let Some(pid) = hosts.daemons[host].running_pid() else {
            return Ok(());
        };
        let run_dir = hosts.run_dir(host).to_owned();
        let daemon = ProcessHandle::open(pid, None).context("the sanlock daemon's pidfd")?;
        self.log(&format!(
            "SIGSTOP the sanlock daemon of host {host} for {pause:?}; meanwhile a hotplug of guest {:?}",
            asking.map(|i| self.live[i].id)
        ));
        daemon.signal(Signal::STOP)?;
        let resume = std::thread::spawn(move || {
            // Deliberate: the daemon stays stopped this long while a client waits on it.
            std::thread::sleep(pause);
            daemon.signal(Signal::CONT)
        });
        match asking {
            Some(i) => self.attach(i)?,
            None => {
                let _ = sanlock_view::status(&run_dir, CLI_TIMEOUT);
            }
        }
        resume
            .join()
            .map_err(|_| anyhow::anyhow!("the SIGCONT thread panicked"))??;
        Ok(())
    }

    /// A malformed request on one host's sanlock socket; the daemon must answer a status request
    /// right after.
    fn malformed_lock_service(&mut self) -> anyhow::Result<()> {
        let count = self.hosts()?.count();
        let host = self.rng.below(count as u64) as usize;
        let variant = self.rng.below(6);
        let mut noise = vec![0u8; self.rng.range(1, 64) as usize];
        for b in &mut noise {
            *b = self.rng.next_u64() as u8;
        }
        // sanlock's header: magic, version, cmd, cmd_flags, length, seq, data, data2 (u32 each,
        // native byte order).
        let header = |magic: u32, command: u32, length: u32| -> Vec<u8> {
            [magic, SM_PROTO, command, 0, length, 0, 0, 0]
                .iter()
                .flat_map(|w| w.to_ne_bytes())
                .collect()
        };
        let bytes = match variant {
            0 => header(0xdead_beef, cmd::VERSION, 32),
            1 => header(SM_MAGIC, 9999, 32),
            2 => header(SM_MAGIC, cmd::ACQUIRE, u32::MAX),
            3 => header(SM_MAGIC, cmd::VERSION, 32)[..10].to_vec(),
            4 => noise,
            _ => {
                // A registration, then an acquire whose body is cut short and garbage.
                let mut v = header(SM_MAGIC, cmd::REGISTER, 32);
                v.extend(header(SM_MAGIC, cmd::ACQUIRE, 32 + 1000));
                v.extend(std::iter::repeat(0xa5).take(40));
                v
            }
        };
        self.log(&format!(
            "malformed request to the sanlock daemon of host {host} (variant {variant})"
        ));
        let hosts = self.hosts()?;
        if hosts.daemons[host].running_pid().is_none() {
            return Ok(());
        }
        if let Ok(mut s) = UnixStream::connect(hosts.run_dir(host).join("sanlock.sock")) {
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
            let _ = s.write_all(&bytes);
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf);
        }
        if let Some(Err(e)) = self.hosts()?.status(host) {
            self.report.lock_service_unanswered += 1;
            self.report.details.push(format!(
                "op {} (seed {}): the sanlock daemon of host {host} did not answer after a malformed request (variant {variant}): {e}",
                self.report.ops, self.opts.seed
            ));
        }
        Ok(())
    }

    /// A malformed frame on guest `i`'s supervisor's control socket; the supervisor must answer
    /// a request for its guest's pid right after.
    fn malformed_control(&mut self, i: usize) -> anyhow::Result<()> {
        let (variant, bytes) = self.malformed_frame();
        let (id, host, uuid) = (
            self.live[i].id,
            self.live[i].host,
            self.uuids[self.live[i].slot].clone(),
        );
        self.log(&format!(
            "malformed frame (variant {variant}) to the control socket of guest {id}"
        ));
        let socket = vmlock_client::control::socket_path(&self.hosts()?.runtimes[host], &uuid);
        if let Ok(mut s) = UnixStream::connect(&socket) {
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
            let _ = s.write_all(&bytes);
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf);
        }
        let mut cmd = self.vmlock_on(host);
        cmd.args(["pid", "--uuid", &uuid]);
        let answer = self.cli(cmd, "pid")?;
        if !matches!(answer, Cli::Ok) && !self.live[i].guest_gone() {
            self.report.control_unanswered += 1;
            self.report.details.push(format!(
                "op {} (seed {}): the supervisor of guest {id} did not answer after a malformed control frame (variant {variant}): {answer:?}",
                self.report.ops, self.opts.seed
            ));
        }
        Ok(())
    }

    /// Both daemons' lists; a daemon that was killed gives `None`, one that does not answer is
    /// counted and gives `None`.
    fn views(&mut self) -> Vec<Option<Vec<Lease>>> {
        let Some(hosts) = &self.sanlock else {
            return Vec::new();
        };
        let mut views = Vec::new();
        let mut failures = Vec::new();
        for h in 0..hosts.count() {
            views.push(match hosts.status(h) {
                None => None,
                Some(Ok(v)) => Some(v),
                Some(Err(e)) => {
                    failures.push(format!("host {h}: {e}"));
                    None
                }
            });
        }
        for f in failures {
            self.report.lock_service_unanswered += 1;
            self.report.details.push(format!(
                "op {} (seed {}): sanlock daemon did not answer a status request: {f}",
                self.report.ops, self.opts.seed
            ));
        }
        views
    }

    /// Counts every lease that both hosts' daemons list as granted at once (the campaign's disks
    /// are all exclusive). An acquire under way is listed too (`ADD`), while the other host still
    /// holds the lease: it is not a grant.
    fn check_double_held(&mut self) {
        let views = self.views();
        let [Some(a), Some(b)] = views.as_slice() else {
            return;
        };
        let granted = |x: &&Lease| x.state == LeaseState::Held;
        let both: Vec<String> = a
            .iter()
            .filter(granted)
            .filter(|x| b.iter().filter(granted).any(|y| y.name == x.name))
            .map(|x| x.name.clone())
            .collect();
        for name in both {
            self.report.double_held += 1;
            self.report.details.push(format!(
                "op {} (seed {}): lease {name} ({}) granted by both hosts' daemons",
                self.report.ops,
                self.opts.seed,
                self.lease_label(&name)
            ));
        }
    }

    /// The disk a lease name belongs to, for reports.
    fn lease_label(&self, name: &str) -> String {
        let base = name.split('.').next().unwrap_or(name);
        self.sanlock
            .as_ref()
            .and_then(|h| h.leases.iter().position(|l| l == base))
            .map_or_else(|| "no disk of the campaign".into(), |d| format!("disk {d}"))
    }

    /// Leases lost (a live guest's disk its host's daemon does not list as its supervisor's) and
    /// leaked (a listed lease no live guest's supervisor on that host should hold), now.
    pub(super) fn sanlock_violations(&self) -> (Vec<String>, Vec<String>) {
        let Some(hosts) = &self.sanlock else {
            return (Vec::new(), Vec::new());
        };
        let views: Vec<Option<Vec<Lease>>> = (0..hosts.count())
            .map(|h| hosts.status(h).and_then(Result::ok))
            .collect();
        let mut lost = Vec::new();
        let mut leaked = Vec::new();
        let live: Vec<&Live> = self.live.iter().filter(|l| !l.guest_gone()).collect();
        for l in &live {
            if l.fenced_at.is_some() {
                continue; // its leases went with its host's daemon (counted when it was killed)
            }
            for d in &l.disks {
                let listed = views[l.host].as_ref().map(|v| {
                    v.iter().any(|x| {
                        x.name == hosts.leases[*d]
                            && x.pid == l.supervisor.id()
                            && x.state == LeaseState::Held
                    })
                });
                match listed {
                    Some(true) => {}
                    Some(false) => lost.push(format!(
                        "guest {} (vm{}, host {}) disk {d}",
                        l.id, l.slot, l.host
                    )),
                    None => lost.push(format!(
                        "guest {} (vm{}, host {}) disk {d}: its host's daemon does not answer",
                        l.id, l.slot, l.host
                    )),
                }
            }
        }
        for (h, view) in views.iter().enumerate() {
            for x in view.iter().flatten() {
                let owned = live.iter().any(|l| {
                    l.host == h
                        && l.supervisor.id() == x.pid
                        && l.disks.iter().any(|d| hosts.leases[*d] == x.name)
                });
                if !owned {
                    leaked.push(format!(
                        "host {h}: lease {} ({}) held by pid {} ({:?})",
                        x.name,
                        self.lease_label(&x.name),
                        x.pid,
                        x.state
                    ));
                }
            }
        }
        (lost, leaked)
    }

    /// After every guest was stopped: no daemon may list a lease of the campaign's lockspace
    /// (bounded wait: a supervisor's connection closes as it exits).
    pub(super) fn sanlock_leases_left(&mut self) {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let left = loop {
            let left: Vec<String> = self
                .views()
                .into_iter()
                .enumerate()
                .flat_map(|(h, v)| v.into_iter().flatten().map(move |x| (h, x)))
                .map(|(h, x)| {
                    format!(
                        "host {h}: lease {} held by pid {} ({:?})",
                        x.name, x.pid, x.state
                    )
                })
                .collect();
            if left.is_empty() || Instant::now() >= deadline {
                break left;
            }
            // Bounded poll (deadline above): settling has no event.
            std::thread::sleep(Duration::from_millis(50));
        };
        self.report.locks_leaked += left.len() as u64;
        for l in left {
            self.report
                .details
                .push(format!("after every guest stopped: lease leaked: {l}"));
        }
    }
}

impl Report {
    /// The sanlock campaign's table (Markdown).
    pub(super) fn sanlock_table(&self) -> String {
        let mut rows: Vec<(String, String)> = Vec::new();
        let mut row = |k: &str, v: String| rows.push((k.to_owned(), v));
        row(
            "driver",
            format!("sanlock: 2 daemons as 2 hosts, io_timeout {IO_TIMEOUT} s, no watchdog"),
        );
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
        row("faults", self.faults().to_string());
        for (k, n) in &self.by_kind {
            if k.is_fault() {
                row(&format!("  {}", k.name()), n.to_string());
            }
        }
        for (k, why) in &self.not_applicable {
            row(&format!("  {}", k.name()), format!("not applicable: {why}"));
        }
        row(
            "double writers (must be 0)",
            self.double_writers.to_string(),
        );
        row(
            "live guests seen without their lease in sanlock's list (must be 0)",
            self.no_lock.to_string(),
        );
        row("leases lost (must be 0)", self.locks_lost.to_string());
        row("leases leaked (must be 0)", self.locks_leaked.to_string());
        row(
            "leases granted on both hosts at once (must be 0)",
            self.double_held.to_string(),
        );
        row(
            &format!(
                "guests still running {} s after their host's sanlock daemon died (must be 0)",
                FENCE_TIMEOUT.as_secs()
            ),
            self.unfenced.to_string(),
        );
        row(
            "guests killed by vmlock's own restart (must be 0)",
            self.killed_by_vmlock.to_string(),
        );
        row(
            "status requests unanswered by a daemon neither killed nor stopped (must be 0)",
            self.lock_service_unanswered.to_string(),
        );
        row(
            "supervisors not answering after a malformed control frame (must be 0)",
            self.control_unanswered.to_string(),
        );
        row(
            "guests ended by the lock-failure path after their host's daemon was killed (expected)",
            self.fenced_by_lock_service.to_string(),
        );
        if !self.fence_times.is_empty() {
            row(
                "daemon kill to the end of its host's guests (p50 / p99, n)",
                p50_p99(&self.fence_times),
            );
        }
        for (k, v) in &self.recovery {
            row(
                &format!(
                    "recovery after {}: kill to next VM start on that host (p50 / p99, n)",
                    k.name()
                ),
                p50_p99(v),
            );
        }
        row(
            &format!(
                "daemon kills without recovery within {} s",
                LOCK_SERVICE_RECOVERY.as_secs()
            ),
            self.recovery_failures.to_string(),
        );
        row(
            "no lease seen by a guest whose supervisor had died",
            self.orphan_no_lock.to_string(),
        );
        row(
            "outages of their host's daemon seen by guests",
            self.lease_service_gone.to_string(),
        );
        row("CLI calls over their bound", self.cli_timeouts.to_string());
        row("guest errors", self.guest_errors.to_string());
        render(rows)
    }
}
