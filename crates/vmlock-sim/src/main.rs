//! `vmlock-sim`: runs the deterministic simulator; replays a seed.

use clap::{Parser, ValueEnum};
use std::process::ExitCode;
use vmlock_core::Sabotage;
use vmlock_sim::{run_seeds, Config};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SabotageArg {
    None,
    UnlockOnHolderClose,
    SkipKernelLock,
    TakeoverByAnyChild,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum GapArg {
    /// A rogue migration destination hands `acquire_incoming` the versions from `status`.
    VersionsFromStatus,
    /// A process with a dead supervisor's pid speaks for its VM before the daemon knows.
    PidReuseWindow,
}

/// Runs vmlock's lock core in a simulated world and checks its invariants after every step.
#[derive(Debug, Parser)]
#[command(name = "vmlock-sim")]
struct Args {
    /// The first seed (or the one seed to replay).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How many seeds, from `--seed` on.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Steps per seed.
    #[arg(long, default_value_t = 10_000)]
    steps: u64,
    /// VMs per world.
    #[arg(long, default_value_t = 5)]
    vms: usize,
    /// Disks in the shared pool.
    #[arg(long, default_value_t = 8)]
    disks: usize,
    /// Threads (seeds run in parallel).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Also try an attack the core does not stop yet (docs/RELIABILITY.md, "Known gaps");
    /// repeatable.
    #[arg(long = "gap", value_enum)]
    gaps: Vec<GapArg>,
    /// Break the core on purpose, to see the simulator catch it.
    #[arg(long, value_enum, default_value_t = SabotageArg::None)]
    sabotage: SabotageArg,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = Config {
        vms: args.vms.max(2),
        disks: args.disks.max(1),
        sabotage: match args.sabotage {
            SabotageArg::None => Sabotage::None,
            SabotageArg::UnlockOnHolderClose => Sabotage::UnlockOnHolderClose,
            SabotageArg::SkipKernelLock => Sabotage::SkipKernelLock,
            SabotageArg::TakeoverByAnyChild => Sabotage::TakeoverByAnyChild,
        },
        gap_versions_from_status: args.gaps.contains(&GapArg::VersionsFromStatus),
        gap_pid_reuse_window: args.gaps.contains(&GapArg::PidReuseWindow),
        ..Config::default()
    };
    match run_seeds(args.seed, args.seeds, args.steps, &config, args.threads) {
        Ok(report) => {
            println!(
                "ok: {} seeds, {} steps in {:.1?} ({:.0} steps/s)",
                report.seeds,
                report.steps,
                report.elapsed,
                report.steps_per_second()
            );
            for (kind, n) in &report.counts {
                println!("  {kind:<40} {n}");
            }
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("FAILED: {failure}");
            ExitCode::FAILURE
        }
    }
}
