//! The state store: one suite run against `MemStore` and `EtcdStore` (a real etcd on free ports),
//! fencing of an older coordinator, and coordinator restarts — on etcd everything resumes and
//! workers reconnect by themselves; on the in-memory store everything is lost, as documented.
//!
//! The etcd tests print `SKIPPED` and pass only when the `etcd` binary is absent (CI installs it).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use coordinator::store::keys::Keys;
use coordinator::{EtcdStore, MemStore, StateStore, StoreError};
use proto::pb;

fn job(name: &str, seq: u64) -> pb::StoredJob {
    pb::StoredJob {
        seq,
        spec: Some(pb::JobSpec {
            name: name.into(),
            pipeline: 2,
            data: 2,
            expert: 2,
            ..Default::default()
        }),
        phase: pb::JobPhase::Pending as i32,
        ..Default::default()
    }
}

fn event(seq: u64, kind: &str) -> pb::JobEvent {
    pb::JobEvent {
        seq,
        unix_ms: 1000 + seq,
        kind: kind.into(),
        message: format!("event {seq}"),
        worker_id: String::new(),
    }
}

/// The same checks for every store: what is written is what `load` returns, in order.
async fn suite<S: StateStore>(store: &S) {
    assert_eq!(store.load().await.expect("load empty"), Default::default());
    store.put_job(&job("a", 0)).await.expect("put job a");
    let mut b = job("b", 1);
    store.put_job(&b).await.expect("put job b");
    b.phase = pb::JobPhase::Running as i32;
    // Progress and the last complete checkpoint survive a restart with the job record.
    b.progress = Some(pb::JobProgress {
        step: 3,
        tokens: 3000,
        ..Default::default()
    });
    b.last_checkpoint = Some(pb::CheckpointInfo {
        step: 2,
        dir: "/ckpt/b/step-2".into(),
        unix_ms: 1234,
        ranks: 4,
        bytes: 4096,
        ledger: None,
    });
    store.put_job(&b).await.expect("overwrite job b");
    let w = pb::StoredWorker {
        worker_id: "node0/0".into(),
        node: "node0".into(),
        held: vec![pb::HeldRank {
            job: "b".into(),
            rank: 3,
            device_index: 0,
            next_step: 0,
        }],
        ..Default::default()
    };
    store.put_worker(&w).await.expect("put worker");
    for rank in [10, 2] {
        let a = pb::Assignment {
            job: "b".into(),
            rank,
            ..Default::default()
        };
        store.put_assignment(&a).await.expect("put assignment");
    }
    store
        .put_assignment(&pb::Assignment {
            job: "a".into(),
            rank: 0,
            ..Default::default()
        })
        .await
        .expect("put assignment a");
    for seq in [0, 1, 2, 10] {
        store
            .append_event("b", &event(seq, "K"))
            .await
            .expect("append");
    }
    store.set_presence("node0/0", true).await.expect("presence");

    let snap = store.load().await.expect("load");
    let names: Vec<String> = snap
        .jobs
        .iter()
        .map(|j| j.spec.as_ref().unwrap().name.clone())
        .collect();
    assert_eq!(names, vec!["a", "b"]);
    assert_eq!(
        snap.jobs[1].phase,
        pb::JobPhase::Running as i32,
        "the last write wins"
    );
    assert_eq!(snap.jobs[1], b, "progress and last checkpoint included");
    assert_eq!(snap.workers, vec![w]);
    let ranks: Vec<(String, u32)> = snap
        .assignments
        .iter()
        .map(|a| (a.job.clone(), a.rank))
        .collect();
    assert_eq!(
        ranks,
        vec![("a".into(), 0), ("b".into(), 2), ("b".into(), 10)]
    );
    let seqs: Vec<u64> = snap.events["b"].iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![0, 1, 2, 10], "events come back in order");

    store
        .delete_assignments("b")
        .await
        .expect("delete assignments");
    let snap = store.load().await.expect("load after delete");
    assert_eq!(snap.assignments.len(), 1, "only job a's assignment is left");
    store
        .set_presence("node0/0", false)
        .await
        .expect("clear presence");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mem_store_keeps_what_it_is_given() {
    suite(&MemStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_keeps_what_it_is_given() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), Keys::new("/suite"))
        .await
        .expect("connect");
    suite(&store).await;
    // Presence keys ride on the coordinator's lease.
    store.set_presence("w", true).await.expect("presence");
    let mut c = etcd_client::Client::connect([etcd.endpoint.clone()], None)
        .await
        .expect("client");
    let kv = c
        .get("/suite/presence/w", None)
        .await
        .expect("get presence");
    assert_eq!(kv.kvs().len(), 1);
    assert!(kv.kvs()[0].lease() != 0, "presence key has a lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_coordinator_fences_the_older_one() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let eps = [etcd.endpoint.clone()];
    let old = EtcdStore::connect(&eps, Keys::new("/fence"))
        .await
        .expect("old");
    old.put_job(&job("a", 0))
        .await
        .expect("old writes while it is the only one");
    let new = EtcdStore::connect(&eps, Keys::new("/fence"))
        .await
        .expect("new");
    assert_eq!(new.epoch(), old.epoch() + 1);
    let err = old.put_job(&job("a", 0)).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "fenced: another coordinator took over the store (our epoch {}, store epoch {})",
            old.epoch(),
            new.epoch()
        )
    );
    new.put_job(&job("a", 0)).await.expect("the new one writes");
}

