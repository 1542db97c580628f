//! Architectures (MLP, LeNet-5, the digit-recognizer CNN) as layer lists, with shape inference,
//! parameter shapes and FLOP counts.

use candle_core::Tensor;

use crate::error::{CandleContext, Result, RuntimeError};

/// Elementwise activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Relu,
    Tanh,
    Sigmoid,
    Gelu,
    Identity,
}

impl Activation {
    /// Applies the activation.
    pub fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Relu => x.relu(),
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => candle_nn::ops::sigmoid(x),
            Activation::Gelu => x.gelu_erf(),
            Activation::Identity => Ok(x.clone()),
        }
    }
}

/// A model architecture; stored as JSON in the metadata of the safetensors files we write.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Architecture {
    /// Fully connected layers `fc1..fcN`. `widths` includes the input features and
    /// the classes: LeNet-300-100 on MNIST is `[784, 300, 100, 10]`. Inputs of any
    /// shape are flattened.
    Mlp {
        widths: Vec<usize>,
        activation: Activation,
    },
    /// LeNet-5: conv1 (5x5, 6 maps, padding 2) - pool 2 - conv2 (5x5, 16 maps) -
    /// pool 2 - fc1 120 - fc2 84 - fc3 classes.
    Lenet5 {
        /// `[channels, height, width]` of one input.
        input_shape: Vec<usize>,
        classes: usize,
        activation: Activation,
    },
    /// The pretrained digit-recognizer CNN: input normalised with (0.1307, 0.3081), then
    /// conv3x3 (padding 1) 32, 64, 128 maps, each ReLU + maxpool 2, then fc 1152-256-10.
    /// Parameter names are those of its PyTorch state dict (`conv_layers.0.weight`, ...).
    DigitCnn,
    /// An ONNX graph (`onnx(...)` models): what its file says, read when it is opened; the
    /// graph itself runs the forward (`crate::onnx`), so it has no layer list.
    Onnx {
        /// `[channels, height, width]` (or any fixed sizes) of one input.
        input_shape: Vec<usize>,
        classes: usize,
        /// The prunable parameters' names and shapes, in graph order.
        params: Vec<(String, Vec<usize>)>,
        costs: Vec<LayerCost>,
    },
    /// Any sequential network by its layer list: what structured pruning
    /// leaves of the built-in architectures (names kept, widths reduced).
    Sequential {
        /// `[channels, height, width]` or `[features]` of one input.
        input_shape: Vec<usize>,
        layers: Vec<Layer>,
    },
}

/// One step of a sequential model.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layer {
    /// `(x - mean) / std`.
    Normalize { mean: f64, std: f64 },
    /// `[b, ...] -> [b, prod(...)]`.
    Flatten,
    /// `x W^T + b`, parameters `{name}.weight` `[outputs, inputs]` and `{name}.bias`.
    Linear {
        name: String,
        inputs: usize,
        outputs: usize,
    },
    /// 2-D convolution, stride 1, parameters `{name}.weight` `[out, in, k, k]` and `{name}.bias`.
    Conv2d {
        name: String,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        padding: usize,
    },
    /// Max pooling with a square window and the same stride.
    MaxPool2d(usize),
    /// Elementwise activation.
    Act(Activation),
}

/// Cost of one weight tensor: forward multiply-adds per sample are `numel * positions`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerCost {
    /// Name of the weight tensor (`fc1.weight`).
    pub weight: String,
    /// Name of the bias tensor (`fc1.bias`).
    pub bias: String,
    /// Output positions each weight is used at per sample (1 for a linear layer,
    /// `out_h * out_w` for a convolution).
    pub positions: usize,
}

impl Architecture {
    /// LeNet-300-100 for 28x28 inputs.
    pub fn lenet_300_100() -> Self {
        Architecture::Mlp {
            widths: vec![784, 300, 100, 10],
            activation: Activation::Relu,
        }
    }

