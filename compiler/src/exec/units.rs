//! A `unit = ...` prune step: every targeted layer's units are scored (the
//! mean of their weights' scores under the stage's criterion), the lowest
//! are chosen per layer or over all layers together, and the model, its
//! masks, snapshots and calibration statistics are cut to the survivors.
//! In rounds, each round's target counts against the units the stage began
//! with.

use super::prune::{per_layer, Pruner, SideInputs};
use super::{rt_err, Exec, RunError};
use crate::lower::{self, LoweredCriterion};
use crate::plan::{Prune, Step};
use crate::report::Shrink;
use prunec_kernels::{PruneOptions, TensorView};
use prunec_lang::check::Value;
use prunec_lang::resolved::{Schedule, Scope, Unit};
use prunec_lang::Span;
use prunec_runtime as rt;
use std::collections::BTreeMap;

/// One targeted layer as the stage goes: its units at the start, and the
/// original indices of those still there.
struct Layer {
    name: String,
    weight: String,
    start: usize,
    alive: Vec<usize>,
}

impl Exec<'_> {
    pub(super) fn prune_units(
        &mut self,
        step: &Step,
        p: &Prune,
        name: &str,
        span: Span,
        crit: LoweredCriterion,
        unit: Unit,
    ) -> Result<(), RunError> {
        self.model(name, span)?;
        let targets = self
            .option(step, "targets")
            .map(|v| lower::strings(Some(&v)));
        let skip = lower::strings(self.option(step, "skip").as_ref());
        let arch = self.models[name].model.architecture().clone();
        let found =
            crate::units::unit_targets(&arch, targets.as_deref(), &skip, unit).map_err(|e| {
                RunError::User {
                    span: Some(step.site.targets.unwrap_or(step.site.keyword)),
                    message: e.message,
                    help: Some(e.help),
                }
            })?;
        let mut layers: Vec<Layer> = found
            .iter()
            .map(|u| Layer {
                name: u.layer.clone(),
                weight: u.weight(),
                start: u.units,
                alive: (0..u.units).collect(),
            })
            .collect();
        // The model's sparsity targets stay what they were: removing units
        // leaves no zeros to count.
        let selected: Vec<String> = layers.iter().map(|l| l.weight.clone()).collect();
        let pruner = Pruner {
            span: step.span,
            model: name.to_string(),
            selected,
            crit,
            scope: p.scope,
            pattern: None,
            keep_min: self.option(step, "keep_min"),
            keep_max: self.option(step, "keep_max"),
            allow_nonfinite: matches!(
                self.option(step, "allow_nonfinite"),
                Some(Value::Bool(true))
            ),
        };
        let (rounds, rewind) = match &p.schedule {
            Schedule::Iterative { rounds, rewind } => (*rounds, rewind.clone()),
            Schedule::OneShot { rounds } => (*rounds, None),
            Schedule::Gradual(_) => {
                return Err(RunError::user(
                    step.site.keyword,
                    "units are removed at once, not during training",
                ))
            }
        };
        let target = p.target.ok_or_else(|| {
            RunError::user(
                step.site.to.unwrap_or(step.site.keyword),
                "removing units needs a constant target fraction (`to 50%`)",
            )
        })?;
        let mut pre = self.round_one_stats(step, p, name);
        let start_params = self.models[name].model.param_count();
        for round in 1..=rounds {
            let sparsity = match &p.sparsities {
                planned if planned.len() == rounds => planned[round - 1],
                _ => 1.0 - (1.0 - target).powf(round as f64 / rounds as f64),
            };
            let side = self.side_inputs(
                step,
                p.stats_data.as_ref(),
                &pruner,
                round,
                std::mem::take(&mut pre),
            )?;
            let scores = {
                let state = &self.models[name];
                unit_scores(&pruner, &state.model, &state.masks, &state.init, &side)?
            };
            let scores = normalized(scores, self.option(step, "normalize").as_ref());
            let keep = choose(&pruner, &layers, &scores, sparsity);
            self.remove(step.span, name, &mut layers, &keep)?;
            if self.progress {
                let widths: Vec<String> = layers
                    .iter()
                    .map(|l| format!("{} {}/{}", l.name, l.alive.len(), l.start))
                    .collect();
                eprintln!(
                    "prune {name}: round {round}/{rounds}, {unit}s kept: {}",
                    widths.join(", ")
                );
            }
            self.rewind(step.span, name, rewind.as_ref())?;
            self.after_round(
                step,
                name,
                round,
                rounds > 1 || !step.each_round.is_empty(),
                BTreeMap::new(),
            )?;
        }
        let (line, _) = prunec_lang::diag::line_col(&self.r.source, step.span.start);
        self.report.shrinks.push(Shrink {
            model: name.to_string(),
            line,
            unit: unit.to_string(),
            layers: layers
                .iter()
                .map(|l| (l.name.clone(), l.start, l.alive.len()))
                .collect(),
            params_before: start_params,
            params_after: self.models[name].model.param_count(),
        });
        Ok(())
    }

    /// Cuts the model and everything held per parameter to the kept units
    /// (`keep[i]`: positions among layer `i`'s current units, ascending).
    fn remove(
        &mut self,
        span: Span,
        name: &str,
        layers: &mut [Layer],
        keep: &[Vec<usize>],
    ) -> Result<(), RunError> {
        let state = self.models.get_mut(name).unwrap();
        let kept: BTreeMap<String, Vec<usize>> = layers
            .iter()
            .zip(keep)
            .filter(|(l, k)| k.len() < l.alive.len())
            .map(|(l, k)| (l.name.clone(), k.clone()))
            .collect();
        if kept.is_empty() {
            return Ok(());
        }
        let err = |what: &'static str| rt_err(span, what);
        let removal = rt::model::UnitRemoval::new(state.model.architecture(), kept)
            .map_err(err("remove units"))?;
        // Activation statistics are per input column: cut the readers' columns.
        if let Some(cal) = state.calibration.take() {
            state.calibration = Some(cut_columns(&state.model, &removal, cal)?);
        }
        state.model = state
            .model
            .without_units(&removal)
            .map_err(err("remove units"))?;
        state.masks = state
            .masks
            .without_units(&removal)
            .map_err(err("remove units"))?;
        state.init = state
            .init
            .without_units(&removal)
            .map_err(err("remove units"))?;
        for snap in state.rewind_points.values_mut().flatten() {
            *snap = snap.without_units(&removal).map_err(err("remove units"))?;
        }
        for (l, k) in layers.iter_mut().zip(keep) {
            l.alive = k.iter().map(|&i| l.alive[i]).collect();
        }
        Ok(())
    }
}

