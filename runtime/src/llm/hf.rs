//! Hugging Face layout: `config.json`, `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`) and tokenizer files; read from memory maps,
//! written atomically in the source's dtypes and shards.

use super::config::LlamaConfig;
use super::error::{Result, RuntimeError};
use super::model::{
    linear_name, AttnExtras, Block, Expert, LinearWeight, LlamaModel, MoeBlock, Proj, RopeStyle,
    ATTENTION,
};
use super::tokenizer::TextTokenizer;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The index file listing a sharded checkpoint's tensors.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Files besides the weights that travel with a checkpoint (copied as they are).
pub const CARRIED_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
];

/// Where a model loaded from a Hugging Face folder came from: what an export
/// needs to write a checkpoint like it.
#[derive(Debug, Clone)]
pub struct HfSource {
    pub dir: PathBuf,
    /// `config.json` as read (written back as it was).
    pub config: serde_json::Value,
    /// Each tensor's shard file, when the weights were sharded.
    pub shards: Option<BTreeMap<String, String>>,
    /// Each tensor's stored dtype.
    pub dtypes: BTreeMap<String, DType>,
}

/// One stored tensor as its safetensors header describes it.
#[derive(Debug, Clone)]
pub struct StoredTensor {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub file: PathBuf,
}

/// What a Hugging Face folder holds, read from `config.json` and the
/// safetensors headers without loading a weight.
#[derive(Debug, Clone)]
pub struct HfHeader {
    pub config: LlamaConfig,
    pub raw_config: serde_json::Value,
    /// The weight files, in order.
    pub files: Vec<PathBuf>,
    pub tensors: BTreeMap<String, StoredTensor>,
    /// Tensor to shard file name, when sharded.
    pub shards: Option<BTreeMap<String, String>>,
}

/// Every parameter the configuration calls for, with its shape.
pub fn expected_tensors(c: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (d, hd, inter) = (c.hidden_size, c.head_dim(), c.intermediate_size);
    let (qd, kv) = (c.q_dim(), c.kv_dim());
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![c.vocab_size, d],
    )];
    for l in 0..c.num_hidden_layers {
        let layer = |s: &str| format!("model.layers.{l}.{s}");
        out.push((layer("input_layernorm.weight"), vec![d]));
        out.push((layer("post_attention_layernorm.weight"), vec![d]));
        if let (Some(m), true) = (&c.moe, c.is_sparse(l)) {
            out.push((m.router_name(l), vec![m.num_experts, d]));
            let w = m.moe_intermediate_size;
            for e in 0..m.num_experts {
                out.push((m.expert_name(l, e, "gate"), vec![w, d]));
                out.push((m.expert_name(l, e, "up"), vec![w, d]));
                out.push((m.expert_name(l, e, "down"), vec![d, w]));
            }
        }
        let projs: &[Proj] = if c.is_sparse(l) {
            &ATTENTION
        } else {
            &Proj::ALL
        };
        for &p in projs {
            let shape = match p {
                Proj::Q => vec![qd, d],
                Proj::K | Proj::V => vec![kv, d],
                Proj::O => vec![d, qd],
                Proj::Gate | Proj::Up => vec![inter, d],
                Proj::Down => vec![d, inter],
            };
            out.push((linear_name(l, p), shape));
        }
        if c.has_qkv_bias() {
            out.push((layer("self_attn.q_proj.bias"), vec![qd]));
            out.push((layer("self_attn.k_proj.bias"), vec![kv]));
            out.push((layer("self_attn.v_proj.bias"), vec![kv]));
        }
        if c.attention_bias {
            out.push((layer("self_attn.o_proj.bias"), vec![d]));
        }
        if c.mlp_bias {
            out.push((layer("mlp.gate_proj.bias"), vec![inter]));
            out.push((layer("mlp.up_proj.bias"), vec![inter]));
            out.push((layer("mlp.down_proj.bias"), vec![d]));
        }
        if c.architecture.qk_norm() {
            out.push((layer("self_attn.q_norm.weight"), vec![hd]));
            out.push((layer("self_attn.k_norm.weight"), vec![hd]));
        }
    }
    out.push(("model.norm.weight".to_string(), vec![d]));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![c.vocab_size, d]));
    }
    out
}

