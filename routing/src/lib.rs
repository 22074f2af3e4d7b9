//! The routing-bias rules every party of a job shares (v3-spec §2.2, issue 7): the
//! auxiliary-loss-free sign update, the γ schedule, and the checksums that prove two holders of a
//! layer route with bit-identical bias. The single-process trainer (`model::balance`), the
//! coordinator's ledger (`coordinator::balance`) and the worker all call these functions, so the
//! rule cannot drift between them.
//!
//! Invariant: pure and dependency-free. Every result is a function of the arguments' bits only (no
//! IO, no clock, no platform-dependent float paths: the sign comparison is exact integer
//! arithmetic, the checksum reads `f32::to_bits` in little-endian order).
//!
//! # The checksum a worker reports
//! `StepReport.bias_checksum` of rank `r` for step `s` is
//! `rank_checksum(layers)` where `layers` holds one `(layer id, bias)` pair for **every MoE layer
//! whose gate rank `r` routes with** — the MoE layers of every pipeline stage the rank holds (both
//! stages under DualPipe), MTP layers included (numbered from `num_hidden_layers`, on the last
//! stage), as given by `plan::layers` — each layer **once** even if two of the rank's stages
//! share it, and `bias` is the exact f32 bias the rank routed step `s` with (the one computed
//! after step `s − 1`, or the initial bias for the first step, all zeros unless restored from a
//! checkpoint). The pairs may be passed in any order: `rank_checksum` sorts them by layer id, then
//! runs 64-bit FNV-1a over, per layer, the id as `u32` little-endian followed by each value's
//! `to_bits()` as `u32` little-endian. `StepReport.bias_step` is the step the bias was computed
//! after, i.e. `s − 1` (`s = 0` reports `bias_step = 0` with the initial bias; the coordinator
//! checks the checksum, which differs between the initial bias and any updated one).
//! A rank that holds no MoE layer reports `rank_checksum([])` (the FNV offset basis).

use std::cmp::Ordering;

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

/// The checksum of one layer's bias: 64-bit FNV-1a over each value's bits (u32 little-endian).
/// −0.0 and 0.0, or two NaN payloads, differ on purpose: holders must agree bit for bit.
pub fn layer_checksum(bias: &[f32]) -> u64 {
    fnv_f32(FNV_OFFSET, bias)
}

/// One checksum over every layer a rank holds (`StepReport.bias_checksum`; see the crate docs for
/// which layers): FNV-1a over, for each layer in ascending id order, the layer id (u32 LE)
/// followed by its bias bits. The caller passes the layers in any order; they are sorted here.
pub fn rank_checksum<'a>(layers: impl IntoIterator<Item = (u32, &'a [f32])>) -> u64 {
    let mut v: Vec<(u32, &[f32])> = layers.into_iter().collect();
    v.sort_by_key(|(l, _)| *l);
    v.into_iter().fold(FNV_OFFSET, |h, (layer, bias)| {
        fnv_f32(fnv_bytes(h, &layer.to_le_bytes()), bias)
    })
}

/// How the sign update is applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UpdateVariant {
    /// `b_i ← b_i + γ·sign(mean − load_i)`, sign(0) = 0 (DeepSeek-V3).
    #[default]
    Sign,
    /// The sign update, then the mean of the layer's updated bias subtracted (torchtitan's
    /// variant: selection depends only on differences, so it is unchanged).
    SignMeanSubtracted,
}

/// Applies one step of the sign rule to one layer: `load[i]` is the number of (token, expert)
/// assignments to expert `i` over the whole step (every micro-batch of every replica). The
/// comparison with the mean is exact (`n·load_i` against `Σ load`, in u128), so it never depends
/// on float rounding. γ = 0 or an empty bias leaves the bias untouched. The caller guarantees
/// `bias.len() == load.len()`; extra entries of the longer slice are ignored.
pub fn apply_sign_rule(bias: &mut [f32], load: &[u64], gamma: f32, variant: UpdateVariant) {
    if bias.is_empty() || gamma == 0.0 {
        return;
    }
    let n = load.len() as u128;
    let total: u128 = load.iter().map(|&l| u128::from(l)).sum();
    for (b, &l) in bias.iter_mut().zip(load) {
        let sign = match total.cmp(&(u128::from(l) * n)) {
            Ordering::Greater => 1.0,
            Ordering::Less => -1.0,
            Ordering::Equal => 0.0,
        };
        *b += gamma * sign;
    }
    if variant == UpdateVariant::SignMeanSubtracted {
        let mean = (bias.iter().map(|&b| f64::from(b)).sum::<f64>() / bias.len() as f64) as f32;
        for b in bias.iter_mut() {
            *b -= mean;
        }
    }
}

/// The bias update speed γ: `rate` until `until_tokens` tokens were trained on, then 0 (frozen).
/// V3: 0.001, then 0 for the last 500B tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GammaSchedule {
    /// γ while active.
    pub rate: f32,
    /// Trained tokens after which γ is 0; `None` keeps γ = rate forever.
    pub until_tokens: Option<u64>,
}

impl GammaSchedule {
    /// γ for a step that starts after `tokens_seen` tokens.
    pub fn gamma(&self, tokens_seen: u64) -> f32 {
        match self.until_tokens {
            Some(limit) if tokens_seen >= limit => 0.0,
            _ => self.rate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors_and_bit_sensitivity() {
        // FNV-1a of the empty input is the offset basis; of the single byte 'a' the published value.
        assert_eq!(layer_checksum(&[]), FNV_OFFSET);
        assert_eq!(rank_checksum(std::iter::empty()), FNV_OFFSET);
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

    #[test]
    fn rank_checksum_is_the_documented_byte_stream() {
        // Layer 7 with bias [1.0]: FNV-1a over 07 00 00 00, then 00 00 80 3f.
        let want = fnv_bytes(FNV_OFFSET, &[7, 0, 0, 0, 0x00, 0x00, 0x80, 0x3f]);
        assert_eq!(rank_checksum([(7, &[1.0f32][..])]), want);
    }

    #[test]
    fn sign_rule_is_exact_and_gamma_schedule_freezes() {
        // Loads 6, 2, 4, 4: mean 4 → −γ, +γ, 0, 0.
        let mut b = [0.0f32, 0.5, -0.25, 1.0];
        apply_sign_rule(&mut b, &[6, 2, 4, 4], 0.001, UpdateVariant::Sign);
        assert_eq!(b, [-0.001, 0.501, -0.25, 1.0]);
        // A mean that is not an integer: loads 1, 2 (mean 1.5) move both.
        let mut b = [0.0f32, 0.0];
        apply_sign_rule(&mut b, &[1, 2], 0.5, UpdateVariant::Sign);
        assert_eq!(b, [0.5, -0.5]);
        // Loads 6, 2, 0, 0 (mean 2) → −1, 0, +1, +1, minus their mean 0.25.
        let mut b = [0.0f32; 4];
        apply_sign_rule(
            &mut b,
            &[6, 2, 0, 0],
            1.0,
            UpdateVariant::SignMeanSubtracted,
        );
        assert_eq!(b, [-1.25, -0.25, 0.75, 0.75]);
        let g = GammaSchedule {
            rate: 1e-3,
            until_tokens: Some(1000),
        };
        assert_eq!((g.gamma(999), g.gamma(1000)), (1e-3, 0.0));
        let mut b = [0.25f32, 0.0];
        apply_sign_rule(&mut b, &[10, 0], g.gamma(5000), UpdateVariant::Sign);
        assert_eq!(b, [0.25, 0.0]);
    }
}
