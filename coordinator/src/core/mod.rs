//! The coordinator's sans-IO state machine: `Core::handle(event, now) -> Result<Vec<Action>>`.
//!
//! The core owns the cluster state (jobs, workers, assignments, events) and decides everything:
//! job lifecycle, gang scheduling (`scheduler::schedule`), liveness (`liveness::liveness`). It
//! never reads the clock, touches the network or the store: `now` comes in as Unix milliseconds,
//! and what must happen outside (messages to workers, store writes) goes out as `Action`s, which
//! the server applies in the order given.
//!
//! Invariants:
//! - A job's phase only moves along Pending → Scheduled → Running → Succeeded | Failed | Cancelled
//!   (Recovering is reserved), or from Scheduled | Running back to Pending when the job restarts
//!   after a failure (`recovery`); every move appends a transition with its time and reason.
//! - A device holds at most one rank; a lost worker holds nothing; a terminal job holds nothing.
//! - Every state change that must survive a restart is followed by a `Put*` action for the record
//!   it changed, emitted at the end of the same `handle` call.

pub mod liveness;
pub mod recovery;
#[cfg(test)]
mod recovery_tests;
#[cfg(test)]
mod resume_tests;
pub mod scheduler;
#[cfg(test)]
mod tests;
pub mod training;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proto::pb;

use crate::Config;
use crate::store::Snapshot;

pub use liveness::{LivenessVerdict, Verdict, liveness, newly_lost};
pub use scheduler::{Decision, ScheduleDecision, schedule};
pub use training::{JobRuntime, STEP_HISTORY};

/// Wall-clock time in Unix milliseconds, passed in by the caller.
pub type UnixMs = u64;

/// Requests the core refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// A job with this name exists already.
    #[error("job `{0}` already exists")]
    JobExists(String),
    /// No job has this name.
    #[error("job `{0}` not found")]
    UnknownJob(String),
    /// The job already ended, so it cannot be cancelled.
    #[error("job `{job}` already ended ({phase})")]
    JobEnded {
        /// The job's name.
        job: String,
        /// Its terminal phase.
        phase: &'static str,
    },
    /// No worker has registered with this id.
    #[error("worker `{0}` is not registered")]
    UnknownWorker(String),
    /// A job spec or registration is malformed.
    #[error("{0}")]
    Invalid(String),
    /// A worker acknowledged or reported a rank it does not hold.
    #[error("worker `{worker}` does not hold rank {rank} of job `{job}`")]
    NotHeld {
        /// The worker that sent the message.
        worker: String,
        /// The job named in the message.
        job: String,
        /// The rank named in the message.
        rank: u32,
    },
}

/// A worker's registration as sent in `Register`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// Stable id across reconnects.
    pub worker_id: String,
    /// Node (host) name.
    pub node: String,
    /// Devices offered.
    pub devices: Vec<pb::Device>,
    /// Where peers reach its data plane.
    pub data_plane_addr: String,
}

/// A validated job, ready to be stored and scheduled.
#[derive(Clone, Debug, PartialEq)]
pub struct Submission {
    /// What the scheduler needs.
    pub spec: pb::JobSpec,
    /// The manifest text as submitted.
    pub manifest_yaml: String,
    /// `--set` overrides as submitted.
    pub overrides: Vec<String>,
    /// Where the manifest came from.
    pub origin: String,
}

/// Everything that can happen to the coordinator (heartbeats take `Core::heartbeat` instead, to
/// stay cheap).
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A client submitted a validated job.
    Submit(Box<Submission>),
    /// A client cancelled a job.
    Cancel {
        /// The job's name.
        job: String,
        /// Why (free text from the client).
        reason: String,
    },
    /// A worker opened a session and registered; `session` tells its sessions apart.
    Register {
        /// The registration message.
        reg: Registration,
        /// A number unique to this session.
        session: u64,
    },
    /// A worker's session stream ended.
    Disconnected {
        /// The worker.
        worker: String,
        /// The session that ended (a newer session of the same worker is not affected).
        session: u64,
    },
    /// A worker answered an assignment.
    Ack {
        /// The worker.
        worker: String,
        /// The job.
        job: String,
        /// The rank.
        rank: u32,
        /// READY (true) or REJECTED (false).
        ready: bool,
        /// Why it was rejected.
        reason: String,
    },
    /// A worker's rank ended.
    RankFinished {
        /// The worker.
        worker: String,
        /// The job.
        job: String,
        /// The rank.
        rank: u32,
        /// Whether it completed every step.
        ok: bool,
        /// Why it failed.
        reason: String,
        /// The worker marked the failure deterministic (a restart cannot fix it).
        deterministic: bool,
    },
    /// A worker reported a training step.
    StepReport {
        /// The worker.
        worker: String,
        /// The report.
        report: Box<pb::StepReport>,
    },
    /// A worker wrote one rank's part of a checkpoint.
    CheckpointWritten {
        /// The worker.
        worker: String,
        /// What it wrote.
        written: Box<pb::CheckpointWritten>,
    },
    /// Time passed: run liveness (only here) and the scheduler.
    Tick,
}