/// Reads one safetensors header and checks that the file holds every byte it lists.
fn read_header(path: &Path) -> Result<BTreeMap<String, StoredTensor>> {
    let mut f = std::fs::File::open(path).map_err(|e| RuntimeError::io("reading", path, e))?;
    let len = f
        .metadata()
        .map_err(|e| RuntimeError::io("reading", path, e))?
        .len();
    let truncated = |what: String| RuntimeError::format(path, format!("truncated: {what}"));
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| truncated(format!("{len} bytes, shorter than a safetensors header")))?;
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 || 8 + n > len {
        return Err(truncated(format!(
            "the header claims {n} bytes, the file has {len}"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| RuntimeError::io("reading", path, e))?;
    let json: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| RuntimeError::format(path, format!("not a safetensors header: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, info) in json {
        if name == "__metadata__" {
            continue;
        }
        let bad = || RuntimeError::format(path, format!("tensor `{name}`: malformed header entry"));
        let dtype = info.get("dtype").and_then(|d| d.as_str()).ok_or_else(bad)?;
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(bad)?
            .iter()
            .map(|v| v.as_u64().map(|v| v as usize).ok_or_else(bad))
            .collect::<Result<_>>()?;
        let end = info
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(|o| o.as_u64())
            .ok_or_else(bad)?;
        if 8 + n + end > len {
            return Err(truncated(format!(
                "tensor `{name}` ends at byte {}, the file has {len} bytes",
                8 + n + end
            )));
        }
        out.insert(
            name,
            StoredTensor {
                dtype: dtype.to_string(),
                shape,
                file: path.to_path_buf(),
            },
        );
    }
    Ok(out)
}

/// Reads `config.json`, the shard index and every safetensors header of a
/// Hugging Face folder, and checks that each tensor the configuration needs
/// is present with its shape and a floating-point dtype prunec reads.
pub fn inspect_hf(dir: &Path) -> Result<HfHeader> {
    if !dir.is_dir() {
        return Err(RuntimeError::format(
            dir,
            "not a folder (a Hugging Face model folder holds config.json and model.safetensors)",
        ));
    }
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(RuntimeError::MissingNamedFile { path: config_path });
    }
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| RuntimeError::io("reading", &config_path, e))?;
    let raw_config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| RuntimeError::format(&config_path, format!("not a JSON file: {e}")))?;
    let config = LlamaConfig::from_hf_value(&raw_config, &config_path)?;
    let index = dir.join(INDEX_FILE);
    let (files, shards) = if index.is_file() {
        let text =
            std::fs::read_to_string(&index).map_err(|e| RuntimeError::io("reading", &index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| RuntimeError::format(&index, format!("not a JSON file: {e}")))?;
        let map: BTreeMap<String, String> = v
            .get("weight_map")
            .cloned()
            .and_then(|m| serde_json::from_value(m).ok())
            .ok_or_else(|| RuntimeError::format(&index, "no `weight_map` of tensor to file"))?;
        let mut names: Vec<&String> = map.values().collect();
        names.sort();
        names.dedup();
        let files = names.into_iter().map(|n| dir.join(n)).collect();
        (files, Some(map))
    } else if dir.join("model.safetensors").is_file() {
        (vec![dir.join("model.safetensors")], None)
    } else {
        return Err(RuntimeError::format(
            dir,
            format!("holds neither model.safetensors nor {INDEX_FILE}"),
        ));
    };
    let mut tensors = BTreeMap::new();
    for f in &files {
        if !f.is_file() {
            return Err(RuntimeError::MissingNamedFile { path: f.clone() });
        }
        tensors.extend(read_header(f)?);
    }
    if let Some(map) = &shards {
        for (name, file) in map {
            match tensors.get(name) {
                Some(t) if t.file == dir.join(file) => {}
                _ => {
                    return Err(RuntimeError::TensorNotFound {
                        name: name.clone(),
                        context: dir.join(file).display().to_string(),
                    })
                }
            }
        }
    }
    for (name, shape) in expected_tensors(&config) {
        let t = tensors
            .get(&name)
            .ok_or_else(|| RuntimeError::TensorNotFound {
                name: name.clone(),
                context: dir.display().to_string(),
            })?;
        if t.shape != shape {
            return Err(RuntimeError::ShapeMismatch {
                name,
                context: format!("{} (from config.json)", t.file.display()),
                expected: shape,
                found: t.shape.clone(),
            });
        }
        if !matches!(t.dtype.as_str(), "F32" | "F16" | "BF16") {
            return Err(RuntimeError::UnsupportedDType {
                name,
                context: t.file.display().to_string(),
                dtype: t.dtype.clone(),
            });
        }
    }
    Ok(HfHeader {
        config,
        raw_config,
        files,
        tensors,
        shards,
    })
}

/// Loads a Hugging Face causal LM (`LlamaForCausalLM`, `MistralForCausalLM`,
/// `Qwen2ForCausalLM`, `Qwen3ForCausalLM`) from its folder.
///
/// The weights are read through memory maps. Linear layers and embeddings
/// keep their stored dtype; a bf16 or f16 model is widened to f32 one block
/// at a time while it runs, so memory stays near the checkpoint's own size.
pub fn load_hf(dir: &Path) -> Result<LlamaModel> {
    load_hf_inspected(dir, inspect_hf(dir)?)
}

/// [`load_hf`] of a folder whose headers [`inspect_hf`] has already read.
pub fn load_hf_inspected(dir: &Path, header: HfHeader) -> Result<LlamaModel> {
    let config = header.config.clone();
    // SAFETY: the files are only read; a concurrent writer could change
    // the mapped bytes, as with any memory-mapped reader of user files.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&header.files) }.map_err(
        |e| {
            RuntimeError::format(
                dir,
                format!(
                    "cannot map the weights: {}",
                    crate::error::candle_message(&e)
                ),
            )
        },
    )?;
    let mut dtypes = BTreeMap::new();
    let mut get = |name: &str, widen: bool| -> Result<Tensor> {
        let t = st.load(name, &Device::Cpu).map_err(|e| {
            RuntimeError::format(
                dir,
                format!(
                    "tensor `{name}` cannot be read: {}",
                    crate::error::candle_message(&e)
                ),
            )
        })?;
        dtypes.insert(name.to_string(), t.dtype());
        Ok(if widen || t.dtype() == DType::F32 {
            t.to_dtype(DType::F32)?
        } else {
            t
        })
    };
    let mut blocks = Vec::with_capacity(config.num_hidden_layers);
    for l in 0..config.num_hidden_layers {
        let mut lin = |p: Proj| -> Result<LinearWeight> {
            Ok(LinearWeight::Dense(get(&linear_name(l, p), false)?))
        };
        let (q, k, v, o) = (lin(Proj::Q)?, lin(Proj::K)?, lin(Proj::V)?, lin(Proj::O)?);
        let layer = |s: &str| format!("model.layers.{l}.{s}");
        // A sparse block's dense MLP is empty: its experts replace it.
        let (gate, up, down, moe) = match &config.moe {
            Some(m) if config.is_sparse(l) => {
                let empty = |r: usize, c: usize| -> Result<LinearWeight> {
                    Ok(LinearWeight::Dense(Tensor::zeros(
                        (r, c),
                        DType::F32,
                        &Device::Cpu,
                    )?))
                };
                let d = config.hidden_size;
                let experts = (0..m.num_experts)
                    .map(|e| {
                        Ok(Expert {
                            gate: get(&m.expert_name(l, e, "gate"), false)?,
                            up: get(&m.expert_name(l, e, "up"), false)?,
                            down: get(&m.expert_name(l, e, "down"), false)?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let router = get(&m.router_name(l), true)?;
                (
                    empty(0, d)?,
                    empty(0, d)?,
                    empty(d, 0)?,
                    Some(MoeBlock { router, experts }),
                )
            }
            _ => (lin(Proj::Gate)?, lin(Proj::Up)?, lin(Proj::Down)?, None),
        };
        let mut opt = |s: &str, present: bool| -> Result<Option<Tensor>> {
            present.then(|| get(&layer(s), true)).transpose()
        };
        let arch = config.architecture;
        let (qkv, ob, mb) = (
            config.has_qkv_bias(),
            config.attention_bias,
            config.mlp_bias,
        );
        let extra = AttnExtras {
            q_bias: opt("self_attn.q_proj.bias", qkv)?,
            k_bias: opt("self_attn.k_proj.bias", qkv)?,
            v_bias: opt("self_attn.v_proj.bias", qkv)?,
            q_norm: opt("self_attn.q_norm.weight", arch.qk_norm())?,
            k_norm: opt("self_attn.k_norm.weight", arch.qk_norm())?,
            o_bias: opt("self_attn.o_proj.bias", ob)?,
            gate_bias: opt("mlp.gate_proj.bias", mb)?,
            up_bias: opt("mlp.up_proj.bias", mb)?,
            down_bias: opt("mlp.down_proj.bias", mb)?,
        };
        blocks.push(Block {
            attn_norm: get(&layer("input_layernorm.weight"), true)?,
            ffn_norm: get(&layer("post_attention_layernorm.weight"), true)?,
            q,
            k,
            v,
            o,
            gate,
            up,
            down,
            extra,
            moe,
        });
    }
    let embed = get("model.embed_tokens.weight", false)?;
    let norm = get("model.norm.weight", true)?;
    let lm_head = if config.tie_word_embeddings {
        None
    } else {
        Some(LinearWeight::Dense(get("lm_head.weight", false)?))
    };
    drop(st);
    let narrow = dtypes.values().any(|d| *d != DType::F32);
    let mut model =
        LlamaModel::from_parts(config, embed, blocks, norm, lm_head, RopeStyle::HalfSplit)?;
    if narrow {
        model.packs.keep_one_layer();
    }
    let tok = dir.join("tokenizer.json");
    if tok.exists() {
        model.tokenizer = Some(TextTokenizer::from_file(&tok)?);
    }
    model.hf_source = Some(HfSource {
        dir: dir.to_path_buf(),
        config: header.raw_config,
        shards: header.shards,
        dtypes,
    });
    Ok(model)
}

/// Saves the model in Hugging Face layout into `dir` (created if needed):
/// the weights under their usual names (`model.layers.N.self_attn.q_proj.weight`, ...),
/// `config.json` and the tokenizer files.
///
/// A model loaded from a Hugging Face folder is written like its source: each
/// tensor in its stored dtype (bf16 stays bf16), the same shards and index, the
/// source's `config.json`, and its tokenizer and generation files copied. Other
/// models are written in f32 as one `model.safetensors`. Returns the bytes of
/// the weight files.
pub fn save_hf(model: &LlamaModel, dir: &Path) -> Result<u64> {
    if model.has_armor() {
        return Err(RuntimeError::Invalid(
            "ARMOR's block-diagonal wrappers have no place in a Hugging Face checkpoint".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| RuntimeError::io("writing", dir, e))?;
    let source = model.hf_source.as_ref();
    let tensors: Vec<(String, Tensor)> = padded_experts(model)?
        .into_iter()
        .map(|(n, t)| {
            // A bias the source did not have (FLAP's compensation) takes
            // the dtype of its projection's weight.
            let weight = n.strip_suffix(".bias").map(|p| format!("{p}.weight"));
            let dtype = source
                .and_then(|s| {
                    s.dtypes
                        .get(&n)
                        .or_else(|| weight.as_ref().and_then(|w| s.dtypes.get(w)))
                        .copied()
                })
                .unwrap_or(DType::F32);
            Ok((n, t.to_dtype(dtype)?.contiguous()?))
        })
        .collect::<Result<_>>()?;
    // Tensors by file: the source's shards, else one file.
    let mut files: BTreeMap<String, Vec<(String, Tensor)>> = BTreeMap::new();
    let shards = source.and_then(|s| s.shards.as_ref());
    for (n, t) in tensors {
        let file = shards
            .and_then(|m| m.get(&n).cloned())
            .unwrap_or_else(|| match shards {
                Some(m) => m.values().next().cloned().unwrap_or_default(),
                None => "model.safetensors".to_string(),
            });
        files.entry(file).or_default().push((n, t));
    }
    let mut total = 0u64;
    let mut weight_map = BTreeMap::new();
    let mut data_bytes = 0u64;
    for (file, tensors) in &files {
        let path = dir.join(file);
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let bytes = safetensors::tensor::serialize(
            tensors.iter().map(|(n, t)| (n.as_str(), t)),
            Some(meta),
        )
        .map_err(|e| RuntimeError::format(&path, format!("cannot serialize: {e}")))?;
        write_atomic(&path, &bytes)?;
        total += bytes.len() as u64;
        for (n, t) in tensors {
            weight_map.insert(n.clone(), file.clone());
            data_bytes += (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        }
    }
    if shards.is_some() {
        let index = serde_json::json!({
            "metadata": { "total_size": data_bytes },
            "weight_map": weight_map,
        });
        write_atomic(
            &dir.join(INDEX_FILE),
            serde_json::to_string_pretty(&index)
                .expect("json value prints")
                .as_bytes(),
        )?;
    }
    let config = match source {
        Some(s) => {
            let mut c = s.config.clone();
            if let Some(obj) = c.as_object_mut() {
                obj.insert(
                    "num_hidden_layers".into(),
                    serde_json::json!(model.num_layers()),
                );
                // Sizes that removing units changed, and biases FLAP's
                // compensation added (the rest stays as written).
                let mc = &model.config;
                if mc.attention_bias {
                    obj.insert("attention_bias".into(), serde_json::json!(true));
                }
                if mc.mlp_bias {
                    obj.insert("mlp_bias".into(), serde_json::json!(true));
                }
                let src = |obj: &serde_json::Map<String, serde_json::Value>, k: &str| {
                    obj.get(k).and_then(|v| v.as_u64())
                };
                if let Some(m) = &mc.moe {
                    // transformers 5 writes `num_local_experts`, the Hub's
                    // Qwen3-MoE checkpoints `num_experts`: every key the
                    // source has (one when it has neither).
                    let keys: Vec<&str> = ["num_local_experts", "num_experts"]
                        .into_iter()
                        .filter(|k| obj.contains_key(*k))
                        .collect();
                    let keys = if keys.is_empty() {
                        vec![match m.layout {
                            super::config::MoeLayout::Qwen3 => "num_experts",
                            super::config::MoeLayout::Mixtral => "num_local_experts",
                        }]
                    } else {
                        keys
                    };
                    for key in keys {
                        obj.insert(key.into(), serde_json::json!(m.num_experts));
                    }
                    // Mixtral's experts are `intermediate_size` wide.
                    let width = match m.layout {
                        super::config::MoeLayout::Qwen3 => "moe_intermediate_size",
                        super::config::MoeLayout::Mixtral => "intermediate_size",
                    };
                    obj.insert(
                        width.into(),
                        serde_json::json!(export_expert_width(m, expert_elem(model))),
                    );
                }
                if src(obj, "intermediate_size") != Some(mc.intermediate_size as u64) {
                    obj.insert(
                        "intermediate_size".into(),
                        serde_json::json!(mc.intermediate_size),
                    );
                }
                let heads = src(obj, "num_attention_heads");
                // A config without `num_key_value_heads` means one per head.
                let kv_heads = src(obj, "num_key_value_heads").or(heads);
                if heads != Some(mc.num_attention_heads as u64)
                    || kv_heads != Some(mc.num_key_value_heads as u64)
                {
                    obj.insert(
                        "num_attention_heads".into(),
                        serde_json::json!(mc.num_attention_heads),
                    );
                    obj.insert(
                        "num_key_value_heads".into(),
                        serde_json::json!(mc.num_key_value_heads),
                    );
                    obj.insert("head_dim".into(), serde_json::json!(mc.head_dim()));
                }
            }
            serde_json::to_string_pretty(&c).expect("json value prints")
        }
        None => model.config.to_hf_json(),
    };
    write_atomic(&dir.join("config.json"), config.as_bytes())?;
    let mut carried = Vec::new();
    if let Some(s) = source {
        for name in CARRIED_FILES {
            let from = s.dir.join(name);
            if from.is_file() && s.dir.canonicalize().ok() != dir.canonicalize().ok() {
                let bytes =
                    std::fs::read(&from).map_err(|e| RuntimeError::io("reading", &from, e))?;
                write_atomic(&dir.join(name), &bytes)?;
                carried.push(name);
            }
        }
    }
    if !carried.contains(&"tokenizer.json") {
        if let Some(tok) = &model.tokenizer {
            write_atomic(&dir.join("tokenizer.json"), tok.to_json()?.as_bytes())?;
        }
    }
    if !carried.contains(&"generation_config.json") {
        let c = &model.config;
        let generation = serde_json::json!({
            "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_id,
        });
        write_atomic(
            &dir.join("generation_config.json"),
            serde_json::to_string_pretty(&generation)
                .expect("json value prints")
                .as_bytes(),
        )?;
    }
    Ok(total)
}

/// The experts' width in an export whose expert weights take `elem` bytes
/// per value: the widest expert's, rounded up so that a row is a multiple of
/// 16 bytes (transformers' grouped expert products want 16-byte strides: a
/// multiple of 4 in f32, of 8 in bf16 or f16).
pub fn export_expert_width(m: &super::config::MoeConfig, elem: usize) -> usize {
    let k = (16 / elem.max(1)).max(1);
    m.moe_intermediate_size.div_ceil(k) * k
}

/// The bytes per value of the narrowest expert weight (4 when none).
fn expert_elem(model: &LlamaModel) -> usize {
    model
        .blocks
        .iter()
        .filter_map(|b| b.moe.as_ref())
        .flat_map(|m| m.experts.iter())
        .map(|e| e.gate.dtype().size_in_bytes())
        .min()
        .unwrap_or(4)
}

/// The model's tensors with every expert widened to the export's width by
/// zero rows of `gate`/`up` and zero columns of `down` (Hugging Face holds
/// one width for all experts; a zero atomic expert adds nothing, so the
/// function is unchanged).
fn padded_experts(model: &LlamaModel) -> Result<Vec<(String, Tensor)>> {
    let tensors = model.named_tensors()?;
    let Some(m) = &model.config.moe else {
        return Ok(tensors);
    };
    let width = export_expert_width(m, expert_elem(model));
    // Each expert weight and the dimension its atomic experts run along.
    let mut dims = HashMap::new();
    for (l, blk) in model.blocks.iter().enumerate() {
        for e in 0..blk.moe.as_ref().map_or(0, |x| x.experts.len()) {
            dims.insert(m.expert_name(l, e, "gate"), 0);
            dims.insert(m.expert_name(l, e, "up"), 0);
            dims.insert(m.expert_name(l, e, "down"), 1);
        }
    }
    tensors
        .into_iter()
        .map(|(n, t)| {
            let Some(&dim) = dims.get(&n) else {
                return Ok((n, t));
            };
            let have = t.dim(dim)?;
            if have >= width {
                return Ok((n, t));
            }
            let mut shape = t.dims().to_vec();
            shape[dim] = width - have;
            let zeros = Tensor::zeros(shape, t.dtype(), t.device())?;
            Ok((n, Tensor::cat(&[&t, &zeros], dim)?))
        })
        .collect()
}

/// Writes `bytes` to `path` through a temporary file in the same folder, renamed into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".prunec-")
        .tempfile_in(dir)
        .map_err(|e| RuntimeError::io("writing", dir, e))?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .map_err(|e| RuntimeError::io("writing", tmp.path(), e))?;
    tmp.persist(path)
        .map_err(|e| RuntimeError::io("writing", path, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/models")
            .join(name)
    }

    /// A bf16 model keeps its linear weights in bf16 and holds the f32
    /// packs of one block at a time; an f32 model keeps every block's.
    #[test]
    fn narrow_models_widen_one_block_at_a_time() {
        let ids = Tensor::new(&[[3u32, 7, 11, 5, 9, 2]], &Device::Cpu).unwrap();
        let bf16 = load_hf(&tiny("tiny-qwen3")).unwrap();
        assert_eq!(
            bf16.stored_linear(1, Proj::Down).unwrap().dtype(),
            DType::BF16
        );
        bf16.forward(&ids).unwrap();
        let layers = bf16.packs.layers();
        assert_eq!(layers.len(), 1, "{layers:?}");
        let f32 = load_hf(&tiny("tiny-llama")).unwrap();
        f32.forward(&ids).unwrap();
        assert_eq!(f32.packs.layers().len(), f32.num_layers() + 1);
    }
}
