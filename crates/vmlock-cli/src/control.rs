//! The supervisor's control socket: how later `vmlock` commands reach a running VM whose leases
//! belong to its supervisor process (drivers such as sanlock tie leases to the process that
//! acquired them, so only the supervisor can hotplug, inquire or migrate them).
//!
//! `RUNTIME_DIR/vm-UUID.sock`, 0600 in the 0700 runtime directory, and only root or the
//! supervisor's own uid is served (`SO_PEERCRED`). One request and one reply per connection, in
//! vmlockd's frames ([`vmlock_client::proto`]: length-prefixed JSON, the same size limit and the
//! same bound on a started frame), so there is one framing for both sockets.

use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmlock::{Error, LockFailureAction, LockState, Manager, MigrationOutcome, Resource};
use vmlock_client::proto::{write_frame, FrameReader, Message, ReadError};

/// How long a supervisor waits for a client's request to start.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client waits for a supervisor's reply (an attach may wait on the lock service).
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// A request to a supervisor.
#[derive(Debug, Serialize, Deserialize)]
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
    /// The lock service lost this VM's leases (sanlock's kill path runs `vmlock lock-failure`):
    /// carry out the VM's action and release the leases.
    LockFailure,
}

/// Carries no descriptors.
impl Message for ControlRequest {}

/// A supervisor's answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum ControlReply {
    /// Done.
    Ok,
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
}

/// Carries no descriptors.
impl Message for ControlReply {}

/// The control socket of VM `uuid` in `runtime_dir`.
pub fn socket_path(runtime_dir: &Path, uuid: &str) -> PathBuf {
    runtime_dir.join(format!("vm-{uuid}.sock"))
}

/// What the supervisor does when its leases are lost.
#[derive(Debug, Clone)]
pub struct LockFailurePolicy {
    /// The VM's action.
    pub action: LockFailureAction,
    /// The guest's QMP socket, for `pause`.
    pub qmp: Option<PathBuf>,
    /// The guest process.
    pub guest_pid: u32,
}

impl LockFailurePolicy {
    /// Stops the guest writing (pause over QMP, or SIGTERM then SIGKILL), then releases every
    /// lease: the lock service must see them gone before it escalates.
    fn enforce(&self, manager: &mut Manager) -> vmlock::Result<()> {
        if self.action == LockFailureAction::Ignore {
            // Releasing under a guest that keeps running would let another VM write beside it.
            return Ok(());
        }
        let paused = self.action == LockFailureAction::Pause
            && self.qmp.as_deref().is_some_and(|q| {
                vmlock_client::qmp::Qmp::connect(q)
                    .and_then(|mut c| c.execute("stop", serde_json::json!({})))
                    .is_ok()
            });
        if !paused {
            // QEMU's `stop` drains and flushes its I/O; a guest we cannot pause must be dead
            // before its leases go.
            if let Ok(h) = vmlock_sys::pidfd::ProcessHandle::open(self.guest_pid, None) {
                let _ = h.signal(rustix::process::Signal::TERM);
                if !h.wait_exit(Some(Duration::from_secs(10))) {
                    let _ = h.signal(rustix::process::Signal::KILL);
                    h.wait_exit(None);
                }
            }
        }
        match manager.release() {
            Ok(_) => Ok(()),
            // Called again (sanlock repeats its kill path): nothing is held any more.
            Err(Error::InvalidState { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Serves `manager` on `path` from a thread of its own; the socket file is removed on drop.
pub struct ControlServer {
    path: PathBuf,
    /// The inode bound, so dropping removes the socket only while it is still ours.
    ino: u64,
}

impl ControlServer {
    /// Binds and starts serving.
    pub fn start(
        path: PathBuf,
        manager: Arc<Mutex<Manager>>,
        policy: LockFailurePolicy,
    ) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // A migration destination on this host runs beside its source under the same uuid: it
        // must not take the source's socket, so it serves beside it until the source is gone.
        let path = if UnixStream::connect(&path).is_ok() {
            path.with_extension(format!("{}.sock", std::process::id()))
        } else {
            let _ = std::fs::remove_file(&path);
            path
        };
        let listener = UnixListener::bind(&path)?;
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path)?);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let uid = nix::unistd::geteuid().as_raw();
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        std::thread::Builder::new()
            .name("vm-control".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let manager = Arc::clone(&manager);
                    let policy = policy.clone();
                    let _ = std::thread::Builder::new()
                        .name("vm-control-client".into())
                        .spawn(move || serve(stream, &manager, &policy, uid, since));
                }
            })?;
        Ok(ControlServer { path, ino })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let ours = std::fs::metadata(&self.path)
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == self.ino);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn serve(
    stream: UnixStream,
    manager: &Mutex<Manager>,
    policy: &LockFailurePolicy,
    uid: u32,
    since: u64,
) {
    let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials);
    let reply = match peer {
        Ok(p) if p.uid() == 0 || p.uid() == uid => match read_request(&stream) {
            Ok(request) => {
                let mut manager = manager.lock().unwrap_or_else(|p| p.into_inner());
                answer(&mut manager, policy, request, since)
            }
            Err(e) => ControlReply::Error(e),
        },
        Ok(p) => ControlReply::Error(Error::PermissionDenied {
            reason: format!("uid {} may not control this VM", p.uid()),
        }),
        Err(e) => ControlReply::Error(Error::PermissionDenied {
            reason: format!("peer credentials: {e}"),
        }),
    };
    let _ = write_frame(&stream, &reply, &[]);
}

