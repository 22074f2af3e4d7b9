//! Snapshot tests: the compact op lists of DualPipe (4, 8), (4, 10) and DualPipeV (4, 10) equal the
//! worked examples of v3-spec §5.4, converted by hand-checked rules (`F7` → `F<d>:7`, `b` → `I`,
//! `[F3+B5]` → `F0:3+B1:5`, DualPipeV `3a`/`3b` → direction 0/1), and the line quoted by issue 5.
//!
//! Invariant: these literals come from the spec, never from the generator's output.

use expect_test::expect;
use plan::schedule::{dualpipe, dualpipev};

#[test]
fn issue_5_rank_0_line() {
    let s = dualpipe(4, 8).expect("valid size");
    assert_eq!(
        s.compact_rank(0),
        "rank 0: F0:0 F0:1 F0:2 F1:4 I1:4 W1:4 F1:5 F0:3+B1:5 F1:6+B0:0 B1:6 F1:7+B0:1 B1:7 I0:2 W0:2 I0:3 W0:3"
    );
}

#[test]
fn dualpipe_4_8_matches_spec_5_4() {
    expect![[r#"
        rank 0: F0:0 F0:1 F0:2 F1:4 I1:4 W1:4 F1:5 F0:3+B1:5 F1:6+B0:0 B1:6 F1:7+B0:1 B1:7 I0:2 W0:2 I0:3 W0:3
        rank 1: F0:0 F1:4 F0:1 F1:5 F0:2 B1:4 F1:6+B0:0 F0:3+B1:5 F1:7+B0:1 B1:6 B0:2 I1:7 I0:3 W1:7 W0:3
        rank 2: F1:4 F0:0 F1:5 F0:1 F1:6 B0:0 F0:2+B1:4 F1:7+B0:1 F0:3+B1:5 B0:2 B1:6 I0:3 I1:7 W0:3 W1:7
        rank 3: F1:4 F1:5 F1:6 F0:0 I0:0 W0:0 F0:1 F1:7+B0:1 F0:2+B1:4 B0:2 F0:3+B1:5 B0:3 I1:6 W1:6 I1:7 W1:7
    "#]]
    .assert_eq(&dualpipe(4, 8).expect("valid size").compact());
}

#[test]
fn dualpipe_4_10_matches_spec_5_4() {
    expect![[r#"
        rank 0: F0:0 F0:1 F0:2 F1:5 I1:5 W1:5 F1:6 F0:3+B1:6 F1:7+B0:0 F0:4+B1:7 F1:8+B0:1 B1:8 F1:9+B0:2 B1:9 I0:3 W0:3 I0:4 W0:4
        rank 1: F0:0 F1:5 F0:1 F1:6 F0:2 B1:5 F1:7+B0:0 F0:3+B1:6 F1:8+B0:1 F0:4+B1:7 F1:9+B0:2 B1:8 B0:3 I1:9 I0:4 W1:9 W0:4
        rank 2: F1:5 F0:0 F1:6 F0:1 F1:7 B0:0 F0:2+B1:5 F1:8+B0:1 F0:3+B1:6 F1:9+B0:2 F0:4+B1:7 B0:3 B1:8 I0:4 I1:9 W0:4 W1:9
        rank 3: F1:5 F1:6 F1:7 F0:0 I0:0 W0:0 F0:1 F1:8+B0:1 F0:2+B1:5 F1:9+B0:2 F0:3+B1:6 B0:3 F0:4+B1:7 B0:4 I1:8 W1:8 I1:9 W1:9
    "#]]
    .assert_eq(&dualpipe(4, 10).expect("valid size").compact());
}

#[test]
fn dualpipev_4_10_matches_spec_5_6() {
    expect![[r#"
        rank 0: F0:0 F0:1 F0:2 F0:3 F0:4 F0:5 F0:6 F1:0 I1:0 W1:0 F1:1 I1:1 W1:1 F1:2 I1:2 W1:2 F1:3 F0:7+B1:3 F1:4+B0:0 F0:8+B1:4 F1:5+B0:1 F0:9+B1:5 F1:6+B0:2 B1:6 F1:7+B0:3 B1:7 F1:8+B0:4 B1:8 F1:9+B0:5 B1:9 I0:6 W0:6 I0:7 W0:7 I0:8 W0:8 I0:9 W0:9
        rank 1: F0:0 F0:1 F0:2 F0:3 F0:4 F1:0 F0:5 F1:1 I1:0 W1:0 F1:2 I1:1 W1:1 F1:3 F0:6+B1:2 F1:4+B0:0 F0:7+B1:3 F1:5+B0:1 F0:8+B1:4 F1:6+B0:2 F0:9+B1:5 F1:7+B0:3 B1:6 F1:8+B0:4 B1:7 F1:9+B0:5 B1:8 B0:6 I1:9 I0:7 W1:9 I0:8 W0:7 I0:9 W0:8 W0:9
        rank 2: F0:0 F0:1 F0:2 F1:0 F0:3 F1:1 F0:4 F1:2 I1:0 W1:0 F1:3 F0:5+B1:1 F1:4+B0:0 F0:6+B1:2 F1:5+B0:1 F0:7+B1:3 F1:6+B0:2 F0:8+B1:4 F1:7+B0:3 F0:9+B1:5 F1:8+B0:4 B1:6 F1:9+B0:5 B1:7 B0:6 B1:8 I0:7 I1:9 I0:8 W0:7 I0:9 W1:9 W0:8 W0:9
        rank 3: F0:0 F1:0 F0:1 F1:1 F0:2 F1:2 F0:3 F1:3 F0:4 B1:0 F1:4+B0:0 F0:5+B1:1 F1:5+B0:1 F0:6+B1:2 F1:6+B0:2 F0:7+B1:3 F1:7+B0:3 F0:8+B1:4 F1:8+B0:4 F0:9+B1:5 F1:9+B0:5 B1:6 B0:6 B1:7 B0:7 I1:8 I0:8 I1:9 I0:9 W1:8 W0:8 W1:9 W0:9
    "#]]
    .assert_eq(&dualpipev(4, 10).expect("valid size").compact());
}
