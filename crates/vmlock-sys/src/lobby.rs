//! A waiting room for accepted connections: until a peer sends its first bytes (or hangs up) it
//! costs one descriptor and no thread, and a peer that sends nothing in time is closed here.
//!
//! Why: a daemon that starts a thread per accepted connection spends tens of microseconds on each
//! before it accepts the next one, so a burst of thousands of idle connections keeps a real client
//! waiting in the listen backlog for a tenth of a second or more. Accepting is a few microseconds;
//! the thread is started only for a connection that has something to say.

use nix::sys::socket::MsgFlags;
use rustix::event::epoll;
use rustix::event::Timespec;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

/// The token of the listener in the epoll set; connections get 1, 2, … (never reused, so a stale
/// expiry entry can never close a later connection that got the same descriptor number).
const LISTENER: u64 = 0;

/// How many connections are accepted before those already waiting are looked at again: a peer
/// connecting in the middle of a burst of thousands is served after at most this many accepts,
/// not after the whole burst. (The listener stays ready, so the rest come next round.)
const ACCEPTS_PER_ROUND: usize = 64;

/// How many readiness events one wait takes at most.
const EVENTS_PER_WAIT: usize = 256;

/// Accepts connections and hands them out once they are readable.
#[derive(Debug)]
pub struct Lobby {
    listener: UnixListener,
    epoll: OwnedFd,
    waiting: HashMap<u64, UnixStream>,
    /// Tokens in arrival order with their deadlines; every connection gets the same timeout, so
    /// deadlines ascend and the front is the next to expire. Tokens handed out stay here until
    /// their deadline passes (they are skipped then).
    deadlines: VecDeque<(Instant, u64)>,
    ready: VecDeque<UnixStream>,
    next_token: u64,
    timeout: Duration,
    capacity: usize,
    expired: u64,
    evicted: u64,
    hung_up: u64,
}

