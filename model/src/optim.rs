//! AdamW over contiguous ranges of the flat parameter array, and the deterministic global gradient norm.
//!
//! The optimizer never sees tensors: it sees one contiguous range `[start, end)` of the flat f32 parameter
//! array (the whole array for a single process, one shard for ZeRO-1), the matching gradient slice, and a
//! [`DecayMask`] saying which sub-ranges get weight decay. Its state (first and second moments) covers exactly
//! that range, so sharding the optimizer is sharding the range.
//!
//! Invariants:
//! - The update of one element depends only on that element's parameter, gradient, moments, the step count,
//!   the learning rate and the clip coefficient, and the arithmetic is a fixed sequence of f32 operations, so
//!   any partition of the flat array into ranges gives bit-identical parameters.
//! - The gradient norm is an exact sum: each squared f32 gradient is exact in f64 and is added, as an integer
//!   significand, into a per-exponent u128 bin ([`SumSquares`]). Merging partial sums adds bins, which is
//!   associative and commutative, so the norm does not depend on how the array was split or in which order the
//!   partials arrive; only the final conversion of the bins to f64 rounds, in one fixed order.
//! - Moments are stored in bf16 (round to nearest even) or f32; the math is always f32.
//!
//! Weight decay policy (decoupled, AdamW): tensors with two or more dimensions (every projection, expert
//! weight, router weight, embedding and head) decay; one-dimensional tensors (RMSNorm weights, and biases if any
//! appear) do not. This is the Megatron-LM and llm.c default; DeepSeek-V3's report gives only the value 0.1.
//! The routing bias is not a parameter and never reaches the optimizer.

use half::bf16;
use rayon::prelude::*;
use std::ops::Range;

/// Elements per rayon task in the element-wise update and the sum of squares.
const PAR_CHUNK: usize = 1 << 16;

/// How the optimizer stores its first and second moments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MomentDtype {
    /// bfloat16 storage, rounded to nearest even on every store; math in f32.
    Bf16,
    /// Full f32 storage.
    F32,
}

/// AdamW hyper-parameters that stay fixed during a run (the learning rate comes per step).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// Exponential decay of the first moment (0.9 for DeepSeek-V3).
    pub beta1: f32,
    /// Exponential decay of the second moment (0.95 for DeepSeek-V3).
    pub beta2: f32,
    /// Added to the square root of the second moment.
    pub eps: f32,
    /// Decoupled weight decay coefficient, applied as `p -= lr * wd * p` on decaying ranges.
    pub weight_decay: f32,
    /// Maximum global L2 norm of the gradient; larger gradients are scaled down to it. `None` disables clipping.
    pub max_grad_norm: Option<f32>,
    /// Storage of the moments.
    pub moment_dtype: MomentDtype,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            max_grad_norm: Some(1.0),
            moment_dtype: MomentDtype::Bf16,
        }
    }
}

/// Which sub-ranges of the flat parameter array receive weight decay, in flat-array coordinates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecayMask {
    /// Sorted, non-overlapping ranges that decay; everything else does not.
    decay: Vec<Range<usize>>,
}

