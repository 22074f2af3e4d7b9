//! The real model behind [`StageCompute`]: each stage slot of a pipeline rank is a `model::Stage`
//! with its own parameter, gradient and (ZeRO-1 sharded) AdamW state, trained with exactly the
//! step of `model::train::train_single`, distributed over pipeline × data ranks with expert
//! parallelism inside each pipeline position ([`Placement`]).
//!
//! Expert parallelism (`E > 1`): a rank holds the routed experts of its expert index in every MoE
//! layer of its slots (MTP included) and everything else in full; each slot's `Stage` exchanges
//! dispatched rows with the other `E − 1` ranks of its group through a [`PlaneExchange`] over the
//! data plane attached with [`ModelCompute::set_expert_plane`]. Since every member runs the same op
//! list, the members meet in each MoE layer's all-to-alls of the same (micro-batch, chunk) in the
//! same order. With `E = 1` no exchange exists and no expert traffic is sent.
//!
//! Step end, in order (every wait bounded by the collective timeout):
//! 1. expert loads and per-micro-batch loss terms are gathered from every rank (exact: integer
//!    counts, and f64 terms recombined in micro-batch order);
//! 2. DualPipe only: the mirror-stage gradient sum — rank `r` and rank `P − 1 − r` both hold stages
//!    `r` and `P − 1 − r`, so one all-reduce over the pair sums both stages' two direction copies;
//! 3. with MTP and more than one stage, the embedding copy of the last stage is tied to the first
//!    stage's: their gradients are summed (locally where one rank holds both, DualPipe and
//!    DualPipeV; over the pair of ranks otherwise, 1F1B);
//! 4. ZeRO-1: each slot's replicated tensors (a prefix of its flat buffer) are reduce-scattered
//!    over the data-parallel replicas, its own routed experts (the suffix) over the `D / E` ranks
//!    holding the same experts; the global gradient norm is the exact (order-independent) sum of
//!    squares of every shard, each stage, each routed expert and the tied embedding counted once;
//!    clip; AdamW on the own shards; all-gather params over the same groups;
//! 5. the routing bias of every MoE layer moves by γ·sign(mean − load) from the summed loads.
//!
//! Invariants: every holder of a stage ends the step with bit-identical parameters (mirror copies
//! and data-parallel replicas apply the same update to the same reduced gradient), and all
//! reductions use comm's fixed order, so runs are deterministic. Where a stage lives on one rank
//! and receives its micro-batches in order (1F1B, DualPipeV, no data parallelism, no MTP tie), the
//! gradients receive the same additions in the same order as the single-process trainer's, so the
//! result is bitwise identical; the mirror sum, the data-parallel sum and the tied-embedding sum
//! regroup float additions and agree to rounding.

mod checkpoint;
pub use checkpoint::{PartFile, check_rank_part};

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use comm::codec::{f32_from_bytes, f32_to_bytes};
use comm::collective::shard_range;
use std::sync::Arc;

use comm::{DataPlane, Group, Kind, Tag};
use model::ModelConfig;
use model::balance::update_routing_bias;
use model::data::{BatchKey, DataSource};
use model::exchange::stage_specs_ep;
use model::optim::{AdamW, DecayMask, StepInputs, SumSquares, clip_coefficient};
use model::params::{ParamStore, RoutingBias, StageSpec};
use model::precision::Runtime;
use model::stage::{MicroBatch, Stage};
use model::train::{InitFrom, LossTerms, TrainOptions};
use plan::schedule::{Chunk, Schedule, ScheduleKind};

use crate::error::ComputeError;
use crate::expert_exchange::{ExchangeShared, PlaneExchange};
use crate::run::{Produced, RankContext, StageCompute};

/// Where one rank sits in a pipeline × data-parallel job with expert parallelism, numbered as
/// `plan::parallel`: data-plane rank = `pipe_rank · D + replica`; the expert-parallel group of a
/// rank is the `E` replicas `replica / E · E ..` of its pipeline position, its expert index is
/// `replica % E`, and its expert-data-parallel group is the `D / E` replicas with the same index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Pipeline ranks `P`.
    pub pipeline: u32,
    /// Data-parallel replicas `D`.
    pub data: u32,
    /// Expert-parallel degree `E` (divides `D`; 1: every rank holds every routed expert).
    pub expert: u32,
    /// This rank's pipeline rank.
    pub pipe_rank: u32,
    /// This rank's data-parallel replica (`dp` in `plan::parallel`).
    pub replica: u32,
}

impl Placement {
    /// Data-plane rank of (replica, pipeline rank).
    pub fn plane_rank(&self, replica: u32, pipe_rank: u32) -> usize {
        (pipe_rank * self.data + replica) as usize
    }

    /// This rank's data-plane rank.
    pub fn rank(&self) -> usize {
        self.plane_rank(self.replica, self.pipe_rank)
    }

    /// This rank's index in its expert-parallel group (which block of routed experts it owns).
    pub fn ep_index(&self) -> u32 {
        self.replica % self.expert.max(1)
    }

    /// The data-plane ranks of this rank's expert-parallel group, by expert index.
    pub fn ep_group(&self) -> Vec<usize> {
        let e = self.expert.max(1);
        let first = self.replica / e * e;
        (first..first + e)
            .map(|r| self.plane_rank(r, self.pipe_rank))
            .collect()
    }

