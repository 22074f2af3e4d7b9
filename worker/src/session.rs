//! One worker session: connect, register (or resume), then heartbeat and serve the coordinator's
//! messages until the stream breaks or shutdown is asked for.
//!
//! Invariants: every wait on the coordinator has a deadline (connect, opening the stream,
//! `Registered`, queueing a message, and silence: a coordinator that says nothing for its own
//! failure timeout is treated as gone); the held ranks outlive the session, so a reconnect
//! resumes them; on shutdown the worker tells the coordinator which ranks it gives up
//! (`RankFinished`, ok = false) before closing the stream. A registration the coordinator does not
//! resume (it lost its state) voids the held ranks.
//!
//! Restart survival: a step report, checkpoint part or `RankFinished` the coordinator may not have
//! recorded yet is kept (at most [`REPORTS_KEPT`] reports per rank, dropped [`PRUNE_LAG`] steps
//! behind the coordinator's latest bias or its `next_step`; the last [`PARTS_KEPT`] checkpoint
//! parts), and after a resumed registration the kept reports of every held rank from its
//! `HeldRank.next_step` on are re-sent in step order, then the kept checkpoint parts and
//! `RankFinished` messages; the coordinator ignores what it already has. A re-sent
//! assignment of a rank already held is acknowledged again and never restarts its compute.

use crate::compute::{self, ComputeSettings, Control, Listeners, RankRun};
use crate::ranks::{Accepted, HeldRanks};
use crate::{Error, WorkerConfig};
use proto::pb;
use proto::pb::coordinator_message::Msg as Down;
use proto::pb::worker_session_client::WorkerSessionClient;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tracing::{Instrument as _, debug, info, info_span, warn};

/// Outgoing messages that may queue before sends wait (heartbeats, acks, reports).
const OUTBOX: usize = 256;
/// Step reports kept per rank for re-sending; beyond this the oldest is dropped (with a warning).
pub(crate) const REPORTS_KEPT: usize = 256;
/// A kept report is dropped once the coordinator's latest bias, or its `next_step`, is this many
/// steps past it: the coordinator writes each finished step's record right away, so its store
/// cannot be that far behind what it sent.
pub(crate) const PRUNE_LAG: u64 = 8;
/// Checkpoint parts kept per rank for re-sending (a restarted coordinator lost its partial sets).
pub(crate) const PARTS_KEPT: usize = 2;

/// Whether the daemon has a registered session, and since when it has (or has not): the compute
/// threads' bias wait follows it, so that a coordinator that is away for a restart does not time
/// a waiting rank out (see `compute`).
#[derive(Clone, Debug)]
pub(crate) struct SessionLink {
    inner: Arc<Mutex<(bool, std::time::Instant)>>,
}

impl Default for SessionLink {
    fn default() -> Self {
        Self {
            inner: Arc::new(Mutex::new((false, std::time::Instant::now()))),
        }
    }
}

