//! A native training step for the fully connected classifiers (input
//! normalisation, flatten, linear layers, elementwise activations): forward,
//! cross-entropy, backward and the optimizer update on buffers allocated
//! once, with every matrix product on [`crate::gemm`] (one summation order,
//! the same bits on any x86-64 machine) and every other reduction in a
//! fixed sequential order. `train_masked` uses it on CPU for the
//! architectures it covers and keeps the candle model in step wherever a
//! hook can look; candle's autograd stays the path for everything else and
//! the reference in tests.

use candle_core::Tensor;

use crate::error::{CandleContext, Result};
use crate::gemm::{gemm, Mat};
use crate::masks::Masks;
use crate::model::{Activation, Layer, Model};
use crate::optim::OptimizerSpec;

/// One layer as the native step runs it.
#[derive(Debug, Clone)]
enum Op {
    /// `x * (1 / std) + (-mean / std)`, as candle's `affine`.
    Normalize {
        mul: f32,
        add: f32,
    },
    /// Parameters `w` (`[outputs, inputs]`) and `b` (`[outputs]`) by index.
    Linear {
        w: usize,
        b: usize,
        inputs: usize,
        outputs: usize,
    },
    Act(Activation),
}

/// The trainer's state: parameters, their gradients and optimizer moments
/// (model order), masks, and one activation buffer per layer boundary.
pub(crate) struct Native {
    ops: Vec<Op>,
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    w: Vec<Vec<f32>>,
    g: Vec<Vec<f32>>,
    first: Vec<Vec<f32>>,
    second: Vec<Vec<f32>>,
    /// 1 kept, 0 pruned; `None` dense.
    masks: Vec<Option<Vec<f32>>>,
    /// `acts[i]`: the input of op `i`; the last one holds the logits.
    acts: Vec<Vec<f32>>,
    /// Widths of `acts` per sample.
    widths: Vec<usize>,
    /// Gradient buffers for the backward pass (two, swapped per op).
    d: [Vec<f32>; 2],
    spec: OptimizerSpec,
    steps: usize,
    batch: usize,
}

impl Native {
    /// The native trainer of `model`, or `None` where it does not cover the
    /// architecture (convolutions, pooling, GELU) or the model is not on CPU.
    pub(crate) fn new(model: &Model, masks: &Masks, spec: &OptimizerSpec) -> Result<Option<Self>> {
        if !model.device().is_cpu() {
            return Ok(None);
        }
        let index = |name: &str| model.params().iter().position(|p| p.name == name);
        let mut ops = Vec::new();
        let mut width: usize = model.architecture().input_shape().iter().product();
        let mut widths = vec![width];
        for layer in model.layers() {
            let op = match layer {
                Layer::Normalize { mean, std } => Op::Normalize {
                    mul: (1.0 / std) as f32,
                    add: (-mean / std) as f32,
                },
                Layer::Flatten => continue,
                Layer::Linear {
                    name,
                    inputs,
                    outputs,
                } => {
                    let (Some(w), Some(b)) = (
                        index(&format!("{name}.weight")),
                        index(&format!("{name}.bias")),
                    ) else {
                        return Ok(None);
                    };
                    if *inputs != width {
                        return Ok(None);
                    }
                    width = *outputs;
                    Op::Linear {
                        w,
                        b,
                        inputs: *inputs,
                        outputs: *outputs,
                    }
                }
                Layer::Act(
                    a @ (Activation::Relu
                    | Activation::Tanh
                    | Activation::Sigmoid
                    | Activation::Identity),
                ) => Op::Act(*a),
                Layer::Act(Activation::Gelu) | Layer::Conv2d { .. } | Layer::MaxPool2d(_) => {
                    return Ok(None)
                }
            };
            ops.push(op);
            widths.push(width);
        }
        let params = model.params();
        let mut n = Native {
            ops,
            names: params.iter().map(|p| p.name.clone()).collect(),
            shapes: params.iter().map(|p| p.shape()).collect(),
            w: vec![],
            g: params.iter().map(|p| vec![0.0; p.numel()]).collect(),
            first: vec![vec![]; params.len()],
            second: vec![vec![]; params.len()],
            masks: vec![],
            acts: vec![vec![]; widths.len()],
            widths,
            d: [vec![], vec![]],
            spec: spec.clone(),
            steps: 0,
            batch: 0,
        };
        n.reload(model, masks)?;
        Ok(Some(n))
    }

