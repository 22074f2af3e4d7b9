//! The routing-bias ledger: per MoE layer (MTP layers included) the f32 bias, versioned by the step
//! it was computed after, and the collection of one step's per-expert counts from every rank that
//! routes with the layer (all data-parallel replicas and both DualPipe copies of a stage).
//!
//! Invariants: a report is validated completely before it touches the running sums, so a refused
//! report leaves the ledger as it was; the sums are exact `u64` additions, so the result does not
//! depend on which rank reported first; the update is applied exactly once per step, after the
//! last holder reported, with the γ of the tokens trained before that step.

use std::collections::{HashMap, VecDeque};

use routing::{GammaSchedule, UpdateVariant, apply_sign_rule, layer_checksum, rank_checksum};

use super::BalanceError;

/// What the ledger needs to know about the job.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BalanceConfig {
    /// Routed experts per MoE layer (N_r).
    pub experts: usize,
    /// γ schedule.
    pub gamma: GammaSchedule,
    /// Update variant (plain sign by default).
    pub variant: UpdateVariant,
    /// Tokens the whole job trains on per step (global batch × sequence length).
    pub tokens_per_step: u64,
    /// Steps of telemetry kept (at least 1).
    pub history: usize,
}

/// The ranks that route with one MoE layer (or, when workers pre-sum, the reporters of its groups).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerHolders {
    /// MoE layer id (MTP layers numbered from `num_hidden_layers`).
    pub layer: u32,
    /// Every rank that holds the layer's gate and reports its counts.
    pub holders: Vec<u32>,
}

/// One layer's per-expert counts from one rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerCounts {
    /// MoE layer id.
    pub layer: u32,
    /// Tokens that chose each expert (after group-limited routing), over the rank's micro-batches.
    pub counts: Vec<u64>,
}

/// The new bias after a step, for every holder.
#[derive(Clone, Debug, PartialEq)]
pub struct BiasBroadcast {
    /// The step the bias was computed after: holders use it for step `step + 1`.
    pub step: u64,
    /// γ that was applied.
    pub gamma: f32,
    /// (layer, bias) for every MoE layer, ascending layer id.
    pub layers: Vec<(u32, Vec<f32>)>,
}

impl BiasBroadcast {
    /// The layers `wanted` (ascending id) out of the broadcast, as a holder that routes only those
    /// receives them; unknown ids are skipped.
    pub fn subset(&self, wanted: &[u32]) -> Vec<(u32, &[f32])> {
        self.layers
            .iter()
            .filter(|(l, _)| wanted.contains(l))
            .map(|(l, b)| (*l, b.as_slice()))
            .collect()
    }
}

/// One layer's load in one step.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerSummary {
    /// MoE layer id.
    pub layer: u32,
    /// Largest per-expert count.
    pub max: u64,
    /// Mean per-expert count.
    pub mean: f64,
    /// Per-expert counts summed over every holder.
    pub counts: Vec<u64>,
}

impl LayerSummary {
    /// max / mean (1.0 is perfectly balanced); 0 when nothing was routed.
    pub fn imbalance(&self) -> f64 {
        if self.mean == 0.0 {
            0.0
        } else {
            self.max as f64 / self.mean
        }
    }
}

/// Telemetry of one finished step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepSummary {
    /// The step.
    pub step: u64,
    /// γ applied after it.
    pub gamma: f32,
    /// Per layer, ascending id.
    pub layers: Vec<LayerSummary>,
}

impl StepSummary {
    /// The largest max/mean ratio over the layers.
    pub fn worst_imbalance(&self) -> f64 {
        self.layers
            .iter()
            .map(LayerSummary::imbalance)
            .fold(0.0, f64::max)
    }
}

