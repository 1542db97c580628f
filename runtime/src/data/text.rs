//! Plain-text corpora: reading them, and cutting a token stream into fixed-length windows
//! with disjoint train / held-out parts.

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{CandleContext, Result, RuntimeError};

/// Reads a UTF-8 text corpus; a missing file names `scripts/fetch-data.sh text`.
pub fn read_corpus(path: &Path) -> Result<String> {
    let path = crate::paths::require_file(path.to_path_buf(), "text")?;
    let bytes = std::fs::read(&path).map_err(|e| RuntimeError::io("cannot read", &path, e))?;
    String::from_utf8(bytes)
        .map_err(|e| RuntimeError::corrupt(&path, format!("not UTF-8 text: {e}")))
}

/// Fixed-length token windows, as `[windows, seq_len]` u32 tensors.
#[derive(Debug, Clone)]
pub struct TokenWindows {
    /// Windows cut from the first part of the stream.
    pub train: Tensor,
    /// Windows cut from the last part of the stream; no token is shared with `train`.
    pub heldout: Tensor,
}

/// Cuts `tokens` into non-overlapping windows of `seq_len` tokens. The stream is
/// first split at `floor(len * (1 - heldout_fraction))`: windows before the split
/// go to `train`, windows after it to `heldout`, so the two share no token.
/// Leftover tokens at the end of each part are dropped.
pub fn token_windows(
    tokens: &[u32],
    seq_len: usize,
    heldout_fraction: f64,
    device: &Device,
) -> Result<TokenWindows> {
    if seq_len == 0 {
        return Err(RuntimeError::InvalidConfig(
            "token window length must be > 0".into(),
        ));
    }
    if !(0.0..1.0).contains(&heldout_fraction) {
        return Err(RuntimeError::InvalidConfig(format!(
            "held-out fraction {heldout_fraction} must be in [0, 1)"
        )));
    }
    let split = ((tokens.len() as f64) * (1.0 - heldout_fraction)).floor() as usize;
    let (a, b) = tokens.split_at(split);
    let cut = |part: &[u32], what: &str| -> Result<Tensor> {
        let n = part.len() / seq_len;
        Tensor::from_slice(&part[..n * seq_len], (n, seq_len), device)
            .ctx(|| format!("building {what} token windows"))
    };
    Ok(TokenWindows {
        train: cut(a, "train")?,
        heldout: cut(b, "held-out")?,
    })
}

/// Which part of a tokenised corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TextPart {
    /// Windows from the first `1 - heldout_fraction` of the token stream.
    Train,
    /// Windows from the last `heldout_fraction` of the token stream.
    Heldout,
}

/// A plain-text corpus served as fixed-length token windows. The tokenizer is the
/// caller's (the LLM code owns it), passed to [`TextSpec::load`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TextSpec {
    /// The UTF-8 text file (e.g. `data/text/moby-dick.txt`).
    pub path: std::path::PathBuf,
    /// Tokens per window.
    pub seq_len: usize,
    /// Fraction of the token stream (its end) kept for held-out windows.
    pub heldout_fraction: f64,
    pub part: TextPart,
    /// Keep only the first `limit` windows.
    pub limit: Option<usize>,
}

impl TextSpec {
    /// Reads the corpus, tokenises it with `tokenize`, and returns the windows of
    /// `part` as a `[windows, seq_len]` u32 tensor.
    pub fn load(
        &self,
        tokenize: impl FnOnce(&str) -> Result<Vec<u32>>,
        device: &Device,
    ) -> Result<Tensor> {
        let text = read_corpus(&self.path)?;
        let tokens = tokenize(&text)?;
        let w = token_windows(&tokens, self.seq_len, self.heldout_fraction, device)?;
        let t = match self.part {
            TextPart::Train => w.train,
            TextPart::Heldout => w.heldout,
        };
        let n = t
            .dim(0)
            .ctx(|| format!("windows of {}", self.path.display()))?;
        if n == 0 {
            return Err(RuntimeError::InvalidConfig(format!(
                "{}: {} tokens give no {:?} window of {} tokens",
                self.path.display(),
                tokens.len(),
                self.part,
                self.seq_len
            )));
        }
        match self.limit {
            Some(l) if l < n => t
                .narrow(0, 0, l)
                .ctx(|| format!("windows of {}", self.path.display())),
            _ => Ok(t),
        }
    }
}

/// Whether `path` is read as JSON lines (its name ends in `.jsonl`).
pub fn is_jsonl(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == "jsonl")
}

/// The records' `field` strings of a `.jsonl` file; every line (blank lines
/// aside) must be a JSON object whose `field` is a string. Errors name the
/// file and the line.
pub fn jsonl_records(path: &Path, field: &str) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|e| RuntimeError::io("cannot read", path, e))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| RuntimeError::corrupt(path, format!("not UTF-8 text: {e}")))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |m: String| RuntimeError::corrupt(path, format!("line {}: {m}", i + 1));
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| at(format!("not a JSON value: {e}")))?;
        let serde_json::Value::Object(o) = v else {
            return Err(at("not a JSON object".into()));
        };
        match o.get(field) {
            Some(serde_json::Value::String(s)) => out.push(s.clone()),
            Some(other) => {
                let kind = match other {
                    serde_json::Value::Null => "null",
                    serde_json::Value::Bool(_) => "a boolean",
                    serde_json::Value::Number(_) => "a number",
                    serde_json::Value::Array(_) => "an array",
                    _ => "an object",
                };
                return Err(at(format!("`{field}` is {kind}, not a string")));
            }
            None => {
                let keys: Vec<&str> = o.keys().map(String::as_str).collect();
                return Err(at(format!(
                    "the record has no field `{field}` (it has: {})",
                    keys.join(", ")
                )));
            }
        }
    }
    if out.is_empty() {
        return Err(RuntimeError::corrupt(path, "no record"));
    }
    Ok(out)
}

/// One file of a `text` data set as a document: a `.jsonl` file's records
/// joined by a blank line, any other file as it is.
pub fn read_document(path: &Path, field: &str) -> Result<String> {
    if is_jsonl(path) {
        Ok(jsonl_records(path, field)?.join("\n\n"))
    } else {
        let bytes = std::fs::read(path).map_err(|e| RuntimeError::io("cannot read", path, e))?;
        String::from_utf8(bytes)
            .map_err(|e| RuntimeError::corrupt(path, format!("not UTF-8 text: {e}")))
    }
}
