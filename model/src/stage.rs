//! A pipeline stage: a contiguous range of decoder layers, plus the embedding on the first stage and the
//! final norm, head and MTP modules on the last. Forward and backward work on one micro-batch (B
//! sequences × T tokens) at a time, and the stage keeps each micro-batch's saved activations and deferred
//! weight-gradient jobs keyed by its id, so a pipeline schedule can interleave micro-batches freely.
//!
//! With expert parallelism ([`Stage::with_exchange`]) the stage holds only its member's block of every
//! MoE layer's routed experts (MTP blocks included) and its MoE layers exchange rows with the other
//! members of the group inside `forward` and `backward_input`, keyed by the micro-batch id; every member
//! must run the same micro-batches through the same calls in the same order.
//!
//! Invariants: `backward_input` for a micro-batch needs its `forward` first and consumes its saved state;
//! `backward_weight` needs its `backward_input` first and consumes its jobs. `backward` (fused) gives the
//! same gradient bits as `backward_input` followed by `backward_weight`. Gradients accumulate (+=) into the
//! caller's store; the caller zeroes it at the start of a step.

use crate::exchange::{EpCall, ExpertExchange, check_split, local_experts};
use crate::layers::decoder::Head;
use crate::layers::decoder::{DecoderLayer, HeadSaved, LayerSaved, MtpModule, MtpSaved};
use crate::layers::norm::Embedding;
use crate::layers::{WJob, WSink, run_wjobs};
use crate::loss::{LossTerms, LossWeights, mean_ce, shifted_targets};
use crate::params::{ParamStore, RoutingBias, StageSpec};
use crate::precision::Runtime;
use crate::{ModelConfig, ModelError, Result};
use kernels::Real;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// One micro-batch as a stage sees it.
#[derive(Debug, Clone, Copy)]
pub struct MicroBatch<'a> {
    /// Caller-chosen id, unique among micro-batches in flight on this stage.
    pub id: u64,
    /// Token ids [b, t]: needed by the first stage (embedding) and the last (targets, MTP); middle stages
    /// accept an empty slice.
    pub tokens: &'a [u32],
    /// Sequences.
    pub b: usize,
    /// Tokens per sequence.
    pub t: usize,
    /// Factor applied to this micro-batch's loss gradient (e.g. 1/number of micro-batches).
    pub loss_scale: f64,
}

/// What a stage's forward returns.
#[derive(Debug, Clone)]
pub struct StageOutput<T: Real> {
    /// The hidden state [b·t, d] for the next stage (None on the last stage).
    pub hidden: Option<Vec<T>>,
    /// This stage's loss terms: main and MTP on the last stage, the balance loss of its MoE layers.
    pub loss: LossTerms,
}

/// Named tensors recorded during a forward when tracing is on (for golden comparisons and `step --dump`).
#[derive(Debug, Clone, Default)]
pub struct Trace {
    /// Float tensors: (name, shape, values).
    pub floats: Vec<(String, Vec<usize>, Vec<f32>)>,
    /// Integer tensors: (name, shape, values).
    pub ints: Vec<(String, Vec<usize>, Vec<i64>)>,
}

impl Trace {
    fn f<T: Real>(&mut self, name: String, shape: Vec<usize>, v: &[T]) {
        self.floats
            .push((name, shape, v.iter().map(|x| x.to_f64() as f32).collect()));
    }
}

struct MbState<T: Real> {
    b: usize,
    t: usize,
    loss_scale: f64,
    tokens: Arc<Vec<u32>>,
    layers: Vec<LayerSaved<T>>,
    head: Option<(HeadSaved<T>, Vec<T>)>,
    mtp: Vec<(MtpSaved<T>, Vec<T>)>,
}

