//! LLaMA-family causal language models: GGUF/HF loading, forward, calibration, one-shot solvers.
//!
//! The pieces, in pipeline order: [`gguf`] / [`hf`] load a [`LlamaModel`] (f32 weights and its
//! [`TextTokenizer`]); [`eval`] measures perplexity over fixed windows; [`prune`] runs the
//! sequential layer-wise calibration and hands every targeted linear layer to a [`LayerPruner`]
//! (built in: [`MagnitudePruner`], [`WandaPruner`], [`SparseGptPruner`], or any score function
//! through [`ScoredPruner`]); [`hf`] and [`compressed`] write the result.

pub mod armor;
pub mod compressed;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
mod forward;
pub mod gguf;
pub mod hf;
pub mod kv;
pub mod linalg;
pub mod model;
pub mod moe;
pub mod owl;
pub mod prune;
pub mod search;
pub mod select;
pub mod sparsegpt;
pub mod tokenizer;
pub mod units;

pub use compressed::{load_compressed, save_compressed, CompressedSize};
pub use config::LlamaConfig;
pub use error::{Result, RuntimeError};
pub use eval::{
    calibration_windows, calibration_windows_after, calibration_windows_in, leading_tokens,
    perplexity,
};
pub use gguf::{load_gguf, load_gguf_quantized_reference};
pub use hf::{inspect_hf, load_hf, load_hf_inspected, save_hf, HfHeader, HfSource};
pub use kv::{perplexity_kv, KvBudget, KvPolicy};
pub use model::{linear_name, LinearInput, LlamaModel, Proj};
pub use moe::{moe_statistics, remove_atomic_experts, remove_experts, MoeLayerStats};
pub use prune::{
    prune_one_shot, LayerPruner, LayerReport, LayerStats, LayerToPrune, MagnitudePruner,
    OneShotConfig, PruneReport, ScoredPruner, SparseGptPruner, StatsNeeds, WandaPruner,
};
pub use select::{Scope, SparsityPattern};
pub use sparsegpt::{sparsegpt_prune, SolverPrecision, SparseGptConfig};
pub use tokenizer::TextTokenizer;
pub use units::{compensate, remove_units, unit_scores, LlmUnit};
