//! The `WorkerSession` service: one bidirectional stream per worker daemon.
//!
//! The first message must be `Register` (within `REGISTER_TIMEOUT`). After that a reader task owns
//! the inbound half: heartbeats take the core's cheap path and are acknowledged directly on this
//! session's channel; everything else becomes a core event. The outbound half is the receiver of
//! the session's channel, cut off when shutdown begins.
//!
//! Invariant: when the inbound half ends (worker gone, error, shutdown) the core gets exactly one
//! `Disconnected` for this session number, and the session table entry is removed only if it still
//! belongs to this session (a reconnect may already have replaced it).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::Stream;
use futures::StreamExt;
use proto::pb;
use proto::pb::worker_message::Msg;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::{SessionTx, Shared, now_ms};
use crate::Error;
use crate::core::{Event, Registration};
use crate::store::keys::check_worker_id;

/// How long a new session may take to send `Register`.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// See the module docs.
pub struct Sessions {
    shared: Arc<Shared>,
}

impl Sessions {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

type OutStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

fn registration(reg: pb::Register) -> Result<Registration, Error> {
    check_worker_id("worker_id", &reg.worker_id).map_err(Error::InvalidRequest)?;
    if reg.node.is_empty() {
        return Err(Error::InvalidRequest(format!(
            "register {}: node is empty",
            reg.worker_id
        )));
    }
    Ok(Registration {
        worker_id: reg.worker_id,
        node: reg.node,
        devices: reg.devices,
        data_plane_addr: reg.data_plane_addr,
    })
}

#[tonic::async_trait]
impl pb::worker_session_server::WorkerSession for Sessions {
    type SessionStream = OutStream;

    async fn session(
        &self,
        req: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<OutStream>, Status> {
        let peer = req.remote_addr();
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!("no Register within {REGISTER_TIMEOUT:?}"))
            })??;
        let reg = match first {
            Some(pb::WorkerMessage {
                msg: Some(Msg::Register(reg)),
            }) => reg,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be Register",
                ));
            }
            None => return Err(Status::cancelled("session closed before Register")),
        };
        let reg = registration(reg)?;
        let worker = reg.worker_id.clone();
        let span = tracing::info_span!("rpc", method = "Session", worker = %worker, ?peer);
        let session = self.shared.next_session.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let _entered = span.enter();
            let mut inner = self.shared.lock();
            let previous = inner.sessions.insert(worker.clone(), (session, tx.clone()));
            let now = now_ms();
            match inner.core.handle(Event::Register { reg, session }, now) {
                Ok(actions) => self.shared.apply(&mut inner, actions),
                Err(e) => {
                    match previous {
                        Some(p) => inner.sessions.insert(worker.clone(), p),
                        None => inner.sessions.remove(&worker),
                    };
                    return Err(Error::from(e).into());
                }
            }
            tracing::info!(session, "worker registered");
        }
        tokio::spawn(read_loop(self.shared.clone(), worker, session, inbound, tx).instrument(span));
        let shutdown = self.shared.shutdown.clone();
        let out = UnboundedReceiverStream::new(rx).take_until(shutdown.cancelled_owned());
        Ok(Response::new(Box::pin(out)))
    }
}

/// Reads one worker's messages until its stream ends or shutdown begins.
async fn read_loop(
    shared: Arc<Shared>,
    worker: String,
    session: u64,
    mut inbound: Streaming<pb::WorkerMessage>,
    tx: SessionTx,
) {
    loop {
        let next = tokio::select! {
            m = inbound.message() => m,
            () = shared.shutdown.cancelled() => break,
        };
        let msg = match next {
            Ok(Some(pb::WorkerMessage { msg: Some(m) })) => m,
            Ok(Some(pb::WorkerMessage { msg: None })) => {
                tracing::warn!("empty message from worker ignored");
                continue;
            }
            Ok(None) => {
                tracing::info!("worker closed its session");
                break;
            }
            Err(status) => {
                tracing::info!(%status, "worker session broke");
                break;
            }
        };
        let event = match msg {
            Msg::Heartbeat(hb) => {
                let mut inner = shared.lock();
                match inner.core.heartbeat(&worker, now_ms()) {
                    Ok(actions) => {
                        if !actions.is_empty() {
                            shared.apply(&mut inner, actions);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "heartbeat refused"),
                }
                drop(inner);
                let ack = pb::HeartbeatAck {
                    seq: hb.seq,
                    received_unix_ms: now_ms(),
                };
                let _ = tx.send(Ok(crate::core::msg(
                    pb::coordinator_message::Msg::HeartbeatAck(ack),
                )));
                continue;
            }
            Msg::Register(_) => {
                tracing::warn!("second Register on one session ignored");
                continue;
            }
            Msg::Ack(ack) => Event::Ack {
                worker: worker.clone(),
                job: ack.job,
                rank: ack.rank,
                ready: ack.status == pb::AckStatus::Ready as i32,
                reason: if ack.status == pb::AckStatus::Ready as i32
                    || ack.status == pb::AckStatus::Rejected as i32
                {
                    ack.reason
                } else {
                    format!("unknown ack status {} ({})", ack.status, ack.reason)
                },
            },
            Msg::StepReport(report) => Event::StepReport {
                worker: worker.clone(),
                report: Box::new(report),
            },
            Msg::CheckpointWritten(c) => Event::CheckpointWritten {
                worker: worker.clone(),
                written: Box::new(c),
            },
            Msg::RankFinished(f) => Event::RankFinished {
                worker: worker.clone(),
                job: f.job,
                rank: f.rank,
                ok: f.ok,
                reason: f.reason,
                deterministic: f.deterministic,
            },
        };
        // Any message proves the worker alive, not only heartbeats.
        let mut inner = shared.lock();
        let now = now_ms();
        if let Ok(actions) = inner.core.heartbeat(&worker, now) {
            shared.apply(&mut inner, actions);
        }
        match inner.core.handle(event, now) {
            Ok(actions) => shared.apply(&mut inner, actions),
            Err(e) => tracing::warn!(error = %e, "worker message refused"),
        }
    }
    let mut inner = shared.lock();
    if inner
        .sessions
        .get(&worker)
        .is_some_and(|(s, _)| *s == session)
    {
        inner.sessions.remove(&worker);
    }
    match inner.core.handle(
        Event::Disconnected {
            worker: worker.clone(),
            session,
        },
        now_ms(),
    ) {
        Ok(actions) => shared.apply(&mut inner, actions),
        Err(e) => tracing::warn!(error = %e, "disconnect refused"),
    }
}
