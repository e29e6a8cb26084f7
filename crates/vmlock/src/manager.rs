//! A manager for one VM (the seed's `virLockManager`): it keeps the VM's identity and resources,
//! enforces the order of the lifecycle steps and the driver's capabilities, and calls the driver.

use crate::driver::{
    AcquireOptions, Capabilities, LockFailureAction, MigrationOutcome, Session, SupervisorCommand,
};
use crate::error::{Error, Result};
use crate::lockstate::LockState;
use crate::params::{StartMode, VmParams};
use crate::registry::Plugin;
use crate::resource::Resource;

/// Where a manager is in the VM's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Created; resources may be registered; nothing held.
    Created,
    /// The owner is registered with the lock service but holds nothing (`register_only`).
    Registered,
    /// The VM holds its resources (after acquire, or from the start in attach mode).
    Held,
    /// Migration source after `prepare_migration`: still holding, hand-off pending.
    MigratingOut,
    /// Everything was released (pause, finished migration source, cancelled destination).
    Released,
    /// The guest is gone and the manager is finished.
    ShutDown,
}

/// The lock manager of one VM.
#[derive(Debug)]
pub struct Manager {
    plugin: Plugin,
    capabilities: Capabilities,
    vm: VmParams,
    mode: StartMode,
    resources: Vec<Resource>,
    phase: Phase,
    session: Box<dyn Session>,
}

impl Manager {
    /// A manager for `vm` (the seed's `New` + `SetParameter`). In [`StartMode::Attach`] the VM is
    /// already running and holding its resources.
    pub fn new(plugin: &Plugin, vm: VmParams, mode: StartMode) -> Result<Self> {
        vm.validate()?;
        let driver = plugin.driver();
        let capabilities = driver.capabilities();
        if mode == StartMode::IncomingMigration && !capabilities.migration {
            return Err(Error::unsupported(driver.name(), "incoming migration"));
        }
        let session = driver.open(&vm, mode)?;
        Ok(Manager {
            plugin: plugin.clone(),
            capabilities,
            vm,
            mode,
            resources: Vec::new(),
            phase: if mode == StartMode::Attach {
                Phase::Held
            } else {
                Phase::Created
            },
            session,
        })
    }

    /// The VM's identity.
    pub fn vm(&self) -> &VmParams {
        &self.vm
    }

    /// The lifecycle phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// How the manager was created.
    pub fn mode(&self) -> StartMode {
        self.mode
    }

    /// The driver's capabilities.
    pub fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    /// The resources registered so far (and hotplugged since).
    pub fn resources(&self) -> &[Resource] {
        &self.resources
    }

    fn driver_name(&self) -> &str {
        self.plugin.driver().name()
    }

    fn require(&self, supported: bool, operation: &str) -> Result<()> {
        if supported {
            Ok(())
        } else {
            Err(Error::unsupported(self.driver_name(), operation))
        }
    }

    fn require_phase(&self, operation: &str, allowed: &[Phase]) -> Result<()> {
        if allowed.contains(&self.phase) {
            Ok(())
        } else {
            Err(Error::invalid_state(
                operation,
                format!(
                    "the manager of VM \"{}\" is in phase {:?}",
                    self.vm.name, self.phase
                ),
            ))
        }
    }

    fn check_resource(&self, resource: &Resource) -> Result<()> {
        resource.validate()?;
        match resource {
            Resource::Lease(_) => self.require(self.capabilities.leases, "explicit leases"),
            Resource::Disk { .. } => Ok(()),
        }
    }

    /// Adds a resource before acquire (the seed's `RegisterResource`). Registering the same
    /// resource twice is harmless; the same disk with two modes is an error.
    pub fn register_resource(&mut self, resource: Resource) -> Result<()> {
        self.require_phase("register a resource", &[Phase::Created, Phase::Registered])?;
        self.check_resource(&resource)?;
        self.add_resource(resource)
    }

    fn add_resource(&mut self, resource: Resource) -> Result<()> {
        if let Some(existing) = self.resources.iter().find(|r| r.path() == resource.path()) {
            if *existing == resource {
                return Ok(());
            }
            if matches!(
                (existing, &resource),
                (Resource::Disk { .. }, Resource::Disk { .. })
            ) {
                return Err(Error::InvalidResource {
                    resource: resource.to_string(),
                    reason: format!("already registered as {existing}"),
                });
            }
        }
        self.resources.push(resource);
        Ok(())
    }

    fn locked_resources(&self) -> Vec<Resource> {
        if self.capabilities.disk_resources {
            self.resources.clone()
        } else {
            // VM-level-lease drivers ignore disk paths, as the seed allows.
            self.resources
                .iter()
                .filter(|r| matches!(r, Resource::Lease(_)))
                .cloned()
                .collect()
        }
    }

