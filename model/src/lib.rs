//! The DeepSeek-V3 model with hand-written forward, backward-for-inputs and backward-for-weights.
//!
//! Invariant: depends on `kernels` and `arch` only among workspace crates; no async runtime, no network.

pub use arch::ModelConfig;
pub use error::{ModelError, Result};

pub mod balance;
pub mod checkpoint;
pub mod data;
pub mod error;
pub mod exchange;
pub mod layers;
pub mod loss;
pub mod lr;
pub mod model;
pub mod npy;
pub mod ops;
pub mod optim;
pub mod params;
pub mod precision;
pub mod profile;
pub mod stage;
pub mod train;
