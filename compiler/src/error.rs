//! The compiler's error: why a run (or a check that reads file headers)
//! stopped — something the user can fix (with a recipe span), a failed
//! `assert`, Ctrl-C, or a bug.

use prunec_lang::Span;
use prunec_runtime as rt;

/// Why a run stopped.
#[derive(Debug)]
pub enum RunError {
    /// Something the user can fix: a recipe span (if any), a message, a hint.
    User {
        span: Option<Span>,
        message: String,
        help: Option<String>,
    },
    /// An `assert` in the recipe failed.
    Assert { span: Span, message: String },
    /// Ctrl-C.
    Interrupted,
    /// A bug.
    Internal(String),
}

impl RunError {
    pub(crate) fn user(span: Span, message: impl Into<String>) -> Self {
        RunError::User {
            span: Some(span),
            message: message.into(),
            help: None,
        }
    }

    /// The message alone (a user error's, without its span and help).
    pub fn message(&self) -> String {
        match self {
            RunError::User { message, .. } | RunError::Assert { message, .. } => message.clone(),
            RunError::Interrupted => "interrupted".into(),
            RunError::Internal(m) => m.clone(),
        }
    }

    /// The recipe span it points at, if any.
    pub fn span(&self) -> Option<Span> {
        match self {
            RunError::User { span, .. } => *span,
            RunError::Assert { span, .. } => Some(*span),
            RunError::Interrupted | RunError::Internal(_) => None,
        }
    }
}

/// Maps a runtime error at a stage to a run error.
pub(crate) fn rt_err(stage: Span, what: &str) -> impl Fn(rt::RuntimeError) -> RunError + '_ {
    move |e| match e {
        rt::RuntimeError::Candle { .. } => RunError::Internal(format!("{what}: {e}")),
        other if what.is_empty() => RunError::user(stage, other.to_string()),
        other => RunError::user(stage, format!("{what}: {other}")),
    }
}
