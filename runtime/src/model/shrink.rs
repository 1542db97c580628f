//! Structured pruning of sequential classifiers: which parameters move
//! together when one output unit of a layer is removed (a linear layer's
//! neuron, a convolution's channel), and the physically smaller model
//! without the removed units.
//!
//! A unit of layer `L` is its weight row (a conv filter), its bias entry and
//! the input columns of the next weighted layer that read it: one column
//! after a linear layer, one input channel of a following convolution, or
//! the `h * w` flattened columns of the first linear layer after the last
//! convolution. Only activations, max-pooling and flatten may lie between
//! `L` and that reader (each acts on a unit's values alone), so removing the
//! whole group gives the same outputs as zeroing it.

use std::collections::BTreeMap;

use candle_core::Tensor;

use super::arch::{Architecture, Layer};
use super::{Model, Param, Snapshot};
use crate::error::{CandleContext, Result, RuntimeError};
use crate::masks::Masks;

/// What a unit is: a linear layer's output neuron or a convolution's output channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitKind {
    Neuron,
    Channel,
}

impl UnitKind {
    /// The word a recipe writes (`unit = neuron`).
    pub fn word(self) -> &'static str {
        match self {
            UnitKind::Neuron => "neuron",
            UnitKind::Channel => "channel",
        }
    }
}

/// A layer whose output units can be removed, with the parameters each unit spans.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UnitLayer {
    /// The layer's name (`fc1`, `conv2`).
    pub layer: String,
    pub kind: UnitKind,
    /// Output units (rows of `{layer}.weight`).
    pub units: usize,
    /// The next weighted layer, which reads the units.
    pub reader: String,
    /// Input columns of `{reader}.weight` each unit owns, consecutively: 1
    /// (a column or an input channel) or `h * w` (flattened after a conv).
    pub columns: usize,
}

impl UnitLayer {
    pub fn weight(&self) -> String {
        format!("{}.weight", self.layer)
    }
    pub fn bias(&self) -> String {
        format!("{}.bias", self.layer)
    }
    pub fn reader_weight(&self) -> String {
        format!("{}.weight", self.reader)
    }
}

/// The open layer `(name, kind, units, columns per unit)` as read by `reader`.
fn read_by(open: Option<(String, UnitKind, usize, usize)>, reader: &str) -> Option<UnitLayer> {
    open.map(|(layer, kind, units, columns)| UnitLayer {
        layer,
        kind,
        units,
        reader: reader.to_string(),
        columns,
    })
}

/// Why a layer's units cannot be removed (for `check`'s message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoUnits {
    /// The last weighted layer: its outputs are the classes.
    Output,
    /// An ONNX graph: its dependencies are not derived.
    Graph,
    /// Not a weighted layer of the model.
    Unknown,
}

impl Architecture {
    /// The layers whose output units can be removed, in forward order: every
    /// linear and conv layer except the last weighted one.
    pub fn unit_layers(&self) -> Vec<UnitLayer> {
        if matches!(self, Architecture::Onnx { .. }) {
            return Vec::new();
        }
        let layers = self.layers();
        let mut shape = self.input_shape();
        let mut out = Vec::new();
        // The weighted layer whose units flow forward, and its columns per unit so far.
        let mut open: Option<(String, UnitKind, usize, usize)> = None;
        for layer in &layers {
            match layer {
                Layer::Normalize { .. } | Layer::Act(_) => {}
                Layer::MaxPool2d(k) => {
                    if shape.len() == 3 {
                        shape = vec![shape[0], shape[1] / k, shape[2] / k];
                    }
                }
                Layer::Flatten => {
                    if shape.len() == 3 {
                        if let Some(o) = &mut open {
                            o.3 = shape[1] * shape[2];
                        }
                    }
                    shape = vec![shape.iter().product()];
                }
                Layer::Linear { name, outputs, .. } => {
                    out.extend(read_by(open.take(), name));
                    open = Some((name.clone(), UnitKind::Neuron, *outputs, 1));
                    shape = vec![*outputs];
                }
                Layer::Conv2d {
                    name,
                    out_channels,
                    kernel,
                    padding,
                    ..
                } => {
                    out.extend(read_by(open.take(), name));
                    open = Some((name.clone(), UnitKind::Channel, *out_channels, 1));
                    if shape.len() == 3 {
                        let (h, w) = (shape[1] + 2 * padding, shape[2] + 2 * padding);
                        shape = vec![
                            *out_channels,
                            (h + 1).saturating_sub(*kernel),
                            (w + 1).saturating_sub(*kernel),
                        ];
                    }
                }
            }
        }
        out
    }

