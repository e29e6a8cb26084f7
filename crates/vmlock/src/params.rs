//! Who a manager acts for: the VM's identity (the seed's `SetParameter` calls) and how it was created.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Longest VM name accepted (libvirt allows far more, but no real name comes close).
pub const MAX_NAME_LEN: usize = 256;

/// How a manager comes into being (the seed's `virLockManagerNew` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartMode {
    /// A fresh guest start: nothing is held yet, `acquire` takes the VM's resources.
    Start,
    /// A VM manager that restarted attaches to a guest that is already running under leases
    /// (the seed's `NEW_ATTACH`). Nothing is acquired; hotplug, release, inquire and migration act on
    /// what the running guest holds.
    Attach,
    /// The destination of an incoming migration (the seed's `NEW_MIGRATE`): `acquire` takes the
    /// resources over from the source with the state the source handed out.
    IncomingMigration,
}

/// The identity of the VM a manager acts for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmParams {
    /// Hypervisor-local domain id; must not be 0 (libvirt's lockd refuses 0 too).
    pub id: u32,
    /// The VM's uuid: the key by which every lock service knows it.
    pub uuid: Uuid,
    /// Human-readable name, used in every error that names a holder.
    pub name: String,
    /// The guest process, once it exists.
    pub pid: Option<u32>,
    /// The VM manager's URI (e.g. `qemu:///system`), for drivers that call back.
    pub uri: Option<String>,
}

impl VmParams {
    /// Parameters from validated parts.
    pub fn new(id: u32, uuid: Uuid, name: &str) -> Result<Self> {
        let params = VmParams {
            id,
            uuid,
            name: name.to_owned(),
            pid: None,
            uri: None,
        };
        params.validate()?;
        Ok(params)
    }

    /// The same with the guest pid set.
    pub fn with_pid(mut self, pid: u32) -> Self {
        self.pid = Some(pid);
        self
    }

    /// Parameters from `key=value` pairs, as a plugin ABI or a config file hands them over.
    /// Unknown keys, duplicate keys, malformed values and missing required keys are errors.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self> {
        let mut id = None;
        let mut uuid = None;
        let mut name = None;
        let mut pid = None;
        let mut uri = None;
        for (key, value) in pairs {
            let duplicate = match key {
                "id" => id.replace(parse_number(key, value)?).is_some(),
                "uuid" => uuid.replace(parse_uuid(value)?).is_some(),
                "name" => name.replace(value.to_owned()).is_some(),
                "pid" => pid.replace(parse_number(key, value)?).is_some(),
                "uri" => uri.replace(value.to_owned()).is_some(),
                other => {
                    return Err(Error::UnknownParameter {
                        key: other.to_owned(),
                    })
                }
            };
            if duplicate {
                return Err(invalid(key, "given twice"));
            }
        }
        let params = VmParams {
            id: id.ok_or_else(|| invalid("id", "required"))?,
            uuid: uuid.ok_or_else(|| invalid("uuid", "required"))?,
            name: name.ok_or_else(|| invalid("name", "required"))?,
            pid,
            uri,
        };
        params.validate()?;
        Ok(params)
    }

    /// Checks every field; called by every constructor and by drivers on what they receive.
    pub fn validate(&self) -> Result<()> {
        if self.id == 0 {
            return Err(invalid("id", "must not be 0"));
        }
        if self.uuid.is_nil() {
            return Err(invalid("uuid", "must not be the nil uuid"));
        }
        validate_name(&self.name)?;
        if self.pid == Some(0) {
            return Err(invalid("pid", "must not be 0"));
        }
        if let Some(uri) = &self.uri {
            if uri.is_empty() || uri.chars().any(char::is_control) {
                return Err(invalid("uri", "must be non-empty and printable"));
            }
        }
        Ok(())
    }
}

/// Checks a VM name: non-empty, printable, bounded.
pub fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(invalid("name", "must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid("name", format!("longer than {MAX_NAME_LEN} bytes")));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid("name", "contains control characters"));
    }
    Ok(())
}

/// Parses a uuid in its canonical hyphenated form.
pub fn parse_uuid(value: &str) -> Result<Uuid> {
    let parsed = Uuid::try_parse(value)
        .map_err(|e| invalid("uuid", format!("\"{value}\" is not a uuid: {e}")))?;
    if parsed.is_nil() {
        return Err(invalid("uuid", "must not be the nil uuid"));
    }
    Ok(parsed)
}

fn parse_number(key: &str, value: &str) -> Result<u32> {
    value
        .parse::<u32>()
        .map_err(|_| invalid(key, format!("\"{value}\" is not an unsigned 32-bit number")))
}

fn invalid(key: &str, reason: impl Into<String>) -> Error {
    Error::InvalidParameter {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";

    #[test]
    fn accepts_a_complete_set() {
        let p =
            VmParams::from_pairs([("id", "3"), ("uuid", UUID), ("name", "web1"), ("pid", "77")])
                .unwrap();
        assert_eq!(p.id, 3);
        assert_eq!(p.pid, Some(77));
        assert_eq!(p.uuid.to_string(), UUID);
    }

    #[test]
    fn refuses_unknown_key() {
        let e = VmParams::from_pairs([("id", "1"), ("uuid", UUID), ("name", "a"), ("colour", "x")])
            .unwrap_err();
        assert!(
            matches!(e, Error::UnknownParameter { ref key } if key == "colour"),
            "{e}"
        );
    }

    #[test]
    fn refuses_malformed_uuid() {
        let e =
            VmParams::from_pairs([("id", "1"), ("uuid", "not-a-uuid"), ("name", "a")]).unwrap_err();
        assert!(e.to_string().contains("not-a-uuid"), "{e}");
        let nil = "00000000-0000-0000-0000-000000000000";
        assert!(VmParams::from_pairs([("id", "1"), ("uuid", nil), ("name", "a")]).is_err());
    }

    #[test]
    fn refuses_empty_and_control_names() {
        for bad in ["", "a\nb", "\u{7}"] {
            let e = VmParams::from_pairs([("id", "1"), ("uuid", UUID), ("name", bad)]).unwrap_err();
            assert!(
                matches!(e, Error::InvalidParameter { ref key, .. } if key == "name"),
                "{e}"
            );
        }
        let long = "x".repeat(MAX_NAME_LEN + 1);
        assert!(
            VmParams::from_pairs([("id", "1"), ("uuid", UUID), ("name", long.as_str())]).is_err()
        );
    }

    #[test]
    fn refuses_zero_id_missing_and_duplicate_keys() {
        assert!(VmParams::from_pairs([("id", "0"), ("uuid", UUID), ("name", "a")]).is_err());
        assert!(VmParams::from_pairs([("uuid", UUID), ("name", "a")]).is_err());
        assert!(VmParams::from_pairs([("id", "-1"), ("uuid", UUID), ("name", "a")]).is_err());
        let e = VmParams::from_pairs([("id", "1"), ("id", "2"), ("uuid", UUID), ("name", "a")])
            .unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }
}
