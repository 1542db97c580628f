//! One pruning step on a classifier: a lowered criterion, its selection
//! (scope, pattern, per-layer guards) and the side inputs it reads, applied to
//! the model's weights and masks by the JIT kernels. Shared by one-shot and
//! iterative stages, gradual pruning during training and SAP.

use super::{rt_err, Exec, ModelState, RunError, GRADIENT_BATCHES};
use crate::lower::{self, LoweredCriterion, Side};
use crate::plan::{Action, DataRef, Prune, Step};
use crate::report::Round;
use crate::specs::gradual_plan;
use prunec_kernels::{PruneOptions, Selection, TensorView};
use prunec_lang::check::Value;
use prunec_lang::resolved::{Method, Pattern, Schedule, Scope};
use prunec_lang::Span;
use prunec_runtime as rt;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

/// Per-element and per-column inputs a criterion reads besides the weights.
#[derive(Default)]
pub(super) struct SideInputs {
    /// Values for the kernel's gradient slot, by parameter: loss gradients
    /// (`grad(w)`), or the accumulated score (`accumulate(...)`), or the
    /// random draws (`rand()`).
    pub grad: Option<BTreeMap<String, Vec<f32>>>,
    /// Per-input-column activation norms (`act(x)`), by parameter.
    pub act: Option<BTreeMap<String, Vec<f32>>>,
    /// The criterion input `step`: the training step of the `during` stage
    /// at which this pruning step runs (0 outside training).
    pub step: f32,
}

/// Statistics of one model state, by parameter, computed by a plan's
/// `Statistics` step for the prune step `for_step` (no other reads them).
#[derive(Clone, Default)]
pub(super) struct Stats {
    pub for_step: String,
    pub grad: Option<BTreeMap<String, Vec<f32>>>,
    pub act: Option<BTreeMap<String, Vec<f32>>>,
}

/// An OBS method (`woodfisher`, `mfac`) as the plan resolved it.
#[derive(Clone, Debug)]
pub(super) struct Obs {
    pub cfg: rt::obs::ObsConfig,
    /// Gradients in the Fisher, and samples averaged into each.
    pub grads: usize,
    pub per: usize,
    /// The `by` expression (errors point here).
    pub span: Span,
}

impl Obs {
    /// The method's arguments (`check` resolved them, defaults included).
    pub fn of(p: &Prune, step: &Step) -> Result<Option<Obs>, RunError> {
        let kind = match p.method {
            Method::WoodFisher => rt::obs::FisherKind::Dense,
            Method::MFac => rt::obs::FisherKind::Woodbury,
            _ => return Ok(None),
        };
        let arg = |k: &str| {
            p.args.get(k).copied().ok_or_else(|| {
                RunError::Internal(format!(
                    "step {}: `{}` has no argument `{k}`",
                    step.id,
                    p.method.name()
                ))
            })
        };
        Ok(Some(Obs {
            cfg: rt::obs::ObsConfig {
                kind,
                block: arg("block")? as usize,
                damp: arg("damp")?,
            },
            grads: arg("grads")? as usize,
            per: arg("batch")? as usize,
            span: p.by.expr.span,
        }))
    }

    /// The selection's score: the OBS saliency, which [`Obs::round`] puts in
    /// the kernel's elementwise side slot (where `grad(w)` is read).
    pub fn criterion() -> LoweredCriterion {
        LoweredCriterion {
            expr: prunec_kernels::KExpr::Input(prunec_kernels::KInput::Grad),
            row_sums: vec![],
            row_reduce: vec![],
            side: None,
        }
    }

    /// One OBS round: `grads` gradients on `data`, each targeted tensor's
    /// block-diagonal inverse Fisher, selection by saliency through
    /// `pruner` (its scope, pattern and per-layer guards), then the joint
    /// OBS update of each block's survivors.
    pub fn round(
        &self,
        pruner: &Pruner,
        model: &rt::Model,
        masks: &mut rt::Masks,
        init: &rt::Snapshot,
        keep_frac: f64,
        data: &rt::Dataset,
    ) -> Result<(), RunError> {
        // `check` counted the gradients the data gives (shapes.rs).
        let names = &pruner.selected;
        let before: Vec<Vec<f32>> = names
            .iter()
            .map(|n| model.param_f32(n))
            .collect::<rt::Result<_>>()
            .map_err(rt_err(self.span, "read weights"))?;
        let grads = rt::train::sample_gradients(model, data, self.grads, self.per, names)
            .map_err(rt_err(self.span, "per-sample gradients"))?;
        let mut fishers = Vec::with_capacity(names.len());
        let mut scores = BTreeMap::new();
        for ((n, g), w) in names.iter().zip(grads).zip(&before) {
            let f = rt::obs::TensorFisher::new(&self.cfg, &g, self.grads, w.len(), n)
                .map_err(rt_err(self.span, "inverting the Fisher"))?;
            drop(g);
            scores.insert(n.clone(), f.saliency(w));
            fishers.push(f);
        }
        let side = SideInputs {
            grad: Some(scores),
            ..SideInputs::default()
        };
        pruner.round(model, masks, init, keep_frac, &side)?;
        for ((n, f), w) in names.iter().zip(&fishers).zip(before) {
            let m = mask_words(masks, n, w.len()).map_err(rt_err(self.span, "read mask"))?;
            let keep: Vec<bool> = (0..w.len())
                .map(|i| prunec_kernels::mask_bit(&m, i))
                .collect();
            let mut w = w;
            f.prune(&mut w, &keep)
                .map_err(rt_err(self.span, "the OBS update"))?;
            model
                .set_param_f32(n, &w)
                .map_err(rt_err(self.span, "write weights"))?;
        }
        masks
            .apply(model)
            .map_err(rt_err(self.span, "apply mask"))?;
        Ok(())
    }
}

/// How a prune stage selects: everything but the target fraction.
pub(super) struct Pruner {
    /// The stage (errors point here).
    pub span: Span,
    pub model: String,
    /// The targeted parameters, in model order.
    pub selected: Vec<String>,
    pub crit: LoweredCriterion,
    pub scope: Scope,
    pub pattern: Option<Pattern>,
    pub keep_min: Option<Value>,
    pub keep_max: Option<Value>,
    pub allow_nonfinite: bool,
}

/// The raw buffers of the targeted tensors.
pub(super) struct Buffers {
    pub weights: Vec<Vec<f32>>,
    pub masks: Vec<Vec<u64>>,
    pub inits: Vec<Vec<f32>>,
    pub shapes: Vec<(usize, usize)>,
}

/// The gradient slot's values for `n`, when the round has any.
fn side_grad<'s>(side: &'s SideInputs, n: &str) -> Result<Option<&'s [f32]>, RunError> {
    match &side.grad {
        None => Ok(None),
        Some(g) => g
            .get(n)
            .map(|v| Some(v.as_slice()))
            .ok_or_else(|| RunError::Internal(format!("no gradient slot for {n}"))),
    }
}

/// The activation norms of `n`'s `cols` input columns, when the round reads any.
fn side_act<'s>(
    side: &'s SideInputs,
    n: &str,
    cols: usize,
    span: Span,
) -> Result<Vec<&'s [f32]>, RunError> {
    match &side.act {
        None => Ok(vec![]),
        Some(a) => match a.get(n) {
            Some(v) if v.len() == cols => Ok(vec![v.as_slice()]),
            Some(v) => Err(RunError::Internal(format!(
                "activation statistics of {n} have {} columns, the weight {cols}",
                v.len()
            ))),
            None => Err(RunError::user(
                span,
                format!("no activation statistics were collected for `{n}` (only linear and convolution weights have inputs to measure)"),
            )),
        },
    }
}

