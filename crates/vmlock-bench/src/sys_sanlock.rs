//! The real sanlock daemon (Debian's sanlock 3.8.5), driven over its UNIX-socket protocol through
//! the sanlock driver's codec and client (`vmlock_sanlock::proto`; no CLI, no libsanlock): one
//! daemon as one host, leases in a file on the work directory's file system (O_DIRECT), lockspace
//! io_timeout 1 s, no watchdog (`-w 0`, tests only).

use crate::report::{Memory, Restart, SysResult, Takeover};
use crate::util::{self, Fast, Op, Proc, Samples};
use crate::Cfg;
use anyhow::{bail, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmlock_sanlock::proto::{
    flags, rv, Client as SanlockClient, ClientError, ClientResult, HostState, LockspaceSpec,
    Registered, ResourceSpec, MAX_RESOURCES,
};

/// `SANLK_RES_ALIGN1M | SANLK_RES_SECTOR512` (same values for lockspaces).
const ALIGN_FLAGS: u32 = flags::ALIGN1M | flags::SECTOR512;
const ALIGN: u64 = 1 << 20;
const LOCKSPACE: &str = "BENCH";
/// Lockspace io_timeout in seconds.
const IO_TIMEOUT: u32 = 1;

/// The sanlock binary, if installed.
pub fn find() -> Option<PathBuf> {
    ["/usr/sbin/sanlock", "/usr/bin/sanlock"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// One lease: its name and place.
#[derive(Debug, Clone)]
pub struct Lease {
    name: String,
    path: PathBuf,
    offset: u64,
}

impl Lease {
    fn spec(&self) -> ResourceSpec {
        ResourceSpec {
            lockspace: LOCKSPACE.into(),
            name: self.name.clone(),
            path: self.path.clone(),
            offset: self.offset,
            lver: 0,
            flags: ALIGN_FLAGS,
        }
    }
}

fn lockspace(host_id: u64, path: &Path) -> LockspaceSpec {
    LockspaceSpec {
        name: LOCKSPACE.into(),
        host_id,
        flags: ALIGN_FLAGS,
        path: path.to_owned(),
        offset: 0,
    }
}

/// A registered connection to the daemon (the sanlock driver's codec and client).
#[derive(Debug)]
pub struct Client {
    conn: Registered,
}

impl Client {
    /// The daemon's result for `leases`, at most [`MAX_RESOURCES`] per call: 0, or the first
    /// failure's (negative) result.
    fn leases_call(
        &mut self,
        leases: &[Lease],
        mut call: impl FnMut(&mut Registered, &[ResourceSpec]) -> ClientResult<()>,
    ) -> Result<i32> {
        for chunk in leases.chunks(MAX_RESOURCES) {
            let specs: Vec<ResourceSpec> = chunk.iter().map(Lease::spec).collect();
            match call(&mut self.conn, &specs) {
                Ok(()) => {}
                Err(ClientError::Daemon(rv)) => return Ok(rv),
                Err(e) => bail!("sanlock: {e}"),
            }
        }
        Ok(0)
    }

    /// ACQUIRE for this registered connection; the first failure's result.
    pub fn acquire(&mut self, leases: &[Lease]) -> Result<i32> {
        self.leases_call(leases, |c, specs| c.acquire(specs, 0, "vmlock-bench"))
    }

    fn must_acquire(&mut self, leases: &[Lease]) -> Result<()> {
        match self.acquire(leases)? {
            0 => Ok(()),
            rv => bail!("sanlock acquire of {} failed: {rv}", leases[0].name),
        }
    }

    /// RELEASE.
    pub fn release(&mut self, leases: &[Lease]) -> Result<()> {
        match self.leases_call(leases, |c, specs| c.release(specs))? {
            0 => Ok(()),
            rv => bail!("sanlock release of {} failed: {rv}", leases[0].name),
        }
    }
}

/// Registers this process through a new connection to the daemon of `run`.
fn registered(run: &Path) -> Result<Client> {
    let conn = SanlockClient::new(run)
        .register()
        .map_err(|e| anyhow::anyhow!("registering with sanlock at {}: {e}", run.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Client { conn })
}

/// The guest of workload 4: registers itself, acquires, says HELD and waits to be killed.
/// Arguments: RUN_DIR LEASE_FILE OFFSET NAME.
pub fn guest(args: &[String]) -> Result<()> {
    let [run, path, offset, name] = args else {
        bail!("usage: internal-guest sanlock RUN_DIR FILE OFFSET NAME");
    };
    let lease = Lease {
        name: name.clone(),
        path: PathBuf::from(path),
        offset: offset.parse()?,
    };
    let mut c = registered(Path::new(run))?;
    c.must_acquire(&[lease])?;
    let mut out = std::io::stdout();
    writeln!(out, "HELD")?;
    out.flush()?;
    loop {
        std::thread::sleep(Duration::from_secs(1000));
    }
}

struct Daemon {
    proc: Proc,
    run: PathBuf,
}

fn start_daemon(bin: &Path, dir: &Path) -> Result<Daemon> {
    start_daemon_named(bin, dir, "vmlock-bench")
}

/// A daemon as the host named `name` (`-e`), its run directory and log in `dir`.
fn start_daemon_named(bin: &Path, dir: &Path, name: &str) -> Result<Daemon> {
    let run = dir.join("run");
    std::fs::create_dir_all(&run)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("sanlock.log"))?;
    let mut cmd = Command::new(bin);
    // A stable host name (-e): after a restart the host rejoins at once instead of waiting out
    // its previous delta lease (8N + 60 s).
    cmd.args([
        "daemon", "-D", "-w", "0", "-l", "0", "-h", "0", "-U", "root", "-G", "root",
    ])
    .args(["-e", name])
    .env("SANLOCK_RUN_DIR", &run)
    .env("SANLOCK_PRIVILEGED", "0")
    .stdin(Stdio::null())
    .stdout(Stdio::from(log.try_clone()?))
    .stderr(Stdio::from(log));
    let mut proc = Proc::start("sanlock daemon", &mut cmd)?;
    util::wait_for(
        "sanlock's socket",
        Duration::from_secs(10),
        Duration::from_millis(2),
        || {
            if !proc.running() {
                bail!("sanlock exited; see {}", dir.join("sanlock.log").display());
            }
            Ok(SanlockClient::new(&run)
                .version(Duration::from_secs(1))
                .ok())
        },
    )?;
    Ok(Daemon { proc, run })
}

fn join_lockspace(run: &Path, file: &Path) -> Result<()> {
    join_as(run, file, 1, IO_TIMEOUT)
}

fn join_as(run: &Path, file: &Path, host_id: u64, io_timeout: u32) -> Result<()> {
    match SanlockClient::new(run).add_lockspace(&lockspace(host_id, file), io_timeout) {
        Ok(()) | Err(ClientError::Daemon(rv::EEXIST)) => Ok(()),
        Err(e) => bail!("add_lockspace failed: {e}"),
    }
}

fn fail(e: anyhow::Error) -> String {
    format!("failed: {e:#}")
}

/// A daemon with a joined lockspace and `n` formatted leases.
fn set_up(bin: &Path, dir: &Path, n: usize) -> Result<(Daemon, Vec<Lease>, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let d = start_daemon(bin, dir)?;
    // Lockspace: one 1 MiB area, zero-filled, written by the daemon with io_timeout 1.
    let ls_file = dir.join("lockspace");
    std::fs::write(&ls_file, vec![0u8; ALIGN as usize])?;
    SanlockClient::new(&d.run)
        .write_lockspace(&lockspace(0, &ls_file), IO_TIMEOUT)
        .map_err(|e| anyhow::anyhow!("write_lockspace failed: {e}"))?;
    // Leases: 1 MiB each in one sparse file, formatted by the daemon.
    let res_file = dir.join("leases");
    std::fs::File::create(&res_file)?.set_len(n as u64 * ALIGN)?;
    let t = Instant::now();
    let leases: Vec<Lease> = (0..n)
        .map(|i| Lease {
            name: format!("r{i}"),
            path: res_file.clone(),
            offset: i as u64 * ALIGN,
        })
        .collect();
    let c = SanlockClient::new(&d.run);
    for l in &leases {
        c.write_resource(&l.spec())
            .map_err(|e| anyhow::anyhow!("write_resource {} failed: {e}", l.name))?;
    }
    eprintln!(
        "  sanlock: formatted {n} leases in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    join_lockspace(&d.run, &ls_file)?;
    eprintln!(
        "  sanlock: add_lockspace took {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok((d, leases, ls_file))
}

/// Workloads 1 and 2 against a sanlock daemon of their own.
pub fn fast(bin: &Path, dir: &Path) -> Result<Fast> {
    let (d, leases, _) = set_up(bin, &dir.join("fast"), 17)?;
    let mut c = registered(&d.run)?;
    let one = vec![leases[0].clone()];
    let single: Op = Box::new(move || {
        c.must_acquire(&one)?;
        c.release(&one)
    });
    let mut conc: Vec<Op> = Vec::new();
    for l in &leases[1..] {
        let mut c = registered(&d.run)?;
        let l = vec![l.clone()];
        conc.push(Box::new(move || {
            c.must_acquire(&l)?;
            c.release(&l)
        }));
    }
    Ok(Fast {
        single,
        conc,
        guard: Box::new(d),
    })
}

/// Workloads 3 to 6 against a fresh sanlock daemon.
pub fn run(cfg: &Cfg, bin: &Path, dir: &Path) -> SysResult {
    let set_up = set_up(bin, dir, 64 + 1 + cfg.sanlock_many);
    let (mut d, leases, ls_file) = match set_up {
        Ok(x) => x,
        Err(e) => return SysResult::skipped("sanlock", &format!("set-up failed: {e:#}")),
    };
    let run = d.run.clone();
    let (start, rest) = leases.split_at(64);
    let (death_lease, many) = rest.split_at(1);

    let start64 = (|| {
        let mut s = Vec::new();
        for _ in 0..cfg.reps {
            // libvirt's pattern: register, then acquire all leases (8 per call).
            let t = Instant::now();
            let mut c = registered(&run)?;
            c.must_acquire(start)?;
            s.push(t.elapsed());
            c.release(start)?;
        }
        Ok(Samples(s))
    })()
    .map_err(fail);

    let death = (|| {
        let exe = std::env::current_exe()?;
        let mut b = registered(&run)?;
        let l = &death_lease[0];
        let mut s = Vec::new();
        for _ in 0..cfg.reps {
            let mut victim = Proc::spawn(
                "sanlock guest",
                Command::new(&exe)
                    .arg("internal-guest")
                    .arg("sanlock")
                    .arg(&run)
                    .arg(&l.path)
                    .arg(l.offset.to_string())
                    .arg(&l.name),
            )?;
            victim.wait_line("HELD")?;
            let t = Instant::now();
            victim.kill(); // SIGKILL and reap
            loop {
                match b.acquire(death_lease)? {
                    0 => break,
                    rv::EEXIST | rv::EAGAIN | rv::EBUSY
                        if t.elapsed() < Duration::from_secs(30) => {}
                    rv => bail!("acquire after owner death: {rv}"),
                }
            }
            s.push(t.elapsed());
            b.release(death_lease)?;
        }
        Ok(Samples(s))
    })()
    .map_err(fail);

    let mut memory = Err("not reached".to_owned());
    let restart = (|| {
        let idle = util::rss_bytes(d.proc.pid())?;
        let per = 100.min(many.len().max(1));
        let mut owners = Vec::new();
        let t = Instant::now();
        for chunk in many.chunks(per) {
            let mut c = registered(&run)?;
            c.must_acquire(chunk)?;
            owners.push(c);
        }
        eprintln!(
            "  sanlock: acquired {} leases in {:.1} s",
            many.len(),
            t.elapsed().as_secs_f64()
        );
        memory = Ok(Memory {
            held: many.len(),
            idle,
            loaded: util::rss_bytes(d.proc.pid())?,
        });
        // A sanlock restart: registrations die with the daemon; the lockspace must be re-joined.
        d.proc.kill();
        let t = Instant::now();
        d = start_daemon(bin, dir)?;
        join_lockspace(&d.run, &ls_file)?;
        let serving = t.elapsed();
        // Held leases: a new owner can take any of them now (checked on a sample of up to 64).
        let sample: Vec<&Lease> = many.iter().step_by((many.len() / 64).max(1)).collect();
        let mut c = registered(&d.run)?;
        let mut free = 0;
        for l in &sample {
            if c.acquire(std::slice::from_ref(*l))? == 0 {
                free += 1;
                c.release(std::slice::from_ref(*l))?;
            }
        }
        let lost = if free == sample.len() {
            many.len()
        } else {
            free * many.len() / sample.len().max(1)
        };
        drop(owners);
        Ok(Restart {
            held: many.len(),
            serving,
            all_back: None,
            lost,
            how: format!(
                "SIGKILL + start + add_lockspace; {free}/{} sampled leases free",
                sample.len()
            ),
            crash_serving: serving,
            crash_lost: lost,
        })
    })()
    .map_err(fail);
    if let (Err(e), Err(m)) = (&restart, &memory) {
        if m == "not reached" {
            memory = Err(e.clone());
        }
    }
    drop(d);
    SysResult {
        name: "sanlock",
        single: Err("not measured".into()),
        concurrent: Err("not measured".into()),
        start64,
        death,
        restart,
        memory,
    }
}

/// A takeover after a host is lost, at lockspace `io_timeout` (seconds): two daemons as two hosts
/// (host_id 1 and 2, own run directories, one lockspace file and one lease file). A guest on host
/// A registers with A and acquires the lease; B waits until it has seen A renew; then A is lost:
/// its daemon is SIGKILLed, then its guest (a crashed host: the lease stays on disk owned by
/// host_id 1; the guest is killed after the daemon so the daemon cannot release for it). B
/// retries its acquire every 50 ms until granted. No watchdog (`-w 0`): nothing fences.
pub fn takeover(bin: &Path, dir: &Path, io_timeout: u32) -> Result<Takeover> {
    std::fs::create_dir_all(dir)?;
    let mut a = start_daemon_named(bin, &dir.join("a"), "bench-host-a")?;
    let b = start_daemon_named(bin, &dir.join("b"), "bench-host-b")?;
    let ls_file = dir.join("lockspace");
    std::fs::write(&ls_file, vec![0u8; ALIGN as usize])?;
    SanlockClient::new(&a.run)
        .write_lockspace(&lockspace(0, &ls_file), io_timeout)
        .map_err(|e| anyhow::anyhow!("write_lockspace failed: {e}"))?;
    let lease = Lease {
        name: "takeover".into(),
        path: dir.join("lease"),
        offset: 0,
    };
    std::fs::File::create(&lease.path)?.set_len(ALIGN)?;
    SanlockClient::new(&a.run)
        .write_resource(&lease.spec())
        .map_err(|e| anyhow::anyhow!("write_resource failed: {e}"))?;
    // Both hosts join at once (each join takes 2–5 io_timeouts).
    let t = Instant::now();
    let (ja, jb) = std::thread::scope(|s| {
        let ja = s.spawn(|| join_as(&a.run, &ls_file, 1, io_timeout));
        let jb = s.spawn(|| join_as(&b.run, &ls_file, 2, io_timeout));
        (ja.join(), jb.join())
    });
    ja.map_err(|_| anyhow::anyhow!("join thread panicked"))??;
    jb.map_err(|_| anyhow::anyhow!("join thread panicked"))??;
    eprintln!(
        "  sanlock takeover (io_timeout {io_timeout} s): both hosts joined in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let exe = std::env::current_exe()?;
    let mut guest = Proc::spawn(
        "sanlock guest on host A",
        Command::new(&exe)
            .arg("internal-guest")
            .arg("sanlock")
            .arg(&a.run)
            .arg(&lease.path)
            .arg(lease.offset.to_string())
            .arg(&lease.name),
    )?;
    guest.wait_line("HELD")?;
    // Until B has seen A renew, A's lease is "retry later" rather than "held by a live host".
    let bc = SanlockClient::new(&b.run);
    util::wait_for(
        "host B seeing host A live",
        Duration::from_secs(u64::from(io_timeout) * 10 + 30),
        Duration::from_millis(100),
        || {
            Ok(bc
                .get_hosts(LOCKSPACE, 0)
                .map_err(|e| anyhow::anyhow!("get_hosts: {e}"))?
                .iter()
                .any(|h| h.host_id == 1 && h.state == HostState::Live)
                .then_some(()))
        },
    )?;
    let mut c = registered(&b.run)?;
    let one = std::slice::from_ref(&lease);
    match c.acquire(one)? {
        0 => bail!("host B acquired the lease host A's guest holds"),
        _refused => {}
    }
    a.proc.kill();
    let lost = Instant::now();
    guest.kill();
    // Documented: > 8·io_timeout + 60 s; allow twice that.
    let limit = Duration::from_secs(2 * (8 * u64::from(io_timeout) + 60));
    let mut codes = std::collections::BTreeSet::new();
    loop {
        match c.acquire(one)? {
            0 => break,
            rv if lost.elapsed() < limit => {
                codes.insert(rv);
                // Bounded retry (limit): the takeover is measured by polling acquires.
                std::thread::sleep(Duration::from_millis(50));
            }
            rv => bail!(
                "host B still refused {:?} after host A was lost ({rv}; seen {codes:?})",
                lost.elapsed()
            ),
        }
    }
    let took = lost.elapsed();
    eprintln!(
        "  sanlock takeover (io_timeout {io_timeout} s): B held the lease {:.1} s after A was \
         lost (refusals meanwhile: {codes:?})",
        took.as_secs_f64()
    );
    c.release(one)?;
    drop(c);
    drop(b);
    Ok(Takeover {
        timeout: format!("io_timeout {io_timeout} s"),
        loss: "SIGKILL of A's sanlock, then of its guest".into(),
        took: Samples(vec![took]),
        since_renewal: None,
        fenced: Err("nothing fences (-w 0); the guest died with its host".into()),
        fenced_first: None,
    })
}
