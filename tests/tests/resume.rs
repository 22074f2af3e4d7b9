//! Distributed resume through the real daemons (`moetrain local --resume`, `moetrain submit
//! --resume`): the micro job (pipeline 4 × data 2 × expert 2, DualPipe, MoE with MTP) trained 6
//! steps in one run equals, bit for bit, 4 steps and then a resumed run of the last 2 — every
//! resumed step's loss terms, gradient norm, learning rate and expert loads, and the final
//! checkpoint's every file (SHA-256 of weights, optimizer shards, routing bias, training state)
//! and routing-bias ledger. Bitwise because a step's batch is a pure function of (seed, step),
//! each rank restores exactly what it saved, and the coordinator's ledger restarts from the
//! exact bias it had after the checkpoint's step.
//!
//! The learning-rate schedule depends on the total step count (cosine decay to `steps`), so the
//! 4-step run uses `warmupSteps: 4`: steps 0..3 are warmup, the same in a 4- and a 6-step run.
//!
//! Bad inputs are refused with the path and what is wrong: no `checkpoint.json`, a part whose
//! SHA-256 does not match, another parallel layout (rank count, schedule), no step left, and a
//! ledger that does not fit the job (checked by the coordinator on submit).

use anyhow::{Context as _, ensure};
use e2e::{CliOutput, Coordinator, Scratch, Store, cli_with_timeout, repo_root, same_step_values};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn manifest() -> anyhow::Result<String> {
    Ok(repo_root()
        .join("manifests/micro.yaml")
        .to_str()
        .context("manifest path is not UTF-8")?
        .to_owned())
}

/// `moetrain local micro.yaml --steps STEPS` with a checkpoint every 2 steps into `run_dir`,
/// warmup over the first 4 steps, and `extra` arguments.
fn local(steps: u64, run_dir: &Path, extra: &[&str]) -> anyhow::Result<CliOutput> {
    let manifest = manifest()?;
    let dir = run_dir.to_str().context("run dir is not UTF-8")?;
    let ck = format!("spec.checkpointing.dir={dir}");
    let steps = steps.to_string();
    let mut args = vec![
        "local",
        manifest.as_str(),
        "--steps",
        &steps,
        "--set",
        "spec.training.optimizer.warmupSteps=4",
        "--set",
        &ck,
        "--set",
        "spec.checkpointing.interval=2",
        "--threads",
        "1",
        "--no-progress",
        "--run-dir",
        dir,
    ];
    args.extend_from_slice(extra);
    cli_with_timeout(&args, Duration::from_secs(300))
}

fn ok(out: CliOutput, what: &str) -> anyhow::Result<()> {
    ensure!(
        out.code == Some(0),
        "{what} exited {:?}\nstdout:\n{}\nstderr:\n{}",
        out.code,
        out.stdout,
        out.stderr
    );
    Ok(())
}

/// Requires a failed run whose stderr names every one of `want`.
fn refused(out: CliOutput, what: &str, want: &[&str]) -> anyhow::Result<()> {
    ensure!(
        out.code != Some(0),
        "{what} succeeded\nstderr:\n{}",
        out.stderr
    );
    for w in want {
        ensure!(
            out.stderr.contains(w),
            "{what}: stderr does not name {w:?}:\n{}",
            out.stderr
        );
    }
    Ok(())
}

