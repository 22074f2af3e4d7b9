//! DualPipeV ("cut-in-half" DualPipe): `P` ranks, `2P` stages in a V. Rank `r` holds stage `r` (chunk
//! direction 0, the way down) and stage `2P − 1 − r` (direction 1, the way back up). Every micro-batch
//! enters at rank 0, turns around locally on rank `P − 1` and ends with the loss on rank 0.
//!
//! Invariant: the op order, including where each send and receive is posted, is exactly that of
//! `DualPipeV.step()` in deepseek-ai/DualPipe for every valid `(P, N)` (v3-spec §5.6).

use super::emit::{Emitter, bidirectional_phases};
use super::{Schedule, ScheduleError, ScheduleKind};

/// Checks DualPipeV's size rules: `P >= 1` and `N >= 2P` (no evenness requirement).
pub fn validate(ranks: u32, microbatches: u32) -> Result<(), ScheduleError> {
    let kind = ScheduleKind::DualPipeV;
    if ranks == 0 {
        return Err(ScheduleError::InvalidRanks {
            kind,
            ranks,
            rule: "DualPipeV needs at least 1 rank",
        });
    }
    if microbatches < 2 * ranks {
        return Err(ScheduleError::InvalidMicrobatches {
            kind,
            ranks,
            microbatches,
            rule: "DualPipeV needs N >= 2P micro-batches",
        });
    }
    Ok(())
}

/// Generates the DualPipeV schedule for `ranks` pipeline ranks and `microbatches` micro-batches.
pub fn dualpipev(ranks: u32, microbatches: u32) -> Result<Schedule, ScheduleError> {
    validate(ranks, microbatches)?;
    let ops = (0..ranks)
        .map(|r| {
            let mut e = Emitter::new(ScheduleKind::DualPipeV, ranks, r, [0, 0], false);
            bidirectional_phases(&mut e, ranks, r, microbatches, r + 1 == ranks);
            e.finish()
        })
        .collect();
    Ok(Schedule {
        kind: ScheduleKind::DualPipeV,
        ranks,
        microbatches,
        ops,
    })
}
