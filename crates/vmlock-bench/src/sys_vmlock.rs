//! vmlock: a real vmlockd process, driven through `vmlock_client` (the lockd driver's client).

use crate::report::{Memory, Outcome, Restart, SysResult};
use crate::util::{self, Fast, Op, Proc, Samples};
use crate::Cfg;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmlock::{DiskMode, Error, Resource};
use vmlock_client::proto::{AcquireFlags, Reply, Request, VmIdentity};
use vmlock_client::runtime::RuntimeDir;
use vmlock_client::{Connection, Endpoint, Holder};

/// How the daemon is started.
#[derive(Debug, Clone)]
pub enum Program {
    /// A `vmlockd` binary.
    Binary(PathBuf),
    /// This program's `internal-vmlockd` (same library code as the `vmlockd` binary).
    Embedded,
}

impl Program {
    /// Description for the report.
    pub fn describe(&self) -> String {
        match self {
            Program::Binary(p) => p.display().to_string(),
            Program::Embedded => {
                "vmlock-bench internal-vmlockd (vmlockd library, same build)".into()
            }
        }
    }
}

/// A vmlockd we started; SIGKILLed and reaped by pid when dropped.
pub(crate) struct Daemon {
    pub(crate) proc: Proc,
    pub(crate) runtime: RuntimeDir,
}

fn start_daemon(program: &Program, dir: &Path) -> Result<Daemon> {
    start_daemon_with(program, dir, None)
}

/// Starts a vmlockd on the runtime directory `dir/run`, with `config` (vmlockd.toml's text)
/// written to `dir/vmlockd.toml` when given, and waits for its READY line.
pub(crate) fn start_daemon_with(
    program: &Program,
    dir: &Path,
    config: Option<&str>,
) -> Result<Daemon> {
    let runtime = RuntimeDir::resolve(Some(&dir.join("run"))).map_err(anyhow::Error::msg)?;
    let mut cmd = match program {
        Program::Binary(p) => Command::new(p),
        Program::Embedded => {
            let mut c = Command::new(std::env::current_exe().context("current exe")?);
            c.arg("internal-vmlockd");
            c
        }
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("vmlockd.log"))
        .context("vmlockd log")?;
    if let Some(text) = config {
        let file = dir.join("vmlockd.toml");
        std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
        cmd.arg("--config").arg(&file);
    }
    cmd.arg("--runtime-dir")
        .arg(runtime.path())
        .arg("--notify-stdout")
        .env("VMLOCK_LOG", "warn")
        .stderr(Stdio::from(log));
    let mut proc = Proc::spawn("vmlockd", &mut cmd)?;
    proc.wait_line("READY")?;
    Ok(Daemon { proc, runtime })
}

impl Daemon {
    pub(crate) fn endpoint(&self) -> Endpoint {
        let mut e = Endpoint::new(self.runtime.clone());
        e.auto_start = false;
        e
    }
}

pub(crate) fn vm(name: &str, pid: u32) -> VmIdentity {
    VmIdentity {
        uuid: uuid::Uuid::new_v4().to_string(),
        name: name.to_owned(),
        id: 1,
        pid,
    }
}

pub(crate) fn disk(p: &Path) -> Result<Resource> {
    Resource::disk(p, DiskMode::Exclusive).map_err(anyhow::Error::msg)
}

fn call(conn: &mut Connection, r: &Request) -> Result<Reply, Error> {
    conn.call(r, &[])
}

/// Acquire as the lockd driver does when its own process is the VM's holder: the daemon hands the
/// new descriptions back in the reply (`reply_with_fds`) and this process keeps them.
pub(crate) fn acquire(
    conn: &mut Connection,
    holder: &Holder,
    uuid: &str,
    res: &[Resource],
) -> Result<usize, Error> {
    let request = Request::Acquire {
        uuid: uuid.to_owned(),
        resources: res.to_vec(),
        flags: AcquireFlags {
            reply_with_fds: true,
            ..Default::default()
        },
    };
    match conn.call_with_fds(&request, &[])? {
        (Reply::Kept { held, locks }, fds) => {
            holder.keep_local(locks, fds)?;
            Ok(held.len())
        }
        (Reply::Held(held), _) => Ok(held.len()),
        (other, _) => Err(vmlock_client::unexpected(&other)),
    }
}

/// Release as the lockd driver does: the daemon unlocks, this process drops its own copies.
pub(crate) fn release(
    conn: &mut Connection,
    holder: &Holder,
    uuid: &str,
    res: &[Resource],
) -> Result<(), Error> {
    let request = Request::ReleaseKept {
        uuid: uuid.to_owned(),
        resources: res.to_vec(),
    };
    match conn.call(&request, &[])? {
        Reply::Held(held) => {
            let released: Vec<Resource> = held.into_iter().map(|h| h.resource).collect();
            holder.forget_local(&released);
            Ok(())
        }
        other => Err(vmlock_client::unexpected(&other)),
    }
}

