//! The executor core on simulated devices over the in-process data plane: every schedule kind runs
//! to completion with the transfers it lists, the step time follows the schedule simulator, and a
//! peer that disappears mid-step fails its neighbours' step within the receive timeout with a
//! reason naming the op and the peer.

use std::time::{Duration, Instant};

use comm::{DataPlane, LocalDataPlane};
use executor::{CostTable, ExecError, RankContext, SimulatedCompute, Timeouts, run_step};
use plan::schedule::{Op, ScheduleKind};
use plan::sim::{SimConfig, simulate};

fn costs(ms: f64) -> CostTable {
    let d = |x: f64| Duration::from_secs_f64(x * ms / 1000.0);
    CostTable {
        forward: d(1.0),
        backward: d(2.0),
        backward_input: d(1.0),
        weight: d(1.0),
        overlapped: d(3.0),
    }
}

/// Runs one step of `kind` on `ranks` threads; returns each rank's result.
fn run_all(
    kind: ScheduleKind,
    ranks: u32,
    microbatches: u32,
    table: CostTable,
    timeouts: Timeouts,
    kill: Option<(u32, usize)>,
) -> Vec<executor::Result<executor::StepReport<executor::SimStepOutput>>> {
    let schedule = kind.generate(ranks, microbatches).unwrap();
    let planes = LocalDataPlane::create(ranks as usize);
    let peers: Vec<usize> = (0..ranks as usize).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = planes
            .into_iter()
            .enumerate()
            .map(|(r, plane)| {
                let schedule = &schedule;
                let peers = peers.clone();
                s.spawn(move || {
                    let r32 = r as u32;
                    let mut compute = SimulatedCompute::new(schedule, r32, table, 64);
                    let ctx = RankContext {
                        pipe_rank: r32,
                        peers,
                    };
                    let mut ops: Vec<Op> = schedule.ops[r].clone();
                    if let Some((victim, at)) = kill
                        && victim == r32
                    {
                        // The victim runs only its first `at` ops, then its plane goes away.
                        ops.truncate(at);
                        let out = run_step(&ops, &ctx, &mut compute, &plane, 0, &timeouts);
                        plane.shutdown();
                        return out;
                    }
                    run_step(&ops, &ctx, &mut compute, &plane, 0, &timeouts)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn every_schedule_kind_runs_and_follows_the_simulator() {
    let table = costs(4.0);
    for kind in ScheduleKind::ALL {
        let (p, n) = (4, 8);
        let start = Instant::now();
        let results = run_all(kind, p, n, table, Timeouts::default(), None);
        let wall = start.elapsed().as_secs_f64();
        let schedule = kind.generate(p, n).unwrap();
        let predicted = simulate(&schedule, &SimConfig::with_costs(table.to_sim_costs()))
            .unwrap()
            .makespan;
        let mut slowest: f64 = 0.0;
        for (r, res) in results.into_iter().enumerate() {
            let rep = res.unwrap_or_else(|e| panic!("{kind} rank {r}: {e}"));
            let counts = schedule.counts(r as u32);
            assert_eq!(rep.timings.forward.count, counts.forward);
            assert_eq!(rep.timings.overlapped.count, counts.overlapped);
            assert_eq!(rep.timings.weight.count, counts.weight);
            assert_eq!(rep.timings.send.count, counts.send);
            assert_eq!(rep.timings.recv.count, counts.recv);
            slowest = slowest.max(rep.pipeline_s);
        }
        // Sleep-based ops only ever run late, so the measured time is at least the prediction; the
        // bench checks the 10% band with longer ops, here the bound is loose for loaded CI machines.
        assert!(
            slowest >= predicted * 0.99,
            "{kind}: measured {slowest:.4}s < predicted {predicted:.4}s"
        );
        assert!(
            slowest < predicted * 2.0 + 0.05,
            "{kind}: measured {slowest:.4}s vs predicted {predicted:.4}s"
        );
        assert!(wall >= slowest);
    }
}

#[test]
fn a_lost_peer_fails_its_neighbours_with_a_reason_within_the_timeout() {
    let timeouts = Timeouts {
        recv: Duration::from_millis(400),
        collective: Duration::from_millis(400),
    };
    // Rank 2 of a 4-rank 1F1B pipeline runs its first 3 ops, then disappears.
    let start = Instant::now();
    let results = run_all(
        ScheduleKind::OneFOneB,
        4,
        8,
        costs(0.5),
        timeouts,
        Some((2, 3)),
    );
    assert!(start.elapsed() < Duration::from_secs(5), "no rank may hang");
    for r in [1usize, 3] {
        let err = results[r]
            .as_ref()
            .err()
            .unwrap_or_else(|| panic!("rank {r} should fail"));
        let text = err.to_string();
        assert!(
            matches!(
                err,
                ExecError::Recv { peer: 2, .. } | ExecError::Send { peer: 2, .. }
            ),
            "rank {r}: {text}"
        );
        assert!(
            text.contains("pipeline rank 2") && text.contains("op "),
            "rank {r}: {text}"
        );
    }
}

#[test]
fn a_silent_peer_times_out_naming_the_receive() {
    let timeouts = Timeouts {
        recv: Duration::from_millis(150),
        collective: Duration::from_millis(150),
    };
    let schedule = ScheduleKind::DualPipe.generate(2, 4).unwrap();
    let planes = LocalDataPlane::create(2);
    let ctx = RankContext {
        pipe_rank: 0,
        peers: vec![0, 1],
    };
    let mut compute = SimulatedCompute::new(&schedule, 0, costs(0.1), 16);
    // Rank 1 never runs, but its plane stays up: rank 0 must time out instead of hanging.
    let start = Instant::now();
    let err = run_step(
        &schedule.ops[0],
        &ctx,
        &mut compute,
        &planes[0],
        7,
        &timeouts,
    )
    .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(2));
    let text = err.to_string();
    assert!(
        text.contains("step 7") && text.contains("recv") && text.contains("timed out"),
        "{text}"
    );
    drop(planes);
}

#[test]
fn an_inconsistent_op_list_is_rejected_with_the_op() {
    use plan::schedule::Chunk;
    let schedule = ScheduleKind::OneFOneB.generate(1, 2).unwrap();
    let planes = LocalDataPlane::create(1);
    let ctx = RankContext {
        pipe_rank: 0,
        peers: vec![0],
    };
    let mut compute = SimulatedCompute::new(&schedule, 0, costs(0.0), 8);
    // A weight op with nothing deferred.
    let ops = [Op::Forward(Chunk::new(0, 0)), Op::Weight(Chunk::new(0, 0))];
    let err = run_step(
        &ops,
        &ctx,
        &mut compute,
        &planes[0],
        0,
        &Timeouts::default(),
    )
    .unwrap_err();
    assert!(matches!(err, ExecError::Schedule { index: 1, .. }), "{err}");
    // A forward whose activation is never consumed (a 2-rank stage 0 with its send left out).
    let two = ScheduleKind::OneFOneB.generate(2, 1).unwrap();
    let mut compute = SimulatedCompute::new(&two, 0, costs(0.0), 8);
    let ctx2 = RankContext {
        pipe_rank: 0,
        peers: vec![0, 0],
    };
    let ops = [Op::Forward(Chunk::new(0, 0))];
    let err = run_step(
        &ops,
        &ctx2,
        &mut compute,
        &planes[0],
        0,
        &Timeouts::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("unsent activations 0:0"), "{err}");
}

#[test]
fn simulated_data_parallel_replicas_sync_gradients_at_step_end() {
    use comm::Group;
    use executor::SimGradSync;
    // Pipeline 2 × data 2: data-plane rank = replica · 2 + pipeline rank.
    let schedule = ScheduleKind::OneFOneB.generate(2, 2).unwrap();
    let planes = LocalDataPlane::create(4);
    let reports: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = planes
            .iter()
            .enumerate()
            .map(|(rank, plane)| {
                let schedule = &schedule;
                s.spawn(move || {
                    let (pipe, replica) = (rank % 2, rank / 2);
                    let ctx = RankContext {
                        pipe_rank: pipe as u32,
                        peers: vec![replica * 2, replica * 2 + 1],
                    };
                    let group = Group::new(vec![pipe, pipe + 2]).unwrap();
                    let mut compute = SimulatedCompute::new(schedule, pipe as u32, costs(0.2), 32)
                        .with_grad_sync(SimGradSync {
                            group,
                            elements: 1000,
                        });
                    run_step(
                        &schedule.ops[pipe],
                        &ctx,
                        &mut compute,
                        plane,
                        3,
                        &Timeouts::default(),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (rank, r) in reports.into_iter().enumerate() {
        let rep = r.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
        assert_eq!(rep.timings.step_end.count, 1);
        assert!(rep.output.grad_sync_s > 0.0);
        // Each rank sends one activation or one gradient per micro-batch (2 micro-batches).
        assert_eq!(rep.output.bytes_sent, 2 * 32);
    }
}
