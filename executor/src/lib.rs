//! The pipeline executor: what a worker's compute thread runs each step. It walks the op list the
//! coordinator assigned to its pipeline rank (a [`plan::schedule::Schedule`] row), calling the
//! stage compute for forwards, backwards, deferred weight gradients and overlapped pairs, and the
//! data plane for the listed sends and receives; then the compute's step-end hook reduces
//! gradients and steps the optimizer.
//!
//! # Layout
//! - [`run`]: [`StageCompute`] (the compute interface), [`run_step`] and the step report.
//! - [`simulated`]: the `simulated` device kind (a clearly named test mode): ops take the time of a
//!   cost table, payloads are placeholders of the real byte sizes, the data plane is real.
//! - [`inprocess`]: every rank of a pipeline × data job on threads of this process (tests, benches).
//! - [`model_compute`]: the real model's stages (fp32 micro/tiny) behind [`StageCompute`], with the
//!   DualPipe mirror-stage gradient sum, the tied-embedding sum, ZeRO-1 data parallelism and
//!   expert parallelism inside each pipeline position.
//! - [`expert_exchange`]: the model's expert all-to-all ([`model::exchange::ExpertExchange`]) over
//!   the data plane.
//!
//! # Invariants
//! - Synchronous: no async runtime. A compute thread per device calls [`run_step`]; the async
//!   worker daemon talks to that thread over channels, so neither blocks the other.
//! - Every receive has a timeout; a failed step's error names the rank, the op and the peer.

mod error;
pub mod expert_exchange;
pub mod inprocess;
pub mod model_compute;
pub mod run;
pub mod simulated;

pub use error::{ComputeError, ExecError, NonFiniteGradNorm, Result};
pub use run::{
    OpTime, OpTimings, Produced, RankContext, StageCompute, StepReport, Timeouts, run_step,
    transfer_tag,
};
pub use simulated::{CostTable, SimGradSync, SimStepOutput, SimulatedCompute};
