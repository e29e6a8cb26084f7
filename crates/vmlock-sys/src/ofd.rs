//! Open-file-description byte-range locks (`F_OFD_SETLK`/`F_OFD_GETLK`).
//!
//! OFD locks belong to the open file description, not to the process: a description shared by
//! `dup`, `fork` or `SCM_RIGHTS` keeps its locks as long as any copy is open, and two descriptions
//! of the same file conflict even inside one process. They also conflict with classic POSIX locks
//! (virtlockd's) and are what QEMU uses for its image bytes, so all three see each other.

use nix::fcntl::{fcntl, FcntlArg};
use nix::libc;
use std::os::fd::{AsRawFd, BorrowedFd};

/// The lock a description holds or asks for on one byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// `F_RDLCK`: shared.
    Shared,
    /// `F_WRLCK`: exclusive.
    Exclusive,
}

/// Who holds a conflicting lock, as `F_OFD_GETLK` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict {
    /// The conflicting lock's kind.
    pub kind: LockKind,
    /// The holder's pid for a POSIX lock; `None` for an OFD lock (the kernel reports -1).
    pub posix_pid: Option<u32>,
}

fn flock(l_type: libc::c_int, start: u64, len: u64) -> libc::flock {
    libc::flock {
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start as libc::off_t,
        l_len: len as libc::off_t,
        l_pid: 0,
    }
}

fn lock_type(kind: LockKind) -> libc::c_int {
    match kind {
        LockKind::Shared => libc::F_RDLCK,
        LockKind::Exclusive => libc::F_WRLCK,
    }
}

/// Takes `kind` on `[start, start+len)` without waiting. `Ok(false)` means another description
/// holds a conflicting lock.
pub fn try_lock(fd: BorrowedFd<'_>, kind: LockKind, start: u64, len: u64) -> std::io::Result<bool> {
    let lock = flock(lock_type(kind), start, len);
    match fcntl(fd.as_raw_fd(), FcntlArg::F_OFD_SETLK(&lock)) {
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EACCES) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Drops this description's lock on `[start, start+len)` (`len` 0: to the end of any file), for
/// every copy of the description.
pub fn unlock(fd: BorrowedFd<'_>, start: u64, len: u64) -> std::io::Result<()> {
    let lock = flock(libc::F_UNLCK, start, len);
    fcntl(fd.as_raw_fd(), FcntlArg::F_OFD_SETLK(&lock))?;
    Ok(())
}

/// Reports a lock held by *another* description that would conflict with `kind` on the range.
pub fn probe(
    fd: BorrowedFd<'_>,
    kind: LockKind,
    start: u64,
    len: u64,
) -> std::io::Result<Option<Conflict>> {
    let mut lock = flock(lock_type(kind), start, len);
    fcntl(fd.as_raw_fd(), FcntlArg::F_OFD_GETLK(&mut lock))?;
    let found = lock.l_type as libc::c_int;
    if found == libc::F_UNLCK {
        return Ok(None);
    }
    Ok(Some(Conflict {
        kind: if found == libc::F_WRLCK {
            LockKind::Exclusive
        } else {
            LockKind::Shared
        },
        posix_pid: u32::try_from(lock.l_pid).ok().filter(|p| *p > 0),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::os::fd::AsFd;

    #[test]
    fn two_descriptions_in_one_process_conflict_and_dup_shares() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        std::fs::write(&path, b"x").unwrap();
        let a = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let b = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        assert!(try_lock(a.as_fd(), LockKind::Exclusive, 0, 1).unwrap());
        assert!(!try_lock(b.as_fd(), LockKind::Exclusive, 0, 1).unwrap());
        assert_eq!(
            probe(b.as_fd(), LockKind::Shared, 0, 1)
                .unwrap()
                .unwrap()
                .posix_pid,
            None
        );
        let a2 = a.try_clone().unwrap();
        drop(a);
        assert!(
            !try_lock(b.as_fd(), LockKind::Exclusive, 0, 1).unwrap(),
            "a dup keeps the lock"
        );
        unlock(a2.as_fd(), 0, 1).unwrap();
        assert!(try_lock(b.as_fd(), LockKind::Shared, 0, 1).unwrap());
        // QEMU's bytes are untouched by a byte-0 lock.
        assert!(probe(a2.as_fd(), LockKind::Exclusive, 100, 1)
            .unwrap()
            .is_none());
    }
}
