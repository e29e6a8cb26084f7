//! The exhaustive check of the real core's migration hand-off, and broken variants that it must
//! catch. Run with `--nocapture` to see the state counts and the counterexamples.

use vmlock_model::{check, properties as p, Bounds, Report, Variant};

/// The CI bound (docs/RELIABILITY.md, "Model checking"): every path of 8 actions, one daemon
/// crash on it. `VMLOCK_MODEL_DEPTH` and `VMLOCK_MODEL_CRASHES` check the real core further.
const BOUNDS: Bounds = Bounds {
    depth: 8,
    crashes: 1,
};

fn bounds_from_env() -> Bounds {
    let read = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
    };
    Bounds {
        depth: read("VMLOCK_MODEL_DEPTH").unwrap_or(BOUNDS.depth),
        crashes: read("VMLOCK_MODEL_CRASHES").map_or(BOUNDS.crashes, |c| c as u8),
    }
}

fn show(name: &str, r: &Report) {
    println!(
        "{name}: {} states ({} distinct), depth {}, {:.1?}",
        r.states, r.unique_states, r.max_depth, r.elapsed
    );
    for (property, path) in &r.counterexamples {
        println!("  counterexample to \"{property}\" (after A's source acquired both disks):");
        for step in path {
            println!("    {step}");
        }
    }
}

fn broken(r: &Report, property: &str) -> bool {
    r.counterexamples.iter().any(|(name, _)| *name == property)
}

#[test]
fn the_real_core_keeps_every_property() {
    let r = check(Variant::Real, bounds_from_env());
    show("real core", &r);
    assert!(r.counterexamples.is_empty(), "{:?}", r.counterexamples);
    assert!(
        r.unreached.is_empty(),
        "not reached within the bound: {:?}",
        r.unreached
    );
}

/// A daemon shell that fills in the current versions and its own token whatever the destination
/// presented: a forged state gets the source's descriptions.
#[test]
fn a_hand_off_without_its_fencing_check_is_caught() {
    let r = check(Variant::TrustingShell, BOUNDS);
    show("trusting shell", &r);
    assert!(broken(&r, p::STALE_OR_FORGED_REFUSED), "{r:?}");
}

/// `Sabotage::UnlockOnHolderClose`: a dropped connection unlocks a running guest's disks, and a
/// third VM takes them.
#[test]
fn unlocking_on_holder_close_is_caught() {
    let r = check(Variant::UnlockOnHolderClose, BOUNDS);
    show("unlock on holder close", &r);
    assert!(broken(&r, p::WRITER_KEEPS_LOCK), "{r:?}");
}

/// `Sabotage::SkipKernelLock`: the table alone excludes, and forgets across a crash.
#[test]
fn skipping_the_kernel_lock_is_caught() {
    let r = check(Variant::SkipKernelLock, BOUNDS);
    show("skip kernel lock", &r);
    assert!(broken(&r, p::WRITER_KEEPS_LOCK), "{r:?}");
}
