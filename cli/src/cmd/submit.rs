//! `moetrain submit JOB.yaml [--set path=value]... [--resume DIR]`: send a TrainingJob manifest
//! to the coordinator, which parses, validates (like helm, overrides are validated like the file)
//! and stores it; the job starts Pending. With `--resume`, the job goes on from a committed
//! distributed checkpoint ([`resume_point`] reads and checks its `checkpoint.json`).
//!
//! Invariant: the manifest text goes to the coordinator unchanged, with its origin for error
//! messages; the coordinator is the one place that validates it, so the CLI and the coordinator
//! can never disagree. An invalid manifest exits 4 with the coordinator's message (field, line,
//! column); a taken job name exits 6.

use super::client_common::{self as cc, ClientArgs, ClientError};
use proto::pb;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Submit a training job.
#[derive(clap::Args, Debug)]
#[command(after_help = cc::EXIT_CODES_HELP)]
pub struct Args {
    /// The TrainingJob manifest (`-` reads stdin).
    pub manifest: PathBuf,
    /// Override a field, e.g. `--set spec.training.steps=100` (repeatable).
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub overrides: Vec<String>,
    /// Resume from a committed checkpoint: its step directory (holding `checkpoint.json`) or the
    /// checkpoints root (then its newest complete `step-N`). Same parallel layout only.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Runs `submit`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    cc::run_client("moetrain-cli", || async move {
        let origin = args.manifest.display().to_string();
        let text = if origin == "-" {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map_err(|e| {
                ClientError::new(
                    cc::EXIT_ERROR,
                    format!("reading the manifest from stdin: {e}"),
                )
            })?;
            s
        } else {
            std::fs::read_to_string(&args.manifest)
                .map_err(|e| ClientError::new(cc::EXIT_ERROR, format!("reading {origin}: {e}")))?
        };
        for o in &args.overrides {
            if !o.contains('=') {
                return Err(ClientError::new(
                    cc::EXIT_USAGE,
                    format!("--set `{o}` is not PATH=VALUE"),
                ));
            }
        }
        let resume = match &args.resume {
            Some(dir) => {
                // The rank count is checked here when the manifest parses; a manifest that
                // does not is left to the coordinator, which names what is wrong with it.
                let world = worker::job::parse(&text, &origin, &args.overrides)
                    .ok()
                    .map(|j| j.spec.parallelism.pipeline * j.spec.parallelism.data);
                Some(resume_point(dir, world).map_err(|e| ClientError::new(cc::EXIT_INVALID, e))?)
            }
            None => None,
        };
        let mut client = cc::connect(&args.client).await?;
        let req = pb::SubmitJobRequest {
            manifest_yaml: text,
            origin: origin.clone(),
            overrides: args.overrides.clone(),
            resume,
        };
        let resp = cc::rpc(
            &format!("submitting {origin}"),
            args.client.timeout,
            client.submit_job(req),
        )
        .await?;
        let view = resp.job.as_ref().map(cc::JobView::from);
        cc::print(args.client.output, &view, |v| match v {
            Some(j) => format!("job {} submitted ({})\n", j.name, j.phase),
            None => "job submitted\n".into(),
        })
    })
}

/// The `checkpoint.json` format a committed distributed checkpoint's index has.
pub const INDEX_FORMAT: &str = "moetrain-distributed-checkpoint-v1";

#[derive(serde::Deserialize)]
struct Index {
    format: String,
    step: u64,
    ranks: Vec<IndexRank>,
    #[serde(default)]
    ledger: Option<IndexLedger>,
}

#[derive(serde::Deserialize)]
struct IndexRank {
    rank: u32,
    files: Vec<IndexFile>,
}

#[derive(serde::Deserialize)]
struct IndexFile {
    path: String,
    bytes: u64,
    sha256: String,
}

#[derive(serde::Deserialize)]
struct IndexLedger {
    after_step: u64,
    tokens_seen: u64,
    layers: Vec<IndexLayer>,
}

#[derive(serde::Deserialize)]
struct IndexLayer {
    layer: u32,
    values: Vec<f32>,
}

