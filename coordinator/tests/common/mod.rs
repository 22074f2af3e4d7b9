//! Test harness for the coordinator's black-box tests: an etcd server on free ports, a coordinator
//! started in-process on `127.0.0.1:0`, fake workers that speak the session protocol (register,
//! heartbeat, answer READY, reconnect with a short backoff), and a polling helper.
//!
//! Invariant: everything started here stops when its handle drops (etcd is killed, worker tasks are
//! aborted, the coordinator gets its shutdown signal), so a failing test leaves nothing behind.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coordinator::{Config, StateStore};
use proto::pb;
use proto::pb::coordinator_message::Msg;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// A fast configuration for tests: 100 ms heartbeats, 1 s failure timeout, 50 ms ticks.
pub fn fast_config() -> Config {
    Config {
        heartbeat_interval: Duration::from_millis(100),
        failure_timeout: Duration::from_secs(1),
        tick: Duration::from_millis(50),
        drain_timeout: Duration::from_secs(3),
    }
}

/// A running in-process coordinator.
pub struct Running {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), coordinator::Error>>>,
}

impl Running {
    /// Starts `coordinator::run` on `addr` (use port 0 for a free one).
    pub async fn start<S: StateStore>(addr: &str, store: Arc<S>, config: Config) -> Self {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind coordinator listener");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(coordinator::run(listener, store, config, async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), coordinator::Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("task");
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("coordinator stops within its drain bound")
            .expect("coordinator task joins")
    }

