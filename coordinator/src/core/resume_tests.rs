//! Unit tests of distributed resume in the core (`moetrain submit/local --resume`): the resume
//! point is checked against the job on submit, a resumed job's progress, assignments and ledger
//! start after the checkpoint's step, and a committed checkpoint carries the ledger after its step
//! even when the ledger finished later steps before the checkpoint's last part arrived.

use super::*;
use crate::Config;

/// The time every fixture here acts at (the recovery tests share it).
pub(super) const T0: UnixMs = 2_000_000;

/// The core tests' MoE job (1F1B over two pipeline ranks of a 4-layer model, layer 0 dense, one
/// MTP layer: rank 0 routes layer 1, rank 1 layers 2, 3 and the MTP layer 4; γ = 0.5, 8 experts,
/// 10 steps, 100 tokens per step) with a checkpoint every 2 steps into `/c`.
pub(super) fn moe_spec(name: &str) -> pb::JobSpec {
    pb::JobSpec {
        checkpoint_dir: "/c".into(),
        checkpoint_interval: 2,
        ..super::tests::moe_spec(name)
    }
}

/// The layers each rank of [`moe_spec`] routes with.
const LAYERS: [&[u32]; 2] = [&[1], &[2, 3, 4]];

fn ledger_after(step: u64, base: f32) -> pb::LedgerSnapshot {
    pb::LedgerSnapshot {
        after_step: step,
        tokens_seen: (step + 1) * 100,
        layers: (1..=4u32)
            .map(|layer| pb::LayerBias {
                layer,
                values: (0..8)
                    .map(|e| base + (layer * 8 + e) as f32 * 1e-3)
                    .collect(),
            })
            .collect(),
    }
}

fn resume_at(step: u64) -> pb::ResumePoint {
    pb::ResumePoint {
        dir: format!("/c/step-{:08}", step + 1),
        step,
        ledger: Some(ledger_after(step, 0.25)),
    }
}

/// Submits `spec` at `T0`.
pub(super) fn submit(core: &mut Core, spec: pb::JobSpec) -> Result<Vec<Action>, CoreError> {
    core.handle(
        Event::Submit(Box::new(Submission {
            spec,
            manifest_yaml: "apiVersion: moetrain/v1".into(),
            overrides: vec![],
            origin: "test.yaml".into(),
        })),
        T0,
    )
}

/// Registers worker `w{i}` with one CPU device (index `i`) at `T0`.
pub(super) fn register(core: &mut Core, i: u32) -> Vec<Action> {
    core.handle(
        Event::Register {
            reg: Registration {
                worker_id: format!("w{i}"),
                node: "n".into(),
                devices: vec![pb::Device {
                    kind: pb::DeviceKind::Cpu as i32,
                    index: i,
                    memory_bytes: 1 << 30,
                    data_plane_addr: String::new(),
                }],
                data_plane_addr: format!("127.0.0.1:{}", 9100 + i),
            },
            session: 1,
        },
        T0,
    )
    .expect("register")
}

