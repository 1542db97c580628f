//! The ONNX ops prunec runs: each node's attributes read and checked once at load, its
//! output shape, and its forward on candle tensors (NCHW, f32).

use std::collections::HashMap;

use candle_core::Tensor;

use super::proto::{AttributeProto, NodeProto};
use crate::error::{CandleContext, Result};

/// The op types [`Op::parse`] accepts, for messages.
pub const SUPPORTED: &str = "Conv, Gemm, MatMul, Add, Sub, Mul, Div, Relu, Sigmoid, Tanh, \
MaxPool, AveragePool, GlobalAveragePool, BatchNormalization, Flatten, Reshape, Transpose, \
Softmax, Identity, Dropout, Constant";

/// One node's operation with its attributes.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// 2-D convolution, group 1: `[n, c, h, w] * [m, c, kh, kw] (+ [m])`.
    Conv {
        kernel: [usize; 2],
        /// Top, left, bottom, right.
        pads: [usize; 4],
        stride: usize,
        dilation: usize,
    },
    /// `alpha * A @ op(B) + beta * C`, `op` a transpose when `trans_b`.
    Gemm {
        alpha: f64,
        beta: f64,
        trans_b: bool,
    },
    /// `A [m, k] @ B [k, n]`.
    MatMul,
    /// Elementwise with NumPy broadcasting.
    Binary(Binary),
    /// Elementwise activation.
    Unary(Unary),
    /// Max or average pooling without padding.
    Pool {
        max: bool,
        kernel: [usize; 2],
        stride: [usize; 2],
    },
    GlobalAveragePool,
    /// Inference batch normalization over dimension 1.
    BatchNorm {
        epsilon: f64,
    },
    /// `[d0.., d_axis..] -> [prod(d0..), prod(d_axis..)]`.
    Flatten {
        axis: i64,
    },
    /// To a constant shape (`0` copies the input's dimension, `-1` is inferred).
    Reshape {
        shape: Vec<i64>,
    },
    Transpose {
        perm: Vec<usize>,
    },
    Softmax {
        axis: i64,
    },
    /// Identity, and Dropout at inference.
    Identity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unary {
    Relu,
    Sigmoid,
    Tanh,
}

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn int(node: &NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name).map_or(default, |a| a.i)
}

fn float(node: &NodeProto, name: &str, default: f32) -> f64 {
    f64::from(attr(node, name).map_or(default, |a| a.f))
}

fn ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(node, name).map(|a| a.ints.clone())
}

/// Two non-negative values from an attribute (`kernel_shape`, `strides`, ...).
fn pair(
    node: &NodeProto,
    name: &str,
    default: [usize; 2],
) -> std::result::Result<[usize; 2], String> {
    match ints(node, name) {
        None => Ok(default),
        Some(v) => match v[..] {
            [a, b] if a >= 0 && b >= 0 => Ok([a as usize, b as usize]),
            _ => Err(format!(
                "`{name}` = {v:?} is not two sizes (prunec runs 2-D ops)"
            )),
        },
    }
}

fn pads(node: &NodeProto) -> std::result::Result<[usize; 4], String> {
    match ints(node, "pads") {
        None => Ok([0; 4]),
        Some(v) => match v[..] {
            [a, b, c, d] if v.iter().all(|x| *x >= 0) => {
                Ok([a as usize, b as usize, c as usize, d as usize])
            }
            _ => Err(format!(
                "`pads` = {v:?} is not four sizes (prunec runs 2-D ops)"
            )),
        },
    }
}

/// `auto_pad` must leave the explicit `pads` in charge.
fn explicit_pads(node: &NodeProto) -> std::result::Result<(), String> {
    match attr(node, "auto_pad").map(|a| String::from_utf8_lossy(&a.s).into_owned()) {
        None => Ok(()),
        Some(s) if s == "NOTSET" || s.is_empty() || s == "VALID" => Ok(()),
        Some(s) => Err(format!(
            "`auto_pad = {s}` is not supported (write explicit `pads`)"
        )),
    }
}

