//! Per-layer one-shot pruning speed on SmolLM2-135M's block 0: Wanda, SparseGPT and calibration, each against a plain baseline.
//!
//! Baselines, measured in the same run: Wanda as unfused candle ops (abs, broadcast multiply,
//! per-row arg-sort, gather of the threshold, compare, multiply); SparseGPT without lazy batch
//! updates (one block spanning all columns: every column's error is applied to the whole
//! remaining row at once); calibration statistics accumulated with an f64 gemm instead of an f32
//! gemm plus f64 accumulation.

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prunec_runtime::llm::{
    self, data, LayerPruner, LayerStats, LayerToPrune, Proj, SparseGptConfig, SparsityPattern,
    StatsNeeds,
};
use rand::{Rng, SeedableRng};

fn inputs(tokens: usize, cols: usize) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let x: Vec<f32> = (0..tokens * cols)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    Tensor::from_vec(x, (tokens, cols), &Device::Cpu).unwrap()
}

fn wanda_unfused_candle(w: &Tensor, norms: &Tensor, keep_from: usize) -> Tensor {
    let scores = w.abs().unwrap().broadcast_mul(norms).unwrap();
    let order = scores.arg_sort_last_dim(true).unwrap();
    let (rows, _) = w.dims2().unwrap();
    let pivot = order.narrow(1, keep_from, 1).unwrap();
    let threshold = scores.gather(&pivot.contiguous().unwrap(), 1).unwrap();
    let keep = scores
        .broadcast_ge(&threshold)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let _ = rows;
    (w * keep).unwrap()
}

fn bench(c: &mut Criterion) {
    let path = data::smollm2_gguf().unwrap_or_else(|e| panic!("{e}"));
    let model = llm::load_gguf(&path).unwrap_or_else(|e| panic!("{e}"));
    let tokens = 2048;
    for proj in [Proj::Up, Proj::Down] {
        let w = model.linear_weight(0, proj).unwrap().clone();
        let (rows, cols) = w.dims2().unwrap();
        let x = inputs(tokens, cols);
        let mut stats = LayerStats::new(
            cols,
            StatsNeeds {
                col_norms: true,
                hessian: true,
            },
        );
        stats.add(&x).unwrap();
        let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let pattern = SparsityPattern::Unstructured(0.5);
        let name = llm::linear_name(0, proj);

        let mut g = c.benchmark_group(format!("{proj:?} {rows}x{cols}"));
        g.sample_size(10);
        g.bench_function("wanda (prunec)", |b| {
            b.iter(|| {
                let mut v = wv.clone();
                llm::WandaPruner
                    .prune_layer(LayerToPrune {
                        name: &name,
                        rows,
                        cols,
                        weight: &mut v,
                        stats: &stats,
                        pattern,
                    })
                    .unwrap()
            })
        });
        let norms = Tensor::new(stats.col_norms().as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        g.bench_function("wanda (unfused candle baseline)", |b| {
            b.iter(|| wanda_unfused_candle(&w, &norms, cols / 2))
        });
        g.bench_function("sparsegpt (prunec, lazy blocks of 128)", |b| {
            b.iter(|| {
                let mut v = wv.clone();
                llm::sparsegpt_prune(
                    LayerToPrune {
                        name: &name,
                        rows,
                        cols,
                        weight: &mut v,
                        stats: &stats,
                        pattern,
                    },
                    SparseGptConfig::default(),
                )
                .unwrap()
            })
        });
        g.bench_function("sparsegpt (baseline, no lazy batching)", |b| {
            b.iter(|| {
                let mut v = wv.clone();
                llm::sparsegpt_prune(
                    LayerToPrune {
                        name: &name,
                        rows,
                        cols,
                        weight: &mut v,
                        stats: &stats,
                        pattern,
                    },
                    SparseGptConfig {
                        block_size: cols,
                        damp: 0.01,
                        ..SparseGptConfig::default()
                    },
                )
                .unwrap()
            })
        });
        g.throughput(Throughput::Elements(tokens as u64));
        g.bench_function("calibration stats (prunec: f32 gemm, f64 sums)", |b| {
            b.iter(|| {
                let mut s = LayerStats::new(
                    cols,
                    StatsNeeds {
                        col_norms: true,
                        hessian: true,
                    },
                );
                s.add(&x).unwrap();
                s.tokens
            })
        });
        g.bench_function("calibration stats (baseline: f64 gemm)", |b| {
            b.iter(|| {
                let x64 = x.to_dtype(DType::F64).unwrap();
                let h = x64.t().unwrap().matmul(&x64).unwrap();
                let sq = x64.sqr().unwrap().sum(0).unwrap();
                (
                    h.to_vec2::<f64>().unwrap().len(),
                    sq.to_vec1::<f64>().unwrap().len(),
                )
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
