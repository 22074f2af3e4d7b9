//! The parallel layout of a job: pipeline degree `P`, data degree `D` and expert degree `E`, and the
//! mapping between a global rank and its coordinates.
//!
//! Invariant: `world = P × D` and `E` divides `D`. Ranks are numbered pipeline-major,
//! `rank = pipeline_rank × D + dp`, so the `D` ranks of one pipeline position are contiguous.
//! Expert-parallel groups are carved out of the data-parallel ranks of each pipeline position
//! (as in DeepSeek-V3's pipeline 16 × data 128 with expert 64): `ep_group = dp / E`, `ep = dp % E`.

use std::fmt;

use crate::ids::{Rank, StageIdx};
use crate::placement::PlacementError;
use crate::schedule::ScheduleKind;

/// The stages pipeline rank `pipeline_rank` holds under `kind`, in the order module 0, module 1:
/// DualPipe `r` and `P − 1 − r`, DualPipeV `r` and `2P − 1 − r`, 1F1B just `r`.
pub fn stages_held(kind: ScheduleKind, pipeline_rank: u32, pipeline: u32) -> Vec<StageIdx> {
    match kind {
        ScheduleKind::DualPipe => {
            vec![
                StageIdx(pipeline_rank),
                StageIdx(pipeline - 1 - pipeline_rank),
            ]
        }
        ScheduleKind::DualPipeV => {
            vec![
                StageIdx(pipeline_rank),
                StageIdx(2 * pipeline - 1 - pipeline_rank),
            ]
        }
        ScheduleKind::OneFOneB => vec![StageIdx(pipeline_rank)],
    }
}

/// The fewest micro-batches per step a job may use under `kind` with `pipeline` ranks:
/// DualPipe and DualPipeV `2P` (v3-spec §5.2, §5.6); 1F1B `P`, so every stage is busy in the
/// steady state.
pub fn min_micro_batches(kind: ScheduleKind, pipeline: u32) -> u32 {
    match kind {
        ScheduleKind::DualPipe | ScheduleKind::DualPipeV => 2 * pipeline,
        ScheduleKind::OneFOneB => pipeline,
    }
}

/// Pipeline, data and expert degrees; `E` divides `D`, all three are at least 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParallelConfig {
    /// Pipeline degree `P` (pipeline ranks).
    pub pipeline: u32,
    /// Data degree `D` (ranks per pipeline position).
    pub data: u32,
    /// Expert degree `E` (ranks sharing one MoE layer's routed experts).
    pub expert: u32,
}

/// The coordinates of one global rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RankCoord {
    /// Pipeline rank in `0..P`.
    pub pipeline: u32,
    /// Data-parallel index in `0..D`.
    pub dp: u32,
    /// Expert-parallel group at this pipeline position, `dp / E`, in `0..D/E`.
    pub ep_group: u32,
    /// Index inside the expert-parallel group, `dp % E`, in `0..E`.
    pub ep: u32,
}

impl ParallelConfig {
    /// A layout, checked: every degree at least 1 and `expert` dividing `data`.
    pub fn new(pipeline: u32, data: u32, expert: u32) -> Result<Self, PlacementError> {
        let config = Self {
            pipeline,
            data,
            expert,
        };
        config.check()?;
        Ok(config)
    }

    /// Checks the invariants of a layout built field by field.
    pub fn check(&self) -> Result<(), PlacementError> {
        if self.pipeline == 0 || self.data == 0 || self.expert == 0 {
            return Err(PlacementError::InvalidLayout(format!(
                "every degree must be at least 1, got pipeline {}, data {}, expert {}",
                self.pipeline, self.data, self.expert
            )));
        }
        if !self.data.is_multiple_of(self.expert) {
            return Err(PlacementError::InvalidLayout(format!(
                "expert degree {} must divide data degree {}",
                self.expert, self.data
            )));
        }
        if u64::from(self.pipeline) * u64::from(self.data) > u64::from(u32::MAX) {
            return Err(PlacementError::InvalidLayout(format!(
                "world size {} × {} does not fit in 32 bits",
                self.pipeline, self.data
            )));
        }
        Ok(())
    }

