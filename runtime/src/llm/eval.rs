//! Perplexity over fixed windows of held-out text, and seeded calibration windows.

use super::error::{Result, RuntimeError};
use super::model::LlamaModel;
use super::tokenizer::TextTokenizer;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

/// Tokens of the first part of `text`: at least `max_tokens` of them when the text is long enough.
pub fn leading_tokens(
    tokenizer: &TextTokenizer,
    text: &str,
    max_tokens: usize,
) -> Result<Vec<u32>> {
    // Tokenize a prefix generously larger than needed (English averages ~4.5 bytes a token),
    // cut at a line break so no word is split; fall back to the whole text.
    let mut budget = max_tokens.saturating_mul(8).max(1024);
    loop {
        let prefix = if budget >= text.len() {
            text
        } else {
            let cut = text[..budget].rfind('\n').unwrap_or(0);
            let cut = if cut == 0 {
                text.floor_char_boundary(budget)
            } else {
                cut
            };
            &text[..cut]
        };
        let mut ids = tokenizer.encode(prefix)?;
        if ids.len() >= max_tokens || prefix.len() == text.len() {
            ids.truncate(max_tokens);
            return Ok(ids);
        }
        budget *= 2;
    }
}

/// Perplexity of the model on `tokens` cut into non-overlapping windows of `window` tokens.
///
/// Each window is an independent sequence starting at position 0; every position but the last
/// predicts its successor, and the perplexity is `exp(mean negative log-likelihood)` over all
/// predictions. `batch` windows run per forward. The trailing partial window is dropped.
pub fn perplexity(model: &LlamaModel, tokens: &[u32], window: usize, batch: usize) -> Result<f64> {
    over_windows(tokens, window, batch, |chunk, b| {
        model.next_token_nll(chunk, b, window)
    })
}

/// `exp(mean nll)` over `tokens` cut into windows of `window` tokens, `nll`
/// giving the next-token losses of `b` consecutive windows at a time.
pub(crate) fn over_windows(
    tokens: &[u32],
    window: usize,
    batch: usize,
    mut nll: impl FnMut(&[u32], usize) -> Result<Vec<f64>>,
) -> Result<f64> {
    if window < 2 {
        return Err(RuntimeError::Invalid(format!(
            "perplexity window {window} must be at least 2"
        )));
    }
    let windows = tokens.len() / window;
    if windows == 0 {
        return Err(RuntimeError::Invalid(format!(
            "{} evaluation tokens are fewer than one window of {window}",
            tokens.len()
        )));
    }
    let batch = batch.max(1);
    let mut total = 0.0f64;
    let mut count = 0usize;
    for start in (0..windows).step_by(batch) {
        let b = batch.min(windows - start);
        let chunk = &tokens[start * window..(start + b) * window];
        let nll = nll(chunk, b)?;
        // One sum in window order, whatever the batch: the same bits for every `batch`.
        for x in &nll {
            total += x;
        }
        count += nll.len();
    }
    Ok((total / count as f64).exp())
}

/// `count` calibration windows of `window` tokens drawn from `files` with a seeded RNG.
///
/// Each draw picks a file uniformly, tokenizes it, and takes a window at a uniform offset
/// (files shorter than a window are redrawn), as in the Wanda / SparseGPT calibration loaders.
pub fn calibration_windows(
    tokenizer: &TextTokenizer,
    files: &[PathBuf],
    count: usize,
    window: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    calibration_windows_after(tokenizer, files, count, window, 0, seed)
}

/// [`calibration_windows`] drawn from each file's tokens after its first `offset`
/// (`text(offset = N)`, for calibration text disjoint from an evaluation split).
pub fn calibration_windows_after(
    tokenizer: &TextTokenizer,
    files: &[PathBuf],
    count: usize,
    window: usize,
    offset: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    if files.is_empty() {
        return Err(RuntimeError::Invalid("no calibration files".into()));
    }
    draw_windows(
        tokenizer,
        files.len(),
        |f| super::data::read_text(&files[f]),
        count,
        window,
        offset,
        seed,
    )
}

/// [`calibration_windows_after`] drawn from documents already in memory
/// (the records of a `.jsonl` file), with the same draws.
pub fn calibration_windows_in(
    tokenizer: &TextTokenizer,
    documents: &[String],
    count: usize,
    window: usize,
    offset: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    if documents.is_empty() {
        return Err(RuntimeError::Invalid("no calibration text".into()));
    }
    draw_windows(
        tokenizer,
        documents.len(),
        |d| Ok(documents[d].clone()),
        count,
        window,
        offset,
        seed,
    )
}

fn draw_windows(
    tokenizer: &TextTokenizer,
    documents: usize,
    mut read: impl FnMut(usize) -> Result<String>,
    count: usize,
    window: usize,
    offset: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut cache: std::collections::HashMap<usize, Vec<u32>> = Default::default();
    let mut out = Vec::with_capacity(count);
    let mut attempts = 0usize;
    while out.len() < count {
        attempts += 1;
        if attempts > 100 * count + 1000 {
            return Err(RuntimeError::Invalid(format!(
                "calibration files are too short for {count} windows of {window} tokens"
            )));
        }
        let f = rng.random_range(0..documents);
        let ids = match cache.entry(f) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let text = read(f)?;
                let ids = tokenizer.encode(&text)?;
                e.insert(ids.get(offset..).unwrap_or_default().to_vec())
            }
        };
        if ids.len() <= window {
            continue;
        }
        let start = rng.random_range(0..ids.len() - window);
        out.push(ids[start..start + window].to_vec());
    }
    Ok(out)
}

/// Wall time of the forward pass (with the next-token losses) over the
/// first batch of `window`-token windows of `tokens`: the median of `runs`
/// timed passes after `warmup` untimed ones, in seconds, with the number of
/// windows in the batch. A timing of the machine at hand, never locked.
pub fn forward_latency(
    model: &LlamaModel,
    tokens: &[u32],
    window: usize,
    batch: usize,
    warmup: usize,
    runs: usize,
) -> Result<(f64, usize)> {
    let windows = tokens.len() / window.max(1);
    if window < 2 || windows == 0 {
        return Err(RuntimeError::Invalid(format!(
            "{} tokens hold no window of {window} to time",
            tokens.len()
        )));
    }
    let b = batch.max(1).min(windows);
    let chunk = &tokens[..b * window];
    let median = crate::eval::median_seconds(warmup, runs, || {
        std::hint::black_box(model.next_token_nll(chunk, b, window)?);
        Ok::<(), RuntimeError>(())
    })?;
    Ok((median, b))
}
