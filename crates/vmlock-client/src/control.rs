//! The control socket of a VM's supervisor (`vmlock run`, or the holder libvirt's plugin
//! starts): how later commands reach a running VM whose leases belong to that process — drivers
//! such as sanlock tie leases to the process that acquired them, and vmlockd takes changes to a
//! VM only from its holder process.
//!
//! `RUNTIME_DIR/vm-UUID.sock` (a migration destination on the same host serves beside its source
//! as `vm-UUID.PID.sock`), 0600 in the 0700 runtime directory; only root or the supervisor's own
//! uid is served (`SO_PEERCRED`). One request and one reply per connection, in vmlockd's frames
//! ([`crate::proto`]: length-prefixed JSON, the same size limit and the same bound on a started
//! frame), so there is one framing for both sockets. This module is the protocol and the client;
//! the server is the supervisor's (`vmlock-cli`).

use crate::proto::{write_frame, FrameReader, Message, ReadError};
use serde::{Deserialize, Serialize};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmlock::{Error, LockState, Resource};

/// How long a supervisor waits for a client's request to start.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client waits for a supervisor's reply (an attach may wait on the lock service).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// A request to a supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControlRequest {
    /// The lock state.
    Inquire,
    /// The guest pid.
    GuestPid,
    /// Who the VM is and what it holds (for `vmlock status`).
    Describe,
    /// Lock one more disk (before hotplug).
    AttachDisk(Resource),
    /// Release a disk (after unplug).
    DetachDisk(Resource),
    /// Migration source: the state for the destination.
    MigratePrepare(String),
    /// End a migration on this side.
    MigrateComplete(bool),
    /// The guest process this supervisor serves (its child, or for libvirt's holder its parent).
    /// Two supervisors of one VM serve on a host during a migration: this tells them apart.
    Serves,
    /// Make sure the VM holds every one of `resources`, taking the missing ones all or nothing
    /// (libvirt's acquire at CPU start, resume and hotplug). A migration destination that has
    /// not taken its leases over yet does so first, with `state` (the source's, version-checked).
    /// [`ControlReply::Ok`] when everything was held already (answered without vmlockd), else
    /// [`ControlReply::Held`].
    Ensure {
        /// The source's lock state, for a migration destination.
        state: Option<String>,
        /// What must be held.
        resources: Vec<Resource>,
    },
    /// The lock service lost this VM's leases (sanlock's kill path runs `vmlock lock-failure`):
    /// carry out the VM's action and release the leases.
    LockFailure,
    /// `request`, if this supervisor serves guest `guest_pid`; else [`ControlReply::NotServing`]
    /// and nothing done. Lets a caller skip asking [`ControlRequest::Serves`] first when the
    /// VM's own socket is the likely one (see [`call_for_guest`]).
    ForGuest {
        /// The guest the caller means.
        guest_pid: u32,
        /// What to do for it.
        request: Box<ControlRequest>,
    },
}

/// Carries no descriptors.
impl Message for ControlRequest {}

/// A supervisor's answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum ControlReply {
    /// Done.
    Ok,
    /// Done; what the VM holds now.
    Held(String),
    /// A lock state, printed.
    State(String),
    /// A pid.
    Pid(Option<u32>),
    /// A VM and its lock state.
    Vm {
        /// VM name.
        name: String,
        /// VM uuid.
        uuid: String,
        /// Domain id.
        id: u32,
        /// Guest pid.
        pid: Option<u32>,
        /// Lock state, printed.
        state: String,
        /// When the supervisor took the leases (seconds since the epoch).
        since: u64,
    },
    /// Failed.
    Error(Error),
    /// This supervisor serves another guest (an answer to [`ControlRequest::ForGuest`]).
    NotServing {
        /// The guest it serves.
        guest_pid: u32,
    },
}

/// Carries no descriptors.
impl Message for ControlReply {}

/// The control socket of VM `uuid` in `runtime_dir`.
pub fn socket_path(runtime_dir: &Path, uuid: &str) -> PathBuf {
    runtime_dir.join(format!("vm-{uuid}.sock"))
}

pub fn read_request(stream: &UnixStream) -> Result<ControlRequest, Error> {
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .map_err(|e| Error::io("control socket", &e))?;
    read_one(stream, "request")
}

