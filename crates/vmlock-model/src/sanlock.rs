//! A model of the `sanlock` driver's migration hand-off (docs/sanlock.md §6): the lease of one
//! writable disk and its two gate leases, held in sanlock's modes by three parties — the
//! migration **source** and **destination** (one VM, on two hosts) and a VM on a **third** host
//! that asks for the disk (shared through the gate, or exclusively) — with a crash of either side
//! of the hand-off.
//!
//! Unlike the lockd model this one does not run the driver's code: the driver's work is sanlock
//! requests, and the model is sanlock's rules for them (`resource.c`, 3.8.5), each request one
//! atomic step (Disk Paxos makes the ballots atomic; the model does not re-check Paxos):
//!
//! - an exclusive acquire is granted iff nobody else holds the lease in any mode (a ballot runs
//!   first unless a live host holds it exclusively, so a refusal by shared holders still moves
//!   the version);
//! - a shared acquire is granted iff nobody holds it exclusively (a ballot: the version moves);
//! - several leases in one acquire call are all or nothing;
//! - a convert to shared always succeeds; a convert to exclusive is granted iff no other holder
//!   is left (a ballot);
//! - a crashed host's modes are cleared when sanlock sees it dead. The watchdog resets the host
//!   before that, so its guest has stopped writing by then: the crash is one step.
//!
//! Steps are named after the driver's functions. The orchestration follows `vmlock::domain`: the
//! destination's incoming acquire needs the source's state, the source's success comes after the
//! incoming acquire and before the destination's, a cancel goes destination first.

use stateright::{Model, Property};

/// Which gates the driver uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Gates {
    /// No gate (the driver before the gate): shared requests go straight to the lease.
    None,
    /// One gate, held exclusively by the source from before its prepare until its
    /// `complete_migration`; shared requests pass it.
    SourceOnly,
    /// The driver: the source's gate, plus the destination's, held exclusively from before its
    /// incoming acquire until its convert to exclusive; shared requests pass both.
    SourceAndDestination,
}

/// A party's mode on one lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    #[default]
    Free,
    Shared,
    Exclusive,
}

/// The three parties: index into the per-lease mode arrays.
const SRC: usize = 0;
const DST: usize = 1;
const THIRD: usize = 2;

/// A lease: each party's mode.
type Lease = [Mode; 3];

/// The source's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// Holds the lease exclusively, its guest writing.
    Running,
    /// `prepare_migration`: closed its gate, lease still exclusive.
    GateClosed,
    /// `prepare_migration` done: the lease shared, the state handed out.
    Prepared,
    /// `complete_migration(Success)`: released the lease (gate still closed).
    Released,
    /// `complete_migration(Success)` done: gate open, guest stopped.
    Done,
    /// `complete_migration(Cancel)`: converted back to exclusive (gate still closed).
    CancelConverted,
    Crashed,
}

/// The destination's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Destination {
    Idle,
    /// `acquire_incoming`: closed its gate.
    GateClosed,
    /// `acquire_incoming` done: the lease shared.
    Shared,
    /// `complete_migration(Success)` (`finish_incoming`): converted to exclusive, gate closed.
    Converted,
    /// `finish_incoming` done: gate open, guest running.
    Done,
    /// Refused (stale state), cancelled, or crashed: holds nothing.
    Out,
}

