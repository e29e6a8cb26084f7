//! The `sanlock` driver: the lock manager API on top of a sanlock daemon.
//!
//! Design (details in `docs/sanlock.md`):
//! - **Lockspace**: at driver start the configured lockspace file (`lease_dir/LOCKSPACE`) is
//!   created and formatted through the daemon when missing, then joined by a background thread
//!   (`add_lockspace` takes 2–5 × io_timeout); acquires that need it wait for the join, and a
//!   failed join is reported with sanlock's code.
//! - **Leases**: a writable disk gets the lease file `lease_dir/HASH` (HASH = first 32 hex digits
//!   of the SHA-256 of the canonical disk path), created under a temporary name, formatted by the
//!   daemon and linked into place (so two hosts never format the same live file). Shared disks
//!   take shared leases, read-only disks none. Explicit leases are used as given.
//! - **Holder**: the guest (in the kit, a plain `sleep`) cannot register with sanlock itself, so
//!   each VM gets a registered connection from this process that owns its leases, plus a thread
//!   waiting on the guest's pidfd: when the guest exits its leases are released and the
//!   connection closed. Dropping a session releases nothing.
//! - **Daemon gone**: the same thread watches the registered connection. If the daemon closes it
//!   (it died: its leases went with it, and no kill path of its will run), the driver runs the
//!   VM's kill path itself, as the daemon would have on a lost lockspace, so the guest does not go
//!   on writing without a lease; a guest still alive [`LOST_KILL_GRACE`] later is SIGKILLed.
//! - **Migration**: the lease goes through shared mode (source converts to shared at prepare,
//!   destination takes it shared with `SANLK_RES_LVER` = the source's version, source releases,
//!   destination converts to exclusive), so a live host holds it at every instant. Each side
//!   holds its own gate lease exclusively meanwhile (`lease_dir/HASH.gate`), and every other
//!   shared acquire passes both gates shared, so no third VM is granted the disk in either mode.

use crate::proto::{
    self, describe_rv, flags, rv, Client, ClientError, LockspaceSpec, Registered, ResourceSpec,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vmlock::registry::parse_config;
use vmlock::{
    AcquireOptions, Capabilities, DiskMode, Driver, DriverConfig, Error, ForeignHolder, Holder,
    LockFailureAction, LockState, MigrationOutcome, Resource, ResourceFailure, Result, Session,
    StartMode, StateEntry, VmParams,
};

/// Name of the driver.
pub const NAME: &str = "sanlock";
/// Default lockspace name for automatic disk leases.
pub const DEFAULT_LOCKSPACE: &str = "vmlock-disks";
/// Default lease directory (must be on storage shared by every host).
pub const DEFAULT_LEASE_DIR: &str = "/var/lib/vmlock/sanlock";
/// Default sanlock run directory when `SANLOCK_RUN_DIR` is not set.
pub const DEFAULT_RUN_DIR: &str = "/run/sanlock";
/// Oldest daemon accepted: 3.3.0 (`SANLK_ACQUIRE_OWNER_NOWAIT`; command 28 exists from 3.2).
pub const MIN_VERSION: u32 = 0x0303_0000;
const MAX_HOST_ID: u64 = 2000;
const VERSION_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a convert to exclusive retries while another live host still holds the lease shared.
const CONVERT_RETRY: Duration = Duration::from_secs(3);
/// After the daemon closed a VM's registered connection and the kill path was run, how long the
/// guest may take to exit before the driver SIGKILLs it (the helper's own SIGTERM-then-SIGKILL
/// takes up to 10 s).
pub const LOST_KILL_GRACE: Duration = Duration::from_secs(12);
/// Meanwhile the kill path is run again this often (sanlock repeats its own too).
const KILLPATH_REPEAT: Duration = Duration::from_secs(1);
/// How long one run of the kill path may take before it is SIGKILLed: by then the driver has
/// SIGKILLed the guest itself, so a helper still running has nothing left to do.
const KILLPATH_RUN_LIMIT: Duration = LOST_KILL_GRACE;

/// Runs `program` with `args` and waits for it at most `limit`: its exit status, or `None` if it
/// was still running then (it is SIGKILLed and reaped, by its pid, so no hung helper stays
/// behind).
fn run_bounded(
    program: &std::path::Path,
    args: &[String],
    limit: Duration,
) -> std::io::Result<Option<std::process::ExitStatus>> {
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .spawn()?;
    // Our own unreaped child: its pid cannot be reused before the wait below.
    let exited = match vmlock_sys::pidfd::ProcessHandle::open(child.id(), None) {
        Ok(h) => h.wait_exit(Some(limit)),
        // No pidfd (out of descriptors): poll for the exit instead, still bounded.
        Err(_) => {
            let deadline = std::time::Instant::now() + limit;
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break true,
                    Ok(None) if std::time::Instant::now() < deadline => {
                        // Pacing of the fallback poll: no pidfd to wait on.
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    _ => break false,
                }
            }
        }
    };
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
        return Ok(None);
    }
    child.wait().map(Some)
}

/// The driver's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SanlockConfig {
    /// The daemon's run directory (socket `run_dir/sanlock.sock`).
    pub run_dir: PathBuf,
    /// Lockspace of the automatic disk leases.
    pub lockspace: String,
    /// Directory on shared storage holding the lockspace and lease files.
    pub lease_dir: PathBuf,
    /// This host's id in the lockspace, 1..=2000, unique per host.
    pub host_id: u64,
    /// sanlock io_timeout in seconds for the lockspace (written when it is created).
    pub io_timeout: u32,
    /// Name of this host in owner records and errors.
    pub host_name: String,
    /// How long an acquire waits for the lockspace join.
    pub join_timeout: Duration,
    /// Program the daemon runs (`PROGRAM -KILL GUESTPID`) when this host loses its lockspace and
    /// the guest's policy is poweroff.
    pub kill_program: PathBuf,
    /// vmlock's lock-failure helper (the `vmlock` program) and the runtime directory of the
    /// supervisors' control sockets. When set, the daemon's kill path runs
    /// `vmlock --runtime-dir DIR lock-failure --uuid UUID`, which asks the VM's supervisor to carry
    /// out its `on_lock_failure` action (pause over QMP, or poweroff) and to release the leases,
    /// so sanlock never has to kill the supervisor itself.
    pub lock_failure_helper: Option<(PathBuf, PathBuf)>,
}

/// The TOML keys as written; any other key is refused. Numbers are read signed so that a
/// negative or oversized value gets the range message of [`SanlockConfig::from_toml`].
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    host_id: Option<i64>,
    lease_dir: Option<PathBuf>,
    lockspace: Option<String>,
    io_timeout: Option<i64>,
    run_dir: Option<PathBuf>,
    host_name: Option<String>,
    join_timeout: Option<i64>,
    kill_program: Option<PathBuf>,
    lock_failure_helper: Option<PathBuf>,
    control_dir: Option<PathBuf>,
}

impl SanlockConfig {
    /// Defaults with the required `lease_dir` and `host_id`.
    pub fn new(lease_dir: impl Into<PathBuf>, host_id: u64) -> Self {
        SanlockConfig {
            run_dir: std::env::var_os("SANLOCK_RUN_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR)),
            lockspace: DEFAULT_LOCKSPACE.into(),
            lease_dir: lease_dir.into(),
            host_id,
            io_timeout: 10,
            host_name: fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "localhost".into()),
            join_timeout: Duration::from_secs(120),
            kill_program: PathBuf::from("/usr/bin/kill"),
            lock_failure_helper: None,
        }
    }

    /// From a TOML table. Keys: `host_id` (required), `lease_dir`, `lockspace`, `io_timeout`,
    /// `run_dir`, `host_name`, `join_timeout` (seconds), `kill_program`.
    pub fn from_toml(config: &DriverConfig) -> Result<Self> {
        let f: FileConfig = parse_config(NAME, config)?;
        let bad = |reason: String| Error::Config {
            source_name: "sanlock driver configuration".into(),
            reason,
        };
        let host_id = f.host_id.ok_or_else(|| {
            bad("host_id is required: a number from 1 to 2000, unique for each host".into())
        })?;
        let host_id = u64::try_from(host_id)
            .map_err(|_| bad(format!("host_id {host_id} must be from 1 to {MAX_HOST_ID}")))?;
        let mut c = SanlockConfig::new(
            f.lease_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_LEASE_DIR)),
            host_id,
        );
        if let Some(s) = f.lockspace {
            c.lockspace = s;
        }
        if let Some(p) = f.run_dir {
            c.run_dir = p;
        }
        if let Some(s) = f.host_name {
            c.host_name = s;
        }
        if let Some(p) = f.kill_program {
            c.kill_program = p;
        }
        match (f.lock_failure_helper, f.control_dir) {
            (Some(helper), Some(dir)) => c.lock_failure_helper = Some((helper, dir)),
            (None, None) => {}
            _ => return Err(bad("lock_failure_helper and control_dir go together".into())),
        }
        if let Some(t) = f.io_timeout {
            c.io_timeout = u32::try_from(t)
                .ok()
                .filter(|t| (1..=300).contains(t))
                .ok_or_else(|| bad(format!("io_timeout {t} must be from 1 to 300 seconds")))?;
        }
        if let Some(t) = f.join_timeout {
            c.join_timeout = Duration::from_secs(
                u64::try_from(t)
                    .map_err(|_| bad(format!("join_timeout {t} must not be negative")))?,
            );
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Error::Config {
            source_name: "sanlock driver configuration".into(),
            reason,
        };
        if !(1..=MAX_HOST_ID).contains(&self.host_id) {
            return Err(bad(format!(
                "host_id {} must be from 1 to {MAX_HOST_ID}",
                self.host_id
            )));
        }
        proto::check_name("lockspace", &self.lockspace).map_err(bad)?;
        if !self.lease_dir.is_absolute() {
            return Err(bad(format!(
                "lease_dir {} must be an absolute path",
                self.lease_dir.display()
            )));
        }
        if !self.kill_program.is_absolute() {
            return Err(bad(format!(
                "kill_program {} must be an absolute path",
                self.kill_program.display()
            )));
        }
        if self.io_timeout == 0 {
            return Err(bad("io_timeout must be at least 1 second".into()));
        }
        Ok(())
    }

    fn lockspace_spec(&self, host_id: u64, flags: u32) -> LockspaceSpec {
        LockspaceSpec {
            name: self.lockspace.clone(),
            host_id,
            flags,
            path: self.lease_dir.join(&self.lockspace),
            offset: 0,
        }
    }
}

