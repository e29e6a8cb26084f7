//! A deterministic simulator for vmlock's lock core, in the spirit of FoundationDB's and
//! TigerBeetle's simulation testing: the real [`vmlock_core::LockTable`] runs over a simulated
//! kernel ([`kernel`]) in a simulated world ([`world`]) of VMs, supervisors, a daemon that
//! crashes, storage that vanishes and clients that lie. Everything is decided by one seed, so a
//! failure replays exactly from its seed and step count.

pub mod kernel;
pub mod rng;
pub mod world;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
pub use world::{Config, World};

/// An invariant broken: everything needed to replay it.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The seed of the run.
    pub seed: u64,
    /// The step at which the invariant broke (replay with `--steps` at least this).
    pub step: u64,
    /// What broke.
    pub message: String,
    /// The last steps before it.
    pub trace: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "seed {} step {}: {}", self.seed, self.step, self.message)?;
        writeln!(f, "last steps:")?;
        for t in &self.trace {
            writeln!(f, "  {t}")?;
        }
        write!(
            f,
            "replay: cargo run -p vmlock-sim -- --seed {} --steps {}",
            self.seed, self.step
        )
    }
}

/// What a campaign did.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Seeds run.
    pub seeds: u64,
    /// Steps run in all.
    pub steps: u64,
    /// Steps and faults by kind.
    pub counts: BTreeMap<&'static str, u64>,
    /// Wall time.
    pub elapsed: Duration,
}

impl Report {
    fn absorb(&mut self, other: Report) {
        self.seeds += other.seeds;
        self.steps += other.steps;
        for (k, v) in other.counts {
            *self.counts.entry(k).or_insert(0) += v;
        }
    }

    /// Steps per second of wall time.
    pub fn steps_per_second(&self) -> f64 {
        self.steps as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs one seed for `steps` steps, then settles and checks for leaked locks.
pub fn run_seed(seed: u64, steps: u64, config: &Config) -> Result<Report, Box<Failure>> {
    let started = Instant::now();
    let mut world = World::new(seed, config);
    let fail = |world: &World, message: String| {
        Box::new(Failure {
            seed,
            step: world.step,
            message,
            trace: world.trace().to_vec(),
        })
    };
    for _ in 0..steps {
        if let Err(message) = world.step() {
            return Err(fail(&world, message));
        }
    }
    if let Err(message) = world.settle() {
        return Err(fail(&world, message));
    }
    Ok(Report {
        seeds: 1,
        steps: world.step,
        counts: world.counts.clone(),
        elapsed: started.elapsed(),
    })
}

/// Runs seeds `first..first + count` on `threads` threads; stops at the first failure found.
pub fn run_seeds(
    first: u64,
    count: u64,
    steps: u64,
    config: &Config,
    threads: usize,
) -> Result<Report, Box<Failure>> {
    let started = Instant::now();
    let threads = threads.max(1) as u64;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let results: Vec<Result<Report, Box<Failure>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let stop = &stop;
                scope.spawn(move || {
                    let mut report = Report::default();
                    let mut seed = first + t;
                    while seed < first + count {
                        if stop.load(std::sync::atomic::Ordering::Relaxed) {
                            break;
                        }
                        match run_seed(seed, steps, config) {
                            Ok(r) => report.absorb(r),
                            Err(f) => {
                                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                                return Err(f);
                            }
                        }
                        seed += threads;
                    }
                    Ok(report)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a simulator thread panicked"))
            .collect()
    });
    let mut total = Report::default();
    let mut first_failure: Option<Box<Failure>> = None;
    for r in results {
        match r {
            Ok(r) => total.absorb(r),
            Err(f) => {
                if first_failure.as_ref().map_or(true, |g| f.seed < g.seed) {
                    first_failure = Some(f);
                }
            }
        }
    }
    if let Some(f) = first_failure {
        return Err(f);
    }
    total.elapsed = started.elapsed();
    Ok(total)
}
