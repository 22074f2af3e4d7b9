//! The worker daemon against a fake coordinator (an in-process `WorkerSession` server on port 0
//! driven by channels, as linkerd's fake control plane): register, heartbeat, READY/REJECTED
//! acks, cancel, shutdown reporting, reconnect-with-resume after the coordinator restarts on the
//! same address, and training that survives such a restart (re-sent reports, repeated biases).
//!
//! Invariant: every wait has a deadline (`next_event`), so a broken worker fails a test instead
//! of hanging it.

use proto::pb;
use proto::pb::coordinator_message::Msg as Down;
use proto::pb::worker_message::Msg as Up;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// What the fake coordinator saw.
#[derive(Debug)]
enum Seen {
    /// A `Register`, and whether the fake answered `resumed`.
    Registered(pb::Register, bool),
    /// Any message after registration except heartbeats (counted instead).
    Up(Up),
    /// The worker's stream ended.
    Closed,
}

/// State that survives a fake coordinator restart, like the etcd store does.
#[derive(Default)]
struct Durable {
    /// Worker ids that registered before.
    known: HashSet<String>,
    /// Heartbeats received, all sessions together.
    heartbeats: u64,
    /// The ranks a resumed registration lists as held (the fake keeps none unless told).
    held: Vec<pb::HeldRank>,
}

/// The downstream half of one fake session.
type Downstream = mpsc::Sender<Result<pb::CoordinatorMessage, Status>>;

#[derive(Clone)]
struct Fake {
    /// Where observations go.
    seen: mpsc::UnboundedSender<Seen>,
    /// Downstream senders of open sessions; the test pushes assignments through them; cleared
    /// (dropped) by `stop`, which ends the streams.
    sessions: Arc<Mutex<Vec<(String, Downstream)>>>,
    durable: Arc<Mutex<Durable>>,
}

