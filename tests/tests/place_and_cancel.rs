//! Acceptance 1 of issue 2: etcd, a coordinator and 8 worker processes declaring 2 nodes × 4
//! devices on loopback (port 0); a DualPipe job with pipeline 4, data 2, expert 2 is placed and
//! Running; through the CLI's JSON output every rank is placed once and the placement keeps the
//! rules; `cancel` ends it and frees the workers.

use anyhow::{Context as _, ensure};
use e2e::{Cluster, Etcd, Scratch, Store, phase, repo_root};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

#[test]
fn dualpipe_job_is_placed_by_the_rules_runs_and_cancels() -> anyhow::Result<()> {
    let etcd = Etcd::start()?;
    let scratch = Scratch::new()?;
    let cluster = Cluster::start(&scratch, Store::Etcd(etcd.endpoint.clone()), 2, 4)?;

    let manifest = repo_root().join("manifests/micro.yaml");
    let manifest = manifest.to_str().context("manifest path is not UTF-8")?;
    let job = cluster.json(&[
        "submit",
        manifest,
        "--set",
        "metadata.name=e2e-place",
        "--set",
        "spec.training.steps=100000",
    ])?;
    ensure!(job["name"] == "e2e-place", "submit printed {job}");

    let d = cluster.wait_job(
        "e2e-place",
        "the job to be Running",
        Duration::from_secs(30),
        |d| phase(d) == "Running",
    )?;
    check_placement(&d, 4, 2, 2)?;

    // `get jobs` agrees; every worker is Busy with exactly one rank of this job.
    let jobs = cluster.json(&["get", "jobs"])?;
    let listed = jobs
        .as_array()
        .and_then(|a| a.iter().find(|j| j["name"] == "e2e-place"))
        .context("job not listed")?;
    ensure!(
        listed["phase"] == "Running" && listed["ready_ranks"] == 8,
        "get jobs shows {listed}"
    );
    let workers = cluster.json(&["get", "workers"])?;
    let workers = workers.as_array().context("workers list")?;
    ensure!(workers.len() == 8, "{} workers", workers.len());
    let mut held_ranks = BTreeSet::new();
    for w in workers {
        let held = w["held"].as_array().context("held")?;
        ensure!(
            w["state"] == "Busy" && held.len() == 1,
            "worker not busy with one rank: {w}"
        );
        ensure!(held[0]["job"] == "e2e-place", "{w}");
        held_ranks.insert(held[0]["rank"].as_u64().context("rank")?);
    }
    ensure!(held_ranks == (0..8).collect(), "ranks held: {held_ranks:?}");

    // Cancel ends the job and frees every worker.
    let cancelled = cluster.json(&["cancel", "e2e-place", "--reason", "e2e says stop"])?;
    ensure!(
        cancelled["phase"] == "Cancelled",
        "cancel printed {cancelled}"
    );
    cluster.wait_workers("every worker idle again", Duration::from_secs(10), |ws| {
        ws.len() == 8
            && ws
                .iter()
                .all(|w| w["state"] == "Idle" && w["held"].as_array().is_some_and(Vec::is_empty))
    })?;
    let d = cluster.json(&["describe", "job", "e2e-place"])?;
    let path: Vec<(&str, &str)> = d["transitions"]
        .as_array()
        .context("transitions")?
        .iter()
        .map(|t| {
            (
                t["from"].as_str().unwrap_or(""),
                t["to"].as_str().unwrap_or(""),
            )
        })
        .collect();
    ensure!(
        path.ends_with(&[
            ("Pending", "Scheduled"),
            ("Scheduled", "Running"),
            ("Running", "Cancelled")
        ]),
        "transitions {path:?}"
    );
    let last = d["transitions"]
        .as_array()
        .and_then(|t| t.last())
        .context("no transition")?;
    ensure!(
        last["reason"]
            .as_str()
            .is_some_and(|r| r.contains("e2e says stop")),
        "cancel reason lost: {last}"
    );

    // Exit codes: cancelling a finished job is a conflict (6), an unknown job is not found (3).
    let again = cluster.cli(&["cancel", "e2e-place"])?;
    ensure!(
        again.code == Some(6),
        "cancel of a cancelled job: {again:?}"
    );
    let missing = cluster.cli(&["describe", "job", "no-such-job"])?;
    ensure!(
        missing.code == Some(3),
        "describe of an unknown job: {missing:?}"
    );
    Ok(())
}

