//! The `etcd` cluster lock's migration between hosts (docs/etcd.md, "Migration between hosts")
//! checked exhaustively: with the driver's transactions no interleaving of the hand-off, two
//! other VMs' requests and lease expiries lets two VMs write a disk, or a destination in with a
//! stale or forged state; each broken variant is caught. Run with `--nocapture` for counts and
//! paths.

use vmlock_model::etcd::{etcd_properties as p, EtcdHandoff, EtcdVariant};
use vmlock_model::{check_exhaustively, Findings};

fn check(variant: EtcdVariant, third_tries: u8, crashes: u8) -> Findings {
    check_to(variant, third_tries, crashes, None)
}

/// Checks to `depth` actions if given, else the whole state space.
fn check_to(variant: EtcdVariant, third_tries: u8, crashes: u8, depth: Option<usize>) -> Findings {
    let model = EtcdHandoff {
        variant,
        prepares: 2,
        incoming_tries: 2,
        third_tries,
        crashes,
    };
    check_exhaustively(
        model,
        &format!("{variant:?} ({third_tries} requests of each other VM, {crashes} crashes, depth bound {depth:?})"),
        depth,
    )
}

/// A shortest path to a violation of `property`: the full check must find one, then the bound
/// is deepened from 1 until it is found (stateright keeps the last path it saw to a discovery,
/// not the first).
fn shortest(variant: EtcdVariant, third_tries: u8, crashes: u8, property: &str) -> Vec<String> {
    let found = |f: &Findings| {
        f.counterexamples
            .iter()
            .find(|(name, _)| *name == property)
            .map(|(_, path)| path.clone())
    };
    let full = check(variant, third_tries, crashes);
    let longest = found(&full).unwrap_or_else(|| {
        panic!(
            "no counterexample to {property:?}: {:?}",
            full.counterexamples
        )
    });
    for depth in 1..=longest.len() {
        if let Some(path) = found(&check_to(variant, third_tries, crashes, Some(depth + 1))) {
            println!("  shortest: {}", path.join(", "));
            return path;
        }
    }
    longest
}

#[test]
fn the_driver_hand_off_is_safe_in_every_interleaving() {
    for (tries, crashes) in [(2, 1), (3, 2), (3, 3)] {
        let f = check(EtcdVariant::Driver, tries, crashes);
        assert!(f.counterexamples.is_empty(), "{:?}", f.counterexamples);
        assert!(f.unreached.is_empty(), "not reached: {:?}", f.unreached);
    }
}

/// Without the revision compare, a hand-over key left behind by a source whose guest died (only
/// `migrate-finish` deletes it) lets the destination in with the dead source's state.
#[test]
fn without_the_revision_compare_a_stale_state_gets_in() {
    let path = shortest(
        EtcdVariant::NoRevisionCompare,
        2,
        1,
        p::STALE_OR_FORGED_REFUSED,
    );
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
    let path = shortest(
        EtcdVariant::NoSecretCompare,
        2,
        0,
        p::STALE_OR_FORGED_REFUSED,
    );
    assert!(
        path.iter()
            .any(|a| a.starts_with("DestinationAcquireIncoming")),
        "{path:?}"
    );
}

/// Release then acquire without a version: between the source's release at prepare and the
/// destination's acquire, the third host takes the disk under the source's running guest.
#[test]
fn release_then_acquire_lets_the_third_host_write_beside_the_source() {
    let path = shortest(EtcdVariant::ReleaseAtPrepare, 2, 0, p::NEVER_TWO_WRITERS);
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
