//! `moetrain step --model DIR --tokens FILE.npy --dump OUTDIR`: one fp32 forward/backward of an HF-format
//! model directory on a token batch, written as `OUTDIR/reference.safetensors` (loss terms, logits, hidden
//! states, MTP outputs, routing) and `OUTDIR/grads.safetensors` (every parameter gradient) with exactly the
//! names and shapes of `shared/golden/v3-tiny`, so comparing with an independent implementation is a file
//! comparison.
//!
//! Invariant: the numbers come from `model::model::reference_step`, the same code the golden test checks.

use anyhow::{Context, Result, bail};
use model::loss::LossWeights;
use model::params::ParamStore;
use model::precision::{Precision, Runtime};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `moetrain step`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// HF-format model directory (config.json + model*.safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// Token ids, an integer `.npy` array [batch, seq] (or [seq]).
    #[arg(long)]
    pub tokens: PathBuf,
    /// Output directory for reference.safetensors and grads.safetensors.
    #[arg(long)]
    pub dump: PathBuf,
    /// MTP depth to use (at most the config's `num_nextn_predict_layers`; default: the config's).
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

/// Loads a model directory, applying an optional MTP-depth override.
pub fn load_model(
    dir: &Path,
    mtp_depth: Option<usize>,
) -> Result<(model::ModelConfig, ParamStore, model::params::RoutingBias)> {
    let (mut config, params, bias) = ParamStore::load_hf_dir(dir)
        .with_context(|| format!("loading model directory {}", dir.display()))?;
    let Some(depth) = mtp_depth else {
        return Ok((config, params, bias));
    };
    if depth > config.num_nextn_predict_layers {
        bail!(
            "--mtp-depth {depth} exceeds the model's num_nextn_predict_layers {}",
            config.num_nextn_predict_layers
        );
    }
    config.num_nextn_predict_layers = depth;
    let mut reduced = ParamStore::zeros(&config);
    reduced.copy_from(&params)?;
    let mut rbias = model::params::RoutingBias::zeros(&config);
    for (layer, b) in bias.iter() {
        if let Some(dst) = rbias.get_mut(layer) {
            dst.copy_from_slice(b);
        }
    }
    Ok((config, reduced, rbias))
}

/// Reads a `.npy` token array into (tokens, batch, seq), checking ids against the vocabulary.
pub fn load_tokens(path: &Path, vocab: usize) -> Result<(Vec<u32>, usize, usize)> {
    let arr = model::npy::read_ints(path)
        .with_context(|| format!("reading tokens {}", path.display()))?;
    let (b, t) = match arr.shape.as_slice() {
        [t] => (1, *t),
        [b, t] => (*b, *t),
        other => bail!(
            "{}: expected a [batch, seq] array, got shape {other:?}",
            path.display()
        ),
    };
    let mut tokens = Vec::with_capacity(arr.data.len());
    for (i, &x) in arr.data.iter().enumerate() {
        if x < 0 || x as usize >= vocab {
            bail!(
                "{}: token {x} at index {i} is outside the vocabulary 0..{vocab}",
                path.display()
            );
        }
        tokens.push(x as u32);
    }
    Ok((tokens, b, t))
}

/// Runs the command.
pub fn run(args: Args) -> Result<ExitCode> {
    let (config, params, bias) = load_model(&args.model, args.mtp_depth)?;
    let (tokens, b, t) = load_tokens(&args.tokens, config.vocab_size)?;
    let rt = Runtime::cpu(args.threads, Precision::Fp32);
    let weights = LossWeights {
        mtp_lambda: args.mtp_lambda,
        balance_alpha: args.balance_alpha,
    };
    let res = model::model::reference_step(&rt, &config, &params, &bias, &tokens, b, t, weights)
        .context("forward/backward")?;
    model::model::write_dump(&args.dump, &res, &tokens, b, t)
        .with_context(|| format!("writing {}", args.dump.display()))?;
    println!(
        "loss {:.7} (main {:.7}, mtp {:?}, balance {:.3e}); wrote {}/{{reference,grads}}.safetensors",
        res.loss.total,
        res.loss.main,
        res.loss.mtp,
        res.loss.balance,
        args.dump.display()
    );
    Ok(ExitCode::SUCCESS)
}
