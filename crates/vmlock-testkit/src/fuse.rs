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
//! for `FUSE_POSIX_LOCKS`), so they work as on a local filesystem and take no trip here.
//!
//! Dropping a `HangFs` resumes it for good, then detaches the mount (`umount2(MNT_DETACH)`), so a
//! failed test never leaves a hung mount behind. Descriptions still open elsewhere keep working
//! (served by the filesystem's thread) until they close or this process exits, which ends the FUSE
//! connection. Call [`private_mount_namespace`] first to keep the mount out of sight of every
//! process but the test's own.

use fuser::{
    FileAttr, FileType, Filesystem, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request, Session, SessionACL, TimeOrNow,
};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// Size of the default `disk.img`.
pub const DISK_SIZE: u64 = 1 << 20;
/// Name of the default file.
pub const DISK_NAME: &str = "disk.img";

/// How long a drop waits for the filesystem's thread to end after the detach (it ends at once
/// when nothing has a file open on the filesystem any more).
const SESSION_END_WAIT: Duration = Duration::from_millis(500);
/// Entries and attributes are never cached: every lookup and stat reaches the filesystem.
const NO_CACHE: Duration = Duration::ZERO;
const ROOT: u64 = fuser::FUSE_ROOT_ID;

/// Moves the calling thread (and so every thread and process it starts from now on) into a mount
/// namespace of its own whose mounts do not propagate back: a FUSE mount made after this is seen
/// by the test and its children only, and goes away with them. Other threads of the test process
/// keep the host's view. Needs root (`CAP_SYS_ADMIN`).
pub fn private_mount_namespace() -> io::Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(io::Error::from)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(io::Error::from)
}

/// A mounted FUSE filesystem that hangs on command. See the module documentation.
#[derive(Debug)]
pub struct HangFs {
    mountpoint: PathBuf,
    gate: Arc<Gate>,
    session: Option<(JoinHandle<io::Result<()>>, Receiver<()>)>,
    mounted: bool,
}

impl HangFs {
    /// Mounts the filesystem on `dir` (an existing empty directory) with one file,
    /// [`DISK_NAME`], of [`DISK_SIZE`] zero bytes.
    pub fn mount(dir: &Path) -> io::Result<Self> {
        Self::mount_with(dir, &[(DISK_NAME, DISK_SIZE)])
    }

    /// Mounts the filesystem on `dir` with the given regular files (name, size in bytes), all
    /// zero-filled, mode 0600, owned by the caller.
    pub fn mount_with(dir: &Path, files: &[(&str, u64)]) -> io::Result<Self> {
        let gate = Arc::new(Gate::default());
        let fs = MemFs::new(files, Arc::clone(&gate))?;
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
        // From here on, dropping `hang_fs` detaches the mount whatever fails next.
        let mut hang_fs = HangFs {
            mountpoint: dir.to_owned(),
            gate,
            session: None,
            mounted: true,
        };
        let mut session = Session::from_fd(fs, dev, SessionACL::All);
        let (done_tx, done_rx) = channel();
        let thread = std::thread::Builder::new()
            .name("hangfs".into())
            .spawn(move || {
                let r = session.run();
                let _ = done_tx.send(());
                r
            })?;
        hang_fs.session = Some((thread, done_rx));
        // The kernel holds every request until the filesystem answered FUSE_INIT: one stat of the
        // root proves it serves.
        std::fs::metadata(dir)?;
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

    /// Every operation that arrives from now on waits until [`HangFs::resume`] (operations
    /// already answered are not affected).
    pub fn hang(&self) {
        self.gate.set_hung(true);
    }

    /// Answers every waiting operation and serves normally again.
    pub fn resume(&self) {
        self.gate.set_hung(false);
    }

    /// How many operations wait in the filesystem right now (0 or 1: the kernel hands them to
    /// a single thread, the others queue in the kernel).
    pub fn blocked(&self) -> usize {
        self.gate.lock().blocked
    }

    /// How many operations have been held by [`HangFs::hang`] so far, in all.
    pub fn held_so_far(&self) -> u64 {
        self.gate.lock().held
    }

    /// Waits until at least `n` operations in all have been held by [`HangFs::hang`] (counted by
    /// [`HangFs::held_so_far`]), or `timeout` passes. Returns whether they were. This is how a
    /// test knows a process is stuck in the filesystem, without sleeping.
    pub fn wait_held(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.gate.lock();
        while state.held < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .gate
                .cond
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Resumes for good and detaches the mount. Idempotent; also done by drop.
    pub fn unmount(&mut self) -> io::Result<()> {
        {
            let mut state = self.gate.lock();
            state.closed = true;
            state.hung = false;
            self.gate.cond.notify_all();
        }
        if self.mounted {
            self.mounted = false;
            umount2(&self.mountpoint, MntFlags::MNT_DETACH).map_err(io::Error::from)?;
        }
        if let Some((thread, done)) = self.session.take() {
            // The thread ends once the last description on the filesystem is closed. If something
            // still has one open, leave the thread serving it (never hung any more); it ends with
            // the process at the latest.
            if done.recv_timeout(SESSION_END_WAIT).is_ok() {
                let _ = thread.join();
            }
        }
        Ok(())
    }
}

impl Drop for HangFs {
    fn drop(&mut self) {
        let _ = self.unmount();
    }
}

#[derive(Debug, Default)]
struct GateState {
    hung: bool,
    closed: bool,
    blocked: usize,
    held: u64,
}

/// Where every operation passes: it waits here while the filesystem hangs.
#[derive(Debug, Default)]
struct Gate {
    state: Mutex<GateState>,
    cond: Condvar,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_hung(&self, hung: bool) {
        let mut state = self.lock();
        state.hung = hung && !state.closed;
        self.cond.notify_all();
    }

    fn pass(&self) {
        let mut state = self.lock();
        if !state.hung {
            return;
        }
        state.blocked += 1;
        state.held += 1;
        self.cond.notify_all();
        while state.hung {
            state = self.cond.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.blocked -= 1;
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
    gate: Arc<Gate>,
    uid: u32,
    gid: u32,
    born: SystemTime,
}

impl MemFs {
    fn new(files: &[(&str, u64)], gate: Arc<Gate>) -> io::Result<Self> {
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
            gate,
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

    fn flush(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _lock_owner: u64,
        reply: ReplyEmpty,
    ) {
        self.gate.pass();
        reply.ok();
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
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
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
        assert_eq!(fs.blocked(), 0);
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
        // The mount point is an empty directory again; the description opened before still works.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert_eq!(file.metadata().unwrap().len(), DISK_SIZE);
    }
}
