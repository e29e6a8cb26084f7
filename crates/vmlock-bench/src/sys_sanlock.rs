//! The real sanlock daemon (Debian's sanlock 3.8.5), driven over its UNIX-socket protocol (no CLI,
//! no libsanlock): one daemon as one host, leases in a file on the work directory's file system
//! (O_DIRECT), lockspace io_timeout 1 s, no watchdog (`-w 0`, tests only).

use crate::report::{Memory, Restart, SysResult};
use crate::util::{self, Fast, Op, Proc, Samples};
use crate::Cfg;
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MAGIC: u32 = 0x0428_2010;
const CMD_REGISTER: u32 = 1;
const CMD_ADD_LOCKSPACE: u32 = 2;
const CMD_ACQUIRE: u32 = 7;
const CMD_RELEASE: u32 = 8;
const CMD_WRITE_LOCKSPACE: u32 = 18;
const CMD_WRITE_RESOURCE: u32 = 19;
const CMD_VERSION: u32 = 28;
/// `SANLK_RES_ALIGN1M | SANLK_RES_SECTOR512` (same values for lockspaces).
const ALIGN_FLAGS: u32 = 0x10 | 0x100;
const ALIGN: u64 = 1 << 20;
const LOCKSPACE: &str = "BENCH";
/// Most leases per acquire or release call.
const MAX_PER_CALL: usize = 8;
const EEXIST: i32 = -17;
const EAGAIN: i32 = -11;
const EBUSY: i32 = -16;

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

fn put_name(b: &mut Vec<u8>, s: &str, len: usize) {
    let start = b.len();
    b.extend_from_slice(&s.as_bytes()[..s.len().min(len - 1)]);
    b.resize(start + len, 0);
}

fn disk(b: &mut Vec<u8>, path: &Path, offset: u64) {
    put_name(b, &path.to_string_lossy(), 1024);
    b.extend_from_slice(&offset.to_ne_bytes());
    b.extend_from_slice(&[0u8; 8]); // pad1, pad2
}

fn lockspace(host_id: u64, path: &Path) -> Vec<u8> {
    let mut b = Vec::with_capacity(1104);
    put_name(&mut b, LOCKSPACE, 48);
    b.extend_from_slice(&host_id.to_ne_bytes());
    b.extend_from_slice(&ALIGN_FLAGS.to_ne_bytes());
    b.extend_from_slice(&[0u8; 4]); // hole
    disk(&mut b, path, 0);
    b
}

fn resource(b: &mut Vec<u8>, lease: &Lease, with_disk: bool) {
    put_name(b, LOCKSPACE, 48);
    put_name(b, &lease.name, 48);
    b.extend_from_slice(&[0u8; 8 + 8 + 4 + 4]); // lver, data64, data32, unused
    b.extend_from_slice(&ALIGN_FLAGS.to_ne_bytes());
    b.extend_from_slice(&1u32.to_ne_bytes()); // num_disks
    if with_disk {
        disk(b, &lease.path, lease.offset);
    }
}

/// One connection to the daemon.
#[derive(Debug)]
pub struct Client {
    s: UnixStream,
}

