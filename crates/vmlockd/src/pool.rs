//! Request connections between requests: parked in one epoll set, served by a small pool of
//! threads that wait on that set themselves.
//!
//! Why: a thread per connection for the connection's whole life means 16 busy clients keep 16
//! daemon threads runnable next to their own 16, and the scheduler's fairness among them shows
//! as a tail of milliseconds. Here a connection costs no thread while it waits for its next
//! request; a pool thread that answers one request goes back to `epoll_wait`, which returns at
//! once when another connection is ready, so under load a few threads drain many connections
//! per wake-up. There is no hand-off between threads per request: the thread that sees the
//! connection ready is the one that serves it.
//!
//! Each connection is in the set with `EPOLLONESHOT`: once one thread has been woken for it, no
//! other thread is until it is parked (re-armed) again, so a connection is only ever served by
//! one thread at a time.
//!
//! Why one stuck client or hung disk still delays only its own VM: a request may block (an open
//! on a hung mount, a bounded wait for a paused holder, a write to a client that stopped
//! reading). While any pool thread is free (waiting in, or on its way back to, `epoll_wait`) a
//! ready connection is taken at once, stuck threads or not. When the last free thread takes a
//! connection it wakes the pool's monitor, which from then on looks every [`STUCK`]: if no
//! thread is free and no request was taken or finished since its last look, every thread has
//! been inside one request for at least that long, and it starts another thread. So a stuck
//! request holds one thread, its own, and delays other connections by at most about [`STUCK`]
//! (once, until the extra thread is there); under load no thread is started, since requests
//! keep finishing. (Starting a thread whenever the last free one gets busy would start and end
//! threads all the time under load, and bring back the crowd of runnable threads.) Threads
//! beyond the minimum end as [`crate::workers`]'s do: one that finishes a request while more
//! than `spare` threads are free ends at once, and one that sees no work for `linger` ends then.
//!
//! A connection parked for `idle_timeout` without a request is taken out of the set and given
//! to `expire` (which tells its client and closes it).

