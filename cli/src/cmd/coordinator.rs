//! `moetrain coordinator`: the control-plane daemon. Order (linkerd's main): telemetry, config
//! checked before binding (exit 2 when unusable), store connected, listener bound and its address
//! printed, serve until Ctrl-C or SIGTERM, then a drain bounded by `--drain-timeout`.
//!
//! Invariant: the first stdout line is `listening on ADDR` with the bound address (so `--listen
//! 127.0.0.1:0` works for tests and scripts); everything else is logged on stderr.

use crate::telemetry::{self, TelemetryArgs};
use anyhow::Context as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Run the coordinator daemon.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to serve gRPC on (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// etcd endpoints, comma separated (e.g. 127.0.0.1:2379). Without it the state lives in
    /// memory and is lost when the coordinator exits.
    #[arg(
        long,
        env = "MOETRAIN_ETCD",
        value_delimiter = ',',
        value_name = "ENDPOINTS"
    )]
    pub etcd: Vec<String>,
    /// Key prefix in etcd, so several installations can share one etcd.
    #[arg(long, default_value = coordinator::store::keys::DEFAULT_ROOT)]
    pub etcd_prefix: String,
    /// Heartbeat period workers are told to use.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// Silence after which a worker is lost (a job's manifest may set its own).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub failure_timeout: Duration,
    /// How long to wait for open calls and store writes after Ctrl-C or SIGTERM.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
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
        let telemetry = telemetry::init("moetrain-coordinator", "info", &args.telemetry)?;
        let code = daemon(args).await;
        telemetry.shutdown().await;
        code
    })
}

async fn daemon(args: Args) -> anyhow::Result<ExitCode> {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        "moetrain coordinator starting"
    );
    let config = coordinator::Config {
        heartbeat_interval: args.heartbeat_interval,
        failure_timeout: args.failure_timeout,
        drain_timeout: args.drain_timeout,
        ..coordinator::Config::default()
    };
    if let Err(e) = config.check() {
        eprintln!("error: {e}");
        return Ok(ExitCode::from(2));
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    if args.etcd.is_empty() {
        tracing::warn!("no --etcd: state is kept in memory and lost when this process exits");
        announce(addr)?;
        let store = Arc::new(coordinator::MemStore::new());
        coordinator::run(listener, store, config, shutdown_signal()).await?;
    } else {
        let keys = coordinator::store::keys::Keys::new(&args.etcd_prefix);
        let store = coordinator::EtcdStore::connect(&args.etcd, keys)
            .await
            .with_context(|| format!("connecting to etcd at {}", args.etcd.join(",")))?;
        announce(addr)?;
        coordinator::run(listener, Arc::new(store), config, shutdown_signal()).await?;
    }
    Ok(ExitCode::SUCCESS)
}

fn announce(addr: SocketAddr) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on {addr}").context("writing to stdout")?;
    out.flush().context("flushing stdout")?;
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
