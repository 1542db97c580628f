//! The prunec compiler: semantic checks against model shapes, IR, passes, cranelift codegen.

pub mod kernel;
