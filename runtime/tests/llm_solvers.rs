//! Layer-level checks of the one-shot solvers on synthetic layers: SparseGPT's reconstruction, masks, patterns, edge cases.

use prunec_runtime::llm::{
    self, select, LayerPruner, LayerStats, LayerToPrune, MagnitudePruner, SparseGptPruner,
    SparsityPattern, WandaPruner,
};
use rand::{Rng, SeedableRng};

struct Layer {
    rows: usize,
    cols: usize,
    w: Vec<f32>,
    x: Vec<f32>, // (tokens, cols)
    tokens: usize,
}

/// A layer whose inputs have correlated columns with very different scales, as in real LLMs.
fn layer(rows: usize, cols: usize, tokens: usize, seed: u64) -> Layer {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let w = (0..rows * cols)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let scale: Vec<f32> = (0..cols)
        .map(|j| {
            if j % 7 == 0 {
                8.0
            } else {
                0.5 + (j % 3) as f32
            }
        })
        .collect();
    let mut x = Vec::with_capacity(tokens * cols);
    for _ in 0..tokens {
        let shared: f32 = rng.random_range(-1.0..1.0);
        for s in &scale {
            x.push(s * (0.6 * shared + rng.random_range(-1.0f32..1.0)));
        }
    }
    Layer {
        rows,
        cols,
        w,
        x,
        tokens,
    }
}

fn stats(l: &Layer) -> LayerStats {
    let mut sq = vec![0f64; l.cols];
    let mut xtx = vec![0f64; l.cols * l.cols];
    for t in 0..l.tokens {
        let row = &l.x[t * l.cols..(t + 1) * l.cols];
        for i in 0..l.cols {
            sq[i] += (row[i] as f64).powi(2);
            for j in 0..l.cols {
                xtx[i * l.cols + j] += row[i] as f64 * row[j] as f64;
            }
        }
    }
    LayerStats {
        tokens: l.tokens,
        col_sq_norms: sq,
        xtx,
    }
}

/// ||X (W - W')ᵀ||² summed over tokens and outputs.
fn output_error(l: &Layer, pruned: &[f32]) -> f64 {
    let mut e = 0.0;
    for t in 0..l.tokens {
        let x = &l.x[t * l.cols..(t + 1) * l.cols];
        for r in 0..l.rows {
            let d: f64 = (0..l.cols)
                .map(|j| (l.w[r * l.cols + j] - pruned[r * l.cols + j]) as f64 * x[j] as f64)
                .sum();
            e += d * d;
        }
    }
    e
}

fn run(
    p: &mut dyn LayerPruner,
    l: &Layer,
    s: &LayerStats,
    pattern: SparsityPattern,
) -> (Vec<f32>, usize) {
    let mut w = l.w.clone();
    let n = p
        .prune_layer(LayerToPrune {
            name: "test.layer",
            rows: l.rows,
            cols: l.cols,
            weight: &mut w,
            stats: s,
            pattern,
        })
        .unwrap();
    (w, n)
}

fn zeros(w: &[f32]) -> usize {
    w.iter().filter(|v| **v == 0.0).count()
}

#[test]
fn sparsegpt_reconstructs_better_than_masks_alone() {
    let l = layer(48, 256, 600, 1);
    let s = stats(&l);
    for pattern in [
        SparsityPattern::Unstructured(0.5),
        SparsityPattern::NofM { n: 2, m: 4 },
    ] {
        let (mag, _) = run(&mut MagnitudePruner, &l, &s, pattern);
        let (wanda, _) = run(&mut WandaPruner, &l, &s, pattern);
        let (sgpt, n) = run(&mut SparseGptPruner::default(), &l, &s, pattern);
        assert_eq!(n, l.rows * l.cols / 2, "{pattern}");
        assert_eq!(zeros(&sgpt), l.rows * l.cols / 2, "{pattern}");
        let (em, ew, es) = (
            output_error(&l, &mag),
            output_error(&l, &wanda),
            output_error(&l, &sgpt),
        );
        assert!(ew < em, "{pattern}: wanda {ew} vs magnitude {em}");
        assert!(es < 0.8 * ew, "{pattern}: sparsegpt {es} vs wanda {ew}");
    }
}

