//! Discrete-event simulator for pipeline schedules: it walks every rank's op list with per-op costs
//! and a per-hop communication time, and reports the makespan, each rank's busy and idle time, the
//! peak of live activations per rank, and every compute span (for the SVG timeline).
//!
//! Invariant: the simulator checks a schedule instead of trusting it. A compute op runs only if what
//! it consumes is already on the rank (an earlier forward, a received activation or gradient, or the
//! local turn-around of DualPipeV); the k-th message from rank `a` to rank `b` must be the one `b`
//! expects k-th; deferred weight gradients pop in FIFO order; and a receive that can never be satisfied
//! is reported as a deadlock naming every blocked rank and op.
//!
//! Timing model: each rank executes its ops in order on one compute stream. A compute op starts when
//! the previous op on the rank ends. `Send` takes no rank time and delivers its message `comm` time
//! units later (one hop); `Recv` waits until its message has arrived. All ranks start at time 0 and
//! the step ends at the makespan, when the last rank finishes. A rank's *idle time* is
//! `makespan − busy`: every moment of the step it is not computing, including waiting for its first
//! input and waiting for the last rank to finish. This is the per-device bubble of DeepSeek's Table 2.

use std::collections::VecDeque;

use crate::schedule::{Chunk, Hop, Op, Payload, Schedule, Transfer};

/// Time each kind of op takes, in any consistent unit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Costs {
    /// A forward chunk (F).
    pub forward: f64,
    /// A full backward chunk (B).
    pub backward: f64,
    /// A backward for inputs only (I).
    pub backward_input: f64,
    /// A deferred weight-gradient chunk (W).
    pub weight: f64,
    /// An overlapped forward+backward pair (F&B).
    pub overlapped: f64,
    /// One pipeline hop of an activation or gradient transfer.
    pub comm: f64,
}

impl Costs {
    /// The costs of the acceptance check: F = I = W = 1, B = 2, F&B = 3, no communication time.
    pub fn unit() -> Self {
        Self {
            forward: 1.0,
            backward: 2.0,
            backward_input: 1.0,
            weight: 1.0,
            overlapped: 3.0,
            comm: 0.0,
        }
    }

    /// Cost of one compute op (zero for sends and receives).
    pub fn of(&self, op: &Op) -> f64 {
        match op {
            Op::Forward(_) => self.forward,
            Op::Backward(_) => self.backward,
            Op::BackwardInput(_) => self.backward_input,
            Op::Weight(_) => self.weight,
            Op::ForwardBackward { .. } => self.overlapped,
            Op::Send(_) | Op::Recv(_) => 0.0,
        }
    }
}

/// One executed compute op on the timeline.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Span {
    /// The op.
    pub op: Op,
    /// Start time.
    pub start: f64,
    /// End time.
    pub end: f64,
}

/// What the simulator measured for one rank.
#[derive(Clone, Debug, PartialEq)]
pub struct RankReport {
    /// Time spent computing.
    pub busy: f64,
    /// `makespan − busy` (see the module doc).
    pub idle: f64,
    /// Start of the rank's first compute op.
    pub first_start: f64,
    /// End of the rank's last compute op.
    pub last_end: f64,
    /// Most chunks whose activations were alive at once (a chunk is alive from the start of its forward
    /// to the end of its full backward, or to the end of its deferred weight gradient).
    pub peak_live_chunks: u32,
    /// Most activation bytes alive at once, with the per-stage sizes given to the simulator.
    pub peak_live_bytes: u64,
    /// The compute spans, in order.
    pub spans: Vec<Span>,
}

/// Result of a successful simulation.
#[derive(Clone, Debug, PartialEq)]
pub struct SimReport {
    /// End of the last op on any rank.
    pub makespan: f64,
    /// One report per rank.
    pub ranks: Vec<RankReport>,
}

impl SimReport {
    /// The largest idle time of any rank.
    pub fn max_idle(&self) -> f64 {
        self.ranks.iter().map(|r| r.idle).fold(0.0, f64::max)
    }

