//! The DeepSeek-V3 model with hand-written forward, backward-for-inputs and backward-for-weights.
//!
//! Invariant: depends on `kernels` only; no async runtime, no network.
