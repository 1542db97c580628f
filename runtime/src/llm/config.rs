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
    /// Width of one attention head when the configuration gives it (Qwen3 and
    /// some Llama checkpoints); otherwise `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Attention sees only the last `sliding_window` positions (Mistral).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// The Hugging Face architecture, which decides biases and head norms.
    #[serde(skip)]
    pub architecture: Architecture,
    /// Biases on q, k, v and o (`attention_bias`: Llama, Qwen3), as FLAP's
    /// compensation needs on `o_proj`.
    #[serde(skip)]
    pub attention_bias: bool,
    /// Biases on gate, up and down (`mlp_bias`: Llama).
    #[serde(skip)]
    pub mlp_bias: bool,
    /// The mixture-of-experts layout (`Qwen3MoeForCausalLM`); `None` for
    /// dense models.
    #[serde(skip)]
    pub moe: Option<MoeConfig>,
}

/// How a mixture-of-experts model routes: which blocks hold experts, how
/// many, how wide, and how many each token uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    /// Experts per sparse block (the same in every one).
    pub num_experts: usize,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// Intermediate width of an expert (the widest, once atomic experts
    /// are removed).
    pub moe_intermediate_size: usize,
    /// The top-k routing weights are renormalised to sum to one.
    pub norm_topk_prob: bool,
    /// Per block: whether it holds experts (else a dense MLP of `intermediate_size`).
    pub sparse: Vec<bool>,
    /// How the checkpoint names the router and experts.
    pub layout: MoeLayout,
}

/// The tensor names of a family of mixture-of-experts checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MoeLayout {
    /// `mlp.gate`, `mlp.experts.E.{gate,up,down}_proj` (Qwen3-MoE).
    Qwen3,
    /// `block_sparse_moe.gate`, `block_sparse_moe.experts.E.{w1,w3,w2}` (Mixtral).
    Mixtral,
}

impl MoeConfig {
    /// The router's weight in block `layer`.
    pub fn router_name(&self, layer: usize) -> String {
        match self.layout {
            MoeLayout::Qwen3 => format!("model.layers.{layer}.mlp.gate.weight"),
            MoeLayout::Mixtral => format!("model.layers.{layer}.block_sparse_moe.gate.weight"),
        }
    }

    /// The weight of an expert's projection, `proj` one of `gate`, `up`, `down`.
    pub fn expert_name(&self, layer: usize, expert: usize, proj: &str) -> String {
        match self.layout {
            MoeLayout::Qwen3 => {
                format!("model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.weight")
            }
            MoeLayout::Mixtral => {
                let w = match proj {
                    "gate" => "w1",
                    "down" => "w2",
                    _ => "w3",
                };
                format!("model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight")
            }
        }
    }
}

/// The causal-LM architectures prunec reads; they differ in a few block details.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Architecture {
    #[default]
    Llama,
    Mistral,
    /// q, k and v projections carry biases.
    Qwen2,
    /// An RMSNorm over each q and k head before RoPE.
    Qwen3,
    /// Qwen3's attention with mixture-of-experts feed-forward blocks.
    Qwen3Moe,
    /// Mistral's attention with mixture-of-experts feed-forward blocks.
    Mixtral,
}

impl Architecture {
    /// Every supported architecture with its `transformers` class name.
    pub const ALL: [(Architecture, &'static str); 6] = [
        (Architecture::Llama, "LlamaForCausalLM"),
        (Architecture::Mistral, "MistralForCausalLM"),
        (Architecture::Qwen2, "Qwen2ForCausalLM"),
        (Architecture::Qwen3, "Qwen3ForCausalLM"),
        (Architecture::Qwen3Moe, "Qwen3MoeForCausalLM"),
        (Architecture::Mixtral, "MixtralForCausalLM"),
    ];

    /// The `transformers` class name.
    pub fn class_name(self) -> &'static str {
        Self::ALL.iter().find(|(a, _)| *a == self).unwrap().1
    }

    /// Whether q, k and v carry biases whatever the configuration says.
    pub fn qkv_bias(self) -> bool {
        self == Architecture::Qwen2
    }

    /// Whether q and k heads are RMS-normalised before RoPE.
    pub fn qk_norm(self) -> bool {
        matches!(self, Architecture::Qwen3 | Architecture::Qwen3Moe)
    }
}

