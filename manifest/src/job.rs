//! The `TrainingJob` manifest, version `moetrain/v1`: serde types with camelCase YAML keys, every
//! struct denying unknown fields, and defaults that let a minimal manifest (name and model preset)
//! run.
//!
//! Invariant: these types only describe; the rules that relate fields live in `validate.rs`, and
//! `parse_job` fills every computed default (micro-batches, MTP depth) so a stored job is complete.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A training job manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrainingJob {
    /// Always `moetrain/v1`.
    pub api_version: ApiVersion,
    /// Always `TrainingJob`.
    pub kind: JobKind,
    /// Name and labels.
    pub metadata: Metadata,
    /// What to train and how.
    pub spec: JobSpec,
}

/// The manifest schema version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiVersion {
    /// The first (and current) version.
    #[serde(rename = "moetrain/v1")]
    V1,
}

/// The manifest kind of a training job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobKind {
    /// A training job.
    TrainingJob,
}

/// Job identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    /// Unique job name: 1–63 characters of lowercase letters, digits and `-`, starting and ending
    /// with a letter or digit.
    pub name: String,
    /// Free-form labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// The body of a training job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobSpec {
    /// The model architecture.
    pub model: ModelSpec,
    /// Pipeline, data and expert degrees and the schedule.
    #[serde(default)]
    pub parallelism: Parallelism,
    /// Steps, batch shape, optimizer, precision and the MoE/MTP loss settings.
    #[serde(default)]
    pub training: Training,
    /// Where tokens come from.
    #[serde(default)]
    pub data: DataSource,
    /// Checkpoint directory and interval.
    #[serde(default)]
    pub checkpointing: Checkpointing,
    /// Liveness and restart settings.
    #[serde(default)]
    pub fault_tolerance: FaultTolerance,
    /// Devices and threads per rank.
    #[serde(default)]
    pub resources: Resources,
}

/// The model: a named preset or an HF `config.json`, plus key overrides.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelSpec {
    /// A preset name: `tiny`, `micro` or `v3-671b`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// Path of an HF `config.json` (or of a directory holding one), relative to the manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_path: Option<String>,
    /// HF `config.json` keys to override, e.g. `num_hidden_layers: 8`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub overrides: BTreeMap<String, serde_json::Value>,
}

/// The pipeline schedule (manifest spelling).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Schedule {
    /// DeepSeek's bidirectional DualPipe.
    #[serde(rename = "dualpipe")]
    DualPipe,
    /// DualPipeV, the cut-in-half V-shape.
    #[serde(rename = "dualpipev")]
    DualPipeV,
    /// One-forward-one-backward.
    #[default]
    #[serde(rename = "1f1b")]
    OneFOneB,
}

impl Schedule {
    /// The `plan` schedule kind.
    pub fn kind(self) -> plan::schedule::ScheduleKind {
        match self {
            Schedule::DualPipe => plan::schedule::ScheduleKind::DualPipe,
            Schedule::DualPipeV => plan::schedule::ScheduleKind::DualPipeV,
            Schedule::OneFOneB => plan::schedule::ScheduleKind::OneFOneB,
        }
    }
}

/// Parallel degrees: world size `pipeline × data`, expert-parallel groups carved out of the data
/// ranks of each pipeline position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Parallelism {
    /// Pipeline degree P (1).
    #[serde(default = "one")]
    pub pipeline: u32,
    /// Data degree D (1).
    #[serde(default = "one")]
    pub data: u32,
    /// Expert degree E, dividing D (1).
    #[serde(default = "one")]
    pub expert: u32,
    /// The schedule (`1f1b`).
    #[serde(default)]
    pub schedule: Schedule,
    /// Micro-batches per step; defaults to the fewest the schedule accepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_batches: Option<u32>,
    /// Overlap one chunk's all-to-all and pipeline transfers with the other chunk's compute
    /// (true); false exists for the overlap benchmark.
    #[serde(default = "yes")]
    pub overlap: bool,
}

impl Default for Parallelism {
    fn default() -> Self {
        Self {
            pipeline: 1,
            data: 1,
            expert: 1,
            schedule: Schedule::default(),
            micro_batches: None,
            overlap: true,
        }
    }
}

impl Parallelism {
    /// The `plan` layout (unchecked; `parse_job` has validated it).
    pub fn config(&self) -> plan::parallel::ParallelConfig {
        plan::parallel::ParallelConfig {
            pipeline: self.pipeline,
            data: self.data,
            expert: self.expert,
        }
    }

    /// World size `pipeline × data`.
    pub fn world_size(&self) -> u64 {
        u64::from(self.pipeline) * u64::from(self.data)
    }

    /// Micro-batches per step: the manifest's value, else the fewest the schedule accepts.
    pub fn micro_batches(&self) -> u32 {
        self.micro_batches.unwrap_or_else(|| {
            plan::parallel::min_micro_batches(self.schedule.kind(), self.pipeline).max(1)
        })
    }
}

