//! The `etcd` cluster lock's migration between hosts (docs/etcd.md, "Migration between hosts")
//! checked exhaustively: with the driver's transactions no interleaving of the hand-off, two
//! other VMs' requests and lease expiries lets two VMs write a disk, or a destination in with a
//! stale or forged state; each broken variant is caught. Run with `--nocapture` for counts and
//! paths.

use stateright::{Checker, Expectation, Model};
use std::time::Instant;
use vmlock_model::etcd::{etcd_properties as p, EtcdHandoff, EtcdVariant};

struct Found {
    counterexamples: Vec<(&'static str, Vec<String>)>,
    unreached: Vec<&'static str>,
}

fn check(variant: EtcdVariant, third_tries: u8, crashes: u8) -> Found {
    let model = EtcdHandoff {
        variant,
        prepares: 2,
        incoming_tries: 2,
        third_tries,
        crashes,
    };
    let properties = model.properties();
    let t = Instant::now();
    let checker = model.checker().spawn_bfs().join();
    println!(
        "{variant:?} ({third_tries} requests of each other VM, {crashes} crashes): {} states ({} distinct), depth {}, {:.1?}",
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        t.elapsed()
    );
    let discoveries = checker.discoveries();
    let mut found = Found {
        counterexamples: Vec::new(),
        unreached: Vec::new(),
    };
    for property in &properties {
        let d = discoveries.get(property.name);
        match (&property.expectation, d) {
            (Expectation::Always, Some(path)) => {
                let steps: Vec<String> = path
                    .clone()
                    .into_actions()
                    .iter()
                    .map(|a| format!("{a:?}"))
                    .collect();
                println!(
                    "  counterexample to \"{}\": {}",
                    property.name,
                    steps.join(", ")
                );
                found.counterexamples.push((property.name, steps));
            }
            (Expectation::Sometimes, None) => found.unreached.push(property.name),
            _ => {}
        }
    }
    found
}

fn path_to(f: &Found, property: &str) -> Vec<String> {
    f.counterexamples
        .iter()
        .find(|(name, _)| *name == property)
        .map(|(_, path)| path.clone())
        .unwrap_or_else(|| panic!("no counterexample to {property:?}: {:?}", f.counterexamples))
}

#[test]
fn the_driver_hand_off_is_safe_in_every_interleaving() {
    for (tries, crashes) in [(2, 1), (2, 2)] {
        let f = check(EtcdVariant::Driver, tries, crashes);
        assert!(f.counterexamples.is_empty(), "{:?}", f.counterexamples);
        assert!(f.unreached.is_empty(), "not reached: {:?}", f.unreached);
    }
}

/// Without the revision compare, a hand-over key left behind by a source whose guest died (only
/// `migrate-finish` deletes it) lets the destination in with the dead source's state.
#[test]
fn without_the_revision_compare_a_stale_state_gets_in() {
    let f = check(EtcdVariant::NoRevisionCompare, 2, 1);
    let path = path_to(&f, p::STALE_OR_FORGED_REFUSED);
    let exit = path
        .iter()
        .position(|a| a == "SourceGuestExit")
        .expect("the source's guest died first");
    assert!(
        path[exit..]
            .iter()
            .any(|a| a.starts_with("DestinationAcquireIncoming")),
        "{path:?}"
    );
}

/// Without the secret compare, a forged state (revisions anyone can read) or an earlier
/// prepare's gets in.
#[test]
fn without_the_secret_compare_a_forged_state_gets_in() {
    let f = check(EtcdVariant::NoSecretCompare, 2, 0);
    path_to(&f, p::STALE_OR_FORGED_REFUSED);
}

/// Release then acquire without a version: between the source's release at prepare and the
/// destination's acquire, the third host takes the disk under the source's running guest.
#[test]
fn release_then_acquire_lets_the_third_host_write_beside_the_source() {
    let f = check(EtcdVariant::ReleaseAtPrepare, 2, 0);
    let path = path_to(&f, p::NEVER_TWO_WRITERS);
    let prepare = path
        .iter()
        .position(|a| a == "SourcePrepareHandover")
        .expect("a prepare");
    assert!(
        path[prepare..]
            .iter()
            .any(|a| a.starts_with("ThirdAcquire")),
        "{path:?}"
    );
}