/// The routing fields of a `Qwen3MoeForCausalLM` configuration: block `l`
/// holds experts when it is not in `mlp_only_layers` and `(l + 1)` is a
/// multiple of `decoder_sparse_step`.
fn moe_config(value: &serde_json::Value, layers: usize, path: &Path) -> Result<MoeConfig> {
    let bad = |reason: String| Err(RuntimeError::format(path, reason));
    let get = |k: &str| value.get(k).filter(|v| !v.is_null());
    let int = |k: &str| -> Result<usize> {
        match get(k).and_then(|v| v.as_u64()) {
            Some(v) => Ok(v as usize),
            None => Err(RuntimeError::format(
                path,
                format!("a mixture-of-experts config needs `{k}` (a positive integer)"),
            )),
        }
    };
    // transformers 5 writes `num_local_experts`, the Hub's configs `num_experts`.
    let num_experts = match (get("num_local_experts"), get("num_experts")) {
        (Some(_), _) => int("num_local_experts")?,
        (None, Some(_)) => int("num_experts")?,
        (None, None) => {
            return bad(
                "a mixture-of-experts config needs `num_experts` or `num_local_experts`".into(),
            )
        }
    };
    let top_k = int("num_experts_per_tok")?;
    let width = int("moe_intermediate_size")?;
    let step = match get("decoder_sparse_step") {
        Some(v) => v.as_u64().unwrap_or(0) as usize,
        None => 1,
    };
    if num_experts == 0 || top_k == 0 || top_k > num_experts || width == 0 || step == 0 {
        return bad(format!(
            "num_experts {num_experts}, num_experts_per_tok {top_k}, moe_intermediate_size {width} and decoder_sparse_step {step} must be positive, with num_experts_per_tok <= num_experts"
        ));
    }
    let dense: Vec<u64> = get("mlp_only_layers")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
        .unwrap_or_default();
    for k in ["shared_expert_intermediate_size", "n_shared_experts"] {
        if get(k).and_then(|v| v.as_u64()).unwrap_or(0) > 0 {
            return bad(format!("shared experts (`{k}`) are not supported"));
        }
    }
    Ok(MoeConfig {
        num_experts,
        top_k,
        moe_intermediate_size: width,
        norm_topk_prob: get("norm_topk_prob")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        sparse: (0..layers)
            .map(|l| !dense.contains(&(l as u64)) && (l + 1) % step == 0)
            .collect(),
        layout: MoeLayout::Qwen3,
    })
}

