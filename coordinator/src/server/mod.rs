//! The coordinator's IO shell: gRPC services, the store writer, the ticker, and shutdown.
//!
//! Shape (mini-redis): [`run`] takes a bound listener, a store, the config and a shutdown future,
//! so tests start it on `127.0.0.1:0` in-process and the binary passes Ctrl-C/SIGTERM.
//!
//! Concurrency: one `std::sync::Mutex` guards the core and the session table together. No
//! `.await` happens while it is held; each critical section is a map update plus pushing actions
//! into unbounded channels, so the order of the core's actions is the order they reach workers and
//! the store. Store writes happen on one writer task, in order, off the lock. Heartbeats take the
//! lock for one map lookup and produce no store write.
//!
//! Shutdown: the caller's future fires → the cancellation token stops accepting, ends every session
//! stream and the ticker → the gRPC server drains in-flight calls → the writer drains queued
//! writes; the whole drain is bounded by `Config::drain_timeout`.

mod api;
mod session;
pub mod status;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use proto::pb;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::core::{Action, Core, UnixMs};
use crate::store::{StateStore, StoreError};
use crate::{Config, Error};

/// Messages for one worker's session stream.
type SessionTx = mpsc::UnboundedSender<Result<pb::CoordinatorMessage, tonic::Status>>;

/// What the store writer does, in order.
enum StoreOp {
    /// Apply one store action of the core.
    Apply(Box<Action>),
    /// Answer when everything queued before has been written (or failed).
    Flush(oneshot::Sender<Result<(), String>>),
}

/// State guarded by the one lock.
struct Inner {
    core: Core,
    /// Open session per worker id, with the session's number (a reconnect replaces the entry; the
    /// old session's cleanup only removes the entry if the number still matches).
    sessions: HashMap<String, (u64, SessionTx)>,
}

/// Shared by every service and task of one coordinator.
struct Shared {
    inner: Mutex<Inner>,
    /// Into the store writer task. Each clone of `Shared` holds it; when the last `Arc<Shared>`
    /// drops, the channel closes and the writer finishes what is queued and exits.
    writer: mpsc::UnboundedSender<StoreOp>,
    /// Numbers sessions so stale disconnects are recognised.
    next_session: AtomicU64,
    /// Cancelled when shutdown begins (or when the store fences us): ends sessions and the ticker.
    shutdown: CancellationToken,
    /// Why the coordinator stopped on its own, if it did.
    fatal: Mutex<Option<StoreError>>,
    /// Count of failed store writes since start (logged; the next flush reports the latest).
    store_errors: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The core's methods do not panic on valid input; if one did, the state it left is the
        // best we have, and refusing every later request would be worse.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies actions under the lock: sends go to session channels, store actions to the writer.
    fn apply(&self, inner: &mut Inner, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send { worker, msg } => {
                    if let Some((_, tx)) = inner.sessions.get(&worker) {
                        // A closed channel means the session is ending; its cleanup follows.
                        let _ = tx.send(Ok(msg));
                    }
                }
                other => {
                    // The writer only exits after every sender is gone, so this cannot fail
                    // while `self` is alive.
                    let _ = self.writer.send(StoreOp::Apply(Box::new(other)));
                }
            }
        }
    }

    /// Runs an event through the core and applies its actions.
    fn handle(&self, event: crate::core::Event) -> Result<(), Error> {
        let mut inner = self.lock();
        let now = now_ms();
        let actions = inner.core.handle(event, now)?;
        self.apply(&mut inner, actions);
        Ok(())
    }

    /// Waits until every store write queued so far has landed.
    async fn flush(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        let _ = self.writer.send(StoreOp::Flush(tx));
        match tokio::time::timeout(crate::store::etcd::REQUEST_TIMEOUT * 2, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(Error::Unavailable(format!("state store write failed: {e}"))),
            Ok(Err(_)) => Err(Error::Unavailable("coordinator is shutting down".into())),
            Err(_) => Err(Error::Unavailable("state store write timed out".into())),
        }
    }
}

/// The wall clock in Unix milliseconds (the core itself never reads it).
pub fn now_ms() -> UnixMs {
    proto::convert::now_unix_ms()
}

