//! Placement: which device of which node runs each global rank of a job.
//!
//! `place` is a pure, deterministic function of the request and the free devices of the cluster.
//! Its rules, in priority order (issue 2, v3-spec §2.4, §5.2):
//! 1. Every rank gets exactly one device; no device is used twice.
//! 2. An expert domain — the fewest consecutive expert-parallel ranks whose experts form whole
//!    routing groups (`n_group`) — never straddles nodes when a node can hold it. With contiguous
//!    expert ids per group this makes group-limited routing node-limited routing: a token that may
//!    visit `topk_group` groups visits at most `topk_group` nodes.
//! 3. The members of one expert-parallel group are packed onto as few nodes as the free devices
//!    allow (largest free nodes first).
//! 4. Pipeline neighbours prefer the same node: expert-parallel groups are placed pipeline position
//!    after pipeline position, and a group goes to its predecessor's node while that node has room.
//! 5. Ranks hold the stages of their schedule: DualPipe rank `r` holds `r` and `P − 1 − r`.
//!
//! Every decision carries a reason string. `Placement::verify` re-checks the rules independently of
//! how `place` found the answer; the end-to-end tests use it on what the coordinator reports.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::ops::Range;

use crate::ids::{DeviceIdx, Rank, StageIdx};
use crate::parallel::{ParallelConfig, stages_held};
use crate::schedule::ScheduleKind;
use crate::topology::Cluster;

/// Errors of layouts, clusters and placements.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// The parallel degrees are inconsistent (zero, or expert not dividing data).
    #[error("invalid parallel layout: {0}")]
    InvalidLayout(String),
    /// The cluster description is malformed (duplicate names or devices).
    #[error("invalid cluster: {0}")]
    InvalidCluster(String),
    /// The routed experts cannot be spread over the expert degree or the routing groups.
    #[error("invalid expert layout: {0}")]
    InvalidExperts(String),
    /// The free devices cannot hold the job under the placement rules.
    #[error(
        "insufficient capacity: the job needs {needed} devices, the cluster can hold {available} ({detail})"
    )]
    InsufficientCapacity {
        /// Ranks the job needs (its world size).
        needed: u64,
        /// Ranks the cluster can hold under the rules.
        available: u64,
        /// Why the two differ.
        detail: String,
    },
    /// A placement breaks one or more rules (found by `Placement::verify`).
    #[error("placement breaks its rules: {}", .0.join("; "))]
    RuleViolated(Vec<String>),
}

/// How the routed experts of each MoE layer are organised (from the model config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExpertLayout {
    /// Routed experts per MoE layer (`n_routed_experts`).
    pub n_routed_experts: u32,
    /// Routing groups (`n_group`); group `g` holds a contiguous block of expert ids.
    pub n_group: u32,
}

/// Everything `place` needs to know about a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PlacementRequest {
    /// Pipeline, data and expert degrees.
    pub parallel: ParallelConfig,
    /// The schedule, which decides the stages each rank holds.
    pub schedule: ScheduleKind,
    /// The routed-expert organisation.
    pub experts: ExpertLayout,
}

impl PlacementRequest {
    /// Checks the layout and that the experts split evenly over ranks and over groups.
    pub fn check(&self) -> Result<(), PlacementError> {
        self.parallel.check()?;
        let ExpertLayout {
            n_routed_experts,
            n_group,
        } = self.experts;
        if n_routed_experts == 0 || n_group == 0 {
            return Err(PlacementError::InvalidExperts(format!(
                "routed experts ({n_routed_experts}) and groups ({n_group}) must be at least 1"
            )));
        }
        if !n_routed_experts.is_multiple_of(self.parallel.expert) {
            return Err(PlacementError::InvalidExperts(format!(
                "{n_routed_experts} routed experts do not divide over expert degree {}",
                self.parallel.expert
            )));
        }
        if !n_routed_experts.is_multiple_of(n_group) {
            return Err(PlacementError::InvalidExperts(format!(
                "{n_routed_experts} routed experts do not divide into {n_group} groups"
            )));
        }
        Ok(())
    }

    /// Routed experts hosted by each rank of an expert-parallel group.
    pub fn experts_per_rank(&self) -> u32 {
        self.experts.n_routed_experts / self.parallel.expert
    }

    /// Experts per routing group.
    pub fn experts_per_group(&self) -> u32 {
        self.experts.n_routed_experts / self.experts.n_group
    }

    /// Ranks per expert domain: the fewest consecutive expert-parallel ranks whose experts are
    /// whole routing groups, `lcm(experts per rank, experts per group) / experts per rank`.
    pub fn domain_size(&self) -> u32 {
        let per_rank = self.experts_per_rank();
        lcm(per_rank, self.experts_per_group()) / per_rank
    }

