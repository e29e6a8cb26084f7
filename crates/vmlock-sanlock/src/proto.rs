//! A pure-Rust client of the sanlock daemon's UNIX-socket protocol (the protocol that the LGPL
//! `libsanlock_client` speaks), limited to what a lock manager needs.
//!
//! Layouts and numbers are those of sanlock 3.8.5's `sanlock_sock.h`, `sanlock.h`,
//! `sanlock_resource.h` and `sanlock_admin.h` on 64-bit Linux (native byte order). Every request
//! is one header plus fixed-size structs; every struct is zeroed before its fields are written.
//!
//! Nothing here touches a lease area: formatting, alignment and every lease I/O are asked of the
//! daemon (`ALIGN`, `WRITE_LOCKSPACE`, `WRITE_RESOURCE`).

use std::fmt;
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `SM_MAGIC`.
pub const SM_MAGIC: u32 = 0x0428_2010;
/// `SM_PROTO` (major 0, minor 1).
pub const SM_PROTO: u32 = 0x0000_0001;

/// Command numbers (valid since sanlock 2.7).
#[allow(missing_docs)]
pub mod cmd {
    pub const REGISTER: u32 = 1;
    pub const ADD_LOCKSPACE: u32 = 2;
    pub const REM_LOCKSPACE: u32 = 3;
    pub const ACQUIRE: u32 = 7;
    pub const RELEASE: u32 = 8;
    pub const INQUIRE: u32 = 9;
    pub const RESTRICT: u32 = 10;
    pub const ALIGN: u32 = 12;
    pub const INQ_LOCKSPACE: u32 = 16;
    pub const GET_HOSTS: u32 = 23;
    pub const KILLPATH: u32 = 17;
    pub const WRITE_LOCKSPACE: u32 = 18;
    pub const WRITE_RESOURCE: u32 = 19;
    pub const READ_RESOURCE: u32 = 21;
    pub const CONVERT: u32 = 27;
    pub const VERSION: u32 = 28;
}

/// Flags, by the struct or call they belong to.
#[allow(missing_docs)]
pub mod flags {
    pub const ACQUIRE_OWNER_NOWAIT: u32 = 0x8;
    /// `SANLK_CONVERT_OWNER_NOWAIT`: the same value and meaning as `ACQUIRE_OWNER_NOWAIT`.
    pub const CONVERT_OWNER_NOWAIT: u32 = 0x8;
    pub const RES_LVER: u32 = 0x1;
    pub const RES_SHARED: u32 = 0x4;
    pub const ALIGN1M: u32 = 0x10;
    pub const ALIGN2M: u32 = 0x20;
    pub const ALIGN4M: u32 = 0x40;
    pub const ALIGN8M: u32 = 0x80;
    pub const SECTOR512: u32 = 0x100;
    pub const SECTOR4K: u32 = 0x200;
    pub const INQ_WAIT: u32 = 0x1;
    pub const REM_UNUSED: u32 = 0x2;
    pub const RESTRICT_SIGKILL: u32 = 0x2;
    pub const RESTRICT_SIGTERM: u32 = 0x4;
}

/// Return codes the driver tells apart (negative errno or `SANLK_*`).
#[allow(missing_docs)]
pub mod rv {
    pub const EPERM: i32 = -1;
    pub const ENOENT: i32 = -2;
    pub const ESRCH: i32 = -3;
    pub const EAGAIN: i32 = -11;
    pub const EBUSY: i32 = -16;
    pub const EEXIST: i32 = -17;
    pub const ENODEV: i32 = -19;
    pub const EINVAL: i32 = -22;
    pub const ENOSPC: i32 = -28;
    pub const EALREADY: i32 = -114;
    pub const EINPROGRESS: i32 = -115;
    pub const LEADER_MAGIC: i32 = -223;
    pub const LEADER_SECTORSIZE: i32 = -225;
    pub const LEADER_LOCKSPACE: i32 = -226;
    pub const LEADER_RESOURCE: i32 = -227;
    pub const ACQUIRE_LVER: i32 = -240;
    pub const ACQUIRE_LOCKSPACE: i32 = -241;
    pub const ACQUIRE_IDDISK: i32 = -242;
    pub const ACQUIRE_IDLIVE: i32 = -243;
    pub const ACQUIRE_OWNED: i32 = -244;
    pub const ACQUIRE_OTHER: i32 = -245;
    pub const ACQUIRE_SHRETRY: i32 = -246;
    pub const ACQUIRE_OWNED_RETRY: i32 = -247;
    pub const HOSTID_BUSY: i32 = -262;
}

