//! The one place where coordinator errors become gRPC statuses.
//!
//! Invariant: the status message is the error's `Display` text, which names what was wrong; the
//! code follows the contract in coordinator.proto.

use tonic::{Code, Status};

use crate::Error;
use crate::core::CoreError;
use crate::store::StoreError;

/// Maps an error to the status a client sees.
pub fn to_status(err: &Error) -> Status {
    let code = match err {
        Error::Manifest(_) | Error::InvalidRequest(_) | Error::Config(_) => Code::InvalidArgument,
        Error::Core(core) => match core {
            CoreError::JobExists(_) => Code::AlreadyExists,
            CoreError::UnknownJob(_) | CoreError::UnknownWorker(_) => Code::NotFound,
            CoreError::JobEnded { .. } | CoreError::NotHeld { .. } => Code::FailedPrecondition,
            CoreError::Invalid(_) => Code::InvalidArgument,
        },
        Error::Store(store) => match store {
            StoreError::Etcd { .. } | StoreError::Timeout { .. } => Code::Unavailable,
            StoreError::Fenced { .. } => Code::Aborted,
            StoreError::Corrupt { .. } => Code::DataLoss,
        },
        Error::Unavailable(_) => Code::Unavailable,
        Error::Transport(_) | Error::Io(_) => Code::Internal,
    };
    Status::new(code, err.to_string())
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        to_status(&err)
    }
}
