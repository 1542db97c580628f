//! Row-local selections on the JIT path: per-row top-k (Wanda), N:M and blocks.
//!
//! Work units are whole rows starting at a multiple of 64 elements, so each unit owns its
//! mask words. A unit is scored by the JIT score kernel into a buffer that stays in cache,
//! then selected and masked in plain Rust.

use rayon::prelude::*;

use super::expr::score_key;
use super::jit::CompiledKernel;
use super::raw::{RawTensor, CHUNK};
use super::types::blocks_to_keep;

/// Rows per work unit for a tensor (a multiple of `align_rows` and of the 64-element word).
fn rows_per_unit(rows: usize, cols: usize, align_rows: usize) -> usize {
    if cols == 0 {
        return rows.max(1);
    }
    let word_rows = 64 / gcd(cols, 64);
    let unit = lcm(word_rows, align_rows);
    let want = (CHUNK / cols).max(1);
    (want.div_ceil(unit) * unit).max(unit)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn lcm(a: usize, b: usize) -> usize {
    a / gcd(a, b) * b
}

/// Scores rows `[r0, r1)` into `buf` with the JIT.
fn score_rows(k: &CompiledKernel, raw: &RawTensor, r0: usize, r1: usize, buf: &mut Vec<f32>) {
    let (start, end) = (r0 * raw.cols, r1 * raw.cols);
    buf.clear();
    buf.resize(end - start, 0.0);
    let mut a = raw.args(start, end);
    a.out = buf.as_mut_ptr();
    // SAFETY: the score kernel reads the tensor and writes `end - start` scores into `buf`.
    unsafe { raw.run(k.score, &mut a) };
}

/// Applies per-element keep decisions to rows `[r0, r1)`: `keep(r, c, i)` is asked for alive
/// elements only (row, column, flat index). Returns the kept count.
///
/// # Safety
/// The caller owns rows `[r0, r1)`, which start at a multiple of 64 elements and end at a
/// multiple of 64 or at the tensor's end.
unsafe fn apply_rows(
    raw: &RawTensor,
    r0: usize,
    r1: usize,
    mut keep: impl FnMut(usize, usize, usize) -> bool,
) -> usize {
    let end = r1 * raw.cols;
    let mut kept = 0;
    let mut i = r0 * raw.cols;
    let (mut old, mut word) = (0u64, 0u64);
    for r in r0..r1 {
        for c in 0..raw.cols {
            let b = i & 63;
            if b == 0 {
                // SAFETY: the word lies in the caller's range.
                old = unsafe { raw.mask_word(i >> 6) };
                word = 0;
            }
            if (old >> b) & 1 == 1 && keep(r, c, i) {
                word |= 1 << b;
                kept += 1;
            } else {
                // SAFETY: element `i` lies in the caller's range.
                unsafe { raw.set_weight(i, 0.0) };
            }
            if b == 63 || i + 1 == end {
                // SAFETY: as above.
                unsafe { raw.set_mask_word(i >> 6, word) };
            }
            i += 1;
        }
    }
    kept
}

fn units(rows: usize, per: usize) -> Vec<(usize, usize)> {
    (0..rows.div_ceil(per))
        .map(|u| (u * per, ((u + 1) * per).min(rows)))
        .collect()
}

/// Whether element `i` is alive before this call.
fn alive(raw: &RawTensor, i: usize) -> bool {
    // SAFETY: reading a word of the calling worker's own range.
    (unsafe { raw.mask_word(i / 64) } >> (i % 64)) & 1 == 1
}

/// Every row keeps its top `k` alive elements. Returns the kept count.
pub fn per_row(k: &CompiledKernel, raw: &RawTensor, rows: usize, keep: usize) -> usize {
    let per = rows_per_unit(rows, raw.cols, 1);
    let cols = raw.cols;
    let aligned = cols.is_multiple_of(64);
    units(rows, per)
        .par_iter()
        .map(|&(r0, r1)| {
            let mut buf = Vec::new();
            score_rows(k, raw, r0, r1, &mut buf);
            let base = r0 * cols;
            // Per row: the cut key and how many ties at it to keep.
            let mut cut = Vec::with_capacity(r1 - r0);
            let mut tmp = Vec::with_capacity(cols);
            let mut hist = vec![0u32; 2048];
            for r in r0..r1 {
                let rs = r * cols;
                tmp.clear();
                let row = &buf[rs - base..rs - base + cols];
                let dense = aligned
                    // SAFETY: reading this unit's own mask words.
                    && (rs / 64..(rs + cols) / 64).all(|w| unsafe { raw.mask_word(w) } == u64::MAX);
                if dense {
                    tmp.extend(row.iter().map(|&s| score_key(s)));
                } else {
                    tmp.extend(
                        (0..cols)
                            .filter(|&c| alive(raw, rs + c))
                            .map(|c| score_key(row[c])),
                    );
                }
                cut.push(row_cut(&mut tmp, keep, &mut hist));
            }
            if aligned {
                // Rows own whole mask words: the JIT apply kernel masks each row.
                let mut kept = 0;
                for (r, &(t, ties)) in (r0..r1).zip(&cut) {
                    let mut a = raw.args(r * cols, (r + 1) * cols);
                    a.t = t;
                    a.quota = ties as u64;
                    // SAFETY: this worker owns the row, which starts at a multiple of 64.
                    unsafe { raw.run(k.apply, &mut a) };
                    kept += (r * cols / 64..(r + 1) * cols / 64)
                        // SAFETY: as above.
                        .map(|w| unsafe { raw.mask_word(w) }.count_ones() as usize)
                        .sum::<usize>();
                }
                return kept;
            }
            let mut row = usize::MAX;
            let (mut t, mut quota) = (0, 0);
            // SAFETY: units are whole rows starting at multiples of 64 elements.
            unsafe {
                apply_rows(raw, r0, r1, |r, _, i| {
                    if r != row {
                        row = r;
                        (t, quota) = cut[r - r0];
                    }
                    let key = score_key(buf[i - base]);
                    if key > t {
                        true
                    } else if key == t && quota > 0 {
                        quota -= 1;
                        true
                    } else {
                        false
                    }
                })
            }
        })
        .sum()
}

/// The cut `(t, ties)` keeping the top `k` of `keys`: keep keys above `t` and the first
/// `ties` equal to it. `t = u32::MAX` keeps nothing above; `k >= len` keeps everything.
/// A radix pass over the row's key range finds the bucket, then only that bucket is selected.
fn row_cut(keys: &mut Vec<u32>, k: usize, hist: &mut [u32]) -> (u32, usize) {
    if k == 0 {
        return (u32::MAX, 0);
    }
    if k >= keys.len() {
        return (0, keys.len());
    }
    if keys.len() > 256 {
        // Buckets span the row's own key range, so they spread the keys well.
        let (lo, hi) = keys
            .iter()
            .fold((u32::MAX, 0u32), |(a, b), &x| (a.min(x), b.max(x)));
        let mut shift = 0;
        while ((hi - lo) >> shift) as usize >= hist.len() {
            shift += 1;
        }
        hist.iter_mut().for_each(|h| *h = 0);
        for &x in keys.iter() {
            hist[((x - lo) >> shift) as usize] += 1;
        }
        let mut above = 0usize;
        let mut b = hist.len();
        while b > 0 {
            b -= 1;
            if above + hist[b] as usize >= k {
                break;
            }
            above += hist[b] as usize;
        }
        keys.retain(|&x| ((x - lo) >> shift) as usize == b);
        return select_cut(keys, k - above);
    }
    select_cut(keys, k)
}

/// `row_cut` by selection, for `0 < k <= keys.len()`.
fn select_cut(keys: &mut [u32], k: usize) -> (u32, usize) {
    let (_, &mut t, _) = keys.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
    let greater = keys.iter().filter(|&&x| x > t).count();
    (t, k - greater)
}

/// N:M: in each group of `m` along a row, keep the top `n` alive. Returns the kept count.
pub fn n_m(k: &CompiledKernel, raw: &RawTensor, rows: usize, n: usize, m: usize) -> usize {
    let per = rows_per_unit(rows, raw.cols, 1);
    units(rows, per)
        .par_iter()
        .map(|&(r0, r1)| {
            let mut buf = Vec::new();
            score_rows(k, raw, r0, r1, &mut buf);
            let base = r0 * raw.cols;
            let mut keepv = vec![false; buf.len()];
            let mut grp: Vec<(u32, usize)> = Vec::with_capacity(m);
            for g in (0..buf.len()).step_by(m.max(1)) {
                grp.clear();
                grp.extend(
                    (g..g + m)
                        .filter(|&j| alive(raw, base + j))
                        .map(|j| (score_key(buf[j]), j)),
                );
                grp.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
                for &(_, j) in grp.iter().take(n) {
                    keepv[j] = true;
                }
            }
            // SAFETY: units are whole rows starting at multiples of 64 elements.
            unsafe { apply_rows(raw, r0, r1, |_, _, i| keepv[i - base]) }
        })
        .sum()
}

/// Blocks of `br x bc` scored by the sum of alive element scores; the tensor keeps
/// `round(keep * blocks)` of them. Returns the kept count.
pub fn blocks(
    k: &CompiledKernel,
    raw: &RawTensor,
    rows: usize,
    br: usize,
    bc: usize,
    keep: f64,
) -> usize {
    let cols = raw.cols;
    let nbc = cols / bc;
    let per = rows_per_unit(rows, cols, br);
    let us = units(rows, per);
    // Pass 1: block sums, unit by unit, in a fixed order.
    let sums: Vec<Vec<u32>> = us
        .par_iter()
        .map(|&(r0, r1)| {
            let mut buf = Vec::new();
            score_rows(k, raw, r0, r1, &mut buf);
            let base = r0 * cols;
            let mut out = Vec::with_capacity((r1 - r0) / br * nbc);
            for band in (r0..r1).step_by(br) {
                for b in 0..nbc {
                    let mut s = 0.0f32;
                    for r in band..band + br {
                        for c in b * bc..(b + 1) * bc {
                            let i = r * cols + c;
                            if alive(raw, i) {
                                s += buf[i - base];
                            }
                        }
                    }
                    out.push(score_key(s));
                }
            }
            out
        })
        .collect();
    let keys: Vec<u32> = sums.into_iter().flatten().collect();
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_unstable_by(|&a, &b| keys[b].cmp(&keys[a]).then(a.cmp(&b)));
    let mut kept_block = vec![false; keys.len()];
    for &b in &order[..blocks_to_keep(keys.len(), keep)] {
        kept_block[b] = true;
    }
    // Pass 2: mask.
    let col_block: Vec<usize> = (0..cols).map(|c| c / bc).collect();
    us.par_iter()
        .map(|&(r0, r1)| {
            // SAFETY: units are whole rows starting at multiples of 64 elements.
            unsafe {
                apply_rows(raw, r0, r1, |r, c, _| {
                    kept_block[(r / br) * nbc + col_block[c]]
                })
            }
        })
        .sum()
}