    /// The data-plane ranks holding the same routed experts at this pipeline position (the
    /// expert-data-parallel group), ascending.
    pub fn expert_dp_group(&self) -> Vec<usize> {
        let e = self.expert.max(1);
        (0..self.data / e)
            .map(|g| self.plane_rank(g * e + self.ep_index(), self.pipe_rank))
            .collect()
    }

    /// The data-plane ranks of this pipeline position (the data-parallel group), ascending.
    pub fn dp_group(&self) -> Vec<usize> {
        (0..self.data)
            .map(|r| self.plane_rank(r, self.pipe_rank))
            .collect()
    }

    /// The executor context of this rank.
    pub fn context(&self) -> RankContext {
        RankContext {
            pipe_rank: self.pipe_rank,
            peers: (0..self.pipeline)
                .map(|p| self.plane_rank(self.replica, p))
                .collect(),
        }
    }
}

/// The decoder layers of stage `stage` out of `stages` for a model of `layers` layers: contiguous,
/// as even as possible (the first stages take the remainder); a stage may be empty.
pub fn stage_layers(layers: usize, stages: usize, stage: usize) -> Range<usize> {
    shard_range(layers, stages, stage)
}

/// One stage slot of this rank. Its flat buffers hold the replicated tensors first (`..split`, the
/// same layout on every data-parallel replica) and then this rank's own routed experts (`split..`,
/// the same layout on its expert-data-parallel group).
struct Slot {
    stage_index: u32,
    spec: StageSpec,
    stage: Stage<f32>,
    params: ParamStore<f32>,
    grads: ParamStore<f32>,
    /// AdamW state of `shard` (replicated tensors, sharded over the data-parallel group).
    opt: AdamW,
    /// This replica's ZeRO-1 shard of the replicated prefix `..split`.
    shard: Range<usize>,
    /// AdamW state of `expert_shard` (own routed experts, sharded over the expert-data-parallel group).
    expert_opt: AdamW,
    /// This rank's ZeRO-1 shard of the expert suffix `split..` (absolute flat indices).
    expert_shard: Range<usize>,
    /// Length of the replicated prefix.
    split: usize,
    /// Whether this slot's gradient counts in the global norm (each stage once).
    canonical: bool,
    /// The flat range of a tied embedding copy to leave out of the norm (last stage with MTP).
    tied_copy: Option<Range<usize>>,
}

/// Loss terms of one (micro-batch, stage).
#[derive(Clone, Debug, PartialEq)]
struct MbLoss {
    mb: u32,
    stage: u32,
    main: f64,
    mtp: Vec<f64>,
    balance: f64,
}

/// What one step of the real model returns (identical on every rank).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelStepOutput {
    /// Loss terms of the step, means over all micro-batches of all replicas, as the single-process
    /// trainer reports them.
    pub loss: LossTerms,
    /// Global gradient norm of the micro-batch mean, before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f32,
    /// Tokens trained on by the whole job in this step.
    pub tokens: u64,
    /// Per MoE layer: this rank's own expert loads (its micro-batches and stage slots; after
    /// group-limited routing), for the coordinator to sum (issue 7).
    pub local_expert_load: Vec<(usize, Vec<u64>)>,
    /// Per MoE layer: the loads summed over every rank, or empty in [`BiasMode::External`].
    pub expert_load: Vec<(usize, Vec<u64>)>,
}

/// Who updates the routing bias after a step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BiasMode {
    /// The ranks all-gather their expert loads and each applies the same update (like the
    /// single-process trainer; the equivalence tests use it).
    #[default]
    Local,
    /// The coordinator owns the bias (issue 7): the step only reports this rank's loads, and the
    /// next step refuses to start until [`ModelCompute::set_bias`] delivered the bias versioned by
    /// the previous step.
    External,
}

/// The real model's stages on one rank (fp32 / bf16 / fp8 as `TrainOptions::precision` says).
pub struct ModelCompute {
    opts: TrainOptions,
    config: ModelConfig,
    kind: ScheduleKind,
    stages: u32,
    place: Placement,
    /// Micro-batches per replica per step (the schedule's N).
    local_mbs: u32,
    rt: Runtime,
    data: DataSource,
    bias: RoutingBias,
    slots: Vec<Slot>,
    tokens: BTreeMap<u32, model::data::TokenBatch>,
    losses: Vec<MbLoss>,
    step: u64,
    tokens_seen: u64,
    bias_mode: BiasMode,
    /// The step after which the held bias was computed (`None`: the initial bias).
    bias_version: Option<u64>,
    /// Whether an overlapped pair computes its two chunks on two threads at once.
    concurrent_pairs: bool,
    /// The plane and step the slots' expert exchanges use (unused with `E = 1`).
    exchange: Arc<ExchangeShared>,
}

/// Set in the chunk field of the expert-part ZeRO-1 collectives' tags (with `E = 1` the expert-data-
/// parallel group equals the data-parallel group, so only the tag tells the two reductions apart).
const EXPERT_CHUNK: u32 = 0x100;

fn err(msg: impl Into<String>) -> ComputeError {
    msg.into().into()
}

