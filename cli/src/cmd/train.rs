//! `moetrain train --single JOB.yaml`: trains the whole model in this process (no coordinator, no workers),
//! with a progress bar, checkpoints and `summary.json`.
//!
//! The job comes from the `manifest` crate (with `--set` overrides); flags such as `--model`, `--steps` and
//! `--precision` are shorthands for the matching `--set` paths, so a run without a manifest file works too.
//! Invariant: this module only maps the manifest onto `model::train::TrainOptions` and displays progress; the
//! training semantics live in `model::train`.

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use model::train::{InitFrom, Progress, train_single};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Minimal manifest used when no JOB.yaml is given.
const DEFAULT_JOB: &str = "apiVersion: moetrain/v1\nkind: TrainingJob\nmetadata:\n  name: single\nspec:\n  model:\n    preset: tiny\n";

/// Arguments of `moetrain train`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Train the whole model in this process (the only mode of this command; distributed runs use `local`/`submit`).
    #[arg(long)]
    pub single: bool,
    /// The TrainingJob manifest; without it a minimal job (preset `tiny`, synthetic data) is used.
    #[arg(value_name = "JOB.yaml")]
    pub job: Option<PathBuf>,
    /// Override a manifest field, e.g. `--set spec.training.steps=50` (repeatable).
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub set: Vec<String>,
    /// Shorthand for `--set spec.model.preset=NAME`.
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// Shorthand for `--set spec.training.steps=N`.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Shorthand for `--set spec.training.precision=P` (fp32, bf16, fp8).
    #[arg(long)]
    pub precision: Option<String>,
    /// Where to write summary.json (default: RUN_DIR/summary.json).
    #[arg(long, value_name = "PATH")]
    pub summary: Option<PathBuf>,
    /// Run directory for checkpoints and the summary (default: the manifest's checkpointing.dir, relative to the
    /// working directory, else runs/NAME).
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Initialize from an HF-format model directory instead of random weights.
    #[arg(long, value_name = "DIR", conflicts_with = "resume")]
    pub init_from: Option<PathBuf>,
    /// Continue from a checkpoint directory, or `auto` for the latest complete one in the run directory.
    #[arg(long, value_name = "DIR|auto")]
    pub resume: Option<String>,
    /// Compute threads (default: the manifest's threadsPerRank, else all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Synthetic data variant when the manifest's data is synthetic: markov (default) or skewed.
    #[arg(long, value_name = "VARIANT")]
    pub synthetic: Option<String>,
    /// No progress bar (one log line per step on stderr instead).
    #[arg(long)]
    pub no_progress: bool,
}

/// Runs the command.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if !args.single {
        bail!(
            "only `train --single` is implemented here; use `moetrain local` for a multi-process run"
        );
    }
    let (src, origin) = match &args.job {
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (DEFAULT_JOB.to_string(), "<default job>".to_string()),
    };
    let mut sets = Vec::new();
    if let Some(m) = &args.model {
        sets.push(format!("spec.model.preset={m}"));
    }
    if let Some(s) = args.steps {
        sets.push(format!("spec.training.steps={s}"));
    }
    if let Some(p) = &args.precision {
        sets.push(format!("spec.training.precision={p}"));
    }
    sets.extend(args.set.iter().cloned());
    let job = worker::job::parse(&src, &origin, &sets)?;
    let base = args
        .job
        .as_deref()
        .and_then(Path::parent)
        .unwrap_or(Path::new(""));

    let run_dir = args
        .run_dir
        .clone()
        // Output directories are relative to the working directory (inputs are relative to the
        // manifest).
        .or_else(|| job.spec.checkpointing.dir.as_ref().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("runs").join(&job.metadata.name));
    let checkpoint_dir = job
        .spec
        .checkpointing
        .dir
        .as_ref()
        .map(|_| run_dir.clone())
        .or_else(|| args.run_dir.clone());
    let init = match (&args.resume, &args.init_from) {
        (Some(r), _) if r == "auto" => match model::checkpoint::latest(&run_dir)? {
            Some(p) => InitFrom::Resume(p),
            None => InitFrom::Seed(job.spec.training.seed),
        },
        (Some(r), _) => InitFrom::Resume(PathBuf::from(r)),
        (None, Some(d)) => InitFrom::HfDir(d.clone()),
        (None, None) => InitFrom::Seed(job.spec.training.seed),
    };
    let over = worker::job::Overrides {
        init: Some(init),
        threads: args.threads,
        synthetic: args.synthetic.clone(),
        checkpoint_dir,
    };
    let opts = worker::job::train_options(&job, base, &over)?;

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        // A second Ctrl-C falls through to the default handler and ends the process immediately.
        let _ = ctrlc_once(move || stop.store(true, Ordering::SeqCst));
    }
    let bar = if args.no_progress {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(opts.steps)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} step {pos}/{len} | {msg} | elapsed {elapsed} | ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut first = true;
    let mut on_step = |p: Progress<'_>| {
        if first {
            bar.set_position(p.record.step);
            first = false;
        }
        let r = p.record;
        let msg = format!(
            "loss {:.4} (main {:.4}) | {:.0} tok/s",
            r.loss.total, r.loss.main, r.tokens_per_s
        );
        if args.no_progress {
            eprintln!(
                "step {}/{} | {msg} | lr {:.2e} | gnorm {:.3}",
                r.step + 1,
                p.total_steps,
                r.lr,
                r.grad_norm
            );
        }
        bar.set_message(msg);
        bar.inc(1);
        if let Some(c) = p.checkpoint {
            bar.println(format!("checkpoint {c}"));
        }
        if stop.load(Ordering::SeqCst) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let summary = train_single(&opts, &mut on_step).context("training failed")?;
    bar.finish_and_clear();
    let summary_path = args
        .summary
        .clone()
        .unwrap_or_else(|| run_dir.join("summary.json"));
    summary.write(&summary_path)?;
    let first_loss = summary.steps.first().map(|s| s.loss.total);
    println!(
        "{} steps {}..{} ({}) | loss {} -> {} | {:.0} tokens/s | {:.1}s | summary {}{}",
        if summary.stopped_early {
            "stopped after"
        } else {
            "trained"
        },
        summary.start_step,
        summary.end_step,
        summary.precision,
        first_loss.map_or("-".into(), |l| format!("{l:.4}")),
        summary.final_loss.map_or("-".into(), |l| format!("{l:.4}")),
        summary.tokens_per_s,
        summary.wall_s,
        summary_path.display(),
        summary
            .final_checkpoint
            .as_deref()
            .map_or(String::new(), |c| format!(" | checkpoint {c}")),
    );
    Ok(if summary.stopped_early {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}

/// Installs a one-shot SIGINT handler that calls `f` and then restores the default action, without extra
/// dependencies. Returns false where signals are unsupported.
fn ctrlc_once(f: impl Fn() + Send + Sync + 'static) -> bool {
    // A blocking wait on a dedicated thread through tokio's signal support keeps this free of unsafe code.
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return false;
    };
    std::thread::Builder::new()
        .name("ctrl-c".into())
        .spawn(move || {
            rt.block_on(async {
                if tokio::signal::ctrl_c().await.is_ok() {
                    f();
                    eprintln!("stopping after this step (Ctrl-C again to abort)");
                    let _ = tokio::signal::ctrl_c().await;
                    std::process::exit(130);
                }
            })
        })
        .is_ok()
}