/// Reads the one frame of a connection.
pub fn read_one<T: Message>(stream: &UnixStream, what: &str) -> Result<T, Error> {
    match FrameReader::new().read::<T>(stream) {
        Ok((msg, _)) => Ok(msg),
        Err(ReadError::Closed) => Err(Error::Protocol {
            reason: format!("the control socket closed before its {what}"),
        }),
        Err(ReadError::Idle) => Err(Error::io(
            format!("waiting for the control {what}"),
            &std::io::ErrorKind::TimedOut.into(),
        )),
        Err(ReadError::Failed(e)) => Err(e),
    }
}

/// The sockets serving beside VM `uuid`'s own (`vm-UUID.PID.sock`: migration destinations on
/// this host), oldest first: a migration's source was started, and bound its socket, before its
/// destination, so after one migration on this host the VM's supervisor serves beside and the
/// next destination beside it too, and the oldest is the VM's current owner.
pub fn sockets_beside(runtime_dir: &Path, uuid: &str) -> Vec<PathBuf> {
    let prefix = format!("vm-{uuid}.");
    let own = format!("vm-{uuid}.sock");
    let mut beside: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(runtime_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".sock") && n != own)
        })
        .map(|e| {
            let bound = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            (bound, e.path())
        })
        .collect();
    beside.sort();
    beside.into_iter().map(|(_, p)| p).collect()
}

/// The supervisor of VM `uuid`: its own socket, else the oldest that serves beside it (a
/// migration destination on this host whose source has gone; see [`sockets_beside`]).
fn connect(runtime_dir: &Path, uuid: &str) -> Result<UnixStream, Error> {
    let path = socket_path(runtime_dir, uuid);
    let first = match UnixStream::connect(&path) {
        Ok(s) => return Ok(s),
        Err(e) => e,
    };
    for beside in sockets_beside(runtime_dir, uuid) {
        if let Ok(s) = UnixStream::connect(beside) {
            return Ok(s);
        }
    }
    Err(Error::UnknownOwner {
        uuid: format!(
            "{uuid} (no supervisor answers at {}: {first})",
            path.display()
        ),
    })
}

/// The supervisor of VM `uuid` whose guest is process `guest_pid`, among those serving on this
/// host (a migration destination serves beside its source).
pub fn find_serving(runtime_dir: &Path, uuid: &str, guest_pid: u32) -> Result<PathBuf, Error> {
    let own = socket_path(runtime_dir, uuid);
    let prefix = format!("vm-{uuid}.");
    let mut candidates = vec![own.clone()];
    candidates.extend(
        std::fs::read_dir(runtime_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p != &own
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".sock"))
            }),
    );
    for path in candidates {
        // A supervisor that does not answer this at once is not the one asked for.
        if let Ok(ControlReply::Pid(Some(pid))) =
            call_at_within(&path, &ControlRequest::Serves, REQUEST_TIMEOUT)
        {
            if pid == guest_pid {
                return Ok(path);
            }
        }
    }
    Err(Error::UnknownOwner {
        uuid: format!(
            "{uuid} (no vmlock holder serves guest pid {guest_pid} in {}: was it started \
             under vmlock?)",
            runtime_dir.display()
        ),
    })
}

/// Sends `request` to the supervisor of VM `uuid` that serves guest `guest_pid`: to the VM's own
/// socket first, in one round trip ([`ControlRequest::ForGuest`]); if that one serves another
/// guest (a migration on this host) or does not answer, to the one [`find_serving`] finds.
pub fn call_for_guest(
    runtime_dir: &Path,
    uuid: &str,
    guest_pid: u32,
    request: &ControlRequest,
) -> Result<ControlReply, Error> {
    let direct = ControlRequest::ForGuest {
        guest_pid,
        request: Box::new(request.clone()),
    };
    // Not connected (no socket, nobody listening): nothing was sent.
    if let Ok(stream) = UnixStream::connect(socket_path(runtime_dir, uuid)) {
        match exchange(stream, &direct, REPLY_TIMEOUT) {
            // Another guest's supervisor, or one from before `ForGuest` that could not read
            // it: nothing was done.
            Ok(ControlReply::NotServing { .. }) | Err(Error::Protocol { .. }) => {}
            other => return other,
        }
    }
    let path = find_serving(runtime_dir, uuid, guest_pid)?;
    call_at(&path, request)
}

/// Sends `request` to the supervisor serving at `path`.
pub fn call_at(path: &Path, request: &ControlRequest) -> Result<ControlReply, Error> {
    call_at_within(path, request, REPLY_TIMEOUT)
}

