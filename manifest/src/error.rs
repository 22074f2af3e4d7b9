//! The crate's one error type. Every field error names the field's dotted path and where it was
//! written: `tiny.yaml:12:5: spec.parallelism.pipeline: DualPipe needs an even pipeline degree, got 3`,
//! or `--set spec.parallelism.pipeline=3: spec.parallelism.pipeline: …` for an override.
//!
//! Invariant: the `Display` text is the user-facing message; tests assert it exactly.

use std::fmt;

/// Where a value was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A position in the manifest file, 1-based.
    File {
        /// Line, from 1.
        line: u64,
        /// Column, from 1.
        column: u64,
    },
    /// The `index`-th `--set` argument, `arg` verbatim.
    Override {
        /// Position among the overrides, from 0.
        index: usize,
        /// The argument as given, `path=value`.
        arg: String,
    },
    /// Not from any source text (a value checked after parsing, such as a cluster's capacity).
    Unknown,
}

/// Errors of manifest parsing, overrides and validation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The text is not valid YAML (or has duplicate keys).
    #[error("{origin}:{line}:{column}: {message}")]
    Syntax {
        /// The manifest's name (usually its path).
        origin: String,
        /// Line, from 1 (0 when the parser gave none).
        line: u64,
        /// Column, from 1 (0 when the parser gave none).
        column: u64,
        /// The parser's message.
        message: String,
    },
    /// A field has the wrong type, an unknown name, a bad value, or breaks a cross-field rule.
    #[error("{}{path}: {message}", prefix(origin, at))]
    Field {
        /// The manifest's name.
        origin: String,
        /// Where the field (or its nearest written ancestor) was written.
        at: Location,
        /// Dotted path with the YAML spelling, e.g. `spec.parallelism.pipeline`.
        path: String,
        /// What is wrong, with the values involved.
        message: String,
    },
    /// A `--set` argument is malformed (no `=`, empty path segment, or a value that is not YAML).
    #[error("--set {arg}: {message}")]
    Override {
        /// The argument as given.
        arg: String,
        /// What is wrong.
        message: String,
    },
    /// A manifest could not be written as YAML.
    #[error("cannot serialize the manifest: {0}")]
    Serialize(String),
}

fn prefix(origin: &str, at: &Location) -> String {
    match at {
        Location::File { line, column } => format!("{origin}:{line}:{column}: "),
        Location::Override { arg, .. } => format!("--set {arg}: "),
        Location::Unknown if origin.is_empty() => String::new(),
        Location::Unknown => format!("{origin}: "),
    }
}

impl ManifestError {
    /// The dotted field path, for field errors.
    pub fn path(&self) -> Option<&str> {
        match self {
            ManifestError::Field { path, .. } => Some(path),
            _ => None,
        }
    }

    /// Line and column in the manifest file, when the error points into it.
    pub fn line_column(&self) -> Option<(u64, u64)> {
        match self {
            ManifestError::Syntax { line, column, .. }
            | ManifestError::Field {
                at: Location::File { line, column },
                ..
            } => Some((*line, *column)),
            _ => None,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::File { line, column } => write!(f, "{line}:{column}"),
            Location::Override { arg, .. } => write!(f, "--set {arg}"),
            Location::Unknown => f.write_str("unknown location"),
        }
    }
}
