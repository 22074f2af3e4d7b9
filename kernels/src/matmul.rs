//! Dense GEMM in the three layouts training needs (y = x·Wᵀ, dx = dy·W, dW = dyᵀ·x), multi-threaded
//! within the context's thread budget, plus [`PackedWeight`]: a weight rearranged once per step for the
//! forward or the input-gradient product.
//!
//! Routing: f32 on a CPU with AVX-512 runs the crate's own blocked kernel (`matmul/blocked.rs`: packed
//! operands, a 12 × 32 register tile, L1/L2 blocking) unless an unpacked product has fewer than 16
//! output rows; f64, those small products and CPUs without AVX-512 run the `gemm` crate (AVX-512
//! kernels with its `x86-v4` feature, AVX2 otherwise). `benches/gemm.rs` measures the
//! own kernel against matrixmultiply and numpy/OpenBLAS and the FMA peak in one run.
//!
//! Invariant: shapes are checked before any pointer is formed, so the unsafe calls only ever see
//! in-bounds strided views; results do not depend on the thread budget (both paths split only M and N
//! across threads and cut K at offsets that depend on the shape alone). The two paths may differ from each
//! other in the last bits (different summation blocking), so bits are reproducible per machine type.

mod blocked;

use crate::exec::{Accumulate, ExecCtx};
use crate::real::Real;
use crate::{KernelError, Result, check_len, dims};
use std::any::TypeId;

/// A strided matrix operand for [`gemm_raw`]: element (i, j) lives at `ptr + i*rs + j*cs`.
#[derive(Clone, Copy)]
pub(crate) struct View<T> {
    pub ptr: *const T,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: a `View` is a read-only window on data the caller keeps alive and unmodified for the whole
// call (see each use), so sharing or sending it across the pool's threads is sound when `T` is `Sync`.
unsafe impl<T: Sync> Send for View<T> {}
// SAFETY: as above; a `View` is never written through.
unsafe impl<T: Sync> Sync for View<T> {}

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

/// Below this many output rows an unpacked call goes to the `gemm` crate: packing the whole right-hand
/// operand for so few rows would cost more than the product (a [`PackedWeight`] has no such cost).
const MIN_BLOCKED_ROWS: usize = 16;

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
    if let (Some(out), Some(l), Some(r)) = (as_f32_mut(out), as_f32(lhs.0), as_f32(rhs.0))
        && blocked::available()
        && rows >= MIN_BLOCKED_ROWS
    {
        let (a, b) = (view((l, lhs.1, lhs.2)), view((r, rhs.1, rhs.2)));
        ctx.install(|| {
            blocked::with_b_scratch(|pb| {
                // SAFETY: the caller checked the lengths of `out` and of the slices behind the views;
                // `out` is a distinct &mut borrow, so it aliases neither operand.
                unsafe {
                    pb.pack(ctx, b, inner, cols);
                    blocked::gemm_packed(ctx, rows, out.as_mut_ptr(), cols, acc, a, pb);
                }
            })
        });
        return;
    }
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

/// `s` as `&[f32]` when `T` is `f32`.
fn as_f32<T: Real>(s: &[T]) -> Option<&[f32]> {
    (TypeId::of::<T>() == TypeId::of::<f32>())
        // SAFETY: T is f32, so the slice already has this type.
        .then(|| unsafe { &*(s as *const [T] as *const [f32]) })
}

/// `s` as `&mut [f32]` when `T` is `f32`.
fn as_f32_mut<T: Real>(s: &mut [T]) -> Option<&mut [f32]> {
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        // SAFETY: T is f32, so the slice already has this type.
        Some(unsafe { &mut *(s as *mut [T] as *mut [f32]) })
    } else {
        None
    }
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

/// Which product a [`PackedWeight`] was packed for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightUse {
    /// Forward: `y = x · Wᵀ` ([`matmul_xwt_packed`]).
    Xwt,
    /// Input gradient: `dx = dy · W` ([`matmul_dyw_packed`]).
    Dyw,
}

enum PackedInner<T> {
    /// Panels for the crate's blocked f32 kernel.
    Blocked(blocked::PackedB),
    /// A plain copy of `w` for the `gemm` crate (f64, or a CPU without AVX-512).
    Plain(Vec<T>),
}

/// A weight `w[n, k]` (PyTorch's `[out, in]`) rearranged once for one of the two products that read it, so
/// that every call of a step skips packing it again. Gives exactly the same bits as the unpacked
/// [`matmul_xwt`] / [`matmul_dyw`] on the same `w` whenever the product has at least 16 rows (`m`);
/// below that the unpacked ops use the `gemm` crate, whose last bits may differ. Pack after each
/// optimizer update ([`Self::repack`] reuses the storage).
pub struct PackedWeight<T> {
    usage: WeightUse,
    n: usize,
    k: usize,
    inner: PackedInner<T>,
}

impl<T: Real> PackedWeight<T> {
    /// Packs `w[n, k]` for `usage`, spreading the work over `ctx`.
    pub fn new(ctx: &ExecCtx, usage: WeightUse, w: &[T], n: usize, k: usize) -> Result<Self> {
        let mut p = Self {
            usage,
            n,
            k,
            inner: PackedInner::Plain(Vec::new()),
        };
        p.repack(ctx, w)?;
        Ok(p)
    }

