//! Unit tests of every core decision, on hand-built state with explicit `now` (no network, no
//! clock, no store).

use super::*;
use crate::Config;

const T0: UnixMs = 1_000_000;

fn spec(name: &str, pipeline: u32, data: u32, expert: u32, schedule: &str) -> pb::JobSpec {
    pb::JobSpec {
        name: name.into(),
        pipeline,
        data,
        expert,
        schedule: schedule.into(),
        micro_batches: 2 * pipeline,
        steps: 10,
        n_routed_experts: 8,
        n_group: 4,
        device_kind: pb::DeviceKind::Cpu as i32,
        heartbeat_interval_ms: 0,
        failure_timeout_ms: 0,
        ..Default::default()
    }
}

fn submit(core: &mut Core, spec: pb::JobSpec, now: UnixMs) -> Vec<Action> {
    core.handle(
        Event::Submit(Box::new(Submission {
            spec,
            manifest_yaml: "apiVersion: moetrain/v1".into(),
            overrides: vec![],
            origin: "test.yaml".into(),
        })),
        now,
    )
    .expect("submit")
}

fn register_kind(
    core: &mut Core,
    id: &str,
    node: &str,
    index: u32,
    kind: pb::DeviceKind,
    now: UnixMs,
) -> Vec<Action> {
    core.handle(
        Event::Register {
            reg: Registration {
                worker_id: id.into(),
                node: node.into(),
                devices: vec![pb::Device {
                    kind: kind as i32,
                    index,
                    memory_bytes: 1 << 30,
                    data_plane_addr: String::new(),
                }],
                data_plane_addr: format!("127.0.0.1:{}", 9000 + index),
            },
            session: 1,
        },
        now,
    )
    .expect("register")
}

fn register(core: &mut Core, id: &str, node: &str, index: u32, now: UnixMs) -> Vec<Action> {
    register_kind(core, id, node, index, pb::DeviceKind::Cpu, now)
}

/// Registers `nodes × per_node` workers named `n{node}-d{device}`.
fn cluster(core: &mut Core, nodes: u32, per_node: u32, now: UnixMs) -> Vec<Action> {
    let mut actions = Vec::new();
    for n in 0..nodes {
        for d in 0..per_node {
            actions.extend(register(
                core,
                &format!("n{n}-d{d}"),
                &format!("n{n}"),
                d,
                now,
            ));
        }
    }
    actions
}

fn phase(core: &Core, job: &str) -> pb::JobPhase {
    core.state.jobs[job].phase()
}

fn last_reason(core: &Core, job: &str) -> String {
    core.state.jobs[job]
        .stored
        .transitions
        .last()
        .map(|t| t.reason.clone())
        .unwrap_or_default()
}

fn event_kinds(core: &Core, job: &str) -> Vec<String> {
    core.state.jobs[job]
        .events
        .iter()
        .map(|e| e.kind.clone())
        .collect()
}

fn sends(actions: &[Action]) -> Vec<(String, pb::coordinator_message::Msg)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { worker, msg } => msg.msg.clone().map(|m| (worker.clone(), m)),
            _ => None,
        })
        .collect()
}

fn assignments(actions: &[Action]) -> Vec<(String, pb::Assignment)> {
    sends(actions)
        .into_iter()
        .filter_map(|(w, m)| match m {
            pb::coordinator_message::Msg::Assignment(a) => Some((w, a)),
            _ => None,
        })
        .collect()
}

fn ready_all(core: &mut Core, job: &str, now: UnixMs) -> Vec<Action> {
    let held: Vec<(String, u32)> = core
        .state
        .workers
        .iter()
        .flat_map(|(id, w)| {
            w.stored
                .held
                .iter()
                .filter(|h| h.job == job)
                .map(|h| (id.clone(), h.rank))
                .collect::<Vec<_>>()
        })
        .collect();
    let mut actions = Vec::new();
    for (worker, rank) in held {
        actions.extend(
            core.handle(
                Event::Ack {
                    worker,
                    job: job.into(),
                    rank,
                    ready: true,
                    reason: String::new(),
                },
                now,
            )
            .expect("ack"),
        );
    }
    actions
}

#[test]
fn submit_starts_pending_with_a_stored_transition() {
    let mut core = Core::new(Config::default());
    let actions = submit(&mut core, spec("a", 2, 2, 2, "dualpipe"), T0);
    assert_eq!(phase(&core, "a"), pb::JobPhase::Pending);
    let t = &core.state.jobs["a"].stored.transitions[0];
    assert_eq!(
        (t.from, t.to, t.unix_ms, t.reason.as_str()),
        (0, pb::JobPhase::Pending as i32, T0, "submitted")
    );
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::PutJob(j) if j.spec.as_ref().unwrap().name == "a"))
    );
}

#[test]
fn duplicate_and_invalid_submissions_are_refused() {
    let mut core = Core::new(Config::default());
    submit(&mut core, spec("a", 2, 2, 2, "dualpipe"), T0);
    let dup = Event::Submit(Box::new(Submission {
        spec: spec("a", 2, 2, 2, "dualpipe"),
        manifest_yaml: String::new(),
        overrides: vec![],
        origin: String::new(),
    }));
    assert_eq!(core.handle(dup, T0), Err(CoreError::JobExists("a".into())));
    let mut bad = spec("b", 2, 3, 2, "dualpipe");
    bad.n_routed_experts = 8;
    let err = core
        .handle(
            Event::Submit(Box::new(Submission {
                spec: bad,
                manifest_yaml: String::new(),
                overrides: vec![],
                origin: String::new(),
            })),
            T0,
        )
        .unwrap_err();
    assert!(
        matches!(err, CoreError::Invalid(ref m) if m.contains("expert")),
        "{err}"
    );
}

#[test]
fn gang_scheduling_waits_for_every_device_then_places_all_ranks_at_once() {
    let mut core = Core::new(Config::default());
    submit(&mut core, spec("a", 2, 2, 2, "dualpipe"), T0);
    let actions = cluster(&mut core, 1, 3, T0);
    assert!(
        assignments(&actions).is_empty(),
        "no rank may be placed before the whole gang fits"
    );
    assert_eq!(phase(&core, "a"), pb::JobPhase::Pending);
    assert_eq!(
        core.state.jobs["a"].stored.wait_reason,
        "not enough free devices: needs 4 free cpu devices for all ranks at once, 3 free"
    );
    let actions = register(&mut core, "n0-d3", "n0", 3, T0 + 10);
    let placed = assignments(&actions);
    assert_eq!(placed.len(), 4);
    assert_eq!(phase(&core, "a"), pb::JobPhase::Scheduled);
    assert_eq!(
        last_reason(&core, "a"),
        "gang-scheduled: 4 ranks placed on 4 free cpu devices in 1 nodes"
    );
    let placement = core.state.jobs["a"].stored.placement.clone().unwrap();
    let ranks: Vec<u32> = placement.ranks.iter().map(|r| r.rank).collect();
    assert_eq!(ranks, vec![0, 1, 2, 3]);
    let devices: BTreeSet<(String, u32)> = placement
        .ranks
        .iter()
        .map(|r| (r.node.clone(), r.device_index))
        .collect();
    assert_eq!(devices.len(), 4, "no device holds two ranks");
    // DualPipe rank r holds stages r and P-1-r.
    assert_eq!(placement.ranks[0].stages, vec![0, 1]);
    assert_eq!(placement.ranks[2].stages, vec![1, 0]);
    assert!(placement.reasons.iter().any(|r| r.starts_with("layout:")));
    for (worker, a) in &placed {
        assert_eq!(a.peers.len(), 4);
        assert_eq!(&a.peers[a.rank as usize].worker_id, worker);
        assert!(
            core.state.workers[worker]
                .stored
                .held
                .iter()
                .any(|h| h.job == "a" && h.rank == a.rank)
        );
    }
    assert_eq!(
        event_kinds(&core, "a"),
        vec!["Submitted", "Waiting", "Placed"]
    );
}

