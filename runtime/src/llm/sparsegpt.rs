//! SparseGPT (Frantar & Alistarh 2023): prune a linear layer and update the kept weights with OBS, column block by column block.

use super::error::{Result, RuntimeError};
use super::linalg::{inverse_upper_cholesky, inverse_upper_cholesky_f32};
use super::prune::LayerToPrune;
use super::select::{choose_pruned, Scope, SparsityPattern};
use candle_core::{Device, Tensor};

/// SparseGPT's knobs (defaults are the paper's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SparseGptConfig {
    /// Columns per lazy-update block (B).
    pub block_size: usize,
    /// Dampening added to the Hessian's diagonal, as a fraction of its mean diagonal.
    pub damp: f64,
    /// Precision of the dampened Hessian and of its inverse's Cholesky factor.
    pub precision: SolverPrecision,
}

/// Where SparseGPT's factor of H⁻¹ is computed. The sweep itself is f32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SolverPrecision {
    /// f32 throughout, through the explicit inverse, as the reference code and llm-compressor.
    #[default]
    F32,
    /// f64: one Cholesky of the reversed H and a triangular inverse.
    F64,
}

impl Default for SparseGptConfig {
    fn default() -> Self {
        SparseGptConfig {
            block_size: 128,
            damp: 0.01,
            precision: SolverPrecision::default(),
        }
    }
}

