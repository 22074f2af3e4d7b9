//! Measured FMA peak: independent fused multiply-add chains on every thread of the budget, so the GEMM
//! numbers can be read as a fraction of what this CPU actually sustains (not its nominal clock).
//!
//! How the peak is computed: each thread runs `CHAINS` independent chains of `vfmadd` on full vectors
//! (16 f32 lanes with AVX-512, 8 with AVX2), enough to cover the FMA latency (4 cycles) on both FMA
//! ports, so the loop runs at FMA width × FMA ports × clock: 16 lanes × 2 FLOP × 2 ports = 64 FLOP per
//! cycle per core with AVX-512. Criterion reports elements as FLOP (2 per lane per FMA), so the
//! throughput printed *is* the peak at the clock the core actually holds under AVX-512 load (on the
//! development machine 237 GFLOP/s on 1 thread = 3.7 GHz × 64, and 462 on 2 threads).

use criterion::{Criterion, Throughput};

/// Independent accumulator chains (latency 4 × 2 FMA ports needs at least 8).
const CHAINS: usize = 12;
const ITERS: u64 = 2_000_000;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma512(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let a = _mm512_set1_ps(0.999_999);
    let b = _mm512_set1_ps(1e-7);
    let mut acc = [_mm512_set1_ps(1.0); CHAINS];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm512_fmadd_ps(*v, a, b);
        }
    }
    acc.iter().map(|v| _mm512_reduce_add_ps(*v)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma256(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let a = _mm256_set1_ps(0.999_999);
    let b = _mm256_set1_ps(1e-7);
    let mut acc = [_mm256_set1_ps(1.0); CHAINS];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, a, b);
        }
    }
    let mut out = [0f32; 8];
    let s = acc
        .iter()
        .fold(_mm256_setzero_ps(), |s, v| _mm256_add_ps(s, *v));
    // SAFETY: `out` holds 8 f32.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
    out.iter().sum()
}

/// Measured FMA throughput in GFLOP/s on `threads` threads (AVX-512 when present, else AVX2+FMA; 0 when
/// neither): every thread runs the independent chains for `iters` steps, timed by the wall clock. Used by
/// the GEMM summary to put the GEMM numbers next to the peak measured in the same run.
/// FLOP done by one [`measure_gflops`] call (the AVX2 count when AVX-512 is missing).
pub fn flop_per_call(threads: usize, iters: u64) -> f64 {
    #[cfg(target_arch = "x86_64")]
    let lanes = if std::arch::is_x86_feature_detected!("avx512f") {
        16.0
    } else {
        8.0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let lanes = 0.0;
    threads as f64 * iters as f64 * CHAINS as f64 * lanes * 2.0
}

pub fn measure_gflops(threads: usize, iters: u64) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        let (lanes, f): (u64, unsafe fn(u64) -> f32) =
            if std::arch::is_x86_feature_detected!("avx512f") {
                (16, fma512)
            } else if std::arch::is_x86_feature_detected!("fma") {
                (8, fma256)
            } else {
                return 0.0;
            };
        let t0 = std::time::Instant::now();
        let sink = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                // SAFETY: the CPU feature was detected above.
                .map(|_| s.spawn(move || unsafe { f(iters) }))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum::<f32>()
        });
        std::hint::black_box(sink);
        let flop = threads as f64 * iters as f64 * CHAINS as f64 * lanes as f64 * 2.0;
        flop / t0.elapsed().as_secs_f64() / 1e9
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (threads, iters);
        0.0
    }
}

pub fn bench(c: &mut Criterion) {
    #[cfg(target_arch = "x86_64")]
    {
        let mut g = c.benchmark_group("peak");
        for (name, lanes, ok, f) in [
            (
                "fma_avx512",
                16u64,
                std::arch::is_x86_feature_detected!("avx512f"),
                fma512 as unsafe fn(u64) -> f32,
            ),
            (
                "fma_avx2",
                8,
                std::arch::is_x86_feature_detected!("fma"),
                fma256,
            ),
        ] {
            if !ok {
                continue;
            }
            for threads in [1, crate::THREADS] {
                g.throughput(Throughput::Elements(
                    threads as u64 * ITERS * CHAINS as u64 * lanes * 2,
                ));
                g.bench_function(format!("{name}/{threads}threads"), |b| {
                    b.iter(|| {
                        std::thread::scope(|s| {
                            let hs: Vec<_> = (0..threads)
                                // SAFETY: the CPU feature was detected above.
                                .map(|_| s.spawn(move || unsafe { f(ITERS) }))
                                .collect();
                            hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum::<f32>()
                        })
                    })
                });
            }
        }
        g.finish();
    }
}
