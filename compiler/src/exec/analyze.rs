//! `analyze` stages: studies of a model's state whose results go to the
//! report. The oracle study ("Is Oracle Pruning the True Oracle?", Feng et
//! al. 2024): candidate masks at one sparsity, the loss right after pruning
//! against the accuracy after retraining, and Kendall's τ between them.

use super::{Exec, RunError};
use crate::error::rt_err;
use crate::plan::{Analysis, AnalysisKind, Step};
use crate::report::{AgreementStudy, OracleStudy, SensitivityStudy};
use prunec_runtime as rt;
use std::sync::atomic::Ordering;

/// Kendall's τ-b of two equally long samples: concordant minus discordant
/// pairs over the geometric mean of the pairs not tied in each (0 when
/// either sample is constant).
pub(crate) fn kendall_tau_b(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len());
    let (mut concordant, mut discordant, mut ties_x, mut ties_y) = (0i64, 0i64, 0i64, 0i64);
    for i in 0..n {
        for j in i + 1..n {
            let dx = x[i].total_cmp(&x[j]);
            let dy = y[i].total_cmp(&y[j]);
            match (dx.is_eq(), dy.is_eq()) {
                (true, true) => {}
                (true, false) => ties_x += 1,
                (false, true) => ties_y += 1,
                (false, false) if dx == dy => concordant += 1,
                (false, false) => discordant += 1,
            }
        }
    }
    let nx = (concordant + discordant + ties_y) as f64;
    let ny = (concordant + discordant + ties_x) as f64;
    if nx == 0.0 || ny == 0.0 {
        return 0.0;
    }
    (concordant - discordant) as f64 / (nx * ny).sqrt()
}

