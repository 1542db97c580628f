//! ONNX vision classifiers: a `.onnx` graph read through prost message structs, checked
//! (ops, attributes, data types, shapes) when it is opened, run forward on candle tensors
//! (NCHW, f32), and written back with only the pruned weights' bytes changed.
//!
//! The prunable parameters are the weight initializers of `Conv`, `Gemm` and `MatMul`
//! nodes and their biases (a `Conv`/`Gemm` bias, or the 1-D initializer an `Add` adds to a
//! `MatMul`'s product), named by their initializer names. A weight the graph multiplies as
//! `[in, out]` (`MatMul`, `Gemm` with `transB = 0`) is held transposed, as `[out, in]`
//! like every other prunec weight, so that rows, N:M groups and activation columns mean
//! the same for every layer; it is transposed back when written. Every other initializer
//! (batch-norm statistics, shapes) is a constant, never pruned. A graph that ends with a
//! Softmax over its classes is run up to that Softmax: its input is the class scores
//! (logits) that accuracy and cross-entropy read.

pub mod ops;
pub mod proto;
mod wire;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use prost::Message;

use crate::error::{CandleContext, Result, RuntimeError};
use crate::model::LayerCost;
pub use ops::Op;

/// The lowest default-domain opset whose op semantics (Softmax's axis, Reshape's shape
/// input, Dropout's inputs) this module implements.
pub const MIN_OPSET: i64 = 13;

/// The most elements one tensor (or one input sample) may have: 2^31.
const MAX_ELEMENTS: usize = 1 << 31;

/// A float tensor the graph holds: an initializer or the value of a `Constant` node.
#[derive(Debug, Clone)]
pub struct Constant {
    pub name: String,
    /// Dimensions as stored in the file.
    pub dims: Vec<usize>,
    pub values: Vec<f32>,
    /// Where the values lie in the file (initializers only).
    payload: Option<wire::Payload>,
}

/// A prunable parameter: its name, its shape as prunec holds it, and whether that is the
/// transpose of the file's layout.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub transposed: bool,
}

#[derive(Debug, Clone)]
struct Node {
    /// `node `NAME` (OpType)`, for messages.
    label: String,
    op: Op,
    /// The float inputs the op reads, in order.
    inputs: Vec<String>,
    output: String,
    /// The parameter name of the node's weight, when it is one.
    weight: Option<String>,
}

/// An opened, checked ONNX classifier graph.
#[derive(Debug, Clone)]
pub struct OnnxGraph {
    path: PathBuf,
    bytes: Vec<u8>,
    input: String,
    input_shape: Vec<usize>,
    output: String,
    classes: usize,
    nodes: Vec<Node>,
    constants: Vec<Constant>,
    params: Vec<ParamInfo>,
    costs: Vec<LayerCost>,
    /// Each value's last reader (node index), so the forward drops what it no longer needs.
    last_use: HashMap<String, usize>,
}

fn corrupt(path: &Path, reason: impl Into<String>) -> RuntimeError {
    RuntimeError::corrupt(path, reason)
}

fn unsupported(path: &Path, reason: impl Into<String>) -> RuntimeError {
    RuntimeError::UnsupportedModel {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn dims_of(path: &Path, t: &proto::TensorProto) -> Result<Vec<usize>> {
    t.dims
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| corrupt(path, format!("tensor `{}` has dims {:?}", t.name, t.dims)))
}

/// The element count of `dims`, bounded so that no later product overflows.
fn numel_of(path: &Path, name: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|n| *n <= MAX_ELEMENTS)
        .ok_or_else(|| {
            corrupt(
                path,
                format!("tensor `{name}` has dims {dims:?}, too many elements"),
            )
        })
}

