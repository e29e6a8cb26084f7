//! Shared pieces: child processes stopped by pid, sample statistics, disk files, kernel probes.

use anyhow::{bail, Context, Result};
use nix::fcntl::{fcntl, FcntlArg};
use nix::libc;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// Makes the child get SIGKILL when the thread that started it ends (the bench is interrupted), so
/// no daemon or guest outlives the bench. Children are started from the main thread.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec; it only calls prctl(2), which
    // is async-signal-safe, and touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}

/// A child process we started; SIGKILLed and reaped by its pid when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    /// What it is, for messages.
    pub name: String,
}

impl Proc {
    /// Starts `cmd` with stdout piped (read with [`Proc::wait_line`]).
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
        die_with_parent(cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            child: Some(child),
            name: name.to_owned(),
        })
    }

    /// Starts `cmd` as it is configured (standard streams untouched).
    pub fn start(name: &str, cmd: &mut Command) -> Result<Self> {
        die_with_parent(cmd);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            child: Some(child),
            name: name.to_owned(),
        })
    }

    /// A `sleep` process standing in for a guest.
    pub fn guest() -> Result<Self> {
        let mut cmd = Command::new("sleep");
        die_with_parent(&mut cmd);
        let child = cmd
            .arg("100000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting a sleep process as a guest")?;
        Ok(Proc {
            child: Some(child),
            name: "guest".into(),
        })
    }

    /// This program as an idle guest (`internal-guest idle`): the same kind of process as the
    /// virtlockd and sanlock guests of workload 4, so its exit costs the same.
    pub fn idle_guest() -> Result<Self> {
        let exe = std::env::current_exe().context("current exe")?;
        let mut p = Proc::spawn(
            "idle guest",
            Command::new(exe).arg("internal-guest").arg("idle"),
        )?;
        p.wait_line("HELD")?;
        Ok(p)
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Takes its standard output.
    pub fn stdout(&mut self) -> Option<ChildStdout> {
        self.child.as_mut().and_then(|c| c.stdout.take())
    }

    /// Reads one line of its standard output (the readiness line) and checks it.
    pub fn wait_line(&mut self, want: &str) -> Result<()> {
        let out = self.stdout().context("no stdout")?;
        let mut line = String::new();
        BufReader::new(out)
            .read_line(&mut line)
            .with_context(|| format!("reading the readiness line of {}", self.name))?;
        if line.trim() != want {
            bail!(
                "{} did not say {want} (said {:?}); it exited or failed",
                self.name,
                line.trim()
            );
        }
        Ok(())
    }

    /// Sends `sig` to it by pid.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        let pid = i32::try_from(self.pid()).context("pid")?;
        kill(Pid::from_raw(pid), sig).with_context(|| format!("signalling {}", self.name))
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Resident set size of `pid` in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("VmRSS:") {
            let kb: u64 = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .context("VmRSS")?;
            return Ok(kb * 1024);
        }
    }
    bail!("no VmRSS for pid {pid}")
}

/// Open-file limit of `pid` (soft), from /proc.
pub fn nofile_limit(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn ofd_flock(kind: libc::c_short) -> libc::flock {
    libc::flock {
        l_type: kind,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 1,
        l_pid: 0,
    }
}

/// Takes an exclusive OFD lock on byte 0 of `file`; false when someone else holds it.
pub fn ofd_try_lock(file: &File) -> Result<bool> {
    match fcntl(
        file.as_raw_fd(),
        FcntlArg::F_OFD_SETLK(&ofd_flock(libc::F_WRLCK as libc::c_short)),
    ) {
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EACCES) => Ok(false),
        Err(e) => Err(e).context("F_OFD_SETLK"),
    }
}

/// Drops the OFD lock on byte 0 of `file`.
pub fn ofd_unlock(file: &File) -> Result<()> {
    fcntl(
        file.as_raw_fd(),
        FcntlArg::F_OFD_SETLK(&ofd_flock(libc::F_UNLCK as libc::c_short)),
    )
    .context("F_OFD_SETLK unlock")?;
    Ok(())
}