/// Serves the coordinator on `listener` until `shutdown` completes, then drains (bounded by
/// `config.drain_timeout`). Loads the store first, so a coordinator restarted on a persistent store
/// resumes its jobs and registrations.
pub async fn run<S: StateStore>(
    listener: TcpListener,
    store: Arc<S>,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    config.check()?;
    let drain = config.drain_timeout;
    let snapshot = store
        .load()
        .instrument(tracing::info_span!("store", kind = store.kind()))
        .await?;
    tracing::info!(
        store = store.kind(),
        jobs = snapshot.jobs.len(),
        workers = snapshot.workers.len(),
        "state loaded"
    );
    let core = Core::restore(config.clone(), snapshot, now_ms());
    let (writer_tx, writer_rx) = mpsc::unbounded_channel();
    let token = CancellationToken::new();
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner {
            core,
            sessions: HashMap::new(),
        }),
        writer: writer_tx,
        next_session: AtomicU64::new(1),
        shutdown: token.clone(),
        fatal: Mutex::new(None),
        store_errors: AtomicU64::new(0),
    });
    let writer = tokio::spawn(
        write_loop(store, writer_rx, Arc::downgrade(&shared))
            .instrument(tracing::info_span!("store")),
    );
    let ticker = tokio::spawn(
        tick_loop(shared.clone(), config.tick).instrument(tracing::info_span!("scheduler")),
    );

    let local = listener.local_addr()?;
    tracing::info!(%local, "coordinator serving");
    let mut server = Box::pin(
        tonic::transport::Server::builder()
            .add_service(pb::coordinator_server::CoordinatorServer::new(
                api::Api::new(shared.clone()),
            ))
            .add_service(pb::worker_session_server::WorkerSessionServer::new(
                session::Sessions::new(shared.clone()),
            ))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                token.clone().cancelled_owned(),
            ),
    );
    let served = tokio::select! {
        res = &mut server => res.map_err(Error::from),
        () = shutdown => {
            tracing::info!("shutdown requested, draining");
            token.cancel();
            match tokio::time::timeout(drain, &mut server).await {
                Ok(res) => res.map_err(Error::from),
                Err(_) => {
                    tracing::warn!(?drain, "gRPC drain timed out; dropping open calls");
                    Ok(())
                }
            }
        }
    };
    token.cancel();
    let _ = ticker.await;
    let fatal = shared
        .fatal
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    drop(shared);
    // Dropping the server future releases the services' handles on `Shared`, closing the writer.
    drop(server);
    match tokio::time::timeout(drain, writer).await {
        Ok(_) => {}
        Err(_) => tracing::warn!(?drain, "store writer drain timed out"),
    }
    tracing::info!("coordinator stopped");
    if let Some(err) = fatal {
        return Err(err.into());
    }
    served
}

/// Applies store actions in order until every sender is gone. A fenced store stops the
/// coordinator: another coordinator owns the state now.
async fn write_loop<S: StateStore>(
    store: Arc<S>,
    mut rx: mpsc::UnboundedReceiver<StoreOp>,
    shared: std::sync::Weak<Shared>,
) {
    let mut last_error: Option<String> = None;
    while let Some(op) = rx.recv().await {
        match op {
            StoreOp::Flush(done) => {
                let _ = done.send(match last_error.take() {
                    None => Ok(()),
                    Some(e) => Err(e),
                });
            }
            StoreOp::Apply(action) => {
                let res = match action.as_ref() {
                    Action::PutJob(job) => store.put_job(job).await,
                    Action::PutWorker(w) => store.put_worker(w).await,
                    Action::PutAssignment(a) => store.put_assignment(a).await,
                    Action::DeleteAssignments { job } => store.delete_assignments(job).await,
                    Action::AppendEvent { job, event } => store.append_event(job, event).await,
                    Action::Presence { worker, present } => {
                        store.set_presence(worker, *present).await
                    }
                    Action::Send { .. } => Ok(()),
                };
                if let Err(err) = res {
                    tracing::error!(error = %err, "state store write failed");
                    last_error = Some(err.to_string());
                    if let Some(shared) = shared.upgrade() {
                        shared.store_errors.fetch_add(1, Ordering::Relaxed);
                        if matches!(err, StoreError::Fenced { .. }) {
                            *shared.fatal.lock().unwrap_or_else(|e| e.into_inner()) = Some(err);
                            shared.shutdown.cancel();
                        }
                    }
                }
            }
        }
    }
}

/// Runs liveness and the scheduler every `tick` until shutdown.
async fn tick_loop(shared: Arc<Shared>, tick: std::time::Duration) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {
                if let Err(e) = shared.handle(crate::core::Event::Tick) {
                    tracing::error!(error = %e, "tick failed");
                }
            }
            () = shared.shutdown.cancelled() => break,
        }
    }
}
