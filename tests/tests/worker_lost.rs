//! Acceptance 3 of issue 2: a worker killed with SIGKILL is marked Lost within the failure
//! timeout (2 s here, set on the coordinator and in micro.yaml), and its job's events say why
//! (its id in WorkerLost, or its rank in a neighbour's RankFailed when the data plane noticed
//! first); the job is Failed with that reason. The job runs with `restartBudget: 0` (automatic
//! restart is `recovery.rs`'s scenario).

use anyhow::{Context as _, ensure};
use e2e::{Cluster, Scratch, Store, phase, repo_root};
use std::time::{Duration, Instant};

/// The failure timeout the scenario runs with (`COORDINATOR_FLAGS`, micro.yaml).
const FAILURE_TIMEOUT: Duration = Duration::from_secs(2);

/// Slack on top of the timeout for the coordinator's liveness sweep and one CLI poll
/// (each `get workers` is a process start plus one RPC).
const SLACK: Duration = Duration::from_millis(1500);

#[test]
fn sigkilled_worker_is_lost_within_the_failure_timeout_and_the_job_says_why() -> anyhow::Result<()>
{
    let scratch = Scratch::new()?;
    let mut cluster = Cluster::start(&scratch, Store::Memory, 2, 4)?;
    let manifest = repo_root().join("manifests/micro.yaml");
    let manifest = manifest.to_str().context("manifest path is not UTF-8")?;
    cluster.json(&[
        "submit",
        manifest,
        "--set",
        "metadata.name=e2e-lost",
        "--set",
        "spec.training.steps=100000",
        "--set",
        "spec.faultTolerance.restartBudget=0",
    ])?;
    cluster.wait_job(
        "e2e-lost",
        "the job to be Running",
        Duration::from_secs(30),
        |d| phase(d) == "Running",
    )?;

    let victim = "node1/2";
    cluster.worker_mut(victim)?.signal("KILL")?;
    let killed_at = Instant::now();
    cluster.wait_workers(
        "the killed worker marked Lost",
        FAILURE_TIMEOUT + SLACK,
        |ws| {
            ws.iter()
                .any(|w| w["worker_id"] == victim && w["state"] == "Lost")
        },
    )?;
    let took = killed_at.elapsed();
    ensure!(
        took <= FAILURE_TIMEOUT + SLACK,
        "marked lost after {took:?}"
    );
    eprintln!(
        "worker {victim} marked Lost {took:?} after SIGKILL (failure timeout {FAILURE_TIMEOUT:?})"
    );

    let d = cluster.wait_job("e2e-lost", "the job to fail", Duration::from_secs(5), |d| {
        phase(d) == "Failed"
    })?;
    let events = d["events"].as_array().context("events")?;
    // Now that ranks train, a pipeline or expert-parallel neighbour usually notices the dead peer
    // (its connection drops) before the failure timeout marks the worker lost: either way the
    // job's events name the victim — its worker id in WorkerLost, or its rank in RankFailed.
    let victim_rank = d["placement"]["ranks"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["worker_id"] == victim))
        .and_then(|r| r["rank"].as_u64())
        .with_context(|| format!("{victim} holds no rank in {}", d["placement"]))?;
    let rank_lost = format!("rank {victim_rank} is lost");
    let said = events.iter().find(|e| {
        let msg = e["message"].as_str().unwrap_or("");
        (e["kind"] == "WorkerLost"
            && e["worker_id"] == victim
            && (msg.contains(victim) || msg.contains("silent") || msg.contains("heartbeat")))
            || (e["kind"] == "RankFailed" && msg.contains(&rank_lost))
    });
    let said = said.with_context(|| {
        format!("no event says {victim} (rank {victim_rank}) was lost: {events:?}")
    })?;
    eprintln!("the job's events say why: {said}");
    let reason = d["job"]["reason"].as_str().unwrap_or("");
    ensure!(
        reason.contains(victim) || reason.contains(&rank_lost),
        "job failed without naming the worker or its rank: {reason}"
    );
    // The surviving workers are told to stop and hold nothing.
    cluster.wait_workers("survivors freed", Duration::from_secs(10), |ws| {
        ws.iter()
            .filter(|w| w["worker_id"] != victim)
            .all(|w| w["state"] == "Idle" && w["held"].as_array().is_some_and(Vec::is_empty))
    })?;
    Ok(())
}