fn require(cond: bool, what: &str) -> std::result::Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what.to_string())
    }
}

impl Op {
    /// The op of a node with its attributes checked; `Err` says what is not supported.
    /// `Constant` and the shape input of `Reshape` are resolved by the graph loader.
    pub fn parse(
        node: &NodeProto,
        reshape_to: Option<Vec<i64>>,
    ) -> std::result::Result<Op, String> {
        Ok(match node.op_type.as_str() {
            "Conv" => {
                explicit_pads(node)?;
                require(
                    int(node, "group", 1) == 1,
                    "`group` other than 1 is not supported",
                )?;
                let s = pair(node, "strides", [1, 1])?;
                let d = pair(node, "dilations", [1, 1])?;
                require(
                    s[0] == s[1] && s[0] > 0 && d[0] == d[1] && d[0] > 0,
                    "strides and dilations must be equal along height and width",
                )?;
                let kernel = pair(node, "kernel_shape", [0, 0])?;
                Op::Conv {
                    kernel,
                    pads: if attr(node, "auto_pad").is_some_and(|a| a.s == b"VALID") {
                        [0; 4]
                    } else {
                        pads(node)?
                    },
                    stride: s[0],
                    dilation: d[0],
                }
            }
            "Gemm" => {
                require(
                    int(node, "transA", 0) == 0,
                    "`transA = 1` is not supported (the batch is the first dimension of A)",
                )?;
                Op::Gemm {
                    alpha: float(node, "alpha", 1.0),
                    beta: float(node, "beta", 1.0),
                    trans_b: int(node, "transB", 0) != 0,
                }
            }
            "MatMul" => Op::MatMul,
            "Add" => Op::Binary(Binary::Add),
            "Sub" => Op::Binary(Binary::Sub),
            "Mul" => Op::Binary(Binary::Mul),
            "Div" => Op::Binary(Binary::Div),
            "Relu" => Op::Unary(Unary::Relu),
            "Sigmoid" => Op::Unary(Unary::Sigmoid),
            "Tanh" => Op::Unary(Unary::Tanh),
            "MaxPool" | "AveragePool" => {
                let max = node.op_type == "MaxPool";
                explicit_pads(node)?;
                require(pads(node)? == [0; 4], "padding is not supported in pooling")?;
                require(
                    int(node, "ceil_mode", 0) == 0,
                    "`ceil_mode = 1` is not supported",
                )?;
                require(
                    pair(node, "dilations", [1, 1])? == [1, 1],
                    "dilated pooling is not supported",
                )?;
                require(
                    int(node, "storage_order", 0) == 0,
                    "`storage_order = 1` is not supported",
                )?;
                require(
                    node.output.iter().skip(1).all(|o| o.is_empty()),
                    "the `Indices` output is not supported",
                )?;
                let kernel = pair(node, "kernel_shape", [0, 0])?;
                require(kernel[0] > 0 && kernel[1] > 0, "`kernel_shape` is required")?;
                let stride = pair(node, "strides", [1, 1])?;
                require(stride[0] > 0 && stride[1] > 0, "strides must be positive")?;
                Op::Pool {
                    max,
                    kernel,
                    stride,
                }
            }
            "GlobalAveragePool" => Op::GlobalAveragePool,
            "BatchNormalization" => {
                require(
                    int(node, "training_mode", 0) == 0,
                    "`training_mode = 1` is not supported (inference only)",
                )?;
                require(
                    node.output.iter().skip(1).all(|o| o.is_empty()),
                    "the running statistics outputs (training mode) are not supported",
                )?;
                Op::BatchNorm {
                    epsilon: float(node, "epsilon", 1e-5),
                }
            }
            "Flatten" => Op::Flatten {
                axis: int(node, "axis", 1),
            },
            "Reshape" => {
                require(
                    int(node, "allowzero", 0) == 0,
                    "`allowzero = 1` is not supported",
                )?;
                Op::Reshape {
                    shape: reshape_to.ok_or(
                        "its shape must be an int64 initializer or Constant (computed shapes are not supported)",
                    )?,
                }
            }
            "Transpose" => Op::Transpose {
                perm: ints(node, "perm")
                    .ok_or("`perm` is required")?
                    .iter()
                    .map(|&p| usize::try_from(p).map_err(|_| format!("`perm` holds {p}")))
                    .collect::<std::result::Result<_, _>>()?,
            },
            "Softmax" => Op::Softmax {
                axis: int(node, "axis", -1),
            },
            "Identity" => Op::Identity,
            "Dropout" => {
                require(
                    node.input.get(2).is_none_or(|s| s.is_empty()),
                    "the `training_mode` input is not supported (inference only)",
                )?;
                require(
                    node.output.iter().skip(1).all(|o| o.is_empty()),
                    "the `mask` output is not supported",
                )?;
                Op::Identity
            }
            other => {
                return Err(format!(
                    "the op `{other}` is not supported (prunec runs {SUPPORTED})"
                ))
            }
        })
    }