/// Runs a job on 8 fake workers, stops the coordinator, starts a second one on the same address
/// with `second`, and returns it with the (reconnecting) workers.
async fn restart<S: StateStore>(first: Arc<S>, second: Arc<S>) -> (Running, Vec<FakeWorker>) {
    let coord = Running::start("127.0.0.1:0", first, fast_config()).await;
    let addr = coord.addr;
    let mut client = coord.client().await;
    client
        // A dense model (no MoE layer, no MTP): its run has no routing-bias ledger, which is not
        // persisted yet (a restored MoE job ends; `core::tests` shows that).
        .submit_job(submit_micro(&[
            "spec.faultTolerance.failureTimeout=1s",
            "spec.model.overrides.first_k_dense_replace=8",
            "spec.training.mtp.depth=0",
        ]))
        .await
        .expect("submit");
    let workers = eight_workers(addr, Duration::from_millis(100));
    wait_for("job Running", Duration::from_secs(15), || {
        let mut c = client.clone();
        async move { (phase(&mut c, "micro").await == pb::JobPhase::Running).then_some(()) }
    })
    .await;
    coord.stop().await.expect("first coordinator stops cleanly");
    let coord = Running::start(&addr.to_string(), second, fast_config()).await;
    (coord, workers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_restarted_on_etcd_resumes_jobs_and_registrations() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let eps = [etcd.endpoint.clone()];
    let first = Arc::new(
        EtcdStore::connect(&eps, Keys::default())
            .await
            .expect("first store"),
    );
    let coord = Running::start("127.0.0.1:0", first.clone(), fast_config()).await;
    let addr = coord.addr;
    let mut client = coord.client().await;
    client
        // A dense model (no MoE layer, no MTP): its run has no routing-bias ledger, which is not
        // persisted yet (a restored MoE job ends; `core::tests` shows that).
        .submit_job(submit_micro(&[
            "spec.faultTolerance.failureTimeout=1s",
            "spec.model.overrides.first_k_dense_replace=8",
            "spec.training.mtp.depth=0",
        ]))
        .await
        .expect("submit");
    let workers = eight_workers(addr, Duration::from_millis(100));
    wait_for("job Running", Duration::from_secs(15), || {
        let mut c = client.clone();
        async move { (phase(&mut c, "micro").await == pb::JobPhase::Running).then_some(()) }
    })
    .await;
    let before = client
        .describe_job(pb::DescribeJobRequest {
            name: "micro".into(),
        })
        .await
        .expect("describe")
        .into_inner();
    coord.stop().await.expect("first coordinator stops cleanly");
    drop(first);

    let second = Arc::new(
        EtcdStore::connect(&eps, Keys::default())
            .await
            .expect("second store"),
    );
    let coord = Running::start(&addr.to_string(), second, fast_config()).await;
    let mut client = coord.client().await;
    let after = client
        .describe_job(pb::DescribeJobRequest {
            name: "micro".into(),
        })
        .await
        .expect("job survives")
        .into_inner();
    assert_eq!(
        after.job.as_ref().unwrap().phase,
        pb::JobPhase::Running as i32
    );
    assert_eq!(after.transitions, before.transitions);
    assert_eq!(after.placement, before.placement);
    assert_eq!(after.events[..before.events.len()], before.events[..]);
    let listed = client
        .list_workers(pb::ListWorkersRequest {})
        .await
        .expect("list")
        .into_inner()
        .workers;
    assert_eq!(listed.len(), 8, "every registration survives");
    // Workers reconnect by themselves and resume their registration; the job keeps running past
    // the failure timeout.
    wait_for("every worker resumed", Duration::from_secs(10), || {
        let all = workers.iter().all(|w| {
            w.seen(|s| s.registered.last().is_some_and(|r| r.resumed) && s.registered.len() >= 2)
        });
        async move { all.then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(phase(&mut client, "micro").await, pb::JobPhase::Running);
    let listed = client
        .list_workers(pb::ListWorkersRequest {})
        .await
        .expect("list")
        .into_inner()
        .workers;
    assert!(
        listed
            .iter()
            .all(|w| w.connected && w.state == pb::WorkerState::Busy as i32)
    );
    // Each worker got its assignment again after the restart (idempotent by job and rank).
    assert!(workers.iter().all(|w| w.seen(|s| s.assignments.len() == 2)));
    coord
        .stop()
        .await
        .expect("second coordinator stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_restarted_on_the_memory_store_loses_everything() {
    let (coord, workers) = restart(Arc::new(MemStore::new()), Arc::new(MemStore::new())).await;
    let mut client = coord.client().await;
    let jobs = client
        .list_jobs(pb::ListJobsRequest {})
        .await
        .expect("list")
        .into_inner()
        .jobs;
    assert!(
        jobs.is_empty(),
        "the in-memory store loses every job on restart"
    );
    let err = client
        .get_job(pb::GetJobRequest {
            name: "micro".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    // Workers come back, but as new registrations holding nothing.
    wait_for(
        "every worker registered again",
        Duration::from_secs(10),
        || {
            let all = workers.iter().all(|w| w.seen(|s| s.registered.len() >= 2));
            async move { all.then_some(()) }
        },
    )
    .await;
    assert!(
        workers
            .iter()
            .all(|w| w.seen(|s| !s.registered.last().unwrap().resumed))
    );
    let listed = client
        .list_workers(pb::ListWorkersRequest {})
        .await
        .expect("list")
        .into_inner()
        .workers;
    assert_eq!(listed.len(), 8);
    assert!(
        listed
            .iter()
            .all(|w| w.state == pb::WorkerState::Idle as i32)
    );
    coord.stop().await.expect("clean shutdown");
}
