//! Criterion benchmark of the schedule pipeline the coordinator and planner run: generating DualPipe
//! for P = 64 ranks and N = 512 micro-batches, simulating it, and both together.
//!
//! Invariant: measures pure functions only; inputs are built once outside the timed closures.

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use plan::memory::{LayerShape, ModelShape, Precision, Sharding, estimate};
use plan::schedule::{ScheduleKind, dualpipe};
use plan::sim::{Costs, SimConfig, simulate};

fn bench(c: &mut Criterion) {
    let (p, n) = (64, 512);
    let cfg = SimConfig {
        costs: Costs::unit(),
        activation_bytes_per_stage: vec![1 << 20; p as usize],
    };
    let schedule = dualpipe(p, n).expect("valid size");
    let mut group = c.benchmark_group("dualpipe_p64_n512");
    group.sample_size(20);
    group.bench_function("generate", |b| {
        b.iter(|| dualpipe(black_box(p), black_box(n)).expect("valid size"))
    });
    group.bench_function("simulate", |b| {
        b.iter(|| simulate(black_box(&schedule), &cfg).expect("runs"))
    });
    group.bench_function("generate_and_simulate", |b| {
        b.iter(|| {
            let s = dualpipe(black_box(p), black_box(n)).expect("valid size");
            simulate(&s, &cfg).expect("runs").makespan
        })
    });
    group.finish();
}

/// What `moetrain plan` computes for DeepSeek-V3 on 2048 GPUs (P = 16, D = 128, E = 64, N = 120,
/// 61 layers): generate, simulate and estimate memory for all three schedules.
fn bench_plan(c: &mut Criterion) {
    let layer = LayerShape {
        dense_params: 200_000_000,
        expert_params: 11_000_000_000,
        activation_bytes: 900 << 20,
    };
    let shape = ModelShape {
        pre: layer,
        layers: vec![layer; 61],
        post: layer,
    };
    let sharding = Sharding {
        data: 128,
        expert: 64,
    };
    c.bench_function("plan_v3_2048_three_schedules", |b| {
        b.iter(|| {
            ScheduleKind::ALL
                .into_iter()
                .map(|kind| {
                    let e = estimate(
                        kind,
                        16,
                        120,
                        &shape,
                        Precision::v3_mixed(),
                        sharding,
                        Costs::unit(),
                    )
                    .expect("valid");
                    e.peak_rank().map_or(0, |r| r.total_bytes())
                })
                .max()
        })
    });
}

criterion_group!(benches, bench, bench_plan);
criterion_main!(benches);
