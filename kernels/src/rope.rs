//! Rotary position embedding on ADJACENT pairs (x[2i], x[2i+1]) rotated by angle pos·θ^(−2i/d_rope)
//! (DeepSeek's layout, HF `rope_interleave=true`), applied in place to a `d_rope`-wide slice inside each
//! head row, so it serves q ([T, H, 48] with RoPE in the last 16) and k_pe ([T, 16]) alike.
//!
//! Invariant: angles are computed in f64 and rounded once; the backward is the exact inverse rotation.

use crate::real::Real;
use crate::{KernelError, Result, check_len, dims};

fn check(
    len: usize,
    t: usize,
    n_heads: usize,
    head_stride: usize,
    offset: usize,
    d_rope: usize,
) -> Result<()> {
    check_len("x", len, dims(&[t, n_heads, head_stride])?)?;
    if !d_rope.is_multiple_of(2) {
        return Err(KernelError::Invalid(format!(
            "rope width {d_rope} must be even"
        )));
    }
    if offset.checked_add(d_rope).is_none_or(|e| e > head_stride) {
        return Err(KernelError::Invalid(format!(
            "rope slice {offset}..{offset}+{d_rope} does not fit in a head row of {head_stride}"
        )));
    }
    Ok(())
}

fn rotate<T: Real>(
    x: &mut [T],
    t: usize,
    n_heads: usize,
    head_stride: usize,
    offset: usize,
    d_rope: usize,
    theta: f64,
    pos0: usize,
    sign: f64,
) -> Result<()> {
    check(x.len(), t, n_heads, head_stride, offset, d_rope)?;
    let half = d_rope / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| theta.powf(-((2 * i) as f64) / d_rope as f64))
        .collect();
    let mut cs = vec![(T::ZERO, T::ZERO); half];
    for tok in 0..t {
        let pos = (pos0 + tok) as f64;
        for (c, &f) in cs.iter_mut().zip(&inv_freq) {
            let (s, co) = (pos * f).sin_cos();
            *c = (T::from_f64(co), T::from_f64(sign * s));
        }
        for h in 0..n_heads {
            let base = (tok * n_heads + h) * head_stride + offset;
            let row = &mut x[base..base + d_rope];
            for (pair, &(c, s)) in row.chunks_exact_mut(2).zip(&cs) {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * c - b * s;
                pair[1] = a * s + b * c;
            }
        }
    }
    Ok(())
}

/// Rotates `x[tok, h, offset..offset+d_rope]` in place for `x` laid out `[t, n_heads, head_stride]`;
/// token `tok` has position `pos0 + tok`. Pair i is (x[2i], x[2i+1]) with angle pos·θ^(−2i/d_rope).
pub fn rope_forward<T: Real>(
    x: &mut [T],
    t: usize,
    n_heads: usize,
    head_stride: usize,
    offset: usize,
    d_rope: usize,
    theta: f64,
    pos0: usize,
) -> Result<()> {
    rotate(x, t, n_heads, head_stride, offset, d_rope, theta, pos0, 1.0)
}

/// Backward of [`rope_forward`]: rotates the gradient in place by the opposite angle (same arguments).
pub fn rope_backward<T: Real>(
    dx: &mut [T],
    t: usize,
    n_heads: usize,
    head_stride: usize,
    offset: usize,
    d_rope: usize,
    theta: f64,
    pos0: usize,
) -> Result<()> {
    rotate(
        dx,
        t,
        n_heads,
        head_stride,
        offset,
        d_rope,
        theta,
        pos0,
        -1.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{Rng, fd_check, wsum};

    #[test]
    fn adjacent_pairs_and_inverse() {
        // One head row of width 6 with rope on the last 4: pair 0 at angle pos, pair 1 at pos·θ^(-1/2).
        let mut x = vec![1.0f64, 2.0, 1.0, 0.0, 0.0, 1.0];
        rope_forward(&mut x, 1, 1, 6, 2, 4, 100.0, 3).unwrap();
        let (a0, a1): (f64, f64) = (3.0, 3.0 / 10.0);
        let want = [1.0, 2.0, a0.cos(), a0.sin(), -a1.sin(), a1.cos()];
        for (g, w) in x.iter().zip(want) {
            assert!((g - w).abs() < 1e-15);
        }
        rope_backward(&mut x, 1, 1, 6, 2, 4, 100.0, 3).unwrap();
        for (g, w) in x.iter().zip([1.0, 2.0, 1.0, 0.0, 0.0, 1.0]) {
            assert!((g - w).abs() < 1e-15);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::seeded("rope");
        let (t, h, hs, off, d) = (5, 2, 10, 4, 6);
        let x = rng.vec(t * h * hs);
        let r = rng.vec(t * h * hs);
        let mut g = r.clone();
        rope_backward(&mut g, t, h, hs, off, d, 10000.0, 7).unwrap();
        let f = |x: &[f64]| {
            let mut y = x.to_vec();
            rope_forward(&mut y, t, h, hs, off, d, 10000.0, 7).unwrap();
            wsum(&r, &y)
        };
        fd_check(&f, &x, &g, 1e-8, rng.seed, "rope");
    }

    #[test]
    fn bad_arguments() {
        let mut x = vec![0f32; 12];
        assert!(rope_forward(&mut x, 2, 1, 6, 2, 5, 1e4, 0).is_err());
        assert!(rope_forward(&mut x, 2, 1, 6, 4, 4, 1e4, 0).is_err());
        assert!(rope_forward(&mut x, 3, 1, 6, 0, 4, 1e4, 0).is_err());
    }
}
