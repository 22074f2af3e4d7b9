//! In-process pipelined training: every rank of a pipeline × data (× expert) parallel job on its own thread in
//! this process, connected by [`comm::LocalDataPlane`], each running [`run_step`] over the real model
//! ([`ModelCompute`]). Used by the equivalence tests against the single-process trainer and by the
//! benches; the multi-process worker runs the same per-rank loop over TCP.
//!
//! Invariant: the threads share nothing but the data plane; a rank that fails shuts its plane down,
//! so its peers fail within their timeouts instead of hanging, and the first error is returned.

use std::collections::BTreeMap;
use std::sync::Arc;

use comm::{DataPlane, LocalDataPlane};
use model::params::{ParamStore, RoutingBias};
use model::train::TrainOptions;
use plan::schedule::ScheduleKind;

use crate::error::{ComputeError, ExecError};
use crate::model_compute::{ModelCompute, ModelStepOutput, Placement};
use crate::run::{OpTimings, Timeouts, run_step};

/// What one rank ended with.
pub struct RankResult {
    /// Where the rank sat.
    pub place: Placement,
    /// Its step outputs, in order.
    pub steps: Vec<ModelStepOutput>,
    /// Its per-step op timings.
    pub timings: Vec<OpTimings>,
    /// Its stage parameters at the end: (stage index, parameters).
    pub params: Vec<(u32, ParamStore<f32>)>,
    /// Its routing biases at the end.
    pub bias: RoutingBias,
}

/// Why an in-process run failed.
#[derive(Debug, thiserror::Error)]
pub enum InProcessError {
    /// A rank could not be set up.
    #[error("setting up rank {rank}: {source}")]
    Setup {
        /// The data-plane rank.
        rank: usize,
        /// The cause.
        source: ComputeError,
    },
    /// A step failed on a rank.
    #[error(transparent)]
    Step(#[from] ExecError),
    /// The schedule could not be generated.
    #[error(transparent)]
    Schedule(#[from] plan::schedule::ScheduleError),
    /// A rank's thread panicked.
    #[error("rank {0}'s thread panicked")]
    Panicked(usize),
}

/// Trains `opts.steps` steps of `opts` with `kind` over `pipeline` ranks × `data` replicas in this
/// process, the routed experts split over expert-parallel groups of `expert` replicas
/// (`opts.micro_batches / data` micro-batches per replica and step), and returns every rank's
/// result, in data-plane rank order (`pipe_rank · data + replica`).
pub fn train_in_process(
    opts: &TrainOptions,
    kind: ScheduleKind,
    pipeline: u32,
    data: u32,
    expert: u32,
    timeouts: Timeouts,
) -> Result<Vec<RankResult>, InProcessError> {
    let planes = LocalDataPlane::create((pipeline * data) as usize);
    train_with_planes(opts, kind, pipeline, data, expert, planes, timeouts, false)
}

/// [`train_in_process`] over caller-made planes (`planes[r]` is data-plane rank `r`; e.g. TCP planes
/// on loopback). Each plane is shut down when its rank finishes or fails. `concurrent_pairs` runs
/// the two halves of each overlapped pair on two threads ([`ModelCompute::set_concurrent_pairs`]).
#[allow(clippy::too_many_arguments)]
pub fn train_with_planes<P: DataPlane + 'static>(
    opts: &TrainOptions,
    kind: ScheduleKind,
    pipeline: u32,
    data: u32,
    expert: u32,
    planes: Vec<P>,
    timeouts: Timeouts,
    concurrent_pairs: bool,
) -> Result<Vec<RankResult>, InProcessError> {
    let per_replica = (opts.micro_batches as u32) / data.max(1);
    let schedule = kind.generate(pipeline, per_replica)?;
    if planes.len() != (pipeline * data) as usize {
        return Err(InProcessError::Setup {
            rank: 0,
            source: format!("{} planes for {pipeline} x {data} ranks", planes.len()).into(),
        });
    }
    let results: Vec<Result<RankResult, InProcessError>> = std::thread::scope(|s| {
        let handles: Vec<_> = planes
            .into_iter()
            .enumerate()
            .map(|(rank, plane)| {
                let schedule = &schedule;
                s.spawn(move || {
                    let place = Placement {
                        pipeline,
                        data,
                        expert,
                        pipe_rank: rank as u32 / data,
                        replica: rank as u32 % data,
                    };
                    let plane: Arc<dyn DataPlane> = Arc::new(plane);
                    let out = run_rank(
                        opts,
                        schedule,
                        place,
                        plane.clone(),
                        timeouts,
                        concurrent_pairs,
                    );
                    // Whatever happened, this rank is done: peers waiting on it fail at once.
                    plane.shutdown();
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| h.join().unwrap_or(Err(InProcessError::Panicked(rank))))
            .collect()
    });
    // Report the root cause: a rank's own failure rather than its peers' lost-peer errors.
    let mut out = Vec::with_capacity(results.len());
    let mut first_err = None;
    for r in results {
        match r {
            Ok(v) => out.push(v),
            Err(e) => {
                let is_peer_loss = matches!(
                    &e,
                    InProcessError::Step(ExecError::Recv { .. } | ExecError::Send { .. })
                );
                match &first_err {
                    None => first_err = Some(e),
                    Some(InProcessError::Step(ExecError::Recv { .. } | ExecError::Send { .. }))
                        if !is_peer_loss =>
                    {
                        first_err = Some(e)
                    }
                    Some(_) => {}
                }
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

fn run_rank(
    opts: &TrainOptions,
    schedule: &plan::schedule::Schedule,
    place: Placement,
    plane: Arc<dyn DataPlane>,
    timeouts: Timeouts,
    concurrent_pairs: bool,
) -> Result<RankResult, InProcessError> {
    let rank = plane.rank();
    let mut compute = ModelCompute::new(opts, schedule, place)
        .map_err(|source| InProcessError::Setup { rank, source })?;
    if place.expert > 1 {
        compute
            .set_expert_plane(plane.clone(), timeouts.recv)
            .map_err(|source| InProcessError::Setup { rank, source })?;
    }
    compute.set_concurrent_pairs(concurrent_pairs);
    let plane = plane.as_ref();
    let ctx = place.context();
    let ops = &schedule.ops[place.pipe_rank as usize];
    let mut steps = Vec::new();
    let mut timings = Vec::new();
    for step in 0..opts.steps {
        let report = run_step(ops, &ctx, &mut compute, plane, step, &timeouts)?;
        timings.push(report.timings);
        steps.push(report.output);
    }
    let params: BTreeMap<u32, ParamStore<f32>> = compute
        .stage_params()
        .map(|(s, p)| (s, p.clone()))
        .collect();
    Ok(RankResult {
        place,
        steps,
        timings,
        params: params.into_iter().collect(),
        bias: compute.bias().clone(),
    })
}
