//! Row-local selections on the JIT path: per-row top-k (Wanda), N:M and blocks.
//!
//! Work units are whole rows starting at a multiple of 64 elements, so each unit owns its
//! mask words. Per-row selection on rows of whole mask words runs in two passes (select into
//! side bitmaps while reading, then apply); the other cases score a unit with the JIT into a
//! buffer that stays in cache, then select and mask in plain Rust.

use rayon::prelude::*;

use super::cut::NonFiniteIn;
use super::expr::score_key;
use super::jit::CompiledKernel;
use super::raw::{chunks_of, with_scratch, Chunk, RawTensor, CHUNK};
use super::simd;
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
                tmp.extend(
                    (0..cols)
                        .filter(|&c| alive(raw, rs + c))
                        .map(|c| score_key(row[c])),
                );
                cut.push(row_cut(&mut tmp, keep, &mut hist));
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

/// Whether [`per_row_select`] handles a tensor with `cols` columns (rows own whole words).
pub fn per_row_aligned(cols: usize) -> bool {
    cols > 0 && cols.is_multiple_of(64)
}

/// Per-row selection for tensors whose rows are a multiple of 64 long (`which`, with their
/// row counts). Without `apply` each row's new mask goes to the side bitmap (see
/// [`RawTensor::set_side`]) and this is the first of two passes: it only reads the tensors,
/// an alive non-finite weight (with `check`) stops it with [`NonFiniteIn`] before anything
/// was written, and [`apply_sides`] is the second pass. With `apply` every row is masked
/// while it is still in cache (one pass; a non-finite weight then stops it with earlier rows
/// already masked, though never the row holding it). Returns the kept count per entry of
/// `which` (zeros without `apply`). Units of all the tensors run in one parallel loop.
pub fn per_row_select(
    k: &CompiledKernel,
    raws: &[RawTensor],
    which: &[(usize, usize)],
    keep: usize,
    check: bool,
    apply: bool,
) -> Result<Vec<usize>, NonFiniteIn> {
    // Every unit of a tensor starts from the bracket of the tensor's first row (the tensors'
    // first rows in parallel).
    let seeds: Vec<Option<(u32, u32)>> = which
        .par_iter()
        .map(|&(t, rows)| {
            let raw = &raws[t];
            let cols = raw.cols;
            assert!(per_row_aligned(cols));
            if rows == 0 || keep == 0 {
                return None;
            }
            with_scratch(|buf| {
                raw.score_into(k.score_raw, 0, cols, buf);
                // SAFETY: nothing writes the tensor during this pass.
                let mask = unsafe { raw.mask_words(0, cols / 64) };
                let keys = alive_keys(buf, mask);
                let mut hist = vec![0u32; 2048];
                (keep < keys.len())
                    .then(|| bracket_of(&keys, keep, row_margin(keep, cols), &mut hist))
            })
        })
        .collect();
    let mut jobs = Vec::new();
    for (n, &(t, rows)) in which.iter().enumerate() {
        for u in units(rows, rows_per_unit(rows, raws[t].cols, 1)) {
            jobs.push((n, u, seeds[n]));
        }
    }
    let counts = jobs
        .par_iter()
        .map(|&(n, (r0, r1), seed)| {
            let raw = &raws[which[n].0];
            per_row_unit(k, raw, r0, r1, keep, seed, check, apply).map(|c| (n, c))
        })
        .collect::<Result<Vec<(usize, usize)>, _>>()?;
    let mut kept = vec![0; which.len()];
    for (n, c) in counts {
        kept[n] += c;
    }
    Ok(kept)
}

/// Second pass: each side bitmap becomes its tensor's mask, and weights whose bit is clear
/// are zeroed. Returns the kept count of each tensor of `which`, in order.
pub fn apply_sides(raws: &[RawTensor], which: &[usize]) -> Vec<usize> {
    let jobs: Vec<(usize, Chunk)> = which
        .iter()
        .enumerate()
        .flat_map(|(n, &t)| chunks_of(t, raws[t].len).map(move |c| (n, c)))
        .collect();
    let counts: Vec<(usize, usize)> = jobs
        .par_iter()
        .map(|&(n, c)| {
            let raw = &raws[c.tensor];
            let (w0, w1) = (c.start / 64, c.end.div_ceil(64));
            // SAFETY: chunks are disjoint and start at multiples of 64: this worker owns the
            // chunk's weights, mask words and side words.
            let (w, m, side) = unsafe {
                (
                    raw.weights_mut(c.start, c.end),
                    raw.mask_words_mut(w0, w1),
                    raw.side_words_mut(w0, w1),
                )
            };
            (n, simd::zero_words(w, side, m))
        })
        .collect();
    let mut kept = vec![0; which.len()];
    for (n, x) in counts {
        kept[n] += x;
    }
    kept
}

