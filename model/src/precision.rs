//! Precision modes and the `Linear` wrapper: the one place that decides how a projection's three GEMMs
//! (Fprop y = x·Wᵀ, Dgrad dx = dy·W, Wgrad dW += dyᵀ·x) run and what the forward caches for the backward.
//!
//! Invariants: in `Fp32` every GEMM is the plain f32 (or f64) product; in `Bf16` weights, cached inputs and
//! output gradients are rounded to bf16 values before each GEMM, accumulation stays f32; in `Fp8` the
//! projection runs the DeepSeek-V3 recipe (v3-spec §4): inputs quantized 1×128 for Fprop (and cached that
//! way, in FP8, for the backward), weights 128×128, output gradients 1×128 for Dgrad, and 128×1 tiles along
//! the token dimension for Wgrad (the cached input is dequantized and re-tiled), all with f32 accumulation
//! (Fprop and Dgrad outputs stay f32, stricter than the recipe's bf16; Wgrad adds into the f32 gradient
//! buffer, which accumulates over micro-batches as the recipe's FP32 weight gradients do). `Fp8Ue8m0` is
//! `Fp8` with power-of-two (UE8M0) scales for every activation and activation-gradient tile; weight
//! blocks keep f32 scales. Everything outside a `Linear` (embedding, router, norms, attention core) is not
//! affected; the head and eh_proj run in bf16 in the FP8 modes.
//!
//! Weights are prepared (bf16-rounded, or quantized to 128×128 E4M3 blocks and decoded) together with
//! their transpose: per call, or once per optimizer step when the runtime carries a [`WeightCache`]. Both
//! give the same bits, because a prepared weight is a pure function of the master weight; the cache's
//! owner must call [`Runtime::weights_changed`] after every parameter update.
//!
//! Packed weights: for f32 activations and products of at least [`PACKED_MIN_ROWS`] rows, the Fprop and
//! Dgrad GEMMs read the prepared weight through a `kernels::PackedWeight` (one per use, made on first
//! use), so a cached weight is packed once per step and reused by every micro-batch and chunk. The
//! kernels guarantee that a packed product has the bits of the unpacked one from that many rows on;
//! smaller products (few tokens routed to an expert) keep the unpacked calls, so every result has the
//! bits it had before packing existed. `Fp32` uses the cache only for these packings (its prepared
//! weight is the master weight itself), and only when the runtime carries a cache.

use crate::Result;
use crate::params::{ParamId, ParamStore};
use crate::profile::{self, Category};
use kernels::fp8::ScaleFmt;
use kernels::{Accumulate, ExecCtx, PackedWeight, Real, WeightUse};
use std::any::TypeId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Numeric mode of the projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// Plain f32 everywhere (the reference).
    #[default]
    Fp32,
    /// bf16 storage of weights and cached activations, f32 accumulation.
    Bf16,
    /// FP8 E4M3 GEMMs with fine-grained f32 scaling for MLA projections and FFN/expert linears.
    Fp8,
    /// As `Fp8`, with power-of-two (UE8M0) scales on activation and activation-gradient tiles.
    Fp8Ue8m0,
}

impl Precision {
    /// The name used in summaries and flags: "fp32", "bf16", "fp8" or "fp8-ue8m0".
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp8 => "fp8",
            Precision::Fp8Ue8m0 => "fp8-ue8m0",
        }
    }

    /// Whether projections run in FP8.
    pub fn is_fp8(self) -> bool {
        matches!(self, Precision::Fp8 | Precision::Fp8Ue8m0)
    }

    /// Scale format of FP8 activation and activation-gradient tiles.
    fn act_scales(self) -> ScaleFmt {
        if self == Precision::Fp8Ue8m0 {
            ScaleFmt::Ue8m0
        } else {
            ScaleFmt::F32
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "fp32" | "f32" => Ok(Self::Fp32),
            "bf16" => Ok(Self::Bf16),
            "fp8" => Ok(Self::Fp8),
            "fp8-ue8m0" | "fp8_ue8m0" => Ok(Self::Fp8Ue8m0),
            other => Err(format!(
                "unknown precision {other:?} (fp32, bf16, fp8, fp8-ue8m0)"
            )),
        }
    }
}

/// What every layer call needs besides parameters and activations: the thread budget, the precision and,
/// optionally, a cache of prepared weights.
#[derive(Debug, Clone, Default)]
pub struct Runtime {
    /// Threads for GEMMs and attention.
    pub exec: ExecCtx,
    /// Projection precision.
    pub precision: Precision,
    /// Prepared (rounded or quantized) weights reused until [`Runtime::weights_changed`]; None prepares
    /// them at every use.
    pub weights: Option<Arc<WeightCache>>,
}

impl Runtime {
    /// A CPU runtime with `threads` threads and the given precision, without a weight cache.
    pub fn cpu(threads: usize, precision: Precision) -> Self {
        Self {
            exec: ExecCtx::cpu(threads),
            precision,
            weights: None,
        }
    }

    /// This runtime with an empty weight cache: each bf16/FP8 weight is prepared once and reused until
    /// [`Runtime::weights_changed`] (call it after every optimizer step).
    pub fn with_weight_cache(mut self) -> Self {
        self.weights = Some(Arc::new(WeightCache::default()));
        self
    }

    /// Drops every cached prepared weight (the parameters were updated).
    pub fn weights_changed(&self) {
        if let Some(c) = &self.weights {
            c.clear();
        }
    }

