//! One worker session: connect, register (or resume), then heartbeat and serve the coordinator's
//! messages until the stream breaks or shutdown is asked for.
//!
//! Invariants: every wait on the coordinator has a deadline (connect, opening the stream,
//! `Registered`, queueing a message, and silence: a coordinator that says nothing for its own
//! failure timeout is treated as gone); the held ranks outlive the session, so a reconnect
//! resumes them; on shutdown the worker tells the coordinator which ranks it gives up
//! (`RankFinished`, ok = false) before closing the stream. A registration the coordinator does not
//! resume (it lost its state) voids the held ranks.

use crate::ranks::{Accepted, HeldRanks};
use crate::{Error, WorkerConfig};
use proto::pb;
use proto::pb::coordinator_message::Msg as Down;
use proto::pb::worker_session_client::WorkerSessionClient;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tracing::{Instrument as _, debug, info, info_span, warn};

/// Outgoing messages that may queue before sends wait (heartbeats, acks, reports).
const OUTBOX: usize = 256;

/// How one session ended without error.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Shutdown was asked for and the session closed cleanly.
    Shutdown,
}

/// State of one worker daemon shared by its successive sessions.
pub(crate) struct Daemon {
    /// The configuration (devices, timings, identity).
    pub config: WorkerConfig,
    /// The advertised data-plane address sent in `Register`.
    pub data_plane_addr: String,
    /// Ranks held across sessions.
    pub ranks: HeldRanks,
    /// Set by a session once the coordinator answered `Registered`; the reconnect loop reads it
    /// to reset its backoff.
    pub registered: bool,
}

impl Daemon {
    /// Runs one session to its end.
    pub(crate) async fn session(&mut self, shutdown: &CancellationToken) -> Result<Ended, Error> {
        self.registered = false;
        // Connecting and registering hold nothing worth reporting: shutdown simply abandons them.
        let (tx, inbound, registered) = tokio::select! {
            r = self.open() => r?,
            () = shutdown.cancelled() => return Ok(Ended::Shutdown),
        };
        self.serve(shutdown, tx, inbound, registered).await
    }

