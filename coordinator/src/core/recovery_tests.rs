//! Unit tests of automatic recovery (`recovery`): the pure decision table (budget left or used
//! up, with or without a checkpoint, restartable or deterministic failures, the reasons users
//! read), and through the core: a worker lost mid-run with an idle spare sends the job back to
//! Pending and then onto the spare resumed from the last checkpoint, with the restart stored; a
//! budget of 0 fails the job with the original reason; a used-up budget names itself.

use super::recovery::{Decision, Failure, decide, held_back, hold_ms, restartable};
use super::resume_tests::{T0, holders, ready_all, register, run_step, submit, written};
use super::*;
use crate::Config;

/// The resume tests' MoE job (two pipeline ranks, 8 experts, 10 steps of 100 tokens, a
/// checkpoint every 2 steps into `/c`) with restart budget `budget` and one spare worker.
fn spec(name: &str, budget: u32) -> pb::JobSpec {
    pb::JobSpec {
        restart_budget: budget,
        spare_workers: 1,
        ..super::resume_tests::moe_spec(name)
    }
}

fn ledger_after(step: u64) -> pb::LedgerSnapshot {
    pb::LedgerSnapshot {
        after_step: step,
        tokens_seen: (step + 1) * 100,
        layers: (1..=4u32)
            .map(|layer| pb::LayerBias {
                layer,
                values: vec![0.125 * layer as f32; 8],
            })
            .collect(),
    }
}

fn checkpoint(step: u64, ledger: Option<pb::LedgerSnapshot>) -> pb::CheckpointInfo {
    pb::CheckpointInfo {
        step,
        dir: format!("/c/step-{:08}", step + 1),
        unix_ms: T0,
        ranks: 2,
        bytes: 2000,
        ledger,
    }
}

/// A stored running job of [`spec`] with `restarts` done and `last` as its last checkpoint.
fn stored(budget: u32, restarts: u32, last: Option<pb::CheckpointInfo>) -> pb::StoredJob {
    pb::StoredJob {
        spec: Some(spec("j", budget)),
        phase: pb::JobPhase::Running as i32,
        restarts,
        last_checkpoint: last,
        ..Default::default()
    }
}

const LOST: &str = "worker w3 (rank 1) lost: silent for 5.2s, failure timeout 5.0s";
const PEER: &str =
    "rank 0 failed on worker w0: step 5: receiving from peer rank 1: the connection was closed";

fn lost() -> Failure<'static> {
    Failure {
        kind: recovery::WORKER_LOST,
        reason: LOST,
        deterministic: false,
    }
}

#[test]
fn within_the_budget_a_lost_worker_restarts_from_the_last_checkpoint() {
    let d = decide(
        &stored(3, 0, Some(checkpoint(3, Some(ledger_after(3))))),
        &lost(),
    );
    let want = pb::ResumePoint {
        dir: "/c/step-00000004".into(),
        step: 3,
        ledger: Some(ledger_after(3)),
    };
    assert_eq!(
        d,
        Decision::Restart {
            resume: Some(want),
            reason: format!(
                "restart 1 of 3 after {LOST}; resuming from the checkpoint after step 3 (step-00000004)"
            ),
        }
    );
    // The count goes on from the restarts already done.
    let Decision::Restart { reason, .. } = decide(&stored(3, 2, None), &lost()) else {
        panic!("the third restart is within a budget of 3");
    };
    assert!(
        reason.starts_with("restart 3 of 3 after worker w3"),
        "{reason}"
    );
}

#[test]
fn without_a_usable_checkpoint_a_restart_begins_at_the_earliest_point() {
    // No checkpoint: step 0 with a fresh ledger.
    let Decision::Restart { resume, reason } = decide(&stored(3, 0, None), &lost()) else {
        panic!("restart expected");
    };
    assert_eq!(resume, None);
    assert!(
        reason.ends_with("starting over from step 0 (no checkpoint committed yet)"),
        "{reason}"
    );
    // A job submitted with --resume and no checkpoint since goes back to its submitted point.
    let submitted = pb::ResumePoint {
        dir: "/old/step-00000003".into(),
        step: 2,
        ledger: Some(ledger_after(2)),
    };
    let mut job = stored(3, 0, None);
    job.spec.as_mut().unwrap().resume = Some(submitted.clone());
    let Decision::Restart { resume, reason } = decide(&job, &lost()) else {
        panic!("restart expected");
    };
    assert_eq!(resume, Some(submitted));
    assert!(reason.contains("resuming again from the checkpoint after step 2 (step-00000003)"));
    // A MoE checkpoint whose ledger is unknown cannot be resumed from; the reason says why.
    let Decision::Restart { resume, reason } =
        decide(&stored(3, 0, Some(checkpoint(5, None))), &lost())
    else {
        panic!("restart expected");
    };
    assert_eq!(resume, None);
    assert!(
        reason.contains("starting over from step 0 (the checkpoint after step 5 cannot be resumed from: the checkpoint in /c/step-00000006 carries")
            && reason.contains("no routing-bias ledger"),
        "{reason}"
    );
}

