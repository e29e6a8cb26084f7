//! The plugin's logic, in safe Rust: one libvirt lock manager (a domain and the resources of one
//! operation) and what each of libvirt's calls does with it.
//!
//! libvirt builds a fresh manager for every operation (`New` → `AddResource`… → one call →
//! `Free`), so nothing lives here between calls: the domain's leases live in its holder process
//! (`vmlock libvirt holder`, started from the pre-exec child), which the later calls reach over
//! its control socket. See docs/libvirt.md for the call sequence.

use crate::config::Config;
use std::path::PathBuf;
use vmlock::{DiskMode, LockFailureAction, Resource};
use vmlock_client::control::{self, ControlReply, ControlRequest};
use vmlock_client::proto::{AcquireFlags, VmIdentity};

/// libvirt's error codes (`virErrorNumber`) the plugin reports with.
pub mod code {
    /// `VIR_ERR_OPERATION_FAILED`: "operation failed: …".
    pub const OPERATION_FAILED: i32 = 9;
    /// `VIR_ERR_CONFIG_UNSUPPORTED`: "unsupported configuration: …".
    pub const CONFIG_UNSUPPORTED: i32 = 67;
    /// `VIR_ERR_RESOURCE_BUSY`: "resource busy: …".
    pub const RESOURCE_BUSY: i32 = 87;
}

/// Why a call failed, with the libvirt error code to report it under.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct PluginError {
    /// libvirt's error code.
    pub code: i32,
    /// vmlock's own message (names the disk and who holds it).
    pub message: String,
}

impl PluginError {
    fn failed(message: impl Into<String>) -> Self {
        PluginError {
            code: code::OPERATION_FAILED,
            message: message.into(),
        }
    }

    fn unsupported(message: impl Into<String>) -> Self {
        PluginError {
            code: code::CONFIG_UNSUPPORTED,
            message: message.into(),
        }
    }
}

impl From<vmlock::Error> for PluginError {
    fn from(e: vmlock::Error) -> Self {
        let code = match e {
            vmlock::Error::Busy { .. } | vmlock::Error::OwnerExists { .. } => code::RESOURCE_BUSY,
            _ => code::OPERATION_FAILED,
        };
        PluginError {
            code,
            message: format!("vmlock: {e}"),
        }
    }
}

/// A parameter value as libvirt passed it, copied out of the call.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// STRING or CSTRING (`None` for a NULL pointer).
    Text(Option<String>),
    /// INT, UINT, LONG or ULONG.
    Number(i128),
    /// A raw uuid.
    Uuid([u8; 16]),
    /// DOUBLE, or a type this plugin does not know.
    Other,
}

/// `drvNew`'s flag: a fresh start (the pre-exec child), not a later operation.
pub const NEW_STARTED: u32 = 1;
/// `drvAddResource`'s flags.
pub const RESOURCE_READONLY: u32 = 1;
/// A shared disk (`<shareable/>`).
pub const RESOURCE_SHARED: u32 = 2;
/// `drvAcquire`'s flag: register the domain's process (libvirt's pre-exec child).
pub const ACQUIRE_REGISTER_ONLY: u32 = 1;
/// `drvAddResource` types.
pub const RESOURCE_TYPE_DISK: u32 = 0;
/// A `<lease>` element.
pub const RESOURCE_TYPE_LEASE: u32 = 1;

/// One lock manager: a domain and the resources of one operation.
#[derive(Debug, Clone)]
pub struct Domain {
    /// Domain uuid (printed).
    pub uuid: String,
    /// Domain name.
    pub name: String,
    /// Domain id.
    pub id: u32,
    /// QEMU's pid (the pre-exec child's own pid in the child).
    pub pid: u32,
    /// libvirt's connection uri (NULL on some paths).
    pub uri: Option<String>,
    /// What this operation concerns.
    pub resources: Vec<Resource>,
}

