//! vmlock with cluster-wide locks: real vmlockd processes with `[etcd]` against a private
//! three-member etcd cluster, beside the floor of a bare etcd put + delete on the same cluster;
//! and the takeover after a host is lost (two daemons as two hosts: own runtime and lockspace
//! directories and host names, one disk file, so only etcd stands between them).

use crate::etcd_cluster::EtcdCluster;
use crate::report::Takeover;
use crate::sys_vmlock::{self, Owner, Program};
use crate::util::{self, Fast, Op, Proc, Samples};
use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use vmlock::{Error, Resource};
use vmlock_client::fence;

/// Lease TTL of the short takeover row, in seconds.
pub const SHORT_TTL: u64 = 3;
/// vmlockd's default TTL (docs/etcd.md).
pub const DEFAULT_TTL: u64 = 10;
/// How often the other host retries its acquire during a takeover.
const RETRY: Duration = Duration::from_millis(50);
/// How long a daemon may take to connect to etcd and grant its lease.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// vmlockd.toml of one host. At the default TTL every timing is vmlockd's default (K = TTL/5 =
/// 2 s, ε 1 s, T_stop 2 s); at a short TTL the tests' values (K = TTL/5, ε 0.5 s, T_stop 0.8 s),
/// which the timing rule K + ε + T_stop < TTL·(1 − ρ) allows.
fn config(endpoints: &[String], host: &str, lockspace: Option<&Path>, ttl: u64) -> String {
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    let mut text = format!("host_name = {host:?}\n");
    if let Some(dir) = lockspace {
        text += &format!("file_lockspace_dir = {:?}\n", dir.display().to_string());
    }
    text += &format!(
        "\n[etcd]\nendpoints = [{}]\nttl = {ttl}\n",
        endpoints.join(", ")
    );
    if ttl != DEFAULT_TTL {
        text += "margin_ms = 500\nfence_lead_ms = 800\n";
    }
    text
}

/// The keep-alive interval K at `ttl` (vmlockd's default, TTL/5).
fn keepalive(ttl: u64) -> Duration {
    Duration::from_millis(ttl * 1000 / 5)
}

/// The timings of `ttl` as the report prints them.
fn describe(ttl: u64) -> String {
    if ttl == DEFAULT_TTL {
        format!("TTL {ttl} s (K 2 s, ε 1 s, T_stop 2 s: defaults)")
    } else {
        format!(
            "TTL {ttl} s (K {} ms, ε 0.5 s, T_stop 0.8 s)",
            ttl * 1000 / 5
        )
    }
}

