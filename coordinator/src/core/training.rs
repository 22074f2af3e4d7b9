//! What the core does while a job trains (issues 6 and 7): the per-rank op lists of its
//! assignments, step reports folded into per-step summaries and the job's progress, checkpoints
//! committed only when every rank wrote its part, and the routing-bias ledger that turns every
//! holder's expert counts into the next step's bias.
//!
//! Invariants:
//! - A step is finished exactly when every rank of the job reported it; steps finish in order, and
//!   each finished step adds its tokens to the progress once. Duplicate, stale or out-of-range
//!   reports change nothing (they are logged with the reason, never a panic).
//! - The bias ledger sees the reports of step `s` only while it collects `s`; a report that runs
//!   ahead of it waits in its step's pending set. When the ledger finishes a step, the
//!   `BiasUpdate`s go out before any other action of that event for the job.
//! - A rank whose bias checksum differs from the ledger's fails the job at once, with the step,
//!   the rank, the expected and the reported checksum in the reason.
//! - `last_checkpoint` only ever names a step every rank wrote; partial sets stay pending (bounded)
//!   and never become it. Its `CheckpointCommitted` carries the ledger's snapshot after that step,
//!   kept (bounded) from when the ledger finished it, since the ledger may be further by then.
//! - A job resumed from a checkpoint (`JobSpec.resume`, checked by [`check_resume`] on submit)
//!   starts its progress, its ledger and every rank after the checkpoint's step.
//! - The job record written after a finished step holds, with `progress.step = finished`, the
//!   ledger's snapshot after step `finished - 1` (`StoredJob.ledger`; none before the first step).
//!   A coordinator restart rebuilds the ledger from it bit for bit (collecting step `finished`);
//!   the workers re-send their reports from `finished` on (`HeldRank.next_step`), so the ledger
//!   recomputes, bit for bit, any bias it had sent before the restart. A running MoE job whose
//!   snapshot is missing or does not fit its layout fails on its first holder's return, with the
//!   reason naming what is wrong. Only the step history is lost on a restart.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use plan::layers::LayerLayout;
use plan::schedule::ScheduleKind;
use proto::pb;

use super::{Action, Core, CoreError, UnixMs, msg};
use crate::balance::{
    BalanceConfig, BiasBroadcast, BiasLedger, GammaSchedule, LayerHolders, LayerSummary,
    UpdateVariant, bias_update_message, counts_from_report, rank_checksum,
};

/// Finished steps kept per job for `JobSteps` (about 100 bytes each without MoE telemetry).
pub const STEP_HISTORY: usize = 100_000;
/// How far past the last finished step a report may run before it is refused as out of range.
pub const MAX_STEPS_AHEAD: u64 = 64;
/// Partial checkpoints kept pending per job; older ones are dropped.
pub const MAX_PENDING_CHECKPOINTS: usize = 8;
/// Ledger snapshots kept per job for checkpoints not committed yet (one per checkpoint step the
/// ledger finished; the ledger may finish a step before its checkpoint's last part arrives).
pub const MAX_LEDGER_SNAPSHOTS: usize = MAX_PENDING_CHECKPOINTS;

/// One step that not every rank has reported yet.
#[derive(Debug, Default)]
struct PendingStep {
    /// Ranks that reported it.
    ranks: BTreeSet<u32>,
    /// The lowest reporting rank and its job-wide values (losses, tokens, grad norm, lr are the
    /// same on every rank; the lowest rank's are kept so the choice is deterministic).
    values: Option<(u32, pb::StepReport)>,
    /// The slowest rank's wall time.
    max_seconds: f64,
    /// Shortest bias wait reported for the step (None before the first report).
    min_bias_wait: Option<f64>,
    /// When the latest report arrived.
    last_ms: UnixMs,
    /// Per MoE layer max/mean, set when the ledger finished this step.
    layer_loads: Vec<pb::LayerLoad>,
    /// Reports of MoE ranks that arrived before the ledger collected this step: (worker, report).
    deferred: Vec<(String, pb::StepReport)>,
}

/// Parts of one checkpoint written so far.
#[derive(Debug, Default)]
struct PendingCheckpoint {
    dir: String,
    ranks: BTreeMap<u32, pb::CheckpointWritten>,
}

