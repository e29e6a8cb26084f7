//! # vmlock: the lock manager API
//!
//! vmlock guarantees that **no disk image is ever written by two VMs at once**. This crate is the
//! API a VM manager (libvirt-like daemon, orchestration agent, or the `vmlock run` command) uses
//! through a guest's whole life. Drivers do the locking: `nop` (built in, locks nothing), `lockd`
//! (the local daemon `vmlockd`, crate `vmlockd`), and later cluster drivers.
//!
//! The calls, in the order a VM manager makes them (the seed's "Using the Lock Manager APIs"):
//!
//! ## 1. Load a driver once, at VM-manager start
//! ```
//! use vmlock::{Registry, DriverConfig};
//! let registry = Registry::new();
//! let plugin = registry.load("nop", &DriverConfig::new())?;
//! assert!(!plugin.driver().capabilities().exclusion);
//! # Ok::<(), vmlock::Error>(())
//! ```
//!
//! ## 2. Guest start: a manager per VM, its disks, acquire, then run the guest
//! ```
//! use vmlock::*;
//! # let plugin = Registry::new().load("nop", &DriverConfig::new())?;
//! let vm = VmParams::new(1, "7c9e6679-7425-40de-944b-e07fc1f90ae7".parse().unwrap(), "web1")?;
//! let mut manager = Manager::new(&plugin, vm, StartMode::Start)?;
//! manager.register_resource("/var/lib/images/web1.qcow2".parse()?)?;
//! manager.register_resource("/var/lib/images/shared.img,shared".parse()?)?;
//! manager.register_resource("/var/lib/images/install.iso,readonly".parse()?)?;
//! manager.acquire(&AcquireOptions::default())?;   // all or nothing
//! // ... now start QEMU, under manager.supervisor() when the driver has one ...
//! # Ok::<(), vmlock::Error>(())
//! ```
//!
//! ## 3. Guest shutdown
//! After QEMU quit or was killed, [`Manager::shutdown`] releases everything; it refuses while the
//! guest still runs. [`domain::stop`] also handles a lock service that cannot confirm.
//! ```
//! # use vmlock::*;
//! # let plugin = Registry::new().load("nop", &DriverConfig::new())?;
//! # let vm = VmParams::new(1, uuid::Uuid::new_v4(), "web1")?;
//! let mut manager = domain::process_start(&plugin, vm, ["/img/a.qcow2".parse()?], &AcquireOptions::default())?;
//! manager.shutdown()?;
//! # Ok::<(), vmlock::Error>(())
//! ```
//!
//! ## 4. VM-manager restart with running guests
//! Attach to the running guest by uuid and find its pid (the seed's `GetChild`).
//! ```
//! # use vmlock::*;
//! # let plugin = Registry::new().load("nop", &DriverConfig::new())?;
//! # let vm = VmParams::new(1, uuid::Uuid::new_v4(), "web1")?.with_pid(std::process::id());
//! let (mut manager, guest_pid) = domain::process_reattach(&plugin, vm)?;
//! assert_eq!(guest_pid, Some(std::process::id()));
//! # Ok::<(), vmlock::Error>(())
//! ```
//!
//! ## 5. Disk hotplug and unplug
//! ```
//! # use vmlock::*;
//! # let plugin = Registry::new().load("nop", &DriverConfig::new())?;
//! # let vm = VmParams::new(1, uuid::Uuid::new_v4(), "web1")?;
//! # let mut manager = domain::process_start(&plugin, vm, [], &AcquireOptions::default())?;
//! let disk: Resource = "/img/extra.qcow2".parse()?;
//! domain::disk_attach(&mut manager, disk.clone())?;   // abort the hotplug on error
//! // ... device_add, later device_del ...
//! domain::disk_detach(&mut manager, &disk)?;          // log a warning on error
//! # Ok::<(), vmlock::Error>(())
//! ```
//!
//! ## 6. Migration: prepare on the source, migrate-mode manager on the destination, complete
//! ```
//! # use vmlock::*;
//! # let plugin = Registry::new().load("nop", &DriverConfig::new())?;
//! # let vm = VmParams::new(1, uuid::Uuid::new_v4(), "web1")?;
//! # let disks: Vec<Resource> = vec!["/img/a.qcow2".parse()?];
//! let mut source = domain::process_start(&plugin, vm.clone(), disks.clone(), &AcquireOptions::default())?;
//! let state = domain::migration_begin(&mut source, "qemu+tcp://dst/system")?;
//! let text = state.to_string();                        // travels in the migration cookie
//! let mut dest = domain::migration_incoming(&plugin, vm, disks, &text.parse()?, &AcquireOptions::default())?;
//! // ... QEMU migrates; on success:
//! domain::migration_finish(&mut source, &mut dest)?;   // or domain::migration_cancel(...)
//! # Ok::<(), vmlock::Error>(())
//! ```
//!
//! ## 7. Unload the driver at VM-manager shutdown: [`Plugin::unload`].

pub mod domain;
pub mod driver;
pub mod error;
pub mod lockstate;
pub mod manager;
pub mod nop;
pub mod params;
pub mod process;
pub mod registry;
pub mod resource;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use driver::{
    AcquireOptions, Capabilities, Driver, LockFailureAction, MigrationOutcome, Session,
    SupervisorCommand,
};
pub use error::{Error, ForeignHolder, Holder, ResourceFailure, Result};
pub use lockstate::{LockState, StateEntry};
pub use manager::{Manager, Phase};
pub use params::{StartMode, VmParams};
pub use registry::{DriverConfig, Plugin, Registry};
pub use resource::{DiskMode, Lease, Resource};
pub use uuid;
