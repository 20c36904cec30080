//! `mmrec-recipe run CONFIG`: run the nightly pipeline the config describes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mmrec_recipe::config::PipelineConfig;
use mmrec_recipe::run::{Outcome, Runner};

#[derive(Parser)]
#[command(
    name = "mmrec-recipe",
    version,
    about = "The whole MM-Rec recipe as one incremental pipeline: corpora → shards → base → experts and a control → fused model → evaluation → report"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every stage whose content key has no finished output, then write the run's
    /// report. Exit 0 when done, 1 when a stage failed, 3 when a gate failed, 2 on a
    /// config or lock error, 128+N on signal N.
    Run {
        config: PathBuf,
        /// Where mmrec-data, mmrec-train and mmrec-transfer are (default: beside this binary).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    sigpipe::reset();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let Command::Run { config, bin_dir } = cli.command;
    let cfg = PipelineConfig::load(&config)?;
    let bin_dir = match bin_dir {
        Some(d) => d,
        None => std::env::current_exe()
            .context("locating this binary")?
            .parent()
            .context("this binary's directory")?
            .to_path_buf(),
    };
    let runner = Runner { cfg, bin_dir };
    Ok(match runner.run(&|m| eprintln!("mmrec-recipe: {m}"))? {
        Outcome::Done { run } => {
            println!("{}", run.join("report.md").display());
            ExitCode::SUCCESS
        }
        Outcome::StageFailed { run, stage, log } => {
            eprintln!(
                "error: stage {stage} failed (log: {}; run {})",
                log.display(),
                run.display()
            );
            ExitCode::from(1)
        }
        Outcome::GateFailed { run, failed } => {
            eprintln!("gates failed ({}):", run.join("report.md").display());
            for f in failed {
                eprintln!("  {f}");
            }
            ExitCode::from(3)
        }
        Outcome::Interrupted { signal } => {
            eprintln!("interrupted by signal {signal}: the stage in progress resumes on the next run");
            ExitCode::from(128 + signal as u8)
        }
    })
}
