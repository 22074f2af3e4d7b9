//! Precision modes on the `tiny` preset (every GEMM inner dimension a multiple of 128, 256 tokens per
//! micro-batch so 128×1 Wgrad tiles are full): bf16 and fp8 forward/backward stay close to fp32 but are
//! really different computations, and the FP8 `Linear` follows the recipe's tilings exactly.

use model::ModelConfig;
use model::loss::LossWeights;
use model::model::{normwise_rel, reference_step};
use model::params::{Normal, ParamStore, RoutingBias};
use model::precision::{LinInput, Linear, Precision, Runtime};

fn run(
    p: Precision,
    c: &ModelConfig,
    params: &ParamStore,
    toks: &[u32],
) -> model::model::StepResult {
    let rt = Runtime::cpu(2, p);
    reference_step(
        &rt,
        c,
        params,
        &RoutingBias::zeros(c),
        toks,
        2,
        128,
        LossWeights::default(),
    )
    .unwrap()
}

#[test]
fn bf16_and_fp8_track_fp32_on_tiny() {
    let c = ModelConfig::preset("tiny").unwrap();
    let params = ParamStore::init(&c, 1);
    let mut rng = Normal::new(9);
    let toks: Vec<u32> = (0..256)
        .map(|_| (rng.next_u64() % c.vocab_size as u64) as u32)
        .collect();
    let f32r = run(Precision::Fp32, &c, &params, &toks);
    let flat = |r: &model::model::StepResult| {
        r.grads
            .flat()
            .iter()
            .map(|&x| x as f64)
            .collect::<Vec<f64>>()
    };
    let g32 = flat(&f32r);
    for (p, loss_tol, grad_tol) in [(Precision::Bf16, 1e-3, 0.05), (Precision::Fp8, 5e-3, 0.15)] {
        let r = run(p, &c, &params, &toks);
        let dl = ((r.loss.total - f32r.loss.total) / f32r.loss.total).abs();
        let dg = normwise_rel(&flat(&r), &g32);
        eprintln!(
            "{p:?}: loss {:.6} vs fp32 {:.6} (rel {dl:.2e}); gradient normwise rel {dg:.2e}",
            r.loss.total, f32r.loss.total
        );
        assert!(dl < loss_tol, "{p:?} loss drifts by {dl:.2e}");
        assert!(dg < grad_tol, "{p:?} gradients drift by {dg:.2e}");
        assert!(
            dg > 1e-5,
            "{p:?} gives fp32 results: the mode is not applied"
        );
    }
}

