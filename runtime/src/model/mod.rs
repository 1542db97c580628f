//! Models: what to build (`ModelSpec`), the built `Model` with named candle `Var`s in a stable
//! order, forward, parameter/FLOP counts, raw f32 access, snapshots and safetensors output.

pub mod arch;
pub mod init;
pub mod shrink;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

pub use arch::{Activation, Architecture, Layer, LayerCost};
pub use init::InitScheme;
pub use shrink::{NoUnits, UnitKind, UnitLayer, UnitRemoval};

use crate::error::{CandleContext, Result, RuntimeError};
use crate::io::{self, TensorHeader};
use crate::paths::{data_dir, require_file};

/// Metadata key under which the architecture (JSON) is stored in our safetensors files.
pub const ARCHITECTURE_KEY: &str = "prunec.architecture";

/// A weights file's path, tensor headers and metadata.
type FileHeaders = (PathBuf, Vec<TensorHeader>, BTreeMap<String, String>);

/// Where a model's weights come from.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum WeightSource {
    /// Fresh seeded initialisation.
    Init(InitScheme),
    /// A PyTorch `.pth` state dict.
    Pth(PathBuf),
    /// A safetensors file.
    Safetensors(PathBuf),
    /// An ONNX graph whose Conv/Gemm/MatMul initializers are the parameters.
    Onnx(PathBuf),
}

/// What model to build: an architecture (or one read from the weights file) and its weights.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelSpec {
    /// `None`: read it from the safetensors metadata (files we wrote), else infer an MLP
    /// from `fc1.weight`, `fc2.weight`, ...
    pub architecture: Option<Architecture>,
    pub weights: WeightSource,
}

impl ModelSpec {
    /// An MLP with `widths` (input features, hidden widths..., classes), freshly initialised.
    pub fn mlp(widths: &[usize], activation: Activation) -> Self {
        ModelSpec {
            architecture: Some(Architecture::Mlp {
                widths: widths.to_vec(),
                activation,
            }),
            weights: WeightSource::Init(InitScheme::default()),
        }
    }

    /// LeNet-300-100 (784-300-100-10, ReLU), freshly initialised.
    pub fn lenet_300_100() -> Self {
        Self::mlp(&[784, 300, 100, 10], Activation::Relu)
    }

    /// LeNet-5 for 1x28x28 inputs, freshly initialised.
    pub fn lenet5() -> Self {
        Self::lenet5_for(10)
    }

    /// LeNet-5 with `classes` outputs.
    pub fn lenet5_for(classes: usize) -> Self {
        let mut architecture = Architecture::lenet5();
        if let Architecture::Lenet5 { classes: c, .. } = &mut architecture {
            *c = classes;
        }
        ModelSpec {
            architecture: Some(architecture),
            weights: WeightSource::Init(InitScheme::default()),
        }
    }

    /// The pretrained digit-recognizer CNN from the fetched `.pth` in the data folder.
    pub fn pretrained_cnn() -> Self {
        Self::pretrained_cnn_from(
            data_dir()
                .join("digit-recognizer")
                .join("handwriting_model.pth"),
        )
    }

    /// The digit-recognizer CNN with weights from `path` (a `.pth` state dict).
    pub fn pretrained_cnn_from(path: impl Into<PathBuf>) -> Self {
        ModelSpec {
            architecture: Some(Architecture::DigitCnn),
            weights: WeightSource::Pth(path.into()),
        }
    }

    /// A model saved as safetensors (architecture from its metadata or inferred).
    pub fn safetensors(path: impl Into<PathBuf>) -> Self {
        ModelSpec {
            architecture: None,
            weights: WeightSource::Safetensors(path.into()),
        }
    }

    /// An ONNX classifier graph (see [`crate::onnx`]).
    pub fn onnx(path: impl Into<PathBuf>) -> Self {
        ModelSpec {
            architecture: None,
            weights: WeightSource::Onnx(path.into()),
        }
    }

