//! bf16 storage helpers: f32 → bf16 with round-to-nearest-even (NaN kept quiet, sign kept) and back.
//!
//! Invariant: bf16 → f32 is exact; f32 → bf16 matches PyTorch/ml_dtypes bit for bit, including ties.

use crate::{Result, check_len};

/// Rounds an f32 to bf16 bits (nearest, ties to even; NaN stays NaN, infinities stay infinite).
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x0040) as u16;
    }
    let round = 0x7FFF + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// Widens bf16 bits to f32 (exact).
#[inline]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Slice version of [`f32_to_bf16`].
pub fn f32_to_bf16_slice(out: &mut [u16], x: &[f32]) -> Result<()> {
    check_len("out", out.len(), x.len())?;
    out.iter_mut()
        .zip(x)
        .for_each(|(o, &v)| *o = f32_to_bf16(v));
    Ok(())
}

/// Slice version of [`bf16_to_f32`].
pub fn bf16_to_f32_slice(out: &mut [f32], h: &[u16]) -> Result<()> {
    check_len("out", out.len(), h.len())?;
    out.iter_mut()
        .zip(h)
        .for_each(|(o, &v)| *o = bf16_to_f32(v));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Rng;

    #[test]
    fn matches_half_crate() {
        let mut rng = Rng::seeded("bf16");
        let special = [
            0.0f32,
            -0.0,
            1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
        ];
        let ties = [
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
            f32::from_bits(0xBF80_8000),
        ];
        let randoms = (0..100_000)
            .map(|_| f32::from_bits(rng.next_u64() as u32))
            .filter(|v| !v.is_nan());
        for v in special.into_iter().chain(ties).chain(randoms) {
            assert_eq!(f32_to_bf16(v), half::bf16::from_f32(v).to_bits(), "{v:e}");
            assert_eq!(
                bf16_to_f32(f32_to_bf16(v)),
                half::bf16::from_f32(v).to_f32()
            );
        }
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        assert!(bf16_to_f32(f32_to_bf16(f32::from_bits(0x7F80_0001))).is_nan());
    }
}
