//! Threads for connections, kept a while after their connection ends: a new connection usually
//! starts on a thread that already exists (a hand-off of about 2 µs) instead of a new one (about
//! 20 µs on the test machine, with millisecond outliers under load). Each connection still has a
//! thread of its own while it lives, so one stuck client holds up only itself.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Runs `work` on each item, on a spare thread when one waits, else on a new one.
pub struct Workers<T> {
    state: Mutex<State<T>>,
    wake: Condvar,
    /// Most threads that wait for work at once.
    spare: usize,
    /// How long a spare thread waits before it ends.
    linger: Duration,
    name: &'static str,
    work: Box<dyn Fn(T) + Send + Sync>,
}

struct State<T> {
    queue: VecDeque<T>,
    /// Threads waiting for an item; an item is queued only when one of them will take it.
    idle: usize,
}

impl<T: Send + 'static> Workers<T> {
    /// Threads named `name`, at most `spare` of them waiting for work, each for `linger`.
    pub fn new(
        name: &'static str,
        spare: usize,
        linger: Duration,
        work: impl Fn(T) + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Workers {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                idle: 0,
            }),
            wake: Condvar::new(),
            spare,
            linger,
            name,
            work: Box::new(work),
        })
    }

    /// Hands `item` to a waiting thread, or starts one for it. On `Err` (no thread could be
    /// started) the item was dropped.
    pub fn run(self: &Arc<Self>, item: T) -> std::io::Result<()> {
        {
            let mut state = self.lock();
            if state.idle > state.queue.len() {
                state.queue.push_back(item);
                self.wake.notify_one();
                return Ok(());
            }
        }
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name(self.name.into())
            .spawn(move || me.work_from(item))
            .map(|_| ())
    }

    /// Threads waiting for work now.
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.lock().idle
    }

    fn work_from(&self, first: T) {
        let mut item = first;
        loop {
            (self.work)(item);
            match self.next() {
                Some(next) => item = next,
                None => return,
            }
        }
    }

    fn next(&self) -> Option<T> {
        let mut state = self.lock();
        if state.idle >= self.spare {
            return None;
        }
        state.idle += 1;
        let deadline = Instant::now() + self.linger;
        loop {
            // An item queued for this thread is taken even when the deadline just passed.
            if let Some(item) = state.queue.pop_front() {
                state.idle -= 1;
                return Some(item);
            }
            let now = Instant::now();
            if now >= deadline {
                state.idle -= 1;
                return None;
            }
            state = self
                .wake
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic in `work` happens outside the lock; the state is never left half-changed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::thread::ThreadId;

    /// A spare thread's waiting has no event outside the pool: a bounded poll.
    fn wait_until(what: &str, ok: impl FnMut() -> bool) {
        vmlock_testkit::process::wait_until(
            what,
            Duration::from_secs(10),
            Duration::from_millis(1),
            ok,
        );
    }

    #[test]
    fn a_finished_thread_takes_the_next_item_and_ends_after_lingering() {
        let (tx, rx) = mpsc::channel::<ThreadId>();
        let tx = Mutex::new(tx);
        let workers = Workers::new("w", 1, Duration::from_millis(300), move |()| {
            let _ = tx.lock().map(|t| t.send(std::thread::current().id()));
        });
        workers.run(()).expect("run");
        let first = rx.recv_timeout(Duration::from_secs(10)).expect("ran");
        wait_until("the thread to wait for work", || workers.idle() == 1);
        workers.run(()).expect("run");
        let second = rx.recv_timeout(Duration::from_secs(10)).expect("ran");
        assert_eq!(first, second, "a new thread was started while one waited");
        // It waits for its linger, then ends.
        wait_until("the spare thread to end", || workers.idle() == 0);
    }

    #[test]
    fn busy_threads_get_company_and_at_most_spare_threads_wait() {
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let (done_tx, done_rx) = mpsc::channel::<ThreadId>();
        let done_tx = Mutex::new(done_tx);
        let workers = Workers::new("w", 2, Duration::from_secs(30), move |block: bool| {
            if block {
                let _ = release_rx
                    .lock()
                    .map(|r| r.recv_timeout(Duration::from_secs(10)));
            }
            let _ = done_tx.lock().map(|t| t.send(std::thread::current().id()));
        });
        // Four blocked items: four threads, none waits for work.
        for _ in 0..4 {
            workers.run(true).expect("run");
        }
        assert_eq!(workers.idle(), 0);
        for _ in 0..4 {
            release_tx.send(()).expect("release");
        }
        let ids: std::collections::HashSet<ThreadId> = (0..4)
            .map(|_| done_rx.recv_timeout(Duration::from_secs(10)).expect("done"))
            .collect();
        assert_eq!(ids.len(), 4, "the blocked items shared a thread");
        // Only two of the four stay for more work.
        wait_until("two spare threads", || workers.idle() == 2);
        // What is left of the others has ended: a quick item still runs.
        workers.run(false).expect("run");
        let id = done_rx.recv_timeout(Duration::from_secs(10)).expect("done");
        assert!(ids.contains(&id), "a spare thread was not used");
    }
}