impl DecayMask {
    /// Builds the mask from `(flat offset, shape)` of every tensor: tensors with two or more dimensions decay.
    pub fn from_layout<'a>(tensors: impl IntoIterator<Item = (usize, &'a [usize])>) -> DecayMask {
        let mut decay: Vec<Range<usize>> = tensors
            .into_iter()
            .filter(|(_, shape)| shape.len() >= 2)
            .map(|(offset, shape)| offset..offset + shape.iter().product::<usize>())
            .filter(|r| !r.is_empty())
            .collect();
        decay.sort_by_key(|r| r.start);
        // Merge touching ranges so the per-chunk walk below stays short.
        let mut merged: Vec<Range<usize>> = Vec::with_capacity(decay.len());
        for r in decay {
            match merged.last_mut() {
                Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        DecayMask { decay: merged }
    }

    /// A mask that decays every element of `range`.
    pub fn all(range: Range<usize>) -> DecayMask {
        DecayMask { decay: vec![range] }
    }

    /// A mask that decays nothing.
    pub fn none() -> DecayMask {
        DecayMask::default()
    }

    /// Whether flat index `i` decays.
    pub fn decays(&self, i: usize) -> bool {
        let idx = self.decay.partition_point(|r| r.end <= i);
        self.decay.get(idx).is_some_and(|r| r.start <= i)
    }

    /// Splits `range` into maximal runs of equal decay, as `(sub-range, decays)`, in order.
    fn runs(&self, range: Range<usize>) -> Vec<(Range<usize>, bool)> {
        let mut out = Vec::new();
        let mut pos = range.start;
        let mut idx = self.decay.partition_point(|r| r.end <= pos);
        while pos < range.end {
            match self.decay.get(idx) {
                Some(r) if r.start <= pos => {
                    let end = r.end.min(range.end);
                    out.push((pos..end, true));
                    pos = end;
                    idx += 1;
                }
                Some(r) => {
                    let end = r.start.min(range.end);
                    out.push((pos..end, false));
                    pos = end;
                }
                None => {
                    out.push((pos..range.end, false));
                    pos = range.end;
                }
            }
        }
        out
    }
}

/// One moment buffer in its storage dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum MomentBuf {
    /// Raw bf16 values.
    Bf16(Vec<bf16>),
    /// f32 values.
    F32(Vec<f32>),
}

impl MomentBuf {
    fn zeros(dtype: MomentDtype, n: usize) -> MomentBuf {
        match dtype {
            MomentDtype::Bf16 => MomentBuf::Bf16(vec![bf16::ZERO; n]),
            MomentDtype::F32 => MomentBuf::F32(vec![0.0; n]),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            MomentBuf::Bf16(v) => v.len(),
            MomentBuf::F32(v) => v.len(),
        }
    }

    /// Whether the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values widened to f32 (exact for both storages).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            MomentBuf::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
            MomentBuf::F32(v) => v.clone(),
        }
    }

    /// The storage dtype.
    pub fn dtype(&self) -> MomentDtype {
        match self {
            MomentBuf::Bf16(_) => MomentDtype::Bf16,
            MomentBuf::F32(_) => MomentDtype::F32,
        }
    }
}

/// Per-step inputs of an AdamW update that all ranges of one step share.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepInputs {
    /// Learning rate of this step.
    pub lr: f32,
    /// Multiplier applied to every gradient element (from [`clip_coefficient`]; 1.0 when not clipping).
    pub grad_scale: f32,
}

/// AdamW state for the contiguous range `range` of the flat parameter array.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    /// Fixed hyper-parameters.
    pub config: AdamWConfig,
    /// The flat-array range this state covers.
    range: Range<usize>,
    /// Runs of `range` with their decay flag, precomputed from the mask.
    runs: Vec<(Range<usize>, bool)>,
    /// First moment, one element per element of `range`.
    pub exp_avg: MomentBuf,
    /// Second moment, one element per element of `range`.
    pub exp_avg_sq: MomentBuf,
    /// Number of updates applied so far (bias correction uses `steps + 1` for the next one).
    pub steps: u64,
}

impl AdamW {
    /// Fresh state (zero moments, zero steps) for `range`, decaying where `mask` says.
    pub fn new(config: AdamWConfig, range: Range<usize>, mask: &DecayMask) -> AdamW {
        let n = range.len();
        AdamW {
            config,
            runs: mask.runs(range.clone()),
            range,
            exp_avg: MomentBuf::zeros(config.moment_dtype, n),
            exp_avg_sq: MomentBuf::zeros(config.moment_dtype, n),
            steps: 0,
        }
    }

