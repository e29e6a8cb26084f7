//! The one error type of the lock manager API.
//!
//! Every message names the disk (or lease) concerned and, where it is known, the VM that holds it,
//! so that an operator reading a failed VM start knows what to look at without a debugger.
//! Errors cross the daemon's socket unchanged, so the type is plain data (no `io::Error` sources).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Who holds a lock: enough to find the VM on its host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// VM name, as given by its manager.
    pub name: String,
    /// VM uuid.
    pub uuid: String,
    /// Guest process id on `host`, when known.
    pub pid: Option<u32>,
    /// Host name of the holder.
    pub host: String,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VM \"{}\" (uuid {}", self.name, self.uuid)?;
        if let Some(pid) = self.pid {
            write!(f, ", pid {pid}")?;
        }
        write!(f, ", host {})", self.host)
    }
}

/// A holder that vmlock did not grant: another lock manager, a QEMU started outside vmlock, or a
/// process that vmlock can only describe from `/proc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForeignHolder {
    /// A VM known to vmlock.
    Vm(Holder),
    /// A process found holding the disk (from `/proc/PID/fdinfo` or a POSIX lock's owner pid).
    Process {
        /// Its pid.
        pid: u32,
        /// Its command name (`/proc/PID/comm`), when readable.
        command: String,
        /// What it holds, e.g. "QEMU write lock (byte 101)" or "POSIX lock on byte 0 (virtlockd?)".
        what: String,
    },
    /// The kernel refused the lock but no holder could be named (for example on NFS).
    Unknown,
}

impl fmt::Display for ForeignHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForeignHolder::Vm(h) => h.fmt(f),
            ForeignHolder::Process { pid, command, what } => {
                write!(f, "process {pid} ({command}) holding a {what}")
            }
            ForeignHolder::Unknown => {
                f.write_str("an unknown holder (the kernel refused the lock)")
            }
        }
    }
}

/// One failure inside a multi-resource release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceFailure {
    /// The disk path or lease key.
    pub resource: String,
    /// Why it failed.
    pub error: Box<Error>,
}

