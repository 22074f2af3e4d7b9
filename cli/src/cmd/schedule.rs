//! `moetrain schedule`: prints a pipeline schedule's per-rank op lists in the compact notation, as JSON
//! with the explicit sends and receives, or as an SVG timeline simulated with unit costs.
//!
//! Invariant: this is a thin shell around `plan::schedule` and `plan::sim`; what it prints is exactly
//! what the coordinator would ship to the workers for the same `(kind, P, N)`.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use plan::schedule::{Chunk, Op, Schedule, ScheduleKind};
use plan::sim::{Costs, SimConfig, simulate};
use serde_json::{Value, json};

/// Schedule kinds accepted on the command line.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Kind {
    /// DeepSeek's bidirectional DualPipe.
    Dualpipe,
    /// DualPipeV (cut-in-half, V-shape).
    Dualpipev,
    /// One-forward-one-backward.
    #[value(name = "1f1b")]
    OneFOneB,
}

impl From<Kind> for ScheduleKind {
    fn from(k: Kind) -> Self {
        match k {
            Kind::Dualpipe => ScheduleKind::DualPipe,
            Kind::Dualpipev => ScheduleKind::DualPipeV,
            Kind::OneFOneB => ScheduleKind::OneFOneB,
        }
    }
}

/// Output formats.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    /// One line per rank: `rank R: F0:0 F0:1 … F0:3+B1:5 …`.
    Compact,
    /// Ops per rank including explicit sends and receives.
    Json,
    /// A timeline per rank, simulated with the given costs.
    Svg,
}

/// Print the op lists of a pipeline schedule.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The schedule kind.
    #[arg(long, value_enum)]
    pub kind: Kind,
    /// Number of pipeline ranks P.
    #[arg(long)]
    pub ranks: u32,
    /// Number of micro-batches N per step.
    #[arg(long)]
    pub microbatches: u32,
    /// Output format.
    #[arg(long, value_enum, default_value = "compact")]
    pub format: Format,
    /// Op costs for the SVG timeline, `F,B,I,W,FB,COMM` (default: the unit costs 1,2,1,1,3,0).
    #[arg(long, value_name = "F,B,I,W,FB,COMM")]
    pub costs: Option<String>,
}

/// Parses `F,B,I,W,FB,COMM`.
pub fn parse_costs(text: &str) -> Result<Costs> {
    let v: Vec<f64> = text
        .split(',')
        .map(|p| {
            p.trim()
                .parse::<f64>()
                .with_context(|| format!("cost {p:?} in --costs {text:?} is not a number"))
        })
        .collect::<Result<_>>()?;
    let [forward, backward, backward_input, weight, overlapped, comm] = v[..] else {
        bail!(
            "--costs needs six comma-separated numbers F,B,I,W,FB,COMM, got {}",
            v.len()
        );
    };
    if v.iter().any(|x| !x.is_finite() || *x < 0.0) {
        bail!("--costs must be finite and non-negative: {text:?}");
    }
    Ok(Costs {
        forward,
        backward,
        backward_input,
        weight,
        overlapped,
        comm,
    })
}

fn chunk_json(c: Chunk) -> Value {
    json!({ "dir": c.dir, "mb": c.mb })
}

fn op_json(op: &Op) -> Value {
    match *op {
        Op::Forward(c) => json!({ "op": "forward", "dir": c.dir, "mb": c.mb }),
        Op::Backward(c) => json!({ "op": "backward", "dir": c.dir, "mb": c.mb }),
        Op::BackwardInput(c) => json!({ "op": "backward_input", "dir": c.dir, "mb": c.mb }),
        Op::Weight(c) => json!({ "op": "weight", "dir": c.dir, "mb": c.mb }),
        Op::ForwardBackward { f, b } => {
            json!({ "op": "forward_backward", "f": chunk_json(f), "b": chunk_json(b) })
        }
        Op::Send(t) => {
            json!({ "op": "send", "peer": t.peer, "payload": t.payload.name(), "dir": t.chunk.dir, "mb": t.chunk.mb })
        }
        Op::Recv(t) => {
            json!({ "op": "recv", "peer": t.peer, "payload": t.payload.name(), "dir": t.chunk.dir, "mb": t.chunk.mb })
        }
    }
}

/// The JSON form of a schedule: kind, sizes, and per rank its stages, compact line and full op list.
pub fn schedule_json(s: &Schedule) -> Value {
    let ranks: Vec<Value> = (0..s.ranks)
        .map(|r| {
            let stages: Vec<u32> = (0..s.chunks_per_rank()).map(|d| s.stage_of(r, d)).collect();
            json!({
                "rank": r,
                "stages": stages,
                "compact": s.compact_rank(r),
                "ops": s.ops[r as usize].iter().map(op_json).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "kind": s.kind.name(),
        "ranks": s.ranks,
        "microbatches": s.microbatches,
        "stages": s.stage_count(),
        "semantics": "ops run in order; send never blocks; recv waits for its message; messages between two ranks arrive in list order",
        "per_rank": ranks,
    })
}

/// Runs `moetrain schedule`.
pub fn run(args: Args) -> Result<ExitCode> {
    let kind = ScheduleKind::from(args.kind);
    let _span = tracing::info_span!(
        "schedule",
        kind = kind.name(),
        ranks = args.ranks,
        microbatches = args.microbatches
    )
    .entered();
    let schedule = kind
        .generate(args.ranks, args.microbatches)
        .context("cannot generate the schedule")?;
    match args.format {
        Format::Compact => print!("{}", schedule.compact()),
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&schedule_json(&schedule))?
        ),
        Format::Svg => {
            let costs = match &args.costs {
                Some(text) => parse_costs(text)?,
                None => Costs::unit(),
            };
            let report = simulate(&schedule, &SimConfig::with_costs(costs))
                .context("the schedule does not run")?;
            print!(
                "{}",
                plan::svg::render(&schedule, &report, &plan::svg::SvgOptions::default())
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_parse_and_reject_bad_input() {
        let c = parse_costs("1,2,1,1,2.5,0.25").expect("six numbers");
        assert_eq!((c.overlapped, c.comm), (2.5, 0.25));
        assert!(parse_costs("1,2,3").is_err());
        assert!(parse_costs("1,2,1,1,x,0").is_err());
        assert!(parse_costs("1,2,1,1,-3,0").is_err());
    }

    #[test]
    fn json_carries_every_op_including_transfers() {
        let s = plan::schedule::dualpipe(4, 8).expect("valid");
        let doc = schedule_json(&s);
        let ranks = doc["per_rank"].as_array().expect("array");
        assert_eq!(ranks.len(), 4);
        for (r, rank) in ranks.iter().enumerate() {
            let ops = rank["ops"].as_array().expect("array");
            assert_eq!(ops.len(), s.ops[r].len());
            let sends = ops.iter().filter(|o| o["op"] == "send").count() as u32;
            assert_eq!(sends, s.counts(r as u32).send);
            assert_eq!(rank["compact"], s.compact_rank(r as u32));
        }
        assert_eq!(ranks[0]["stages"], json!([0, 3]));
        assert_eq!(
            ranks[0]["ops"][1],
            json!({"op": "send", "peer": 1, "payload": "activation", "dir": 0, "mb": 0})
        );
    }
}
