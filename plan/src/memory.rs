//! Per-rank memory estimate of a pipeline-parallel job: parameters (both stages for DualPipe and
//! DualPipeV), gradients, ZeRO-1 optimizer shards and the activations alive at the schedule's simulated
//! peak, from a small pure description of the model (`ModelShape`).
//!
//! Invariant: every byte counted is attributable: `total = params + grads + optimizer + activations`,
//! each term is a sum over the stages the rank holds (`Schedule::stage_of`), and the activation term is
//! the simulator's peak of live chunks weighted by each stage's bytes per micro-batch. Nothing here
//! guesses workspace, fragmentation or communication buffers; the planner shows that as headroom.

use std::ops::Range;

use crate::schedule::{Schedule, ScheduleError, ScheduleKind};
use crate::sim::{Costs, SimConfig, SimError, SimReport, simulate};

/// Parameters and activations of one model block (a transformer layer, or the embedding / head).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerShape {
    /// Parameters replicated on every data-parallel rank of the stage (attention, dense FFN, shared
    /// experts, router, norms, embedding, head).
    pub dense_params: u64,
    /// Routed-expert parameters, spread over the expert-parallel ranks.
    pub expert_params: u64,
    /// Bytes of activations one micro-batch keeps alive for the backward of this block.
    pub activation_bytes: u64,
}

/// The model as the memory estimate sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelShape {
    /// Blocks before the first layer (embedding), always on stage 0.
    pub pre: LayerShape,
    /// The transformer layers, split contiguously over the stages.
    pub layers: Vec<LayerShape>,
    /// Blocks after the last layer (final norm, head, MTP modules), always on the last stage.
    pub post: LayerShape,
}

/// Bytes per parameter of each kind of state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Precision {
    /// Working weights (BF16: 2).
    pub weight_bytes: f64,
    /// Weight gradients, accumulated over the step's micro-batches (FP32: 4).
    pub grad_bytes: f64,
    /// Optimizer state per parameter before ZeRO-1 sharding (FP32 master + two BF16 AdamW moments: 8).
    pub optimizer_bytes: f64,
}

impl Precision {
    /// DeepSeek-V3's recipe (v3-spec §4.4): BF16 weights, FP32 gradients, FP32 master weights and BF16
    /// AdamW moments.
    pub fn v3_mixed() -> Self {
        Self {
            weight_bytes: 2.0,
            grad_bytes: 4.0,
            optimizer_bytes: 8.0,
        }
    }

    /// Everything in FP32: weights are the master copy, AdamW moments in FP32.
    pub fn fp32() -> Self {
        Self {
            weight_bytes: 4.0,
            grad_bytes: 4.0,
            optimizer_bytes: 8.0,
        }
    }
}

/// Data and expert degrees the state is sharded over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sharding {
    /// Data-parallel degree `D`: ZeRO-1 shards the dense optimizer state over it.
    pub data: u32,
    /// Expert-parallel degree `E` (divides `D`): routed experts are split over it, and their optimizer
    /// state over the `D / E` expert-data-parallel ranks, i.e. `1 / D` of it per rank.
    pub expert: u32,
}

/// Why an estimate could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    /// The schedule cannot be generated for these sizes.
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// The schedule does not run (a bug in a generator, never expected).
    #[error(transparent)]
    Sim(#[from] SimError),
    /// The model has fewer layers than the schedule has stages.
    #[error(
        "{kind} with {ranks} ranks needs {stages} stages but the model has only {layers} layers"
    )]
    TooFewLayers {
        /// The schedule kind.
        kind: ScheduleKind,
        /// Pipeline ranks.
        ranks: u32,
        /// Stages needed.
        stages: u32,
        /// Layers available.
        layers: usize,
    },
    /// The sharding degrees are zero or `E` does not divide `D`.
    #[error(
        "invalid sharding: data {data}, expert {expert} (both at least 1, expert must divide data)"
    )]
    Sharding {
        /// Data degree.
        data: u32,
        /// Expert degree.
        expert: u32,
    },
}

/// Memory of one pipeline rank (every data-parallel replica of it is the same).
#[derive(Clone, Debug, PartialEq)]
pub struct RankMemory {
    /// Pipeline rank.
    pub rank: u32,
    /// Stages held, module 0 first.
    pub stages: Vec<u32>,
    /// Working weights.
    pub params_bytes: u64,
    /// Weight gradients.
    pub grad_bytes: u64,
    /// ZeRO-1 optimizer shard.
    pub optimizer_bytes: u64,
    /// Activations at the simulated peak.
    pub activation_bytes: u64,
    /// The simulated peak in chunks (micro-batch × stage units).
    pub peak_live_chunks: u32,
    /// Idle time of the rank in the step (simulator units).
    pub idle: f64,
}

impl RankMemory {
    /// Sum of all terms.
    pub fn total_bytes(&self) -> u64 {
        self.params_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes
    }
}

