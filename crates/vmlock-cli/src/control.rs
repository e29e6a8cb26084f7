//! The server side of a supervisor's control socket ([`vmlock_client::control`] has the protocol
//! and the client): answers each request with the VM's [`Manager`], which this process owns.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmlock::{
    AcquireOptions, Error, LockFailureAction, LockState, Manager, MigrationOutcome, Phase,
    Resource, StartMode,
};
use vmlock_client::control::read_request;
use vmlock_client::proto::write_frame;

pub use vmlock_client::control::{
    call, describe_all, socket_path, state, ControlReply, ControlRequest,
};

/// What the supervisor does when its leases are lost.
#[derive(Debug, Clone)]
pub struct LockFailurePolicy {
    /// The VM's action.
    pub action: LockFailureAction,
    /// The guest's QMP socket, for `pause`.
    pub qmp: Option<PathBuf>,
    /// The guest process.
    pub guest_pid: u32,
    /// The VM manager that runs the guest, when it must carry the action out itself: libvirt
    /// (its connection uri and the domain's uuid), so its view of the domain stays true.
    pub libvirt: Option<(String, String)>,
}

impl LockFailurePolicy {
    /// The options of an acquire for this VM.
    fn acquire_options(&self) -> AcquireOptions {
        AcquireOptions {
            on_lock_failure: self.action,
            qmp_socket: self.qmp.clone(),
            supervisor_acts: self.libvirt.is_some(),
            ..Default::default()
        }
    }

