//! Expert parallelism as the model sees it: the [`ExpertExchange`] trait (an all-to-all-v of f32 rows
//! inside one expert-parallel group), the split of a layer's routed experts over the group, and the
//! parameter layout of an expert-parallel stage.
//!
//! The model never talks to a network: a caller (the executor) implements [`ExpertExchange`] over its
//! data plane and hands it to [`crate::stage::Stage::with_exchange`]. Member `i` of a group of `E` owns
//! the routed experts [`local_experts`]`(n, E, i)` of every MoE layer, MTP blocks included; everything
//! else (attention, norms, router, shared expert) is held by every member.
//!
//! Invariants: every member of a group calls [`ExpertExchange::all_to_all`] with the same keys in the
//! same order (they run the same schedule), and a key names one (micro-batch, layer, phase), so
//! concurrent exchanges of different micro-batches or chunks never mix. The stage layout of
//! [`stage_specs_ep`] puts every replicated tensor before every routed-expert tensor, so the replicated
//! part is one contiguous prefix with the same layout on every member of the data-parallel group and
//! the expert part one suffix with the same layout on every member with the same expert index.

use crate::params::{StageSpec, stage_specs};
use crate::{ModelConfig, ModelError, Result};
use std::ops::Range;

/// Which of the four exchanges of an expert-parallel MoE layer a message belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// Forward: token rows (and their expert id and gate weight) from the routing rank to the owner.
    Dispatch,
    /// Forward: gate-weighted expert outputs from the owner back to the routing rank.
    Combine,
    /// Backward: output gradients of the weighted expert rows from the routing rank to the owner.
    GradDispatch,
    /// Backward: input gradients (and gate-weight gradients) from the owner back to the routing rank.
    GradCombine,
}

/// The identity of one exchange within a step and stage: unique per (micro-batch, layer, phase).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExchangeKey {
    /// The stage's micro-batch id.
    pub micro_batch: u64,
    /// The layer id (MTP blocks use `num_hidden_layers + k − 1`).
    pub layer: u32,
    /// The phase.
    pub phase: Phase,
}

/// An all-to-all-v of f32 rows among the members of one expert-parallel group.
///
/// Implementations must be usable from two threads at once (overlapped pairs), with different keys.
pub trait ExpertExchange: Send + Sync {
    /// Members of the group (`E`).
    fn size(&self) -> usize;

    /// This member's index in `0..size()` (its expert index).
    fn index(&self) -> usize;

    /// Sends `rows[j]` to member `j` (`rows.len() == size()`, the own entry included) and returns what
    /// every member sent to this one, indexed by member. Fails with [`ModelError::Exchange`] on a
    /// timeout, a lost peer or a malformed payload.
    fn all_to_all(&self, key: ExchangeKey, rows: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>>;
}

/// The expert-parallel context of one layer call: the group's exchange and the micro-batch's id.
#[derive(Clone, Copy)]
pub struct EpCall<'a> {
    /// The group's exchange.
    pub exchange: &'a dyn ExpertExchange,
    /// The stage's micro-batch id.
    pub micro_batch: u64,
}

impl EpCall<'_> {
    /// Runs the exchange of `phase` for layer `layer` of this micro-batch.
    pub fn all_to_all(
        &self,
        layer: usize,
        phase: Phase,
        rows: Vec<Vec<f32>>,
    ) -> Result<Vec<Vec<f32>>> {
        let key = ExchangeKey {
            micro_batch: self.micro_batch,
            layer: layer as u32,
            phase,
        };
        let size = self.exchange.size();
        if rows.len() != size {
            return Err(ModelError::Exchange(format!(
                "{} payloads for an expert-parallel group of {size}",
                rows.len()
            )));
        }
        let out = self.exchange.all_to_all(key, rows)?;
        if out.len() != size {
            return Err(ModelError::Exchange(format!(
                "the exchange returned {} payloads for a group of {size}",
                out.len()
            )));
        }
        Ok(out)
    }
}

/// The routed experts member `index` of a group of `size` owns among `n`: a contiguous block of `n / size`.
pub fn local_experts(n: usize, size: usize, index: usize) -> Range<usize> {
    let per = n / size.max(1);
    index * per..(index + 1) * per
}

/// Checks that `size` members can split `n` routed experts evenly.
pub fn check_split(n: usize, size: usize, index: usize) -> Result<()> {
    if size == 0 || index >= size || !n.is_multiple_of(size) {
        return Err(ModelError::Input(format!(
            "expert parallelism {size} (member {index}) must divide the {n} routed experts"
        )));
    }
    Ok(())
}

