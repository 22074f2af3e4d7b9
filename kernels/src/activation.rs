//! Element-wise activations: sigmoid, SiLU and the SwiGLU product `silu(gate) ⊙ up` of the experts.
//!
//! Invariant: element-wise, so results are independent of any partitioning; backwards recompute
//! from the forward inputs (nothing but the inputs is saved).

use crate::real::Real;
use crate::{Result, check_len};

#[inline]
fn sig<T: Real>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

/// `out = 1 / (1 + e^(−x))`.
pub fn sigmoid<T: Real>(out: &mut [T], x: &[T]) -> Result<()> {
    check_len("out", out.len(), x.len())?;
    out.iter_mut().zip(x).for_each(|(o, &v)| *o = sig(v));
    Ok(())
}

/// `dx = dy · y · (1 − y)` from the forward output `y`.
pub fn sigmoid_backward<T: Real>(dx: &mut [T], dy: &[T], y: &[T]) -> Result<()> {
    check_len("dx", dx.len(), y.len())?;
    check_len("dy", dy.len(), y.len())?;
    for ((o, &d), &s) in dx.iter_mut().zip(dy).zip(y) {
        *o = d * s * (T::ONE - s);
    }
    Ok(())
}

/// `out = x · sigmoid(x)`.
pub fn silu<T: Real>(out: &mut [T], x: &[T]) -> Result<()> {
    check_len("out", out.len(), x.len())?;
    out.iter_mut().zip(x).for_each(|(o, &v)| *o = v * sig(v));
    Ok(())
}

/// `dx = dy · σ(x) · (1 + x · (1 − σ(x)))`.
pub fn silu_backward<T: Real>(dx: &mut [T], dy: &[T], x: &[T]) -> Result<()> {
    check_len("dx", dx.len(), x.len())?;
    check_len("dy", dy.len(), x.len())?;
    for ((o, &d), &v) in dx.iter_mut().zip(dy).zip(x) {
        let s = sig(v);
        *o = d * s * (T::ONE + v * (T::ONE - s));
    }
    Ok(())
}

/// `out[n] = silu(gate) ⊙ up`.
pub fn swiglu_forward<T: Real>(out: &mut [T], gate: &[T], up: &[T], n: usize) -> Result<()> {
    check_len("out", out.len(), n)?;
    check_len("gate", gate.len(), n)?;
    check_len("up", up.len(), n)?;
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g * sig(g) * u;
    }
    Ok(())
}

/// Backward of [`swiglu_forward`]: `dgate = dout · up · silu′(gate)`, `dup = dout · silu(gate)` (overwrite).
pub fn swiglu_backward<T: Real>(
    dgate: &mut [T],
    dup: &mut [T],
    dout: &[T],
    gate: &[T],
    up: &[T],
    n: usize,
) -> Result<()> {
    for (what, len) in [
        ("dgate", dgate.len()),
        ("dup", dup.len()),
        ("dout", dout.len()),
        ("gate", gate.len()),
        ("up", up.len()),
    ] {
        check_len(what, len, n)?;
    }
    for i in 0..n {
        let (g, u, d) = (gate[i], up[i], dout[i]);
        let s = sig(g);
        dup[i] = d * g * s;
        dgate[i] = d * u * s * (T::ONE + g * (T::ONE - s));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{Rng, fd_check, wsum};

    #[test]
    fn backwards_match_finite_differences() {
        let mut rng = Rng::seeded("activation");
        let n = 17;
        let x: Vec<f64> = rng.vec(n).iter().map(|v| v * 6.0).collect();
        let u = rng.vec(n);
        let r = rng.vec(n);
        let apply = |f: fn(&mut [f64], &[f64]) -> Result<()>, x: &[f64]| {
            let mut y = vec![0.0; n];
            f(&mut y, x).unwrap();
            y
        };
        let mut d = vec![0.0; n];
        let y = apply(sigmoid, &x);
        sigmoid_backward(&mut d, &r, &y).unwrap();
        fd_check(
            &|x| wsum(&r, &apply(sigmoid, x)),
            &x,
            &d,
            1e-8,
            rng.seed,
            "sigmoid",
        );
        silu_backward(&mut d, &r, &x).unwrap();
        fd_check(
            &|x| wsum(&r, &apply(silu, x)),
            &x,
            &d,
            1e-8,
            rng.seed,
            "silu",
        );
        let sw = |g: &[f64], u: &[f64]| {
            let mut y = vec![0.0; n];
            swiglu_forward(&mut y, g, u, n).unwrap();
            wsum(&r, &y)
        };
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        swiglu_backward(&mut dg, &mut du, &r, &x, &u, n).unwrap();
        fd_check(&|g| sw(g, &u), &x, &dg, 1e-8, rng.seed, "swiglu dgate");
        fd_check(&|u| sw(&x, u), &u, &du, 1e-8, rng.seed, "swiglu dup");
        assert!(swiglu_forward(&mut [0.0f32; 2], &[0.0; 2], &[0.0; 3], 2).is_err());
    }
}
