use std::path::{Path, PathBuf};

/// A file that cannot be read, written or understood, always with its path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} does not exist or cannot be read")]
    Missing { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    /// A run config (TOML file or `--set` override) that cannot be used.
    #[error("config: {0}")]
    Config(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn format(path: &Path, message: impl Into<String>) -> Self {
        Error::Format {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// Attach the path to an I/O error, the one piece of context every I/O failure needs
/// (crates whose errors wrap this one convert with `?`).
pub trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.into(),
            source,
        })
    }
}
