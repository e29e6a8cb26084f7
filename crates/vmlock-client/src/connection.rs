//! The client side: request connections, and the holder that keeps a VM's lock descriptions and
//! hands them back to a restarted daemon.

use crate::proto::{
    send_frame, write_frame, AcquireFlags, FrameReader, HeldLock, LockKey, Push, ReadError, Reply,
    Request, VmIdentity, PROTOCOL_VERSION,
};
use crate::runtime::{self, RuntimeDir};
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vmlock::Error;

/// How long a client waits for any reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Where to find (and how to start) the daemon.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Its runtime directory.
    pub runtime: RuntimeDir,
    /// Start a daemon when none answers (the embedded default).
    pub auto_start: bool,
    /// Program started then.
    pub daemon_program: PathBuf,
    /// Arguments before the daemon's own (`daemon` when the program is `vmlock`).
    pub daemon_args: Vec<std::ffi::OsString>,
    /// Configuration file passed to a started daemon.
    pub daemon_config: Option<PathBuf>,
}

impl Endpoint {
    /// The endpoint for `runtime`, starting `vmlockd` when needed.
    pub fn new(runtime: RuntimeDir) -> Self {
        let (daemon_program, daemon_args) = runtime::daemon_program();
        Endpoint {
            runtime,
            auto_start: true,
            daemon_program,
            daemon_args,
            daemon_config: None,
        }
    }

    fn connect_once(&self) -> std::io::Result<UnixStream> {
        UnixStream::connect(self.runtime.socket())
    }

    /// A connection that has said hello, starting the daemon first if allowed and needed.
    pub fn connect(&self) -> Result<Connection, Error> {
        let stream = match self.connect_once() {
            Ok(s) => s,
            Err(e)
                if self.auto_start
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
            {
                runtime::spawn_daemon(
                    &self.runtime,
                    &self.daemon_program,
                    &self.daemon_args,
                    self.daemon_config.as_deref(),
                )?;
                self.connect_once()
                    .map_err(|e| unreachable(&self.runtime, &e))?
            }
            Err(e) => return Err(unreachable(&self.runtime, &e)),
        };
        let mut conn = Connection::hello(stream)?;
        conn.endpoint = Some(self.clone());
        Ok(conn)
    }
}

fn unreachable(runtime: &RuntimeDir, e: &std::io::Error) -> Error {
    Error::ServiceUnavailable {
        reason: format!(
            "cannot reach vmlockd at {}: {e}",
            runtime.socket().display()
        ),
    }
}

/// A request connection.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    /// The daemon's pid.
    pub daemon_pid: u32,
    /// The daemon's host name.
    pub host: String,
    reader: FrameReader,
    /// Where to connect again when the daemon closed this connection for being idle.
    endpoint: Option<Endpoint>,
    /// Restricted (by `Restrict` or an acquire with `restrict`): never replaced by a fresh,
    /// unrestricted connection.
    restricted: bool,
}

