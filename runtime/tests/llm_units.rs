//! Removing units from language models: for every architecture, FFN
//! neurons, kv groups and query heads cut out give the logits of the same
//! model with those units' weights zeroed in place, and the smaller model
//! exports with a configuration that describes it and reads back the same.

mod common;

use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use prunec_runtime::llm::{self, LlmUnit, Proj};
use std::path::{Path, PathBuf};

fn tiny(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/models")
        .join(name)
}

const ARCHS: [&str; 4] = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3"];

fn ids(dir: &Path) -> Tensor {
    let r =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    r["ids"].to_dtype(DType::U32).unwrap()
}

/// Zeroes rows (`dim` 0) or columns (`dim` 1) `[from, to)` of a projection.
fn zero(m: &mut llm::LlamaModel, l: usize, p: Proj, dim: usize, from: usize, to: usize) {
    let w = m.linear_weight(l, p).unwrap();
    let (rows, cols) = w.dims2().unwrap();
    let mut v: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    for r in 0..rows {
        for c in 0..cols {
            let hit = if dim == 0 { r } else { c };
            if hit >= from && hit < to {
                v[r * cols + c] = 0.0;
            }
        }
    }
    let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap();
    m.set_linear_weight(l, p, t).unwrap();
}

/// Units kept in block `l`: all but one, a different one per block.
fn keep(l: usize, count: usize) -> Vec<usize> {
    (0..count).filter(|&u| u != (l * 5 + 1) % count).collect()
}

#[test]
fn removed_units_give_the_logits_of_the_zeroed_model() {
    for name in ARCHS {
        let dir = tiny(name);
        let dense = llm::load_hf(&dir).unwrap();
        let x = ids(&dir);
        let c = dense.config.clone();
        let (hd, group) = (c.head_dim(), c.num_attention_heads / c.num_key_value_heads);
        for unit in [LlmUnit::Ffn, LlmUnit::KvGroup, LlmUnit::Head] {
            let count = unit.count(&c);
            let kept: Vec<Vec<usize>> = (0..dense.num_layers())
                .map(|l| match unit {
                    // One query head of each kv group: every group keeps one.
                    LlmUnit::Head => (0..count).filter(|h| h % group == l % group).collect(),
                    _ => keep(l, count),
                })
                .collect();
            let mut zeroed = dense.clone();
            for (l, k) in kept.iter().enumerate() {
                for u in (0..count).filter(|u| !k.contains(u)) {
                    match unit {
                        LlmUnit::Ffn => {
                            zero(&mut zeroed, l, Proj::Gate, 0, u, u + 1);
                            zero(&mut zeroed, l, Proj::Up, 0, u, u + 1);
                            zero(&mut zeroed, l, Proj::Down, 1, u, u + 1);
                        }
                        LlmUnit::Head => {
                            zero(&mut zeroed, l, Proj::Q, 0, u * hd, (u + 1) * hd);
                            zero(&mut zeroed, l, Proj::O, 1, u * hd, (u + 1) * hd);
                        }
                        LlmUnit::KvGroup => {
                            let (q0, q1) = (u * group * hd, (u + 1) * group * hd);
                            zero(&mut zeroed, l, Proj::Q, 0, q0, q1);
                            zero(&mut zeroed, l, Proj::K, 0, u * hd, (u + 1) * hd);
                            zero(&mut zeroed, l, Proj::V, 0, u * hd, (u + 1) * hd);
                            zero(&mut zeroed, l, Proj::O, 1, q0, q1);
                        }
                    }
                }
            }
            let mut small = dense.clone();
            llm::remove_units(&mut small, unit, &kept).unwrap();
            assert_eq!(unit.count(&small.config), kept[0].len());
            let a = small.forward(&x).unwrap();
            let b = zeroed.forward(&x).unwrap();
            let d = max_abs_diff(&a, &b);
            assert!(
                d <= 1e-5,
                "{name} {unit:?}: shrunk and zeroed differ by {d}"
            );
            // The candle reference path agrees on the smaller shapes too.
            let d = max_abs_diff(&small.forward_candle(&x).unwrap(), &b);
            assert!(d <= 1e-4, "{name} {unit:?}: candle path differs by {d}");
            // And the units did matter.
            assert!(max_abs_diff(&dense.forward(&x).unwrap(), &b) > 1e-4);
        }
    }
}

