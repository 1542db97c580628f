//! The reference interpreter: plain Rust over slices, sorting everything; the JIT's oracle.

use super::expr::{canonical_score, key_score, score_key, ElemInputs, KExpr};
use super::types::{
    blocks_to_keep, check_finite, count_alive, global_guards, mask_bit, validate, KernelError,
    PruneOptions, PruneSummary, Selection, TensorSummary, TensorView,
};

/// Scores every element of `t` (pruned ones included) with the interpreter.
pub fn score_reference(
    expr: &KExpr,
    t: &TensorView,
    opts: &PruneOptions,
) -> Result<Vec<f32>, KernelError> {
    validate(
        expr,
        &Selection::PerRow { keep_per_row: 0 },
        std::slice::from_ref(t),
        opts,
    )?;
    Ok(scores_of(expr, t, opts))
}

fn scores_of(expr: &KExpr, t: &TensorView, opts: &PruneOptions) -> Vec<f32> {
    let mut out = Vec::with_capacity(t.len());
    let mut cs = vec![0.0f32; t.col_stats.len()];
    let mut rs = vec![0.0f32; t.row_stats.len()];
    for r in 0..t.rows {
        for (k, s) in t.row_stats.iter().enumerate() {
            rs[k] = s[r];
        }
        for c in 0..t.cols {
            let i = r * t.cols + c;
            for (k, s) in t.col_stats.iter().enumerate() {
                cs[k] = s[c];
            }
            let x = ElemInputs {
                weight: t.weights[i],
                grad: t.grad.map_or(0.0, |g| g[i]),
                init: t.init.map_or(0.0, |g| g[i]),
                col_stats: &cs,
                row_stats: &rs,
                scalars: &opts.scalars,
            };
            out.push(canonical_score(expr.eval(&x)));
        }
    }
    out
}

