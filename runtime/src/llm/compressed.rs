//! A compact file format for N:M-sparse models (2:4, 4:8): kept values plus packed in-group positions, loaded back bit-exactly.
//!
//! Layout: the 8 bytes `PRUNECNM`, a little-endian u64 header length, a JSON header
//! (`config`, `tokenizer`, and for each tensor its name, shape, encoding and byte range), then
//! the data. A `dense` tensor is its f32 values; an `n:m` tensor stores, for each group of `m`
//! consecutive weights of a row, its `n` kept f32 values followed (in a separate section) by
//! their positions in the group, `ceil(log2 m)` bits each, packed least-significant bit first.

use super::config::LlamaConfig;
use super::error::{Result, RuntimeError};
use super::hf::write_atomic;
use super::model::{Block, LinearWeight, LlamaModel, Proj, RopeStyle};
use super::tokenizer::TextTokenizer;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;

const MAGIC: &[u8; 8] = b"PRUNECNM";

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    config: LlamaConfig,
    tokenizer: Option<String>,
    tensors: Vec<Entry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    name: String,
    shape: Vec<usize>,
    /// `None` for dense, `Some((n, m))` for N:M.
    nm: Option<(usize, usize)>,
    offset: usize,
    len: usize,
}

/// Sizes of a compressed file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedSize {
    pub bytes: u64,
    pub nm_tensors: usize,
    pub dense_tensors: usize,
}

fn position_bits(m: usize) -> usize {
    (usize::BITS - (m - 1).leading_zeros()).max(1) as usize
}

/// Encodes a (rows, cols) row-major weight whose every group of `m` holds at most `n` non-zero
/// values (bit patterns other than +0.0). Returns `None` when the weight is not N:M sparse.
pub fn encode_nm(values: &[f32], cols: usize, n: usize, m: usize) -> Option<Vec<u8>> {
    if m == 0 || n > m || !cols.is_multiple_of(m) || !values.len().is_multiple_of(cols) {
        return None;
    }
    let groups = values.len() / m;
    let bits = position_bits(m);
    let mut kept = Vec::with_capacity(groups * n * 4);
    let mut packed = vec![0u8; (groups * n * bits).div_ceil(8)];
    let mut bit = 0usize;
    let mut slots = Vec::with_capacity(n);
    for g in values.chunks_exact(m) {
        slots.clear();
        slots.extend((0..m).filter(|&j| g[j].to_bits() != 0));
        if slots.len() > n {
            return None;
        }
        // Pad with the first stored-as-zero positions so every group has exactly n slots.
        let mut j = 0;
        while slots.len() < n {
            if !slots.contains(&j) {
                slots.push(j);
            }
            j += 1;
        }
        slots.sort_unstable();
        for &s in &slots {
            kept.extend_from_slice(&g[s].to_le_bytes());
            for b in 0..bits {
                if (s >> b) & 1 == 1 {
                    packed[bit / 8] |= 1 << (bit % 8);
                }
                bit += 1;
            }
        }
    }
    kept.extend_from_slice(&packed);
    Some(kept)
}

/// Decodes [`encode_nm`]'s bytes back into `len` f32 values.
pub fn decode_nm(bytes: &[u8], len: usize, n: usize, m: usize) -> Option<Vec<f32>> {
    if m == 0 || n > m || !len.is_multiple_of(m) {
        return None;
    }
    let groups = len / m;
    let bits = position_bits(m);
    let kept_bytes = groups * n * 4;
    if bytes.len() != kept_bytes + (groups * n * bits).div_ceil(8) {
        return None;
    }
    let (kept, packed) = bytes.split_at(kept_bytes);
    let mut out = vec![0.0f32; len];
    let mut bit = 0usize;
    for g in 0..groups {
        for k in 0..n {
            let mut s = 0usize;
            for b in 0..bits {
                s |= (((packed[bit / 8] >> (bit % 8)) & 1) as usize) << b;
                bit += 1;
            }
            if s >= m {
                return None;
            }
            let at = (g * n + k) * 4;
            out[g * m + s] = f32::from_le_bytes(kept[at..at + 4].try_into().ok()?);
        }
    }
    Some(out)
}

/// Writes `model` in the compressed format: block linear layers that are `n:m` sparse are stored
/// as kept values + positions, everything else as dense f32. Atomic (temp file + rename).
pub fn save_compressed(
    model: &LlamaModel,
    path: &Path,
    n: usize,
    m: usize,
) -> Result<CompressedSize> {
    if model.has_armor() {
        return Err(RuntimeError::Invalid(
            "ARMOR's block-diagonal wrappers have no place in a compressed-tensors checkpoint"
                .into(),
        ));
    }
    if model.config.architecture != super::config::Architecture::Llama {
        return Err(RuntimeError::Invalid(format!(
            "the compressed format stores LlamaForCausalLM models only, not {}",
            model.config.architecture.class_name()
        )));
    }
    if model.config.mlp_bias || model.config.attention_bias {
        return Err(RuntimeError::Invalid(
            "the compressed format stores no linear biases (`mlp_bias`, `attention_bias`): export a Hugging Face folder".into(),
        ));
    }
    let mut entries = Vec::new();
    let mut data: Vec<u8> = Vec::new();
    let (mut nm_tensors, mut dense_tensors) = (0, 0);
    for (name, t) in model.named_tensors()? {
        let shape = t.dims().to_vec();
        let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let encoded = if shape.len() == 2 && name.starts_with("model.layers.") {
            encode_nm(&values, shape[1], n, m)
        } else {
            None
        };
        let (bytes, nm) = match encoded {
            Some(b) => {
                nm_tensors += 1;
                (b, Some((n, m)))
            }
            None => {
                dense_tensors += 1;
                (values.iter().flat_map(|v| v.to_le_bytes()).collect(), None)
            }
        };
        entries.push(Entry {
            name,
            shape,
            nm,
            offset: data.len(),
            len: bytes.len(),
        });
        data.extend_from_slice(&bytes);
    }
    let header = Header {
        config: model.config.clone(),
        tokenizer: model.tokenizer.as_ref().map(|t| t.to_json()).transpose()?,
        tensors: entries,
    };
    let header = serde_json::to_vec(&header)
        .map_err(|e| RuntimeError::format(path, format!("cannot encode header: {e}")))?;
    let mut file = Vec::with_capacity(16 + header.len() + data.len());
    file.extend_from_slice(MAGIC);
    file.extend_from_slice(&(header.len() as u64).to_le_bytes());
    file.extend_from_slice(&header);
    file.extend_from_slice(&data);
    write_atomic(path, &file)?;
    Ok(CompressedSize {
        bytes: file.len() as u64,
        nm_tensors,
        dense_tensors,
    })
}

