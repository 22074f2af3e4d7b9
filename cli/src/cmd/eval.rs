//! `moetrain eval --model DIR --tokens FILE [--dump-logits F.npy]`: forward-only evaluation of an HF-format
//! model directory on a `.npy` token array [batch, seq]: prints the mean main cross-entropy, the MTP terms,
//! the balance loss and the total, and optionally writes the logits [batch, seq, vocab] as `.npy`.
//!
//! Invariant: sequences are evaluated in chunks of `--batch`, and the printed losses are token-weighted
//! means over all chunks, so the result does not depend on the chunk size beyond f32 rounding.

use super::step::{load_model, load_tokens};
use anyhow::{Context, Result};
use model::loss::LossWeights;
use model::params::StageSpec;
use model::precision::{Precision, Runtime};
use model::stage::{MicroBatch, Stage};
use std::path::PathBuf;
use std::process::ExitCode;

/// `moetrain eval`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// HF-format model directory (config.json + model*.safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// Token ids, an integer `.npy` array [batch, seq] (or [seq]).
    #[arg(long)]
    pub tokens: PathBuf,
    /// Write the main logits [batch, seq, vocab] here as f32 `.npy`.
    #[arg(long)]
    pub dump_logits: Option<PathBuf>,
    /// Projection precision: fp32, bf16 or fp8.
    #[arg(long, default_value = "fp32")]
    pub precision: Precision,
    /// Sequences per forward.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// MTP depth to use (default: the config's).
    #[arg(long)]
    pub mtp_depth: Option<usize>,
    /// λ of the MTP loss term.
    #[arg(long, default_value_t = 0.3)]
    pub mtp_lambda: f64,
    /// α of the sequence-wise balance loss.
    #[arg(long, default_value_t = 1e-4)]
    pub balance_alpha: f64,
    /// CPU threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

/// Runs the command.
pub fn run(args: Args) -> Result<ExitCode> {
    let (config, params, bias) = load_model(&args.model, args.mtp_depth)?;
    let (tokens, b, t) = load_tokens(&args.tokens, config.vocab_size)?;
    let rt = Runtime::cpu(args.threads, args.precision);
    let weights = LossWeights {
        mtp_lambda: args.mtp_lambda,
        balance_alpha: args.balance_alpha,
    };
    let chunk = args.batch.max(1);
    let mut logits_all: Vec<f32> = Vec::new();
    let (mut main, mut mtp, mut bal) = (0.0, vec![0.0; config.num_nextn_predict_layers], 0.0);
    for (i, start) in (0..b).step_by(chunk).enumerate() {
        let nb = chunk.min(b - start);
        let toks = &tokens[start * t..(start + nb) * t];
        let mut stage = Stage::new(&config, StageSpec::whole(&config), &params, weights)?;
        stage.set_trace(args.dump_logits.is_some());
        let mb = MicroBatch {
            id: i as u64,
            tokens: toks,
            b: nb,
            t,
            loss_scale: 1.0,
        };
        let out = stage
            .forward(&rt, &params, &bias, &mb, None)
            .context("forward")?;
        let w = nb as f64 / b as f64;
        main += w * out.loss.main;
        bal += w * out.loss.balance;
        for (a, v) in mtp.iter_mut().zip(&out.loss.mtp) {
            *a += w * v;
        }
        if args.dump_logits.is_some() {
            let trace = stage.take_trace();
            if let Some((_, _, v)) = trace.floats.into_iter().find(|(n, _, _)| n == "logits") {
                logits_all.extend(v);
            }
        }
    }
    let lam = if mtp.is_empty() {
        0.0
    } else {
        args.mtp_lambda / mtp.len() as f64
    };
    let total = main + lam * mtp.iter().sum::<f64>() + bal;
    println!(
        "{{\"loss\": {total:.7}, \"loss_main\": {main:.7}, \"loss_mtp\": {mtp:?}, \"loss_aux\": {bal:.7e}, \"sequences\": {b}, \"seq\": {t}}}"
    );
    if let Some(path) = &args.dump_logits {
        model::npy::write_f32(path, &[b, t, config.vocab_size], &logits_all)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
