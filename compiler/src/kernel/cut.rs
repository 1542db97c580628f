//! Exact, tie-aware cuts without sorting: range-narrowing radix select over scan passes (the
//! JIT scores blocks, [`simd::count_words`] compares them with the range).
//!
//! A pool is an ordered list of member tensors sharing one ranking (score key descending,
//! then member order, then element index). Its cut is the shortest prefix of that ranking
//! whose clamped per-member counts `sum(clamp(taken_m, min_m, max_m))` reach `keep`. A cut is
//! stored as a key `t` plus, per chunk, how many elements with key exactly `t` to keep (the
//! first ones in index order): applying keeps `key > t`, then ties up to the quota. A cut
//! resolved from candidates also carries each chunk's kept candidates, which with the scan's
//! side bitmap (alive elements above the range) are the chunk's new mask.
//!
//! Each round scans every chunk once with a key range `[lo, hi]`: it counts alive elements
//! above the range, histograms those inside it (2048 buckets) and collects up to `CAP`
//! of them per chunk. The first round's range comes from a deterministic sample. A round
//! either resolves the cut from the collected candidates, moves the range up or down, or
//! narrows it to one histogram bucket; a range of one key with too many elements to collect
//! resolves from per-chunk tie counts.

use rayon::prelude::*;

use super::expr::score_key;
use super::jit::CompiledKernel;
use super::raw::{chunks_of, with_scratch, Chunk, RawTensor, BLOCK};
use super::simd;

/// Candidates collected per chunk and round.
pub const CAP: usize = 4096;
/// Histogram buckets per round.
const BUCKETS: usize = 2048;
/// Sample: one run of `SAMPLE_RUN` elements every `stride` elements, `stride` a power of two
/// between `SAMPLE_STRIDE` and `SAMPLE_STRIDE_MAX` aiming at `SAMPLE_RUNS` runs (so the
/// sample holds at most about 200K keys: selecting in it stays cheap).
const SAMPLE_RUN: usize = 64;
const SAMPLE_STRIDE: usize = 8192;
const SAMPLE_STRIDE_MAX: usize = 32768;
const SAMPLE_RUNS: usize = 3072;

/// One tensor of a pool with its guard `[min, max]` (max already capped at its alive count).
#[derive(Clone, Debug)]
pub struct Member {
    pub tensor: usize,
    pub min: usize,
    pub max: usize,
}

/// Tensors ranked together, keeping `keep` in total.
#[derive(Clone, Debug)]
pub struct Pool {
    pub members: Vec<Member>,
    pub keep: usize,
    /// Estimated fraction of alive elements kept, to seed the first range from a sample.
    pub alive: usize,
}

/// How a resolved cut treats one chunk.
#[derive(Clone, Debug)]
pub struct ChunkCut {
    pub chunk: Chunk,
    /// Alive elements with key equal to the cut kept (the first ones in index order).
    pub quota: u64,
    /// When the cut was resolved from this round's candidates: the local indices of the
    /// candidates kept. Together with the side bitmap of the same scan (alive elements above
    /// the range) they are the chunk's new mask, so applying needs no scoring.
    pub kept: Option<Vec<u32>>,
}

/// A resolved cut.
#[derive(Clone, Debug)]
pub struct Cut {
    /// Keys above `t` are kept; `u32::MAX` keeps nothing beyond quotas (which are then 0).
    pub t: u32,
    /// Per member, its chunks with their tie quotas.
    pub chunks: Vec<Vec<ChunkCut>>,
    /// Per member, how many elements the prefix took (before clamping to the guard).
    pub taken: Vec<usize>,
}

/// What one scan of one chunk found.
struct ChunkScan {
    above: u64,
    in_range: u64,
    nonfinite: u64,
    hist: Vec<u32>,
    cands: Vec<u64>,
}

