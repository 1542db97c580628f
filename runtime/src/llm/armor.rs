//! ARMOR: block-diagonal wrappers around an N:M sparse weight.
//!
//! A pruned linear layer `W` (rows × cols, `y = W x`) is approximated as `W ≈ A (S ∘ M) B`
//! with the mask `M` fixed, `S` the kept weights and `A` (rows × rows), `B` (cols × cols)
//! block-diagonal with square `block × block` blocks. The wrappers are cheap (`block` MACs per
//! input and output element) and recover much of what pruning lost, because they mix channels
//! inside each block while the sparse core keeps its hardware-friendly pattern.
//!
//! The objective is the layer's proxy loss `L = tr((W − A S B) H (W − A S B)ᵀ)` with
//! `H = XᵀX` from calibration inputs. Starting from `A = I`, `B = I`, `S = S0`, block
//! coordinate descent alternates
//!
//! * an A-step: every row block `A_r` moves to the minimiser of its (separable) loss,
//!   `A_r = (W_R H Z_Rᵀ)(Z_R H Z_Rᵀ)⁻¹` with `Z = S B`;
//! * a B-step: Gauss–Seidel over the column blocks, `B_j` moving to the minimiser with the
//!   other blocks fixed: with `Y = A S`, `E0 = W − Σ_{k≠j} Y_K B_k P_K`, setting
//!   `d/dB_j tr((E0 − Y_J B_j P_J) H (…)ᵀ) = −2 Y_Jᵀ E0 H_{:,J} + 2 Y_JᵀY_J B_j H_JJ` to zero
//!   gives `B_j = (Y_JᵀY_J)⁻¹ (Y_Jᵀ E0 H_{:,J}) H_JJ⁻¹`;
//! * an S-step: projected gradient steps on the kept entries with an exact line search.
//!
//! The A- and B-updates are taken as a ridge-regularised Newton step from the current block,
//! `ΔA_r = F (G + δI)⁻¹` and `ΔB_j = (Q + δI)⁻¹ F (H_JJ + δ'I)⁻¹` with `F` the block's
//! (half, negated) gradient computed from the residual: without the ridge this is exactly the
//! minimiser above, and with it the change of `L` is provably `≤ −⟨Δ, F⟩ ≤ 0`. Each block
//! update is also checked in closed form and kept only if it lowers `L` by more than round-off,
//! so `L` never increases.
//!
//! All arithmetic is f64; every output element is computed by a fixed sequential inner loop
//! (rayon only splits independent rows or blocks), so results do not depend on the thread count.

use super::error::{Result, RuntimeError};
use rayon::prelude::*;

/// Relative ridge on the normal equations' matrices, times their mean diagonal.
const RIDGE: f64 = 1e-8;
/// Absolute ridge floor, so an all-zero block still factors.
const RIDGE_FLOOR: f64 = 1e-30;
/// A block update is kept only if it lowers `L` by more than this fraction of `L`: smaller
/// changes are at the level of round-off and could otherwise make the computed `L` rise.
const MIN_GAIN: f64 = 1e-12;
/// Rows of the output computed together by [`matmul`], so each row of the right operand is
/// read once per group instead of once per row.
const ROW_GROUP: usize = 8;

/// Shape of the ARMOR wrappers and how long to optimise them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ArmorConfig {
    /// Side of the square diagonal blocks of `A` and `B`; must divide rows and cols.
    pub block: usize,
    /// Rounds of (A-step, B-step, S-step).
    pub iters: usize,
    /// Projected gradient steps on `S` per round.
    pub s_steps: usize,
}

/// A solved layer `W ≈ A S B`: `A`, `B` block-diagonal (only the diagonal blocks are stored),
/// `S` sparse on the given mask.
#[derive(Clone, Debug)]
pub struct Armor {
    pub rows: usize,
    pub cols: usize,
    pub block: usize,
    /// `rows / block` blocks of `block × block`, block `k` at `k * block * block..`, row-major.
    pub a: Vec<f32>,
    /// rows × cols, row-major, exactly 0 outside the mask.
    pub s: Vec<f32>,
    /// `cols / block` blocks of `block × block`, laid out like `a`.
    pub b: Vec<f32>,
    /// `L` at `A = I`, `B = I`, `S = S0`.
    pub loss_before: f64,
    /// `L` of [`Armor::effective`], never above `loss_before`.
    pub loss_after: f64,
}

impl Armor {
    /// A (S) B as one dense rows×cols matrix (what the layer computes).
    pub fn effective(&self) -> Vec<f32> {
        let a = to_f64(&self.a);
        let s = to_f64(&self.s);
        let b = to_f64(&self.b);
        effective_f64(&a, &s, &b, self.rows, self.cols, self.block)
            .into_iter()
            .map(|v| v as f32)
            .collect()
    }
}

