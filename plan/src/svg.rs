//! SVG timeline of a simulated schedule, in the style of the figures in DeepSeek's report: one row per
//! pipeline rank, one box per compute op coloured by op kind (with a darker shade for direction 1),
//! labelled with its micro-batch, a time axis and a legend.
//!
//! Invariant: pure string building; the picture is a function of the schedule and its simulation, and
//! every box sits exactly at its simulated start and end time.

use std::fmt::Write;

use crate::schedule::{Chunk, Op, Schedule};
use crate::sim::SimReport;

/// Fill colours: `[direction 0, direction 1]` per op kind.
const FORWARD: [&str; 2] = ["#f6b26b", "#e69138"];
const BACKWARD: [&str; 2] = ["#93c47d", "#5f9e45"];
const BACKWARD_INPUT: [&str; 2] = ["#9fc5e8", "#5b9bd5"];
const WEIGHT: [&str; 2] = ["#c9bce6", "#9480c9"];

/// Geometry of the picture.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SvgOptions {
    /// Width of the timeline area in pixels when the step is short; longer steps get at least
    /// `min_px_per_unit` pixels per time unit (so two-digit labels fit), up to `max_width`.
    pub width: f64,
    /// Smallest scale for long steps, in pixels per time unit.
    pub min_px_per_unit: f64,
    /// Widest timeline area in pixels.
    pub max_width: f64,
    /// Height of one rank's row in pixels.
    pub row_height: f64,
}

impl Default for SvgOptions {
    fn default() -> Self {
        Self {
            width: 1200.0,
            min_px_per_unit: 14.0,
            max_width: 6000.0,
            row_height: 30.0,
        }
    }
}

fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn label(c: Chunk) -> String {
    c.mb.to_string()
}

