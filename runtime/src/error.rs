//! The runtime's one error type: every variant names the file, tensor or shapes involved.

use std::path::PathBuf;

/// Result alias used throughout the runtime.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// Everything the runtime can report to a user. Variants carry the file path,
/// tensor name and shapes needed to act on the message; none of them is a panic.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A data or model file that `scripts/fetch-data.sh` provides is absent.
    #[error("missing file {path}: run `scripts/fetch-data.sh {fetch}` (or set PRUNEC_DATA to the folder holding it)")]
    MissingFile { path: PathBuf, fetch: String },

    /// A file at a path the user named (a recipe's data folder) is absent.
    #[error("missing file {path}")]
    MissingNamedFile { path: PathBuf },

    /// Reading or writing a file failed.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file exists but its contents are not what its format requires.
    #[error("corrupt file {path}: {reason}")]
    CorruptFile { path: PathBuf, reason: String },

    /// A model file that is well-formed but uses what the runtime does not run
    /// (an ONNX op, attribute or data type), named with its node.
    #[error("{path}: {reason}")]
    UnsupportedModel { path: PathBuf, reason: String },

    /// A tensor the model needs is not in the file (or a name is unknown).
    #[error("tensor `{name}` not found in {context}")]
    TensorNotFound { name: String, context: String },

    /// A tensor has the wrong shape.
    #[error("tensor `{name}` in {context}: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        name: String,
        context: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A tensor has a dtype the operation cannot use.
    #[error("tensor `{name}` in {context}: unsupported dtype {dtype}")]
    UnsupportedDType {
        name: String,
        context: String,
        dtype: String,
    },

    /// An output path equals one of the inputs of the same run.
    #[error("refusing to write {path}: it is also an input of this run")]
    OutputIsInput { path: PathBuf },

    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// The training loss became NaN or infinite.
    #[error("training diverged at epoch {epoch}, step {step}: loss is {loss}")]
    Diverged {
        epoch: usize,
        step: usize,
        loss: f32,
    },

    /// A model file is malformed, or of a kind or version the runtime does not read.
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },

    /// The tokenizer failed or could not be built.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A request is inconsistent (a bad sparsity, an N:M pattern that does
    /// not divide a layer's width, a layer that does not exist...).
    #[error("{0}")]
    Invalid(String),

    /// A numerical failure inside a solver (a Hessian that is not positive definite).
    #[error("layer `{layer}`: {reason}")]
    Numeric { layer: String, reason: String },

    /// A candle operation failed; `context` says which tensor or layer.
    #[error("{context}: {}", candle_message(source))]
    Candle {
        context: String,
        #[source]
        source: candle_core::Error,
    },
}

impl RuntimeError {
    /// Wraps an I/O error with the action and path it concerns.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// A malformed or unsupported model file at `path`.
    pub fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        RuntimeError::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// A corrupt-file error for `path`.
    pub fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        RuntimeError::CorruptFile {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// A candle error's message without the backtrace candle attaches to it
/// when `RUST_BACKTRACE` is set (a library backtrace is never part of a
/// message shown to users).
pub fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        candle_core::Error::WithPath { inner, path } => {
            format!("{}: {}", path.display(), candle_message(inner))
        }
        candle_core::Error::Context { inner, context } => {
            format!("{context}: {}", candle_message(inner))
        }
        other => other.to_string(),
    }
}

/// A candle failure where no tensor or layer is named (the language-model
/// code's `?` on tensor operations).
impl From<candle_core::Error> for RuntimeError {
    fn from(source: candle_core::Error) -> Self {
        RuntimeError::Candle {
            context: "tensor operation failed".into(),
            source,
        }
    }
}

/// Attaches a context string to candle results.
pub(crate) trait CandleContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> CandleContext<T> for candle_core::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| RuntimeError::Candle {
            context: context(),
            source,
        })
    }
}
