//! Numeric kernels: every forward and backward op a DeepSeek-V3 layer needs, FP8 (E4M3) fine-grained
//! quantization and block-scaled GEMM. CPU implementations always; CUDA later behind the `cuda` feature.
//!
//! Invariant: no async runtime, no network, no YAML; every op validates its shapes up front and returns
//! [`KernelError`] instead of panicking, and every op gives the same bits whatever the thread budget of its
//! [`ExecCtx`] (see "Determinism" below).
//!
//! # Calling convention
//!
//! Ops are free functions over row-major slices with explicit dimensions (llm.c style). Outputs come first,
//! then inputs, then dimensions. Ops that need threads take an [`ExecCtx`] first; the small element-wise
//! and row-wise ops run on the calling thread. Where an output can either be overwritten or accumulated into,
//! the op takes an [`Accumulate`]; names ending in `_accum` always accumulate (`+=`), everything else
//! overwrites. Index lists (`order`, top-k output) are `usize`; token ids and targets are `u32`.
//! Most ops are generic over [`Real`] (`f32` and `f64`): the model uses `f32`, the finite-difference tests
//! use `f64`, so every backward is checked against exact-enough numerical derivatives of the very same code.
//!
//! # Determinism
//!
//! Work is split into pieces whose boundaries depend on the problem shape only, never on the thread
//! count, and each output element is produced by exactly one piece in a fixed order. Scatter-adds
//! (embedding, MoE un-permute, weight-gradient reductions) run in index order on one thread. GEMMs (the
//! crate's own AVX-512 f32 kernel, and the `gemm` crate for f64 or older CPUs) split only the M and N
//! dimensions across threads and cut K into blocks at offsets fixed by the shape, so a GEMM's bits do
//! not depend on the thread budget either (nor on whether the weight was pre-packed with
//! [`PackedWeight`]); the two GEMM paths differ from each other, so f32 GEMM bits are reproducible per
//! CPU family (AVX-512 or not), not across them. The tests check 1, 2 and 3 threads bit for bit for GEMM,
//! attention, the quantizers and the FP8 GEMM. Hot loops are compiled for the baseline, AVX2 and AVX-512
//! and picked at run time; they perform the same IEEE operations, so the choice never changes bits (tested).
//!
//! # Memory
//!
//! The f32 GEMM packs its right-hand operand into per-calling-thread scratch (K × N values, kept between
//! calls; a [`PackedWeight`] holds its own) and the left-hand operand into per-worker scratch of
//! 128 × 256 values. The FP8 GEMM dequantizes its operands into per-calling-thread scratch that is kept between calls (it
//! grows to the largest operands seen on that thread); attention holds one [64 × T] score block (two
//! in the backward) per worker thread.
//!
//! # The `cuda` feature (design note; not implemented yet)
//!
//! The public surface is device-neutral on purpose: callers hand an [`ExecCtx`] to every op that may run
//! on an accelerator. A `cuda` cargo feature will add, without changing any caller:
//! - `ExecCtx::cuda(device, stream)`: an `ExecCtx` variant holding a `cudarc` `CudaStream` (and cuBLASLt
//!   handle). `ExecCtx::cpu` stays as it is.
//! - A `DeviceSlice`-backed buffer type that implements the same `AsRef<[T]>`-like accessor traits the
//!   ops take, so an op called with a CUDA context and device buffers launches a kernel on the stream,
//!   and with a CPU context and host slices runs the code in this crate. Each public function dispatches
//!   on the context once at the top (`match ctx.device { Cpu(..) => cpu::op(..), Cuda(..) => cuda::op(..) }`).
//! - The GPU kernels live in `src/cuda/` (PTX built by `build.rs` only when the feature is on, so the
//!   workspace builds and tests on machines without CUDA), and the CPU code in this crate stays the
//!   reference the GPU tests compare against.
//! - cudarc needs a CUDA version feature (or `CUDARC_CUDA_VERSION`) to build without nvcc and must be
//!   gated at run time on `is_culib_present()`; `ExecCtx::cuda` returns an error, never panics, when the
//!   libraries are missing.
//!
//! Errors are reported through [`KernelError`]; no op panics on bad shapes.