    /// The experts rank `ep` of an expert-parallel group hosts.
    pub fn expert_range(&self, ep: u32) -> Range<u32> {
        let per_rank = self.experts_per_rank();
        ep * per_rank..(ep + 1) * per_rank
    }

    /// The routing groups whose experts rank `ep` hosts (all of them, or part of one).
    pub fn group_range(&self, ep: u32) -> Range<u32> {
        let experts = self.expert_range(ep);
        let per_group = self.experts_per_group();
        experts.start / per_group..experts.end.div_ceil(per_group)
    }
}

/// Where one rank runs and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankPlacement {
    /// The global rank.
    pub rank: Rank,
    /// The node's name.
    pub node: String,
    /// The device on that node.
    pub device: DeviceIdx,
    /// Pipeline rank in `0..P`.
    pub pipeline_rank: u32,
    /// The stages the rank holds (two under DualPipe and DualPipeV).
    pub stages: Vec<StageIdx>,
    /// Data-parallel index in `0..D`.
    pub dp: u32,
    /// Expert-parallel group at this pipeline position.
    pub ep_group: u32,
    /// Index inside the expert-parallel group.
    pub ep: u32,
    /// The routed experts this rank hosts, for every MoE layer it holds.
    pub experts: Range<u32>,
    /// The routing groups those experts belong to.
    pub expert_groups: Range<u32>,
    /// Why the rank landed on this node.
    pub reason: String,
}

/// A complete placement: one entry per rank, indexed by rank, plus the job-wide decisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Entry `i` describes rank `i`.
    pub ranks: Vec<RankPlacement>,
    /// Job-wide decisions and their reasons.
    pub decisions: Vec<String>,
}

/// The most ranks of this job the cluster could hold under the placement rules: expert domains
/// never straddle nodes when a node can hold one, so each node holds whole domains only.
pub fn capacity(req: &PlacementRequest, cluster: &Cluster) -> u64 {
    let domain = req.domain_size();
    cluster.blocks_of(domain) * u64::from(domain)
}

/// Fails with `InsufficientCapacity` when the cluster can never hold the job (checked at submit
/// time against the whole cluster, and by `place` against the free devices).
pub fn check_fits(req: &PlacementRequest, cluster: &Cluster) -> Result<(), PlacementError> {
    req.check()?;
    let needed = u64::from(req.parallel.world_size());
    let available = capacity(req, cluster);
    if needed <= available {
        return Ok(());
    }
    let domain = req.domain_size();
    let detail = if u64::from(domain) > 1 && cluster.total_devices() >= needed {
        format!(
            "{} devices in {} nodes, but expert domains of {domain} ranks must each sit on one node",
            cluster.total_devices(),
            cluster.nodes().len()
        )
    } else {
        format!(
            "{} devices in {} nodes",
            cluster.total_devices(),
            cluster.nodes().len()
        )
    };
    Err(PlacementError::InsufficientCapacity {
        needed,
        available,
        detail,
    })
}

