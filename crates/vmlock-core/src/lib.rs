//! vmlock's lock core: which VM holds which lock, and the rules for granting, releasing, handing
//! over and recovering them, as a state machine over an injected [`host`]. No system call happens
//! in this crate: the daemon runs the core over Linux, the simulator over a simulated kernel.

pub mod host;
pub mod table;
pub mod types;

pub use host::{Caller, Conflict, Host, LockKind, ProcInfo};
pub use table::{
    Effects, Handover, LinkId, LockTable, LostLease, Opened, Persisted, PersistedOwner, Policy,
    Push, Refusal, Reservation, Sabotage, Ticket,
};
