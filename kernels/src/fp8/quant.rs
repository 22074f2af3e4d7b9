//! Fine-grained E4M3 quantizers with the convention of `shared/golden/README.md` (DeepGEMM's helpers):
//! per tile, amax = max|x| clamped to ≥ 1e-4; with f32 scales code = e4m3(x · (448/amax)) (the factor
//! rounded once in f32) and scale = amax/448; with UE8M0 scales scale = 2^ceil(log2(amax/448)) and
//! code = e4m3(x / scale). So x ≈ code · scale.
//!
//! Tilings: activations 1×128 (scales [rows, ceil(cols/128)]), weights 128×128 (scales
//! [ceil(rows/128), ceil(cols/128)]), and 128×1 for weight-gradient operands, produced as the 1×128 rule on
//! the transpose (codes [cols, rows], scales [cols, ceil(rows/128)]). Edge tiles may be partial.
//!
//! Invariant: a NaN or ±∞ anywhere in a tile is an error naming its row and column (nothing meaningful
//! can be scaled by it); tiles are independent, so the output bits do not depend on the thread budget.

use super::codec::e4m3_from_bits;
use crate::exec::{ExecCtx, SendPtr};
use crate::{KernelError, Result, check_len, dims};

/// Tile edge (elements) of every tiling.
pub const TILE: usize = 128;

/// How a tile's scale is stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScaleFmt {
    /// Any f32: scale = amax / 448.
    #[default]
    F32,
    /// A power of two (UE8M0, as on Blackwell): scale = 2^ceil(log2(amax / 448)).
    Ue8m0,
}

const ABS: u32 = 0x7FFF_FFFF;
const INF_BITS: u32 = 0x7F80_0000;

/// (factor applied before encoding, stored scale) for a finite amax.
#[inline(always)]
fn tile_params(amax: f32, fmt: ScaleFmt) -> (f32, f32) {
    let amax = amax.max(1e-4);
    match fmt {
        ScaleFmt::F32 => (448.0 / amax, amax / 448.0),
        ScaleFmt::Ue8m0 => {
            let r = (amax / 448.0).to_bits();
            let s = if r & 0x7F_FFFF == 0 {
                r
            } else {
                (r & INF_BITS) + 0x0080_0000
            };
            // 1/s is exact for a power of two in this range, so x·(1/s) equals x/s.
            (1.0 / f32::from_bits(s), f32::from_bits(s))
        }
    }
}

#[inline(always)]
fn amax_bits(x: &[f32]) -> u32 {
    x.iter().fold(0u32, |m, v| m.max(v.to_bits() & ABS))
}

#[inline(always)]
fn encode_scaled(out: &mut [u8], x: &[f32], f: f32) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = e4m3_from_bits((v * f).to_bits());
    }
}

/// One row of 1×128 tiles. Returns the column of the first non-finite value, if any.
#[inline(always)]
fn act_row_impl(codes: &mut [u8], scales: &mut [f32], x: &[f32], fmt: ScaleFmt) -> Option<usize> {
    for (t, ((c, s), xs)) in codes
        .chunks_mut(TILE)
        .zip(scales.iter_mut())
        .zip(x.chunks(TILE))
        .enumerate()
    {
        let m = amax_bits(xs);
        if m >= INF_BITS {
            return Some(t * TILE + xs.iter().position(|v| !v.is_finite()).unwrap_or(0));
        }
        let (f, sc) = tile_params(f32::from_bits(m), fmt);
        *s = sc;
        encode_scaled(c, xs, f);
    }
    None
}

/// A block of up to 128 rows for the transposed (128×1) tiling: column maxima, then encode into `tile`
/// (row-major, the input's layout). Returns the (row, col) in the block of the first non-finite value.
#[inline(always)]
fn act_t_block_impl(
    tile: &mut [u8],
    colmax: &mut [u32],
    factors: &mut [f32],
    scales: &mut [f32],
    x: &[f32],
    cols: usize,
    fmt: ScaleFmt,
) -> Option<(usize, usize)> {
    colmax.fill(0);
    for row in x.chunks_exact(cols) {
        for (m, v) in colmax.iter_mut().zip(row) {
            *m = (*m).max(v.to_bits() & ABS);
        }
    }
    if let Some(c) = colmax.iter().position(|&m| m >= INF_BITS) {
        let r = x
            .chunks_exact(cols)
            .position(|row| !row[c].is_finite())
            .unwrap_or(0);
        return Some((r, c));
    }
    for ((f, s), &m) in factors.iter_mut().zip(scales.iter_mut()).zip(colmax.iter()) {
        (*f, *s) = tile_params(f32::from_bits(m), fmt);
    }
    for (t, row) in tile.chunks_exact_mut(cols).zip(x.chunks_exact(cols)) {
        for ((o, &v), &f) in t.iter_mut().zip(row).zip(factors.iter()) {
            *o = e4m3_from_bits((v * f).to_bits());
        }
    }
    None
}