    /// How many data inputs the op reads (at least, at most).
    pub fn arity(&self) -> (usize, usize) {
        match self {
            Op::Conv { .. } => (2, 3),
            Op::Gemm { .. } => (2, 3),
            Op::MatMul | Op::Binary(_) => (2, 2),
            Op::BatchNorm { .. } => (5, 5),
            // Reshape's second input (the shape) is resolved at load; Dropout's ratio is unused.
            Op::Reshape { .. } => (1, 2),
            Op::Identity => (1, 3),
            _ => (1, 1),
        }
    }

    /// How many of the inputs are float tensors the forward reads.
    pub fn tensor_inputs(&self, given: usize) -> usize {
        match self {
            Op::Reshape { .. } | Op::Identity => 1,
            _ => given,
        }
    }

    /// The output shape for these input shapes (`Err`: why they do not fit).
    pub fn shape(&self, ins: &[&[usize]]) -> std::result::Result<Vec<usize>, String> {
        let x = ins[0];
        match self {
            Op::Conv {
                kernel,
                pads,
                stride,
                dilation,
            } => {
                let w = ins[1];
                let (&[n, c, h, wd], &[m, wc, kh, kw]) = (x, w) else {
                    return Err(format!("input {x:?} and weight {w:?} are not 4-D"));
                };
                if wc != c || (kernel != &[0, 0] && kernel != &[kh, kw]) {
                    return Err(format!(
                        "weight {w:?} does not fit the input {x:?} (kernel_shape {kernel:?})"
                    ));
                }
                if let Some(b) = ins.get(2) {
                    if *b != [m] {
                        return Err(format!("bias {b:?} is not [{m}]"));
                    }
                }
                if kh == 0 || kw == 0 {
                    return Err(format!("weight {w:?} has an empty kernel"));
                }
                // Attributes come from the file: bounded before any arithmetic.
                const LIMIT: usize = 1 << 16;
                if *dilation > LIMIT || pads.iter().any(|p| *p > LIMIT) {
                    return Err(format!(
                        "pads {pads:?} or dilation {dilation} exceed {LIMIT}"
                    ));
                }
                let (eh, ew) = (dilation * (kh - 1) + 1, dilation * (kw - 1) + 1);
                let (hp, wp) = (h + pads[0] + pads[2], wd + pads[1] + pads[3]);
                if hp < eh || wp < ew {
                    return Err(format!("input {x:?} is smaller than the kernel {kh}x{kw}"));
                }
                Ok(vec![n, m, (hp - eh) / stride + 1, (wp - ew) / stride + 1])
            }
            Op::Gemm { trans_b, .. } => {
                let b = ins[1];
                let (&[mm, k], &[b0, b1]) = (x, b) else {
                    return Err(format!("A {x:?} and B {b:?} are not 2-D"));
                };
                let (bk, n) = if *trans_b { (b1, b0) } else { (b0, b1) };
                if bk != k {
                    return Err(format!(
                        "A {x:?} and B {b:?} do not chain (transB = {})",
                        *trans_b as u8
                    ));
                }
                if let Some(c) = ins.get(2) {
                    broadcast(&[mm, n], c)
                        .filter(|s| *s == [mm, n])
                        .ok_or_else(|| format!("C {c:?} does not broadcast to [{mm}, {n}]"))?;
                }
                Ok(vec![mm, n])
            }
            Op::MatMul => {
                let b = ins[1];
                match (x, b) {
                    (&[m, k], &[bk, n]) if k == bk => Ok(vec![m, n]),
                    _ => Err(format!(
                        "A {x:?} and B {b:?} are not 2-D matrices that chain"
                    )),
                }
            }
            Op::Binary(_) => broadcast(x, ins[1])
                .ok_or_else(|| format!("shapes {x:?} and {:?} do not broadcast", ins[1])),
            Op::Unary(_) | Op::Identity | Op::Softmax { .. } => {
                if let Op::Softmax { axis } = self {
                    axis_of(*axis, x.len())?;
                }
                Ok(x.to_vec())
            }
            Op::Pool { kernel, stride, .. } => {
                let &[n, c, h, w] = x else {
                    return Err(format!("input {x:?} is not 4-D"));
                };
                if h < kernel[0] || w < kernel[1] {
                    return Err(format!("input {x:?} is smaller than the window {kernel:?}"));
                }
                Ok(vec![
                    n,
                    c,
                    (h - kernel[0]) / stride[0] + 1,
                    (w - kernel[1]) / stride[1] + 1,
                ])
            }
            Op::GlobalAveragePool => match x {
                &[n, c, _, _] => Ok(vec![n, c, 1, 1]),
                _ => Err(format!("input {x:?} is not 4-D")),
            },
            Op::BatchNorm { .. } => {
                let c = *x
                    .get(1)
                    .ok_or_else(|| format!("input {x:?} has no channels"))?;
                for s in &ins[1..] {
                    if *s != [c] {
                        return Err(format!("statistics {s:?} are not [{c}]"));
                    }
                }
                Ok(x.to_vec())
            }
            Op::Flatten { axis } => {
                let a = axis_of(*axis, x.len() + 1)?;
                Ok(vec![x[..a].iter().product(), x[a..].iter().product()])
            }
            Op::Reshape { shape } => {
                let total: usize = x.iter().product();
                let mut out = Vec::with_capacity(shape.len());
                let mut infer = None;
                for (i, &d) in shape.iter().enumerate() {
                    match d {
                        0 => out.push(*x.get(i).ok_or_else(|| {
                            format!("shape {shape:?} copies dimension {i} of {x:?}")
                        })?),
                        -1 if infer.is_none() => {
                            infer = Some(i);
                            out.push(1);
                        }
                        d if d > 0 && d <= 1 << 31 => out.push(d as usize),
                        _ => return Err(format!("shape {shape:?} is not valid")),
                    }
                }
                let known = out
                    .iter()
                    .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                    .ok_or_else(|| format!("shape {shape:?} is too large"))?;
                if let Some(i) = infer {
                    if known == 0 || !total.is_multiple_of(known) {
                        return Err(format!("cannot reshape {x:?} to {shape:?}"));
                    }
                    out[i] = total / known;
                }
                if out.iter().product::<usize>() != total {
                    return Err(format!("cannot reshape {x:?} to {shape:?}"));
                }
                Ok(out)
            }
            Op::Transpose { perm } => {
                let mut seen = perm.clone();
                seen.sort_unstable();
                if seen != (0..x.len()).collect::<Vec<_>>() {
                    return Err(format!("perm {perm:?} does not permute {x:?}"));
                }
                Ok(perm.iter().map(|&p| x[p]).collect())
            }
        }
    }

