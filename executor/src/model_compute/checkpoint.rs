//! Per-rank checkpoint parts: after a step, each rank writes what only it holds — every stage slot's
//! parameters (its own routed experts under expert parallelism), its ZeRO-1 optimizer shards, the
//! routing bias and the training position — into `<step dir>/rank-<R>/stage-<S>/` through
//! `model::checkpoint::save_part`, and returns the files with their SHA-256 for the coordinator's
//! record; and loads such a part back into the same slots to resume (`load_rank_part`, same
//! parallel layout only). A child module of `model_compute` so it reads the slots without
//! widening their API.
//!
//! Invariant: a part is written atomically (a hidden temporary directory renamed into place with
//! its `manifest.json`); the step directory becomes a checkpoint only when the coordinator has
//! every rank's part and the worker holding rank 0 writes `checkpoint.json` beside the parts.

use std::path::Path;

use model::checkpoint::{FORMAT, STATE_FILE, TrainingState, load_part, save_part};
use model::train::InitFrom;

use super::ModelCompute;
use super::err;
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
                "expert": self.place.expert,
                "schedule": self.kind.to_string(),
                "bias_version": self.bias_version,
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

    /// Loads this rank's part of the committed checkpoint in `step_dir` (written by
    /// [`Self::save_rank_part`] after `steps_done` completed steps) into every stage slot:
    /// parameters, both ZeRO-1 optimizer shards, the routing bias and the training position
    /// (step, tokens seen), each file checked against its part's SHA-256 first. The next step
    /// this rank runs is `steps_done`, on the same data the uninterrupted run would sample.
    ///
    /// The part must have been written with this rank's parallel layout (pipeline, data and
    /// expert degrees, schedule, this rank's position): anything else is refused with the
    /// mismatch named; resharding a checkpoint onto another layout is not supported. On an error
    /// the slots may be partly loaded, and the compute must not be used.
    pub fn load_rank_part(
        &mut self,
        step_dir: &Path,
        rank: u32,
        steps_done: u64,
    ) -> Result<(), ComputeError> {
        let mine: Vec<u32> = self.slots.iter().map(|s| s.stage_index).collect();
        check_rank_part(step_dir, rank, steps_done, &self.place, self.kind, &mine)?;
        let rank_dir = step_dir.join(format!("rank-{rank}"));
        let mut loaded = None;
        for slot in &mut self.slots {
            let dir = rank_dir.join(format!("stage-{}", slot.stage_index));
            let mut bias = self.bias.clone();
            let state = load_part(
                &dir,
                &mut slot.params,
                &mut bias,
                &mut [&mut slot.opt, &mut slot.expert_opt],
            )
            .map_err(|e| {
                err(format!(
                    "loading the checkpoint part {}: {e}",
                    dir.display()
                ))
            })?;
            check_part_state(&state, &dir, steps_done, rank, &self.place, self.kind)?;
            loaded = Some((state, bias));
        }
        let Some((state, bias)) = loaded else {
            return Err(err(format!("rank {rank} holds no stage to load")));
        };
        if state.data_seed != self.opts.data_seed {
            return Err(err(format!(
                "the checkpoint in {} was trained on data seed {}, this job samples with seed {}",
                rank_dir.display(),
                state.data_seed,
                self.opts.data_seed
            )));
        }
        self.bias = bias;
        self.bias_version = state
            .extra
            .get("bias_version")
            .and_then(serde_json::Value::as_u64);
        self.step = state.step;
        self.tokens_seen = state.tokens_seen;
        // The parameters changed: prepared bf16/FP8 weights are stale.
        self.rt.weights_changed();
        Ok(())
    }
}

