//! The rules that reject impossible jobs, each reported against one field path: first the rules
//! that need only the manifest, then those that need the model config, then (optionally) the
//! cluster's capacity.
//!
//! Invariant: a rule returns the first problem it finds as an `Issue { path, message }`; the caller
//! turns the path into a line and column with the located tree, so rules never deal with positions.

use std::path::{Path, PathBuf};

use arch::ModelConfig;
use plan::placement::{ExpertLayout, PlacementRequest};
use plan::schedule::ScheduleKind;
use plan::topology::Cluster;

use crate::job::{DataSource, DeviceKind, Precision, TrainingJob};

/// One problem: the field's dotted path and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Issue {
    pub(crate) path: String,
    pub(crate) message: String,
}

fn issue(path: impl Into<String>, message: impl Into<String>) -> Result<(), Issue> {
    Err(Issue {
        path: path.into(),
        message: message.into(),
    })
}

fn at_least_one(path: &str, value: u64) -> Result<(), Issue> {
    if value == 0 {
        return issue(path, "must be at least 1, got 0");
    }
    Ok(())
}

fn non_negative(path: &str, value: f64) -> Result<(), Issue> {
    if !value.is_finite() || value < 0.0 {
        return issue(path, format!("must be a finite number ≥ 0, got {value}"));
    }
    Ok(())
}

fn positive(path: &str, value: f64) -> Result<(), Issue> {
    if !value.is_finite() || value <= 0.0 {
        return issue(path, format!("must be a finite number > 0, got {value}"));
    }
    Ok(())
}

fn unit_interval(path: &str, value: f64) -> Result<(), Issue> {
    if !(0.0..1.0).contains(&value) {
        return issue(path, format!("must be in [0, 1), got {value}"));
    }
    Ok(())
}

fn non_empty(path: &str, value: &str) -> Result<(), Issue> {
    if value.trim().is_empty() {
        return issue(path, "must not be empty");
    }
    Ok(())
}