/// A pipeline stage (or, with [`StageSpec::whole`], the whole model).
pub struct Stage<T: Real = f32> {
    config: ModelConfig,
    spec: StageSpec,
    weights: LossWeights,
    embed: Option<Embedding>,
    layers: Vec<DecoderLayer>,
    head: Option<Head>,
    mtp: Vec<MtpModule>,
    saved: HashMap<u64, MbState<T>>,
    jobs: HashMap<u64, Vec<WJob<T>>>,
    expert_load: BTreeMap<usize, Vec<u64>>,
    trace: Option<Trace>,
    exchange: Option<Arc<dyn ExpertExchange>>,
}

impl<T: Real> Stage<T> {
    /// Binds a stage's layers to the tensors of `params` (a store made for this stage or the whole model).
    pub fn new(
        config: &ModelConfig,
        spec: StageSpec,
        params: &ParamStore<T>,
        weights: LossWeights,
    ) -> Result<Self> {
        Self::build(config, spec, params, weights, None)
    }

    /// A stage of one member of an expert-parallel group: `params` holds the member's own routed experts
    /// ([`crate::exchange::stage_specs_ep`]) and the MoE layers exchange rows through `exchange`. A group
    /// of one is the local path of [`Stage::new`].
    pub fn with_exchange(
        config: &ModelConfig,
        spec: StageSpec,
        params: &ParamStore<T>,
        weights: LossWeights,
        exchange: Arc<dyn ExpertExchange>,
    ) -> Result<Self> {
        Self::build(config, spec, params, weights, Some(exchange))
    }

    fn build(
        config: &ModelConfig,
        spec: StageSpec,
        params: &ParamStore<T>,
        weights: LossWeights,
        exchange: Option<Arc<dyn ExpertExchange>>,
    ) -> Result<Self> {
        let (size, index) = exchange.as_ref().map_or((1, 0), |x| (x.size(), x.index()));
        check_split(config.n_routed_experts, size, index)?;
        let own = local_experts(config.n_routed_experts, size, index);
        if spec.layers.end > config.num_hidden_layers || spec.layers.start > spec.layers.end {
            return Err(ModelError::Input(format!(
                "stage layers {:?} outside 0..{}",
                spec.layers, config.num_hidden_layers
            )));
        }
        let embed = if spec.has_embedding(config) {
            Some(Embedding {
                w: params.require("model.embed_tokens.weight")?,
                vocab: config.vocab_size,
                d: config.hidden_size,
            })
        } else {
            None
        };
        let layers = spec
            .layers
            .clone()
            .map(|l| DecoderLayer::new(config, params, l, weights.balance_alpha, own.clone()))
            .collect::<Result<Vec<_>>>()?;
        let (head, mtp) = if spec.last {
            let head = Head::new(config, params, "model.norm.weight")?;
            let mtp = (1..=config.num_nextn_predict_layers)
                .map(|k| MtpModule::new(config, params, k, weights.balance_alpha, own.clone()))
                .collect::<Result<Vec<_>>>()?;
            (Some(head), mtp)
        } else {
            (None, Vec::new())
        };
        Ok(Self {
            config: config.clone(),
            spec,
            weights,
            embed,
            layers,
            head,
            mtp,
            saved: HashMap::new(),
            jobs: HashMap::new(),
            expert_load: BTreeMap::new(),
            trace: None,
            exchange,
        })
    }

    /// The stage's extent.
    pub fn spec(&self) -> &StageSpec {
        &self.spec
    }

    /// The decoder layers (for component-level scheduling).
    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// Starts recording a [`Trace`] of the following forwards.
    pub fn set_trace(&mut self, on: bool) {
        self.trace = on.then(Trace::default);
    }

    /// Takes the recorded trace (empty if tracing was off).
    pub fn take_trace(&mut self) -> Trace {
        self.trace.take().unwrap_or_default()
    }

    /// Takes the per-expert assignment counts accumulated since the last call: (layer id, counts [N_r]).
    pub fn take_expert_load(&mut self) -> Vec<(usize, Vec<u64>)> {
        std::mem::take(&mut self.expert_load).into_iter().collect()
    }

