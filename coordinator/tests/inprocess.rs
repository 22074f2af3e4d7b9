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
