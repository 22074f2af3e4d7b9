//! Simulator tests: with unit costs F = I = W = 1, B = 2, F&B = 3 and no communication time, every
//! rank's idle time (makespan − busy, see `plan::sim`) equals the DualPipe README formulas for P up to
//! 16; peak live activations equal Table 2; and broken op lists are reported, naming ranks and ops.

use plan::schedule::{
    Chunk, Op, Payload, Schedule, ScheduleKind, Transfer, dualpipe, dualpipev, one_f_one_b,
};
use plan::sim::{Costs, SimConfig, SimError, check, simulate};

fn unit(s: &Schedule) -> plan::sim::SimReport {
    simulate(s, &SimConfig::with_costs(Costs::unit()))
        .unwrap_or_else(|e| panic!("{} P={}: {e}", s.kind, s.ranks))
}

#[test]
fn one_f_one_b_idle_is_p_minus_1_times_f_plus_b() {
    let c = Costs::unit();
    for p in 1..=16u32 {
        for n in [p, 2 * p, 4 * p + 1] {
            let rep = unit(&one_f_one_b(p, n).expect("valid"));
            let expected = f64::from(p - 1) * (c.forward + c.backward);
            for (r, rank) in rep.ranks.iter().enumerate() {
                assert_eq!(rank.idle, expected, "1F1B P={p} N={n} rank {r}");
            }
            assert_eq!(
                rep.ranks[0].peak_live_chunks,
                p.min(n),
                "1F1B rank 0 holds P micro-batches"
            );
        }
    }
}

#[test]
fn dualpipe_idle_is_half_pp_minus_1_times_fb_plus_b_minus_3w() {
    let c = Costs::unit();
    for p in (2..=16u32).step_by(2) {
        for n in [2 * p, 2 * p + 2, 4 * p] {
            let rep = unit(&dualpipe(p, n).expect("valid"));
            let expected = f64::from(p / 2 - 1) * (c.overlapped + c.backward - 3.0 * c.weight);
            for (r, rank) in rep.ranks.iter().enumerate() {
                assert_eq!(rank.idle, expected, "DualPipe P={p} N={n} rank {r}");
                assert_eq!(
                    rank.peak_live_chunks,
                    p + 1,
                    "DualPipe P={p} N={n} rank {r}: PP + 1 activations"
                );
            }
        }
    }
}

#[test]
fn dualpipev_idle_is_half_pp_minus_1_times_fb_plus_b_minus_3w() {
    let c = Costs::unit();
    for p in 1..=16u32 {
        for n in [2 * p, 2 * p + 1, 4 * p] {
            let rep = unit(&dualpipev(p, n).expect("valid"));
            let pp = 2 * p;
            let expected = f64::from(pp / 2 - 1) * (c.overlapped + c.backward - 3.0 * c.weight);
            for (r, rank) in rep.ranks.iter().enumerate() {
                assert_eq!(rank.idle, expected, "DualPipeV P={p} N={n} rank {r}");
                assert_eq!(
                    rank.peak_live_chunks,
                    pp + 1,
                    "DualPipeV P={p} N={n} rank {r}: PP + 1 activations"
                );
            }
        }
    }
}

#[test]
fn busy_time_and_makespan_add_up() {
    let s = dualpipe(4, 8).expect("valid");
    let rep = unit(&s);
    // Every rank computes N forwards and N backwards: 8 × (1 + 2) = 24 units; the bubble is 2.
    assert_eq!(rep.makespan, 26.0);
    for (r, rank) in rep.ranks.iter().enumerate() {
        assert_eq!(rank.busy, 24.0);
        assert_eq!(rank.spans.len(), s.compute_ops(r as u32).count());
        assert!(
            rank.spans.windows(2).all(|w| w[0].end <= w[1].start),
            "spans are ordered and disjoint"
        );
    }
}

#[test]
fn communication_time_delays_but_does_not_deadlock() {
    for kind in ScheduleKind::ALL {
        let s = kind.generate(8, 32).expect("valid");
        let mut costs = Costs::unit();
        let base = simulate(&s, &SimConfig::with_costs(costs))
            .expect("runs")
            .makespan;
        costs.comm = 0.5;
        let slow = simulate(&s, &SimConfig::with_costs(costs))
            .expect("runs")
            .makespan;
        assert!(slow > base, "{kind}: comm time {slow} vs {base}");
    }
}

