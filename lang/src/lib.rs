//! The `.prune` language front end: grammar, AST, parser, formatter and static checks.
//!
//! Entry points are named by what they convert: [`source_to_ast`] (text →
//! [`ast::Recipe`] plus syntax errors), [`check::ast_to_checked`] (AST →
//! [`check::CheckedRecipe`] plus semantic errors) and [`fmt::ast_to_source`]
//! (AST → canonical text). Nothing here knows about IR, candle or cranelift.

pub mod ast;
pub mod builtins;
pub mod check;
pub mod diag;
pub mod eval;
pub mod fmt;
pub mod parse;
pub mod resolved;
pub mod stdlib;

pub use ast::Span;
pub use check::{ast_to_checked, CheckedRecipe, Override};
pub use diag::{Code, Diagnostic};
pub use parse::{source_to_ast, Parsed};
