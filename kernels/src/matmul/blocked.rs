//! The crate's own f32 GEMM for AVX-512 machines: packed operands, a 12 × 32 register-tile microkernel and
//! cache blocking, multi-threaded over disjoint output tiles. `matmul.rs` routes f32 calls here when the CPU
//! has AVX-512 and falls back to the `gemm` crate otherwise (and for f64).
//!
//! Computes `c[m,n] (+)= a[m,k] · b[k,n]` with `c` row-major and `a`, `b` strided. `b` is packed whole
//! into a [`PackedB`] (a weight can be packed once and reused by every call of a step); `a` is packed per
//! call, one block of [`MC`] rows × [`KC`] columns at a time, into [`MR`]-row micro-panels.
//!
//! Invariant (determinism): every output element is produced by the same sequence of IEEE operations
//! whatever the thread count or the way the output is split across threads: its K range is cut into
//! [`KC`] blocks at fixed offsets, each block is summed from zero by fused multiply-adds in increasing k
//! order, and the block sums are added to the output in block order. Only the assignment of output tiles to
//! threads depends on the thread budget, and tiles are disjoint.

use super::View;
use crate::exec::{Accumulate, ExecCtx, SendPtr};
use std::cell::Cell;

/// Rows of the register tile (values of `a` broadcast per k step).
///
/// 12 × 32 (24 accumulators, two `b` vectors and twelve broadcasts per k step) was measured against
/// 8 × 48, 14 × 32 and 6 × 64 on the development machine (kernel alone, `b` streamed from L2): 95–97 % of
/// the FMA peak against 85 %, 95 % and 89 %. Each `b` vector feeds 12 FMAs instead of 8, so the kernel
/// needs a third less L2 bandwidth per FLOP than 8 × 48, which is what held that one back.
pub(crate) const MR: usize = 12;
/// Columns of the register tile (two 16-lane vectors of `b` per k step).
pub(crate) const NR: usize = 32;
/// K block: the packed `a` micro-panel (MR × KC, 12 KiB) stays in L1 while the kernel streams
/// one `b` micro-panel (KC × NR, 32 KiB) from L2 per call.
pub(crate) const KC: usize = 256;
/// Rows of `a` packed at once (the packed block, MC × KC = 120 KiB, stays in L2).
const MC: usize = 10 * MR;
/// Columns swept per `a` micro-panel (the `b` block, KC × NC = 512 KiB, stays in L2).
const NC: usize = 16 * NR;
/// How many k steps ahead the kernel prefetches its `b` micro-panel into L1 (16 measured best of
/// 0, 4, 8, 16, 24 on the development machine).
const PREFETCH: usize = 16;

/// Whether this CPU runs the blocked kernel (AVX-512 F).
#[inline]
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Bytes in one x86-64 huge page.
const HUGE_PAGE: usize = 2 << 20;

