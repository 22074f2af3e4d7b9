//! A decoder layer (pre-norm MLA + dense or MoE FFN), the MTP module and the output head.
//!
//! A layer is h = a + FFN(RMSNorm_post(a)) with a = x + MLA(x). For DualPipe it is split into callable
//! components: [`DecoderLayer::attn_forward`] (MLA, residual, post-norm and, for MoE, routing),
//! [`moe::dispatch`], [`DecoderLayer::experts_forward`] and [`DecoderLayer::combine_forward`] (shared
//! expert, routed sum, residual), with backward counterparts in reverse order.
//!
//! With expert parallelism ([`EpCall`]) the layer holds only its own block of routed experts: the forward
//! sends each dispatched row to its expert's owner and takes the gate-weighted outputs back, the
//! backward sends the rows' output gradients to the owners and takes their input and gate-weight
//! gradients back; the owner keeps its experts' saved state and weight-gradient jobs, so the routing rank
//! and the owner each run their part of B and W inside the same schedule op. Without it (or with a group
//! of one) everything stays local and no exchange is called.
//!
//! Invariant: a layer's backward consumes its saved state, so a micro-batch cannot be backpropagated twice.

use super::mla::{Mla, MlaSaved};
use super::mlp::{Mlp, MlpSaved};
use super::moe::{self, Dispatched, Experts, ExpertsSaved, OwnerMap, Router, Routing, RowFmt};
use super::norm::{Embedding, NormSaved, RmsNorm};
use super::{WJob, WSink, add_into, pid};
use crate::exchange::{EpCall, Phase};
use crate::params::ParamStore;
use crate::precision::{LinInput, Linear, Runtime};
use crate::{ModelConfig, ModelError, Result};
use arch::LayerKind;
use kernels::{Accumulate, Real};
use std::ops::Range;
use std::sync::Arc;

/// The FFN half of a layer.
#[derive(Debug, Clone)]
pub enum Ffn {
    /// Dense SwiGLU.
    Dense(Mlp),
    /// Routed experts + shared expert.
    Moe {
        /// The router.
        router: Router,
        /// Routed experts.
        experts: Experts,
        /// The fused shared expert(s), if any.
        shared: Option<Mlp>,
    },
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    /// Layer id (MTP blocks use num_hidden_layers + k − 1).
    pub layer: usize,
    mla: Mla,
    post_ln: RmsNorm,
    /// The FFN.
    pub ffn: Ffn,
    d: usize,
}

/// Output of the attention component.
#[derive(Debug, Clone)]
pub struct AttnOut<T: Real> {
    /// Residual stream after attention, a = x + MLA(x) [n, d].
    pub a: Vec<T>,
    /// FFN input u = RMSNorm_post(a) [n, d].
    pub u: Vec<T>,
    /// Routing decisions (MoE layers).
    pub routing: Option<Routing<T>>,
}

/// What the attention component keeps for its backward.
#[derive(Debug, Clone)]
pub struct AttnSaved<T: Real> {
    mla: MlaSaved<T>,
    post_ln: NormSaved<T>,
}

/// What the combine component keeps (the shared expert's state and the dispatch record).
#[derive(Debug, Clone)]
pub struct CombineSaved<T: Real> {
    shared: Option<MlpSaved<T>>,
}

/// Everything a layer keeps for its backward (one micro-batch).
#[derive(Debug, Clone)]
pub struct LayerSaved<T: Real> {
    attn: AttnSaved<T>,
    ffn: FfnSaved<T>,
}

#[derive(Debug, Clone)]
enum FfnSaved<T: Real> {
    Dense(MlpSaved<T>),
    Moe(Box<MoeSaved<T>>),
}

#[derive(Debug, Clone)]
struct MoeSaved<T: Real> {
    routing: Routing<T>,
    disp: Dispatched<T>,
    /// The state of the experts this rank ran (its own rows, or with expert parallelism the rows
    /// it received as an owner).
    experts: ExpertsSaved<T>,
    /// With expert parallelism: where the owner's rows came from.
    owner: Option<OwnerMap>,
    combine: CombineSaved<T>,
}