fn old_daemon(client: &Client) -> Error {
    Error::ServiceUnavailable {
        reason: format!(
            "the sanlock daemon at {} did not answer the VERSION request, so it is older than sanlock 3.2; the sanlock driver needs sanlock {} or newer",
            client.socket().display(),
            proto::version_text(MIN_VERSION)
        ),
    }
}

/// Refuses a daemon older than [`MIN_VERSION`], naming both versions.
pub fn check_version(version: u32) -> Result<()> {
    if version < MIN_VERSION {
        return Err(Error::ServiceUnavailable {
            reason: format!(
                "the sanlock daemon is version {}, but the sanlock driver needs sanlock {} or newer",
                proto::version_text(version),
                proto::version_text(MIN_VERSION)
            ),
        });
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Join {
    Joining,
    Joined,
    Failed(Error),
}

/// A VM's lease owner: a registered connection of this process, released when the guest exits.
#[derive(Debug)]
struct LeaseOwner {
    uuid: String,
    name: String,
    guest_pid: Option<u32>,
    pidfd: Option<OwnedFd>,
    /// The kill path given to the daemon (program and arguments), run by the driver itself when
    /// the daemon is gone.
    killpath: Option<(PathBuf, Vec<String>)>,
    /// The daemon closed the registered connection: the leases are gone.
    lost: std::sync::atomic::AtomicBool,
    /// The guest's pid when it was only known after registration (`guest_started`).
    late_pid: std::sync::OnceLock<u32>,
    state: Mutex<OwnerState>,
}

#[derive(Debug)]
struct OwnerState {
    conn: Option<Registered>,
    held: BTreeMap<(String, String), Held>,
    /// Migration destination: the exclusive leases it holds shared since the incoming acquire,
    /// to convert to exclusive at `complete_migration(Success)` (also in `held`).
    pending: Vec<Held>,
    /// Migration source: the exclusive leases `prepare_migration` converted to shared, to
    /// convert back at `complete_migration(Cancel)`, and the state it handed out.
    converted: Vec<Held>,
    prepared: Option<LockState>,
    /// Leases whose owner record this owner must not remove: the source's record names the VM
    /// until the destination's convert to exclusive succeeded and wrote its own.
    foreign_record: BTreeSet<(String, String)>,
    /// Gate leases held exclusively for a hand-off (source or destination side): released when
    /// this side's part of the hand-off ends, or with the connection.
    gates: Vec<ResourceSpec>,
}

#[derive(Debug, Clone)]
struct Held {
    resource: Resource,
    spec: ResourceSpec,
}

impl LeaseOwner {
    fn lock(&self) -> MutexGuard<'_, OwnerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the guest has exited (a zombie counts as exited).
    fn guest_gone(&self) -> bool {
        match &self.pidfd {
            Some(fd) => {
                let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
                let zero = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
            }
            None => false,
        }
    }

    /// SIGKILLs the guest (its pidfd, or the pid `guest_started` gave).
    fn kill_guest(&self) {
        let opened;
        let fd = match (&self.pidfd, self.late_pid.get()) {
            (Some(fd), _) => fd,
            (None, Some(pid)) => match open_pidfd(*pid, &self.name) {
                Ok(fd) => {
                    opened = fd;
                    &opened
                }
                Err(e) => {
                    tracing::error!(vm = %self.name, "cannot SIGKILL the guest: {e}");
                    return;
                }
            },
            (None, None) => return,
        };
        let _ = rustix::process::pidfd_send_signal(fd, rustix::process::Signal::KILL);
    }

    /// Releases everything and closes the registered connection (which would release anyway).
    fn finish(&self, shared: &Shared) {
        let mut st = self.lock();
        let specs: Vec<ResourceSpec> = st.held.values().map(|h| h.spec.clone()).collect();
        for spec in &specs {
            let key = (spec.lockspace.clone(), spec.name.clone());
            // A source that dies mid hand-off leaves its record: the destination may hold the
            // lease shared and writes its own only at its convert.
            let handed = st
                .converted
                .iter()
                .any(|h| h.spec.lockspace == key.0 && h.spec.name == key.1);
            if !handed && !st.foreign_record.contains(&key) {
                shared.remove_owner_record(spec, &self.uuid);
            }
        }
        if let Some(conn) = st.conn.as_mut() {
            for chunk in specs.chunks(proto::MAX_RESOURCES) {
                if let Err(e) = conn.release(chunk) {
                    tracing::warn!(vm = %self.name, "sanlock release at guest exit failed ({e}); closing the connection releases the leases");
                }
            }
        }
        let gates = std::mem::take(&mut st.gates);
        if let (Some(conn), false) = (st.conn.as_mut(), gates.is_empty()) {
            for chunk in gates.chunks(proto::MAX_RESOURCES) {
                if let Err(e) = conn.release(chunk) {
                    tracing::warn!(vm = %self.name, "sanlock release of gate leases failed ({e}); closing the connection releases them");
                }
            }
        }
        st.held.clear();
        st.conn = None;
    }
}

#[derive(Debug)]
struct Shared {
    config: SanlockConfig,
    client: Client,
    version: u32,
    lease_flags: u32,
    align: u64,
    join: Mutex<Join>,
    join_cv: Condvar,
    owners: Mutex<HashMap<String, Arc<LeaseOwner>>>,
    owners_cv: Condvar,
}

/// The record written next to a disk's lease file so that a refused host can name the holder.
#[derive(Debug, Serialize, Deserialize)]
struct OwnerRecord {
    name: String,
    uuid: String,
    pid: Option<u32>,
    host: String,
    host_id: u64,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique_tmp(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

fn align_flags(align: u64) -> u32 {
    match align {
        0x20_0000 => flags::ALIGN2M | flags::SECTOR4K,
        0x40_0000 => flags::ALIGN4M | flags::SECTOR4K,
        0x80_0000 => flags::ALIGN8M | flags::SECTOR4K,
        _ => flags::ALIGN1M | flags::SECTOR512,
    }
}

fn daemon_error(client: &Client, what: &str, e: &ClientError) -> Error {
    match e {
        // An I/O error keeps its kind (a missing socket stays NotFound, a refused one
        // ConnectionRefused), so callers can tell "no daemon" from other failures.
        ClientError::Io(io) => Error::io(
            format!("sanlock daemon at {} ({what})", client.socket().display()),
            &io::Error::new(
                io.kind(),
                format!("{io} (is sanlock running, with this SANLOCK_RUN_DIR?)"),
            ),
        ),
        other => Error::ServiceUnavailable {
            reason: format!("sanlock {what} failed: {other}"),
        },
    }
}

fn lock_map<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Creates `lease_dir/name` through the daemon unless it exists: a temporary file is sized
    /// to the align size, formatted by `format`, and hard-linked into place, so a file that
    /// exists under its final name is always formatted and never formatted twice.
    fn create_lease_file(
        &self,
        name: &str,
        size: u64,
        what: &str,
        format: impl FnOnce(&Path) -> std::result::Result<(), ClientError>,
    ) -> Result<PathBuf> {
        let dir = &self.config.lease_dir;
        let path = dir.join(name);
        if path.symlink_metadata().is_ok() {
            return Ok(path);
        }
        let tmp = unique_tmp(dir, name);
        let result = (|| {
            let file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o660)
                .open(&tmp)
                .map_err(|e| Error::io(format!("creating {}", tmp.display()), &e))?;
            file.set_len(size)
                .map_err(|e| Error::io(format!("sizing {}", tmp.display()), &e))?;
            drop(file);
            format(&tmp).map_err(|e| daemon_error(&self.client, what, &e))?;
            match fs::hard_link(&tmp, &path) {
                Ok(()) => Ok(()),
                // Another host created it first: theirs is formatted and maybe in use.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
                Err(e) => Err(Error::io(format!("creating {}", path.display()), &e)),
            }
        })();
        let _ = fs::remove_file(&tmp);
        result.map(|()| path)
    }

    fn wait_joined(&self, timeout: Duration) -> Result<()> {
        let guard = lock_map(&self.join);
        let (guard, _) = self
            .join_cv
            .wait_timeout_while(guard, timeout, |j| matches!(j, Join::Joining))
            .unwrap_or_else(|p| p.into_inner());
        match &*guard {
            Join::Joined => Ok(()),
            Join::Failed(e) => Err(e.clone()),
            Join::Joining => Err(Error::ServiceUnavailable {
                reason: format!(
                    "still joining sanlock lockspace {} as host_id {} after {} s (a join takes 2 to 5 times io_timeout, longer when the host_id was last used under another host name); retry later",
                    self.config.lockspace,
                    self.config.host_id,
                    timeout.as_secs()
                ),
            }),
        }
    }

    /// The sanlock lease of `resource`, creating a disk's lease file on first use.
    fn spec_for(&self, resource: &Resource) -> Result<ResourceSpec> {
        match resource {
            Resource::Disk { path, mode } => {
                let name = lease_name(path);
                let lease_path =
                    self.create_lease_file(&name, self.align, "formatting a disk lease", |tmp| {
                        self.client.write_resource(&ResourceSpec {
                            lockspace: self.config.lockspace.clone(),
                            name: name.clone(),
                            path: tmp.to_owned(),
                            offset: 0,
                            lver: 0,
                            flags: self.lease_flags,
                        })
                    })?;
                Ok(ResourceSpec {
                    lockspace: self.config.lockspace.clone(),
                    name,
                    path: lease_path,
                    offset: 0,
                    lver: 0,
                    flags: self.lease_flags
                        | if *mode == DiskMode::Shared {
                            flags::RES_SHARED
                        } else {
                            0
                        },
                })
            }
            Resource::Lease(l) => {
                let invalid = |reason: String| Error::InvalidResource {
                    resource: resource.label(),
                    reason,
                };
                proto::check_name("lockspace", &l.lockspace).map_err(invalid)?;
                proto::check_name("lease key", &l.key).map_err(invalid)?;
                Ok(ResourceSpec {
                    lockspace: l.lockspace.clone(),
                    name: l.key.clone(),
                    path: l.path.clone(),
                    offset: l.offset,
                    lver: 0,
                    flags: 0,
                })
            }
        }
    }

    /// The two gate leases of a disk lease `spec` (`[source gate, destination gate]`), or None
    /// for a lease that is not one of this driver's disk leases (explicit leases have no gate).
    /// They live in `lease_dir/HASH.gate`, two align sizes long, created on first use like the
    /// disk's lease file: `HASH.gate.src` at offset 0, `HASH.gate.dst` at offset `align`.
    ///
    /// A migration source holds its gate exclusively from before `prepare_migration` makes the
    /// lease shared until its `complete_migration`; a destination holds its own from before its
    /// incoming shared acquire until its convert to exclusive (or cancel). Every other shared
    /// acquire of the disk holds **both** gates shared while it takes the lease, so sanlock
    /// refuses it whenever either side of a hand-off is in the gate (docs/sanlock.md §6).
    fn gates(&self, spec: &ResourceSpec) -> Result<Option<[ResourceSpec; 2]>> {
        if spec.lockspace != self.config.lockspace
            || spec.path != self.config.lease_dir.join(&spec.name)
        {
            return Ok(None);
        }
        let spec_at = |path: &Path, which: &str, offset: u64| ResourceSpec {
            lockspace: self.config.lockspace.clone(),
            name: format!("{}.gate.{which}", spec.name),
            path: path.to_owned(),
            offset,
            lver: 0,
            flags: self.lease_flags,
        };
        let path = self.create_lease_file(
            &format!("{}.gate", spec.name),
            2 * self.align,
            "formatting a disk's gate leases",
            |tmp| {
                self.client.write_resource(&spec_at(tmp, "src", 0))?;
                self.client.write_resource(&spec_at(tmp, "dst", self.align))
            },
        )?;
        Ok(Some([
            spec_at(&path, "src", 0),
            spec_at(&path, "dst", self.align),
        ]))
    }

    fn owner(&self, uuid: &str) -> Option<Arc<LeaseOwner>> {
        lock_map(&self.owners).get(uuid).cloned()
    }

    fn forget(&self, owner: &Arc<LeaseOwner>) {
        let mut owners = lock_map(&self.owners);
        if owners
            .get(&owner.uuid)
            .is_some_and(|o| Arc::ptr_eq(o, owner))
        {
            owners.remove(&owner.uuid);
        }
        self.owners_cv.notify_all();
    }

    /// Releases the leases of every VM of this process whose guest has exited but whose
    /// watcher thread has not run yet.
    fn reap_exited(&self) {
        let gone: Vec<Arc<LeaseOwner>> = lock_map(&self.owners)
            .values()
            .filter(|o| o.guest_gone())
            .cloned()
            .collect();
        for o in gone {
            o.finish(self);
            self.forget(&o);
        }
    }

    fn owner_record_path(&self, spec: &ResourceSpec) -> Option<PathBuf> {
        (spec.lockspace == self.config.lockspace
            && spec.path.parent() == Some(&self.config.lease_dir))
        .then(|| self.config.lease_dir.join(format!("{}.owner", spec.name)))
    }

    fn write_owner_record(&self, spec: &ResourceSpec, owner: &LeaseOwner) {
        let Some(path) = self.owner_record_path(spec) else {
            return;
        };
        let record = OwnerRecord {
            name: owner.name.clone(),
            uuid: owner.uuid.clone(),
            pid: owner.guest_pid,
            host: self.config.host_name.clone(),
            host_id: self.config.host_id,
        };
        let tmp = unique_tmp(&self.config.lease_dir, &format!("{}.owner", spec.name));
        let result = serde_json::to_vec(&record)
            .map_err(io::Error::other)
            .and_then(|json| fs::write(&tmp, json))
            .and_then(|()| fs::rename(&tmp, &path));
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            tracing::warn!("cannot write owner record {}: {e}", path.display());
        }
    }

    /// Removes the owner record of `spec` if it still names VM `uuid` (a later holder's stays).
    fn remove_owner_record(&self, spec: &ResourceSpec, uuid: &str) {
        let Some(path) = self.owner_record_path(spec) else {
            return;
        };
        let ours = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<OwnerRecord>(&b).ok())
            .is_some_and(|r| r.uuid == uuid);
        if ours {
            let _ = fs::remove_file(&path);
        }
    }

    /// Who holds `spec`, as well as this host can tell.
    fn holder_of(&self, spec: &ResourceSpec, me: &str, on_this_host: bool) -> ForeignHolder {
        let key = (spec.lockspace.clone(), spec.name.clone());
        let local: Vec<Arc<LeaseOwner>> = lock_map(&self.owners).values().cloned().collect();
        for o in local {
            if o.uuid != me && o.lock().held.contains_key(&key) {
                return ForeignHolder::Vm(Holder {
                    name: o.name.clone(),
                    uuid: o.uuid.clone(),
                    pid: o.guest_pid,
                    host: self.config.host_name.clone(),
                });
            }
        }
        let record = self
            .owner_record_path(spec)
            .and_then(|p| fs::read(p).ok())
            .and_then(|b| serde_json::from_slice::<OwnerRecord>(&b).ok());
        match record {
            Some(r) => ForeignHolder::Vm(Holder {
                name: r.name,
                uuid: r.uuid,
                pid: r.pid,
                host: if on_this_host {
                    format!("{} (this host, sanlock host_id {})", r.host, r.host_id)
                } else {
                    format!("{} (sanlock host_id {}, alive)", r.host, r.host_id)
                },
            }),
            None => ForeignHolder::Vm(Holder {
                name: "(unknown)".into(),
                uuid: "(unknown)".into(),
                pid: None,
                host: if on_this_host {
                    format!("{} (another sanlock client)", self.config.host_name)
                } else {
                    "another live sanlock host".into()
                },
            }),
        }
    }

    fn acquire_error(
        &self,
        resource: &Resource,
        spec: &ResourceSpec,
        me: &str,
        e: &ClientError,
    ) -> Error {
        let label = resource.label();
        let code = match e {
            ClientError::Daemon(code) => *code,
            other => return daemon_error(&self.client, &format!("acquire of {label}"), other),
        };
        match code {
            rv::EEXIST => Error::Busy {
                resource: label,
                holder: self.holder_of(spec, me, true),
            },
            rv::ACQUIRE_IDLIVE | rv::ACQUIRE_OWNED | rv::ACQUIRE_OTHER | rv::EAGAIN => {
                Error::Busy {
                    resource: label,
                    holder: self.holder_of(spec, me, false),
                }
            }
            rv::ACQUIRE_OWNED_RETRY
            | rv::ACQUIRE_SHRETRY
            | rv::EBUSY
            | -214..=-210
            | -202 => Error::ServiceUnavailable {
                reason: format!(
                    "the lease of {label} cannot be taken now, retry later: {}",
                    describe_rv(code)
                ),
            },
            rv::ENOSPC | rv::ACQUIRE_LOCKSPACE => Error::ServiceUnavailable {
                reason: format!(
                    "cannot lock {label}: sanlock lockspace {} is not joined on this host ({})",
                    spec.lockspace,
                    describe_rv(code)
                ),
            },
            rv::ACQUIRE_LVER => Error::InvalidLockState {
                reason: format!(
                    "{label} was held by someone else since the lock state was taken (lease version {} is no longer current)",
                    spec.lver
                ),
            },
            rv::LEADER_MAGIC
            | rv::LEADER_SECTORSIZE
            | rv::LEADER_LOCKSPACE
            | rv::LEADER_RESOURCE => Error::InvalidResource {
                resource: label,
                reason: format!(
                    "no usable sanlock lease {}:{} at {}:{} ({})",
                    spec.lockspace,
                    spec.name,
                    spec.path.display(),
                    spec.offset,
                    describe_rv(code)
                ),
            },
            rv::ENODEV => Error::io(
                format!(
                    "sanlock opening lease file {} for {label}",
                    spec.path.display()
                ),
                &io::Error::new(
                    io::Error::from_raw_os_error(-code).kind(),
                    describe_rv(code),
                ),
            ),
            _ => Error::ServiceUnavailable {
                reason: format!("sanlock refused the lease of {label}: {}", describe_rv(code)),
            },
        }
    }
}

