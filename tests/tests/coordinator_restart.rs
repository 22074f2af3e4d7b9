//! Acceptance 2 of issue 2: a coordinator killed (SIGKILL) and restarted on the same etcd keeps
//! the job and every registration, and the workers reconnect by themselves and resume; the same
//! scenario on the in-memory store shows what is lost (jobs, their placements and events; the
//! workers re-register on their own, as new, holding nothing). tests/README.md documents it.

use anyhow::{Context as _, ensure};
use e2e::{Cluster, Etcd, Scratch, Store, phase, repo_root};
use std::time::Duration;

/// Submits micro.yaml as `name` and waits until it is Running.
fn run_job(cluster: &Cluster, name: &str) -> anyhow::Result<serde_json::Value> {
    let manifest = repo_root().join("manifests/micro.yaml");
    let manifest = manifest.to_str().context("manifest path is not UTF-8")?;
    let set = format!("metadata.name={name}");
    cluster.json(&[
        "submit",
        manifest,
        "--set",
        &set,
        "--set",
        "spec.training.steps=100000",
    ])?;
    cluster.wait_job(
        name,
        "the job to be Running",
        Duration::from_secs(30),
        |d| phase(d) == "Running",
    )
}

/// How many times a worker's log says it registered and was resumed.
fn resumed_count(cluster: &mut Cluster, id: &str) -> anyhow::Result<usize> {
    let log = cluster.worker_mut(id)?.log_text();
    Ok(log
        .lines()
        .filter(|l| l.contains("registered with the coordinator") && l.contains("resumed=true"))
        .count())
}

#[test]
fn etcd_store_keeps_jobs_and_registrations_across_a_coordinator_restart() -> anyhow::Result<()> {
    let etcd = Etcd::start()?;
    let scratch = Scratch::new()?;
    let mut cluster = Cluster::start(&scratch, Store::Etcd(etcd.endpoint.clone()), 2, 4)?;
    let before = run_job(&cluster, "e2e-restart")?;

    cluster.restart_coordinator(&scratch)?;

    // The job, its placement and its events come back from etcd. The job trains MoE layers, and
    // the routing-bias ledger is not persisted yet: the restored coordinator ends the running job
    // with a reason that says so instead of letting holders drift apart (keeping such a job
    // running across a restart is the recovery work's; see the issue notes).
    let after = cluster.wait_job(
        "e2e-restart",
        "the job restored, then ended for its lost bias ledger",
        Duration::from_secs(30),
        |d| phase(d) == "Failed",
    )?;
    ensure!(
        after["placement"] == before["placement"],
        "placement changed:\n{}\n{}",
        before["placement"],
        after["placement"]
    );
    let reason = after["job"]["reason"].as_str().unwrap_or("");
    ensure!(
        reason.contains("routing-bias ledger"),
        "the restored job failed for another reason: {reason}"
    );
    let transitions = after["transitions"].as_array().map_or(0, Vec::len);
    let before_transitions = before["transitions"].as_array().map_or(0, Vec::len);
    ensure!(
        transitions > before_transitions,
        "the transitions before the restart were not kept: {} then {}",
        before["transitions"],
        after["transitions"]
    );
    // Every worker reconnects by itself, is recognised, and is freed again.
    cluster.wait_workers(
        "all 8 workers reconnected and idle",
        Duration::from_secs(30),
        |ws| {
            ws.len() == 8
                && ws
                    .iter()
                    .all(|w| w["connected"] == true && w["state"] == "Idle")
        },
    )?;
    // Each worker reconnected by itself and was recognised as a resume.
    let ids: Vec<String> = cluster.workers.iter().map(|(id, _)| id.clone()).collect();
    for id in ids {
        ensure!(
            resumed_count(&mut cluster, &id)? >= 1,
            "worker {id} never resumed its registration"
        );
    }
    Ok(())
}

#[test]
fn memory_store_loses_jobs_but_workers_re_register_after_a_restart() -> anyhow::Result<()> {
    let scratch = Scratch::new()?;
    let mut cluster = Cluster::start(&scratch, Store::Memory, 2, 4)?;
    run_job(&cluster, "e2e-mem")?;

    cluster.restart_coordinator(&scratch)?;

    // What is lost: the job, its placement, transitions and events.
    let missing = cluster.cli(&["describe", "job", "e2e-mem"])?;
    ensure!(
        missing.code == Some(3),
        "describe after an in-memory restart: {missing:?}"
    );
    let jobs = cluster.json(&["get", "jobs"])?;
    ensure!(
        jobs.as_array().is_some_and(Vec::is_empty),
        "jobs survived an in-memory restart: {jobs}"
    );
    // What is rebuilt: the workers reconnect by themselves and register anew, holding nothing.
    cluster.wait_workers(
        "all 8 workers re-registered, idle",
        Duration::from_secs(30),
        |ws| {
            ws.len() == 8
                && ws.iter().all(|w| {
                    w["connected"] == true
                        && w["state"] == "Idle"
                        && w["held"].as_array().is_some_and(Vec::is_empty)
                })
        },
    )?;
    let ids: Vec<String> = cluster.workers.iter().map(|(id, _)| id.clone()).collect();
    for id in ids {
        ensure!(
            resumed_count(&mut cluster, &id)? == 0,
            "worker {id} claims a resume from an empty store"
        );
    }
    // The freed devices take a new job.
    run_job(&cluster, "e2e-mem-2")?;
    Ok(())
}