/// The third host's VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Third {
    Idle,
    /// `take`, shared disk: holds the gates shared.
    InGate,
    /// Holds the lease (shared, or exclusive when asked so).
    Holds,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SanlockState {
    pub lease: Lease,
    pub gate_src: Lease,
    pub gate_dst: Lease,
    /// The lease's version (leader lver), and the one the source handed out at prepare.
    pub lver: u8,
    pub handed: Option<u8>,
    pub source: Source,
    pub destination: Destination,
    pub third: Third,
    /// Requests the third host may still start, and crashes left.
    pub third_tries: u8,
    pub crashes: u8,
    /// Prepares the source may still start (a cancelled hand-off may be tried again).
    pub prepares: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SanlockAction {
    /// `prepare_migration`: `close_gates` (source gate, exclusive).
    SourceCloseGate,
    /// `prepare_migration`: `convert` to shared.
    SourceConvertToShared,
    /// `acquire_incoming`: `close_gates` (destination gate, exclusive).
    DestinationCloseGate,
    /// `acquire_incoming`: `take`, shared with `RES_LVER` = the handed-out version.
    DestinationTakeShared,
    /// `complete_migration(Success)` on the source: `release`.
    SourceRelease,
    /// `complete_migration(Success|Cancel)` on the source: `open_gates`.
    SourceOpenGate,
    /// `complete_migration(Success)` on the destination: `convert` to exclusive.
    DestinationConvert,
    /// `finish_incoming`: `open_gates`.
    DestinationOpenGate,
    /// `complete_migration(Cancel)` on the destination: `finish` (releases everything).
    DestinationCancel,
    /// `complete_migration(Cancel)` on the source: `restore` (convert to exclusive).
    SourceCancelConvert,
    /// The third VM asks for the disk shared: `take` passes the gates (one call, shared).
    ThirdEnterGate,
    /// `take`: the lease shared, inside the gate; then the gates are released.
    ThirdTakeShared,
    /// The third VM asks for the disk exclusively (no gate).
    ThirdTakeExclusive,
    /// The third VM's guest exits: `finish`.
    ThirdRelease,
    SourceCrash,
    DestinationCrash,
}

/// The model: the hand-off with the given gates, `third_tries` requests of the third host and
/// `crashes` crashes of a side.
#[derive(Debug, Clone)]
pub struct SanlockHandoff {
    pub gates: Gates,
    pub third_tries: u8,
    pub crashes: u8,
}

/// The safety properties (`always`) and the reachability ones (`sometimes`).
pub mod sanlock_properties {
    /// sanlock's own rule, as the model applies it: an exclusive holder of the lease has no
    /// other holder.
    pub const EXCLUSIVE_ALONE: &str = "an exclusive holder of the disk's lease is alone";
    /// The third host's VM never holds the lease while the migrating VM (source or destination,
    /// in any mode) holds it.
    pub const THIRD_NEVER_BESIDE: &str =
        "the third host never holds the disk beside the migrating VM";
    pub const HAND_OFF_COMPLETES: &str = "the destination ends up exclusive";
    pub const CANCEL_RESTORES: &str = "a cancel gives the source its exclusive lease back";
    pub const THIRD_GETS_A_FREE_DISK: &str = "the third host takes the disk once nobody holds it";
}

fn others_hold(lease: &Lease, me: usize) -> bool {
    lease
        .iter()
        .enumerate()
        .any(|(i, m)| i != me && *m != Mode::Free)
}

fn exclusive_elsewhere(lease: &Lease, me: usize) -> bool {
    lease
        .iter()
        .enumerate()
        .any(|(i, m)| i != me && *m == Mode::Exclusive)
}

impl SanlockHandoff {
    fn gates_for_third(&self) -> usize {
        match self.gates {
            Gates::None => 0,
            Gates::SourceOnly => 1,
            Gates::SourceAndDestination => 2,
        }
    }
}

impl Model for SanlockHandoff {
    type State = SanlockState;
    type Action = SanlockAction;

    fn init_states(&self) -> Vec<SanlockState> {
        let mut lease = [Mode::Free; 3];
        lease[SRC] = Mode::Exclusive;
        vec![SanlockState {
            lease,
            gate_src: [Mode::Free; 3],
            gate_dst: [Mode::Free; 3],
            lver: 1,
            handed: None,
            source: Source::Running,
            destination: Destination::Idle,
            third: Third::Idle,
            third_tries: self.third_tries,
            crashes: self.crashes,
            prepares: 2,
        }]
    }

    fn actions(&self, s: &SanlockState, out: &mut Vec<SanlockAction>) {
        use SanlockAction as A;
        let src_gate = self.gates != Gates::None;
        let dst_gate = self.gates == Gates::SourceAndDestination;
        match s.source {
            Source::Running if s.destination == Destination::Idle && s.prepares > 0 => {
                out.push(if src_gate {
                    A::SourceCloseGate
                } else {
                    A::SourceConvertToShared
                })
            }
            Source::GateClosed => out.push(A::SourceConvertToShared),
            Source::Prepared => {
                if s.destination == Destination::Shared {
                    out.push(A::SourceRelease);
                }
                if matches!(s.destination, Destination::Idle | Destination::Out) {
                    out.push(A::SourceCancelConvert);
                }
            }
            Source::Released | Source::CancelConverted => out.push(A::SourceOpenGate),
            _ => {}
        }
        let handed_out = s.handed.is_some();
        match s.destination {
            Destination::Idle if handed_out && s.source != Source::Running => {
                out.push(if dst_gate {
                    A::DestinationCloseGate
                } else {
                    A::DestinationTakeShared
                })
            }
            Destination::GateClosed => {
                out.push(A::DestinationTakeShared);
                out.push(A::DestinationCancel);
            }
            Destination::Shared => {
                if matches!(s.source, Source::Released | Source::Done | Source::Crashed) {
                    out.push(A::DestinationConvert);
                }
                out.push(A::DestinationCancel);
            }
            Destination::Converted => out.push(A::DestinationOpenGate),
            _ => {}
        }
        match s.third {
            Third::Idle if s.third_tries > 0 => {
                out.push(if self.gates_for_third() > 0 {
                    A::ThirdEnterGate
                } else {
                    A::ThirdTakeShared
                });
                out.push(A::ThirdTakeExclusive);
            }
            Third::InGate => out.push(A::ThirdTakeShared),
            Third::Holds => out.push(A::ThirdRelease),
            _ => {}
        }
        if s.crashes > 0 {
            if !matches!(s.source, Source::Crashed | Source::Done) {
                out.push(A::SourceCrash);
            }
            if !matches!(s.destination, Destination::Idle | Destination::Out) {
                out.push(A::DestinationCrash);
            }
        }
    }

    fn next_state(&self, last: &SanlockState, action: SanlockAction) -> Option<SanlockState> {
        use SanlockAction as A;
        let mut s = last.clone();
        match action {
            A::SourceCloseGate => {
                // Retried while a shared request is inside the gate: no step until it left.
                if others_hold(&s.gate_src, SRC) {
                    return None;
                }
                s.gate_src[SRC] = Mode::Exclusive;
                s.source = Source::GateClosed;
                s.prepares -= 1;
            }
            A::SourceConvertToShared => {
                if s.source == Source::Running {
                    s.prepares -= 1; // no gate to close first
                }
                s.lease[SRC] = Mode::Shared;
                s.handed = Some(s.lver);
                s.source = Source::Prepared;
            }
            A::DestinationCloseGate => {
                if others_hold(&s.gate_dst, DST) {
                    return None;
                }
                s.gate_dst[DST] = Mode::Exclusive;
                s.destination = Destination::GateClosed;
            }
            A::DestinationTakeShared => {
                // RES_LVER: refused when a ballot ran since the state was taken.
                if exclusive_elsewhere(&s.lease, DST) || s.handed != Some(s.lver) {
                    s.gate_dst[DST] = Mode::Free;
                    s.destination = Destination::Out;
                } else {
                    s.lease[DST] = Mode::Shared;
                    s.lver += 1;
                    s.destination = Destination::Shared;
                }
            }
            A::SourceRelease => {
                s.lease[SRC] = Mode::Free;
                s.source = Source::Released;
            }
            A::SourceOpenGate => {
                s.gate_src[SRC] = Mode::Free;
                s.source = if s.source == Source::Released {
                    Source::Done
                } else {
                    Source::Running
                };
                s.handed = if s.source == Source::Running {
                    None
                } else {
                    s.handed
                };
            }
            A::DestinationConvert => {
                if others_hold(&s.lease, DST) {
                    return None; // -EAGAIN: retried, then Busy (the lease stays shared)
                }
                s.lease[DST] = Mode::Exclusive;
                s.lver += 1;
                s.destination = Destination::Converted;
            }
            A::DestinationOpenGate => {
                s.gate_dst[DST] = Mode::Free;
                s.destination = Destination::Done;
            }
            A::DestinationCancel | A::DestinationCrash => {
                s.lease[DST] = Mode::Free;
                s.gate_dst[DST] = Mode::Free;
                s.gate_src[DST] = Mode::Free;
                s.destination = Destination::Out;
                if action == A::DestinationCrash {
                    s.crashes -= 1;
                }
            }
            A::SourceCancelConvert => {
                if others_hold(&s.lease, SRC) {
                    return None; // -EAGAIN while the destination holds it: Busy
                }
                s.lease[SRC] = Mode::Exclusive;
                s.lver += 1;
                s.source = if self.gates == Gates::None {
                    s.handed = None;
                    Source::Running
                } else {
                    Source::CancelConverted
                };
            }
            A::SourceCrash => {
                s.lease[SRC] = Mode::Free;
                s.gate_src[SRC] = Mode::Free;
                s.gate_dst[SRC] = Mode::Free;
                s.source = Source::Crashed;
                s.crashes -= 1;
            }
            A::ThirdEnterGate => {
                s.third_tries -= 1;
                let refused = exclusive_elsewhere(&s.gate_src, THIRD)
                    || (self.gates_for_third() == 2 && exclusive_elsewhere(&s.gate_dst, THIRD));
                if !refused {
                    s.gate_src[THIRD] = Mode::Shared;
                    if self.gates_for_third() == 2 {
                        s.gate_dst[THIRD] = Mode::Shared;
                    }
                    s.third = Third::InGate;
                }
            }
            A::ThirdTakeShared => {
                if s.third == Third::Idle {
                    s.third_tries -= 1; // no gate: straight to the lease
                }
                if !exclusive_elsewhere(&s.lease, THIRD) {
                    s.lease[THIRD] = Mode::Shared;
                    s.lver += 1;
                    s.third = Third::Holds;
                } else {
                    s.third = Third::Idle;
                }
                s.gate_src[THIRD] = Mode::Free;
                s.gate_dst[THIRD] = Mode::Free;
            }
            A::ThirdTakeExclusive => {
                s.third_tries -= 1;
                // The ballot runs unless a live host holds the lease exclusively.
                if !exclusive_elsewhere(&s.lease, THIRD) {
                    s.lver += 1;
                    if !others_hold(&s.lease, THIRD) {
                        s.lease[THIRD] = Mode::Exclusive;
                        s.third = Third::Holds;
                    }
                }
            }
            A::ThirdRelease => {
                s.lease[THIRD] = Mode::Free;
                s.third = Third::Idle;
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        use sanlock_properties as p;
        vec![
            Property::always(p::EXCLUSIVE_ALONE, |_, s: &SanlockState| {
                (0..3).all(|i| s.lease[i] != Mode::Exclusive || !others_hold(&s.lease, i))
            }),
            Property::always(p::THIRD_NEVER_BESIDE, |_, s: &SanlockState| {
                s.lease[THIRD] == Mode::Free
                    || (s.lease[SRC] == Mode::Free && s.lease[DST] == Mode::Free)
            }),
            Property::sometimes(p::HAND_OFF_COMPLETES, |_, s: &SanlockState| {
                s.destination == Destination::Done
            }),
            Property::sometimes(p::CANCEL_RESTORES, |_, s: &SanlockState| {
                s.source == Source::Running && s.lver > 1 && s.lease[SRC] == Mode::Exclusive
            }),
            Property::sometimes(p::THIRD_GETS_A_FREE_DISK, |_, s: &SanlockState| {
                s.lease[THIRD] != Mode::Free
            }),
        ]
    }
}
