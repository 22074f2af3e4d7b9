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
/// Column strip width of the transposed quantizer (128 rows × 256 f32 = 128 KiB, L2-resident).
const STRIP: usize = 256;
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

/// A block of up to 128 rows for the transposed (128×1) tiling: column maxima of the strip
/// `c0..c0 + colmax.len()`, then each column's factor and scale. Returns the (row, col) in the block of the first non-finite value.
#[inline(always)]
fn act_t_block_impl(
    colmax: &mut [u32],
    factors: &mut [f32],
    scales: &mut [f32],
    x: &[f32],
    cols: usize,
    c0: usize,
    fmt: ScaleFmt,
) -> Option<(usize, usize)> {
    let cw = colmax.len();
    colmax.fill(0);
    for row in x.chunks_exact(cols) {
        for (m, v) in colmax.iter_mut().zip(&row[c0..c0 + cw]) {
            *m = (*m).max(v.to_bits() & ABS);
        }
    }
    if let Some(c) = colmax.iter().position(|&m| m >= INF_BITS) {
        let r = x
            .chunks_exact(cols)
            .position(|row| !row[c0 + c].is_finite())
            .unwrap_or(0);
        return Some((r, c0 + c));
    }
    for ((f, s), &m) in factors.iter_mut().zip(scales.iter_mut()).zip(colmax.iter()) {
        (*f, *s) = tile_params(f32::from_bits(m), fmt);
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
    (colmax: &mut [u32], factors: &mut [f32], scales: &mut [f32], x: &[f32], cols: usize, c0: usize, fmt: ScaleFmt) -> Option<(usize, usize)>);
dispatch!(weight_band, weight_band_avx2, weight_band_impl,
    (codes: &mut [u8], scales: &mut [f32], w: &[f32], cols: usize, fmt: ScaleFmt) -> Option<(usize, usize)>);

/// Encodes the strip `x[r, c0 + c]` (r < br = x.len() / cols, c < factors.len()) with column factors and
/// writes it transposed: `dst[c · stride + r] = e4m3(x[r, c0 + c] · factors[c])`. Full 16×16 sub-blocks
/// are encoded row-wise (vectorizable) and turned by [`transpose16`], the edges element by element.
///
/// # Safety
/// `dst[c · stride + r]` must be writable for every such c and r, and no other thread may access it.
#[inline(always)]
unsafe fn encode_t_store_impl(
    x: &[f32],
    cols: usize,
    c0: usize,
    factors: &[f32],
    dst: *mut u8,
    stride: usize,
) {
    let (br, cw) = (x.len() / cols, factors.len());
    let (fr, fc) = (br / 16 * 16, cw / 16 * 16);
    for cb in (0..fc).step_by(16) {
        let f = &factors[cb..cb + 16];
        for rb in (0..fr).step_by(16) {
            let mut blk = [[0u8; 16]; 16];
            for (i, b) in blk.iter_mut().enumerate() {
                let at = (rb + i) * cols + c0 + cb;
                for ((o, &v), &f) in b.iter_mut().zip(&x[at..at + 16]).zip(f) {
                    *o = e4m3_from_bits((v * f).to_bits());
                }
            }
            for (j, row) in transpose16(&blk).iter().enumerate() {
                // SAFETY: column cb + j < cw and rows rb..rb + 16 ≤ br, writable by the caller's contract.
                unsafe {
                    std::ptr::copy_nonoverlapping(row.as_ptr(), dst.add((cb + j) * stride + rb), 16)
                };
            }
        }
    }
    // Edges: the rows below the last full 16-row group, and the columns right of the last 16-column group.
    for (c, &f) in factors.iter().enumerate() {
        let rs = if c < fc { fr } else { 0 };
        for r in rs..br {
            let v = e4m3_from_bits((x[r * cols + c0 + c] * f).to_bits());
            // SAFETY: c < cw and r < br (the caller's contract).
            unsafe { *dst.add(c * stride + r) = v };
        }
    }
}

/// [`encode_t_store_impl`] compiled for AVX-512, AVX2 or the baseline (widest supported first); the same
/// IEEE operations in every build, so the same bits.
///
/// # Safety
/// As for [`encode_t_store_impl`].
unsafe fn encode_t_store(
    x: &[f32],
    cols: usize,
    c0: usize,
    factors: &[f32],
    dst: *mut u8,
    stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn wide(x: &[f32], cols: usize, c0: usize, f: &[f32], dst: *mut u8, stride: usize) {
            // SAFETY: forwarded caller contract.
            unsafe { encode_t_store_impl(x, cols, c0, f, dst, stride) }
        }
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(x: &[f32], cols: usize, c0: usize, f: &[f32], dst: *mut u8, stride: usize) {
            // SAFETY: forwarded caller contract.
            unsafe { encode_t_store_impl(x, cols, c0, f, dst, stride) }
        }
        if crate::simd::has_avx512() {
            // SAFETY: the CPU supports AVX-512 F/BW/VL (checked just above); caller contract forwarded.
            return unsafe { wide(x, cols, c0, factors, dst, stride) };
        }
        if crate::simd::has_avx2() {
            // SAFETY: the CPU supports AVX2 (checked just above); caller contract forwarded.
            return unsafe { avx2(x, cols, c0, factors, dst, stride) };
        }
    }
    // SAFETY: forwarded caller contract.
    unsafe { encode_t_store_impl(x, cols, c0, factors, dst, stride) }
}