/// Fprop, Dgrad and Wgrad of an FP8 projection equal the exact products of the dequantized operands with
/// the recipe's tilings: x 1×128, W 128×128, dy 1×128 (Dgrad), and dy, x 128×1 along tokens (Wgrad).
#[test]
fn fp8_linear_uses_the_recipe_tilings() {
    use kernels::fp8::{ScaleFmt, e4m3_decode, quantize_act, quantize_act_t, quantize_weight};
    let ctx = kernels::ExecCtx::cpu(1);
    let (m, n, k) = (256usize, 192usize, 256usize);
    let mut p = ParamStore::<f32>::from_specs(vec![("w".into(), vec![n, k])]);
    let mut rng = Normal::new(3);
    p.flat_mut()
        .iter_mut()
        .for_each(|v| *v = rng.sample() as f32 * 0.05);
    let x: Vec<f32> = (0..m * k)
        .map(|i| rng.sample() as f32 * (1.0 + (i % 5) as f32))
        .collect();
    let dy: Vec<f32> = (0..m * n).map(|_| rng.sample() as f32).collect();
    let lin = Linear::new(p.require("w").unwrap(), n, k);
    let rt = Runtime::cpu(1, Precision::Fp8);
    let xin = lin.input(&rt, x.clone(), m).unwrap();
    assert!(matches!(xin, LinInput::Fp8(_)));
    // Reference dequantizations.
    let deq_rows = |v: &[f32], r: usize, cc: usize| {
        let (mut codes, mut sc) = (vec![0u8; r * cc], vec![0f32; r * cc.div_ceil(128)]);
        quantize_act(&ctx, &mut codes, &mut sc, v, r, cc, ScaleFmt::F32).unwrap();
        (0..r * cc)
            .map(|i| {
                e4m3_decode(codes[i]) as f64
                    * sc[(i / cc) * cc.div_ceil(128) + (i % cc) / 128] as f64
            })
            .collect::<Vec<f64>>()
    };
    let deq_cols = |v: &[f32], r: usize, cc: usize| {
        // 128×1 tiles: codes_t [cc, r]; returned in [r, cc] order.
        let (mut codes, mut sc) = (vec![0u8; r * cc], vec![0f32; cc * r.div_ceil(128)]);
        quantize_act_t(&ctx, &mut codes, &mut sc, v, r, cc, ScaleFmt::F32).unwrap();
        let mut out = vec![0f64; r * cc];
        for c in 0..cc {
            for i in 0..r {
                out[i * cc + c] =
                    e4m3_decode(codes[c * r + i]) as f64 * sc[c * r.div_ceil(128) + i / 128] as f64;
            }
        }
        out
    };
    let w = p.slice(lin.w).to_vec();
    let (mut wc, mut ws) = (vec![0u8; n * k], vec![0f32; 2 * 2]);
    quantize_weight(&ctx, &mut wc, &mut ws, &w, n, k, ScaleFmt::F32).unwrap();
    let wq: Vec<f64> = (0..n * k)
        .map(|i| e4m3_decode(wc[i]) as f64 * ws[(i / k / 128) * 2 + (i % k) / 128] as f64)
        .collect();
    let xq = deq_rows(&x, m, k);
    // Fprop.
    let y = lin.forward(&rt, &p, &xin).unwrap();
    let mut yr = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            yr[i * n + j] = (0..k).map(|c| xq[i * k + c] * wq[j * k + c]).sum();
        }
    }
    let yd: Vec<f64> = y.iter().map(|&v| v as f64).collect();
    assert!(
        normwise_rel(&yd, &yr) < 1e-5,
        "fprop {}",
        normwise_rel(&yd, &yr)
    );
    // Dgrad.
    let mut dx = vec![0f32; m * k];
    lin.backward_input(&rt, &p, &mut dx, &dy, m, kernels::Accumulate::Overwrite)
        .unwrap();
    let dyq = deq_rows(&dy, m, n);
    let mut dxr = vec![0f64; m * k];
    for i in 0..m {
        for c in 0..k {
            dxr[i * k + c] = (0..n).map(|j| dyq[i * n + j] * wq[j * k + c]).sum();
        }
    }
    let dxd: Vec<f64> = dx.iter().map(|&v| v as f64).collect();
    assert!(
        normwise_rel(&dxd, &dxr) < 1e-5,
        "dgrad {}",
        normwise_rel(&dxd, &dxr)
    );
    // Wgrad: x is the cached 1×128 copy, re-tiled 128×1.
    let mut g = p.zeros_like();
    lin.backward_weight(&rt, &mut g, &dy, &xin).unwrap();
    let xq32: Vec<f32> = xq.iter().map(|&v| v as f32).collect();
    let xt = deq_cols(&xq32, m, k);
    let dyt = deq_cols(&dy, m, n);
    let mut dwr = vec![0f64; n * k];
    for j in 0..n {
        for c in 0..k {
            dwr[j * k + c] = (0..m).map(|i| dyt[i * n + j] * xt[i * k + c]).sum();
        }
    }
    let dwd: Vec<f64> = g.flat().iter().map(|&v| v as f64).collect();
    assert!(
        normwise_rel(&dwd, &dwr) < 1e-5,
        "wgrad {}",
        normwise_rel(&dwd, &dwr)
    );
}