/// The routed expert a tensor name belongs to (`model.layers.L.mlp.experts.E.…`), if any.
pub fn expert_of(name: &str) -> Option<usize> {
    let rest = &name[name.find(".mlp.experts.")? + ".mlp.experts.".len()..];
    rest.split('.').next()?.parse().ok()
}

/// (name, shape) pairs of a store's tensors, in flat-buffer order.
pub type TensorSpecs = Vec<(String, Vec<usize>)>;

/// The parameter layout of stage `stage` on member `index` of an expert-parallel group of `size`:
/// every replicated tensor (in [`stage_specs`] order), then the member's own routed-expert tensors (in
/// the same relative order). Returns the specs and the length of the replicated prefix in elements.
pub fn stage_specs_ep(
    config: &ModelConfig,
    stage: &StageSpec,
    size: usize,
    index: usize,
) -> Result<(TensorSpecs, usize)> {
    check_split(config.n_routed_experts, size, index)?;
    let own = local_experts(config.n_routed_experts, size, index);
    let (mut dense, mut experts) = (Vec::new(), Vec::new());
    for (name, shape) in stage_specs(config, stage) {
        match expert_of(&name) {
            Some(e) if own.contains(&e) => experts.push((name, shape)),
            Some(_) => {}
            None => dense.push((name, shape)),
        }
    }
    let prefix = dense.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    dense.extend(experts);
    Ok((dense, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::decoder::DecoderLayer;
    use crate::layers::{WJob, WSink, run_wjobs};
    use crate::params::{Normal, ParamStore, RoutingBias};
    use crate::precision::{Precision, Runtime};
    use std::collections::HashMap;
    use std::sync::{Arc, Condvar, Mutex};

    /// An in-memory exchange among the threads of one test: (key, from, to) → rows.
    type Mailbox = (
        Mutex<HashMap<(ExchangeKey, usize, usize), Vec<f32>>>,
        Condvar,
    );

    struct Local {
        size: usize,
        index: usize,
        mail: Arc<Mailbox>,
    }

    impl ExpertExchange for Local {
        fn size(&self) -> usize {
            self.size
        }
        fn index(&self) -> usize {
            self.index
        }
        fn all_to_all(&self, key: ExchangeKey, rows: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
            let (lock, cv) = &*self.mail;
            let mut m = lock.lock().unwrap();
            for (j, r) in rows.into_iter().enumerate() {
                m.insert((key, self.index, j), r);
            }
            cv.notify_all();
            let mut out = Vec::with_capacity(self.size);
            for i in 0..self.size {
                loop {
                    if let Some(r) = m.remove(&(key, i, self.index)) {
                        out.push(r);
                        break;
                    }
                    m = cv.wait(m).unwrap();
                }
            }
            Ok(out)
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// One member's forward output, input gradient, and weight-gradient jobs.
    type Run = (Vec<f32>, Vec<f32>, Vec<WJob<f32>>);

    /// Runs MoE layer 1 of the micro config forward and backward on two members' micro-batches in
    /// `precision`: locally (every expert on each member) and expert-parallel over two threads.
    fn layer_runs(precision: Precision) -> (Vec<Run>, Vec<Run>, Runtime, ParamStore<f32>) {
        let config = ModelConfig::preset("micro").unwrap();
        let layer = 1;
        let (n, d, b, t) = (config.n_routed_experts, config.hidden_size, 1, 8);
        let p = ParamStore::init(&config, 3);
        let rt = Runtime::cpu(1, precision);
        let mut bias = RoutingBias::zeros(&config);
        bias.get_mut(layer).unwrap()[2] = 0.05;
        let mut rng = Normal::new(9);
        let mut randn =
            |len: usize| -> Vec<f32> { (0..len).map(|_| rng.sample() as f32).collect() };
        let xs = [randn(b * t * d), randn(b * t * d)];
        let dhs = [randn(b * t * d), randn(b * t * d)];
        let run = |lay: &DecoderLayer, m: usize, ep: Option<EpCall<'_>>| -> Run {
            let (h, saved, _) = lay
                .forward(&rt, &p, xs[m].clone(), b, t, bias.get(layer), ep)
                .unwrap();
            let mut jobs: Vec<WJob<f32>> = Vec::new();
            let dx = lay
                .backward_input(
                    &rt,
                    &p,
                    dhs[m].clone(),
                    saved,
                    0.5,
                    ep,
                    &mut WSink::Defer(&mut jobs),
                )
                .unwrap();
            (h, dx, jobs)
        };
        let whole = DecoderLayer::new(&config, &p, layer, 0.1, 0..n).unwrap();
        let local: Vec<Run> = (0..2).map(|m| run(&whole, m, None)).collect();
        let mail: Arc<Mailbox> = Arc::default();
        let ep: Vec<Run> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|m| {
                    let (config, p, run, mail) = (&config, &p, &run, mail.clone());
                    s.spawn(move || {
                        let x = Local {
                            size: 2,
                            index: m,
                            mail,
                        };
                        let own = local_experts(n, 2, m);
                        let lay = DecoderLayer::new(config, p, layer, 0.1, own).unwrap();
                        run(
                            &lay,
                            m,
                            Some(EpCall {
                                exchange: &x,
                                micro_batch: 7,
                            }),
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(
            mail.0.lock().unwrap().is_empty(),
            "every message was consumed"
        );
        (local, ep, rt, p)
    }

    /// With two members in fp32, an MoE layer's forward outputs and input gradients are bitwise those
    /// of the local layer on each member's own tokens, each member's replicated weight gradients are
    /// its own, and an owner's expert gradients are both members' local ones added in member order.
    #[test]
    fn an_expert_parallel_moe_layer_is_bitwise_the_local_layer_in_fp32() {
        let (local, ep, rt, p) = layer_runs(Precision::Fp32);
        let n = ModelConfig::preset("micro").unwrap().n_routed_experts;
        let mut both = p.zeros_like();
        for (_, _, jobs) in &local {
            run_wjobs(&rt, jobs, &mut both).unwrap();
        }
        for (m, ((h, dx, jobs), (h_ref, dx_ref, jobs_ref))) in ep.iter().zip(&local).enumerate() {
            assert_eq!(bits(h), bits(h_ref), "member {m}: forward output");
            assert_eq!(bits(dx), bits(dx_ref), "member {m}: input gradient");
            let (mut g, mut g_ref) = (p.zeros_like(), p.zeros_like());
            run_wjobs(&rt, jobs, &mut g).unwrap();
            run_wjobs(&rt, jobs_ref, &mut g_ref).unwrap();
            let own = local_experts(n, 2, m);
            for (name, _, v) in g.iter() {
                match expert_of(name) {
                    Some(e) if own.contains(&e) => {
                        assert_eq!(bits(v), bits(both.get(name).unwrap()), "{name}")
                    }
                    Some(_) => assert!(v.iter().all(|&x| x == 0.0), "{name} is not member {m}'s"),
                    None => assert_eq!(bits(v), bits(g_ref.get(name).unwrap()), "{name}"),
                }
            }
        }
    }

    /// In the FP8 modes the dispatch travels as E4M3 codes with 1×128 scales and the combine as bf16:
    /// the layer's outputs and input gradients stay within that rounding of the local FP8 layer's.
    #[test]
    fn an_expert_parallel_moe_layer_in_fp8_stays_close_to_the_local_layer() {
        for precision in [Precision::Fp8, Precision::Fp8Ue8m0] {
            close_in(precision);
        }
    }

    fn close_in(precision: Precision) {
        let (local, ep, _, _) = layer_runs(precision);
        let rel = |a: &[f32], b: &[f32]| {
            let d2: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
            let n2: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
            (d2 / n2).sqrt()
        };
        for ((h, dx, _), (h_ref, dx_ref, _)) in ep.iter().zip(&local) {
            let (eh, edx) = (rel(h, h_ref), rel(dx, dx_ref));
            assert!(
                eh < 1e-2 && edx < 3e-2,
                "{precision:?}: output error {eh:e}, input-gradient error {edx:e}"
            );
            assert!(eh > 0.0, "the FP8 dispatch must round something");
        }
    }

    #[test]
    fn expert_tensors_are_split_evenly_and_placed_after_the_replicated_ones() {
        let config = ModelConfig::preset("micro").unwrap();
        let spec = StageSpec::whole(&config);
        let n = config.n_routed_experts;
        let (specs, prefix) = stage_specs_ep(&config, &spec, 2, 1).unwrap();
        let mut at = 0;
        let mut seen_expert = false;
        for (name, shape) in &specs {
            match expert_of(name) {
                Some(e) => {
                    assert!(local_experts(n, 2, 1).contains(&e), "{name}");
                    seen_expert = true;
                }
                None => {
                    assert!(!seen_expert, "{name} after an expert tensor");
                    at += shape.iter().product::<usize>();
                }
            }
        }
        assert!(seen_expert);
        assert_eq!(at, prefix);
        assert_eq!(
            expert_of("model.layers.3.mlp.experts.12.up_proj.weight"),
            Some(12)
        );
        assert_eq!(
            expert_of("model.layers.3.mlp.shared_experts.up_proj.weight"),
            None
        );
        assert_eq!(n, 8);
        assert!(stage_specs_ep(&config, &spec, 3, 0).is_err());
    }
}
