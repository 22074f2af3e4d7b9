//! The worker crate's one error type.
//!
//! Invariant: configuration and bind errors end `run`; every session error is retried with backoff
//! until the retry budget (if any) is spent, and then surfaces as `RetriesExhausted`.

use std::net::SocketAddr;

/// Everything that can go wrong in the worker daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is unusable (the message names the setting).
    #[error("invalid worker configuration: {0}")]
    Config(String),
    /// The data-plane listener could not be bound.
    #[error("binding the data-plane listener on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The coordinator URL does not parse as a gRPC endpoint.
    #[error("invalid coordinator URL `{url}`: {source}")]
    CoordinatorUrl {
        /// The URL given.
        url: String,
        /// Why tonic refused it.
        source: tonic::transport::Error,
    },
    /// The TCP/HTTP2 connection to the coordinator failed.
    #[error("connecting to the coordinator: {0}")]
    Connect(#[source] tonic::transport::Error),
    /// A wait on the coordinator ran past its deadline.
    #[error("timed out after {after:?} while {what}")]
    Timeout {
        /// What the worker was waiting for.
        what: &'static str,
        /// How long it waited.
        after: std::time::Duration,
    },
    /// The coordinator answered with an error status.
    #[error("coordinator returned {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// The coordinator broke the session protocol (see proto/moetrain/v1/worker.proto).
    #[error("session protocol violation: {0}")]
    Protocol(String),
    /// The coordinator closed the session stream.
    #[error("the coordinator closed the session")]
    Closed,
    /// Reconnecting failed `attempts` times in a row and the retry policy allows no more.
    #[error(
        "gave up after {attempts} failed attempts to reach the coordinator; last error: {last}"
    )]
    RetriesExhausted {
        /// Consecutive failed attempts.
        attempts: u32,
        /// The last session error.
        last: Box<Error>,
    },
}
