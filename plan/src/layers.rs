//! Which MoE layers a pipeline stage (and so a rank) routes with: the one rule the executor, the
//! worker and the coordinator's bias ledger share (issue 7).
//!
//! Invariant: decoder layers are split contiguously and as evenly as possible over the stages,
//! the first stages taking the remainder (a stage may be empty); the LAST stage also holds the MTP
//! modules, numbered `num_hidden_layers, num_hidden_layers + 1, …`; a layer `l` is MoE exactly
//! when `l ≥ first_k_dense_replace` and `l % moe_layer_freq == 0` (the HF rule `arch` applies,
//! MTP ids included). Pure: a function of its arguments.

use std::ops::Range;

/// The layer counts of a model that decide where its MoE layers are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerLayout {
    /// Decoder layers L (MTP modules not included).
    pub num_hidden_layers: u32,
    /// Leading dense layers.
    pub first_k_dense_replace: u32,
    /// A layer at or past the dense prefix is MoE when its id is a multiple of this (1 for V3;
    /// 0 is read as 1).
    pub moe_layer_freq: u32,
    /// MTP modules trained (depth D), held by the last stage.
    pub mtp_depth: u32,
}

impl LayerLayout {
    /// Whether layer `layer` (MTP ids ≥ `num_hidden_layers`) routes tokens to experts.
    pub fn is_moe(&self, layer: u32) -> bool {
        layer >= self.first_k_dense_replace && layer.is_multiple_of(self.moe_layer_freq.max(1))
    }

    /// Every MoE layer of the model, ascending, MTP included.
    pub fn moe_layers(&self) -> Vec<u32> {
        (0..self.num_hidden_layers + self.mtp_depth)
            .filter(|&l| self.is_moe(l))
            .collect()
    }

    /// The MoE layers stage `stage` of `stages` routes with, ascending; empty for a stage out of
    /// range or zero stages.
    pub fn stage_moe_layers(&self, stages: u32, stage: u32) -> Vec<u32> {
        if stage >= stages {
            return Vec::new();
        }
        let mut v: Vec<u32> = stage_decoder_layers(self.num_hidden_layers, stages, stage)
            .filter(|&l| self.is_moe(l))
            .collect();
        if stage == stages - 1 {
            let mtp = self.num_hidden_layers..self.num_hidden_layers + self.mtp_depth;
            v.extend(mtp.filter(|&l| self.is_moe(l)));
        }
        v
    }

    /// The MoE layers a rank holding `rank_stages` (two under DualPipe) routes with: the union,
    /// ascending, each layer once.
    pub fn rank_moe_layers(&self, stages: u32, rank_stages: &[u32]) -> Vec<u32> {
        let mut v: Vec<u32> = rank_stages
            .iter()
            .flat_map(|&s| self.stage_moe_layers(stages, s))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// The decoder layers of stage `stage` out of `stages` for a model of `layers` layers:
/// contiguous, as even as possible, the first `layers % stages` stages one layer longer.
pub fn stage_decoder_layers(layers: u32, stages: u32, stage: u32) -> Range<u32> {
    if stages == 0 || stage >= stages {
        return 0..0;
    }
    let base = layers / stages;
    let extra = layers % stages;
    let start = stage * base + stage.min(extra);
    start..start + base + u32::from(stage < extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V3: LayerLayout = LayerLayout {
        num_hidden_layers: 61,
        first_k_dense_replace: 3,
        moe_layer_freq: 1,
        mtp_depth: 1,
    };

    #[test]
    fn stages_cover_every_layer_once_and_first_stages_take_the_remainder() {
        for (layers, stages) in [(61, 16), (4, 4), (3, 4), (8, 3), (1, 1)] {
            let mut next = 0;
            for s in 0..stages {
                let r = stage_decoder_layers(layers, stages, s);
                assert_eq!(r.start, next);
                next = r.end;
            }
            assert_eq!(next, layers);
        }
        assert_eq!(stage_decoder_layers(61, 16, 0), 0..4);
        assert_eq!(stage_decoder_layers(61, 16, 12), 48..52);
        assert_eq!(stage_decoder_layers(61, 16, 13), 52..55);
        assert_eq!(stage_decoder_layers(61, 16, 15), 58..61);
        assert_eq!(stage_decoder_layers(3, 4, 3), 3..3);
    }

    #[test]
    fn v3_has_59_moe_layers_and_the_last_stage_holds_mtp() {
        assert_eq!(V3.moe_layers().len(), 59);
        assert_eq!(V3.stage_moe_layers(16, 0), vec![3]);
        assert_eq!(V3.stage_moe_layers(16, 15), vec![58, 59, 60, 61]);
        let all: Vec<u32> = (0..16).flat_map(|s| V3.stage_moe_layers(16, s)).collect();
        assert_eq!(all, V3.moe_layers());
        // DualPipe rank 0 holds stages 0 and 15.
        assert_eq!(V3.rank_moe_layers(16, &[0, 15]), vec![3, 58, 59, 60, 61]);
        assert_eq!(V3.rank_moe_layers(16, &[3, 3]), vec![12, 13, 14, 15]);
        assert!(V3.stage_moe_layers(16, 16).is_empty());
    }

    #[test]
    fn moe_layer_frequency_and_dense_prefix() {
        let l = LayerLayout {
            num_hidden_layers: 6,
            first_k_dense_replace: 1,
            moe_layer_freq: 2,
            mtp_depth: 1,
        };
        assert_eq!(l.moe_layers(), vec![2, 4, 6]);
        assert_eq!(l.stage_moe_layers(2, 0), vec![2]);
        assert_eq!(l.stage_moe_layers(2, 1), vec![4, 6]);
    }
}