/// Places every rank of `req` on the free devices of `cluster`; see the module docs for the rules.
pub fn place(req: &PlacementRequest, cluster: &Cluster) -> Result<Placement, PlacementError> {
    check_fits(req, cluster)?;
    let parallel = req.parallel;
    let expert = parallel.expert;
    let domain = req.domain_size();
    let domains_per_group = expert / domain;
    let max_node = cluster.max_devices_per_node();
    let domains_node_local = domain <= max_node;

    let mut free: Vec<Vec<DeviceIdx>> = cluster
        .nodes()
        .iter()
        .map(|node| node.devices.iter().rev().copied().collect())
        .collect();
    let mut slots: Vec<Option<(usize, DeviceIdx, String)>> =
        vec![None; parallel.world_size() as usize];

    let decisions = job_decisions(req, domain, domains_node_local, max_node);

    for ep_group in 0..parallel.ep_groups() {
        let mut previous: Vec<usize> = Vec::new();
        for pipeline_rank in 0..parallel.pipeline {
            let unit = format!("pipeline {pipeline_rank}, ep group {ep_group}");
            // Each entry: (node, number of domains taken there).
            let (chunks, why) = if let Some((node, why)) =
                single_node(&free, expert, &previous, pipeline_rank, cluster)
            {
                (vec![(node, domains_per_group)], why)
            } else if domains_node_local {
                multi_node(&free, domain, domains_per_group, &previous, cluster).ok_or_else(
                    || insufficient(req, cluster, &unit, "whole expert domains no longer fit"),
                )?
            } else {
                spanning(&free, expert, &previous, domain, cluster)
                    .ok_or_else(|| insufficient(req, cluster, &unit, "free devices ran out"))?
            };
            let mut ep = 0;
            let mut used = Vec::new();
            for (node, count) in chunks {
                let ranks_here = if domains_node_local {
                    count * domain
                } else {
                    count
                };
                for _ in 0..ranks_here {
                    let device = free[node].pop().ok_or_else(|| {
                        insufficient(req, cluster, &unit, "a node ran out of devices")
                    })?;
                    let rank = parallel.rank(pipeline_rank, ep_group * expert + ep);
                    let reason = format!("{unit}: {why}");
                    slots[rank.index()] = Some((node, device, reason));
                    ep += 1;
                }
                used.push(node);
            }
            previous = used;
        }
    }

    let mut ranks = Vec::with_capacity(slots.len());
    for (index, slot) in slots.into_iter().enumerate() {
        let rank = Rank(index as u32);
        let Some((node, device, reason)) = slot else {
            return Err(PlacementError::RuleViolated(vec![format!(
                "rank {rank} was not placed"
            )]));
        };
        let coord = parallel.coord(rank);
        ranks.push(RankPlacement {
            rank,
            node: cluster.nodes()[node].name.clone(),
            device,
            pipeline_rank: coord.pipeline,
            stages: stages_held(req.schedule, coord.pipeline, parallel.pipeline),
            dp: coord.dp,
            ep_group: coord.ep_group,
            ep: coord.ep,
            experts: req.expert_range(coord.ep),
            expert_groups: req.group_range(coord.ep),
            reason,
        });
    }
    Ok(Placement { ranks, decisions })
}

/// The node that takes a whole expert-parallel group of `size` ranks, if one can: the previous
/// pipeline position's node first, then the fullest node with room (best fit).
fn single_node(
    free: &[Vec<DeviceIdx>],
    size: u32,
    previous: &[usize],
    pipeline_rank: u32,
    cluster: &Cluster,
) -> Option<(usize, String)> {
    let size = size as usize;
    if let [node] = previous
        && free[*node].len() >= size
    {
        return Some((
            *node,
            format!(
                "on {} with its pipeline neighbour (pipeline {})",
                cluster.nodes()[*node].name,
                pipeline_rank - 1
            ),
        ));
    }
    let (node, devices) = free
        .iter()
        .enumerate()
        .filter(|(_, devices)| devices.len() >= size)
        .min_by_key(|(index, devices)| (devices.len(), *index))?;
    Some((
        node,
        format!(
            "on {}, the fullest node that holds the whole expert-parallel group ({} of {} devices free)",
            cluster.nodes()[node].name,
            devices.len(),
            cluster.nodes()[node].devices.len()
        ),
    ))
}

/// Nodes that take `needed` whole domains of `domain` ranks between them, fewest nodes first:
/// largest free room first, nodes of the previous pipeline position winning ties.
fn multi_node(
    free: &[Vec<DeviceIdx>],
    domain: u32,
    needed: u32,
    previous: &[usize],
    cluster: &Cluster,
) -> Option<(Vec<(usize, u32)>, String)> {
    let mut order: Vec<(usize, u32)> = free
        .iter()
        .enumerate()
        .map(|(index, devices)| (index, devices.len() as u32 / domain))
        .filter(|(_, room)| *room > 0)
        .collect();
    order
        .sort_by_key(|&(index, room)| (std::cmp::Reverse(room), !previous.contains(&index), index));
    let mut chunks = Vec::new();
    let mut left = needed;
    for (index, room) in order {
        if left == 0 {
            break;
        }
        let take = room.min(left);
        chunks.push((index, take));
        left -= take;
    }
    if left > 0 {
        return None;
    }
    let names: Vec<&str> = chunks
        .iter()
        .map(|&(index, _)| cluster.nodes()[index].name.as_str())
        .collect();
    let why = format!(
        "spans {} nodes ({}), the fewest that hold its {needed} expert domains of {domain} ranks, each domain on one node",
        chunks.len(),
        compact_list(&names)
    );
    Some((chunks, why))
}