/// The in-memory training state of one job (see the module docs for what a restart loses).
#[derive(Debug, Default)]
pub struct JobRuntime {
    /// Finished steps, oldest first (at most [`STEP_HISTORY`]).
    pub history: VecDeque<pb::StepSummary>,
    /// Steps every rank finished (the next step to finish).
    pub finished: u64,
    /// The routing-bias ledger (absent for jobs without MoE layers, and once the job ended).
    pub ledger: Option<BiasLedger>,
    /// The latest step the ledger finished and its per-layer loads (per-expert counts included).
    pub latest_loads: Option<(u64, Vec<LayerSummary>)>,
    /// Why the job cannot be balanced any more (a running MoE job whose ledger could not be
    /// rebuilt from its record after a coordinator restart).
    ledger_lost: Option<String>,
    /// The ledger's snapshot after each step it finished that not every rank has finished yet
    /// (at most [`MAX_STEPS_AHEAD`]): the record of step `s + 1` takes the one of step `s`.
    snapshots: BTreeMap<u64, pb::LedgerSnapshot>,
    pending: BTreeMap<u64, PendingStep>,
    checkpoints: BTreeMap<u64, PendingCheckpoint>,
    /// The ledger after each recent checkpoint step (at most [`MAX_LEDGER_SNAPSHOTS`]), for
    /// `CheckpointCommitted.ledger`.
    pub(super) ledger_snapshots: BTreeMap<u64, pb::LedgerSnapshot>,
}

impl JobRuntime {
    /// Why the job cannot be balanced any more, if so (a running MoE job whose ledger could not
    /// be rebuilt after a coordinator restart).
    pub fn ledger_lost(&self) -> Option<&str> {
        self.ledger_lost.as_deref()
    }

    /// Drops pending steps, ledger snapshots and partial checkpoints (the job ended).
    pub fn clear_pending(&mut self) {
        self.pending.clear();
        self.snapshots.clear();
        self.checkpoints.clear();
        self.ledger_snapshots.clear();
    }

    /// A runtime for a running job restored from the store: `finished` steps done (its history
    /// is gone), and its ledger as [`restore_ledger`] rebuilt it, or why it could not be (the job
    /// then fails when a holder is back or reports).
    pub fn restored(finished: u64, ledger: Result<Option<BiasLedger>, String>) -> Self {
        let (ledger, ledger_lost) = match ledger {
            Ok(l) => (l, None),
            Err(why) => (None, Some(why)),
        };
        Self {
            finished,
            ledger,
            ledger_lost,
            ..Self::default()
        }
    }
}

/// The routing-bias ledger of a job with MoE layers, fresh (zero bias, collecting step 0), for
/// the placed `ranks`: every MoE layer with the ranks that route with it. `Ok(None)` for a job
/// without MoE layers; the error says why the spec cannot be balanced. The text describes the
/// ledger for the `BalanceStarted` event.
pub fn new_ledger(
    spec: &pb::JobSpec,
    ranks: &[pb::RankPlacement],
) -> Result<Option<(BiasLedger, String)>, String> {
    let (Some(layout), Some(b)) = (layout_of(spec), spec.balance.as_ref()) else {
        return Ok(None);
    };
    let kind = proto::convert::schedule_from_name(&spec.schedule).map_err(|e| e.to_string())?;
    let stages = kind.stage_count(spec.pipeline);
    let mut holders: BTreeMap<u32, Vec<u32>> = layout
        .moe_layers()
        .into_iter()
        .map(|l| (l, Vec::new()))
        .collect();
    for r in ranks {
        for l in layout.rank_moe_layers(stages, &r.stages) {
            holders.entry(l).or_default().push(r.rank);
        }
    }
    let holders: Vec<LayerHolders> = holders
        .into_iter()
        .map(|(layer, holders)| LayerHolders { layer, holders })
        .collect();
    let config = BalanceConfig {
        experts: spec.n_routed_experts as usize,
        gamma: GammaSchedule {
            rate: b.rate,
            until_tokens: b.stop_after_tokens,
        },
        variant: if b.subtract_mean {
            UpdateVariant::SignMeanSubtracted
        } else {
            UpdateVariant::Sign
        },
        tokens_per_step: b.tokens_per_step,
        history: 1,
    };
    let ledger = BiasLedger::new(config, &holders).map_err(|e| e.to_string())?;
    let text = format!(
        "routing-bias ledger started: {} MoE layers x {} experts over {} ranks, gamma {} until {}, {}",
        ledger.layers().len(),
        spec.n_routed_experts,
        ranks.len(),
        b.rate,
        b.stop_after_tokens
            .map_or("the end".to_owned(), |t| format!("{t} tokens")),
        if b.subtract_mean {
            "mean subtracted"
        } else {
            "plain sign rule"
        },
    );
    Ok(Some((ledger, text)))
}