    /// Reads the weights and masks again (after a hook changed them).
    pub(crate) fn reload(&mut self, model: &Model, masks: &Masks) -> Result<()> {
        self.w = self
            .names
            .iter()
            .map(|n| model.param_f32(n))
            .collect::<Result<_>>()?;
        self.masks = self
            .names
            .iter()
            .map(|n| match masks.get(n) {
                Some(m) => m
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .ctx(|| format!("reading the mask of `{n}`"))
                    .map(Some),
                None => Ok(None),
            })
            .collect::<Result<_>>()?;
        Ok(())
    }

    /// Writes the weights into the candle model.
    pub(crate) fn write_back(&self, model: &Model) -> Result<()> {
        for (name, w) in self.names.iter().zip(&self.w) {
            model.set_param_f32(name, w)?;
        }
        Ok(())
    }

    /// The gradients of the last step as tensors, in model order.
    pub(crate) fn named_grads(&self, model: &Model) -> Result<Vec<(String, Tensor)>> {
        self.names
            .iter()
            .zip(&self.g)
            .zip(&self.shapes)
            .map(|((n, g), s)| {
                let t = Tensor::from_slice(g, s.as_slice(), model.device())
                    .ctx(|| format!("gradient of `{n}`"))?;
                Ok((n.clone(), t))
            })
            .collect()
    }

    /// Forward and backward over one batch (`inputs` row-major `[b, features]`):
    /// the mean cross-entropy, with every parameter's gradient in `self.g`.
    pub(crate) fn forward_backward(&mut self, inputs: &[f32], targets: &[u32]) -> f32 {
        let b = targets.len();
        self.batch = b;
        for (a, &w) in self.acts.iter_mut().zip(&self.widths) {
            a.resize(b * w, 0.0);
        }
        self.acts[0].copy_from_slice(&inputs[..b * self.widths[0]]);
        for i in 0..self.ops.len() {
            let (head, tail) = self.acts.split_at_mut(i + 1);
            let (x, y) = (&head[i], &mut tail[0]);
            match &self.ops[i] {
                Op::Normalize { mul, add } => {
                    for (o, v) in y.iter_mut().zip(x) {
                        *o = v * mul + add;
                    }
                }
                Op::Linear {
                    w,
                    b: bias,
                    inputs,
                    outputs,
                } => {
                    let wm = Mat::new(&self.w[*w], *outputs, *inputs);
                    gemm(Mat::new(x, b, *inputs), wm.t(), y, false);
                    for row in y.chunks_mut(*outputs) {
                        for (o, bv) in row.iter_mut().zip(&self.w[*bias]) {
                            *o += bv;
                        }
                    }
                }
                Op::Act(a) => {
                    for (o, v) in y.iter_mut().zip(x) {
                        *o = act(*a, *v);
                    }
                }
            }
        }
        // Cross-entropy and its gradient with respect to the logits.
        let classes = *self.widths.last().unwrap();
        let logits = self.acts.last().unwrap();
        let d = &mut self.d[0];
        d.resize(b * classes, 0.0);
        let mut loss = 0.0f32;
        for (s, (row, drow)) in logits
            .chunks(classes)
            .zip(d.chunks_mut(classes))
            .enumerate()
        {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
            let mut sum = 0.0f32;
            for (dv, &v) in drow.iter_mut().zip(row) {
                *dv = (v - m).exp();
                sum += *dv;
            }
            let t = targets[s] as usize;
            loss += m + sum.ln() - row[t];
            for dv in drow.iter_mut() {
                *dv = *dv / sum / b as f32;
            }
            drow[t] -= 1.0 / b as f32;
        }
        loss /= b as f32;
        // Backward, last op first; `d[0]` holds the gradient of the op's output.
        for i in (0..self.ops.len()).rev() {
            let (x, y) = (&self.acts[i], &self.acts[i + 1]);
            let first_param = self.ops[..i]
                .iter()
                .all(|o| !matches!(o, Op::Linear { .. }));
            match &self.ops[i] {
                Op::Normalize { .. } => break,
                Op::Linear {
                    w,
                    b: bias,
                    inputs,
                    outputs,
                } => {
                    let dy = Mat::new(&self.d[0], b, *outputs);
                    gemm(dy.t(), Mat::new(x, b, *inputs), &mut self.g[*w], false);
                    let gb = &mut self.g[*bias];
                    gb.fill(0.0);
                    for row in self.d[0].chunks(*outputs) {
                        for (g, v) in gb.iter_mut().zip(row) {
                            *g += v;
                        }
                    }
                    if first_param {
                        break;
                    }
                    let (d0, d1) = self.d.split_at_mut(1);
                    d1[0].resize(b * inputs, 0.0);
                    let dy = Mat::new(&d0[0], b, *outputs);
                    gemm(
                        dy,
                        Mat::new(&self.w[*w], *outputs, *inputs),
                        &mut d1[0],
                        false,
                    );
                    self.d.swap(0, 1);
                }
                Op::Act(a) => {
                    for ((dv, &xv), &yv) in self.d[0].iter_mut().zip(x).zip(y) {
                        *dv *= act_grad(*a, xv, yv);
                    }
                }
            }
        }
        loss
    }

