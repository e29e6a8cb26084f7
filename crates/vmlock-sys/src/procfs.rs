//! Naming processes that hold locks on a file, from `/proc/PID/fd` and `/proc/PID/fdinfo`.

use std::fs;
use std::os::unix::fs::MetadataExt;

/// One lock line from an fdinfo file: `lock: 1: OFDLCK ADVISORY READ -1 fe:00:1234 100 101`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdLock {
    /// `WRITE` or `READ`.
    pub write: bool,
    /// First byte.
    pub start: u64,
    /// Last byte (`EOF` maps to `u64::MAX`).
    pub end: u64,
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
            Some(FdLock {
                write: *f.get(3)? == "WRITE",
                start,
                end,
            })
        })
        .collect()
}

/// Every process (other than `except`) with a descriptor on the inode `(dev, ino)` that holds
/// a lock overlapping `[start, end]`. Best effort: processes that vanish or deny access are skipped.
pub fn lock_holders(dev: u64, ino: u64, start: u64, end: u64, except: u32) -> Vec<LockHolder> {
    let mut found = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return found;
    };
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
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let mut locks = Vec::new();
        for fd in fds.flatten() {
            let Ok(meta) = fs::metadata(fd.path()) else {
                continue;
            };
            if meta.dev() != dev || meta.ino() != ino {
                continue;
            }
            let Ok(info) = fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            )) else {
                continue;
            };
            locks.extend(
                parse_fdinfo_locks(&info)
                    .into_iter()
                    .filter(|l| l.start <= end && l.end >= start),
            );
        }
        if !locks.is_empty() {
            found.push(LockHolder { pid, locks });
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

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
                    end: 101
                },
                FdLock {
                    write: true,
                    start: 0,
                    end: u64::MAX
                },
            ]
        );
    }
}
