//! A model of the `etcd` cluster lock's migration between hosts (docs/etcd.md, "Migration
//! between hosts"; `vmlock_etcd::handover`, `vmlockd::cluster`): VM A migrates from a **source**
//! host S to a **destination** host D with two exclusive disks, while VM B on a **third** host T
//! asks for both disks (one transaction) and VM C on D asks for the second, and any host's lease
//! may expire.
//!
//! Like the sanlock model this one does not run the driver's code: etcd is the source of truth,
//! and the model is etcd's rules for the transactions the driver sends, each one atomic step
//! that bumps the store's revision when it writes:
//!
//! - keys are `disks/<disk>/e/<vm>@<host>`, each with the lease of its host and its mod revision;
//!   the hand-over key `handover/A` holds the prepare's secret (its hash), under S's lease;
//! - `prepare_handover` (source): `lease(key) == S` for each of A's keys → put the hand-over key;
//!   the state token carries the secret and each key's mod revision;
//! - `acquire_incoming` (destination): `value(handover) == hash(secret)`,
//!   `mod_revision(A@S key) == rev` for each disk and `create_revision(A@D key) == 0` → put A@D's
//!   keys **beside** A@S's, under D's lease;
//! - `acquire` (third host): `create_revision(disks/<disk>/) == 0` over the prefix (no key at all)
//!   for each disk → put the keys; `release`: delete each key whose lease is the caller's;
//! - `end_handover` (source's `migrate-finish`, success or cancel): delete the hand-over key if
//!   its lease is S's; the success first checks `taken_over_elsewhere` (A@D has a key for every
//!   disk);
//! - a lease's end deletes every key attached to it.
//!
//! **Fencing assumption.** A host whose lease ends has stopped its guests before the cluster
//! deletes its keys: the timing rule (docs/etcd.md, "The timing rule") makes every host stop its
//! guests at its fencing deadline D, before the leader can expire the lease. The model makes a
//! lease's end one step: the host's guests stop and its keys go. A guest's exit (or a VM's
//! release) is also one step: the daemon's `etcd-release` thread deletes the keys after the grant
//! ended, and a guest that has exited writes nothing meanwhile.
//!
//! QEMU's switch-over (`MigrationSwitchover`) is the one step that is not a driver call: the
//! destination's guest exists only once its incoming acquire succeeded (`vmlock run --incoming`
//! acquires before starting QEMU), and the source's guest pauses as the destination's resumes.

use stateright::{Model, Property};

/// The hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Host {
    Source,
    Destination,
    Third,
}

/// Key holders (`<vm>@<host>`): index into a disk's keys.
const A_SRC: usize = 0;
const A_DST: usize = 1;
const B: usize = 2;
const C: usize = 3;
const HOLDER_HOST: [Host; 4] = [
    Host::Source,
    Host::Destination,
    Host::Third,
    Host::Destination,
];
/// The disks each VM other than A asks for (A holds both).
const B_DISKS: [usize; 2] = [0, 1];
const C_DISKS: [usize; 1] = [1];

/// Which hand-over the driver does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EtcdVariant {
    /// The driver: keys beside keys, fenced by the secret's hash and the source's revisions.
    Driver,
    /// Broken: the incoming acquire does not compare the source keys' mod revisions.
    NoRevisionCompare,
    /// Broken: the incoming acquire does not compare the hand-over key with the secret's hash.
    NoSecretCompare,
    /// Broken: release then acquire, without a version: the source deletes its keys at prepare
    /// and the destination's acquire is a plain one (no key for the disk).
    ReleaseAtPrepare,
}

/// A state token as the destination presents it: the secret and the revision of each disk's
/// source key (0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token {
    pub secret: u8,
    pub revs: [u8; 2],
}

/// What the destination presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Presented {
    /// The token of the source's `n`-th prepare (0-based), current or not.
    Handed(usize),
    /// A forged one: the current revisions (anyone can read them), a secret never handed out.
    Forged,
}