/// Renders the timeline of `schedule` as simulated in `report`.
pub fn render(schedule: &Schedule, report: &SimReport, opts: &SvgOptions) -> String {
    let left = 64.0;
    let top = 44.0;
    let rows = schedule.ranks as f64;
    let span = if report.makespan > 0.0 {
        report.makespan
    } else {
        1.0
    };
    let scale = (opts.width / span).max(opts.min_px_per_unit.min(opts.max_width / span));
    let plot_w = span * scale;
    let rh = opts.row_height;
    let axis_y = top + rows * rh + 4.0;
    let legend_y = axis_y + 30.0;
    let width = left + plot_w + 20.0;
    let height = legend_y + 46.0;
    let font = (rh * 0.42).clamp(8.0, 13.0);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="Helvetica, Arial, sans-serif">"#
    );
    let _ = writeln!(
        s,
        r#"<rect x="0" y="0" width="{width:.0}" height="{height:.0}" fill="white"/>"#
    );
    let title = format!(
        "{} · P = {} · N = {} · {} stages · makespan {} · idle per rank {}",
        schedule.kind.name(),
        schedule.ranks,
        schedule.microbatches,
        schedule.stage_count(),
        fmt_num(report.makespan),
        idle_summary(report),
    );
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="24" font-size="15" font-weight="bold">{}</text>"#,
        esc(&title)
    );

    for (r, rank) in report.ranks.iter().enumerate() {
        let y = top + r as f64 * rh;
        let _ = writeln!(
            s,
            r#"<rect x="{left}" y="{y:.1}" width="{plot_w:.1}" height="{rh:.1}" fill="{}"/>"#,
            if r % 2 == 0 { "#f3f3f3" } else { "#ebebeb" }
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="end" dominant-baseline="middle">rank {r}</text>"#,
            left - 8.0,
            y + rh / 2.0
        );
        for sp in &rank.spans {
            let x = left + sp.start * scale;
            let w = ((sp.end - sp.start) * scale).max(0.5);
            let (y0, h) = (y + 1.5, rh - 3.0);
            match sp.op {
                Op::ForwardBackward { f, b } => {
                    // An overlapped pair: forward on the top half, backward on the bottom half.
                    let half = h / 2.0;
                    let _ = writeln!(
                        s,
                        r#"<rect x="{x:.2}" y="{y0:.2}" width="{w:.2}" height="{half:.2}" fill="{}"/>"#,
                        FORWARD[f.dir as usize & 1]
                    );
                    let _ = writeln!(
                        s,
                        r#"<rect x="{x:.2}" y="{:.2}" width="{w:.2}" height="{half:.2}" fill="{}"/>"#,
                        y0 + half,
                        BACKWARD[b.dir as usize & 1]
                    );
                    let _ = writeln!(
                        s,
                        r##"<rect x="{x:.2}" y="{y0:.2}" width="{w:.2}" height="{h:.2}" fill="none" stroke="#333" stroke-width="0.8"/>"##
                    );
                    let digits = label(f).len().max(label(b).len()) as f64;
                    let pair_font = (font * 0.85).min((w - 2.0) / (0.6 * digits));
                    if pair_font >= 7.0 {
                        let cx = x + w / 2.0;
                        let _ = writeln!(
                            s,
                            r#"<text x="{cx:.2}" y="{:.2}" font-size="{:.1}" text-anchor="middle" dominant-baseline="middle">{}</text>"#,
                            y0 + half / 2.0 + 0.5,
                            pair_font,
                            label(f)
                        );
                        let _ = writeln!(
                            s,
                            r#"<text x="{cx:.2}" y="{:.2}" font-size="{:.1}" text-anchor="middle" dominant-baseline="middle">{}</text>"#,
                            y0 + 1.5 * half + 0.5,
                            pair_font,
                            label(b)
                        );
                    }
                }
                Op::Forward(c) | Op::Backward(c) | Op::BackwardInput(c) | Op::Weight(c) => {
                    let fill = match sp.op {
                        Op::Forward(_) => FORWARD,
                        Op::Backward(_) => BACKWARD,
                        Op::BackwardInput(_) => BACKWARD_INPUT,
                        _ => WEIGHT,
                    }[c.dir as usize & 1];
                    let _ = writeln!(
                        s,
                        r##"<rect x="{x:.2}" y="{y0:.2}" width="{w:.2}" height="{h:.2}" fill="{fill}" stroke="#333" stroke-width="0.8"><title>{}</title></rect>"##,
                        esc(&sp.op.to_string())
                    );
                    let text = label(c);
                    // Shrink the label to fit the box; leave it out below a readable size.
                    let fit = font.min((w - 2.0) / (0.6 * text.len() as f64));
                    if fit >= 7.0 {
                        let _ = writeln!(
                            s,
                            r#"<text x="{:.2}" y="{:.2}" font-size="{fit:.1}" text-anchor="middle" dominant-baseline="middle">{text}</text>"#,
                            x + w / 2.0,
                            y0 + h / 2.0 + 0.5
                        );
                    }
                }
                Op::Send(_) | Op::Recv(_) => {}
            }
        }
    }

    // Time axis with about ten ticks at round numbers.
    let step = nice_step(span / 10.0);
    let _ = writeln!(
        s,
        r##"<line x1="{left}" y1="{axis_y:.1}" x2="{:.1}" y2="{axis_y:.1}" stroke="#333"/>"##,
        left + plot_w
    );
    let mut t = 0.0;
    while t <= span + 1e-9 {
        let x = left + t * scale;
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{axis_y:.1}" x2="{x:.1}" y2="{:.1}" stroke="#333"/>"##,
            axis_y + 5.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"#,
            axis_y + 17.0,
            fmt_num(t)
        );
        t += step;
    }

    // Legend.
    let items: [(&str, &str, &str); 5] = [
        ("Forward", FORWARD[0], FORWARD[1]),
        ("Backward (full)", BACKWARD[0], BACKWARD[1]),
        ("Backward for input", BACKWARD_INPUT[0], BACKWARD_INPUT[1]),
        ("Weight gradient", WEIGHT[0], WEIGHT[1]),
        ("Overlapped F&B (top F, bottom B)", FORWARD[0], BACKWARD[0]),
    ];
    let mut x = left;
    for (name, c0, c1) in items {
        let _ = writeln!(
            s,
            r##"<rect x="{x:.1}" y="{legend_y:.1}" width="14" height="14" fill="{c0}" stroke="#333" stroke-width="0.8"/>"##
        );
        let _ = writeln!(
            s,
            r##"<rect x="{:.1}" y="{legend_y:.1}" width="14" height="14" fill="{c1}" stroke="#333" stroke-width="0.8"/>"##,
            x + 15.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="12">{}</text>"#,
            x + 35.0,
            legend_y + 11.5,
            esc(name)
        );
        x += 45.0 + 7.0 * name.len() as f64;
    }
    let note = if schedule.chunks_per_rank() == 2 {
        "left swatch: direction 0, right swatch: direction 1; numbers are micro-batches"
    } else {
        "numbers are micro-batches"
    };
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="{:.1}" font-size="11" fill="#555">{note}</text>"##,
        legend_y + 32.0
    );
    s.push_str("</svg>\n");
    s
}

fn idle_summary(report: &SimReport) -> String {
    let min = report
        .ranks
        .iter()
        .map(|r| r.idle)
        .fold(f64::INFINITY, f64::min);
    let max = report.max_idle();
    if report.ranks.is_empty() {
        "-".into()
    } else if (max - min).abs() < 1e-9 {
        fmt_num(max)
    } else {
        format!("{}–{}", fmt_num(min), fmt_num(max))
    }
}

/// Formats a time without trailing zeros.
fn fmt_num(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        format!("{v:.2}")
    }
}

/// A round step (1, 2 or 5 times a power of ten) of at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * mag)
}