impl Client {
    /// Connects to the daemon of `run_dir`.
    pub fn connect(run_dir: &Path) -> Result<Self> {
        let p = run_dir.join("sanlock.sock");
        let s =
            UnixStream::connect(&p).with_context(|| format!("connecting to {}", p.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Client { s })
    }

    fn send(&mut self, cmd: u32, flags: u32, data: u32, data2: u32, body: &[u8]) -> Result<()> {
        let mut f = Vec::with_capacity(32 + body.len());
        for w in [
            MAGIC,
            1,
            cmd,
            flags,
            (32 + body.len()) as u32,
            0,
            data,
            data2,
        ] {
            f.extend_from_slice(&w.to_ne_bytes());
        }
        f.extend_from_slice(body);
        self.s.write_all(&f).context("writing to sanlock")
    }

    /// Sends a request and returns the reply's result (`data`, negative on error).
    fn request(&mut self, cmd: u32, flags: u32, data: u32, data2: u32, body: &[u8]) -> Result<i32> {
        self.send(cmd, flags, data, data2, body)?;
        let mut h = [0u8; 32];
        self.s.read_exact(&mut h).context("reading from sanlock")?;
        let word =
            |i: usize| u32::from_ne_bytes([h[4 * i], h[4 * i + 1], h[4 * i + 2], h[4 * i + 3]]);
        anyhow::ensure!(word(0) == MAGIC, "bad reply magic {:#x}", word(0));
        let extra = (word(4) as usize).saturating_sub(32);
        if extra > 0 {
            let mut rest = vec![0u8; extra];
            self.s.read_exact(&mut rest)?;
        }
        Ok(word(6) as i32)
    }

    /// REGISTER: this process becomes a lease owner through this connection (no reply).
    pub fn register(&mut self) -> Result<()> {
        self.send(CMD_REGISTER, 0, 0, 0, &[])
    }

    fn leases_call(&mut self, cmd: u32, leases: &[Lease]) -> Result<i32> {
        let mut rv = 0;
        for chunk in leases.chunks(MAX_PER_CALL) {
            let mut b = Vec::new();
            for l in chunk {
                resource(&mut b, l, cmd == CMD_ACQUIRE);
            }
            if cmd == CMD_ACQUIRE {
                let mut opt = Vec::new();
                put_name(&mut opt, "vmlock-bench", 48);
                opt.extend_from_slice(&[0u8; 8]); // flags, len = 0
                b.extend_from_slice(&opt);
            }
            rv = self.request(cmd, 0, chunk.len() as u32, u32::MAX, &b)?;
            if rv != 0 {
                return Ok(rv);
            }
        }
        Ok(rv)
    }

    /// ACQUIRE for this registered connection, at most 8 per call; the first failure's result.
    pub fn acquire(&mut self, leases: &[Lease]) -> Result<i32> {
        self.leases_call(CMD_ACQUIRE, leases)
    }

    fn must_acquire(&mut self, leases: &[Lease]) -> Result<()> {
        match self.acquire(leases)? {
            0 => Ok(()),
            rv => bail!("sanlock acquire of {} failed: {rv}", leases[0].name),
        }
    }

    /// RELEASE, at most 8 per call.
    pub fn release(&mut self, leases: &[Lease]) -> Result<()> {
        match self.leases_call(CMD_RELEASE, leases)? {
            0 => Ok(()),
            rv => bail!("sanlock release of {} failed: {rv}", leases[0].name),
        }
    }
}

fn registered(run: &Path) -> Result<Client> {
    let mut c = Client::connect(run)?;
    c.register()?;
    Ok(c)
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
    .args(["-e", "vmlock-bench"])
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
            Ok(Client::connect(&run)
                .and_then(|mut c| c.request(CMD_VERSION, 0, 0, 0, &[]))
                .ok())
        },
    )?;
    Ok(Daemon { proc, run })
}

fn join_lockspace(run: &Path, file: &Path) -> Result<()> {
    let rv = Client::connect(run)?.request(CMD_ADD_LOCKSPACE, 0, 1, 0, &lockspace(1, file))?;
    anyhow::ensure!(rv == 0 || rv == EEXIST, "add_lockspace failed: {rv}");
    Ok(())
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
    let rv =
        Client::connect(&d.run)?.request(CMD_WRITE_LOCKSPACE, 0, 0, 1, &lockspace(0, &ls_file))?;
    anyhow::ensure!(rv == 0, "write_lockspace failed: {rv}");
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
    let mut c = Client::connect(&d.run)?;
    for l in &leases {
        let mut b = Vec::new();
        resource(&mut b, l, true);
        let rv = c.request(CMD_WRITE_RESOURCE, 0, 0, 0, &b)?;
        anyhow::ensure!(rv == 0, "write_resource {} failed: {rv}", l.name);
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
                    EEXIST | EAGAIN | EBUSY if t.elapsed() < Duration::from_secs(30) => {}
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
