//! A FUSE filesystem whose operations block on command: storage that stops answering, for tests.
//!
//! [`HangFs::mount`] serves a directory of regular files (by default one `disk.img` of 1 MiB) kept
//! in memory, readable and writable, through the kernel's FUSE protocol (the `fuser` crate, no
//! libfuse, no `fusermount`: as root it mounts with `mount(2)`). Entries and attributes are never
//! cached (timeouts of zero), so every `stat`, `open` or `fstat` reaches the filesystem.
//!
//! [`HangFs::hang`] makes every operation that arrives from then on wait until
//! [`HangFs::resume`], exactly as a hung NFS server or a dead disk would: the caller sleeps in the
//! kernel. Byte-range locks (OFD, POSIX, flock) are left to the kernel (the filesystem does not ask
//! for `FUSE_POSIX_LOCKS`), so they work as on a local filesystem and take no trip here. Closing a
//! description never waits either (`FLUSH` is not implemented and the kernel stops sending it; a
//! release is sent in the background), so a process holding a description on a hung `HangFs` can
//! still close it, exit or exec.
//!
//! The filesystem is served by a **process** of its own, forked from the mounting thread with
//! `PR_SET_PDEATHSIG=SIGKILL`, never by a thread of the test: a request the server has read waits
//! for its answer *uninterruptibly* (even a SIGKILLed requester, and every lookup of the same name
//! behind it), and the kernel ends the connection only when the last holder of `/dev/fuse` is gone.
//! With the server inside the test process, a test process that dies while the filesystem hangs
//! could never finish dying. With a server process, its death (drop, or the death of the thread
//! that mounted) aborts the connection and every waiter returns (`ENOTCONN`).
//!
//! Dropping a `HangFs` resumes it, detaches the mount (`umount2(MNT_DETACH)`) and ends the server,
//! so a failed test never leaves a hung mount behind; descriptions still open on it fail from then
//! on. Drop it (or resume it) *before* reaping processes that may wait in it: a process killed
//! while its request waits here cannot exit until the request is answered. Call
//! [`private_mount_namespace`] first to keep the mount out of sight of every process but the
//! test's own.

use fuser::{
    FileAttr, FileType, Filesystem, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request, Session, SessionACL, TimeOrNow,
};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult, Pid};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

/// Size of the default `disk.img`.
pub const DISK_SIZE: u64 = 1 << 20;
/// Name of the default file.
pub const DISK_NAME: &str = "disk.img";

/// Entries and attributes are never cached: every lookup and stat reaches the filesystem.
const NO_CACHE: Duration = Duration::ZERO;
const ROOT: u64 = fuser::FUSE_ROOT_ID;

// The control protocol between the test and the server process, one byte each.
/// Test to server: hold every operation from now on.
const CMD_HANG: u8 = b'h';
/// Test to server: answer again.
const CMD_RESUME: u8 = b'r';
/// Server to test: an operation is held.
const EVENT_HELD: u8 = b'H';
/// Server to test: a held operation goes on.
const EVENT_RELEASED: u8 = b'R';

/// Moves the calling thread (and so every thread and process it starts from now on) into a mount
/// namespace of its own whose mounts do not propagate back: a FUSE mount made after this is seen
/// by the test and its children only, and goes away with them. Other threads of the test process
/// keep the host's view. Needs root (`CAP_SYS_ADMIN`).
pub fn private_mount_namespace() -> io::Result<()> {
    vmlock_sys::mountns::enter_private()
}

/// A mounted FUSE filesystem that hangs on command. See the module documentation.
#[derive(Debug)]
pub struct HangFs {
    mountpoint: PathBuf,
    ctl: UnixStream,
    server: Option<Pid>,
    events: Arc<Events>,
    mounted: bool,
}

impl HangFs {
    /// Mounts the filesystem on `dir` (an existing empty directory) with one file,
    /// [`DISK_NAME`], of [`DISK_SIZE`] zero bytes. The server process lives until the drop or
    /// until the calling thread ends.
    pub fn mount(dir: &Path) -> io::Result<Self> {
        Self::mount_with(dir, &[(DISK_NAME, DISK_SIZE)])
    }

