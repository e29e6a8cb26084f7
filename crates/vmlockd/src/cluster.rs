//! The cluster backend (`[etcd]` in `vmlockd.toml`): besides its local OFD lock, every exclusive
//! or shared grant holds a key in etcd under this host's one lease, so that two hosts never
//! grant one disk (docs/etcd.md).
//!
//! - **Acquire** (a request thread): after the core reserved the local locks, one etcd
//!   transaction takes every key of the request or none; a refusal names the other host's VM.
//! - **Release** (the `etcd-release` thread): keys are never released on the request path. The
//!   thread compares what this host holds in etcd with what the table holds (pending grants
//!   included) and deletes the difference, woken after every change to the table. So every way
//!   a grant ends — release, guest death, an aborted acquire, a lost migration — frees its key,
//!   without each path knowing about etcd.
//! - Both sides of one VM run under that VM's cluster lock (never the table lock: etcd is a
//!   network wait), so a release can never delete a key an acquire of the same VM just took.
//! - **Lease**: granted at start (or taken over from the last run, by the id kept in
//!   `RUNTIME/etcd.lease`, so a daemon restart loses no key), re-granted after a loss.
//! - **Fencing** (the `etcd-fence` thread, in `server.rs`): `fence_lead` before the lease's
//!   deadline D, or at once when the lease is lost, every guest holding keys gets its
//!   lock-failure action.
//!
//! A key's holder is `UUID@HOST`: during a migration between hosts the destination's keys sit
//! beside the source's (`vmlock_etcd`'s hand-over), and either alone still holds the disk.
//!
//! The key of a disk is its path, which must be its real path (no symlink in it): shared storage
//! is mounted at the same path on every host, and two names for one file on one host still reach
//! one local lock. A lease's key is `lease:LOCKSPACE/KEY`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;
use vmlock::{DiskMode, Error, ForeignHolder, Holder, Resource};
use vmlock_etcd::{Etcd, HostLease, LeaseId, LockKey, LockRequest, Owner, Revision, SourceKey};

/// The etcd disk id of `resource` and whether its lock is exclusive; `None` for what takes no
/// lock (read-only disks).
pub fn disk_id(resource: &Resource) -> Option<(String, bool)> {
    match resource {
        Resource::Disk { path, mode } => {
            let exclusive = match mode {
                DiskMode::Exclusive => true,
                DiskMode::Shared => false,
                DiskMode::ReadOnly => return None,
            };
            Some((path.to_string_lossy().into_owned(), exclusive))
        }
        Resource::Lease(l) => Some((format!("lease:{}/{}", l.lockspace, l.key), true)),
    }
}

/// Refuses a disk whose path is not its real path, or not UTF-8: its etcd key would not be the
/// one another host computes. May block on a hung mount: call with the table unlocked.
pub fn check_cluster_name(resource: &Resource) -> Result<(), Error> {
    let Resource::Disk { path, mode } = resource else {
        return Ok(());
    };
    if resource.network_id().is_some() {
        // Named by identity: the same name on every host by definition.
        return Ok(());
    }
    if *mode == DiskMode::ReadOnly {
        return Ok(());
    }
    let bad = |reason: String| Error::InvalidResource {
        resource: resource.label(),
        reason,
    };
    if path.to_str().is_none() {
        return Err(bad("the cluster lock needs a UTF-8 path".into()));
    }
    match std::fs::canonicalize(path) {
        Ok(real) if real == *path => Ok(()),
        Ok(real) => Err(bad(format!(
            "it resolves to {}: name the disk by its real path, which is its key in etcd on \
             every host",
            real.display()
        ))),
        // Opening it reports this error better, naming the disk.
        Err(_) => Ok(()),
    }
}

/// The connection and the lease in force.
#[derive(Default)]
struct Link {
    etcd: Option<Etcd>,
    lease: Option<Arc<HostLease>>,
    /// Why there is no lease, for refusals.
    trouble: Option<String>,
}

