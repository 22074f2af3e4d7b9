//! Parameter storage: one flat allocation per model (or per pipeline stage) with named, shaped views under
//! the DeepSeek-V3 checkpoint names, plus the routing biases, which are kept apart because they are not
//! trained by gradients.
//!
//! Invariants: a tensor's name, shape and offset never change after construction; a gradient store made
//! by [`ParamStore::zeros_like`] has exactly the same layout, so `flat()` of parameters, gradients and
//! optimizer moments line up element for element. Initialization is a pure function of (seed, tensor name),
//! so a stage's store initializes to exactly the same values as the same tensors of the whole model.
//!
//! Layout (V = vocab, d = hidden, L = layer id; the MTP module k is layer `num_hidden_layers + k − 1`):
//! `model.embed_tokens.weight` [V, d], then per layer `input_layernorm` [d], `self_attn.q_a_proj` [r_q, d],
//! `q_a_layernorm` [r_q], `q_b_proj` [n_h·(d_n+d_r), r_q], `kv_a_proj_with_mqa` [r_kv+d_r, d],
//! `kv_a_layernorm` [r_kv], `kv_b_proj` [n_h·(d_n+d_v), r_kv], `o_proj` [d, n_h·d_v],
//! `post_attention_layernorm` [d], then the FFN (dense `mlp.{gate,up}_proj` [I, d], `mlp.down_proj` [d, I];
//! MoE `mlp.gate.weight` [N_r, d], `mlp.experts.E.*`, `mlp.shared_experts.*` with width N_s·I_moe); the MTP
//! module adds `enorm`, `hnorm` [d], `eh_proj` [d, 2d] and `shared_head.norm` [d]; finally `model.norm` [d]
//! and `lm_head.weight` [V, d]. Matrices are [out, in] (y = x Wᵀ).

use crate::{ModelError, Result};
use arch::{LayerKind, ModelConfig};
use kernels::Real;
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

/// Index of a tensor inside a [`ParamStore`] (valid for stores with the same layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParamId(pub usize);

/// One named tensor of a store.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamEntry {
    /// Checkpoint name.
    pub name: String,
    /// Shape ([out, in] for matrices).
    pub shape: Vec<usize>,
    /// Offset of the first element in the flat buffer.
    pub offset: usize,
    /// Number of elements.
    pub len: usize,
}

/// Which parts of the model a store (or pipeline stage) holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageSpec {
    /// Contiguous decoder layer ids (main model only).
    pub layers: Range<usize>,
    /// Holds the embedding (the first stage).
    pub first: bool,
    /// Holds the final norm, the head and the MTP modules (the last stage). When MTP is on and the stage is
    /// not also first, it holds its own copy of the embedding, whose gradient must be summed with the
    /// first stage's.
    pub last: bool,
}

impl StageSpec {
    /// The whole model as one stage.
    pub fn whole(config: &ModelConfig) -> Self {
        Self {
            layers: 0..config.num_hidden_layers,
            first: true,
            last: true,
        }
    }

    /// Whether this stage needs the embedding table (first stage, or last stage with MTP).
    pub fn has_embedding(&self, config: &ModelConfig) -> bool {
        self.first || (self.last && config.num_nextn_predict_layers > 0)
    }
}

