//! The compute side of a held rank: one OS thread per rank that builds the rank's model shard,
//! opens its data plane and walks the assigned op list every step (`executor::run_step`).
//!
//! The async daemon and a compute thread talk only through channels: the thread pushes
//! `StepReport`, `CheckpointWritten` and `RankFinished` messages into the daemon's outbox (an
//! unbounded channel the session drains, so a reconnect loses nothing queued), and the daemon
//! sends it `Control` messages (routing bias, committed checkpoints). Neither ever blocks the other.
//! A resumed assignment (`Assignment.resume`) is checked against its checkpoint part before the
//! worker answers READY; the thread loads the part, routes its first step with the saved ledger's
//! bias and trains from the step after the checkpoint's.
//!
//! Invariants: every wait inside the thread is bounded (data-plane receives and collectives by the
//! executor's timeouts; the bias wait by `bias_timeout`, counted again from each change of the
//! daemon's session — lost, registered again — so a coordinator restart shorter than
//! `bias_timeout` does not fail the rank, and by `BIAS_WAIT_CAP × bias_timeout` in all; a
//! data-plane peer lost during the wait ends it at once with the peer's reason); a bias
//! update for a step already received must be identical to the first (the coordinator re-sends
//! and recomputes after a resume or a restart), else the rank fails naming the difference;
//! stopping a rank sets its stop flag and
//! shuts its data plane down, so a thread blocked on a peer returns at once; a thread that ends
//! (finished, failed or stopped) gives its device's data-plane listener back, re-bound on the
//! same address, before it exits; a failed rank's end says whether the same inputs would fail
//! again (`RankError`, `RankFinished.deterministic`), which only the sites that know set.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use comm::{DataPlane, TcpBinding, TcpConfig, TcpDataPlane};
use executor::model_compute::{BiasMode, ModelCompute, ModelStepOutput, Placement};
use executor::{CostTable, OpTimings, SimulatedCompute, Timeouts, run_step};
use proto::pb;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{info, info_span, warn};

use crate::job;

/// A message from the daemon to a rank's compute thread.
#[derive(Debug)]
pub(crate) enum Control {
    /// The coordinator's routing bias computed after a step (issue 7).
    Bias(pb::BiasUpdate),
}

/// The data-plane listener of each device, shared by the daemon and the compute threads: a thread
/// takes its device's listener when the rank starts and puts a fresh one back when it ends.
#[derive(Clone, Debug, Default)]
pub(crate) struct Listeners {
    inner: Arc<Mutex<BTreeMap<u32, DeviceListener>>>,
}

#[derive(Debug)]
struct DeviceListener {
    /// Where it is bound (re-bound here after each rank).
    addr: SocketAddr,
    /// The listener, or why it could not be re-bound; `None` while a rank uses it.
    listener: Option<Result<TcpListener, String>>,
}

impl Listeners {
    /// Adds a bound listener for `device`.
    pub(crate) fn insert(&self, device: u32, listener: TcpListener) -> std::io::Result<()> {
        let addr = listener.local_addr()?;
        self.lock().insert(
            device,
            DeviceListener {
                addr,
                listener: Some(Ok(listener)),
            },
        );
        Ok(())
    }

