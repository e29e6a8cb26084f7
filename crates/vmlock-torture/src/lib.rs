//! The torture campaign against `lockd` (issue 13): real guests under the real `vmlock run`
//! start, stop, hotplug and unplug disks, while the campaign kills and pauses vmlockd, kills
//! supervisors and guests, deletes or corrupts the state files, opens idle connections, sends
//! malformed frames, hangs the storage under running guests (FUSE) and stops supervisors; after
//! every operation it probes vmlockd directly and times it (a probe over 100 ms while another
//! client is stuck is a stall). The oracle is independent of vmlock: each guest writes its id
//! into its disks and re-reads it, and checks `/proc/locks` for its lock ([`guest`]); after
//! things settle the campaign checks every lock on its disks belongs to a live guest and every
//! live guest still has its locks ([`campaign`]). One table comes out ([`campaign::Report::table`]).
//!
//! The binary `vmlock-torture` runs a campaign; `vmlock-cli`'s test `torture` runs a short one
//! against the `vmlock` it builds. Both serve as the guest program too (`PROGRAM guest ...`).

pub mod campaign;
pub mod guest;
pub mod locks;
pub mod rng;

pub use campaign::{run, Op, Options, Report};

/// If the process was started as a guest (`PROGRAM guest ARGS...`), runs the guest and returns
/// its exit code; `None` otherwise. Call it first thing in `main`.
pub fn guest_main_if_asked() -> Option<i32> {
    let args: Vec<String> = std::env::args().collect();
    (args.get(1).map(String::as_str) == Some("guest")).then(|| guest::main(&args[2..]))
}

/// Milliseconds since the epoch: the time stamp of guests' findings and of the campaign's log.
pub fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}