/// Devices for a group whose expert domains are larger than any node: largest free nodes first.
fn spanning(
    free: &[Vec<DeviceIdx>],
    size: u32,
    previous: &[usize],
    domain: u32,
    cluster: &Cluster,
) -> Option<(Vec<(usize, u32)>, String)> {
    let mut order: Vec<(usize, u32)> = free
        .iter()
        .enumerate()
        .map(|(index, devices)| (index, devices.len() as u32))
        .filter(|(_, room)| *room > 0)
        .collect();
    order
        .sort_by_key(|&(index, room)| (std::cmp::Reverse(room), !previous.contains(&index), index));
    let mut chunks = Vec::new();
    let mut left = size;
    for (index, room) in order {
        if left == 0 {
            break;
        }
        let take = room.min(left);
        chunks.push((index, take));
        left -= take;
    }
    if left > 0 {
        return None;
    }
    let why = format!(
        "spans {} nodes, the fewest the free devices allow; expert domains of {domain} ranks exceed the largest node ({} devices), so routing groups span nodes",
        chunks.len(),
        cluster.max_devices_per_node()
    );
    Some((chunks, why))
}

fn insufficient(
    req: &PlacementRequest,
    cluster: &Cluster,
    unit: &str,
    why: &str,
) -> PlacementError {
    PlacementError::InsufficientCapacity {
        needed: u64::from(req.parallel.world_size()),
        available: capacity(req, cluster),
        detail: format!("placing {unit}: {why}"),
    }
}

fn job_decisions(
    req: &PlacementRequest,
    domain: u32,
    domains_node_local: bool,
    max_node: u32,
) -> Vec<String> {
    let parallel = req.parallel;
    let pipeline = parallel.pipeline;
    let mut decisions = vec![format!(
        "layout: {parallel}, {} ranks; {} expert-parallel groups of {} ranks per pipeline position",
        parallel.world_size(),
        parallel.ep_groups(),
        parallel.expert
    )];
    decisions.push(match req.schedule {
        ScheduleKind::DualPipe => format!(
            "stages: dualpipe, {pipeline} stages; pipeline rank r holds stages r and {} − r (mirror ranks r and {} − r hold the same two stages)",
            pipeline - 1,
            pipeline - 1
        ),
        ScheduleKind::DualPipeV => format!(
            "stages: dualpipev, {} stages; pipeline rank r holds stages r and {} − r",
            2 * pipeline,
            2 * pipeline - 1
        ),
        ScheduleKind::OneFOneB => format!("stages: 1f1b, {pipeline} stages; pipeline rank r holds stage r"),
    });
    decisions.push(format!(
        "experts: {} routed experts in {} groups of {}; {} per rank; expert domain = {domain} consecutive ep ranks ({} whole groups)",
        req.experts.n_routed_experts,
        req.experts.n_group,
        req.experts_per_group(),
        req.experts_per_rank(),
        domain * req.experts_per_rank() / req.experts_per_group()
    ));
    decisions.push(if domains_node_local {
        "node-limited routing: each expert domain is kept on one node, so a token routed to topk_group groups reaches at most topk_group nodes".to_string()
    } else {
        format!(
            "node-limited routing relaxed: an expert domain of {domain} ranks exceeds the largest node ({max_node} devices), so a routing group spans nodes"
        )
    });
    decisions.push(
        "order: expert-parallel groups are placed pipeline position after pipeline position, each preferring its pipeline neighbour's node, then the fullest node that holds it whole, then the fewest largest nodes".to_string(),
    );
    decisions
}

impl Placement {
    /// The entry of `rank`.
    pub fn rank(&self, rank: Rank) -> Option<&RankPlacement> {
        self.ranks.get(rank.index())
    }