/// How many of `paths` nobody holds a lock on (each probed by taking and dropping a write lock
/// from a fresh description): the locks a system lost.
pub fn count_unlocked(paths: &[PathBuf]) -> Result<usize> {
    let mut free = 0;
    for p in paths {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .with_context(|| format!("opening {}", p.display()))?;
        if ofd_try_lock(&f)? {
            free += 1;
            ofd_unlock(&f)?;
        }
    }
    Ok(free)
}

/// Creates `n` empty disk files named `prefix{i}.img` in `dir`.
pub fn make_disks(dir: &Path, prefix: &str, n: usize) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    (0..n)
        .map(|i| {
            let p = dir.join(format!("{prefix}{i}.img"));
            File::create(&p).with_context(|| format!("creating {}", p.display()))?;
            Ok(p)
        })
        .collect()
}

/// Latencies of one workload.
#[derive(Debug, Clone, Default)]
pub struct Samples(pub Vec<Duration>);

impl Samples {
    /// The `p`-th percentile (0..=100), nearest rank.
    pub fn pct(&self, p: f64) -> Duration {
        let mut v = self.0.clone();
        v.sort_unstable();
        if v.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// Runs `op` after `warmup` untimed calls until `max` samples or `budget` elapsed (at least `min`).
pub fn sample(
    warmup: usize,
    min: usize,
    max: usize,
    budget: Duration,
    mut op: impl FnMut() -> Result<()>,
) -> Result<Samples> {
    for _ in 0..warmup {
        op()?;
    }
    let start = Instant::now();
    let mut out = Vec::with_capacity(max.min(100_000));
    while out.len() < max && (out.len() < min || start.elapsed() < budget) {
        let t = Instant::now();
        op()?;
        out.push(t.elapsed());
    }
    Ok(Samples(out))
}

/// A concurrent run: every client's latencies and the wall time.
#[derive(Debug, Clone, Default)]
pub struct Concurrent {
    /// All operations' latencies.
    pub samples: Samples,
    /// Operations per second, all clients together.
    pub per_sec: f64,
}

/// Runs one thread per op, each calling its own op (after `warmup` untimed calls) until `duration`
/// passes; returns every latency and the throughput.
pub fn concurrent<F>(mut ops: Vec<F>, warmup: usize, duration: Duration) -> Result<Concurrent>
where
    F: FnMut() -> Result<()> + Send,
{
    let barrier = std::sync::Barrier::new(ops.len() + 1);
    let results: Vec<Result<Vec<Duration>>> = std::thread::scope(|s| {
        let handles: Vec<_> = ops
            .iter_mut()
            .map(|op| {
                let barrier = &barrier;
                s.spawn(move || {
                    for _ in 0..warmup {
                        op()?;
                    }
                    barrier.wait();
                    let start = Instant::now();
                    let mut v = Vec::new();
                    while start.elapsed() < duration {
                        let t = Instant::now();
                        op()?;
                        v.push(t.elapsed());
                    }
                    Ok(v)
                })
            })
            .collect();
        barrier.wait();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("client thread panicked")))
            })
            .collect()
    });
    let mut all = Vec::new();
    for r in results {
        all.extend(r?);
    }
    let per_sec = all.len() as f64 / duration.as_secs_f64();
    Ok(Concurrent {
        samples: Samples(all),
        per_sec,
    })
}

/// Polls `f` until it returns `Some`, or fails after `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    pause: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(pause);
    }
}

/// One timed operation (an acquire followed by a release).
pub type Op = Box<dyn FnMut() -> Result<()> + Send>;

/// A system set up for workloads 1 and 2, which are measured interleaved across systems.
pub struct Fast {
    /// One client's acquire + release.
    pub single: Op,
    /// 16 owners' acquire + release, each on its own disk.
    pub conc: Vec<Op>,
    /// Daemons and guests, stopped when dropped (after the ops); never read.
    #[allow(dead_code)]
    pub guard: Box<dyn Send>,
}

impl std::fmt::Debug for Fast {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fast({} concurrent ops)", self.conc.len())
    }
}

/// The idle guest's body: say HELD, wait to be killed.
pub fn idle_guest() -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout();
    writeln!(out, "HELD")?;
    out.flush()?;
    loop {
        std::thread::sleep(Duration::from_secs(1000));
    }
}
