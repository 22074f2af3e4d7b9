//! Issue 6, acceptance 1 through the real daemons: `moetrain local` (embedded coordinator, one
//! worker process per rank, TCP data plane) trains the micro job on pipeline 4 × data 2 × expert 2
//! under DualPipe, DualPipeV and 1F1B, and every step's loss terms and gradient norm equal
//! `moetrain train --single` on the same manifest within 1e-5 relative (not bitwise: the
//! DualPipe mirror sum, the data-parallel reduction and the tied-embedding sum regroup additions;
//! executor/tests/equivalence.rs shows which schedules are bitwise in process). Also: the summary
//! has the single trainer's format, the final checkpoint is complete (`checkpoint.json` lists
//! every rank's files), and every worker process is gone when the command returns.

use anyhow::{Context as _, ensure};
use e2e::{Scratch, cli_with_timeout, repo_root};
use std::time::Duration;

const STEPS: u64 = 3;

fn read_summary(path: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// Runs `moetrain local MANIFEST ARGS.. --no-progress --run-dir RUN_DIR`, requires exit 0 and
/// returns the run's summary.json.
fn local(
    manifest: &str,
    args: &[&str],
    run_dir: &std::path::Path,
) -> anyhow::Result<serde_json::Value> {
    let dir = run_dir.to_str().context("run dir is not UTF-8")?;
    let mut full = vec!["local", manifest];
    full.extend_from_slice(args);
    full.extend(["--no-progress", "--run-dir", dir]);
    let out = cli_with_timeout(&full, Duration::from_secs(300))?;
    ensure!(
        out.code == Some(0),
        "moetrain {} exited {:?}\nstdout:\n{}\nstderr:\n{}",
        full.join(" "),
        out.code,
        out.stdout,
        out.stderr
    );
    read_summary(&run_dir.join("summary.json"))
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

#[test]
fn local_mode_reproduces_the_single_process_trainer_under_every_schedule() -> anyhow::Result<()> {
    let scratch = Scratch::new()?;
    let manifest = repo_root().join("manifests/micro.yaml");
    let manifest = manifest.to_str().context("manifest path is not UTF-8")?;
    let steps = STEPS.to_string();

    let single_summary = scratch.path("single.json");
    let single_dir = scratch.path("single");
    let out = cli_with_timeout(
        &[
            "train",
            "--single",
            manifest,
            "--steps",
            &steps,
            "--threads",
            "1",
            "--no-progress",
            "--run-dir",
            single_dir.to_str().context("utf-8")?,
            "--summary",
            single_summary.to_str().context("utf-8")?,
        ],
        Duration::from_secs(300),
    )?;
    ensure!(out.code == Some(0), "train --single failed: {}", out.stderr);
    let single = read_summary(&single_summary)?;
    let want = single["steps"].as_array().context("single steps")?;
    ensure!(want.len() == STEPS as usize);

    for schedule in ["dualpipe", "dualpipev", "1f1b"] {
        let run_dir = scratch.path(&format!("local-{schedule}"));
        let sched = format!("spec.parallelism.schedule={schedule}");
        let got = local(manifest, &["--steps", &steps, "--set", &sched], &run_dir)?;
        ensure!(got["mode"] == "local");
        let steps_got = got["steps"].as_array().context("local steps")?;
        ensure!(
            steps_got.len() == STEPS as usize,
            "{schedule}: {} steps",
            steps_got.len()
        );
        for (g, w) in steps_got.iter().zip(want) {
            for term in ["main", "mtp", "balance", "total"] {
                let (a, b) = (
                    g["loss"][term].as_f64().context("loss")?,
                    w["loss"][term].as_f64().context("loss")?,
                );
                ensure!(
                    rel(a, b) < 1e-5 || (a - b).abs() < 1e-9,
                    "{schedule} step {}: {term} {a} vs single {b}",
                    g["step"]
                );
            }
            let (a, b) = (
                g["grad_norm"].as_f64().context("grad_norm")?,
                w["grad_norm"].as_f64().context("grad_norm")?,
            );
            ensure!(rel(a, b) < 1e-5, "{schedule}: grad norm {a} vs {b}");
            ensure!(g["tokens"] == w["tokens"], "{schedule}: tokens differ");
            ensure!(
                g["expert_load"] == w["expert_load"],
                "{schedule} step {}: expert loads differ: {} vs {}",
                g["step"],
                g["expert_load"],
                w["expert_load"]
            );
        }
        let ckpt = got["final_checkpoint"]
            .as_str()
            .with_context(|| format!("{schedule}: no final checkpoint in the summary"))?;
        let index = std::path::Path::new(ckpt).join("checkpoint.json");
        let index = read_summary(&index)?;
        ensure!(
            index["ranks"].as_array().map(Vec::len) == Some(8),
            "{schedule}: checkpoint.json does not list 8 ranks: {index}"
        );
    }
    Ok(())
}

/// The simulated device kind through the daemons: a 32-rank DualPipe job (pipeline 8 × data 4 ×
/// expert 4) on one machine, every op timed by the manifest's cost table, the control plane,
/// data plane and bias protocol real.
#[test]
fn local_mode_runs_a_32_rank_simulated_job() -> anyhow::Result<()> {
    let scratch = Scratch::new()?;
    let manifest = repo_root().join("manifests/simulated-32.yaml");
    let manifest = manifest.to_str().context("manifest path is not UTF-8")?;
    let run_dir = scratch.path("sim32");
    let got = local(manifest, &[], &run_dir)?;
    let steps = got["steps"].as_array().context("steps")?;
    ensure!(steps.len() == 5, "{} steps", steps.len());
    for s in steps {
        // Every step waited for at least the 16 forwards and backwards of one rank's chunks.
        let t = s["step_time_s"].as_f64().context("step time")?;
        ensure!(t > 0.1, "step {} took only {t}s", s["step"]);
    }
    ensure!(
        got["final_loss"].is_null(),
        "a simulated run reports no loss"
    );
    Ok(())
}

/// Issue 7, acceptance 1 through the real coordinator: the micro job on data that skews routing,
/// trained by `moetrain local` with the coordinator's bias updates on (γ = 0.02) and off (γ = 0);
/// the per-layer max/mean expert load over the last half of the run is clearly lower with them.
#[test]
fn coordinator_bias_updates_reduce_the_imbalance_of_skewed_routing() -> anyhow::Result<()> {
    const STEPS: usize = 16;
    let scratch = Scratch::new()?;
    let manifest = repo_root().join("manifests/micro.yaml");
    let manifest = manifest.to_str().context("manifest path is not UTF-8")?;
    let steps = STEPS.to_string();
    let mut ratios = Vec::new();
    for rate in ["0.02", "0"] {
        let run_dir = scratch.path(&format!("skew-{rate}"));
        let set_rate = format!("spec.training.biasUpdate.rate={rate}");
        let got = local(
            manifest,
            &[
                "--steps",
                &steps,
                "--set",
                "spec.data.synthetic.kind=skewed",
                "--set",
                &set_rate,
                "--set",
                "spec.training.optimizer.warmupSteps=2",
            ],
            &run_dir,
        )?;
        let steps = got["steps"].as_array().context("steps")?;
        ensure!(steps.len() == STEPS);
        let mut sum = 0.0;
        let mut n = 0.0;
        for s in &steps[STEPS / 2..] {
            for l in s["expert_load"].as_array().context("expert_load")? {
                let max = l["max"].as_f64().context("max")?;
                let mean = l["mean"].as_f64().context("mean")?;
                sum += max / mean;
                n += 1.0;
            }
        }
        ensure!(n > 0.0, "no MoE layer loads in the summary");
        ratios.push(sum / n);
    }
    let (on, off) = (ratios[0], ratios[1]);
    eprintln!("mean max/mean expert load over steps 8..16: updates on {on:.3}, off {off:.3}");
    ensure!(
        on < 0.8 * off,
        "bias updates did not reduce the imbalance: on {on:.3}, off {off:.3}"
    );
    Ok(())
}

/// Bad input to `moetrain local` fails before anything starts, with the manifest's file, line,
/// column and field, or the path it could not read.
#[test]
fn local_mode_names_what_is_wrong_with_its_input() -> anyhow::Result<()> {
    let scratch = Scratch::new()?;
    let bad = scratch.path("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: moetrain/v1\nkind: TrainingJob\nmetadata:\n  name: bad\nspec:\n  model:\n    preset: tiny\n  parallelism:\n    pipeline: 3\n    schedule: dualpipe\n",
    )?;
    let bad = bad.to_str().context("utf-8")?;
    let out = cli_with_timeout(&["local", bad], Duration::from_secs(60))?;
    ensure!(out.code == Some(1), "exit {:?}", out.code);
    ensure!(
        out.stderr.contains(
            "bad.yaml:9:5: spec.parallelism.pipeline: DualPipe needs an even pipeline degree, got 3"
        ),
        "{}",
        out.stderr
    );
    let out = cli_with_timeout(&["local", "/nonexistent/job.yaml"], Duration::from_secs(60))?;
    ensure!(out.code == Some(1), "exit {:?}", out.code);
    ensure!(
        out.stderr.contains("reading /nonexistent/job.yaml"),
        "{}",
        out.stderr
    );
    Ok(())
}