impl ModelCompute {
    /// Builds the stages of `place` for `schedule`, initialized exactly like `train_single` with
    /// the same options (`opts.init` must be a seed; `opts.micro_batches` must equal the schedule's
    /// micro-batches times the data-parallel replicas).
    pub fn new(
        opts: &TrainOptions,
        schedule: &Schedule,
        place: Placement,
    ) -> Result<Self, ComputeError> {
        let InitFrom::Seed(seed) = opts.init else {
            return Err(err(
                "the pipelined model compute starts from a seed (InitFrom::Seed) only",
            ));
        };
        let local_mbs = schedule.microbatches;
        if (local_mbs * place.data) as usize != opts.micro_batches {
            return Err(err(format!(
                "{} micro-batches per step, but the schedule runs {local_mbs} on each of {} replicas",
                opts.micro_batches, place.data
            )));
        }
        if place.pipe_rank >= schedule.ranks
            || place.pipeline != schedule.ranks
            || place.replica >= place.data
            || place.expert == 0
            || !place.data.is_multiple_of(place.expert)
        {
            return Err(err(format!(
                "placement {place:?} does not fit a {}-rank schedule",
                schedule.ranks
            )));
        }
        let mut config = opts.model.clone();
        if opts.mtp_depth > config.num_nextn_predict_layers {
            return Err(err(format!(
                "MTP depth {} exceeds the model's {}",
                opts.mtp_depth, config.num_nextn_predict_layers
            )));
        }
        config.num_nextn_predict_layers = opts.mtp_depth;
        let stages = schedule.stage_count();
        let tie = config.num_nextn_predict_layers > 0 && stages > 1;
        let exchange = Arc::new(ExchangeShared::default());
        let (ep_size, ep_index) = (place.expert as usize, place.ep_index() as usize);
        let ep_group = Group::new(place.ep_group())?;
        let edp = (place.data / place.expert) as usize;
        let edp_index = (place.replica / place.expert) as usize;
        let mut slots = Vec::new();
        for dir in 0..schedule.chunks_per_rank() {
            let s = schedule.stage_of(place.pipe_rank, dir);
            let spec = StageSpec {
                layers: stage_layers(config.num_hidden_layers, stages as usize, s as usize),
                first: s == 0,
                last: s + 1 == stages,
            };
            let (specs, split) = stage_specs_ep(&config, &spec, ep_size, ep_index)?;
            let mut params = ParamStore::<f32>::from_specs(specs);
            params.init_values(&config, seed);
            let stage = if ep_size > 1 {
                let x = PlaneExchange::new(exchange.clone(), ep_group.clone(), ep_index, dir);
                Stage::with_exchange(&config, spec.clone(), &params, opts.loss, Arc::new(x))?
            } else {
                Stage::new(&config, spec.clone(), &params, opts.loss)?
            };
            let grads = params.zeros_like();
            let shard = shard_range(split, place.data as usize, place.replica as usize);
            let expert_shard = shard_range(params.numel() - split, edp, edp_index);
            let expert_shard = split + expert_shard.start..split + expert_shard.end;
            let mask = DecayMask::from_layout(
                params
                    .entries()
                    .iter()
                    .map(|e| (e.offset, e.shape.as_slice())),
            );
            let opt = AdamW::new(opts.adamw, shard.clone(), &mask);
            let expert_opt = AdamW::new(opts.adamw, expert_shard.clone(), &mask);
            let canonical = schedule.kind != ScheduleKind::DualPipe || dir == 0;
            let tied_copy = if tie && spec.last {
                let e = params
                    .entries()
                    .iter()
                    .find(|e| e.name == "model.embed_tokens.weight");
                e.map(|e| e.offset..e.offset + e.len)
            } else {
                None
            };
            slots.push(Slot {
                stage_index: s,
                spec,
                stage,
                params,
                grads,
                opt,
                shard,
                expert_opt,
                expert_shard,
                split,
                canonical,
                tied_copy,
            });
        }
        Ok(Self {
            opts: opts.clone(),
            data: DataSource::open(&opts.data, config.vocab_size)?,
            bias: RoutingBias::zeros(&config),
            // Weights are prepared (packed; rounded or block-quantized in bf16/FP8) once per step.
            rt: Runtime::cpu(opts.threads, opts.precision).with_weight_cache(),
            config,
            kind: schedule.kind,
            stages,
            place,
            local_mbs,
            slots,
            tokens: BTreeMap::new(),
            losses: Vec::new(),
            step: 0,
            tokens_seen: 0,
            bias_mode: BiasMode::Local,
            bias_version: None,
            concurrent_pairs: false,
            exchange,
        })
    }

    /// Attaches the data plane the MoE layers' expert-parallel all-to-alls use (required with
    /// `E > 1`, before the first step; with `E = 1` nothing is exchanged and this is optional).
    /// `plane` must be this rank's plane; each exchange waits at most `timeout`.
    pub fn set_expert_plane(
        &mut self,
        plane: Arc<dyn DataPlane>,
        timeout: Duration,
    ) -> Result<(), ComputeError> {
        let want = self.place.rank();
        let world = (self.place.pipeline * self.place.data) as usize;
        if plane.rank() != want || plane.world_size() != world {
            return Err(err(format!(
                "the expert plane is rank {} of {}, but this placement is rank {want} of {world}",
                plane.rank(),
                plane.world_size()
            )));
        }
        self.exchange.attach(plane, timeout).map_err(err)
    }

    /// Where this rank sits.
    pub fn placement(&self) -> Placement {
        self.place
    }