impl<T: Real> LayerSaved<T> {
    /// The routing decisions of an MoE layer's micro-batch.
    pub fn routing(&self) -> Option<&Routing<T>> {
        match &self.ffn {
            FfnSaved::Moe(m) => Some(&m.routing),
            FfnSaved::Dense(_) => None,
        }
    }
}

/// Per-layer forward statistics.
#[derive(Debug, Clone, Default)]
pub struct LayerStats {
    /// Balance-loss contribution (MoE layers).
    pub balance_loss: f64,
    /// Assignments per expert (MoE layers).
    pub expert_load: Option<Vec<u64>>,
}

impl DecoderLayer {
    /// Binds layer `layer`'s tensors; `alpha` is the balance-loss coefficient; `own` are the routed
    /// experts this rank holds (all of them without expert parallelism).
    pub fn new<T: Real>(
        config: &ModelConfig,
        p: &ParamStore<T>,
        layer: usize,
        alpha: f64,
        own: Range<usize>,
    ) -> Result<Self> {
        let d = config.hidden_size;
        let pre = format!("model.layers.{layer}");
        let ffn = match config.layer_kind(layer) {
            LayerKind::Dense => Ffn::Dense(Mlp::new(
                p,
                &format!("{pre}.mlp"),
                d,
                config.intermediate_size,
            )?),
            LayerKind::Moe => Ffn::Moe {
                router: Router::new(config, p, layer, alpha)?,
                experts: Experts::new(config, p, layer, own)?,
                shared: if config.n_shared_experts > 0 {
                    Some(Mlp::new(
                        p,
                        &format!("{pre}.mlp.shared_experts"),
                        d,
                        config.moe_intermediate_size * config.n_shared_experts,
                    )?)
                } else {
                    None
                },
            },
        };
        Ok(Self {
            layer,
            mla: Mla::new(config, p, layer)?,
            post_ln: RmsNorm {
                w: pid(p, &pre, "post_attention_layernorm.weight")?,
                d,
                eps: config.rms_norm_eps,
            },
            ffn,
            d,
        })
    }

    /// Attention component: x [b·t, d] → (a, u, routing). `bias` is required for MoE layers.
    pub fn attn_forward<T: Real>(
        &self,
        rt: &Runtime,
        p: &ParamStore<T>,
        x: Vec<T>,
        b: usize,
        t: usize,
        bias: Option<&[f32]>,
    ) -> Result<(AttnOut<T>, AttnSaved<T>)> {
        let mut a = x.clone();
        let (y, mla) = self.mla.forward(rt, p, x, b, t)?;
        add_into(&mut a, &y);
        let (u, post_ln) = self.post_ln.forward(p, a.clone())?;
        let routing = match &self.ffn {
            Ffn::Dense(_) => None,
            Ffn::Moe { router, .. } => {
                let bias = bias.ok_or_else(|| {
                    ModelError::Input(format!(
                        "layer {} is MoE but no routing bias was given",
                        self.layer
                    ))
                })?;
                Some(router.forward(rt, p, &u, b, bias)?)
            }
        };
        Ok((AttnOut { a, u, routing }, AttnSaved { mla, post_ln }))
    }

    /// The routed experts this layer holds (MoE layers only).
    pub fn own_experts(&self) -> Result<Range<usize>> {
        match &self.ffn {
            Ffn::Moe { experts, .. } => Ok(experts.own()),
            Ffn::Dense(_) => Err(ModelError::Input(format!(
                "layer {} is dense: no experts",
                self.layer
            ))),
        }
    }

    /// Experts component on dispatched rows (MoE layers only).
    pub fn experts_forward<T: Real>(
        &self,
        rt: &Runtime,
        p: &ParamStore<T>,
        disp: &Dispatched<T>,
    ) -> Result<(Vec<T>, ExpertsSaved<T>)> {
        match &self.ffn {
            Ffn::Moe { experts, .. } => experts.forward(rt, p, disp),
            Ffn::Dense(_) => Err(ModelError::Input(format!(
                "layer {} is dense: no experts",
                self.layer
            ))),
        }
    }