impl Domain {
    /// A domain from `drvNew`'s parameters.
    pub fn new(params: &[(String, Value)]) -> Result<Self, PluginError> {
        let get = |key: &str| params.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        let uuid = match get("uuid") {
            Some(Value::Uuid(bytes)) => vmlock::params::parse_uuid(&format_uuid(bytes))?,
            _ => return Err(PluginError::failed("vmlock: libvirt passed no domain uuid")),
        };
        let name = match get("name") {
            Some(Value::Text(Some(n))) => n.clone(),
            _ => return Err(PluginError::failed("vmlock: libvirt passed no domain name")),
        };
        let number = |key: &str| match get(key) {
            Some(Value::Number(n)) => u32::try_from(*n).ok(),
            _ => None,
        };
        let pid = number("pid").filter(|p| *p != 0).ok_or_else(|| {
            PluginError::failed(format!(
                "vmlock: libvirt passed no process for domain {name}"
            ))
        })?;
        let uri = match get("uri") {
            Some(Value::Text(t)) => t.clone(),
            _ => None,
        };
        Ok(Domain {
            uuid: uuid.to_string(),
            name,
            id: number("id").unwrap_or(0),
            pid,
            uri,
            resources: Vec::new(),
        })
    }

    /// `drvAddResource`: a disk (absolute path) or a `<lease>` (key, with `path`, `offset`,
    /// `lockspace`).
    pub fn add_resource(
        &mut self,
        config: &Config,
        kind: u32,
        name: &str,
        params: &[(String, Value)],
        flags: u32,
    ) -> Result<(), PluginError> {
        match kind {
            RESOURCE_TYPE_DISK => {
                if !config.auto_disk_leases {
                    return Ok(());
                }
                let mode = if flags & RESOURCE_READONLY != 0 {
                    DiskMode::ReadOnly
                } else if flags & RESOURCE_SHARED != 0 {
                    DiskMode::Shared
                } else {
                    DiskMode::Exclusive
                };
                self.resources.push(Resource::disk(name, mode)?);
            }
            RESOURCE_TYPE_LEASE => {
                let get = |key: &str| params.iter().find(|(k, _)| k == key).map(|(_, v)| v);
                let path = match get("path") {
                    Some(Value::Text(Some(p))) => PathBuf::from(p),
                    _ => {
                        return Err(PluginError::failed(format!(
                            "vmlock: lease {name} of domain {} has no target path",
                            self.name
                        )))
                    }
                };
                let offset = match get("offset") {
                    Some(Value::Number(n)) => u64::try_from(*n).unwrap_or(0),
                    _ => 0,
                };
                let lockspace = match get("lockspace") {
                    Some(Value::Text(Some(l))) => l.clone(),
                    _ => "libvirt".to_owned(),
                };
                self.resources
                    .push(Resource::lease(&lockspace, name, path, offset)?);
            }
            other => {
                return Err(PluginError::unsupported(format!(
                    "vmlock: unknown lock resource type {other}"
                )))
            }
        }
        Ok(())
    }

    /// Refuses what the configuration forbids: writable disks without a `<lease>` when
    /// `require_lease_for_disks` is set.
    pub fn check_leases(&self, config: &Config) -> Result<(), PluginError> {
        let writable = self.resources.iter().any(|r| {
            matches!(
                r,
                Resource::Disk {
                    mode: DiskMode::Exclusive,
                    ..
                }
            )
        });
        let leased = self
            .resources
            .iter()
            .any(|r| matches!(r, Resource::Lease(_)));
        if config.require_lease_for_disks && !leased && writable {
            return Err(PluginError::unsupported(format!(
                "vmlock: domain {} has writable disks but no <lease> (require_lease_for_disks)",
                self.name
            )));
        }
        Ok(())
    }

    /// The holder's command line (`vmlock libvirt holder`), for the pre-exec child: a holder
    /// that takes the leases and reports on [`crate::spawn::READY_FD`].
    pub fn holder_args(&self, config: &Config, action: LockFailureAction) -> Vec<String> {
        let mut args = self.holder_base_args(config, action);
        args.push("--ready-fd".into());
        args.push(crate::spawn::READY_FD.to_string());
        args
    }

    /// The command line of a holder that takes over from the pre-exec child, which took the
    /// leases itself ([`crate::spawn::take_and_hand_down`]).
    pub fn takeover_args(&self, config: &Config, action: LockFailureAction) -> Vec<String> {
        let mut args = self.holder_base_args(config, action);
        args.push("--takeover-fd".into());
        args.push(crate::spawn::TAKEOVER_FD.to_string());
        args.push("--control-fd".into());
        args.push(crate::spawn::CONTROL_FD.to_string());
        args
    }