    /// Applies the op; `ins` are the node's float inputs in order (weights in the file's layout).
    pub fn apply(&self, ins: &[Tensor], ctx: &dyn Fn() -> String) -> Result<Tensor> {
        let x = &ins[0];
        match self {
            Op::Conv {
                kernel: _,
                pads,
                stride,
                dilation,
            } => {
                let w = &ins[1];
                let (m, _, kh, kw) = w.dims4().ctx(ctx)?;
                let square = kh == kw && pads.iter().all(|p| *p == pads[0]);
                if square && *stride == 1 && *dilation == 1 {
                    let b = match ins.get(2) {
                        Some(b) => b.clone(),
                        None => Tensor::zeros(m, w.dtype(), w.device()).ctx(ctx)?,
                    };
                    return crate::model::arch::conv2d_im2col(&ctx(), x, w, &b, kh, pads[0]);
                }
                let xp = x
                    .pad_with_zeros(2, pads[0], pads[2])
                    .and_then(|t| t.pad_with_zeros(3, pads[1], pads[3]))
                    .ctx(ctx)?;
                let y = xp.conv2d(w, 0, *stride, *dilation, 1).ctx(ctx)?;
                match ins.get(2) {
                    Some(b) => y.broadcast_add(&b.reshape((1, m, 1, 1)).ctx(ctx)?).ctx(ctx),
                    None => Ok(y),
                }
            }
            Op::Gemm {
                alpha,
                beta,
                trans_b,
            } => {
                let b = if *trans_b {
                    ins[1].t().ctx(ctx)?
                } else {
                    ins[1].clone()
                };
                let mut y = crate::gemm::matmul(x, &b).ctx(ctx)?;
                if *alpha != 1.0 {
                    y = y.affine(*alpha, 0.0).ctx(ctx)?;
                }
                match ins.get(2) {
                    Some(c) if *beta == 1.0 => y.broadcast_add(c).ctx(ctx),
                    Some(c) => y.broadcast_add(&c.affine(*beta, 0.0).ctx(ctx)?).ctx(ctx),
                    None => Ok(y),
                }
            }
            Op::MatMul => crate::gemm::matmul(x, &ins[1]).ctx(ctx),
            Op::Binary(op) => match op {
                Binary::Add => x.broadcast_add(&ins[1]),
                Binary::Sub => x.broadcast_sub(&ins[1]),
                Binary::Mul => x.broadcast_mul(&ins[1]),
                Binary::Div => x.broadcast_div(&ins[1]),
            }
            .ctx(ctx),
            Op::Unary(op) => match op {
                Unary::Relu => x.relu(),
                Unary::Sigmoid => candle_nn::ops::sigmoid(x),
                Unary::Tanh => x.tanh(),
            }
            .ctx(ctx),
            Op::Identity => Ok(x.clone()),
            Op::Pool {
                max,
                kernel,
                stride,
            } => {
                let (k, s) = ((kernel[0], kernel[1]), (stride[0], stride[1]));
                if *max {
                    x.max_pool2d_with_stride(k, s)
                } else {
                    x.avg_pool2d_with_stride(k, s)
                }
                .ctx(ctx)
            }
            Op::GlobalAveragePool => x.mean_keepdim(3).and_then(|t| t.mean_keepdim(2)).ctx(ctx),
            Op::BatchNorm { epsilon } => {
                let c = x.dim(1).ctx(ctx)?;
                let mut shape = vec![1; x.rank()];
                shape[1] = c;
                // y = x * a + b, a = scale / sqrt(var + eps), b = bias - mean * a.
                let a = ins[4]
                    .affine(1.0, *epsilon)
                    .and_then(|v| v.sqrt())
                    .and_then(|s| ins[1].div(&s))
                    .ctx(ctx)?;
                let b = ins[2].sub(&ins[3].mul(&a).ctx(ctx)?).ctx(ctx)?;
                x.broadcast_mul(&a.reshape(shape.as_slice()).ctx(ctx)?)
                    .and_then(|y| y.broadcast_add(&b.reshape(shape.as_slice())?))
                    .ctx(ctx)
            }
            Op::Flatten { axis } => {
                let a = axis_of(*axis, x.rank() + 1)
                    .map_err(|e| crate::RuntimeError::InvalidConfig(format!("{}: {e}", ctx())))?;
                let d = x.dims();
                let (r, c): (usize, usize) = (d[..a].iter().product(), d[a..].iter().product());
                x.reshape((r, c)).ctx(ctx)
            }
            Op::Reshape { .. } => {
                let dims: Vec<&[usize]> = vec![x.dims()];
                let to = self
                    .shape(&dims)
                    .map_err(|e| crate::RuntimeError::InvalidConfig(format!("{}: {e}", ctx())))?;
                x.reshape(to).ctx(ctx)
            }
            Op::Transpose { perm } => x
                .permute(perm.as_slice())
                .and_then(|t| t.contiguous())
                .ctx(ctx),
            Op::Softmax { axis } => {
                let a = axis_of(*axis, x.rank())
                    .map_err(|e| crate::RuntimeError::InvalidConfig(format!("{}: {e}", ctx())))?;
                candle_nn::ops::softmax(x, a).ctx(ctx)
            }
        }
    }
}

