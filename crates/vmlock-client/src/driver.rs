//! The `lockd` driver: the lock manager API on top of vmlockd.
//!
//! A start registers a [`Holder`] in the calling process (for `vmlock run`, the supervisor), then
//! acquires through a request connection; the daemon hands each lock's description to the holder.
//! Dropping the manager releases nothing: locks follow the guest process.

use crate::connection::{unexpected, Connection, Endpoint};
use crate::holder::Holder;
use crate::proto::{AcquireFlags, HeldLock, HeldResource, Reply, Request, VmIdentity};
use crate::runtime::RuntimeDir;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use vmlock::registry::parse_config;
use vmlock::{
    AcquireOptions, Capabilities, Driver, DriverConfig, Error, LockState, MigrationOutcome,
    Resource, Result, Session, StartMode, StateEntry, SupervisorCommand, VmParams,
};

/// Name of the driver.
pub const NAME: &str = "lockd";

/// The driver.
#[derive(Debug)]
pub struct LockdDriver {
    endpoint: Endpoint,
    /// For the next start: take the VM over from its self-holding guest.
    takeover: Mutex<Option<Takeover>>,
}

/// What a guest that held its own locks hands down to its child, the holder that takes over
/// (libvirt's pre-exec child to `vmlock libvirt holder`).
#[derive(Debug)]
pub struct Takeover {
    /// The guest (the holder's parent).
    pub guest_pid: u32,
    /// What the guest took, with one description each.
    pub locks: Vec<HeldLock>,
    /// Those descriptions, in the same order.
    pub fds: Vec<OwnedFd>,
    /// The VM's options (lock-failure action, who carries it out), handed over with the
    /// takeover: a daemon that lost its state files meanwhile learns them from it.
    pub flags: Option<AcquireFlags>,
}

impl LockdDriver {
    /// A driver for the daemon at `endpoint`.
    pub fn new(endpoint: Endpoint) -> Self {
        LockdDriver {
            endpoint,
            takeover: Mutex::new(None),
        }
    }

    /// A driver whose next [`StartMode::Start`] session takes the VM over from its guest, which
    /// registered as its own holder and took `takeover.locks`, instead of registering a new
    /// holder: the session's acquire then finds everything already held (idempotent).
    pub fn taking_over(endpoint: Endpoint, takeover: Takeover) -> Self {
        LockdDriver {
            endpoint,
            takeover: Mutex::new(Some(takeover)),
        }
    }

    /// Registry factory. Keys: `runtime_dir` (default as `vmlock --runtime-dir`), `auto_start`
    /// (default true), `daemon` (program), `daemon_config` (file passed to a started daemon).
    pub fn from_config(config: &DriverConfig) -> Result<Arc<dyn Driver>> {
        let c: LockdConfig = parse_config(NAME, config)?;
        let runtime = RuntimeDir::resolve(c.runtime_dir.as_deref())?;
        let mut endpoint = Endpoint::new(runtime);
        if let Some(b) = c.auto_start {
            endpoint.auto_start = b;
        }
        if let Some(p) = c.daemon {
            endpoint.daemon_program = p;
            endpoint.daemon_args.clear();
        }
        endpoint.daemon_config = c.daemon_config;
        Ok(Arc::new(LockdDriver::new(endpoint)))
    }
}

/// The `lockd` driver's TOML keys; every one is optional and any other key is refused.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LockdConfig {
    runtime_dir: Option<PathBuf>,
    auto_start: Option<bool>,
    daemon: Option<PathBuf>,
    daemon_config: Option<PathBuf>,
}

/// Adds `lockd` to a registry.
pub fn register(registry: &mut vmlock::Registry) {
    registry.register(NAME, LockdDriver::from_config);
}

