//! The crate's one error type.
//!
//! Invariant: every error that ends a step names the rank, the position and text of the op that
//! failed, and (for transfers) the peer, so a failed step can be explained from the message alone.

/// An error raised by a [`crate::StageCompute`] implementation; the executor wraps it with the op.
pub type ComputeError = Box<dyn std::error::Error + Send + Sync>;

/// Everything that can fail while executing one step.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// A receive listed in the op list did not complete (timeout, lost peer, shutdown).
    #[error(
        "pipeline rank {rank}, step {step}, op {index} ({op}): waiting for pipeline rank {peer} (data-plane rank {plane_peer}): {source}"
    )]
    Recv {
        /// This pipeline rank.
        rank: u32,
        /// The training step.
        step: u64,
        /// Position of the op in the rank's list.
        index: usize,
        /// The op, as text.
        op: String,
        /// The pipeline rank the message was expected from.
        peer: u32,
        /// Its data-plane rank.
        plane_peer: usize,
        /// What the data plane reported.
        source: Box<comm::CommError>,
    },
    /// A send listed in the op list was refused by the data plane (lost peer, shutdown).
    #[error(
        "pipeline rank {rank}, step {step}, op {index} ({op}): sending to pipeline rank {peer} (data-plane rank {plane_peer}): {source}"
    )]
    Send {
        /// This pipeline rank.
        rank: u32,
        /// The training step.
        step: u64,
        /// Position of the op in the rank's list.
        index: usize,
        /// The op, as text.
        op: String,
        /// The pipeline rank the message was for.
        peer: u32,
        /// Its data-plane rank.
        plane_peer: usize,
        /// What the data plane reported.
        source: Box<comm::CommError>,
    },
    /// The stage compute failed on an op.
    #[error("pipeline rank {rank}, step {step}, op {index} ({op}): compute failed: {source}")]
    Compute {
        /// This pipeline rank.
        rank: u32,
        /// The training step.
        step: u64,
        /// Position of the op in the rank's list.
        index: usize,
        /// The op, as text.
        op: String,
        /// The compute's error.
        source: ComputeError,
    },
    /// The op list is inconsistent with what the rank has (a send of something never produced, a
    /// weight op out of FIFO order, a peer outside the pipeline, leftovers at the end of the step).
    #[error(
        "pipeline rank {rank}, step {step}, op {index} ({op}): the op list is inconsistent: {reason}"
    )]
    Schedule {
        /// This pipeline rank.
        rank: u32,
        /// The training step.
        step: u64,
        /// Position of the op (the list length for end-of-step checks).
        index: usize,
        /// The op, as text (`end of step` for end-of-step checks).
        op: String,
        /// What is wrong.
        reason: String,
    },
    /// The step-end hook (gradient reductions, optimizer) failed.
    #[error(
        "pipeline rank {rank}, step {step}: step end (reductions / optimizer) failed: {source}"
    )]
    StepEnd {
        /// This pipeline rank.
        rank: u32,
        /// The training step.
        step: u64,
        /// The compute's error.
        source: ComputeError,
    },
}

/// The gradient norm of a step was not finite (a NaN or an infinity reached the gradients): the
/// same inputs give it again, so a restart cannot help. Raised by the step end as a
/// [`ComputeError`]; [`ExecError::is_deterministic`] finds it.
#[derive(Debug, thiserror::Error)]
#[error("non-finite gradient norm at step {step}")]
pub struct NonFiniteGradNorm {
    /// The training step.
    pub step: u64,
}

impl ExecError {
    /// Whether the same inputs would fail the same way again (today: a [`NonFiniteGradNorm`]);
    /// transfers, timeouts and lost peers are not.
    pub fn is_deterministic(&self) -> bool {
        match self {
            ExecError::Compute { source, .. } | ExecError::StepEnd { source, .. } => {
                source.downcast_ref::<NonFiniteGradNorm>().is_some()
            }
            _ => false,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = ExecError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_non_finite_gradient_norm_is_deterministic() {
        let end = |source: ComputeError| ExecError::StepEnd {
            rank: 1,
            step: 3,
            source,
        };
        assert!(end(Box::new(NonFiniteGradNorm { step: 3 })).is_deterministic());
        assert!(!end("an all-reduce timed out".into()).is_deterministic());
        let compute = ExecError::Compute {
            rank: 0,
            step: 3,
            index: 4,
            op: "F0:1".into(),
            source: Box::new(NonFiniteGradNorm { step: 3 }),
        };
        assert!(compute.is_deterministic());
        let schedule = ExecError::Schedule {
            rank: 0,
            step: 3,
            index: 0,
            op: "end of step".into(),
            reason: "leftovers".into(),
        };
        assert!(!schedule.is_deterministic());
    }
}
