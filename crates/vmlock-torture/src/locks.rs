//! The kernel's own view of byte-range locks, read from `/proc` without any of vmlock's code: the
//! oracle must not share a bug with what it checks.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A file as `/proc/locks` names it: device major, minor, inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    /// Device major number.
    pub major: u32,
    /// Device minor number.
    pub minor: u32,
    /// Inode number.
    pub ino: u64,
}

impl FileId {
    /// The id of the file at `path`.
    pub fn of(path: &Path) -> io::Result<Self> {
        Ok(Self::from_metadata(&std::fs::metadata(path)?))
    }

    /// The id of a file from its metadata.
    pub fn from_metadata(m: &std::fs::Metadata) -> Self {
        let dev = m.dev();
        FileId {
            major: rustix::fs::major(dev),
            minor: rustix::fs::minor(dev),
            ino: m.ino(),
        }
    }
}

/// Parses one lock line of `/proc/locks` (or the part after `lock:` in `/proc/PID/fdinfo/FD`):
/// `1: OFDLCK ADVISORY  WRITE -1 fc:00:1234 0 0`. Returns the file of an OFD lock that covers
/// byte 0 (vmlock's lock byte); `None` for other locks and for blocked waiters (`->`).
pub fn ofd_byte0(line: &str) -> Option<FileId> {
    let mut fields = line.split_whitespace();
    let _id = fields.next()?;
    let kind = fields.next()?;
    if kind != "OFDLCK" {
        return None;
    }
    let _advisory = fields.next()?;
    let _rw = fields.next()?;
    let _pid = fields.next()?;
    let file = fields.next()?;
    let start: u64 = fields.next()?.parse().ok()?;
    if start != 0 {
        return None;
    }
    let mut parts = file.split(':');
    let major = u32::from_str_radix(parts.next()?, 16).ok()?;
    let minor = u32::from_str_radix(parts.next()?, 16).ok()?;
    let ino = parts.next()?.parse().ok()?;
    Some(FileId { major, minor, ino })
}

/// Whether another description holds a lock on byte 0 of `file` (`F_OFD_GETLK` asked through
/// `file`'s own description, which must hold none). Atomic, unlike a read of `/proc/locks`.
pub fn byte0_locked(file: &std::fs::File) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: `flock` is a plain C struct; all zeroes is a valid value of it.
    let mut probe: nix::libc::flock = unsafe { std::mem::zeroed() };
    probe.l_type = nix::libc::F_WRLCK as i16;
    probe.l_whence = nix::libc::SEEK_SET as i16;
    probe.l_start = 0;
    probe.l_len = 1;
    nix::fcntl::fcntl(
        file.as_raw_fd(),
        nix::fcntl::FcntlArg::F_OFD_GETLK(&mut probe),
    )?;
    Ok(probe.l_type != nix::libc::F_UNLCK as i16)
}

/// Whether byte 0 of the file at `path` is locked by anyone (opened read-only for the question).
pub fn path_locked(path: &Path) -> io::Result<bool> {
    byte0_locked(&std::fs::File::open(path)?)
}

/// Every file with an OFD lock on byte 0, from `/proc/locks`. A snapshot only when the text fits
/// in one `read`: `/proc/locks` is a `seq_file` read by position, so a lock released between two
/// reads makes the next read start one line late and skip a lock that still exists. Confirm a
/// missing lock with [`byte0_locked`].
pub fn locked_files() -> io::Result<HashSet<FileId>> {
    use std::io::Read;
    // One large read: as much of the list as possible in one pass of the kernel's iterator.
    let mut buf = vec![0u8; 1 << 20];
    let mut f = std::fs::File::open("/proc/locks")?;
    let mut len = 0;
    loop {
        let n = f.read(&mut buf[len..])?;
        if n == 0 || len + n == buf.len() {
            len += n;
            break;
        }
        len += n;
    }
    let text = String::from_utf8_lossy(&buf[..len]);
    Ok(text.lines().filter_map(ofd_byte0).collect())
}

/// The files on which process `pid` keeps a description that holds an OFD lock on byte 0 (from
/// `/proc/PID/fdinfo`: an OFD lock is listed under every descriptor of its description). Empty if
/// the process is gone.
pub fn locked_by_process(pid: u32) -> HashSet<FileId> {
    let mut out = HashSet::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        out.extend(
            text.lines()
                .filter_map(|l| l.strip_prefix("lock:"))
                .filter_map(ofd_byte0),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ofd_lines() {
        assert_eq!(
            ofd_byte0("1: OFDLCK ADVISORY  WRITE -1 fc:01:1234 0 0"),
            Some(FileId {
                major: 0xfc,
                minor: 1,
                ino: 1234
            })
        );
        assert_eq!(
            ofd_byte0("2: POSIX  ADVISORY  WRITE 77 fc:01:1234 0 0"),
            None
        );
        assert_eq!(
            ofd_byte0("3: OFDLCK ADVISORY  READ -1 fc:01:1234 101 101"),
            None
        );
        assert_eq!(
            ofd_byte0("1: -> OFDLCK ADVISORY  WRITE -1 fc:01:1234 0 0"),
            None
        );
    }
}
