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
use crate::params::ParamStore;
use crate::precision::{LinInput, Linear, Runtime};
use crate::{ModelConfig, Result};
use kernels::{Accumulate, Real};
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
    /// Rows per expert [e]; rows are grouped by expert in ascending order.
    pub tokens_per_expert: Vec<usize>,
    /// Expert id of each permuted row [R = n·k].
    pub expert_ids: Vec<u32>,
    /// Gate weight of each permuted row [R].
    pub gate_weights: Vec<T>,
    /// Source token of each permuted row [R].
    pub src_token: Vec<u32>,
    /// Source slot (0..k) of each permuted row [R].
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

/// The routed experts of one layer.
#[derive(Debug, Clone)]
pub struct Experts {
    experts: Vec<Mlp>,
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
    /// Binds `mlp.experts.E.*` of `layer`.
    pub fn new<T: Real>(config: &ModelConfig, p: &ParamStore<T>, layer: usize) -> Result<Self> {
        let experts = (0..config.n_routed_experts)
            .map(|e| {
                Mlp::new(
                    p,
                    &format!("model.layers.{layer}.mlp.experts.{e}"),
                    config.hidden_size,
                    config.moe_intermediate_size,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self { experts })
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
        let mut per_expert = Vec::with_capacity(self.experts.len());
        let mut start = 0;
        for (e, mlp) in self.experts.iter().enumerate() {
            let m = disp.tokens_per_expert[e];
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
        let mut start = 0;
        for (e, saved) in s.per_expert.into_iter().enumerate() {
            let m = s.tokens_per_expert[e];
            let Some(saved) = saved else { continue };
            let mut dye = dy[start * d..(start + m) * d].to_vec();
            for (i, row) in dye.chunks_mut(d).enumerate() {
                let g = s.gate_weights[start + i];
                row.iter_mut().for_each(|v| *v *= g);
            }
            self.experts[e].backward_input(
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
