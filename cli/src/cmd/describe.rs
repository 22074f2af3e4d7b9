//! `moetrain describe job NAME`: summary, phase transitions with times and reasons, events,
//! placement (rank → worker, node, device, stages, experts) and the manifest as submitted.
//!
//! Invariant: one RPC under `--timeout`; exit 3 for an unknown job.

use super::client_common::{self as cc, ClientArgs};
use proto::pb;
use std::fmt::Write as _;
use std::process::ExitCode;

/// What to describe.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A training job.
    Job,
}

/// Describe a job.
#[derive(clap::Args, Debug)]
#[command(after_help = cc::EXIT_CODES_HELP)]
pub struct Args {
    /// `job`.
    #[arg(value_enum)]
    pub kind: Kind,
    /// Job name.
    pub name: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Runs `describe`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    cc::run_client("moetrain-cli", || async move {
        let mut client = cc::connect(&args.client).await?;
        let Kind::Job = args.kind;
        let req = pb::DescribeJobRequest {
            name: args.name.clone(),
        };
        let resp = cc::rpc(
            &format!("describing job {}", args.name),
            args.client.timeout,
            client.describe_job(req),
        )
        .await?;
        let view = cc::DescribeView::from(&resp);
        cc::print(args.client.output, &view, describe_text)
    })
}

/// Milliseconds since the epoch as an RFC 3339 UTC time.
fn when(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "-".into();
    }
    humantime::format_rfc3339_millis(proto::convert::time_from_unix_ms(unix_ms)).to_string()
}

/// The kubectl-style text of `describe job`.
pub fn describe_text(d: &cc::DescribeView) -> String {
    let mut s = String::new();
    if let Some(j) = &d.job {
        let _ = writeln!(s, "Name:          {}", j.name);
        let _ = writeln!(s, "Phase:         {}", j.phase);
        let _ = writeln!(s, "Reason:        {}", j.reason);
        let _ = writeln!(s, "Origin:        {}", j.origin);
        let _ = writeln!(s, "Created:       {}", when(j.created_unix_ms));
        let _ = writeln!(
            s,
            "Parallelism:   pipeline {} x data {} (expert {}), world {} {} device(s)",
            j.pipeline, j.data, j.expert, j.world_size, j.device_kind
        );
        let _ = writeln!(
            s,
            "Schedule:      {} with {} micro-batches",
            j.schedule, j.micro_batches
        );
        let _ = writeln!(s, "Ready ranks:   {}/{}", j.ready_ranks, j.world_size);
        match &j.progress {
            Some(p) if p.step > 0 => {
                let _ = writeln!(
                    s,
                    "Progress:      step {}/{}  loss {:.4}  {:.0} tokens/s",
                    p.step, j.steps, p.loss, p.tokens_per_second
                );
            }
            _ => {
                let _ = writeln!(s, "Progress:      step 0/{}", j.steps);
            }
        }
    }
    if !d.overrides.is_empty() {
        let _ = writeln!(s, "Overrides:     {}", d.overrides.join(" "));
    }
    s.push_str("\nTransitions:\n");
    let rows: Vec<Vec<String>> = d
        .transitions
        .iter()
        .map(|t| {
            vec![
                when(t.unix_ms),
                format!("{} -> {}", t.from, t.to),
                t.reason.clone(),
            ]
        })
        .collect();
    s.push_str(&indent(&cc::render_table(
        &["TIME", "CHANGE", "REASON"],
        &rows,
    )));
    if let Some(p) = &d.placement {
        s.push_str("\nPlacement:\n");
        let rows: Vec<Vec<String>> = p
            .ranks
            .iter()
            .map(|r| {
                vec![
                    r.rank.to_string(),
                    r.worker_id.clone(),
                    r.node.clone(),
                    r.device_index.to_string(),
                    format!("{}/{}/{}", r.pp_idx, r.dp_idx, r.ep_idx),
                    r.stages
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                    r.experts
                        .map(|[b, e]| format!("[{b},{e})"))
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        s.push_str(&indent(&cc::render_table(
            &[
                "RANK", "WORKER", "NODE", "DEVICE", "PP/DP/EP", "STAGES", "EXPERTS",
            ],
            &rows,
        )));
        if !p.reasons.is_empty() {
            s.push_str("  Reasons:\n");
            for r in &p.reasons {
                let _ = writeln!(s, "  - {r}");
            }
        }
    }
    s.push_str("\nEvents:\n");
    let rows: Vec<Vec<String>> = d
        .events
        .iter()
        .map(|e| {
            vec![
                when(e.unix_ms),
                e.kind.clone(),
                if e.worker_id.is_empty() {
                    "-".into()
                } else {
                    e.worker_id.clone()
                },
                e.message.clone(),
            ]
        })
        .collect();
    s.push_str(&indent(&cc::render_table(
        &["TIME", "KIND", "WORKER", "MESSAGE"],
        &rows,
    )));
    s
}

/// Indents every line by two spaces.
fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}
