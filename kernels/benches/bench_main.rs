//! Criterion benches for the kernels crate: `cargo bench -p kernels` (filter with e.g. `-- gemm/`).
//!
//! Areas, one module each: `peak` (measured FMA peak on the thread budget; its module docs say how the
//! peak is computed), `gemm` (f32 GEMM vs the `gemm` crate and matrixmultiply, then a side-by-side summary
//! at 1024³ with the peak and numpy/OpenBLAS measured in the same run, per wall-clock second and per
//! CPU-second, with the load average), `fp8` (quantization vs memcpy, FP8 GEMM vs f32 GEMM), `attention`
//! (forward/backward at T = 128 and 1024).
//! Invariant: every group reports a throughput (FLOP/s or bytes/s) so ratios can be read side by side.

use criterion::{Criterion, criterion_group, criterion_main};
use std::time::Duration;

mod attention;
mod fp8;
mod gemm;
mod peak;

/// Thread budget of every bench (the CI and dev machines have 2 cores).
pub const THREADS: usize = 2;

/// Deterministic pseudo-random values in [-1, 1).
pub fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = peak::bench, gemm::bench, fp8::bench, attention::bench
}
criterion_main!(benches);
