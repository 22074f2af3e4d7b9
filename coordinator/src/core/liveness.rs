//! Liveness: which workers are still alive, as a pure function of the state, the time and the
//! config.
//!
//! Invariant: a worker is lost exactly when it has been silent for longer than its failure
//! timeout: the smallest failure timeout among the manifests of the jobs it holds ranks of, or the
//! coordinator's when it holds none or they set none. Workers already lost get no verdict.

use std::time::Duration;

use super::{State, UnixMs};
use crate::Config;

/// Whether a worker is alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Heard from within its failure timeout.
    Alive,
    /// Silent past its failure timeout.
    Lost,
}

/// The verdict on one worker and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LivenessVerdict {
    /// The worker's id.
    pub worker: String,
    /// The verdict.
    pub verdict: Verdict,
    /// Why, e.g. "silent for 5.2s, failure timeout 5.0s".
    pub reason: String,
}

/// The failure timeout that applies to `worker` (see the module docs).
pub fn failure_timeout(state: &State, worker: &str, config: &Config) -> Duration {
    let Some(w) = state.workers.get(worker) else {
        return config.failure_timeout;
    };
    w.stored
        .held
        .iter()
        .filter_map(|h| state.jobs.get(&h.job).and_then(|j| j.failure_timeout()))
        .min()
        .unwrap_or(config.failure_timeout)
}

/// The verdicts on workers that are lost as of `now` (and were not before), in worker-id order.
/// Same rule as [`liveness`], without building a reason for every live worker: this is what the
/// coordinator runs on every tick.
pub fn newly_lost(state: &State, now: UnixMs, config: &Config) -> Vec<LivenessVerdict> {
    state
        .workers
        .iter()
        .filter(|(id, w)| {
            !w.stored.lost
                && Duration::from_millis(now.saturating_sub(w.last_seen))
                    > failure_timeout(state, id, config)
        })
        .flat_map(|(id, _)| liveness_of(state, id, now, config))
        .collect()
}

/// A verdict for every worker not already lost, in worker-id order.
pub fn liveness(state: &State, now: UnixMs, config: &Config) -> Vec<LivenessVerdict> {
    state
        .workers
        .keys()
        .flat_map(|id| liveness_of(state, id, now, config))
        .collect()
}

/// The verdict on one worker, or `None` when it is unknown or already lost.
fn liveness_of(state: &State, id: &str, now: UnixMs, config: &Config) -> Option<LivenessVerdict> {
    let w = state.workers.get(id).filter(|w| !w.stored.lost)?;
    let timeout = failure_timeout(state, id, config);
    let silent = Duration::from_millis(now.saturating_sub(w.last_seen));
    let session = if w.connected { "" } else { ", session closed" };
    let (verdict, reason) = if silent > timeout {
        let reason = format!(
            "silent for {:.1}s, failure timeout {:.1}s{session}",
            silent.as_secs_f64(),
            timeout.as_secs_f64()
        );
        (Verdict::Lost, reason)
    } else {
        let reason = format!(
            "last heard {:.1}s ago, failure timeout {:.1}s{session}",
            silent.as_secs_f64(),
            timeout.as_secs_f64()
        );
        (Verdict::Alive, reason)
    };
    Some(LivenessVerdict {
        worker: id.to_owned(),
        verdict,
        reason,
    })
}