/// Registers two single-device workers; returns the assignments they were sent.
fn place(core: &mut Core) -> Vec<pb::Assignment> {
    let acts: Vec<Action> = (0..2).flat_map(|i| register(core, i)).collect();
    acts.iter()
        .filter_map(|a| match a {
            Action::Send { msg, .. } => match &msg.msg {
                Some(pb::coordinator_message::Msg::Assignment(a)) => Some(a.clone()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The worker holding each rank, in rank order.
pub(super) fn holders(core: &Core, job: &str) -> Vec<String> {
    let mut ranks = core.state.jobs[job]
        .stored
        .placement
        .as_ref()
        .expect("placed")
        .ranks
        .clone();
    ranks.sort_by_key(|r| r.rank);
    ranks.into_iter().map(|r| r.worker_id).collect()
}

/// Every rank of `job` acknowledges its assignment READY at `now`.
pub(super) fn ready_all(core: &mut Core, job: &str, now: UnixMs) {
    for (rank, worker) in holders(core, job).into_iter().enumerate() {
        core.handle(
            Event::Ack {
                worker,
                job: job.into(),
                rank: rank as u32,
                ready: true,
                reason: String::new(),
            },
            now,
        )
        .expect("ack");
    }
}

fn counts(rank: u32, step: u64) -> Vec<pb::ExpertCounts> {
    LAYERS[rank as usize]
        .iter()
        .map(|&layer| pb::ExpertCounts {
            layer,
            counts: (0..8u64)
                .map(|e| (e * 5 + u64::from(layer) + u64::from(rank) + step) % 9)
                .collect(),
        })
        .collect()
}

/// Both ranks report `step` at `now`, routing with `bias` (every layer, updated from the
/// coordinator's broadcast, which must come).
pub(super) fn run_step(
    core: &mut Core,
    job: &str,
    step: u64,
    bias: &mut BTreeMap<u32, Vec<f32>>,
    now: UnixMs,
) {
    let w = holders(core, job);
    let mut updates = Vec::new();
    for rank in 0..2u32 {
        let checksum = routing::rank_checksum(
            LAYERS[rank as usize]
                .iter()
                .map(|l| (*l, bias[l].as_slice())),
        );
        let acts = core
            .handle(
                Event::StepReport {
                    worker: w[rank as usize].clone(),
                    report: Box::new(pb::StepReport {
                        job: job.into(),
                        rank,
                        step,
                        tokens: 100,
                        step_seconds: 0.5,
                        expert_counts: counts(rank, step),
                        bias_step: step.saturating_sub(1),
                        bias_checksum: checksum,
                        ..Default::default()
                    }),
                },
                now,
            )
            .expect("step report");
        for a in acts {
            if let Action::Send { msg, .. } = a
                && let Some(pb::coordinator_message::Msg::BiasUpdate(u)) = msg.msg
            {
                updates.push(u);
            }
        }
    }
    assert_eq!(phase(core, job), pb::JobPhase::Running, "step {step}");
    assert!(!updates.is_empty(), "step {step} produced no bias");
    for u in updates {
        assert_eq!(u.step, step);
        for l in u.layers {
            bias.insert(l.layer, l.values);
        }
    }
}

fn phase(core: &Core, job: &str) -> pb::JobPhase {
    core.state.jobs[job].phase()
}

/// Rank `rank`'s part of the checkpoint after `step` (one file).
pub(super) fn written(job: &str, rank: u32, step: u64) -> pb::CheckpointWritten {
    pb::CheckpointWritten {
        job: job.into(),
        rank,
        step,
        dir: format!("/c/step-{:08}", step + 1),
        files: vec![pb::CheckpointFile {
            path: format!("rank-{rank}/stage-{rank}/model.safetensors"),
            bytes: 1000,
            sha256: "0123456789abcdef".repeat(4),
        }],
    }
}

#[test]
fn a_resume_point_is_checked_against_the_job_on_submit() {
    let invalid = |r: pb::ResumePoint, want: &str| {
        let mut core = Core::new(Config::default());
        let err = submit(
            &mut core,
            pb::JobSpec {
                resume: Some(r),
                ..moe_spec("r")
            },
        )
        .expect_err("refused");
        assert!(matches!(err, CoreError::Invalid(_)), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(want), "{text} lacks {want:?}");
        assert!(core.state.jobs.is_empty(), "nothing stored");
    };
    // The last step (9) leaves nothing to train, and neither does a later one.
    invalid(resume_at(9), "only 10 steps");
    invalid(resume_at(12), "only 10 steps");
    invalid(
        pb::ResumePoint {
            ledger: None,
            ..resume_at(3)
        },
        "no routing-bias ledger",
    );
    let mut other_layers = resume_at(3);
    other_layers.ledger.as_mut().unwrap().layers.pop();
    invalid(other_layers, "layers [1, 2, 3]");
    let mut other_experts = resume_at(3);
    other_experts.ledger.as_mut().unwrap().layers[1]
        .values
        .push(0.0);
    invalid(other_experts, "9 bias values for layer 2");
    let mut stale = resume_at(3);
    stale.ledger.as_mut().unwrap().after_step = 2;
    invalid(stale, "saved after step 2");
    let mut nan = resume_at(3);
    nan.ledger.as_mut().unwrap().layers[0].values[3] = f32::NAN;
    invalid(nan, "non-finite");
    invalid(
        pb::ResumePoint {
            dir: String::new(),
            ..resume_at(3)
        },
        "directory is empty",
    );

    // A valid point is stored with the spec and moves the progress past its step.
    let mut core = Core::new(Config::default());
    submit(
        &mut core,
        pb::JobSpec {
            resume: Some(resume_at(3)),
            ..moe_spec("r")
        },
    )
    .expect("valid resume point");
    let stored = &core.state.jobs["r"].stored;
    assert_eq!(stored.spec.as_ref().unwrap().resume, Some(resume_at(3)));
    let p = stored.progress.as_ref().expect("progress");
    assert_eq!((p.step, p.tokens), (4, 400));
}

#[test]
fn a_resumed_job_starts_after_its_checkpoint_with_the_saved_ledger() {
    let mut core = Core::new(Config::default());
    submit(
        &mut core,
        pb::JobSpec {
            resume: Some(resume_at(3)),
            ..moe_spec("r")
        },
    )
    .expect("submit");
    let assignments = place(&mut core);
    assert_eq!(assignments.len(), 2);
    for a in &assignments {
        assert_eq!(a.resume, Some(resume_at(3)), "rank {}", a.rank);
    }
    for w in core.state.workers.values() {
        assert!(w.stored.held.iter().all(|h| h.next_step == 4));
    }
    ready_all(&mut core, "r", T0);
    let rt = &core.runtime["r"];
    assert_eq!(rt.finished, 4);
    let ledger = rt.ledger.as_ref().expect("ledger");
    assert_eq!((ledger.version(), ledger.collecting()), (Some(3), 4));
    assert_eq!(ledger.tokens_seen(), 400);
    let saved = ledger_after(3, 0.25);
    for l in &saved.layers {
        assert_eq!(ledger.bias(l.layer), Some(l.values.as_slice()));
    }
    // Step 4 routes with the saved bias; the ledger's next bias applies the rule to it.
    let mut bias: BTreeMap<u32, Vec<f32>> = saved
        .layers
        .iter()
        .map(|l| (l.layer, l.values.clone()))
        .collect();
    let mut expect = bias.clone();
    run_step(&mut core, "r", 4, &mut bias, T0 + 4);
    for rank in 0..2u32 {
        for c in counts(rank, 4) {
            let b = expect.get_mut(&c.layer).unwrap();
            routing::apply_sign_rule(b, &c.counts, 0.5, routing::UpdateVariant::Sign);
        }
    }
    assert_eq!(bias, expect, "the rule applied to the restored bias");
    let rt = &core.runtime["r"];
    assert_eq!(rt.finished, 5);
    assert_eq!(rt.history.front().map(|s| s.step), Some(4));
    let p = core.state.jobs["r"].stored.progress.as_ref().unwrap();
    assert_eq!((p.step, p.tokens), (5, 500));
}

#[test]
fn a_committed_checkpoint_carries_the_ledger_after_its_step() {
    let mut core = Core::new(Config::default());
    submit(&mut core, moe_spec("c")).expect("submit");
    place(&mut core);
    ready_all(&mut core, "c", T0);
    let mut bias: BTreeMap<u32, Vec<f32>> = (1..=4).map(|l| (l, vec![0.0; 8])).collect();
    run_step(&mut core, "c", 0, &mut bias, T0);
    run_step(&mut core, "c", 1, &mut bias, T0 + 1);
    let after_1 = bias.clone();
    // The ledger finishes step 2 before the checkpoint of step 1 is complete.
    let w = holders(&core, "c");
    core.handle(
        Event::CheckpointWritten {
            worker: w[0].clone(),
            written: Box::new(written("c", 0, 1)),
        },
        T0 + 10,
    )
    .expect("part");
    run_step(&mut core, "c", 2, &mut bias, T0 + 2);
    assert_ne!(bias, after_1, "the ledger moved on");
    let acts = core
        .handle(
            Event::CheckpointWritten {
                worker: w[1].clone(),
                written: Box::new(written("c", 1, 1)),
            },
            T0 + 11,
        )
        .expect("part");
    let committed: Vec<pb::CheckpointCommitted> = acts
        .into_iter()
        .filter_map(|a| match a {
            Action::Send { msg, .. } => match msg.msg {
                Some(pb::coordinator_message::Msg::CheckpointCommitted(c)) => Some(c),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(committed.len(), 1);
    let ledger = committed[0]
        .ledger
        .clone()
        .expect("the ledger after step 1");
    assert_eq!((ledger.after_step, ledger.tokens_seen), (1, 200));
    let got: BTreeMap<u32, Vec<f32>> = ledger
        .layers
        .into_iter()
        .map(|l| (l.layer, l.values))
        .collect();
    assert_eq!(got, after_1);
    // Only checkpoint steps are kept: step 2 (done = 3) wrote none.
    assert!(core.runtime["c"].ledger_snapshots.is_empty());
}