    fn with_precision(&self, precision: Precision) -> Runtime {
        Runtime {
            exec: self.exec.clone(),
            precision,
            weights: self.weights.clone(),
        }
    }
}

/// Fewest product rows for which the Fprop and Dgrad GEMMs use a packed weight: from 16 rows on,
/// `kernels::PackedWeight` products are bit-identical to the unpacked ones (below that the unpacked
/// kernels take a different summation path).
pub const PACKED_MIN_ROWS: usize = 16;

/// How a weight is prepared for its GEMMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum WeightForm {
    /// The master weight as it is (only its packings are kept).
    F32,
    /// Rounded to bf16 values.
    Bf16,
    /// Quantized in 128×128 E4M3 blocks with f32 scales, then decoded (code · scale, exact in f32).
    Fp8,
}

/// A weight [n, k] ready for the GEMMs, with its transpose [k, n] (unpacked Fprop then runs as a plain
/// row-major product with the right-hand side already in [k, n] order) and its packings for the Fprop
/// (`WeightUse::Xwt`) and Dgrad (`WeightUse::Dyw`) products, each made on first use.
pub struct PreparedWeight {
    form: WeightForm,
    /// [n, k]; empty in [`WeightForm::F32`], where the master weight serves.
    w: Vec<f32>,
    /// [k, n]; empty in [`WeightForm::F32`].
    wt: Vec<f32>,
    /// Rows of the weight (output features).
    n: usize,
    /// Columns of the weight (input features).
    k: usize,
    /// Packed for y = x·Wᵀ.
    xwt: OnceLock<PackedWeight<f32>>,
    /// Packed for dx = dy·W.
    dyw: OnceLock<PackedWeight<f32>>,
    /// Packings of the same weight from before the last update (Xwt, Dyw), whose storage the first
    /// packing of each use repacks instead of allocating anew.
    spare: Mutex<[Option<PackedWeight<f32>>; 2]>,
}

impl std::fmt::Debug for PreparedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedWeight")
            .field("form", &self.form)
            .field("n", &self.n)
            .field("k", &self.k)
            .field("packed_xwt", &self.xwt.get().is_some())
            .field("packed_dyw", &self.dyw.get().is_some())
            .finish()
    }
}

impl PreparedWeight {
    fn build<T: Real>(
        ctx: &ExecCtx,
        form: WeightForm,
        w: &[T],
        n: usize,
        k: usize,
    ) -> Result<Self> {
        let wf = match form {
            WeightForm::F32 => Vec::new(),
            WeightForm::Bf16 => {
                // Rounded in T, so an f64 master weight is rounded once; bf16 values are exact in f32.
                let mut r = w.to_vec();
                crate::ops::round_bf16_slice(&mut r);
                to_f32(&r)
            }
            WeightForm::Fp8 => {
                use kernels::fp8::{Fp8Matrix, Fp8Tiling, fp8_dequantize, quantize_weight};
                let wf = to_f32(w);
                let mut codes = vec![0u8; n * k];
                let mut scales = vec![0f32; n.div_ceil(128) * k.div_ceil(128)];
                quantize_weight(ctx, &mut codes, &mut scales, &wf, n, k, ScaleFmt::F32)?;
                let q = Fp8Matrix::new(&codes, &scales, n, k, Fp8Tiling::Block)?;
                let mut out = vec![0f32; n * k];
                fp8_dequantize(ctx, &mut out, &q)?;
                out
            }
        };
        let wt = if form == WeightForm::F32 {
            Vec::new()
        } else {
            transpose(&wf, n, k)
        };
        Ok(Self {
            form,
            w: wf,
            wt,
            n,
            k,
            xwt: OnceLock::new(),
            dyw: OnceLock::new(),
            spare: Mutex::new([None, None]),
        })
    }

    /// This weight with `old`'s packings (of the same master weight, before the update) kept as spare
    /// storage.
    fn recycling(self, old: PreparedWeight) -> Self {
        let (n, k) = (self.n, self.k);
        let [sx, sd] = old.spare.into_inner().unwrap_or_else(|p| p.into_inner());
        let fits = |p: &PackedWeight<f32>| p.n() == n && p.k() == k;
        let spare = [
            old.xwt.into_inner().or(sx).filter(fits),
            old.dyw.into_inner().or(sd).filter(fits),
        ];
        Self {
            spare: Mutex::new(spare),
            ..self
        }
    }

    /// The packing of this weight for `usage`, made on first use from the prepared values (or from
    /// `master`, the master weight as f32, in [`WeightForm::F32`]). Two threads racing here may both
    /// pack; the packings are identical and one is kept.
    fn packed(
        &self,
        ctx: &ExecCtx,
        usage: WeightUse,
        master: &[f32],
    ) -> Result<&PackedWeight<f32>> {
        let (cell, slot) = match usage {
            WeightUse::Xwt => (&self.xwt, 0),
            WeightUse::Dyw => (&self.dyw, 1),
        };
        if let Some(p) = cell.get() {
            return Ok(p);
        }
        let src = if self.form == WeightForm::F32 {
            master
        } else {
            &self.w
        };
        let spare = self.spare.lock().unwrap_or_else(|p| p.into_inner())[slot].take();
        let packed = match spare {
            Some(mut p) => {
                p.repack(ctx, src)?;
                p
            }
            None => PackedWeight::new(ctx, usage, src, self.n, self.k)?,
        };
        Ok(cell.get_or_init(|| packed))
    }
}