    /// Uses this architecture (e.g. for safetensors files written by other tools).
    pub fn with_architecture(mut self, architecture: Architecture) -> Self {
        self.architecture = Some(architecture);
        self
    }

    /// Uses this initialisation scheme (for freshly initialised models).
    pub fn with_init(mut self, scheme: InitScheme) -> Self {
        self.weights = WeightSource::Init(scheme);
        self
    }

    /// A freshly initialised model of `arch` (the same initialisation
    /// scheme as this spec, the default for a weights file): for training a
    /// shrunk architecture from scratch.
    pub fn fresh(&self, arch: Architecture) -> ModelSpec {
        let scheme = match &self.weights {
            WeightSource::Init(s) => *s,
            _ => InitScheme::default(),
        };
        ModelSpec {
            architecture: Some(arch),
            weights: WeightSource::Init(scheme),
        }
    }

    /// The weights file, if any.
    pub fn weights_file(&self) -> Option<&Path> {
        match &self.weights {
            WeightSource::Init(_) => None,
            WeightSource::Pth(p) | WeightSource::Safetensors(p) | WeightSource::Onnx(p) => Some(p),
        }
    }

    /// The ONNX graph this spec reads, opened and checked.
    fn onnx_graph(&self) -> Result<Option<crate::onnx::OnnxGraph>> {
        match &self.weights {
            WeightSource::Onnx(p) => Ok(Some(crate::onnx::OnnxGraph::open(p)?)),
            _ => Ok(None),
        }
    }

    fn file_headers(&self) -> Result<Option<FileHeaders>> {
        match &self.weights {
            WeightSource::Init(_) | WeightSource::Onnx(_) => Ok(None),
            WeightSource::Pth(p) => {
                let p = require_file(p.clone(), "cnn")?;
                let h = io::read_pth_header(&p)?;
                Ok(Some((p, h, BTreeMap::new())))
            }
            WeightSource::Safetensors(p) => {
                if !p.is_file() {
                    return Err(RuntimeError::io(
                        "cannot open model",
                        p,
                        std::io::Error::from(std::io::ErrorKind::NotFound),
                    ));
                }
                let h = io::read_safetensors_header(p)?;
                Ok(Some((p.clone(), h.tensors, h.metadata)))
            }
        }
    }

    /// The architecture, from the spec, the file's metadata, or inferred from tensor names.
    pub fn resolve_architecture(&self) -> Result<Architecture> {
        if let Some(a) = &self.architecture {
            return Ok(a.clone());
        }
        if let Some(g) = self.onnx_graph()? {
            return Ok(onnx_architecture(&g));
        }
        let Some((path, headers, metadata)) = self.file_headers()? else {
            return Err(RuntimeError::InvalidConfig(
                "a freshly initialised model needs an architecture".into(),
            ));
        };
        architecture_from_file(&path, &headers, &metadata)
    }

    /// Parameter names and shapes in the model's order, read from the file header only
    /// (no weights are loaded) or from the architecture for fresh models.
    pub fn param_shapes(&self) -> Result<Vec<(String, Vec<usize>)>> {
        if let Some(g) = self.onnx_graph()? {
            return Ok(onnx_architecture(&g).param_shapes());
        }
        match self.file_headers()? {
            None => {
                let arch = self.resolve_architecture()?;
                arch.shape_check()?;
                Ok(arch.param_shapes())
            }
            Some((path, headers, metadata)) => {
                let arch = match &self.architecture {
                    Some(a) => a.clone(),
                    None => architecture_from_file(&path, &headers, &metadata)?,
                };
                arch.shape_check()?;
                let mut out = Vec::new();
                for (name, expected) in arch.param_shapes() {
                    let h = headers.iter().find(|h| h.name == name).ok_or_else(|| {
                        RuntimeError::TensorNotFound {
                            name: name.clone(),
                            context: path.display().to_string(),
                        }
                    })?;
                    if h.shape != expected {
                        return Err(RuntimeError::ShapeMismatch {
                            name,
                            context: path.display().to_string(),
                            expected,
                            found: h.shape.clone(),
                        });
                    }
                    out.push((name, expected));
                }
                Ok(out)
            }
        }
    }

