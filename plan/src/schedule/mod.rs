//! Pipeline schedules as data: one ordered op list per pipeline rank, produced by pure generators
//! (`dualpipe`, `dualpipev`, `one_f_one_b`) and consumed by the worker executor, the simulator, the
//! SVG renderer and the planner.
//!
//! Invariant: an op list is walked strictly in order. Compute ops never wait: everything they need
//! was produced by an earlier op on the same rank or delivered by an earlier `Recv`. `Send` never
//! blocks (the data plane buffers it); `Recv` blocks until the matching message has arrived. The
//! messages from one rank to one peer are sent in exactly the order the peer receives them, so an
//! executor can match them by position on a FIFO channel per (sender, receiver) pair. Consecutive
//! `Send`/`Recv` ops form one batch (DualPipe posts them as one `batch_isend_irecv` group); sends of a
//! batch are listed before its receives.

pub mod dualpipe;
pub mod dualpipev;
pub mod one_f_one_b;

mod emit;

use std::collections::VecDeque;
use std::fmt;

pub use dualpipe::dualpipe;
pub use dualpipev::dualpipev;
pub use one_f_one_b::one_f_one_b;

/// The work of one micro-batch on one of a rank's model chunks.
///
/// `dir` names the chunk: DualPipe 0 = the direction entered at rank 0 (stage `r` on rank `r`),
/// 1 = the direction entered at rank `P − 1` (stage `P − 1 − r`); DualPipeV 0 = the first leg of the
/// V (stage `r`), 1 = the second leg (stage `2P − 1 − r`); 1F1B always 0. `mb` is the global
/// micro-batch index (DualPipe: direction 1 holds `N/2 .. N`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Chunk {
    /// Which of the rank's chunks (see the type's doc).
    pub dir: u8,
    /// Global micro-batch index.
    pub mb: u32,
}

impl Chunk {
    /// A chunk of direction `dir` for micro-batch `mb`.
    pub fn new(dir: u8, mb: u32) -> Self {
        Self { dir, mb }
    }
}

impl fmt::Display for Chunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.dir, self.mb)
    }
}

/// What a point-to-point message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Payload {
    /// A stage's output activations, sent downstream after a forward.
    Activation,
    /// The gradient with respect to a stage's input, sent upstream after a backward.
    Gradient,
}

impl Payload {
    /// Short lower-case name used in the text and JSON forms.
    pub fn name(self) -> &'static str {
        match self {
            Payload::Activation => "activation",
            Payload::Gradient => "gradient",
        }
    }
}

/// One point-to-point message as seen from the rank whose op list holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Transfer {
    /// The other pipeline rank (receiver of a `Send`, sender of a `Recv`).
    pub peer: u32,
    /// Activation or gradient.
    pub payload: Payload,
    /// Whose activation or gradient, named by the chunk that produced it on the sender.
    pub chunk: Chunk,
}

/// One entry of a rank's op list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Forward of a chunk. Shape: input `[mb, seq, hidden]` → output `[mb, seq, hidden]` (or the loss
    /// on the last stage of a direction).
    Forward(Chunk),
    /// Full backward: input and weight gradients together; frees the chunk's activations.
    Backward(Chunk),
    /// Backward for inputs only: the weight-gradient work is pushed as one entry on the rank's FIFO
    /// weight-gradient store and the chunk's saved inputs stay alive until that entry runs.
    BackwardInput(Chunk),
    /// Pop and run the oldest entry of the weight-gradient store; `chunk` names it for display.
    Weight(Chunk),
    /// A forward of `f` and a full backward of `b` executed as one overlapped pair (one chunk's
    /// communication hides behind the other's compute).
    ForwardBackward {
        /// The forward half.
        f: Chunk,
        /// The backward half (a full backward).
        b: Chunk,
    },
    /// Post a message to `peer`; never blocks.
    Send(Transfer),
    /// Wait until the message from `peer` has arrived.
    Recv(Transfer),
}

impl Op {
    /// Whether this op is computation (as opposed to a send or receive).
    pub fn is_compute(&self) -> bool {
        !matches!(self, Op::Send(_) | Op::Recv(_))
    }

    /// The compact token of a compute op (`F0:3`, `B1:5`, `I0:2`, `W0:2`, `F0:3+B1:5`), or `None`
    /// for sends and receives.
    pub fn token(&self) -> Option<String> {
        Some(match self {
            Op::Forward(c) => format!("F{c}"),
            Op::Backward(c) => format!("B{c}"),
            Op::BackwardInput(c) => format!("I{c}"),
            Op::Weight(c) => format!("W{c}"),
            Op::ForwardBackward { f, b } => format!("F{f}+B{b}"),
            Op::Send(_) | Op::Recv(_) => return None,
        })
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Send(t) => write!(f, "send {} {} to {}", t.payload.name(), t.chunk, t.peer),
            Op::Recv(t) => write!(f, "recv {} {} from {}", t.payload.name(), t.chunk, t.peer),
            other => f.write_str(&other.token().unwrap_or_default()),
        }
    }
}

