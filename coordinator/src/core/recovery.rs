//! Automatic recovery (`spec.faultTolerance.restartBudget`): when a running job loses a worker or
//! one of its ranks fails for a reason a restart can fix, the coordinator restarts it from its last
//! committed checkpoint on healthy workers (idle spares included) instead of failing it.
//!
//! [`decide`] is the pure decision: restart (and from where, with the reason users read) or fail
//! (with the original reason, naming the budget when it is used up). `Core::fail_or_restart`
//! applies it: a restart stops the job's ranks on every holder exactly as a failure does (so the
//! workers free their devices), moves the job back to Pending with the reason, appends a
//! `JobRestarting` event, counts the restart in `StoredJob.restarts`, sets `spec.resume` to the
//! resume point (or clears it: step 0), and puts the progress back to that point; the scheduler
//! places it again after [`hold_ms`], on connected workers that are not lost.
//!
//! Invariants:
//! - A job is restarted at most `restart_budget` times (`StoredJob.restarts` counts them and is
//!   stored with the job, so a coordinator restart does not refill the budget).
//! - Only failures a restart can fix restart a job: a lost worker, or a rank that failed without
//!   the worker marking the failure deterministic (`RankFinished.deterministic`: a checkpoint it
//!   cannot resume from, a bias that contradicts the first, a non-finite gradient norm; see
//!   [`restartable`]); a deterministic failure, any failure of another kind, or any failure once
//!   the budget is used up fails the job with the original reason.
//! - A restarted job resumes from the newest point it can: its last committed checkpoint when that
//!   checkpoint is a valid resume point (`training::check_resume`), else the point it was
//!   submitted with (`moetrain submit --resume`), else step 0 with a fresh ledger. Its progress
//!   (step and tokens) goes back to that point.
//! - A restarted job is not placed again before [`hold_ms`] after its restart, so that the session
//!   of a worker whose death caused the failure has closed (it is then not offered) and the late
//!   failure reports of the previous attempt's ranks have arrived (they are then refused, as no
//!   worker holds those ranks) before new ranks exist.

use proto::pb;

use super::{Action, Core, JobEntry, UnixMs, training};
use crate::Config;

/// Event kind of a worker lost by liveness (the other kinds are those `fail_job_for_rank` gets).
pub const WORKER_LOST: &str = "WorkerLost";
/// Event kind of a rank whose worker reported it failed.
pub const RANK_FAILED: &str = "RankFailed";
/// Event kind recorded when a job restarts.
pub const JOB_RESTARTING: &str = "JobRestarting";

/// One failure of a running job.
#[derive(Clone, Copy, Debug)]
pub struct Failure<'a> {
    /// The event kind that reports it: [`WORKER_LOST`], [`RANK_FAILED`], or a deterministic one
    /// (`RankRejected`, `BiasChecksumMismatch`, `BalanceFailed`, `BalanceLost`).
    pub kind: &'a str,
    /// The reason as the job would fail with it (it names the worker and rank).
    pub reason: &'a str,
    /// The worker marked the failure deterministic (same inputs, same failure).
    pub deterministic: bool,
}

/// What to do with a job after a failure.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Restart the job from `resume` (from step 0 when `None`).
    Restart {
        /// Where the next attempt starts.
        resume: Option<pb::ResumePoint>,
        /// The transition's reason, e.g. "restart 1 of 3 after worker w3 (rank 1) lost: ...;
        /// resuming from the checkpoint after step 4 (step-00000005)".
        reason: String,
    },
    /// Fail the job.
    Fail {
        /// The job's failure reason: the original one, naming the budget when it is used up.
        reason: String,
    },
}

/// Whether a failure of `kind` is one a restart can fix (see the module docs).
pub fn restartable(kind: &str, deterministic: bool) -> bool {
    match kind {
        WORKER_LOST => true,
        RANK_FAILED => !deterministic,
        _ => false,
    }
}

/// Decides whether the job in `stored` restarts after `failure` (see the module docs).
pub fn decide(stored: &pb::StoredJob, failure: &Failure<'_>) -> Decision {
    let fail = |reason: String| Decision::Fail { reason };
    let phase = pb::JobPhase::try_from(stored.phase).unwrap_or(pb::JobPhase::Unspecified);
    let Some(spec) = stored.spec.as_ref() else {
        return fail(failure.reason.to_owned());
    };
    let budget = spec.restart_budget;
    if budget == 0
        || !matches!(phase, pb::JobPhase::Scheduled | pb::JobPhase::Running)
        || !restartable(failure.kind, failure.deterministic)
    {
        return fail(failure.reason.to_owned());
    }
    if stored.restarts >= budget {
        return fail(format!(
            "{}; not restarted: the restart budget (spec.faultTolerance.restartBudget {budget}) is used up after {} restarts",
            failure.reason, stored.restarts
        ));
    }
    let (resume, from) = resume_point(stored, spec);
    Decision::Restart {
        resume,
        reason: format!(
            "restart {} of {budget} after {}; {from}",
            stored.restarts + 1,
            failure.reason
        ),
    }
}