/// Transposes a 16×16 byte block: `out[j][i] = m[i][j]`. On x86-64 four rounds of SSE2 unpacks (baseline
/// instructions), elsewhere plain loops.
#[inline(always)]
fn transpose16(m: &[[u8; 16]; 16]) -> [[u8; 16]; 16] {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        // SAFETY: SSE2 is part of the x86-64 baseline; the loads and stores read and write 16-byte arrays.
        unsafe {
            let r: [__m128i; 16] = std::array::from_fn(|i| _mm_loadu_si128(m[i].as_ptr().cast()));
            // Round 1: byte pairs of rows (2i, 2i+1); s1[g·8 + i] holds columns 8g..8g+8.
            let s1: [__m128i; 16] = std::array::from_fn(|q| {
                let (g, i) = (q / 8, q % 8);
                if g == 0 {
                    _mm_unpacklo_epi8(r[2 * i], r[2 * i + 1])
                } else {
                    _mm_unpackhi_epi8(r[2 * i], r[2 * i + 1])
                }
            });
            // Round 2: s2[4q + j] holds columns 4q..4q+4 of rows 4j..4j+4.
            let s2: [__m128i; 16] = std::array::from_fn(|x| {
                let (q, j) = (x / 4, x % 4);
                let (g, h) = (q / 2, q % 2);
                let (a, b) = (s1[8 * g + 2 * j], s1[8 * g + 2 * j + 1]);
                if h == 0 {
                    _mm_unpacklo_epi16(a, b)
                } else {
                    _mm_unpackhi_epi16(a, b)
                }
            });
            // Round 3: s3[2p + l] holds columns 2p, 2p+1 of rows 8l..8l+8.
            let s3: [__m128i; 16] = std::array::from_fn(|x| {
                let (p, l) = (x / 2, x % 2);
                let (q, h) = (p / 2, p % 2);
                let (a, b) = (s2[4 * q + 2 * l], s2[4 * q + 2 * l + 1]);
                if h == 0 {
                    _mm_unpacklo_epi32(a, b)
                } else {
                    _mm_unpackhi_epi32(a, b)
                }
            });
            // Round 4: column c, all 16 rows.
            let mut out = [[0u8; 16]; 16];
            for (c, o) in out.iter_mut().enumerate() {
                let (a, b) = (s3[c & !1], s3[(c & !1) + 1]);
                let v = if c % 2 == 0 {
                    _mm_unpacklo_epi64(a, b)
                } else {
                    _mm_unpackhi_epi64(a, b)
                };
                _mm_storeu_si128(o.as_mut_ptr().cast(), v);
            }
            out
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::array::from_fn(|j| std::array::from_fn(|i| m[i][j]))
    }
}

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
        || (vec![0u32; STRIP], vec![0f32; STRIP], vec![0f32; STRIP]),
        |(colmax, factors, scales), b| {
            let (r0, r1) = (b * TILE, ((b + 1) * TILE).min(rows));
            let xb = &x[r0 * cols..r1 * cols];
            // Column strips keep the block's input in L2 between the max pass and the encode pass.
            for s0 in (0..cols).step_by(STRIP) {
                let cw = (cols - s0).min(STRIP);
                let scales = &mut scales[..cw];
                if let Some((r, c)) = act_t_block(
                    &mut colmax[..cw],
                    &mut factors[..cw],
                    scales,
                    xb,
                    cols,
                    s0,
                    fmt,
                ) {
                    err.report((r0 + r, c));
                    return;
                }
                // SAFETY: block b writes codes_t[c, r0..r1] and scales_t[c, b] for its columns c: disjoint
                // across blocks and in bounds (lengths checked above).
                for (c, &s) in scales.iter().enumerate() {
                    unsafe { *sp.get().add((s0 + c) * rb + b) = s };
                }
                // SAFETY: block b alone writes codes_t[s0 + c, r0..r1] for c < cw, in bounds (codes_t is
                // [cols, rows], length checked above).
                unsafe {
                    encode_t_store(
                        xb,
                        cols,
                        s0,
                        &factors[..cw],
                        cp.get().add(s0 * rows + r0),
                        rows,
                    )
                };
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
    fn block_transpose_and_strip_encoder_match_scalar() {
        let m: [[u8; 16]; 16] =
            std::array::from_fn(|i| std::array::from_fn(|j| (i * 16 + j) as u8));
        let t = transpose16(&m);
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(t[j][i], m[i][j], "({i}, {j})");
            }
        }
        // The strip encoder against the scalar rule, with partial 16-blocks on both edges.
        let (br, cols, c0, cw, stride) = (37, 70, 3, 50, 41);
        let x: Vec<f32> = (0..br * cols)
            .map(|i| (i % 97) as f32 * 0.37 - 17.0)
            .collect();
        let f: Vec<f32> = (0..cw).map(|c| 0.5 + c as f32 * 0.25).collect();
        let mut dst = vec![0u8; cw * stride];
        // SAFETY: dst holds cw rows of `stride` ≥ br bytes.
        unsafe { encode_t_store(&x, cols, c0, &f, dst.as_mut_ptr(), stride) };
        for r in 0..br {
            for c in 0..cw {
                let want = crate::fp8::e4m3_encode(x[r * cols + c0 + c] * f[c]);
                assert_eq!(dst[c * stride + r], want, "({r}, {c})");
            }
        }
    }

    #[test]
    fn simd_builds_give_baseline_bits() {
        let mut rng = Rng::seeded("quant-simd");
        let x: Vec<f32> = (0..4000)
            .map(|i| (rng.uniform() * 2f64.powi(i % 40 - 20)) as f32)
            .collect();
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
