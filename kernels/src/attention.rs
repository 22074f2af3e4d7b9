//! Causal multi-head attention in the MLA head layout, forward and backward, flash-style over row blocks.
//!
//! Layouts (row-major): q, k [T, H, dqk]; v, out [T, H, dv]; lse [T, H] (natural-log row log-sum-exp of
//! the scaled, masked scores, saved for the backward). Scores are `scale · q·kᵀ`, masked causally (key
//! j ≤ query i), softmax in the working precision (f32 for the model).
//!
//! Invariant: at most one [BR × T] score block (BR = 64 rows) per head and worker exists at a time —
//! never a full [T × T] matrix; the work split is (head, row block) for the forward and head for the
//! backward, fixed by the shape alone, so results are the same bits for any thread budget.

use crate::exec::{Accumulate, ExecCtx, SendPtr};
use crate::matmul::{View, gemm_raw};
use crate::real::{Real, dot, max_of, sum};
use crate::{Result, check_len, dims};

/// Query rows per score block.
const BR: usize = 64;

/// Softmax of the live (unmasked) part of one score row, in place; returns the row's log-sum-exp.
#[inline(always)]
fn softmax_row_impl<T: Real>(live: &mut [T]) -> T {
    let m = max_of(live);
    live.iter_mut().for_each(|x| *x = (*x - m).exp_fast());
    let s = sum(live);
    let inv = T::ONE / s;
    live.iter_mut().for_each(|x| *x *= inv);
    m + s.ln()
}

/// Recomputes probabilities from scores and the saved log-sum-exp, in place.
#[inline(always)]
fn probs_row_impl<T: Real>(live: &mut [T], lse: T) {
    live.iter_mut().for_each(|x| *x = (*x - lse).exp_fast());
}

/// `ds = p ⊙ (dp − d)` in place over `dp`.
#[inline(always)]
fn dscore_row_impl<T: Real>(dp: &mut [T], p: &[T], d: T) {
    dp.iter_mut().zip(p).for_each(|(g, &pv)| *g = pv * (*g - d));
}

// Wide builds of the row helpers (same operations, so the same bits; Rust never contracts to FMA).
crate::simd::multiversion!(fn softmax_row<T: Real>(live: &mut [T]) -> T = softmax_row_impl);
crate::simd::multiversion!(fn probs_row<T: Real>(live: &mut [T], lse: T) -> () = probs_row_impl);
crate::simd::multiversion!(fn dscore_row<T: Real>(dp: &mut [T], p: &[T], d: T) -> () = dscore_row_impl);

fn check<T>(
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[T],
    t: usize,
    h: usize,
    dqk: usize,
    dv: usize,
) -> Result<()> {
    let nqk = dims(&[t, h, dqk])?;
    let nv = dims(&[t, h, dv])?;
    check_len("q", q.len(), nqk)?;
    check_len("k", k.len(), nqk)?;
    check_len("v", v.len(), nv)?;
    check_len("out", out.len(), nv)?;
    check_len("lse", lse.len(), dims(&[t, h])?)
}

/// Forward: `out[i, h, :] = Σ_{j ≤ i} softmax_j(scale · q[i,h,:]·k[j,h,:]) · v[j, h, :]`, and `lse[i, h]`.
/// Overwrites `out` and `lse`.
pub fn attention_forward<T: Real>(
    ctx: &ExecCtx,
    out: &mut [T],
    lse: &mut [T],
    q: &[T],
    k: &[T],
    v: &[T],
    t: usize,
    h: usize,
    dqk: usize,
    dv: usize,
    scale: T,
) -> Result<()> {
    check(q, k, v, out, lse, t, h, dqk, dv)?;
    let nb = t.div_ceil(BR);
    let (out_p, lse_p) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    let (hq, hv) = ((h * dqk) as isize, (h * dv) as isize);
    ctx.for_each_index_init(
        h * nb,
        || vec![T::ZERO; BR * t],
        |s, task| {
            let (hi, b) = (task / nb, task % nb);
            let (i0, i1) = (b * BR, ((b + 1) * BR).min(t));
            let (br, nk) = (i1 - i0, i1);
            // SAFETY: q/k/v lengths were checked; the S block has br·nk ≤ BR·t elements. Task (hi, b) writes
            // only out rows i0..i1 at head hi's columns and lse[i0..i1, hi], disjoint from every other task.
            unsafe {
                gemm_raw(
                    gemm::Parallelism::None,
                    br,
                    nk,
                    dqk,
                    s.as_mut_ptr(),
                    nk as isize,
                    1,
                    Accumulate::Overwrite,
                    View {
                        ptr: q.as_ptr().add((i0 * h + hi) * dqk),
                        rs: hq,
                        cs: 1,
                    },
                    View {
                        ptr: k.as_ptr().add(hi * dqk),
                        rs: 1,
                        cs: hq,
                    },
                    scale,
                );
            }
            for bi in 0..br {
                let i = i0 + bi;
                let row = &mut s[bi * nk..(bi + 1) * nk];
                let (live, masked) = row.split_at_mut(i + 1);
                let l = softmax_row(live);
                masked.fill(T::ZERO);
                // SAFETY: index (i, hi) < t·h, owned by this task.
                unsafe { *lse_p.get().add(i * h + hi) = l };
            }
            // SAFETY: as above; out rows i0..i1, head hi columns are this task's alone.
            unsafe {
                gemm_raw(
                    gemm::Parallelism::None,
                    br,
                    dv,
                    nk,
                    out_p.get().add((i0 * h + hi) * dv),
                    hv,
                    1,
                    Accumulate::Overwrite,
                    View {
                        ptr: s.as_ptr(),
                        rs: nk as isize,
                        cs: 1,
                    },
                    View {
                        ptr: v.as_ptr().add(hi * dv),
                        rs: hv,
                        cs: 1,
                    },
                    T::ONE,
                );
            }
        },
    );
    Ok(())
}

