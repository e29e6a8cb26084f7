//! The holder: the process that keeps a VM's lock descriptions (the supervisor), and hands them
//! back to a restarted daemon.
//!
//! Two forms share one bookkeeping (what is kept, and what a re-registration says):
//!
//! - [`Holder`] serves the daemon's pushes on a thread of its own and reconnects by itself after a
//!   daemon restart; for a long-lived process such as `vmlock run`.
//! - [`HoldConnection`] is thread-free: the caller polls [`HoldConnection::fd`] in its own loop
//!   and calls [`HoldConnection::serve_ready`].
//!
//! # The thread-free contract
//!
//! [`HoldConnection`] and [`Connection`] (through [`Connection::connect`], [`Connection::call`],
//! [`Connection::call_with_fds`] and [`Connection::call_serving`]) are plain blocking system calls
//! on their own sockets:
//!
//! - **no thread** is started, and no async runtime exists;
//! - **no lock** is taken (no `Mutex`, no `std::io::stdout`/`stderr`, no logging);
//! - **no global state**: no environment read (so no `std::env` lock), no lazily initialised
//!   statics, no signal handler; every value lives in the objects;
//! - every wait is bounded ([`crate::REPLY_TIMEOUT`] for a reply, [`crate::proto::FRAME_TIMEOUT`] for the
//!   rest of a started frame), and nothing blocks in [`HoldConnection::serve_ready`];
//! - every descriptor is opened close-on-exec (sockets by std, received ones with
//!   `MSG_CMSG_CLOEXEC`); a caller that wants one to survive `exec` clears the flag itself.
//!
//! So these calls are safe in a child forked from a multi-threaded process, between `fork` and
//! `exec` (the libvirt lock plugin runs there), with one condition: they **allocate** (JSON
//! frames, paths). That is safe after `fork` with glibc, whose `fork` resets the allocator's
//! locks in the child (libvirt's own pre-exec hooks rely on this too), but not with an allocator
//! that is not fork-safe, and not in a signal handler. Resolve the [`RuntimeDir`] (which may read
//! the environment) before forking. [`Endpoint::connect`] (it may spawn a daemon) and [`Holder`]
//! (a thread) are not for that child.

use crate::connection::{unexpected, Connection, Endpoint, Opening};
use crate::proto::{
    write_frame, AcquireFlags, FrameReader, HeldLock, LockKey, Push, ReadError, Reply, Request,
    VmIdentity,
};
use crate::runtime::RuntimeDir;
use rustix::event::{poll, PollFd, PollFlags};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vmlock::Error;

/// The descriptions one holder keeps, by lock.
#[derive(Debug, Default)]
struct Kept(BTreeMap<LockKey, (HeldLock, OwnedFd)>);

/// What applying one push asks of the holder.
enum Applied {
    /// Ack this sequence number.
    Ack(u64),
    /// The VM holds nothing any more: the connection is done.
    Finished,
}

impl Kept {
    fn keep(&mut self, locks: Vec<HeldLock>, fds: Vec<OwnedFd>) -> Result<usize, Error> {
        if locks.len() != fds.len() {
            return Err(Error::Protocol {
                reason: format!(
                    "{} locks but {} descriptors in the reply",
                    locks.len(),
                    fds.len()
                ),
            });
        }
        let n = locks.len();
        for (lock, fd) in locks.into_iter().zip(fds) {
            self.0.insert(lock.key, (lock, fd));
        }
        Ok(n)
    }

    fn forget(&mut self, released: &[vmlock::Resource]) {
        self.0
            .retain(|_, (lock, _)| !released.iter().any(|r| r.path() == lock.resource.path()));
    }