    /// Builds the model on `device`: loads the weights file, or initialises with `seed`.
    pub fn build(&self, seed: u64, device: &Device) -> Result<Model> {
        if let Some(g) = self.onnx_graph()? {
            return Model::from_onnx(g, device);
        }
        let arch = self.resolve_architecture()?;
        let (costs, classes) = arch.shape_check()?;
        let shapes = arch.param_shapes();
        let mut params = Vec::with_capacity(shapes.len());
        let mut extra = Vec::new();
        let mut source = None;
        match &self.weights {
            WeightSource::Init(scheme) => {
                for (i, (name, shape)) in shapes.iter().enumerate() {
                    let is_bias = name.ends_with(".bias");
                    let weight_shape = if is_bias {
                        let w = name.trim_end_matches(".bias").to_string() + ".weight";
                        shapes
                            .iter()
                            .find(|(n, _)| *n == w)
                            .map(|(_, s)| s.clone())
                            .unwrap_or_default()
                    } else {
                        shape.clone()
                    };
                    let values = init::draw(*scheme, seed, i as u64, shape, &weight_shape, is_bias);
                    let t = Tensor::from_vec(values, shape.as_slice(), device)
                        .ctx(|| format!("initialising `{name}`"))?;
                    params.push(Param::new(name, t, DType::F32)?);
                }
            }
            WeightSource::Pth(p) => {
                let p = require_file(p.clone(), "cnn")?;
                let mut loaded = io::load_pth(&p, device)?;
                params = take_params(&shapes, &mut loaded, &p)?;
                extra = loaded.into_iter().collect();
                source = Some(p);
            }
            WeightSource::Onnx(_) => unreachable!("ONNX models are built from their graph above"),
            WeightSource::Safetensors(p) => {
                let loaded = io::load_safetensors(p, device)?;
                let mut map: BTreeMap<String, Tensor> = BTreeMap::new();
                let order: Vec<String> = loaded.tensors.iter().map(|(n, _)| n.clone()).collect();
                map.extend(loaded.tensors);
                params = take_params(&shapes, &mut map, p)?;
                extra = order
                    .into_iter()
                    .filter_map(|n| map.remove(&n).map(|t| (n, t)))
                    .collect();
                source = Some(p.clone());
            }
        }
        Ok(Model {
            arch,
            layers: Vec::new(),
            params,
            extra,
            costs,
            classes,
            device: device.clone(),
            source,
            graph: None,
        }
        .with_layers())
    }
}

/// What an ONNX graph's file says, as an architecture.
fn onnx_architecture(g: &crate::onnx::OnnxGraph) -> Architecture {
    Architecture::Onnx {
        input_shape: g.input_shape().to_vec(),
        classes: g.classes(),
        params: g
            .params()
            .iter()
            .map(|p| (p.name.clone(), p.shape.clone()))
            .collect(),
        costs: g.costs().to_vec(),
    }
}

