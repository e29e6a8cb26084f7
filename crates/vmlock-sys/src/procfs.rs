//! Reading other processes from `/proc`: naming processes that hold locks on a file, and
//! finding QEMU processes with the disk images they have open for writing (`vmlock audit`).

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// One lock line from an fdinfo file: `lock: 1: OFDLCK ADVISORY READ -1 fe:00:1234 100 101`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdLock {
    /// `WRITE` or `READ`.
    pub write: bool,
    /// First byte.
    pub start: u64,
    /// Last byte (`EOF` maps to `u64::MAX`).
    pub end: u64,
    /// The locked file's device (`st_dev`) and inode, from the line's `maj:min:ino`.
    pub file: (u64, u64),
}

/// A process holding locks on the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHolder {
    /// Its pid.
    pub pid: u32,
    /// Its locks on the file.
    pub locks: Vec<FdLock>,
}

/// Parses the `lock:` lines of an fdinfo file.
pub fn parse_fdinfo_locks(text: &str) -> Vec<FdLock> {
    text.lines()
        .filter_map(|l| l.strip_prefix("lock:"))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // [id:, OFDLCK|POSIX|FLOCK, ADVISORY, READ|WRITE, pid, maj:min:ino, start, end]
            let start = f.get(6)?.parse().ok()?;
            let end = match *f.get(7)? {
                "EOF" => u64::MAX,
                n => n.parse().ok()?,
            };
            let mut file = f.get(5)?.split(':');
            let major = u64::from_str_radix(file.next()?, 16).ok()?;
            let minor = u64::from_str_radix(file.next()?, 16).ok()?;
            let ino = file.next()?.parse().ok()?;
            Some(FdLock {
                write: *f.get(3)? == "WRITE",
                start,
                end,
                file: (nix::sys::stat::makedev(major, minor), ino),
            })
        })
        .collect()
}

/// Every process (other than `except`) with a descriptor on the inode `(dev, ino)` that holds
/// a lock overlapping `[start, end]`. Best effort: processes that vanish or deny access are skipped.
///
/// Reads only `/proc/PID/fdinfo/*`, whose lock lines name the locked file by device and inode:
/// never a `stat` through `/proc/PID/fd/*`, which goes to each file's own file system and waits
/// forever on a hung mount (an NFS server gone, a FUSE daemon stuck) that any process on the host
/// has a descriptor on.
pub fn lock_holders(dev: u64, ino: u64, start: u64, end: u64, except: u32) -> Vec<LockHolder> {
    let mut found = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return found;
    };
    let wanted = format!("ino:\t{ino}\n");
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == except {
            continue;
        }
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
            continue;
        };
        let mut locks = Vec::new();
        for fd in fds.flatten() {
            let Ok(info) = fs::read_to_string(fd.path()) else {
                continue;
            };
            // Most descriptors are not on this inode: skip them before parsing.
            if !info.contains(&wanted) {
                continue;
            }
            locks.extend(
                parse_fdinfo_locks(&info)
                    .into_iter()
                    .filter(|l| l.file == (dev, ino) && l.start <= end && l.end >= start),
            );
        }
        if !locks.is_empty() {
            found.push(LockHolder { pid, locks });
        }
    }
    found
}

/// Whether a process is a QEMU system emulator, from its `comm` and the file name of its
/// executable (either may be missing: `comm` is renamed by `-name ...,process=X`, and `exe` is
/// unreadable without ptrace rights over the process).
pub fn is_qemu(comm: Option<&str>, exe: Option<&Path>) -> bool {
    let qemu = |name: &str| name.starts_with("qemu-system") || name.starts_with("qemu-kvm");
    // comm is cut to 15 bytes ("qemu-system-x86"), which the prefix still matches.
    comm.is_some_and(|c| qemu(c.trim_end()))
        || exe
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .is_some_and(qemu)
}

