//! Model-side adapters over `kernels` and the few ops `kernels` does not offer in the form the model
//! needs: batched causal attention (one `kernels` call per sequence), cross-entropy with masked rows
//! (positions without a target) and an f64 loss sum, and bf16 rounding of working buffers. RMSNorm, RoPE,
//! SwiGLU and sigmoid are called from `kernels` directly by the layers.
//!
//! Invariants: every op is generic over `kernels::Real` (f32 for training, f64 for finite-difference tests);
//! every reduction runs in a fixed order that depends only on the shapes, so results are bitwise
//! reproducible whatever the thread count. Cross-entropy statistics (softmax sums) accumulate in f64.
//! Buffers are row-major; shapes are given in the comments as [rows, cols].

// Layer calls take explicit buffers and dimensions (llm.c style), so long argument lists are the API.
#![allow(clippy::too_many_arguments)]

use kernels::{ExecCtx, Real};

/// Shapes of one attention call: `b` sequences of `t` tokens, `h` heads.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Sequences.
    pub b: usize,
    /// Tokens per sequence.
    pub t: usize,
    /// Heads.
    pub h: usize,
    /// Query/key head dim.
    pub dqk: usize,
    /// Value head dim.
    pub dv: usize,
}

/// Causal attention forward. q, k [b·t, h, dqk], v [b·t, h, dv] → o [b·t, h, dv] and lse [b·t, h]
/// (log-sum-exp of the scaled scores, for the backward). One `kernels::attention_forward` call per sequence.
pub fn attention_forward<T: Real>(
    ctx: &ExecCtx,
    o: &mut [T],
    lse: &mut [T],
    q: &[T],
    k: &[T],
    v: &[T],
    s: AttnShape,
    scale: f64,
) -> crate::Result<()> {
    let AttnShape { b, t, h, dqk, dv } = s;
    let (nq, nv) = (t * h * dqk, t * h * dv);
    for bi in 0..b {
        kernels::attention_forward(
            ctx,
            &mut o[bi * nv..(bi + 1) * nv],
            &mut lse[bi * t * h..(bi + 1) * t * h],
            &q[bi * nq..(bi + 1) * nq],
            &k[bi * nq..(bi + 1) * nq],
            &v[bi * nv..(bi + 1) * nv],
            t,
            h,
            dqk,
            dv,
            T::from_f64(scale),
        )?;
    }
    Ok(())
}

/// Causal attention backward: given do [b·t, h, dv] and the forward's q, k, v, o, lse, writes (overwrites)
/// dq, dk [b·t, h, dqk] and dv [b·t, h, dv]. One `kernels::attention_backward` call per sequence.
pub fn attention_backward<T: Real>(
    ctx: &ExecCtx,
    dq: &mut [T],
    dk: &mut [T],
    dvv: &mut [T],
    dout: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    lse: &[T],
    s: AttnShape,
    scale: f64,
) -> crate::Result<()> {
    let AttnShape { b, t, h, dqk, dv } = s;
    let (nq, nv) = (t * h * dqk, t * h * dv);
    for bi in 0..b {
        let (rq, rv) = (bi * nq..(bi + 1) * nq, bi * nv..(bi + 1) * nv);
        kernels::attention_backward(
            ctx,
            &mut dq[rq.clone()],
            &mut dk[rq.clone()],
            &mut dvv[rv.clone()],
            &dout[rv.clone()],
            &q[rq.clone()],
            &k[rq],
            &v[rv.clone()],
            &o[rv],
            &lse[bi * t * h..(bi + 1) * t * h],
            t,
            h,
            dqk,
            dv,
            T::from_f64(scale),
        )?;
    }
    Ok(())
}

/// Cross-entropy over rows of logits [n, v] with optional targets. Returns (Σ over rows with a target of
/// −log softmax[target], count). When `dlogits` is given, writes (softmax − onehot)·scale there (zero rows
/// for masked positions).
pub fn cross_entropy<T: Real>(
    logits: &[T],
    targets: &[Option<u32>],
    v: usize,
    mut dlogits: Option<(&mut [T], f64)>,
) -> (f64, usize) {
    let mut total = 0f64;
    let mut count = 0;
    for (r, tgt) in targets.iter().enumerate() {
        let z = &logits[r * v..(r + 1) * v];
        let Some(t) = tgt else {
            if let Some((d, _)) = dlogits.as_mut() {
                d[r * v..(r + 1) * v].iter_mut().for_each(|x| *x = T::ZERO);
            }
            continue;
        };
        let m = z
            .iter()
            .map(|x| x.to_f64())
            .fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = z.iter().map(|x| (x.to_f64() - m).exp()).sum();
        let lse = m + sum.ln();
        total += lse - z[*t as usize].to_f64();
        count += 1;
        if let Some((d, scale)) = dlogits.as_mut() {
            let dr = &mut d[r * v..(r + 1) * v];
            for j in 0..v {
                let p = (z[j].to_f64() - lse).exp();
                let oh = if j == *t as usize { 1.0 } else { 0.0 };
                dr[j] = T::from_f64((p - oh) * *scale);
            }
        }
    }
    (total, count)
}

/// Rounds an f32 to the nearest bf16 value (ties to even) and widens back.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    kernels::bf16_to_f32(kernels::f32_to_bf16(x))
}

/// Rounds every element of a slice to bf16 precision (through f32).
pub fn round_bf16_slice<T: Real>(x: &mut [T]) {
    for v in x.iter_mut() {
        *v = T::from_f64(round_bf16(v.to_f64() as f32) as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_entropy_of_uniform_logits_is_log_v() {
        let logits = vec![0.0f64; 3 * 8];
        let (l, c) = cross_entropy(&logits, &[Some(1), None, Some(7)], 8, None);
        assert_eq!(c, 2);
        assert!((l / 2.0 - (8f64).ln()).abs() < 1e-12);
    }
}
