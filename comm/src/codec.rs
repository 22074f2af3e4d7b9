//! Payload encodings shared by senders and receivers: f32 and bf16 little-endian arrays, and a
//! multi-section payload (e.g. FP8 codes + power-of-two scales + expert indices in one dispatch
//! message).
//!
//! Invariant: every encoder has a decoder that returns exactly what was encoded (bf16 after its
//! one rounding), and decoders reject inputs of the wrong length with [`CommError::Decode`]
//! instead of panicking, since payloads come from other processes.

use half::bf16;

use crate::{CommError, Result};

/// Encodes `values` as little-endian f32 bytes (4 bytes each).
pub fn f32_to_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for value in values {
        out.extend_from_slice(&value.to_le_bytes());
    }
    out
}

/// Decodes little-endian f32 bytes; fails if the length is not a multiple of 4.
pub fn f32_from_bytes(bytes: &[u8]) -> Result<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return Err(CommError::Decode(format!(
            "{} bytes is not a whole number of f32 values",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Rounds `values` to bf16 (round to nearest, ties to even) and encodes them little-endian
/// (2 bytes each): the V3 combine precision (v3-spec §4.5).
pub fn bf16_encode(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 2);
    for &value in values {
        out.extend_from_slice(&bf16::from_f32(value).to_bits().to_le_bytes());
    }
    out
}

/// Decodes little-endian bf16 bytes to f32 (exact); fails if the length is odd.
pub fn bf16_decode(bytes: &[u8]) -> Result<Vec<f32>> {
    if !bytes.len().is_multiple_of(2) {
        return Err(CommError::Decode(format!(
            "{} bytes is not a whole number of bf16 values",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(2)
        .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
        .collect())
}

/// Packs several byte sections into one payload: a u32 count, one u64 length per section, then
/// the sections back to back (all little-endian).
pub fn pack_sections(sections: &[&[u8]]) -> Vec<u8> {
    let body: usize = sections.iter().map(|s| s.len()).sum();
    let mut out = Vec::with_capacity(4 + 8 * sections.len() + body);
    out.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    for section in sections {
        out.extend_from_slice(&(section.len() as u64).to_le_bytes());
    }
    for section in sections {
        out.extend_from_slice(section);
    }
    out
}

/// Splits a payload made by [`pack_sections`] back into its sections (borrowed from `payload`).
pub fn unpack_sections(payload: &[u8]) -> Result<Vec<&[u8]>> {
    let count_bytes: [u8; 4] = payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            CommError::Decode(format!(
                "a sectioned payload of {} bytes has no section count",
                payload.len()
            ))
        })?;
    let count = u32::from_le_bytes(count_bytes) as usize;
    let table_end = count
        .checked_mul(8)
        .and_then(|t| t.checked_add(4))
        .filter(|&end| end <= payload.len())
        .ok_or_else(|| {
            CommError::Decode(format!(
                "section table of {count} entries does not fit in {} bytes",
                payload.len()
            ))
        })?;
    let mut sections = Vec::with_capacity(count);
    let mut offset = table_end;
    for index in 0..count {
        let at = 4 + 8 * index;
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(&payload[at..at + 8]);
        let len = u64::from_le_bytes(len_bytes);
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| offset.checked_add(l))
            .filter(|&end| end <= payload.len())
            .ok_or_else(|| {
                CommError::Decode(format!(
                    "section {index} of {len} bytes at offset {offset} overruns the {}-byte payload",
                    payload.len()
                ))
            })?;
        sections.push(&payload[offset..end]);
        offset = end;
    }
    if offset != payload.len() {
        return Err(CommError::Decode(format!(
            "{} trailing bytes after {count} sections",
            payload.len() - offset
        )));
    }
    Ok(sections)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trip_and_bad_length() {
        let values = [1.5f32, -0.0, f32::MAX, 3.25e-7];
        let back = f32_from_bytes(&f32_to_bytes(&values)).unwrap();
        assert_eq!(
            back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            values.map(f32::to_bits).to_vec()
        );
        assert!(
            f32_from_bytes(&[0; 7])
                .unwrap_err()
                .to_string()
                .contains("7 bytes")
        );
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 values and ties to the even one (1.0);
        // 1 + 3 * 2^-8 ties up to 1 + 2^-6.
        let values = [1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), -2.5];
        let back = bf16_decode(&bf16_encode(&values)).unwrap();
        assert_eq!(back, vec![1.0, 1.0 + 2f32.powi(-6), -2.5]);
        assert!(bf16_decode(&[1, 2, 3]).is_err());
    }

    #[test]
    fn sections_round_trip_and_reject_garbage() {
        let codes = [1u8, 2, 3];
        let scales = f32_to_bytes(&[0.5, 0.25]);
        let packed = pack_sections(&[&codes, &[], &scales]);
        let back = unpack_sections(&packed).unwrap();
        assert_eq!(back, vec![&codes[..], &[][..], &scales[..]]);
        assert!(
            unpack_sections(&packed[..packed.len() - 1])
                .unwrap_err()
                .to_string()
                .contains("overruns")
        );
        assert!(unpack_sections(&[255, 255, 255, 255]).is_err());
        let mut extra = packed.clone();
        extra.push(0);
        assert!(
            unpack_sections(&extra)
                .unwrap_err()
                .to_string()
                .contains("trailing")
        );
    }
}
