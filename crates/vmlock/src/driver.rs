//! What a lock driver is: the trait every driver implements, its capabilities, and the options of
//! each step. Callers use [`crate::Manager`], which checks capabilities and states before a driver
//! is ever called.

use crate::error::{Error, Result};
use crate::lockstate::LockState;
use crate::params::{StartMode, VmParams};
use crate::resource::Resource;
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// What a driver can do. A step outside these gets [`Error::Unsupported`] from the manager,
/// as the seed's notes ask ("return an error from all migrate calls").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Locks disks one by one (otherwise the driver does VM-level leases only and ignores disk
    /// paths, as the seed allows).
    pub disk_resources: bool,
    /// Takes explicit leases (lockspace, key, path, offset).
    pub leases: bool,
    /// Acquires and releases single resources of a running guest.
    pub hotplug: bool,
    /// Moves leases from a migration source to its destination.
    pub migration: bool,
    /// Release and inquire return a state that a later acquire checks (lease versions).
    pub lock_state: bool,
    /// Really excludes a second VM (false only for `nop`).
    pub exclusion: bool,
    /// Runs the guest under a supervisor program of its own.
    pub supervisor: bool,
    /// A host-wide lock service can list every VM's leases (otherwise each supervisor is asked).
    #[serde(default)]
    pub host_status: bool,
}

/// What happens to a running guest whose lease is lost (libvirt's `on_lock_failure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum LockFailureAction {
    /// SIGTERM, then SIGKILL after a grace period.
    #[default]
    Poweroff,
    /// Stop and start the guest again. Not offered by any driver yet: a restarted guest would
    /// have to re-acquire leases that another host may hold by then.
    Restart,
    /// Pause the guest's CPUs (QEMU `stop` over QMP).
    Pause,
    /// Log only.
    Ignore,
}

impl FromStr for LockFailureAction {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "poweroff" => Self::Poweroff,
            "restart" => Self::Restart,
            "pause" => Self::Pause,
            "ignore" => Self::Ignore,
            other => {
                return Err(Error::InvalidParameter {
                    key: "on-lock-failure".into(),
                    reason: format!("\"{other}\" is not one of poweroff, restart, pause, ignore"),
                })
            }
        })
    }
}

impl fmt::Display for LockFailureAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Poweroff => "poweroff",
            Self::Restart => "restart",
            Self::Pause => "pause",
            Self::Ignore => "ignore",
        })
    }
}

/// Options of [`crate::Manager::acquire`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcquireOptions {
    /// Register the owner but take nothing yet (libvirt's pre-exec child does this).
    pub register_only: bool,
    /// After this call the connection may do nothing but hold its locks.
    pub restrict: bool,
    /// What to do to the guest if a lease is lost later.
    pub on_lock_failure: LockFailureAction,
    /// A QMP socket of the guest, which makes [`LockFailureAction::Pause`] possible.
    pub qmp_socket: Option<PathBuf>,
    /// For guests that are not QEMU: also hold QEMU's "writer" lock bytes on exclusive disks so
    /// that a stray QEMU or `qemu-img` refuses to open them.
    pub hold_qemu_bytes: bool,
    /// The supervisor carries the lock-failure action out itself (through the VM manager that
    /// runs the guest, e.g. libvirt); the lock service asks it first.
    pub supervisor_acts: bool,
}

/// How a migration ended, for both sides' `complete_migration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationOutcome {
    /// The destination runs the guest; the source gives up its leases.
    Success,
    /// The source keeps running and keeps everything; the destination holds nothing.
    Cancel,
}

/// The program that runs a guest under a driver's leases (the seed's
/// `GetSupervisorPath`/`GetSupervisorArgs`). The caller appends the guest's own command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorCommand {
    /// The supervisor executable.
    pub program: PathBuf,
    /// Its arguments, to be followed by the guest's program and arguments.
    pub args: Vec<OsString>,
}

/// A loaded driver (the seed's plugin). Drivers are created through [`crate::Registry`].
pub trait Driver: Send + Sync + fmt::Debug {
    /// The name it is loaded by.
    fn name(&self) -> &str;
    /// What it can do.
    fn capabilities(&self) -> Capabilities;
    /// A session for one VM; `Attach` and `IncomingMigration` sessions find or prepare state in
    /// the lock service.
    fn open(&self, vm: &VmParams, mode: StartMode) -> Result<Box<dyn Session>>;
    /// The supervisor that must run this VM's guest, if the driver has one.
    fn supervisor(&self, _vm: &VmParams, _resources: &[Resource]) -> Option<SupervisorCommand> {
        None
    }
    /// Called once when the registry unloads the driver.
    fn unload(&self) -> Result<()> {
        Ok(())
    }
}

/// One VM's dealings with a driver. The manager calls these only in valid states, with
/// validated resources, and only for capabilities the driver declared.
pub trait Session: Send + fmt::Debug {
    /// Takes `resources` for the VM, all or nothing. With `state`, the lock versions in it must
    /// still be current (nobody else held the lease in between).
    fn acquire(
        &mut self,
        resources: &[Resource],
        options: &AcquireOptions,
        state: Option<&LockState>,
    ) -> Result<()>;
    /// Releases `resources` (every one it can; all failures are reported together) and returns
    /// the state of what was released.
    fn release(&mut self, resources: &[Resource]) -> Result<LockState>;
    /// The state of what the VM holds now, releasing nothing.
    fn inquire(&mut self) -> Result<LockState>;
    /// The guest process the lock service knows for this VM (the seed's `GetChild`).
    fn guest_pid(&mut self) -> Result<Option<u32>>;
    /// Source side: the state to hand to the destination; the source keeps holding.
    fn prepare_migration(&mut self, _destination_uri: &str) -> Result<LockState> {
        Err(Error::unsupported(self.driver_name(), "migration"))
    }
    /// Either side: finish or cancel a migration.
    fn complete_migration(&mut self, _outcome: MigrationOutcome, _incoming: bool) -> Result<()> {
        Err(Error::unsupported(self.driver_name(), "migration"))
    }
    /// The supervisor started the guest process `pid` under the leases it acquired for itself:
    /// from now on the locks follow that process.
    fn guest_started(&mut self, _pid: u32) -> Result<()> {
        Ok(())
    }
    /// The guest is gone: release everything the VM holds.
    fn shutdown(&mut self) -> Result<()>;
    /// Copies of the open file descriptions this process keeps for the VM's locks, for a guest
    /// to inherit (libvirt's QEMU keeps them across exec, so its locks live exactly as long as it
    /// does even if its holder and the lock service both die). Empty for drivers whose leases
    /// are not descriptions.
    fn lock_descriptions(&self) -> Vec<std::os::fd::OwnedFd> {
        Vec::new()
    }
    /// The driver's name, for errors.
    fn driver_name(&self) -> &str;
}