    /// World size `P × D`.
    pub fn world_size(&self) -> u32 {
        self.pipeline * self.data
    }

    /// Expert-parallel groups per pipeline position, `D / E`.
    pub fn ep_groups(&self) -> u32 {
        self.data / self.expert
    }

    /// Coordinates of `rank`; `rank` must be below the world size.
    pub fn coord(&self, rank: Rank) -> RankCoord {
        let pipeline = rank.0 / self.data;
        let dp = rank.0 % self.data;
        RankCoord {
            pipeline,
            dp,
            ep_group: dp / self.expert,
            ep: dp % self.expert,
        }
    }

    /// The rank at pipeline rank `pipeline` and data-parallel index `dp`.
    pub fn rank(&self, pipeline: u32, dp: u32) -> Rank {
        Rank(pipeline * self.data + dp)
    }

    /// The `E` ranks of expert-parallel group `ep_group` at pipeline rank `pipeline`, by `ep` index.
    pub fn ep_group_ranks(&self, pipeline: u32, ep_group: u32) -> impl Iterator<Item = Rank> + '_ {
        let first = ep_group * self.expert;
        (first..first + self.expert).map(move |dp| self.rank(pipeline, dp))
    }

    /// The `D` data-parallel ranks at pipeline rank `pipeline`.
    pub fn dp_group_ranks(&self, pipeline: u32) -> impl Iterator<Item = Rank> + '_ {
        (0..self.data).map(move |dp| self.rank(pipeline, dp))
    }

    /// The `P` ranks of the pipeline that data-parallel index `dp` runs, by pipeline rank.
    pub fn pipeline_ranks(&self, dp: u32) -> impl Iterator<Item = Rank> + '_ {
        (0..self.pipeline).map(move |pipeline| self.rank(pipeline, dp))
    }
}

impl fmt::Display for ParallelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pipeline {} × data {} (expert {})",
            self.pipeline, self.data, self.expert
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinates_round_trip_and_group_ep_inside_dp() {
        let config = ParallelConfig::new(4, 6, 3).unwrap();
        assert_eq!(config.world_size(), 24);
        for rank in 0..24 {
            let coord = config.coord(Rank(rank));
            assert_eq!(config.rank(coord.pipeline, coord.dp), Rank(rank));
            assert_eq!(coord.ep_group * 3 + coord.ep, coord.dp);
        }
        let group: Vec<_> = config.ep_group_ranks(2, 1).collect();
        assert_eq!(group, vec![Rank(15), Rank(16), Rank(17)]);
        let pipe: Vec<_> = config.pipeline_ranks(1).collect();
        assert_eq!(pipe, vec![Rank(1), Rank(7), Rank(13), Rank(19)]);
    }

    #[test]
    fn rejects_expert_not_dividing_data_and_zero_degrees() {
        let err = ParallelConfig::new(4, 6, 4).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid parallel layout: expert degree 4 must divide data degree 6"
        );
        assert!(ParallelConfig::new(0, 2, 1).is_err());
    }

    #[test]
    fn dualpipe_ranks_hold_mirror_stages() {
        assert_eq!(
            stages_held(ScheduleKind::DualPipe, 1, 4),
            vec![StageIdx(1), StageIdx(2)]
        );
        assert_eq!(
            stages_held(ScheduleKind::DualPipeV, 1, 4),
            vec![StageIdx(1), StageIdx(6)]
        );
        assert_eq!(stages_held(ScheduleKind::OneFOneB, 3, 4), vec![StageIdx(3)]);
        assert_eq!(min_micro_batches(ScheduleKind::OneFOneB, 4), 4);
        assert_eq!(min_micro_batches(ScheduleKind::DualPipeV, 4), 8);
    }
}
