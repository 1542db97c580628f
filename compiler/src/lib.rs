//! The prunec compiler: the front-end driver, semantic checks against model
//! shapes, IR, passes and cranelift codegen.
#![doc = include_str!("../../spec/ARCHITECTURE.md")]

pub mod bench;
pub mod driver;
pub mod error;
pub mod exec;
pub mod io;
pub mod ir;
pub mod lower;
pub mod plan;
pub mod report;
pub mod shapes;
pub mod specs;
pub mod units;