#[test]
fn sparsegpt_in_f32_reconstructs_as_well_as_in_f64_but_not_bit_for_bit() {
    let l = layer(48, 256, 600, 2);
    let s = stats(&l);
    assert_eq!(
        llm::SparseGptConfig::default().precision,
        llm::SolverPrecision::F32,
        "the reference's precision is the default"
    );
    for pattern in [
        SparsityPattern::Unstructured(0.5),
        SparsityPattern::NofM { n: 2, m: 4 },
    ] {
        let mut f64_solver = SparseGptPruner {
            config: llm::SparseGptConfig {
                precision: llm::SolverPrecision::F64,
                ..Default::default()
            },
        };
        let (w32, n) = run(&mut SparseGptPruner::default(), &l, &s, pattern);
        let (w64, _) = run(&mut f64_solver, &l, &s, pattern);
        assert_eq!(n, l.rows * l.cols / 2, "{pattern}");
        assert_eq!(zeros(&w64), l.rows * l.cols / 2, "{pattern}");
        // The option reaches the solver: the factor's rounding moves the updated weights.
        assert_ne!(w32, w64, "{pattern}");
        let (e32, e64) = (output_error(&l, &w32), output_error(&l, &w64));
        assert!(
            (e32 - e64).abs() < 1e-3 * e64,
            "{pattern}: f32 {e32} vs f64 {e64}"
        );
    }
}

#[test]
fn every_method_respects_n_of_m_groups() {
    let l = layer(16, 64, 100, 2);
    let s = stats(&l);
    for (n, m) in [(2, 4), (4, 8)] {
        let pattern = SparsityPattern::NofM { n, m };
        let methods: [&mut dyn LayerPruner; 3] = [
            &mut MagnitudePruner,
            &mut WandaPruner,
            &mut SparseGptPruner::default(),
        ];
        for p in methods {
            let (w, pruned) = run(p, &l, &s, pattern);
            assert_eq!(pruned, l.rows * l.cols * (m - n) / m);
            for g in w.chunks(m) {
                assert!(
                    g.iter().filter(|v| **v != 0.0).count() <= n,
                    "{} {n}:{m}",
                    p.method()
                );
            }
        }
    }
}

#[test]
fn wanda_compares_within_rows_and_weighs_by_activation_norm() {
    // One row: |w| equal, column norms decide. Column 1 has the largest activation norm.
    let mut s = LayerStats {
        tokens: 1,
        col_sq_norms: vec![1.0, 100.0, 4.0, 9.0],
        xtx: vec![],
    };
    let mut w = vec![1.0f32, 1.0, 1.0, 1.0];
    let pattern = SparsityPattern::Unstructured(0.5);
    WandaPruner
        .prune_layer(LayerToPrune {
            name: "t",
            rows: 1,
            cols: 4,
            weight: &mut w,
            stats: &s,
            pattern,
        })
        .unwrap();
    assert_eq!(w, [0.0, 1.0, 0.0, 1.0]);
    // Per-row: each row loses exactly half even when one row is much larger.
    s.col_sq_norms = vec![1.0; 4];
    let mut w = vec![10.0f32, 20.0, 30.0, 40.0, 0.1, 0.2, 0.3, 0.4];
    WandaPruner
        .prune_layer(LayerToPrune {
            name: "t",
            rows: 2,
            cols: 4,
            weight: &mut w,
            stats: &s,
            pattern,
        })
        .unwrap();
    assert_eq!(w, [0.0, 0.0, 30.0, 40.0, 0.0, 0.0, 0.3, 0.4]);
}

