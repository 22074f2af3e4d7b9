//! MoE token permutation: gather token rows into expert order, and the gate-weighted scatter-add back.
//!
//! Invariant: scatter-adds run in list order on one thread (deterministic for repeated destinations);
//! every index is validated before anything is written.

use crate::real::{Real, dot};
use crate::{KernelError, Result, check_len, dims};

fn rows_of(len: usize, dim: usize, what: &'static str) -> Result<usize> {
    if dim == 0 || !len.is_multiple_of(dim) {
        return Err(KernelError::Invalid(format!(
            "{what}: length {len} is not a multiple of dim {dim}"
        )));
    }
    Ok(len / dim)
}

fn check_order(order: &[usize], bound: usize) -> Result<()> {
    match order.iter().position(|&i| i >= bound) {
        Some(at) => Err(KernelError::Index {
            what: "order",
            index: order[at],
            at,
            bound,
        }),
        None => Ok(()),
    }
}

/// Gather: `out[i, :] = x[order[i], :]`; `out` is [order.len(), dim], `x` is [tokens, dim].
pub fn permute_tokens<T: Real>(out: &mut [T], x: &[T], order: &[usize], dim: usize) -> Result<()> {
    let tokens = rows_of(x.len(), dim, "x")?;
    check_len("out", out.len(), dims(&[order.len(), dim])?)?;
    check_order(order, tokens)?;
    for (o, &src) in out.chunks_exact_mut(dim).zip(order) {
        o.copy_from_slice(&x[src * dim..(src + 1) * dim]);
    }
    Ok(())
}

/// Backward of [`permute_tokens`]: `dx_accum[order[i], :] += dout[i, :]`.
pub fn permute_tokens_backward<T: Real>(
    dx_accum: &mut [T],
    dout: &[T],
    order: &[usize],
    dim: usize,
) -> Result<()> {
    let tokens = rows_of(dx_accum.len(), dim, "dx_accum")?;
    check_len("dout", dout.len(), dims(&[order.len(), dim])?)?;
    check_order(order, tokens)?;
    for (d, &dst) in dout.chunks_exact(dim).zip(order) {
        dx_accum[dst * dim..(dst + 1) * dim]
            .iter_mut()
            .zip(d)
            .for_each(|(a, &b)| *a += b);
    }
    Ok(())
}

/// Weighted scatter-add: `y_accum[order[i], :] += weights[i] · expert_out[i, :]`.
pub fn unpermute_weighted_add<T: Real>(
    y_accum: &mut [T],
    expert_out: &[T],
    order: &[usize],
    weights: &[T],
    dim: usize,
) -> Result<()> {
    let tokens = rows_of(y_accum.len(), dim, "y_accum")?;
    check_len("expert_out", expert_out.len(), dims(&[order.len(), dim])?)?;
    check_len("weights", weights.len(), order.len())?;
    check_order(order, tokens)?;
    for ((e, &dst), &w) in expert_out.chunks_exact(dim).zip(order).zip(weights) {
        y_accum[dst * dim..(dst + 1) * dim]
            .iter_mut()
            .zip(e)
            .for_each(|(a, &b)| *a += w * b);
    }
    Ok(())
}

/// Backward of [`unpermute_weighted_add`] (overwrites both outputs):
/// `d_expert_out[i, :] = weights[i] · dy[order[i], :]`, `d_weights[i] = ⟨dy[order[i], :], expert_out[i, :]⟩`.
pub fn unpermute_weighted_add_backward<T: Real>(
    d_expert_out: &mut [T],
    d_weights: &mut [T],
    dy: &[T],
    expert_out: &[T],
    order: &[usize],
    weights: &[T],
    dim: usize,
) -> Result<()> {
    let tokens = rows_of(dy.len(), dim, "dy")?;
    let n = dims(&[order.len(), dim])?;
    check_len("d_expert_out", d_expert_out.len(), n)?;
    check_len("expert_out", expert_out.len(), n)?;
    check_len("d_weights", d_weights.len(), order.len())?;
    check_len("weights", weights.len(), order.len())?;
    check_order(order, tokens)?;
    for (i, &src) in order.iter().enumerate() {
        let g = &dy[src * dim..(src + 1) * dim];
        let e = &expert_out[i * dim..(i + 1) * dim];
        d_weights[i] = dot(g, e);
        d_expert_out[i * dim..(i + 1) * dim]
            .iter_mut()
            .zip(g)
            .for_each(|(o, &v)| *o = weights[i] * v);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{Rng, fd_check, wsum};

    #[test]
    fn backwards_match_finite_differences() {
        let mut rng = Rng::seeded("moe");
        let (tokens, dim) = (4, 3);
        let order = [2usize, 0, 2, 3, 1, 2];
        let x = rng.vec(tokens * dim);
        let r_perm = rng.vec(order.len() * dim);
        let mut dx = vec![0.0; tokens * dim];
        permute_tokens_backward(&mut dx, &r_perm, &order, dim).unwrap();
        let f = |x: &[f64]| {
            let mut o = vec![0.0; order.len() * dim];
            permute_tokens(&mut o, x, &order, dim).unwrap();
            wsum(&r_perm, &o)
        };
        fd_check(&f, &x, &dx, 1e-9, rng.seed, "permute");

        let e = rng.vec(order.len() * dim);
        let w = rng.vec(order.len());
        let r = rng.vec(tokens * dim);
        let (mut de, mut dw) = (vec![0.0; e.len()], vec![0.0; w.len()]);
        unpermute_weighted_add_backward(&mut de, &mut dw, &r, &e, &order, &w, dim).unwrap();
        let g = |e: &[f64], w: &[f64]| {
            let mut y = vec![0.0; tokens * dim];
            unpermute_weighted_add(&mut y, e, &order, w, dim).unwrap();
            wsum(&r, &y)
        };
        fd_check(
            &|e| g(e, &w),
            &e,
            &de,
            1e-9,
            rng.seed,
            "unpermute d_expert_out",
        );
        fd_check(
            &|w| g(&e, w),
            &w,
            &dw,
            1e-9,
            rng.seed,
            "unpermute d_weights",
        );
        let mut o = vec![0.0; dim];
        assert!(permute_tokens(&mut o, &x, &[4], dim).is_err());
    }
}
