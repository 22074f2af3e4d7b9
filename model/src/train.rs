//! The single-process trainer: the whole model in one process, gradient accumulation over micro-batches,
//! the routing-bias update, global-norm clipping, AdamW, periodic checkpoints and the run summary.
//!
//! One step, in order: zero the gradient buffer; for each micro-batch `m` sample the batch keyed by
//! (seed, step, rank 0, m), run forward + backward adding into the gradients, and add up the expert loads;
//! compute the exact global gradient norm of the micro-batch mean; clip; AdamW with the step's learning rate;
//! then update every MoE layer's routing bias from the step's summed loads with γ for the tokens seen before
//! the step. The order matters: the step's routing used the old bias, and the next step sees the new one.
//!
//! Invariant: a step is a pure function of (parameters, moments, biases, step index, tokens seen, options);
//! nothing reads a clock or an unseeded generator, so stopping after a checkpoint and resuming from it gives
//! bit-for-bit the same parameters as an uninterrupted run.

use crate::balance::{BiasUpdateVariant, LoadStats, update_routing_bias};
use crate::checkpoint::{self, TrainingState};
use crate::data::{BatchKey, DataSource, DataSpec, TokenBatch};
use crate::loss::LossWeights;
use crate::lr::{BiasSpeedSchedule, LrSchedule};
use crate::optim::{AdamW, AdamWConfig, DecayMask, StepInputs, SumSquares, clip_coefficient};
use crate::params::{ParamStore, RoutingBias};
use crate::precision::{Precision, Runtime};
use crate::stage::{MicroBatch, Stage};
use crate::{ModelConfig, ModelError, Result};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Where the initial parameters come from.
#[derive(Clone, Debug, PartialEq)]
pub enum InitFrom {
    /// Random initialization from a seed (norms 1, the rest N(0, initializer_range²)), zero biases.
    Seed(u64),
    /// An HF-format directory (config.json + *.safetensors); its config replaces the configured one.
    HfDir(PathBuf),
    /// A training checkpoint written by this trainer: parameters, biases, moments and the step counters
    /// are restored and training continues from its step.
    Resume(PathBuf),
}

/// Everything `train_single` needs (the `manifest` crate's job is mapped onto this by the CLI).
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Model architecture (replaced by the directory's config for [`InitFrom::HfDir`] / `Resume`).
    pub model: ModelConfig,
    /// Initial state.
    pub init: InitFrom,
    /// Total optimizer steps of the run (a resumed run stops at the same total).
    pub steps: u64,
    /// Tokens per sequence T.
    pub seq_len: usize,
    /// Sequences per micro-batch B.
    pub micro_batch_size: usize,
    /// Micro-batches per step (gradient accumulation).
    pub micro_batches: usize,
    /// Projection precision.
    pub precision: Precision,
    /// Compute threads.
    pub threads: usize,
    /// AdamW settings.
    pub adamw: AdamWConfig,
    /// Learning-rate schedule.
    pub lr: LrSchedule,
    /// MTP depth D to train (at most the config's `num_nextn_predict_layers`; 0 disables MTP). A seeded run
    /// trains a model with exactly this depth; an HF or resumed model must already have it.
    pub mtp_depth: usize,
    /// λ of the MTP term and α of the balance loss.
    pub loss: LossWeights,
    /// Routing-bias update speed.
    pub bias_speed: BiasSpeedSchedule,
    /// Routing-bias update variant.
    pub bias_variant: BiasUpdateVariant,
    /// Training data.
    pub data: DataSpec,
    /// Seed of the data sampler.
    pub data_seed: u64,
    /// Directory for `step-*` checkpoints; `None` writes none.
    pub checkpoint_dir: Option<PathBuf>,
    /// Steps between checkpoints; 0 writes only the final one.
    pub checkpoint_interval: u64,
    /// Free-form description stored in checkpoints and the summary (e.g. the job manifest as JSON).
    pub job: serde_json::Value,
}

