//! One-shot pruning gives the same bytes whatever the number of threads (its own test binary: it sets RAYON_NUM_THREADS).

use prunec_runtime::llm::{self, data, OneShotConfig, Proj, SparsityPattern};

#[test]
fn pruned_weights_do_not_depend_on_the_thread_count() {
    let fail = |e: llm::RuntimeError| -> ! { panic!("{e}") };
    let model = llm::load_gguf(&data::smollm2_gguf().unwrap_or_else(|e| fail(e)))
        .unwrap_or_else(|e| fail(e));
    let tok = model.tokenizer.clone().unwrap();
    let calib = llm::calibration_windows(
        &tok,
        &data::sotu_files().unwrap_or_else(|e| fail(e)),
        3,
        64,
        7,
    )
    .unwrap();
    let run = |threads: &str, pruner: &mut dyn llm::LayerPruner| -> Vec<Vec<u32>> {
        // candle reads RAYON_NUM_THREADS at every matmul; this binary has no other test running.
        unsafe_set_threads(threads);
        let mut m = model.clone();
        let mut config = OneShotConfig::new(SparsityPattern::Unstructured(0.5));
        config.targets = vec!["model.layers.0.*".into(), "model.layers.1.*".into()];
        config.batch = 2;
        llm::prune_one_shot(&mut m, &calib, &config, pruner).unwrap();
        Proj::ALL
            .iter()
            .map(|&p| {
                m.linear_weight(1, p)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            })
            .collect()
    };
    let wanda1 = run("1", &mut llm::WandaPruner);
    let wanda2 = run("2", &mut llm::WandaPruner);
    assert!(wanda1 == wanda2, "wanda differs between 1 and 2 threads");
    let sgpt1 = run("1", &mut llm::SparseGptPruner::default());
    let sgpt2 = run("2", &mut llm::SparseGptPruner::default());
    assert!(sgpt1 == sgpt2, "sparsegpt differs between 1 and 2 threads");
}

fn unsafe_set_threads(n: &str) {
    // Edition 2021: set_var is safe; it is sound here because this binary runs a single test.
    std::env::set_var("RAYON_NUM_THREADS", n);
}
