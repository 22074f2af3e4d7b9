//! The coordinator's routing-bias ledger (issue 7) on small hand-made jobs: report validation
//! (each refusal names the rank and what was wrong and leaves the ledger unchanged), the sign rule
//! and γ schedule, arrival-order independence, pre-summing, bounded telemetry, checksums and the
//! wire conversion.

use coordinator::balance::{
    BalanceConfig, BalanceError, BiasLedger, GammaSchedule, LayerCounts, LayerHolders,
    UpdateVariant, bias_update_message, counts_from_report, layer_checksum, layers_from_update,
    presum, rank_checksum,
};
use proto::pb;

fn config(rate: f32, until: Option<u64>) -> BalanceConfig {
    BalanceConfig {
        experts: 4,
        gamma: GammaSchedule {
            rate,
            until_tokens: until,
        },
        variant: UpdateVariant::Sign,
        tokens_per_step: 100,
        history: 3,
    }
}

/// Layer 1 is held by ranks 0 and 1, layer 2 by ranks 1 and 2.
fn holders() -> Vec<LayerHolders> {
    vec![
        LayerHolders {
            layer: 2,
            holders: vec![1, 2],
        },
        LayerHolders {
            layer: 1,
            holders: vec![0, 1],
        },
    ]
}

fn lc(layer: u32, counts: [u64; 4]) -> LayerCounts {
    LayerCounts {
        layer,
        counts: counts.to_vec(),
    }
}

#[test]
fn one_step_sums_every_holder_and_applies_the_sign_rule() {
    let mut l = BiasLedger::new(config(0.5, None), &holders()).unwrap();
    assert_eq!(l.layers(), &[1, 2]);
    assert_eq!(l.layers_of(1), vec![1, 2]);
    assert!(l.ingest(0, 0, &[lc(1, [3, 1, 0, 0])]).unwrap().is_none());
    assert!(l.ingest(2, 0, &[lc(2, [0, 0, 0, 4])]).unwrap().is_none());
    assert_eq!(l.missing(), vec![1]);
    let b = l
        .ingest(1, 0, &[lc(2, [0, 0, 4, 0]), lc(1, [1, 1, 1, 1])])
        .unwrap()
        .expect("all holders reported");
    // Layer 1: loads 4, 2, 1, 1 (mean 2) → −γ, 0, +γ, +γ. Layer 2: 0, 0, 4, 4 (mean 2).
    assert_eq!(b.step, 0);
    assert_eq!(b.layers[0], (1, vec![-0.5, 0.0, 0.5, 0.5]));
    assert_eq!(b.layers[1], (2, vec![0.5, 0.5, -0.5, -0.5]));
    assert_eq!(l.version(), Some(0));
    assert_eq!(l.collecting(), 1);
    assert_eq!(l.tokens_seen(), 100);
    let h: Vec<_> = l.history().collect();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].layers[0].counts, vec![4, 2, 1, 1]);
    assert_eq!((h[0].layers[0].max, h[0].layers[0].mean), (4, 2.0));
    assert_eq!(h[0].worst_imbalance(), 2.0);
    assert_eq!(b.subset(&[2]), vec![(2, &[0.5f32, 0.5, -0.5, -0.5][..])]);
}

#[test]
fn refused_reports_name_the_rank_and_change_nothing() {
    let mut l = BiasLedger::new(config(0.5, None), &holders()).unwrap();
    let cases: Vec<(u32, u64, Vec<LayerCounts>, &str)> = vec![
        (0, 0, vec![lc(2, [1, 1, 1, 1])], "does not hold"),
        (0, 0, vec![lc(7, [1, 1, 1, 1])], "not a MoE layer"),
        (
            0,
            0,
            vec![LayerCounts {
                layer: 1,
                counts: vec![1, 2, 3],
            }],
            "3 expert counts, expected 4",
        ),
        (0, 0, vec![], "holds [1]"),
        (
            1,
            0,
            vec![lc(1, [1, 1, 1, 1]), lc(1, [1, 1, 1, 1])],
            "reported twice",
        ),
        (
            0,
            1,
            vec![lc(1, [1, 1, 1, 1])],
            "before step 0 was complete",
        ),
        (9, 0, vec![lc(1, [1, 1, 1, 1])], "rank 9 holds no MoE layer"),
    ];
    for (rank, step, counts, want) in cases {
        let e = l.ingest(rank, step, &counts).unwrap_err().to_string();
        assert!(e.contains(want), "{e:?} should mention {want:?}");
        assert!(e.contains(&format!("rank {rank}")), "{e:?} names the rank");
    }
    assert_eq!(l.missing(), vec![0, 1, 2], "nothing was taken");
    l.ingest(0, 0, &[lc(1, [1, 1, 1, 1])]).unwrap();
    let dup = l.ingest(0, 0, &[lc(1, [1, 1, 1, 1])]).unwrap_err();
    assert_eq!(dup, BalanceError::Duplicate { rank: 0, step: 0 });
    l.ingest(2, 0, &[lc(2, [1, 1, 1, 1])]).unwrap();
    l.ingest(1, 0, &[lc(1, [1, 1, 1, 1]), lc(2, [1, 1, 1, 1])])
        .unwrap()
        .unwrap();
    let stale = l.ingest(2, 0, &[lc(2, [1, 1, 1, 1])]).unwrap_err();
    assert_eq!(
        stale,
        BalanceError::Stale {
            rank: 2,
            step: 0,
            expected: 1
        }
    );
    // An overflowing sum is refused and undone.
    let mut l2 = BiasLedger::new(config(0.5, None), &holders()).unwrap();
    l2.ingest(0, 0, &[lc(1, [u64::MAX, 0, 0, 0])]).unwrap();
    let e = l2
        .ingest(1, 0, &[lc(2, [5, 5, 5, 5]), lc(1, [1, 0, 0, 0])])
        .unwrap_err();
    assert_eq!(
        e,
        BalanceError::Overflow {
            step: 0,
            layer: 1,
            expert: 0
        }
    );
    l2.ingest(1, 0, &[lc(2, [5, 5, 5, 5]), lc(1, [0, 0, 0, 0])])
        .unwrap();
    let b = l2.ingest(2, 0, &[lc(2, [0, 0, 0, 0])]).unwrap().unwrap();
    assert_eq!(
        l2.history().last().unwrap().layers[1].counts,
        vec![5, 5, 5, 5],
        "the refused report's additions were undone"
    );
    assert_eq!(b.layers[1].1, vec![0.0; 4]);
}

