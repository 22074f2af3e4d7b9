//! safetensors front end of the quantizers, used by `moetrain fp8 quantize`: every tensor of the input
//! becomes `<name>.codes` (U8, raw E4M3 bits) and `<name>.scales` (F32), the layout of
//! `shared/golden/fp8/expected.safetensors`.
//!
//! Invariant: tensors are treated as matrices [rows, cols] with cols = the last dimension (a 1-D tensor is
//! one row; leading dimensions fold into rows); F32, F16, BF16 and F64 inputs are widened/rounded to f32
//! first; any other dtype, or a non-finite value, is an error naming the tensor.

use super::quant::{ScaleFmt, TILE, quantize_act, quantize_act_t, quantize_weight};
use crate::exec::ExecCtx;
use crate::{KernelError, Result};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::collections::HashMap;

/// Which tiling `quantize_safetensors` applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantLayout {
    /// 1×128 tiles: codes [rows, cols], scales [rows, ceil(cols/128)].
    Act,
    /// 128×128 blocks: codes [rows, cols], scales [ceil(rows/128), ceil(cols/128)].
    Weight,
    /// 128×1 tiles as the 1×128 rule on the transpose: codes [cols, rows], scales [cols, ceil(rows/128)].
    ActT,
}

fn st_err(name: &str, e: impl std::fmt::Display) -> KernelError {
    KernelError::Safetensors(format!("{name}: {e}"))
}

fn to_f32(name: &str, t: &TensorView<'_>) -> Result<Vec<f32>> {
    let d = t.data();
    let v = match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|b| crate::bf16_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
        Dtype::F64 => d
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        other => {
            return Err(st_err(
                name,
                format!("unsupported dtype {other:?} (want F32, F16, BF16 or F64)"),
            ));
        }
    };
    Ok(v)
}