#[test]
fn a_used_up_or_zero_budget_fails_with_the_original_reason() {
    let ckpt = Some(checkpoint(3, Some(ledger_after(3))));
    assert_eq!(
        decide(&stored(0, 0, ckpt.clone()), &lost()),
        Decision::Fail {
            reason: LOST.into()
        }
    );
    let Decision::Fail { reason } = decide(&stored(2, 2, ckpt), &lost()) else {
        panic!("the budget of 2 is used up");
    };
    assert_eq!(
        reason,
        format!(
            "{LOST}; not restarted: the restart budget (spec.faultTolerance.restartBudget 2) is used up after 2 restarts"
        )
    );
}

#[test]
fn only_failures_a_restart_can_fix_restart_the_job() {
    let restart = |kind: &str, reason: &str, deterministic: bool| {
        matches!(
            decide(
                &stored(3, 0, None),
                &Failure {
                    kind,
                    reason,
                    deterministic
                }
            ),
            Decision::Restart { .. }
        )
    };
    // Lost workers and ranks that failed on a peer, a timeout, IO or a panic restart: the worker
    // did not mark them deterministic.
    assert!(restart(recovery::WORKER_LOST, LOST, false));
    assert!(restart(recovery::RANK_FAILED, PEER, false));
    for why in [
        "rank 1 failed on worker w1: step 4: no routing bias for step 3 from the coordinator within 30s",
        "rank 1 failed on worker w1: step 5: checkpoint: writing the checkpoint part /c/x: No space left on device",
        "rank 1 failed on worker w1: the compute thread panicked: index out of bounds",
        "rank 1 failed on worker w1: worker w1 shut down",
    ] {
        assert!(restart(recovery::RANK_FAILED, why, false), "{why}");
    }
    // A rank failure the worker marked deterministic never restarts, whatever its text, and
    // keeps its reason; neither do the coordinator's own deterministic kinds.
    for (kind, why, deterministic) in [
        (
            recovery::RANK_FAILED,
            "rank 0 failed on worker w0: step 6: non-finite gradient norm at step 6",
            true,
        ),
        (
            recovery::RANK_FAILED,
            "rank 0 failed on worker w0: step 5: receiving from peer rank 1: the connection was closed",
            true,
        ),
        (
            "BiasChecksumMismatch",
            "bias checksum mismatch at step 4: rank 1",
            false,
        ),
        (
            "RankRejected",
            "rank 1 rejected its assignment on worker w1",
            false,
        ),
        (
            "BalanceFailed",
            "cannot start the routing-bias ledger",
            false,
        ),
        (
            "BalanceLost",
            "the coordinator restarted and cannot rebuild",
            false,
        ),
    ] {
        assert!(!restartable(kind, deterministic), "{kind}: {why}");
        assert_eq!(
            decide(
                &stored(3, 0, None),
                &Failure {
                    kind,
                    reason: why,
                    deterministic
                }
            ),
            Decision::Fail { reason: why.into() }
        );
    }
    // Only a placed job restarts.
    let mut pending = stored(3, 0, None);
    pending.phase = pb::JobPhase::Pending as i32;
    assert!(matches!(decide(&pending, &lost()), Decision::Fail { .. }));
}

