//! Issue 6, acceptance 3: a worker SIGKILLed in the middle of training makes its pipeline
//! neighbours fail their step with a reason naming the lost peer (long before any receive
//! timeout: the data plane sees the connection drop), the job goes to Failed, and no process
//! hangs: every surviving worker is Idle again and exits cleanly on SIGTERM. The job runs with
//! `restartBudget: 0` (automatic restart is `recovery.rs`'s scenario).

use anyhow::{Context as _, ensure};
use e2e::{Cluster, Scratch, Store, phase, repo_root};
use std::time::{Duration, Instant};

#[test]
fn a_killed_peer_fails_the_step_with_a_reason_and_nothing_hangs() -> anyhow::Result<()> {
    let scratch = Scratch::new()?;
    let mut cluster = Cluster::start(&scratch, Store::Memory, 2, 4)?;
    let manifest = repo_root().join("manifests/micro.yaml");
    let manifest = manifest.to_str().context("manifest path is not UTF-8")?;
    cluster.json(&[
        "submit",
        manifest,
        "--set",
        "metadata.name=e2e-peer",
        "--set",
        "spec.training.steps=100000",
        "--set",
        "spec.faultTolerance.restartBudget=0",
    ])?;
    cluster.wait_job(
        "e2e-peer",
        "two finished steps",
        Duration::from_secs(120),
        |d| d["job"]["progress"]["step"].as_u64().unwrap_or(0) >= 2,
    )?;

    let victim = "node0/1";
    cluster.worker_mut(victim)?.signal("KILL")?;
    let killed_at = Instant::now();
    let d = cluster.wait_job(
        "e2e-peer",
        "the job to fail",
        Duration::from_secs(30),
        |d| phase(d) == "Failed",
    )?;
    let failed_after = killed_at.elapsed();
    let events = d["events"].as_array().context("events")?;
    let rank_failed: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "RankFailed")
        .filter_map(|e| e["message"].as_str())
        .collect();
    eprintln!(
        "job failed {:.2}s after the kill; reason: {}; rank failures: {rank_failed:#?}",
        failed_after.as_secs_f64(),
        d["job"]["reason"]
    );
    // A neighbour saw the peer go and said which step and which peer.
    ensure!(
        rank_failed
            .iter()
            .any(|m| m.contains("step") && (m.contains("peer") || m.contains("rank"))),
        "no rank failure names the step and the lost peer: {rank_failed:?}"
    );
    ensure!(
        failed_after < Duration::from_secs(20),
        "the job took {failed_after:?} to fail"
    );

    // Nothing hangs: every survivor frees its device and shuts down cleanly.
    cluster.wait_workers(
        "every surviving worker Idle",
        Duration::from_secs(20),
        |ws| {
            ws.iter()
                .filter(|w| w["worker_id"] != victim)
                .all(|w| w["state"] == "Idle")
        },
    )?;
    for (id, w) in cluster.workers.iter_mut().filter(|(id, _)| id != victim) {
        let code = w.terminate(Duration::from_secs(10))?;
        ensure!(code == Some(0), "worker {id} exited {code:?} after SIGTERM");
    }
    Ok(())
}
