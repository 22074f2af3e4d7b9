//! Loss terms: main next-token cross-entropy, the MTP term λ/D·Σ_k CE_k and the sequence-wise balance loss
//! (computed inside each MoE layer, see `layers::moe`).
//!
//! Invariant: every cross-entropy is a mean over the positions that have a target (main: T−1 per
//! sequence; MTP depth k: T−k−1), and the gradient written for the logits is exactly the derivative of
//! `loss_scale · (weight · that mean)`.

use kernels::Real;

/// Coefficients of the auxiliary terms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossWeights {
    /// λ of the MTP term (0.3 early in V3 training).
    pub mtp_lambda: f64,
    /// α of the sequence-wise balance loss (1e-4 in V3).
    pub balance_alpha: f64,
}

impl Default for LossWeights {
    fn default() -> Self {
        Self {
            mtp_lambda: 0.3,
            balance_alpha: 1e-4,
        }
    }
}

/// Loss values of one micro-batch (or their sum over pipeline stages).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LossTerms {
    /// Main cross-entropy (mean over positions).
    pub main: f64,
    /// MTP cross-entropy per depth, unweighted.
    pub mtp: Vec<f64>,
    /// Balance loss summed over the MoE layers this value covers (α included).
    pub balance: f64,
    /// main + λ/D·Σ mtp + balance.
    pub total: f64,
}

impl LossTerms {
    /// Adds another stage's terms (main and MTP come from the last stage only).
    pub fn add(&mut self, other: &LossTerms) {
        self.main += other.main;
        if self.mtp.len() < other.mtp.len() {
            self.mtp.resize(other.mtp.len(), 0.0);
        }
        for (a, b) in self.mtp.iter_mut().zip(&other.mtp) {
            *a += b;
        }
        self.balance += other.balance;
        self.total += other.total;
    }
}

/// Targets for the rows of a [b, t_rows] logits block predicting `shift` tokens ahead of position i:
/// row (b, i) → tokens[b, i + shift] when i + shift < t_full.
pub fn shifted_targets(
    tokens: &[u32],
    b: usize,
    t_full: usize,
    t_rows: usize,
    shift: usize,
) -> Vec<Option<u32>> {
    let mut out = Vec::with_capacity(b * t_rows);
    for bi in 0..b {
        for i in 0..t_rows {
            out.push((i + shift < t_full).then(|| tokens[bi * t_full + i + shift]));
        }
    }
    out
}

/// Mean cross-entropy over rows with targets, and dlogits = loss_scale·weight·∂mean/∂logits.
pub fn mean_ce<T: Real>(
    logits: &[T],
    targets: &[Option<u32>],
    vocab: usize,
    weight_times_scale: f64,
) -> (f64, Vec<T>) {
    let count = targets.iter().filter(|t| t.is_some()).count().max(1);
    let mut d = vec![T::ZERO; logits.len()];
    let (sum, _) = crate::ops::cross_entropy(
        logits,
        targets,
        vocab,
        Some((&mut d, weight_times_scale / count as f64)),
    );
    (sum / count as f64, d)
}
