//! Optimal Brain Surgeon pruning with an empirical Fisher: WoodFisher (Singh
//! & Alistarh 2020) and M-FAC (Frantar, Kurtic & Alistarh 2021).
//!
//! A weight tensor, flattened, is cut into blocks of consecutive weights;
//! each block has its own Fisher `F = λI + (1/m) Σ gᵢ gᵢᵀ` from `m`
//! gradients. WoodFisher forms and inverts it; M-FAC never forms it and
//! applies `F⁻¹` through the Woodbury identity applied recursively over the
//! gradients, `F⁻¹ = I/λ − Σᵢ aᵢ aᵢᵀ / dᵢ` with `aᵢ = F₍ᵢ₋₁₎⁻¹ gᵢ` and
//! `dᵢ = m + gᵢᵀ aᵢ`. A weight's saliency is `w_q² / (2 [F⁻¹]_qq)`; once a
//! set `Q` of a block is pruned, the block's survivors take the joint OBS
//! update `δw = −F⁻¹ E_Q (E_Qᵀ F⁻¹ E_Q)⁻¹ w_Q`, which is exact for the
//! block's quadratic model and leaves `w_Q` at zero.
//!
//! Everything runs in f64, block by block in a fixed order (blocks in
//! parallel, each alone), so results do not depend on the thread count.

use num_traits::Float;
use rayon::prelude::*;

use crate::error::{Result, RuntimeError};
use crate::gemm::{gemm_serial, Mat};

/// How the inverse of a block is represented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FisherKind {
    /// WoodFisher: the block's Fisher formed and inverted (Cholesky).
    Dense,
    /// M-FAC: the recursive Woodbury form, `O(m² n)` per block.
    Woodbury,
}

/// A solver's settings: block size and dampening λ.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ObsConfig {
    pub kind: FisherKind,
    pub block: usize,
    pub damp: f64,
}

/// The inverse Fisher of one block of `n` weights.
#[derive(Clone, Debug)]
pub enum BlockInverse {
    Dense {
        n: usize,
        inv: Vec<f64>,
    },
    /// `F⁻¹ = I/λ − Σᵢ aᵢ aᵢᵀ / dᵢ`; `a` is `m x n` row-major.
    LowRank {
        n: usize,
        lambda: f64,
        a: Vec<f64>,
        den: Vec<f64>,
    },
}

