//! `moetrain submit JOB.yaml [--set path=value]...`: send a TrainingJob manifest to the
//! coordinator, which parses, validates (like helm, overrides are validated like the file) and
//! stores it; the job starts Pending.
//!
//! Invariant: the manifest text goes to the coordinator unchanged, with its origin for error
//! messages; the coordinator is the one place that validates it, so the CLI and the coordinator
//! can never disagree. An invalid manifest exits 4 with the coordinator's message (field, line,
//! column); a taken job name exits 6.

use super::client_common::{self as cc, ClientArgs, ClientError};
use proto::pb;
use std::io::Read as _;
use std::path::PathBuf;
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
        let mut client = cc::connect(&args.client).await?;
        let req = pb::SubmitJobRequest {
            manifest_yaml: text,
            origin: origin.clone(),
            overrides: args.overrides.clone(),
            resume: None,
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