/// The source's progress (VM A on S).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// Holds its keys, guest running, no migration.
    Running,
    /// `migrate-prepare` done with secret `n`: guest still running (pre-copy).
    Prepared(u8),
    /// Switched over: guest paused, migration `n` not completed yet.
    Paused(u8),
    /// `migrate-finish` (success) done: hand-over key deleted, guest paused until it exits.
    Finished,
    /// Guest gone (exited, or fenced by its lease's end): holds nothing.
    Gone,
}

/// The destination's side of VM A (on D).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Destination {
    Idle,
    /// `acquire_incoming` succeeded: A@D's keys exist (its guest runs after the switch-over).
    Holds,
    /// Fenced (D's lease ended) or cancelled after holding: out of the game.
    Out,
}

/// Where VM A's guest runs (and may write).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Guest {
    OnSource,
    OnDestination,
    Nowhere,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EtcdState {
    /// Per disk, per holder: the key's mod revision if it exists (its lease is its host's).
    pub keys: [[Option<u8>; 4]; 2],
    /// The hand-over key: the secret (its hash) of the prepare that wrote it, under S's lease.
    pub handover: Option<u8>,
    /// The store's revision.
    pub rev: u8,
    /// Tokens the source handed out, in order.
    pub tokens: Vec<Token>,
    pub source: Source,
    pub destination: Destination,
    pub guest: Guest,
    /// The source cancelled a migration since its last prepare.
    pub cancelled: bool,
    /// B's and C's guests run (they hold their keys).
    pub b_runs: bool,
    pub c_runs: bool,
    /// Requests left: the source's prepares, the destination's incoming acquires, B's and C's
    /// acquires, and crashes (a lease's end, or A's guest dying mid-migration).
    pub prepares: u8,
    pub incoming_tries: u8,
    pub b_tries: u8,
    pub c_tries: u8,
    pub crashes: u8,
    /// An incoming acquire succeeded with a token that was not the current one.
    pub accepted_stale: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EtcdAction {
    /// Source `migrate-prepare`: `prepare_handover`.
    SourcePrepareHandover,
    /// Destination `vmlock run --incoming STATE`: `acquire_incoming`.
    DestinationAcquireIncoming(Presented),
    /// QEMU's switch-over: the source's guest pauses, the destination's resumes.
    MigrationSwitchover,
    /// Source `migrate-finish` (success): `taken_over_elsewhere`, then `end_handover`.
    SourceFinish,
    /// Source `migrate-finish` (cancel): `end_handover`; the source keeps its keys.
    SourceCancel,
    /// Destination cancelled: its guest exits, `release` of its keys.
    DestinationCancel,
    /// A's guest on the source exits (after a finish, or dying mid-migration): `release`.
    SourceGuestExit,
    /// B (on the third host) asks for both disks: `acquire`.
    ThirdAcquireB,
    /// B's guest exits: `release`.
    ThirdReleaseB,
    /// C (on the destination host) asks for the second disk: `acquire`.
    ThirdAcquireC,
    ThirdReleaseC,
    /// A host's lease ends (crash, partition): it has fenced its guests; its keys go.
    LeaseExpires(Host),
}

/// The model: `variant` with bounds on the requests and crashes.
#[derive(Debug, Clone)]
pub struct EtcdHandoff {
    pub variant: EtcdVariant,
    pub prepares: u8,
    pub incoming_tries: u8,
    pub third_tries: u8,
    pub crashes: u8,
}

/// The safety properties (`always`) and the reachability ones (`sometimes`).
pub mod etcd_properties {
    /// No disk is written by two VMs at once: A's guest (wherever it runs), B's, C's.
    pub const NEVER_TWO_WRITERS: &str = "never two writers of a disk";
    /// A running guest's VM has a key for each of its disks on its own host (under its live
    /// lease).
    pub const WRITER_HOLDS_KEY: &str = "a writing guest holds its key";
    /// `acquire_incoming` succeeds only with the current prepare's secret and revisions, while
    /// the source is prepared.
    pub const STALE_OR_FORGED_REFUSED: &str = "a stale or forged state is refused";
    /// After a cancel, while the source runs, it holds a key for every disk and no hand-over key
    /// is left.
    pub const CANCEL_KEEPS_SOURCE: &str = "a cancel leaves the source holding every disk";
    pub const HAND_OFF_COMPLETES: &str = "the destination ends as the owner";
    pub const CANCEL_RESTORES: &str = "a cancel leaves the source owning";
    pub const THIRD_GETS_A_FREE_DISK: &str = "the third host takes a freed disk";
}

fn disk_has_key(s: &EtcdState, d: usize) -> bool {
    s.keys[d].iter().any(Option::is_some)
}

impl EtcdHandoff {
    /// The current revisions of A@S's keys (0: none).
    fn source_revs(s: &EtcdState) -> [u8; 2] {
        [0, 1].map(|d| s.keys[d][A_SRC].unwrap_or(0))
    }

    /// A plain `acquire` of `disks` by `holder`: no key at all under each disk's prefix.
    fn acquire(s: &mut EtcdState, holder: usize, disks: &[usize]) -> bool {
        if disks.iter().any(|&d| disk_has_key(s, d)) {
            return false;
        }
        s.rev += 1;
        for &d in disks {
            s.keys[d][holder] = Some(s.rev);
        }
        true
    }

    /// `release`: deletes `holder`'s keys (they are its host's lease's).
    fn release(s: &mut EtcdState, holder: usize) {
        if (0..2).any(|d| s.keys[d][holder].is_some()) {
            s.rev += 1;
            for d in 0..2 {
                s.keys[d][holder] = None;
            }
        }
    }
}

impl Model for EtcdHandoff {
    type State = EtcdState;
    type Action = EtcdAction;

    fn init_states(&self) -> Vec<EtcdState> {
        // A acquired both disks at revision 1.
        let mut keys = [[None; 4]; 2];
        keys[0][A_SRC] = Some(1);
        keys[1][A_SRC] = Some(1);
        vec![EtcdState {
            keys,
            handover: None,
            rev: 1,
            tokens: Vec::new(),
            source: Source::Running,
            destination: Destination::Idle,
            guest: Guest::OnSource,
            cancelled: false,
            b_runs: false,
            c_runs: false,
            prepares: self.prepares,
            incoming_tries: self.incoming_tries,
            b_tries: self.third_tries,
            c_tries: self.third_tries,
            crashes: self.crashes,
            accepted_stale: false,
        }]
    }

    fn actions(&self, s: &EtcdState, out: &mut Vec<EtcdAction>) {
        use EtcdAction as A;
        match s.source {
            // A new migration only once no destination holds keys of an earlier one.
            Source::Running if s.prepares > 0 && s.destination != Destination::Holds => {
                out.push(A::SourcePrepareHandover)
            }
            Source::Prepared(_) => {
                out.push(A::SourceCancel);
                if s.destination == Destination::Holds {
                    out.push(A::MigrationSwitchover);
                }
            }
            Source::Paused(_) => out.push(A::SourceFinish),
            _ => {}
        }
        // The source's guest exits after the migration, or dies at any time (a crash).
        match s.source {
            Source::Finished | Source::Paused(_) => out.push(A::SourceGuestExit),
            Source::Running | Source::Prepared(_) if s.crashes > 0 => out.push(A::SourceGuestExit),
            _ => {}
        }
        match s.destination {
            Destination::Idle if s.incoming_tries > 0 => {
                for i in 0..s.tokens.len() {
                    out.push(A::DestinationAcquireIncoming(Presented::Handed(i)));
                }
                out.push(A::DestinationAcquireIncoming(Presented::Forged));
            }
            Destination::Holds if s.guest != Guest::OnDestination => out.push(A::DestinationCancel),
            _ => {}
        }
        if s.b_runs {
            out.push(A::ThirdReleaseB);
        } else if s.b_tries > 0 {
            out.push(A::ThirdAcquireB);
        }
        if s.c_runs {
            out.push(A::ThirdReleaseC);
        } else if s.c_tries > 0 {
            out.push(A::ThirdAcquireC);
        }
        if s.crashes > 0 {
            for h in [Host::Source, Host::Destination, Host::Third] {
                out.push(A::LeaseExpires(h));
            }
        }
    }

    fn next_state(&self, last: &EtcdState, action: EtcdAction) -> Option<EtcdState> {
        use EtcdAction as A;
        let mut s = last.clone();
        match action {
            A::SourcePrepareHandover => {
                s.prepares -= 1;
                let secret = self.prepares - s.prepares; // 1, 2, ...: fresh each time
                                                         // Compare: `lease(key) == S` for each of A's keys.
                if (0..2).any(|d| s.keys[d][A_SRC].is_none()) {
                    return Some(s); // Stale: refused, nothing prepared
                }
                let revs = Self::source_revs(&s);
                s.rev += 1;
                s.handover = Some(secret);
                if self.variant == EtcdVariant::ReleaseAtPrepare {
                    for d in 0..2 {
                        s.keys[d][A_SRC] = None;
                    }
                }
                let revs = if self.variant == EtcdVariant::ReleaseAtPrepare {
                    [0, 0]
                } else {
                    revs
                };
                s.tokens.push(Token { secret, revs });
                s.source = Source::Prepared(secret);
                s.cancelled = false;
            }
            A::DestinationAcquireIncoming(presented) => {
                s.incoming_tries -= 1;
                let token = match presented {
                    Presented::Handed(i) => s.tokens[i],
                    Presented::Forged => Token {
                        secret: 0,
                        revs: Self::source_revs(&s),
                    },
                };
                let current = matches!(s.source, Source::Prepared(n) if n == token.secret)
                    && token.revs == Self::source_revs(&s);
                let secret_ok = self.variant == EtcdVariant::NoSecretCompare
                    || s.handover == Some(token.secret);
                let granted = match self.variant {
                    EtcdVariant::ReleaseAtPrepare => {
                        secret_ok && Self::acquire(&mut s, A_DST, &[0, 1])
                    }
                    _ => {
                        let revs_ok = self.variant == EtcdVariant::NoRevisionCompare
                            || (0..2).all(|d| s.keys[d][A_SRC].unwrap_or(0) == token.revs[d]);
                        let own_absent = (0..2).all(|d| s.keys[d][A_DST].is_none());
                        if secret_ok && revs_ok && own_absent {
                            s.rev += 1;
                            for d in 0..2 {
                                s.keys[d][A_DST] = Some(s.rev);
                            }
                            true
                        } else {
                            false
                        }
                    }
                };
                if granted {
                    s.destination = Destination::Holds;
                    s.accepted_stale |= !current;
                }
            }
            A::MigrationSwitchover => {
                let Source::Prepared(n) = s.source else {
                    return None;
                };
                s.source = Source::Paused(n);
                s.guest = Guest::OnDestination;
            }
            A::SourceFinish => {
                // `taken_over_elsewhere`: A@D has a key for every disk; else the finish fails.
                if !(0..2).all(|d| s.keys[d][A_DST].is_some()) {
                    return None;
                }
                if s.handover.is_some() {
                    s.rev += 1;
                    s.handover = None;
                }
                s.source = Source::Finished;
            }
            A::SourceCancel => {
                if s.handover.is_some() {
                    s.rev += 1;
                    s.handover = None;
                }
                s.source = Source::Running;
                s.cancelled = true;
            }
            A::DestinationCancel => {
                Self::release(&mut s, A_DST);
                s.destination = Destination::Out;
            }
            A::SourceGuestExit => {
                if matches!(s.source, Source::Running | Source::Prepared(_)) {
                    s.crashes -= 1;
                }
                if s.guest == Guest::OnSource {
                    s.guest = Guest::Nowhere;
                }
                // The migration in the table is abandoned; a hand-over key stays until S's lease
                // ends (only `migrate-finish` deletes it).
                Self::release(&mut s, A_SRC);
                s.source = Source::Gone;
            }
            A::ThirdAcquireB => {
                s.b_tries -= 1;
                s.b_runs = Self::acquire(&mut s, B, &B_DISKS);
            }
            A::ThirdReleaseB => {
                Self::release(&mut s, B);
                s.b_runs = false;
            }
            A::ThirdAcquireC => {
                s.c_tries -= 1;
                s.c_runs = Self::acquire(&mut s, C, &C_DISKS);
            }
            A::ThirdReleaseC => {
                Self::release(&mut s, C);
                s.c_runs = false;
            }
            A::LeaseExpires(host) => {
                s.crashes -= 1;
                let mut wrote = false;
                for (holder, h) in HOLDER_HOST.iter().enumerate() {
                    if *h == host {
                        for d in 0..2 {
                            wrote |= s.keys[d][holder].take().is_some();
                        }
                    }
                }
                match host {
                    Host::Source => {
                        wrote |= s.handover.take().is_some();
                        s.source = Source::Gone;
                        if s.guest == Guest::OnSource {
                            s.guest = Guest::Nowhere;
                        }
                    }
                    Host::Destination => {
                        if s.destination == Destination::Holds {
                            s.destination = Destination::Out;
                        }
                        if s.guest == Guest::OnDestination {
                            s.guest = Guest::Nowhere;
                        }
                        s.c_runs = false;
                    }
                    // The host's daemon gets a new lease: B may ask again.
                    Host::Third => s.b_runs = false,
                }
                if wrote {
                    s.rev += 1;
                }
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        use etcd_properties as p;
        vec![
            Property::always(p::NEVER_TWO_WRITERS, |_, s: &EtcdState| {
                (0..2).all(|d| {
                    let writers = usize::from(s.guest != Guest::Nowhere)
                        + usize::from(s.b_runs && B_DISKS.contains(&d))
                        + usize::from(s.c_runs && C_DISKS.contains(&d));
                    writers <= 1
                })
            }),
            Property::always(p::WRITER_HOLDS_KEY, |_, s: &EtcdState| {
                (0..2).all(|d| {
                    let a = match s.guest {
                        Guest::OnSource => s.keys[d][A_SRC].is_some(),
                        Guest::OnDestination => s.keys[d][A_DST].is_some(),
                        Guest::Nowhere => true,
                    };
                    a && (!s.b_runs || !B_DISKS.contains(&d) || s.keys[d][B].is_some())
                        && (!s.c_runs || !C_DISKS.contains(&d) || s.keys[d][C].is_some())
                })
            }),
            Property::always(p::STALE_OR_FORGED_REFUSED, |_, s: &EtcdState| {
                !s.accepted_stale
            }),
            Property::always(p::CANCEL_KEEPS_SOURCE, |_, s: &EtcdState| {
                !(s.cancelled && s.source == Source::Running)
                    || (s.handover.is_none() && (0..2).all(|d| s.keys[d][A_SRC].is_some()))
            }),
            Property::sometimes(p::HAND_OFF_COMPLETES, |_, s: &EtcdState| {
                s.source == Source::Gone
                    && s.guest == Guest::OnDestination
                    && s.handover.is_none()
                    && (0..2).all(|d| s.keys[d][A_SRC].is_none() && s.keys[d][A_DST].is_some())
            }),
            Property::sometimes(p::CANCEL_RESTORES, |_, s: &EtcdState| {
                s.cancelled
                    && s.source == Source::Running
                    && s.destination == Destination::Out
                    && (0..2).all(|d| s.keys[d][A_SRC].is_some() && s.keys[d][A_DST].is_none())
            }),
            Property::sometimes(p::THIRD_GETS_A_FREE_DISK, |_, s: &EtcdState| s.b_runs),
        ]
    }
}
