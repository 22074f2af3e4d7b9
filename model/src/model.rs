//! The whole model in one process: a one-stage [`Stage`] over every layer, plus the reference step that
//! `moetrain step` runs and the safetensors dump/read helpers the golden tests compare with.
//!
//! Invariant: the dump uses exactly the names, shapes and meaning of `shared/golden/v3-tiny`
//! (`reference.safetensors`: loss terms, logits, hidden states, MTP outputs, routing; `grads.safetensors`:
//! d(total loss)/d(parameter) under the parameter names), so a golden test is a file comparison.

// Layer calls take explicit buffers and dimensions (llm.c style), so long argument lists are the API.
#![allow(clippy::too_many_arguments)]

use crate::loss::{LossTerms, LossWeights};
use crate::params::{ParamStore, RoutingBias, StageSpec};
use crate::precision::Runtime;
use crate::stage::{MicroBatch, Stage, Trace};
use crate::{ModelConfig, ModelError, Result};
use kernels::Real;
use std::collections::BTreeMap;
use std::path::Path;

/// The outcome of one forward + backward over a batch.
#[derive(Debug, Clone)]
pub struct StepResult<T: Real = f32> {
    /// Loss terms.
    pub loss: LossTerms,
    /// Recorded tensors (hidden states, logits, routing).
    pub trace: Trace,
    /// Parameter gradients of the total loss.
    pub grads: ParamStore<T>,
    /// Per-layer expert assignment counts.
    pub expert_load: Vec<(usize, Vec<u64>)>,
}

/// One forward and fused backward of the whole model over tokens [b, t], with tracing on.
pub fn reference_step<T: Real>(
    rt: &Runtime,
    config: &ModelConfig,
    params: &ParamStore<T>,
    bias: &RoutingBias,
    tokens: &[u32],
    b: usize,
    t: usize,
    weights: LossWeights,
) -> Result<StepResult<T>> {
    let mut stage = Stage::new(config, StageSpec::whole(config), params, weights)?;
    stage.set_trace(true);
    let mb = MicroBatch {
        id: 0,
        tokens,
        b,
        t,
        loss_scale: 1.0,
    };
    let out = stage.forward(rt, params, bias, &mb, None)?;
    let mut grads = params.zeros_like();
    stage.backward(rt, params, 0, None, &mut grads)?;
    Ok(StepResult {
        loss: out.loss,
        trace: stage.take_trace(),
        grads,
        expert_load: stage.take_expert_load(),
    })
}

fn st_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Safetensors {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Writes `reference.safetensors` (trace + `tokens`) and `grads.safetensors` into `dir`.
pub fn write_dump<T: Real>(
    dir: &Path,
    res: &StepResult<T>,
    tokens: &[u32],
    b: usize,
    t: usize,
) -> Result<()> {
    use safetensors::Dtype;
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let mut blobs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, shape, v) in &res.trace.floats {
        blobs.push((
            name.clone(),
            Dtype::F32,
            shape.clone(),
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    for (name, shape, v) in &res.trace.ints {
        blobs.push((
            name.clone(),
            Dtype::I64,
            shape.clone(),
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    let tok: Vec<u8> = tokens
        .iter()
        .flat_map(|&x| (x as i64).to_le_bytes())
        .collect();
    blobs.push(("tokens".into(), Dtype::I64, vec![b, t], tok));
    write_blobs(&dir.join("reference.safetensors"), &blobs)?;
    let grads: Vec<_> = res
        .grads
        .iter()
        .map(|(name, shape, v)| {
            (
                name.to_string(),
                Dtype::F32,
                shape.to_vec(),
                v.iter()
                    .flat_map(|x| (x.to_f64() as f32).to_le_bytes())
                    .collect(),
            )
        })
        .collect();
    write_blobs(&dir.join("grads.safetensors"), &grads)
}

/// Writes named raw tensors to one safetensors file (metadata `dtype: float32`, as the golden files).
pub fn write_blobs(
    path: &Path,
    blobs: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)],
) -> Result<()> {
    let mut views = Vec::with_capacity(blobs.len());
    for (name, dt, shape, bytes) in blobs {
        let v = safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes)
            .map_err(|e| st_err(path, e))?;
        views.push((name.clone(), v));
    }
    let meta = std::collections::HashMap::from([("dtype".to_string(), "float32".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| st_err(path, e))
}

/// Tensors by name: (shape, values as f64).
pub type Tensors = BTreeMap<String, (Vec<usize>, Vec<f64>)>;

/// Reads every tensor of a safetensors file as f64 (F32, F64, BF16, F16, I64, I32, U8), keyed by name.
pub fn read_tensors(path: &Path) -> Result<Tensors> {
    use safetensors::Dtype;
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| st_err(path, e))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.iter() {
        let d = view.data();
        let vals: Vec<f64> = match view.dtype() {
            Dtype::F64 => d
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            Dtype::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f64)
                .collect(),
            Dtype::I32 => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as f64)
                .collect(),
            Dtype::U8 => d.iter().map(|&x| x as f64).collect(),
            _ => crate::params::tensor_to_f32(&path.display().to_string(), name, &view)?
                .into_iter()
                .map(|x| x as f64)
                .collect(),
        };
        out.insert(name.to_string(), (view.shape().to_vec(), vals));
    }
    Ok(out)
}

/// ‖a − b‖ / ‖b‖ (with ‖b‖ floored at 1e-30).
pub fn normwise_rel(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-60)).sqrt()
}