/// Prunes like [`super::prune_jit`], by scoring everything with the interpreter and sorting.
pub fn prune_reference(
    expr: &KExpr,
    sel: &Selection,
    tensors: &mut [TensorView],
    opts: &PruneOptions,
) -> Result<PruneSummary, KernelError> {
    validate(expr, sel, tensors, opts)?;
    if !opts.allow_nonfinite {
        check_finite(tensors)?;
    }
    let alive: Vec<usize> = tensors
        .iter()
        .map(|t| count_alive(t.mask, t.len()))
        .collect();
    let keys: Vec<Vec<u32>> = tensors
        .iter()
        .map(|t| {
            scores_of(expr, t, opts)
                .into_iter()
                .map(score_key)
                .collect()
        })
        .collect();
    // Per tensor: the sorted ranking of its alive elements (key desc, index asc).
    let ranking = |t: usize| -> Vec<usize> {
        let mut v: Vec<usize> = (0..tensors[t].len())
            .filter(|&i| mask_bit(tensors[t].mask, i))
            .collect();
        v.sort_by(|&a, &b| keys[t][b].cmp(&keys[t][a]).then(a.cmp(&b)));
        v
    };
    let mut keep_sets: Vec<Vec<bool>> = tensors.iter().map(|t| vec![false; t.len()]).collect();
    let mut thresholds: Vec<Option<f32>> = vec![None; tensors.len()];
    let top_k = |t: usize, k: usize, sets: &mut Vec<Vec<bool>>, th: &mut Vec<Option<f32>>| {
        let r = ranking(t);
        for &i in &r[..k] {
            sets[t][i] = true;
        }
        th[t] = k.checked_sub(1).map(|last| key_score(keys[t][r[last]]));
    };
    match sel {
        Selection::Global {
            keep,
            min_keep,
            max_keep,
        } => {
            let guards = global_guards(*keep, min_keep, max_keep, tensors, &alive)?;
            let mut all: Vec<(u32, usize, usize)> = Vec::new();
            for (t, tv) in tensors.iter().enumerate() {
                for (i, &k) in keys[t].iter().enumerate() {
                    if mask_bit(tv.mask, i) {
                        all.push((k, t, i));
                    }
                }
            }
            all.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
            let clamp = |t: usize, c: usize| c.clamp(guards[t].0, guards[t].1);
            let mut taken = vec![0usize; tensors.len()];
            let mut total: usize = (0..tensors.len()).map(|t| clamp(t, 0)).sum();
            let mut pos = 0;
            while total < *keep {
                let t = all[pos].1;
                total = total - clamp(t, taken[t]) + clamp(t, taken[t] + 1);
                taken[t] += 1;
                pos += 1;
            }
            for t in 0..tensors.len() {
                top_k(t, clamp(t, taken[t]), &mut keep_sets, &mut thresholds);
                if clamp(t, taken[t]) == taken[t] && taken[t] > 0 {
                    // Unclamped tensors report the global cut, the last element taken.
                    thresholds[t] = Some(key_score(all[pos - 1].0));
                }
            }
        }
        Selection::PerTensor { keep } => {
            for t in 0..tensors.len() {
                if keep[t] > alive[t] {
                    return Err(KernelError::KeepTooLarge {
                        tensor: tensors[t].name.clone(),
                        keep: keep[t],
                        alive: alive[t],
                    });
                }
                top_k(t, keep[t], &mut keep_sets, &mut thresholds);
            }
        }
        Selection::PerRow { keep_per_row } => {
            for (t, tv) in tensors.iter().enumerate() {
                for r in 0..tv.rows {
                    let base = r * tv.cols;
                    keep_top_in(
                        &keys[t],
                        tv.mask,
                        base..base + tv.cols,
                        *keep_per_row,
                        &mut keep_sets[t],
                    );
                }
            }
        }
        Selection::NM { n, m } => {
            for (t, tv) in tensors.iter().enumerate() {
                for g in (0..tv.len()).step_by(*m) {
                    keep_top_in(&keys[t], tv.mask, g..g + m, *n, &mut keep_sets[t]);
                }
            }
        }
        Selection::Block { rows, cols, keep } => {
            for (t, tv) in tensors.iter().enumerate() {
                let scores = scores_of(expr, tv, opts);
                let (nbr, nbc) = (tv.rows / rows, tv.cols / cols);
                let mut blocks: Vec<(u32, usize)> = Vec::with_capacity(nbr * nbc);
                for br in 0..nbr {
                    for bc in 0..nbc {
                        let mut s = 0.0f32;
                        for r in br * rows..(br + 1) * rows {
                            for c in bc * cols..(bc + 1) * cols {
                                let i = r * tv.cols + c;
                                if mask_bit(tv.mask, i) {
                                    s += scores[i];
                                }
                            }
                        }
                        blocks.push((score_key(s), br * nbc + bc));
                    }
                }
                blocks.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
                for &(_, b) in &blocks[..blocks_to_keep(blocks.len(), *keep)] {
                    let (br, bc) = (b / nbc, b % nbc);
                    for r in br * rows..(br + 1) * rows {
                        for c in bc * cols..(bc + 1) * cols {
                            let i = r * tv.cols + c;
                            keep_sets[t][i] = mask_bit(tv.mask, i);
                        }
                    }
                }
            }
        }
    }
    let mut summary = Vec::with_capacity(tensors.len());
    for (t, tv) in tensors.iter_mut().enumerate() {
        let n = tv.len();
        let mut kept = 0;
        for w in tv.mask.iter_mut() {
            *w = 0;
        }
        for (i, &keep) in keep_sets[t].iter().enumerate() {
            if keep {
                tv.mask[i / 64] |= 1 << (i % 64);
                kept += 1;
            } else {
                tv.weights[i] = 0.0;
            }
        }
        summary.push(TensorSummary {
            name: tv.name.clone(),
            total: n,
            alive_before: alive[t],
            kept,
            threshold: thresholds[t],
        });
    }
    Ok(PruneSummary { tensors: summary })
}

/// Marks the top `k` alive elements of `range` (key desc, index asc) in `set`.
fn keep_top_in(
    keys: &[u32],
    mask: &[u64],
    range: std::ops::Range<usize>,
    k: usize,
    set: &mut [bool],
) {
    let mut v: Vec<usize> = range.filter(|&i| mask_bit(mask, i)).collect();
    v.sort_by(|&a, &b| keys[b].cmp(&keys[a]).then(a.cmp(&b)));
    for &i in v.iter().take(k) {
        set[i] = true;
    }
}
