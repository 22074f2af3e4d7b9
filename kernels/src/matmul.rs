//! Dense GEMM in the three layouts training needs, through the `gemm` crate (AVX-512 kernels with the
//! `x86-v4` feature), multi-threaded within the context's budget.
//!
//! Invariant: shapes are checked before any pointer is formed, so the unsafe calls into `gemm` only ever
//! see in-bounds strided views; results do not depend on the thread budget (`gemm` splits M and N, never K).

use crate::exec::{Accumulate, ExecCtx};
use crate::real::Real;
use crate::{Result, check_len, dims};

/// A strided matrix operand for [`gemm_raw`]: element (i, j) lives at `ptr + i*rs + j*cs`.
#[derive(Clone, Copy)]
pub(crate) struct View<T> {
    pub ptr: *const T,
    pub rs: isize,
    pub cs: isize,
}

/// `dst[m,n] (+)= beta · lhs[m,k] · rhs[k,n]` on strided views.
///
/// # Safety
/// Every element addressed by the views (rows `0..m`/`0..k`, columns `0..k`/`0..n`) must be inside
/// live allocations, `dst` must not alias `lhs` or `rhs`, and no other thread may touch the `dst` region.
pub(crate) unsafe fn gemm_raw<T: Real>(
    par: gemm::Parallelism,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: isize,
    dst_cs: isize,
    acc: Accumulate,
    lhs: View<T>,
    rhs: View<T>,
    beta: T,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if acc == Accumulate::Overwrite {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: (i, j) is inside the dst view by the caller's contract.
                    unsafe { *dst.offset(i as isize * dst_rs + j as isize * dst_cs) = T::ZERO };
                }
            }
        }
        return;
    }
    // SAFETY: forwarded from the caller's contract; T is f32 or f64 (sealed `Real`), which `gemm` supports.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs,
            dst_rs,
            acc == Accumulate::Add,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            T::ONE,
            beta,
            false,
            false,
            false,
            par,
        )
    }
}