/// Backward of [`attention_forward`] given `dout` [T, H, dv] and the forward's `out` and `lse`.
/// Overwrites `dq`, `dk` [T, H, dqk] and `dv_out` [T, H, dv].
pub fn attention_backward<T: Real>(
    ctx: &ExecCtx,
    dq: &mut [T],
    dk: &mut [T],
    dv_out: &mut [T],
    dout: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[T],
    t: usize,
    h: usize,
    dqk: usize,
    dv: usize,
    scale: T,
) -> Result<()> {
    check(q, k, v, out, lse, t, h, dqk, dv)?;
    check_len("dq", dq.len(), q.len())?;
    check_len("dk", dk.len(), k.len())?;
    check_len("dv_out", dv_out.len(), v.len())?;
    check_len("dout", dout.len(), v.len())?;
    let nb = t.div_ceil(BR);
    let (dq_p, dk_p, dv_p) = (
        SendPtr(dq.as_mut_ptr()),
        SendPtr(dk.as_mut_ptr()),
        SendPtr(dv_out.as_mut_ptr()),
    );
    let (hq, hv) = ((h * dqk) as isize, (h * dv) as isize);
    let none = gemm::Parallelism::None;
    ctx.for_each_index_init(
        h,
        || {
            (
                vec![T::ZERO; BR * t],
                vec![T::ZERO; BR * t],
                vec![T::ZERO; t],
            )
        },
        |(p, dp, drow), hi| {
            // SAFETY (whole task): lengths were checked; task hi reads shared inputs and writes only head hi's
            // columns of dq, dk and dv_out, which no other task touches.
            for (i, d) in drow.iter_mut().enumerate() {
                let o = (i * h + hi) * dv;
                *d = dot(&dout[o..o + dv], &out[o..o + dv]);
                for j in 0..dqk {
                    unsafe { *dk_p.get().add((i * h + hi) * dqk + j) = T::ZERO };
                }
                for j in 0..dv {
                    unsafe { *dv_p.get().add(o + j) = T::ZERO };
                }
            }
            for b in 0..nb {
                let (i0, i1) = (b * BR, ((b + 1) * BR).min(t));
                let (br, nk) = (i1 - i0, i1);
                let (q_blk, do_blk) = (unsafe { q.as_ptr().add((i0 * h + hi) * dqk) }, unsafe {
                    dout.as_ptr().add((i0 * h + hi) * dv)
                });
                unsafe {
                    gemm_raw(
                        none,
                        br,
                        nk,
                        dqk,
                        p.as_mut_ptr(),
                        nk as isize,
                        1,
                        Accumulate::Overwrite,
                        View {
                            ptr: q_blk,
                            rs: hq,
                            cs: 1,
                        },
                        View {
                            ptr: k.as_ptr().add(hi * dqk),
                            rs: 1,
                            cs: hq,
                        },
                        scale,
                    );
                }
                for bi in 0..br {
                    let i = i0 + bi;
                    let l = lse[i * h + hi];
                    let row = &mut p[bi * nk..(bi + 1) * nk];
                    let (live, masked) = row.split_at_mut(i + 1);
                    probs_row(live, l);
                    masked.fill(T::ZERO);
                }
                unsafe {
                    // dV[0..nk] += Pᵀ · dO_blk.
                    gemm_raw(
                        none,
                        nk,
                        dv,
                        br,
                        dv_p.get().add(hi * dv),
                        hv,
                        1,
                        Accumulate::Add,
                        View {
                            ptr: p.as_ptr(),
                            rs: 1,
                            cs: nk as isize,
                        },
                        View {
                            ptr: do_blk,
                            rs: hv,
                            cs: 1,
                        },
                        T::ONE,
                    );
                    // dP = dO_blk · Vᵀ.
                    gemm_raw(
                        none,
                        br,
                        nk,
                        dv,
                        dp.as_mut_ptr(),
                        nk as isize,
                        1,
                        Accumulate::Overwrite,
                        View {
                            ptr: do_blk,
                            rs: hv,
                            cs: 1,
                        },
                        View {
                            ptr: v.as_ptr().add(hi * dv),
                            rs: 1,
                            cs: hv,
                        },
                        T::ONE,
                    );
                }
                // dS = P ⊙ (dP − D) (masked entries have P = 0).
                for bi in 0..br {
                    let d = drow[i0 + bi];
                    let (pr, dr) = (&p[bi * nk..(bi + 1) * nk], &mut dp[bi * nk..(bi + 1) * nk]);
                    dscore_row(dr, pr, d);
                }
                unsafe {
                    // dQ_blk = scale · dS · K.
                    gemm_raw(
                        none,
                        br,
                        dqk,
                        nk,
                        dq_p.get().add((i0 * h + hi) * dqk),
                        hq,
                        1,
                        Accumulate::Overwrite,
                        View {
                            ptr: dp.as_ptr(),
                            rs: nk as isize,
                            cs: 1,
                        },
                        View {
                            ptr: k.as_ptr().add(hi * dqk),
                            rs: hq,
                            cs: 1,
                        },
                        scale,
                    );
                    // dK[0..nk] += scale · dSᵀ · Q_blk.
                    gemm_raw(
                        none,
                        nk,
                        dqk,
                        br,
                        dk_p.get().add(hi * dqk),
                        hq,
                        1,
                        Accumulate::Add,
                        View {
                            ptr: dp.as_ptr(),
                            rs: 1,
                            cs: nk as isize,
                        },
                        View {
                            ptr: q_blk,
                            rs: hq,
                            cs: 1,
                        },
                        scale,
                    );
                }
            }
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{Rng, assert_close, fd_check, wsum};

    /// Naive f64 reference: full score matrix per head.
    fn reference(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        t: usize,
        h: usize,
        dqk: usize,
        dv: usize,
        scale: f64,
    ) -> Vec<f64> {
        let mut out = vec![0.0; t * h * dv];
        for hi in 0..h {
            for i in 0..t {
                let s: Vec<f64> = (0..=i)
                    .map(|j| {
                        scale
                            * (0..dqk)
                                .map(|c| q[(i * h + hi) * dqk + c] * k[(j * h + hi) * dqk + c])
                                .sum::<f64>()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for (j, x) in s.iter().enumerate() {
                    for c in 0..dv {
                        out[(i * h + hi) * dv + c] += (x - m).exp() / z * v[(j * h + hi) * dv + c];
                    }
                }
            }
        }
        out
    }

    #[test]
    fn forward_matches_reference_and_backward_matches_fd() {
        let mut rng = Rng::seeded("attention");
        // t > BR so several row blocks (and a partial one) are exercised.
        let (t, h, dqk, dv) = (70, 2, 5, 3);
        let scale = 1.0 / (dqk as f64).sqrt();
        let q: Vec<f64> = rng.vec(t * h * dqk).iter().map(|x| 2.0 * x).collect();
        let k: Vec<f64> = rng.vec(t * h * dqk).iter().map(|x| 2.0 * x).collect();
        let v = rng.vec(t * h * dv);
        let r = rng.vec(t * h * dv);
        let ctx = ExecCtx::cpu(2);
        let fwd = |q: &[f64], k: &[f64], v: &[f64]| {
            let mut out = vec![0.0; t * h * dv];
            let mut lse = vec![0.0; t * h];
            attention_forward(&ctx, &mut out, &mut lse, q, k, v, t, h, dqk, dv, scale).unwrap();
            (out, lse)
        };
        let (out, lse) = fwd(&q, &k, &v);
        assert_close(
            &out,
            &reference(&q, &k, &v, t, h, dqk, dv, scale),
            1e-13,
            "forward",
        );
        let (mut dq, mut dk, mut dvv) =
            (vec![9.0; q.len()], vec![9.0; k.len()], vec![9.0; v.len()]);
        attention_backward(
            &ctx, &mut dq, &mut dk, &mut dvv, &r, &q, &k, &v, &out, &lse, t, h, dqk, dv, scale,
        )
        .unwrap();
        fd_check(
            &|q| wsum(&r, &fwd(q, &k, &v).0),
            &q,
            &dq,
            1e-7,
            rng.seed,
            "attention dq",
        );
        fd_check(
            &|k| wsum(&r, &fwd(&q, k, &v).0),
            &k,
            &dk,
            1e-7,
            rng.seed,
            "attention dk",
        );
        fd_check(
            &|v| wsum(&r, &fwd(&q, &k, v).0),
            &v,
            &dvv,
            1e-7,
            rng.seed,
            "attention dv",
        );
    }

    #[test]
    fn f32_forward_is_accurate() {
        let mut rng = Rng::seeded("attention-f32");
        let (t, h, dqk, dv) = (100, 2, 48, 32);
        let q: Vec<f64> = rng.vec(t * h * dqk).iter().map(|x| 3.0 * x).collect();
        let k: Vec<f64> = rng.vec(t * h * dqk).iter().map(|x| 3.0 * x).collect();
        let v = rng.vec(t * h * dv);
        let f = |a: &[f64]| a.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let (mut out, mut lse) = (vec![0f32; t * h * dv], vec![0f32; t * h]);
        let scale = 48f64.powf(-0.5);
        attention_forward(
            &ExecCtx::cpu(2),
            &mut out,
            &mut lse,
            &f(&q),
            &f(&k),
            &f(&v),
            t,
            h,
            dqk,
            dv,
            scale as f32,
        )
        .unwrap();
        assert_close(
            &out,
            &reference(&q, &k, &v, t, h, dqk, dv, scale),
            1e-6,
            "f32 forward",
        );
    }

    #[test]
    fn simd_builds_give_baseline_bits() {
        let mut rng = Rng::seeded("attention-simd");
        let x: Vec<f32> = rng.vec_f32(1000).iter().map(|v| v * 30.0).collect();
        let (mut a, mut b) = (x.clone(), x.clone());
        assert_eq!(
            softmax_row(&mut a).to_bits(),
            softmax_row_impl(&mut b).to_bits()
        );
        assert_eq!(a, b);
        let (mut a, mut b) = (x.clone(), x.clone());
        probs_row(&mut a, 3.0);
        probs_row_impl(&mut b, 3.0);
        assert_eq!(a, b);
    }

    #[test]
    fn same_bits_for_any_thread_budget() {
        let mut rng = Rng::seeded("attention-det");
        let (t, h, dqk, dv) = (150, 3, 48, 32);
        let q = rng.vec_f32(t * h * dqk);
        let k = rng.vec_f32(t * h * dqk);
        let v = rng.vec_f32(t * h * dv);
        let run = |threads| {
            let ctx = ExecCtx::cpu(threads);
            let mut out = vec![0f32; t * h * dv];
            let mut lse = vec![0f32; t * h];
            attention_forward(&ctx, &mut out, &mut lse, &q, &k, &v, t, h, dqk, dv, 0.2).unwrap();
            let (mut dq, mut dk, mut dvv) = (
                vec![0f32; q.len()],
                vec![0f32; k.len()],
                vec![0f32; v.len()],
            );
            attention_backward(
                &ctx, &mut dq, &mut dk, &mut dvv, &v, &q, &k, &v, &out, &lse, t, h, dqk, dv, 0.2,
            )
            .unwrap();
            [out, lse, dq, dk, dvv]
                .concat()
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        };
        let base = run(1);
        assert_eq!(base, run(2));
        assert_eq!(base, run(3));
    }

    #[test]
    fn shape_errors() {
        let ctx = ExecCtx::cpu(1);
        let mut out = vec![0f32; 6];
        let mut lse = vec![0f32; 2];
        assert!(
            attention_forward(
                &ctx, &mut out, &mut lse, &[0.0; 8], &[0.0; 8], &[0.0; 6], 2, 1, 4, 3, 1.0
            )
            .is_ok()
        );
        assert!(
            attention_forward(
                &ctx, &mut out, &mut lse, &[0.0; 8], &[0.0; 7], &[0.0; 6], 2, 1, 4, 3, 1.0
            )
            .is_err()
        );
    }
}