/// One owner: a holder, a request connection, and its disks.
pub(crate) struct Owner {
    pub(crate) uuid: String,
    conn: Connection,
    /// `None` once stopped.
    holder: Option<Holder>,
}

impl Owner {
    pub(crate) fn acquire(&mut self, res: &[Resource]) -> Result<usize, Error> {
        match &self.holder {
            Some(h) => acquire(&mut self.conn, h, &self.uuid, res),
            None => Err(stopped()),
        }
    }

    pub(crate) fn release(&mut self, res: &[Resource]) -> Result<(), Error> {
        match &self.holder {
            Some(h) => release(&mut self.conn, h, &self.uuid, res),
            None => Err(stopped()),
        }
    }
}

fn stopped() -> Error {
    Error::ServiceUnavailable {
        reason: "holder already stopped".into(),
    }
}

impl Drop for Owner {
    /// A dropped holder whose guest lives would keep reconnecting to a daemon that is gone (its
    /// guest is this process); stop it.
    fn drop(&mut self) {
        if let Some(h) = self.holder.take() {
            h.stop();
        }
    }
}

pub(crate) fn owner(ep: &Endpoint, name: &str, pid: u32) -> Result<Owner> {
    let v = vm(name, pid);
    let holder = Holder::start(ep, v.clone()).map_err(anyhow::Error::msg)?;
    let conn = ep.connect().map_err(anyhow::Error::msg)?;
    Ok(Owner {
        uuid: v.uuid,
        conn,
        holder: Some(holder),
    })
}

pub(crate) fn pair(o: &mut Owner, res: &[Resource]) -> Result<()> {
    o.acquire(res).map_err(anyhow::Error::msg)?;
    o.release(res).map_err(anyhow::Error::msg)?;
    Ok(())
}

fn fail(e: anyhow::Error) -> String {
    format!("failed: {e:#}")
}

/// Workloads 1 and 2 against a vmlockd of their own.
pub fn fast(program: &Program, run_root: &Path, dir: &Path) -> Result<Fast> {
    let d = start_daemon(program, &run_root.join("d0"))?;
    let ep = d.endpoint();
    let me = std::process::id();
    let disks = dir.join("disks");
    let files = util::make_disks(&disks, "one", 1)?;
    let res = [disk(&files[0])?];
    let mut o = owner(&ep, "bench-single", me)?;
    let single: Op = Box::new(move || pair(&mut o, &res));
    let mut conc: Vec<Op> = Vec::new();
    for (i, f) in util::make_disks(&disks, "conc", 16)?.iter().enumerate() {
        let mut o = owner(&ep, &format!("bench-c{i}"), me)?;
        let res = [disk(f)?];
        conc.push(Box::new(move || pair(&mut o, &res)));
    }
    Ok(Fast {
        single,
        conc,
        guard: Box::new(d),
    })
}

