//! The crate's one error type.
//!
//! Invariant: every error raised while waiting on or talking to a peer names this rank, the
//! peer, and (where there is one) the message key, so a failed step can be explained from the
//! error text alone.

use std::time::Duration;

use crate::tag::Key;

/// Everything that can go wrong in the data plane.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// A receive did not complete before its timeout.
    #[error("rank {rank}: receive of {key} from rank {peer} timed out after {elapsed:.3?}")]
    Timeout {
        /// The receiving rank.
        rank: usize,
        /// The rank the message was expected from.
        peer: usize,
        /// The key waited for.
        key: Key,
        /// How long the receive waited.
        elapsed: Duration,
    },
    /// The peer is gone (connection closed or reset, connect failed, or it sent a bad frame), so
    /// the message can never arrive or be delivered.
    #[error("rank {rank}: rank {peer} is lost ({key}): {reason}")]
    PeerLost {
        /// The rank that noticed.
        rank: usize,
        /// The lost rank.
        peer: usize,
        /// The key being sent or waited for.
        key: Key,
        /// What happened to the peer, as first observed.
        reason: String,
    },
    /// A collective received a contribution whose size does not match this rank's.
    #[error("rank {rank}: {key}: rank {peer} sent {got} bytes where {expected} were expected")]
    SizeMismatch {
        /// The receiving rank.
        rank: usize,
        /// The sender of the contribution.
        peer: usize,
        /// The collective's key.
        key: Key,
        /// Bytes expected.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// The data plane was shut down while the operation was pending or before it started.
    #[error("rank {rank}: the data plane is shut down ({key})")]
    ShutDown {
        /// This rank.
        rank: usize,
        /// The key of the operation that was refused.
        key: Key,
    },
    /// A call was malformed (a rank out of range, a group this rank is not in, a wrong number of
    /// payloads); the message says which.
    #[error("invalid data-plane call: {0}")]
    InvalidArgument(String),
    /// Setting up the listener or the plane failed (the message says what was being done).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A payload could not be decoded (wrong length for its element type, bad section table).
    #[error("decoding a payload: {0}")]
    Decode(String),
}
