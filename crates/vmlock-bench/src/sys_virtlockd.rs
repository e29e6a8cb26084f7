//! The real virtlockd (Debian's libvirt-daemon-lock), driven over its own socket protocol (libvirt
//! RPC framing with XDR bodies: the codec is `vmlock_bench::virtlockd_proto`). Runs in the bench's
//! private mount namespace, which has its own /run.

use crate::report::{Memory, Restart, SysResult};
use crate::util::{self, Fast, Op, Proc, Samples};
use crate::Cfg;
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmlock_bench::virtlockd_proto::{
    self as proto, RemoteError, ERR_BUSY, PROC_ACQUIRE, PROC_REGISTER, PROC_RELEASE,
};

const SOCKET: &str = "/run/libvirt/virtlockd-sock";
const RESTART_STATE: &str = "/run/virtlockd-restart-exec.json";

/// The virtlockd binary, if installed.
pub fn find() -> Option<PathBuf> {
    ["/usr/sbin/virtlockd", "/usr/bin/virtlockd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// One connection to virtlockd.
#[derive(Debug)]
pub struct Client {
    s: UnixStream,
    serial: u32,
}

impl Client {
    /// Connects to the fixed socket.
    pub fn connect() -> Result<Self> {
        let s = UnixStream::connect(SOCKET).with_context(|| format!("connecting to {SOCKET}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Client { s, serial: 0 })
    }

    fn call(&mut self, procedure: u32, body: &[u8]) -> Result<Result<(), RemoteError>> {
        let frame = proto::encode_call(procedure, self.serial, body);
        self.s.write_all(&frame).context("writing to virtlockd")?;
        let mut len = [0u8; 4];
        self.s
            .read_exact(&mut len)
            .context("reading from virtlockd")?;
        let mut rest = vec![0u8; proto::frame_len(len)? - 4];
        self.s
            .read_exact(&mut rest)
            .context("reading from virtlockd")?;
        let reply = proto::decode_reply(&rest, procedure, self.serial)?;
        self.serial = self.serial.wrapping_add(1);
        Ok(reply)
    }

    /// REGISTER the owner `pid` (a live process: virtlockd kills owners whose connection closes).
    pub fn register(&mut self, name: &str, pid: u32) -> Result<()> {
        let body = proto::register_body(uuid::Uuid::new_v4().as_bytes(), name, pid);
        self.call(PROC_REGISTER, &body)?
            .map_err(|e| anyhow::anyhow!("REGISTER: {e}"))
    }

    fn resource_call(&mut self, procedure: u32, path: &Path) -> Result<Result<(), RemoteError>> {
        self.call(procedure, &proto::resource_body(&path.to_string_lossy()))
    }

    /// ACQUIRE_RESOURCE of `path`, exclusive.
    pub fn acquire(&mut self, path: &Path) -> Result<Result<(), RemoteError>> {
        self.resource_call(PROC_ACQUIRE, path)
    }

    /// RELEASE_RESOURCE of `path`.
    pub fn release(&mut self, path: &Path) -> Result<()> {
        self.resource_call(PROC_RELEASE, path)?
            .map_err(|e| anyhow::anyhow!("RELEASE_RESOURCE {}: {e}", path.display()))
    }

    fn must_acquire(&mut self, path: &Path) -> Result<()> {
        self.acquire(path)?
            .map_err(|e| anyhow::anyhow!("ACQUIRE_RESOURCE {}: {e}", path.display()))
    }
}

/// The guest of workload 4: registers itself as owner (as QEMU does through the leaked
/// connection), takes the disk, says HELD and waits to be killed.
pub fn guest(args: &[String]) -> Result<()> {
    let path = args
        .first()
        .context("usage: internal-guest virtlockd PATH")?;
    let mut c = Client::connect()?;
    c.register("bench-victim", std::process::id())?;
    c.must_acquire(Path::new(path))?;
    let mut out = std::io::stdout();
    writeln!(out, "HELD")?;
    out.flush()?;
    loop {
        std::thread::sleep(Duration::from_secs(1000));
    }
}

fn start_daemon(bin: &Path, dir: &Path) -> Result<Proc> {
    std::fs::create_dir_all(dir)?;
    let _ = std::fs::remove_file(SOCKET);
    let log = std::fs::File::create(dir.join("virtlockd.log"))?;
    let mut cmd = Command::new(bin);
    cmd.arg("-p")
        .arg(dir.join("virtlockd.pid"))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log));
    let mut p = Proc::start("virtlockd", &mut cmd)?;
    util::wait_for(
        "virtlockd's socket",
        Duration::from_secs(10),
        Duration::from_millis(2),
        || {
            if !p.running() {
                bail!(
                    "virtlockd exited; see {}",
                    dir.join("virtlockd.log").display()
                );
            }
            Ok(Client::connect().ok())
        },
    )?;
    Ok(p)
}

fn fail(e: anyhow::Error) -> String {
    format!("failed: {e:#}")
}

/// An owner: a guest process and a bench connection registered for it.
fn owner(name: &str) -> Result<(Proc, Client)> {
    let g = Proc::guest()?;
    let mut c = Client::connect()?;
    c.register(name, g.pid())?;
    Ok((g, c))
}

/// Workloads 1 and 2 against a virtlockd of their own (stopped before [`run`] starts one).
pub fn fast(bin: &Path, dir: &Path) -> Result<Fast> {
    let daemon = start_daemon(bin, &dir.join("fast"))?;
    let disks = dir.join("disks");
    let mut guests = Vec::new();
    let files = util::make_disks(&disks, "one", 1)?;
    let (g, mut c) = owner("bench-single")?;
    guests.push(g);
    let f = files[0].clone();
    let single: Op = Box::new(move || {
        c.must_acquire(&f)?;
        c.release(&f)
    });
    let mut conc: Vec<Op> = Vec::new();
    for (i, f) in util::make_disks(&disks, "conc", 16)?
        .into_iter()
        .enumerate()
    {
        let (g, mut c) = owner(&format!("bench-c{i}"))?;
        guests.push(g);
        conc.push(Box::new(move || {
            c.must_acquire(&f)?;
            c.release(&f)
        }));
    }
    Ok(Fast {
        single,
        conc,
        guard: Box::new((guests, daemon)),
    })
}

/// Workloads 3 to 6 against a fresh virtlockd.
pub fn run(cfg: &Cfg, bin: &Path, dir: &Path) -> SysResult {
    let mut daemon = match start_daemon(bin, dir) {
        Ok(d) => d,
        Err(e) => return SysResult::skipped("virtlockd", &format!("did not start: {e:#}")),
    };
    let disks = dir.join("disks");

    let start64 = (|| {
        let files = util::make_disks(&disks, "start", 64)?;
        let mut s = Vec::new();
        for i in 0..cfg.reps {
            let guest = Proc::guest()?;
            // The lockd plugin's pattern: a new connection, REGISTER, one ACQUIRE per disk.
            let t = Instant::now();
            let mut c = Client::connect()?;
            c.register(&format!("bench-start{i}"), guest.pid())?;
            for f in &files {
                c.must_acquire(f)?;
            }
            s.push(t.elapsed());
            for f in &files {
                c.release(f)?;
            }
        }
        Ok(Samples(s))
    })()
    .map_err(fail);

    let death = (|| {
        let files = util::make_disks(&disks, "death", 1)?;
        let (_gb, mut b) = owner("bench-survivor")?;
        let exe = std::env::current_exe()?;
        let mut s = Vec::new();
        for _ in 0..cfg.reps {
            let mut victim = Proc::spawn(
                "virtlockd guest",
                Command::new(&exe)
                    .arg("internal-guest")
                    .arg("virtlockd")
                    .arg(&files[0]),
            )?;
            victim.wait_line("HELD")?;
            let t = Instant::now();
            victim.kill(); // SIGKILL and reap
            loop {
                match b.acquire(&files[0])? {
                    Ok(()) => break,
                    Err(e) if e.code == ERR_BUSY && t.elapsed() < Duration::from_secs(30) => {}
                    Err(e) => bail!("{e}"),
                }
            }
            s.push(t.elapsed());
            b.release(&files[0])?;
        }
        Ok(Samples(s))
    })()
    .map_err(fail);

    let mut memory = Err("not reached".to_owned());
    let restart = (|| {
        let daemon = &mut daemon;
        let per = 100.min(cfg.many);
        let files = util::make_disks(&disks, "many", cfg.many / per * per)?;
        let idle = util::rss_bytes(daemon.pid())?;
        let mut owners = Vec::new();
        for (i, chunk) in files.chunks(per).enumerate() {
            let (g, mut c) = owner(&format!("bench-many{i}"))?;
            for f in chunk {
                c.must_acquire(f)?;
            }
            owners.push((g, c));
        }
        memory = Ok(Memory {
            held: files.len(),
            idle,
            loaded: util::rss_bytes(daemon.pid())?,
        });
        // virtlockd's only restart that keeps locks: SIGUSR1 re-executes it in place, handing its
        // state and descriptors to the new image through a file in /run.
        let t = Instant::now();
        daemon.signal(nix::sys::signal::Signal::SIGUSR1)?;
        util::wait_for(
            "virtlockd to write its re-exec state",
            Duration::from_secs(10),
            Duration::ZERO,
            || Ok(Path::new(RESTART_STATE).exists().then_some(())),
        )?;
        util::wait_for(
            "virtlockd to read its re-exec state",
            Duration::from_secs(60),
            Duration::from_micros(200),
            || Ok((!Path::new(RESTART_STATE).exists()).then_some(())),
        )?;
        let (_g, mut probe) = owner("bench-probe")?;
        let serving = t.elapsed();
        // Every lock must still be refused to another owner, and still be held in the kernel.
        let mut lost_daemon = 0;
        for f in &files {
            if probe.acquire(f)?.is_ok() {
                lost_daemon += 1;
                probe.release(f)?;
            }
        }
        let lost = util::count_unlocked(&files)?.max(lost_daemon);
        // A crash or stop instead (SIGKILL, then a new virtlockd): what survives?
        drop(probe);
        drop(owners);
        daemon.kill();
        let t = Instant::now();
        *daemon = start_daemon(bin, &dir.join("crash"))?;
        let (_g, _c) = owner("bench-probe")?;
        let crash_serving = t.elapsed();
        let crash_lost = util::count_unlocked(&files)?;
        Ok(Restart {
            held: files.len(),
            serving,
            all_back: Some(serving),
            lost,
            how: "SIGUSR1 re-exec".into(),
            crash_serving,
            crash_lost,
        })
    })()
    .map_err(fail);
    if let (Err(e), Err(m)) = (&restart, &memory) {
        if m == "not reached" {
            memory = Err(e.clone());
        }
    }
    drop(daemon);
    SysResult {
        name: "virtlockd",
        single: Err("not measured".into()),
        concurrent: Err("not measured".into()),
        start64,
        death,
        restart,
        memory,
    }
}