/// The (name, shape) list of one decoder layer (`layer` may be an MTP id; the MTP extras are not included).
pub fn decoder_layer_specs(config: &ModelConfig, layer: usize) -> Vec<(String, Vec<usize>)> {
    let d = config.hidden_size;
    let h = config.num_attention_heads;
    let p = format!("model.layers.{layer}");
    let mut v = vec![(format!("{p}.input_layernorm.weight"), vec![d])];
    match config.q_lora_rank {
        Some(rq) => {
            v.push((format!("{p}.self_attn.q_a_proj.weight"), vec![rq, d]));
            v.push((format!("{p}.self_attn.q_a_layernorm.weight"), vec![rq]));
            v.push((
                format!("{p}.self_attn.q_b_proj.weight"),
                vec![h * config.qk_head_dim(), rq],
            ));
        }
        None => v.push((
            format!("{p}.self_attn.q_proj.weight"),
            vec![h * config.qk_head_dim(), d],
        )),
    }
    let rkv = config.kv_lora_rank;
    v.push((
        format!("{p}.self_attn.kv_a_proj_with_mqa.weight"),
        vec![rkv + config.qk_rope_head_dim, d],
    ));
    v.push((format!("{p}.self_attn.kv_a_layernorm.weight"), vec![rkv]));
    v.push((
        format!("{p}.self_attn.kv_b_proj.weight"),
        vec![h * (config.qk_nope_head_dim + config.v_head_dim), rkv],
    ));
    v.push((
        format!("{p}.self_attn.o_proj.weight"),
        vec![d, h * config.v_head_dim],
    ));
    v.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
    let mlp = |v: &mut Vec<(String, Vec<usize>)>, prefix: String, width: usize| {
        v.push((format!("{prefix}.gate_proj.weight"), vec![width, d]));
        v.push((format!("{prefix}.up_proj.weight"), vec![width, d]));
        v.push((format!("{prefix}.down_proj.weight"), vec![d, width]));
    };
    match config.layer_kind(layer) {
        LayerKind::Dense => mlp(&mut v, format!("{p}.mlp"), config.intermediate_size),
        LayerKind::Moe => {
            v.push((
                format!("{p}.mlp.gate.weight"),
                vec![config.n_routed_experts, d],
            ));
            for e in 0..config.n_routed_experts {
                mlp(
                    &mut v,
                    format!("{p}.mlp.experts.{e}"),
                    config.moe_intermediate_size,
                );
            }
            if config.n_shared_experts > 0 {
                mlp(
                    &mut v,
                    format!("{p}.mlp.shared_experts"),
                    config.moe_intermediate_size * config.n_shared_experts,
                );
            }
        }
    }
    v
}

/// The (name, shape) list of a stage, in flat-buffer order.
pub fn stage_specs(config: &ModelConfig, stage: &StageSpec) -> Vec<(String, Vec<usize>)> {
    let d = config.hidden_size;
    let mut v = Vec::new();
    if stage.has_embedding(config) {
        v.push((
            "model.embed_tokens.weight".to_string(),
            vec![config.vocab_size, d],
        ));
    }
    for l in stage.layers.clone() {
        v.extend(decoder_layer_specs(config, l));
    }
    if stage.last {
        for k in 0..config.num_nextn_predict_layers {
            let l = config.num_hidden_layers + k;
            v.push((format!("model.layers.{l}.enorm.weight"), vec![d]));
            v.push((format!("model.layers.{l}.hnorm.weight"), vec![d]));
            v.push((format!("model.layers.{l}.eh_proj.weight"), vec![d, 2 * d]));
            v.extend(decoder_layer_specs(config, l));
            v.push((format!("model.layers.{l}.shared_head.norm.weight"), vec![d]));
        }
        v.push(("model.norm.weight".to_string(), vec![d]));
        v.push(("lm_head.weight".to_string(), vec![config.vocab_size, d]));
    }
    v
}

/// Whether a tensor name is a norm weight (initialized to one, usually excluded from weight decay).
pub fn is_norm(name: &str) -> bool {
    name.ends_with("norm.weight")
}

/// A flat parameter (or gradient) buffer with named, shaped views.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamStore<T: Real = f32> {
    flat: Vec<T>,
    entries: Vec<ParamEntry>,
    index: HashMap<String, usize>,
}