/// What the server must do for the core, in order.
// A message to a worker is the largest variant (an `Assignment` with its op list inline); actions
// live only from one `handle` call to the server applying them, so boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send a message on a worker's session (dropped if it has none).
    Send {
        /// The worker.
        worker: String,
        /// The message.
        msg: pb::CoordinatorMessage,
    },
    /// Store a job record.
    PutJob(Box<pb::StoredJob>),
    /// Store a worker record.
    PutWorker(pb::StoredWorker),
    /// Store the assignment of one rank.
    PutAssignment(Box<pb::Assignment>),
    /// Remove every stored assignment of a job.
    DeleteAssignments {
        /// The job.
        job: String,
    },
    /// Append to a job's event log.
    AppendEvent {
        /// The job.
        job: String,
        /// The event.
        event: pb::JobEvent,
    },
    /// Mark a worker's session as present (or not) in the store.
    Presence {
        /// The worker.
        worker: String,
        /// Whether a session is open.
        present: bool,
    },
}

/// One job: its stored record plus its event log.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct JobEntry {
    /// The record as stored.
    pub stored: pb::StoredJob,
    /// Its events, oldest first.
    pub events: Vec<pb::JobEvent>,
}

impl JobEntry {
    /// The job's phase.
    pub fn phase(&self) -> pb::JobPhase {
        pb::JobPhase::try_from(self.stored.phase).unwrap_or(pb::JobPhase::Unspecified)
    }

    /// The job's spec (a default one if the record lacks it).
    pub fn spec(&self) -> pb::JobSpec {
        self.stored.spec.clone().unwrap_or_default()
    }

    /// Ranks in the job.
    pub fn world_size(&self) -> u32 {
        let spec = self.stored.spec.as_ref();
        spec.map(|s| s.pipeline * s.data).unwrap_or(0)
    }

    /// The failure timeout the job's manifest asks for, if any.
    pub fn failure_timeout(&self) -> Option<Duration> {
        let ms = self
            .stored
            .spec
            .as_ref()
            .map(|s| s.failure_timeout_ms)
            .unwrap_or(0);
        (ms > 0).then(|| Duration::from_millis(ms))
    }
}

/// One worker: its stored registration plus what only lives in memory.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct WorkerEntry {
    /// The registration as stored.
    pub stored: pb::StoredWorker,
    /// Time of the last message on its session (or of the restore, after a restart).
    pub last_seen: UnixMs,
    /// Whether a session stream is open.
    pub connected: bool,
    /// The number of the current (or last) session.
    pub session: u64,
}

/// The whole cluster state the core decides on. Fields are public so tests can build any state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct State {
    /// Jobs by name.
    pub jobs: BTreeMap<String, JobEntry>,
    /// Workers by id.
    pub workers: BTreeMap<String, WorkerEntry>,
    /// The assignment message of every held rank, by (job, rank).
    pub assignments: BTreeMap<(String, u32), pb::Assignment>,
    /// Sequence number of the next submitted job.
    pub next_job_seq: u64,
}

/// The state machine. See the module docs.
#[derive(Debug)]
pub struct Core {
    /// The state; public for inspection (tests, describe).
    pub state: State,
    /// What only lives in memory while jobs train: step history, bias ledgers, pending
    /// checkpoints (see `training`).
    pub runtime: BTreeMap<String, JobRuntime>,
    config: Config,
    dirty_jobs: BTreeSet<String>,
    dirty_workers: BTreeSet<String>,
}

impl Core {
    /// An empty core.
    pub fn new(config: Config) -> Self {
        Self::with_state(config, State::default())
    }