/// tr((W − Ŵ) H (W − Ŵ)ᵀ).
///
/// `w`, `w_hat` are rows × cols and `h` cols × cols, row-major; the layer's output error
/// energy over the calibration inputs when `H = XᵀX`.
pub fn proxy_loss(w: &[f32], w_hat: &[f32], rows: usize, cols: usize, h: &[f64]) -> f64 {
    assert_eq!(w.len(), rows * cols, "proxy_loss: w is not {rows}x{cols}");
    assert_eq!(
        w_hat.len(),
        rows * cols,
        "proxy_loss: w_hat is not {rows}x{cols}"
    );
    assert_eq!(h.len(), cols * cols, "proxy_loss: h is not {cols}x{cols}");
    let e: Vec<f64> = w
        .iter()
        .zip(w_hat)
        .map(|(&a, &b)| a as f64 - b as f64)
        .collect();
    quadratic_loss(&e, rows, cols, h)
}

/// Fits `W ≈ A (S ∘ M) B` to minimise the proxy loss, starting from `A = I`, `B = I`,
/// `S = s0` (entries of `s0` outside `kept` are taken as zero).
///
/// `w`, `s0`, `kept` are rows × cols and `h` (= XᵀX, symmetric PSD) cols × cols, row-major.
pub fn armor(
    w: &[f32],
    s0: &[f32],
    kept: &[bool],
    rows: usize,
    cols: usize,
    h: &[f64],
    cfg: ArmorConfig,
) -> Result<Armor> {
    let block = cfg.block;
    let n = rows * cols;
    for (what, len, want) in [
        ("w", w.len(), n),
        ("s0", s0.len(), n),
        ("mask", kept.len(), n),
        ("h", h.len(), cols * cols),
    ] {
        if len != want {
            return Err(RuntimeError::Invalid(format!(
                "armor: {what} has {len} elements, expected {want} for a {rows}x{cols} layer"
            )));
        }
    }
    if rows == 0 || cols == 0 {
        return Err(RuntimeError::Invalid(format!(
            "armor: empty {rows}x{cols} layer"
        )));
    }
    if block == 0 {
        return Err(RuntimeError::Invalid("armor: block size is 0".into()));
    }
    if !rows.is_multiple_of(block) || !cols.is_multiple_of(block) {
        return Err(RuntimeError::Invalid(format!(
            "armor: block size {block} must divide both rows ({rows}) and cols ({cols})"
        )));
    }

    let s0: Vec<f32> = s0
        .iter()
        .zip(kept)
        .map(|(&v, &k)| if k { v } else { 0.0 })
        .collect();
    let loss_before = proxy_loss(w, &s0, rows, cols, h);
    let mut solver = Solver::new(w, &s0, kept, rows, cols, h, block);
    solver.loss = loss_before;
    for _ in 0..cfg.iters {
        solver.round(cfg.s_steps);
    }

    let mut out = Armor {
        rows,
        cols,
        block,
        a: to_f32(&solver.a),
        s: to_f32(&solver.s),
        b: to_f32(&solver.b),
        loss_before,
        loss_after: loss_before,
    };
    if cfg.iters > 0 {
        let after = proxy_loss(w, &out.effective(), rows, cols, h);
        if after <= loss_before {
            out.loss_after = after;
        } else {
            // Rounding to f32 (or a non-finite input) lost the gain: keep the start.
            out.a = to_f32(&identity_blocks(rows, block));
            out.s = s0;
            out.b = to_f32(&identity_blocks(cols, block));
        }
    }
    Ok(out)
}

/// The coordinate-descent state, all in f64.
#[derive(Clone)]
struct Solver<'a> {
    rows: usize,
    cols: usize,
    block: usize,
    w: Vec<f64>,
    h: &'a [f64],
    /// `W H`, fixed.
    wh: Vec<f64>,
    kept: &'a [bool],
    a: Vec<f64>,
    s: Vec<f64>,
    b: Vec<f64>,
    /// Running value of `L` (start value minus the accepted decreases): the scale of the
    /// acceptance threshold only.
    loss: f64,
    /// `E = W − A S B` and `E H` for the current state, when known: the A-step leaves them
    /// (cheaply, from `W H` and `Z H`), the B- and S-steps keep them up to date, so each
    /// round costs one `rows × cols × cols` product per step rather than two.
    residual: Option<Residual>,
}

#[derive(Clone)]
struct Residual {
    e: Vec<f64>,
    eh: Vec<f64>,
}

impl<'a> Solver<'a> {
    fn new(
        w: &[f32],
        s0: &[f32],
        kept: &'a [bool],
        rows: usize,
        cols: usize,
        h: &'a [f64],
        block: usize,
    ) -> Self {
        let w = to_f64(w);
        let wh = matmul(&w, rows, cols, h, cols);
        Solver {
            rows,
            cols,
            block,
            wh,
            w,
            h,
            kept,
            a: identity_blocks(rows, block),
            s: to_f64(s0),
            b: identity_blocks(cols, block),
            loss: 0.0,
            residual: None,
        }
    }