/// Rebuilds the ledger of a running job from its record after a coordinator restart: built as
/// when the job started ([`new_ledger`]), then restored from `StoredJob.ledger`, which must be the
/// snapshot after step `progress.step - 1` (before its first finished step, a job resumed from a
/// checkpoint uses the resume point's snapshot). A record without a snapshot restarts the ledger
/// fresh only when no step finished. `Ok(None)` for a job without MoE layers; the error is the
/// job's failure reason and names what is wrong.
pub fn restore_ledger(stored: &pb::StoredJob) -> Result<Option<BiasLedger>, String> {
    let spec = stored.spec.clone().unwrap_or_default();
    let ranks = stored
        .placement
        .as_ref()
        .map(|p| p.ranks.as_slice())
        .unwrap_or_default();
    let finished = stored.progress.as_ref().map_or(0, |p| p.step);
    let why = |what: String| {
        format!(
            "the coordinator restarted and cannot rebuild the job's routing-bias ledger: {what}"
        )
    };
    let Some((mut ledger, _)) = new_ledger(&spec, ranks).map_err(why)? else {
        return Ok(None);
    };
    let snapshot = stored
        .ledger
        .as_ref()
        .or_else(|| spec.resume.as_ref().and_then(|r| r.ledger.as_ref()));
    match snapshot {
        None if finished == 0 => {}
        None => {
            return Err(why(format!(
                "the job finished {finished} steps, but its record holds no ledger snapshot"
            )));
        }
        Some(s) if s.after_step + 1 != finished => {
            return Err(why(format!(
                "the stored snapshot is of step {}, but the job finished {finished} steps (expected the snapshot of step {})",
                s.after_step,
                finished.saturating_sub(1)
            )));
        }
        Some(s) => ledger.restore_snapshot(s).map_err(|e| {
            why(format!(
                "the stored snapshot of step {} does not fit the job's layout: {e}",
                s.after_step
            ))
        })?,
    }
    Ok(Some(ledger))
}

/// The MoE layout of a job spec, or `None` for specs without MoE telemetry (older records, or no
/// routed experts).
pub fn layout_of(spec: &pb::JobSpec) -> Option<LayerLayout> {
    let b = spec.balance.as_ref()?;
    if spec.n_routed_experts == 0 {
        return None;
    }
    let layout = LayerLayout {
        num_hidden_layers: b.num_hidden_layers,
        first_k_dense_replace: b.first_k_dense_replace,
        moe_layer_freq: b.moe_layer_freq,
        mtp_depth: b.mtp_depth,
    };
    (!layout.moe_layers().is_empty()).then_some(layout)
}

/// The op list of pipeline rank `pp_idx` of a job: row `pp_idx` of `schedule` generated for
/// `pipeline` ranks and `micro_batches` micro-batches (the manifest's `microBatches` counts the
/// micro-batches of ONE pipeline replica per step; the job trains `micro_batches × data`), or why
/// it cannot be.
pub fn ops_of(spec: &pb::JobSpec, pp_idx: u32) -> Result<Vec<pb::Op>, String> {
    let kind: ScheduleKind =
        proto::convert::schedule_from_name(&spec.schedule).map_err(|e| e.to_string())?;
    let schedule = kind
        .generate(spec.pipeline, spec.micro_batches)
        .map_err(|e| {
            format!(
                "{kind} for {} pipeline ranks and {} micro-batches per replica: {e}",
                spec.pipeline, spec.micro_batches
            )
        })?;
    let row = schedule
        .ops
        .get(pp_idx as usize)
        .ok_or_else(|| format!("the schedule has no row for pipeline rank {pp_idx}"))?;
    Ok(row.iter().map(pb::Op::from_plan).collect())
}