    /// The domain as vmlockd knows it, with this process (the pre-exec child) as its guest, and
    /// its options: what the holder's own start would register and acquire with.
    pub fn registration(&self, action: LockFailureAction) -> (VmIdentity, AcquireFlags) {
        (
            VmIdentity {
                uuid: self.uuid.clone(),
                name: self.name.clone(),
                id: self.id,
                pid: self.pid,
            },
            AcquireFlags {
                on_lock_failure: action,
                // Through libvirt, so that it knows its domain paused or stopped.
                supervisor_acts: self.uri.is_some(),
                ..AcquireFlags::default()
            },
        )
    }

    fn holder_base_args(&self, config: &Config, action: LockFailureAction) -> Vec<String> {
        let mut args = vec![
            config.vmlock_binary.display().to_string(),
            "--runtime-dir".into(),
            config.runtime_dir.display().to_string(),
            "libvirt".into(),
            "holder".into(),
            "--name".into(),
            self.name.clone(),
            "--uuid".into(),
            self.uuid.clone(),
            "--id".into(),
            self.id.to_string(),
            "--guest-pid".into(),
            self.pid.to_string(),
            "--on-lock-failure".into(),
            action.to_string(),
        ];
        if let Some(uri) = &self.uri {
            args.push("--uri".into());
            args.push(uri.clone());
        }
        for r in &self.resources {
            match r {
                Resource::Disk { path, mode } => {
                    let suffix = match mode {
                        DiskMode::Exclusive => "",
                        DiskMode::Shared => ",shared",
                        DiskMode::ReadOnly => ",readonly",
                    };
                    args.push("--disk".into());
                    args.push(format!("{}{suffix}", path.display()));
                }
                Resource::Lease(l) => {
                    args.push("--lease".into());
                    args.push(format!(
                        "{}:{}:{}:{}",
                        l.lockspace,
                        l.key,
                        l.path.display(),
                        l.offset
                    ));
                }
            }
        }
        args
    }

    /// Asks the domain's holder (the one serving this QEMU: two serve one uuid during a
    /// migration on one host).
    fn ask(&self, config: &Config, request: &ControlRequest) -> vmlock::Result<ControlReply> {
        control::call_for_guest(&config.runtime_dir, &self.uuid, self.pid, request)
    }

    /// `drvAcquire` in libvirtd (CPU start, resume, hotplug, migration finish): the domain's
    /// holder makes sure it holds every resource of this operation, taking the missing ones (a
    /// hotplugged disk) all or nothing; a migration destination first takes its leases over with
    /// the source's `state`. Already held is success: acquire is idempotent.
    pub fn acquire(&self, config: &Config, state: Option<&str>) -> Result<(), PluginError> {
        let resources = self
            .resources
            .iter()
            .filter(|r| r.is_locked())
            .cloned()
            .collect();
        self.ask(
            config,
            &ControlRequest::Ensure {
                state: state.map(str::to_owned),
                resources,
            },
        )?;
        Ok(())
    }