/// Loss terms of one step (means over its micro-batches). `mtp` and `balance` are the weighted terms as they
/// enter `total` = `main` + `mtp` + `balance`.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossTerms {
    /// Main next-token cross-entropy.
    pub main: f64,
    /// λ/D · Σ_k MTP cross-entropy.
    pub mtp: f64,
    /// α · Σ_layers sequence-wise balance loss.
    pub balance: f64,
    /// The optimized loss.
    pub total: f64,
}

/// One MoE layer's expert load in one step.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerLoad {
    /// Layer id (MTP layers included, numbered from `num_hidden_layers`).
    pub layer: usize,
    /// Largest number of (token, expert) assignments to one expert.
    pub max: u64,
    /// Mean assignments per expert.
    pub mean: f64,
}

/// Seconds spent per kind of work in one step (summed over micro-batches).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TimeSplit {
    /// Forward and backward passes of the model.
    pub forward_backward_s: f64,
    /// Gradient norm, clipping and AdamW.
    pub optimizer_s: f64,
    /// Data sampling.
    pub data_s: f64,
    /// Of `forward_backward_s`: projection GEMMs with their FP8 quantization (zero unless
    /// `profile::set_enabled(true)`).
    #[serde(default)]
    pub gemm_s: f64,
    /// Of `forward_backward_s`: the attention core (zero unless profiling).
    #[serde(default)]
    pub attention_s: f64,
    /// Of `forward_backward_s`: MoE routing (zero unless profiling).
    #[serde(default)]
    pub routing_s: f64,
}

/// What one step did.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepRecord {
    /// Step index (0-based).
    pub step: u64,
    /// Learning rate used.
    pub lr: f32,
    /// Loss terms.
    pub loss: LossTerms,
    /// Global gradient norm of the micro-batch mean, before clipping.
    pub grad_norm: f64,
    /// Routing-bias speed γ used after this step.
    pub bias_gamma: f32,
    /// Tokens trained on in this step (B·T·micro-batches).
    pub tokens: u64,
    /// Wall time of the step in seconds.
    pub step_time_s: f64,
    /// Of `step_time_s`: seconds spent waiting for the coordinator's routing bias before the step
    /// (distributed runs: the shortest wait over the ranks; always 0 in one process).
    #[serde(default)]
    pub bias_wait_s: f64,
    /// tokens / step time.
    pub tokens_per_s: f64,
    /// Time split.
    pub time: TimeSplit,
    /// Per MoE layer: max and mean expert load.
    pub expert_load: Vec<LayerLoad>,
}

/// The run summary (`summary.json`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// Always "single" for this trainer.
    pub mode: String,
    /// The job description passed in.
    pub job: serde_json::Value,
    /// The model config trained.
    pub model: serde_json::Value,
    /// "fp32", "bf16" or "fp8".
    pub precision: String,
    /// Step index the run started at (non-zero when resumed).
    pub start_step: u64,
    /// Steps completed at the end.
    pub end_step: u64,
    /// Whether the run stopped early because the caller asked.
    pub stopped_early: bool,
    /// Per-step records of this run.
    pub steps: Vec<StepRecord>,
    /// Total loss of the last step.
    pub final_loss: Option<f64>,
    /// Mean total loss of the final parameters over [`EVAL_BATCHES`] fixed evaluation micro-batches (keyed
    /// apart from every training batch, identical for every precision and resume point); None when the run
    /// stopped early.
    #[serde(default)]
    pub final_eval_loss: Option<f64>,
    /// Main next-token cross-entropy of the same evaluation.
    #[serde(default)]
    pub final_eval_main_loss: Option<f64>,
    /// Tokens trained on by this run.
    pub tokens: u64,
    /// Wall time of this run in seconds (steps plus checkpoints).
    pub wall_s: f64,
    /// Mean tokens/s over this run's steps.
    pub tokens_per_s: f64,
    /// Checkpoints written, in order.
    pub checkpoints: Vec<String>,
    /// The last checkpoint written, if any.
    pub final_checkpoint: Option<String>,
}

