//! Acceptance 1: one fp32 forward/backward of `shared/golden/v3-tiny` matches the independent PyTorch
//! reference — logits and hidden states within 1e-4 normwise, total loss within 1e-5 relative, identical
//! routing, every gradient within 1e-3 normwise per tensor — by comparing our dump with the golden files.

use model::loss::LossWeights;
use model::model::{normwise_rel, read_tensors, reference_step};
use model::params::ParamStore;
use model::precision::{Precision, Runtime};
use std::path::PathBuf;

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden/v3-tiny")
}

#[test]
fn matches_the_pytorch_reference_in_fp32() {
    let dir = golden();
    let (config, params, bias) = ParamStore::load_hf_dir(&dir).unwrap();
    let toks = model::npy::read_ints(dir.join("tokens.npy")).unwrap();
    let (b, t) = (toks.shape[0], toks.shape[1]);
    let tokens: Vec<u32> = toks.data.iter().map(|&x| x as u32).collect();
    let rt = Runtime::cpu(2, Precision::Fp32);
    let res = reference_step(
        &rt,
        &config,
        &params,
        &bias,
        &tokens,
        b,
        t,
        LossWeights {
            mtp_lambda: 0.3,
            balance_alpha: 1e-4,
        },
    )
    .unwrap();
    let reference = read_tensors(&dir.join("reference.safetensors")).unwrap();
    let grads = read_tensors(&dir.join("grads.safetensors")).unwrap();

    let mut ours = std::collections::BTreeMap::new();
    for (name, shape, v) in &res.trace.floats {
        ours.insert(
            name.clone(),
            (
                shape.clone(),
                v.iter().map(|&x| x as f64).collect::<Vec<f64>>(),
            ),
        );
    }
    for (name, shape, v) in &res.trace.ints {
        ours.insert(
            name.clone(),
            (
                shape.clone(),
                v.iter().map(|&x| x as f64).collect::<Vec<f64>>(),
            ),
        );
    }
    let mut worst = (String::new(), 0.0f64);
    for (name, (shape, want)) in &reference {
        if name == "tokens" {
            continue;
        }
        let (oshape, got) = ours
            .get(name)
            .unwrap_or_else(|| panic!("we do not produce `{name}`"));
        assert_eq!(oshape, shape, "{name}");
        if name.ends_with("topk_idx") || name.ends_with("expert_load") {
            assert_eq!(got, want, "routing differs: {name}");
            continue;
        }
        let err = if name.starts_with("loss") {
            ((got[0] - want[0]) / want[0]).abs()
        } else {
            normwise_rel(got, want)
        };
        let tol = if name.starts_with("loss") { 1e-5 } else { 1e-4 };
        eprintln!("{name:32} rel err {err:.2e}");
        assert!(err <= tol, "{name}: relative error {err:.3e} > {tol:e}");
    }
    for (name, (shape, want)) in &grads {
        let got = res
            .grads
            .get(name)
            .unwrap_or_else(|| panic!("no gradient for `{name}`"));
        assert_eq!(res.grads.shape(name).unwrap(), shape.as_slice(), "{name}");
        let got: Vec<f64> = got.iter().map(|&x| x as f64).collect();
        let err = normwise_rel(&got, want);
        if err > worst.1 {
            worst = (name.clone(), err);
        }
        assert!(err <= 1e-3, "gradient {name}: normwise error {err:.3e}");
    }
    assert_eq!(grads.len(), res.grads.len(), "gradient tensor count");
    eprintln!("worst gradient: {} {:.2e}", worst.0, worst.1);

    // The dump that `moetrain step` writes has exactly the golden files' names and shapes.
    let out = std::env::temp_dir().join(format!("moetrain-golden-dump-{}", std::process::id()));
    model::model::write_dump(&out, &res, &tokens, b, t).unwrap();
    for file in ["reference.safetensors", "grads.safetensors"] {
        let ours = read_tensors(&out.join(file)).unwrap();
        let theirs = read_tensors(&dir.join(file)).unwrap();
        let shapes = |m: &model::model::Tensors| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.0.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(shapes(&ours), shapes(&theirs), "{file}");
    }
    assert_eq!(
        read_tensors(&out.join("reference.safetensors")).unwrap()["tokens"].1,
        reference["tokens"].1
    );
    std::fs::remove_dir_all(&out).unwrap();
}