use rustix::event::{epoll, Timespec};
use std::collections::HashMap;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What serves a connection's requests (see [`Pool::new`]).
type ServeFn<C> = dyn Fn(C, &Detach<'_, C>) -> Option<C> + Send + Sync;

/// How long every pool thread must have been inside one request before another is started.
pub const STUCK: Duration = Duration::from_millis(2);

/// The connections of a pool, parked between requests, and its threads.
pub struct Pool<C> {
    epoll: OwnedFd,
    state: Mutex<State<C>>,
    /// Threads not inside a request: waiting in `epoll_wait` or on their way there.
    free: AtomicUsize,
    /// Threads of the pool alive now.
    alive: AtomicUsize,
    /// Requests taken plus requests finished, ever: the monitor sees whether any thread moved.
    progress: AtomicU64,
    /// The monitor waits for `alarm` (no thread free) rather than looking every [`STUCK`].
    monitor_asleep: AtomicBool,
    alarm: Mutex<bool>,
    alarm_cv: Condvar,
    /// Threads kept however long they wait.
    min: usize,
    /// Most free threads kept once they finish a request.
    spare: usize,
    /// How long a thread above `min` waits for work before it ends.
    linger: Duration,
    idle_timeout: Duration,
    name: &'static str,
    /// Serves what the connection has to say; gives it back to be parked again, or `None` when
    /// it is done (closed, or it went on to live on this thread after [`Detach::detach`]).
    serve: Box<ServeFn<C>>,
    /// Closes a connection that was parked for `idle_timeout`. Must not block.
    expire: Box<dyn Fn(C) + Send + Sync>,
}

struct State<C> {
    /// Parked connections by token, with the time they were parked. A connection being served
    /// is not here (its token stays in the epoll set, disarmed).
    parked: HashMap<u64, (C, Instant)>,
    /// Tokens are never reused: a stale readiness event can never take a later connection.
    next_token: u64,
    /// No parked connection expires before this.
    next_sweep: Instant,
}

impl<C: AsFd + Send + 'static> Pool<C> {
    /// A pool of at least `min` threads named `name` (started by [`Pool::start`]).
    pub fn new(
        name: &'static str,
        min: usize,
        spare: usize,
        linger: Duration,
        idle_timeout: Duration,
        serve: impl Fn(C, &Detach<'_, C>) -> Option<C> + Send + Sync + 'static,
        expire: impl Fn(C) + Send + Sync + 'static,
    ) -> io::Result<Arc<Self>> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let min = min.max(1);
        Ok(Arc::new(Pool {
            epoll,
            state: Mutex::new(State {
                parked: HashMap::new(),
                next_token: 1,
                next_sweep: Instant::now() + idle_timeout,
            }),
            free: AtomicUsize::new(0),
            alive: AtomicUsize::new(0),
            progress: AtomicU64::new(0),
            monitor_asleep: AtomicBool::new(false),
            alarm: Mutex::new(false),
            alarm_cv: Condvar::new(),
            min,
            spare: spare.max(min),
            linger,
            idle_timeout,
            name,
            serve: Box::new(serve),
            expire: Box::new(expire),
        }))
    }

    /// Starts the pool's `min` threads and its monitor.
    pub fn start(self: &Arc<Self>) -> io::Result<()> {
        for _ in 0..self.min {
            self.spawn()?;
        }
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name(format!("{}-monitor", self.name))
            .spawn(move || me.monitor())?;
        Ok(())
    }

    /// Starts a thread whenever every thread has been inside one request for [`STUCK`].
    fn monitor(self: Arc<Self>) {
        loop {
            // Asleep until the last free thread gets busy. (SeqCst with the takers' side: either
            // a taker sees the monitor asleep and raises the alarm, or the monitor sees no free
            // thread here.)
            self.monitor_asleep.store(true, Ordering::SeqCst);
            {
                let mut alarm = self.alarm.lock().unwrap_or_else(|p| p.into_inner());
                while !*alarm && self.free.load(Ordering::SeqCst) > 0 {
                    alarm = self.alarm_cv.wait(alarm).unwrap_or_else(|p| p.into_inner());
                }
                *alarm = false;
            }
            self.monitor_asleep.store(false, Ordering::SeqCst);
            let mut seen = self.progress.load(Ordering::SeqCst);
            loop {
                std::thread::sleep(STUCK);
                let now = self.progress.load(Ordering::SeqCst);
                if self.free.load(Ordering::SeqCst) > 0 {
                    break;
                }
                if now == seen {
                    tracing::debug!(
                        threads = self.alive.load(Ordering::Acquire),
                        "every request thread busy for {STUCK:?}: starting another"
                    );
                    if let Err(e) = self.spawn() {
                        tracing::warn!("no spare thread for request connections: {e}");
                    }
                }
                seen = now;
            }
        }
    }

    /// Parks a new connection: a pool thread serves it once it is readable (or hung up). On
    /// failure the connection is closed.
    pub fn park(&self, conn: C) -> io::Result<()> {
        let mut state = self.lock();
        let token = state.next_token;
        state.next_token += 1;
        let added = epoll::add(
            &self.epoll,
            conn.as_fd(),
            epoll::EventData::new_u64(token),
            interest(),
        );
        // In the map before the lock is let go: a thread woken for it at once waits for the
        // lock and finds it.
        added?;
        state.parked.insert(token, (conn, Instant::now()));
        Ok(())
    }

    /// Threads of the pool alive now.
    #[cfg(test)]
    fn threads(&self) -> usize {
        self.alive.load(Ordering::Acquire)
    }

    /// Connections parked now.
    #[cfg(test)]
    fn parked(&self) -> usize {
        self.lock().parked.len()
    }

    fn repark(&self, token: u64, conn: C) {
        let mut state = self.lock();
        match epoll::modify(
            &self.epoll,
            conn.as_fd(),
            epoll::EventData::new_u64(token),
            interest(),
        ) {
            Ok(()) => {
                state.parked.insert(token, (conn, Instant::now()));
            }
            Err(e) => tracing::warn!("re-arming a request connection: {e}; closed"),
        }
    }

    fn spawn(self: &Arc<Self>) -> io::Result<()> {
        self.alive.fetch_add(1, Ordering::AcqRel);
        self.free.fetch_add(1, Ordering::AcqRel);
        let me = Arc::clone(self);
        match std::thread::Builder::new()
            .name(self.name.into())
            .spawn(move || me.run())
        {
            Ok(_) => Ok(()),
            Err(e) => {
                self.free.fetch_sub(1, Ordering::AcqRel);
                self.alive.fetch_sub(1, Ordering::AcqRel);
                Err(e)
            }
        }
    }

    /// One pool thread: counted in `alive` and `free` by [`Pool::spawn`] already.
    fn run(self: Arc<Self>) {
        let mut last_work = Instant::now();
        loop {
            let now = Instant::now();
            let mut wait = self.lock().next_sweep.saturating_duration_since(now);
            let extra = self.alive.load(Ordering::Acquire) > self.min;
            if extra {
                wait = wait.min((last_work + self.linger).saturating_duration_since(now));
            }
            let mut events = [MaybeUninit::<epoll::Event>::uninit(); 1];
            let token = match epoll::wait(&self.epoll, &mut events, Some(&timespec(wait))) {
                Ok((events, _)) => events.first().map(|e| e.data.u64()),
                Err(rustix::io::Errno::INTR) => None,
                Err(e) => {
                    // Not expected (the set is ours); do not spin.
                    tracing::error!("epoll_wait on request connections: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    None
                }
            };
            let (conn, expired) = self.take(token);
            for conn in expired {
                (self.expire)(conn);
            }
            let Some(token) = token else {
                if extra && last_work.elapsed() >= self.linger && self.leave(2) {
                    return;
                }
                continue;
            };
            let Some(conn) = conn else {
                continue; // expired meanwhile
            };
            // This thread may now block for as long as its request does: if it was the last
            // free one, the monitor watches from now on.
            self.progress.fetch_add(1, Ordering::SeqCst);
            if self.free.fetch_sub(1, Ordering::SeqCst) == 1
                && self.monitor_asleep.load(Ordering::SeqCst)
            {
                *self.alarm.lock().unwrap_or_else(|p| p.into_inner()) = true;
                self.alarm_cv.notify_one();
            }
            let detach = Detach {
                pool: &self,
                done: std::cell::Cell::new(false),
            };
            let back = (self.serve)(conn, &detach);
            if detach.done.get() {
                return; // no longer the pool's thread (see `Detach`)
            }
            self.progress.fetch_add(1, Ordering::SeqCst);
            if let Some(conn) = back {
                self.repark(token, conn);
            }
            last_work = Instant::now();
            let free = self.free.fetch_add(1, Ordering::AcqRel) + 1;
            if free > self.spare && self.leave(self.spare + 1) {
                return;
            }
        }
    }

    /// Ends this thread's membership if at least `free_at_least` threads (this one included)
    /// are free and more than `min` are alive. Returns whether it did.
    fn leave(&self, free_at_least: usize) -> bool {
        let left = self
            .alive
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                (a > self.min).then(|| a - 1)
            })
            .is_ok();
        if !left {
            return false;
        }
        let freed = self
            .free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| {
                (f >= free_at_least).then(|| f - 1)
            })
            .is_ok();
        if !freed {
            self.alive.fetch_add(1, Ordering::AcqRel);
        }
        freed
    }

    /// Takes out the connection of `token` (if still parked) and the connections parked for
    /// `idle_timeout` or more, in one go under the lock.
    fn take(&self, token: Option<u64>) -> (Option<C>, Vec<C>) {
        let now = Instant::now();
        let mut state = self.lock();
        let conn = token.and_then(|t| state.parked.remove(&t).map(|(c, _)| c));
        if now < state.next_sweep {
            return (conn, Vec::new());
        }
        let timeout = self.idle_timeout;
        let expired: Vec<u64> = state
            .parked
            .iter()
            .filter(|(_, (_, at))| now.saturating_duration_since(*at) >= timeout)
            .map(|(t, _)| *t)
            .collect();
        let conns = expired
            .iter()
            .filter_map(|t| state.parked.remove(t).map(|(c, _)| c))
            .collect();
        state.next_sweep = state
            .parked
            .values()
            .map(|(_, at)| *at + timeout)
            .min()
            .unwrap_or(now + timeout);
        (conn, conns)
    }

    fn lock(&self) -> MutexGuard<'_, State<C>> {
        // `serve` and `expire` run outside the lock; the state is never left half-changed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Given to `serve`: a connection that goes on to live on its thread (a holder, an event