    fn round(&mut self, s_steps: usize) {
        self.a_step();
        self.b_step();
        self.s_step(s_steps);
    }

    fn effective(&self) -> Vec<f64> {
        effective_f64(&self.a, &self.s, &self.b, self.rows, self.cols, self.block)
    }

    /// `W − A S B`.
    fn residual(&self) -> Vec<f64> {
        let mut e = self.effective();
        for (e, &w) in e.iter_mut().zip(&self.w) {
            *e = w - *e;
        }
        e
    }

    /// The cached `E` and `E H`, or the two computed now.
    fn take_residual(&mut self) -> Residual {
        self.residual.take().unwrap_or_else(|| {
            let e = self.residual();
            let eh = matmul(&e, self.rows, self.cols, self.h, self.cols);
            Residual { e, eh }
        })
    }

    /// `L` recomputed from scratch.
    #[cfg(test)]
    fn full_loss(&self) -> f64 {
        quadratic_loss(&self.residual(), self.rows, self.cols, self.h)
    }

    /// Smallest decrease of `L` worth taking.
    fn min_gain(&self) -> f64 {
        MIN_GAIN * self.loss.abs()
    }

    /// Every row block of `A` to its minimiser for fixed `S`, `B` (rows are independent).
    fn a_step(&mut self) {
        let (rows, cols, bs) = (self.rows, self.cols, self.block);
        let z = mul_right_blocks(&self.s, rows, cols, &self.b, bs);
        let zh = matmul(&z, rows, cols, self.h, cols);
        let min_gain = self.min_gain();
        let a = &self.a;
        let wh = &self.wh;
        let updates: Vec<Option<(Vec<f64>, f64)>> = (0..rows / bs)
            .into_par_iter()
            .map(|r| {
                let r0 = r * bs;
                let ar = &a[r * bs * bs..(r + 1) * bs * bs];
                // EH_R = (W_R − A_r Z_R) H = WH_R − A_r ZH_R.
                let mut ehr = wh[r0 * cols..(r0 + bs) * cols].to_vec();
                for (i, row) in ehr.chunks_exact_mut(cols).enumerate() {
                    for l in 0..bs {
                        let v = ar[i * bs + l];
                        if v != 0.0 {
                            axpy(row, -v, &zh[(r0 + l) * cols..(r0 + l + 1) * cols]);
                        }
                    }
                }
                let zr = &z[r0 * cols..(r0 + bs) * cols];
                // G = Z_R H Z_Rᵀ, F = E_R H Z_Rᵀ.
                let mut g = vec![0.0; bs * bs];
                let mut f = vec![0.0; bs * bs];
                for p in 0..bs {
                    let zhp = &zh[(r0 + p) * cols..(r0 + p + 1) * cols];
                    let ehp = &ehr[p * cols..(p + 1) * cols];
                    for q in 0..bs {
                        let zq = &zr[q * cols..(q + 1) * cols];
                        g[p * bs + q] = dot(zhp, zq);
                        f[p * bs + q] = dot(ehp, zq);
                    }
                }
                symmetrize(&mut g, bs);
                // ΔA G' = F  ⇔  G' ΔAᵀ = Fᵀ.
                let delta = transpose(&ridge_solve(&g, bs, &transpose(&f, bs), bs)?, bs);
                let dg = small_matmul(&delta, &g, bs);
                let change = dot(&delta, &dg) - 2.0 * dot(&delta, &f);
                accept(&delta, change, min_gain)
            })
            .collect();
        for (r, update) in updates.into_iter().enumerate() {
            if let Some((delta, change)) = update {
                axpy(&mut self.a[r * bs * bs..(r + 1) * bs * bs], 1.0, &delta);
                self.loss += change;
            }
        }
        // E = W − A Z and E H = W H − A (Z H) for the new A.
        let mut e = mul_left_blocks(&self.a, &z, rows, cols, bs);
        let mut eh = mul_left_blocks(&self.a, &zh, rows, cols, bs);
        for (e, &w) in e.iter_mut().zip(&self.w) {
            *e = w - *e;
        }
        for (eh, &wh) in eh.iter_mut().zip(&self.wh) {
            *eh = wh - *eh;
        }
        self.residual = Some(Residual { e, eh });
    }

