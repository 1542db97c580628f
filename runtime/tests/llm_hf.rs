//! Hugging Face checkpoints: the tiny random Llama, Mistral, Qwen2 and Qwen3
//! models of `scripts/interop/make_tiny_llms.py` against the logits
//! `transformers` computed for them, and the folder's round trip and errors.

mod common;

use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use prunec_runtime::llm::{self, Proj};
use std::path::{Path, PathBuf};

fn tiny(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/models")
        .join(name)
}

const ARCHS: [&str; 4] = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3"];

/// The reference's token ids (as u32) and logits.
fn reference(dir: &Path) -> (Tensor, Tensor) {
    let r =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    (r["ids"].to_dtype(DType::U32).unwrap(), r["logits"].clone())
}

/// The largest absolute difference between prunec's logits (slice forward
/// and candle forward) and the reference.
fn max_errors(dir: &Path) -> (f32, f32) {
    let model = llm::load_hf(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let (ids, want) = reference(dir);
    (
        max_abs_diff(&model.forward(&ids).unwrap(), &want),
        max_abs_diff(&model.forward_candle(&ids).unwrap(), &want),
    )
}

#[test]
fn four_architectures_match_transformers_logits() {
    for name in ARCHS {
        let (slices, candle) = max_errors(&tiny(name));
        assert!(slices <= 1e-4, "{name}: slice forward off by {slices}");
        assert!(candle <= 1e-4, "{name}: candle forward off by {candle}");
    }
}

#[test]
fn the_sliding_window_is_what_makes_mistral_match() {
    // With the window widened to the whole sequence the logits differ: the
    // reference really exercises Mistral's window.
    let dir = tiny("tiny-mistral");
    let mut model = llm::load_hf(&dir).unwrap();
    assert_eq!(model.config.sliding_window, Some(8));
    model.config.sliding_window = None;
    let (ids, want) = reference(&dir);
    let diff = max_abs_diff(&model.forward(&ids).unwrap(), &want);
    assert!(diff > 1e-2, "window made no difference ({diff})");
}

#[test]
fn bf16_sharded_checkpoint_keeps_its_dtype_and_shards_on_export() {
    let src = tiny("tiny-qwen3");
    let mut model = llm::load_hf(&src).unwrap();
    assert_eq!(
        model.stored_linear(0, Proj::Up).unwrap().dtype(),
        DType::BF16
    );
    // Prune one layer: the survivors are bf16 values, the zeros stay exact.
    let w = model.linear_weight(1, Proj::Up).unwrap();
    let mask = Tensor::arange(0u32, w.elem_count() as u32, &Device::Cpu)
        .unwrap()
        .reshape(w.dims())
        .unwrap()
        .broadcast_lt(&Tensor::new(&[100u32], &Device::Cpu).unwrap())
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    model
        .set_linear_weight(1, Proj::Up, (w * (1.0 - mask).unwrap()).unwrap())
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    llm::save_hf(&model, out.path()).unwrap();
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".safetensors") && n.starts_with("model"))
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&src), names(out.path()));
    assert_eq!(
        std::fs::read(src.join("tokenizer.json")).unwrap(),
        std::fs::read(out.path().join("tokenizer.json")).unwrap()
    );
    let header = llm::inspect_hf(out.path()).unwrap();
    assert!(header.tensors.values().all(|t| t.dtype == "BF16"));
    let back = llm::load_hf(out.path()).unwrap();
    for (a, b) in model
        .named_tensors()
        .unwrap()
        .iter()
        .zip(back.named_tensors().unwrap())
    {
        assert_eq!(a.0, b.0);
        let (x, y) = (
            a.1.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            b.1.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
        assert_eq!(x, y, "{}", a.0);
    }
    let up = back
        .linear_weight(1, Proj::Up)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(up.iter().filter(|v| **v == 0.0).count(), 100);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn truncated_or_missing_shards_and_foreign_architectures_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    copy_dir(&tiny("tiny-qwen3"), &dir);
    let shard = dir.join("model-00002-of-00004.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 10]).unwrap();
    let e = llm::inspect_hf(&dir).unwrap_err().to_string();
    assert!(e.contains("truncated") && e.contains("model-00002"), "{e}");
    std::fs::remove_file(&shard).unwrap();
    let e = llm::inspect_hf(&dir).unwrap_err().to_string();
    assert!(
        e.contains("missing file") && e.contains("model-00002"),
        "{e}"
    );

    let dir = tmp.path().join("g");
    copy_dir(&tiny("tiny-llama"), &dir);
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        config.replace("LlamaForCausalLM", "GPT2LMHeadModel"),
    )
    .unwrap();
    let e = llm::inspect_hf(&dir).unwrap_err().to_string();
    assert!(e.contains("`GPT2LMHeadModel` is not supported"), "{e}");
    std::fs::write(
        dir.join("config.json"),
        config.replace("\"hidden_size\": 32", "\"hidden_size\": 48"),
    )
    .unwrap();
    let e = llm::inspect_hf(&dir).unwrap_err().to_string();
    assert!(e.contains("expected shape [128, 48]"), "{e}");
}

#[test]
fn f16_checkpoints_run_as_their_values_widened_to_f32() {
    // tiny-llama stored in f16, and the same f16 values stored in f32: the
    // forward widens f16 exactly, so the logits are the same bits.
    let src = tiny("tiny-llama");
    let tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let write = |dir: &Path, dtype: DType| {
        std::fs::create_dir_all(dir).unwrap();
        let cast: std::collections::HashMap<String, Tensor> = tensors
            .iter()
            .map(|(n, t)| {
                let t = t.to_dtype(DType::F16).unwrap().to_dtype(dtype).unwrap();
                (n.clone(), t)
            })
            .collect();
        candle_core::safetensors::save(&cast, dir.join("model.safetensors")).unwrap();
        for f in ["config.json", "tokenizer.json"] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
    };
    let (half, wide) = (tmp.path().join("f16"), tmp.path().join("f32"));
    write(&half, DType::F16);
    write(&wide, DType::F32);
    let a = llm::load_hf(&half).unwrap();
    let b = llm::load_hf(&wide).unwrap();
    assert_eq!(a.stored_linear(0, Proj::Q).unwrap().dtype(), DType::F16);
    let (ids, _) = reference(&src);
    assert_eq!(
        max_abs_diff(&a.forward(&ids).unwrap(), &b.forward(&ids).unwrap()),
        0.0
    );
    let out = tmp.path().join("out");
    llm::save_hf(&a, &out).unwrap();
    let header = llm::inspect_hf(&out).unwrap();
    assert!(header.tensors.values().all(|t| t.dtype == "F16"));
}
