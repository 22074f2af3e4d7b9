//! The DeepSeek-V3 layers, each with `forward`, `backward_input` (B: the gradient to its input, produced
//! first because the pipeline needs it) and deferred weight gradients (W).
//!
//! Invariant: B never writes a parameter gradient. Instead it emits [`WJob`]s carrying exactly what the
//! weight gradient needs (the cached input and the output gradient); running the jobs later, in emission
//! order, is the layer's `backward_weight`. Running each job right after it is emitted gives the fused
//! backward, and because a tensor's gradient receives the same additions in the same order either way,
//! the two are bitwise identical.

// Layer calls take explicit buffers and dimensions (llm.c style), so long argument lists are the API.
#![allow(clippy::too_many_arguments)]

pub mod decoder;
pub mod mla;
pub mod mlp;
pub mod moe;
pub mod norm;

use crate::Result;
use crate::params::{ParamId, ParamStore};
use crate::precision::{LinInput, Linear, Runtime};
use kernels::Real;
use std::sync::Arc;

/// One deferred weight-gradient computation.
#[derive(Debug, Clone)]
pub enum WJob<T: Real> {
    /// grads[lin.w] += dyᵀ · x.
    Linear {
        /// The projection.
        lin: Linear,
        /// Its cached input [m, n_in] (shared between projections that read the same activation).
        x: Arc<LinInput<T>>,
        /// Its output gradient [m, n_out].
        dy: Vec<T>,
    },
    /// grads[w] [d] += Σ_rows dy ⊙ x·rstd.
    Norm {
        /// The norm weight.
        w: ParamId,
        /// Norm input [n, d].
        x: Arc<Vec<T>>,
        /// Saved 1/rms per row [n].
        rstd: Arc<Vec<T>>,
        /// Output gradient [n, d].
        dy: Vec<T>,
        /// Width.
        d: usize,
    },
    /// grads[w] [V, d] row tokens[i] += dy[i] (in index order).
    Embedding {
        /// The table.
        w: ParamId,
        /// Token ids [n].
        tokens: Arc<Vec<u32>>,
        /// Output gradient [n, d].
        dy: Vec<T>,
        /// Width.
        d: usize,
    },
}

impl<T: Real> WJob<T> {
    /// Adds this job's contribution to `grads`.
    pub fn run(&self, rt: &Runtime, grads: &mut ParamStore<T>) -> Result<()> {
        match self {
            WJob::Linear { lin, x, dy } => lin.backward_weight(rt, grads, dy, x),
            WJob::Norm { w, x, rstd, dy, d } => {
                let n = rstd.len();
                kernels::rmsnorm_backward_weight(grads.slice_mut(*w), dy, x, rstd, n, *d)?;
                Ok(())
            }
            WJob::Embedding { w, tokens, dy, d } => {
                let g = grads.slice_mut(*w);
                for (i, &t) in tokens.iter().enumerate() {
                    let row = &mut g[t as usize * d..(t as usize + 1) * d];
                    for (a, b) in row.iter_mut().zip(&dy[i * d..(i + 1) * d]) {
                        *a += *b;
                    }
                }
                Ok(())
            }
        }
    }
}

/// Where B sends its weight-gradient jobs: kept for a later W pass, or run at once (fused backward).
pub enum WSink<'a, T: Real> {
    /// Collect the jobs.
    Defer(&'a mut Vec<WJob<T>>),
    /// Run each job immediately into these gradients.
    Now(&'a Runtime, &'a mut ParamStore<T>),
}

impl<T: Real> WSink<'_, T> {
    /// Accepts one job.
    pub fn push(&mut self, job: WJob<T>) -> Result<()> {
        match self {
            WSink::Defer(v) => {
                v.push(job);
                Ok(())
            }
            WSink::Now(rt, g) => job.run(rt, g),
        }
    }
}

/// Runs deferred jobs in order (the W pass).
pub fn run_wjobs<T: Real>(rt: &Runtime, jobs: &[WJob<T>], grads: &mut ParamStore<T>) -> Result<()> {
    for j in jobs {
        j.run(rt, grads)?;
    }
    Ok(())
}

/// Looks up a parameter by its name under `prefix`.
pub(crate) fn pid<T: Real>(p: &ParamStore<T>, prefix: &str, name: &str) -> Result<ParamId> {
    p.require(&format!("{prefix}.{name}"))
}

/// Adds b into a elementwise.
pub(crate) fn add_into<T: Real>(a: &mut [T], b: &[T]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += *y;
    }
}