    /// Gauss–Seidel over the column blocks of `B`, each to its minimiser with the others fixed.
    fn b_step(&mut self) {
        let (rows, cols, bs) = (self.rows, self.cols, self.block);
        let y = mul_left_blocks(&self.a, &self.s, rows, cols, bs);
        let Residual { mut e, mut eh } = self.take_residual();
        for j in 0..cols / bs {
            let j0 = j * bs;
            // H_{J,:} (bs × cols), H_JJ and (E H)_{:,J}.
            let hj = &self.h[j0 * cols..(j0 + bs) * cols];
            let mut hjj: Vec<f64> = hj
                .chunks_exact(cols)
                .flat_map(|row| row[j0..j0 + bs].iter().copied())
                .collect();
            symmetrize(&mut hjj, bs);
            let ehj: Vec<f64> = eh
                .chunks_exact(cols)
                .flat_map(|row| row[j0..j0 + bs].iter().copied())
                .collect();
            // Y_Jᵀ (bs × rows).
            let yjt: Vec<f64> = (0..bs)
                .flat_map(|p| (0..rows).map(move |i| (i, p)))
                .map(|(i, p)| y[i * cols + j0 + p])
                .collect();
            let yj = transpose_rect(&yjt, bs, rows);
            let mut q = matmul(&yjt, bs, rows, &yj, bs);
            symmetrize(&mut q, bs);
            // F = Y_Jᵀ E H_{:,J}; Q ΔB H_JJ = F.
            let f = matmul(&yjt, bs, rows, &ehj, bs);
            let Some(t) = ridge_solve(&q, bs, &f, bs) else {
                continue;
            };
            let Some(delta_t) = ridge_solve(&hjj, bs, &transpose(&t, bs), bs) else {
                continue;
            };
            let delta = transpose(&delta_t, bs);
            let qdh = small_matmul(&small_matmul(&q, &delta, bs), &hjj, bs);
            let change = dot(&delta, &qdh) - 2.0 * dot(&delta, &f);
            let Some((delta, change)) = accept(&delta, change, self.min_gain()) else {
                continue;
            };
            axpy(&mut self.b[j * bs * bs..(j + 1) * bs * bs], 1.0, &delta);
            self.loss += change;
            // E_{:,J} −= Y_J ΔB, so E H −= (Y_J ΔB) H_{J,:}.
            let yd = matmul(&yj, rows, bs, &delta, bs);
            for (erow, ydrow) in e.chunks_exact_mut(cols).zip(yd.chunks_exact(bs)) {
                axpy(&mut erow[j0..j0 + bs], -1.0, ydrow);
            }
            axpy(&mut eh, -1.0, &matmul(&yd, rows, bs, hj, cols));
        }
        self.residual = Some(Residual { e, eh });
    }

    /// `steps` projected gradient steps on the kept entries of `S`, each with an exact line
    /// search on the quadratic `L`.
    fn s_step(&mut self, steps: usize) {
        if steps == 0 {
            return;
        }
        let (rows, cols, bs) = (self.rows, self.cols, self.block);
        let Residual { mut e, mut eh } = self.take_residual();
        let at = transpose_blocks(&self.a, bs);
        let bt = transpose_blocks(&self.b, bs);
        for _ in 0..steps {
            // D = −∇_S L = 2 Aᵀ E H Bᵀ on the mask.
            let mut d = mul_right_blocks(
                &mul_left_blocks(&at, &eh, rows, cols, bs),
                rows,
                cols,
                &bt,
                bs,
            );
            for (d, &k) in d.iter_mut().zip(self.kept) {
                *d = if k { 2.0 * *d } else { 0.0 };
            }
            let v = effective_f64(&self.a, &d, &self.b, rows, cols, bs);
            let vh = matmul(&v, rows, cols, self.h, cols);
            // L(S + tD) = L − 2t⟨EH, V⟩ + t² tr(V H Vᵀ), V = A D B.
            let num = frobenius(&eh, &v, cols);
            let den = frobenius(&v, &vh, cols);
            if !(den > 0.0 && num > 0.0) {
                break;
            }
            let t = num / den;
            let gain = num * t;
            if !(t.is_finite() && gain > self.min_gain()) {
                break;
            }
            for ((s, &d), &k) in self.s.iter_mut().zip(&d).zip(self.kept) {
                if k {
                    *s += t * d;
                }
            }
            axpy(&mut e, -t, &v);
            axpy(&mut eh, -t, &vh);
            self.loss -= gain;
        }
        self.residual = Some(Residual { e, eh });
    }
}

/// Keeps a block update only if it is finite and lowers `L` by more than `min_gain`.
fn accept(delta: &[f64], change: f64, min_gain: f64) -> Option<(Vec<f64>, f64)> {
    (change < -min_gain && delta.iter().all(|v| v.is_finite())).then(|| (delta.to_vec(), change))
}

/// `tr(E H Eᵀ)` for `e` rows × cols: per-row sums in parallel, added in row order.
fn quadratic_loss(e: &[f64], rows: usize, cols: usize, h: &[f64]) -> f64 {
    let eh = matmul(e, rows, cols, h, cols);
    frobenius(e, &eh, cols)
}

