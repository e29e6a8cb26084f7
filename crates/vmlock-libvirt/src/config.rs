//! `qemu-vmlock.conf`: libvirt's configuration syntax (`key = value`, `#` comments, integers and
//! double-quoted strings), with the keys `qemu-lockd.conf` users know. A key this plugin does not
//! support is an error naming it, so nobody believes a setting took effect when it did not.

use std::path::{Path, PathBuf};

/// The plugin's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Lock every disk libvirt passes (else only `<lease>` elements). Default on.
    pub auto_disk_leases: bool,
    /// Refuse a domain with writable exclusive disks and no `<lease>`. Default:
    /// `!auto_disk_leases`, as lockd.
    pub require_lease_for_disks: bool,
    /// vmlockd's runtime directory (its socket; each domain's control socket).
    pub runtime_dir: PathBuf,
    /// The program that holds each domain's leases (`vmlock`).
    pub vmlock_binary: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            auto_disk_leases: true,
            require_lease_for_disks: false,
            runtime_dir: PathBuf::from("/run/vmlock"),
            vmlock_binary: PathBuf::from("/usr/bin/vmlock"),
        }
    }
}

/// A configuration error: where and why.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// Line number (1-based; 0 when the file could not be read).
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

impl Config {
    /// Reads `path`; a missing file means the defaults (as libvirt's own plugins).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(ConfigError {
                file: path.display().to_string(),
                line: 0,
                reason: e.to_string(),
            }),
        }
    }

    /// Parses configuration text.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let mut config = Config::default();
        let mut require_lease = None;
        for (n, raw) in text.lines().enumerate() {
            let err = |reason: String| ConfigError {
                file: file.to_owned(),
                line: n + 1,
                reason,
            };
            let line = strip_comment(raw).trim();
            if line.is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| err(format!("expected `key = value`, found {line:?}")))?;
            let (key, value) = (key.trim(), value.trim());
            match key {
                "auto_disk_leases" => config.auto_disk_leases = flag(value).map_err(err)?,
                "require_lease_for_disks" => require_lease = Some(flag(value).map_err(err)?),
                "runtime_dir" => config.runtime_dir = absolute(value).map_err(err)?,
                "vmlock_binary" => config.vmlock_binary = absolute(value).map_err(err)?,
                "file_lockspace_dir" => {
                    return Err(err(
                        "file_lockspace_dir is vmlockd's setting, so that every client keys \
                         disks the same way: set it in vmlockd.toml"
                            .into(),
                    ))
                }
                "lvm_lockspace_dir" | "scsi_lockspace_dir" => {
                    return Err(err(format!(
                        "{key} is not supported by vmlock (disks are keyed by device and inode)"
                    )))
                }
                other => return Err(err(format!("unknown key {other:?}"))),
            }
        }
        config.require_lease_for_disks = require_lease.unwrap_or(!config.auto_disk_leases);
        Ok(config)
    }
}

fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '#' if !quoted => return &line[..i],
            _ => {}
        }
    }
    line
}

fn flag(value: &str) -> Result<bool, String> {
    match value {
        "0" => Ok(false),
        "1" => Ok(true),
        other => Err(format!("expected 0 or 1, found {other}")),
    }
}

fn absolute(value: &str) -> Result<PathBuf, String> {
    let inner = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .ok_or_else(|| format!("expected a double-quoted string, found {value}"))?;
    if !inner.starts_with('/') || inner.chars().any(char::is_control) {
        return Err(format!("expected an absolute path, found {inner:?}"));
    }
    Ok(PathBuf::from(inner))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockd_keys_parse_and_require_lease_follows_auto() {
        let c = Config::parse(
            "# comment\nauto_disk_leases = 0 # trailing\nruntime_dir = \"/tmp/x#y\"\n",
            "f",
        )
        .unwrap();
        assert!(!c.auto_disk_leases);
        assert!(c.require_lease_for_disks);
        assert_eq!(c.runtime_dir, PathBuf::from("/tmp/x#y"));
        let c = Config::parse("auto_disk_leases = 0\nrequire_lease_for_disks = 0", "f").unwrap();
        assert!(!c.require_lease_for_disks);
        assert_eq!(Config::parse("", "f").unwrap(), Config::default());
    }

    #[test]
    fn unsupported_and_bad_values_name_the_line() {
        for (text, needle) in [
            ("file_lockspace_dir = \"/x\"", "vmlockd.toml"),
            ("lvm_lockspace_dir = \"/x\"", "not supported"),
            ("\nbogus = 1", "f:2: unknown key \"bogus\""),
            ("auto_disk_leases = yes", "expected 0 or 1"),
            ("runtime_dir = relative", "double-quoted"),
            ("runtime_dir = \"rel\"", "absolute"),
            ("runtime_dir", "key = value"),
        ] {
            let e = Config::parse(text, "f").unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn a_missing_file_is_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            Config::load(&dir.path().join("none.conf")).unwrap(),
            Config::default()
        );
    }
}