// Kernels take explicit dimensions next to their buffers (llm.c style), so long argument lists are the
// point of the API rather than an accident.
#![allow(clippy::too_many_arguments)]

pub mod activation;
pub mod attention;
pub mod dtype;
pub mod embedding;
pub mod exec;
pub mod fp8;
pub mod loss;
pub mod matmul;
pub mod moe;
pub mod norm;
pub mod real;
pub mod rope;
mod simd;
pub mod topk;

#[cfg(test)]
mod testutil;

pub use activation::{
    sigmoid, sigmoid_backward, silu, silu_backward, swiglu_backward, swiglu_forward,
};
pub use attention::{attention_backward, attention_forward};
pub use dtype::{bf16_to_f32, bf16_to_f32_slice, f32_to_bf16, f32_to_bf16_slice};
pub use embedding::{embedding_backward, embedding_forward};
pub use exec::{Accumulate, ExecCtx};
pub use loss::{cross_entropy_backward, cross_entropy_forward};
pub use matmul::{
    PackedWeight, WeightUse, matmul_dytx, matmul_dyw, matmul_dyw_packed, matmul_xwt,
    matmul_xwt_packed,
};
pub use moe::{
    permute_tokens, permute_tokens_backward, unpermute_weighted_add,
    unpermute_weighted_add_backward,
};
pub use norm::{
    rmsnorm_backward, rmsnorm_backward_input, rmsnorm_backward_weight, rmsnorm_forward,
};
pub use real::Real;
pub use rope::{rope_backward, rope_forward};
pub use topk::{group_limited_topk, topk};

/// Everything that can go wrong in a kernel call. Ops check their arguments before touching data.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KernelError {
    /// A buffer's length does not match the dimensions passed with it.
    #[error("{what}: expected length {expected}, got {got}")]
    Shape {
        /// Which buffer (argument name).
        what: &'static str,
        /// Length implied by the dimensions.
        expected: usize,
        /// Length actually passed.
        got: usize,
    },
    /// A dimension or parameter is outside its valid range (odd RoPE width, k larger than n, ...).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// An index (token id, target, row in an order list) is out of range.
    #[error("{what}: index {index} at position {at} is out of range 0..{bound}")]
    Index {
        /// Which index list.
        what: &'static str,
        /// The offending value.
        index: usize,
        /// Its position in the list.
        at: usize,
        /// The exclusive upper bound.
        bound: usize,
    },
    /// A NaN or infinity where the op needs finite input (for example inside an FP8 tile).
    #[error("non-finite value in {what} at row {row}, column {col}")]
    NonFinite {
        /// Which tensor.
        what: &'static str,
        /// Row of the first offending element.
        row: usize,
        /// Column of the first offending element.
        col: usize,
    },
    /// A safetensors file could not be parsed or written, or holds a tensor the op cannot handle.
    #[error("safetensors: {0}")]
    Safetensors(String),
}

/// Result type of every fallible kernel.
pub type Result<T> = std::result::Result<T, KernelError>;

/// Checks `buf_len == expected`, naming the buffer in the error.
#[inline]
pub(crate) fn check_len(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(KernelError::Shape {
            what,
            expected,
            got,
        })
    }
}

/// Multiplies dimensions, reporting overflow as an invalid argument instead of wrapping.
#[inline]
pub(crate) fn dims(parts: &[usize]) -> Result<usize> {
    parts.iter().try_fold(1usize, |acc, &d| {
        acc.checked_mul(d)
            .ok_or_else(|| KernelError::Invalid(format!("dimensions {parts:?} overflow usize")))
    })
}