fn check3<T>(
    out: (&'static str, usize, &[T]),
    a: (&'static str, usize, &[T]),
    b: (&'static str, usize, &[T]),
) -> Result<()> {
    check_len(out.0, out.2.len(), out.1)?;
    check_len(a.0, a.2.len(), a.1)?;
    check_len(b.0, b.2.len(), b.1)
}

/// `out[rows, cols] (+)= lhs · rhs` with `out` row-major and contiguous, over `inner` products.
/// The three public layouts differ only in the strides of `lhs` and `rhs`; the caller has
/// checked every length, and the views address only elements of the slices they were made from.
fn gemm_into<T: Real>(
    ctx: &ExecCtx,
    out: &mut [T],
    (rows, cols, inner): (usize, usize, usize),
    acc: Accumulate,
    lhs: (&[T], usize, usize),
    rhs: (&[T], usize, usize),
) {
    ctx.install(|| {
        let (lhs, rhs) = (view(lhs), view(rhs));
        // SAFETY: the caller checked the lengths of `out` and of the slices behind the views;
        // `out` is a distinct &mut borrow, so it aliases neither operand.
        unsafe {
            gemm_raw(
                ctx.gemm_parallelism(),
                rows,
                cols,
                inner,
                out.as_mut_ptr(),
                cols as isize,
                1,
                acc,
                lhs,
                rhs,
                T::ONE,
            )
        }
    });
}

/// A strided view of `s` from `(slice, row stride, column stride)`.
fn view<T>((s, rs, cs): (&[T], usize, usize)) -> View<T> {
    View {
        ptr: s.as_ptr(),
        rs: rs as isize,
        cs: cs as isize,
    }
}

/// Forward layout: `y[m,n] (+)= x[m,k] · w[n,k]ᵀ` (a linear layer with PyTorch's `[out, in]` weights).
pub fn matmul_xwt<T: Real>(
    ctx: &ExecCtx,
    y: &mut [T],
    x: &[T],
    w: &[T],
    m: usize,
    n: usize,
    k: usize,
    acc: Accumulate,
) -> Result<()> {
    check3(
        ("y", dims(&[m, n])?, y),
        ("x", dims(&[m, k])?, x),
        ("w", dims(&[n, k])?, w),
    )?;
    gemm_into(ctx, y, (m, n, k), acc, (x, k, 1), (w, 1, k));
    Ok(())
}

/// Input-gradient layout: `dx[m,k] (+)= dy[m,n] · w[n,k]`.
pub fn matmul_dyw<T: Real>(
    ctx: &ExecCtx,
    dx: &mut [T],
    dy: &[T],
    w: &[T],
    m: usize,
    n: usize,
    k: usize,
    acc: Accumulate,
) -> Result<()> {
    check3(
        ("dx", dims(&[m, k])?, dx),
        ("dy", dims(&[m, n])?, dy),
        ("w", dims(&[n, k])?, w),
    )?;
    gemm_into(ctx, dx, (m, k, n), acc, (dy, n, 1), (w, k, 1));
    Ok(())
}

/// Weight-gradient layout: `dw[n,k] (+)= dy[m,n]ᵀ · x[m,k]` (sum over the m tokens).
pub fn matmul_dytx<T: Real>(
    ctx: &ExecCtx,
    dw: &mut [T],
    dy: &[T],
    x: &[T],
    m: usize,
    n: usize,
    k: usize,
    acc: Accumulate,
) -> Result<()> {
    check3(
        ("dw", dims(&[n, k])?, dw),
        ("dy", dims(&[m, n])?, dy),
        ("x", dims(&[m, k])?, x),
    )?;
    gemm_into(ctx, dw, (n, k, m), acc, (dy, 1, n), (x, k, 1));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{Rng, assert_close};

    fn naive(
        m: usize,
        n: usize,
        k: usize,
        a: impl Fn(usize, usize) -> f64,
        b: impl Fn(usize, usize) -> f64,
    ) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a(i, p) * b(p, j)).sum();
            }
        }
        c
    }

    #[test]
    fn three_layouts_match_naive_and_accumulate() {
        let mut rng = Rng::seeded("matmul");
        let ctx = ExecCtx::cpu(2);
        let (m, n, k) = (37, 29, 70);
        let x = rng.vec(m * k);
        let w = rng.vec(n * k);
        let dy = rng.vec(m * n);
        let mut y = rng.vec(m * n);
        let y0 = y.clone();
        matmul_xwt(&ctx, &mut y, &x, &w, m, n, k, Accumulate::Add).unwrap();
        let r = naive(m, n, k, |i, p| x[i * k + p], |p, j| w[j * k + p]);
        let want: Vec<f64> = r.iter().zip(&y0).map(|(a, b)| a + b).collect();
        assert_close(&y, &want, 1e-12, "xwt add");
        let mut dx = vec![7.0; m * k];
        matmul_dyw(&ctx, &mut dx, &dy, &w, m, n, k, Accumulate::Overwrite).unwrap();
        let r = naive(m, k, n, |i, p| dy[i * n + p], |p, j| w[p * k + j]);
        assert_close(&dx, &r, 1e-12, "dyw");
        let mut dw = vec![7.0; n * k];
        matmul_dytx(&ctx, &mut dw, &dy, &x, m, n, k, Accumulate::Overwrite).unwrap();
        let r = naive(n, k, m, |i, p| dy[p * n + i], |p, j| x[p * k + j]);
        assert_close(&dw, &r, 1e-12, "dytx");
    }

    #[test]
    fn same_bits_for_any_thread_budget() {
        let mut rng = Rng::seeded("matmul-det");
        let (m, n, k) = (300, 260, 700);
        let x: Vec<f32> = rng.vec_f32(m * k);
        let w: Vec<f32> = rng.vec_f32(n * k);
        let run = |t: usize| {
            let ctx = ExecCtx::cpu(t);
            let mut y = vec![0f32; m * n];
            matmul_xwt(&ctx, &mut y, &x, &w, m, n, k, Accumulate::Overwrite).unwrap();
            let mut dw = vec![0f32; k * k];
            matmul_dytx(&ctx, &mut dw, &x, &x, m, k, k, Accumulate::Overwrite).unwrap();
            (y, dw)
        };
        let base = run(1);
        for t in [2, 3] {
            let r = run(t);
            assert!(
                base.0
                    .iter()
                    .zip(&r.0)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "xwt, {t} threads"
            );
            assert!(
                base.1
                    .iter()
                    .zip(&r.1)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "dytx, {t} threads"
            );
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let ctx = ExecCtx::cpu(1);
        let mut y = vec![0f32; 6];
        assert!(matmul_xwt(&ctx, &mut y, &[0.0; 6], &[0.0; 6], 2, 3, 4, Accumulate::Add).is_err());
        assert!(matmul_dyw(&ctx, &mut y, &[0.0; 6], &[0.0; 5], 2, 3, 3, Accumulate::Add).is_err());
        let mut e: Vec<f32> = vec![];
        matmul_xwt(&ctx, &mut e, &[], &[], 0, 0, 5, Accumulate::Add).unwrap();
        let mut z = vec![3f32; 4];
        matmul_xwt(&ctx, &mut z, &[], &[], 2, 2, 0, Accumulate::Overwrite).unwrap();
        assert_eq!(z, vec![0.0; 4]);
    }
}