/// The symbolic name and meaning of a sanlock return code.
pub fn describe_rv(code: i32) -> String {
    let text = match code {
        -1 => "EPERM/failed (e.g. lease not held by this client)",
        rv::ENOENT => "ENOENT (lockspace not found)",
        rv::ESRCH => "ESRCH (process not registered)",
        -7 => "E2BIG (too many leases in one call)",
        rv::EAGAIN => "EAGAIN (lease being released, or held shared by others)",
        rv::EBUSY => "EBUSY (lease or client busy)",
        rv::EEXIST => "EEXIST (already held on this host)",
        rv::ENODEV => "ENODEV (cannot open the lease file with O_DIRECT)",
        rv::EINVAL => "EINVAL (invalid argument, or conflicting lockspace)",
        rv::ENOSPC => "ENOSPC (lockspace not joined)",
        -34 => "ERANGE (bad number of disks)",
        rv::EALREADY => "EALREADY (the lease is already in that mode)",
        rv::EINPROGRESS => "EINPROGRESS (lockspace add/remove in progress)",
        -116 | -25 => "ESTALE/ENOTTY (registered process died)",
        -201 => "SANLK_ERROR",
        -202 => "SANLK_AIO_TIMEOUT (storage I/O exceeded io_timeout)",
        -214..=-210 => "SANLK_DBLOCK (ballot I/O error or contention)",
        rv::LEADER_MAGIC => "SANLK_LEADER_MAGIC (no lease initialised there)",
        rv::LEADER_SECTORSIZE => "SANLK_LEADER_SECTORSIZE (sector size differs)",
        rv::LEADER_LOCKSPACE => "SANLK_LEADER_LOCKSPACE (lockspace name differs on disk)",
        rv::LEADER_RESOURCE => "SANLK_LEADER_RESOURCE (resource name differs on disk)",
        -230 => "SANLK_ADDLS_SIZES (bad sector/align combination)",
        -231 => "SANLK_ADDLS_INVALID_HOSTID (host_id larger than max_hosts)",
        rv::ACQUIRE_LVER => "SANLK_ACQUIRE_LVER (lease version changed)",
        rv::ACQUIRE_LOCKSPACE => "SANLK_ACQUIRE_LOCKSPACE (owner's lockspace unknown)",
        rv::ACQUIRE_IDDISK => "SANLK_ACQUIRE_IDDISK (owner's lockspace disk unreadable)",
        rv::ACQUIRE_IDLIVE => "SANLK_ACQUIRE_IDLIVE (held by a live host)",
        rv::ACQUIRE_OWNED => "SANLK_ACQUIRE_OWNED (held by another host)",
        rv::ACQUIRE_OTHER => "SANLK_ACQUIRE_OTHER (another host won the ballot)",
        rv::ACQUIRE_SHRETRY => "SANLK_ACQUIRE_SHRETRY (shared acquire must be retried)",
        rv::ACQUIRE_OWNED_RETRY => {
            "SANLK_ACQUIRE_OWNED_RETRY (owner host stopped renewing but is not dead yet)"
        }
        rv::HOSTID_BUSY => "SANLK_HOSTID_BUSY (host_id in use by another host)",
        _ => "",
    };
    if text.is_empty() {
        format!("sanlock error {code}")
    } else {
        format!("sanlock error {code} {text}")
    }
}

/// A failed client call.
#[derive(Debug)]
pub enum ClientError {
    /// The socket failed (daemon not running, connection closed, ...).
    Io(io::Error),
    /// The daemon answered with a negative result.
    Daemon(i32),
    /// The daemon's answer does not make sense, or an argument cannot be encoded.
    Protocol(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "socket error: {e}"),
            ClientError::Daemon(code) => f.write_str(&describe_rv(*code)),
            ClientError::Protocol(s) => write!(f, "protocol error: {s}"),
        }
    }
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

/// The result of a client call.
pub type ClientResult<T> = Result<T, ClientError>;

const NAME_LEN: usize = 48;
const PATH_LEN: usize = 1024;
const HELPER_LEN: usize = 128;
/// Leases per acquire or release call (`SANLK_MAX_RESOURCES`).
pub const MAX_RESOURCES: usize = 8;

/// The wire structs, `#[repr(C)]` as in sanlock's headers, every hole an explicit field so that
/// they are plain bytes both ways (zerocopy checks that at compile time, and the asserts below
/// check each size against sanlock's).
pub mod wire {
    use super::{HELPER_LEN, NAME_LEN, PATH_LEN};
    use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

    /// `struct sm_header`: every request and reply starts with it.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
    pub struct Header {
        /// `SM_MAGIC`.
        pub magic: u32,
        /// `SM_PROTO`.
        pub version: u32,
        /// Command number.
        pub cmd: u32,
        /// Command flags.
        pub cmd_flags: u32,
        /// Header plus body bytes.
        pub length: u32,
        /// Unused by the daemon.
        pub seq: u32,
        /// Command argument; the result in replies.
        pub data: u32,
        /// Second argument; a count or version in replies.
        pub data2: u32,
    }

    /// `struct sanlk_disk`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
    pub struct Disk {
        /// NUL-terminated path.
        pub path: [u8; PATH_LEN],
        /// Offset of the area in it.
        pub offset: u64,
        /// Padding.
        pub pad1: u32,
        /// Padding.
        pub pad2: u32,
    }

    /// `struct sanlk_lockspace`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
    pub struct Lockspace {
        /// Name (NUL not required at 48 bytes).
        pub name: [u8; NAME_LEN],
        /// This host's id.
        pub host_id: u64,
        /// `SANLK_LSF_*`.
        pub flags: u32,
        /// The hole before the 8-aligned disk.
        pub pad: u32,
        /// Where the delta leases are.
        pub host_id_disk: Disk,
    }

    /// `struct sanlk_resource` (its disks follow it on the wire).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
    pub struct Resource {
        /// Lockspace name.
        pub lockspace_name: [u8; NAME_LEN],
        /// Resource name.
        pub name: [u8; NAME_LEN],
        /// Leader version.
        pub lver: u64,
        /// Command-specific.
        pub data64: u64,
        /// Command-specific.
        pub data32: u32,
        /// Unused.
        pub unused: u32,
        /// `SANLK_RES_*`.
        pub flags: u32,
        /// Disks that follow.
        pub num_disks: u32,
    }