/// Cache key: the master weight's address and length, and the prepared form.
type WeightKey = (usize, usize, WeightForm);

/// Prepared weights keyed by the master weight's address, length and form; shared by the clones of a
/// runtime. Entries stay valid until [`WeightCache::clear`]; the entries it drops are kept aside until
/// the next clear, only so that rebuilding the same weight can reuse their packing storage (never their
/// values: every rebuilt entry is prepared and packed again from the current master weight).
#[derive(Debug, Default)]
pub struct WeightCache {
    entries: Mutex<HashMap<WeightKey, Arc<PreparedWeight>>>,
    spare: Mutex<HashMap<WeightKey, Arc<PreparedWeight>>>,
    builds: AtomicU64,
}

impl WeightCache {
    /// Forgets every entry (keeping their storage aside for reuse).
    pub fn clear(&self) {
        let old = std::mem::take(&mut *self.entries.lock().unwrap_or_else(|p| p.into_inner()));
        *self.spare.lock().unwrap_or_else(|p| p.into_inner()) = old;
    }

    /// How many weights were prepared since the cache was made (a measure of how often weights are
    /// quantized).
    pub fn builds(&self) -> u64 {
        self.builds.load(Ordering::Relaxed)
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A linear projection's input as cached for the backward pass.
#[derive(Debug, Clone)]
pub enum LinInput<T: Real> {
    /// The input values ([m, k], already bf16-rounded in `Bf16`).
    Full {
        /// Values [m, k].
        x: Vec<T>,
        /// Rows.
        m: usize,
        /// Columns.
        k: usize,
    },
    /// FP8 1×128-tiled input (the FP8 modes' cache).
    Fp8(crate::precision::fp8::QuantAct),
}

impl<T: Real> LinInput<T> {
    /// Prepares a projection input for `rt`'s precision (rounding or quantizing once, so that several
    /// projections reading the same activation share one cache).
    pub fn new(rt: &Runtime, mut x: Vec<T>, m: usize, k: usize) -> Result<Self> {
        match rt.precision {
            Precision::Fp32 => Ok(Self::Full { x, m, k }),
            Precision::Bf16 => {
                crate::ops::round_bf16_slice(&mut x);
                Ok(Self::Full { x, m, k })
            }
            p @ (Precision::Fp8 | Precision::Fp8Ue8m0) => Ok(Self::Fp8(fp8::QuantAct::quantize(
                &rt.exec,
                &x,
                m,
                k,
                p.act_scales(),
            )?)),
        }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        match self {
            Self::Full { m, .. } => *m,
            Self::Fp8(q) => q.m,
        }
    }
}

/// How far a projection follows the runtime precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinClass {
    /// MLA and FFN/expert projections: follow the runtime precision, FP8 included.
    Projection,
    /// Embedding-adjacent projections (head, eh_proj): FP8 mode runs them in bf16.
    HighPrecision,
    /// The MoE router: always f32 (and profiled as routing, not as a GEMM).
    Fp32,
}

/// A bias-free projection y = x·Wᵀ with W = `params[w]` of shape [n_out, n_in].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Linear {
    /// The weight tensor.
    pub w: ParamId,
    /// Output features.
    pub n_out: usize,
    /// Input features.
    pub n_in: usize,
    /// Which precision rule applies.
    pub class: LinClass,
}

impl Linear {
    /// A projection eligible for FP8.
    pub fn new(w: ParamId, n_out: usize, n_in: usize) -> Self {
        Self {
            w,
            n_out,
            n_in,
            class: LinClass::Projection,
        }
    }

    /// A projection that stays in bf16 or better (the head, eh_proj).
    pub fn high_precision(w: ParamId, n_out: usize, n_in: usize) -> Self {
        Self {
            w,
            n_out,
            n_in,
            class: LinClass::HighPrecision,
        }
    }

    /// A projection that is always f32 (the router).
    pub fn fp32(w: ParamId, n_out: usize, n_in: usize) -> Self {
        Self {
            w,
            n_out,
            n_in,
            class: LinClass::Fp32,
        }
    }

    fn mode(&self, rt: &Runtime) -> Precision {
        match (self.class, rt.precision) {
            (LinClass::Fp32, _) => Precision::Fp32,
            (LinClass::HighPrecision, p) if p.is_fp8() => Precision::Bf16,
            (_, p) => p,
        }
    }

    /// The profiler scope of this projection's work: GEMM, except for the router's projection, which is
    /// part of routing.
    fn gemm_scope(&self) -> profile::Scope {
        profile::scope(if self.class == LinClass::Fp32 {
            Category::Routing
        } else {
            Category::Gemm
        })
    }

