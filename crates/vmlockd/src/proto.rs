//! vmlockd's wire protocol.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of JSON; descriptors travel
//! with `SCM_RIGHTS` on the frame's first bytes. Frames over [`MAX_FRAME`] are refused before they
//! are read. Every connection starts with [`Request::Hello`], which carries [`PROTOCOL_VERSION`];
//! a daemon answers a version it does not speak with an error and closes.
//!
//! Two kinds of connection exist:
//! - a *request* connection sends requests and reads one reply each;
//! - a *holder* connection ([`Request::Hold`]) belongs to the process that keeps a VM's lock
//!   descriptions (the supervisor). After its hello it only receives [`Push`] frames carrying
//!   descriptors and answers each with [`Request::Ack`]. It is restricted by construction.

use crate::sys::fdpass;
use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant, SystemTime};
use vmlock::{Error, LockFailureAction, Resource};

/// Version of this protocol; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest frame accepted, either way.
pub const MAX_FRAME: usize = 4 << 20;
/// How long a peer may take to deliver the rest of a frame it started.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(5);

/// A VM as the daemon knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmIdentity {
    /// uuid, canonical text.
    pub uuid: String,
    /// name.
    pub name: String,
    /// domain id.
    pub id: u32,
    /// guest pid.
    pub pid: u32,
}

/// One held resource as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldResource {
    /// What is held.
    pub resource: Resource,
    /// Lock version (grows when another owner takes it).
    pub version: u64,
    /// When it was granted.
    pub since: SystemTime,
    /// False while the daemon waits for the holder to hand the description back after a restart.
    pub confirmed: bool,
    /// The lease was lost under the running guest (its lock file removed or replaced, or its
    /// storage gone); the VM's lock-failure action was taken.
    #[serde(default)]
    pub lost: bool,
}

/// One VM in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerStatus {
    /// Who.
    pub vm: VmIdentity,
    /// Pid of the process keeping its lock descriptions, when connected.
    pub holder_pid: Option<u32>,
    /// What it holds.
    pub resources: Vec<HeldResource>,
}

/// A descriptor handed to or from a holder, and what it locks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLock {
    /// The resource.
    pub resource: Resource,
    /// `(device, inode, byte)` of the lock.
    pub key: LockKey,
}

/// Identifies one lock: a byte of one inode. Two paths to one file give one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LockKey {
    /// `st_dev` of the locked file.
    pub dev: u64,
    /// `st_ino` of the locked file.
    pub ino: u64,
    /// The byte locked.
    pub byte: u64,
}

/// Options of an acquire.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcquireFlags {
    /// Register only, take nothing.
    pub register_only: bool,
    /// Restrict this connection afterwards.
    pub restrict: bool,
    /// What to do to the guest when a lease is lost.
    pub on_lock_failure: LockFailureAction,
    /// Also hold QEMU's "writer" lock bytes on exclusive disks, so that a QEMU or qemu-img started
    /// outside vmlock refuses to open them (for guests that are not QEMU).
    #[serde(default)]
    pub hold_qemu_bytes: bool,
    /// The guest's QMP socket, for the `pause` action.
    #[serde(default)]
    pub qmp_socket: Option<std::path::PathBuf>,
    /// The requester is the VM's holder process: hand the new descriptions back in the reply
    /// ([`Reply::Kept`]) instead of pushing them over the holder connection and waiting for its
    /// ack. Ignored for any other requester.
    #[serde(default)]
    pub reply_with_fds: bool,
}