impl Exec<'_> {
    pub(super) fn analyze(&mut self, step: &Step, a: &Analysis) -> Result<(), RunError> {
        match &a.kind {
            AnalysisKind::Oracle {
                test,
                candidates,
                unit,
            } => self.oracle(step, a, test, *candidates, *unit),
            AnalysisKind::Agreement { a: x, b: y } => self.agreement(step, a, [x, y]),
            AnalysisKind::Sensitivity { criterion, levels } => {
                self.sensitivity(step, a, criterion, levels)
            }
            AnalysisKind::Search { .. } => Err(RunError::Internal(
                "a search reached a model that is not a language model".into(),
            )),
        }
    }

    /// Results an analysis stage gives its label (and the latest metrics).
    pub(super) fn study_results(&mut self, label: Option<&String>, results: &[(&str, f64)]) {
        for (k, v) in results {
            self.latest.insert(k.to_string(), *v);
            if let Some(l) = label {
                self.labels
                    .entry(l.clone())
                    .or_default()
                    .insert(k.to_string(), *v);
            }
        }
    }

    fn oracle(
        &mut self,
        step: &Step,
        a: &Analysis,
        test: &str,
        candidates: usize,
        unit: prunec_lang::resolved::Unit,
    ) -> Result<(), RunError> {
        let (name, span) = Self::subject_name(step)?;
        let by = step.site.by.unwrap_or(step.site.keyword);
        let on = Self::on_data(step)?.clone();
        let data = self.dataset_named(&on.name, on.span)?;
        let test_data = self.dataset_named(test, by)?;
        self.model(&name, span)?;
        let kind = crate::units::kind(unit).ok_or_else(|| {
            RunError::user(by, format!("`{unit}` units belong to language models"))
        })?;
        let state = &self.models[&name];
        let layers: Vec<rt::model::UnitLayer> = state
            .model
            .architecture()
            .unit_layers()
            .into_iter()
            .filter(|l| l.kind == kind)
            .collect();
        if layers.is_empty() {
            return Err(RunError::user(
                by,
                format!("no layer of `{name}` has {unit}s to remove"),
            ));
        }
        let cfg = self.train_config(step, data.num_batches());
        let seed = self.r.seed ^ (u64::from(step.stage.0) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rows = Vec::with_capacity(candidates);
        for k in 0..candidates {
            let state = &self.models[&name];
            let mut model = state
                .model
                .fork()
                .map_err(|e| RunError::Internal(format!("copying `{name}`: {e}")))?;
            let mut masks = state.masks.clone();
            for (j, l) in layers.iter().enumerate() {
                let keep = crate::units::kept_per_layer(l.units, a.fraction);
                let draw = seed
                    .wrapping_add(k as u64)
                    .wrapping_mul(0x2545_F491_4F6C_DD1D)
                    .wrapping_add(j as u64);
                let order = rt::masks::random_order(l.units, draw);
                let removed = &order[keep..];
                // The unit's row (and bias entry) and the reader's columns.
                for (param, per_row) in [
                    (l.weight(), true),
                    (l.bias(), true),
                    (l.reader_weight(), false),
                ] {
                    let Ok(p) = model.param(&param) else { continue };
                    let numel = p.numel();
                    let mut mask = if masks.get(&param).is_some() {
                        masks.to_u8(&param).map_err(rt_err(by, "reading a mask"))?
                    } else {
                        vec![1u8; numel]
                    };
                    if per_row {
                        let row = numel / l.units;
                        for &u in removed {
                            mask[u * row..(u + 1) * row].fill(0);
                        }
                    } else {
                        // `[rows, units, columns per unit...]`, row-major.
                        let inner = numel / p.shape()[0];
                        let per_unit = inner / l.units;
                        for r in 0..p.shape()[0] {
                            for &u in removed {
                                let at = r * inner + u * per_unit;
                                mask[at..at + per_unit].fill(0);
                            }
                        }
                    }
                    masks
                        .insert_u8(&model, &param, &mask)
                        .map_err(rt_err(by, "masking a candidate"))?;
                }
            }
            masks
                .apply(&model)
                .map_err(rt_err(by, "masking a candidate"))?;
            let pruned =
                rt::evaluate(&model, &data).map_err(rt_err(by, "evaluating a candidate"))?;
            rt::train::train_masked(&mut model, &data, &cfg, &mut masks, &mut rt::NoHooks)
                .map_err(|e| match e {
                    rt::RuntimeError::Diverged { loss, .. } => RunError::User {
                        span: Some(step.span),
                        message: format!(
                            "retraining candidate {} of `{name}` diverged: the loss is {loss}",
                            k + 1
                        ),
                        help: Some("lower the learning rate".into()),
                    },
                    e => rt_err(step.span, "retraining a candidate")(e),
                })?;
            let after =
                rt::evaluate(&model, &test_data).map_err(rt_err(by, "evaluating a candidate"))?;
            rows.push((pruned.loss, after.accuracy, after.loss));
            if self.interrupted.load(Ordering::SeqCst) {
                return Err(RunError::Interrupted);
            }
        }
        let losses: Vec<f64> = rows.iter().map(|r| r.0).collect();
        let accuracies: Vec<f64> = rows.iter().map(|r| r.1).collect();
        let tau = kendall_tau_b(&losses, &accuracies);
        self.study_results(a.label.as_ref(), &[("kendall_tau", tau)]);
        self.report.analyses.push(OracleStudy {
            step: step.id.clone(),
            span: step.span,
            model: name,
            label: a.label.clone(),
            data: a.data.clone(),
            test: test.to_string(),
            unit: unit.to_string(),
            fraction: a.fraction,
            candidates: rows,
            kendall_tau: tau,
            plot: a.path.clone(),
        });
        Ok(())
    }
}

/// Ranks `1..=n` in ascending order, tied values sharing their mean rank.
fn ranks(v: &[f32]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]).then(a.cmp(&b)));
    let mut out = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && v[order[j + 1]].total_cmp(&v[order[i]]).is_eq() {
            j += 1;
        }
        let mean = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            out[k] = mean;
        }
        i = j + 1;
    }
    out
}

/// Spearman's ρ: Pearson's correlation of the two samples' ranks (0 when
/// either is constant).
pub(crate) fn spearman(x: &[f32], y: &[f32]) -> f64 {
    let (rx, ry) = (ranks(x), ranks(y));
    let n = rx.len().min(ry.len()) as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in rx.iter().zip(&ry) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    if sxx == 0.0 || syy == 0.0 {
        return 0.0;
    }
    sxy / (sxx * syy).sqrt()
}

/// The share of the `floor(n * fraction)` lowest-scored entries of `x` that
/// are also among those of `y` (ties to the lower index); 1 when none go.
pub(crate) fn overlap(x: &[f32], y: &[f32], fraction: f64) -> f64 {
    let n = x.len().min(y.len());
    let k = ((n as f64) * fraction + 1e-9).floor() as usize;
    if k == 0 {
        return 1.0;
    }
    let lowest = |v: &[f32]| {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| v[a].total_cmp(&v[b]).then(a.cmp(&b)));
        let mut picked = vec![false; n];
        for &i in &order[..k] {
            picked[i] = true;
        }
        picked
    };
    let (a, b) = (lowest(x), lowest(y));
    a.iter().zip(&b).filter(|(p, q)| **p && **q).count() as f64 / k as f64
}