/// Whether `s` is a lower-case hex SHA-256.
fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Checks one rank's checkpoint message, naming what is wrong.
fn check_written(cw: &pb::CheckpointWritten) -> Result<(), String> {
    if cw.dir.is_empty() {
        return Err("the step directory is empty".into());
    }
    if cw.files.is_empty() {
        return Err("the file list is empty".into());
    }
    for f in &cw.files {
        if f.path.is_empty() {
            return Err("a file has an empty path".into());
        }
        if !is_sha256(&f.sha256) {
            return Err(format!(
                "file {} has sha256 {:?}, not 64 lower-case hex digits",
                f.path, f.sha256
            ));
        }
    }
    Ok(())
}

/// Whether the workers write a checkpoint after `step` (numbered from 0), the rule of
/// `worker::compute`: every `checkpoint_interval` steps and after the last, with a directory.
pub fn checkpoint_due(spec: &pb::JobSpec, step: u64) -> bool {
    let done = step + 1;
    !spec.checkpoint_dir.is_empty()
        && (done == spec.steps
            || (spec.checkpoint_interval > 0 && done.is_multiple_of(spec.checkpoint_interval)))
}

/// Checks a submitted resume point against the job it resumes (see `moetrain submit --resume`):
/// a checkpoint directory, a step with steps left after it, and — for a job with MoE layers — a
/// ledger saved after that step with one bias of `n_routed_experts` finite values for exactly
/// the job's MoE layers (none for a job without). The error names what is wrong.
pub fn check_resume(spec: &pb::JobSpec, r: &pb::ResumePoint) -> Result<(), String> {
    if r.dir.is_empty() {
        return Err("resume: the checkpoint directory is empty".into());
    }
    if r.step + 1 >= spec.steps {
        return Err(format!(
            "resume: the checkpoint in {} was taken after step {} (steps are numbered from 0), but the job has only {} steps, so none is left to train; raise spec.training.steps",
            r.dir, r.step, spec.steps
        ));
    }
    let moe = layout_of(spec).map(|l| l.moe_layers()).unwrap_or_default();
    let Some(ledger) = &r.ledger else {
        return if moe.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "resume: the checkpoint in {} carries no routing-bias ledger, but the job has MoE layers {moe:?}",
                r.dir
            ))
        };
    };
    if ledger.after_step != r.step {
        return Err(format!(
            "resume: the ledger in {} was saved after step {}, the checkpoint after step {}",
            r.dir, ledger.after_step, r.step
        ));
    }
    let layers: Vec<u32> = ledger.layers.iter().map(|l| l.layer).collect();
    if layers != moe {
        return Err(format!(
            "resume: the ledger in {} holds the bias of layers {layers:?}, but the job's MoE layers are {moe:?} (another model or MTP depth?)",
            r.dir
        ));
    }
    let experts = spec.n_routed_experts as usize;
    for l in &ledger.layers {
        if l.values.len() != experts {
            return Err(format!(
                "resume: the ledger in {} has {} bias values for layer {}, the job has {experts} routed experts",
                r.dir,
                l.values.len(),
                l.layer
            ));
        }
        if let Some(v) = l.values.iter().find(|v| !v.is_finite()) {
            return Err(format!(
                "resume: the ledger in {} has a non-finite bias {v} in layer {}",
                r.dir, l.layer
            ));
        }
    }
    Ok(())
}

impl Core {
    /// Starts a job's routing-bias ledger as it begins running: every MoE layer with the ranks
    /// that route with it, from the job's layout and the stages each rank holds. A job whose
    /// ledger cannot be built fails (a bug in the spec, never silently unbalanced).
    pub(super) fn start_ledger(&mut self, job: &str, now: UnixMs, actions: &mut Vec<Action>) {
        let Some(entry) = self.state.jobs.get(job) else {
            return;
        };
        let spec = entry.spec();
        let ranks = entry
            .stored
            .placement
            .as_ref()
            .map(|p| p.ranks.clone())
            .unwrap_or_default();
        self.runtime.entry(job.to_owned()).or_default();
        // A job resumed from a checkpoint starts its ledger from the checkpoint's snapshot.
        let resumed = spec.resume.as_ref();
        let started = new_ledger(&spec, &ranks).and_then(|built| {
            let Some((mut ledger, text)) = built else {
                return Ok(None);
            };
            let text = match resumed {
                Some(r) => {
                    if let Some(snap) = r.ledger.as_ref() {
                        ledger.restore_snapshot(snap).map_err(|e| e.to_string())?;
                    }
                    format!(
                        "{text}; resumed from the bias after step {} ({})",
                        r.step, r.dir
                    )
                }
                None => text,
            };
            Ok(Some((ledger, text)))
        });
        match started {
            Ok(None) => {}
            Ok(Some((ledger, text))) => {
                if let Some(rt) = self.runtime.get_mut(job) {
                    rt.ledger = Some(ledger);
                }
                self.event(job, now, "BalanceStarted", text, "", actions);
            }
            Err(e) => {
                let why = format!("cannot start the routing-bias ledger: {e}");
                self.fail_job_for_rank(job, "", "BalanceFailed", why, now, actions);
            }
        }
    }