/// The f32 values of a tensor (raw or typed storage), checked against its dims.
fn float_values(path: &Path, t: &proto::TensorProto, numel: usize) -> Result<Vec<f32>> {
    let values: Vec<f32> = if !t.raw_data.is_empty() {
        t.raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    } else {
        t.float_data.clone()
    };
    if values.len() != numel || (!t.raw_data.is_empty() && t.raw_data.len() != numel * 4) {
        return Err(corrupt(
            path,
            format!(
                "tensor `{}` of shape {:?} holds {} bytes of data",
                t.name,
                t.dims,
                if t.raw_data.is_empty() {
                    t.float_data.len() * 4
                } else {
                    t.raw_data.len()
                }
            ),
        ));
    }
    Ok(values)
}

fn int_values(path: &Path, t: &proto::TensorProto, numel: usize) -> Result<Vec<i64>> {
    let values: Vec<i64> = if !t.raw_data.is_empty() {
        t.raw_data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
            .collect()
    } else {
        t.int64_data.clone()
    };
    if values.len() != numel || (!t.raw_data.is_empty() && t.raw_data.len() != numel * 8) {
        return Err(corrupt(
            path,
            format!(
                "tensor `{}` of shape {:?} holds {} values",
                t.name,
                t.dims,
                values.len()
            ),
        ));
    }
    Ok(values)
}

