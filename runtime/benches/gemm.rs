//! The fixed-order products (`prunec_runtime::gemm`) against candle's
//! matmul on the shapes training and language-model forwards run, in the
//! same run (GFLOP/s as elements/s of multiply-adds x 2).

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prunec_runtime::gemm::{gemm, gram_upper, Mat};

/// `(m, k, n)`: LeNet-300-100's first layer forward and weight gradient,
/// LeNet-5's conv2 weight gradient, SmolLM2's up and down MLP projections
/// over 4,096 tokens.
const SHAPES: [(usize, usize, usize); 5] = [
    (128, 784, 300),
    (300, 128, 784),
    (16, 12_800, 150),
    (4096, 576, 1536),
    (4096, 1536, 576),
];

/// `(tokens, cols)`: a SmolLM2 layer's calibration `XᵀX` over one 256-token
/// window and over a batch of eight (`text(batch = 8)`).
const GRAMS: [(usize, usize); 2] = [(256, 576), (2048, 576)];

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
    for (rows, cols) in GRAMS {
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i % 7) as f32 - 3.0) * 0.1)
            .collect();
        let mut group = c.benchmark_group(format!("gram_{rows}x{cols}"));
        group.sample_size(10);
        // The full product's multiply-adds, so both rows compare as time.
        group.throughput(Throughput::Elements((2 * rows * cols * cols) as u64));
        group.bench_function("prunec upper panels", |bench| {
            bench.iter(|| {
                let mut sum = 0.0f32;
                gram_upper(&x, rows, cols, |_, s| sum += s[0]);
                sum
            })
        });
        let tx = Tensor::from_vec(x.clone(), (rows, cols), &Device::Cpu).unwrap();
        group.bench_function("candle matmul", |bench| {
            bench.iter(|| tx.t().unwrap().matmul(&tx).unwrap())
        });
        group.finish();
    }
}

criterion_group!(benches, bench_gemm);
criterion_main!(benches);