/// Name of the lease of disk `path`: 32 hex digits of the SHA-256 of its canonical path.
pub fn lease_name(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let canonical = fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let digest = Sha256::digest(canonical.as_os_str().as_bytes());
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// The `sanlock` driver.
#[derive(Debug)]
pub struct SanlockDriver {
    shared: Arc<Shared>,
}

impl SanlockDriver {
    /// Connects to the daemon, checks its version, creates the lockspace when missing and starts
    /// joining it in the background.
    pub fn start(config: SanlockConfig) -> Result<Self> {
        config.validate()?;
        if !config.kill_program.is_file() {
            return Err(Error::Config {
                source_name: "sanlock driver configuration".into(),
                reason: format!(
                    "kill_program {} does not exist (sanlock runs it to stop a guest whose lease is lost)",
                    config.kill_program.display()
                ),
            });
        }
        let client = Client::new(&config.run_dir);
        let version = match client.version(VERSION_TIMEOUT) {
            Ok(v) => v,
            // A daemon without command 28 drops the request, closes, or answers an error.
            Err(ClientError::Daemon(_)) => {
                return Err(old_daemon(&client));
            }
            Err(ClientError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::ConnectionReset
                ) =>
            {
                return Err(old_daemon(&client));
            }
            Err(e) => return Err(daemon_error(&client, "version query", &e)),
        };
        check_version(version)?;
        fs::create_dir_all(&config.lease_dir).map_err(|e| {
            Error::io(
                format!("creating lease directory {}", config.lease_dir.display()),
                &e,
            )
        })?;
        let mut shared = Shared {
            config: config.clone(),
            client: client.clone(),
            version,
            lease_flags: 0,
            align: 0,
            join: Mutex::new(Join::Joining),
            join_cv: Condvar::new(),
            owners: Mutex::new(HashMap::new()),
            owners_cv: Condvar::new(),
        };
        // The align size comes from the daemon: ask it about the lockspace file, or (before it
        // exists) about a fresh file in the same directory.
        let ls_path = config.lease_dir.join(&config.lockspace);
        let probe = if ls_path.exists() {
            ls_path.clone()
        } else {
            let p = unique_tmp(&config.lease_dir, "align-probe");
            fs::File::create(&p).map_err(|e| Error::io(format!("creating {}", p.display()), &e))?;
            p
        };
        let align = client.align(&probe);
        if probe != ls_path {
            let _ = fs::remove_file(&probe);
        }
        shared.align = align.map_err(|e| {
            daemon_error(
                &client,
                &format!("align query for {}", config.lease_dir.display()),
                &e,
            )
        })?;
        shared.lease_flags = align_flags(shared.align);
        let ls_flags = shared.lease_flags;
        shared.create_lease_file(
            &config.lockspace,
            shared.align,
            "formatting the lockspace",
            |tmp| {
                let mut ls = config.lockspace_spec(0, ls_flags);
                ls.path = tmp.to_owned();
                client.write_lockspace(&ls, config.io_timeout)
            },
        )?;
        let shared = Arc::new(shared);
        let joiner = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("sanlock-join".into())
            .spawn(move || join_lockspace(&joiner))
            .map_err(|e| Error::io("starting the lockspace join thread", &e))?;
        Ok(SanlockDriver { shared })
    }

    /// Registry factory (see [`SanlockConfig::from_toml`] for the keys).
    pub fn from_config(config: &DriverConfig) -> Result<Arc<dyn Driver>> {
        Ok(Arc::new(Self::start(SanlockConfig::from_toml(config)?)?))
    }

    /// The configuration in use.
    pub fn config(&self) -> &SanlockConfig {
        &self.shared.config
    }

    /// The daemon's version (`major<<24 | minor<<16 | patch<<8`).
    pub fn daemon_version(&self) -> u32 {
        self.shared.version
    }

    /// Waits until the lockspace is joined, or reports why it could not be.
    pub fn wait_joined(&self, timeout: Duration) -> Result<()> {
        self.shared.wait_joined(timeout)
    }

    /// Waits until the VM `uuid` holds nothing through this driver (its guest exited and its
    /// leases were released, or it was shut down). Returns whether that happened in time.
    pub fn wait_released(&self, uuid: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut owners = lock_map(&self.shared.owners);
        while owners.contains_key(uuid) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            owners = self
                .shared
                .owners_cv
                .wait_timeout(owners, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// The hosts of the lockspace as this host's daemon sees them.
    pub fn hosts(&self) -> Result<Vec<proto::HostStatus>> {
        self.shared
            .client
            .get_hosts(&self.shared.config.lockspace, 0)
            .map_err(|e| daemon_error(&self.shared.client, "get_hosts", &e))
    }

    /// The lease file of disk `path` (it may not exist yet).
    pub fn lease_path(&self, path: &Path) -> PathBuf {
        self.shared.config.lease_dir.join(lease_name(path))
    }
}

fn join_lockspace(shared: &Shared) {
    let c = &shared.config;
    let ls = c.lockspace_spec(c.host_id, shared.lease_flags);
    let result = match shared.client.inq_lockspace(&ls, false) {
        Ok(()) => Ok(()),
        Err(_) => match shared.client.add_lockspace(&ls, c.io_timeout) {
            Ok(()) | Err(ClientError::Daemon(rv::EEXIST)) => Ok(()),
            Err(ClientError::Daemon(rv::EINPROGRESS)) => shared.client.inq_lockspace(&ls, true),
            Err(e) => Err(e),
        },
    };
    let state = match result {
        Ok(()) => {
            tracing::info!(lockspace = %c.lockspace, host_id = c.host_id, "joined sanlock lockspace");
            Join::Joined
        }
        Err(e) => {
            let err = Error::ServiceUnavailable {
                reason: format!(
                    "joining sanlock lockspace {} ({}) as host_id {} failed: {e}",
                    c.lockspace,
                    ls.path.display(),
                    c.host_id
                ),
            };
            tracing::error!("{err}");
            Join::Failed(err)
        }
    };
    *lock_map(&shared.join) = state;
    shared.join_cv.notify_all();
}

/// Adds `sanlock` to a registry.
pub fn register(registry: &mut vmlock::Registry) {
    registry.register(NAME, SanlockDriver::from_config);
}

impl Driver for SanlockDriver {
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
            supervisor: false,
            host_status: false,
        }
    }

    fn open(&self, vm: &VmParams, mode: StartMode) -> Result<Box<dyn Session>> {
        let uuid = vm.uuid.to_string();
        if mode == StartMode::Attach {
            self.shared.reap_exited();
            if self.shared.owner(&uuid).is_none() {
                return Err(Error::UnknownOwner { uuid });
            }
        }
        Ok(Box::new(SanlockSession {
            shared: Arc::clone(&self.shared),
            uuid,
            name: vm.name.clone(),
            pid: vm.pid,
            incoming: mode == StartMode::IncomingMigration,
            mine: None,
        }))
    }
}

#[derive(Debug)]
struct SanlockSession {
    shared: Arc<Shared>,
    uuid: String,
    name: String,
    pid: Option<u32>,
    /// Opened for an incoming migration: its owner stays out of the per-VM table (where the
    /// source of a same-host migration is) until the hand-off succeeded.
    incoming: bool,
    /// The owner this session created or found. A session keeps using it, so after a
    /// migration between two VMs of one uuid on one host each side only touches its own leases.
    mine: Option<Arc<LeaseOwner>>,
}

impl SanlockSession {
    /// This session's lease owner, if it has one: the one it created or found before, else (not
    /// for a migration destination) the VM's owner on this host.
    fn current(&mut self) -> Option<Arc<LeaseOwner>> {
        if self.mine.is_none() && !self.incoming {
            self.mine = self.shared.owner(&self.uuid);
        }
        self.mine.clone()
    }

    /// The VM's lease owner, registering one (with its guest watcher) on first use.
    fn owner(&mut self, options: &AcquireOptions) -> Result<Arc<LeaseOwner>> {
        if let Some(o) = self.current() {
            return Ok(o);
        }
        let owner = self.register_owner(options)?;
        self.mine = Some(Arc::clone(&owner));
        Ok(owner)
    }

    /// A new registered owner for this VM with its guest watcher, filed in the per-VM table
    /// unless this is a migration destination.
    fn register_owner(&self, options: &AcquireOptions) -> Result<Arc<LeaseOwner>> {
        // When this host loses the lockspace, sanlock first runs the killpath of each registered
        // client, then (after its kill grace) SIGKILLs the registered process: here, the VM
        // manager. Only poweroff stops the guest in time to keep the manager alive.
        let helper = self.shared.config.lock_failure_helper.clone();
        let helped = helper.is_some() && options.on_lock_failure == LockFailureAction::Pause;
        if options.on_lock_failure != LockFailureAction::Poweroff && !helped {
            return Err(Error::unsupported(
                NAME,
                &format!(
                    "on-lock-failure \"{}\" (sanlock would kill the VM manager itself when the lease is lost; use poweroff)",
                    options.on_lock_failure
                ),
            ));
        }
        let pidfd = match self.pid {
            Some(pid) => Some(open_pidfd(pid, &self.name)?),
            None => None,
        };
        let mut conn = self
            .shared
            .client
            .register()
            .map_err(|e| daemon_error(&self.shared.client, "register", &e))?;
        let killpath = if let Some((program, dir)) = &helper {
            // Lockspace lost: the daemon runs vmlock's helper, which has the VM's supervisor take
            // the VM's action and release the leases.
            Some((
                program.clone(),
                vec![
                    "--runtime-dir".to_owned(),
                    dir.display().to_string(),
                    "lock-failure".to_owned(),
                    "--uuid".to_owned(),
                    self.uuid.clone(),
                ],
            ))
        } else {
            // Lockspace lost: the daemon runs `kill -KILL GUEST`; the watcher then sees the guest
            // exit and releases, so the daemon has no reason to signal the VM manager.
            self.pid.map(|pid| {
                (
                    self.shared.config.kill_program.clone(),
                    vec!["-KILL".to_owned(), pid.to_string()],
                )
            })
        };
        if let Some((program, args)) = &killpath {
            conn.killpath(program, &args.join(" "))
                .map_err(|e| daemon_error(&self.shared.client, "killpath", &e))?;
        }
        let owner = Arc::new(LeaseOwner {
            uuid: self.uuid.clone(),
            name: self.name.clone(),
            guest_pid: self.pid,
            pidfd,
            killpath,
            lost: std::sync::atomic::AtomicBool::new(false),
            late_pid: std::sync::OnceLock::new(),
            state: Mutex::new(OwnerState {
                conn: Some(conn),
                held: BTreeMap::new(),
                pending: Vec::new(),
                converted: Vec::new(),
                prepared: None,
                foreign_record: BTreeSet::new(),
                gates: Vec::new(),
            }),
        });
        if !self.incoming {
            lock_map(&self.shared.owners).insert(self.uuid.clone(), Arc::clone(&owner));
        }
        // Every owner: the guest's exit (pid known) and the daemon's death (always) are watched.
        let shared = Arc::clone(&self.shared);
        let watched = Arc::clone(&owner);
        std::thread::Builder::new()
            .name(format!("sanlock-guest-{}", self.pid.unwrap_or(0)))
            .spawn(move || watch_guest(&shared, &watched))
            .map_err(|e| Error::io("starting the guest watcher thread", &e))?;
        Ok(owner)
    }
}

fn open_pidfd(pid: u32, vm: &str) -> Result<OwnedFd> {
    let raw = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    let Some(p) = raw else {
        return Err(Error::InvalidParameter {
            key: "pid".into(),
            reason: format!("{pid} is not a process id"),
        });
    };
    rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).map_err(|e| {
        Error::io(
            format!("watching guest pid {pid} of VM \"{vm}\" (pidfd_open)"),
            &e.into(),
        )
    })
}