    /// The prepared form of this projection's weight: from the runtime's cache, or built now.
    fn prepared<T: Real>(
        &self,
        rt: &Runtime,
        form: WeightForm,
        p: &ParamStore<T>,
    ) -> Result<Arc<PreparedWeight>> {
        let w = p.slice(self.w);
        let build = || PreparedWeight::build(&rt.exec, form, w, self.n_out, self.n_in);
        let Some(cache) = &rt.weights else {
            return Ok(Arc::new(build()?));
        };
        let key = (w.as_ptr() as usize, w.len(), form);
        if let Some(e) = cache
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(e.clone());
        }
        let mut e = build()?;
        let spare = cache
            .spare
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        // Reused only when no call still holds the old entry.
        if let Some(old) = spare
            && let Ok(old) = Arc::try_unwrap(old)
        {
            e = e.recycling(old);
        }
        let e = Arc::new(e);
        cache.builds.fetch_add(1, Ordering::Relaxed);
        cache
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, e.clone());
        Ok(e)
    }

    /// Prepares this projection's cached input (see [`LinInput::new`]); FP8 only when this projection
    /// uses FP8.
    pub fn input<T: Real>(&self, rt: &Runtime, x: Vec<T>, m: usize) -> Result<LinInput<T>> {
        let _prof = self.gemm_scope();
        LinInput::new(&rt.with_precision(self.mode(rt)), x, m, self.n_in)
    }

    /// Fprop: y [m, n_out] = x [m, n_in] · Wᵀ.
    pub fn forward<T: Real>(
        &self,
        rt: &Runtime,
        p: &ParamStore<T>,
        x: &LinInput<T>,
    ) -> Result<Vec<T>> {
        let _prof = self.gemm_scope();
        let m = x.rows();
        let (n, k) = (self.n_out, self.n_in);
        match x {
            LinInput::Full { x, .. } if self.mode(rt) == Precision::Bf16 => {
                // y [m, n] = x [m, k] · Wᵀ [k, n]
                let pw = self.prepared(rt, WeightForm::Bf16, p)?;
                let mut y = vec![T::ZERO; m * n];
                if m >= PACKED_MIN_ROWS
                    && let (Some(yf), Some(xf)) = (f32s_mut(&mut y), f32s(x))
                {
                    packed_gemm(
                        rt,
                        &pw,
                        &[],
                        WeightUse::Xwt,
                        yf,
                        xf,
                        m,
                        Accumulate::Overwrite,
                    )?;
                } else {
                    kernels::matmul_dyw(
                        &rt.exec,
                        &mut y,
                        x,
                        &as_t::<T>(&pw.wt),
                        m,
                        k,
                        n,
                        Accumulate::Overwrite,
                    )?;
                }
                Ok(y)
            }
            LinInput::Full { x, .. } => {
                // y [m, n] = x [m, k] · Wᵀ [k, n]
                let mut y = vec![T::ZERO; m * n];
                if rt.weights.is_some()
                    && m >= PACKED_MIN_ROWS
                    && let (Some(yf), Some(xf), Some(wf)) =
                        (f32s_mut(&mut y), f32s(x), f32s(p.slice(self.w)))
                {
                    let pw = self.prepared(rt, WeightForm::F32, p)?;
                    packed_gemm(
                        rt,
                        &pw,
                        wf,
                        WeightUse::Xwt,
                        yf,
                        xf,
                        m,
                        Accumulate::Overwrite,
                    )?;
                } else {
                    kernels::matmul_xwt(
                        &rt.exec,
                        &mut y,
                        x,
                        p.slice(self.w),
                        m,
                        n,
                        k,
                        Accumulate::Overwrite,
                    )?;
                }
                Ok(y)
            }
            LinInput::Fp8(q) => {
                // y [m, n] = deq(x) [m, k] · deq(W)ᵀ [k, n]
                let pw = self.prepared(rt, WeightForm::Fp8, p)?;
                let xd = q.dequantize_with(&rt.exec)?;
                let mut y = vec![0f32; m * n];
                if m >= PACKED_MIN_ROWS {
                    packed_gemm(
                        rt,
                        &pw,
                        &[],
                        WeightUse::Xwt,
                        &mut y,
                        &xd,
                        m,
                        Accumulate::Overwrite,
                    )?;
                } else {
                    kernels::matmul_dyw(
                        &rt.exec,
                        &mut y,
                        &xd,
                        &pw.wt,
                        m,
                        k,
                        n,
                        Accumulate::Overwrite,
                    )?;
                }
                Ok(from_f32_vec(y))
            }
        }
    }

    /// Dgrad: dx [m, n_in] (+)= dy [m, n_out] · W.
    pub fn backward_input<T: Real>(
        &self,
        rt: &Runtime,
        p: &ParamStore<T>,
        dx: &mut [T],
        dy: &[T],
        m: usize,
        acc: Accumulate,
    ) -> Result<()> {
        let _prof = self.gemm_scope();
        let (n, k) = (self.n_out, self.n_in);
        match self.mode(rt) {
            mode @ (Precision::Fp8 | Precision::Fp8Ue8m0) => {
                // dx [m, k] = deq(dy, 1×128) [m, n] · deq(W) [n, k]
                let pw = self.prepared(rt, WeightForm::Fp8, p)?;
                let dyd = fp8::fake_quant_rows(&rt.exec, &to_f32(dy), m, n, mode.act_scales())?;
                let mut out = vec![0f32; m * k];
                if m >= PACKED_MIN_ROWS {
                    packed_gemm(
                        rt,
                        &pw,
                        &[],
                        WeightUse::Dyw,
                        &mut out,
                        &dyd,
                        m,
                        Accumulate::Overwrite,
                    )?;
                } else {
                    kernels::matmul_dyw(
                        &rt.exec,
                        &mut out,
                        &dyd,
                        &pw.w,
                        m,
                        n,
                        k,
                        Accumulate::Overwrite,
                    )?;
                }
                store(dx, &out, acc);
                Ok(())
            }
            Precision::Bf16 => {
                let pw = self.prepared(rt, WeightForm::Bf16, p)?;
                let mut dyr = dy.to_vec();
                crate::ops::round_bf16_slice(&mut dyr);
                if m >= PACKED_MIN_ROWS
                    && let (Some(dxf), Some(dyf)) = (f32s_mut(dx), f32s(&dyr))
                {
                    packed_gemm(rt, &pw, &[], WeightUse::Dyw, dxf, dyf, m, acc)?;
                } else {
                    kernels::matmul_dyw(&rt.exec, dx, &dyr, &as_t::<T>(&pw.w), m, n, k, acc)?;
                }
                Ok(())
            }
            Precision::Fp32 => {
                // dx [m, k] (+)= dy [m, n] · W [n, k]
                if rt.weights.is_some()
                    && m >= PACKED_MIN_ROWS
                    && let (Some(dxf), Some(dyf), Some(wf)) =
                        (f32s_mut(dx), f32s(dy), f32s(p.slice(self.w)))
                {
                    let pw = self.prepared(rt, WeightForm::F32, p)?;
                    packed_gemm(rt, &pw, wf, WeightUse::Dyw, dxf, dyf, m, acc)?;
                } else {
                    kernels::matmul_dyw(&rt.exec, dx, dy, p.slice(self.w), m, n, k, acc)?;
                }
                Ok(())
            }
        }
    }

    /// Wgrad: grads[W] [n_out, n_in] += dyᵀ · x.
    pub fn backward_weight<T: Real>(
        &self,
        rt: &Runtime,
        g: &mut ParamStore<T>,
        dy: &[T],
        x: &LinInput<T>,
    ) -> Result<()> {
        let _prof = self.gemm_scope();
        let m = x.rows();
        match x {
            LinInput::Full { x, .. } => {
                let dw = g.slice_mut(self.w);
                if self.mode(rt) == Precision::Bf16 {
                    let mut dyr = dy.to_vec();
                    crate::ops::round_bf16_slice(&mut dyr);
                    kernels::matmul_dytx(
                        &rt.exec,
                        dw,
                        &dyr,
                        x,
                        m,
                        self.n_out,
                        self.n_in,
                        Accumulate::Add,
                    )?;
                } else {
                    kernels::matmul_dytx(
                        &rt.exec,
                        dw,
                        dy,
                        x,
                        m,
                        self.n_out,
                        self.n_in,
                        Accumulate::Add,
                    )?;
                }
                Ok(())
            }
            LinInput::Fp8(q) => {
                let fmt = if self.mode(rt).is_fp8() {
                    self.mode(rt).act_scales()
                } else {
                    ScaleFmt::F32
                };
                fp8::backward_weight(rt, g.slice_mut(self.w), dy, q, self.n_out, fmt)
            }
        }
    }
}