    /// Idle share of the step, `Σ idle / (P · makespan)`.
    pub fn bubble_fraction(&self) -> f64 {
        if self.makespan <= 0.0 || self.ranks.is_empty() {
            return 0.0;
        }
        self.ranks.iter().map(|r| r.idle).sum::<f64>() / (self.ranks.len() as f64 * self.makespan)
    }

    /// The largest peak of live activation chunks of any rank.
    pub fn max_peak_live_chunks(&self) -> u32 {
        self.ranks
            .iter()
            .map(|r| r.peak_live_chunks)
            .max()
            .unwrap_or(0)
    }
}

/// A rank that cannot make progress, and the op it is stuck on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    /// The blocked rank.
    pub rank: u32,
    /// Position of the op in the rank's list.
    pub index: usize,
    /// The receive it waits on.
    pub op: Op,
}

/// Why a schedule is not executable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// Some receives can never complete; every blocked rank is listed with its op.
    #[error("deadlock: {}", fmt_blocked(.blocked))]
    Deadlock {
        /// The blocked ranks.
        blocked: Vec<Blocked>,
    },
    /// A receive found a different message at the head of its channel.
    #[error(
        "rank {rank} op {index} ({op}) expected {expected}, but the next message from rank {peer} is {found}"
    )]
    OrderMismatch {
        /// The receiving rank.
        rank: u32,
        /// Position of the receive.
        index: usize,
        /// The receive op.
        op: Op,
        /// The sending rank.
        peer: u32,
        /// What the receive expected (`activation 0:3`).
        expected: String,
        /// What was actually next in the channel.
        found: String,
    },
    /// A compute op or send needs something the rank does not have at that point.
    #[error("rank {rank} op {index} ({op}) needs {needs}")]
    MissingInput {
        /// The rank.
        rank: u32,
        /// Position of the op.
        index: usize,
        /// The op.
        op: Op,
        /// What is missing, in words.
        needs: String,
    },
    /// A weight-gradient op does not match the oldest entry of the FIFO store.
    #[error("rank {rank} op {index} ({op}) but the oldest deferred weight gradient is {oldest}")]
    WeightOrder {
        /// The rank.
        rank: u32,
        /// Position of the op.
        index: usize,
        /// The op.
        op: Op,
        /// The oldest entry, or `none`.
        oldest: String,
    },
    /// The step ended with work left over.
    #[error("rank {rank} ends the step with {what}")]
    Leftover {
        /// The rank.
        rank: u32,
        /// What was left (unreceived messages or unrun weight gradients).
        what: String,
    },
}

fn fmt_blocked(blocked: &[Blocked]) -> String {
    blocked
        .iter()
        .map(|b| format!("rank {} stuck at op {} ({})", b.rank, b.index, b.op))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Inputs of a simulation besides the schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// Per-op costs.
    pub costs: Costs,
    /// Activation bytes one micro-batch keeps alive on each stage (`len = stage count`); empty means
    /// bytes are not tracked.
    pub activation_bytes_per_stage: Vec<u64>,
}

impl SimConfig {
    /// A configuration with the given costs and no byte tracking.
    pub fn with_costs(costs: Costs) -> Self {
        Self {
            costs,
            activation_bytes_per_stage: Vec::new(),
        }
    }
}

/// Per-rank state while simulating.
struct RankState {
    pc: usize,
    clock: f64,
    busy: f64,
    first_start: Option<f64>,
    /// Indexed by `dir * N + mb`.
    forwarded: Vec<bool>,
    input_grad_done: Vec<bool>,
    have_activation: Vec<bool>,
    have_gradient: Vec<bool>,
    store: VecDeque<Chunk>,
    live_chunks: u32,
    live_bytes: u64,
    peak_chunks: u32,
    peak_bytes: u64,
    spans: Vec<Span>,
}

/// Simulates `schedule` with unit-free `config.costs`.
pub fn simulate(schedule: &Schedule, config: &SimConfig) -> Result<SimReport, SimError> {
    Simulator::new(schedule, config).run()
}