/// Per-column statistics of every parameter, with the columns of removed
/// units' reader inputs cut out.
fn cut_columns(
    model: &rt::Model,
    removal: &rt::model::UnitRemoval,
    cal: BTreeMap<String, Vec<f32>>,
) -> Result<BTreeMap<String, Vec<f32>>, RunError> {
    let mut out = BTreeMap::new();
    for (n, v) in cal {
        let shape = match model.param(&n) {
            Ok(p) => p.shape(),
            Err(_) => continue,
        };
        let inputs = shape.get(1).copied().unwrap_or(1);
        let per_in: usize = shape.iter().skip(2).product();
        if v.len() != inputs * per_in {
            out.insert(n, v);
            continue;
        }
        // The same cut as the weight's dimension 1, on a [1, inputs, per_in] view.
        let t = candle_core::Tensor::from_vec(v, (1, inputs, per_in), &candle_core::Device::Cpu)
            .map_err(|e| RunError::Internal(e.to_string()))?;
        let name = n.clone();
        let cut = removal
            .cut_dim(&n, &t, 1)
            .map_err(|e| RunError::Internal(format!("cutting statistics of {name}: {e}")))?;
        let cut = cut
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| RunError::Internal(e.to_string()))?;
        out.insert(n, cut);
    }
    Ok(out)
}

