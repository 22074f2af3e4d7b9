//! The ranks a worker holds: assignments accepted from the coordinator, keyed by (job, rank).
//!
//! Invariants: at most one held rank per device; an assignment is accepted only if it is
//! self-consistent (rank inside the world, world = pipeline × data, one peer per rank in rank
//! order, at least one stage) and names one of this worker's devices; re-sending the same
//! (job, rank) — as the coordinator does after every reconnect — replaces it and is acknowledged
//! again (the daemon never restarts a held rank's compute for it), so assignments are idempotent. The set survives reconnects: it belongs to the daemon,
//! not to one session.

use crate::config::Device;
use proto::pb;
use std::collections::BTreeMap;

/// Whether an accepted assignment was new or a re-send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// First time this (job, rank) was seen.
    New,
    /// The coordinator re-sent a rank already held (after a reconnect or restart).
    Again,
}

/// Ranks currently held.
#[derive(Debug, Default)]
pub struct HeldRanks {
    /// (job, rank) to its assignment.
    by_key: BTreeMap<(String, u32), pb::Assignment>,
}

impl HeldRanks {
    /// Validates `a` against `devices` and the ranks already held, and keeps it. The error is
    /// the rejection reason sent back to the coordinator.
    pub fn accept(&mut self, a: pb::Assignment, devices: &[Device]) -> Result<Accepted, String> {
        check(&a, devices)?;
        let key = (a.job.clone(), a.rank);
        if let Some(((job, rank), _)) = self
            .by_key
            .iter()
            .find(|(k, held)| **k != key && held.device_index == a.device_index)
        {
            return Err(format!(
                "device {} already holds rank {rank} of job {job}",
                a.device_index
            ));
        }
        Ok(match self.by_key.insert(key, a) {
            Some(_) => Accepted::Again,
            None => Accepted::New,
        })
    }

    /// Runs the checks of [`HeldRanks::accept`] without keeping anything.
    pub fn check(&self, a: &pb::Assignment, devices: &[Device]) -> Result<(), String> {
        check(a, devices)
    }

    /// Drops every rank of `job`; returns the ranks dropped.
    pub fn stop_job(&mut self, job: &str) -> Vec<u32> {
        let ranks: Vec<u32> = self
            .by_key
            .keys()
            .filter(|(j, _)| j == job)
            .map(|(_, r)| *r)
            .collect();
        for r in &ranks {
            self.by_key.remove(&(job.to_owned(), *r));
        }
        ranks
    }

    /// Drops every rank; returns what was held.
    pub fn clear(&mut self) -> Vec<(String, u32)> {
        std::mem::take(&mut self.by_key).into_keys().collect()
    }

    /// Whether rank `rank` of `job` is held.
    pub fn holds(&self, job: &str, rank: u32) -> bool {
        self.by_key.contains_key(&(job.to_owned(), rank))
    }

    /// Whether any rank of `job` is held.
    pub fn holds_job(&self, job: &str) -> bool {
        self.by_key.keys().any(|(j, _)| j == job)
    }

    /// Every held (job, rank), in order.
    pub fn keys(&self) -> Vec<(String, u32)> {
        self.by_key.keys().cloned().collect()
    }

    /// Number of held ranks.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// The self-consistency checks of one assignment.
fn check(a: &pb::Assignment, devices: &[Device]) -> Result<(), String> {
    if a.job.is_empty() {
        return Err("assignment has no job name".into());
    }
    if !devices.iter().any(|d| d.index == a.device_index) {
        let mine: Vec<u32> = devices.iter().map(|d| d.index).collect();
        return Err(format!(
            "device {} is not one of this worker's devices {mine:?}",
            a.device_index
        ));
    }
    if a.world_size == 0 || a.rank >= a.world_size {
        return Err(format!(
            "rank {} outside world size {}",
            a.rank, a.world_size
        ));
    }
    if u64::from(a.pipeline) * u64::from(a.data) != u64::from(a.world_size) {
        return Err(format!(
            "world size {} is not pipeline {} × data {}",
            a.world_size, a.pipeline, a.data
        ));
    }
    if a.peers.len() != a.world_size as usize {
        return Err(format!(
            "{} peers for world size {}",
            a.peers.len(),
            a.world_size
        ));
    }
    if let Some((i, p)) = a
        .peers
        .iter()
        .enumerate()
        .find(|(i, p)| p.rank as usize != *i)
    {
        return Err(format!(
            "peer list out of order: entry {i} is rank {}",
            p.rank
        ));
    }
    if a.stages.is_empty() {
        return Err(format!("rank {} holds no pipeline stage", a.rank));
    }
    // DualPipeV cuts the model into 2P stages (each rank holds r and 2P-1-r); the others into P.
    let stages = match proto::convert::schedule_from_name(&a.schedule) {
        Ok(plan::schedule::ScheduleKind::DualPipeV) => 2 * a.pipeline,
        _ => a.pipeline,
    };
    if let Some(s) = a.stages.iter().find(|s| **s >= stages) {
        return Err(format!(
            "stage {s} outside the {stages} stages of pipeline {} ({})",
            a.pipeline, a.schedule
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(job: &str, rank: u32, device: u32) -> pb::Assignment {
        pb::Assignment {
            job: job.into(),
            rank,
            world_size: 2,
            device_index: device,
            pipeline: 2,
            data: 1,
            expert: 1,
            stages: vec![rank, 1 - rank],
            peers: (0..2)
                .map(|r| pb::Peer {
                    rank: r,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn idempotent_per_job_and_rank() {
        let devs = Device::uniform(pb::DeviceKind::Cpu, 2, 0);
        let mut h = HeldRanks::default();
        assert_eq!(h.accept(assignment("a", 0, 0), &devs), Ok(Accepted::New));
        assert_eq!(h.accept(assignment("a", 0, 0), &devs), Ok(Accepted::Again));
        assert_eq!(h.accept(assignment("a", 1, 1), &devs), Ok(Accepted::New));
        assert_eq!(h.len(), 2);
        assert_eq!(h.stop_job("a"), vec![0, 1]);
        assert!(h.is_empty());
    }

    #[test]
    fn rejects_with_reasons() {
        let devs = Device::uniform(pb::DeviceKind::Cpu, 1, 0);
        let mut h = HeldRanks::default();
        h.accept(assignment("a", 0, 0), &devs).unwrap();
        assert_eq!(
            h.accept(assignment("b", 0, 0), &devs),
            Err("device 0 already holds rank 0 of job a".into())
        );
        assert!(
            h.accept(assignment("b", 0, 7), &devs)
                .unwrap_err()
                .contains("not one of")
        );
        let mut bad = assignment("c", 0, 0);
        bad.world_size = 3;
        assert!(h.accept(bad, &devs).unwrap_err().contains("world size 3"));
        let mut bad = assignment("c", 0, 0);
        bad.peers.swap(0, 1);
        assert!(h.accept(bad, &devs).unwrap_err().contains("out of order"));
        let mut bad = assignment("c", 0, 0);
        bad.stages = vec![5];
        assert!(h.accept(bad, &devs).unwrap_err().contains("stage 5"));
    }
}
