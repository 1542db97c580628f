//! The LLaMA-family model configuration, read from GGUF metadata or a Hugging Face `config.json`.

use super::error::{Result, RuntimeError};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Shape and constants of a LLaMA-family causal language model (Hugging Face field names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

impl LlamaConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Checks the divisibility rules the forward relies on.
    pub fn validate(&self, origin: &Path) -> Result<()> {
        let bad = |reason: String| Err(RuntimeError::format(origin, reason));
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return bad("head counts must be positive".into());
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head dimension {} must be even for RoPE",
                self.head_dim()
            ));
        }
        Ok(())
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| RuntimeError::io("reading", path, e))?;
        let config: LlamaConfig = serde_json::from_str(&text)
            .map_err(|e| RuntimeError::format(path, format!("not a LLaMA config.json: {e}")))?;
        config.validate(path)?;
        Ok(config)
    }

    /// The `config.json` a Hugging Face `LlamaForCausalLM` loads.
    pub fn to_hf_json(&self) -> String {
        let mut value = serde_json::to_value(self).expect("config serializes");
        let obj = value.as_object_mut().expect("config is an object");
        obj.insert(
            "architectures".into(),
            serde_json::json!(["LlamaForCausalLM"]),
        );
        obj.insert("model_type".into(), serde_json::json!("llama"));
        obj.insert("hidden_act".into(), serde_json::json!("silu"));
        obj.insert("torch_dtype".into(), serde_json::json!("float32"));
        obj.insert("attention_bias".into(), serde_json::json!(false));
        obj.insert("mlp_bias".into(), serde_json::json!(false));
        obj.insert("head_dim".into(), serde_json::json!(self.head_dim()));
        serde_json::to_string_pretty(&value).expect("json value prints")
    }
}
