//! What a manager locks: disks by path, and explicit leases (the seed's `RegisterResource`).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

/// How a VM uses a disk, which decides the lock it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DiskMode {
    /// Read-write by this VM alone: an exclusive lock.
    Exclusive,
    /// Read-write by several VMs at once (cluster file systems): a shared lock, which excludes any
    /// exclusive holder.
    Shared,
    /// Read-only: no lock is taken (a read-only open cannot corrupt anything).
    ReadOnly,
}

impl fmt::Display for DiskMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiskMode::Exclusive => "exclusive",
            DiskMode::Shared => "shared",
            DiskMode::ReadOnly => "readonly",
        })
    }
}

/// An explicit lease (libvirt's `<lease>`): a named lock at an offset in a lease file.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Lease {
    /// The lockspace the lease belongs to.
    pub lockspace: String,
    /// The lease's key, unique within its lockspace.
    pub key: String,
    /// The file holding the lease.
    pub path: PathBuf,
    /// Byte offset of the lease in `path`.
    pub offset: u64,
}

/// One lockable thing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Resource {
    /// A disk image or block device, by absolute path.
    Disk {
        /// Absolute path as the VM opens it.
        path: PathBuf,
        /// How the VM uses it.
        mode: DiskMode,
    },
    /// An explicit lease.
    Lease(Lease),
}

impl Resource {
    /// A disk, validated: an absolute path, or a network disk named by identity
    /// (`rbd:POOL/IMAGE`, `iscsi:IQN/LUN`, `nbd:HOST/EXPORT`; see [`Resource::network_id`]).
    pub fn disk(path: impl Into<PathBuf>, mode: DiskMode) -> Result<Self> {
        let path = path.into();
        validate_disk_name(&path, || path.display().to_string())?;
        Ok(Resource::Disk { path, mode })
    }

    /// A network disk's identity (`rbd:pool/image`), when the disk is named by one rather than
    /// by a path: storage no host mounts as a file (Ceph RBD, iSCSI, NBD), which libvirt never
    /// passes to a lock plugin, leased through `vmlock run` and the API by the name every host
    /// uses for it.
    pub fn network_id(&self) -> Option<&str> {
        match self {
            Resource::Disk { path, .. } => path.to_str().filter(|p| is_network_name(p)),
            Resource::Lease(_) => None,
        }
    }

    /// A lease, validated.
    pub fn lease(
        lockspace: &str,
        key: &str,
        path: impl Into<PathBuf>,
        offset: u64,
    ) -> Result<Self> {
        let lease = Lease {
            lockspace: lockspace.to_owned(),
            key: key.to_owned(),
            path: path.into(),
            offset,
        };
        let r = Resource::Lease(lease);
        r.validate()?;
        Ok(r)
    }

    /// Checks the resource as a lock service receives it.
    pub fn validate(&self) -> Result<()> {
        match self {
            Resource::Disk { path, .. } => validate_disk_name(path, || self.to_string()),
            Resource::Lease(l) => {
                for (what, value) in [("lockspace", &l.lockspace), ("key", &l.key)] {
                    if value.is_empty() || value.len() > 255 {
                        return Err(invalid(self, format!("{what} must be 1 to 255 bytes")));
                    }
                    if value.contains(':') || value.chars().any(|c| c.is_control() || c == ' ') {
                        return Err(invalid(
                            self,
                            format!("{what} may not contain ':', spaces or control characters"),
                        ));
                    }
                }
                validate_path(&l.path, || self.to_string())
            }
        }
    }

    /// The name an error uses for this resource: the disk path, or `lease LOCKSPACE:KEY`.
    pub fn label(&self) -> String {
        match self {
            // Validated paths are UTF-8: a plain copy, not a lossy conversion (every grant and
            // release names its disks in an event).
            Resource::Disk { path, .. } => match path.to_str() {
                Some(p) => p.to_owned(),
                None => path.display().to_string(),
            },
            Resource::Lease(l) => format!("lease {}:{}", l.lockspace, l.key),
        }
    }

    /// Whether this resource takes any lock at all (read-only disks take none).
    pub fn is_locked(&self) -> bool {
        !matches!(
            self,
            Resource::Disk {
                mode: DiskMode::ReadOnly,
                ..
            }
        )
    }

    /// The path of the disk or lease file.
    pub fn path(&self) -> &Path {
        match self {
            Resource::Disk { path, .. } => path,
            Resource::Lease(l) => &l.path,
        }
    }