/// The pids of every QEMU process on the host (thread-group leaders only, as `/proc` lists
/// them). An error only if `/proc` itself cannot be read; processes that vanish are skipped.
pub fn qemu_pids() -> io::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if is_qemu_pid(pid) {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    Ok(pids)
}

/// Whether `pid` is (still) a QEMU process.
pub fn is_qemu_pid(pid: u32) -> bool {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok();
    let exe = fs::read_link(format!("/proc/{pid}/exe")).ok();
    // Not a process at all (gone, or a kernel thread without comm): not QEMU.
    (comm.is_some() || exe.is_some()) && is_qemu(comm.as_deref(), exe.as_deref())
}

/// A process's arguments from `/proc/PID/cmdline` (lossy UTF-8).
pub fn cmdline(pid: u32) -> io::Result<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline"))?;
    Ok(raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect())
}

/// The `flags:` line of an fdinfo file (octal, as the kernel prints it).
pub fn parse_fdinfo_flags(text: &str) -> Option<u32> {
    let flags = text.lines().find_map(|l| l.strip_prefix("flags:"))?;
    u32::from_str_radix(flags.trim(), 8).ok()
}

/// Whether lock lines hold any of QEMU's image-locking bytes (100–104 for the permissions it
/// holds, 200–204 for those it refuses to share; the range is kept to 100–299 for newer
/// permissions).
fn has_qemu_image_locks(locks: &[FdLock]) -> bool {
    locks.iter().any(|l| l.start >= 100 && l.end < 300)
}

/// A disk image a process has open for writing, as `/proc/PID/fd` and `fdinfo` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WritableDisk {
    /// The lowest descriptor number on it (a process may open one image more than once).
    pub fd: u32,
    /// The path the kernel prints for it, in the process's mount namespace.
    pub path: PathBuf,
    /// `st_dev` of the inode.
    pub dev: u64,
    /// `st_ino` of the inode.
    pub ino: u64,
    /// For a block device, the device it stands for (`st_rdev`).
    pub block_device: Option<u64>,
    /// A descriptor on it holds QEMU's image-locking bytes (QEMU's `locking=on`/`auto`).
    pub qemu_image_locks: bool,
}

/// Paths that are never disk images, whatever their file type.
fn pseudo_path(path: &Path) -> bool {
    ["/proc", "/sys", "/dev/shm", "/dev/hugepages"]
        .iter()
        .any(|p| path.starts_with(p))
}

/// hugetlbfs: guest RAM backing files (`memory-backend-file`), never disks.
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// A descriptor `pid` has open read-write on an absolute path, as `/proc` alone tells it; whether
/// it is a disk is for [`OpenDescriptor::inspect`] to find on the file itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenDescriptor {
    /// Its process.
    pub pid: u32,
    /// Its number.
    pub fd: u32,
    /// The path the kernel prints for it.
    pub path: PathBuf,
    /// It holds QEMU's image-locking bytes.
    qemu_image_locks: bool,
}

/// The read-write descriptors of `pid` on absolute paths outside `/proc`, `/sys`, `/dev/shm`
/// and memfds, sorted by number: the first step to the disk images it has open for writing.
/// Reads `/proc` only (the descriptor list, each link's text and `fdinfo`), never the files: it
/// answers even when their storage does not.
///
/// Why `O_RDWR` only: QEMU's block layer opens a writable image `O_RDWR` (formats read their
/// metadata back), while its other writable files — `-pidfile`, the `-D` log, `file:` chardevs,
/// trace output — are opened `O_WRONLY`; counting those would report every pid file as an
/// unprotected disk. Why not require QEMU's lock bytes: a QEMU with `locking=off` is exactly
/// the writer an audit must find.
///
/// Errors: the process's descriptors cannot be listed (`NotFound` when it has exited,
/// `PermissionDenied` without rights over it). Descriptors closed while being read are skipped.
pub fn read_write_descriptors(pid: u32) -> io::Result<Vec<OpenDescriptor>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // Sockets, pipes and anon inodes read "socket:[N]" etc.; memfds "/memfd:NAME (deleted)".
        // (Reading the link prints the path the kernel keeps; it does not reach the file.)
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        if !target.is_absolute() || target.starts_with("/memfd:") || pseudo_path(&target) {
            continue;
        }
        let Ok(info) = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) else {
            continue;
        };
        let Some(flags) = parse_fdinfo_flags(&info) else {
            continue;
        };
        if flags & (rustix::fs::OFlags::ACCMODE.bits()) != rustix::fs::OFlags::RDWR.bits() {
            continue;
        }
        found.push(OpenDescriptor {
            pid,
            fd,
            path: target,
            qemu_image_locks: has_qemu_image_locks(&parse_fdinfo_locks(&info)),
        });
    }
    found.sort_by_key(|d| d.fd);
    Ok(found)
}