    /// Applies one push, counting what it kept and closed into `served`.
    fn apply(&mut self, push: Push, fds: Vec<OwnedFd>, served: &mut Served) -> Applied {
        match push {
            Push::Keep { seq, locks } => {
                // The reader checked the count: one descriptor per lock.
                for (lock, fd) in locks.into_iter().zip(fds) {
                    self.0.insert(lock.key, (lock, fd));
                    served.kept += 1;
                }
                Applied::Ack(seq)
            }
            Push::Close { seq, keys } => {
                for key in keys {
                    if self.0.remove(&key).is_some() {
                        served.closed += 1;
                    }
                }
                Applied::Ack(seq)
            }
            Push::Finished => {
                served.closed += self.0.len();
                self.0.clear();
                served.finished = true;
                Applied::Finished
            }
        }
    }
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
            acquire: None,
        }
    }

    /// Only what belongs to the VM: the per-request modifiers of an acquire do not. Who carries
    /// the lock-failure action out (`supervisor_acts`) does: without it, a daemon restarted
    /// without its state files would act behind the VM manager's back.
    fn vm_flags(flags: &AcquireFlags) -> AcquireFlags {
        AcquireFlags {
            on_lock_failure: flags.on_lock_failure,
            qmp_socket: flags.qmp_socket.clone(),
            hold_qemu_bytes: flags.hold_qemu_bytes,
            supervisor_acts: flags.supervisor_acts,
            ..AcquireFlags::default()
        }
    }

    /// The first acquire's options are the VM's.
    fn acquired(&mut self, flags: &AcquireFlags) {
        if self.flags.is_none() {
            self.flags = Some(Self::vm_flags(flags));
        }
    }
}

/// Registers `conn` as the holder of `registration`'s VM, handing back what `kept` holds, and
/// returns the connection's socket and reader (which may already hold the start of a push).
fn hold_on(
    mut conn: Connection,
    registration: &Registration,
    kept: &Kept,
    incoming: bool,
) -> Result<(UnixStream, FrameReader), Error> {
    let adopt: Vec<HeldLock> = kept.0.values().map(|(l, _)| l.clone()).collect();
    let fds: Vec<&OwnedFd> = kept.0.values().map(|(_, fd)| fd).collect();
    let answer = conn.call(&registration.hold(adopt, incoming), &fds);
    held(conn, answer)
}

/// The connection, once the daemon answered its `Hold` with `answer`.
fn held(
    conn: Connection,
    answer: Result<Reply, Error>,
) -> Result<(UnixStream, FrameReader), Error> {
    match answer {
        Ok(Reply::Ok) | Err(Error::PartialRelease { .. }) => {}
        Ok(other) => return Err(unexpected(&other)),
        Err(e) => return Err(e),
    }
    // Pushes come when the daemon has them: no timeout between them.
    conn.stream
        .set_read_timeout(None)
        .map_err(|e| Error::io("socket", &e))?;
    Ok((conn.stream, conn.reader))
}

/// A start sent by [`HoldConnection::send_start`], its answers not read yet.
#[derive(Debug)]
pub struct StartSent {
    opening: Opening,
    registration: Registration,
    flags: AcquireFlags,
}

impl StartSent {
    /// Reads the answers: the holder connection, what was taken and copies of the
    /// descriptions; or why not (see [`HoldConnection::start_opened`]).
    pub fn finish(self) -> Result<(HoldConnection, Vec<HeldLock>, Vec<OwnedFd>), StartRefused> {
        let StartSent {
            opening,
            mut registration,
            flags,
        } = self;
        let mut conn = opening.established().map_err(StartRefused::Registration)?;
        match conn.receive() {
            Ok((Reply::Ok, _)) => {}
            Ok((other, _)) => return Err(StartRefused::Registration(unexpected(&other))),
            Err(e) => return Err(StartRefused::Registration(e)),
        }
        let (locks, fds) = match conn.receive() {
            Ok((Reply::Kept { locks, .. }, fds)) => (locks, fds),
            Ok((Reply::Held(_), _)) => (Vec::new(), Vec::new()),
            Ok((other, _)) => return Err(StartRefused::Acquire(unexpected(&other))),
            Err(e) => return Err(StartRefused::Acquire(e)),
        };
        let copies = fds
            .iter()
            .map(OwnedFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StartRefused::Acquire(Error::io("copying the descriptions", &e)))?;
        registration.acquired(&flags);
        let mut kept = Kept::default();
        kept.keep(locks.clone(), fds)
            .map_err(StartRefused::Acquire)?;
        let link = held(conn, Ok(Reply::Ok)).map_err(StartRefused::Registration)?;
        Ok((
            HoldConnection::connected(link, registration, kept),
            locks,
            copies,
        ))
    }
}

/// Why [`HoldConnection::start_opened`] failed.
#[derive(Debug)]
pub enum StartRefused {
    /// The registration (the VM is known here, or no daemon answered): nothing was taken.
    Registration(Error),
    /// The acquire: nothing is held and nothing stays registered.
    Acquire(Error),
}

