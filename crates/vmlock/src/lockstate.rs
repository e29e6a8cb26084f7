//! The opaque lock state that release, inquire and migration hand out, and acquire takes back.
//!
//! It is one printable line safe to put inside XML attributes and JSON strings unescaped:
//! `vmlock1;DRIVER;ENTRY;ENTRY...` where an entry is `d:PATH:MODE:VERSION` for a disk or
//! `l:LOCKSPACE:KEY:PATH:OFFSET:VERSION` for a lease, and at most one `t:TOKEN`, a migration's
//! hand-over secret. Every field is percent-encoded outside
//! `[A-Za-z0-9/._-]`, so `;`, `:`, `<`, `&`, `"` and spaces never appear raw. The driver name travels
//! in every state, so a destination on another driver is refused even when there are no leases.

use crate::error::{Error, Result};
use crate::resource::{DiskMode, Lease, Resource};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

const MAGIC: &str = "vmlock1";
/// Longest state accepted (64 disks of 4 KiB paths fit easily).
pub const MAX_STATE_LEN: usize = 1 << 20;

/// One held resource and the version (fencing token) it was held at.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StateEntry {
    /// The resource.
    pub resource: Resource,
    /// The lease version: grows each time another owner takes the resource. 0 where the driver
    /// keeps no versions.
    pub version: u64,
}

/// A driver's lock state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockState {
    /// The driver that produced it.
    pub driver: String,
    /// What was held.
    pub entries: Vec<StateEntry>,
    /// A migration's hand-over secret (`t:` entry): handed out by the source's prepare, required
    /// from the destination, so knowing the versions (which `status` shows) is not enough to take
    /// a running VM's locks over. `None` where the driver uses none.
    pub handover: Option<String>,
}

impl LockState {
    /// An empty state of `driver`.
    pub fn empty(driver: &str) -> Self {
        LockState {
            driver: driver.to_owned(),
            entries: Vec::new(),
            handover: None,
        }
    }

    /// Refuses a state produced by another driver.
    pub fn check_driver(&self, expected: &str) -> Result<()> {
        if self.driver == expected {
            Ok(())
        } else {
            Err(Error::DriverMismatch {
                expected: expected.to_owned(),
                found: self.driver.clone(),
            })
        }
    }
}

impl fmt::Display for LockState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{MAGIC};{}", encode(&self.driver))?;
        for e in &self.entries {
            match &e.resource {
                Resource::Disk { path, mode } => write!(
                    f,
                    ";d:{}:{}:{}",
                    encode(&path.to_string_lossy()),
                    mode,
                    e.version
                )?,
                Resource::Lease(l) => write!(
                    f,
                    ";l:{}:{}:{}:{}:{}",
                    encode(&l.lockspace),
                    encode(&l.key),
                    encode(&l.path.to_string_lossy()),
                    l.offset,
                    e.version
                )?,
            }
        }
        if let Some(t) = &self.handover {
            write!(f, ";t:{}", encode(t))?;
        }
        Ok(())
    }
}

