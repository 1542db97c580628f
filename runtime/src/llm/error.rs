//! The error type of the language-model runtime: every user-causable failure names its file, tensor or shape.

use std::path::PathBuf;

/// Everything that can go wrong while loading, running, pruning or saving a language model.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A data file that the caller needs is not on disk.
    #[error("missing data file {path}: run `scripts/fetch-data.sh {package}` (or set PRUNEC_DATA to the folder holding it)")]
    MissingData { path: PathBuf, package: String },
    /// A model file is malformed or of an unsupported kind.
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    /// A tensor does not have the shape the model configuration implies.
    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A tensor the model needs is absent from the file.
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    /// The tokenizer failed or could not be built.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A pruning request is inconsistent (bad sparsity, N:M that does not divide the width, ...).
    #[error("{0}")]
    Invalid(String),
    /// A numerical failure inside a solver (for example a Hessian that is not positive definite).
    #[error("layer `{layer}`: {reason}")]
    Numeric { layer: String, reason: String },
    /// An error from the tensor library.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl LlmError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LlmError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        LlmError::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Result alias for the language-model runtime.
pub type Result<T> = std::result::Result<T, LlmError>;