/// Checks that `schedule` runs to completion (no deadlock, consistent data flow) with unit costs.
pub fn check(schedule: &Schedule) -> Result<(), SimError> {
    simulate(schedule, &SimConfig::with_costs(Costs::unit())).map(|_| ())
}

struct Simulator<'a> {
    s: &'a Schedule,
    cfg: &'a SimConfig,
    n: usize,
    ranks: Vec<RankState>,
    /// `channels[src * P + dst]`: messages in flight, with their arrival time.
    channels: Vec<VecDeque<(Payload, Chunk, f64)>>,
    /// Rank blocked on a receive from `src`, keyed like `channels`.
    waiting: Vec<bool>,
}

impl<'a> Simulator<'a> {
    fn new(s: &'a Schedule, cfg: &'a SimConfig) -> Self {
        let p = s.ranks as usize;
        let n = s.microbatches as usize;
        let slots = 2 * n;
        let ranks = (0..p)
            .map(|_| RankState {
                pc: 0,
                clock: 0.0,
                busy: 0.0,
                first_start: None,
                forwarded: vec![false; slots],
                input_grad_done: vec![false; slots],
                have_activation: vec![false; slots],
                have_gradient: vec![false; slots],
                store: VecDeque::new(),
                live_chunks: 0,
                live_bytes: 0,
                peak_chunks: 0,
                peak_bytes: 0,
                spans: Vec::new(),
            })
            .collect();
        Self {
            s,
            cfg,
            n,
            ranks,
            channels: vec![VecDeque::new(); p * p],
            waiting: vec![false; p * p],
        }
    }

    fn slot(&self, c: Chunk) -> usize {
        c.dir as usize * self.n + c.mb as usize
    }

    fn bytes(&self, rank: u32, dir: u8) -> u64 {
        let stage = self.s.stage_of(rank, dir) as usize;
        self.cfg
            .activation_bytes_per_stage
            .get(stage)
            .copied()
            .unwrap_or(0)
    }

    fn run(mut self) -> Result<SimReport, SimError> {
        let p = self.s.ranks as usize;
        let mut ready: Vec<usize> = (0..p).rev().collect();
        while let Some(r) = ready.pop() {
            self.advance(r as u32, &mut ready)?;
        }
        let blocked: Vec<Blocked> = (0..p)
            .filter(|&r| self.ranks[r].pc < self.s.ops[r].len())
            .map(|r| Blocked {
                rank: r as u32,
                index: self.ranks[r].pc,
                op: self.s.ops[r][self.ranks[r].pc],
            })
            .collect();
        if !blocked.is_empty() {
            return Err(SimError::Deadlock { blocked });
        }
        for src in 0..p {
            for dst in 0..p {
                if let Some((payload, chunk, _)) = self.channels[src * p + dst].front() {
                    return Err(SimError::Leftover {
                        rank: dst as u32,
                        what: format!("an unreceived {} {} from rank {src}", payload.name(), chunk),
                    });
                }
            }
        }
        for (r, st) in self.ranks.iter().enumerate() {
            if let Some(c) = st.store.front() {
                return Err(SimError::Leftover {
                    rank: r as u32,
                    what: format!("the unrun weight gradient {c}"),
                });
            }
        }
        let makespan = self.ranks.iter().map(|r| r.clock).fold(0.0, f64::max);
        let ranks = self
            .ranks
            .into_iter()
            .map(|st| RankReport {
                busy: st.busy,
                idle: makespan - st.busy,
                first_start: st.first_start.unwrap_or(0.0),
                last_end: st.spans.last().map_or(0.0, |s| s.end),
                peak_live_chunks: st.peak_chunks,
                peak_live_bytes: st.peak_bytes,
                spans: st.spans,
            })
            .collect();
        Ok(SimReport { makespan, ranks })
    }