impl<T: Real> ParamStore<T> {
    /// A zero-filled store with the given tensors, in order.
    pub fn from_specs(specs: Vec<(String, Vec<usize>)>) -> Self {
        let mut entries = Vec::with_capacity(specs.len());
        let mut index = HashMap::with_capacity(specs.len());
        let mut offset = 0;
        for (name, shape) in specs {
            let len = shape.iter().product();
            index.insert(name.clone(), entries.len());
            entries.push(ParamEntry {
                name,
                shape,
                offset,
                len,
            });
            offset += len;
        }
        Self {
            flat: vec![T::ZERO; offset],
            entries,
            index,
        }
    }

    /// A zero-filled store with the same layout (for gradients).
    pub fn zeros_like(&self) -> Self {
        Self {
            flat: vec![T::ZERO; self.flat.len()],
            entries: self.entries.clone(),
            index: self.index.clone(),
        }
    }

    /// Fills every tensor with its deterministic initial value: norms 1, everything else N(0, std²), with
    /// std = `initializer_range` and a stream seeded by (seed, tensor name).
    pub fn init_values(&mut self, config: &ModelConfig, seed: u64) {
        let std = config.initializer_range;
        for e in &self.entries {
            let dst = &mut self.flat[e.offset..e.offset + e.len];
            if is_norm(&e.name) {
                dst.iter_mut().for_each(|x| *x = T::ONE);
            } else {
                let mut rng = Normal::new(seed ^ fnv1a(e.name.as_bytes()));
                dst.iter_mut()
                    .for_each(|x| *x = T::from_f64(std * rng.sample()));
            }
        }
    }

    /// Iterates (name, shape, values) in flat order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[usize], &[T])> {
        self.entries.iter().map(|e| {
            (
                e.name.as_str(),
                e.shape.as_slice(),
                &self.flat[e.offset..e.offset + e.len],
            )
        })
    }

    /// The entries (name, shape, offset, length) in flat order.
    pub fn entries(&self) -> &[ParamEntry] {
        &self.entries
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the store has no tensors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total number of scalars.
    pub fn numel(&self) -> usize {
        self.flat.len()
    }

    /// The id of a tensor.
    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.index.get(name).map(|&i| ParamId(i))
    }

    /// The id of a tensor, or an error naming it.
    pub fn require(&self, name: &str) -> Result<ParamId> {
        self.id(name).ok_or_else(|| ModelError::Param {
            name: name.to_string(),
            reason: "not in this store".into(),
        })
    }

    /// The entry of a tensor id.
    pub fn entry(&self, id: ParamId) -> &ParamEntry {
        &self.entries[id.0]
    }

    /// A tensor's values by name.
    pub fn get(&self, name: &str) -> Option<&[T]> {
        self.id(name).map(|id| self.slice(id))
    }

    /// A tensor's values by name, mutable.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut [T]> {
        let id = self.id(name)?;
        Some(self.slice_mut(id))
    }

    /// A tensor's shape by name.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.id(name).map(|id| self.entries[id.0].shape.as_slice())
    }

    /// A tensor's values by id.
    pub fn slice(&self, id: ParamId) -> &[T] {
        let e = &self.entries[id.0];
        &self.flat[e.offset..e.offset + e.len]
    }

    /// A tensor's values by id, mutable.
    pub fn slice_mut(&mut self, id: ParamId) -> &mut [T] {
        let e = &self.entries[id.0];
        &mut self.flat[e.offset..e.offset + e.len]
    }

    /// The whole buffer.
    pub fn flat(&self) -> &[T] {
        &self.flat
    }

    /// The whole buffer, mutable.
    pub fn flat_mut(&mut self) -> &mut [T] {
        &mut self.flat
    }

    /// Sets every value to zero (keeps the allocation).
    pub fn fill_zero(&mut self) {
        self.flat.iter_mut().for_each(|x| *x = T::ZERO);
    }

    /// The same layout in another precision (values converted through f64).
    pub fn convert<U: Real>(&self) -> ParamStore<U> {
        ParamStore {
            flat: self.flat.iter().map(|x| U::from_f64(x.to_f64())).collect(),
            entries: self.entries.clone(),
            index: self.index.clone(),
        }
    }

    /// Copies every tensor of `self` from `other` by name (shapes must match; extra tensors of `other`
    /// are ignored).
    pub fn copy_from(&mut self, other: &ParamStore<T>) -> Result<()> {
        for i in 0..self.entries.len() {
            let e = self.entries[i].clone();
            let src_id = other.require(&e.name)?;
            if other.entries[src_id.0].shape != e.shape {
                return Err(ModelError::Param {
                    name: e.name,
                    reason: "shape differs between stores".into(),
                });
            }
            let src = other.slice(src_id);
            self.flat[e.offset..e.offset + e.len].copy_from_slice(src);
        }
        Ok(())
    }
}

