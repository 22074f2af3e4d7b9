//! Acceptance 3 of issue 2: a worker killed with SIGKILL is marked Lost within the failure
//! timeout (2 s here, set on the coordinator and in micro.yaml), and its job's events say why;
//! the job is Failed with that reason (recovery comes in a later issue).

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
    cluster.json(&["submit", manifest, "--set", "metadata.name=e2e-lost"])?;
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
    let lost = events
        .iter()
        .find(|e| e["kind"] == "WorkerLost" && e["worker_id"] == victim)
        .with_context(|| format!("no WorkerLost event for {victim} in {events:?}"))?;
    let msg = lost["message"].as_str().unwrap_or("");
    ensure!(
        msg.contains(victim) || msg.contains("silent") || msg.contains("heartbeat"),
        "event does not say why: {lost}"
    );
    let reason = d["job"]["reason"].as_str().unwrap_or("");
    ensure!(
        reason.contains(victim),
        "job failed without naming the worker: {reason}"
    );
    // The surviving workers are told to stop and hold nothing.
    cluster.wait_workers("survivors freed", Duration::from_secs(10), |ws| {
        ws.iter()
            .filter(|w| w["worker_id"] != victim)
            .all(|w| w["state"] == "Idle" && w["held"].as_array().is_some_and(Vec::is_empty))
    })?;
    Ok(())
}
