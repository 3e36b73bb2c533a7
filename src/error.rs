//! Library error type. Every variant names what was wrong and where.

use std::path::PathBuf;

/// Errors returned by the persona library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The I/O error is part of the message (not a `source`), so a report that prints the
    /// error chain does not repeat it.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// A model, vector or config file whose contents are not what they should be.
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A tensor the architecture needs is not in the model files.
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Bad arguments from the caller (ids out of vocabulary, zero max tokens, ...).
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("backend {backend}: {msg}")]
    Backend { backend: &'static str, msg: String },
    #[error("fetching the default model: {0}")]
    Fetch(String),
    /// The forward pass produced NaN or infinite values (corrupt weights, overflow) for the
    /// sequence in KV-cache `slot`; the message names where they first appeared.
    #[error("non-finite values: {msg}")]
    NonFinite { slot: usize, msg: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.into(), msg: msg.into() }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), err: source }
    }
}