#[test]
fn a_waiting_job_records_its_reason_only_when_it_changes() {
    let mut core = Core::new(Config::default());
    submit(&mut core, spec("a", 2, 2, 2, "dualpipe"), T0);
    core.handle(Event::Tick, T0 + 1).unwrap();
    core.handle(Event::Tick, T0 + 2).unwrap();
    assert_eq!(event_kinds(&core, "a"), vec!["Submitted", "Waiting"]);
    register(&mut core, "w", "n0", 0, T0 + 3);
    assert_eq!(
        event_kinds(&core, "a"),
        vec!["Submitted", "Waiting"],
        "same cause, new count"
    );
    assert!(core.state.jobs["a"].events[1].message.ends_with("0 free"));
    assert!(core.state.jobs["a"].stored.wait_reason.ends_with("1 free"));
}

#[test]
fn jobs_are_served_in_submission_order_and_later_small_jobs_backfill() {
    let mut core = Core::new(Config::default());
    submit(&mut core, spec("big", 4, 2, 2, "dualpipe"), T0);
    submit(&mut core, spec("first", 2, 1, 1, "1f1b"), T0 + 1);
    submit(&mut core, spec("second", 2, 1, 1, "1f1b"), T0 + 2);
    cluster(&mut core, 1, 3, T0 + 3);
    assert_eq!(phase(&core, "big"), pb::JobPhase::Pending);
    assert_eq!(phase(&core, "first"), pb::JobPhase::Scheduled);
    assert_eq!(phase(&core, "second"), pb::JobPhase::Pending);
    assert_eq!(
        core.state.jobs["second"].stored.wait_reason,
        "not enough free devices: needs 2 free cpu devices for all ranks at once, 1 free"
    );
}

#[test]
fn only_devices_of_the_jobs_kind_count() {
    let mut core = Core::new(Config::default());
    let mut s = spec("sim", 2, 1, 1, "1f1b");
    s.device_kind = pb::DeviceKind::Simulated as i32;
    submit(&mut core, s, T0);
    cluster(&mut core, 1, 2, T0);
    assert_eq!(phase(&core, "sim"), pb::JobPhase::Pending);
    register_kind(&mut core, "s0", "n9", 0, pb::DeviceKind::Simulated, T0);
    register_kind(&mut core, "s1", "n9", 1, pb::DeviceKind::Simulated, T0);
    assert_eq!(phase(&core, "sim"), pb::JobPhase::Scheduled);
    let placed: BTreeSet<String> = core.state.jobs["sim"]
        .stored
        .placement
        .as_ref()
        .unwrap()
        .ranks
        .iter()
        .map(|r| r.worker_id.clone())
        .collect();
    assert_eq!(placed, BTreeSet::from(["s0".to_string(), "s1".to_string()]));
}

#[test]
fn disconnected_and_lost_workers_offer_no_devices() {
    let mut core = Core::new(Config::default());
    cluster(&mut core, 1, 2, T0);
    core.handle(
        Event::Disconnected {
            worker: "n0-d1".into(),
            session: 1,
        },
        T0,
    )
    .unwrap();
    submit(&mut core, spec("a", 2, 1, 1, "1f1b"), T0);
    assert_eq!(phase(&core, "a"), pb::JobPhase::Pending);
    // A disconnect of an older session does not affect the current one.
    register(&mut core, "n0-d1", "n0", 1, T0 + 1);
    core.state.workers.get_mut("n0-d1").unwrap().session = 2;
    core.handle(
        Event::Disconnected {
            worker: "n0-d1".into(),
            session: 1,
        },
        T0 + 1,
    )
    .unwrap();
    assert!(core.state.workers["n0-d1"].connected);
}

#[test]
fn the_job_runs_when_every_rank_is_ready() {
    let mut core = Core::new(Config::default());
    submit(&mut core, spec("a", 2, 2, 2, "dualpipe"), T0);
    cluster(&mut core, 2, 2, T0);
    let held: Vec<(String, u32)> = core
        .state
        .workers
        .iter()
        .map(|(id, w)| (id.clone(), w.stored.held[0].rank))
        .collect();
    for (i, (worker, rank)) in held.iter().enumerate() {
        assert_eq!(
            phase(&core, "a"),
            pb::JobPhase::Scheduled,
            "not all ready after {i}"
        );
        core.handle(
            Event::Ack {
                worker: worker.clone(),
                job: "a".into(),
                rank: *rank,
                ready: true,
                reason: String::new(),
            },
            T0 + 5,
        )
        .unwrap();
    }
    assert_eq!(phase(&core, "a"), pb::JobPhase::Running);
    assert_eq!(last_reason(&core, "a"), "all 4 ranks reported ready");
    // A repeated ack (after a resend) changes nothing.
    let (worker, rank) = held[0].clone();
    core.handle(
        Event::Ack {
            worker,
            job: "a".into(),
            rank,
            ready: true,
            reason: String::new(),
        },
        T0 + 6,
    )
    .unwrap();
    assert_eq!(core.state.jobs["a"].stored.transitions.len(), 3);
}

#[test]
fn an_ack_for_a_rank_the_worker_does_not_hold_is_refused() {
    let mut core = Core::new(Config::default());
    submit(&mut core, spec("a", 2, 1, 1, "1f1b"), T0);
    cluster(&mut core, 1, 3, T0);
    let idle = core
        .state
        .workers
        .iter()
        .find(|(_, w)| w.stored.held.is_empty())
        .map(|(id, _)| id.clone())
        .unwrap();
    let err = core
        .handle(
            Event::Ack {
                worker: idle.clone(),
                job: "a".into(),
                rank: 0,
                ready: true,
                reason: String::new(),
            },
            T0,
        )
        .unwrap_err();
    assert_eq!(
        err,
        CoreError::NotHeld {
            worker: idle,
            job: "a".into(),
            rank: 0
        }
    );
}

