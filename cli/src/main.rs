//! `moetrain`: the one binary. Each subcommand lives in `cmd/<name>.rs` and exposes
//! `Args` (clap) and `run(args) -> anyhow::Result<ExitCode>`.

mod cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "moetrain", version, about = "Train DeepSeek-V3-style MoE models on a cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    // Subcommands are added here, one line each, by the module that implements them.
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res: anyhow::Result<ExitCode> = match cli.command {};
    match res {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}
