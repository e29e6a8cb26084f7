//! vmlock's etcd backend (first slice of the `etcd` driver): disk locks kept in a real etcd
//! cluster, behind a **blocking** API that vmlockd's threads can call.
//!
//! - [`Etcd`]: a connection, with a small current-thread tokio runtime on a thread of its own;
//!   every call blocks the calling thread (never call it from inside an async context).
//! - [`HostLease`]: the host's one etcd lease, kept alive in the background, with a fencing
//!   **deadline** on `CLOCK_BOOTTIME` ([`BootTime`]): the send time of the last successful
//!   grant/keep-alive + granted TTL·(1 − ρ) − ε. Before it, the cluster cannot have expired the
//!   lease; the daemon must have stopped every guest using the lease's keys by then.
//! - Locks, one etcd transaction each, all or nothing: [`HostLease::acquire`],
//!   [`HostLease::release`], [`HostLease::transfer`] (migration, fenced by the key's revision).
//!
//! Key layout (docs/etcd.md): `PREFIX/disks/<disk>/e/<holder>` for an exclusive lock and
//! `PREFIX/disks/<disk>/s/<holder>` for a shared one, disk and holder percent-encoded (`%` and
//! `/`), so `rbd:pool/image` is one path segment and no disk's prefix covers another's.

mod client;
mod config;
mod handover;
mod keys;
mod lease;
mod locks;

pub use client::Etcd;
pub use config::{Config, CLOCK_RATE_BOUND};
pub use handover::SourceKey;
pub use keys::LockKey;
pub use lease::{BootTime, HostLease, LeaseState, LossReason};
pub use locks::{Held, LockRequest, Owner, Released};

use std::io;
use std::time::Duration;

/// An etcd revision: the cluster-wide counter at the write that created or last changed a key.
/// A lock's revision is its fencing token (a transfer must name it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(pub i64);

/// An etcd lease id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

impl std::fmt::Display for Revision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// What can go wrong. [`Error::kind`] maps each to an [`io::ErrorKind`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error("etcd configuration: {0}")]
    Config(String),
    /// A configured file could not be read.
    #[error("reading {path}: {source}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Something not supported yet.
    #[error("{0} is not supported yet")]
    Unsupported(&'static str),
    /// The cluster did not answer while connecting.
    #[error("etcd unreachable at {endpoints} (no answer in {timeout:?}): {reason}")]
    Unreachable {
        /// The configured endpoints.
        endpoints: String,
        /// How long it was tried.
        timeout: Duration,
        /// The last error seen.
        reason: String,
    },
    /// A request failed (after retries, within its bound).
    #[error("etcd {what} failed at {endpoints}: {reason}")]
    Request {
        /// Which request.
        what: &'static str,
        /// The configured endpoints.
        endpoints: String,
        /// The last error seen.
        reason: String,
        /// Whether it timed out.
        timed_out: bool,
    },
    /// A lock is held by someone else (or, for a shared lock, an exclusive holder exists).
    #[error("disk {} is held by {holder} (key {holder_key}, {})", key.disk, if *.exclusive { "exclusive" } else { "shared" })]
    Conflict {
        /// The lock asked for.
        key: LockKey,
        /// The holder's key in etcd.
        holder_key: String,
        /// Whether the holder's lock is exclusive.
        exclusive: bool,
        /// The holder, from its key's value (boxed: keeps `Result<_, Error>` small).
        holder: Box<Owner>,
    },
    /// A transfer named a revision that is no longer the key's (or the key is gone).
    #[error("stale lock state for disk {} (holder {}): revision {expected} expected, the key is at {}", key.disk, key.holder, current.map_or("nothing (gone)".to_owned(), |r| r.to_string()))]
    Stale {
        /// The lock.
        key: LockKey,
        /// The revision the caller named.
        expected: Revision,
        /// The key's revision now, if it exists.
        current: Option<Revision>,
    },
    /// The host lease is lost: no lock can be taken under it.
    #[error("etcd lease {lease} lost: {reason}")]
    LeaseLost {
        /// The lease.
        lease: LeaseId,
        /// Why.
        reason: LossReason,
    },
    /// A request was malformed (empty names, one disk twice).
    #[error("invalid lock request: {0}")]
    Invalid(String),
    /// A key's value is not an owner record.
    #[error("etcd key {key} has a value that is not a vmlock owner: {value:?}")]
    Corrupt {
        /// The key.
        key: String,
        /// Its value.
        value: String,
    },
    /// The client's runtime thread could not be started or has stopped.
    #[error("etcd client runtime: {0}")]
    Runtime(io::Error),
}

impl Error {
    /// The closest [`io::ErrorKind`].
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            Error::Config(_) | Error::Invalid(_) => io::ErrorKind::InvalidInput,
            Error::File { source, .. } | Error::Runtime(source) => source.kind(),
            Error::Unsupported(_) => io::ErrorKind::Unsupported,
            Error::Unreachable { .. } => io::ErrorKind::NotConnected,
            Error::Request {
                timed_out: true, ..
            } => io::ErrorKind::TimedOut,
            Error::Request { .. } => io::ErrorKind::Other,
            Error::Conflict { .. } => io::ErrorKind::WouldBlock,
            Error::Stale { .. } | Error::LeaseLost { .. } => io::ErrorKind::PermissionDenied,
            Error::Corrupt { .. } => io::ErrorKind::InvalidData,
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        io::Error::new(e.kind(), e)
    }
}
