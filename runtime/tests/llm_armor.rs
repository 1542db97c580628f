//! ARMOR layers on the tiny random Llama of
//! `scripts/interop/make_tiny_llms.py`: installed by the sequential driver,
//! reported as their sparse core with the wrappers beside it, and dropped
//! when a later change cuts the layer.

use prunec_runtime::llm::armor::{ArmorConfig, ArmorInit, ArmorPruner};
use prunec_runtime::llm::{self, LlamaModel, LlmUnit, SparsityPattern};
use std::path::Path;

fn tiny() -> LlamaModel {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/models/tiny-llama");
    llm::load_hf(&dir).unwrap()
}

fn names(m: &LlamaModel) -> Vec<String> {
    m.named_tensors()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

#[test]
fn a_cut_armor_layer_loses_its_wrappers() {
    let mut model = tiny();
    let vocab = model.config.vocab_size as u64;
    let calib: Vec<Vec<u32>> = (0..4)
        .map(|s| {
            (0..32)
                .map(|i| ((s * 32 + i) as u64 * 2654435761 % vocab) as u32)
                .collect()
        })
        .collect();
    let mut config = llm::OneShotConfig::new(SparsityPattern::NofM { n: 2, m: 4 });
    config.batch = 2;
    let mut pruner = ArmorPruner::new(
        ArmorInit::Wanda,
        ArmorConfig {
            block: 8,
            iters: 1,
            s_steps: 2,
        },
    );
    llm::prune_one_shot(&mut model, &calib, &config, &mut pruner).unwrap();
    assert!(model.has_armor());
    let before = names(&model);
    assert!(before.contains(&"model.layers.0.mlp.up_proj.armor_a".to_string()));
    // Half the FFN neurons of every block removed: the cut projections are
    // plain weights again, the attention ones keep their wrappers.
    let inter = model.config.intermediate_size;
    let keep: Vec<Vec<usize>> = (0..model.num_layers())
        .map(|_| (0..inter / 2).collect())
        .collect();
    llm::remove_units(&mut model, LlmUnit::Ffn, &keep).unwrap();
    let after = names(&model);
    assert!(!after
        .iter()
        .any(|n| n.contains("mlp") && n.contains("armor")));
    assert!(after.contains(&"model.layers.1.self_attn.q_proj.armor_b".to_string()));
    for (n, t) in model.named_tensors().unwrap() {
        if n.ends_with("mlp.up_proj.weight") {
            assert_eq!(t.dims(), &[inter / 2, model.config.hidden_size], "{n}");
        }
    }
    // Dropping blocks drops their layers' wrappers.
    model.truncate_layers(1);
    assert!(!names(&model)
        .iter()
        .any(|n| n.starts_with("model.layers.1.")));
    assert!(model.has_armor());
}
