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

pub mod config;
mod error;
pub mod ranks;
pub mod retry;
mod session;

pub use config::{Device, WorkerConfig};
pub use error::Error;
pub use retry::RetryPolicy;

use session::{Daemon, Ended};
use std::future::Future;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, info, info_span, warn};

/// A worker whose data-plane listener is bound but whose session has not started: the caller
/// can log or print the address before [`BoundWorker::run`].
pub struct BoundWorker {
    /// The configuration, validated.
    config: WorkerConfig,
    /// The data-plane listener. Held (not yet served) so the registered address stays ours;
    /// the data plane of issue 6 accepts on it.
    data_plane: TcpListener,
    /// The address registered for peers.
    advertised: String,
}

impl BoundWorker {
    /// Validates `config` and binds the data-plane listener.
    pub async fn bind(config: WorkerConfig) -> Result<Self, Error> {
        config.validate()?;
        let addr = config.data_plane_listen;
        let data_plane = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let bound = data_plane
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        let advertised = match &config.data_plane_advertise {
            Some(a) => a.clone(),
            None if bound.ip().is_unspecified() => {
                return Err(Error::Config(format!(
                    "data plane bound to {bound}: give an address peers can reach (--data-plane-advertise)"
                )));
            }
            None => bound.to_string(),
        };
        Ok(Self {
            config,
            data_plane,
            advertised,
        })
    }

    /// Where the data-plane listener is bound.
    pub fn data_plane_local_addr(&self) -> Option<SocketAddr> {
        self.data_plane.local_addr().ok()
    }

    /// The data-plane address registered with the coordinator.
    pub fn data_plane_addr(&self) -> &str {
        &self.advertised
    }

    /// Runs sessions until `shutdown` resolves (returns `Ok`) or the retry budget is spent.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let BoundWorker {
            config,
            data_plane,
            advertised,
        } = self;
        let token = CancellationToken::new();
        let span = info_span!("worker", worker_id = %config.worker_id, node = %config.node);
        let grace = config.shutdown_grace + config.connect_timeout;
        let work = reconnect_loop(config, advertised, token.clone()).instrument(span);
        tokio::pin!(work, shutdown);
        let res = tokio::select! {
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
        };
        drop(data_plane);
        res
    }
}

/// Binds and runs a worker until `shutdown` resolves.
pub async fn run(config: WorkerConfig, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let worker = BoundWorker::bind(config).await?;
    info!(data_plane = %worker.data_plane_addr(), "data-plane listener bound");
    worker.run(shutdown).await
}

/// Session after session, with backoff in between, until shutdown or the retry budget ends.
async fn reconnect_loop(
    config: WorkerConfig,
    advertised: String,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let retry = config.retry.clone();
    let mut daemon = Daemon {
        config,
        data_plane_addr: advertised,
        ranks: Default::default(),
        registered: false,
    };
    let mut failures = 0u32;
    let mut session_no = 0u64;
    loop {
        session_no += 1;
        let span = info_span!("session", n = session_no, coordinator = %daemon.config.coordinator);
        // The session watches `shutdown` itself, so that a live session can report the ranks
        // it gives up before closing.
        let res = daemon.session(&shutdown).instrument(span).await;
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
