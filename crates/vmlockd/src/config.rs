//! vmlockd's configuration file (TOML), with the options virtlockd and `qemu-lockd.conf` users know.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use vmlock::Error;

/// Daemon configuration. Every key is optional; unknown keys are refused.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Lock every writable disk automatically (`qemu-lockd.conf` `auto_disk_leases`). When false,
    /// only explicit leases are locked. Default true.
    pub auto_disk_leases: bool,
    /// Refuse an acquire with writable exclusive disks but no explicit lease. Default: the
    /// opposite of `auto_disk_leases`, as in libvirt.
    pub require_lease_for_disks: Option<bool>,
    /// Indirect mode: lock a file in this directory named by the SHA-256 of the disk's identity
    /// (device and inode, or a block device's number; see docs/lockd.md) instead of byte 0 of the
    /// disk itself. Needed when the daemon may not open images for writing.
    pub file_lockspace_dir: Option<PathBuf>,
    /// Where the local lock files of network disks (`rbd:POOL/IMAGE`, `iscsi:…`, `nbd:…`: no
    /// file to lock on this host) live, named by the SHA-256 of the disk's name. Default:
    /// `RUNTIME_DIR/network`.
    pub network_lockspace_dir: Option<PathBuf>,
    /// libvirt's LVM lockspace (by LV UUID). Not supported yet: setting it is an error, so
    /// nobody believes LVM volumes are keyed by UUID when they are not.
    pub lvm_lockspace_dir: Option<PathBuf>,
    /// libvirt's SCSI lockspace (by SCSI id). Not supported yet, as `lvm_lockspace_dir`.
    pub scsi_lockspace_dir: Option<PathBuf>,
    /// Most simultaneous request connections. Holder connections (one per running VM) do not
    /// count and are never refused by it. Default 4096.
    pub max_clients: usize,
    /// A request connection that sends nothing for this long is closed. Holder connections are
    /// exempt. Default 30000 ms.
    pub idle_timeout_ms: u64,
    /// Host name reported in holder names. Default: the kernel's host name.
    pub host_name: Option<String>,
    /// How often every held lease is checked for loss (lock file removed or replaced, storage
    /// gone). Default 1000 ms.
    pub lease_check_interval_ms: u64,
    /// After a lost lease with action `poweroff`: time between SIGTERM and SIGKILL. Default 10000 ms.
    pub lock_failure_grace_ms: u64,
    /// Serve Prometheus metrics over HTTP (`GET /metrics`) on this TCP address, e.g.
    /// `"127.0.0.1:9477"`. Default: off (`vmlock metrics` still works over the socket).
    pub metrics_address: Option<String>,
    /// How many recent events the daemon keeps for `vmlock events`. Default 10000.
    pub event_buffer: usize,
    /// How many events may wait for one `vmlock events --follow` subscriber; one further behind
    /// is dropped with an error. Default 1024 (at most `event_buffer`).
    pub event_subscriber_queue: usize,
    /// Cluster-wide locks in etcd (`[etcd]`: endpoints, prefix, ttl, TLS, user/password; see
    /// docs/etcd.md). Its `host` defaults to `host_name`. Default: off (locks are local).
    pub etcd: Option<vmlock_etcd::Config>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            auto_disk_leases: true,
            require_lease_for_disks: None,
            file_lockspace_dir: None,
            network_lockspace_dir: None,
            lvm_lockspace_dir: None,
            scsi_lockspace_dir: None,
            max_clients: 4096,
            idle_timeout_ms: 30_000,
            host_name: None,
            lease_check_interval_ms: 1000,
            lock_failure_grace_ms: 10_000,
            metrics_address: None,
            event_buffer: 10_000,
            event_subscriber_queue: 1024,
            etcd: None,
        }
    }
}

impl Config {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading configuration {}", path.display()), &e))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks TOML text.
    pub fn parse(text: &str, source_name: &str) -> Result<Self, Error> {
        let config: Config = vmlock::registry::parse_toml(source_name, text)?;
        config.check(source_name)?;
        Ok(config)
    }

