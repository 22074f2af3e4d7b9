//! Training checkpoints: a directory of safetensors and JSON files under the DeepSeek-V3 names, made complete
//! by a checksummed manifest, plus export to the official FP8 checkpoint layout.
//!
//! Layout of `step-NNNNNNNN/`:
//! - `model.safetensors`: every parameter as F32 under its checkpoint name (MTP as layer `num_hidden_layers`),
//!   and every routing bias as F32 `model.layers.L.mlp.gate.e_score_correction_bias`;
//! - `config.json`: the HF `deepseek_v3` model config;
//! - `optimizer.safetensors`: the AdamW moments under `<param name>.exp_avg` / `.exp_avg_sq` (BF16 or F32, as
//!   stored);
//! - `training_state.json`: step, tokens seen, data position and seeds, schedules and optimizer settings;
//! - `manifest.json`: SHA-256 and size of every other file, written last.
//!
//! Invariants: a checkpoint is written into a hidden temporary sibling directory and renamed into place only
//! after its manifest is on disk, so a directory named `step-*` is always complete; loading verifies every
//! checksum first and reports the file that does not match. Saving and loading are exact (no value is
//! converted on the way), so save → load → continue equals the uninterrupted run bit for bit.

use crate::lr::{BiasSpeedSchedule, LrSchedule};
use crate::optim::{AdamW, AdamWConfig, MomentBuf};
use crate::params::{ParamStore, RoutingBias};
use crate::{ModelConfig, ModelError, Result};
use half::bf16;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Format tag stored in `manifest.json` and `training_state.json`.
pub const FORMAT: &str = "moetrain-checkpoint-v1";
/// File names inside a checkpoint directory.
pub const MODEL_FILE: &str = "model.safetensors";
/// The model config.
pub const CONFIG_FILE: &str = "config.json";
/// The optimizer moments.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The training state.
pub const STATE_FILE: &str = "training_state.json";
/// The manifest (written last).
pub const MANIFEST_FILE: &str = "manifest.json";
/// Suffix of first-moment tensors in `optimizer.safetensors`.
pub const EXP_AVG_SUFFIX: &str = ".exp_avg";
/// Suffix of second-moment tensors in `optimizer.safetensors`.
pub const EXP_AVG_SQ_SUFFIX: &str = ".exp_avg_sq";

/// Everything besides tensors that a run needs to continue exactly where it stopped.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainingState {
    /// Format tag ([`FORMAT`]).
    pub format: String,
    /// Optimizer steps completed; the next step to run has this index.
    pub step: u64,
    /// Tokens trained on so far (drives the bias-speed schedule).
    pub tokens_seen: u64,
    /// Seed of the data sampler.
    pub data_seed: u64,
    /// Data position: the step index the next batch is sampled for (batches are a pure function of it).
    pub data_step: u64,
    /// Seed the parameters were initialized from.
    pub init_seed: u64,
    /// Learning-rate schedule.
    pub lr: LrSchedule,
    /// Learning rate of the last completed step.
    pub last_lr: f32,
    /// Optimizer hyper-parameters.
    pub adamw: AdamWConfig,
    /// Routing-bias update speed schedule.
    pub bias_speed: BiasSpeedSchedule,
    /// Free-form extra fields (the trainer's job description, for provenance).
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// A loaded checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    /// The model config.
    pub config: ModelConfig,
    /// Parameters.
    pub params: ParamStore<f32>,
    /// Routing biases.
    pub bias: RoutingBias,
    /// Optimizer state over the whole flat parameter array (steps from `state.step`); `None` when the
    /// checkpoint has no optimizer file.
    pub moments: Option<(MomentBuf, MomentBuf)>,
    /// Training state.
    pub state: TrainingState,
}

/// One entry of `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileDigest {
    /// Lower-case hex SHA-256 of the file.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// `manifest.json`: the list of files that make the checkpoint, with digests.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// Format tag ([`FORMAT`]).
    pub format: String,
    /// File name → digest.
    pub files: BTreeMap<String, FileDigest>,
}

/// The directory name of the checkpoint after `step` completed steps.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn invalid(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Io {
        path: path.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, reason.into()),
    }
}

