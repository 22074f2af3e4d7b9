//! FP8 throughput: quantization in GB/s of f32 input against a plain copy of the same bytes, and the
//! block-scaled FP8 GEMM against the f32 GEMM of the same shape (both as FLOP/s, 2·m·n·k per call).

use criterion::{BenchmarkId, Criterion, Throughput};
use kernels::fp8::{
    Fp8Matrix, Fp8Tiling, ScaleFmt, fp8_matmul_dytx, fp8_matmul_dyw, fp8_matmul_nt_promoted,
    fp8_matmul_xwt, quantize_act, quantize_act_t, quantize_weight,
};
use kernels::{Accumulate, ExecCtx, matmul_xwt};

fn quant(c: &mut Criterion) {
    let (rows, cols) = (1024, 4096);
    let x = crate::data(rows * cols, 7);
    let mut g = c.benchmark_group("fp8_quant");
    g.throughput(Throughput::Bytes((rows * cols * 4) as u64));
    let mut dst = vec![0f32; rows * cols];
    g.bench_function("memcpy_f32_16MiB", |b| {
        b.iter(|| dst.copy_from_slice(std::hint::black_box(&x)))
    });
    let mut codes = vec![0u8; rows * cols];
    for threads in [1, crate::THREADS] {
        let ctx = ExecCtx::cpu(threads);
        let mut s_act = vec![0f32; rows * cols.div_ceil(128)];
        g.bench_function(BenchmarkId::new("act_1x128", format!("{threads}t")), |b| {
            b.iter(|| {
                quantize_act(&ctx, &mut codes, &mut s_act, &x, rows, cols, ScaleFmt::F32)
                    .expect("finite")
            })
        });
        let mut s_w = vec![0f32; rows.div_ceil(128) * cols.div_ceil(128)];
        g.bench_function(
            BenchmarkId::new("weight_128x128", format!("{threads}t")),
            |b| {
                b.iter(|| {
                    quantize_weight(&ctx, &mut codes, &mut s_w, &x, rows, cols, ScaleFmt::F32)
                        .expect("finite")
                })
            },
        );
        let mut s_t = vec![0f32; cols * rows.div_ceil(128)];
        g.bench_function(
            BenchmarkId::new("act_t_128x1", format!("{threads}t")),
            |b| {
                b.iter(|| {
                    quantize_act_t(&ctx, &mut codes, &mut s_t, &x, rows, cols, ScaleFmt::F32)
                        .expect("finite")
                })
            },
        );
    }
    g.finish();
}

fn gemm(c: &mut Criterion) {
    let ctx = ExecCtx::cpu(crate::THREADS);
    let mut g = c.benchmark_group("fp8_gemm");
    for &(m, n, k) in crate::gemm::SHAPES {
        let id = format!("{m}x{n}x{k}");
        g.throughput(Throughput::Elements(2 * (m * n * k) as u64));
        let x = crate::data(m * k, 1);
        let w = crate::data(n * k, 2);
        let (mut xc, mut xs) = (vec![0u8; m * k], vec![0f32; m * k.div_ceil(128)]);
        let (mut wc, mut ws) = (
            vec![0u8; n * k],
            vec![0f32; n.div_ceil(128) * k.div_ceil(128)],
        );
        quantize_act(&ctx, &mut xc, &mut xs, &x, m, k, ScaleFmt::F32).expect("finite");
        quantize_weight(&ctx, &mut wc, &mut ws, &w, n, k, ScaleFmt::F32).expect("finite");
        let xq = Fp8Matrix::new(&xc, &xs, m, k, Fp8Tiling::Row).expect("shapes");
        let wq = Fp8Matrix::new(&wc, &ws, n, k, Fp8Tiling::Block).expect("shapes");
        let mut y = vec![0f32; m * n];
        g.bench_function(BenchmarkId::new("f32_xwt", &id), |b| {
            b.iter(|| {
                matmul_xwt(&ctx, &mut y, &x, &w, m, n, k, Accumulate::Overwrite).expect("shapes")
            })
        });
        g.bench_function(BenchmarkId::new("fp8_xwt", &id), |b| {
            b.iter(|| {
                fp8_matmul_xwt(&ctx, &mut y, &xq, &wq, Accumulate::Overwrite).expect("shapes")
            })
        });
        if m == n && n == k {
            // dgrad: dy [m,n] in 1×128 tiles times the same weight blocks; wgrad from 128×1 operands.
            g.bench_function(BenchmarkId::new("fp8_promoted_xwt", &id), |b| {
                b.iter(|| {
                    fp8_matmul_nt_promoted(&ctx, &mut y, &xq, &wq, Accumulate::Overwrite)
                        .expect("shapes")
                })
            });
            let mut dx = vec![0f32; m * k];
            let dyq = Fp8Matrix::new(&xc, &xs, m, n, Fp8Tiling::Row).expect("square");
            g.bench_function(BenchmarkId::new("fp8_dyw", &id), |b| {
                b.iter(|| {
                    fp8_matmul_dyw(&ctx, &mut dx, &dyq, &wq, Accumulate::Overwrite).expect("shapes")
                })
            });
            let (mut tc, mut ts) = (vec![0u8; m * k], vec![0f32; k * m.div_ceil(128)]);
            quantize_act_t(&ctx, &mut tc, &mut ts, &x, m, k, ScaleFmt::F32).expect("finite");
            let tq = Fp8Matrix::new(&tc, &ts, k, m, Fp8Tiling::Row).expect("shapes");
            let mut dw = vec![0f32; n * k];
            g.bench_function(BenchmarkId::new("fp8_dytx", &id), |b| {
                b.iter(|| {
                    fp8_matmul_dytx(&ctx, &mut dw, &tq, &tq, Accumulate::Overwrite).expect("shapes")
                })
            });
        }
    }
    g.finish();
}

pub fn bench(c: &mut Criterion) {
    quant(c);
    gemm(c);
}
