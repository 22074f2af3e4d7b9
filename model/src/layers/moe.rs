//! The DeepSeekMoE FFN split into the components DualPipe overlaps: routing (part of the attention
//! component), dispatch, experts, combine — each with its backward.
//!
//! Routing (v3-spec §2.1, golden README): s = sigmoid(u·W_gᵀ) in f32 or better; selection uses s + bias;
//! a group's score is the sum of its two largest biased scores; the `topk_group` best groups are kept; the
//! top-k biased scores among them are chosen (ties: lower index), listed in ascending expert order; gate
//! weights are the unbiased s of the chosen experts normalized to sum one (+1e-20) and scaled by
//! `routed_scaling_factor`. No gradient flows through the selection. The sequence-wise balance loss
//! α·Σ_i f_i·P_i is computed per sequence, averaged over the micro-batch's sequences, and its gradient is
//! injected here.
//!
//! Dispatch orders (token, slot) pairs by expert (then token), which is a local permutation with expert
//! parallelism 1; the [`Dispatched`] record carries what a remote all-to-all needs: per-destination-rank and
//! per-expert counts, each row's expert id and gate weight, and its source (token, slot). Experts multiply
//! their outputs by the gate weight (DeepEP convention), so combine is a plain sum back into token rows.
//!
//! Invariant: every scatter-add runs in ascending permuted-row order, so results are deterministic.

use super::mlp::{Mlp, MlpSaved};
use super::{WJob, WSink, pid};
use crate::ModelError;
use crate::params::ParamStore;
use crate::precision::{LinInput, Linear, Precision, Runtime};
use crate::{ModelConfig, Result};
use kernels::fp8::{ScaleFmt, TILE, e4m3_decode, quantize_act};
use kernels::{Accumulate, ExecCtx, Real};
use std::ops::Range;
use std::sync::Arc;

/// Router settings and weight of one MoE layer.
#[derive(Debug, Clone)]
pub struct Router {
    gate: Linear,
    /// Routed experts.
    pub e: usize,
    /// Experts per token.
    pub k: usize,
    groups: usize,
    topk_group: usize,
    scale: f64,
    norm: bool,
    alpha: f64,
}

/// The routing decisions of one micro-batch, plus what the router backward needs.
#[derive(Debug, Clone)]
pub struct Routing<T: Real> {
    /// Tokens (rows).
    pub n: usize,
    /// Sequences in the micro-batch.
    pub b: usize,
    /// Experts per token.
    pub k: usize,
    /// Routed experts.
    pub e: usize,
    /// Chosen experts [n, k], ascending per token.
    pub topk_idx: Vec<u32>,
    /// Gate weights [n, k] in the same order (normalized, scaled).
    pub topk_weight: Vec<T>,
    /// Unbiased sigmoid scores [n, e].
    pub scores: Vec<T>,
    /// α·(mean over sequences of Σ_i f_i·P_i) for this layer and micro-batch.
    pub balance_loss: f64,
    /// (token, expert) assignments per expert [e] (for the bias update).
    pub expert_load: Vec<u64>,
    u: Arc<LinInput<T>>,
}

impl Router {
    /// Binds `mlp.gate.weight` of `layer`; `alpha` is the balance-loss coefficient.
    pub fn new<T: Real>(
        config: &ModelConfig,
        p: &ParamStore<T>,
        layer: usize,
        alpha: f64,
    ) -> Result<Self> {
        let pre = format!("model.layers.{layer}");
        Ok(Self {
            gate: Linear::fp32(
                pid(p, &pre, "mlp.gate.weight")?,
                config.n_routed_experts,
                config.hidden_size,
            ),
            e: config.n_routed_experts,
            k: config.num_experts_per_tok,
            groups: config.n_group,
            topk_group: config.topk_group,
            scale: config.routed_scaling_factor,
            norm: config.norm_topk_prob,
            alpha,
        })
    }