#[test]
fn a_rejected_assignment_fails_the_job_and_stops_the_other_ranks() {
    let mut core = Core::new(Config::default());
    submit(&mut core, spec("a", 2, 1, 1, "1f1b"), T0);
    cluster(&mut core, 1, 2, T0);
    let actions = core
        .handle(
            Event::Ack {
                worker: "n0-d0".into(),
                job: "a".into(),
                rank: core.state.workers["n0-d0"].stored.held[0].rank,
                ready: false,
                reason: "no memory".into(),
            },
            T0 + 1,
        )
        .unwrap();
    assert_eq!(phase(&core, "a"), pb::JobPhase::Failed);
    assert!(
        last_reason(&core, "a").ends_with("rejected its assignment on worker n0-d0: no memory")
    );
    let stops: Vec<String> = sends(&actions).into_iter().filter(|(_, m)| matches!(m, pb::coordinator_message::Msg::Command(c) if c.kind == pb::CommandKind::Stop as i32)).map(|(w, _)| w).collect();
    assert_eq!(stops, vec!["n0-d0", "n0-d1"]);
    assert!(
        core.state
            .workers
            .values()
            .all(|w| w.stored.held.is_empty())
    );
}

#[test]
fn cancel_frees_every_worker_and_is_refused_twice() {
    let mut core = Core::new(Config::default());
    submit(&mut core, spec("a", 2, 2, 2, "dualpipe"), T0);
    cluster(&mut core, 1, 4, T0);
    ready_all(&mut core, "a", T0 + 1);
    let actions = core
        .handle(
            Event::Cancel {
                job: "a".into(),
                reason: String::new(),
            },
            T0 + 2,
        )
        .unwrap();
    assert_eq!(phase(&core, "a"), pb::JobPhase::Cancelled);
    assert_eq!(last_reason(&core, "a"), "cancelled by user");
    let cancels = sends(&actions).into_iter().filter(|(_, m)| matches!(m, pb::coordinator_message::Msg::Command(c) if c.kind == pb::CommandKind::Cancel as i32)).count();
    assert_eq!(cancels, 4);
    assert!(actions.contains(&Action::DeleteAssignments { job: "a".into() }));
    assert!(
        core.state
            .workers
            .values()
            .all(|w| w.stored.held.is_empty())
    );
    assert!(core.state.assignments.is_empty());
    assert_eq!(
        core.handle(
            Event::Cancel {
                job: "a".into(),
                reason: String::new()
            },
            T0 + 3
        ),
        Err(CoreError::JobEnded {
            job: "a".into(),
            phase: "Cancelled"
        })
    );
    assert_eq!(
        core.handle(
            Event::Cancel {
                job: "zz".into(),
                reason: String::new()
            },
            T0
        ),
        Err(CoreError::UnknownJob("zz".into()))
    );
    // Freed workers take the next job at once.
    submit(&mut core, spec("b", 2, 2, 2, "dualpipe"), T0 + 4);
    assert_eq!(phase(&core, "b"), pb::JobPhase::Scheduled);
}

#[test]
fn liveness_is_a_pure_function_of_state_time_and_config() {
    let mut state = State::default();
    state.workers.insert(
        "w".into(),
        WorkerEntry {
            stored: pb::StoredWorker {
                worker_id: "w".into(),
                ..Default::default()
            },
            last_seen: T0,
            connected: true,
            session: 1,
        },
    );
    let config = Config::default();
    let at = |now| liveness(&state, now, &config);
    assert_eq!(at(T0 + 5000)[0].verdict, Verdict::Alive);
    assert_eq!(
        at(T0 + 5000)[0].reason,
        "last heard 5.0s ago, failure timeout 5.0s"
    );
    assert_eq!(at(T0 + 5001)[0].verdict, Verdict::Lost);
    assert_eq!(
        at(T0 + 5200)[0].reason,
        "silent for 5.2s, failure timeout 5.0s"
    );
    // A job's manifest may ask for a shorter timeout for the workers holding its ranks.
    let mut job = JobEntry::default();
    job.stored.spec = Some(pb::JobSpec {
        failure_timeout_ms: 2000,
        ..Default::default()
    });
    state.jobs.insert("j".into(), job);
    state
        .workers
        .get_mut("w")
        .unwrap()
        .stored
        .held
        .push(pb::HeldRank {
            job: "j".into(),
            rank: 0,
            device_index: 0,
            next_step: 0,
        });
    state.workers.get_mut("w").unwrap().connected = false;
    let v = liveness(&state, T0 + 2500, &config);
    assert_eq!(
        (v[0].verdict, v[0].reason.as_str()),
        (
            Verdict::Lost,
            "silent for 2.5s, failure timeout 2.0s, session closed"
        )
    );
    // The tick's fast path finds exactly the lost ones.
    let lost: Vec<_> = v
        .iter()
        .filter(|x| x.verdict == Verdict::Lost)
        .cloned()
        .collect();
    assert_eq!(newly_lost(&state, T0 + 2500, &config), lost);
    assert!(newly_lost(&state, T0 + 1500, &config).is_empty());
    // Lost workers get no further verdicts.
    state.workers.get_mut("w").unwrap().stored.lost = true;
    assert!(liveness(&state, T0 + 9000, &config).is_empty());
}

#[test]
fn a_silent_worker_is_lost_and_its_job_fails_with_the_reason() {
    let mut core = Core::new(Config::default());
    submit(&mut core, spec("a", 2, 2, 2, "dualpipe"), T0);
    cluster(&mut core, 1, 4, T0);
    ready_all(&mut core, "a", T0);
    // Everyone but n0-d2 keeps heartbeating.
    for t in [T0 + 2000, T0 + 4000, T0 + 6000] {
        for w in ["n0-d0", "n0-d1", "n0-d3"] {
            core.heartbeat(w, t).unwrap();
        }
        core.handle(Event::Tick, t).unwrap();
    }
    assert_eq!(phase(&core, "a"), pb::JobPhase::Failed);
    let rank = core.state.jobs["a"]
        .stored
        .placement
        .as_ref()
        .unwrap()
        .ranks
        .iter()
        .find(|r| r.worker_id == "n0-d2")
        .unwrap()
        .rank;
    assert_eq!(
        last_reason(&core, "a"),
        format!("worker n0-d2 (rank {rank}) lost: silent for 6.0s, failure timeout 5.0s")
    );
    assert!(event_kinds(&core, "a").contains(&"WorkerLost".to_string()));
    let w = &core.state.workers["n0-d2"];
    assert!(w.stored.lost && w.stored.held.is_empty());
    assert_eq!(
        w.stored.reason,
        "lost: silent for 6.0s, failure timeout 5.0s"
    );
    assert!(
        core.state
            .workers
            .values()
            .all(|w| w.stored.held.is_empty())
    );
    // The lost worker comes back by registering again, and offers its device again.
    register(&mut core, "n0-d2", "n0", 2, T0 + 7000);
    assert!(!core.state.workers["n0-d2"].stored.lost);
}

