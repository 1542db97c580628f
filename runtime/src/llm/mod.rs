//! LLaMA-family causal language models: GGUF/HF loading, forward, calibration, one-shot solvers.