impl Summary {
    /// Writes the summary as pretty JSON.
    pub fn write(&self, path: &std::path::Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| ModelError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| ModelError::Io {
                path: parent.display().to_string(),
                source,
            })?;
        }
        std::fs::write(path, text).map_err(|source| ModelError::Io {
            path: path.display().to_string(),
            source,
        })
    }
}

/// What a progress callback sees after each step.
#[derive(Clone, Debug)]
pub struct Progress<'a> {
    /// The step just finished.
    pub record: &'a StepRecord,
    /// Total steps of the run.
    pub total_steps: u64,
    /// A checkpoint written right after this step, if any.
    pub checkpoint: Option<&'a str>,
}

/// Model state the loop owns.
struct State {
    config: ModelConfig,
    params: ParamStore<f32>,
    bias: RoutingBias,
    opt: AdamW,
    step: u64,
    tokens_seen: u64,
}

fn initial_state(opts: &TrainOptions) -> Result<State> {
    let mask_of = |p: &ParamStore<f32>| {
        DecayMask::from_layout(p.entries().iter().map(|e| (e.offset, e.shape.as_slice())))
    };
    match &opts.init {
        InitFrom::Seed(seed) => {
            let mut config = opts.model.clone();
            if opts.mtp_depth > config.num_nextn_predict_layers {
                return Err(ModelError::Input(format!(
                    "MTP depth {} exceeds the model's num_nextn_predict_layers {}",
                    opts.mtp_depth, config.num_nextn_predict_layers
                )));
            }
            config.num_nextn_predict_layers = opts.mtp_depth;
            let params = ParamStore::init(&config, *seed);
            let opt = AdamW::new(opts.adamw, 0..params.numel(), &mask_of(&params));
            Ok(State {
                bias: RoutingBias::zeros(&config),
                config,
                params,
                opt,
                step: 0,
                tokens_seen: 0,
            })
        }
        InitFrom::HfDir(dir) => {
            let (config, params, bias) = ParamStore::load_hf_dir(dir)?;
            let opt = AdamW::new(opts.adamw, 0..params.numel(), &mask_of(&params));
            Ok(State {
                config,
                params,
                bias,
                opt,
                step: 0,
                tokens_seen: 0,
            })
        }
        InitFrom::Resume(dir) => {
            let ck = checkpoint::load(dir)?;
            let mut opt = AdamW::new(opts.adamw, 0..ck.params.numel(), &mask_of(&ck.params));
            if ck.state.adamw != opts.adamw {
                return Err(ModelError::Input(format!(
                    "{}: the checkpoint's optimizer settings {:?} differ from this run's {:?}",
                    dir.display(),
                    ck.state.adamw,
                    opts.adamw
                )));
            }
            if let Some((m, v)) = ck.moments {
                opt.restore(m, v, ck.state.step)
                    .map_err(|reason| ModelError::Input(format!("{}: {reason}", dir.display())))?;
            }
            Ok(State {
                config: ck.config,
                params: ck.params,
                bias: ck.bias,
                opt,
                step: ck.state.step,
                tokens_seen: ck.state.tokens_seen,
            })
        }
    }
}

fn training_state(opts: &TrainOptions, st: &State, last_lr: f32) -> TrainingState {
    TrainingState {
        format: checkpoint::FORMAT.into(),
        step: st.step,
        tokens_seen: st.tokens_seen,
        data_seed: opts.data_seed,
        data_step: st.step,
        init_seed: match opts.init {
            InitFrom::Seed(s) => s,
            _ => 0,
        },
        lr: opts.lr,
        last_lr,
        adamw: opts.adamw,
        bias_speed: opts.bias_speed,
        extra: opts.job.clone(),
    }
}