    /// The optimizer step on the gradients of the last batch, masks applied
    /// to gradients, moments and weights (as `Optimizer::step`).
    pub(crate) fn update(&mut self, lr: f64) {
        self.steps += 1;
        let t = self.steps as i32;
        for i in 0..self.w.len() {
            let (w, g) = (&mut self.w[i], &mut self.g[i]);
            if let Some(m) = &self.masks[i] {
                for (gv, mv) in g.iter_mut().zip(m) {
                    *gv *= mv;
                }
            }
            match self.spec {
                OptimizerSpec::Sgd {
                    momentum,
                    weight_decay,
                    nesterov,
                    ..
                } => {
                    let (wd, mo, lr) = (weight_decay as f32, momentum as f32, lr as f32);
                    if weight_decay > 0.0 {
                        for (gv, wv) in g.iter_mut().zip(w.iter()) {
                            *gv += wv * wd;
                        }
                    }
                    if momentum > 0.0 {
                        let buf = &mut self.first[i];
                        if buf.is_empty() {
                            buf.clone_from(g);
                        } else {
                            for (bv, gv) in buf.iter_mut().zip(g.iter()) {
                                *bv = *bv * mo + gv;
                            }
                        }
                        for ((wv, gv), bv) in w.iter_mut().zip(g.iter()).zip(buf.iter()) {
                            let d = if nesterov { gv + bv * mo } else { *bv };
                            *wv -= d * lr;
                        }
                    } else {
                        for (wv, gv) in w.iter_mut().zip(g.iter()) {
                            *wv -= gv * lr;
                        }
                    }
                }
                OptimizerSpec::Adam {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    ..
                }
                | OptimizerSpec::AdamW {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    ..
                } => {
                    let decoupled = matches!(self.spec, OptimizerSpec::AdamW { .. });
                    if weight_decay > 0.0 {
                        if decoupled {
                            let f = (1.0 - lr * weight_decay) as f32;
                            for wv in w.iter_mut() {
                                *wv *= f;
                            }
                        } else {
                            let wd = weight_decay as f32;
                            for (gv, wv) in g.iter_mut().zip(w.iter()) {
                                *gv += wv * wd;
                            }
                        }
                    }
                    let (m1, m2) = (&mut self.first[i], &mut self.second[i]);
                    let fresh = m1.is_empty();
                    m1.resize(g.len(), 0.0);
                    m2.resize(g.len(), 0.0);
                    let (b1, b2) = (beta1 as f32, beta2 as f32);
                    let (c1, c2) = ((1.0 - beta1) as f32, (1.0 - beta2) as f32);
                    let inv_bc2 = (1.0 / (1.0 - beta2.powi(t))) as f32;
                    let step = (lr / (1.0 - beta1.powi(t))) as f32;
                    let eps = eps as f32;
                    for (((wv, gv), mv), vv) in w
                        .iter_mut()
                        .zip(g.iter())
                        .zip(m1.iter_mut())
                        .zip(m2.iter_mut())
                    {
                        let g2 = gv * gv;
                        if fresh {
                            *mv = gv * c1;
                            *vv = g2 * c2;
                        } else {
                            *mv = *mv * b1 + gv * c1;
                            *vv = *vv * b2 + g2 * c2;
                        }
                        *wv -= (*mv * step) / ((*vv * inv_bc2).sqrt() + eps);
                    }
                }
            }
            if let Some(m) = &self.masks[i] {
                for state in [&mut self.first[i], &mut self.second[i]] {
                    for (v, mv) in state.iter_mut().zip(m) {
                        *v = *v * mv + 0.0;
                    }
                }
                for (v, mv) in self.w[i].iter_mut().zip(m) {
                    *v = *v * mv + 0.0;
                }
            }
        }
    }
}

