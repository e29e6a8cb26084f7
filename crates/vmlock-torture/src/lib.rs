//! The torture campaign (issue 13): real guests under the real `vmlock run` start, stop, hotplug
//! and unplug disks while faults are injected, and an oracle independent of vmlock judges.
//!
//! Against `lockd` the campaign kills and pauses vmlockd, kills supervisors and guests, deletes or
//! corrupts the state files, opens idle connections, sends malformed frames, hangs the storage
//! under running guests (FUSE) and stops supervisors; after every operation it probes vmlockd
//! directly and times it (a probe over 100 ms while another client is stuck is a stall). Against
//! `sanlock` (`--driver sanlock`) two real sanlock daemons act as two hosts, and the campaign kills
//! (and restarts) and pauses them and sends them malformed requests ([`campaign`]'s `sanlock`).
//!
//! The oracle is independent of vmlock: each guest writes its id into its disks and re-reads it,
//! and checks its lock: under lockd the kernel's (`/proc/locks`, `F_OFD_GETLK`), under sanlock
//! sanlock's own list (`sanlock client status`, [`sanlock_view`]) ([`guest`]); after things settle
//! the campaign checks every lock (lease) on its disks belongs to a live guest and every live guest
//! still has its locks ([`campaign`]). One table comes out ([`campaign::Report::table`]).
//!
//! The binary `vmlock-torture` runs a campaign; `vmlock-cli`'s tests `torture` and
//! `torture_sanlock` run short ones against the `vmlock` it builds. Both serve as the guest program
//! too (`PROGRAM guest ...`).

pub mod campaign;
pub mod guest;
pub mod locks;
pub mod rng;
pub mod sanlock_view;

pub use campaign::{run, Driver, Op, Options, Report};

/// If the process was started as a guest (`PROGRAM guest ARGS...`), runs the guest and returns
/// its exit code; `None` otherwise. Call it first thing in `main`.
pub fn guest_main_if_asked() -> Option<i32> {
    let args: Vec<String> = std::env::args().collect();
    (args.get(1).map(String::as_str) == Some("guest")).then(|| guest::main(&args[2..]))
}

/// Why a campaign with `opts` cannot run here (it is then skipped, never passed): sanlock's
/// campaign needs the `sanlock` program.
pub fn skip_reason(opts: &Options) -> Option<String> {
    (opts.driver == Driver::Sanlock && !sanlock_view::installed())
        .then(|| "sanlock is not installed (no `sanlock` program in PATH)".to_owned())
}

/// Milliseconds since the epoch: the time stamp of guests' findings and of the campaign's log.
pub fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}
