//! vmlockd's wire protocol.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of JSON; descriptors travel
//! with `SCM_RIGHTS` inside the frame's bytes (on its first byte, and with more than
//! [`fdpass::MAX_FDS`] spread over consecutive pieces of it), so any number of them belong to
//! exactly one frame. A message takes the descriptors that arrived inside its frame only if it
//! expects exactly that many ([`Message::fd_count`]); any others are closed as soon as the frame
//! is read. Frames over [`MAX_FRAME`] are refused before they are read. Every connection starts with [`Request::Hello`], which carries [`PROTOCOL_VERSION`];
//! a daemon answers a version it does not speak with an error and closes.
//!
//! Two kinds of connection exist:
//! - a *request* connection sends requests and reads one reply each;
//! - a *holder* connection ([`Request::Hold`]) belongs to the process that keeps a VM's lock
//!   descriptions (the supervisor). After its hello it only receives [`Push`] frames carrying
//!   descriptors and answers each with [`Request::Ack`]. It is restricted by construction.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use vmlock::{Error, Resource};
use vmlock_sys::fdpass;

/// Version of this protocol; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest frame accepted, either way.
pub const MAX_FRAME: usize = 4 << 20;
/// How long a peer may take to deliver the rest of a frame it started.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(5);

pub use vmlock_core::types::{
    AcquireFlags, HeldLock, HeldResource, LockKey, OwnerStatus, VmIdentity,
};

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
        /// The options of the VM's first acquire (lock-failure action, QMP socket, QEMU bytes),
        /// handed back by a holder re-registering after a daemon restart, so that a daemon that
        /// lost its state files does not fall back to defaults.
        #[serde(default)]
        flags: Option<AcquireFlags>,
        /// Then, once registered, take these at once, all or nothing, with `flags` (the
        /// descriptions come in a second reply, `Kept`, on this connection): a VM's start in
        /// one round trip, for libvirt's pre-exec child. A refusal leaves nothing registered.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        acquire: Option<Vec<Resource>>,
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
        /// The hand-over secret the source's `MigratePrepare` returned.
        #[serde(default)]
        token: Option<String>,
    },
    /// Source of a migration: the state to hand to the destination. The source keeps holding.
    MigratePrepare {
        /// The VM.
        uuid: String,
    },
    /// End a migration of VM `uuid`: on success the destination becomes the owner and every
    /// version grows (the source's old state turns stale); on cancel the destination lets go and
    /// the source keeps everything. A cancel is idempotent, so both sides may call it; so is a
    /// success from a destination (or a client that does not say), while a success from the
    /// source (`source`) is refused unless the migration is in progress (a daemon restart
    /// cancels one).
    MigrateComplete {
        /// The VM.
        uuid: String,
        /// Success or cancel.
        success: bool,
        /// Sent by the migration's source (false for clients from before this field).
        #[serde(default)]
        source: bool,
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
    /// The daemon's metrics in Prometheus' text format (OpenMetrics): a [`Reply::Metrics`].
    Metrics,
    /// The daemon's recent events: one or more [`Reply::Events`] frames, the last of the buffer
    /// marked `end_of_buffer`. With `follow`, the connection then becomes a subscription: the
    /// daemon pushes a [`Reply::Events`] frame as new events happen, and a [`Reply::Error`] before
    /// it closes a subscriber that fell behind. Such a connection takes no other request.
    Events {
        /// Only events after this position (a [`EventPosition`] from an earlier stream, to resume
        /// after a reconnect); all buffered events when `None` or of an earlier boot.
        #[serde(default)]
        after: Option<EventPosition>,
        /// Keep streaming new events.
        #[serde(default)]
        follow: bool,
    },
}

/// Where an event stands in the daemon's history: events are ordered by `(boot, seq)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EventPosition {
    /// The daemon start that recorded it.
    pub boot: u64,
    /// Its number within that start.
    pub seq: u64,
}