fn take_params(
    shapes: &[(String, Vec<usize>)],
    loaded: &mut BTreeMap<String, Tensor>,
    path: &Path,
) -> Result<Vec<Param>> {
    let mut params = Vec::with_capacity(shapes.len());
    for (name, expected) in shapes {
        let t = loaded
            .remove(name)
            .ok_or_else(|| RuntimeError::TensorNotFound {
                name: name.clone(),
                context: path.display().to_string(),
            })?;
        if t.dims() != expected.as_slice() {
            return Err(RuntimeError::ShapeMismatch {
                name: name.clone(),
                context: path.display().to_string(),
                expected: expected.clone(),
                found: t.dims().to_vec(),
            });
        }
        let file_dtype = t.dtype();
        if !matches!(
            file_dtype,
            DType::F32 | DType::F16 | DType::BF16 | DType::F64
        ) {
            return Err(RuntimeError::UnsupportedDType {
                name: name.clone(),
                context: path.display().to_string(),
                dtype: format!("{file_dtype:?}"),
            });
        }
        let t = t
            .to_dtype(DType::F32)
            .ctx(|| format!("converting `{name}` of {} to f32", path.display()))?;
        params.push(Param::new(name, t, file_dtype)?);
    }
    Ok(params)
}

fn architecture_from_file(
    path: &Path,
    headers: &[TensorHeader],
    metadata: &BTreeMap<String, String>,
) -> Result<Architecture> {
    if let Some(json) = metadata.get(ARCHITECTURE_KEY) {
        return serde_json::from_str(json).map_err(|e| {
            RuntimeError::corrupt(
                path,
                format!("metadata `{ARCHITECTURE_KEY}` is not an architecture: {e}"),
            )
        });
    }
    // Infer an MLP from fc1.weight, fc2.weight, ...
    let mut widths = Vec::new();
    for i in 1.. {
        let Some(h) = headers.iter().find(|h| h.name == format!("fc{i}.weight")) else {
            break;
        };
        if h.shape.len() != 2 || (i > 1 && widths.last() != Some(&h.shape[1])) {
            return Err(RuntimeError::corrupt(
                path,
                format!(
                    "fc{i}.weight has shape {:?}, which does not chain as an MLP layer",
                    h.shape
                ),
            ));
        }
        if i == 1 {
            widths.push(h.shape[1]);
        }
        widths.push(h.shape[0]);
    }
    if widths.len() < 2 {
        return Err(RuntimeError::InvalidConfig(format!(
            "cannot tell the architecture of {}: no `{ARCHITECTURE_KEY}` metadata and no fc1.weight; give the architecture",
            path.display()
        )));
    }
    Ok(Architecture::Mlp {
        widths,
        activation: Activation::Relu,
    })
}

/// One trainable parameter.
#[derive(Debug, Clone)]
pub struct Param {
    /// PyTorch-style name, e.g. `fc1.weight`.
    pub name: String,
    /// The f32 variable (gradients are tracked against it).
    pub var: Var,
    /// The dtype it had in the weights file (kept when saving).
    pub file_dtype: DType,
}

impl Param {
    fn new(name: &str, t: Tensor, file_dtype: DType) -> Result<Self> {
        Ok(Param {
            name: name.to_string(),
            var: Var::from_tensor(&t).ctx(|| format!("creating variable `{name}`"))?,
            file_dtype,
        })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.var.elem_count()
    }

    /// Shape.
    pub fn shape(&self) -> Vec<usize> {
        self.var.dims().to_vec()
    }

    /// True for biases (names ending in `.bias`).
    pub fn is_bias(&self) -> bool {
        self.name.ends_with(".bias")
    }
}

/// A built model: a sequential layer list over named parameters.
#[derive(Debug, Clone)]
pub struct Model {
    arch: Architecture,
    layers: Vec<Layer>,
    params: Vec<Param>,
    /// Tensors of the weights file the architecture does not use (kept when saving).
    extra: Vec<(String, Tensor)>,
    costs: Vec<LayerCost>,
    classes: usize,
    device: Device,
    source: Option<PathBuf>,
    /// The graph of an ONNX model, which runs its forward (its layer list is empty).
    graph: Option<std::sync::Arc<crate::onnx::OnnxGraph>>,
}

/// A copy of every parameter's values, for rewinding (lottery tickets) or rollback.
#[derive(Debug, Clone)]
pub struct Snapshot {
    tensors: Vec<(String, Tensor)>,
}

