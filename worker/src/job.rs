//! From a `TrainingJob` manifest to the model's training options: the one place that maps manifest
//! fields (optimizer, precision, MTP, bias update, data) onto `model::train::TrainOptions`.
//!
//! Both `moetrain train --single` and the worker's ranks go through [`train_options`], so a
//! single-process run and a distributed run of the same manifest train the same model on the same
//! data. Invariant: pure mapping; no file is read here except through the model config of the
//! manifest (a `config.json` path resolves against `base`).

use std::path::{Path, PathBuf};

use manifest::TrainingJob;
use model::balance::BiasUpdateVariant;
use model::data::{DataSpec, SyntheticSpec, SyntheticVariant, TokenDtype};
use model::loss::LossWeights;
use model::lr::{BiasSpeedSchedule, LrSchedule};
use model::optim::{AdamWConfig, MomentDtype};
use model::precision::Precision;
use model::train::{InitFrom, TrainOptions};

/// Why a manifest could not become training options.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The manifest text did not parse or validate.
    #[error("{0}")]
    Manifest(String),
    /// A field names something this build cannot train with.
    #[error("{field}: {message}")]
    Unsupported {
        /// The manifest path of the field.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// Choices a manifest does not make: where the weights come from, threads, a data variant.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// Initial weights (default: a seed from `spec.training.seed`).
    pub init: Option<InitFrom>,
    /// Compute threads (default: `spec.resources.threadsPerRank`, else every core).
    pub threads: Option<usize>,
    /// Synthetic data variant replacing the manifest's (`pattern`/`markov`, `skewed`).
    pub synthetic: Option<String>,
    /// Checkpoint directory (`None`: none are written).
    pub checkpoint_dir: Option<PathBuf>,
}

/// Parses a manifest with its `--set` overrides (as the coordinator stored them).
pub fn parse(src: &str, origin: &str, sets: &[String]) -> Result<TrainingJob, JobError> {
    manifest::parse_job(src, origin, sets).map_err(|e| JobError::Manifest(e.to_string()))
}

/// The training options of `job`; relative paths in the manifest resolve against `base`.
pub fn train_options(
    job: &TrainingJob,
    base: &Path,
    over: &Overrides,
) -> Result<TrainOptions, JobError> {
    let config = job
        .model_config(base)
        .map_err(|e| JobError::Manifest(e.to_string()))?;
    let t = &job.spec.training;
    let o = &t.optimizer;
    let precision = match t.precision {
        manifest::Precision::Fp32 => Precision::Fp32,
        manifest::Precision::Bf16 => Precision::Bf16,
        manifest::Precision::Fp8 => Precision::Fp8,
        manifest::Precision::Fp8Ue8m0 => Precision::Fp8Ue8m0,
    };
    let data = match &job.spec.data {
        manifest::DataSource::Synthetic(s) => {
            let name = over.synthetic.as_deref().unwrap_or(&s.kind);
            let variant = match name {
                "pattern" | "markov" => SyntheticVariant::Markov,
                "skewed" => SyntheticVariant::Skewed,
                other => {
                    return Err(JobError::Unsupported {
                        field: "spec.data.synthetic.kind",
                        message: format!(
                            "unknown synthetic data kind {other:?} (pattern/markov, skewed)"
                        ),
                    });
                }
            };
            DataSpec::Synthetic(SyntheticSpec {
                variant,
                ..SyntheticSpec::default()
            })
        }
        manifest::DataSource::Text(tx) => match &tx.tokenizer {
            Some(t) => DataSpec::TextTokenized {
                path: base.join(&tx.path),
                tokenizer: base.join(t),
            },
            None => DataSpec::Text {
                path: base.join(&tx.path),
            },
        },
        manifest::DataSource::Tokens(tk) => DataSpec::Tokens {
            path: base.join(&tk.path),
            dtype: match tk.dtype {
                manifest::TokenDtype::Uint16 => TokenDtype::U16,
                manifest::TokenDtype::Uint32 => TokenDtype::U32,
            },
        },
    };
    let threads = over
        .threads
        .or(job.spec.resources.threads_per_rank.map(|n| n as usize))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mtp_depth = t
        .mtp
        .depth
        .map_or(config.num_nextn_predict_layers, |d| d as usize);
    Ok(TrainOptions {
        model: config,
        init: over
            .init
            .clone()
            .unwrap_or(InitFrom::Seed(job.spec.training.seed)),
        steps: t.steps,
        seq_len: t.seq_len as usize,
        micro_batch_size: t.micro_batch_size as usize,
        // `microBatches` counts one pipeline replica's micro-batches per step; the job (and the
        // single-process reference of it) trains that many on every data-parallel replica.
        micro_batches: (job.spec.parallelism.micro_batches() * job.spec.parallelism.data.max(1))
            as usize,
        precision,
        threads: threads.max(1),
        adamw: AdamWConfig {
            beta1: o.beta1 as f32,
            beta2: o.beta2 as f32,
            eps: o.eps as f32,
            weight_decay: o.weight_decay as f32,
            max_grad_norm: (o.grad_clip > 0.0).then_some(o.grad_clip as f32),
            moment_dtype: match o.moment_dtype {
                manifest::MomentDtype::Bf16 => MomentDtype::Bf16,
                manifest::MomentDtype::F32 => MomentDtype::F32,
            },
        },
        lr: LrSchedule {
            peak: o.lr as f32,
            floor: o.min_lr as f32,
            warmup_steps: o.warmup_steps,
            total_steps: t.steps,
        },
        mtp_depth,
        loss: LossWeights {
            mtp_lambda: t.mtp.weight,
            balance_alpha: t.balance_loss_weight,
        },
        bias_speed: BiasSpeedSchedule {
            rate: t.bias_update.rate as f32,
            until_tokens: t.bias_update.stop_after_tokens,
        },
        bias_variant: if t.bias_update.subtract_mean {
            BiasUpdateVariant::SignMeanSubtracted
        } else {
            BiasUpdateVariant::Sign
        },
        data,
        data_seed: t.seed,
        checkpoint_dir: over.checkpoint_dir.clone(),
        checkpoint_interval: job.spec.checkpointing.interval,
        job: serde_json::to_value(job).unwrap_or(serde_json::Value::Null),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = include_str!("../../manifests/tiny.yaml");

    #[test]
    fn the_tiny_manifest_maps_onto_its_training_options() {
        let job = parse(TINY, "tiny.yaml", &["spec.training.steps=30".into()]).unwrap();
        let over = Overrides {
            threads: Some(1),
            ..Overrides::default()
        };
        let o = train_options(&job, Path::new(""), &over).unwrap();
        assert_eq!(o.steps, 30);
        assert_eq!(o.micro_batches, 16);
        assert_eq!(o.seq_len, 128);
        assert_eq!(o.precision, Precision::Fp8);
        assert_eq!(o.mtp_depth, 1);
        assert_eq!(o.threads, 1);
        assert!(matches!(o.init, InitFrom::Seed(42)));
        assert_eq!(o.lr.warmup_steps, 20);
    }

    #[test]
    fn an_unknown_synthetic_kind_names_the_field() {
        let job = parse(TINY, "tiny.yaml", &[]).unwrap();
        let over = Overrides {
            synthetic: Some("zipf".into()),
            ..Overrides::default()
        };
        let e = train_options(&job, Path::new(""), &over).unwrap_err();
        assert!(
            e.to_string().starts_with("spec.data.synthetic.kind:"),
            "{e}"
        );
    }
}