/// Client to daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// First frame of every connection.
    Hello {
        /// The client's protocol version.
        version: u32,
    },
    /// This connection keeps `vm`'s lock descriptions. With `adopt`, it hands back descriptions it
    /// kept across a daemon restart (one descriptor per entry, in order).
    Hold {
        /// The VM.
        vm: VmIdentity,
        /// Descriptions kept from before.
        adopt: Vec<HeldLock>,
        /// This holder is the destination of a migration of `vm` prepared on the source.
        #[serde(default)]
        incoming: bool,
    },
    /// Takes `resources` for VM `uuid`, all or nothing.
    Acquire {
        /// The VM.
        uuid: String,
        /// What to take.
        resources: Vec<Resource>,
        /// Options.
        flags: AcquireFlags,
    },
    /// Destination of a migration: take over `resources` from the source of VM `uuid`, as of
    /// `versions` (the state the source handed out). Refused if any version is not current.
    AcquireIncoming {
        /// The VM.
        uuid: String,
        /// What to take over, with the version the source's state gave each.
        versions: Vec<(Resource, u64)>,
    },
    /// Source of a migration: the state to hand to the destination. The source keeps holding.
    MigratePrepare {
        /// The VM.
        uuid: String,
    },
    /// End a migration of VM `uuid`: on success the destination becomes the owner and every
    /// version grows (the source's old state turns stale); on cancel the destination lets go and
    /// the source keeps everything. Idempotent, so both sides may call it.
    MigrateComplete {
        /// The VM.
        uuid: String,
        /// Success or cancel.
        success: bool,
    },
    /// The guest `guest_pid` is gone: release everything VM `uuid` holds, unless the VM's locks
    /// now belong to another guest (it migrated away), in which case nothing happens.
    Shutdown {
        /// The VM.
        uuid: String,
        /// The guest that ended.
        guest_pid: u32,
    },
    /// Releases `resources` (all the VM holds when `None`).
    Release {
        /// The VM.
        uuid: String,
        /// What to release.
        resources: Option<Vec<Resource>>,
    },
    /// Releases `resources` for a requester that is the VM's holder process and drops its own
    /// copies of the descriptions itself (no `Close` push). From any other process this is a
    /// plain [`Request::Release`].
    ReleaseKept {
        /// The VM.
        uuid: String,
        /// What to release.
        resources: Vec<Resource>,
    },
    /// What VM `uuid` holds.
    Inquire {
        /// The VM.
        uuid: String,
    },
    /// The VM's identity, guest pid included (the seed's GetChild).
    Lookup {
        /// The VM.
        uuid: String,
    },
    /// The holder (a supervisor) started the guest `pid`, its own child: the VM's locks follow
    /// that process from now on.
    GuestStarted {
        /// The VM.
        uuid: String,
        /// The guest process.
        pid: u32,
    },
    /// Every held lock.
    Status,
    /// Restrict this connection: from now on it can do nothing.
    Restrict,
    /// A holder's answer to a push.
    Ack {
        /// The push's sequence number.
        seq: u64,
    },
}

/// Daemon to client, one per request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Answer to hello.
    Hello {
        /// The daemon's protocol version.
        version: u32,
        /// The daemon's pid.
        pid: u32,
        /// Its host name.
        host: String,
    },
    /// Done.
    Ok,
    /// What is held, with versions.
    Held(Vec<HeldResource>),
    /// Granted, with one descriptor per entry of `locks` attached: the holder keeps them.
    Kept {
        /// What was granted.
        held: Vec<HeldResource>,
        /// What each attached descriptor locks.
        locks: Vec<HeldLock>,
    },
    /// A VM.
    Vm(VmIdentity),
    /// Everything.
    Status(Vec<OwnerStatus>),
    /// Failed; nothing changed unless the error says otherwise (partial release).
    Error(Error),
}

/// Daemon to holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Push {
    /// Keep these descriptions (one descriptor each, in order); answer with an ack.
    Keep {
        /// Sequence number for the ack.
        seq: u64,
        /// What they lock.
        locks: Vec<HeldLock>,
    },
    /// Close the descriptions of these keys (already unlocked by the daemon).
    Close {
        /// Sequence number for the ack.
        seq: u64,
        /// Which.
        keys: Vec<LockKey>,
    },
    /// The VM holds nothing any more (released or dead): close everything and go.
    Finished,
}