    /// Takes `device`'s listener for a rank, waiting up to `wait` for a rank that is stopping on
    /// the same device to give it back; or says why there is none.
    fn take(&self, device: u32, wait: Duration) -> Result<TcpListener, String> {
        let deadline = Instant::now() + wait;
        loop {
            {
                let mut map = self.lock();
                let slot = map
                    .get_mut(&device)
                    .ok_or_else(|| format!("device {device} has no data-plane listener"))?;
                if let Some(r) = slot.listener.take() {
                    return r;
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "device {device}'s data-plane listener is still in use by an earlier rank after {wait:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Re-binds `device`'s listener on its address after a rank ended.
    fn give_back(&self, device: u32) {
        let mut map = self.lock();
        let Some(slot) = map.get_mut(&device) else {
            return;
        };
        let mut last = String::new();
        // The old socket is closed by now; a short retry covers the kernel releasing the port.
        for _ in 0..50 {
            match TcpListener::bind(slot.addr) {
                Ok(l) => {
                    slot.listener = Some(Ok(l));
                    return;
                }
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        warn!(device, addr = %slot.addr, error = %last, "could not re-bind the data-plane listener");
        slot.listener = Some(Err(format!(
            "re-binding the data-plane listener on {} failed: {last}",
            slot.addr
        )));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, DeviceListener>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Settings of the compute threads that come from the worker's configuration.
#[derive(Clone, Debug)]
pub(crate) struct ComputeSettings {
    /// Compute threads per rank.
    pub threads: usize,
    /// Longest wait of one data-plane receive.
    pub recv_timeout: Duration,
    /// Longest wait for the coordinator's bias before a step, counted again from each change of
    /// `link` (see the module docs).
    pub bias_timeout: Duration,
    /// The daemon's session state, which the bias wait follows.
    pub link: crate::session::SessionLink,
    /// How long the data plane keeps dialing a peer that is not up yet.
    pub connect_timeout: Duration,
}

/// A running rank: its thread and the handles to stop it.
pub(crate) struct RankRun {
    stop: Arc<AtomicBool>,
    plane: Arc<Mutex<Option<Arc<TcpDataPlane>>>>,
    control: Sender<Control>,
    thread: Option<JoinHandle<()>>,
}

impl RankRun {
    /// Hands a control message to the thread (ignored when it has ended).
    pub(crate) fn control(&self, msg: Control) {
        let _ = self.control.send(msg);
    }

    /// Asks the thread to stop: it will not report the rank as finished, and a wait on a peer
    /// returns at once. Shutting the data plane down may wait for its queued sends (the plane's
    /// linger), so call this from a blocking thread, never from the async runtime.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let plane = self.plane.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(p) = plane {
            p.shutdown();
        }
    }

    /// Whether the thread has ended.
    pub(crate) fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the thread and waits for it at most `limit`.
    pub(crate) fn stop_and_join(mut self, limit: Duration) {
        self.stop();
        let deadline = Instant::now() + limit;
        while !self.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(t) = self.thread.take() {
            if t.is_finished() {
                let _ = t.join();
            } else {
                warn!(?limit, "a compute thread did not stop in time; leaving it");
            }
        }
    }
}

/// Starts the compute thread of a prepared assignment on its device.
pub(crate) fn start(
    a: pb::Assignment,
    prepared: Prepared,
    settings: ComputeSettings,
    listeners: Listeners,
    outbox: UnboundedSender<pb::WorkerMessage>,
) -> std::io::Result<RankRun> {
    let stop = Arc::new(AtomicBool::new(false));
    let plane = Arc::new(Mutex::new(None));
    let (control, control_rx) = std::sync::mpsc::channel();
    let thread = {
        let stop = Arc::clone(&stop);
        let plane = Arc::clone(&plane);
        std::thread::Builder::new()
            .name(format!("rank-{}-{}", a.job, a.rank))
            .spawn(move || {
                let span = info_span!("compute", job = %a.job, rank = a.rank);
                let _g = span.enter();
                let device = a.device_index;
                let env = Env {
                    a: &a,
                    settings: &settings,
                    stop: &stop,
                    plane_slot: &plane,
                    control: &control_rx,
                    outbox: &outbox,
                };
                // A bug in the compute must not leave the rank silent: a panic becomes the
                // rank's failure reason (and its peers fail at once when the plane shuts down).
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    env.run(&listeners, prepared)
                }))
                .unwrap_or_else(|panic| {
                    let what = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                        .unwrap_or_else(|| "unknown panic".into());
                    Err(RankError::from(format!(
                        "the compute thread panicked: {what}"
                    )))
                });
                let taken = plane.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(p) = taken {
                    p.shutdown();
                }
                listeners.give_back(device);
                if stop.load(Ordering::SeqCst) {
                    info!("rank stopped by the coordinator");
                    return;
                }
                let (ok, reason, deterministic) = match result {
                    Ok(()) => (true, String::new(), false),
                    Err(e) => (false, e.reason, e.deterministic),
                };
                if ok {
                    info!("rank finished every step");
                } else {
                    warn!(%reason, "rank failed");
                }
                let _ = outbox.send(pb::WorkerMessage {
                    msg: Some(pb::worker_message::Msg::RankFinished(pb::RankFinished {
                        job: a.job.clone(),
                        rank: a.rank,
                        ok,
                        reason,
                        deterministic,
                    })),
                });
            })?
    };
    Ok(RankRun {
        stop,
        plane,
        control,
        thread: Some(thread),
    })
}

/// An assignment checked and turned into what the compute thread needs.
pub(crate) struct Prepared {
    opts: model::train::TrainOptions,
    schedule: plan::schedule::Schedule,
    ops: Vec<plan::schedule::Op>,
    place: Placement,
    /// The MoE layers this rank routes with (plan::layers), ascending.
    moe_layers: Vec<u32>,
    /// Whether the model has any MoE layer: only then does the coordinator keep a bias ledger and
    /// send a bias (possibly for no layer of this rank) after every step.
    balanced: bool,
    /// `Some` on a simulated device: the manifest's op costs, or `None` inside to measure them
    /// on the real model when the rank starts.
    simulated: Option<Option<CostTable>>,
    /// `spec.parallelism.overlap`: the two halves of an overlapped pair run on two threads, so one
    /// chunk's all-to-all and transfers proceed during the other's compute.
    overlap: bool,
}

/// Checks that the assignment can run here (manifest, schedule, op list) before the worker
/// answers READY; the error is the rejection reason.
pub(crate) fn prepare(
    a: &pb::Assignment,
    device: pb::DeviceKind,
    settings: &ComputeSettings,
) -> Result<Prepared, String> {
    let parsed = job::parse(&a.manifest_yaml, &format!("job {}", a.job), &a.overrides)
        .map_err(|e| format!("the assignment's manifest: {e}"))?;
    let over = job::Overrides {
        threads: Some(settings.threads),
        ..job::Overrides::default()
    };
    let opts = job::train_options(&parsed, Path::new(""), &over).map_err(|e| e.to_string())?;
    let kind = proto::convert::schedule_from_name(&a.schedule).map_err(|e| e.to_string())?;
    // `micro_batches` counts one pipeline replica's micro-batches per step (the manifest's
    // `microBatches`); the job trains `micro_batches × data` of them.
    let schedule = kind
        .generate(a.pipeline, a.micro_batches)
        .map_err(|e| format!("generating the {} schedule: {e}", a.schedule))?;
    let ops = a
        .ops
        .iter()
        .map(pb::Op::to_plan)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the assignment's op list: {e}"))?;
    let row = schedule
        .ops
        .get(a.pp_idx as usize)
        .ok_or_else(|| format!("pipeline rank {} outside the schedule", a.pp_idx))?;
    if &ops != row {
        return Err(format!(
            "the assigned op list of pipeline rank {} ({} ops) is not the {} schedule's row ({} ops)",
            a.pp_idx,
            ops.len(),
            a.schedule,
            row.len()
        ));
    }
    if a.expert == 0 || !a.data.is_multiple_of(a.expert) {
        return Err(format!(
            "expert parallelism {} does not divide data parallelism {}",
            a.expert, a.data
        ));
    }
    let place = Placement {
        pipeline: a.pipeline,
        data: a.data,
        expert: a.expert,
        pipe_rank: a.pp_idx,
        replica: a.dp_idx,
    };
    let m = &opts.model;
    let layout = plan::layers::LayerLayout {
        num_hidden_layers: m.num_hidden_layers as u32,
        first_k_dense_replace: m.first_k_dense_replace as u32,
        moe_layer_freq: m.moe_layer_freq as u32,
        mtp_depth: opts.mtp_depth as u32,
    };
    let moe_layers = layout.rank_moe_layers(schedule.stage_count(), &a.stages);
    let balanced = m.n_routed_experts > 0 && !layout.moe_layers().is_empty();
    let simulated = match device {
        pb::DeviceKind::Cpu => None,
        pb::DeviceKind::Simulated => Some(parsed.spec.resources.simulated_costs.as_ref().map(
            |c| CostTable {
                forward: c.forward,
                backward: c.backward,
                backward_input: c.backward_input,
                weight: c.weight,
                overlapped: c.overlapped,
            },
        )),
        other => {
            return Err(format!(
                "device {} is {}; this worker runs cpu and simulated devices only",
                a.device_index,
                other.name()
            ));
        }
    };
    if let Some(r) = &a.resume {
        check_resume(a, r, &place, kind, balanced, &moe_layers)?;
    }
    Ok(Prepared {
        opts,
        schedule,
        ops,
        place,
        moe_layers,
        balanced,
        simulated,
        overlap: parsed.spec.parallelism.overlap,
    })
}

/// What the compute thread works with.
struct Env<'a> {
    a: &'a pb::Assignment,
    settings: &'a ComputeSettings,
    stop: &'a AtomicBool,
    plane_slot: &'a Mutex<Option<Arc<TcpDataPlane>>>,
    control: &'a Receiver<Control>,
    outbox: &'a UnboundedSender<pb::WorkerMessage>,
}

impl Env<'_> {
    /// Builds the shard, opens the data plane and runs every step; the error is the reason sent
    /// to the coordinator.
    fn run(&self, listeners: &Listeners, prepared: Prepared) -> Result<(), RankError> {
        let a = self.a;
        let listener = listeners.take(a.device_index, self.settings.connect_timeout)?;
        let Prepared {
            opts,
            schedule,
            ops,
            place,
            moe_layers,
            balanced,
            simulated,
            overlap,
        } = prepared;
        if let Some(costs) = simulated {
            return self.run_simulated(
                listener,
                &opts,
                &schedule,
                &ops,
                place,
                &moe_layers,
                balanced,
                costs,
            );
        }
        let mut compute = ModelCompute::new(&opts, &schedule, place).map_err(|e| e.to_string())?;
        // The coordinator owns the routing bias (issue 7): each step starts with the bias it
        // computed after the previous one.
        if balanced {
            compute.set_bias_mode(BiasMode::External);
        }
        compute.set_concurrent_pairs(overlap);
        let first = first_step(a);
        if let Some(r) = &a.resume {
            let started = Instant::now();
            compute
                .load_rank_part(Path::new(&r.dir), a.rank, r.step + 1)
                .map_err(|e| RankError::deterministic(format!("resuming from {}: {e}", r.dir)))?;
            if balanced {
                let update = resume_bias(a, r, &moe_layers).map_err(RankError::deterministic)?;
                install_bias(&mut compute, &update, &moe_layers).map_err(|e| {
                    RankError::deterministic(format!(
                        "resuming from {}: the saved ledger's bias: {e}",
                        r.dir
                    ))
                })?;
            }
            info!(dir = %r.dir, step = r.step, seconds = started.elapsed().as_secs_f64(),
                "checkpoint part loaded; resuming");
        }
        let mut early: BTreeMap<u64, pb::BiasUpdate> = BTreeMap::new();
        let plane = self.open_plane(listener, &place)?;
        compute
            .set_expert_plane(plane.clone(), self.settings.recv_timeout)
            .map_err(|e| format!("attaching the expert-parallel plane: {e}"))?;
        let ctx = place.context();
        let timeouts = Timeouts {
            recv: self.settings.recv_timeout,
            collective: self.settings.recv_timeout * 2,
        };
        info!(
            steps = a.steps,
            ops = ops.len(),
            stages = ?a.stages,
            plane_rank = plane.rank(),
            "rank ready; training"
        );
        for step in first..a.steps {
            if self.stop.load(Ordering::SeqCst) {
                return Err("stopped".into());
            }
            let waited = Instant::now();
            if step > first && balanced {
                let update = self.wait_bias(step - 1, &mut early, &plane)?;
                install_bias(&mut compute, &update, &moe_layers)
                    .map_err(|e| format!("step {step}: the coordinator's bias: {e}"))?;
            }
            let bias_wait_seconds = waited.elapsed().as_secs_f64();
            let report =
                run_step(&ops, &ctx, &mut compute, &*plane, step, &timeouts).map_err(|e| {
                    RankError {
                        deterministic: e.is_deterministic(),
                        reason: format!("step {step}: {e}"),
                    }
                })?;
            let bias = compute.bias();
            let checksum = routing::rank_checksum(
                moe_layers
                    .iter()
                    .filter_map(|&l| bias.get(l as usize).map(|b| (l, b))),
            );
            // The rank's whole step: the wait for the bias plus the schedule and step end.
            let mut msg = step_report(
                a,
                &report.output,
                &report.timings,
                step,
                bias_wait_seconds + report.wall_s,
                &moe_layers,
            );
            if let Some(pb::worker_message::Msg::StepReport(r)) = &mut msg.msg {
                r.bias_step = step.saturating_sub(1);
                r.bias_checksum = checksum;
                r.bias_wait_seconds = bias_wait_seconds;
            }
            let _ = self.outbox.send(msg);
            if checkpoint_due(a, step) {
                self.save_part(&compute, step)?;
            }
        }
        Ok(())
    }

    /// The `simulated` device kind (a test mode, chosen only by a device registered as
    /// simulated): every compute op takes the time of the cost table on placeholder payloads of
    /// the real activation size, while the data plane, the schedule and the whole control-plane
    /// protocol run for real. Expert counts are reported as zeros for the layers the rank holds
    /// (so the coordinator's bias stays put) and the bias protocol is followed step by step.
    #[allow(clippy::too_many_arguments)]
    fn run_simulated(
        &self,
        listener: TcpListener,
        opts: &model::train::TrainOptions,
        schedule: &plan::schedule::Schedule,
        ops: &[plan::schedule::Op],
        place: Placement,
        moe_layers: &[u32],
        balanced: bool,
        costs: Option<CostTable>,
    ) -> Result<(), RankError> {
        let a = self.a;
        let costs = match costs {
            Some(c) => c,
            None => {
                let layers = plan::layers::stage_decoder_layers(
                    opts.model.num_hidden_layers as u32,
                    schedule.stage_count(),
                    0,
                );
                let layers = layers.start as usize..layers.end as usize;
                info!(
                    ?layers,
                    "measuring the simulated device's op costs on the real model"
                );
                executor::model_compute::measure_stage_costs(opts, layers, 3)
                    .map_err(|e| format!("measuring simulated op costs: {e}"))?
            }
        };
        let activation_bytes = opts.micro_batch_size
            * opts.seq_len
            * opts.model.hidden_size
            * std::mem::size_of::<f32>();
        let mut sim = SimulatedCompute::new(schedule, place.pipe_rank, costs, activation_bytes);
        let plane = self.open_plane(listener, &place)?;
        let ctx = place.context();
        let timeouts = Timeouts {
            recv: self.settings.recv_timeout,
            collective: self.settings.recv_timeout * 2,
        };
        let experts = opts.model.n_routed_experts;
        let mut bias: BTreeMap<u32, Vec<f32>> = moe_layers
            .iter()
            .map(|&l| (l, vec![0.0; experts]))
            .collect();
        let mut early = BTreeMap::new();
        let tokens = (opts.micro_batch_size * opts.seq_len * opts.micro_batches) as u64;
        let first = first_step(a);
        if let (Some(r), true) = (&a.resume, balanced) {
            for l in resume_bias(a, r, moe_layers)
                .map_err(RankError::deterministic)?
                .layers
            {
                if let Some(b) = bias.get_mut(&l.layer) {
                    *b = l.values;
                }
            }
        }
        info!(steps = a.steps, first, ?costs, "simulated rank ready");
        for step in first..a.steps {
            if self.stop.load(Ordering::SeqCst) {
                return Err("stopped".into());
            }
            let waited = Instant::now();
            if step > first && balanced {
                let update = self.wait_bias(step - 1, &mut early, &plane)?;
                for l in update.layers {
                    if let Some(b) = bias.get_mut(&l.layer) {
                        *b = l.values;
                    }
                }
            }
            let report = run_step(ops, &ctx, &mut sim, &*plane, step, &timeouts)
                .map_err(|e| format!("step {step}: {e}"))?;
            let msg = pb::StepReport {
                job: a.job.clone(),
                rank: a.rank,
                step,
                losses: Vec::new(),
                tokens,
                step_seconds: waited.elapsed().as_secs_f64(),
                timings: op_timings(&report.timings),
                expert_counts: moe_layers
                    .iter()
                    .map(|&layer| pb::ExpertCounts {
                        layer,
                        counts: vec![0; experts],
                    })
                    .collect(),
                bias_step: step.saturating_sub(1),
                bias_checksum: routing::rank_checksum(bias.iter().map(|(l, b)| (*l, b.as_slice()))),
                bias_wait_seconds: waited.elapsed().as_secs_f64(),
                grad_norm: 0.0,
                lr: f64::from(opts.lr.lr(step)),
            };
            let _ = self.outbox.send(pb::WorkerMessage {
                msg: Some(pb::worker_message::Msg::StepReport(msg)),
            });
        }
        Ok(())
    }

    /// Writes this rank's checkpoint part after `step` and reports its files.
    fn save_part(&self, compute: &ModelCompute, step: u64) -> Result<(), String> {
        let a = self.a;
        let step_dir = Path::new(&a.checkpoint_dir)
            .join(model::checkpoint::step_dir_name(compute.steps_done()));
        let started = Instant::now();
        crate::stale::clear_uncommitted_part(&step_dir, a.rank)
            .map_err(|e| format!("step {step}: checkpoint: {e}"))?;
        let files = compute
            .save_rank_part(&step_dir, a.rank)
            .map_err(|e| format!("step {step}: checkpoint: {e}"))?;
        info!(step, dir = %step_dir.display(), files = files.len(),
            seconds = started.elapsed().as_secs_f64(), "checkpoint part written");
        let _ = self.outbox.send(pb::WorkerMessage {
            msg: Some(pb::worker_message::Msg::CheckpointWritten(
                pb::CheckpointWritten {
                    job: a.job.clone(),
                    rank: a.rank,
                    step,
                    dir: step_dir.display().to_string(),
                    files: files
                        .into_iter()
                        .map(|f| pb::CheckpointFile {
                            path: f.path,
                            bytes: f.bytes,
                            sha256: f.sha256,
                        })
                        .collect(),
                },
            )),
        });
        Ok(())
    }

    /// Waits for the coordinator's bias computed after step `after`, watching the stop flag;
    /// bounded by `bias_timeout` from the latest of the wait's start and the last change of the
    /// session, and by [`BIAS_WAIT_CAP`] `× bias_timeout` in all. `kept` holds the updates
    /// received, by step: the last [`BIAS_KEPT`] installed ones (a re-sent update is checked
    /// against them) and those that arrived early. A data-plane peer lost meanwhile fails the
    /// wait at once, naming it: the next step could not run without it, and the coordinator
    /// would otherwise learn of the loss only from liveness.
    fn wait_bias(
        &self,
        after: u64,
        kept: &mut BTreeMap<u64, pb::BiasUpdate>,
        plane: &TcpDataPlane,
    ) -> Result<pb::BiasUpdate, RankError> {
        let limit = self.settings.bias_timeout;
        let started = Instant::now();
        let cap = started + limit * BIAS_WAIT_CAP;
        kept.retain(|s, _| *s + BIAS_KEPT >= after);
        loop {
            if let Some(u) = kept.get(&after) {
                return Ok(u.clone());
            }
            if self.stop.load(Ordering::SeqCst) {
                return Err("stopped".into());
            }
            if let Some((peer, why)) = plane.lost_peer() {
                return Err(format!(
                    "step {}: while waiting for the routing bias of step {after}, data-plane peer {peer} was lost: {why}",
                    after + 1
                )
                .into());
            }
            let (up, since) = self.settings.link.state();
            let deadline = (since.max(started) + limit).min(cap);
            let now = Instant::now();
            if now >= deadline {
                let why = if up {
                    format!("from the coordinator within {:?}", now - started)
                } else {
                    format!(
                        "after {:?}: the coordinator has been unreachable for {:?} (a restart may take at most {limit:?})",
                        now - started,
                        now.saturating_duration_since(since)
                    )
                };
                return Err(
                    format!("step {}: no routing bias for step {after} {why}", after + 1).into(),
                );
            }
            match self
                .control
                .recv_timeout((deadline - now).min(Duration::from_millis(100)))
            {
                // A bias that contradicts the one received first would contradict it again.
                Ok(Control::Bias(b)) => file_bias(kept, b)
                    .map_err(|e| RankError::deterministic(format!("step {}: {e}", after + 1)))?,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err("the daemon went away while waiting for the routing bias".into());
                }
            }
        }
    }