/// `out` (+)= `lhs` · Wᵀ (`Xwt`: lhs [m, n_in], out [m, n_out]) or `lhs` · W (`Dyw`: lhs [m, n_out],
/// out [m, n_in]) through `pw`'s packing for that use; `master` is the master weight as f32, read only
/// when `pw` is the [`WeightForm::F32`] form. Callers use it for products of at least
/// [`PACKED_MIN_ROWS`] rows only, where it gives the unpacked product's bits.
#[allow(clippy::too_many_arguments)]
fn packed_gemm(
    rt: &Runtime,
    pw: &PreparedWeight,
    master: &[f32],
    usage: WeightUse,
    out: &mut [f32],
    lhs: &[f32],
    m: usize,
    acc: Accumulate,
) -> Result<()> {
    let packed = pw.packed(&rt.exec, usage, master)?;
    match usage {
        WeightUse::Xwt => kernels::matmul_xwt_packed(&rt.exec, out, lhs, packed, m, acc)?,
        WeightUse::Dyw => kernels::matmul_dyw_packed(&rt.exec, out, lhs, packed, m, acc)?,
    }
    Ok(())
}

/// `s` as `&[f32]` when `T` is f32.
fn f32s<T: Real>(s: &[T]) -> Option<&[f32]> {
    (TypeId::of::<T>() == TypeId::of::<f32>())
        // SAFETY: T is f32 (checked just above), so the slice already has this type.
        .then(|| unsafe { &*(s as *const [T] as *const [f32]) })
}

/// `s` as `&mut [f32]` when `T` is f32.
fn f32s_mut<T: Real>(s: &mut [T]) -> Option<&mut [f32]> {
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        // SAFETY: T is f32 (checked just above), so the slice already has this type.
        Some(unsafe { &mut *(s as *mut [T] as *mut [f32]) })
    } else {
        None
    }
}

/// `v` as a `T` slice: borrowed when `T` is f32, converted otherwise (f64 tests).
fn as_t<T: Real>(v: &[f32]) -> std::borrow::Cow<'_, [T]> {
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        // SAFETY: T is f32 (checked just above), so the slice already has this type.
        std::borrow::Cow::Borrowed(unsafe { &*(v as *const [f32] as *const [T]) })
    } else {
        std::borrow::Cow::Owned(v.iter().map(|&x| T::from_f64(f64::from(x))).collect())
    }
}

