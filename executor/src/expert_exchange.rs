//! [`PlaneExchange`]: the model's [`ExpertExchange`] over the data plane, for one stage slot of one
//! rank of an expert-parallel group.
//!
//! A model exchange key (micro-batch, layer, phase) becomes the data-plane tag
//! (step, dispatch or combine, forward or backward, micro-batch, `dir << 16 | layer`) of an
//! all-to-all-v over the group, so the two chunk directions of a rank (DualPipe's two slots, whose
//! overlapped pairs run at once) and successive steps never share a key, and the group id in the
//! message key keeps different expert-parallel groups apart.
//!
//! Invariants: the plane is attached once, before the first step, and is the plane of this rank (its
//! rank is a member of the group); every exchange waits at most the configured timeout and fails with
//! the data plane's reason (peer, key, elapsed time) instead of hanging.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use comm::codec::{f32_from_bytes, f32_to_bytes};
use comm::{DataPlane, Group, Kind, Tag};
use model::ModelError;
use model::exchange::{ExchangeKey, ExpertExchange, Phase};

/// What every slot's exchange of one rank shares: the plane (attached after construction) and the
/// current step.
#[derive(Default)]
pub struct ExchangeShared {
    plane: OnceLock<(Arc<dyn DataPlane>, Duration)>,
    step: AtomicU64,
}

impl ExchangeShared {
    /// Attaches the data plane and the per-exchange timeout; fails if one is already attached.
    pub fn attach(&self, plane: Arc<dyn DataPlane>, timeout: Duration) -> Result<(), String> {
        self.plane
            .set((plane, timeout))
            .map_err(|_| "an expert-exchange data plane is already attached".to_string())
    }

    /// Whether a plane is attached.
    pub fn attached(&self) -> bool {
        self.plane.get().is_some()
    }

    /// Sets the step that the following exchanges belong to.
    pub fn set_step(&self, step: u64) {
        self.step.store(step, Ordering::SeqCst);
    }
}

/// One stage slot's exchange inside its expert-parallel group.
pub struct PlaneExchange {
    shared: Arc<ExchangeShared>,
    group: Group,
    index: usize,
    dir: u8,
}

impl PlaneExchange {
    /// The exchange of chunk direction `dir` for the member at group position `index` of `group`.
    pub fn new(shared: Arc<ExchangeShared>, group: Group, index: usize, dir: u8) -> Self {
        Self {
            shared,
            group,
            index,
            dir,
        }
    }
}

impl ExpertExchange for PlaneExchange {
    fn size(&self) -> usize {
        self.group.len()
    }

    fn index(&self) -> usize {
        self.index
    }

    fn all_to_all(&self, key: ExchangeKey, rows: Vec<Vec<f32>>) -> model::Result<Vec<Vec<f32>>> {
        let (plane, timeout) = self.shared.plane.get().ok_or_else(|| {
            ModelError::Exchange(
                "expert parallelism needs a data plane: call ModelCompute::set_expert_plane".into(),
            )
        })?;
        let step = self.shared.step.load(Ordering::SeqCst);
        let (kind, forward) = match key.phase {
            Phase::Dispatch => (Kind::Dispatch, true),
            Phase::Combine => (Kind::Combine, true),
            Phase::GradDispatch => (Kind::Dispatch, false),
            Phase::GradCombine => (Kind::Combine, false),
        };
        let micro = u32::try_from(key.micro_batch).map_err(|_| {
            ModelError::Exchange(format!(
                "micro-batch id {} exceeds 32 bits",
                key.micro_batch
            ))
        })?;
        let base = Tag::new(step, kind);
        let tag = if forward {
            base.forward()
        } else {
            base.backward()
        }
        .micro_batch(micro)
        .chunk(u32::from(self.dir) << 16 | key.layer);
        let payloads = rows.iter().map(|r| f32_to_bytes(r)).collect();
        let recv = plane
            .all_to_all_v(&self.group, tag, payloads, *timeout)
            .map_err(|e| ModelError::Exchange(e.to_string()))?;
        recv.into_iter()
            .enumerate()
            .map(|(i, b)| {
                f32_from_bytes(&b).map_err(|e| {
                    ModelError::Exchange(format!(
                        "member {i} of the expert group sent a malformed payload: {e}"
                    ))
                })
            })
            .collect()
    }
}
