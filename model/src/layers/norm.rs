//! RMSNorm and the token embedding as layers (forward, B, W-jobs).
//!
//! Invariant: norm statistics are computed in f64 and the saved state is the input plus 1/rms per row,
//! which is all the backward needs.

use super::{WJob, WSink};
use crate::Result;
use crate::params::{ParamId, ParamStore};
use kernels::{Accumulate, Real};
use std::sync::Arc;

/// y = w ⊙ x / sqrt(mean(x²) + eps) over rows of width `d`.
#[derive(Debug, Clone, Copy)]
pub struct RmsNorm {
    /// The weight [d].
    pub w: ParamId,
    /// Width.
    pub d: usize,
    /// Epsilon.
    pub eps: f64,
}

/// What an RMSNorm keeps for its backward.
#[derive(Debug, Clone)]
pub struct NormSaved<T: Real> {
    /// Input [n, d].
    pub x: Arc<Vec<T>>,
    /// 1/rms [n].
    pub rstd: Arc<Vec<T>>,
}

impl RmsNorm {
    /// Forward: x [n, d] → y [n, d].
    pub fn forward<T: Real>(&self, p: &ParamStore<T>, x: Vec<T>) -> Result<(Vec<T>, NormSaved<T>)> {
        let n = x.len() / self.d;
        let mut y = vec![T::ZERO; x.len()];
        let mut rstd = vec![T::ZERO; n];
        kernels::rmsnorm_forward(
            &mut y,
            &mut rstd,
            &x,
            p.slice(self.w),
            n,
            self.d,
            T::from_f64(self.eps),
        )?;
        Ok((
            y,
            NormSaved {
                x: Arc::new(x),
                rstd: Arc::new(rstd),
            },
        ))
    }

    /// B: dx [n, d] (overwrite or add) from dy [n, d]; emits the weight-gradient job (consuming dy).
    pub fn backward_input<T: Real>(
        &self,
        p: &ParamStore<T>,
        dx: &mut [T],
        acc: Accumulate,
        dy: Vec<T>,
        saved: &NormSaved<T>,
        sink: &mut WSink<'_, T>,
    ) -> Result<()> {
        let n = saved.rstd.len();
        let w = p.slice(self.w);
        match acc {
            Accumulate::Overwrite => {
                kernels::rmsnorm_backward_input(dx, &dy, &saved.x, w, &saved.rstd, n, self.d)?;
            }
            Accumulate::Add => {
                let mut part = vec![T::ZERO; dx.len()];
                kernels::rmsnorm_backward_input(
                    &mut part,
                    &dy,
                    &saved.x,
                    w,
                    &saved.rstd,
                    n,
                    self.d,
                )?;
                dx.iter_mut().zip(&part).for_each(|(a, &b)| *a += b);
            }
        }
        sink.push(WJob::Norm {
            w: self.w,
            x: saved.x.clone(),
            rstd: saved.rstd.clone(),
            dy,
            d: self.d,
        })
    }
}

/// Token embedding lookup h = Emb[tokens] (no scaling).
#[derive(Debug, Clone, Copy)]
pub struct Embedding {
    /// The table [V, d].
    pub w: ParamId,
    /// Vocabulary size.
    pub vocab: usize,
    /// Width.
    pub d: usize,
}

impl Embedding {
    /// Forward: tokens [n] → h [n, d]. Token ids must be < vocab (checked).
    pub fn forward<T: Real>(&self, p: &ParamStore<T>, tokens: &[u32]) -> Result<Vec<T>> {
        let w = p.slice(self.w);
        let mut h = Vec::with_capacity(tokens.len() * self.d);
        for (i, &t) in tokens.iter().enumerate() {
            if t as usize >= self.vocab {
                return Err(crate::ModelError::Input(format!(
                    "token id {t} at position {i} is outside the vocabulary (size {})",
                    self.vocab
                )));
            }
            h.extend_from_slice(&w[t as usize * self.d..(t as usize + 1) * self.d]);
        }
        Ok(h)
    }

    /// B has no input gradient; emits the scatter-add job for the table.
    pub fn backward<T: Real>(
        &self,
        tokens: Arc<Vec<u32>>,
        dy: Vec<T>,
        sink: &mut WSink<'_, T>,
    ) -> Result<()> {
        sink.push(WJob::Embedding {
            w: self.w,
            tokens,
            dy,
            d: self.d,
        })
    }
}
