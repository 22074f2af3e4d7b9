//! Per-step cost of the coordinator's routing-bias ledger at DeepSeek-V3 scale (issue 7,
//! acceptance 4): 2048 ranks = DualPipe P = 16 × 128 data-parallel replicas; 61 decoder layers
//! (3 dense) + 1 MTP layer split over 16 stages, so 58 + 1 MoE layers × 256 experts; DualPipe rank
//! `r` holds stages `r` and `15 − r` (7–8 MoE layers) and reports only those.
//!
//! Measured, without network: **through the coordinator core** (acceptance 4): a running job of
//! 2048 ranks on 2048 registered workers, one step = 2048 `Event::StepReport`s (counts and bias
//! checksums, as workers send them) into `Core::handle`, ending in the 2048 `BiasUpdate` send
//! actions (each holder gets its own layers) and the finished step's progress write; and, on the
//! bare ledger: one full step of ingesting every report, summing, applying the sign rule and
//! encoding the `BiasUpdate` messages (one per distinct holder set); the same with reports
//! pre-summed by the ranks of each stage pair (8 reports); the worker-side pre-sum of one group's
//! 256 reports; and decoding 2048 `StepReport`s. Sizes are printed once.

use std::hint::black_box;

use coordinator::Config;
use coordinator::balance::{
    BalanceConfig, BiasLedger, GammaSchedule, LayerCounts, LayerHolders, UpdateVariant,
    bias_update_message, counts_from_report, presum,
};
use coordinator::core::{Action, Core, Event, Registration, Submission};
use criterion::{Criterion, criterion_group, criterion_main};
use proto::pb;

const P: u32 = 16;
const DP: u32 = 128;
const DECODER: u32 = 61;
const DENSE: u32 = 3;
const EXPERTS: usize = 256;
/// Tokens per step: 15,360 sequences × 4,096 (V3's final batch size).
const TOKENS: u64 = 15_360 * 4_096;

/// MoE layers of stage `s` (contiguous split of the decoder layers, first stages take the
/// remainder; the MTP layer, id 61, on the last stage).
fn stage_moe_layers(s: u32) -> Vec<u32> {
    let base = DECODER / P;
    let extra = DECODER % P;
    let start = s * base + s.min(extra);
    let len = base + u32::from(s < extra);
    let mut v: Vec<u32> = (start..start + len).filter(|&l| l >= DENSE).collect();
    if s == P - 1 {
        v.push(DECODER);
    }
    v
}

/// Layers a pipeline rank's two DualPipe stages route.
fn rank_layers(pipe_rank: u32) -> Vec<u32> {
    let mut v = stage_moe_layers(pipe_rank);
    v.extend(stage_moe_layers(P - 1 - pipe_rank));
    v.sort_unstable();
    v
}

fn config() -> BalanceConfig {
    BalanceConfig {
        experts: EXPERTS,
        gamma: GammaSchedule {
            rate: 1e-3,
            until_tokens: None,
        },
        variant: UpdateVariant::Sign,
        tokens_per_step: TOKENS,
        history: 16,
    }
}

/// Holders per layer for `reporter(rank) -> Option<reporter id>`.
fn holders(reporters: &[(u32, Vec<u32>)]) -> Vec<LayerHolders> {
    (DENSE..=DECODER)
        .map(|layer| LayerHolders {
            layer,
            holders: reporters
                .iter()
                .filter(|(_, ls)| ls.contains(&layer))
                .map(|(r, _)| *r)
                .collect(),
        })
        .collect()
}

/// Deterministic per-expert counts in 1,500..2,340. V3's real per-rank value is about 7,700
/// (62.9M tokens × 8 / 256 experts / 256 holders); both are 2-byte varints on the wire, and the
/// summing cost does not depend on the values.
fn counts(rank: u32, layers: &[u32]) -> Vec<LayerCounts> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(rank);
    layers
        .iter()
        .map(|&layer| LayerCounts {
            layer,
            counts: (0..EXPERTS)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    1_500 + x % 840
                })
                .collect(),
        })
        .collect()
}

/// One full step: every reporter's counts in, the bias out as encoded `BiasUpdate` bytes.
fn step(ledger: &mut BiasLedger, reports: &[(u32, Vec<LayerCounts>)], sets: &[Vec<u32>]) -> usize {
    let s = ledger.collecting();
    let mut out = None;
    for (r, c) in reports {
        out = ledger.ingest(*r, s, c).expect("valid report");
    }
    let b = out.expect("all reported");
    sets.iter()
        .map(|set| proto::encode(&bias_update_message("job", &b, Some(set))).len())
        .sum()
}