/// Which generator produced a schedule; it fixes the stage layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScheduleKind {
    /// DeepSeek's bidirectional DualPipe: `P` stages, each held by two ranks.
    DualPipe,
    /// DualPipeV ("cut-in-half"): `2P` stages in a V, each held by one rank.
    DualPipeV,
    /// Classic one-forward-one-backward (PipeDream-flush): `P` stages.
    OneFOneB,
}

impl ScheduleKind {
    /// Every kind, in the order the planner shows them.
    pub const ALL: [ScheduleKind; 3] = [
        ScheduleKind::DualPipe,
        ScheduleKind::DualPipeV,
        ScheduleKind::OneFOneB,
    ];

    /// The name used on the command line and in manifests.
    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::DualPipe => "dualpipe",
            ScheduleKind::DualPipeV => "dualpipev",
            ScheduleKind::OneFOneB => "1f1b",
        }
    }

    /// Parses [`ScheduleKind::name`] (also accepts `one_f_one_b`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "dualpipe" => Some(ScheduleKind::DualPipe),
            "dualpipev" => Some(ScheduleKind::DualPipeV),
            "1f1b" | "one_f_one_b" | "onefoneb" => Some(ScheduleKind::OneFOneB),
            _ => None,
        }
    }

    /// Number of pipeline stages the model is cut into for `ranks` pipeline ranks.
    pub fn stage_count(self, ranks: u32) -> u32 {
        match self {
            ScheduleKind::DualPipeV => 2 * ranks,
            ScheduleKind::DualPipe | ScheduleKind::OneFOneB => ranks,
        }
    }

    /// Number of chunks (directions) each rank holds.
    pub fn chunks_per_rank(self) -> u8 {
        match self {
            ScheduleKind::OneFOneB => 1,
            ScheduleKind::DualPipe | ScheduleKind::DualPipeV => 2,
        }
    }

    /// Checks that `(ranks, microbatches)` is a valid size for this kind.
    pub fn validate(self, ranks: u32, microbatches: u32) -> Result<(), ScheduleError> {
        match self {
            ScheduleKind::DualPipe => dualpipe::validate(ranks, microbatches),
            ScheduleKind::DualPipeV => dualpipev::validate(ranks, microbatches),
            ScheduleKind::OneFOneB => one_f_one_b::validate(ranks, microbatches),
        }
    }

    /// Generates the schedule of this kind.
    pub fn generate(self, ranks: u32, microbatches: u32) -> Result<Schedule, ScheduleError> {
        match self {
            ScheduleKind::DualPipe => dualpipe(ranks, microbatches),
            ScheduleKind::DualPipeV => dualpipev(ranks, microbatches),
            ScheduleKind::OneFOneB => one_f_one_b(ranks, microbatches),
        }
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a schedule could not be generated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The number of pipeline ranks breaks a rule of the schedule kind.
    #[error("{kind}: invalid number of pipeline ranks {ranks}: {rule}")]
    InvalidRanks {
        /// The schedule kind.
        kind: ScheduleKind,
        /// The rejected rank count.
        ranks: u32,
        /// The rule that was broken.
        rule: &'static str,
    },
    /// The number of micro-batches breaks a rule of the schedule kind.
    #[error("{kind}: invalid number of micro-batches {microbatches} for {ranks} ranks: {rule}")]
    InvalidMicrobatches {
        /// The schedule kind.
        kind: ScheduleKind,
        /// The pipeline rank count.
        ranks: u32,
        /// The rejected micro-batch count.
        microbatches: u32,
        /// The rule that was broken.
        rule: &'static str,
    },
}

/// Where a chunk's input comes from or its output goes, seen from one (rank, direction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    /// No neighbour: the input is read from the data loader (upstream) or the output feeds the loss
    /// (downstream).
    End,
    /// Another chunk of the same rank (DualPipeV's turn-around on the last rank): no communication.
    Local(u8),
    /// A chunk on another rank.
    Remote {
        /// The peer rank.
        rank: u32,
        /// The peer's chunk direction.
        dir: u8,
    },
}

/// A complete pipeline schedule: one op list per rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// The generator that produced it.
    pub kind: ScheduleKind,
    /// Number of pipeline ranks `P`.
    pub ranks: u32,
    /// Number of micro-batches `N` per step.
    pub microbatches: u32,
    /// `ops[r]` is rank `r`'s op list, in execution order.
    pub ops: Vec<Vec<Op>>,
}

impl Schedule {
    /// Number of pipeline stages (`P`, or `2P` for DualPipeV).
    pub fn stage_count(&self) -> u32 {
        self.kind.stage_count(self.ranks)
    }

    /// Number of chunks each rank holds (2 for DualPipe and DualPipeV, 1 for 1F1B).
    pub fn chunks_per_rank(&self) -> u8 {
        self.kind.chunks_per_rank()
    }

    /// The model stage that chunk `dir` of `rank` computes.
    pub fn stage_of(&self, rank: u32, dir: u8) -> u32 {
        layout_stage(self.kind, self.ranks, rank, dir)
    }

