//! Bench binary (`cargo bench -p model --bench train_throughput`): single-process training throughput of the
//! `tiny` preset in fp32, bf16 and fp8 on a fixed thread budget (2 by default), with the step time split into
//! GEMMs, attention, routing and the rest.
//!
//! Method: each precision trains `--warmup` + `--steps` steps of `tiny` on the synthetic data through
//! `model::train::train_single`; tokens/s is measured over the steps after warm-up. The split replays, with
//! the same runtime and the step's shapes, every projection's three GEMMs (Fprop, Dgrad, Wgrad; experts with
//! tokens·K/N_r rows each, the head over the main and MTP positions), every layer's causal attention core
//! (forward and backward) and every MoE layer's router forward/backward, dispatch and combine, three times,
//! keeping each component's fastest run; percentages are of the fastest measured step, and "rest" is that
//! step minus the three replayed components and the step's own optimizer time (norm, clipping, AdamW). Replayed components run in isolation (warm caches), so the split is
//! an estimate of where the time goes, while tokens/s is the real end-to-end figure.
//!
//! Flags: `--steps N` (5), `--warmup N` (1), `--seq-len T` (128), `--batch B` (4), `--threads N` (2),
//! `--precisions fp32,bf16,fp8`, `--json PATH` (write the results as JSON too).

use kernels::Accumulate;
use model::data::{DataSpec, SyntheticSpec};
use model::layers::WSink;
use model::layers::moe::{Router, combine, combine_backward, dispatch, dispatch_backward};
use model::loss::LossWeights;
use model::lr::{BiasSpeedSchedule, LrSchedule};
use model::ops::{AttnShape, attention_backward, attention_forward};
use model::optim::AdamWConfig;
use model::params::{Normal, ParamStore, RoutingBias};
use model::precision::{Linear, Precision, Runtime};
use model::train::{InitFrom, Progress, TrainOptions, train_single};
use model::{ModelConfig, Result};
use std::ops::ControlFlow;
use std::time::Instant;

#[derive(Clone, Debug, serde::Serialize)]
struct Row {
    precision: String,
    tokens_per_s: f64,
    step_s: f64,
    best_step_s: f64,
    optimizer_s: f64,
    gemm_s: f64,
    attention_s: f64,
    routing_s: f64,
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
        match a.as_str() {
            "--steps" => {
                o.steps = val("--steps")?
                    .parse()
                    .map_err(|e| format!("--steps: {e}"))?
            }
            "--warmup" => {
                o.warmup = val("--warmup")?
                    .parse()
                    .map_err(|e| format!("--warmup: {e}"))?
            }
            "--seq-len" => {
                o.seq_len = val("--seq-len")?
                    .parse()
                    .map_err(|e| format!("--seq-len: {e}"))?
            }
            "--batch" => {
                o.batch = val("--batch")?
                    .parse()
                    .map_err(|e| format!("--batch: {e}"))?
            }
            "--threads" => {
                o.threads = val("--threads")?
                    .parse()
                    .map_err(|e| format!("--threads: {e}"))?
            }
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
    Ok(o)
}

fn name(p: Precision) -> &'static str {
    match p {
        Precision::Fp32 => "fp32",
        Precision::Bf16 => "bf16",
        Precision::Fp8 => "fp8",
    }
}

fn train(
    o: &Opts,
    config: &ModelConfig,
    precision: Precision,
) -> Result<(f64, f64, f64, f64, f64)> {
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
    let summary = train_single(&opts, &mut |_: Progress<'_>| ControlFlow::Continue(()))?;
    let measured = &summary.steps[o.warmup as usize..];
    let time: f64 = measured.iter().map(|r| r.step_time_s).sum();
    let tokens: u64 = measured.iter().map(|r| r.tokens).sum();
    // The fastest step (least disturbed by other processes) anchors the split.
    let best = measured
        .iter()
        .min_by(|a, b| a.step_time_s.total_cmp(&b.step_time_s))
        .ok_or_else(|| model::ModelError::Input("no measured steps".into()))?;
    Ok((
        tokens as f64 / time,
        time / measured.len() as f64,
        best.step_time_s,
        best.time.optimizer_s,
        summary.final_loss.unwrap_or(f64::NAN),
    ))
}

fn random(rng: &mut Normal, n: usize, std: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.sample() * std) as f32).collect()
}