/// [`call_at`], waiting at most `timeout` for the reply (a stopped supervisor must not hold up
/// a caller that has something else to do, such as the daemon acting on a lost lease itself).
pub fn call_at_within(
    path: &Path,
    request: &ControlRequest,
    timeout: Duration,
) -> Result<ControlReply, Error> {
    let stream =
        UnixStream::connect(path).map_err(|e| Error::io(format!("{}", path.display()), &e))?;
    exchange(stream, request, timeout)
}

fn exchange(
    stream: UnixStream,
    request: &ControlRequest,
    timeout: Duration,
) -> Result<ControlReply, Error> {
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| Error::io("control socket", &e))?;
    write_frame(&stream, request, &[])?;
    match read_one(&stream, "reply")? {
        ControlReply::Error(e) => Err(e),
        reply => Ok(reply),
    }
}

/// Sends `request` to the supervisor of VM `uuid`.
pub fn call(
    runtime_dir: &Path,
    uuid: &str,
    request: &ControlRequest,
) -> Result<ControlReply, Error> {
    exchange(connect(runtime_dir, uuid)?, request, REPLY_TIMEOUT)
}

/// The state in a reply.
pub fn state(reply: ControlReply) -> Result<LockState, Error> {
    match reply {
        ControlReply::State(s) | ControlReply::Held(s) => s.parse(),
        other => Err(Error::Protocol {
            reason: format!("unexpected control reply {other:?}"),
        }),
    }
}

/// Every supervisor answering in `runtime_dir`, described (stale sockets are skipped).
pub fn describe_all(runtime_dir: &Path) -> Vec<ControlReply> {
    let Ok(entries) = std::fs::read_dir(runtime_dir) else {
        return Vec::new();
    };
    // Each VM once, by uuid, whichever of its sockets serves: its own, or (a migration
    // destination on this host whose source has gone) the oldest beside it, as `call` picks.
    let uuids: std::collections::BTreeSet<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let stem = name.strip_prefix("vm-")?.strip_suffix(".sock")?;
            Some(stem.split('.').next()?.to_owned())
        })
        .collect();
    let mut all: Vec<ControlReply> = uuids
        .iter()
        .filter_map(|uuid| call(runtime_dir, uuid, &ControlRequest::Describe).ok())
        .collect();
    all.sort_by_key(|r| match r {
        ControlReply::Vm { name, uuid, .. } => (name.clone(), uuid.clone()),
        _ => (String::new(), String::new()),
    });
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_request_travels_in_one_frame_and_a_json_line_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        write_frame(&a, &ControlRequest::MigrateComplete(true), &[]).unwrap();
        assert!(matches!(
            read_request(&b),
            Ok(ControlRequest::MigrateComplete(true))
        ));
        // The old line format reads as an oversized frame: refused before anything is read.
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"\"Inquire\"\n").unwrap();
        assert!(matches!(read_request(&b), Err(Error::Protocol { .. })));
    }

    /// A supervisor at `path` that answers one `Describe` as VM `name`.
    fn describing(path: &Path, name: &str) -> std::thread::JoinHandle<()> {
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        let name = name.to_owned();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let request = read_request(&stream).unwrap();
            assert!(matches!(request, ControlRequest::Describe), "{request:?}");
            let reply = ControlReply::Vm {
                name,
                uuid: String::new(),
                id: 1,
                pid: None,
                state: String::new(),
                since: 0,
            };
            write_frame(&stream, &reply, &[]).unwrap();
        })
    }

    #[test]
    fn every_vm_is_described_once_also_one_served_only_beside_its_own_socket() {
        let dir = tempfile::tempdir().unwrap();
        // A VM on its own socket; one whose migration destination on this host serves beside a
        // socket that is gone (its source exited); and a socket nobody serves.
        let own = describing(&dir.path().join("vm-aaaa.sock"), "own");
        let beside = describing(&dir.path().join("vm-bbbb.4242.sock"), "moved");
        drop(std::os::unix::net::UnixListener::bind(dir.path().join("vm-cccc.sock")).unwrap());
        let names: Vec<String> = describe_all(dir.path())
            .into_iter()
            .map(|r| match r {
                ControlReply::Vm { name, .. } => name,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(names, ["moved", "own"]);
        own.join().unwrap();
        beside.join().unwrap();
    }

    #[test]
    fn a_silent_client_times_out_with_its_io_kind() {
        let (_a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let e = read_one::<ControlRequest>(&b, "request").unwrap_err();
        assert_eq!(e.io_kind(), Some(std::io::ErrorKind::TimedOut));
    }
}