/// Sums reports that cover the same layers (a stage's ranks pre-summing before they report).
/// Every report must list the same layer ids in the same order with equal lengths.
pub fn presum(reports: &[&[LayerCounts]]) -> Result<Vec<LayerCounts>, BalanceError> {
    let Some(first) = reports.first() else {
        return Ok(Vec::new());
    };
    let mut out: Vec<LayerCounts> = first.to_vec();
    for (i, r) in reports.iter().enumerate().skip(1) {
        if r.len() != out.len() {
            return Err(BalanceError::Config(format!(
                "pre-sum: report {i} has {} layers, report 0 has {}",
                r.len(),
                out.len()
            )));
        }
        for (acc, lc) in out.iter_mut().zip(r.iter()) {
            if acc.layer != lc.layer || acc.counts.len() != lc.counts.len() {
                return Err(BalanceError::Config(format!(
                    "pre-sum: report {i} has layer {} × {} experts where report 0 has layer {} × {}",
                    lc.layer,
                    lc.counts.len(),
                    acc.layer,
                    acc.counts.len()
                )));
            }
            for (e, (a, c)) in acc.counts.iter_mut().zip(&lc.counts).enumerate() {
                *a = a.checked_add(*c).ok_or_else(|| {
                    BalanceError::Config(format!(
                        "pre-sum: layer {} expert {e} overflows u64",
                        lc.layer
                    ))
                })?;
            }
        }
    }
    Ok(out)
}

/// The ledger's durable part after a finished step: enough to rebuild it bit for bit with
/// [`BiasLedger::restore`] (a coordinator restart, a resumed job).
#[derive(Clone, Debug, PartialEq)]
pub struct LedgerState {
    /// The step the bias was computed after (the ledger then collects `after_step + 1`).
    pub after_step: u64,
    /// Tokens trained before step `after_step + 1` (γ of that step depends on it).
    pub tokens_seen: u64,
    /// (layer, bias) for every MoE layer, ascending layer id.
    pub layers: Vec<(u32, Vec<f32>)>,
}

/// A rank's place in the ledger.
#[derive(Debug)]
struct Reporter {
    /// Dense index into `reported`.
    slot: usize,
    /// Indices (into the ledger's layers) of the layers it holds, ascending.
    layers: Vec<usize>,
}

/// The coordinator's routing-bias state for one job.
#[derive(Debug)]
pub struct BiasLedger {
    config: BalanceConfig,
    /// Layer ids, ascending.
    layer_ids: Vec<u32>,
    bias: Vec<Vec<f32>>,
    checksums: Vec<u64>,
    /// The step the bias was computed after; `None`: the initial bias.
    version: Option<u64>,
    tokens_seen: u64,
    /// The step whose counts are being collected.
    collecting: u64,
    reporters: HashMap<u32, Reporter>,
    reported: Vec<bool>,
    remaining: usize,
    sums: Vec<Vec<u64>>,
    history: VecDeque<StepSummary>,
}