/// One event of vmlockd's event stream. In JSON the kind's fields sit beside these, e.g.
/// `{"boot":3,"seq":17,"time_ms":1795000000123,"kind":"acquired","vm":{...},"resources":[...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Which start of the daemon recorded it: 1 for the first in this runtime directory, one
    /// more at each start (kept in `vmlockd.boot`).
    pub boot: u64,
    /// Its number within the boot: 1, 2, ... without gaps.
    pub seq: u64,
    /// When, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

impl Event {
    /// Its position in the stream.
    pub fn position(&self) -> EventPosition {
        EventPosition {
            boot: self.boot,
            seq: self.seq,
        }
    }
}

/// What an [`Event`] reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    /// An acquire took `resources` (labels) for `vm`.
    Acquired {
        /// The VM.
        vm: VmIdentity,
        /// What it took.
        resources: Vec<String>,
    },
    /// An acquire (or a `Hold`) of `vm` was refused.
    Refused {
        /// The VM that asked (its name and pid empty when the daemon does not know it).
        vm: VmIdentity,
        /// The request: `acquire` or `hold`.
        request: String,
        /// The refusal's class, as in the `vmlock_refusals_total` label: `busy`, `owner_exists`,
        /// `permission_denied`, `invalid` or `other`.
        reason: String,
        /// The resource refused, when one was.
        resource: Option<String>,
        /// Who holds it, when named (a VM with its uuid, pid and host, or a foreign process).
        holder: Option<String>,
        /// The whole error.
        error: String,
    },
    /// `vm` released `resources` (its holder asked).
    Released {
        /// The VM.
        vm: VmIdentity,
        /// What it released.
        resources: Vec<String>,
    },
    /// `vm`'s guest exited while it held locks: the daemon unlocked all of them.
    OwnerDied {
        /// The VM.
        vm: VmIdentity,
        /// How many locks went with it.
        locks: usize,
    },
    /// A lease was lost under `vm`'s running guest (lock file removed or replaced, storage gone).
    LeaseLost {
        /// The VM.
        vm: VmIdentity,
        /// The leases lost.
        resources: Vec<String>,
        /// The VM's configured lock-failure action.
        action: String,
    },
    /// The lock-failure action for `vm` was carried out.
    ActionTaken {
        /// The VM.
        vm: VmIdentity,
        /// What was done: `supervisor` (the supervisor acted through its manager), `pause`,
        /// `poweroff`, `ignore`, or `none` (the guest was gone already).
        action: String,
    },
    /// The first daemon in this runtime directory started.
    DaemonStarted {
        /// Its pid.
        pid: u32,
        /// VMs recovered from the state files (always 0 at a first start).
        vms: usize,
        /// Locks recovered from the state files.
        locks: usize,
    },
    /// A daemon started where another ran before (after a crash, a kill or a stop): it recovered
    /// `vms` VMs and `locks` locks from the state files.
    DaemonRestarted {
        /// Its pid.
        pid: u32,
        /// VMs recovered.
        vms: usize,
        /// Locks recovered.
        locks: usize,
    },
}

impl EventKind {
    /// The kind's name, as in JSON.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Acquired { .. } => "acquired",
            EventKind::Refused { .. } => "refused",
            EventKind::Released { .. } => "released",
            EventKind::OwnerDied { .. } => "owner_died",
            EventKind::LeaseLost { .. } => "lease_lost",
            EventKind::ActionTaken { .. } => "action_taken",
            EventKind::DaemonStarted { .. } => "daemon_started",
            EventKind::DaemonRestarted { .. } => "daemon_restarted",
        }
    }
}

/// A frame of the event stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventBatch {
    /// The daemon's boot.
    pub boot: u64,
    /// Events, in order.
    pub events: Vec<Event>,
    /// Events asked for that the buffer no longer holds (they came before its oldest), in the
    /// first frame of a request.
    #[serde(default)]
    pub missed: u64,
    /// The last frame of the buffered events; frames after it (with `follow`) are new events.
    pub end_of_buffer: bool,
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
    /// A migration prepared: what is held, and the hand-over secret the destination must present.
    Prepared {
        /// What is held, with versions.
        held: Vec<HeldResource>,
        /// The secret.
        token: String,
    },
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
    /// The metrics, in Prometheus' text format (OpenMetrics 1.0).
    Metrics(String),
    /// Events (see [`Request::Events`]).
    Events(EventBatch),
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

