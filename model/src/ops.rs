//! Row-wise numeric ops the layers need that are simple enough to keep next to the model: RMSNorm,
//! adjacent-pair RoPE, causal attention with a saved log-sum-exp, SwiGLU, sigmoid, cross-entropy and
//! bf16 rounding. GEMMs and the attention core come from `kernels`.
//!
//! Invariants: every op is generic over `kernels::Real` (f32 for training, f64 for finite-difference tests);
//! every reduction runs in a fixed order that depends only on the shapes, so results are bitwise
//! reproducible whatever the thread count. Statistics (norm mean-squares, softmax sums) accumulate in f64.
//! Buffers are row-major; shapes are given in the comments as [rows, cols].

// Layer calls take explicit buffers and dimensions (llm.c style), so long argument lists are the API.
#![allow(clippy::too_many_arguments)]

use kernels::{ExecCtx, Real};

/// RMSNorm forward. x [n, d], w [d] → y [n, d], rstd [n] = 1/sqrt(mean(x²) + eps).
pub fn rmsnorm_forward<T: Real>(
    y: &mut [T],
    rstd: &mut [T],
    x: &[T],
    w: &[T],
    n: usize,
    d: usize,
    eps: f64,
) {
    for r in 0..n {
        let xr = &x[r * d..(r + 1) * d];
        let ms = xr.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>() / d as f64;
        let s = T::from_f64(1.0 / (ms + eps).sqrt());
        rstd[r] = s;
        for j in 0..d {
            y[r * d + j] = w[j] * (xr[j] * s);
        }
    }
}

/// RMSNorm input gradient, accumulated into dx [n, d]: dx += r·(w⊙dy) − x·r³·⟨w⊙dy, x⟩/d.
pub fn rmsnorm_backward_input<T: Real>(
    dx: &mut [T],
    dy: &[T],
    x: &[T],
    w: &[T],
    rstd: &[T],
    n: usize,
    d: usize,
) {
    for r in 0..n {
        let xr = &x[r * d..(r + 1) * d];
        let dyr = &dy[r * d..(r + 1) * d];
        let dot = (0..d)
            .map(|j| (w[j] * dyr[j]).to_f64() * xr[j].to_f64())
            .sum::<f64>();
        let s = rstd[r];
        let c = T::from_f64(dot * s.to_f64().powi(3) / d as f64);
        for j in 0..d {
            dx[r * d + j] += s * (w[j] * dyr[j]) - xr[j] * c;
        }
    }
}

/// RMSNorm weight gradient, accumulated: dw [d] += Σ_rows dy ⊙ x·rstd.
pub fn rmsnorm_backward_weight<T: Real>(
    dw: &mut [T],
    dy: &[T],
    x: &[T],
    rstd: &[T],
    n: usize,
    d: usize,
) {
    for r in 0..n {
        let s = rstd[r];
        for j in 0..d {
            dw[j] += dy[r * d + j] * (x[r * d + j] * s);
        }
    }
}

/// RoPE angle table for positions 0..t and `dr` rotary dims: (cos, sin), each [t, dr/2];
/// pair i of position p rotates by p·θ^(−2i/dr).
pub fn rope_table<T: Real>(t: usize, dr: usize, theta: f64) -> (Vec<T>, Vec<T>) {
    let half = dr / 2;
    let mut cos = Vec::with_capacity(t * half);
    let mut sin = Vec::with_capacity(t * half);
    for p in 0..t {
        for i in 0..half {
            let f = theta.powf(-2.0 * i as f64 / dr as f64);
            // Angles are formed in f32 like the reference implementation, then widened.
            let ang = (p as f32 * f as f32) as f64;
            cos.push(T::from_f64(ang.cos()));
            sin.push(T::from_f64(ang.sin()));
        }
    }
    (cos, sin)
}

/// Rotates adjacent pairs (x[2i], x[2i+1]) in place. `x` holds `rows` rows of `stride` elements; within a
/// row, `heads` blocks of `head_stride` elements each have `dr` rotary dims starting at `offset`. Row r is
/// at sequence position r % seq. `inverse` rotates by the negative angle (the backward pass).
#[allow(clippy::too_many_arguments)]
pub fn rope_apply<T: Real>(
    x: &mut [T],
    rows: usize,
    stride: usize,
    heads: usize,
    head_stride: usize,
    offset: usize,
    dr: usize,
    seq: usize,
    table: &(Vec<T>, Vec<T>),
    inverse: bool,
) {
    let half = dr / 2;
    for r in 0..rows {
        let p = r % seq;
        for h in 0..heads {
            let base = r * stride + h * head_stride + offset;
            for i in 0..half {
                let c = table.0[p * half + i];
                let s = if inverse {
                    -table.1[p * half + i]
                } else {
                    table.1[p * half + i]
                };
                let a = x[base + 2 * i];
                let b = x[base + 2 * i + 1];
                x[base + 2 * i] = a * c - b * s;
                x[base + 2 * i + 1] = a * s + b * c;
            }
        }
    }
}

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

/// Logistic sigmoid.
#[inline]
pub fn sigmoid<T: Real>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

/// SwiGLU forward: act = silu(g) ⊙ u, all [n].
pub fn swiglu_forward<T: Real>(act: &mut [T], g: &[T], u: &[T]) {
    for i in 0..act.len() {
        act[i] = g[i] * sigmoid(g[i]) * u[i];
    }
}

/// SwiGLU backward: from dact, writes dg and du (overwrite).
pub fn swiglu_backward<T: Real>(dg: &mut [T], du: &mut [T], dact: &[T], g: &[T], u: &[T]) {
    for i in 0..dact.len() {
        let s = sigmoid(g[i]);
        let silu = g[i] * s;
        du[i] = dact[i] * silu;
        dg[i] = dact[i] * u[i] * (s * (T::ONE + g[i] * (T::ONE - s)));
    }
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
    half::bf16::from_f32(x).to_f32()
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
    fn rope_inverse_undoes_forward() {
        let table = rope_table::<f64>(5, 4, 10000.0);
        let orig: Vec<f64> = (0..5 * 2 * 6).map(|i| (i as f64 * 0.37).sin()).collect();
        let mut x = orig.clone();
        rope_apply(&mut x, 5, 12, 2, 6, 2, 4, 5, &table, false);
        assert_ne!(x, orig);
        // Position 0 is not rotated.
        assert_eq!(x[..12], orig[..12]);
        rope_apply(&mut x, 5, 12, 2, 6, 2, 4, 5, &table, true);
        for (a, b) in x.iter().zip(&orig) {
            assert!((a - b).abs() < 1e-12);
        }
    }

    #[test]
    fn cross_entropy_of_uniform_logits_is_log_v() {
        let logits = vec![0.0f64; 3 * 8];
        let (l, c) = cross_entropy(&logits, &[Some(1), None, Some(7)], 8, None);
        assert_eq!(c, 2);
        assert!((l / 2.0 - (8f64).ln()).abs() < 1e-12);
    }
}