    /// A client for the `Coordinator` service.
    pub async fn client(
        &self,
    ) -> pb::coordinator_client::CoordinatorClient<tonic::transport::Channel> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10));
        pb::coordinator_client::CoordinatorClient::new(
            endpoint.connect().await.expect("connect client"),
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// What a fake worker has seen.
#[derive(Default, Debug)]
pub struct Seen {
    pub registered: Vec<pb::Registered>,
    pub assignments: Vec<pb::Assignment>,
    pub commands: Vec<pb::Command>,
    pub heartbeat_acks: u64,
    pub bias_updates: Vec<pb::BiasUpdate>,
    pub committed: Vec<pb::CheckpointCommitted>,
}

/// The sending half of a fake worker's current session (none between sessions).
type Outbox = Arc<Mutex<Option<mpsc::UnboundedSender<pb::WorkerMessage>>>>;

/// A fake worker: registers with one cpu device, heartbeats, answers every assignment READY,
/// records bias updates and committed checkpoints, sends what a test asks (`send`), and
/// reconnects every 100 ms when its session ends. Dropping it (or `kill`) aborts it at once, like
/// SIGKILL: no goodbye reaches the coordinator.
pub struct FakeWorker {
    pub id: String,
    pub seen: Arc<Mutex<Seen>>,
    outbox: Outbox,
    task: JoinHandle<()>,
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeWorker {
    pub fn spawn(
        coordinator: SocketAddr,
        id: &str,
        node: &str,
        device: u32,
        heartbeat: Duration,
    ) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let reg = pb::Register {
            worker_id: id.to_owned(),
            node: node.to_owned(),
            devices: vec![pb::Device {
                kind: pb::DeviceKind::Cpu as i32,
                index: device,
                memory_bytes: 1 << 30,
                data_plane_addr: String::new(),
            }],
            data_plane_addr: format!("127.0.0.1:{}", 20000 + device),
            version: "test".into(),
        };
        let outbox: Outbox = Arc::default();
        let task = tokio::spawn(worker_loop(
            coordinator,
            reg,
            heartbeat,
            seen.clone(),
            outbox.clone(),
        ));
        Self {
            id: id.to_owned(),
            seen,
            outbox,
            task,
        }
    }

    /// Sends `msg` on the current session; false when none is open.
    pub fn send(&self, msg: pb::worker_message::Msg) -> bool {
        let outbox = self.outbox.lock().expect("outbox lock");
        outbox
            .as_ref()
            .is_some_and(|tx| tx.send(pb::WorkerMessage { msg: Some(msg) }).is_ok())
    }

    /// Stops the worker abruptly.
    pub fn kill(self) {}

    pub fn seen<R>(&self, f: impl FnOnce(&Seen) -> R) -> R {
        f(&self.seen.lock().expect("seen lock"))
    }
}

async fn worker_loop(
    coordinator: SocketAddr,
    reg: pb::Register,
    heartbeat: Duration,
    seen: Arc<Mutex<Seen>>,
    outbox: Outbox,
) {
    loop {
        let _ = session(coordinator, reg.clone(), heartbeat, &seen, &outbox).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn session(
    coordinator: SocketAddr,
    reg: pb::Register,
    heartbeat: Duration,
    seen: &Arc<Mutex<Seen>>,
    outbox: &Outbox,
) -> Result<(), tonic::Status> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{coordinator}"))
        .map_err(|e| tonic::Status::internal(e.to_string()))?
        .connect_timeout(Duration::from_secs(2));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = pb::worker_session_client::WorkerSessionClient::new(channel);
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(pb::WorkerMessage::register(reg))
        .map_err(|_| tonic::Status::internal("send"))?;
    let mut inbound = client
        .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    *outbox.lock().expect("outbox lock") = Some(tx.clone());
    // Heartbeats run in this task (not a spawned one) so that aborting the worker stops them too.
    let mut beat = tokio::time::interval(heartbeat);
    let mut seq = 0;
    loop {
        let next = tokio::select! {
            m = inbound.message() => m,
            _ = beat.tick() => {
                seq += 1;
                let _ = tx.send(pb::WorkerMessage::heartbeat(seq));
                continue;
            }
        };
        match next {
            Ok(Some(pb::CoordinatorMessage { msg: Some(m) })) => {
                let mut s = seen.lock().expect("seen lock");
                match m {
                    Msg::Registered(r) => s.registered.push(r),
                    Msg::HeartbeatAck(_) => s.heartbeat_acks += 1,
                    Msg::Assignment(a) => {
                        let _ = tx.send(pb::WorkerMessage::ready(&a.job, a.rank));
                        s.assignments.push(a);
                    }
                    Msg::Command(c) => s.commands.push(c),
                    Msg::BiasUpdate(b) => s.bias_updates.push(b),
                    Msg::CheckpointCommitted(c) => s.committed.push(c),
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// Starts 2 nodes × 4 devices of fake workers named `n{node}-d{device}`.
pub fn eight_workers(coordinator: SocketAddr, heartbeat: Duration) -> Vec<FakeWorker> {
    (0..2)
        .flat_map(|n| (0..4).map(move |d| (n, d)))
        .map(|(n, d)| {
            FakeWorker::spawn(
                coordinator,
                &format!("n{n}-d{d}"),
                &format!("n{n}"),
                d,
                heartbeat,
            )
        })
        .collect()
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `limit` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The phase of a job as the client sees it.
pub async fn phase(
    client: &mut pb::coordinator_client::CoordinatorClient<tonic::transport::Channel>,
    job: &str,
) -> pb::JobPhase {
    let job = client
        .get_job(pb::GetJobRequest { name: job.into() })
        .await
        .expect("get job")
        .into_inner()
        .job
        .expect("job");
    pb::JobPhase::try_from(job.phase).expect("known phase")
}

/// The micro manifest (pipeline 4, data 2, expert 2, DualPipe).
pub fn micro_manifest() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/micro.yaml");
    std::fs::read_to_string(path).expect("read manifests/micro.yaml")
}

/// A submit request for the micro manifest with overrides.
pub fn submit_micro(overrides: &[&str]) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        manifest_yaml: micro_manifest(),
        origin: "manifests/micro.yaml".into(),
        overrides: overrides.iter().map(|s| s.to_string()).collect(),
        resume: None,
    }
}

/// An etcd server on free loopback ports with a temporary data directory.
pub struct Etcd {
    pub endpoint: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Etcd {
    /// Starts etcd, or returns `None` (after printing why) when the `etcd` binary is absent.
    pub async fn start() -> Option<Self> {
        if Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            eprintln!(
                "SKIPPED: the `etcd` binary is not on PATH (apt-get install etcd-server); etcd tests did not run"
            );
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let (client_port, peer_port) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(dir.path())
            .args([
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args([
                "--initial-cluster",
                &format!("t={peer_url}"),
                "--log-level",
                "error",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn etcd");
        let etcd = Etcd {
            endpoint: format!("127.0.0.1:{client_port}"),
            child,
            _dir: dir,
        };
        let endpoint = etcd.endpoint.clone();
        wait_for("etcd to become healthy", Duration::from_secs(20), || {
            let endpoint = endpoint.clone();
            async move {
                let mut c = etcd_client::Client::connect([endpoint], None).await.ok()?;
                c.status().await.ok().map(|_| ())
            }
        })
        .await;
        Some(etcd)
    }
}