/// Trains `opts.steps` steps (from the resumed step, if resuming) and returns the summary. `progress` is called
/// after every step; returning `ControlFlow::Break(())` stops the run after writing a final checkpoint.
pub fn train_single(
    opts: &TrainOptions,
    progress: &mut dyn FnMut(Progress<'_>) -> ControlFlow<()>,
) -> Result<Summary> {
    let _span = tracing::info_span!("train_single").entered();
    let run_start = Instant::now();
    if opts.micro_batches == 0 || opts.micro_batch_size == 0 || opts.seq_len == 0 {
        return Err(ModelError::Input(
            "micro_batches, micro_batch_size and seq_len must all be positive".into(),
        ));
    }
    let mut st = initial_state(opts)?;
    let data = DataSource::open(&opts.data, st.config.vocab_size)?;
    if st.config.num_nextn_predict_layers != opts.mtp_depth {
        return Err(ModelError::Input(format!(
            "the loaded model has MTP depth {}, the run asks for {}",
            st.config.num_nextn_predict_layers, opts.mtp_depth
        )));
    }
    // Weights are prepared (rounded or quantized) once per optimizer step; `weights_changed` follows
    // every update.
    let rt = Runtime::cpu(opts.threads, opts.precision).with_weight_cache();
    let mut stage = Stage::new(
        &st.config,
        crate::params::StageSpec::whole(&st.config),
        &st.params,
        opts.loss,
    )?;
    let mut grads = st.params.zeros_like();
    let moe_layers: Vec<usize> = st.bias.layer_ids().to_vec();

    let start_step = st.step;
    let mut summary = Summary {
        mode: "single".into(),
        job: opts.job.clone(),
        model: serde_json::to_value(&st.config).unwrap_or(serde_json::Value::Null),
        precision: opts.precision.name().into(),
        start_step,
        end_step: start_step,
        stopped_early: false,
        steps: Vec::new(),
        final_loss: None,
        final_eval_loss: None,
        final_eval_main_loss: None,
        tokens: 0,
        wall_s: 0.0,
        tokens_per_s: 0.0,
        checkpoints: Vec::new(),
        final_checkpoint: None,
    };
    let mut step_seconds = 0.0;
    let mut last_checkpoint_step = None;
    while st.step < opts.steps {
        let t0 = Instant::now();
        let mut time = TimeSplit::default();
        crate::profile::take();
        grads.fill_zero();
        let mut loss = LossTerms::default();
        let mut loads: Vec<Vec<u64>> = moe_layers
            .iter()
            .map(|_| vec![0u64; st.config.n_routed_experts])
            .collect();
        for micro in 0..opts.micro_batches {
            let td = Instant::now();
            let key = BatchKey {
                seed: opts.data_seed,
                step: st.step,
                dp_rank: 0,
                micro: micro as u32,
            };
            let batch: TokenBatch = data.sample(key, opts.micro_batch_size, opts.seq_len)?;
            time.data_s += td.elapsed().as_secs_f64();
            let tf = Instant::now();
            // The model sees each row of T + 1 tokens as one sequence: T positions have a next-token target.
            let mb = MicroBatch {
                id: micro as u64,
                tokens: &batch.tokens,
                b: batch.batch,
                t: batch.row_len,
                loss_scale: 1.0,
            };
            let out = stage.forward(&rt, &st.params, &st.bias, &mb, None)?;
            stage.backward(&rt, &st.params, mb.id, None, &mut grads)?;
            time.forward_backward_s += tf.elapsed().as_secs_f64();
            let prof = crate::profile::take();
            time.gemm_s += prof.gemm_s;
            time.attention_s += prof.attention_s;
            time.routing_s += prof.routing_s;
            let depth = out.loss.mtp.len().max(1) as f64;
            loss.main += out.loss.main;
            loss.mtp += opts.loss.mtp_lambda / depth * out.loss.mtp.iter().sum::<f64>();
            loss.balance += out.loss.balance;
            loss.total += out.loss.total;
            for (layer, counts) in &stage.take_expert_load() {
                let idx = moe_layers.iter().position(|l| l == layer).ok_or_else(|| {
                    ModelError::Input(format!("the model reported expert load for layer {layer}, which has no routing bias"))
                })?;
                for (acc, c) in loads[idx].iter_mut().zip(counts) {
                    *acc += c;
                }
            }
        }
        let n_micro = opts.micro_batches as f64;
        loss.main /= n_micro;
        loss.mtp /= n_micro;
        loss.balance /= n_micro;
        loss.total /= n_micro;

        // The gradient buffer holds the sum over micro-batches; the step uses their mean. The norm of the mean
        // is the exact norm of the sum divided by the micro-batch count.
        let topt = Instant::now();
        let lr = opts.lr.lr(st.step);
        let sum_norm = SumSquares::of(grads.flat()).value().sqrt();
        let grad_norm = sum_norm / n_micro;
        let clip = clip_coefficient(grad_norm as f32, opts.adamw.max_grad_norm);
        if !clip.is_finite() {
            return Err(ModelError::Input(format!(
                "non-finite gradient norm at step {}",
                st.step
            )));
        }
        let grad_scale = (f64::from(clip) / n_micro) as f32;
        let (params, opt) = (&mut st.params, &mut st.opt);
        rt.exec.install(|| {
            opt.update(
                params.flat_mut(),
                grads.flat(),
                StepInputs { lr, grad_scale },
            )
        });
        rt.weights_changed();
        let gamma = opts.bias_speed.gamma(st.tokens_seen);
        for (layer, load) in moe_layers.iter().zip(&loads) {
            if let Some(b) = st.bias.get_mut(*layer) {
                update_routing_bias(b, load, gamma, opts.bias_variant);
            }
        }
        time.optimizer_s += topt.elapsed().as_secs_f64();

        let tokens = (opts.micro_batch_size * opts.seq_len * opts.micro_batches) as u64;
        st.tokens_seen += tokens;
        st.step += 1;
        let step_time = t0.elapsed().as_secs_f64();
        step_seconds += step_time;
        let record = StepRecord {
            bias_wait_s: 0.0,
            step: st.step - 1,
            lr,
            loss,
            grad_norm,
            bias_gamma: gamma,
            tokens,
            step_time_s: step_time,
            tokens_per_s: tokens as f64 / step_time.max(1e-12),
            time,
            expert_load: moe_layers
                .iter()
                .zip(&loads)
                .map(|(&layer, l)| {
                    let s = LoadStats::of(l);
                    LayerLoad {
                        layer,
                        max: s.max,
                        mean: s.mean,
                    }
                })
                .collect(),
        };
        tracing::debug!(step = record.step, loss = loss.total, grad_norm, lr, "step");
        summary.tokens += tokens;

        let is_last = st.step == opts.steps;
        let due = opts.checkpoint_interval > 0 && st.step % opts.checkpoint_interval == 0;
        let mut written = None;
        if let Some(dir) = &opts.checkpoint_dir
            && (due || is_last)
        {
            written = Some(save_checkpoint(dir, opts, &st, lr)?);
            last_checkpoint_step = Some(st.step);
        }
        if let Some(p) = &written {
            summary.checkpoints.push(p.clone());
            summary.final_checkpoint = Some(p.clone());
        }
        summary.final_loss = Some(loss.total);
        summary.steps.push(record);
        let flow = progress(Progress {
            record: summary.steps.last().expect("just pushed"),
            total_steps: opts.steps,
            checkpoint: written.as_deref(),
        });
        if flow.is_break() && !is_last {
            summary.stopped_early = true;
            if let Some(dir) = &opts.checkpoint_dir
                && last_checkpoint_step != Some(st.step)
            {
                let p = save_checkpoint(dir, opts, &st, lr)?;
                summary.checkpoints.push(p.clone());
                summary.final_checkpoint = Some(p);
            }
            break;
        }
    }
    summary.end_step = st.step;
    if !summary.stopped_early {
        let (total, main) = evaluate(opts, &st, &data, &rt)?;
        summary.final_eval_loss = Some(total);
        summary.final_eval_main_loss = Some(main);
    }
    summary.wall_s = run_start.elapsed().as_secs_f64();
    summary.tokens_per_s = if step_seconds > 0.0 {
        summary.tokens as f64 / step_seconds
    } else {
        0.0
    };
    Ok(summary)
}

/// Number of fixed evaluation micro-batches behind [`Summary::final_eval_loss`].
pub const EVAL_BATCHES: u32 = 16;

/// Data-parallel rank used to key the evaluation batches: no training rank uses it.
const EVAL_RANK: u32 = u32::MAX;

/// (mean total loss, mean main loss) of the current parameters over the evaluation micro-batches, forward
/// only, each on a fresh whole-model stage so nothing is kept for a backward.
fn evaluate(
    opts: &TrainOptions,
    st: &State,
    data: &DataSource,
    rt: &Runtime,
) -> Result<(f64, f64)> {
    let _span = tracing::info_span!("evaluate").entered();
    let (mut total, mut main) = (0.0, 0.0);
    for micro in 0..EVAL_BATCHES {
        let key = BatchKey {
            seed: opts.data_seed,
            step: 0,
            dp_rank: EVAL_RANK,
            micro,
        };
        let batch = data.sample(key, opts.micro_batch_size, opts.seq_len)?;
        let mb = MicroBatch {
            id: 0,
            tokens: &batch.tokens,
            b: batch.batch,
            t: batch.row_len,
            loss_scale: 1.0,
        };
        let mut stage = Stage::new(
            &st.config,
            crate::params::StageSpec::whole(&st.config),
            &st.params,
            opts.loss,
        )?;
        let out = stage.forward(rt, &st.params, &st.bias, &mb, None)?;
        total += out.loss.total;
        main += out.loss.main;
    }
    let n = f64::from(EVAL_BATCHES);
    Ok((total / n, main / n))
}

fn save_checkpoint(
    dir: &std::path::Path,
    opts: &TrainOptions,
    st: &State,
    last_lr: f32,
) -> Result<String> {
    let path = dir.join(checkpoint::step_dir_name(st.step));
    checkpoint::save(
        &path,
        &st.config,
        &st.params,
        &st.bias,
        Some(&st.opt),
        &training_state(opts, st, last_lr),
    )?;
    Ok(path.display().to_string())
}

/// Elapsed time formatting used by progress displays: `1h02m03s`, `4m05s` or `6.7s`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m{:02}s", s / 3600, (s / 60) % 60, s % 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::SyntheticSpec;
    use crate::optim::MomentDtype;

    fn options(steps: u64, dir: Option<PathBuf>, interval: u64) -> TrainOptions {
        let model = ModelConfig::preset("micro").unwrap();
        TrainOptions {
            mtp_depth: model.num_nextn_predict_layers,
            model,
            init: InitFrom::Seed(3),
            steps,
            seq_len: 16,
            micro_batch_size: 2,
            micro_batches: 2,
            precision: Precision::Fp32,
            threads: 1,
            adamw: AdamWConfig {
                moment_dtype: MomentDtype::Bf16,
                ..AdamWConfig::default()
            },
            lr: LrSchedule {
                peak: 1e-2,
                floor: 1e-3,
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
            bias_variant: BiasUpdateVariant::Sign,
            data: DataSpec::Synthetic(SyntheticSpec::default()),
            data_seed: 9,
            checkpoint_dir: dir,
            checkpoint_interval: interval,
            job: serde_json::Value::Null,
        }
    }

    fn cont(_: Progress<'_>) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }

    #[test]
    fn resume_from_a_checkpoint_equals_the_uninterrupted_run_bitwise() {
        let root = tempfile::tempdir().unwrap();
        let (a, b) = (root.path().join("a"), root.path().join("b"));
        // Uninterrupted: 4 steps, checkpoints after steps 2 and 4.
        let full = train_single(&options(4, Some(a.clone()), 2), &mut cont).unwrap();
        assert_eq!(full.checkpoints.len(), 2);
        // Interrupted: stop after step 2 (the progress callback asks), then resume into another directory.
        let mut stop_at_2 = |p: Progress<'_>| {
            if p.record.step == 1 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let first = train_single(&options(4, Some(b.clone()), 0), &mut stop_at_2).unwrap();
        assert!(first.stopped_early);
        assert_eq!(first.end_step, 2);
        assert_eq!(
            first.final_eval_loss, None,
            "a stopped run is not evaluated"
        );
        let resume_dir = PathBuf::from(first.final_checkpoint.clone().unwrap());
        let mut resumed_opts = options(4, Some(b.clone()), 0);
        resumed_opts.init = InitFrom::Resume(resume_dir);
        let second = train_single(&resumed_opts, &mut cont).unwrap();
        assert_eq!((second.start_step, second.end_step), (2, 4));
        for (x, y) in full.steps[2..].iter().zip(&second.steps) {
            assert_eq!(
                x.loss.total.to_bits(),
                y.loss.total.to_bits(),
                "step {}",
                x.step
            );
        }
        let ca = checkpoint::load(&a.join(checkpoint::step_dir_name(4))).unwrap();
        let cb = checkpoint::load(&b.join(checkpoint::step_dir_name(4))).unwrap();
        assert!(
            ca.params
                .flat()
                .iter()
                .zip(cb.params.flat())
                .all(|(x, y)| x.to_bits() == y.to_bits())
        );
        assert_eq!(ca.bias, cb.bias);
        assert_eq!(ca.moments, cb.moments);
        assert_eq!(ca.state.tokens_seen, cb.state.tokens_seen);
        // The evaluation of the final parameters is the same for both.
        let eval = full.final_eval_loss.unwrap();
        assert!(eval.is_finite());
        assert_eq!(eval.to_bits(), second.final_eval_loss.unwrap().to_bits());
        // The bias moved: the rule ran on real expert loads.
        assert!(ca.bias.iter().any(|(_, b)| b.iter().any(|&x| x != 0.0)));
    }

    #[test]
    fn loss_falls_on_synthetic_data_and_summary_has_every_field() {
        let mut opts = options(30, None, 0);
        opts.seq_len = 24;
        let summary = train_single(&opts, &mut cont).unwrap();
        let first = summary.steps[0].loss.total;
        let last = summary.final_loss.unwrap();
        assert!(last < first - 0.8, "loss {first} -> {last}");
        let rec = &summary.steps[5];
        assert!(rec.loss.mtp > 0.0 && rec.loss.balance > 0.0 && rec.loss.main > 0.0);
        assert!((rec.loss.total - (rec.loss.main + rec.loss.mtp + rec.loss.balance)).abs() < 1e-9);
        // Two MoE layers: layer 1 and the MTP layer 2, each routing B·(T+1)·K assignments per micro-batch.
        let layers: Vec<usize> = rec.expert_load.iter().map(|l| l.layer).collect();
        assert_eq!(layers, vec![1, 2]);
        let k = opts.model.num_experts_per_tok as f64;
        let expect_mean = (2 * 25 * 2) as f64 * k / opts.model.n_routed_experts as f64;
        assert_eq!(rec.expert_load[0].mean, expect_mean);
        let json = serde_json::to_value(&summary).unwrap();
        // The evaluation uses fixed batches of the same distribution: close to the last training losses.
        let (eval, main) = (
            summary.final_eval_loss.unwrap(),
            summary.final_eval_main_loss.unwrap(),
        );
        assert!(
            main < eval && (eval - last).abs() < 0.3,
            "eval {eval} main {main} last {last}"
        );
        for key in [
            "steps",
            "final_loss",
            "final_eval_loss",
            "tokens_per_s",
            "final_checkpoint",
            "wall_s",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
    }
}
