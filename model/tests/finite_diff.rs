//! Acceptance 2: finite-difference checks in f64 of every layer's B (input gradient) and W (parameter
//! gradients) on the `micro` config, and B followed by W equal to the fused backward bit for bit.
//!
//! Method: each check uses a scalar objective L = Σ r ⊙ output (+ the layer's own loss terms), with r and
//! the inputs drawn from a printed seed. For the input and for EVERY parameter tensor separately we draw a
//! random direction v and compare the analytic ⟨∇, v⟩ with the central difference
//! (L(θ+εv) − L(θ−εv)) / 2ε at ε = 1e-5, everything in f64. The truncation error is O(ε²) ≈ 1e-10 and the
//! rounding error is absolute, ≈ 1e-16·|L|/ε times a modest growth factor, so the check allows
//! 1e-9·(1 + |L|) absolute on top of 1e-6 relative. That is tight enough that a wrong
//! factor, a missing term (for example the balance-loss gradient at α = 0.5) or a transposed weight
//! gradient fails by orders of magnitude, while honest f64 arithmetic passes. Each check prints its seed
//! and worst error. Routing is piecewise constant in
//! the inputs; ε is far below the routing margins of these draws, which the test asserts by checking
//! that the perturbed runs route identically.

use model::ModelConfig;
use model::layers::decoder::{DecoderLayer, Head, MtpModule};
use model::layers::mla::Mla;
use model::layers::mlp::Mlp;
use model::layers::norm::{Embedding, RmsNorm};
use model::layers::{WJob, WSink, run_wjobs};
use model::loss::LossWeights;
use model::params::{Normal, ParamStore, RoutingBias, StageSpec};
use model::precision::{Precision, Runtime};
use model::stage::{MicroBatch, Stage};

const EPS: f64 = 1e-5;
const TOL: f64 = 1e-6;
const B: usize = 2;
const T: usize = 6;

fn micro() -> ModelConfig {
    ModelConfig::preset("micro").unwrap()
}

fn rt() -> Runtime {
    Runtime::cpu(1, Precision::Fp32)
}

fn randn(rng: &mut Normal, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| rng.sample() * scale).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Model parameters in f64 with random (non-unit) norm weights and a non-zero routing bias.
fn setup(seed: u64) -> (ModelConfig, ParamStore<f64>, RoutingBias) {
    let c = micro();
    let mut p: ParamStore<f64> = ParamStore::<f32>::init(&c, seed).convert();
    let mut rng = Normal::new(seed ^ 0x55);
    let names: Vec<String> = p
        .iter()
        .map(|(n, _, _)| n.to_string())
        .filter(|n| n.ends_with("norm.weight"))
        .collect();
    for n in names {
        p.get_mut(&n)
            .unwrap()
            .iter_mut()
            .for_each(|w| *w = 1.0 + 0.3 * rng.sample());
    }
    let mut bias = RoutingBias::zeros(&c);
    for l in bias.layer_ids().to_vec() {
        bias.get_mut(l)
            .unwrap()
            .iter_mut()
            .for_each(|b| *b = (0.05 * rng.sample()) as f32);
    }
    (c, p, bias)
}