/// A band of up to 128 rows of 128×128 blocks. Returns the (row, col) of the first non-finite value.
#[inline(always)]
fn weight_band_impl(
    codes: &mut [u8],
    scales: &mut [f32],
    w: &[f32],
    cols: usize,
    fmt: ScaleFmt,
) -> Option<(usize, usize)> {
    for (cb, s) in scales.iter_mut().enumerate() {
        let (c0, c1) = (cb * TILE, ((cb + 1) * TILE).min(cols));
        let m = w
            .chunks_exact(cols)
            .fold(0u32, |m, row| m.max(amax_bits(&row[c0..c1])));
        if m >= INF_BITS {
            for (r, row) in w.chunks_exact(cols).enumerate() {
                if let Some(c) = row[c0..c1].iter().position(|v| !v.is_finite()) {
                    return Some((r, c0 + c));
                }
            }
        }
        let (f, sc) = tile_params(f32::from_bits(m), fmt);
        *s = sc;
        for (crow, row) in codes.chunks_exact_mut(cols).zip(w.chunks_exact(cols)) {
            encode_scaled(&mut crow[c0..c1], &row[c0..c1], f);
        }
    }
    None
}

/// Compiles `$impl` for the baseline target, with AVX2 and with AVX-512 (picked at run time, widest
/// first). All versions execute the same IEEE operations (Rust never contracts to FMA), so they give
/// identical bits.
macro_rules! dispatch {
    ($name:ident, $avx:ident, $impl:ident, ($($a:ident: $t:ty),*) -> $r:ty) => {
        fn $name($($a: $t),*) -> $r {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
                unsafe fn wide($($a: $t),*) -> $r {
                    $impl($($a),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn $avx($($a: $t),*) -> $r {
                    $impl($($a),*)
                }
                if crate::simd::has_avx512() {
                    // SAFETY: the CPU supports AVX-512 F/BW/VL (checked just above).
                    return unsafe { wide($($a),*) };
                }
                if crate::simd::has_avx2() {
                    // SAFETY: the CPU supports AVX2 (checked just above).
                    return unsafe { $avx($($a),*) };
                }
            }
            $impl($($a),*)
        }
    };
}
dispatch!(act_row, act_row_avx2, act_row_impl, (codes: &mut [u8], scales: &mut [f32], x: &[f32], fmt: ScaleFmt) -> Option<usize>);
dispatch!(act_t_block, act_t_block_avx2, act_t_block_impl,
    (tile: &mut [u8], colmax: &mut [u32], factors: &mut [f32], scales: &mut [f32], x: &[f32], cols: usize, fmt: ScaleFmt) -> Option<(usize, usize)>);
dispatch!(weight_band, weight_band_avx2, weight_band_impl,
    (codes: &mut [u8], scales: &mut [f32], w: &[f32], cols: usize, fmt: ScaleFmt) -> Option<(usize, usize)>);

/// Collects the first error any parallel piece reports (the lowest row wins, so the message is stable).
struct FirstError(std::sync::Mutex<Option<(usize, usize)>>);
impl FirstError {
    fn new() -> Self {
        Self(std::sync::Mutex::new(None))
    }
    fn report(&self, at: (usize, usize)) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none_or(|old| at < old) {
            *g = Some(at);
        }
    }
    fn into_result(self, what: &'static str) -> Result<()> {
        match self.0.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some((row, col)) => Err(KernelError::NonFinite { what, row, col }),
            None => Ok(()),
        }
    }
}

