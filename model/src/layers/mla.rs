//! Multi-head Latent Attention with its input norm: the "attention" half of a decoder layer's residual
//! branch, y = MLA(RMSNorm_in(x)).
//!
//! Data flow (N = B·T rows, h = heads, d_qk = d_n + d_r):
//! xn = RMSNorm_in(x) [N,d]; c_q = RMSNorm_q(xn·W_qaᵀ) [N,r_q]; q = c_q·W_qbᵀ [N,h,d_qk] with RoPE on the
//! last d_r dims of each head; [c_raw ; k_pe] = xn·W_kvaᵀ [N, r_kv+d_r]; c_kv = RMSNorm_kv(c_raw); k_pe
//! gets RoPE and is shared by every head; [k_nope ; v] = c_kv·W_kvbᵀ [N,h,d_n+d_v]; k = [k_nope ; k_pe];
//! causal softmax attention with scale d_qk^−½; y = o·W_oᵀ [N,d].
//!
//! Invariant: RoPE rotates adjacent pairs at positions 0..T−1 of each sequence; the saved state holds
//! exactly the tensors the backward reads (no recomputation of GEMMs).

use super::norm::{NormSaved, RmsNorm};
use super::{WJob, WSink, pid};
use crate::ops::{AttnShape, attention_backward, attention_forward};
use crate::params::ParamStore;
use crate::precision::{LinInput, Linear, Runtime};
use crate::{ModelConfig, ModelError, Result};
use kernels::{Accumulate, Real};
use std::sync::Arc;

/// The MLA block of one decoder layer (input norm included).
#[derive(Debug, Clone)]
pub struct Mla {
    ln_in: RmsNorm,
    q_a: Linear,
    q_a_ln: RmsNorm,
    q_b: Linear,
    kv_a: Linear,
    kv_a_ln: RmsNorm,
    kv_b: Linear,
    o: Linear,
    h: usize,
    dn: usize,
    dr: usize,
    dv: usize,
    rkv: usize,
    theta: f64,
    scale: f64,
}

/// What MLA keeps for its backward (one micro-batch).
#[derive(Debug, Clone)]
pub struct MlaSaved<T: Real> {
    b: usize,
    t: usize,
    ln_in: NormSaved<T>,
    xn: Arc<LinInput<T>>,
    q_a_ln: NormSaved<T>,
    cq: Arc<LinInput<T>>,
    kv_a_ln: NormSaved<T>,
    ckv: Arc<LinInput<T>>,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    o: Vec<T>,
    lse: Vec<T>,
    o_in: Arc<LinInput<T>>,
}

impl Mla {
    /// Binds the MLA tensors of decoder layer `layer`.
    pub fn new<T: Real>(config: &ModelConfig, p: &ParamStore<T>, layer: usize) -> Result<Self> {
        let pre = format!("model.layers.{layer}");
        let d = config.hidden_size;
        let h = config.num_attention_heads;
        let rq = config.q_lora_rank.ok_or_else(|| {
            ModelError::Unsupported("q_lora_rank null (plain q_proj) is not implemented".into())
        })?;
        if config.rope_scaling.is_some() {
            return Err(ModelError::Unsupported(
                "rope_scaling (YaRN) is not implemented for training".into(),
            ));
        }
        if !config.rope_interleave {
            return Err(ModelError::Unsupported(
                "rope_interleave=false layouts are not implemented".into(),
            ));
        }
        let (dn, dr, dv, rkv) = (
            config.qk_nope_head_dim,
            config.qk_rope_head_dim,
            config.v_head_dim,
            config.kv_lora_rank,
        );
        let eps = config.rms_norm_eps;
        Ok(Self {
            ln_in: RmsNorm {
                w: pid(p, &pre, "input_layernorm.weight")?,
                d,
                eps,
            },
            q_a: Linear::new(pid(p, &pre, "self_attn.q_a_proj.weight")?, rq, d),
            q_a_ln: RmsNorm {
                w: pid(p, &pre, "self_attn.q_a_layernorm.weight")?,
                d: rq,
                eps,
            },
            q_b: Linear::new(
                pid(p, &pre, "self_attn.q_b_proj.weight")?,
                h * (dn + dr),
                rq,
            ),
            kv_a: Linear::new(
                pid(p, &pre, "self_attn.kv_a_proj_with_mqa.weight")?,
                rkv + dr,
                d,
            ),
            kv_a_ln: RmsNorm {
                w: pid(p, &pre, "self_attn.kv_a_layernorm.weight")?,
                d: rkv,
                eps,
            },
            kv_b: Linear::new(
                pid(p, &pre, "self_attn.kv_b_proj.weight")?,
                h * (dn + dv),
                rkv,
            ),
            o: Linear::new(pid(p, &pre, "self_attn.o_proj.weight")?, d, h * dv),
            h,
            dn,
            dr,
            dv,
            rkv,
            theta: config.rope_theta,
            scale: config.softmax_scale(),
        })
    }