/// Compares analytic and numeric directional derivatives for the input and each listed tensor.
#[allow(clippy::too_many_arguments)]
fn check(
    what: &str,
    seed: u64,
    p: &ParamStore<f64>,
    tensors: &[String],
    x: &[f64],
    grads: &ParamStore<f64>,
    dx: Option<&[f64]>,
    loss: &dyn Fn(&ParamStore<f64>, &[f64]) -> f64,
) {
    let mut rng = Normal::new(seed ^ 0xfd);
    let mut worst = 0f64;
    // Rounding noise of the central difference is absolute, about 1e-16·|L|/ε times a modest growth
    // factor; allow 1e-9·(1 + |L|) of it on top of the relative tolerance.
    let floor = 1e-9 * (1.0 + loss(p, x).abs());
    let mut rel = |name: &str, an: f64, num: f64| {
        let err = ((an - num).abs() - floor).max(0.0) / an.abs().max(num.abs()).max(1e-12);
        worst = worst.max(err);
        assert!(
            err <= TOL,
            "{what} (seed {seed}): {name}: analytic {an:.12e} vs finite difference {num:.12e} (rel {err:.2e})"
        );
    };
    if let Some(dx) = dx {
        let v = randn(&mut rng, x.len(), 1.0);
        let xp: Vec<f64> = x.iter().zip(&v).map(|(a, b)| a + EPS * b).collect();
        let xm: Vec<f64> = x.iter().zip(&v).map(|(a, b)| a - EPS * b).collect();
        rel(
            "input (B)",
            dot(dx, &v),
            (loss(p, &xp) - loss(p, &xm)) / (2.0 * EPS),
        );
    }
    for name in tensors {
        let n = p.get(name).unwrap().len();
        let v = randn(&mut rng, n, 1.0);
        let mut pp = p.clone();
        pp.get_mut(name)
            .unwrap()
            .iter_mut()
            .zip(&v)
            .for_each(|(a, b)| *a += EPS * b);
        let mut pm = p.clone();
        pm.get_mut(name)
            .unwrap()
            .iter_mut()
            .zip(&v)
            .for_each(|(a, b)| *a -= EPS * b);
        let an = dot(grads.get(name).unwrap(), &v);
        rel(name, an, (loss(&pp, x) - loss(&pm, x)) / (2.0 * EPS));
    }
    eprintln!(
        "{what}: seed {seed}, {} tensors, worst relative error {worst:.2e}",
        tensors.len()
    );
}

