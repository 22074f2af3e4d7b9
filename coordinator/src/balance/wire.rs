//! Conversion between the ledger's values and the wire messages: `StepReport.expert_counts`
//! in, `BiasUpdate` out, and the `LedgerSnapshot` the store record and checkpoints keep. No
//! validation happens here; the ledger validates what it ingests or restores.
//!
//! Invariant: f32 values cross the wire (and the store) as protobuf `float` (their exact bits), so
//! a holder installs bit-for-bit the bias the ledger computed, and a ledger restored from a
//! snapshot has the checksums it had when the snapshot was taken.

use proto::pb;

use super::BalanceError;
use super::ledger::{BiasBroadcast, BiasLedger, LayerCounts, LedgerState};

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

/// The wire form of a ledger state.
pub fn snapshot_message(state: &LedgerState) -> pb::LedgerSnapshot {
    pb::LedgerSnapshot {
        after_step: state.after_step,
        tokens_seen: state.tokens_seen,
        layers: state
            .layers
            .iter()
            .map(|(layer, values)| pb::LayerBias {
                layer: *layer,
                values: values.clone(),
            })
            .collect(),
    }
}

/// The ledger state a snapshot carries (as given; [`BiasLedger::restore`] validates it).
pub fn state_from_snapshot(snapshot: &pb::LedgerSnapshot) -> LedgerState {
    LedgerState {
        after_step: snapshot.after_step,
        tokens_seen: snapshot.tokens_seen,
        layers: snapshot
            .layers
            .iter()
            .map(|l| (l.layer, l.values.clone()))
            .collect(),
    }
}

impl BiasLedger {
    /// The snapshot of the ledger after the last step it finished (`None` while it holds the
    /// initial bias), as the job record and a committed checkpoint keep it.
    pub fn to_snapshot(&self) -> Option<pb::LedgerSnapshot> {
        self.snapshot().as_ref().map(snapshot_message)
    }

    /// Restores a ledger (built for the job's layout with [`BiasLedger::new`]) from a snapshot:
    /// afterwards it collects `after_step + 1` with the snapshot's bias, bit for bit. A snapshot
    /// of another layout (a layer missing, unknown or twice, another expert count) is refused with
    /// the mismatch named, and the ledger is left as it was.
    pub fn restore_snapshot(&mut self, snapshot: &pb::LedgerSnapshot) -> Result<(), BalanceError> {
        let state = state_from_snapshot(snapshot);
        self.restore(state.after_step, state.tokens_seen, &state.layers)
    }

    /// The `BiasUpdate` of the ledger's current bias for a holder of `layers` (every layer when
    /// `None`), or `None` while it holds the initial bias (no update was ever sent). Re-sent to a
    /// worker whose session resumed, since an update sent while it was away is lost.
    pub fn latest_update(&self, job: &str, layers: Option<&[u32]>) -> Option<pb::BiasUpdate> {
        let state = self.snapshot()?;
        Some(pb::BiasUpdate {
            job: job.to_string(),
            step: state.after_step,
            layers: state
                .layers
                .into_iter()
                .filter(|(l, _)| layers.is_none_or(|w| w.contains(l)))
                .map(|(layer, values)| pb::LayerBias { layer, values })
                .collect(),
        })
    }
}
