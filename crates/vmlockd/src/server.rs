//! The daemon process: single-instance guard, socket, one thread per connection, the owner
//! watcher, and the state file.

use crate::config::Config;
use crate::holder::HolderLink;
use crate::proto::{
    write_frame, FrameReader, HeldLock, ReadError, Reply, Request, PROTOCOL_VERSION,
};
use crate::runtime::RuntimeDir;
use crate::store::Store;
use crate::sys::ofd::{self, LockKind};
use crate::sys::pidfd::ProcessHandle;
use crate::table::{LostLease, Table};
use rustix::event::{poll, PollFd, PollFlags};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vmlock::Error;
use vmlock::LockFailureAction;

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    table: Mutex<Table>,
    max_clients: usize,
    /// Open request connections (holder connections are not counted: see `max_clients`).
    requests: AtomicUsize,
    idle_timeout: Duration,
    wake: Mutex<File>,
    uid: u32,
    lease_check_interval: Duration,
    lock_failure_grace: Duration,
    store: Mutex<Store>,
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
        let mut table = Table::new(config, host);
        let (store, persisted) = Store::open(&runtime).map_err(|e| {
            anyhow::anyhow!(
                "reading the lock state in {}: {e}",
                runtime.path().display()
            )
        })?;
        let kept = table.recover(persisted);
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
            max_clients,
            requests: AtomicUsize::new(0),
            idle_timeout,
            wake: Mutex::new(File::from(wake_tx)),
            uid: nix::unistd::geteuid().as_raw(),
            lease_check_interval,
            lock_failure_grace,
            store: Mutex::new(store),
            _pid_lock: pid_lock,
        });
        daemon.snapshot(&daemon.lock_table());
        Ok((daemon, listener, File::from(wake_rx)))
    }

    fn lock_table(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the table would leave it as it was before the failed request
        // (grants are committed last), so keep serving.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records VM `uuid`'s entry. Called with the table locked, after every change to that VM.
    fn persist(&self, table: &Table, uuid: &str) {
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.record(uuid, table.persisted_owner(uuid));
        if store.wants_snapshot(table.owner_count()) {
            store.snapshot(&table.persisted());
        }
    }

    fn snapshot(&self, table: &Table) {
        self.store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .snapshot(&table.persisted());
    }

    fn wake_watcher(&self) {
        if let Ok(mut w) = self.wake.lock() {
            let _ = w.write(&[1]);
        }
    }

    /// Serves until the process is killed. Stopping the daemon never touches a guest: locks stay
    /// with their holders and a new daemon takes them back.
    pub fn serve(self: &Arc<Self>, listener: UnixListener, wake_rx: File) -> anyhow::Result<()> {
        let watcher = Arc::clone(self);
        std::thread::Builder::new()
            .name("owner-watcher".into())
            .spawn(move || watcher.watch_owners(wake_rx))?;
        // Out of descriptors (or memory), accept fails at once as long as the connection waits in
        // the backlog: back off instead of spinning, and say so once per episode, not per try.
        let mut backoff: Option<Duration> = None;
        loop {
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // The peer gave up before we took it: nothing to do.
                Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ECONNABORTED as i32) => {
                    continue
                }
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
                    std::thread::sleep(pause);
                    continue;
                }
            };
            if backoff.take().is_some() {
                tracing::warn!("accepting connections again");
            }
            let daemon = Arc::clone(self);
            if let Err(e) = std::thread::Builder::new()
                .name("client".into())
                .spawn(move || daemon.serve_connection(stream))
            {
                // The connection is dropped (closed) with the closure; the client sees it closed.
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
        let peer_pid = u32::try_from(peer.pid()).unwrap_or(0);
        let mut reader = FrameReader::new();
        match reader.read::<Request>(&stream) {
            Ok((Request::Hello { version }, _)) if version == PROTOCOL_VERSION => {
                let host = self.lock_table().host().to_owned();
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
            let (reply, reply_fds) = match request {
                _ if restricted => (Reply::Error(Error::Restricted), Vec::new()),
                Request::Hold {
                    vm,
                    adopt,
                    incoming,
                    flags,
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
                    self.serve_holder((stream, reader), peer_pid, vm, adopt, fds, incoming, flags);
                    return;
                }
                Request::Restrict => {
                    restricted = true;
                    (Reply::Ok, Vec::new())
                }
                other => self.dispatch(other, peer_pid, &mut restricted),
            };
            let attached: Vec<&OwnedFd> = reply_fds.iter().collect();
            if write_frame(&stream, &reply, &attached).is_err() {
                return;
            }
        }
    }

    /// Answers one request; descriptors to attach to the reply come back beside it.
    fn dispatch(
        &self,
        request: Request,
        peer_pid: u32,
        restricted: &mut bool,
    ) -> (Reply, Vec<OwnedFd>) {
        // Only requests that change which processes the watcher must watch wake it.
        let wake = matches!(
            request,
            Request::GuestStarted { .. } | Request::MigrateComplete { .. }
        );
        let mut reply_fds = Vec::new();
        let mut table = self.lock_table();
        let reply = match request {
            Request::Acquire {
                uuid,
                resources,
                flags,
            } => match table.acquire(&uuid, &resources, &flags, peer_pid) {
                Ok((held, kept)) => {
                    *restricted = flags.restrict;
                    self.persist(&table, &uuid);
                    if kept.is_empty() {
                        Reply::Held(held)
                    } else {
                        let (locks, fds) = kept.into_iter().unzip();
                        reply_fds = fds;
                        Reply::Kept { held, locks }
                    }
                }
                Err(e) => Reply::Error(e),
            },
            Request::ReleaseKept { uuid, resources } => {
                let result = table.release_for(&uuid, Some(&resources), Some(peer_pid));
                self.persist(&table, &uuid);
                match result {
                    Ok(held) => Reply::Held(held),
                    Err(e) => Reply::Error(e),
                }
            }
            Request::Release { uuid, resources } => {
                let result = table.release(&uuid, resources.as_deref());
                self.persist(&table, &uuid);
                match result {
                    Ok(held) => Reply::Held(held),
                    Err(e) => Reply::Error(e),
                }
            }
            Request::AcquireIncoming { uuid, versions } => {
                match table.acquire_incoming(&uuid, &versions) {
                    Ok(held) => Reply::Held(held),
                    Err(e) => Reply::Error(e),
                }
            }
            Request::MigratePrepare { uuid } => table
                .migrate_prepare(&uuid)
                .map_or_else(Reply::Error, Reply::Held),
            Request::MigrateComplete { uuid, success } => {
                let r = table.migrate_complete(&uuid, success);
                self.persist(&table, &uuid);
                r.map_or_else(Reply::Error, |()| Reply::Ok)
            }
            Request::Shutdown { uuid, guest_pid } => {
                let r = table.shutdown(&uuid, guest_pid);
                self.persist(&table, &uuid);
                r.map_or_else(Reply::Error, Reply::Held)
            }
            Request::GuestStarted { uuid, pid } => {
                match table.guest_started(&uuid, pid, peer_pid) {
                    Ok(()) => {
                        self.persist(&table, &uuid);
                        Reply::Ok
                    }
                    Err(e) => Reply::Error(e),
                }
            }
            Request::Inquire { uuid } => {
                table.inquire(&uuid).map_or_else(Reply::Error, Reply::Held)
            }
            Request::Lookup { uuid } => table.lookup(&uuid).map_or_else(Reply::Error, Reply::Vm),
            Request::Status => Reply::Status(table.status()),
            Request::Hello { .. } => Reply::Error(Error::Protocol {
                reason: "Hello sent twice".into(),
            }),
            Request::Ack { .. } => Reply::Error(Error::Protocol {
                reason: "Ack on a connection that holds nothing".into(),
            }),
            Request::Hold { .. } | Request::Restrict => Reply::Error(Error::Protocol {
                reason: "unexpected request".into(),
            }),
        };
        drop(table);
        if wake {
            self.wake_watcher();
        }
        (reply, reply_fds)
    }

    #[allow(clippy::too_many_arguments)] // h-limits: `flags` added; the lead's rewrite regroups
    fn serve_holder(
        &self,
        (stream, mut reader): (UnixStream, FrameReader),
        peer_pid: u32,
        vm: crate::proto::VmIdentity,
        adopt: Vec<HeldLock>,
        fds: Vec<OwnedFd>,
        incoming: bool,
        flags: Option<crate::proto::AcquireFlags>, // item 9 (h-limits): pass-through
    ) {
        let Ok(writer) = stream.try_clone() else {
            return;
        };
        let link = Arc::new(HolderLink::new(writer, peer_pid));
        let uuid = vm.uuid.clone();
        let result = if adopt.len() != fds.len() {
            Err(Error::Protocol {
                reason: format!(
                    "{} locks to adopt but {} descriptors",
                    adopt.len(),
                    fds.len()
                ),
            })
        } else {
            let mut table = self.lock_table();
            let r = table.hold(
                vm,
                adopt.into_iter().zip(fds).collect(),
                Arc::clone(&link),
                incoming,
            );
            table.holder_flags(&uuid, flags); // item 9 (h-limits): pass-through, wire into the core
            self.persist(&table, &uuid);
            r
        };
        let registered = !matches!(
            result,
            Err(Error::OwnerExists { .. })
                | Err(Error::Io { .. })
                | Err(Error::InvalidParameter { .. })
                | Err(Error::Protocol { .. })
                | Err(Error::UnknownOwner { .. })
        );
        let reply = match result {
            Ok(()) => Reply::Ok,
            Err(e) => Reply::Error(e),
        };
        self.wake_watcher();
        if write_frame(&stream, &reply, &[]).is_err() || !registered {
            link.disconnected();
            if registered {
                self.holder_closed(&uuid, &link);
            }
            return;
        }
        loop {
            match reader.read::<Request>(&stream) {
                Ok((Request::Ack { seq }, _)) => link.acked(seq),
                Ok((other, _)) => {
                    tracing::warn!(?other, "ignored a request on a holder connection")
                }
                Err(_) => break,
            }
        }
        link.disconnected();
        self.holder_closed(&uuid, &link);
    }

    fn holder_closed(&self, uuid: &str, link: &Arc<HolderLink>) {
        let mut table = self.lock_table();
        if table.holder_closed(uuid, link) {
            self.wake_watcher();
            tracing::info!(uuid, "holder closed; released every lock of the VM");
            self.persist(&table, uuid);
        }
    }

    /// Waits on every owner's pidfd; a guest that exits loses its locks within the poll's wake-up.
    /// Between wake-ups, checks every second that no lease was lost under a running guest.
    fn watch_owners(&self, mut wake_rx: File) {
        let mut last_check = Instant::now();
        loop {
            let list = self.lock_table().watch_list();
            let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(list.len() + 1);
            fds.push(PollFd::new(&wake_rx, PollFlags::IN));
            for (_, _, fd) in &list {
                fds.push(PollFd::new(fd, PollFlags::IN));
            }
            let wait = self
                .lease_check_interval
                .saturating_sub(last_check.elapsed());
            let timeout = rustix::time::Timespec {
                tv_sec: wait.as_secs() as i64,
                tv_nsec: i64::from(wait.subsec_nanos()),
            };
            if poll(&mut fds, Some(&timeout)).is_err() {
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
            if !exited.is_empty() {
                let mut table = self.lock_table();
                for i in exited {
                    let (uuid, start, _) = &list[i];
                    if table.guest_exited(uuid, *start) {
                        tracing::info!(uuid, "guest exited; released its locks");
                        self.persist(&table, uuid);
                    }
                }
            }
            if last_check.elapsed() >= self.lease_check_interval {
                last_check = Instant::now();
                let lost = self.lock_table().check_leases();
                for l in lost {
                    let grace = self.lock_failure_grace;
                    let _ = std::thread::Builder::new()
                        .name("lock-failure".into())
                        .spawn(move || enforce(l, grace));
                }
            }
        }
    }
}

/// Carries out a VM's lock-failure action. Runs on its own thread: a guest slow to die never
/// stalls the daemon (virtlockd's kill loop blocks every client).
fn enforce(lost: LostLease, grace: Duration) {
    let vm = &lost.vm;
    tracing::error!(vm = %vm.name, uuid = %vm.uuid, pid = vm.pid, resources = ?lost.resources, action = %lost.flags.on_lock_failure, "lease lost under a running guest");
    match lost.flags.on_lock_failure {
        LockFailureAction::Ignore => {}
        LockFailureAction::Pause => {
            let paused = lost.flags.qmp_socket.as_deref().map(|path| {
                crate::qmp::Qmp::connect(path)
                    .and_then(|mut q| q.execute("stop", serde_json::json!({})))
            });
            match paused {
                Some(Ok(_)) => tracing::warn!(vm = %vm.name, "guest paused"),
                // Pausing failed: a guest writing without its lease is worse than a guest stopped.
                other => {
                    tracing::error!(vm = %vm.name, ?other, "pausing failed; powering off instead");
                    power_off(&lost.process, grace);
                }
            }
        }
        LockFailureAction::Poweroff | LockFailureAction::Restart => power_off(&lost.process, grace),
    }
}

/// SIGTERM, then SIGKILL if the process has not exited after `grace`.
fn power_off(process: &ProcessHandle, grace: Duration) {
    let _ = process.signal(rustix::process::Signal::TERM);
    if !process.wait_exit(Some(grace)) {
        let _ = process.signal(rustix::process::Signal::KILL);
    }
}

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
