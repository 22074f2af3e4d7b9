//! `moetrain experts JOB` (issue 7): the coordinator's expert-load telemetry (`ExpertLoads`) as a
//! terminal heatmap of the latest step — one row per MoE layer, one cell per expert (or per group
//! of adjacent experts when there are more experts than columns), shaded by the load relative to
//! the layer's mean, with the layer's max/mean ratio at the end of the row — followed by the worst
//! max/mean of recent steps. `-o json|yaml` prints the counts and history instead.
//!
//! Invariant: the renderers are pure functions of the counts and the width (no colour codes, no
//! terminal queries), so the output is reproducible and testable; one RPC under `--timeout`.

use std::fmt::Write as _;
use std::process::ExitCode;

use proto::pb;

use super::client_common::{self as cc, ClientArgs};

/// Show a job's per-layer, per-expert routing load.
#[derive(clap::Args, Debug)]
#[command(after_help = cc::EXIT_CODES_HELP)]
pub struct Args {
    /// Job name.
    pub name: String,
    /// Heatmap width in cells (adjacent experts merge when there are more).
    #[arg(long, default_value_t = 64)]
    pub width: usize,
    /// Recent steps of max/mean history to show.
    #[arg(long, default_value_t = 10)]
    pub history: u32,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Runs `experts`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    cc::run_client("moetrain-cli", || async move {
        let mut client = cc::connect(&args.client).await?;
        let resp = cc::rpc(
            &format!("reading expert loads of job {}", args.name),
            args.client.timeout,
            client.expert_loads(pb::ExpertLoadsRequest {
                name: args.name.clone(),
                history: args.history,
            }),
        )
        .await?;
        let view = cc::ExpertLoadsView::from(&resp);
        let width = args.width;
        cc::print(args.client.output, &view, |v| experts_text(v, width))
    })
}

/// The text of `experts JOB`: the heatmap of the latest step, then the history of the worst
/// layer's max/mean per step.
pub fn experts_text(v: &cc::ExpertLoadsView, width: usize) -> String {
    let mut out = String::new();
    let Some(step) = v.step else {
        let _ = writeln!(
            out,
            "job {}: no finished step with expert counts yet",
            v.job
        );
        return out;
    };
    let _ = writeln!(out, "job {}, step {step}", v.job);
    let layers: Vec<(u32, Vec<u64>)> = v
        .layers
        .iter()
        .map(|l| (l.layer, l.counts.clone()))
        .collect();
    out.push_str(&render_heatmap(&layers, width));
    if !v.history.is_empty() {
        out.push_str("\nworst max/mean per step:\n");
        for s in &v.history {
            if let Some(w) = s.worst() {
                let _ = writeln!(
                    out,
                    "  step {:>6}  {:.2} (layer {})",
                    s.step, w.max_over_mean, w.layer
                );
            }
        }
    }
    out
}

/// Shades from idle to hot, indexed by [`shade`].
const RAMP: [char; 10] = [' ', '.', ':', '-', '=', '+', '*', '#', '%', '@'];
/// Upper bounds of load / mean for each shade but the last (which takes everything above).
const BOUNDS: [f64; 9] = [0.0, 0.25, 0.5, 0.8, 1.25, 1.5, 2.0, 3.0, 4.0];

/// The shade of a cell whose load is `ratio` times the layer mean.
fn shade(ratio: f64) -> char {
    BOUNDS
        .iter()
        .position(|&b| ratio <= b)
        .map_or(RAMP[RAMP.len() - 1], |i| RAMP[i])
}