/// Per-row selection of rows `[r0, r1)` whose length is a multiple of 64 (each row owns its
/// mask words), one row at a time in cache: the JIT scores the row, a key bracket
/// `[lo, hi]` learnt from the previous row splits it into kept-for-sure (above), candidates
/// (inside, collected and selected) and pruned (below); the row's keep bits go to the side
/// bitmap. A row whose cut falls outside the bracket takes the exact radix path on all its
/// keys and sets the bracket for the next row. With `apply` the row is then masked (its
/// side words become its mask words, other weights are zeroed) while it is in cache, and the
/// kept count is returned. With the AVX-512 row scan and a bracket with a low end, the scan
/// itself hands over the candidates' scores, packed, and their bits; the cut among them
/// comes from [`simd::top_scores`] and their kept bits go into the row's words by
/// [`simd::merge_kept`] (with `apply`, [`simd::zero_merged`] while masking), with no loop over
/// single bits or candidates' positions. Each next bracket is centred on the rows' smoothed
/// cut ([`smoothed_cut`]).
#[allow(clippy::too_many_arguments)]
fn per_row_unit(
    k: &CompiledKernel,
    raw: &RawTensor,
    r0: usize,
    r1: usize,
    keep: usize,
    seed: Option<(u32, u32)>,
    check: bool,
    apply: bool,
) -> Result<usize, NonFiniteIn> {
    let mut kept = 0usize;
    let cols = raw.cols;
    let mut row_side = if apply {
        vec![0u64; cols / 64]
    } else {
        Vec::new()
    };
    let margin = row_margin(keep, cols);
    let cap = 4 * margin + 64;
    let mut bracket = seed;
    // The rows' cut keys so far, smoothed: the next row's bracket is centred on it.
    let mut center: Option<u32> = None;
    // The row's candidates, `key << 32 | index`, in the first `inr` entries. A slice written
    // by index, not a `Vec` pushed to: pushes reload and store the length through memory,
    // chaining the candidates one after another.
    let mut cands = vec![0u64; cap];
    let mut tie_pos: Vec<usize> = Vec::new();
    let mut tmp: Vec<u32> = Vec::with_capacity(cols);
    let mut hist = vec![0u32; 2048];
    let mut ties_at: Vec<(usize, u64)> = Vec::new();
    // The AVX-512 read-only scan scores a row, compares it with the bracket and checks it in
    // one loop; the row's words of alive elements inside the bracket, and above it.
    let wide = k.wide_for(cols);
    let nwords = if wide.is_some() { cols / 64 } else { 0 };
    let (mut inside, mut above_words) = (vec![0u64; nwords], vec![0u64; nwords]);
    // With a bracket that has a low end, the AVX-512 row scan collects the candidates itself:
    // their scores in order, and which of them are kept.
    let (mut cscores, mut ckept) = (Vec::new(), Vec::new());
    with_scratch(|buf| {
        for r in r0..r1 {
            let (s0, s1) = (r * cols, (r + 1) * cols);
            // SAFETY: this worker owns the row's words; the mask is only read until the row
            // is masked, after the last use of this view.
            let mask = unsafe { raw.mask_words(s0 / 64, s1 / 64) };
            let alive = simd::popcount(mask);
            // With the AVX-512 scan: its counts, and whether the bracket has a low end.
            let mut counted = None;
            // Whether the row scan collected the candidates (and left no scores in `buf`).
            let mut collected = false;
            if let Some(wk) = &wide {
                let (lo, gt) = match bracket {
                    Some((lo, hi)) => (simd::ge_bound(lo), simd::gt_bound(hi)),
                    None => (None, f32::NAN),
                };
                let lo_f = lo.unwrap_or(f32::NEG_INFINITY);
                let row_scan = lo.map(|_| {
                    raw.scan_wide_collect(
                        wk,
                        alive == cols,
                        s0,
                        s1,
                        lo_f,
                        gt,
                        &mut cscores,
                        &mut inside,
                        &mut above_words,
                    )
                });
                collected = row_scan.is_some();
                let st = match row_scan {
                    Some(st) => st,
                    None => {
                        raw.scan_wide_read(wk, s0, s1, lo_f, gt, buf, &mut inside, &mut above_words)
                    }
                };
                if check && st.bad {
                    return Err(NonFiniteIn);
                }
                counted = Some((st.above as usize, lo.is_some()));
            } else if check {
                // SAFETY: nothing writes the tensor during this pass.
                let w = unsafe { raw.weights(s0, s1) };
                if simd::any_nonfinite(w) {
                    // SAFETY: as above.
                    let mask = unsafe { raw.mask_words(s0 / 64, s1 / 64) };
                    let bad = w
                        .iter()
                        .enumerate()
                        .any(|(j, x)| (mask[j / 64] >> (j % 64)) & 1 == 1 && !x.is_finite());
                    if bad {
                        return Err(NonFiniteIn);
                    }
                }
            }
            if counted.is_none() {
                raw.score_into(k.score_raw, s0, s1, buf);
            }
            // The next row of the unit, prefetched while this one is selected and masked.
            // SAFETY: this worker owns the unit's rows; the next row is only read here.
            let ahead = unsafe { raw.weights(s1, if r + 1 < r1 { s1 + cols } else { s1 }) };
            // The row's new mask: a row buffer when it is applied at once, else the side
            // bitmap for the second pass. Every word is written before it is read.
            let side: &mut [u64] = if apply {
                &mut row_side
            } else {
                // SAFETY: this worker owns the row's side words.
                unsafe { raw.side_words_mut(s0 / 64, s1 / 64) }
            };
            // Fast path: the bracket splits the row; the side words get the alive elements
            // above it, then the kept candidates. When the row is masked at once, the
            // collected path leaves that to the masking, which merges them as it goes.
            let mut merge_when_masking = false;
            let fast = if keep == 0 || keep >= alive {
                None
            } else if collected {
                bracket.and_then(|(lo, hi)| {
                    let above = counted.map_or(0, |(above, _)| above);
                    let inr = cscores.len();
                    if above >= keep || above + inr < keep {
                        return None;
                    }
                    let t = simd::top_scores(&cscores, keep - above, &mut ckept);
                    if apply {
                        merge_when_masking = true;
                    } else {
                        simd::merge_kept(side, &above_words, &inside, &ckept);
                    }
                    let c = smoothed_cut(&mut center, t);
                    bracket = Some(next_bracket(c, lo, hi, margin, inr));
                    Some(())
                })
            } else {
                bracket.and_then(|(lo, hi)| {
                    let mut inr = 0usize;
                    let mut collect = |wi: usize, bits: u64| {
                        let mut m = bits;
                        let n = m.count_ones() as usize;
                        if inr + n <= cap {
                            let out = &mut cands[inr..inr + n];
                            for c in out.iter_mut() {
                                let j = wi * 64 + m.trailing_zeros() as usize;
                                *c = ((simd::key_of(buf[j]) as u64) << 32) | j as u64;
                                m &= m - 1;
                            }
                        }
                        inr += n;
                    };
                    let above = match counted {
                        Some((above, has_lo)) => {
                            side.copy_from_slice(&above_words);
                            for (wi, (&a, &o)) in mask.iter().zip(&above_words).enumerate() {
                                // Without a low end every alive key not above is inside.
                                let bits = if has_lo { inside[wi] } else { a & !o };
                                if bits != 0 {
                                    collect(wi, bits);
                                }
                            }
                            above
                        }
                        None => simd::count_words(buf, mask, lo, hi, ahead, side, &mut collect),
                    };
                    if above >= keep || above + inr < keep || inr > cap {
                        return None;
                    }
                    let rank = keep - above - 1;
                    let cands = &mut cands[..inr];
                    let (gt, &mut tc, _) = cands.select_nth_unstable_by(rank, |a, b| b.cmp(a));
                    let t = (tc >> 32) as u32;
                    let greater = gt.iter().filter(|&&x| (x >> 32) as u32 > t).count();
                    let mut ties = rank + 1 - greater;
                    // Candidates above `t` are kept, and the first `ties` equal to it.
                    tie_pos.clear();
                    for &c in cands.iter() {
                        let (key, j) = ((c >> 32) as u32, c as u32 as usize);
                        if key > t {
                            side[j / 64] |= 1u64 << (j % 64);
                        } else if key == t {
                            tie_pos.push(j);
                        }
                    }
                    tie_pos.sort_unstable();
                    for &j in &tie_pos {
                        if ties == 0 {
                            break;
                        }
                        side[j / 64] |= 1u64 << (j % 64);
                        ties -= 1;
                    }
                    let c = smoothed_cut(&mut center, t);
                    bracket = Some(next_bracket(c, lo, hi, margin, inr));
                    Some(())
                })
            };
            if fast.is_none() {
                if collected {
                    // The row scan left no scores: the row is in cache, score it again.
                    raw.score_into(k.score_raw, s0, s1, buf);
                }
                let (t, ties) = if keep == 0 {
                    (u32::MAX, 0)
                } else if keep >= alive {
                    (0, alive)
                } else {
                    tmp.clear();
                    tmp.extend(alive_keys(buf, mask));
                    bracket = Some(bracket_of(&tmp, keep, margin, &mut hist));
                    center = None;
                    row_cut(&mut tmp, keep, &mut hist)
                };
                // Keep bits: alive keys above `t`, then the first `ties` alive keys equal to it.
                ties_at.clear();
                simd::count_words(buf, mask, t, t, ahead, side, |wi, bits| {
                    ties_at.push((wi, bits))
                });
                let mut q = ties;
                for &(wi, bits) in &ties_at {
                    let mut b = bits;
                    while q > 0 && b != 0 {
                        side[wi] |= b & b.wrapping_neg();
                        b &= b - 1;
                        q -= 1;
                    }
                }
            }
            if apply {
                // SAFETY: this worker owns the row; the shared views above are not used again.
                let (w, m) = unsafe {
                    (
                        raw.weights_mut(s0, s1),
                        raw.mask_words_mut(s0 / 64, s1 / 64),
                    )
                };
                kept += if merge_when_masking {
                    simd::zero_merged(w, m, &above_words, &inside, &ckept)
                } else {
                    simd::zero_words(w, &row_side, m)
                };
            }
        }
        Ok(kept)
    })
}