/// Checks the placement rules of issue 2 on `describe job -o json`, independently of how the
/// coordinator computed it, for a DualPipe job on `nodeN/D` workers.
fn check_placement(d: &Value, pipeline: u64, data: u64, expert: u64) -> anyhow::Result<()> {
    let ranks = d["placement"]["ranks"]
        .as_array()
        .context("no placement in describe output")?;
    let world = pipeline * data;
    ensure!(
        ranks.len() as u64 == world,
        "{} ranks placed, world size {world}",
        ranks.len()
    );
    let u = |r: &Value, k: &str| r[k].as_u64().with_context(|| format!("no `{k}` in {r}"));
    let mut devices = BTreeSet::new();
    let mut workers = BTreeSet::new();
    let mut coords = BTreeSet::new();
    // Node of each (pipeline position, expert-parallel group).
    let mut group_nodes: BTreeMap<(u64, u64), BTreeSet<String>> = BTreeMap::new();
    let mut pp_nodes: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    let mut expert_ranges: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for (i, r) in ranks.iter().enumerate() {
        ensure!(u(r, "rank")? == i as u64, "entry {i} is rank {}", r["rank"]);
        let node = r["node"].as_str().context("node")?.to_owned();
        let worker = r["worker_id"].as_str().context("worker_id")?.to_owned();
        let device = u(r, "device_index")?;
        // Rule 1: one device per rank, one rank per device, consistent with the worker's identity.
        ensure!(
            worker == format!("{node}/{device}"),
            "rank {i} on {worker} but node {node} device {device}"
        );
        ensure!(
            devices.insert((node.clone(), device)),
            "device {node}/{device} used twice"
        );
        ensure!(
            workers.insert(worker.clone()),
            "worker {worker} holds two ranks"
        );
        let (pp, dp, ep) = (u(r, "pp_idx")?, u(r, "dp_idx")?, u(r, "ep_idx")?);
        ensure!(
            pp < pipeline && dp < data && ep < expert,
            "rank {i} coordinates out of range: {r}"
        );
        ensure!(coords.insert((pp, dp)), "coordinates ({pp},{dp}) twice");
        ensure!(
            ep == dp % expert,
            "rank {i}: ep {ep} is not dp {dp} mod {expert}"
        );
        // Rule 5: DualPipe rank at pipeline position r holds stages r and P-1-r.
        let mut stages: Vec<u64> = r["stages"]
            .as_array()
            .context("stages")?
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        stages.sort_unstable();
        let mut want = vec![pp, pipeline - 1 - pp];
        want.sort_unstable();
        ensure!(
            stages == want,
            "rank {i} at pipeline {pp} holds stages {stages:?}, want {want:?}"
        );
        // Experts: every rank of one ep index hosts the same contiguous range.
        let range = r["experts"].as_array().context("experts")?;
        let range = (
            range[0].as_u64().context("begin")?,
            range[1].as_u64().context("end")?,
        );
        ensure!(range.0 < range.1, "rank {i} hosts no experts");
        let prev = expert_ranges.insert(ep, range);
        ensure!(
            prev.is_none_or(|p| p == range),
            "ep {ep} hosts {prev:?} and {range:?}"
        );
        group_nodes
            .entry((pp, dp / expert))
            .or_default()
            .insert(node.clone());
        pp_nodes.entry(pp).or_default().insert(node);
    }
    // Expert ranges tile [0, n) in ep order with equal sizes.
    let mut next = 0;
    let size = expert_ranges
        .values()
        .next()
        .map(|r| r.1 - r.0)
        .unwrap_or(0);
    for (ep, (b, e)) in &expert_ranges {
        ensure!(
            *b == next && e - b == size,
            "ep {ep} hosts [{b},{e}), expected to start at {next} with size {size}"
        );
        next = *e;
    }
    // Rule 3: each expert-parallel group (2 ranks) fits a node (4 devices), so it is on one node.
    for ((pp, g), nodes) in &group_nodes {
        ensure!(
            nodes.len() == 1,
            "expert group {g} at pipeline {pp} spans nodes {nodes:?}"
        );
    }
    // Rule 4: pipeline neighbours share a node when they can. Each pipeline position is one
    // group on one node and a node holds two positions, so exactly one boundary crosses nodes.
    let node_of: Vec<&String> = (0..pipeline)
        .map(|pp| {
            pp_nodes
                .get(&pp)
                .and_then(|s| s.iter().next())
                .context("position without node")
        })
        .collect::<anyhow::Result<_>>()?;
    let crossings = node_of.windows(2).filter(|w| w[0] != w[1]).count();
    ensure!(
        crossings == 1,
        "pipeline positions on nodes {node_of:?}: {crossings} cross-node boundaries, want 1"
    );
    ensure!(
        d["placement"]["reasons"]
            .as_array()
            .is_some_and(|r| !r.is_empty()),
        "placement carries no reasons"
    );
    Ok(())
}
