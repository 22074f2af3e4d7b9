//! f32 GEMM throughput (reported as FLOP/s, 2·m·n·k per call) of `kernels::matmul_*` against the
//! matrixmultiply crate at the same shapes and thread budget. numpy/OpenBLAS is timed by
//! `benches/numpy_gemm.py` at the same shapes in the same session.

use criterion::{BenchmarkId, Criterion, Throughput};
use kernels::{Accumulate, ExecCtx, matmul_dytx, matmul_dyw, matmul_xwt};

/// (m, n, k): square sizes and the tiny model's shapes at 256 tokens (q/kv projections, MLP in/out).
pub const SHAPES: &[(usize, usize, usize)] = &[
    (512, 512, 512),
    (1024, 1024, 1024),
    (256, 768, 256),
    (256, 256, 768),
    (256, 512, 256),
    (256, 256, 512),
];

pub fn bench(c: &mut Criterion) {
    // matrixmultiply reads its thread count from the environment once, on first use.
    // SAFETY (edition 2024 `set_var`): no other thread exists yet in this bench binary.
    unsafe { std::env::set_var("MATMUL_NUM_THREADS", crate::THREADS.to_string()) };
    let ctx = ExecCtx::cpu(crate::THREADS);
    let mut g = c.benchmark_group("gemm");
    for &(m, n, k) in SHAPES {
        let id = format!("{m}x{n}x{k}");
        g.throughput(Throughput::Elements(2 * (m * n * k) as u64));
        let x = crate::data(m * k, 1);
        let w = crate::data(n * k, 2);
        let dy = crate::data(m * n, 3);
        let mut y = vec![0f32; m * n];
        g.bench_function(BenchmarkId::new("xwt", &id), |b| {
            b.iter(|| {
                matmul_xwt(&ctx, &mut y, &x, &w, m, n, k, Accumulate::Overwrite).expect("shapes")
            })
        });
        g.bench_function(BenchmarkId::new("matrixmultiply_xwt", &id), |b| {
            b.iter(|| {
                // SAFETY: y is [m,n], x is [m,k] and w is [n,k] (read transposed through its strides).
                unsafe {
                    matrixmultiply::sgemm(
                        m,
                        k,
                        n,
                        1.0,
                        x.as_ptr(),
                        k as isize,
                        1,
                        w.as_ptr(),
                        1,
                        k as isize,
                        0.0,
                        y.as_mut_ptr(),
                        n as isize,
                        1,
                    )
                }
            })
        });
        if m == n && n == k {
            let mut dx = vec![0f32; m * k];
            g.bench_function(BenchmarkId::new("dyw", &id), |b| {
                b.iter(|| {
                    matmul_dyw(&ctx, &mut dx, &dy, &w, m, n, k, Accumulate::Overwrite)
                        .expect("shapes")
                })
            });
            let mut dw = vec![0f32; n * k];
            g.bench_function(BenchmarkId::new("dytx", &id), |b| {
                b.iter(|| {
                    matmul_dytx(&ctx, &mut dw, &dy, &x, m, n, k, Accumulate::Overwrite)
                        .expect("shapes")
                })
            });
        }
    }
    g.finish();
}
