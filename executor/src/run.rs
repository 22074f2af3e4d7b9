//! The executor core: [`run_step`] walks one pipeline rank's op list for one training step, calling
//! a [`StageCompute`] for the compute ops and the [`DataPlane`] for the listed sends and receives,
//! then runs the compute's step-end hook (gradient reductions, optimizer).
//!
//! Invariants:
//! - Ops run strictly in list order on the calling thread; nothing is reordered. Sends only
//!   enqueue (the data plane's sender threads move the bytes while the next ops compute), and
//!   messages are stored by the plane as they arrive, so a receive that is listed before a compute
//!   op has, in effect, been posted since the step began: it blocks only if its bytes are not there
//!   yet, and never longer than [`Timeouts::recv`].
//! - Every payload a compute op produces is consumed exactly once in the step: by a listed send,
//!   by the other chunk of this rank (DualPipeV's local turn-around), or not produced at all (the
//!   loss end of a direction). Deferred weight gradients run in FIFO order. Anything left over at
//!   the end of the step is a schedule error, never silently dropped.
//! - Message tags carry (step, activation or gradient, micro-batch, chunk direction), so traffic of
//!   different steps or chunks cannot be confused.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use comm::{DataPlane, Kind, Tag};
use plan::schedule::{Chunk, Op, Payload, Transfer};

use crate::error::{ComputeError, ExecError, Result};

/// What a compute op hands on: the bytes for the next stage (activation) or the previous stage
/// (input gradient), or `None` where the direction ends (loss on the last stage, nothing before
/// the first).
pub type Produced = Option<Vec<u8>>;

/// The computation of one pipeline rank's model chunks, driven op by op by [`run_step`].
///
/// A chunk's `dir` names the stage slot on this rank (DualPipe: slot 0 = stage `r`, slot 1 =
/// stage `P − 1 − r`; DualPipeV: stage `r` and `2P − 1 − r`; 1F1B: slot 0 only) and `mb` is the
/// global micro-batch. Payloads are opaque bytes: the implementation decides their encoding.
pub trait StageCompute {
    /// What the step-end hook returns (loss terms, tokens, …).
    type StepOutput;

    /// Called before the first op of a step (zero gradients, load the step's batches).
    fn begin_step(&mut self, step: u64) -> std::result::Result<(), ComputeError>;

    /// Forward of `chunk`. `input` is the previous stage's activation, or `None` at the entry of
    /// the direction (the first stage reads its tokens). Returns the activation for the next stage,
    /// or `None` on the last stage of the direction (which computes the loss).
    fn forward(
        &mut self,
        chunk: Chunk,
        input: Option<Vec<u8>>,
    ) -> std::result::Result<Produced, ComputeError>;

    /// Full backward of `chunk` (input and weight gradients). `grad` is the next stage's input
    /// gradient, or `None` on the last stage (seeded from the loss). Returns the gradient for the
    /// previous stage, or `None` on the first stage.
    fn backward(
        &mut self,
        chunk: Chunk,
        grad: Option<Vec<u8>>,
    ) -> std::result::Result<Produced, ComputeError>;

    /// Backward for inputs only; the weight-gradient work is kept until
    /// [`StageCompute::backward_weight`] of the same chunk.
    fn backward_input(
        &mut self,
        chunk: Chunk,
        grad: Option<Vec<u8>>,
    ) -> std::result::Result<Produced, ComputeError>;

    /// Runs the deferred weight-gradient work of `chunk`.
    fn backward_weight(&mut self, chunk: Chunk) -> std::result::Result<(), ComputeError>;

    /// An overlapped pair: forward of `f` and full backward of `b`. The default runs them one after
    /// the other (their transfers already overlap through the data plane's threads); an
    /// implementation with component-level interleaving overrides it.
    fn forward_backward(
        &mut self,
        f: Chunk,
        input: Option<Vec<u8>>,
        b: Chunk,
        grad: Option<Vec<u8>>,
    ) -> std::result::Result<(Produced, Produced), ComputeError> {
        let out = self.forward(f, input)?;
        let grad_in = self.backward(b, grad)?;
        Ok((out, grad_in))
    }

