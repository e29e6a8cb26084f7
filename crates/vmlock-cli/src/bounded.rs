//! Work that may wait on storage, each item with a time bound: one item that does not answer
//! (a `stat` on a hung NFS or FUSE mount) is given up on, and the rest go on without it.
//!
//! Items run in order on a worker thread. Each item gets `per_item` from when the worker starts
//! it; one that overruns is reported as not answering and a new worker takes the items after it.
//! A worker stuck in the kernel is left behind: it holds nothing the others need, and it ends
//! with the process (a stuck `stat` is killable).

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

enum Progress<T> {
    Started(usize),
    Done(usize, T),
}

/// Runs `work` on every item; returns its results in the items' order, `None` for an item that
/// took longer than `per_item` (or whose worker could not be started).
pub fn map<I, T, F>(items: Vec<I>, per_item: Duration, work: F) -> Vec<Option<T>>
where
    I: Send + 'static,
    T: Send + 'static,
    F: Fn(I) -> T + Send + Sync + 'static,
{
    let count = items.len();
    let mut results: Vec<Option<T>> = (0..count).map(|_| None).collect();
    if count == 0 {
        return results;
    }
    let queue = Arc::new(Mutex::new(
        items.into_iter().enumerate().collect::<VecDeque<_>>(),
    ));
    let work = Arc::new(work);
    let (tx, rx) = channel();
    let spawn = |tx: Sender<Progress<T>>| {
        let (queue, work) = (Arc::clone(&queue), Arc::clone(&work));
        std::thread::Builder::new()
            .name("bounded".into())
            .spawn(move || loop {
                let next = queue.lock().map(|mut q| q.pop_front()).ok().flatten();
                let Some((index, item)) = next else {
                    return;
                };
                if tx.send(Progress::Started(index)).is_err()
                    || tx.send(Progress::Done(index, work(item))).is_err()
                {
                    return;
                }
            })
            .is_ok()
    };
    if !spawn(tx.clone()) {
        return results;
    }
    let mut settled = 0;
    // Items started and not done, with their deadlines.
    let mut running: HashMap<usize, Instant> = HashMap::new();
    let mut given_up = vec![false; count];
    while settled < count {
        let wait = running.values().min().map_or(per_item, |deadline| {
            deadline.saturating_duration_since(Instant::now())
        });
        match rx.recv_timeout(wait) {
            Ok(Progress::Started(index)) => {
                running.insert(index, Instant::now() + per_item);
            }
            Ok(Progress::Done(index, result)) => {
                running.remove(&index);
                if !given_up[index] {
                    results[index] = Some(result);
                    settled += 1;
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                let overdue: Vec<usize> = running
                    .iter()
                    .filter(|(_, deadline)| **deadline <= now)
                    .map(|(index, _)| *index)
                    .collect();
                for index in overdue {
                    running.remove(&index);
                    given_up[index] = true;
                    settled += 1;
                    // Its worker is stuck: another takes the items after it.
                    if !spawn(tx.clone()) {
                        return results;
                    }
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_item_that_does_not_answer_costs_only_itself() {
        let (release_tx, release_rx) = channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let started = Instant::now();
        let results = map(vec![1, 2, 3, 4], Duration::from_millis(200), move |n| {
            if n == 2 {
                // Stuck until the test ends (the sender is dropped then), or 10 s at most: a map
                // that waited for it would then return it, and the test fail rather than hang.
                let _ = release_rx
                    .lock()
                    .map(|rx| rx.recv_timeout(Duration::from_secs(10)));
            }
            n * 10
        });
        assert_eq!(results, vec![Some(10), None, Some(30), Some(40)]);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        drop(release_tx);
    }

    #[test]
    fn every_item_answers_in_order() {
        let results = map((0..50).collect(), Duration::from_secs(5), |n: u32| n + 1);
        assert_eq!(results, (1..=50).map(Some).collect::<Vec<_>>());
        assert!(map(Vec::<u32>::new(), Duration::from_secs(1), |n| n).is_empty());
    }
}
