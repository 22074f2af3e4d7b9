//! Bench binary: step wall time of DualPipe, DualPipeV and 1F1B on SIMULATED devices (test mode:
//! ops sleep for their cost, payloads are placeholders of the real activation size, the executor
//! and the data plane are real), 32 ranks in this process (pipeline 4 × data 8 and pipeline 8 ×
//! data 4), over the in-process plane and over TCP on loopback, against `plan::sim`'s prediction
//! with the same costs. The costs are measured from the real `tiny` model (one MoE decoder layer
//! per 1F1B/DualPipe stage; a DualPipeV stage is half of one since it cuts the model into 2P
//! stages), then uniformly dilated so that a forward lasts at least `MIN_FORWARD` (sleep
//! granularity), which scales the prediction by the same factor.
//!
//! Run: `cargo bench -p executor --bench pipeline` (add `-- --quick` for one step per row).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use comm::{DataPlane, Group, Kind, LocalDataPlane, Tag, TcpBinding, TcpConfig};
use executor::inprocess::train_with_planes;
use executor::model_compute::measure_stage_costs;
use executor::{CostTable, RankContext, SimulatedCompute, Timeouts, run_step};
use model::ModelConfig;
use model::balance::BiasUpdateVariant;
use model::data::{DataSpec, SyntheticSpec};
use model::loss::LossWeights;
use model::lr::{BiasSpeedSchedule, LrSchedule};
use model::optim::AdamWConfig;
use model::precision::Precision;
use model::train::{InitFrom, TrainOptions};
use plan::schedule::ScheduleKind;
use plan::sim::{SimConfig, simulate};

const WORLD: u32 = 32;
const MIN_FORWARD: Duration = Duration::from_millis(25);