/// Prunes `weight` (rows, cols; row-major) in place with SparseGPT.
///
/// `layer.stats.xtx` is the accumulated `XᵀX` (cols, cols) of the layer's calibration inputs
/// over `layer.stats.tokens` rows (only its upper triangle is read). H = (2/tokens) XᵀX; columns with H_jj = 0 are dead (H_jj := 1, weights zeroed);
/// H += damp * mean(diag H) * I; U = upper Cholesky factor of H⁻¹ (both in `config.precision`). The sweep goes over blocks of
/// `block_size` columns: the block's mask is chosen by `w² / U_jj²` (whole block for unstructured,
/// each group of M for N:M), each column is quantized to its mask and its error is pushed onto
/// the block's remaining columns; after a block, one matmul pushes the block's errors onto all
/// later columns. Returns the number of pruned weights.
pub fn sparsegpt_prune(layer: LayerToPrune<'_>, config: SparseGptConfig) -> Result<usize> {
    let LayerToPrune {
        name,
        rows,
        cols,
        weight,
        stats,
        pattern,
    } = layer;
    let tokens = stats.tokens;
    if weight.len() != rows * cols || stats.xtx.len() != cols * cols {
        return Err(RuntimeError::Invalid(format!(
            "sparsegpt `{name}`: weight has {} values for {rows}x{cols} and the Hessian {} for {cols}x{cols}",
            weight.len(),
            stats.xtx.len()
        )));
    }
    if tokens == 0 {
        return Err(RuntimeError::Invalid(format!(
            "sparsegpt `{name}`: no calibration tokens"
        )));
    }
    pattern.validate(Some((name, cols)))?;
    let block = match pattern {
        SparsityPattern::NofM { m, .. } => config.block_size.max(m) / m * m,
        SparsityPattern::Unstructured(_) => config.block_size.max(1),
    };

    // H = 2/n XᵀX, dead columns, dampening.
    let scale = 2.0 / tokens as f64;
    let mut h = stats.xtx_full();
    for v in &mut h {
        *v *= scale;
    }
    for j in 0..cols {
        if h[j * cols + j] == 0.0 {
            h[j * cols + j] = 1.0;
            for r in 0..rows {
                weight[r * cols + j] = 0.0;
            }
        }
    }
    let u = match config.precision {
        SolverPrecision::F64 => {
            let mean_diag = (0..cols).map(|j| h[j * cols + j]).sum::<f64>() / cols as f64;
            let damp = config.damp * mean_diag;
            for j in 0..cols {
                h[j * cols + j] += damp;
            }
            let h = Tensor::from_vec(h, (cols, cols), &Device::Cpu)?;
            inverse_upper_cholesky(&h, name)?.to_dtype(candle_core::DType::F32)?
        }
        SolverPrecision::F32 => {
            let mut h: Vec<f32> = h.into_iter().map(|v| v as f32).collect();
            let mean_diag = (0..cols).map(|j| h[j * cols + j]).sum::<f32>() / cols as f32;
            let damp = config.damp as f32 * mean_diag;
            for j in 0..cols {
                h[j * cols + j] += damp;
            }
            let h = Tensor::from_vec(h, (cols, cols), &Device::Cpu)?;
            // f32 breaks down on Hessians f64 still factors: say so in the error.
            inverse_upper_cholesky_f32(&h, name).map_err(|e| match e {
                RuntimeError::Numeric { layer, reason } => RuntimeError::Numeric {
                    layer,
                    reason: format!("{reason}, or factor in f64 (`sparsegpt(precision = f64)`)"),
                },
                other => other,
            })?
        }
    };
    let u_rows: Vec<f32> = u.flatten_all()?.to_vec1()?;

    let mut pruned_total = 0usize;
    let mut w1 = Vec::new();
    let mut err1 = Vec::new();
    for i1 in (0..cols).step_by(block) {
        let i2 = (i1 + block).min(cols);
        let count = i2 - i1;
        // Copy the block (rows, count) row-major.
        w1.clear();
        for r in 0..rows {
            w1.extend_from_slice(&weight[r * cols + i1..r * cols + i2]);
        }
        err1.clear();
        err1.resize(rows * count, 0.0f32);
        let diag: Vec<f32> = (i1..i2).map(|j| u_rows[j * cols + j]).collect();
        let saliency = |w1: &[f32], r: usize, j: usize| {
            let w = w1[r * count + j];
            w * w / (diag[j] * diag[j])
        };
        let mut mask = match pattern {
            SparsityPattern::Unstructured(_) => {
                let scores: Vec<f32> = (0..rows * count)
                    .map(|k| saliency(&w1, k / count, k % count))
                    .collect();
                choose_pruned(&scores, rows, count, pattern, Scope::Layer)?
            }
            SparsityPattern::NofM { .. } => vec![false; rows * count],
        };
        for i in 0..count {
            if let SparsityPattern::NofM { m, .. } = pattern {
                if i % m == 0 {
                    // Choose this group's mask from the weights as updated so far.
                    let scores: Vec<f32> = (0..rows)
                        .flat_map(|r| (i..i + m).map(move |j| (r, j)))
                        .map(|(r, j)| saliency(&w1, r, j))
                        .collect();
                    let group = choose_pruned(&scores, rows, m, pattern, Scope::Row)?;
                    for r in 0..rows {
                        for j in 0..m {
                            mask[r * count + i + j] = group[r * m + j];
                        }
                    }
                }
            }
            let d = diag[i];
            let urow = &u_rows[(i1 + i) * cols + i1 + i..(i1 + i) * cols + i2];
            for r in 0..rows {
                let row = &mut w1[r * count..(r + 1) * count];
                let w = row[i];
                let q = if mask[r * count + i] { 0.0 } else { w };
                let e = (w - q) / d;
                if e != 0.0 {
                    for (x, uj) in row[i..].iter_mut().zip(urow) {
                        *x -= e * uj;
                    }
                }
                row[i] = q;
                err1[r * count + i] = e;
            }
        }
        for r in 0..rows {
            weight[r * cols + i1..r * cols + i2].copy_from_slice(&w1[r * count..(r + 1) * count]);
        }
        pruned_total += mask.iter().filter(|&&p| p).count();
        if i2 < cols {
            // Lazy batch update: W[:, i2..] -= Err1 · U[i1..i2, i2..].
            let e = Tensor::from_slice(&err1, (rows, count), &Device::Cpu)?;
            let u_block = u.narrow(0, i1, count)?.narrow(1, i2, cols - i2)?;
            let delta: Vec<f32> = crate::gemm::matmul(&e, &u_block)?
                .flatten_all()?
                .to_vec1()?;
            let rest = cols - i2;
            for r in 0..rows {
                let dst = &mut weight[r * cols + i2..(r + 1) * cols];
                for (x, dx) in dst.iter_mut().zip(&delta[r * rest..(r + 1) * rest]) {
                    *x -= dx;
                }
            }
        }
    }
    Ok(pruned_total)
}