    /// Step-end hook after the last op: gradient reductions (mirror-stage sum, data-parallel
    /// reduce-scatter / all-gather) and the optimizer, through `plane`, each wait bounded by
    /// `timeout`.
    fn finish_step(
        &mut self,
        step: u64,
        plane: &dyn DataPlane,
        timeout: Duration,
    ) -> std::result::Result<Self::StepOutput, ComputeError>;
}

/// Where this rank sits: its pipeline rank and how pipeline ranks map to data-plane ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankContext {
    /// This rank's pipeline rank (index into the schedule's op lists).
    pub pipe_rank: u32,
    /// `peers[p]` is the data-plane rank of pipeline rank `p` in this rank's pipeline replica.
    pub peers: Vec<usize>,
}

/// Wait limits of one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Longest wait of one listed receive.
    pub recv: Duration,
    /// Budget of each step-end collective.
    pub collective: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            recv: Duration::from_secs(60),
            collective: Duration::from_secs(120),
        }
    }
}

/// Count and wall time of one kind of op in a step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OpTime {
    /// How many ops of this kind ran.
    pub count: u32,
    /// Seconds spent in them.
    pub seconds: f64,
}

impl OpTime {
    fn add(&mut self, since: Instant) {
        self.count += 1;
        self.seconds += since.elapsed().as_secs_f64();
    }
}

/// Per-op-kind timings of one step on one rank.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OpTimings {
    /// Stand-alone forwards.
    pub forward: OpTime,
    /// Full backwards.
    pub backward: OpTime,
    /// Backwards for inputs only.
    pub backward_input: OpTime,
    /// Deferred weight-gradient ops.
    pub weight: OpTime,
    /// Overlapped forward+backward pairs.
    pub overlapped: OpTime,
    /// Sends (time to hand the bytes to the plane).
    pub send: OpTime,
    /// Receives (time blocked waiting for the bytes).
    pub recv: OpTime,
    /// The step-end hook.
    pub step_end: OpTime,
}

impl OpTimings {
    /// Seconds spent computing (every compute op).
    pub fn compute_seconds(&self) -> f64 {
        self.forward.seconds
            + self.backward.seconds
            + self.backward_input.seconds
            + self.weight.seconds
            + self.overlapped.seconds
    }
}

/// What one rank did in one step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport<O> {
    /// The step.
    pub step: u64,
    /// Seconds from the start of the step to the end of its last op (before the step-end hook).
    pub pipeline_s: f64,
    /// Seconds of the whole step, step-end hook included.
    pub wall_s: f64,
    /// Per-op-kind timings.
    pub timings: OpTimings,
    /// What the compute's step-end hook returned.
    pub output: O,
}

/// The tag of a pipeline transfer: step, activation (forward) or gradient (backward), micro-batch,
/// and the chunk direction that produced it (the `chunk` field).
pub fn transfer_tag(step: u64, t: &Transfer) -> Tag {
    let tag = match t.payload {
        Payload::Activation => Tag::new(step, Kind::Activation).forward(),
        Payload::Gradient => Tag::new(step, Kind::Gradient).backward(),
    };
    tag.micro_batch(t.chunk.mb).chunk(u32::from(t.chunk.dir))
}

/// Per-step bookkeeping of payloads in flight on this rank.
#[derive(Default)]
struct Buffers {
    /// Received activations, by the chunk that will consume them.
    act_in: HashMap<Chunk, Vec<u8>>,
    /// Received output gradients, by the chunk that will consume them.
    grad_in: HashMap<Chunk, Vec<u8>>,
    /// Produced activations waiting for their send or for the local turn-around.
    act_out: HashMap<Chunk, Vec<u8>>,
    /// Produced input gradients waiting for their send or for the local turn-around.
    grad_out: HashMap<Chunk, Vec<u8>>,
    /// Chunks whose weight gradients are deferred, oldest first.
    deferred: VecDeque<Chunk>,
}