    /// LeNet-5 for 1x28x28 inputs and 10 classes, with ReLU.
    pub fn lenet5() -> Self {
        Architecture::Lenet5 {
            input_shape: vec![1, 28, 28],
            classes: 10,
            activation: Activation::Relu,
        }
    }

    /// Whether samples of `sample` shape fit the input: an MLP flattens its
    /// input and an ONNX graph reshapes it, so only the element count
    /// matters; convolutions need the exact shape. The one rule `check`
    /// and the run share.
    pub fn accepts(&self, sample: &[usize]) -> bool {
        let want = self.input_shape();
        match self {
            Architecture::Mlp { .. } | Architecture::Onnx { .. } => {
                sample.iter().product::<usize>() == want.iter().product::<usize>()
            }
            // Flattened first (a shrunk MLP): only the element count matters.
            Architecture::Sequential { layers, .. }
                if layers
                    .iter()
                    .find(|l| !matches!(l, Layer::Normalize { .. }))
                    .is_some_and(|l| matches!(l, Layer::Flatten)) =>
            {
                sample.iter().product::<usize>() == want.iter().product::<usize>()
            }
            _ => sample == want.as_slice(),
        }
    }

    /// Shape of one input sample.
    pub fn input_shape(&self) -> Vec<usize> {
        match self {
            Architecture::Mlp { widths, .. } => vec![widths.first().copied().unwrap_or(0)],
            Architecture::Lenet5 { input_shape, .. } => input_shape.clone(),
            Architecture::DigitCnn => vec![1, 28, 28],
            Architecture::Onnx { input_shape, .. } => input_shape.clone(),
            Architecture::Sequential { input_shape, .. } => input_shape.clone(),
        }
    }

    /// The layer list.
    pub fn layers(&self) -> Vec<Layer> {
        let linear = |name: &str, inputs, outputs| Layer::Linear {
            name: name.to_string(),
            inputs,
            outputs,
        };
        match self {
            Architecture::Mlp { widths, activation } => {
                let mut layers = vec![Layer::Flatten];
                let n = widths.len().saturating_sub(1);
                for i in 0..n {
                    layers.push(linear(&format!("fc{}", i + 1), widths[i], widths[i + 1]));
                    if i + 1 < n {
                        layers.push(Layer::Act(*activation));
                    }
                }
                layers
            }
            Architecture::Lenet5 {
                input_shape,
                classes,
                activation,
            } => {
                let c = input_shape.first().copied().unwrap_or(1);
                let (h, w) = (
                    input_shape.get(1).copied().unwrap_or(0),
                    input_shape.get(2).copied().unwrap_or(0),
                );
                let flat = 16 * ((h / 2).saturating_sub(4) / 2) * ((w / 2).saturating_sub(4) / 2);
                let act = Layer::Act(*activation);
                vec![
                    Layer::Conv2d {
                        name: "conv1".into(),
                        in_channels: c,
                        out_channels: 6,
                        kernel: 5,
                        padding: 2,
                    },
                    act.clone(),
                    Layer::MaxPool2d(2),
                    Layer::Conv2d {
                        name: "conv2".into(),
                        in_channels: 6,
                        out_channels: 16,
                        kernel: 5,
                        padding: 0,
                    },
                    act.clone(),
                    Layer::MaxPool2d(2),
                    Layer::Flatten,
                    linear("fc1", flat, 120),
                    act.clone(),
                    linear("fc2", 120, 84),
                    act,
                    linear("fc3", 84, *classes),
                ]
            }
            Architecture::DigitCnn => {
                let conv = |name: &str, i, o| Layer::Conv2d {
                    name: name.to_string(),
                    in_channels: i,
                    out_channels: o,
                    kernel: 3,
                    padding: 1,
                };
                let relu = Layer::Act(Activation::Relu);
                vec![
                    Layer::Normalize {
                        mean: 0.1307,
                        std: 0.3081,
                    },
                    conv("conv_layers.0", 1, 32),
                    relu.clone(),
                    Layer::MaxPool2d(2),
                    conv("conv_layers.3", 32, 64),
                    relu.clone(),
                    Layer::MaxPool2d(2),
                    conv("conv_layers.6", 64, 128),
                    relu.clone(),
                    Layer::MaxPool2d(2),
                    Layer::Flatten,
                    linear("fc_layers.0", 1152, 256),
                    relu,
                    linear("fc_layers.2", 256, 10),
                ]
            }
            Architecture::Onnx { .. } => Vec::new(),
            Architecture::Sequential { layers, .. } => layers.clone(),
        }
    }