/// Seconds of one step's GEMMs, attention cores and routing, replayed with the step's shapes.
fn replay(o: &Opts, config: &ModelConfig, precision: Precision) -> Result<(f64, f64, f64)> {
    let rt = Runtime::cpu(o.threads, precision);
    let params = ParamStore::init(config, 0);
    let mut grads = params.zeros_like();
    let mut rng = Normal::new(42);
    let t_main = o.seq_len + 1;
    let n_main = o.batch * t_main;
    let depth = config.num_nextn_predict_layers;
    let t_mtp = t_main - 1;
    let n_mtp = o.batch * t_mtp;
    let l_main = config.num_hidden_layers;
    let layer_of = |name: &str| -> Option<usize> {
        name.strip_prefix("model.layers.")?
            .split('.')
            .next()?
            .parse()
            .ok()
    };

    // GEMMs: every projection, head and eh_proj; the router counts as routing.
    let mut gemm = 0.0;
    for e in params.entries() {
        if e.shape.len() != 2
            || e.name == "model.embed_tokens.weight"
            || e.name.ends_with("mlp.gate.weight")
        {
            continue;
        }
        let (n_out, n_in) = (e.shape[0], e.shape[1]);
        let id = params.require(&e.name)?;
        let tokens = match layer_of(&e.name) {
            Some(l) if l >= l_main => n_mtp,
            _ => n_main,
        };
        let (lin, m) = if e.name == "lm_head.weight" {
            (
                Linear::high_precision(id, n_out, n_in),
                n_main + depth * n_mtp,
            )
        } else if e.name.ends_with("eh_proj.weight") {
            (Linear::high_precision(id, n_out, n_in), n_mtp)
        } else if e.name.contains(".mlp.experts.") {
            (
                Linear::new(id, n_out, n_in),
                tokens * config.num_experts_per_tok / config.n_routed_experts,
            )
        } else {
            (Linear::new(id, n_out, n_in), tokens)
        };
        if m == 0 {
            continue;
        }
        let x = random(&mut rng, m * n_in, 1.0);
        let dy = random(&mut rng, m * n_out, 1e-3);
        let mut dx = vec![0f32; m * n_in];
        // The first pass warms caches and the pool; the second is timed.
        for pass in 0..2 {
            let t0 = Instant::now();
            let input = lin.input(&rt, x.clone(), m)?;
            let y = lin.forward(&rt, &params, &input)?;
            lin.backward_input(&rt, &params, &mut dx, &dy, m, Accumulate::Overwrite)?;
            lin.backward_weight(&rt, &mut grads, &dy, &input)?;
            if pass == 1 {
                gemm += t0.elapsed().as_secs_f64();
            }
            std::hint::black_box(y);
        }
        std::hint::black_box(&dx);
    }

    // Attention cores: every main layer over T+1 positions and every MTP layer over T.
    let (h, dqk, dv) = (
        config.num_attention_heads,
        config.qk_head_dim(),
        config.v_head_dim,
    );
    let mut attention = 0.0;
    for t in std::iter::repeat_n(t_main, l_main).chain(std::iter::repeat_n(t_mtp, depth)) {
        let s = AttnShape {
            b: o.batch,
            t,
            h,
            dqk,
            dv,
        };
        let n = o.batch * t;
        let (q, k, v) = (
            random(&mut rng, n * h * dqk, 1.0),
            random(&mut rng, n * h * dqk, 1.0),
            random(&mut rng, n * h * dv, 1.0),
        );
        let dout = random(&mut rng, n * h * dv, 1e-3);
        let (mut out, mut lse) = (vec![0f32; n * h * dv], vec![0f32; o.batch * h * t]);
        let (mut dq, mut dk, mut dvv) = (
            vec![0f32; n * h * dqk],
            vec![0f32; n * h * dqk],
            vec![0f32; n * h * dv],
        );
        let t0 = Instant::now();
        attention_forward(
            &rt.exec,
            &mut out,
            &mut lse,
            &q,
            &k,
            &v,
            s,
            config.softmax_scale(),
        )?;
        attention_backward(
            &rt.exec,
            &mut dq,
            &mut dk,
            &mut dvv,
            &dout,
            &q,
            &k,
            &v,
            &out,
            &lse,
            s,
            config.softmax_scale(),
        )?;
        attention += t0.elapsed().as_secs_f64();
        std::hint::black_box((dq, dk, dvv));
    }

    // Routing: router GEMM + sigmoid + group-limited top-k + balance loss, dispatch, combine, and backwards.
    let bias = RoutingBias::zeros(config);
    let d = config.hidden_size;
    let mut routing = 0.0;
    for layer in config.moe_layer_ids() {
        let (b, t) = (o.batch, if layer >= l_main { t_mtp } else { t_main });
        let n = b * t;
        let router = Router::new(config, &params, layer, 1e-4)?;
        let u = random(&mut rng, n * d, 1.0);
        let layer_bias = bias
            .get(layer)
            .map(<[f32]>::to_vec)
            .unwrap_or_else(|| vec![0.0; config.n_routed_experts]);
        let t0 = Instant::now();
        let r = router.forward(&rt, &params, &u, b, &layer_bias)?;
        let disp = dispatch(&u, &r, d, 1);
        let mut out = vec![0f32; n * d];
        combine(&mut out, &disp.x, &disp);
        let dperm = combine_backward(&out, &disp);
        let mut du = vec![0f32; n * d];
        let mut dw = vec![0f32; n * r.k];
        let dgate = vec![1e-3f32; dperm.len() / d];
        dispatch_backward(&mut du, &mut dw, &dperm, &dgate, &disp);
        router.backward_input(
            &rt,
            &params,
            &mut du,
            &dw,
            r,
            1.0,
            &mut WSink::Now(&rt, &mut grads),
        )?;
        routing += t0.elapsed().as_secs_f64();
        std::hint::black_box(du);
    }
    Ok((gemm, attention, routing))
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
        "tiny: B={} T={} threads={} steps={} (+{} warm-up); split of the fastest step by component replay",
        o.batch, o.seq_len, o.threads, o.steps, o.warmup
    );
    println!(
        "{:<6} {:>9} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8}",
        "prec", "tokens/s", "step s", "best s", "gemm", "attn", "routing", "optim", "rest", "loss"
    );
    let mut rows = Vec::new();
    for &p in &o.precisions {
        let res = train(&o, &config, p).and_then(|(tps, step, best, optim, loss)| {
            // The replay runs three times and each component keeps its fastest run, to reduce noise from
            // other processes on the machine.
            let mut split = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
            for _ in 0..3 {
                let r = replay(&o, &config, p)?;
                split = (split.0.min(r.0), split.1.min(r.1), split.2.min(r.2));
            }
            let (gemm, attn, routing) = split;
            Ok(Row {
                precision: name(p).into(),
                tokens_per_s: tps,
                step_s: step,
                best_step_s: best,
                optimizer_s: optim,
                gemm_s: gemm,
                attention_s: attn,
                routing_s: routing,
                rest_s: (best - gemm - attn - routing - optim).max(0.0),
                final_loss: loss,
            })
        });
        match res {
            Ok(r) => {
                let pct = |x: f64| 100.0 * x / r.best_step_s;
                println!(
                    "{:<6} {:>9.0} {:>8.3} {:>8.3} {:>6.0}% {:>6.0}% {:>6.0}% {:>6.0}% {:>6.0}% {:>8.4}",
                    r.precision,
                    r.tokens_per_s,
                    r.step_s,
                    r.best_step_s,
                    pct(r.gemm_s),
                    pct(r.attention_s),
                    pct(r.routing_s),
                    pct(r.optimizer_s),
                    pct(r.rest_s),
                    r.final_loss
                );
                rows.push(r);
            }
            Err(e) => println!("{:<6} failed: {e}", name(p)),
        }
    }
    if let Some(path) = &o.json {
        match serde_json::to_string_pretty(&rows).map(|t| std::fs::write(path, t)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("error: writing {path}: {e}"),
            Err(e) => eprintln!("error: {e}"),
        }
    }
    std::process::ExitCode::SUCCESS
}