    /// Micro-batches whose forward ran but whose `backward_input` has not.
    pub fn pending_backward(&self) -> usize {
        self.saved.len()
    }

    /// Forward of one micro-batch. The first stage embeds `mb.tokens` (pass `input = None`); other stages
    /// take the previous stage's hidden state [b·t, d].
    pub fn forward(
        &mut self,
        rt: &Runtime,
        p: &ParamStore<T>,
        bias: &RoutingBias,
        mb: &MicroBatch<'_>,
        input: Option<Vec<T>>,
    ) -> Result<StageOutput<T>> {
        let (b, t, d) = (mb.b, mb.t, self.config.hidden_size);
        let n = b * t;
        let needs_tokens = self.spec.first || self.spec.last;
        if needs_tokens && mb.tokens.len() != n {
            return Err(ModelError::Input(format!(
                "{} tokens for a {b}×{t} micro-batch",
                mb.tokens.len()
            )));
        }
        if t < 2 + self.config.num_nextn_predict_layers {
            return Err(ModelError::Input(format!(
                "sequence length {t} is too short for the losses"
            )));
        }
        if self.saved.contains_key(&mb.id) || self.jobs.contains_key(&mb.id) {
            return Err(ModelError::Input(format!(
                "micro-batch {} is already in flight",
                mb.id
            )));
        }
        let mut h = if self.spec.first {
            let embed = self
                .embed
                .as_ref()
                .ok_or_else(|| ModelError::Input("first stage lacks embedding".into()))?;
            embed.forward(p, mb.tokens)?
        } else {
            input.ok_or_else(|| {
                ModelError::Input("a non-first stage needs an input hidden state".into())
            })?
        };
        if h.len() != n * d {
            return Err(ModelError::Input(format!(
                "input hidden has {} values, expected {}",
                h.len(),
                n * d
            )));
        }
        if let Some(tr) = self.trace.as_mut().filter(|_| self.spec.first) {
            tr.f("hidden.embed".into(), vec![b, t, d], &h);
        }
        let mut loss = LossTerms::default();
        let mut saved_layers = Vec::with_capacity(self.layers.len());
        let ep = self.exchange.as_deref().map(|exchange| EpCall {
            exchange,
            micro_batch: mb.id,
        });
        for layer in &self.layers {
            let (out, saved, stats) = layer.forward(rt, p, h, b, t, bias.get(layer.layer), ep)?;
            h = out;
            saved_layers.push(saved);
            loss.balance += stats.balance_loss;
            if let Some(load) = stats.expert_load {
                add_load(&mut self.expert_load, layer.layer, &load);
            }
            if let Some(tr) = self.trace.as_mut() {
                tr.f(format!("hidden.layer.{}", layer.layer), vec![b, t, d], &h);
            }
        }
        if let Some(tr) = self.trace.as_mut() {
            trace_routing(tr, &self.layers, &saved_layers_routing(&saved_layers));
        }
        let tokens = Arc::new(mb.tokens.to_vec());
        let mut state = MbState {
            b,
            t,
            loss_scale: mb.loss_scale,
            tokens: tokens.clone(),
            layers: saved_layers,
            head: None,
            mtp: Vec::new(),
        };
        let hidden = if let Some(head) = &self.head {
            let v = head.vocab;
            let (hn, logits, hs) = head.forward(rt, p, h.clone())?;
            let (main, dlogits) = mean_ce(
                &logits,
                &shifted_targets(mb.tokens, b, t, t, 1),
                v,
                mb.loss_scale,
            );
            if let Some(tr) = self.trace.as_mut() {
                tr.f("hidden.final_norm".into(), vec![b, t, d], &hn);
                tr.f("logits".into(), vec![b, t, v], &logits);
            }
            loss.main = main;
            state.head = Some((hs, dlogits));
            let embed = self.embed.as_ref();
            let depth = self.mtp.len() as f64;
            let mut h_prev = h;
            for m in &self.mtp {
                let embed =
                    embed.ok_or_else(|| ModelError::Input("MTP needs the embedding".into()))?;
                let layer_bias = bias.get(m.block.layer);
                let (hk, logits, ms, stats) =
                    m.forward(rt, p, embed, &h_prev, mb.tokens, b, t, layer_bias, ep)?;
                let t_out = t - m.k;
                let w = self.weights.mtp_lambda / depth;
                let targets = shifted_targets(mb.tokens, b, t, t_out, m.k + 1);
                let (lk, dlogits) = mean_ce(&logits, &targets, v, w * mb.loss_scale);
                loss.mtp.push(lk);
                loss.balance += stats.balance_loss;
                if let Some(load) = stats.expert_load {
                    add_load(&mut self.expert_load, m.block.layer, &load);
                }
                if let Some(tr) = self.trace.as_mut() {
                    tr.f(format!("mtp.logits.{}", m.k), vec![b, t_out, v], &logits);
                    tr.f(format!("mtp.hidden.{}", m.k), vec![b, t_out, d], &hk);
                    trace_routing(tr, std::slice::from_ref(&m.block), &[ms.routing()]);
                }
                state.mtp.push((ms, dlogits));
                h_prev = hk;
            }
            None
        } else {
            Some(h)
        };
        let w = self.weights.mtp_lambda / self.mtp.len().max(1) as f64;
        loss.total = loss.main + w * loss.mtp.iter().sum::<f64>() + loss.balance;
        if let Some(tr) = self.trace.as_mut().filter(|_| self.spec.last) {
            for (name, v) in [
                ("loss", loss.total),
                ("loss.main", loss.main),
                ("loss.aux", loss.balance),
            ] {
                tr.floats.push((name.into(), vec![], vec![v as f32]));
            }
            for (k, v) in loss.mtp.iter().enumerate() {
                tr.floats
                    .push((format!("loss.mtp.{}", k + 1), vec![], vec![*v as f32]));
            }
        }
        self.saved.insert(mb.id, state);
        Ok(StageOutput { hidden, loss })
    }