    /// Runs rank `r` until it blocks on a receive or finishes; wakes ranks its sends unblock.
    fn advance(&mut self, r: u32, ready: &mut Vec<usize>) -> Result<(), SimError> {
        let p = self.s.ranks as usize;
        let ru = r as usize;
        while self.ranks[ru].pc < self.s.ops[ru].len() {
            let index = self.ranks[ru].pc;
            let op = self.s.ops[ru][index];
            match op {
                Op::Send(t) => {
                    self.check_send(r, index, op, t)?;
                    let key = ru * p + t.peer as usize;
                    let arrival = self.ranks[ru].clock + self.cfg.costs.comm;
                    self.channels[key].push_back((t.payload, t.chunk, arrival));
                    if self.waiting[key] {
                        self.waiting[key] = false;
                        ready.push(t.peer as usize);
                    }
                }
                Op::Recv(t) => {
                    let key = t.peer as usize * p + ru;
                    let Some(&(payload, chunk, arrival)) = self.channels[key].front() else {
                        self.waiting[key] = true;
                        return Ok(());
                    };
                    if payload != t.payload || chunk != t.chunk {
                        return Err(SimError::OrderMismatch {
                            rank: r,
                            index,
                            op,
                            peer: t.peer,
                            expected: format!("{} {}", t.payload.name(), t.chunk),
                            found: format!("{} {}", payload.name(), chunk),
                        });
                    }
                    self.channels[key].pop_front();
                    let slot = self.slot(chunk);
                    let st = &mut self.ranks[ru];
                    match payload {
                        Payload::Activation => st.have_activation[slot] = true,
                        Payload::Gradient => st.have_gradient[slot] = true,
                    }
                    st.clock = st.clock.max(arrival);
                }
                Op::Forward(_)
                | Op::Backward(_)
                | Op::BackwardInput(_)
                | Op::Weight(_)
                | Op::ForwardBackward { .. } => {
                    self.compute(r, index, op)?;
                }
            }
            self.ranks[ru].pc += 1;
        }
        Ok(())
    }

    fn missing(r: u32, index: usize, op: Op, needs: String) -> SimError {
        SimError::MissingInput {
            rank: r,
            index,
            op,
            needs,
        }
    }

    fn check_send(&self, r: u32, index: usize, op: Op, t: Transfer) -> Result<(), SimError> {
        let st = &self.ranks[r as usize];
        let slot = self.slot(t.chunk);
        let (done, hop) = match t.payload {
            Payload::Activation => (st.forwarded[slot], self.s.downstream(r, t.chunk.dir)),
            Payload::Gradient => (st.input_grad_done[slot], self.s.upstream(r, t.chunk.dir)),
        };
        if !done {
            let what = match t.payload {
                Payload::Activation => "forward",
                Payload::Gradient => "backward",
            };
            return Err(Self::missing(
                r,
                index,
                op,
                format!("its {what} of {} to have run first", t.chunk),
            ));
        }
        match hop {
            Hop::Remote { rank, .. } if rank == t.peer => Ok(()),
            other => Err(Self::missing(
                r,
                index,
                op,
                format!("a peer that the layout connects ({other:?})"),
            )),
        }
    }

    /// Checks that a forward of `c` on `r` has its input.
    fn check_forward(&self, r: u32, index: usize, op: Op, c: Chunk) -> Result<(), SimError> {
        let st = &self.ranks[r as usize];
        if !self.s.microbatches_of(c.dir).contains(&c.mb) {
            return Err(Self::missing(
                r,
                index,
                op,
                format!("micro-batch {} to belong to direction {}", c.mb, c.dir),
            ));
        }
        if st.forwarded[self.slot(c)] {
            return Err(Self::missing(
                r,
                index,
                op,
                format!("{c} not to have been forwarded already"),
            ));
        }
        let ok = match self.s.upstream(r, c.dir) {
            Hop::End => true,
            Hop::Local(d) => st.forwarded[self.slot(Chunk::new(d, c.mb))],
            Hop::Remote { .. } => st.have_activation[self.slot(c)],
        };
        if ok {
            Ok(())
        } else {
            Err(Self::missing(
                r,
                index,
                op,
                format!("the input activation of {c}"),
            ))
        }
    }

