//! From a submitted manifest to what the core schedules: parse and validate with the `manifest`
//! crate, then keep only what the coordinator needs (`pb::JobSpec`).
//!
//! Invariant: a `Submission` returned here passed every manifest rule, and its spec's placement
//! request passed `PlacementRequest::check`, so the scheduler only ever waits for capacity.

use proto::pb;

use crate::Error;
use crate::core::Submission;
use crate::store::keys::check_name;

/// Parses `yaml` (named `origin` in errors) with `overrides`, and builds the submission.
/// Manifest errors keep the manifest crate's message (field path, line and column).
pub fn submission(yaml: &str, origin: &str, overrides: &[String]) -> Result<Submission, Error> {
    let origin = if origin.is_empty() { "-" } else { origin };
    let job =
        manifest::parse_job(yaml, origin, overrides).map_err(|e| Error::Manifest(e.to_string()))?;
    let name = job.metadata.name.clone();
    check_name("metadata.name", &name).map_err(Error::Manifest)?;
    let model = job
        .model_config(std::path::Path::new(""))
        .map_err(|e| Error::Manifest(e.to_string()))?;
    let req = job.placement_request(&model);
    let par = &job.spec.parallelism;
    let ft = &job.spec.fault_tolerance;
    let device_kind = match job.spec.resources.device {
        manifest::DeviceKind::Cpu => pb::DeviceKind::Cpu,
        manifest::DeviceKind::Cuda => pb::DeviceKind::Cuda,
        manifest::DeviceKind::Simulated => pb::DeviceKind::Simulated,
    };
    let spec = pb::JobSpec {
        name,
        pipeline: par.pipeline,
        data: par.data,
        expert: par.expert,
        schedule: par.schedule.kind().name().to_owned(),
        micro_batches: par.micro_batches(),
        steps: job.spec.training.steps,
        n_routed_experts: req.experts.n_routed_experts,
        n_group: req.experts.n_group,
        device_kind: device_kind as i32,
        heartbeat_interval_ms: proto::convert::duration_to_ms(ft.heartbeat_interval),
        failure_timeout_ms: proto::convert::duration_to_ms(ft.failure_timeout),
    };
    Ok(Submission {
        spec,
        manifest_yaml: yaml.to_owned(),
        overrides: overrides.to_vec(),
        origin: origin.to_owned(),
    })
}
