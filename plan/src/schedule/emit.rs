//! The op-list builder shared by the generators: it tracks, for one rank, the FIFO counters of each
//! chunk direction, the queue of pending sends and receives, and the weight-gradient store, exactly as
//! DualPipe's `step()` does, and it holds the eight-phase body common to DualPipe and DualPipeV.
//!
//! Invariant: pending sends and receives are flushed as one batch (sends first, then receives, each in
//! queue order) immediately before the next compute op, and once more at the end; a chunk's k-th
//! forward, backward, send and receive in a direction all refer to the k-th micro-batch of that
//! direction.

use super::{
    Chunk, Hop, Op, Payload, ScheduleKind, Transfer, WeightStore, layout_downstream,
    layout_upstream,
};

/// Builds one rank's op list.
pub(crate) struct Emitter {
    kind: ScheduleKind,
    ranks: u32,
    rank: u32,
    /// First global micro-batch of each direction.
    mb_base: [u32; 2],
    /// Logical phase `x` runs chunk direction `x ^ flip` (DualPipe's second half of ranks flips).
    flip: u8,
    ops: Vec<Op>,
    pending: Vec<Op>,
    next_f: [u32; 2],
    next_b: [u32; 2],
    next_send_f: [u32; 2],
    next_send_b: [u32; 2],
    next_recv_f: [u32; 2],
    next_recv_b: [u32; 2],
    store: WeightStore,
}

impl Emitter {
    /// A builder for `rank` of a `kind` schedule with `ranks` ranks.
    pub(crate) fn new(
        kind: ScheduleKind,
        ranks: u32,
        rank: u32,
        mb_base: [u32; 2],
        flip: bool,
    ) -> Self {
        Self {
            kind,
            ranks,
            rank,
            mb_base,
            flip: u8::from(flip),
            ops: Vec::new(),
            pending: Vec::new(),
            next_f: [0; 2],
            next_b: [0; 2],
            next_send_f: [0; 2],
            next_send_b: [0; 2],
            next_recv_f: [0; 2],
            next_recv_b: [0; 2],
            store: WeightStore::default(),
        }
    }

    fn dir(&self, phase: u8) -> u8 {
        phase ^ self.flip
    }

    fn chunk(&self, dir: u8, index: u32) -> Chunk {
        Chunk::new(dir, self.mb_base[dir as usize] + index)
    }

    fn remote_up(&self, dir: u8) -> Option<u32> {
        match layout_upstream(self.kind, self.ranks, self.rank, dir) {
            Hop::Remote { rank, .. } => Some(rank),
            Hop::End | Hop::Local(_) => None,
        }
    }

    fn remote_down(&self, dir: u8) -> Option<u32> {
        match layout_downstream(self.kind, self.ranks, self.rank, dir) {
            Hop::Remote { rank, .. } => Some(rank),
            Hop::End | Hop::Local(_) => None,
        }
    }

    /// Queues the receive of the next forward input of `phase` (nothing at a direction's entry).
    pub(crate) fn recv_forward(&mut self, phase: u8) {
        let d = self.dir(phase);
        if let Some(peer) = self.remote_up(d) {
            let chunk = self.chunk(d, self.next_recv_f[d as usize]);
            self.next_recv_f[d as usize] += 1;
            self.pending.push(Op::Recv(Transfer {
                peer,
                payload: Payload::Activation,
                chunk,
            }));
        }
    }

    /// Queues the send of the next forward output of `phase` (nothing at a direction's exit).
    pub(crate) fn send_forward(&mut self, phase: u8) {
        let d = self.dir(phase);
        if let Some(peer) = self.remote_down(d) {
            let chunk = self.chunk(d, self.next_send_f[d as usize]);
            self.next_send_f[d as usize] += 1;
            self.pending.push(Op::Send(Transfer {
                peer,
                payload: Payload::Activation,
                chunk,
            }));
        }
    }

    /// Queues the receive of the next output gradient of `phase` (nothing where the loss is).
    pub(crate) fn recv_backward(&mut self, phase: u8) {
        let d = self.dir(phase);
        if let Some(peer) = self.remote_down(d) {
            let chunk = self.chunk(d, self.next_recv_b[d as usize]);
            self.next_recv_b[d as usize] += 1;
            self.pending.push(Op::Recv(Transfer {
                peer,
                payload: Payload::Gradient,
                chunk,
            }));
        }
    }

    /// Queues the send of the next input gradient of `phase` (nothing at a direction's entry).
    pub(crate) fn send_backward(&mut self, phase: u8) {
        let d = self.dir(phase);
        if let Some(peer) = self.remote_up(d) {
            let chunk = self.chunk(d, self.next_send_b[d as usize]);
            self.next_send_b[d as usize] += 1;
            self.pending.push(Op::Send(Transfer {
                peer,
                payload: Payload::Gradient,
                chunk,
            }));
        }
    }

    /// Flushes the pending transfers as one batch: sends first, then receives.
    pub(crate) fn commit(&mut self) {
        let sends = self.pending.iter().filter(|op| matches!(op, Op::Send(_)));
        self.ops.extend(sends);
        let recvs = self.pending.iter().filter(|op| matches!(op, Op::Recv(_)));
        self.ops.extend(recvs);
        self.pending.clear();
    }

    fn take_forward(&mut self, phase: u8) -> Chunk {
        let d = self.dir(phase);
        let c = self.chunk(d, self.next_f[d as usize]);
        self.next_f[d as usize] += 1;
        c
    }

