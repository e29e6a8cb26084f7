//! The daemon process: single-instance guard, socket, one thread per connection, the owner
//! watcher, and the state file.

use crate::cluster::{self, Cluster};
use crate::config::Config;
use crate::holder::HolderLink;
use crate::host::{self, LinuxHost};
use crate::proto::{
    write_frame, FrameReader, HeldLock, ReadError, Reply, Request, PROTOCOL_VERSION,
};
use crate::runtime::RuntimeDir;
use crate::store::{JournalLine, PendingSnapshot, Store};
use crate::telemetry::{ActionTaken, EventLog, Metrics, RefusalReason};
use crate::workers::Workers;
use rustix::event::{poll, PollFd, PollFlags};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vmlock::Error;
use vmlock::LockFailureAction;
use vmlock_client::proto::{EventKind, EventPosition, VmIdentity};
use vmlock_core::types::{HeldLock as CoreHeldLock, LockKey};
use vmlock_core::{Caller, Effects, LinkId, LockTable, LostLease, Push};
use vmlock_sys::lobby::Lobby;
use vmlock_sys::ofd::{self, LockKind};
use vmlock_sys::pidfd::ProcessHandle;

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    /// The lock core. Held only for the core's own calls (kernel lock calls and bookkeeping) and
    /// the state journal's append: never across an open, a stat, a `/proc` read or socket I/O.
    table: Mutex<LockTable<LinuxHost>>,
    /// Connected holders by link id (the core names links; the daemon writes to them).
    links: Mutex<HashMap<LinkId, Arc<HolderLink>>>,
    /// This host's name, for `Hello` (which then never waits for the table).
    host_name: String,
    next_link: AtomicU64,
    config: Config,
    max_clients: usize,
    /// Open request connections (holder connections are not counted: see `max_clients`).
    requests: AtomicUsize,
    idle_timeout: Duration,
    wake: Mutex<File>,
    uid: u32,
    lease_check_interval: Duration,
    lock_failure_grace: Duration,
    /// The runtime directory, where supervisors serve their control sockets.
    runtime_dir: PathBuf,
    store: Mutex<Store>,
    /// Prometheus metrics: atomics, recorded under the table lock, encoded at a scrape.
    metrics: Arc<Metrics>,
    /// The last events; subscribers read them from their own threads.
    events: Arc<EventLog>,
    /// `metrics_address`, bound at start, served by `serve`.
    metrics_listener: Mutex<Option<std::net::TcpListener>>,
    /// Cluster-wide locks in etcd, when `[etcd]` is configured.
    cluster: Option<Arc<Cluster>>,
    _pid_lock: File,
}