    /// Combine component: h = a + shared(u) + Σ routed rows (MoE layers only).
    pub fn combine_forward<T: Real>(
        &self,
        rt: &Runtime,
        p: &ParamStore<T>,
        a: Vec<T>,
        u: Vec<T>,
        y_perm: &[T],
        disp: &Dispatched<T>,
    ) -> Result<(Vec<T>, CombineSaved<T>)> {
        let Ffn::Moe { shared, .. } = &self.ffn else {
            return Err(ModelError::Input(format!(
                "layer {} is dense: no combine",
                self.layer
            )));
        };
        let mut h = a;
        let n = h.len() / self.d;
        let shared_saved = match shared {
            Some(mlp) => {
                let x = mlp.input(rt, u, n)?;
                let (ys, s) = mlp.forward(rt, p, x)?;
                add_into(&mut h, &ys);
                Some(s)
            }
            None => None,
        };
        moe::combine(&mut h, y_perm, disp);
        Ok((
            h,
            CombineSaved {
                shared: shared_saved,
            },
        ))
    }

    /// The whole layer forward: x [b·t, d] → h [b·t, d]. `ep` is the expert-parallel context (None:
    /// every routed expert is local).
    #[allow(clippy::type_complexity)]
    pub fn forward<T: Real>(
        &self,
        rt: &Runtime,
        p: &ParamStore<T>,
        x: Vec<T>,
        b: usize,
        t: usize,
        bias: Option<&[f32]>,
        ep: Option<EpCall<'_>>,
    ) -> Result<(Vec<T>, LayerSaved<T>, LayerStats)> {
        let n = b * t;
        let (out, attn) = self.attn_forward(rt, p, x, b, t, bias)?;
        match &self.ffn {
            Ffn::Dense(mlp) => {
                let mut h = out.a;
                let xin = mlp.input(rt, out.u, n)?;
                let (y, s) = mlp.forward(rt, p, xin)?;
                add_into(&mut h, &y);
                Ok((
                    h,
                    LayerSaved {
                        attn,
                        ffn: FfnSaved::Dense(s),
                    },
                    LayerStats::default(),
                ))
            }
            Ffn::Moe { .. } => {
                let routing = out
                    .routing
                    .ok_or_else(|| ModelError::Input("MoE layer without routing".into()))?;
                let ep = ep.filter(|e| e.exchange.size() > 1);
                let ranks = ep.map_or(1, |e| e.exchange.size());
                let mut disp = moe::dispatch(&out.u, &routing, self.d, ranks);
                let (y_perm, experts, owner) = match ep {
                    None => {
                        let (y, s) = self.experts_forward(rt, p, &disp)?;
                        (y, s, None)
                    }
                    Some(ep) => {
                        // Dispatch: rows to their experts' owners; as an owner, run the own experts on
                        // what every member sent; combine: the weighted rows back to their sources.
                        let (dfmt, cfmt) = RowFmt::for_precision(rt.precision);
                        let sent = moe::pack_dispatch(&rt.exec, &disp, dfmt)?;
                        let recv = ep.all_to_all(self.layer, Phase::Dispatch, sent)?;
                        let own = self.own_experts()?;
                        let (odisp, map) =
                            moe::receive_dispatch::<T>(&recv, self.d, disp.k, own, dfmt)?;
                        drop(recv);
                        let (y_owner, s) = self.experts_forward(rt, p, &odisp)?;
                        let back = map.scatter(&rt.exec, &y_owner, None, cfmt)?;
                        let back = ep.all_to_all(self.layer, Phase::Combine, back)?;
                        let (y, _) = moe::join_from_ranks(&back, &disp, false, cfmt)?;
                        (y, s, Some(map))
                    }
                };
                disp.x = Vec::new();
                let (h, combine) = self.combine_forward(rt, p, out.a, out.u, &y_perm, &disp)?;
                let stats = LayerStats {
                    balance_loss: routing.balance_loss,
                    expert_load: Some(routing.expert_load.clone()),
                };
                Ok((
                    h,
                    LayerSaved {
                        attn,
                        ffn: FfnSaved::Moe(Box::new(MoeSaved {
                            routing,
                            disp,
                            experts,
                            owner,
                            combine,
                        })),
                    },
                    stats,
                ))
            }
        }
    }