#[test]
fn arrival_order_and_pre_summing_do_not_change_a_bit() {
    // Eight ranks route layer 5; four of them also layer 6. Counts are arbitrary but fixed.
    let counts = |r: u32, layer: u32| -> Vec<u64> {
        (0..4)
            .map(|e| u64::from((r * 7 + layer * 3 + e * 5) % 11))
            .collect()
    };
    let hs = vec![
        LayerHolders {
            layer: 5,
            holders: (0..8).collect(),
        },
        LayerHolders {
            layer: 6,
            holders: (0..4).collect(),
        },
    ];
    let report = |r: u32| -> Vec<LayerCounts> {
        let mut v = vec![LayerCounts {
            layer: 5,
            counts: counts(r, 5),
        }];
        if r < 4 {
            v.push(LayerCounts {
                layer: 6,
                counts: counts(r, 6),
            });
        }
        v
    };
    let run = |order: &[u32]| {
        let mut l = BiasLedger::new(config(0.25, None), &hs).unwrap();
        let mut out = None;
        for &r in order {
            out = l.ingest(r, 0, &report(r)).unwrap();
        }
        out.unwrap()
    };
    let a = run(&[0, 1, 2, 3, 4, 5, 6, 7]);
    let b = run(&[7, 3, 5, 0, 6, 2, 4, 1]);
    assert_eq!(a, b);
    // Pre-summed: ranks 0..4 (both layers) send one report as rank 0, ranks 4..8 as rank 4.
    let g0: Vec<Vec<LayerCounts>> = (0..4).map(report).collect();
    let g1: Vec<Vec<LayerCounts>> = (4..8).map(report).collect();
    let s0 = presum(&g0.iter().map(Vec::as_slice).collect::<Vec<_>>()).unwrap();
    let s1 = presum(&g1.iter().map(Vec::as_slice).collect::<Vec<_>>()).unwrap();
    let grouped = vec![
        LayerHolders {
            layer: 5,
            holders: vec![0, 4],
        },
        LayerHolders {
            layer: 6,
            holders: vec![0],
        },
    ];
    let mut l = BiasLedger::new(config(0.25, None), &grouped).unwrap();
    assert!(l.ingest(4, 0, &s1).unwrap().is_none());
    let c = l.ingest(0, 0, &s0).unwrap().unwrap();
    assert_eq!(a, c);
    assert!(presum(&[&report(0), &report(5)]).is_err());
}