impl Lobby {
    /// Takes over `listener` (made non-blocking). A connection that sends nothing within
    /// `timeout` is closed; with `capacity` connections already waiting, the one that has waited
    /// longest is closed to make room for a new one, so idle peers cannot take every descriptor.
    pub fn new(listener: UnixListener, timeout: Duration, capacity: usize) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        epoll::add(
            &epoll,
            &listener,
            epoll::EventData::new_u64(LISTENER),
            epoll::EventFlags::IN,
        )?;
        Ok(Lobby {
            listener,
            epoll,
            waiting: HashMap::new(),
            deadlines: VecDeque::new(),
            ready: VecDeque::new(),
            next_token: LISTENER + 1,
            timeout,
            capacity: capacity.max(1),
            expired: 0,
            evicted: 0,
            hung_up: 0,
        })
    }

    /// The next connection with bytes to read or a hang-up to see, blocking until there is one.
    /// The stream is in blocking mode, as `accept` made it. An error is `accept`'s (e.g. out of
    /// descriptors) or the epoll set's (the accepted connection could not be watched, and is
    /// closed): nothing else is lost, and the caller may back off and call again.
    pub fn next_speaker(&mut self) -> io::Result<UnixStream> {
        loop {
            if let Some(stream) = self.ready.pop_front() {
                return Ok(stream);
            }
            let now = Instant::now();
            self.expire(now);
            let timeout = self
                .deadlines
                .front()
                .map(|(deadline, _)| timespec(deadline.saturating_duration_since(now)));
            let mut events = [MaybeUninit::<epoll::Event>::uninit(); EVENTS_PER_WAIT];
            let events = match epoll::wait(&self.epoll, &mut events, timeout.as_ref()) {
                Ok((events, _)) => events,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            let mut listener_ready = false;
            for event in events.iter() {
                match event.data.u64() {
                    LISTENER => listener_ready = true,
                    token => self.wake(token, event.flags),
                }
            }
            // Those already here go first; an accept error is reported once they are handed out.
            if listener_ready {
                if let Err(e) = self.accept_some() {
                    if self.ready.is_empty() {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Connections waiting for their first bytes now.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Connections closed so far for sending nothing within the timeout.
    pub fn expired(&self) -> u64 {
        self.expired
    }

    /// Connections closed so far to make room (the lobby was full).
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Connections closed so far because their peer hung up before sending anything.
    pub fn hung_up(&self) -> u64 {
        self.hung_up
    }

    fn accept_some(&mut self) -> io::Result<()> {
        for _ in 0..ACCEPTS_PER_ROUND {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream)?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The peer gave up before we took it: nothing to do.
                Err(e)
                    if e.raw_os_error() == Some(rustix::io::Errno::CONNABORTED.raw_os_error()) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn admit(&mut self, stream: UnixStream) -> io::Result<()> {
        while self.waiting.len() >= self.capacity {
            let Some((_, token)) = self.deadlines.pop_front() else {
                break;
            };
            if self.waiting.remove(&token).is_some() {
                self.evicted += 1;
            }
        }
        let token = self.next_token;
        self.next_token += 1;
        // RDHUP as well as IN: a peer that connects and closes is seen (and closed) at once
        // instead of waiting out the timeout.
        epoll::add(
            &self.epoll,
            &stream,
            epoll::EventData::new_u64(token),
            epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
        )
        .map_err(|e| {
            // Not accept's own failure (say, the user's epoll watch limit): say which it is.
            let e = io::Error::from(e);
            io::Error::new(
                e.kind(),
                format!("watching an accepted connection (epoll_ctl): {e}"),
            )
        })?;
        self.waiting.insert(token, stream);
        self.deadlines
            .push_back((Instant::now() + self.timeout, token));
        Ok(())
    }

    fn wake(&mut self, token: u64, flags: epoll::EventFlags) {
        let Some(stream) = self.waiting.remove(&token) else {
            return;
        };
        // A peer that hung up without a word has nothing to be served and cannot read a reply:
        // it is closed here, so a crowd of idle connections closing at once starts no thread.
        let hung_up = epoll::EventFlags::RDHUP | epoll::EventFlags::HUP | epoll::EventFlags::ERR;
        if flags.intersects(hung_up) && !has_bytes(&stream) {
            self.hung_up += 1;
            return;
        }
        // Out of the set before it is handed out: its reads belong to its thread now. A
        // failure here is harmless (closing the stream later removes it anyway).
        let _ = epoll::delete(&self.epoll, &stream);
        self.ready.push_back(stream);
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(deadline, token)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            // Dropping the stream closes it, which also takes it out of the epoll set.
            if self.waiting.remove(&token).is_some() {
                self.expired += 1;
            }
        }
    }
}

/// Whether a byte is waiting to be read (a peek that never blocks; an error counts as nothing).
fn has_bytes(stream: &UnixStream) -> bool {
    let mut byte = [0u8; 1];
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    matches!(nix::sys::socket::recv(stream.as_raw_fd(), &mut byte, flags), Ok(n) if n > 0)
}

fn timespec(d: Duration) -> Timespec {
    // Round up: waking a little early would only spin once more before the deadline.
    let nanos = d.subsec_nanos().div_ceil(1_000_000) * 1_000_000;
    Timespec {
        tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(nanos.min(999_999_999)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn lobby(timeout: Duration, capacity: usize) -> (tempfile::TempDir, std::path::PathBuf, Lobby) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("s");
        let listener = UnixListener::bind(&path).expect("bind");
        let lobby = Lobby::new(listener, timeout, capacity).expect("lobby");
        (dir, path, lobby)
    }

    /// Runs `lobby.next_speaker()` on a thread; the receiver yields its result.
    fn next_in_background(
        mut lobby: Lobby,
    ) -> std::sync::mpsc::Receiver<(Lobby, io::Result<UnixStream>)> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = lobby.next_speaker();
            let _ = tx.send((lobby, r));
        });
        rx
    }

    #[test]
    fn a_connection_is_handed_out_only_once_it_sends_and_in_blocking_mode() {
        let (_dir, path, lobby) = lobby(Duration::from_secs(30), 16);
        let mut quiet = UnixStream::connect(&path).expect("connect");
        let mut talker = UnixStream::connect(&path).expect("connect");
        let rx = next_in_background(lobby);
        // Nothing was sent yet: nothing may be handed out. (What is tested is that nothing
        // happens, so a little time must pass.)
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        talker.write_all(b"hello").expect("write");
        let (mut lobby, got) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("handed out");
        let mut got = got.expect("stream");
        let mut buf = [0u8; 5];
        got.read_exact(&mut buf).expect("read what was sent");
        assert_eq!(&buf, b"hello");
        // Blocking, as accept made it: a read with nothing there times out instead of WouldBlock.
        got.set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        let e = got.read(&mut buf).expect_err("nothing to read");
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e}"
        );
        assert_eq!(lobby.waiting(), 1, "the quiet one still waits");
        // The quiet one speaks later and comes out too.
        quiet.write_all(b"x").expect("write");
        let got = lobby.next_speaker().expect("second stream");
        drop(got);
    }

    #[test]
    fn a_peer_that_hangs_up_silently_is_closed_and_one_that_spoke_first_is_handed_out() {
        let (_dir, path, mut lobby) = lobby(Duration::from_secs(30), 16);
        drop(UnixStream::connect(&path).expect("connect"));
        let mut last_words = UnixStream::connect(&path).expect("connect");
        last_words.write_all(b"bye").expect("write");
        drop(last_words);
        let mut got = lobby.next_speaker().expect("stream");
        let mut rest = Vec::new();
        assert_eq!(got.read_to_end(&mut rest).expect("eof"), 3);
        assert_eq!(rest, b"bye");
        assert_eq!(lobby.hung_up(), 1);
        assert_eq!(lobby.waiting(), 0);
    }

    #[test]
    fn a_silent_connection_is_closed_after_the_timeout() {
        let (_dir, path, lobby) = lobby(Duration::from_millis(100), 16);
        let mut quiet = UnixStream::connect(&path).expect("connect");
        let rx = next_in_background(lobby);
        quiet
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let started = Instant::now();
        let mut rest = Vec::new();
        assert_eq!(quiet.read_to_end(&mut rest).expect("closed"), 0);
        assert!(started.elapsed() >= Duration::from_millis(50));
        // The lobby is still waiting for a connection that speaks; give it one to end the thread.
        let mut talker = UnixStream::connect(&path).expect("connect");
        talker.write_all(b"x").expect("write");
        let (lobby, got) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("handed out");
        got.expect("stream");
        assert_eq!(lobby.expired(), 1);
    }

    #[test]
    fn a_full_lobby_closes_the_longest_waiting_connection() {
        let (_dir, path, mut lobby) = lobby(Duration::from_secs(30), 2);
        let mut first = UnixStream::connect(&path).expect("connect");
        let _second = UnixStream::connect(&path).expect("connect");
        let mut third = UnixStream::connect(&path).expect("connect");
        third.write_all(b"x").expect("write");
        // All three are accepted in one go; the first makes room for the third.
        let got = lobby.next_speaker().expect("the third");
        drop(got);
        assert_eq!(lobby.evicted(), 1);
        first
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut rest = Vec::new();
        assert_eq!(first.read_to_end(&mut rest).expect("closed"), 0);
    }

    #[test]
    fn thousands_of_idle_connections_do_not_delay_one_that_speaks() {
        let (_dir, path, lobby) = lobby(Duration::from_secs(30), 4096);
        let rx = next_in_background(lobby);
        let idle: Vec<UnixStream> = (0..2000)
            .map(|_| UnixStream::connect(&path).expect("connect"))
            .collect();
        let mut talker = UnixStream::connect(&path).expect("connect");
        talker.write_all(b"x").expect("write");
        let (lobby, got) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("handed out");
        let mut got = got.expect("stream");
        let mut byte = [0u8; 1];
        got.read_exact(&mut byte).expect("the talker's byte");
        assert_eq!(lobby.waiting(), idle.len());
    }
}