#[test]
fn a_restarted_job_is_held_back_for_two_heartbeat_intervals() {
    let config = Config::default();
    let mut job = JobEntry {
        stored: stored(3, 1, None),
        ..Default::default()
    };
    job.stored.transitions = vec![
        pb::JobTransition {
            from: pb::JobPhase::Unspecified as i32,
            to: pb::JobPhase::Pending as i32,
            unix_ms: T0 - 10_000,
            reason: "submitted".into(),
        },
        pb::JobTransition {
            from: pb::JobPhase::Running as i32,
            to: pb::JobPhase::Pending as i32,
            unix_ms: T0,
            reason: "restart 1 of 3".into(),
        },
    ];
    let hold = hold_ms(&job.spec(), &config);
    assert_eq!(hold, 2000, "twice the coordinator's heartbeat interval");
    assert!(held_back(&job, T0, &config));
    assert!(held_back(&job, T0 + hold - 1, &config));
    assert!(!held_back(&job, T0 + hold, &config));
    // A job's own heartbeat interval counts, but never less than a second.
    job.stored.spec.as_mut().unwrap().heartbeat_interval_ms = 700;
    assert_eq!(hold_ms(&job.spec(), &config), 1400);
    job.stored.spec.as_mut().unwrap().heartbeat_interval_ms = 200;
    assert_eq!(hold_ms(&job.spec(), &config), 1000);
    // A job never restarted is not held back.
    job.stored.restarts = 0;
    assert!(!held_back(&job, T0, &config));
}

// Through the core.