impl ParamStore<f32> {
    /// A zero-filled store for a whole model.
    pub fn zeros(config: &ModelConfig) -> Self {
        Self::from_specs(stage_specs(config, &StageSpec::whole(config)))
    }

    /// A zero-filled store for one stage.
    pub fn zeros_for_stage(config: &ModelConfig, stage: &StageSpec) -> Self {
        Self::from_specs(stage_specs(config, stage))
    }

    /// A whole model initialized with [`ParamStore::init_values`].
    pub fn init(config: &ModelConfig, seed: u64) -> Self {
        let mut s = Self::zeros(config);
        s.init_values(config, seed);
        s
    }

    /// Loads an HF-format directory: `config.json` plus its `model*.safetensors` files (F32, BF16 or F16).
    /// Returns the config, the whole-model parameters and the routing biases (zeros where a checkpoint has
    /// none). MTP copies of the shared embedding/head (`model.layers.N.embed_tokens`, `shared_head.head`) are
    /// skipped; any other unknown tensor or a missing one is an error naming it.
    pub fn load_hf_dir(
        dir: impl AsRef<Path>,
    ) -> Result<(ModelConfig, ParamStore<f32>, RoutingBias)> {
        let dir = dir.as_ref();
        let config = ModelConfig::from_file(dir.join("config.json"))?;
        let mut params = ParamStore::zeros(&config);
        let mut bias = RoutingBias::zeros(&config);
        let files = safetensors_files(dir)?;
        let mut seen = vec![false; params.len()];
        for file in &files {
            load_file(file, &mut |name, shape, values| {
                if let Some(layer) = RoutingBias::layer_of(name) {
                    let dst = bias.get_mut(layer).ok_or_else(|| ModelError::Param {
                        name: name.to_string(),
                        reason: "routing bias for a layer that is not MoE".into(),
                    })?;
                    if shape != [dst.len()] {
                        return Err(shape_err(name, shape, &[dst.len()]));
                    }
                    dst.copy_from_slice(&values()?);
                    return Ok(());
                }
                let Some(id) = params.id(name) else {
                    if is_mtp_shared_copy(&config, name) {
                        return Ok(());
                    }
                    return Err(ModelError::Param {
                        name: name.to_string(),
                        reason: "unexpected tensor".into(),
                    });
                };
                let want = params.entries[id.0].shape.clone();
                if shape != want.as_slice() {
                    return Err(shape_err(name, shape, &want));
                }
                params.slice_mut(id).copy_from_slice(&values()?);
                seen[id.0] = true;
                Ok(())
            })?;
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            return Err(ModelError::Param {
                name: params.entries[i].name.clone(),
                reason: format!("missing from {}", dir.display()),
            });
        }
        Ok((config, params, bias))
    }

    /// Loads every tensor this store holds from the `model*.safetensors` files of `dir` (other tensors are
    /// ignored; a missing one is an error). Used to load one pipeline stage's share of a checkpoint.
    pub fn load_safetensors_dir(&mut self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let mut seen = vec![false; self.len()];
        for file in safetensors_files(dir)? {
            load_file(&file, &mut |name, shape, values| {
                if let Some(id) = self.id(name) {
                    let want = self.entries[id.0].shape.clone();
                    if shape != want.as_slice() {
                        return Err(shape_err(name, shape, &want));
                    }
                    self.slice_mut(id).copy_from_slice(&values()?);
                    seen[id.0] = true;
                }
                Ok(())
            })?;
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            return Err(ModelError::Param {
                name: self.entries[i].name.clone(),
                reason: format!("missing from {}", dir.display()),
            });
        }
        Ok(())
    }
}