/// Scans one chunk block by block: the JIT scores a block into a cache-resident buffer, then
/// the buffer is compared with the range in the float domain ([`simd::classify_words`]).
/// Non-finite alive weights are counted only when `check` is set.
fn scan_chunk(
    k: &CompiledKernel,
    raw: &RawTensor,
    c: Chunk,
    lo: u32,
    hi: u32,
    shift: u32,
    check: bool,
) -> ChunkScan {
    // Only a chunk whose candidates overflow keeps a histogram (of all its in-range keys);
    // the others' come from their candidates when needed.
    let mut hist: Vec<u32> = Vec::new();
    let mut cands = Vec::with_capacity(CAP);
    let (mut above, mut in_range, mut nonfinite) = (0u64, 0u64, 0u64);
    with_scratch(|buf| {
        let mut b0 = c.start;
        while b0 < c.end {
            let b1 = (b0 + BLOCK).min(c.end);
            raw.score_into(k.score_raw, b0, b1, buf);
            // SAFETY: nothing writes the tensor during the search.
            let mask = unsafe { raw.mask_words(b0 / 64, b1.div_ceil(64)) };
            let base = b0 - c.start;
            // SAFETY: as above.
            let ahead = unsafe { raw.weights(b1, (b1 + BLOCK).min(c.end)) };
            // SAFETY: this worker owns the chunk's side words.
            let side = unsafe { raw.side_words_mut(b0 / 64, b1.div_ceil(64)) };
            above += simd::count_words(buf, mask, lo, hi, ahead, side, |wi, inr| {
                let n = inr.count_ones() as usize;
                let mut m = inr;
                if cands.len() + n <= CAP && hist.is_empty() {
                    // Common case: the word's candidates all fit.
                    while m != 0 {
                        let j = wi * 64 + m.trailing_zeros() as usize;
                        m &= m - 1;
                        cands.push(((simd::key_of(buf[j]) as u64) << 32) | (base + j) as u64);
                    }
                } else {
                    while m != 0 {
                        let j = wi * 64 + m.trailing_zeros() as usize;
                        m &= m - 1;
                        let key = simd::key_of(buf[j]);
                        if cands.len() < CAP {
                            cands.push(((key as u64) << 32) | (base + j) as u64);
                            continue;
                        }
                        if hist.is_empty() {
                            hist = vec![0u32; BUCKETS];
                            for &c in &cands {
                                hist[(((c >> 32) as u32 - lo) >> shift) as usize] += 1;
                            }
                        }
                        hist[((key - lo) >> shift) as usize] += 1;
                    }
                }
                in_range += n as u64;
            }) as u64;
            if check {
                // SAFETY: as above.
                let w = unsafe { raw.weights(b0, b1) };
                if simd::any_nonfinite(w) {
                    nonfinite += w
                        .iter()
                        .enumerate()
                        .filter(|&(j, x)| (mask[j / 64] >> (j % 64)) & 1 == 1 && !x.is_finite())
                        .count() as u64;
                }
            }
            b0 = b1;
        }
    });
    ChunkScan {
        above,
        in_range,
        nonfinite,
        hist,
        cands,
    }
}

/// Adds a chunk's histogram of in-range keys (bucket `(key - lo) >> shift`) to `into`.
fn add_hist(into: &mut [usize], s: &ChunkScan, lo: u32, shift: u32) {
    if s.hist.is_empty() {
        for &c in &s.cands {
            into[(((c >> 32) as u32 - lo) >> shift) as usize] += 1;
        }
    } else {
        for (h, &x) in into.iter_mut().zip(&s.hist) {
            *h += x as usize;
        }
    }
}

/// The smallest shift that maps keys `lo..=hi` into `BUCKETS` buckets.
fn shift_for(lo: u32, hi: u32) -> u32 {
    let span = (hi - lo) as u64;
    let mut s = 0;
    while (span >> s) >= BUCKETS as u64 {
        s += 1;
    }
    s
}

fn clamp(m: &Member, x: usize) -> usize {
    x.clamp(m.min, m.max)
}

/// A pool's search state.
enum State {
    Search { lo: u32, hi: u32 },
    Done(Cut),
}

/// A scan saw an alive weight that is NaN or infinite.
pub struct NonFiniteIn;

