//! `vmlock-bench`: vmlock against the real virtlockd and sanlock daemons and against the floors
//! (an in-process OFD lock + unlock, a bare UNIX-socket request/response), measured in one run and
//! printed side by side. It installs nothing: a peer that is missing is skipped and named.

mod etcd_cluster;
mod floor;
mod report;
mod sys_etcd;
mod sys_sanlock;
mod sys_virtlockd;
mod sys_vmlock;
mod util;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use report::{ClusterResult, Outcome, SysResult};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use util::{Concurrent, Samples};

#[derive(Debug, Parser)]
#[command(
    name = "vmlock-bench",
    version,
    about = "Benchmark vmlockd against virtlockd, sanlock and the OFD / UNIX-socket floors, and \
             vmlockd with etcd against a bare etcd put+delete and sanlock's host takeover"
)]
struct Cli {
    /// A short run (seconds, small counts): for CI and smoke tests.
    #[arg(long)]
    quick: bool,
    /// Also measure sanlock's host takeover at its default io_timeout (10 s: about 2.5 more
    /// minutes); without it that row prints sanlock's documented figure.
    #[arg(long)]
    slow: bool,
    /// Only workloads 1 and 2 (the interleaved rounds; with --quick, about 2 s): for tuning the
    /// request path. The other rows print "not run".
    #[arg(long)]
    fast_only: bool,
    /// Run the bench and every process it starts on this one CPU. On a virtual machine without
    /// halt polling, a wake-up on the other CPU costs tens of µs, and whether a client and its
    /// daemon share a CPU unpinned is left to the scheduler (see docs/BENCHMARKS.md).
    #[arg(long, value_name = "CPU")]
    pin_cpu: Option<usize>,
    /// Systems to measure, comma-separated: vmlock, virtlockd, sanlock, floor, etcd (the second
    /// table: vmlockd with a 3-member etcd, the bare etcd floor, and the host takeovers, of
    /// sanlock too when it is selected).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "vmlock,virtlockd,sanlock,floor,etcd"
    )]
    systems: Vec<String>,
    /// The vmlockd binary, or `builtin` for the daemon linked into this program (`vmlock-bench
    /// internal-vmlockd`). Default: `vmlockd` beside this program, else `builtin`.
    #[arg(long)]
    vmlockd: Option<PathBuf>,
    /// Held locks for workloads 5 and 6 (default 10000; 1000 with --quick).
    #[arg(long)]
    locks: Option<usize>,
    /// Held sanlock leases for workloads 5 and 6 (each needs a 1 MiB lease area written through
    /// the daemon; default 10000, 64 with --quick).
    #[arg(long)]
    sanlock_leases: Option<usize>,
    /// Directory for disks, lease files and daemon state (default: a new one under /var/tmp;
    /// must be on a file system with O_DIRECT for sanlock, so not tmpfs).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    #[command(subcommand)]
    internal: Option<Internal>,
}

#[derive(Debug, Subcommand)]
enum Internal {
    /// (internal) Run vmlockd from the library linked into this program.
    #[command(hide = true, name = "internal-vmlockd")]
    Vmlockd {
        #[command(flatten)]
        daemon: vmlockd::DaemonArgs,
    },
    /// (internal) The echo server of the socket floor.
    #[command(hide = true, name = "internal-echo")]
    Echo { socket: PathBuf },
    /// (internal) A guest that holds one lock itself and waits to be killed.
    #[command(hide = true, name = "internal-guest")]
    Guest { system: String, args: Vec<String> },
}