    /// Checks this placement against the rules for `req` on `cluster`, independently of `place`:
    /// every rank placed once with its own coordinates, stages and experts; every device real and
    /// used once; every expert domain on one node when a node can hold one; and, on a uniform
    /// cluster whose node size and expert degree divide one another, every expert-parallel group on
    /// the fewest nodes and pipeline neighbours on one node as often as packing allows.
    pub fn verify(&self, req: &PlacementRequest, cluster: &Cluster) -> Result<(), PlacementError> {
        req.check()?;
        let parallel = req.parallel;
        let mut violations = Vec::new();
        if self.ranks.len() != parallel.world_size() as usize {
            violations.push(format!(
                "{} ranks placed, the world size is {}",
                self.ranks.len(),
                parallel.world_size()
            ));
            return Err(PlacementError::RuleViolated(violations));
        }
        let mut used = HashSet::new();
        for (index, entry) in self.ranks.iter().enumerate() {
            let rank = Rank(index as u32);
            if entry.rank != rank {
                violations.push(format!("entry {index} describes rank {}", entry.rank));
            }
            let coord = parallel.coord(rank);
            if (entry.pipeline_rank, entry.dp, entry.ep_group, entry.ep)
                != (coord.pipeline, coord.dp, coord.ep_group, coord.ep)
            {
                violations.push(format!("rank {rank} has the wrong coordinates"));
            }
            if entry.stages != stages_held(req.schedule, coord.pipeline, parallel.pipeline) {
                violations.push(format!("rank {rank} holds stages {:?}", entry.stages));
            }
            if entry.experts != req.expert_range(coord.ep)
                || entry.expert_groups != req.group_range(coord.ep)
            {
                violations.push(format!("rank {rank} hosts experts {:?}", entry.experts));
            }
            match cluster.node(&entry.node) {
                None => violations.push(format!("rank {rank} is on unknown node {}", entry.node)),
                Some(node) if !node.devices.contains(&entry.device) => violations.push(format!(
                    "rank {rank} is on device {} which node {} does not offer",
                    entry.device, entry.node
                )),
                Some(_) => {}
            }
            if !used.insert((entry.node.as_str(), entry.device)) {
                violations.push(format!(
                    "device {} of node {} is used twice",
                    entry.device, entry.node
                ));
            }
            if entry.reason.is_empty() {
                violations.push(format!("rank {rank} has no reason"));
            }
        }

        let expert = parallel.expert;
        let domain = req.domain_size();
        let node_of = |pipeline: u32, dp: u32| -> &str {
            self.ranks[parallel.rank(pipeline, dp).index()]
                .node
                .as_str()
        };
        if domain <= cluster.max_devices_per_node() {
            for pipeline in 0..parallel.pipeline {
                for start in (0..parallel.data).step_by(domain as usize) {
                    let home = node_of(pipeline, start);
                    if (start..start + domain).any(|dp| node_of(pipeline, dp) != home) {
                        violations.push(format!(
                            "the expert domain of pipeline {pipeline}, dp {start}..{} straddles nodes",
                            start + domain
                        ));
                    }
                }
            }
        }

        let sizes: HashSet<usize> = cluster.nodes().iter().map(|n| n.devices.len()).collect();
        if sizes.len() == 1 {
            let per_node = cluster.max_devices_per_node();
            let aligned = per_node.is_multiple_of(expert)
                || (expert.is_multiple_of(per_node) && per_node.is_multiple_of(domain));
            if aligned {
                let fewest = expert.div_ceil(per_node) as usize;
                for pipeline in 0..parallel.pipeline {
                    for group in 0..parallel.ep_groups() {
                        let nodes: HashSet<&str> = (group * expert..(group + 1) * expert)
                            .map(|dp| node_of(pipeline, dp))
                            .collect();
                        if nodes.len() != fewest {
                            violations.push(format!(
                                "the expert-parallel group at pipeline {pipeline}, group {group} spans {} nodes, the fewest is {fewest}",
                                nodes.len()
                            ));
                        }
                    }
                }
            }
            if per_node.is_multiple_of(expert) {
                let groups_per_node = per_node / expert;
                let limit = parallel.pipeline.div_ceil(groups_per_node);
                for group in 0..parallel.ep_groups() {
                    let dp = group * expert;
                    let crossings = (1..parallel.pipeline)
                        .filter(|&p| node_of(p - 1, dp) != node_of(p, dp))
                        .count() as u32;
                    if crossings > limit {
                        violations.push(format!(
                            "the pipeline of ep group {group} crosses nodes {crossings} times, packing allows {limit}"
                        ));
                    }
                }
            }
        }

        if violations.is_empty() {
            Ok(())
        } else {
            Err(PlacementError::RuleViolated(violations))
        }
    }

    /// A plain-text table of the placement, one line per rank, then the decisions; the snapshot
    /// tests and `moetrain plan` print it.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("rank node dev pp stages dp epg ep experts groups\n");
        for entry in &self.ranks {
            let stages: Vec<String> = entry.stages.iter().map(|s| s.to_string()).collect();
            let _ = writeln!(
                out,
                "{} {} {} {} {} {} {} {} {}..{} {}..{}",
                entry.rank,
                entry.node,
                entry.device,
                entry.pipeline_rank,
                stages.join(","),
                entry.dp,
                entry.ep_group,
                entry.ep,
                entry.experts.start,
                entry.experts.end,
                entry.expert_groups.start,
                entry.expert_groups.end
            );
        }
        let mut last = "";
        for entry in &self.ranks {
            if entry.reason != last {
                let _ = writeln!(out, "reason: {}", entry.reason);
                last = &entry.reason;
            }
        }
        for decision in &self.decisions {
            let _ = writeln!(out, "decision: {decision}");
        }
        out
    }
}

fn compact_list(names: &[&str]) -> String {
    if names.len() <= 4 {
        names.join(", ")
    } else {
        format!("{} … {}", names[0], names[names.len() - 1])
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn lcm(a: u32, b: u32) -> u32 {
    a / gcd(a, b) * b
}
