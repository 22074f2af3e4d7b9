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

/// A verdict for every worker not already lost, in worker-id order.
pub fn liveness(state: &State, now: UnixMs, config: &Config) -> Vec<LivenessVerdict> {
    state
        .workers
        .iter()
        .filter(|(_, w)| !w.stored.lost)
        .map(|(id, w)| {
            let timeout = failure_timeout(state, id, config);
            let silent = Duration::from_millis(now.saturating_sub(w.last_seen));
            let session = if w.connected { "" } else { ", session closed" };
            if silent > timeout {
                LivenessVerdict {
                    worker: id.clone(),
                    verdict: Verdict::Lost,
                    reason: format!(
                        "silent for {:.1}s, failure timeout {:.1}s{session}",
                        silent.as_secs_f64(),
                        timeout.as_secs_f64()
                    ),
                }
            } else {
                LivenessVerdict {
                    worker: id.clone(),
                    verdict: Verdict::Alive,
                    reason: format!(
                        "last heard {:.1}s ago, failure timeout {:.1}s{session}",
                        silent.as_secs_f64(),
                        timeout.as_secs_f64()
                    ),
                }
            }
        })
        .collect()
}