    /// Starts the TCP data plane of this rank; data-plane rank `place.plane_rank(dp, pp)` is
    /// job rank `pp · D + dp` (plan's numbering).
    fn open_plane(
        &self,
        listener: TcpListener,
        place: &Placement,
    ) -> Result<Arc<TcpDataPlane>, String> {
        let a = self.a;
        let world = a.world_size as usize;
        let mut peers = vec![None; world];
        for p in &a.peers {
            let (pp, dp) = (p.rank / a.data, p.rank % a.data);
            let q = place.plane_rank(dp, pp);
            let addr = resolve(&p.data_plane_addr)
                .map_err(|e| format!("peer rank {}'s data-plane address: {e}", p.rank))?;
            if let Some(slot) = peers.get_mut(q) {
                *slot = Some(addr);
            }
        }
        let peers = peers
            .into_iter()
            .enumerate()
            .map(|(q, a)| a.ok_or_else(|| format!("no peer for data-plane rank {q}")))
            .collect::<Result<Vec<_>, _>>()?;
        let me = place.plane_rank(place.replica, place.pipe_rank);
        let config = TcpConfig {
            session: session_id(&a.job, &peers),
            connect_timeout: self.settings.connect_timeout,
            ..TcpConfig::default()
        };
        let plane = TcpBinding::from_listener(listener, config)
            .and_then(|b| b.start(me, peers))
            .map_err(|e| format!("starting the data plane: {e}"))?;
        let plane = Arc::new(plane);
        *self.plane_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&plane));
        // A stop that raced with the start still shuts the new plane down.
        if self.stop.load(Ordering::SeqCst) {
            plane.shutdown();
        }
        Ok(plane)
    }
}