    /// A `struct sanlk_resource` with its one disk, as this client always sends them.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
    pub struct ResourceDisk {
        /// The resource.
        pub res: Resource,
        /// Its disk.
        pub disk: Disk,
    }

    /// `struct sanlk_options` without its trailing string.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
    pub struct Options {
        /// Shown in `sanlock client status`.
        pub owner_name: [u8; NAME_LEN],
        /// Flags.
        pub flags: u32,
        /// Length of the string that follows (0).
        pub len: u32,
    }

    /// `struct sanlk_host`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
    pub struct Host {
        /// Host id.
        pub host_id: u64,
        /// Generation.
        pub generation: u64,
        /// Last timestamp seen.
        pub timestamp: u64,
        /// io_timeout.
        pub io_timeout: u32,
        /// `SANLK_HOST_*` state in the low bits.
        pub flags: u32,
    }

    /// The body of `SM_CMD_KILLPATH`: program and arguments.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
    pub struct Killpath {
        /// Program.
        pub path: [u8; HELPER_LEN],
        /// Arguments, split on spaces by the daemon.
        pub args: [u8; HELPER_LEN],
    }

    // The sizes of sanlock 3.8.5's structs on 64-bit Linux.
    const _: () = assert!(size_of::<Header>() == 32);
    const _: () = assert!(size_of::<Disk>() == 1040);
    const _: () = assert!(size_of::<Lockspace>() == 1104);
    const _: () = assert!(size_of::<Resource>() == 128);
    const _: () = assert!(size_of::<ResourceDisk>() == 128 + 1040);
    const _: () = assert!(size_of::<Options>() == 56);
    const _: () = assert!(size_of::<Host>() == 32);
    const _: () = assert!(size_of::<Killpath>() == 256);
}

use zerocopy::{FromBytes, FromZeros, IntoBytes};

/// A lockspace (`struct sanlk_lockspace`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockspaceSpec {
    /// Name, ≤ 48 bytes.
    pub name: String,
    /// This host's id (0 when formatting).
    pub host_id: u64,
    /// `SANLK_LSF_*` (ALIGN/SECTOR).
    pub flags: u32,
    /// The delta-lease file or device.
    pub path: PathBuf,
    /// Offset of the lockspace area in it.
    pub offset: u64,
}

/// A paxos lease (`struct sanlk_resource` with one disk).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ResourceSpec {
    /// Lockspace name, ≤ 48 bytes.
    pub lockspace: String,
    /// Resource name, ≤ 48 bytes.
    pub name: String,
    /// The lease file or device.
    pub path: PathBuf,
    /// Offset of the lease area in it.
    pub offset: u64,
    /// Expected leader version with [`flags::RES_LVER`].
    pub lver: u64,
    /// `SANLK_RES_*`.
    pub flags: u32,
}

