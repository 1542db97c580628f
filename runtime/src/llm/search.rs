//! Per-block sparsity search (EMO-PMS; NSGA-II, [`crate::search`]): every
//! candidate gives each block a sparsity; the block's linear layers are
//! masked per output row by scores of the dense weights (`|W|`, or Wanda's
//! `|W_ij| · ‖X_j‖₂` with the dense model's calibration activations), and
//! the candidate is scored by the masked copy's perplexity on the
//! calibration windows and the fraction of the targeted weights it keeps.
//! Scores are ranked once per row, so a candidate costs its masking and one
//! forward pass.

use std::collections::BTreeMap;

use candle_core::Tensor;
use rayon::prelude::*;

use super::eval::perplexity;
use super::model::{LlamaModel, Proj};
use super::prune::{calibration_chunks, forward_collecting, OneShotConfig, StatsNeeds};
use super::select::{magnitude_scores, wanda_scores, SparsityPattern};
use super::{Result, RuntimeError};
use crate::search::{Nsga2, Outcome};

/// The scores whose per-row order masks a candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SearchScore {
    Magnitude,
    Wanda,
}

impl SearchScore {
    pub fn named(name: &str) -> Option<SearchScore> {
        match name {
            "magnitude" => Some(SearchScore::Magnitude),
            "wanda" => Some(SearchScore::Wanda),
            _ => None,
        }
    }
}

/// One targeted linear layer: each row's column indices from the lowest
/// score to the highest (ties: the lower index first, as the one-shot
/// selection breaks them).
struct Ranked {
    proj: Proj,
    rows: usize,
    cols: usize,
    order: Vec<u32>,
}

/// The dense model's rankings and the calibration windows every candidate
/// is scored on.
pub struct SearchProblem {
    blocks: Vec<Vec<Ranked>>,
    tokens: Vec<u32>,
    seq: usize,
    batch: usize,
}

impl SearchProblem {
    /// Ranks every block linear of `model` (the default one-shot targets)
    /// by `score`, reading activations from one dense forward of
    /// `calibration` for Wanda.
    pub fn new(
        model: &LlamaModel,
        calibration: &[Vec<u32>],
        score: SearchScore,
        batch: usize,
    ) -> Result<SearchProblem> {
        let config = OneShotConfig::new(SparsityPattern::Unstructured(0.5));
        let targets = config.targeted(model)?;
        let mut chunks = calibration_chunks(model, calibration, batch, "search")?;
        let mut blocks = Vec::with_capacity(targets.len());
        for (l, block_targets) in targets.iter().enumerate() {
            let stats = if score == SearchScore::Wanda {
                let needs = StatsNeeds {
                    col_norms: true,
                    hessian: false,
                };
                forward_collecting(model, l, &mut chunks, needs, true, |input| {
                    block_targets.iter().any(|p| p.input() == input)
                })?
            } else {
                BTreeMap::new()
            };
            let mut ranked = Vec::with_capacity(block_targets.len());
            for &proj in block_targets {
                let w = model.linear_weight(l, proj)?;
                let (rows, cols) = w.dims2()?;
                let w: Vec<f32> = w.flatten_all()?.to_vec1()?;
                let scores = match score {
                    SearchScore::Magnitude => magnitude_scores(&w),
                    SearchScore::Wanda => {
                        let norms =
                            stats
                                .get(&proj.input())
                                .map(|s| s.col_norms())
                                .ok_or_else(|| {
                                    RuntimeError::Invalid(format!("no activations for block {l}"))
                                })?;
                        wanda_scores(&w, cols, &norms)?
                    }
                };
                let mut order = vec![0u32; rows * cols];
                order
                    .par_chunks_mut(cols.max(1))
                    .zip(scores.par_chunks(cols.max(1)))
                    .for_each(|(o, row)| {
                        for (i, v) in o.iter_mut().enumerate() {
                            *v = i as u32;
                        }
                        o.sort_unstable_by(|&a, &b| {
                            row[a as usize].total_cmp(&row[b as usize]).then(a.cmp(&b))
                        });
                    });
                ranked.push(Ranked {
                    proj,
                    rows,
                    cols,
                    order,
                });
            }
            blocks.push(ranked);
        }
        let seq = calibration.first().map_or(0, |s| s.len());
        Ok(SearchProblem {
            blocks,
            tokens: calibration.iter().flatten().copied().collect(),
            seq,
            batch,
        })
    }

    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Targeted weights per block.
    pub fn block_weights(&self) -> Vec<usize> {
        self.blocks
            .iter()
            .map(|b| b.iter().map(|r| r.rows * r.cols).sum())
            .collect()
    }

    /// Weights a row of `cols` loses at `sparsity`: `floor(sparsity · cols)`,
    /// as the one-shot per-row selection counts them.
    fn removed(sparsity: f64, cols: usize) -> usize {
        ((sparsity * cols as f64).floor() as usize).min(cols)
    }