    /// The flat-array range this state covers.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// Replaces the moments and step count (checkpoint load); lengths and dtype must match this state.
    pub fn restore(
        &mut self,
        exp_avg: MomentBuf,
        exp_avg_sq: MomentBuf,
        steps: u64,
    ) -> Result<(), String> {
        let n = self.range.len();
        if exp_avg.len() != n || exp_avg_sq.len() != n {
            return Err(format!(
                "moment length {} / {} does not match the optimizer range of {n} elements",
                exp_avg.len(),
                exp_avg_sq.len()
            ));
        }
        if exp_avg.dtype() != self.config.moment_dtype
            || exp_avg_sq.dtype() != self.config.moment_dtype
        {
            return Err(format!(
                "moment dtype {:?}/{:?} does not match the configured {:?}",
                exp_avg.dtype(),
                exp_avg_sq.dtype(),
                self.config.moment_dtype
            ));
        }
        self.exp_avg = exp_avg;
        self.exp_avg_sq = exp_avg_sq;
        self.steps = steps;
        Ok(())
    }

    /// Applies one AdamW update to `params` (the slice of the flat array for `self.range()`) from `grads`
    /// (same range). Panics if the slice lengths differ from the range length (a caller bug).
    pub fn update(&mut self, params: &mut [f32], grads: &[f32], inputs: StepInputs) {
        let n = self.range.len();
        assert_eq!(
            params.len(),
            n,
            "parameter slice does not match the optimizer range"
        );
        assert_eq!(
            grads.len(),
            n,
            "gradient slice does not match the optimizer range"
        );
        self.steps += 1;
        let c = self.config;
        let t = self.steps as i32;
        // Bias corrections in f64, rounded once to f32.
        let bc1 = (1.0 - f64::from(c.beta1).powi(t)) as f32;
        let bc2 = (1.0 - f64::from(c.beta2).powi(t)) as f32;
        let k = Kernel {
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            lr: inputs.lr,
            grad_scale: inputs.grad_scale,
            bc1,
            bc2_sqrt: bc2.sqrt(),
        };
        let base = self.range.start;
        for (run, decays) in &self.runs {
            let local = run.start - base..run.end - base;
            let wd = if *decays { c.weight_decay } else { 0.0 };
            let p = &mut params[local.clone()];
            let g = &grads[local.clone()];
            match (&mut self.exp_avg, &mut self.exp_avg_sq) {
                (MomentBuf::F32(m), MomentBuf::F32(v)) => {
                    let (m, v) = (&mut m[local.clone()], &mut v[local]);
                    p.par_chunks_mut(PAR_CHUNK)
                        .zip(g.par_chunks(PAR_CHUNK))
                        .zip(m.par_chunks_mut(PAR_CHUNK).zip(v.par_chunks_mut(PAR_CHUNK)))
                        .for_each(|((p, g), (m, v))| {
                            for i in 0..p.len() {
                                let (nm, nv) = k.apply(&mut p[i], g[i], m[i], v[i], wd);
                                m[i] = nm;
                                v[i] = nv;
                            }
                        });
                }
                (MomentBuf::Bf16(m), MomentBuf::Bf16(v)) => {
                    let (m, v) = (&mut m[local.clone()], &mut v[local]);
                    p.par_chunks_mut(PAR_CHUNK)
                        .zip(g.par_chunks(PAR_CHUNK))
                        .zip(m.par_chunks_mut(PAR_CHUNK).zip(v.par_chunks_mut(PAR_CHUNK)))
                        .for_each(|((p, g), (m, v))| {
                            for i in 0..p.len() {
                                let (nm, nv) =
                                    k.apply(&mut p[i], g[i], m[i].to_f32(), v[i].to_f32(), wd);
                                m[i] = bf16::from_f32(nm);
                                v[i] = bf16::from_f32(nv);
                            }
                        });
                }
                _ => unreachable!("both moments are created and restored with the same dtype"),
            }
        }
    }
}

/// The scalar constants of one update.
#[derive(Clone, Copy)]
struct Kernel {
    beta1: f32,
    beta2: f32,
    eps: f32,
    lr: f32,
    grad_scale: f32,
    bc1: f32,
    bc2_sqrt: f32,
}