/// Loads a model written by [`save_compressed`].
pub fn load_compressed(path: &Path) -> Result<LlamaModel> {
    let bytes = std::fs::read(path).map_err(|e| RuntimeError::io("reading", path, e))?;
    let bad = |reason: String| RuntimeError::format(path, reason);
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err(bad("not a prunec N:M file (bad magic)".into()));
    }
    let hlen = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) as usize;
    let data_start = 16usize
        .checked_add(hlen)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| bad("header length runs past the end of the file".into()))?;
    let header: Header = serde_json::from_slice(&bytes[16..data_start])
        .map_err(|e| bad(format!("bad header: {e}")))?;
    header.config.validate(path)?;
    let data = &bytes[data_start..];
    let mut tensors = std::collections::HashMap::new();
    for e in &header.tensors {
        let raw = e
            .offset
            .checked_add(e.len)
            .and_then(|end| data.get(e.offset..end))
            .ok_or_else(|| bad(format!("tensor `{}` runs past the end of the file", e.name)))?;
        let len: usize = e.shape.iter().product();
        let values = match e.nm {
            Some((n, m)) => decode_nm(raw, len, n, m),
            None if raw.len() == len * 4 => Some(
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect(),
            ),
            None => None,
        }
        .ok_or_else(|| {
            bad(format!(
                "tensor `{}`: data does not match shape {:?}",
                e.name, e.shape
            ))
        })?;
        tensors.insert(
            e.name.clone(),
            Tensor::from_vec(values, e.shape.as_slice(), &Device::Cpu)?,
        );
    }
    let mut take = |name: &str| {
        tensors
            .remove(name)
            .ok_or_else(|| RuntimeError::TensorNotFound {
                name: name.to_string(),
                context: path.display().to_string(),
            })
    };
    let c = header.config.clone();
    let mut blocks = Vec::with_capacity(c.num_hidden_layers);
    for l in 0..c.num_hidden_layers {
        let mut lin = |p: Proj| -> Result<LinearWeight> {
            Ok(LinearWeight::Dense(take(&super::model::linear_name(l, p))?))
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
            extra: Default::default(),
            moe: None,
        });
    }
    let embed = take("model.embed_tokens.weight")?;
    let norm = take("model.norm.weight")?;
    let lm_head = if c.tie_word_embeddings {
        None
    } else {
        Some(LinearWeight::Dense(take("lm_head.weight")?))
    };
    let mut model = LlamaModel::from_parts(c, embed, blocks, norm, lm_head, RopeStyle::HalfSplit)?;
    if let Some(json) = header.tokenizer {
        model.tokenizer = Some(TextTokenizer::from_json(&json)?);
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nm_round_trip_is_bit_exact_including_signed_zero_and_nan() {
        let v = [
            0.0,
            1.5,
            0.0,
            -0.0, // 2 stored: 1.5 and -0.0
            f32::NAN,
            0.0,
            0.0,
            0.0, // 1 stored (padded)
            0.0,
            0.0,
            0.0,
            0.0, // none stored
            7.0,
            0.0,
            0.0,
            -3.0,
        ];
        let enc = encode_nm(&v, 8, 2, 4).unwrap();
        assert_eq!(enc.len(), 4 * 2 * 4 + 2); // 8 kept f32 + 4 groups x 2 positions x 2 bits
        let dec = decode_nm(&enc, v.len(), 2, 4).unwrap();
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&dec), bits(&v));
    }

    #[test]
    fn dense_groups_are_rejected() {
        assert!(encode_nm(&[1.0, 2.0, 3.0, 0.0], 4, 2, 4).is_none());
        assert!(encode_nm(&[1.0, 2.0, 3.0, 0.0, 0.0, 0.0], 6, 2, 4).is_none());
    }

    #[test]
    fn four_of_eight_uses_three_bit_positions() {
        let v: Vec<f32> = (0..16)
            .map(|i| if i % 2 == 0 { i as f32 } else { 0.0 })
            .collect();
        let enc = encode_nm(&v, 16, 4, 8).unwrap();
        assert_eq!(enc.len(), 2 * 4 * 4 + (2 * 4 * 3usize).div_ceil(8));
        assert_eq!(decode_nm(&enc, 16, 4, 8).unwrap(), v);
    }
}