#[test]
fn a_shrunk_model_exports_its_new_sizes_and_reads_back_the_same() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let dir = tiny(name);
        let mut m = llm::load_hf(&dir).unwrap();
        let layers = m.num_layers();
        let ffn: Vec<Vec<usize>> = (0..layers).map(|_| (0..48).collect()).collect();
        llm::remove_units(&mut m, LlmUnit::Ffn, &ffn).unwrap();
        let kv: Vec<Vec<usize>> = (0..layers).map(|l| vec![l % 2]).collect();
        llm::remove_units(&mut m, LlmUnit::KvGroup, &kv).unwrap();
        let out = tempfile::tempdir().unwrap();
        llm::save_hf(&m, out.path()).unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["intermediate_size"], 48);
        assert_eq!(config["num_key_value_heads"], 1);
        assert_eq!(config["num_attention_heads"], 2);
        assert_eq!(config["head_dim"], m.config.head_dim());
        let back = llm::load_hf(out.path()).unwrap();
        let x = ids(&dir);
        assert_eq!(
            max_abs_diff(&back.forward(&x).unwrap(), &m.forward(&x).unwrap()),
            0.0,
            "{name}"
        );
    }
}

#[test]
fn uneven_or_out_of_range_kept_units_are_refused() {
    let mut m = llm::load_hf(&tiny("tiny-llama")).unwrap();
    assert!(llm::remove_units(&mut m, LlmUnit::Ffn, &[vec![0, 1], vec![0]]).is_err());
    assert!(llm::remove_units(&mut m, LlmUnit::Ffn, &[vec![0, 64], vec![0, 1]]).is_err());
    assert!(llm::remove_units(&mut m, LlmUnit::KvGroup, &[vec![], vec![]]).is_err());
    assert!(llm::remove_units(&mut m, LlmUnit::Ffn, &[vec![0]]).is_err());
    // Query heads 0, 1 belong to kv head 0 and 2, 3 to kv head 1: uneven.
    assert!(llm::remove_units(&mut m, LlmUnit::Head, &[vec![0, 1, 2], vec![0, 2]]).is_err());
    assert!(llm::remove_units(&mut m, LlmUnit::Head, &[vec![0, 1], vec![0, 2]]).is_err());
}

#[test]
fn compensation_adds_the_removed_columns_mean_contribution_to_the_reader_bias() {
    let dir = tiny("tiny-llama");
    let mut m = llm::load_hf(&dir).unwrap();
    let layers = m.num_layers();
    let c = m.config.clone();
    // Means 1, 2, 3, ... over down_proj's inputs; neurons 0..48 kept.
    let means: Vec<Vec<f32>> = (0..layers)
        .map(|_| (0..c.intermediate_size).map(|j| (j + 1) as f32).collect())
        .collect();
    let keep: Vec<Vec<usize>> = (0..layers).map(|_| (0..48).collect()).collect();
    let down: Vec<Vec<f32>> = (0..layers)
        .map(|l| {
            let w = m.linear_weight(l, Proj::Down).unwrap();
            let v: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            v.chunks(c.intermediate_size)
                .map(|row| {
                    (48..c.intermediate_size)
                        .map(|j| row[j] as f64 * (j + 1) as f64)
                        .sum::<f64>() as f32
                })
                .collect()
        })
        .collect();
    llm::compensate(&mut m, LlmUnit::Ffn, &keep, &means).unwrap();
    assert!(m.config.mlp_bias);
    llm::remove_units(&mut m, LlmUnit::Ffn, &keep).unwrap();
    for (l, want) in down.iter().enumerate() {
        let named = m.named_tensors().unwrap();
        let get = |n: &str| {
            named
                .iter()
                .find(|(k, _)| k == n)
                .unwrap_or_else(|| panic!("{n}"))
                .1
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(&get(&format!("model.layers.{l}.mlp.down_proj.bias")), want);
        // gate and up biases exist (zeros), cut to the kept neurons.
        assert_eq!(
            get(&format!("model.layers.{l}.mlp.gate_proj.bias")),
            vec![0.0; 48]
        );
    }
    // The biases run in both forwards alike and survive the export.
    let x = ids(&dir);
    let d = max_abs_diff(&m.forward(&x).unwrap(), &m.forward_candle(&x).unwrap());
    assert!(d <= 1e-4, "{d}");
    let out = tempfile::tempdir().unwrap();
    llm::save_hf(&m, out.path()).unwrap();
    let back = llm::load_hf(out.path()).unwrap();
    assert!(back.config.mlp_bias);
    assert_eq!(
        max_abs_diff(&back.forward(&x).unwrap(), &m.forward(&x).unwrap()),
        0.0
    );
    // Architectures without such a bias refuse.
    let mut q2 = llm::load_hf(&tiny("tiny-qwen2")).unwrap();
    let k2: Vec<Vec<usize>> = (0..q2.num_layers()).map(|_| vec![0]).collect();
    let m2: Vec<Vec<f32>> = (0..q2.num_layers()).map(|_| vec![0.0; 32]).collect();
    assert!(llm::compensate(&mut q2, LlmUnit::KvGroup, &k2, &m2).is_err());
}
