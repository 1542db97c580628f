//! OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): blocks
//! holding more outlier features keep more weights. A block's outlier
//! ratio is the share of its targeted weights whose Wanda score
//! `|W_ij| · ‖X_j‖₂` (on the dense model's calibration activations) exceeds
//! `m` times the mean score over the block's targeted weights; the ratios, scaled to [0, 2λ],
//! become keep fractions shifted so that their mean is `1 − target`.

use candle_core::DType;

use super::model::LlamaModel;
use super::prune::{calibration_chunks, forward_collecting, OneShotConfig, StatsNeeds};
use super::{Result, RuntimeError};

/// Each block's sparsity from its outlier ratio (`None`: a block nothing
/// targets, left at `target`): `target − (r̂ − mean r̂)` with `r̂` the ratio
/// scaled linearly to [0, 2λ] (all equal when the ratios are).
pub fn owl_allocation(ratios: &[Option<f64>], target: f64, lambda: f64) -> Vec<f64> {
    let vals: Vec<f64> = ratios.iter().flatten().copied().collect();
    let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let scaled = |r: f64| {
        if hi > lo {
            (r - lo) / (hi - lo) * 2.0 * lambda
        } else {
            lambda
        }
    };
    let mean = vals.iter().map(|&r| scaled(r)).sum::<f64>() / vals.len().max(1) as f64;
    ratios
        .iter()
        .map(|r| match r {
            Some(r) => target - (scaled(*r) - mean),
            None => target,
        })
        .collect()
}

/// The outlier ratio of every block `config` targets (`None` for the
/// others), from one dense forward of the calibration sequences.
pub fn outlier_ratios(
    model: &LlamaModel,
    calibration: &[Vec<u32>],
    config: &OneShotConfig,
    m: f64,
) -> Result<Vec<Option<f64>>> {
    let targets = config.targeted(model)?;
    let mut chunks = calibration_chunks(model, calibration, config.batch, "owl")?;
    let needs = StatsNeeds {
        col_norms: true,
        hessian: false,
    };
    let last = targets.iter().rposition(|t| !t.is_empty()).unwrap_or(0);
    let mut ratios = vec![None; targets.len()];
    for (l, block_targets) in targets.iter().enumerate().take(last + 1) {
        let stats = forward_collecting(model, l, &mut chunks, needs, true, |input| {
            block_targets.iter().any(|p| p.input() == input)
        })?;
        if block_targets.is_empty() {
            continue;
        }
        // Every targeted weight's score in the block, pooled: the outlier
        // threshold is m times the block's mean, as in the paper's code.
        let mut scores: Vec<f64> = Vec::new();
        for &proj in block_targets {
            let norms = stats
                .get(&proj.input())
                .map(|s| s.col_norms())
                .ok_or_else(|| RuntimeError::Invalid(format!("no activations for block {l}")))?;
            let w: Vec<f32> = model
                .linear_weight(l, proj)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            let cols = norms.len();
            scores.extend(
                w.iter()
                    .enumerate()
                    .map(|(i, &v)| (v.abs() * norms[i % cols]) as f64),
            );
        }
        let mean = scores.iter().sum::<f64>() / scores.len().max(1) as f64;
        let outliers = scores.iter().filter(|&&s| s > m * mean).count();
        ratios[l] = Some(outliers as f64 / scores.len().max(1) as f64);
    }
    Ok(ratios)
}

#[cfg(test)]
mod tests {
    use super::owl_allocation;

    #[test]
    fn owl_keeps_more_where_more_outliers_and_averages_to_the_target() {
        let ratios = [Some(0.01), Some(0.05), Some(0.03), None, Some(0.02)];
        let s = owl_allocation(&ratios, 0.5, 0.08);
        // The most outliers: the least sparse; the fewest: the most.
        assert!(s[1] < s[2] && s[2] < s[4] && s[4] < s[0]);
        // Scaled to [0, 2λ]: the spread is 2λ.
        assert!((s[0] - s[1] - 0.16).abs() < 1e-12);
        let mean = [s[0], s[1], s[2], s[4]].iter().sum::<f64>() / 4.0;
        assert!((mean - 0.5).abs() < 1e-12);
        assert_eq!(s[3], 0.5);
        // Equal ratios: every block at the target.
        assert_eq!(
            owl_allocation(&[Some(0.1), Some(0.1)], 0.6, 0.1),
            vec![0.6, 0.6]
        );
    }
}