    fn take_backward(&mut self, phase: u8) -> Chunk {
        let d = self.dir(phase);
        let c = self.chunk(d, self.next_b[d as usize]);
        self.next_b[d as usize] += 1;
        c
    }

    /// A forward of `phase`, optionally preceded by its receive and followed by its send.
    pub(crate) fn forward(&mut self, phase: u8, recv: bool, send: bool) {
        if recv {
            self.recv_forward(phase);
        }
        self.commit();
        let c = self.take_forward(phase);
        self.ops.push(Op::Forward(c));
        if send {
            self.send_forward(phase);
        }
    }

    /// A backward of `phase` (inputs only when `zero_bubble`), with optional receive and send.
    pub(crate) fn backward(&mut self, phase: u8, zero_bubble: bool, recv: bool, send: bool) {
        if recv {
            self.recv_backward(phase);
        }
        self.commit();
        let c = self.take_backward(phase);
        if zero_bubble {
            self.store.push(c);
            self.ops.push(Op::BackwardInput(c));
        } else {
            self.ops.push(Op::Backward(c));
        }
        if send {
            self.send_backward(phase);
        }
    }

    /// An overlapped pair: forward of `phase_f` and full backward of `phase_b`.
    pub(crate) fn forward_backward(&mut self, phase_f: u8, phase_b: u8, recv_f: bool) {
        if recv_f {
            self.recv_forward(phase_f);
        }
        self.recv_backward(phase_b);
        self.commit();
        let f = self.take_forward(phase_f);
        let b = self.take_backward(phase_b);
        self.ops.push(Op::ForwardBackward { f, b });
        self.send_forward(phase_f);
        self.send_backward(phase_b);
    }

    /// Runs the oldest deferred weight-gradient entry.
    pub(crate) fn weight(&mut self) {
        self.commit();
        // The phase structure pushes one entry per BackwardInput before every Weight; validated
        // sizes keep that true, so an empty store here is a generator bug, not bad input.
        let c = self
            .store
            .pop()
            .expect("weight-gradient store is non-empty before each W op");
        self.ops.push(Op::Weight(c));
    }

    /// Flushes the last transfers and returns the op list.
    pub(crate) fn finish(mut self) -> Vec<Op> {
        self.commit();
        debug_assert!(
            self.store.is_empty(),
            "every deferred weight gradient was run"
        );
        self.ops
    }
}

/// The eight phases of DualPipe's `step()`, shared with DualPipeV.
///
/// `q` = half the number of ranks of one "V" (DualPipe: `P/2`; DualPipeV: `P`), `h` = the rank's
/// distance from the nearer end (DualPipeV: the rank itself), `half` = micro-batches per direction
/// (DualPipe: `N/2`; DualPipeV: `N`), `turn` = the rank where the two directions meet (DualPipe: the two
/// middle ranks; DualPipeV: the last rank), which runs its first main-phase pair un-overlapped and
/// sends its phase-2 forwards immediately.
pub(crate) fn bidirectional_phases(e: &mut Emitter, q: u32, h: u32, half: u32, turn: bool) {
    let outer = q - h - 1;
    // Phase 1 (nF0): fill this rank's own direction.
    for _ in 0..2 * outer {
        e.forward(0, true, true);
    }
    // Phase 2 (nF0F1): alternate both directions; the next L0 input is always received one op early.
    e.recv_forward(0);
    for i in 0..=h {
        e.forward(0, false, turn);
        e.recv_forward(0);
        e.forward(1, true, !turn || i < h);
        if !turn {
            e.send_forward(0);
        }
    }
    // Phase 3 (nB1W1F1): zero-bubble backward of L1, its weight gradient, and one more L1 forward.
    for _ in 0..outer {
        e.backward(1, true, true, true);
        e.recv_forward(1);
        e.weight();
        e.forward(1, false, true);
    }
    // Phase 4 (nF0B1F1B0): the steady state of overlapped pairs.
    for i in 0..(half + h + 1 - 2 * q) {
        if i == 0 {
            if turn {
                // The rank where the directions meet runs this pair un-overlapped.
                e.forward(0, false, false);
                e.send_forward(1);
                e.backward(1, false, true, false);
                e.send_forward(0);
                e.send_backward(1);
            } else {
                e.forward_backward(0, 1, false);
            }
        } else {
            e.forward_backward(0, 1, true);
        }
        e.forward_backward(1, 0, true);
    }
    // Phase 5 (nB1F1B0).
    for _ in 0..outer {
        e.backward(1, false, true, true);
        e.forward_backward(1, 0, true);
    }
    // Phase 6 (nB1B0): the second half of these backwards defer their weight gradients.
    let mut zero_bubble = false;
    // The switch iteration is ⌊(h + 1) / 2⌋ = ⌈h / 2⌉.
    let switch = h.div_ceil(2);
    for i in 0..=h {
        if i == switch && !h.is_multiple_of(2) {
            zero_bubble = true;
        }
        e.backward(1, zero_bubble, true, true);
        if i == switch && h.is_multiple_of(2) {
            zero_bubble = true;
        }
        e.backward(0, zero_bubble, true, true);
    }
    // Phase 7 (nWB0).
    for _ in 0..outer {
        e.weight();
        e.backward(0, true, true, true);
    }
    // Phase 8 (nW): drain the weight-gradient store.
    for _ in 0..=h {
        e.weight();
    }
}