impl SessionLink {
    /// Records that a session is registered (`true`) or gone (`false`); the time only moves
    /// when the state changes.
    pub(crate) fn set(&self, up: bool) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.0 != up {
            *g = (up, std::time::Instant::now());
        }
    }

    /// Whether a session is registered, and since when that is so.
    pub(crate) fn state(&self) -> (bool, std::time::Instant) {
        *self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a restarted coordinator may have lost and a resumed registration re-sends (see the
/// module docs), by (job, rank).
#[derive(Debug, Default)]
pub(crate) struct Replay {
    reports: BTreeMap<(String, u32), VecDeque<pb::StepReport>>,
    parts: BTreeMap<(String, u32), VecDeque<pb::CheckpointWritten>>,
    finished: BTreeMap<(String, u32), pb::RankFinished>,
    /// Ranks already warned about dropping a report.
    overflowed: std::collections::BTreeSet<(String, u32)>,
}

impl Replay {
    /// Keeps a copy of a message going to the coordinator if it is one to re-send.
    pub(crate) fn record(&mut self, m: &pb::WorkerMessage) {
        match &m.msg {
            Some(pb::worker_message::Msg::StepReport(r)) => {
                let key = (r.job.clone(), r.rank);
                let kept = self.reports.entry(key.clone()).or_default();
                kept.push_back(r.clone());
                if kept.len() > REPORTS_KEPT {
                    kept.pop_front();
                    if self.overflowed.insert(key) {
                        warn!(job = %r.job, rank = r.rank, kept = REPORTS_KEPT,
                            "more step reports unconfirmed than kept; dropping the oldest (a coordinator restart now could not recover them)");
                    }
                }
            }
            Some(pb::worker_message::Msg::CheckpointWritten(c)) => {
                let kept = self.parts.entry((c.job.clone(), c.rank)).or_default();
                kept.push_back(c.clone());
                if kept.len() > PARTS_KEPT {
                    kept.pop_front();
                }
            }
            Some(pb::worker_message::Msg::RankFinished(f)) => {
                self.finished.insert((f.job.clone(), f.rank), f.clone());
            }
            _ => {}
        }
    }

    /// The coordinator sent `job`'s bias after `step`: reports [`PRUNE_LAG`] steps older go.
    pub(crate) fn bias_sent(&mut self, job: &str, step: u64) {
        for ((_, _), kept) in self.reports.iter_mut().filter(|((j, _), _)| j == job) {
            while kept.front().is_some_and(|r| r.step + PRUNE_LAG <= step) {
                kept.pop_front();
            }
        }
    }

    /// Forgets everything of `job` (it ended).
    pub(crate) fn forget_job(&mut self, job: &str) {
        self.reports.retain(|(j, _), _| j != job);
        self.parts.retain(|(j, _), _| j != job);
        self.finished.retain(|(j, _), _| j != job);
        self.overflowed.retain(|(j, _)| j != job);
    }

    /// Forgets everything (the coordinator does not know this worker any more).
    pub(crate) fn clear(&mut self) {
        *self = Self::default();
    }

    /// After a resumed registration listing `held`: forgets the ranks not held, and returns what
    /// to re-send: every held rank's kept reports from its `next_step` on, by step (then rank),
    /// then its kept checkpoint parts, then the `RankFinished` of held ranks that ended.
    pub(crate) fn resume(&mut self, held: &[pb::HeldRank]) -> Vec<pb::WorkerMessage> {
        let next: BTreeMap<(String, u32), u64> = held
            .iter()
            .map(|h| ((h.job.clone(), h.rank), h.next_step))
            .collect();
        self.reports.retain(|k, _| next.contains_key(k));
        self.parts.retain(|k, _| next.contains_key(k));
        self.finished.retain(|k, _| next.contains_key(k));
        self.overflowed.retain(|k| next.contains_key(k));
        let mut again: Vec<&pb::StepReport> = Vec::new();
        for (key, kept) in &mut self.reports {
            let from = next.get(key).copied().unwrap_or(0);
            while kept.front().is_some_and(|r| r.step + PRUNE_LAG <= from) {
                kept.pop_front();
            }
            again.extend(kept.iter().filter(|r| r.step >= from));
        }
        again.sort_by_key(|r| (r.step, r.rank));
        let reports = again.into_iter().map(|r| pb::WorkerMessage {
            msg: Some(pb::worker_message::Msg::StepReport(r.clone())),
        });
        let parts = self.parts.values().flatten().map(|c| pb::WorkerMessage {
            msg: Some(pb::worker_message::Msg::CheckpointWritten(c.clone())),
        });
        let finished = self.finished.values().map(|f| pb::WorkerMessage {
            msg: Some(pb::worker_message::Msg::RankFinished(f.clone())),
        });
        reports.chain(parts).chain(finished).collect()
    }
}

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
    /// Reports and rank ends kept for re-sending after a resumed registration.
    pub replay: Replay,
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
        let ended = self.serve(shutdown, tx, inbound, registered).await;
        self.compute.link.set(false);
        ended
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
            self.replay.clear();
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
        self.compute.link.set(true);
        if registered.resumed {
            // What the coordinator may have lost (it may have restarted) goes out first, so each
            // rank's reports reach it in step order.
            let again = self.replay.resume(&registered.held);
            if !again.is_empty() {
                info!(
                    messages = again.len(),
                    "re-sending step reports and rank ends the coordinator may not have recorded"
                );
            }
            for m in again {
                send(&tx, m, send_limit).await?;
            }
        }
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
                    self.replay.record(&out);
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
                            self.replay.bias_sent(&b.job, b.step);
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
    /// REJECTED. A re-sent assignment (after a reconnect) of a rank still held keeps the thread
    /// already running, or ended: a rank never trains twice.
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
        if self.runs.contains_key(&key) || self.ranks.holds(&key.0, key.1) {
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
                self.replay.forget_job(&c.job);
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
                    deterministic: false,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn report(job: &str, rank: u32, step: u64) -> pb::WorkerMessage {
        pb::WorkerMessage {
            msg: Some(pb::worker_message::Msg::StepReport(pb::StepReport {
                job: job.into(),
                rank,
                step,
                ..Default::default()
            })),
        }
    }

    fn held(job: &str, rank: u32, next_step: u64) -> pb::HeldRank {
        pb::HeldRank {
            job: job.into(),
            rank,
            device_index: rank,
            next_step,
        }
    }

    /// (job, rank, step) of the re-sent step reports.
    fn steps(msgs: &[pb::WorkerMessage]) -> Vec<(String, u32, u64)> {
        msgs.iter()
            .filter_map(|m| match &m.msg {
                Some(pb::worker_message::Msg::StepReport(r)) => {
                    Some((r.job.clone(), r.rank, r.step))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn replay_keeps_a_bounded_window_and_re_sends_from_next_step_in_step_order() {
        let mut r = Replay::default();
        for step in 0..REPORTS_KEPT as u64 + 10 {
            r.record(&report("a", 1, step));
            r.record(&report("a", 0, step));
        }
        r.record(&report("b", 0, 3));
        // The cap dropped the 10 oldest of each rank; a resume from step 5 re-sends what is kept.
        let again = steps(&r.resume(&[held("a", 0, 5), held("a", 1, 5)]));
        assert_eq!(again.len(), 2 * REPORTS_KEPT);
        assert_eq!(again[..2], [("a".into(), 0, 10), ("a".into(), 1, 10)]);
        assert!(
            again
                .windows(2)
                .all(|w| (w[0].2, w[0].1) < (w[1].2, w[1].1))
        );
        // Job b is not held any more: forgotten.
        assert!(r.reports.keys().all(|(j, _)| j == "a"));
        // The coordinator's bias after step 100 drops reports PRUNE_LAG steps older.
        r.bias_sent("a", 100);
        let again = steps(&r.resume(&[held("a", 0, 0)]));
        assert_eq!(again.first().map(|s| s.2), Some(100 - PRUNE_LAG + 1));
        // A rank's end and its last checkpoint parts come after its reports.
        r.record(&pb::WorkerMessage {
            msg: Some(pb::worker_message::Msg::RankFinished(pb::RankFinished {
                job: "a".into(),
                rank: 0,
                ok: true,
                reason: String::new(),
                deterministic: false,
            })),
        });
        let again = r.resume(&[held("a", 0, 260)]);
        assert!(matches!(
            again.last().and_then(|m| m.msg.as_ref()),
            Some(pb::worker_message::Msg::RankFinished(_))
        ));
        r.forget_job("a");
        assert!(r.resume(&[held("a", 0, 0)]).is_empty());
    }
}