    /// Attention component backward: given the gradient on the residual a (da, [n, d]) and on the FFN
    /// input u (du, [n, d]), returns dx [n, d].
    pub fn attn_backward<T: Real>(
        &self,
        rt: &Runtime,
        p: &ParamStore<T>,
        mut da: Vec<T>,
        du: Vec<T>,
        s: AttnSaved<T>,
        sink: &mut WSink<'_, T>,
    ) -> Result<Vec<T>> {
        self.post_ln
            .backward_input(p, &mut da, Accumulate::Add, du, &s.post_ln, sink)?;
        let mut dx = da.clone();
        self.mla.backward_input(rt, p, &mut dx, da, s.mla, sink)?;
        Ok(dx)
    }

    /// Combine backward: dh [n, d] → (gradient of the gate-weighted expert rows [R, d], the shared
    /// expert's input gradient [n, d]). The residual part of dh passes to [`Self::attn_backward`] unchanged.
    pub fn combine_backward<T: Real>(
        &self,
        rt: &Runtime,
        p: &ParamStore<T>,
        dh: &[T],
        disp: &Dispatched<T>,
        s: CombineSaved<T>,
        sink: &mut WSink<'_, T>,
    ) -> Result<(Vec<T>, Vec<T>)> {
        let Ffn::Moe { shared, .. } = &self.ffn else {
            return Err(ModelError::Input(format!(
                "layer {} is dense: no combine",
                self.layer
            )));
        };
        let dperm = moe::combine_backward(dh, disp);
        let mut du = vec![T::ZERO; dh.len()];
        if let (Some(mlp), Some(ss)) = (shared, s.shared) {
            mlp.backward_input(rt, p, &mut du, Accumulate::Overwrite, dh.to_vec(), ss, sink)?;
        }
        Ok((dperm, du))
    }

    /// Experts backward: gradient of the weighted expert rows [R, d] → (dx_perm [R, d], dgate [R]).
    pub fn experts_backward<T: Real>(
        &self,
        rt: &Runtime,
        p: &ParamStore<T>,
        dperm: &[T],
        s: ExpertsSaved<T>,
        sink: &mut WSink<'_, T>,
    ) -> Result<(Vec<T>, Vec<T>)> {
        match &self.ffn {
            Ffn::Moe { experts, .. } => experts.backward_input(rt, p, dperm, s, sink),
            Ffn::Dense(_) => Err(ModelError::Input(format!(
                "layer {} is dense: no experts",
                self.layer
            ))),
        }
    }

    /// Dispatch backward (the gradient combine) and the router backward: adds the routed experts' input
    /// gradients and the router's (gate weights and balance loss) into du [n, d].
    pub fn dispatch_backward<T: Real>(
        &self,
        rt: &Runtime,
        p: &ParamStore<T>,
        du: &mut [T],
        dx_perm: &[T],
        dgate: &[T],
        disp: &Dispatched<T>,
        routing: Routing<T>,
        loss_scale: f64,
        sink: &mut WSink<'_, T>,
    ) -> Result<()> {
        let Ffn::Moe { router, .. } = &self.ffn else {
            return Err(ModelError::Input(format!(
                "layer {} is dense: no dispatch",
                self.layer
            )));
        };
        let mut dw = vec![T::ZERO; routing.n * routing.k];
        moe::dispatch_backward(du, &mut dw, dx_perm, dgate, disp);
        router.backward_input(rt, p, du, &dw, routing, loss_scale, sink)
    }

