//! FP8 for the DeepSeek-V3 recipe: E4M3 (`float8_e4m3fn`) and E5M2 codecs, fine-grained quantizers
//! (1×128 activation tiles, 128×128 weight blocks, 128×1 tiles via the transpose, f32 or UE8M0 scales),
//! a block-scaled FP8 GEMM in the three training layouts (plus the literal per-block-promoted form), and a safetensors front end for the CLI.
//!
//! Invariant: encoding rounds to nearest, ties to even, keeps NaN and saturates finite overflow (and ±∞)
//! to ±448 — identical to ml_dtypes for |x| ≤ 464, where ml_dtypes would give NaN beyond that (the
//! quantizers never go there: x·(448/amax) ≤ 448 up to one rounding). Decoding is exact (a lookup table).

mod codec;
mod gemm;
mod io;
mod quant;

pub use codec::{
    E4M3_MAX, E5M2_MAX, e4m3_decode, e4m3_decode_slice, e4m3_encode, e4m3_encode_slice,
    e5m2_decode, e5m2_encode,
};
pub use gemm::{
    Fp8Matrix, Fp8Tiling, fp8_dequantize, fp8_matmul_dytx, fp8_matmul_dyw, fp8_matmul_nt_promoted,
    fp8_matmul_xwt,
};
pub use io::{QuantLayout, quantize_safetensors};
pub use quant::{ScaleFmt, TILE, quantize_act, quantize_act_t, quantize_weight};