/// Checks that `name` fits a sanlock name field and needs no escaping in state strings.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > NAME_LEN {
        return Err(format!(
            "{what} \"{name}\" must be 1 to {NAME_LEN} bytes long for sanlock"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "{what} \"{name}\" may only contain A-Z, a-z, 0-9, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Copies `s` into a zeroed field, refusing more than `max` bytes or a NUL inside.
fn put_str(field: &mut [u8], max: usize, s: &[u8]) -> ClientResult<()> {
    if s.len() > max.min(field.len()) || s.contains(&0) {
        return Err(ClientError::Protocol(format!(
            "\"{}\" does not fit a {max}-byte sanlock field",
            String::from_utf8_lossy(s)
        )));
    }
    field[..s.len()].copy_from_slice(s);
    Ok(())
}

impl wire::Disk {
    /// A disk at `path` and `offset`; the path must stay NUL-terminated: at most 1023 bytes.
    pub fn new(path: &Path, offset: u64) -> ClientResult<Self> {
        use std::os::unix::ffi::OsStrExt;
        let mut d = Self::new_zeroed();
        put_str(&mut d.path, PATH_LEN - 1, path.as_os_str().as_bytes())?;
        d.offset = offset;
        Ok(d)
    }
}

impl wire::Lockspace {
    /// Encodes `ls`.
    pub fn new(ls: &LockspaceSpec) -> ClientResult<Self> {
        let mut w = Self::new_zeroed();
        put_str(&mut w.name, NAME_LEN, ls.name.as_bytes())?;
        w.host_id = ls.host_id;
        w.flags = ls.flags;
        w.host_id_disk = wire::Disk::new(&ls.path, ls.offset)?;
        Ok(w)
    }
}

impl wire::Resource {
    /// Encodes `r` without its disk (one disk announced).
    pub fn new(r: &ResourceSpec) -> ClientResult<Self> {
        let mut w = Self::new_zeroed();
        put_str(&mut w.lockspace_name, NAME_LEN, r.lockspace.as_bytes())?;
        put_str(&mut w.name, NAME_LEN, r.name.as_bytes())?;
        w.lver = r.lver;
        w.flags = r.flags;
        w.num_disks = 1;
        Ok(w)
    }
}

impl wire::ResourceDisk {
    /// Encodes `r` with its disk.
    pub fn new(r: &ResourceSpec) -> ClientResult<Self> {
        Ok(wire::ResourceDisk {
            res: wire::Resource::new(r)?,
            disk: wire::Disk::new(&r.path, r.offset)?,
        })
    }
}

/// Encodes a `struct sanlk_lockspace`.
pub fn encode_lockspace(ls: &LockspaceSpec) -> ClientResult<Vec<u8>> {
    Ok(wire::Lockspace::new(ls)?.as_bytes().to_vec())
}

/// Encodes a `struct sanlk_resource`, with its disk when `with_disk`.
pub fn encode_resource(r: &ResourceSpec, with_disk: bool) -> ClientResult<Vec<u8>> {
    Ok(if with_disk {
        wire::ResourceDisk::new(r)?.as_bytes().to_vec()
    } else {
        wire::Resource::new(r)?.as_bytes().to_vec()
    })
}

/// Encodes the body of `SM_CMD_CONVERT`: the resource without disks, with `RES_SHARED` set
/// exactly when converting to shared (the resource's own flags are ignored).
pub fn encode_convert(r: &ResourceSpec, to_shared: bool) -> ClientResult<Vec<u8>> {
    let mut res = wire::Resource::new(r)?;
    res.flags = if to_shared { flags::RES_SHARED } else { 0 };
    res.lver = 0;
    Ok(res.as_bytes().to_vec())
}

/// A reply header.
#[derive(Debug, Clone, Copy)]
pub struct Reply {
    /// `length` field: header plus body bytes.
    pub length: u32,
    /// Result (or align size, ...).
    pub data: i32,
    /// Count or version.
    pub data2: u32,
}

/// Bytes of a reply header (`struct sm_header`).
pub const REPLY_HEADER_LEN: usize = size_of::<wire::Header>();

/// Longest reply body accepted.
pub const MAX_REPLY_BODY: usize = 64 << 20;

impl Reply {
    /// The body length the header announces (its `length` less the header), refused above
    /// [`MAX_REPLY_BODY`].
    pub fn body_len(&self) -> ClientResult<usize> {
        let len = (self.length as usize).saturating_sub(REPLY_HEADER_LEN);
        if len > MAX_REPLY_BODY {
            return Err(ClientError::Protocol(format!("reply body of {len} bytes")));
        }
        Ok(len)
    }
}

/// Decodes a reply header from the daemon's bytes; refuses a wrong length or magic.
pub fn decode_reply_header(bytes: &[u8]) -> ClientResult<Reply> {
    let h = wire::Header::read_from_bytes(bytes).map_err(|_| {
        ClientError::Protocol(format!(
            "reply header of {} bytes, not {REPLY_HEADER_LEN}",
            bytes.len()
        ))
    })?;
    if h.magic != SM_MAGIC {
        return Err(ClientError::Protocol(format!(
            "reply magic {:#x} is not sanlock's {SM_MAGIC:#x}",
            h.magic
        )));
    }
    Ok(Reply {
        length: h.length,
        data: h.data as i32,
        data2: h.data2,
    })
}

/// Decodes the body of a `GET_HOSTS` reply: at most `count` (`data2`) whole `struct sanlk_host`
/// entries; a trailing partial entry is ignored.
pub fn decode_hosts(body: &[u8], count: u32) -> Vec<HostStatus> {
    body.chunks_exact(size_of::<wire::Host>())
        .take(count as usize)
        // The body is a Vec<u8>, not aligned for u64: copy each entry out.
        .filter_map(|h| wire::Host::read_from_bytes(h).ok())
        .map(|h| HostStatus {
            host_id: h.host_id,
            generation: h.generation,
            timestamp: h.timestamp,
            io_timeout: h.io_timeout,
            state: HostState::from_flags(h.flags),
        })
        .collect()
}

/// Decodes the body of a `READ_RESOURCE` reply: the resource's leader version.
pub fn decode_read_resource(body: &[u8]) -> ClientResult<u64> {
    let (back, _) = wire::Resource::read_from_prefix(body).map_err(|_| {
        ClientError::Protocol(format!("read_resource reply of {} bytes", body.len()))
    })?;
    Ok(back.lver)
}

/// Decodes the body of an `INQUIRE` reply: sanlock's state string, up to its first NUL.
pub fn decode_inquire(body: &[u8]) -> String {
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    String::from_utf8_lossy(&body[..end]).into_owned()
}

/// One connection to the daemon. Requests on it are strictly one at a time.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
}

impl Connection {
    /// Connects to the daemon's socket.
    pub fn connect(socket: &Path) -> ClientResult<Self> {
        Ok(Connection {
            stream: UnixStream::connect(socket)?,
        })
    }

    /// Limits how long a reply may take (`None` waits for ever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> ClientResult<()> {
        Ok(self.stream.set_read_timeout(timeout)?)
    }

    fn send_all(&self, mut buf: &[u8]) -> ClientResult<()> {
        while !buf.is_empty() {
            // MSG_NOSIGNAL: a daemon that went away gives EPIPE, never SIGPIPE.
            match rustix::net::send(&self.stream, buf, rustix::net::SendFlags::NOSIGNAL) {
                Ok(0) => return Err(ClientError::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => buf = &buf[n..],
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(ClientError::Io(e.into())),
            }
        }
        Ok(())
    }

    /// Sends one request: header plus `body`.
    pub fn send(
        &self,
        command: u32,
        cmd_flags: u32,
        data: u32,
        data2: u32,
        body: &[u8],
    ) -> ClientResult<()> {
        let header_len = size_of::<wire::Header>();
        let length = u32::try_from(header_len + body.len())
            .map_err(|_| ClientError::Protocol("request too large".into()))?;
        let header = wire::Header {
            magic: SM_MAGIC,
            version: SM_PROTO,
            cmd: command,
            cmd_flags,
            length,
            seq: 0,
            data,
            data2,
        };
        let mut msg = Vec::with_capacity(header_len + body.len());
        msg.extend_from_slice(header.as_bytes());
        msg.extend_from_slice(body);
        self.send_all(&msg)
    }

    /// Reads one reply header.
    pub fn recv_header(&mut self) -> ClientResult<Reply> {
        let mut h = [0u8; REPLY_HEADER_LEN];
        self.stream.read_exact(&mut h)?;
        decode_reply_header(&h)
    }

    /// Reads the reply body announced by `reply.length`.
    pub fn recv_body(&mut self, reply: &Reply) -> ClientResult<Vec<u8>> {
        let len = reply.body_len()?;
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body)?;
        Ok(body)
    }

    /// Sends a request and reads a header-only reply; a negative result is an error.
    pub fn call(
        &mut self,
        command: u32,
        cmd_flags: u32,
        data: u32,
        data2: u32,
        body: &[u8],
    ) -> ClientResult<Reply> {
        self.send(command, cmd_flags, data, data2, body)?;
        let reply = self.recv_header()?;
        if reply.data < 0 {
            return Err(ClientError::Daemon(reply.data));
        }
        Ok(reply)
    }
}

