//! RMSNorm forward and backward: `y = x · rstd · g` with `rstd = 1/sqrt(mean(x²) + eps)` per row,
//! statistics in the working precision (f32 for the model), weight applied after normalisation.
//!
//! Invariant: the backward is split into the input part (per row, independent) and the weight part
//! (a reduction over rows, run in row order), so callers can schedule B and W passes separately.

use crate::real::{Real, dot, sum_sq};
use crate::{Result, check_len, dims};

fn check(rows: usize, dim: usize, lens: &[(&'static str, usize, usize)]) -> Result<()> {
    let _ = dims(&[rows, dim])?;
    for &(what, got, want) in lens {
        check_len(what, got, want)?;
    }
    Ok(())
}

/// Forward: `y[rows,dim] = x · rstd · g`, `rstd_out[rows]` saved for the backward.
pub fn rmsnorm_forward<T: Real>(
    y: &mut [T],
    rstd_out: &mut [T],
    x: &[T],
    g: &[T],
    rows: usize,
    dim: usize,
    eps: T,
) -> Result<()> {
    let n = dims(&[rows, dim])?;
    check(
        rows,
        dim,
        &[
            ("y", y.len(), n),
            ("rstd_out", rstd_out.len(), rows),
            ("x", x.len(), n),
            ("g", g.len(), dim),
        ],
    )?;
    if dim == 0 {
        rstd_out.fill(T::ONE / eps.sqrt());
        return Ok(());
    }
    let inv_dim = T::from_f64(1.0 / dim as f64);
    for r in 0..rows {
        let xr = &x[r * dim..(r + 1) * dim];
        let rstd = T::ONE / (sum_sq(xr) * inv_dim + eps).sqrt();
        rstd_out[r] = rstd;
        for ((yv, &xv), &gv) in y[r * dim..(r + 1) * dim].iter_mut().zip(xr).zip(g) {
            *yv = xv * rstd * gv;
        }
    }
    Ok(())
}

/// Input part of the backward: `dx[rows,dim] = rstd·g·dy − rstd³/dim · x · Σ(dy·g·x)` (overwrites `dx`).
pub fn rmsnorm_backward_input<T: Real>(
    dx: &mut [T],
    dy: &[T],
    x: &[T],
    g: &[T],
    rstd: &[T],
    rows: usize,
    dim: usize,
) -> Result<()> {
    let n = dims(&[rows, dim])?;
    check(
        rows,
        dim,
        &[
            ("dx", dx.len(), n),
            ("dy", dy.len(), n),
            ("x", x.len(), n),
            ("g", g.len(), dim),
            ("rstd", rstd.len(), rows),
        ],
    )?;
    let inv_dim = T::from_f64(1.0 / dim.max(1) as f64);
    let mut dyg = vec![T::ZERO; dim];
    for r in 0..rows {
        let (xr, dyr) = (&x[r * dim..(r + 1) * dim], &dy[r * dim..(r + 1) * dim]);
        for ((o, &a), &b) in dyg.iter_mut().zip(dyr).zip(g) {
            *o = a * b;
        }
        let s = dot(&dyg, xr);
        let rs = rstd[r];
        let c = rs * rs * rs * inv_dim * s;
        for ((o, &d), &xv) in dx[r * dim..(r + 1) * dim].iter_mut().zip(&dyg).zip(xr) {
            *o = rs * d - c * xv;
        }
    }
    Ok(())
}

/// Weight part of the backward: `dg_accum[dim] += Σ_rows dy · x · rstd` (rows summed in order).
pub fn rmsnorm_backward_weight<T: Real>(
    dg_accum: &mut [T],
    dy: &[T],
    x: &[T],
    rstd: &[T],
    rows: usize,
    dim: usize,
) -> Result<()> {
    let n = dims(&[rows, dim])?;
    check(
        rows,
        dim,
        &[
            ("dg_accum", dg_accum.len(), dim),
            ("dy", dy.len(), n),
            ("x", x.len(), n),
            ("rstd", rstd.len(), rows),
        ],
    )?;
    for r in 0..rows {
        let rs = rstd[r];
        for ((o, &d), &xv) in dg_accum
            .iter_mut()
            .zip(&dy[r * dim..(r + 1) * dim])
            .zip(&x[r * dim..(r + 1) * dim])
        {
            *o += d * xv * rs;
        }
    }
    Ok(())
}

/// Both parts: overwrites `dx`, accumulates into `dg_accum`.
pub fn rmsnorm_backward<T: Real>(
    dx: &mut [T],
    dg_accum: &mut [T],
    dy: &[T],
    x: &[T],
    g: &[T],
    rstd: &[T],
    rows: usize,
    dim: usize,
) -> Result<()> {
    rmsnorm_backward_input(dx, dy, x, g, rstd, rows, dim)?;
    rmsnorm_backward_weight(dg_accum, dy, x, rstd, rows, dim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{Rng, fd_check, wsum};

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::seeded("rmsnorm");
        let (rows, dim, eps) = (3, 13, 1e-6);
        let x = rng.vec(rows * dim);
        let g = rng.vec(dim);
        let r = rng.vec(rows * dim);
        let fwd = |x: &[f64], g: &[f64]| {
            let mut y = vec![0.0; rows * dim];
            let mut rs = vec![0.0; rows];
            rmsnorm_forward(&mut y, &mut rs, x, g, rows, dim, eps).unwrap();
            (y, rs)
        };
        let (_, rs) = fwd(&x, &g);
        let mut dx = vec![0.0; rows * dim];
        let mut dg = vec![0.5; dim];
        rmsnorm_backward(&mut dx, &mut dg, &r, &x, &g, &rs, rows, dim).unwrap();
        dg.iter_mut().for_each(|v| *v -= 0.5);
        fd_check(
            &|x| wsum(&r, &fwd(x, &g).0),
            &x,
            &dx,
            1e-7,
            rng.seed,
            "rmsnorm dx",
        );
        fd_check(
            &|g| wsum(&r, &fwd(&x, g).0),
            &g,
            &dg,
            1e-7,
            rng.seed,
            "rmsnorm dg",
        );
    }

    #[test]
    fn shape_errors() {
        let mut y = [0f32; 4];
        let mut rs = [0f32; 2];
        assert!(rmsnorm_forward(&mut y, &mut rs, &[1.0; 4], &[1.0; 3], 2, 2, 1e-6).is_err());
        assert!(rmsnorm_forward(&mut y, &mut rs[..1], &[1.0; 4], &[1.0; 2], 2, 2, 1e-6).is_err());
    }
}
