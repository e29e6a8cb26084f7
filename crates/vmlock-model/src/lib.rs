//! An exhaustive model check of the **real** lock core's migration hand-off on one host, with
//! [stateright]: every interleaving, up to a depth bound, of the calls the daemon makes on
//! [`vmlock_core::LockTable`] while VM A migrates from its source supervisor to a destination
//! supervisor on the same host, two other VMs (B, C) try to take its disks, guests and
//! supervisors die, connections drop and the daemon crashes and recovers from its records.
//!
//! The simulator (`vmlock-sim`) samples long random runs of a bigger world; this crate is its
//! exhaustive complement for a small one: within the bound no interleaving is left out.
//!
//! # How the real table becomes a model state
//!
//! stateright needs states that are `Clone + Hash + Eq`. The table is none of these in the
//! daemon (its descriptions are `OwnedFd`s, its maps `HashMap`s). `vmlock-core`'s feature `model`
//! adds the two things a checker needs and nothing else: `Clone` for a table whose host's
//! descriptions and process handles are plain values (ours: [`host::Fd`], a pid), and
//! `LockTable::fingerprint`, the whole table rendered with its maps sorted. A model state is
//! then the world itself — the table, the [`host::ModelHost`] kernel, the supervisors and what
//! they keep, the queued notifications, the daemon's state file — and its identity (`Hash`,
//! `Eq`) is the table's fingerprint plus the rest of the world, computed once per state. This
//! was preferred to replaying the sequence of actions from the start for every state: replay
//! makes every path a distinct state (no two histories merge), so the same depth would cost
//! orders of magnitude more, and the feature is two small `cfg`-gated items that the daemon
//! never compiles in a way it could use (an `OwnedFd` is not `Clone`).
//!
//! # What is checked
//!
//! Against the model kernel's locks, never the table's view (see [`properties`]): never two
//! writers; a live writer keeps its lock; a stale or forged state is refused; a cancelled
//! migration leaves the source holding every disk; no lock outlives its guest once the world is
//! quiet; the daemon kills no guest whose supervisor lives.
//!
//! [`sanlock`] is a second, smaller model: the `sanlock` driver's hand-off through shared mode
//! and its migration gates, as sanlock's rules for the requests the driver sends. [`etcd`] is a
//! third: the `etcd` cluster lock's hand-off between hosts (keys beside keys, fenced by the
//! secret's hash and the source's revisions), as etcd's rules for the transactions it sends.

pub mod etcd;
pub mod host;
pub mod sanlock;
mod world;

pub use world::{Action, Bounds, HandoffModel, Presented, Role, State, Variant};

/// The names of the safety properties (`always`) the model checks.
pub mod properties {
    /// No disk is written by two VMs at once (a migrating VM's source and destination are one
    /// VM), and no two VMs' live guests' supervisors keep a description holding a disk's
    /// exclusive lock.
    pub const NEVER_TWO_WRITERS: &str = "never two writers";
    /// A guest writing a disk has its supervisor keep a description that holds the kernel lock
    /// (or, its supervisor dead, the lock is still held while the daemon kills it).
    pub const WRITER_KEEPS_LOCK: &str = "a live writer keeps its kernel lock";
    /// `acquire_incoming` with a wrong or missing token, old versions or a disk left out gives
    /// nothing.
    pub const STALE_OR_FORGED_REFUSED: &str = "a stale or forged state is refused";
    /// After a cancel the source's supervisor keeps a locked description of every disk it held.
    pub const CANCEL_KEEPS_SOURCE: &str =
        "a cancelled migration leaves the source holding every disk";
    /// In a quiet world (daemon up, every notification delivered, no acquire half done, every
    /// supervisor whose guest exited gone) every kernel lock belongs to a VM whose guest runs.
    pub const NO_LOCK_OUTLIVES_ITS_GUEST: &str = "no lock outlives its guest at quiescence";
    /// A `kill` effect only hits a guest whose supervisor is dead.
    pub const NO_KILL_OF_A_SUPERVISED_GUEST: &str =
        "the daemon kills no guest whose supervisor lives";
}

use stateright::{Checker, Model};
use std::time::{Duration, Instant};