/// The daemon at one socket; each admin call uses a fresh connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    socket: PathBuf,
}

/// `-1` as the `data2` of calls on a registered connection ("for myself").
const SELF: u32 = u32::MAX;

impl Client {
    /// The daemon whose run directory is `run_dir` (its socket is `run_dir/sanlock.sock`).
    pub fn new(run_dir: &Path) -> Self {
        Client {
            socket: run_dir.join("sanlock.sock"),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn transient(&self) -> ClientResult<Connection> {
        Connection::connect(&self.socket)
    }

    /// The daemon's version, `major<<24 | minor<<16 | patch<<8` (command 28, sanlock ≥ 3.2).
    /// An older daemon does not know the command; it then closes the connection or stays silent,
    /// which `timeout` bounds.
    pub fn version(&self, timeout: Duration) -> ClientResult<u32> {
        let mut c = self.transient()?;
        c.set_read_timeout(Some(timeout))?;
        c.send(cmd::VERSION, 0, 0, 0, &[])?;
        let reply = c.recv_header()?;
        if reply.data < 0 {
            return Err(ClientError::Daemon(reply.data));
        }
        Ok(reply.data2)
    }

    /// The daemon's default align size for `path` (the file must exist).
    pub fn align(&self, path: &Path) -> ClientResult<u64> {
        let disk = wire::Disk::new(path, 0)?;
        let reply = self
            .transient()?
            .call(cmd::ALIGN, 0, 0, 0, disk.as_bytes())?;
        Ok(reply.data as u64)
    }

    /// Formats a lockspace (the daemon does the I/O).
    pub fn write_lockspace(&self, ls: &LockspaceSpec, io_timeout: u32) -> ClientResult<()> {
        let body = encode_lockspace(ls)?;
        self.transient()?
            .call(cmd::WRITE_LOCKSPACE, 0, 0, io_timeout, &body)?;
        Ok(())
    }

    /// Formats a paxos lease (the daemon does the I/O).
    pub fn write_resource(&self, r: &ResourceSpec) -> ClientResult<()> {
        let body = encode_resource(r, true)?;
        self.transient()?
            .call(cmd::WRITE_RESOURCE, 0, 0, 0, &body)?;
        Ok(())
    }

    /// The leader version now on disk of the paxos lease `r` (command 21, `sanlock_read_resource`:
    /// the daemon reads the leader record; nothing is acquired). `r.lver` and `RES_LVER` are not
    /// sent.
    pub fn read_resource(&self, r: &ResourceSpec) -> ClientResult<u64> {
        let request = ResourceSpec {
            lver: 0,
            flags: r.flags & !(flags::RES_LVER | flags::RES_SHARED),
            ..r.clone()
        };
        let body = encode_resource(&request, true)?;
        let mut c = self.transient()?;
        c.send(cmd::READ_RESOURCE, 0, 0, 0, &body)?;
        let reply = c.recv_header()?;
        // The daemon always sends the resource after the header, even on failure.
        let res = c.recv_body(&reply)?;
        if reply.data < 0 {
            return Err(ClientError::Daemon(reply.data));
        }
        decode_read_resource(&res)
    }

    /// Joins a lockspace as `ls.host_id`; blocks until joined (2–5 × io_timeout) or failed.
    pub fn add_lockspace(&self, ls: &LockspaceSpec, io_timeout: u32) -> ClientResult<()> {
        let body = encode_lockspace(ls)?;
        self.transient()?
            .call(cmd::ADD_LOCKSPACE, 0, io_timeout, 0, &body)?;
        Ok(())
    }

    /// Whether the lockspace is joined: `Ok(())`, or `Daemon(ENOENT)` / `Daemon(EINPROGRESS)`.
    pub fn inq_lockspace(&self, ls: &LockspaceSpec, wait: bool) -> ClientResult<()> {
        let body = encode_lockspace(ls)?;
        let f = if wait { flags::INQ_WAIT } else { 0 };
        self.transient()?.call(cmd::INQ_LOCKSPACE, f, 0, 0, &body)?;
        Ok(())
    }

    /// Leaves a lockspace; with `unused_only` the daemon refuses (EBUSY) while leases are held
    /// in it instead of killing their owners.
    pub fn rem_lockspace(&self, ls: &LockspaceSpec, unused_only: bool) -> ClientResult<()> {
        let body = encode_lockspace(ls)?;
        let f = if unused_only { flags::REM_UNUSED } else { 0 };
        self.transient()?.call(cmd::REM_LOCKSPACE, f, 0, 0, &body)?;
        Ok(())
    }

    /// What this host's daemon knows of the hosts in lockspace `name` (`host_id` 0: all); empty
    /// until the daemon has checked the other hosts once after joining.
    pub fn get_hosts(&self, name: &str, host_id: u64) -> ClientResult<Vec<HostStatus>> {
        let body = encode_lockspace(&LockspaceSpec {
            name: name.to_owned(),
            host_id,
            flags: 0,
            path: PathBuf::new(),
            offset: 0,
        })?;
        let mut c = self.transient()?;
        c.send(cmd::GET_HOSTS, 0, 0, 0, &body)?;
        let reply = c.recv_header()?;
        // EAGAIN: joined, but not yet checked the other hosts (empty list). ENOSPC: the
        // daemon's buffer was too small; what fitted follows.
        if reply.data == rv::EAGAIN {
            return Ok(Vec::new());
        }
        if reply.data < 0 && reply.data != rv::ENOSPC {
            return Err(ClientError::Daemon(reply.data));
        }
        let body = c.recv_body(&reply)?;
        Ok(decode_hosts(&body, reply.data2))
    }

    /// Registers the calling process: the returned connection owns every lease acquired on it,
    /// and closing it releases them.
    pub fn register(&self) -> ClientResult<Registered> {
        let c = self.transient()?;
        // REGISTER has no reply; a failure shows on the next request.
        c.send(cmd::REGISTER, 0, 0, 0, &[])?;
        Ok(Registered { conn: c })
    }
}

/// A host's state as seen by this host's daemon (`SANLK_HOST_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostState {
    /// Not seen renewing yet (for example just after this host joined).
    Unknown,
    /// Not in the lockspace.
    Free,
    /// Renewing its delta lease.
    Live,
    /// Stopped renewing; not yet dead.
    Fail,
    /// Dead: its leases may be taken over.
    Dead,
    /// Another value.
    Other(u32),
}

impl HostState {
    fn from_flags(f: u32) -> Self {
        match f & 0xf {
            1 => HostState::Unknown,
            2 => HostState::Free,
            3 => HostState::Live,
            4 => HostState::Fail,
            5 => HostState::Dead,
            n => HostState::Other(n),
        }
    }
}

/// One entry of [`Client::get_hosts`] (`struct sanlk_host`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostStatus {
    /// Host id.
    pub host_id: u64,
    /// Its generation.
    pub generation: u64,
    /// Last delta-lease timestamp seen.
    pub timestamp: u64,
    /// Its io_timeout.
    pub io_timeout: u32,
    /// Its state.
    pub state: HostState,
}

