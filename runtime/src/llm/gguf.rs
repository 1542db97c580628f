//! Loads a LLaMA-family model from a GGUF file: dequantized f32 weights (prunable) or candle's quantized reference.

use super::config::LlamaConfig;
use super::error::{Result, RuntimeError};
use super::model::{Block, LinearWeight, LlamaModel, RopeStyle};
use super::tokenizer::TextTokenizer;
use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An open GGUF file: its header, metadata and tensor table.
pub struct GgufFile {
    path: PathBuf,
    file: std::fs::File,
    content: gguf_file::Content,
}

impl GgufFile {
    /// Opens a GGUF file and reads its header.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file =
            std::fs::File::open(path).map_err(|e| RuntimeError::io("reading", path, e))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| {
            RuntimeError::format(
                path,
                format!(
                    "not a readable GGUF file: {}",
                    crate::error::candle_message(&e)
                ),
            )
        })?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            file,
            content,
        })
    }

    /// Checks the header against the file without reading weights: the
    /// configuration is complete and every tensor lies inside the file (a
    /// truncated download fails here, naming the first tensor cut off).
    pub fn check(&self) -> Result<LlamaConfig> {
        let config = self.config()?;
        let len = self
            .file
            .metadata()
            .map_err(|e| RuntimeError::io("reading", &self.path, e))?
            .len();
        let mut infos: Vec<_> = self.content.tensor_infos.iter().collect();
        infos.sort_by_key(|(name, _)| name.as_str());
        for (name, info) in infos {
            let dtype = info.ggml_dtype;
            let bytes = info.shape.elem_count() / dtype.block_size() * dtype.type_size();
            let end = self.content.tensor_data_offset + info.offset + bytes as u64;
            if end > len {
                return Err(RuntimeError::format(
                    &self.path,
                    format!(
                        "truncated: tensor `{name}` ends at byte {end}, the file has {len} bytes"
                    ),
                ));
            }
        }
        Ok(config)
    }

    /// The parsed header (metadata and tensor infos).
    pub fn content(&self) -> &gguf_file::Content {
        &self.content
    }

    /// The model configuration from the `llama.*` metadata keys.
    pub fn config(&self) -> Result<LlamaConfig> {
        let arch = self.meta_str("general.architecture")?;
        if arch != "llama" {
            return Err(RuntimeError::format(
                &self.path,
                format!("architecture `{arch}` is not supported (only `llama`)"),
            ));
        }
        let vocab_size = match self.content.metadata.get("tokenizer.ggml.tokens") {
            Some(v) => v.to_vec().map(|v| v.len()).unwrap_or(0),
            None => 0,
        };
        let embed_rows = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims()[0])
            .unwrap_or(vocab_size);
        let config = LlamaConfig {
            vocab_size: embed_rows,
            hidden_size: self.meta_usize("llama.embedding_length")?,
            intermediate_size: self.meta_usize("llama.feed_forward_length")?,
            num_hidden_layers: self.meta_usize("llama.block_count")?,
            num_attention_heads: self.meta_usize("llama.attention.head_count")?,
            num_key_value_heads: self
                .meta_usize("llama.attention.head_count_kv")
                .or_else(|_| self.meta_usize("llama.attention.head_count"))?,
            rope_theta: self.meta_f64("llama.rope.freq_base").unwrap_or(10_000.0),
            rms_norm_eps: self.meta_f64("llama.attention.layer_norm_rms_epsilon")?,
            max_position_embeddings: self.meta_usize("llama.context_length").unwrap_or(2048),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            bos_token_id: self
                .meta_usize("tokenizer.ggml.bos_token_id")
                .ok()
                .map(|v| v as u32),
            eos_token_id: self
                .meta_usize("tokenizer.ggml.eos_token_id")
                .ok()
                .map(|v| v as u32),
            head_dim: None,
            sliding_window: None,
            architecture: Default::default(),
            attention_bias: false,
            mlp_bias: false,
            moe: None,
        };
        config.validate(&self.path)?;
        Ok(config)
    }

    /// The tokenizer stored in the metadata.
    pub fn tokenizer(&self) -> Result<TextTokenizer> {
        TextTokenizer::from_gguf(&self.content, &self.path)
    }

    /// Reads one tensor in its stored (possibly quantized) form.
    pub fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        if !self.content.tensor_infos.contains_key(name) {
            return Err(RuntimeError::TensorNotFound {
                name: name.to_string(),
                context: self.path.display().to_string(),
            });
        }
        self.content
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(|e| {
                RuntimeError::format(
                    &self.path,
                    format!("tensor `{name}`: {}", crate::error::candle_message(&e)),
                )
            })
    }

    /// Reads one tensor and dequantizes it to f32.
    pub fn dequantized(&mut self, name: &str) -> Result<Tensor> {
        let q = self.qtensor(name)?;
        Ok(q.dequantize(&Device::Cpu)?)
    }

    /// The raw bytes of a stored tensor (its quantized blocks), for independent checks.
    pub fn raw_bytes(&mut self, name: &str, len: usize) -> Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let info =
            self.content
                .tensor_infos
                .get(name)
                .ok_or_else(|| RuntimeError::TensorNotFound {
                    name: name.to_string(),
                    context: self.path.display().to_string(),
                })?;
        let start = self.content.tensor_data_offset + info.offset;
        let mut buf = vec![0u8; len];
        self.file
            .seek(SeekFrom::Start(start))
            .and_then(|_| self.file.read_exact(&mut buf))
            .map_err(|e| RuntimeError::io("reading", &self.path, e))?;
        Ok(buf)
    }

    fn meta(&self, key: &str) -> Result<&gguf_file::Value> {
        self.content.metadata.get(key).ok_or_else(|| {
            RuntimeError::format(&self.path, format!("GGUF metadata `{key}` is missing"))
        })
    }

    fn meta_str(&self, key: &str) -> Result<String> {
        self.meta(key)?.to_string().cloned().map_err(|_| {
            RuntimeError::format(&self.path, format!("GGUF metadata `{key}` is not a string"))
        })
    }

    fn meta_usize(&self, key: &str) -> Result<usize> {
        use gguf_file::Value::*;
        let v = self.meta(key)?;
        let n = match v {
            U8(x) => *x as i128,
            I8(x) => *x as i128,
            U16(x) => *x as i128,
            I16(x) => *x as i128,
            U32(x) => *x as i128,
            I32(x) => *x as i128,
            U64(x) => *x as i128,
            I64(x) => *x as i128,
            _ => -1,
        };
        usize::try_from(n).map_err(|_| {
            RuntimeError::format(
                &self.path,
                format!("GGUF metadata `{key}` is not a count: {v:?}"),
            )
        })
    }

    fn meta_f64(&self, key: &str) -> Result<f64> {
        let v = self.meta(key)?;
        // f32 metadata (1e-5 stored as 9.99999974e-6) is read back through its shortest decimal form.
        v.to_f32()
            .map(|x| x.to_string().parse::<f64>().unwrap_or(x as f64))
            .or_else(|_| v.to_f64())
            .map_err(|_| {
                RuntimeError::format(&self.path, format!("GGUF metadata `{key}` is not a number"))
            })
    }
}