    /// Shared or exclusive; leases are exclusive.
    pub fn mode(&self) -> DiskMode {
        match self {
            Resource::Disk { mode, .. } => *mode,
            Resource::Lease(_) => DiskMode::Exclusive,
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Disk { path, mode } => write!(f, "{} ({mode})", path.display()),
            Resource::Lease(l) => {
                write!(
                    f,
                    "lease {}:{}:{}:{}",
                    l.lockspace,
                    l.key,
                    l.path.display(),
                    l.offset
                )
            }
        }
    }
}

/// Parses the command-line forms `PATH[,shared|,readonly]` (disks) and
/// `LOCKSPACE:KEY:PATH:OFFSET` (leases, through [`Resource::parse_lease`]).
impl FromStr for Resource {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let (path, mode) = match s.rsplit_once(',') {
            Some((p, "shared")) => (p, DiskMode::Shared),
            Some((p, "readonly")) => (p, DiskMode::ReadOnly),
            Some((p, "exclusive")) => (p, DiskMode::Exclusive),
            // Only a bare word after the last comma is a flag; "/img/a,b.qcow2" is a path.
            Some((_, other))
                if !other.is_empty() && other.bytes().all(|b| b.is_ascii_lowercase()) =>
            {
                return Err(Error::InvalidResource {
                    resource: s.to_owned(),
                    reason: format!(
                        "unknown disk flag \"{other}\" (use shared, readonly or exclusive)"
                    ),
                })
            }
            _ => (s, DiskMode::Exclusive),
        };
        Resource::disk(path, mode)
    }
}

impl Resource {
    /// Parses `LOCKSPACE:KEY:PATH:OFFSET`.
    pub fn parse_lease(s: &str) -> Result<Self> {
        let bad = |reason: &str| Error::InvalidResource {
            resource: format!("lease {s}"),
            reason: reason.to_owned(),
        };
        let (rest, offset) = s
            .rsplit_once(':')
            .ok_or_else(|| bad("expected LOCKSPACE:KEY:PATH:OFFSET"))?;
        let offset = offset
            .parse::<u64>()
            .map_err(|_| bad("OFFSET must be a number"))?;
        let mut parts = rest.splitn(3, ':');
        let (Some(lockspace), Some(key), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected LOCKSPACE:KEY:PATH:OFFSET"));
        };
        Resource::lease(lockspace, key, path, offset)
    }
}

/// Schemes of disks named by identity (see [`Resource::network_id`]).
pub const NETWORK_SCHEMES: [&str; 3] = ["rbd", "iscsi", "nbd"];

/// Whether `name` has the form `SCHEME:REST` with a known scheme (not checked further).
fn is_network_name(name: &str) -> bool {
    name.split_once(':')
        .is_some_and(|(scheme, _)| NETWORK_SCHEMES.contains(&scheme))
}

/// A disk: an absolute path, or `SCHEME:IDENTITY` of a network disk.
/// `label` names the resource in an error; it is only called on a refusal (a valid request
/// formats nothing).
fn validate_disk_name(path: &Path, label: impl FnOnce() -> String) -> Result<()> {
    let Some(name) = path.to_str().filter(|p| is_network_name(p)) else {
        return validate_path(path, label);
    };
    let rest = name.split_once(':').map_or("", |(_, r)| r);
    let reason = if rest.is_empty() || rest.starts_with('/') {
        "a network disk names its pool, target or host after the scheme (rbd:POOL/IMAGE, iscsi:IQN/LUN, nbd:HOST/EXPORT)"
    } else if name.len() > 4096 {
        "name longer than 4096 bytes"
    } else if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        "name contains a control character or white space"
    } else {
        return Ok(());
    };
    Err(Error::InvalidResource {
        resource: label(),
        reason: reason.to_owned(),
    })
}

fn validate_path(path: &Path, label: impl FnOnce() -> String) -> Result<()> {
    let reason = if !path.is_absolute() {
        "path must be absolute (or name a network disk: rbd:POOL/IMAGE, iscsi:IQN/LUN, nbd:HOST/EXPORT)"
    } else if path.as_os_str().len() > 4096 {
        "path longer than PATH_MAX"
    } else if path.as_os_str().as_encoded_bytes().contains(&0) {
        "path contains a NUL byte"
    } else if path
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .any(|b| *b < 0x20 || *b == 0x7f)
    {
        // A newline or escape in a path would forge rows in `vmlock status` and in logs.
        "path contains a control character (below 0x20, or DEL)"
    } else if path.components().any(|c| matches!(c, Component::ParentDir)) {
        // `..` makes two strings name one file; refuse rather than guess which one is meant.
        "path must not contain '..'"
    } else if path.to_str().is_none() {
        "path must be valid UTF-8"
    } else {
        return Ok(());
    };
    Err(Error::InvalidResource {
        resource: label(),
        reason: reason.to_owned(),
    })
}

