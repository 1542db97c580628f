//! The language-model runtime reports the runtime's one error type,
//! [`RuntimeError`]: every user-causable failure names its file, tensor or shape.

pub use crate::error::{Result, RuntimeError};