    fn check_options(&self, options: &AcquireOptions) -> Result<()> {
        match options.on_lock_failure {
            LockFailureAction::Restart => Err(Error::unsupported(
                self.driver_name(),
                "on-lock-failure \"restart\" (a restarted guest would race other hosts for its leases; use poweroff and let the VM manager restart it)",
            )),
            // Pausing needs a way in: QMP, or a supervisor that pauses through the VM manager.
            LockFailureAction::Pause if options.qmp_socket.is_none() && !options.supervisor_acts => {
                Err(Error::InvalidParameter {
                    key: "on-lock-failure".into(),
                    reason: "\"pause\" needs the guest's QMP socket (or a supervisor that pauses it)"
                        .into(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Takes every registered resource, all or nothing (the seed's `AcquireObject`). With
    /// `register_only` the owner is registered and nothing is taken yet.
    pub fn acquire(&mut self, options: &AcquireOptions) -> Result<()> {
        if self.mode == StartMode::IncomingMigration {
            return Err(Error::invalid_state(
                "acquire",
                "a migration destination acquires with the source's state (acquire_incoming)",
            ));
        }
        self.require_phase(
            "acquire",
            &[Phase::Created, Phase::Registered, Phase::Released],
        )?;
        self.check_options(options)?;
        let resources = self.locked_resources();
        self.session.acquire(&resources, options, None)?;
        self.phase = if options.register_only {
            Phase::Registered
        } else {
            Phase::Held
        };
        Ok(())
    }

    /// Takes the registered resources again after a pause, checking that nobody else held them
    /// since `state` was handed out.
    pub fn resume(&mut self, state: &LockState, options: &AcquireOptions) -> Result<()> {
        self.require_phase("resume", &[Phase::Released, Phase::Registered])?;
        state.check_driver(self.driver_name())?;
        self.check_options(options)?;
        let resources = self.locked_resources();
        self.session.acquire(&resources, options, Some(state))?;
        self.phase = Phase::Held;
        Ok(())
    }

    /// Destination of a migration: takes the resources over from the source with the state the
    /// source's [`Manager::prepare_migration`] returned. A state from another driver is refused.
    pub fn acquire_incoming(&mut self, state: &LockState, options: &AcquireOptions) -> Result<()> {
        if self.mode != StartMode::IncomingMigration {
            return Err(Error::invalid_state(
                "acquire with a migration state",
                "the manager was not created for an incoming migration",
            ));
        }
        self.require_phase("acquire", &[Phase::Created, Phase::Registered])?;
        state.check_driver(self.driver_name())?;
        self.check_options(options)?;
        let resources = self.locked_resources();
        self.session.acquire(&resources, options, Some(state))?;
        self.phase = Phase::Held;
        Ok(())
    }

    /// Hotplug: takes one more resource for the running VM before the device is added.
    pub fn acquire_resource(&mut self, resource: Resource) -> Result<()> {
        self.require(self.capabilities.hotplug, "disk hotplug")?;
        self.require_phase("hotplug a resource", &[Phase::Held])?;
        self.check_resource(&resource)?;
        if self.capabilities.disk_resources || matches!(resource, Resource::Lease(_)) {
            self.session.acquire(
                std::slice::from_ref(&resource),
                &AcquireOptions::default(),
                None,
            )?;
        }
        self.add_resource(resource)
    }

    /// Unplug: gives up one resource after the device was removed.
    pub fn release_resource(&mut self, resource: &Resource) -> Result<LockState> {
        self.require(self.capabilities.hotplug, "disk unplug")?;
        self.require_phase("unplug a resource", &[Phase::Held])?;
        self.check_resource(resource)?;
        let state = self.session.release(std::slice::from_ref(resource))?;
        self.resources.retain(|r| r != resource);
        Ok(state)
    }

    /// Releases everything the VM holds and returns the state to resume or migrate with
    /// (the seed's release on pause). Every resource that can be released is; all failures
    /// are reported together.
    pub fn release(&mut self) -> Result<LockState> {
        self.require_phase(
            "release",
            &[Phase::Held, Phase::Registered, Phase::MigratingOut],
        )?;
        let resources = self.held_resources()?;
        let state = self.session.release(&resources);
        // Whatever failed is reported; what succeeded is gone either way.
        self.phase = Phase::Released;
        state
    }

    fn held_resources(&mut self) -> Result<Vec<Resource>> {
        if self.mode == StartMode::Attach && self.resources.is_empty() {
            // A manager that attached to a running guest knows its resources from the service.
            Ok(self
                .session
                .inquire()?
                .entries
                .into_iter()
                .map(|e| e.resource)
                .collect())
        } else {
            Ok(self.locked_resources())
        }
    }

    /// The state of what the VM holds, releasing nothing.
    pub fn inquire(&mut self) -> Result<LockState> {
        self.session.inquire()
    }

    /// The guest process the lock service knows for this VM (the seed's `GetChild`). After a VM
    /// manager restart this finds the running guest; `None` means the service knows no guest.
    pub fn guest_pid(&mut self) -> Result<Option<u32>> {
        // Drivers that do not track the guest themselves know it from `guest_started`.
        Ok(self.session.guest_pid()?.or(self.vm.pid))
    }

    /// Source side, before QEMU migrates: the state to hand to the destination. The source keeps
    /// holding everything until [`Manager::complete_migration`].
    pub fn prepare_migration(&mut self, destination_uri: &str) -> Result<LockState> {
        self.require(self.capabilities.migration, "migration")?;
        // Asked again (libvirt inquires at each migration step), the service hands out the same
        // secret.
        self.require_phase("prepare a migration", &[Phase::Held, Phase::MigratingOut])?;
        if destination_uri.is_empty() {
            return Err(Error::InvalidParameter {
                key: "destination uri".into(),
                reason: "must not be empty".into(),
            });
        }
        let state = self.session.prepare_migration(destination_uri)?;
        self.phase = Phase::MigratingOut;
        Ok(state)
    }

    /// Either side, when QEMU's migration ended: `Success` moves the leases to the destination,
    /// `Cancel` leaves the source holding everything and the destination nothing.
    pub fn complete_migration(&mut self, outcome: MigrationOutcome) -> Result<()> {
        self.require(self.capabilities.migration, "migration")?;
        // The destination of this migration; a former destination that prepared a migration of
        // its own (a VM migrated twice on one host) is that migration's source.
        let incoming =
            self.mode == StartMode::IncomingMigration && self.phase != Phase::MigratingOut;
        // A manager attached after a VM-manager restart (or a CLI step) may complete a migration
        // that another manager object prepared.
        let allowed: &[Phase] = if incoming {
            &[Phase::Held, Phase::Created]
        } else if self.mode == StartMode::Attach {
            &[Phase::Held, Phase::MigratingOut]
        } else {
            &[Phase::MigratingOut]
        };
        self.require_phase("complete a migration", allowed)?;
        self.session.complete_migration(outcome, incoming)?;
        self.phase = match (outcome, incoming) {
            (MigrationOutcome::Success, true) | (MigrationOutcome::Cancel, false) => Phase::Held,
            (MigrationOutcome::Success, false) | (MigrationOutcome::Cancel, true) => {
                Phase::Released
            }
        };
        Ok(())
    }

    /// A supervisor that acquired before starting the guest reports the guest's pid; the locks
    /// follow that process from now on, and [`Manager::guest_pid`] returns it.
    pub fn guest_started(&mut self, pid: u32) -> Result<()> {
        self.require_phase(
            "record the guest process",
            &[Phase::Held, Phase::Registered],
        )?;
        if pid == 0 {
            return Err(Error::InvalidParameter {
                key: "pid".into(),
                reason: "must not be 0".into(),
            });
        }
        self.session.guest_started(pid)?;
        self.vm.pid = Some(pid);
        Ok(())
    }

    /// Copies of the descriptions that keep this VM's locks, for a guest to inherit (see
    /// [`crate::Session::lock_descriptions`]).
    pub fn lock_descriptions(&self) -> Vec<std::os::fd::OwnedFd> {
        self.session.lock_descriptions()
    }

    /// The guest has stopped: release everything (the seed's `Shutdown`).
    ///
    /// Refused with [`Error::GuestRunning`] while the guest process still runs, because giving up
    /// a running guest's leases is exactly the double-writer vmlock exists to prevent. When the
    /// guest is gone but the lock service cannot confirm the release, the error is returned and
    /// the caller kills the supervisor (see [`crate::domain::stop`]): the supervisor holds the
    /// locks' file descriptions, so its death frees them and nothing can keep a dead guest's disks.
    pub fn shutdown(&mut self) -> Result<()> {
        if self.phase == Phase::ShutDown {
            return Ok(());
        }
        // The guest this manager was given first: after a migration the service may already
        // name the destination's guest, which must not keep the source from shutting down.
        let pid = match self.vm.pid {
            Some(pid) => Some(pid),
            None => self.session.guest_pid().ok().flatten(),
        };
        if let Some(pid) = pid {
            if crate::process::is_running(pid) {
                return Err(Error::GuestRunning {
                    vm: self.vm.name.clone(),
                    pid,
                });
            }
        }
        self.session.shutdown()?;
        self.phase = Phase::ShutDown;
        Ok(())
    }

    /// The supervisor program that must run this VM's guest, with its arguments (the seed's
    /// `GetSupervisorPath`/`GetSupervisorArgs`); `None` when the driver needs none.
    pub fn supervisor(&self) -> Option<SupervisorCommand> {
        self.plugin.driver().supervisor(&self.vm, &self.resources)
    }
}