/// Workloads 3 to 6 against fresh vmlockds.
pub fn run(cfg: &Cfg, program: &Program, run_root: &Path, dir: &Path) -> SysResult {
    let d = match start_daemon(program, &run_root.join("d1")) {
        Ok(d) => d,
        Err(e) => return SysResult::skipped("vmlock", &format!("vmlockd did not start: {e:#}")),
    };
    let ep = d.endpoint();
    let me = std::process::id();
    let disks = dir.join("disks");

    let start64 = (|| {
        let files = util::make_disks(&disks, "start", 64)?;
        let res: Vec<Resource> = files.iter().map(|f| disk(f)).collect::<Result<_>>()?;
        let mut s = Vec::new();
        for i in 0..cfg.reps {
            let mut guest = Proc::guest()?;
            let v = vm(&format!("bench-start{i}"), guest.pid());
            let t = Instant::now();
            let holder = Holder::start(&ep, v.clone()).map_err(anyhow::Error::msg)?;
            let mut conn = ep.connect().map_err(anyhow::Error::msg)?;
            let n = acquire(&mut conn, &holder, &v.uuid, &res).map_err(anyhow::Error::msg)?;
            if n != res.len() {
                bail!("acquire of {} disks granted {n}", res.len());
            }
            s.push(t.elapsed());
            release(&mut conn, &holder, &v.uuid, &res).map_err(anyhow::Error::msg)?;
            guest.kill();
            holder.join();
        }
        Ok(Samples(s))
    })()
    .map_err(fail);

    let death = (|| {
        let files = util::make_disks(&disks, "death", 1)?;
        let res = [disk(&files[0])?];
        let mut b = owner(&ep, "bench-survivor", me)?;
        let mut s = Vec::new();
        for i in 0..cfg.reps {
            let mut guest = Proc::idle_guest()?;
            let v = vm(&format!("bench-victim{i}"), guest.pid());
            let holder = Holder::start(&ep, v.clone()).map_err(anyhow::Error::msg)?;
            let mut conn = ep.connect().map_err(anyhow::Error::msg)?;
            acquire(&mut conn, &holder, &v.uuid, &res).map_err(anyhow::Error::msg)?;
            let t = Instant::now();
            guest.kill(); // SIGKILL and reap
            loop {
                match b.acquire(&res) {
                    Ok(_) => break,
                    Err(Error::Busy { .. }) => {
                        if t.elapsed() > Duration::from_secs(30) {
                            bail!("the lock was not freed within 30 s");
                        }
                    }
                    Err(e) => return Err(anyhow::Error::msg(e)),
                }
            }
            s.push(t.elapsed());
            b.release(&res).map_err(anyhow::Error::msg)?;
            holder.join();
        }
        Ok(Samples(s))
    })()
    .map_err(fail);
    drop(d);

    let (restart, memory) = many(cfg, program, run_root, dir);
    SysResult {
        name: "vmlock",
        single: Err("not measured".into()),
        concurrent: Err("not measured".into()),
        start64,
        death,
        restart,
        memory,
    }
}

/// Workloads 5 and 6: `cfg.many` locks over `cfg.many / 100` owners, then SIGKILL the daemon and
/// start a new one; the holders hand every description back.
fn many(
    cfg: &Cfg,
    program: &Program,
    run_root: &Path,
    dir: &Path,
) -> (Outcome<Restart>, Outcome<Memory>) {
    let mut memory: Option<Memory> = None;
    let r = (|| {
        let per = 100.min(cfg.many);
        let owners_n = cfg.many / per;
        let files = util::make_disks(&dir.join("disks"), "many", owners_n * per)?;
        let ddir = run_root.join("d2");
        let mut d = start_daemon(program, &ddir)?;
        let limit = util::nofile_limit(d.proc.pid());
        let ep = d.endpoint();
        let idle = util::rss_bytes(d.proc.pid())?;
        let me = std::process::id();
        let mut owners = Vec::new();
        for (i, chunk) in files.chunks(per).enumerate() {
            let mut o = owner(&ep, &format!("bench-many{i}"), me)?;
            let res: Vec<Resource> = chunk.iter().map(|f| disk(f)).collect::<Result<_>>()?;
            o.acquire(&res).map_err(|e| {
                anyhow::anyhow!(
                    "acquire of locks {}..{} failed (vmlockd open-file limit {limit:?}): {e}",
                    i * per,
                    (i + 1) * per
                )
            })?;
            owners.push((o, res));
        }
        let loaded = util::rss_bytes(d.proc.pid())?;
        memory = Some(Memory {
            held: files.len(),
            idle,
            loaded,
        });
        // Crash: SIGKILL, then a new daemon on the same runtime directory.
        d.proc.kill();
        let t = Instant::now();
        let d2 = start_daemon(program, &ddir)?;
        let ep2 = d2.endpoint();
        let mut conn = ep2.connect().map_err(anyhow::Error::msg)?;
        let serving = t.elapsed();
        let total = files.len();
        let all_back = util::wait_for(
            "every lock handed back",
            Duration::from_secs(60),
            Duration::from_millis(2),
            || {
                let Reply::Status(st) =
                    call(&mut conn, &Request::Status).map_err(anyhow::Error::msg)?
                else {
                    bail!("unexpected status reply");
                };
                let confirmed: usize = st
                    .iter()
                    .map(|o| o.resources.iter().filter(|r| r.confirmed).count())
                    .sum();
                Ok((confirmed >= total).then(|| t.elapsed()))
            },
        )
        .ok();
        let lost = util::count_unlocked(&files)?;
        for (o, res) in owners.iter_mut() {
            let _ = o.release(res);
        }
        drop(d2);
        Ok(Restart {
            held: total,
            serving,
            all_back,
            lost,
            how: "SIGKILL + start".into(),
            crash_serving: serving,
            crash_lost: lost,
        })
    })();
    let memory = memory.ok_or_else(|| match &r {
        Err(e) => format!("failed: {e:#}"),
        Ok(_) => "no sample".to_owned(),
    });
    (r.map_err(fail), memory)
}
