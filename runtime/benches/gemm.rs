//! The fixed-order products (`prunec_runtime::gemm`) against candle's
//! matmul on the shapes training and language-model forwards run, in the
//! same run (GFLOP/s as elements/s of multiply-adds x 2).

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prunec_runtime::gemm::{gemm, Mat};

/// `(m, k, n)`: LeNet-300-100's first layer forward and weight gradient,
/// LeNet-5's conv2 weight gradient, a SmolLM2 MLP projection over 4,096 tokens.
const SHAPES: [(usize, usize, usize); 4] = [
    (128, 784, 300),
    (300, 128, 784),
    (16, 12_800, 150),
    (4096, 576, 1536),
];

fn bench_gemm(c: &mut Criterion) {
    for (m, k, n) in SHAPES {
        let a: Vec<f32> = (0..m * k).map(|i| ((i % 7) as f32 - 3.0) * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i % 5) as f32 - 2.0) * 0.1).collect();
        let mut group = c.benchmark_group(format!("gemm_{m}x{k}x{n}"));
        group.sample_size(10);
        group.throughput(Throughput::Elements((2 * m * k * n) as u64));
        let mut out = vec![0.0f32; m * n];
        group.bench_function("prunec fixed order", |bench| {
            bench.iter(|| gemm(Mat::new(&a, m, k), Mat::new(&b, k, n), &mut out, false))
        });
        let ta = Tensor::from_vec(a.clone(), (m, k), &Device::Cpu).unwrap();
        let tb = Tensor::from_vec(b.clone(), (k, n), &Device::Cpu).unwrap();
        group.bench_function("candle matmul", |bench| {
            bench.iter(|| ta.matmul(&tb).unwrap())
        });
        group.finish();
    }
}

criterion_group!(benches, bench_gemm);
criterion_main!(benches);
