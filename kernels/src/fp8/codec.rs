//! Scalar and slice codecs for E4M3 (`float8_e4m3fn`: bias 7, no infinities, NaN = S.1111.111, max 448)
//! and E5M2 (bias 15, IEEE-like with infinities, max 57344).
//!
//! Invariant: the encoders are branch-free bit manipulations (so loops over them vectorize) that equal
//! ml_dtypes' round-to-nearest-even casts wherever ml_dtypes gives a finite or NaN answer, except that
//! E4M3 saturates |x| > 464 and ±∞ to ±448 instead of returning NaN.

/// Largest finite E4M3 magnitude.
pub const E4M3_MAX: f32 = 448.0;
/// Largest finite E5M2 magnitude.
pub const E5M2_MAX: f32 = 57344.0;

/// E4M3 encoding of f32 bits `b` (see module docs for the overflow rule).
#[inline(always)]
pub(crate) fn e4m3_from_bits(b: u32) -> u8 {
    let sign = (b >> 24) & 0x80;
    let a = b & 0x7FFF_FFFF;
    // Subnormal range |x| < 2^-6: code = rne(|x| · 2^9) in 0..=8 (8 is the smallest normal, 0x08).
    let sub = (f32::from_bits(a) * 512.0 + 8_388_608.0)
        .to_bits()
        .wrapping_sub(0x4B00_0000);
    // Normal range: round the f32 mantissa to 3 bits (ties to even) and rebias the exponent 127 → 7.
    let norm = (a.wrapping_add(0x7_FFFF + ((a >> 20) & 1)) >> 20).wrapping_sub(120 << 3);
    let mag = if a < 0x3C80_0000 { sub } else { norm };
    let mag = if a >= 0x43E0_0000 { 0x7E } else { mag };
    let mag = if a > 0x7F80_0000 { 0x7F } else { mag };
    (sign | mag) as u8
}

/// Encodes one f32 as E4M3 bits.
#[inline]
pub fn e4m3_encode(x: f32) -> u8 {
    e4m3_from_bits(x.to_bits())
}

const fn e4m3_value(c: u8) -> f32 {
    let neg = c & 0x80 != 0;
    let e = ((c >> 3) & 0xF) as u32;
    let m = (c & 7) as u32;
    let mag = if e == 15 && m == 7 {
        f32::NAN
    } else if e == 0 {
        m as f32 / 512.0
    } else {
        f32::from_bits(((e + 120) << 23) | (m << 20))
    };
    if neg { -mag } else { mag }
}

const fn build_e4m3_lut() -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = e4m3_value(i as u8);
        i += 1;
    }
    t
}

/// Decoded value of every E4M3 code.
pub(crate) static E4M3_LUT: [f32; 256] = build_e4m3_lut();

/// Decodes E4M3 bits to f32 (exact).
#[inline]
pub fn e4m3_decode(c: u8) -> f32 {
    E4M3_LUT[c as usize]
}

/// Encodes a slice (`out.len()` must equal `x.len()`).
pub fn e4m3_encode_slice(out: &mut [u8], x: &[f32]) -> crate::Result<()> {
    crate::check_len("out", out.len(), x.len())?;
    out.iter_mut()
        .zip(x)
        .for_each(|(o, &v)| *o = e4m3_encode(v));
    Ok(())
}

/// Decodes a slice (`out.len()` must equal `codes.len()`).
pub fn e4m3_decode_slice(out: &mut [f32], codes: &[u8]) -> crate::Result<()> {
    crate::check_len("out", out.len(), codes.len())?;
    out.iter_mut()
        .zip(codes)
        .for_each(|(o, &c)| *o = E4M3_LUT[c as usize]);
    Ok(())
}

/// Encodes one f32 as E5M2 bits: round to nearest even; overflow (|x| ≥ 61440) gives ±∞; NaN stays NaN.
#[inline]
pub fn e5m2_encode(x: f32) -> u8 {
    let b = x.to_bits();
    let sign = (b >> 24) & 0x80;
    let a = b & 0x7FFF_FFFF;
    // Subnormal range |x| < 2^-14: code = rne(|x| · 2^16) in 0..=4.
    let sub = (f32::from_bits(a) * 65536.0 + 8_388_608.0)
        .to_bits()
        .wrapping_sub(0x4B00_0000);
    let norm = (a.wrapping_add(0xF_FFFF + ((a >> 21) & 1)) >> 21).wrapping_sub(112 << 2);
    let mag = if a < 0x3880_0000 { sub } else { norm };
    let mag = if a >= 0x4770_0000 { 0x7C } else { mag };
    let mag = if a > 0x7F80_0000 { 0x7E } else { mag };
    (sign | mag) as u8
}