    /// Parameter names and shapes in the model's stable order (per layer: weight, bias).
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        if let Architecture::Onnx { params, .. } = self {
            return params.clone();
        }
        let mut out = Vec::new();
        for layer in self.layers() {
            match layer {
                Layer::Linear {
                    name,
                    inputs,
                    outputs,
                } => {
                    out.push((format!("{name}.weight"), vec![outputs, inputs]));
                    out.push((format!("{name}.bias"), vec![outputs]));
                }
                Layer::Conv2d {
                    name,
                    in_channels,
                    out_channels,
                    kernel,
                    ..
                } => {
                    out.push((
                        format!("{name}.weight"),
                        vec![out_channels, in_channels, kernel, kernel],
                    ));
                    out.push((format!("{name}.bias"), vec![out_channels]));
                }
                _ => {}
            }
        }
        out
    }

    /// Checks the layer shapes chain for the input shape and returns the per-weight
    /// costs and the output size (number of classes).
    pub fn shape_check(&self) -> Result<(Vec<LayerCost>, usize)> {
        if let Architecture::Onnx { costs, classes, .. } = self {
            return Ok((costs.clone(), *classes));
        }
        let bad =
            |msg: String| RuntimeError::InvalidConfig(format!("architecture {self:?}: {msg}"));
        if let Architecture::Mlp { widths, .. } = self {
            if widths.len() < 2 || widths.contains(&0) {
                return Err(bad(
                    "an MLP needs at least an input and an output width, all > 0".into(),
                ));
            }
        }
        if let Architecture::Sequential { layers, .. } = self {
            // Read from a file's metadata: names unique, widths positive.
            let mut seen = std::collections::BTreeSet::new();
            for l in layers {
                let (name, widths) = match l {
                    Layer::Linear {
                        name,
                        inputs,
                        outputs,
                    } => (name, [*inputs, *outputs]),
                    Layer::Conv2d {
                        name,
                        in_channels,
                        out_channels,
                        ..
                    } => (name, [*in_channels, *out_channels]),
                    _ => continue,
                };
                if !seen.insert(name.clone()) || widths.contains(&0) {
                    return Err(bad(format!(
                        "layer `{name}` is named twice or has a zero width"
                    )));
                }
            }
        }
        let mut shape = self.input_shape();
        let mut costs = Vec::new();
        for layer in self.layers() {
            match layer {
                Layer::Normalize { .. } | Layer::Act(_) => {}
                Layer::Flatten => shape = vec![shape.iter().product()],
                Layer::Linear {
                    name,
                    inputs,
                    outputs,
                } => {
                    if shape != [inputs] {
                        return Err(bad(format!(
                            "layer {name} expects {inputs} inputs, gets shape {shape:?}"
                        )));
                    }
                    costs.push(LayerCost {
                        weight: format!("{name}.weight"),
                        bias: format!("{name}.bias"),
                        positions: 1,
                    });
                    shape = vec![outputs];
                }
                Layer::Conv2d {
                    name,
                    in_channels,
                    out_channels,
                    kernel,
                    padding,
                } => {
                    if shape.len() != 3 || shape[0] != in_channels {
                        return Err(bad(format!(
                            "layer {name} expects [{in_channels}, h, w] inputs, gets shape {shape:?}"
                        )));
                    }
                    let (h, w) = (shape[1] + 2 * padding, shape[2] + 2 * padding);
                    if kernel == 0 || h < kernel || w < kernel {
                        return Err(bad(format!(
                            "layer {name}: input {shape:?} is smaller than its {kernel}x{kernel} kernel"
                        )));
                    }
                    let (oh, ow) = (h - kernel + 1, w - kernel + 1);
                    costs.push(LayerCost {
                        weight: format!("{name}.weight"),
                        bias: format!("{name}.bias"),
                        positions: oh * ow,
                    });
                    shape = vec![out_channels, oh, ow];
                }
                Layer::MaxPool2d(k) => {
                    if k == 0 || shape.len() != 3 || shape[1] < k || shape[2] < k {
                        return Err(bad(format!("max-pool {k} on shape {shape:?}")));
                    }
                    shape = vec![shape[0], shape[1] / k, shape[2] / k];
                }
            }
        }
        if shape.len() != 1 {
            return Err(bad(format!(
                "output shape {shape:?} is not a vector of class scores"
            )));
        }
        Ok((costs, shape[0]))
    }
}