impl BiasLedger {
    /// A ledger with zero bias for every layer of `holders`, collecting step 0.
    pub fn new(config: BalanceConfig, holders: &[LayerHolders]) -> Result<Self, BalanceError> {
        if config.experts == 0 {
            return Err(BalanceError::Config("zero routed experts".into()));
        }
        if config.history == 0 {
            return Err(BalanceError::Config("a history of zero steps".into()));
        }
        let mut sorted: Vec<&LayerHolders> = holders.iter().collect();
        sorted.sort_by_key(|h| h.layer);
        let layer_ids: Vec<u32> = sorted.iter().map(|h| h.layer).collect();
        if layer_ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(BalanceError::Config("a MoE layer is listed twice".into()));
        }
        let mut reporters: HashMap<u32, Reporter> = HashMap::new();
        for (li, h) in sorted.iter().enumerate() {
            if h.holders.is_empty() {
                return Err(BalanceError::Config(format!(
                    "layer {} has no holder",
                    h.layer
                )));
            }
            for &rank in &h.holders {
                let next = reporters.len();
                let r = reporters.entry(rank).or_insert(Reporter {
                    slot: next,
                    layers: Vec::new(),
                });
                if r.layers.last() == Some(&li) {
                    return Err(BalanceError::Config(format!(
                        "rank {rank} is listed twice as a holder of layer {}",
                        h.layer
                    )));
                }
                r.layers.push(li);
            }
        }
        let n = layer_ids.len();
        let bias = vec![vec![0.0f32; config.experts]; n];
        let checksums = bias.iter().map(|b| layer_checksum(b)).collect();
        Ok(Self {
            config,
            bias,
            checksums,
            version: None,
            tokens_seen: 0,
            collecting: 0,
            reported: vec![false; reporters.len()],
            remaining: reporters.len(),
            reporters,
            sums: vec![vec![0u64; config.experts]; n],
            history: VecDeque::new(),
            layer_ids,
        })
    }

    /// Resumes from a checkpoint: the bias computed after step `after_step` (so the ledger
    /// collects `after_step + 1`), with `tokens_seen` tokens trained. Every layer must be given.
    pub fn restore(
        &mut self,
        after_step: u64,
        tokens_seen: u64,
        biases: &[(u32, Vec<f32>)],
    ) -> Result<(), BalanceError> {
        if biases.len() != self.layer_ids.len() {
            return Err(BalanceError::Config(format!(
                "restoring {} layers' bias, the job has {} MoE layers",
                biases.len(),
                self.layer_ids.len()
            )));
        }
        let mut new = self.bias.clone();
        let mut given = vec![false; self.layer_ids.len()];
        for (layer, b) in biases {
            let li = self.layer_index(*layer).ok_or_else(|| {
                BalanceError::Config(format!("restoring bias of unknown layer {layer}"))
            })?;
            if b.len() != self.config.experts {
                return Err(BalanceError::Config(format!(
                    "restored bias of layer {layer} has {} experts, expected {}",
                    b.len(),
                    self.config.experts
                )));
            }
            if given[li] {
                return Err(BalanceError::Config(format!(
                    "restoring layer {layer}'s bias twice"
                )));
            }
            given[li] = true;
            new[li].clone_from(b);
        }
        self.bias = new;
        self.checksums = self.bias.iter().map(|b| layer_checksum(b)).collect();
        self.version = Some(after_step);
        self.tokens_seen = tokens_seen;
        self.collecting = after_step + 1;
        self.reset_collection();
        Ok(())
    }

    /// The bias after the last step the ledger finished, with its version and the tokens
    /// trained before the step it collects: what [`BiasLedger::restore`] takes back. `None`
    /// while the ledger holds the initial bias (no step finished, nothing to keep).
    pub fn snapshot(&self) -> Option<LedgerState> {
        let after_step = self.version?;
        Some(LedgerState {
            after_step,
            tokens_seen: self.tokens_seen,
            layers: self.layer_biases(),
        })
    }

    /// (layer, bias) for every MoE layer, ascending layer id.
    fn layer_biases(&self) -> Vec<(u32, Vec<f32>)> {
        self.layer_ids
            .iter()
            .copied()
            .zip(self.bias.iter().cloned())
            .collect()
    }

    fn layer_index(&self, layer: u32) -> Option<usize> {
        self.layer_ids.binary_search(&layer).ok()
    }

    fn reset_collection(&mut self) {
        self.reported.iter_mut().for_each(|r| *r = false);
        self.remaining = self.reported.len();
        for s in &mut self.sums {
            s.iter_mut().for_each(|c| *c = 0);
        }
    }

    /// The MoE layer ids, ascending.
    pub fn layers(&self) -> &[u32] {
        &self.layer_ids
    }

    /// The current bias of `layer`.
    pub fn bias(&self, layer: u32) -> Option<&[f32]> {
        self.layer_index(layer).map(|i| self.bias[i].as_slice())
    }

    /// The step the current bias was computed after (`None`: the initial bias).
    pub fn version(&self) -> Option<u64> {
        self.version
    }

    /// The step whose counts the ledger collects.
    pub fn collecting(&self) -> u64 {
        self.collecting
    }

    /// Tokens trained before the step being collected.
    pub fn tokens_seen(&self) -> u64 {
        self.tokens_seen
    }

    /// Ranks that still have to report the step being collected, ascending.
    pub fn missing(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .reporters
            .iter()
            .filter(|(_, r)| !self.reported[r.slot])
            .map(|(&rank, _)| rank)
            .collect();
        v.sort_unstable();
        v
    }

    /// The layers `rank` holds, ascending (empty for a rank that holds none).
    pub fn layers_of(&self, rank: u32) -> Vec<u32> {
        self.reporters
            .get(&rank)
            .map(|r| r.layers.iter().map(|&i| self.layer_ids[i]).collect())
            .unwrap_or_default()
    }

    /// The telemetry of the most recent steps, oldest first (at most `config.history`).
    pub fn history(&self) -> impl Iterator<Item = &StepSummary> {
        self.history.iter()
    }

    /// The checksum of each layer's current bias, ascending layer id.
    pub fn checksums(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.layer_ids
            .iter()
            .copied()
            .zip(self.checksums.iter().copied())
    }

    /// The combined checksum ([`rank_checksum`]) `rank` must report for the current bias.
    pub fn expected_rank_checksum(&self, rank: u32) -> Option<u64> {
        let r = self.reporters.get(&rank)?;
        Some(rank_checksum(
            r.layers
                .iter()
                .map(|&i| (self.layer_ids[i], self.bias[i].as_slice())),
        ))
    }

    fn check_step(&self, rank: u32, step: u64) -> Result<&Reporter, BalanceError> {
        let r = self
            .reporters
            .get(&rank)
            .ok_or(BalanceError::UnknownRank { rank, step })?;
        let expected = self.collecting;
        if step < expected {
            return Err(BalanceError::Stale {
                rank,
                step,
                expected,
            });
        }
        if step > expected {
            return Err(BalanceError::Ahead {
                rank,
                step,
                expected,
            });
        }
        Ok(r)
    }

    /// Checks the per-layer checksums of the bias `rank` used for `step` (the ledger's current
    /// bias, since `step` is the one being collected). Every held layer must be present once; the
    /// first mismatch, in ascending layer order, is the error.
    pub fn verify_checksums(
        &self,
        step: u64,
        rank: u32,
        checksums: &[(u32, u64)],
    ) -> Result<(), BalanceError> {
        let r = self.check_step(rank, step)?;
        let mut got: Vec<(u32, u64)> = checksums.to_vec();
        got.sort_by_key(|(l, _)| *l);
        let held: Vec<u32> = r.layers.iter().map(|&i| self.layer_ids[i]).collect();
        let listed: Vec<u32> = got.iter().map(|(l, _)| *l).collect();
        if held != listed {
            return Err(BalanceError::Shape {
                rank,
                step,
                what: format!("bias checksums for layers {listed:?}, but the rank holds {held:?}"),
            });
        }
        for (&li, &(layer, sum)) in r.layers.iter().zip(&got) {
            if self.checksums[li] != sum {
                return Err(BalanceError::ChecksumMismatch {
                    step,
                    rank,
                    layer,
                    expected: self.checksums[li],
                    got: sum,
                });
            }
        }
        Ok(())
    }

    /// Checks the one combined checksum of a `StepReport` (layer `u32::MAX` in the error).
    pub fn verify_rank_checksum(&self, step: u64, rank: u32, got: u64) -> Result<(), BalanceError> {
        self.check_step(rank, step)?;
        let expected = self
            .expected_rank_checksum(rank)
            .ok_or(BalanceError::UnknownRank { rank, step })?;
        if expected != got {
            return Err(BalanceError::ChecksumMismatch {
                step,
                rank,
                layer: u32::MAX,
                expected,
                got,
            });
        }
        Ok(())
    }

    /// Takes `rank`'s counts for `step`. Returns the new bias once every holder reported (and
    /// records the step's telemetry), `None` while reports are missing. A refused report changes
    /// nothing.
    pub fn ingest(
        &mut self,
        rank: u32,
        step: u64,
        counts: &[LayerCounts],
    ) -> Result<Option<BiasBroadcast>, BalanceError> {
        let r = self.check_step(rank, step)?;
        let slot = r.slot;
        if self.reported[slot] {
            return Err(BalanceError::Duplicate { rank, step });
        }
        let shape = |what: String| BalanceError::Shape { rank, step, what };
        if counts.len() != r.layers.len() {
            let held: Vec<u32> = r.layers.iter().map(|&i| self.layer_ids[i]).collect();
            let got: Vec<u32> = counts.iter().map(|c| c.layer).collect();
            return Err(shape(format!(
                "counts for layers {got:?}, but the rank holds {held:?}"
            )));
        }
        // Validate everything before touching the sums.
        let mut idx = Vec::with_capacity(counts.len());
        let mut seen = vec![false; self.layer_ids.len()];
        let mut bad = None;
        for lc in counts {
            let Some(li) = self.layer_index(lc.layer) else {
                bad = Some(format!(
                    "counts for layer {}, which is not a MoE layer",
                    lc.layer
                ));
                break;
            };
            if r.layers.binary_search(&li).is_err() {
                bad = Some(format!(
                    "counts for layer {}, which the rank does not hold",
                    lc.layer
                ));
                break;
            }
            if seen[li] {
                bad = Some(format!("layer {} reported twice", lc.layer));
                break;
            }
            seen[li] = true;
            if lc.counts.len() != self.config.experts {
                bad = Some(format!(
                    "layer {} has {} expert counts, expected {}",
                    lc.layer,
                    lc.counts.len(),
                    self.config.experts
                ));
                break;
            }
            idx.push(li);
        }
        if let Some(what) = bad {
            return Err(shape(what));
        }
        // Exact integer sums; undo this report's additions if one overflows.
        for (k, (&li, lc)) in idx.iter().zip(counts).enumerate() {
            for (e, c) in lc.counts.iter().enumerate() {
                let (v, over) = self.sums[li][e].overflowing_add(*c);
                self.sums[li][e] = v;
                if over {
                    for (&lj, lc2) in idx[..=k].iter().zip(counts) {
                        let upto = if lj == li { e + 1 } else { lc2.counts.len() };
                        for (s, c2) in self.sums[lj][..upto].iter_mut().zip(&lc2.counts) {
                            *s = s.wrapping_sub(*c2);
                        }
                    }
                    return Err(BalanceError::Overflow {
                        step,
                        layer: lc.layer,
                        expert: e,
                    });
                }
            }
        }
        self.reported[slot] = true;
        self.remaining -= 1;
        if self.remaining > 0 {
            return Ok(None);
        }
        Ok(Some(self.finish_step()))
    }

    /// Applies the rule to the complete sums, records telemetry, and moves to the next step.
    fn finish_step(&mut self) -> BiasBroadcast {
        let step = self.collecting;
        let gamma = self.config.gamma.gamma(self.tokens_seen);
        let mut layers = Vec::with_capacity(self.layer_ids.len());
        for (li, &layer) in self.layer_ids.iter().enumerate() {
            let counts = &self.sums[li];
            let max = counts.iter().copied().max().unwrap_or(0);
            let mean = counts.iter().map(|&c| c as f64).sum::<f64>() / counts.len() as f64;
            layers.push(LayerSummary {
                layer,
                max,
                mean,
                counts: counts.clone(),
            });
            apply_sign_rule(&mut self.bias[li], counts, gamma, self.config.variant);
            self.checksums[li] = layer_checksum(&self.bias[li]);
        }
        if self.history.len() == self.config.history {
            self.history.pop_front();
        }
        self.history.push_back(StepSummary {
            step,
            gamma,
            layers,
        });
        self.version = Some(step);
        self.tokens_seen += self.config.tokens_per_step;
        self.collecting = step + 1;
        self.reset_collection();
        BiasBroadcast {
            step,
            gamma,
            layers: self.layer_biases(),
        }
    }
}