    /// Forward: u [b·t, d] → routing decisions. `bias` [e] steers selection only.
    pub fn forward<T: Real>(
        &self,
        rt: &Runtime,
        p: &ParamStore<T>,
        u: &[T],
        b: usize,
        bias: &[f32],
    ) -> Result<Routing<T>> {
        let _routing = crate::profile::scope(crate::profile::Category::Routing);
        let n = u.len() / self.gate.n_in;
        let (e, k) = (self.e, self.k);
        let u = Arc::new(self.gate.input(rt, u.to_vec(), n)?);
        let z = self.gate.forward(rt, p, &u)?;
        let mut scores = vec![T::ZERO; z.len()];
        kernels::sigmoid(&mut scores, &z)?;
        let mut topk_idx = Vec::with_capacity(n * k);
        let mut topk_weight = Vec::with_capacity(n * k);
        let mut expert_load = vec![0u64; e];
        let per_group = e / self.groups;
        for r in 0..n {
            let s = &scores[r * e..(r + 1) * e];
            let biased: Vec<f64> = (0..e).map(|i| s[i].to_f64() + bias[i] as f64).collect();
            let gscore: Vec<f64> = (0..self.groups)
                .map(|g| {
                    let grp = &biased[g * per_group..(g + 1) * per_group];
                    let top = top_indices(grp, 2);
                    top.iter().map(|&i| grp[i]).sum()
                })
                .collect();
            let kept = top_indices(&gscore, self.topk_group);
            let masked: Vec<f64> = (0..e)
                .map(|i| {
                    if kept.contains(&(i / per_group)) {
                        biased[i]
                    } else {
                        f64::NEG_INFINITY
                    }
                })
                .collect();
            let mut chosen = top_indices(&masked, k);
            chosen.sort_unstable();
            let denom: f64 = if self.norm {
                chosen.iter().map(|&i| s[i].to_f64()).sum::<f64>() + 1e-20
            } else {
                1.0
            };
            for &i in &chosen {
                topk_idx.push(i as u32);
                topk_weight.push(T::from_f64(s[i].to_f64() / denom * self.scale));
                expert_load[i] += 1;
            }
        }
        let balance_loss = self.balance(&scores, &topk_idx, n, b).0;
        Ok(Routing {
            n,
            b,
            k,
            e,
            topk_idx,
            topk_weight,
            scores,
            balance_loss,
            expert_load,
            u,
        })
    }

    /// Sequence-wise balance loss and its gradient coefficients g[b, e] = ∂L/∂s′ (for one token of
    /// sequence b, before the 1/t mean): returns (loss, f·α/(t·B) per sequence and expert).
    fn balance<T: Real>(&self, scores: &[T], idx: &[u32], n: usize, b: usize) -> (f64, Vec<f64>) {
        let (e, k) = (self.e, self.k);
        let t = n / b;
        let mut loss = 0.0;
        let mut coef = vec![0f64; b * e];
        for bi in 0..b {
            let mut count = vec![0f64; e];
            for r in bi * t..(bi + 1) * t {
                for &i in &idx[r * k..(r + 1) * k] {
                    count[i as usize] += 1.0;
                }
            }
            let f: Vec<f64> = count
                .iter()
                .map(|c| e as f64 / (k as f64 * t as f64) * c)
                .collect();
            let mut pm = vec![0f64; e];
            for r in bi * t..(bi + 1) * t {
                let s = &scores[r * e..(r + 1) * e];
                let tot: f64 = s.iter().map(|v| v.to_f64()).sum();
                for i in 0..e {
                    pm[i] += s[i].to_f64() / tot;
                }
            }
            let seq: f64 = (0..e).map(|i| f[i] * pm[i] / t as f64).sum();
            loss += self.alpha * seq / b as f64;
            for i in 0..e {
                coef[bi * e + i] = self.alpha * f[i] / (t as f64 * b as f64);
            }
        }
        (loss, coef)
    }