/// A tensor to serialize, with its bytes already in the on-disk dtype.
struct RawTensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &RawTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bf16_bytes(v: &[bf16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn write_safetensors(
    path: &Path,
    tensors: &[RawTensor],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    let data: Vec<(&str, &RawTensor)> = tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let bytes = safetensors::serialize(data, metadata).map_err(|e| ModelError::Safetensors {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    write_file(path, &bytes)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// The tensors of `model.safetensors`: parameters then routing biases, all F32.
fn model_tensors(params: &ParamStore<f32>, bias: &RoutingBias) -> Vec<RawTensor> {
    let mut out: Vec<RawTensor> = params
        .iter()
        .map(|(name, shape, v)| RawTensor {
            name: name.to_string(),
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            bytes: f32_bytes(v),
        })
        .collect();
    out.extend(bias.iter().map(|(layer, v)| RawTensor {
        name: RoutingBias::name(layer),
        dtype: Dtype::F32,
        shape: vec![v.len()],
        bytes: f32_bytes(v),
    }));
    out
}

/// The tensors of `optimizer.safetensors`, split per parameter.
fn optimizer_tensors(params: &ParamStore<f32>, opt: &AdamW) -> Result<Vec<RawTensor>> {
    if opt.range() != (0..params.numel()) {
        return Err(ModelError::Unsupported(format!(
            "saving an optimizer shard {:?} into a whole-model checkpoint of {} elements",
            opt.range(),
            params.numel()
        )));
    }
    let mut out = Vec::with_capacity(2 * params.len());
    for e in params.entries() {
        let r = e.offset..e.offset + e.len;
        for (suffix, buf) in [
            (EXP_AVG_SUFFIX, &opt.exp_avg),
            (EXP_AVG_SQ_SUFFIX, &opt.exp_avg_sq),
        ] {
            let (dtype, bytes) = match buf {
                MomentBuf::Bf16(v) => (Dtype::BF16, bf16_bytes(&v[r.clone()])),
                MomentBuf::F32(v) => (Dtype::F32, f32_bytes(&v[r.clone()])),
            };
            out.push(RawTensor {
                name: format!("{}{suffix}", e.name),
                dtype,
                shape: e.shape.clone(),
                bytes,
            });
        }
    }
    Ok(out)
}

/// Writes files into a hidden temporary sibling of `dir`, adds `manifest.json` with their digests, and renames
/// the directory into place. `write` receives the temporary directory. Fails if `dir` already exists.
pub fn write_atomically(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if dir.exists() {
        return Err(invalid(
            dir,
            "already exists; refusing to overwrite a checkpoint",
        ));
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let leaf = dir
        .file_name()
        .ok_or_else(|| invalid(dir, "has no final path component"))?;
    let tmp = parent.join(format!(
        ".tmp-{}-{}",
        leaf.to_string_lossy(),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    let res = (|| {
        write(&tmp)?;
        let mut files = BTreeMap::new();
        let rd = std::fs::read_dir(&tmp).map_err(io_err(&tmp))?;
        for ent in rd {
            let ent = ent.map_err(io_err(&tmp))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if name == MANIFEST_FILE {
                continue;
            }
            files.insert(name, digest_file(&ent.path())?);
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            files,
        };
        let text =
            serde_json::to_string_pretty(&manifest).map_err(|e| invalid(&tmp, e.to_string()))?;
        write_file(&tmp.join(MANIFEST_FILE), text.as_bytes())?;
        std::fs::rename(&tmp, dir).map_err(io_err(dir))?;
        // Make the rename durable.
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res
}

/// Saves a whole-model checkpoint to `dir` (which must not exist yet).
pub fn save(
    dir: &Path,
    config: &ModelConfig,
    params: &ParamStore<f32>,
    bias: &RoutingBias,
    optimizer: Option<&AdamW>,
    state: &TrainingState,
) -> Result<()> {
    let _span =
        tracing::info_span!("checkpoint_save", dir = %dir.display(), step = state.step).entered();
    write_atomically(dir, |tmp| {
        write_safetensors(&tmp.join(MODEL_FILE), &model_tensors(params, bias), None)?;
        write_file(&tmp.join(CONFIG_FILE), config.to_json_string().as_bytes())?;
        if let Some(opt) = optimizer {
            let meta = std::collections::HashMap::from([(
                "adam_steps".to_string(),
                opt.steps.to_string(),
            )]);
            write_safetensors(
                &tmp.join(OPTIMIZER_FILE),
                &optimizer_tensors(params, opt)?,
                Some(meta),
            )?;
        }
        let text = serde_json::to_string_pretty(state).map_err(|e| invalid(tmp, e.to_string()))?;
        write_file(&tmp.join(STATE_FILE), text.as_bytes())
    })
}

/// Saves one pipeline rank's part of a distributed checkpoint to `dir` (which must not exist yet):
/// `model.safetensors` with the stage's parameters (checkpoint names) and the routing biases,
/// `config.json`, the training state, and `optimizer.safetensors` holding this rank's ZeRO-1
/// optimizer shards as flat tensors `shard.<begin>-<end>.exp_avg` / `.exp_avg_sq` over the stage's
/// flat parameter buffer (metadata `adam_steps`). Returns the part's `manifest.json` (file digests).
pub fn save_part(
    dir: &Path,
    config: &ModelConfig,
    params: &ParamStore<f32>,
    bias: &RoutingBias,
    shards: &[&AdamW],
    state: &TrainingState,
) -> Result<Manifest> {
    let _span =
        tracing::info_span!("checkpoint_save_part", dir = %dir.display(), step = state.step)
            .entered();
    write_atomically(dir, |tmp| {
        write_safetensors(&tmp.join(MODEL_FILE), &model_tensors(params, bias), None)?;
        write_file(&tmp.join(CONFIG_FILE), config.to_json_string().as_bytes())?;
        let mut tensors = Vec::new();
        let mut steps = 0;
        for opt in shards {
            let r = opt.range();
            if r.end > params.numel() {
                return Err(invalid(
                    dir,
                    format!(
                        "optimizer shard {r:?} outside {} parameters",
                        params.numel()
                    ),
                ));
            }
            steps = steps.max(opt.steps);
            for (suffix, buf) in [
                (EXP_AVG_SUFFIX, &opt.exp_avg),
                (EXP_AVG_SQ_SUFFIX, &opt.exp_avg_sq),
            ] {
                let (dtype, bytes) = match buf {
                    MomentBuf::Bf16(v) => (Dtype::BF16, bf16_bytes(v)),
                    MomentBuf::F32(v) => (Dtype::F32, f32_bytes(v)),
                };
                tensors.push(RawTensor {
                    name: format!("shard.{}-{}{suffix}", r.start, r.end),
                    dtype,
                    shape: vec![r.len()],
                    bytes,
                });
            }
        }
        let meta = std::collections::HashMap::from([("adam_steps".to_string(), steps.to_string())]);
        write_safetensors(&tmp.join(OPTIMIZER_FILE), &tensors, Some(meta))?;
        let text = serde_json::to_string_pretty(state).map_err(|e| invalid(tmp, e.to_string()))?;
        write_file(&tmp.join(STATE_FILE), text.as_bytes())
    })?;
    verify(dir)
}

/// Reads `manifest.json` and checks every listed file's size and SHA-256; the error names the first file that
/// is missing or differs. Files not in the manifest are ignored.
pub fn verify(dir: &Path) -> Result<Manifest> {
    let mpath = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&mpath).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            invalid(&mpath, "missing: the checkpoint is incomplete")
        } else {
            ModelError::Io {
                path: mpath.display().to_string(),
                source: e,
            }
        }
    })?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|e| invalid(&mpath, e.to_string()))?;
    if manifest.format != FORMAT {
        return Err(invalid(
            &mpath,
            format!("format {:?}, expected {FORMAT:?}", manifest.format),
        ));
    }
    for (name, want) in &manifest.files {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(invalid(&path, "listed in manifest.json but missing"));
        }
        let got = digest_file(&path)?;
        if got.bytes != want.bytes {
            return Err(invalid(
                &path,
                format!(
                    "size {} bytes, manifest.json says {}",
                    got.bytes, want.bytes
                ),
            ));
        }
        if got.sha256 != want.sha256 {
            return Err(invalid(
                &path,
                format!(
                    "SHA-256 {} does not match manifest.json's {}",
                    got.sha256, want.sha256
                ),
            ));
        }
    }
    Ok(manifest)
}

/// Reads every tensor of the model file at `mpath` into `params` and `bias` (shapes checked
/// against theirs) and checks that nothing is missing: every parameter and every MoE layer's
/// routing bias must be in the file exactly once. `unknown` says why a tensor that is not one of
/// `params` is refused; `owner` names what has the MoE layers in the message on a bias count
/// mismatch. On error `params` and `bias` may be partly written.
fn read_model_file(
    mpath: &Path,
    params: &mut ParamStore<f32>,
    bias: &mut RoutingBias,
    unknown: &str,
    owner: &str,
) -> Result<()> {
    let mut seen = vec![false; params.len()];
    let mut bias_seen = 0usize;
    for_each_tensor(mpath, |name, dtype, shape, bytes| {
        let values = decode_exact_f32(mpath, name, dtype, bytes)?;
        if let Some(layer) = RoutingBias::layer_of(name) {
            let dst = bias
                .get_mut(layer)
                .ok_or_else(|| param_err(name, "routing bias of a layer that is not MoE"))?;
            check_shape(name, shape, &[dst.len()])?;
            dst.copy_from_slice(&values);
            bias_seen += 1;
            return Ok(());
        }
        let id = params.id(name).ok_or_else(|| param_err(name, unknown))?;
        check_shape(name, shape, &params.entry(id).shape.clone())?;
        params.slice_mut(id).copy_from_slice(&values);
        seen[id.0] = true;
        Ok(())
    })?;
    if let Some(i) = seen.iter().position(|s| !s) {
        return Err(param_err(
            &params.entries()[i].name,
            &format!("missing from {}", mpath.display()),
        ));
    }
    if bias_seen != bias.layer_ids().len() {
        return Err(invalid(
            mpath,
            format!(
                "has {bias_seen} routing biases, {owner} has {} MoE layers",
                bias.layer_ids().len()
            ),
        ));
    }
    Ok(())
}

/// Loads and verifies a checkpoint written by [`save`].
pub fn load(dir: &Path) -> Result<Checkpoint> {
    let _span = tracing::info_span!("checkpoint_load", dir = %dir.display()).entered();
    let manifest = verify(dir)?;
    for required in [MODEL_FILE, CONFIG_FILE, STATE_FILE] {
        if !manifest.files.contains_key(required) {
            return Err(invalid(
                &dir.join(MANIFEST_FILE),
                format!("does not list {required}"),
            ));
        }
    }
    let config = ModelConfig::from_file(dir.join(CONFIG_FILE))?;
    let spath = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&spath).map_err(io_err(&spath))?;
    let state: TrainingState =
        serde_json::from_str(&text).map_err(|e| invalid(&spath, e.to_string()))?;

    let mut params = ParamStore::zeros(&config);
    let mut bias = RoutingBias::zeros(&config);
    let mpath = dir.join(MODEL_FILE);
    read_model_file(
        &mpath,
        &mut params,
        &mut bias,
        "not a parameter of this config",
        "the config",
    )?;

    let moments = if manifest.files.contains_key(OPTIMIZER_FILE) {
        Some(load_moments(&dir.join(OPTIMIZER_FILE), &params, &state)?)
    } else {
        None
    };
    Ok(Checkpoint {
        config,
        params,
        bias,
        moments,
        state,
    })
}

/// Loads one rank's part written by [`save_part`] into the caller's stage state, in place: the
/// parameters (`params` must have exactly the part's layout: every tensor by name and shape,
/// nothing missing and nothing extra), the routing biases of `bias`'s MoE layers, and each
/// optimizer shard of `shards` (found by its flat range, so a part written with another
/// parallel layout is refused by name). Verifies every file's SHA-256 against the part's
/// `manifest.json` first. Returns the part's training state.
pub fn load_part(
    dir: &Path,
    params: &mut ParamStore<f32>,
    bias: &mut RoutingBias,
    shards: &mut [&mut AdamW],
) -> Result<TrainingState> {
    let _span = tracing::info_span!("checkpoint_load_part", dir = %dir.display()).entered();
    let manifest = verify(dir)?;
    for required in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE] {
        if !manifest.files.contains_key(required) {
            return Err(invalid(
                &dir.join(MANIFEST_FILE),
                format!("does not list {required}"),
            ));
        }
    }
    let spath = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&spath).map_err(io_err(&spath))?;
    let state: TrainingState =
        serde_json::from_str(&text).map_err(|e| invalid(&spath, e.to_string()))?;
    if state.format != FORMAT {
        return Err(invalid(
            &spath,
            format!("format {:?}, expected {FORMAT:?}", state.format),
        ));
    }

    // Decode into copies first, so a refused part leaves the caller's state untouched.
    let mpath = dir.join(MODEL_FILE);
    let mut new_params = params.clone();
    let mut new_bias = bias.clone();
    read_model_file(
        &mpath,
        &mut new_params,
        &mut new_bias,
        "not a parameter of this rank's stage (the part was written with another parallel layout)",
        "the model",
    )?;

    let opath = dir.join(OPTIMIZER_FILE);
    let adam_steps = read_metadata(&opath)?
        .get("adam_steps")
        .map(|s| {
            s.parse::<u64>()
                .map_err(|e| invalid(&opath, format!("metadata adam_steps {s:?}: {e}")))
        })
        .transpose()?
        .unwrap_or(state.step);
    let mut moments: BTreeMap<String, MomentBuf> = BTreeMap::new();
    let wanted: Vec<String> = shards
        .iter()
        .flat_map(|o| {
            let r = o.range();
            [EXP_AVG_SUFFIX, EXP_AVG_SQ_SUFFIX].map(|s| format!("shard.{}-{}{s}", r.start, r.end))
        })
        .collect();
    for_each_tensor(&opath, |name, dtype, shape, bytes| {
        if !wanted.iter().any(|w| w == name) {
            return Err(param_err(
                name,
                &format!(
                    "is not an optimizer shard of this rank (it holds {wanted:?}; the part was written with another parallel layout)"
                ),
            ));
        }
        let n = shape.iter().product::<usize>();
        let buf = match dtype {
            Dtype::BF16 => MomentBuf::Bf16(
                bytes
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            Dtype::F32 => MomentBuf::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            other => {
                return Err(param_err(
                    name,
                    &format!("stored as {other:?}; moments are BF16 or F32"),
                ));
            }
        };
        if buf.len() != n {
            return Err(param_err(name, "byte length does not match its shape"));
        }
        moments.insert(name.to_owned(), buf);
        Ok(())
    })?;
    let mut restored = Vec::with_capacity(shards.len());
    for opt in shards.iter() {
        let r = opt.range();
        let key = |s: &str| format!("shard.{}-{}{s}", r.start, r.end);
        let (Some(m), Some(v)) = (
            moments.get(&key(EXP_AVG_SUFFIX)),
            moments.get(&key(EXP_AVG_SQ_SUFFIX)),
        ) else {
            return Err(invalid(
                &opath,
                format!("has no moments for the optimizer shard {r:?}"),
            ));
        };
        for (what, buf) in [("exp_avg", m), ("exp_avg_sq", v)] {
            if buf.len() != r.len() || buf.dtype() != opt.config.moment_dtype {
                return Err(invalid(
                    &opath,
                    format!(
                        "the {what} of shard {r:?} has {} {:?} values; this rank's optimizer keeps {} {:?}",
                        buf.len(),
                        buf.dtype(),
                        r.len(),
                        opt.config.moment_dtype
                    ),
                ));
            }
        }
        restored.push((m.clone(), v.clone()));
    }
    // Everything decoded and checked: only now change the caller's state.
    for (opt, (m, v)) in shards.iter_mut().zip(restored) {
        let r = opt.range();
        opt.restore(m, v, adam_steps)
            .map_err(|why| invalid(&opath, format!("optimizer shard {r:?}: {why}")))?;
    }
    *params = new_params;
    *bias = new_bias;
    Ok(state)
}

/// The `__metadata__` map of a safetensors file (empty when it has none).
fn read_metadata(path: &Path) -> Result<std::collections::HashMap<String, String>> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    // SAFETY: read-only map of a file we opened read-only; checkpoint files are immutable once renamed in.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&map).map_err(|e| ModelError::Safetensors {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

fn load_moments(
    path: &Path,
    params: &ParamStore<f32>,
    state: &TrainingState,
) -> Result<(MomentBuf, MomentBuf)> {
    let n = params.numel();
    let (mut m, mut v) = match state.adamw.moment_dtype {
        crate::optim::MomentDtype::Bf16 => (
            MomentBuf::Bf16(vec![bf16::ZERO; n]),
            MomentBuf::Bf16(vec![bf16::ZERO; n]),
        ),
        crate::optim::MomentDtype::F32 => {
            (MomentBuf::F32(vec![0.0; n]), MomentBuf::F32(vec![0.0; n]))
        }
    };
    let mut seen = vec![[false; 2]; params.len()];
    for_each_tensor(path, |name, dtype, shape, bytes| {
        let (base, which) = if let Some(b) = name.strip_suffix(EXP_AVG_SQ_SUFFIX) {
            (b, 1)
        } else if let Some(b) = name.strip_suffix(EXP_AVG_SUFFIX) {
            (b, 0)
        } else {
            return Err(param_err(
                name,
                "not an optimizer moment (.exp_avg / .exp_avg_sq)",
            ));
        };
        let id = params
            .id(base)
            .ok_or_else(|| param_err(name, "moment of a tensor that is not a parameter"))?;
        let e = params.entry(id);
        check_shape(name, shape, &e.shape)?;
        let r = e.offset..e.offset + e.len;
        let buf = if which == 0 { &mut m } else { &mut v };
        match (buf, dtype) {
            (MomentBuf::Bf16(dst), Dtype::BF16) => {
                for (d, c) in dst[r].iter_mut().zip(bytes.chunks_exact(2)) {
                    *d = bf16::from_le_bytes([c[0], c[1]]);
                }
            }
            (MomentBuf::F32(dst), Dtype::F32) => {
                for (d, c) in dst[r].iter_mut().zip(bytes.chunks_exact(4)) {
                    *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            (buf, _) => {
                return Err(param_err(
                    name,
                    &format!(
                        "stored as {dtype:?}, but training_state.json says moments are {:?}",
                        buf.dtype()
                    ),
                ));
            }
        }
        seen[id.0][which] = true;
        Ok(())
    })?;
    if let Some(i) = seen.iter().position(|s| !(s[0] && s[1])) {
        return Err(param_err(
            &params.entries()[i].name,
            &format!("has no moments in {}", path.display()),
        ));
    }
    Ok((m, v))
}

fn param_err(name: &str, reason: &str) -> ModelError {
    ModelError::Param {
        name: name.to_string(),
        reason: reason.to_string(),
    }
}

fn check_shape(name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(param_err(
            name,
            &format!("shape {got:?}, expected {want:?}"),
        ));
    }
    Ok(())
}

fn decode_exact_f32(path: &Path, name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    if dtype != Dtype::F32 {
        return Err(ModelError::Safetensors {
            path: path.display().to_string(),
            reason: format!("tensor `{name}` is {dtype:?}; training checkpoints store F32"),
        });
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Memory-maps a safetensors file and calls `f(name, dtype, shape, bytes)` for every tensor, in name order.
pub fn for_each_tensor(
    path: &Path,
    mut f: impl FnMut(&str, Dtype, &[usize], &[u8]) -> Result<()>,
) -> Result<()> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    // SAFETY: read-only map of a file we opened read-only; checkpoint files are immutable once renamed in.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
    let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| ModelError::Safetensors {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    for name in names {
        let view = st.tensor(&name).map_err(|e| ModelError::Safetensors {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        f(&name, view.dtype(), view.shape(), view.data())?;
    }
    Ok(())
}

/// The `step-*` checkpoint with the most steps under `run_dir` that has a manifest, if any. Temporary
/// directories are never returned; the candidate is not verified here (call [`load`] or [`verify`]).
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    let rd = match std::fs::read_dir(run_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ModelError::Io {
                path: run_dir.display().to_string(),
                source: e,
            });
        }
    };
    let mut best: Option<(u64, PathBuf)> = None;
    for ent in rd {
        let ent = ent.map_err(io_err(run_dir))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if !ent.path().join(MANIFEST_FILE).is_file() {
            continue;
        }
        if best.as_ref().is_none_or(|(b, _)| step > *b) {
            best = Some((step, ent.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// Tensor-name endings of the projections the official FP8 release stores as F8_E4M3 with 128×128 block
/// scales. Everything else (embedding, head, norms, router, eh_proj) is stored BF16, the routing bias F32.
const FP8_SUFFIXES: [&str; 9] = [
    "self_attn.q_a_proj.weight",
    "self_attn.q_b_proj.weight",
    "self_attn.q_proj.weight",
    "self_attn.kv_a_proj_with_mqa.weight",
    "self_attn.kv_b_proj.weight",
    "self_attn.o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
];

/// Whether the FP8 export stores this parameter as E4M3 codes plus `weight_scale_inv`.
pub fn is_fp8_exported(name: &str) -> bool {
    FP8_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// The `quantization_config` the official DeepSeek-V3 FP8 release carries in config.json.
pub fn fp8_quantization_config() -> serde_json::Value {
    serde_json::json!({
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128]
    })
}

/// 128×128 block quantization of a [rows, cols] weight with f32 scales (the kernels' quantizer):
/// returns (E4M3 codes [rows, cols], scale_inv [ceil(rows/128), ceil(cols/128)]) with w ≈ code · scale_inv.
pub fn quantize_weight_blocks(
    ctx: &kernels::ExecCtx,
    w: &[f32],
    rows: usize,
    cols: usize,
) -> Result<(Vec<u8>, Vec<f32>)> {
    let t = kernels::fp8::TILE;
    let mut codes = vec![0u8; rows * cols];
    let mut scales = vec![0f32; rows.div_ceil(t) * cols.div_ceil(t)];
    kernels::fp8::quantize_weight(
        ctx,
        &mut codes,
        &mut scales,
        w,
        rows,
        cols,
        kernels::fp8::ScaleFmt::F32,
    )?;
    Ok((codes, scales))
}

/// Writes `dir` in the official FP8 layout: `model.safetensors` with F8_E4M3 projection weights and their
/// F32 `weight_scale_inv` block scales, BF16 for the other tensors (plus the MTP module's copies of the
/// embedding and head, as in the release), F32 routing biases, and `config.json` with `quantization_config`.
/// Like a checkpoint, the directory appears complete (with `manifest.json`) or not at all.
pub fn export_fp8(
    dir: &Path,
    config: &ModelConfig,
    params: &ParamStore<f32>,
    bias: &RoutingBias,
    ctx: &kernels::ExecCtx,
) -> Result<()> {
    let _span = tracing::info_span!("export_fp8", dir = %dir.display()).entered();
    let mut tensors = Vec::new();
    let to_bf16 = |v: &[f32]| -> Vec<u8> {
        v.iter()
            .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
            .collect()
    };
    for (name, shape, v) in params.iter() {
        if is_fp8_exported(name) && shape.len() == 2 {
            let (codes, scales) = quantize_weight_blocks(ctx, v, shape[0], shape[1])?;
            let t = kernels::fp8::TILE;
            tensors.push(RawTensor {
                name: name.to_string(),
                dtype: Dtype::F8_E4M3,
                shape: shape.to_vec(),
                bytes: codes,
            });
            tensors.push(RawTensor {
                name: format!("{name}_scale_inv"),
                dtype: Dtype::F32,
                shape: vec![shape[0].div_ceil(t), shape[1].div_ceil(t)],
                bytes: f32_bytes(&scales),
            });
        } else {
            tensors.push(RawTensor {
                name: name.to_string(),
                dtype: Dtype::BF16,
                shape: shape.to_vec(),
                bytes: to_bf16(v),
            });
        }
    }
    for k in 0..config.num_nextn_predict_layers {
        let l = config.num_hidden_layers + k;
        for (src, dst) in [
            (
                "model.embed_tokens.weight",
                format!("model.layers.{l}.embed_tokens.weight"),
            ),
            (
                "lm_head.weight",
                format!("model.layers.{l}.shared_head.head.weight"),
            ),
        ] {
            let v = params
                .get(src)
                .ok_or_else(|| param_err(src, "missing from the parameter store"))?;
            let shape = params.shape(src).unwrap_or(&[]).to_vec();
            tensors.push(RawTensor {
                name: dst,
                dtype: Dtype::BF16,
                shape,
                bytes: to_bf16(v),
            });
        }
    }
    for (layer, v) in bias.iter() {
        tensors.push(RawTensor {
            name: RoutingBias::name(layer),
            dtype: Dtype::F32,
            shape: vec![v.len()],
            bytes: f32_bytes(v),
        });
    }
    let mut cfg = config.clone();
    cfg.quantization_config = Some(fp8_quantization_config());
    write_atomically(dir, |tmp| {
        write_safetensors(&tmp.join(MODEL_FILE), &tensors, None)?;
        write_file(&tmp.join(CONFIG_FILE), cfg.to_json_string().as_bytes())
    })
}

/// SHA-256 and size of a file.
pub fn digest_file(path: &Path) -> Result<FileDigest> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut h = sha256::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileDigest {
        sha256: h.hex(),
        bytes,
    })
}

/// SHA-256 (FIPS 180-4), written out here to avoid a dependency for one checksum.
mod sha256 {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];

    /// Incremental SHA-256 state.
    pub struct Sha256 {
        h: [u32; 8],
        block: [u8; 64],
        filled: usize,
        total: u64,
    }

    impl Sha256 {
        pub fn new() -> Self {
            Sha256 {
                h: [
                    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c,
                    0x1f83d9ab, 0x5be0cd19,
                ],
                block: [0; 64],
                filled: 0,
                total: 0,
            }
        }

        pub fn update(&mut self, mut data: &[u8]) {
            self.total += data.len() as u64;
            if self.filled > 0 {
                let take = (64 - self.filled).min(data.len());
                self.block[self.filled..self.filled + take].copy_from_slice(&data[..take]);
                self.filled += take;
                data = &data[take..];
                if self.filled == 64 {
                    let block = self.block;
                    self.compress(&block);
                    self.filled = 0;
                }
            }
            let mut chunks = data.chunks_exact(64);
            for c in &mut chunks {
                let mut block = [0u8; 64];
                block.copy_from_slice(c);
                self.compress(&block);
            }
            let rest = chunks.remainder();
            self.block[..rest.len()].copy_from_slice(rest);
            self.filled += rest.len();
        }

        fn compress(&mut self, block: &[u8; 64]) {
            let mut w = [0u32; 64];
            for i in 0..16 {
                w[i] = u32::from_be_bytes([
                    block[4 * i],
                    block[4 * i + 1],
                    block[4 * i + 2],
                    block[4 * i + 3],
                ]);
            }
            for i in 16..64 {
                let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
                let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
                w[i] = w[i - 16]
                    .wrapping_add(s0)
                    .wrapping_add(w[i - 7])
                    .wrapping_add(s1);
            }
            let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = self.h;
            for i in 0..64 {
                let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
                let ch = (e & f) ^ (!e & g);
                let t1 = h
                    .wrapping_add(s1)
                    .wrapping_add(ch)
                    .wrapping_add(K[i])
                    .wrapping_add(w[i]);
                let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
                let maj = (a & b) ^ (a & c) ^ (b & c);
                let t2 = s0.wrapping_add(maj);
                h = g;
                g = f;
                f = e;
                e = d.wrapping_add(t1);
                d = c;
                c = b;
                b = a;
                a = t1.wrapping_add(t2);
            }
            for (s, v) in self.h.iter_mut().zip([a, b, c, d, e, f, g, h]) {
                *s = s.wrapping_add(v);
            }
        }

        pub fn hex(mut self) -> String {
            let bits = self.total.wrapping_mul(8);
            self.update(&[0x80]);
            while self.filled != 56 {
                self.update(&[0]);
            }
            self.update(&bits.to_be_bytes());
            self.h.iter().map(|x| format!("{x:08x}")).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> TrainingState {
        TrainingState {
            format: FORMAT.into(),
            step: 3,
            tokens_seen: 384,
            data_seed: 11,
            data_step: 3,
            init_seed: 5,
            lr: LrSchedule {
                peak: 1e-3,
                floor: 1e-4,
                warmup_steps: 2,
                total_steps: 10,
            },
            last_lr: 9e-4,
            adamw: AdamWConfig::default(),
            bias_speed: BiasSpeedSchedule {
                rate: 1e-3,
                until_tokens: None,
            },
            extra: serde_json::json!({"note": "test"}),
        }
    }

    #[test]
    fn save_load_is_exact_and_corruption_is_named() {
        let config = ModelConfig::preset("micro").unwrap();
        let params = ParamStore::init(&config, 5);
        let mut bias = RoutingBias::zeros(&config);
        for (i, l) in bias.layer_ids().to_vec().into_iter().enumerate() {
            bias.get_mut(l)
                .unwrap()
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (i * 10 + j) as f32 * 1e-3);
        }
        let n = params.numel();
        let mut opt = AdamW::new(
            AdamWConfig::default(),
            0..n,
            &crate::optim::DecayMask::none(),
        );
        let grads: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.7).sin()).collect();
        let mut p2 = params.clone();
        opt.update(
            p2.flat_mut(),
            &grads,
            crate::optim::StepInputs {
                lr: 1e-3,
                grad_scale: 1.0,
            },
        );

        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(step_dir_name(3));
        save(&dir, &config, &p2, &bias, Some(&opt), &state()).unwrap();
        assert!(
            save(&dir, &config, &p2, &bias, Some(&opt), &state()).is_err(),
            "must not overwrite"
        );
        // No temporary directory is left behind.
        let names: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into())
            .collect();
        assert_eq!(names, vec!["step-00000003".to_string()]);
        assert_eq!(latest(root.path()).unwrap(), Some(dir.clone()));

        let ck = load(&dir).unwrap();
        assert_eq!(ck.config, config);
        assert!(
            ck.params
                .flat()
                .iter()
                .zip(p2.flat())
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        assert_eq!(ck.bias, bias);
        assert_eq!(ck.state, state());
        let (m, v) = ck.moments.unwrap();
        assert_eq!((m, v), (opt.exp_avg.clone(), opt.exp_avg_sq.clone()));

        // Flip one byte of the optimizer file: the error names that file.
        let opath = dir.join(OPTIMIZER_FILE);
        let mut bytes = std::fs::read(&opath).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&opath, &bytes).unwrap();
        let err = load(&dir).unwrap_err().to_string();
        assert!(
            err.contains("optimizer.safetensors") && err.contains("SHA-256"),
            "{err}"
        );
        // A directory without a manifest is incomplete and is never picked as the latest.
        std::fs::remove_file(dir.join(MANIFEST_FILE)).unwrap();
        let err = load(&dir).unwrap_err().to_string();
        assert!(
            err.contains("manifest.json") && err.contains("incomplete"),
            "{err}"
        );
        assert_eq!(latest(root.path()).unwrap(), None);
    }

    fn golden(path: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/golden")
            .join(path)
    }

    fn read_f32(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
        let mut out = None;
        for_each_tensor(path, |n, dtype, shape, bytes| {
            if n == name {
                assert_eq!(dtype, Dtype::F32, "{name}");
                out = Some((
                    shape.to_vec(),
                    bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                ));
            }
            Ok(())
        })
        .unwrap();
        out.unwrap_or_else(|| panic!("{name} not in {}", path.display()))
    }

    fn read_u8(path: &Path, name: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let mut out = None;
        for_each_tensor(path, |n, dtype, shape, bytes| {
            if n == name {
                out = Some((dtype, shape.to_vec(), bytes.to_vec()));
            }
            Ok(())
        })
        .unwrap();
        out.unwrap_or_else(|| panic!("{name} not in {}", path.display()))
    }

    #[test]
    fn block_quantizer_matches_the_golden_128x128_convention() {
        let ctx = kernels::ExecCtx::cpu(1);
        for w in ["w", "w_odd"] {
            let (shape, x) = read_f32(&golden("fp8/inputs.safetensors"), w);
            let (codes, scales) = quantize_weight_blocks(&ctx, &x, shape[0], shape[1]).unwrap();
            let (_, _, want_codes) =
                read_u8(&golden("fp8/expected.safetensors"), &format!("{w}.codes"));
            let (_, want_scales) =
                read_f32(&golden("fp8/expected.safetensors"), &format!("{w}.scales"));
            assert_eq!(codes, want_codes, "{w} codes");
            assert!(
                scales
                    .iter()
                    .zip(&want_scales)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{w} scales"
            );
        }
    }

    #[test]
    fn fp8_export_requantizes_to_the_same_codes_and_scales() {
        let config = ModelConfig::preset("micro").unwrap();
        let params = ParamStore::init(&config, 1);
        let bias = RoutingBias::zeros(&config);
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("fp8");
        let ctx = kernels::ExecCtx::cpu(1);
        export_fp8(&dir, &config, &params, &bias, &ctx).unwrap();
        verify(&dir).unwrap();
        let cfg = ModelConfig::from_file(dir.join(CONFIG_FILE)).unwrap();
        assert_eq!(cfg.quantization_config, Some(fp8_quantization_config()));
        let file = dir.join(MODEL_FILE);
        let mut n_fp8 = 0;
        let mut names = Vec::new();
        for_each_tensor(&file, |n, dtype, shape, _| {
            names.push((n.to_string(), dtype, shape.to_vec()));
            Ok(())
        })
        .unwrap();
        for (name, shape, master) in params.iter() {
            let (dtype, got_shape, codes) = read_u8(&file, name);
            assert_eq!(got_shape, shape, "{name}");
            if !is_fp8_exported(name) {
                assert_eq!(dtype, Dtype::BF16, "{name}");
                continue;
            }
            n_fp8 += 1;
            assert_eq!(dtype, Dtype::F8_E4M3, "{name}");
            let (sshape, scales) = read_f32(&file, &format!("{name}_scale_inv"));
            let (rows, cols) = (shape[0], shape[1]);
            assert_eq!(sshape, vec![rows.div_ceil(128), cols.div_ceil(128)]);
            // Requantizing the f32 master weights gives exactly the exported codes and scales.
            let (want_codes, want_scales) =
                quantize_weight_blocks(&ctx, master, rows, cols).unwrap();
            assert_eq!(codes, want_codes, "{name}");
            assert!(
                scales
                    .iter()
                    .zip(&want_scales)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name}"
            );
            // An independent scalar check of the convention on block (0, 0): scale = amax/448, code = e4m3(x·448/amax).
            let amax = (0..rows.min(128))
                .flat_map(|r| (0..cols.min(128)).map(move |c| (r, c)))
                .map(|(r, c)| master[r * cols + c].abs())
                .fold(0f32, f32::max)
                .max(1e-4);
            assert_eq!(scales[0].to_bits(), (amax / 448.0).to_bits(), "{name}");
            let f = 448.0 / amax;
            assert_eq!(codes[0], kernels::fp8::e4m3_encode(master[0] * f), "{name}");
            // Dequantized values are within E4M3's relative precision of the block amax.
            for (i, (&c, &m)) in codes.iter().zip(master).enumerate() {
                let s = scales[(i / cols / 128) * cols.div_ceil(128) + (i % cols) / 128];
                let deq = kernels::fp8::e4m3_decode(c) * s;
                assert!(
                    (deq - m).abs() <= s * 16.0 + 1e-12,
                    "{name}[{i}]: {m} vs {deq}"
                );
            }
        }
        assert!(n_fp8 > 10);
        // The router, eh_proj, embedding, head and norms stay BF16; the MTP copies of embedding and head exist.
        let l = config.num_hidden_layers;
        for n in [
            format!("model.layers.{l}.embed_tokens.weight"),
            format!("model.layers.{l}.shared_head.head.weight"),
        ] {
            assert!(
                names.iter().any(|(x, d, _)| *x == n && *d == Dtype::BF16),
                "{n}"
            );
        }
        assert!(
            names.iter().any(
                |(x, d, _)| x.ends_with("mlp.gate.e_score_correction_bias") && *d == Dtype::F32
            )
        );
        assert!(!is_fp8_exported(&format!(
            "model.layers.{l}.eh_proj.weight"
        )));
        assert!(!is_fp8_exported("model.layers.1.mlp.gate.weight"));
    }

    #[test]
    fn a_part_loads_back_exactly_and_refuses_another_layout_or_corruption() {
        let config = ModelConfig::preset("micro").unwrap();
        let params = ParamStore::init(&config, 9);
        let n = params.numel();
        let mut bias = RoutingBias::zeros(&config);
        for l in bias.layer_ids().to_vec() {
            bias.get_mut(l).unwrap()[1] = 0.125 * l as f32;
        }
        // Two ZeRO-1 shards of one rank, each with moments after one update.
        let mask = crate::optim::DecayMask::none();
        let grads: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.3).cos()).collect();
        let mut trained = params.clone();
        let mut shards = [
            AdamW::new(AdamWConfig::default(), 0..n / 3, &mask),
            AdamW::new(AdamWConfig::default(), n / 2..n, &mask),
        ];
        for opt in &mut shards {
            let inputs = crate::optim::StepInputs {
                lr: 1e-3,
                grad_scale: 1.0,
            };
            let r = opt.range();
            opt.update(&mut trained.flat_mut()[r.clone()], &grads[r], inputs);
        }
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("rank-0/stage-0");
        save_part(
            &dir,
            &config,
            &trained,
            &bias,
            &[&shards[0], &shards[1]],
            &state(),
        )
        .unwrap();

        let mut p = params.clone();
        let mut b = RoutingBias::zeros(&config);
        let mut fresh = [
            AdamW::new(AdamWConfig::default(), 0..n / 3, &mask),
            AdamW::new(AdamWConfig::default(), n / 2..n, &mask),
        ];
        let [f0, f1] = &mut fresh;
        let st = load_part(&dir, &mut p, &mut b, &mut [f0, f1]).unwrap();
        assert_eq!(st, state());
        assert!(
            p.flat()
                .iter()
                .zip(trained.flat())
                .all(|(x, y)| x.to_bits() == y.to_bits())
        );
        assert_eq!(b, bias);
        for (got, want) in fresh.iter().zip(&shards) {
            assert_eq!(got.exp_avg, want.exp_avg);
            assert_eq!(got.exp_avg_sq, want.exp_avg_sq);
            assert_eq!(got.steps, want.steps);
        }

        // Another sharding (another data-parallel degree) is refused by name, nothing changed.
        let mut other = AdamW::new(AdamWConfig::default(), 0..n / 2, &mask);
        let mut p2 = params.clone();
        let err = load_part(&dir, &mut p2, &mut b, &mut [&mut other])
            .unwrap_err()
            .to_string();
        assert!(err.contains("another parallel layout"), "{err}");
        assert!(p2.flat().iter().zip(params.flat()).all(|(x, y)| x == y));
        assert_eq!(other.steps, 0);

        // A flipped byte is caught by the checksum, naming the file.
        let mpath = dir.join(MODEL_FILE);
        let mut bytes = std::fs::read(&mpath).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&mpath, &bytes).unwrap();
        let [f0, f1] = &mut fresh;
        let err = load_part(&dir, &mut p2, &mut b, &mut [f0, f1])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("SHA-256"),
            "{err}"
        );
    }

    #[test]
    fn sha256_known_vectors() {
        let hex = |data: &[u8]| {
            let mut h = sha256::Sha256::new();
            // Feed in uneven pieces to exercise the buffering.
            for piece in data.chunks(7) {
                h.update(piece);
            }
            h.hex()
        };
        assert_eq!(
            hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        assert_eq!(
            hex(&[b'a'; 1000]),
            "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3"
        );
    }
}