    /// B for the whole layer: dh [n, d] → dx [n, d]; `loss_scale` scales the balance-loss gradient;
    /// `ep` must be the context the forward ran with.
    pub fn backward_input<T: Real>(
        &self,
        rt: &Runtime,
        p: &ParamStore<T>,
        dh: Vec<T>,
        s: LayerSaved<T>,
        loss_scale: f64,
        ep: Option<EpCall<'_>>,
        sink: &mut WSink<'_, T>,
    ) -> Result<Vec<T>> {
        let n = dh.len() / self.d;
        let mut du = vec![T::ZERO; n * self.d];
        match (&self.ffn, s.ffn) {
            (Ffn::Dense(mlp), FfnSaved::Dense(ms)) => {
                mlp.backward_input(rt, p, &mut du, Accumulate::Overwrite, dh.clone(), ms, sink)?;
            }
            (Ffn::Moe { .. }, FfnSaved::Moe(ms)) => {
                let MoeSaved {
                    routing,
                    disp,
                    experts: es,
                    owner,
                    combine,
                } = *ms;
                // Combine backward (gradient dispatch + shared expert), experts backward, dispatch backward
                // (gradient combine) with the router.
                let (dperm, du_shared) = self.combine_backward(rt, p, &dh, &disp, combine, sink)?;
                du = du_shared;
                let ep = ep.filter(|e| e.exchange.size() > 1);
                let (dxp, dgate) = match (ep, owner) {
                    (None, None) => self.experts_backward(rt, p, &dperm, es, sink)?,
                    (Some(ep), Some(map)) => {
                        // The rows' output gradients go to their owners, which run their experts'
                        // B (keeping the W-jobs) and send back input and gate-weight gradients.
                        let (dfmt, cfmt) = RowFmt::for_precision(rt.precision);
                        let sent = moe::split_by_rank(&rt.exec, &dperm, &disp, dfmt)?;
                        drop(dperm);
                        let recv = ep.all_to_all(self.layer, Phase::GradDispatch, sent)?;
                        let dy_owner = map.gather::<T>(&recv, dfmt)?;
                        drop(recv);
                        let (dx_owner, dg_owner) =
                            self.experts_backward(rt, p, &dy_owner, es, sink)?;
                        let back = map.scatter(&rt.exec, &dx_owner, Some(&dg_owner), cfmt)?;
                        let back = ep.all_to_all(self.layer, Phase::GradCombine, back)?;
                        moe::join_from_ranks(&back, &disp, true, cfmt)?
                    }
                    _ => {
                        return Err(ModelError::Input(format!(
                            "layer {}: the backward's expert parallelism differs from the forward's",
                            self.layer
                        )));
                    }
                };
                self.dispatch_backward(
                    rt, p, &mut du, &dxp, &dgate, &disp, routing, loss_scale, sink,
                )?;
            }
            _ => {
                return Err(ModelError::Input(format!(
                    "layer {}: saved state does not match",
                    self.layer
                )));
            }
        }
        self.attn_backward(rt, p, dh, du, s.attn, sink)
    }
}

/// Final norm + output projection: logits = lm_head(RMSNorm(h)).
#[derive(Debug, Clone)]
pub struct Head {
    norm: RmsNorm,
    lm: Linear,
    /// Vocabulary size.
    pub vocab: usize,
}

/// What the head keeps for its backward.
#[derive(Debug, Clone)]
pub struct HeadSaved<T: Real> {
    norm: NormSaved<T>,
    x: Arc<LinInput<T>>,
}

impl Head {
    /// A head with norm weight `norm_name` and the shared `lm_head.weight`.
    pub fn new<T: Real>(config: &ModelConfig, p: &ParamStore<T>, norm_name: &str) -> Result<Self> {
        Ok(Self {
            norm: RmsNorm {
                w: p.require(norm_name)?,
                d: config.hidden_size,
                eps: config.rms_norm_eps,
            },
            lm: Linear::high_precision(
                p.require("lm_head.weight")?,
                config.vocab_size,
                config.hidden_size,
            ),
            vocab: config.vocab_size,
        })
    }

