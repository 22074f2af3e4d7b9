//! Snapshot tests of `plan::placement::place` on small clusters, plus checks that
//! `Placement::verify` catches broken placements and that the V3-scale layout keeps the rules.
//!
//! Invariant: every snapshot is produced by `place` and passes `verify` before it is compared.

use std::collections::HashSet;

use expect_test::{Expect, expect};
use plan::ids::DeviceIdx;
use plan::parallel::ParallelConfig;
use plan::placement::{ExpertLayout, Placement, PlacementError, PlacementRequest, place};
use plan::schedule::ScheduleKind;
use plan::topology::{Cluster, Node};

fn request(
    (pipeline, data, expert): (u32, u32, u32),
    schedule: ScheduleKind,
    (n_routed_experts, n_group): (u32, u32),
) -> PlacementRequest {
    PlacementRequest {
        parallel: ParallelConfig::new(pipeline, data, expert).unwrap(),
        schedule,
        experts: ExpertLayout {
            n_routed_experts,
            n_group,
        },
    }
}

fn check(req: PlacementRequest, cluster: &Cluster, expect: Expect) -> Placement {
    let placement = place(&req, cluster).unwrap();
    placement.verify(&req, cluster).unwrap();
    expect.assert_eq(&placement.render());
    placement
}

#[test]
fn e2e_layout_two_nodes_of_four() {
    // The end-to-end test's job: DualPipe, pipeline 4, data 2, expert 2 on 2 nodes × 4 devices,
    // with the tiny model's 16 experts in 4 groups.
    let req = request((4, 2, 2), ScheduleKind::DualPipe, (16, 4));
    check(
        req,
        &Cluster::uniform("node-", 2, 4),
        expect![[r#"
            rank node dev pp stages dp epg ep experts groups
            0 node-0 0 0 0,3 0 0 0 0..8 0..2
            1 node-0 1 0 0,3 1 0 1 8..16 2..4
            2 node-0 2 1 1,2 0 0 0 0..8 0..2
            3 node-0 3 1 1,2 1 0 1 8..16 2..4
            4 node-1 0 2 2,1 0 0 0 0..8 0..2
            5 node-1 1 2 2,1 1 0 1 8..16 2..4
            6 node-1 2 3 3,0 0 0 0 0..8 0..2
            7 node-1 3 3 3,0 1 0 1 8..16 2..4
            reason: pipeline 0, ep group 0: on node-0, the fullest node that holds the whole expert-parallel group (4 of 4 devices free)
            reason: pipeline 1, ep group 0: on node-0 with its pipeline neighbour (pipeline 0)
            reason: pipeline 2, ep group 0: on node-1, the fullest node that holds the whole expert-parallel group (4 of 4 devices free)
            reason: pipeline 3, ep group 0: on node-1 with its pipeline neighbour (pipeline 2)
            decision: layout: pipeline 4 × data 2 (expert 2), 8 ranks; 1 expert-parallel groups of 2 ranks per pipeline position
            decision: stages: dualpipe, 4 stages; pipeline rank r holds stages r and 3 − r (mirror ranks r and 3 − r hold the same two stages)
            decision: experts: 16 routed experts in 4 groups of 4; 8 per rank; expert domain = 1 consecutive ep ranks (2 whole groups)
            decision: node-limited routing: each expert domain is kept on one node, so a token routed to topk_group groups reaches at most topk_group nodes
            decision: order: expert-parallel groups are placed pipeline position after pipeline position, each preferring its pipeline neighbour's node, then the fullest node that holds it whole, then the fewest largest nodes
        "#]],
    );
}

#[test]
fn expert_groups_map_to_nodes_when_ep_spans_nodes() {
    // Expert degree 8 over nodes of 4: 16 experts in 2 groups of 8, 2 experts per rank, so an
    // expert domain is 4 ranks = one node, exactly one routing group per node (V3's rule in small).
    let req = request((2, 8, 8), ScheduleKind::OneFOneB, (16, 2));
    check(
        req,
        &Cluster::uniform("n", 4, 4),
        expect![[r#"
            rank node dev pp stages dp epg ep experts groups
            0 n0 0 0 0 0 0 0 0..2 0..1
            1 n0 1 0 0 1 0 1 2..4 0..1
            2 n0 2 0 0 2 0 2 4..6 0..1
            3 n0 3 0 0 3 0 3 6..8 0..1
            4 n1 0 0 0 4 0 4 8..10 1..2
            5 n1 1 0 0 5 0 5 10..12 1..2
            6 n1 2 0 0 6 0 6 12..14 1..2
            7 n1 3 0 0 7 0 7 14..16 1..2
            8 n2 0 1 1 0 0 0 0..2 0..1
            9 n2 1 1 1 1 0 1 2..4 0..1
            10 n2 2 1 1 2 0 2 4..6 0..1
            11 n2 3 1 1 3 0 3 6..8 0..1
            12 n3 0 1 1 4 0 4 8..10 1..2
            13 n3 1 1 1 5 0 5 10..12 1..2
            14 n3 2 1 1 6 0 6 12..14 1..2
            15 n3 3 1 1 7 0 7 14..16 1..2
            reason: pipeline 0, ep group 0: spans 2 nodes (n0, n1), the fewest that hold its 2 expert domains of 4 ranks, each domain on one node
            reason: pipeline 1, ep group 0: spans 2 nodes (n2, n3), the fewest that hold its 2 expert domains of 4 ranks, each domain on one node
            decision: layout: pipeline 2 × data 8 (expert 8), 16 ranks; 1 expert-parallel groups of 8 ranks per pipeline position
            decision: stages: 1f1b, 2 stages; pipeline rank r holds stage r
            decision: experts: 16 routed experts in 2 groups of 8; 2 per rank; expert domain = 4 consecutive ep ranks (1 whole groups)
            decision: node-limited routing: each expert domain is kept on one node, so a token routed to topk_group groups reaches at most topk_group nodes
            decision: order: expert-parallel groups are placed pipeline position after pipeline position, each preferring its pipeline neighbour's node, then the fullest node that holds it whole, then the fewest largest nodes
        "#]],
    );
}

#[test]
fn several_ep_groups_chain_pipeline_neighbours() {
    // Two ep groups per pipeline position, four pipeline ranks, nodes of 4: each node takes two
    // consecutive pipeline positions of one ep group.
    let req = request((4, 4, 2), ScheduleKind::DualPipeV, (8, 4));
    let placement = check(
        req,
        &Cluster::uniform("gpu", 4, 4),
        expect![[r#"
            rank node dev pp stages dp epg ep experts groups
            0 gpu0 0 0 0,7 0 0 0 0..4 0..2
            1 gpu0 1 0 0,7 1 0 1 4..8 2..4
            2 gpu2 0 0 0,7 2 1 0 0..4 0..2
            3 gpu2 1 0 0,7 3 1 1 4..8 2..4
            4 gpu0 2 1 1,6 0 0 0 0..4 0..2
            5 gpu0 3 1 1,6 1 0 1 4..8 2..4
            6 gpu2 2 1 1,6 2 1 0 0..4 0..2
            7 gpu2 3 1 1,6 3 1 1 4..8 2..4
            8 gpu1 0 2 2,5 0 0 0 0..4 0..2
            9 gpu1 1 2 2,5 1 0 1 4..8 2..4
            10 gpu3 0 2 2,5 2 1 0 0..4 0..2
            11 gpu3 1 2 2,5 3 1 1 4..8 2..4
            12 gpu1 2 3 3,4 0 0 0 0..4 0..2
            13 gpu1 3 3 3,4 1 0 1 4..8 2..4
            14 gpu3 2 3 3,4 2 1 0 0..4 0..2
            15 gpu3 3 3 3,4 3 1 1 4..8 2..4
            reason: pipeline 0, ep group 0: on gpu0, the fullest node that holds the whole expert-parallel group (4 of 4 devices free)
            reason: pipeline 0, ep group 1: on gpu2, the fullest node that holds the whole expert-parallel group (4 of 4 devices free)
            reason: pipeline 1, ep group 0: on gpu0 with its pipeline neighbour (pipeline 0)
            reason: pipeline 1, ep group 1: on gpu2 with its pipeline neighbour (pipeline 0)
            reason: pipeline 2, ep group 0: on gpu1, the fullest node that holds the whole expert-parallel group (4 of 4 devices free)
            reason: pipeline 2, ep group 1: on gpu3, the fullest node that holds the whole expert-parallel group (4 of 4 devices free)
            reason: pipeline 3, ep group 0: on gpu1 with its pipeline neighbour (pipeline 2)
            reason: pipeline 3, ep group 1: on gpu3 with its pipeline neighbour (pipeline 2)
            decision: layout: pipeline 4 × data 4 (expert 2), 16 ranks; 2 expert-parallel groups of 2 ranks per pipeline position
            decision: stages: dualpipev, 8 stages; pipeline rank r holds stages r and 7 − r
            decision: experts: 8 routed experts in 4 groups of 2; 4 per rank; expert domain = 1 consecutive ep ranks (2 whole groups)
            decision: node-limited routing: each expert domain is kept on one node, so a token routed to topk_group groups reaches at most topk_group nodes
            decision: order: expert-parallel groups are placed pipeline position after pipeline position, each preferring its pipeline neighbour's node, then the fullest node that holds it whole, then the fewest largest nodes
        "#]],
    );
    let crossings = (1..4)
        .filter(|&p| placement.ranks[p * 4].node != placement.ranks[(p - 1) * 4].node)
        .count();
    assert_eq!(crossings, 1);
}

#[test]
fn fragmented_free_devices_keep_domains_whole() {
    // Free devices left over by other jobs: node a has 3 free, b 1, c 5 (not in name order).
    // Domains are 2 ranks (4 experts in 2 groups over expert degree 4), so b's single device is
    // useless and a holds one domain.
    let cluster = Cluster::new(vec![
        Node {
            name: "c".into(),
            devices: (0..5).map(DeviceIdx).collect(),
        },
        Node {
            name: "a".into(),
            devices: vec![DeviceIdx(0), DeviceIdx(2), DeviceIdx(5)],
        },
        Node {
            name: "b".into(),
            devices: vec![DeviceIdx(7)],
        },
    ])
    .unwrap();
    let req = request((1, 4, 4), ScheduleKind::OneFOneB, (4, 2));
    check(
        req,
        &cluster,
        expect![[r#"
            rank node dev pp stages dp epg ep experts groups
            0 c 0 0 0 0 0 0 0..1 0..1
            1 c 1 0 0 1 0 1 1..2 0..1
            2 c 2 0 0 2 0 2 2..3 1..2
            3 c 3 0 0 3 0 3 3..4 1..2
            reason: pipeline 0, ep group 0: on c, the fullest node that holds the whole expert-parallel group (5 of 5 devices free)
            decision: layout: pipeline 1 × data 4 (expert 4), 4 ranks; 1 expert-parallel groups of 4 ranks per pipeline position
            decision: stages: 1f1b, 1 stages; pipeline rank r holds stage r
            decision: experts: 4 routed experts in 2 groups of 2; 1 per rank; expert domain = 2 consecutive ep ranks (1 whole groups)
            decision: node-limited routing: each expert domain is kept on one node, so a token routed to topk_group groups reaches at most topk_group nodes
            decision: order: expert-parallel groups are placed pipeline position after pipeline position, each preferring its pipeline neighbour's node, then the fullest node that holds it whole, then the fewest largest nodes
        "#]],
    );
    // Eight ranks need four domains of two: c holds two, a one, b none → does not fit.
    let big = request((2, 4, 4), ScheduleKind::OneFOneB, (4, 2));
    let err = place(&big, &cluster).unwrap_err();
    assert_eq!(
        err.to_string(),
        "insufficient capacity: the job needs 8 devices, the cluster can hold 6 (9 devices in 3 nodes, but expert domains of 2 ranks must each sit on one node)"
    );
    // With one expert per group and two per rank, domains are single ranks: the first pair goes
    // to the fullest node that holds it (a, 3 free), the next two follow the pipeline onto c.
    let six = request((3, 2, 2), ScheduleKind::OneFOneB, (4, 2));
    let placement = place(&six, &cluster).unwrap();
    placement.verify(&six, &cluster).unwrap();
    let nodes: Vec<&str> = placement.ranks.iter().map(|r| r.node.as_str()).collect();
    assert_eq!(nodes, vec!["a", "a", "c", "c", "c", "c"]);
}

#[test]
fn oversized_domains_span_nodes_with_a_reason() {
    // One routing group of 8 experts over expert degree 8: the domain is the whole ep group,
    // larger than a node of 4, so node-limited routing cannot hold and the placement says so.
    let req = request((1, 8, 8), ScheduleKind::OneFOneB, (8, 1));
    let cluster = Cluster::uniform("n", 2, 4);
    let placement = place(&req, &cluster).unwrap();
    placement.verify(&req, &cluster).unwrap();
    expect![[r#"
        pipeline 0, ep group 0: spans 2 nodes, the fewest the free devices allow; expert domains of 8 ranks exceed the largest node (4 devices), so routing groups span nodes"#]]
    .assert_eq(&placement.ranks[0].reason);
    assert!(placement.decisions[3].starts_with("node-limited routing relaxed"));
}

#[test]
fn placement_ignores_node_order() {
    let req = request((4, 2, 2), ScheduleKind::DualPipe, (16, 4));
    let forward =
        Cluster::new((0..3).map(|i| Node::uniform(format!("n{i}"), 3)).collect()).unwrap();
    let backward = Cluster::new(
        (0..3)
            .rev()
            .map(|i| Node::uniform(format!("n{i}"), 3))
            .collect(),
    )
    .unwrap();
    let a = place(&req, &forward).unwrap();
    let b = place(&req, &backward).unwrap();
    assert_eq!(a, b);
    a.verify(&req, &forward).unwrap();
}

#[test]
fn verify_catches_broken_placements() {
    let req = request((2, 8, 8), ScheduleKind::OneFOneB, (16, 2));
    let cluster = Cluster::uniform("n", 4, 4);
    let good = place(&req, &cluster).unwrap();

    let mut twice = good.clone();
    twice.ranks[1].device = twice.ranks[0].device;
    let err = twice.verify(&req, &cluster).unwrap_err();
    assert!(
        err.to_string()
            .contains("device 0 of node n0 is used twice"),
        "{err}"
    );

    // Swap two ranks of different domains: devices stay unique but both domains straddle nodes.
    let mut straddle = good.clone();
    let (a, b) = (straddle.ranks[3].clone(), straddle.ranks[4].clone());
    straddle.ranks[3].node = b.node.clone();
    straddle.ranks[3].device = b.device;
    straddle.ranks[4].node = a.node;
    straddle.ranks[4].device = a.device;
    let err = straddle.verify(&req, &cluster).unwrap_err();
    assert_eq!(
        err,
        PlacementError::RuleViolated(vec![
            "the expert domain of pipeline 0, dp 0..4 straddles nodes".into(),
            "the expert domain of pipeline 0, dp 4..8 straddles nodes".into(),
        ])
    );

    let mut stages = good.clone();
    stages.ranks[0].stages.push(plan::ids::StageIdx(1));
    assert!(stages.verify(&req, &cluster).is_err());

    let mut missing = good.clone();
    missing.ranks.pop();
    assert!(missing.verify(&req, &cluster).is_err());

    let mut unknown = good;
    unknown.ranks[5].node = "elsewhere".into();
    assert!(unknown.verify(&req, &cluster).is_err());
}

#[test]
fn v3_scale_layout_keeps_every_rule() {
    // DeepSeek-V3: 2048 GPUs in 256 nodes × 8, pipeline 16, data 128, expert 64, 256 experts in
    // 8 groups: each expert-parallel group spans 8 whole nodes, one routing group per node.
    let req = request((16, 128, 64), ScheduleKind::DualPipe, (256, 8));
    let cluster = Cluster::uniform("node-", 256, 8);
    let placement = place(&req, &cluster).unwrap();
    placement.verify(&req, &cluster).unwrap();
    assert_eq!(req.domain_size(), 8);
    for pipeline in 0..16 {
        for group in 0..2 {
            let ranks: Vec<_> = req.parallel.ep_group_ranks(pipeline, group).collect();
            let nodes: HashSet<&str> = ranks
                .iter()
                .map(|r| placement.ranks[r.index()].node.as_str())
                .collect();
            assert_eq!(nodes.len(), 8);
            for rank in &ranks {
                let entry = &placement.ranks[rank.index()];
                assert_eq!(entry.experts.len(), 4);
                // Expert group g = experts 32g..32g+32 lives on one node, with in-node index = ep % 8.
                assert_eq!(entry.expert_groups, entry.ep / 8..entry.ep / 8 + 1);
                assert_eq!(entry.device, DeviceIdx(entry.ep % 8));
            }
        }
    }
    let used: HashSet<_> = placement
        .ranks
        .iter()
        .map(|r| (r.node.as_str(), r.device))
        .collect();
    assert_eq!(used.len(), 2048);
}

#[test]
fn every_small_layout_places_and_verifies() {
    // Exhaustive over small layouts and cluster shapes: whenever `place` succeeds its answer passes
    // `verify`, and it fails only when the capacity check says the job cannot fit.
    let mut placed = 0;
    for pipeline in 1..=4u32 {
        for data in [1u32, 2, 4, 6, 8] {
            for expert in (1..=data).filter(|e| data % e == 0) {
                for (n_routed_experts, n_group) in [(8u32, 4u32), (16, 2), (24, 8), (48, 3)] {
                    if n_routed_experts % expert != 0 {
                        continue;
                    }
                    for schedule in [
                        ScheduleKind::OneFOneB,
                        ScheduleKind::DualPipe,
                        ScheduleKind::DualPipeV,
                    ] {
                        if schedule == ScheduleKind::DualPipe && pipeline % 2 != 0 {
                            continue;
                        }
                        let req = request(
                            (pipeline, data, expert),
                            schedule,
                            (n_routed_experts, n_group),
                        );
                        for (nodes, per_node) in
                            [(1u32, 8u32), (2, 4), (3, 3), (4, 8), (8, 2), (5, 6)]
                        {
                            let cluster = Cluster::uniform("n", nodes, per_node);
                            let fits = plan::placement::check_fits(&req, &cluster).is_ok();
                            match place(&req, &cluster) {
                                Ok(placement) => {
                                    assert!(fits);
                                    if let Err(err) = placement.verify(&req, &cluster) {
                                        panic!("{req:?} on {nodes}×{per_node}: {err}");
                                    }
                                    placed += 1;
                                }
                                Err(err) => {
                                    assert!(
                                        !fits,
                                        "{req:?} on {nodes}×{per_node} fits but failed: {err}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(placed > 500, "only {placed} layouts placed");
}