/// `⟨x, y⟩_F` of two matrices with `cols` columns, deterministic: row sums then in row order.
fn frobenius(x: &[f64], y: &[f64], cols: usize) -> f64 {
    let sums: Vec<f64> = x
        .par_chunks(cols)
        .zip(y.par_chunks(cols))
        .map(|(a, b)| dot(a, b))
        .collect();
    sums.iter().sum()
}

fn dot(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// `y += alpha · x`.
fn axpy(y: &mut [f64], alpha: f64, x: &[f64]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// `n / block` identity blocks.
fn identity_blocks(n: usize, block: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * block];
    for blk in out.chunks_exact_mut(block * block) {
        for p in 0..block {
            blk[p * block + p] = 1.0;
        }
    }
    out
}

/// `A S B` for block-diagonal `A`, `B` given as blocks.
fn effective_f64(a: &[f64], s: &[f64], b: &[f64], rows: usize, cols: usize, bs: usize) -> Vec<f64> {
    mul_left_blocks(a, &mul_right_blocks(s, rows, cols, b, bs), rows, cols, bs)
}

/// `a` (n × k) times `b` (k × m), row-major. Output rows are computed in groups of
/// [`ROW_GROUP`] in parallel; each element accumulates over `k` in order.
fn matmul(a: &[f64], n: usize, k: usize, b: &[f64], m: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * m];
    if n == 0 || m == 0 {
        return out;
    }
    out.par_chunks_mut(ROW_GROUP * m)
        .enumerate()
        .for_each(|(g, chunk)| {
            let r0 = g * ROW_GROUP;
            for kk in 0..k {
                let brow = &b[kk * m..(kk + 1) * m];
                for (ri, orow) in chunk.chunks_exact_mut(m).enumerate() {
                    let x = a[(r0 + ri) * k + kk];
                    if x != 0.0 {
                        axpy(orow, x, brow);
                    }
                }
            }
        });
    out
}

/// `x` (n × cols) times the block-diagonal matrix with `blocks` (bs × bs each).
fn mul_right_blocks(x: &[f64], n: usize, cols: usize, blocks: &[f64], bs: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * cols];
    out.par_chunks_mut(cols).enumerate().for_each(|(i, orow)| {
        let xrow = &x[i * cols..(i + 1) * cols];
        for (j, (oblk, xblk)) in orow
            .chunks_exact_mut(bs)
            .zip(xrow.chunks_exact(bs))
            .enumerate()
        {
            let blk = &blocks[j * bs * bs..(j + 1) * bs * bs];
            for (l, &v) in xblk.iter().enumerate() {
                if v != 0.0 {
                    axpy(oblk, v, &blk[l * bs..(l + 1) * bs]);
                }
            }
        }
    });
    out
}

/// The block-diagonal matrix with `blocks` (bs × bs each) times `x` (n × cols).
fn mul_left_blocks(blocks: &[f64], x: &[f64], n: usize, cols: usize, bs: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * cols];
    out.par_chunks_mut(cols).enumerate().for_each(|(i, orow)| {
        let (r, p) = (i / bs, i % bs);
        let r0 = r * bs;
        let brow = &blocks[r * bs * bs + p * bs..r * bs * bs + (p + 1) * bs];
        for (l, &v) in brow.iter().enumerate() {
            if v != 0.0 {
                axpy(orow, v, &x[(r0 + l) * cols..(r0 + l + 1) * cols]);
            }
        }
    });
    out
}

/// Every block transposed.
fn transpose_blocks(blocks: &[f64], bs: usize) -> Vec<f64> {
    blocks
        .chunks_exact(bs * bs)
        .flat_map(|blk| transpose(blk, bs))
        .collect()
}

fn transpose(m: &[f64], n: usize) -> Vec<f64> {
    transpose_rect(m, n, n)
}

/// `m` (r × c) transposed.
fn transpose_rect(m: &[f64], r: usize, c: usize) -> Vec<f64> {
    (0..c)
        .flat_map(|j| (0..r).map(move |i| m[i * c + j]))
        .collect()
}

fn small_matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * n];
    for (orow, arow) in out.chunks_exact_mut(n).zip(a.chunks_exact(n)) {
        for (kk, &x) in arow.iter().enumerate() {
            axpy(orow, x, &b[kk * n..(kk + 1) * n]);
        }
    }
    out
}

fn symmetrize(m: &mut [f64], n: usize) {
    for i in 0..n {
        for j in i + 1..n {
            let v = 0.5 * (m[i * n + j] + m[j * n + i]);
            m[i * n + j] = v;
            m[j * n + i] = v;
        }
    }
}

