//! `analyze` stages: studies of a model's state whose results go to the
//! report. The oracle study ("Is Oracle Pruning the True Oracle?", Feng et
//! al. 2024): candidate masks at one sparsity, the loss right after pruning
//! against the accuracy after retraining, and Kendall's τ between them.

use super::{Exec, RunError};
use crate::error::rt_err;
use crate::plan::{Analysis, Step};
use crate::report::OracleStudy;
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
        let (name, span) = Self::subject_name(step)?;
        let by = step.site.by.unwrap_or(step.site.keyword);
        let on = Self::on_data(step)?.clone();
        let data = self.dataset_named(&on.name, on.span)?;
        let test = self.dataset_named(&a.test, by)?;
        self.model(&name, span)?;
        let kind = crate::units::kind(a.unit).ok_or_else(|| {
            RunError::user(by, format!("`{}` units belong to language models", a.unit))
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
                format!("no layer of `{name}` has {}s to remove", a.unit),
            ));
        }
        let cfg = self.train_config(step, data.num_batches());
        let seed = self.r.seed ^ (u64::from(step.stage.0) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rows = Vec::with_capacity(a.candidates);
        for k in 0..a.candidates {
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
                rt::evaluate(&model, &test).map_err(rt_err(by, "evaluating a candidate"))?;
            rows.push((pruned.loss, after.accuracy, after.loss));
            if self.interrupted.load(Ordering::SeqCst) {
                return Err(RunError::Interrupted);
            }
        }
        let losses: Vec<f64> = rows.iter().map(|r| r.0).collect();
        let accuracies: Vec<f64> = rows.iter().map(|r| r.1).collect();
        let tau = kendall_tau_b(&losses, &accuracies);
        self.latest.insert("kendall_tau".into(), tau);
        if let Some(l) = &a.label {
            self.labels
                .entry(l.clone())
                .or_default()
                .insert("kendall_tau".into(), tau);
        }
        self.report.analyses.push(OracleStudy {
            step: step.id.clone(),
            span: step.span,
            model: name,
            label: a.label.clone(),
            data: a.data.clone(),
            test: a.test.clone(),
            unit: a.unit.to_string(),
            fraction: a.fraction,
            candidates: rows,
            kendall_tau: tau,
            plot: a.path.clone(),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::kendall_tau_b;

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
