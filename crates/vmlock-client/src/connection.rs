//! Request connections to vmlockd, and where to find (and how to start) the daemon.
//!
//! A [`Connection`] is plain blocking I/O on one socket: it starts no thread, takes no lock and
//! keeps no global state, so [`Connection::connect`] and [`Connection::call`] (and
//! [`Connection::call_serving`] with a [`crate::HoldConnection`]) may run in a forked child before
//! exec; see [`crate::holder`] for the whole contract. [`Endpoint::connect`] may start a daemon
//! and reads the environment: call it in a normal process only.

use crate::holder::HoldConnection;
use crate::proto::{
    send_frame, EventBatch, EventPosition, FrameReader, ReadError, Reply, Request, PROTOCOL_VERSION,
};
use crate::runtime::{self, RuntimeDir};
use rustix::event::{poll, PollFd, PollFlags};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};
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
    pub(crate) stream: UnixStream,
    /// The daemon's pid.
    pub daemon_pid: u32,
    /// The daemon's host name.
    pub host: String,
    pub(crate) reader: FrameReader,
    /// Where to connect again when the daemon closed this connection for being idle.
    endpoint: Option<Endpoint>,
    /// Restricted (by `Restrict` or an acquire with `restrict`): never replaced by a fresh,
    /// unrestricted connection.
    restricted: bool,
}

/// A connection whose hello is sent but not yet answered ([`Connection::open`]).
#[derive(Debug)]
pub struct Opening(Connection);

impl Opening {
    /// Sends `request` right behind the hello; read its reply with [`Connection::receive`] once
    /// [`Opening::established`]. Only requests that change nothing about the connection itself
    /// (not `Restrict`, not a restricting acquire).
    pub fn send(&mut self, request: &Request, fds: &[&OwnedFd]) -> Result<(), Error> {
        self.0.send_request(request, fds)
    }

    /// Reads the hello's answer: the connection, ready for the replies to what was sent.
    pub fn established(self) -> Result<Connection, Error> {
        let mut conn = self.0;
        match conn.read_reply()? {
            (Reply::Hello { pid, host, .. }, _) => {
                conn.daemon_pid = pid;
                conn.host = host;
                Ok(conn)
            }
            (other, _) => Err(unexpected(&other)),
        }
    }
}

impl Connection {
    /// Connects to the daemon of `runtime` and says hello. Never starts a daemon, reads no
    /// environment and starts no thread (safe between fork and exec; see [`crate::holder`]). A
    /// connection the daemon closed for being idle is not replaced: connect again.
    pub fn connect(runtime: &RuntimeDir) -> Result<Self, Error> {
        let stream = UnixStream::connect(runtime.socket()).map_err(|e| unreachable(runtime, &e))?;
        Self::hello(stream)
    }

    /// The socket, for a caller's own poll loop.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    /// Connects to the daemon of `runtime` and sends hello without waiting for its answer, so
    /// that a first request can follow at once (the daemon answers in order): one round trip
    /// less than [`Connection::connect`] and a call. Thread-free, as [`Connection::connect`].
    pub fn open(runtime: &RuntimeDir) -> Result<Opening, Error> {
        let stream = UnixStream::connect(runtime.socket()).map_err(|e| unreachable(runtime, &e))?;
        Self::say_hello(stream)
    }

    fn say_hello(stream: UnixStream) -> Result<Opening, Error> {
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
        conn.send_request(
            &Request::Hello {
                version: PROTOCOL_VERSION,
            },
            &[],
        )?;
        Ok(Opening(conn))
    }

    fn hello(stream: UnixStream) -> Result<Self, Error> {
        Self::say_hello(stream)?.established()
    }

    /// The reply to a request sent with [`Opening::send`], after [`Opening::established`].
    pub fn receive(&mut self) -> Result<(Reply, Vec<OwnedFd>), Error> {
        self.read_reply()
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
        self.ready()?;
        let result = self
            .send_request(request, fds)
            .and_then(|()| self.read_reply());
        self.restricts_after(request, &result);
        result
    }

    /// [`Connection::call_with_fds`] for a process that is also the VM's holder through a
    /// thread-free [`HoldConnection`]: while it waits for the reply it serves the pushes the
    /// daemon sends to `holder` (an acquire without `reply_with_fds` completes only once the
    /// holder acked its descriptions). Starts no thread; waits at most [`REPLY_TIMEOUT`].
    pub fn call_serving(
        &mut self,
        request: &Request,
        fds: &[&OwnedFd],
        holder: &mut HoldConnection,
    ) -> Result<(Reply, Vec<OwnedFd>), Error> {
        self.ready()?;
        let result = self
            .send_request(request, fds)
            .and_then(|()| self.serve_until_reply(holder))
            .and_then(|()| self.read_reply());
        self.restricts_after(request, &result);
        result
    }

