//! sanlock's own view of the leases, read without any of vmlock's code: `sanlock client status`
//! (sanlock's own command-line client) of one daemon, and the lease name of a disk computed here
//! from the naming rule of the `sanlock` driver (docs/sanlock.md: the first 32 hex digits of the
//! SHA-256 of the canonical disk path), so the oracle shares no bookkeeping with what it checks.

use sha2::{Digest, Sha256};
use std::io::{self, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A lease a daemon lists: `r LOCKSPACE:NAME:PATH:OFFSET:LVER p PID [ADD|REM|ORPHAN]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Its lockspace.
    pub lockspace: String,
    /// Its name (a disk lease: [`lease_name`]; a gate: `NAME.gate.src|dst`).
    pub name: String,
    /// The registered client (pid) holding it.
    pub pid: u32,
    /// Granted, or on its way in or out.
    pub state: LeaseState,
}

/// Where a listed lease stands (the word after the pid in `sanlock client status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Granted (no word).
    Held,
    /// `ADD`: an acquire is under way (the daemon lists it while its ballot runs, even while
    /// another host holds the lease); not granted.
    Acquiring,
    /// `REM`: a release is under way.
    Releasing,
    /// `ORPHAN`: kept after its client exited.
    Orphan,
}

/// The lease name the `sanlock` driver gives disk `path`: the first 16 bytes of the SHA-256 of
/// its canonical path, in hex.
pub fn lease_name(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    Sha256::digest(canonical.as_os_str().as_bytes())
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Parses the text of `sanlock client status`: the leases (`r` lines) it lists. `Err` when the
/// text is not a daemon's status (no `daemon` line).
pub fn parse_status(text: &str) -> Result<Vec<Lease>, String> {
    if !text.lines().any(|l| l.starts_with("daemon ")) {
        return Err(format!("not a sanlock status: {:?}", text.trim()));
    }
    let mut leases = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("r ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(res), Some("p"), Some(pid)) = (words.next(), words.next(), words.next()) else {
            return Err(format!("unexpected lease line {line:?}"));
        };
        let state = match words.next() {
            None => LeaseState::Held,
            Some("ADD") => LeaseState::Acquiring,
            Some("REM") => LeaseState::Releasing,
            Some("ORPHAN") => LeaseState::Orphan,
            Some(other) => return Err(format!("unexpected lease state {other:?} in {line:?}")),
        };
        let mut fields = res.split(':');
        let (Some(lockspace), Some(name)) = (fields.next(), fields.next()) else {
            return Err(format!("unexpected lease line {line:?}"));
        };
        let pid = pid
            .parse()
            .map_err(|_| format!("unexpected pid in {line:?}"))?;
        leases.push(Lease {
            lockspace: lockspace.to_owned(),
            name: name.to_owned(),
            pid,
            state,
        });
    }
    Ok(leases)
}

/// `sanlock client status` of the daemon whose run directory is `run_dir`, waiting at most
/// `timeout`; `Err` when the daemon does not answer (gone, or stopped past the bound).
pub fn status(run_dir: &Path, timeout: Duration) -> io::Result<Vec<Lease>> {
    let mut child = Command::new("sanlock")
        .args(["client", "status"])
        .env("SANLOCK_RUN_DIR", run_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    // The status is a few lines: it fits in the pipe, so waiting before reading cannot block.
    let exited = vmlock_testkit::process::wait_child(&mut child, timeout);
    if exited.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("sanlock client status gave no answer within {timeout:?}"),
        ));
    }
    let mut text = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut text)?;
    }
    parse_status(&text).map_err(io::Error::other)
}

/// Whether the `sanlock` program can be run here.
pub fn installed() -> bool {
    Command::new("sanlock")
        .arg("version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_status() {
        let text = "daemon host-a\np -1 helper\np 9589 vm1\ns ls:1:/l/ls:0\nr ls:abc:/l/abc:0:7 p 9589\nr ls:abc.gate.src:/l/abc.gate:0:2 p 12\nr ls:def:/l/def:0:0 p 13 ADD\nr ls:ghi:/l/ghi:0:SH p 14 REM\n";
        let lease = |name: &str, pid, state| Lease {
            lockspace: "ls".into(),
            name: name.into(),
            pid,
            state,
        };
        assert_eq!(
            parse_status(text).unwrap(),
            vec![
                lease("abc", 9589, LeaseState::Held),
                lease("abc.gate.src", 12, LeaseState::Held),
                lease("def", 13, LeaseState::Acquiring),
                lease("ghi", 14, LeaseState::Releasing),
            ]
        );
        assert!(parse_status("daemon x\nr ls:abc:/l/abc:0:1 p 1 WHAT\n").is_err());
        assert!(parse_status("").is_err());
        assert!(parse_status("daemon x\nr ls:abc p\n").is_err());
    }

    #[test]
    fn lease_names_follow_the_drivers_rule() {
        // The independent rule agrees with the driver's (the check, not the oracle, uses it).
        for p in ["/nonexistent/disk.img", "/tmp", "/var/tmp/../tmp"] {
            let p = Path::new(p);
            assert_eq!(lease_name(p), vmlock_sanlock::driver::lease_name(p));
        }
    }
}
