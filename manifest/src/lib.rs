//! The YAML boundary: versioned `TrainingJob` and cluster manifests, `--set` overrides, validation
//! with errors that name the field, line and column, and lowering into `plan` types.
//!
//! Invariant: this is the only crate that parses YAML. A job returned by [`parse_job`] has passed
//! every rule and has its computed defaults filled in, so storing it with [`TrainingJob::to_yaml`]
//! and parsing it again gives the same job.
//!
//! # Flow
//! 1. The text is parsed into a located tree (`tree.rs`): every key and value keeps its line and
//!    column.
//! 2. `--set path.to.field=value` arguments are grafted onto the tree, each value parsed as YAML and
//!    located at its argument.
//! 3. The tree is deserialized into [`TrainingJob`] by a serde deserializer (`de.rs`) that locates
//!    type errors, unknown fields and bad enum values.
//! 4. The rules (`validate.rs`) check the job alone, then against its model config, then
//!    optionally against a cluster; each failing rule names a path, which the tree locates.

mod cluster;
mod de;
mod error;
mod job;
mod tree;
mod validate;

use std::path::Path;

use serde::Deserialize;

pub use cluster::{ClusterKind, ClusterManifest, ClusterSpec, NodeGroup, NodeSpec, parse_cluster};
pub use error::{Location, ManifestError};
pub use job::{
    ApiVersion, BiasUpdate, Checkpointing, DataSource, DeviceKind, FaultTolerance, JobKind,
    JobSpec, Metadata, ModelSpec, MomentDtype, Mtp, Optimizer, Parallelism, Precision, Resources,
    Schedule, SimulatedCosts, SyntheticData, TextData, TokenData, TokenDtype, Training,
    TrainingJob,
};

use crate::de::NodeDe;
use crate::tree::Node;
use crate::validate::Issue;

/// Parses a `TrainingJob` manifest, applies `--set` overrides, validates it and fills computed
/// defaults. `origin` names the manifest in errors (usually its path); a relative
/// `spec.model.configPath` is resolved against `origin`'s directory.
pub fn parse_job(
    src: &str,
    origin: &str,
    overrides: &[String],
) -> Result<TrainingJob, ManifestError> {
    parse(src, origin, overrides, None)
}

/// [`parse_job`], and also rejects a job that `cluster` could never hold under the placement rules
/// (checked against all of the cluster's devices, busy or not).
pub fn parse_job_for_cluster(
    src: &str,
    origin: &str,
    overrides: &[String],
    cluster: &plan::topology::Cluster,
) -> Result<TrainingJob, ManifestError> {
    parse(src, origin, overrides, Some(cluster))
}

fn parse(
    src: &str,
    origin: &str,
    overrides: &[String],
    cluster: Option<&plan::topology::Cluster>,
) -> Result<TrainingJob, ManifestError> {
    let mut tree = Node::parse(src, origin)?;
    tree.apply_overrides(overrides)
        .map_err(|err| with_origin(err, origin))?;
    let mut job = TrainingJob::deserialize(NodeDe::root(&tree))
        .map_err(|err| err.into_manifest_error(origin))?;
    let located = |issue: Issue| ManifestError::Field {
        origin: origin.to_string(),
        at: tree.locate(&issue.path),
        path: issue.path,
        message: issue.message,
    };
    validate::structural(&job).map_err(located)?;
    let base_dir = Path::new(origin).parent().unwrap_or(Path::new(""));
    let (model, file) = validate::resolve_model(&job, base_dir).map_err(located)?;
    validate::with_model(&job, &model).map_err(located)?;
    if let Some(cluster) = cluster {
        validate::fits(&job, &model, cluster).map_err(located)?;
    }
    job.fill_defaults(&model, file.as_deref());
    Ok(job)
}

fn with_origin(err: ManifestError, origin: &str) -> ManifestError {
    match err {
        ManifestError::Field {
            at, path, message, ..
        } => ManifestError::Field {
            origin: origin.to_string(),
            at,
            path,
            message,
        },
        other => other,
    }
}

impl TrainingJob {
    /// The job as YAML (what `describe` shows and what a store keeps); [`parse_job`] reads it back.
    pub fn to_yaml(&self) -> Result<String, ManifestError> {
        serde_saphyr::to_string(self).map_err(|err| ManifestError::Serialize(err.to_string()))
    }

    /// The model config the job names, with its overrides applied and validated. `base_dir`
    /// resolves a relative `configPath` (jobs from [`parse_job`] carry an absolute one).
    pub fn model_config(&self, base_dir: &Path) -> Result<arch::ModelConfig, ManifestError> {
        validate::resolve_model(self, base_dir)
            .map(|(model, _)| model)
            .map_err(unlocated)
    }

    /// What the placement needs to know about this job and its model.
    pub fn placement_request(
        &self,
        model: &arch::ModelConfig,
    ) -> plan::placement::PlacementRequest {
        validate::placement_request(self, model)
    }

    /// Fails when `cluster` could never hold the job (for the coordinator, after parsing).
    pub fn check_cluster(
        &self,
        model: &arch::ModelConfig,
        cluster: &plan::topology::Cluster,
    ) -> Result<(), ManifestError> {
        validate::fits(self, model, cluster).map_err(unlocated)
    }

    fn fill_defaults(&mut self, model: &arch::ModelConfig, file: Option<&Path>) {
        let par = &mut self.spec.parallelism;
        par.micro_batches = Some(par.micro_batches());
        let mtp = &mut self.spec.training.mtp;
        if mtp.depth.is_none() {
            mtp.depth = Some(model.num_nextn_predict_layers as u32);
        }
        if let Some(file) = file
            && let Ok(absolute) = std::path::absolute(file)
        {
            self.spec.model.config_path = Some(absolute.display().to_string());
        }
    }
}

fn unlocated(issue: Issue) -> ManifestError {
    ManifestError::Field {
        origin: String::new(),
        at: Location::Unknown,
        path: issue.path,
        message: issue.message,
    }
}