/// The resume point of a committed distributed checkpoint. `dir` is its step directory (holding
/// `checkpoint.json`) or the checkpoints root, whose newest `step-N` with a `checkpoint.json` is
/// taken (a step directory without one was never committed). Checks that the index lists every
/// rank `0..n` once (`n = world` when given), that every listed file exists with its listed size
/// (the workers verify the SHA-256 when they load their parts), and reads the routing-bias
/// ledger saved with it. The error names the path and what is wrong.
pub fn resume_point(dir: &Path, world: Option<u32>) -> Result<pb::ResumePoint, String> {
    let dir = std::path::absolute(dir).map_err(|e| format!("--resume {}: {e}", dir.display()))?;
    if !dir.is_dir() {
        return Err(format!(
            "--resume {}: not a directory (give a checkpoint's step-N directory or the checkpoints root)",
            dir.display()
        ));
    }
    let step_dir = if dir.join("checkpoint.json").is_file() {
        dir
    } else {
        newest_committed(&dir)?.ok_or_else(|| {
            format!(
                "--resume {}: no checkpoint.json here, and no step-N directory under it holds one (a checkpoint without checkpoint.json was never committed)",
                dir.display()
            )
        })?
    };
    let index_path = step_dir.join("checkpoint.json");
    let text = std::fs::read_to_string(&index_path)
        .map_err(|e| format!("{}: {e}", index_path.display()))?;
    let index: Index = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not a checkpoint index: {e}", index_path.display()))?;
    let bad = |why: String| format!("{}: {why}", index_path.display());
    if index.format != INDEX_FORMAT {
        return Err(bad(format!(
            "format {:?}, expected {INDEX_FORMAT:?}",
            index.format
        )));
    }
    let mut ranks: Vec<u32> = index.ranks.iter().map(|r| r.rank).collect();
    ranks.sort_unstable();
    if ranks.iter().enumerate().any(|(i, r)| *r != i as u32) {
        return Err(bad(format!(
            "lists ranks {ranks:?}; a complete checkpoint has every rank 0..n once"
        )));
    }
    if let Some(w) = world
        && ranks.len() != w as usize
    {
        return Err(bad(format!(
            "was written by {} ranks, but the job has {w} (pipeline x data); resuming onto another parallel layout (resharding) is not supported",
            ranks.len()
        )));
    }
    for r in &index.ranks {
        if r.files.is_empty() {
            return Err(bad(format!("rank {} lists no file", r.rank)));
        }
        for f in &r.files {
            let path = step_dir.join(&f.path);
            let meta = std::fs::metadata(&path)
                .map_err(|e| bad(format!("rank {}'s file {}: {e}", r.rank, path.display())))?;
            if meta.len() != f.bytes {
                return Err(bad(format!(
                    "rank {}'s file {} has {} bytes, the index says {}",
                    r.rank,
                    path.display(),
                    meta.len(),
                    f.bytes
                )));
            }
            if f.sha256.len() != 64 {
                return Err(bad(format!(
                    "rank {}'s file {} has no SHA-256 in the index",
                    r.rank, f.path
                )));
            }
        }
    }
    let ledger = index.ledger.map(|l| pb::LedgerSnapshot {
        after_step: l.after_step,
        tokens_seen: l.tokens_seen,
        layers: l
            .layers
            .into_iter()
            .map(|b| pb::LayerBias {
                layer: b.layer,
                values: b.values,
            })
            .collect(),
    });
    Ok(pb::ResumePoint {
        dir: step_dir.display().to_string(),
        step: index.step,
        ledger,
    })
}

/// The `step-N` directory under `root` with the largest N that holds a `checkpoint.json`.
fn newest_committed(root: &Path) -> Result<Option<PathBuf>, String> {
    let rd = std::fs::read_dir(root).map_err(|e| format!("--resume {}: {e}", root.display()))?;
    let mut best: Option<(u64, PathBuf)> = None;
    for ent in rd {
        let ent = ent.map_err(|e| format!("--resume {}: {e}", root.display()))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        let Some(n) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if ent.path().join("checkpoint.json").is_file() && best.as_ref().is_none_or(|(b, _)| n > *b)
        {
            best = Some((n, ent.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}
