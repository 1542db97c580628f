//! Determinism: same seed and data give bit-identical weights with 1 and 2 threads.
//! The test re-runs itself as a subprocess with different `RAYON_NUM_THREADS` /
//! `CANDLE_NUM_THREADS` (rayon's pool size is fixed per process) and compares hashes.

mod common;

use std::process::Command;

use candle_core::Device;
use common::OrPanic;
use prunec_runtime::{
    evaluate, gradients, train, DatasetKind, DatasetSpec, Masks, ModelSpec, NoHooks, OptimizerSpec,
    Split, TrainConfig,
};

const CHILD_ENV: &str = "PRUNEC_DETERMINISM_CHILD";
const TEST_NAME: &str = "weights_are_identical_with_1_and_2_threads";

/// Trains LeNet-300-100 (masked, SGD + momentum, large batches so gemm runs
/// multi-threaded) and LeNet-5 (Adam, convolutions), and hashes weights,
/// gradients and evaluation results.
fn run_and_hash() -> Vec<String> {
    let d = Device::Cpu;
    let train_set = DatasetSpec::new(DatasetKind::Mnist, Split::Train)
        .limit(3000)
        .batch_size(500)
        .shuffled(11)
        .load(&d)
        .or_panic();
    let test_set = DatasetSpec::new(DatasetKind::Mnist, Split::Test)
        .limit(1000)
        .batch_size(250)
        .load(&d)
        .or_panic();
    let mut out = Vec::new();

    let mut mlp = ModelSpec::lenet_300_100().build(21, &d).or_panic();
    let mut masks = Masks::new();
    for p in mlp.params().iter().filter(|p| !p.is_bias()) {
        let keep: Vec<u8> = (0..p.numel()).map(|i| u8::from(i % 4 != 0)).collect();
        masks.insert_u8(&mlp, &p.name, &keep).or_panic();
    }
    let cfg = TrainConfig::new(2, OptimizerSpec::sgd(0.05, 0.9, 1e-4));
    train(&mut mlp, &train_set, &cfg, &masks, &mut NoHooks).or_panic();
    out.push(format!("mlp-weights {}", mlp.weights_sha256().or_panic()));
    let m = evaluate(&mlp, &test_set).or_panic();
    out.push(format!("mlp-eval {} {:016x}", m.correct, m.loss.to_bits()));
    let grads = gradients(&mlp, &train_set, 2).or_panic();
    let mut bits = Vec::new();
    for (_, g) in &grads {
        bits.extend(
            g.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits()),
        );
    }
    out.push(format!(
        "mlp-grads {}",
        prunec_runtime::io::sha256_hex(
            &bits
                .iter()
                .flat_map(|b| b.to_le_bytes())
                .collect::<Vec<_>>()
        )
    ));

    let small = DatasetSpec::new(DatasetKind::Mnist, Split::Train)
        .limit(600)
        .batch_size(200)
        .shuffled(5)
        .load(&d)
        .or_panic();
    let mut cnn = ModelSpec::lenet5().build(22, &d).or_panic();
    train(
        &mut cnn,
        &small,
        &TrainConfig::new(1, OptimizerSpec::adam(1e-3)),
        &Masks::new(),
        &mut NoHooks,
    )
    .or_panic();
    out.push(format!(
        "lenet5-weights {}",
        cnn.weights_sha256().or_panic()
    ));
    out
}

fn child_hashes(threads: usize) -> Vec<String> {
    let exe = std::env::current_exe().expect("test binary path");
    let output = Command::new(exe)
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env("CANDLE_NUM_THREADS", threads.to_string())
        .output()
        .expect("spawning the test binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "child with {threads} threads failed:\n{stdout}\n{stderr}"
    );
    let hashes: Vec<String> = stdout
        .lines()
        .chain(stderr.lines())
        .filter_map(|l| l.find("HASH ").map(|at| l[at + 5..].to_string()))
        .collect();
    assert_eq!(
        hashes.len(),
        4,
        "child with {threads} threads printed {hashes:?}\n{stdout}\n{stderr}"
    );
    hashes
}

#[test]
fn weights_are_identical_with_1_and_2_threads() {
    if std::env::var_os(CHILD_ENV).is_some() {
        for h in run_and_hash() {
            println!("HASH {h}");
        }
        return;
    }
    let one = child_hashes(1);
    let two = child_hashes(2);
    eprintln!("1 thread:  {one:?}\n2 threads: {two:?}");
    assert_eq!(one, two, "results differ between 1 and 2 threads");
}