/// The first step a rank of `a` runs: 0, or the step after the checkpoint it resumes from.
fn first_step(a: &pb::Assignment) -> u64 {
    a.resume.as_ref().map_or(0, |r| r.step + 1)
}

/// Checks a resumed assignment before the worker accepts it (cheap: no tensor is read): the
/// step is inside the job, the checkpoint holds this rank's part written with this parallel
/// layout, and a job with MoE layers carries the ledger's bias for every layer this rank routes
/// with. The error is the rejection reason.
fn check_resume(
    a: &pb::Assignment,
    r: &pb::ResumePoint,
    place: &Placement,
    kind: plan::schedule::ScheduleKind,
    balanced: bool,
    moe_layers: &[u32],
) -> Result<(), String> {
    if r.step + 1 >= a.steps {
        return Err(format!(
            "resuming after step {} of {}: no step is left to train (steps are numbered from 0)",
            r.step, a.steps
        ));
    }
    executor::model_compute::check_rank_part(
        Path::new(&r.dir),
        a.rank,
        r.step + 1,
        place,
        kind,
        &a.stages,
    )
    .map_err(|e| format!("resuming from {}: {e}", r.dir))?;
    if balanced {
        resume_bias(a, r, moe_layers)?;
    }
    Ok(())
}

/// Why a rank failed (`RankFinished.reason`), and whether the same inputs would fail the same
/// way again (`RankFinished.deterministic`: the coordinator then does not restart the job).
/// Failures converted from plain messages are not deterministic; the sites that know better say
/// so with [`RankError::deterministic`].
#[derive(Debug)]
pub(crate) struct RankError {
    reason: String,
    deterministic: bool,
}