impl Buffers {
    /// The input of a forward of `c`: received, handed over locally by the other chunk of this
    /// rank (DualPipeV turn-around), or none (entry of the direction).
    fn forward_input(&mut self, c: Chunk) -> Option<Vec<u8>> {
        if let Some(bytes) = self.act_in.remove(&c) {
            return Some(bytes);
        }
        let other = Chunk::new(c.dir ^ 1, c.mb);
        self.act_out.remove(&other)
    }

    /// The output gradient of a backward of `c`: received, handed over locally, or none (loss).
    fn backward_grad(&mut self, c: Chunk) -> Option<Vec<u8>> {
        if let Some(bytes) = self.grad_in.remove(&c) {
            return Some(bytes);
        }
        let other = Chunk::new(c.dir ^ 1, c.mb);
        self.grad_out.remove(&other)
    }

    fn leftovers(&self) -> Option<String> {
        let mut parts = Vec::new();
        let mut name = |what: &str, keys: Vec<&Chunk>| {
            if !keys.is_empty() {
                let mut v: Vec<String> = keys.iter().map(|c| c.to_string()).collect();
                v.sort();
                parts.push(format!("{what} {}", v.join(" ")));
            }
        };
        name(
            "unconsumed received activations",
            self.act_in.keys().collect(),
        );
        name(
            "unconsumed received gradients",
            self.grad_in.keys().collect(),
        );
        name("unsent activations", self.act_out.keys().collect());
        name("unsent gradients", self.grad_out.keys().collect());
        name("unrun weight gradients", self.deferred.iter().collect());
        if parts.is_empty() {
            None
        } else {
            Some(parts.join("; "))
        }
    }
}