/// Packs a runtime mask (or a dense one) into kernel mask words.
pub(super) fn mask_words(masks: &rt::Masks, name: &str, len: usize) -> rt::Result<Vec<u64>> {
    Ok(match masks.get(name) {
        Some(_) => {
            let m = masks.to_u8(name)?;
            let mut words = vec![0u64; prunec_kernels::mask_words(m.len())];
            for (i, b) in m.iter().enumerate() {
                if *b != 0 {
                    words[i / 64] |= 1 << (i % 64);
                }
            }
            words
        }
        None => prunec_kernels::full_mask(len),
    })
}

/// `(rows, cols)` of a parameter seen as a matrix (first dimension by the rest).
pub(super) fn matrix_shape(model: &rt::Model, name: &str) -> rt::Result<(usize, usize)> {
    let p = model.param(name)?;
    let shape = p.shape();
    let rows = shape.first().copied().unwrap_or(1).max(1);
    Ok((rows, p.numel() / rows))
}

/// Keep count of a `keep_min` / `keep_max` value for a tensor of `n` weights.
pub(super) fn per_layer(v: Option<&Value>, n: usize, default: usize) -> usize {
    let inner = match v {
        Some(Value::PerUnit(inner, _)) => Some(inner.as_ref()),
        other => other,
    };
    match inner {
        Some(Value::Fraction(f)) | Some(Value::Float(f)) => {
            ((*f * n as f64).ceil() as usize).min(n)
        }
        Some(Value::Int(c)) => (*c).max(0) as usize,
        _ => default,
    }
}

impl Pruner {
    pub(super) fn buffers(
        &self,
        model: &rt::Model,
        masks: &rt::Masks,
        init: &rt::Snapshot,
    ) -> Result<Buffers, RunError> {
        let span = self.span;
        let init_map: BTreeMap<&str, &candle_core::Tensor> = init
            .tensors()
            .iter()
            .map(|(n, t)| (n.as_str(), t))
            .collect();
        let mut b = Buffers {
            weights: Vec::new(),
            masks: Vec::new(),
            inits: Vec::new(),
            shapes: Vec::new(),
        };
        for n in &self.selected {
            let w = model.param_f32(n).map_err(rt_err(span, "read weights"))?;
            b.shapes
                .push(matrix_shape(model, n).map_err(rt_err(span, "read weights"))?);
            b.masks
                .push(mask_words(masks, n, w.len()).map_err(rt_err(span, "read mask"))?);
            if self.crit.needs_init() {
                let t = init_map
                    .get(n.as_str())
                    .ok_or_else(|| RunError::Internal(format!("no init for {n}")))?;
                b.inits.push(
                    t.flatten_all()
                        .and_then(|t| t.to_vec1::<f32>())
                        .map_err(|e| RunError::Internal(e.to_string()))?,
                );
            }
            b.weights.push(w);
        }
        Ok(b)
    }

    /// Prunes the targeted weights so that `keep_frac` of them (of all of
    /// them, pruned or not) stay, with the stage's scope, pattern and guards.
    pub fn round(
        &self,
        model: &rt::Model,
        masks: &mut rt::Masks,
        init: &rt::Snapshot,
        keep_frac: f64,
        side: &SideInputs,
    ) -> Result<(), RunError> {
        let b = self.buffers(model, masks, init)?;
        let sizes: Vec<usize> = b.weights.iter().map(|w| w.len()).collect();
        let shapes = b.shapes.clone();
        let selection = match self.pattern {
            Some(Pattern::NM { n, m }) => Selection::NM {
                n: n as usize,
                m: m as usize,
            },
            Some(Pattern::Block { rows, cols }) => Selection::Block {
                rows,
                cols,
                keep: keep_frac,
            },
            _ => match self.scope {
                // Channel criteria score whole rows alike: keep whole rows.
                Scope::Layer if !self.crit.row_sums.is_empty() => Selection::PerTensor {
                    keep: shapes
                        .iter()
                        .map(|&(rows, cols)| ((rows as f64) * keep_frac).round() as usize * cols)
                        .collect(),
                },
                Scope::Layer => Selection::PerTensor {
                    keep: sizes
                        .iter()
                        .map(|&n| ((n as f64) * keep_frac).round() as usize)
                        .collect(),
                },
                Scope::Row => {
                    // Per-row keep counts follow each tensor's width: one call per tensor.
                    return self.per_tensor(model, masks, b, side, |(_, cols)| Selection::PerRow {
                        keep_per_row: ((cols as f64) * keep_frac).round() as usize,
                    });
                }
                Scope::Global => {
                    let total: usize = sizes.iter().sum();
                    let min_keep: Vec<usize> = if self.keep_min.is_some() {
                        sizes
                            .iter()
                            .map(|&n| per_layer(self.keep_min.as_ref(), n, 0))
                            .collect()
                    } else {
                        vec![]
                    };
                    let max_keep: Vec<usize> = if self.keep_max.is_some() {
                        sizes
                            .iter()
                            .map(|&n| per_layer(self.keep_max.as_ref(), n, n).min(n))
                            .collect()
                    } else {
                        vec![]
                    };
                    Selection::Global {
                        keep: ((total as f64) * keep_frac).round() as usize,
                        min_keep,
                        max_keep,
                    }
                }
            },
        };
        let names = self.selected.clone();
        self.apply(model, masks, &names, b, side, &selection)
    }

    /// Prunes all targeted tensors at once with an explicit selection.
    pub fn select(
        &self,
        model: &rt::Model,
        masks: &mut rt::Masks,
        init: &rt::Snapshot,
        side: &SideInputs,
        selection: &Selection,
    ) -> Result<(), RunError> {
        let b = self.buffers(model, masks, init)?;
        let names = self.selected.clone();
        self.apply(model, masks, &names, b, side, selection)
    }

    /// Prunes tensor by tensor, each with its own selection.
    fn per_tensor(
        &self,
        model: &rt::Model,
        masks: &mut rt::Masks,
        b: Buffers,
        side: &SideInputs,
        selection: impl Fn((usize, usize)) -> Selection,
    ) -> Result<(), RunError> {
        let mut inits = b.inits.into_iter();
        for (((n, w), m), sh) in self
            .selected
            .iter()
            .zip(b.weights)
            .zip(b.masks)
            .zip(b.shapes)
        {
            let one = Buffers {
                weights: vec![w],
                masks: vec![m],
                inits: inits.next().into_iter().collect(),
                shapes: vec![sh],
            };
            self.apply(
                model,
                masks,
                std::slice::from_ref(n),
                one,
                side,
                &selection(sh),
            )?;
        }
        Ok(())
    }

    /// Scores, selects and masks `names` (with their buffers) in one kernel
    /// call, then writes weights and masks back into the model.
    fn apply(
        &self,
        model: &rt::Model,
        masks: &mut rt::Masks,
        names: &[String],
        mut b: Buffers,
        side: &SideInputs,
        selection: &Selection,
    ) -> Result<(), RunError> {
        let span = self.span;
        let fail = |what: &str, e: prunec_kernels::KernelError| self.kernel_error(what, e);
        let mut opts = PruneOptions {
            scalars: vec![side.step],
            allow_nonfinite: self.allow_nonfinite,
            // The kernel works on these copies, which are only written back on success.
            single_pass: true,
        };
        let row_stats = self.row_stats(names, &mut b, side, &opts)?;
        let grad_of = |n: &str| side_grad(side, n);
        let act_of = |n: &str, cols: usize| side_act(side, n, cols, span);
        loop {
            let mut views: Vec<TensorView> = Vec::new();
            for (i, (w, m)) in b.weights.iter_mut().zip(b.masks.iter_mut()).enumerate() {
                let (rows, cols) = b.shapes[i];
                let mut v = TensorView::new(&names[i], rows, cols, w, m);
                v.grad = grad_of(&names[i])?;
                v.init = b.inits.get(i).map(|x| x.as_slice());
                v.col_stats = act_of(&names[i], cols)?;
                v.row_stats = row_stats[i].iter().map(|r| r.as_slice()).collect();
                views.push(v);
            }
            match prunec_kernels::prune_jit(&self.crit.expr, selection, &mut views, &opts) {
                Ok(_) => break,
                // The single pass zeroed weights its sampled range wrongly excluded: start
                // again from the model's weights with the two-pass kernel.
                Err(prunec_kernels::KernelError::SampleMissed { .. }) if opts.single_pass => {
                    drop(views);
                    opts.single_pass = false;
                    for (i, n) in names.iter().enumerate() {
                        b.weights[i] = model.param_f32(n).map_err(rt_err(span, "read weights"))?;
                        b.masks[i] = mask_words(masks, n, b.weights[i].len())
                            .map_err(rt_err(span, "read mask"))?;
                    }
                }
                Err(e) => return Err(fail("pruning", e)),
            }
        }
        for ((n, w), m) in names.iter().zip(&b.weights).zip(&b.masks) {
            self.write_back(model, masks, n, w, m)?;
        }
        masks.apply(model).map_err(rt_err(span, "apply mask"))?;
        Ok(())
    }