/// How many rows the smoothed cut key averages over, about: each row's cut moves it a
/// quarter of the way.
const SMOOTH: u64 = 4;

/// Moves `center` towards this row's cut key `t` (to `t` when there is none yet) and returns
/// it. A row's cut is the population's cut plus the row's own deviation; centring the next
/// row's bracket on the last row's cut adds that deviation to the next row's, so brackets
/// miss more often, and a miss costs an exact selection over the row; centring on the
/// smoothed cut misses far fewer (`docs/benchmarks/kernels.md`).
fn smoothed_cut(center: &mut Option<u32>, t: u32) -> u32 {
    let c = match *center {
        Some(c) => ((c as u64 * (SMOOTH - 1) + t as u64) / SMOOTH) as u32,
        None => t,
    };
    *center = Some(c);
    c
}

/// The next row's bracket: `margin` ranks either side of the key `t` (the smoothed cut), at
/// the keys-per-rank density this row's bracket `[lo, hi]` showed (`inr` keys inside it).
fn next_bracket(t: u32, lo: u32, hi: u32, margin: usize, inr: usize) -> (u32, u32) {
    let span = (hi - lo) as u64 * margin as u64 / inr as u64 + 1;
    let nhi = (t as u64 + span).min(u32::MAX as u64) as u32;
    let nlo = (t as u64).saturating_sub(span) as u32;
    (nlo, nhi)
}

