//! The byte-level BPE tokenizer of LLaMA-family models, built from GGUF metadata or a `tokenizer.json`.

use super::error::{Result, RuntimeError};
use candle_core::quantized::gguf_file;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

/// A text tokenizer: encode, decode, and save as a Hugging Face `tokenizer.json`.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TextTokenizer({} tokens)", self.vocab_size())
    }
}

fn tok_err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Tokenizer(e.to_string())
}

fn string_array(ct: &gguf_file::Content, key: &str, path: &Path) -> Result<Vec<String>> {
    let value = ct
        .metadata
        .get(key)
        .ok_or_else(|| RuntimeError::format(path, format!("GGUF metadata `{key}` is missing")))?;
    let items = value.to_vec().map_err(|_| {
        RuntimeError::format(path, format!("GGUF metadata `{key}` is not an array"))
    })?;
    items
        .iter()
        .map(|v| {
            v.to_string().map(|s| s.to_string()).map_err(|_| {
                RuntimeError::format(path, format!("GGUF metadata `{key}` holds a non-string"))
            })
        })
        .collect()
}

impl TextTokenizer {
    /// Builds the tokenizer stored in a GGUF file's metadata (GPT-2 style byte-level BPE).
    ///
    /// The "smollm" pre-tokenizer splits digits one by one before the GPT-2 byte-level split,
    /// exactly as the model's Hugging Face `tokenizer.json` does; no BOS token is added.
    pub fn from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<Self> {
        let model = ct
            .metadata
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if model != "gpt2" {
            return Err(RuntimeError::format(
                path,
                format!("tokenizer model `{model}` is not supported (only byte-level BPE `gpt2`)"),
            ));
        }
        let pre = ct
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "gpt2".into());
        let tokens = string_array(ct, "tokenizer.ggml.tokens", path)?;
        let merges: Vec<(String, String)> = string_array(ct, "tokenizer.ggml.merges", path)?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| RuntimeError::format(path, format!("bad BPE merge `{m}`")))
            })
            .collect::<Result<_>>()?;
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tok_err)?;
        let mut inner = Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        match pre.as_str() {
            "smollm" | "starcoder" | "refact" | "codeshell" => {
                inner.with_pre_tokenizer(Some(Sequence::new(vec![
                    Digits::new(true).into(),
                    byte_level.into(),
                ])));
            }
            "gpt2" | "default" => {
                inner.with_pre_tokenizer(Some(byte_level));
            }
            other => {
                return Err(RuntimeError::format(
                    path,
                    format!("pre-tokenizer `{other}` is not supported (smollm, gpt2)"),
                ))
            }
        }
        inner.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
        // Control tokens (type 3) such as <|im_start|> are matched whole, as in the HF tokenizer.
        if let Some(types) = ct
            .metadata
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
        {
            let specials: Vec<AddedToken> = types
                .iter()
                .enumerate()
                .filter(|(_, t)| t.to_i32().map(|t| t == 3).unwrap_or(false))
                .filter_map(|(i, _)| tokens.get(i))
                .map(|t| AddedToken::from(t.clone(), true))
                .collect();
            inner.add_special_tokens(specials).map_err(tok_err)?;
        }
        Ok(TextTokenizer { inner })
    }

    /// Reads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(RuntimeError::io(
                "reading",
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            ));
        }
        let inner = Tokenizer::from_file(path)
            .map_err(|e| RuntimeError::format(path, format!("not a tokenizer.json: {e}")))?;
        Ok(TextTokenizer { inner })
    }

    /// The tokenizer as a Hugging Face `tokenizer.json` string.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(tok_err)
    }

    /// Token ids of `text` (no BOS/EOS added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// Number of tokens in the vocabulary, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

impl TextTokenizer {
    /// Parses a Hugging Face `tokenizer.json` string.
    pub fn from_json(json: &str) -> Result<Self> {
        let inner: Tokenizer = json.parse().map_err(tok_err)?;
        Ok(TextTokenizer { inner })
    }
}