/// Applies one layer; `param` returns the tensor of a parameter by name.
pub(crate) fn apply_layer(
    layer: &Layer,
    x: &Tensor,
    param: &dyn Fn(&str) -> Result<Tensor>,
) -> Result<Tensor> {
    match layer {
        Layer::Normalize { mean, std } => x
            .affine(1.0 / std, -mean / std)
            .ctx(|| "normalising the input".to_string()),
        Layer::Flatten => x.flatten_from(1).ctx(|| "flattening".to_string()),
        Layer::Act(a) => a.apply(x).ctx(|| format!("activation {a:?}")),
        Layer::MaxPool2d(k) => x.max_pool2d(*k).ctx(|| format!("max-pool {k}")),
        Layer::Linear { name, .. } => {
            let w = param(&format!("{name}.weight"))?;
            let b = param(&format!("{name}.bias"))?;
            let ctx = || format!("layer {name}: input {:?}, weight {:?}", x.dims(), w.dims());
            crate::gemm::matmul(x, &w.t().ctx(ctx)?)
                .ctx(ctx)?
                .broadcast_add(&b)
                .ctx(ctx)
        }
        Layer::Conv2d {
            name,
            padding,
            kernel,
            ..
        } => {
            let w = param(&format!("{name}.weight"))?;
            let b = param(&format!("{name}.bias"))?;
            conv2d_im2col(name, x, &w, &b, *kernel, *padding)
        }
    }
}

/// Gather indices of im2col: for each `(ci, ky, kx)` in the weight's order and each
/// output position (row-major), the offset into the zero-padded, flattened `[c, hp, wp]` input.
pub(crate) fn im2col_index(c: usize, hp: usize, wp: usize, k: usize) -> Vec<u32> {
    let (oh, ow) = (hp - k + 1, wp - k + 1);
    let mut idx = Vec::with_capacity(oh * ow * c * k * k);
    for ci in 0..c {
        for ky in 0..k {
            for kx in 0..k {
                for oy in 0..oh {
                    let row = ci * hp * wp + (oy + ky) * wp + kx;
                    idx.extend((row..row + ow).map(|v| v as u32));
                }
            }
        }
    }
    idx
}

