//! The `simulated` device kind — a TEST MODE, never a fallback: a [`StageCompute`] whose ops do no
//! arithmetic but take the wall time a cost table gives them, and whose payloads are placeholder
//! bytes of the real sizes, sent through the real data plane. It lets one machine execute the
//! schedules and the data plane of a job with dozens of ranks and compare the step time with the
//! schedule simulator's prediction.
//!
//! Invariants: an op's duration is measured from its own start (a deadline), so the waiting
//! (sleeping) thread does not consume a core and 32+ simulated ranks fit on two; forwards return
//! `None` exactly on the last stage of their direction and backwards exactly on the first, like
//! the real model; payloads have exactly the configured byte sizes.

use std::time::{Duration, Instant};

use comm::{DataPlane, Group, Kind, Tag};
use plan::schedule::{Chunk, Schedule};
use plan::sim::Costs;

use crate::error::ComputeError;
use crate::run::{Produced, StageCompute};

/// Wall time of each kind of compute op of one stage chunk.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostTable {
    /// A forward chunk (F).
    pub forward: Duration,
    /// A full backward chunk (B).
    pub backward: Duration,
    /// A backward for inputs only.
    pub backward_input: Duration,
    /// A deferred weight-gradient chunk (W).
    pub weight: Duration,
    /// An overlapped forward+backward pair (F&B).
    pub overlapped: Duration,
}

impl CostTable {
    /// The same costs in seconds for `plan::sim` (zero communication time: the in-process and
    /// loopback planes deliver in microseconds).
    pub fn to_sim_costs(&self) -> Costs {
        Costs {
            forward: self.forward.as_secs_f64(),
            backward: self.backward.as_secs_f64(),
            backward_input: self.backward_input.as_secs_f64(),
            weight: self.weight.as_secs_f64(),
            overlapped: self.overlapped.as_secs_f64(),
            comm: 0.0,
        }
    }

    /// Every cost multiplied by `factor` (e.g. a model cut into twice as many stages).
    pub fn scaled(&self, factor: f64) -> Self {
        let s = |d: Duration| d.mul_f64(factor);
        Self {
            forward: s(self.forward),
            backward: s(self.backward),
            backward_input: s(self.backward_input),
            weight: s(self.weight),
            overlapped: s(self.overlapped),
        }
    }
}

/// Optional simulated data-parallel gradient synchronisation at the end of each step.
#[derive(Clone, Debug)]
pub struct SimGradSync {
    /// The data-parallel replicas of this rank's stages (data-plane ranks).
    pub group: Group,
    /// Gradient elements (f32) this rank reduce-scatters and then all-gathers.
    pub elements: usize,
}

/// What a simulated step returns.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SimStepOutput {
    /// Seconds spent in the step-end gradient synchronisation.
    pub grad_sync_s: f64,
    /// Bytes this rank handed to the data plane in pipeline transfers.
    pub bytes_sent: u64,
}

/// A simulated device running one pipeline rank's chunks (test mode; see the module docs).
pub struct SimulatedCompute {
    costs: CostTable,
    activation_bytes: usize,
    /// Per slot: (is the first stage of its direction, is the last stage).
    ends: [(bool, bool); 2],
    grad_sync: Option<SimGradSync>,
    bytes_sent: u64,
}

impl SimulatedCompute {
    /// A simulated device for `rank` of `schedule`, with the given op costs and activation (and
    /// activation-gradient) payload size in bytes.
    pub fn new(schedule: &Schedule, rank: u32, costs: CostTable, activation_bytes: usize) -> Self {
        let last = schedule.stage_count() - 1;
        let mut ends = [(false, false); 2];
        for (dir, end) in ends
            .iter_mut()
            .enumerate()
            .take(usize::from(schedule.chunks_per_rank()))
        {
            let stage = schedule.stage_of(rank, dir as u8);
            *end = (stage == 0, stage == last);
        }
        Self {
            costs,
            activation_bytes,
            ends,
            grad_sync: None,
            bytes_sent: 0,
        }
    }

