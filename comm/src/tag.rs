//! Message identity: the [`Tag`] callers give, and the [`Key`] messages are matched by.
//!
//! Invariant: two messages can only be confused if every field of their keys is equal, and every
//! key carries the training step, so traffic of different steps, operations, directions,
//! micro-batches or chunks never mixes. Each field has a fixed-width wire encoding (see `frame`).

use std::fmt;

/// What a message carries. Part of the match key and of the wire header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Kind {
    /// Activations between pipeline neighbours.
    Activation = 1,
    /// Activation gradients between pipeline neighbours.
    Gradient = 2,
    /// Expert-parallel dispatch (tokens to their experts' ranks).
    Dispatch = 3,
    /// Expert-parallel combine (expert outputs back to the tokens' home ranks).
    Combine = 4,
    /// The DualPipe mirror-stage gradient sum.
    MirrorGradSum = 5,
    /// Data-parallel gradient reduce-scatter (ZeRO-1).
    GradReduceScatter = 6,
    /// Data-parallel parameter all-gather (ZeRO-1).
    ParamAllGather = 7,
    /// A synchronisation point.
    Barrier = 8,
    /// Anything else a caller needs (small control values, tests, benchmarks).
    Control = 9,
}

impl Kind {
    /// Decodes the wire byte; `None` for an unknown value.
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Activation,
            2 => Self::Gradient,
            3 => Self::Dispatch,
            4 => Self::Combine,
            5 => Self::MirrorGradSum,
            6 => Self::GradReduceScatter,
            7 => Self::ParamAllGather,
            8 => Self::Barrier,
            9 => Self::Control,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Activation => "activation",
            Self::Gradient => "gradient",
            Self::Dispatch => "dispatch",
            Self::Combine => "combine",
            Self::MirrorGradSum => "mirror-grad-sum",
            Self::GradReduceScatter => "grad-reduce-scatter",
            Self::ParamAllGather => "param-all-gather",
            Self::Barrier => "barrier",
            Self::Control => "control",
        }
    }
}

/// Which pass a message belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Direction {
    /// Not tied to a pass (optimizer-time collectives, control).
    None = 0,
    /// The forward pass.
    Forward = 1,
    /// The backward pass.
    Backward = 2,
}

impl Direction {
    /// Decodes the wire byte; `None` for an unknown value.
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0 => Self::None,
            1 => Self::Forward,
            2 => Self::Backward,
            _ => return None,
        })
    }
}

/// The caller's name for a message: which step, what, which direction, which micro-batch and
/// which layer or chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag {
    /// Training step.
    pub step: u64,
    /// What the message carries.
    pub kind: Kind,
    /// Forward or backward.
    pub direction: Direction,
    /// Micro-batch index within the step.
    pub micro_batch: u32,
    /// Layer or chunk index (whatever the caller needs to tell concurrent transfers apart).
    pub chunk: u32,
}

impl Tag {
    /// A tag for `step` and `kind`, with no direction, micro-batch 0 and chunk 0.
    pub const fn new(step: u64, kind: Kind) -> Self {
        Self {
            step,
            kind,
            direction: Direction::None,
            micro_batch: 0,
            chunk: 0,
        }
    }

    /// The same tag in the forward direction.
    pub const fn forward(self) -> Self {
        Self {
            direction: Direction::Forward,
            ..self
        }
    }

    /// The same tag in the backward direction.
    pub const fn backward(self) -> Self {
        Self {
            direction: Direction::Backward,
            ..self
        }
    }

    /// The same tag for micro-batch `micro_batch`.
    pub const fn micro_batch(self, micro_batch: u32) -> Self {
        Self {
            micro_batch,
            ..self
        }
    }

    /// The same tag for layer or chunk `chunk`.
    pub const fn chunk(self, chunk: u32) -> Self {
        Self { chunk, ..self }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step {} {}", self.step, self.kind.name())?;
        match self.direction {
            Direction::None => {}
            Direction::Forward => f.write_str(" fwd")?,
            Direction::Backward => f.write_str(" bwd")?,
        }
        write!(f, " mb {} chunk {}", self.micro_batch, self.chunk)
    }
}

/// Which operation a message belongs to: user point-to-point or a phase of a collective.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Op {
    /// A user `send`/`recv`.
    P2p = 0,
    /// `all_to_all_v`.
    AllToAll = 1,
    /// `reduce_scatter_sum_f32`.
    ReduceScatter = 2,
    /// `all_gather_f32`.
    AllGather = 3,
    /// The reduce-scatter phase of `all_reduce_sum_f32`.
    AllReduceScatter = 4,
    /// The all-gather phase of `all_reduce_sum_f32`.
    AllReduceGather = 5,
    /// `barrier`.
    Barrier = 6,
}

impl Op {
    /// Decodes the wire byte; `None` for an unknown value.
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0 => Self::P2p,
            1 => Self::AllToAll,
            2 => Self::ReduceScatter,
            3 => Self::AllGather,
            4 => Self::AllReduceScatter,
            5 => Self::AllReduceGather,
            6 => Self::Barrier,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::P2p => "p2p",
            Self::AllToAll => "all-to-all",
            Self::ReduceScatter => "reduce-scatter",
            Self::AllGather => "all-gather",
            Self::AllReduceScatter => "all-reduce(scatter)",
            Self::AllReduceGather => "all-reduce(gather)",
            Self::Barrier => "barrier",
        }
    }
}

/// The full match key of a message: the caller's tag, the operation, and the group's id
/// (0 for point-to-point).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// The caller's tag.
    pub tag: Tag,
    /// The operation (or collective phase).
    pub op: Op,
    /// [`crate::Group::id`] of the collective's group; 0 for point-to-point.
    pub group: u32,
}

impl Key {
    /// The key of a user point-to-point message.
    pub const fn p2p(tag: Tag) -> Self {
        Self {
            tag,
            op: Op::P2p,
            group: 0,
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.op == Op::P2p {
            write!(f, "p2p [{}]", self.tag)
        } else {
            write!(
                f,
                "{} [{}] group {:08x}",
                self.op.name(),
                self.tag,
                self.group
            )
        }
    }
}