impl RankError {
    /// A failure a restart cannot fix.
    fn deterministic(reason: String) -> Self {
        Self {
            reason,
            deterministic: true,
        }
    }
}

impl From<String> for RankError {
    fn from(reason: String) -> Self {
        Self {
            reason,
            deterministic: false,
        }
    }
}

impl From<&str> for RankError {
    fn from(reason: &str) -> Self {
        reason.to_owned().into()
    }
}

/// The bias a resumed MoE rank routes its first step with: the saved ledger's, computed after
/// the checkpoint's step, for the layers this rank routes with.
fn resume_bias(
    a: &pb::Assignment,
    r: &pb::ResumePoint,
    moe_layers: &[u32],
) -> Result<pb::BiasUpdate, String> {
    let ledger = r.ledger.as_ref().ok_or_else(|| {
        format!(
            "resuming from {}: the job has MoE layers but the resume point carries no routing-bias ledger",
            r.dir
        )
    })?;
    if ledger.after_step != r.step {
        return Err(format!(
            "resuming from {} after step {}: the ledger was saved after step {}",
            r.dir, r.step, ledger.after_step
        ));
    }
    let layers: Vec<pb::LayerBias> = ledger
        .layers
        .iter()
        .filter(|l| moe_layers.contains(&l.layer))
        .cloned()
        .collect();
    let got: Vec<u32> = layers.iter().map(|l| l.layer).collect();
    if got != moe_layers {
        return Err(format!(
            "resuming from {}: the saved ledger covers layers {got:?} of this rank's {moe_layers:?}",
            r.dir
        ));
    }
    Ok(pb::BiasUpdate {
        job: a.job.clone(),
        step: r.step,
        layers,
    })
}

