//! The data plane: how worker ranks move activations, gradients and routed tokens to each other.
//!
//! Everything goes through one trait, [`DataPlane`], so that an NCCL implementation can replace the
//! CPU one later without touching the executor. Two implementations live here:
//! - [`TcpDataPlane`]: one process per rank, framed messages over `std::net` TCP, one sender thread
//!   per peer (so `send` only enqueues and communication overlaps compute) and one reader thread
//!   per incoming connection (so arrivals are matched by key, in any order).
//! - [`LocalDataPlane`]: every rank in one process, delivering through shared mailboxes; for
//!   single-process tests of the executor.
//!
//! # Layout
//! - [`tag`]: [`Tag`] (step, kind, direction, micro-batch, chunk), [`Op`] and [`Key`], the match key.
//! - [`group`]: [`Group`], an ordered set of ranks taking part in a collective.
//! - [`collective`]: all-to-all-v, reduce-scatter, all-gather, all-reduce and barrier, written once
//!   on top of keyed point-to-point messages; they are the trait's default methods.
//! - [`codec`]: payload helpers (f32 and bf16 little-endian encodings, multi-section payloads).
//! - `frame`, `mailbox`: the wire format and the keyed, timed message store (private).
//!
//! # Invariants
//! - Messages are matched by (sender, [`Key`]); for one (sender, key) they are delivered in the
//!   order they were sent. A [`Key`] carries the step, so messages of different steps never mix.
//! - Every wait has a timeout, and fails with an error naming this rank, the peer, the key and the
//!   elapsed time. A peer whose connection ends or sends a bad frame is marked lost: receives from
//!   it that have no message queued fail at once with the reason.
//! - Reductions use a fixed order (see [`collective`]), so their results are bitwise identical on
//!   every rank and across runs, whatever the message timing.
//! - The crate is payload-agnostic (bytes and f32 slices) and has no async runtime: compute threads
//!   call it synchronously.

pub mod codec;
pub mod collective;
mod error;
mod frame;
pub mod group;
mod local;
mod mailbox;
pub mod tag;
mod tcp;

use std::time::Duration;

pub use error::CommError;
pub use group::Group;
pub use local::LocalDataPlane;
pub use tag::{Direction, Key, Kind, Op, Tag};
pub use tcp::{TcpBinding, TcpConfig, TcpDataPlane};

/// The crate's result type.
pub type Result<T, E = CommError> = std::result::Result<T, E>;

/// Moves bytes between the ranks of one job.
///
/// Implementors provide the keyed point-to-point primitives ([`DataPlane::send_keyed`],
/// [`DataPlane::recv_keyed`]); the user-facing point-to-point calls and the collectives are
/// default methods built on them (see [`collective`] for their orders and guarantees), which an
/// implementation with native collectives (NCCL) may override as long as it keeps the documented
/// reduction order.
///
/// Every method may be called from several threads at once. Concurrent operations must use
/// different keys (for collectives: a different tag or a different group).
pub trait DataPlane: Send + Sync {
    /// This process's rank in the job, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// How many ranks the job has.
    fn world_size(&self) -> usize;

    /// Queues `payload` for `peer` under `key` and returns without waiting for delivery.
    ///
    /// Sending to oneself is allowed (the message goes straight to the own mailbox). Fails at once
    /// if the peer is already known to be lost or the plane is shut down.
    fn send_keyed(&self, peer: usize, key: Key, payload: Vec<u8>) -> Result<()>;

    /// Waits up to `timeout` for the next message from `peer` under `key`.
    ///
    /// Fails with [`CommError::Timeout`] after `timeout`, with [`CommError::PeerLost`] as soon as
    /// the peer is known to be gone (once the messages that did arrive from it are consumed), and
    /// with [`CommError::ShutDown`] if this plane is shut down meanwhile.
    fn recv_keyed(&self, peer: usize, key: Key, timeout: Duration) -> Result<Vec<u8>>;

    /// Stops the plane: flushes queued sends (bounded by the implementation's linger time), closes
    /// connections, wakes every waiting receive with [`CommError::ShutDown`] and joins the
    /// plane's threads. Idempotent; dropping the plane does the same.
    fn shutdown(&self);

    /// Hands back the buffer of a payload this rank received and no longer needs, so that a
    /// later receive can reuse its memory instead of faulting in fresh pages. Optional: the
    /// default drops it.
    fn recycle(&self, buffer: Vec<u8>) {
        drop(buffer);
    }

    /// Point-to-point send of `payload` to `peer` under `tag` (see [`DataPlane::send_keyed`]).
    fn send(&self, peer: usize, tag: Tag, payload: Vec<u8>) -> Result<()> {
        self.send_keyed(peer, Key::p2p(tag), payload)
    }

    /// Point-to-point receive from `peer` under `tag` (see [`DataPlane::recv_keyed`]).
    fn recv(&self, peer: usize, tag: Tag, timeout: Duration) -> Result<Vec<u8>> {
        self.recv_keyed(peer, Key::p2p(tag), timeout)
    }

    /// Sends `payloads[i]` to group member `i` and returns what each member sent to this rank,
    /// indexed by group position (see [`collective::all_to_all_v`]).
    fn all_to_all_v(
        &self,
        group: &Group,
        tag: Tag,
        payloads: Vec<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>> {
        collective::all_to_all_v(self, group, tag, payloads, timeout)
    }

    /// Sums `data` element-wise over the group, in place, in group order
    /// (see [`collective::all_reduce_sum_f32`]).
    fn all_reduce_sum_f32(
        &self,
        group: &Group,
        tag: Tag,
        data: &mut [f32],
        timeout: Duration,
    ) -> Result<()> {
        collective::all_reduce_sum_f32(self, group, tag, data, timeout)
    }

    /// Returns this rank's shard of the group-order element-wise sum of `data`
    /// (see [`collective::reduce_scatter_sum_f32`]).
    fn reduce_scatter_sum_f32(
        &self,
        group: &Group,
        tag: Tag,
        data: &[f32],
        timeout: Duration,
    ) -> Result<Vec<f32>> {
        collective::reduce_scatter_sum_f32(self, group, tag, data, timeout)
    }

    /// Concatenates every member's `shard` in group order (see [`collective::all_gather_f32`]).
    fn all_gather_f32(
        &self,
        group: &Group,
        tag: Tag,
        shard: &[f32],
        timeout: Duration,
    ) -> Result<Vec<f32>> {
        collective::all_gather_f32(self, group, tag, shard, timeout)
    }

    /// Returns once every group member has entered the barrier with the same tag
    /// (see [`collective::barrier`]).
    fn barrier(&self, group: &Group, tag: Tag, timeout: Duration) -> Result<()> {
        collective::barrier(self, group, tag, timeout)
    }
}
