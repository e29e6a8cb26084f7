//! Opening a lock target as root without being fooled: only regular files and block devices are
//! disks.
//!
//! The daemon opens whatever path a client names, so the open itself must be harmless whatever
//! sits there. Every target is first reached with `O_PATH` (which never runs a driver's `open`:
//! a FIFO does not block, `/dev/watchdog` is not armed), through `openat2(RESOLVE_NO_MAGICLINKS)`
//! (so `/proc/self/fd/N`, `/proc/PID/fd/N`, `/dev/fd/N` and `/proc/PID/root` cannot hand out the
//! daemon's own descriptors), then identified with `fstat`/`fstatfs` and refused unless it is a
//! regular file or a block device outside the kernel's interface filesystems. Only then is that
//! same inode opened for real, through its `O_PATH` descriptor (by its number in the process's
//! `/proc/self/fd`, a directory opened once), with `O_NONBLOCK | O_NOCTTY | O_CLOEXEC`;
//! `O_NONBLOCK` is cleared afterwards.
//!
//! Refusals are `io::ErrorKind::InvalidInput` with a message naming the file type.

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags, CWD};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Which inode a path reached: what a lock is really on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// For a block device, the device it stands for (`st_rdev`): the same for every node of it.
    pub block_device: Option<u64>,
}

/// Filesystems whose files are kernel interfaces, not storage: a "regular file" there (e.g.
/// `/proc/kcore`, `/proc/self/mem`, a sysfs attribute) is never a disk.
const INTERFACE_FILESYSTEMS: [(i64, &str); 9] = [
    (0x9fa0, "procfs"),
    (0x6265_6572, "sysfs"),
    (0x6462_6720, "debugfs"),
    (0x7472_6163, "tracefs"),
    (0x7363_6673, "securityfs"),
    (0x0027_e0eb, "cgroup"),
    (0x6367_7270, "cgroup2"),
    (0x6265_6570, "configfs"),
    (0xcafe_4a11, "bpffs"),
];

fn refused(path: &Path, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{}: {why}", path.display()),
    )
}

/// The name of a file type in an error.
fn type_name(t: FileType) -> &'static str {
    match t {
        FileType::RegularFile => "regular file",
        FileType::BlockDevice => "block device",
        FileType::Directory => "directory",
        FileType::Fifo => "FIFO (named pipe)",
        FileType::CharacterDevice => "character device",
        FileType::Socket => "socket",
        FileType::Symlink => "symbolic link",
        _ => "file of unknown type",
    }
}