/// What one [`HoldConnection::serve_ready`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// Descriptions received and kept (`Keep` pushes, acked).
    pub kept: usize,
    /// Descriptions closed (`Close` pushes, acked, and `Finished`).
    pub closed: usize,
    /// The daemon said the VM holds nothing any more: every description is closed and the
    /// connection is done.
    pub finished: bool,
    /// The daemon went away (it died or restarts). Every description is still kept, so the
    /// kernel keeps every lock; stop polling [`HoldConnection::fd`] and call
    /// [`HoldConnection::reconnect`] to hand them to the next daemon.
    pub disconnected: bool,
}

/// A thread-free holder connection: keeps one VM's lock descriptions for a caller that runs its
/// own poll loop (or none: a forked child before exec). See the [module](self) for the contract.
///
/// Dropping it closes every description it keeps: for the locks to survive, keep it (or the
/// descriptions, through [`HoldConnection::descriptions`]) for as long as the guest runs.
#[derive(Debug)]
pub struct HoldConnection {
    stream: UnixStream,
    reader: FrameReader,
    registration: Registration,
    kept: Kept,
    connected: bool,
    finished: bool,
}

impl HoldConnection {
    /// Connects to the daemon of `runtime` (never starting one), says hello and registers as the
    /// holder of `vm`. `flags` are the VM's options (lock-failure action, QMP socket, QEMU
    /// bytes) if known now; otherwise the first acquire's, once [`HoldConnection::acquired`]
    /// reports it.
    pub fn register(
        runtime: &RuntimeDir,
        vm: VmIdentity,
        flags: Option<AcquireFlags>,
    ) -> Result<Self, Error> {
        Self::register_as(runtime, vm, flags, false)
    }

    /// The same for the destination of a migration prepared on the source.
    pub fn register_incoming(
        runtime: &RuntimeDir,
        vm: VmIdentity,
        flags: Option<AcquireFlags>,
    ) -> Result<Self, Error> {
        Self::register_as(runtime, vm, flags, true)
    }

    /// A VM's start in one round trip, on a connection whose hello is still on its way:
    /// registers as the holder of `vm` (its first acquire's `flags` are the VM's) and takes
    /// `resources` at once, all or nothing, with their descriptions in the reply (kept here, and
    /// returned as copies for the caller). `Err(Registration(e))` when the daemon refused the
    /// registration itself (the VM is known), `Err(Acquire(e))` when it refused the acquire (then
    /// nothing stays registered).
    pub fn start_opened(
        opening: Opening,
        vm: VmIdentity,
        resources: Vec<vmlock::Resource>,
        flags: AcquireFlags,
    ) -> Result<(Self, Vec<HeldLock>, Vec<OwnedFd>), StartRefused> {
        Self::send_start(opening, vm, resources, flags)?.finish()
    }

    /// The first half of [`HoldConnection::start_opened`]: the request is sent, the caller may
    /// do something else while the daemon works, then [`StartSent::finish`] reads the answers.
    pub fn send_start(
        mut opening: Opening,
        vm: VmIdentity,
        resources: Vec<vmlock::Resource>,
        flags: AcquireFlags,
    ) -> Result<StartSent, StartRefused> {
        let request = Request::Hold {
            vm: vm.clone(),
            adopt: Vec::new(),
            incoming: false,
            flags: Some(flags.clone()),
            acquire: Some(resources),
        };
        opening
            .send(&request, &[])
            .map_err(StartRefused::Registration)?;
        Ok(StartSent {
            opening,
            registration: Registration { vm, flags: None },
            flags,
        })
    }

    /// A registered holder connection.
    fn connected(
        (stream, reader): (UnixStream, FrameReader),
        registration: Registration,
        kept: Kept,
    ) -> Self {
        HoldConnection {
            stream,
            reader,
            registration,
            kept,
            connected: true,
            finished: false,
        }
    }

    fn register_as(
        runtime: &RuntimeDir,
        vm: VmIdentity,
        flags: Option<AcquireFlags>,
        incoming: bool,
    ) -> Result<Self, Error> {
        let registration = Registration {
            vm,
            flags: flags.as_ref().map(Registration::vm_flags),
        };
        let kept = Kept::default();
        let link = hold_on(
            Connection::connect(runtime)?,
            &registration,
            &kept,
            incoming,
        )?;
        Ok(Self::connected(link, registration, kept))
    }