impl OpenDescriptor {
    /// The disk it is on, if it is one: a regular file or block device that still has a name
    /// (an unlinked file, such as `-snapshot`'s temporary overlay, cannot be opened by another
    /// VM, so it needs no lease), not on hugetlbfs (guest RAM). Stats the file through the descriptor's link, so it waits as long as
    /// the file's storage does (a hung NFS or FUSE mount): callers that must answer bound it.
    pub fn inspect(&self) -> Option<WritableDisk> {
        let link = format!("/proc/{}/fd/{}", self.pid, self.fd);
        // metadata() follows the magic link to the inode itself.
        let meta = fs::metadata(&link).ok()?;
        let kind = meta.file_type();
        if !(kind.is_file() || kind.is_block_device()) || meta.nlink() == 0 {
            return None;
        }
        if let Ok(fs) = rustix::fs::statfs(link.as_str()) {
            #[allow(clippy::unnecessary_cast)] // f_type's width differs between architectures
            if fs.f_type as i64 == HUGETLBFS_MAGIC {
                return None;
            }
        }
        Some(WritableDisk {
            fd: self.fd,
            path: self.path.clone(),
            dev: meta.dev(),
            ino: meta.ino(),
            block_device: kind.is_block_device().then_some(meta.rdev()),
            qemu_image_locks: self.qemu_image_locks,
        })
    }
}

