//! Parts of checkpoints that were never committed, left behind by an attempt of a job that failed
//! and was restarted by the coordinator (`spec.faultTolerance.restartBudget`): the next attempt
//! writes the same step directories again, and a checkpoint part is never overwritten in place.
//!
//! Invariant: only a rank's own part (`<step dir>/rank-<R>/`) is removed, and only from a step
//! directory without `checkpoint.json` — a committed checkpoint is never touched.

use std::path::Path;

use tracing::warn;

/// Removes rank `rank`'s part in `step_dir` when the step directory was never committed (no
/// `checkpoint.json`), so this attempt can write it again. A committed step directory is left as
/// it is (writing into it then fails, naming it). The error names the path.
pub(crate) fn clear_uncommitted_part(step_dir: &Path, rank: u32) -> Result<(), String> {
    let part = step_dir.join(format!("rank-{rank}"));
    if step_dir.join("checkpoint.json").exists() || !part.exists() {
        return Ok(());
    }
    warn!(dir = %part.display(),
        "removing this rank's part of a checkpoint that was never committed (left by an earlier attempt of the job)");
    std::fs::remove_dir_all(&part).map_err(|e| {
        format!(
            "removing the uncommitted checkpoint part {}: {e}",
            part.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_uncommitted_parts_of_this_rank_are_removed() {
        let root = std::env::temp_dir().join(format!("moetrain-stale-{}", std::process::id()));
        let step = root.join("step-00000004");
        for r in 0..2 {
            std::fs::create_dir_all(step.join(format!("rank-{r}/stage-{r}"))).unwrap();
        }
        clear_uncommitted_part(&step, 1).unwrap();
        assert!(!step.join("rank-1").exists());
        assert!(
            step.join("rank-0/stage-0").exists(),
            "other ranks' parts stay"
        );
        // Nothing to remove is fine.
        clear_uncommitted_part(&step, 1).unwrap();
        clear_uncommitted_part(&root.join("step-00000006"), 0).unwrap();
        // A committed checkpoint is never touched.
        std::fs::write(step.join("checkpoint.json"), "{}").unwrap();
        clear_uncommitted_part(&step, 0).unwrap();
        assert!(step.join("rank-0/stage-0").exists());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