    fn kernel_error(&self, what: &str, e: prunec_kernels::KernelError) -> RunError {
        RunError::User {
            span: Some(self.span),
            message: format!("{what} `{}` failed: {e}", self.model),
            help: None,
        }
    }

    /// Per-row sums the criterion reads (channel norms), from the current
    /// weights, summed in f64 in row order: deterministic whatever the threads.
    fn row_stats(
        &self,
        names: &[String],
        b: &mut Buffers,
        side: &SideInputs,
        opts: &PruneOptions,
    ) -> Result<Vec<Vec<Vec<f32>>>, RunError> {
        let mut row_stats: Vec<Vec<Vec<f32>>> = Vec::new();
        for (i, (w, m)) in b.weights.iter_mut().zip(b.masks.iter_mut()).enumerate() {
            let (rows, cols) = b.shapes[i];
            let mut per_slot = Vec::new();
            for (inner, reduce) in self.crit.row_sums.iter().zip(&self.crit.row_reduce) {
                let mut v = TensorView::new(&names[i], rows, cols, w, m);
                v.grad = side_grad(side, &names[i])?;
                v.init = b.inits.get(i).map(|x| x.as_slice());
                v.col_stats = side_act(side, &names[i], cols, self.span)?;
                let scores = prunec_kernels::score_jit(inner, &v, opts)
                    .map_err(|e| self.kernel_error("scoring", e))?;
                per_slot.push(reduce.apply(&scores, cols));
            }
            row_stats.push(per_slot);
        }
        Ok(row_stats)
    }

    /// Every targeted weight's score under the criterion, tensor by tensor
    /// (nothing is pruned): what the selection would rank.
    pub(super) fn scores(
        &self,
        model: &rt::Model,
        masks: &rt::Masks,
        init: &rt::Snapshot,
        side: &SideInputs,
    ) -> Result<Vec<Vec<f32>>, RunError> {
        let mut b = self.buffers(model, masks, init)?;
        let opts = PruneOptions {
            scalars: vec![side.step],
            allow_nonfinite: self.allow_nonfinite,
            single_pass: false,
        };
        let names = self.selected.clone();
        let row_stats = self.row_stats(&names, &mut b, side, &opts)?;
        let mut out = Vec::with_capacity(names.len());
        for (i, (w, m)) in b.weights.iter_mut().zip(b.masks.iter_mut()).enumerate() {
            let (rows, cols) = b.shapes[i];
            let mut v = TensorView::new(&names[i], rows, cols, w, m);
            v.grad = side_grad(side, &names[i])?;
            v.init = b.inits.get(i).map(|x| x.as_slice());
            v.col_stats = side_act(side, &names[i], cols, self.span)?;
            v.row_stats = row_stats[i].iter().map(|r| r.as_slice()).collect();
            out.push(
                prunec_kernels::score_jit(&self.crit.expr, &v, &opts)
                    .map_err(|e| self.kernel_error("scoring", e))?,
            );
        }
        Ok(out)
    }

    /// Writes one tensor's pruned weights and its mask back into the model.
    fn write_back(
        &self,
        model: &rt::Model,
        masks: &mut rt::Masks,
        name: &str,
        w: &[f32],
        m: &[u64],
    ) -> Result<(), RunError> {
        model
            .set_param_f32(name, w)
            .map_err(rt_err(self.span, "write weights"))?;
        let keep: Vec<u8> = (0..w.len())
            .map(|i| prunec_kernels::mask_bit(m, i) as u8)
            .collect();
        masks
            .insert_u8(model, name, &keep)
            .map_err(rt_err(self.span, "write mask"))
    }

    /// Prunes with an explicit number of weights to keep in every row of
    /// every targeted tensor (`keep[t][row]`), ranking by the criterion.
    pub fn rows_keep(
        &self,
        model: &rt::Model,
        masks: &mut rt::Masks,
        init: &rt::Snapshot,
        side: &SideInputs,
        keep: &[Vec<usize>],
    ) -> Result<(), RunError> {
        let span = self.span;
        let b = self.buffers(model, masks, init)?;
        let opts = PruneOptions {
            scalars: vec![side.step],
            allow_nonfinite: self.allow_nonfinite,
            ..PruneOptions::default()
        };
        for (i, n) in self.selected.iter().enumerate() {
            let (rows, cols) = b.shapes[i];
            let mut w = b.weights[i].clone();
            let mut m = b.masks[i].clone();
            let scores = {
                let mut v = TensorView::new(n, rows, cols, &mut w, &mut m);
                v.grad = side
                    .grad
                    .as_ref()
                    .and_then(|g| g.get(n))
                    .map(|g| g.as_slice());
                v.init = b.inits.get(i).map(|x| x.as_slice());
                prunec_kernels::score_jit(&self.crit.expr, &v, &opts).map_err(|e| {
                    RunError::User {
                        span: Some(span),
                        message: format!("scoring `{}` failed: {e}", self.model),
                        help: None,
                    }
                })?
            };
            if keep[i].len() != rows {
                return Err(RunError::Internal(format!(
                    "{} keep counts for the {rows} rows of {n}",
                    keep[i].len()
                )));
            }
            for (r, &keep_r) in keep[i].iter().enumerate() {
                let mut alive: Vec<usize> = (r * cols..(r + 1) * cols)
                    .filter(|&j| prunec_kernels::mask_bit(&m, j))
                    .collect();
                let k = keep_r.min(alive.len());
                // Highest score first; ties keep the earlier weight (the kernels' rule).
                alive.sort_by(|&a, &c| {
                    prunec_kernels::expr::score_key(scores[c])
                        .cmp(&prunec_kernels::expr::score_key(scores[a]))
                        .then(a.cmp(&c))
                });
                for &j in &alive[k..] {
                    m[j / 64] &= !(1u64 << (j % 64));
                    w[j] = 0.0;
                }
            }
            self.write_back(model, masks, n, &w, &m)?;
        }
        masks.apply(model).map_err(rt_err(span, "apply mask"))?;
        Ok(())
    }
}

/// Batches a calibration pass (activation statistics) reads, in epoch-0 order.
pub const CALIBRATION_BATCHES: usize = 32;