#[test]
fn a_reconnecting_worker_resumes_and_gets_its_assignments_again() {
    let mut core = Core::new(Config::default());
    submit(&mut core, spec("a", 2, 1, 1, "1f1b"), T0);
    cluster(&mut core, 1, 2, T0);
    core.handle(
        Event::Disconnected {
            worker: "n0-d0".into(),
            session: 1,
        },
        T0 + 100,
    )
    .unwrap();
    let actions = register(&mut core, "n0-d0", "n0", 0, T0 + 200);
    let msgs = sends(&actions);
    assert!(
        matches!(&msgs[0], (w, pb::coordinator_message::Msg::Registered(r)) if w == "n0-d0" && r.resumed && r.failure_timeout_ms == 5000)
    );
    assert_eq!(assignments(&actions).len(), 1);
    assert_eq!(core.state.workers["n0-d0"].stored.registered_unix_ms, T0);
    assert_eq!(phase(&core, "a"), pb::JobPhase::Scheduled);
    assert!(event_kinds(&core, "a").contains(&"WorkerResumed".to_string()));
}

#[test]
fn ranks_finishing_end_the_job_succeeded_or_failed() {
    let mut core = Core::new(Config::default());
    submit(&mut core, spec("a", 2, 1, 1, "1f1b"), T0);
    submit(&mut core, spec("b", 2, 1, 1, "1f1b"), T0);
    cluster(&mut core, 1, 4, T0);
    let holder = |core: &Core, job: &str, rank: u32| {
        core.state
            .workers
            .iter()
            .find(|(_, w)| w.stored.held.iter().any(|h| h.job == job && h.rank == rank))
            .map(|(id, _)| id.clone())
            .unwrap()
    };
    for rank in 0..2 {
        let worker = holder(&core, "a", rank);
        core.handle(
            Event::RankFinished {
                worker,
                job: "a".into(),
                rank,
                ok: true,
                reason: String::new(),
                deterministic: false,
            },
            T0 + 1,
        )
        .unwrap();
    }
    assert_eq!(phase(&core, "a"), pb::JobPhase::Succeeded);
    assert_eq!(last_reason(&core, "a"), "all 2 ranks finished");
    let worker = holder(&core, "b", 1);
    core.handle(
        Event::RankFinished {
            worker: worker.clone(),
            job: "b".into(),
            rank: 1,
            ok: false,
            reason: "recv timed out".into(),
            deterministic: false,
        },
        T0 + 2,
    )
    .unwrap();
    assert_eq!(phase(&core, "b"), pb::JobPhase::Failed);
    assert_eq!(
        last_reason(&core, "b"),
        format!("rank 1 failed on worker {worker}: recv timed out")
    );
}

/// The worker holding each rank of `job`, in rank order.
fn holders_of(core: &Core, job: &str) -> Vec<String> {
    core.state.jobs[job]
        .stored
        .placement
        .as_ref()
        .expect("placed")
        .ranks
        .iter()
        .map(|r| r.worker_id.clone())
        .collect()
}

fn losses(total: f64) -> Vec<pb::LossTerm> {
    ["main", "mtp", "balance", "total"]
        .iter()
        .zip([total - 0.5, 0.4, 0.1, total])
        .map(|(n, v)| pb::LossTerm {
            name: (*n).into(),
            value: v,
        })
        .collect()
}

fn report(job: &str, rank: u32, step: u64, seconds: f64) -> pb::StepReport {
    pb::StepReport {
        job: job.into(),
        rank,
        step,
        tokens: 100,
        step_seconds: seconds,
        losses: losses(2.5 - step as f64 * 0.1),
        grad_norm: 1.5,
        lr: 1e-3,
        bias_checksum: routing::rank_checksum(std::iter::empty()),
        ..Default::default()
    }
}

fn send_report(core: &mut Core, worker: &str, r: pb::StepReport, now: UnixMs) -> Vec<Action> {
    core.handle(
        Event::StepReport {
            worker: worker.into(),
            report: Box::new(r),
        },
        now,
    )
    .expect("step report")
}

#[test]
fn step_reports_move_progress_when_every_rank_has_reported() {
    let mut core = Core::new(Config::default());
    submit(&mut core, spec("a", 2, 1, 1, "1f1b"), T0);
    cluster(&mut core, 1, 2, T0);
    ready_all(&mut core, "a", T0);
    let w = holders_of(&core, "a");
    send_report(&mut core, &w[0], report("a", 0, 0, 0.5), T0 + 1);
    assert_eq!(core.state.jobs["a"].stored.progress, None, "rank 1 missing");
    // Rank 0 runs one step ahead; rank 1's step 0 then finishes step 0 only.
    send_report(&mut core, &w[0], report("a", 0, 1, 0.5), T0 + 2);
    let acts = send_report(&mut core, &w[1], report("a", 1, 0, 0.25), T0 + 3);
    assert!(
        acts.iter().any(|a| matches!(a, Action::PutJob(_))),
        "progress is stored"
    );
    let p = core.state.jobs["a"].stored.progress.clone().unwrap();
    assert_eq!(
        (
            p.step,
            p.tokens,
            p.loss,
            p.tokens_per_second,
            p.step_seconds
        ),
        (1, 100, 2.5, 200.0, 0.5),
        "tokens count once per step; the slowest rank's time"
    );
    assert_eq!((p.grad_norm, p.lr, p.losses.len()), (1.5, 1e-3, 4));
    // Duplicate, stale and out-of-range reports change nothing.
    send_report(&mut core, &w[1], report("a", 1, 0, 9.0), T0 + 4);
    send_report(&mut core, &w[0], report("a", 0, 1, 9.0), T0 + 4);
    send_report(&mut core, &w[0], report("a", 0, 10, 9.0), T0 + 4);
    send_report(
        &mut core,
        &w[0],
        report("a", 0, 1 + training::MAX_STEPS_AHEAD, 9.0),
        T0 + 4,
    );
    assert_eq!(core.state.jobs["a"].stored.progress.clone().unwrap(), p);
    send_report(&mut core, &w[1], report("a", 1, 1, 0.5), T0 + 5);
    let p = core.state.jobs["a"].stored.progress.clone().unwrap();
    assert_eq!((p.step, p.tokens), (2, 200));
    assert!((p.loss - 2.4).abs() < 1e-12, "{}", p.loss);
    let rt = &core.runtime["a"];
    let steps: Vec<(u64, f64, u64)> = rt
        .history
        .iter()
        .map(|s| (s.step, s.step_seconds, s.unix_ms))
        .collect();
    assert_eq!(steps, vec![(0, 0.5, T0 + 3), (1, 0.5, T0 + 5)]);
    assert_eq!(rt.history[0].losses, losses(2.5));
    // A rank the worker does not hold is refused.
    assert!(matches!(
        core.handle(
            Event::StepReport {
                worker: w[0].clone(),
                report: Box::new(report("a", 1, 2, 0.5)),
            },
            T0 + 6
        ),
        Err(CoreError::NotHeld { .. })
    ));
}