/// A registered connection (a sanlock client owning leases). Dropping it shuts the connection
/// down, so the daemon sees the client gone (and releases what it holds) even while a copy of its
/// descriptor ([`Registered::watch_fd`]) is still open.
#[derive(Debug)]
pub struct Registered {
    conn: Connection,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let _ = rustix::net::shutdown(&self.conn.stream, rustix::net::Shutdown::Both);
    }
}

impl Registered {
    /// A copy of the connection's descriptor, to watch for its end: `poll` reports `POLLHUP` on it
    /// once the daemon has closed the connection (it died) or this side dropped it.
    pub fn watch_fd(&self) -> io::Result<std::os::fd::OwnedFd> {
        std::os::fd::AsFd::as_fd(&self.conn.stream).try_clone_to_owned()
    }

    /// Limits how long a reply may take (`None` waits for ever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> ClientResult<()> {
        self.conn.set_read_timeout(timeout)
    }

    /// Takes `resources` (≤ 8) for this client, all or nothing. `owner_name` shows in
    /// `sanlock client status`.
    pub fn acquire(
        &mut self,
        resources: &[ResourceSpec],
        cmd_flags: u32,
        owner_name: &str,
    ) -> ClientResult<()> {
        if resources.is_empty() || resources.len() > MAX_RESOURCES {
            return Err(ClientError::Protocol(format!(
                "{} leases in one acquire (1 to {MAX_RESOURCES})",
                resources.len()
            )));
        }
        let mut body = Vec::new();
        for r in resources {
            body.extend(encode_resource(r, true)?);
        }
        let mut opt = wire::Options::new_zeroed();
        let owner: String = owner_name
            .chars()
            .filter(|c| *c != '\0')
            .scan(0usize, |len, c| {
                *len += c.len_utf8();
                (*len < NAME_LEN).then_some(c)
            })
            .collect();
        put_str(&mut opt.owner_name, NAME_LEN, owner.as_bytes())?;
        body.extend_from_slice(opt.as_bytes());
        self.conn
            .call(cmd::ACQUIRE, cmd_flags, resources.len() as u32, SELF, &body)?;
        Ok(())
    }

    /// Releases `resources` (≤ 8, matched by lockspace and name).
    pub fn release(&mut self, resources: &[ResourceSpec]) -> ClientResult<()> {
        if resources.is_empty() || resources.len() > MAX_RESOURCES {
            return Err(ClientError::Protocol(format!(
                "{} leases in one release (1 to {MAX_RESOURCES})",
                resources.len()
            )));
        }
        let mut body = Vec::new();
        for r in resources {
            body.extend(encode_resource(r, false)?);
        }
        self.conn
            .call(cmd::RELEASE, 0, resources.len() as u32, SELF, &body)?;
        Ok(())
    }

    /// The leases this client holds, as sanlock's state string.
    pub fn inquire(&mut self) -> ClientResult<String> {
        self.conn.send(cmd::INQUIRE, 0, 0, SELF, &[])?;
        let reply = self.conn.recv_header()?;
        let body = self.conn.recv_body(&reply)?;
        if reply.data < 0 {
            return Err(ClientError::Daemon(reply.data));
        }
        Ok(decode_inquire(&body))
    }

    /// Sets the program the daemon runs when this client's lockspace fails (`args` are split on
    /// spaces by the daemon). Must precede acquire.
    pub fn killpath(&mut self, program: &Path, args: &str) -> ClientResult<()> {
        use std::os::unix::ffi::OsStrExt;
        let mut body = wire::Killpath::new_zeroed();
        put_str(
            &mut body.path,
            HELPER_LEN - 2,
            program.as_os_str().as_bytes(),
        )?;
        put_str(&mut body.args, HELPER_LEN - 2, args.as_bytes())?;
        self.conn.call(cmd::KILLPATH, 0, 0, SELF, body.as_bytes())?;
        Ok(())
    }

    /// Converts a lease this client holds between exclusive and shared (`SM_CMD_CONVERT`, sanlock
    /// 3.1+). The body is the `struct sanlk_resource` alone (no disks); the daemon matches the
    /// lease by lockspace and name and reads only `RES_SHARED` of its flags: set = exclusive →
    /// shared, clear = shared → exclusive.
    ///
    /// Exclusive → shared keeps the token and writes this host's shared mode block before it
    /// releases the leader, so no other host can take the lease exclusively in between. Shared →
    /// exclusive runs a ballot (the lver grows) and fails with `-EAGAIN` while another live host
    /// holds it shared; the lease is then still held shared. Converting to the mode already held
    /// is `-EALREADY` (-114); a lease this client does not hold is `-ENOENT`.
    pub fn convert(&mut self, resource: &ResourceSpec, to_shared: bool) -> ClientResult<()> {
        let body = encode_convert(resource, to_shared)?;
        self.conn
            .call(cmd::CONVERT, flags::CONVERT_OWNER_NOWAIT, 0, SELF, &body)?;
        Ok(())
    }

    /// Forbids the daemon some actions on this client (`RESTRICT_*`).
    pub fn restrict(&mut self, restrict_flags: u32) -> ClientResult<()> {
        self.conn
            .call(cmd::RESTRICT, restrict_flags, 0, SELF, &[])?;
        Ok(())
    }
}

