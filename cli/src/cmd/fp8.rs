//! `moetrain fp8 quantize`: shows what FP8 (E4M3) fine-grained quantization does to your own tensors by
//! writing, for every tensor of a safetensors file, `<name>.codes` (U8, raw E4M3 bits) and
//! `<name>.scales` (F32) in the layout of `shared/golden/fp8`.
//!
//! Invariant: a thin shell around `kernels::fp8::quantize_safetensors` (the function the kernels'
//! golden tests exercise), so the CLI's output is bit-identical to what training would quantize.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use kernels::ExecCtx;
use kernels::fp8::{QuantLayout, ScaleFmt, quantize_safetensors};

/// Tilings accepted on the command line.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Layout {
    /// 1×128 activation tiles: scales [rows, ceil(cols/128)].
    Act,
    /// 128×128 weight blocks: scales [ceil(rows/128), ceil(cols/128)].
    Weight,
    /// 128×1 tiles (weight-gradient operands), written transposed: codes [cols, rows].
    #[value(name = "act-t")]
    ActT,
}

/// Scale formats accepted on the command line.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Fmt {
    /// scale = amax / 448 in f32.
    F32,
    /// scale rounded up to a power of two (UE8M0).
    Ue8m0,
}

/// `moetrain fp8 ...`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: Fp8Command,
}

#[derive(Subcommand, Debug)]
enum Fp8Command {
    /// Quantize every tensor of IN (F32/F16/BF16/F64; the last dimension is the column axis) into OUT.
    Quantize(QuantizeArgs),
}

#[derive(clap::Args, Debug)]
struct QuantizeArgs {
    /// Tiling to apply.
    #[arg(long, value_enum, default_value = "act")]
    layout: Layout,
    /// Scale format.
    #[arg(long, value_enum, default_value = "f32")]
    scale_fmt: Fmt,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Input safetensors file.
    input: PathBuf,
    /// Output safetensors file.
    output: PathBuf,
}

/// Runs the subcommand.
pub fn run(args: Args) -> Result<ExitCode> {
    match args.command {
        Fp8Command::Quantize(a) => quantize(a),
    }
}

fn quantize(a: QuantizeArgs) -> Result<ExitCode> {
    let _span = tracing::info_span!("fp8_quantize", input = %a.input.display()).entered();
    let bytes =
        std::fs::read(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let layout = match a.layout {
        Layout::Act => QuantLayout::Act,
        Layout::Weight => QuantLayout::Weight,
        Layout::ActT => QuantLayout::ActT,
    };
    let fmt = match a.scale_fmt {
        Fmt::F32 => ScaleFmt::F32,
        Fmt::Ue8m0 => ScaleFmt::Ue8m0,
    };
    let out = quantize_safetensors(&ExecCtx::cpu(a.threads), &bytes, layout, fmt)
        .with_context(|| format!("quantizing {}", a.input.display()))?;
    std::fs::write(&a.output, out).with_context(|| format!("writing {}", a.output.display()))?;
    Ok(ExitCode::SUCCESS)
}