    /// Packs new values of the same `w[n, k]` into this packing's storage.
    pub fn repack(&mut self, ctx: &ExecCtx, w: &[T]) -> Result<()> {
        check_len("w", w.len(), dims(&[self.n, self.k])?)?;
        let (n, k) = (self.n, self.k);
        match as_f32(w) {
            Some(w32) if blocked::available() => {
                let mut pb =
                    match std::mem::replace(&mut self.inner, PackedInner::Plain(Vec::new())) {
                        PackedInner::Blocked(pb) => pb,
                        PackedInner::Plain(_) => blocked::PackedB::new(),
                    };
                // The blocked kernel's right-hand operand is `b[k', n']`: Wᵀ (k × n) for the forward,
                // W itself (n × k) for the input gradient.
                let (b, kk, nn) = match self.usage {
                    WeightUse::Xwt => (view((w32, 1, k)), k, n),
                    WeightUse::Dyw => (view((w32, k, 1)), n, k),
                };
                // SAFETY: `w` holds n·k values (checked above), which is exactly what the view addresses.
                ctx.install(|| unsafe { pb.pack(ctx, b, kk, nn) });
                self.inner = PackedInner::Blocked(pb);
            }
            _ => match &mut self.inner {
                PackedInner::Plain(v) => {
                    v.clear();
                    v.extend_from_slice(w);
                }
                PackedInner::Blocked(_) => self.inner = PackedInner::Plain(w.to_vec()),
            },
        }
        Ok(())
    }

    /// Which product this packing serves.
    pub fn usage(&self) -> WeightUse {
        self.usage
    }

    /// Rows of `w` (output features).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Columns of `w` (input features).
    pub fn k(&self) -> usize {
        self.k
    }

    fn expect(&self, usage: WeightUse) -> Result<()> {
        if self.usage == usage {
            Ok(())
        } else {
            Err(KernelError::Invalid(format!(
                "weight packed for {:?} used for {usage:?}",
                self.usage
            )))
        }
    }
}

/// `out[rows, cols] (+)= lhs · B` where `B` is the packed weight.
fn packed_into<T: Real>(
    ctx: &ExecCtx,
    out: &mut [T],
    (rows, cols, inner): (usize, usize, usize),
    acc: Accumulate,
    lhs: (&[T], usize, usize),
    w: &PackedWeight<T>,
) {
    match &w.inner {
        PackedInner::Blocked(pb) => {
            // Blocked packings exist only for f32 on AVX-512 machines (see `repack`).
            if let (Some(out), Some(l)) = (as_f32_mut(out), as_f32(lhs.0)) {
                let a = view((l, lhs.1, lhs.2));
                // SAFETY: the caller checked the lengths of `out` and `lhs`; `pb` holds inner × cols.
                ctx.install(|| unsafe {
                    blocked::gemm_packed(ctx, rows, out.as_mut_ptr(), cols, acc, a, pb)
                });
            }
        }
        PackedInner::Plain(wv) => {
            let rhs = match w.usage {
                WeightUse::Xwt => (wv.as_slice(), 1, inner),
                WeightUse::Dyw => (wv.as_slice(), cols, 1),
            };
            gemm_into(ctx, out, (rows, cols, inner), acc, lhs, rhs);
        }
    }
}

/// [`matmul_xwt`] with a weight packed for [`WeightUse::Xwt`]: `y[m, n] (+)= x[m, k] · wᵀ`.
pub fn matmul_xwt_packed<T: Real>(
    ctx: &ExecCtx,
    y: &mut [T],
    x: &[T],
    w: &PackedWeight<T>,
    m: usize,
    acc: Accumulate,
) -> Result<()> {
    w.expect(WeightUse::Xwt)?;
    let (n, k) = (w.n, w.k);
    check_len("y", y.len(), dims(&[m, n])?)?;
    check_len("x", x.len(), dims(&[m, k])?)?;
    packed_into(ctx, y, (m, n, k), acc, (x, k, 1), w);
    Ok(())
}