    /// Forward: h [n, d] → (normed h [n, d], logits [n, V]).
    pub fn forward<T: Real>(
        &self,
        rt: &Runtime,
        p: &ParamStore<T>,
        h: Vec<T>,
    ) -> Result<(Vec<T>, Vec<T>, HeadSaved<T>)> {
        let n = h.len() / self.norm.d;
        let (hn, norm) = self.norm.forward(p, h)?;
        let x = Arc::new(self.lm.input(rt, hn.clone(), n)?);
        let logits = self.lm.forward(rt, p, &x)?;
        Ok((hn, logits, HeadSaved { norm, x }))
    }

    /// B: dlogits [n, V] → dh [n, d] (added into `dh`).
    pub fn backward_input<T: Real>(
        &self,
        rt: &Runtime,
        p: &ParamStore<T>,
        dh: &mut [T],
        dlogits: Vec<T>,
        s: HeadSaved<T>,
        sink: &mut WSink<'_, T>,
    ) -> Result<()> {
        let n = s.x.rows();
        let mut dhn = vec![T::ZERO; n * self.norm.d];
        self.lm
            .backward_input(rt, p, &mut dhn, &dlogits, n, Accumulate::Overwrite)?;
        sink.push(WJob::Linear {
            lin: self.lm,
            x: s.x,
            dy: dlogits,
        })?;
        self.norm
            .backward_input(p, dh, Accumulate::Add, dhn, &s.norm, sink)
    }
}

/// MTP module k: h′ = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k−1}_i)]) → decoder block → shared head.
#[derive(Debug, Clone)]
pub struct MtpModule {
    /// Depth (1-based).
    pub k: usize,
    enorm: RmsNorm,
    hnorm: RmsNorm,
    eh: Linear,
    /// The decoder block.
    pub block: DecoderLayer,
    /// shared_head.norm + lm_head.
    pub head: Head,
    d: usize,
}

/// What an MTP module keeps for its backward.
#[derive(Debug, Clone)]
pub struct MtpSaved<T: Real> {
    b: usize,
    t_in: usize,
    tokens: Arc<Vec<u32>>,
    enorm: NormSaved<T>,
    hnorm: NormSaved<T>,
    cat: Arc<LinInput<T>>,
    block: LayerSaved<T>,
    head: HeadSaved<T>,
}

impl<T: Real> MtpSaved<T> {
    /// The routing decisions of the MTP block.
    pub fn routing(&self) -> Option<&Routing<T>> {
        self.block.routing()
    }
}

impl MtpModule {
    /// Binds MTP module `k` (layer id num_hidden_layers + k − 1), holding the routed experts `own`.
    pub fn new<T: Real>(
        config: &ModelConfig,
        p: &ParamStore<T>,
        k: usize,
        alpha: f64,
        own: Range<usize>,
    ) -> Result<Self> {
        let layer = config.num_hidden_layers + k - 1;
        let pre = format!("model.layers.{layer}");
        let d = config.hidden_size;
        let eps = config.rms_norm_eps;
        Ok(Self {
            k,
            enorm: RmsNorm {
                w: pid(p, &pre, "enorm.weight")?,
                d,
                eps,
            },
            hnorm: RmsNorm {
                w: pid(p, &pre, "hnorm.weight")?,
                d,
                eps,
            },
            eh: Linear::high_precision(pid(p, &pre, "eh_proj.weight")?, d, 2 * d),
            block: DecoderLayer::new(config, p, layer, alpha, own)?,
            head: Head::new(config, p, &format!("{pre}.shared_head.norm.weight"))?,
            d,
        })
    }