impl Connection {
    fn hello(stream: UnixStream) -> Result<Self, Error> {
        // Set once: every reply must come within REPLY_TIMEOUT.
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(|e| Error::io("socket", &e))?;
        let mut conn = Connection {
            stream,
            reader: FrameReader::new(),
            daemon_pid: 0,
            host: String::new(),
            endpoint: None,
            restricted: false,
        };
        match conn.call(
            &Request::Hello {
                version: PROTOCOL_VERSION,
            },
            &[],
        )? {
            Reply::Hello { pid, host, .. } => {
                conn.daemon_pid = pid;
                conn.host = host;
                Ok(conn)
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Sends `request` with `fds` and reads its reply; an error reply becomes `Err`.
    pub fn call(&mut self, request: &Request, fds: &[&OwnedFd]) -> Result<Reply, Error> {
        self.call_with_fds(request, fds).map(|(reply, _)| reply)
    }

    /// The same, also returning the descriptors attached to the reply.
    pub fn call_with_fds(
        &mut self,
        request: &Request,
        fds: &[&OwnedFd],
    ) -> Result<(Reply, Vec<OwnedFd>), Error> {
        // A long-lived connection (a VM's session) may have been closed by the daemon's idle
        // timeout; then it never read anything more, so a fresh connection loses nothing.
        if self.closed_by_daemon() {
            self.reconnect()?;
        }
        let restricts = match request {
            Request::Restrict => true,
            Request::Acquire { flags, .. } => flags.restrict,
            _ => false,
        };
        let result = self.exchange(request, fds);
        if restricts && result.is_ok() {
            self.restricted = true;
        }
        result
    }

    /// Whether the daemon already closed this connection (or said why it does): a request
    /// connection gets nothing unasked, so anything readable before a request means that.
    fn closed_by_daemon(&self) -> bool {
        let mut pfd = [rustix::event::PollFd::new(
            &self.stream,
            rustix::event::PollFlags::IN,
        )];
        let zero = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        matches!(rustix::event::poll(&mut pfd, Some(&zero)), Ok(n) if n > 0)
    }

    fn reconnect(&mut self) -> Result<(), Error> {
        match (&self.endpoint, self.restricted) {
            (Some(endpoint), false) => {
                let fresh = endpoint.connect()?;
                *self = fresh;
                Ok(())
            }
            _ => Err(Error::ServiceUnavailable {
                reason: "vmlockd closed the connection".into(),
            }),
        }
    }

    fn exchange(
        &mut self,
        request: &Request,
        fds: &[&OwnedFd],
    ) -> Result<(Reply, Vec<OwnedFd>), Error> {
        if let Err(e) = send_frame(&self.stream, request, fds) {
            // A daemon that refused us (too many clients, idle) answered and closed before
            // reading: its reply, already here, says why better than "Broken pipe".
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) {
                if let Ok((Reply::Error(reply), _)) = self.reader.read::<Reply>(&self.stream) {
                    return Err(reply);
                }
            }
            return Err(match e.kind() {
                std::io::ErrorKind::InvalidInput => Error::Protocol {
                    reason: e.to_string(),
                },
                _ => Error::io("sending to the lock daemon socket", &e),
            });
        }
        match self.reader.read::<Reply>(&self.stream) {
            Ok((Reply::Error(e), _)) => Err(e),
            Ok((reply, fds)) => Ok((reply, fds)),
            Err(ReadError::Closed) => Err(Error::ServiceUnavailable {
                reason: "vmlockd closed the connection".into(),
            }),
            Err(ReadError::Idle) => Err(Error::ServiceUnavailable {
                reason: "no answer from the lock daemon in time".into(),
            }),
            Err(ReadError::Failed(e)) => Err(e),
        }
    }
}

/// A reply that does not fit the request.
pub fn unexpected(reply: &Reply) -> Error {
    Error::Protocol {
        reason: format!("unexpected reply {reply:?}"),
    }
}

/// Keeps one VM's lock descriptions for as long as the VM holds them, on a thread of its own.
///
/// When the daemon goes away the descriptions stay open here, so the kernel keeps every lock;
/// the holder reconnects (starting nothing itself; with systemd socket activation the connection
/// attempt starts the daemon) and hands them back to the next daemon.
///
/// Dropping a `Holder` leaves its thread running on purpose: the locks follow the guest, not the
/// object. The thread ends when the daemon reports the VM released or dead, when the guest is gone,
/// or on [`Holder::stop`].
#[derive(Debug)]
pub struct Holder {
    thread: Option<JoinHandle<()>>,
    kept: Arc<Mutex<BTreeMap<LockKey, (HeldLock, OwnedFd)>>>,
    stop: Arc<AtomicBool>,
    /// The holder's current connection (it changes when the daemon restarts).
    current: Arc<Mutex<Option<UnixStream>>>,
    registration: Arc<Mutex<Registration>>,
}

/// What a holder tells a daemon about its VM when it (re-)registers. A daemon restarted without
/// its state files knows only this, so it must be the VM as it is now (guest pid, the options
/// it was started with), never defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Registration {
    vm: VmIdentity,
    flags: Option<AcquireFlags>,
}

impl Registration {
    fn hold(&self, adopt: Vec<HeldLock>, incoming: bool) -> Request {
        Request::Hold {
            vm: self.vm.clone(),
            adopt,
            incoming,
            flags: self.flags.clone(),
        }
    }

    /// Only what belongs to the VM: the per-request modifiers of that acquire do not.
    fn acquired(&mut self, flags: &AcquireFlags) {
        if self.flags.is_none() {
            self.flags = Some(AcquireFlags {
                on_lock_failure: flags.on_lock_failure,
                qmp_socket: flags.qmp_socket.clone(),
                hold_qemu_bytes: flags.hold_qemu_bytes,
                ..AcquireFlags::default()
            });
        }
    }
}

impl Holder {
    /// Connects, registers as `vm`'s holder, and starts keeping.
    pub fn start(endpoint: &Endpoint, vm: VmIdentity) -> Result<Self, Error> {
        Self::start_as(endpoint, vm, false)
    }

