//! Property tests over every size the acceptance names: for every even P ≤ 16 (DualPipe) and every
//! P ≤ 16 (DualPipeV, 1F1B), and every valid N ≤ 4P, each rank's op counts equal the phase table of
//! v3-spec §5.3 / §5.6 (computed here from the closed forms, not by walking the phases), every
//! micro-batch gets exactly one forward and one backward (full, or I then W) on every (rank, chunk) of
//! its path, and the simulator runs the lists to completion without deadlock.

use std::collections::HashMap;

use plan::schedule::{
    Chunk, Hop, Op, Schedule, ScheduleError, ScheduleKind, dualpipe, dualpipev, one_f_one_b,
};
use plan::sim;

/// Expected per-rank counts from the phase table: (stand-alone F, overlapped pairs, full B, I = W,
/// leading forwards before the first backward).
fn phase_table(q: u32, h: u32, half: u32, turn: bool) -> (u32, u32, u32, u32, u32) {
    let outer = q - h - 1;
    let t = u32::from(turn);
    let main = half + h + 1 - 2 * q;
    let forwards = 2 * outer + 2 * (h + 1) + outer + t;
    let pairs = 2 * main - t + outer;
    let full_b = t + outer + (h + 1);
    let deferred = outer + (h + 1) + outer;
    let leading = 2 * q + t;
    (forwards, pairs, full_b, deferred, leading)
}

fn check_counts(s: &Schedule, rank: u32, expected: (u32, u32, u32, u32, u32)) {
    let c = s.counts(rank);
    let (forwards, pairs, full_b, deferred, leading) = expected;
    let ctx = format!("{} P={} N={} rank {rank}", s.kind, s.ranks, s.microbatches);
    assert_eq!(c.forward, forwards, "stand-alone forwards, {ctx}");
    assert_eq!(c.overlapped, pairs, "overlapped pairs, {ctx}");
    assert_eq!(c.backward, full_b, "full backwards, {ctx}");
    assert_eq!(c.backward_input, deferred, "backwards for inputs, {ctx}");
    assert_eq!(c.weight, deferred, "weight ops, {ctx}");
    let lead = s
        .compute_ops(rank)
        .take_while(|op| matches!(op, Op::Forward(_)))
        .count() as u32;
    assert_eq!(lead, leading, "forwards before the first backward, {ctx}");
}

/// Every micro-batch visits each (rank, chunk) of its path once forward and once backward.
fn check_coverage(s: &Schedule) {
    let mut seen: HashMap<(u32, Chunk), (u32, u32, u32, u32)> = HashMap::new();
    for r in 0..s.ranks {
        for op in s.compute_ops(r) {
            let mut bump = |c: Chunk, which: usize| {
                let e = seen.entry((r, c)).or_default();
                match which {
                    0 => e.0 += 1,
                    1 => e.1 += 1,
                    2 => e.2 += 1,
                    _ => e.3 += 1,
                }
            };
            match *op {
                Op::Forward(c) => bump(c, 0),
                Op::Backward(c) => bump(c, 1),
                Op::BackwardInput(c) => bump(c, 2),
                Op::Weight(c) => bump(c, 3),
                Op::ForwardBackward { f, b } => {
                    bump(f, 0);
                    bump(b, 1);
                }
                Op::Send(_) | Op::Recv(_) => {}
            }
        }
    }
    let mut expected_visits = 0;
    for dir in 0..s.chunks_per_rank() {
        for mb in s.microbatches_of(dir) {
            for r in 0..s.ranks {
                let (f, b, i, w) = seen
                    .get(&(r, Chunk::new(dir, mb)))
                    .copied()
                    .unwrap_or_default();
                let ctx = format!(
                    "{} P={} N={} rank {r} chunk {dir}:{mb}",
                    s.kind, s.ranks, s.microbatches
                );
                assert_eq!(f, 1, "one forward, {ctx}");
                assert!(
                    (b, i, w) == (1, 0, 0) || (b, i, w) == (0, 1, 1),
                    "one backward (B or I+W), {ctx}: {b} {i} {w}"
                );
                expected_visits += 1;
            }
        }
    }
    assert_eq!(
        seen.len(),
        expected_visits,
        "no chunk outside the micro-batches' paths"
    );
    // Every stage of the model is visited by every micro-batch that flows through it.
    for dir in 0..s.chunks_per_rank() {
        let stages: Vec<u32> = (0..s.ranks).map(|r| s.stage_of(r, dir)).collect();
        let mut sorted = stages.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(
            sorted.len() as u32,
            s.ranks,
            "direction {dir} covers {} distinct stages",
            s.ranks
        );
    }
}

