//! SmolLM2-135M from GGUF: dequantization, tokenizer, forward against candle's quantized kernels, perplexity.

use prunec_runtime::llm::{self, data, gguf};
use std::sync::OnceLock;

fn smollm2() -> &'static llm::LlamaModel {
    static MODEL: OnceLock<llm::LlamaModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = data::smollm2_gguf().unwrap_or_else(|e| panic!("{e}"));
        llm::load_gguf(&path).unwrap_or_else(|e| panic!("{e}"))
    })
}

#[test]
fn config_matches_the_published_smollm2_shape() {
    let c = &smollm2().config;
    assert_eq!(
        (
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads
        ),
        (30, 576, 9, 3)
    );
    assert_eq!((c.intermediate_size, c.vocab_size), (1536, 49152));
    assert_eq!(c.rope_theta, 100_000.0);
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-12);
    assert!(c.tie_word_embeddings);
}

#[test]
fn tokenizer_round_trips_and_splits_digits() {
    let tok = smollm2().tokenizer.as_ref().unwrap();
    let text = "Call me Ishmael. In 1851, some years ago — never mind how long precisely…\n\n  ok";
    let ids = tok.encode(text).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), text);
    let digits = tok.encode("1851").unwrap();
    assert_eq!(digits.len(), 4, "digits are split one by one: {digits:?}");
    assert_eq!(tok.decode(&digits[..1]).unwrap(), "1");
    let paris = tok.encode(" Paris").unwrap();
    assert_eq!(paris.len(), 1, "' Paris' is one token: {paris:?}");
    // No BOS is added, and control tokens are matched whole.
    let chat = tok.encode("<|im_start|>user").unwrap();
    assert_eq!(chat[0], tok.token_id("<|im_start|>").unwrap());
}

#[test]
fn greedy_continuation_names_paris() {
    let m = smollm2();
    let tok = m.tokenizer.as_ref().unwrap();
    let prompt = tok.encode("The capital of France is").unwrap();
    let out = m.greedy_continue(&prompt, 2).unwrap();
    assert_eq!(tok.decode(&out).unwrap(), " Paris.");
}

/// Dequantizes the first Q4_1 block of a tensor by the format's definition (w = d*q + m; byte i
/// holds weights i (low nibble) and i+16 (high nibble)) and compares with the loaded weights.
#[test]
fn q4_1_dequantization_follows_the_format() {
    let path = data::smollm2_gguf().unwrap_or_else(|e| panic!("{e}"));
    let mut g = gguf::GgufFile::open(&path).unwrap();
    let info = &g.content().tensor_infos["blk.0.ffn_up.weight"];
    assert_eq!(
        info.ggml_dtype,
        candle_core::quantized::GgmlDType::Q4_1,
        "blk.0.ffn_up.weight is Q4_1"
    );
    let raw = g.raw_bytes("blk.0.ffn_up.weight", 20).unwrap();
    let d = half::f16::from_le_bytes([raw[0], raw[1]]).to_f32();
    let m = half::f16::from_le_bytes([raw[2], raw[3]]).to_f32();
    let mut expected = [0f32; 32];
    for i in 0..16 {
        expected[i] = d * (raw[4 + i] & 0xF) as f32 + m;
        expected[i + 16] = d * (raw[4 + i] >> 4) as f32 + m;
    }
    let up = smollm2().linear_weight(0, llm::Proj::Up).unwrap();
    let first: Vec<f32> = up
        .get(0)
        .unwrap()
        .narrow(0, 0, 32)
        .unwrap()
        .to_vec1()
        .unwrap();
    for (a, b) in first.iter().zip(expected) {
        assert!(
            (a - b).abs() <= 1e-6 * b.abs().max(1.0),
            "{first:?} vs {expected:?}"
        );
    }
}