/// Numeric precision of the training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// The V3 FP8 recipe (E4M3, 1×128 / 128×128 scaling).
    Fp8,
    /// The FP8 recipe with power-of-two (UE8M0) activation scales: `fp8-ue8m0`.
    #[serde(rename = "fp8-ue8m0")]
    Fp8Ue8m0,
    /// bf16 storage, f32 accumulation.
    #[default]
    Bf16,
    /// Plain f32, the numerical reference.
    Fp32,
}

/// Training loop settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Training {
    /// Optimizer steps (100).
    #[serde(default = "default_steps")]
    pub steps: u64,
    /// Tokens per sequence (64, which every preset accepts).
    #[serde(default = "default_seq_len")]
    pub seq_len: u32,
    /// Sequences per micro-batch (1).
    #[serde(default = "one")]
    pub micro_batch_size: u32,
    /// AdamW and the learning-rate schedule.
    #[serde(default)]
    pub optimizer: Optimizer,
    /// `fp8`, `bf16` (default) or `fp32`.
    #[serde(default)]
    pub precision: Precision,
    /// Multi-token prediction.
    #[serde(default)]
    pub mtp: Mtp,
    /// The auxiliary-loss-free routing-bias update (the coordinator applies it).
    #[serde(default)]
    pub bias_update: BiasUpdate,
    /// α of the sequence-wise balance loss (0.0001).
    #[serde(default = "default_balance")]
    pub balance_loss_weight: f64,
    /// Seed of initialisation and data sampling (0).
    #[serde(default)]
    pub seed: u64,
}

impl Default for Training {
    fn default() -> Self {
        Self {
            steps: default_steps(),
            seq_len: default_seq_len(),
            micro_batch_size: 1,
            optimizer: Optimizer::default(),
            precision: Precision::default(),
            mtp: Mtp::default(),
            bias_update: BiasUpdate::default(),
            balance_loss_weight: default_balance(),
            seed: 0,
        }
    }
}

/// Storage type of AdamW's moments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MomentDtype {
    /// bf16 moments (V3's choice).
    #[default]
    Bf16,
    /// f32 moments.
    F32,
}

/// AdamW with linear warmup then cosine decay to `minLr`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Optimizer {
    /// Peak learning rate (3e-4).
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Final learning rate of the cosine decay (3e-5).
    #[serde(default = "default_min_lr")]
    pub min_lr: f64,
    /// Linear warmup steps from 0 (0).
    #[serde(default)]
    pub warmup_steps: u64,
    /// Decoupled weight decay (0.1).
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// β1 (0.9).
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// β2 (0.95).
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// AdamW ε (1e-8).
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables (1.0).
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f64,
    /// Moment storage (`bf16`).
    #[serde(default)]
    pub moment_dtype: MomentDtype,
}

impl Default for Optimizer {
    fn default() -> Self {
        Self {
            lr: default_lr(),
            min_lr: default_min_lr(),
            warmup_steps: 0,
            weight_decay: default_weight_decay(),
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
            grad_clip: default_grad_clip(),
            moment_dtype: MomentDtype::default(),
        }
    }
}

/// Multi-token prediction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mtp {
    /// Predicted extra tokens; defaults to the model's `num_nextn_predict_layers`; 0 disables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<u32>,
    /// λ, the MTP loss weight (0.3).
    #[serde(default = "default_mtp_weight")]
    pub weight: f64,
}

impl Default for Mtp {
    fn default() -> Self {
        Self {
            depth: None,
            weight: default_mtp_weight(),
        }
    }
}

/// The routing-bias update b ← b + γ·sign(mean − load) (v3-spec §2.2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BiasUpdate {
    /// γ (0.001); 0 freezes the bias.
    #[serde(default = "default_bias_rate")]
    pub rate: f64,
    /// Training tokens after which γ drops to 0; absent means never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_after_tokens: Option<u64>,
    /// Subtract the mean of each update (torchtitan's variant; false).
    #[serde(default)]
    pub subtract_mean: bool,
}

impl Default for BiasUpdate {
    fn default() -> Self {
        Self {
            rate: default_bias_rate(),
            stop_after_tokens: None,
            subtract_mean: false,
        }
    }
}

/// Where training tokens come from; exactly one kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum DataSource {
    /// A built-in generator, for demos and tests.
    Synthetic(SyntheticData),
    /// A plain-text file: byte-level tokens, or an HF `tokenizer.json`.
    Text(TextData),
    /// A pre-tokenized file of little-endian token ids, memory-mapped.
    Tokens(TokenData),
}

impl Default for DataSource {
    fn default() -> Self {
        DataSource::Synthetic(SyntheticData::default())
    }
}

/// Settings of the synthetic source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SyntheticData {
    /// The generator's name, interpreted by the data loader (`pattern`).
    #[serde(default = "default_synthetic_kind")]
    pub kind: String,
}

impl Default for SyntheticData {
    fn default() -> Self {
        Self {
            kind: default_synthetic_kind(),
        }
    }
}