fn tensors_with_prefix(p: &ParamStore<f64>, prefix: &str) -> Vec<String> {
    p.iter()
        .map(|(n, _, _)| n.to_string())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

fn wpass(jobs: &[WJob<f64>], p: &ParamStore<f64>) -> ParamStore<f64> {
    let mut g = p.zeros_like();
    run_wjobs(&rt(), jobs, &mut g).unwrap();
    g
}

#[test]
fn rmsnorm_and_embedding() {
    let seed = 11;
    let (c, p, _) = setup(seed);
    let mut rng = Normal::new(seed);
    let d = c.hidden_size;
    let norm = RmsNorm {
        w: p.require("model.layers.0.input_layernorm.weight").unwrap(),
        d,
        eps: 1e-6,
    };
    let x = randn(&mut rng, B * T * d, 1.0);
    let r = randn(&mut rng, B * T * d, 1.0);
    let f = |p: &ParamStore<f64>, x: &[f64]| dot(&norm.forward(p, x.to_vec()).unwrap().0, &r);
    let (_, saved) = norm.forward(&p, x.clone()).unwrap();
    let mut jobs = Vec::new();
    let mut dx = vec![0.0; x.len()];
    norm.backward_input(
        &p,
        &mut dx,
        kernels::Accumulate::Overwrite,
        r.clone(),
        &saved,
        &mut WSink::Defer(&mut jobs),
    )
    .unwrap();
    let g = wpass(&jobs, &p);
    check(
        "rmsnorm",
        seed,
        &p,
        &["model.layers.0.input_layernorm.weight".into()],
        &x,
        &g,
        Some(&dx),
        &f,
    );

    let emb = Embedding {
        w: p.require("model.embed_tokens.weight").unwrap(),
        vocab: c.vocab_size,
        d,
    };
    let toks: Vec<u32> = (0..B * T)
        .map(|i| ((i * 7 + 3) % c.vocab_size) as u32)
        .collect();
    let f = |p: &ParamStore<f64>, _: &[f64]| dot(&emb.forward(p, &toks).unwrap(), &r);
    let mut jobs = Vec::new();
    emb.backward(
        std::sync::Arc::new(toks.clone()),
        r.clone(),
        &mut WSink::Defer(&mut jobs),
    )
    .unwrap();
    let g = wpass(&jobs, &p);
    check(
        "embedding",
        seed,
        &p,
        &["model.embed_tokens.weight".into()],
        &[],
        &g,
        None,
        &f,
    );
}

#[test]
fn mla_and_mlp() {
    let seed = 12;
    let (c, p, _) = setup(seed);
    let rt = rt();
    let mut rng = Normal::new(seed);
    let d = c.hidden_size;
    let mla = Mla::new(&c, &p, 0).unwrap();
    let x = randn(&mut rng, B * T * d, 1.0);
    let r = randn(&mut rng, B * T * d, 1.0);
    let f =
        |p: &ParamStore<f64>, x: &[f64]| dot(&mla.forward(&rt, p, x.to_vec(), B, T).unwrap().0, &r);
    let (_, saved) = mla.forward(&rt, &p, x.clone(), B, T).unwrap();
    let mut jobs = Vec::new();
    let mut dx = vec![0.0; x.len()];
    mla.backward_input(
        &rt,
        &p,
        &mut dx,
        r.clone(),
        saved,
        &mut WSink::Defer(&mut jobs),
    )
    .unwrap();
    let g = wpass(&jobs, &p);
    let mut names = tensors_with_prefix(&p, "model.layers.0.self_attn.");
    names.push("model.layers.0.input_layernorm.weight".into());
    assert_eq!(names.len(), 8);
    check("mla", seed, &p, &names, &x, &g, Some(&dx), &f);

    let mlp = Mlp::new(&p, "model.layers.0.mlp", d, c.intermediate_size).unwrap();
    let run = |p: &ParamStore<f64>, x: &[f64]| {
        let xin = mlp.input(&rt, x.to_vec(), B * T).unwrap();
        mlp.forward(&rt, p, xin).unwrap()
    };
    let f = |p: &ParamStore<f64>, x: &[f64]| dot(&run(p, x).0, &r);
    let (_, saved) = run(&p, &x);
    let mut jobs = Vec::new();
    let mut dx = vec![0.0; x.len()];
    mlp.backward_input(
        &rt,
        &p,
        &mut dx,
        kernels::Accumulate::Overwrite,
        r.clone(),
        saved,
        &mut WSink::Defer(&mut jobs),
    )
    .unwrap();
    let g = wpass(&jobs, &p);
    check(
        "dense swiglu",
        seed,
        &p,
        &tensors_with_prefix(&p, "model.layers.0.mlp."),
        &x,
        &g,
        Some(&dx),
        &f,
    );
}

/// A whole decoder layer (dense and MoE): B to the input and W for every tensor, including the router
/// and the balance-loss gradient (α = 0.5, loss scale 0.7 so that both are visible).
#[test]
fn decoder_layers_dense_and_moe() {
    let seed = 13;
    let (c, p, bias) = setup(seed);
    let rt = rt();
    let mut rng = Normal::new(seed);
    let d = c.hidden_size;
    let (alpha, scale) = (0.5, 0.7);
    for layer in [0usize, 1] {
        let dl = DecoderLayer::new(&c, &p, layer, alpha, 0..c.n_routed_experts).unwrap();
        let x = randn(&mut rng, B * T * d, 1.0);
        let r = randn(&mut rng, B * T * d, 1.0);
        let route = |p: &ParamStore<f64>, x: &[f64]| {
            let (h, saved, stats) = dl
                .forward(&rt, p, x.to_vec(), B, T, bias.get(layer), None)
                .unwrap();
            let idx = saved.routing().map(|r| r.topk_idx.clone());
            (dot(&h, &r) + scale * stats.balance_loss, idx)
        };
        let (_, idx0) = route(&p, &x);
        let f = |p: &ParamStore<f64>, x: &[f64]| {
            let (l, idx) = route(p, x);
            assert_eq!(
                idx, idx0,
                "routing flipped under perturbation; pick another seed"
            );
            l
        };
        let (_, saved, stats) = dl
            .forward(&rt, &p, x.clone(), B, T, bias.get(layer), None)
            .unwrap();
        if layer == 1 {
            assert!(stats.balance_loss > 0.0 && saved.routing().is_some());
        }
        let mut jobs = Vec::new();
        let dx = dl
            .backward_input(
                &rt,
                &p,
                r.clone(),
                saved,
                scale,
                None,
                &mut WSink::Defer(&mut jobs),
            )
            .unwrap();
        let g = wpass(&jobs, &p);
        let names = tensors_with_prefix(&p, &format!("model.layers.{layer}."));
        check(
            &format!("decoder layer {layer}"),
            seed,
            &p,
            &names,
            &x,
            &g,
            Some(&dx),
            &f,
        );
    }
}

/// The head with its loss, and the MTP module (eh_proj, norms, MoE block, shared head, embedding).
#[test]
fn head_and_mtp() {
    let seed = 14;
    let (c, p, bias) = setup(seed);
    let rt = rt();
    let mut rng = Normal::new(seed);
    let (d, v) = (c.hidden_size, c.vocab_size);
    let head = Head::new(&c, &p, "model.norm.weight").unwrap();
    let x = randn(&mut rng, B * T * d, 1.0);
    let r = randn(&mut rng, B * T * v, 1.0);
    let f = |p: &ParamStore<f64>, x: &[f64]| dot(&head.forward(&rt, p, x.to_vec()).unwrap().1, &r);
    let (_, _, saved) = head.forward(&rt, &p, x.clone()).unwrap();
    let mut jobs = Vec::new();
    let mut dx = vec![0.0; x.len()];
    head.backward_input(
        &rt,
        &p,
        &mut dx,
        r.clone(),
        saved,
        &mut WSink::Defer(&mut jobs),
    )
    .unwrap();
    let g = wpass(&jobs, &p);
    check(
        "head",
        seed,
        &p,
        &["model.norm.weight".into(), "lm_head.weight".into()],
        &x,
        &g,
        Some(&dx),
        &f,
    );

    let (alpha, scale) = (0.5, 0.7);
    let mtp = MtpModule::new(&c, &p, 1, alpha, 0..c.n_routed_experts).unwrap();
    let emb = Embedding {
        w: p.require("model.embed_tokens.weight").unwrap(),
        vocab: v,
        d,
    };
    let toks: Vec<u32> = (0..B * T).map(|i| ((i * 13 + 5) % v) as u32).collect();
    let rl = randn(&mut rng, B * (T - 1) * v, 1.0);
    let lid = c.num_hidden_layers;
    let f = |p: &ParamStore<f64>, x: &[f64]| {
        let (_, logits, _, stats) = mtp
            .forward(&rt, p, &emb, x, &toks, B, T, bias.get(lid), None)
            .unwrap();
        dot(&logits, &rl) + scale * stats.balance_loss
    };
    let (_, _, saved, _) = mtp
        .forward(&rt, &p, &emb, &x, &toks, B, T, bias.get(lid), None)
        .unwrap();
    let mut jobs = Vec::new();
    let mut dx = vec![0.0; x.len()];
    let dk = vec![0.0; B * (T - 1) * d];
    mtp.backward_input(
        &rt,
        &p,
        &emb,
        &mut dx,
        rl.clone(),
        dk,
        saved,
        scale,
        None,
        &mut WSink::Defer(&mut jobs),
    )
    .unwrap();
    let g = wpass(&jobs, &p);
    let mut names = tensors_with_prefix(&p, &format!("model.layers.{lid}."));
    names.push("model.embed_tokens.weight".into());
    names.push("lm_head.weight".into());
    check("mtp module", seed, &p, &names, &x, &g, Some(&dx), &f);
}

fn tokens(c: &ModelConfig, seed: u64) -> Vec<u32> {
    let mut rng = Normal::new(seed);
    (0..B * T)
        .map(|_| (rng.next_u64() % c.vocab_size as u64) as u32)
        .collect()
}

/// The full loss (main CE + λ·MTP + balance) of a two-stage split: W for every tensor of both stages and
/// B across the stage boundary.
#[test]
fn two_stage_model_loss() {
    let seed = 15;
    let (c, p, bias) = setup(seed);
    let rt = rt();
    let toks = tokens(&c, seed);
    let w = LossWeights {
        mtp_lambda: 0.3,
        balance_alpha: 0.5,
    };
    let s0 = StageSpec {
        layers: 0..1,
        first: true,
        last: false,
    };
    let s1 = StageSpec {
        layers: 1..2,
        first: false,
        last: true,
    };
    let mut st0 = Stage::new(&c, s0, &p, w).unwrap();
    let mut st1 = Stage::new(&c, s1, &p, w).unwrap();
    let mb = MicroBatch {
        id: 3,
        tokens: &toks,
        b: B,
        t: T,
        loss_scale: 1.0,
    };
    let h = st0
        .forward(&rt, &p, &bias, &mb, None)
        .unwrap()
        .hidden
        .unwrap();
    let loss1 = |p: &ParamStore<f64>, x: &[f64]| {
        let mut s = Stage::new(
            &c,
            StageSpec {
                layers: 1..2,
                first: false,
                last: true,
            },
            p,
            w,
        )
        .unwrap();
        s.forward(&rt, p, &bias, &mb, Some(x.to_vec()))
            .unwrap()
            .loss
            .total
    };
    let total = |p: &ParamStore<f64>, _: &[f64]| {
        let mut a = Stage::new(
            &c,
            StageSpec {
                layers: 0..1,
                first: true,
                last: false,
            },
            p,
            w,
        )
        .unwrap();
        let out = a.forward(&rt, p, &bias, &mb, None).unwrap();
        out.loss.total + loss1(p, &out.hidden.unwrap())
    };
    st1.forward(&rt, &p, &bias, &mb, Some(h.clone())).unwrap();
    let mut g = p.zeros_like();
    let dh = st1.backward_input(&rt, &p, 3, None).unwrap().unwrap();
    st1.backward_weight(&rt, 3, &mut g).unwrap();
    check(
        "last stage input (B across stages)",
        seed,
        &p,
        &[],
        &h,
        &g,
        Some(&dh),
        &loss1,
    );
    st0.backward_input(&rt, &p, 3, Some(dh)).unwrap();
    st0.backward_weight(&rt, 3, &mut g).unwrap();
    let names: Vec<String> = p.iter().map(|(n, _, _)| n.to_string()).collect();
    check(
        "two-stage total loss",
        seed,
        &p,
        &names,
        &[],
        &g,
        None,
        &total,
    );
}

/// B followed by W gives exactly the fused backward's gradients (f32 and f64), and the input gradient
/// handed to the previous stage is identical too.
#[test]
fn split_backward_equals_fused_bitwise() {
    fn run<T: kernels::Real>(c: &ModelConfig, p: &ParamStore<T>, bias: &RoutingBias, toks: &[u32]) {
        let rt = Runtime::cpu(2, Precision::Fp32);
        let w = LossWeights::default();
        let spec = StageSpec {
            layers: 0..2,
            first: false,
            last: true,
        };
        let mut fused = Stage::new(c, spec.clone(), p, w).unwrap();
        let mut split = Stage::new(c, spec, p, w).unwrap();
        let mut rng = Normal::new(5);
        let x: Vec<T> = (0..B * T * c.hidden_size)
            .map(|_| T::from_f64(rng.sample()))
            .collect();
        let (mut gf, mut gs) = (p.zeros_like(), p.zeros_like());
        for id in 0..2u64 {
            let mb = MicroBatch {
                id,
                tokens: toks,
                b: B,
                t: T,
                loss_scale: 0.5,
            };
            fused.forward(&rt, p, bias, &mb, Some(x.clone())).unwrap();
            split.forward(&rt, p, bias, &mb, Some(x.clone())).unwrap();
        }
        let df0 = fused.backward(&rt, p, 0, None, &mut gf).unwrap();
        let df1 = fused.backward(&rt, p, 1, None, &mut gf).unwrap();
        let ds0 = split.backward_input(&rt, p, 0, None).unwrap();
        let ds1 = split.backward_input(&rt, p, 1, None).unwrap();
        split.backward_weight(&rt, 0, &mut gs).unwrap();
        split.backward_weight(&rt, 1, &mut gs).unwrap();
        let bits = |v: &[T]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&df0.unwrap()), bits(&ds0.unwrap()));
        assert_eq!(bits(&df1.unwrap()), bits(&ds1.unwrap()));
        assert_eq!(bits(gf.flat()), bits(gs.flat()));
        assert!(gf.flat().iter().any(|v| v.to_f64() != 0.0));
        assert!(
            split.backward_weight(&rt, 0, &mut gs).is_err(),
            "jobs are consumed"
        );
    }
    let (c, p, bias) = setup(16);
    let toks = tokens(&c, 16);
    run::<f64>(&c, &p, &bias, &toks);
    run::<f32>(&c, &p.convert(), &bias, &toks);
}