/// Checks, without reading any tensor, that `step_dir` holds a part of `rank` written after
/// `steps_done` steps with this parallel layout: `rank-<rank>/` has exactly one `stage-<S>`
/// directory per stage in `stages`, and each part's `training_state.json` names the same step,
/// rank, degrees, position and schedule. Cheap enough to run before a worker accepts an
/// assignment; the checksums are verified when the part is loaded ([`ModelCompute::load_rank_part`]).
pub fn check_rank_part(
    step_dir: &Path,
    rank: u32,
    steps_done: u64,
    place: &super::Placement,
    kind: plan::schedule::ScheduleKind,
    stages: &[u32],
) -> Result<(), ComputeError> {
    let rank_dir = step_dir.join(format!("rank-{rank}"));
    let entries = std::fs::read_dir(&rank_dir).map_err(|e| {
        err(format!(
            "{}: {e} (the checkpoint holds no part of rank {rank})",
            rank_dir.display()
        ))
    })?;
    let mut on_disk = Vec::new();
    for ent in entries {
        let ent = ent.map_err(|e| err(format!("{}: {e}", rank_dir.display())))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if let Some(s) = name
            .strip_prefix("stage-")
            .and_then(|s| s.parse::<u32>().ok())
        {
            on_disk.push(s);
        }
    }
    on_disk.sort_unstable();
    let mut mine = stages.to_vec();
    mine.sort_unstable();
    if on_disk != mine {
        return Err(err(format!(
            "{} holds stages {on_disk:?}, but rank {rank} holds stages {mine:?} under {kind} on {} pipeline ranks: the checkpoint was written with another parallel layout (resharding is not supported)",
            rank_dir.display(),
            place.pipeline
        )));
    }
    for s in mine {
        let dir = rank_dir.join(format!("stage-{s}"));
        let path = dir.join(STATE_FILE);
        let text =
            std::fs::read_to_string(&path).map_err(|e| err(format!("{}: {e}", path.display())))?;
        let state: TrainingState =
            serde_json::from_str(&text).map_err(|e| err(format!("{}: {e}", path.display())))?;
        check_part_state(&state, &dir, steps_done, rank, place, kind)?;
    }
    Ok(())
}

/// Checks a loaded part's training state against the step the job resumes after and this rank's
/// place in the parallel layout, naming the first mismatch.
fn check_part_state(
    state: &TrainingState,
    dir: &Path,
    steps_done: u64,
    rank: u32,
    place: &super::Placement,
    kind: plan::schedule::ScheduleKind,
) -> Result<(), ComputeError> {
    if state.step != steps_done || state.data_step != steps_done {
        return Err(err(format!(
            "{}: the part was written after {} steps (data position {}), the job resumes after {steps_done}",
            dir.display(),
            state.step,
            state.data_step
        )));
    }
    let field = |name: &str| state.extra.get(name).and_then(serde_json::Value::as_u64);
    let expected = [
        ("rank", u64::from(rank)),
        ("pipeline", u64::from(place.pipeline)),
        ("data", u64::from(place.data)),
        ("expert", u64::from(place.expert)),
        ("pipe_rank", u64::from(place.pipe_rank)),
        ("replica", u64::from(place.replica)),
    ];
    for (name, want) in expected {
        match field(name) {
            Some(got) if got != want => {
                return Err(err(format!(
                    "{}: the part was written with {name} {got}, this rank has {name} {want}: the checkpoint's parallel layout differs (resharding is not supported)",
                    dir.display()
                )));
            }
            // Parts written before the field existed are checked by their tensor layout only.
            None if name == "expert" => {}
            None => {
                return Err(err(format!(
                    "{}: training_state.json has no `{name}`; not a distributed checkpoint part",
                    dir.display()
                )));
            }
            Some(_) => {}
        }
    }
    if let Some(got) = state
        .extra
        .get("schedule")
        .and_then(serde_json::Value::as_str)
        && got != kind.to_string()
    {
        return Err(err(format!(
            "{}: the part was written under the {got} schedule, this job runs {kind} (its stages differ; resharding is not supported)",
            dir.display()
        )));
    }
    Ok(())
}
