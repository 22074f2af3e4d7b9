//! The scalar trait the generic ops are written against: `f32` for the model, `f64` for the
//! finite-difference tests. Sealed: only `f32` and `f64` implement it, which is also what lets the ops hand
//! buffers to the `gemm` crate (it supports exactly these two real types among ours).

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// A real floating-point scalar (`f32` or `f64`).
pub trait Real:
    sealed::Sealed
    + Copy
    + Send
    + Sync
    + Default
    + Debug
    + PartialOrd
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    /// Additive identity.
    const ZERO: Self;
    /// Multiplicative identity.
    const ONE: Self;
    /// Negative infinity (the value of a masked score).
    const NEG_INFINITY: Self;
    /// Converts from `f64` with one rounding.
    fn from_f64(x: f64) -> Self;
    /// Converts to `f64` exactly.
    fn to_f64(self) -> f64;
    /// `e^self`.
    fn exp(self) -> Self;
    /// Natural logarithm.
    fn ln(self) -> Self;
    /// Square root.
    fn sqrt(self) -> Self;
    /// Absolute value.
    fn abs(self) -> Self;
    /// IEEE maximum (a NaN operand is ignored).
    fn max(self, other: Self) -> Self;
    /// Whether the value is NaN.
    fn is_nan(self) -> bool;
    /// `e^self` through a branch-free polynomial that vectorizes (f32: within 2 ulp of the true value on
    /// [−87, 88.7], exactly 0 below −87.3, +∞ above ln(f32::MAX), NaN kept); f64 uses the library `exp`.
    fn exp_fast(self) -> Self;
    /// Fused or unfused `self * a + b`; the ops use it only where either is fine.
    #[inline]
    fn mul_add(self, a: Self, b: Self) -> Self {
        self * a + b
    }
}

macro_rules! impl_real {
    ($t:ty, $fast:expr) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            #[inline]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline]
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            #[inline]
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
            #[inline(always)]
            fn exp_fast(self) -> Self {
                $fast(self)
            }
        }
    };
}
impl_real!(f32, expf_fast);
impl_real!(f64, f64::exp);

/// Branch-free `e^x` for f32 (Cephes' minimax polynomial on [−ln2/2, ln2/2] times 2^n from the exponent
/// bits). Written with plain multiplies and adds only, so every build and SIMD width gives the same bits.
#[inline(always)]
pub fn expf_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting rounds to nearest.
    let xc = x.clamp(-87.3, 88.72);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = (xc - n * C1) - n * C2;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n as two normal halves, so n = 128 (x near ln f32::MAX) and n = −126 both stay exact.
    let ni = n as i32;
    let (a, b) = (ni >> 1, ni - (ni >> 1));
    let v =
        (y * f32::from_bits(((a + 127) as u32) << 23)) * f32::from_bits(((b + 127) as u32) << 23);
    let v = if x < -87.3 { 0.0 } else { v };
    let v = if x > 88.722_8 { f32::INFINITY } else { v };
    if x.is_nan() { x } else { v }
}

/// Dot product with eight independent partial sums (vectorizable, and more accurate than one running
/// sum); the summation order depends only on the length, so the result is deterministic.
#[inline]
pub fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::ZERO; 8];
    let chunks = n / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    for i in chunks * 8..n {
        acc[i % 8] += a[i] * b[i];
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Sum with eight independent partial sums (same fixed order as [`dot`]).
#[inline]
pub fn sum<T: Real>(a: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        let x = &a[c * 8..c * 8 + 8];
        for l in 0..8 {
            acc[l] += x[l];
        }
    }
    for i in chunks * 8..a.len() {
        acc[i % 8] += a[i];
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Σ e^(x − m) with [`Real::exp_fast`] and the same eight partial sums as [`sum`].
#[inline]
pub fn sum_exp_shifted<T: Real>(a: &[T], m: T) -> T {
    let mut acc = [T::ZERO; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        let x = &a[c * 8..c * 8 + 8];
        for l in 0..8 {
            acc[l] += (x[l] - m).exp_fast();
        }
    }
    for i in chunks * 8..a.len() {
        acc[i % 8] += (a[i] - m).exp_fast();
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Largest element (−∞ for an empty slice; NaN elements are skipped).
#[inline]
pub fn max_of<T: Real>(a: &[T]) -> T {
    a.iter().fold(T::NEG_INFINITY, |m, &x| m.max(x))
}

/// Sum of squares with the same fixed order as [`dot`].
#[inline]
pub fn sum_sq<T: Real>(a: &[T]) -> T {
    dot(a, a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expf_fast_is_within_two_ulp() {
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x < 88.7 {
            let (got, want) = (expf_fast(x), (x as f64).exp() as f32);
            worst = worst.max(got.to_bits().abs_diff(want.to_bits()));
            x += 0.000_731;
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        assert_eq!(expf_fast(-100.0), 0.0);
        assert_eq!(expf_fast(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf_fast(100.0), f32::INFINITY);
        assert!(expf_fast(f32::NAN).is_nan());
        assert_eq!(expf_fast(0.0), 1.0);
    }
}
