//! The worker daemon: registers with the coordinator, heartbeats, receives assignments and
//! commands, and reconnects by itself when the coordinator goes away and comes back.
//!
//! # Layout
//! - [`config`]: who the worker is (node, stable id, devices, data-plane address) and its timings.
//! - [`retry`]: the reconnect backoff policy, a pure value.
//! - `session`: one gRPC session (`WorkerSession.Session`): register or resume, heartbeat, serve
//!   assignments and commands.
//! - [`ranks`]: the ranks held across sessions, idempotent by (job, rank).
//!
//! `run(config, shutdown)` binds the data-plane listener (its address is registered for peers;
//! the data-plane protocol itself comes with issue 6), then loops: session, and on any session
//! error a jittered exponential backoff before the next attempt. Executing a rank's schedule is
//! not here yet: a worker accepts its assignment, reserves the device and reports ready.
//!
//! Invariants: every wait has a deadline; the shutdown future ends the daemon within
//! `shutdown_grace` plus one connect timeout; the worker id never changes during a run, so the
//! coordinator resumes the registration after a reconnect or its own restart.

mod compute;
pub mod config;
mod error;
pub mod job;
pub mod ranks;
pub mod retry;
mod session;
mod stale;

pub use config::{Device, WorkerConfig};
pub use error::Error;
pub use retry::RetryPolicy;

use compute::{ComputeSettings, Listeners};
use session::{Daemon, Ended};
use std::future::Future;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, info, info_span, warn};

/// A worker whose data-plane listeners (one per device) are bound but whose session has not
/// started: the caller can log or print the addresses before [`BoundWorker::run`].
pub struct BoundWorker {
    /// The configuration, validated, with each device's advertised data-plane address filled in.
    config: WorkerConfig,
    /// The listener of each device, held (not yet served) so the registered addresses stay ours;
    /// a rank's data plane accepts on its device's listener.
    listeners: Listeners,
    /// The first device's advertised address (the worker-level address in `Register`).
    advertised: String,
}

impl BoundWorker {
    /// Validates `config` and binds one data-plane listener per device: on
    /// `data_plane_listen`'s port plus the device's position (or each on a free port when that
    /// port is 0). Peers reach device `i` on the advertised host with the port bound for it.
    pub async fn bind(mut config: WorkerConfig) -> Result<Self, Error> {
        config.validate()?;
        let base = config.data_plane_listen;
        let listeners = Listeners::default();
        let mut first = None;
        for (i, d) in config.devices.iter_mut().enumerate() {
            let mut addr = base;
            if base.port() != 0 {
                let port = u16::try_from(usize::from(base.port()) + i).map_err(|_| {
                    Error::Config(format!(
                        "data-plane port {} + {i} devices exceeds 65535",
                        base.port()
                    ))
                })?;
                addr.set_port(port);
            }
            let l =
                std::net::TcpListener::bind(addr).map_err(|source| Error::Bind { addr, source })?;
            let bound = l
                .local_addr()
                .map_err(|source| Error::Bind { addr, source })?;
            let advertised = match &config.data_plane_advertise {
                Some(a) => with_port(a, bound.port()),
                None if bound.ip().is_unspecified() => {
                    return Err(Error::Config(format!(
                        "data plane bound to {bound}: give an address peers can reach (--data-plane-advertise)"
                    )));
                }
                None => bound.to_string(),
            };
            listeners
                .insert(d.index, l)
                .map_err(|source| Error::Bind { addr, source })?;
            d.data_plane_addr = Some(advertised.clone());
            first.get_or_insert(advertised);
        }
        let advertised = first.ok_or_else(|| Error::Config("no devices".into()))?;
        Ok(Self {
            config,
            listeners,
            advertised,
        })
    }

    /// The data-plane address registered for the worker (its first device's).
    pub fn data_plane_addr(&self) -> &str {
        &self.advertised
    }

    /// Every device's data-plane address: (device index, address).
    pub fn device_addrs(&self) -> Vec<(u32, String)> {
        self.config
            .devices
            .iter()
            .map(|d| (d.index, d.data_plane_addr.clone().unwrap_or_default()))
            .collect()
    }

    /// Runs sessions until `shutdown` resolves (returns `Ok`) or the retry budget is spent.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let BoundWorker {
            config,
            listeners,
            advertised,
        } = self;
        let token = CancellationToken::new();
        let span = info_span!("worker", worker_id = %config.worker_id, node = %config.node);
        let grace = config.shutdown_grace * 3 + config.connect_timeout;
        let work = reconnect_loop(config, advertised, listeners, token.clone()).instrument(span);
        tokio::pin!(work, shutdown);
        tokio::select! {
            r = &mut work => r,
            () = &mut shutdown => {
                info!("shutdown requested");
                token.cancel();
                match tokio::time::timeout(grace, &mut work).await {
                    Ok(r) => r,
                    Err(_) => {
                        warn!(?grace, "session did not end within the grace period; exiting anyway");
                        Ok(())
                    }
                }
            }
        }
    }
}

/// `addr` with its port replaced by `port` (`host`, `host:port` and `[v6]:port` forms).
fn with_port(addr: &str, port: u16) -> String {
    let host = match addr.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']')) => h,
        _ => addr,
    };
    format!("{host}:{port}")
}

/// Binds and runs a worker until `shutdown` resolves.
pub async fn run(config: WorkerConfig, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let worker = BoundWorker::bind(config).await?;
    info!(data_plane = %worker.data_plane_addr(), "data-plane listeners bound");
    worker.run(shutdown).await
}

/// Session after session, with backoff in between, until shutdown or the retry budget ends.
async fn reconnect_loop(
    config: WorkerConfig,
    advertised: String,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let retry = config.retry.clone();
    let (outbox_tx, outbox_rx) = tokio::sync::mpsc::unbounded_channel();
    let compute = ComputeSettings {
        threads: config.threads_per_device(),
        recv_timeout: config.recv_timeout,
        bias_timeout: config.recv_timeout,
        connect_timeout: config.recv_timeout,
        link: Default::default(),
    };
    let mut daemon = Daemon {
        config,
        data_plane_addr: advertised,
        ranks: Default::default(),
        registered: false,
        listeners,
        compute,
        runs: Default::default(),
        outbox_tx,
        outbox_rx,
        replay: Default::default(),
    };
    let res = sessions(&mut daemon, retry, &shutdown).await;
    // Whatever ended the loop, no compute thread outlives the daemon.
    daemon.stop_all().await;
    res
}

async fn sessions(
    daemon: &mut Daemon,
    retry: RetryPolicy,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let mut failures = 0u32;
    let mut session_no = 0u64;
    loop {
        session_no += 1;
        let span = info_span!("session", n = session_no, coordinator = %daemon.config.coordinator);
        // The session watches `shutdown` itself, so that a live session can report the ranks
        // it gives up before closing.
        let res = daemon.session(shutdown).instrument(span).await;
        let err = match res {
            Ok(Ended::Shutdown) => return Ok(()),
            Err(e) => e,
        };
        if daemon.registered {
            failures = 0;
        }
        failures += 1;
        if let Error::CoordinatorUrl { .. } = err {
            return Err(err);
        }
        if !retry.allows(failures) {
            return Err(Error::RetriesExhausted {
                attempts: failures,
                last: Box::new(err),
            });
        }
        let delay = retry.delay(failures - 1);
        warn!(error = %err, attempt = failures, delay_ms = delay.as_millis() as u64, held = daemon.ranks.len(),
            monotonic_counter.worker_session_failures = 1u64,
            "session to the coordinator ended; reconnecting after backoff");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
    }
}