impl Kernel {
    /// One element: returns the new (m, v) and updates `p` in place. The operation order is fixed:
    /// g = grad·scale; m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²;
    /// p = p − lr·(wd·p) − lr·(m/bc1) / (√v/√bc2 + eps).
    #[inline(always)]
    fn apply(&self, p: &mut f32, grad: f32, m: f32, v: f32, wd: f32) -> (f32, f32) {
        let g = grad * self.grad_scale;
        let m = self.beta1 * m + (1.0 - self.beta1) * g;
        let v = self.beta2 * v + (1.0 - self.beta2) * (g * g);
        let m_hat = m / self.bc1;
        let denom = v.sqrt() / self.bc2_sqrt + self.eps;
        let decayed = *p - self.lr * (wd * *p);
        *p = decayed - self.lr * (m_hat / denom);
        (m, v)
    }
}

/// Exact sum of squares of f32 values, kept as integer significands binned by the f64 exponent of each square.
///
/// Adding two partial sums is exact, so the total is independent of how the values were split.
#[derive(Clone, PartialEq, Eq)]
pub struct SumSquares {
    /// `bins[e]` = Σ significand(x²) over squares whose f64 biased exponent is `e`; the value of bin `e` is
    /// `bins[e] · 2^(e − 1075)`. Exponent 0 only ever receives zeros (f32 squares are never f64-subnormal).
    bins: Box<[u128; 2048]>,
    /// Whether any input was NaN or infinite.
    non_finite: bool,
}

impl std::fmt::Debug for SumSquares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SumSquares")
            .field("value", &self.value())
            .field("non_finite", &self.non_finite)
            .finish()
    }
}

impl Default for SumSquares {
    fn default() -> Self {
        SumSquares {
            bins: Box::new([0u128; 2048]),
            non_finite: false,
        }
    }
}

impl SumSquares {
    /// The exact sum of squares of `values` (parallel over chunks; the result does not depend on the split).
    pub fn of(values: &[f32]) -> SumSquares {
        values
            .par_chunks(PAR_CHUNK)
            .map(|chunk| {
                let mut acc = SumSquares::default();
                acc.add_slice(chunk);
                acc
            })
            .reduce(SumSquares::default, |mut a, b| {
                a.merge(&b);
                a
            })
    }

    /// Adds the squares of `values`.
    pub fn add_slice(&mut self, values: &[f32]) {
        for &x in values {
            let sq = f64::from(x) * f64::from(x);
            let bits = sq.to_bits();
            let exp = (bits >> 52) as usize & 0x7ff;
            if exp == 0x7ff {
                self.non_finite = true;
                continue;
            }
            let significand = if exp == 0 {
                0
            } else {
                (bits & ((1u64 << 52) - 1)) | (1u64 << 52)
            };
            self.bins[exp] += u128::from(significand);
        }
    }

    /// Adds another partial sum into this one (exact).
    pub fn merge(&mut self, other: &SumSquares) {
        for (a, b) in self.bins.iter_mut().zip(other.bins.iter()) {
            *a += *b;
        }
        self.non_finite |= other.non_finite;
    }

    /// Whether any input was NaN or infinite.
    pub fn is_non_finite(&self) -> bool {
        self.non_finite
    }

    /// The sum as f64 (NaN if any input was not finite), converted from the largest exponent down.
    pub fn value(&self) -> f64 {
        if self.non_finite {
            return f64::NAN;
        }
        let mut total = 0.0f64;
        for e in (1..2048).rev() {
            let b = self.bins[e];
            if b != 0 {
                total += (b as f64) * 2f64.powi(e as i32 - 1075);
            }
        }
        total
    }

    /// The non-zero bins as `(exponent, sum)` pairs, for sending a partial sum to a peer.
    pub fn to_sparse(&self) -> (Vec<(u16, u128)>, bool) {
        let bins = self
            .bins
            .iter()
            .enumerate()
            .filter(|(_, b)| **b != 0)
            .map(|(e, b)| (e as u16, *b))
            .collect();
        (bins, self.non_finite)
    }

    /// Rebuilds a partial sum from [`SumSquares::to_sparse`]'s output; exponents ≥ 2048 are ignored.
    pub fn from_sparse(bins: &[(u16, u128)], non_finite: bool) -> SumSquares {
        let mut s = SumSquares {
            non_finite,
            ..SumSquares::default()
        };
        for &(e, b) in bins {
            if let Some(slot) = s.bins.get_mut(usize::from(e)) {
                *slot += b;
            }
        }
        s
    }