/// Finds the cut of every pool. Pools must not share tensors.
pub fn find_cuts(
    k: &CompiledKernel,
    raws: &[RawTensor],
    pools: &[Pool],
    check_finite: bool,
) -> Result<Vec<Cut>, NonFiniteIn> {
    let pool_chunks: Vec<Vec<(usize, Chunk)>> = pools
        .iter()
        .map(|p| {
            p.members
                .iter()
                .enumerate()
                .flat_map(|(mi, m)| chunks_of(m.tensor, raws[m.tensor].len).map(move |c| (mi, c)))
                .collect()
        })
        .collect();
    let mut states: Vec<State> = pools
        .iter()
        .enumerate()
        .map(|(p, pool)| {
            let base: usize = pool.members.iter().map(|m| clamp(m, 0)).sum();
            if pool.keep <= base {
                State::Done(nothing_taken(pool, &pool_chunks[p]))
            } else {
                let t0 = std::time::Instant::now();
                let (lo, hi) = sample_range(k, raws, pool, &pool_chunks[p]);
                if std::env::var_os("PRUNEC_TRACE_CUT").is_some() {
                    eprintln!("  sample {:.4}s", t0.elapsed().as_secs_f64());
                }
                State::Search { lo, hi }
            }
        })
        .collect();
    if check_finite {
        // Pools settled without a scan still need their weights checked.
        for (p, s) in states.iter().enumerate() {
            if matches!(s, State::Done(_)) {
                for m in &pools[p].members {
                    if has_nonfinite(&raws[m.tensor]) {
                        return Err(NonFiniteIn);
                    }
                }
            }
        }
    }
    let mut first = check_finite;
    loop {
        let work: Vec<(usize, usize, Chunk, u32, u32)> = states
            .iter()
            .enumerate()
            .filter_map(|(p, s)| match s {
                State::Search { lo, hi } => Some((p, *lo, *hi)),
                State::Done(_) => None,
            })
            .flat_map(|(p, lo, hi)| {
                pool_chunks[p]
                    .iter()
                    .map(move |&(mi, c)| (p, mi, c, lo, hi))
            })
            .collect();
        if work.is_empty() {
            break;
        }
        if std::env::var_os("PRUNEC_TRACE_CUT").is_some() {
            for (p, s) in states.iter().enumerate() {
                if let State::Search { lo, hi } = s {
                    eprintln!("pool {p}: scan [{lo:#x}, {hi:#x}]");
                }
            }
        }
        let t0 = std::time::Instant::now();
        let scans: Vec<ChunkScan> = work
            .par_iter()
            .map(|&(_, _, c, lo, hi)| {
                scan_chunk(k, &raws[c.tensor], c, lo, hi, shift_for(lo, hi), first)
            })
            .collect();
        if std::env::var_os("PRUNEC_TRACE_CUT").is_some() {
            let inr: u64 = scans.iter().map(|s| s.in_range).sum();
            eprintln!("  round {:.4}s, in range {inr}", t0.elapsed().as_secs_f64());
        }
        if first {
            if scans.iter().any(|s| s.nonfinite > 0) {
                return Err(NonFiniteIn);
            }
            first = false;
        }
        // Results are in `work` order: pool by pool, chunk by chunk.
        let mut at = 0;
        for (p, pool) in pools.iter().enumerate() {
            let State::Search { lo, hi } = states[p] else {
                continue;
            };
            let n = pool_chunks[p].len();
            let sc = &scans[at..at + n];
            at += n;
            states[p] = step(pool, &pool_chunks[p], sc, lo, hi);
        }
    }
    Ok(states
        .into_iter()
        .map(|s| match s {
            State::Done(c) => c,
            State::Search { .. } => unreachable!("loop ends when every pool is done"),
        })
        .collect())
}

fn has_nonfinite(raw: &RawTensor) -> bool {
    (0..raw.len).any(|i| {
        // SAFETY: nothing writes the tensor during the search.
        let alive = (unsafe { raw.mask_word(i / 64) } >> (i % 64)) & 1 == 1;
        alive && !unsafe { raw.weight(i) }.is_finite()
    })
}

fn nothing_taken(pool: &Pool, chunks: &[(usize, Chunk)]) -> Cut {
    let mut per = vec![Vec::new(); pool.members.len()];
    for &(mi, c) in chunks {
        per[mi].push(ChunkCut {
            chunk: c,
            quota: 0,
            kept: None,
        });
    }
    Cut {
        t: u32::MAX,
        chunks: per,
        taken: vec![0; pool.members.len()],
    }
}

