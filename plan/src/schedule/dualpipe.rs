//! DeepSeek's bidirectional DualPipe: `P` ranks, `P` stages, rank `r` holds stage `r` of direction 0
//! (micro-batches `0..N/2`, entering at rank 0) and stage `P − 1 − r` of direction 1 (micro-batches
//! `N/2..N`, entering at rank `P − 1`).
//!
//! Invariant: the op order, including where each send and receive is posted, is exactly that of
//! `DualPipe.step()` in deepseek-ai/DualPipe for every valid `(P, N)` (v3-spec §5.3).

use super::emit::{Emitter, bidirectional_phases};
use super::{Schedule, ScheduleError, ScheduleKind};

/// Checks DualPipe's size rules: `P` even and at least 2; `N` even, positive and at least `2P`.
pub fn validate(ranks: u32, microbatches: u32) -> Result<(), ScheduleError> {
    let kind = ScheduleKind::DualPipe;
    if ranks < 2 || !ranks.is_multiple_of(2) {
        return Err(ScheduleError::InvalidRanks {
            kind,
            ranks,
            rule: "DualPipe needs an even number of ranks, at least 2",
        });
    }
    let bad = |rule| {
        Err(ScheduleError::InvalidMicrobatches {
            kind,
            ranks,
            microbatches,
            rule,
        })
    };
    if !microbatches.is_multiple_of(2) {
        return bad(
            "DualPipe splits the micro-batches into two equal directions, so N must be even",
        );
    }
    if microbatches < 2 * ranks {
        return bad("DualPipe needs N >= 2P micro-batches");
    }
    Ok(())
}

/// Generates the DualPipe schedule for `ranks` pipeline ranks and `microbatches` micro-batches.
pub fn dualpipe(ranks: u32, microbatches: u32) -> Result<Schedule, ScheduleError> {
    validate(ranks, microbatches)?;
    let q = ranks / 2;
    let half = microbatches / 2;
    let ops = (0..ranks)
        .map(|r| {
            let h = r.min(ranks - 1 - r);
            let middle = r + 1 == q || r == q;
            let mut e = Emitter::new(ScheduleKind::DualPipe, ranks, r, [0, half], r >= q);
            bidirectional_phases(&mut e, q, h, half, middle);
            e.finish()
        })
        .collect();
    Ok(Schedule {
        kind: ScheduleKind::DualPipe,
        ranks,
        microbatches,
        ops,
    })
}
