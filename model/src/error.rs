//! The model crate's error type: everything that can fail when building, loading or running a model.
//!
//! Invariant: errors caused by external input (files, configs, token ids) name what was wrong; kernel shape
//! errors can only come from bugs in this crate and are wrapped unchanged.

/// Errors of the `model` crate.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model config is invalid or unsupported.
    #[error(transparent)]
    Arch(#[from] arch::ArchError),
    /// A kernel rejected its arguments.
    #[error("kernel: {0}")]
    Kernel(#[from] kernels::KernelError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A safetensors file is malformed or has an unexpected tensor.
    #[error("safetensors {path}: {reason}")]
    Safetensors {
        /// The file involved.
        path: String,
        /// What was wrong.
        reason: String,
    },
    /// A parameter is missing or has the wrong shape.
    #[error("parameter `{name}`: {reason}")]
    Param {
        /// The checkpoint name.
        name: String,
        /// What was wrong.
        reason: String,
    },
    /// A `.npy` file is malformed or has an unsupported dtype.
    #[error("npy {path}: {reason}")]
    Npy {
        /// The file involved.
        path: String,
        /// What was wrong.
        reason: String,
    },
    /// An input (token ids, batch shape, micro-batch id) does not fit the model or stage.
    #[error("invalid input: {0}")]
    Input(String),
    /// An expert-parallel exchange failed (timeout, lost peer) or a peer sent rows that do not fit.
    #[error("expert exchange: {0}")]
    Exchange(String),
    /// The config asks for something this implementation does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, ModelError>;