    /// The holder socket, to poll for readability in the caller's own loop; then call
    /// [`HoldConnection::serve_ready`]. Not to be read or written directly.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    /// Whether the connection is up (not dropped by the daemon, not finished).
    pub fn is_connected(&self) -> bool {
        self.connected && !self.finished
    }

    /// Serves every push that is ready, without waiting for more: keeps the descriptions of
    /// `Keep`, closes those of `Close` and acks both; on `Finished` closes everything. A push
    /// whose first bytes arrived is read whole (the daemon writes a frame at once; at most
    /// [`crate::proto::FRAME_TIMEOUT`]). An error (a malformed push, a failed ack) drops the
    /// connection as [`Served::disconnected`] would, keeping every description.
    pub fn serve_ready(&mut self) -> Result<Served, Error> {
        let mut served = Served {
            finished: self.finished,
            disconnected: !self.connected,
            ..Served::default()
        };
        while self.is_connected() && (self.reader.buffered() || self.readable()?) {
            match self.reader.read::<Push>(&self.stream) {
                Ok((push, fds)) => match self.kept.apply(push, fds, &mut served) {
                    Applied::Ack(seq) => {
                        if let Err(e) = write_frame(&self.stream, &Request::Ack { seq }, &[]) {
                            // Without the ack the daemon gives up on this push and drops the
                            // connection; what we keep stays kept until a reconnect.
                            self.connected = false;
                            return Err(e);
                        }
                    }
                    Applied::Finished => self.finished = true,
                },
                Err(ReadError::Idle) => break,
                Err(ReadError::Closed) => {
                    self.connected = false;
                    served.disconnected = true;
                }
                Err(ReadError::Failed(e)) => {
                    // The daemon closes a connection it cannot follow: so do we, keeping every
                    // description.
                    self.connected = false;
                    return Err(e);
                }
            }
        }
        Ok(served)
    }

    /// Whether the socket has something to read now (data, or the daemon's close).
    fn readable(&self) -> Result<bool, Error> {
        let mut pfd = [PollFd::new(&self.stream, PollFlags::IN)];
        let zero = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        match poll(&mut pfd, Some(&zero)) {
            Ok(n) => Ok(n > 0),
            Err(rustix::io::Errno::INTR) => Ok(false),
            Err(e) => Err(Error::io("polling the holder socket", &e.into())),
        }
    }

    /// After the daemon went away ([`Served::disconnected`]): registers again with the daemon of
    /// `runtime` (never starting one), handing back every kept description. Fails while no daemon
    /// answers; the caller decides when to try again.
    pub fn reconnect(&mut self, runtime: &RuntimeDir) -> Result<(), Error> {
        let (stream, reader) = hold_on(
            Connection::connect(runtime)?,
            &self.registration,
            &self.kept,
            false,
        )?;
        self.stream = stream;
        self.reader = reader;
        self.connected = true;
        Ok(())
    }

    /// Keeps descriptions this process received itself (an acquire answered with
    /// [`Reply::Kept`]).
    pub fn keep_local(&mut self, locks: Vec<HeldLock>, fds: Vec<OwnedFd>) -> Result<(), Error> {
        self.kept.keep(locks, fds).map(|_| ())
    }

    /// Drops this process's copies of the descriptions of `released` (after a
    /// [`Request::ReleaseKept`]; only what the daemon did release and unlock).
    pub fn forget_local(&mut self, released: &[vmlock::Resource]) {
        self.kept.forget(released);
    }

    /// An acquire with `flags` succeeded: unless known at registration, the first one's
    /// lock-failure action, QMP socket and QEMU-bytes option are the VM's, handed back on
    /// [`HoldConnection::reconnect`].
    pub fn acquired(&mut self, flags: &AcquireFlags) {
        self.registration.acquired(flags);
    }

    /// The guest now runs as `pid` (after the daemon accepted `GuestStarted`): a re-registration
    /// names it.
    pub fn guest_started(&mut self, pid: u32) {
        self.registration.vm.pid = pid;
    }

