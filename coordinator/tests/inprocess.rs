//! The contract, proven in one process: `coordinator::run` on `127.0.0.1:0` with a `MemStore`,
//! a tonic client and fake workers. A job is submitted, gang-scheduled onto 2 nodes × 4 workers,
//! runs when every rank is ready, and cancel frees the workers; a silent worker is lost within
//! the failure timeout and fails its job with the reason; bad requests get statuses that say why.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use coordinator::MemStore;
use plan::ids::{DeviceIdx, Rank, StageIdx};
use plan::placement::{Placement, RankPlacement};
use plan::topology::{Cluster, Node};
use proto::pb;

const HB: Duration = Duration::from_millis(100);

/// Rebuilds the plan's placement from what the client sees, to check it with `Placement::verify`.
fn plan_placement(p: &pb::Placement, req: &plan::placement::PlacementRequest) -> Placement {
    let ranks = p
        .ranks
        .iter()
        .map(|r| {
            let experts = r.experts.expect("experts");
            RankPlacement {
                rank: Rank(r.rank),
                node: r.node.clone(),
                device: DeviceIdx(r.device_index),
                pipeline_rank: r.pp_idx,
                stages: r.stages.iter().map(|s| StageIdx(*s)).collect(),
                dp: r.dp_idx,
                ep_group: r.dp_idx / req.parallel.expert,
                ep: r.ep_idx,
                experts: experts.begin..experts.end,
                expert_groups: req.group_range(r.ep_idx),
                reason: p
                    .reasons
                    .iter()
                    .find(|s| s.starts_with(&format!("rank {}:", r.rank)))
                    .cloned()
                    .unwrap_or_default(),
            }
        })
        .collect();
    Placement {
        ranks,
        decisions: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitted_job_runs_on_eight_fake_workers_and_cancel_frees_them() {
    let coord = Running::start("127.0.0.1:0", Arc::new(MemStore::new()), fast_config()).await;
    let mut client = coord.client().await;
    let job = client
        .submit_job(submit_micro(&[]))
        .await
        .expect("submit")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(job.name, "micro");
    assert_eq!(job.phase, pb::JobPhase::Pending as i32);
    assert_eq!(
        (job.pipeline, job.data, job.expert, job.schedule.as_str()),
        (4, 2, 2, "dualpipe")
    );

    let workers = eight_workers(coord.addr, HB);
    wait_for("job Running", Duration::from_secs(15), || {
        let mut c = client.clone();
        async move { (phase(&mut c, "micro").await == pb::JobPhase::Running).then_some(()) }
    })
    .await;

    let d = client
        .describe_job(pb::DescribeJobRequest {
            name: "micro".into(),
        })
        .await
        .expect("describe")
        .into_inner();
    let phases: Vec<&str> = d
        .transitions
        .iter()
        .map(|t| pb::JobPhase::try_from(t.to).expect("phase").name())
        .collect();
    assert_eq!(phases, vec!["Pending", "Scheduled", "Running"]);
    assert!(
        d.transitions
            .iter()
            .all(|t| !t.reason.is_empty() && t.unix_ms > 0)
    );
    let placement = d.placement.expect("placement");
    let ranks: Vec<u32> = placement.ranks.iter().map(|r| r.rank).collect();
    assert_eq!(ranks, (0..8).collect::<Vec<_>>(), "every rank placed once");
    let used: BTreeSet<&str> = placement
        .ranks
        .iter()
        .map(|r| r.worker_id.as_str())
        .collect();
    assert_eq!(used.len(), 8, "every worker holds one rank");

    // The placement keeps the rules, checked independently by the plan's verifier.
    let sub = coordinator::spec::submission(&micro_manifest(), "micro.yaml", &[]).expect("spec");
    let req = coordinator::core::scheduler::request_of(&sub.spec).expect("request");
    let cluster =
        Cluster::new(vec![Node::uniform("n0", 4), Node::uniform("n1", 4)]).expect("cluster");
    plan_placement(&placement, &req)
        .verify(&req, &cluster)
        .expect("placement keeps the rules");

    // Every worker got its assignment, with all 8 peers.
    for w in &workers {
        let a = w.seen(|s| s.assignments.clone());
        assert_eq!(a.len(), 1, "{} got one assignment", w.id);
        assert_eq!(a[0].peers.len(), 8);
        assert_eq!(a[0].manifest_yaml, micro_manifest());
    }

    let cancelled = client
        .cancel_job(pb::CancelJobRequest {
            name: "micro".into(),
            reason: String::new(),
        })
        .await
        .expect("cancel")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(cancelled.phase, pb::JobPhase::Cancelled as i32);
    let listed = client
        .list_workers(pb::ListWorkersRequest {})
        .await
        .expect("list workers")
        .into_inner()
        .workers;
    assert_eq!(listed.len(), 8);
    assert!(
        listed
            .iter()
            .all(|w| w.state == pb::WorkerState::Idle as i32 && w.held.is_empty() && w.connected)
    );
    wait_for(
        "every worker told to cancel",
        Duration::from_secs(5),
        || {
            let all = workers.iter().all(|w| {
                w.seen(|s| {
                    s.commands
                        .iter()
                        .any(|c| c.kind == pb::CommandKind::Cancel as i32)
                })
            });
            async move { all.then_some(()) }
        },
    )
    .await;
    let err = client
        .cancel_job(pb::CancelJobRequest {
            name: "micro".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(err.message(), "job `micro` already ended (Cancelled)");
    coord.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_is_lost_within_the_failure_timeout_and_fails_its_job() {
    let coord = Running::start("127.0.0.1:0", Arc::new(MemStore::new()), fast_config()).await;
    let mut client = coord.client().await;
    client
        .submit_job(submit_micro(&[
            "spec.faultTolerance.failureTimeout=1s",
            "spec.faultTolerance.heartbeatInterval=100ms",
            // This test is about failing: no automatic restart.
            "spec.faultTolerance.restartBudget=0",
        ]))
        .await
        .expect("submit");
    let mut workers = eight_workers(coord.addr, HB);
    wait_for("job Running", Duration::from_secs(15), || {
        let mut c = client.clone();
        async move { (phase(&mut c, "micro").await == pb::JobPhase::Running).then_some(()) }
    })
    .await;
    let victim = workers.remove(5);
    let victim_id = victim.id.clone();
    let killed = Instant::now();
    victim.kill();
    wait_for("job Failed", Duration::from_secs(5), || {
        let mut c = client.clone();
        async move { (phase(&mut c, "micro").await == pb::JobPhase::Failed).then_some(()) }
    })
    .await;
    let elapsed = killed.elapsed();
    // Lost after 1 s of silence, noticed within a tick or two.
    assert!(
        elapsed >= Duration::from_millis(900),
        "lost too early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_millis(2500),
        "lost too late: {elapsed:?}"
    );
    let d = client
        .describe_job(pb::DescribeJobRequest {
            name: "micro".into(),
        })
        .await
        .expect("describe")
        .into_inner();
    let lost = d
        .events
        .iter()
        .find(|e| e.kind == "WorkerLost")
        .expect("a WorkerLost event");
    assert_eq!(lost.worker_id, victim_id);
    assert!(
        lost.message
            .starts_with(&format!("worker {victim_id} (rank ")),
        "{}",
        lost.message
    );
    assert!(
        lost.message
            .contains("failure timeout 1.0s, session closed"),
        "{}",
        lost.message
    );
    assert_eq!(d.job.expect("job").reason, lost.message);
    let listed = client
        .list_workers(pb::ListWorkersRequest {})
        .await
        .expect("list")
        .into_inner()
        .workers;
    let v = listed
        .iter()
        .find(|w| w.worker_id == victim_id)
        .expect("victim listed");
    assert_eq!(v.state, pb::WorkerState::Lost as i32);
    assert!(
        listed
            .iter()
            .filter(|w| w.worker_id != victim_id)
            .all(|w| w.state == pb::WorkerState::Idle as i32)
    );
    coord.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_statuses_that_name_the_problem() {
    let coord = Running::start("127.0.0.1:0", Arc::new(MemStore::new()), fast_config()).await;
    let mut client = coord.client().await;

    let err = client
        .submit_job(submit_micro(&["spec.parallelism.pipeline=3"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("spec.parallelism.pipeline"),
        "{}",
        err.message()
    );

    let broken = pb::SubmitJobRequest {
        manifest_yaml: "apiVersion: moetrain/v1\nkind: TrainingJob\nmetadata:\n  name: x\n  bogus: 1\nspec:\n  model:\n    preset: micro\n".into(),
        origin: "broken.yaml".into(),
        overrides: vec![],
        resume: None,
    };
    let err = client.submit_job(broken).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().starts_with("broken.yaml:5:"),
        "line and column pass through: {}",
        err.message()
    );

    client
        .submit_job(submit_micro(&[]))
        .await
        .expect("first submit");
    let err = client.submit_job(submit_micro(&[])).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (tonic::Code::AlreadyExists, "job `micro` already exists")
    );

    let err = client
        .get_job(pb::GetJobRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (tonic::Code::NotFound, "job `nope` not found")
    );

    // A session must start with Register.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", coord.addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut sessions = pb::worker_session_client::WorkerSessionClient::new(channel);
    let first = tokio_stream::iter(vec![pb::WorkerMessage::heartbeat(1)]);
    let err = sessions.session(first).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "the first message of a session must be Register"
    );
    coord.stop().await.expect("clean shutdown");
}

/// Per-expert counts a fake rank reports for one layer and step (arbitrary but fixed).
fn fake_counts(rank: u32, step: u64, layer: u32, experts: usize) -> Vec<u64> {
    (0..experts as u64)
        .map(|e| (e * 5 + u64::from(layer) * 3 + u64::from(rank) * 7 + step) % 11)
        .collect()
}

/// Issues 6 and 7 through the server: fake workers get their schedule rows, report steps with
/// expert counts and bias checksums, write checkpoint parts; the coordinator keeps progress and
/// the step history, sends every holder the ledger's bias, commits the checkpoint to rank 0's
/// holder, serves the telemetry, and fails the job when a rank's bias checksum is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_workers_train_two_steps_with_bias_updates_checkpoints_and_a_caught_bad_checksum() {
    use plan::layers::LayerLayout;
    use plan::schedule::ScheduleKind;
    use proto::pb::worker_message::Msg;

    let overrides = [
        "spec.checkpointing.dir=/ckpt/micro",
        "spec.checkpointing.interval=1",
    ];
    let coord = Running::start("127.0.0.1:0", Arc::new(MemStore::new()), fast_config()).await;
    let mut client = coord.client().await;
    client
        .submit_job(submit_micro(&overrides))
        .await
        .expect("submit");
    let workers = eight_workers(coord.addr, HB);
    wait_for("job Running", Duration::from_secs(15), || {
        let mut c = client.clone();
        async move { (phase(&mut c, "micro").await == pb::JobPhase::Running).then_some(()) }
    })
    .await;

    // Ops: the DualPipe row of each pipeline rank, 8 micro-batches per replica.
    let schedule = ScheduleKind::DualPipe.generate(4, 8).expect("schedule");
    let mut holder: Vec<(u32, &FakeWorker, pb::Assignment)> = Vec::new();
    for w in &workers {
        let a = w.seen(|s| s.assignments[0].clone());
        let ops: Vec<_> = a.ops.iter().map(|o| o.to_plan().expect("op")).collect();
        assert_eq!(ops, schedule.ops[a.pp_idx as usize], "rank {}", a.rank);
        assert_eq!(
            (a.checkpoint_dir.as_str(), a.checkpoint_interval),
            ("/ckpt/micro", 1)
        );
        holder.push((a.rank, w, a));
    }
    holder.sort_by_key(|(r, _, _)| *r);

    // What each rank routes: micro with 8 layers (layer 0 dense) and one MTP layer (id 8).
    let sub = coordinator::spec::submission(&micro_manifest(), "m", &overrides.map(String::from))
        .expect("spec");
    let bal = sub.spec.balance.expect("balance spec");
    let layout = LayerLayout {
        num_hidden_layers: bal.num_hidden_layers,
        first_k_dense_replace: bal.first_k_dense_replace,
        moe_layer_freq: bal.moe_layer_freq,
        mtp_depth: bal.mtp_depth,
    };
    assert_eq!(layout.moe_layers(), (1..=8).collect::<Vec<u32>>());
    let experts = sub.spec.n_routed_experts as usize;
    let rank_layers: Vec<Vec<u32>> = holder
        .iter()
        .map(|(_, _, a)| layout.rank_moe_layers(4, &a.stages))
        .collect();
    // Every rank starts from zero bias; the expected bias follows the shared rule.
    let mut bias: std::collections::BTreeMap<u32, Vec<f32>> = layout
        .moe_layers()
        .into_iter()
        .map(|l| (l, vec![0.0f32; experts]))
        .collect();
    let report = |rank: u32, step: u64, bias: &std::collections::BTreeMap<u32, Vec<f32>>| {
        let layers = &rank_layers[rank as usize];
        pb::StepReport {
            job: "micro".into(),
            rank,
            step,
            losses: vec![pb::LossTerm {
                name: "total".into(),
                value: 4.0 - step as f64,
            }],
            tokens: 512,
            step_seconds: 0.5 + f64::from(rank) / 100.0,
            expert_counts: layers
                .iter()
                .map(|&layer| pb::ExpertCounts {
                    layer,
                    counts: fake_counts(rank, step, layer, experts),
                })
                .collect(),
            bias_step: step.saturating_sub(1),
            bias_checksum: routing::rank_checksum(layers.iter().map(|l| (*l, bias[l].as_slice()))),
            grad_norm: 0.8,
            lr: 1e-3,
            ..Default::default()
        }
    };

    // Step 0: every rank reports; each holder gets the new bias of exactly its layers.
    for (rank, w, _) in &holder {
        assert!(w.send(Msg::StepReport(report(*rank, 0, &bias))));
    }
    for (layer, b) in bias.iter_mut() {
        let mut load = vec![0u64; experts];
        for (rank, layers) in rank_layers.iter().enumerate() {
            if layers.contains(layer) {
                for (s, c) in load
                    .iter_mut()
                    .zip(fake_counts(rank as u32, 0, *layer, experts))
                {
                    *s += c;
                }
            }
        }
        routing::apply_sign_rule(b, &load, bal.rate, routing::UpdateVariant::Sign);
    }
    for (rank, w, _) in &holder {
        let u = wait_for("bias update", Duration::from_secs(5), || {
            let u = w.seen(|s| s.bias_updates.first().cloned());
            async move { u }
        })
        .await;
        assert_eq!(u.step, 0);
        let layers: Vec<u32> = u.layers.iter().map(|l| l.layer).collect();
        assert_eq!(layers, rank_layers[*rank as usize], "rank {rank}");
        for l in &u.layers {
            assert_eq!(l.values, bias[&l.layer], "rank {rank} layer {}", l.layer);
        }
    }
    let steps = client
        .job_steps(pb::JobStepsRequest {
            name: "micro".into(),
            from_step: 0,
            limit: 0,
        })
        .await
        .expect("job steps")
        .into_inner();
    assert_eq!(steps.steps.len(), 1);
    let s0 = &steps.steps[0];
    assert_eq!(
        (s0.step, s0.tokens, s0.step_seconds),
        (0, 512, 0.5 + 7.0 / 100.0),
        "the slowest rank's time"
    );
    assert_eq!(s0.layer_loads.len(), 8);
    let p = steps.job.expect("job").progress.expect("progress");
    assert_eq!((p.step, p.tokens, p.loss), (1, 512, 4.0));

    // Checkpoint after step 0: committed once all 8 parts are in, at rank 0's holder.
    let sha = "ab".repeat(32);
    for (rank, w, _) in &holder {
        assert!(w.send(Msg::CheckpointWritten(pb::CheckpointWritten {
            job: "micro".into(),
            rank: *rank,
            step: 0,
            dir: "/ckpt/micro/step-0".into(),
            files: vec![pb::CheckpointFile {
                path: format!("rank-{rank}/model.safetensors"),
                bytes: 10,
                sha256: sha.clone(),
            }],
        })));
    }
    let c = wait_for("checkpoint committed", Duration::from_secs(5), || {
        let c = holder[0].1.seen(|s| s.committed.first().cloned());
        async move { c }
    })
    .await;
    assert_eq!(
        (c.step, c.dir.as_str(), c.ranks.len()),
        (0, "/ckpt/micro/step-0", 8)
    );
    assert!(
        holder[1..]
            .iter()
            .all(|(_, w, _)| w.seen(|s| s.committed.is_empty()))
    );
    let job = client
        .get_job(pb::GetJobRequest {
            name: "micro".into(),
        })
        .await
        .expect("get")
        .into_inner()
        .job
        .expect("job");
    let info = job.last_checkpoint.expect("last checkpoint");
    assert_eq!((info.step, info.ranks, info.bytes), (0, 8, 80));

    let loads = client
        .expert_loads(pb::ExpertLoadsRequest {
            name: "micro".into(),
            history: 0,
        })
        .await
        .expect("expert loads")
        .into_inner();
    assert_eq!(loads.step, Some(0));
    assert_eq!(loads.layers.len(), 8);
    assert_eq!(loads.history.len(), 1);

    // Step 1: rank 5 still routes with the initial bias; the job fails naming it.
    for (rank, w, _) in &holder {
        let r = if *rank == 5 {
            let zero: std::collections::BTreeMap<u32, Vec<f32>> =
                bias.keys().map(|l| (*l, vec![0.0f32; experts])).collect();
            report(*rank, 1, &zero)
        } else {
            report(*rank, 1, &bias)
        };
        assert!(w.send(Msg::StepReport(r)));
    }
    wait_for("job Failed", Duration::from_secs(5), || {
        let mut c = client.clone();
        async move { (phase(&mut c, "micro").await == pb::JobPhase::Failed).then_some(()) }
    })
    .await;
    let d = client
        .describe_job(pb::DescribeJobRequest {
            name: "micro".into(),
        })
        .await
        .expect("describe")
        .into_inner();
    let reason = d.job.expect("job").reason;
    assert!(
        reason.contains("bias checksum mismatch at step 1: rank 5"),
        "{reason}"
    );
    assert!(d.events.iter().any(|e| e.kind == "BiasChecksumMismatch"));
    coord.stop().await.expect("clean shutdown");
}