/// A possibly negative axis of a rank-`rank` tensor as an index.
fn axis_of(axis: i64, rank: usize) -> std::result::Result<usize, String> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if a < 0 || a >= rank as i64 {
        return Err(format!("axis {axis} is out of range for rank {rank}"));
    }
    Ok(a as usize)
}

/// NumPy broadcasting of two shapes.
pub fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let at = |s: &[usize], i: usize| {
        let off = n - s.len();
        if i < off {
            1
        } else {
            s[i - off]
        }
    };
    (0..n)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y => Some(x),
            (1, y) => Some(y),
            (x, 1) => Some(x),
            _ => None,
        })
        .collect()
}

/// Per column `(c, ky, kx)` of a convolution's im2col matrix, the sum over samples and
/// output positions of its squared input (zero padding included), added in a fixed order.
pub fn conv_column_sum_sq(
    x: &Tensor,
    weight: &[usize],
    op: &Op,
    sum_sq: &mut [f64],
) -> Result<usize> {
    let Op::Conv {
        pads,
        stride,
        dilation,
        ..
    } = op
    else {
        return Ok(0);
    };
    let ctx = || {
        format!(
            "activation statistics of a convolution input {:?}",
            x.dims()
        )
    };
    let (n, c, h, w) = x.dims4().ctx(ctx)?;
    let (kh, kw) = (weight[2], weight[3]);
    let values: Vec<f32> = x.flatten_all().and_then(|t| t.to_vec1()).ctx(ctx)?;
    let (hp, wp) = (h + pads[0] + pads[2], w + pads[1] + pads[3]);
    let (oh, ow) = (
        (hp - dilation * (kh - 1) - 1) / stride + 1,
        (wp - dilation * (kw - 1) - 1) / stride + 1,
    );
    // Per padded pixel: the sum over the batch of its square.
    let mut pixel = vec![0f64; c * hp * wp];
    for image in values.chunks_exact(c * h * w) {
        for ci in 0..c {
            for y in 0..h {
                for xx in 0..w {
                    let v = f64::from(image[(ci * h + y) * w + xx]);
                    pixel[(ci * hp + y + pads[0]) * wp + xx + pads[1]] += v * v;
                }
            }
        }
    }
    for ci in 0..c {
        for ky in 0..kh {
            for kx in 0..kw {
                let mut s = 0f64;
                for oy in 0..oh {
                    let row = (ci * hp + oy * stride + ky * dilation) * wp + kx * dilation;
                    for ox in 0..ow {
                        s += pixel[row + ox * stride];
                    }
                }
                sum_sq[(ci * kh + ky) * kw + kx] += s;
            }
        }
    }
    Ok(n * oh * ow)
}

/// The values computed so far, by name.
pub type Values = HashMap<String, Tensor>;
