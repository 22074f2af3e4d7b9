//! Block-scaled FP8 GEMM: E4M3 codes plus per-tile scales in, f32 out, in the three training layouts.
//!
//! Two evaluation orders of the same sum C = Σ_b Σ_{p∈b} (qa·sa_b)(qb·sb_b), b the 128-wide K blocks:
//! - `fp8_matmul_xwt` / `_dyw` / `_dytx` (the fast path, used by training): each operand is dequantized
//!   once into f32 (`code · scale`, one rounding, exact for UE8M0 power-of-two scales) and the products
//!   accumulate in f32 through the `gemm` crate over the whole K. Every partial sum is already f32, so
//!   the "promotion every 128 elements" of the GPU recipe holds trivially; the only difference from the
//!   promoted formula is where the scale multiply is rounded (≤ 1e-6 normwise against the golden
//!   `gemm_block_f32`, 1e-5 against the exact `gemm.*`, both tested). Cost: one f32 GEMM plus decoding.
//! - `fp8_matmul_nt_promoted` (the literal recipe, for checking): for every K block,
//!   `acc += (Σ_{p∈b} qa·qb) · sa · sb` with the inner sum over exact code values, as tensor cores do.
//!
//! Invariant: both are the same bits for any thread budget (element-wise decoding, thread-invariant GEMM,
//! output tiles fixed by the shape alone). A NaN code (0x7F/0xFF) propagates to the outputs it touches
//! (documented value; the quantizers never emit one).

use super::codec::E4M3_LUT;
use super::quant::TILE;
use crate::exec::{Accumulate, ExecCtx, SendPtr};
use crate::matmul::{View, gemm_raw};
use crate::{KernelError, Result, check_len, dims};

/// Which tiles a matrix's scales belong to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8Tiling {
    /// 1×128 tiles along the columns: scales [rows, ceil(cols/128)] (activations, and the 128×1 tiling of
    /// a transposed operand as produced by `quantize_act_t`).
    Row,
    /// 128×128 blocks: scales [ceil(rows/128), ceil(cols/128)] (weights).
    Block,
}

/// A borrowed quantized matrix: E4M3 codes [rows, cols] (row-major) plus scales for its tiling.
#[derive(Clone, Copy, Debug)]
pub struct Fp8Matrix<'a> {
    codes: &'a [u8],
    scales: &'a [f32],
    rows: usize,
    cols: usize,
    tiling: Fp8Tiling,
}

impl<'a> Fp8Matrix<'a> {
    /// Checks that `codes` holds rows·cols codes and `scales` the number of tiles of `tiling`.
    pub fn new(
        codes: &'a [u8],
        scales: &'a [f32],
        rows: usize,
        cols: usize,
        tiling: Fp8Tiling,
    ) -> Result<Self> {
        check_len("codes", codes.len(), dims(&[rows, cols])?)?;
        let srows = match tiling {
            Fp8Tiling::Row => rows,
            Fp8Tiling::Block => rows.div_ceil(TILE),
        };
        check_len("scales", scales.len(), dims(&[srows, cols.div_ceil(TILE)])?)?;
        Ok(Self {
            codes,
            scales,
            rows,
            cols,
            tiling,
        })
    }
    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Columns (the contraction dimension in every GEMM below).
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The tiling of the scales.
    pub fn tiling(&self) -> Fp8Tiling {
        self.tiling
    }
}

/// Scale lookup for operand row `r` and K block `kb`: `data[(r / div) · rs + kb]`.
#[derive(Clone, Copy)]
struct ScaleMap<'a> {
    data: &'a [f32],
    div: usize,
    rs: usize,
}

impl<'s> ScaleMap<'s> {
    #[inline]
    fn get(&self, r: usize, kb: usize) -> f32 {
        self.data[(r / self.div) * self.rs + kb]
    }
    fn of<'m>(m: &Fp8Matrix<'m>) -> ScaleMap<'m> {
        let div = if m.tiling == Fp8Tiling::Row { 1 } else { TILE };
        ScaleMap {
            data: m.scales,
            div,
            rs: m.cols.div_ceil(TILE),
        }
    }
}

