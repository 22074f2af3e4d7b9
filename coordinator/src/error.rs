//! The coordinator crate's error enum.
//!
//! Invariant: every variant's message names what was wrong; `server::status` maps each variant to
//! one `tonic::Status` code in one place.

use crate::core::CoreError;
use crate::store::StoreError;

/// Everything that can go wrong in the coordinator library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is inconsistent.
    #[error("invalid coordinator config: {0}")]
    Config(String),
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The state machine refused a request.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// A submitted manifest did not parse or validate.
    #[error("{0}")]
    Manifest(String),
    /// A message from a client or worker was malformed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The coordinator cannot serve the request right now (store writes failing, shutting down).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A socket operation failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}
