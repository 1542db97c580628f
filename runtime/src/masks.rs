//! Pruning masks: per-parameter 0/1 tensors that stay applied (weights, gradients, optimizer state).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Tensor};

use crate::error::{CandleContext, Result, RuntimeError};
use crate::model::Model;

/// Parameter name -> 0/1 f32 tensor of the parameter's shape (1 = kept, 0 = pruned).
/// Parameters without a mask are dense.
#[derive(Debug, Clone, Default)]
pub struct Masks {
    masks: BTreeMap<String, Tensor>,
}

/// Multiplies by the mask and turns the -0.0 of negative pruned entries into +0.0.
pub(crate) fn mask_values(t: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    t.mul(mask)?.affine(1.0, 0.0)
}

impl Masks {
    /// No masks: every parameter dense.
    pub fn new() -> Self {
        Masks::default()
    }

    /// Masks keeping exactly the currently non-zero entries of every parameter whose
    /// name is accepted by `select` (e.g. weights only).
    pub fn from_nonzero(model: &Model, select: impl Fn(&str) -> bool) -> Result<Self> {
        let mut masks = Masks::new();
        for p in model.params().iter().filter(|p| select(&p.name)) {
            let m = p
                .var
                .as_tensor()
                .ne(0f32)
                .and_then(|m| m.to_dtype(DType::F32))
                .ctx(|| format!("mask of `{}`", p.name))?;
            masks.masks.insert(p.name.clone(), m);
        }
        Ok(masks)
    }

    /// Sets the mask of `name` from a tensor of the parameter's shape holding only 0 and 1.
    pub fn insert(&mut self, model: &Model, name: &str, mask: &Tensor) -> Result<()> {
        let p = model.param(name)?;
        if mask.dims() != p.var.dims() {
            return Err(RuntimeError::ShapeMismatch {
                name: name.to_string(),
                context: "mask".into(),
                expected: p.shape(),
                found: mask.dims().to_vec(),
            });
        }
        let ctx = || format!("mask of `{name}`");
        let m = mask
            .to_dtype(DType::F32)
            .and_then(|m| m.to_device(model.device()))
            .ctx(ctx)?;
        // Entries that are neither 0 nor 1 make m * (1 - m) non-zero.
        let off = m
            .mul(&m.affine(-1.0, 1.0).ctx(ctx)?)
            .and_then(|x| x.abs())
            .and_then(|x| x.sum_all())
            .and_then(|x| x.to_scalar::<f32>())
            .ctx(ctx)?;
        if off != 0.0 || off.is_nan() {
            return Err(RuntimeError::InvalidConfig(format!(
                "mask of `{name}` holds values other than 0 and 1"
            )));
        }
        self.masks.insert(name.to_string(), m);
        Ok(())
    }

    /// Sets the mask of `name` from a flat row-major buffer (non-zero = kept).
    pub fn insert_u8(&mut self, model: &Model, name: &str, keep: &[u8]) -> Result<()> {
        let p = model.param(name)?;
        if keep.len() != p.numel() {
            return Err(RuntimeError::ShapeMismatch {
                name: name.to_string(),
                context: "mask buffer".into(),
                expected: p.shape(),
                found: vec![keep.len()],
            });
        }
        let ctx = || format!("mask of `{name}`");
        let m = Tensor::from_slice(keep, p.var.shape(), model.device())
            .and_then(|m| m.ne(0u8))
            .and_then(|m| m.to_dtype(DType::F32))
            .ctx(ctx)?;
        self.masks.insert(name.to_string(), m);
        Ok(())
    }

    /// Sets the mask of `name` as it is (a 0/1 f32 tensor already checked).
    pub(crate) fn put(&mut self, name: &str, mask: Tensor) {
        self.masks.insert(name.to_string(), mask);
    }