/// Undoes llama.cpp's q/k row permutation for adjacent-pair RoPE, giving the Hugging Face half-split layout.
///
/// Within each head, stored rows are ordered (dim/2, 2); Hugging Face orders them (2, dim/2).
pub fn unpermute_rope_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / heads;
    Ok(w.reshape((heads, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// Loads a GGUF LLaMA model with every weight dequantized to f32 (the form the pruners work on).
pub fn load_gguf(path: &Path) -> Result<LlamaModel> {
    let mut g = GgufFile::open(path)?;
    let config = g.config()?;
    let tokenizer = g.tokenizer()?;
    let (nh, nkv) = (config.num_attention_heads, config.num_key_value_heads);
    let mut blocks = Vec::with_capacity(config.num_hidden_layers);
    for l in 0..config.num_hidden_layers {
        let mut dense = |suffix: &str| g.dequantized(&format!("blk.{l}.{suffix}.weight"));
        let q = unpermute_rope_rows(&dense("attn_q")?, nh)?;
        let k = unpermute_rope_rows(&dense("attn_k")?, nkv)?;
        blocks.push(Block {
            attn_norm: dense("attn_norm")?,
            q: LinearWeight::Dense(q),
            k: LinearWeight::Dense(k),
            v: LinearWeight::Dense(dense("attn_v")?),
            o: LinearWeight::Dense(dense("attn_output")?),
            ffn_norm: dense("ffn_norm")?,
            gate: LinearWeight::Dense(dense("ffn_gate")?),
            up: LinearWeight::Dense(dense("ffn_up")?),
            down: LinearWeight::Dense(dense("ffn_down")?),
            extra: Default::default(),
            moe: None,
        });
    }
    let embed = g.dequantized("token_embd.weight")?;
    let norm = g.dequantized("output_norm.weight")?;
    let lm_head = if config.tie_word_embeddings {
        None
    } else {
        Some(LinearWeight::Dense(g.dequantized("output.weight")?))
    };
    let mut model =
        LlamaModel::from_parts(config, embed, blocks, norm, lm_head, RopeStyle::HalfSplit)?;
    model.tokenizer = Some(tokenizer);
    Ok(model)
}

/// Loads a GGUF LLaMA model as candle's quantized kernels run it: linear layers stay quantized
/// (candle's q4/q8 matmuls), q/k keep the stored llama.cpp order and RoPE rotates adjacent pairs.
///
/// This is an independent reference for [`load_gguf`]: it shares neither the dequantization,
/// nor the q/k row permutation, nor the RoPE convention.
pub fn load_gguf_quantized_reference(path: &Path) -> Result<LlamaModel> {
    let mut g = GgufFile::open(path)?;
    let config = g.config()?;
    let quant = |g: &mut GgufFile, name: String| -> Result<LinearWeight> {
        Ok(LinearWeight::Quantized(Arc::new(QMatMul::from_qtensor(
            g.qtensor(&name)?,
        )?)))
    };
    let mut blocks = Vec::with_capacity(config.num_hidden_layers);
    for l in 0..config.num_hidden_layers {
        blocks.push(Block {
            attn_norm: g.dequantized(&format!("blk.{l}.attn_norm.weight"))?,
            q: quant(&mut g, format!("blk.{l}.attn_q.weight"))?,
            k: quant(&mut g, format!("blk.{l}.attn_k.weight"))?,
            v: quant(&mut g, format!("blk.{l}.attn_v.weight"))?,
            o: quant(&mut g, format!("blk.{l}.attn_output.weight"))?,
            ffn_norm: g.dequantized(&format!("blk.{l}.ffn_norm.weight"))?,
            gate: quant(&mut g, format!("blk.{l}.ffn_gate.weight"))?,
            up: quant(&mut g, format!("blk.{l}.ffn_up.weight"))?,
            down: quant(&mut g, format!("blk.{l}.ffn_down.weight"))?,
            extra: Default::default(),
            moe: None,
        });
    }
    let embed_q = g.qtensor("token_embd.weight")?;
    let embed = embed_q.dequantize(&Device::Cpu)?;
    let norm = g.dequantized("output_norm.weight")?;
    let mut model = LlamaModel::from_parts(
        config.clone(),
        embed,
        blocks,
        norm,
        None,
        RopeStyle::AdjacentPairs,
    )?;
    model.lm_head_quantized = Some(Arc::new(if config.tie_word_embeddings {
        QMatMul::from_qtensor(embed_q)?
    } else {
        QMatMul::from_qtensor(g.qtensor("output.weight")?)?
    }));
    Ok(model)
}
