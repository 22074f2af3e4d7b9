//! The auxiliary-loss-free routing-bias update (v3-spec §2.2) as a pure function of one layer's expert loads.
//!
//! Invariant: the new bias depends only on the old bias, the integer loads summed over every micro-batch and
//! data-parallel replica of the step, γ and the variant, so every holder of a layer's gate computes the same
//! bits from the same counts. The bias is never touched by gradients or the optimizer. The rule and the bias
//! checksums live in the dependency-free `routing` crate, which the coordinator and the worker call too.

/// How the sign update is applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BiasUpdateVariant {
    /// `b_i ← b_i + γ · sign(mean − load_i)`, sign(0) = 0 (the DeepSeek-V3 rule).
    #[default]
    Sign,
    /// The sign update followed by subtracting the mean of the layer's updated bias, which keeps the biases
    /// centred at zero without changing which experts are selected (selection depends only on differences).
    SignMeanSubtracted,
}

/// Applies one step of the bias update to one MoE layer. `load[i]` is the number of (token, expert) assignments
/// to expert `i` over the whole step. Panics if the lengths differ (a caller bug). The rule itself is
/// `routing::apply_sign_rule`, shared with the coordinator's ledger and the worker.
pub fn update_routing_bias(bias: &mut [f32], load: &[u64], gamma: f32, variant: BiasUpdateVariant) {
    assert_eq!(bias.len(), load.len(), "one load counter per routed expert");
    routing::apply_sign_rule(bias, load, gamma, variant.into());
}

impl From<BiasUpdateVariant> for routing::UpdateVariant {
    fn from(v: BiasUpdateVariant) -> Self {
        match v {
            BiasUpdateVariant::Sign => routing::UpdateVariant::Sign,
            BiasUpdateVariant::SignMeanSubtracted => routing::UpdateVariant::SignMeanSubtracted,
        }
    }
}

pub use routing::{layer_checksum, rank_checksum};

/// Summary of one layer's load in one step, for logs and summary.json.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoadStats {
    /// Largest per-expert load.
    pub max: u64,
    /// Mean per-expert load.
    pub mean: f64,
}

impl LoadStats {
    /// Max and mean of `load`; both zero for an empty slice.
    pub fn of(load: &[u64]) -> LoadStats {
        let max = load.iter().copied().max().unwrap_or(0);
        let mean = if load.is_empty() {
            0.0
        } else {
            load.iter().map(|&l| l as f64).sum::<f64>() / load.len() as f64
        };
        LoadStats { max, mean }
    }

    /// max / mean (1.0 is perfectly balanced); 0 when nothing was routed.
    pub fn imbalance(&self) -> f64 {
        if self.mean == 0.0 {
            0.0
        } else {
            self.max as f64 / self.mean
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_rule_moves_toward_balance_and_leaves_the_mean_alone() {
        // Loads 6, 2, 4, 4: mean 4, so expert 0 is overloaded, 1 underloaded, 2 and 3 exactly at the mean.
        let mut b = [0.0f32, 0.5, -0.25, 1.0];
        update_routing_bias(&mut b, &[6, 2, 4, 4], 0.001, BiasUpdateVariant::Sign);
        assert_eq!(b, [-0.001, 0.501, -0.25, 1.0]);
        // A mean that is not an integer: loads 1, 2 (mean 1.5) move both.
        let mut b = [0.0f32, 0.0];
        update_routing_bias(&mut b, &[1, 2], 0.5, BiasUpdateVariant::Sign);
        assert_eq!(b, [0.5, -0.5]);
        // γ = 0 freezes the bias.
        let mut b = [0.25f32, 0.0];
        update_routing_bias(&mut b, &[10, 0], 0.0, BiasUpdateVariant::Sign);
        assert_eq!(b, [0.25, 0.0]);
    }

    #[test]
    fn mean_subtracted_variant_centres_the_bias() {
        let mut b = [0.0f32, 0.0, 0.0];
        // Loads 5, 1, 0: mean 2 → signs −1, +1, +1 → bias −γ, γ, γ → minus mean γ/3.
        update_routing_bias(
            &mut b,
            &[5, 1, 0],
            0.3,
            BiasUpdateVariant::SignMeanSubtracted,
        );
        let expect = [-0.3 - 0.1, 0.3 - 0.1, 0.3 - 0.1];
        for (x, e) in b.iter().zip(expect) {
            assert!((x - e).abs() < 1e-7, "{b:?}");
        }
        assert!(b.iter().sum::<f32>().abs() < 1e-7);
    }

    #[test]
    fn load_stats() {
        let s = LoadStats::of(&[6, 2, 4, 4]);
        assert_eq!(s, LoadStats { max: 6, mean: 4.0 });
        assert_eq!(s.imbalance(), 1.5);
        assert_eq!(LoadStats::of(&[]).imbalance(), 0.0);
    }
}