impl OnnxGraph {
    /// Reads and checks `path`: every op, attribute, data type and shape the forward will
    /// meet. A missing file, a file that is not ONNX or one the runtime cannot run is an
    /// error naming the node.
    pub fn open(path: &Path) -> Result<OnnxGraph> {
        let bytes =
            std::fs::read(path).map_err(|e| RuntimeError::io("cannot open model", path, e))?;
        let model = proto::ModelProto::decode(bytes.as_slice())
            .map_err(|e| corrupt(path, format!("not an ONNX model (protobuf: {e})")))?;
        let graph = model
            .graph
            .as_ref()
            .ok_or_else(|| corrupt(path, "not an ONNX model: it holds no graph"))?;
        let opset = model
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version)
            .ok_or_else(|| corrupt(path, "the model imports no default-domain opset"))?;
        if opset < MIN_OPSET {
            return Err(unsupported(
                path,
                format!("opset {opset} is not supported (prunec runs opset {MIN_OPSET} and later; convert with onnx.version_converter)"),
            ));
        }
        let payloads = wire::initializer_payloads(&bytes)
            .map_err(|e| corrupt(path, format!("not an ONNX model (protobuf: {e})")))?;
        if payloads.len() != graph.initializer.len() {
            return Err(corrupt(
                path,
                "the initializers could not be located in the file",
            ));
        }
        // Initializers: f32 constants, int64 shapes, other types remembered for messages.
        let mut constants = Vec::new();
        let mut ints: HashMap<String, Vec<i64>> = HashMap::new();
        let mut other_types: HashMap<String, i32> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        for (t, payload) in graph.initializer.iter().zip(payloads) {
            if !seen.insert(t.name.clone()) {
                return Err(corrupt(
                    path,
                    format!("two initializers are named `{}`", t.name),
                ));
            }
            if t.data_location == 1 || !t.external_data.is_empty() {
                return Err(unsupported(
                    path,
                    format!("initializer `{}` is stored in an external file (save the model with its data inside)", t.name),
                ));
            }
            let dims = dims_of(path, t)?;
            let numel = numel_of(path, &t.name, &dims)?;
            match t.data_type {
                proto::FLOAT => {
                    let values = float_values(path, t, numel)?;
                    constants.push(Constant {
                        name: t.name.clone(),
                        dims,
                        values,
                        payload: Some(payload),
                    });
                }
                proto::INT64 => {
                    ints.insert(t.name.clone(), int_values(path, t, numel)?);
                }
                other => {
                    other_types.insert(t.name.clone(), other);
                }
            }
        }
        // The data input: the one graph input that is not an initializer.
        let data_inputs: Vec<&proto::ValueInfoProto> = graph
            .input
            .iter()
            .filter(|i| !seen.contains(&i.name))
            .collect();
        let [input] = data_inputs.as_slice() else {
            return Err(unsupported(
                path,
                format!(
                    "the graph has {} data inputs ({}); prunec runs classifiers with one image input",
                    data_inputs.len(),
                    data_inputs.iter().map(|i| format!("`{}`", i.name)).collect::<Vec<_>>().join(", ")
                ),
            ));
        };
        let tensor_type = input.r#type.as_ref().and_then(|t| t.tensor_type.as_ref());
        if tensor_type.map(|t| t.elem_type) != Some(proto::FLOAT) {
            return Err(unsupported(
                path,
                format!("the graph input `{}` is not a float32 tensor", input.name),
            ));
        }
        let dims: Vec<Option<i64>> = tensor_type
            .and_then(|t| t.shape.as_ref())
            .map(|s| s.dim.iter().map(|d| d.dim_value).collect())
            .unwrap_or_default();
        let input_shape: Vec<usize> = dims
            .iter()
            .skip(1)
            .map(|d| d.filter(|v| *v > 0).map(|v| v as usize))
            .collect::<Option<_>>()
            .filter(|s: &Vec<usize>| !s.is_empty())
            .ok_or_else(|| {
                unsupported(
                    path,
                    format!(
                        "the graph input `{}` has shape {dims:?}; prunec needs a batch dimension then fixed sizes (e.g. [N, 1, 28, 28])",
                        input.name
                    ),
                )
            })?;
        numel_of(path, &input.name, &input_shape)?;
        let [output] = graph.output.as_slice() else {
            return Err(unsupported(
                path,
                format!(
                    "the graph has {} outputs; a classifier has one (its class scores)",
                    graph.output.len()
                ),
            ));
        };
        // Nodes.
        let mut nodes = Vec::new();
        for (i, n) in graph.node.iter().enumerate() {
            let label = if n.name.is_empty() {
                format!("node #{i} ({})", n.op_type)
            } else {
                format!("node `{}` ({})", n.name, n.op_type)
            };
            if !(n.domain.is_empty() || n.domain == "ai.onnx") {
                return Err(unsupported(
                    path,
                    format!(
                        "{label}: ops of the domain `{}` are not supported",
                        n.domain
                    ),
                ));
            }
            let out = match n.output.first() {
                Some(o) if !o.is_empty() => o.clone(),
                _ => return Err(corrupt(path, format!("{label} has no output"))),
            };
            if n.op_type == "Constant" {
                let t = n
                    .attribute
                    .iter()
                    .find(|a| a.name == "value")
                    .and_then(|a| a.t.as_ref())
                    .ok_or_else(|| {
                        unsupported(
                            path,
                            format!("{label}: only `value` constants are supported"),
                        )
                    })?;
                let dims = dims_of(path, t)?;
                let numel = numel_of(path, &t.name, &dims)?;
                match t.data_type {
                    proto::FLOAT => constants.push(Constant {
                        name: out,
                        dims,
                        values: float_values(path, t, numel)?,
                        payload: None,
                    }),
                    proto::INT64 => {
                        ints.insert(out, int_values(path, t, numel)?);
                    }
                    other => {
                        other_types.insert(out, other);
                    }
                }
                continue;
            }
            let mut given: Vec<String> = n.input.clone();
            while given.last().is_some_and(|s| s.is_empty()) {
                given.pop();
            }
            let reshape_to = (n.op_type == "Reshape")
                .then(|| given.get(1).and_then(|s| ints.get(s)).cloned())
                .flatten();
            let op =
                Op::parse(n, reshape_to).map_err(|e| unsupported(path, format!("{label}: {e}")))?;
            let (lo, hi) = op.arity();
            if given.len() < lo || given.len() > hi {
                return Err(corrupt(
                    path,
                    format!("{label} has {} inputs, expected {lo} to {hi}", given.len()),
                ));
            }
            let inputs: Vec<String> = given[..op.tensor_inputs(given.len())].to_vec();
            for name in &inputs {
                if name.is_empty() {
                    return Err(unsupported(
                        path,
                        format!("{label}: omitted inputs before the last one are not supported"),
                    ));
                }
                if ints.contains_key(name) {
                    return Err(unsupported(
                        path,
                        format!("{label} reads the int64 tensor `{name}` as data"),
                    ));
                }
                if let Some(t) = other_types.get(name) {
                    return Err(unsupported(path, format!("{label} reads `{name}` of ONNX data type {t}; prunec runs float32 graphs")));
                }
            }
            nodes.push(Node {
                label,
                op,
                inputs,
                output: out,
                weight: None,
            });
        }
        // A final Softmax over the classes is left out: prunec reads class scores as logits
        // (its loss applies log-softmax), and the top-1 class is the same.
        let mut output_name = output.name.clone();
        if let Some(last) = nodes.last() {
            if last.output == output_name && matches!(last.op, Op::Softmax { axis: -1 | 1 }) {
                output_name = last.inputs[0].clone();
                nodes.pop();
            }
        }
        let mut g = OnnxGraph {
            path: path.to_path_buf(),
            bytes,
            input: input.name.clone(),
            input_shape,
            output: output_name,
            classes: 0,
            nodes,
            constants,
            params: Vec::new(),
            costs: Vec::new(),
            last_use: HashMap::new(),
        };
        g.find_params()?;
        let (classes, costs) = g.infer_shapes(1)?;
        // A second batch size proves that no node fixes it.
        g.infer_shapes(2).map_err(|e| match e {
            // A graph valid for one sample that prunec cannot run on batches.
            RuntimeError::Format { path, reason } => RuntimeError::UnsupportedModel {
                path,
                reason: format!(
                    "{reason} (with a batch of 2 samples: prunec evaluates batches, so the graph must not fix its batch size)"
                ),
            },
            e => e,
        })?;
        g.classes = classes;
        g.costs = costs;
        for (i, n) in g.nodes.iter().enumerate() {
            for name in &n.inputs {
                g.last_use.insert(name.clone(), i);
            }
        }
        Ok(g)
    }

    fn constant(&self, name: &str) -> Option<&Constant> {
        self.constants.iter().find(|c| c.name == name)
    }

    /// Marks the weights and biases of Conv, Gemm and MatMul (+ Add) nodes as parameters.
    fn find_params(&mut self) -> Result<()> {
        let path = self.path.clone();
        let mut params: Vec<ParamInfo> = Vec::new();
        let add = |params: &mut Vec<ParamInfo>,
                   c: &Constant,
                   transposed: bool,
                   label: &str|
         -> Result<String> {
            let shape = if transposed {
                c.dims.iter().rev().copied().collect()
            } else {
                c.dims.clone()
            };
            match params.iter().find(|p| p.name == c.name) {
                Some(p) if p.transposed != transposed => Err(unsupported(
                    &path,
                    format!(
                        "{label}: the weight `{}` is also used in the other layout by another node",
                        c.name
                    ),
                )),
                Some(_) => Ok(c.name.clone()),
                None => {
                    params.push(ParamInfo {
                        name: c.name.clone(),
                        shape,
                        transposed,
                    });
                    Ok(c.name.clone())
                }
            }
        };
        let mut matmul_outputs = HashMap::new();
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            let stored = |k: usize| {
                n.inputs
                    .get(k)
                    .and_then(|name| self.constant(name))
                    .filter(|c| c.payload.is_some())
            };
            let (weight, bias) = match n.op {
                Op::Conv { .. } => (
                    stored(1).filter(|c| c.dims.len() == 4).map(|c| (c, false)),
                    stored(2),
                ),
                Op::Gemm { trans_b, .. } => (
                    stored(1)
                        .filter(|c| c.dims.len() == 2)
                        .map(|c| (c, !trans_b)),
                    stored(2).filter(|c| c.dims.len() == 1),
                ),
                Op::MatMul => (
                    stored(1).filter(|c| c.dims.len() == 2).map(|c| (c, true)),
                    None,
                ),
                Op::Binary(ops::Binary::Add) => {
                    // The bias of a MatMul layer: `Add(MatMul output, 1-D initializer)`.
                    let bias = (0..2).find_map(|k| {
                        let other = n.inputs.get(1 - k)?;
                        matmul_outputs
                            .contains_key(other)
                            .then(|| stored(k))
                            .flatten()
                    });
                    (None, bias.filter(|c| c.dims.len() == 1))
                }
                _ => (None, None),
            };
            let label = n.label.clone();
            let is_matmul = matches!(n.op, Op::MatMul);
            let output = n.output.clone();
            let weight = weight.map(|(c, t)| (c.clone(), t));
            let bias = bias.cloned();
            if let Some((c, t)) = weight {
                let name = add(&mut params, &c, t, &label)?;
                self.nodes[i].weight = Some(name);
                if is_matmul {
                    matmul_outputs.insert(output, ());
                }
            }
            if let Some(c) = bias {
                add(&mut params, &c, false, &label)?;
            }
        }
        self.params = params;
        Ok(())
    }

    /// Shapes of every value for a batch of `batch`; returns the classes and each weight's cost.
    fn infer_shapes(&self, batch: usize) -> Result<(usize, Vec<LayerCost>)> {
        let mut shapes: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut first = vec![batch];
        first.extend(&self.input_shape);
        shapes.insert(&self.input, first);
        for c in &self.constants {
            shapes.insert(&c.name, c.dims.clone());
        }
        let mut costs: Vec<LayerCost> = Vec::new();
        for n in &self.nodes {
            let ins: Vec<&[usize]> = n
                .inputs
                .iter()
                .map(|name| {
                    shapes.get(name.as_str()).map(|s| s.as_slice()).ok_or_else(|| {
                        RuntimeError::format(
                            &self.path,
                            format!("{} reads `{name}`, which is neither the input, an initializer nor the output of an earlier node", n.label),
                        )
                    })
                })
                .collect::<Result<_>>()?;
            let out =
                n.op.shape(&ins)
                    .map_err(|e| RuntimeError::format(&self.path, format!("{}: {e}", n.label)))?;
            if let Some(w) = &n.weight {
                let positions = match n.op {
                    Op::Conv { .. } => out[2] * out[3],
                    _ => 1,
                };
                let bias = match n.op {
                    Op::Conv { .. } | Op::Gemm { .. } => {
                        n.inputs.get(2).cloned().unwrap_or_default()
                    }
                    _ => String::new(),
                };
                if !costs.iter().any(|c| &c.weight == w) {
                    costs.push(LayerCost {
                        weight: w.clone(),
                        bias,
                        positions,
                    });
                }
            }
            shapes.insert(&n.output, out);
        }
        let out = shapes.get(self.output.as_str()).ok_or_else(|| {
            RuntimeError::format(
                &self.path,
                format!("no node computes the graph output `{}`", self.output),
            )
        })?;
        match out[..] {
            [b, classes] if b == batch && classes > 0 => Ok((classes, costs)),
            _ => Err(RuntimeError::format(
                &self.path,
                format!("the graph output `{}` has shape {out:?} for {batch} samples; a classifier outputs [samples, classes]", self.output),
            )),
        }
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Shape of one input sample (without the batch dimension).
    pub fn input_shape(&self) -> &[usize] {
        &self.input_shape
    }

    /// Number of class scores the graph outputs.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The prunable parameters, in graph order (per node: weight, then bias).
    pub fn params(&self) -> &[ParamInfo] {
        &self.params
    }

    /// Per-weight costs (output positions per sample), in graph order.
    pub fn costs(&self) -> &[LayerCost] {
        &self.costs
    }

    /// The float constants (initializers and `Constant` values), in file order.
    pub fn constants(&self) -> &[Constant] {
        &self.constants
    }

    /// A parameter's initial values in prunec's layout (transposed where the file's is `[in, out]`).
    pub fn param_values(&self, p: &ParamInfo) -> Result<Vec<f32>> {
        let c = self
            .constant(&p.name)
            .ok_or_else(|| RuntimeError::TensorNotFound {
                name: p.name.clone(),
                context: self.path.display().to_string(),
            })?;
        Ok(if p.transposed {
            transpose(&c.values, c.dims[0], c.dims[1])
        } else {
            c.values.clone()
        })
    }

    fn is_transposed(&self, name: &str) -> bool {
        self.params.iter().any(|p| p.name == name && p.transposed)
    }

    /// Class scores `[b, classes]` (before the graph's final Softmax, if it ends with one) for inputs of `b` samples of the input's size; `lookup`
    /// returns a parameter (prunec's layout) or constant by name. `hook` sees every weight
    /// node's input before the node runs, with the weight's name and the node's op.
    pub fn forward(
        &self,
        x: &Tensor,
        lookup: &dyn Fn(&str) -> Result<Tensor>,
        hook: &mut dyn FnMut(&str, &Op, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let b = x.dim(0).ctx(|| "the model's input".to_string())?;
        let mut shape = vec![b];
        shape.extend(&self.input_shape);
        let x = x.reshape(shape.as_slice()).ctx(|| {
            format!(
                "reshaping inputs {:?} to the graph input {shape:?}",
                x.dims()
            )
        })?;
        let mut values: HashMap<&str, Tensor> = HashMap::new();
        values.insert(&self.input, x);
        for (i, n) in self.nodes.iter().enumerate() {
            let ins: Vec<Tensor> = n
                .inputs
                .iter()
                .map(|name| match values.get(name.as_str()) {
                    Some(t) => Ok(t.clone()),
                    None => {
                        let t = lookup(name)?;
                        if self.is_transposed(name) {
                            t.t().ctx(|| format!("{}: transposing `{name}`", n.label))
                        } else {
                            Ok(t)
                        }
                    }
                })
                .collect::<Result<_>>()?;
            if let Some(w) = &n.weight {
                hook(w, &n.op, &ins[0])?;
            }
            let ctx = || {
                format!(
                    "{} of {}: inputs {:?}",
                    n.label,
                    self.path.display(),
                    ins.iter().map(|t| t.dims().to_vec()).collect::<Vec<_>>()
                )
            };
            let y = n.op.apply(&ins, &ctx)?;
            for name in &n.inputs {
                if self.last_use.get(name) == Some(&i) && *name != self.output {
                    values.remove(name.as_str());
                }
            }
            values.insert(&n.output, y);
        }
        values.remove(self.output.as_str()).ok_or_else(|| {
            RuntimeError::InvalidConfig(format!(
                "the graph output `{}` was not computed",
                self.output
            ))
        })
    }

    /// The file's bytes with each parameter's values replaced by `values(name)` (prunec's
    /// layout); everything else is the file's own bytes.
    pub fn bytes_with(&self, values: &dyn Fn(&str) -> Result<Vec<f32>>) -> Result<Vec<u8>> {
        let mut bytes = self.bytes.clone();
        for p in &self.params {
            let c = self
                .constant(&p.name)
                .ok_or_else(|| RuntimeError::TensorNotFound {
                    name: p.name.clone(),
                    context: self.path.display().to_string(),
                })?;
            let v = values(&p.name)?;
            let v = if p.transposed {
                transpose(&v, c.dims[1], c.dims[0])
            } else {
                v
            };
            let payload = c.payload.as_ref().ok_or_else(|| {
                RuntimeError::InvalidConfig(format!("`{}` is not an initializer", p.name))
            })?;
            wire::write_payload(&mut bytes, payload, &v)
                .map_err(|e| RuntimeError::InvalidConfig(format!("writing `{}`: {e}", p.name)))?;
        }
        Ok(bytes)
    }
}

/// The transpose of a row-major `[rows, cols]` matrix.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}
