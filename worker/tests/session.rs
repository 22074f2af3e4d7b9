//! The worker daemon against a fake coordinator (an in-process `WorkerSession` server on port 0
//! driven by channels, as linkerd's fake control plane): register, heartbeat, READY/REJECTED
//! acks, cancel, shutdown reporting, and reconnect-with-resume after the coordinator restarts on
//! the same address.
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
}

/// The downstream half of one fake session.
type Downstream = mpsc::Sender<Result<pb::CoordinatorMessage, Status>>;

#[derive(Clone)]
struct Fake {
    /// Where observations go.
    seen: mpsc::UnboundedSender<Seen>,
    /// Downstream senders of open sessions; the test pushes assignments through them; cleared
    /// (dropped) by `stop`, which ends the streams.
    sessions: Arc<Mutex<Vec<Downstream>>>,
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
            let resumed = !me
                .durable
                .lock()
                .unwrap()
                .known
                .insert(reg.worker_id.clone());
            let reply = pb::Registered {
                worker_id: reg.worker_id.clone(),
                resumed,
                heartbeat_interval_ms: 50,
                failure_timeout_ms: 1000,
            };
            let msg = pb::CoordinatorMessage {
                msg: Some(Down::Registered(reply)),
            };
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
            me.sessions.lock().unwrap().push(tx.clone());
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
        let senders = self.fake.sessions.lock().unwrap().clone();
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
        for s in senders {
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
    c
}

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
        schedule: "dualpipe".into(),
        ..Default::default()
    }
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
            memory_bytes: 0
        }]
    );
    let dp: SocketAddr = reg
        .data_plane_addr
        .parse()
        .expect("data-plane address is host:port");
    assert_ne!(dp.port(), 0);

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
