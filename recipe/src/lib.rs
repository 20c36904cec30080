//! The nightly pipeline (`mmrec-recipe run pipelines/nightly.toml`): the whole recipe from
//! one config, incremental by content, with a morning report (issue 15).

pub mod config;
pub mod plan;
pub mod report;
pub mod run;
pub mod slurm;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config: {0}")]
    Config(String),
    #[error("{path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Input { path: PathBuf, message: String },
    #[error("{path} is held by another run (pid {pid}); wait for it, or remove the file if that process is gone")]
    Locked { path: PathBuf, pid: i32 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
