//! Precision modes and the `Linear` wrapper: the one place that decides how a projection's three GEMMs
//! (Fprop y = x·Wᵀ, Dgrad dx = dy·W, Wgrad dW += dyᵀ·x) run and what the forward caches for the backward.
//!
//! Invariants: in `Fp32` every GEMM is the plain f32 (or f64) product; in `Bf16` weights, cached inputs and
//! output gradients are rounded to bf16 values before each GEMM, accumulation stays f32; in `Fp8` the
//! projection runs the DeepSeek-V3 recipe (v3-spec §4): inputs quantized 1×128 for Fprop (and cached that
//! way), weights 128×128, output gradients 1×128 for Dgrad, and 128×1 tiles along the token dimension for
//! Wgrad (the cached input is dequantized and re-tiled), all with f32 accumulation promoted per 128-block.
//! Everything outside a `Linear` (embedding, head, router, norms, attention core) is not affected.

use crate::Result;
use crate::params::{ParamId, ParamStore};
use kernels::{Accumulate, ExecCtx, Real};

/// Numeric mode of the projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Plain f32 everywhere (the reference).
    #[default]
    Fp32,
    /// bf16 storage of weights and cached activations, f32 accumulation.
    Bf16,
    /// FP8 E4M3 GEMMs with fine-grained scaling for MLA projections and FFN/expert linears.
    Fp8,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "fp32" | "f32" => Ok(Self::Fp32),
            "bf16" => Ok(Self::Bf16),
            "fp8" => Ok(Self::Fp8),
            other => Err(format!("unknown precision {other:?} (fp32, bf16, fp8)")),
        }
    }
}

/// What every layer call needs besides parameters and activations: the thread budget and the precision.
#[derive(Debug, Clone, Default)]
pub struct Runtime {
    /// Threads for GEMMs and attention.
    pub exec: ExecCtx,
    /// Projection precision.
    pub precision: Precision,
}

