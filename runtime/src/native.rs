//! A native training step for the built-in classifiers (input
//! normalisation, stride-1 convolutions, max-pooling, flatten, linear
//! layers, elementwise activations): forward, cross-entropy, backward and
//! the optimizer update on buffers allocated once, with every matrix product on [`crate::gemm`] (one summation order,
//! the same bits on any x86-64 machine) and every other reduction in a
//! fixed sequential order. `train_masked` uses it on CPU for the
//! architectures it covers and keeps the candle model in step wherever a
//! hook can look; candle's autograd stays the path for everything else and
//! the reference in tests.
//!
//! Images flow through the convolutional part channel-major, `[c][b][h][w]`
//! (all samples' positions of a channel side by side), so a convolution is
//! one product over the whole batch and writes that layout directly; the
//! input is transposed into it and `flatten` transposes back to `[b][c*h*w]`.

use candle_core::Tensor;
use rayon::prelude::*;

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
    /// `[b][c][hw]` to `[c][b][hw]` (the input of a convolutional model).
    ToChannels {
        c: usize,
        hw: usize,
    },
    /// `[c][b][hw]` to `[b][c * hw]` (`flatten` after the convolutions).
    ToRows {
        c: usize,
        hw: usize,
    },
    /// A stride-1 convolution of `[c][b][h][w]` into `[o][b][oh][ow]`, as im2col
    /// (`cols`, kept for the backward pass) and one product.
    Conv {
        w: usize,
        b: usize,
        o: usize,
        shape: ConvShape,
        cols: usize,
    },
    /// `k x k` max-pooling with stride `k` of `[c][b][h][w]`; the argmax of each
    /// window (the first maximum, as PyTorch) is kept in `argmax`.
    Pool {
        planes: usize,
        h: usize,
        wd: usize,
        k: usize,
        argmax: usize,
    },
}

/// One soft-masked parameter of the next step: `t²` per group of `group`
/// consecutive weights (one group for a whole tensor), and `tau`.
#[derive(Debug, Clone)]
struct SoftParam {
    index: usize,
    t2: Vec<f32>,
    group: usize,
    tau: f32,
}

/// Where the layers are: per-sample features, or channel-major images.
#[derive(Clone, Copy)]
enum Shape {
    Flat(usize),
    Image(usize, usize, usize),
}

impl Shape {
    fn size(self) -> usize {
        match self {
            Shape::Flat(n) => n,
            Shape::Image(c, h, w) => c * h * w,
        }
    }
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
    /// im2col columns of each convolution, argmax indices of each pooling,
    /// and the columns' gradient.
    cols: Vec<Vec<f32>>,
    argmax: Vec<Vec<u32>>,
    /// The convolutions' weight gradient (transposed) and columns' gradient.
    scratch: [Vec<f32>; 2],
    spec: OptimizerSpec,
    steps: usize,
    /// Soft masks of the next step (PDP).
    soft: Vec<SoftParam>,
}

