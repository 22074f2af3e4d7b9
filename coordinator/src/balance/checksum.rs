//! Checksums of routing-bias bits: FNV-1a (64-bit) over the little-endian bytes of each f32's bit
//! pattern, so two holders agree exactly when their biases are bit-identical (−0.0 and 0.0, or two
//! NaN payloads, differ on purpose).
//!
//! Invariant: the checksum depends only on the bits and their order, never on the platform.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv_bytes(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

fn fnv_f32(mut h: u64, values: &[f32]) -> u64 {
    for v in values {
        h = fnv_bytes(h, &v.to_bits().to_le_bytes());
    }
    h
}

/// The checksum of one layer's bias.
pub fn layer_checksum(bias: &[f32]) -> u64 {
    fnv_f32(FNV_OFFSET, bias)
}

/// One checksum over every layer a rank holds (`StepReport.bias_checksum`): FNV-1a over, for each
/// layer in ascending id order, the layer id (u32 LE) followed by its bias bits. The caller passes
/// the layers in any order; they are sorted here.
pub fn rank_checksum<'a>(layers: impl IntoIterator<Item = (u32, &'a [f32])>) -> u64 {
    let mut v: Vec<(u32, &[f32])> = layers.into_iter().collect();
    v.sort_by_key(|(l, _)| *l);
    v.into_iter().fold(FNV_OFFSET, |h, (layer, bias)| {
        fnv_f32(fnv_bytes(h, &layer.to_le_bytes()), bias)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors_and_bit_sensitivity() {
        // FNV-1a of the empty input is the offset basis; of the single byte 'a' the published value.
        assert_eq!(layer_checksum(&[]), FNV_OFFSET);
        assert_eq!(fnv_bytes(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(layer_checksum(&[0.0]), layer_checksum(&[-0.0]));
        let a = [0.001f32, -0.002];
        let mut b = a;
        b[1] = f32::from_bits(b[1].to_bits() ^ 1);
        assert_ne!(layer_checksum(&a), layer_checksum(&b));
        assert_eq!(
            rank_checksum([(3, &a[..]), (1, &b[..])]),
            rank_checksum([(1, &b[..]), (3, &a[..])])
        );
        assert_ne!(
            rank_checksum([(1, &a[..])]),
            rank_checksum([(2, &a[..])]),
            "the layer id is part of the combined checksum"
        );
    }
}