impl Snapshot {
    /// The saved tensors, in model order.
    pub fn tensors(&self) -> &[(String, Tensor)] {
        &self.tensors
    }
}

impl Model {
    /// The model of an ONNX graph: its parameters (prunec's layout) as variables, every
    /// other float initializer as a constant.
    fn from_onnx(g: crate::onnx::OnnxGraph, device: &Device) -> Result<Model> {
        let arch = onnx_architecture(&g);
        let mut params = Vec::with_capacity(g.params().len());
        for p in g.params() {
            let t = Tensor::from_vec(g.param_values(p)?, p.shape.as_slice(), device)
                .ctx(|| format!("loading `{}`", p.name))?;
            params.push(Param::new(&p.name, t, DType::F32)?);
        }
        let mut extra = Vec::new();
        for c in g.constants() {
            if !g.params().iter().any(|p| p.name == c.name) {
                let t = Tensor::from_slice(&c.values, c.dims.as_slice(), device)
                    .ctx(|| format!("loading `{}`", c.name))?;
                extra.push((c.name.clone(), t));
            }
        }
        Ok(Model {
            costs: g.costs().to_vec(),
            classes: g.classes(),
            arch,
            layers: Vec::new(),
            params,
            extra,
            device: device.clone(),
            source: Some(g.path().to_path_buf()),
            graph: Some(std::sync::Arc::new(g)),
        })
    }

    /// The graph of an ONNX model.
    pub fn onnx_graph(&self) -> Option<&crate::onnx::OnnxGraph> {
        self.graph.as_deref()
    }

