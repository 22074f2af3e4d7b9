//! Causal attention forward and backward at T = 128 and 1024 with the tiny model's MLA head shape
//! (H = 4, dqk = 48, dv = 32) and a wider one (H = 16), on the bench thread budget. Throughput counts the
//! causal half of the score and value products: fwd 2·H·T²/2·(dqk + dv) FLOP, bwd 2× the forward's
//! products plus the recomputed scores.

use criterion::{BenchmarkId, Criterion, Throughput};
use kernels::{ExecCtx, attention_backward, attention_forward};

pub fn bench(c: &mut Criterion) {
    let ctx = ExecCtx::cpu(crate::THREADS);
    let mut g = c.benchmark_group("attention");
    for &(t, h) in &[(128usize, 4usize), (1024, 4), (1024, 16)] {
        let (dqk, dv) = (48, 32);
        let q = crate::data(t * h * dqk, 1);
        let k = crate::data(t * h * dqk, 2);
        let v = crate::data(t * h * dv, 3);
        let mut out = vec![0f32; t * h * dv];
        let mut lse = vec![0f32; t * h];
        let scale = 1.0 / (dqk as f32).sqrt();
        let id = format!("T{t}_H{h}");
        let half = (t * t / 2) as u64 * h as u64;
        g.throughput(Throughput::Elements(2 * half * (dqk + dv) as u64));
        g.bench_function(BenchmarkId::new("fwd", &id), |b| {
            b.iter(|| {
                attention_forward(&ctx, &mut out, &mut lse, &q, &k, &v, t, h, dqk, dv, scale)
                    .expect("shapes")
            })
        });
        let (mut dq, mut dk, mut dvv) = (
            vec![0f32; q.len()],
            vec![0f32; k.len()],
            vec![0f32; v.len()],
        );
        g.throughput(Throughput::Elements(2 * half * (3 * dqk + 2 * dv) as u64));
        g.bench_function(BenchmarkId::new("bwd", &id), |b| {
            b.iter(|| {
                attention_backward(
                    &ctx, &mut dq, &mut dk, &mut dvv, &v, &q, &k, &v, &out, &lse, t, h, dqk, dv,
                    scale,
                )
                .expect("shapes")
            })
        });
    }
    g.finish();
}