/// Asks Linux to back `len` values at `ptr` with transparent huge pages when the system allows it on
/// request (`madvise` mode): a packed operand of a few MiB then needs a handful of TLB entries instead of
/// one per 4 KiB page. A hint only: failure changes nothing but speed.
fn advise_huge_pages(ptr: *mut f32, len: usize) {
    #[cfg(target_os = "linux")]
    {
        unsafe extern "C" {
            fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
        }
        const MADV_HUGEPAGE: i32 = 14;
        let bytes = len * 4;
        // Only whole 2 MiB pages inside the allocation can be huge; smaller buffers are left alone.
        let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
        let end = (ptr as usize + bytes) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: the range lies inside the caller's live allocation; MADV_HUGEPAGE changes only how
            // the kernel backs the pages, never their contents.
            unsafe { madvise(start as *mut std::ffi::c_void, end - start, MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

/// An f32 buffer whose data starts on a 64-byte boundary (one cache line, one zmm load).
#[derive(Default)]
pub(crate) struct AlignedBuf {
    raw: Vec<f32>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    /// Makes room for `len` values (contents unspecified), reusing the allocation when it is big enough.
    fn resize(&mut self, len: usize) {
        // Buffers of at least one huge page start on a huge-page boundary (see `advise_huge_pages`).
        let align = if len >= HUGE_PAGE / 4 { HUGE_PAGE } else { 64 };
        let need = len + align / 4;
        if self.raw.len() < need {
            self.raw = Vec::new();
            let mut raw = Vec::with_capacity(need);
            if align == HUGE_PAGE {
                advise_huge_pages(raw.as_mut_ptr(), need);
            }
            raw.resize(need, 0.0);
            self.raw = raw;
        }
        let addr = self.raw.as_ptr() as usize;
        self.off = (addr.next_multiple_of(align) - addr) / 4;
        self.len = len;
    }

    fn as_slice(&self) -> &[f32] {
        &self.raw[self.off..self.off + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

/// The right-hand operand `b[k,n]` in microkernel order: for each K block of [`KC`] rows (the last one
/// shorter), the column panels `j*NR..(j+1)*NR` (zero-padded past `n`) follow each other, and within a
/// panel each of the block's rows holds its NR values contiguously. One block of panels is therefore one
/// contiguous range, which keeps the panels the kernel sweeps spread over the cache sets.
pub(crate) struct PackedB {
    buf: AlignedBuf,
    k: usize,
    n: usize,
}

impl PackedB {
    /// An empty packing (no storage yet).
    pub(crate) fn new() -> Self {
        Self {
            buf: AlignedBuf::default(),
            k: 0,
            n: 0,
        }
    }

    /// The contraction length.
    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// The number of columns.
    pub(crate) fn n(&self) -> usize {
        self.n
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    /// Packs `b` (element (p, j) at `ptr + p*rs + j*cs`, `p < k`, `j < n`), spreading panels over `ctx`.
    ///
    /// # Safety
    /// Every element the view addresses for `p < k`, `j < n` must be inside a live allocation.
    pub(crate) unsafe fn pack(&mut self, ctx: &ExecCtx, b: View<f32>, k: usize, n: usize) {
        self.k = k;
        self.n = n;
        let panels = n.div_ceil(NR);
        let n_pad = panels * NR;
        self.buf.resize(n_pad * k);
        if k == 0 || n == 0 {
            return;
        }
        let dst = SendPtr(self.buf.as_mut_slice().as_mut_ptr());
        let b_ptr = SendPtr(b.ptr as *mut f32);
        let (rs, cs) = (b.rs, b.cs);
        // Each (panel, K block) micro-panel is a disjoint range of the buffer, written by one task.
        ctx.for_each_index_init(
            panels,
            || (),
            |_, j| {
                let src = b_ptr.get() as *const f32;
                let cols = NR.min(n - j * NR);
                let mut pc = 0;
                while pc < k {
                    let kc = KC.min(k - pc);
                    // SAFETY: the micro-panel (pc, j) is `kc * NR` values at `pc * n_pad + j * kc * NR`,
                    // inside the buffer and disjoint from every other; the source rows pc..pc+kc < k and
                    // columns j*NR.. < n are inside the view by the caller's contract.
                    unsafe {
                        let d = std::slice::from_raw_parts_mut(
                            dst.get().add(pc * n_pad + j * kc * NR),
                            kc * NR,
                        );
                        pack_panel(
                            d,
                            src.offset(pc as isize * rs + (j * NR) as isize * cs),
                            rs,
                            cs,
                            kc,
                            cols,
                            NR,
                        )
                    };
                    pc += kc;
                }
            },
        );
    }

    /// The packed micro-panel of K block starting at `pc` (of length `kc`) and column panel `j`.
    fn micro_panel(&self, pc: usize, kc: usize, j: usize) -> *const f32 {
        let n_pad = self.panels() * NR;
        self.buf.as_slice()[pc * n_pad + j * kc * NR..].as_ptr()
    }
}

/// Packs `len` rows (k steps) of `width` strided lanes into `dst[p*stride + lane]`, zero-filling lanes
/// `width..stride`. `src` addresses lane `l` of step `p` at `p*step + l*lane`. `stride` is a multiple of 4.
///
/// # Safety
/// Every addressed source element must be inside a live allocation; `dst.len() >= len * stride`; the CPU
/// supports AVX-512 F (callers check [`available`]).
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx"))]
unsafe fn pack_panel(
    dst: &mut [f32],
    src: *const f32,
    step: isize,
    lane: isize,
    len: usize,
    width: usize,
    stride: usize,
) {
    let dst = &mut dst[..len * stride];
    if width < stride {
        dst.fill(0.0);
    }
    if step == 1 {
        // Lanes are contiguous along k: transpose 8 lanes × 8 steps at a time, then 4 lanes × 8 steps
        // (the last third of a 12-row `a` panel), then the rest one value at a time.
        let groups = width / 8;
        let quad = width % 8 >= 4;
        let vector_lanes = groups * 8 + if quad { 4 } else { 0 };
        let p8 = len / 8 * 8;
        for p in (0..p8).step_by(8) {
            for g in 0..groups {
                // SAFETY: lanes 8g..8g+8 < width and steps p..p+8 <= len are inside the source; the
                // destination rows p..p+8, lanes 8g..8g+8 are inside `dst`.
                unsafe {
                    transpose8x8(
                        src.offset((8 * g) as isize * lane + p as isize),
                        lane,
                        dst.as_mut_ptr().add(p * stride + 8 * g),
                        stride,
                    )
                };
            }
            if quad {
                let l0 = groups * 8;
                // SAFETY: lanes l0..l0+4 <= width and steps p..p+8 <= len are inside the source; the
                // destination rows p..p+8, lanes l0..l0+4 are inside `dst`.
                unsafe {
                    transpose4x8(
                        src.offset(l0 as isize * lane + p as isize),
                        lane,
                        dst.as_mut_ptr().add(p * stride + l0),
                        stride,
                    )
                };
            }
        }
        for l in 0..width {
            // SAFETY: lane l < width and steps p < len are inside the source by the caller's contract.
            let s = unsafe { src.offset(l as isize * lane) };
            let from = if l < vector_lanes { p8 } else { 0 };
            for p in from..len {
                dst[p * stride + l] = unsafe { *s.add(p) };
            }
        }
    } else if lane == 1 {
        for p in 0..len {
            // SAFETY: the `width` contiguous lanes of step p are inside the source.
            let s = unsafe { std::slice::from_raw_parts(src.offset(p as isize * step), width) };
            dst[p * stride..p * stride + width].copy_from_slice(s);
        }
    } else {
        for p in 0..len {
            // SAFETY: as above.
            let s = unsafe { src.offset(p as isize * step) };
            let d = &mut dst[p * stride..p * stride + width];
            for (l, v) in d.iter_mut().enumerate() {
                *v = unsafe { *s.offset(l as isize * lane) };
            }
        }
    }
}

/// Interleaves four rows of 8 values so that column `c` of the 4 × 8 block sits in the low 128-bit
/// half of `out[c % 4]` when `c < 4` and in its high half otherwise (the first stage of both
/// transposes below).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
fn quad_columns(r: [std::arch::x86_64::__m256; 4]) -> [std::arch::x86_64::__m256; 4] {
    use std::arch::x86_64::*;
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    [
        _mm256_shuffle_ps::<0x44>(t0, t2),
        _mm256_shuffle_ps::<0xEE>(t0, t2),
        _mm256_shuffle_ps::<0x44>(t1, t3),
        _mm256_shuffle_ps::<0xEE>(t1, t3),
    ]
}

/// Loads `N` rows of 8 values, row `i` at `src + i*ld`.
///
/// # Safety
/// The rows must be inside a live allocation; the CPU supports AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn load_rows<const N: usize>(src: *const f32, ld: isize) -> [std::arch::x86_64::__m256; N] {
    // SAFETY: the N rows of 8 values are inside the source by the caller's contract.
    std::array::from_fn(|i| unsafe {
        std::arch::x86_64::_mm256_loadu_ps(src.offset(i as isize * ld))
    })
}

/// Writes the transpose of the 8 × 8 block at `src` (row `r` at `src + r*ld`, 8 contiguous values) to
/// `dst` (row `c` at `dst + c*ldd`): `dst[c][r] = src[r][c]`.
///
/// # Safety
/// Both blocks must be inside live allocations; the CPU supports AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn transpose8x8(src: *const f32, ld: isize, dst: *mut f32, ldd: usize) {
    use std::arch::x86_64::*;
    // SAFETY: forwarded from the caller's contract.
    let r: [__m256; 8] = unsafe { load_rows(src, ld) };
    let lo = quad_columns([r[0], r[1], r[2], r[3]]);
    let hi = quad_columns([r[4], r[5], r[6], r[7]]);
    for c in 0..4 {
        // SAFETY: rows c and c + 4 of the destination block are inside it by the caller's contract.
        unsafe {
            _mm256_storeu_ps(
                dst.add(c * ldd),
                _mm256_permute2f128_ps::<0x20>(lo[c], hi[c]),
            );
            _mm256_storeu_ps(
                dst.add((c + 4) * ldd),
                _mm256_permute2f128_ps::<0x31>(lo[c], hi[c]),
            );
        }
    }
}

/// Writes the transpose of the 4 × 8 block at `src` (row `r` at `src + r*ld`, 8 contiguous values) to
/// `dst` (row `c` at `dst + c*ldd`, 4 values): `dst[c][r] = src[r][c]`.
///
/// # Safety
/// Both blocks must be inside live allocations; the CPU supports AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn transpose4x8(src: *const f32, ld: isize, dst: *mut f32, ldd: usize) {
    use std::arch::x86_64::*;
    // SAFETY: forwarded from the caller's contract.
    let u = quad_columns(unsafe { load_rows::<4>(src, ld) });
    for (c, v) in u.iter().enumerate() {
        // SAFETY: rows c and c + 4 of the destination block are inside it by the caller's contract.
        unsafe {
            _mm_storeu_ps(dst.add(c * ldd), _mm256_castps256_ps128(*v));
            _mm_storeu_ps(dst.add((c + 4) * ldd), _mm256_extractf128_ps::<1>(*v));
        }
    }
}

/// The portable transpose of an `R` × 8 block (other architectures, where nothing calls it: see
/// [`available`]).
///
/// # Safety
/// Both blocks must be inside live allocations.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn transpose_rows<const R: usize>(src: *const f32, ld: isize, dst: *mut f32, ldd: usize) {
    for r in 0..R {
        for c in 0..8 {
            // SAFETY: both blocks are inside live allocations by the caller's contract.
            unsafe { *dst.add(c * ldd + r) = *src.offset(r as isize * ld + c as isize) };
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn transpose4x8(src: *const f32, ld: isize, dst: *mut f32, ldd: usize) {
    // SAFETY: forwarded from the caller's contract.
    unsafe { transpose_rows::<4>(src, ld, dst, ldd) }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn transpose8x8(src: *const f32, ld: isize, dst: *mut f32, ldd: usize) {
    // SAFETY: forwarded from the caller's contract.
    unsafe { transpose_rows::<8>(src, ld, dst, ldd) }
}

thread_local! {
    /// Per-thread scratch for the packed `a` block (taken while in use, so a re-entrant call on the same
    /// thread allocates its own instead of sharing).
    static A_SCRATCH: Cell<AlignedBuf> = Cell::new(AlignedBuf::default());
    /// Per-thread scratch for a per-call packed `b`.
    static B_SCRATCH: Cell<Option<PackedB>> = const { Cell::new(None) };
}

/// Largest per-call packing (in values) kept for reuse by the next call on the same thread: 64 MiB.
const KEEP_B_SCRATCH: usize = 1 << 24;

/// Runs `f` with this thread's reusable [`PackedB`] scratch (dropped afterwards when it grew past
/// [`KEEP_B_SCRATCH`], so one huge product does not pin its packing for the life of the thread).
pub(crate) fn with_b_scratch<R>(f: impl FnOnce(&mut PackedB) -> R) -> R {
    let mut pb = B_SCRATCH.with(|c| c.take()).unwrap_or_else(PackedB::new);
    let r = f(&mut pb);
    if pb.buf.raw.len() <= KEEP_B_SCRATCH {
        B_SCRATCH.with(|c| c.set(Some(pb)));
    }
    r
}

/// `c[m, n] (+)= a[m, k] · b`, with `b` already packed (`b.k() == k`, `b.n() == n`) and `c` row-major with
/// row stride `ldc`.
///
/// # Safety
/// The `a` view must address only live elements for rows `< m` and columns `< k`; `c` must be valid for
/// rows `< m` (stride `ldc`) and columns `< n`, alias nothing else, and not be touched by other threads.
pub(crate) unsafe fn gemm_packed(
    ctx: &ExecCtx,
    m: usize,
    c: *mut f32,
    ldc: usize,
    acc: Accumulate,
    a: View<f32>,
    b: &PackedB,
) {
    let (k, n) = (b.k(), b.n());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if acc == Accumulate::Overwrite {
            for i in 0..m {
                // SAFETY: row i < m, columns < n are inside `c` by the caller's contract.
                unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), n) }.fill(0.0);
            }
        }
        return;
    }
    // Split the output into disjoint tiles, one per task: rows in MR multiples when there are enough
    // rows, otherwise columns in NR panels. The split changes only which thread computes a tile.
    let threads = ctx.threads();
    let row_panels = m.div_ceil(MR);
    let col_panels = b.panels();
    let (row_tasks, col_tasks) = if row_panels >= 2 * threads || row_panels >= col_panels {
        (threads.min(row_panels), 1)
    } else {
        (1, threads.min(col_panels))
    };
    let tasks = row_tasks * col_tasks;
    let c_ptr = SendPtr(c);
    let a_ptr = SendPtr(a.ptr as *mut f32);
    let (a_rs, a_cs) = (a.rs, a.cs);
    let run = |t: usize| {
        let (rt, ct) = (t / col_tasks, t % col_tasks);
        let (r0, r1) = split(row_panels, row_tasks, rt);
        let (p0, p1) = split(col_panels, col_tasks, ct);
        let rows = (r0 * MR, (r1 * MR).min(m));
        let cols = (p0, p1);
        let a = View {
            ptr: a_ptr.get() as *const f32,
            rs: a_rs,
            cs: a_cs,
        };
        // SAFETY: tiles of different tasks are disjoint (distinct row or column ranges); the rest is
        // forwarded from the caller's contract.
        unsafe { gemm_tile(rows, cols, k, n, c_ptr.get(), ldc, acc, a, b) };
    };
    if tasks == 1 {
        run(0);
    } else {
        ctx.for_each_index_init(tasks, || (), |_, t| run(t));
    }
}

/// The `i`-th of `parts` near-equal contiguous ranges of `0..total`.
fn split(total: usize, parts: usize, i: usize) -> (usize, usize) {
    let base = total / parts;
    let rem = total % parts;
    let start = i * base + i.min(rem);
    (start, start + base + usize::from(i < rem))
}

/// One task: rows `rows.0..rows.1` of `c` (rows.0 a multiple of MR) and column panels `cols.0..cols.1`.
///
/// # Safety
/// As [`gemm_packed`], and no other thread touches this tile.
unsafe fn gemm_tile(
    rows: (usize, usize),
    cols: (usize, usize),
    k: usize,
    n: usize,
    c: *mut f32,
    ldc: usize,
    acc: Accumulate,
    a: View<f32>,
    b: &PackedB,
) {
    let mut abuf = A_SCRATCH.with(|s| s.take());
    abuf.resize(MC * KC);
    // Row blocks of near-equal size (at most MC, a multiple of MR): a short last block would stream the
    // whole `b` block from L2 for only one or two `a` micro-panels.
    let row_count = rows.1 - rows.0;
    let mc_block = row_count
        .div_ceil(row_count.div_ceil(MC))
        .next_multiple_of(MR);
    let mut pc = 0;
    while pc < k {
        let kc = KC.min(k - pc);
        let add = pc > 0 || acc == Accumulate::Add;
        let mut ic = rows.0;
        while ic < rows.1 {
            let mc = mc_block.min(rows.1 - ic);
            let apanels = mc.div_ceil(MR);
            {
                let dst = abuf.as_mut_slice();
                for ip in 0..apanels {
                    let r0 = ic + ip * MR;
                    // SAFETY: rows r0.. < m and columns pc..pc+kc < k are inside the `a` view.
                    unsafe {
                        pack_panel(
                            &mut dst[ip * MR * kc..],
                            a.ptr.offset(r0 as isize * a.rs + pc as isize * a.cs),
                            a.cs,
                            a.rs,
                            kc,
                            MR.min(rows.1 - r0),
                            MR,
                        )
                    };
                }
            }
            let apack = abuf.as_slice().as_ptr();
            let mut jc = cols.0;
            while jc < cols.1 {
                let jend = cols.1.min(jc + NC / NR);
                // The `a` micro-panel stays hot while the kernel streams the `b` panels of this block.
                for ip in 0..apanels {
                    let r0 = ic + ip * MR;
                    let mr = MR.min(rows.1 - r0);
                    for jp in jc..jend {
                        let nr = NR.min(n - jp * NR);
                        // SAFETY: the packed panels hold kc steps of MR (resp. NR) values at these
                        // offsets; the output tile (r0.., jp*NR..) of mr × nr is inside `c`.
                        unsafe {
                            kernel_dispatch(
                                kc,
                                apack.add(ip * MR * kc),
                                b.micro_panel(pc, kc, jp),
                                c.add(r0 * ldc + jp * NR),
                                ldc,
                                mr,
                                nr,
                                add,
                            )
                        };
                    }
                }
                jc = jend;
            }
            ic += mc;
        }
        pc += kc;
    }
    A_SCRATCH.with(|s| s.set(abuf));
}

/// Calls the AVX-512 microkernel, or on other architectures (where [`available`] is false and nothing
/// calls this) a portable loop with the same arithmetic.
///
/// # Safety
/// As [`kernel`].
#[inline]
unsafe fn kernel_dispatch(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    add: bool,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded; callers check `available()`, which requires AVX-512 F.
    unsafe {
        // A partial last panel runs only the vectors it needs (same arithmetic per element).
        match nr.div_ceil(16) {
            1 => kernel::<1>(kc, a, b, c, ldc, mr, nr, add),
            _ => kernel::<2>(kc, a, b, c, ldc, mr, nr, add),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    for r in 0..mr {
        for j in 0..nr {
            let mut t = 0f32;
            for p in 0..kc {
                // SAFETY: inside the packed panels and the tile by the caller's contract.
                t = unsafe { (*a.add(p * MR + r)).mul_add(*b.add(p * NR + j), t) };
            }
            // SAFETY: as above.
            unsafe {
                let y = c.add(r * ldc + j);
                *y = if add { *y + t } else { t };
            }
        }
    }
}

/// The register tile: `c[0..mr, 0..nr] (+)= Σ_p a[p*MR + r] · b[p*NR + j]` for `p < kc`, summed from zero
/// in increasing p with one FMA per step, then added to (or written over) `c`. Computes the first `NV`
/// 16-column vectors of the panel (`nr <= 16 * NV <= NR`).
///
/// # Safety
/// `a` holds `kc * MR` values, `b` holds `kc * NR` values, `c` is valid for `mr` rows of stride `ldc` and
/// `nr` columns (`mr <= MR`, `nr <= NR`), and the CPU supports AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel<const NV: usize>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    add: bool,
) {
    use std::arch::x86_64::*;
    let mut t = [[_mm512_setzero_ps(); NV]; MR];
    let (mut a, mut b) = (a, b);
    for _ in 0..kc {
        // SAFETY: p < kc, so a[0..MR] and b[0..NR] are inside the packed panels.
        unsafe {
            let bv: [__m512; NV] = std::array::from_fn(|v| _mm512_loadu_ps(b.add(16 * v)));
            // Prefetching past the end of the panel is harmless (prefetches never fault).
            for v in 0..NV {
                _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(PREFETCH * NR + 16 * v) as *const i8);
            }
            for (r, row) in t.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(r));
                for v in 0..NV {
                    row[v] = _mm512_fmadd_ps(av, bv[v], row[v]);
                }
            }
            a = a.add(MR);
            b = b.add(NR);
        }
    }
    if mr == MR && nr == 16 * NV {
        for (r, row) in t.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                // SAFETY: full tile: row r < MR, columns 16v..16v+16 < NR are inside `c`.
                unsafe {
                    let p = c.add(r * ldc + 16 * v);
                    let y = if add {
                        _mm512_add_ps(_mm512_loadu_ps(p), *x)
                    } else {
                        *x
                    };
                    _mm512_storeu_ps(p, y);
                }
            }
        }
    } else {
        for (r, row) in t.iter().enumerate().take(mr) {
            for (v, x) in row.iter().enumerate() {
                let lo = 16 * v;
                if lo >= nr {
                    break;
                }
                let cnt = (nr - lo).min(16);
                let mask: __mmask16 = if cnt == 16 { 0xffff } else { (1u16 << cnt) - 1 };
                // SAFETY: the mask limits the access to columns < nr of row r < mr.
                unsafe {
                    let p = c.add(r * ldc + lo);
                    let y = if add {
                        _mm512_add_ps(_mm512_maskz_loadu_ps(mask, p), *x)
                    } else {
                        *x
                    };
                    _mm512_mask_storeu_ps(p, mask, y);
                }
            }
        }
    }
}