/// A plain-text source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TextData {
    /// The text file.
    pub path: String,
    /// An HF `tokenizer.json`; absent means byte-level tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
}

/// Width of pre-tokenized ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    /// 16-bit ids.
    Uint16,
    /// 32-bit ids.
    Uint32,
}

/// A pre-tokenized source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenData {
    /// The token file.
    pub path: String,
    /// `uint16` or `uint32`.
    pub dtype: TokenDtype,
}

/// Checkpoints.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Checkpointing {
    /// Directory for checkpoints; absent means none are written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// Steps between checkpoints; 0 writes only the final one (0).
    #[serde(default)]
    pub interval: u64,
}

/// Liveness and restart settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultTolerance {
    /// Worker heartbeat period (`1s`).
    #[serde(default = "default_heartbeat", with = "human_duration")]
    pub heartbeat_interval: Duration,
    /// Silence after which a worker is lost (`5s`, at most 5 s by default).
    #[serde(default = "default_failure_timeout", with = "human_duration")]
    pub failure_timeout: Duration,
    /// Restarts allowed before the job fails (3).
    #[serde(default = "default_restart_budget")]
    pub restart_budget: u32,
    /// Idle workers kept ready to replace lost ones (0).
    #[serde(default)]
    pub spare_workers: u32,
    /// How long a rank waits for a peer's tensor, or for the coordinator's routing bias, before it
    /// fails the step with a reason (`30s`).
    #[serde(default = "default_receive_timeout", with = "human_duration")]
    pub receive_timeout: Duration,
}

impl Default for FaultTolerance {
    fn default() -> Self {
        Self {
            heartbeat_interval: default_heartbeat(),
            failure_timeout: default_failure_timeout(),
            restart_budget: default_restart_budget(),
            spare_workers: 0,
            receive_timeout: default_receive_timeout(),
        }
    }
}

/// Device kind of each rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// CPU compute.
    #[default]
    Cpu,
    /// An NVIDIA GPU.
    Cuda,
    /// A test mode: ops take modelled time on placeholder tensors (issue 6).
    Simulated,
}

/// Resources of each rank.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// `cpu` (default), `cuda` or `simulated`.
    #[serde(default)]
    pub device: DeviceKind,
    /// Devices per rank; only 1 is supported (no tensor parallelism).
    #[serde(default = "one")]
    pub devices_per_rank: u32,
    /// Compute threads per rank; absent means the machine's cores divided among its ranks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads_per_rank: Option<u32>,
    /// Op times for `device: simulated`; absent means the worker measures them on the real model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulated_costs: Option<SimulatedCosts>,
}

/// Time each pipeline op takes on a simulated device (the schedule simulator's cost kinds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SimulatedCosts {
    /// A forward chunk (F).
    #[serde(with = "human_duration")]
    pub forward: Duration,
    /// A full backward chunk (B).
    #[serde(with = "human_duration")]
    pub backward: Duration,
    /// A backward for inputs only (the B half of a split backward).
    #[serde(with = "human_duration")]
    pub backward_input: Duration,
    /// A deferred weight-gradient chunk (W).
    #[serde(with = "human_duration")]
    pub weight: Duration,
    /// An overlapped forward+backward pair (F&B).
    #[serde(with = "human_duration")]
    pub overlapped: Duration,
    /// One pipeline hop of an activation or gradient.
    #[serde(default, with = "human_duration")]
    pub comm: Duration,
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            device: DeviceKind::default(),
            devices_per_rank: 1,
            threads_per_rank: None,
            simulated_costs: None,
        }
    }
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}
fn default_receive_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_steps() -> u64 {
    100
}
fn default_seq_len() -> u32 {
    64
}
fn default_balance() -> f64 {
    0.0001
}
fn default_lr() -> f64 {
    3e-4
}
fn default_min_lr() -> f64 {
    3e-5
}
fn default_weight_decay() -> f64 {
    0.1
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.95
}
fn default_eps() -> f64 {
    1e-8
}
fn default_grad_clip() -> f64 {
    1.0
}
fn default_mtp_weight() -> f64 {
    0.3
}
fn default_bias_rate() -> f64 {
    0.001
}
fn default_synthetic_kind() -> String {
    "pattern".to_string()
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(1)
}
fn default_failure_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_restart_budget() -> u32 {
    3
}

/// Durations as humantime strings (`1s`, `500ms`, `2m 30s`).
mod human_duration {
    use std::time::Duration;

    use serde::{Deserializer, Serializer, de};

    pub(super) fn serialize<S: Serializer>(
        value: &Duration,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*value).to_string())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Duration, D::Error> {
        // Parse inside the visitor, so a bad duration is reported at its own field.
        deserializer.deserialize_str(DurationVisitor)
    }

    struct DurationVisitor;

    impl de::Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a duration such as \"1s\" or \"500ms\"")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
            humantime::parse_duration(text).map_err(|err| {
                E::custom(format!(
                    "invalid duration {text:?}: {err} (write e.g. \"1s\" or \"500ms\")"
                ))
            })
        }
    }
}