    fn shape(&self, b: usize, t: usize) -> AttnShape {
        AttnShape {
            b,
            t,
            h: self.h,
            dqk: self.dn + self.dr,
            dv: self.dv,
        }
    }

    /// Forward: x [b·t, d] → y [b·t, d] (the residual branch, not yet added to x).
    pub fn forward<T: Real>(
        &self,
        rt: &Runtime,
        p: &ParamStore<T>,
        x: Vec<T>,
        b: usize,
        t: usize,
    ) -> Result<(Vec<T>, MlaSaved<T>)> {
        let n = b * t;
        let (h, dn, dr, dv, rkv) = (self.h, self.dn, self.dr, self.dv, self.rkv);
        let dqk = dn + dr;
        // xn [n, d]
        let (xn, ln_in) = self.ln_in.forward(p, x)?;
        let xn = Arc::new(self.q_a.input(rt, xn, n)?);
        // qa [n, r_q] → cq [n, r_q] → q [n, h, d_qk]
        let qa = self.q_a.forward(rt, p, &xn)?;
        let (cq, q_a_ln) = self.q_a_ln.forward(p, qa)?;
        let cq = Arc::new(self.q_b.input(rt, cq, n)?);
        let mut q = self.q_b.forward(rt, p, &cq)?;
        self.rope(&mut q, t, h, dqk, dn, false)?;
        // kva [n, r_kv + d_r] → c_kv [n, r_kv], k_pe [n, d_r]
        let kva = self.kv_a.forward(rt, p, &xn)?;
        let mut craw = Vec::with_capacity(n * rkv);
        let mut kpe = Vec::with_capacity(n * dr);
        for r in 0..n {
            craw.extend_from_slice(&kva[r * (rkv + dr)..r * (rkv + dr) + rkv]);
            kpe.extend_from_slice(&kva[r * (rkv + dr) + rkv..(r + 1) * (rkv + dr)]);
        }
        self.rope(&mut kpe, t, 1, dr, 0, false)?;
        let (ckv, kv_a_ln) = self.kv_a_ln.forward(p, craw)?;
        let ckv = Arc::new(self.kv_b.input(rt, ckv, n)?);
        // kv [n, h, d_n + d_v] → k [n, h, d_qk], v [n, h, d_v]
        let kv = self.kv_b.forward(rt, p, &ckv)?;
        let mut k = vec![T::ZERO; n * h * dqk];
        let mut v = vec![T::ZERO; n * h * dv];
        for r in 0..n {
            for hi in 0..h {
                let src = &kv[(r * h + hi) * (dn + dv)..][..dn + dv];
                let kd = &mut k[(r * h + hi) * dqk..][..dqk];
                kd[..dn].copy_from_slice(&src[..dn]);
                kd[dn..].copy_from_slice(&kpe[r * dr..(r + 1) * dr]);
                v[(r * h + hi) * dv..][..dv].copy_from_slice(&src[dn..]);
            }
        }
        // o [n, h·d_v] → y [n, d]
        let mut o = vec![T::ZERO; n * h * dv];
        let mut lse = vec![T::ZERO; b * h * t];
        attention_forward(
            &crate::profile::timed(crate::profile::Category::Attention, &rt.exec),
            &mut o,
            &mut lse,
            &q,
            &k,
            &v,
            self.shape(b, t),
            self.scale,
        )?;
        let o_in = Arc::new(self.o.input(rt, o.clone(), n)?);
        let y = self.o.forward(rt, p, &o_in)?;
        Ok((
            y,
            MlaSaved {
                b,
                t,
                ln_in,
                xn,
                q_a_ln,
                cq,
                kv_a_ln,
                ckv,
                q,
                k,
                v,
                o,
                lse,
                o_in,
            },
        ))
    }

