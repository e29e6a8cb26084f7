//! The `nop` driver: grants everything and excludes nothing. It is the default when locking is
//! off, and the simplest driver that passes the conformance kit, since it declares
//! `exclusion: false`. It still keeps per-session bookkeeping so that release, inquire and
//! migration return true states.

use crate::driver::{AcquireOptions, Capabilities, Driver, MigrationOutcome, Session};
use crate::error::{Error, ResourceFailure, Result};
use crate::lockstate::{LockState, StateEntry};
use crate::params::{StartMode, VmParams};
use crate::registry::{parse_config, DriverConfig};
use crate::resource::Resource;
use std::collections::BTreeSet;
use std::sync::Arc;

/// The `nop` driver.
#[derive(Debug, Default)]
pub struct NopDriver;

impl NopDriver {
    /// Factory for the registry; `nop` takes no options.
    pub fn from_config(config: &DriverConfig) -> Result<Arc<dyn Driver>> {
        let NopConfig {} = parse_config("nop", config)?;
        Ok(Arc::new(NopDriver))
    }
}

/// `nop` has no options: any key is refused.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NopConfig {}

impl Driver for NopDriver {
    fn name(&self) -> &str {
        "nop"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            disk_resources: true,
            leases: true,
            hotplug: true,
            migration: true,
            lock_state: false,
            exclusion: false,
            supervisor: false,
            host_status: false,
        }
    }

    fn open(&self, vm: &VmParams, _mode: StartMode) -> Result<Box<dyn Session>> {
        Ok(Box::new(NopSession {
            pid: vm.pid,
            held: BTreeSet::new(),
        }))
    }
}

#[derive(Debug)]
struct NopSession {
    pid: Option<u32>,
    held: BTreeSet<Resource>,
}

impl NopSession {
    fn state(&self) -> LockState {
        LockState {
            driver: "nop".into(),
            entries: self
                .held
                .iter()
                .map(|r| StateEntry {
                    resource: r.clone(),
                    version: 0,
                })
                .collect(),
            handover: None,
        }
    }
}

impl Session for NopSession {
    fn acquire(
        &mut self,
        resources: &[Resource],
        options: &AcquireOptions,
        _state: Option<&LockState>,
    ) -> Result<()> {
        if !options.register_only {
            self.held
                .extend(resources.iter().filter(|r| r.is_locked()).cloned());
        }
        Ok(())
    }

    fn release(&mut self, resources: &[Resource]) -> Result<LockState> {
        let mut released = LockState::empty("nop");
        let mut failures = Vec::new();
        for r in resources.iter().filter(|r| r.is_locked()) {
            if self.held.remove(r) {
                released.entries.push(StateEntry {
                    resource: r.clone(),
                    version: 0,
                });
            } else {
                failures.push(ResourceFailure {
                    resource: r.label(),
                    error: Box::new(Error::NotHeld {
                        resource: r.label(),
                        owner: "this VM".into(),
                    }),
                });
            }
        }
        if failures.is_empty() {
            Ok(released)
        } else {
            Err(Error::PartialRelease { failures })
        }
    }

    fn inquire(&mut self) -> Result<LockState> {
        Ok(self.state())
    }

    fn guest_pid(&mut self) -> Result<Option<u32>> {
        Ok(self.pid)
    }

    fn prepare_migration(&mut self, _destination_uri: &str) -> Result<LockState> {
        Ok(self.state())
    }

    fn complete_migration(&mut self, outcome: MigrationOutcome, incoming: bool) -> Result<()> {
        let gives_up = match outcome {
            MigrationOutcome::Success => !incoming,
            MigrationOutcome::Cancel => incoming,
        };
        if gives_up {
            self.held.clear();
        }
        Ok(())
    }

    fn shutdown(&mut self) -> Result<()> {
        self.held.clear();
        Ok(())
    }

    fn driver_name(&self) -> &str {
        "nop"
    }
}
