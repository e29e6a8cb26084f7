//! Handing a VM's lock descriptions down from a guest that took them itself to the child that
//! takes over as its holder (libvirt's pre-exec child to `vmlock libvirt holder`).
//!
//! One line on a socket pair: `TAKE <locks as JSON>`, with one description per lock attached in
//! the same order (in pieces of at most [`vmlock_sys::fdpass::MAX_FDS`]). The sender side keeps
//! the holder contract of [`crate::holder`]: no thread, no lock, bounded waits; it allocates.

use crate::proto::HeldLock;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;
use vmlock::Error;

/// The longest hand-down line read (a JSON lock is about 200 bytes; 64 MiB is far beyond any VM).
const MAX_LINE: usize = 64 << 20;

/// The most a hand-down may take of a socket pair's buffer for [`fits_unread`]: a quarter of the
/// default 208 KiB, leaving room for the kernel's own per-message overhead.
const UNREAD_LIMIT: usize = 52 * 1024;

/// Whether [`send`] of `locks` completes with nobody reading the other end yet: one message of
/// descriptions, and a line that fits well within a socket pair's default buffer. (Otherwise the
/// receiver must be reading while it is sent.)
pub fn fits_unread(locks: &[HeldLock]) -> bool {
    locks.len() <= vmlock_sys::fdpass::MAX_FDS
        && serde_json::to_vec(locks).is_ok_and(|json| json.len() + 8 <= UNREAD_LIMIT)
}

/// Sends `locks` with their descriptions `fds` (same order), waiting at most `timeout` for room.
pub fn send(
    stream: &UnixStream,
    locks: &[HeldLock],
    fds: &[OwnedFd],
    timeout: Duration,
) -> Result<(), Error> {
    if locks.len() != fds.len() {
        return Err(Error::Protocol {
            reason: format!("{} locks but {} descriptions", locks.len(), fds.len()),
        });
    }
    let json = serde_json::to_string(locks).map_err(|e| Error::Protocol {
        reason: format!("encoding the locks handed down: {e}"),
    })?;
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    // One byte of padding per piece, so every piece has a byte to carry its descriptors on.
    let pieces = raw.len().div_ceil(vmlock_sys::fdpass::MAX_FDS).max(1);
    let line = format!("TAKE {json}{}\n", " ".repeat(pieces));
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| Error::io("hand-down socket", &e))?;
    vmlock_sys::fdpass::send_with_fds(stream, line.as_bytes(), &raw)
        .map_err(|e| Error::io("handing the lock descriptions down", &e))
}

