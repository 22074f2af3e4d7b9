//! `moetrain`: the one binary. Each subcommand lives in `cmd/<name>.rs` and exposes
//! `Args` (clap) and `run(args) -> anyhow::Result<ExitCode>`.

mod cmd;
mod telemetry;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "moetrain",
    version,
    about = "Train DeepSeek-V3-style MoE models on a cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    // Subcommands are added here, one line each, by the module that implements them.
    /// Print a pipeline schedule (compact, JSON with transfers, or an SVG timeline).
    Schedule(cmd::schedule::Args),
    /// Plan a job: placement, schedules, per-rank memory and bubble side by side.
    Plan(cmd::plan::Args),
    /// Run the coordinator: accepts jobs, schedules them onto workers, watches liveness.
    Coordinator(cmd::coordinator::Args),
    /// Run a worker daemon that offers devices to a coordinator.
    Worker(cmd::worker::Args),
    /// Submit a TrainingJob manifest.
    Submit(cmd::submit::Args),
    /// List jobs or workers.
    Get(cmd::get::Args),
    /// Show one job in detail: transitions, placement, events.
    Describe(cmd::describe::Args),
    /// Cancel a job and free its workers.
    Cancel(cmd::cancel::Args),
    /// Show a job's per-layer, per-expert routing load as a heatmap.
    Experts(cmd::experts::Args),
    /// Train a job; `--single` runs the whole model in this process.
    Train(cmd::train::Args),
    /// Run a job on this machine: embedded coordinator, one worker process per rank, live progress.
    Local(cmd::local::Args),
    /// FP8 tools: `fp8 quantize` shows what E4M3 fine-grained quantization does to a safetensors file.
    Fp8(cmd::fp8::Args),
    /// One fp32 forward/backward of a model directory, dumped in the golden files' layout.
    Step(cmd::step::Args),
    /// Forward-only evaluation of a model directory on a token array.
    Eval(cmd::eval::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res: anyhow::Result<ExitCode> = match cli.command {
        Command::Schedule(args) => cmd::schedule::run(args),
        Command::Step(args) => cmd::step::run(args),
        Command::Eval(args) => cmd::eval::run(args),
        Command::Plan(args) => cmd::plan::run(args),
        Command::Coordinator(args) => cmd::coordinator::run(args),
        Command::Worker(args) => cmd::worker::run(args),
        Command::Submit(args) => cmd::submit::run(args),
        Command::Get(args) => cmd::get::run(args),
        Command::Describe(args) => cmd::describe::run(args),
        Command::Cancel(args) => cmd::cancel::run(args),
        Command::Experts(args) => cmd::experts::run(args),
        Command::Train(args) => cmd::train::run(args),
        Command::Local(args) => cmd::local::run(args),
        Command::Fp8(args) => cmd::fp8::run(args),
    };
    match res {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}