/// `openat2` refusing magic links; on kernels without it (before 5.6), a lexical check.
fn open_no_magic(path: &Path, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
    match rustix::fs::openat2(CWD, path, flags, mode, ResolveFlags::NO_MAGICLINKS) {
        Ok(fd) => Ok(fd),
        Err(rustix::io::Errno::NOSYS) => {
            let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
            for p in [path, canonical.as_path()] {
                if p.starts_with("/proc") || p.starts_with("/dev/fd") {
                    return Err(refused(path, "paths under /proc or /dev/fd are not disks"));
                }
            }
            Ok(rustix::fs::open(path, flags, mode)?)
        }
        Err(rustix::io::Errno::LOOP) => {
            // A symlink loop, or a magic link: tell them apart by trying again (O_PATH only, so
            // the retry opens nothing).
            let magic = rustix::fs::open(path, OFlags::PATH | OFlags::CLOEXEC, Mode::empty());
            if magic.is_ok() {
                return Err(refused(
                    path,
                    "goes through a /proc magic link (a process's descriptors or root); refused",
                ));
            }
            Err(rustix::io::Errno::LOOP.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// Checks that `fd` is a regular file or block device on real storage, and names its inode.
fn check(fd: impl AsFd, path: &Path) -> io::Result<Identity> {
    let fs = rustix::fs::fstatfs(&fd)?;
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between architectures
    let magic = fs.f_type as i64;
    if let Some((_, name)) = INTERFACE_FILESYSTEMS.iter().find(|(m, _)| *m == magic) {
        return Err(refused(
            path,
            format!("is on {name}, a kernel interface, not storage; refused"),
        ));
    }
    let st = rustix::fs::fstat(&fd)?;
    let kind = FileType::from_raw_mode(st.st_mode);
    if !matches!(kind, FileType::RegularFile | FileType::BlockDevice) {
        return Err(refused(
            path,
            format!(
                "is a {}; only regular files and block devices can be locked as disks",
                type_name(kind)
            ),
        ));
    }
    #[allow(clippy::unnecessary_cast)] // st_dev/st_ino widths differ between architectures
    Ok(Identity {
        dev: st.st_dev as u64,
        ino: st.st_ino as u64,
        block_device: (kind == FileType::BlockDevice).then_some(st.st_rdev as u64),
    })
}

/// Reaches `path` without opening its content (`O_PATH`, no magic links) and checks it is a
/// disk. The descriptor pins the inode for [`reopen`].
pub fn identify(path: &Path) -> io::Result<(OwnedFd, Identity)> {
    let fd = open_no_magic(path, OFlags::PATH | OFlags::CLOEXEC, Mode::empty())?;
    let id = check(&fd, path)?;
    Ok((fd, id))
}

/// This process's `/proc/self/fd`, opened once (a path walk through `/proc` less per disk), with
/// the pid it was opened by: a forked child opens its own.
static PROC_SELF_FD: Mutex<Option<(u32, Arc<OwnedFd>)>> = Mutex::new(None);

fn proc_self_fd() -> io::Result<Arc<OwnedFd>> {
    let pid = std::process::id();
    let mut cached = PROC_SELF_FD.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((opened_by, dir)) = cached.as_ref() {
        if *opened_by == pid {
            return Ok(Arc::clone(dir));
        }
    }
    let dir = Arc::new(rustix::fs::open(
        "/proc/self/fd",
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?);
    *cached = Some((pid, Arc::clone(&dir)));
    Ok(dir)
}

/// Opens the inode `pinned` (an `O_PATH` descriptor from [`identify`]) for reading, and writing
/// if `write`, without blocking, and checks it is still `id`.
fn reopen(pinned: &OwnedFd, id: Identity, path: &Path, write: bool) -> io::Result<File> {
    // Reopening through /proc/self/fd/N opens exactly the pinned inode, whatever the path now
    // names.
    let mut flags = OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    flags |= if write { OFlags::RDWR } else { OFlags::RDONLY };
    let name = pinned.as_raw_fd().to_string();
    let file = File::from(rustix::fs::openat(
        &*proc_self_fd()?,
        name.as_str(),
        flags,
        Mode::empty(),
    )?);
    // The same inode, so the same file system: its identity is all there is to compare (no
    // second `fstatfs`, one system call less per disk).
    let st = rustix::fs::fstat(&file)?;
    #[allow(clippy::unnecessary_cast)] // st_dev/st_ino widths differ between architectures
    if (st.st_dev as u64, st.st_ino as u64) != (id.dev, id.ino) {
        return Err(refused(path, "changed while it was being opened"));
    }
    clear_nonblock(&file)?;
    Ok(file)
}

fn clear_nonblock(file: &File) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(file)?;
    rustix::fs::fcntl_setfl(file, flags - OFlags::NONBLOCK)?;
    Ok(())
}

/// Opens an existing disk for locking: read-only, or read-write if `write`. Symlinks are
/// followed; anything but a regular file or block device is refused before it is opened.
pub fn open(path: &Path, write: bool) -> io::Result<(File, Identity)> {
    let (pinned, id) = identify(path)?;
    Ok((reopen(&pinned, id, path, write)?, id))
}

/// Opens a lock file read-write, creating it (`mode`) if it does not exist: lease files and
/// indirect-mode lock files. An existing file must be a regular file or block device.
pub fn open_or_create(path: &Path, mode: u32) -> io::Result<(File, Identity)> {
    // Existing: identify first, so a device node is never opened. Missing: create exclusively
    // (O_EXCL never follows a symlink), then check what was created. A race with another creator
    // goes round again.
    for _ in 0..3 {
        match open(path, true) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            other => return other,
        }
        let flags = OFlags::RDWR
            | OFlags::CREATE
            | OFlags::EXCL
            | OFlags::NONBLOCK
            | OFlags::NOCTTY
            | OFlags::CLOEXEC;
        match open_no_magic(path, flags, Mode::from_raw_mode(mode)) {
            Ok(fd) => {
                let id = check(&fd, path)?;
                let file = File::from(fd);
                clear_nonblock(&file)?;
                return Ok((file, id));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "{}: kept changing between lookup and creation",
            path.display()
        ),
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Runs `f` on a thread and fails the test if it takes more than 5 s (a blocking open).
    fn bounded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the open blocked (more than 5 s)")
    }

    fn refusal(path: &Path) -> String {
        let p = path.to_owned();
        let e = bounded(move || open(&p, false)).expect_err("must be refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        e.to_string()
    }

    #[test]
    fn reopens_go_through_one_proc_directory_and_open_the_pinned_inode() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, b"x").unwrap();
        let (first, id) = open(&disk, true).unwrap();
        let cached = proc_self_fd().unwrap();
        // Replaced after the lookup: the reopen still opens what was pinned, not the new file.
        let (pinned, pinned_id) = identify(&disk).unwrap();
        std::fs::rename(&disk, dir.path().join("old.img")).unwrap();
        std::fs::write(&disk, b"y").unwrap();
        let reopened = reopen(&pinned, pinned_id, &disk, false).unwrap();
        let st = rustix::fs::fstat(&reopened).unwrap();
        assert_eq!((st.st_dev as u64, st.st_ino as u64), (id.dev, id.ino));
        assert!(
            Arc::ptr_eq(&cached, &proc_self_fd().unwrap()),
            "opened once per process"
        );
        drop(first);
    }

    #[test]
    fn a_fifo_without_a_writer_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(refusal(&fifo).contains("FIFO"));
        let p = fifo.clone();
        let e = bounded(move || open_or_create(&p, 0o600)).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
    }

    #[test]
    fn directories_and_character_devices_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(refusal(dir.path()).contains("directory"));
        assert!(refusal(Path::new("/dev/null")).contains("character device"));
        let e = bounded(|| open_or_create(Path::new("/dev/null"), 0o600)).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
    }

    #[test]
    fn the_daemons_own_descriptors_and_proc_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mine");
        std::fs::write(&path, b"x").unwrap();
        // A regular file this process holds open, reached through its descriptor.
        let held = File::open(&path).unwrap();
        let fd = held.as_raw_fd();
        for alias in [format!("/proc/self/fd/{fd}"), format!("/dev/fd/{fd}")] {
            let msg = refusal(Path::new(&alias));
            assert!(msg.contains("magic link"), "{alias}: {msg}");
        }
        let msg = refusal(
            &Path::new("/proc")
                .join(std::process::id().to_string())
                .join("fd/0"),
        );
        assert!(!msg.is_empty());
        assert!(refusal(Path::new("/proc/self/mem")).contains("procfs"));
        assert!(refusal(Path::new("/proc/self/status")).contains("procfs"));
    }

    #[test]
    fn regular_files_and_symlinks_to_them_open_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, b"x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let (a, ida) = open(&path, true).unwrap();
        let (b, idb) = open(&link, false).unwrap();
        assert_eq!(ida, idb, "a symlink reaches the same inode");
        for f in [&a, &b] {
            let flags = rustix::fs::fcntl_getfl(f).unwrap();
            assert!(!flags.contains(OFlags::NONBLOCK), "O_NONBLOCK is cleared");
            let fdflags = rustix::io::fcntl_getfd(f).unwrap();
            assert!(fdflags.contains(rustix::io::FdFlags::CLOEXEC));
        }
        // Opened for writing only when asked.
        assert!(rustix::fs::fcntl_getfl(&b)
            .unwrap()
            .contains(OFlags::RDONLY));
        use std::io::Write;
        assert!((&b).write(b"y").is_err());
        assert!((&a).write(b"y").is_ok());
    }

    #[test]
    fn open_or_create_creates_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lease");
        let (_, first) = open_or_create(&path, 0o600).unwrap();
        let (_, again) = open_or_create(&path, 0o600).unwrap();
        assert_eq!(first, again);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