    /// A tensor the forward reads: a parameter, or a constant of an ONNX graph.
    fn tensor(&self, name: &str) -> Result<Tensor> {
        if let Some(p) = self.params.iter().find(|p| p.name == name) {
            return Ok(p.var.as_tensor().clone());
        }
        self.extra
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.clone())
            .ok_or_else(|| RuntimeError::TensorNotFound {
                name: name.to_string(),
                context: format!("model {}", self.arch_name()),
            })
    }

    /// The ONNX graph's forward with `hook` seeing every weight node's input (see
    /// [`crate::onnx::OnnxGraph::forward`]); `None` for other models.
    pub(crate) fn onnx_forward(
        &self,
        x: &Tensor,
        hook: &mut dyn FnMut(&str, &crate::onnx::Op, &Tensor) -> Result<()>,
    ) -> Option<Result<Tensor>> {
        let g = self.graph.as_ref()?;
        Some(g.forward(x, &|name| self.tensor(name), hook))
    }

    fn with_layers(mut self) -> Self {
        self.layers = self.arch.layers();
        self
    }

    /// The architecture.
    pub fn architecture(&self) -> &Architecture {
        &self.arch
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Number of classes the model outputs.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The weights file the model was loaded from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// Parameters in stable order (per layer: weight then bias).
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// The layers, in order.
    pub(crate) fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Parameter names in order.
    pub fn names(&self) -> Vec<&str> {
        self.params.iter().map(|p| p.name.as_str()).collect()
    }

    /// The parameter called `name`.
    pub fn param(&self, name: &str) -> Result<&Param> {
        self.params
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| RuntimeError::TensorNotFound {
                name: name.to_string(),
                context: format!("model {}", self.arch_name()),
            })
    }

    fn arch_name(&self) -> String {
        match &self.arch {
            Architecture::Mlp { widths, .. } => format!(
                "mlp {}",
                widths
                    .iter()
                    .map(|w| w.to_string())
                    .collect::<Vec<_>>()
                    .join("-")
            ),
            Architecture::Lenet5 { .. } => "lenet5".into(),
            Architecture::Sequential { .. } => "sequential (units removed)".into(),
            Architecture::DigitCnn => "digit-recognizer cnn".into(),
            Architecture::Onnx { .. } => match &self.source {
                Some(p) => format!("onnx {}", p.display()),
                None => "onnx".into(),
            },
        }
    }

    /// Checks that `data` fits this model: sample shape (element count for an MLP)
    /// and class count. Training and evaluation call it before the first batch.
    pub fn check_data(&self, data: &crate::data::Dataset) -> Result<()> {
        let meta = data.meta();
        let want = self.arch.input_shape();
        if !self.arch.accepts(&meta.sample_shape) {
            return Err(RuntimeError::ShapeMismatch {
                name: "input samples".into(),
                context: format!("data set {} for model {}", data.name, self.arch_name()),
                expected: want,
                found: meta.sample_shape.clone(),
            });
        }
        if meta.classes > self.classes {
            return Err(RuntimeError::InvalidConfig(format!(
                "data set {} has {} classes, model {} outputs {}",
                data.name,
                meta.classes,
                self.arch_name(),
                self.classes
            )));
        }
        Ok(())
    }

    /// Class scores (logits) `[b, classes]` for inputs `[b, ...sample_shape]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.onnx_forward(x, &mut |_, _, _| Ok(())) {
            return y;
        }
        let lookup =
            |name: &str| -> Result<Tensor> { Ok(self.param(name)?.var.as_tensor().clone()) };
        let mut h = x.clone();
        for layer in &self.layers {
            h = arch::apply_layer(layer, &h, &lookup)?;
        }
        Ok(h)
    }

    /// Current values of every parameter (f32), in order, detached from the graph.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.var.as_detached_tensor()))
            .collect()
    }

    /// The values of `name` as a flat `Vec<f32>` (row-major).
    pub fn param_f32(&self, name: &str) -> Result<Vec<f32>> {
        let p = self.param(name)?;
        p.var
            .as_tensor()
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .ctx(|| format!("reading `{name}`"))
    }

    /// Replaces the values of `name` from a flat row-major slice of the same length.
    pub fn set_param_f32(&self, name: &str, values: &[f32]) -> Result<()> {
        let p = self.param(name)?;
        if values.len() != p.numel() {
            return Err(RuntimeError::ShapeMismatch {
                name: name.to_string(),
                context: "set_param_f32".into(),
                expected: p.shape(),
                found: vec![values.len()],
            });
        }
        let t = Tensor::from_slice(values, p.var.shape(), &self.device)
            .ctx(|| format!("writing `{name}`"))?;
        p.var.set(&t).ctx(|| format!("writing `{name}`"))
    }

    /// Replaces the values of `name` with a tensor of the same shape.
    pub fn set_param(&self, name: &str, value: &Tensor) -> Result<()> {
        let p = self.param(name)?;
        if value.dims() != p.var.dims() {
            return Err(RuntimeError::ShapeMismatch {
                name: name.to_string(),
                context: "set_param".into(),
                expected: p.shape(),
                found: value.dims().to_vec(),
            });
        }
        let v = value
            .to_dtype(DType::F32)
            .and_then(|v| v.to_device(&self.device))
            .ctx(|| format!("writing `{name}`"))?;
        p.var.set(&v).ctx(|| format!("writing `{name}`"))
    }

    /// Total number of parameters (weights and biases).
    pub fn param_count(&self) -> usize {
        self.params.iter().map(Param::numel).sum()
    }

    /// Per-weight-tensor costs (positions each weight is used at per sample).
    pub fn layer_costs(&self) -> &[LayerCost] {
        &self.costs
    }

    /// Dense forward FLOPs per sample: 2 x multiply-adds of every linear and conv
    /// layer (bias adds, activations and pooling not counted).
    pub fn flops(&self) -> u64 {
        self.costs
            .iter()
            .filter_map(|c| {
                self.param(&c.weight)
                    .ok()
                    .map(|p| 2 * (p.numel() * c.positions) as u64)
            })
            .sum()
    }

    /// An independent copy: the same architecture and values in fresh
    /// variables, so training one copy leaves the other as it was (a plain
    /// `clone` shares the variables).
    pub fn fork(&self) -> Result<Model> {
        let mut m = self.clone();
        for p in &mut m.params {
            let t = p
                .var
                .as_tensor()
                .copy()
                .ctx(|| format!("copying `{}`", p.name))?;
            p.var = Var::from_tensor(&t).ctx(|| format!("copying `{}`", p.name))?;
        }
        Ok(m)
    }

    /// A copy of every parameter.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let tensors = self
            .params
            .iter()
            .map(|p| {
                let t = p
                    .var
                    .as_tensor()
                    .copy()
                    .ctx(|| format!("copying `{}`", p.name))?;
                Ok((p.name.clone(), t))
            })
            .collect::<Result<_>>()?;
        Ok(Snapshot { tensors })
    }

    /// Sets every parameter back to the snapshot's values (names and shapes must match).
    pub fn restore(&self, snapshot: &Snapshot) -> Result<()> {
        if snapshot.tensors.len() != self.params.len() {
            return Err(RuntimeError::InvalidConfig(format!(
                "snapshot holds {} tensors, model has {} parameters",
                snapshot.tensors.len(),
                self.params.len()
            )));
        }
        for (name, t) in &snapshot.tensors {
            self.set_param(name, t)?;
        }
        Ok(())
    }

    /// The tensors to save: parameters in their file dtypes, then unused tensors of the source file.
    pub fn tensors_for_saving(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(self.params.len() + self.extra.len());
        for p in &self.params {
            let t = p
                .var
                .as_tensor()
                .to_dtype(p.file_dtype)
                .ctx(|| format!("converting `{}` for saving", p.name))?;
            out.push((p.name.clone(), t));
        }
        out.extend(self.extra.iter().cloned());
        Ok(out)
    }

    /// Saves the model as safetensors (architecture in the metadata), atomically,
    /// refusing to overwrite the file it was loaded from or any of `inputs`. Returns the sha256.
    pub fn save(&self, path: &Path, inputs: &[&Path]) -> Result<String> {
        if self.graph.is_some() {
            return Err(RuntimeError::InvalidConfig(format!(
                "model {} is an ONNX graph: it is written back as .onnx (`save_onnx`)",
                self.arch_name()
            )));
        }
        let mut all_inputs: Vec<&Path> = inputs.to_vec();
        if let Some(src) = &self.source {
            all_inputs.push(src);
        }
        let mut metadata = BTreeMap::new();
        metadata.insert(
            ARCHITECTURE_KEY.to_string(),
            serde_json::to_string(&self.arch)
                .map_err(|e| RuntimeError::InvalidConfig(e.to_string()))?,
        );
        io::save_safetensors_atomic(path, &self.tensors_for_saving()?, &metadata, &all_inputs)
    }

    /// Writes an ONNX model back as `.onnx`: the bytes of the file it was read from with
    /// only the parameters' values replaced, atomically, refusing to overwrite that file or
    /// any of `inputs`. Returns the sha256.
    pub fn save_onnx(&self, path: &Path, inputs: &[&Path]) -> Result<String> {
        let g = self.graph.as_ref().ok_or_else(|| {
            RuntimeError::InvalidConfig(format!(
                "model {} is not an ONNX graph: it is saved as safetensors",
                self.arch_name()
            ))
        })?;
        let bytes = g.bytes_with(&|name| self.param_f32(name))?;
        let mut all_inputs: Vec<&Path> = inputs.to_vec();
        all_inputs.push(g.path());
        io::write_atomic(path, &bytes, &all_inputs)
    }

    /// sha256 of the parameters' f32 bytes in model order (for determinism checks).
    pub fn weights_sha256(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for p in &self.params {
            h.update(p.name.as_bytes());
            for v in self.param_f32(&p.name)? {
                h.update(v.to_le_bytes());
            }
        }
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }
}
