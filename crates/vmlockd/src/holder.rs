//! The daemon's side of a holder connection: pushes descriptions to the process that keeps them
//! for a VM, and waits for its acknowledgement.

use crate::proto::{write_frame, HeldLock, LockKey, Push};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Mutex;
use std::time::Duration;
use vmlock::Error;

/// How long a holder may take to confirm it keeps new descriptions.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// A connected holder.
#[derive(Debug)]
pub struct HolderLink {
    stream: Mutex<UnixStream>,
    next_seq: AtomicU64,
    waiting: Mutex<HashMap<u64, Sender<()>>>,
    connected: AtomicBool,
}

impl HolderLink {
    /// A link writing to `stream`, a clone of the connection whose reader calls [`HolderLink::acked`].
    pub fn new(stream: UnixStream) -> Self {
        HolderLink {
            stream: Mutex::new(stream),
            next_seq: AtomicU64::new(1),
            waiting: Mutex::new(HashMap::new()),
            connected: AtomicBool::new(true),
        }
    }

    /// Whether the connection is still up.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// The connection closed.
    pub fn disconnected(&self) {
        self.connected.store(false, Ordering::Release);
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.clear(); // dropping the senders wakes every waiter with an error
        }
    }

    fn send(&self, push: &Push, fds: &[&OwnedFd]) -> Result<(), Error> {
        let stream = self
            .stream
            .lock()
            .map_err(|_| unavailable("holder link poisoned"))?;
        write_frame(&stream, push, fds)
    }

    /// Hands `fds` (locking `locks`) to the holder and waits until it keeps them.
    pub fn keep(&self, locks: &[HeldLock], fds: &[OwnedFd]) -> Result<(), Error> {
        if !self.is_connected() {
            return Err(unavailable("the VM's supervisor is not connected"));
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = channel();
        self.waiting
            .lock()
            .map_err(|_| unavailable("holder link poisoned"))?
            .insert(seq, tx);
        // One frame, however many descriptors: `write_frame` spreads them over as many
        // `sendmsg` calls as the kernel needs, and the reader gives them all to this frame.
        let refs: Vec<&OwnedFd> = fds.iter().collect();
        let push = Push::Keep {
            seq,
            locks: locks.to_vec(),
        };
        if let Err(e) = self.send(&push, &refs) {
            self.forget(seq);
            return Err(e);
        }
        if rx.recv_timeout(ACK_TIMEOUT).is_err() {
            self.forget(seq);
            return Err(unavailable(
                "the VM's supervisor did not confirm it keeps the new locks",
            ));
        }
        self.forget(seq);
        Ok(())
    }

    fn forget(&self, seq: u64) {
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.remove(&seq);
        }
    }

    /// The holder confirmed push `seq`.
    pub fn acked(&self, seq: u64) {
        if let Ok(waiting) = self.waiting.lock() {
            if let Some(tx) = waiting.get(&seq) {
                let _ = tx.send(());
            }
        }
    }

    /// Tells the holder to close descriptions the daemon already unlocked (no wait: they hold
    /// nothing any more).
    pub fn close(&self, keys: &[LockKey]) {
        if keys.is_empty() || !self.is_connected() {
            return;
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let _ = self.send(
            &Push::Close {
                seq,
                keys: keys.to_vec(),
            },
            &[],
        );
    }

    /// Tells the holder its VM holds nothing any more.
    pub fn finished(&self) {
        if self.is_connected() {
            let _ = self.send(&Push::Finished, &[]);
        }
    }
}

fn unavailable(reason: &str) -> Error {
    Error::ServiceUnavailable {
        reason: reason.to_owned(),
    }
}