fn tiny_options() -> TrainOptions {
    let model = ModelConfig::preset("tiny").expect("the tiny preset exists");
    TrainOptions {
        mtp_depth: 0,
        model,
        init: InitFrom::Seed(1),
        steps: 1,
        seq_len: 32,
        micro_batch_size: 1,
        micro_batches: 1,
        precision: Precision::Fp32,
        threads: 1,
        adamw: AdamWConfig::default(),
        lr: LrSchedule {
            peak: 1e-3,
            floor: 1e-4,
            warmup_steps: 0,
            total_steps: 1,
        },
        loss: LossWeights::default(),
        bias_speed: BiasSpeedSchedule {
            rate: 1e-3,
            until_tokens: None,
        },
        bias_variant: BiasUpdateVariant::Sign,
        data: DataSpec::Synthetic(SyntheticSpec::default()),
        data_seed: 1,
        checkpoint_dir: None,
        checkpoint_interval: 0,
        job: serde_json::Value::Null,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Transport {
    Local,
    Tcp,
}

fn planes(world: usize, transport: Transport) -> Vec<Box<dyn DataPlane>> {
    match transport {
        Transport::Local => LocalDataPlane::create(world)
            .into_iter()
            .map(|p| Box::new(p) as Box<dyn DataPlane>)
            .collect(),
        Transport::Tcp => {
            let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
            let bindings: Vec<TcpBinding> = (0..world)
                .map(|_| TcpBinding::bind(any, TcpConfig::default()).expect("bind on loopback"))
                .collect();
            let addrs: Vec<SocketAddr> = bindings.iter().map(TcpBinding::local_addr).collect();
            bindings
                .into_iter()
                .enumerate()
                .map(|(r, b)| {
                    Box::new(b.start(r, addrs.clone()).expect("start the TCP plane"))
                        as Box<dyn DataPlane>
                })
                .collect()
        }
    }
}

/// Runs `steps` steps of `kind` on `pipeline × (WORLD / pipeline)` simulated ranks; returns the
/// per-step time (the slowest rank's pipeline time).
fn run(
    kind: ScheduleKind,
    pipeline: u32,
    microbatches: u32,
    costs: CostTable,
    activation_bytes: usize,
    transport: Transport,
    steps: u64,
) -> Vec<f64> {
    let schedule = kind
        .generate(pipeline, microbatches)
        .expect("valid schedule size");
    let world = WORLD as usize;
    let planes = planes(world, transport);
    let timeouts = Timeouts {
        recv: Duration::from_secs(60),
        collective: Duration::from_secs(60),
    };
    let per_rank: Vec<Vec<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = planes
            .iter()
            .enumerate()
            .map(|(rank, plane)| {
                let schedule = &schedule;
                s.spawn(move || {
                    // Ranks are numbered as plan::parallel: pipe_rank · D + replica.
                    let data = WORLD / pipeline;
                    let pipe_rank = rank as u32 / data;
                    let replica = rank as u32 % data;
                    let ctx = RankContext {
                        pipe_rank,
                        peers: (0..pipeline)
                            .map(|p| (p * data + replica) as usize)
                            .collect(),
                    };
                    let mut compute =
                        SimulatedCompute::new(schedule, pipe_rank, costs, activation_bytes);
                    let world_group = Group::world(world).expect("world group");
                    let mut times = Vec::new();
                    for step in 0..steps {
                        plane
                            .barrier(
                                &world_group,
                                Tag::new(step, Kind::Barrier),
                                Duration::from_secs(60),
                            )
                            .expect("barrier");
                        let ops = &schedule.ops[pipe_rank as usize];
                        let rep =
                            run_step(ops, &ctx, &mut compute, plane.as_ref(), step, &timeouts)
                                .unwrap_or_else(|e| panic!("{e}"));
                        times.push(rep.pipeline_s);
                    }
                    times
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });
    for p in &planes {
        p.shutdown();
    }
    (0..steps as usize)
        .map(|s| per_rank.iter().map(|t| t[s]).fold(0.0, f64::max))
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let steps = if quick { 1 } else { 3 };
    let opts = tiny_options();
    let measured =
        measure_stage_costs(&opts, 1..2, 9).expect("measuring the tiny model's stage costs");
    let dilation = (MIN_FORWARD.as_secs_f64() / measured.forward.as_secs_f64()).max(1.0);
    let base = measured.scaled(dilation);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "measured tiny stage (1 MoE layer, micro-batch 1x{}): F {:.3} ms, B {:.3} ms, I {:.3} ms, W {:.3} ms, F&B {:.3} ms; dilation x{dilation:.2}",
        opts.seq_len,
        ms(measured.forward),
        ms(measured.backward),
        ms(measured.backward_input),
        ms(measured.weight),
        ms(measured.overlapped)
    );
    let activation_bytes = opts.micro_batch_size * (opts.seq_len + 1) * opts.model.hidden_size * 4;
    println!(
        "activation payload {activation_bytes} bytes; {WORLD} ranks per run; median of {steps} step(s)"
    );
    println!("| schedule  | P | DP | N  | plane | predicted ms | measured ms | error  |");
    println!("|-----------|---|----|----|-------|--------------|-------------|--------|");
    let mut worst: f64 = 0.0;
    for pipeline in [4u32, 8] {
        let n = 4 * pipeline;
        for kind in ScheduleKind::ALL {
            let costs = if kind == ScheduleKind::DualPipeV {
                base.scaled(0.5)
            } else {
                base
            };
            let schedule = kind.generate(pipeline, n).expect("valid schedule size");
            let predicted = simulate(&schedule, &SimConfig::with_costs(costs.to_sim_costs()))
                .expect("schedule simulates")
                .makespan;
            for transport in [Transport::Local, Transport::Tcp] {
                let measured = median(run(
                    kind,
                    pipeline,
                    n,
                    costs,
                    activation_bytes,
                    transport,
                    steps,
                ));
                let err = (measured - predicted) / predicted;
                worst = worst.max(err.abs());
                println!(
                    "| {:<9} | {pipeline} | {:<2} | {n:<2} | {:<5} | {:>12.1} | {:>11.1} | {:>+5.1}% |",
                    kind.name(),
                    WORLD / pipeline,
                    if transport == Transport::Local {
                        "local"
                    } else {
                        "tcp"
                    },
                    predicted * 1e3,
                    measured * 1e3,
                    err * 100.0
                );
            }
        }
    }
    println!("worst |error| {:.1}% (target 10%)", worst * 100.0);
    real_pair_overlap();
}

/// Real compute: the tiny model under DualPipe (pipeline 2, 8 micro-batches, fp32, in-process
/// plane), with the two halves of each overlapped pair computed one after the other vs on two
/// threads at once.
fn real_pair_overlap() {
    let mut opts = tiny_options();
    opts.steps = 2;
    opts.micro_batches = 8;
    let timeouts = Timeouts {
        recv: Duration::from_secs(120),
        collective: Duration::from_secs(120),
    };
    for concurrent in [false, true] {
        let planes = LocalDataPlane::create(2);
        let start = std::time::Instant::now();
        let ranks = train_with_planes(
            &opts,
            ScheduleKind::DualPipe,
            2,
            1,
            1,
            planes,
            timeouts,
            concurrent,
        )
        .expect("in-process DualPipe run");
        let per_step = start.elapsed().as_secs_f64() / opts.steps as f64;
        let pairs: f64 = ranks
            .iter()
            .flat_map(|r| &r.timings)
            .map(|t| t.overlapped.seconds)
            .sum();
        let count: u32 = ranks
            .iter()
            .flat_map(|r| &r.timings)
            .map(|t| t.overlapped.count)
            .sum();
        println!(
            "real tiny DualPipe P=2 N=8: pairs {}: {:.1} ms per step (incl. setup), mean F&B pair {:.1} ms",
            if concurrent {
                "concurrent"
            } else {
                "sequential"
            },
            per_step * 1e3,
            pairs / f64::from(count.max(1)) * 1e3
        );
    }
}
