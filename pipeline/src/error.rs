use std::path::PathBuf;

/// Errors that stop a pipeline run. Problems with single records are not errors: they go
/// to the quarantine file and the run continues.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Schema(#[from] mmrec_schemas::Error),
    #[error("input {path} does not exist or cannot be read")]
    MissingInput { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parquet { path: PathBuf, message: String },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach the path to an I/O error, as a pipeline error.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        Ok(mmrec_schemas::IoContext::at(self, path)?)
    }
}

/// The error and its sources, `: `-separated (as anyhow's `{:#}` prints them), for errors
/// kept as text, such as `validate`'s list of problems.
pub(crate) fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
