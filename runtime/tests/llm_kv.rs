//! Evaluation with a bounded key-value cache on the tiny random models of
//! `scripts/interop/make_tiny_llms.py`: a budget of the whole window is the
//! plain forward, the recent window is `transformers`' sliding-window
//! Mistral, and the policies that read attention keep different tokens.

use candle_core::{DType, Device};
use prunec_runtime::llm::{self, KvBudget, KvPolicy, LlamaModel};
use std::path::{Path, PathBuf};

fn tiny(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/models")
        .join(name)
}

/// The reference's token ids, row-major, with their batch and length, and
/// its logits `(b t) x vocab`.
fn reference(dir: &Path) -> (Vec<u32>, usize, usize, Vec<f32>) {
    let r =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let ids = r["ids"].to_dtype(DType::U32).unwrap();
    let (b, t) = ids.dims2().unwrap();
    let logits = r["logits"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (ids.flatten_all().unwrap().to_vec1().unwrap(), b, t, logits)
}

/// `logsumexp(row) - row[next]` for every position but each sequence's last.
fn nll_of_logits(logits: &[f32], ids: &[u32], b: usize, t: usize, vocab: usize) -> Vec<f64> {
    let mut out = Vec::new();
    for r in 0..b * t {
        if r % t == t - 1 {
            continue;
        }
        let row = &logits[r * vocab..(r + 1) * vocab];
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) as f64;
        let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        out.push(max + sum.ln() - row[ids[r + 1] as usize] as f64);
    }
    out
}

fn budget(keys: usize, policy: KvPolicy) -> KvBudget {
    KvBudget { keys, policy }
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Deterministic token ids: `b` sequences of `t`.
fn ids(model: &LlamaModel, b: usize, t: usize) -> Vec<u32> {
    let vocab = model.config.vocab_size as u64;
    (0..b * t)
        .map(|i| ((i as u64 * 2654435761 + 7) % vocab) as u32)
        .collect()
}

#[test]
fn a_budget_of_the_whole_window_is_the_plain_forward() {
    for name in ["tiny-llama", "tiny-qwen2", "tiny-qwen3"] {
        let model = llm::load_hf(&tiny(name)).unwrap();
        let (b, t) = (3, 24);
        let ids = ids(&model, b, t);
        let plain = model.next_token_nll(&ids, b, t).unwrap();
        for policy in KvPolicy::ALL {
            let kv = model
                .next_token_nll_kv(&ids, b, t, budget(t, policy))
                .unwrap();
            assert_eq!(kv, plain, "{name} {policy:?}: no token is evicted");
        }
    }
}

#[test]
fn the_recent_window_is_transformers_sliding_window() {
    // tiny-mistral's reference logits come from `transformers` with an
    // 8-token sliding window: decoding with an 8-key recent cache, the
    // model's own window removed, gives the same losses.
    let dir = tiny("tiny-mistral");
    let mut model = llm::load_hf(&dir).unwrap();
    assert_eq!(model.config.sliding_window, Some(8));
    model.config.sliding_window = None;
    let (ids, b, t, logits) = reference(&dir);
    assert!(t > 8, "the reference is longer than the window");
    let want = nll_of_logits(&logits, &ids, b, t, model.config.vocab_size);
    let got = model
        .next_token_nll_kv(&ids, b, t, budget(8, KvPolicy::Recent))
        .unwrap();
    let diff = max_diff(&got, &want);
    assert!(diff < 1e-4, "recent window off transformers by {diff}");
    // Without the bound the losses differ: the window matters here.
    let full = model.next_token_nll(&ids, b, t).unwrap();
    assert!(max_diff(&full, &want) > 1e-3);
}

#[test]
fn the_recent_window_equals_a_sliding_window_forward() {
    let mut model = llm::load_hf(&tiny("tiny-llama")).unwrap();
    let (b, t) = (2, 40);
    let ids = ids(&model, b, t);
    for keys in [1, 5, 16] {
        let kv = model
            .next_token_nll_kv(&ids, b, t, budget(keys, KvPolicy::Recent))
            .unwrap();
        model.config.sliding_window = Some(keys);
        let windowed = model.next_token_nll(&ids, b, t).unwrap();
        model.config.sliding_window = None;
        let diff = max_diff(&kv, &windowed);
        assert!(diff < 1e-5, "{keys} keys: off by {diff}");
    }
}

#[test]
fn the_policies_keep_different_tokens_and_the_same_bits_at_any_thread_count() {
    let model = llm::load_hf(&tiny("tiny-llama")).unwrap();
    let (b, t) = (2, 48);
    let ids = ids(&model, b, t);
    let run = |threads: usize, policy: KvPolicy| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                model
                    .next_token_nll_kv(&ids, b, t, budget(12, policy))
                    .unwrap()
            })
    };
    let full = model.next_token_nll(&ids, b, t).unwrap();
    let mut seen: Vec<Vec<f64>> = Vec::new();
    for policy in KvPolicy::ALL {
        let one = run(1, policy);
        assert_eq!(one, run(3, policy), "{policy:?}");
        // The first 12 positions see every earlier key whatever the policy.
        assert_eq!(one[..11], full[..11], "{policy:?}");
        assert_ne!(one, full, "{policy:?} evicts");
        assert!(
            seen.iter().all(|s| *s != one),
            "{policy:?} chose as another policy did"
        );
        seen.push(one);
    }
}

#[test]
fn a_budget_of_no_key_is_refused() {
    let model = llm::load_hf(&tiny("tiny-llama")).unwrap();
    let ids = ids(&model, 1, 8);
    let err = model
        .next_token_nll_kv(&ids, 1, 8, budget(0, KvPolicy::H2o))
        .unwrap_err();
    assert!(err.to_string().contains("at least one key"), "{err}");
    // Perplexity over windows goes through the same decode.
    let p = llm::perplexity_kv(&model, &ids, 4, 2, budget(2, KvPolicy::Recent)).unwrap();
    let mut windowed = model.clone();
    windowed.config.sliding_window = Some(2);
    let q = llm::perplexity(&windowed, &ids, 4, 2).unwrap();
    assert!((p - q).abs() < 1e-9 * q, "{p} vs {q}");
}