/// What a finished check found against a model's properties (every model here reports so).
#[derive(Debug, Default)]
pub struct Findings {
    /// Each safety property (`always`) broken, with the path found to it, one action a line.
    pub counterexamples: Vec<(&'static str, Vec<String>)>,
    /// Each reachability property (`sometimes`) never seen.
    pub unreached: Vec<&'static str>,
}

/// The [`Findings`] of `checker`, finished, against `properties`.
pub fn findings<M>(properties: &[stateright::Property<M>], checker: &impl Checker<M>) -> Findings
where
    M: Model,
    M::State: Clone + PartialEq,
    M::Action: Clone + PartialEq + std::fmt::Debug,
{
    let discoveries = checker.discoveries();
    let mut found = Findings::default();
    for property in properties {
        let path = discoveries.get(property.name);
        match (&property.expectation, path) {
            (stateright::Expectation::Always, Some(path)) => {
                let steps = path
                    .clone()
                    .into_actions()
                    .iter()
                    .map(|a| format!("{a:?}"))
                    .collect();
                found.counterexamples.push((property.name, steps));
            }
            (stateright::Expectation::Sometimes, None) => found.unreached.push(property.name),
            _ => {}
        }
    }
    found
}

/// Checks `model` breadth-first, to `depth` actions if given, else its whole state space; prints
/// the counts under the label `what` and every counterexample (a test run with `--nocapture`
/// shows them).
pub fn check_exhaustively<M>(model: M, what: &str, depth: Option<usize>) -> Findings
where
    M: Model + Send + Sync + 'static,
    M::State: Clone + PartialEq + std::hash::Hash + std::fmt::Debug + Send + Sync + 'static,
    M::Action: Clone + PartialEq + std::fmt::Debug,
{
    let properties = model.properties();
    let t = std::time::Instant::now();
    let mut checker = model.checker();
    if let Some(depth) = depth {
        checker = checker.target_max_depth(depth);
    }
    let checker = checker.spawn_bfs().join();
    println!(
        "{what}: {} states ({} distinct), depth {}, {:.1?}",
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        t.elapsed()
    );
    let found = findings(&properties, &checker);
    for (property, steps) in &found.counterexamples {
        println!("  counterexample to \"{property}\": {}", steps.join(", "));
    }
    found
}

/// What one exhaustive check found.
#[derive(Debug)]
pub struct Report {
    /// States visited (with repeats) and distinct states.
    pub states: usize,
    /// Distinct states.
    pub unique_states: usize,
    /// The longest path explored, in actions.
    pub max_depth: usize,
    /// Wall time.
    pub elapsed: Duration,
    /// Each safety property broken, with the shortest path found to it (one action a line).
    pub counterexamples: Vec<(&'static str, Vec<String>)>,
    /// Each reachability property (`sometimes`) never seen within the bound.
    pub unreached: Vec<&'static str>,
}

/// Checks `variant` exhaustively to `bounds`: every state reachable in `bounds.depth` actions,
/// breadth first on one thread (so that each state is first reached by a shortest path; see
/// [`State`]). The check stops at the first broken property and then finds a shortest
/// counterexample by deepening the bound from zero (`elapsed` counts both).
pub fn check(variant: Variant, bounds: Bounds) -> Report {
    let report = check_once(variant, bounds);
    let Some(longest) = report.counterexamples.iter().map(|c| c.1.len()).max() else {
        return report;
    };
    // stateright keeps the last path it saw to a discovery: deepen one action at a time up to
    // it, so that the first bound that breaks a property gives a shortest counterexample.
    for depth in 0..longest {
        let mut shorter = check_once(variant, Bounds { depth, ..bounds });
        if !shorter.counterexamples.is_empty() {
            shorter.elapsed += report.elapsed;
            return shorter;
        }
    }
    report
}

fn check_once(variant: Variant, bounds: Bounds) -> Report {
    let model = HandoffModel { variant, bounds };
    let properties = model.properties();
    let started = Instant::now();
    let checker = model
        .checker()
        .finish_when(stateright::HasDiscoveries::AnyFailures)
        .spawn_bfs()
        .join();
    let elapsed = started.elapsed();
    let Findings {
        mut counterexamples,
        unreached,
    } = findings(&properties, &checker);
    counterexamples.sort();
    Report {
        states: checker.state_count(),
        unique_states: checker.unique_state_count(),
        max_depth: checker.max_depth().saturating_sub(1),
        elapsed,
        counterexamples,
        unreached,
    }
}