fn answer(
    manager: &mut Manager,
    policy: &LockFailurePolicy,
    request: ControlRequest,
    since: u64,
) -> ControlReply {
    let result = match request {
        ControlRequest::LockFailure => {
            eprintln!(
                "vmlock: the leases of VM \"{}\" were lost: {}",
                manager.vm().name,
                policy.action
            );
            policy.enforce(manager).map(|()| ControlReply::Ok)
        }
        ControlRequest::Inquire => manager
            .inquire()
            .map(|s| ControlReply::State(s.to_string())),
        ControlRequest::GuestPid => manager.guest_pid().map(ControlReply::Pid),
        ControlRequest::Describe => manager.inquire().and_then(|state| {
            Ok(ControlReply::Vm {
                name: manager.vm().name.clone(),
                uuid: manager.vm().uuid.to_string(),
                id: manager.vm().id,
                pid: manager.guest_pid()?,
                state: state.to_string(),
                since,
            })
        }),
        ControlRequest::AttachDisk(disk) => {
            vmlock::domain::disk_attach(manager, disk).map(|()| ControlReply::Ok)
        }
        ControlRequest::DetachDisk(disk) => {
            vmlock::domain::disk_detach(manager, &disk).map(|_| ControlReply::Ok)
        }
        ControlRequest::MigratePrepare(uri) => manager
            .prepare_migration(&uri)
            .map(|s| ControlReply::State(s.to_string())),
        ControlRequest::MigrateComplete(success) => {
            let outcome = if success {
                MigrationOutcome::Success
            } else {
                MigrationOutcome::Cancel
            };
            manager
                .complete_migration(outcome)
                .map(|()| ControlReply::Ok)
        }
    };
    result.unwrap_or_else(ControlReply::Error)
}

fn read_request(stream: &UnixStream) -> Result<ControlRequest, Error> {
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .map_err(|e| Error::io("control socket", &e))?;
    read_one(stream, "request")
}

/// Reads the one frame of a connection.
fn read_one<T: Message>(stream: &UnixStream, what: &str) -> Result<T, Error> {
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

/// The supervisor of VM `uuid`: its own socket, else one that serves beside it (a migration
/// destination on this host whose source has gone).
fn connect(runtime_dir: &Path, uuid: &str) -> Result<UnixStream, Error> {
    let path = socket_path(runtime_dir, uuid);
    let first = match UnixStream::connect(&path) {
        Ok(s) => return Ok(s),
        Err(e) => e,
    };
    let prefix = format!("vm-{uuid}.");
    let beside = std::fs::read_dir(runtime_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name().to_str().is_some_and(|n| {
                n.starts_with(&prefix) && n.ends_with(".sock") && n != format!("vm-{uuid}.sock")
            })
        });
    for entry in beside {
        if let Ok(s) = UnixStream::connect(entry.path()) {
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

/// Sends `request` to the supervisor of VM `uuid`.
pub fn call(
    runtime_dir: &Path,
    uuid: &str,
    request: &ControlRequest,
) -> Result<ControlReply, Error> {
    let stream = connect(runtime_dir, uuid)?;
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(|e| Error::io("control socket", &e))?;
    write_frame(&stream, request, &[])?;
    match read_one(&stream, "reply")? {
        ControlReply::Error(e) => Err(e),
        reply => Ok(reply),
    }
}

/// The state in a reply.
pub fn state(reply: ControlReply) -> Result<LockState, Error> {
    match reply {
        ControlReply::State(s) => s.parse(),
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
    let mut all: Vec<ControlReply> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let stem = name.strip_prefix("vm-")?.strip_suffix(".sock")?;
            // Only each VM's own socket: one beside it belongs to the same VM.
            if stem.contains('.') {
                return None;
            }
            let uuid = stem.to_owned();
            call(runtime_dir, &uuid, &ControlRequest::Describe).ok()
        })
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

    #[test]
    fn a_silent_client_times_out_with_its_io_kind() {
        let (_a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let e = read_one::<ControlRequest>(&b, "request").unwrap_err();
        assert_eq!(e.io_kind(), Some(std::io::ErrorKind::TimedOut));
    }
}