    /// The parameters of every slot: (stage index, store).
    pub fn stage_params(&self) -> impl Iterator<Item = (u32, &ParamStore<f32>)> {
        self.slots.iter().map(|s| (s.stage_index, &s.params))
    }

    /// The routing biases this rank holds (all MoE layers).
    pub fn bias(&self) -> &RoutingBias {
        &self.bias
    }

    /// Runs the two halves of an overlapped pair (always different stage slots in DualPipe and
    /// DualPipeV) on two threads at once instead of one after the other. Off by default; the
    /// results are bitwise the same either way, since the halves share no mutable state.
    pub fn set_concurrent_pairs(&mut self, on: bool) {
        self.concurrent_pairs = on;
    }

    /// Chooses who updates the routing bias (default [`BiasMode::Local`]).
    pub fn set_bias_mode(&mut self, mode: BiasMode) {
        self.bias_mode = mode;
    }

    /// Installs the routing bias computed after step `after_step` ([`BiasMode::External`]); it must
    /// cover the same MoE layers and experts as the model's.
    pub fn set_bias(&mut self, after_step: u64, bias: RoutingBias) -> Result<(), ComputeError> {
        let same_shape = bias.layer_ids() == self.bias.layer_ids()
            && bias
                .iter()
                .zip(self.bias.iter())
                .all(|((_, a), (_, b))| a.len() == b.len());
        if !same_shape {
            return Err(err(format!(
                "the routing bias for step {after_step} covers layers {:?}, the model routes {:?}",
                bias.layer_ids(),
                self.bias.layer_ids()
            )));
        }
        self.bias = bias;
        self.bias_version = Some(after_step);
        Ok(())
    }

    /// This rank's expert loads since the last call, per MoE layer (in bias layer order).
    fn local_loads(&mut self) -> Result<Vec<Vec<u64>>, ComputeError> {
        let layers = self.bias.layer_ids().to_vec();
        let e = self.config.n_routed_experts;
        let mut mine = vec![vec![0u64; e]; layers.len()];
        for slot in &mut self.slots {
            for (layer, counts) in slot.stage.take_expert_load() {
                let i = layers.iter().position(|&l| l == layer).ok_or_else(|| {
                    err(format!(
                        "expert load reported for layer {layer}, which has no routing bias"
                    ))
                })?;
                for (a, c) in mine[i].iter_mut().zip(&counts) {
                    *a += c;
                }
            }
        }
        Ok(mine)
    }

    fn slot(&mut self, c: Chunk) -> Result<usize, ComputeError> {
        if usize::from(c.dir) < self.slots.len() {
            Ok(usize::from(c.dir))
        } else {
            Err(err(format!("this rank holds no chunk direction {}", c.dir)))
        }
    }

    fn global_micro(&self, mb: u32) -> u32 {
        self.place.replica * self.local_mbs + mb
    }

    fn batch(&mut self, mb: u32) -> Result<(), ComputeError> {
        if !self.tokens.contains_key(&mb) {
            let key = BatchKey {
                seed: self.opts.data_seed,
                step: self.step,
                dp_rank: 0,
                micro: self.global_micro(mb),
            };
            let b = self
                .data
                .sample(key, self.opts.micro_batch_size, self.opts.seq_len)?;
            self.tokens.insert(mb, b);
        }
        Ok(())
    }

    fn decode(bytes: Option<Vec<u8>>) -> Result<Option<Vec<f32>>, ComputeError> {
        Ok(match bytes {
            Some(b) => Some(f32_from_bytes(&b)?),
            None => None,
        })
    }

    fn encode(v: Option<Vec<f32>>) -> Produced {
        v.map(|v| f32_to_bytes(&v))
    }

    fn group(&self, ranks: Vec<usize>) -> Result<Group, ComputeError> {
        Ok(Group::new(ranks)?)
    }