    /// B: dx [b·t, d] (added into `dx`) from dy [b·t, d]; emits W-jobs for all seven MLA tensors.
    pub fn backward_input<T: Real>(
        &self,
        rt: &Runtime,
        p: &ParamStore<T>,
        dx: &mut [T],
        dy: Vec<T>,
        s: MlaSaved<T>,
        sink: &mut WSink<'_, T>,
    ) -> Result<()> {
        let (b, t) = (s.b, s.t);
        let n = b * t;
        let (h, dn, dr, dv, rkv) = (self.h, self.dn, self.dr, self.dv, self.rkv);
        let dqk = dn + dr;
        // do [n, h·d_v]
        let mut dout = vec![T::ZERO; n * h * dv];
        self.o
            .backward_input(rt, p, &mut dout, &dy, n, Accumulate::Overwrite)?;
        sink.push(WJob::Linear {
            lin: self.o,
            x: s.o_in,
            dy,
        })?;
        // dq, dk [n, h, d_qk], dv [n, h, d_v]
        let mut dq = vec![T::ZERO; n * h * dqk];
        let mut dk = vec![T::ZERO; n * h * dqk];
        let mut dvv = vec![T::ZERO; n * h * dv];
        attention_backward(
            &crate::profile::timed(crate::profile::Category::Attention, &rt.exec),
            &mut dq,
            &mut dk,
            &mut dvv,
            &dout,
            &s.q,
            &s.k,
            &s.v,
            &s.o,
            &s.lse,
            self.shape(b, t),
            self.scale,
        )?;
        // dkv [n, h, d_n + d_v]; dk_pe [n, d_r] summed over heads
        let mut dkv = vec![T::ZERO; n * h * (dn + dv)];
        let mut dkpe = vec![T::ZERO; n * dr];
        for r in 0..n {
            for hi in 0..h {
                let dst = &mut dkv[(r * h + hi) * (dn + dv)..][..dn + dv];
                let dkr = &dk[(r * h + hi) * dqk..][..dqk];
                dst[..dn].copy_from_slice(&dkr[..dn]);
                dst[dn..].copy_from_slice(&dvv[(r * h + hi) * dv..][..dv]);
                for c in 0..dr {
                    dkpe[r * dr + c] += dkr[dn + c];
                }
            }
        }
        let mut dckv = vec![T::ZERO; n * rkv];
        self.kv_b
            .backward_input(rt, p, &mut dckv, &dkv, n, Accumulate::Overwrite)?;
        sink.push(WJob::Linear {
            lin: self.kv_b,
            x: s.ckv,
            dy: dkv,
        })?;
        let mut dcraw = vec![T::ZERO; n * rkv];
        self.kv_a_ln.backward_input(
            p,
            &mut dcraw,
            Accumulate::Overwrite,
            dckv,
            &s.kv_a_ln,
            sink,
        )?;
        self.rope(&mut dkpe, t, 1, dr, 0, true)?;
        let mut dkva = Vec::with_capacity(n * (rkv + dr));
        for r in 0..n {
            dkva.extend_from_slice(&dcraw[r * rkv..(r + 1) * rkv]);
            dkva.extend_from_slice(&dkpe[r * dr..(r + 1) * dr]);
        }
        let d = self.ln_in.d;
        let mut dxn = vec![T::ZERO; n * d];
        self.kv_a
            .backward_input(rt, p, &mut dxn, &dkva, n, Accumulate::Overwrite)?;
        sink.push(WJob::Linear {
            lin: self.kv_a,
            x: s.xn.clone(),
            dy: dkva,
        })?;
        // Query path.
        self.rope(&mut dq, t, h, dqk, dn, true)?;
        let rq = self.q_a_ln.d;
        let mut dcq = vec![T::ZERO; n * rq];
        self.q_b
            .backward_input(rt, p, &mut dcq, &dq, n, Accumulate::Overwrite)?;
        sink.push(WJob::Linear {
            lin: self.q_b,
            x: s.cq,
            dy: dq,
        })?;
        let mut dqa = vec![T::ZERO; n * rq];
        self.q_a_ln
            .backward_input(p, &mut dqa, Accumulate::Overwrite, dcq, &s.q_a_ln, sink)?;
        self.q_a
            .backward_input(rt, p, &mut dxn, &dqa, n, Accumulate::Add)?;
        sink.push(WJob::Linear {
            lin: self.q_a,
            x: s.xn,
            dy: dqa,
        })?;
        // Input norm.
        self.ln_in
            .backward_input(p, dx, Accumulate::Add, dxn, &s.ln_in, sink)
    }

    /// Rotates the `d_r` RoPE dims at `offset` of every head row of `x` [b·t, heads, head_stride] in
    /// place with `kernels::rope_forward` (or, with `inverse`, `kernels::rope_backward`); positions
    /// restart at 0 in each sequence of `t` rows.
    fn rope<T: Real>(
        &self,
        x: &mut [T],
        t: usize,
        heads: usize,
        head_stride: usize,
        offset: usize,
        inverse: bool,
    ) -> Result<()> {
        let per_seq = t * heads * head_stride;
        if per_seq == 0 {
            return Ok(());
        }
        for seq in x.chunks_mut(per_seq) {
            if inverse {
                kernels::rope_backward(seq, t, heads, head_stride, offset, self.dr, self.theta, 0)?;
            } else {
                kernels::rope_forward(seq, t, heads, head_stride, offset, self.dr, self.theta, 0)?;
            }
        }
        Ok(())
    }
}
