//! The keyed, timed message store behind every receive.
//!
//! Invariants: messages are matched by (sender, key) and delivered FIFO per (sender, key); a
//! waiting `take` returns within its timeout (plus scheduling noise) with the message, a
//! `PeerLost` error once its sender is marked lost and nothing is queued for the key, or a
//! `ShutDown` error once the mailbox is closed. The first reason a peer is marked lost is kept.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{CommError, Key, Result};

/// One rank's incoming messages.
pub(crate) struct Mailbox {
    rank: usize,
    state: Mutex<State>,
    arrived: Condvar,
}

struct State {
    queues: HashMap<(usize, Key), VecDeque<Vec<u8>>>,
    lost: Vec<Option<String>>,
    closed: bool,
}

impl Mailbox {
    pub(crate) fn new(rank: usize, world_size: usize) -> Self {
        Self {
            rank,
            state: Mutex::new(State {
                queues: HashMap::new(),
                lost: vec![None; world_size],
                closed: false,
            }),
            arrived: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map half-updated in a way that matters
        // to other receivers, so a poisoned lock is still used.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a message from `from` under `key` and wakes the waiters.
    pub(crate) fn deposit(&self, from: usize, key: Key, payload: Vec<u8>) {
        let mut state = self.lock();
        state
            .queues
            .entry((from, key))
            .or_default()
            .push_back(payload);
        drop(state);
        self.arrived.notify_all();
    }

    /// Marks `peer` lost with `reason` (the first reason wins) and wakes the waiters.
    pub(crate) fn mark_lost(&self, peer: usize, reason: String) {
        let mut state = self.lock();
        if let Some(slot @ None) = state.lost.get_mut(peer) {
            tracing::warn!(target: "dataplane", rank = self.rank, peer, %reason, "peer lost");
            *slot = Some(reason);
        }
        drop(state);
        self.arrived.notify_all();
    }

    /// The lowest-numbered lost peer and why it is lost, if any is.
    pub(crate) fn first_lost(&self) -> Option<(usize, String)> {
        let state = self.lock();
        state
            .lost
            .iter()
            .enumerate()
            .find_map(|(peer, why)| why.clone().map(|w| (peer, w)))
    }

    /// Why `peer` is lost, if it is.
    pub(crate) fn lost_reason(&self, peer: usize) -> Option<String> {
        self.lock().lost.get(peer).cloned().flatten()
    }

    /// Whether the mailbox is closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Closes the mailbox: every pending and future `take` fails with `ShutDown`.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.arrived.notify_all();
    }

    /// Waits up to `timeout` for the next message from `from` under `key`.
    pub(crate) fn take(&self, from: usize, key: Key, timeout: Duration) -> Result<Vec<u8>> {
        let start = Instant::now();
        let deadline = start.checked_add(timeout);
        let mut state = self.lock();
        loop {
            if let Some(queue) = state.queues.get_mut(&(from, key))
                && let Some(payload) = queue.pop_front()
            {
                if queue.is_empty() {
                    state.queues.remove(&(from, key));
                }
                return Ok(payload);
            }
            if state.closed {
                return Err(CommError::ShutDown {
                    rank: self.rank,
                    key,
                });
            }
            if let Some(Some(reason)) = state.lost.get(from) {
                return Err(CommError::PeerLost {
                    rank: self.rank,
                    peer: from,
                    key,
                    reason: reason.clone(),
                });
            }
            let now = Instant::now();
            let remaining = match deadline {
                Some(deadline) if now >= deadline => {
                    return Err(CommError::Timeout {
                        rank: self.rank,
                        peer: from,
                        key,
                        elapsed: now - start,
                    });
                }
                Some(deadline) => deadline - now,
                // A timeout too large to add to `now` waits in day-long slices.
                None => Duration::from_secs(86_400),
            };
            state = self
                .arrived
                .wait_timeout(state, remaining)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// How many messages are queued and not yet taken (for tests and diagnostics).
    pub(crate) fn pending(&self) -> usize {
        self.lock().queues.values().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Kind, Tag};

    #[test]
    fn fifo_per_key_and_lost_after_drain() {
        let mailbox = Mailbox::new(0, 2);
        let a = Key::p2p(Tag::new(1, Kind::Control));
        let b = Key::p2p(Tag::new(2, Kind::Control));
        mailbox.deposit(1, a, vec![1]);
        mailbox.deposit(1, b, vec![3]);
        mailbox.deposit(1, a, vec![2]);
        mailbox.mark_lost(1, "first".into());
        mailbox.mark_lost(1, "second".into());
        let short = Duration::from_millis(1);
        assert_eq!(mailbox.take(1, b, short).unwrap(), vec![3]);
        assert_eq!(mailbox.take(1, a, short).unwrap(), vec![1]);
        assert_eq!(mailbox.take(1, a, short).unwrap(), vec![2]);
        let err = mailbox.take(1, a, short).unwrap_err().to_string();
        assert!(
            err.contains("rank 1 is lost") && err.contains("first"),
            "{err}"
        );
        assert_eq!(mailbox.pending(), 0);
    }
}