/// The daemon's side of etcd.
pub struct Cluster {
    config: vmlock_etcd::Config,
    lease_file: PathBuf,
    link: Mutex<Link>,
    /// The disk ids of the keys each VM (by uuid) holds, or may hold: an acquire whose outcome
    /// is unknown counts as held until a release confirms it gone.
    held: Mutex<HashMap<String, HashSet<String>>>,
    /// One lock per VM: its acquire's etcd step and its keys' release never overlap.
    vm_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Set when the table changed; the release thread waits on it.
    wake: (Mutex<bool>, Condvar),
    /// A lease has been in force this run (the last run's was taken over or found gone).
    established: std::sync::atomic::AtomicBool,
    /// The deadline last written for supervisors.
    handed: Mutex<Option<vmlock_client::fence::FenceDeadline>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("endpoints", &self.config.endpoints)
            .field("prefix", &self.config.prefix)
            .finish()
    }
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain maps: a panic elsewhere leaves them usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cluster {
    /// The backend for `config` (validated, its host filled in); no I/O.
    pub fn new(config: vmlock_etcd::Config, runtime_dir: &Path) -> Self {
        Cluster {
            config,
            lease_file: runtime_dir.join("etcd.lease"),
            link: Mutex::new(Link {
                trouble: Some("not connected yet".into()),
                ..Link::default()
            }),
            held: Mutex::new(HashMap::new()),
            vm_locks: Mutex::new(HashMap::new()),
            wake: (Mutex::new(false), Condvar::new()),
            established: std::sync::atomic::AtomicBool::new(false),
            handed: Mutex::new(None),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &vmlock_etcd::Config {
        &self.config
    }

    /// T_stop.
    pub fn fence_lead(&self) -> Duration {
        self.config.fence_lead()
    }

    /// The lease in force, if any.
    pub fn lease(&self) -> Option<Arc<HostLease>> {
        locked(&self.link).lease.clone()
    }

    fn unavailable(&self, why: &str) -> Error {
        Error::ServiceUnavailable {
            reason: format!(
                "etcd at {}: {why}; no disk can be locked cluster-wide until it answers",
                self.config.endpoints_text()
            ),
        }
    }

    /// VM `uuid`'s cluster lock.
    pub fn vm_lock(&self, uuid: &str) -> Arc<Mutex<()>> {
        Arc::clone(
            locked(&self.vm_locks)
                .entry(uuid.to_owned())
                .or_insert_with(|| Arc::new(Mutex::new(()))),
        )
    }

    /// Forgets VM `uuid`'s cluster lock `ours` (taken from [`Cluster::vm_lock`] and still held
    /// by the caller) when the VM holds no key and nobody else has the lock: after a refused
    /// acquire of a VM that holds nothing, so refusals leave no entry behind.
    pub fn forget_vm_lock_if_unused(&self, uuid: &str, ours: &Arc<Mutex<()>>) {
        let held = locked(&self.held);
        if held.contains_key(uuid) {
            return;
        }
        let mut locks = locked(&self.vm_locks);
        // The map's reference and `ours`: any more is another request waiting for it.
        if locks
            .get(uuid)
            .is_some_and(|l| Arc::ptr_eq(l, ours) && Arc::strong_count(l) == 2)
        {
            locks.remove(uuid);
        }
    }

    /// VM locks kept, for tests.
    #[cfg(test)]
    fn vm_lock_count(&self) -> usize {
        locked(&self.vm_locks).len()
    }

    /// Tells the release thread the table changed.
    pub fn changed(&self) {
        *locked(&self.wake.0) = true;
        self.wake.1.notify_all();
    }

    /// Waits at most `timeout` for [`Cluster::changed`].
    pub fn wait_changed(&self, timeout: Duration) {
        let woken = locked(&self.wake.0);
        let (mut woken, _) = self
            .wake
            .1
            .wait_timeout_while(woken, timeout, |w| !*w)
            .unwrap_or_else(|p| p.into_inner());
        *woken = false;
    }

    /// Takes the keys of `resources` for VM `owner` in one transaction, or none. Call with the
    /// VM's cluster lock held and its local locks reserved.
    pub fn acquire(
        &self,
        owner: &Owner,
        resources: &[Resource],
        incoming: Option<&Incoming>,
    ) -> Result<(), Error> {
        if resources.iter().all(|r| disk_id(r).is_none()) {
            return Ok(());
        }
        let Some(lease) = self.lease() else {
            let trouble = locked(&self.link).trouble.clone().unwrap_or_default();
            return Err(self.unavailable(&trouble));
        };
        self.acquire_under(&lease, owner, resources, incoming)
    }

    /// [`Cluster::acquire`] under `lease`, in force or about to be.
    pub fn acquire_under(
        &self,
        lease: &HostLease,
        owner: &Owner,
        resources: &[Resource],
        incoming: Option<&Incoming>,
    ) -> Result<(), Error> {
        let wanted: Vec<(String, bool, String)> = resources
            .iter()
            .filter_map(|r| disk_id(r).map(|(d, e)| (d, e, r.label())))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        if lease.check().is_err()
            || lease.deadline().remaining() <= self.fence_lead() + self.config.keepalive_interval()
        {
            return Err(self.unavailable(&format!(
                "this host's lease {} is not being renewed",
                lease.id()
            )));
        }
        let requests: Vec<LockRequest> = wanted
            .iter()
            .map(|(disk, exclusive, _)| LockRequest {
                key: LockKey::new(disk, &self.holder_name(&owner.vm_uuid)),
                exclusive: *exclusive,
                owner: owner.clone(),
            })
            .collect();
        match incoming {
            None => self.take(owner, &wanted, |r| lease.acquire(r), &requests),
            Some(h) => {
                let sources = h.sources(&wanted)?;
                let hash = secret_hash(&h.secret);
                self.take(
                    owner,
                    &wanted,
                    |r| lease.acquire_incoming(&owner.vm_uuid, &hash, &sources, r),
                    &requests,
                )
            }
        }
    }

    /// Runs `transaction` for `requests`, keeping `held` true to what it may have taken.
    fn take(
        &self,
        owner: &Owner,
        wanted: &[(String, bool, String)],
        transaction: impl FnOnce(&[LockRequest]) -> Result<Revision, vmlock_etcd::Error>,
        requests: &[LockRequest],
    ) -> Result<(), Error> {
        // Counted as held before the transaction: if its outcome is unknown (a timeout), the
        // release thread deletes whatever it left once the table no longer wants it.
        let fresh: Vec<String> = {
            let mut held = locked(&self.held);
            let vm = held.entry(owner.vm_uuid.clone()).or_default();
            wanted
                .iter()
                .filter(|(disk, _, _)| vm.insert(disk.clone()))
                .map(|(d, _, _)| d.clone())
                .collect()
        };
        match transaction(requests) {
            Ok(_) => Ok(()),
            Err(e) => {
                if matches!(
                    e,
                    vmlock_etcd::Error::Conflict { .. }
                        | vmlock_etcd::Error::Invalid(_)
                        | vmlock_etcd::Error::Stale { .. }
                        | vmlock_etcd::Error::Refused { .. }
                ) {
                    // Refused: the transaction took nothing.
                    let mut held = locked(&self.held);
                    if let Some(vm) = held.get_mut(&owner.vm_uuid) {
                        for d in &fresh {
                            vm.remove(d);
                        }
                        if vm.is_empty() {
                            held.remove(&owner.vm_uuid);
                        }
                    }
                }
                Err(self.refusal(e, wanted))
            }
        }
    }

    fn refusal(&self, e: vmlock_etcd::Error, wanted: &[(String, bool, String)]) -> Error {
        match e {
            vmlock_etcd::Error::Conflict { key, holder, .. } => {
                let resource = wanted
                    .iter()
                    .find(|(d, _, _)| *d == key.disk)
                    .map_or(key.disk.clone(), |(_, _, label)| label.clone());
                Error::Busy {
                    resource,
                    holder: ForeignHolder::Vm(Holder {
                        name: holder.vm_name,
                        uuid: holder.vm_uuid,
                        pid: holder.pid,
                        host: holder.host,
                    }),
                }
            }
            vmlock_etcd::Error::Stale { key, .. } => Error::InvalidLockState {
                reason: format!(
                    "the source's lock state is not current for {}: another prepare, or the \
                     lock moved since (etcd)",
                    key.disk
                ),
            },
            other => {
                let kind = other.kind();
                Error::io(
                    "locking in etcd".to_string(),
                    &std::io::Error::new(kind, other.to_string()),
                )
            }
        }
    }

    /// VMs with keys.
    pub fn vms(&self) -> Vec<String> {
        locked(&self.held).keys().cloned().collect()
    }

    /// Disk ids VM `uuid` holds keys for.
    pub fn disks_of(&self, uuid: &str) -> Vec<String> {
        locked(&self.held)
            .get(uuid)
            .map_or_else(Vec::new, |vm| vm.iter().cloned().collect())
    }

    /// Deletes the keys of VM `uuid` not in `wanted` (disk ids). Call with the VM's cluster
    /// lock held, `wanted` read from the table after taking it.
    pub fn release_unwanted(&self, uuid: &str, wanted: &HashSet<String>) -> Result<(), Error> {
        let extra: Vec<String> = self
            .disks_of(uuid)
            .into_iter()
            .filter(|d| !wanted.contains(d))
            .collect();
        if extra.is_empty() {
            return Ok(());
        }
        let Some(lease) = self.lease() else {
            // No lease: its keys went with it (see `lease_ended`).
            return Ok(());
        };
        let holder = self.holder_name(uuid);
        let keys: Vec<LockKey> = extra.iter().map(|d| LockKey::new(d, &holder)).collect();
        lease
            .release(&keys)
            .map_err(|e| self.unavailable(&e.to_string()))?;
        let mut held = locked(&self.held);
        if let Some(vm) = held.get_mut(uuid) {
            for d in &extra {
                vm.remove(d);
            }
            if vm.is_empty() {
                held.remove(uuid);
                locked(&self.vm_locks).remove(uuid);
            }
        }
        tracing::debug!(uuid, disks = ?extra, "etcd keys released");
        Ok(())
    }

    /// The lease `lease` ended (lost, or about to be fenced): no acquire uses it any more, and
    /// the keys it had are forgotten (the cluster deletes them with the lease). Returns what
    /// they were, per VM.
    pub fn lease_ended(&self, lease: &HostLease) -> HashMap<String, Vec<String>> {
        {
            let mut link = locked(&self.link);
            if link.lease.as_ref().is_some_and(|l| l.id() == lease.id()) {
                link.lease = None;
                link.trouble = Some(format!("this host's lease {} ended", lease.id()));
            }
        }
        std::mem::take(&mut *locked(&self.held))
            .into_iter()
            .map(|(uuid, disks)| (uuid, disks.into_iter().collect()))
            .collect()
    }

    /// Connects and grants (or, at the first call, takes over) the host lease, not yet in force
    /// ([`Cluster::publish`]). Returns it and whether the last run's lease could not be taken
    /// over (its keys are gone).
    pub fn establish(&self, first: bool) -> Result<(Arc<HostLease>, bool), Error> {
        let connected = locked(&self.link).etcd.clone();
        let etcd = match connected {
            Some(e) => e,
            None => {
                let e = Etcd::connect(&self.config).map_err(|e| self.note_trouble(e))?;
                locked(&self.link).etcd = Some(e.clone());
                e
            }
        };
        let mut earlier_lost = false;
        let previous = first.then(|| self.read_lease_file()).flatten();
        let lease = match previous.map(|id| HostLease::adopt(&etcd, id)) {
            Some(Ok(lease)) => {
                let held = etcd.held_by(lease.id()).map_err(|e| self.note_trouble(e))?;
                let mut map = locked(&self.held);
                for h in held {
                    let uuid = h
                        .key
                        .holder
                        .split_once('@')
                        .map_or(h.key.holder.as_str(), |(u, _)| u);
                    map.entry(uuid.to_owned())
                        .or_default()
                        .insert(h.key.disk.clone());
                }
                lease
            }
            Some(Err(vmlock_etcd::Error::LeaseLost { lease, reason })) => {
                tracing::error!(%lease, %reason, "the last run's etcd lease is gone, and every key it held");
                earlier_lost = true;
                HostLease::grant(&etcd).map_err(|e| self.note_trouble(e))?
            }
            Some(Err(e)) => return Err(self.note_trouble(e)),
            None => HostLease::grant(&etcd).map_err(|e| self.note_trouble(e))?,
        };
        if let Err(e) = self.write_lease_file(lease.id()) {
            // Not fatal: the next run cannot take this lease over and takes its VMs' keys again
            // instead (a full runtime file system must not cost the guests their lease).
            tracing::error!(
                "recording lease {} in {}: {e}",
                lease.id(),
                self.lease_file.display()
            );
            let _ = std::fs::remove_file(self.lease_file.with_extension("lease.tmp"));
        }
        Ok((Arc::new(lease), earlier_lost))
    }

    /// Records `deadline` as handed to supervisors; false if it was already.
    pub fn deadline_handed(&self, deadline: vmlock_client::fence::FenceDeadline) -> bool {
        locked(&self.handed).replace(deadline) != Some(deadline)
    }

    /// Whether a lease has been in force this run.
    pub fn established_once(&self) -> bool {
        self.established.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Puts `lease` in force: acquires use it from now on.
    pub fn publish(&self, lease: Arc<HostLease>) {
        self.established
            .store(true, std::sync::atomic::Ordering::Release);
        let mut link = locked(&self.link);
        link.lease = Some(lease);
        link.trouble = None;
    }

    fn note_trouble(&self, e: vmlock_etcd::Error) -> Error {
        let text = e.to_string();
        locked(&self.link).trouble = Some(text.clone());
        self.unavailable(&text)
    }

    fn read_lease_file(&self) -> Option<LeaseId> {
        let text = std::fs::read_to_string(&self.lease_file).ok()?;
        text.trim().parse::<i64>().ok().map(LeaseId)
    }

    fn write_lease_file(&self, id: LeaseId) -> std::io::Result<()> {
        let tmp = self.lease_file.with_extension("lease.tmp");
        std::fs::write(&tmp, format!("{}\n", id.0))?;
        std::fs::rename(&tmp, &self.lease_file)
    }

    /// The holder part of VM `uuid`'s keys on this host.
    fn holder_name(&self, uuid: &str) -> String {
        format!("{uuid}@{}", self.config.host)
    }

    /// Source side of a migration between hosts: the hand-over key for `secret` beside VM
    /// `uuid`'s keys; returns the token part the destination needs (see [`Incoming`]), or `None`
    /// when the VM holds no key.
    pub fn prepare_handover(
        &self,
        uuid: &str,
        secret: &str,
        resources: &[Resource],
    ) -> Result<Option<String>, Error> {
        let held = self.disks_of(uuid);
        let holder = self.holder_name(uuid);
        let locks: Vec<(usize, LockKey, bool)> = resources
            .iter()
            .enumerate()
            .filter_map(|(i, r)| disk_id(r).map(|(d, e)| (i, d, e)))
            .filter(|(_, d, _)| held.contains(d))
            .map(|(i, d, e)| (i, LockKey::new(&d, &holder), e))
            .collect();
        if locks.is_empty() {
            return Ok(None);
        }
        let Some(lease) = self.lease() else {
            return Err(self.unavailable("no lease in force"));
        };
        let pairs: Vec<(LockKey, bool)> = locks.iter().map(|(_, k, e)| (k.clone(), *e)).collect();
        let revisions = lease
            .prepare_handover(uuid, &secret_hash(secret), &pairs)
            .map_err(|e| self.unavailable(&e.to_string()))?;
        let mut per_entry = vec![0i64; resources.len()];
        for ((i, _, _), r) in locks.iter().zip(revisions) {
            per_entry[*i] = r.0;
        }
        let list: Vec<String> = per_entry.iter().map(i64::to_string).collect();
        Ok(Some(format!("{}~{}", self.config.host, list.join(","))))
    }

    /// Source side: whether a destination on another host holds keys of VM `uuid` for every
    /// disk this host holds keys for (its migration's hand-over is done).
    pub fn taken_over_elsewhere(&self, uuid: &str) -> bool {
        let Some(lease) = self.lease() else {
            return false;
        };
        let mine = self.holder_name(uuid);
        let theirs = format!("{uuid}@");
        let disks = self.disks_of(uuid);
        !disks.is_empty()
            && disks.iter().all(|d| {
                lease.etcd().holders(d).is_ok_and(|held| {
                    held.iter()
                        .any(|h| h.key.holder.starts_with(&theirs) && h.key.holder != mine)
                })
            })
    }

    /// Source side: the migration is over (finished or cancelled); its hand-over key goes.
    pub fn end_handover(&self, uuid: &str) {
        if let Some(lease) = self.lease() {
            if let Err(e) = lease.end_handover(uuid) {
                tracing::warn!(uuid, "deleting the migration's hand-over key: {e}");
            }
        }
    }
}

/// SHA-256 of a migration's secret, hex: what the hand-over key holds (the secret itself
/// travels only in the lock state).
fn secret_hash(secret: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The destination's view of a migration between hosts, from the lock state's hand-over token
/// `SECRET~SOURCE_HOST~REV,REV,...` (one revision per state entry, 0 for an entry with no key).
#[derive(Debug, Clone)]
pub struct Incoming {
    secret: String,
    source_host: String,
    /// Per state entry: its resource and the source key's revision (0: none).
    entries: Vec<(Resource, i64)>,
    uuid: String,
}

impl Incoming {
    /// Parses `token` for VM `uuid` whose state lists `resources`; `None` if the token is a
    /// same-host one (no `~`).
    pub fn parse(token: &str, uuid: &str, resources: &[Resource]) -> Option<Result<Self, Error>> {
        let mut parts = token.splitn(3, '~');
        let secret = parts.next()?;
        let source_host = parts.next()?;
        let bad = |reason: &str| Error::InvalidLockState {
            reason: format!("hand-over token: {reason}"),
        };
        let Some(revisions) = parts.next() else {
            return Some(Err(bad("no revisions")));
        };
        let revisions: Result<Vec<i64>, _> = if revisions.is_empty() {
            Ok(Vec::new())
        } else {
            revisions.split(',').map(str::parse).collect()
        };
        let Ok(revisions) = revisions else {
            return Some(Err(bad("a revision is not a number")));
        };
        if revisions.len() != resources.len() {
            return Some(Err(bad("one revision per entry expected")));
        }
        Some(Ok(Incoming {
            secret: secret.to_owned(),
            source_host: source_host.to_owned(),
            entries: resources.iter().cloned().zip(revisions).collect(),
            uuid: uuid.to_owned(),
        }))
    }

    /// The source keys the destination's `wanted` disks are fenced by; a wanted disk the source
    /// holds no key for cannot be handed over.
    fn sources(&self, wanted: &[(String, bool, String)]) -> Result<Vec<SourceKey>, Error> {
        let holder = format!("{}@{}", self.uuid, self.source_host);
        wanted
            .iter()
            .map(|(disk, exclusive, label)| {
                let revision = self
                    .entries
                    .iter()
                    .find(|(r, rev)| *rev > 0 && disk_id(r).is_some_and(|(d, _)| d == *disk))
                    .map(|(_, rev)| *rev)
                    .ok_or_else(|| Error::InvalidLockState {
                        reason: format!("the source's state carries no cluster lock for {label}"),
                    })?;
                Ok(SourceKey {
                    key: LockKey::new(disk, &holder),
                    exclusive: *exclusive,
                    revision: Revision(revision),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_lock_is_forgotten_only_when_unused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Cluster::new(
            vmlock_etcd::Config::new(vec!["127.0.0.1:1".into()], "h1"),
            dir.path(),
        );
        let ours = c.vm_lock("u1");
        let waiting = c.vm_lock("u1");
        c.forget_vm_lock_if_unused("u1", &ours);
        assert_eq!(
            c.vm_lock_count(),
            1,
            "forgotten while another request had it"
        );
        drop(waiting);
        locked(&c.held).insert("u1".into(), Default::default());
        c.forget_vm_lock_if_unused("u1", &ours);
        assert_eq!(c.vm_lock_count(), 1, "forgotten while the VM holds keys");
        locked(&c.held).remove("u1");
        c.forget_vm_lock_if_unused("u1", &ours);
        assert_eq!(c.vm_lock_count(), 0);
    }

    #[test]
    fn disk_ids_by_path_and_lease() {
        let d = Resource::disk("/img/a.qcow2", DiskMode::Exclusive).expect("disk");
        assert_eq!(disk_id(&d), Some(("/img/a.qcow2".into(), true)));
        let s = Resource::disk("/img/s.raw", DiskMode::Shared).expect("disk");
        assert_eq!(disk_id(&s), Some(("/img/s.raw".into(), false)));
        let r = Resource::disk("/img/r.iso", DiskMode::ReadOnly).expect("disk");
        assert_eq!(disk_id(&r), None);
        let l = Resource::lease("ls", "k1", "/leases/ls", 0).expect("lease");
        assert_eq!(disk_id(&l), Some(("lease:ls/k1".into(), true)));
    }

    #[test]
    fn a_symlinked_disk_name_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("real.img");
        std::fs::write(&real, b"x").expect("write");
        let link = dir.path().join("link.img");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let real = std::fs::canonicalize(&real).expect("canonical");
        check_cluster_name(&Resource::disk(&real, DiskMode::Exclusive).expect("disk"))
            .expect("the real path is fine");
        let e = check_cluster_name(&Resource::disk(&link, DiskMode::Exclusive).expect("disk"))
            .expect_err("a symlink is refused");
        assert!(e.to_string().contains("real path"), "{e}");
        check_cluster_name(&Resource::disk(&link, DiskMode::ReadOnly).expect("disk"))
            .expect("a read-only disk takes no key");
    }
}