    /// A core over a hand-built (or restored) state.
    pub fn with_state(config: Config, state: State) -> Self {
        let runtime = state
            .jobs
            .iter()
            .filter(|(_, j)| j.phase() == pb::JobPhase::Running)
            .map(|(name, j)| {
                let finished = j.stored.progress.as_ref().map_or(0, |p| p.step);
                let ledger = training::restore_ledger(&j.stored);
                if let Err(why) = &ledger {
                    tracing::error!(job = %name, %why, "routing-bias ledger not restored");
                }
                (name.clone(), JobRuntime::restored(finished, ledger))
            })
            .collect();
        Self {
            state,
            runtime,
            config,
            dirty_jobs: BTreeSet::new(),
            dirty_workers: BTreeSet::new(),
        }
    }

    /// Rebuilds the state from a store snapshot after a restart. Workers count as last seen at
    /// `now` and disconnected, so each gets one failure timeout to reconnect before it is lost.
    pub fn restore(config: Config, snapshot: Snapshot, now: UnixMs) -> Self {
        let mut state = State::default();
        let mut events = snapshot.events;
        for stored in snapshot.jobs {
            state.next_job_seq = state.next_job_seq.max(stored.seq + 1);
            let name = stored
                .spec
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or_default();
            let mut job_events = events.remove(&name).unwrap_or_default();
            job_events.sort_by_key(|e| e.seq);
            state.jobs.insert(
                name,
                JobEntry {
                    stored,
                    events: job_events,
                },
            );
        }
        for stored in snapshot.workers {
            state.workers.insert(
                stored.worker_id.clone(),
                WorkerEntry {
                    stored,
                    last_seen: now,
                    connected: false,
                    session: 0,
                },
            );
        }
        for a in snapshot.assignments {
            state.assignments.insert((a.job.clone(), a.rank), a);
        }
        Self::with_state(config, state)
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Records a heartbeat: the cheap path, a map lookup and a store of `now`. Returns actions
    /// only when a lost worker comes back on the same session.
    pub fn heartbeat(&mut self, worker: &str, now: UnixMs) -> Result<Vec<Action>, CoreError> {
        let entry = self
            .state
            .workers
            .get_mut(worker)
            .ok_or_else(|| CoreError::UnknownWorker(worker.to_owned()))?;
        entry.last_seen = now;
        if !entry.stored.lost {
            return Ok(Vec::new());
        }
        entry.stored.lost = false;
        entry.stored.reason = "heartbeating again after being lost".into();
        self.dirty_workers.insert(worker.to_owned());
        let mut actions = Vec::new();
        self.flush(&mut actions);
        Ok(actions)
    }

    /// Applies one event at time `now` and returns what must happen outside, in order.
    pub fn handle(&mut self, event: Event, now: UnixMs) -> Result<Vec<Action>, CoreError> {
        let mut actions = Vec::new();
        let is_tick = event == Event::Tick;
        let res = match event {
            Event::Submit(sub) => self.submit(*sub, now, &mut actions),
            Event::Cancel { job, reason } => self.cancel(&job, reason, now, &mut actions),
            Event::Register { reg, session } => self.register(reg, session, now, &mut actions),
            Event::Disconnected { worker, session } => {
                self.disconnected(&worker, session, &mut actions);
                Ok(())
            }
            Event::Ack {
                worker,
                job,
                rank,
                ready,
                reason,
            } => self.ack(&worker, &job, rank, ready, reason, now, &mut actions),
            Event::RankFinished {
                worker,
                job,
                rank,
                ok,
                reason,
                deterministic,
            } => self.rank_finished(
                &worker,
                &job,
                rank,
                (ok, reason, deterministic),
                now,
                &mut actions,
            ),
            Event::StepReport { worker, report } => {
                self.step_report(&worker, *report, now, &mut actions)
            }
            Event::CheckpointWritten { worker, written } => {
                self.checkpoint_written(&worker, *written, now, &mut actions)
            }
            Event::Tick => Ok(()),
        };
        if res.is_ok() {
            // Liveness only changes with time; any event may free or add devices, so the
            // scheduler decides right away (it returns at once when nothing is pending).
            if is_tick {
                self.run_liveness(now, &mut actions);
            }
            self.run_scheduler(now, &mut actions);
        }
        self.flush(&mut actions);
        res.map(|()| actions)
    }

    fn flush(&mut self, actions: &mut Vec<Action>) {
        for name in std::mem::take(&mut self.dirty_workers) {
            if let Some(w) = self.state.workers.get(&name) {
                actions.push(Action::PutWorker(w.stored.clone()));
            }
        }
        for name in std::mem::take(&mut self.dirty_jobs) {
            if let Some(j) = self.state.jobs.get(&name) {
                actions.push(Action::PutJob(Box::new(j.stored.clone())));
            }
        }
    }

    fn submit(
        &mut self,
        sub: Submission,
        now: UnixMs,
        actions: &mut Vec<Action>,
    ) -> Result<(), CoreError> {
        let name = sub.spec.name.clone();
        if name.is_empty() {
            return Err(CoreError::Invalid(
                "job name (metadata.name) is empty".into(),
            ));
        }
        if self.state.jobs.contains_key(&name) {
            return Err(CoreError::JobExists(name));
        }
        scheduler::request_of(&sub.spec).map_err(CoreError::Invalid)?;
        if let Some(r) = &sub.spec.resume {
            training::check_resume(&sub.spec, r).map_err(CoreError::Invalid)?;
        }
        // A resumed job's progress starts after its checkpoint's step.
        let progress = sub.spec.resume.as_ref().map(|r| pb::JobProgress {
            step: r.step + 1,
            tokens: r.ledger.as_ref().map_or_else(
                || (r.step + 1) * sub.spec.balance.as_ref().map_or(0, |b| b.tokens_per_step),
                |l| l.tokens_seen,
            ),
            updated_unix_ms: now,
            ..Default::default()
        });
        let resume_text = sub
            .spec
            .resume
            .as_ref()
            .map(|r| format!("after step {} from {}", r.step, r.dir));
        let seq = self.state.next_job_seq;
        self.state.next_job_seq += 1;
        let stored = pb::StoredJob {
            seq,
            spec: Some(sub.spec),
            manifest_yaml: sub.manifest_yaml,
            overrides: sub.overrides,
            origin: sub.origin,
            phase: pb::JobPhase::Pending as i32,
            transitions: vec![pb::JobTransition {
                from: pb::JobPhase::Unspecified as i32,
                to: pb::JobPhase::Pending as i32,
                unix_ms: now,
                reason: "submitted".into(),
            }],
            created_unix_ms: now,
            updated_unix_ms: now,
            progress,
            ..Default::default()
        };
        self.state.jobs.insert(
            name.clone(),
            JobEntry {
                stored,
                ..Default::default()
            },
        );
        self.dirty_jobs.insert(name.clone());
        let text = match &resume_text {
            Some(r) => format!("job submitted, resuming {r}, waiting for devices"),
            None => "job submitted, waiting for devices".into(),
        };
        self.event(&name, now, "Submitted", text, "", actions);
        Ok(())
    }

    fn cancel(
        &mut self,
        job: &str,
        reason: String,
        now: UnixMs,
        actions: &mut Vec<Action>,
    ) -> Result<(), CoreError> {
        let entry = self
            .state
            .jobs
            .get(job)
            .ok_or_else(|| CoreError::UnknownJob(job.to_owned()))?;
        let phase = entry.phase();
        if phase.is_terminal() {
            return Err(CoreError::JobEnded {
                job: job.to_owned(),
                phase: phase.name(),
            });
        }
        let reason = if reason.is_empty() {
            "cancelled by user".to_owned()
        } else {
            reason
        };
        self.end_job(
            job,
            pb::JobPhase::Cancelled,
            reason,
            pb::CommandKind::Cancel,
            now,
            actions,
        );
        Ok(())
    }

    fn register(
        &mut self,
        reg: Registration,
        session: u64,
        now: UnixMs,
        actions: &mut Vec<Action>,
    ) -> Result<(), CoreError> {
        if reg.worker_id.is_empty() {
            return Err(CoreError::Invalid("register: worker_id is empty".into()));
        }
        if reg.node.is_empty() {
            return Err(CoreError::Invalid(format!(
                "register {}: node is empty",
                reg.worker_id
            )));
        }
        let mut seen = BTreeSet::new();
        for d in &reg.devices {
            pb::DeviceKind::from_wire("devices.kind", d.kind)
                .map_err(|e| CoreError::Invalid(format!("register {}: {e}", reg.worker_id)))?;
            if !seen.insert(d.index) {
                return Err(CoreError::Invalid(format!(
                    "register {}: device index {} listed twice",
                    reg.worker_id, d.index
                )));
            }
        }
        let id = reg.worker_id.clone();
        let resumed = self.state.workers.contains_key(&id);
        let entry = self.state.workers.entry(id.clone()).or_default();
        let was_lost = entry.stored.lost;
        entry.stored.worker_id = id.clone();
        entry.stored.node = reg.node;
        entry.stored.devices = reg.devices;
        entry.stored.data_plane_addr = reg.data_plane_addr;
        if !resumed {
            entry.stored.registered_unix_ms = now;
        }
        entry.stored.lost = false;
        entry.stored.reason = if resumed {
            "resumed registration".into()
        } else {
            "registered".into()
        };
        entry.last_seen = now;
        entry.connected = true;
        entry.session = session;
        let held = entry.stored.held.clone();
        self.dirty_workers.insert(id.clone());
        // A running MoE job whose bias ledger could not be rebuilt after a coordinator restart
        // ends now, when its first holder is back, and this worker is told it holds none of its
        // ranks.
        let lost: Vec<(String, String)> = held
            .iter()
            .map(|h| h.job.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter_map(|job| {
                let why = self.runtime.get(&job)?.ledger_lost()?.to_owned();
                let running = self
                    .state
                    .jobs
                    .get(&job)
                    .is_some_and(|j| j.phase() == pb::JobPhase::Running);
                running.then_some((job, why))
            })
            .collect();
        // Each held rank carries the job's first unfinished step: the worker re-sends its reports
        // from there (the coordinator may have restarted and lost the reports of later steps).
        let held: Vec<pb::HeldRank> = held
            .into_iter()
            .filter(|h| !lost.iter().any(|(j, _)| *j == h.job))
            .map(|h| pb::HeldRank {
                next_step: self.runtime.get(&h.job).map_or(0, |rt| rt.finished),
                ..h
            })
            .collect();
        actions.push(Action::Presence {
            worker: id.clone(),
            present: true,
        });
        actions.push(Action::Send {
            worker: id.clone(),
            msg: msg(pb::coordinator_message::Msg::Registered(pb::Registered {
                worker_id: id.clone(),
                resumed,
                heartbeat_interval_ms: proto::convert::duration_to_ms(
                    self.config.heartbeat_interval,
                ),
                failure_timeout_ms: proto::convert::duration_to_ms(self.config.failure_timeout),
                held: held.clone(),
            })),
        });
        for (job, why) in lost {
            self.end_job(
                &job,
                pb::JobPhase::Failed,
                why,
                pb::CommandKind::Stop,
                now,
                actions,
            );
        }
        // Re-send what it still holds: the worker may have restarted, or the coordinator may have.
        for h in &held {
            if let Some(a) = self.state.assignments.get(&(h.job.clone(), h.rank)) {
                actions.push(Action::Send {
                    worker: id.clone(),
                    msg: msg(pb::coordinator_message::Msg::Assignment(a.clone())),
                });
            }
        }
        // And the latest bias of each running MoE job it holds ranks of: an update sent while it
        // was away (or lost with a coordinator that restarted) is what its ranks wait for.
        let mut layers: BTreeMap<&str, BTreeSet<u32>> = BTreeMap::new();
        for h in &held {
            if let Some(ledger) = self.runtime.get(&h.job).and_then(|rt| rt.ledger.as_ref()) {
                layers
                    .entry(h.job.as_str())
                    .or_default()
                    .extend(ledger.layers_of(h.rank));
            }
        }
        for (job, layers) in layers {
            let layers: Vec<u32> = layers.into_iter().collect();
            let update = self
                .runtime
                .get(job)
                .and_then(|rt| rt.ledger.as_ref())
                .and_then(|l| l.latest_update(job, Some(&layers)));
            if let Some(update) = update {
                actions.push(Action::Send {
                    worker: id.clone(),
                    msg: msg(pb::coordinator_message::Msg::BiasUpdate(update)),
                });
            }
        }
        let jobs: BTreeSet<String> = self.state.workers[&id]
            .stored
            .held
            .iter()
            .map(|h| h.job.clone())
            .collect();
        for job in jobs {
            let text = if was_lost {
                format!("worker {id} came back after being lost")
            } else {
                format!("worker {id} reconnected and resumed its registration")
            };
            self.event(&job, now, "WorkerResumed", text, &id, actions);
        }
        Ok(())
    }

    fn disconnected(&mut self, worker: &str, session: u64, actions: &mut Vec<Action>) {
        if let Some(w) = self.state.workers.get_mut(worker)
            && w.session == session
            && w.connected
        {
            w.connected = false;
            actions.push(Action::Presence {
                worker: worker.to_owned(),
                present: false,
            });
        }
    }

    fn check_held(&self, worker: &str, job: &str, rank: u32) -> Result<(), CoreError> {
        let w = self
            .state
            .workers
            .get(worker)
            .ok_or_else(|| CoreError::UnknownWorker(worker.to_owned()))?;
        if w.stored.held.iter().any(|h| h.job == job && h.rank == rank) {
            Ok(())
        } else {
            Err(CoreError::NotHeld {
                worker: worker.to_owned(),
                job: job.to_owned(),
                rank,
            })
        }
    }

    /// A rank's report ends its job: records `kind` as an event from `worker`, then fails the job and
    /// stops every other rank, both with the same reason.
    fn fail_job_for_rank(
        &mut self,
        job: &str,
        worker: &str,
        kind: &str,
        why: String,
        now: UnixMs,
        actions: &mut Vec<Action>,
    ) {
        self.event(job, now, kind, why.clone(), worker, actions);
        self.fail_or_restart(job, kind, why, false, now, actions);
    }

    #[allow(clippy::too_many_arguments)]
    fn ack(
        &mut self,
        worker: &str,
        job: &str,
        rank: u32,
        ready: bool,
        reason: String,
        now: UnixMs,
        actions: &mut Vec<Action>,
    ) -> Result<(), CoreError> {
        self.check_held(worker, job, rank)?;
        if !ready {
            let why = format!("rank {rank} rejected its assignment on worker {worker}: {reason}");
            self.fail_job_for_rank(job, worker, "RankRejected", why, now, actions);
            return Ok(());
        }
        let entry = self
            .state
            .jobs
            .get_mut(job)
            .ok_or_else(|| CoreError::UnknownJob(job.to_owned()))?;
        if entry.stored.ready_ranks.contains(&rank) {
            return Ok(());
        }
        entry.stored.ready_ranks.push(rank);
        entry.stored.ready_ranks.sort_unstable();
        let n_ready = entry.stored.ready_ranks.len() as u32;
        let world = entry.world_size();
        self.dirty_jobs.insert(job.to_owned());
        self.event(
            job,
            now,
            "RankReady",
            format!("rank {rank} ready on worker {worker} ({n_ready}/{world})"),
            worker,
            actions,
        );
        if n_ready == world && self.state.jobs[job].phase() == pb::JobPhase::Scheduled {
            self.transition(
                job,
                pb::JobPhase::Running,
                format!("all {world} ranks reported ready"),
                now,
            );
            self.start_ledger(job, now, actions);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn rank_finished(
        &mut self,
        worker: &str,
        job: &str,
        rank: u32,
        (ok, reason, deterministic): (bool, String, bool),
        now: UnixMs,
        actions: &mut Vec<Action>,
    ) -> Result<(), CoreError> {
        self.check_held(worker, job, rank)?;
        if !ok {
            let why = format!("rank {rank} failed on worker {worker}: {reason}");
            self.event(
                job,
                now,
                recovery::RANK_FAILED,
                why.clone(),
                worker,
                actions,
            );
            self.fail_or_restart(job, recovery::RANK_FAILED, why, deterministic, now, actions);
            return Ok(());
        }
        let entry = self
            .state
            .jobs
            .get_mut(job)
            .ok_or_else(|| CoreError::UnknownJob(job.to_owned()))?;
        if entry.stored.finished_ranks.contains(&rank) {
            // Workers re-send it after a resumed registration (it may have been lost).
            tracing::debug!(job, rank, worker, "rank already finished");
            return Ok(());
        }
        entry.stored.finished_ranks.push(rank);
        entry.stored.finished_ranks.sort_unstable();
        let n_done = entry.stored.finished_ranks.len() as u32;
        let world = entry.world_size();
        self.dirty_jobs.insert(job.to_owned());
        self.event(
            job,
            now,
            "RankFinished",
            format!("rank {rank} finished on worker {worker} ({n_done}/{world})"),
            worker,
            actions,
        );
        if n_done == world {
            self.end_job(
                job,
                pb::JobPhase::Succeeded,
                format!("all {world} ranks finished"),
                pb::CommandKind::Stop,
                now,
                actions,
            );
        }
        Ok(())
    }

    /// Ends a job: moves it to `phase`, tells every holder to stop, frees their devices.
    fn end_job(
        &mut self,
        job: &str,
        phase: pb::JobPhase,
        reason: String,
        kind: pb::CommandKind,
        now: UnixMs,
        actions: &mut Vec<Action>,
    ) {
        let Some(entry) = self.state.jobs.get(job) else {
            return;
        };
        if entry.phase().is_terminal() {
            return;
        }
        self.transition(job, phase, reason.clone(), now);
        if let Some(rt) = self.runtime.get_mut(job) {
            // History and the latest loads stay for `describe`; the ledger and partial sets go.
            rt.ledger = None;
            rt.clear_pending();
        }
        let holders: Vec<String> = self
            .state
            .workers
            .iter()
            .filter(|(_, w)| w.stored.held.iter().any(|h| h.job == job))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &holders {
            actions.push(Action::Send {
                worker: id.clone(),
                msg: msg(pb::coordinator_message::Msg::Command(pb::Command {
                    job: job.to_owned(),
                    kind: kind as i32,
                    reason: reason.clone(),
                })),
            });
            if let Some(w) = self.state.workers.get_mut(id) {
                w.stored.held.retain(|h| h.job != job);
                if !w.stored.lost {
                    w.stored.reason = format!("freed: job {job} {}", phase.name());
                }
            }
            self.dirty_workers.insert(id.clone());
        }
        self.state.assignments.retain(|(j, _), _| j != job);
        actions.push(Action::DeleteAssignments {
            job: job.to_owned(),
        });
        if !holders.is_empty() {
            self.event(
                job,
                now,
                "WorkersFreed",
                format!("freed {} workers: {}", holders.len(), holders.join(", ")),
                "",
                actions,
            );
        }
    }

    fn transition(&mut self, job: &str, to: pb::JobPhase, reason: String, now: UnixMs) {
        let Some(entry) = self.state.jobs.get_mut(job) else {
            return;
        };
        let from = entry.phase();
        entry.stored.transitions.push(pb::JobTransition {
            from: from as i32,
            to: to as i32,
            unix_ms: now,
            reason,
        });
        entry.stored.phase = to as i32;
        entry.stored.updated_unix_ms = now;
        self.dirty_jobs.insert(job.to_owned());
        tracing::info!(job, from = from.name(), to = to.name(), "job phase changed");
    }

    fn event(
        &mut self,
        job: &str,
        now: UnixMs,
        kind: &str,
        message: String,
        worker: &str,
        actions: &mut Vec<Action>,
    ) {
        let Some(entry) = self.state.jobs.get_mut(job) else {
            return;
        };
        let event = pb::JobEvent {
            seq: entry.stored.next_event_seq,
            unix_ms: now,
            kind: kind.to_owned(),
            message,
            worker_id: worker.to_owned(),
        };
        entry.stored.next_event_seq += 1;
        entry.events.push(event.clone());
        self.dirty_jobs.insert(job.to_owned());
        actions.push(Action::AppendEvent {
            job: job.to_owned(),
            event,
        });
    }

    fn run_liveness(&mut self, now: UnixMs, actions: &mut Vec<Action>) {
        let _span = tracing::debug_span!("liveness").entered();
        for v in newly_lost(&self.state, now, &self.config) {
            if v.verdict != Verdict::Lost {
                continue;
            }
            tracing::warn!(worker = %v.worker, reason = %v.reason, "worker lost");
            let Some(w) = self.state.workers.get_mut(&v.worker) else {
                continue;
            };
            w.stored.lost = true;
            w.stored.reason = format!("lost: {}", v.reason);
            let held = w.stored.held.clone();
            self.dirty_workers.insert(v.worker.clone());
            let jobs: BTreeSet<String> = held.iter().map(|h| h.job.clone()).collect();
            for job in jobs {
                let ranks: Vec<String> = held
                    .iter()
                    .filter(|h| h.job == job)
                    .map(|h| h.rank.to_string())
                    .collect();
                let why = format!(
                    "worker {} (rank {}) lost: {}",
                    v.worker,
                    ranks.join(", "),
                    v.reason
                );
                self.event(&job, now, "WorkerLost", why.clone(), &v.worker, actions);
                self.fail_or_restart(&job, recovery::WORKER_LOST, why, false, now, actions);
            }
        }
    }

    fn run_scheduler(&mut self, now: UnixMs, actions: &mut Vec<Action>) {
        let _span = tracing::debug_span!("scheduler").entered();
        for d in schedule(&self.state) {
            match d.decision {
                Decision::Wait => {
                    let entry = self.state.jobs.get_mut(&d.job);
                    if let Some(entry) = entry
                        && entry.stored.wait_reason != d.reason
                    {
                        let cause = |r: &str| r.split(':').next().unwrap_or_default().to_owned();
                        let new_cause = cause(&entry.stored.wait_reason) != cause(&d.reason);
                        entry.stored.wait_reason = d.reason.clone();
                        self.dirty_jobs.insert(d.job.clone());
                        if new_cause {
                            tracing::info!(job = %d.job, reason = %d.reason, "job waits");
                            self.event(&d.job, now, "Waiting", d.reason, "", actions);
                        }
                    }
                }
                Decision::Place(_)
                    if self
                        .state
                        .jobs
                        .get(&d.job)
                        .is_some_and(|j| recovery::held_back(j, now, &self.config)) => {}
                Decision::Place(placement) => {
                    self.apply_placement(&d.job, placement, d.reason, now, actions)
                }
            }
        }
    }

    fn apply_placement(
        &mut self,
        job: &str,
        placement: pb::Placement,
        reason: String,
        now: UnixMs,
        actions: &mut Vec<Action>,
    ) {
        let Some(entry) = self.state.jobs.get_mut(job) else {
            return;
        };
        let spec = entry.spec();
        entry.stored.placement = Some(placement.clone());
        entry.stored.ready_ranks.clear();
        entry.stored.finished_ranks.clear();
        entry.stored.wait_reason.clear();
        let manifest_yaml = entry.stored.manifest_yaml.clone();
        let overrides = entry.stored.overrides.clone();
        let heartbeat_ms = if spec.heartbeat_interval_ms > 0 {
            spec.heartbeat_interval_ms
        } else {
            proto::convert::duration_to_ms(self.config.heartbeat_interval)
        };
        self.transition(job, pb::JobPhase::Scheduled, reason.clone(), now);
        self.event(job, now, "Placed", reason, "", actions);
        // A resumed job goes on with the step after its checkpoint's.
        let first_step = spec.resume.as_ref().map_or(0, |r| r.step + 1);
        let mut runtime = JobRuntime::default();
        runtime.finished = first_step;
        self.runtime.insert(job.to_owned(), runtime);
        let peers: Vec<pb::Peer> = placement
            .ranks
            .iter()
            .map(|r| pb::Peer {
                rank: r.rank,
                worker_id: r.worker_id.clone(),
                node: r.node.clone(),
                data_plane_addr: r.data_plane_addr.clone(),
            })
            .collect();
        // One op list per pipeline position (row `pp_idx` of the job's schedule).
        let mut rows: BTreeMap<u32, Vec<pb::Op>> = BTreeMap::new();
        for r in &placement.ranks {
            if rows.contains_key(&r.pp_idx) {
                continue;
            }
            match training::ops_of(&spec, r.pp_idx) {
                Ok(ops) => {
                    rows.insert(r.pp_idx, ops);
                }
                Err(why) => {
                    // Workers refuse an assignment without ops, which fails the job with their
                    // reason; this one event says why the lists are empty.
                    let text = format!("no op lists: {why}");
                    tracing::warn!(job, %text, "schedule not generated");
                    self.event(job, now, "ScheduleInvalid", text, "", actions);
                    break;
                }
            }
        }
        for r in &placement.ranks {
            let assignment = pb::Assignment {
                job: job.to_owned(),
                rank: r.rank,
                world_size: spec.pipeline * spec.data,
                device_index: r.device_index,
                pipeline: spec.pipeline,
                data: spec.data,
                expert: spec.expert,
                pp_idx: r.pp_idx,
                dp_idx: r.dp_idx,
                ep_idx: r.ep_idx,
                stages: r.stages.clone(),
                experts: r.experts,
                peers: peers.clone(),
                schedule: spec.schedule.clone(),
                micro_batches: spec.micro_batches,
                steps: spec.steps,
                ops: rows.get(&r.pp_idx).cloned().unwrap_or_default(),
                manifest_yaml: manifest_yaml.clone(),
                overrides: overrides.clone(),
                heartbeat_interval_ms: heartbeat_ms,
                checkpoint_dir: spec.checkpoint_dir.clone(),
                checkpoint_interval: spec.checkpoint_interval,
                resume: spec.resume.clone(),
            };
            if let Some(w) = self.state.workers.get_mut(&r.worker_id) {
                w.stored.held.push(pb::HeldRank {
                    job: job.to_owned(),
                    rank: r.rank,
                    device_index: r.device_index,
                    next_step: first_step,
                });
                w.stored.reason = format!("holds rank {} of job {job}", r.rank);
                self.dirty_workers.insert(r.worker_id.clone());
            }
            self.state
                .assignments
                .insert((job.to_owned(), r.rank), assignment.clone());
            actions.push(Action::PutAssignment(Box::new(assignment.clone())));
            actions.push(Action::Send {
                worker: r.worker_id.clone(),
                msg: msg(pb::coordinator_message::Msg::Assignment(assignment)),
            });
        }
    }
}

/// Wraps one message for a worker's stream.
pub fn msg(m: pb::coordinator_message::Msg) -> pb::CoordinatorMessage {
    pb::CoordinatorMessage { msg: Some(m) }
}
