//! The YAML boundary: versioned `TrainingJob` and cluster manifests, `--set` overrides, validation
//! with errors that name the field, line and column, and lowering into `plan` types.
//!
//! Invariant: this is the only crate that parses YAML.