/// A batch's inputs (row-major) and targets as plain values.
pub(crate) fn batch_values(batch: &crate::data::Batch) -> Result<(Vec<f32>, Vec<u32>)> {
    let x = batch
        .inputs
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .ctx(|| "reading a batch".to_string())?;
    let t = batch
        .targets
        .to_vec1::<u32>()
        .ctx(|| "reading a batch's targets".to_string())?;
    Ok((x, t))
}

fn act(a: Activation, x: f32) -> f32 {
    match a {
        Activation::Relu => x.max(0.0),
        Activation::Tanh => x.tanh(),
        Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        Activation::Gelu | Activation::Identity => x,
    }
}

/// `d act / d x` at input `x` with output `y`.
fn act_grad(a: Activation, x: f32, y: f32) -> f32 {
    match a {
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Tanh => 1.0 - y * y,
        Activation::Sigmoid => y * (1.0 - y),
        Activation::Gelu | Activation::Identity => 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelSpec;
    use crate::optim::Optimizer;
    use candle_core::Device;

    fn batch(b: usize, features: usize, classes: u32, seed: u32) -> (Vec<f32>, Vec<u32>) {
        let x = (0..b * features)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 1000.0)
            .collect();
        let t = (0..b as u32).map(|i| (i * 7 + seed) % classes).collect();
        (x, t)
    }

    /// The native step agrees with candle's autograd and optimizer (to
    /// rounding): loss, gradients and the weights after a few masked steps.
    #[test]
    fn native_steps_match_candle_autograd() {
        for (act, spec) in [
            (Activation::Relu, OptimizerSpec::sgd(0.1, 0.9, 1e-4)),
            (Activation::Tanh, OptimizerSpec::adam(1e-2)),
            (Activation::Sigmoid, OptimizerSpec::adamw(1e-2, 0.05)),
        ] {
            let dev = Device::Cpu;
            let model = ModelSpec::mlp(&[20, 16, 12, 5], act)
                .build(3, &dev)
                .unwrap();
            let reference = ModelSpec::mlp(&[20, 16, 12, 5], act)
                .build(3, &dev)
                .unwrap();
            let mut masks = Masks::new();
            let keep: Vec<u8> = (0..16 * 20).map(|i| (i % 3 != 0) as u8).collect();
            masks.insert_u8(&model, "fc1.weight", &keep).unwrap();
            masks.apply(&model).unwrap();
            masks.apply(&reference).unwrap();
            let mut native = Native::new(&model, &masks, &spec).unwrap().unwrap();
            let mut opt = Optimizer::new(spec.clone(), &reference).unwrap();
            for step in 0..4 {
                let (x, t) = batch(9, 20, 5, step);
                let loss = native.forward_backward(&x, &t);
                let inputs = Tensor::from_vec(x.clone(), (9, 20), &dev).unwrap();
                let targets = Tensor::from_vec(t.clone(), 9, &dev).unwrap();
                let b = crate::data::Batch { inputs, targets };
                let l = crate::train::batch_loss(&reference, &b).unwrap();
                let want = l.to_scalar::<f32>().unwrap();
                assert!((loss - want).abs() < 1e-5, "loss {loss} vs {want}");
                let grads = l.backward().unwrap();
                for (i, p) in reference.params().iter().enumerate() {
                    let g: Vec<f32> = grads
                        .get(p.var.as_tensor())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let diff = g
                        .iter()
                        .zip(&native.g[i])
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0f32, f32::max);
                    assert!(
                        diff < 1e-5,
                        "{act:?} step {step}: gradient of {} off by {diff}",
                        p.name
                    );
                }
                native.update(0.1);
                opt.step(&reference, &grads, &masks, 0.1).unwrap();
            }
            native.write_back(&model).unwrap();
            for p in reference.params() {
                let a = model.param_f32(&p.name).unwrap();
                let b = reference.param_f32(&p.name).unwrap();
                let diff = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    diff < 1e-4,
                    "{act:?}: `{}` off by {diff} after 4 steps",
                    p.name
                );
                if p.name == "fc1.weight" {
                    assert!(a.iter().zip(&keep).all(|(v, k)| *k == 1 || *v == 0.0));
                }
            }
        }
    }
}