/// Renders `layers` (layer id, per-expert counts) as a heatmap at most `width` cells wide (at
/// least 1). Cells merge `ceil(experts / width)` adjacent experts and show their mean load.
pub fn render_heatmap(layers: &[(u32, Vec<u64>)], width: usize) -> String {
    let mut out = String::new();
    let experts = layers.iter().map(|(_, c)| c.len()).max().unwrap_or(0);
    if experts == 0 {
        out.push_str("no expert counts yet\n");
        return out;
    }
    let per_cell = experts.div_ceil(width.max(1));
    let cells = experts.div_ceil(per_cell);
    let _ = writeln!(
        out,
        "expert load / layer mean, {experts} experts, {per_cell} per cell",
    );
    let _ = writeln!(
        out,
        "legend: ' ' 0  '.' ≤0.25  ':' ≤0.5  '-' ≤0.8  '=' ≤1.25  '+' ≤1.5  '*' ≤2  '#' ≤3  '%' ≤4  '@' >4"
    );
    // An axis with a tick every 10 cells.
    let mut axis = String::from("      ");
    for c in 0..cells {
        axis.push(if c % 10 == 0 { '|' } else { ' ' });
    }
    let _ = writeln!(out, "{}", axis.trim_end());
    for (layer, counts) in layers {
        let total: u64 = counts.iter().sum();
        let mean = if counts.is_empty() {
            0.0
        } else {
            total as f64 / counts.len() as f64
        };
        let mut row = String::with_capacity(cells + 24);
        for chunk in counts.chunks(per_cell) {
            let cell_mean = chunk.iter().sum::<u64>() as f64 / chunk.len() as f64;
            row.push(if mean == 0.0 {
                ' '
            } else {
                shade(cell_mean / mean)
            });
        }
        let max = counts.iter().copied().max().unwrap_or(0);
        let ratio = if mean == 0.0 {
            "-".to_string()
        } else {
            format!("{:.2}", max as f64 / mean)
        };
        let _ = writeln!(out, "L{layer:>3} [{row:<cells$}] max/mean {ratio}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_heatmap_is_exact() {
        // Layer 3: total 32, mean 4 → ratios 0, 0.25, 1, 2.5, 4, 0, 0.25, 0.
        let s = render_heatmap(&[(3, vec![0, 1, 4, 10, 16, 0, 1, 0]), (61, vec![0; 8])], 80);
        let rows: Vec<&str> = s.lines().collect();
        assert_eq!(rows[0], "expert load / layer mean, 8 experts, 1 per cell");
        assert_eq!(rows[2], "      |");
        assert_eq!(rows[3], "L  3 [ .=#% . ] max/mean 4.00");
        assert_eq!(rows[4], "L 61 [        ] max/mean -");
        assert_eq!(rows.len(), 5);
    }

    #[test]
    fn wide_layers_merge_adjacent_experts() {
        // 256 experts into at most 100 columns: 3 per cell, 86 cells; expert 0 alone is hot.
        let mut counts = vec![10u64; 256];
        counts[0] = 10 + 256 * 10;
        let s = render_heatmap(&[(7, counts)], 100);
        let row = s.lines().nth(3).unwrap();
        let cells = &row[row.find('[').unwrap() + 1..row.find(']').unwrap()];
        assert_eq!(cells.chars().count(), 86);
        // Cell 0 holds experts 0..3: mean (2570 + 20) / 3 ≈ 863 against the layer mean 20 → '@'.
        assert!(cells.starts_with('@'), "{row}");
        // Other cells hold 10 against a mean of 20: ratio 0.5 → ':'.
        assert!(cells[1..].chars().all(|c| c == ':'), "{row}");
        assert!(row.ends_with("max/mean 128.50"), "{row}");
        assert_eq!(render_heatmap(&[], 80), "no expert counts yet\n");
    }

    #[test]
    fn experts_text_shows_the_latest_step_and_the_worst_layer_history() {
        let resp = pb::ExpertLoadsResponse {
            job: Some(pb::Job {
                name: "tiny".into(),
                ..Default::default()
            }),
            step: Some(7),
            layers: vec![pb::LayerExpertCounts {
                layer: 3,
                counts: vec![0, 1, 4, 10, 16, 0, 1, 0],
            }],
            history: vec![pb::StepLayerLoads {
                step: 7,
                layers: vec![
                    pb::LayerLoad {
                        layer: 3,
                        max: 16,
                        mean: 4.0,
                    },
                    pb::LayerLoad {
                        layer: 4,
                        max: 5,
                        mean: 4.0,
                    },
                ],
            }],
        };
        let text = experts_text(&cc::ExpertLoadsView::from(&resp), 80);
        let rows: Vec<&str> = text.lines().collect();
        assert_eq!(rows[0], "job tiny, step 7");
        assert_eq!(rows[4], "L  3 [ .=#% . ] max/mean 4.00");
        assert_eq!(rows.last().copied(), Some("  step      7  4.00 (layer 3)"));
        let empty = pb::ExpertLoadsResponse {
            job: resp.job.clone(),
            ..Default::default()
        };
        assert_eq!(
            experts_text(&cc::ExpertLoadsView::from(&empty), 80),
            "job tiny: no finished step with expert counts yet\n"
        );
    }
}