    /// B for one micro-batch: the last stage seeds the gradient from its losses (`grad_output = None`);
    /// other stages take the next stage's input gradient [b·t, d]. Returns the gradient for the previous
    /// stage (None on the first stage). Weight-gradient jobs are kept for [`Stage::backward_weight`].
    pub fn backward_input(
        &mut self,
        rt: &Runtime,
        p: &ParamStore<T>,
        mb_id: u64,
        grad_output: Option<Vec<T>>,
    ) -> Result<Option<Vec<T>>> {
        let mut jobs = Vec::new();
        let out = self.backward_impl(rt, p, mb_id, grad_output, &mut WSink::Defer(&mut jobs))?;
        self.jobs.insert(mb_id, jobs);
        Ok(out)
    }

    /// W for one micro-batch: adds its parameter gradients into `grads`.
    pub fn backward_weight(
        &mut self,
        rt: &Runtime,
        mb_id: u64,
        grads: &mut ParamStore<T>,
    ) -> Result<()> {
        let jobs = self.jobs.remove(&mb_id).ok_or_else(|| {
            ModelError::Input(format!(
                "micro-batch {mb_id} has no pending weight gradients"
            ))
        })?;
        run_wjobs(rt, &jobs, grads)
    }

    /// Fused B + W for one micro-batch (weight gradients computed as soon as their inputs exist).
    pub fn backward(
        &mut self,
        rt: &Runtime,
        p: &ParamStore<T>,
        mb_id: u64,
        grad_output: Option<Vec<T>>,
        grads: &mut ParamStore<T>,
    ) -> Result<Option<Vec<T>>> {
        self.backward_impl(rt, p, mb_id, grad_output, &mut WSink::Now(rt, grads))
    }

