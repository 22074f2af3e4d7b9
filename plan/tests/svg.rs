//! SVG timeline tests: one coloured box per compute op (two halves for an overlapped pair), a legend
//! naming every op kind, micro-batch labels, and well-formed markup (the XML-special `&` is escaped).

use plan::schedule::{Op, dualpipe};
use plan::sim::{Costs, SimConfig, simulate};
use plan::svg::{SvgOptions, render};

#[test]
fn timeline_has_a_box_per_op_and_a_legend() {
    let s = dualpipe(4, 8).expect("valid");
    let rep = simulate(&s, &SimConfig::with_costs(Costs::unit())).expect("runs");
    let svg = render(&s, &rep, &SvgOptions::default());
    assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
    let pairs: usize = (0..4).map(|r| s.counts(r).overlapped as usize).sum();
    let singles: usize = (0..4)
        .map(|r| {
            s.compute_ops(r)
                .filter(|op| !matches!(op, Op::ForwardBackward { .. }))
                .count()
        })
        .sum();
    // Each single op has one titled box; each pair draws two halves and an outline.
    assert_eq!(svg.matches("<title>").count(), singles);
    let rects = svg.matches("<rect").count();
    let background_and_rows_and_legend = 1 + 4 + 10;
    assert_eq!(rects, singles + 3 * pairs + background_and_rows_and_legend);
    for name in [
        "Forward",
        "Backward (full)",
        "Backward for input",
        "Weight gradient",
        "Overlapped F&amp;B",
    ] {
        assert!(svg.contains(name), "legend names {name}");
    }
    assert!(!svg.contains("F&B"), "ampersands are escaped");
    assert!(svg.contains("makespan 26"), "title carries the makespan");
    assert!(svg.contains(">rank 3</text>"));
}