impl Runtime {
    /// A CPU runtime with `threads` threads and the given precision.
    pub fn cpu(threads: usize, precision: Precision) -> Self {
        Self {
            exec: ExecCtx::cpu(threads),
            precision,
        }
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
    /// FP8 1×128-tiled input (the `Fp8` mode's cache).
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
            Precision::Fp8 => Ok(Self::Fp8(fp8::QuantAct::quantize(&x, m, k)?)),
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
    /// The MoE router: always f32.
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
            (LinClass::HighPrecision, Precision::Fp8) => Precision::Bf16,
            (_, p) => p,
        }
    }

    /// Prepares this projection's cached input (see [`LinInput::new`]); FP8 only when this projection
    /// uses FP8.
    pub fn input<T: Real>(&self, rt: &Runtime, x: Vec<T>, m: usize) -> Result<LinInput<T>> {
        let mode = self.mode(rt);
        LinInput::new(
            &Runtime {
                exec: rt.exec.clone(),
                precision: mode,
            },
            x,
            m,
            self.n_in,
        )
    }

    fn weight<'p, T: Real>(
        &self,
        mode: Precision,
        p: &'p ParamStore<T>,
    ) -> std::borrow::Cow<'p, [T]> {
        let w = p.slice(self.w);
        if mode == Precision::Bf16 {
            let mut r = w.to_vec();
            crate::ops::round_bf16_slice(&mut r);
            std::borrow::Cow::Owned(r)
        } else {
            std::borrow::Cow::Borrowed(w)
        }
    }

    /// Fprop: y [m, n_out] = x [m, n_in] · Wᵀ.
    pub fn forward<T: Real>(
        &self,
        rt: &Runtime,
        p: &ParamStore<T>,
        x: &LinInput<T>,
    ) -> Result<Vec<T>> {
        let m = x.rows();
        let mut y = vec![T::ZERO; m * self.n_out];
        match x {
            LinInput::Full { x, .. } => {
                let w = self.weight(self.mode(rt), p);
                kernels::matmul_xwt(
                    &rt.exec,
                    &mut y,
                    x,
                    &w,
                    m,
                    self.n_out,
                    self.n_in,
                    Accumulate::Overwrite,
                )?;
            }
            LinInput::Fp8(q) => fp8::forward(rt, &mut y, q, p.slice(self.w), self.n_out)?,
        }
        Ok(y)
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
        match self.mode(rt) {
            Precision::Fp8 => {
                fp8::backward_input(rt, dx, dy, p.slice(self.w), m, self.n_out, self.n_in, acc)
            }
            mode => {
                let w = self.weight(mode, p);
                if mode == Precision::Bf16 {
                    let mut dyr = dy.to_vec();
                    crate::ops::round_bf16_slice(&mut dyr);
                    kernels::matmul_dyw(&rt.exec, dx, &dyr, &w, m, self.n_out, self.n_in, acc)?;
                } else {
                    kernels::matmul_dyw(&rt.exec, dx, dy, &w, m, self.n_out, self.n_in, acc)?;
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
            LinInput::Fp8(q) => fp8::backward_weight(rt, g.slice_mut(self.w), dy, q, self.n_out),
        }
    }
}

pub mod fp8 {
    //! The FP8 side of [`super::Linear`]: quantization through `kernels::fp8` and block-scaled GEMMs.
    //! Scales are f32 (amax/448), the convention of the golden FP8 data. Weights are re-quantized from the
    //! f32 master copy at every use (online quantization).

    use super::Runtime;
    use crate::Result;
    use kernels::fp8::{
        Fp8Matrix, Fp8Tiling, ScaleFmt, fp8_matmul_dytx, fp8_matmul_dyw, fp8_matmul_xwt,
        quantize_act, quantize_act_t, quantize_weight,
    };
    use kernels::{Accumulate, ExecCtx, Real};

    /// An activation quantized in 1×128 tiles: E4M3 codes [m, k] and f32 scales [m, ceil(k/128)].
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
        /// Quantizes x [m, k] (converted to f32) in 1×128 tiles.
        pub fn quantize<T: Real>(x: &[T], m: usize, k: usize) -> Result<Self> {
            let xf: Vec<f32> = x.iter().map(|v| v.to_f64() as f32).collect();
            let (codes, scales) = quant_act(&xf, m, k)?;
            Ok(Self {
                codes,
                scales,
                m,
                k,
            })
        }

        /// Dequantized values [m, k].
        pub fn dequantize(&self) -> Vec<f32> {
            let kb = self.k.div_ceil(128);
            let mut out = vec![0f32; self.m * self.k];
            for r in 0..self.m {
                for c in 0..self.k {
                    out[r * self.k + c] = kernels::fp8::e4m3_decode(self.codes[r * self.k + c])
                        * self.scales[r * kb + c / 128];
                }
            }
            out
        }
    }

    fn quant_act(x: &[f32], m: usize, k: usize) -> Result<(Vec<u8>, Vec<f32>)> {
        let mut codes = vec![0u8; m * k];
        let mut scales = vec![0f32; m * k.div_ceil(128)];
        // Quantization is cheap next to the GEMMs; one thread keeps it independent of the runtime.
        quantize_act(
            &ExecCtx::default(),
            &mut codes,
            &mut scales,
            x,
            m,
            k,
            ScaleFmt::F32,
        )?;
        Ok((codes, scales))
    }

    /// 128×1 tiles along the row (token) dimension of x [m, k]: codes [k, m], scales [k, ceil(m/128)].
    fn quant_t(ctx: &ExecCtx, x: &[f32], m: usize, k: usize) -> Result<(Vec<u8>, Vec<f32>)> {
        let mut codes = vec![0u8; m * k];
        let mut scales = vec![0f32; k * m.div_ceil(128)];
        quantize_act_t(ctx, &mut codes, &mut scales, x, m, k, ScaleFmt::F32)?;
        Ok((codes, scales))
    }

    /// 128×128 blocks of a weight [n, k].
    fn quant_w<T: Real>(ctx: &ExecCtx, w: &[T], n: usize, k: usize) -> Result<(Vec<u8>, Vec<f32>)> {
        let wf = to_f32(w);
        let mut codes = vec![0u8; n * k];
        let mut scales = vec![0f32; n.div_ceil(128) * k.div_ceil(128)];
        quantize_weight(ctx, &mut codes, &mut scales, &wf, n, k, ScaleFmt::F32)?;
        Ok((codes, scales))
    }

    fn to_f32<T: Real>(x: &[T]) -> Vec<f32> {
        x.iter().map(|v| v.to_f64() as f32).collect()
    }

    fn store<T: Real>(dst: &mut [T], src: &[f32], acc: Accumulate) {
        for (d, s) in dst.iter_mut().zip(src) {
            let v = T::from_f64(*s as f64);
            if acc == Accumulate::Add {
                *d += v
            } else {
                *d = v
            }
        }
    }

    /// Fprop: y [m, n] = x·Wᵀ with W [n, k] quantized in 128×128 blocks.
    pub fn forward<T: Real>(
        rt: &Runtime,
        y: &mut [T],
        x: &QuantAct,
        w: &[T],
        n: usize,
    ) -> Result<()> {
        let (m, k) = (x.m, x.k);
        let (wc, ws) = quant_w(&rt.exec, w, n, k)?;
        let xm = Fp8Matrix::new(&x.codes, &x.scales, m, k, Fp8Tiling::Row)?;
        let wm = Fp8Matrix::new(&wc, &ws, n, k, Fp8Tiling::Block)?;
        let mut out = vec![0f32; m * n];
        fp8_matmul_xwt(&rt.exec, &mut out, &xm, &wm, Accumulate::Overwrite)?;
        store(y, &out, Accumulate::Overwrite);
        Ok(())
    }

    /// Dgrad: dx [m, k] (+)= dy [m, n] · W, dy in 1×128 tiles, W in 128×128 blocks.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_input<T: Real>(
        rt: &Runtime,
        dx: &mut [T],
        dy: &[T],
        w: &[T],
        m: usize,
        n: usize,
        k: usize,
        acc: Accumulate,
    ) -> Result<()> {
        let (dc, ds) = quant_act(&to_f32(dy), m, n)?;
        let (wc, ws) = quant_w(&rt.exec, w, n, k)?;
        let dym = Fp8Matrix::new(&dc, &ds, m, n, Fp8Tiling::Row)?;
        let wm = Fp8Matrix::new(&wc, &ws, n, k, Fp8Tiling::Block)?;
        let mut out = vec![0f32; m * k];
        fp8_matmul_dyw(&rt.exec, &mut out, &dym, &wm, Accumulate::Overwrite)?;
        store(dx, &out, acc);
        Ok(())
    }

    /// Wgrad: dW [n, k] += dyᵀ·x with 128×1 tiles along the token dimension: the cached 1×128 input is
    /// dequantized and re-tiled (v3-spec §4.2), dy is quantized 128×1 directly.
    pub fn backward_weight<T: Real>(
        rt: &Runtime,
        dw: &mut [T],
        dy: &[T],
        x: &QuantAct,
        n: usize,
    ) -> Result<()> {
        let (m, k) = (x.m, x.k);
        let (dc, ds) = quant_t(&rt.exec, &to_f32(dy), m, n)?;
        let (xc, xs) = quant_t(&rt.exec, &x.dequantize(), m, k)?;
        let dym = Fp8Matrix::new(&dc, &ds, n, m, Fp8Tiling::Row)?;
        let xm = Fp8Matrix::new(&xc, &xs, k, m, Fp8Tiling::Row)?;
        let mut out = vec![0f32; n * k];
        fp8_matmul_dytx(&rt.exec, &mut out, &dym, &xm, Accumulate::Overwrite)?;
        store(dw, &out, Accumulate::Add);
        Ok(())
    }
}