#[test]
fn sparsegpt_at_zero_sparsity_changes_nothing_and_zeroes_dead_columns() {
    let mut l = layer(8, 32, 64, 3);
    let s = stats(&l);
    let (w, n) = run(
        &mut SparseGptPruner::default(),
        &l,
        &s,
        SparsityPattern::Unstructured(0.0),
    );
    assert_eq!(n, 0);
    assert_eq!(w, l.w);
    // Column 5 never sees a non-zero input: it is dead and its weights go to zero.
    for t in 0..l.tokens {
        l.x[t * l.cols + 5] = 0.0;
    }
    let s = stats(&l);
    let (w, _) = run(
        &mut SparseGptPruner::default(),
        &l,
        &s,
        SparsityPattern::Unstructured(0.25),
    );
    assert!((0..l.rows).all(|r| w[r * l.cols + 5] == 0.0));
}

#[test]
fn sparsegpt_handles_blocks_that_do_not_divide_the_width() {
    let l = layer(8, 200, 300, 4);
    let s = stats(&l);
    let mut p = SparseGptPruner {
        config: llm::SparseGptConfig {
            block_size: 64,
            damp: 0.01,
            ..Default::default()
        },
    };
    let (w, n) = run(&mut p, &l, &s, SparsityPattern::NofM { n: 2, m: 4 });
    assert_eq!(n, 800);
    assert!(w.iter().all(|v| v.is_finite()));
}

#[test]
fn an_f32_breakdown_names_the_f64_factor_and_f64_gets_through() {
    // Two inputs equal to within 1e-4 relative: XᵀX is positive definite,
    // but its second pivot (~1e-8 of the first) is below f32's resolution.
    let mut l = layer(4, 8, 64, 6);
    for t in 0..l.tokens {
        let v = l.x[t * l.cols];
        l.x[t * l.cols + 1] = v * (1.0 + 1e-4 * ((t % 7) as f32 - 3.0));
    }
    let s = stats(&l);
    let config = |precision| llm::SparseGptConfig {
        damp: 1e-12,
        precision,
        ..Default::default()
    };
    let pattern = SparsityPattern::Unstructured(0.5);
    let mut w = l.w.clone();
    let err = SparseGptPruner {
        config: config(llm::SolverPrecision::F32),
    }
    .prune_layer(LayerToPrune {
        name: "blk.0.q",
        rows: l.rows,
        cols: l.cols,
        weight: &mut w,
        stats: &s,
        pattern,
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("blk.0.q") && err.contains("precision = f64"),
        "{err}"
    );
    let (w64, n) = run(
        &mut SparseGptPruner {
            config: config(llm::SolverPrecision::F64),
        },
        &l,
        &s,
        pattern,
    );
    assert_eq!(n, l.rows * l.cols / 2);
    assert!(w64.iter().all(|v| v.is_finite()));
}

#[test]
fn bad_requests_are_errors_naming_the_layer() {
    let l = layer(4, 6, 10, 5);
    let s = stats(&l);
    let mut w = l.w.clone();
    let err = SparseGptPruner::default()
        .prune_layer(LayerToPrune {
            name: "model.layers.0.mlp.up_proj.weight",
            rows: 4,
            cols: 6,
            weight: &mut w,
            stats: &s,
            pattern: SparsityPattern::NofM { n: 2, m: 4 },
        })
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("model.layers.0.mlp.up_proj.weight") && msg.contains("multiple"),
        "{msg}"
    );
    let empty = LayerStats {
        tokens: 0,
        col_sq_norms: vec![],
        xtx: vec![],
    };
    let err = SparseGptPruner::default()
        .prune_layer(LayerToPrune {
            name: "x",
            rows: 4,
            cols: 6,
            weight: &mut w,
            stats: &empty,
            pattern: SparsityPattern::Unstructured(0.5),
        })
        .unwrap_err();
    assert!(err.to_string().contains("x"), "{err}");
    assert!(select::choose_pruned(
        &[1.0; 3],
        2,
        2,
        SparsityPattern::Unstructured(0.5),
        select::Scope::Row
    )
    .is_err());
}