/// [`matmul_dyw`] with a weight packed for [`WeightUse::Dyw`]: `dx[m, k] (+)= dy[m, n] · w`.
pub fn matmul_dyw_packed<T: Real>(
    ctx: &ExecCtx,
    dx: &mut [T],
    dy: &[T],
    w: &PackedWeight<T>,
    m: usize,
    acc: Accumulate,
) -> Result<()> {
    w.expect(WeightUse::Dyw)?;
    let (n, k) = (w.n, w.k);
    check_len("dx", dx.len(), dims(&[m, k])?)?;
    check_len("dy", dy.len(), dims(&[m, n])?)?;
    packed_into(ctx, dx, (m, k, n), acc, (dy, n, 1), w);
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

    /// The f32 path (the crate's blocked kernel on AVX-512 machines, `gemm` elsewhere) against an f64
    /// reference, at shapes with partial register tiles and more than one K, M and N cache block.
    #[test]
    fn f32_layouts_match_f64_reference_at_edge_shapes() {
        let mut rng = Rng::seeded("matmul-f32");
        let ctx = ExecCtx::cpu(2);
        for (m, n, k) in [
            (1, 1, 1),
            (9, 50, 257),
            (130, 581, 530),
            (3, 120, 40),
            (20, 34, 300),
            // Two row blocks per thread of unequal panel counts, a 4-row `a` remainder, three K blocks.
            (268, 97, 600),
        ] {
            let x = rng.vec_f32(m * k);
            let w = rng.vec_f32(n * k);
            let dy = rng.vec_f32(m * n);
            let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
            let w64: Vec<f64> = w.iter().map(|&v| f64::from(v)).collect();
            let dy64: Vec<f64> = dy.iter().map(|&v| f64::from(v)).collect();
            let tag = format!("{m}x{n}x{k} (seed {})", rng.seed);
            let mut y = rng.vec_f32(m * n);
            let y0: Vec<f64> = y.iter().map(|&v| f64::from(v)).collect();
            matmul_xwt(&ctx, &mut y, &x, &w, m, n, k, Accumulate::Add).unwrap();
            let r = naive(m, n, k, |i, p| x64[i * k + p], |p, j| w64[j * k + p]);
            let want: Vec<f64> = r.iter().zip(&y0).map(|(a, b)| a + b).collect();
            assert_close(&y, &want, 1e-6, &format!("xwt {tag}"));
            let pw = PackedWeight::new(&ctx, WeightUse::Xwt, &w, n, k).unwrap();
            let mut yp = vec![7f32; m * n];
            matmul_xwt_packed(&ctx, &mut yp, &x, &pw, m, Accumulate::Overwrite).unwrap();
            assert_close(&yp, &r, 1e-6, &format!("xwt packed {tag}"));
            let mut dx = vec![7f32; m * k];
            matmul_dyw(&ctx, &mut dx, &dy, &w, m, n, k, Accumulate::Overwrite).unwrap();
            let r = naive(m, k, n, |i, p| dy64[i * n + p], |p, j| w64[p * k + j]);
            assert_close(&dx, &r, 1e-6, &format!("dyw {tag}"));
            let mut dw = vec![7f32; n * k];
            matmul_dytx(&ctx, &mut dw, &dy, &x, m, n, k, Accumulate::Overwrite).unwrap();
            let r = naive(n, k, m, |i, p| dy64[p * n + i], |p, j| x64[p * k + j]);
            assert_close(&dw, &r, 1e-6, &format!("dytx {tag}"));
        }
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// A packed weight gives the unpacked op's bits, for both uses, both accumulate modes and any thread
    /// budget; repacking new values reuses the packing; a packing used for the other product is an error.
    #[test]
    fn packed_weight_matches_unpacked_bits() {
        let mut rng = Rng::seeded("matmul-packed");
        let (m, n, k) = (70, 150, 300);
        let x = rng.vec_f32(m * k);
        let dy = rng.vec_f32(m * n);
        let w = rng.vec_f32(n * k);
        let w2 = rng.vec_f32(n * k);
        let base = rng.vec_f32(m * n.max(k));
        let c1 = ExecCtx::cpu(1);
        let mut pf = PackedWeight::new(&c1, WeightUse::Xwt, &w2, n, k).unwrap();
        let mut pb = PackedWeight::new(&c1, WeightUse::Dyw, &w2, n, k).unwrap();
        for t in [1, 2, 3] {
            let ctx = ExecCtx::cpu(t);
            pf.repack(&ctx, &w).unwrap();
            pb.repack(&ctx, &w).unwrap();
            for acc in [Accumulate::Overwrite, Accumulate::Add] {
                let (mut y1, mut y2) = (base[..m * n].to_vec(), base[..m * n].to_vec());
                matmul_xwt(&c1, &mut y1, &x, &w, m, n, k, acc).unwrap();
                matmul_xwt_packed(&ctx, &mut y2, &x, &pf, m, acc).unwrap();
                assert!(same_bits(&y1, &y2), "xwt packed, {t} threads, {acc:?}");
                let (mut d1, mut d2) = (base[..m * k].to_vec(), base[..m * k].to_vec());
                matmul_dyw(&c1, &mut d1, &dy, &w, m, n, k, acc).unwrap();
                matmul_dyw_packed(&ctx, &mut d2, &dy, &pb, m, acc).unwrap();
                assert!(same_bits(&d1, &d2), "dyw packed, {t} threads, {acc:?}");
            }
        }
        let mut y = vec![0f32; m * n];
        let mut dx = vec![0f32; m * k];
        assert!(matmul_xwt_packed(&c1, &mut y, &x, &pb, m, Accumulate::Add).is_err());
        assert!(matmul_dyw_packed(&c1, &mut dx, &dy, &pf, m, Accumulate::Add).is_err());
        assert!(matmul_xwt_packed(&c1, &mut y, &x[1..], &pf, m, Accumulate::Add).is_err());
        assert!(pf.repack(&c1, &w[1..]).is_err());
        assert!(PackedWeight::new(&c1, WeightUse::Xwt, &w, n + 1, k).is_err());
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
