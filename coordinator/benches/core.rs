//! Cost of the coordinator core's hot paths at 1000 workers, without network: one heartbeat
//! (what every worker sends once a second) and one tick (liveness over every worker plus the
//! scheduler with nothing pending), and the gang-scheduling decision for a 64-rank job on 1000
//! free workers. The end-to-end heartbeat load run over loopback lives with the worker's benches.

use std::hint::black_box;

use coordinator::Config;
use coordinator::core::{Core, Event, Registration, Submission};
use criterion::{Criterion, criterion_group, criterion_main};
use proto::pb;

const N_WORKERS: u32 = 1000;
const T0: u64 = 1_000_000;

fn core_with_workers() -> Core {
    let mut core = Core::new(Config::default());
    for i in 0..N_WORKERS {
        let reg = Registration {
            worker_id: format!("node{}-gpu{}", i / 8, i % 8),
            node: format!("node{}", i / 8),
            devices: vec![pb::Device {
                kind: pb::DeviceKind::Cpu as i32,
                index: i % 8,
                memory_bytes: 80 << 30,
                data_plane_addr: String::new(),
            }],
            data_plane_addr: format!("10.0.{}.{}:7000", i / 256, i % 256),
        };
        core.handle(
            Event::Register {
                reg,
                session: u64::from(i),
            },
            T0,
        )
        .expect("register");
    }
    core
}

fn bench(c: &mut Criterion) {
    let mut core = core_with_workers();
    let ids: Vec<String> = core.state.workers.keys().cloned().collect();
    let mut i = 0usize;
    c.bench_function("heartbeat/1000-workers", |b| {
        b.iter(|| {
            i = (i + 1) % ids.len();
            black_box(core.heartbeat(&ids[i], T0 + 10).expect("heartbeat"));
        })
    });
    c.bench_function("tick/1000-workers", |b| {
        b.iter(|| black_box(core.handle(Event::Tick, T0 + 100).expect("tick")))
    });
    let spec = pb::JobSpec {
        name: "j".into(),
        pipeline: 8,
        data: 8,
        expert: 8,
        schedule: "dualpipe".into(),
        micro_batches: 16,
        steps: 1,
        n_routed_experts: 256,
        n_group: 8,
        device_kind: pb::DeviceKind::Cpu as i32,
        heartbeat_interval_ms: 0,
        failure_timeout_ms: 0,
        ..Default::default()
    };
    c.bench_function("submit-and-place/64-ranks-on-1000-workers", |b| {
        b.iter_batched(
            core_with_workers,
            |mut core| {
                let sub = Submission {
                    spec: spec.clone(),
                    manifest_yaml: String::new(),
                    overrides: Vec::new(),
                    origin: String::new(),
                };
                black_box(
                    core.handle(Event::Submit(Box::new(sub)), T0 + 1)
                        .expect("submit"),
                )
            },
            criterion::BatchSize::LargeInput,
        )
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