    fn backward_impl(
        &mut self,
        rt: &Runtime,
        p: &ParamStore<T>,
        mb_id: u64,
        grad_output: Option<Vec<T>>,
        sink: &mut WSink<'_, T>,
    ) -> Result<Option<Vec<T>>> {
        let st = self.saved.remove(&mb_id).ok_or_else(|| {
            ModelError::Input(format!("micro-batch {mb_id} has no saved forward state"))
        })?;
        let d = self.config.hidden_size;
        let (b, t) = (st.b, st.t);
        let ep = self.exchange.as_deref().map(|exchange| EpCall {
            exchange,
            micro_batch: mb_id,
        });
        let mut dh = if let Some(head) = &self.head {
            // MTP modules from the deepest, each handing the gradient of its input h^{k−1} back.
            let mut dnext: Option<Vec<T>> = None;
            let mut mtp_states = st.mtp;
            while let Some((ms, dlogits)) = mtp_states.pop() {
                let m = &self.mtp[mtp_states.len()];
                let embed = self
                    .embed
                    .as_ref()
                    .ok_or_else(|| ModelError::Input("MTP needs the embedding".into()))?;
                let t_in = t - m.k + 1;
                let mut dprev = vec![T::ZERO; b * t_in * d];
                let dk = dnext
                    .take()
                    .unwrap_or_else(|| vec![T::ZERO; b * (t - m.k) * d]);
                m.backward_input(
                    rt,
                    p,
                    embed,
                    &mut dprev,
                    dlogits,
                    dk,
                    ms,
                    st.loss_scale,
                    ep,
                    sink,
                )?;
                dnext = Some(dprev);
            }
            let mut dh = dnext.unwrap_or_else(|| vec![T::ZERO; b * t * d]);
            let (hs, dlogits) = st
                .head
                .ok_or_else(|| ModelError::Input("last stage lost its head state".into()))?;
            head.backward_input(rt, p, &mut dh, dlogits, hs, sink)?;
            dh
        } else {
            grad_output.ok_or_else(|| {
                ModelError::Input("a non-last stage needs an output gradient".into())
            })?
        };
        if dh.len() != b * t * d {
            return Err(ModelError::Input(format!(
                "output gradient has {} values, expected {}",
                dh.len(),
                b * t * d
            )));
        }
        for (layer, saved) in self.layers.iter().zip(st.layers).rev() {
            dh = layer.backward_input(rt, p, dh, saved, st.loss_scale, ep, sink)?;
        }
        if self.spec.first {
            let embed = self
                .embed
                .as_ref()
                .ok_or_else(|| ModelError::Input("first stage lacks embedding".into()))?;
            embed.backward(st.tokens, dh, sink)?;
            Ok(None)
        } else {
            Ok(Some(dh))
        }
    }
}

fn add_load(map: &mut BTreeMap<usize, Vec<u64>>, layer: usize, load: &[u64]) {
    let e = map.entry(layer).or_insert_with(|| vec![0; load.len()]);
    for (a, b) in e.iter_mut().zip(load) {
        *a += b;
    }
}

fn saved_layers_routing<T: Real>(
    saved: &[LayerSaved<T>],
) -> Vec<Option<&crate::layers::moe::Routing<T>>> {
    saved.iter().map(|s| s.routing()).collect()
}

fn trace_routing<T: Real>(
    tr: &mut Trace,
    layers: &[DecoderLayer],
    routing: &[Option<&crate::layers::moe::Routing<T>>],
) {
    for (layer, r) in layers.iter().zip(routing) {
        let Some(r) = r else { continue };
        let l = layer.layer;
        tr.ints.push((
            format!("routing.{l}.topk_idx"),
            vec![r.n, r.k],
            r.topk_idx.iter().map(|&x| x as i64).collect(),
        ));
        tr.f(
            format!("routing.{l}.topk_weight"),
            vec![r.n, r.k],
            &r.topk_weight,
        );
        tr.f(format!("routing.{l}.scores"), vec![r.n, r.e], &r.scores);
        tr.ints.push((
            format!("routing.{l}.expert_load"),
            vec![r.e],
            r.expert_load.iter().map(|&x| x as i64).collect(),
        ));
    }
}