    /// The fraction of the targeted weights a candidate keeps.
    pub fn kept(&self, sparsities: &[f64]) -> f64 {
        let (mut kept, mut total) = (0usize, 0usize);
        for (b, &s) in self.blocks.iter().zip(sparsities) {
            for r in b {
                kept += r.rows * (r.cols - Self::removed(s, r.cols));
                total += r.rows * r.cols;
            }
        }
        kept as f64 / total.max(1) as f64
    }

    /// A copy of `dense` with block `l`'s targeted rows each losing their
    /// `floor(sparsities[l] · cols)` lowest-scored weights.
    pub fn masked(&self, dense: &LlamaModel, sparsities: &[f64]) -> Result<LlamaModel> {
        if sparsities.len() != self.blocks.len() {
            return Err(RuntimeError::Invalid(format!(
                "{} block sparsities for a model of {} blocks",
                sparsities.len(),
                self.blocks.len()
            )));
        }
        let mut model = dense.clone();
        for (l, (b, &s)) in self.blocks.iter().zip(sparsities).enumerate() {
            for r in b {
                let k = Self::removed(s, r.cols);
                if k == 0 {
                    continue;
                }
                let mut w: Vec<f32> = dense.linear_weight(l, r.proj)?.flatten_all()?.to_vec1()?;
                w.par_chunks_mut(r.cols)
                    .zip(r.order.par_chunks(r.cols))
                    .for_each(|(row, order)| {
                        for &i in &order[..k] {
                            row[i as usize] = 0.0;
                        }
                    });
                let t = Tensor::from_vec(w, (r.rows, r.cols), dense.device())?;
                model.set_linear_weight(l, r.proj, t)?;
            }
        }
        Ok(model)
    }

    /// Perplexity of `model` on the calibration windows.
    pub fn perplexity(&self, model: &LlamaModel) -> Result<f64> {
        perplexity(model, &self.tokens, self.seq, self.batch)
    }

    /// A candidate's objectives: perplexity after masking, kept fraction.
    pub fn evaluate(&self, dense: &LlamaModel, sparsities: &[f64]) -> Result<[f64; 2]> {
        let masked = self.masked(dense, sparsities)?;
        Ok([self.perplexity(&masked)?, self.kept(sparsities)])
    }

    /// NSGA-II over the blocks' sparsities in `[lo, hi]` (on a grid of
    /// 0.1%); `each` hears every evaluated candidate (an error from it
    /// stops the search).
    pub fn search(
        &self,
        dense: &LlamaModel,
        population: usize,
        generations: usize,
        range: (f64, f64),
        seed: u64,
        mut each: impl FnMut(usize, &[f64], [f64; 2]) -> Result<()>,
    ) -> Result<Outcome> {
        let nsga = Nsga2 {
            genes: self.blocks.len(),
            population,
            generations,
            lo: range.0,
            hi: range.1,
            grid: 0.001,
            seed,
        };
        let mut n = 0usize;
        nsga.run(|genes| {
            let objectives = self.evaluate(dense, genes)?;
            n += 1;
            each(n, genes, objectives)?;
            Ok(objectives.to_vec())
        })
    }
}

/// Moves an allocation so that its weighted mean (`weights` per block) is
/// `target`: every block by the same amount, clamped to `[0, 1)`, the
/// remainder spread over the blocks not clamped (a few rounds suffice).
pub fn shift_to_mean(sparsities: &[f64], weights: &[usize], target: f64) -> Vec<f64> {
    let total: f64 = weights.iter().map(|&w| w as f64).sum::<f64>().max(1.0);
    let mean = |s: &[f64]| {
        s.iter()
            .zip(weights)
            .map(|(s, &w)| s * w as f64)
            .sum::<f64>()
            / total
    };
    let top = 0.999;
    let mut out = sparsities.to_vec();
    for _ in 0..32 {
        let gap = target - mean(&out);
        if gap.abs() < 1e-12 {
            break;
        }
        let free: f64 = out
            .iter()
            .zip(weights)
            .filter(|(s, _)| if gap > 0.0 { **s < top } else { **s > 0.0 })
            .map(|(_, &w)| w as f64)
            .sum();
        if free == 0.0 {
            break;
        }
        let step = gap * total / free;
        for s in out.iter_mut() {
            if (gap > 0.0 && *s < top) || (gap < 0.0 && *s > 0.0) {
                *s = (*s + step).clamp(0.0, top);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::shift_to_mean;

    #[test]
    fn a_shift_keeps_the_shape_and_meets_the_mean() {
        let s = shift_to_mean(&[0.4, 0.5, 0.6], &[1, 1, 2], 0.6);
        // Weighted mean (0.4 + 0.5 + 1.2) / 4 = 0.525: every block + 0.075.
        for (a, b) in s.iter().zip([0.475, 0.575, 0.675]) {
            assert!((a - b).abs() < 1e-12, "{s:?}");
        }
        // Clamped at 0: the others carry the rest.
        let s = shift_to_mean(&[0.05, 0.5], &[1, 1], 0.1);
        assert_eq!(s[0], 0.0);
        assert!((s[1] - 0.2).abs() < 1e-12, "{s:?}");
        assert_eq!(shift_to_mean(&[0.3, 0.3], &[5, 5], 0.3), vec![0.3, 0.3]);
    }
}