    /// Every rank's bytes, in data-plane rank order (an all-gather of byte strings).
    fn all_gather_bytes(
        plane: &dyn DataPlane,
        tag: Tag,
        mine: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>, ComputeError> {
        let world = Group::world(plane.world_size())?;
        let payloads = vec![mine; world.len()];
        Ok(plane.all_to_all_v(&world, tag, payloads, timeout)?)
    }

    fn gather_losses(
        &self,
        plane: &dyn DataPlane,
        step: u64,
        timeout: Duration,
    ) -> Result<Vec<MbLoss>, ComputeError> {
        let mut bytes = Vec::new();
        for l in &self.losses {
            bytes.extend_from_slice(&l.mb.to_le_bytes());
            bytes.extend_from_slice(&l.stage.to_le_bytes());
            bytes.extend_from_slice(&(l.mtp.len() as u32).to_le_bytes());
            for v in [l.main, l.balance].iter().chain(&l.mtp) {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
        let all = Self::all_gather_bytes(
            plane,
            Tag::new(step, Kind::Control).chunk(1),
            bytes,
            timeout,
        )?;
        let mut out = Vec::new();
        for (peer, b) in all.iter().enumerate() {
            let mut r = Reader { b, at: 0, peer };
            while r.at < b.len() {
                let (mb, stage, n) = (r.u32()?, r.u32()?, r.u32()? as usize);
                let (main, balance) = (r.f64()?, r.f64()?);
                let mtp = (0..n).map(|_| r.f64()).collect::<Result<Vec<_>, _>>()?;
                out.push(MbLoss {
                    mb,
                    stage,
                    main,
                    mtp,
                    balance,
                });
            }
        }
        out.sort_by_key(|l| (l.mb, l.stage));
        Ok(out)
    }

    fn gather_loads(
        &self,
        local: &[Vec<u64>],
        plane: &dyn DataPlane,
        step: u64,
        timeout: Duration,
    ) -> Result<Vec<Vec<u64>>, ComputeError> {
        let e = self.config.n_routed_experts;
        let mine: Vec<u64> = local.concat();
        let bytes: Vec<u8> = mine.iter().flat_map(|v| v.to_le_bytes()).collect();
        let all = Self::all_gather_bytes(
            plane,
            Tag::new(step, Kind::Control).chunk(2),
            bytes,
            timeout,
        )?;
        let mut total = vec![0u64; mine.len()];
        for (peer, b) in all.iter().enumerate() {
            if b.len() != total.len() * 8 {
                return Err(err(format!(
                    "rank {peer} sent {} bytes of expert loads, expected {}",
                    b.len(),
                    total.len() * 8
                )));
            }
            for (t, c) in total.iter_mut().zip(b.chunks_exact(8)) {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                *t += u64::from_le_bytes(a);
            }
        }
        Ok(total.chunks(e.max(1)).map(<[u64]>::to_vec).collect())
    }

    /// DualPipe: sums each stage's two direction copies over the mirror pair (r, P − 1 − r).
    fn mirror_sum(
        &mut self,
        plane: &dyn DataPlane,
        step: u64,
        timeout: Duration,
    ) -> Result<(), ComputeError> {
        let p = self.place.pipeline;
        let r = self.place.pipe_rank;
        let mirror = p - 1 - r;
        let group = self.group(vec![
            self.place.plane_rank(self.place.replica, r),
            self.place.plane_rank(self.place.replica, mirror),
        ])?;
        // Both ranks lay the two stages out in stage order, so the buffers line up.
        let mut order: Vec<usize> = (0..self.slots.len()).collect();
        order.sort_by_key(|&i| self.slots[i].stage_index);
        let mut buf = Vec::new();
        for &i in &order {
            buf.extend_from_slice(self.slots[i].grads.flat());
        }
        plane.all_reduce_sum_f32(
            &group,
            Tag::new(step, Kind::MirrorGradSum),
            &mut buf,
            timeout,
        )?;
        let mut at = 0;
        for &i in &order {
            let g = self.slots[i].grads.flat_mut();
            g.copy_from_slice(&buf[at..at + g.len()]);
            at += g.len();
        }
        Ok(())
    }

    /// Sums the first stage's embedding gradient with the last stage's MTP copy.
    fn tie_embedding(
        &mut self,
        plane: &dyn DataPlane,
        step: u64,
        timeout: Duration,
    ) -> Result<(), ComputeError> {
        let name = "model.embed_tokens.weight";
        let first = self.slots.iter().position(|s| s.spec.first);
        let last = self.slots.iter().position(|s| s.spec.last);
        match (first, last) {
            (Some(f), Some(l)) => {
                let sum: Vec<f32> = {
                    let a = self.slots[f]
                        .grads
                        .get(name)
                        .ok_or_else(|| err("first stage lacks the embedding"))?;
                    let b = self.slots[l]
                        .grads
                        .get(name)
                        .ok_or_else(|| err("last stage lacks the embedding copy"))?;
                    a.iter().zip(b).map(|(x, y)| x + y).collect()
                };
                for i in [f, l] {
                    if let Some(g) = self.slots[i].grads.get_mut(name) {
                        g.copy_from_slice(&sum);
                    }
                }
                Ok(())
            }
            (None, None) => Ok(()),
            (f, _) => {
                // 1F1B: rank 0 holds the first stage, rank P − 1 the last.
                let i = f.or(last).ok_or_else(|| err("no embedding slot"))?;
                let ends = vec![
                    self.place.plane_rank(self.place.replica, 0),
                    self.place
                        .plane_rank(self.place.replica, self.place.pipeline - 1),
                ];
                let group = self.group(ends)?;
                let g = self.slots[i]
                    .grads
                    .get_mut(name)
                    .ok_or_else(|| err("stage lacks the tied embedding"))?;
                plane.all_reduce_sum_f32(
                    &group,
                    Tag::new(step, Kind::MirrorGradSum).chunk(1),
                    g,
                    timeout,
                )?;
                Ok(())
            }
        }
    }

    fn combine_losses(&self, all: &[MbLoss]) -> LossTerms {
        let n_micro = self.opts.micro_batches as f64;
        let mut loss = LossTerms::default();
        let mut i = 0;
        while i < all.len() {
            let mb = all[i].mb;
            let (mut main, mut mtp, mut balance) = (0.0, Vec::new(), 0.0);
            while i < all.len() && all[i].mb == mb {
                let l = &all[i];
                if l.stage + 1 == self.stages {
                    main = l.main;
                    mtp = l.mtp.clone();
                }
                balance += l.balance;
                i += 1;
            }
            let depth = mtp.len().max(1) as f64;
            let w = self.opts.loss.mtp_lambda / depth;
            let mtp_w = w * mtp.iter().sum::<f64>();
            loss.main += main;
            loss.mtp += mtp_w;
            loss.balance += balance;
            loss.total += main + mtp_w + balance;
        }
        loss.main /= n_micro;
        loss.mtp /= n_micro;
        loss.balance /= n_micro;
        loss.total /= n_micro;
        loss
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    peer: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], ComputeError> {
        let s = self
            .b
            .get(self.at..self.at + N)
            .ok_or_else(|| err(format!("rank {} sent a truncated loss record", self.peer)))?;
        self.at += N;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, ComputeError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn f64(&mut self) -> Result<f64, ComputeError> {
        Ok(f64::from_le_bytes(self.take()?))
    }
}

impl StageCompute for ModelCompute {
    type StepOutput = ModelStepOutput;

    fn begin_step(&mut self, step: u64) -> Result<(), ComputeError> {
        if step > 0 && self.bias_version != Some(step - 1) {
            return Err(err(format!(
                "step {step} needs the routing bias computed after step {}, but the rank holds {}",
                step - 1,
                self.bias_version.map_or_else(
                    || "the initial bias".to_string(),
                    |v| format!("the bias after step {v}")
                )
            )));
        }
        if step != self.step {
            return Err(err(format!(
                "asked to run step {step}, but the model is at step {}",
                self.step
            )));
        }
        if self.place.expert > 1 && !self.exchange.attached() {
            return Err(err(format!(
                "expert parallelism {} needs a data plane: call ModelCompute::set_expert_plane",
                self.place.expert
            )));
        }
        self.exchange.set_step(step);
        for s in &mut self.slots {
            s.grads.fill_zero();
        }
        self.tokens.clear();
        self.losses.clear();
        Ok(())
    }

    fn forward(&mut self, chunk: Chunk, input: Option<Vec<u8>>) -> Result<Produced, ComputeError> {
        let i = self.slot(chunk)?;
        self.batch(chunk.mb)?;
        let input = Self::decode(input)?;
        let batch = &self.tokens[&chunk.mb];
        // The model sees each row of T + 1 tokens as one sequence (as the single-process trainer).
        let mb = MicroBatch {
            id: u64::from(chunk.mb),
            tokens: &batch.tokens,
            b: batch.batch,
            t: batch.row_len,
            loss_scale: 1.0,
        };
        let global = self.place.replica * self.local_mbs + chunk.mb;
        let slot = &mut self.slots[i];
        let out = slot
            .stage
            .forward(&self.rt, &slot.params, &self.bias, &mb, input)?;
        self.losses.push(MbLoss {
            mb: global,
            stage: slot.stage_index,
            main: out.loss.main,
            mtp: out.loss.mtp.clone(),
            balance: out.loss.balance,
        });
        Ok(Self::encode(out.hidden))
    }

    fn backward(&mut self, chunk: Chunk, grad: Option<Vec<u8>>) -> Result<Produced, ComputeError> {
        let i = self.slot(chunk)?;
        let grad = Self::decode(grad)?;
        let slot = &mut self.slots[i];
        let out = slot.stage.backward(
            &self.rt,
            &slot.params,
            u64::from(chunk.mb),
            grad,
            &mut slot.grads,
        )?;
        Ok(Self::encode(out))
    }

    fn backward_input(
        &mut self,
        chunk: Chunk,
        grad: Option<Vec<u8>>,
    ) -> Result<Produced, ComputeError> {
        let i = self.slot(chunk)?;
        let grad = Self::decode(grad)?;
        let slot = &mut self.slots[i];
        let out = slot
            .stage
            .backward_input(&self.rt, &slot.params, u64::from(chunk.mb), grad)?;
        Ok(Self::encode(out))
    }

    fn forward_backward(
        &mut self,
        f: Chunk,
        input: Option<Vec<u8>>,
        b: Chunk,
        grad: Option<Vec<u8>>,
    ) -> Result<(Produced, Produced), ComputeError> {
        let (fi, bi) = (self.slot(f)?, self.slot(b)?);
        if !self.concurrent_pairs || fi == bi {
            let out = self.forward(f, input)?;
            let grad_in = self.backward(b, grad)?;
            return Ok((out, grad_in));
        }
        self.batch(f.mb)?;
        let input = Self::decode(input)?;
        let grad = Self::decode(grad)?;
        let global = self.place.replica * self.local_mbs + f.mb;
        let batch = &self.tokens[&f.mb];
        let mb = MicroBatch {
            id: u64::from(f.mb),
            tokens: &batch.tokens,
            b: batch.batch,
            t: batch.row_len,
            loss_scale: 1.0,
        };
        let (rt, bias) = (&self.rt, &self.bias);
        let (lo, hi) = self.slots.split_at_mut(1);
        let (fs, bs) = if fi == 0 {
            (&mut lo[0], &mut hi[0])
        } else {
            (&mut hi[0], &mut lo[0])
        };
        let b_id = u64::from(b.mb);
        let (f_out, b_out) = std::thread::scope(|s| {
            let backward = s.spawn(|| bs.stage.backward(rt, &bs.params, b_id, grad, &mut bs.grads));
            let forward = fs.stage.forward(rt, &fs.params, bias, &mb, input);
            (forward, backward.join())
        });
        let out = f_out?;
        let grad_in = b_out.map_err(|_| err(format!("the backward of {b} panicked")))??;
        self.losses.push(MbLoss {
            mb: global,
            stage: fs.stage_index,
            main: out.loss.main,
            mtp: out.loss.mtp.clone(),
            balance: out.loss.balance,
        });
        Ok((Self::encode(out.hidden), Self::encode(grad_in)))
    }

    fn backward_weight(&mut self, chunk: Chunk) -> Result<(), ComputeError> {
        let i = self.slot(chunk)?;
        let slot = &mut self.slots[i];
        slot.stage
            .backward_weight(&self.rt, u64::from(chunk.mb), &mut slot.grads)?;
        Ok(())
    }

    fn finish_step(
        &mut self,
        step: u64,
        plane: &dyn DataPlane,
        timeout: Duration,
    ) -> Result<ModelStepOutput, ComputeError> {
        let local_loads = self.local_loads()?;
        let loads = match self.bias_mode {
            BiasMode::Local => self.gather_loads(&local_loads, plane, step, timeout)?,
            BiasMode::External => Vec::new(),
        };
        let all_losses = self.gather_losses(plane, step, timeout)?;
        let expected = self.opts.micro_batches * self.stages as usize;
        if all_losses.len() != expected {
            return Err(err(format!(
                "gathered {} (micro-batch, stage) loss records, expected {expected}",
                all_losses.len()
            )));
        }
        let loss = self.combine_losses(&all_losses);
        if self.kind == ScheduleKind::DualPipe {
            self.mirror_sum(plane, step, timeout)?;
        }
        if self.config.num_nextn_predict_layers > 0 && self.stages > 1 {
            self.tie_embedding(plane, step, timeout)?;
        }
        // ZeRO-1: reduce-scatter every slot's replicated gradient over the replicas of its stage,
        // and its own experts' gradient over the ranks holding the same experts.
        let dp = self.group(self.place.dp_group())?;
        let edp = self.group(self.place.expert_dp_group())?;
        let mut shards = Vec::with_capacity(self.slots.len());
        let mut expert_shards = Vec::with_capacity(self.slots.len());
        for (i, s) in self.slots.iter().enumerate() {
            let tag = Tag::new(step, Kind::GradReduceScatter).chunk(i as u32);
            let (dense, experts) = s.grads.flat().split_at(s.split);
            shards.push(plane.reduce_scatter_sum_f32(&dp, tag, dense, timeout)?);
            expert_shards.push(if experts.is_empty() {
                Vec::new()
            } else {
                plane.reduce_scatter_sum_f32(
                    &edp,
                    tag.chunk(EXPERT_CHUNK | i as u32),
                    experts,
                    timeout,
                )?
            });
        }
        // The exact global norm: each stage once, the tied embedding copy left out, each routed
        // expert once (its expert-data-parallel shards).
        let mut sq = SumSquares::default();
        for ((s, shard), expert_shard) in self.slots.iter().zip(&shards).zip(&expert_shards) {
            if !s.canonical {
                continue;
            }
            sq.add_slice(expert_shard);
            match &s.tied_copy {
                Some(t) => {
                    let lo = t.start.clamp(s.shard.start, s.shard.end) - s.shard.start;
                    let hi = t.end.clamp(s.shard.start, s.shard.end) - s.shard.start;
                    sq.add_slice(&shard[..lo]);
                    sq.add_slice(&shard[hi..]);
                }
                None => sq.add_slice(shard),
            }
        }
        let (bins, non_finite) = sq.to_sparse();
        let mut bytes = vec![u8::from(non_finite)];
        for (e, b) in bins {
            bytes.extend_from_slice(&e.to_le_bytes());
            bytes.extend_from_slice(&b.to_le_bytes());
        }
        let all = Self::all_gather_bytes(
            plane,
            Tag::new(step, Kind::Control).chunk(3),
            bytes,
            timeout,
        )?;
        let mut total = SumSquares::default();
        for (peer, b) in all.iter().enumerate() {
            if b.is_empty() || !(b.len() - 1).is_multiple_of(18) {
                return Err(err(format!(
                    "rank {peer} sent a malformed sum of squares ({} bytes)",
                    b.len()
                )));
            }
            let bins: Vec<(u16, u128)> = b[1..]
                .chunks_exact(18)
                .map(|c| {
                    let mut e = [0u8; 2];
                    e.copy_from_slice(&c[..2]);
                    let mut v = [0u8; 16];
                    v.copy_from_slice(&c[2..]);
                    (u16::from_le_bytes(e), u128::from_le_bytes(v))
                })
                .collect();
            total.merge(&SumSquares::from_sparse(&bins, b[0] != 0));
        }
        let n_micro = self.opts.micro_batches as f64;
        let grad_norm = total.value().sqrt() / n_micro;
        let clip = clip_coefficient(grad_norm as f32, self.opts.adamw.max_grad_norm);
        if !clip.is_finite() {
            return Err(Box::new(crate::error::NonFiniteGradNorm { step }));
        }
        let lr = self.opts.lr.lr(self.step);
        let inputs = StepInputs {
            lr,
            grad_scale: (f64::from(clip) / n_micro) as f32,
        };
        for (i, ((s, shard), expert_shard)) in self
            .slots
            .iter_mut()
            .zip(&shards)
            .zip(&expert_shards)
            .enumerate()
        {
            let (range, erange, split) = (s.shard.clone(), s.expert_shard.clone(), s.split);
            let (params, opt, expert_opt) = (&mut s.params, &mut s.opt, &mut s.expert_opt);
            self.rt.exec.install(|| {
                opt.update(&mut params.flat_mut()[range.clone()], shard, inputs);
                if !erange.is_empty() {
                    expert_opt.update(&mut params.flat_mut()[erange.clone()], expert_shard, inputs);
                }
            });
            let tag = Tag::new(step, Kind::ParamAllGather).chunk(i as u32);
            let full = plane.all_gather_f32(&dp, tag, &params.flat()[range], timeout)?;
            if full.len() != split {
                return Err(err(format!(
                    "all-gathered {} replicated parameters, expected {split}",
                    full.len(),
                )));
            }
            params.flat_mut()[..split].copy_from_slice(&full);
            let n_experts = params.numel() - split;
            if n_experts > 0 {
                let tag = tag.chunk(EXPERT_CHUNK | i as u32);
                let full = plane.all_gather_f32(&edp, tag, &params.flat()[erange], timeout)?;
                if full.len() != n_experts {
                    return Err(err(format!(
                        "all-gathered {} expert parameters, expected {n_experts}",
                        full.len(),
                    )));
                }
                params.flat_mut()[split..].copy_from_slice(&full);
            }
        }
        // The parameters changed: prepared bf16/FP8 weights are stale.
        self.rt.weights_changed();
        let layers = self.bias.layer_ids().to_vec();
        if self.bias_mode == BiasMode::Local {
            let gamma = self.opts.bias_speed.gamma(self.tokens_seen);
            for (layer, load) in layers.iter().zip(&loads) {
                if let Some(b) = self.bias.get_mut(*layer) {
                    update_routing_bias(b, load, gamma, self.opts.bias_variant);
                }
            }
            self.bias_version = Some(step);
        }
        let tokens =
            (self.opts.micro_batch_size * self.opts.seq_len * self.opts.micro_batches) as u64;
        self.tokens_seen += tokens;
        self.step += 1;
        Ok(ModelStepOutput {
            loss,
            grad_norm,
            lr,
            tokens,
            local_expert_load: layers.iter().copied().zip(local_loads).collect(),
            expert_load: layers.into_iter().zip(loads).collect(),
        })
    }
}

/// Measures the wall time of one middle pipeline stage holding decoder `layers` of `opts.model`
/// (no embedding, no head) on one micro-batch of `opts`: forward, full backward, backward for
/// inputs, deferred weight gradients, and the overlapped pair as forward + full backward (this CPU
/// compute has no component-level overlap). Each value is the median of `reps` runs after one
/// warm-up, for the simulated device kind's cost table.
pub fn measure_stage_costs(
    opts: &TrainOptions,
    layers: Range<usize>,
    reps: usize,
) -> Result<crate::simulated::CostTable, ComputeError> {
    use std::time::Instant;
    let mut config = opts.model.clone();
    config.num_nextn_predict_layers = opts.mtp_depth.min(config.num_nextn_predict_layers);
    let spec = StageSpec {
        layers,
        first: false,
        last: false,
    };
    let mut params = ParamStore::<f32>::zeros_for_stage(&config, &spec);
    params.init_values(&config, 1);
    let mut grads = params.zeros_like();
    let mut stage = Stage::new(&config, spec, &params, opts.loss)?;
    let rt = Runtime::cpu(opts.threads, opts.precision);
    let bias = RoutingBias::zeros(&config);
    let data = DataSource::open(&opts.data, config.vocab_size)?;
    let batch = data.sample(
        BatchKey {
            seed: 1,
            step: 0,
            dp_rank: 0,
            micro: 0,
        },
        opts.micro_batch_size,
        opts.seq_len,
    )?;
    let n = batch.batch * batch.row_len * config.hidden_size;
    let hidden: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin()).collect();
    let grad: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.11).cos() * 1e-3).collect();
    let mb = MicroBatch {
        id: 0,
        tokens: &batch.tokens,
        b: batch.batch,
        t: batch.row_len,
        loss_scale: 1.0,
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (mut f, mut b, mut bi, mut w) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..=reps.max(1) {
        let t = Instant::now();
        stage.forward(&rt, &params, &bias, &mb, Some(hidden.clone()))?;
        let tf = t.elapsed().as_secs_f64();
        let t = Instant::now();
        stage.backward(&rt, &params, 0, Some(grad.clone()), &mut grads)?;
        let tb = t.elapsed().as_secs_f64();
        stage.forward(&rt, &params, &bias, &mb, Some(hidden.clone()))?;
        let t = Instant::now();
        stage.backward_input(&rt, &params, 0, Some(grad.clone()))?;
        let tbi = t.elapsed().as_secs_f64();
        let t = Instant::now();
        stage.backward_weight(&rt, 0, &mut grads)?;
        let tw = t.elapsed().as_secs_f64();
        if rep > 0 {
            f.push(tf);
            b.push(tb);
            bi.push(tbi);
            w.push(tw);
        }
    }
    let d = Duration::from_secs_f64;
    let (f, b) = (median(f), median(b));
    Ok(crate::simulated::CostTable {
        forward: d(f),
        backward: d(b),
        backward_input: d(median(bi)),
        weight: d(median(w)),
        overlapped: d(f + b),
    })
}
