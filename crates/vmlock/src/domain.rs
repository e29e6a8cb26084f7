//! A small layer for VM managers (the seed's `domain_lock` wrappers): one call per lifecycle
//! event, each building on [`Manager`].

use crate::driver::{AcquireOptions, MigrationOutcome};
use crate::error::{Error, Result};
use crate::lockstate::LockState;
use crate::manager::Manager;
use crate::params::{StartMode, VmParams};
use crate::registry::Plugin;
use crate::resource::Resource;
use std::process::Child;

/// Guest start: a manager for `vm` with `resources`, all acquired before the guest runs.
/// On error nothing is held.
pub fn process_start(
    plugin: &Plugin,
    vm: VmParams,
    resources: impl IntoIterator<Item = Resource>,
    options: &AcquireOptions,
) -> Result<Manager> {
    let mut manager = Manager::new(plugin, vm, StartMode::Start)?;
    for r in resources {
        manager.register_resource(r)?;
    }
    manager.acquire(options)?;
    Ok(manager)
}

/// Guest paused: releases everything and returns the state to resume with.
pub fn process_pause(manager: &mut Manager) -> Result<LockState> {
    manager.release()
}

/// Guest resumed: re-acquires with the state from [`process_pause`].
pub fn process_resume(
    manager: &mut Manager,
    state: &LockState,
    options: &AcquireOptions,
) -> Result<()> {
    manager.resume(state, options)
}

/// VM manager restarted: a manager attached to the running guest `vm`, and its guest pid.
pub fn process_reattach(plugin: &Plugin, vm: VmParams) -> Result<(Manager, Option<u32>)> {
    let mut manager = Manager::new(plugin, vm, StartMode::Attach)?;
    let pid = manager.guest_pid()?;
    Ok((manager, pid))
}

/// Disk hotplug: lock `disk` before the device is added; on error do not add it.
pub fn disk_attach(manager: &mut Manager, disk: Resource) -> Result<()> {
    match disk {
        Resource::Disk { .. } => manager.acquire_resource(disk),
        Resource::Lease(_) => Err(not_a("disk", &disk)),
    }
}

/// Disk unplug: release `disk` after the device was removed.
pub fn disk_detach(manager: &mut Manager, disk: &Resource) -> Result<LockState> {
    match disk {
        Resource::Disk { .. } => manager.release_resource(disk),
        Resource::Lease(_) => Err(not_a("disk", disk)),
    }
}

/// Lease hotplug.
pub fn lease_attach(manager: &mut Manager, lease: Resource) -> Result<()> {
    match lease {
        Resource::Lease(_) => manager.acquire_resource(lease),
        Resource::Disk { .. } => Err(not_a("lease", &lease)),
    }
}

/// Lease unplug.
pub fn lease_detach(manager: &mut Manager, lease: &Resource) -> Result<LockState> {
    match lease {
        Resource::Lease(_) => manager.release_resource(lease),
        Resource::Disk { .. } => Err(not_a("lease", lease)),
    }
}

/// Migration begins on the source: the state for the destination.
pub fn migration_begin(source: &mut Manager, destination_uri: &str) -> Result<LockState> {
    source.prepare_migration(destination_uri)
}

/// Migration destination: a manager in migrate mode for `vm` that takes `resources` over with
/// the source's `state`.
pub fn migration_incoming(
    plugin: &Plugin,
    vm: VmParams,
    resources: impl IntoIterator<Item = Resource>,
    state: &LockState,
    options: &AcquireOptions,
) -> Result<Manager> {
    // Checked before the driver is asked anything: a destination registers as soon as its
    // manager exists.
    state.check_driver(plugin.driver().name())?;
    let mut manager = Manager::new(plugin, vm, StartMode::IncomingMigration)?;
    for r in resources {
        manager.register_resource(r)?;
    }
    manager.acquire_incoming(state, options)?;
    Ok(manager)
}

/// Migration succeeded: the source gives up first, then the destination takes over. Drivers that
/// move the very locks (lockd) do the whole hand-off at the first call; sanlock, whose exclusive
/// leases cannot be held by two hosts at once, releases the source's shared lease first and then
/// converts the destination's shared lease to exclusive (docs/sanlock.md §6).
pub fn migration_finish(source: &mut Manager, destination: &mut Manager) -> Result<()> {
    source.complete_migration(MigrationOutcome::Success)?;
    destination.complete_migration(MigrationOutcome::Success)
}

/// Migration failed: the destination lets go, the source keeps everything.
pub fn migration_cancel(source: &mut Manager, destination: Option<&mut Manager>) -> Result<()> {
    let dest = destination.map(|d| d.complete_migration(MigrationOutcome::Cancel));
    source.complete_migration(MigrationOutcome::Cancel)?;
    dest.unwrap_or(Ok(()))
}

/// Guest stopped: release everything. If the lock service cannot confirm the release while the
/// guest is gone, the supervisor is killed and reaped, because its open file descriptions are what
/// keeps the locks and a lock must never outlive the guest it protects. A running guest is never
/// touched: its leases stay (see [`Manager::shutdown`]).
pub fn stop(manager: &mut Manager, supervisor: Option<&mut Child>) -> Result<()> {
    match manager.shutdown() {
        Ok(()) => Ok(()),
        Err(e @ Error::GuestRunning { .. }) => Err(e),
        Err(e) => {
            if let Some(child) = supervisor {
                // Killing an already-exited child fails harmlessly; wait reaps it either way.
                let _ = child.kill();
                child
                    .wait()
                    .map_err(|io| Error::io("reaping the lock supervisor", &io))?;
                return Ok(());
            }
            Err(e)
        }
    }
}

fn not_a(what: &str, r: &Resource) -> Error {
    Error::InvalidResource {
        resource: r.to_string(),
        reason: format!("is not a {what}"),
    }
}