#[test]
fn assignments_carry_the_schedule_row_checkpoint_settings_and_device_addresses() {
    let mut core = Core::new(Config::default());
    let mut s = spec("a", 2, 2, 2, "dualpipe");
    s.micro_batches = 4;
    s.checkpoint_dir = "/ckpt/a".into();
    s.checkpoint_interval = 5;
    submit(&mut core, s, T0);
    // One worker's device listens on its own address.
    core.handle(
        Event::Register {
            reg: Registration {
                worker_id: "own".into(),
                node: "n0".into(),
                devices: vec![pb::Device {
                    kind: pb::DeviceKind::Cpu as i32,
                    index: 7,
                    memory_bytes: 1 << 30,
                    data_plane_addr: "10.0.0.7:7100".into(),
                }],
                data_plane_addr: "10.0.0.1:7000".into(),
            },
            session: 1,
        },
        T0,
    )
    .unwrap();
    let acts = cluster(&mut core, 1, 3, T0);
    let assigned = assignments(&acts);
    assert_eq!(assigned.len(), 4);
    let schedule = plan::schedule::ScheduleKind::DualPipe
        .generate(2, 4)
        .unwrap();
    for (_, a) in &assigned {
        let ops: Vec<plan::schedule::Op> = a.ops.iter().map(|o| o.to_plan().unwrap()).collect();
        assert_eq!(ops, schedule.ops[a.pp_idx as usize], "rank {}", a.rank);
        assert_eq!(
            (a.checkpoint_dir.as_str(), a.checkpoint_interval),
            ("/ckpt/a", 5)
        );
    }
    let own = assigned.iter().find(|(w, _)| w == "own").unwrap().1.rank;
    let peer = assigned[0].1.peers.iter().find(|p| p.rank == own).unwrap();
    assert_eq!(peer.data_plane_addr, "10.0.0.7:7100");
    let other = assigned[0].1.peers.iter().find(|p| p.rank != own).unwrap();
    assert!(other.data_plane_addr.starts_with("127.0.0.1:"), "{other:?}");
}

#[test]
fn a_schedule_that_cannot_be_generated_is_an_event_and_an_empty_op_list() {
    let mut core = Core::new(Config::default());
    // DualPipe over pipeline 2 needs 4 micro-batches per replica.
    let mut s = spec("a", 2, 2, 1, "dualpipe");
    s.micro_batches = 2;
    submit(&mut core, s, T0);
    let acts = cluster(&mut core, 1, 4, T0);
    assert!(assignments(&acts).iter().all(|(_, a)| a.ops.is_empty()));
    assert!(event_kinds(&core, "a").contains(&"ScheduleInvalid".to_owned()));
}

fn written(job: &str, rank: u32, step: u64, dir: &str, sha: &str) -> pb::CheckpointWritten {
    pb::CheckpointWritten {
        job: job.into(),
        rank,
        step,
        dir: dir.into(),
        files: vec![pb::CheckpointFile {
            path: format!("rank-{rank}/model.safetensors"),
            bytes: 1000,
            sha256: sha.into(),
        }],
    }
}

fn send_written(core: &mut Core, worker: &str, w: pb::CheckpointWritten) -> Vec<Action> {
    core.handle(
        Event::CheckpointWritten {
            worker: worker.into(),
            written: Box::new(w),
        },
        T0 + 10,
    )
    .expect("checkpoint written")
}

#[test]
fn a_checkpoint_is_committed_only_when_every_rank_wrote_its_part() {
    let mut core = Core::new(Config::default());
    submit(&mut core, spec("a", 2, 1, 1, "1f1b"), T0);
    cluster(&mut core, 1, 2, T0);
    ready_all(&mut core, "a", T0);
    let w = holders_of(&core, "a");
    let sha = "0123456789abcdef".repeat(4);
    let acts = send_written(&mut core, &w[1], written("a", 1, 4, "/c/step-4", &sha));
    assert!(sends(&acts).is_empty());
    assert_eq!(core.state.jobs["a"].stored.last_checkpoint, None, "partial");
    // The same part again (a worker re-sends after a resumed registration) changes nothing.
    send_written(&mut core, &w[1], written("a", 1, 4, "/c/step-4", &sha));
    assert_eq!(core.state.jobs["a"].stored.last_checkpoint, None);
    // Malformed parts are refused with an event and do not count.
    for bad in [
        written("a", 0, 4, "/c/step-4", "ABC"),
        written("a", 0, 4, "/c/other", &sha),
        pb::CheckpointWritten {
            files: vec![],
            ..written("a", 0, 4, "/c/step-4", &sha)
        },
    ] {
        send_written(&mut core, &w[0], bad);
        assert_eq!(core.state.jobs["a"].stored.last_checkpoint, None);
    }
    let rejected = core.state.jobs["a"]
        .events
        .iter()
        .filter(|e| e.kind == "CheckpointRejected")
        .count();
    assert_eq!(rejected, 3);
    // A later step's partial set stays pending; step 4 completes.
    send_written(&mut core, &w[0], written("a", 0, 9, "/c/step-9", &sha));
    let acts = send_written(&mut core, &w[0], written("a", 0, 4, "/c/step-4", &sha));
    let info = core.state.jobs["a"].stored.last_checkpoint.clone().unwrap();
    assert_eq!(
        (info.step, info.dir.as_str(), info.ranks, info.bytes),
        (4, "/c/step-4", 2, 2000)
    );
    assert!(event_kinds(&core, "a").contains(&"CheckpointCommitted".to_owned()));
    assert!(
        acts.iter()
            .any(|a| matches!(a, Action::PutJob(j) if j.last_checkpoint.is_some()))
    );
    let committed: Vec<_> = sends(&acts)
        .into_iter()
        .filter_map(|(to, m)| match m {
            pb::coordinator_message::Msg::CheckpointCommitted(c) => Some((to, c)),
            _ => None,
        })
        .collect();
    assert_eq!(committed.len(), 1);
    assert_eq!(committed[0].0, w[0], "sent to the holder of rank 0");
    assert_eq!((committed[0].1.step, committed[0].1.ranks.len()), (4, 2));
    // An older step can no longer be committed.
    send_written(&mut core, &w[0], written("a", 0, 2, "/c/step-2", &sha));
    send_written(&mut core, &w[1], written("a", 1, 2, "/c/step-2", &sha));
    assert_eq!(
        core.state.jobs["a"]
            .stored
            .last_checkpoint
            .as_ref()
            .unwrap()
            .step,
        4
    );
}

/// A 1F1B job over two pipeline ranks of a 4-layer model (layer 0 dense, one MTP layer): rank 0
/// routes layer 1, rank 1 layers 2, 3 and the MTP layer 4. γ = 0.5, 8 experts.
pub(super) fn moe_spec(name: &str) -> pb::JobSpec {
    pb::JobSpec {
        balance: Some(pb::BalanceSpec {
            num_hidden_layers: 4,
            first_k_dense_replace: 1,
            moe_layer_freq: 1,
            mtp_depth: 1,
            rate: 0.5,
            stop_after_tokens: None,
            subtract_mean: false,
            tokens_per_step: 100,
        }),
        ..spec(name, 2, 1, 1, "1f1b")
    }
}

fn counts(rank: u32, step: u64, layers: &[u32]) -> Vec<pb::ExpertCounts> {
    layers
        .iter()
        .map(|&layer| pb::ExpertCounts {
            layer,
            counts: (0..8u64)
                .map(|e| (e * 3 + u64::from(layer) + u64::from(rank) + step) % 7)
                .collect(),
        })
        .collect()
}

