//! Acceptance runs on real MNIST: LeNet-300-100 and LeNet-5 trained from scratch, the pretrained CNN.

mod common;

use std::time::Instant;

use candle_core::Device;
use common::{load, OrPanic};
use prunec_runtime::{
    evaluate, train, DatasetKind, LrSchedule, ModelSpec, NoHooks, OptimizerSpec, Split, TrainConfig,
};

/// A setting from the environment (to explore other settings), else the documented default.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Seed documented in the README: LeNet-300-100 reaches >= 98.0% with it.
const LENET_300_100_SEED: u64 = 1;

#[test]
fn lenet_300_100_reaches_98_percent_on_mnist() {
    let t0 = Instant::now();
    let train_set = load(
        DatasetKind::Mnist,
        Split::Train,
        env_or("PRUNEC_TEST_BATCH", 128),
        Some(LENET_300_100_SEED),
    );
    let test_set = load(DatasetKind::Mnist, Split::Test, 1000, None);
    let mut model = ModelSpec::lenet_300_100()
        .build(LENET_300_100_SEED, &Device::Cpu)
        .or_panic();
    let epochs = env_or("PRUNEC_TEST_EPOCHS", 8);
    let cfg = TrainConfig::new(
        epochs,
        OptimizerSpec::sgd(env_or("PRUNEC_TEST_LR", 0.1), 0.9, 1e-4),
    )
    .schedule(LrSchedule::Cosine { min_lr: 0.0 });
    let report = train(
        &mut model,
        &train_set,
        &cfg,
        &prunec_runtime::Masks::new(),
        &mut NoHooks,
    )
    .or_panic();
    let m = evaluate(&model, &test_set).or_panic();
    eprintln!(
        "LeNet-300-100: {epochs} epochs, test accuracy {:.4}, loss {:.4}, losses {:?}, {:.1} s",
        m.accuracy,
        m.loss,
        report.epoch_losses,
        t0.elapsed().as_secs_f64()
    );
    assert!(m.accuracy >= 0.98, "test accuracy {} < 0.98", m.accuracy);
}

/// Seed documented in the README: LeNet-5 reaches >= 98.8% with it.
const LENET5_SEED: u64 = 1;

#[test]
fn lenet5_reaches_98_8_percent_on_mnist() {
    let t0 = Instant::now();
    let train_set = load(
        DatasetKind::Mnist,
        Split::Train,
        env_or("PRUNEC_TEST_BATCH", 64),
        Some(LENET5_SEED),
    );
    let test_set = load(DatasetKind::Mnist, Split::Test, 1000, None);
    let mut model = ModelSpec::lenet5()
        .build(LENET5_SEED, &Device::Cpu)
        .or_panic();
    let epochs = env_or("PRUNEC_TEST_EPOCHS", 3);
    let cfg = TrainConfig::new(
        epochs,
        OptimizerSpec::sgd(env_or("PRUNEC_TEST_LR", 0.05), 0.9, 1e-4),
    )
    .schedule(LrSchedule::Cosine { min_lr: 0.0 });
    let report = train(
        &mut model,
        &train_set,
        &cfg,
        &prunec_runtime::Masks::new(),
        &mut NoHooks,
    )
    .or_panic();
    let m = evaluate(&model, &test_set).or_panic();
    eprintln!(
        "LeNet-5: {epochs} epochs, test accuracy {:.4}, loss {:.4}, losses {:?}, {:.1} s",
        m.accuracy,
        m.loss,
        report.epoch_losses,
        t0.elapsed().as_secs_f64()
    );
    assert!(m.accuracy >= 0.988, "test accuracy {} < 0.988", m.accuracy);
}