    /// One rank's report of one step (see the module docs).
    pub(super) fn step_report(
        &mut self,
        worker: &str,
        report: pb::StepReport,
        now: UnixMs,
        actions: &mut Vec<Action>,
    ) -> Result<(), CoreError> {
        self.check_held(worker, &report.job, report.rank)?;
        let job = report.job.clone();
        let (rank, step) = (report.rank, report.step);
        let Some(entry) = self.state.jobs.get(&job) else {
            return Err(CoreError::UnknownJob(job));
        };
        let phase = entry.phase();
        let steps = entry.spec().steps;
        let ignore = |why: String| {
            tracing::warn!(job = %job, rank, step, worker, reason = %why, "step report ignored");
        };
        if phase != pb::JobPhase::Running {
            ignore(format!("the job is {}", phase.name()));
            return Ok(());
        }
        if step >= steps {
            ignore(format!("the job has only {steps} steps (numbered from 0)"));
            return Ok(());
        }
        let runtime = self.runtime.entry(job.clone()).or_default();
        if let Some(why) = runtime.ledger_lost.clone() {
            self.fail_job_for_rank(&job, worker, "BalanceLost", why, now, actions);
            return Ok(());
        }
        if step < runtime.finished {
            ignore(format!(
                "step {step} already finished ({} steps done)",
                runtime.finished
            ));
            return Ok(());
        }
        if step >= runtime.finished + MAX_STEPS_AHEAD {
            ignore(format!(
                "step {step} is more than {MAX_STEPS_AHEAD} steps past the last finished step"
            ));
            return Ok(());
        }
        let has_ledger = runtime.ledger.is_some();
        let holds_moe = runtime
            .ledger
            .as_ref()
            .is_some_and(|l| !l.layers_of(rank).is_empty());
        let collecting = runtime.ledger.as_ref().map_or(0, BiasLedger::collecting);
        let pending = runtime.pending.entry(step).or_default();
        if pending.ranks.contains(&rank) {
            ignore(format!("rank {rank} already reported step {step}"));
            return Ok(());
        }
        pending.ranks.insert(rank);
        pending.max_seconds = pending.max_seconds.max(report.step_seconds);
        pending.min_bias_wait = Some(pending.min_bias_wait.map_or(report.bias_wait_seconds, |w| {
            w.min(report.bias_wait_seconds)
        }));
        pending.last_ms = now;
        if pending.values.as_ref().is_none_or(|(r, _)| rank < *r) {
            // Only the job-wide values; the counts (the bulk of a report) stay out.
            let values = pb::StepReport {
                losses: report.losses.clone(),
                tokens: report.tokens,
                grad_norm: report.grad_norm,
                lr: report.lr,
                ..Default::default()
            };
            pending.values = Some((rank, values));
        }
        // The bias: checked and counted now if the ledger collects this step, else later.
        if holds_moe {
            if step > collecting {
                pending.deferred.push((worker.to_owned(), report));
            } else if !self.balance_report(worker, &report, now, actions) {
                return Ok(());
            }
        } else if has_ledger {
            let empty = rank_checksum(std::iter::empty());
            if report.bias_checksum != empty {
                let why = format!(
                    "bias checksum mismatch at step {step}: rank {rank} on worker {worker} holds no MoE layer, so its checksum must be {empty:#018x}, got {:#018x}",
                    report.bias_checksum
                );
                self.fail_job_for_rank(&job, worker, "BiasChecksumMismatch", why, now, actions);
                return Ok(());
            }
        }
        self.finish_steps(&job, now);
        Ok(())
    }