/// 1×128 activation tiles: `codes` [rows, cols], `scales` [rows, ceil(cols/128)].
pub fn quantize_act(
    ctx: &ExecCtx,
    codes: &mut [u8],
    scales: &mut [f32],
    x: &[f32],
    rows: usize,
    cols: usize,
    fmt: ScaleFmt,
) -> Result<()> {
    let n = dims(&[rows, cols])?;
    let cb = cols.div_ceil(TILE);
    check_len("x", x.len(), n)?;
    check_len("codes", codes.len(), n)?;
    check_len("scales", scales.len(), rows * cb)?;
    if n == 0 {
        return Ok(());
    }
    let err = FirstError::new();
    // Rows are grouped so each parallel piece carries enough work.
    let rows_per = (16384 / cols).clamp(1, 64);
    ctx.for_each_chunk_pair(
        codes,
        rows_per * cols,
        scales,
        rows_per * cb,
        |piece, c, s| {
            for (r, (cr, sr)) in c.chunks_mut(cols).zip(s.chunks_mut(cb)).enumerate() {
                let row = piece * rows_per + r;
                if let Some(col) = act_row(cr, sr, &x[row * cols..(row + 1) * cols], fmt) {
                    err.report((row, col));
                    return;
                }
            }
        },
    );
    err.into_result("x")
}

/// 128×1 tiles (for weight-gradient operands), i.e. [`quantize_act`] applied to `xᵀ`:
/// `x` is [rows, cols]; `codes_t` is [cols, rows] and `scales_t` [cols, ceil(rows/128)].
pub fn quantize_act_t(
    ctx: &ExecCtx,
    codes_t: &mut [u8],
    scales_t: &mut [f32],
    x: &[f32],
    rows: usize,
    cols: usize,
    fmt: ScaleFmt,
) -> Result<()> {
    let n = dims(&[rows, cols])?;
    let rb = rows.div_ceil(TILE);
    check_len("x", x.len(), n)?;
    check_len("codes_t", codes_t.len(), n)?;
    check_len("scales_t", scales_t.len(), cols * rb)?;
    if n == 0 {
        return Ok(());
    }
    let err = FirstError::new();
    let (cp, sp) = (
        SendPtr(codes_t.as_mut_ptr()),
        SendPtr(scales_t.as_mut_ptr()),
    );
    ctx.for_each_index_init(
        rb,
        || {
            (
                vec![0u8; TILE * cols],
                vec![0u32; cols],
                vec![0f32; cols],
                vec![0f32; cols],
            )
        },
        |(tile, colmax, factors, scales), b| {
            let (r0, r1) = (b * TILE, ((b + 1) * TILE).min(rows));
            let br = r1 - r0;
            if let Some((r, c)) = act_t_block(
                &mut tile[..br * cols],
                colmax,
                factors,
                scales,
                &x[r0 * cols..r1 * cols],
                cols,
                fmt,
            ) {
                err.report((r0 + r, c));
                return;
            }
            // SAFETY: block b writes codes_t[c, r0..r1] and scales_t[c, b] for every c: disjoint across
            // blocks and in bounds (lengths checked above).
            for c in 0..cols {
                unsafe {
                    *sp.get().add(c * rb + b) = scales[c];
                    let dst = cp.get().add(c * rows + r0);
                    for i in 0..br {
                        *dst.add(i) = tile[i * cols + c];
                    }
                }
            }
        },
    );
    err.into_result("x")
}