    /// Waits until the reply starts arriving, serving `holder` meanwhile.
    fn serve_until_reply(&mut self, holder: &mut HoldConnection) -> Result<(), Error> {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            if self.reader.buffered() {
                return Ok(());
            }
            if holder.is_connected() {
                // Pushes already buffered by the holder's reader do not wake poll: serve first.
                holder.serve_ready()?;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::ServiceUnavailable {
                    reason: "no answer from the lock daemon in time".into(),
                });
            }
            let timeout = rustix::time::Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            let connected = holder.is_connected();
            let holder_fd = holder.fd();
            let mut fds = [
                PollFd::new(&self.stream, PollFlags::IN),
                PollFd::new(&holder_fd, PollFlags::IN),
            ];
            // A holder the daemon dropped is not polled (it would be readable forever).
            let n = if connected { 2 } else { 1 };
            match poll(&mut fds[..n], Some(&timeout)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(Error::io("waiting on the lock daemon socket", &e.into())),
            }
            if !fds[0].revents().is_empty() {
                return Ok(());
            }
        }
    }

    /// A long-lived connection (a VM's session) may have been closed by the daemon's idle
    /// timeout; then it never read anything more, so a fresh connection loses nothing.
    fn ready(&mut self) -> Result<(), Error> {
        if self.closed_by_daemon() {
            self.reconnect()?;
        }
        Ok(())
    }

    fn restricts_after<T>(&mut self, request: &Request, result: &Result<T, Error>) {
        let restricts = match request {
            Request::Restrict => true,
            Request::Acquire { flags, .. } => flags.restrict,
            _ => false,
        };
        if restricts && result.is_ok() {
            self.restricted = true;
        }
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

    fn send_request(&mut self, request: &Request, fds: &[&OwnedFd]) -> Result<(), Error> {
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
        Ok(())
    }

    fn read_reply(&mut self) -> Result<(Reply, Vec<OwnedFd>), Error> {
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

impl Connection {
    /// The daemon's metrics in Prometheus' text format.
    pub fn metrics(&mut self) -> Result<String, Error> {
        match self.call(&Request::Metrics, &[])? {
            Reply::Metrics(text) => Ok(text),
            other => Err(unexpected(&other)),
        }
    }

    /// The daemon's buffered events after `after` (all of them when `None` or of an earlier
    /// boot), and how many asked for the buffer no longer holds.
    pub fn events(
        &mut self,
        after: Option<EventPosition>,
    ) -> Result<(Vec<crate::proto::Event>, u64), Error> {
        self.ready()?;
        self.send_request(
            &Request::Events {
                after,
                follow: false,
            },
            &[],
        )?;
        let mut events = Vec::new();
        let mut missed = 0;
        loop {
            match self.read_reply()? {
                (Reply::Events(batch), _) => {
                    missed += batch.missed;
                    events.extend(batch.events);
                    if batch.end_of_buffer {
                        return Ok((events, missed));
                    }
                }
                (other, _) => return Err(unexpected(&other)),
            }
        }
    }

    /// Turns this connection into a subscription: the buffered events after `after`, then every
    /// new one as the daemon records it.
    pub fn subscribe(mut self, after: Option<EventPosition>) -> Result<EventStream, Error> {
        self.ready()?;
        self.send_request(
            &Request::Events {
                after,
                follow: true,
            },
            &[],
        )?;
        Ok(EventStream { conn: self })
    }
}

/// A subscription to the daemon's events ([`Connection::subscribe`]).
#[derive(Debug)]
pub struct EventStream {
    conn: Connection,
}

impl EventStream {
    /// The next frame of events, waiting at most `timeout` (`None`: as long as it takes);
    /// `Ok(None)` when nothing came in time. The daemon's error (a subscriber that fell behind)
    /// and a closed connection (the daemon stopped) are errors: subscribe again to resume.
    pub fn next(&mut self, timeout: Option<Duration>) -> Result<Option<EventBatch>, Error> {
        if timeout == Some(Duration::ZERO) {
            return Ok(None);
        }
        self.conn
            .stream
            .set_read_timeout(timeout)
            .map_err(|e| Error::io("socket", &e))?;
        match self.conn.reader.read::<Reply>(&self.conn.stream) {
            Ok((Reply::Events(batch), _)) => Ok(Some(batch)),
            Ok((Reply::Error(e), _)) => Err(e),
            Ok((other, _)) => Err(unexpected(&other)),
            Err(ReadError::Idle) => Ok(None),
            Err(ReadError::Closed) => Err(Error::ServiceUnavailable {
                reason: "vmlockd closed the event stream".into(),
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