/// The weight tensors an agreement or sensitivity study covers: every
/// `*.weight` of two or more dimensions, in model order.
fn weight_tensors(model: &rt::Model) -> Vec<String> {
    model
        .params()
        .iter()
        .filter(|p| p.name.ends_with(".weight") && p.shape().len() >= 2)
        .map(|p| p.name.clone())
        .collect()
}

/// A pruner of `selected` by `crit`, one threshold per tensor, for a study.
fn study_pruner(
    step: &Step,
    model: &str,
    selected: Vec<String>,
    crit: crate::lower::LoweredCriterion,
) -> super::prune::Pruner {
    super::prune::Pruner {
        span: step.span,
        model: model.to_string(),
        selected,
        crit,
        scope: prunec_lang::resolved::Scope::Layer,
        pattern: None,
        keep_min: None,
        keep_max: None,
        allow_nonfinite: true,
    }
}

impl Exec<'_> {
    /// Sensitivity: each weight tensor of a copy pruned alone to each level,
    /// the accuracy and loss on the `on` data right after.
    fn sensitivity(
        &mut self,
        step: &Step,
        a: &Analysis,
        criterion: &crate::ir::Written,
        levels: &[f64],
    ) -> Result<(), RunError> {
        let (name, span) = Self::subject_name(step)?;
        let by = step.site.by.unwrap_or(step.site.keyword);
        let on = Self::on_data(step)?.clone();
        let data = self.dataset_named(&on.name, on.span)?;
        self.model(&name, span)?;
        let selected = weight_tensors(&self.models[&name].model);
        let crit = crate::lower::criterion_to_kernel(self.r, &criterion.expr)?;
        // The statistics of the model as it is, read once for every tensor.
        let all = study_pruner(step, &name, selected.clone(), crit.clone());
        let side = self.side_inputs(step, Some(&on), &all, 0, super::prune::Stats::default())?;
        let state = &self.models[&name];
        let dense = rt::evaluate(&state.model, &data).map_err(rt_err(by, "evaluating"))?;
        let mut rows = Vec::with_capacity(selected.len());
        for t in &selected {
            let pruner = study_pruner(step, &name, vec![t.clone()], crit.clone());
            // A tensor already sparser than a level stays as it is there.
            let numel = state.model.param(t).map_err(rt_err(by, "reading"))?.numel();
            let kept = state
                .masks
                .kept(&state.model, t)
                .map_err(rt_err(by, "reading a mask"))? as f64
                / numel.max(1) as f64;
            let mut per = Vec::with_capacity(levels.len());
            for &level in levels {
                let model = state
                    .model
                    .fork()
                    .map_err(|e| RunError::Internal(format!("copying `{name}`: {e}")))?;
                let mut masks = state.masks.clone();
                if 1.0 - level < kept {
                    pruner.round(&model, &mut masks, &state.init, 1.0 - level, &side)?;
                }
                let m = rt::evaluate(&model, &data).map_err(rt_err(by, "evaluating a copy"))?;
                per.push((level, m.accuracy, m.loss));
            }
            rows.push((t.clone(), per));
            if self.interrupted.load(Ordering::SeqCst) {
                return Err(RunError::Interrupted);
            }
        }
        self.report.sensitivities.push(SensitivityStudy {
            step: step.id.clone(),
            span: step.span,
            model: name,
            label: a.label.clone(),
            data: a.data.clone(),
            criterion: criterion.text.clone(),
            dense: (dense.accuracy, dense.loss),
            tensors: rows,
            plot: a.path.clone(),
        });
        Ok(())
    }

    /// Criterion agreement: both criteria score every weight tensor of the
    /// model as it is; rank correlation and pruned-set overlap per tensor
    /// and over all of them.
    fn agreement(
        &mut self,
        step: &Step,
        a: &Analysis,
        criteria: [&crate::ir::Written; 2],
    ) -> Result<(), RunError> {
        let (name, span) = Self::subject_name(step)?;
        let on = Self::on_data(step)?.clone();
        self.dataset_named(&on.name, on.span)?;
        self.model(&name, span)?;
        let selected = weight_tensors(&self.models[&name].model);
        let mut scores = Vec::with_capacity(2);
        for w in criteria {
            let crit = crate::lower::criterion_to_kernel(self.r, &w.expr)?;
            let pruner = study_pruner(step, &name, selected.clone(), crit);
            let side =
                self.side_inputs(step, Some(&on), &pruner, 0, super::prune::Stats::default())?;
            let state = &self.models[&name];
            scores.push(pruner.scores(&state.model, &state.masks, &state.init, &side)?);
        }
        // Weights already pruned are no longer candidates: only the kept
        // ones are compared, as a prune stage ranks them.
        let state = &self.models[&name];
        for (i, n) in selected.iter().enumerate() {
            if state.masks.get(n).is_some() {
                let keep = state
                    .masks
                    .to_u8(n)
                    .map_err(rt_err(step.span, "reading a mask"))?;
                for s in scores.iter_mut() {
                    let alive: Vec<f32> = s[i]
                        .iter()
                        .zip(&keep)
                        .filter(|(_, k)| **k != 0)
                        .map(|(v, _)| *v)
                        .collect();
                    s[i] = alive;
                }
            }
        }
        let mut tensors = Vec::with_capacity(selected.len());
        for (i, n) in selected.iter().enumerate() {
            let (x, y) = (&scores[0][i], &scores[1][i]);
            tensors.push((
                n.clone(),
                x.len(),
                spearman(x, y),
                overlap(x, y, a.fraction),
            ));
        }
        let all_x: Vec<f32> = scores[0].concat();
        let all_y: Vec<f32> = scores[1].concat();
        let (rho, shared) = (
            spearman(&all_x, &all_y),
            overlap(&all_x, &all_y, a.fraction),
        );
        self.study_results(a.label.as_ref(), &[("spearman", rho), ("overlap", shared)]);
        self.report.agreements.push(AgreementStudy {
            step: step.id.clone(),
            span: step.span,
            model: name,
            label: a.label.clone(),
            data: a.data.clone(),
            a: criteria[0].text.clone(),
            b: criteria[1].text.clone(),
            fraction: a.fraction,
            tensors,
            spearman: rho,
            overlap: shared,
            plot: a.path.clone(),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{kendall_tau_b, overlap, spearman};

    #[test]
    fn spearman_ranks_with_ties_and_overlap_counts_shared_lowest() {
        let x = [1.0f32, 2.0, 3.0, 4.0, 5.0];
        assert!((spearman(&x, &[10.0, 20.0, 30.0, 40.0, 50.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&x, &[5.0, 4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        // A monotone transform keeps ρ = 1; scipy.stats.spearmanr([1,2,3,4,5],
        // [2,1,4,3,5]) = 0.8.
        assert!((spearman(&x, &[1.0, 4.0, 9.0, 16.0, 25.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&x, &[2.0, 1.0, 4.0, 3.0, 5.0]) - 0.8).abs() < 1e-12);
        // Ties share their mean rank: spearmanr([1,2,2,3], [1,2,3,4]) = 0.9486832980505138.
        let t = spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 2.0, 3.0, 4.0]);
        assert!((t - 0.948_683_298_050_513_8).abs() < 1e-12, "{t}");
        assert_eq!(spearman(&[1.0, 1.0], &[1.0, 2.0]), 0.0);
        // The lowest two: {0, 1} and {1, 2}: one shared.
        assert_eq!(overlap(&x, &[3.0, 1.0, 2.0, 4.0, 5.0], 0.4), 0.5);
        assert_eq!(overlap(&x, &x, 0.6), 1.0);
        assert_eq!(overlap(&x, &x, 0.0), 1.0);
    }

    #[test]
    fn kendall_tau_b_counts_pairs_with_ties() {
        let x = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(kendall_tau_b(&x, &[10.0, 20.0, 30.0, 40.0]), 1.0);
        assert_eq!(kendall_tau_b(&x, &[4.0, 3.0, 2.0, 1.0]), -1.0);
        // 5 concordant, 1 discordant of 6 pairs.
        assert!((kendall_tau_b(&x, &[1.0, 3.0, 2.0, 4.0]) - 4.0 / 6.0).abs() < 1e-12);
        // scipy.stats.kendalltau([1, 2, 2, 3], [1, 2, 3, 3]) = 0.8.
        let t = kendall_tau_b(&[1.0, 2.0, 2.0, 3.0], &[1.0, 2.0, 3.0, 3.0]);
        assert!((t - 0.8).abs() < 1e-12, "{t}");
        assert_eq!(kendall_tau_b(&[1.0, 1.0], &[1.0, 2.0]), 0.0);
    }
}