impl FromStr for LockState {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| Error::InvalidLockState {
            reason: reason.to_owned(),
        };
        if s.len() > MAX_STATE_LEN {
            return Err(bad("longer than 1 MiB"));
        }
        let mut parts = s.trim().split(';');
        if parts.next() != Some(MAGIC) {
            return Err(bad(
                "not a vmlock lock state (expected it to start with \"vmlock1;\")",
            ));
        }
        let driver = decode(parts.next().ok_or_else(|| bad("driver name missing"))?)?;
        if driver.is_empty() {
            return Err(bad("driver name missing"));
        }
        let mut entries = Vec::new();
        let mut handover = None;
        for part in parts {
            let fields: Vec<&str> = part.split(':').collect();
            let entry = match fields.as_slice() {
                ["t", token] if handover.is_none() => {
                    handover = Some(decode(token)?);
                    continue;
                }
                ["d", path, mode, version] => {
                    let mode = match *mode {
                        "exclusive" => DiskMode::Exclusive,
                        "shared" => DiskMode::Shared,
                        "readonly" => DiskMode::ReadOnly,
                        _ => return Err(bad("unknown disk mode")),
                    };
                    StateEntry {
                        resource: Resource::disk(PathBuf::from(decode(path)?), mode)?,
                        version: parse_version(version)?,
                    }
                }
                ["l", lockspace, key, path, offset, version] => {
                    let offset = offset
                        .parse()
                        .map_err(|_| bad("lease offset is not a number"))?;
                    let lease = Resource::Lease(Lease {
                        lockspace: decode(lockspace)?,
                        key: decode(key)?,
                        path: PathBuf::from(decode(path)?),
                        offset,
                    });
                    lease.validate()?;
                    StateEntry {
                        resource: lease,
                        version: parse_version(version)?,
                    }
                }
                _ => return Err(bad("malformed entry")),
            };
            entries.push(entry);
        }
        Ok(LockState {
            driver,
            entries,
            handover,
        })
    }
}

fn parse_version(v: &str) -> Result<u64> {
    v.parse().map_err(|_| Error::InvalidLockState {
        reason: format!("version \"{v}\" is not a number"),
    })
}

fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-')
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if is_plain(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode(s: &str) -> Result<String> {
    let bad = || Error::InvalidLockState {
        reason: format!("bad percent-encoding in \"{s}\""),
    };
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3).ok_or_else(bad)?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
                i += 3;
            }
            b if is_plain(b) => {
                out.push(b);
                i += 1;
            }
            _ => return Err(bad()),
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LockState {
        LockState {
            driver: "lockd".into(),
            entries: vec![
                StateEntry {
                    resource: Resource::disk("/images/a b;<c>&\"d\".qcow2", DiskMode::Exclusive)
                        .unwrap(),
                    version: 7,
                },
                StateEntry {
                    resource: Resource::lease("LS", "vm-1", "/leases/ls", 1 << 20).unwrap(),
                    version: 2,
                },
            ],
            handover: Some("5f0c6e1d;<x>".into()),
        }
    }

    #[test]
    fn round_trips_and_is_safe_in_xml_and_json() {
        let s = sample().to_string();
        for c in ['<', '>', '&', '"', '\'', ' ', '\\', '\n'] {
            assert!(!s.contains(c), "{c:?} in {s}");
        }
        assert_eq!(s.parse::<LockState>().unwrap(), sample());
    }

    #[test]
    fn refuses_garbage_and_other_formats() {
        for bad in [
            "",
            "sanlock-state",
            "vmlock1",
            "vmlock1;;",
            "vmlock1;x;d:/a:weird:1",
            "vmlock1;x;d:rel:exclusive:1",
            "vmlock1;x;d:/a:exclusive:-1",
            "vmlock1;x;d:/a%zz:exclusive:1",
        ] {
            assert!(bad.parse::<LockState>().is_err(), "{bad}");
        }
    }

    #[test]
    fn detects_driver_mismatch() {
        let e = sample().check_driver("sanlock").unwrap_err();
        assert!(matches!(e, Error::DriverMismatch { .. }));
        assert!(e.to_string().contains("lockd") && e.to_string().contains("sanlock"));
    }

    proptest::proptest! {
        #[test]
        fn any_disk_path_round_trips(name in "[^\u{0}/]{1,40}", version in 0u64..u64::MAX) {
            let Ok(resource) = Resource::disk(format!("/d/{name}"), DiskMode::Shared) else {
                return Ok(());
            };
            let state = LockState { driver: "nop".into(), entries: vec![StateEntry { resource, version }], handover: None };
            let text = state.to_string();
            proptest::prop_assert_eq!(text.parse::<LockState>().unwrap(), state);
        }

        #[test]
        fn parse_never_panics(s in "\\PC*") { let _ = s.parse::<LockState>(); }
    }
}