/// Run sizes.
#[derive(Debug, Clone)]
pub struct Cfg {
    /// Most samples of a latency workload.
    pub max_samples: usize,
    /// Time budget of a latency workload (at least 100 samples are taken).
    pub budget: Duration,
    /// Duration of a concurrent run.
    pub conc_duration: Duration,
    /// Rounds of workloads 1 and 2 (each system measured once per round, in turn).
    pub rounds: usize,
    /// Repetitions of the VM start and the owner death workloads.
    pub reps: usize,
    /// Locks held in workloads 5 and 6.
    pub many: usize,
    /// sanlock leases held in workloads 5 and 6.
    pub sanlock_many: usize,
    /// Takeovers at the short etcd TTL (row 7).
    pub takeover_reps: usize,
    /// Whether the slow rows run (takeovers at the default timeouts: etcd's TTL 10 s, and with
    /// `--slow` sanlock's io_timeout 10 s), and sanlock's at io_timeout 1 s.
    pub full_takeovers: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.internal {
        Some(Internal::Vmlockd { daemon }) => return vmlockd::daemon_main(daemon),
        Some(Internal::Echo { socket }) => return floor::echo_server(&socket),
        Some(Internal::Guest { system, args }) => {
            return match system.as_str() {
                "virtlockd" => sys_virtlockd::guest(&args),
                "sanlock" => sys_sanlock::guest(&args),
                "idle" => util::idle_guest(),
                other => anyhow::bail!("unknown guest kind {other}"),
            }
        }
        None => {}
    }
    let began = Instant::now();
    let load_before = loadavg();
    let want = |s: &str| cli.systems.iter().any(|x| x == s);
    for s in &cli.systems {
        anyhow::ensure!(
            ["vmlock", "virtlockd", "sanlock", "floor", "etcd"].contains(&s.as_str()),
            "unknown system {s}: use vmlock, virtlockd, sanlock, floor, etcd"
        );
    }
    // A private mount namespace first, while this process has one thread: virtlockd's socket path
    // is fixed, so it gets a private /run; sanlock's log file goes to a private /var/log.
    let namespace = if want("virtlockd") || want("sanlock") {
        private_namespace().map_err(|e| format!("{e:#}"))
    } else {
        Err("not needed".into())
    };
    let fd_limit = raise_fd_limit();
    if let Some(cpu) = cli.pin_cpu {
        // Inherited by every thread and child started from here on.
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu)
            .and_then(|()| nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set))
            .with_context(|| format!("pinning the bench to CPU {cpu}"))?;
    }
    let cfg = if cli.quick {
        Cfg {
            max_samples: 300,
            budget: Duration::from_millis(300),
            conc_duration: Duration::from_millis(300),
            reps: 3,
            rounds: 2,
            many: cli.locks.unwrap_or(1000),
            sanlock_many: cli.sanlock_leases.unwrap_or(64),
            takeover_reps: 1,
            full_takeovers: false,
        }
    } else {
        Cfg {
            max_samples: 20_000,
            budget: Duration::from_secs(4),
            conc_duration: Duration::from_secs(3),
            reps: 30,
            rounds: 8,
            many: cli.locks.unwrap_or(10_000),
            sanlock_many: cli.sanlock_leases.unwrap_or(10_000),
            takeover_reps: 3,
            full_takeovers: true,
        }
    };
    let tmp;
    let dir: &Path = match &cli.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d
        }
        None => {
            tmp = TempDir::new(Path::new("/var/tmp"))?;
            &tmp.0
        }
    };
    // vmlockd's runtime directory (socket, state journal) lives on tmpfs as in production
    // (/run/vmlock); disks stay in the work directory.
    let run_tmp = TempDir::new(Path::new("/run")).ok();
    let run_root: PathBuf = match &run_tmp {
        Some(t) => t.0.clone(),
        None => dir.join("vmlock-run"),
    };
    let program = match &cli.vmlockd {
        Some(p) if p.as_os_str() == "builtin" => sys_vmlock::Program::Embedded,
        Some(p) => sys_vmlock::Program::Binary(p.clone()),
        None => std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("vmlockd")))
            .filter(|p| p.is_file())
            .map_or(sys_vmlock::Program::Embedded, sys_vmlock::Program::Binary),
    };

    let mut notes: Vec<String> = Vec::new();
    let stage = |name: &str| eprintln!("[{:>6.1}s] {name}", began.elapsed().as_secs_f64());
    // Which peers are here (nothing is installed).
    let virtlockd_bin: Result<PathBuf, String> = if !want("virtlockd") {
        Err("not selected".into())
    } else if let Err(why) = &namespace {
        Err(format!(
            "no private mount namespace for its fixed socket: {why}"
        ))
    } else {
        sys_virtlockd::find().ok_or_else(|| "not installed (package libvirt-daemon-lock)".into())
    };
    let sanlock_bin: Result<PathBuf, String> = if want("sanlock") {
        sys_sanlock::find().ok_or_else(|| "not installed (package sanlock)".into())
    } else {
        Err("not selected".into())
    };
    for (name, bin, version_args) in [
        ("virtlockd", &virtlockd_bin, &["--version"][..]),
        ("sanlock", &sanlock_bin, &["version"][..]),
    ] {
        notes.push(match bin {
            Ok(b) => format!("{name}: {} ({})", b.display(), version_of(b, version_args)),
            Err(why) => format!("{name}: skipped: {why}"),
        });
    }
    let failed = |e: anyhow::Error| format!("failed: {e:#}");

    // Workloads 1 and 2 for every system at once, measured in interleaved rounds: load from
    // elsewhere on the machine then falls on every column alike.
    stage("workloads 1-2: set-up");
    let fasts: Vec<Result<util::Fast, String>> = vec![
        if want("vmlock") {
            sys_vmlock::fast(&program, &run_root, &dir.join("vmlock")).map_err(failed)
        } else {
            Err("not selected".into())
        },
        virtlockd_bin
            .clone()
            .and_then(|b| sys_virtlockd::fast(&b, &dir.join("virtlockd")).map_err(failed)),
        sanlock_bin
            .clone()
            .and_then(|b| sys_sanlock::fast(&b, &dir.join("sanlock")).map_err(failed)),
        if want("floor") {
            floor::ofd_fast(&dir.join("floor")).map_err(failed)
        } else {
            Err("not selected".into())
        },
        if want("floor") {
            floor::sock_fast(&dir.join("floor")).map_err(failed)
        } else {
            Err("not selected".into())
        },
    ];
    stage("workloads 1-2: interleaved rounds");
    let (singles, concs) = interleave(
        &cfg,
        fasts,
        &[
            "vmlock",
            "virtlockd",
            "sanlock",
            "OFD floor",
            "socket floor",
        ],
    );

    // `--fast-only` measures nothing more: rows 3-6 and the cluster table are not run.
    let want_slow = |s: &str| want(s) && !cli.fast_only;
    let not_run = if cli.fast_only {
        "not run (--fast-only)"
    } else {
        "not selected"
    };
    stage("workloads 3-6: vmlock");
    let mut results = vec![if want_slow("vmlock") {
        sys_vmlock::run(&cfg, &program, &run_root, &dir.join("vmlock"))
    } else {
        SysResult::skipped("vmlock", not_run)
    }];
    stage("workloads 3-6: virtlockd");
    results.push(match &virtlockd_bin {
        _ if cli.fast_only => SysResult::skipped("virtlockd", not_run),
        Ok(b) => sys_virtlockd::run(&cfg, b, &dir.join("virtlockd")),
        Err(why) => SysResult::skipped("virtlockd", why),
    });
    stage("workloads 3-6: sanlock");
    results.push(match &sanlock_bin {
        _ if cli.fast_only => SysResult::skipped("sanlock", not_run),
        Ok(b) => sys_sanlock::run(&cfg, b, &dir.join("sanlock")),
        Err(why) => SysResult::skipped("sanlock", why),
    });
    results.push(SysResult::floor(
        "OFD floor",
        Err(String::new()),
        Err(String::new()),
    ));
    results.push(SysResult::floor(
        "socket floor",
        Err(String::new()),
        Err(String::new()),
    ));
    for (r, (single, conc)) in results.iter_mut().zip(singles.into_iter().zip(concs)) {
        r.single = single;
        r.concurrent = conc;
    }
    let etcd_bin: Result<PathBuf, String> = if want("etcd") {
        etcd_cluster::find().ok_or_else(|| "not installed (package etcd-server)".into())
    } else {
        Err("not selected".into())
    };
    if want("etcd") {
        notes.push(match &etcd_bin {
            Ok(b) => format!("etcd: {} ({})", b.display(), version_of(b, &["--version"])),
            Err(why) => format!("etcd: skipped: {why}"),
        });
    }
    let cluster_results = if want_slow("etcd") {
        let sanlock = results
            .get(2)
            .map(|r| (r.single.clone(), r.concurrent.clone()));
        Some(cluster_rows(
            &cfg,
            &cli,
            &etcd_bin,
            &sanlock_bin,
            sanlock,
            &program,
            &run_root,
            dir,
            &stage,
        ))
    } else {
        None
    };
    stage("done");

    println!(
        "# vmlock-bench results{}\n",
        if cli.quick { " (--quick)" } else { "" }
    );
    println!("vmlockd: {}", program.describe());
    println!(
        "vmlockd runtime directory (socket, state journal) under: {}",
        run_root.display()
    );
    println!("open-file limit of the bench (inherited by the daemons): {fd_limit}");
    println!(
        "CPUs: {}; idle: {}",
        match cli.pin_cpu {
            Some(cpu) => format!("everything pinned to CPU {cpu} (--pin-cpu)"),
            None => format!(
                "{} online, not pinned",
                std::thread::available_parallelism().map_or(0, |n| n.get())
            ),
        },
        idle_facts()
    );
    println!(
        "private mount namespace (/run, /var/log on tmpfs): {}",
        match &namespace {
            Ok(()) => "yes".to_owned(),
            Err(e) => format!("no ({e})"),
        }
    );
    println!("total run time: {:.1} s\n", began.elapsed().as_secs_f64());
    if ["vmlock", "virtlockd", "sanlock", "floor"]
        .iter()
        .any(|s| want(s))
    {
        print!("{}", report::table(&results));
        println!();
        println!(
            "Times: row 1 and 2 samples are one acquire followed by one release (two requests);"
        );
        println!("the socket floor likewise does two request/response round trips per sample.");
        println!("Ratios are vmlock ÷ column, on the same row (for pairs/s, above 1 means vmlock is faster).");
    }
    if let Some(c) = &cluster_results {
        println!();
        println!("## Cluster-wide locks (issue 14)\n");
        print!("{}", report::cluster_table(c));
        println!();
        println!(
            "Rows 1-2: vmlockd with [etcd] (3 members on loopback) also takes a key per exclusive"
        );
        println!(
            "grant and deletes it on release; the floor is a bare put then delete of one key."
        );
        println!("Rows 7-8: host A holds a disk for a guest, A is lost, host B retries its acquire every");
        println!("50 ms; \"loss\" says how A was lost. Ratios are vmlock + etcd ÷ column.");
    }
    println!("load average before / after: {load_before} / {}", loadavg());
    println!();
    println!("Peers:");
    for n in notes {
        println!("- {n}");
    }
    Ok(())
}