/// Decodes `codes` ([rows, cols]) to their exact f32 code values (no scales).
fn decode(ctx: &ExecCtx, codes: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    if rows == 0 || cols == 0 {
        return out;
    }
    let mut dummy = vec![(); rows];
    ctx.for_each_chunk_pair(&mut out, cols, &mut dummy, 1, |r, o, _| {
        for (v, &c) in o.iter_mut().zip(&codes[r * cols..(r + 1) * cols]) {
            *v = E4M3_LUT[c as usize];
        }
    });
    out
}

/// Output tile edge along M and N.
const MT: usize = 128;
const NT: usize = 512;

/// `c[m,n] (+)= Σ_kb (A_kb · B_kbᵀ) · sa(i,kb) · sb(j,kb)` with `a` [m,k] and `b` [n,k] decoded f32 codes.
fn nt_core(
    ctx: &ExecCtx,
    c: &mut [f32],
    a: &[f32],
    sa: ScaleMap<'_>,
    b: &[f32],
    sb: ScaleMap<'_>,
    m: usize,
    n: usize,
    k: usize,
    acc: Accumulate,
) {
    if m == 0 || n == 0 {
        return;
    }
    if acc == Accumulate::Overwrite {
        c.fill(0.0);
    }
    let kb_count = k.div_ceil(TILE);
    let (tm, tn) = (m.div_ceil(MT), n.div_ceil(NT));
    let cp = SendPtr(c.as_mut_ptr());
    ctx.for_each_index_init(
        tm * tn,
        || vec![0f32; MT * NT],
        |tmp, task| {
            let (i0, j0) = ((task / tn) * MT, (task % tn) * NT);
            let (mt, nt) = ((m - i0).min(MT), (n - j0).min(NT));
            for kb in 0..kb_count {
                let (p0, kl) = (kb * TILE, (k - kb * TILE).min(TILE));
                // SAFETY: a is [m,k], b is [n,k] (built by the callers), the scratch holds mt·nt ≤ MT·NT.
                unsafe {
                    gemm_raw(
                        gemm::Parallelism::None,
                        mt,
                        nt,
                        kl,
                        tmp.as_mut_ptr(),
                        nt as isize,
                        1,
                        Accumulate::Overwrite,
                        View {
                            ptr: a.as_ptr().add(i0 * k + p0),
                            rs: k as isize,
                            cs: 1,
                        },
                        View {
                            ptr: b.as_ptr().add(j0 * k + p0),
                            rs: 1,
                            cs: k as isize,
                        },
                        1.0f32,
                    );
                }
                let sbs: Vec<f32> = (j0..j0 + nt).map(|j| sb.get(j, kb)).collect();
                for i in 0..mt {
                    let s_a = sa.get(i0 + i, kb);
                    // SAFETY: this task alone owns rows i0..i0+mt, columns j0..j0+nt of c (len m·n checked).
                    let crow = unsafe {
                        std::slice::from_raw_parts_mut(cp.get().add((i0 + i) * n + j0), nt)
                    };
                    for ((o, &t), &s_b) in crow.iter_mut().zip(&tmp[i * nt..(i + 1) * nt]).zip(&sbs)
                    {
                        *o += t * s_a * s_b;
                    }
                }
            }
        },
    );
}

fn check_k(a: &Fp8Matrix<'_>, b: &Fp8Matrix<'_>, an: &str, bn: &str) -> Result<()> {
    if a.cols != b.cols {
        return Err(KernelError::Invalid(format!(
            "fp8 gemm: {an} has {} columns but {bn} has {} (the contraction dimensions differ)",
            a.cols, b.cols
        )));
    }
    Ok(())
}

