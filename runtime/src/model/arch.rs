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
}

/// One step of a sequential model.
#[derive(Debug, Clone, PartialEq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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

    /// Shape of one input sample.
    pub fn input_shape(&self) -> Vec<usize> {
        match self {
            Architecture::Mlp { widths, .. } => vec![widths.first().copied().unwrap_or(0)],
            Architecture::Lenet5 { input_shape, .. } => input_shape.clone(),
            Architecture::DigitCnn => vec![1, 28, 28],
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
        }
    }

    /// Parameter names and shapes in the model's stable order (per layer: weight, bias).
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
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
        let bad =
            |msg: String| RuntimeError::InvalidConfig(format!("architecture {self:?}: {msg}"));
        if let Architecture::Mlp { widths, .. } = self {
            if widths.len() < 2 || widths.contains(&0) {
                return Err(bad(
                    "an MLP needs at least an input and an output width, all > 0".into(),
                ));
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
                    if h < kernel || w < kernel {
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
                    if shape.len() != 3 || shape[1] < k || shape[2] < k {
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
            x.matmul(&w.t().ctx(ctx)?)
                .ctx(ctx)?
                .broadcast_add(&b)
                .ctx(ctx)
        }
        Layer::Conv2d { name, padding, .. } => {
            let w = param(&format!("{name}.weight"))?;
            let b = param(&format!("{name}.bias"))?;
            let ctx = || format!("layer {name}: input {:?}, weight {:?}", x.dims(), w.dims());
            let c = b.dims1().ctx(ctx)?;
            x.conv2d(&w, *padding, 1, 1, 1)
                .ctx(ctx)?
                .broadcast_add(&b.reshape((1, c, 1, 1)).ctx(ctx)?)
                .ctx(ctx)
        }
    }
}
