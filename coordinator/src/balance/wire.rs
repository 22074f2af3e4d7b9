//! Conversion between the ledger's values and the worker RPC messages: `StepReport.expert_counts`
//! in, `BiasUpdate` out. No validation happens here; the ledger validates what it ingests.
//!
//! Invariant: f32 values cross the wire as protobuf `float` (their exact bits), so a holder
//! installs bit-for-bit the bias the ledger computed.

use proto::pb;

use super::ledger::{BiasBroadcast, LayerCounts};

/// The per-layer counts of a worker's step report.
pub fn counts_from_report(report: &pb::StepReport) -> Vec<LayerCounts> {
    report
        .expert_counts
        .iter()
        .map(|c| LayerCounts {
            layer: c.layer,
            counts: c.counts.clone(),
        })
        .collect()
}

/// The `BiasUpdate` for a holder of `layers` (all of the broadcast's layers when `layers` is
/// `None`).
pub fn bias_update_message(
    job: &str,
    broadcast: &BiasBroadcast,
    layers: Option<&[u32]>,
) -> pb::BiasUpdate {
    pb::BiasUpdate {
        job: job.to_string(),
        step: broadcast.step,
        layers: broadcast
            .layers
            .iter()
            .filter(|(l, _)| layers.is_none_or(|w| w.contains(l)))
            .map(|(l, b)| pb::LayerBias {
                layer: *l,
                values: b.clone(),
            })
            .collect(),
    }
}

/// The step and (layer, bias) pairs of a received `BiasUpdate`.
pub fn layers_from_update(update: &pb::BiasUpdate) -> (u64, Vec<(u32, Vec<f32>)>) {
    (
        update.step,
        update
            .layers
            .iter()
            .map(|l| (l.layer, l.values.clone()))
            .collect(),
    )
}