/// Installed bias updates a rank keeps, by step, to check a re-sent one against.
const BIAS_KEPT: u64 = 8;
/// The bias wait never exceeds this many `bias_timeout`s, however often the session changes.
const BIAS_WAIT_CAP: u32 = 4;

/// Files a received bias update in `kept`: a new step's is kept; one for a step already received
/// must be bit-identical to the first (the coordinator re-sends the latest after a resumed
/// registration, and recomputes the same after a restart), else the error names the first
/// difference.
fn file_bias(kept: &mut BTreeMap<u64, pb::BiasUpdate>, b: pb::BiasUpdate) -> Result<(), String> {
    let Some(have) = kept.get(&b.step) else {
        kept.insert(b.step, b);
        return Ok(());
    };
    match bias_difference(have, &b) {
        None => {
            info!(
                step = b.step,
                "the coordinator re-sent an identical routing bias"
            );
            Ok(())
        }
        Some(diff) => Err(format!(
            "the coordinator sent the routing bias after step {} again, and it differs from the one received first: {diff}",
            b.step
        )),
    }
}

/// The first difference between two bias updates of one step (layer ids, then values by their
/// bits), or `None` when they are identical.
fn bias_difference(a: &pb::BiasUpdate, b: &pb::BiasUpdate) -> Option<String> {
    let ids = |u: &pb::BiasUpdate| u.layers.iter().map(|l| l.layer).collect::<Vec<u32>>();
    if ids(a) != ids(b) {
        return Some(format!("layers {:?}, first {:?}", ids(b), ids(a)));
    }
    for (x, y) in a.layers.iter().zip(&b.layers) {
        if x.values.len() != y.values.len() {
            return Some(format!(
                "layer {}: {} values, first {}",
                x.layer,
                y.values.len(),
                x.values.len()
            ));
        }
        if let Some((e, (p, q))) = x
            .values
            .iter()
            .zip(&y.values)
            .enumerate()
            .find(|(_, (p, q))| p.to_bits() != q.to_bits())
        {
            return Some(format!("layer {} expert {e}: {q}, first {p}", x.layer));
        }
    }
    None
}