#[test]
fn gamma_schedule_variant_and_bounded_history() {
    // γ = 1 while fewer than 200 tokens were trained: steps 0 and 1 move, step 2 does not.
    let hs = [LayerHolders {
        layer: 3,
        holders: vec![0],
    }];
    let mut l = BiasLedger::new(config(1.0, Some(200)), &hs).unwrap();
    let mut biases = Vec::new();
    for step in 0..5 {
        let b = l.ingest(0, step, &[lc(3, [6, 2, 0, 0])]).unwrap().unwrap();
        biases.push(b.layers[0].1.clone());
        assert_eq!(b.gamma, if step < 2 { 1.0 } else { 0.0 });
    }
    assert_eq!(biases[1], vec![-2.0, 0.0, 2.0, 2.0]);
    assert_eq!(biases[4], biases[1], "frozen after 200 tokens");
    let steps: Vec<u64> = l.history().map(|s| s.step).collect();
    assert_eq!(steps, vec![2, 3, 4], "history keeps the last 3 steps");
    // The mean-subtracted variant keeps the bias centred.
    let mut cfg = config(1.0, None);
    cfg.variant = UpdateVariant::SignMeanSubtracted;
    let mut l = BiasLedger::new(cfg, &hs).unwrap();
    let b = l.ingest(0, 0, &[lc(3, [6, 2, 0, 0])]).unwrap().unwrap();
    // Loads 6, 2, 0, 0 (mean 2) → −1, 0, +1, +1, minus their mean 0.25.
    assert_eq!(b.layers[0].1, vec![-1.25, -0.25, 0.75, 0.75]);
    // Resuming from a checkpoint continues the version and the γ schedule.
    let mut r = BiasLedger::new(config(1.0, Some(200)), &hs).unwrap();
    r.restore(1, 200, &[(3, vec![-2.0, 0.0, 2.0, 2.0])])
        .unwrap();
    assert_eq!((r.version(), r.collecting()), (Some(1), 2));
    let b = r.ingest(0, 2, &[lc(3, [6, 2, 0, 0])]).unwrap().unwrap();
    assert_eq!(b.gamma, 0.0);
    assert!(r.restore(1, 0, &[(4, vec![0.0; 4])]).is_err());
    assert!(
        BiasLedger::new(
            config(1.0, None),
            &[LayerHolders {
                layer: 1,
                holders: vec![]
            }]
        )
        .is_err()
    );
}

#[test]
fn checksums_catch_a_single_flipped_bit_and_name_rank_and_layer() {
    let mut l = BiasLedger::new(config(0.5, None), &holders()).unwrap();
    l.ingest(0, 0, &[lc(1, [3, 1, 0, 0])]).unwrap();
    l.ingest(2, 0, &[lc(2, [0, 0, 0, 4])]).unwrap();
    let b = l
        .ingest(1, 0, &[lc(2, [0, 0, 4, 0]), lc(1, [1, 1, 1, 1])])
        .unwrap()
        .unwrap();
    // Every holder computes its checksums from what it received.
    for rank in 0..3 {
        let mine = b.subset(&l.layers_of(rank));
        let sums: Vec<(u32, u64)> = mine.iter().map(|(l, v)| (*l, layer_checksum(v))).collect();
        l.verify_checksums(1, rank, &sums).unwrap();
        l.verify_rank_checksum(1, rank, rank_checksum(mine))
            .unwrap();
    }
    // Rank 1's layer-2 bias has one flipped bit.
    let mut bad = b.layers[1].1.clone();
    bad[3] = f32::from_bits(bad[3].to_bits() ^ 1);
    let sums = [
        (1, layer_checksum(&b.layers[0].1)),
        (2, layer_checksum(&bad)),
    ];
    let e = l.verify_checksums(1, 1, &sums).unwrap_err();
    assert_eq!(
        e,
        BalanceError::ChecksumMismatch {
            step: 1,
            rank: 1,
            layer: 2,
            expected: layer_checksum(&b.layers[1].1),
            got: layer_checksum(&bad),
        }
    );
    println!("caught: {e}");
    assert!(
        l.verify_rank_checksum(
            1,
            1,
            rank_checksum([(1, &b.layers[0].1[..]), (2, &bad[..])])
        )
        .is_err()
    );
    assert!(
        l.verify_checksums(1, 1, &sums[..1])
            .unwrap_err()
            .to_string()
            .contains("holds [1, 2]")
    );
    assert!(matches!(
        l.verify_checksums(0, 1, &sums),
        Err(BalanceError::Stale { .. })
    ));
}

#[test]
fn wire_round_trip_keeps_every_bit() {
    let report = pb::StepReport {
        rank: 1,
        step: 0,
        expert_counts: vec![
            pb::ExpertCounts {
                layer: 2,
                counts: vec![0, 0, 4, 0],
            },
            pb::ExpertCounts {
                layer: 1,
                counts: vec![1, 1, 1, 1],
            },
        ],
        ..Default::default()
    };
    let counts = counts_from_report(&report);
    assert_eq!(counts, vec![lc(2, [0, 0, 4, 0]), lc(1, [1, 1, 1, 1])]);
    let mut l = BiasLedger::new(config(0.001, None), &holders()).unwrap();
    l.ingest(0, 0, &[lc(1, [3, 1, 0, 0])]).unwrap();
    l.ingest(2, 0, &[lc(2, [0, 0, 0, 4])]).unwrap();
    let b = l.ingest(1, 0, &counts).unwrap().unwrap();
    let msg = bias_update_message("job-a", &b, Some(&[2]));
    let bytes = proto::encode(&msg);
    let back: pb::BiasUpdate = proto::decode("bias update", &bytes).unwrap();
    let (step, layers) = layers_from_update(&back);
    assert_eq!(step, 0);
    assert_eq!(layers.len(), 1);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&layers[0].1), bits(l.bias(2).unwrap()));
    assert_eq!(bias_update_message("job-a", &b, None).layers.len(), 2);
}