/// Acquires `res` for `o`, retrying while the daemon has no etcd lease yet (it connects in the
/// background after it says READY; nothing announces the lease).
fn acquire_when_serving(o: &mut Owner, res: &[Resource]) -> Result<(), Error> {
    let began = Instant::now();
    loop {
        match o.acquire(res) {
            Err(Error::ServiceUnavailable { reason })
                if reason.contains("not connected yet") && began.elapsed() < CONNECT_TIMEOUT =>
            {
                // Bounded poll: the daemon's first lease has no event a client can wait on.
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other.map(drop),
        }
    }
}

/// Rows 1 and 2 for vmlock with etcd (one daemon, host "bench", locks taken directly on the disk
/// files as in the plain vmlock column, plus a key in etcd per exclusive grant) and for the floor
/// (bare put + delete of a key, no transaction, no lease, through the same client library the
/// daemon uses).
pub fn fast(
    program: &Program,
    run_root: &Path,
    dir: &Path,
    cluster: &EtcdCluster,
) -> Result<(Fast, Fast)> {
    let text = config(&cluster.endpoints(), "bench", None, DEFAULT_TTL);
    let d = sys_vmlock::start_daemon_with(program, &run_root.join("e0"), Some(&text))?;
    let ep = d.endpoint();
    let me = std::process::id();
    let disks = dir.join("disks");
    let files = util::make_disks(&disks, "one", 1)?;
    let res = [sys_vmlock::disk(&files[0])?];
    let mut o = sys_vmlock::owner(&ep, "bench-single", me)?;
    acquire_when_serving(&mut o, &res).map_err(anyhow::Error::msg)?;
    o.release(&res).map_err(anyhow::Error::msg)?;
    let single: Op = Box::new(move || sys_vmlock::pair(&mut o, &res));
    let mut conc: Vec<Op> = Vec::new();
    for (i, f) in util::make_disks(&disks, "conc", 16)?.iter().enumerate() {
        let mut o = sys_vmlock::owner(&ep, &format!("bench-c{i}"), me)?;
        let res = [sys_vmlock::disk(f)?];
        conc.push(Box::new(move || sys_vmlock::pair(&mut o, &res)));
    }
    let locks = Fast {
        single,
        conc,
        guard: Box::new(d),
    };

    let etcd = vmlock_etcd::Etcd::connect(&vmlock_etcd::Config::new(
        cluster.endpoints(),
        "bench-floor",
    ))
    .context("connecting to etcd for the floor")?;
    let op = |key: String| -> Op {
        let etcd = etcd.clone();
        Box::new(move || etcd.put_delete(&key).map_err(anyhow::Error::msg))
    };
    let floor = Fast {
        single: op("/vmlock-bench/floor/single".into()),
        conc: (0..16)
            .map(|i| op(format!("/vmlock-bench/floor/c{i}")))
            .collect(),
        guard: Box::new(etcd),
    };
    Ok((locks, floor))
}

/// One takeover: what was measured.
struct Run {
    took: Duration,
    since_renewal: Duration,
    fenced: Option<Duration>,
    fenced_first: bool,
}

/// Row 7 or 8: `reps` takeovers at `ttl`. Host A (host-a) holds the disk for a guest process
/// whose supervisor is this process (its holder, and a fence watcher on A's `fence.json` as
/// `vmlock run` has); A's vmlockd is SIGSTOPped (it renews nothing, fences nothing, and its
/// process and connections stay: to the cluster that is a lost host); host B (host-b) retries
/// its acquire every 50 ms until granted.
pub fn takeover(
    program: &Program,
    run_root: &Path,
    dir: &Path,
    cluster: &EtcdCluster,
    ttl: u64,
    reps: usize,
) -> Result<Takeover> {
    let dir = dir.join(format!("takeover-ttl{ttl}"));
    let files = util::make_disks(&dir.join("disks"), "shared", 1)?;
    let res = [sys_vmlock::disk(&files[0])?];
    let lockspace_b = dir.join("lockspace-b");
    std::fs::create_dir_all(&lockspace_b)?;
    let b_daemon = sys_vmlock::start_daemon_with(
        program,
        &run_root.join(format!("eb{ttl}")),
        Some(&config(
            &cluster.endpoints(),
            "host-b",
            Some(&lockspace_b),
            ttl,
        )),
    )?;
    let mut b = sys_vmlock::owner(&b_daemon.endpoint(), "db1", std::process::id())?;
    let mut runs = Vec::new();
    for rep in 0..reps {
        let r = one_takeover(
            program,
            run_root,
            &dir,
            cluster,
            ttl,
            (rep, reps),
            &res,
            &mut b,
        )
        .with_context(|| format!("takeover {} of {reps} at TTL {ttl} s", rep + 1))?;
        eprintln!(
            "  etcd takeover (TTL {ttl} s): B held the disk {:.2} s after A's vmlockd stopped \
             ({:.2} s after A's last renewal was sent); A's guest stopped after {}",
            r.took.as_secs_f64(),
            r.since_renewal.as_secs_f64(),
            r.fenced
                .map_or("—".into(), |f| format!("{:.2} s", f.as_secs_f64()))
        );
        runs.push(r);
    }
    drop(b);
    drop(b_daemon);
    let fenced: Vec<Duration> = runs.iter().filter_map(|r| r.fenced).collect();
    Ok(Takeover {
        timeout: describe(ttl),
        loss: "SIGSTOP of A's vmlockd; A's supervisor runs on".into(),
        took: Samples(runs.iter().map(|r| r.took).collect()),
        since_renewal: Some(Samples(runs.iter().map(|r| r.since_renewal).collect())),
        fenced: if fenced.len() == runs.len() {
            Ok(Samples(fenced))
        } else {
            Err(format!(
                "guest not stopped in {} of {} runs",
                runs.len() - fenced.len(),
                runs.len()
            ))
        },
        fenced_first: Some(runs.iter().filter(|r| r.fenced_first).count()),
    })
}

#[allow(clippy::too_many_arguments)]
fn one_takeover(
    program: &Program,
    run_root: &Path,
    dir: &Path,
    cluster: &EtcdCluster,
    ttl: u64,
    (rep, reps): (usize, usize),
    res: &[Resource],
    b: &mut Owner,
) -> Result<Run> {
    let lockspace_a = dir.join(format!("lockspace-a{rep}"));
    std::fs::create_dir_all(&lockspace_a)?;
    let a_daemon = sys_vmlock::start_daemon_with(
        program,
        &run_root.join(format!("ea{ttl}-{rep}")),
        Some(&config(
            &cluster.endpoints(),
            "host-a",
            Some(&lockspace_a),
            ttl,
        )),
    )?;
    let a_run = a_daemon.runtime.path().to_path_buf();
    let guest = Proc::idle_guest()?;
    let mut a = sys_vmlock::owner(&a_daemon.endpoint(), "web1", guest.pid())?;
    acquire_when_serving(&mut a, res).map_err(|e| anyhow::anyhow!("A's acquire: {e}"))?;
    match acquire_when_serving(b, res) {
        Err(Error::Busy { .. }) => {}
        Ok(()) => bail!("B acquired the disk A holds"),
        Err(e) => bail!("B's first acquire: {e}"),
    }

    // A's supervisor's fence watcher, as `vmlock run` starts it: at D − T_stop/2 without a
    // renewal it SIGKILLs the guest (here also: waits for its exit and says when).
    util::wait_for(
        "A's fence.json",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || Ok(fence::read(&a_run)),
    )?;
    let handle =
        vmlock_sys::pidfd::ProcessHandle::open(guest.pid(), None).context("pidfd of A's guest")?;
    // The guest is this process's child, reaped only after `armed` is cleared: its pid is its own.
    let guest_pid = nix::unistd::Pid::from_raw(i32::try_from(guest.pid())?);
    let armed = Arc::new(AtomicBool::new(true));
    let (tx, rx) = mpsc::channel();
    let watching = {
        let armed = Arc::clone(&armed);
        fence::watch(&a_run, move || {
            if armed.load(Ordering::Acquire) {
                let _ = nix::sys::signal::kill(guest_pid, Signal::SIGKILL);
                handle.wait_exit(Some(Duration::from_secs(5)));
                let _ = tx.send(Instant::now());
            }
        })
    };
    anyhow::ensure!(watching, "no fence.json in {}", a_run.display());

    // The loss falls at a different phase of A's keep-alive cycle in each run: after k/reps of
    // an interval K since the file last moved (A renews around its acquire).
    std::thread::sleep(keepalive(ttl) * u32::try_from(rep)? / u32::try_from(reps.max(1))?);
    a_daemon.proc.signal(Signal::SIGSTOP)?;
    let lost = Instant::now();
    let lost_boot = fence::boot_time();
    // The daemon is stopped: its file is final. D = t_s + TTL·(1 − ρ) − ε, so t_s follows: the
    // send time of the last renewal the daemon handed to supervisors (it rewrites the file
    // within 250 ms of a renewal).
    let last = fence::read(&a_run).context("A's fence.json after the stop")?;
    let margin_ms: u64 = if ttl == DEFAULT_TTL { 1000 } else { 500 };
    let usable_ms = (ttl as f64 * 1000.0 * (1.0 - vmlock_etcd::CLOCK_RATE_BOUND)) as u64;
    let renewed_boot = Duration::from_millis(last.deadline_boot_ms + margin_ms)
        .saturating_sub(Duration::from_millis(usable_ms));
    let since = lost_boot.saturating_sub(renewed_boot);

    let limit = Duration::from_secs(ttl + 30);
    let granted_attempt = loop {
        let attempt = Instant::now();
        match b.acquire(res) {
            Ok(_) => break attempt,
            // Bounded retry (limit): the takeover is measured by polling acquires.
            Err(Error::Busy { .. }) if lost.elapsed() < limit => std::thread::sleep(RETRY),
            Err(e) => {
                armed.store(false, Ordering::Release);
                let _ = a_daemon.proc.signal(Signal::SIGCONT);
                bail!("B's acquire {:?} after the loss: {e}", lost.elapsed());
            }
        }
    };
    let took = lost.elapsed();
    let fenced_at = rx.recv_timeout(Duration::from_secs(2)).ok();
    armed.store(false, Ordering::Release);
    b.release(res).map_err(anyhow::Error::msg)?;
    // A is gone for good: its daemon (SIGKILL works on a stopped process), its holder, its guest.
    drop(a_daemon);
    drop(a);
    drop(guest);
    Ok(Run {
        took,
        since_renewal: took + since,
        fenced: fenced_at.map(|t| t.saturating_duration_since(lost)),
        fenced_first: fenced_at.is_some_and(|t| t < granted_attempt),
    })
}