/// The newest valid point the job can restart from, and a sentence saying which it is.
fn resume_point(stored: &pb::StoredJob, spec: &pb::JobSpec) -> (Option<pb::ResumePoint>, String) {
    let mut unusable = String::new();
    if let Some(c) = &stored.last_checkpoint {
        let r = pb::ResumePoint {
            dir: c.dir.clone(),
            step: c.step,
            ledger: c.ledger.clone(),
        };
        match training::check_resume(spec, &r) {
            Ok(()) => {
                let text = format!(
                    "resuming from the checkpoint after step {} ({})",
                    c.step,
                    leaf(&c.dir)
                );
                return (Some(r), text);
            }
            Err(why) => {
                let why = why.trim_start_matches("resume: ");
                unusable = format!(
                    " (the checkpoint after step {} cannot be resumed from: {why})",
                    c.step
                );
            }
        }
    }
    match &spec.resume {
        Some(r) => {
            let text = format!(
                "resuming again from the checkpoint after step {} ({}) it was submitted with{unusable}",
                r.step,
                leaf(&r.dir)
            );
            (Some(r.clone()), text)
        }
        None if unusable.is_empty() => (
            None,
            "starting over from step 0 (no checkpoint committed yet)".to_owned(),
        ),
        None => (None, format!("starting over from step 0{unusable}")),
    }
}

/// The last component of a checkpoint's step directory (the whole path when it has none).
fn leaf(dir: &str) -> &str {
    dir.rsplit('/').find(|s| !s.is_empty()).unwrap_or(dir)
}

/// How long a restarted job waits before it is placed again: two heartbeat intervals of the job
/// (the coordinator's when the job sets none), at least one second.
pub fn hold_ms(spec: &pb::JobSpec, config: &Config) -> u64 {
    let heartbeat = if spec.heartbeat_interval_ms > 0 {
        spec.heartbeat_interval_ms
    } else {
        proto::convert::duration_to_ms(config.heartbeat_interval)
    };
    heartbeat.saturating_mul(2).max(1000)
}

/// Whether `job` restarted less than [`hold_ms`] ago and must not be placed yet.
pub fn held_back(job: &JobEntry, now: UnixMs, config: &Config) -> bool {
    let Some(last) = job.stored.transitions.last() else {
        return false;
    };
    let restarted = job.stored.restarts > 0
        && last.to == pb::JobPhase::Pending as i32
        && last.from != pb::JobPhase::Unspecified as i32;
    restarted && now < last.unix_ms.saturating_add(hold_ms(&job.spec(), config))
}

/// The tokens the job had trained on after `first_step` steps: the resume point's ledger count
/// when it has one, else the current progress minus the steps after it still in the history,
/// else whole steps of the latest known size.
fn tokens_at(
    resume: Option<&pb::ResumePoint>,
    progress: Option<&pb::JobProgress>,
    history: &[pb::StepSummary],
    first_step: u64,
) -> u64 {
    if first_step == 0 {
        return 0;
    }
    if let Some(l) = resume.and_then(|r| r.ledger.as_ref()) {
        return l.tokens_seen;
    }
    let Some(p) = progress else {
        return 0;
    };
    let after: Vec<&pb::StepSummary> = history.iter().filter(|s| s.step >= first_step).collect();
    if after.len() as u64 == p.step.saturating_sub(first_step) {
        return p.tokens - after.iter().map(|s| s.tokens).sum::<u64>().min(p.tokens);
    }
    let per_step = history.last().map_or(0, |s| s.tokens);
    first_step * per_step
}

impl Core {
    /// A failure ends the running `job` (reported as `kind`, already recorded as an event;
    /// `deterministic` when the worker said the same inputs fail the same way): restarts it when
    /// [`decide`] says so, else fails it and stops every rank.
    pub(super) fn fail_or_restart(
        &mut self,
        job: &str,
        kind: &str,
        why: String,
        deterministic: bool,
        now: UnixMs,
        actions: &mut Vec<Action>,
    ) {
        let Some(entry) = self.state.jobs.get(job) else {
            return;
        };
        let failure = Failure {
            kind,
            reason: &why,
            deterministic,
        };
        match decide(&entry.stored, &failure) {
            Decision::Fail { reason } => self.end_job(
                job,
                pb::JobPhase::Failed,
                reason,
                pb::CommandKind::Stop,
                now,
                actions,
            ),
            Decision::Restart { resume, reason } => {
                self.restart_job(job, resume, reason, now, actions)
            }
        }
    }

    /// Restarts `job` from `resume` (see the module docs).
    fn restart_job(
        &mut self,
        job: &str,
        resume: Option<pb::ResumePoint>,
        reason: String,
        now: UnixMs,
        actions: &mut Vec<Action>,
    ) {
        tracing::warn!(job, %reason, "job restarting");
        // Stops every holder's ranks and frees their devices, as a failure does, but the job
        // goes back to Pending.
        self.end_job(
            job,
            pb::JobPhase::Pending,
            reason.clone(),
            pb::CommandKind::Stop,
            now,
            actions,
        );
        let first_step = resume.as_ref().map_or(0, |r| r.step + 1);
        let history: Vec<pb::StepSummary> = self
            .runtime
            .get(job)
            .map(|rt| rt.history.iter().cloned().collect())
            .unwrap_or_default();
        let Some(entry) = self.state.jobs.get_mut(job) else {
            return;
        };
        let stored = &mut entry.stored;
        stored.restarts += 1;
        let tokens = tokens_at(
            resume.as_ref(),
            stored.progress.as_ref(),
            &history,
            first_step,
        );
        stored.progress = Some(pb::JobProgress {
            step: first_step,
            tokens,
            updated_unix_ms: now,
            ..Default::default()
        });
        if let Some(spec) = stored.spec.as_mut() {
            spec.resume = resume;
        }
        // The ledger snapshot of the record belongs to the previous attempt's progress.
        stored.ledger = None;
        stored.placement = None;
        stored.ready_ranks.clear();
        stored.finished_ranks.clear();
        stored.wait_reason.clear();
        if let Some(rt) = self.runtime.get_mut(job) {
            rt.finished = first_step;
            rt.history.retain(|s| s.step < first_step);
            rt.latest_loads = None;
        }
        self.dirty_jobs.insert(job.to_owned());
        self.event(job, now, JOB_RESTARTING, reason, "", actions);
    }
}