    /// Checks that a backward of `c` on `r` has its forward and its output gradient.
    fn check_backward(&self, r: u32, index: usize, op: Op, c: Chunk) -> Result<(), SimError> {
        let st = &self.ranks[r as usize];
        if !st.forwarded[self.slot(c)] {
            return Err(Self::missing(
                r,
                index,
                op,
                format!("the forward of {c} to have run first"),
            ));
        }
        if st.input_grad_done[self.slot(c)] {
            return Err(Self::missing(
                r,
                index,
                op,
                format!("{c} not to have been backwarded already"),
            ));
        }
        let ok = match self.s.downstream(r, c.dir) {
            Hop::End => true,
            Hop::Local(d) => st.input_grad_done[self.slot(Chunk::new(d, c.mb))],
            Hop::Remote { .. } => st.have_gradient[self.slot(c)],
        };
        if ok {
            Ok(())
        } else {
            Err(Self::missing(
                r,
                index,
                op,
                format!("the output gradient of {c}"),
            ))
        }
    }

    fn compute(&mut self, r: u32, index: usize, op: Op) -> Result<(), SimError> {
        let ru = r as usize;
        // Validate and collect the allocation and release of activations.
        let mut alloc: Option<Chunk> = None;
        let mut release: Option<Chunk> = None;
        let mut input_done: Option<Chunk> = None;
        match op {
            Op::Forward(c) => {
                self.check_forward(r, index, op, c)?;
                alloc = Some(c);
            }
            Op::Backward(c) => {
                self.check_backward(r, index, op, c)?;
                input_done = Some(c);
                release = Some(c);
            }
            Op::BackwardInput(c) => {
                self.check_backward(r, index, op, c)?;
                input_done = Some(c);
                self.ranks[ru].store.push_back(c);
            }
            Op::Weight(c) => {
                let st = &mut self.ranks[ru];
                match st.store.front() {
                    Some(&oldest) if oldest == c => {
                        st.store.pop_front();
                    }
                    other => {
                        let oldest = other.map_or_else(|| "none".to_string(), ToString::to_string);
                        return Err(SimError::WeightOrder {
                            rank: r,
                            index,
                            op,
                            oldest,
                        });
                    }
                }
                release = Some(c);
            }
            Op::ForwardBackward { f, b } => {
                self.check_forward(r, index, op, f)?;
                self.check_backward(r, index, op, b)?;
                alloc = Some(f);
                input_done = Some(b);
                release = Some(b);
            }
            Op::Send(_) | Op::Recv(_) => {}
        }
        let cost = self.cfg.costs.of(&op);
        let alloc_bytes = alloc.map_or(0, |c| self.bytes(r, c.dir));
        let release_bytes = release.map_or(0, |c| self.bytes(r, c.dir));
        let alloc_slot = alloc.map(|c| self.slot(c));
        let done_slot = input_done.map(|c| self.slot(c));
        let st = &mut self.ranks[ru];
        let start = st.clock;
        st.first_start.get_or_insert(start);
        if alloc.is_some() {
            st.live_chunks += 1;
            st.live_bytes += alloc_bytes;
            st.peak_chunks = st.peak_chunks.max(st.live_chunks);
            st.peak_bytes = st.peak_bytes.max(st.live_bytes);
        }
        if let Some(s) = alloc_slot {
            st.forwarded[s] = true;
        }
        if let Some(s) = done_slot {
            st.input_grad_done[s] = true;
        }
        if release.is_some() {
            st.live_chunks = st.live_chunks.saturating_sub(1);
            st.live_bytes = st.live_bytes.saturating_sub(release_bytes);
        }
        st.clock = start + cost;
        st.busy += cost;
        st.spans.push(Span {
            op,
            start,
            end: start + cost,
        });
        Ok(())
    }
}