/// Solves `(m + δI) X = rhs` for symmetric PSD `m` (n × n) and `rhs` (n × k), row-major, with
/// `δ = RIDGE · mean diag(m) + RIDGE_FLOOR`, raised while the Cholesky factorization fails.
fn ridge_solve(m: &[f64], n: usize, rhs: &[f64], k: usize) -> Option<Vec<f64>> {
    let mean_diag = (0..n).map(|i| m[i * n + i]).sum::<f64>() / n as f64;
    let mut delta = RIDGE * mean_diag.abs() + RIDGE_FLOOR;
    for _ in 0..4 {
        if let Some(l) = cholesky(m, n, delta) {
            let mut x = rhs.to_vec();
            // L Y = rhs, then Lᵀ X = Y, all right-hand sides at once.
            for i in 0..n {
                for p in 0..i {
                    let (done, rest) = x.split_at_mut(i * k);
                    axpy(&mut rest[..k], -l[i * n + p], &done[p * k..(p + 1) * k]);
                }
                let inv = 1.0 / l[i * n + i];
                x[i * k..(i + 1) * k].iter_mut().for_each(|v| *v *= inv);
            }
            for i in (0..n).rev() {
                for p in i + 1..n {
                    let (head, tail) = x.split_at_mut(p * k);
                    axpy(&mut head[i * k..(i + 1) * k], -l[p * n + i], &tail[..k]);
                }
                let inv = 1.0 / l[i * n + i];
                x[i * k..(i + 1) * k].iter_mut().for_each(|v| *v *= inv);
            }
            return Some(x);
        }
        delta *= 1e3;
    }
    None
}

/// Lower Cholesky factor of `m + δI` (its lower triangle is read), or `None` if not positive definite.
fn cholesky(m: &[f64], n: usize, delta: f64) -> Option<Vec<f64>> {
    let mut l = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut v = m[i * n + j] - dot(&l[i * n..i * n + j], &l[j * n..j * n + j]);
            if i == j {
                v += delta;
                if !(v > 0.0 && v.is_finite()) {
                    return None;
                }
                l[i * n + i] = v.sqrt();
            } else {
                l[i * n + j] = v / l[j * n + j];
            }
        }
    }
    Some(l)
}

/// Where ARMOR starts from: the layer pruned to its N:M pattern by one
/// of the one-shot methods.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ArmorInit {
    SparseGpt(super::sparsegpt::SparseGptConfig),
    Wanda,
}

/// ARMOR as a layer pruner for the sequential driver: the initial method
/// prunes the layer, ARMOR refines its kept weights and fits the wrappers on
/// the layer's `XᵀX`; the driver then installs the wrappers
/// ([`super::prune::LayerPruner::take_armor`]), so later blocks calibrate on
/// what the ARMOR layer computes.
pub struct ArmorPruner {
    pub init: ArmorInit,
    pub config: ArmorConfig,
    /// Per layer: its name and the proxy loss before and after ARMOR.
    pub losses: Vec<(String, f64, f64)>,
    last: Option<Armor>,
}

impl ArmorPruner {
    pub fn new(init: ArmorInit, config: ArmorConfig) -> Self {
        ArmorPruner {
            init,
            config,
            losses: Vec::new(),
            last: None,
        }
    }
}