fn bias_updates(acts: &[Action]) -> Vec<(String, pb::BiasUpdate)> {
    sends(acts)
        .into_iter()
        .filter_map(|(to, m)| match m {
            pb::coordinator_message::Msg::BiasUpdate(b) => Some((to, b)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_complete_step_sends_every_holder_the_ledgers_new_bias() {
    let (mut core, w) = running_moe_job();
    assert!(event_kinds(&core, "m").contains(&"BalanceStarted".to_owned()));
    let layers = [vec![1u32], vec![2, 3, 4]];
    let zero = vec![0.0f32; 8];
    let mut bias: Vec<Vec<(u32, Vec<f32>)>> = layers
        .iter()
        .map(|ls| ls.iter().map(|&l| (l, zero.clone())).collect())
        .collect();
    for step in 0..3u64 {
        let mut last = Vec::new();
        for rank in 0..2u32 {
            let r = pb::StepReport {
                expert_counts: counts(rank, step, &layers[rank as usize]),
                bias_step: step.saturating_sub(1),
                bias_checksum: routing::rank_checksum(
                    bias[rank as usize].iter().map(|(l, b)| (*l, b.as_slice())),
                ),
                ..report("m", rank, step, 0.5)
            };
            last = send_report(&mut core, &w[rank as usize], r, T0 + step);
            if rank == 0 {
                assert!(bias_updates(&last).is_empty(), "rank 1's counts missing");
            }
        }
        assert_eq!(phase(&core, "m"), pb::JobPhase::Running, "step {step}");
        // The bias updates come before anything else the event sends.
        let first = sends(&last);
        assert!(matches!(
            first[0].1,
            pb::coordinator_message::Msg::BiasUpdate(_)
        ));
        let updates = bias_updates(&last);
        assert_eq!(updates.len(), 2, "one per holder");
        for (rank, ls) in layers.iter().enumerate() {
            let (to, u) = &updates
                .iter()
                .find(|(to, _)| *to == w[rank])
                .expect("update for the holder");
            assert_eq!(to, &w[rank]);
            assert_eq!(u.step, step);
            let got: Vec<u32> = u.layers.iter().map(|l| l.layer).collect();
            assert_eq!(&got, ls, "only the layers rank {rank} holds");
            // The ledger's rule: each layer's counts are this rank's alone (one holder each).
            for (lb, (layer, b)) in u.layers.iter().zip(bias[rank].iter_mut()) {
                let load = &counts(rank as u32, step, &[*layer])[0].counts;
                routing::apply_sign_rule(b, load, 0.5, routing::UpdateVariant::Sign);
                assert_eq!(&lb.values, b, "layer {layer} step {step}");
            }
        }
        let s = core.runtime["m"].history.back().unwrap();
        assert_eq!(s.step, step);
        assert_eq!(s.layer_loads.len(), 4);
        let l1 = &counts(0, step, &[1])[0].counts;
        assert_eq!(s.layer_loads[0].max, *l1.iter().max().unwrap());
    }
    let (step, loads) = core.runtime["m"].latest_loads.clone().unwrap();
    assert_eq!((step, loads.len()), (2, 4));
}

#[test]
fn a_wrong_bias_checksum_fails_the_job_naming_the_rank() {
    let (mut core, w) = running_moe_job();
    let zero = vec![0.0f32; 8];
    let good = routing::rank_checksum([(1, zero.as_slice())]);
    let r = pb::StepReport {
        expert_counts: counts(0, 0, &[1]),
        bias_checksum: good,
        ..report("m", 0, 0, 0.5)
    };
    send_report(&mut core, &w[0], r, T0 + 1);
    let mut flipped = zero.clone();
    flipped[3] = f32::from_bits(1);
    let bad = routing::rank_checksum([(2, &zero[..]), (3, &zero[..]), (4, &flipped[..])]);
    let r = pb::StepReport {
        expert_counts: counts(1, 0, &[2, 3, 4]),
        bias_checksum: bad,
        ..report("m", 1, 0, 0.5)
    };
    let acts = send_report(&mut core, &w[1], r, T0 + 2);
    assert_eq!(phase(&core, "m"), pb::JobPhase::Failed);
    let reason = last_reason(&core, "m");
    assert!(
        reason.contains("bias checksum mismatch at step 0: rank 1"),
        "{reason}"
    );
    assert!(reason.contains(&format!("{bad:#018x}")), "{reason}");
    assert!(event_kinds(&core, "m").contains(&"BiasChecksumMismatch".to_owned()));
    assert!(bias_updates(&acts).is_empty(), "no bias from a failed step");
    assert!(core.runtime["m"].ledger.is_none());
}

/// A core restored from what `core` stored (jobs, workers, assignments; no events), as after a
/// coordinator restart at `now`.
fn restart(core: &Core, now: UnixMs) -> Core {
    restart_from(&core.state, now)
}

/// A core restored from `state` as the store kept it, as after a coordinator restart at `now`.
fn restart_from(state: &State, now: UnixMs) -> Core {
    let snapshot = Snapshot {
        jobs: state.jobs.values().map(|j| j.stored.clone()).collect(),
        workers: state.workers.values().map(|w| w.stored.clone()).collect(),
        assignments: state.assignments.values().cloned().collect(),
        events: Default::default(),
    };
    Core::restore(Config::default(), snapshot, now)
}

/// `rank`'s report of `step` of MoE job `job`, routed with the ledger's current bias (the
/// checksum a consistent holder sends), with the deterministic counts of [`counts`].
/// Job "m" of [`moe_spec`] placed on one node of two workers and READY; returns the core and the
/// holder of each rank.
fn running_moe_job() -> (Core, Vec<String>) {
    let mut core = Core::new(Config::default());
    submit(&mut core, moe_spec("m"), T0);
    cluster(&mut core, 1, 2, T0);
    ready_all(&mut core, "m", T0);
    let w = holders_of(&core, "m");
    (core, w)
}

/// Both ranks of job "m" report `step` at `now` (see [`moe_report`]).
fn report_step(core: &mut Core, w: &[String], step: u64, now: UnixMs) {
    for rank in 0..2u32 {
        let r = moe_report(core, "m", rank, step);
        send_report(core, &w[rank as usize], r, now);
    }
}

fn moe_report(core: &Core, job: &str, rank: u32, step: u64) -> pb::StepReport {
    let ledger = core.runtime[job]
        .ledger
        .as_ref()
        .expect("the job has a ledger");
    pb::StepReport {
        expert_counts: counts(rank, step, &ledger.layers_of(rank)),
        bias_step: step.saturating_sub(1),
        bias_checksum: ledger
            .expected_rank_checksum(rank)
            .unwrap_or_else(|| routing::rank_checksum(std::iter::empty())),
        ..report(job, rank, step, 0.5)
    }
}

/// The per-layer checksums of a job's ledger.
fn ledger_checksums(core: &Core, job: &str) -> Vec<(u32, u64)> {
    core.runtime[job]
        .ledger
        .as_ref()
        .expect("the job has a ledger")
        .checksums()
        .collect()
}

/// The job records among `acts`.
fn put_jobs(acts: &[Action]) -> Vec<pb::StoredJob> {
    acts.iter()
        .filter_map(|a| match a {
            Action::PutJob(j) => Some((**j).clone()),
            _ => None,
        })
        .collect()
}

/// A MoE job whose rank 0 routes no layer (layers 0 and 1 dense under 1F1B over two ranks), so
/// the ledger can finish a step before every rank did.
fn moe_spec_with_a_dense_rank(name: &str) -> pb::JobSpec {
    let mut s = moe_spec(name);
    if let Some(b) = s.balance.as_mut() {
        b.first_k_dense_replace = 2;
    }
    s
}

#[test]
fn each_finished_step_writes_the_ledger_snapshot_of_that_step_with_its_progress() {
    let mut core = Core::new(Config::default());
    submit(&mut core, moe_spec_with_a_dense_rank("m"), T0);
    cluster(&mut core, 1, 2, T0);
    ready_all(&mut core, "m", T0);
    let w = holders_of(&core, "m");
    assert!(
        core.runtime["m"]
            .ledger
            .as_ref()
            .unwrap()
            .layers_of(0)
            .is_empty()
    );
    assert_eq!(core.state.jobs["m"].stored.ledger, None, "no step finished");
    // The holder (rank 1) runs two steps ahead of the dense rank: the ledger finishes steps 0
    // and 1, but no step is finished, so no record carries a snapshot yet.
    let r = moe_report(&core, "m", 1, 0);
    let acts = send_report(&mut core, &w[1], r, T0 + 1);
    let (_, after0) = bias_updates(&acts).pop().expect("bias after step 0");
    let r = moe_report(&core, "m", 1, 1);
    send_report(&mut core, &w[1], r, T0 + 2);
    assert_eq!(
        core.runtime["m"].ledger.as_ref().unwrap().version(),
        Some(1)
    );
    assert_eq!(core.state.jobs["m"].stored.ledger, None);
    // The dense rank's step 0 finishes step 0: the record holds progress 1 and the ledger after
    // step 0 (not the ledger's current bias, which is after step 1).
    let r = moe_report(&core, "m", 0, 0);
    let acts = send_report(&mut core, &w[0], r, T0 + 3);
    let stored = put_jobs(&acts).pop().expect("the job record is written");
    assert_eq!(stored.progress.as_ref().unwrap().step, 1);
    let snap = stored.ledger.expect("a snapshot with the finished step");
    assert_eq!(snap.after_step, 0);
    assert_eq!(snap.tokens_seen, 100, "tokens trained before step 1");
    assert_eq!(
        snap.layers, after0.layers,
        "every layer, the bias sent after step 0"
    );
    // Step 1 finishes: the snapshot moves with it, to the ledger's current one.
    let r = moe_report(&core, "m", 0, 1);
    let acts = send_report(&mut core, &w[0], r, T0 + 4);
    let stored = put_jobs(&acts).pop().expect("the job record is written");
    assert_eq!(stored.progress.as_ref().unwrap().step, 2);
    assert_eq!(
        stored.ledger,
        core.runtime["m"].ledger.as_ref().unwrap().to_snapshot()
    );
    assert_eq!(stored.ledger.unwrap().after_step, 1);
}

#[test]
fn a_restored_ledger_is_bit_exact_and_re_sent_reports_recompute_the_same_bias() {
    let (mut core, w) = running_moe_job();
    for step in 0..2u64 {
        report_step(&mut core, &w, step, T0 + 1 + step);
    }
    // What the store holds when the coordinator dies: step 1 finished, then the bias after
    // step 2 went out before the record of step 2 was written (the race the workers cover).
    let stored = core.state.clone();
    let checksums = ledger_checksums(&core, "m");
    let mut sent = Vec::new();
    let mut original = Vec::new();
    for rank in 0..2u32 {
        let r = moe_report(&core, "m", rank, 2);
        sent.push(r.clone());
        original = bias_updates(&send_report(&mut core, &w[rank as usize], r, T0 + 10));
    }
    assert_eq!(original.len(), 2);
    assert!(original.iter().all(|(_, u)| u.step == 2));

    let mut core = restart_from(&stored, T0 + 20);
    assert_eq!(phase(&core, "m"), pb::JobPhase::Running);
    assert_eq!(core.runtime["m"].finished, 2);
    assert_eq!(ledger_checksums(&core, "m"), checksums, "bit for bit");
    let l = core.runtime["m"].ledger.as_ref().unwrap();
    assert_eq!((l.version(), l.collecting()), (Some(1), 2));

    // Each holder resumes: its ranks' next step is 2, and the latest bias (after step 1, which
    // its ranks route step 2 with) is re-sent with its layers.
    let snapshot = stored.jobs["m"]
        .stored
        .ledger
        .clone()
        .expect("snapshot of step 1");
    for (rank, id) in w.iter().enumerate() {
        let acts = register(&mut core, id, "n0", rank as u32, T0 + 21);
        let msgs = sends(&acts);
        match &msgs[0] {
            (_, pb::coordinator_message::Msg::Registered(r)) => {
                assert!(r.resumed);
                assert_eq!(r.held.len(), 1);
                assert_eq!((r.held[0].rank, r.held[0].next_step), (rank as u32, 2));
            }
            other => panic!("expected Registered first, got {other:?}"),
        }
        assert_eq!(assignments(&acts).len(), 1, "the assignment is re-sent");
        let b = bias_updates(&acts);
        assert_eq!(b.len(), 1, "the latest bias is re-sent");
        assert_eq!(b[0].1.step, 1);
        let layers: Vec<u32> = b[0].1.layers.iter().map(|l| l.layer).collect();
        assert_eq!(
            layers,
            core.runtime["m"]
                .ledger
                .as_ref()
                .unwrap()
                .layers_of(rank as u32)
        );
        let want: Vec<pb::LayerBias> = snapshot
            .layers
            .iter()
            .filter(|l| layers.contains(&l.layer))
            .cloned()
            .collect();
        assert_eq!(b[0].1.layers, want, "the stored bias after step 1");
    }
    // The re-sent reports of step 2 (a duplicate among them is ignored) finish it again, and
    // the ledger sends the very bias it sent before the restart.
    send_report(&mut core, &w[0], sent[0].clone(), T0 + 22);
    send_report(&mut core, &w[0], sent[0].clone(), T0 + 22);
    let acts = send_report(&mut core, &w[1], sent[1].clone(), T0 + 23);
    assert_eq!(
        phase(&core, "m"),
        pb::JobPhase::Running,
        "{}",
        last_reason(&core, "m")
    );
    assert_eq!(
        bias_updates(&acts),
        original,
        "the same BiasUpdates after step 2"
    );
    let stored = put_jobs(&acts).pop().expect("the job record is written");
    assert_eq!(stored.progress.unwrap().step, 3);
    assert_eq!(stored.ledger.unwrap().after_step, 2);
    // A rank that finished is reported again after a resume: counted once, no second event.
    for _ in 0..2 {
        core.handle(
            Event::RankFinished {
                worker: w[0].clone(),
                job: "m".into(),
                rank: 0,
                ok: true,
                reason: String::new(),
                deterministic: false,
            },
            T0 + 24,
        )
        .unwrap();
    }
    let finished_events = event_kinds(&core, "m")
        .iter()
        .filter(|k| *k == "RankFinished")
        .count();
    assert_eq!(finished_events, 1);
    assert_eq!(core.state.jobs["m"].stored.finished_ranks, vec![0]);
}

#[test]
fn a_job_restored_before_its_first_step_restarts_its_ledger_fresh() {
    let (core, w) = running_moe_job();
    let mut core = restart(&core, T0 + 1);
    let l = core.runtime["m"].ledger.as_ref().expect("a fresh ledger");
    assert_eq!((l.version(), l.collecting()), (None, 0));
    let acts = register(&mut core, &w[0], "n0", 0, T0 + 2);
    assert!(bias_updates(&acts).is_empty(), "no bias was ever computed");
    for rank in 0..2u32 {
        let r = moe_report(&core, "m", rank, 0);
        send_report(&mut core, &w[rank as usize], r, T0 + 3);
    }
    assert_eq!(phase(&core, "m"), pb::JobPhase::Running);
    assert_eq!(core.runtime["m"].finished, 1);
}

#[test]
fn a_restored_running_moe_job_without_its_snapshot_fails_on_its_next_report() {
    let (mut core, w) = running_moe_job();
    report_step(&mut core, &w, 0, T0 + 1);
    let mut state = core.state.clone();
    state.jobs.get_mut("m").unwrap().stored.ledger = None;
    let mut core = restart_from(&state, T0 + 2);
    send_report(&mut core, &w[0], report("m", 0, 1, 0.5), T0 + 3);
    assert_eq!(phase(&core, "m"), pb::JobPhase::Failed);
    let reason = last_reason(&core, "m");
    assert!(reason.contains("routing-bias ledger"), "{reason}");
    assert!(
        reason.contains("finished 1 steps, but its record holds no ledger snapshot"),
        "{reason}"
    );
}

#[test]
fn a_snapshot_of_another_layout_fails_the_restored_job_naming_the_mismatch() {
    let (mut core, w) = running_moe_job();
    report_step(&mut core, &w, 0, T0 + 1);
    // Layer 3's bias with 7 values where the job routes over 8 experts.
    let mut state = core.state.clone();
    let snap = state
        .jobs
        .get_mut("m")
        .unwrap()
        .stored
        .ledger
        .as_mut()
        .unwrap();
    snap.layers[2].values.pop();
    let mut core = restart_from(&state, T0 + 2);
    assert_eq!(phase(&core, "m"), pb::JobPhase::Running);
    let actions = register(&mut core, &w[0], "n0", 0, T0 + 3);
    // Registered comes first, resumed, and lists no rank of the ended job.
    match &sends(&actions)[0] {
        (to, pb::coordinator_message::Msg::Registered(r)) => {
            assert_eq!(to, &w[0]);
            assert!(r.resumed);
            assert!(r.held.is_empty(), "{:?}", r.held);
        }
        other => panic!("expected Registered first, got {other:?}"),
    }
    assert!(
        assignments(&actions).is_empty(),
        "no assignment of the ended job is re-sent"
    );
    assert_eq!(phase(&core, "m"), pb::JobPhase::Failed);
    let reason = last_reason(&core, "m");
    assert!(reason.contains("routing-bias ledger"), "{reason}");
    assert!(
        reason.contains("bias of layer 3 has 7 experts, expected 8"),
        "{reason}"
    );
    assert!(core.state.workers[&w[0]].stored.held.is_empty());
    // A snapshot of another step than the record's progress is refused too.
    let mut state = core.state.clone();
    let job = &mut state.jobs.get_mut("m").unwrap().stored;
    job.phase = pb::JobPhase::Running as i32;
    job.ledger.as_mut().unwrap().layers[2].values.push(0.0);
    job.ledger.as_mut().unwrap().after_step = 4;
    let core = restart_from(&state, T0 + 4);
    let why = core.runtime["m"]
        .ledger_lost()
        .unwrap_or_default()
        .to_owned();
    assert!(
        why.contains("the stored snapshot is of step 4, but the job finished 1 steps"),
        "{why}"
    );
}

#[test]
fn registrations_with_duplicate_devices_or_empty_ids_are_refused() {
    let mut core = Core::new(Config::default());
    let reg = |id: &str, devices: Vec<pb::Device>| Event::Register {
        reg: Registration {
            worker_id: id.into(),
            node: "n".into(),
            devices,
            data_plane_addr: String::new(),
        },
        session: 1,
    };
    let cpu = |index| pb::Device {
        kind: pb::DeviceKind::Cpu as i32,
        index,
        memory_bytes: 0,
        data_plane_addr: String::new(),
    };
    assert_eq!(
        core.handle(reg("w", vec![cpu(0), cpu(0)]), T0),
        Err(CoreError::Invalid(
            "register w: device index 0 listed twice".into()
        ))
    );
    assert!(core.handle(reg("", vec![cpu(0)]), T0).is_err());
    let unspecified = pb::Device {
        kind: 0,
        index: 0,
        memory_bytes: 0,
        data_plane_addr: String::new(),
    };
    assert!(core.handle(reg("w", vec![unspecified]), T0).is_err());
}

#[test]
fn a_restored_core_has_every_job_and_gives_workers_one_timeout_to_reconnect() {
    let mut core = Core::new(Config::default());
    submit(&mut core, spec("a", 2, 1, 1, "1f1b"), T0);
    cluster(&mut core, 1, 2, T0);
    ready_all(&mut core, "a", T0);
    let state = core.state.clone();
    let snapshot = Snapshot {
        jobs: state.jobs.values().map(|j| j.stored.clone()).collect(),
        workers: state.workers.values().map(|w| w.stored.clone()).collect(),
        assignments: state.assignments.values().cloned().collect(),
        events: state
            .jobs
            .iter()
            .map(|(n, j)| (n.clone(), j.events.clone()))
            .collect(),
    };
    let later = T0 + 60_000;
    let mut restored = Core::restore(Config::default(), snapshot, later);
    assert_eq!(phase(&restored, "a"), pb::JobPhase::Running);
    assert_eq!(restored.state.jobs["a"].events, state.jobs["a"].events);
    assert!(
        restored
            .state
            .workers
            .values()
            .all(|w| !w.connected && w.last_seen == later)
    );
    assert_eq!(restored.state.next_job_seq, 1);
    // One worker reconnects in time; the other never does and the job fails after the timeout.
    restored.handle(Event::Tick, later + 4000).unwrap();
    let actions = register(&mut restored, "n0-d0", "n0", 0, later + 4500);
    assert_eq!(assignments(&actions).len(), 1, "its rank is re-sent");
    restored.handle(Event::Tick, later + 5100).unwrap();
    assert_eq!(phase(&restored, "a"), pb::JobPhase::Failed);
    assert!(last_reason(&restored, "a").contains("worker n0-d1"));
}