    /// B: from the gate-weight gradients dw [n, k], adds du [n, d] and emits the router W-job.
    /// `loss_scale` multiplies the balance-loss gradient (the same factor the caller applied to its loss).
    pub fn backward_input<T: Real>(
        &self,
        rt: &Runtime,
        p: &ParamStore<T>,
        du: &mut [T],
        dw: &[T],
        r: Routing<T>,
        loss_scale: f64,
        sink: &mut WSink<'_, T>,
    ) -> Result<()> {
        let _routing = crate::profile::scope(crate::profile::Category::Routing);
        let (n, e, k) = (r.n, self.e, self.k);
        let t = n / r.b;
        let (_, coef) = self.balance(&r.scores, &r.topk_idx, n, r.b);
        let mut dz = vec![T::ZERO; n * e];
        for row in 0..n {
            let s = &r.scores[row * e..(row + 1) * e];
            let mut ds = vec![0f64; e];
            // Gate weights: w_j = R·s_j/Σ (norm) or R·s_j.
            let idx = &r.topk_idx[row * k..(row + 1) * k];
            let dwr = &dw[row * k..(row + 1) * k];
            if self.norm {
                let sum: f64 = idx.iter().map(|&i| s[i as usize].to_f64()).sum::<f64>() + 1e-20;
                let inner: f64 = (0..k)
                    .map(|j| dwr[j].to_f64() * s[idx[j] as usize].to_f64())
                    .sum::<f64>()
                    / sum;
                for j in 0..k {
                    ds[idx[j] as usize] += self.scale / sum * (dwr[j].to_f64() - inner);
                }
            } else {
                for j in 0..k {
                    ds[idx[j] as usize] += self.scale * dwr[j].to_f64();
                }
            }
            // Balance loss through s′ = s/Σ_all s.
            let bi = row / t;
            let tot: f64 = s.iter().map(|v| v.to_f64()).sum();
            let g = &coef[bi * e..(bi + 1) * e];
            let gs: f64 = (0..e).map(|i| g[i] * s[i].to_f64() / tot).sum();
            for i in 0..e {
                ds[i] += loss_scale * (g[i] - gs) / tot;
            }
            for i in 0..e {
                let sv = s[i].to_f64();
                dz[row * e + i] = T::from_f64(ds[i] * sv * (1.0 - sv));
            }
        }
        self.gate
            .backward_input(rt, p, du, &dz, n, Accumulate::Add)?;
        sink.push(WJob::Linear {
            lin: self.gate,
            x: r.u,
            dy: dz,
        })
    }
}

