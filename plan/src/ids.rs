//! Index newtypes shared by the whole job vocabulary: global ranks, pipeline stages, micro-batches
//! and devices on a node.
//!
//! Invariant: each index space has its own type, so a stage index can never be passed where a rank
//! is expected; every type is a plain `u32` underneath and prints as that number.

use std::fmt;

macro_rules! index_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u32);

        impl $name {
            /// The index as a `usize`, for indexing slices.
            pub fn index(self) -> usize {
                self.0 as usize
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl From<u32> for $name {
            fn from(value: u32) -> Self {
                Self(value)
            }
        }
    };
}

index_newtype!(
    /// A global rank in `0..world_size` (see [`crate::parallel::ParallelConfig`] for its coordinates).
    Rank
);
index_newtype!(
    /// A pipeline stage: a contiguous range of layers. DualPipe has `P` stages, DualPipeV `2P`.
    StageIdx
);
index_newtype!(
    /// A micro-batch within one training step.
    MicroBatchIdx
);
index_newtype!(
    /// A device (accelerator or CPU slot) on one node, as the node's worker declared it.
    DeviceIdx
);