    /// Mounts the filesystem on `dir` with the given regular files (name, size in bytes), all
    /// zero-filled, mode 0600, owned by the caller.
    pub fn mount_with(dir: &Path, files: &[(&str, u64)]) -> io::Result<Self> {
        let (ctl, server_ctl) = UnixStream::pair()?;
        let server_ctl_fd = server_ctl.as_raw_fd();
        let fs = MemFs::new(files, server_ctl)?;
        let null: OwnedFd = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?
            .into();
        let dev: OwnedFd = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")?
            .into();
        let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
        let data = format!(
            "fd={},rootmode=40000,user_id={uid},group_id={gid},allow_other",
            dev.as_raw_fd()
        );
        mount(
            Some("vmlock-hangfs"),
            dir,
            Some("fuse.vmlock-hangfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(data.as_str()),
        )
        .map_err(io::Error::from)?;
        let events = Arc::new(Events::default());
        // From here on, dropping `hang_fs` detaches the mount and ends the server.
        let mut hang_fs = HangFs {
            mountpoint: dir.to_owned(),
            ctl,
            server: None,
            events: Arc::clone(&events),
            mounted: true,
        };
        // Everything the server needs is allocated before the fork.
        let mut session = Session::from_fd(fs, dev, SessionACL::All);
        let keep = [session.as_fd().as_raw_fd(), server_ctl_fd, null.as_raw_fd()];
        let parent = nix::unistd::getpid();
        // SAFETY: the child only runs the FUSE session loop over objects allocated above, on its
        // single thread: it takes no lock another thread of the test could have held at the fork
        // (glibc's malloc is reset for the child by glibc itself; nothing here uses stdio, the
        // environment or a logger) and ends with `_exit`, running no destructor of the parent's.
        match unsafe { fork() }.map_err(io::Error::from)? {
            ForkResult::Child => {
                server_main(&mut session, parent, keep);
            }
            ForkResult::Parent { child } => hang_fs.server = Some(child),
        }
        // The parent keeps no copy of /dev/fuse: the server's death must end the connection.
        drop(session);
        drop(null);
        let reader = hang_fs.ctl.try_clone()?;
        std::thread::Builder::new()
            .name("hangfs-events".into())
            .spawn(move || events.read_from(reader))?;
        // The kernel holds every request until the filesystem answered FUSE_INIT: one stat of the
        // root proves it serves.
        std::fs::metadata(dir)?;
        // Closing a description sends FUSE_FLUSH and waits for its answer, unless the filesystem
        // once answered ENOSYS (as it does). Do that first close now, so that no close ever waits
        // on a hung filesystem later: a process that forks and execs while it holds a description
        // here (a test spawning a guest while its holder keeps a disk) closes it in the exec.
        if let Some((name, _)) = files.first() {
            drop(std::fs::File::open(dir.join(name))?);
        }
        Ok(hang_fs)
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// The path of the served file `name`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name)
    }

    /// Every operation that arrives from now on waits until [`HangFs::resume`] (an operation the
    /// server is already answering is not affected).
    pub fn hang(&self) {
        let _ = (&self.ctl).write_all(&[CMD_HANG]);
    }

    /// Answers every waiting operation and serves normally again.
    pub fn resume(&self) {
        let _ = (&self.ctl).write_all(&[CMD_RESUME]);
    }

    /// How many operations wait in the filesystem, as last reported by the server (0 or 1: the
    /// server answers one request at a time; the others queue in the kernel).
    pub fn blocked(&self) -> usize {
        self.events.lock().blocked
    }

    /// How many operations have been held by [`HangFs::hang`] so far, in all.
    pub fn held_so_far(&self) -> u64 {
        self.events.lock().held
    }

    /// Waits until at least `n` operations in all have been held by [`HangFs::hang`] (counted by
    /// [`HangFs::held_so_far`]), or `timeout` passes. Returns whether they were. This is how a
    /// test knows a process is stuck in the filesystem, without sleeping.
    pub fn wait_held(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.events.lock();
        while state.held < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || state.server_gone {
                return false;
            }
            state = self
                .events
                .cond
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Resumes, detaches the mount and ends the server: every operation still waiting returns,
    /// answered or with `ENOTCONN`. Idempotent; also done by drop.
    pub fn unmount(&mut self) -> io::Result<()> {
        self.resume();
        let detached = if self.mounted {
            self.mounted = false;
            umount2(&self.mountpoint, MntFlags::MNT_DETACH).map_err(io::Error::from)
        } else {
            Ok(())
        };
        if let Some(server) = self.server.take() {
            let _ = self.ctl.shutdown(std::net::Shutdown::Both);
            let _ = kill(server, Signal::SIGKILL);
            let _ = waitpid(server, None);
        }
        detached
    }
}

impl Drop for HangFs {
    fn drop(&mut self) {
        let _ = self.unmount();
    }
}

/// The server process: serves until the connection ends, the test closes the control socket, or
/// the thread that forked it ends (PDEATHSIG). Never returns.
fn server_main(session: &mut Session<MemFs>, parent: Pid, keep: [RawFd; 3]) -> ! {
    let [_, _, null] = keep;
    // SAFETY: plain system calls on integers; the descriptors closed here are copies this process
    // inherited and never uses (no Rust object of this process refers to them, except the
    // parent's control socket end, which is never used or dropped here: the process `_exit`s).
    unsafe {
        nix::libc::prctl(
            nix::libc::PR_SET_PDEATHSIG,
            nix::libc::SIGKILL as nix::libc::c_ulong,
        );
        if nix::libc::getppid() != parent.as_raw() {
            nix::libc::_exit(0);
        }
        for std_fd in 0..3 {
            nix::libc::dup2(null, std_fd);
        }
        let mut sorted = keep;
        sorted.sort_unstable();
        let mut from = 3;
        for fd in sorted {
            if fd > from {
                close_range(from, fd - 1);
            }
            from = from.max(fd + 1);
        }
        close_range(from, RawFd::MAX);
    }
    let _ = session.run();
    // SAFETY: ends this process at once, without running the parent's destructors or atexit
    // handlers in the copy of its memory.
    unsafe { nix::libc::_exit(0) }
}

/// Closes every descriptor in `first..=last`.
///
/// # Safety
/// No live object may own a descriptor in the range.
unsafe fn close_range(first: RawFd, last: RawFd) {
    // SAFETY: the caller guarantees nothing owns these descriptors.
    unsafe {
        nix::libc::syscall(
            nix::libc::SYS_close_range,
            first as nix::libc::c_uint,
            last as nix::libc::c_uint,
            0 as nix::libc::c_uint,
        );
    }
}

#[derive(Debug, Default)]
struct Reported {
    blocked: usize,
    held: u64,
    server_gone: bool,
}

/// What the server reports, for the test's side.
#[derive(Debug, Default)]
struct Events {
    state: Mutex<Reported>,
    cond: Condvar,
}

impl Events {
    fn lock(&self) -> MutexGuard<'_, Reported> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_from(&self, mut ctl: UnixStream) {
        let mut buf = [0u8; 64];
        loop {
            let n = match ctl.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut state = self.lock();
            for byte in &buf[..n] {
                match *byte {
                    EVENT_HELD => {
                        state.held += 1;
                        state.blocked += 1;
                    }
                    EVENT_RELEASED => state.blocked = state.blocked.saturating_sub(1),
                    _ => {}
                }
            }
            self.cond.notify_all();
        }
        self.lock().server_gone = true;
        self.cond.notify_all();
    }
}

/// The server's side of the control socket: where every operation passes, and waits while the
/// filesystem hangs.
#[derive(Debug)]
struct Gate {
    ctl: UnixStream,
    hung: bool,
}

impl Gate {
    fn apply(&mut self, commands: &[u8]) {
        for c in commands {
            match *c {
                CMD_HANG => self.hung = true,
                CMD_RESUME => self.hung = false,
                _ => {}
            }
        }
    }