    /// `drvRelease`. With a state to fill (`pause`: CPUs stop, a live migration switches over)
    /// nothing is released — QEMU keeps its images open while paused, so its leases stay — and
    /// the state comes back for the resume. Without (disk unplug) the operation's disks are
    /// released. Both are idempotent (libvirt releases twice on pause).
    pub fn release(
        &self,
        config: &Config,
        want_state: bool,
    ) -> Result<Option<String>, PluginError> {
        if want_state {
            return match self.ask(config, &ControlRequest::Inquire) {
                Ok(reply) => Ok(Some(control::state(reply)?.to_string())),
                // A domain started before vmlock was its lock manager has nothing to keep.
                Err(vmlock::Error::UnknownOwner { .. }) => Ok(None),
                Err(e) => Err(e.into()),
            };
        }
        for r in self.resources.iter().filter(|r| r.is_locked()) {
            match self.ask(config, &ControlRequest::DetachDisk(r.clone())) {
                Ok(_) => {}
                // Not held (any more): released twice, or never taken.
                Err(vmlock::Error::NotHeld { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(None)
    }

    /// `drvInquire`, at a migration's start on the source: prepares the hand-over and returns
    /// the state (versions and the hand-over secret) libvirt carries to the destination.
    pub fn inquire(&self, config: &Config) -> Result<Option<String>, PluginError> {
        let destination = self.uri.clone().unwrap_or_else(|| "libvirt".into());
        let reply = self.ask(config, &ControlRequest::MigratePrepare(destination))?;
        Ok(Some(control::state(reply)?.to_string()))
    }
}

/// libvirt's `on_lockfailure` (`virDomainLockFailureAction`) as vmlock's action.
pub fn lock_failure_action(action: i32) -> Result<LockFailureAction, PluginError> {
    match action {
        // DEFAULT, POWEROFF
        0 | 1 => Ok(LockFailureAction::Poweroff),
        3 => Ok(LockFailureAction::Pause),
        4 => Ok(LockFailureAction::Ignore),
        2 => Err(PluginError::unsupported(
            "vmlock: <on_lockfailure>restart</on_lockfailure> is not supported (a restarted \
             guest would need the lease it just lost); use poweroff or pause",
        )),
        other => Err(PluginError::unsupported(format!(
            "vmlock: unknown <on_lockfailure> action {other}"
        ))),
    }
}

/// A uuid's 16 bytes, printed.
pub fn format_uuid(b: &[u8; 16]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pid: i128) -> Vec<(String, Value)> {
        vec![
            ("uuid".into(), Value::Uuid([0x11; 16])),
            ("name".into(), Value::Text(Some("web1".into()))),
            ("id".into(), Value::Number(3)),
            ("pid".into(), Value::Number(pid)),
            ("uri".into(), Value::Text(Some("qemu:///system".into()))),
        ]
    }

    #[test]
    fn a_domain_copies_its_parameters_and_refuses_a_missing_pid() {
        let d = Domain::new(&params(42)).unwrap();
        assert_eq!(d.uuid, "11111111-1111-1111-1111-111111111111");
        assert_eq!((d.name.as_str(), d.id, d.pid), ("web1", 3, 42));
        assert!(Domain::new(&params(0)).is_err());
        assert!(Domain::new(&params(42)[1..]).is_err());
    }

    #[test]
    fn disks_and_leases_become_resources_and_reach_the_holder_command_line() {
        let config = Config::default();
        let mut d = Domain::new(&params(42)).unwrap();
        d.add_resource(&config, RESOURCE_TYPE_DISK, "/img/a.qcow2", &[], 0)
            .unwrap();
        d.add_resource(
            &config,
            RESOURCE_TYPE_DISK,
            "/img/b.iso",
            &[],
            RESOURCE_READONLY,
        )
        .unwrap();
        let lease = vec![
            ("path".into(), Value::Text(Some("/leases/f".into()))),
            ("offset".into(), Value::Number(0)),
        ];
        d.add_resource(&config, RESOURCE_TYPE_LEASE, "key1", &lease, 0)
            .unwrap();
        let args = d.holder_args(&config, LockFailureAction::Pause).join(" ");
        assert!(
            args.contains("--disk /img/a.qcow2 --disk /img/b.iso,readonly"),
            "{args}"
        );
        assert!(args.contains("--lease libvirt:key1:/leases/f:0"), "{args}");
        assert!(
            args.contains("--guest-pid 42 --on-lock-failure pause"),
            "{args}"
        );
        assert!(d
            .add_resource(&config, RESOURCE_TYPE_DISK, "relative", &[], 0)
            .is_err());
    }

    #[test]
    fn require_lease_for_disks_refuses_writable_disks_without_a_lease() {
        let config = Config::parse("require_lease_for_disks = 1", "f").unwrap();
        let mut d = Domain::new(&params(42)).unwrap();
        d.add_resource(&config, RESOURCE_TYPE_DISK, "/img/a", &[], 0)
            .unwrap();
        let e = d.check_leases(&config).unwrap_err();
        assert!(e.message.contains("no <lease>"), "{e}");
        let off = Config::parse("auto_disk_leases = 0\nrequire_lease_for_disks = 0", "f").unwrap();
        let mut d = Domain::new(&params(42)).unwrap();
        d.add_resource(&off, RESOURCE_TYPE_DISK, "/img/a", &[], 0)
            .unwrap();
        assert!(d.resources.is_empty());
    }

    #[test]
    fn lock_failure_actions_map_and_restart_is_refused() {
        assert_eq!(lock_failure_action(0).unwrap(), LockFailureAction::Poweroff);
        assert_eq!(lock_failure_action(3).unwrap(), LockFailureAction::Pause);
        assert_eq!(lock_failure_action(4).unwrap(), LockFailureAction::Ignore);
        assert!(lock_failure_action(2).is_err());
        assert!(lock_failure_action(9).is_err());
    }
}