/// The cluster table's columns: vmlock with etcd, the bare etcd floor, sanlock (rows 1-2 from the
/// first table, `sanlock`, whose lockspace has the same io_timeout 1 s as row 7's).
#[allow(clippy::too_many_arguments)]
fn cluster_rows(
    cfg: &Cfg,
    cli: &Cli,
    etcd_bin: &Result<PathBuf, String>,
    sanlock_bin: &Result<PathBuf, String>,
    sanlock: Option<(Outcome<Samples>, Outcome<Concurrent>)>,
    program: &sys_vmlock::Program,
    run_root: &Path,
    dir: &Path,
    stage: &dyn Fn(&str),
) -> Vec<ClusterResult> {
    let failed = |e: anyhow::Error| format!("failed: {e:#}");
    let mut locks = ClusterResult::skipped("vmlock + etcd (3 members)", "");
    let mut floor = ClusterResult::skipped("etcd put+delete floor", "");
    let mut san = ClusterResult::skipped("sanlock", "");
    stage("cluster rows: etcd set-up");
    let cluster = etcd_bin
        .clone()
        .and_then(|b| etcd_cluster::EtcdCluster::start(&b, &dir.join("etcd"), 3).map_err(failed));
    match &cluster {
        Ok(cluster) => {
            let fasts = match sys_etcd::fast(program, run_root, &dir.join("vmlock-etcd"), cluster) {
                Ok((l, f)) => vec![Ok(l), Ok(f)],
                Err(e) => vec![Err(failed(e)), Err("not measured".into())],
            };
            stage("cluster rows 1-2: interleaved rounds");
            let (singles, concs) = interleave(cfg, fasts, &["vmlock + etcd", "etcd floor"]);
            for (r, (single, conc)) in [&mut locks, &mut floor]
                .into_iter()
                .zip(singles.into_iter().zip(concs))
            {
                r.single = single;
                r.concurrent = conc;
            }
            stage("cluster row 7: vmlock + etcd takeover, short TTL");
            let ttl = sys_etcd::SHORT_TTL;
            locks.takeover_short = sys_etcd::takeover(
                program,
                run_root,
                &dir.join("vmlock-etcd"),
                cluster,
                ttl,
                cfg.takeover_reps,
            )
            .map_err(failed);
            locks.takeover_default = if cfg.full_takeovers {
                stage("cluster row 8: vmlock + etcd takeover, default TTL");
                sys_etcd::takeover(
                    program,
                    run_root,
                    &dir.join("vmlock-etcd"),
                    cluster,
                    sys_etcd::DEFAULT_TTL,
                    1,
                )
                .map_err(failed)
            } else {
                Err(format!(
                    "not measured with --quick (docs/etcd.md: ≈ TTL, {} s)",
                    sys_etcd::DEFAULT_TTL
                ))
            };
        }
        Err(why) => {
            locks = ClusterResult::skipped("vmlock + etcd (3 members)", why);
            floor = ClusterResult::skipped("etcd put+delete floor", why);
        }
    }
    drop(cluster);
    let not_lock = "not a lock manager".to_owned();
    floor.takeover_short = Err(not_lock.clone());
    floor.takeover_default = Err(not_lock);
    match sanlock_bin {
        Ok(bin) => {
            if let Some((single, conc)) = sanlock {
                san.single = single;
                san.concurrent = conc;
            }
            san.takeover_short = if cfg.full_takeovers {
                stage("cluster row 7: sanlock takeover, io_timeout 1 s");
                sys_sanlock::takeover(bin, &dir.join("sanlock-takeover-1"), 1).map_err(failed)
            } else {
                Err(
                    "not measured with --quick (docs/sanlock.md: > 8·io_timeout + 60 s ≈ 70 s)"
                        .into(),
                )
            };
            san.takeover_default = if cli.slow {
                stage("cluster row 8: sanlock takeover, io_timeout 10 s");
                sys_sanlock::takeover(bin, &dir.join("sanlock-takeover-10"), 10).map_err(failed)
            } else {
                Err(
                    "only with --slow (docs/sanlock.md: > 8·io_timeout + 60 s ≈ 140 s at io_timeout 10)"
                        .into(),
                )
            };
        }
        Err(why) => san = ClusterResult::skipped("sanlock", why),
    }
    vec![locks, floor, san]
}