fn shape_err(name: &str, got: &[usize], want: &[usize]) -> ModelError {
    ModelError::Param {
        name: name.to_string(),
        reason: format!("shape {got:?}, expected {want:?}"),
    }
}

fn is_mtp_shared_copy(config: &ModelConfig, name: &str) -> bool {
    (config.num_hidden_layers..config.num_hidden_layers + config.num_nextn_predict_layers).any(
        |l| {
            name == format!("model.layers.{l}.embed_tokens.weight")
                || name == format!("model.layers.{l}.shared_head.head.weight")
        },
    )
}

/// The weight files of an HF directory, sorted by name: `model.safetensors` or the shards
/// `model-*.safetensors` (other safetensors files, such as dumps or optimizer state, are not weights).
pub fn safetensors_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|source| ModelError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let mut files = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|source| ModelError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let p = ent.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("model") && name.ends_with(".safetensors") {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(ModelError::Safetensors {
            path: dir.display().to_string(),
            reason: "no model*.safetensors files".into(),
        });
    }
    Ok(files)
}

/// A lazily decoded tensor: call it to get the values as f32.
type Values<'a> = &'a dyn Fn() -> Result<Vec<f32>>;

/// Called with (name, shape, lazily decoded values) for every tensor of a file.
type TensorVisitor<'a> = dyn FnMut(&str, &[usize], Values) -> Result<()> + 'a;

/// Memory-maps one safetensors file and calls `f(name, shape, values)` for each tensor.
fn load_file(path: &Path, f: &mut TensorVisitor<'_>) -> Result<()> {
    let p = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| ModelError::Io {
        path: p.clone(),
        source,
    })?;
    // SAFETY: the file is opened read-only and only read through the map while `map` lives; checkpoint files
    // are not modified while a model loads them (the writer renames complete files into place).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| ModelError::Io {
        path: p.clone(),
        source,
    })?;
    let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| ModelError::Safetensors {
        path: p.clone(),
        reason: e.to_string(),
    })?;
    for (name, view) in st.iter() {
        let decode = || -> Result<Vec<f32>> { tensor_to_f32(&p, name, &view) };
        f(name, view.shape(), &decode)?;
    }
    Ok(())
}

/// Decodes an F32/BF16/F16 tensor view into f32.
pub fn tensor_to_f32(
    path: &str,
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
) -> Result<Vec<f32>> {
    use safetensors::Dtype;
    let data = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(ModelError::Safetensors {
                path: path.to_string(),
                reason: format!("tensor `{name}` has dtype {other:?}; only F32, BF16 and F16 load"),
            });
        }
    })
}

/// The routing biases `mlp.gate.e_score_correction_bias` of every MoE layer (MTP included), FP32.
/// They steer expert selection only and are updated by the load-balancing rule, never by gradients.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingBias {
    layers: Vec<usize>,
    values: Vec<Vec<f32>>,
}

impl RoutingBias {
    /// Zero biases for every MoE layer id of the config (including MTP layers).
    pub fn zeros(config: &ModelConfig) -> Self {
        let layers = config.moe_layer_ids();
        let values = layers
            .iter()
            .map(|_| vec![0.0; config.n_routed_experts])
            .collect();
        Self { layers, values }
    }

    /// The checkpoint name of a layer's bias.
    pub fn name(layer: usize) -> String {
        format!("model.layers.{layer}.mlp.gate.e_score_correction_bias")
    }

    /// The layer id of a bias tensor name, if it is one.
    pub fn layer_of(name: &str) -> Option<usize> {
        name.strip_prefix("model.layers.")?
            .strip_suffix(".mlp.gate.e_score_correction_bias")?
            .parse()
            .ok()
    }