/// A core running a V3-shaped job: 2048 workers (256 nodes × 8 devices), DualPipe P = 16 × D = 128,
/// EP 8, 256 experts in 8 groups, 61 layers (3 dense) + 1 MTP layer; every rank ready.
fn running_core() -> Core {
    let mut core = Core::new(Config::default());
    let spec = pb::JobSpec {
        name: "v3".into(),
        pipeline: P,
        data: DP,
        expert: 8,
        schedule: "dualpipe".into(),
        micro_batches: 2 * P,
        steps: 1 << 40,
        n_routed_experts: EXPERTS as u32,
        n_group: 8,
        device_kind: pb::DeviceKind::Cpu as i32,
        balance: Some(pb::BalanceSpec {
            num_hidden_layers: DECODER,
            first_k_dense_replace: DENSE,
            moe_layer_freq: 1,
            mtp_depth: 1,
            rate: 1e-3,
            stop_after_tokens: None,
            subtract_mean: false,
            tokens_per_step: TOKENS,
        }),
        ..Default::default()
    };
    let sub = Submission {
        spec,
        manifest_yaml: String::new(),
        overrides: Vec::new(),
        origin: "bench".into(),
    };
    core.handle(Event::Submit(Box::new(sub)), 1)
        .expect("submit");
    for i in 0..P * DP {
        let reg = Registration {
            worker_id: format!("n{}-d{}", i / 8, i % 8),
            node: format!("n{}", i / 8),
            devices: vec![pb::Device {
                kind: pb::DeviceKind::Cpu as i32,
                index: i % 8,
                memory_bytes: 80 << 30,
                data_plane_addr: String::new(),
            }],
            data_plane_addr: format!("10.{}.{}.1:7000", i / 256, i % 256),
        };
        core.handle(
            Event::Register {
                reg,
                session: u64::from(i),
            },
            2,
        )
        .expect("register");
    }
    let held: Vec<(String, u32)> = core
        .state
        .workers
        .iter()
        .flat_map(|(id, w)| w.stored.held.iter().map(move |h| (id.clone(), h.rank)))
        .collect();
    assert_eq!(held.len(), (P * DP) as usize, "every rank placed");
    for (worker, rank) in held {
        core.handle(
            Event::Ack {
                worker,
                job: "v3".into(),
                rank,
                ready: true,
                reason: String::new(),
            },
            3,
        )
        .expect("ack");
    }
    assert_eq!(
        core.state.jobs["v3"].phase(),
        pb::JobPhase::Running,
        "every rank ready"
    );
    core
}

/// The 2048 step-report events of the core's current step, as the workers would send them (the
/// checksum of the bias each holds, its own counts).
fn core_step_events(core: &Core, holders: &[(String, u32, Vec<u32>)]) -> Vec<Event> {
    let ledger = core.runtime["v3"].ledger.as_ref().expect("ledger");
    let step = ledger.collecting();
    holders
        .iter()
        .map(|(worker, rank, layers)| Event::StepReport {
            worker: worker.clone(),
            report: Box::new(pb::StepReport {
                job: "v3".into(),
                rank: *rank,
                step,
                losses: vec![pb::LossTerm {
                    name: "total".into(),
                    value: 2.0,
                }],
                tokens: TOKENS,
                step_seconds: 10.0,
                expert_counts: counts(*rank, layers)
                    .into_iter()
                    .map(|lc| pb::ExpertCounts {
                        layer: lc.layer,
                        counts: lc.counts,
                    })
                    .collect(),
                bias_step: ledger.version().unwrap_or(0),
                bias_checksum: ledger.expected_rank_checksum(*rank).expect("holder"),
                ..Default::default()
            }),
        })
        .collect()
}

/// Feeds one step's events; returns the number of `BiasUpdate` sends and their layers in total.
fn core_step(core: &mut Core, events: Vec<Event>) -> (usize, usize) {
    let mut updates = (0, 0);
    for e in events {
        for a in core.handle(e, 10).expect("report") {
            if let Action::Send { msg, .. } = a
                && let Some(pb::coordinator_message::Msg::BiasUpdate(u)) = msg.msg
            {
                updates.0 += 1;
                updates.1 += u.layers.len();
            }
        }
    }
    updates
}

