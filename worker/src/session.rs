//! One worker session: connect, register (or resume), then heartbeat and serve the coordinator's
//! messages until the stream breaks or shutdown is asked for.
//!
//! Invariants: every wait on the coordinator has a deadline (connect, opening the stream,
//! `Registered`, queueing a message, and silence: a coordinator that says nothing for its own
//! failure timeout is treated as gone); the held ranks outlive the session, so a reconnect
//! resumes them; on shutdown the worker tells the coordinator which ranks it gives up
//! (`RankFinished`, ok = false) before closing the stream. A registration the coordinator does not
//! resume (it lost its state) voids the held ranks.

use crate::compute::{self, ComputeSettings, Control, Listeners, RankRun};
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
    /// The data-plane listener of each device.
    pub listeners: Listeners,
    /// Settings of the compute threads.
    pub compute: ComputeSettings,
    /// Compute threads of the held ranks, by (job, rank).
    pub runs: HashMap<(String, u32), RankRun>,
    /// Where compute threads queue their reports; drained by whichever session is live, so
    /// nothing queued is lost across a reconnect.
    pub outbox_tx: mpsc::UnboundedSender<pb::WorkerMessage>,
    /// The receiving end of `outbox_tx`.
    pub outbox_rx: mpsc::UnboundedReceiver<pb::WorkerMessage>,
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
            self.stop_runs(|_| true);
            warn!(
                ?dropped,
                "the coordinator has no record of this worker; dropping the ranks it held"
            );
        }
        if registered.resumed {
            // Ranks the coordinator no longer counts as ours ended while we were apart.
            let keep: std::collections::HashSet<(String, u32)> = registered
                .held
                .iter()
                .map(|h| (h.job.clone(), h.rank))
                .collect();
            let gone: Vec<(String, u32)> = self
                .ranks
                .keys()
                .into_iter()
                .filter(|k| !keep.contains(k))
                .collect();
            if !gone.is_empty() {
                warn!(
                    ?gone,
                    "the coordinator no longer counts these ranks as ours; stopping them"
                );
                for (job, _) in &gone {
                    self.ranks.stop_job(job);
                }
                self.stop_runs(|k| !keep.contains(k));
            }
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
                Some(out) = self.outbox_rx.recv() => {
                    send(&tx, out, send_limit).await?;
                }
                _ = ticker.tick() => {
                    self.runs.retain(|_, r| !r.is_finished());
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
                            debug!(job = %b.job, step = b.step, layers = b.layers.len(), "bias update received");
                            for ((job, _), run) in &self.runs {
                                if *job == b.job {
                                    run.control(Control::Bias(b.clone()));
                                }
                            }
                        }
                        Some(Down::CheckpointCommitted(c)) => self.on_committed(&c),
                        Some(Down::Registered(_)) => {
                            return Err(Error::Protocol("second Registered on one session".into()));
                        }
                        None => return Err(Error::Protocol("empty coordinator message".into())),
                    }
                }
            }
        }
    }

    /// Validates and keeps an assignment, starts its compute thread, then answers READY or
    /// REJECTED. A re-sent assignment (after a reconnect) keeps the thread already running.
    async fn on_assignment(
        &mut self,
        a: pb::Assignment,
        tx: &mpsc::Sender<pb::WorkerMessage>,
    ) -> Result<(), Error> {
        let span = info_span!("assignment", job = %a.job, rank = a.rank, device = a.device_index);
        let (job, rank) = (a.job.clone(), a.rank);
        let reply = {
            let _g = span.enter();
            match self.accept(a) {
                Ok(Accepted::New) => {
                    info!("assignment accepted; compute started; reporting ready");
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

    /// Holds the rank and starts its compute thread (only for a new assignment).
    fn accept(&mut self, a: pb::Assignment) -> Result<Accepted, String> {
        let key = (a.job.clone(), a.rank);
        if self.runs.contains_key(&key) {
            return self.ranks.accept(a, &self.config.devices);
        }
        let device = self
            .config
            .devices
            .iter()
            .find(|d| d.index == a.device_index)
            .map_or(pb::DeviceKind::Unspecified, |d| d.kind);
        // A device this worker does not have is refused by `HeldRanks::accept` with its reason.
        self.ranks.check(&a, &self.config.devices)?;
        let prepared = compute::prepare(&a, device, &self.compute)?;
        let accepted = self.ranks.accept(a.clone(), &self.config.devices)?;
        match compute::start(
            a,
            prepared,
            self.compute.clone(),
            self.listeners.clone(),
            self.outbox_tx.clone(),
        ) {
            Ok(run) => {
                self.runs.insert(key, run);
                Ok(accepted)
            }
            Err(e) => {
                self.ranks.stop_job(&key.0);
                Err(format!("starting the compute thread: {e}"))
            }
        }
    }

    /// Stops every compute thread and waits for them (bounded by the shutdown grace).
    pub(crate) async fn stop_all(&mut self) {
        let grace = self.config.shutdown_grace;
        let runs: Vec<RankRun> = self.runs.drain().map(|(_, r)| r).collect();
        if runs.is_empty() {
            return;
        }
        // Stopping shuts the data planes down, which may block: on a blocking thread, all first.
        let joined = tokio::task::spawn_blocking(move || {
            for r in &runs {
                r.stop();
            }
            for r in runs {
                r.stop_and_join(grace);
            }
        });
        if timeout(grace * 2, joined).await.is_err() {
            warn!("compute threads did not stop within the grace period");
        }
    }

    /// Stops (without waiting) the compute threads whose (job, rank) matches; they end on their
    /// own threads and give their listeners back.
    fn stop_runs(&mut self, matches: impl Fn(&(String, u32)) -> bool) {
        let keys: Vec<(String, u32)> = self.runs.keys().filter(|k| matches(k)).cloned().collect();
        let limit = self.config.shutdown_grace;
        for k in keys {
            if let Some(run) = self.runs.remove(&k) {
                // Shutting a data plane down may wait for its queued sends (the plane's linger):
                // never on the async runtime.
                tokio::task::spawn_blocking(move || run.stop_and_join(limit));
            }
        }
    }

    /// Every rank wrote its part of a checkpoint: the holder of rank 0 writes `checkpoint.json`
    /// (a small file; written inline so a shutdown right after cannot lose it).
    fn on_committed(&self, c: &pb::CheckpointCommitted) {
        let holds_rank0 = self
            .ranks
            .keys()
            .iter()
            .any(|(j, r)| *j == c.job && *r == 0);
        if !holds_rank0 {
            debug!(job = %c.job, step = c.step, "checkpoint committed (rank 0 is elsewhere)");
            return;
        }
        match compute::write_index(c) {
            Ok(()) => info!(job = %c.job, step = c.step, dir = %c.dir, ranks = c.ranks.len(),
                "checkpoint committed; checkpoint.json written"),
            Err(e) => warn!(job = %c.job, step = c.step, dir = %c.dir, error = %e,
                "could not write checkpoint.json"),
        }
    }

    /// Stops the ranks of a job the coordinator cancelled or ended.
    fn on_command(&mut self, c: pb::Command) {
        let kind = pb::CommandKind::try_from(c.kind).unwrap_or(pb::CommandKind::Unspecified);
        match kind {
            pb::CommandKind::Cancel | pb::CommandKind::Stop => {
                let ranks = self.ranks.stop_job(&c.job);
                self.stop_runs(|(job, _)| *job == c.job);
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
        self.stop_all().await;
        // Reports queued before the stop still go out.
        while let Ok(out) = self.outbox_rx.try_recv() {
            if send(&tx, out, grace).await.is_err() {
                break;
            }
        }
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