/// The routing of a `MixtralForCausalLM` configuration: every block holds
/// `num_local_experts` experts of `intermediate_size`, each token uses
/// `num_experts_per_tok`, renormalised.
fn mixtral_config(value: &serde_json::Value, c: &LlamaConfig, path: &Path) -> Result<MoeConfig> {
    let get = |k: &str| value.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
    let (n, k) = (
        get("num_local_experts").unwrap_or(0),
        get("num_experts_per_tok").unwrap_or(0),
    );
    if n == 0 || k == 0 || k > n || c.intermediate_size == 0 {
        return Err(RuntimeError::format(
            path,
            format!("num_local_experts {n} and num_experts_per_tok {k} must be positive, with num_experts_per_tok <= num_local_experts"),
        ));
    }
    Ok(MoeConfig {
        num_experts: n,
        top_k: k,
        moe_intermediate_size: c.intermediate_size,
        norm_topk_prob: true,
        sparse: vec![true; c.num_hidden_layers],
        layout: MoeLayout::Mixtral,
    })
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
    /// Whether q, k and v carry biases.
    pub fn has_qkv_bias(&self) -> bool {
        self.architecture.qkv_bias() || self.attention_bias
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Width of all query heads together (the q projection's rows).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim()
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim()
    }

    /// Checks the divisibility rules the forward relies on.
    pub fn validate(&self, origin: &Path) -> Result<()> {
        let bad = |reason: String| Err(RuntimeError::format(origin, reason));
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return bad("head counts must be positive".into());
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
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
        if self.sliding_window == Some(0) {
            return bad("sliding_window must be positive".into());
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head dimension {} must be even for RoPE",
                self.head_dim()
            ));
        }
        Ok(())
    }

    /// Whether block `layer` holds experts.
    pub fn is_sparse(&self, layer: usize) -> bool {
        self.moe
            .as_ref()
            .is_some_and(|m| m.sparse.get(layer).copied().unwrap_or(false))
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| RuntimeError::io("reading", path, e))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| RuntimeError::format(path, format!("not a JSON file: {e}")))?;
        Self::from_hf_value(&value, path)
    }

    /// The configuration of a Hugging Face `config.json` already parsed;
    /// an architecture or option prunec does not run is an error naming it.
    pub fn from_hf_value(value: &serde_json::Value, path: &Path) -> Result<Self> {
        let bad = |reason: String| Err(RuntimeError::format(path, reason));
        let class = value
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str());
        let supported = Architecture::ALL.map(|(_, n)| format!("`{n}`")).join(", ");
        let architecture = match class {
            Some(c) => match Architecture::ALL.iter().find(|(_, n)| *n == c) {
                Some((a, _)) => *a,
                None => {
                    return bad(format!(
                        "architecture `{c}` is not supported (prunec reads {supported})"
                    ))
                }
            },
            None => {
                return bad(format!(
                    "no `architectures` entry (prunec reads {supported})"
                ))
            }
        };
        let get = |k: &str| value.get(k).filter(|v| !v.is_null());
        // `transformers` 5 moved the RoPE settings under `rope_parameters`.
        let rope = get("rope_parameters");
        let rope_type = rope
            .and_then(|r| r.get("rope_type"))
            .or_else(|| get("rope_scaling").and_then(|r| r.get("rope_type").or(r.get("type"))))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        if rope_type != "default" {
            return bad(format!(
                "RoPE scaling `{rope_type}` is not supported (only unscaled RoPE)"
            ));
        }
        if let Some(act) = get("hidden_act").and_then(|a| a.as_str()) {
            if act != "silu" {
                return bad(format!("hidden_act `{act}` is not supported (only `silu`)"));
            }
        }
        let flag = |k: &str| get(k).and_then(|v| v.as_bool()).unwrap_or(false);
        // Llama holds biases on every projection when asked, Qwen3 on the
        // attention's; both are read.
        if flag("mlp_bias") && architecture.qk_norm() {
            return bad(format!(
                "`mlp_bias = true` is not supported for {}",
                architecture.class_name()
            ));
        }
        // Qwen2 and Qwen3 configurations name a window they only use when asked to.
        let sliding_window = match architecture {
            Architecture::Mistral | Architecture::Mixtral => {
                get("sliding_window").and_then(|v| v.as_u64())
            }
            _ if flag("use_sliding_window") => {
                return bad("`use_sliding_window = true` is not supported".into())
            }
            _ => None,
        };
        let mut plain = value.clone();
        if let Some(obj) = plain.as_object_mut() {
            let theta = rope.and_then(|r| r.get("rope_theta")).cloned();
            if let (Some(t), false) = (theta, obj.contains_key("rope_theta")) {
                obj.insert("rope_theta".into(), t);
            }
            obj.retain(|_, v| !v.is_null());
            // Several ids (a list) are allowed for `eos_token_id`; the first is kept.
            if let Some(serde_json::Value::Array(ids)) = obj.get("eos_token_id").cloned() {
                obj.insert(
                    "eos_token_id".into(),
                    ids.first().cloned().unwrap_or_default(),
                );
            }
            obj.remove("sliding_window");
        }
        let mut config: LlamaConfig = serde_json::from_value(plain)
            .map_err(|e| RuntimeError::format(path, format!("not a causal-LM config.json: {e}")))?;
        config.architecture = architecture;
        config.attention_bias = flag("attention_bias")
            && matches!(
                architecture,
                Architecture::Llama | Architecture::Qwen3 | Architecture::Qwen3Moe
            );
        config.mlp_bias = flag("mlp_bias") && architecture == Architecture::Llama;
        config.sliding_window = sliding_window.map(|w| w as usize);
        config.moe = match architecture {
            Architecture::Qwen3Moe => Some(moe_config(value, config.num_hidden_layers, path)?),
            Architecture::Mixtral => Some(mixtral_config(value, &config, path)?),
            _ => None,
        };
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
        obj.insert(
            "model_type".into(),
            serde_json::json!(match self.architecture {
                Architecture::Llama => "llama",
                Architecture::Mistral => "mistral",
                Architecture::Qwen2 => "qwen2",
                Architecture::Qwen3 => "qwen3",
                Architecture::Qwen3Moe => "qwen3_moe",
                Architecture::Mixtral => "mixtral",
            }),
        );
        obj.insert("hidden_act".into(), serde_json::json!("silu"));
        obj.insert("torch_dtype".into(), serde_json::json!("float32"));
        obj.insert(
            "attention_bias".into(),
            serde_json::json!(self.architecture.qkv_bias() || self.attention_bias),
        );
        obj.insert("mlp_bias".into(), serde_json::json!(self.mlp_bias));
        obj.insert("head_dim".into(), serde_json::json!(self.head_dim()));
        obj.insert(
            "architectures".into(),
            serde_json::json!([self.architecture.class_name()]),
        );
        if let Some(m) = &self.moe {
            // Models written from this configuration are f32.
            let width = super::hf::export_expert_width(m, 4);
            obj.insert("num_experts_per_tok".into(), serde_json::json!(m.top_k));
            match m.layout {
                MoeLayout::Qwen3 => {
                    obj.insert("num_experts".into(), serde_json::json!(m.num_experts));
                    obj.insert("moe_intermediate_size".into(), serde_json::json!(width));
                    obj.insert("norm_topk_prob".into(), serde_json::json!(m.norm_topk_prob));
                    let dense: Vec<usize> = (0..m.sparse.len()).filter(|&l| !m.sparse[l]).collect();
                    obj.insert("mlp_only_layers".into(), serde_json::json!(dense));
                    obj.insert("decoder_sparse_step".into(), serde_json::json!(1));
                }
                MoeLayout::Mixtral => {
                    obj.insert("num_local_experts".into(), serde_json::json!(m.num_experts));
                    obj.insert("intermediate_size".into(), serde_json::json!(width));
                }
            }
        }
        serde_json::to_string_pretty(&value).expect("json value prints")
    }
}
