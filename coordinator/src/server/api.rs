//! The client-facing `Coordinator` service: submit, get, list, cancel, describe, list workers.
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
use crate::core::{Event, JobEntry, State, WorkerEntry};

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
        progress: s.progress,
        device_kind: spec.device_kind,
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
            let sub = crate::spec::submission(&req.manifest_yaml, &req.origin, &req.overrides)?;
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
}