/// Waits for the guest's exit (when its pid is known), then releases its leases. Meanwhile
/// watches the registered connection: if the daemon closes it while the owner still uses it (the
/// daemon died, and its leases with it), marks the owner lost and runs the VM's kill path itself,
/// again every [`KILLPATH_REPEAT`] until a run succeeds (sanlock repeats its own: the helper
/// cannot reach a supervisor that has no control socket yet), and SIGKILLs a guest still alive
/// [`LOST_KILL_GRACE`] later without a successful run (its pid known at registration or from `guest_started`). Without a
/// guest pid at registration (a supervisor that acquires before it starts the guest, and shuts
/// down when the guest exits) the thread ends once the owner is finished.
fn watch_guest(shared: &Shared, owner: &Arc<LeaseOwner>) {
    let mut link = owner.lock().conn.as_ref().and_then(|c| c.watch_fd().ok());
    let mut lost: Option<LostLink> = None;
    loop {
        let mut fds = Vec::with_capacity(2);
        if let Some(fd) = &owner.pidfd {
            fds.push(rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN));
        }
        if let Some(l) = &link {
            // No events asked: POLLHUP (the connection closed) is always reported.
            fds.push(rustix::event::PollFd::new(
                l,
                rustix::event::PollFlags::empty(),
            ));
        }
        if fds.is_empty() && lost.is_none() {
            // No guest to wait for and the connection is gone: whoever closed it released.
            return;
        }
        let timeout = lost.as_ref().map(|l| {
            let left = l.next_step().saturating_duration_since(Instant::now());
            rustix::event::Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: i64::from(left.subsec_nanos()),
            }
        });
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Ok(_) => {
                let guest_exited = owner.pidfd.is_some() && !fds[0].revents().is_empty();
                if guest_exited {
                    break;
                }
                let closed = link.is_some() && fds.last().is_some_and(|l| !l.revents().is_empty());
                drop(fds);
                if closed {
                    link = None;
                    // This side drops its connection (guest exit, shutdown) under the owner's
                    // lock: one still there was closed by the daemon.
                    if owner.lock().conn.is_some() {
                        owner.lost.store(true, Ordering::SeqCst);
                        tracing::error!(vm = %owner.name, "the sanlock daemon closed the VM's connection (it died): its leases are lost; running the VM's kill path");
                        lost = Some(LostLink::new(owner));
                    }
                }
                if let Some(l) = &mut lost {
                    if !l.step(owner) {
                        lost = None;
                        if owner.pidfd.is_none() {
                            return;
                        }
                    }
                }
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                tracing::error!(vm = %owner.name, "polling the guest's pidfd failed ({e}); its leases stay until shutdown");
                return;
            }
        }
    }
    owner.finish(shared);
    shared.forget(owner);
}

