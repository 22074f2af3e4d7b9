//! `moetrain cancel NAME`: move a job that has not finished to Cancelled and free its workers.
//!
//! Invariant: one RPC under `--timeout`; exit 3 for an unknown job, 6 for a finished one.

use super::client_common::{self as cc, ClientArgs};
use proto::pb;
use std::process::ExitCode;

/// Cancel a job.
#[derive(clap::Args, Debug)]
#[command(after_help = cc::EXIT_CODES_HELP)]
pub struct Args {
    /// Job name.
    pub name: String,
    /// Reason stored with the transition.
    #[arg(long, default_value = "")]
    pub reason: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Runs `cancel`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    cc::run_client("moetrain-cli", || async move {
        let mut client = cc::connect(&args.client).await?;
        let req = pb::CancelJobRequest {
            name: args.name.clone(),
            reason: args.reason.clone(),
        };
        let resp = cc::rpc(
            &format!("cancelling job {}", args.name),
            args.client.timeout,
            client.cancel_job(req),
        )
        .await?;
        let view = resp.job.as_ref().map(cc::JobView::from);
        cc::print(args.client.output, &view, |v| match v {
            Some(j) => format!("job {} {}\n", j.name, j.phase.to_lowercase()),
            None => format!("job {} cancelled\n", args.name),
        })
    })
}
