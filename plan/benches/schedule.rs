//! Criterion benchmark of the schedule pipeline the coordinator and planner run: generating DualPipe
//! for P = 64 ranks and N = 512 micro-batches, simulating it, and both together.
//!
//! Invariant: measures pure functions only; inputs are built once outside the timed closures.

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use plan::schedule::dualpipe;
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

criterion_group!(benches, bench);
criterion_main!(benches);