    /// Reads one batch of commands, waiting for them if `wait`. The test gone ends the server.
    fn read_commands(&mut self, wait: bool) {
        let mut buf = [0u8; 64];
        let flags = if wait {
            nix::sys::socket::MsgFlags::empty()
        } else {
            nix::sys::socket::MsgFlags::MSG_DONTWAIT
        };
        loop {
            match nix::sys::socket::recv(self.ctl.as_raw_fd(), &mut buf, flags) {
                Ok(0) => {
                    // SAFETY: the test closed its end: end this process at once.
                    unsafe { nix::libc::_exit(0) }
                }
                Ok(n) => {
                    self.apply(&buf[..n]);
                    if wait {
                        return;
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return, // EAGAIN: nothing more for now
            }
        }
    }

    fn pass(&mut self) {
        self.read_commands(false);
        if !self.hung {
            return;
        }
        let _ = (&self.ctl).write_all(&[EVENT_HELD]);
        while self.hung {
            self.read_commands(true);
        }
        let _ = (&self.ctl).write_all(&[EVENT_RELEASED]);
    }
}

#[derive(Debug)]
struct Node {
    name: String,
    data: Vec<u8>,
    mtime: SystemTime,
}

/// The in-memory filesystem: a root directory of regular files, inodes `2..`.
#[derive(Debug)]
struct MemFs {
    files: BTreeMap<u64, Node>,
    gate: Gate,
    uid: u32,
    gid: u32,
    born: SystemTime,
}

impl MemFs {
    fn new(files: &[(&str, u64)], ctl: UnixStream) -> io::Result<Self> {
        let mut map = BTreeMap::new();
        for (i, (name, size)) in files.iter().enumerate() {
            if name.is_empty() || name.contains('/') || *name == "." || *name == ".." {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("bad file name {name:?}"),
                ));
            }
            let size = usize::try_from(*size)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large"))?;
            map.insert(
                ROOT + 1 + i as u64,
                Node {
                    name: (*name).to_owned(),
                    data: vec![0; size],
                    mtime: SystemTime::now(),
                },
            );
        }
        Ok(MemFs {
            files: map,
            gate: Gate { ctl, hung: false },
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            born: SystemTime::now(),
        })
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm, size, nlink, mtime) = if ino == ROOT {
            (FileType::Directory, 0o755, 0, 2, self.born)
        } else {
            let node = self.files.get(&ino)?;
            (
                FileType::RegularFile,
                0o600,
                node.data.len() as u64,
                1,
                node.mtime,
            )
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: self.born,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

const ENOENT: i32 = nix::libc::ENOENT;
const EISDIR: i32 = nix::libc::EISDIR;
const EINVAL: i32 = nix::libc::EINVAL;
const EFBIG: i32 = nix::libc::EFBIG;

impl Filesystem for MemFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        self.gate.pass();
        let found = (parent == ROOT)
            .then(|| {
                self.files
                    .iter()
                    .find(|(_, n)| OsStr::new(&n.name) == name)
                    .map(|(ino, _)| *ino)
            })
            .flatten()
            .and_then(|ino| self.attr(ino));
        match found {
            Some(attr) => reply.entry(&NO_CACHE, &attr, 0),
            None => reply.error(ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        self.gate.pass();
        match self.attr(ino) {
            Some(attr) => reply.attr(&NO_CACHE, &attr),
            None => reply.error(ENOENT),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        self.gate.pass();
        if let Some(size) = size {
            let Some(node) = self.files.get_mut(&ino) else {
                return reply.error(if ino == ROOT { EISDIR } else { ENOENT });
            };
            let Ok(size) = usize::try_from(size) else {
                return reply.error(EFBIG);
            };
            node.data.resize(size, 0);
            node.mtime = SystemTime::now();
        }
        match self.attr(ino) {
            Some(attr) => reply.attr(&NO_CACHE, &attr),
            None => reply.error(ENOENT),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        self.gate.pass();
        if self.files.contains_key(&ino) {
            reply.opened(0, 0);
        } else {
            reply.error(if ino == ROOT { EISDIR } else { ENOENT });
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        self.gate.pass();
        let Some(node) = self.files.get(&ino) else {
            return reply.error(ENOENT);
        };
        let Ok(start) = usize::try_from(offset) else {
            return reply.error(EINVAL);
        };
        let start = start.min(node.data.len());
        let end = start.saturating_add(size as usize).min(node.data.len());
        reply.data(&node.data[start..end]);
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        self.gate.pass();
        let Some(node) = self.files.get_mut(&ino) else {
            return reply.error(ENOENT);
        };
        let Ok(start) = usize::try_from(offset) else {
            return reply.error(EINVAL);
        };
        let end = start.saturating_add(data.len());
        if node.data.len() < end {
            node.data.resize(end, 0);
        }
        node.data[start..end].copy_from_slice(data);
        node.mtime = SystemTime::now();
        reply.written(data.len() as u32);
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.gate.pass();
        reply.ok();
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.gate.pass();
        reply.ok();
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        self.gate.pass();
        if ino == ROOT {
            reply.opened(0, 0);
        } else {
            reply.error(nix::libc::ENOTDIR);
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        self.gate.pass();
        if ino != ROOT {
            return reply.error(nix::libc::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, ".".to_owned()),
            (ROOT, FileType::Directory, "..".to_owned()),
        ]
        .into_iter()
        .chain(
            self.files
                .iter()
                .map(|(ino, n)| (*ino, FileType::RegularFile, n.name.clone())),
        );
        for (i, (ino, kind, name)) in entries.enumerate().skip(offset.max(0) as usize) {
            if reply.add(ino, (i + 1) as i64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _flags: i32,
        reply: ReplyEmpty,
    ) {
        self.gate.pass();
        reply.ok();
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: fuser::ReplyStatfs) {
        self.gate.pass();
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }

    fn access(&mut self, _req: &Request<'_>, _ino: u64, _mask: i32, reply: ReplyEmpty) {
        self.gate.pass();
        reply.ok();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

    use super::*;
    use std::io::{Seek, SeekFrom};
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    use std::sync::mpsc::channel;
    use vmlock_sys::ofd::{self, LockKind};

    fn mounted() -> (tempfile::TempDir, HangFs) {
        private_mount_namespace().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let fs = HangFs::mount(dir.path()).unwrap();
        (dir, fs)
    }

    #[test]
    fn serves_a_readable_writable_one_mib_file() {
        let (_dir, fs) = mounted();
        let path = fs.file(DISK_NAME);
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.len(), DISK_SIZE);
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.write_all(b"vmlock").unwrap();
        f.sync_all().unwrap();
        let mut again = std::fs::File::open(&path).unwrap();
        again.seek(SeekFrom::Start(4096)).unwrap();
        let mut buf = [0u8; 6];
        again.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"vmlock");
        assert_eq!(f.metadata().unwrap().ino(), meta.ino());
        let names: Vec<_> = std::fs::read_dir(fs.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![DISK_NAME]);
        assert!(std::fs::metadata(fs.file("absent")).is_err());
    }

    #[test]
    fn ofd_locks_of_two_descriptions_conflict() {
        let (_dir, fs) = mounted();
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(fs.file(DISK_NAME))
                .unwrap()
        };
        let (a, b) = (open(), open());
        assert!(ofd::try_lock(a.as_fd(), LockKind::Exclusive, 0, 1).unwrap());
        assert!(!ofd::try_lock(b.as_fd(), LockKind::Exclusive, 0, 1).unwrap());
        assert!(!ofd::try_lock(b.as_fd(), LockKind::Shared, 0, 1).unwrap());
        assert!(ofd::probe(b.as_fd(), LockKind::Exclusive, 0, 1)
            .unwrap()
            .is_some());
        // Other bytes are free, and closing the holder frees byte 0.
        assert!(ofd::try_lock(b.as_fd(), LockKind::Exclusive, 1, 1).unwrap());
        drop(a);
        assert!(ofd::try_lock(b.as_fd(), LockKind::Exclusive, 0, 1).unwrap());
    }

    #[test]
    fn a_stat_waits_while_hung_and_returns_after_resume() {
        let (_dir, fs) = mounted();
        let path = fs.file(DISK_NAME);
        std::fs::metadata(&path).unwrap();
        fs.hang();
        let (tx, rx) = channel();
        let stat = std::thread::spawn(move || {
            let _ = tx.send(std::fs::metadata(&path).map(|m| m.len()));
        });
        assert!(
            fs.wait_held(1, Duration::from_secs(5)),
            "the stat never reached the filesystem"
        );
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "stat returned while the filesystem hangs"
        );
        assert_eq!(fs.blocked(), 1);
        fs.resume();
        let len = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("stat still stuck after resume")
            .unwrap();
        assert_eq!(len, DISK_SIZE);
        stat.join().unwrap();
    }

    #[test]
    fn closing_a_description_or_spawning_a_process_never_waits_on_a_hung_fs() {
        let (_dir, fs) = mounted();
        let file = std::fs::File::open(fs.file(DISK_NAME)).unwrap();
        let copy = file.try_clone().unwrap();
        fs.hang();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            // The child gets copies of both descriptions and closes them at its exec.
            let status = std::process::Command::new("true").status().unwrap();
            drop(file);
            let _ = tx.send(status.success());
        });
        assert!(rx
            .recv_timeout(Duration::from_secs(5))
            .expect("a close or an exec waited on the hung filesystem"));
        drop(copy);
    }

    #[test]
    fn dropping_a_hung_fs_frees_its_waiters_and_unmounts() {
        let (dir, fs) = mounted();
        let path = fs.file(DISK_NAME);
        let file = std::fs::File::open(&path).unwrap();
        fs.hang();
        let (tx, rx) = channel();
        let opener = std::thread::spawn(move || {
            let _ = tx.send(std::fs::File::open(&path).is_ok());
        });
        assert!(fs.wait_held(1, Duration::from_secs(5)));
        drop(fs);
        rx.recv_timeout(Duration::from_secs(5))
            .expect("an open still hangs after the drop");
        opener.join().unwrap();
        // The mount point is an empty directory again; the description opened before answers
        // (with an error: the filesystem is gone) instead of hanging.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let _ = tx.send(file.metadata().is_ok());
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("an fstat on the ended filesystem hangs");
    }
}