impl Native {
    /// The native trainer of `model`, or `None` where it does not cover the
    /// architecture (convolutions, pooling, GELU) or the model is not on CPU.
    pub(crate) fn new(model: &Model, masks: &Masks, spec: &OptimizerSpec) -> Result<Option<Self>> {
        // An ONNX graph runs through candle's autograd.
        if !model.device().is_cpu() || model.onnx_graph().is_some() {
            return Ok(None);
        }
        let index = |name: &str| model.params().iter().position(|p| p.name == name);
        let mut ops = Vec::new();
        let input = model.architecture().input_shape();
        let mut shape = match input[..] {
            [c, h, w] => Shape::Image(c, h, w),
            _ => Shape::Flat(input.iter().product()),
        };
        let mut widths = vec![shape.size()];
        let (mut n_cols, mut n_argmax) = (0, 0);
        if let Shape::Image(c, h, w) = shape {
            ops.push(Op::ToChannels { c, hw: h * w });
            widths.push(shape.size());
        }
        for layer in model.layers() {
            let op = match (layer, shape) {
                (Layer::Normalize { mean, std }, _) => Op::Normalize {
                    mul: (1.0 / std) as f32,
                    add: (-mean / std) as f32,
                },
                (Layer::Flatten, Shape::Flat(_)) => continue,
                (Layer::Flatten, Shape::Image(c, h, w)) => {
                    shape = Shape::Flat(c * h * w);
                    Op::ToRows { c, hw: h * w }
                }
                (
                    Layer::Linear {
                        name,
                        inputs,
                        outputs,
                    },
                    Shape::Flat(width),
                ) => {
                    let (Some(w), Some(b)) = (
                        index(&format!("{name}.weight")),
                        index(&format!("{name}.bias")),
                    ) else {
                        return Ok(None);
                    };
                    if *inputs != width {
                        return Ok(None);
                    }
                    shape = Shape::Flat(*outputs);
                    Op::Linear {
                        w,
                        b,
                        inputs: *inputs,
                        outputs: *outputs,
                    }
                }
                (
                    Layer::Conv2d {
                        name,
                        in_channels,
                        out_channels,
                        kernel,
                        padding,
                    },
                    Shape::Image(c, h, wd),
                ) => {
                    let (Some(w), Some(b)) = (
                        index(&format!("{name}.weight")),
                        index(&format!("{name}.bias")),
                    ) else {
                        return Ok(None);
                    };
                    let (k, pad) = (*kernel, *padding);
                    if *in_channels != c || h + 2 * pad < k || wd + 2 * pad < k {
                        return Ok(None);
                    }
                    shape = Shape::Image(*out_channels, h + 2 * pad - k + 1, wd + 2 * pad - k + 1);
                    n_cols += 1;
                    Op::Conv {
                        w,
                        b,
                        o: *out_channels,
                        shape: ConvShape { c, h, wd, k, pad },
                        cols: n_cols - 1,
                    }
                }
                (Layer::MaxPool2d(k), Shape::Image(c, h, wd)) if *k >= 1 && h >= *k && wd >= *k => {
                    shape = Shape::Image(c, h / k, wd / k);
                    n_argmax += 1;
                    Op::Pool {
                        planes: c,
                        h,
                        wd,
                        k: *k,
                        argmax: n_argmax - 1,
                    }
                }
                (
                    Layer::Act(
                        a @ (Activation::Relu
                        | Activation::Tanh
                        | Activation::Sigmoid
                        | Activation::Identity),
                    ),
                    _,
                ) => Op::Act(*a),
                _ => return Ok(None),
            };
            ops.push(op);
            widths.push(shape.size());
        }
        if !matches!(shape, Shape::Flat(_)) {
            return Ok(None);
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
            cols: vec![vec![]; n_cols],
            argmax: vec![vec![]; n_argmax],
            scratch: [vec![], vec![]],
            spec: spec.clone(),
            steps: 0,
            soft: Vec::new(),
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

    /// The gradient of parameter `name` from the last step.
    pub(crate) fn grad_of(&self, name: &str) -> Option<&[f32]> {
        let i = self.names.iter().position(|n| n == name)?;
        let len = self.shapes[i].iter().product();
        self.g[i].get(..len)
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
    ///
    /// Elementwise passes run in parallel over fixed chunks, each value
    /// computed alone, so the bits do not depend on the thread count.
    /// Gradient buffers only grow: each op writes the whole prefix it uses.
    pub(crate) fn forward_backward(&mut self, inputs: &[f32], targets: &[u32]) -> f32 {
        self.forward_backward_with(inputs, targets, None)
    }

    /// [`Self::forward_backward`] with a distillation term: `teacher` holds
    /// the teacher's logits `[b, classes]`, temperature `T` and weight `a`;
    /// the loss is `(1 - a) CE + a T² KL(softmax(t/T) ‖ softmax(z/T))`, whose
    /// gradient in the logits is `(1 - a)(p - y) + a T (p_T - q_T)`.
    pub(crate) fn forward_backward_with(
        &mut self,
        inputs: &[f32],
        targets: &[u32],
        teacher: Option<(&[f32], f32, f32)>,
    ) -> f32 {
        let soft = std::mem::take(&mut self.soft);
        // Soft masks: the forward sees w · m(w); the gradient of the raw
        // weight is the masked weight's times dm-chain `m + 2 w² m (1 - m) / tau`.
        let mut saved = Vec::with_capacity(soft.len());
        for sp in &soft {
            let (i, tau) = (sp.index, sp.tau);
            let raw = self.w[i].clone();
            let mut factor = vec![0.0f32; raw.len()];
            for (j, ((w, f), &r)) in self.w[i]
                .iter_mut()
                .zip(&mut factor)
                .zip(raw.iter())
                .enumerate()
            {
                let t = sp.t2[j / sp.group];
                let z = (r * r - t) / tau;
                let m = if z >= 0.0 {
                    1.0 / (1.0 + (-z).exp())
                } else {
                    let e = z.exp();
                    e / (1.0 + e)
                };
                *w = r * m;
                *f = m + 2.0 * r * r * m * (1.0 - m) / tau;
            }
            saved.push((i, raw, factor));
        }
        let loss = self.forward_backward_inner(inputs, targets, teacher);
        for (i, raw, factor) in saved {
            for (g, f) in self.g[i].iter_mut().zip(&factor) {
                *g *= f;
            }
            self.w[i] = raw;
        }
        loss
    }

    /// The class each of the last forward pass's `b` samples was given (the
    /// first largest logit).
    pub(crate) fn last_predictions(&self, b: usize) -> Vec<u32> {
        let classes = *self.widths.last().unwrap();
        self.acts.last().unwrap()[..b * classes]
            .chunks(classes)
            .map(|row| {
                let mut best = 0;
                for (c, &v) in row.iter().enumerate() {
                    if v > row[best] {
                        best = c;
                    }
                }
                best as u32
            })
            .collect()
    }

    /// Soft-mask thresholds for the next step from the current raw weights.
    pub(crate) fn set_soft(&mut self, soft: &crate::train::SoftMask) -> Result<()> {
        use crate::train::SoftScope;
        let idx: Vec<usize> = soft
            .params
            .iter()
            .map(|n| {
                self.names.iter().position(|m| m == n).ok_or_else(|| {
                    crate::error::RuntimeError::InvalidConfig(format!(
                        "no parameter `{n}` to soft-mask"
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let keep = |len: usize| ((len as f64) * (1.0 - soft.sparsity)).round() as usize;
        // Halfway between the k-th and (k+1)-th largest of `v` (squared weights).
        let threshold = |v: &mut [f32], k: usize| -> f32 {
            if k == 0 {
                return v.iter().fold(0.0f32, |a, &x| a.max(x)) * 2.0 + f32::MIN_POSITIVE;
            }
            if k >= v.len() {
                return 0.0;
            }
            let (_, kth, rest) = v.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            let kth = *kth;
            let next = rest.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
            (kth + next) / 2.0
        };
        let tau = soft.tau as f32;
        let sq = |w: &[f32]| -> Vec<f32> { w.iter().map(|x| x * x).collect() };
        let whole = |i: usize, t: f32, len: usize| SoftParam {
            index: i,
            t2: vec![t],
            group: len.max(1),
            tau,
        };
        self.soft = match soft.scope {
            SoftScope::Global => {
                let mut all: Vec<f32> = idx.iter().flat_map(|&i| sq(&self.w[i])).collect();
                let k = keep(all.len());
                let t = threshold(&mut all, k);
                idx.iter().map(|&i| whole(i, t, self.w[i].len())).collect()
            }
            SoftScope::Layer => idx
                .iter()
                .map(|&i| {
                    let mut v = sq(&self.w[i]);
                    let k = keep(v.len());
                    whole(i, threshold(&mut v, k), v.len())
                })
                .collect(),
            SoftScope::NM { n, m } => idx
                .iter()
                .map(|&i| {
                    let mut buf = Vec::with_capacity(m);
                    let t2 = self.w[i]
                        .chunks(m)
                        .map(|g| {
                            buf.clear();
                            buf.extend(g.iter().map(|x| x * x));
                            threshold(&mut buf, n)
                        })
                        .collect();
                    SoftParam {
                        index: i,
                        t2,
                        group: m,
                        tau,
                    }
                })
                .collect(),
        };
        Ok(())
    }

    fn forward_backward_inner(
        &mut self,
        inputs: &[f32],
        targets: &[u32],
        teacher: Option<(&[f32], f32, f32)>,
    ) -> f32 {
        let b = targets.len();
        for (a, &w) in self.acts.iter_mut().zip(&self.widths) {
            a.resize(b * w, 0.0);
        }
        self.acts[0].copy_from_slice(&inputs[..b * self.widths[0]]);
        for i in 0..self.ops.len() {
            let (head, tail) = self.acts.split_at_mut(i + 1);
            let (x, y) = (&head[i], &mut tail[0]);
            match &self.ops[i] {
                Op::Normalize { mul, add } => {
                    let (mul, add) = (*mul, *add);
                    map2(y, x, move |v| v * mul + add);
                }
                Op::Linear {
                    w,
                    b: bias,
                    inputs,
                    outputs,
                } => {
                    let wm = Mat::new(&self.w[*w], *outputs, *inputs);
                    gemm(Mat::new(x, b, *inputs), wm.t(), y, false);
                    let bias = &self.w[*bias];
                    let add = |rows: &mut [f32]| {
                        for row in rows.chunks_mut(bias.len()) {
                            for (o, bv) in row.iter_mut().zip(bias) {
                                *o += bv;
                            }
                        }
                    };
                    if y.len() >= PARALLEL {
                        y.par_chunks_mut(*outputs * ROWS_PER_TASK).for_each(add);
                    } else {
                        add(y);
                    }
                }
                Op::Act(a) => {
                    let a = *a;
                    map2(y, x, move |v| act(a, v));
                }
                Op::ToChannels { c, hw } => transpose_planes(x, y, b, *c, *hw),
                Op::ToRows { c, hw } => transpose_planes(x, y, *c, b, *hw),
                Op::Conv {
                    w,
                    b: bias,
                    o,
                    shape,
                    cols,
                } => {
                    let geo = Geometry::new(b, *shape);
                    let col = &mut self.cols[*cols];
                    col.resize(geo.rows() * geo.n(), 0.0);
                    geo.im2col(x, col);
                    let wm = Mat::new(&self.w[*w], *o, geo.rows());
                    gemm(wm, Mat::new(col, geo.rows(), geo.n()), y, false);
                    y.par_chunks_mut(geo.n())
                        .zip(&self.w[*bias])
                        .for_each(|(row, bv)| {
                            for v in row {
                                *v += bv;
                            }
                        });
                }
                Op::Pool {
                    planes,
                    h,
                    wd,
                    k,
                    argmax,
                } => {
                    let am = &mut self.argmax[*argmax];
                    max_pool(x, y, am, planes * b, *h, *wd, *k);
                }
            }
        }
        // Cross-entropy and its gradient with respect to the logits.
        let classes = *self.widths.last().unwrap();
        let logits = self.acts.last().unwrap();
        let d = grow(&mut self.d[0], b * classes);
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
            let ce = m + sum.ln() - row[t];
            for dv in drow.iter_mut() {
                *dv = *dv / sum / b as f32;
            }
            drow[t] -= 1.0 / b as f32;
            let Some((tl, temp, a)) = teacher else {
                loss += ce;
                continue;
            };
            let trow = &tl[s * classes..(s + 1) * classes];
            // Tempered softmaxes of student (p) and teacher (q), max-shifted.
            let soft = |r: &[f32]| -> (Vec<f32>, f32) {
                let m = r.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v / temp));
                let e: Vec<f32> = r.iter().map(|&v| (v / temp - m).exp()).collect();
                let sum: f32 = e.iter().sum();
                (e.iter().map(|x| x / sum).collect(), m + sum.ln())
            };
            let (p, lse_p) = soft(row);
            let (q, lse_q) = soft(trow);
            let mut kl = 0.0f32;
            for c in 0..classes {
                if q[c] > 0.0 {
                    // log q - log p with log p = z/T - lse.
                    kl += q[c] * ((trow[c] / temp - lse_q) - (row[c] / temp - lse_p));
                }
            }
            loss += (1.0 - a) * ce + a * temp * temp * kl;
            for c in 0..classes {
                drow[c] = (1.0 - a) * drow[c] + a * temp * (p[c] - q[c]) / b as f32;
            }
        }
        loss /= b as f32;
        // Backward, last op first; `d[0]` holds the gradient of the op's output.
        let mut skip = false;
        for i in (0..self.ops.len()).rev() {
            if std::mem::take(&mut skip) {
                continue;
            }
            let (x, y) = (&self.acts[i], &self.acts[i + 1]);
            let first_param = self.ops[..i]
                .iter()
                .all(|o| !matches!(o, Op::Linear { .. } | Op::Conv { .. }));
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
                    for row in self.d[0][..b * outputs].chunks(*outputs) {
                        for (g, v) in gb.iter_mut().zip(row) {
                            *g += v;
                        }
                    }
                    if first_param {
                        break;
                    }
                    let (d0, d1) = self.d.split_at_mut(1);
                    let dx = grow(&mut d1[0], b * inputs);
                    let dy = Mat::new(&d0[0], b, *outputs);
                    gemm(dy, Mat::new(&self.w[*w], *outputs, *inputs), dx, false);
                    self.d.swap(0, 1);
                }
                Op::Act(a) => {
                    let a = *a;
                    let dv = &mut self.d[0][..y.len()];
                    let run = |(d, (x, y)): (&mut [f32], (&[f32], &[f32]))| {
                        for ((dv, &xv), &yv) in d.iter_mut().zip(x).zip(y) {
                            *dv *= act_grad(a, xv, yv);
                        }
                    };
                    if dv.len() >= PARALLEL {
                        dv.par_chunks_mut(CHUNK)
                            .zip(x.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
                            .for_each(run);
                    } else {
                        run((dv, (x, y)));
                    }
                }
                Op::ToChannels { .. } => break,
                Op::ToRows { c, hw } => {
                    let (d0, d1) = self.d.split_at_mut(1);
                    let len = b * c * hw;
                    transpose_planes(&d0[0][..len], grow(&mut d1[0], len), b, *c, *hw);
                    self.d.swap(0, 1);
                }
                Op::Conv {
                    w,
                    b: bias,
                    o,
                    shape,
                    cols,
                } => {
                    let geo = Geometry::new(b, *shape);
                    let (rows, n) = (geo.rows(), geo.n());
                    let dy = Mat::new(&self.d[0], *o, n);
                    // `dWᵀ = cols dYᵀ` (the same sums as `dY colsᵀ`, with
                    // the smaller operand packed), then transposed into place.
                    let col = Mat::new(&self.cols[*cols], rows, n);
                    let dwt = grow(&mut self.scratch[0], rows * o);
                    gemm(col, dy.t(), dwt, false);
                    transpose_planes(dwt, &mut self.g[*w], rows, *o, 1);
                    let gb = &mut self.g[*bias];
                    gb.par_iter_mut()
                        .zip(self.d[0].par_chunks(n))
                        .for_each(|(g, row)| *g = row.iter().fold(0.0, |acc, v| acc + v));
                    if first_param {
                        break;
                    }
                    let dcols = grow(&mut self.scratch[1], rows * n);
                    let wm = Mat::new(&self.w[*w], *o, rows);
                    gemm(wm.t(), Mat::new(&self.d[0], *o, n), dcols, false);
                    let dx = grow(&mut self.d[1], geo.c * b * geo.h * geo.wd);
                    geo.col2im(dcols, dx);
                    self.d.swap(0, 1);
                }
                Op::Pool {
                    planes,
                    h,
                    wd,
                    k,
                    argmax,
                } => {
                    let (d0, d1) = self.d.split_at_mut(1);
                    let (plane, out) = (h * wd, (h / k) * (wd / k));
                    let dx = grow(&mut d1[0], planes * b * plane);
                    // An activation right before the pooling is
                    // differentiated here too, plane by plane (the same
                    // products as its own pass, which is then skipped).
                    let before = match i.checked_sub(1).map(|j| &self.ops[j]) {
                        Some(Op::Act(a)) => Some((*a, &self.acts[i - 1])),
                        _ => None,
                    };
                    // Each input belongs to one window: zero a plane, then
                    // route each window's gradient to its first maximum.
                    dx.par_chunks_mut(plane)
                        .zip(self.argmax[*argmax].par_chunks(out))
                        .zip(d0[0].par_chunks(out))
                        .enumerate()
                        .for_each(|(p, ((dxp, am), dy))| {
                            dxp.fill(0.0);
                            for (&at, &g) in am.iter().zip(dy) {
                                dxp[at as usize - p * plane] += g;
                            }
                            if let Some((a, ax)) = before {
                                let (ax, ay) = (
                                    &ax[p * plane..(p + 1) * plane],
                                    &x[p * plane..(p + 1) * plane],
                                );
                                for ((dv, &xv), &yv) in dxp.iter_mut().zip(ax).zip(ay) {
                                    *dv *= act_grad(a, xv, yv);
                                }
                            }
                        });
                    self.d.swap(0, 1);
                    if before.is_some() {
                        skip = true;
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

/// `y[j][i][p] = x[i][j][p]` for `i < n`, `j < m`, `p < len` (planes of `len`).
fn transpose_planes(x: &[f32], y: &mut [f32], n: usize, m: usize, len: usize) {
    let run = |(j, dst): (usize, &mut [f32])| {
        for i in 0..n {
            let src = &x[(i * m + j) * len..(i * m + j + 1) * len];
            dst[i * len..(i + 1) * len].copy_from_slice(src);
        }
    };
    let y = &mut y[..n * m * len];
    if n * m * len >= PARALLEL {
        y.par_chunks_mut((n * len).max(1)).enumerate().for_each(run);
    } else {
        y.chunks_mut((n * len).max(1)).enumerate().for_each(run);
    }
}

/// Values per task of the elementwise passes, rows per task of the bias adds.
const CHUNK: usize = 1 << 14;
/// Below this many values a pass runs on the calling thread.
const PARALLEL: usize = 1 << 16;
const ROWS_PER_TASK: usize = 32;

/// `y[i] = f(x[i])`, in parallel chunks when there are several.
fn map2(y: &mut [f32], x: &[f32], f: impl Fn(f32) -> f32 + Sync) {
    let run = |(y, x): (&mut [f32], &[f32])| {
        for (o, v) in y.iter_mut().zip(x) {
            *o = f(*v);
        }
    };
    if y.len() >= PARALLEL {
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(run);
    } else {
        run((y, x));
    }
}

/// The first `len` values of a buffer that only grows (its content is
/// whatever the last user left: every caller overwrites what it reads).
fn grow(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// A stride-1 convolution's input channels and size, kernel and padding.
#[derive(Clone, Copy, Debug)]
struct ConvShape {
    c: usize,
    h: usize,
    wd: usize,
    k: usize,
    pad: usize,
}

/// The shapes of a stride-1 convolution over a channel-major batch.
struct Geometry {
    b: usize,
    c: usize,
    h: usize,
    wd: usize,
    k: usize,
    pad: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    fn new(b: usize, shape: ConvShape) -> Self {
        let ConvShape { c, h, wd, k, pad } = shape;
        let (oh, ow) = (h + 2 * pad - k + 1, wd + 2 * pad - k + 1);
        Geometry {
            b,
            c,
            h,
            wd,
            k,
            pad,
            oh,
            ow,
        }
    }

    /// Rows of the im2col matrix: `(channel, ky, kx)` in the weight's order.
    fn rows(&self) -> usize {
        self.c * self.k * self.k
    }

    /// Its columns: `(sample, oy, ox)`.
    fn n(&self) -> usize {
        self.b * self.oh * self.ow
    }

    /// The input row `oy + ky - pad` (none in the padding).
    fn source(&self, o: usize, kk: usize, size: usize) -> Option<usize> {
        (o + kk).checked_sub(self.pad).filter(|&v| v < size)
    }

    /// The output columns `lo..hi` whose input column `ox + kx - pad` is
    /// inside the image.
    fn columns(&self, kx: usize) -> (usize, usize) {
        let lo = self.pad.saturating_sub(kx).min(self.ow);
        let hi = (self.wd + self.pad).saturating_sub(kx).min(self.ow);
        (lo, hi.max(lo))
    }

    /// `col[(ci, ky, kx)][(s, oy, ox)] = x[ci][s][oy + ky - pad][ox + kx - pad]`.
    fn im2col(&self, x: &[f32], col: &mut [f32]) {
        let n = self.n();
        col.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
            let (ci, ky, kx) = (r / (self.k * self.k), r / self.k % self.k, r % self.k);
            let (lo, hi) = self.columns(kx);
            for s in 0..self.b {
                let plane = &x[(ci * self.b + s) * self.h * self.wd..][..self.h * self.wd];
                for oy in 0..self.oh {
                    let dst = &mut row[(s * self.oh + oy) * self.ow..][..self.ow];
                    let Some(iy) = self.source(oy, ky, self.h) else {
                        dst.fill(0.0);
                        continue;
                    };
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    if lo < hi {
                        let from = iy * self.wd + lo + kx - self.pad;
                        dst[lo..hi].copy_from_slice(&plane[from..from + hi - lo]);
                    }
                }
            }
        });
    }

    /// The adjoint of `im2col` (overwriting `dx`): adds each column entry
    /// back onto its input position, rows in order, so the sums have one order.
    fn col2im(&self, col: &[f32], dx: &mut [f32]) {
        let (n, kk) = (self.n(), self.k * self.k);
        // One task per input channel: its rows only add onto its own planes.
        let per_channel = self.b * self.h * self.wd;
        dx.par_chunks_mut(per_channel)
            .enumerate()
            .for_each(|(ci, planes)| {
                planes.fill(0.0);
                for r in ci * kk..(ci + 1) * kk {
                    let row = &col[r * n..(r + 1) * n];
                    let (ky, kx) = (r / self.k % self.k, r % self.k);
                    let (lo, hi) = self.columns(kx);
                    if lo >= hi {
                        continue;
                    }
                    for s in 0..self.b {
                        let plane = &mut planes[s * self.h * self.wd..][..self.h * self.wd];
                        for oy in 0..self.oh {
                            let Some(iy) = self.source(oy, ky, self.h) else {
                                continue;
                            };
                            let src = &row[(s * self.oh + oy) * self.ow..][..self.ow];
                            let to = iy * self.wd + lo + kx - self.pad;
                            for (d, v) in plane[to..to + hi - lo].iter_mut().zip(&src[lo..hi]) {
                                *d += v;
                            }
                        }
                    }
                }
            });
    }
}

/// `k x k` max-pooling with stride `k` of `planes` planes of `h x wd`; the
/// index in `x` of each window's first maximum goes to `argmax`.
fn max_pool(
    x: &[f32],
    y: &mut [f32],
    argmax: &mut Vec<u32>,
    planes: usize,
    h: usize,
    wd: usize,
    k: usize,
) {
    let (oh, ow) = (h / k, wd / k);
    argmax.resize(planes * oh * ow, 0);
    y[..planes * oh * ow]
        .par_chunks_mut(oh * ow)
        .zip(argmax.par_chunks_mut(oh * ow))
        .enumerate()
        .for_each(|(p, (y, argmax))| {
            let base = p * h * wd;
            if k == 2 {
                // The common window, unrolled: the same comparisons in the same order.
                for oy in 0..oh {
                    let r0 = base + 2 * oy * wd;
                    let (top, bottom) = (&x[r0..r0 + wd], &x[r0 + wd..r0 + 2 * wd]);
                    let (yr, ar) = (
                        &mut y[oy * ow..(oy + 1) * ow],
                        &mut argmax[oy * ow..(oy + 1) * ow],
                    );
                    for ox in 0..ow {
                        let c = 2 * ox;
                        let (mut best, mut at) = (top[c], r0 + c);
                        if top[c + 1] > best {
                            (best, at) = (top[c + 1], r0 + c + 1);
                        }
                        if bottom[c] > best {
                            (best, at) = (bottom[c], r0 + wd + c);
                        }
                        if bottom[c + 1] > best {
                            (best, at) = (bottom[c + 1], r0 + wd + c + 1);
                        }
                        yr[ox] = best;
                        ar[ox] = at as u32;
                    }
                }
                return;
            }
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut best = base + oy * k * wd + ox * k;
                    for dy in 0..k {
                        for dx in 0..k {
                            let at = base + (oy * k + dy) * wd + ox * k + dx;
                            if x[at] > x[best] {
                                best = at;
                            }
                        }
                    }
                    let j = oy * ow + ox;
                    y[j] = x[best];
                    argmax[j] = best as u32;
                }
            }
        });
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

    /// Central differences of the loss against the gradients of the last
    /// `forward_backward`, on a few weights of every parameter.
    fn check_by_differences(n: &mut Native, x: &[f32], t: &[u32]) {
        n.forward_backward(x, t);
        let grads = n.g.clone();
        for (p, g) in grads.iter().enumerate() {
            for j in [0, g.len() / 3, g.len() - 1] {
                let (w0, eps) = (n.w[p][j], 1e-2f32);
                n.w[p][j] = w0 + eps;
                let up = n.forward_backward(x, t) as f64;
                n.w[p][j] = w0 - eps;
                let down = n.forward_backward(x, t) as f64;
                n.w[p][j] = w0;
                let numeric = (up - down) / (2.0 * eps as f64);
                let analytic = g[j] as f64;
                assert!(
                    (numeric - analytic).abs() < 2e-3 + 0.02 * analytic.abs(),
                    "{}[{j}]: finite differences {numeric}, gradient {analytic}",
                    n.names[p]
                );
            }
        }
        n.forward_backward(x, t);
    }

    /// The native step agrees with candle's autograd and optimizer (to
    /// rounding): loss, gradients and the weights after a few masked steps,
    /// for fully connected and convolutional models.
    /// Training through soft masks (PDP): the raw weight's gradient is the
    /// derivative of the loss of `w · sigmoid((w² − t²)/tau)` (finite
    /// differences in f64 of the f32 loss), the raw weights are restored,
    /// and the thresholds follow the kept count of each scope.
    #[test]
    fn soft_mask_gradients_follow_the_masked_loss() {
        use crate::train::{SoftMask, SoftScope};
        let dev = Device::Cpu;
        let model = ModelSpec::mlp(&[12, 8, 4], Activation::Tanh)
            .build(5, &dev)
            .unwrap();
        let opt = OptimizerSpec::sgd(0.1, 0.0, 0.0);
        let mut n = Native::new(&model, &Masks::new(), &opt).unwrap().unwrap();
        let (x, t) = batch(6, 12, 4, 3);
        for scope in [
            SoftScope::Global,
            SoftScope::Layer,
            SoftScope::NM { n: 2, m: 4 },
        ] {
            let soft = SoftMask {
                params: vec!["fc1.weight".into(), "fc2.weight".into()],
                sparsity: 0.5,
                tau: 0.02,
                scope,
            };
            n.set_soft(&soft).unwrap();
            let fixed = n.soft.clone();
            // Half of the weights sit below their threshold in every scope.
            let below: usize = fixed
                .iter()
                .map(|sp| {
                    n.w[sp.index]
                        .iter()
                        .enumerate()
                        .filter(|(j, w)| *w * *w < sp.t2[j / sp.group])
                        .count()
                })
                .sum();
            assert_eq!(below, (8 * 12 + 4 * 8) / 2, "{scope:?}");
            let raw = n.w.clone();
            n.forward_backward(&x, &t);
            assert_eq!(n.w, raw, "raw weights restored");
            let grads = n.g.clone();
            for i in fixed.iter().map(|sp| &sp.index) {
                for j in [0, 5, 17, 31] {
                    let eps = 1e-3f32;
                    let w0 = n.w[*i][j];
                    n.w[*i][j] = w0 + eps;
                    n.soft = fixed.clone();
                    let up = n.forward_backward(&x, &t) as f64;
                    n.w[*i][j] = w0 - eps;
                    n.soft = fixed.clone();
                    let down = n.forward_backward(&x, &t) as f64;
                    n.w[*i][j] = w0;
                    let numeric = (up - down) / (2.0 * eps as f64);
                    let analytic = grads[*i][j] as f64;
                    assert!(
                        (numeric - analytic).abs() < 2e-3 + 0.03 * analytic.abs(),
                        "{scope:?} {}[{j}]: finite differences {numeric}, gradient {analytic}",
                        n.names[*i]
                    );
                }
            }
        }
    }

    /// The distillation loss and its gradient match candle's autograd of
    /// `train::distill_loss`, at several temperatures and weights.
    #[test]
    fn native_distillation_matches_candle_autograd() {
        let dev = Device::Cpu;
        let spec = || ModelSpec::mlp(&[20, 16, 5], Activation::Relu);
        for (temp, a) in [(1.0f32, 0.5f32), (4.0, 0.9), (2.0, 1.0), (3.0, 0.0)] {
            let model = spec().build(3, &dev).unwrap();
            let reference = spec().build(3, &dev).unwrap();
            let opt = OptimizerSpec::sgd(0.1, 0.0, 0.0);
            let mut native = Native::new(&model, &Masks::new(), &opt).unwrap().unwrap();
            let (x, t) = batch(7, 20, 5, 1);
            let (teacher, _) = batch(7, 5, 5, 2);
            let teacher: Vec<f32> = teacher.iter().map(|v| v * 3.0).collect();
            let loss = native.forward_backward_with(&x, &t, Some((&teacher, temp, a)));
            let inputs = Tensor::from_vec(x.clone(), (7, 20), &dev).unwrap();
            let targets = Tensor::from_vec(t.clone(), 7, &dev).unwrap();
            let tl = Tensor::from_vec(teacher.clone(), (7, 5), &dev).unwrap();
            let logits = reference.forward(&inputs).unwrap();
            let l =
                crate::train::distill_loss(&logits, &targets, &tl, temp as f64, a as f64).unwrap();
            let want = l.to_scalar::<f32>().unwrap();
            assert!(
                (loss - want).abs() < 1e-5,
                "T {temp} a {a}: loss {loss} vs {want}"
            );
            let grads = l.backward().unwrap();
            for (i, p) in reference.params().iter().enumerate() {
                let g: Vec<f32> = grads
                    .get(p.var.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (j, (x, y)) in native.g[i].iter().zip(&g).enumerate() {
                    assert!(
                        (x - y).abs() < 1e-5,
                        "T {temp} a {a}: {} [{j}] {x} vs {y}",
                        p.name
                    );
                }
            }
        }
    }

    #[test]
    fn native_steps_match_candle_autograd() {
        use crate::model::Architecture;
        let lenet5 = || {
            ModelSpec::lenet5().with_architecture(Architecture::Lenet5 {
                input_shape: vec![2, 17, 15],
                classes: 5,
                activation: Activation::Tanh,
            })
        };
        for (spec_of, features, first, act, opt) in [
            (
                (|| ModelSpec::mlp(&[20, 16, 12, 5], Activation::Relu)) as fn() -> ModelSpec,
                20,
                ("fc1.weight", 16 * 20),
                "relu",
                OptimizerSpec::sgd(0.1, 0.9, 1e-4),
            ),
            (
                || ModelSpec::mlp(&[20, 16, 12, 5], Activation::Tanh),
                20,
                ("fc1.weight", 16 * 20),
                "tanh",
                OptimizerSpec::adam(1e-2),
            ),
            (
                || ModelSpec::mlp(&[20, 16, 12, 5], Activation::Sigmoid),
                20,
                ("fc1.weight", 16 * 20),
                "sigmoid",
                OptimizerSpec::adamw(1e-2, 0.05),
            ),
            (
                lenet5,
                2 * 17 * 15,
                ("conv2.weight", 16 * 6 * 25),
                "lenet5",
                OptimizerSpec::sgd(0.05, 0.9, 0.0),
            ),
        ] {
            let dev = Device::Cpu;
            let model = spec_of().build(3, &dev).unwrap();
            let reference = spec_of().build(3, &dev).unwrap();
            let input_shape = model.architecture().input_shape();
            let mut masks = Masks::new();
            let keep: Vec<u8> = (0..first.1).map(|i| (i % 3 != 0) as u8).collect();
            masks.insert_u8(&model, first.0, &keep).unwrap();
            masks.apply(&model).unwrap();
            masks.apply(&reference).unwrap();
            let mut native = Native::new(&model, &masks, &opt).unwrap().unwrap();
            let mut optim = Optimizer::new(opt.clone(), &reference).unwrap();
            // The convolutional reference parts ways after its first update
            // (see the max-pool note below): one step there.
            let steps = if act == "lenet5" { 1 } else { 4 };
            for step in 0..steps {
                let (x, t) = batch(9, features, 5, step);
                let loss = native.forward_backward(&x, &t);
                let mut dims = vec![9];
                dims.extend(&input_shape);
                let inputs = Tensor::from_vec(x.clone(), dims, &dev).unwrap();
                let targets = Tensor::from_vec(t.clone(), 9, &dev).unwrap();
                let b = crate::data::Batch { inputs, targets };
                let l = crate::train::batch_loss(&reference, &b).unwrap();
                let want = l.to_scalar::<f32>().unwrap();
                assert!((loss - want).abs() < 1e-5, "{act}: loss {loss} vs {want}");
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
                    // candle's max-pool backward scales the gradient by the
                    // window's share of maxima (a quarter for one maximum
                    // of four), PyTorch and this step pass it whole: the
                    // convolutions are checked by finite differences below.
                    if act == "lenet5" && p.name.starts_with("conv") {
                        continue;
                    }
                    assert!(
                        diff < 1e-5,
                        "{act} step {step}: gradient of {} off by {diff}",
                        p.name
                    );
                }
                if act == "lenet5" {
                    check_by_differences(&mut native, &x, &t);
                }
                native.update(0.1);
                optim.step(&reference, &grads, &masks, 0.1).unwrap();
            }
            native.write_back(&model).unwrap();
            if act == "lenet5" {
                continue;
            }
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