/// Exact f32 value of E4M3 code `c`, by bit manipulation so loops over it vectorize: a normal code
/// (exponent field ≥ 1) is the f32 with the code's exponent rebiased 7 → 127 and its 3 mantissa bits on
/// top; a subnormal one is m/512 (an exact integer conversion and power-of-two product); 0x7F/0xFF are
/// NaN. Equals `E4M3_LUT[c]` bit for bit except for the NaN payload.
#[inline(always)]
fn e4m3_value_bits(c: u8) -> f32 {
    let c = c as u32;
    let mag = c & 0x7F;
    let sign = (c & 0x80) << 24;
    let norm = f32::from_bits(((mag << 20) + (120 << 23)) | sign);
    let sub = f32::from_bits(((mag as f32) * (1.0 / 512.0)).to_bits() | sign);
    let v = if mag < 8 { sub } else { norm };
    if mag == 0x7F {
        f32::from_bits(0x7FC0_0000 | sign)
    } else {
        v
    }
}

/// `out[i] = value(codes[i]) · s` for one scale tile (lengths equal).
#[inline(always)]
fn dequant_run_impl(out: &mut [f32], codes: &[u8], s: f32) {
    for (v, &c) in out.iter_mut().zip(codes) {
        *v = e4m3_value_bits(c) * s;
    }
}

/// Rows `r0..r0 + out.len() / cols` of `q`, dequantized into `out`.
#[inline(always)]
fn dequant_rows_impl(out: &mut [f32], q: &Fp8Matrix<'_>, r0: usize) {
    let cols = q.cols;
    let sm = ScaleMap::of(q);
    for (rr, orow) in out.chunks_exact_mut(cols).enumerate() {
        let r = r0 + rr;
        let codes = &q.codes[r * cols..(r + 1) * cols];
        for (kb, (ob, cb)) in orow.chunks_mut(TILE).zip(codes.chunks(TILE)).enumerate() {
            dequant_run_impl(ob, cb, sm.get(r, kb));
        }
    }
}

/// [`dequant_rows_impl`] compiled for AVX-512, AVX2 or the baseline (widest supported first). Every
/// version does the same exact conversions and one IEEE multiply per element, so the bits agree.
fn dequant_rows(out: &mut [f32], q: &Fp8Matrix<'_>, r0: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn wide(out: &mut [f32], q: &Fp8Matrix<'_>, r0: usize) {
            dequant_rows_impl(out, q, r0)
        }
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(out: &mut [f32], q: &Fp8Matrix<'_>, r0: usize) {
            dequant_rows_impl(out, q, r0)
        }
        if crate::simd::has_avx512() {
            // SAFETY: the CPU supports AVX-512 F/BW/VL (checked just above).
            return unsafe { wide(out, q, r0) };
        }
        if crate::simd::has_avx2() {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { avx2(out, q, r0) };
        }
    }
    dequant_rows_impl(out, q, r0)
}

/// Dequantizes `a` and `b` to f32 in their own layouts (`code · scale` per element, one rounding) in one
/// parallel pass: both are cut into pieces of about 16K elements (whole rows) spread over the pool.
/// The buffers are resized without clearing: every element is overwritten.
fn dequantize_pair(
    ctx: &ExecCtx,
    a: &Fp8Matrix<'_>,
    da: &mut Vec<f32>,
    b: &Fp8Matrix<'_>,
    db: &mut Vec<f32>,
) {
    da.resize(a.rows * a.cols, 0.0);
    db.resize(b.rows * b.cols, 0.0);
    let per = |q: &Fp8Matrix<'_>| (16384 / q.cols.max(1)).max(1);
    let pieces = |q: &Fp8Matrix<'_>| {
        if q.rows == 0 || q.cols == 0 {
            0
        } else {
            q.rows.div_ceil(per(q))
        }
    };
    let (na, nb) = (pieces(a), pieces(b));
    let (pa, pb) = (SendPtr(da.as_mut_ptr()), SendPtr(db.as_mut_ptr()));
    ctx.for_each_index_init(
        na + nb,
        || (),
        |_, i| {
            let (q, p, i) = if i < na { (a, pa, i) } else { (b, pb, i - na) };
            let pr = per(q);
            let (r0, r1) = (i * pr, ((i + 1) * pr).min(q.rows));
            // SAFETY: piece i alone writes rows r0..r1 of its operand's buffer, which holds rows·cols
            // elements (resized above).
            let out = unsafe {
                std::slice::from_raw_parts_mut(p.get().add(r0 * q.cols), (r1 - r0) * q.cols)
            };
            dequant_rows(out, q, r0);
        },
    );
}

