//! The `sanlock` driver's hand-off (docs/sanlock.md §6) checked exhaustively: with both gates no
//! interleaving of the hand-off, the third host's requests and a crash of either side lets the
//! third host hold the disk beside the migrating VM; with no gate, or the source's gate alone,
//! the checker finds the interleaving that does. Run with `--nocapture` for counts and paths.

use vmlock_model::sanlock::{sanlock_properties as p, Gates, SanlockHandoff};
use vmlock_model::{check_exhaustively, Findings};

fn check(gates: Gates, third_tries: u8, crashes: u8) -> Findings {
    let model = SanlockHandoff {
        gates,
        third_tries,
        crashes,
    };
    check_exhaustively(
        model,
        &format!("{gates:?} ({third_tries} requests of the third host, {crashes} crash)"),
        None,
    )
}

#[test]
fn with_both_gates_the_third_host_never_holds_the_disk_beside_the_migrating_vm() {
    for (tries, crashes) in [(3, 1), (4, 2)] {
        let f = check(Gates::SourceAndDestination, tries, crashes);
        assert!(f.counterexamples.is_empty(), "{:?}", f.counterexamples);
        assert!(f.unreached.is_empty(), "not reached: {:?}", f.unreached);
    }
}

#[test]
fn without_a_gate_a_shared_request_joins_the_hand_off() {
    let f = check(Gates::None, 2, 0);
    assert!(
        f.counterexamples
            .iter()
            .any(|(name, _)| *name == p::THIRD_NEVER_BESIDE),
        "{:?}",
        f.counterexamples
    );
}

/// The source's gate alone leaves the moment between the source's release (its gate opens) and
/// the destination's convert: why the destination has a gate of its own.
#[test]
fn with_the_source_gate_alone_a_shared_request_joins_the_destination() {
    let f = check(Gates::SourceOnly, 2, 0);
    let path = f
        .counterexamples
        .iter()
        .find(|(name, _)| *name == p::THIRD_NEVER_BESIDE)
        .map(|(_, path)| path.clone())
        .expect("a counterexample");
    let after = path
        .iter()
        .position(|a| a == "SourceOpenGate")
        .expect("the source opened its gate first");
    assert!(
        path[after..].iter().any(|a| a == "ThirdTakeShared"),
        "{path:?}"
    );
}