fn assignments(acts: &[Action]) -> Vec<(String, pb::Assignment)> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Send { worker, msg } => match &msg.msg {
                Some(pb::coordinator_message::Msg::Assignment(a)) => {
                    Some((worker.clone(), a.clone()))
                }
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn stops(acts: &[Action]) -> Vec<String> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Send { worker, msg } => match &msg.msg {
                Some(pb::coordinator_message::Msg::Command(c))
                    if c.kind == pb::CommandKind::Stop as i32 =>
                {
                    Some(worker.clone())
                }
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Both ranks write their part of the checkpoint after `step`.
fn write_checkpoint(core: &mut Core, job: &str, step: u64) {
    for (rank, worker) in holders(core, job).into_iter().enumerate() {
        core.handle(
            Event::CheckpointWritten {
                worker,
                written: Box::new(written(job, rank as u32, step)),
            },
            T0 + 100 + step,
        )
        .expect("checkpoint part");
    }
}

/// Keeps every worker but `except` alive at `now`, then ticks.
fn tick(core: &mut Core, now: UnixMs, except: &str) -> Vec<Action> {
    let ids: Vec<String> = core.state.workers.keys().cloned().collect();
    for id in ids.iter().filter(|id| *id != except) {
        core.heartbeat(id, now).expect("heartbeat");
    }
    core.handle(Event::Tick, now).expect("tick")
}

/// A job of [`spec`] placed on w0 and w1 with w2 idle, trained 5 steps with checkpoints after
/// steps 1 and 3. Returns the bias after step 3 and the holder of rank 1.
fn trained(core: &mut Core, budget: u32) -> (BTreeMap<u32, Vec<f32>>, String) {
    submit(core, spec("j", budget)).expect("submit");
    register(core, 0);
    register(core, 1);
    register(core, 2);
    assert_eq!(core.state.jobs["j"].phase(), pb::JobPhase::Scheduled);
    ready_all(core, "j", T0);
    let mut bias: BTreeMap<u32, Vec<f32>> = (1..=4).map(|l| (l, vec![0.0; 8])).collect();
    let mut after_3 = BTreeMap::new();
    for step in 0..5 {
        run_step(core, "j", step, &mut bias, T0 + step);
        if step % 2 == 1 {
            write_checkpoint(core, "j", step);
        }
        if step == 3 {
            after_3 = bias.clone();
        }
    }
    let victim = holders(core, "j")[1].clone();
    (after_3, victim)
}

#[test]
fn a_lost_worker_restarts_the_job_on_the_spare_from_the_last_checkpoint() {
    let mut core = Core::new(Config::default());
    let (after_3, victim) = trained(&mut core, 3);
    let spare = "w2";
    assert!(!holders(&core, "j").contains(&spare.to_owned()));
    // The committed checkpoint carries the ledger after its step.
    let last = core.state.jobs["j"]
        .stored
        .last_checkpoint
        .clone()
        .expect("checkpoint");
    let ledger = last.ledger.clone().expect("the ledger after step 3");
    assert_eq!(
        (last.step, ledger.after_step, ledger.tokens_seen),
        (3, 3, 400)
    );
    let saved: BTreeMap<u32, Vec<f32>> = ledger
        .layers
        .iter()
        .map(|l| (l.layer, l.values.clone()))
        .collect();
    assert_eq!(saved, after_3);

    // The victim falls silent; the others heartbeat. Past the failure timeout it is lost.
    let mut was = holders(&core, "j");
    was.sort();
    let lost_at = T0 + 6_000;
    let acts = tick(&mut core, lost_at, &victim);
    let entry = &core.state.jobs["j"];
    assert_eq!(entry.phase(), pb::JobPhase::Pending);
    assert_eq!(entry.stored.restarts, 1);
    let reason = &entry.stored.transitions.last().unwrap().reason;
    assert!(
        reason.starts_with(&format!(
            "restart 1 of 3 after worker {victim} (rank 1) lost: silent for"
        )) && reason.ends_with("; resuming from the checkpoint after step 3 (step-00000004)"),
        "{reason}"
    );
    let kinds: Vec<&str> = entry.events.iter().map(|e| e.kind.as_str()).collect();
    assert!(
        kinds.ends_with(&["WorkerLost", "WorkersFreed", "JobRestarting"]),
        "{kinds:?}"
    );
    let want = pb::ResumePoint {
        dir: "/c/step-00000004".into(),
        step: 3,
        ledger: Some(ledger.clone()),
    };
    assert_eq!(entry.spec().resume, Some(want.clone()));
    let p = entry.stored.progress.clone().unwrap();
    assert_eq!(
        (p.step, p.tokens),
        (4, 400),
        "progress back to the checkpoint"
    );
    // Every holder was told to stop (so it frees the device) and holds nothing now.
    let mut stopped = stops(&acts);
    stopped.sort();
    assert_eq!(stopped, was);
    assert!(
        core.state
            .workers
            .values()
            .all(|w| w.stored.held.is_empty())
    );
    assert!(core.state.assignments.is_empty());
    // The restart is stored.
    let put = acts.iter().rev().find_map(|a| match a {
        Action::PutJob(j) => Some(j.clone()),
        _ => None,
    });
    let put = put.expect("the job record is stored");
    assert_eq!((put.restarts, put.phase), (1, pb::JobPhase::Pending as i32));
    assert_eq!(put.spec.unwrap().resume, Some(want.clone()));
    assert!(assignments(&acts).is_empty(), "held back, not placed yet");

    // Within the hold nothing is placed; after it, the job goes to the spare and the survivor.
    let acts = tick(&mut core, lost_at + 1_999, &victim);
    assert!(assignments(&acts).is_empty());
    let acts = tick(&mut core, lost_at + 2_000, &victim);
    let sent = assignments(&acts);
    assert_eq!(sent.len(), 2, "both ranks placed again");
    assert!(
        sent.iter().any(|(w, _)| w == spare),
        "the spare gets a rank"
    );
    assert!(
        sent.iter().all(|(w, _)| *w != victim),
        "the lost worker gets none"
    );
    for (_, a) in &sent {
        assert_eq!(a.resume, Some(want.clone()), "rank {}", a.rank);
    }
    assert!(
        core.state
            .workers
            .values()
            .all(|w| w.stored.held.iter().all(|h| h.next_step == 4))
    );

    // The second attempt runs from step 4 with the ledger of step 3, to the end.
    ready_all(&mut core, "j", lost_at + 2_100);
    assert_eq!(core.runtime["j"].finished, 4);
    let mut bias = after_3;
    for step in 4..10 {
        run_step(&mut core, "j", step, &mut bias, T0 + step);
    }
    for (rank, worker) in holders(&core, "j").into_iter().enumerate() {
        core.handle(
            Event::RankFinished {
                worker,
                job: "j".into(),
                rank: rank as u32,
                ok: true,
                reason: String::new(),
                deterministic: false,
            },
            lost_at + 3_000,
        )
        .expect("rank finished");
    }
    let entry = &core.state.jobs["j"];
    assert_eq!(entry.phase(), pb::JobPhase::Succeeded);
    let p = entry.stored.progress.clone().unwrap();
    assert_eq!((p.step, p.tokens), (10, 1000));
    assert_eq!(entry.stored.restarts, 1);
}

#[test]
fn a_budget_of_zero_fails_the_job_with_the_original_reason() {
    let mut core = Core::new(Config::default());
    let (_, victim) = trained(&mut core, 0);
    tick(&mut core, T0 + 6_000, &victim);
    let entry = &core.state.jobs["j"];
    assert_eq!(entry.phase(), pb::JobPhase::Failed);
    assert_eq!(entry.stored.restarts, 0);
    let reason = &entry.stored.transitions.last().unwrap().reason;
    let lost = entry
        .events
        .iter()
        .find(|e| e.kind == "WorkerLost")
        .expect("event");
    assert_eq!(*reason, lost.message, "the original reason");
    assert!(entry.events.iter().all(|e| e.kind != "JobRestarting"));
}

/// Job `j` of `job` placed on w0 and w1 (w2 idle), READY, with step 0 trained; returns the core
/// and the holder of each rank.
fn after_step_0(job: pb::JobSpec) -> (Core, Vec<String>) {
    let mut core = Core::new(Config::default());
    submit(&mut core, job).expect("submit");
    for i in 0..3 {
        register(&mut core, i);
    }
    ready_all(&mut core, "j", T0);
    let mut bias: BTreeMap<u32, Vec<f32>> = (1..=4).map(|l| (l, vec![0.0; 8])).collect();
    run_step(&mut core, "j", 0, &mut bias, T0);
    let w = holders(&core, "j");
    (core, w)
}

#[test]
fn a_failed_rank_restarts_until_the_budget_is_used_up() {
    let mut job = spec("j", 1);
    job.checkpoint_dir.clear();
    let (mut core, w) = after_step_0(job);
    let fail = |core: &mut Core, worker: &str, rank: u32, now| {
        core.handle(
            Event::RankFinished {
                worker: worker.into(),
                job: "j".into(),
                rank,
                ok: false,
                reason: format!(
                    "step 1: receiving from peer rank {}: the connection was closed",
                    1 - rank
                ),
                deterministic: false,
            },
            now,
        )
    };
    fail(&mut core, &w[0], 0, T0 + 10).expect("rank failed");
    let entry = &core.state.jobs["j"];
    assert_eq!(entry.phase(), pb::JobPhase::Pending);
    let reason = &entry.stored.transitions.last().unwrap().reason;
    assert_eq!(
        *reason,
        format!(
            "restart 1 of 1 after rank 0 failed on worker {}: step 1: receiving from peer rank 1: the connection was closed; starting over from step 0 (no checkpoint committed yet)",
            w[0]
        )
    );
    assert_eq!(entry.spec().resume, None);
    let p = entry.stored.progress.clone().unwrap();
    assert_eq!((p.step, p.tokens), (0, 0));
    // A late failure of the previous attempt's rank is refused: nobody holds it any more.
    let late = fail(&mut core, &w[1], 1, T0 + 20);
    assert!(matches!(late, Err(CoreError::NotHeld { .. })), "{late:?}");

    let acts = tick(&mut core, T0 + 2_010, "");
    assert_eq!(assignments(&acts).len(), 2);
    assert!(assignments(&acts).iter().all(|(_, a)| a.resume.is_none()));
    ready_all(&mut core, "j", T0 + 2_100);
    assert_eq!(core.runtime["j"].finished, 0);
    let w = holders(&core, "j");
    fail(&mut core, &w[0], 0, T0 + 2_200).expect("rank failed");
    let entry = &core.state.jobs["j"];
    assert_eq!(entry.phase(), pb::JobPhase::Failed);
    let reason = &entry.stored.transitions.last().unwrap().reason;
    assert!(
        reason.ends_with(
            "not restarted: the restart budget (spec.faultTolerance.restartBudget 1) is used up after 1 restarts"
        ),
        "{reason}"
    );
    assert!(
        core.state
            .workers
            .values()
            .all(|w| w.stored.held.is_empty())
    );
}

#[test]
fn a_rank_failure_the_worker_marks_deterministic_fails_the_job_within_the_budget() {
    let (mut core, w) = after_step_0(spec("j", 3));
    core.handle(
        Event::RankFinished {
            worker: w[1].clone(),
            job: "j".into(),
            rank: 1,
            ok: false,
            reason: "step 1: non-finite gradient norm at step 1".into(),
            deterministic: true,
        },
        T0 + 10,
    )
    .expect("rank failed");
    let entry = &core.state.jobs["j"];
    assert_eq!(entry.phase(), pb::JobPhase::Failed);
    assert_eq!(entry.stored.restarts, 0);
    assert_eq!(
        entry.stored.transitions.last().unwrap().reason,
        format!(
            "rank 1 failed on worker {}: step 1: non-finite gradient norm at step 1",
            w[1]
        )
    );
}
