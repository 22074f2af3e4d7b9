//! From a submitted manifest to what the core schedules: parse and validate with the `manifest`
//! crate, then keep only what the coordinator needs (`pb::JobSpec`).
//!
//! Invariant: a `Submission` returned here passed every manifest rule, and its spec's placement
//! request passed `PlacementRequest::check`, so the scheduler only ever waits for capacity. The
//! spec also carries what the core needs later without re-reading the manifest (the MoE layout and
//! bias rule for the ledger, the checkpoint settings), so a restored core never parses YAML.

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
        balance: Some(balance_spec(
            &job,
            [
                model.num_hidden_layers,
                model.first_k_dense_replace,
                model.moe_layer_freq,
                model.num_nextn_predict_layers,
            ],
        )),
        checkpoint_dir: job.spec.checkpointing.dir.clone().unwrap_or_default(),
        checkpoint_interval: job.spec.checkpointing.interval,
        resume: None,
        restart_budget: ft.restart_budget,
        spare_workers: ft.spare_workers,
    };
    Ok(Submission {
        spec,
        manifest_yaml: yaml.to_owned(),
        overrides: overrides.to_vec(),
        origin: origin.to_owned(),
    })
}

/// The MoE layout and bias-update rule of a validated job (what the bias ledger needs); `model`
/// is the model config's `[num_hidden_layers, first_k_dense_replace, moe_layer_freq,
/// num_nextn_predict_layers]`. The MTP depth trained is the manifest's, else the model's.
fn balance_spec(job: &manifest::TrainingJob, model: [usize; 4]) -> pb::BalanceSpec {
    let [layers, dense, freq, nextn] = model;
    let t = &job.spec.training;
    let mtp_depth = t.mtp.depth.map_or(nextn, |d| d as usize);
    let u32_of = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    // `microBatches` counts one pipeline replica's micro-batches; the job trains `data` replicas.
    let tokens_per_step = u64::from(job.spec.parallelism.micro_batches())
        * u64::from(job.spec.parallelism.data)
        * u64::from(t.micro_batch_size)
        * u64::from(t.seq_len);
    pb::BalanceSpec {
        num_hidden_layers: u32_of(layers),
        first_k_dense_replace: u32_of(dense),
        moe_layer_freq: u32_of(freq),
        mtp_depth: u32_of(mtp_depth),
        rate: t.bias_update.rate as f32,
        stop_after_tokens: t.bias_update.stop_after_tokens,
        subtract_mean: t.bias_update.subtract_mean,
        tokens_per_step,
    }
}
