//! The client-facing `Coordinator` service: submit, get, list, cancel, describe, list workers.
//!
//! `JobSteps` and `ExpertLoads` read the in-memory history of the core (`core::training`): a
//! coordinator restart loses it, never the job.
//!
//! Each RPC runs in its own `rpc` span, turns its request into a core event or a read of the
//! core's state, and maps errors through `status::to_status`. Mutating RPCs answer only after the
//! store has the change (a flush through the writer).

use std::sync::Arc;

use proto::pb;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::Shared;
use crate::Error;
use crate::core::{Event, JobEntry, JobRuntime, State, WorkerEntry};

/// Steps `JobSteps` returns when the request sets no limit.
pub const DEFAULT_STEPS_LIMIT: u32 = 1000;
/// The most steps one `JobSteps` answer holds.
pub const MAX_STEPS_LIMIT: u32 = 10_000;
/// Steps of max/mean history `ExpertLoads` returns when the request sets none.
pub const DEFAULT_LOAD_HISTORY: u32 = 100;

/// The finished steps of `rt` from `from` on, at most `limit` (0: the default).
pub fn steps_from(rt: Option<&JobRuntime>, from: u64, limit: u32) -> Vec<pb::StepSummary> {
    let limit = if limit == 0 {
        DEFAULT_STEPS_LIMIT
    } else {
        limit.min(MAX_STEPS_LIMIT)
    } as usize;
    let Some(rt) = rt else {
        return Vec::new();
    };
    let first = rt.history.front().map_or(0, |s| s.step);
    let skip = usize::try_from(from.saturating_sub(first)).unwrap_or(usize::MAX);
    rt.history.iter().skip(skip).take(limit).cloned().collect()
}

/// The expert-load telemetry of `rt`: the latest per-expert counts and `history` steps of
/// per-layer max/mean (0: the default).
pub fn expert_loads(
    rt: Option<&JobRuntime>,
    job: pb::Job,
    history: u32,
) -> pb::ExpertLoadsResponse {
    let n = if history == 0 {
        DEFAULT_LOAD_HISTORY
    } else {
        history
    } as usize;
    let Some(rt) = rt else {
        return pb::ExpertLoadsResponse {
            job: Some(job),
            ..Default::default()
        };
    };
    let (step, layers) = match &rt.latest_loads {
        Some((step, layers)) => (
            Some(*step),
            layers
                .iter()
                .map(|l| pb::LayerExpertCounts {
                    layer: l.layer,
                    counts: l.counts.clone(),
                })
                .collect(),
        ),
        None => (None, Vec::new()),
    };
    let with_loads: Vec<&pb::StepSummary> = rt
        .history
        .iter()
        .rev()
        .filter(|s| !s.layer_loads.is_empty())
        .take(n)
        .collect();
    let history = with_loads
        .into_iter()
        .rev()
        .map(|s| pb::StepLayerLoads {
            step: s.step,
            layers: s.layer_loads.clone(),
        })
        .collect();
    pb::ExpertLoadsResponse {
        job: Some(job),
        step,
        layers,
        history,
    }
}

/// See the module docs.
pub struct Api {
    shared: Arc<Shared>,
}

