//! The per-block sparsity search on the tiny random Llama of
//! `scripts/interop/make_tiny_llms.py`: a candidate's mask is the one-shot
//! per-row selection on the dense model's activations, its objectives are
//! that model's perplexity and kept share, and the search is seeded.

use prunec_runtime::llm::search::{SearchProblem, SearchScore};
use prunec_runtime::llm::{self, LlamaModel, SparsityPattern};
use std::path::Path;

fn tiny() -> LlamaModel {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/models/tiny-llama");
    llm::load_hf(&dir).unwrap()
}

/// Deterministic calibration windows: `b` sequences of `t` tokens.
fn windows(model: &LlamaModel, b: usize, t: usize) -> Vec<Vec<u32>> {
    let vocab = model.config.vocab_size as u64;
    (0..b)
        .map(|s| {
            (0..t)
                .map(|i| (((s * t + i) as u64 * 2654435761 + 7) % vocab) as u32)
                .collect()
        })
        .collect()
}

fn weights(m: &LlamaModel) -> Vec<Vec<f32>> {
    m.named_tensors()
        .unwrap()
        .into_iter()
        .map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

#[test]
fn a_uniform_candidate_is_the_one_shot_selection_on_dense_activations() {
    let dense = tiny();
    let calib = windows(&dense, 4, 16);
    for (score, sparsity) in [(SearchScore::Wanda, 0.5), (SearchScore::Magnitude, 0.3)] {
        let problem = SearchProblem::new(&dense, &calib, score, 2).unwrap();
        let masked = problem
            .masked(&dense, &vec![sparsity; dense.num_layers()])
            .unwrap();
        let mut reference = dense.clone();
        let mut config = llm::OneShotConfig::new(SparsityPattern::Unstructured(sparsity));
        config.sequential = false;
        config.batch = 2;
        match score {
            SearchScore::Wanda => {
                llm::prune_one_shot(&mut reference, &calib, &config, &mut llm::WandaPruner)
                    .unwrap();
            }
            SearchScore::Magnitude => {
                // Magnitude's one-shot default is one threshold per layer,
                // not the search's per-row masks: check each row directly.
                let m = &masked;
                for l in 0..dense.num_layers() {
                    for p in llm::Proj::ALL {
                        let w = m.linear_weight(l, p).unwrap();
                        let (rows, cols) = w.dims2().unwrap();
                        let w: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
                        let d: Vec<f32> = dense
                            .linear_weight(l, p)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1()
                            .unwrap();
                        let k = (sparsity * cols as f64).floor() as usize;
                        for r in 0..rows {
                            let row = &w[r * cols..(r + 1) * cols];
                            let zeros = row.iter().filter(|v| **v == 0.0).count();
                            assert_eq!(zeros, k, "block {l} {p:?} row {r}");
                            // Every kept weight is at least as large as every removed one.
                            let kept_min = row
                                .iter()
                                .zip(&d[r * cols..(r + 1) * cols])
                                .filter(|(v, _)| **v != 0.0)
                                .map(|(_, x)| x.abs())
                                .fold(f32::INFINITY, f32::min);
                            let removed_max = row
                                .iter()
                                .zip(&d[r * cols..(r + 1) * cols])
                                .filter(|(v, _)| **v == 0.0)
                                .map(|(_, x)| x.abs())
                                .fold(0.0, f32::max);
                            assert!(removed_max <= kept_min, "block {l} {p:?} row {r}");
                        }
                    }
                }
                continue;
            }
        }
        assert_eq!(weights(&masked), weights(&reference), "{score:?}");
    }
}

#[test]
fn the_objectives_are_the_masked_models_perplexity_and_kept_share() {
    let dense = tiny();
    let calib = windows(&dense, 4, 16);
    let problem = SearchProblem::new(&dense, &calib, SearchScore::Wanda, 2).unwrap();
    let alloc = [0.25, 0.75];
    let [ppl, kept] = problem.evaluate(&dense, &alloc).unwrap();
    let masked = problem.masked(&dense, &alloc).unwrap();
    let flat: Vec<u32> = calib.iter().flatten().copied().collect();
    assert_eq!(ppl, llm::perplexity(&masked, &flat, 16, 2).unwrap());
    // Kept share, counted from the masked weights themselves.
    let (mut nonzero, mut total) = (0usize, 0usize);
    for l in 0..dense.num_layers() {
        for p in llm::Proj::ALL {
            let w: Vec<f32> = masked
                .linear_weight(l, p)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            nonzero += w.iter().filter(|v| **v != 0.0).count();
            total += w.len();
        }
    }
    assert_eq!(kept, nonzero as f64 / total as f64);
    assert_ne!(ppl, problem.perplexity(&dense).unwrap());
}

#[test]
fn the_search_is_seeded_and_its_front_is_non_dominated() {
    let dense = tiny();
    let calib = windows(&dense, 4, 16);
    let problem = SearchProblem::new(&dense, &calib, SearchScore::Wanda, 2).unwrap();
    let run = |seed: u64, threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                problem
                    .search(&dense, 6, 2, (0.2, 0.8), seed, |_, _, _| Ok(()))
                    .unwrap()
            })
    };
    let a = run(7, 1);
    let b = run(7, 3);
    assert_eq!(a.all, b.all);
    assert_eq!(a.front, b.front);
    assert_ne!(run(8, 1).all, a.all);
    for p in &a.front {
        for q in &a.all {
            let dominates = q.objectives[0] <= p.objectives[0]
                && q.objectives[1] <= p.objectives[1]
                && q.objectives != p.objectives;
            assert!(!dominates, "{q:?} dominates the front's {p:?}");
        }
        assert!(p.genes.iter().all(|g| (0.2..=0.8).contains(g)));
    }
    // Uniform allocations at the range's ends are among the first candidates.
    assert!(a.all.iter().any(|p| p.genes.iter().all(|g| *g == 0.2)));
    assert!(a.all.iter().any(|p| p.genes.iter().all(|g| *g == 0.8)));
}