/// A first key range from a deterministic sample, wide enough to hold the cut with high
/// probability (the rounds correct it when it does not).
fn sample_range(
    k: &CompiledKernel,
    raws: &[RawTensor],
    pool: &Pool,
    chunks: &[(usize, Chunk)],
) -> (u32, u32) {
    if pool.alive < 64 * SAMPLE_STRIDE {
        return (0, u32::MAX);
    }
    let stride = (pool.alive / SAMPLE_RUNS)
        .next_power_of_two()
        .clamp(SAMPLE_STRIDE, SAMPLE_STRIDE_MAX);
    let runs: Vec<Chunk> = chunks
        .iter()
        .flat_map(|&(_, c)| {
            (c.start..c.end).step_by(stride).map(move |s| {
                // A fixed pseudo-random offset per block, so runs do not always sample the
                // same columns.
                let h = (s as u64 ^ (c.tensor as u64) << 40).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let s = (s + (h >> 40) as usize % (stride - SAMPLE_RUN)) & !63;
                Chunk {
                    tensor: c.tensor,
                    start: s.min(c.end),
                    end: (s + SAMPLE_RUN).min(c.end),
                }
            })
        })
        .collect();
    let mut keys: Vec<u32> = runs
        .par_chunks(64)
        .flat_map_iter(|group| {
            let mut buf = Vec::with_capacity(SAMPLE_RUN);
            let mut out = Vec::with_capacity(group.len() * SAMPLE_RUN);
            for &c in group {
                let raw = &raws[c.tensor];
                if c.start == c.end {
                    continue;
                }
                raw.score_into(k.score_raw, c.start, c.end, &mut buf);
                // A run starts at a multiple of 64 and holds at most 64 elements: one word.
                // SAFETY: nothing writes the tensor during the search.
                let word = unsafe { raw.mask_word(c.start / 64) };
                out.extend(
                    buf.iter()
                        .enumerate()
                        .filter(|&(j, _)| (word >> j) & 1 == 1)
                        .map(|(_, &x)| score_key(x)),
                );
            }
            out
        })
        .collect();
    if keys.len() < 1024 {
        return (0, u32::MAX);
    }
    let n = keys.len() as f64;
    let q = (pool.keep as f64 / pool.alive as f64).clamp(0.0, 1.0);
    let pos = q * n;
    let margin = 4.0 * (n * q * (1.0 - q)).sqrt() + 0.0002 * n + 16.0;
    let last = keys.len() - 1;
    let top = ((pos - margin).max(0.0) as usize).min(last);
    let bottom = ((pos + margin) as usize).min(last);
    // Keys at two ranks of the descending order, by selection instead of a full sort.
    let desc = |a: &u32, b: &u32| b.cmp(a);
    let lo = if bottom == last {
        0
    } else {
        *keys.select_nth_unstable_by(bottom, desc).1
    };
    // After the first selection, the `bottom` highest keys sit in `keys[..bottom]`.
    let upper = if bottom == last { keys.len() } else { bottom };
    let hi = if top == 0 || top >= upper {
        u32::MAX
    } else {
        *keys[..upper].select_nth_unstable_by(top, desc).1
    };
    (lo, hi)
}

/// One round's decision for a pool.
fn step(pool: &Pool, chunks: &[(usize, Chunk)], sc: &[ChunkScan], lo: u32, hi: u32) -> State {
    let nm = pool.members.len();
    let mut above = vec![0usize; nm];
    let mut inr = vec![0usize; nm];
    for (&(mi, _), s) in chunks.iter().zip(sc) {
        above[mi] += s.above as usize;
        inr[mi] += s.in_range as usize;
    }
    let total = |extra: &dyn Fn(usize) -> usize| -> usize {
        pool.members
            .iter()
            .enumerate()
            .map(|(mi, m)| clamp(m, above[mi] + extra(mi)))
            .sum()
    };
    if total(&|_| 0) >= pool.keep {
        return State::Search {
            lo: hi + 1,
            hi: u32::MAX,
        };
    }
    if total(&|mi| inr[mi]) < pool.keep {
        return State::Search { lo: 0, hi: lo - 1 };
    }
    let complete = sc.iter().all(|s| s.in_range as usize <= CAP);
    if complete {
        return State::Done(resolve_candidates(pool, chunks, sc, &above, lo, hi));
    }
    if lo == hi {
        return State::Done(resolve_ties(pool, chunks, sc, &above, lo));
    }
    // Narrow to the bucket holding the end of the shortest prefix.
    let shift = shift_for(lo, hi);
    let mut hist = vec![vec![0usize; BUCKETS]; nm];
    for (&(mi, _), s) in chunks.iter().zip(sc) {
        add_hist(&mut hist[mi], s, lo, shift);
    }
    let mut cum = vec![0usize; nm];
    for b in (0..BUCKETS).rev() {
        for mi in 0..nm {
            cum[mi] += hist[mi][b];
        }
        if total(&|mi| cum[mi]) >= pool.keep {
            let blo = lo + ((b as u32) << shift);
            let bhi = (blo as u64 + (1u64 << shift) - 1).min(hi as u64) as u32;
            return State::Search { lo: blo, hi: bhi };
        }
    }
    unreachable!("the whole range reaches keep")
}