    /// Checks a MoE rank's bias checksum against the ledger, which collects `report.step`, and
    /// feeds its counts; when the step's counts are complete, sends the new bias and goes on with
    /// reports that waited for the next step. Returns false when the job failed.
    fn balance_report(
        &mut self,
        worker: &str,
        report: &pb::StepReport,
        now: UnixMs,
        actions: &mut Vec<Action>,
    ) -> bool {
        let job = report.job.as_str();
        let (rank, step) = (report.rank, report.step);
        let Some(ledger) = self.runtime.get_mut(job).and_then(|rt| rt.ledger.as_mut()) else {
            return true;
        };
        let bias_step = ledger.version().unwrap_or(0);
        let expected = ledger
            .expected_rank_checksum(rank)
            .unwrap_or_else(|| rank_checksum(std::iter::empty()));
        if report.bias_checksum != expected || report.bias_step != bias_step {
            let which = match ledger.version() {
                Some(v) => format!("the bias computed after step {v}"),
                None => "the initial bias".to_owned(),
            };
            let why = format!(
                "bias checksum mismatch at step {step}: rank {rank} on worker {worker} routed with the bias of step {} (checksum {:#018x}); expected {which} (step {bias_step}, checksum {expected:#018x})",
                report.bias_step, report.bias_checksum
            );
            tracing::error!(job, rank, step, %why, "bias checksum mismatch");
            self.fail_job_for_rank(job, worker, "BiasChecksumMismatch", why, now, actions);
            return false;
        }
        let broadcast = match ledger.ingest(rank, step, &counts_from_report(report)) {
            Ok(None) => return true,
            Ok(Some(b)) => b,
            Err(e) => {
                let why = format!(
                    "rank {rank} on worker {worker} sent expert counts the routing-bias ledger refuses: {e}"
                );
                self.fail_job_for_rank(job, worker, "BalanceFailed", why, now, actions);
                return false;
            }
        };
        self.broadcast_bias(job, &broadcast, actions);
        // Reports of the next step that arrived early.
        let next = self
            .runtime
            .get_mut(job)
            .and_then(|rt| rt.pending.get_mut(&(broadcast.step + 1)))
            .map(|p| std::mem::take(&mut p.deferred))
            .unwrap_or_default();
        for (w, r) in next {
            if !self.balance_report(&w, &r, now, actions) {
                return false;
            }
        }
        true
    }

    /// Sends the bias computed after `b.step` to every worker that holds a rank of the job (the
    /// layers its ranks route with; possibly none), and records the step's loads.
    fn broadcast_bias(&mut self, job: &str, b: &BiasBroadcast, actions: &mut Vec<Action>) {
        let checkpoint_due = self
            .state
            .jobs
            .get(job)
            .and_then(|e| e.stored.spec.as_ref())
            .is_some_and(|s| checkpoint_due(s, b.step));
        let Some(rt) = self.runtime.get_mut(job) else {
            return;
        };
        let Some(ledger) = rt.ledger.as_ref() else {
            return;
        };
        // The ledger has just finished `b.step`: its snapshot is the state after that step.
        if let Some(snapshot) = ledger
            .to_snapshot()
            .filter(|s| checkpoint_due && s.after_step == b.step)
        {
            rt.ledger_snapshots.insert(b.step, snapshot);
            while rt.ledger_snapshots.len() > MAX_LEDGER_SNAPSHOTS {
                rt.ledger_snapshots.pop_first();
            }
        }
        let mut per_worker: BTreeMap<&str, BTreeSet<u32>> = BTreeMap::new();
        for w in self.state.workers.values() {
            for h in w.stored.held.iter().filter(|h| h.job == job) {
                per_worker
                    .entry(w.stored.worker_id.as_str())
                    .or_default()
                    .extend(ledger.layers_of(h.rank));
            }
        }
        for (worker, layers) in per_worker {
            let layers: Vec<u32> = layers.into_iter().collect();
            actions.push(Action::Send {
                worker: worker.to_owned(),
                msg: msg(pb::coordinator_message::Msg::BiasUpdate(
                    bias_update_message(job, b, Some(&layers)),
                )),
            });
        }
        if let Some(summary) = ledger.history().last().filter(|s| s.step == b.step) {
            for l in &summary.layers {
                tracing::info!(
                    target: "moetrain::balance",
                    job,
                    step = b.step,
                    layer = l.layer,
                    histogram.moe_expert_load_max = l.max,
                    histogram.moe_expert_load_mean = l.mean,
                    histogram.moe_expert_load_max_over_mean = l.imbalance(),
                    "expert load"
                );
            }
            let loads = summary
                .layers
                .iter()
                .map(|l| pb::LayerLoad {
                    layer: l.layer,
                    max: l.max,
                    mean: l.mean,
                })
                .collect();
            rt.pending.entry(b.step).or_default().layer_loads = loads;
            rt.latest_loads = Some((b.step, summary.layers.clone()));
        }
        // Kept until step `b.step` is finished by every rank, when its record takes it.
        if let Some(snapshot) = ledger.to_snapshot() {
            rt.snapshots.insert(b.step, snapshot);
        }
    }