    /// Every kept description with what it locks.
    pub fn descriptions(&self) -> impl Iterator<Item = (&HeldLock, BorrowedFd<'_>)> {
        self.kept.0.values().map(|(lock, fd)| (lock, fd.as_fd()))
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
    kept: Arc<Mutex<Kept>>,
    stop: Arc<AtomicBool>,
    /// The holder's current connection (it changes when the daemon restarts).
    current: Arc<Mutex<Option<UnixStream>>>,
    registration: Arc<Mutex<Registration>>,
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

    /// Takes over as the holder of `vm` from its guest, which registered as its own holder and
    /// took `locks` (their descriptions `fds`, handed down to this process) with the VM's
    /// `flags`: the daemon accepts this from the guest's child only (see `LockTable::hold`). Every description is handed
    /// back with the registration, so the takeover loses nothing even if the daemon restarted
    /// since the guest's acquire.
    pub fn take_over(
        endpoint: &Endpoint,
        vm: VmIdentity,
        locks: Vec<HeldLock>,
        fds: Vec<OwnedFd>,
        flags: Option<AcquireFlags>,
    ) -> Result<Self, Error> {
        let mut kept = Kept::default();
        kept.keep(locks, fds)?;
        Self::start_with(endpoint, vm, false, kept, flags)
    }

    fn start_as(endpoint: &Endpoint, vm: VmIdentity, incoming: bool) -> Result<Self, Error> {
        Self::start_with(endpoint, vm, incoming, Kept::default(), None)
    }

    fn start_with(
        endpoint: &Endpoint,
        vm: VmIdentity,
        incoming: bool,
        kept: Kept,
        flags: Option<AcquireFlags>,
    ) -> Result<Self, Error> {
        let kept = Arc::new(Mutex::new(kept));
        let name = vm.name.clone();
        let registration = Arc::new(Mutex::new(Registration {
            vm,
            flags: flags.as_ref().map(Registration::vm_flags),
        }));
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

    /// A copy (`dup`) of every kept description.
    pub fn duplicates(&self) -> Vec<OwnedFd> {
        self.kept
            .lock()
            .map(|kept| {
                kept.0
                    .values()
                    .filter_map(|(_, fd)| fd.try_clone().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Keeps descriptions this process received itself (an acquire answered with
    /// [`Reply::Kept`]).
    pub fn keep_local(&self, locks: Vec<HeldLock>, fds: Vec<OwnedFd>) -> Result<(), Error> {
        let mut kept = self.kept.lock().map_err(|_| poisoned())?;
        kept.keep(locks, fds).map(|_| ())
    }

    /// Drops this process's copies of the descriptions of `released` (after a
    /// [`Request::ReleaseKept`]; only what the daemon did release and unlock).
    pub fn forget_local(&self, released: &[vmlock::Resource]) {
        if let Ok(mut kept) = self.kept.lock() {
            kept.forget(released);
        }
    }

    /// Waits until the daemon says the VM holds nothing any more.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn poisoned() -> Error {
    Error::ServiceUnavailable {
        reason: "holder state poisoned".into(),
    }
}

fn register(
    endpoint: &Endpoint,
    registration: &Mutex<Registration>,
    kept: &Mutex<Kept>,
    incoming: bool,
) -> Result<(UnixStream, FrameReader), Error> {
    let registration = registration.lock().map_err(|_| poisoned())?.clone();
    let conn = endpoint.connect()?;
    // Held across the Hold request, so a concurrent keep_local is handed back too or waits.
    let kept = kept.lock().map_err(|_| poisoned())?;
    hold_on(conn, &registration, &kept, incoming)
}

fn hold_loop(
    (mut stream, mut reader): (UnixStream, FrameReader),
    current: Arc<Mutex<Option<UnixStream>>>,
    endpoint: Endpoint,
    registration: Arc<Mutex<Registration>>,
    kept: Arc<Mutex<Kept>>,
    stop: Arc<AtomicBool>,
) {
    let reconnect = Endpoint {
        auto_start: false,
        ..endpoint
    };
    loop {
        match reader.read::<Push>(&stream) {
            Ok((push, fds)) => {
                let applied = match kept.lock() {
                    Ok(mut k) => k.apply(push, fds, &mut Served::default()),
                    Err(_) => return,
                };
                match applied {
                    Applied::Ack(seq) => {
                        let _ = write_frame(&stream, &Request::Ack { seq }, &[]);
                    }
                    Applied::Finished => return,
                }
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
            supervisor_acts: true,
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
                supervisor_acts: true,
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