    /// Why `layer` (a layer name, or a parameter name `layer.weight`) has no
    /// removable units; `None` when it has.
    pub fn why_no_units(&self, layer: &str) -> Option<NoUnits> {
        if matches!(self, Architecture::Onnx { .. }) {
            return Some(NoUnits::Graph);
        }
        let layer = layer.strip_suffix(".weight").unwrap_or(layer);
        if self.unit_layers().iter().any(|u| u.layer == layer) {
            return None;
        }
        let weighted = self.layers().iter().any(|l| match l {
            Layer::Linear { name, .. } | Layer::Conv2d { name, .. } => name == layer,
            _ => false,
        });
        Some(if weighted {
            NoUnits::Output
        } else {
            NoUnits::Unknown
        })
    }

    /// The same network with `kept[layer]` output units in each named layer
    /// (and the matching inputs of the layers that read them), as a
    /// `Sequential` architecture with the layer names unchanged.
    pub fn with_units(&self, kept: &BTreeMap<String, usize>) -> Result<Architecture> {
        let units = self.unit_layers();
        for name in kept.keys() {
            if !units.iter().any(|u| &u.layer == name) {
                return Err(RuntimeError::InvalidConfig(format!(
                    "layer `{name}` has no removable units"
                )));
            }
        }
        let mut layers = self.layers();
        for u in &units {
            let Some(&k) = kept.get(&u.layer) else {
                continue;
            };
            if k == 0 || k > u.units {
                return Err(RuntimeError::InvalidConfig(format!(
                    "layer `{}` keeps {k} of its {} units (at least one, at most all)",
                    u.layer, u.units
                )));
            }
            for l in &mut layers {
                match l {
                    Layer::Linear { name, outputs, .. } if *name == u.layer => *outputs = k,
                    Layer::Conv2d {
                        name, out_channels, ..
                    } if *name == u.layer => *out_channels = k,
                    Layer::Linear { name, inputs, .. } if *name == u.reader => {
                        *inputs = k * u.columns
                    }
                    Layer::Conv2d {
                        name, in_channels, ..
                    } if *name == u.reader => *in_channels = k,
                    _ => {}
                }
            }
        }
        let arch = Architecture::Sequential {
            input_shape: self.input_shape(),
            layers,
        };
        arch.shape_check()?;
        Ok(arch)
    }
}

/// The units kept in each shrunk layer, and how every affected parameter is
/// cut: `(dimension, kept indices)` per parameter name. Applies alike to
/// weights, masks and snapshots.
#[derive(Debug, Clone, Default)]
pub struct UnitRemoval {
    /// Layer -> kept unit indices, ascending.
    pub kept: BTreeMap<String, Vec<usize>>,
    cuts: BTreeMap<String, Vec<(usize, Vec<u32>)>>,
}

impl UnitRemoval {
    /// The removal keeping `kept[layer]` (unit indices) of each named layer of `arch`.
    pub fn new(arch: &Architecture, kept: BTreeMap<String, Vec<usize>>) -> Result<Self> {
        let units = arch.unit_layers();
        let mut cuts: BTreeMap<String, Vec<(usize, Vec<u32>)>> = BTreeMap::new();
        for (layer, keep) in &kept {
            let u = units.iter().find(|u| &u.layer == layer).ok_or_else(|| {
                RuntimeError::InvalidConfig(format!("layer `{layer}` has no removable units"))
            })?;
            if keep.is_empty() || keep.windows(2).any(|w| w[0] >= w[1]) {
                return Err(RuntimeError::InvalidConfig(format!(
                    "layer `{layer}`: kept units must be ascending and not empty"
                )));
            }
            if keep.last().is_some_and(|&k| k >= u.units) {
                return Err(RuntimeError::InvalidConfig(format!(
                    "layer `{layer}` has {} units; kept {keep:?}",
                    u.units
                )));
            }
            let rows: Vec<u32> = keep.iter().map(|&k| k as u32).collect();
            cuts.entry(u.weight()).or_default().push((0, rows.clone()));
            cuts.entry(u.bias()).or_default().push((0, rows));
            let c = u.columns;
            let cols: Vec<u32> = keep
                .iter()
                .flat_map(|&k| (k * c..(k + 1) * c).map(|j| j as u32))
                .collect();
            cuts.entry(u.reader_weight()).or_default().push((1, cols));
        }
        Ok(UnitRemoval { kept, cuts })
    }

