//! The library's error type: one `thiserror` enum grouped by kind, messages carrying the values.

use std::path::PathBuf;

/// Everything that can go wrong inside refdpo's library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value or key is wrong; the message names the key and the fix.
    #[error("config: {0}")]
    Config(String),

    /// A file could not be read or written.
    #[error("{action} `{path}`: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A hub repository or file could not be resolved.
    #[error("hub: {0}")]
    Hub(String),

    /// An input file has the wrong layout or schema.
    #[error("schema of `{path}`: {msg}")]
    Schema { path: PathBuf, msg: String },

    /// The cache does not belong to this configuration.
    #[error("stale cache `{path}`: {msg}")]
    StaleCache { path: PathBuf, msg: String },

    /// Chat template or tokenizer failure.
    #[error("tokenize: {0}")]
    Tokenize(String),

    /// The model's files or tensors are not what we expect.
    #[error("model: {0}")]
    Model(String),

    /// A chart could not be drawn or written.
    #[error("plot `{path}`: {msg}")]
    Plot { path: PathBuf, msg: String },

    /// Training diverged or was misconfigured at run time.
    #[error("train: {0}")]
    Train(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Arrow(#[from] arrow::error::ArrowError),

    #[error(transparent)]
    Parquet(#[from] parquet::errors::ParquetError),

    #[error(transparent)]
    Polars(#[from] polars::error::PolarsError),

    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// Shorthand used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error that names the file and what was being done to it.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub fn schema(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Schema {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// Small helpers for file I/O that keep the path in the error.
pub mod fs {
    use super::{Error, Result};
    use std::path::Path;

    pub fn read(path: &Path) -> Result<Vec<u8>> {
        std::fs::read(path).map_err(|e| Error::io("cannot read", path, e))
    }

    pub fn read_to_string(path: &Path) -> Result<String> {
        std::fs::read_to_string(path).map_err(|e| Error::io("cannot read", path, e))
    }

    pub fn create_dir_all(path: &Path) -> Result<()> {
        std::fs::create_dir_all(path).map_err(|e| Error::io("cannot create directory", path, e))
    }

    /// Writes `bytes` to `path` atomically: a temporary sibling, fsync, then rename.
    pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
        let tmp = tmp_path(path);
        std::fs::write(&tmp, bytes).map_err(|e| Error::io("cannot write", &tmp, e))?;
        rename(&tmp, path)
    }

    pub fn rename(from: &Path, to: &Path) -> Result<()> {
        std::fs::rename(from, to).map_err(|e| Error::io("cannot rename into place", to, e))
    }

    /// The temporary name a file is written under before it is renamed into place.
    pub fn tmp_path(path: &Path) -> std::path::PathBuf {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".tmp");
        path.with_file_name(name)
    }
}