    fn check(&self, source_name: &str) -> Result<(), Error> {
        let bad = |reason: String| Error::Config {
            source_name: source_name.to_owned(),
            reason,
        };
        for (key, value) in [
            ("lvm_lockspace_dir", &self.lvm_lockspace_dir),
            ("scsi_lockspace_dir", &self.scsi_lockspace_dir),
        ] {
            if value.is_some() {
                return Err(bad(format!(
                    "{key} is not supported yet; use file_lockspace_dir"
                )));
            }
        }
        for (key, dir) in [
            ("file_lockspace_dir", &self.file_lockspace_dir),
            ("network_lockspace_dir", &self.network_lockspace_dir),
        ] {
            if let Some(dir) = dir {
                if !dir.is_absolute() {
                    return Err(bad(format!("{key} {} must be absolute", dir.display())));
                }
            }
        }
        if self.lease_check_interval_ms == 0 {
            return Err(bad("lease_check_interval_ms must be at least 1".into()));
        }
        if self.idle_timeout_ms == 0 {
            return Err(bad("idle_timeout_ms must be at least 1".into()));
        }
        if self.max_clients == 0 {
            return Err(bad("max_clients must be at least 1".into()));
        }
        if let Some(addr) = &self.metrics_address {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(bad(format!(
                    "metrics_address {addr:?} is not an IP address and port, e.g. \"127.0.0.1:9477\""
                )));
            }
        }
        if self.event_buffer == 0 {
            return Err(bad("event_buffer must be at least 1".into()));
        }
        if self.event_subscriber_queue == 0 {
            return Err(bad("event_subscriber_queue must be at least 1".into()));
        }
        if let Some(etcd) = self.etcd_config("host") {
            etcd.validate().map_err(|e| bad(format!("[etcd]: {e}")))?;
        }
        Ok(())
    }

    /// The `[etcd]` section with its host name filled in (`host` when it names none).
    pub fn etcd_config(&self, host: &str) -> Option<vmlock_etcd::Config> {
        self.etcd.clone().map(|mut c| {
            if c.host.is_empty() {
                c.host = host.to_owned();
            }
            c
        })
    }

    /// The metrics address, checked by [`Config::parse`].
    pub fn metrics_socket_address(&self) -> Option<std::net::SocketAddr> {
        self.metrics_address.as_deref().and_then(|a| a.parse().ok())
    }

    /// Whether a start without an explicit lease is refused.
    pub fn requires_lease(&self) -> bool {
        self.require_lease_for_disks
            .unwrap_or(!self.auto_disk_leases)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_parsing() {
        let c = Config::parse("", "t").unwrap();
        assert_eq!(c, Config::default());
        assert!(!c.requires_lease());
        let c = Config::parse(
            "auto_disk_leases = false\nfile_lockspace_dir = \"/var/lib/vmlock/files\"",
            "t",
        )
        .unwrap();
        assert!(c.requires_lease());
    }

    #[test]
    fn refuses_unknown_unsupported_and_bad_values() {
        let e = Config::parse("max_client = 3", "vmlockd.toml").unwrap_err();
        assert!(
            e.to_string().contains("vmlockd.toml") && e.to_string().contains("max_client"),
            "{e}"
        );
        assert!(Config::parse("lvm_lockspace_dir = \"/x\"", "t").is_err());
        assert!(Config::parse("file_lockspace_dir = \"rel\"", "t").is_err());
        assert!(Config::parse("max_clients = 0", "t").is_err());
        let e = Config::parse("max_clients = \"many\"", "t").unwrap_err();
        assert!(e.to_string().contains("max_clients"), "{e}");
        assert!(Config::parse("idle_timeout_ms = 0", "t").is_err());
        assert!(Config::parse("metrics_address = \"localhost\"", "t").is_err());
        assert!(Config::parse("event_buffer = 0", "t").is_err());
        let c = Config::parse(
            "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nttl = 6",
            "t",
        )
        .expect("an etcd section");
        assert_eq!(
            c.etcd_config("h1").map(|e| (e.host, e.ttl)),
            Some(("h1".into(), 6))
        );
        let e = Config::parse("[etcd]\nendpoints = []", "vmlockd.toml").unwrap_err();
        assert!(e.to_string().contains("[etcd]"), "{e}");
        let e = Config::parse("[etcd]\nendpoints = [\"x\"]\nttls = 3", "t").unwrap_err();
        assert!(e.to_string().contains("ttls"), "{e}");
        assert_eq!(
            Config::parse("metrics_address = \"127.0.0.1:9477\"", "t")
                .unwrap()
                .metrics_socket_address(),
            Some("127.0.0.1:9477".parse().unwrap())
        );
        assert_eq!(
            Config::parse("idle_timeout_ms = 500", "t")
                .unwrap()
                .idle_timeout_ms,
            500
        );
    }
}
