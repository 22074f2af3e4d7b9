//! Bench binary (`cargo bench -p model --bench train_throughput`): single-process training throughput of the
//! `tiny` preset in fp32, bf16 and fp8 on a fixed thread budget (2 by default), with the step time split into
//! GEMMs, attention, routing, the optimizer and the rest.
//!
//! Method: each precision trains `--warmup` + `--steps` steps of `tiny` on the synthetic data through
//! `model::train::train_single` with `model::profile` switched on; tokens/s is measured over the steps after
//! warm-up. The split comes from the profiler's scope guards inside those same steps (no replay): GEMM is
//! every projection's Fprop, Dgrad and Wgrad with its quantization (`precision::Linear`, head and eh_proj
//! included), attention the causal attention core forward and backward, routing the router (its GEMM,
//! sigmoid, group-limited top-k, balance loss and their backward), optimizer the gradient norm, clipping,
//! AdamW and bias update, and rest everything else (embedding, norms, RoPE, SwiGLU, dispatch/combine
//! permutations, losses, data). Attribution is exclusive, so the parts add up to the measured step time.
//! The load average is printed before and after, since the machine may be shared.
//!
//! Flags: `--steps N` (5), `--warmup N` (1), `--seq-len T` (128), `--batch B` (4), `--threads N` (2),
//! `--precisions fp32,bf16,fp8`, `--json PATH` (write the results as JSON too).

use model::data::{DataSpec, SyntheticSpec};
use model::loss::LossWeights;
use model::lr::{BiasSpeedSchedule, LrSchedule};
use model::optim::AdamWConfig;
use model::precision::Precision;
use model::train::{InitFrom, Progress, StepRecord, TrainOptions, train_single};
use model::{ModelConfig, Result};
use std::ops::ControlFlow;

#[derive(Clone, Debug, serde::Serialize)]
struct Row {
    precision: String,
    tokens_per_s: f64,
    step_s: f64,
    gemm_s: f64,
    attention_s: f64,
    routing_s: f64,
    optimizer_s: f64,
    rest_s: f64,
    final_loss: f64,
}

struct Opts {
    steps: u64,
    warmup: u64,
    seq_len: usize,
    batch: usize,
    threads: usize,
    precisions: Vec<Precision>,
    json: Option<String>,
}

fn parse_args() -> std::result::Result<Opts, String> {
    let mut o = Opts {
        steps: 5,
        warmup: 1,
        seq_len: 128,
        batch: 4,
        threads: 2,
        precisions: vec![Precision::Fp32, Precision::Bf16, Precision::Fp8],
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        let num = |name: &str, v: String| v.parse::<u64>().map_err(|e| format!("{name}: {e}"));
        match a.as_str() {
            "--steps" => o.steps = num("--steps", val("--steps")?)?,
            "--warmup" => o.warmup = num("--warmup", val("--warmup")?)?,
            "--seq-len" => o.seq_len = num("--seq-len", val("--seq-len")?)? as usize,
            "--batch" => o.batch = num("--batch", val("--batch")?)? as usize,
            "--threads" => o.threads = num("--threads", val("--threads")?)? as usize,
            "--precisions" => {
                o.precisions = val("--precisions")?
                    .split(',')
                    .map(str::parse)
                    .collect::<std::result::Result<_, _>>()?
            }
            "--json" => o.json = Some(val("--json")?),
            // `cargo bench` passes `--bench`; ignore it and any libtest-style filter.
            "--bench" => {}
            other if !other.starts_with("--") => {}
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if o.steps == 0 {
        return Err("--steps must be positive".into());
    }
    Ok(o)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn run(o: &Opts, config: &ModelConfig, precision: Precision) -> Result<Row> {
    let steps = o.warmup + o.steps;
    let opts = TrainOptions {
        mtp_depth: config.num_nextn_predict_layers,
        model: config.clone(),
        init: InitFrom::Seed(0),
        steps,
        seq_len: o.seq_len,
        micro_batch_size: o.batch,
        micro_batches: 1,
        precision,
        threads: o.threads,
        adamw: AdamWConfig::default(),
        lr: LrSchedule {
            peak: 3e-3,
            floor: 3e-4,
            warmup_steps: 2,
            total_steps: steps,
        },
        loss: LossWeights {
            mtp_lambda: 0.3,
            balance_alpha: 1e-4,
        },
        bias_speed: BiasSpeedSchedule {
            rate: 1e-3,
            until_tokens: None,
        },
        bias_variant: Default::default(),
        data: DataSpec::Synthetic(SyntheticSpec::default()),
        data_seed: 0,
        checkpoint_dir: None,
        checkpoint_interval: 0,
        job: serde_json::Value::Null,
    };
    model::profile::set_enabled(true);
    let summary = train_single(&opts, &mut |_: Progress<'_>| ControlFlow::Continue(()));
    model::profile::set_enabled(false);
    let summary = summary?;
    let measured: &[StepRecord] = &summary.steps[o.warmup as usize..];
    let n = measured.len() as f64;
    let mean = |f: &dyn Fn(&StepRecord) -> f64| measured.iter().map(f).sum::<f64>() / n;
    let step_s = mean(&|r| r.step_time_s);
    let tokens: u64 = measured.iter().map(|r| r.tokens).sum();
    let (gemm_s, attention_s, routing_s, optimizer_s) = (
        mean(&|r| r.time.gemm_s),
        mean(&|r| r.time.attention_s),
        mean(&|r| r.time.routing_s),
        mean(&|r| r.time.optimizer_s),
    );
    Ok(Row {
        precision: precision.name().into(),
        tokens_per_s: tokens as f64 / (step_s * n),
        step_s,
        gemm_s,
        attention_s,
        routing_s,
        optimizer_s,
        rest_s: step_s - gemm_s - attention_s - routing_s - optimizer_s,
        final_loss: summary.final_loss.unwrap_or(f64::NAN),
    })
}

fn main() -> std::process::ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let config = match ModelConfig::preset("tiny") {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!(
        "tiny: B={} T={} threads={} steps={} (+{} warm-up); load average {}",
        o.batch,
        o.seq_len,
        o.threads,
        o.steps,
        o.warmup,
        load_average()
    );
    println!(
        "{:<10} {:>9} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8}",
        "prec", "tokens/s", "step s", "gemm", "attn", "routing", "optim", "rest", "loss"
    );
    let mut rows = Vec::new();
    let mut failed = false;
    for &p in &o.precisions {
        match run(&o, &config, p) {
            Ok(r) => {
                let pct = |x: f64| 100.0 * x / r.step_s;
                println!(
                    "{:<10} {:>9.0} {:>8.3} {:>6.1}% {:>6.1}% {:>6.1}% {:>6.1}% {:>6.1}% {:>8.4}",
                    r.precision,
                    r.tokens_per_s,
                    r.step_s,
                    pct(r.gemm_s),
                    pct(r.attention_s),
                    pct(r.routing_s),
                    pct(r.optimizer_s),
                    pct(r.rest_s),
                    r.final_loss
                );
                rows.push(r);
            }
            Err(e) => {
                println!("{:<10} failed: {e}", p.name());
                failed = true;
            }
        }
    }
    println!("load average after: {}", load_average());
    if let Some(path) = &o.json {
        match serde_json::to_string_pretty(&rows).map(|t| std::fs::write(path, t)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("error: writing {path}: {e}"),
            Err(e) => eprintln!("error: {e}"),
        }
    }
    if failed {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