impl Api {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

/// The summary of a job for clients.
pub fn job_summary(entry: &JobEntry) -> pb::Job {
    let s = &entry.stored;
    let spec = entry.spec();
    pb::Job {
        name: spec.name.clone(),
        phase: s.phase,
        reason: s
            .transitions
            .last()
            .map(|t| t.reason.clone())
            .unwrap_or_default(),
        origin: s.origin.clone(),
        world_size: spec.pipeline * spec.data,
        pipeline: spec.pipeline,
        data: spec.data,
        expert: spec.expert,
        schedule: spec.schedule.clone(),
        micro_batches: spec.micro_batches,
        steps: spec.steps,
        created_unix_ms: s.created_unix_ms,
        updated_unix_ms: s.updated_unix_ms,
        ready_ranks: s.ready_ranks.len() as u32,
        progress: s.progress.clone(),
        device_kind: spec.device_kind,
        last_checkpoint: s.last_checkpoint.clone(),
        restarts: s.restarts,
        restart_budget: spec.restart_budget,
    }
}

/// A worker as clients see it.
pub fn worker_summary(w: &WorkerEntry) -> pb::Worker {
    let s = &w.stored;
    let state = if s.lost {
        pb::WorkerState::Lost
    } else if s.held.is_empty() {
        pb::WorkerState::Idle
    } else {
        pb::WorkerState::Busy
    };
    pb::Worker {
        worker_id: s.worker_id.clone(),
        node: s.node.clone(),
        devices: s.devices.clone(),
        data_plane_addr: s.data_plane_addr.clone(),
        state: state as i32,
        reason: s.reason.clone(),
        registered_unix_ms: s.registered_unix_ms,
        last_heartbeat_unix_ms: w.last_seen,
        held: s.held.clone(),
        connected: w.connected,
    }
}

fn find<'a>(state: &'a State, name: &str) -> Result<&'a JobEntry, Status> {
    state
        .jobs
        .get(name)
        .ok_or_else(|| Error::Core(crate::core::CoreError::UnknownJob(name.to_owned())).into())
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for Api {
    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let req = req.into_inner();
        let span = tracing::info_span!("rpc", method = "SubmitJob", origin = %req.origin);
        async move {
            let mut sub = crate::spec::submission(&req.manifest_yaml, &req.origin, &req.overrides)?;
            // The core checks the resume point against the spec (`training::check_resume`).
            sub.spec.resume = req.resume;
            let name = sub.spec.name.clone();
            self.shared.handle(Event::Submit(Box::new(sub)))?;
            self.shared.flush().await?;
            let inner = self.shared.lock();
            let job = job_summary(find(&inner.core.state, &name)?);
            tracing::info!(job = %name, "job submitted");
            Ok(Response::new(pb::SubmitJobResponse { job: Some(job) }))
        }
        .instrument(span)
        .await
    }

    async fn get_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        let _span = tracing::info_span!("rpc", method = "GetJob").entered();
        let name = req.into_inner().name;
        let inner = self.shared.lock();
        let job = job_summary(find(&inner.core.state, &name)?);
        Ok(Response::new(pb::GetJobResponse { job: Some(job) }))
    }

    async fn list_jobs(
        &self,
        _req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let _span = tracing::info_span!("rpc", method = "ListJobs").entered();
        let inner = self.shared.lock();
        let mut jobs: Vec<&JobEntry> = inner.core.state.jobs.values().collect();
        jobs.sort_by_key(|j| j.stored.seq);
        let jobs = jobs.into_iter().map(job_summary).collect();
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let req = req.into_inner();
        let span = tracing::info_span!("rpc", method = "CancelJob", job = %req.name);
        async move {
            self.shared.handle(Event::Cancel {
                job: req.name.clone(),
                reason: req.reason,
            })?;
            self.shared.flush().await?;
            let inner = self.shared.lock();
            let job = job_summary(find(&inner.core.state, &req.name)?);
            Ok(Response::new(pb::CancelJobResponse { job: Some(job) }))
        }
        .instrument(span)
        .await
    }

    async fn list_workers(
        &self,
        _req: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let _span = tracing::info_span!("rpc", method = "ListWorkers").entered();
        let inner = self.shared.lock();
        let workers = inner
            .core
            .state
            .workers
            .values()
            .map(worker_summary)
            .collect();
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    async fn describe_job(
        &self,
        req: Request<pb::DescribeJobRequest>,
    ) -> Result<Response<pb::DescribeJobResponse>, Status> {
        let _span = tracing::info_span!("rpc", method = "DescribeJob").entered();
        let name = req.into_inner().name;
        let inner = self.shared.lock();
        let entry = find(&inner.core.state, &name)?;
        Ok(Response::new(pb::DescribeJobResponse {
            job: Some(job_summary(entry)),
            transitions: entry.stored.transitions.clone(),
            events: entry.events.clone(),
            placement: entry.stored.placement.clone(),
            manifest_yaml: entry.stored.manifest_yaml.clone(),
            overrides: entry.stored.overrides.clone(),
        }))
    }

    async fn job_steps(
        &self,
        req: Request<pb::JobStepsRequest>,
    ) -> Result<Response<pb::JobStepsResponse>, Status> {
        let _span = tracing::info_span!("rpc", method = "JobSteps").entered();
        let req = req.into_inner();
        let inner = self.shared.lock();
        let entry = find(&inner.core.state, &req.name)?;
        let steps = steps_from(inner.core.runtime.get(&req.name), req.from_step, req.limit);
        Ok(Response::new(pb::JobStepsResponse {
            job: Some(job_summary(entry)),
            steps,
        }))
    }

    async fn expert_loads(
        &self,
        req: Request<pb::ExpertLoadsRequest>,
    ) -> Result<Response<pb::ExpertLoadsResponse>, Status> {
        let _span = tracing::info_span!("rpc", method = "ExpertLoads").entered();
        let req = req.into_inner();
        let inner = self.shared.lock();
        let job = job_summary(find(&inner.core.state, &req.name)?);
        Ok(Response::new(expert_loads(
            inner.core.runtime.get(&req.name),
            job,
            req.history,
        )))
    }
}
