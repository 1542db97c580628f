//! LeNet-300-100 training and evaluation throughput (samples/s) against the raw GEMM
//! rate of the same matrix shapes (the fixed-order products the runtime runs),
//! measured in the same run.

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prunec_runtime::gemm::matmul;
use prunec_runtime::{
    evaluate, train, DatasetKind, DatasetSpec, Masks, ModelSpec, NoHooks, OptimizerSpec, Split,
    TrainConfig,
};

const BATCH: usize = 64;
const TRAIN_SAMPLES: usize = 64 * 40;

fn load(split: Split, limit: usize, batch: usize) -> prunec_runtime::Dataset {
    DatasetSpec::new(DatasetKind::Mnist, split)
        .limit(limit)
        .batch_size(batch)
        .shuffled(1)
        .load(&Device::Cpu)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn randn(shape: (usize, usize)) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

fn bench_training(c: &mut Criterion) {
    let data = load(Split::Train, TRAIN_SAMPLES, BATCH);
    let mut group = c.benchmark_group("lenet_300_100_train");
    group.sample_size(10);
    group.throughput(Throughput::Elements(TRAIN_SAMPLES as u64));
    let masks = Masks::new();
    let cfg = TrainConfig::new(1, OptimizerSpec::sgd(0.05, 0.9, 1e-4));
    group.bench_function("train_epoch_batch64", |b| {
        b.iter(|| {
            let mut model = ModelSpec::lenet_300_100().build(0, &Device::Cpu).unwrap();
            train(&mut model, &data, &cfg, &masks, &mut NoHooks).unwrap()
        })
    });
    // Baseline: only the GEMMs one training step needs (forward x3, weight grads x3,
    // input grads x2), same shapes, same number of batches.
    let x = randn((BATCH, 784));
    let (w1, w2, w3) = (randn((300, 784)), randn((100, 300)), randn((10, 100)));
    let (h1, h2, g3) = (randn((BATCH, 300)), randn((BATCH, 100)), randn((BATCH, 10)));
    let (g2, g1) = (randn((BATCH, 100)), randn((BATCH, 300)));
    group.bench_function("gemm_baseline_batch64", |b| {
        b.iter(|| {
            for _ in 0..TRAIN_SAMPLES / BATCH {
                let _ = matmul(&x, &w1.t().unwrap()).unwrap();
                let _ = matmul(&h1, &w2.t().unwrap()).unwrap();
                let _ = matmul(&h2, &w3.t().unwrap()).unwrap();
                let _ = matmul(&g3.t().unwrap(), &h2).unwrap();
                let _ = matmul(&g2.t().unwrap(), &h1).unwrap();
                let _ = matmul(&g1.t().unwrap(), &x).unwrap();
                let _ = matmul(&g3, &w3).unwrap();
                let _ = matmul(&g2, &w2).unwrap();
            }
        })
    });
    group.finish();
}

fn bench_eval(c: &mut Criterion) {
    let data = load(Split::Test, 10_000, 1000);
    let model = ModelSpec::lenet_300_100().build(0, &Device::Cpu).unwrap();
    let mut group = c.benchmark_group("lenet_300_100_eval");
    group.sample_size(10);
    group.throughput(Throughput::Elements(10_000));
    group.bench_function("evaluate_10k_batch1000", |b| {
        b.iter(|| evaluate(&model, &data).unwrap())
    });
    let x = data
        .inputs
        .reshape((10_000, 784))
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let params: Vec<Tensor> = model.named_tensors().into_iter().map(|(_, t)| t).collect();
    group.bench_function("gemm_baseline_10k", |b| {
        b.iter(|| {
            for i in 0..10 {
                let xb = x.narrow(0, i * 1000, 1000).unwrap();
                let h = matmul(&xb, &params[0].t().unwrap()).unwrap();
                let h = matmul(&h, &params[2].t().unwrap()).unwrap();
                let _ = matmul(&h, &params[4].t().unwrap()).unwrap();
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench_training, bench_eval);
criterion_main!(benches);