/// Rules that need only the manifest.
pub(crate) fn structural(job: &TrainingJob) -> Result<(), Issue> {
    check_name(&job.metadata.name)?;

    let par = &job.spec.parallelism;
    at_least_one("spec.parallelism.pipeline", par.pipeline.into())?;
    at_least_one("spec.parallelism.data", par.data.into())?;
    at_least_one("spec.parallelism.expert", par.expert.into())?;
    if !par.data.is_multiple_of(par.expert) {
        return issue(
            "spec.parallelism.expert",
            format!(
                "expert degree {} must divide data degree {}",
                par.expert, par.data
            ),
        );
    }
    if par.world_size() > u64::from(u32::MAX) {
        return issue(
            "spec.parallelism",
            format!("world size {} is too large", par.world_size()),
        );
    }
    let kind = par.schedule.kind();
    if kind == ScheduleKind::DualPipe && !par.pipeline.is_multiple_of(2) {
        return issue(
            "spec.parallelism.pipeline",
            format!(
                "DualPipe needs an even pipeline degree, got {}",
                par.pipeline
            ),
        );
    }
    if let Some(micro) = par.micro_batches {
        let least = plan::parallel::min_micro_batches(kind, par.pipeline).max(1);
        let rule = match kind {
            ScheduleKind::DualPipe | ScheduleKind::DualPipeV => "2 × pipeline",
            ScheduleKind::OneFOneB => "pipeline",
        };
        if micro < least {
            return issue(
                "spec.parallelism.microBatches",
                format!("{kind} needs at least {rule} = {least} micro-batches, got {micro}"),
            );
        }
        if kind == ScheduleKind::DualPipe && !micro.is_multiple_of(2) {
            return issue(
                "spec.parallelism.microBatches",
                format!("DualPipe needs an even number of micro-batches, got {micro}"),
            );
        }
    }

    let training = &job.spec.training;
    at_least_one("spec.training.steps", training.steps)?;
    at_least_one("spec.training.seqLen", training.seq_len.into())?;
    at_least_one(
        "spec.training.microBatchSize",
        training.micro_batch_size.into(),
    )?;
    let opt = &training.optimizer;
    positive("spec.training.optimizer.lr", opt.lr)?;
    non_negative("spec.training.optimizer.minLr", opt.min_lr)?;
    if opt.min_lr > opt.lr {
        return issue(
            "spec.training.optimizer.minLr",
            format!("must not exceed lr ({}), got {}", opt.lr, opt.min_lr),
        );
    }
    if opt.warmup_steps > training.steps {
        return issue(
            "spec.training.optimizer.warmupSteps",
            format!(
                "must not exceed training.steps ({}), got {}",
                training.steps, opt.warmup_steps
            ),
        );
    }
    non_negative("spec.training.optimizer.weightDecay", opt.weight_decay)?;
    unit_interval("spec.training.optimizer.beta1", opt.beta1)?;
    unit_interval("spec.training.optimizer.beta2", opt.beta2)?;
    positive("spec.training.optimizer.eps", opt.eps)?;
    non_negative("spec.training.optimizer.gradClip", opt.grad_clip)?;
    non_negative("spec.training.mtp.weight", training.mtp.weight)?;
    non_negative("spec.training.biasUpdate.rate", training.bias_update.rate)?;
    non_negative(
        "spec.training.balanceLossWeight",
        training.balance_loss_weight,
    )?;

    match &job.spec.data {
        DataSource::Synthetic(s) => non_empty("spec.data.synthetic.kind", &s.kind)?,
        DataSource::Text(t) => {
            non_empty("spec.data.text.path", &t.path)?;
            if let Some(tokenizer) = &t.tokenizer {
                non_empty("spec.data.text.tokenizer", tokenizer)?;
            }
        }
        DataSource::Tokens(t) => non_empty("spec.data.tokens.path", &t.path)?,
    }

    let ckpt = &job.spec.checkpointing;
    match &ckpt.dir {
        Some(dir) => non_empty("spec.checkpointing.dir", dir)?,
        None if ckpt.interval > 0 => {
            return issue(
                "spec.checkpointing.dir",
                format!(
                    "is required when checkpointing.interval is set (interval {})",
                    ckpt.interval
                ),
            );
        }
        None => {}
    }

    let ft = &job.spec.fault_tolerance;
    if ft.heartbeat_interval.is_zero() {
        return issue(
            "spec.faultTolerance.heartbeatInterval",
            "must be longer than 0s",
        );
    }
    if ft.failure_timeout <= ft.heartbeat_interval {
        return issue(
            "spec.faultTolerance.failureTimeout",
            format!(
                "must be longer than heartbeatInterval ({}), got {}",
                humantime::format_duration(ft.heartbeat_interval),
                humantime::format_duration(ft.failure_timeout)
            ),
        );
    }

    if ft.receive_timeout.is_zero() {
        return issue(
            "spec.faultTolerance.receiveTimeout",
            "must be longer than 0s",
        );
    }

    let res = &job.spec.resources;
    if res.simulated_costs.is_some() && res.device != DeviceKind::Simulated {
        return issue(
            "spec.resources.simulatedCosts",
            format!(
                "is only used with device: simulated, but device is {}",
                match res.device {
                    DeviceKind::Cpu => "cpu",
                    DeviceKind::Cuda => "cuda",
                    DeviceKind::Simulated => "simulated",
                }
            ),
        );
    }
    if res.devices_per_rank != 1 {
        return issue(
            "spec.resources.devicesPerRank",
            format!(
                "only 1 device per rank is supported (no tensor parallelism), got {}",
                res.devices_per_rank
            ),
        );
    }
    if let Some(threads) = res.threads_per_rank {
        at_least_one("spec.resources.threadsPerRank", threads.into())?;
    }

    let model = &job.spec.model;
    if model.preset.is_some() == model.config_path.is_some() {
        return issue("spec.model", "set exactly one of `preset` or `configPath`");
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), Issue> {
    let path = "metadata.name";
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if name.is_empty()
        || name.len() > 63
        || !name.chars().all(ok_char)
        || !edge(name.chars().next())
        || !edge(name.chars().last())
    {
        return issue(
            path,
            format!(
                "{name:?} is not a valid name: use 1–63 lowercase letters, digits or '-', starting and ending with a letter or digit"
            ),
        );
    }
    Ok(())
}

/// Loads the model config the manifest names (preset or file, relative to `base_dir`) and applies
/// its overrides; the issue names `spec.model.*`. Returns the config and, for a file, its path.
pub(crate) fn resolve_model(
    job: &TrainingJob,
    base_dir: &Path,
) -> Result<(ModelConfig, Option<PathBuf>), Issue> {
    let spec = &job.spec.model;
    let (mut config, source_path, file) = match (&spec.preset, &spec.config_path) {
        (Some(name), _) => match ModelConfig::preset(name) {
            Ok(config) => (config, "spec.model.preset", None),
            Err(err) => {
                return Err(Issue {
                    path: "spec.model.preset".into(),
                    message: err.to_string(),
                });
            }
        },
        (None, Some(path)) => {
            let mut file = base_dir.join(path);
            if file.is_dir() {
                file.push("config.json");
            }
            let text = std::fs::read_to_string(&file).map_err(|err| Issue {
                path: "spec.model.configPath".into(),
                message: format!("cannot read {}: {err}", file.display()),
            })?;
            let config: ModelConfig = serde_json::from_str(&text).map_err(|err| Issue {
                path: "spec.model.configPath".into(),
                message: format!("{}: {err}", file.display()),
            })?;
            (config, "spec.model.configPath", Some(file))
        }
        (None, None) => {
            return Err(Issue {
                path: "spec.model".into(),
                message: "set exactly one of `preset` or `configPath`".into(),
            });
        }
    };

    for (key, value) in &spec.overrides {
        let path = format!("spec.model.overrides.{key}");
        let mut object = match serde_json::to_value(&config) {
            Ok(serde_json::Value::Object(object)) => object,
            _ => {
                return Err(Issue {
                    path,
                    message: "the model config cannot be represented as JSON".into(),
                });
            }
        };
        if !object.contains_key(key) {
            return Err(Issue {
                path,
                message: "is not a deepseek_v3 config.json key".into(),
            });
        }
        object.insert(key.clone(), value.clone());
        config =
            serde_json::from_value(serde_json::Value::Object(object)).map_err(|err| Issue {
                path: path.clone(),
                message: err.to_string(),
            })?;
    }

    if let Err(err) = config.validate() {
        let (path, message) = match &err {
            arch::ArchError::Invalid { key, reason } if spec.overrides.contains_key(*key) => {
                (format!("spec.model.overrides.{key}"), reason.clone())
            }
            _ => (source_path.to_string(), err.to_string()),
        };
        return Err(Issue { path, message });
    }
    Ok((config, file))
}

/// Rules that relate the job to its model.
pub(crate) fn with_model(job: &TrainingJob, model: &ModelConfig) -> Result<(), Issue> {
    let par = &job.spec.parallelism;
    let kind = par.schedule.kind();
    let has_moe = model.n_moe_layers() > 0 || model.num_nextn_predict_layers > 0;
    if has_moe && !model.n_routed_experts.is_multiple_of(par.expert as usize) {
        return issue(
            "spec.parallelism.expert",
            format!(
                "{} routed experts do not divide over expert degree {}",
                model.n_routed_experts, par.expert
            ),
        );
    }
    let stages = kind.stage_count(par.pipeline) as usize;
    if model.num_hidden_layers < stages {
        return issue(
            "spec.parallelism.pipeline",
            format!(
                "{kind} with pipeline {} cuts the model into {stages} stages, but it has only {} layers",
                par.pipeline, model.num_hidden_layers
            ),
        );
    }
    let training = &job.spec.training;
    if training.seq_len as usize > model.max_position_embeddings {
        return issue(
            "spec.training.seqLen",
            format!(
                "{} exceeds the model's max_position_embeddings ({})",
                training.seq_len, model.max_position_embeddings
            ),
        );
    }
    if let Some(depth) = training.mtp.depth
        && depth as usize > model.num_nextn_predict_layers
    {
        return issue(
            "spec.training.mtp.depth",
            format!(
                "{depth} exceeds the model's num_nextn_predict_layers ({})",
                model.num_nextn_predict_layers
            ),
        );
    }
    if matches!(training.precision, Precision::Fp8 | Precision::Fp8Ue8m0) {
        let mut dims = vec![
            ("hidden_size", model.hidden_size),
            ("kv_lora_rank", model.kv_lora_rank),
            (
                "num_attention_heads × v_head_dim",
                model.num_attention_heads * model.v_head_dim,
            ),
        ];
        if let Some(q) = model.q_lora_rank {
            dims.push(("q_lora_rank", q));
        }
        if model.first_k_dense_replace > 0 {
            dims.push(("intermediate_size", model.intermediate_size));
        }
        if has_moe {
            dims.push(("moe_intermediate_size", model.moe_intermediate_size));
        }
        if let Some((name, value)) = dims.into_iter().find(|(_, v)| !v.is_multiple_of(128)) {
            return issue(
                "spec.training.precision",
                format!(
                    "fp8 needs every GEMM inner dimension to be a multiple of 128, but {name} is {value}"
                ),
            );
        }
    }
    Ok(())
}

/// The placement request of a validated job.
pub(crate) fn placement_request(job: &TrainingJob, model: &ModelConfig) -> PlacementRequest {
    PlacementRequest {
        parallel: job.spec.parallelism.config(),
        schedule: job.spec.parallelism.schedule.kind(),
        experts: ExpertLayout {
            n_routed_experts: (model.n_routed_experts.max(1)) as u32,
            n_group: (model.n_group.max(1)) as u32,
        },
    }
}

/// Whether the cluster can ever hold the job.
pub(crate) fn fits(job: &TrainingJob, model: &ModelConfig, cluster: &Cluster) -> Result<(), Issue> {
    let req = placement_request(job, model);
    plan::placement::check_fits(&req, cluster).map_err(|err| Issue {
        path: "spec.parallelism".into(),
        message: match err {
            plan::placement::PlacementError::InsufficientCapacity {
                needed,
                available,
                detail,
            } => format!(
                "world size {needed} (pipeline {} × data {}) exceeds what the cluster can ever hold: {available} ranks ({detail})",
                job.spec.parallelism.pipeline, job.spec.parallelism.data
            ),
            other => other.to_string(),
        },
    })
}
