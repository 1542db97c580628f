//! Hugging Face layout: `model.safetensors` + `config.json` + `tokenizer.json`, read and written atomically.

use super::config::LlamaConfig;
use super::error::{Result, RuntimeError};
use super::model::{linear_name, Block, LinearWeight, LlamaModel, Proj, RopeStyle};
use super::tokenizer::TextTokenizer;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

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

/// Saves the model in Hugging Face `LlamaForCausalLM` layout into `dir` (created if needed).
///
/// Writes `model.safetensors` (f32, the usual `model.layers.N.self_attn.q_proj.weight` names),
/// `config.json`, and `tokenizer.json` when the model has a tokenizer. Returns the size in bytes
/// of `model.safetensors`.
pub fn save_hf(model: &LlamaModel, dir: &Path) -> Result<u64> {
    std::fs::create_dir_all(dir).map_err(|e| RuntimeError::io("writing", dir, e))?;
    let tensors: Vec<(String, Tensor)> = model
        .named_tensors()?
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let weights = dir.join("model.safetensors");
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let bytes =
        safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
            .map_err(|e| RuntimeError::format(&weights, format!("cannot serialize: {e}")))?;
    write_atomic(&weights, &bytes)?;
    write_atomic(
        &dir.join("config.json"),
        model.config.to_hf_json().as_bytes(),
    )?;
    if let Some(tok) = &model.tokenizer {
        write_atomic(&dir.join("tokenizer.json"), tok.to_json()?.as_bytes())?;
    }
    Ok(bytes.len() as u64)
}

/// Loads a model saved in Hugging Face layout (`config.json`, `model.safetensors`, optional `tokenizer.json`).
pub fn load_hf(dir: &Path) -> Result<LlamaModel> {
    let config = LlamaConfig::from_json_file(&dir.join("config.json"))?;
    let weights = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).map_err(|e| {
        RuntimeError::format(&weights, format!("not a readable safetensors file: {e}"))
    })?;
    let mut take = |name: &str| -> Result<Tensor> {
        let t = tensors
            .remove(name)
            .ok_or_else(|| RuntimeError::TensorNotFound {
                name: name.to_string(),
                context: weights.display().to_string(),
            })?;
        Ok(t.to_dtype(DType::F32)?)
    };
    let mut blocks = Vec::with_capacity(config.num_hidden_layers);
    for l in 0..config.num_hidden_layers {
        let mut lin = |p: Proj| -> Result<LinearWeight> {
            Ok(LinearWeight::Dense(take(&linear_name(l, p))?))
        };
        let (q, k, v, o) = (lin(Proj::Q)?, lin(Proj::K)?, lin(Proj::V)?, lin(Proj::O)?);
        let (gate, up, down) = (lin(Proj::Gate)?, lin(Proj::Up)?, lin(Proj::Down)?);
        blocks.push(Block {
            attn_norm: take(&format!("model.layers.{l}.input_layernorm.weight"))?,
            ffn_norm: take(&format!("model.layers.{l}.post_attention_layernorm.weight"))?,
            q,
            k,
            v,
            o,
            gate,
            up,
            down,
        });
    }
    let embed = take("model.embed_tokens.weight")?;
    let norm = take("model.norm.weight")?;
    let lm_head = if config.tie_word_embeddings {
        None
    } else {
        Some(LinearWeight::Dense(take("lm_head.weight")?))
    };
    let mut model =
        LlamaModel::from_parts(config, embed, blocks, norm, lm_head, RopeStyle::HalfSplit)?;
    let tok = dir.join("tokenizer.json");
    if tok.exists() {
        model.tokenizer = Some(TextTokenizer::from_file(&tok)?);
    }
    Ok(model)
}
