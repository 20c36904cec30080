//! `mmrec-bench`: every benchmark of the toolkit, each writing a JSON report and, where
//! one exists, timing the strongest Python reference on the same machine in the same run.

mod data;
mod model;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mmrec_pipeline::input::DeclaredInputs;
use mmrec_trainer::train::Precision;

#[derive(Parser)]
#[command(
    name = "mmrec-bench",
    version,
    about = "Benchmark the MM-Rec data pipeline, loader and model; writes JSON"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmark split against the tokenizer alone and a Python reference; writes JSON.
    ///
    /// Builds a corpus of at least --min-mb from the given sources (each copy prefixed so
    /// nothing deduplicates), then times `split` and the bare tokenizer at each thread
    /// count, and the Python script if --python is given, in the same run.
    Data {
        #[command(flatten)]
        sources: DeclaredInputs,
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long, default_value_t = 100)]
        min_mb: u64,
        /// Thread counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        threads: Vec<usize>,
        /// Runs per measurement (interleaved); the fastest is reported.
        #[arg(long, default_value_t = 2)]
        repeats: usize,
        /// Python interpreter with datasets, tokenizers and pyarrow installed.
        #[arg(long)]
        python: Option<PathBuf>,
        /// The Python reference script.
        #[arg(long, default_value = "bench/data_reference.py")]
        python_script: PathBuf,
        /// Where the report goes.
        #[arg(long)]
        out: PathBuf,
    },
    /// Benchmark the prefetching loader (tokens/s delivered) against a PyTorch DataLoader
    /// reference on the same shards; writes JSON.
    Loader {
        /// A shard directory (build one with `split`; at least 100M tokens for the README).
        #[arg(long)]
        shards: PathBuf,
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        workers: Vec<usize>,
        /// Tokens to pull per measurement.
        #[arg(long, default_value_t = 200_000_000)]
        tokens: u64,
        #[arg(long)]
        python: Option<PathBuf>,
        #[arg(long, default_value = "bench/loader_reference.py")]
        python_script: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Benchmark the model. CPU: scan GB/s against memcpy and a naive candle loop, model
    /// forward / forward+backward tokens/s per preset. GPU: scan GB/s against a device copy,
    /// model forward and full training step (with AdamW) tokens/s, peak memory and MFU.
    Model {
        /// Where to run: cpu, cuda, cuda:N or auto.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Compute precision of the GPU model figures.
        #[arg(long, value_enum, default_value = "f32")]
        precision: Precision,
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
    sigpipe::reset();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Print the report and write it to `out`.
fn report(out: &Path, value: &impl serde::Serialize) -> Result<()> {
    let json = serde_json::to_string_pretty(value)?;
    std::fs::write(out, format!("{json}\n")).with_context(|| format!("writing {}", out.display()))?;
    println!("{json}");
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Data {
            sources,
            tokenizer,
            min_mb,
            threads,
            repeats,
            python,
            python_script,
            out,
        } => {
            let sources = sources.specs();
            let work = data::default_work_dir();
            eprintln!("building a corpus of at least {min_mb} MB in {}", work.display());
            let corpus = data::build_corpus(&sources, min_mb * 1_000_000, &work.join("corpus"))?;
            let result = data::run(
                &corpus,
                &tokenizer,
                &work,
                python.as_deref().map(|p| (p, python_script.as_path())),
                &threads,
                repeats,
            )?;
            report(&out, &result)
        }
        Command::Loader {
            shards,
            seq_len,
            batch,
            workers,
            tokens,
            python,
            python_script,
            out,
        } => {
            let result = data::loader_bench(
                &shards,
                seq_len,
                batch,
                &workers,
                tokens,
                python.as_deref().map(|p| (p, python_script.as_path())),
            )?;
            report(&out, &result)
        }
        Command::Model {
            device,
            precision,
            presets,
            vocab,
            batch,
            seq_len,
            out,
        } => {
            let dev = mmrec_model::device::parse(&device).map_err(anyhow::Error::msg)?;
            if dev.is_cpu() {
                report(&out, &model::cpu_bench(&presets, vocab, batch, seq_len)?)
            } else {
                report(
                    &out,
                    &model::device_bench(&dev, &presets, vocab, batch, seq_len, precision)?,
                )
            }
        }
    }
}