    /// Whether nothing is removed.
    pub fn is_empty(&self) -> bool {
        self.cuts.is_empty()
    }

    /// `t` (the tensor of parameter `name`, or of its mask or snapshot) with
    /// the removed units cut out; unaffected names are returned as they are.
    pub fn cut(&self, name: &str, t: &Tensor) -> Result<Tensor> {
        self.cut_dims(name, t, None)
    }

    /// Only the cuts along `dim` (1: the inputs, for per-input statistics
    /// laid out as `[1, inputs, ...]`).
    pub fn cut_dim(&self, name: &str, t: &Tensor, dim: usize) -> Result<Tensor> {
        self.cut_dims(name, t, Some(dim))
    }

    fn cut_dims(&self, name: &str, t: &Tensor, only: Option<usize>) -> Result<Tensor> {
        let Some(cuts) = self.cuts.get(name) else {
            return Ok(t.clone());
        };
        let mut t = t.clone();
        for (dim, idx) in cuts.iter().filter(|(d, _)| only.is_none_or(|o| o == *d)) {
            let ctx = || format!("removing units of `{name}`");
            let ids = Tensor::from_slice(idx, idx.len(), t.device()).ctx(ctx)?;
            t = t.index_select(&ids, *dim).ctx(ctx)?;
        }
        Ok(t)
    }
}

impl Model {
    /// The layers whose output units can be removed (none for ONNX graphs).
    pub fn unit_layers(&self) -> Vec<UnitLayer> {
        if self.graph.is_some() {
            return Vec::new();
        }
        self.arch.unit_layers()
    }

    /// A new, smaller model without the removed units: every affected tensor
    /// is cut, the architecture describes the new widths. File dtypes, the
    /// source file and its unused tensors are kept.
    pub fn without_units(&self, removal: &UnitRemoval) -> Result<Model> {
        if self.graph.is_some() {
            return Err(RuntimeError::InvalidConfig(
                "units of an ONNX graph cannot be removed".into(),
            ));
        }
        let counts: BTreeMap<String, usize> = removal
            .kept
            .iter()
            .map(|(l, k)| (l.clone(), k.len()))
            .collect();
        let arch = self.arch.with_units(&counts)?;
        let (costs, classes) = arch.shape_check()?;
        let mut params = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let t = removal.cut(&p.name, p.var.as_tensor())?;
            let t = t.copy().ctx(|| format!("copying `{}`", p.name))?;
            params.push(Param::new(&p.name, t, p.file_dtype)?);
        }
        let m = Model {
            arch,
            layers: Vec::new(),
            params,
            extra: self.extra.clone(),
            costs,
            classes,
            device: self.device.clone(),
            source: self.source.clone(),
            graph: None,
        }
        .with_layers();
        for (name, shape) in m.arch.param_shapes() {
            if m.param(&name)?.shape() != shape {
                return Err(RuntimeError::InvalidConfig(format!(
                    "`{name}` is {:?} after removing units, the architecture says {shape:?}",
                    m.param(&name)?.shape()
                )));
            }
        }
        Ok(m)
    }
}

impl Snapshot {
    /// The snapshot with the removed units cut out (for rewinding a shrunk model).
    pub fn without_units(&self, removal: &UnitRemoval) -> Result<Snapshot> {
        let tensors = self
            .tensors
            .iter()
            .map(|(n, t)| Ok((n.clone(), removal.cut(n, t)?)))
            .collect::<Result<_>>()?;
        Ok(Snapshot { tensors })
    }
}

impl Masks {
    /// The masks with the removed units cut out.
    pub fn without_units(&self, removal: &UnitRemoval) -> Result<Masks> {
        let mut out = Masks::new();
        for name in self.names() {
            let t = self.get(name).expect("a listed mask");
            out.put(name, removal.cut(name, t)?);
        }
        Ok(out)
    }
}