/// The four MoE components called one by one (as the DualPipe executor does) give exactly the bits of the
/// layer's own forward and backward.
#[test]
fn moe_components_compose_to_the_layer() {
    use model::layers::moe;
    let (c, p, bias) = setup(17);
    let rt = rt();
    let mut rng = Normal::new(17);
    let d = c.hidden_size;
    let dl = DecoderLayer::new(&c, &p, 1, 0.5, 0..c.n_routed_experts).unwrap();
    let x = randn(&mut rng, B * T * d, 1.0);
    let dh = randn(&mut rng, B * T * d, 1.0);
    // Whole layer.
    let (h_ref, saved, _) = dl
        .forward(&rt, &p, x.clone(), B, T, bias.get(1), None)
        .unwrap();
    let mut jobs_ref = Vec::new();
    let dx_ref = dl
        .backward_input(
            &rt,
            &p,
            dh.clone(),
            saved,
            0.7,
            None,
            &mut WSink::Defer(&mut jobs_ref),
        )
        .unwrap();
    let g_ref = wpass(&jobs_ref, &p);
    // Component by component.
    let (out, attn_saved) = dl.attn_forward(&rt, &p, x, B, T, bias.get(1)).unwrap();
    let routing = out.routing.unwrap();
    let disp = moe::dispatch(&out.u, &routing, d, 1);
    assert_eq!(disp.tokens_per_rank, vec![B * T * c.num_experts_per_tok]);
    assert_eq!(
        disp.tokens_per_expert.iter().sum::<usize>(),
        B * T * c.num_experts_per_tok
    );
    let (y_perm, exp_saved) = dl.experts_forward(&rt, &p, &disp).unwrap();
    let (h, comb_saved) = dl
        .combine_forward(&rt, &p, out.a, out.u, &y_perm, &disp)
        .unwrap();
    assert_eq!(h, h_ref);
    let mut jobs = Vec::new();
    let mut sink = WSink::Defer(&mut jobs);
    let (dperm, mut du) = dl
        .combine_backward(&rt, &p, &dh, &disp, comb_saved, &mut sink)
        .unwrap();
    let (dxp, dgate) = dl
        .experts_backward(&rt, &p, &dperm, exp_saved, &mut sink)
        .unwrap();
    dl.dispatch_backward(
        &rt, &p, &mut du, &dxp, &dgate, &disp, routing, 0.7, &mut sink,
    )
    .unwrap();
    let dx = dl
        .attn_backward(&rt, &p, dh, du, attn_saved, &mut sink)
        .unwrap();
    assert_eq!(dx, dx_ref);
    assert_eq!(wpass(&jobs, &p).flat(), g_ref.flat());
}