/// Ranks `keep - margin` and `keep + margin` bound the next row's cut: about 4 standard
/// deviations of the count above a fixed score from row to row (a miss costs an exact
/// selection over the whole row).
fn row_margin(keep: usize, cols: usize) -> usize {
    let var = (keep as f64) * (cols.saturating_sub(keep) as f64) / cols.max(1) as f64;
    (4.0 * var.sqrt()).ceil() as usize + 8
}

/// The keys of the alive elements of a row (`s` its scores, `mask` its words), in order.
fn alive_keys(s: &[f32], mask: &[u64]) -> Vec<u32> {
    let mut out = Vec::with_capacity(s.len());
    for (wi, &a) in mask.iter().enumerate() {
        let mut m = a;
        while m != 0 {
            out.push(score_key(s[wi * 64 + m.trailing_zeros() as usize]));
            m &= m - 1;
        }
    }
    out
}

/// The keys at ranks `keep - margin` and `keep + margin` (1-based, descending; the ends when
/// out of range) of `keys`, for `0 < keep < keys.len()`: a bracket for a similar row's cut.
/// One histogram over the keys' own range (`hist`'s buckets) finds the bucket of each rank,
/// and a selection among that bucket's few keys the key, instead of two `select_nth_unstable`
/// over all of them. It runs for every tensor's first row and every row that misses its
/// bracket.
fn bracket_of(keys: &[u32], keep: usize, margin: usize, hist: &mut [u32]) -> (u32, u32) {
    let n = keys.len();
    debug_assert!(keep > 0 && keep < n);
    let (lo, shift) = key_hist(keys, hist);
    // The key of descending rank `r` (1-based): the bucket holding it, then its place among
    // that bucket's keys.
    let at_rank = |r: usize| -> u32 {
        let (b, above) = bucket_of_rank(hist, r);
        let mut few: Vec<u32> = keys
            .iter()
            .copied()
            .filter(|&x| ((x - lo) >> shift) as usize == b)
            .collect();
        *few.select_nth_unstable_by(r - above - 1, |a, b| b.cmp(a)).1
    };
    let top = if keep > margin {
        at_rank(keep - margin)
    } else {
        u32::MAX
    };
    let bottom = if keep + margin <= n {
        at_rank(keep + margin)
    } else {
        0
    };
    (bottom, top)
}