impl Driver for LockdDriver {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            disk_resources: true,
            leases: true,
            hotplug: true,
            migration: true,
            lock_state: true,
            exclusion: true,
            supervisor: true,
            host_status: true,
        }
    }

    fn open(&self, vm: &VmParams, mode: StartMode) -> Result<Box<dyn Session>> {
        let mut conn = self.endpoint.connect()?;
        let identity = VmIdentity {
            uuid: vm.uuid.to_string(),
            name: vm.name.clone(),
            id: vm.id,
            pid: vm.pid.unwrap_or_else(std::process::id),
        };
        if mode == StartMode::Attach {
            match conn.call(
                &Request::Lookup {
                    uuid: identity.uuid.clone(),
                },
                &[],
            )? {
                Reply::Vm(_) => {}
                other => return Err(unexpected(&other)),
            }
        }
        // A destination registers at once, so a start that is no migration (nothing prepared
        // on the source) is refused before its guest runs, with the source named.
        let takeover = match mode {
            StartMode::Start => self.takeover.lock().ok().and_then(|mut t| t.take()),
            _ => None,
        };
        let mut identity = identity;
        let holder = match (mode, takeover) {
            (StartMode::IncomingMigration, _) => {
                Some(Holder::start_incoming(&self.endpoint, identity.clone())?)
            }
            (_, Some(t)) => {
                identity.pid = t.guest_pid;
                Some(Holder::take_over(
                    &self.endpoint,
                    identity.clone(),
                    t.locks,
                    t.fds,
                    t.flags,
                )?)
            }
            _ => None,
        };
        Ok(Box::new(LockdSession {
            endpoint: self.endpoint.clone(),
            conn,
            vm: identity,
            holder,
            mode,
        }))
    }

    fn supervisor(&self, vm: &VmParams, resources: &[Resource]) -> Option<SupervisorCommand> {
        let program = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("vmlock")))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("vmlock"));
        let mut args: Vec<std::ffi::OsString> = vec![
            "--runtime-dir".into(),
            self.endpoint.runtime.path().into(),
            "run".into(),
            "--name".into(),
            vm.name.clone().into(),
            "--uuid".into(),
            vm.uuid.to_string().into(),
            "--id".into(),
            vm.id.to_string().into(),
        ];
        for r in resources {
            match r {
                Resource::Disk { path, mode } => {
                    args.push("--disk".into());
                    let flag = match mode {
                        vmlock::DiskMode::Exclusive => "",
                        vmlock::DiskMode::Shared => ",shared",
                        vmlock::DiskMode::ReadOnly => ",readonly",
                    };
                    args.push(format!("{}{flag}", path.display()).into());
                }
                Resource::Lease(l) => {
                    args.push("--lease".into());
                    args.push(
                        format!(
                            "{}:{}:{}:{}",
                            l.lockspace,
                            l.key,
                            l.path.display(),
                            l.offset
                        )
                        .into(),
                    );
                }
            }
        }
        args.push("--".into());
        Some(SupervisorCommand { program, args })
    }
}

#[derive(Debug)]
struct LockdSession {
    endpoint: Endpoint,
    conn: Connection,
    vm: VmIdentity,
    holder: Option<Holder>,
    mode: StartMode,
}

impl LockdSession {
    fn state(held: Vec<HeldResource>) -> LockState {
        LockState {
            driver: NAME.into(),
            entries: held
                .into_iter()
                .map(|h| StateEntry {
                    resource: h.resource,
                    version: h.version,
                })
                .collect(),
            handover: None,
        }
    }

    fn held(&mut self, request: &Request) -> Result<LockState> {
        match self.conn.call(request, &[])? {
            Reply::Held(h) => Ok(Self::state(h)),
            other => Err(unexpected(&other)),
        }
    }
}

impl Session for LockdSession {
    fn acquire(
        &mut self,
        resources: &[Resource],
        options: &AcquireOptions,
        state: Option<&LockState>,
    ) -> Result<()> {
        if let Some(state) = state {
            state.check_driver(NAME)?;
        }
        if self.mode == StartMode::IncomingMigration {
            let state = state.ok_or_else(|| Error::InvalidLockState {
                reason: "a migration destination needs the source's state".into(),
            })?;
            let holder = match self.holder.take() {
                Some(h) => h,
                None => Holder::start_incoming(&self.endpoint, self.vm.clone())?,
            };
            let versions = state
                .entries
                .iter()
                .map(|e| (e.resource.clone(), e.version))
                .collect();
            if let Err(e) = self.held(&Request::AcquireIncoming {
                uuid: self.vm.uuid.clone(),
                versions,
                token: state.handover.clone(),
            }) {
                holder.stop(); // takes nothing: the source keeps everything
                return Err(e);
            }
            self.holder = Some(holder);
            return Ok(());
        }
        let mut fresh_holder = false;
        if self.holder.is_none()
            && self
                .conn
                .call(
                    &Request::Lookup {
                        uuid: self.vm.uuid.clone(),
                    },
                    &[],
                )
                .is_err()
        {
            self.holder = Some(Holder::start(&self.endpoint, self.vm.clone())?);
            fresh_holder = true;
        }
        let flags = AcquireFlags {
            register_only: options.register_only,
            restrict: options.restrict,
            on_lock_failure: options.on_lock_failure,
            hold_qemu_bytes: options.hold_qemu_bytes,
            qmp_socket: options.qmp_socket.clone(),
            supervisor_acts: options.supervisor_acts,
            // Our own holder thread keeps the descriptions: take them in the reply.
            reply_with_fds: self.holder.is_some(),
        };
        let request = Request::Acquire {
            uuid: self.vm.uuid.clone(),
            resources: resources.to_vec(),
            flags: flags.clone(),
        };
        let result = match self.conn.call_with_fds(&request, &[]) {
            Ok((Reply::Held(_), _)) => Ok(()),
            Ok((Reply::Kept { locks, .. }, fds)) => match &self.holder {
                Some(holder) => holder.keep_local(locks, fds),
                None => Err(Error::Protocol {
                    reason: "descriptors sent to a session without a holder".into(),
                }),
            },
            Ok((other, _)) => Err(unexpected(&other)),
            Err(e) => Err(e),
        };
        if let (Ok(()), Some(holder)) = (&result, &self.holder) {
            // Handed back if the daemon restarts without its state files (never defaults).
            holder.acquired(&flags);
        }
        if result.is_err() && fresh_holder {
            // A start that failed leaves no owner behind, so the VM manager can retry.
            if let Some(h) = self.holder.take() {
                h.stop();
            }
        }
        result
    }