/// Writes one frame with `fds` attached (any number of them).
pub fn write_frame<T: Serialize>(
    stream: &UnixStream,
    msg: &T,
    fds: &[&OwnedFd],
) -> Result<(), Error> {
    send_frame(stream, msg, fds).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidInput => protocol(e.to_string()),
        _ => Error::io("sending to the lock daemon socket", &e),
    })
}

/// [`write_frame`] keeping the [`std::io::ErrorKind`] (a message that cannot be encoded or is too
/// large is `InvalidInput`), for callers that act on it.
pub fn send_frame<T: Serialize>(
    stream: &UnixStream,
    msg: &T,
    fds: &[&OwnedFd],
) -> std::io::Result<()> {
    let invalid = |reason: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, reason);
    let body = serde_json::to_vec(msg).map_err(|e| invalid(format!("encoding: {e}")))?;
    if body.len() > MAX_FRAME {
        return Err(invalid(format!(
            "message of {} bytes exceeds {MAX_FRAME}",
            body.len()
        )));
    }
    let mut data = Vec::with_capacity(4 + body.len());
    data.extend_from_slice(&(body.len() as u32).to_be_bytes());
    data.extend_from_slice(&body);
    let raw: Vec<_> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    fdpass::send_with_fds(stream, &data, &raw)
}

/// What reading a frame can end in.
#[derive(Debug)]
pub enum ReadError {
    /// The peer closed the connection between frames.
    Closed,
    /// Nothing arrived within the socket's receive timeout (set by the caller) between frames.
    Idle,
    /// Malformed, oversized, timed out or failed.
    Failed(Error),
}

/// A message that may carry descriptors: how many travel with it.
pub trait Message: for<'de> Deserialize<'de> {
    /// The number of descriptors attached to this message's frame.
    fn fd_count(&self) -> usize {
        0
    }
}

impl Message for Request {
    fn fd_count(&self) -> usize {
        match self {
            Request::Hold { adopt, .. } => adopt.len(),
            _ => 0,
        }
    }
}

impl Message for Reply {
    fn fd_count(&self) -> usize {
        match self {
            Reply::Kept { locks, .. } => locks.len(),
            _ => 0,
        }
    }
}

impl Message for Push {
    fn fd_count(&self) -> usize {
        match self {
            Push::Keep { locks, .. } => locks.len(),
            _ => 0,
        }
    }
}

/// Reads frames from one connection. It reads as much as the socket has, so a frame that
/// arrived whole costs one system call, and keeps what belongs to the next frame. Each batch of
/// descriptors is tagged with the stream position of the last byte read with it (the kernel ends a
/// `recvmsg` right after data carrying descriptors), so it belongs to the frame holding that byte.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    head: usize,
    tail: usize,
    /// Stream position of `buf[0]`.
    base: u64,
    /// Descriptors not yet given to a frame, with the stream position they arrived at.
    fds: VecDeque<(u64, OwnedFd)>,
}

/// Bytes of a frame per descriptor it may carry beyond [`fdpass::MAX_FDS`]: every descriptor
/// comes with a lock's description, longer than this, so a peer cannot pile up descriptors in a
/// small frame.
const BYTES_PER_FD: usize = 32;

impl Default for FrameReader {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameReader {
    /// An empty reader.
    pub fn new() -> Self {
        FrameReader {
            buf: vec![0; 8192],
            head: 0,
            tail: 0,
            base: 0,
            fds: VecDeque::new(),
        }
    }

    /// Whether bytes already read wait here (a frame, or the start of one): a caller that polls
    /// the socket must read them first, since they no longer wake `poll`.
    pub fn buffered(&self) -> bool {
        self.head != self.tail
    }

