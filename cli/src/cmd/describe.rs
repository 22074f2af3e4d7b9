//! `moetrain describe job NAME`: summary, training progress (step, loss terms, tokens/s, last
//! checkpoint), the current expert-load imbalance (per MoE layer max/mean of the latest step),
//! phase transitions with times and reasons, events, placement (rank → worker, node, device,
//! stages, experts) and the manifest as submitted.
//!
//! Invariant: each RPC under `--timeout`; exit 3 for an unknown job. The imbalance comes from a
//! second RPC (`ExpertLoads`); when it fails the rest is still printed, without it.

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
        let mut view = cc::DescribeView::from(&resp);
        let loads = cc::rpc(
            &format!("reading expert loads of job {}", args.name),
            args.client.timeout,
            client.expert_loads(pb::ExpertLoadsRequest {
                name: args.name.clone(),
                history: 1,
            }),
        )
        .await;
        match loads {
            Ok(l) => view.imbalance = cc::ImbalanceView::latest(&l),
            Err(e) => tracing::warn!(error = %e.message, "expert loads unavailable"),
        }
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
        let _ = writeln!(
            s,
            "Restarts:      {} of {} allowed",
            j.restarts, j.restart_budget
        );
        match &j.progress {
            Some(p) if p.step > 0 => {
                let _ = writeln!(
                    s,
                    "Progress:      step {}/{}  loss {:.4}  {:.0} tokens/s  {:.2}s/step",
                    p.step, j.steps, p.loss, p.tokens_per_second, p.step_seconds
                );
                let terms: Vec<String> = p
                    .losses
                    .iter()
                    .map(|l| format!("{} {:.4}", l.name, l.value))
                    .collect();
                if !terms.is_empty() {
                    let _ = writeln!(s, "Loss terms:    {}", terms.join("  "));
                }
                let _ = writeln!(
                    s,
                    "Optimizer:     lr {:.3e}  grad norm {:.4}  tokens {}",
                    p.lr, p.grad_norm, p.tokens
                );
            }
            _ => {
                let _ = writeln!(s, "Progress:      step 0/{}", j.steps);
            }
        }
        match &j.last_checkpoint {
            Some(c) => {
                let _ = writeln!(
                    s,
                    "Checkpoint:    after step {} in {} ({} ranks, {} bytes, {})",
                    c.step,
                    c.dir,
                    c.ranks,
                    c.bytes,
                    when(c.unix_ms)
                );
            }
            None => {
                let _ = writeln!(s, "Checkpoint:    none yet");
            }
        }
    }
    if let Some(im) = &d.imbalance {
        let worst = im.worst().map_or(String::new(), |w| {
            format!(", worst {:.2} at layer {}", w.max_over_mean, w.layer)
        });
        let _ = writeln!(
            s,
            "\nExpert load (step {}, max/mean per MoE layer{worst}):",
            im.step
        );
        let rows: Vec<Vec<String>> = im
            .layers
            .iter()
            .map(|l| {
                vec![
                    l.layer.to_string(),
                    l.max.to_string(),
                    format!("{:.1}", l.mean),
                    format!("{:.2}", l.max_over_mean),
                ]
            })
            .collect();
        s.push_str(&indent(&cc::render_table(
            &["LAYER", "MAX", "MEAN", "MAX/MEAN"],
            &rows,
        )));
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