/// Every error the API, its drivers and the daemon report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Error {
    /// No driver with that name is registered.
    #[error("unknown lock driver \"{name}\"; available drivers: {available}")]
    UnknownDriver {
        /// The name asked for.
        name: String,
        /// Comma-separated names that exist.
        available: String,
    },
    /// A driver or daemon configuration is wrong or missing.
    #[error("configuration error in {source_name}: {reason}")]
    Config {
        /// File or table the error was found in.
        source_name: String,
        /// What is wrong.
        reason: String,
    },
    /// A manager parameter key that the API does not know.
    #[error("unknown manager parameter \"{key}\" (known: id, uuid, name, pid, uri)")]
    UnknownParameter {
        /// The key given.
        key: String,
    },
    /// A manager parameter with a bad value, or a required one missing.
    #[error("invalid manager parameter \"{key}\": {reason}")]
    InvalidParameter {
        /// The key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A resource (disk or lease) that cannot be registered.
    #[error("invalid resource {resource}: {reason}")]
    InvalidResource {
        /// The disk path or lease as given.
        resource: String,
        /// What is wrong.
        reason: String,
    },
    /// The driver does not do this step (see its capabilities).
    #[error("lock driver \"{driver}\" does not support {operation}")]
    Unsupported {
        /// Driver name.
        driver: String,
        /// The step asked for.
        operation: String,
    },
    /// A step asked for in the wrong state of the manager (e.g. hotplug before acquire).
    #[error("cannot {operation} now: {reason}")]
    InvalidState {
        /// The step asked for.
        operation: String,
        /// The state that forbids it.
        reason: String,
    },
    /// The resource is held by someone else.
    #[error("disk {resource} is locked by {holder}")]
    Busy {
        /// The disk path or lease key.
        resource: String,
        /// Who holds it.
        holder: ForeignHolder,
    },
    /// A release or hotplug-release of a resource the owner does not hold.
    #[error("disk {resource} is not locked by VM {owner}")]
    NotHeld {
        /// The disk path or lease key.
        resource: String,
        /// The owner that asked (uuid).
        owner: String,
    },
    /// A release of several resources in which some failed; the others were released.
    #[error("release failed for {}: {}", .failures.len(), describe_failures(.failures))]
    PartialRelease {
        /// Each resource that could not be released and why.
        failures: Vec<ResourceFailure>,
    },
    /// No VM with that uuid is known to the lock service.
    #[error("no VM with uuid {uuid} holds or registered locks here")]
    UnknownOwner {
        /// The uuid asked for.
        uuid: String,
    },
    /// A VM with that uuid already holds locks here under another process.
    #[error("VM uuid {uuid} is already registered, by {holder}")]
    OwnerExists {
        /// The uuid.
        uuid: String,
        /// The VM already registered with it.
        holder: Holder,
    },
    /// A lock-state string that cannot be parsed, was forged, or is stale.
    #[error("invalid lock state: {reason}")]
    InvalidLockState {
        /// What is wrong.
        reason: String,
    },
    /// The state came from another driver than the one in use (e.g. migration lockd -> sanlock).
    #[error("lock driver mismatch: the state was produced by \"{found}\" but this host uses \"{expected}\"")]
    DriverMismatch {
        /// This manager's driver.
        expected: String,
        /// The state's driver.
        found: String,
    },
    /// The guest is still running, so its leases must not be given up.
    #[error("guest of VM {vm} (pid {pid}) is still running; its leases are kept")]
    GuestRunning {
        /// VM name.
        vm: String,
        /// Guest pid.
        pid: u32,
    },
    /// The connection was restricted and may only hold its locks.
    #[error("operation denied: this lock-manager connection has been restricted")]
    Restricted,
    /// The peer may not use the lock service.
    #[error("permission denied: {reason}")]
    PermissionDenied {
        /// Why.
        reason: String,
    },
    /// The request was malformed or too large.
    #[error("protocol error: {reason}")]
    Protocol {
        /// What was wrong.
        reason: String,
    },
    /// The lock service could not be reached or failed.
    #[error("lock service unavailable: {reason}")]
    ServiceUnavailable {
        /// Why.
        reason: String,
    },
    /// An operating-system call failed.
    #[error("{context}: {message}")]
    Io {
        /// What was being done, naming the file.
        context: String,
        /// The OS error text.
        message: String,
        /// The `io::ErrorKind`, by its name (`NotFound`, `PermissionDenied`, ...), so callers on
        /// either side of the daemon's socket can still branch on it ([`Error::io_kind`]).
        /// Missing in errors from older peers: read as `Other`.
        #[serde(default = "other_kind")]
        kind: String,
    },
}

fn describe_failures(failures: &[ResourceFailure]) -> String {
    failures
        .iter()
        .map(|f| format!("{} ({})", f.resource, f.error))
        .collect::<Vec<_>>()
        .join("; ")
}

fn other_kind() -> String {
    kind_name(std::io::ErrorKind::Other).to_owned()
}

/// The kinds that survive serialisation by name; any other kind travels as `Other`.
const KINDS: &[(std::io::ErrorKind, &str)] = {
    use std::io::ErrorKind::*;
    &[
        (NotFound, "NotFound"),
        (PermissionDenied, "PermissionDenied"),
        (ConnectionRefused, "ConnectionRefused"),
        (ConnectionReset, "ConnectionReset"),
        (ConnectionAborted, "ConnectionAborted"),
        (NotConnected, "NotConnected"),
        (AddrInUse, "AddrInUse"),
        (AddrNotAvailable, "AddrNotAvailable"),
        (BrokenPipe, "BrokenPipe"),
        (AlreadyExists, "AlreadyExists"),
        (WouldBlock, "WouldBlock"),
        (InvalidInput, "InvalidInput"),
        (InvalidData, "InvalidData"),
        (TimedOut, "TimedOut"),
        (WriteZero, "WriteZero"),
        (Interrupted, "Interrupted"),
        (Unsupported, "Unsupported"),
        (UnexpectedEof, "UnexpectedEof"),
        (OutOfMemory, "OutOfMemory"),
        (Other, "Other"),
    ]
};