/// The f32 forward (dequantized weights, q/k rows un-permuted, half-split RoPE) agrees at the
/// last position with candle's quantized kernels run on the stored weights (q4_1 x q8 matmuls,
/// llama.cpp row order, adjacent-pair RoPE). The quantized path rounds activations to 8 bits,
/// so agreement is close, not exact.
#[test]
fn forward_matches_candle_quantized_kernels_at_the_last_position() {
    let path = data::smollm2_gguf().unwrap_or_else(|e| panic!("{e}"));
    let reference = llm::load_gguf_quantized_reference(&path).unwrap();
    let m = smollm2();
    let tok = m.tokenizer.as_ref().unwrap();
    let ids = tok
        .encode("It was the best of times, it was the worst of times, it was the age of")
        .unwrap();
    let ours = m.last_logits(&ids).unwrap();
    let theirs = reference.last_logits(&ids).unwrap();
    let argmax = llm::model::argmax;
    assert_eq!(argmax(&ours), argmax(&theirs));
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    let mut max_diff = 0f32;
    for (a, b) in ours.iter().zip(&theirs) {
        dot += (*a as f64) * (*b as f64);
        na += (*a as f64).powi(2);
        nb += (*b as f64).powi(2);
        max_diff = max_diff.max((a - b).abs());
    }
    let cosine = dot / (na.sqrt() * nb.sqrt());
    eprintln!("cosine {cosine} max_diff {max_diff}");
    assert!(cosine > 0.99, "cosine {cosine}, max |diff| {max_diff}");
    assert!(max_diff < 1.5, "max |diff| {max_diff}");
    // The two next-token distributions agree closely too.
    let lp = |v: &[f32]| -> Vec<f64> {
        let mx = v.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let lse = v.iter().map(|x| (*x as f64 - mx).exp()).sum::<f64>().ln() + mx;
        v.iter().map(|x| *x as f64 - lse).collect()
    };
    let kl: f64 = lp(&theirs)
        .iter()
        .zip(lp(&ours))
        .map(|(p, q)| p.exp() * (p - q))
        .sum();
    assert!(kl < 0.05, "KL(reference || ours) = {kl}");
}

#[test]
fn dense_perplexity_on_moby_dick_is_in_the_reference_range() {
    let m = smollm2();
    let tok = m.tokenizer.as_ref().unwrap();
    let text = data::read_text(&data::moby_dick().unwrap_or_else(|e| panic!("{e}"))).unwrap();
    let tokens = llm::leading_tokens(tok, &text, 1024).unwrap();
    assert_eq!(tokens.len(), 1024);
    let ppl = llm::perplexity(m, &tokens, 256, 4).unwrap();
    // The reference (16,384 tokens) is 49.1; the opening 1,024 tokens alone must be close.
    eprintln!("dense perplexity {ppl}");
    assert!((25.0..80.0).contains(&ppl), "dense perplexity {ppl}");
    // Batching does not change the result beyond float noise.
    let ppl1 = llm::perplexity(m, &tokens[..512], 256, 1).unwrap();
    let ppl4 = llm::perplexity(m, &tokens[..512], 256, 2).unwrap();
    assert!((ppl1 - ppl4).abs() < 1e-3 * ppl1, "{ppl1} vs {ppl4}");
}

#[test]
fn missing_model_file_names_the_file_and_the_fetch_script() {
    let err = llm::load_gguf(std::path::Path::new("/nonexistent/model.gguf")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/model.gguf"), "{err}");
    let err = data::require_data_file("smollm2/absent.gguf", "smollm2").unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("absent.gguf") && msg.contains("scripts/fetch-data.sh"),
        "{msg}"
    );
}

/// The slice forward (packed weights, fused products, in-place RoPE,
/// attention on strided views) computes what the candle-op forward computes:
/// the logits of two windows agree to float rounding, and so do the
/// next-token losses perplexity is made of.
#[test]
fn slice_forward_matches_the_candle_op_forward() {
    let mut m = smollm2().clone();
    m.truncate_layers(4);
    let tok = m.tokenizer.as_ref().unwrap();
    let text = llm::data::read_text(&data::moby_dick().unwrap()).unwrap();
    let ids = llm::leading_tokens(tok, &text, 96).unwrap();
    let t =
        candle_core::Tensor::from_slice(&ids[..96], (2, 48), &candle_core::Device::Cpu).unwrap();
    let fast: Vec<f32> = m
        .forward(&t)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let slow: Vec<f32> = m
        .forward_candle(&t)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(fast.len(), slow.len());
    let scale = slow.iter().fold(0f32, |a, v| a.max(v.abs()));
    let worst = fast
        .iter()
        .zip(&slow)
        .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    assert!(
        worst <= 1e-4 * scale,
        "logits differ by {worst} (largest logit {scale})"
    );
    let nll = m.next_token_nll(&ids[..96], 2, 48).unwrap();
    assert_eq!(nll.len(), 2 * 47);
    let vocab = m.config.vocab_size;
    for (i, got) in nll.iter().enumerate() {
        let (s, p) = (i / 47, i % 47);
        let row = &slow[(s * 48 + p) * vocab..(s * 48 + p + 1) * vocab];
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) as f64;
        let lse = max
            + row
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let want = lse - row[ids[s * 48 + p + 1] as usize] as f64;
        assert!((got - want).abs() < 1e-3, "position {i}: {got} vs {want}");
    }
}