/// Adds `disk` to `disks`, one entry per inode: a second descriptor on the same inode lowers the
/// entry's descriptor number and adds its lock bytes. Returns whether the inode was new.
pub fn add_disk(disks: &mut Vec<WritableDisk>, disk: WritableDisk) -> bool {
    match disks
        .iter_mut()
        .find(|d| d.dev == disk.dev && d.ino == disk.ino)
    {
        Some(d) => {
            d.fd = d.fd.min(disk.fd);
            d.qemu_image_locks |= disk.qemu_image_locks;
            false
        }
        None => {
            disks.push(disk);
            true
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
    use super::*;

    #[test]
    fn recognises_qemu_by_comm_or_exe() {
        assert!(is_qemu(Some("qemu-system-x86\n"), None));
        assert!(is_qemu(Some("qemu-kvm"), None));
        assert!(is_qemu(
            Some("web1"),
            Some(Path::new("/usr/bin/qemu-system-aarch64"))
        ));
        assert!(!is_qemu(
            Some("qemu-img"),
            Some(Path::new("/usr/bin/qemu-img"))
        ));
        assert!(!is_qemu(Some("bash"), None));
        assert!(!is_qemu(None, None));
    }

    #[test]
    fn parses_fdinfo_flags() {
        assert_eq!(
            parse_fdinfo_flags("pos:\t0\nflags:\t0100002\nmnt_id:\t30\n"),
            Some(0o100002)
        );
        assert_eq!(parse_fdinfo_flags("pos:\t0\n"), None);
    }

    #[test]
    fn finds_this_process_s_read_write_files_only() {
        use std::fs::OpenOptions;
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        let log = dir.path().join("qemu.log");
        let ro = dir.path().join("ro.img");
        let gone = dir.path().join("gone.img");
        std::fs::write(&ro, b"r").unwrap();
        let rw = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&disk)
            .unwrap();
        let _rw_again = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk)
            .unwrap();
        let _wo = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&log)
            .unwrap();
        let _ro = std::fs::File::open(&ro).unwrap();
        let _unlinked = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&gone)
            .unwrap();
        std::fs::remove_file(&gone).unwrap();

        // Both steps, unbounded (the audit bounds the second).
        let writable_disks = |pid: u32| -> io::Result<Vec<WritableDisk>> {
            let mut disks = Vec::new();
            for d in read_write_descriptors(pid)? {
                if let Some(disk) = d.inspect() {
                    let _ = add_disk(&mut disks, disk);
                }
            }
            Ok(disks)
        };
        let mine: Vec<WritableDisk> = writable_disks(std::process::id())
            .unwrap()
            .into_iter()
            .filter(|d| d.path.starts_with(dir.path()))
            .collect();
        let meta = rw.metadata().unwrap();
        assert_eq!(mine.len(), 1, "{mine:?}");
        assert_eq!(mine[0].path, disk);
        assert_eq!((mine[0].dev, mine[0].ino), (meta.dev(), meta.ino()));
        assert_eq!(mine[0].block_device, None);
        assert!(!mine[0].qemu_image_locks);

        // QEMU's permission byte for writing (101), as QEMU takes it.
        use std::os::fd::AsFd;
        assert!(crate::ofd::try_lock(rw.as_fd(), crate::ofd::LockKind::Shared, 101, 1).unwrap());
        let locked = writable_disks(std::process::id()).unwrap();
        assert!(
            locked.iter().any(|d| d.path == disk && d.qemu_image_locks),
            "{locked:?}"
        );
        assert!(matches!(
            writable_disks(u32::MAX).map_err(|e| e.kind()),
            Err(io::ErrorKind::NotFound)
        ));
    }

    #[test]
    fn names_the_holder_of_an_ofd_lock_from_fdinfo_alone() {
        use std::os::fd::AsFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, b"disk").unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        crate::ofd::try_lock(file.as_fd(), crate::ofd::LockKind::Exclusive, 0, 1)
            .unwrap()
            .then_some(())
            .expect("locked");
        let meta = std::fs::metadata(&path).unwrap();
        let me = std::process::id();
        let holders = lock_holders(meta.dev(), meta.ino(), 0, 0, 0);
        let mine = holders
            .iter()
            .find(|h| h.pid == me)
            .expect("this process is named");
        assert!(mine
            .locks
            .iter()
            .all(|l| l.write && l.file == (meta.dev(), meta.ino())));
        // Another byte, another inode, or this process excluded: nobody.
        assert!(lock_holders(meta.dev(), meta.ino(), 5, 9, 0)
            .iter()
            .all(|h| h.pid != me));
        assert!(lock_holders(meta.dev(), meta.ino() + 1, 0, 0, 0)
            .iter()
            .all(|h| h.pid != me));
        assert!(lock_holders(meta.dev(), meta.ino(), 0, 0, me)
            .iter()
            .all(|h| h.pid != me));
    }

    #[test]
    fn parses_qemu_lock_lines() {
        let text = "pos:\t0\nflags:\t02\nlock:\t1: OFDLCK  ADVISORY  READ -1 fe:00:10010648 100 101\nlock:\t2: POSIX  ADVISORY  WRITE 77 fe:00:1 0 EOF\n";
        let l = parse_fdinfo_locks(text);
        assert_eq!(
            l,
            vec![
                FdLock {
                    write: false,
                    start: 100,
                    end: 101,
                    file: (nix::sys::stat::makedev(0xfe, 0), 10010648),
                },
                FdLock {
                    write: true,
                    start: 0,
                    end: u64::MAX,
                    file: (nix::sys::stat::makedev(0xfe, 0), 1),
                },
            ]
        );
    }
}