    /// Moves every step that all ranks reported, in order, into the history and the progress.
    fn finish_steps(&mut self, job: &str, now: UnixMs) {
        let world = self.state.jobs.get(job).map_or(0, |e| e.world_size()) as usize;
        let Some(rt) = self.runtime.get_mut(job) else {
            return;
        };
        let mut changed = false;
        while rt
            .pending
            .get(&rt.finished)
            .is_some_and(|p| p.ranks.len() >= world && world > 0)
        {
            let Some(p) = rt.pending.remove(&rt.finished) else {
                break;
            };
            let values = p.values.map(|(_, r)| r).unwrap_or_default();
            let summary = pb::StepSummary {
                step: rt.finished,
                losses: values.losses,
                tokens: values.tokens,
                step_seconds: p.max_seconds,
                grad_norm: values.grad_norm,
                lr: values.lr,
                unix_ms: p.last_ms,
                layer_loads: p.layer_loads,
                bias_wait_seconds: p.min_bias_wait.unwrap_or(0.0),
            };
            rt.finished += 1;
            if rt.history.len() == STEP_HISTORY {
                rt.history.pop_front();
            }
            let Some(entry) = self.state.jobs.get_mut(job) else {
                break;
            };
            let progress = entry.stored.progress.get_or_insert_with(Default::default);
            progress.step = rt.finished;
            progress.loss = summary
                .losses
                .iter()
                .find(|l| l.name == "total")
                .or(summary.losses.first())
                .map_or(0.0, |l| l.value);
            progress.losses = summary.losses.clone();
            progress.tokens += summary.tokens;
            progress.tokens_per_second = if summary.step_seconds > 0.0 {
                summary.tokens as f64 / summary.step_seconds
            } else {
                0.0
            };
            progress.step_seconds = summary.step_seconds;
            progress.grad_norm = summary.grad_norm;
            progress.lr = summary.lr;
            progress.updated_unix_ms = now;
            tracing::info!(
                job,
                step = summary.step,
                loss = progress.loss,
                histogram.step_seconds = summary.step_seconds,
                monotonic_counter.tokens_trained = summary.tokens,
                "step finished"
            );
            rt.history.push_back(summary);
            changed = true;
        }
        if changed && rt.ledger.is_some() {
            // The record of `finished` steps carries the ledger after step `finished - 1`; the
            // ledger finished that step before its last report finished it here.
            let last = rt.finished - 1;
            let snapshot = rt.snapshots.remove(&last);
            rt.snapshots.retain(|s, _| *s > last);
            if snapshot.is_none() {
                tracing::error!(job, step = last, "no ledger snapshot for a finished step");
            }
            if let Some(entry) = self.state.jobs.get_mut(job) {
                entry.stored.ledger = snapshot;
            }
        }
        if changed {
            self.dirty_jobs.insert(job.to_owned());
        }
    }

