//! One error type for the whole project; every variant names the file, tensor or field at fault.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("config {file}: {msg}")]
    Config { file: PathBuf, msg: String },
    #[error("config field `{field}`: {msg}")]
    Field { field: String, msg: String },
    #[error("checkpoint {file}: {msg}")]
    Checkpoint { file: PathBuf, msg: String },
    #[error("checkpoint {file}, tensor `{tensor}`: {msg}")]
    Tensor {
        file: PathBuf,
        tensor: String,
        msg: String,
    },
    #[error("models do not match: {0}")]
    Mismatch(String),
    #[error("data {path}: {msg}")]
    Data { path: PathBuf, msg: String },
    #[error("plan: {0}")]
    Plan(String),
    #[error("{0}")]
    Compute(String),
    /// Rank, world size or coordinator address could not be resolved, or sources disagree.
    #[error("rendezvous: {0}")]
    Rendezvous(String),
    /// A malformed, oversized or wrong-version message on the wire.
    #[error("protocol: {0}")]
    Protocol(String),
    /// A connection to a named peer (coordinator or worker rank/host) failed or was refused.
    #[error("peer {peer}: {msg}")]
    Peer { peer: String, msg: String },
    /// A collective backend (NCCL, CUDA) is unavailable or failed.
    #[error("collective: {0}")]
    Collective(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }
    pub fn field(field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Field {
            field: field.into(),
            msg: msg.into(),
        }
    }
}