    /// The micro-batches that flow through chunk direction `dir`.
    pub fn microbatches_of(&self, dir: u8) -> std::ops::Range<u32> {
        match (self.kind, dir) {
            (ScheduleKind::DualPipe, 0) => 0..self.microbatches / 2,
            (ScheduleKind::DualPipe, _) => self.microbatches / 2..self.microbatches,
            _ => 0..self.microbatches,
        }
    }

    /// Where the input of chunk `dir` on `rank` comes from.
    pub fn upstream(&self, rank: u32, dir: u8) -> Hop {
        layout_upstream(self.kind, self.ranks, rank, dir)
    }

    /// Where the output of chunk `dir` on `rank` goes.
    pub fn downstream(&self, rank: u32, dir: u8) -> Hop {
        layout_downstream(self.kind, self.ranks, rank, dir)
    }

    /// The compute ops of `rank`, in order (sends and receives left out).
    pub fn compute_ops(&self, rank: u32) -> impl Iterator<Item = &Op> {
        self.ops[rank as usize].iter().filter(|op| op.is_compute())
    }

    /// The compact one-line form of `rank`: `rank R: F0:0 F0:1 … F0:3+B1:5 …`.
    pub fn compact_rank(&self, rank: u32) -> String {
        let mut line = format!("rank {rank}:");
        for op in self.compute_ops(rank) {
            if let Some(tok) = op.token() {
                line.push(' ');
                line.push_str(&tok);
            }
        }
        line
    }

    /// The compact form: one line per rank, each ending with a newline.
    pub fn compact(&self) -> String {
        let mut out = String::new();
        for r in 0..self.ranks {
            out.push_str(&self.compact_rank(r));
            out.push('\n');
        }
        out
    }

    /// Counts of each op kind on `rank`.
    pub fn counts(&self, rank: u32) -> OpCounts {
        let mut c = OpCounts::default();
        for op in &self.ops[rank as usize] {
            match op {
                Op::Forward(_) => c.forward += 1,
                Op::Backward(_) => c.backward += 1,
                Op::BackwardInput(_) => c.backward_input += 1,
                Op::Weight(_) => c.weight += 1,
                Op::ForwardBackward { .. } => c.overlapped += 1,
                Op::Send(_) => c.send += 1,
                Op::Recv(_) => c.recv += 1,
            }
        }
        c
    }
}

/// How many ops of each kind one rank runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpCounts {
    /// Stand-alone forwards.
    pub forward: u32,
    /// Stand-alone full backwards.
    pub backward: u32,
    /// Backwards for inputs only.
    pub backward_input: u32,
    /// Deferred weight-gradient ops.
    pub weight: u32,
    /// Overlapped forward+backward pairs.
    pub overlapped: u32,
    /// Sends.
    pub send: u32,
    /// Receives.
    pub recv: u32,
}

/// Stage of chunk `dir` on `rank` for a kind.
pub(crate) fn layout_stage(kind: ScheduleKind, ranks: u32, rank: u32, dir: u8) -> u32 {
    match (kind, dir) {
        (_, 0) => rank,
        (ScheduleKind::DualPipe, _) => ranks - 1 - rank,
        (_, _) => 2 * ranks - 1 - rank,
    }
}

/// Direction in which chunk `dir` flows: `+1` towards higher ranks, `-1` towards lower ranks.
fn flows_up(kind: ScheduleKind, dir: u8) -> bool {
    match kind {
        ScheduleKind::OneFOneB => true,
        ScheduleKind::DualPipe | ScheduleKind::DualPipeV => dir == 0,
    }
}

pub(crate) fn layout_upstream(kind: ScheduleKind, ranks: u32, rank: u32, dir: u8) -> Hop {
    if flows_up(kind, dir) {
        if rank == 0 {
            Hop::End
        } else {
            Hop::Remote {
                rank: rank - 1,
                dir,
            }
        }
    } else if rank + 1 < ranks {
        Hop::Remote {
            rank: rank + 1,
            dir,
        }
    } else if kind == ScheduleKind::DualPipeV {
        Hop::Local(0)
    } else {
        Hop::End
    }
}

pub(crate) fn layout_downstream(kind: ScheduleKind, ranks: u32, rank: u32, dir: u8) -> Hop {
    if flows_up(kind, dir) {
        if rank + 1 < ranks {
            Hop::Remote {
                rank: rank + 1,
                dir,
            }
        } else if kind == ScheduleKind::DualPipeV {
            Hop::Local(1)
        } else {
            Hop::End
        }
    } else if rank == 0 {
        Hop::End
    } else {
        Hop::Remote {
            rank: rank - 1,
            dir,
        }
    }
}

/// The FIFO weight-gradient store of one rank, as the generators track it.
#[derive(Debug, Default)]
pub(crate) struct WeightStore {
    queue: VecDeque<Chunk>,
}

impl WeightStore {
    pub(crate) fn push(&mut self, c: Chunk) {
        self.queue.push_back(c);
    }
    pub(crate) fn pop(&mut self) -> Option<Chunk> {
        self.queue.pop_front()
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}