/// Each targeted layer's unit scores: the mean of its weights' scores.
fn unit_scores(
    pruner: &Pruner,
    model: &rt::Model,
    masks: &rt::Masks,
    init: &rt::Snapshot,
    side: &SideInputs,
) -> Result<Vec<Vec<f32>>, RunError> {
    let span = pruner.span;
    let mut b = pruner.buffers(model, masks, init)?;
    let opts = PruneOptions {
        scalars: vec![side.step],
        allow_nonfinite: pruner.allow_nonfinite,
        ..PruneOptions::default()
    };
    let fail = |e: prunec_kernels::KernelError| RunError::User {
        span: Some(span),
        message: format!("scoring `{}` failed: {e}", pruner.model),
        help: None,
    };
    let act_of = |n: &str, cols: usize| -> Result<Vec<&[f32]>, RunError> {
        match side.act.as_ref().map(|a| a.get(n)) {
            None => Ok(vec![]),
            Some(Some(v)) if v.len() == cols => Ok(vec![v.as_slice()]),
            Some(_) => Err(RunError::user(
                span,
                format!("no activation statistics of `{n}` fit its {cols} input columns"),
            )),
        }
    };
    let mut out = Vec::with_capacity(pruner.selected.len());
    for (i, n) in pruner.selected.iter().enumerate() {
        let (rows, cols) = b.shapes[i];
        let mut m = b.masks[i].clone();
        let grad = side
            .grad
            .as_ref()
            .and_then(|g| g.get(n))
            .map(|g| g.as_slice());
        // Per-row sums the criterion reads (channel norms), in f64 in row
        // order, as the pruning kernels get them.
        let mut row_stats: Vec<Vec<f32>> = Vec::new();
        for (inner, reduce) in pruner.crit.row_sums.iter().zip(&pruner.crit.row_reduce) {
            let mut v = TensorView::new(n, rows, cols, &mut b.weights[i], &mut m);
            v.grad = grad;
            v.init = b.inits.get(i).map(|x| x.as_slice());
            v.col_stats = act_of(n, cols)?;
            let scores = prunec_kernels::score_jit(inner, &v, &opts).map_err(fail)?;
            row_stats.push(reduce.apply(&scores, cols));
        }
        let scores = {
            let mut v = TensorView::new(n, rows, cols, &mut b.weights[i], &mut m);
            v.grad = grad;
            v.init = b.inits.get(i).map(|x| x.as_slice());
            v.col_stats = act_of(n, cols)?;
            v.row_stats = row_stats.iter().map(|r| r.as_slice()).collect();
            prunec_kernels::score_jit(&pruner.crit.expr, &v, &opts).map_err(fail)?
        };
        let mut unit = Vec::with_capacity(rows);
        for r in 0..rows {
            // f64 in a fixed order: the same mean at any thread count.
            let sum: f64 = scores[r * cols..(r + 1) * cols]
                .iter()
                .map(|&s| s as f64)
                .sum();
            let mean = (sum / cols.max(1) as f64) as f32;
            if !mean.is_finite() && !pruner.allow_nonfinite {
                return Err(RunError::User {
                    span: Some(span),
                    message: format!("unit {r} of `{n}` scores {mean}: its weights or statistics are not finite"),
                    help: Some("check the model, or add `allow_nonfinite = true` to score such units lowest".into()),
                });
            }
            unit.push(if mean.is_finite() {
                mean
            } else {
                f32::NEG_INFINITY
            });
        }
        out.push(unit);
    }
    Ok(out)
}

/// Each layer's unit scores divided by their mean, max or L2 norm
/// (`normalize = ...`), so that one global ranking compares layers on one
/// scale; as they are for `none`. A zero divisor leaves the layer as it is.
fn normalized(mut scores: Vec<Vec<f32>>, how: Option<&Value>) -> Vec<Vec<f32>> {
    let how = how.and_then(|v| v.as_str()).unwrap_or("none");
    for s in &mut scores {
        let n = s.len().max(1) as f64;
        let d = match how {
            "mean" => s.iter().map(|&v| v as f64).sum::<f64>() / n,
            "max" => s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64,
            "l2" => s
                .iter()
                .map(|&v| (v as f64) * (v as f64))
                .sum::<f64>()
                .sqrt(),
            _ => continue,
        };
        // By the magnitude: a negative mean must not reverse the ranking.
        let d = d.abs();
        if d.is_finite() && d != 0.0 {
            for v in s.iter_mut() {
                *v = (*v as f64 / d) as f32;
            }
        }
    }
    scores
}

