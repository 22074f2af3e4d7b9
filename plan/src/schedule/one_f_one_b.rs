//! Classic 1F1B (PipeDream-flush): `P` ranks, `P` stages, rank `r` runs `min(P − 1 − r, N)` warm-up
//! forwards, then alternates one forward and one full backward, then drains the remaining backwards.
//!
//! Invariant: each rank holds at most `P − r` micro-batches' activations, and transfers follow the
//! same batching rule as DualPipe (a forward's output is posted with the next op's receives).

use super::emit::Emitter;
use super::{Schedule, ScheduleError, ScheduleKind};

/// Checks 1F1B's size rules: at least one rank and one micro-batch.
pub fn validate(ranks: u32, microbatches: u32) -> Result<(), ScheduleError> {
    let kind = ScheduleKind::OneFOneB;
    if ranks == 0 {
        return Err(ScheduleError::InvalidRanks {
            kind,
            ranks,
            rule: "1F1B needs at least 1 rank",
        });
    }
    if microbatches == 0 {
        return Err(ScheduleError::InvalidMicrobatches {
            kind,
            ranks,
            microbatches,
            rule: "1F1B needs N >= 1",
        });
    }
    Ok(())
}

/// Generates the 1F1B schedule for `ranks` pipeline ranks and `microbatches` micro-batches.
pub fn one_f_one_b(ranks: u32, microbatches: u32) -> Result<Schedule, ScheduleError> {
    validate(ranks, microbatches)?;
    let ops = (0..ranks)
        .map(|r| {
            let warmup = (ranks - 1 - r).min(microbatches);
            let mut e = Emitter::new(ScheduleKind::OneFOneB, ranks, r, [0, 0], false);
            for _ in 0..warmup {
                e.forward(0, true, true);
            }
            for _ in 0..microbatches - warmup {
                e.forward(0, true, true);
                e.backward(0, false, true, true);
            }
            for _ in 0..warmup {
                e.backward(0, false, true, true);
            }
            e.finish()
        })
        .collect();
    Ok(Schedule {
        kind: ScheduleKind::OneFOneB,
        ranks,
        microbatches,
        ops,
    })
}