    /// Connects, opens the stream, sends `Register` and waits for `Registered`.
    async fn open(
        &self,
    ) -> Result<
        (
            mpsc::Sender<pb::WorkerMessage>,
            tonic::Streaming<pb::CoordinatorMessage>,
            pb::Registered,
        ),
        Error,
    > {
        let cfg = &self.config;
        let endpoint = Endpoint::from_shared(cfg.coordinator.clone())
            .map_err(|source| Error::CoordinatorUrl {
                url: cfg.coordinator.clone(),
                source,
            })?
            .connect_timeout(cfg.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(cfg.silence_timeout)
            .keep_alive_while_idle(true);
        let channel = timeout(cfg.connect_timeout, endpoint.connect())
            .await
            .map_err(|_| Error::Timeout {
                what: "connecting",
                after: cfg.connect_timeout,
            })?
            .map_err(Error::Connect)?;
        let mut client = WorkerSessionClient::new(channel);

        let (tx, rx) = mpsc::channel(OUTBOX);
        let register = pb::Register {
            worker_id: cfg.worker_id.clone(),
            node: cfg.node.clone(),
            devices: cfg.devices.iter().map(|d| d.to_proto()).collect(),
            data_plane_addr: self.data_plane_addr.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        tx.try_send(pb::WorkerMessage::register(register))
            .map_err(|_| Error::Protocol("outbox full before Register".into()))?;
        let response = timeout(cfg.rpc_timeout, client.session(ReceiverStream::new(rx)))
            .await
            .map_err(|_| Error::Timeout {
                what: "opening the session stream",
                after: cfg.rpc_timeout,
            })??;
        let mut inbound = response.into_inner();
        let first = timeout(cfg.rpc_timeout, inbound.message())
            .await
            .map_err(|_| Error::Timeout {
                what: "waiting for Registered",
                after: cfg.rpc_timeout,
            })??;
        let registered = match first {
            Some(pb::CoordinatorMessage {
                msg: Some(Down::Registered(r)),
            }) => r,
            Some(other) => {
                return Err(Error::Protocol(format!(
                    "expected Registered first, got {other:?}"
                )));
            }
            None => return Err(Error::Closed),
        };
        if registered.worker_id != cfg.worker_id {
            return Err(Error::Protocol(format!(
                "registered as `{}`, asked for `{}`",
                registered.worker_id, cfg.worker_id
            )));
        }
        Ok((tx, inbound, registered))
    }

    /// The registered part of a session: heartbeats and the coordinator's messages.
    async fn serve(
        &mut self,
        shutdown: &CancellationToken,
        tx: mpsc::Sender<pb::WorkerMessage>,
        mut inbound: tonic::Streaming<pb::CoordinatorMessage>,
        registered: pb::Registered,
    ) -> Result<Ended, Error> {
        self.registered = true;
        if !registered.resumed && !self.ranks.is_empty() {
            // A coordinator that does not know this worker (in-memory store restarted) does not
            // know its ranks either: they are void, and keeping them would block the devices.
            let dropped = self.ranks.clear();
            warn!(
                ?dropped,
                "the coordinator has no record of this worker; dropping the ranks it held"
            );
        }
        let cfg = &self.config;
        let interval = match registered.heartbeat_interval_ms {
            0 => cfg.heartbeat_interval,
            ms => Duration::from_millis(ms),
        };
        let silence = match registered.failure_timeout_ms {
            0 => cfg.silence_timeout,
            ms => Duration::from_millis(ms),
        }
        .max(interval * 2);
        info!(
            resumed = registered.resumed,
            heartbeat_ms = interval.as_millis() as u64,
            silence_ms = silence.as_millis() as u64,
            held = self.ranks.len(),
            monotonic_counter.worker_registrations = 1u64,
            "registered with the coordinator"
        );

        let send_limit = interval.max(cfg.rpc_timeout);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut seq = 0u64;
        // Heartbeats in flight: seq to send time, for the round-trip log.
        let mut in_flight: HashMap<u64, Instant> = HashMap::new();
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    self.leave(tx, inbound).await;
                    return Ok(Ended::Shutdown);
                }
                _ = ticker.tick() => {
                    if last_heard.elapsed() > silence {
                        return Err(Error::Timeout { what: "hearing from the coordinator", after: silence });
                    }
                    seq += 1;
                    let span = tracing::debug_span!("heartbeat", seq);
                    send(&tx, pb::WorkerMessage::heartbeat(seq), send_limit)
                        .instrument(span)
                        .await?;
                    in_flight.insert(seq, Instant::now());
                    // Acks lost with an old stream never arrive; keep the map bounded.
                    in_flight.retain(|s, _| *s + 64 > seq);
                }
                msg = inbound.message() => {
                    let Some(msg) = msg? else { return Err(Error::Closed) };
                    last_heard = Instant::now();
                    match msg.msg {
                        Some(Down::HeartbeatAck(ack)) => {
                            if let Some(sent) = in_flight.remove(&ack.seq) {
                                debug!(seq = ack.seq, rtt_us = sent.elapsed().as_micros() as u64, "heartbeat acknowledged");
                            }
                        }
                        Some(Down::Assignment(a)) => self.on_assignment(a, &tx).await?,
                        Some(Down::Command(c)) => self.on_command(c),
                        Some(Down::BiasUpdate(b)) => {
                            debug!(job = %b.job, step = b.step, layers = b.layers.len(),
                                "bias update received; applying it is the executor's job (issue 6)");
                        }
                        Some(Down::Registered(_)) => {
                            return Err(Error::Protocol("second Registered on one session".into()));
                        }
                        None => return Err(Error::Protocol("empty coordinator message".into())),
                    }
                }
            }
        }
    }

    /// Validates and keeps an assignment, then answers READY or REJECTED. Running the model on
    /// it is the executor's work (issue 6); here accepting means the rank is reserved on its
    /// device and the worker is ready to start.
    async fn on_assignment(
        &mut self,
        a: pb::Assignment,
        tx: &mpsc::Sender<pb::WorkerMessage>,
    ) -> Result<(), Error> {
        let span = info_span!("assignment", job = %a.job, rank = a.rank, device = a.device_index);
        let (job, rank) = (a.job.clone(), a.rank);
        let reply = {
            let _g = span.enter();
            match self.ranks.accept(a, &self.config.devices) {
                Ok(Accepted::New) => {
                    info!("assignment accepted; reporting ready");
                    pb::WorkerMessage::ready(&job, rank)
                }
                Ok(Accepted::Again) => {
                    info!("assignment re-sent after reconnect; still ready");
                    pb::WorkerMessage::ready(&job, rank)
                }
                Err(reason) => {
                    warn!(%reason, "assignment rejected");
                    pb::WorkerMessage::rejected(&job, rank, reason)
                }
            }
        };
        send(tx, reply, self.config.rpc_timeout)
            .instrument(span)
            .await
    }

    /// Stops the ranks of a job the coordinator cancelled or ended.
    fn on_command(&mut self, c: pb::Command) {
        let kind = pb::CommandKind::try_from(c.kind).unwrap_or(pb::CommandKind::Unspecified);
        match kind {
            pb::CommandKind::Cancel | pb::CommandKind::Stop => {
                let ranks = self.ranks.stop_job(&c.job);
                info!(job = %c.job, ?kind, reason = %c.reason, ?ranks, "stopped the job's ranks");
            }
            pb::CommandKind::Unspecified => {
                warn!(job = %c.job, kind = c.kind, "ignoring a command of unknown kind");
            }
        }
    }

    /// The shutdown path of a live session: report every held rank as given up, close the
    /// outgoing stream and give the coordinator `shutdown_grace` to close its side.
    async fn leave(
        &mut self,
        tx: mpsc::Sender<pb::WorkerMessage>,
        mut inbound: tonic::Streaming<pb::CoordinatorMessage>,
    ) {
        let grace = self.config.shutdown_grace;
        for (job, rank) in self.ranks.keys() {
            let msg = pb::WorkerMessage {
                msg: Some(pb::worker_message::Msg::RankFinished(pb::RankFinished {
                    job,
                    rank,
                    ok: false,
                    reason: format!("worker {} shut down", self.config.worker_id),
                })),
            };
            if let Err(e) = send(&tx, msg, grace).await {
                warn!(error = %e, "could not report a rank given up at shutdown");
                break;
            }
        }
        drop(tx);
        let drained = timeout(grace, async {
            while let Ok(Some(_)) = inbound.message().await {}
        })
        .await;
        if drained.is_err() {
            warn!(
                ?grace,
                "the coordinator did not close the session within the grace period"
            );
        }
    }
}

/// Queues one message, waiting at most `limit` for room.
async fn send(
    tx: &mpsc::Sender<pb::WorkerMessage>,
    msg: pb::WorkerMessage,
    limit: Duration,
) -> Result<(), Error> {
    match timeout(limit, tx.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Error::Closed),
        Err(_) => Err(Error::Timeout {
            what: "queueing a message to the coordinator",
            after: limit,
        }),
    }
}