/// Workloads 1 and 2, system after system in `cfg.rounds` rounds; samples of all rounds pooled.
fn interleave(
    cfg: &Cfg,
    mut fasts: Vec<Result<util::Fast, String>>,
    names: &[&str],
) -> (Vec<Outcome<Samples>>, Vec<Outcome<Concurrent>>) {
    let rounds = cfg.rounds.max(1);
    let budget = cfg.budget / rounds as u32;
    let duration = cfg.conc_duration / rounds as u32;
    let mut singles: Vec<Outcome<Samples>> = fasts
        .iter()
        .map(|f| f.as_ref().map(|_| Samples::default()).map_err(Clone::clone))
        .collect();
    let mut concs: Vec<Outcome<Samples>> = singles.clone();
    for round in 0..rounds {
        let mut line = format!("  round {}/{rounds} p50 (1 client / 16 owners):", round + 1);
        for (i, fast) in fasts.iter_mut().enumerate() {
            let Ok(f) = fast else { continue };
            if singles[i].is_ok() {
                let warmup = if round == 0 { 50 } else { 5 };
                let min = (100 / rounds).max(1);
                let r = util::sample(warmup, min, cfg.max_samples / rounds, budget, || {
                    (f.single)()
                });
                if let Ok(s) = &r {
                    let name = names.get(i).copied().unwrap_or("?");
                    line += &format!(" {name} {:.1} µs", s.pct(50.0).as_secs_f64() * 1e6);
                }
                singles[i] = match (
                    std::mem::replace(&mut singles[i], Ok(Samples::default())),
                    r,
                ) {
                    (Ok(mut acc), Ok(s)) => {
                        acc.0.extend(s.0);
                        Ok(acc)
                    }
                    (_, Err(e)) => Err(format!("failed: {e:#}")),
                    (Err(e), _) => Err(e),
                };
            }
            if concs[i].is_ok() {
                let warmup = if round == 0 { 20 } else { 2 };
                let ops: Vec<_> = f.conc.iter_mut().map(|op| move || op()).collect();
                let r = util::concurrent(ops, warmup, duration);
                if let Ok(c) = &r {
                    line += &format!(" / {:.1} µs;", c.samples.pct(50.0).as_secs_f64() * 1e6);
                }
                concs[i] = match (std::mem::replace(&mut concs[i], Ok(Samples::default())), r) {
                    (Ok(mut acc), Ok(c)) => {
                        acc.0.extend(c.samples.0);
                        Ok(acc)
                    }
                    (_, Err(e)) => Err(format!("failed: {e:#}")),
                    (Err(e), _) => Err(e),
                };
            }
        }
        eprintln!("{line}");
    }
    drop(fasts);
    let total = (duration * rounds as u32).as_secs_f64();
    let concs = concs
        .into_iter()
        .map(|c| {
            c.map(|samples| Concurrent {
                per_sec: samples.len() as f64 / total,
                samples,
            })
        })
        .collect();
    (singles, concs)
}

