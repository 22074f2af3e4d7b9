//! Bench binary (`cargo bench -p model --bench precision_curves -- --steps 60`): the precision check
//! — the `tiny` job of `manifests/tiny.yaml`, trained in one process in fp32, bf16 and fp8 for the same
//! steps, with each curve's end points.
//!
//! The options are those `worker::job::train_options` maps the manifest onto (model crates cannot read YAML):
//! preset `tiny`, seed 42 for both the parameters and the data, T = 128, 8 micro-batches of 2 sequences,
//! AdamW (lr 1e-3 → 1e-4 cosine after 20 warm-up steps, β 0.9/0.95, ε 1e-8, weight decay 0.1, clipping 1.0,
//! bf16 moments), MTP depth 1 with λ 0.3, balance α 1e-4, sign bias update at rate 1e-3, Markov synthetic
//! data. `moetrain train --single manifests/tiny.yaml --steps N --set spec.training.precision=P` runs the
//! same job.
//!
//! Printed per precision: the last step's total loss, the mean of the last 10 steps, and the loss of the
//! final parameters on the run's fixed evaluation batches (`Summary::final_eval_loss`), each also relative
//! to fp32. Flags: `--steps N` (60), `--threads N` (2), `--precisions fp32,bf16,fp8`, `--json PATH`.

use model::data::{DataSpec, SyntheticSpec, SyntheticVariant};
use model::loss::LossWeights;
use model::lr::{BiasSpeedSchedule, LrSchedule};
use model::optim::{AdamWConfig, MomentDtype};
use model::precision::Precision;
use model::train::{InitFrom, Progress, Summary, TrainOptions, train_single};
use model::{ModelConfig, Result};
use std::ops::ControlFlow;

#[derive(Clone, Debug, serde::Serialize)]
struct EndPoints {
    precision: String,
    last_step_loss: f64,
    last10_mean_loss: f64,
    final_eval_loss: f64,
    final_eval_main_loss: f64,
    tokens_per_s: f64,
    wall_s: f64,
    /// Total loss of every step.
    curve: Vec<f64>,
}

fn options(config: &ModelConfig, steps: u64, threads: usize, precision: Precision) -> TrainOptions {
    TrainOptions {
        model: config.clone(),
        init: InitFrom::Seed(42),
        steps,
        seq_len: 128,
        micro_batch_size: 2,
        micro_batches: 8,
        precision,
        threads,
        adamw: AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            max_grad_norm: Some(1.0),
            moment_dtype: MomentDtype::Bf16,
        },
        lr: LrSchedule {
            peak: 1e-3,
            floor: 1e-4,
            warmup_steps: 20,
            total_steps: steps,
        },
        mtp_depth: 1,
        loss: LossWeights {
            mtp_lambda: 0.3,
            balance_alpha: 1e-4,
        },
        bias_speed: BiasSpeedSchedule {
            rate: 1e-3,
            until_tokens: None,
        },
        bias_variant: Default::default(),
        data: DataSpec::Synthetic(SyntheticSpec {
            variant: SyntheticVariant::Markov,
            ..SyntheticSpec::default()
        }),
        data_seed: 42,
        checkpoint_dir: None,
        checkpoint_interval: 0,
        job: serde_json::Value::Null,
    }
}

fn end_points(precision: Precision, s: &Summary) -> EndPoints {
    let curve: Vec<f64> = s.steps.iter().map(|r| r.loss.total).collect();
    let tail = &curve[curve.len().saturating_sub(10)..];
    EndPoints {
        precision: precision.name().into(),
        last_step_loss: s.final_loss.unwrap_or(f64::NAN),
        last10_mean_loss: tail.iter().sum::<f64>() / tail.len().max(1) as f64,
        final_eval_loss: s.final_eval_loss.unwrap_or(f64::NAN),
        final_eval_main_loss: s.final_eval_main_loss.unwrap_or(f64::NAN),
        tokens_per_s: s.tokens_per_s,
        wall_s: s.wall_s,
        curve,
    }
}

fn main() -> std::process::ExitCode {
    let mut steps = 60u64;
    let mut threads = 2usize;
    let mut precisions = vec![Precision::Fp32, Precision::Bf16, Precision::Fp8];
    let mut json = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let parsed: std::result::Result<(), String> = match a.as_str() {
            "--steps" => it
                .next()
                .ok_or("--steps needs a value".to_string())
                .and_then(|v| v.parse().map_err(|e| format!("--steps: {e}")))
                .map(|v| steps = v),
            "--threads" => it
                .next()
                .ok_or("--threads needs a value".to_string())
                .and_then(|v| v.parse().map_err(|e| format!("--threads: {e}")))
                .map(|v| threads = v),
            "--precisions" => it
                .next()
                .ok_or("--precisions needs a value".to_string())
                .and_then(|v| v.split(',').map(str::parse).collect())
                .map(|v| precisions = v),
            "--json" => it
                .next()
                .ok_or("--json needs a value".to_string())
                .map(|v| json = Some(v)),
            "--bench" => Ok(()),
            other if !other.starts_with("--") => Ok(()),
            other => Err(format!("unknown flag {other}")),
        };
        if let Err(e) = parsed {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    }
    let run = || -> Result<Vec<EndPoints>> {
        let config = ModelConfig::preset("tiny")?;
        let mut out = Vec::new();
        for &p in &precisions {
            let s = train_single(&options(&config, steps, threads, p), &mut |_: Progress<
                '_,
            >| {
                ControlFlow::Continue(())
            })?;
            let e = end_points(p, &s);
            eprintln!(
                "{}: last {:.4}, last-10 mean {:.4}, eval {:.4} ({:.0} tokens/s)",
                e.precision,
                e.last_step_loss,
                e.last10_mean_loss,
                e.final_eval_loss,
                e.tokens_per_s
            );
            out.push(e);
        }
        Ok(out)
    };
    let rows = match run() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!("tiny.yaml job, {steps} steps, {threads} threads");
    println!(
        "{:<10} {:>10} {:>8} {:>10} {:>8} {:>10} {:>8}",
        "prec", "last", "Δ%", "last10", "Δ%", "eval", "Δ%"
    );
    let base = rows.iter().find(|r| r.precision == "fp32").cloned();
    let rel = |x: f64, b: Option<f64>| b.map_or(f64::NAN, |b| 100.0 * (x - b) / b);
    for r in &rows {
        println!(
            "{:<10} {:>10.4} {:>+8.2} {:>10.4} {:>+8.2} {:>10.4} {:>+8.2}",
            r.precision,
            r.last_step_loss,
            rel(r.last_step_loss, base.as_ref().map(|b| b.last_step_loss)),
            r.last10_mean_loss,
            rel(
                r.last10_mean_loss,
                base.as_ref().map(|b| b.last10_mean_loss)
            ),
            r.final_eval_loss,
            rel(r.final_eval_loss, base.as_ref().map(|b| b.final_eval_loss)),
        );
    }
    if let Some(path) = json {
        match serde_json::to_string_pretty(&rows).map(|t| std::fs::write(&path, t)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("error: writing {path}: {e}"),
            Err(e) => eprintln!("error: {e}"),
        }
    }
    std::process::ExitCode::SUCCESS
}