    /// Asks libvirt to `suspend` or `destroy` the domain; whether it did.
    fn virsh(&self, command: &str) -> bool {
        let Some((uri, uuid)) = &self.libvirt else {
            return false;
        };
        std::process::Command::new("virsh")
            .args(["-q", "-c", uri, command, uuid])
            .stdin(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Stops the guest writing (pause over QMP, or SIGTERM then SIGKILL), then releases every
    /// lease: the lock service must see them gone before it escalates.
    /// Stops the guest writing: pause (through libvirt, else QMP), else power off (through
    /// libvirt, else SIGTERM then SIGKILL). Runs without the VM's manager locked: libvirt's
    /// pause calls back into this supervisor (its lock plugin releases on pause).
    fn stop_guest(&self) {
        let paused = self.action == LockFailureAction::Pause
            && (self.virsh("suspend")
                || self.qmp.as_deref().is_some_and(|q| {
                    vmlock_client::qmp::Qmp::connect(q)
                        .and_then(|mut c| c.execute("stop", serde_json::json!({})))
                        .is_ok()
                }));
        if !paused && !self.virsh("destroy") {
            // QEMU's `stop` drains and flushes its I/O; a guest we cannot pause must be dead
            // before its leases go.
            if let Ok(h) = vmlock_sys::pidfd::ProcessHandle::open(self.guest_pid, None) {
                let _ = h.signal(rustix::process::Signal::TERM);
                if !h.wait_exit(Some(Duration::from_secs(10))) {
                    let _ = h.signal(rustix::process::Signal::KILL);
                    h.wait_exit(None);
                }
            }
        }
    }

    /// Fences the guest because the lock daemon did not renew its cluster lease in time
    /// ([`vmlock_client::fence::watch`]): pause over QMP when that is the action and a QMP socket
    /// is known, else SIGKILL at once — no grace, no call to libvirt or the daemon, which may be
    /// the very thing that hangs. `ignore` does nothing.
    pub fn fence(&self) {
        match self.action {
            LockFailureAction::Ignore => return,
            LockFailureAction::Pause => {
                let paused = self.qmp.as_deref().is_some_and(|q| {
                    vmlock_client::qmp::Qmp::connect(q)
                        .and_then(|mut c| c.execute("stop", serde_json::json!({})))
                        .is_ok()
                });
                if paused {
                    return;
                }
            }
            LockFailureAction::Poweroff | LockFailureAction::Restart => {}
        }
        if let Ok(h) = vmlock_sys::pidfd::ProcessHandle::open(self.guest_pid, None) {
            let _ = h.signal(rustix::process::Signal::KILL);
            h.wait_exit(Some(Duration::from_secs(5)));
        }
    }

    /// Carries out the lock-failure action, then releases every lease: the lock service must
    /// see them gone before it escalates.
    fn enforce(&self, manager: &Mutex<Manager>) -> vmlock::Result<()> {
        if self.action == LockFailureAction::Ignore {
            // Releasing under a guest that keeps running would let another VM write beside it.
            return Ok(());
        }
        self.stop_guest();
        let mut manager = manager.lock().unwrap_or_else(|p| p.into_inner());
        match manager.release() {
            Ok(_) => Ok(()),
            // Called again (sanlock repeats its kill path): nothing is held any more.
            Err(Error::InvalidState { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// With cluster-wide locks, a supervisor also stops its guest if the lock daemon cannot renew
/// them in time (`vmlock_client::fence`); a VM whose disks are all read-only holds none.
pub fn watch_fencing(runtime_dir: &Path, manager: &Mutex<Manager>, policy: &LockFailurePolicy) {
    let clustered = manager
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .resources()
        .iter()
        .any(|r| r.is_locked() && r.mode() != vmlock::DiskMode::ReadOnly);
    if clustered {
        let policy = policy.clone();
        vmlock_client::fence::watch(runtime_dir, move || policy.fence());
    }
}

/// Serves `manager` on `path` from a thread of its own; the socket file is removed on drop.
pub struct ControlServer {
    path: PathBuf,
    /// The inode bound, so dropping removes the socket only while it is still ours.
    ino: u64,
}

impl ControlServer {
    /// Binds and starts serving.
    pub fn start(
        path: PathBuf,
        manager: Arc<Mutex<Manager>>,
        policy: LockFailurePolicy,
    ) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // A migration destination on this host runs beside its source under the same uuid: it
        // must not take the source's socket, so it serves beside it until the source is gone.
        // A source that was itself a destination here serves beside already (the VM's own
        // socket went with its first source): then the destination serves beside too, and
        // clients reach the oldest, the source (`vmlock_client::control::sockets_beside`).
        let runtime_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let uuid = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vm-"))
            .and_then(|n| n.strip_suffix(".sock"))
            .unwrap_or_default()
            .to_owned();
        let served = UnixStream::connect(&path).is_ok()
            || vmlock_client::control::sockets_beside(&runtime_dir, &uuid)
                .iter()
                .any(|p| UnixStream::connect(p).is_ok());
        let path = if served {
            path.with_extension(format!("{}.sock", std::process::id()))
        } else {
            let _ = std::fs::remove_file(&path);
            path
        };
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Self::serve_on(listener, path, manager, policy)
    }

    /// Serves `manager` on `listener`, already bound at `path` (by the process that started
    /// this one).
    pub fn serve_on(
        listener: UnixListener,
        path: PathBuf,
        manager: Arc<Mutex<Manager>>,
        policy: LockFailurePolicy,
    ) -> anyhow::Result<Self> {
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path)?);
        let uid = nix::unistd::geteuid().as_raw();
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        std::thread::Builder::new()
            .name("vm-control".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let manager = Arc::clone(&manager);
                    let policy = policy.clone();
                    let _ = std::thread::Builder::new()
                        .name("vm-control-client".into())
                        .spawn(move || serve(stream, &manager, &policy, uid, since));
                }
            })?;
        Ok(ControlServer { path, ino })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let ours = std::fs::metadata(&self.path)
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == self.ino);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn serve(
    stream: UnixStream,
    manager: &Mutex<Manager>,
    policy: &LockFailurePolicy,
    uid: u32,
    since: u64,
) {
    let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials);
    let reply = match peer {
        Ok(p) if p.uid() == 0 || p.uid() == uid => {
            match read_request(&stream).map(for_us(policy)) {
                Ok(Err(not_ours)) => not_ours,
                Ok(Ok(ControlRequest::LockFailure)) => {
                    say!(
                        "vmlock: the leases of the VM with guest pid {} were lost: {}",
                        policy.guest_pid,
                        policy.action
                    );
                    policy
                        .enforce(manager)
                        .map_or_else(ControlReply::Error, |()| ControlReply::Ok)
                }
                Ok(Ok(request)) => {
                    let mut manager = manager.lock().unwrap_or_else(|p| p.into_inner());
                    answer(&mut manager, policy, request, since)
                }
                Err(e) => ControlReply::Error(e),
            }
        }
        Ok(p) => ControlReply::Error(Error::PermissionDenied {
            reason: format!("uid {} may not control this VM", p.uid()),
        }),
        Err(e) => ControlReply::Error(Error::PermissionDenied {
            reason: format!("peer credentials: {e}"),
        }),
    };
    let _ = write_frame(&stream, &reply, &[]);
}

/// Makes `manager` hold every one of `resources` (see [`ControlRequest::Ensure`]).
fn ensure(
    manager: &mut Manager,
    policy: &LockFailurePolicy,
    state: Option<&str>,
    resources: Vec<Resource>,
) -> vmlock::Result<ControlReply> {
    if manager.phase() == Phase::Held && resources.iter().all(|r| manager.resources().contains(r)) {
        // Everything is held already (libvirt's CPU start and every resume): answered from this
        // supervisor's own state, with no round trip to vmlockd. The kernel locks are on the
        // descriptions this process keeps, and a lost lease reaches it as a push; so a resume
        // also works while vmlockd restarts.
        return Ok(ControlReply::Ok);
    }
    if manager.mode() == StartMode::IncomingMigration
        && matches!(manager.phase(), Phase::Created | Phase::Registered)
    {
        let state: LockState = state
            .ok_or_else(|| Error::InvalidLockState {
                reason: format!(
                    "VM \"{}\" is a migration destination: it takes its leases over only with \
                     the source's lock state",
                    manager.vm().name
                ),
            })?
            .parse()?;
        manager.acquire_incoming(&state, &policy.acquire_options())?;
        manager.guest_started(policy.guest_pid)?;
    }
    if manager.phase() == Phase::Released {
        // The leases were given up after a lock failure paused the guest: a resume takes them
        // again, or fails and leaves the guest paused.
        manager.acquire(&policy.acquire_options())?;
    }
    if manager.phase() == Phase::MigratingOut {
        // The source runs again: its migration failed or was cancelled, so it keeps everything
        // and the destination nothing.
        manager.complete_migration(MigrationOutcome::Cancel)?;
    }
    let missing: Vec<Resource> = resources
        .into_iter()
        .filter(|r| !manager.resources().contains(r))
        .collect();
    let mut taken: Vec<Resource> = Vec::new();
    for resource in missing {
        let result = match resource {
            Resource::Disk { .. } => vmlock::domain::disk_attach(manager, resource.clone()),
            Resource::Lease(_) => vmlock::domain::lease_attach(manager, resource.clone()),
        };
        if let Err(e) = result {
            // All or nothing: what this request took goes back.
            for r in taken.iter().rev() {
                let _ = manager.release_resource(r);
            }
            return Err(e);
        }
        taken.push(resource);
    }
    Ok(ControlReply::Held(manager.inquire()?.to_string()))
}

/// The request itself, or for a [`ControlRequest::ForGuest`] the inner one if this supervisor
/// serves that guest, else the reply that it does not.
fn for_us(
    policy: &LockFailurePolicy,
) -> impl Fn(ControlRequest) -> Result<ControlRequest, ControlReply> + '_ {
    move |request| match request {
        ControlRequest::ForGuest { guest_pid, request } if guest_pid == policy.guest_pid => {
            Ok(*request)
        }
        ControlRequest::ForGuest { .. } => Err(ControlReply::NotServing {
            guest_pid: policy.guest_pid,
        }),
        other => Ok(other),
    }
}

fn answer(
    manager: &mut Manager,
    policy: &LockFailurePolicy,
    request: ControlRequest,
    since: u64,
) -> ControlReply {
    let result = match request {
        ControlRequest::LockFailure => Err(Error::Protocol {
            reason: "a lock failure is handled before the manager is locked".into(),
        }),
        // Unwrapped once by `for_us`: one inside another is refused.
        ControlRequest::ForGuest { .. } => Err(Error::Protocol {
            reason: "a ForGuest request inside another".into(),
        }),
        ControlRequest::Inquire => manager
            .inquire()
            .map(|s| ControlReply::State(s.to_string())),
        ControlRequest::GuestPid => manager.guest_pid().map(ControlReply::Pid),
        ControlRequest::Serves => Ok(ControlReply::Pid(Some(policy.guest_pid))),
        ControlRequest::Ensure { state, resources } => {
            ensure(manager, policy, state.as_deref(), resources)
        }
        ControlRequest::Describe => manager.inquire().and_then(|state| {
            Ok(ControlReply::Vm {
                name: manager.vm().name.clone(),
                uuid: manager.vm().uuid.to_string(),
                id: manager.vm().id,
                pid: manager.guest_pid()?,
                state: state.to_string(),
                since,
            })
        }),
        ControlRequest::AttachDisk(disk) => {
            vmlock::domain::disk_attach(manager, disk).map(|()| ControlReply::Ok)
        }
        ControlRequest::DetachDisk(disk) => {
            vmlock::domain::disk_detach(manager, &disk).map(|_| ControlReply::Ok)
        }
        ControlRequest::MigratePrepare(uri) => manager
            .prepare_migration(&uri)
            .map(|s| ControlReply::State(s.to_string())),
        ControlRequest::MigrateComplete(success) => {
            let outcome = if success {
                MigrationOutcome::Success
            } else {
                MigrationOutcome::Cancel
            };
            manager
                .complete_migration(outcome)
                .map(|()| ControlReply::Ok)
        }
    };
    result.unwrap_or_else(ControlReply::Error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_for_another_guest_is_not_served_and_one_for_ours_is_unwrapped() {
        let policy = LockFailurePolicy {
            action: LockFailureAction::Poweroff,
            qmp: None,
            guest_pid: 42,
            libvirt: None,
        };
        let for_guest = |guest_pid| ControlRequest::ForGuest {
            guest_pid,
            request: Box::new(ControlRequest::Inquire),
        };
        assert!(matches!(
            for_us(&policy)(for_guest(42)),
            Ok(ControlRequest::Inquire)
        ));
        assert!(matches!(
            for_us(&policy)(for_guest(7)),
            Err(ControlReply::NotServing { guest_pid: 42 })
        ));
        assert!(matches!(
            for_us(&policy)(ControlRequest::Serves),
            Ok(ControlRequest::Serves)
        ));
    }
}