impl super::prune::LayerPruner for ArmorPruner {
    fn method(&self) -> &str {
        "armor"
    }
    fn needs(&self) -> super::prune::StatsNeeds {
        super::prune::StatsNeeds {
            col_norms: self.init == ArmorInit::Wanda,
            hessian: true,
        }
    }
    fn prune_layer(&mut self, layer: super::prune::LayerToPrune<'_>) -> Result<usize> {
        use super::prune::LayerToPrune;
        let LayerToPrune {
            name,
            rows,
            cols,
            weight,
            stats,
            pattern,
        } = layer;
        if !matches!(pattern, super::select::SparsityPattern::NofM { .. }) {
            return Err(RuntimeError::Invalid(format!(
                "`{name}`: ARMOR wraps an N:M pattern, not an unstructured sparsity"
            )));
        }
        let dense = weight.to_vec();
        let inner = LayerToPrune {
            name,
            rows,
            cols,
            weight: &mut *weight,
            stats,
            pattern,
        };
        let pruned = match self.init {
            ArmorInit::SparseGpt(c) => super::sparsegpt::sparsegpt_prune(inner, c)?,
            ArmorInit::Wanda => super::prune::WandaPruner.prune_layer(inner)?,
        };
        let kept: Vec<bool> = weight.iter().map(|w| *w != 0.0).collect();
        let a = armor(
            &dense,
            weight,
            &kept,
            rows,
            cols,
            &stats.xtx_full(),
            self.config,
        )
        .map_err(|e| RuntimeError::Invalid(format!("`{name}`: {e}")))?;
        weight.copy_from_slice(&a.s);
        self.losses
            .push((name.to_string(), a.loss_before, a.loss_after));
        self.last = Some(a);
        Ok(pruned)
    }
    fn take_armor(&mut self) -> Option<Armor> {
        self.last.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    struct Fixture {
        rows: usize,
        cols: usize,
        w: Vec<f32>,
        s0: Vec<f32>,
        kept: Vec<bool>,
        h: Vec<f64>,
    }

    /// Random W, calibration inputs with correlated columns, H = XᵀX, a 2:4 magnitude mask.
    fn fixture(rows: usize, cols: usize, tokens: usize, seed: u64) -> Fixture {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let factors = 4;
        let load: Vec<f64> = (0..factors * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let scale: Vec<f64> = (0..cols).map(|_| rng.random_range(0.2..2.0)).collect();
        let mut x = vec![0.0f64; tokens * cols];
        for t in 0..tokens {
            let f: Vec<f64> = (0..factors).map(|_| rng.random_range(-1.0..1.0)).collect();
            for c in 0..cols {
                let latent: f64 = (0..factors).map(|q| f[q] * load[q * cols + c]).sum();
                x[t * cols + c] = scale[c] * (latent + 0.3 * rng.random_range(-1.0..1.0));
            }
        }
        let h = matmul(&transpose_rect(&x, tokens, cols), cols, tokens, &x, cols);
        let mut kept = vec![false; rows * cols];
        for r in 0..rows {
            for g in (0..cols).step_by(4) {
                let mut idx: Vec<usize> = (g..g + 4).collect();
                idx.sort_by(|&p, &q| w[r * cols + q].abs().total_cmp(&w[r * cols + p].abs()));
                for &c in &idx[..2] {
                    kept[r * cols + c] = true;
                }
            }
        }
        let s0 = w
            .iter()
            .zip(&kept)
            .map(|(&v, &k)| if k { v } else { 0.0 })
            .collect();
        Fixture {
            rows,
            cols,
            w,
            s0,
            kept,
            h,
        }
    }

    fn run(f: &Fixture, block: usize, iters: usize) -> Armor {
        let cfg = ArmorConfig {
            block,
            iters,
            s_steps: 2,
        };
        armor(&f.w, &f.s0, &f.kept, f.rows, f.cols, &f.h, cfg).unwrap()
    }

    fn solver(f: &Fixture, block: usize) -> Solver<'_> {
        let mut s = Solver::new(&f.w, &f.s0, &f.kept, f.rows, f.cols, &f.h, block);
        s.loss = s.full_loss();
        s
    }

    #[test]
    fn every_step_lowers_or_keeps_the_loss() {
        let f = fixture(16, 32, 64, 1);
        let mut s = solver(&f, 8);
        let start = s.full_loss();
        let mut prev = start;
        let mut trace = vec![];
        for _ in 0..6 {
            s.a_step();
            trace.push(("A", s.full_loss()));
            s.b_step();
            trace.push(("B", s.full_loss()));
            // Two single S-steps, as `armor` takes with `s_steps: 2`.
            for _ in 0..2 {
                s.s_step(1);
                trace.push(("S", s.full_loss()));
            }
        }
        for &(step, l) in &trace {
            assert!(
                l <= prev,
                "{step}-step raised L from {prev} to {l}: {trace:?}"
            );
            prev = l;
        }
        // Every kind of step made progress somewhere.
        for kind in ["A", "B", "S"] {
            let mut last = start;
            let mut improved = false;
            for &(step, l) in &trace {
                improved |= step == kind && l < last;
                last = l;
            }
            assert!(improved, "{kind}-steps never lowered L: {trace:?}");
        }
        assert!(prev < 0.9 * start, "{start} -> {prev}");
        // The running estimate tracks the true loss.
        assert!(
            (s.loss - prev).abs() <= 1e-9 * start,
            "{} vs {prev}",
            s.loss
        );

        let out = run(&f, 8, 6);
        assert!(out.loss_after < out.loss_before);
        let direct = proxy_loss(&f.w, &out.effective(), f.rows, f.cols, &f.h);
        assert_eq!(out.loss_after, direct);
        assert!(
            (out.loss_after - prev).abs() <= 1e-5 * start,
            "{} vs {prev}",
            out.loss_after
        );
    }

    #[test]
    fn effective_is_a_s_b_with_block_diagonal_wrappers() {
        let f = fixture(16, 32, 64, 2);
        let (rows, cols, bs) = (f.rows, f.cols, 8);
        let out = run(&f, bs, 3);
        assert_eq!(out.a.len(), rows * bs);
        assert_eq!(out.b.len(), cols * bs);
        assert_eq!(out.s.len(), rows * cols);
        for (i, (&s, &k)) in out.s.iter().zip(&f.kept).enumerate() {
            assert!(k || s == 0.0, "S[{i}] = {s} outside the mask");
        }
        let dense = |blocks: &[f32], n: usize| {
            let mut m = vec![0.0f64; n * n];
            for i in 0..n {
                let (r, p) = (i / bs, i % bs);
                for q in 0..bs {
                    m[i * n + r * bs + q] = blocks[r * bs * bs + p * bs + q] as f64;
                }
            }
            m
        };
        let (a, b) = (dense(&out.a, rows), dense(&out.b, cols));
        assert!(a
            .iter()
            .zip(dense(&to_f32(&identity_blocks(rows, bs)), rows))
            .any(|(x, y)| *x != y));
        assert!(b
            .iter()
            .zip(dense(&to_f32(&identity_blocks(cols, bs)), cols))
            .any(|(x, y)| *x != y));
        let eff = out.effective();
        for i in 0..rows {
            for j in 0..cols {
                let mut v = 0.0;
                for p in 0..rows {
                    for q in 0..cols {
                        v += a[i * rows + p] * out.s[p * cols + q] as f64 * b[q * cols + j];
                    }
                }
                let got = eff[i * cols + j] as f64;
                assert!(
                    (got - v).abs() <= 1e-5 * (1.0 + v.abs()),
                    "({i},{j}): {got} vs {v}"
                );
            }
        }
    }

    #[test]
    fn zero_iterations_is_the_start() {
        let f = fixture(16, 32, 64, 3);
        let out = run(&f, 8, 0);
        assert_eq!(out.a, to_f32(&identity_blocks(16, 8)));
        assert_eq!(out.b, to_f32(&identity_blocks(32, 8)));
        assert_eq!(out.s, f.s0);
        assert_eq!(out.effective(), f.s0);
        let l = proxy_loss(&f.w, &f.s0, f.rows, f.cols, &f.h);
        assert_eq!(out.loss_before, l);
        assert_eq!(out.loss_after, l);
    }

    #[test]
    fn a_and_b_steps_reach_their_minimisers() {
        let f = fixture(16, 32, 64, 4);
        let mut s = solver(&f, 8);
        s.round(2);
        s.round(2);
        s.a_step();
        let base = s.full_loss();
        for idx in [0, 9, 63, 64, 70, 127] {
            for eps in [1e-3, -1e-3] {
                let mut p = s.clone();
                p.a[idx] += eps;
                let l = p.full_loss();
                assert!(l >= base, "A[{idx}] {eps:+}: {l} < {base}");
            }
        }
        s.b_step();
        let base = s.full_loss();
        // The last block was updated last, so it is at its minimiser for the current rest.
        let last = s.b.len() - 64;
        for idx in [last, last + 5, last + 63] {
            for eps in [1e-3, -1e-3] {
                let mut p = s.clone();
                p.b[idx] += eps;
                let l = p.full_loss();
                assert!(l >= base, "B[{idx}] {eps:+}: {l} < {base}");
            }
        }
    }

    #[test]
    fn result_does_not_depend_on_thread_count() {
        let f = fixture(16, 32, 64, 5);
        let with = |n: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .unwrap()
                .install(|| run(&f, 8, 3))
        };
        let (one, three) = (with(1), with(3));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&one.a), bits(&three.a));
        assert_eq!(bits(&one.s), bits(&three.s));
        assert_eq!(bits(&one.b), bits(&three.b));
        assert_eq!(one.loss_after.to_bits(), three.loss_after.to_bits());
        assert_eq!(one.loss_before.to_bits(), three.loss_before.to_bits());
    }

    #[test]
    fn bad_shapes_are_errors() {
        let f = fixture(16, 32, 64, 6);
        let cfg = |block| ArmorConfig {
            block,
            iters: 1,
            s_steps: 1,
        };
        let err = |r: Result<Armor>| match r {
            Err(RuntimeError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        };
        let m = err(armor(&f.w, &f.s0, &f.kept, 16, 32, &f.h, cfg(0)));
        assert!(m.contains("block size is 0"), "{m}");
        let m = err(armor(&f.w, &f.s0, &f.kept, 16, 32, &f.h, cfg(32)));
        assert!(m.contains("32") && m.contains("rows (16)"), "{m}");
        let m = err(armor(&f.w, &f.s0, &f.kept, 16, 32, &f.h, cfg(6)));
        assert!(m.contains("block size 6"), "{m}");
        let m = err(armor(&f.w[1..], &f.s0, &f.kept, 16, 32, &f.h, cfg(8)));
        assert!(m.contains("w has 511"), "{m}");
        let m = err(armor(&f.w, &f.s0[..500], &f.kept, 16, 32, &f.h, cfg(8)));
        assert!(m.contains("s0 has 500"), "{m}");
        let m = err(armor(&f.w, &f.s0, &f.kept[..3], 16, 32, &f.h, cfg(8)));
        assert!(m.contains("mask has 3"), "{m}");
        let m = err(armor(&f.w, &f.s0, &f.kept, 16, 32, &f.h[..1000], cfg(8)));
        assert!(m.contains("h has 1000"), "{m}");
    }
}