/// Decodes E5M2 bits to f32 (exact; E5M2 is the top byte of an IEEE half).
#[inline]
pub fn e5m2_decode(c: u8) -> f32 {
    half::f16::from_bits((c as u16) << 8).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Rng;
    use float8::{F8E4M3, F8E5M2};

    #[test]
    fn every_e4m3_code_decodes_and_round_trips() {
        for c in 0..=255u8 {
            let v = e4m3_decode(c);
            let want = F8E4M3::from_bits(c).to_f32();
            if (c & 0x7F) == 0x7F {
                assert!(v.is_nan() && want.is_nan(), "code {c:#04x} must be NaN");
                assert_eq!(e4m3_encode(v) & 0x7F, 0x7F);
            } else {
                assert_eq!(v.to_bits(), want.to_bits(), "code {c:#04x}");
                assert_eq!(e4m3_encode(v), c, "round trip of code {c:#04x} ({v:e})");
            }
        }
        assert_eq!(e4m3_decode(0x7E), 448.0);
        assert_eq!(e4m3_decode(0x01), 2f32.powi(-9));
    }

    #[test]
    fn e4m3_encode_matches_reference_rounding() {
        let mut rng = Rng::seeded("e4m3");
        let mut inputs: Vec<f32> = vec![
            0.0,
            -0.0,
            464.0,
            463.9,
            448.1,
            1e-30,
            -1e-45,
            2f32.powi(-10),
            3.0 * 2f32.powi(-11),
        ];
        // Exact midpoints between neighbouring codes (ties) and their neighbours.
        for c in 0..0x7Eu8 {
            let (a, b) = (e4m3_decode(c), e4m3_decode(c + 1));
            let mid = (a + b) / 2.0;
            inputs.extend([
                mid,
                -mid,
                f32::from_bits(mid.to_bits() + 1),
                f32::from_bits(mid.to_bits().saturating_sub(1)),
            ]);
        }
        for _ in 0..200_000 {
            let e = rng.below(30) as i32 - 20;
            inputs.push((rng.uniform() * 2f64.powi(e)) as f32);
            inputs.push(f32::from_bits(rng.next_u64() as u32));
        }
        for v in inputs {
            let got = e4m3_encode(v);
            if v.is_nan() {
                assert_eq!(got & 0x7F, 0x7F, "{v:e}");
            } else {
                // float8 saturates like we do (deps.md §5), so it is a full reference here.
                assert_eq!(
                    got,
                    F8E4M3::from_f32(v).to_bits(),
                    "{v:e} (seed {})",
                    rng.seed
                );
            }
        }
        assert_eq!(e4m3_encode(f32::INFINITY), 0x7E);
        assert_eq!(e4m3_encode(f32::NEG_INFINITY), 0xFE);
        assert_eq!(e4m3_encode(-f32::NAN) & 0x7F, 0x7F);
    }

    #[test]
    fn e5m2_matches_float8() {
        let mut rng = Rng::seeded("e5m2");
        for c in 0..=255u8 {
            let v = e5m2_decode(c);
            let want = F8E5M2::from_bits(c).to_f32();
            assert!(
                v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()),
                "code {c:#04x}"
            );
            if !v.is_nan() {
                assert_eq!(e5m2_encode(v), c);
            }
        }
        for _ in 0..200_000 {
            let e = rng.below(40) as i32 - 24;
            for v in [
                (rng.uniform() * 2f64.powi(e)) as f32,
                f32::from_bits(rng.next_u64() as u32),
            ] {
                if v.abs() >= 61440.0 {
                    // float8 saturates E5M2; IEEE/ml_dtypes (and we) overflow to infinity.
                    assert_eq!(e5m2_encode(v) & 0x7F, 0x7C, "{v:e}");
                    continue;
                }
                let (got, want) = (e5m2_decode(e5m2_encode(v)), F8E5M2::from_f32(v).to_f32());
                assert!(
                    got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                    "{v:e} (seed {})",
                    rng.seed
                );
            }
        }
    }
}
