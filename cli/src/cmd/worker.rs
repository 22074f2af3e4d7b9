//! `moetrain worker`: the worker daemon. Follows the daemon order of style.md §6: telemetry,
//! build info, configuration checked before binding (exit 2 when unusable), bind the data-plane
//! listener and print its address, run until Ctrl-C or SIGTERM, then drain within a grace period.
//!
//! Invariant: the first stdout line is `worker WORKER_ID data-plane ADDR` (scripts and the e2e
//! harness read it); everything else is logged on stderr.

use crate::telemetry::{self, TelemetryArgs};
use anyhow::Context as _;
use proto::pb;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

/// Run a worker daemon that offers devices to a coordinator.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Coordinator URL.
    #[arg(
        long,
        env = "MOETRAIN_COORDINATOR",
        default_value = "http://127.0.0.1:7070",
        value_name = "URL"
    )]
    pub coordinator: String,
    /// Node (host) name; workers on the same node share fast links.
    #[arg(long)]
    pub node: String,
    /// Stable worker id, kept across restarts so the coordinator resumes the registration
    /// [default: NODE/FIRST_DEVICE].
    #[arg(long)]
    pub worker_id: Option<String>,
    /// Number of devices this worker offers.
    #[arg(long, default_value_t = 1)]
    pub devices: u32,
    /// Device kind: `cpu` or `simulated` (a test mode that will time ops with a cost model;
    /// `cuda` is refused until the GPU backend exists).
    #[arg(long, default_value = "cpu")]
    pub device_kind: String,
    /// Index of this worker's first device on its node (several workers may share a node).
    #[arg(long, default_value_t = 0)]
    pub first_device: u32,
    /// Where the data-plane listeners bind: device i on this port + i (port 0 picks free ports).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub data_plane_listen: SocketAddr,
    /// Address peers use to reach the data plane, if not the bound one.
    #[arg(long)]
    pub data_plane_advertise: Option<String>,
    /// Heartbeat period until the coordinator sets its own.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// Deadline of connecting and of each wait on the coordinator.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub rpc_timeout: Duration,
    /// Longest pause between reconnect attempts (backoff doubles from 100ms up to this, jittered).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub max_backoff: Duration,
    /// Compute threads per rank [default: the machine's cores divided by --devices].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Longest wait for one activation or gradient from a peer (a rank whose peer stays silent
    /// this long fails its step with a reason).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub recv_timeout: Duration,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// Runs the daemon.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let telemetry = telemetry::init("moetrain-worker", "info", &args.telemetry)?;
        let code = daemon(args).await;
        telemetry.shutdown().await;
        code
    })
}

/// Configuration, bind, run, drain.
async fn daemon(args: Args) -> anyhow::Result<ExitCode> {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        "moetrain worker starting"
    );
    let kind = match pb::DeviceKind::parse(&args.device_kind) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: --device-kind: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let worker_id = args
        .worker_id
        .clone()
        .unwrap_or_else(|| format!("{}/{}", args.node, args.first_device));
    let mut config = worker::WorkerConfig::new(
        args.coordinator.clone(),
        args.node.clone(),
        worker_id.clone(),
        worker::Device::uniform(kind, args.devices, args.first_device),
    );
    config.data_plane_listen = args.data_plane_listen;
    config.data_plane_advertise = args.data_plane_advertise.clone();
    config.heartbeat_interval = args.heartbeat_interval;
    config.connect_timeout = args.rpc_timeout;
    config.rpc_timeout = args.rpc_timeout;
    config.retry.max = args.max_backoff.max(config.retry.initial);
    config.threads = args.threads;
    config.recv_timeout = args.recv_timeout;
    if let Err(e) = config.validate() {
        eprintln!("error: {e}");
        return Ok(ExitCode::from(2));
    }
    let bound = match worker::BoundWorker::bind(config).await {
        Ok(b) => b,
        Err(e @ worker::Error::Config(_)) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
        Err(e) => return Err(e).context("starting the worker"),
    };
    tracing::info!(worker_id = %worker_id, data_plane = %bound.data_plane_addr(), coordinator = %args.coordinator, "data-plane listener bound");
    println!("worker {worker_id} data-plane {}", bound.data_plane_addr());
    for (device, addr) in bound.device_addrs().iter().skip(1) {
        tracing::info!(device, data_plane = %addr, "device data-plane listener bound");
    }
    bound
        .run(shutdown_signal())
        .await
        .context("worker daemon")?;
    tracing::info!("worker stopped");
    Ok(ExitCode::SUCCESS)
}

/// Resolves on Ctrl-C or SIGTERM. If a handler cannot be installed the daemon logs it and
/// relies on the other signal.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