/// A histogram of `keys` in `hist`'s buckets, which span the keys' own range (so they spread
/// a row's keys well): returns `(lo, shift)`, key `x` falling in bucket `(x - lo) >> shift`.
fn key_hist(keys: &[u32], hist: &mut [u32]) -> (u32, u32) {
    let (lo, hi) = keys
        .iter()
        .fold((u32::MAX, 0u32), |(a, b), &x| (a.min(x), b.max(x)));
    let mut shift = 0;
    while ((hi - lo) >> shift) as usize >= hist.len() {
        shift += 1;
    }
    hist.iter_mut().for_each(|h| *h = 0);
    for &x in keys {
        hist[((x - lo) >> shift) as usize] += 1;
    }
    (lo, shift)
}

/// The bucket of `hist` holding the key of descending rank `r` (1-based, at most the keys'
/// count) and how many keys the buckets above it hold.
fn bucket_of_rank(hist: &[u32], r: usize) -> (usize, usize) {
    let (mut above, mut b) = (0usize, hist.len());
    while b > 0 {
        b -= 1;
        if above + hist[b] as usize >= r {
            break;
        }
        above += hist[b] as usize;
    }
    (b, above)
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
        let (lo, shift) = key_hist(keys, hist);
        let (b, above) = bucket_of_rank(hist, k);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `bracket_of` against sorting: keys spread widely, narrowly and with many ties, the
    /// ranks inside the row and past either end.
    #[test]
    fn brackets_match_sorting() {
        let mut next = crate::testing::xorshift32(0x1234_5678);
        let mut hist = vec![0u32; 2048];
        for case in 0..400 {
            let n = 2 + next() as usize % 5000;
            let spread = [1u32, 7, 3000, 1 << 24, u32::MAX][case % 5];
            let base = next() / 2;
            let keys: Vec<u32> = (0..n)
                .map(|_| base.saturating_add(next() % spread))
                .collect();
            let keep = 1 + next() as usize % (n - 1);
            let mut sorted = keys.clone();
            sorted.sort_unstable_by(|a, b| b.cmp(a));
            // A random margin, and those at either end's edge.
            let random = next() as usize % (n / 2 + 2);
            for margin in [random, 0, keep - 1, keep, n - keep, n - keep + 1] {
                let top = if keep > margin {
                    sorted[keep - margin - 1]
                } else {
                    u32::MAX
                };
                let bottom = if keep + margin <= n {
                    sorted[keep + margin - 1]
                } else {
                    0
                };
                assert_eq!(
                    bracket_of(&keys, keep, margin, &mut hist),
                    (bottom, top),
                    "case {case} margin {margin}"
                );
            }
        }
    }

    #[test]
    fn the_smoothed_cut_starts_at_the_first_and_moves_a_quarter_of_the_way() {
        let mut c = None;
        assert_eq!(smoothed_cut(&mut c, 1000), 1000);
        assert_eq!(smoothed_cut(&mut c, 2000), 1250);
        assert_eq!(smoothed_cut(&mut c, 1250), 1250);
        assert_eq!(smoothed_cut(&mut c, u32::MAX), 1250 + (u32::MAX - 1250) / 4);
        assert_eq!(c, Some(1250 + (u32::MAX - 1250) / 4));
    }
}
