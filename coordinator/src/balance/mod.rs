//! MoE load balancing owned by the coordinator (issue 7, v3-spec §2.2): the routing-bias ledger
//! that sums every holder's per-expert counts for a step and applies the auxiliary-loss-free sign
//! rule, the bias checksums that prove every holder routes with the same bits, and the conversion
//! to and from the wire messages (`StepReport.expert_counts`, `BiasUpdate`, and the
//! `LedgerSnapshot` a job record or a committed checkpoint keeps, from which
//! `BiasLedger::restore_snapshot` rebuilds a ledger bit for bit).
//!
//! Invariant: everything here is pure (no IO, no clock, no randomness). The new bias depends only
//! on the previous bias, the integer counts of the step (exact `u64` sums, so the arrival order of
//! the reports cannot change a bit), γ from the schedule and the variant — the same function the
//! single-process trainer applies (`model::balance::update_routing_bias`, which this crate must not
//! link; both call `routing::apply_sign_rule`, and `executor/tests/balance.rs` shows both give the
//! same bits). The sign rule, the γ schedule and the checksums are re-exported from `routing`.

mod ledger;
mod wire;

pub use ledger::{
    BalanceConfig, BiasBroadcast, BiasLedger, LayerCounts, LayerHolders, LayerSummary, LedgerState,
    StepSummary, presum,
};
pub use routing::{GammaSchedule, UpdateVariant, apply_sign_rule, layer_checksum, rank_checksum};
pub use wire::{
    bias_update_message, counts_from_report, layers_from_update, snapshot_message,
    state_from_snapshot,
};

/// Why the ledger refused a report, a checksum or a configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BalanceError {
    /// The layer/holder configuration is inconsistent.
    #[error("invalid balance config: {0}")]
    Config(String),
    /// A rank that holds no MoE layer sent counts or checksums.
    #[error("rank {rank} holds no MoE layer's gate, but reported for step {step}")]
    UnknownRank {
        /// The reporting rank.
        rank: u32,
        /// The step it reported.
        step: u64,
    },
    /// A report for a step the ledger already finished.
    #[error(
        "rank {rank} reported step {step}, but the ledger already finished it (collecting step {expected})"
    )]
    Stale {
        /// The reporting rank.
        rank: u32,
        /// The step it reported.
        step: u64,
        /// The step the ledger collects.
        expected: u64,
    },
    /// A report for a step whose predecessor is not finished.
    #[error("rank {rank} reported step {step} before step {expected} was complete")]
    Ahead {
        /// The reporting rank.
        rank: u32,
        /// The step it reported.
        step: u64,
        /// The step the ledger collects.
        expected: u64,
    },
    /// The rank already reported this step.
    #[error("rank {rank} reported step {step} twice")]
    Duplicate {
        /// The reporting rank.
        rank: u32,
        /// The step.
        step: u64,
    },
    /// The report's layers, or one layer's expert count, do not match what the rank holds.
    #[error("rank {rank}, step {step}: {what}")]
    Shape {
        /// The reporting rank.
        rank: u32,
        /// The step.
        step: u64,
        /// What was wrong (names the layer).
        what: String,
    },
    /// A holder's bias differs from the ledger's: routing has diverged and the job must fail.
    #[error(
        "bias checksum mismatch at step {step}: rank {rank}, layer {layer}: expected {expected:#018x}, got {got:#018x}"
    )]
    ChecksumMismatch {
        /// The step whose bias the rank used.
        step: u64,
        /// The rank holding the wrong bias.
        rank: u32,
        /// The MoE layer (u32::MAX for the rank's combined checksum).
        layer: u32,
        /// The checksum of the ledger's bias.
        expected: u64,
        /// The checksum the rank reported.
        got: u64,
    },
    /// A summed count does not fit the wire type.
    #[error("step {step}, layer {layer}: the summed count of expert {expert} overflows u64")]
    Overflow {
        /// The step.
        step: u64,
        /// The layer.
        layer: u32,
        /// The expert.
        expert: usize,
    },
}