/// Stride-1 convolution as im2col (one row gather) + one GEMM. candle's own
/// `conv2d` back-propagates through a naive, mostly serial `conv_transpose2d` on CPU,
/// which made LeNet-5 training several times slower; this formulation's backward is
/// a GEMM plus a sequential `index_add`, and is deterministic.
///
/// Layout: the input is turned into `[c * hp * wp, batch]` so the gather selects whole
/// rows (candle's fast path), giving columns `[c * k * k, positions * batch]`; the
/// GEMM `W [o, c * k * k] x cols` yields `[o, positions, batch]`, permuted back to NCHW.
pub(crate) fn conv2d_im2col(
    name: &str,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    k: usize,
    padding: usize,
) -> Result<Tensor> {
    let ctx = || format!("layer {name}: input {:?}, weight {:?}", x.dims(), w.dims());
    let (batch, c, h, wd) = x.dims4().ctx(ctx)?;
    let o = w.dim(0).ctx(ctx)?;
    let (hp, wp) = (h + 2 * padding, wd + 2 * padding);
    if hp < k || wp < k || w.dims() != [o, c, k, k] {
        return Err(RuntimeError::ShapeMismatch {
            name: format!("{name}.weight"),
            context: format!("convolution of an input {:?}", x.dims()),
            expected: vec![o, c, k, k],
            found: w.dims().to_vec(),
        });
    }
    let (oh, ow) = (hp - k + 1, wp - k + 1);
    let xp = if padding > 0 {
        x.pad_with_zeros(2, padding, padding)
            .and_then(|t| t.pad_with_zeros(3, padding, padding))
            .ctx(ctx)?
    } else {
        x.clone()
    };
    let n_idx = oh * ow * c * k * k;
    let idx = Tensor::from_vec(im2col_index(c, hp, wp, k), n_idx, x.device()).ctx(ctx)?;
    let cols = xp
        .reshape((batch, c * hp * wp))
        .and_then(|t| t.t())
        .and_then(|t| t.contiguous())
        .and_then(|t| t.index_select(&idx, 0))
        .and_then(|t| t.reshape((c * k * k, oh * ow * batch)))
        .ctx(ctx)?;
    let wmat = w.reshape((o, c * k * k)).ctx(ctx)?;
    crate::gemm::matmul(&wmat, &cols)
        .and_then(|y| y.reshape((o, oh, ow, batch)))
        .and_then(|y| y.permute((3, 0, 1, 2)))
        .and_then(|y| y.contiguous())
        .and_then(|y| y.broadcast_add(&b.reshape((1, o, 1, 1))?))
        .ctx(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Reproducible values in [-2, 2) (a run that fails fails again).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    /// The im2col convolution agrees with candle's reference `conv2d`, forward and backward.
    #[test]
    fn im2col_conv_matches_candle_conv2d() {
        let d = Device::Cpu;
        for (c, o, h, w, k, pad) in [
            (1, 6, 28, 28, 5, 2),
            (6, 16, 14, 14, 5, 0),
            (3, 4, 7, 5, 3, 1),
        ] {
            let xv =
                candle_core::Var::from_vec(values(3 * c * h * w, 1), (3, c, h, w), &d).unwrap();
            let x = xv.as_tensor();
            let wt =
                candle_core::Var::from_vec(values(o * c * k * k, 2), (o, c, k, k), &d).unwrap();
            let b = Tensor::from_vec(values(o, 3), o, &d).unwrap();
            let ours = conv2d_im2col("t", x, wt.as_tensor(), &b, k, pad).unwrap();
            let reference = x
                .conv2d(wt.as_tensor(), pad, 1, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, o, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(ours.dims(), reference.dims());
            let diff = ours
                .sub(&reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(
                diff.to_scalar::<f32>().unwrap() < 1e-4,
                "forward {c} {o} {h} {w} {k} {pad}"
            );
            let g_ours = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let g_ref = reference
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (a, r) = (
                g_ours.get(wt.as_tensor()).unwrap(),
                g_ref.get(wt.as_tensor()).unwrap(),
            );
            let scale = r
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let diff = a
                .sub(r)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                diff <= 1e-4 * scale.max(1.0),
                "weight gradient {c} {o} {h} {w} {k} {pad}: {diff}"
            );
            // Relative to the gradient's size, as for the weights: the two
            // sum the same terms in different orders.
            let (a, r) = (g_ours.get(x).unwrap(), g_ref.get(x).unwrap());
            let scale = r
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let diff = a
                .sub(r)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                diff <= 1e-4 * scale.max(1.0),
                "input gradient {c} {o} {h} {w} {k} {pad}: {diff} (largest {scale})"
            );
        }
    }
}
