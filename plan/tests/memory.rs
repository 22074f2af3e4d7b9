//! Memory-estimate tests: the stage split, the 2× parameters of DualPipe, ZeRO-1 sharding over the
//! data-parallel ranks (experts over their expert-data-parallel ranks), and activations at the
//! simulator's peak (PP + 1 chunks for DualPipe).

use plan::memory::{
    LayerShape, MemoryError, ModelShape, Precision, Sharding, estimate, split_layers,
};
use plan::schedule::ScheduleKind;
use plan::sim::Costs;

fn uniform(layers: usize) -> ModelShape {
    let layer = LayerShape {
        dense_params: 1_000,
        expert_params: 64_000,
        activation_bytes: 500,
    };
    ModelShape {
        pre: LayerShape::default(),
        layers: vec![layer; layers],
        post: LayerShape::default(),
    }
}

#[test]
fn layers_split_evenly_with_the_remainder_inside() {
    let r = split_layers(61, 16);
    assert_eq!(r.len(), 16);
    assert_eq!(r[0].start, 0);
    assert_eq!(r[15].end, 61);
    assert!(r.windows(2).all(|w| w[0].end == w[1].start));
    assert_eq!(r[0].len(), 3, "the embedding stage gets no extra layer");
    assert_eq!(r[15].len(), 3, "the head stage gets no extra layer");
    // 61 = 16 × 3 + 13: thirteen of the fourteen inner stages get a fourth layer.
    assert_eq!(r[1..15].iter().filter(|x| x.len() == 4).count(), 13);
    assert!(r.iter().all(|x| x.len() == 3 || x.len() == 4));
    assert_eq!(
        split_layers(8, 8)
            .iter()
            .map(|x| x.len())
            .collect::<Vec<_>>(),
        vec![1; 8]
    );
}

#[test]
fn dualpipe_holds_twice_the_parameters_of_1f1b() {
    let shape = uniform(16);
    let sh = Sharding { data: 8, expert: 4 };
    let p = Precision::v3_mixed();
    let one = estimate(ScheduleKind::OneFOneB, 8, 16, &shape, p, sh, Costs::unit()).expect("fits");
    let dual = estimate(ScheduleKind::DualPipe, 8, 16, &shape, p, sh, Costs::unit()).expect("fits");
    let v = estimate(ScheduleKind::DualPipeV, 8, 16, &shape, p, sh, Costs::unit()).expect("fits");
    for r in 0..8 {
        let (o, d, vv) = (&one.per_rank[r], &dual.per_rank[r], &v.per_rank[r]);
        assert_eq!(d.params_bytes, 2 * o.params_bytes, "rank {r}");
        assert_eq!(d.grad_bytes, 2 * o.grad_bytes, "rank {r}");
        // DualPipeV cuts 2P stages of half the size: the same parameters per rank as 1F1B.
        assert_eq!(vv.params_bytes, o.params_bytes, "rank {r}");
    }
    // One 1F1B stage: 2 layers × (1000 dense + 64000 / 4 experts) × 2 bytes.
    assert_eq!(one.per_rank[0].params_bytes, 2 * (1_000 + 16_000) * 2);
    // ZeRO-1: (1000 + 64000) × 2 layers / D = 8 ranks × 8 bytes.
    assert_eq!(one.per_rank[0].optimizer_bytes, 2 * 65_000 / 8 * 8);
    // Activations: DualPipe keeps PP + 1 = 9 chunks of 2 layers × 500 bytes at its peak; 1F1B rank 0 keeps PP.
    assert_eq!(dual.per_rank[0].activation_bytes, 9 * 1_000);
    assert_eq!(one.per_rank[0].activation_bytes, 8 * 1_000);
    assert_eq!(dual.max_idle, 3.0 * 2.0, "(PP/2 − 1)(F&B + B − 3W) = 3 × 2");
    let peak = dual.peak_rank().expect("ranks");
    assert_eq!(
        peak.total_bytes(),
        peak.params_bytes + peak.grad_bytes + peak.optimizer_bytes + peak.activation_bytes
    );
}

#[test]
fn bad_inputs_are_named() {
    let shape = uniform(4);
    let p = Precision::fp32();
    let err = estimate(
        ScheduleKind::DualPipeV,
        4,
        8,
        &shape,
        p,
        Sharding { data: 2, expert: 1 },
        Costs::unit(),
    )
    .expect_err("8 stages from 4 layers");
    assert!(
        matches!(
            err,
            MemoryError::TooFewLayers {
                stages: 8,
                layers: 4,
                ..
            }
        ),
        "{err}"
    );
    let err = estimate(
        ScheduleKind::OneFOneB,
        2,
        4,
        &shape,
        p,
        Sharding { data: 6, expert: 4 },
        Costs::unit(),
    )
    .expect_err("E must divide D");
    assert!(err.to_string().contains("expert must divide data"), "{err}");
    let err = estimate(
        ScheduleKind::DualPipe,
        3,
        6,
        &shape,
        p,
        Sharding { data: 1, expert: 1 },
        Costs::unit(),
    )
    .expect_err("odd P");
    assert!(err.to_string().contains("even number of ranks"), "{err}");
}