    /// Removes the mask of `name` (the parameter becomes dense again).
    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.masks.remove(name)
    }

    /// The mask of `name`, if any.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.masks.get(name)
    }

    /// Names of the masked parameters, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.masks.keys().map(String::as_str)
    }

    /// Number of masked parameters.
    pub fn len(&self) -> usize {
        self.masks.len()
    }

    /// True when no parameter is masked.
    pub fn is_empty(&self) -> bool {
        self.masks.is_empty()
    }

    /// The mask as a flat `Vec<u8>` of 0/1 (row-major).
    pub fn to_u8(&self, name: &str) -> Result<Vec<u8>> {
        let m = self
            .masks
            .get(name)
            .ok_or_else(|| RuntimeError::TensorNotFound {
                name: name.to_string(),
                context: "masks".into(),
            })?;
        m.flatten_all()
            .and_then(|m| m.to_dtype(DType::U8))
            .and_then(|m| m.to_vec1::<u8>())
            .ctx(|| format!("reading mask of `{name}`"))
    }

    /// Zeroes the pruned weights of `model` (`w = w * mask`, pruned entries become +0.0).
    pub fn apply(&self, model: &Model) -> Result<()> {
        for (name, m) in &self.masks {
            let p = model.param(name)?;
            let w =
                mask_values(p.var.as_tensor(), m).ctx(|| format!("applying mask of `{name}`"))?;
            p.var.set(&w).ctx(|| format!("applying mask of `{name}`"))?;
        }
        Ok(())
    }

    /// Number of kept entries of `name` (all entries when unmasked).
    pub fn kept(&self, model: &Model, name: &str) -> Result<usize> {
        let p = model.param(name)?;
        match self.masks.get(name) {
            None => Ok(p.numel()),
            Some(m) => m
                .to_dtype(DType::F64)
                .and_then(|m| m.sum_all())
                .and_then(|s| s.to_scalar::<f64>())
                .map(|s| s as usize)
                .ctx(|| format!("counting mask of `{name}`")),
        }
    }

    /// Fraction of pruned entries per masked parameter and over all masked parameters.
    pub fn sparsity(&self, model: &Model) -> Result<(Vec<(String, f64)>, f64)> {
        let (mut kept_all, mut total_all) = (0usize, 0usize);
        let mut per = Vec::new();
        for name in self.masks.keys() {
            let total = model.param(name)?.numel();
            let kept = self.kept(model, name)?;
            per.push((name.clone(), 1.0 - kept as f64 / total as f64));
            kept_all += kept;
            total_all += total;
        }
        let global = if total_all == 0 {
            0.0
        } else {
            1.0 - kept_all as f64 / total_all as f64
        };
        Ok((per, global))
    }

    /// Saves the masks as u8 safetensors (atomically), returning the sha256.
    pub fn save(&self, path: &Path, inputs: &[&Path]) -> Result<String> {
        let tensors = self
            .masks
            .iter()
            .map(|(n, m)| {
                Ok((
                    n.clone(),
                    m.to_dtype(DType::U8).ctx(|| format!("mask of `{n}`"))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        crate::io::save_safetensors_atomic(path, &tensors, &BTreeMap::new(), inputs)
    }

    /// Loads masks saved by [`Masks::save`] (or any 0/1 tensors named after `model`'s parameters).
    pub fn load(path: &Path, model: &Model) -> Result<Self> {
        let loaded = crate::io::load_safetensors(path, model.device())?;
        let mut masks = Masks::new();
        for (name, t) in &loaded.tensors {
            masks.insert(model, name, t).map_err(|e| match e {
                RuntimeError::TensorNotFound { name, .. } => RuntimeError::TensorNotFound {
                    name,
                    context: format!("model (mask file {})", path.display()),
                },
                other => other,
            })?;
        }
        Ok(masks)
    }
}

/// `0..n` in a seeded random order (candidate masks that remove random units).
pub fn random_order(n: usize, seed: u64) -> Vec<usize> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    order
}