impl Daemon {
    /// Takes the single-instance lock in `runtime`, recovers the state file, and binds the socket
    /// (or uses `listener` from socket activation). Returns the daemon and its listener.
    pub fn start(
        runtime: RuntimeDir,
        config: Config,
        listener: Option<UnixListener>,
    ) -> anyhow::Result<(Arc<Daemon>, UnixListener, File)> {
        runtime.create()?;
        let pid_lock = take_pid_lock(&runtime)?;
        let mut config = config;
        let network_dir = config
            .network_lockspace_dir
            .get_or_insert_with(|| runtime.path().join("network"))
            .clone();
        std::fs::create_dir_all(&network_dir)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", network_dir.display()))?;
        let host = config.host_name.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into())
        });
        let max_clients = config.max_clients;
        let idle_timeout = Duration::from_millis(config.idle_timeout_ms);
        let lease_check_interval = Duration::from_millis(config.lease_check_interval_ms);
        let lock_failure_grace = Duration::from_millis(config.lock_failure_grace_ms);
        let host_name = host.clone();
        let cluster = match config.etcd_config(&host) {
            Some(c) => {
                // The host name may be the kernel's, filled in only now.
                c.validate().map_err(|e| anyhow::anyhow!("[etcd]: {e}"))?;
                Some(Arc::new(Cluster::new(c, runtime.path())))
            }
            None => None,
        };
        if cluster.is_none() {
            // Left by a run with etcd: supervisors must not fence for a lease nobody renews.
            vmlock_client::fence::remove(runtime.path());
        }
        let mut table = LockTable::new(host::policy(&config), host);
        let (store, persisted) = Store::open(&runtime).map_err(|e| {
            anyhow::anyhow!(
                "reading the lock state in {}: {e}",
                runtime.path().display()
            )
        })?;
        let kept = table.recover(persisted, |pid, start| {
            ProcessHandle::open(pid, Some(start))
                .ok()
                .filter(|p| !p.has_exited())
        });
        let boot = crate::telemetry::next_boot(runtime.path()).map_err(|e| {
            anyhow::anyhow!(
                "keeping the boot number in {}: {e}",
                runtime.path().display()
            )
        })?;
        let metrics = Arc::new(Metrics::new());
        let events = Arc::new(EventLog::new(boot, config.event_buffer));
        let recovered_locks = table.lock_count();
        metrics.started(boot, recovered_locks);
        metrics.table_size(table.owner_count(), recovered_locks);
        let (pid, vms, locks) = (std::process::id(), table.owner_count(), recovered_locks);
        events.record(if boot > 1 {
            EventKind::DaemonRestarted { pid, vms, locks }
        } else {
            EventKind::DaemonStarted { pid, vms, locks }
        });
        let metrics_listener = match config.metrics_socket_address() {
            Some(addr) => Some(
                std::net::TcpListener::bind(addr)
                    .map_err(|e| anyhow::anyhow!("binding metrics_address {addr}: {e}"))?,
            ),
            None => None,
        };
        if kept > 0 {
            tracing::info!(
                owners = kept,
                "recovered lock state; waiting for supervisors to hand their locks back"
            );
        }
        let listener = match listener {
            Some(l) => l,
            None => {
                let path = runtime.socket();
                // We hold the pid lock, so any socket file left here belongs to a dead daemon.
                let _ = std::fs::remove_file(&path);
                let l = UnixListener::bind(&path)
                    .map_err(|e| anyhow::anyhow!("binding {}: {e}", path.display()))?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                l
            }
        };
        let (wake_rx, wake_tx) = rustix::pipe::pipe_with(
            rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
        )?;
        let daemon = Arc::new(Daemon {
            table: Mutex::new(table),
            links: Mutex::new(HashMap::new()),
            host_name,
            next_link: AtomicU64::new(1),
            config,
            max_clients,
            requests: AtomicUsize::new(0),
            idle_timeout,
            wake: Mutex::new(File::from(wake_tx)),
            uid: nix::unistd::geteuid().as_raw(),
            lease_check_interval,
            lock_failure_grace,
            runtime_dir: runtime.path().to_path_buf(),
            store: Mutex::new(store),
            metrics,
            events,
            metrics_listener: Mutex::new(metrics_listener),
            cluster,
            _pid_lock: pid_lock,
        });
        daemon.events.flush();
        let full = daemon.lock_table().persisted();
        let pending = daemon
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .start_snapshot(full);
        if let Some(pending) = pending {
            // Written while the daemon already serves: with 10,000 recovered grants it is a
            // few megabytes, half the time of a crash restart if written first.
            let writer = Arc::clone(&daemon);
            if let Err(e) = std::thread::Builder::new()
                .name("start-snapshot".into())
                .spawn(move || writer.write_snapshot(pending))
            {
                // Nothing lost: the journal still holds everything, and the next snapshot is
                // taken when it outgrows the table.
                tracing::error!("no thread to write the start snapshot: {e}");
                daemon
                    .store
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .snapshot_written();
            }
        }
        Ok((daemon, listener, File::from(wake_rx)))
    }

    fn lock_table(&self) -> MutexGuard<'_, LockTable<LinuxHost>> {
        // A panic while holding the table would leave it as it was before the failed request
        // (grants are committed last), so keep serving.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Numbers VM `uuid`'s new entry. Called with the table locked, after every change to that
    /// VM; the line is appended once the table is unlocked ([`Daemon::append`]). When the journal
    /// has outgrown the table, also returns a snapshot to write then.
    fn persist(
        &self,
        table: &LockTable<LinuxHost>,
        uuid: &str,
    ) -> (JournalLine, Option<PendingSnapshot>) {
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let line = store.record(uuid, table.persisted_owner(uuid));
        let snapshot = if store.wants_snapshot(table.owner_count()) {
            store.begin_snapshot()
        } else {
            None
        };
        (line, snapshot)
    }

    /// With the table unlocked: appends lines numbered by [`Daemon::persist`]. Holds no lock
    /// while writing, so a slow journal write does not stall other VMs' requests.
    fn append(&self, lines: Vec<JournalLine>) {
        for line in lines {
            let seq = line.seq();
            if !line.append() {
                self.store
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .append_failed(seq);
            }
        }
    }

    /// Writes a snapshot handed out by [`Daemon::persist`]; call with the table unlocked.
    fn write_snapshot(&self, pending: PendingSnapshot) {
        let seq = pending.seq();
        let written = pending.write();
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.snapshot_written();
        if written {
            store.snapshot_succeeded(seq);
        }
    }

    fn wake_watcher(&self) {
        if let Ok(mut w) = self.wake.lock() {
            let _ = w.write(&[1]);
        }
    }

    /// Serves until the process is killed. Stopping the daemon never touches a guest: locks stay
    /// with their holders and a new daemon takes them back.
    pub fn serve(self: &Arc<Self>, listener: UnixListener, wake_rx: File) -> anyhow::Result<()> {
        let http = self
            .metrics_listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(http) = http {
            if let Ok(addr) = http.local_addr() {
                tracing::info!(%addr, "serving metrics on http://{addr}/metrics");
            }
            crate::telemetry::serve_http(http, Arc::clone(&self.metrics))?;
        }
        let watcher = Arc::clone(self);
        std::thread::Builder::new()
            .name("owner-watcher".into())
            .spawn(move || watcher.watch_owners(wake_rx))?;
        let checker = Arc::clone(self);
        std::thread::Builder::new()
            .name("lease-checker".into())
            .spawn(move || checker.check_leases())?;
        if let Some(cluster) = &self.cluster {
            let (daemon, c) = (Arc::clone(self), Arc::clone(cluster));
            std::thread::Builder::new()
                .name("etcd-lease".into())
                .spawn(move || daemon.keep_cluster_lease(&c))?;
            let (daemon, c) = (Arc::clone(self), Arc::clone(cluster));
            std::thread::Builder::new()
                .name("etcd-release".into())
                .spawn(move || daemon.release_cluster_keys(&c))?;
        }
        // Connections wait in the lobby, without a thread, until they send something: a burst
        // of idle connections costs the next real client a few microseconds each, not a thread
        // start each. At most max_clients wait; beyond that the longest-waiting one is closed.
        let mut lobby = Lobby::new(listener, self.idle_timeout, self.max_clients)?;
        // Each connection that speaks gets a thread of its own, usually one kept from an ended
        // connection.
        let daemon = Arc::clone(self);
        let workers = Workers::new(
            "client",
            SPARE_CLIENT_THREADS,
            SPARE_CLIENT_THREAD_LINGER,
            move |stream| Arc::clone(&daemon).serve_connection(stream),
        );
        // Out of descriptors (or memory), accept fails at once as long as the connection waits in
        // the backlog: back off instead of spinning, and say so once per episode, not per try.
        let mut backoff: Option<Duration> = None;
        let mut last_failure = Instant::now();
        loop {
            let stream = match lobby.next_speaker() {
                Ok(s) => s,
                Err(e) => {
                    let pause = match backoff {
                        None => {
                            tracing::error!(
                                "accept: {e}; backing off until connections can be taken again"
                            );
                            ACCEPT_BACKOFF_MIN
                        }
                        Some(p) => (p * 2).min(ACCEPT_BACKOFF_MAX),
                    };
                    backoff = Some(pause);
                    last_failure = Instant::now();
                    // Pacing: the failure repeats until a descriptor is free again.
                    std::thread::sleep(pause);
                    continue;
                }
            };
            // One accepted connection may free a descriptor only for the next accept to fail
            // again: the episode ends after a quiet spell, not at the first success.
            if backoff.is_some() && last_failure.elapsed() > 2 * ACCEPT_BACKOFF_MAX {
                backoff = None;
                tracing::warn!("accepting connections again");
            }
            if let Err(e) = workers.run(stream) {
                // The connection was dropped (closed); the client sees it closed.
                tracing::warn!("no thread for a connection: {e}");
            }
        }
    }

    fn serve_connection(self: Arc<Self>, stream: UnixStream) {
        // Counted as a request connection until it becomes a holder.
        let mut slot = RequestSlot::take(&self.requests);
        // A request connection that sends nothing for idle_timeout is closed (the frame reader
        // reports it as idle); its writes get the same bound, so a client that stops reading its
        // reply frees its thread.
        if let Err(e) = stream
            .set_read_timeout(Some(self.idle_timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.idle_timeout)))
        {
            tracing::warn!("socket timeouts: {e}");
            return;
        }
        let peer =
            match nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("peer credentials: {e}");
                    return;
                }
            };
        let uid = peer.uid();
        if uid != 0 && uid != self.uid {
            tracing::warn!(pid = peer.pid(), uid, "refused unauthorised peer");
            let _ = write_frame(
                &stream,
                &Reply::Error(Error::PermissionDenied {
                    reason: format!(
                        "uid {uid} may not use this vmlockd (only root and uid {})",
                        self.uid
                    ),
                }),
                &[],
            );
            return;
        }
        let caller = u32::try_from(peer.pid()).unwrap_or(0);
        // The caller is this process, by pid and start time, so a later process given the same
        // pid is never taken for it.
        let Some(peer_start) = vmlock::process::stat(caller).map(|s| s.start_time) else {
            return; // gone already
        };
        let caller = Caller {
            pid: caller,
            start_time: peer_start,
        };
        let mut reader = FrameReader::new();
        match reader.read::<Request>(&stream) {
            Ok((Request::Hello { version }, _)) if version == PROTOCOL_VERSION => {
                let host = self.host_name.clone();
                if write_frame(
                    &stream,
                    &Reply::Hello {
                        version: PROTOCOL_VERSION,
                        pid: std::process::id(),
                        host,
                    },
                    &[],
                )
                .is_err()
                {
                    return;
                }
            }
            Ok((Request::Hello { version }, _)) => {
                let _ = write_frame(&stream, &Reply::Error(Error::Protocol { reason: format!("protocol version {version} is not supported (this vmlockd speaks {PROTOCOL_VERSION})") }), &[]);
                return;
            }
            Ok(_) => {
                let _ = write_frame(
                    &stream,
                    &Reply::Error(Error::Protocol {
                        reason: "the first message must be Hello".into(),
                    }),
                    &[],
                );
                return;
            }
            Err(ReadError::Closed) | Err(ReadError::Idle) => return,
            Err(ReadError::Failed(e)) => {
                let _ = write_frame(&stream, &Reply::Error(e), &[]);
                return;
            }
        }
        let mut restricted = false;
        let mut first = true;
        loop {
            let (request, fds) = match reader.read::<Request>(&stream) {
                Ok(r) => r,
                Err(ReadError::Closed) => return,
                Err(ReadError::Idle) => {
                    let _ = write_frame(
                        &stream,
                        &Reply::Error(Error::ServiceUnavailable {
                            reason: format!(
                                "connection idle for {:?} (idle_timeout_ms); closed",
                                self.idle_timeout
                            ),
                        }),
                        &[],
                    );
                    return;
                }
                Err(ReadError::Failed(e)) => {
                    // The stream may be out of step now: answer and close.
                    let _ = write_frame(&stream, &Reply::Error(e), &[]);
                    return;
                }
            };
            // The limit is checked on the first request, once the connection says what it is:
            // a VM's holder (Hold) is never refused by it, so a restarted daemon takes every
            // running VM's locks back however many request connections are open.
            if std::mem::take(&mut first)
                && !matches!(request, Request::Hold { .. })
                && self.requests.load(Ordering::Acquire) > self.max_clients
            {
                tracing::warn!(max_clients = self.max_clients, "too many clients");
                let _ = write_frame(
                    &stream,
                    &Reply::Error(Error::ServiceUnavailable {
                        reason: format!("too many clients (max_clients = {})", self.max_clients),
                    }),
                    &[],
                );
                return;
            }
            let started = Instant::now();
            let timed = match &request {
                Request::Acquire { .. } => Some(true),
                Request::Release { .. }
                | Request::ReleaseKept { .. }
                | Request::Shutdown { .. } => Some(false),
                _ => None,
            };
            let observe = |metrics: &Metrics| match timed {
                Some(true) => metrics.acquire_took(started.elapsed()),
                Some(false) => metrics.release_took(started.elapsed()),
                None => {}
            };
            let (reply, reply_fds) = match request {
                _ if restricted => (Reply::Error(Error::Restricted), Vec::new()),
                Request::Events { after, follow } => {
                    if !self.serve_events(&stream, after, follow) || follow {
                        return;
                    }
                    continue;
                }
                Request::Hold {
                    vm,
                    adopt,
                    incoming,
                    flags,
                    acquire,
                } => {
                    slot.release();
                    // A holder connection lives as long as its VM: no idle timeout. Pushes to a
                    // holder that stopped reading must fail after a bound, not block forever.
                    if stream.set_read_timeout(None).is_err()
                        || stream
                            .set_write_timeout(Some(HOLDER_WRITE_TIMEOUT))
                            .is_err()
                    {
                        return;
                    }
                    let first = acquire.filter(|_| !incoming).map(|resources| FirstAcquire {
                        resources,
                        flags: flags.clone().unwrap_or_default(),
                    });
                    self.serve_holder(
                        (stream, reader),
                        caller,
                        vm,
                        adopt,
                        fds,
                        incoming,
                        flags,
                        first,
                    );
                    return;
                }
                Request::Restrict => {
                    restricted = true;
                    (Reply::Ok, Vec::new())
                }
                other => match self.dispatch(other, caller, &mut restricted, &stream) {
                    Some(answer) => answer,
                    None => {
                        // The reply went out with its descriptors already.
                        observe(&self.metrics);
                        continue;
                    }
                },
            };
            let attached: Vec<&OwnedFd> = reply_fds.iter().collect();
            if write_frame(&stream, &reply, &attached).is_err() {
                return;
            }
            observe(&self.metrics);
        }
    }

    /// Answers `Events`: the buffered events after `after`, in frames of at most
    /// [`EVENTS_PER_FRAME`]; with `follow`, then every new event as it comes, from this
    /// connection's thread, until the subscriber goes away or falls behind by more than
    /// `event_subscriber_queue` events (then it gets an error and is closed). The daemon never
    /// waits for a subscriber: recording only appends to the ring. Returns false if the
    /// connection is done.
    fn serve_events(
        &self,
        stream: &UnixStream,
        after: Option<EventPosition>,
        follow: bool,
    ) -> bool {
        let (buffered, missed) = self.events.since(after, usize::MAX);
        let boot = self.events.boot();
        let mut cursor = match (buffered.last(), after) {
            (Some(e), _) => e.seq,
            (None, Some(p)) if p.boot == boot => p.seq,
            (None, _) => 0,
        };
        let mut chunks = buffered.chunks(EVENTS_PER_FRAME).peekable();
        let mut first = true;
        loop {
            let chunk = chunks.next().unwrap_or(&[]);
            let last = chunks.peek().is_none();
            let batch = self
                .events
                .batch(chunk, if first { missed } else { 0 }, last);
            first = false;
            if write_frame(stream, &Reply::Events(batch), &[]).is_err() {
                return false;
            }
            if last {
                break;
            }
        }
        if !follow {
            return true;
        }
        if stream
            .set_write_timeout(Some(SUBSCRIBER_WRITE_TIMEOUT))
            .is_err()
        {
            return false;
        }
        let allowed = self
            .config
            .event_subscriber_queue
            .min(self.config.event_buffer);
        loop {
            match self
                .events
                .wait_after(cursor, allowed, EVENTS_PER_FRAME, SUBSCRIBER_CHECK)
            {
                Err(behind) => {
                    tracing::warn!("dropping an event subscriber: {behind}");
                    let _ = write_frame(
                        stream,
                        &Reply::Error(Error::ServiceUnavailable {
                            reason: behind.to_string(),
                        }),
                        &[],
                    );
                    return false;
                }
                Ok(events) if events.is_empty() => {
                    if peer_gone(stream) {
                        return false;
                    }
                }
                Ok(events) => {
                    let next = events.last().map_or(cursor, |e| e.seq);
                    let batch = self.events.batch(&events, 0, true);
                    if let Err(e) = write_frame(stream, &Reply::Events(batch), &[]) {
                        tracing::warn!(
                            "dropping an event subscriber that stopped reading: {e} (writes time out after {SUBSCRIBER_WRITE_TIMEOUT:?})"
                        );
                        return false;
                    }
                    cursor = next;
                }
            }
        }
    }

    /// Under the table lock, after a call: owners that died, and the table's size. Memory only.
    fn note_effects(&self, table: &LockTable<LinuxHost>, fx: &Effects<OwnedFd>) {
        // A VM whose guest exited holding nothing (a refused start, say) is forgotten silently.
        for (vm, locks) in fx.gone.iter().filter(|(_, locks)| *locks > 0) {
            self.metrics.owner_died();
            self.events.record(EventKind::OwnerDied {
                vm: vm.clone(),
                locks: *locks,
            });
        }
        self.metrics
            .table_size(table.owner_count(), table.lock_count());
    }

    /// Under the table lock: a release that released something.
    fn note_release(
        &self,
        table: &LockTable<LinuxHost>,
        uuid: &str,
        result: &Result<Vec<vmlock_client::proto::HeldResource>, Error>,
    ) {
        if let Ok(released) = result {
            if !released.is_empty() {
                self.metrics.released();
                self.events.record(EventKind::Released {
                    vm: identity(table, uuid),
                    resources: released.iter().map(|r| r.resource.label()).collect(),
                });
            }
        }
    }

    /// Under the table lock: an acquire committed.
    fn note_grant(
        &self,
        table: &LockTable<LinuxHost>,
        uuid: &str,
        result: &Result<Vec<vmlock_client::proto::HeldResource>, Error>,
    ) {
        if let Ok(granted) = result {
            self.metrics.granted();
            self.events.record(EventKind::Acquired {
                vm: identity(table, uuid),
                resources: granted.iter().map(|r| r.resource.label()).collect(),
            });
        }
    }

    /// A refused lock request (with the table unlocked: the error names its holder by now).
    fn note_refusal(&self, vm: VmIdentity, request: &str, error: &Error) {
        let reason = RefusalReason::of(error);
        self.metrics.refused(reason);
        let (resource, holder) = match error {
            Error::Busy { resource, holder } => (Some(resource.clone()), Some(holder.to_string())),
            Error::OwnerExists { uuid, .. } => (Some(uuid.clone()), None),
            _ => (None, None),
        };
        self.events.record(EventKind::Refused {
            vm,
            request: request.to_owned(),
            reason: reason.as_str().to_owned(),
            resource,
            holder,
            error: error.to_string(),
        });
        self.events.flush();
    }

    /// Runs one core call under the table lock and numbers what it changed (still under the
    /// lock, so the journal's numbers follow the table's order), then with the table unlocked
    /// appends those journal lines, writes a snapshot if one is due and carries out the call's
    /// effects: descriptions closed, pushes written, guests killed, the watcher woken.
    fn with_table<R>(
        &self,
        call: impl FnOnce(&mut LockTable<LinuxHost>, &mut LinuxHost) -> (R, Effects<OwnedFd>),
    ) -> R {
        let mut host = LinuxHost;
        let mut table = self.lock_table();
        let (result, fx) = call(&mut table, &mut host);
        let mut snapshot = None;
        let mut lines = Vec::with_capacity(fx.changed.len());
        for uuid in &fx.changed {
            let (line, pending) = self.persist(&table, uuid);
            lines.push(line);
            snapshot = snapshot.or(pending);
        }
        self.note_effects(&table, &fx);
        drop(table);
        // Recorded before the call's answer goes out (the caller writes it after this returns).
        self.append(lines);
        self.events.flush();
        if let Some(pending) = snapshot {
            self.write_snapshot(pending);
        }
        if let Some(cluster) = &self.cluster {
            // Grants may have ended: their etcd keys go on the release thread.
            cluster.changed();
        }
        self.apply(fx);
        result
    }

    fn apply(&self, fx: Effects<OwnedFd>) {
        drop(fx.close);
        for (link, push) in fx.pushes {
            let Some(link) = self.link(link) else {
                continue;
            };
            match push {
                Push::Close(keys) => link.close(&keys),
                Push::Finished => link.finished(),
            }
        }
        for (pid, start) in fx.kill {
            // The guest's locks stay until its pidfd reports the exit (the watcher then unlocks).
            if let Ok(p) = ProcessHandle::open(pid, Some(start)) {
                tracing::warn!(
                    pid,
                    "the VM's supervisor died; killing its guest before unlocking"
                );
                let _ = p.signal(rustix::process::Signal::KILL);
            }
        }
        if fx.rewatch {
            self.wake_watcher();
        }
    }

    fn link(&self, id: LinkId) -> Option<Arc<HolderLink>> {
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    /// Answers one request; descriptors to attach to the reply come back beside it, and the caller
    /// writes the reply. An acquire whose copies travel in the reply writes it itself (`None`):
    /// it commits, then releases what it took if the reply cannot be delivered.
    fn dispatch(
        &self,
        request: Request,
        caller: Caller,
        restricted: &mut bool,
        stream: &UnixStream,
    ) -> Option<(Reply, Vec<OwnedFd>)> {
        let reply = match request {
            Request::Acquire {
                uuid,
                resources,
                flags,
            } => return self.acquire(stream, caller, &uuid, &resources, &flags, restricted, None),
            Request::ReleaseKept { uuid, resources } => self
                .with_table(|t, h| {
                    let (r, fx) = t.release(h, caller, &uuid, Some(&resources), true);
                    self.note_release(t, &uuid, &r);
                    (r, fx)
                })
                .map_or_else(Reply::Error, Reply::Held),
            Request::Release { uuid, resources } => self
                .with_table(|t, h| {
                    let (r, fx) = t.release(h, caller, &uuid, resources.as_deref(), false);
                    self.note_release(t, &uuid, &r);
                    (r, fx)
                })
                .map_or_else(Reply::Error, Reply::Held),
            Request::AcquireIncoming {
                uuid,
                versions,
                token,
            } => {
                // From another host: this VM's holder registered here afresh (`register_holder`)
                // and the token carries the source's etcd revisions.
                let resources: Vec<vmlock::Resource> =
                    versions.iter().map(|(r, _)| r.clone()).collect();
                let from_afar = self.cluster.is_some() && {
                    let t = self.lock_table();
                    !t.is_migrating(&uuid) && t.holder_pid(&uuid) == Some(caller.pid)
                };
                let parsed = token
                    .as_deref()
                    .filter(|_| from_afar)
                    .and_then(|t| cluster::Incoming::parse(t, &uuid, &resources));
                match parsed {
                    Some(Ok(incoming)) => {
                        let mut no_restrict = false;
                        let answer = self.acquire(
                            stream,
                            caller,
                            &uuid,
                            &resources,
                            &crate::proto::AcquireFlags::default(),
                            &mut no_restrict,
                            Some(&incoming),
                        );
                        if matches!(answer, Some((Reply::Error(_), _))) {
                            // Refused: the destination registered for nothing.
                            self.with_table(|t, _| ((), t.forget_empty(caller, &uuid)));
                        }
                        return answer;
                    }
                    Some(Err(e)) => Reply::Error(e),
                    // On this host: the core checks the secret, before any `~` (the part a
                    // destination on another host would need).
                    None => self.acquire_incoming(
                        caller,
                        &uuid,
                        &versions,
                        token.as_deref().and_then(|t| t.split('~').next()),
                    ),
                }
            }
            Request::MigratePrepare { uuid } => {
                // 128 bits from the kernel's random source, drawn before the table is locked.
                let fresh = uuid::Uuid::new_v4().simple().to_string();
                let prepared = self.with_table(|t, _| {
                    (t.migrate_prepare(caller, &uuid, fresh), Effects::default())
                });
                match (prepared, &self.cluster) {
                    (Err(e), _) => Reply::Error(e),
                    (Ok((held, token)), None) => Reply::Prepared { held, token },
                    // With cluster locks, the token also carries what a destination on another
                    // host needs: this host's name and each key's revision (cluster::Incoming).
                    (Ok((held, token)), Some(cluster)) => {
                        let resources: Vec<vmlock::Resource> =
                            held.iter().map(|h| h.resource.clone()).collect();
                        match cluster.prepare_handover(&uuid, &token, &resources) {
                            Ok(Some(more)) => Reply::Prepared {
                                held,
                                token: format!("{token}~{more}"),
                            },
                            Ok(None) => Reply::Prepared { held, token },
                            Err(e) => {
                                // Nothing stays prepared that a destination could not use.
                                let _ = self
                                    .with_table(|t, _| t.migrate_complete(caller, &uuid, false));
                                Reply::Error(e)
                            }
                        }
                    }
                }
            }
            Request::MigrateComplete {
                uuid,
                success,
                source,
            } => {
                // A destination on another host took its keys beside ours: this side's part is
                // over. The source keeps its grants until its guest exits (QEMU quits after a
                // migration), and the destination's keys hold the disks from now on.
                // Only the VM's holder gets as far as etcd: a stranger's request costs no
                // round trip to the cluster (the core refuses it below).
                let from_holder = self.lock_table().holder_pid(&uuid) == Some(caller.pid);
                let elsewhere = success
                    && from_holder
                    && self
                        .cluster
                        .as_ref()
                        .is_some_and(|c| c.taken_over_elsewhere(&uuid));
                let reply = self.with_table(|t, _| {
                    // The source's success needs the migration in progress; a destination's (or
                    // an older client's) is a no-op once the hand-off is done.
                    let (result, fx) = if source {
                        t.migrate_complete(caller, &uuid, success && !elsewhere)
                    } else {
                        t.migrate_complete_idempotent(caller, &uuid, success && !elsewhere)
                    };
                    (result.map_or_else(Reply::Error, |()| Reply::Ok), fx)
                });
                if let (Reply::Ok, Some(cluster)) = (&reply, &self.cluster) {
                    cluster.end_handover(&uuid);
                }
                reply
            }
            Request::Shutdown { uuid, guest_pid } => self
                .with_table(|t, h| {
                    let (r, fx) = t.shutdown(h, caller, &uuid, guest_pid);
                    self.note_release(t, &uuid, &r);
                    (r, fx)
                })
                .map_or_else(Reply::Error, Reply::Held),
            Request::GuestStarted { uuid, pid } => match host::process_for(pid, caller) {
                Err(e) => Reply::Error(e),
                Ok(guest) => self.with_table(|t, _| match t.guest_started(caller, &uuid, guest) {
                    Ok(fx) => (Reply::Ok, fx),
                    Err(e) => (Reply::Error(e), Effects::default()),
                }),
            },
            Request::Inquire { uuid } => self
                .lock_table()
                .inquire(&uuid)
                .map_or_else(Reply::Error, Reply::Held),
            Request::Lookup { uuid } => self
                .lock_table()
                .lookup(&uuid)
                .map_or_else(Reply::Error, Reply::Vm),
            Request::Status => Reply::Status(self.lock_table().status()),
            Request::Metrics => Reply::Metrics(self.metrics.encode()),
            Request::Hello { .. } => Reply::Error(Error::Protocol {
                reason: "Hello sent twice".into(),
            }),
            Request::Ack { .. } => Reply::Error(Error::Protocol {
                reason: "Ack on a connection that holds nothing".into(),
            }),
            Request::Hold { .. } | Request::Restrict | Request::Events { .. } => {
                Reply::Error(Error::Protocol {
                    reason: "unexpected request".into(),
                })
            }
        };
        Some((reply, Vec::new()))
    }

    /// Two-phase acquire: open every target (table unlocked) → reserve in the core (kernel locks
    /// taken, grants pending) → hand the copies to the holder (table unlocked, bounded) → commit,
    /// or abort so nothing stays held. Returns `None` when it wrote the reply itself.
    #[allow(clippy::too_many_arguments)]
    fn acquire(
        &self,
        stream: &UnixStream,
        caller: Caller,
        uuid: &str,
        resources: &[vmlock::Resource],
        flags: &crate::proto::AcquireFlags,
        restricted: &mut bool,
        incoming: Option<&cluster::Incoming>,
    ) -> Option<(Reply, Vec<OwnedFd>)> {
        let mut opened = Vec::with_capacity(resources.len());
        let wanted = resources.iter().filter(|r| {
            r.is_locked()
                && (self.config.auto_disk_leases || matches!(r, vmlock::Resource::Lease(_)))
        });
        let refused = |vm: Option<VmIdentity>, e: Error| {
            let vm = vm.unwrap_or_else(|| identity(&self.lock_table(), uuid));
            self.note_refusal(vm, "acquire", &e);
            Some((Reply::Error(e), Vec::new()))
        };
        if !flags.register_only {
            for r in wanted {
                let checked = match &self.cluster {
                    Some(_) => cluster::check_cluster_name(r),
                    None => Ok(()),
                };
                match checked.and_then(|()| host::open_target(&self.config, r)) {
                    Ok(o) => opened.push(o),
                    Err(e) => return refused(None, e),
                }
            }
        }
        if incoming.is_some() {
            // The source's QEMU is the image's one expected writer during a migration: its lock
            // bytes are not a stranger's.
            for o in &mut opened {
                o.image = None;
            }
        }
        // With no cluster keys to take in between, copies that travel in the reply are committed
        // under the same table lock as their reservation: one lock round and one pass over the
        // effects per acquire instead of two.
        let commit_at_once = self.cluster.is_none() && flags.reply_with_fds;
        let reserved = self.with_table(|t, h| {
            let (r, mut fx) = t.reserve(h, caller, uuid, opened, flags);
            let committed = match &r {
                Ok(Some(reservation)) if commit_at_once && reservation.direct => {
                    let (c, more) = t.commit(uuid, reservation.ticket);
                    self.note_grant(t, uuid, &c);
                    fx.absorb(more);
                    Some(c)
                }
                _ => None,
            };
            // The VM's name is copied only where it is used: a refusal, a cluster key's owner.
            let vm = (r.is_err() || self.cluster.is_some()).then(|| identity(t, uuid));
            ((r, vm, committed), fx)
        });
        let (reservation, vm, committed) = match reserved {
            (Err(refusal), vm, _) => return refused(vm, refusal.into_error(host::name_holder)),
            (Ok(None), _, _) => {
                *restricted = flags.restrict;
                return Some((Reply::Held(Vec::new()), Vec::new()));
            }
            (Ok(Some(r)), vm, committed) => (r, vm, committed),
        };
        let ticket = reservation.ticket;
        // The local locks are taken (pending); now the cluster's, in one transaction. Under the
        // VM's cluster lock until the grants are committed or aborted, so the release thread
        // never sees a key whose grant is neither.
        // (A request that takes no key, read-only disks only, needs neither.)
        let keyed = self.cluster.as_ref().filter(|_| {
            reservation
                .handover
                .iter()
                .any(|(l, _)| cluster::disk_id(&l.resource).is_some())
        });
        let cluster_lock = keyed.map(|c| c.vm_lock(uuid));
        let _cluster_guard = cluster_lock
            .as_ref()
            .map(|l| l.lock().unwrap_or_else(|p| p.into_inner()));
        if let Some(cluster) = keyed {
            let resources: Vec<vmlock::Resource> = reservation
                .handover
                .iter()
                .map(|(l, _)| l.resource.clone())
                .collect();
            let vm = vm.unwrap_or_else(|| identity(&self.lock_table(), uuid));
            let owner = vmlock_etcd::Owner {
                host: self.host_name.clone(),
                vm_name: vm.name.clone(),
                vm_uuid: uuid.to_owned(),
                pid: Some(vm.pid),
            };
            let mut taken = cluster.acquire(&owner, &resources, incoming);
            // A VM of this host released the disk a moment ago (or its guest died) and its key
            // is not deleted yet: delete it here, or wait (bounded) for the release thread that
            // is deleting it, and try once more.
            if let Err(Error::Busy {
                holder: vmlock::ForeignHolder::Vm(holder),
                ..
            }) = &taken
            {
                if holder.host == self.host_name
                    && holder.uuid != uuid
                    && self.ended_keys_gone(cluster, &holder.uuid)
                {
                    taken = cluster.acquire(&owner, &resources, incoming);
                }
            }
            if let Err(e) = taken {
                self.with_table(|t, h| ((), t.abort(h, uuid, ticket)));
                if let Some(l) = &cluster_lock {
                    cluster.forget_vm_lock_if_unused(uuid, l);
                }
                return refused(Some(vm), e);
            }
        }
        let (locks, fds): (Vec<CoreHeldLock>, Vec<OwnedFd>) =
            reservation.handover.into_iter().unzip();
        if reservation.direct {
            // The copies travel in the reply; once it is out they sit in the holder's socket
            // queue, which outlives a daemon crash. The reply carries the committed versions, so
            // commit first; a reply that cannot be delivered releases what the acquire took.
            let committed = committed.unwrap_or_else(|| {
                self.with_table(|t, _| {
                    let (r, fx) = t.commit(uuid, ticket);
                    self.note_grant(t, uuid, &r);
                    (r, fx)
                })
            });
            let reply = match committed {
                Ok(held) => Reply::Kept {
                    held,
                    locks: locks.clone(),
                },
                Err(e) => return refused(None, e),
            };
            let attached: Vec<&OwnedFd> = fds.iter().collect();
            if let Err(e) = write_frame(stream, &reply, &attached) {
                tracing::warn!(
                    uuid,
                    "acquire reply not delivered: {e}; releasing what it took"
                );
                let taken: Vec<vmlock::Resource> =
                    locks.iter().map(|l| l.resource.clone()).collect();
                let _ = self.with_table(|t, h| {
                    let (r, fx) = t.release(h, caller, uuid, Some(&taken), true);
                    self.note_release(t, uuid, &r);
                    (r, fx)
                });
                return None;
            }
            *restricted = flags.restrict;
            return None;
        }
        let kept = match self.link(reservation.link) {
            Some(link) => link.keep(&locks, &fds),
            None => Err(Error::ServiceUnavailable {
                reason: "the VM's supervisor is not connected".into(),
            }),
        };
        drop(fds);
        let committed = match kept {
            Ok(()) => self.with_table(|t, _| {
                let (r, fx) = t.commit(uuid, ticket);
                self.note_grant(t, uuid, &r);
                (r, fx)
            }),
            Err(e) => {
                self.with_table(|t, h| ((), t.abort(h, uuid, ticket)));
                Err(e)
            }
        };
        let reply = match committed {
            Ok(held) => Reply::Held(held),
            Err(e) => return refused(None, e),
        };
        if matches!(reply, Reply::Held(_)) {
            *restricted = flags.restrict;
        }
        Some((reply, Vec::new()))
    }

    /// Destination side of a migration: copies of the source's descriptions, pushed to the
    /// destination's holder with the table unlocked.
    fn acquire_incoming(
        &self,
        caller: Caller,
        uuid: &str,
        versions: &[(vmlock::Resource, u64)],
        token: Option<&str>,
    ) -> Reply {
        let handover = self.with_table(|t, h| {
            (
                t.acquire_incoming(h, caller, uuid, versions, token),
                Effects::default(),
            )
        });
        let handover = match handover {
            Ok(h) => h,
            Err(e) => return Reply::Error(e),
        };
        let (locks, fds): (Vec<CoreHeldLock>, Vec<OwnedFd>) = handover.handover.into_iter().unzip();
        let kept = match self.link(handover.link) {
            Some(link) => link.keep(&locks, &fds),
            None => Err(Error::ServiceUnavailable {
                reason: "the destination's supervisor is not connected".into(),
            }),
        };
        // Dropping copies of descriptions the source keeps unlocks nothing.
        drop(fds);
        match kept {
            Ok(()) => self
                .with_table(|t, _| (t.incoming_taken(uuid, handover.link), Effects::default()))
                .map_or_else(Reply::Error, Reply::Held),
            Err(e) => Reply::Error(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[allow(clippy::too_many_arguments)]
    fn serve_holder(
        &self,
        (stream, mut reader): (UnixStream, FrameReader),
        caller: Caller,
        vm: crate::proto::VmIdentity,
        adopt: Vec<HeldLock>,
        fds: Vec<OwnedFd>,
        incoming: bool,
        flags: Option<crate::proto::AcquireFlags>,
        first: Option<FirstAcquire>,
    ) {
        let uuid = vm.uuid.clone();
        let Ok(writer) = stream.try_clone() else {
            return;
        };
        let link = Arc::new(HolderLink::new(writer));
        let id = LinkId(self.next_link.fetch_add(1, Ordering::Relaxed));
        // A handle on the holder process, to tell its death from a dropped connection.
        let holder_process = ProcessHandle::open(caller.pid, Some(caller.start_time)).ok();
        let result = if adopt.len() != fds.len() {
            Err(Error::Protocol {
                reason: format!(
                    "{} locks to adopt but {} descriptors",
                    adopt.len(),
                    fds.len()
                ),
            })
        } else {
            self.register_holder(caller, id, &link, vm, adopt, fds, incoming, flags)
        };
        let registered = result.is_ok();
        let reply = match result {
            Ok(()) => Reply::Ok,
            Err(e) => Reply::Error(e),
        };
        let mut answered = write_frame(&stream, &reply, &[]).is_ok();
        if let (Some(first), true, true) = (first, registered, answered) {
            // The start's acquire, on this connection: its reply carries the descriptions.
            let flags = crate::proto::AcquireFlags {
                reply_with_fds: true,
                ..first.flags
            };
            let mut unrestricted = false;
            let answer = self.acquire(
                &stream,
                caller,
                &uuid,
                &first.resources,
                &flags,
                &mut unrestricted,
                None,
            );
            if let Some((reply, reply_fds)) = answer {
                let refused = matches!(reply, Reply::Error(_));
                if refused {
                    // A start refused leaves nothing registered: the VM manager may retry. Undone
                    // before the refusal goes out, so a caller told of it finds nothing left (it
                    // was seen the other way round, by a status right after the refusal). The
                    // connection ends here; its close is still handled below, so a VM that was
                    // registered before (and keeps its grants) does not keep a dead link. (Marked
                    // disconnected first: the holder is told nothing more, not `Finished` before
                    // the refusal.)
                    link.disconnected();
                    self.with_table(|t, _| ((), t.forget_empty(caller, &uuid)));
                }
                let attached: Vec<&OwnedFd> = reply_fds.iter().collect();
                answered = write_frame(&stream, &reply, &attached).is_ok() && !refused;
            }
        }
        if answered && registered {
            loop {
                match reader.read::<Request>(&stream) {
                    Ok((Request::Ack { seq }, _)) => link.acked(seq),
                    Ok((other, _)) => {
                        tracing::warn!(?other, "ignored a request on a holder connection")
                    }
                    Err(_) => break,
                }
            }
        }
        link.disconnected();
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if registered {
            // The connection closing as its process exits comes just before the exit itself:
            // give the process a moment to be seen gone.
            let alive = holder_process
                .as_ref()
                .is_some_and(|p| !p.wait_exit(Some(Duration::from_millis(200))));
            self.with_table(|t, h| ((), t.holder_closed(h, id, alive)));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn register_holder(
        &self,
        caller: Caller,
        id: LinkId,
        link: &Arc<HolderLink>,
        vm: crate::proto::VmIdentity,
        adopt: Vec<HeldLock>,
        fds: Vec<OwnedFd>,
        incoming: bool,
        flags: Option<crate::proto::AcquireFlags>,
    ) -> Result<(), Error> {
        // Everything that reads /proc or fstats a description happens before the table is locked.
        let asked = vm.clone();
        let guest = match host::process_for(vm.pid, caller) {
            Ok(g) => g,
            Err(e) => {
                self.note_refusal(asked, "hold", &e);
                return Err(e);
            }
        };
        let adopting = !adopt.is_empty();
        let mut failures = Vec::new();
        let mut kept = Vec::new();
        for (lock, fd) in adopt.into_iter().zip(fds) {
            match host::recheck_kept(&lock, &fd) {
                Ok(()) => kept.push((lock, fd)),
                Err(e) => failures.push(vmlock::ResourceFailure {
                    resource: lock.resource.label(),
                    error: Box::new(e),
                }),
            }
        }
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Arc::clone(link));
        // A destination whose source is on another host (the VM is unknown here) registers as a
        // VM of its own, and its AcquireIncoming takes cluster keys beside the source's.
        let incoming =
            incoming && (self.cluster.is_none() || self.lock_table().lookup(&vm.uuid).is_ok());
        let result = self.with_table(|t, h| {
            if incoming {
                match t.hold_incoming(caller, id, &vm, guest) {
                    Ok(fx) => (Ok(()), fx),
                    Err(e) => (Err(e), Effects::default()),
                }
            } else {
                let known = t.lookup(&vm.uuid).is_ok();
                let (r, fx) = t.hold(h, caller, id, vm, guest, kept, flags);
                if r.is_ok() && (known || adopting) {
                    self.metrics.holder_reconnected();
                }
                (r, fx)
            }
        });
        if let Err(e) = &result {
            self.note_refusal(asked, "hold", e);
        }
        result?;
        if failures.is_empty() {
            Ok(())
        } else {
            Err(Error::PartialRelease { failures })
        }
    }

    /// Waits on every owner's guest pidfd; a guest that exits loses its locks within the poll's
    /// wake-up. Never waits on storage: lease checks run on their own threads.
    fn watch_owners(&self, mut wake_rx: File) {
        loop {
            let list: Vec<(String, u64, OwnedFd)> = self
                .lock_table()
                .watched()
                .into_iter()
                .filter_map(|(u, start, p)| {
                    p.fd().try_clone().ok().map(|fd| (u.to_owned(), start, fd))
                })
                .collect();
            let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(list.len() + 1);
            fds.push(PollFd::new(&wake_rx, PollFlags::IN));
            for (_, _, fd) in &list {
                fds.push(PollFd::new(fd, PollFlags::IN));
            }
            if poll(&mut fds, None).is_err() {
                continue;
            }
            let exited: Vec<usize> = fds
                .iter()
                .enumerate()
                .skip(1)
                .filter(|(_, f)| !f.revents().is_empty())
                .map(|(i, _)| i - 1)
                .collect();
            let woken = !fds[0].revents().is_empty();
            drop(fds);
            if woken {
                let mut buf = [0u8; 64];
                while matches!(wake_rx.read(&mut buf), Ok(n) if n > 0) {}
            }
            for i in exited {
                let (uuid, start, _) = &list[i];
                self.with_table(|t, h| ((), t.guest_exited(h, uuid, *start)));
            }
        }
    }

    /// Every `lease_check_interval`, checks that no lease was lost under a running guest (its file
    /// removed or replaced, or its storage gone). The checks run on one worker per device, so a
    /// device that stops answering stalls only its own checks.
    fn check_leases(&self) {
        let (results_tx, results_rx) = mpsc::channel::<Vec<(String, LockKey)>>();
        let mut workers: HashMap<u64, LeaseWorker> = HashMap::new();
        loop {
            let round_ends = Instant::now() + self.lease_check_interval;
            let targets = self.lock_table().lease_targets();
            let mut by_device: HashMap<u64, Vec<LeaseTarget>> = HashMap::new();
            for target in targets {
                by_device.entry(target.1.dev).or_default().push(target);
            }
            for (dev, batch) in by_device {
                let worker = workers
                    .entry(dev)
                    .or_insert_with(|| LeaseWorker::start(self.config.clone(), results_tx.clone()));
                worker.offer(batch);
            }
            // Until the next round, act on each finding as its worker reports it (a worker on a
            // hung device reports nothing and holds up no one).
            loop {
                let left = round_ends.saturating_duration_since(Instant::now());
                let findings = match results_rx.recv_timeout(left) {
                    Ok(f) => f,
                    Err(_) => break, // the round is over (or no worker is left)
                };
                self.leases_lost(&findings, self.lock_failure_grace);
            }
        }
    }

    /// Marks `findings` (leases lost under running guests) in the table and carries out each
    /// VM's lock-failure action on its own thread, a poweroff's SIGKILL `grace` after SIGTERM.
    fn leases_lost(&self, findings: &[(String, LockKey)], grace: Duration) {
        let lost = {
            let mut table = self.lock_table();
            let lost = table.leases_lost(findings);
            for l in &lost {
                self.events.record(EventKind::LeaseLost {
                    vm: l.vm.clone(),
                    resources: l.resources.clone(),
                    action: l.flags.on_lock_failure.to_string(),
                });
            }
            lost
        };
        self.events.flush();
        for l in lost {
            let runtime_dir = self.runtime_dir.clone();
            let (metrics, events) = (Arc::clone(&self.metrics), Arc::clone(&self.events));
            let _ = std::thread::Builder::new()
                .name("lock-failure".into())
                .spawn(move || {
                    let vm = l.vm.clone();
                    let action = enforce(l, grace, &runtime_dir);
                    metrics.lease_lost(action);
                    events.record(EventKind::ActionTaken {
                        vm,
                        action: action.as_str().to_owned(),
                    });
                    events.flush();
                });
        }
    }

    /// The grants of the VMs in `keys` (uuid → etcd disk ids) whose resources have one of those
    /// ids: what a lost etcd lease takes from them.
    fn cluster_grants(&self, keys: &HashMap<String, Vec<String>>) -> Vec<(String, LockKey)> {
        let table = self.lock_table();
        let mut findings = Vec::new();
        for (uuid, disks) in keys {
            for (key, resource) in table.vm_grants(uuid) {
                if cluster::disk_id(&resource).is_some_and(|(d, _)| disks.contains(&d)) {
                    findings.push((uuid.clone(), key));
                }
            }
        }
        findings
    }

    /// The `etcd-lease` thread: keeps a host lease in force and fences. `fence_lead` before the
    /// lease's deadline D (or at once if the cluster reports it gone) the lease is given up and
    /// every guest that held keys under it gets its lock-failure action, with half the lead as
    /// a poweroff's grace, so it is gone by D; then a new lease is granted. Never touches the
    /// table while waiting on etcd.
    fn keep_cluster_lease(&self, cluster: &Cluster) {
        let mut reported = false;
        loop {
            let Some(lease) = cluster.lease() else {
                match self.establish_cluster_lease(cluster) {
                    Ok(()) => reported = false,
                    Err(e) => {
                        if !reported {
                            tracing::error!("{e}; retrying every second");
                            reported = true;
                        }
                        // Retry pacing while etcd does not answer (each try is bounded itself).
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
                continue;
            };
            self.hand_deadline_to_supervisors(cluster, &lease);
            let fence_at = lease.deadline().0.saturating_sub(cluster.fence_lead());
            let now = vmlock_etcd::BootTime::now().0;
            if lease.state().lost.is_none() && now < fence_at {
                // Wakes at once on a loss; otherwise re-reads the deadline (renewals move it).
                lease.wait_lost((fence_at - now).min(Duration::from_millis(250)));
                continue;
            }
            let why = lease
                .state()
                .lost
                .map_or_else(|| "not renewed in time".to_owned(), |r| r.to_string());
            tracing::error!(lease = %lease.id(), reason = %why, "etcd lease ending: fencing its guests");
            let keys = cluster.lease_ended(&lease);
            let findings = self.cluster_grants(&keys);
            self.leases_lost(&findings, cluster.fence_lead() / 2);
        }
    }

    /// Tries once (bounded by etcd's connect and request timeouts) to put a host lease in
    /// force; the first success of this run takes over the last run's lease and checks the
    /// recovered grants' keys. `vmlockd` calls it before it says it serves, so that clients of a
    /// freshly started daemon find the lease in force; the `etcd-lease` thread retries.
    pub fn establish_cluster_lease(&self, cluster: &Cluster) -> Result<(), Error> {
        let first = !cluster.established_once();
        let (lease, earlier_lost) = cluster.establish(first)?;
        if earlier_lost {
            tracing::error!("the last run's etcd lease expired while no daemon ran");
        }
        if first {
            self.check_recovered_keys(cluster, &lease);
        }
        self.hand_deadline_to_supervisors(cluster, &lease);
        cluster.publish(lease);
        Ok(())
    }

    /// Writes the lease's deadline for supervisors (`vmlock_client::fence`) if it moved since
    /// the last write: their own fencing if this daemon stops renewing.
    fn hand_deadline_to_supervisors(&self, cluster: &Cluster, lease: &vmlock_etcd::HostLease) {
        let deadline = vmlock_client::fence::FenceDeadline {
            lease: lease.id().0,
            deadline_boot_ms: u64::try_from(lease.deadline().0.as_millis()).unwrap_or(u64::MAX),
            fence_lead_ms: u64::try_from(cluster.fence_lead().as_millis()).unwrap_or(u64::MAX),
        };
        if !cluster.deadline_handed(deadline) {
            return;
        }
        if let Err(e) = vmlock_client::fence::write(&self.runtime_dir, &deadline) {
            tracing::error!("writing the fencing deadline for supervisors: {e}");
        }
    }

    /// The first lease attempt, before serving (see [`Daemon::establish_cluster_lease`]).
    pub fn first_cluster_lease(&self) {
        if let Some(cluster) = &self.cluster {
            if let Err(e) = self.establish_cluster_lease(cluster) {
                tracing::error!("{e}; serving anyway (locks held here stay held), retrying");
            }
        }
    }

    /// After the first lease of this run: a recovered grant that should have a key but has none
    /// (the last run's lease expired while no daemon ran, or `[etcd]` was just configured) is
    /// taken again under `lease`, one transaction per VM, so a restart kills no guest whose disk
    /// nobody else took; a VM refused is a lost lease. Runs before the lease is published, so no
    /// acquire is in flight.
    fn check_recovered_keys(&self, cluster: &Cluster, lease: &vmlock_etcd::HostLease) {
        let missing: Vec<(VmIdentity, Vec<(LockKey, vmlock::Resource)>)> = {
            let table = self.lock_table();
            table
                .status()
                .into_iter()
                .filter_map(|o| {
                    let keys = cluster.disks_of(&o.vm.uuid);
                    let grants: Vec<(LockKey, vmlock::Resource)> = table
                        .vm_grants(&o.vm.uuid)
                        .into_iter()
                        .filter(|(_, r)| {
                            cluster::disk_id(r).is_some_and(|(d, _)| !keys.contains(&d))
                        })
                        .collect();
                    (!grants.is_empty()).then_some((o.vm, grants))
                })
                .collect()
        };
        let mut findings = Vec::new();
        for (vm, grants) in missing {
            let owner = vmlock_etcd::Owner {
                host: self.host_name.clone(),
                vm_name: vm.name.clone(),
                vm_uuid: vm.uuid.clone(),
                pid: Some(vm.pid),
            };
            let resources: Vec<vmlock::Resource> = grants.iter().map(|(_, r)| r.clone()).collect();
            match cluster.acquire_under(lease, &owner, &resources, None) {
                Ok(()) => tracing::warn!(
                    vm = %vm.name, uuid = %vm.uuid,
                    "recovered grants had no etcd keys (the last lease expired?); taken again"
                ),
                Err(e) => {
                    tracing::error!(vm = %vm.name, uuid = %vm.uuid, "recovered grants without their etcd keys: {e}");
                    findings.extend(grants.into_iter().map(|(k, _)| (vm.uuid.clone(), k)));
                }
            }
        }
        if !findings.is_empty() {
            self.leases_lost(&findings, cluster.fence_lead() / 2);
        }
    }

    /// The `etcd-release` thread: deletes the keys of grants that ended (see `cluster`), woken
    /// after every change to the table and at least every second (which retries failures).
    fn release_cluster_keys(&self, cluster: &Cluster) {
        loop {
            cluster.wait_changed(Duration::from_secs(1));
            for uuid in cluster.vms() {
                self.release_ended_keys(cluster, &uuid);
            }
        }
    }

    /// Whether VM `uuid`'s keys of ended grants are gone now: deleted here, or by the release
    /// thread while this waited (at most a second, polling: the caller holds another VM's
    /// cluster lock, so it never blocks on this one's). False at once if the VM still holds
    /// grants with keys: the conflict is real.
    fn ended_keys_gone(&self, cluster: &Cluster, uuid: &str) -> bool {
        let until = Instant::now() + Duration::from_secs(1);
        loop {
            let still_granted = self
                .lock_table()
                .vm_grants(uuid)
                .iter()
                .any(|(_, r)| cluster::disk_id(r).is_some());
            if still_granted {
                return false;
            }
            if self.release_ended_keys(cluster, uuid) || cluster.disks_of(uuid).is_empty() {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            // Bounded poll: the release thread holds that VM's lock while it deletes.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Deletes VM `uuid`'s keys whose grants ended; false if nothing was deleted or the VM is in
    /// an acquire's etcd step (never waits for it: the caller may hold another VM's lock).
    fn release_ended_keys(&self, cluster: &Cluster, uuid: &str) -> bool {
        let vm_lock = cluster.vm_lock(uuid);
        let Ok(_guard) = vm_lock.try_lock() else {
            return false;
        };
        let before = cluster.disks_of(uuid).len();
        let wanted: std::collections::HashSet<String> = self
            .lock_table()
            .vm_grants(uuid)
            .into_iter()
            .filter_map(|(_, r)| cluster::disk_id(&r).map(|(d, _)| d))
            .collect();
        match cluster.release_unwanted(uuid, &wanted) {
            Ok(()) => cluster.disks_of(uuid).len() < before,
            Err(e) => {
                tracing::warn!(uuid, "releasing etcd keys: {e}; retrying");
                false
            }
        }
    }
}

/// Checks the leases of one device on its own thread; a batch is offered only when the last one
/// finished, so a hung device holds one thread, not one per round.
struct LeaseWorker {
    busy: Arc<std::sync::atomic::AtomicBool>,
    tx: mpsc::Sender<Vec<LeaseTarget>>,
}

/// A grant to check: VM uuid, lock, resource.
type LeaseTarget = (String, LockKey, vmlock::Resource);

impl LeaseWorker {
    fn start(config: Config, results: mpsc::Sender<Vec<(String, LockKey)>>) -> Self {
        let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<Vec<LeaseTarget>>();
        let flag = Arc::clone(&busy);
        let _ = std::thread::Builder::new()
            .name("lease-check".into())
            .spawn(move || {
                for batch in rx {
                    let lost: Vec<(String, LockKey)> = batch
                        .into_iter()
                        .filter(|(_, key, resource)| !host::lease_intact(&config, resource, *key))
                        .map(|(u, k, _)| (u, k))
                        .collect();
                    flag.store(false, Ordering::Release);
                    if !lost.is_empty() && results.send(lost).is_err() {
                        return;
                    }
                }
            });
        LeaseWorker { busy, tx }
    }

    fn offer(&mut self, batch: Vec<LeaseTarget>) {
        if self.busy.swap(true, Ordering::AcqRel) {
            return; // still checking the last batch: the device is slow or hung
        }
        let _ = self.tx.send(batch);
    }
}

/// Carries out a VM's lock-failure action. Runs on its own thread: a guest slow to die never
/// stalls the daemon (virtlockd's kill loop blocks every client).
fn enforce(lost: LostLease, grace: Duration, runtime_dir: &Path) -> ActionTaken {
    let vm = &lost.vm;
    let Ok(process) = ProcessHandle::open(vm.pid, Some(lost.start_time)) else {
        return ActionTaken::none; // the guest is gone already
    };
    tracing::error!(vm = %vm.name, uuid = %vm.uuid, pid = vm.pid, resources = ?lost.resources, action = %lost.flags.on_lock_failure, "lease lost under a running guest");
    if lost.flags.supervisor_acts && lost.flags.on_lock_failure != LockFailureAction::Ignore {
        // The supervisor acts through the VM manager (libvirt then knows its domain paused or
        // stopped); only if it cannot does the daemon act behind the manager's back.
        let asked =
            vmlock_client::control::find_serving(runtime_dir, &vm.uuid, vm.pid).and_then(|path| {
                // Bounded by the grace a poweroff gets: a guest must not write on without its
                // lease because its supervisor is stuck.
                vmlock_client::control::call_at_within(
                    &path,
                    &vmlock_client::control::ControlRequest::LockFailure,
                    grace,
                )
            });
        match asked {
            Ok(_) => {
                tracing::warn!(vm = %vm.name, "the supervisor carried the action out");
                return ActionTaken::supervisor;
            }
            Err(e) => {
                tracing::error!(vm = %vm.name, error = %e, "the supervisor did not act; acting here")
            }
        }
    }
    match lost.flags.on_lock_failure {
        LockFailureAction::Ignore => ActionTaken::ignore,
        LockFailureAction::Pause => {
            let paused = lost.flags.qmp_socket.as_deref().map(|path| {
                crate::qmp::Qmp::connect(path)
                    .and_then(|mut q| q.execute("stop", serde_json::json!({})))
            });
            match paused {
                Some(Ok(_)) => {
                    tracing::warn!(vm = %vm.name, "guest paused");
                    ActionTaken::pause
                }
                // Pausing failed: a guest writing without its lease is worse than a guest stopped.
                other => {
                    tracing::error!(vm = %vm.name, ?other, "pausing failed; powering off instead");
                    power_off(&process, grace);
                    ActionTaken::poweroff
                }
            }
        }
        LockFailureAction::Poweroff | LockFailureAction::Restart => {
            power_off(&process, grace);
            ActionTaken::poweroff
        }
    }
}

/// VM `uuid` as the table knows it (only its uuid when it does not).
fn identity(table: &LockTable<LinuxHost>, uuid: &str) -> VmIdentity {
    table.lookup(uuid).unwrap_or_else(|_| VmIdentity {
        uuid: uuid.to_owned(),
        name: String::new(),
        id: 0,
        pid: 0,
    })
}

/// Whether a subscriber hung up (or sent something, which a subscription never does).
fn peer_gone(stream: &UnixStream) -> bool {
    let mut pfd = [PollFd::new(stream, PollFlags::IN)];
    let zero = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(poll(&mut pfd, Some(&zero)), Ok(n) if n > 0)
}

/// Events in one frame of the event stream.
const EVENTS_PER_FRAME: usize = 256;
/// A subscription write that cannot complete in this time drops the subscriber.
const SUBSCRIBER_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an idle subscription checks that its subscriber is still there.
const SUBSCRIBER_CHECK: Duration = Duration::from_secs(1);

/// SIGTERM, then SIGKILL if the process has not exited after `grace`.
fn power_off(process: &ProcessHandle, grace: Duration) {
    let _ = process.signal(rustix::process::Signal::TERM);
    if !process.wait_exit(Some(grace)) {
        let _ = process.signal(rustix::process::Signal::KILL);
    }
}

/// Threads kept waiting for the next connection once theirs ended (see [`Workers`]).
const SPARE_CLIENT_THREADS: usize = 4;

/// How long a kept thread waits for a connection before it ends.
const SPARE_CLIENT_THREAD_LINGER: Duration = Duration::from_secs(30);

/// Bound on a write to a holder: a supervisor that stopped reading fails the push instead of
/// blocking the daemon.
const HOLDER_WRITE_TIMEOUT: Duration = crate::holder::ACK_TIMEOUT;
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// One open request connection, counted while it lives (or until it becomes a holder).
struct RequestSlot<'a> {
    count: &'a AtomicUsize,
    held: bool,
}

impl<'a> RequestSlot<'a> {
    fn take(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        RequestSlot { count, held: true }
    }

    fn release(&mut self) {
        if std::mem::take(&mut self.held) {
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for RequestSlot<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

fn take_pid_lock(runtime: &RuntimeDir) -> anyhow::Result<File> {
    let path = runtime.pid_file();
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
    if !ofd::try_lock(file.as_fd(), LockKind::Exclusive, 0, 1)? {
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        anyhow::bail!(
            "another vmlockd (pid {}) already serves {}",
            text.trim(),
            runtime.path().display()
        );
    }
    file.set_len(0)?;
    writeln!(file, "{}", std::process::id())?;
    Ok(file)
}

/// The listener passed by systemd socket activation, if any.
pub fn activated_listener() -> anyhow::Result<Option<UnixListener>> {
    let Some(fd) = sd_notify::listen_fds()?.next() else {
        return Ok(None);
    };
    // SAFETY: systemd passed us this descriptor (LISTEN_FDS/LISTEN_PID matched our pid) and nothing
    // else in the process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(Some(UnixListener::from(owned)))
}

/// The acquire a `Hold` asks for once registered (a VM's start in one round trip).
struct FirstAcquire {
    resources: Vec<vmlock::Resource>,
    flags: crate::proto::AcquireFlags,
}