fn kind_name(kind: std::io::ErrorKind) -> &'static str {
    KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or("Other", |(_, name)| name)
}

impl Error {
    /// An I/O error with what was being done; keeps the error's kind.
    pub fn io(context: impl Into<String>, err: &std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            message: err.to_string(),
            kind: kind_name(err.kind()).to_owned(),
        }
    }

    /// The `io::ErrorKind` of an [`Error::Io`] (`Other` for kinds without a stable name);
    /// `None` for every other variant.
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        match self {
            Error::Io { kind, .. } => Some(
                KINDS
                    .iter()
                    .find(|(_, name)| name == kind)
                    .map_or(std::io::ErrorKind::Other, |(k, _)| *k),
            ),
            _ => None,
        }
    }

    /// An I/O failure on `resource`: a refusal of the file itself (`InvalidInput`, e.g. a FIFO
    /// named as a disk) is an [`Error::InvalidResource`]; anything else an [`Error::Io`].
    pub fn io_for_resource(
        resource: impl Into<String>,
        context: impl Into<String>,
        err: &std::io::Error,
    ) -> Self {
        if err.kind() == std::io::ErrorKind::InvalidInput {
            Error::InvalidResource {
                resource: resource.into(),
                reason: err.to_string(),
            }
        } else {
            Error::io(context, err)
        }
    }

    /// Shorthand for an unsupported step.
    pub fn unsupported(driver: &str, operation: &str) -> Self {
        Error::Unsupported {
            driver: driver.to_owned(),
            operation: operation.to_owned(),
        }
    }

    /// Shorthand for a step in the wrong state.
    pub fn invalid_state(operation: &str, reason: impl Into<String>) -> Self {
        Error::InvalidState {
            operation: operation.to_owned(),
            reason: reason.into(),
        }
    }
}

/// The API's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_names_disk_and_holder() {
        let e = Error::Busy {
            resource: "/var/lib/images/a.qcow2".into(),
            holder: ForeignHolder::Vm(Holder {
                name: "web1".into(),
                uuid: "7c9e6679-7425-40de-944b-e07fc1f90ae7".into(),
                pid: Some(4242),
                host: "h1".into(),
            }),
        };
        let text = e.to_string();
        assert!(text.contains("/var/lib/images/a.qcow2"), "{text}");
        assert!(text.contains("\"web1\""), "{text}");
        assert!(text.contains("pid 4242"), "{text}");
    }

    #[test]
    fn io_errors_keep_their_kind_across_json() {
        let e = Error::io(
            "opening /x",
            &std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert_eq!(e.io_kind(), Some(std::io::ErrorKind::NotFound));
        let json = serde_json::to_string(&e).unwrap();
        assert!(json.contains("\"kind\":\"NotFound\""), "{json}");
        let back: Error = serde_json::from_str(&json).unwrap();
        assert_eq!(back.io_kind(), Some(std::io::ErrorKind::NotFound));
        assert_eq!(back, e);
        let eacces = std::io::Error::from_raw_os_error(13);
        let e = Error::io("locking /x", &eacces);
        assert_eq!(e.io_kind(), Some(std::io::ErrorKind::PermissionDenied));
        // An error from a peer that did not send a kind.
        let old: Error = serde_json::from_str(r#"{"Io":{"context":"c","message":"m"}}"#).unwrap();
        assert_eq!(old.io_kind(), Some(std::io::ErrorKind::Other));
        assert_eq!(Error::Restricted.io_kind(), None);
    }

    #[test]
    fn errors_round_trip_through_json() {
        let e = Error::PartialRelease {
            failures: vec![ResourceFailure {
                resource: "/a".into(),
                error: Box::new(Error::NotHeld {
                    resource: "/a".into(),
                    owner: "u".into(),
                }),
            }],
        };
        let json = serde_json::to_string(&e).unwrap();
        let back: Error = serde_json::from_str(&json).unwrap();
        assert_eq!(back, e);
        assert!(e.to_string().contains("/a (disk /a is not locked by VM u)"));
    }
}