    /// One rank wrote its part of a checkpoint (see the module docs).
    pub(super) fn checkpoint_written(
        &mut self,
        worker: &str,
        cw: pb::CheckpointWritten,
        now: UnixMs,
        actions: &mut Vec<Action>,
    ) -> Result<(), CoreError> {
        self.check_held(worker, &cw.job, cw.rank)?;
        let job = cw.job.clone();
        let (rank, step) = (cw.rank, cw.step);
        let Some(entry) = self.state.jobs.get(&job) else {
            return Err(CoreError::UnknownJob(job));
        };
        if entry.phase() != pb::JobPhase::Running {
            tracing::warn!(job = %job, rank, step, phase = entry.phase().name(), "checkpoint part ignored: the job is not running");
            return Ok(());
        }
        let world = entry.world_size() as usize;
        if entry
            .stored
            .last_checkpoint
            .as_ref()
            .is_some_and(|c| c.step >= step)
        {
            tracing::warn!(job = %job, rank, step, "checkpoint part ignored: a checkpoint at or after this step is committed");
            return Ok(());
        }
        let rank0 = entry
            .stored
            .placement
            .as_ref()
            .and_then(|p| p.ranks.iter().find(|r| r.rank == 0))
            .map(|r| r.worker_id.clone())
            .unwrap_or_default();
        let rt = self.runtime.entry(job.clone()).or_default();
        if rt
            .checkpoints
            .get(&step)
            .and_then(|p| p.ranks.get(&rank))
            .is_some_and(|have| *have == cw)
        {
            // Workers re-send their parts after a resumed registration (it may have been lost).
            tracing::debug!(job = %job, rank, step, "checkpoint part already received");
            return Ok(());
        }
        let refuse =
            |why: String| format!("checkpoint part of rank {rank} for step {step} refused: {why}");
        let problem = check_written(&cw).err().or_else(|| {
            let p = rt.checkpoints.get(&step)?;
            if p.dir != cw.dir {
                Some(format!(
                    "its directory {} differs from the {} other ranks wrote to",
                    cw.dir, p.dir
                ))
            } else if p.ranks.contains_key(&rank) {
                Some("the rank already wrote its part".to_owned())
            } else {
                None
            }
        });
        if let Some(why) = problem {
            let text = refuse(why);
            tracing::warn!(job = %job, %text, "checkpoint part refused");
            self.event(&job, now, "CheckpointRejected", text, worker, actions);
            return Ok(());
        }
        let p = rt
            .checkpoints
            .entry(step)
            .or_insert_with(|| PendingCheckpoint {
                dir: cw.dir.clone(),
                ranks: BTreeMap::new(),
            });
        p.ranks.insert(rank, cw);
        if p.ranks.len() < world {
            while rt.checkpoints.len() > MAX_PENDING_CHECKPOINTS {
                if let Some((old, part)) = rt.checkpoints.pop_first() {
                    tracing::warn!(job = %job, step = old, ranks = part.ranks.len(), "partial checkpoint dropped: too many pending");
                }
            }
            return Ok(());
        }
        let Some(done) = rt.checkpoints.remove(&step) else {
            return Ok(());
        };
        // Older partial sets can never become the latest checkpoint now.
        let older: Vec<u64> = rt.checkpoints.range(..step).map(|(s, _)| *s).collect();
        for s in older {
            rt.checkpoints.remove(&s);
            tracing::info!(job = %job, step = s, "older partial checkpoint abandoned");
        }
        let ranks: Vec<pb::CheckpointWritten> = done.ranks.into_values().collect();
        let bytes: u64 = ranks.iter().flat_map(|r| &r.files).map(|f| f.bytes).sum();
        // The ledger after this step (kept since the ledger finished it); older ones are done.
        let ledger = rt.ledger_snapshots.remove(&step);
        rt.ledger_snapshots.retain(|s, _| *s > step);
        let balanced = rt.ledger.is_some();
        let info = pb::CheckpointInfo {
            step,
            dir: done.dir.clone(),
            unix_ms: now,
            ranks: ranks.len() as u32,
            bytes,
            ledger: ledger.clone(),
        };
        if let Some(entry) = self.state.jobs.get_mut(&job) {
            entry.stored.last_checkpoint = Some(info);
        }
        self.dirty_jobs.insert(job.clone());
        self.event(
            &job,
            now,
            "CheckpointCommitted",
            format!(
                "checkpoint after step {step} complete: {} ranks, {bytes} bytes in {}{}",
                ranks.len(),
                done.dir,
                match (&ledger, balanced) {
                    (None, true) => format!(
                        "; the routing-bias ledger after step {step} is not known, so a job cannot resume from it"
                    ),
                    _ => String::new(),
                }
            ),
            "",
            actions,
        );
        actions.push(Action::Send {
            worker: rank0,
            msg: msg(pb::coordinator_message::Msg::CheckpointCommitted(
                pb::CheckpointCommitted {
                    job: job.clone(),
                    step,
                    dir: done.dir,
                    ranks,
                    ledger,
                },
            )),
        });
        Ok(())
    }
}
