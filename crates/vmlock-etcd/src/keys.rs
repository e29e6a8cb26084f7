//! The key layout: `PREFIX/disks/<disk>/e/<holder>` (exclusive) and `PREFIX/disks/<disk>/s/<holder>`
//! (shared), disk and holder percent-encoded so each is exactly one path segment.

use crate::Error;

/// One lock: a disk (any string the caller chooses: `dev:ino` for a file, `rbd:pool/image` for a
/// network disk) and its holder (the VM's uuid: it stays the same across a migration, so a
/// transfer keeps the key's name and moves only its lease and value).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LockKey {
    /// The disk's identity.
    pub disk: String,
    /// The holder (a VM uuid).
    pub holder: String,
}

impl LockKey {
    /// A key.
    pub fn new(disk: &str, holder: &str) -> Self {
        LockKey {
            disk: disk.to_owned(),
            holder: holder.to_owned(),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        for (what, s) in [("disk", &self.disk), ("holder", &self.holder)] {
            if s.is_empty() || s.chars().any(char::is_control) {
                return Err(Error::Invalid(format!(
                    "{what} {s:?}: empty or with control characters"
                )));
            }
        }
        Ok(())
    }
}

/// `%` → `%25`, `/` → `%2F`: one path segment, decodable, readable for ordinary names.
pub(crate) fn encode(s: &str) -> String {
    s.replace('%', "%25").replace('/', "%2F")
}

/// The inverse of [`encode`].
pub(crate) fn decode(s: &str) -> String {
    s.replace("%2F", "/").replace("%25", "%")
}

/// `PREFIX/disks/<disk>/`: every lock of the disk.
pub(crate) fn disk_prefix(prefix: &str, disk: &str) -> String {
    format!("{prefix}/disks/{}/", encode(disk))
}

/// `PREFIX/disks/<disk>/e/`: the disk's exclusive locks (at most one).
pub(crate) fn exclusive_prefix(prefix: &str, disk: &str) -> String {
    format!("{}e/", disk_prefix(prefix, disk))
}

/// The key of one lock.
pub(crate) fn key(prefix: &str, key: &LockKey, exclusive: bool) -> String {
    format!(
        "{}{}/{}",
        disk_prefix(prefix, &key.disk),
        if exclusive { "e" } else { "s" },
        encode(&key.holder)
    )
}

/// Parses a key under `PREFIX/disks/`: the lock and whether it is exclusive.
pub(crate) fn parse(prefix: &str, key: &str) -> Option<(LockKey, bool)> {
    let rest = key.strip_prefix(prefix)?.strip_prefix("/disks/")?;
    let mut parts = rest.split('/');
    let (disk, kind, holder) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let exclusive = match kind {
        "e" => true,
        "s" => false,
        _ => return None,
    };
    Some((LockKey::new(&decode(disk), &decode(holder)), exclusive))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_round_trips_and_prefixes_do_not_overlap() {
        let k = LockKey::new("rbd:pool/image%1", "uuid-1");
        let s = key("/vmlock", &k, true);
        assert_eq!(s, "/vmlock/disks/rbd:pool%2Fimage%251/e/uuid-1");
        assert_eq!(parse("/vmlock", &s), Some((k, true)));
        // A disk whose name extends another's is not under the other's prefix.
        let a = disk_prefix("/p", "rbd:pool/image");
        let b = key("/p", &LockKey::new("rbd:pool/image/x", "h"), false);
        assert!(!b.starts_with(&a), "{b} under {a}");
        assert_eq!(parse("/p", "/p/disks/d/x/h"), None);
    }
}