/// An f32 vector as a `Vec<T>`: moved when `T` is f32, converted otherwise.
fn from_f32_vec<T: Real>(v: Vec<f32>) -> Vec<T> {
    let b: Box<dyn std::any::Any> = Box::new(v);
    match b.downcast::<Vec<T>>() {
        Ok(t) => *t,
        Err(b) => match b.downcast::<Vec<f32>>() {
            Ok(v) => v.iter().map(|&x| T::from_f64(f64::from(x))).collect(),
            Err(_) => unreachable!("the box holds the Vec<f32> it was made from"),
        },
    }
}

fn to_f32<T: Real>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f64() as f32).collect()
}

fn store<T: Real>(dst: &mut [T], src: &[f32], acc: Accumulate) {
    for (d, s) in dst.iter_mut().zip(src) {
        let v = T::from_f64(f64::from(*s));
        if acc == Accumulate::Add {
            *d += v
        } else {
            *d = v
        }
    }
}

/// x [n, k] → [k, n], in 32×32 tiles.
fn transpose(x: &[f32], n: usize, k: usize) -> Vec<f32> {
    const B: usize = 32;
    let mut t = vec![0f32; n * k];
    for r0 in (0..n).step_by(B) {
        for c0 in (0..k).step_by(B) {
            for r in r0..(r0 + B).min(n) {
                for c in c0..(c0 + B).min(k) {
                    t[c * n + r] = x[r * k + c];
                }
            }
        }
    }
    t
}

pub mod fp8 {
    //! The FP8 side of [`super::Linear`]: quantization through `kernels::fp8`. Scales are f32 (amax/448),
    //! the convention of the golden FP8 data, or powers of two for activation tiles in `Fp8Ue8m0`. The
    //! block-scaled GEMMs run as f32 products of decoded operands (`kernels::fp8`'s evaluation order).

    use super::Runtime;
    use crate::Result;
    use kernels::fp8::{
        Fp8Matrix, Fp8Tiling, ScaleFmt, fp8_dequantize, fp8_matmul_dytx, quantize_act,
        quantize_act_t,
    };
    use kernels::{Accumulate, ExecCtx, Real};

    /// An activation quantized in 1×128 tiles: E4M3 codes [m, k] and scales [m, ceil(k/128)].
    #[derive(Debug, Clone)]
    pub struct QuantAct {
        /// Raw E4M3 codes.
        pub codes: Vec<u8>,
        /// One scale per row and 128 columns.
        pub scales: Vec<f32>,
        /// Rows.
        pub m: usize,
        /// Columns.
        pub k: usize,
    }

    impl QuantAct {
        /// Quantizes x [m, k] (converted to f32) in 1×128 tiles with scales in `fmt`.
        pub fn quantize<T: Real>(
            ctx: &ExecCtx,
            x: &[T],
            m: usize,
            k: usize,
            fmt: ScaleFmt,
        ) -> Result<Self> {
            let xf: Vec<f32> = x.iter().map(|v| v.to_f64() as f32).collect();
            let mut codes = vec![0u8; m * k];
            let mut scales = vec![0f32; m * k.div_ceil(128)];
            quantize_act(ctx, &mut codes, &mut scales, &xf, m, k, fmt)?;
            Ok(Self {
                codes,
                scales,
                m,
                k,
            })
        }

        /// Dequantized values [m, k] (code · scale), on one thread.
        pub fn dequantize(&self) -> Result<Vec<f32>> {
            self.dequantize_with(&ExecCtx::default())
        }

        /// Dequantized values [m, k] (code · scale) on `ctx`'s threads.
        pub fn dequantize_with(&self, ctx: &ExecCtx) -> Result<Vec<f32>> {
            let q = Fp8Matrix::new(&self.codes, &self.scales, self.m, self.k, Fp8Tiling::Row)?;
            let mut out = vec![0f32; self.m * self.k];
            fp8_dequantize(ctx, &mut out, &q)?;
            Ok(out)
        }
    }

    /// x [m, k] quantized in 1×128 tiles and decoded again: the values an FP8 GEMM multiplies.
    pub fn fake_quant_rows(
        ctx: &ExecCtx,
        x: &[f32],
        m: usize,
        k: usize,
        fmt: ScaleFmt,
    ) -> Result<Vec<f32>> {
        QuantAct::quantize(ctx, x, m, k, fmt)?.dequantize_with(ctx)
    }

    /// 128×1 tiles along the row (token) dimension of x [m, k]: codes [k, m], scales [k, ceil(m/128)].
    fn quant_t(
        ctx: &ExecCtx,
        x: &[f32],
        m: usize,
        k: usize,
        fmt: ScaleFmt,
    ) -> Result<(Vec<u8>, Vec<f32>)> {
        let mut codes = vec![0u8; m * k];
        let mut scales = vec![0f32; k * m.div_ceil(128)];
        quantize_act_t(ctx, &mut codes, &mut scales, x, m, k, fmt)?;
        Ok((codes, scales))
    }

