//! Criterion benchmark of `plan::placement::place` at DeepSeek-V3 scale (issue 2, acceptance 5):
//! 2048 devices in 256 nodes × 8, pipeline 16, data 128, expert 64, DualPipe, 256 experts in 8
//! groups; and the same placement followed by `Placement::verify`.
//!
//! Invariant: the benchmarked placement is verified once before timing starts.

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use plan::parallel::ParallelConfig;
use plan::placement::{ExpertLayout, PlacementRequest, place};
use plan::schedule::ScheduleKind;
use plan::topology::Cluster;

fn v3_request() -> PlacementRequest {
    PlacementRequest {
        parallel: ParallelConfig {
            pipeline: 16,
            data: 128,
            expert: 64,
        },
        schedule: ScheduleKind::DualPipe,
        experts: ExpertLayout {
            n_routed_experts: 256,
            n_group: 8,
        },
    }
}

fn bench_place(c: &mut Criterion) {
    let req = v3_request();
    let cluster = Cluster::uniform("node-", 256, 8);
    let placement = match place(&req, &cluster) {
        Ok(placement) => placement,
        Err(err) => panic!("V3 placement failed: {err}"),
    };
    if let Err(err) = placement.verify(&req, &cluster) {
        panic!("V3 placement breaks its rules: {err}");
    }
    c.bench_function("place_v3_2048_devices", |b| {
        b.iter(|| place(black_box(&req), black_box(&cluster)))
    });
    c.bench_function("place_and_verify_v3_2048_devices", |b| {
        b.iter(|| {
            let placement = place(black_box(&req), black_box(&cluster));
            placement.map(|p| p.verify(&req, &cluster).is_ok())
        })
    });
}

criterion_group!(benches, bench_place);
criterion_main!(benches);