    /// Adds a simulated data-parallel gradient reduce-scatter + parameter all-gather at step end.
    pub fn with_grad_sync(mut self, sync: SimGradSync) -> Self {
        self.grad_sync = Some(sync);
        self
    }

    fn spend(d: Duration) {
        let deadline = Instant::now() + d;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            std::thread::sleep(deadline - now);
        }
    }

    fn check_payload(
        &self,
        what: &str,
        c: Chunk,
        bytes: &Option<Vec<u8>>,
    ) -> Result<(), ComputeError> {
        match bytes {
            Some(b) if b.len() != self.activation_bytes => Err(format!(
                "{what} of {c} has {} bytes, expected {}",
                b.len(),
                self.activation_bytes
            )
            .into()),
            _ => Ok(()),
        }
    }

    fn ends(&self, c: Chunk) -> Result<(bool, bool), ComputeError> {
        self.ends
            .get(usize::from(c.dir))
            .copied()
            .ok_or_else(|| format!("chunk direction {} does not exist", c.dir).into())
    }

    fn fwd_out(&mut self, c: Chunk) -> Result<Produced, ComputeError> {
        let (_, last) = self.ends(c)?;
        Ok(if last { None } else { self.placeholder() })
    }

    fn bwd_out(&mut self, c: Chunk) -> Result<Produced, ComputeError> {
        let (first, _) = self.ends(c)?;
        Ok(if first { None } else { self.placeholder() })
    }

    fn placeholder(&mut self) -> Produced {
        self.bytes_sent += self.activation_bytes as u64;
        Some(vec![0u8; self.activation_bytes])
    }
}

impl StageCompute for SimulatedCompute {
    type StepOutput = SimStepOutput;

    fn begin_step(&mut self, _step: u64) -> Result<(), ComputeError> {
        self.bytes_sent = 0;
        Ok(())
    }

    fn forward(&mut self, chunk: Chunk, input: Option<Vec<u8>>) -> Result<Produced, ComputeError> {
        self.check_payload("input activation", chunk, &input)?;
        Self::spend(self.costs.forward);
        self.fwd_out(chunk)
    }

    fn backward(&mut self, chunk: Chunk, grad: Option<Vec<u8>>) -> Result<Produced, ComputeError> {
        self.check_payload("output gradient", chunk, &grad)?;
        Self::spend(self.costs.backward);
        self.bwd_out(chunk)
    }

    fn backward_input(
        &mut self,
        chunk: Chunk,
        grad: Option<Vec<u8>>,
    ) -> Result<Produced, ComputeError> {
        self.check_payload("output gradient", chunk, &grad)?;
        Self::spend(self.costs.backward_input);
        self.bwd_out(chunk)
    }

    fn backward_weight(&mut self, _chunk: Chunk) -> Result<(), ComputeError> {
        Self::spend(self.costs.weight);
        Ok(())
    }

    fn forward_backward(
        &mut self,
        f: Chunk,
        input: Option<Vec<u8>>,
        b: Chunk,
        grad: Option<Vec<u8>>,
    ) -> Result<(Produced, Produced), ComputeError> {
        self.check_payload("input activation", f, &input)?;
        self.check_payload("output gradient", b, &grad)?;
        Self::spend(self.costs.overlapped);
        Ok((self.fwd_out(f)?, self.bwd_out(b)?))
    }

    fn finish_step(
        &mut self,
        step: u64,
        plane: &dyn DataPlane,
        timeout: Duration,
    ) -> Result<SimStepOutput, ComputeError> {
        let start = Instant::now();
        if let Some(sync) = &self.grad_sync {
            let grads = vec![0f32; sync.elements];
            let tag = Tag::new(step, Kind::GradReduceScatter);
            let shard = plane.reduce_scatter_sum_f32(&sync.group, tag, &grads, timeout)?;
            plane.all_gather_f32(
                &sync.group,
                Tag::new(step, Kind::ParamAllGather),
                &shard,
                timeout,
            )?;
        }
        Ok(SimStepOutput {
            grad_sync_s: start.elapsed().as_secs_f64(),
            bytes_sent: self.bytes_sent,
        })
    }
}
