//! `moetrain get jobs|workers`: list jobs or workers as a table, JSON or YAML.
//!
//! Invariant: JSON/YAML output is a list of the views in `client_common` (stable field names),
//! in the coordinator's order; one RPC, under `--timeout`.

use super::client_common::{self as cc, ClientArgs};
use proto::pb;
use std::process::ExitCode;

/// What to list.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    /// Training jobs.
    #[value(alias = "job")]
    Jobs,
    /// Worker daemons.
    #[value(alias = "worker")]
    Workers,
}

/// List jobs or workers.
#[derive(clap::Args, Debug)]
#[command(after_help = cc::EXIT_CODES_HELP)]
pub struct Args {
    /// `jobs` or `workers`.
    #[arg(value_enum)]
    pub resource: Resource,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Runs `get`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    cc::run_client("moetrain-cli", || async move {
        let mut client = cc::connect(&args.client).await?;
        let limit = args.client.timeout;
        match args.resource {
            Resource::Jobs => {
                let resp = cc::rpc(
                    "listing jobs",
                    limit,
                    client.list_jobs(pb::ListJobsRequest {}),
                )
                .await?;
                let views: Vec<cc::JobView> = resp.jobs.iter().map(cc::JobView::from).collect();
                cc::print(args.client.output, &views, |v| jobs_table(v))
            }
            Resource::Workers => {
                let resp = cc::rpc(
                    "listing workers",
                    limit,
                    client.list_workers(pb::ListWorkersRequest {}),
                )
                .await?;
                let views: Vec<cc::WorkerView> =
                    resp.workers.iter().map(cc::WorkerView::from).collect();
                cc::print(args.client.output, &views, |v| workers_table(v))
            }
        }
    })
}

/// The `get jobs` table.
pub fn jobs_table(jobs: &[cc::JobView]) -> String {
    if jobs.is_empty() {
        return "No jobs.\n".into();
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.name.clone(),
                j.phase.clone(),
                format!("{}/{}", j.ready_ranks, j.world_size),
                format!("{}x{}x{}", j.pipeline, j.data, j.expert),
                j.schedule.clone(),
                match &j.progress {
                    Some(p) if p.step > 0 => format!("{}/{}", p.step, j.steps),
                    _ => format!("0/{}", j.steps),
                },
                match &j.progress {
                    Some(p) if p.step > 0 => format!("{:.4}", p.loss),
                    _ => "-".into(),
                },
                cc::age(j.created_unix_ms),
                j.reason.clone(),
            ]
        })
        .collect();
    cc::render_table(
        &[
            "NAME", "PHASE", "READY", "PxDxE", "SCHEDULE", "STEP", "LOSS", "AGE", "REASON",
        ],
        &rows,
    )
}

/// The `get workers` table.
pub fn workers_table(workers: &[cc::WorkerView]) -> String {
    if workers.is_empty() {
        return "No workers.\n".into();
    }
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            let kinds: Vec<&str> = w.devices.iter().map(|d| d.kind.as_str()).collect();
            let kind = kinds.first().copied().unwrap_or("-");
            let held: Vec<String> = w
                .held
                .iter()
                .map(|h| format!("{}#{}", h.job, h.rank))
                .collect();
            vec![
                w.worker_id.clone(),
                w.node.clone(),
                w.state.clone(),
                format!("{}x{kind}", w.devices.len()),
                w.data_plane_addr.clone(),
                if held.is_empty() {
                    "-".into()
                } else {
                    held.join(",")
                },
                cc::age(w.last_heartbeat_unix_ms),
                if w.connected {
                    "yes".into()
                } else {
                    "no".into()
                },
                w.reason.clone(),
            ]
        })
        .collect();
    cc::render_table(
        &[
            "WORKER",
            "NODE",
            "STATE",
            "DEVICES",
            "DATA-PLANE",
            "HELD",
            "HEARTBEAT",
            "CONNECTED",
            "REASON",
        ],
        &rows,
    )
}
