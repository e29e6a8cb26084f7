//! `vmlock-torture [--driver lockd|sanlock] --seed S --ops N [--duration SECS] [--vmlock PATH]`: one
//! campaign against the `vmlock` beside this binary (or `--vmlock`), one table; exit status 1 if a
//! must-be-0 row is not 0, 2 if the campaign itself failed, 3 if it could not run here (skipped:
//! sanlock not installed).

use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "vmlock-torture",
    about = "Torture campaign against vmlock's lockd or sanlock driver"
)]
struct Args {
    /// The driver: lockd (vmlockd), or sanlock (two sanlock daemons as two hosts; the lockd-only
    /// options below do not apply to it).
    #[arg(long, default_value = "lockd", value_parser = ["lockd", "sanlock"])]
    driver: String,
    /// Seed of every choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Operations to do (faults included).
    #[arg(long, default_value_t = 1000)]
    ops: u64,
    /// Stop earlier after this many seconds.
    #[arg(long)]
    duration: Option<u64>,
    /// The `vmlock` binary (default: the one beside this binary).
    #[arg(long)]
    vmlock: Option<PathBuf>,
    /// Disks the VMs fight over.
    #[arg(long, default_value_t = 6)]
    disks: usize,
    /// VMs (at most this many guests at once).
    #[arg(long, default_value_t = 4)]
    vms: usize,
    /// Keep the working directory.
    #[arg(long)]
    keep: bool,
    /// Print every operation.
    #[arg(long)]
    verbose: bool,
    /// Run vmlockd with cluster locks in the etcd cluster at these endpoints (comma-separated
    /// client URLs); no key may be left at the end.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Sabotage, to show the stall row can fail: SIGSTOP vmlockd for 150 ms under each status
    /// probe taken while something is stuck.
    #[arg(long)]
    sabotage_stall: bool,
    /// Never open 2,000–3,000 idle connections at once (one idle-connections fault in four does
    /// by default).
    #[arg(long)]
    no_idle_burst: bool,
    /// Do not probe a refused acquire of a disk the campaign locked itself, outside vmlock (the
    /// refusal names a foreign holder, which once stalled on hung storage).
    #[arg(long)]
    no_foreign_holder_probe: bool,
}

fn main() {
    if let Some(code) = vmlock_torture::guest_main_if_asked() {
        std::process::exit(code);
    }
    let args = Args::parse();
    std::process::exit(match run(args) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("vmlock-torture: {e:#}");
            2
        }
    });
}

fn run(args: Args) -> anyhow::Result<bool> {
    let me = std::env::current_exe()?;
    let vmlock = match args.vmlock {
        Some(v) => v,
        None => me
            .parent()
            .map(|d| d.join("vmlock"))
            .ok_or_else(|| anyhow::anyhow!("no directory for {}", me.display()))?,
    };
    anyhow::ensure!(
        vmlock.exists(),
        "no vmlock binary at {} (build vmlock-cli, or pass --vmlock)",
        vmlock.display()
    );
    let mut opts = vmlock_torture::Options::new(args.seed, args.ops, vmlock, me);
    if args.driver == "sanlock" {
        anyhow::ensure!(
            args.etcd.is_empty()
                && !args.sabotage_stall
                && !args.no_idle_burst
                && !args.no_foreign_holder_probe,
            "--etcd, --sabotage-stall, --no-idle-burst and --no-foreign-holder-probe are lockd's (vmlockd's) options"
        );
        opts.driver = vmlock_torture::Driver::Sanlock;
    }
    if let Some(why) = vmlock_torture::skip_reason(&opts) {
        println!("skipped: {why}");
        std::process::exit(3);
    }
    opts.duration = args.duration.map(Duration::from_secs);
    opts.disks = args.disks.max(2);
    opts.vms = args.vms.max(1);
    opts.keep_dir = args.keep;
    opts.verbose = args.verbose;
    opts.etcd_endpoints = args.etcd;
    opts.sabotage_stall = args.sabotage_stall;
    opts.idle_burst = !args.no_idle_burst;
    opts.probe_foreign_holder = !args.no_foreign_holder_probe;
    let report = vmlock_torture::run(opts)?;
    print!("{}", report.summary());
    Ok(report.passed())
}
