//! The SwiGLU feed-forward block y = down(silu(gate(x)) ⊙ up(x)), used for dense layers, each routed
//! expert and the (fused) shared expert.
//!
//! Invariant: the cached input is shared by the gate and up projections (one `LinInput`), and the saved
//! pre-activations g, u are enough to recompute the activation gradient exactly.

use super::{WJob, WSink, pid};
use crate::Result;
use crate::params::ParamStore;
use crate::precision::{LinInput, Linear, Runtime};
use kernels::{Accumulate, Real};
use std::sync::Arc;

/// One SwiGLU MLP of width `width` over model width `d`.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
    /// Hidden width.
    pub width: usize,
    /// Model width.
    pub d: usize,
}

/// What an MLP keeps for its backward.
#[derive(Debug, Clone)]
pub struct MlpSaved<T: Real> {
    x: Arc<LinInput<T>>,
    g: Vec<T>,
    u: Vec<T>,
    act: Arc<LinInput<T>>,
}

impl Mlp {
    /// Binds `{prefix}.gate_proj/up_proj/down_proj`.
    pub fn new<T: Real>(p: &ParamStore<T>, prefix: &str, d: usize, width: usize) -> Result<Self> {
        Ok(Self {
            gate: Linear::new(pid(p, prefix, "gate_proj.weight")?, width, d),
            up: Linear::new(pid(p, prefix, "up_proj.weight")?, width, d),
            down: Linear::new(pid(p, prefix, "down_proj.weight")?, d, width),
            width,
            d,
        })
    }

    /// Prepares the shared input cache of gate/up for x [m, d].
    pub fn input<T: Real>(&self, rt: &Runtime, x: Vec<T>, m: usize) -> Result<Arc<LinInput<T>>> {
        Ok(Arc::new(self.gate.input(rt, x, m)?))
    }

    /// Forward: x [m, d] → y [m, d].
    pub fn forward<T: Real>(
        &self,
        rt: &Runtime,
        p: &ParamStore<T>,
        x: Arc<LinInput<T>>,
    ) -> Result<(Vec<T>, MlpSaved<T>)> {
        let m = x.rows();
        let g = self.gate.forward(rt, p, &x)?;
        let u = self.up.forward(rt, p, &x)?;
        let mut act = vec![T::ZERO; m * self.width];
        kernels::swiglu_forward(&mut act, &g, &u, m * self.width)?;
        let act = Arc::new(self.down.input(rt, act, m)?);
        let y = self.down.forward(rt, p, &act)?;
        Ok((y, MlpSaved { x, g, u, act }))
    }

    /// B: dx [m, d] (overwrite or add) from dy [m, d]; emits the three W-jobs.
    pub fn backward_input<T: Real>(
        &self,
        rt: &Runtime,
        p: &ParamStore<T>,
        dx: &mut [T],
        acc: Accumulate,
        dy: Vec<T>,
        s: MlpSaved<T>,
        sink: &mut WSink<'_, T>,
    ) -> Result<()> {
        let m = s.x.rows();
        let mut dact = vec![T::ZERO; m * self.width];
        self.down
            .backward_input(rt, p, &mut dact, &dy, m, Accumulate::Overwrite)?;
        sink.push(WJob::Linear {
            lin: self.down,
            x: s.act,
            dy,
        })?;
        let mut dg = vec![T::ZERO; m * self.width];
        let mut du = vec![T::ZERO; m * self.width];
        kernels::swiglu_backward(&mut dg, &mut du, &dact, &s.g, &s.u, m * self.width)?;
        self.gate.backward_input(rt, p, dx, &dg, m, acc)?;
        self.up.backward_input(rt, p, dx, &du, m, Accumulate::Add)?;
        sink.push(WJob::Linear {
            lin: self.gate,
            x: s.x.clone(),
            dy: dg,
        })?;
        sink.push(WJob::Linear {
            lin: self.up,
            x: s.x,
            dy: du,
        })
    }
}