/// One lease of an inquire state string: lockspace, name and leader version (`None` for shared
/// leases, whose strings carry `SH` instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLease {
    /// Lockspace name.
    pub lockspace: String,
    /// Resource name.
    pub name: String,
    /// Leader version of an exclusive lease.
    pub lver: Option<u64>,
}

/// Parses `LS:NAME:PATH:OFFSET[:PATH:OFFSET...][:LVER|:SH]` strings separated by spaces; paths
/// escape `:` and space with a backslash.
pub fn parse_state(state: &str) -> Vec<HeldLease> {
    let mut out = Vec::new();
    for item in split_unescaped(state, ' ') {
        let fields = split_unescaped(&item, ':');
        if fields.len() < 4 {
            continue;
        }
        let last = fields.last().map(String::as_str).unwrap_or("");
        // Without a suffix the field count is even (LS, NAME, then PATH:OFFSET pairs).
        let lver = if fields.len() % 2 == 1 {
            last.parse().ok()
        } else {
            None
        };
        out.push(HeldLease {
            lockspace: fields[0].clone(),
            name: fields[1].clone(),
            lver,
        });
    }
    out
}

fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            cur.push(c);
            if let Some(n) = chars.next() {
                cur.push(n);
            }
        } else if c == sep {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// `3.8.5` from `0x03080500`.
pub fn version_text(v: u32) -> String {
    format!("{}.{}.{}", v >> 24, (v >> 16) & 0xff, (v >> 8) & 0xff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_and_offsets() {
        let ls = LockspaceSpec {
            name: "LS".into(),
            host_id: 7,
            flags: flags::ALIGN1M | flags::SECTOR512,
            path: "/a/b".into(),
            offset: 1 << 20,
        };
        let b = encode_lockspace(&ls).unwrap();
        assert_eq!(b.len(), 1104);
        assert_eq!(&b[0..3], b"LS\0");
        assert_eq!(u64::from_ne_bytes(b[48..56].try_into().unwrap()), 7);
        assert_eq!(u32::from_ne_bytes(b[56..60].try_into().unwrap()), 0x110);
        assert_eq!(&b[60..64], &[0; 4]);
        assert_eq!(&b[64..69], b"/a/b\0");
        assert_eq!(
            u64::from_ne_bytes(b[64 + 1024..64 + 1032].try_into().unwrap()),
            1 << 20
        );
        let r = ResourceSpec {
            lockspace: "LS".into(),
            name: "R".into(),
            path: "/x".into(),
            offset: 0,
            lver: 9,
            flags: flags::RES_LVER,
        };
        let b = encode_resource(&r, true).unwrap();
        assert_eq!(b.len(), 128 + 1040);
        assert_eq!(u64::from_ne_bytes(b[96..104].try_into().unwrap()), 9);
        assert_eq!(u32::from_ne_bytes(b[120..124].try_into().unwrap()), 1);
        assert_eq!(u32::from_ne_bytes(b[124..128].try_into().unwrap()), 1);
        assert_eq!(encode_resource(&r, false).unwrap().len(), 128);
        let shared = ResourceSpec {
            flags: flags::RES_LVER | flags::ALIGN1M | flags::SECTOR512,
            ..r.clone()
        };
        let c = encode_convert(&shared, true).unwrap();
        assert_eq!(c.len(), 128);
        assert_eq!(&c[0..3], b"LS\0");
        assert_eq!(&c[48..50], b"R\0");
        assert_eq!(&c[96..104], &[0; 8], "no lver");
        assert_eq!(u32::from_ne_bytes(c[120..124].try_into().unwrap()), 0x4);
        let c = encode_convert(&shared, false).unwrap();
        assert_eq!(u32::from_ne_bytes(c[120..124].try_into().unwrap()), 0);
    }

    #[test]
    fn decodes_hosts_and_headers() {
        let h = wire::Host {
            host_id: 2,
            generation: 3,
            timestamp: 4,
            io_timeout: 10,
            flags: 3,
        };
        let back = wire::Host::read_from_bytes(h.as_bytes()).unwrap();
        assert_eq!((back.host_id, back.flags), (2, 3));
        assert_eq!(HostState::from_flags(back.flags), HostState::Live);
        let header = wire::Header {
            magic: SM_MAGIC,
            length: 32,
            data: (-243i32) as u32,
            ..Default::default()
        };
        let b = header.as_bytes();
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()), SM_MAGIC);
        assert_eq!(
            u32::from_ne_bytes(b[24..28].try_into().unwrap()) as i32,
            -243
        );
    }

    #[test]
    fn decodes_replies_from_bytes() {
        let header = wire::Header {
            magic: SM_MAGIC,
            length: 32 + 40 + 7,
            data: (-243i32) as u32,
            data2: 5,
            ..Default::default()
        };
        let reply = decode_reply_header(header.as_bytes()).unwrap();
        assert_eq!(
            (reply.data, reply.data2, reply.body_len().unwrap()),
            (-243, 5, 47)
        );
        assert!(decode_reply_header(&header.as_bytes()[..31]).is_err());
        assert!(decode_reply_header(&[0u8; REPLY_HEADER_LEN]).is_err());
        let huge = Reply {
            length: u32::MAX,
            data: 0,
            data2: 0,
        };
        assert!(huge.body_len().is_err());
        // A trailing partial entry and entries past the count are ignored.
        let mut host = wire::Host::new_zeroed();
        host.host_id = 2;
        host.flags = 5;
        let mut body = host.as_bytes().repeat(2);
        body.extend_from_slice(&[1, 2, 3]);
        assert_eq!(decode_hosts(&body, 5).len(), 2);
        assert_eq!(decode_hosts(&body, 1)[0].state, HostState::Dead);
        assert!(decode_read_resource(&body).is_err());
        assert_eq!(decode_inquire(b"LS:r:/p:0:3\0junk"), "LS:r:/p:0:3");
    }

    #[test]
    fn refuses_oversized_fields() {
        let r = ResourceSpec {
            lockspace: "x".repeat(49),
            name: "R".into(),
            path: "/x".into(),
            offset: 0,
            lver: 0,
            flags: 0,
        };
        assert!(encode_resource(&r, true).is_err());
        assert!(check_name("lockspace", &"a".repeat(48)).is_ok());
        assert!(check_name("lockspace", "a:b").is_err());
        assert!(check_name("lockspace", "").is_err());
    }

    #[test]
    fn parses_inquire_state() {
        let s = "LS:abc:/leases/a\\:b\\ c:0:12 LS:def:/leases/d:1048576:SH LS:ghi:/p:0";
        assert_eq!(
            parse_state(s),
            vec![
                HeldLease {
                    lockspace: "LS".into(),
                    name: "abc".into(),
                    lver: Some(12)
                },
                HeldLease {
                    lockspace: "LS".into(),
                    name: "def".into(),
                    lver: None
                },
                HeldLease {
                    lockspace: "LS".into(),
                    name: "ghi".into(),
                    lver: None
                },
            ]
        );
        assert!(parse_state("").is_empty());
    }

    #[test]
    fn version_and_rv_texts() {
        assert_eq!(version_text(0x0308_0500), "3.8.5");
        assert!(describe_rv(-243).contains("live host"));
        assert!(describe_rv(-999).contains("-999"));
    }
}