/// How this machine's idle CPUs wake (a wake-up on an idle CPU is the largest part of a
/// request's time when client and daemon are on different CPUs).
fn idle_facts() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "?".into())
    };
    let driver = read("/sys/devices/system/cpu/cpuidle/current_driver");
    match driver.as_str() {
        "haltpoll" => format!(
            "cpuidle haltpoll, guest_halt_poll_ns {}",
            read("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
        ),
        other => format!("cpuidle {other}"),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn version_of(bin: &Path, args: &[&str]) -> String {
    std::process::Command::new(bin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned()
                + &String::from_utf8_lossy(&o.stderr);
            text.lines().next().map(|l| l.trim().to_owned())
        })
        .unwrap_or_else(|| "version unknown".into())
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(base: &Path) -> Result<Self> {
        let p = base.join(format!(
            "vmlock-bench-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn raise_fd_limit() -> String {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => format!("raised from {soft} to {hard}"),
            Err(e) => format!("{soft} (raising to {hard} failed: {e})"),
        },
        Ok((soft, _)) => soft.to_string(),
        Err(e) => format!("unknown ({e})"),
    }
}

fn private_namespace() -> Result<()> {
    use nix::mount::{mount, MsFlags};
    anyhow::ensure!(nix::unistd::geteuid().is_root(), "needs root");
    vmlock_sys::mountns::enter_private().context("entering a private mount namespace")?;
    for target in ["/run", "/var/log"] {
        mount(
            Some("tmpfs"),
            target,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("mode=755"),
        )
        .with_context(|| format!("mounting a tmpfs on {target}"))?;
    }
    std::fs::create_dir_all("/run/libvirt").context("creating /run/libvirt")?;
    Ok(())
}
