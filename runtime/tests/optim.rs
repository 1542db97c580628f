//! Optimizer updates checked against their formulas on a model whose gradient is known.

mod common;

use candle_core::{Device, Tensor};
use common::OrPanic;
use prunec_runtime::optim::Optimizer;
use prunec_runtime::{Activation, Masks, Model, ModelSpec, OptimizerSpec};

/// A 1x3 linear layer; the test loss is `sum(w * c)`, so dL/dw = c (and dL/db = 0).
fn setup() -> (Model, Tensor) {
    let m = ModelSpec::mlp(&[3, 1], Activation::Identity)
        .build(0, &Device::Cpu)
        .or_panic();
    m.set_param_f32("fc1.weight", &[1.0, -2.0, 0.5]).or_panic();
    m.set_param_f32("fc1.bias", &[0.0]).or_panic();
    (
        m,
        Tensor::new(&[[0.5f32, 1.0, -4.0]], &Device::Cpu).unwrap(),
    )
}

fn step(opt: &mut Optimizer, m: &Model, c: &Tensor, masks: &Masks, lr: f64) {
    let w = m.param("fc1.weight").or_panic().var.as_tensor();
    let b = m.param("fc1.bias").or_panic().var.as_tensor();
    let loss = w
        .mul(c)
        .unwrap()
        .sum_all()
        .unwrap()
        .add(&b.sum_all().unwrap().affine(0.0, 0.0).unwrap())
        .unwrap();
    let grads = loss.backward().unwrap();
    opt.step(m, &grads, masks, lr).or_panic();
}

fn close(a: &[f32], b: &[f64]) {
    for (x, y) in a.iter().zip(b) {
        assert!((*x as f64 - y).abs() < 1e-5, "{a:?} vs {b:?}");
    }
}

#[test]
fn sgd_momentum_weight_decay_follows_pytorch() {
    let (m, c) = setup();
    let spec = OptimizerSpec::sgd(0.1, 0.9, 0.01);
    let mut opt = Optimizer::new(spec, &m).or_panic();
    let (g, mut w, mut buf) = ([0.5, 1.0, -4.0], [1.0f64, -2.0, 0.5], [0.0f64; 3]);
    for t in 0..3 {
        step(&mut opt, &m, &c, &Masks::new(), 0.1);
        for i in 0..3 {
            let gi = g[i] + 0.01 * w[i];
            buf[i] = if t == 0 { gi } else { 0.9 * buf[i] + gi };
            w[i] -= 0.1 * buf[i];
        }
        close(&m.param_f32("fc1.weight").or_panic(), &w);
    }
}

#[test]
fn adam_and_adamw_follow_their_formulas() {
    for decoupled in [false, true] {
        let (m, c) = setup();
        let spec = if decoupled {
            OptimizerSpec::adamw(0.01, 0.1)
        } else {
            OptimizerSpec::adam(0.01)
        };
        let mut opt = Optimizer::new(spec, &m).or_panic();
        let g = [0.5, 1.0, -4.0];
        let (mut w, mut mo, mut v) = ([1.0f64, -2.0, 0.5], [0.0f64; 3], [0.0f64; 3]);
        for t in 1..=3 {
            step(&mut opt, &m, &c, &Masks::new(), 0.01);
            for i in 0..3 {
                if decoupled {
                    w[i] *= 1.0 - 0.01 * 0.1;
                }
                mo[i] = 0.9 * mo[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                let mh = mo[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.999f64.powi(t));
                w[i] -= 0.01 * mh / (vh.sqrt() + 1e-8);
            }
            close(&m.param_f32("fc1.weight").or_panic(), &w);
        }
    }
}

#[test]
fn a_mask_freezes_pruned_entries_and_their_state() {
    let (m, c) = setup();
    let mut masks = Masks::new();
    masks.insert_u8(&m, "fc1.weight", &[1, 0, 1]).or_panic();
    let mut opt = Optimizer::new(OptimizerSpec::sgd(0.1, 0.9, 0.0), &m).or_panic();
    // Dense steps build momentum for entry 1; then masking must stop it at once.
    for _ in 0..3 {
        step(&mut opt, &m, &c, &Masks::new(), 0.1);
    }
    masks.apply(&m).or_panic();
    for _ in 0..3 {
        step(&mut opt, &m, &c, &masks, 0.1);
        assert_eq!(m.param_f32("fc1.weight").or_panic()[1].to_bits(), 0);
    }
    // Unmasking again: the pruned entry restarts from zero momentum (moves by lr * g only).
    step(&mut opt, &m, &c, &Masks::new(), 0.1);
    assert!((m.param_f32("fc1.weight").or_panic()[1] + 0.1).abs() < 1e-6);
}