    /// The same for the destination of a migration prepared on the source.
    pub fn start_incoming(endpoint: &Endpoint, vm: VmIdentity) -> Result<Self, Error> {
        Self::start_as(endpoint, vm, true)
    }

    fn start_as(endpoint: &Endpoint, vm: VmIdentity, incoming: bool) -> Result<Self, Error> {
        let kept = Arc::new(Mutex::new(BTreeMap::new()));
        let name = vm.name.clone();
        let registration = Arc::new(Mutex::new(Registration { vm, flags: None }));
        let conn = register(endpoint, &registration, &kept, incoming)?;
        let copy = conn
            .0
            .try_clone()
            .map_err(|e| Error::io("holder socket", &e))?;
        let current = Arc::new(Mutex::new(Some(copy)));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_kept, thread_stop, thread_current, thread_registration) = (
            Arc::clone(&kept),
            Arc::clone(&stop),
            Arc::clone(&current),
            Arc::clone(&registration),
        );
        let endpoint = endpoint.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vmlock-holder-{name}"))
            .spawn(move || {
                hold_loop(
                    conn,
                    thread_current,
                    endpoint,
                    thread_registration,
                    thread_kept,
                    thread_stop,
                )
            })
            .map_err(|e| Error::io("starting the lock holder thread", &e))?;
        Ok(Holder {
            thread: Some(thread),
            kept,
            stop,
            current,
            registration,
        })
    }

    /// The guest now runs as `pid` (after the daemon accepted `GuestStarted`): a re-registration
    /// names it, and the holder gives up once it is gone.
    pub fn guest_started(&self, pid: u32) {
        if let Ok(mut r) = self.registration.lock() {
            r.vm.pid = pid;
        }
    }

    /// An acquire with `flags` succeeded: the first one's lock-failure action, QMP socket and
    /// QEMU-bytes option are the VM's, handed back on re-registration.
    pub fn acquired(&self, flags: &AcquireFlags) {
        if let Ok(mut r) = self.registration.lock() {
            r.acquired(flags);
        }
    }