fn resolve_candidates(
    pool: &Pool,
    chunks: &[(usize, Chunk)],
    sc: &[ChunkScan],
    above: &[usize],
    lo: u32,
    hi: u32,
) -> Cut {
    // The histogram finds the bucket where the prefix reaches `keep`; every candidate in a
    // higher bucket is taken, so only that bucket's candidates need ordering.
    let nm = pool.members.len();
    let shift = shift_for(lo, hi);
    let mut hist = vec![vec![0usize; BUCKETS]; nm];
    for (&(mi, _), s) in chunks.iter().zip(sc) {
        add_hist(&mut hist[mi], s, lo, shift);
    }
    let total_of =
        |t: &[usize]| -> usize { pool.members.iter().zip(t).map(|(m, &x)| clamp(m, x)).sum() };
    let mut taken: Vec<usize> = above.to_vec();
    let mut bucket = 0;
    for b in (0..BUCKETS).rev() {
        let next: Vec<usize> = (0..nm).map(|mi| taken[mi] + hist[mi][b]).collect();
        if total_of(&next) >= pool.keep {
            bucket = b;
            break;
        }
        taken = next;
    }
    let in_bucket = |key: u32| ((key - lo) >> shift) as usize == bucket;
    // (key, chunk position, local index): a stable sort by key keeps the ranking order.
    let mut cands: Vec<(u32, usize)> = Vec::new();
    for (ci, s) in sc.iter().enumerate() {
        cands.extend(
            s.cands
                .iter()
                .map(|&x| ((x >> 32) as u32, ci))
                .filter(|&(key, _)| in_bucket(key)),
        );
    }
    cands.sort_by_key(|c| std::cmp::Reverse(c.0));
    let mut total = total_of(&taken);
    let mut quota = vec![0u64; chunks.len()];
    let mut t = u32::MAX;
    for &(key, ci) in &cands {
        if total >= pool.keep {
            break;
        }
        let mi = chunks[ci].0;
        let m = &pool.members[mi];
        total = total - clamp(m, taken[mi]) + clamp(m, taken[mi] + 1);
        taken[mi] += 1;
        if key != t {
            quota.iter_mut().for_each(|q| *q = 0);
            t = key;
        }
        quota[ci] += 1;
    }
    // The kept candidates of every chunk, in index order: keys above `t`, then ties.
    let kept = sc
        .iter()
        .zip(&quota)
        .map(|(s, &q)| {
            let mut q = q;
            s.cands
                .iter()
                .filter(|&&x| {
                    let key = (x >> 32) as u32;
                    key > t
                        || (key == t && q > 0 && {
                            q -= 1;
                            true
                        })
                })
                .map(|&x| x as u32)
                .collect()
        })
        .collect();
    finish(pool, chunks, t, quota, taken, Some(kept))
}

fn resolve_ties(
    pool: &Pool,
    chunks: &[(usize, Chunk)],
    sc: &[ChunkScan],
    above: &[usize],
    t: u32,
) -> Cut {
    let mut taken: Vec<usize> = above.to_vec();
    let mut total: usize = pool
        .members
        .iter()
        .zip(&taken)
        .map(|(m, &x)| clamp(m, x))
        .sum();
    let mut quota = vec![0u64; chunks.len()];
    for (ci, s) in sc.iter().enumerate() {
        if total >= pool.keep {
            break;
        }
        let mi = chunks[ci].0;
        let m = &pool.members[mi];
        let x0 = taken[mi];
        let e = s.in_range as usize;
        let gain = clamp(m, x0 + e) - clamp(m, x0);
        let need = pool.keep - total;
        let j = if gain < need {
            e
        } else {
            m.min.saturating_sub(x0) + need
        };
        total = total - clamp(m, x0) + clamp(m, x0 + j);
        taken[mi] += j;
        quota[ci] = j as u64;
    }
    finish(pool, chunks, t, quota, taken, None)
}

fn finish(
    pool: &Pool,
    chunks: &[(usize, Chunk)],
    t: u32,
    quota: Vec<u64>,
    taken: Vec<usize>,
    kept: Option<Vec<Vec<u32>>>,
) -> Cut {
    let mut per = vec![Vec::new(); pool.members.len()];
    let mut kept = kept.map(|k| k.into_iter());
    for (&(mi, c), q) in chunks.iter().zip(quota) {
        per[mi].push(ChunkCut {
            chunk: c,
            quota: q,
            kept: kept.as_mut().and_then(|k| k.next()),
        });
    }
    Cut {
        t,
        chunks: per,
        taken,
    }
}