/// 128×128 weight blocks: `codes` [rows, cols], `scales` [ceil(rows/128), ceil(cols/128)].
pub fn quantize_weight(
    ctx: &ExecCtx,
    codes: &mut [u8],
    scales: &mut [f32],
    w: &[f32],
    rows: usize,
    cols: usize,
    fmt: ScaleFmt,
) -> Result<()> {
    let n = dims(&[rows, cols])?;
    let cb = cols.div_ceil(TILE);
    check_len("w", w.len(), n)?;
    check_len("codes", codes.len(), n)?;
    check_len("scales", scales.len(), rows.div_ceil(TILE) * cb)?;
    if n == 0 {
        return Ok(());
    }
    let err = FirstError::new();
    ctx.for_each_chunk_pair(codes, TILE * cols, scales, cb, |b, c, s| {
        let r0 = b * TILE;
        let r1 = r0 + c.len() / cols;
        if let Some((r, col)) = weight_band(c, s, &w[r0 * cols..r1 * cols], cols, fmt) {
            err.report((r0 + r, col));
        }
    });
    err.into_result("w")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::e4m3_decode;
    use crate::testutil::Rng;

    #[test]
    fn transpose_rule_and_thread_invariance() {
        let mut rng = Rng::seeded("quant");
        let (rows, cols) = (300, 200);
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| (rng.uniform() * (1 + i % 7) as f64) as f32)
            .collect();
        let xt: Vec<f32> = (0..cols * rows)
            .map(|i| x[(i % rows) * cols + i / rows])
            .collect();
        for fmt in [ScaleFmt::F32, ScaleFmt::Ue8m0] {
            let mut runs = vec![];
            for threads in [1, 2, 3] {
                let ctx = ExecCtx::cpu(threads);
                let (mut ct, mut st) = (vec![0u8; rows * cols], vec![0f32; cols * 3]);
                quantize_act_t(&ctx, &mut ct, &mut st, &x, rows, cols, fmt).unwrap();
                let (mut c2, mut s2) = (vec![0u8; rows * cols], vec![0f32; cols * 3]);
                quantize_act(&ctx, &mut c2, &mut s2, &xt, cols, rows, fmt).unwrap();
                assert_eq!(ct, c2);
                assert_eq!(st, s2);
                let (mut cw, mut sw) = (vec![0u8; rows * cols], vec![0f32; 3 * 2]);
                quantize_weight(&ctx, &mut cw, &mut sw, &x, rows, cols, fmt).unwrap();
                runs.push((ct, st, cw, sw));
            }
            assert!(runs.windows(2).all(|w| w[0] == w[1]));
            // Dequantized weights are within half an E4M3 step (2^-4 relative) of the input or tiny.
            let (_, _, cw, sw) = &runs[0];
            for r in 0..rows {
                for c in 0..cols {
                    let v = e4m3_decode(cw[r * cols + c]) * sw[(r / TILE) * 2 + c / TILE];
                    let x = x[r * cols + c];
                    assert!(
                        (v - x).abs()
                            <= x.abs() / 16.0 + sw[(r / TILE) * 2 + c / TILE] * 2f32.powi(-9),
                        "{x} -> {v}"
                    );
                }
            }
        }
    }

    #[test]
    fn simd_builds_give_baseline_bits() {
        let mut rng = Rng::seeded("quant-simd");
        let x: Vec<f32> = (0..4000).map(|i| (rng.uniform() * 2f64.powi(i % 40 - 20)) as f32).collect();
        for fmt in [ScaleFmt::F32, ScaleFmt::Ue8m0] {
            let (mut c1, mut s1) = (vec![0u8; x.len()], vec![0f32; 32]);
            let (mut c2, mut s2) = (vec![0u8; x.len()], vec![0f32; 32]);
            assert_eq!(act_row(&mut c1, &mut s1, &x, fmt), None);
            assert_eq!(act_row_impl(&mut c2, &mut s2, &x, fmt), None);
            assert_eq!((c1, s1), (c2, s2));
        }
    }

    #[test]
    fn non_finite_and_shape_errors() {
        let ctx = ExecCtx::cpu(2);
        let mut x = vec![1f32; 3 * 130];
        x[2 * 130 + 129] = f32::NAN;
        x[2 * 130 + 5] = f32::INFINITY;
        let (mut c, mut s) = (vec![0u8; x.len()], vec![0f32; 6]);
        assert_eq!(
            quantize_act(&ctx, &mut c, &mut s, &x, 3, 130, ScaleFmt::F32),
            Err(KernelError::NonFinite {
                what: "x",
                row: 2,
                col: 5
            })
        );
        assert_eq!(
            quantize_weight(&ctx, &mut c, &mut s[..2], &x, 3, 130, ScaleFmt::F32),
            Err(KernelError::NonFinite {
                what: "w",
                row: 2,
                col: 5
            })
        );
        let mut s3 = vec![0f32; 130];
        assert_eq!(
            quantize_act_t(&ctx, &mut c, &mut s3, &x, 3, 130, ScaleFmt::F32),
            Err(KernelError::NonFinite {
                what: "x",
                row: 2,
                col: 5
            })
        );
        assert!(quantize_act(&ctx, &mut c, &mut s[..5], &x, 3, 130, ScaleFmt::F32).is_err());
    }
}