/// Whether a checkpoint is written after `step` (numbered from 0): every `checkpoint_interval`
/// steps and after the last one, when the job has a checkpoint directory.
fn checkpoint_due(a: &pb::Assignment, step: u64) -> bool {
    if a.checkpoint_dir.is_empty() {
        return false;
    }
    let done = step + 1;
    done == a.steps || (a.checkpoint_interval > 0 && done.is_multiple_of(a.checkpoint_interval))
}

/// Writes `checkpoint.json` into a committed step directory: every rank's files with their
/// SHA-256, as the coordinator recorded them. Written atomically (temporary file, rename).
pub(crate) fn write_index(c: &pb::CheckpointCommitted) -> std::io::Result<()> {
    let ranks: Vec<serde_json::Value> = c
        .ranks
        .iter()
        .map(|r| {
            serde_json::json!({
                "rank": r.rank,
                "files": r.files.iter().map(|f| serde_json::json!({
                    "path": f.path, "bytes": f.bytes, "sha256": f.sha256,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut doc = serde_json::json!({
        "format": "moetrain-distributed-checkpoint-v1",
        "job": c.job,
        "step": c.step,
        "steps_done": c.step + 1,
        "world_size": c.ranks.len(),
        "ranks": ranks,
    });
    // The coordinator's routing-bias ledger after the step: with it the checkpoint holds
    // everything a resumed job needs (`moetrain submit/local --resume`).
    if let Some(l) = &c.ledger {
        doc["ledger"] = serde_json::json!({
            "after_step": l.after_step,
            "tokens_seen": l.tokens_seen,
            "layers": l.layers.iter().map(|b| serde_json::json!({
                "layer": b.layer, "values": b.values,
            })).collect::<Vec<_>>(),
        });
    }
    let dir = Path::new(&c.dir);
    let tmp = dir.join(".checkpoint.json.tmp");
    let text = serde_json::to_string_pretty(&doc).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join("checkpoint.json"))
}

/// Installs the coordinator's bias for the layers this rank routes with; every one of them must
/// be in the update, with one value per routed expert, and nothing else.
fn install_bias(
    compute: &mut ModelCompute,
    update: &pb::BiasUpdate,
    moe_layers: &[u32],
) -> Result<(), String> {
    let mut full = compute.bias().clone();
    let mut got: Vec<u32> = update.layers.iter().map(|l| l.layer).collect();
    got.sort_unstable();
    if got != moe_layers {
        return Err(format!(
            "update for step {} covers layers {got:?}, this rank routes with {moe_layers:?}",
            update.step
        ));
    }
    for l in &update.layers {
        let slot = full
            .get_mut(l.layer as usize)
            .ok_or_else(|| format!("layer {} has no routing bias in this model", l.layer))?;
        if slot.len() != l.values.len() {
            return Err(format!(
                "layer {}: {} values for {} routed experts",
                l.layer,
                l.values.len(),
                slot.len()
            ));
        }
        slot.copy_from_slice(&l.values);
    }
    compute
        .set_bias(update.step, full)
        .map_err(|e| e.to_string())
}

/// Resolves `host:port` to one socket address.
fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("`{addr}`: {e}"))?
        .next()
        .ok_or_else(|| format!("`{addr}` resolves to no address"))
}

/// The data-plane session id of a job: FNV-1a of the job name and every peer address, so a stale
/// process of another job (or an earlier placement) cannot talk into this one.
fn session_id(job: &str, peers: &[SocketAddr]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(job.as_bytes());
    for p in peers {
        eat(p.to_string().as_bytes());
    }
    h
}

/// Per-op-kind wall times of a step, as reported.
fn op_timings(t: &OpTimings) -> Vec<pb::OpTiming> {
    let timing = |kind: pb::OpKind, o: &executor::OpTime| pb::OpTiming {
        kind: kind as i32,
        count: o.count,
        seconds: o.seconds,
    };
    vec![
        timing(pb::OpKind::Forward, &t.forward),
        timing(pb::OpKind::Backward, &t.backward),
        timing(pb::OpKind::BackwardInput, &t.backward_input),
        timing(pb::OpKind::BackwardWeight, &t.weight),
        timing(pb::OpKind::ForwardBackward, &t.overlapped),
        timing(pb::OpKind::Send, &t.send),
        timing(pb::OpKind::Recv, &t.recv),
    ]
}

/// The wire report of one finished step.
fn step_report(
    a: &pb::Assignment,
    out: &ModelStepOutput,
    t: &OpTimings,
    step: u64,
    wall_s: f64,
    moe_layers: &[u32],
) -> pb::WorkerMessage {
    let loss = |name: &str, value: f64| pb::LossTerm {
        name: name.into(),
        value,
    };
    pb::WorkerMessage {
        msg: Some(pb::worker_message::Msg::StepReport(pb::StepReport {
            job: a.job.clone(),
            rank: a.rank,
            step,
            losses: vec![
                loss("main", out.loss.main),
                loss("mtp", out.loss.mtp),
                loss("balance", out.loss.balance),
                loss("total", out.loss.total),
            ],
            tokens: out.tokens,
            step_seconds: wall_s,
            timings: op_timings(t),
            // Only the layers this rank routes with (the model keeps zero counters for the rest).
            expert_counts: out
                .local_expert_load
                .iter()
                .filter(|(layer, _)| moe_layers.contains(&(*layer as u32)))
                .map(|(layer, counts)| pb::ExpertCounts {
                    layer: *layer as u32,
                    counts: counts.clone(),
                })
                .collect(),
            bias_step: 0,
            bias_checksum: 0,
            bias_wait_seconds: 0.0,
            grad_norm: out.grad_norm,
            lr: f64::from(out.lr),
        })),
    }
}