    /// The L2 norm, √(sum), as f32.
    pub fn norm(&self) -> f32 {
        self.value().sqrt() as f32
    }
}

/// The factor that brings a gradient of global norm `norm` down to at most `max_norm` (1.0 when it already is,
/// or when clipping is off). A non-finite norm gives NaN so that the caller can skip the step.
pub fn clip_coefficient(norm: f32, max_norm: Option<f32>) -> f32 {
    if !norm.is_finite() {
        return f32::NAN;
    }
    match max_norm {
        Some(max) if norm > max => max / (norm + 1e-6),
        _ => 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dtype: MomentDtype) -> AdamWConfig {
        AdamWConfig {
            moment_dtype: dtype,
            ..AdamWConfig::default()
        }
    }

    #[test]
    fn first_two_steps_match_hand_computation() {
        // p = 1, g = 0.5, lr = 0.1, wd = 0.1, β = (0.9, 0.95), eps = 1e-8, f32 moments.
        let mut opt = AdamW::new(cfg(MomentDtype::F32), 0..1, &DecayMask::all(0..1));
        let mut p = [1.0f32];
        opt.update(
            &mut p,
            &[0.5],
            StepInputs {
                lr: 0.1,
                grad_scale: 1.0,
            },
        );
        // Step 1: m = 0.05, v = 0.0125, m̂ = 0.5, v̂ = 0.25, update = 0.5 / (0.5 + 1e-8) ≈ 1 − 2e-8.
        // p = 1 − 0.1·0.1·1 − 0.1·(1 − 2e-8) = 0.89.
        assert!((p[0] - 0.89).abs() < 1e-7, "{}", p[0]);
        let m = opt.exp_avg.to_f32()[0];
        let v = opt.exp_avg_sq.to_f32()[0];
        assert!(
            (m - 0.05).abs() < 1e-7 && (v - 0.0125).abs() < 1e-8,
            "m {m} v {v}"
        );
        // Step 2 with g = −0.25: m = 0.9·0.05 − 0.025 = 0.02, v = 0.95·0.0125 + 0.05·0.0625 = 0.0150,
        // m̂ = 0.02/0.19 = 0.105263, v̂ = 0.015/0.0975 = 0.153846, √v̂ = 0.392232,
        // p = 0.89 − 0.1·0.1·0.89 − 0.1·0.105263/0.392232 = 0.89 − 0.0089 − 0.0268371 = 0.8542629.
        opt.update(
            &mut p,
            &[-0.25],
            StepInputs {
                lr: 0.1,
                grad_scale: 1.0,
            },
        );
        assert!((p[0] - 0.854_262_9).abs() < 2e-6, "{}", p[0]);
    }

    #[test]
    fn norms_do_not_decay_and_clip_scales_gradients() {
        // Element 0 decays, element 1 does not; zero gradient isolates the decay term.
        let mask = DecayMask::from_layout([(0usize, &[1usize, 1][..]), (1, &[1][..])]);
        let mut opt = AdamW::new(cfg(MomentDtype::F32), 0..2, &mask);
        let mut p = [2.0f32, 2.0];
        opt.update(
            &mut p,
            &[0.0, 0.0],
            StepInputs {
                lr: 0.5,
                grad_scale: 1.0,
            },
        );
        assert_eq!(p, [2.0 - 0.5 * 0.1 * 2.0, 2.0]);
        // A gradient of norm 5 clipped to 1: scale = 1/(5 + 1e-6).
        let ss = SumSquares::of(&[3.0, 4.0]);
        assert_eq!(ss.value(), 25.0);
        let c = clip_coefficient(ss.norm(), Some(1.0));
        assert!((c - 0.2).abs() < 1e-7);
        assert_eq!(clip_coefficient(0.5, Some(1.0)), 1.0);
        assert!(clip_coefficient(f32::INFINITY, Some(1.0)).is_nan());
    }

    #[test]
    fn bf16_moments_round_to_nearest_even_and_follow_f32_closely() {
        let n = 1000;
        let grads: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 1e-2).collect();
        let mut p32: Vec<f32> = (0..n).map(|i| (i as f32 * 0.1).cos()).collect();
        let mut p16 = p32.clone();
        let mut a = AdamW::new(cfg(MomentDtype::F32), 0..n, &DecayMask::all(0..n));
        let mut b = AdamW::new(cfg(MomentDtype::Bf16), 0..n, &DecayMask::all(0..n));
        for _ in 0..5 {
            a.update(
                &mut p32,
                &grads,
                StepInputs {
                    lr: 1e-3,
                    grad_scale: 1.0,
                },
            );
            b.update(
                &mut p16,
                &grads,
                StepInputs {
                    lr: 1e-3,
                    grad_scale: 1.0,
                },
            );
        }
        let max_diff = p32
            .iter()
            .zip(&p16)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(max_diff < 5e-5, "{max_diff}");
        // Each stored value is the RNE rounding of some f32: re-rounding is the identity.
        for x in b.exp_avg.to_f32() {
            assert_eq!(bf16::from_f32(x).to_f32(), x);
        }
        // RNE: 1 + 2^-8 is a tie between 1 and 1 + 2^-7 and rounds to the even significand 1.
        assert_eq!(bf16::from_f32(1.0 + 2f32.powi(-8)).to_f32(), 1.0);
    }

    #[test]
    fn sharded_update_and_norm_equal_the_whole_range_bitwise() {
        let n = 300_001;
        let grads: Vec<f32> = (0..n)
            .map(|i| ((i as f32) * 1.7).sin() * 10f32.powi((i % 7) as i32 - 3))
            .collect();
        let init: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.3).cos()).collect();
        let mask = DecayMask::from_layout([
            (0usize, &[1000usize, 100][..]),
            (100_000, &[77][..]),
            (100_077, &[199_924, 1][..]),
        ]);
        let ss_whole = SumSquares::of(&grads);
        let mut ss_parts = SumSquares::default();
        let cuts = [0, 12_345, 100_050, 200_000, n];
        for w in cuts.windows(2).rev() {
            ss_parts.merge(&SumSquares::of(&grads[w[0]..w[1]]));
        }
        assert!(ss_whole == ss_parts);
        assert_eq!(ss_whole.value().to_bits(), ss_parts.value().to_bits());
        let (sparse, nf) = ss_parts.to_sparse();
        assert!(SumSquares::from_sparse(&sparse, nf) == ss_whole);
        let inputs = StepInputs {
            lr: 3e-4,
            grad_scale: clip_coefficient(ss_whole.norm(), Some(1.0)),
        };

        let mut whole = init.clone();
        let mut opt = AdamW::new(cfg(MomentDtype::Bf16), 0..n, &mask);
        let mut sharded = init.clone();
        let mut shards: Vec<AdamW> = cuts
            .windows(2)
            .map(|w| AdamW::new(cfg(MomentDtype::Bf16), w[0]..w[1], &mask))
            .collect();
        for _ in 0..3 {
            opt.update(&mut whole, &grads, inputs);
            for s in &mut shards {
                let r = s.range();
                s.update(&mut sharded[r.clone()], &grads[r], inputs);
            }
        }
        assert!(
            whole
                .iter()
                .zip(&sharded)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        assert!(
            mask.decays(0) && mask.decays(99_999) && !mask.decays(100_000) && mask.decays(100_077)
        );
    }

    #[test]
    fn sum_of_squares_is_exact_where_f64_summation_is_not() {
        // 1e8² + many 1.0² : naive f64 left-to-right would still be exact here, so use a case where order
        // matters: 2^60 followed by 2^0 terms, each lost in naive f64 addition.
        let big = 2f32.powi(30);
        let mut v = vec![big];
        v.extend(std::iter::repeat_n(1.0f32, 4096));
        let ss = SumSquares::of(&v);
        assert_eq!(ss.value(), 2f64.powi(60) + 4096.0);
        let naive = v
            .iter()
            .fold(0.0f64, |a, &x| a + f64::from(x) * f64::from(x));
        assert_ne!(naive, ss.value());
        assert!(SumSquares::of(&[1.0, f32::NAN]).value().is_nan());
    }
}