/// Runs one step of one pipeline rank: `compute.begin_step`, every op of `ops` in order, then
/// `compute.finish_step`. Fails on the first error with a reason naming the op (and the peer, for
/// transfers); a receive never waits longer than `timeouts.recv`.
pub fn run_step<C: StageCompute>(
    ops: &[Op],
    ctx: &RankContext,
    compute: &mut C,
    plane: &dyn DataPlane,
    step: u64,
    timeouts: &Timeouts,
) -> Result<StepReport<C::StepOutput>> {
    let rank = ctx.pipe_rank;
    let _span = tracing::debug_span!("executor", rank, step, ops = ops.len()).entered();
    let t0 = Instant::now();
    let mut times = OpTimings::default();
    let mut buf = Buffers::default();
    let compute_err = |index: usize, op: &Op, source: ComputeError| ExecError::Compute {
        rank,
        step,
        index,
        op: op.to_string(),
        source,
    };
    let schedule_err = |index: usize, op: &Op, reason: String| ExecError::Schedule {
        rank,
        step,
        index,
        op: op.to_string(),
        reason,
    };
    compute
        .begin_step(step)
        .map_err(|source| ExecError::StepEnd { rank, step, source })?;
    for (index, op) in ops.iter().enumerate() {
        let started = Instant::now();
        match *op {
            Op::Forward(c) => {
                let input = buf.forward_input(c);
                let out = compute
                    .forward(c, input)
                    .map_err(|e| compute_err(index, op, e))?;
                if let Some(bytes) = out {
                    buf.act_out.insert(c, bytes);
                }
                times.forward.add(started);
            }
            Op::Backward(c) => {
                let grad = buf.backward_grad(c);
                let out = compute
                    .backward(c, grad)
                    .map_err(|e| compute_err(index, op, e))?;
                if let Some(bytes) = out {
                    buf.grad_out.insert(c, bytes);
                }
                times.backward.add(started);
            }
            Op::BackwardInput(c) => {
                let grad = buf.backward_grad(c);
                let out = compute
                    .backward_input(c, grad)
                    .map_err(|e| compute_err(index, op, e))?;
                if let Some(bytes) = out {
                    buf.grad_out.insert(c, bytes);
                }
                buf.deferred.push_back(c);
                times.backward_input.add(started);
            }
            Op::Weight(c) => {
                match buf.deferred.pop_front() {
                    Some(oldest) if oldest == c => {}
                    other => {
                        let oldest = other.map_or_else(|| "none".to_string(), |o| o.to_string());
                        return Err(schedule_err(
                            index,
                            op,
                            format!("the oldest deferred weight gradient is {oldest}"),
                        ));
                    }
                }
                compute
                    .backward_weight(c)
                    .map_err(|e| compute_err(index, op, e))?;
                times.weight.add(started);
            }
            Op::ForwardBackward { f, b } => {
                let input = buf.forward_input(f);
                let grad = buf.backward_grad(b);
                let (out, grad_out) = compute
                    .forward_backward(f, input, b, grad)
                    .map_err(|e| compute_err(index, op, e))?;
                if let Some(bytes) = out {
                    buf.act_out.insert(f, bytes);
                }
                if let Some(bytes) = grad_out {
                    buf.grad_out.insert(b, bytes);
                }
                times.overlapped.add(started);
            }
            Op::Send(t) => {
                let plane_peer = peer_of(ctx, t.peer).ok_or_else(|| {
                    schedule_err(
                        index,
                        op,
                        format!("pipeline rank {} is outside the pipeline", t.peer),
                    )
                })?;
                let produced = match t.payload {
                    Payload::Activation => buf.act_out.remove(&t.chunk),
                    Payload::Gradient => buf.grad_out.remove(&t.chunk),
                };
                let bytes = produced.ok_or_else(|| {
                    schedule_err(
                        index,
                        op,
                        format!(
                            "no {} of {} was produced before its send",
                            t.payload.name(),
                            t.chunk
                        ),
                    )
                })?;
                plane
                    .send(plane_peer, transfer_tag(step, &t), bytes)
                    .map_err(|source| ExecError::Send {
                        rank,
                        step,
                        index,
                        op: op.to_string(),
                        peer: t.peer,
                        plane_peer,
                        source: Box::new(source),
                    })?;
                times.send.add(started);
            }
            Op::Recv(t) => {
                let plane_peer = peer_of(ctx, t.peer).ok_or_else(|| {
                    schedule_err(
                        index,
                        op,
                        format!("pipeline rank {} is outside the pipeline", t.peer),
                    )
                })?;
                let bytes = plane
                    .recv(plane_peer, transfer_tag(step, &t), timeouts.recv)
                    .map_err(|source| ExecError::Recv {
                        rank,
                        step,
                        index,
                        op: op.to_string(),
                        peer: t.peer,
                        plane_peer,
                        source: Box::new(source),
                    })?;
                let slot = match t.payload {
                    Payload::Activation => &mut buf.act_in,
                    Payload::Gradient => &mut buf.grad_in,
                };
                if slot.insert(t.chunk, bytes).is_some() {
                    return Err(schedule_err(
                        index,
                        op,
                        format!("{} of {} was received twice", t.payload.name(), t.chunk),
                    ));
                }
                times.recv.add(started);
            }
        }
    }
    if let Some(what) = buf.leftovers() {
        return Err(ExecError::Schedule {
            rank,
            step,
            index: ops.len(),
            op: "end of step".into(),
            reason: what,
        });
    }
    let pipeline_s = t0.elapsed().as_secs_f64();
    let end_start = Instant::now();
    let output = compute
        .finish_step(step, plane, timeouts.collective)
        .map_err(|source| ExecError::StepEnd { rank, step, source })?;
    times.step_end.add(end_start);
    Ok(StepReport {
        step,
        pipeline_s,
        wall_s: t0.elapsed().as_secs_f64(),
        timings: times,
        output,
    })
}

fn peer_of(ctx: &RankContext, pipe_rank: u32) -> Option<usize> {
    ctx.peers.get(pipe_rank as usize).copied()
}