    /// Reads one frame and the descriptors that came with it. Waits for the first byte as long
    /// as the socket's own receive timeout says (ending in [`ReadError::Idle`]); the rest of the
    /// frame must follow within [`FRAME_TIMEOUT`]. Descriptors that came inside the frame go
    /// with the message if it expects exactly that many, are closed at once if it expects none,
    /// and fail the read otherwise.
    pub fn read<T: Message>(
        &mut self,
        stream: &UnixStream,
    ) -> Result<(T, Vec<OwnedFd>), ReadError> {
        if self.head == self.tail {
            self.base += self.head as u64;
            self.head = 0;
            self.tail = 0;
            let n = self.recv(stream, false).map_err(|e| {
                if is_timeout(&e) {
                    ReadError::Idle
                } else {
                    ReadError::Failed(Error::io("reading from the lock daemon socket", &e))
                }
            })?;
            if n == 0 {
                return Err(ReadError::Closed);
            }
        }
        let deadline = Instant::now() + FRAME_TIMEOUT;
        self.fill(stream, 4, fdpass::MAX_FDS, deadline)?;
        let mut header = [0u8; 4];
        header.copy_from_slice(&self.buf[self.head..self.head + 4]);
        let len = u32::from_be_bytes(header) as usize;
        if len > MAX_FRAME {
            return Err(ReadError::Failed(protocol(format!(
                "frame of {len} bytes exceeds the maximum of {MAX_FRAME}"
            ))));
        }
        self.fill(
            stream,
            4 + len,
            fdpass::MAX_FDS + len / BYTES_PER_FD,
            deadline,
        )?;
        let end = self.base + (self.head + 4 + len) as u64;
        let mut fds = Vec::new();
        while self.fds.front().is_some_and(|(at, _)| *at < end) {
            if let Some((_, fd)) = self.fds.pop_front() {
                fds.push(fd);
            }
        }
        let body = &self.buf[self.head + 4..self.head + 4 + len];
        let parsed = serde_json::from_slice::<T>(body);
        self.head += 4 + len;
        let msg =
            parsed.map_err(|e| ReadError::Failed(protocol(format!("malformed message: {e}"))))?;
        match msg.fd_count() {
            n if n == fds.len() => Ok((msg, fds)),
            // Descriptors nobody asked for would stay open in this process: close them now.
            0 => Ok((msg, Vec::new())),
            n => Err(ReadError::Failed(protocol(format!(
                "the message expects {n} descriptors but {} came with it",
                fds.len()
            )))),
        }
    }

    fn recv(&mut self, stream: &UnixStream, dont_wait: bool) -> std::io::Result<usize> {
        let mut fds = Vec::new();
        let n = fdpass::recv_with_fds(stream, &mut self.buf[self.tail..], &mut fds, dont_wait)?;
        self.tail += n;
        if n > 0 {
            let at = self.base + self.tail as u64 - 1;
            self.fds.extend(fds.into_iter().map(|fd| (at, fd)));
        }
        Ok(n)
    }