    fn release(&mut self, resources: &[Resource]) -> Result<LockState> {
        let uuid = self.vm.uuid.clone();
        let Some(holder) = &self.holder else {
            return self.held(&Request::Release {
                uuid,
                resources: Some(resources.to_vec()),
            });
        };
        // Our own holder keeps the copies: drop exactly what the daemon released.
        match self.conn.call(
            &Request::ReleaseKept {
                uuid,
                resources: resources.to_vec(),
            },
            &[],
        ) {
            Ok(Reply::Held(held)) => {
                let released: Vec<Resource> = held.iter().map(|h| h.resource.clone()).collect();
                holder.forget_local(&released);
                Ok(Self::state(held))
            }
            Ok(other) => Err(unexpected(&other)),
            Err(Error::PartialRelease { failures }) => {
                let released: Vec<Resource> = resources
                    .iter()
                    .filter(|r| !failures.iter().any(|f| f.resource == r.label()))
                    .cloned()
                    .collect();
                holder.forget_local(&released);
                Err(Error::PartialRelease { failures })
            }
            Err(e) => Err(e),
        }
    }

    fn inquire(&mut self) -> Result<LockState> {
        self.held(&Request::Inquire {
            uuid: self.vm.uuid.clone(),
        })
    }

    fn guest_pid(&mut self) -> Result<Option<u32>> {
        match self.conn.call(
            &Request::Lookup {
                uuid: self.vm.uuid.clone(),
            },
            &[],
        ) {
            Ok(Reply::Vm(vm)) => Ok(Some(vm.pid)),
            Ok(other) => Err(unexpected(&other)),
            Err(Error::UnknownOwner { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn guest_started(&mut self, pid: u32) -> Result<()> {
        match self.conn.call(
            &Request::GuestStarted {
                uuid: self.vm.uuid.clone(),
                pid,
            },
            &[],
        )? {
            Reply::Ok => {
                self.vm.pid = pid;
                if let Some(holder) = &self.holder {
                    holder.guest_started(pid);
                }
                Ok(())
            }
            other => Err(unexpected(&other)),
        }
    }

    fn prepare_migration(&mut self, _destination_uri: &str) -> Result<LockState> {
        let request = Request::MigratePrepare {
            uuid: self.vm.uuid.clone(),
        };
        match self.conn.call(&request, &[])? {
            Reply::Prepared { held, token } => {
                let mut state = Self::state(held);
                state.handover = Some(token);
                Ok(state)
            }
            other => Err(unexpected(&other)),
        }
    }

    fn complete_migration(&mut self, outcome: MigrationOutcome, incoming: bool) -> Result<()> {
        let success = outcome == MigrationOutcome::Success;
        match self.conn.call(
            &Request::MigrateComplete {
                uuid: self.vm.uuid.clone(),
                success,
                source: !incoming,
            },
            &[],
        )? {
            Reply::Ok => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    fn shutdown(&mut self) -> Result<()> {
        match self.conn.call(
            &Request::Shutdown {
                uuid: self.vm.uuid.clone(),
                guest_pid: self.vm.pid,
            },
            &[],
        ) {
            // A guest that died was already cleaned up by the daemon: nothing is held.
            Ok(_) | Err(Error::UnknownOwner { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn driver_name(&self) -> &str {
        NAME
    }

    fn lock_descriptions(&self) -> Vec<std::os::fd::OwnedFd> {
        self.holder
            .as_ref()
            .map(Holder::duplicates)
            .unwrap_or_default()
    }
}