    /// Forward. `h_prev` [b, t_in, d] is h^{k−1} (t_in = T − k + 1); `tokens` [b, T]. Uses the first
    /// t_in − 1 = T − k positions. Returns (h^k [b, T−k, d], logits [b, T−k, V], saved, layer stats).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    pub fn forward<T: Real>(
        &self,
        rt: &Runtime,
        p: &ParamStore<T>,
        embed: &Embedding,
        h_prev: &[T],
        tokens: &[u32],
        b: usize,
        t_full: usize,
        bias: Option<&[f32]>,
        ep: Option<EpCall<'_>>,
    ) -> Result<(Vec<T>, Vec<T>, MtpSaved<T>, LayerStats)> {
        let d = self.d;
        let k = self.k;
        let t_in = t_full - k + 1;
        let t_out = t_full - k;
        let mut toks = Vec::with_capacity(b * t_out);
        let mut hsel = Vec::with_capacity(b * t_out * d);
        for bi in 0..b {
            for i in 0..t_out {
                toks.push(tokens[bi * t_full + i + k]);
                hsel.extend_from_slice(&h_prev[(bi * t_in + i) * d..(bi * t_in + i + 1) * d]);
            }
        }
        let n = b * t_out;
        let emb = embed.forward(p, &toks)?;
        let (en, enorm) = self.enorm.forward(p, emb)?;
        let (hn, hnorm) = self.hnorm.forward(p, hsel)?;
        let mut cat = Vec::with_capacity(n * 2 * d);
        for r in 0..n {
            cat.extend_from_slice(&en[r * d..(r + 1) * d]);
            cat.extend_from_slice(&hn[r * d..(r + 1) * d]);
        }
        let cat = Arc::new(self.eh.input(rt, cat, n)?);
        let x = self.eh.forward(rt, p, &cat)?;
        let (hk, block, stats) = self.block.forward(rt, p, x, b, t_out, bias, ep)?;
        let (_, logits, head) = self.head.forward(rt, p, hk.clone())?;
        let saved = MtpSaved {
            b,
            t_in,
            tokens: Arc::new(toks),
            enorm,
            hnorm,
            cat,
            block,
            head,
        };
        Ok((hk, logits, saved, stats))
    }

    /// B: from dlogits [b, T−k, V] and the gradient flowing into h^k from deeper modules (`dh_k`, same
    /// shape as h^k, zeros if none), adds the gradient for h^{k−1} into `dh_prev` [b, t_in, d] and emits
    /// the embedding job for the shared table.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_input<T: Real>(
        &self,
        rt: &Runtime,
        p: &ParamStore<T>,
        embed: &Embedding,
        dh_prev: &mut [T],
        dlogits: Vec<T>,
        mut dh_k: Vec<T>,
        s: MtpSaved<T>,
        loss_scale: f64,
        ep: Option<EpCall<'_>>,
        sink: &mut WSink<'_, T>,
    ) -> Result<()> {
        let d = self.d;
        let n = s.cat.rows();
        self.head
            .backward_input(rt, p, &mut dh_k, dlogits, s.head, sink)?;
        let dx = self
            .block
            .backward_input(rt, p, dh_k, s.block, loss_scale, ep, sink)?;
        let mut dcat = vec![T::ZERO; n * 2 * d];
        self.eh
            .backward_input(rt, p, &mut dcat, &dx, n, Accumulate::Overwrite)?;
        sink.push(WJob::Linear {
            lin: self.eh,
            x: s.cat,
            dy: dx,
        })?;
        let mut den = Vec::with_capacity(n * d);
        let mut dhn = Vec::with_capacity(n * d);
        for r in 0..n {
            den.extend_from_slice(&dcat[r * 2 * d..r * 2 * d + d]);
            dhn.extend_from_slice(&dcat[r * 2 * d + d..(r + 1) * 2 * d]);
        }
        let mut dhsel = vec![T::ZERO; n * d];
        self.hnorm
            .backward_input(p, &mut dhsel, Accumulate::Overwrite, dhn, &s.hnorm, sink)?;
        let t_out = s.t_in - 1;
        for bi in 0..s.b {
            for i in 0..t_out {
                let src = &dhsel[(bi * t_out + i) * d..(bi * t_out + i + 1) * d];
                add_into(
                    &mut dh_prev[(bi * s.t_in + i) * d..(bi * s.t_in + i + 1) * d],
                    src,
                );
            }
        }
        let mut demb = vec![T::ZERO; n * d];
        self.enorm
            .backward_input(p, &mut demb, Accumulate::Overwrite, den, &s.enorm, sink)?;
        embed.backward(s.tokens, demb, sink)
    }
}