    /// Wgrad: dW [n, k] += dyᵀ·x with 128×1 tiles along the token dimension: the cached 1×128 input is
    /// dequantized and re-tiled (v3-spec §4.2), dy is quantized 128×1 directly; both with scales in
    /// `fmt`. The product accumulates in f32 and is added to the f32 gradient.
    pub fn backward_weight<T: Real>(
        rt: &Runtime,
        dw: &mut [T],
        dy: &[T],
        x: &QuantAct,
        n: usize,
        fmt: ScaleFmt,
    ) -> Result<()> {
        let (m, k) = (x.m, x.k);
        let (dc, ds) = quant_t(&rt.exec, &super::to_f32(dy), m, n, fmt)?;
        let (xc, xs) = quant_t(&rt.exec, &x.dequantize_with(&rt.exec)?, m, k, fmt)?;
        let dym = Fp8Matrix::new(&dc, &ds, n, m, Fp8Tiling::Row)?;
        let xm = Fp8Matrix::new(&xc, &xs, k, m, Fp8Tiling::Row)?;
        let mut out = vec![0f32; n * k];
        fp8_matmul_dytx(&rt.exec, &mut out, &dym, &xm, Accumulate::Overwrite)?;
        super::store(dw, &out, Accumulate::Add);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Normal;

    fn setup(n: usize, k: usize, m: usize) -> (ParamStore<f32>, Linear, Vec<f32>, Vec<f32>) {
        let mut p = ParamStore::<f32>::from_specs(vec![("w".into(), vec![n, k])]);
        let mut rng = Normal::new(11);
        p.flat_mut()
            .iter_mut()
            .for_each(|v| *v = rng.sample() as f32 * 0.05);
        let x = (0..m * k)
            .map(|i| rng.sample() as f32 * (1.0 + (i % 7) as f32))
            .collect();
        let dy = (0..m * n).map(|_| rng.sample() as f32).collect();
        let lin = Linear::new(p.id("w").expect("declared above"), n, k);
        (p, lin, x, dy)
    }

    /// (y, dx, dW) of one projection call sequence.
    fn pass(
        rt: &Runtime,
        p: &ParamStore<f32>,
        lin: &Linear,
        x: &[f32],
        dy: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let m = x.len() / lin.n_in;
        let xin = lin.input(rt, x.to_vec(), m).unwrap();
        let y = lin.forward(rt, p, &xin).unwrap();
        let mut dx = vec![0f32; m * lin.n_in];
        lin.backward_input(rt, p, &mut dx, dy, m, Accumulate::Overwrite)
            .unwrap();
        let mut g = p.zeros_like();
        lin.backward_weight(rt, &mut g, dy, &xin).unwrap();
        (y, dx, g.flat().to_vec())
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn cached_weights_are_prepared_once_per_update_and_give_the_same_bits() {
        let (mut p, lin, x, dy) = setup(192, 256, 130);
        for prec in [Precision::Bf16, Precision::Fp8, Precision::Fp8Ue8m0] {
            let plain = Runtime::cpu(2, prec);
            let cached = Runtime::cpu(2, prec).with_weight_cache();
            let want = pass(&plain, &p, &lin, &x, &dy);
            // The packed products have the bits of the unpacked ones on the same prepared operands.
            let (m, n, k) = (130, 192, 256);
            let ctx = ExecCtx::cpu(2);
            let (form, xv, dyv) = match lin.input(&plain, x.clone(), m).unwrap() {
                LinInput::Full { x, .. } => {
                    let mut dyr = dy.clone();
                    crate::ops::round_bf16_slice(&mut dyr);
                    (WeightForm::Bf16, x, dyr)
                }
                LinInput::Fp8(q) => {
                    let dyq = fp8::fake_quant_rows(&ctx, &dy, m, n, prec.act_scales()).unwrap();
                    (WeightForm::Fp8, q.dequantize().unwrap(), dyq)
                }
            };
            let pw = PreparedWeight::build(&ctx, form, p.slice(lin.w), n, k).unwrap();
            let mut y = vec![0f32; m * n];
            kernels::matmul_dyw(&ctx, &mut y, &xv, &pw.wt, m, k, n, Accumulate::Overwrite).unwrap();
            let mut dx = vec![0f32; m * k];
            kernels::matmul_dyw(&ctx, &mut dx, &dyv, &pw.w, m, n, k, Accumulate::Overwrite)
                .unwrap();
            assert_eq!(bits(&y), bits(&want.0), "{prec:?} packed fprop");
            assert_eq!(bits(&dx), bits(&want.1), "{prec:?} packed dgrad");
            // Three micro-batches in one step reuse one prepared weight.
            for _ in 0..3 {
                let got = pass(&cached, &p, &lin, &x, &dy);
                assert_eq!(bits(&got.0), bits(&want.0), "{prec:?} fprop");
                assert_eq!(bits(&got.1), bits(&want.1), "{prec:?} dgrad");
                assert_eq!(bits(&got.2), bits(&want.2), "{prec:?} wgrad");
            }
            let cache = cached.weights.as_ref().unwrap();
            assert_eq!((cache.builds(), cache.len()), (1, 1), "{prec:?}");
            // An update followed by `weights_changed` is seen by the next call.
            p.flat_mut().iter_mut().for_each(|v| *v *= -1.5);
            cached.weights_changed();
            assert!(cache.is_empty());
            let after = pass(&cached, &p, &lin, &x, &dy);
            assert_eq!(bits(&after.0), bits(&pass(&plain, &p, &lin, &x, &dy).0));
            assert_ne!(bits(&after.0), bits(&want.0));
            assert_eq!(cache.builds(), 2);
        }
    }

    #[test]
    fn fp32_packed_weights_give_the_unpacked_bits_and_are_packed_once_per_update() {
        let (mut p, lin, x, dy) = setup(192, 256, 130);
        // The products as they ran before packing: the unpacked kernels on the master weight.
        let unpacked = |p: &ParamStore<f32>, x: &[f32], dy: &[f32]| {
            let (m, n, k) = (x.len() / lin.n_in, lin.n_out, lin.n_in);
            let ctx = ExecCtx::cpu(2);
            let mut y = vec![0f32; m * n];
            kernels::matmul_xwt(
                &ctx,
                &mut y,
                x,
                p.slice(lin.w),
                m,
                n,
                k,
                Accumulate::Overwrite,
            )
            .unwrap();
            // Dgrad accumulates onto an existing gradient, as the layers do.
            let mut dx: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.25).collect();
            kernels::matmul_dyw(&ctx, &mut dx, dy, p.slice(lin.w), m, n, k, Accumulate::Add)
                .unwrap();
            (y, dx)
        };
        let run = |rt: &Runtime, p: &ParamStore<f32>, x: &[f32], dy: &[f32]| {
            let m = x.len() / lin.n_in;
            let xin = lin.input(rt, x.to_vec(), m).unwrap();
            let y = lin.forward(rt, p, &xin).unwrap();
            let mut dx: Vec<f32> = (0..m * lin.n_in).map(|i| (i % 13) as f32 * 0.25).collect();
            lin.backward_input(rt, p, &mut dx, dy, m, Accumulate::Add)
                .unwrap();
            (y, dx)
        };
        let rt = Runtime::cpu(2, Precision::Fp32).with_weight_cache();
        let cache = rt.weights.clone().unwrap();
        // 130 rows use the packings (made once, reused by the next micro-batch); 15 rows do not.
        for m in [130, 130, 15] {
            let (xs, dys) = (&x[..m * lin.n_in], &dy[..m * lin.n_out]);
            let (want, got) = (unpacked(&p, xs, dys), run(&rt, &p, xs, dys));
            assert_eq!(bits(&got.0), bits(&want.0), "fprop, {m} rows");
            assert_eq!(bits(&got.1), bits(&want.1), "dgrad, {m} rows");
            assert_eq!((cache.builds(), cache.len()), (1, 1), "{m} rows");
        }
        // After an update, `weights_changed` makes the next call pack the new values.
        p.flat_mut().iter_mut().for_each(|v| *v *= -1.5);
        rt.weights_changed();
        let (want, got) = (unpacked(&p, &x, &dy), run(&rt, &p, &x, &dy));
        assert_eq!(bits(&got.0), bits(&want.0), "fprop after the update");
        assert_eq!(bits(&got.1), bits(&want.1), "dgrad after the update");
        assert_eq!(cache.builds(), 2);
        // Without a cache fp32 prepares nothing and runs the unpacked kernels.
        let plain = Runtime::cpu(2, Precision::Fp32);
        let got = run(&plain, &p, &x, &dy);
        assert_eq!(bits(&got.0), bits(&want.0));
    }

    #[test]
    fn ue8m0_mode_uses_power_of_two_activation_scales_and_stays_close_to_fp8() {
        let (p, lin, x, dy) = setup(192, 256, 130);
        let rt = Runtime::cpu(1, Precision::Fp8Ue8m0);
        let LinInput::Fp8(q) = lin.input(&rt, x.clone(), 130).unwrap() else {
            panic!("an FP8 projection caches FP8 input")
        };
        assert!(
            q.scales
                .iter()
                .all(|s| s.to_bits() & 0x7F_FFFF == 0 && *s > 0.0),
            "every activation scale is a power of two"
        );
        let LinInput::Fp8(qf) = lin
            .input(&Runtime::cpu(1, Precision::Fp8), x.clone(), 130)
            .unwrap()
        else {
            panic!("an FP8 projection caches FP8 input")
        };
        assert!(qf.scales.iter().any(|s| s.to_bits() & 0x7F_FFFF != 0));
        // Against the f32 products, power-of-two scales cost at most a little accuracy.
        let a = pass(&rt, &p, &lin, &x, &dy);
        let b = pass(&Runtime::cpu(1, Precision::Fp8), &p, &lin, &x, &dy);
        let e = pass(&Runtime::cpu(1, Precision::Fp32), &p, &lin, &x, &dy);
        let rel = |u: &[f32], v: &[f32]| {
            let num: f64 = u.iter().zip(v).map(|(a, b)| f64::from(a - b).powi(2)).sum();
            let den: f64 = v.iter().map(|b| f64::from(*b).powi(2)).sum();
            (num / den).sqrt()
        };
        for (what, ue, f, exact) in [
            ("fprop", &a.0, &b.0, &e.0),
            ("dgrad", &a.1, &b.1, &e.1),
            ("wgrad", &a.2, &b.2, &e.2),
        ] {
            let (r_ue, r_f) = (rel(ue, exact), rel(f, exact));
            assert!(rel(ue, f) > 0.0, "{what}: the scale format is applied");
            assert!(
                r_ue < 0.1 && r_ue < 2.0 * r_f,
                "{what}: ue8m0 {r_ue} vs f32 scales {r_f}"
            );
        }
        assert_eq!("fp8-ue8m0".parse::<Precision>(), Ok(Precision::Fp8Ue8m0));
        assert_eq!(Precision::Fp8Ue8m0.name(), "fp8-ue8m0");
        // The head (high-precision class) runs bf16 in both FP8 modes.
        let head = Linear::high_precision(lin.w, lin.n_out, lin.n_in);
        assert!(matches!(
            head.input(&rt, x.clone(), 130).unwrap(),
            LinInput::Full { .. }
        ));
    }
}
