//! [`LocalDataPlane`]: every rank of a job in one process, for single-process tests of the
//! executor; it implements the same [`DataPlane`] trait as the TCP plane.
//!
//! Invariant: semantics match the TCP plane (keyed FIFO delivery, timeouts, lost peers): a send
//! deposits straight into the destination's mailbox, and shutting a rank's plane down (or
//! dropping it) marks that rank lost in every other rank's mailbox, which is how a test kills a
//! peer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::mailbox::Mailbox;
use crate::{CommError, DataPlane, Key, Result};

struct Hub {
    mailboxes: Vec<Mailbox>,
}

/// One rank's handle on an in-process data plane.
pub struct LocalDataPlane {
    rank: usize,
    hub: Arc<Hub>,
    shut: AtomicBool,
}

impl LocalDataPlane {
    /// Creates the planes of a `world_size`-rank job, one per rank, in rank order.
    pub fn create(world_size: usize) -> Vec<LocalDataPlane> {
        let hub = Arc::new(Hub {
            mailboxes: (0..world_size)
                .map(|r| Mailbox::new(r, world_size))
                .collect(),
        });
        (0..world_size)
            .map(|rank| LocalDataPlane {
                rank,
                hub: hub.clone(),
                shut: AtomicBool::new(false),
            })
            .collect()
    }

    fn check_peer(&self, peer: usize) -> Result<()> {
        if peer >= self.hub.mailboxes.len() {
            return Err(CommError::InvalidArgument(format!(
                "rank {peer} is out of range for a world of {}",
                self.hub.mailboxes.len()
            )));
        }
        Ok(())
    }
}

impl DataPlane for LocalDataPlane {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.hub.mailboxes.len()
    }

    fn send_keyed(&self, peer: usize, key: Key, payload: Vec<u8>) -> Result<()> {
        self.check_peer(peer)?;
        let own = &self.hub.mailboxes[self.rank];
        if own.is_closed() {
            return Err(CommError::ShutDown {
                rank: self.rank,
                key,
            });
        }
        if let Some(reason) = own.lost_reason(peer) {
            return Err(CommError::PeerLost {
                rank: self.rank,
                peer,
                key,
                reason,
            });
        }
        self.hub.mailboxes[peer].deposit(self.rank, key, payload);
        Ok(())
    }

    fn recv_keyed(&self, peer: usize, key: Key, timeout: Duration) -> Result<Vec<u8>> {
        self.check_peer(peer)?;
        self.hub.mailboxes[self.rank].take(peer, key, timeout)
    }

    fn shutdown(&self) {
        if self.shut.swap(true, Ordering::SeqCst) {
            return;
        }
        self.hub.mailboxes[self.rank].close();
        for (rank, mailbox) in self.hub.mailboxes.iter().enumerate() {
            if rank != self.rank {
                mailbox.mark_lost(
                    self.rank,
                    format!("rank {}'s local data plane was shut down", self.rank),
                );
            }
        }
    }
}

impl Drop for LocalDataPlane {
    fn drop(&mut self) {
        self.shutdown();
    }
}
