//! The pure vocabulary of a training job: parallel layout, cluster topology, placement of ranks onto
//! devices, pipeline schedules (DualPipe, DualPipeV, 1F1B) and their simulator.
//!
//! Invariant: no IO, no clock, no async, no serde. Everything here is a function of its arguments,
//! so the coordinator, the planner CLI and the tests can all call it and get the same answer.

pub mod schedule;

pub mod ids;
pub mod layers;
pub mod memory;
pub mod parallel;
pub mod placement;
pub mod sim;
pub mod svg;
pub mod topology;