/// Quantizes every tensor in the safetensors bytes `input` and returns the bytes of the output file
/// (tensors sorted by name; metadata records the layout and scale format).
pub fn quantize_safetensors(
    ctx: &ExecCtx,
    input: &[u8],
    layout: QuantLayout,
    fmt: ScaleFmt,
) -> Result<Vec<u8>> {
    let st = SafeTensors::deserialize(input).map_err(|e| st_err("input", e))?;
    let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
    names.sort();
    let mut outputs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for name in &names {
        let t = st.tensor(name).map_err(|e| st_err(name, e))?;
        let shape = t.shape();
        let cols = shape.last().copied().unwrap_or(1);
        let rows = shape
            .iter()
            .product::<usize>()
            .checked_div(cols)
            .unwrap_or(0);
        let x = to_f32(name, &t)?;
        let mut codes = vec![0u8; x.len()];
        let (codes_shape, scales_shape) = match layout {
            QuantLayout::Act => (vec![rows, cols], vec![rows, cols.div_ceil(TILE)]),
            QuantLayout::Weight => (
                vec![rows, cols],
                vec![rows.div_ceil(TILE), cols.div_ceil(TILE)],
            ),
            QuantLayout::ActT => (vec![cols, rows], vec![cols, rows.div_ceil(TILE)]),
        };
        let mut scales = vec![0f32; scales_shape.iter().product()];
        let r = match layout {
            QuantLayout::Act => quantize_act(ctx, &mut codes, &mut scales, &x, rows, cols, fmt),
            QuantLayout::Weight => {
                quantize_weight(ctx, &mut codes, &mut scales, &x, rows, cols, fmt)
            }
            QuantLayout::ActT => quantize_act_t(ctx, &mut codes, &mut scales, &x, rows, cols, fmt),
        };
        r.map_err(|e| st_err(name, e))?;
        outputs.push((format!("{name}.codes"), Dtype::U8, codes_shape, codes));
        let sbytes = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        outputs.push((format!("{name}.scales"), Dtype::F32, scales_shape, sbytes));
    }
    let views = outputs
        .iter()
        .map(|(n, dt, sh, b)| {
            Ok((
                n.as_str(),
                TensorView::new(*dt, sh.clone(), b).map_err(|e| st_err(n, e))?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let layout_name = match layout {
        QuantLayout::Act => "act",
        QuantLayout::Weight => "weight",
        QuantLayout::ActT => "act-t",
    };
    let fmt_name = match fmt {
        ScaleFmt::F32 => "f32",
        ScaleFmt::Ue8m0 => "ue8m0",
    };
    let meta = HashMap::from([
        ("layout".to_owned(), layout_name.to_owned()),
        ("scale_fmt".to_owned(), fmt_name.to_owned()),
        ("format".to_owned(), "e4m3fn".to_owned()),
    ]);
    safetensors::serialize(views, Some(meta)).map_err(|e| st_err("output", e))
}

#[cfg(test)]
mod tests {
    //! Bit-exact comparison with the independent reference in `shared/golden/fp8{,-ue8m0}`, through the
    //! same function the CLI calls, plus the FP8 GEMM against the golden `gemm.*` products.
    use super::*;
    use crate::exec::Accumulate;
    use crate::fp8::{Fp8Matrix, Fp8Tiling, fp8_matmul_nt_promoted, fp8_matmul_xwt};
    use crate::testutil::{assert_close, rel_err};

    fn golden(dir: &str, file: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/golden")
            .join(dir)
            .join(file);
        std::fs::read(&p).unwrap_or_else(|e| panic!("reading golden file {}: {e}", p.display()))
    }

    fn f32s(t: &TensorView<'_>) -> Vec<f32> {
        to_f32("t", t).unwrap()
    }

    fn f64s(t: &TensorView<'_>) -> Vec<f64> {
        assert_eq!(t.dtype(), Dtype::F64);
        t.data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn codes_and_scales_equal_golden_bit_for_bit() {
        let ctx = ExecCtx::cpu(2);
        for (dir, fmt) in [("fp8", ScaleFmt::F32), ("fp8-ue8m0", ScaleFmt::Ue8m0)] {
            let input = golden(dir, "inputs.safetensors");
            let expected_bytes = golden(dir, "expected.safetensors");
            let expected = SafeTensors::deserialize(&expected_bytes).unwrap();
            let inputs = SafeTensors::deserialize(&input).unwrap();
            let mut checked = 0;
            for layout in [QuantLayout::Act, QuantLayout::Weight] {
                let out_bytes = quantize_safetensors(&ctx, &input, layout, fmt).unwrap();
                let out = SafeTensors::deserialize(&out_bytes).unwrap();
                for name in inputs.names() {
                    // Golden weights (`w*`) use 128×128 blocks, everything else 1×128 tiles.
                    if name.starts_with('w') != (layout == QuantLayout::Weight) {
                        continue;
                    }
                    for part in ["codes", "scales"] {
                        let key = format!("{name}.{part}");
                        let (got, want) =
                            (out.tensor(&key).unwrap(), expected.tensor(&key).unwrap());
                        assert_eq!(got.shape(), want.shape(), "{dir}/{key} shape");
                        assert_eq!(got.dtype(), want.dtype(), "{dir}/{key} dtype");
                        let bad = got
                            .data()
                            .iter()
                            .zip(want.data())
                            .filter(|(a, b)| a != b)
                            .count();
                        assert_eq!(bad, 0, "{dir}/{key}: {bad} bytes differ");
                        checked += 1;
                    }
                }
            }
            assert_eq!(checked, 12, "{dir}: every golden tensor compared");
        }
    }

    #[test]
    fn fp8_gemm_matches_golden_products() {
        let ctx = ExecCtx::cpu(2);
        for (dir, fmt) in [("fp8", ScaleFmt::F32), ("fp8-ue8m0", ScaleFmt::Ue8m0)] {
            let expected_bytes = golden(dir, "expected.safetensors");
            let expected = SafeTensors::deserialize(&expected_bytes).unwrap();
            let input = golden(dir, "inputs.safetensors");
            let act = quantize_safetensors(&ctx, &input, QuantLayout::Act, fmt).unwrap();
            let wgt = quantize_safetensors(&ctx, &input, QuantLayout::Weight, fmt).unwrap();
            let (act, wgt) = (
                SafeTensors::deserialize(&act).unwrap(),
                SafeTensors::deserialize(&wgt).unwrap(),
            );
            for (x, w) in [("x", "w"), ("x_bf16", "w"), ("x_odd", "w_odd")] {
                let (xc, xs) = (
                    act.tensor(&format!("{x}.codes")).unwrap(),
                    act.tensor(&format!("{x}.scales")).unwrap(),
                );
                let (wc, ws) = (
                    wgt.tensor(&format!("{w}.codes")).unwrap(),
                    wgt.tensor(&format!("{w}.scales")).unwrap(),
                );
                let (m, k, n) = (xc.shape()[0], xc.shape()[1], wc.shape()[0]);
                let (xsv, wsv) = (f32s(&xs), f32s(&ws));
                let xq = Fp8Matrix::new(xc.data(), &xsv, m, k, Fp8Tiling::Row).unwrap();
                let wq = Fp8Matrix::new(wc.data(), &wsv, n, k, Fp8Tiling::Block).unwrap();
                let mut y = vec![0f32; m * n];
                fp8_matmul_xwt(&ctx, &mut y, &xq, &wq, Accumulate::Overwrite).unwrap();
                let exact = f64s(&expected.tensor(&format!("gemm.{x}.{w}")).unwrap());
                assert_close(&y, &exact, 1e-5, &format!("{dir} gemm.{x}.{w}"));
                let block: Vec<f64> =
                    f32s(&expected.tensor(&format!("gemm_block_f32.{x}.{w}")).unwrap())
                        .iter()
                        .map(|&v| v as f64)
                        .collect();
                let e = rel_err(&y, &block);
                assert!(e < 1e-6, "{dir} gemm_block_f32.{x}.{w}: {e:e}");
                // The literal promoted recipe reproduces the golden block-promoted f32 result closely.
                fp8_matmul_nt_promoted(&ctx, &mut y, &xq, &wq, Accumulate::Overwrite).unwrap();
                assert_close(&y, &exact, 1e-5, &format!("{dir} promoted gemm.{x}.{w}"));
                let e = rel_err(&y, &block);
                assert!(e < 1e-7, "{dir} promoted gemm_block_f32.{x}.{w}: {e:e}");
            }
        }
    }

    #[test]
    fn act_t_layout_and_bad_input() {
        let ctx = ExecCtx::cpu(1);
        let x: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let bytes = safetensors::serialize(
            [("a", TensorView::new(Dtype::F32, vec![2, 3], &x).unwrap())],
            None,
        )
        .unwrap();
        let out = quantize_safetensors(&ctx, &bytes, QuantLayout::ActT, ScaleFmt::F32).unwrap();
        let out = SafeTensors::deserialize(&out).unwrap();
        assert_eq!(out.tensor("a.codes").unwrap().shape(), &[3, 2]);
        assert_eq!(out.tensor("a.scales").unwrap().shape(), &[3, 1]);
        let ints = [0u8; 8];
        let bad = safetensors::serialize(
            [("i", TensorView::new(Dtype::I32, vec![2], &ints).unwrap())],
            None,
        )
        .unwrap();
        assert!(matches!(
            quantize_safetensors(&ctx, &bad, QuantLayout::Act, ScaleFmt::F32),
            Err(KernelError::Safetensors(_))
        ));
        assert!(
            quantize_safetensors(&ctx, b"not a file", QuantLayout::Act, ScaleFmt::F32).is_err()
        );
        let nan: Vec<u8> = [1.0f32, f32::NAN]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let nan = safetensors::serialize(
            [("n", TensorView::new(Dtype::F32, vec![2], &nan).unwrap())],
            None,
        )
        .unwrap();
        let e = quantize_safetensors(&ctx, &nan, QuantLayout::Act, ScaleFmt::F32).unwrap_err();
        assert!(
            e.to_string()
                .contains("n: non-finite value in x at row 0, column 1"),
            "{e}"
        );
    }
}