/// Receives what [`send`] sent, waiting at most `timeout` between pieces. The descriptions come
/// close-on-exec.
pub fn receive(
    stream: &UnixStream,
    timeout: Duration,
) -> Result<(Vec<HeldLock>, Vec<OwnedFd>), Error> {
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| Error::io("hand-down socket", &e))?;
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let end = loop {
        let n = match vmlock_sys::fdpass::recv_with_fds(stream, &mut buf, &mut fds, false) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("receiving the lock descriptions handed down", &e)),
        };
        if n == 0 {
            return Err(Error::Protocol {
                reason: "the hand-down ended before its line did".into(),
            });
        }
        line.extend_from_slice(&buf[..n]);
        if let Some(end) = line.iter().position(|b| *b == b'\n') {
            break end;
        }
        if line.len() > MAX_LINE {
            return Err(Error::Protocol {
                reason: "the hand-down line is too long".into(),
            });
        }
    };
    let text = std::str::from_utf8(&line[..end]).map_err(|_| Error::Protocol {
        reason: "the hand-down line is not UTF-8".into(),
    })?;
    let json = text.strip_prefix("TAKE ").ok_or_else(|| Error::Protocol {
        reason: "the hand-down line does not start with TAKE".into(),
    })?;
    let locks: Vec<HeldLock> =
        serde_json::from_str(json.trim_end()).map_err(|e| Error::Protocol {
            reason: format!("the locks handed down: {e}"),
        })?;
    if locks.len() != fds.len() {
        return Err(Error::Protocol {
            reason: format!(
                "{} locks handed down with {} descriptions",
                locks.len(),
                fds.len()
            ),
        });
    }
    Ok((locks, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::LockKey;
    use std::io::Write;

    fn lock(i: u64) -> HeldLock {
        HeldLock {
            resource: vmlock::Resource::Disk {
                path: format!("/images/{i}.qcow2").into(),
                mode: vmlock::DiskMode::Exclusive,
            },
            key: LockKey {
                dev: 1,
                ino: i,
                byte: 0,
            },
        }
    }

    #[test]
    fn more_descriptions_than_one_message_carries_arrive_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let n = vmlock_sys::fdpass::MAX_FDS as u64 + 7;
        let locks: Vec<HeldLock> = (1..=n).map(lock).collect();
        let files: Vec<OwnedFd> = (0..n)
            .map(|_| OwnedFd::from(std::fs::File::open("/dev/null").unwrap()))
            .collect();
        let sender = std::thread::spawn(move || {
            send(&a, &locks, &files, Duration::from_secs(10)).unwrap();
            (locks, files)
        });
        let (got, fds) = receive(&b, Duration::from_secs(10)).unwrap();
        let (sent, files) = sender.join().unwrap();
        assert_eq!(got, sent);
        assert_eq!(fds.len(), files.len());
        for (received, original) in fds.iter().zip(&files) {
            let r = nix::sys::stat::fstat(received.as_raw_fd()).unwrap();
            let o = nix::sys::stat::fstat(original.as_raw_fd()).unwrap();
            assert_eq!((r.st_dev, r.st_ino), (o.st_dev, o.st_ino));
        }
    }

    #[test]
    fn what_fits_unread_is_sent_with_nobody_reading() {
        // The largest hand-down `fits_unread` accepts: as many long-named locks as fit.
        let long = |i: u64| HeldLock {
            resource: vmlock::Resource::Disk {
                path: format!("/{}/{i}.qcow2", "d".repeat(1000)).into(),
                mode: vmlock::DiskMode::Exclusive,
            },
            key: LockKey {
                dev: u64::MAX,
                ino: u64::MAX - i,
                byte: u64::MAX,
            },
        };
        let mut locks: Vec<HeldLock> = Vec::new();
        while fits_unread(&[locks.clone(), vec![long(locks.len() as u64)]].concat()) {
            locks.push(long(locks.len() as u64));
        }
        assert!(locks.len() > 10, "{} locks", locks.len());
        let files: Vec<OwnedFd> = locks
            .iter()
            .map(|_| OwnedFd::from(std::fs::File::open("/dev/null").unwrap()))
            .collect();
        let (a, b) = UnixStream::pair().unwrap();
        // Nobody reads `b` until the send is done: a send that needed a reader times out.
        send(&a, &locks, &files, Duration::from_millis(500)).unwrap();
        let (got, fds) = receive(&b, Duration::from_secs(10)).unwrap();
        assert_eq!((got.len(), fds.len()), (locks.len(), locks.len()));
        // More descriptions than one message carries do not fit, however short.
        let many: Vec<HeldLock> = (0..=vmlock_sys::fdpass::MAX_FDS as u64).map(lock).collect();
        assert!(!fits_unread(&many));
    }

    #[test]
    fn a_short_or_forged_line_is_refused() {
        for text in ["TAKE [", "GIVE []\n", "TAKE [{\"x\":1}]\n"] {
            let (mut a, b) = UnixStream::pair().unwrap();
            a.write_all(text.as_bytes()).unwrap();
            drop(a);
            assert!(receive(&b, Duration::from_secs(5)).is_err(), "{text:?}");
        }
        // Locks without their descriptions.
        let (mut a, b) = UnixStream::pair().unwrap();
        let line = format!("TAKE {}\n", serde_json::to_string(&[lock(1)]).unwrap());
        a.write_all(line.as_bytes()).unwrap();
        assert!(receive(&b, Duration::from_secs(5))
            .unwrap_err()
            .to_string()
            .contains("1 locks handed down with 0"));
        // Nothing at all: bounded.
        let (_a, b) = UnixStream::pair().unwrap();
        assert!(receive(&b, Duration::from_millis(50)).is_err());
    }
}