#[tonic::async_trait]
impl pb::worker_session_server::WorkerSession for Fake {
    type SessionStream = ReceiverStream<Result<pb::CoordinatorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let me = self.clone();
        tokio::spawn(async move {
            let Ok(Some(pb::WorkerMessage {
                msg: Some(Up::Register(reg)),
            })) = inbound.message().await
            else {
                return;
            };
            let (resumed, held) = {
                let mut d = me.durable.lock().unwrap();
                let resumed = !d.known.insert(reg.worker_id.clone());
                (resumed, if resumed { d.held.clone() } else { Vec::new() })
            };
            let reply = pb::Registered {
                worker_id: reg.worker_id.clone(),
                resumed,
                heartbeat_interval_ms: 50,
                failure_timeout_ms: 3000,
                // Unless the test says otherwise the fake keeps no assignments: a resumed worker
                // stops its ranks and the test re-sends them.
                held,
            };
            let msg = pb::CoordinatorMessage {
                msg: Some(Down::Registered(reply)),
            };
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
            me.sessions
                .lock()
                .unwrap()
                .push((reg.worker_id.clone(), tx.clone()));
            let _ = me.seen.send(Seen::Registered(reg, resumed));
            while let Ok(Some(m)) = inbound.message().await {
                match m.msg {
                    Some(Up::Heartbeat(h)) => {
                        me.durable.lock().unwrap().heartbeats += 1;
                        let ack = pb::HeartbeatAck {
                            seq: h.seq,
                            received_unix_ms: 0,
                        };
                        let _ = tx
                            .send(Ok(pb::CoordinatorMessage {
                                msg: Some(Down::HeartbeatAck(ack)),
                            }))
                            .await;
                    }
                    Some(other) => {
                        let _ = me.seen.send(Seen::Up(other));
                    }
                    None => {}
                }
            }
            let _ = me.seen.send(Seen::Closed);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A running fake coordinator.
struct Server {
    fake: Fake,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(fake: Fake, addr: SocketAddr) -> Server {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind fake coordinator");
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let svc = pb::worker_session_server::WorkerSessionServer::new(fake.clone());
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
        });
        Server {
            fake,
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// Pushes a message to every open session.
    async fn push(&self, msg: Down) {
        let senders: Vec<Downstream> = self
            .fake
            .sessions
            .lock()
            .unwrap()
            .iter()
            .map(|(_, s)| s.clone())
            .collect();
        assert!(!senders.is_empty(), "no open session to push to");
        for s in senders {
            let _ = s
                .send(Ok(pb::CoordinatorMessage {
                    msg: Some(msg.clone()),
                }))
                .await;
        }
    }

    /// Goes away: ends every session stream with UNAVAILABLE, stops accepting, waits for the
    /// server to finish.
    async fn stop(mut self) {
        let senders: Vec<_> = self.fake.sessions.lock().unwrap().drain(..).collect();
        for (_, s) in senders {
            let _ = s
                .send(Err(Status::unavailable("coordinator going away")))
                .await;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .expect("fake coordinator did not stop")
            .unwrap();
    }
}

fn fake() -> (Fake, mpsc::UnboundedReceiver<Seen>) {
    let (seen, rx) = mpsc::unbounded_channel();
    (
        Fake {
            seen,
            sessions: Default::default(),
            durable: Default::default(),
        },
        rx,
    )
}

async fn next_event(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no event from the worker within 10s")
        .expect("fake coordinator channel closed")
}

fn config(addr: SocketAddr, first_device: u32) -> worker::WorkerConfig {
    let mut c = worker::WorkerConfig::new(
        format!("http://{addr}"),
        "node0",
        format!("node0/{first_device}"),
        worker::Device::uniform(pb::DeviceKind::Cpu, 1, first_device),
    );
    c.connect_timeout = Duration::from_secs(2);
    c.rpc_timeout = Duration::from_secs(2);
    c.retry.initial = Duration::from_millis(20);
    c.retry.max = Duration::from_millis(200);
    c.threads = Some(1);
    c
}

/// The micro job on pipeline 2 × data 1 under DualPipe, as the coordinator would send it.
const MICRO: &str = include_str!("../../manifests/micro.yaml");

fn micro_sets(steps: u64) -> Vec<String> {
    vec![
        "spec.parallelism.pipeline=2".into(),
        "spec.parallelism.data=1".into(),
        "spec.parallelism.expert=1".into(),
        "spec.parallelism.microBatches=4".into(),
        format!("spec.training.steps={steps}"),
    ]
}

/// Rank `rank` of a 2-rank DualPipe job with the micro model; `peers` are the data-plane
/// addresses of ranks 0 and 1 (a dead port keeps the rank waiting for its peer).
fn assignment_with(
    job: &str,
    rank: u32,
    device: u32,
    peers: [&str; 2],
    steps: u64,
) -> pb::Assignment {
    let schedule = plan::schedule::ScheduleKind::DualPipe
        .generate(2, 4)
        .unwrap();
    pb::Assignment {
        job: job.into(),
        rank,
        world_size: 2,
        device_index: device,
        pipeline: 2,
        data: 1,
        expert: 1,
        pp_idx: rank,
        stages: vec![rank, 1 - rank],
        peers: (0..2)
            .map(|r| pb::Peer {
                rank: r,
                data_plane_addr: peers[r as usize].into(),
                ..Default::default()
            })
            .collect(),
        schedule: "dualpipe".into(),
        micro_batches: 4,
        steps,
        ops: schedule.ops[rank as usize]
            .iter()
            .map(pb::Op::from_plan)
            .collect(),
        manifest_yaml: MICRO.into(),
        overrides: micro_sets(steps),
        ..Default::default()
    }
}

/// An assignment whose peers never answer: the rank starts and stays busy until stopped.
fn assignment(job: &str, rank: u32, device: u32) -> pb::Assignment {
    assignment_with(job, rank, device, ["127.0.0.1:1", "127.0.0.1:1"], 100)
}

fn expect_ack(seen: Seen) -> pb::AssignmentAck {
    match seen {
        Seen::Up(Up::Ack(a)) => a,
        other => panic!("expected an AssignmentAck, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_heartbeats_acks_and_reports_ranks_at_shutdown() {
    let (fake, mut seen) = fake();
    let server = Server::start(fake, "127.0.0.1:0".parse().unwrap()).await;
    let (stop_worker, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(worker::run(config(server.addr, 2), async {
        let _ = stopped.await;
    }));

    let Seen::Registered(reg, resumed) = next_event(&mut seen).await else {
        panic!("expected Register")
    };
    assert!(!resumed);
    assert_eq!(
        (reg.worker_id.as_str(), reg.node.as_str()),
        ("node0/2", "node0")
    );
    assert_eq!(
        reg.devices,
        vec![pb::Device {
            kind: pb::DeviceKind::Cpu as i32,
            index: 2,
            memory_bytes: 0,
            data_plane_addr: reg.data_plane_addr.clone(),
        }]
    );
    let dp: SocketAddr = reg
        .data_plane_addr
        .parse()
        .expect("data-plane address is host:port");
    assert_ne!(dp.port(), 0);

    // An assignment whose manifest does not parse is refused with the manifest's reason.
    let mut bad = assignment("job-x", 0, 2);
    bad.manifest_yaml = "kind: Nonsense".into();
    server.push(Down::Assignment(bad)).await;
    let ack = expect_ack(next_event(&mut seen).await);
    assert_eq!(ack.status, pb::AckStatus::Rejected as i32);
    assert!(ack.reason.contains("manifest"), "{}", ack.reason);
    // So is an op list that is not the schedule's row.
    let mut bad = assignment("job-x", 0, 2);
    bad.ops.pop();
    server.push(Down::Assignment(bad)).await;
    let ack = expect_ack(next_event(&mut seen).await);
    assert!(ack.reason.contains("op list"), "{}", ack.reason);

    server
        .push(Down::Assignment(assignment("job-a", 0, 2)))
        .await;
    let ack = expect_ack(next_event(&mut seen).await);
    assert_eq!(
        (ack.job.as_str(), ack.rank, ack.status),
        ("job-a", 0, pb::AckStatus::Ready as i32)
    );

    // A device this worker does not have is refused with a reason.
    server
        .push(Down::Assignment(assignment("job-b", 1, 5)))
        .await;
    let ack = expect_ack(next_event(&mut seen).await);
    assert_eq!(ack.status, pb::AckStatus::Rejected as i32);
    assert!(
        ack.reason.contains("device 5 is not one of"),
        "{}",
        ack.reason
    );

    // Cancel frees the device: a new job's rank on it is accepted.
    let cancel = pb::Command {
        job: "job-a".into(),
        kind: pb::CommandKind::Cancel as i32,
        reason: "test".into(),
    };
    server.push(Down::Command(cancel)).await;
    server
        .push(Down::Assignment(assignment("job-c", 1, 2)))
        .await;
    let ack = expect_ack(next_event(&mut seen).await);
    assert_eq!(
        (ack.job.as_str(), ack.status),
        ("job-c", pb::AckStatus::Ready as i32)
    );

    // Heartbeats flow at the coordinator's interval (50 ms).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(server.fake.durable.lock().unwrap().heartbeats >= 3);

    // Shutdown reports the rank given up, then closes the stream.
    stop_worker.send(()).unwrap();
    match next_event(&mut seen).await {
        Seen::Up(Up::RankFinished(f)) => {
            assert_eq!((f.job.as_str(), f.rank, f.ok), ("job-c", 1, false));
            assert!(f.reason.contains("shut down"), "{}", f.reason);
        }
        other => panic!("expected RankFinished, got {other:?}"),
    }
    assert!(matches!(next_event(&mut seen).await, Seen::Closed));
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_and_resumes_after_the_coordinator_restarts() {
    let (fake, mut seen) = fake();
    let server = Server::start(fake.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let addr = server.addr;
    let (stop_worker, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(worker::run(config(addr, 0), async {
        let _ = stopped.await;
    }));
    assert!(matches!(
        next_event(&mut seen).await,
        Seen::Registered(_, false)
    ));
    server
        .push(Down::Assignment(assignment("job-a", 1, 0)))
        .await;
    assert_eq!(
        expect_ack(next_event(&mut seen).await).status,
        pb::AckStatus::Ready as i32
    );

    // The coordinator goes away for a while; the worker keeps retrying with backoff.
    server.stop().await;
    assert!(matches!(next_event(&mut seen).await, Seen::Closed));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server = Server::start(fake, addr).await;

    // Same worker id, recognised as a resume; the re-sent assignment is still READY.
    let Seen::Registered(reg, resumed) = next_event(&mut seen).await else {
        panic!("expected Register")
    };
    assert!(resumed);
    assert_eq!(reg.worker_id, "node0/0");
    server
        .push(Down::Assignment(assignment("job-a", 1, 0)))
        .await;
    let ack = expect_ack(next_event(&mut seen).await);
    assert_eq!(
        (ack.job.as_str(), ack.rank, ack.status),
        ("job-a", 1, pb::AckStatus::Ready as i32)
    );

    stop_worker.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gives_up_when_the_retry_budget_is_spent() {
    // A port with nothing listening.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut c = config(addr, 0);
    c.retry.max_attempts = Some(3);
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        worker::run(c, std::future::pending()),
    )
    .await
    .expect("worker did not give up in time");
    match res {
        Err(worker::Error::RetriesExhausted { attempts, last }) => {
            assert_eq!(attempts, 3);
            assert!(matches!(*last, worker::Error::Connect(_)), "{last}");
        }
        other => panic!("expected RetriesExhausted, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgets_its_ranks_when_the_coordinator_forgot_it() {
    let (fake1, mut seen) = fake();
    let server = Server::start(fake1.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let addr = server.addr;
    let (stop_worker, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(worker::run(config(addr, 0), async {
        let _ = stopped.await;
    }));
    assert!(matches!(
        next_event(&mut seen).await,
        Seen::Registered(_, false)
    ));
    server
        .push(Down::Assignment(assignment("job-a", 0, 0)))
        .await;
    assert_eq!(
        expect_ack(next_event(&mut seen).await).status,
        pb::AckStatus::Ready as i32
    );
    server.stop().await;
    assert!(matches!(next_event(&mut seen).await, Seen::Closed));

    // A coordinator with an empty store (the in-memory store after a restart): not resumed.
    let fresh = Fake {
        durable: Default::default(),
        sessions: Default::default(),
        ..fake1
    };
    let server = Server::start(fresh, addr).await;
    assert!(matches!(
        next_event(&mut seen).await,
        Seen::Registered(_, false)
    ));
    // The device is free again for a new job.
    server
        .push(Down::Assignment(assignment("job-b", 1, 0)))
        .await;
    let ack = expect_ack(next_event(&mut seen).await);
    assert_eq!(
        (ack.job.as_str(), ack.status),
        ("job-b", pb::AckStatus::Ready as i32),
        "{}",
        ack.reason
    );

    stop_worker.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    server.stop().await;
}

/// Pushes `msg` to the session of worker `id` only.
async fn push_to_worker(server: &Server, id: &str, msg: Down) {
    let s = server
        .fake
        .sessions
        .lock()
        .unwrap()
        .iter()
        .find(|(w, _)| w == id)
        .map(|(_, s)| s.clone())
        .expect("an open session of the worker");
    s.send(Ok(pb::CoordinatorMessage { msg: Some(msg) }))
        .await
        .unwrap();
}

/// Pushes `msg` to the session of the `i`-th registered worker only.
async fn push_to(server: &Server, i: usize, msg: Down) {
    let s = server.fake.sessions.lock().unwrap()[i].1.clone();
    s.send(Ok(pb::CoordinatorMessage { msg: Some(msg) }))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_train_a_pipeline_and_match_the_single_process_trainer() {
    const STEPS: u64 = 3;
    let (fake, mut seen) = fake();
    let server = Server::start(fake, "127.0.0.1:0".parse().unwrap()).await;
    let mut stops = Vec::new();
    let mut workers = Vec::new();
    let mut addrs = Vec::new();
    for device in 0..2 {
        let (stop, stopped) = oneshot::channel::<()>();
        let mut c = config(server.addr, device);
        c.threads = Some(1);
        c.recv_timeout = Duration::from_secs(30);
        stops.push(stop);
        workers.push(tokio::spawn(worker::run(c, async {
            let _ = stopped.await;
        })));
        let Seen::Registered(reg, _) = next_event(&mut seen).await else {
            panic!("expected Register")
        };
        addrs.push(reg.devices[0].data_plane_addr.clone());
    }
    let peers = [addrs[0].as_str(), addrs[1].as_str()];
    let ckpt = std::env::temp_dir().join(format!("moetrain-worker-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&ckpt);
    for rank in 0..2u32 {
        let mut a = assignment_with("train", rank, rank, peers, STEPS);
        a.checkpoint_dir = ckpt.display().to_string();
        a.checkpoint_interval = 2;
        push_to(&server, rank as usize, Down::Assignment(a)).await;
    }
    // The reference: the same manifest trained in one process.
    let job = worker::job::parse(MICRO, "micro.yaml", &micro_sets(STEPS)).unwrap();
    let over = worker::job::Overrides {
        threads: Some(1),
        ..Default::default()
    };
    let opts = worker::job::train_options(&job, std::path::Path::new(""), &over).unwrap();
    let single =
        model::train::train_single(&opts, &mut |_| std::ops::ControlFlow::Continue(())).unwrap();

    // The fake plays the coordinator's bias role: sum both ranks' counts, apply the sign rule,
    // send the new bias of every layer (both ranks hold both stages), check the checksums.
    let mut bias: std::collections::BTreeMap<u32, Vec<f32>> = Default::default();
    let mut tokens_seen = 0u64;
    let mut reports: Vec<Vec<pb::StepReport>> = vec![Vec::new(), Vec::new()];
    let mut parts: Vec<pb::CheckpointWritten> = Vec::new();
    let mut finished = 0;
    while finished < 2 {
        let ev = tokio::time::timeout(Duration::from_secs(120), seen.recv())
            .await
            .expect("no event within 120s")
            .unwrap();
        match ev {
            Seen::Up(Up::Ack(a)) => {
                assert_eq!(a.status, pb::AckStatus::Ready as i32, "{}", a.reason)
            }
            Seen::Up(Up::StepReport(r)) => {
                let step = r.step;
                reports[r.rank as usize].push(r);
                if reports.iter().all(|v| v.len() as u64 == step + 1) {
                    let loads = summed_loads(
                        &reports
                            .iter()
                            .map(|v| &v[step as usize])
                            .collect::<Vec<_>>(),
                    );
                    for (l, load) in &loads {
                        bias.entry(*l).or_insert_with(|| vec![0.0; load.len()]);
                    }
                    let expected =
                        routing::rank_checksum(bias.iter().map(|(l, b)| (*l, b.as_slice())));
                    for v in &reports {
                        assert_eq!(v[step as usize].bias_checksum, expected, "step {step}");
                    }
                    // Routing under the coordinator's bias matches the single-process run.
                    let want: Vec<(u32, u64)> = single.steps[step as usize]
                        .expert_load
                        .iter()
                        .map(|l| (l.layer as u32, l.max))
                        .collect();
                    let got: Vec<(u32, u64)> = loads
                        .iter()
                        .map(|(l, v)| (*l, v.iter().copied().max().unwrap_or(0)))
                        .collect();
                    assert_eq!(got, want, "step {step}: per-layer max expert load");
                    let gamma = opts.bias_speed.gamma(tokens_seen);
                    tokens_seen += reports[0][step as usize].tokens;
                    for (l, load) in &loads {
                        if let Some(b) = bias.get_mut(l) {
                            model::balance::update_routing_bias(b, load, gamma, opts.bias_variant);
                        }
                    }
                    let update = pb::BiasUpdate {
                        job: "train".into(),
                        step,
                        layers: bias
                            .iter()
                            .map(|(l, v)| pb::LayerBias {
                                layer: *l,
                                values: v.clone(),
                            })
                            .collect(),
                    };
                    server.push(Down::BiasUpdate(update)).await;
                }
            }
            Seen::Up(Up::CheckpointWritten(c)) => parts.push(c),
            Seen::Up(Up::RankFinished(f)) => {
                assert!(f.ok, "rank {} failed: {}", f.rank, f.reason);
                finished += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    // Checkpoint parts after step 1 (interval 2) and after the last step, from both ranks, each
    // file on disk with the size the report says; the commit makes rank 0's worker write the index.
    let mut steps_written: Vec<(u64, u32)> = parts.iter().map(|c| (c.step, c.rank)).collect();
    steps_written.sort_unstable();
    assert_eq!(steps_written, vec![(1, 0), (1, 1), (2, 0), (2, 1)]);
    for c in &parts {
        assert!(!c.files.is_empty());
        for f in &c.files {
            let path = std::path::Path::new(&c.dir).join(&f.path);
            let len = std::fs::metadata(&path).unwrap().len();
            assert_eq!(len, f.bytes, "{}", path.display());
            assert_eq!(f.sha256.len(), 64);
        }
    }
    let last: Vec<pb::CheckpointWritten> = parts.iter().filter(|c| c.step == 2).cloned().collect();
    let commit = pb::CheckpointCommitted {
        job: "train".into(),
        step: 2,
        dir: last[0].dir.clone(),
        ranks: last,
        ledger: None,
    };
    push_to(&server, 0, Down::CheckpointCommitted(commit.clone())).await;
    let index = std::path::Path::new(&commit.dir).join("checkpoint.json");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !index.exists() {
        assert!(std::time::Instant::now() < deadline, "no checkpoint.json");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    assert_eq!(doc["ranks"].as_array().unwrap().len(), 2);
    assert_eq!(doc["steps_done"], 3);
    let _ = std::fs::remove_dir_all(&ckpt);

    for rank_reports in &reports {
        assert_eq!(rank_reports.len(), STEPS as usize);
        for (r, want) in rank_reports.iter().zip(&single.steps) {
            let total = r.losses.iter().find(|l| l.name == "total").unwrap().value;
            let rel = (total - want.loss.total).abs() / want.loss.total.abs();
            assert!(
                rel < 1e-6,
                "step {}: pipelined {total} vs single {}",
                r.step,
                want.loss.total
            );
            assert_eq!(r.tokens, want.tokens);
            assert!(r.step_seconds > 0.0);
        }
    }
    stop_workers(stops, workers).await;
    server.stop().await;
}

/// Per MoE layer, the expert counts of `reports` summed (what the coordinator's ledger adds up).
fn summed_loads(reports: &[&pb::StepReport]) -> std::collections::BTreeMap<u32, Vec<u64>> {
    let mut loads: std::collections::BTreeMap<u32, Vec<u64>> = Default::default();
    for r in reports {
        for c in &r.expert_counts {
            let e = loads
                .entry(c.layer)
                .or_insert_with(|| vec![0; c.counts.len()]);
            for (a, b) in e.iter_mut().zip(&c.counts) {
                *a += b;
            }
        }
    }
    loads
}

/// Both ranks' reports of one step, as the fake coordinator's ledger sums them: the bias after
/// the step (sign rule on the summed counts, γ 1e-3 as micro.yaml's default speed is irrelevant
/// here: the worker only has to install what it is sent).
fn bias_after(
    bias: &mut std::collections::BTreeMap<u32, Vec<f32>>,
    reports: &[&pb::StepReport],
) -> pb::BiasUpdate {
    let loads = summed_loads(reports);
    for (l, load) in &loads {
        let b = bias.entry(*l).or_insert_with(|| vec![0.0; load.len()]);
        routing::apply_sign_rule(b, load, 1e-3, routing::UpdateVariant::Sign);
    }
    pb::BiasUpdate {
        job: "train".into(),
        step: reports[0].step,
        layers: bias
            .iter()
            .map(|(l, v)| pb::LayerBias {
                layer: *l,
                values: v.clone(),
            })
            .collect(),
    }
}

/// Two workers (devices 0 and 1) holding ranks 0 and 1 of a micro job of `steps` steps (with a
/// checkpoint every 2 steps into `ckpt`, if given); returns their stop handles, tasks and
/// data-plane addresses.
#[allow(clippy::type_complexity)]
async fn two_ranks(
    server: &Server,
    seen: &mut mpsc::UnboundedReceiver<Seen>,
    steps: u64,
    recv_timeout: Duration,
    ckpt: Option<&std::path::Path>,
) -> (
    Vec<oneshot::Sender<()>>,
    Vec<tokio::task::JoinHandle<Result<(), worker::Error>>>,
    Vec<String>,
) {
    let mut stops = Vec::new();
    let mut workers = Vec::new();
    let mut addrs = Vec::new();
    for device in 0..2 {
        let (stop, stopped) = oneshot::channel::<()>();
        let mut c = config(server.addr, device);
        c.recv_timeout = recv_timeout;
        stops.push(stop);
        workers.push(tokio::spawn(worker::run(c, async {
            let _ = stopped.await;
        })));
        let Seen::Registered(reg, _) = next_event(seen).await else {
            panic!("expected Register")
        };
        addrs.push(reg.devices[0].data_plane_addr.clone());
    }
    let peers = [addrs[0].as_str(), addrs[1].as_str()];
    for rank in 0..2u32 {
        let mut a = assignment_with("train", rank, rank, peers, steps);
        if let Some(dir) = ckpt {
            a.checkpoint_dir = dir.display().to_string();
            a.checkpoint_interval = 2;
        }
        push_to(server, rank as usize, Down::Assignment(a)).await;
    }
    (stops, workers, addrs)
}

async fn stop_workers(
    stops: Vec<oneshot::Sender<()>>,
    workers: Vec<tokio::task::JoinHandle<Result<(), worker::Error>>>,
) {
    for s in stops {
        let _ = s.send(());
    }
    for w in workers {
        tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_survives_a_coordinator_restart_with_re_sent_reports_and_repeated_biases() {
    const STEPS: u64 = 4;
    // The bias wait's limit: the ranks wait longer than this for the bias after step 2, but the
    // clock starts again when the session is lost and when it is registered again.
    const BIAS_TIMEOUT: Duration = Duration::from_secs(2);
    let (fake, mut seen) = fake();
    let server = Server::start(fake.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let addr = server.addr;
    let ckpt = std::env::temp_dir().join(format!("moetrain-worker-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&ckpt);
    let (stops, workers, addrs) =
        two_ranks(&server, &mut seen, STEPS, BIAS_TIMEOUT, Some(&ckpt)).await;
    let peers = [addrs[0].as_str(), addrs[1].as_str()];
    let mut bias = Default::default();
    let mut reports: Vec<Vec<pb::StepReport>> = vec![Vec::new(), Vec::new()];
    // Checkpoint parts (after steps 1 and 3), by rank.
    let mut parts: Vec<Vec<pb::CheckpointWritten>> = vec![Vec::new(), Vec::new()];
    let mut acks = 0;
    // Steps 0 and 1 with a live coordinator; the bias after step 0 is sent twice, identical.
    while reports.iter().any(|r| r.len() < 3) {
        match next_event(&mut seen).await {
            Seen::Up(Up::Ack(a)) => {
                assert_eq!(a.status, pb::AckStatus::Ready as i32, "{}", a.reason);
                acks += 1;
            }
            Seen::Up(Up::StepReport(r)) => {
                let step = r.step;
                reports[r.rank as usize].push(r);
                if reports.iter().all(|v| v.len() as u64 == step + 1) && step < 2 {
                    let both: Vec<&pb::StepReport> =
                        reports.iter().map(|v| &v[step as usize]).collect();
                    let update = bias_after(&mut bias, &both);
                    server.push(Down::BiasUpdate(update.clone())).await;
                    if step == 0 {
                        server.push(Down::BiasUpdate(update)).await;
                    }
                }
            }
            Seen::Up(Up::CheckpointWritten(c)) => parts[c.rank as usize].push(c),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(acks, 2);
    // Both ranks reported step 2 and wait for its bias. The coordinator holds it, dies, and comes
    // back from its store knowing that only step 0 is finished (next step 1).
    let sent_2 = std::time::Instant::now();
    tokio::time::sleep(BIAS_TIMEOUT * 7 / 10).await;
    fake.durable.lock().unwrap().held = (0..2)
        .map(|rank| pb::HeldRank {
            job: "train".into(),
            rank,
            device_index: rank,
            next_step: 1,
        })
        .collect();
    server.stop().await;
    for _ in 0..2 {
        assert!(matches!(next_event(&mut seen).await, Seen::Closed));
    }
    tokio::time::sleep(BIAS_TIMEOUT * 7 / 10).await;
    let server = Server::start(fake.clone(), addr).await;
    // Each worker resumes and re-sends its rank's reports from step 1, in step order, exactly
    // as first sent, then its checkpoint part (the restarted coordinator lost partial sets).
    assert!(parts.iter().all(|p| p.len() == 1 && p[0].step == 1));
    let mut again: Vec<Vec<pb::StepReport>> = vec![Vec::new(), Vec::new()];
    let mut parts_again: Vec<Vec<pb::CheckpointWritten>> = vec![Vec::new(), Vec::new()];
    let mut resumed = 0;
    while resumed < 2 || again.iter().any(|v| v.len() < 2) || parts_again.iter().any(Vec::is_empty)
    {
        match next_event(&mut seen).await {
            Seen::Registered(_, r) => {
                assert!(r, "the restarted fake knows both workers");
                resumed += 1;
            }
            Seen::Up(Up::StepReport(r)) => {
                let rank = r.rank as usize;
                assert!(parts_again[rank].is_empty(), "reports go first");
                again[rank].push(r);
            }
            Seen::Up(Up::CheckpointWritten(c)) => parts_again[c.rank as usize].push(c),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(parts_again, parts, "the re-sent checkpoint parts");
    for rank in 0..2 {
        assert_eq!(
            again[rank],
            reports[rank][1..],
            "rank {rank}'s re-sent reports"
        );
    }
    // The coordinator re-sends the assignments: acknowledged, and nothing restarts (no report
    // of step 0 comes again). Then it re-sends the bias after step 1 (identical) and, having
    // recomputed step 2 from the re-sent reports, the bias after step 2.
    for rank in 0..2u32 {
        let a = assignment_with("train", rank, rank, peers, STEPS);
        push_to_worker(&server, &format!("node0/{rank}"), Down::Assignment(a)).await;
    }
    let both: Vec<&pb::StepReport> = again.iter().map(|v| &v[1]).collect();
    let mut replay_bias = Default::default();
    let first: Vec<&pb::StepReport> = reports.iter().map(|v| &v[0]).collect();
    bias_after(&mut replay_bias, &first);
    let after_1 = bias_after(
        &mut replay_bias,
        &reports.iter().map(|v| &v[1]).collect::<Vec<_>>(),
    );
    server.push(Down::BiasUpdate(after_1)).await;
    assert!(
        sent_2.elapsed() > BIAS_TIMEOUT,
        "the ranks waited longer than the bias timeout"
    );
    server
        .push(Down::BiasUpdate(bias_after(&mut bias, &both)))
        .await;
    let mut finished = 0;
    while finished < 2 {
        match next_event(&mut seen).await {
            Seen::Up(Up::Ack(a)) => {
                assert_eq!(a.status, pb::AckStatus::Ready as i32, "{}", a.reason)
            }
            Seen::Up(Up::StepReport(r)) => {
                assert_eq!(r.step, 3, "only the last step is new");
                reports[r.rank as usize].push(r);
            }
            Seen::Up(Up::CheckpointWritten(c)) => parts[c.rank as usize].push(c),
            Seen::Up(Up::RankFinished(f)) => {
                assert!(f.ok, "rank {} failed: {}", f.rank, f.reason);
                finished += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(reports.iter().all(|r| r.len() == STEPS as usize));

    assert!(parts.iter().all(|p| p.len() == 2 && p[1].step == 3));
    // Another restart before the coordinator recorded the ends: the last checkpoint parts and
    // the ends are re-sent, and the re-sent assignments of the finished ranks are acknowledged
    // without training them again.
    fake.durable.lock().unwrap().held = (0..2)
        .map(|rank| pb::HeldRank {
            job: "train".into(),
            rank,
            device_index: rank,
            next_step: STEPS,
        })
        .collect();
    server.stop().await;
    for _ in 0..2 {
        assert!(matches!(next_event(&mut seen).await, Seen::Closed));
    }
    let server = Server::start(fake, addr).await;
    let (mut resumed, mut ends) = (0, 0);
    let mut parts_again: Vec<Vec<pb::CheckpointWritten>> = vec![Vec::new(), Vec::new()];
    while resumed < 2 || ends < 2 {
        match next_event(&mut seen).await {
            Seen::Registered(_, r) => {
                assert!(r);
                resumed += 1;
            }
            Seen::Up(Up::CheckpointWritten(c)) => parts_again[c.rank as usize].push(c),
            Seen::Up(Up::RankFinished(f)) => {
                assert!(f.ok, "{}", f.reason);
                ends += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(parts_again, parts, "the last checkpoint parts, re-sent");
    let _ = std::fs::remove_dir_all(&ckpt);
    for rank in 0..2u32 {
        let a = assignment_with("train", rank, rank, peers, STEPS);
        push_to_worker(&server, &format!("node0/{rank}"), Down::Assignment(a)).await;
    }
    for _ in 0..2 {
        assert_eq!(
            expect_ack(next_event(&mut seen).await).status,
            pb::AckStatus::Ready as i32
        );
    }
    // A rank started again would report its step 0 well within this.
    let quiet = tokio::time::timeout(Duration::from_secs(2), seen.recv()).await;
    assert!(quiet.is_err(), "a finished rank trained again: {quiet:?}");
    stop_workers(stops, workers).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_bias_that_differs_fails_the_rank_with_the_reason() {
    let (fake, mut seen) = fake();
    let server = Server::start(fake, "127.0.0.1:0".parse().unwrap()).await;
    let (stops, workers, _) = two_ranks(&server, &mut seen, 3, Duration::from_secs(10), None).await;
    let mut bias = Default::default();
    let mut step0: Vec<pb::StepReport> = Vec::new();
    let failed = loop {
        match next_event(&mut seen).await {
            Seen::Up(Up::StepReport(r)) if r.step == 0 => {
                step0.push(r);
                if step0.len() == 2 {
                    let update = bias_after(&mut bias, &step0.iter().collect::<Vec<_>>());
                    let mut other = update.clone();
                    other.layers[1].values[3] += 0.5;
                    server.push(Down::BiasUpdate(update)).await;
                    push_to(&server, 1, Down::BiasUpdate(other)).await;
                }
            }
            Seen::Up(Up::RankFinished(f)) if f.rank == 1 => break f,
            Seen::Up(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(!failed.ok);
    assert!(
        failed.reason.contains(
            "the coordinator sent the routing bias after step 0 again, and it differs from the one received first"
        ),
        "{}",
        failed.reason
    );
    assert!(failed.reason.contains("expert 3"), "{}", failed.reason);
    // Re-sent, it would contradict itself again: a restart cannot fix it.
    assert!(failed.deterministic);
    stop_workers(stops, workers).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_waiting_for_a_coordinator_that_stays_away_fails_with_the_reason() {
    const BIAS_TIMEOUT: Duration = Duration::from_secs(1);
    let (fake, mut seen) = fake();
    let server = Server::start(fake.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let addr = server.addr;
    let (stops, workers, _) = two_ranks(&server, &mut seen, 3, BIAS_TIMEOUT, None).await;
    let mut step0 = 0;
    while step0 < 2 {
        if let Seen::Up(Up::StepReport(_)) = next_event(&mut seen).await {
            step0 += 1;
        }
    }
    // No bias: the coordinator goes away for longer than the bias timeout.
    server.stop().await;
    tokio::time::sleep(BIAS_TIMEOUT * 3).await;
    let server = Server::start(fake, addr).await;
    // When it is back, the queued rank ends say why.
    let mut reasons = Vec::new();
    while reasons.len() < 2 {
        if let Seen::Up(Up::RankFinished(f)) = next_event(&mut seen).await {
            assert!(!f.ok);
            // A coordinator that stays away is no reason not to try again.
            assert!(!f.deterministic, "{}", f.reason);
            reasons.push(f.reason);
        }
    }
    // The first rank to give up says why; its peer either gives up the same way or, when the
    // first one's data plane closed before its own bound ran out, names that lost peer.
    let gave_up = |r: &String| {
        r.contains("no routing bias for step 0")
            && r.contains("the coordinator has been unreachable for")
    };
    assert!(reasons.iter().any(gave_up), "{reasons:?}");
    assert!(
        reasons
            .iter()
            .all(|r| gave_up(r) || r.contains("data-plane peer")),
        "{reasons:?}"
    );
    stop_workers(stops, workers).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_waiting_for_the_bias_fails_at_once_when_its_peer_is_lost() {
    // A bias timeout far longer than the test: only the lost peer can end rank 0's wait.
    let (fake, mut seen) = fake();
    let server = Server::start(fake, "127.0.0.1:0".parse().unwrap()).await;
    let (mut stops, mut workers, _) =
        two_ranks(&server, &mut seen, 3, Duration::from_secs(60), None).await;
    let mut step0 = 0;
    while step0 < 2 {
        if let Seen::Up(Up::StepReport(_)) = next_event(&mut seen).await {
            step0 += 1;
        }
    }
    // Both ranks now wait for the bias after step 0, which never comes; worker 1 goes away.
    let started = std::time::Instant::now();
    let _ = stops.pop().unwrap().send(());
    tokio::time::timeout(Duration::from_secs(10), workers.pop().unwrap())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let failed = loop {
        match next_event(&mut seen).await {
            Seen::Up(Up::RankFinished(f)) if f.rank == 0 => break f,
            _ => {}
        }
    };
    assert!(!failed.ok);
    assert!(!failed.deterministic);
    assert!(
        failed
            .reason
            .contains("while waiting for the routing bias of step 0, data-plane peer 1 was lost"),
        "{}",
        failed.reason
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "rank 0 noticed after {:?}",
        started.elapsed()
    );
    stop_workers(stops, workers).await;
    server.stop().await;
}
