//! The client side: request connections, and the holder that keeps a VM's lock descriptions and
//! hands them back to a restarted daemon.

use crate::proto::{
    write_frame, FrameReader, HeldLock, LockKey, Push, ReadError, Reply, Request, VmIdentity,
    PROTOCOL_VERSION,
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
        Connection::hello(stream)
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
        write_frame(&self.stream, request, fds)?;
        match self.reader.read::<Reply>(&self.stream) {
            Ok((Reply::Error(e), _)) => Err(e),
            Ok((reply, fds)) => Ok((reply, fds)),
            Err(ReadError::Closed) => Err(Error::ServiceUnavailable {
                reason: "vmlockd closed the connection".into(),
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
        let conn = register(endpoint, &vm, &kept, incoming)?;
        let copy = conn
            .0
            .try_clone()
            .map_err(|e| Error::io("holder socket", &e))?;
        let current = Arc::new(Mutex::new(Some(copy)));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_kept, thread_stop, thread_current) =
            (Arc::clone(&kept), Arc::clone(&stop), Arc::clone(&current));
        let endpoint = endpoint.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vmlock-holder-{}", vm.name))
            .spawn(move || hold_loop(conn, thread_current, endpoint, vm, thread_kept, thread_stop))
            .map_err(|e| Error::io("starting the lock holder thread", &e))?;
        Ok(Holder {
            thread: Some(thread),
            kept,
            stop,
            current,
        })
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
    vm: &VmIdentity,
    kept: &Mutex<BTreeMap<LockKey, (HeldLock, OwnedFd)>>,
    incoming: bool,
) -> Result<(UnixStream, FrameReader), Error> {
    let mut conn = endpoint.connect()?;
    let kept = kept.lock().map_err(|_| Error::ServiceUnavailable {
        reason: "holder state poisoned".into(),
    })?;
    let adopt: Vec<HeldLock> = kept.values().map(|(l, _)| l.clone()).collect();
    let fds: Vec<&OwnedFd> = kept.values().map(|(_, fd)| fd).collect();
    match conn.call(
        &Request::Hold {
            vm: vm.clone(),
            adopt,
            incoming,
        },
        &fds,
    ) {
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
    vm: VmIdentity,
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
                    if stop.load(Ordering::Acquire) || !guest_alive(&vm) {
                        return; // the guest is gone: its locks may go with us
                    }
                    match register(&reconnect, &vm, &kept, false) {
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

fn guest_alive(vm: &VmIdentity) -> bool {
    vmlock::process::is_running(vm.pid)
}
