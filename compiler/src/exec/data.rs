//! Data-set prunes: every sample scored with a model (or a seeded draw),
//! the best kept; later stages read what the data set keeps.

use super::{Exec, RunError};
use crate::error::rt_err;
use crate::plan::{Action, DataPrune, Step};
use crate::report::DataPruned;
use prunec_lang::resolved::DataScore;
use prunec_runtime as rt;
use std::sync::Arc;

impl Exec<'_> {
    pub(super) fn prune_data(&mut self, step: &Step, d: &DataPrune) -> Result<(), RunError> {
        let at = step.site.subject;
        let by = step.site.by.unwrap_or(step.site.keyword);
        let data = self.dataset_named(&d.data, at)?;
        // Draws (random scores, ties) are salted by the stage, like `rand()`.
        let seed = self.r.seed ^ (u64::from(step.stage.0) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut never_learned = None;
        let scores = match d.score {
            DataScore::Random => rt::datascore::random_scores(data.len(), seed),
            DataScore::El2n | DataScore::Grand => {
                let name = d.model.as_deref().ok_or_else(|| {
                    RunError::Internal(format!("step {}: no scoring model", step.id))
                })?;
                self.model(name, by)?;
                let model = &self.models[name].model;
                let what = format!("scoring `{}` by {}", d.data, d.score.name());
                match d.score {
                    DataScore::El2n => rt::datascore::el2n(model, &data),
                    _ => rt::datascore::grand(model, &data),
                }
                .map_err(rt_err(by, &what))?
            }
            DataScore::Forgetting => {
                let during = d.during_step.as_deref().ok_or_else(|| {
                    RunError::user(by, "forgetting events are counted during a `train` stage")
                })?;
                if !matches!(during.action, Action::Train { .. }) {
                    return Err(RunError::user(
                        during.site.keyword,
                        "forgetting events are counted during `train` or `finetune`",
                    ));
                }
                // The training changes the model: its state is its own from
                // now on (built first, so its declaration does not overwrite it).
                if let Some(name) = &during.model {
                    self.model(name, during.site.subject)?;
                    self.lineage
                        .insert(name.clone(), format!("{name} after step {}", step.id));
                }
                let mut f = rt::datascore::Forgetting::new(data.len());
                self.train_with(during, None, Some(&mut f))?;
                never_learned = Some(f.never_learned());
                f.scores()
            }
        };
        let labels = data.labels().map_err(rt_err(at, "reading the labels"))?;
        let classes = data.meta().classes;
        let keep = if d.easiest {
            rt::datascore::Keep::Easiest
        } else {
            rt::datascore::Keep::Hardest
        };
        let kept = rt::datascore::select(
            &scores,
            &labels,
            classes,
            d.fraction,
            d.per_class,
            keep,
            seed.rotate_left(17),
        )
        .map_err(rt_err(by, &format!("pruning `{}`", d.data)))?;
        let subset = data
            .subset(&kept)
            .map_err(rt_err(at, &format!("pruning `{}`", d.data)))?;
        let mut per_class = vec![(0usize, 0usize); classes];
        for &l in &labels {
            per_class[l as usize].0 += 1;
        }
        for &i in &kept {
            per_class[labels[i as usize] as usize].1 += 1;
        }
        self.datasets.insert(d.data.clone(), Arc::new(subset));
        self.data_lineage
            .insert(d.data.clone(), format!("pruned at step {}", step.id));
        self.report.data_pruned.push(DataPruned {
            step: step.id.clone(),
            span: step.span,
            data: d.data.clone(),
            score: d.score.name().to_string(),
            model: d.model.clone(),
            fraction: d.fraction,
            per_class: d.per_class,
            keep: if d.score == DataScore::Random {
                "random".into()
            } else if d.easiest {
                "easiest".into()
            } else {
                "hardest".into()
            },
            samples: data.len(),
            classes: per_class,
            never_learned,
            kept,
            file: format!("kept_{}_step{}.txt", d.data, step.id),
        });
        Ok(())
    }
}
