//! Which activations each pruned layer of a language model is calibrated on:
//! the block's dense activations (llm-compressor's flow, the default), or
//! with `true_sequential` the outputs of the layers of the same block pruned
//! before it; and, across blocks, the pruned or the dense outputs
//! (`sequential`). Checked on the tiny Llama by recomputing each layer's
//! input norms from the weights the run left.

use candle_core::{Device, Tensor};
use prunec_runtime::llm::{
    self, LayerPruner, LayerToPrune, LinearInput, LlamaModel, OneShotConfig, Proj, SparsityPattern,
    StatsNeeds, WandaPruner,
};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::Path;

/// Wanda, recording the input norms the driver handed each layer.
#[derive(Default)]
struct Recorder {
    norms: BTreeMap<String, Vec<f32>>,
}

impl LayerPruner for Recorder {
    fn method(&self) -> &str {
        "wanda"
    }
    fn needs(&self) -> StatsNeeds {
        WandaPruner.needs()
    }
    fn prune_layer(&mut self, layer: LayerToPrune<'_>) -> llm::Result<usize> {
        self.norms
            .insert(layer.name.to_string(), layer.stats.col_norms());
        WandaPruner.prune_layer(layer)
    }
}

fn tiny_llama() -> LlamaModel {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/models/tiny-llama");
    llm::load_hf(&dir).unwrap()
}

fn calibration(model: &LlamaModel) -> Vec<Vec<u32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let vocab = model.config.vocab_size as u32;
    (0..4)
        .map(|_| (0..24).map(|_| rng.random_range(0..vocab)).collect())
        .collect()
}

fn run(true_sequential: bool, sequential: bool) -> (LlamaModel, BTreeMap<String, Vec<f32>>) {
    let mut model = tiny_llama();
    let calib = calibration(&model);
    let mut config = OneShotConfig::new(SparsityPattern::Unstructured(0.5));
    config.batch = 2;
    config.true_sequential = true_sequential;
    config.sequential = sequential;
    let mut rec = Recorder::default();
    llm::prune_one_shot(&mut model, &calib, &config, &mut rec).unwrap();
    (model, rec.norms)
}

/// The residual stream entering block `layer` of `model`.
fn stream(model: &LlamaModel, calib: &[Vec<u32>], layer: usize) -> Vec<Tensor> {
    calib
        .chunks(2)
        .map(|group| {
            let flat: Vec<u32> = group.iter().flatten().copied().collect();
            let ids = Tensor::from_vec(flat, (group.len(), group[0].len()), &Device::Cpu).unwrap();
            let mut x = model.embed_tokens(&ids).unwrap();
            for l in 0..layer {
                x = model.block_forward(l, &x, None).unwrap();
            }
            x
        })
        .collect()
}

/// The L2 norm of every column of the input `input` of block `layer`.
fn input_norms(model: &LlamaModel, x: &[Tensor], layer: usize, input: LinearInput) -> Vec<f32> {
    let mut sq: Vec<f64> = Vec::new();
    for chunk in x {
        let mut sink = |i: LinearInput, a: &Tensor| -> llm::Result<()> {
            if i == input {
                let cols = a.dims()[1];
                let v: Vec<f32> = a.flatten_all()?.to_vec1()?;
                sq.resize(cols, 0.0);
                for row in v.chunks(cols) {
                    for (s, a) in sq.iter_mut().zip(row) {
                        *s += f64::from(*a) * f64::from(*a);
                    }
                }
            }
            Ok(())
        };
        model.block_forward(layer, chunk, Some(&mut sink)).unwrap();
    }
    sq.iter().map(|s| s.sqrt() as f32).collect()
}

/// `dense` with the weights of `projs` of block `layer` taken from `pruned`.
fn with(dense: &LlamaModel, pruned: &LlamaModel, layer: usize, projs: &[Proj]) -> LlamaModel {
    let mut m = dense.clone();
    for &p in projs {
        m.set_linear_weight(layer, p, pruned.linear_weight(layer, p).unwrap())
            .unwrap();
    }
    m
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-4 * (1.0 + x.abs().max(y.abs())))
}

#[test]
fn block_dense_flow_calibrates_every_layer_of_a_block_on_its_dense_activations() {
    let dense = tiny_llama();
    let calib = calibration(&dense);
    let (pruned, norms) = run(false, true);
    let x0 = stream(&dense, &calib, 0);
    for (name, input) in [
        (
            "model.layers.0.self_attn.o_proj.weight",
            LinearInput::AttentionOutput,
        ),
        ("model.layers.0.mlp.down_proj.weight", LinearInput::MlpDown),
    ] {
        assert!(
            close(&norms[name], &input_norms(&dense, &x0, 0, input)),
            "{name}"
        );
    }
    // Block 1 reads block 0's pruned output (`sequential`).
    let x1 = stream(&pruned, &calib, 1);
    assert!(close(
        &norms["model.layers.1.self_attn.q_proj.weight"],
        &input_norms(&pruned, &x1, 1, LinearInput::Attention)
    ));
}

#[test]
fn true_sequential_calibrates_each_group_on_the_already_pruned_layers_of_its_block() {
    let dense = tiny_llama();
    let calib = calibration(&dense);
    let (pruned, norms) = run(true, true);
    let x0 = stream(&dense, &calib, 0);
    let attn = [Proj::Q, Proj::K, Proj::V];
    let before_down = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up];
    for (name, input, projs) in [
        (
            "model.layers.0.self_attn.q_proj.weight",
            LinearInput::Attention,
            &[][..],
        ),
        (
            "model.layers.0.self_attn.o_proj.weight",
            LinearInput::AttentionOutput,
            &attn[..],
        ),
        (
            "model.layers.0.mlp.up_proj.weight",
            LinearInput::Mlp,
            &[Proj::Q, Proj::K, Proj::V, Proj::O][..],
        ),
        (
            "model.layers.0.mlp.down_proj.weight",
            LinearInput::MlpDown,
            &before_down[..],
        ),
    ] {
        let model = with(&dense, &pruned, 0, projs);
        let want = input_norms(&model, &x0, 0, input);
        assert!(close(&norms[name], &want), "{name}");
        if !projs.is_empty() {
            // ... which is not what the dense block gives.
            assert!(
                !close(&norms[name], &input_norms(&dense, &x0, 0, input)),
                "{name}"
            );
        }
    }
    let x1 = stream(&pruned, &calib, 1);
    assert!(close(
        &norms["model.layers.1.self_attn.q_proj.weight"],
        &input_norms(&pruned, &x1, 1, LinearInput::Attention)
    ));
    // The two flows prune differently.
    let (block_dense, _) = run(false, true);
    let w = |m: &LlamaModel| {
        m.linear_weight(0, Proj::Down)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_ne!(w(&pruned), w(&block_dense));
}

#[test]
fn true_sequential_without_sequential_feeds_the_next_block_the_dense_outputs() {
    let dense = tiny_llama();
    let calib = calibration(&dense);
    let (pruned, norms) = run(true, false);
    let x1 = stream(&dense, &calib, 1);
    assert!(close(
        &norms["model.layers.1.self_attn.q_proj.weight"],
        &input_norms(&dense, &x1, 1, LinearInput::Attention)
    ));
    // Within block 1, o still reads the pruned q, k and v.
    let model = with(&dense, &pruned, 1, &[Proj::Q, Proj::K, Proj::V]);
    assert!(close(
        &norms["model.layers.1.self_attn.o_proj.weight"],
        &input_norms(&model, &x1, 1, LinearInput::AttentionOutput)
    ));
}