/// subscriber) calls [`Detach::detach`] first, and the thread leaves the pool, ending once the
/// connection does.
pub struct Detach<'a, C> {
    pool: &'a Arc<Pool<C>>,
    done: std::cell::Cell<bool>,
}

impl<C: AsFd + Send + 'static> Detach<'_, C> {
    /// Takes this thread out of the pool, which starts another in its place if it would be
    /// left without a free thread or below its minimum. (The thread was counted busy already.)
    pub fn detach(&self) {
        if self.done.replace(true) {
            return;
        }
        let pool = self.pool;
        pool.progress.fetch_add(1, Ordering::SeqCst);
        let alive = pool.alive.fetch_sub(1, Ordering::AcqRel) - 1;
        if alive < pool.min || pool.free.load(Ordering::SeqCst) == 0 {
            if let Err(e) = pool.spawn() {
                tracing::warn!("no thread to replace a request thread: {e}");
            }
        }
    }
}

/// Readable or hung up, once: re-armed when the connection is parked again.
fn interest() -> epoll::EventFlags {
    epoll::EventFlags::IN | epoll::EventFlags::RDHUP | epoll::EventFlags::ONESHOT
}

fn timespec(d: Duration) -> Timespec {
    // Round up to the next millisecond: waking a little early would only wait once more.
    let nanos = d.subsec_nanos().div_ceil(1_000_000) * 1_000_000;
    let (secs, nanos) = if nanos >= 1_000_000_000 {
        (d.as_secs().saturating_add(1), 0)
    } else {
        (d.as_secs(), nanos)
    };
    Timespec {
        tv_sec: i64::try_from(secs).unwrap_or(i64::MAX),
        tv_nsec: i64::from(nanos),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;

    fn wait_until(what: &str, ok: impl FnMut() -> bool) {
        vmlock_testkit::process::wait_until(
            what,
            Duration::from_secs(10),
            Duration::from_millis(1),
            ok,
        );
    }

    /// An echo pool: each byte read is written back; a `b'S'` blocks its thread until released.
    fn echo_pool(
        min: usize,
        idle: Duration,
    ) -> (Arc<Pool<UnixStream>>, mpsc::Sender<()>, mpsc::Receiver<()>) {
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let (expired_tx, expired_rx) = mpsc::channel::<()>();
        let expired_tx = Mutex::new(expired_tx);
        let pool = Pool::new(
            "t",
            min,
            min,
            Duration::from_millis(200),
            idle,
            move |mut s: UnixStream, _: &Detach<'_, UnixStream>| {
                let mut b = [0u8; 1];
                match s.read(&mut b) {
                    Ok(1) => {
                        if b[0] == b'S' {
                            let _ = release_rx
                                .lock()
                                .map(|r| r.recv_timeout(Duration::from_secs(10)));
                        }
                        s.write_all(&b).ok().map(|()| s)
                    }
                    _ => None,
                }
            },
            move |s: UnixStream| {
                drop(s);
                let _ = expired_tx.lock().map(|t| t.send(()));
            },
        )
        .expect("pool");
        pool.start().expect("start");
        (pool, release_tx, expired_rx)
    }

    fn echo(s: &mut UnixStream, byte: u8) -> u8 {
        s.write_all(&[byte]).expect("write");
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("read");
        b[0]
    }

    #[test]
    fn parked_connections_are_served_again_and_again() {
        let (pool, _release, _expired) = echo_pool(2, Duration::from_secs(30));
        let mut clients = Vec::new();
        for _ in 0..8 {
            let (a, b) = UnixStream::pair().expect("pair");
            a.set_read_timeout(Some(Duration::from_secs(10))).ok();
            pool.park(b).expect("park");
            clients.push(a);
        }
        for round in 0..50u8 {
            for c in &mut clients {
                assert_eq!(echo(c, round), round);
            }
        }
        wait_until("all parked again", || pool.parked() == 8);
    }

    #[test]
    fn stuck_requests_never_hold_up_other_connections_and_extra_threads_end() {
        let (pool, release, _expired) = echo_pool(2, Duration::from_secs(30));
        let mut stuck = Vec::new();
        for _ in 0..5 {
            let (mut a, b) = UnixStream::pair().expect("pair");
            a.set_read_timeout(Some(Duration::from_secs(10))).ok();
            pool.park(b).expect("park");
            a.write_all(b"S").expect("write");
            stuck.push(a);
        }
        // Five threads are stuck; another connection is still answered at once.
        let (mut a, b) = UnixStream::pair().expect("pair");
        a.set_read_timeout(Some(Duration::from_secs(10))).ok();
        pool.park(b).expect("park");
        for i in 0..10 {
            assert_eq!(echo(&mut a, i), i);
        }
        assert!(pool.threads() >= 6, "threads: {}", pool.threads());
        for c in &mut stuck {
            release.send(()).expect("release");
            let mut b = [0u8; 1];
            c.read_exact(&mut b).expect("echo");
        }
        // Back to the minimum after lingering.
        wait_until("extra threads to end", || pool.threads() == 2);
        assert_eq!(echo(&mut a, 7), 7);
    }

    #[test]
    fn a_connection_parked_for_the_idle_timeout_is_expired() {
        let (pool, _release, expired) = echo_pool(2, Duration::from_millis(100));
        let (mut a, b) = UnixStream::pair().expect("pair");
        a.set_read_timeout(Some(Duration::from_secs(10))).ok();
        pool.park(b).expect("park");
        let started = Instant::now();
        // Activity keeps it.
        for i in 0..5 {
            std::thread::sleep(Duration::from_millis(40));
            assert_eq!(echo(&mut a, i), i);
        }
        expired
            .recv_timeout(Duration::from_secs(10))
            .expect("expired");
        assert!(started.elapsed() >= Duration::from_millis(300));
        let mut rest = Vec::new();
        assert_eq!(a.read_to_end(&mut rest).expect("closed"), 0);
        assert_eq!(pool.parked(), 0);
    }
}