    /// Buffers at least `need` bytes of the current frame, waiting at most until `deadline`, with
    /// at most `max_fds` descriptors (plus one message's worth that may start the next frame).
    fn fill(
        &mut self,
        stream: &UnixStream,
        need: usize,
        max_fds: usize,
        deadline: Instant,
    ) -> Result<(), ReadError> {
        loop {
            if self.fds.len() > max_fds + fdpass::MAX_FDS {
                return Err(ReadError::Failed(protocol(format!(
                    "more than {max_fds} descriptors sent with one frame"
                ))));
            }
            if self.tail - self.head >= need {
                return Ok(());
            }
            if self.buf.len() - self.head < need || self.tail == self.buf.len() {
                self.buf.copy_within(self.head..self.tail, 0);
                self.base += self.head as u64;
                self.tail -= self.head;
                self.head = 0;
                if self.buf.len() < need {
                    self.buf.resize(need, 0);
                }
            }
            match self.recv(stream, true) {
                Ok(0) => {
                    return Err(ReadError::Failed(protocol(
                        "connection closed inside a frame".into(),
                    )))
                }
                Ok(_) => {}
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
    }
}

/// Reads one frame with a reader of its own (for one-off exchanges and tests; a connection that
/// reads several frames keeps one [`FrameReader`]).
pub fn read_frame<T: Message>(stream: &UnixStream) -> Result<(T, Vec<OwnedFd>), ReadError> {
    FrameReader::new().read(stream)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn frames_sent_back_to_back_are_read_one_by_one_with_their_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        let fd = OwnedFd::from(file);
        let key = LockKey {
            dev: 1,
            ino: 2,
            byte: 0,
        };
        let lock = HeldLock {
            resource: Resource::disk("/d", vmlock::DiskMode::Exclusive).unwrap(),
            key,
        };
        write_frame(
            &a,
            &Push::Keep {
                seq: 1,
                locks: vec![lock.clone()],
            },
            &[&fd],
        )
        .unwrap();
        write_frame(
            &a,
            &Push::Close {
                seq: 2,
                keys: vec![key],
            },
            &[],
        )
        .unwrap();
        write_frame(&a, &Push::Finished, &[]).unwrap();
        let mut reader = FrameReader::new();
        let (first, fds) = reader.read::<Push>(&b).unwrap();
        assert_eq!(
            first,
            Push::Keep {
                seq: 1,
                locks: vec![lock]
            }
        );
        assert_eq!(fds.len(), 1);
        assert_eq!(
            reader.read::<Push>(&b).unwrap().0,
            Push::Close {
                seq: 2,
                keys: vec![key]
            }
        );
        assert_eq!(reader.read::<Push>(&b).unwrap().0, Push::Finished);
        drop(a);
        assert!(matches!(reader.read::<Push>(&b), Err(ReadError::Closed)));
    }

    #[test]
    fn each_frame_gets_exactly_its_own_descriptors_however_many() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = OwnedFd::from(tempfile::tempfile().unwrap());
        let fds: Vec<OwnedFd> = (0..600).map(|_| file.try_clone().unwrap()).collect();
        let lock = |ino| HeldLock {
            resource: Resource::disk("/d", vmlock::DiskMode::Exclusive).unwrap(),
            key: LockKey {
                dev: 1,
                ino,
                byte: 0,
            },
        };
        let keep = Push::Keep {
            seq: 1,
            locks: (0..600).map(lock).collect(),
        };
        let writer = std::thread::spawn(move || {
            let refs: Vec<&OwnedFd> = fds.iter().collect();
            // Unexpected descriptors, then 600 in one frame, then a mismatch.
            write_frame(&a, &Push::Finished, &refs[..3]).unwrap();
            write_frame(&a, &keep, &refs).unwrap();
            write_frame(&a, &Push::Finished, &[]).unwrap();
            let short = Push::Keep {
                seq: 2,
                locks: vec![lock(1), lock(2)],
            };
            write_frame(&a, &short, &refs[..1]).unwrap();
        });
        let mut reader = FrameReader::new();
        let (first, none) = reader.read::<Push>(&b).unwrap();
        assert_eq!((first, none.len()), (Push::Finished, 0));
        let (_, many) = reader.read::<Push>(&b).unwrap();
        assert_eq!(many.len(), 600);
        assert_eq!(reader.read::<Push>(&b).unwrap().1.len(), 0);
        assert!(matches!(reader.read::<Push>(&b), Err(ReadError::Failed(_))));
        writer.join().unwrap();
    }

    #[test]
    fn a_frame_larger_than_the_buffer_is_read_whole() {
        let (a, b) = UnixStream::pair().unwrap();
        let big = Request::Inquire {
            uuid: "x".repeat(100_000),
        };
        let writer = std::thread::spawn(move || write_frame(&a, &big, &[]).map(|()| a));
        let (got, _) = FrameReader::new().read::<Request>(&b).unwrap();
        assert!(matches!(got, Request::Inquire { uuid } if uuid.len() == 100_000));
        let mut a = writer.join().unwrap().unwrap();
        a.write_all(&[0, 0]).unwrap();
        drop(a);
        assert!(matches!(
            FrameReader::new().read::<Request>(&b),
            Err(ReadError::Failed(_))
        ));
    }
}
