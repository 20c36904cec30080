//! `mmrec-train`: train, evaluate and benchmark MM-Rec models.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mmrec-train", version, about = "Train, evaluate and benchmark MM-Rec models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// CPU benchmark: scan GB/s against memcpy and a naive candle loop, and model
    /// forward / train-step tokens/s per preset. Writes JSON.
    Bench {
        #[arg(long, value_delimiter = ',', default_value = "tiny,small")]
        presets: Vec<String>,
        #[arg(long, default_value_t = 8192)]
        vocab: usize,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Bench { presets, vocab, batch, seq_len, out } => {
            let report = mmrec_trainer::bench::cpu_bench(&presets, vocab, batch, seq_len)?;
            let json = serde_json::to_string_pretty(&report)?;
            std::fs::write(&out, format!("{json}\n")).with_context(|| format!("writing {}", out.display()))?;
            println!("{json}");
            Ok(())
        }
    }
}