#[test]
fn activation_bytes_follow_the_stage_sizes() {
    let s = dualpipev(2, 4).expect("valid");
    // Stages 0..4 keep 10, 20, 30, 40 bytes per micro-batch; rank 0 holds stages 0 and 3.
    let cfg = SimConfig {
        costs: Costs::unit(),
        activation_bytes_per_stage: vec![10, 20, 30, 40],
    };
    let rep = simulate(&s, &cfg).expect("runs");
    let r0 = &rep.ranks[0];
    assert_eq!(r0.peak_live_chunks, 5);
    assert!(
        r0.peak_live_bytes >= 5 * 10 && r0.peak_live_bytes <= 5 * 40,
        "{}",
        r0.peak_live_bytes
    );
    let one_f = simulate(
        &one_f_one_b(3, 6).expect("valid"),
        &SimConfig {
            costs: Costs::unit(),
            activation_bytes_per_stage: vec![7; 3],
        },
    )
    .expect("runs");
    assert_eq!(one_f.ranks[0].peak_live_bytes, 21);
}

#[test]
fn a_missing_send_is_a_deadlock_naming_the_blocked_ranks() {
    let mut s = one_f_one_b(3, 3).expect("valid");
    let last_send = s.ops[0]
        .iter()
        .rposition(|op| matches!(op, Op::Send(_)))
        .expect("rank 0 sends");
    assert_eq!(s.ops[0][last_send].to_string(), "send activation 0:2 to 1");
    s.ops[0].remove(last_send);
    match check(&s) {
        Err(SimError::Deadlock { blocked }) => {
            assert!(
                blocked
                    .iter()
                    .any(|b| b.rank == 1 && matches!(b.op, Op::Recv(t) if t.peer == 0)),
                "{blocked:?}"
            );
            let text = SimError::Deadlock { blocked }.to_string();
            assert!(text.contains("(recv activation 0:2 from 0)"), "{text}");
            assert!(
                text.contains("rank 0 stuck at op"),
                "rank 0 waits for a gradient too: {text}"
            );
        }
        other => panic!("expected a deadlock, got {other:?}"),
    }
}

#[test]
fn a_receive_cycle_is_a_deadlock_naming_both_ranks() {
    let t = |peer, payload, mb| Transfer {
        peer,
        payload,
        chunk: Chunk::new(0, mb),
    };
    let s = Schedule {
        kind: ScheduleKind::OneFOneB,
        ranks: 2,
        microbatches: 1,
        ops: vec![
            vec![
                Op::Recv(t(1, Payload::Gradient, 0)),
                Op::Forward(Chunk::new(0, 0)),
                Op::Send(t(1, Payload::Activation, 0)),
            ],
            vec![
                Op::Recv(t(0, Payload::Activation, 0)),
                Op::Forward(Chunk::new(0, 0)),
                Op::Backward(Chunk::new(0, 0)),
            ],
        ],
    };
    match check(&s) {
        Err(SimError::Deadlock { blocked }) => {
            let ranks: Vec<u32> = blocked.iter().map(|b| b.rank).collect();
            assert_eq!(ranks, vec![0, 1]);
        }
        other => panic!("expected a deadlock, got {other:?}"),
    }
}

#[test]
fn swapped_messages_are_an_order_mismatch() {
    let mut s = dualpipe(4, 8).expect("valid");
    // Rank 0's first two compute ops are F0:0, F0:1; swap the two activation sends to rank 1.
    let sends: Vec<usize> = s.ops[0]
        .iter()
        .enumerate()
        .filter(
            |(_, op)| matches!(op, Op::Send(t) if t.payload == Payload::Activation && t.peer == 1),
        )
        .map(|(i, _)| i)
        .take(2)
        .collect();
    s.ops[0].swap(sends[0], sends[1]);
    // The swapped list either sends F0:1 before its forward ran, or rank 1 sees it first.
    let err = check(&s).expect_err("must be rejected");
    assert!(
        matches!(
            err,
            SimError::MissingInput { rank: 0, .. } | SimError::OrderMismatch { rank: 1, .. }
        ),
        "{err}"
    );
}

#[test]
fn a_backward_before_its_forward_is_rejected() {
    let mut s = one_f_one_b(1, 2).expect("valid");
    // Rank 0 of a one-rank 1F1B is F0:0 B0:0 F0:1 B0:1; move B0:1 to the front.
    let last = s.ops[0].pop().expect("non-empty");
    s.ops[0].insert(0, last);
    let err = check(&s).expect_err("must be rejected");
    assert!(
        err.to_string()
            .contains("needs the forward of 0:1 to have run first"),
        "{err}"
    );
}