    /// Gives up: closes the holder connection and every kept description. Only for a holder that
    /// keeps nothing yet (a failed start), or whose VM the daemon already released.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Ok(current) = self.current.lock() {
            if let Some(stream) = current.as_ref() {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Keeps descriptions this process received itself (an acquire answered with
    /// [`Reply::Kept`]).
    pub fn keep_local(&self, locks: Vec<HeldLock>, fds: Vec<OwnedFd>) -> Result<(), Error> {
        if locks.len() != fds.len() {
            return Err(Error::Protocol {
                reason: format!(
                    "{} locks but {} descriptors in the reply",
                    locks.len(),
                    fds.len()
                ),
            });
        }
        let mut kept = self.kept.lock().map_err(|_| Error::ServiceUnavailable {
            reason: "holder state poisoned".into(),
        })?;
        for (lock, fd) in locks.into_iter().zip(fds) {
            kept.insert(lock.key, (lock, fd));
        }
        Ok(())
    }

    /// Drops this process's copies of the descriptions of `released` (after a
    /// [`Request::ReleaseKept`]; only what the daemon did release and unlock).
    pub fn forget_local(&self, released: &[vmlock::Resource]) {
        if let Ok(mut kept) = self.kept.lock() {
            kept.retain(|_, (lock, _)| !released.iter().any(|r| r.path() == lock.resource.path()));
        }
    }

    /// Waits until the daemon says the VM holds nothing any more.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn register(
    endpoint: &Endpoint,
    registration: &Mutex<Registration>,
    kept: &Mutex<BTreeMap<LockKey, (HeldLock, OwnedFd)>>,
    incoming: bool,
) -> Result<(UnixStream, FrameReader), Error> {
    let poisoned = || Error::ServiceUnavailable {
        reason: "holder state poisoned".into(),
    };
    let registration = registration.lock().map_err(|_| poisoned())?.clone();
    let mut conn = endpoint.connect()?;
    let kept = kept.lock().map_err(|_| poisoned())?;
    let adopt: Vec<HeldLock> = kept.values().map(|(l, _)| l.clone()).collect();
    let fds: Vec<&OwnedFd> = kept.values().map(|(_, fd)| fd).collect();
    match conn.call(&registration.hold(adopt, incoming), &fds) {
        Ok(Reply::Ok) | Err(Error::PartialRelease { .. }) => {}
        Ok(other) => return Err(unexpected(&other)),
        Err(e) => return Err(e),
    }
    conn.stream
        .set_read_timeout(None)
        .map_err(|e| Error::io("socket", &e))?;
    // The reader may already hold the start of the first push: it goes with the stream.
    Ok((conn.stream, conn.reader))
}

fn hold_loop(
    (mut stream, mut reader): (UnixStream, FrameReader),
    current: Arc<Mutex<Option<UnixStream>>>,
    endpoint: Endpoint,
    registration: Arc<Mutex<Registration>>,
    kept: Arc<Mutex<BTreeMap<LockKey, (HeldLock, OwnedFd)>>>,
    stop: Arc<AtomicBool>,
) {
    let reconnect = Endpoint {
        auto_start: false,
        ..endpoint
    };
    loop {
        match reader.read::<Push>(&stream) {
            Ok((Push::Keep { seq, locks }, fds)) => {
                if let Ok(mut k) = kept.lock() {
                    for (lock, fd) in locks.into_iter().zip(fds) {
                        k.insert(lock.key, (lock, fd));
                    }
                }
                let _ = write_frame(&stream, &Request::Ack { seq }, &[]);
            }
            Ok((Push::Close { seq, keys }, _)) => {
                if let Ok(mut k) = kept.lock() {
                    for key in keys {
                        k.remove(&key);
                    }
                }
                let _ = write_frame(&stream, &Request::Ack { seq }, &[]);
            }
            Ok((Push::Finished, _)) => {
                if let Ok(mut k) = kept.lock() {
                    k.clear();
                }
                return;
            }
            Err(_) => {
                // The daemon died or restarts. Keep every description (the kernel keeps the locks)
                // and wait for the next daemon.
                // Retry quickly at first (a restart takes milliseconds), then back off to once a
                // second so a daemon that stays down costs nothing.
                let mut pause = Duration::from_millis(5);
                stream = loop {
                    if stop.load(Ordering::Acquire) || !guest_alive(&registration) {
                        return; // the guest is gone: its locks may go with us
                    }
                    match register(&reconnect, &registration, &kept, false) {
                        Ok((s, r)) => {
                            reader = r;
                            if let (Ok(mut c), Ok(copy)) = (current.lock(), s.try_clone()) {
                                *c = Some(copy);
                            }
                            break s;
                        }
                        Err(_) => {
                            std::thread::sleep(pause);
                            pause = (pause * 2).min(Duration::from_secs(1));
                        }
                    }
                };
            }
        }
    }
}

fn guest_alive(registration: &Mutex<Registration>) -> bool {
    registration
        .lock()
        .map_or(true, |r| vmlock::process::is_running(r.vm.pid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmlock::LockFailureAction;

    #[test]
    fn a_re_registration_names_the_guest_and_the_first_acquire_options() {
        let mut r = Registration {
            vm: VmIdentity {
                uuid: "u".into(),
                name: "web1".into(),
                id: 1,
                pid: 100, // the supervisor, before the guest starts
            },
            flags: None,
        };
        let first = AcquireFlags {
            register_only: true,
            restrict: true,
            on_lock_failure: LockFailureAction::Ignore,
            hold_qemu_bytes: true,
            qmp_socket: Some("/run/qmp.sock".into()),
            reply_with_fds: true,
        };
        r.acquired(&first);
        // A hotplug later with other options does not change what the VM was started with.
        r.acquired(&AcquireFlags::default());
        r.vm.pid = 200;
        let Request::Hold {
            vm, flags, adopt, ..
        } = r.hold(Vec::new(), false)
        else {
            panic!("not a Hold");
        };
        assert_eq!(vm.pid, 200);
        assert!(adopt.is_empty());
        assert_eq!(
            flags,
            Some(AcquireFlags {
                on_lock_failure: LockFailureAction::Ignore,
                hold_qemu_bytes: true,
                qmp_socket: Some("/run/qmp.sock".into()),
                ..AcquireFlags::default()
            })
        );
    }

    #[test]
    fn a_hold_from_an_older_client_has_no_flags() {
        let old = r#"{"Hold":{"vm":{"uuid":"u","name":"n","id":1,"pid":2},"adopt":[]}}"#;
        let parsed: Request = serde_json::from_str(old).unwrap();
        assert!(matches!(
            parsed,
            Request::Hold {
                flags: None,
                incoming: false,
                ..
            }
        ));
    }
}