fn bench_core(c: &mut Criterion) {
    let t = std::time::Instant::now();
    let mut core = running_core();
    println!(
        "core: 2048-rank V3 job registered, placed and running in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let placement = core.state.jobs["v3"]
        .stored
        .placement
        .clone()
        .expect("placed");
    let ledger = core.runtime["v3"].ledger.as_ref().expect("ledger");
    assert_eq!(ledger.layers().len(), 59, "58 MoE layers + 1 MTP");
    let holders: Vec<(String, u32, Vec<u32>)> = placement
        .ranks
        .iter()
        .map(|r| (r.worker_id.clone(), r.rank, ledger.layers_of(r.rank)))
        .collect();
    let events = core_step_events(&core, &holders);
    let (n, layers) = core_step(&mut core, events);
    assert_eq!(n, 2048, "every holder gets the new bias");
    assert_eq!(
        core.state.jobs["v3"]
            .stored
            .progress
            .as_ref()
            .map(|p| p.step),
        Some(1)
    );
    println!("core: one step sends {n} BiasUpdate messages with {layers} layer biases in total");
    let mut g = c.benchmark_group("balance_v3_core");
    g.sample_size(10);
    g.bench_function("core_step_2048_reports_to_2048_bias_updates", |b| {
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            for _ in 0..iters {
                let events = core_step_events(&core, &holders);
                let t = std::time::Instant::now();
                black_box(core_step(&mut core, events));
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    let ranks: Vec<(u32, Vec<u32>)> = (0..P * DP).map(|r| (r, rank_layers(r % P))).collect();
    let reports: Vec<(u32, Vec<LayerCounts>)> =
        ranks.iter().map(|(r, ls)| (*r, counts(*r, ls))).collect();
    // Distinct holder sets: pipeline ranks r and 15 − r hold the same two stages.
    let groups: Vec<u32> = (0..P / 2).collect();
    let sets: Vec<Vec<u32>> = groups.iter().map(|&g| rank_layers(g)).collect();
    let mut full = BiasLedger::new(config(), &holders(&ranks)).expect("config");
    // Pre-summed: one report per stage pair (the 256 ranks holding stages g and 15 − g).
    let group_members = |g: u32| -> Vec<usize> {
        (0..P * DP)
            .filter(|r| {
                let p = r % P;
                p == g || p == P - 1 - g
            })
            .map(|r| r as usize)
            .collect()
    };
    let presummed: Vec<(u32, Vec<LayerCounts>)> = groups
        .iter()
        .map(|&g| {
            let members: Vec<&[LayerCounts]> = group_members(g)
                .into_iter()
                .map(|i| reports[i].1.as_slice())
                .collect();
            (g, presum(&members).expect("same layers"))
        })
        .collect();
    let group_ranks: Vec<(u32, Vec<u32>)> = groups.iter().map(|&g| (g, rank_layers(g))).collect();
    let mut grouped = BiasLedger::new(config(), &holders(&group_ranks)).expect("config");

    // Sizes and a consistency check (same bias either way), printed once.
    let wire: Vec<Vec<u8>> = reports
        .iter()
        .map(|(r, c)| {
            proto::encode(&pb::StepReport {
                rank: *r,
                step: 0,
                expert_counts: c
                    .iter()
                    .map(|lc| pb::ExpertCounts {
                        layer: lc.layer,
                        counts: lc.counts.clone(),
                    })
                    .collect(),
                ..Default::default()
            })
        })
        .collect();
    let in_bytes: usize = wire.iter().map(Vec::len).sum();
    let presum_in: usize = presummed
        .iter()
        .map(|(g, c)| {
            proto::encode(&pb::StepReport {
                rank: *g,
                expert_counts: c
                    .iter()
                    .map(|lc| pb::ExpertCounts {
                        layer: lc.layer,
                        counts: lc.counts.clone(),
                    })
                    .collect(),
                ..Default::default()
            })
            .len()
        })
        .sum();
    let out_one = step(&mut full, &reports, &sets);
    let out_two = step(&mut grouped, &presummed, &sets);
    assert_eq!(out_one, out_two);
    for l in full.layers() {
        assert_eq!(
            full.bias(*l),
            grouped.bias(*l),
            "pre-summing changes no bit"
        );
    }
    let per_rank_layers: Vec<usize> = (0..P).map(|p| rank_layers(p).len()).collect();
    println!(
        "V3 shape: {} MoE layers (MTP incl.) x {EXPERTS} experts, {} ranks, MoE layers per rank {:?}",
        full.layers().len(),
        ranks.len(),
        per_rank_layers
    );
    println!(
        "per step: counts in {:.2} MB from {} reports (pre-summed: {:.3} MB from {}); bias out {} KB in {} distinct messages ({:.1} MB if every rank is sent its own)",
        in_bytes as f64 / 1e6,
        reports.len(),
        presum_in as f64 / 1e6,
        presummed.len(),
        out_one / 1000,
        sets.len(),
        out_one as f64 / sets.len() as f64 * f64::from(P * DP) / 1e6,
    );

    let mut g = c.benchmark_group("balance_v3");
    g.sample_size(20);
    g.bench_function("step_2048_ranks_ingest_sum_update_encode", |b| {
        b.iter(|| black_box(step(&mut full, &reports, &sets)))
    });
    g.bench_function("step_8_presummed_reports_ingest_sum_update_encode", |b| {
        b.iter(|| black_box(step(&mut grouped, &presummed, &sets)))
    });
    let members: Vec<&[LayerCounts]> = group_members(0)
        .into_iter()
        .map(|i| reports[i].1.as_slice())
        .collect();
    g.bench_function("worker_presum_256_reports_one_group", |b| {
        b.iter(|| black_box(presum(&members).expect("same layers")))
    });
    g.bench_function("decode_2048_step_reports", |b| {
        b.iter(|| {
            let mut n = 0usize;
            for w in &wire {
                let r: pb::StepReport = proto::decode("step report", w).expect("valid");
                n += counts_from_report(&r).len();
            }
            black_box(n)
        })
    });
    g.finish();
}

criterion_group!(benches, bench_core, bench);
criterion_main!(benches);
