//! Block-scaled FP8 GEMM: E4M3 codes plus per-tile scales in, f32 out, with the V3 recipe's promotion:
//! for every 128-wide block b of the contraction dimension, `acc += (Σ_{p∈b} qa·qb) · sa · sb`, where
//! the inner sum runs over exact f32 code values and the scales multiply the block's partial sum.
//!
//! Invariant: the output is split into tiles fixed by the shape alone and each tile walks the K blocks
//! in order on one thread, so the result is the same bits for any thread budget. A NaN code (0x7F/0xFF)
//! propagates to the outputs it touches (documented value; the quantizers never emit one).
//!
//! Implementation: the codes are decoded once to f32 (exact), then each output tile runs one `gemm` call
//! per K block into a cache-resident scratch tile and folds it into the output with the two scales.

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

/// Scale lookup for operand rows `r` and K block `kb`: `data[(r / div) · rs + kb · ks]`.
#[derive(Clone, Copy)]
struct ScaleMap<'a> {
    data: &'a [f32],
    div: usize,
    rs: usize,
    ks: usize,
}

impl<'s> ScaleMap<'s> {
    #[inline]
    fn get(&self, r: usize, kb: usize) -> f32 {
        self.data[(r / self.div) * self.rs + kb * self.ks]
    }
    fn of<'m>(m: &Fp8Matrix<'m>) -> ScaleMap<'m> {
        let div = if m.tiling == Fp8Tiling::Row { 1 } else { TILE };
        ScaleMap {
            data: m.scales,
            div,
            rs: m.cols.div_ceil(TILE),
            ks: 1,
        }
    }
}

/// Decodes `codes` ([rows, cols]) to f32, optionally transposed to [cols, rows].
fn decode(ctx: &ExecCtx, codes: &[u8], rows: usize, cols: usize, transpose: bool) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    if rows == 0 || cols == 0 {
        return out;
    }
    if !transpose {
        let per = 64 * cols;
        let mut dummy = vec![(); out.len().div_ceil(per)];
        ctx.for_each_chunk_pair(&mut out, per, &mut dummy, 1, |i, o, _| {
            for (v, &c) in o.iter_mut().zip(&codes[i * per..]) {
                *v = E4M3_LUT[c as usize];
            }
        });
    } else {
        // Output row j (input column j) gathers a strided column; done in bands of 64 output rows.
        let per = 64 * rows;
        let mut dummy = vec![(); out.len().div_ceil(per)];
        ctx.for_each_chunk_pair(&mut out, per, &mut dummy, 1, |i, o, _| {
            for (jj, orow) in o.chunks_exact_mut(rows).enumerate() {
                let j = i * 64 + jj;
                for (r, v) in orow.iter_mut().enumerate() {
                    *v = E4M3_LUT[codes[r * cols + j] as usize];
                }
            }
        });
    }
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
    let (xa, wb) = (
        decode(ctx, x.codes, m, k, false),
        decode(ctx, w.codes, n, k, false),
    );
    nt_core(
        ctx,
        y,
        &xa,
        ScaleMap::of(x),
        &wb,
        ScaleMap::of(w),
        m,
        n,
        k,
        acc,
    );
    Ok(())
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
    let a = decode(ctx, dy.codes, m, n, false);
    let wt = decode(ctx, w.codes, n, k, true);
    // wᵀ row r (a column of w) in contraction block nb uses w's block scale [nb, r / 128].
    let swt = ScaleMap {
        data: w.scales,
        div: TILE,
        rs: 1,
        ks: k.div_ceil(TILE),
    };
    nt_core(ctx, dx, &a, ScaleMap::of(dy), &wt, swt, m, k, n, acc);
    Ok(())
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
    let (a, b) = (
        decode(ctx, dy_t.codes, n, m, false),
        decode(ctx, x_t.codes, k, m, false),
    );
    nt_core(
        ctx,
        dw,
        &a,
        ScaleMap::of(dy_t),
        &b,
        ScaleMap::of(x_t),
        n,
        k,
        m,
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

        // Same bits for 1 and 3 threads.
        for t in [1, 3] {
            let mut y2 = vec![0f32; m * n];
            fp8_matmul_xwt(&ExecCtx::cpu(t), &mut y2, &xq, &wq, Accumulate::Overwrite).unwrap();
            assert!(
                y.iter().zip(&y2).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{t} threads"
            );
        }

        // Bad input.
        assert!(Fp8Matrix::new(&xc, &xs[1..], m, k, Fp8Tiling::Row).is_err());
        assert!(fp8_matmul_xwt(&ctx, &mut y, &xq, &dq, Accumulate::Add).is_err());
        assert!(fp8_matmul_dyw(&ctx, &mut dx, &dq, &xq, Accumulate::Add).is_err());
    }
}
