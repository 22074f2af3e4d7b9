//! Gang scheduling: which pending jobs can start now, and where, as a pure function of the state.
//!
//! Invariants: a job is placed only when every one of its ranks gets a device at once (gang); the
//! devices offered are those of workers that are connected, not lost, of the job's device kind and
//! not holding a rank; jobs are considered in submission order, and a later, smaller job may use
//! devices an earlier, larger job cannot (backfill; the waiting job's reason says so). Every
//! decision carries its reason.

use std::collections::{BTreeMap, BTreeSet};

use plan::ids::DeviceIdx;
use plan::parallel::ParallelConfig;
use plan::placement::{ExpertLayout, PlacementRequest, place};
use plan::topology::{Cluster, Node};
use proto::pb;

use super::State;

/// What to do with one pending job.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Place it now, here.
    Place(pb::Placement),
    /// Not yet.
    Wait,
}

/// The decision on one pending job and why. A wait reason reads `CAUSE: detail`; the core records a
/// `Waiting` event only when the cause changes (the detail, e.g. a count of free devices, may change
/// with every registration), and keeps the latest full reason on the job.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleDecision {
    /// The job's name.
    pub job: String,
    /// The decision.
    pub decision: Decision,
    /// Why (the placement's decisions, or what is missing).
    pub reason: String,
}

/// The placement request of a job spec, or a message naming what is wrong with it.
pub fn request_of(spec: &pb::JobSpec) -> Result<PlacementRequest, String> {
    let parallel =
        ParallelConfig::new(spec.pipeline, spec.data, spec.expert).map_err(|e| e.to_string())?;
    let schedule = proto::convert::schedule_from_name(&spec.schedule).map_err(|e| e.to_string())?;
    let req = PlacementRequest {
        parallel,
        schedule,
        experts: ExpertLayout {
            n_routed_experts: spec.n_routed_experts,
            n_group: spec.n_group,
        },
    };
    req.check().map_err(|e| e.to_string())?;
    pb::DeviceKind::from_wire("device_kind", spec.device_kind).map_err(|e| e.to_string())?;
    Ok(req)
}

/// A free device and the worker that offers it.
#[derive(Clone, Debug)]
struct FreeDevice {
    worker: String,
    addr: String,
}

/// Free devices by kind, then by (node, device index). When two workers claim the same device of
/// the same node, the first by id keeps it.
fn free_devices(state: &State) -> BTreeMap<i32, BTreeMap<(String, u32), FreeDevice>> {
    let mut free: BTreeMap<i32, BTreeMap<(String, u32), FreeDevice>> = BTreeMap::new();
    for (id, w) in &state.workers {
        if w.stored.lost || !w.connected {
            continue;
        }
        let held: BTreeSet<u32> = w.stored.held.iter().map(|h| h.device_index).collect();
        for d in &w.stored.devices {
            if held.contains(&d.index) {
                continue;
            }
            free.entry(d.kind)
                .or_default()
                .entry((w.stored.node.clone(), d.index))
                .or_insert_with(|| FreeDevice {
                    worker: id.clone(),
                    // A device with its own data-plane listener is reached there.
                    addr: if d.data_plane_addr.is_empty() {
                        w.stored.data_plane_addr.clone()
                    } else {
                        d.data_plane_addr.clone()
                    },
                });
        }
    }
    free
}

/// Decisions for every pending job, in submission order.
pub fn schedule(state: &State) -> Vec<ScheduleDecision> {
    let mut pending: Vec<_> = state
        .jobs
        .iter()
        .filter(|(_, j)| j.phase() == pb::JobPhase::Pending)
        .collect();
    if pending.is_empty() {
        return Vec::new();
    }
    pending.sort_by_key(|(_, j)| j.stored.seq);
    let mut free = free_devices(state);
    let mut decisions = Vec::new();
    for (name, job) in pending {
        let spec = job.spec();
        let world = spec.pipeline * spec.data;
        let kind =
            pb::DeviceKind::try_from(spec.device_kind).unwrap_or(pb::DeviceKind::Unspecified);
        let wait = |reason: String| ScheduleDecision {
            job: name.clone(),
            decision: Decision::Wait,
            reason,
        };
        let req = match request_of(&spec) {
            Ok(req) => req,
            Err(e) => {
                decisions.push(wait(format!("cannot place: {e}")));
                continue;
            }
        };
        let pool = free.entry(spec.device_kind).or_default();
        if (pool.len() as u64) < u64::from(world) {
            decisions.push(wait(format!(
                "not enough free devices: needs {world} free {} devices for all ranks at once, {} free",
                kind.name(),
                pool.len()
            )));
            continue;
        }
        let mut nodes: BTreeMap<&str, Vec<DeviceIdx>> = BTreeMap::new();
        for (node, index) in pool.keys() {
            nodes
                .entry(node.as_str())
                .or_default()
                .push(DeviceIdx(*index));
        }
        let cluster = Cluster::new(
            nodes
                .into_iter()
                .map(|(name, devices)| Node {
                    name: name.to_owned(),
                    devices,
                })
                .collect(),
        );
        let placed = cluster.and_then(|cluster| place(&req, &cluster));
        match placed {
            Err(e) => decisions.push(wait(format!("placement rules: {e}"))),
            Ok(placement) => {
                let mut ranks = Vec::with_capacity(placement.ranks.len());
                for entry in &placement.ranks {
                    // `place` only uses devices of the cluster built from `pool`, so the lookup
                    // holds; a miss would be a bug in `place`, reported as a wait, not a panic.
                    let Some(dev) = pool.remove(&(entry.node.clone(), entry.device.0)) else {
                        break;
                    };
                    ranks.push(pb::RankPlacement::from_plan(entry, &dev.worker, &dev.addr));
                }
                if ranks.len() != placement.ranks.len() {
                    decisions.push(wait(
                        "cannot place: placement used a device that is not free".into(),
                    ));
                    continue;
                }
                let n_nodes = ranks
                    .iter()
                    .map(|r| r.node.as_str())
                    .collect::<BTreeSet<_>>()
                    .len();
                let mut reasons = placement.decisions.clone();
                reasons.extend(
                    placement
                        .ranks
                        .iter()
                        .map(|r| format!("rank {}: {}", r.rank, r.reason)),
                );
                decisions.push(ScheduleDecision {
                    job: name.clone(),
                    decision: Decision::Place(pb::Placement { ranks, reasons }),
                    reason: format!(
                        "gang-scheduled: {world} ranks placed on {world} free {} devices in {n_nodes} nodes",
                        kind.name()
                    ),
                });
            }
        }
    }
    decisions
}
