//! Mixture-of-experts models: the tiny random `Qwen3MoeForCausalLM` and
//! `MixtralForCausalLM` of `scripts/interop/make_tiny_llms.py` against what
//! `transformers` computed for them: logits, routing statistics, HEAPr's
//! importances (from its own backward) and the logits with two experts
//! removed.

mod common;

use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use prunec_runtime::llm;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn tiny() -> PathBuf {
    dir("tiny-qwen3-moe")
}

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/models")
        .join(name)
}

/// Both checkpoints and their sparse blocks.
const MODELS: [(&str, &[usize]); 2] = [("tiny-qwen3-moe", &[0, 2]), ("tiny-mixtral", &[0, 1])];

fn reference_of(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn reference() -> HashMap<String, Tensor> {
    reference_of(&tiny())
}

fn ids_of(dir: &Path) -> Tensor {
    reference_of(dir)["ids"].to_dtype(DType::U32).unwrap()
}

fn ids() -> Tensor {
    ids_of(&tiny())
}

fn windows_of(dir: &Path) -> Vec<Vec<u32>> {
    ids_of(dir).to_vec2::<u32>().unwrap()
}

fn windows() -> Vec<Vec<u32>> {
    windows_of(&tiny())
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The largest difference relative to the largest reference value.
fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .fold(0.0f64, |m, (g, w)| m.max((g - w).abs()))
        / scale
}

#[test]
fn moe_models_match_transformers_logits_on_both_forwards() {
    let model = llm::load_hf(&tiny()).unwrap();
    let c = model.config.moe.as_ref().unwrap();
    assert_eq!(
        (c.num_experts, c.top_k, c.moe_intermediate_size),
        (8, 2, 16)
    );
    assert_eq!(c.sparse, vec![true, false, true]);
    let want = &reference()["logits"];
    let slices = model.forward(&ids()).unwrap();
    let candle = model.forward_candle(&ids()).unwrap();
    assert!(
        max_abs_diff(&slices, want) < 1e-4,
        "{}",
        max_abs_diff(&slices, want)
    );
    assert!(
        max_abs_diff(&candle, want) < 1e-4,
        "{}",
        max_abs_diff(&candle, want)
    );
    // The dense block keeps its MLP among the linears; sparse blocks list
    // their attention only.
    let names = model.linear_names();
    assert_eq!(names.len(), 4 + 7 + 4);
    assert!(names.contains(&"model.layers.1.mlp.down_proj.weight".to_string()));
    assert!(!names.contains(&"model.layers.0.mlp.down_proj.weight".to_string()));
    // Mixtral: every block sparse, its own names, a sliding window shorter
    // than the sequence.
    let mixtral = llm::load_hf(&dir("tiny-mixtral")).unwrap();
    assert_eq!(mixtral.config.sliding_window, Some(12));
    let want = &reference_of(&dir("tiny-mixtral"))["logits"];
    let ids = ids_of(&dir("tiny-mixtral"));
    for got in [
        mixtral.forward(&ids).unwrap(),
        mixtral.forward_candle(&ids).unwrap(),
    ] {
        assert!(
            max_abs_diff(&got, want) < 1e-4,
            "{}",
            max_abs_diff(&got, want)
        );
    }
    assert!(mixtral
        .named_tensors()
        .unwrap()
        .iter()
        .any(|(n, _)| n == "model.layers.1.block_sparse_moe.experts.7.w2.weight"));
}

#[test]
fn expert_statistics_and_heapr_match_the_reference() {
    for (name, sparse) in MODELS {
        statistics_match(&dir(name), sparse);
    }
}

fn statistics_match(dir: &Path, sparse: &[usize]) {
    let model = llm::load_hf(dir).unwrap();
    let r = reference_of(dir);
    // One chunk and two chunks of windows give the same statistics.
    for batch in [2, 1] {
        let stats = llm::moe_statistics(&model, &windows_of(dir), batch, true).unwrap();
        assert_eq!(stats.iter().filter(|s| s.is_some()).count(), sparse.len());
        for &l in sparse {
            let s = stats[l].as_ref().unwrap();
            assert_eq!(
                s.frequency,
                f64s(&r[&format!("{l}.frequency")]),
                "block {l}"
            );
            let reap = rel_err(&s.reap, &f64s(&r[&format!("{l}.reap")]));
            assert!(reap < 1e-4, "block {l} REAP off by {reap}");
            let heapr: Vec<f64> = s.heapr.iter().flatten().copied().collect();
            let err = rel_err(&heapr, &f64s(&r[&format!("{l}.heapr")]));
            assert!(err < 1e-3, "block {l} HEAPr off by {err} (batch {batch})");
            let whole = rel_err(&s.heapr_expert, &f64s(&r[&format!("{l}.heapr_expert")]));
            assert!(whole < 1e-3, "block {l} whole-expert HEAPr off by {whole}");
        }
    }
    // Without gradients the routing statistics are the same and HEAPr is absent.
    let plain = llm::moe_statistics(&model, &windows_of(dir), 2, false).unwrap();
    let s = plain[0].as_ref().unwrap();
    assert_eq!(s.frequency, f64s(&r["0.frequency"]));
    assert!(s.heapr.is_empty());
}

#[test]
fn removing_experts_matches_transformers_with_them_dropped() {
    let mut model = llm::load_hf(&tiny()).unwrap();
    let keep: Vec<usize> = (0..8).filter(|e| ![1, 6].contains(e)).collect();
    llm::remove_experts(&mut model, &[Some(keep.clone()), None, Some(keep)]).unwrap();
    assert_eq!(model.config.moe.as_ref().unwrap().num_experts, 6);
    let want = &reference()["pruned_logits"];
    let got = model.forward(&ids()).unwrap();
    assert!(
        max_abs_diff(&got, want) < 1e-4,
        "{}",
        max_abs_diff(&got, want)
    );
    // Fewer than top-k experts, or unequal counts, are refused.
    let mut m = llm::load_hf(&tiny()).unwrap();
    assert!(llm::remove_experts(&mut m, &[Some(vec![3]), None, Some(vec![3])]).is_err());
    assert!(llm::remove_experts(&mut m, &[Some(vec![0, 1, 2]), None, Some(vec![0, 1])]).is_err());
}

#[test]
fn removing_atomic_experts_equals_zeroing_them_and_exports_padded() {
    let dense = llm::load_hf(&tiny()).unwrap();
    // Uneven widths: expert e keeps its first 16 - e atomic experts but one.
    let keep: Vec<Vec<usize>> = (0..8)
        .map(|e| (0..16).filter(|&i| i != 3 && i < 16 - e).collect())
        .collect();
    let mut cut = dense.clone();
    llm::remove_atomic_experts(&mut cut, &[Some(keep.clone()), None, Some(keep.clone())]).unwrap();
    assert_eq!(cut.config.moe.as_ref().unwrap().moe_intermediate_size, 15);
    // The same function with the removed atomic experts' rows zeroed, in a
    // checkpoint transformers would load (one width): the export pads.
    let dir = tempfile::tempdir().unwrap();
    llm::save_hf(&cut, dir.path()).unwrap();
    let back = llm::load_hf(dir.path()).unwrap();
    let got = cut.forward(&ids()).unwrap();
    let reloaded = back.forward(&ids()).unwrap();
    assert_eq!(max_abs_diff(&got, &reloaded), 0.0);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    // Padded to 16 (f32 rows of a multiple of 16 bytes, for transformers'
    // grouped products).
    assert_eq!(config["moe_intermediate_size"], 16);
    assert_eq!(config["num_local_experts"], 8);
    let named = back.named_tensors().unwrap();
    let gate = &named
        .iter()
        .find(|(n, _)| n == "model.layers.2.mlp.experts.7.gate_proj.weight")
        .unwrap()
        .1;
    assert_eq!(gate.dims(), &[16, 32]);
    // Zeroing instead of cutting: the same logits up to rounding.
    let mut zeroed = dense.clone();
    for (n, t) in dense.named_tensors().unwrap() {
        let Some(rest) = n.strip_prefix("model.layers.") else {
            continue;
        };
        let parts: Vec<&str> = rest.split('.').collect();
        if parts.len() < 6 || parts[2] != "experts" || parts[0] == "1" {
            continue;
        }
        let e: usize = parts[3].parse().unwrap();
        let dim = usize::from(parts[4] == "down_proj");
        let mut mask = vec![1.0f32; 16];
        for (i, m) in mask.iter_mut().enumerate() {
            if !keep[e].contains(&i) {
                *m = 0.0;
            }
        }
        let shape: Vec<usize> = if dim == 0 { vec![16, 1] } else { vec![1, 16] };
        let m = Tensor::from_vec(mask, shape, &Device::Cpu).unwrap();
        let l: usize = parts[0].parse().unwrap();
        let x = &mut zeroed.moe_block_mut(l).unwrap().experts[e];
        let slot = match parts[4] {
            "gate_proj" => &mut x.gate,
            "up_proj" => &mut x.up,
            _ => &mut x.down,
        };
        *slot = t.broadcast_mul(&m).unwrap();
    }
    let z = zeroed.forward(&ids()).unwrap();
    assert!(max_abs_diff(&got, &z) < 1e-5, "{}", max_abs_diff(&got, &z));
}

#[test]
fn the_moe_forward_does_not_depend_on_the_thread_count() {
    let model = llm::load_hf(&tiny()).unwrap();
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                let logits = model.forward(&ids()).unwrap();
                let stats = llm::moe_statistics(&model, &windows(), 1, true).unwrap();
                (
                    logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    stats[2].as_ref().unwrap().heapr.clone(),
                )
            })
    };
    assert_eq!(run(1), run(3));
}

/// A mixture-of-experts model written without a source folder (its
/// configuration made from prunec's own) reads back with the same logits.
#[test]
fn a_moe_model_without_its_source_config_exports_its_routing() {
    for (name, _) in MODELS {
        let mut model = llm::load_hf(&dir(name)).unwrap();
        model.hf_source = None;
        let out = tempfile::tempdir().unwrap();
        llm::save_hf(&model, out.path()).unwrap();
        let back = llm::load_hf(out.path()).unwrap();
        assert_eq!(back.config.moe, model.config.moe, "{name}");
        let ids = ids_of(&dir(name));
        let diff = max_abs_diff(&model.forward(&ids).unwrap(), &back.forward(&ids).unwrap());
        assert_eq!(diff, 0.0, "{name}");
    }
}