/// A schedule's estimate: timing from the simulator and memory per pipeline rank.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleEstimate {
    /// The schedule kind.
    pub kind: ScheduleKind,
    /// Pipeline ranks.
    pub ranks: u32,
    /// Micro-batches per step.
    pub microbatches: u32,
    /// Layers of each stage.
    pub stage_layers: Vec<Range<usize>>,
    /// Simulated step time.
    pub makespan: f64,
    /// Largest per-rank idle time.
    pub max_idle: f64,
    /// Idle share of the step over all ranks.
    pub bubble_fraction: f64,
    /// One entry per pipeline rank.
    pub per_rank: Vec<RankMemory>,
}

impl ScheduleEstimate {
    /// The rank with the largest total (the lowest such rank on ties).
    pub fn peak_rank(&self) -> Option<&RankMemory> {
        self.per_rank.iter().rev().max_by_key(|r| r.total_bytes())
    }
}

/// Splits `layers` layers into `stages` contiguous ranges as evenly as possible. The remainder goes to
/// the inner stages first (stage 0 holds the embedding and the last stage the head and MTP), then to
/// the two end stages.
pub fn split_layers(layers: usize, stages: u32) -> Vec<Range<usize>> {
    let s = stages as usize;
    if s == 0 {
        return Vec::new();
    }
    let base = layers / s;
    let mut extra = vec![0usize; s];
    let order: Vec<usize> = (1..s.saturating_sub(1)).chain([0, s - 1]).collect();
    for &i in order.iter().take(layers % s) {
        extra[i] += 1;
    }
    let mut start = 0;
    extra
        .into_iter()
        .map(|e| {
            let r = start..start + base + e;
            start = r.end;
            r
        })
        .collect()
}

/// Per-stage sums of a model shape.
fn stage_sums(shape: &ModelShape, ranges: &[Range<usize>]) -> Vec<LayerShape> {
    let last = ranges.len().saturating_sub(1);
    ranges
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut sum = LayerShape::default();
            let mut add = |l: &LayerShape| {
                sum.dense_params += l.dense_params;
                sum.expert_params += l.expert_params;
                sum.activation_bytes += l.activation_bytes;
            };
            if i == 0 {
                add(&shape.pre);
            }
            shape.layers[r.clone()].iter().for_each(&mut add);
            if i == last {
                add(&shape.post);
            }
            sum
        })
        .collect()
}

/// Generates and simulates the `kind` schedule for `(ranks, microbatches)` and estimates each pipeline
/// rank's memory for `shape` under `precision` and `sharding`, with `costs` for the timing.
pub fn estimate(
    kind: ScheduleKind,
    ranks: u32,
    microbatches: u32,
    shape: &ModelShape,
    precision: Precision,
    sharding: Sharding,
    costs: Costs,
) -> Result<ScheduleEstimate, MemoryError> {
    if sharding.data == 0 || sharding.expert == 0 || !sharding.data.is_multiple_of(sharding.expert)
    {
        return Err(MemoryError::Sharding {
            data: sharding.data,
            expert: sharding.expert,
        });
    }
    let schedule = kind.generate(ranks, microbatches)?;
    let stages = kind.stage_count(ranks);
    if shape.layers.len() < stages as usize {
        return Err(MemoryError::TooFewLayers {
            kind,
            ranks,
            stages,
            layers: shape.layers.len(),
        });
    }
    let ranges = split_layers(shape.layers.len(), stages);
    let sums = stage_sums(shape, &ranges);
    let cfg = SimConfig {
        costs,
        activation_bytes_per_stage: sums.iter().map(|s| s.activation_bytes).collect(),
    };
    let report = simulate(&schedule, &cfg)?;
    let per_rank = rank_memory(&schedule, &report, &sums, precision, sharding);
    Ok(ScheduleEstimate {
        kind,
        ranks,
        microbatches,
        stage_layers: ranges,
        makespan: report.makespan,
        max_idle: report.max_idle(),
        bubble_fraction: report.bubble_fraction(),
        per_rank,
    })
}

fn rank_memory(
    schedule: &Schedule,
    report: &SimReport,
    sums: &[LayerShape],
    p: Precision,
    sh: Sharding,
) -> Vec<RankMemory> {
    let bytes = |params: f64, per: f64| (params * per).round() as u64;
    (0..schedule.ranks)
        .map(|r| {
            let stages: Vec<u32> = (0..schedule.chunks_per_rank())
                .map(|d| schedule.stage_of(r, d))
                .collect();
            let (mut local, mut sharded) = (0.0, 0.0);
            for &s in &stages {
                let st = &sums[s as usize];
                // Weights and gradients: all dense parameters, this rank's 1/E of the routed experts.
                local += st.dense_params as f64 + st.expert_params as f64 / f64::from(sh.expert);
                // ZeRO-1: dense state over D; expert state over E × (D / E) = D ranks as well.
                sharded += (st.dense_params as f64 + st.expert_params as f64) / f64::from(sh.data);
            }
            let rep = &report.ranks[r as usize];
            RankMemory {
                rank: r,
                stages,
                params_bytes: bytes(local, p.weight_bytes),
                grad_bytes: bytes(local, p.grad_bytes),
                optimizer_bytes: bytes(sharded, p.optimizer_bytes),
                activation_bytes: rep.peak_live_bytes,
                peak_live_chunks: rep.peak_live_chunks,
                idle: rep.idle,
            }
        })
        .collect()
}