/// A seeded uniform draw in [0, 1) for every weight of a tensor: a counter-based
/// generator (splitmix64 of seed, salt, the tensor's name and the index), so the
/// draws do not depend on the thread count or on the other tensors.
pub(super) fn random_draws(seed: u64, salt: u64, name: &str, n: usize) -> Vec<f32> {
    // FNV-1a of the name.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let base = seed ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ h;
    (0..n as u64)
        .map(|i| {
            let mut z = base.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

/// Flattens a gradient tensor.
fn to_vec(t: &candle_core::Tensor) -> rt::Result<Vec<f32>> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| rt::RuntimeError::InvalidConfig(format!("reading a gradient: {e}")))
}

/// Activation norms (`act(x)`) of the targeted weights.
pub(super) fn act_norms(
    model: &rt::Model,
    data: &rt::Dataset,
    selected: &[String],
) -> rt::Result<BTreeMap<String, Vec<f32>>> {
    Ok(
        rt::calib::activation_norms(model, data, CALIBRATION_BATCHES)?
            .into_iter()
            .filter(|(n, _)| selected.contains(n))
            .collect(),
    )
}

/// One pruning step of a gradual schedule, as applied.
#[derive(Clone, Debug)]
pub(super) struct GradualStep {
    pub step: usize,
    /// The schedule's target sparsity at this step.
    pub target: f64,
    /// Sparsity and PQ index (p = 0.5, q = 1) of the targeted weights after it.
    pub sparsity: f64,
    pub pqi: f64,
    /// Training loss of the batch before it.
    pub loss: f32,
}

/// Gradual pruning during training (AGP, Zhu & Gupta 2017): the training
/// hook that prunes to the schedule's sparsity at its steps.
pub(super) struct Gradual {
    pub pruner: Pruner,
    /// The resolved `gradual(...)` schedule.
    pub schedule: Value,
    pub seed: u64,
    /// Data for `act(x)` (the stage's `calibrate = D`, or the training data).
    pub calib: Option<DataRef>,
    /// `(step, sparsity)` of every pruning step.
    pub plan: Vec<(usize, f64)>,
    next: usize,
    /// Sum and count of the loss gradients since the last pruning step (`grad(w)`).
    grad_sum: Option<(BTreeMap<String, Vec<f32>>, usize)>,
    /// The running sum of an `accumulate(...)` score.
    acc: Option<BTreeMap<String, Vec<f32>>>,
    pub applied: Vec<GradualStep>,
    /// The error that stopped training, if pruning failed.
    pub error: Option<RunError>,
    /// An OBS method prunes at each step instead of the criterion, its
    /// gradients from `calib`.
    pub obs: Option<Obs>,
    /// PDP: soft masks every step (their scope and `tau`) instead of
    /// pruning steps; hardened after training.
    pub soft: Option<(rt::train::SoftScope, f64)>,
}

impl Gradual {
    pub fn new(pruner: Pruner, schedule: Value, seed: u64, calib: Option<DataRef>) -> Self {
        Gradual {
            pruner,
            schedule,
            seed,
            calib,
            plan: Vec::new(),
            next: 0,
            grad_sum: None,
            acc: None,
            applied: Vec::new(),
            error: None,
            obs: None,
            soft: None,
        }
    }

    /// PDP's soft masks for training step `step`: the schedule's sparsity
    /// there (its first before the ramp, its last after).
    pub fn soft_mask(&self, step: usize) -> Option<rt::train::SoftMask> {
        let (scope, tau) = self.soft?;
        // The plan is sorted by step: the last entry at or before `step`.
        let at = self.plan.partition_point(|(s, _)| *s <= step);
        let sparsity = match at.checked_sub(1).and_then(|i| self.plan.get(i)) {
            Some((_, s)) => *s,
            None => self.plan.first().map_or(0.0, |p| p.1),
        };
        Some(rt::train::SoftMask {
            params: self.pruner.selected.clone(),
            sparsity,
            tau,
            scope,
        })
    }

    /// Resolves the schedule into pruning steps for a training run of
    /// `total` steps with `batches` per epoch.
    pub fn make_plan(&mut self, batches: usize, total: usize) -> Result<(), RunError> {
        self.plan = gradual_plan(&self.schedule, batches, total, self.pruner.span)?;
        self.next = 0;
        Ok(())
    }

    pub fn on_gradients(
        &mut self,
        train_step: usize,
        model: &rt::Model,
        grads: &[(String, candle_core::Tensor)],
    ) -> rt::Result<()> {
        if self.next >= self.plan.len() {
            return Ok(());
        }
        let selected = &self.pruner.selected;
        if let Some(Side::Accumulate(step)) = &self.pruner.crit.side {
            let acc = self.acc.get_or_insert_with(BTreeMap::new);
            for (n, g) in grads.iter().filter(|(n, _)| selected.contains(n)) {
                let g = to_vec(g)?;
                let mut w = model.param_f32(n)?;
                let (rows, cols) = matrix_shape(model, n)?;
                let mut m = prunec_kernels::full_mask(w.len());
                let mut v = TensorView::new(n, rows, cols, &mut w, &mut m);
                v.grad = Some(&g);
                let opts = PruneOptions {
                    scalars: vec![train_step as f32],
                    allow_nonfinite: self.pruner.allow_nonfinite,
                    ..PruneOptions::default()
                };
                let s = match prunec_kernels::score_jit(step, &v, &opts) {
                    Ok(s) => s,
                    Err(e) => {
                        self.error = Some(RunError::user(
                            self.pruner.span,
                            format!(
                                "accumulating the score of `{}` failed: {e}",
                                self.pruner.model
                            ),
                        ));
                        return Err(rt::RuntimeError::InvalidConfig("pruning failed".into()));
                    }
                };
                let a = acc.entry(n.clone()).or_insert_with(|| vec![0.0; s.len()]);
                for (x, y) in a.iter_mut().zip(&s) {
                    *x += *y;
                }
            }
        } else if self.pruner.crit.side.is_none()
            && self.pruner.crit.needs_grad()
            && self.obs.is_none()
        {
            let (sum, count) = self.grad_sum.get_or_insert_with(|| (BTreeMap::new(), 0));
            for (n, g) in grads.iter().filter(|(n, _)| selected.contains(n)) {
                let g = to_vec(g)?;
                let a = sum.entry(n.clone()).or_insert_with(|| vec![0.0; g.len()]);
                for (x, y) in a.iter_mut().zip(&g) {
                    *x += *y;
                }
            }
            *count += 1;
        }
        Ok(())
    }

    pub fn update_masks(
        &mut self,
        info: &rt::StepInfo,
        model: &rt::Model,
        masks: &mut rt::Masks,
        init: &rt::Snapshot,
        calib: Option<&rt::Dataset>,
    ) -> rt::Result<bool> {
        if self.soft.is_some() {
            return Ok(false);
        }
        let Some(&(step, sparsity)) = self.plan.get(self.next) else {
            return Ok(false);
        };
        if info.step != step {
            return Ok(false);
        }
        if let Some(obs) = &self.obs {
            let data =
                calib.ok_or_else(|| rt::RuntimeError::InvalidConfig("no gradient data".into()))?;
            let round = obs.round(&self.pruner, model, masks, init, 1.0 - sparsity, data);
            if let Err(e) = round {
                self.error = Some(e);
                return Err(rt::RuntimeError::InvalidConfig("pruning failed".into()));
            }
            return self.record(info, model, masks, step, sparsity);
        }
        let selected = self.pruner.selected.clone();
        let mut side = SideInputs {
            step: step as f32,
            ..SideInputs::default()
        };
        match &self.pruner.crit.side {
            Some(Side::Rand) => {
                let mut draws = BTreeMap::new();
                for n in &selected {
                    let len = model.param(n)?.numel();
                    draws.insert(n.clone(), random_draws(self.seed, step as u64, n, len));
                }
                side.grad = Some(draws);
            }
            Some(Side::Accumulate(_)) => side.grad = self.acc.clone(),
            None if self.pruner.crit.needs_grad() => {
                if let Some((sum, count)) = self.grad_sum.take() {
                    let inv = 1.0 / count.max(1) as f32;
                    side.grad = Some(
                        sum.into_iter()
                            .map(|(n, v)| (n, v.into_iter().map(|x| x * inv).collect()))
                            .collect(),
                    );
                }
            }
            None => {}
        }
        if self.pruner.crit.reads_acts() {
            let data = calib
                .ok_or_else(|| rt::RuntimeError::InvalidConfig("no calibration data".into()))?;
            side.act = Some(act_norms(model, data, &selected)?);
        }
        if let Err(e) = self.pruner.round(model, masks, init, 1.0 - sparsity, &side) {
            self.error = Some(e);
            return Err(rt::RuntimeError::InvalidConfig("pruning failed".into()));
        }
        self.record(info, model, masks, step, sparsity)
    }

    /// Records a pruning step's sparsity and PQ index; moves to the next.
    fn record(
        &mut self,
        info: &rt::StepInfo,
        model: &rt::Model,
        masks: &rt::Masks,
        step: usize,
        sparsity: f64,
    ) -> rt::Result<bool> {
        let (mut total, mut kept) = (0usize, 0usize);
        let mut values = Vec::new();
        for n in &self.pruner.selected {
            let w = model.param_f32(n)?;
            let m = mask_words(masks, n, w.len())?;
            total += w.len();
            for (j, x) in w.iter().enumerate() {
                if prunec_kernels::mask_bit(&m, j) {
                    kept += 1;
                    values.push(*x);
                }
            }
        }
        let (_, pqi) = pq_index(values.into_iter(), 0.5, 1.0);
        self.applied.push(GradualStep {
            step,
            target: sparsity,
            sparsity: 1.0 - kept as f64 / total.max(1) as f64,
            pqi,
            loss: info.loss,
        });
        self.next += 1;
        Ok(true)
    }
}

/// A SAP round's prune count for one group of weights (Diao et al. 2023):
/// `d` alive weights with PQ index `i` prune `floor(d * r)`.
pub(super) fn sap_prune_count(
    d: usize,
    i: f64,
    p: f64,
    q: f64,
    eta: f64,
    gamma: f64,
    beta: f64,
) -> usize {
    if d == 0 {
        return 0;
    }
    let df = d as f64;
    let m = (df * (1.0 + eta).powf(q / (p - q)) * (1.0 - i).powf(q * p / (q - p))).ceil();
    let r = (gamma * (1.0 - m / df)).clamp(0.0, beta);
    ((df * r).floor() as usize).min(d)
}

/// PQ index of the alive values, with sums in f64 in index order.
pub(super) fn pq_index(alive: impl Iterator<Item = f32>, p: f64, q: f64) -> (usize, f64) {
    let (mut sp, mut sq, mut d) = (0.0f64, 0.0f64, 0usize);
    for x in alive {
        let a = (x as f64).abs();
        sp += a.powf(p);
        sq += a.powf(q);
        d += 1;
    }
    (d, rt::eval::pqi_from_sums(sp, sq, d, p, q))
}

impl Exec<'_> {
    /// The pruner of a prune stage with a lowered criterion.
    fn pruner(
        &mut self,
        step: &Step,
        name: &str,
        span: Span,
        crit: LoweredCriterion,
        (scope, pattern): (Scope, Option<Pattern>),
    ) -> Result<Pruner, RunError> {
        self.model(name, span)?;
        let selected = self.select_params(step, &self.models[name].model)?;
        self.targets.insert(name.to_string(), selected.clone());
        Ok(Pruner {
            span: step.span,
            model: name.to_string(),
            selected,
            crit,
            scope,
            pattern,
            keep_min: self.option(step, "keep_min"),
            keep_max: self.option(step, "keep_max"),
            allow_nonfinite: matches!(
                self.option(step, "allow_nonfinite"),
                Some(Value::Bool(true))
            ),
        })
    }

    /// Gradients, random draws and activation statistics for one round;
    /// `pre`: those an earlier step computed for it (round one).
    pub(super) fn side_inputs(
        &mut self,
        step: &Step,
        stats_data: Option<&DataRef>,
        pruner: &Pruner,
        round: usize,
        pre: Stats,
    ) -> Result<SideInputs, RunError> {
        let mut side = SideInputs::default();
        let name = pruner.model.clone();
        let pick = |m: BTreeMap<String, Vec<f32>>| -> BTreeMap<String, Vec<f32>> {
            m.into_iter()
                .filter(|(n, _)| pruner.selected.contains(n))
                .collect()
        };
        match &pruner.crit.side {
            Some(Side::Rand) => {
                let model = &self.models[&name].model;
                let mut draws = BTreeMap::new();
                for n in &pruner.selected {
                    let len = model
                        .param(n)
                        .map_err(rt_err(step.span, "read weights"))?
                        .numel();
                    let salt = ((step.stage.0 as u64) << 20) ^ round as u64;
                    draws.insert(n.clone(), random_draws(self.r.seed, salt, n, len));
                }
                side.grad = Some(draws);
            }
            Some(Side::Accumulate(_)) => {
                return Err(RunError::User {
                    span: step.site.by,
                    message: "`accumulate(...)` sums a score over training steps: this prune stage trains no step".into(),
                    help: Some("prune gradually during training: `prune ... (schedule = gradual(...)) during train ...`".into()),
                });
            }
            None if pruner.crit.needs_grad() && pre.grad.is_some() => {
                side.grad = pre.grad.map(pick);
            }
            None if pruner.crit.needs_grad() => {
                let on = step.on.as_ref().ok_or_else(|| {
                    RunError::user(
                        step.site.keyword,
                        "this criterion reads gradients: add `on DATASET`",
                    )
                })?;
                side.grad = Some(pick(self.loss_gradients(&name, &on.name, step.span)?));
            }
            None => {}
        }
        if let (false, Some(act)) = (!pruner.crit.reads_acts(), pre.act) {
            side.act = Some(pick(act));
        } else if pruner.crit.reads_acts() {
            let state = &self.models[&name];
            side.act = Some(match (&state.calibration, stats_data) {
                (_, Some(d)) => pick(self.activation_norms(&name, &d.name, d.span)?),
                (Some(c), None) => c.clone(),
                (None, None) => {
                    return Err(RunError::User {
                        span: step.site.by,
                        message: "this criterion reads activation statistics (`act(x)`), but no calibration data is given".into(),
                        help: Some("add `calibrate = DATASET` to the stage options, or a `calibrate MODEL on DATASET` stage before it".into()),
                    })
                }
            });
        }
        Ok(side)
    }

    /// A `Statistics` step: loss gradients and activation norms of every
    /// weight of `name`'s current state, for the prune step after it.
    pub(super) fn statistics(
        &mut self,
        step: &Step,
        for_step: &str,
        name: &str,
        gradients: Option<&str>,
        activations: Option<&str>,
    ) -> Result<(), RunError> {
        self.model(name, step.site.subject)?;
        let stats = Stats {
            for_step: for_step.to_string(),
            grad: match gradients {
                Some(d) => Some(self.loss_gradients(name, d, step.span)?),
                None => None,
            },
            act: match activations {
                Some(d) => Some(self.activation_norms(name, d, step.span)?),
                None => None,
            },
        };
        self.models.get_mut(name).unwrap().stats = Some(stats);
        Ok(())
    }

    /// Mean loss gradients of every weight of `name`'s current state over
    /// the first batches of `data` (`span`: the stage, for errors).
    fn loss_gradients(
        &mut self,
        name: &str,
        data: &str,
        span: Span,
    ) -> Result<BTreeMap<String, Vec<f32>>, RunError> {
        let data = self.dataset_named(data, span)?;
        if self.progress {
            eprintln!(
                "gradients of {name}: {} batches",
                GRADIENT_BATCHES.min(data.num_batches())
            );
        }
        let g = rt::gradients(&self.models[name].model, &data, GRADIENT_BATCHES)
            .map_err(rt_err(span, "computing gradients"))?;
        g.into_iter()
            .map(|(n, t)| {
                Ok((
                    n,
                    to_vec(&t).map_err(|e| RunError::Internal(e.to_string()))?,
                ))
            })
            .collect()
    }

    /// Input-column activation norms of every weight of `name`'s current
    /// state over the first batches of `data`.
    fn activation_norms(
        &mut self,
        name: &str,
        data: &str,
        span: Span,
    ) -> Result<BTreeMap<String, Vec<f32>>, RunError> {
        let data = self.dataset_named(data, span)?;
        if self.progress {
            eprintln!(
                "calibrate {name}: {} batches",
                CALIBRATION_BATCHES.min(data.num_batches())
            );
        }
        let norms =
            rt::calib::activation_norms(&self.models[name].model, &data, CALIBRATION_BATCHES)
                .map_err(rt_err(span, "calibration"))?;
        Ok(norms.into_iter().collect())
    }

    /// `calibrate MODEL on DATA`: activation statistics for later prune stages.
    pub(super) fn calibrate(&mut self, step: &Step) -> Result<(), RunError> {
        let (name, data_name) = self.model_and_data(step)?;
        let stats = self.activation_norms(&name, &data_name, step.span)?;
        self.models.get_mut(&name).unwrap().calibration = Some(stats);
        Ok(())
    }

    /// A prune step: the method, schedule, scope and per-round sparsities
    /// the plan resolved; the round block's steps after each round.
    pub(super) fn prune(&mut self, step: &Step, p: &Prune) -> Result<(), RunError> {
        let (name, span) = Self::subject_name(step)?;
        let by = &p.by.expr;
        match p.method {
            Method::Sap => return self.prune_sap(step, p, &name, span),
            Method::SparseGpt => {
                return Err(RunError::User {
                    span: Some(by.span),
                    message: "SparseGPT reconstructs the linear layers of language models; `prunec run` does not apply it to classifiers".into(),
                    help: Some("prune classifiers with a criterion such as `std.magnitude` or `std.wanda`".into()),
                })
            }
            Method::Armor | Method::Heapr | Method::Reap | Method::Frequency => {
                return Err(RunError::Internal(format!(
                    "`{}` reached a classifier's prune step",
                    p.method.name()
                )))
            }
            Method::Criterion | Method::WoodFisher | Method::MFac => {}
        }
        let obs = Obs::of(p, step)?;
        let crit = match (&obs, &p.kernel) {
            (Some(_), _) => Obs::criterion(),
            (None, Some(k)) => k.clone(),
            (None, None) => lower::criterion_to_kernel(self.r, by)?,
        };
        if let Some(unit) = p.unit {
            return self.prune_units(step, p, &name, span, crit, unit);
        }
        let pruner = self.pruner(step, &name, span, crit, (p.scope, p.pattern))?;
        if let Some(during) = &p.during_step {
            let Schedule::Gradual(schedule) = &p.schedule else {
                return Err(RunError::User {
                    span: Some(step.site.keyword),
                    message: "pruning `during` training needs a gradual schedule".into(),
                    help: Some("add `schedule = gradual(to = 90%, end = step 2000)`".into()),
                });
            };
            return self.prune_during(p, during, pruner, schedule.clone(), obs);
        }
        let (rounds, rewind) = match &p.schedule {
            Schedule::Iterative { rounds, rewind } => (*rounds, rewind.clone()),
            Schedule::OneShot { rounds } => (*rounds, None),
            Schedule::Gradual(_) => {
                return Err(RunError::User {
                    span: Some(step.site.keyword),
                    message: "a gradual schedule prunes during training".into(),
                    help: Some(
                        "write `prune ... (schedule = ...) during train MODEL on DATA (...)`"
                            .into(),
                    ),
                })
            }
        };
        // A fraction; an N:M target (`to 2:4`) is the step's pattern.
        let target = match (p.target, step.site.to, p.pattern) {
            (Some(t), _, None | Some(Pattern::Block { .. })) => t,
            (None, Some(to), None) => {
                return Err(RunError::user(to, "the target is not a constant fraction"))
            }
            _ => 0.0,
        };
        // Round one reads what the plan's `ID.stats` step computed for this
        // step, and the norms of an earlier `calibrate` stage the optimized
        // IR merged this stage's calibration into (same state, same data).
        let mut pre = self.round_one_stats(step, p, &name);
        // The optimized IR folded the target into per-round sparsities.
        for round in 1..=rounds {
            let keep_frac = match &p.sparsities {
                planned if planned.len() == rounds => 1.0 - planned[round - 1],
                _ => (1.0 - target).powf(round as f64 / rounds as f64),
            };
            if let Some(obs) = &obs {
                let on = p.stats_data.as_ref().or(step.on.as_ref()).ok_or_else(|| {
                    RunError::user(obs.span, "this method reads gradients: add `on DATASET`")
                })?;
                let data = self.dataset_named(&on.name, on.span)?;
                if self.progress {
                    eprintln!(
                        "{} {name}: {} gradients of {} sample(s) on {}",
                        p.method.name(),
                        obs.grads,
                        obs.per,
                        on.name
                    );
                }
                let state = self.models.get_mut(&name).unwrap();
                obs.round(
                    &pruner,
                    &state.model,
                    &mut state.masks,
                    &state.init,
                    keep_frac,
                    &data,
                )?;
            } else {
                let side = self.side_inputs(
                    step,
                    p.stats_data.as_ref(),
                    &pruner,
                    round,
                    std::mem::take(&mut pre),
                )?;
                let state = self.models.get_mut(&name).unwrap();
                pruner.round(
                    &state.model,
                    &mut state.masks,
                    &state.init,
                    keep_frac,
                    &side,
                )?;
            }
            if self.progress {
                eprintln!(
                    "prune {name}: round {round}/{rounds}, kept {:.2}% of the targeted weights",
                    keep_frac * 100.0
                );
            }
            self.rewind(step.span, &name, rewind.as_ref())?;
            self.after_round(
                step,
                &name,
                round,
                rounds > 1 || !step.each_round.is_empty(),
                BTreeMap::new(),
            )?;
        }
        Ok(())
    }

    /// What round one of a prune step reads: the statistics the plan's
    /// `ID.stats` step computed for it, and the norms of an earlier
    /// `calibrate` stage the optimized IR merged its calibration into.
    pub(super) fn round_one_stats(&mut self, step: &Step, p: &Prune, name: &str) -> Stats {
        let mut pre = self
            .models
            .get_mut(name)
            .and_then(|m| m.stats.take())
            .filter(|st| st.for_step == step.id)
            .unwrap_or_default();
        if p.reads_from.is_some() && p.activations.is_none() && pre.act.is_none() {
            pre.act = self.models[name].calibration.clone();
        }
        pre
    }

    /// Rewinds the survivors (lottery tickets): to their initial values or to
    /// their values after `k` epochs of training.
    pub(super) fn rewind(
        &mut self,
        span: Span,
        name: &str,
        rewind: Option<&Value>,
    ) -> Result<(), RunError> {
        let state: &mut ModelState = self.models.get_mut(name).unwrap();
        let snap = match rewind {
            Some(Value::Duration { count: 0, .. }) => &state.init,
            Some(v) if v.as_str() == Some("init") => &state.init,
            Some(Value::Duration { count, .. }) => match state.rewind_points.get(&(*count as usize)) {
                Some(Some(snap)) => snap,
                _ => {
                    return Err(RunError::User {
                        span: Some(span),
                        message: format!(
                            "`rewind = epoch {count}` needs the weights after {count} epochs of training, but `{name}` trained only {} epoch(s) before this stage",
                            state.epochs_trained
                        ),
                        help: Some("train first, or rewind to an earlier epoch".into()),
                    })
                }
            },
            _ => return Ok(()),
        };
        state.model.restore(snap).map_err(rt_err(span, "rewind"))?;
        state
            .masks
            .apply(&state.model)
            .map_err(rt_err(span, "rewind"))?;
        Ok(())
    }

    /// Records a round and runs the stage's round block.
    pub(super) fn after_round(
        &mut self,
        step: &Step,
        name: &str,
        round: usize,
        record: bool,
        metrics: BTreeMap<String, f64>,
    ) -> Result<(), RunError> {
        let (sparsity, pqi) = self.sparsity_pqi(name, step.span)?;
        self.round = Some(Round {
            round,
            sparsity,
            pqi,
            metrics,
        });
        for inner in &step.each_round {
            self.step(inner)?;
            if self.interrupted.load(Ordering::SeqCst) {
                return Err(RunError::Interrupted);
            }
        }
        let r = self.round.take().unwrap();
        if record {
            self.report.rounds.push(r);
        }
        Ok(())
    }

    /// `prune ... (schedule = gradual(...)) during train ...`.
    fn prune_during(
        &mut self,
        p: &Prune,
        during: &Step,
        pruner: Pruner,
        schedule: Value,
        obs: Option<Obs>,
    ) -> Result<(), RunError> {
        if !matches!(during.action, Action::Train { .. }) {
            return Err(RunError::user(
                during.site.keyword,
                "pruning runs during a `train` or `finetune` stage",
            ));
        }
        let name = pruner.model.clone();
        let (inner_name, _) = Self::subject_name(during)?;
        if inner_name != name {
            return Err(RunError::user(
                during.span,
                format!("pruning `{name}` during the training of another model (`{inner_name}`)"),
            ));
        }
        // Activation statistics, or an OBS method's gradients, come from the
        // stage's own data (`on D`, `calibrate = D`), else the training data.
        let calib = if !pruner.crit.reads_acts() && obs.is_none() {
            None
        } else {
            p.stats_data.clone().or_else(|| during.on.clone())
        };
        let pdp = schedule.call_name() == Some("pdp");
        let final_sparsity = schedule.arg("to").and_then(|v| v.as_f64()).unwrap_or(0.0);
        let tau = schedule
            .arg("tau")
            .and_then(|v| v.as_f64())
            .or_else(|| prunec_lang::builtins::default_number("pdp", Some("tau")))
            .ok_or_else(|| RunError::Internal("pdp without `tau`".into()))?;
        let soft_scope = match (pruner.pattern, pruner.scope) {
            (Some(Pattern::NM { n, m }), _) => rt::train::SoftScope::NM {
                n: n as usize,
                m: m as usize,
            },
            (None, Scope::Layer) => rt::train::SoftScope::Layer,
            (None, Scope::Global) => rt::train::SoftScope::Global,
            _ => {
                return Err(RunError::user(
                    p.by.expr.span,
                    "PDP's soft masks take a global or per-layer threshold, or an N:M pattern",
                ))
            }
        };
        let mut g = Gradual::new(pruner, schedule, self.r.seed, calib);
        g.obs = obs;
        if pdp {
            g.soft = Some((soft_scope, tau));
        }
        self.train_with(during, Some(&mut g), None)?;
        if pdp {
            // Harden: the soft masks' threshold at the final sparsity is a
            // magnitude selection with the stage's scope or pattern.
            let state = self.models.get_mut(&name).unwrap();
            g.pruner.round(
                &state.model,
                &mut state.masks,
                &state.init,
                1.0 - final_sparsity,
                &SideInputs::default(),
            )?;
            let (sparsity, pqi) = self.sparsity_pqi(&name, during.span)?;
            self.report.rounds.push(Round {
                round: 1,
                sparsity,
                pqi,
                metrics: BTreeMap::new(),
            });
            if self.progress {
                eprintln!(
                    "prune {name}: soft masks hardened at {:.2}%",
                    sparsity * 100.0
                );
            }
            return Ok(());
        }
        for (i, a) in g.applied.iter().enumerate() {
            let metrics = BTreeMap::from([
                ("step".to_string(), a.step as f64),
                ("train_loss".to_string(), a.loss as f64),
                ("target_sparsity".to_string(), a.target),
            ]);
            self.report.rounds.push(Round {
                round: i + 1,
                sparsity: a.sparsity,
                pqi: a.pqi,
                metrics,
            });
        }
        if self.progress {
            eprintln!(
                "prune {name} during training: {} pruning steps",
                g.applied.len()
            );
        }
        Ok(())
    }

    /// SAP (Diao et al. 2023): each round, the PQ index of every group's
    /// surviving weights sets how many of them to prune by magnitude.
    fn prune_sap(
        &mut self,
        step: &Step,
        plan: &Prune,
        name: &str,
        span: Span,
    ) -> Result<(), RunError> {
        // `check` resolved every argument (defaults included) and p < q.
        let arg = |k: &str| {
            plan.args.get(k).copied().ok_or_else(|| {
                RunError::Internal(format!("step {}: SAP has no argument `{k}`", step.id))
            })
        };
        let (p, q) = (arg("p")?, arg("q")?);
        let (eta, gamma, beta) = (arg("eta")?, arg("gamma")?, arg("beta")?);
        let magnitude = LoweredCriterion {
            expr: prunec_kernels::KExpr::un(
                prunec_kernels::UnOp::Abs,
                prunec_kernels::KExpr::Input(prunec_kernels::KInput::Weight),
            ),
            row_sums: vec![],
            row_reduce: vec![],
            side: None,
        };
        let pruner = self.pruner(step, name, span, magnitude, (plan.scope, plan.pattern))?;
        if pruner.pattern.is_some() {
            return Err(RunError::user(
                step.span,
                "SAP prunes unstructured weights: drop `pattern`",
            ));
        }
        let rounds = plan.schedule.rounds().unwrap_or(1);
        let side = SideInputs::default();
        for round in 1..=rounds {
            let state = self.models.get_mut(name).unwrap();
            let b = pruner.buffers(&state.model, &state.masks, &state.init)?;
            let alive = |b: &Buffers, t: usize, range: std::ops::Range<usize>| -> Vec<f32> {
                range
                    .filter(|&j| prunec_kernels::mask_bit(&b.masks[t], j))
                    .map(|j| b.weights[t][j])
                    .collect()
            };
            let counts: Vec<usize> = (0..b.weights.len())
                .map(|t| {
                    (0..b.weights[t].len())
                        .filter(|&j| prunec_kernels::mask_bit(&b.masks[t], j))
                        .count()
                })
                .collect();
            let mut pruned = 0usize;
            match pruner.scope {
                Scope::Layer => {
                    let keep: Vec<usize> = (0..b.weights.len())
                        .map(|t| {
                            let (d, i) =
                                pq_index(alive(&b, t, 0..b.weights[t].len()).into_iter(), p, q);
                            let k = sap_prune_count(d, i, p, q, eta, gamma, beta);
                            pruned += k;
                            d - k
                        })
                        .collect();
                    pruner.select(
                        &state.model,
                        &mut state.masks,
                        &state.init,
                        &side,
                        &Selection::PerTensor { keep },
                    )?;
                }
                Scope::Row => {
                    let keep: Vec<Vec<usize>> = (0..b.weights.len())
                        .map(|t| {
                            let (rows, cols) = b.shapes[t];
                            (0..rows)
                                .map(|r| {
                                    let (d, i) = pq_index(
                                        alive(&b, t, r * cols..(r + 1) * cols).into_iter(),
                                        p,
                                        q,
                                    );
                                    let k = sap_prune_count(d, i, p, q, eta, gamma, beta);
                                    pruned += k;
                                    d - k
                                })
                                .collect()
                        })
                        .collect();
                    pruner.rows_keep(&state.model, &mut state.masks, &state.init, &side, &keep)?;
                }
                Scope::Global => {
                    let values =
                        (0..b.weights.len()).flat_map(|t| alive(&b, t, 0..b.weights[t].len()));
                    let (d, i) = pq_index(values, p, q);
                    let k = sap_prune_count(d, i, p, q, eta, gamma, beta);
                    pruned = k;
                    pruner.select(
                        &state.model,
                        &mut state.masks,
                        &state.init,
                        &side,
                        &Selection::Global {
                            keep: d - k,
                            min_keep: vec![],
                            max_keep: vec![],
                        },
                    )?;
                }
            }
            let alive_before: usize = counts.iter().sum();
            if self.progress {
                eprintln!("prune {name} (sap): round {round}/{rounds}, pruned {pruned} of {alive_before} surviving weights");
            }
            let metrics = BTreeMap::from([(
                "prune_ratio".to_string(),
                if alive_before == 0 {
                    0.0
                } else {
                    pruned as f64 / alive_before as f64
                },
            )]);
            self.after_round(step, name, round, true, metrics)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prunec_kernels::{KExpr, KInput, UnOp};

    #[test]
    fn pq_index_is_zero_for_equal_weights_and_grows_with_sparsity() {
        assert_eq!(pq_index([2.0f32; 16].into_iter(), 0.5, 1.0), (16, 0.0));
        // One non-zero of four alive: 1 - 4^(1 - 2) * 1 / 1 = 0.75.
        let (d, i) = pq_index([0.0f32, -3.0, 0.0, 0.0].into_iter(), 0.5, 1.0);
        assert_eq!(d, 4);
        assert!((i - 0.75).abs() < 1e-12, "{i}");
        assert_eq!(pq_index(std::iter::empty(), 0.5, 1.0), (0, 0.0));
    }

    #[test]
    fn sap_prunes_nothing_from_dense_like_groups_and_caps_the_ratio() {
        // I = 0: m = d (1 + eta)^(-2), r = gamma (1 - (1 + eta)^-2) ~ 0.0024.
        let d = 10_000;
        let k = sap_prune_count(d, 0.0, 0.5, 1.0, 0.001, 1.2, 0.9);
        let m = (d as f64 * 1.001f64.powf(-2.0)).ceil();
        assert_eq!(k, (d as f64 * 1.2 * (1.0 - m / d as f64)).floor() as usize);
        assert!(k > 0 && k < 30, "{k}");
        // A sparse-looking group: (1 - I)^(-1) shrinks m; the ratio is capped by beta.
        assert_eq!(sap_prune_count(1000, 0.9, 0.5, 1.0, 0.0, 1.2, 0.5), 500);
        assert_eq!(sap_prune_count(0, 0.5, 0.5, 1.0, 0.0, 1.2, 0.9), 0);
        // Larger I prunes more.
        let a = sap_prune_count(1000, 0.1, 0.5, 1.0, 0.001, 1.2, 0.9);
        let b = sap_prune_count(1000, 0.2, 0.5, 1.0, 0.001, 1.2, 0.9);
        assert!(b > a, "{a} {b}");
    }

    #[test]
    fn random_draws_are_uniform_seeded_and_per_tensor() {
        let a = random_draws(7, 1, "fc1.weight", 100_000);
        assert_eq!(a, random_draws(7, 1, "fc1.weight", 100_000));
        assert_ne!(a, random_draws(7, 1, "fc2.weight", 100_000));
        assert_ne!(a, random_draws(8, 1, "fc1.weight", 100_000));
        assert_ne!(a, random_draws(7, 2, "fc1.weight", 100_000));
        assert!(a.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        let low = a.iter().filter(|&&x| x < 0.1).count();
        assert!((9_000..11_000).contains(&low), "{low}");
        // A prefix does not depend on the length asked for.
        assert_eq!(&random_draws(7, 1, "fc1.weight", 10)[..], &a[..10]);
    }

    /// A global magnitude pruner of `selected` in model `net`.
    fn magnitude_pruner(selected: &[&str]) -> Pruner {
        Pruner {
            span: Span::default(),
            model: "net".into(),
            selected: selected.iter().map(|s| s.to_string()).collect(),
            crit: LoweredCriterion {
                expr: KExpr::un(UnOp::Abs, KExpr::Input(KInput::Weight)),
                row_sums: vec![],
                row_reduce: vec![],
                side: None,
            },
            scope: Scope::Global,
            pattern: None,
            keep_min: None,
            keep_max: None,
            allow_nonfinite: false,
        }
    }

    /// A single-pass cut whose sampled range lies above the cut zeroes weights the cut
    /// keeps; the executor notices (`SampleMissed`) and prunes again, two-pass, from the
    /// model's untouched weights: the result is the one an accurate range gives.
    #[test]
    fn a_missed_sample_is_retried_from_the_model() {
        let spec = rt::ModelSpec::mlp(&[1000, 700, 10], rt::Activation::Relu);
        let pruner = magnitude_pruner(&["fc1.weight"]);
        let keep = 70_000;
        let sel = Selection::Global {
            keep,
            min_keep: vec![],
            max_keep: vec![],
        };
        let run = |range: Option<(u32, u32)>| {
            let model = spec.build(3, &candle_core::Device::Cpu).unwrap();
            let init = model.snapshot().unwrap();
            let mut masks = rt::Masks::new();
            prunec_kernels::force_sample_range(range);
            let r = pruner.select(&model, &mut masks, &init, &SideInputs::default(), &sel);
            prunec_kernels::force_sample_range(None);
            r.unwrap();
            let w = model.param_f32("fc1.weight").unwrap();
            let m = mask_words(&masks, "fc1.weight", w.len()).unwrap();
            (w, m)
        };
        let (w0, m0) = run(None);
        // Keys of the weights' magnitudes, descending: a range well above the cut.
        let model = spec.build(3, &candle_core::Device::Cpu).unwrap();
        let mut keys: Vec<u32> = model
            .param_f32("fc1.weight")
            .unwrap()
            .iter()
            .map(|x| prunec_kernels::expr::score_key(x.abs()))
            .collect();
        keys.sort_unstable_by(|a, b| b.cmp(a));
        let high = (keys[keep / 2], keys[keep / 4]);
        prunec_kernels::take_speculated();
        let (w1, m1) = run(Some(high));
        // The first attempt wrote, so it missed (the cut is below the range) and was retried.
        assert_eq!(prunec_kernels::take_speculated(), 1);
        assert_eq!(m0, m1);
        assert!(w0.iter().zip(&w1).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert_eq!(
            m1.iter().map(|w| w.count_ones() as usize).sum::<usize>(),
            keep
        );
    }

    fn gradual(args: &[(&str, Value)]) -> Gradual {
        let pruner = magnitude_pruner(&[]);
        let schedule = Value::Call {
            name: "gradual".into(),
            args: args
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        };
        Gradual::new(pruner, schedule, 1, None)
    }

    fn steps(n: u64) -> Value {
        Value::Duration {
            count: n,
            unit: prunec_lang::ast::Unit::Step,
        }
    }

    #[test]
    fn gradual_plans_follow_the_cubic_curve_and_end_on_the_target() {
        let mut g = gradual(&[
            ("from", Value::Fraction(0.1)),
            ("to", Value::Fraction(0.9)),
            ("start", steps(10)),
            (
                "end",
                Value::Duration {
                    count: 2,
                    unit: prunec_lang::ast::Unit::Epoch,
                },
            ),
            ("every", steps(30)),
        ]);
        g.make_plan(50, 500).unwrap();
        let ts: Vec<usize> = g.plan.iter().map(|p| p.0).collect();
        assert_eq!(ts, vec![10, 40, 70, 100]);
        for &(t, s) in &g.plan {
            let x = (t - 10) as f64 / 90.0;
            let want = 0.9 + (0.1 - 0.9) * (1.0 - x).powi(3);
            assert!((s - want).abs() < 1e-12);
        }
        assert!((g.plan[0].1 - 0.1).abs() < 1e-12);
        assert_eq!(g.plan.last().unwrap().1, 0.9);
        // An end between pruning steps is added as the last step.
        let mut g = gradual(&[
            ("to", Value::Fraction(0.5)),
            ("end", steps(95)),
            ("every", steps(30)),
            ("curve", Value::Word("linear".into())),
        ]);
        g.make_plan(50, 500).unwrap();
        assert_eq!(
            g.plan,
            vec![
                (0, 0.0),
                (30, 0.5 * 30.0 / 95.0),
                (60, 0.5 * 60.0 / 95.0),
                (90, 0.5 * 90.0 / 95.0),
                (95, 0.5)
            ]
        );
    }

    #[test]
    fn gradual_plans_that_outlast_training_are_refused() {
        let mut g = gradual(&[("to", Value::Fraction(0.9)), ("end", steps(500))]);
        match g.make_plan(50, 500) {
            Err(RunError::User { message, .. }) => {
                assert!(
                    message.contains("step 500") && message.contains("500 steps"),
                    "{message}"
                )
            }
            other => panic!("{:?}", other.err()),
        }
        let mut g = gradual(&[
            ("to", Value::Fraction(0.9)),
            ("start", steps(50)),
            ("end", steps(10)),
        ]);
        assert!(g.make_plan(50, 500).is_err());
    }
}