/// Indices of the `k` largest values, largest first, ties to the lower index.
fn top_indices(v: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| {
        v[b].partial_cmp(&v[a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    idx.truncate(k);
    idx
}

/// The dispatched (permuted) tokens of one micro-batch and everything the reverse path needs.
#[derive(Debug, Clone)]
pub struct Dispatched<T: Real> {
    /// Model width.
    pub d: usize,
    /// Tokens in the micro-batch.
    pub n_tokens: usize,
    /// Experts per token.
    pub k: usize,
    /// Rows per destination rank (EP ranks own contiguous expert ranges); one entry with EP = 1.
    pub tokens_per_rank: Vec<usize>,
    /// Rows per expert [e]; rows are grouped by expert in ascending order. On an owner's received
    /// record: rows per (owned expert, source member) block, expert-major, so that each source's rows
    /// run through the expert as their own GEMM exactly as they would locally.
    pub tokens_per_expert: Vec<usize>,
    /// Expert id of each permuted row [R = n·k].
    pub expert_ids: Vec<u32>,
    /// Gate weight of each permuted row [R].
    pub gate_weights: Vec<T>,
    /// Source token of each permuted row [R] (empty on an owner's received record).
    pub src_token: Vec<u32>,
    /// Source slot (0..k) of each permuted row [R] (empty on an owner's received record).
    pub src_slot: Vec<u8>,
    /// Permuted inputs [R, d].
    pub x: Vec<T>,
}

/// Dispatch: permutes u [n, d] into expert order according to `routing`, for `ep` expert-parallel ranks.
pub fn dispatch<T: Real>(u: &[T], routing: &Routing<T>, d: usize, ep: usize) -> Dispatched<T> {
    let (n, k, e) = (routing.n, routing.k, routing.e);
    let mut tokens_per_expert = vec![0usize; e];
    for &i in &routing.topk_idx {
        tokens_per_expert[i as usize] += 1;
    }
    let mut start = vec![0usize; e + 1];
    for i in 0..e {
        start[i + 1] = start[i] + tokens_per_expert[i];
    }
    let rows = n * k;
    let mut fill = start.clone();
    let mut expert_ids = vec![0u32; rows];
    let mut gate_weights = vec![T::ZERO; rows];
    let mut src_token = vec![0u32; rows];
    let mut src_slot = vec![0u8; rows];
    let mut x = vec![T::ZERO; rows * d];
    for t in 0..n {
        for s in 0..k {
            let ex = routing.topk_idx[t * k + s] as usize;
            let r = fill[ex];
            fill[ex] += 1;
            expert_ids[r] = ex as u32;
            gate_weights[r] = routing.topk_weight[t * k + s];
            src_token[r] = t as u32;
            src_slot[r] = s as u8;
            x[r * d..(r + 1) * d].copy_from_slice(&u[t * d..(t + 1) * d]);
        }
    }
    let per_rank = e.div_ceil(ep.max(1));
    let tokens_per_rank = (0..ep.max(1))
        .map(|rk| {
            tokens_per_expert[(rk * per_rank).min(e)..((rk + 1) * per_rank).min(e)]
                .iter()
                .sum()
        })
        .collect();
    Dispatched {
        d,
        n_tokens: n,
        k,
        tokens_per_rank,
        tokens_per_expert,
        expert_ids,
        gate_weights,
        src_token,
        src_slot,
        x,
    }
}

/// Dispatch backward (a combine of gradients): dx_perm [R, d] → du [n, d] (added), and the gate-weight
/// gradients dgate [R] → dw [n, k].
pub fn dispatch_backward<T: Real>(
    du: &mut [T],
    dw: &mut [T],
    dx_perm: &[T],
    dgate: &[T],
    disp: &Dispatched<T>,
) {
    let d = disp.d;
    for r in 0..disp.src_token.len() {
        let t = disp.src_token[r] as usize;
        for (a, b) in du[t * d..(t + 1) * d]
            .iter_mut()
            .zip(&dx_perm[r * d..(r + 1) * d])
        {
            *a += *b;
        }
        dw[t * disp.k + disp.src_slot[r] as usize] = dgate[r];
    }
}

/// The routed experts of one layer that this rank holds: all of them, or with expert parallelism the
/// contiguous block it owns. Indices into per-expert lists of a [`Dispatched`] record are local
/// (expert id − first owned id).
#[derive(Debug, Clone)]
pub struct Experts {
    experts: Vec<Mlp>,
    first: usize,
}

/// What the experts keep for the backward of one micro-batch.
#[derive(Debug, Clone)]
pub struct ExpertsSaved<T: Real> {
    per_expert: Vec<Option<MlpSaved<T>>>,
    y: Vec<T>,
    gate_weights: Vec<T>,
    tokens_per_expert: Vec<usize>,
    d: usize,
}

impl Experts {
    /// Binds `mlp.experts.E.*` of `layer` for the experts `own` (all of `0..n_routed_experts`
    /// without expert parallelism).
    pub fn new<T: Real>(
        config: &ModelConfig,
        p: &ParamStore<T>,
        layer: usize,
        own: Range<usize>,
    ) -> Result<Self> {
        let first = own.start;
        let experts = own
            .map(|e| {
                Mlp::new(
                    p,
                    &format!("model.layers.{layer}.mlp.experts.{e}"),
                    config.hidden_size,
                    config.moe_intermediate_size,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self { experts, first })
    }

    /// The expert ids this rank holds.
    pub fn own(&self) -> Range<usize> {
        self.first..self.first + self.experts.len()
    }

    /// How many row blocks each owned expert has in a record with `blocks` blocks (one per expert
    /// locally, one per (expert, source member) on an owner).
    fn blocks_per_expert(&self, blocks: usize) -> Result<usize> {
        let n = self.experts.len();
        if n == 0 || blocks == 0 || !blocks.is_multiple_of(n) {
            return Err(ModelError::Input(format!(
                "{blocks} row blocks for {n} owned experts"
            )));
        }
        Ok(blocks / n)
    }

    /// Forward: the dispatched rows [R, d] → gate-weighted expert outputs [R, d] in the same order.
    pub fn forward<T: Real>(
        &self,
        rt: &Runtime,
        p: &ParamStore<T>,
        disp: &Dispatched<T>,
    ) -> Result<(Vec<T>, ExpertsSaved<T>)> {
        let d = disp.d;
        let rows = disp.x.len() / d;
        let mut y = vec![T::ZERO; rows * d];
        let per = self.blocks_per_expert(disp.tokens_per_expert.len())?;
        let mut per_expert = Vec::with_capacity(disp.tokens_per_expert.len());
        let mut start = 0;
        for (blk, &m) in disp.tokens_per_expert.iter().enumerate() {
            let mlp = &self.experts[blk / per];
            if m == 0 {
                per_expert.push(None);
                continue;
            }
            let x = mlp.input(rt, disp.x[start * d..(start + m) * d].to_vec(), m)?;
            let (ye, saved) = mlp.forward(rt, p, x)?;
            y[start * d..(start + m) * d].copy_from_slice(&ye);
            per_expert.push(Some(saved));
            start += m;
        }
        let mut out = y.clone();
        for r in 0..rows {
            let g = disp.gate_weights[r];
            out[r * d..(r + 1) * d].iter_mut().for_each(|v| *v *= g);
        }
        let saved = ExpertsSaved {
            per_expert,
            y,
            gate_weights: disp.gate_weights.clone(),
            tokens_per_expert: disp.tokens_per_expert.clone(),
            d,
        };
        Ok((out, saved))
    }

    /// B: from d(weighted outputs) [R, d] → (dx_perm [R, d], dgate [R]); emits the experts' W-jobs.
    pub fn backward_input<T: Real>(
        &self,
        rt: &Runtime,
        p: &ParamStore<T>,
        dy: &[T],
        s: ExpertsSaved<T>,
        sink: &mut WSink<'_, T>,
    ) -> Result<(Vec<T>, Vec<T>)> {
        let d = s.d;
        let rows = dy.len() / d;
        let mut dgate = vec![T::ZERO; rows];
        let mut dx = vec![T::ZERO; rows * d];
        for r in 0..rows {
            let (a, b) = (&dy[r * d..(r + 1) * d], &s.y[r * d..(r + 1) * d]);
            dgate[r] = T::from_f64(a.iter().zip(b).map(|(x, y)| x.to_f64() * y.to_f64()).sum());
        }
        let per = self.blocks_per_expert(s.per_expert.len())?;
        let mut start = 0;
        for (blk, saved) in s.per_expert.into_iter().enumerate() {
            let m = s.tokens_per_expert[blk];
            let Some(saved) = saved else { continue };
            let mut dye = dy[start * d..(start + m) * d].to_vec();
            for (i, row) in dye.chunks_mut(d).enumerate() {
                let g = s.gate_weights[start + i];
                row.iter_mut().for_each(|v| *v *= g);
            }
            self.experts[blk / per].backward_input(
                rt,
                p,
                &mut dx[start * d..(start + m) * d],
                Accumulate::Overwrite,
                dye,
                saved,
                sink,
            )?;
            start += m;
        }
        Ok((dx, dgate))
    }
}

/// Combine: sums gate-weighted expert rows [R, d] back into token rows, adding into `out` [n, d].
pub fn combine<T: Real>(out: &mut [T], y_perm: &[T], disp: &Dispatched<T>) {
    let d = disp.d;
    for r in 0..disp.src_token.len() {
        let t = disp.src_token[r] as usize;
        for (a, b) in out[t * d..(t + 1) * d]
            .iter_mut()
            .zip(&y_perm[r * d..(r + 1) * d])
        {
            *a += *b;
        }
    }
}

/// Combine backward (a dispatch of gradients): dh [n, d] → d(weighted expert rows) [R, d].
pub fn combine_backward<T: Real>(dh: &[T], disp: &Dispatched<T>) -> Vec<T> {
    let d = disp.d;
    let mut out = vec![T::ZERO; disp.src_token.len() * d];
    for r in 0..disp.src_token.len() {
        let t = disp.src_token[r] as usize;
        out[r * d..(r + 1) * d].copy_from_slice(&dh[t * d..(t + 1) * d]);
    }
    out
}

// Expert-parallel exchange payloads. Rows travel as f32 slots in a [`RowFmt`]: exact f32, or FP8 E4M3
// codes (four to a slot) with one power-of-two scale per 1×128 tile, or bf16 (two to a slot). A
// dispatched row is its encoded d values, its expert id (the u32's bits) and its gate weight; a
// returned gradient row is its encoded d values and its gate-weight gradient (f32).

/// How the d values of an exchanged row travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowFmt {
    /// f32 (exact for T = f32).
    F32,
    /// FP8 E4M3 codes, four to an f32 slot, then one scale per 1×128 tile in the given format.
    Fp8(ScaleFmt),
    /// bf16, two to an f32 slot.
    Bf16,
}

impl RowFmt {
    /// The formats of (dispatch and gradient dispatch, combine and gradient combine) in precision
    /// mode `p`: FP8 dispatch and bf16 combine in the FP8 modes (v3-spec §2.5, §4.5), f32 otherwise.
    /// The dispatch scales follow the mode's activation tiles — power-of-two (UE8M0, the V3 recipe)
    /// in `Fp8Ue8m0`, f32 in `Fp8` — so that the owner's expert input quantizes back to the very
    /// codes the sender computed, and the exchange adds no rounding of its own to the FP8 GEMM.
    pub fn for_precision(p: Precision) -> (RowFmt, RowFmt) {
        match p {
            Precision::Fp8Ue8m0 => (RowFmt::Fp8(ScaleFmt::Ue8m0), RowFmt::Bf16),
            Precision::Fp8 => (RowFmt::Fp8(ScaleFmt::F32), RowFmt::Bf16),
            Precision::Fp32 | Precision::Bf16 => (RowFmt::F32, RowFmt::F32),
        }
    }

    /// f32 slots of one encoded row of d values.
    pub fn width(self, d: usize) -> usize {
        match self {
            RowFmt::F32 => d,
            RowFmt::Fp8(_) => d.div_ceil(4) + d.div_ceil(TILE),
            RowFmt::Bf16 => d.div_ceil(2),
        }
    }

    /// Encodes rows [m, d] into [m, width(d)].
    pub fn encode<T: Real>(self, ctx: &ExecCtx, rows: &[T], d: usize) -> Result<Vec<f32>> {
        let m = rows.len() / d.max(1);
        let w = self.width(d);
        let x: Vec<f32> = rows.iter().map(|v| v.to_f64() as f32).collect();
        Ok(match self {
            RowFmt::F32 => x,
            RowFmt::Bf16 => {
                let mut out = Vec::with_capacity(m * w);
                for row in x.chunks_exact(d) {
                    for pair in row.chunks(2) {
                        let lo = u32::from(kernels::f32_to_bf16(pair[0]));
                        let hi = pair
                            .get(1)
                            .map_or(0, |&v| u32::from(kernels::f32_to_bf16(v)));
                        out.push(f32::from_bits(lo | hi << 16));
                    }
                }
                out
            }
            RowFmt::Fp8(scale) => {
                let cb = d.div_ceil(TILE);
                let mut codes = vec![0u8; m * d];
                let mut scales = vec![0f32; m * cb];
                quantize_act(ctx, &mut codes, &mut scales, &x, m, d, scale)?;
                let mut out = Vec::with_capacity(m * w);
                for (c, sc) in codes.chunks_exact(d).zip(scales.chunks_exact(cb)) {
                    for quad in c.chunks(4) {
                        let mut b = [0u8; 4];
                        b[..quad.len()].copy_from_slice(quad);
                        out.push(f32::from_bits(u32::from_le_bytes(b)));
                    }
                    out.extend_from_slice(sc);
                }
                out
            }
        })
    }

    /// Decodes one encoded row (`width(d)` slots) into d values appended to `out`.
    pub fn decode_row<T: Real>(self, row: &[f32], d: usize, out: &mut Vec<T>) {
        match self {
            RowFmt::F32 => out.extend(row[..d].iter().map(|&v| T::from_f64(f64::from(v)))),
            RowFmt::Bf16 => {
                for i in 0..d {
                    let bits = row[i / 2].to_bits() >> (16 * (i % 2));
                    let v = kernels::bf16_to_f32(bits as u16);
                    out.push(T::from_f64(f64::from(v)));
                }
            }
            RowFmt::Fp8(_) => {
                let scales = &row[d.div_ceil(4)..];
                for i in 0..d {
                    let code = row[i / 4].to_bits().to_le_bytes()[i % 4];
                    let v = e4m3_decode(code) * scales[i / TILE];
                    out.push(T::from_f64(f64::from(v)));
                }
            }
        }
    }
}

/// Source side: the dispatched rows [R, d] split into one payload per owner rank (rows
/// `fmt.width(d) + 2` wide: the encoded values, the expert id's bits, the gate weight).
pub fn pack_dispatch<T: Real>(
    ctx: &ExecCtx,
    disp: &Dispatched<T>,
    fmt: RowFmt,
) -> Result<Vec<Vec<f32>>> {
    let d = disp.d;
    let w = fmt.width(d);
    let mut out = Vec::with_capacity(disp.tokens_per_rank.len());
    let mut at = 0;
    for &count in &disp.tokens_per_rank {
        let enc = fmt.encode(ctx, &disp.x[at * d..(at + count) * d], d)?;
        let mut buf = Vec::with_capacity(count * (w + 2));
        for (i, row) in enc.chunks_exact(w.max(1)).take(count).enumerate() {
            buf.extend_from_slice(row);
            buf.push(f32::from_bits(disp.expert_ids[at + i]));
            buf.push(disp.gate_weights[at + i].to_f64() as f32);
        }
        at += count;
        out.push(buf);
    }
    Ok(out)
}

/// Source side: rows [R, d] in dispatch order split into one encoded payload per owner rank.
pub fn split_by_rank<T: Real>(
    ctx: &ExecCtx,
    rows: &[T],
    disp: &Dispatched<T>,
    fmt: RowFmt,
) -> Result<Vec<Vec<f32>>> {
    let d = disp.d;
    let mut at = 0;
    disp.tokens_per_rank
        .iter()
        .map(|&count| {
            let v = fmt.encode(ctx, &rows[at * d..(at + count) * d], d);
            at += count;
            v
        })
        .collect()
}

/// Source side: the owners' payloads (rows of `fmt.width(d)` slots, plus one f32 if `extra`, in the
/// order this rank sent them) joined back into dispatch order: (rows [R, d], the extra column [R]).
pub fn join_from_ranks<T: Real>(
    recv: &[Vec<f32>],
    disp: &Dispatched<T>,
    extra: bool,
    fmt: RowFmt,
) -> Result<(Vec<T>, Vec<T>)> {
    let d = disp.d;
    let wd = fmt.width(d);
    let w = wd + usize::from(extra);
    if recv.len() != disp.tokens_per_rank.len() {
        return Err(ModelError::Exchange(format!(
            "{} payloads returned, expected one per each of {} owners",
            recv.len(),
            disp.tokens_per_rank.len()
        )));
    }
    let rows: usize = disp.tokens_per_rank.iter().sum();
    let mut x = Vec::with_capacity(rows * d);
    let mut col = Vec::with_capacity(if extra { rows } else { 0 });
    for (j, (buf, &count)) in recv.iter().zip(&disp.tokens_per_rank).enumerate() {
        if buf.len() != count * w {
            return Err(ModelError::Exchange(format!(
                "owner {j} returned {} values for {count} rows of width {w}",
                buf.len()
            )));
        }
        for row in buf.chunks_exact(w.max(1)).take(count) {
            fmt.decode_row(row, d, &mut x);
            if extra {
                col.push(T::from_f64(f64::from(row[wd])));
            }
        }
    }
    Ok((x, col))
}

/// Owner side: where each row it computes came from, to send results back in each source's order.
#[derive(Debug, Clone)]
pub struct OwnerMap {
    d: usize,
    /// Rows received from each source member.
    per_source: Vec<usize>,
    /// For each owner row (grouped by owned expert, then source, then arrival): (source, row there).
    origin: Vec<(u32, u32)>,
}

/// Owner side: the dispatched payloads of every source member (rows `fmt.width(d) + 2` wide)
/// regrouped by owned expert, then source (one row block each), then the source's order into a
/// record the experts can run, plus the map back.
pub fn receive_dispatch<T: Real>(
    recv: &[Vec<f32>],
    d: usize,
    k: usize,
    own: Range<usize>,
    fmt: RowFmt,
) -> Result<(Dispatched<T>, OwnerMap)> {
    let wd = fmt.width(d);
    let w = wd + 2;
    let mut per_source = Vec::with_capacity(recv.len());
    let sources = recv.len();
    let mut lists: Vec<Vec<(u32, u32)>> = vec![Vec::new(); own.len() * sources];
    for (s, buf) in recv.iter().enumerate() {
        if !buf.len().is_multiple_of(w) {
            return Err(ModelError::Exchange(format!(
                "member {s} dispatched {} values, not a whole number of {w}-wide rows",
                buf.len()
            )));
        }
        per_source.push(buf.len() / w);
        for (j, row) in buf.chunks_exact(w).enumerate() {
            let e = row[wd].to_bits() as usize;
            if !own.contains(&e) {
                return Err(ModelError::Exchange(format!(
                    "member {s} dispatched a row for expert {e} to the owner of experts {own:?}"
                )));
            }
            lists[(e - own.start) * sources + s].push((s as u32, j as u32));
        }
    }
    let tokens_per_expert: Vec<usize> = lists.iter().map(Vec::len).collect();
    let origin: Vec<(u32, u32)> = lists.concat();
    let rows = origin.len();
    let mut x = Vec::with_capacity(rows * d);
    let mut expert_ids = Vec::with_capacity(rows);
    let mut gate_weights = Vec::with_capacity(rows);
    for &(s, j) in &origin {
        let row = &recv[s as usize][j as usize * w..(j as usize + 1) * w];
        fmt.decode_row(row, d, &mut x);
        expert_ids.push(row[wd].to_bits());
        gate_weights.push(T::from_f64(f64::from(row[wd + 1])));
    }
    let disp = Dispatched {
        d,
        n_tokens: 0,
        k,
        tokens_per_rank: vec![rows],
        tokens_per_expert,
        expert_ids,
        gate_weights,
        src_token: Vec::new(),
        src_slot: Vec::new(),
        x,
    };
    let map = OwnerMap {
        d,
        per_source,
        origin,
    };
    Ok((disp, map))
}

impl OwnerMap {
    /// Owner rows [R, d] (and an optional extra f32 per row) → one payload per source member, each in
    /// the order that source sent its rows, the rows encoded in `fmt`.
    pub fn scatter<T: Real>(
        &self,
        ctx: &ExecCtx,
        rows: &[T],
        extra: Option<&[T]>,
        fmt: RowFmt,
    ) -> Result<Vec<Vec<f32>>> {
        let d = self.d;
        let wd = fmt.width(d);
        let w = wd + usize::from(extra.is_some());
        let enc = fmt.encode(ctx, rows, d)?;
        let mut out: Vec<Vec<f32>> = self.per_source.iter().map(|&n| vec![0.0; n * w]).collect();
        for (r, &(s, j)) in self.origin.iter().enumerate() {
            let dst = &mut out[s as usize][j as usize * w..(j as usize + 1) * w];
            dst[..wd].copy_from_slice(&enc[r * wd..(r + 1) * wd]);
            if let Some(col) = extra {
                dst[wd] = col[r].to_f64() as f32;
            }
        }
        Ok(out)
    }

    /// One payload per source member (rows encoded in `fmt`, in the source's order) → owner rows [R, d].
    pub fn gather<T: Real>(&self, recv: &[Vec<f32>], fmt: RowFmt) -> Result<Vec<T>> {
        let d = self.d;
        let w = fmt.width(d);
        if recv.len() != self.per_source.len() {
            return Err(ModelError::Exchange(format!(
                "{} gradient payloads for {} source members",
                recv.len(),
                self.per_source.len()
            )));
        }
        for (s, (buf, &n)) in recv.iter().zip(&self.per_source).enumerate() {
            if buf.len() != n * w {
                return Err(ModelError::Exchange(format!(
                    "member {s} sent {} gradient values for the {n} rows it dispatched",
                    buf.len()
                )));
            }
        }
        let mut out = Vec::with_capacity(self.origin.len() * d);
        for &(s, j) in &self.origin {
            let row = &recv[s as usize][j as usize * w..(j as usize + 1) * w];
            fmt.decode_row(row, d, &mut out);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_formats_round_trip_within_their_precision() {
        let ctx = ExecCtx::cpu(1);
        // Two rows of d = 130: a full 128-wide tile, a 2-wide tail tile, and a code quad padded.
        let d = 130;
        let rows: Vec<f32> = (0..2 * d)
            .map(|i| ((i as f32) * 0.37).sin() * if i % d < 128 { 3.0 } else { 1e-3 })
            .collect();
        let fp8 = [ScaleFmt::F32, ScaleFmt::Ue8m0].map(RowFmt::Fp8);
        for fmt in [RowFmt::F32, RowFmt::Bf16, fp8[0], fp8[1]] {
            let enc = fmt.encode(&ctx, &rows, d).unwrap();
            assert_eq!(enc.len(), 2 * fmt.width(d), "{fmt:?}");
            let mut back: Vec<f32> = Vec::new();
            for row in enc.chunks_exact(fmt.width(d)) {
                fmt.decode_row(row, d, &mut back);
            }
            for (i, (a, b)) in rows.iter().zip(&back).enumerate() {
                let tile_max = rows[i / d * d..(i / d + 1) * d]
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| j / TILE == (i % d) / TILE)
                    .fold(0f32, |m, (_, v)| m.max(v.abs()));
                let tol = match fmt {
                    RowFmt::F32 => 0.0,
                    RowFmt::Bf16 => a.abs() * 2f32.powi(-8),
                    // E4M3 keeps 3 mantissa bits; values far below the tile's max go subnormal.
                    RowFmt::Fp8(_) => a.abs() * 2f32.powi(-4) + tile_max * 2f32.powi(-9),
                };
                assert!((a - b).abs() <= tol, "{fmt:?} [{i}]: {a} → {b}");
            }
            if fmt == RowFmt::Fp8(ScaleFmt::Ue8m0) {
                let scales = &enc[d.div_ceil(4)..fmt.width(d)];
                assert_eq!(scales.len(), 2);
                for s in scales {
                    assert_eq!(
                        s.to_bits() & 0x007f_ffff,
                        0,
                        "scale {s} is not a power of two"
                    );
                }
            }
        }
    }
}