impl BlockInverse {
    /// The inverse of `F = λI + (1/m) GᵀG` for the `m x n` row-major `g`.
    pub fn new(kind: FisherKind, g: &[f64], m: usize, n: usize, lambda: f64) -> Result<Self> {
        let gm = Mat::new(g, m, n);
        match kind {
            FisherKind::Dense => {
                let mut f = vec![0.0f64; n * n];
                gemm_serial(gm.t(), gm, &mut f, false);
                let scale = 1.0 / m as f64;
                for (i, x) in f.iter_mut().enumerate() {
                    *x *= scale;
                    if i / n == i % n {
                        *x += lambda;
                    }
                }
                let l = cholesky(&f, n, "Fisher block")?;
                Ok(BlockInverse::Dense {
                    n,
                    inv: inverse_from_cholesky(&l, n),
                })
            }
            FisherKind::Woodbury => {
                // The Gram matrix K = G Gᵀ; each aᵢ = Σ_k C[i][k] g_k, so the
                // recursion runs on the m x m coefficients C.
                let mut k = vec![0.0f64; m * m];
                gemm_serial(gm, gm.t(), &mut k, false);
                let mut c = vec![0.0f64; m * m];
                let mut den = vec![0.0f64; m];
                for i in 0..m {
                    c[i * m + i] = 1.0 / lambda;
                    for j in 0..i {
                        // aⱼ · gᵢ
                        let dot: f64 = (0..m).map(|p| c[j * m + p] * k[p * m + i]).sum();
                        let coef = dot / den[j];
                        for p in 0..m {
                            c[i * m + p] -= coef * c[j * m + p];
                        }
                    }
                    let gi_ai: f64 = (0..m).map(|p| c[i * m + p] * k[p * m + i]).sum();
                    den[i] = m as f64 + gi_ai;
                    if den[i].partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
                        return Err(RuntimeError::Numeric {
                            layer: "M-FAC".into(),
                            reason: format!(
                                "non-positive Woodbury denominator {:e}; raise the dampening",
                                den[i]
                            ),
                        });
                    }
                }
                let mut a = vec![0.0f64; m * n];
                gemm_serial(Mat::new(&c, m, m), gm, &mut a, false);
                Ok(BlockInverse::LowRank { n, lambda, a, den })
            }
        }
    }

    pub fn len(&self) -> usize {
        match self {
            BlockInverse::Dense { n, .. } | BlockInverse::LowRank { n, .. } => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `[F⁻¹]_qq` for every q.
    pub fn diag(&self) -> Vec<f64> {
        match self {
            BlockInverse::Dense { n, inv } => (0..*n).map(|q| inv[q * n + q]).collect(),
            BlockInverse::LowRank { n, lambda, a, den } => {
                let mut d = vec![1.0 / lambda; *n];
                for (row, di) in a.chunks(*n).zip(den) {
                    for (x, v) in d.iter_mut().zip(row) {
                        *x -= v * v / di;
                    }
                }
                d
            }
        }
    }

    /// `F⁻¹ v`.
    pub fn apply(&self, v: &[f64]) -> Vec<f64> {
        match self {
            BlockInverse::Dense { n, inv } => inv
                .chunks(*n)
                .map(|row| row.iter().zip(v).map(|(a, b)| a * b).sum())
                .collect(),
            BlockInverse::LowRank { n, lambda, a, den } => {
                let mut out: Vec<f64> = v.iter().map(|x| x / lambda).collect();
                for (row, di) in a.chunks(*n).zip(den) {
                    let s: f64 = row.iter().zip(v).map(|(x, y)| x * y).sum::<f64>() / di;
                    for (o, x) in out.iter_mut().zip(row) {
                        *o -= s * x;
                    }
                }
                out
            }
        }
    }

    /// `u = (E_Qᵀ F⁻¹ E_Q)⁻¹ w_Q` for the pruned positions `q`.
    fn solve_pruned(&self, q: &[usize], wq: &[f64]) -> Result<Vec<f64>> {
        let k = q.len();
        match self {
            BlockInverse::Dense { n, inv } => {
                let mut sub = vec![0.0f64; k * k];
                for (i, &qi) in q.iter().enumerate() {
                    for (j, &qj) in q.iter().enumerate() {
                        sub[i * k + j] = inv[qi * n + qj];
                    }
                }
                let l = cholesky(&sub, k, "Fisher block")?;
                Ok(cholesky_solve(&l, k, wq))
            }
            BlockInverse::LowRank { n, lambda, a, den } => {
                // E_Qᵀ F⁻¹ E_Q = I/λ − A_Qᵀ D A_Q (D = diag(1/dᵢ)); by Woodbury its
                // inverse is λI + λ² A_Qᵀ (diag(dᵢ) − λ A_Q A_Qᵀ)⁻¹ A_Q: an m x m solve.
                let m = den.len();
                let aq: Vec<f64> = a
                    .chunks(*n)
                    .flat_map(|row| q.iter().map(move |&j| row[j]))
                    .collect();
                let am = Mat::new(&aq, m, k);
                let mut s = vec![0.0f64; m * m];
                gemm_serial(am, am.t(), &mut s, false);
                for (i, x) in s.iter_mut().enumerate() {
                    *x *= -lambda;
                    if i / m == i % m {
                        *x += den[i / m];
                    }
                }
                let r: Vec<f64> = aq
                    .chunks(k)
                    .map(|row| row.iter().zip(wq).map(|(x, y)| x * y).sum())
                    .collect();
                let z = lu_solve(s, m, r)?;
                let mut u: Vec<f64> = wq.iter().map(|x| lambda * x).collect();
                for (row, zi) in aq.chunks(k).zip(&z) {
                    for (o, x) in u.iter_mut().zip(row) {
                        *o += lambda * lambda * zi * x;
                    }
                }
                Ok(u)
            }
        }
    }

    /// Prunes the positions where `keep` is false from the block `w` with
    /// the joint OBS update of the survivors; pruned weights end at zero.
    pub fn prune(&self, w: &mut [f32], keep: &[bool]) -> Result<()> {
        let q: Vec<usize> = (0..w.len()).filter(|&i| !keep[i]).collect();
        if q.is_empty() {
            return Ok(());
        }
        let wq: Vec<f64> = q.iter().map(|&i| w[i] as f64).collect();
        let u = self.solve_pruned(&q, &wq)?;
        let mut v = vec![0.0f64; w.len()];
        for (&i, x) in q.iter().zip(&u) {
            v[i] = *x;
        }
        let delta = self.apply(&v);
        for (i, x) in w.iter_mut().enumerate() {
            *x = if keep[i] {
                (*x as f64 - delta[i]) as f32
            } else {
                0.0
            };
        }
        Ok(())
    }
}

/// The block-diagonal inverse Fisher of one weight tensor of `d` weights.
#[derive(Clone, Debug)]
pub struct TensorFisher {
    pub block: usize,
    pub blocks: Vec<BlockInverse>,
}

impl TensorFisher {
    /// From `m` gradients of the tensor (`grads`: `m x d` row-major).
    pub fn new(cfg: &ObsConfig, grads: &[f32], m: usize, d: usize, what: &str) -> Result<Self> {
        if m == 0 || grads.len() != m * d || cfg.block == 0 {
            return Err(RuntimeError::InvalidConfig(format!(
                "{what}: {} gradient values for {m} gradients of {d} weights (block {})",
                grads.len(),
                cfg.block
            )));
        }
        let starts: Vec<usize> = (0..d).step_by(cfg.block).collect();
        let blocks = starts
            .par_iter()
            .map(|&s| {
                let n = cfg.block.min(d - s);
                let mut g = vec![0.0f64; m * n];
                for (i, row) in g.chunks_mut(n).enumerate() {
                    for (x, v) in row.iter_mut().zip(&grads[i * d + s..i * d + s + n]) {
                        *x = *v as f64;
                    }
                }
                BlockInverse::new(cfg.kind, &g, m, n, cfg.damp).map_err(|e| match e {
                    RuntimeError::Numeric { reason, .. } => RuntimeError::Numeric {
                        layer: format!("{what}, weights {s}..{}", s + n),
                        reason,
                    },
                    e => e,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TensorFisher {
            block: cfg.block,
            blocks,
        })
    }

    /// OBS saliency `w² / (2 [F⁻¹]_qq)` of every weight.
    pub fn saliency(&self, w: &[f32]) -> Vec<f32> {
        self.blocks
            .par_iter()
            .zip(w.par_chunks(self.block))
            .flat_map_iter(|(b, wb)| {
                b.diag()
                    .into_iter()
                    .zip(wb)
                    .map(|(d, x)| ((*x as f64).powi(2) / (2.0 * d)) as f32)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The joint OBS update of every block for the pruned set (`keep`
    /// false), pruned weights set to zero. `w` holds the weights before
    /// pruning.
    pub fn prune(&self, w: &mut [f32], keep: &[bool]) -> Result<()> {
        self.blocks
            .par_iter()
            .zip(w.par_chunks_mut(self.block))
            .zip(keep.par_chunks(self.block))
            .try_for_each(|((b, wb), kb)| b.prune(wb, kb))
    }
}

/// Lower Cholesky factor of the symmetric positive-definite `a` (`n x n`), in
/// `a`'s own precision; `what` names the matrix in the error.
pub(crate) fn cholesky<T: Float + std::fmt::LowerExp>(
    a: &[T],
    n: usize,
    what: &str,
) -> Result<Vec<T>> {
    let mut l = vec![T::zero(); n * n];
    for j in 0..n {
        let mut d = a[j * n + j];
        for p in 0..j {
            d = d - l[j * n + p] * l[j * n + p];
        }
        if d.partial_cmp(&T::zero()) != Some(std::cmp::Ordering::Greater) || !d.is_finite() {
            return Err(RuntimeError::Numeric {
                layer: what.to_string(),
                reason: format!(
                    "matrix is not positive definite (pivot {d:e}); raise the dampening"
                ),
            });
        }
        let d = d.sqrt();
        l[j * n + j] = d;
        for i in j + 1..n {
            let mut s = a[i * n + j];
            for p in 0..j {
                s = s - l[i * n + p] * l[j * n + p];
            }
            l[i * n + j] = s / d;
        }
    }
    Ok(l)
}

/// `L⁻¹` of a lower-triangular `l`, by forward substitution.
pub(crate) fn lower_inverse<T: Float>(l: &[T], n: usize) -> Vec<T> {
    let mut li = vec![T::zero(); n * n];
    for c in 0..n {
        for i in c..n {
            let mut s = if i == c { T::one() } else { T::zero() };
            for p in c..i {
                s = s - l[i * n + p] * li[p * n + c];
            }
            li[i * n + c] = s / l[i * n + i];
        }
    }
    li
}

/// Solves `L Lᵀ x = b`.
fn cholesky_solve(l: &[f64], n: usize, b: &[f64]) -> Vec<f64> {
    let mut y = b.to_vec();
    for i in 0..n {
        let mut s = y[i];
        for p in 0..i {
            s -= l[i * n + p] * y[p];
        }
        y[i] = s / l[i * n + i];
    }
    for i in (0..n).rev() {
        let mut s = y[i];
        for p in i + 1..n {
            s -= l[p * n + i] * y[p];
        }
        y[i] = s / l[i * n + i];
    }
    y
}

/// `(L Lᵀ)⁻¹ = (L⁻¹)ᵀ L⁻¹` from the lower factor.
fn inverse_from_cholesky(l: &[f64], n: usize) -> Vec<f64> {
    let li = lower_inverse(l, n);
    let m = Mat::new(&li, n, n);
    let mut inv = vec![0.0f64; n * n];
    gemm_serial(m.t(), m, &mut inv, false);
    inv
}

/// Solves `a x = b` by Gaussian elimination with partial pivoting.
fn lu_solve(mut a: Vec<f64>, n: usize, mut b: Vec<f64>) -> Result<Vec<f64>> {
    for col in 0..n {
        let piv = (col..n)
            .max_by(|&i, &j| a[i * n + col].abs().total_cmp(&a[j * n + col].abs()))
            .unwrap_or(col);
        if a[piv * n + col] == 0.0 || !a[piv * n + col].is_finite() {
            return Err(RuntimeError::Numeric {
                layer: "M-FAC".into(),
                reason: "singular system in the OBS update; raise the dampening".into(),
            });
        }
        if piv != col {
            for j in 0..n {
                a.swap(col * n + j, piv * n + j);
            }
            b.swap(col, piv);
        }
        for i in col + 1..n {
            let f = a[i * n + col] / a[col * n + col];
            if f != 0.0 {
                for j in col..n {
                    a[i * n + j] -= f * a[col * n + j];
                }
                b[i] -= f * b[col];
            }
        }
    }
    for i in (0..n).rev() {
        let mut s = b[i];
        for j in i + 1..n {
            s -= a[i * n + j] * b[j];
        }
        b[i] = s / a[i * n + i];
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    /// The dense Fisher `λI + (1/m) GᵀG` of `m x n` gradients, by loops.
    fn fisher(g: &[f64], m: usize, n: usize, lambda: f64) -> Vec<f64> {
        let mut f = vec![0.0f64; n * n];
        for r in 0..m {
            for i in 0..n {
                for j in 0..n {
                    f[i * n + j] += g[r * n + i] * g[r * n + j] / m as f64;
                }
            }
        }
        for i in 0..n {
            f[i * n + i] += lambda;
        }
        f
    }

    /// The inverse of [`fisher`] by Gaussian elimination, column by column.
    fn dense_inverse(g: &[f64], m: usize, n: usize, lambda: f64) -> Vec<f64> {
        let f = fisher(g, m, n, lambda);
        (0..n)
            .flat_map(|c| {
                let mut e = vec![0.0; n];
                e[c] = 1.0;
                lu_solve(f.clone(), n, e).unwrap()
            })
            .collect::<Vec<_>>()
            // Columns of the inverse, stacked: transpose (the inverse is symmetric anyway).
            .chunks(n)
            .enumerate()
            .fold(vec![0.0; n * n], |mut acc, (c, col)| {
                for (r, v) in col.iter().enumerate() {
                    acc[r * n + c] = *v;
                }
                acc
            })
    }

    fn close(a: &[f64], b: &[f64], tol: f64) {
        let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * scale,
                "element {i}: {x} vs {y} (scale {scale})"
            );
        }
    }

    #[test]
    fn both_forms_match_the_dense_inverse() {
        for (m, n) in [(3, 7), (12, 5), (20, 20)] {
            let g = values(m * n, (m * 31 + n) as u64);
            let lambda = 0.05;
            let reference = dense_inverse(&g, m, n, lambda);
            for kind in [FisherKind::Dense, FisherKind::Woodbury] {
                let b = BlockInverse::new(kind, &g, m, n, lambda).unwrap();
                let diag: Vec<f64> = (0..n).map(|q| reference[q * n + q]).collect();
                close(&b.diag(), &diag, 1e-9);
                let v = values(n, 99);
                let want: Vec<f64> = reference
                    .chunks(n)
                    .map(|row| row.iter().zip(&v).map(|(a, b)| a * b).sum())
                    .collect();
                close(&b.apply(&v), &want, 1e-9);
            }
        }
    }

    /// The block-diagonal inverse of a tensor equals the dense inverse of
    /// each block's Fisher (the off-block entries are dropped by design).
    #[test]
    fn block_diagonal_inverse_of_a_small_layer() {
        let (m, d, block) = (9, 22, 8);
        let g64 = values(m * d, 5);
        let g: Vec<f32> = g64.iter().map(|x| *x as f32).collect();
        let cfg = ObsConfig {
            kind: FisherKind::Dense,
            block,
            damp: 0.01,
        };
        let t = TensorFisher::new(&cfg, &g, m, d, "test").unwrap();
        assert_eq!(t.blocks.len(), 3);
        for (bi, b) in t.blocks.iter().enumerate() {
            let s = bi * block;
            let n = block.min(d - s);
            let g = &g;
            let gb: Vec<f64> = (0..m)
                .flat_map(|r| (s..s + n).map(move |j| g[r * d + j] as f64))
                .collect();
            let reference = dense_inverse(&gb, m, n, 0.01);
            let BlockInverse::Dense { inv, .. } = b else {
                panic!("dense block expected")
            };
            close(inv, &reference, 1e-9);
        }
    }

    /// The joint update zeroes the pruned set and minimises the block's
    /// quadratic model δwᵀ F δw among the updates that do: no other
    /// feasible perturbation of the survivors does better.
    #[test]
    fn joint_update_is_the_constrained_minimum() {
        let (m, n, lambda) = (6, 10, 0.02);
        let g = values(m * n, 17);
        let f = fisher(&g, m, n, lambda);
        let quad = |d: &[f64]| -> f64 {
            (0..n)
                .map(|i| (0..n).map(|j| d[i] * f[i * n + j] * d[j]).sum::<f64>())
                .sum()
        };
        let w0: Vec<f32> = values(n, 3).iter().map(|x| *x as f32).collect();
        let keep: Vec<bool> = (0..n).map(|i| i % 3 != 0).collect();
        let mut results = Vec::new();
        for kind in [FisherKind::Dense, FisherKind::Woodbury] {
            let b = BlockInverse::new(kind, &g, m, n, lambda).unwrap();
            let mut w = w0.clone();
            b.prune(&mut w, &keep).unwrap();
            for i in 0..n {
                if !keep[i] {
                    assert_eq!(w[i], 0.0);
                }
            }
            let delta: Vec<f64> = w.iter().zip(&w0).map(|(a, b)| (*a - *b) as f64).collect();
            let best = quad(&delta);
            // Perturb the survivors' part of the update: the loss only grows.
            for t in 0..20 {
                let p = values(n, 100 + t);
                let mut d2 = delta.clone();
                for i in 0..n {
                    if keep[i] {
                        d2[i] += 1e-2 * p[i];
                    }
                }
                assert!(
                    quad(&d2) >= best - 1e-9,
                    "{kind:?}: perturbation {t} beat the update"
                );
            }
            // Plain zeroing (no update) is worse.
            let zeroed: Vec<f64> = (0..n)
                .map(|i| if keep[i] { 0.0 } else { -(w0[i] as f64) })
                .collect();
            assert!(quad(&zeroed) > best);
            results.push(w);
        }
        let (a, b): (Vec<f64>, Vec<f64>) = (
            results[0].iter().map(|x| *x as f64).collect(),
            results[1].iter().map(|x| *x as f64).collect(),
        );
        close(&a, &b, 1e-4);
    }

    #[test]
    fn saliency_follows_the_inverse_diagonal() {
        let (m, d) = (4, 6);
        let g: Vec<f32> = values(m * d, 8).iter().map(|x| *x as f32).collect();
        let w: Vec<f32> = values(d, 9).iter().map(|x| *x as f32).collect();
        let cfg = ObsConfig {
            kind: FisherKind::Woodbury,
            block: 4,
            damp: 0.1,
        };
        let t = TensorFisher::new(&cfg, &g, m, d, "test").unwrap();
        let s = t.saliency(&w);
        let diag: Vec<f64> = t.blocks.iter().flat_map(|b| b.diag()).collect();
        for i in 0..d {
            let want = (w[i] as f64).powi(2) / (2.0 * diag[i]);
            assert!((s[i] as f64 - want).abs() <= 1e-6 * want.max(1e-12));
        }
    }
}
