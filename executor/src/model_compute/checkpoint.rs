//! Per-rank checkpoint parts: after a step, each rank writes what only it holds — every stage slot's
//! parameters (its own routed experts under expert parallelism), its ZeRO-1 optimizer shards, the
//! routing bias and the training position — into `<step dir>/rank-<R>/stage-<S>/` through
//! `model::checkpoint::save_part`, and returns the files with their SHA-256 for the coordinator's
//! record. A child module of `model_compute` so it reads the slots without widening their API.
//!
//! Invariant: a part is written atomically (a hidden temporary directory renamed into place with
//! its `manifest.json`); the step directory becomes a checkpoint only when the coordinator has
//! every rank's part and the worker holding rank 0 writes `checkpoint.json` beside the parts.

use std::path::Path;

use model::checkpoint::{FORMAT, TrainingState, save_part};
use model::train::InitFrom;

use super::ModelCompute;
use crate::error::ComputeError;

/// One file of a rank's part: path relative to the step directory, size, SHA-256 (hex).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartFile {
    /// Path relative to the step directory, `/`-separated.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Lower-case hex SHA-256.
    pub sha256: String,
}

impl ModelCompute {
    /// Completed optimizer steps (the next step to run has this index).
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// Writes this rank's part of the checkpoint taken after the last completed step into
    /// `step_dir/rank-<rank>/` (one `stage-<S>` directory per slot) and lists its files.
    pub fn save_rank_part(
        &self,
        step_dir: &Path,
        rank: u32,
    ) -> Result<Vec<PartFile>, ComputeError> {
        let seed = match self.opts.init {
            InitFrom::Seed(s) => s,
            _ => 0,
        };
        let state = TrainingState {
            format: FORMAT.to_string(),
            step: self.step,
            tokens_seen: self.tokens_seen,
            data_seed: self.opts.data_seed,
            data_step: self.step,
            init_seed: seed,
            lr: self.opts.lr,
            last_lr: self.opts.lr.lr(self.step.saturating_sub(1)),
            adamw: self.opts.adamw,
            bias_speed: self.opts.bias_speed,
            extra: serde_json::json!({
                "rank": rank,
                "pipeline": self.place.pipeline,
                "data": self.place.data,
                "pipe_rank": self.place.pipe_rank,
                "replica": self.place.replica,
            }),
        };
        let rank_rel = format!("rank-{rank}");
        let mut files = Vec::new();
        for slot in &self.slots {
            let rel = format!("{rank_rel}/stage-{}", slot.stage_index);
            let dir = step_dir.join(&rel);
            let manifest = save_part(
                &dir,
                &self.config,
                &slot.params,
                &self.bias,
                &[&slot.opt, &slot.expert_opt],
                &state,
            )
            .map_err(|e| format!("writing the checkpoint part {}: {e}", dir.display()))?;
            files.extend(manifest.files.into_iter().map(|(name, d)| PartFile {
                path: format!("{rel}/{name}"),
                bytes: d.bytes,
                sha256: d.sha256,
            }));
        }
        Ok(files)
    }
}