/// A VM whose daemon closed its connection: when the loss was seen, the kill path's runs, and
/// when it is run again.
struct LostLink {
    since: Instant,
    next_run: Instant,
    running: Arc<std::sync::atomic::AtomicBool>,
    /// A run of the kill path succeeded: the VM's action was carried out (a guest paused on
    /// purpose is not SIGKILLed).
    done: Arc<std::sync::atomic::AtomicBool>,
}

impl LostLink {
    fn new(owner: &LeaseOwner) -> Self {
        let mut l = LostLink {
            since: Instant::now(),
            next_run: Instant::now(),
            running: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            done: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        l.run_killpath(owner);
        l
    }

    /// When the watcher must act next: run the kill path again, or SIGKILL.
    fn next_step(&self) -> Instant {
        self.next_run.min(self.since + LOST_KILL_GRACE)
    }

    /// Runs the kill path again when due, SIGKILLs the guest after the grace; false once there
    /// is nothing more to do (the owner was finished, the kill path succeeded, or the guest was
    /// SIGKILLed).
    fn step(&mut self, owner: &LeaseOwner) -> bool {
        if owner.lock().conn.is_none() {
            return false; // finished: its supervisor shut it down (the guest ended)
        }
        if self.done.load(Ordering::SeqCst) {
            return false; // the VM's action was carried out
        }
        if self.since.elapsed() >= LOST_KILL_GRACE {
            tracing::error!(vm = %owner.name, "the guest is still running {LOST_KILL_GRACE:?} after its sanlock daemon went away: SIGKILL");
            owner.kill_guest();
            return false;
        }
        if Instant::now() >= self.next_run {
            self.run_killpath(owner);
        }
        true
    }

    /// Runs the VM's kill path on a thread of its own, which reaps it (not while a run is still
    /// going on).
    fn run_killpath(&mut self, owner: &LeaseOwner) {
        self.next_run = Instant::now() + KILLPATH_REPEAT;
        let Some((program, args)) = owner.killpath.clone() else {
            return;
        };
        if self.running.swap(true, Ordering::SeqCst) {
            return;
        }
        let (name, running, done) = (
            owner.name.clone(),
            Arc::clone(&self.running),
            Arc::clone(&self.done),
        );
        let spawned = std::thread::Builder::new()
            .name("sanlock-killpath".into())
            .spawn(move || {
                match run_bounded(&program, &args, KILLPATH_RUN_LIMIT) {
                    Ok(Some(s)) if s.success() => done.store(true, Ordering::SeqCst),
                    Ok(Some(s)) => {
                        tracing::warn!(vm = %name, "kill path {} exited with {s}", program.display())
                    }
                    Ok(None) => tracing::error!(
                        vm = %name,
                        "kill path {} still running after {KILLPATH_RUN_LIMIT:?}: killed it",
                        program.display()
                    ),
                    Err(e) => {
                        tracing::error!(vm = %name, "cannot run kill path {}: {e}", program.display())
                    }
                }
                running.store(false, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            self.running.store(false, Ordering::SeqCst);
            tracing::error!(vm = %owner.name, "cannot start the kill path's thread: {e}");
        }
    }
}

impl SanlockSession {
    /// Migration destination, before the hand-off: checks the source's state against the
    /// leases on disk, registers the owner and takes every lease **shared**, beside the source,
    /// which converted its exclusive leases to shared at `prepare_migration`. The exclusive ones
    /// are taken with `RES_LVER` = the source's version, so sanlock itself refuses if anyone ran
    /// a ballot on the lease since the state was taken; they are converted to exclusive at
    /// `complete_migration(Success)`, after the source released. From the source's convert to
    /// the destination's, a live shared holder is always there: sanlock grants no exclusive
    /// request from any other host (`-EAGAIN`).
    fn acquire_incoming(
        &mut self,
        resources: &[Resource],
        options: &AcquireOptions,
        state: &LockState,
    ) -> Result<()> {
        let locked: Vec<&Resource> = resources.iter().filter(|r| r.is_locked()).collect();
        if let Some(e) = state
            .entries
            .iter()
            .find(|e| e.resource.is_locked() && !locked.iter().any(|r| same_lease(r, &e.resource)))
        {
            return Err(Error::InvalidLockState {
                reason: format!(
                    "the migration state holds {}, which the destination was not given",
                    e.resource.label()
                ),
            });
        }
        let mut pending: Vec<Held> = Vec::new();
        let mut shared_now: Vec<Resource> = Vec::new();
        for r in locked {
            let mut spec = self.shared.spec_for(r)?;
            if spec.flags & flags::RES_SHARED != 0 {
                shared_now.push(r.clone());
                continue;
            }
            if pending
                .iter()
                .any(|h| h.spec.lockspace == spec.lockspace && h.spec.name == spec.name)
            {
                continue; // two names of one disk share a lease
            }
            let version = state
                .entries
                .iter()
                .find(|e| same_lease(&e.resource, r))
                .map(|e| e.version)
                .filter(|v| *v > 0)
                .ok_or_else(|| Error::InvalidLockState {
                    reason: format!(
                        "the migration state has no lease version for {} (the source must hold it exclusively)",
                        r.label()
                    ),
                })?;
            // Nothing is taken, but a state that is already stale (or forged) is refused now
            // rather than at the end of the migration: the leader record must still carry the
            // version the source holds.
            let on_disk = self
                .shared
                .client
                .read_resource(&spec)
                .map_err(|e| self.shared.acquire_error(r, &spec, &self.uuid, &e))?;
            if on_disk != version {
                return Err(Error::InvalidLockState {
                    reason: format!(
                        "{}: the migration state has lease version {version}, but the lease is at version {on_disk} (someone held it since the state was taken, or the state is stale or forged)",
                        r.label()
                    ),
                });
            }
            spec.lver = version;
            spec.flags |= flags::RES_LVER;
            pending.push(Held {
                resource: r.clone(),
                spec,
            });
        }
        let owner = self.owner(options)?;
        {
            let mut st = owner.lock();
            st.pending = pending.clone();
            st.foreign_record = pending
                .iter()
                .map(|h| (h.spec.lockspace.clone(), h.spec.name.clone()))
                .collect();
        }
        if options.register_only {
            // Nothing is held: complete_migration(Success) then acquires exclusively with the
            // versions after the source released (detected, not prevented).
            return Ok(());
        }
        // The destination's gate of each disk it migrates in, before it takes the lease shared
        // and until its convert to exclusive: the source opens its own at its
        // complete_migration, before this side converts.
        if let Err(e) = self.close_gates(&owner, &pending, 1) {
            self.open_gates(&owner);
            return Err(e);
        }
        let mut todo = self.plan(&owner, &shared_now, None)?;
        todo.extend(pending.into_iter().map(|h| {
            let mut spec = h.spec;
            spec.flags |= flags::RES_SHARED;
            (h.resource, spec)
        }));
        // No owner records yet: the source's keep naming the VM until the hand-off succeeded.
        let result = self.take(&owner, todo, false);
        if result.is_err() {
            self.open_gates(&owner);
        }
        result
    }

    /// Migration destination, after the source released: converts the leases it holds shared to
    /// exclusive (a ballot: the version grows, so the source's state is stale from then on) and
    /// files the owner as the VM's owner on this host. A lease it does not hold (registered
    /// only) is acquired exclusively with the source's version (`RES_LVER`).
    fn finish_incoming(&mut self) -> Result<()> {
        let Some(owner) = self.current() else {
            return Err(Error::invalid_state(
                "complete an incoming migration",
                format!(
                    "the destination of VM \"{}\" was not given the source's lock state",
                    self.name
                ),
            ));
        };
        let (shared, missing): (Vec<Held>, Vec<Held>) = {
            let st = owner.lock();
            st.pending.iter().cloned().partition(|h| {
                st.held
                    .contains_key(&(h.spec.lockspace.clone(), h.spec.name.clone()))
            })
        };
        // On failure the leases not converted yet stay pending (and held shared): the caller
        // cancels, or retries a Busy.
        for h in &shared {
            self.convert(&owner, h, false)?;
            let mut st = owner.lock();
            st.pending
                .retain(|p| p.spec.lockspace != h.spec.lockspace || p.spec.name != h.spec.name);
            st.foreign_record
                .remove(&(h.spec.lockspace.clone(), h.spec.name.clone()));
            if let Some(held) = st
                .held
                .get_mut(&(h.spec.lockspace.clone(), h.spec.name.clone()))
            {
                held.spec.flags &= !(flags::RES_SHARED | flags::RES_LVER);
            }
            drop(st);
            self.shared.write_owner_record(&h.spec, &owner);
        }
        let missing: Vec<(Resource, ResourceSpec)> =
            missing.into_iter().map(|h| (h.resource, h.spec)).collect();
        self.take(&owner, missing, true)?;
        // Exclusive now: the lease itself refuses every other request.
        self.open_gates(&owner);
        let mut st = owner.lock();
        st.pending.clear();
        st.foreign_record.clear();
        drop(st);
        lock_map(&self.shared.owners).insert(self.uuid.clone(), Arc::clone(&owner));
        self.shared.owners_cv.notify_all();
        Ok(())
    }

    /// The leases of `resources` that `owner` does not hold yet, with the versions of `state`
    /// (`RES_LVER`) on exclusive ones.
    fn plan(
        &self,
        owner: &LeaseOwner,
        resources: &[Resource],
        state: Option<&LockState>,
    ) -> Result<Vec<(Resource, ResourceSpec)>> {
        let mut todo: Vec<(Resource, ResourceSpec)> = Vec::new();
        for r in resources.iter().filter(|r| r.is_locked()) {
            if owner.lock().held.values().any(|h| &h.resource == r) {
                continue; // the same owner asking again: already held
            }
            let mut spec = self.shared.spec_for(r)?;
            if let Some(h) = owner
                .lock()
                .held
                .get(&(spec.lockspace.clone(), spec.name.clone()))
            {
                return Err(Error::InvalidResource {
                    resource: r.label(),
                    reason: format!("this VM already holds its lease as {}", h.resource),
                });
            }
            let version = state.and_then(|s| {
                s.entries
                    .iter()
                    .find(|e| &e.resource == r)
                    .map(|e| e.version)
            });
            if let Some(v) = version.filter(|v| *v > 0) {
                if spec.flags & flags::RES_SHARED == 0 {
                    spec.lver = v;
                    spec.flags |= flags::RES_LVER;
                }
            }
            // Two names of one disk (a symlink) share a lease: take it once.
            if !todo
                .iter()
                .any(|(_, t)| t.lockspace == spec.lockspace && t.name == spec.name)
            {
                todo.push((r.clone(), spec));
            }
        }
        Ok(todo)
    }

    /// Converts `h`, held by `owner`, to shared or to exclusive. To exclusive, `-EAGAIN` (another
    /// live host still holds it shared: e.g. the source's release not yet seen, or the
    /// destination not cancelled yet) is retried for up to `CONVERT_RETRY`; the lease stays held
    /// shared whatever happens.
    fn convert(&self, owner: &LeaseOwner, h: &Held, to_shared: bool) -> Result<()> {
        let deadline = Instant::now() + CONVERT_RETRY;
        loop {
            let result = {
                let mut st = owner.lock();
                let Some(conn) = st.conn.as_mut() else {
                    return Err(Error::invalid_state(
                        "convert a lease",
                        format!("the guest of VM \"{}\" has exited", self.name),
                    ));
                };
                conn.convert(&h.spec, to_shared)
            };
            match result {
                Ok(()) => return Ok(()),
                Err(ClientError::Daemon(rv::EALREADY)) => return Ok(()),
                Err(ClientError::Daemon(rv::EAGAIN)) if !to_shared && Instant::now() < deadline => {
                    // Bounded retry (deadline): sanlock tells no one when the other host's
                    // shared hold ends.
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    let mut spec = h.spec.clone();
                    spec.flags &= !flags::RES_LVER;
                    return Err(self
                        .shared
                        .acquire_error(&h.resource, &spec, &self.uuid, &e));
                }
            }
        }
    }

    /// Takes `todo` for `owner`, all or nothing, one lease per call so that a refusal names its
    /// disk; writes the owner records when `record`.
    fn take(
        &self,
        owner: &Arc<LeaseOwner>,
        todo: Vec<(Resource, ResourceSpec)>,
        record: bool,
    ) -> Result<()> {
        if todo.is_empty() {
            return Ok(());
        }
        if todo
            .iter()
            .any(|(_, s)| s.lockspace == self.shared.config.lockspace)
        {
            self.shared.wait_joined(self.shared.config.join_timeout)?;
        }
        // A shared disk lease is taken inside its gate (both gate leases held shared meanwhile),
        // so that it is refused while a migration hands the disk over. The destination's own
        // shared acquire of a lease it migrates in carries the source's version (`RES_LVER`) and
        // its own gate is held exclusively: it does not pass the gate.
        let mut gated: Vec<Option<Vec<ResourceSpec>>> = Vec::with_capacity(todo.len());
        for (_, spec) in &todo {
            let through_gate =
                spec.flags & flags::RES_SHARED != 0 && spec.flags & flags::RES_LVER == 0;
            gated.push(match through_gate {
                true => self.shared.gates(spec)?.map(|g| {
                    g.into_iter()
                        .map(|mut s| {
                            s.flags |= flags::RES_SHARED;
                            s
                        })
                        .collect()
                }),
                false => None,
            });
        }
        let failure = {
            let mut st = owner.lock();
            let OwnerState {
                conn: conn_slot,
                gates,
                held,
                ..
            } = &mut *st;
            let Some(conn) = conn_slot.as_mut() else {
                return Err(Error::invalid_state(
                    "acquire",
                    format!("the guest of VM \"{}\" has exited", self.name),
                ));
            };
            // One lease per call, so a refusal names its disk; earlier ones are rolled back.
            let mut taken: Vec<ResourceSpec> = Vec::new();
            let mut failure = None;
            let mut stuck_gates: Vec<ResourceSpec> = Vec::new();
            for ((r, spec), gate) in todo.iter().zip(&gated) {
                let lease = std::slice::from_ref(spec);
                let result = match gate {
                    None => conn.acquire(lease, flags::ACQUIRE_OWNER_NOWAIT, &self.name),
                    Some(gate) => conn
                        .acquire(gate, flags::ACQUIRE_OWNER_NOWAIT, &self.name)
                        .and_then(|()| {
                            let result =
                                conn.acquire(lease, flags::ACQUIRE_OWNER_NOWAIT, &self.name);
                            if let Err(e) = conn.release(gate) {
                                tracing::warn!(vm = %self.name, "leaving the gate of {}: release failed ({e}); the gate stays held shared until the VM's leases are released", r.label());
                                stuck_gates.extend(gate.iter().cloned());
                            }
                            result
                        }),
                };
                if let Err(e) = result {
                    failure = Some((r.clone(), spec.clone(), e));
                    break;
                }
                taken.push(spec.clone());
            }
            gates.extend(stuck_gates);
            if failure.is_some() {
                for chunk in taken.chunks(proto::MAX_RESOURCES) {
                    if let Err(e) = conn.release(chunk) {
                        tracing::error!(vm = %self.name, "rolling back a failed acquire: release failed ({e}); closing the sanlock connection");
                        *conn_slot = None;
                        held.clear();
                        gates.clear();
                        break;
                    }
                }
            } else {
                for (r, spec) in &todo {
                    held.insert(
                        (spec.lockspace.clone(), spec.name.clone()),
                        Held {
                            resource: r.clone(),
                            spec: spec.clone(),
                        },
                    );
                }
            }
            failure
        };
        if let Some((r, spec, e)) = failure {
            return Err(self.shared.acquire_error(&r, &spec, &self.uuid, &e));
        }
        if record {
            for (_, spec) in &todo {
                self.shared.write_owner_record(spec, owner);
            }
        }
        Ok(())
    }
}

/// Whether `a` and `b` use one lease: equal, or two names of one disk image.
fn same_lease(a: &Resource, b: &Resource) -> bool {
    match (a, b) {
        (Resource::Disk { path: p, .. }, Resource::Disk { path: q, .. }) => {
            a == b || lease_name(p) == lease_name(q)
        }
        _ => a == b,
    }
}

/// Results worth retrying while closing a gate: a shared acquire is inside it (`-EAGAIN`, or
/// `-EEXIST` on this host), or a ballot holds its leader for a moment.
fn gate_busy(code: i32) -> bool {
    matches!(
        code,
        rv::EAGAIN
            | rv::EEXIST
            | rv::EBUSY
            | rv::ACQUIRE_IDLIVE
            | rv::ACQUIRE_OWNED
            | rv::ACQUIRE_OTHER
            | rv::ACQUIRE_SHRETRY
            | rv::ACQUIRE_OWNED_RETRY
    )
}

impl SanlockSession {
    /// Closes the gate of each of `leases` for a hand-off: takes gate `which` (0: the source's,
    /// 1: the destination's) exclusively on `owner`'s connection and files it in the owner's
    /// `gates`. A shared acquire inside the gate is waited for, up to `CONVERT_RETRY` in all;
    /// then the error is "retry later". On failure the gates already closed stay filed (the
    /// caller opens them).
    fn close_gates(&self, owner: &LeaseOwner, leases: &[Held], which: usize) -> Result<()> {
        let deadline = Instant::now() + CONVERT_RETRY;
        for h in leases {
            let Some(gates) = self.shared.gates(&h.spec)? else {
                continue;
            };
            let gate = gates[which].clone();
            loop {
                let result = {
                    let mut st = owner.lock();
                    let Some(conn) = st.conn.as_mut() else {
                        return Err(Error::invalid_state(
                            "close a disk's gate",
                            format!("the guest of VM \"{}\" has exited", self.name),
                        ));
                    };
                    let r = conn.acquire(
                        std::slice::from_ref(&gate),
                        flags::ACQUIRE_OWNER_NOWAIT,
                        &self.name,
                    );
                    if r.is_ok() {
                        st.gates.push(gate.clone());
                    }
                    r
                };
                match result {
                    Ok(()) => break,
                    Err(ClientError::Daemon(code)) if gate_busy(code) => {
                        if Instant::now() >= deadline {
                            return Err(Error::ServiceUnavailable {
                                reason: format!(
                                    "the migration gate of {} stayed busy for {} s (a shared acquire of the disk is under way, or a host that was in the gate has not been seen dead yet); retry later: {}",
                                    h.resource.label(),
                                    CONVERT_RETRY.as_secs(),
                                    describe_rv(code)
                                ),
                            });
                        }
                        // Bounded retry (deadline above): a gate's release has no event.
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => {
                        return Err(self
                            .shared
                            .acquire_error(&h.resource, &gate, &self.uuid, &e))
                    }
                }
            }
        }
        Ok(())
    }

    /// Releases the gates `owner` holds for a hand-off; one the daemon does not release stays
    /// filed (the connection's close releases it).
    fn open_gates(&self, owner: &LeaseOwner) {
        let mut st = owner.lock();
        let OwnerState { conn, gates, .. } = &mut *st;
        let Some(conn) = conn.as_mut() else {
            gates.clear();
            return;
        };
        for chunk in std::mem::take(gates).chunks(proto::MAX_RESOURCES) {
            if let Err(e) = conn.release(chunk) {
                tracing::warn!(vm = %self.name, "releasing migration gates failed ({e}); they stay held until the VM's connection closes");
                gates.extend(chunk.iter().cloned());
            }
        }
    }

    /// Converts `leases` (shared since a prepare) back to exclusive; the ones left shared stay
    /// in the owner's `converted` on failure.
    fn restore(&self, owner: &LeaseOwner, leases: &[Held]) -> Result<()> {
        for (i, h) in leases.iter().enumerate() {
            if let Err(e) = self.convert(owner, h, false) {
                owner.lock().converted = leases[i..].to_vec();
                return Err(e);
            }
        }
        Ok(())
    }
}

impl Session for SanlockSession {
    fn acquire(
        &mut self,
        resources: &[Resource],
        options: &AcquireOptions,
        state: Option<&LockState>,
    ) -> Result<()> {
        if let Some(state) = state {
            state.check_driver(NAME)?;
        }
        self.shared.reap_exited();
        if let (true, None, Some(state)) = (self.incoming, &self.mine, state) {
            return self.acquire_incoming(resources, options, state);
        }
        let owner = self.owner(options)?;
        if options.register_only {
            return Ok(());
        }
        let todo = self.plan(&owner, resources, state)?;
        self.take(&owner, todo, true)
    }

    fn release(&mut self, resources: &[Resource]) -> Result<LockState> {
        let owner = self.current();
        let mut released = LockState::empty(NAME);
        let mut failures = Vec::new();
        let not_held = |r: &Resource| ResourceFailure {
            resource: r.label(),
            error: Box::new(Error::NotHeld {
                resource: r.label(),
                owner: self.uuid.clone(),
            }),
        };
        let locked: Vec<&Resource> = resources.iter().filter(|r| r.is_locked()).collect();
        let Some(owner) = owner else {
            failures.extend(locked.into_iter().map(not_held));
            return if failures.is_empty() {
                Ok(released)
            } else {
                Err(Error::PartialRelease { failures })
            };
        };
        let mut st = owner.lock();
        let mut todo: Vec<Held> = Vec::new();
        for r in locked {
            match st.held.values().find(|h| &h.resource == r) {
                Some(h) if !todo.iter().any(|t| t.resource == h.resource) => todo.push(h.clone()),
                Some(_) => {}
                None => failures.push(not_held(r)),
            }
        }
        if owner.lost.load(Ordering::SeqCst) {
            // The daemon died and its leases with it: nothing is held any more to release (what
            // lock-failure helpers ask for after stopping the guest).
            for h in &todo {
                released.entries.push(StateEntry {
                    resource: h.resource.clone(),
                    version: 0,
                });
            }
        } else if let Some(conn) = st.conn.as_mut() {
            let versions = conn
                .inquire()
                .map(|s| proto::parse_state(&s))
                .unwrap_or_default();
            for chunk in todo.chunks(proto::MAX_RESOURCES) {
                let specs: Vec<ResourceSpec> = chunk.iter().map(|h| h.spec.clone()).collect();
                match conn.release(&specs) {
                    Ok(()) => {
                        for h in chunk {
                            let version = versions
                                .iter()
                                .find(|v| v.lockspace == h.spec.lockspace && v.name == h.spec.name)
                                .and_then(|v| v.lver)
                                .unwrap_or(0);
                            released.entries.push(StateEntry {
                                resource: h.resource.clone(),
                                version,
                            });
                        }
                    }
                    Err(e) => {
                        for h in chunk {
                            failures.push(ResourceFailure {
                                resource: h.resource.label(),
                                error: Box::new(daemon_error(
                                    &self.shared.client,
                                    &format!("release of {}", h.resource.label()),
                                    &e,
                                )),
                            });
                        }
                        continue;
                    }
                }
            }
        }
        for e in &released.entries {
            let foreign = st.foreign_record.clone();
            st.held.retain(|k, h| {
                if h.resource == e.resource && !foreign.contains(k) {
                    self.shared.remove_owner_record(&h.spec, &self.uuid);
                }
                h.resource != e.resource
            });
        }
        drop(st);
        if failures.is_empty() {
            Ok(released)
        } else {
            Err(Error::PartialRelease { failures })
        }
    }

    fn inquire(&mut self) -> Result<LockState> {
        let mut state = LockState::empty(NAME);
        let Some(owner) = self.current() else {
            return Ok(state);
        };
        let mut st = owner.lock();
        let held: Vec<Held> = st.held.values().cloned().collect();
        let Some(conn) = st.conn.as_mut() else {
            return Ok(state);
        };
        let text = conn
            .inquire()
            .map_err(|e| daemon_error(&self.shared.client, "inquire", &e))?;
        let leases = proto::parse_state(&text);
        for h in held {
            let found = leases
                .iter()
                .find(|l| l.lockspace == h.spec.lockspace && l.name == h.spec.name);
            match found {
                Some(l) => state.entries.push(StateEntry {
                    resource: h.resource,
                    version: l.lver.unwrap_or(0),
                }),
                None => {
                    tracing::warn!(vm = %self.name, "sanlock no longer lists the lease of {}", h.resource.label())
                }
            }
        }
        Ok(state)
    }

    fn prepare_migration(&mut self, _destination_uri: &str) -> Result<LockState> {
        if let Some(owner) = self.current() {
            if owner.lock().conn.is_none() || owner.guest_gone() {
                return Err(Error::invalid_state(
                    "prepare a migration",
                    format!("the guest of VM \"{}\" has exited", self.name),
                ));
            }
        }
        let Some(owner) = self.current() else {
            return Ok(LockState::empty(NAME));
        };
        if let Some(state) = owner.lock().prepared.clone() {
            return Ok(state); // prepared already: the same hand-off
        }
        // The versions first (sanlock reports none for shared leases), then every exclusive
        // lease goes shared: this host's shared mode block is written before the leader is
        // released, so no other host can take the lease exclusively from now on, and the
        // destination can take it shared beside this one.
        let state = self.inquire()?;
        let exclusive: Vec<Held> = owner
            .lock()
            .held
            .values()
            .filter(|h| h.spec.flags & flags::RES_SHARED == 0)
            .cloned()
            .collect();
        // The source's gate of each such disk first: from here until this side's
        // complete_migration no other VM's shared acquire of the disk passes its gate.
        if let Err(e) = self.close_gates(&owner, &exclusive, 0) {
            self.open_gates(&owner);
            return Err(e);
        }
        let mut done: Vec<Held> = Vec::new();
        for h in exclusive {
            if let Err(e) = self.convert(&owner, &h, true) {
                // All or nothing: the ones already shared go back to exclusive.
                if let Err(back) = self.restore(&owner, &done) {
                    tracing::error!(vm = %self.name, "undoing a failed migration prepare: {back}");
                    owner.lock().converted = done;
                } else {
                    self.open_gates(&owner);
                }
                return Err(e);
            }
            done.push(h);
        }
        let mut st = owner.lock();
        st.converted = done;
        st.prepared = Some(state.clone());
        Ok(state)
    }

    fn complete_migration(&mut self, outcome: MigrationOutcome, incoming: bool) -> Result<()> {
        match (outcome, incoming) {
            // Source: release, so that the destination can take the leases. The versions are in
            // the state prepare_migration handed out.
            (MigrationOutcome::Success, false) => {
                let held: Vec<Resource> = match self.current() {
                    Some(o) => {
                        let mut st = o.lock();
                        // The destination's owner record replaces this one at its convert.
                        let handed: Vec<(String, String)> = st
                            .converted
                            .iter()
                            .map(|h| (h.spec.lockspace.clone(), h.spec.name.clone()))
                            .collect();
                        st.foreign_record.extend(handed);
                        st.converted.clear();
                        st.prepared = None;
                        st.held.values().map(|h| h.resource.clone()).collect()
                    }
                    None => Vec::new(),
                };
                self.release(&held)?;
                // The destination holds its own gate until its convert to exclusive.
                if let Some(o) = self.current() {
                    self.open_gates(&o);
                }
                Ok(())
            }
            // Source: the leases prepare made shared become exclusive again (a ballot: the
            // version grows, so the handed-out state is stale).
            (MigrationOutcome::Cancel, false) => {
                let Some(owner) = self.current() else {
                    return Ok(());
                };
                let converted = owner.lock().converted.clone();
                self.restore(&owner, &converted)?;
                self.open_gates(&owner);
                let mut st = owner.lock();
                st.converted.clear();
                st.prepared = None;
                Ok(())
            }
            (MigrationOutcome::Success, true) => self.finish_incoming(),
            (MigrationOutcome::Cancel, true) => {
                // Shared leases taken at the incoming acquire are released; the session keeps
                // its (now empty) owner so that it never falls back to the source's.
                if let Some(owner) = self.current() {
                    owner.lock().pending.clear();
                    owner.finish(&self.shared);
                    self.shared.forget(&owner);
                }
                Ok(())
            }
        }
    }

    fn guest_started(&mut self, pid: u32) -> Result<()> {
        let Some(owner) = self.current() else {
            return Ok(());
        };
        // The pid first, then the check: the watcher marks the owner lost first, then reads the
        // pid, so either this refuses or the watcher can kill the guest.
        let _ = owner.late_pid.set(pid);
        if owner.lost.load(Ordering::SeqCst) {
            return Err(Error::ServiceUnavailable {
                reason: format!(
                    "the sanlock daemon at {} died after VM \"{}\" took its leases: they are lost, so its guest must not run",
                    self.shared.client.socket().display(),
                    self.name
                ),
            });
        }
        Ok(())
    }

    fn guest_pid(&mut self) -> Result<Option<u32>> {
        Ok(self
            .current()
            .filter(|o| !o.guest_gone())
            .and_then(|o| o.guest_pid))
    }

    fn shutdown(&mut self) -> Result<()> {
        if let Some(owner) = self.current() {
            owner.finish(&self.shared);
            self.shared.forget(&owner);
        }
        Ok(())
    }

    fn driver_name(&self) -> &str {
        NAME
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_old_daemons_naming_both_versions() {
        let e = check_version(0x0208_0000).unwrap_err().to_string();
        assert!(e.contains("2.8.0") && e.contains("3.3.0"), "{e}");
        check_version(0x0308_0500).unwrap();
        let e = old_daemon(&Client::new(Path::new("/run/old"))).to_string();
        assert!(
            e.contains("older than sanlock 3.2") && e.contains("3.3.0"),
            "{e}"
        );
    }

    #[test]
    fn config_checks_host_id_and_keys() {
        let parse = |t: &str| SanlockConfig::from_toml(&t.parse::<toml::Table>().unwrap());
        let e = parse("lease_dir = \"/x\"").unwrap_err().to_string();
        assert!(e.contains("host_id is required"), "{e}");
        let e = parse("host_id = 2001").unwrap_err().to_string();
        assert!(e.contains("1 to 2000"), "{e}");
        let e = parse("host_id = 0").unwrap_err().to_string();
        assert!(e.contains("1 to 2000"), "{e}");
        let e = parse("host_id = 1\ncolour = 2").unwrap_err().to_string();
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = parse("host_id = 1\nio_timeout = \"10\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("io_timeout"), "a bad value names its key: {e}");
        let e = parse("host_id = 1\nlockspace = \"a:b\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("lockspace"), "{e}");
        let c = parse("host_id = 5\nio_timeout = 1\nlease_dir = \"/l\"").unwrap();
        assert_eq!((c.host_id, c.io_timeout), (5, 1));
        assert_eq!(c.lockspace, DEFAULT_LOCKSPACE);
    }

    #[test]
    fn socket_errors_keep_their_io_kind() {
        let client = Client::new(Path::new("/nonexistent/run"));
        let e = daemon_error(
            &client,
            "register",
            &ClientError::Io(io::ErrorKind::NotFound.into()),
        );
        assert_eq!(e.io_kind(), Some(io::ErrorKind::NotFound), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("/nonexistent/run/sanlock.sock") && text.contains("register"),
            "{text}"
        );
        assert_eq!(
            daemon_error(&client, "register", &ClientError::Daemon(-16)).io_kind(),
            None
        );
    }

    #[test]
    fn lease_names_are_stable_hashes() {
        let n = lease_name(Path::new("/nonexistent/disk.img"));
        assert_eq!(n.len(), 32);
        assert!(n.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(n, lease_name(Path::new("/nonexistent/disk.img")));
        assert_ne!(n, lease_name(Path::new("/nonexistent/disk2.img")));
    }
}