fn invalid(r: &Resource, reason: String) -> Error {
    Error::InvalidResource {
        resource: r.to_string(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_in_paths_are_refused() {
        for bad in [
            "/img/a\nb.qcow2",
            "/img/\tx",
            "/img/\x1b[2Jx",
            "/img/del\x7f",
        ] {
            let e = Resource::disk(bad, DiskMode::Exclusive).unwrap_err();
            assert!(e.to_string().contains("control character"), "{e}");
            assert!(bad.parse::<Resource>().is_err());
            assert!(Resource::lease("ls", "k", bad, 0).is_err());
            let r = Resource::Disk {
                path: bad.into(),
                mode: DiskMode::Shared,
            };
            assert!(
                r.validate().is_err(),
                "validation as the daemon receives it"
            );
        }
        assert!(Resource::disk("/img/ünïcode a.qcow2", DiskMode::Exclusive).is_ok());
    }

    #[test]
    fn network_disks_are_named_by_identity() {
        let r: Resource = "rbd:pool/image,shared".parse().expect("rbd");
        assert_eq!(r.network_id(), Some("rbd:pool/image"));
        assert_eq!(r.mode(), DiskMode::Shared);
        let r: Resource = "iscsi:iqn.2024-01.org.example:disk1/0"
            .parse()
            .expect("iscsi");
        assert_eq!(
            r.network_id(),
            Some("iscsi:iqn.2024-01.org.example:disk1/0")
        );
        assert_eq!(
            "/img/a.qcow2"
                .parse::<Resource>()
                .expect("path")
                .network_id(),
            None
        );
        for bad in [
            "rbd:",
            "nbd:/x",
            "rbd:pool/im age",
            "ceph:pool/image",
            "pool/image",
        ] {
            assert!(bad.parse::<Resource>().is_err(), "{bad} accepted");
        }
        // A lease file is a file: a network name is no lease path.
        assert!(Resource::parse_lease("LS:k:rbd:pool/x:0").is_err());
    }

    #[test]
    fn parses_disk_flags() {
        let r: Resource = "/images/a.qcow2,shared".parse().unwrap();
        assert_eq!(r.mode(), DiskMode::Shared);
        let r: Resource = "/images/a.qcow2".parse().unwrap();
        assert_eq!(r.mode(), DiskMode::Exclusive);
        let r: Resource = "/images/a,b.qcow2".parse().unwrap();
        assert_eq!(r.path(), Path::new("/images/a,b.qcow2"));
        assert!(!"/images/a.iso,readonly"
            .parse::<Resource>()
            .unwrap()
            .is_locked());
    }

    #[test]
    fn refuses_relative_parent_and_unknown_flags() {
        for bad in [
            "images/a.qcow2",
            "/images/../etc/passwd",
            "/a,writeback",
            "",
        ] {
            let e = bad.parse::<Resource>().unwrap_err();
            assert!(matches!(e, Error::InvalidResource { .. }), "{bad}: {e}");
        }
        let e = "rel/a".parse::<Resource>().unwrap_err();
        assert!(
            e.to_string().contains("rel/a") && e.to_string().contains("absolute"),
            "{e}"
        );
    }

    #[test]
    fn parses_and_validates_leases() {
        let r = Resource::parse_lease("LS:vm1:/leases/ls:1048576").unwrap();
        assert_eq!(r.label(), "lease LS:vm1");
        assert!(Resource::parse_lease("LS:vm1:/leases/ls").is_err());
        assert!(Resource::parse_lease("LS::/leases/ls:0").is_err());
        assert!(Resource::parse_lease("LS:k:relative:0").is_err());
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics_and_accepts_only_absolute(s in "\\PC*") {
            if let Ok(r) = s.parse::<Resource>() {
                proptest::prop_assert!(r.path().is_absolute() || r.network_id().is_some());
            }
            let _ = Resource::parse_lease(&s);
        }
    }
}