    /// MoE layer ids, ascending.
    pub fn layer_ids(&self) -> &[usize] {
        &self.layers
    }

    /// One layer's bias.
    pub fn get(&self, layer: usize) -> Option<&[f32]> {
        self.layers
            .iter()
            .position(|&l| l == layer)
            .map(|i| self.values[i].as_slice())
    }

    /// One layer's bias, mutable.
    pub fn get_mut(&mut self, layer: usize) -> Option<&mut [f32]> {
        self.layers
            .iter()
            .position(|&l| l == layer)
            .map(|i| self.values[i].as_mut_slice())
    }

    /// Iterates (layer id, bias).
    pub fn iter(&self) -> impl Iterator<Item = (usize, &[f32])> {
        self.layers
            .iter()
            .copied()
            .zip(self.values.iter().map(|v| v.as_slice()))
    }
}

/// FNV-1a hash of a byte string (seeds per-tensor random streams).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// A deterministic standard-normal stream (splitmix64 + Box–Muller).
pub struct Normal {
    state: u64,
    spare: Option<f64>,
}

impl Normal {
    /// A stream seeded by `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed,
            spare: None,
        }
    }

    /// The next uniform u64.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }

    /// A uniform value in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// The next N(0, 1) sample.
    pub fn sample(&mut self) -> f64 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let u1 = self.uniform();
        let u2 = self.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let th = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some(r * th.sin());
        r * th.cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden/v3-tiny")
    }

    #[test]
    fn layout_counts_match_arch() {
        for name in ["tiny", "micro"] {
            let c = ModelConfig::preset(name).unwrap();
            let p = ParamStore::<f32>::zeros(&c);
            assert_eq!(p.numel() as u64, c.trainable_params(), "{name}");
            let g = p.zeros_like();
            assert_eq!(g.entries(), p.entries());
        }
    }

    #[test]
    fn stage_init_equals_whole_model_init() {
        let c = ModelConfig::preset("micro").unwrap();
        let whole = ParamStore::<f32>::init(&c, 7);
        let spec = StageSpec {
            layers: 1..2,
            first: false,
            last: true,
        };
        let mut st = ParamStore::<f32>::zeros_for_stage(&c, &spec);
        st.init_values(&c, 7);
        assert!(
            st.get("model.embed_tokens.weight").is_some(),
            "last stage with MTP holds the embedding"
        );
        for (name, _, vals) in st.iter() {
            assert_eq!(vals, whole.get(name).unwrap(), "{name}");
        }
        let w = whole
            .get("model.layers.0.self_attn.q_a_proj.weight")
            .unwrap();
        let std = (w.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        assert!((std - 0.1).abs() < 0.02, "{std}");
        assert!(
            whole
                .get("model.norm.weight")
                .unwrap()
                .iter()
                .all(|&x| x == 1.0)
        );
    }

    #[test]
    fn loads_the_golden_directory() {
        let (c, p, b) = ParamStore::load_hf_dir(golden_dir()).unwrap();
        assert_eq!(c.num_hidden_layers, 4);
        assert_eq!(p.numel() as u64, 4_972_992);
        assert_eq!(b.layer_ids(), &[1, 2, 3, 4]);
        assert!(b.get(1).unwrap().iter().any(|&x| x != 0.0));
        assert_eq!(
            p.shape("model.layers.4.eh_proj.weight").unwrap(),
            &[256, 512]
        );
        let mut stage = ParamStore::<f32>::zeros_for_stage(
            &c,
            &StageSpec {
                layers: 2..3,
                first: false,
                last: false,
            },
        );
        stage.load_safetensors_dir(golden_dir()).unwrap();
        assert_eq!(
            stage.get("model.layers.2.mlp.gate.weight"),
            p.get("model.layers.2.mlp.gate.weight")
        );
    }
}