/// Writes one frame with `fds` attached.
pub fn write_frame<T: Serialize>(
    stream: &UnixStream,
    msg: &T,
    fds: &[&OwnedFd],
) -> Result<(), Error> {
    let body = serde_json::to_vec(msg).map_err(|e| protocol(format!("encoding: {e}")))?;
    if body.len() > MAX_FRAME {
        return Err(protocol(format!(
            "message of {} bytes exceeds {MAX_FRAME}",
            body.len()
        )));
    }
    if fds.len() > fdpass::MAX_FDS {
        return Err(protocol(format!(
            "{} descriptors exceed {} per message",
            fds.len(),
            fdpass::MAX_FDS
        )));
    }
    let mut data = Vec::with_capacity(4 + body.len());
    data.extend_from_slice(&(body.len() as u32).to_be_bytes());
    data.extend_from_slice(&body);
    let raw: Vec<_> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    fdpass::send_with_fds(stream, &data, &raw)
        .map_err(|e| Error::io("sending to the lock daemon socket", &e))
}

/// What reading a frame can end in.
#[derive(Debug)]
pub enum ReadError {
    /// The peer closed the connection between frames.
    Closed,
    /// Malformed, oversized, timed out or failed.
    Failed(Error),
}

/// Reads one frame and the descriptors that came with it. Waits indefinitely for the first
/// byte; the rest must arrive within [`FRAME_TIMEOUT`].
pub fn read_frame<T: for<'de> Deserialize<'de>>(
    stream: &UnixStream,
) -> Result<(T, Vec<OwnedFd>), ReadError> {
    let mut fds = Vec::new();
    let mut header = [0u8; 4];
    // The first byte waits as long as the socket's own receive timeout says (none on the daemon,
    // the reply timeout on clients); the rest of the frame must follow within FRAME_TIMEOUT.
    let n = fdpass::recv_with_fds(stream, &mut header, &mut fds, false).map_err(|e| {
        ReadError::Failed(if is_timeout(&e) {
            Error::ServiceUnavailable {
                reason: "no answer from the lock daemon in time".into(),
            }
        } else {
            Error::io("reading from the lock daemon socket", &e)
        })
    })?;
    if n == 0 {
        return Err(ReadError::Closed);
    }
    let deadline = Instant::now() + FRAME_TIMEOUT;
    read_rest(stream, &mut header[n..], &mut fds, deadline)?;
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(ReadError::Failed(protocol(format!(
            "frame of {len} bytes exceeds the maximum of {MAX_FRAME}"
        ))));
    }
    let mut body = vec![0u8; len];
    read_rest(stream, &mut body, &mut fds, deadline)?;
    let msg = serde_json::from_slice(&body)
        .map_err(|e| ReadError::Failed(protocol(format!("malformed message: {e}"))))?;
    Ok((msg, fds))
}

/// Fills `buf` from a frame already started, waiting at most until `deadline`. Reads without
/// blocking first, so a frame that arrived whole costs no extra system call.
fn read_rest(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    deadline: Instant,
) -> Result<(), ReadError> {
    let mut got = 0;
    while got < buf.len() {
        match fdpass::recv_with_fds(stream, &mut buf[got..], fds, true) {
            Ok(0) => {
                return Err(ReadError::Failed(protocol(
                    "connection closed inside a frame".into(),
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                let timeout = rustix::time::Timespec {
                    tv_sec: left.as_secs() as i64,
                    tv_nsec: i64::from(left.subsec_nanos()),
                };
                let mut pfd = [rustix::event::PollFd::new(
                    stream,
                    rustix::event::PollFlags::IN,
                )];
                match rustix::event::poll(&mut pfd, Some(&timeout)) {
                    Ok(0) => {
                        return Err(ReadError::Failed(protocol(format!(
                            "frame not completed within {FRAME_TIMEOUT:?}"
                        ))))
                    }
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => {
                        return Err(ReadError::Failed(Error::io(
                            "waiting on the socket",
                            &e.into(),
                        )))
                    }
                }
            }
            Err(e) => {
                return Err(ReadError::Failed(Error::io(
                    "reading from the lock daemon socket",
                    &e,
                )))
            }
        }
    }
    Ok(())
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

fn protocol(reason: String) -> Error {
    Error::Protocol { reason }
}