/// Every file of a committed checkpoint (path → SHA-256) from its `checkpoint.json`, leaving out
/// `training_state.json` when `with_state` is false.
fn digests(step_dir: &Path, with_state: bool) -> anyhow::Result<Vec<(String, String)>> {
    let index = read_json(&step_dir.join("checkpoint.json"))?;
    let mut out = Vec::new();
    for r in index["ranks"].as_array().context("ranks")? {
        for f in r["files"].as_array().context("files")? {
            let path = f["path"].as_str().context("path")?.to_owned();
            if with_state || !path.ends_with("training_state.json") {
                out.push((path, f["sha256"].as_str().context("sha256")?.to_owned()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Copies the directory tree `from` to `to`.
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for ent in std::fs::read_dir(from)? {
        let ent = ent?;
        let dst = to.join(ent.file_name());
        if ent.file_type()?.is_dir() {
            copy_tree(&ent.path(), &dst)?;
        } else {
            std::fs::copy(ent.path(), &dst)?;
        }
    }
    Ok(())
}

fn step_dir(run_dir: &Path, steps_done: u64) -> PathBuf {
    run_dir.join(format!("step-{steps_done:08}"))
}

#[test]
fn a_resumed_local_run_equals_the_uninterrupted_run_bit_for_bit() -> anyhow::Result<()> {
    let scratch = Scratch::new()?;
    let full = scratch.path("full");
    ok(local(6, &full, &[])?, "the 6-step run")?;
    let first = scratch.path("first");
    ok(local(4, &first, &[])?, "the 4-step run")?;
    // The 4-step run's last checkpoint holds the same weights and optimizer state as the 6-step
    // run's after step 3 (its training state differs: the schedule's total).
    ensure!(
        digests(&step_dir(&first, 4), false)? == digests(&step_dir(&full, 4), false)?,
        "the first 4 steps differ between the runs"
    );
    // Resume from the checkpoints root: its newest complete checkpoint is step-00000004.
    let resumed = scratch.path("resumed");
    let root = first.to_str().context("utf-8")?;
    ok(local(6, &resumed, &["--resume", root])?, "the resumed run")?;

    let want = read_json(&full.join("summary.json"))?;
    let got = read_json(&resumed.join("summary.json"))?;
    ensure!(
        got["start_step"] == 4 && got["end_step"] == 6,
        "resumed summary covers {}..{}",
        got["start_step"],
        got["end_step"]
    );
    let want_steps = want["steps"].as_array().context("steps")?;
    let got_steps = got["steps"].as_array().context("steps")?;
    ensure!(got_steps.len() == 2, "{} resumed steps", got_steps.len());
    for g in got_steps {
        let step = g["step"].as_u64().context("step")?;
        let w = &want_steps[step as usize];
        same_step_values("resumed vs uninterrupted", g, w)?;
    }
    // The final checkpoints are identical file for file, and so are their ledgers.
    ensure!(
        digests(&step_dir(&resumed, 6), true)? == digests(&step_dir(&full, 6), true)?,
        "the final checkpoints differ"
    );
    let ledger = |d: &Path| read_json(&d.join("checkpoint.json")).map(|j| j["ledger"].clone());
    let l = ledger(&step_dir(&full, 6))?;
    ensure!(
        l["after_step"] == 5 && l["layers"].as_array().is_some_and(|a| !a.is_empty()),
        "checkpoint.json has no ledger after step 5: {l}"
    );
    ensure!(
        ledger(&step_dir(&resumed, 6))? == l,
        "the routing-bias ledgers differ"
    );
    Ok(())
}

#[test]
fn bad_resume_inputs_are_refused_naming_the_path_and_the_problem() -> anyhow::Result<()> {
    let scratch = Scratch::new()?;
    let first = scratch.path("first");
    ok(local(4, &first, &[])?, "the 4-step run")?;
    let good = step_dir(&first, 4);

    // No checkpoint.json: never committed.
    let uncommitted = scratch.path("uncommitted/step-00000004");
    copy_tree(&good, &uncommitted)?;
    std::fs::remove_file(uncommitted.join("checkpoint.json"))?;
    for dir in [&uncommitted, &scratch.path("uncommitted")] {
        let d = dir.to_str().context("utf-8")?;
        let out = local(6, &scratch.path("r0"), &["--resume", d])?;
        refused(out, "no checkpoint.json", &[d, "no checkpoint.json"])?;
    }

    // A part whose bytes changed (same size): the rank's load names the file and the checksum.
    let corrupt = scratch.path("corrupt/step-00000004");
    copy_tree(&good, &corrupt)?;
    let victim = corrupt.join("rank-5/stage-1/model.safetensors");
    let mut bytes = std::fs::read(&victim)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&victim, &bytes)?;
    let out = local(
        6,
        &scratch.path("r1"),
        &["--resume", corrupt.to_str().context("utf-8")?],
    )?;
    refused(
        out,
        "a corrupted part",
        &["rank-5/stage-1/model.safetensors", "SHA-256"],
    )?;

    let g = good.to_str().context("utf-8")?;
    // Another parallel layout: fewer ranks (refused before anything starts) ...
    let out = local(
        6,
        &scratch.path("r2"),
        &[
            "--resume",
            g,
            "--set",
            "spec.parallelism.data=1",
            "--set",
            "spec.parallelism.expert=1",
        ],
    )?;
    refused(out, "fewer ranks", &[g, "8 ranks", "has 4", "resharding"])?;
    // ... or the same ranks under another schedule (each worker rejects its assignment).
    let out = local(
        6,
        &scratch.path("r3"),
        &["--resume", g, "--set", "spec.parallelism.schedule=1f1b"],
    )?;
    refused(
        out,
        "another schedule",
        &["rejected", "holds stages", "resharding"],
    )?;

    // No step left after the checkpoint's.
    let out = local(4, &scratch.path("r4"), &["--resume", g])?;
    refused(
        out,
        "no step left",
        &["after step 3", "nothing left to train"],
    )?;

    // Through a coordinator: `submit --resume` is checked there too (exit 4, INVALID_ARGUMENT).
    let coord = Coordinator::start(
        &scratch,
        "coordinator.log",
        "127.0.0.1:0",
        &Store::Memory,
        &[],
    )?;
    let url = coord.url();
    let manifest = manifest()?;
    let submit = |sets: &[&str]| -> anyhow::Result<CliOutput> {
        let mut args = vec![
            "submit",
            manifest.as_str(),
            "--coordinator",
            url.as_str(),
            "--resume",
            g,
        ];
        for s in sets {
            args.extend(["--set", s]);
        }
        cli_with_timeout(&args, Duration::from_secs(30))
    };
    let out = submit(&["spec.training.steps=4"])?;
    ensure!(
        out.code == Some(4),
        "submit exited {:?}: {}",
        out.code,
        out.stderr
    );
    refused(out, "submit with no step left", &["only 4 steps"])?;
    // The saved ledger covers the MTP layer; a job without MTP routes fewer layers.
    let out = submit(&["spec.training.steps=6", "spec.training.mtp.depth=0"])?;
    ensure!(
        out.code == Some(4),
        "submit exited {:?}: {}",
        out.code,
        out.stderr
    );
    refused(
        out,
        "submit with another MoE layout",
        &["ledger", "MoE layers"],
    )?;
    Ok(())
}