/// The positions each layer keeps this round, ascending: per layer, the
/// highest-scoring `kept_per_layer` of the units it started with; globally,
/// the lowest units of all layers go first within each layer's guards
/// (`keep_min`, `keep_max`, counted in units of the start; always one).
/// Ties keep the earlier unit.
fn choose(
    pruner: &Pruner,
    layers: &[Layer],
    scores: &[Vec<f32>],
    sparsity: f64,
) -> Vec<Vec<usize>> {
    let key = prunec_kernels::expr::score_key;
    let rank = |s: &[f32]| -> Vec<usize> {
        // Highest first; ties: earlier first.
        let mut idx: Vec<usize> = (0..s.len()).collect();
        idx.sort_by(|&a, &b| key(s[b]).cmp(&key(s[a])).then(a.cmp(&b)));
        idx
    };
    let sorted = |mut v: Vec<usize>| {
        v.sort_unstable();
        v
    };
    if pruner.scope != Scope::Global {
        return layers
            .iter()
            .zip(scores)
            .map(|(l, s)| {
                let want = crate::units::kept_per_layer(l.start, sparsity).min(s.len());
                sorted(rank(s)[..want].to_vec())
            })
            .collect();
    }
    let total: usize = layers.iter().map(|l| l.start).sum();
    let removed_so_far: usize = layers.iter().map(|l| l.start - l.alive.len()).sum();
    let goal = ((total as f64 * sparsity + 1e-9).floor() as usize).saturating_sub(removed_so_far);
    let bounds: Vec<(usize, usize)> = layers
        .iter()
        .map(|l| {
            let lo = per_layer(pruner.keep_min.as_ref(), l.start, 0).max(1);
            let hi = per_layer(pruner.keep_max.as_ref(), l.start, l.start).max(lo);
            (lo, hi)
        })
        .collect();
    let mut keep: Vec<usize> = layers.iter().map(|l| l.alive.len()).collect();
    let mut removed = 0;
    // Over `keep_max`: those go first, lowest scores first.
    let order: Vec<Vec<usize>> = scores.iter().map(|s| rank(s)).collect();
    for (i, &(_, hi)) in bounds.iter().enumerate() {
        while keep[i] > hi {
            keep[i] -= 1;
            removed += 1;
        }
    }
    // Then every unit of every layer, lowest score first (layer order, then
    // position, on ties), while the layer stays above its minimum.
    let mut all: Vec<(usize, usize)> = scores
        .iter()
        .enumerate()
        .flat_map(|(i, s)| (0..s.len()).map(move |j| (i, j)))
        .collect();
    all.sort_by(|&(i, j), &(k, l)| {
        key(scores[i][j])
            .cmp(&key(scores[k][l]))
            .then(i.cmp(&k))
            .then(j.cmp(&l))
    });
    let mut gone: Vec<Vec<bool>> = scores.iter().map(|s| vec![false; s.len()]).collect();
    // The forced removals are each layer's lowest.
    for (i, o) in order.iter().enumerate() {
        let forced = scores[i].len() - keep[i];
        for &j in o.iter().rev().take(forced) {
            gone[i][j] = true;
        }
    }
    for (i, j) in all {
        if removed >= goal {
            break;
        }
        if gone[i][j] || keep[i] <= bounds[i].0 {
            continue;
        }
        gone[i][j] = true;
        keep[i] -= 1;
        removed += 1;
    }
    gone.iter()
        .map(|g| (0..g.len()).filter(|&j| !g[j]).collect())
        .collect()
}