#[test]
fn dualpipe_counts_coverage_and_no_deadlock() {
    for p in (2..=16).step_by(2) {
        for n in (2 * p..=4 * p).step_by(2) {
            let s = dualpipe(p, n).expect("valid size");
            for r in 0..p {
                let h = r.min(p - 1 - r);
                check_counts(
                    &s,
                    r,
                    phase_table(p / 2, h, n / 2, r + 1 == p / 2 || r == p / 2),
                );
            }
            check_coverage(&s);
            sim::check(&s).unwrap_or_else(|e| panic!("dualpipe P={p} N={n}: {e}"));
        }
    }
}

#[test]
fn dualpipev_counts_coverage_and_no_deadlock() {
    for p in 1..=16 {
        for n in 2 * p..=4 * p {
            let s = dualpipev(p, n).expect("valid size");
            for r in 0..p {
                check_counts(&s, r, phase_table(p, r, n, r + 1 == p));
            }
            check_coverage(&s);
            sim::check(&s).unwrap_or_else(|e| panic!("dualpipev P={p} N={n}: {e}"));
        }
    }
}

#[test]
fn one_f_one_b_counts_coverage_and_no_deadlock() {
    for p in 1..=16 {
        for n in 1..=4 * p {
            let s = one_f_one_b(p, n).expect("valid size");
            for r in 0..p {
                let c = s.counts(r);
                assert_eq!(
                    (
                        c.forward,
                        c.backward,
                        c.overlapped,
                        c.backward_input,
                        c.weight
                    ),
                    (n, n, 0, 0, 0)
                );
                let lead = s
                    .compute_ops(r)
                    .take_while(|op| matches!(op, Op::Forward(_)))
                    .count() as u32;
                assert_eq!(
                    lead,
                    (p - r).min(n),
                    "1F1B warm-up plus first steady forward, P={p} N={n} rank {r}"
                );
            }
            check_coverage(&s);
            sim::check(&s).unwrap_or_else(|e| panic!("1f1b P={p} N={n}: {e}"));
        }
    }
}

#[test]
fn transfers_match_the_stage_layout() {
    // Each send goes to the rank holding the next stage of its chunk, and every receive pairs with it.
    for s in [
        dualpipe(8, 20).expect("valid"),
        dualpipev(6, 13).expect("valid"),
        one_f_one_b(5, 7).expect("valid"),
    ] {
        let mut sends = 0;
        let mut recvs = 0;
        for r in 0..s.ranks {
            for op in &s.ops[r as usize] {
                match op {
                    Op::Send(t) => {
                        sends += 1;
                        let hop = match t.payload {
                            plan::schedule::Payload::Activation => s.downstream(r, t.chunk.dir),
                            plan::schedule::Payload::Gradient => s.upstream(r, t.chunk.dir),
                        };
                        assert!(
                            matches!(hop, Hop::Remote { rank, .. } if rank == t.peer),
                            "{} rank {r}: {op}",
                            s.kind
                        );
                    }
                    Op::Recv(_) => recvs += 1,
                    _ => {}
                }
            }
        }
        assert_eq!(sends, recvs, "{}: every send has a receive", s.kind);
        assert!(sends > 0);
    }
}

#[test]
fn invalid_sizes_name_the_rule() {
    let cases: [(Result<Schedule, ScheduleError>, &str); 6] = [
        (dualpipe(3, 8), "even number of ranks"),
        (dualpipe(0, 8), "even number of ranks"),
        (dualpipe(4, 9), "N must be even"),
        (dualpipe(4, 6), "N >= 2P"),
        (dualpipev(4, 7), "N >= 2P"),
        (one_f_one_b(4, 0), "N >= 1"),
    ];
    for (res, rule) in cases {
        let err = res.expect_err("size must be rejected").to_string();
        assert!(err.contains(rule), "{err:?} should name the rule {rule:?}");
    }
    assert_eq!(
        ScheduleKind::from_name("DualPipeV"),
        Some(ScheduleKind::DualPipeV)
    );
    assert_eq!(ScheduleKind::from_name("zb"), None);
}