/// Dequantizes `q` into `out` ([rows, cols] f32, `code · scale` per element with one rounding — the same
/// values the GEMMs below multiply), in pieces of about 16K elements spread over the pool. Lets a caller
/// keep a decoded operand that several GEMMs reuse (a weight quantized once per optimizer step).
pub fn fp8_dequantize(ctx: &ExecCtx, out: &mut [f32], q: &Fp8Matrix<'_>) -> Result<()> {
    check_len("out", out.len(), dims(&[q.rows, q.cols])?)?;
    if out.is_empty() {
        return Ok(());
    }
    let per = (16384 / q.cols).max(1);
    let mut dummy = vec![(); q.rows.div_ceil(per)];
    ctx.for_each_chunk_pair(out, per * q.cols, &mut dummy, 1, |i, o, _| {
        dequant_rows(o, q, i * per)
    });
    Ok(())
}

thread_local! {
    /// Dequantized operands, kept per calling thread so repeated GEMMs reuse warm memory instead of
    /// faulting in fresh pages every call (it grows to the largest operands seen on that thread).
    static SCRATCH: std::cell::Cell<(Vec<f32>, Vec<f32>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// Dequantizes `a` and `b` into the thread's scratch buffers and runs `f` on them.
fn with_dequantized<R>(
    ctx: &ExecCtx,
    a: &Fp8Matrix<'_>,
    b: &Fp8Matrix<'_>,
    f: impl FnOnce(&[f32], &[f32]) -> R,
) -> R {
    let (mut da, mut db) = SCRATCH.take();
    dequantize_pair(ctx, a, &mut da, b, &mut db);
    let r = f(&da, &db);
    SCRATCH.set((da, db));
    r
}

/// Forward: `y[m,n] (+)= x[m,k] · w[n,k]ᵀ` with `x` quantized in 1×128 tiles (or blocks) and `w` in
/// 128×128 blocks (or 1×128 tiles); m, n, k come from the operands.
pub fn fp8_matmul_xwt(
    ctx: &ExecCtx,
    y: &mut [f32],
    x: &Fp8Matrix<'_>,
    w: &Fp8Matrix<'_>,
    acc: Accumulate,
) -> Result<()> {
    check_k(x, w, "x", "w")?;
    let (m, n, k) = (x.rows, w.rows, x.cols);
    check_len("y", y.len(), dims(&[m, n])?)?;
    with_dequantized(ctx, x, w, |xa, wb| {
        crate::matmul_xwt(ctx, y, xa, wb, m, n, k, acc)
    })
}

/// Input gradient: `dx[m,k] (+)= dy[m,n] · w[n,k]` with `dy` in 1×128 tiles along n and `w` in 128×128
/// blocks (required: a 1×128-tiled `w` has no scale that is constant along the contraction).
pub fn fp8_matmul_dyw(
    ctx: &ExecCtx,
    dx: &mut [f32],
    dy: &Fp8Matrix<'_>,
    w: &Fp8Matrix<'_>,
    acc: Accumulate,
) -> Result<()> {
    if w.tiling != Fp8Tiling::Block {
        return Err(KernelError::Invalid(
            "fp8_matmul_dyw needs w quantized in 128×128 blocks".into(),
        ));
    }
    if dy.cols != w.rows {
        return Err(KernelError::Invalid(format!(
            "fp8_matmul_dyw: dy has {} columns but w has {} rows",
            dy.cols, w.rows
        )));
    }
    let (m, n, k) = (dy.rows, w.rows, w.cols);
    check_len("dx", dx.len(), dims(&[m, k])?)?;
    with_dequantized(ctx, dy, w, |a, b| {
        crate::matmul_dyw(ctx, dx, a, b, m, n, k, acc)
    })
}

/// Weight gradient: `dw[n,k] (+)= dy[m,n]ᵀ · x[m,k]` from the transposed operands as `quantize_act_t`
/// produces them: `dy_t` [n, m] and `x_t` [k, m], both in 1×128 tiles along m (128×1 on dy and x).
pub fn fp8_matmul_dytx(
    ctx: &ExecCtx,
    dw: &mut [f32],
    dy_t: &Fp8Matrix<'_>,
    x_t: &Fp8Matrix<'_>,
    acc: Accumulate,
) -> Result<()> {
    check_k(dy_t, x_t, "dy_t", "x_t")?;
    let (n, k, m) = (dy_t.rows, x_t.rows, dy_t.cols);
    check_len("dw", dw.len(), dims(&[n, k])?)?;
    with_dequantized(ctx, dy_t, x_t, |a, b| {
        crate::matmul_xwt(ctx, dw, a, b, n, k, m, acc)
    })
}

/// The literal V3 recipe in NT form, `c[m,n] (+)= Σ_b (Σ_{p∈b} qa·qb) · sa · sb` with `a` [m,k] and
/// `b` [n,k] in any tiling: the inner sums run over exact code values and each 128-wide block's partial
/// sum is scaled and added to the f32 accumulator in block order. Slower than the fast path (one small
/// GEMM per block and output tile); kept as the executable definition the tests compare against.
pub fn fp8_matmul_nt_promoted(
    ctx: &ExecCtx,
    c: &mut [f32],
    a: &Fp8Matrix<'_>,
    b: &Fp8Matrix<'_>,
    acc: Accumulate,
) -> Result<()> {
    check_k(a, b, "a", "b")?;
    let (m, n, k) = (a.rows, b.rows, a.cols);
    check_len("c", c.len(), dims(&[m, n])?)?;
    let (ad, bd) = (decode(ctx, a.codes, m, k), decode(ctx, b.codes, n, k));
    nt_core(
        ctx,
        c,
        &ad,
        ScaleMap::of(a),
        &bd,
        ScaleMap::of(b),
        m,
        n,
        k,
        acc,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::{ScaleFmt, e4m3_decode, quantize_act, quantize_act_t, quantize_weight};
    use crate::testutil::{Rng, assert_close};

    /// Exact (f64) product of the dequantized operands, NT form.
    fn deq_nt(
        a: &[u8],
        sa: impl Fn(usize, usize) -> f64,
        b: &[u8],
        sb: impl Fn(usize, usize) -> f64,
        m: usize,
        n: usize,
        k: usize,
    ) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| {
                        e4m3_decode(a[i * k + p]) as f64
                            * sa(i, p / TILE)
                            * e4m3_decode(b[j * k + p]) as f64
                            * sb(j, p / TILE)
                    })
                    .sum();
            }
        }
        c
    }

    #[test]
    fn bit_decoder_equals_table() {
        for c in 0..=255u8 {
            let (v, t) = (e4m3_value_bits(c), E4M3_LUT[c as usize]);
            assert!(
                v.to_bits() == t.to_bits() || (v.is_nan() && t.is_nan()),
                "code {c:#04x}"
            );
            for s in [1.0f32, 3.7e-5, 0.013, 2.5e30] {
                let mut o = [0f32];
                dequant_run_impl(&mut o, &[c], s);
                let want = t * s;
                assert!(
                    o[0].to_bits() == want.to_bits() || (o[0].is_nan() && want.is_nan()),
                    "code {c:#04x} scale {s}"
                );
            }
        }
        // The dispatched (SIMD) build over a whole matrix: every code in both rows, two scales per row.
        let codes: Vec<u8> = (0..512).map(|i| (i % 256) as u8).collect();
        let scales = [0.5f32, 3.1e-3, 7.0e4, 1.9e-7];
        let q = Fp8Matrix::new(&codes, &scales, 2, 256, Fp8Tiling::Row).unwrap();
        let mut out = vec![0f32; 512];
        dequant_rows(&mut out, &q, 0);
        for (i, (v, &c)) in out.iter().zip(&codes).enumerate() {
            let want = E4M3_LUT[c as usize] * scales[i / TILE];
            assert!(
                v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()),
                "element {i}"
            );
        }
    }

    #[test]
    fn dequantize_gives_code_times_scale_in_both_tilings_on_any_thread_budget() {
        let mut rng = Rng::seeded("fp8deq");
        let (r, c) = (300, 200);
        let x = rng.vec_f32(r * c);
        let ctx = ExecCtx::cpu(1);
        for fmt in [ScaleFmt::F32, ScaleFmt::Ue8m0] {
            let (mut ac, mut asc) = (vec![0u8; r * c], vec![0f32; r * 2]);
            quantize_act(&ctx, &mut ac, &mut asc, &x, r, c, fmt).unwrap();
            let (mut wc, mut wsc) = (vec![0u8; r * c], vec![0f32; 3 * 2]);
            quantize_weight(&ctx, &mut wc, &mut wsc, &x, r, c, fmt).unwrap();
            let cases = [
                (
                    &ac,
                    Fp8Matrix::new(&ac, &asc, r, c, Fp8Tiling::Row).unwrap(),
                ),
                (
                    &wc,
                    Fp8Matrix::new(&wc, &wsc, r, c, Fp8Tiling::Block).unwrap(),
                ),
            ];
            for (codes, q) in cases {
                let sm = ScaleMap::of(&q);
                let want: Vec<f32> = (0..r * c)
                    .map(|i| e4m3_decode(codes[i]) * sm.get(i / c, (i % c) / TILE))
                    .collect();
                for threads in [1, 3] {
                    let mut got = vec![0f32; r * c];
                    fp8_dequantize(&ExecCtx::cpu(threads), &mut got, &q).unwrap();
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{fmt:?} {:?} on {threads} threads",
                        q.tiling()
                    );
                }
            }
        }
        let q = Fp8Matrix::new(&[0u8; 4], &[1.0; 2], 2, 2, Fp8Tiling::Row).unwrap();
        assert!(fp8_dequantize(&ctx, &mut [0f32; 3], &q).is_err());
    }

    #[test]
    fn three_layouts_match_dequantized_product_and_thread_invariance() {
        let mut rng = Rng::seeded("fp8gemm");
        let (m, n, k) = (70, 300, 260);
        let x: Vec<f32> = rng
            .vec_f32(m * k)
            .iter()
            .enumerate()
            .map(|(i, v)| v * (1 + i % 5) as f32)
            .collect();
        let w = rng.vec_f32(n * k);
        let dy = rng.vec_f32(m * n);
        let ctx = ExecCtx::cpu(2);
        let fmt = ScaleFmt::F32;
        let (mut xc, mut xs) = (vec![0u8; m * k], vec![0f32; m * 3]);
        quantize_act(&ctx, &mut xc, &mut xs, &x, m, k, fmt).unwrap();
        let (mut wc, mut ws) = (vec![0u8; n * k], vec![0f32; 3 * 3]);
        quantize_weight(&ctx, &mut wc, &mut ws, &w, n, k, fmt).unwrap();
        let (mut dc, mut ds) = (vec![0u8; m * n], vec![0f32; m * 3]);
        quantize_act(&ctx, &mut dc, &mut ds, &dy, m, n, fmt).unwrap();
        let xq = Fp8Matrix::new(&xc, &xs, m, k, Fp8Tiling::Row).unwrap();
        let wq = Fp8Matrix::new(&wc, &ws, n, k, Fp8Tiling::Block).unwrap();
        let dq = Fp8Matrix::new(&dc, &ds, m, n, Fp8Tiling::Row).unwrap();

        // Forward.
        let mut y = vec![0f32; m * n];
        fp8_matmul_xwt(&ctx, &mut y, &xq, &wq, Accumulate::Overwrite).unwrap();
        let want = deq_nt(
            &xc,
            |i, b| xs[i * 3 + b] as f64,
            &wc,
            |j, b| ws[(j / TILE) * 3 + b] as f64,
            m,
            n,
            k,
        );
        assert_close(&y, &want, 1e-6, "fp8 xwt");

        // Input gradient: dx = dy · w, against the exact product of dequantized dy and w.
        let mut dx = vec![0f32; m * k];
        fp8_matmul_dyw(&ctx, &mut dx, &dq, &wq, Accumulate::Overwrite).unwrap();
        let mut want = vec![0.0; m * k];
        for i in 0..m {
            for c in 0..k {
                want[i * k + c] = (0..n)
                    .map(|j| {
                        e4m3_decode(dc[i * n + j]) as f64
                            * ds[i * 3 + j / TILE] as f64
                            * e4m3_decode(wc[j * k + c]) as f64
                            * ws[(j / TILE) * 3 + c / TILE] as f64
                    })
                    .sum();
            }
        }
        assert_close(&dx, &want, 1e-6, "fp8 dyw");

        // Weight gradient from transposed quantization, accumulating onto a non-zero dw.
        let (mut dtc, mut dts) = (vec![0u8; m * n], vec![0f32; n]);
        quantize_act_t(&ctx, &mut dtc, &mut dts, &dy, m, n, fmt).unwrap();
        let (mut xtc, mut xts) = (vec![0u8; m * k], vec![0f32; k]);
        quantize_act_t(&ctx, &mut xtc, &mut xts, &x, m, k, fmt).unwrap();
        let dyt = Fp8Matrix::new(&dtc, &dts, n, m, Fp8Tiling::Row).unwrap();
        let xt = Fp8Matrix::new(&xtc, &xts, k, m, Fp8Tiling::Row).unwrap();
        let mut dw = vec![1f32; n * k];
        fp8_matmul_dytx(&ctx, &mut dw, &dyt, &xt, Accumulate::Add).unwrap();
        let want: Vec<f64> = deq_nt(
            &dtc,
            |i, _| dts[i] as f64,
            &xtc,
            |j, _| xts[j] as f64,
            n,
            k,
            m,
        )
        .iter()
        .map(|v| v + 1.0)
        .collect();
        assert_close(&dw, &want, 1e-6, "fp8 dytx");

        // The literal promoted recipe agrees with the exact product too.
        let mut yp = vec![0f32; m * n];
        fp8_matmul_nt_promoted(&ctx, &mut yp, &xq, &wq, Accumulate::Overwrite).unwrap();
        let want = deq_nt(
            &xc,
            |i, b| xs[i * 3 + b] as f64,
            &wc,
            |j, b| ws[(j / TILE) * 3 + b] as f64,
            m,
            n,
            k,
        );
        assert_close(&yp, &want, 1e-6, "fp8 promoted");

        // Same bits for 1 and 3 threads.
        for t in [1, 3] {
            let mut y2 = vec![0f32; m * n];
            fp8_matmul_xwt(&ExecCtx::cpu(t), &mut y2, &xq, &wq, Accumulate::Overwrite).unwrap();
            assert!(
                y.iter().zip(&y2).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{t} threads"
            );
            fp8_matmul_nt_promoted(&ExecCtx::cpu(t), &mut y2, &xq, &wq, Accumulate::Overwrite)
                .unwrap();
            assert!(
                yp.iter().zip(&y2).all(|(a, b)| a.to_bits() == b.to_bits()),
                "promoted, {t} threads"
            );
        }

        // Bad input.
        assert!(Fp8Matrix::new(&xc, &xs[1..], m, k, Fp8Tiling::Row).is_err());
        assert!(fp8_matmul_xwt(&ctx, &mut y, &xq, &dq, Accumulate::Add).is_err());
        assert!(fp8_matmul_dyw(&ctx, &mut dx, &dq, &xq, Accumulate::Add).is_err());
    }
}
