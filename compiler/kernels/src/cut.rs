//! Exact, tie-aware cuts without sorting: range-narrowing radix select over scan passes (the
//! JIT scores blocks, [`simd::count_words`] compares them with the range).
//!
//! A pool is an ordered list of member tensors sharing one ranking (score key descending,
//! then member order, then element index). Its cut is the shortest prefix of that ranking
//! whose clamped per-member counts `sum(clamp(taken_m, min_m, max_m))` reach `keep`. A cut is
//! stored as a key `t` plus, per chunk, how many elements with key exactly `t` to keep (the
//! first ones in index order): applying keeps `key > t`, then ties up to the quota. A cut
//! resolved from candidates also carries each chunk's candidates, whose kept ones with the
//! scan's side bitmap (alive elements above the range) are the chunk's new mask.
//!
//! Each round scans every chunk once with a key range `[lo, hi]`: it counts alive elements
//! above the range, histograms those inside it (2048 buckets) and collects up to `CAP`
//! of them per chunk. The first round's range comes from a deterministic sample. A round
//! either resolves the cut from the collected candidates, moves the range up or down, or
//! narrows it to one histogram bucket; a range of one key with too many elements to collect
//! resolves from per-chunk tie counts. With single-pass pools the first round also writes
//! (see [`find_cuts`]).

use rayon::prelude::*;

use super::expr::score_key;
use super::jit::CompiledKernel;
use super::raw::{chunks_of, with_scratch, Chunk, RawTensor, ScanBits, ScanRange, BLOCK, CHUNK};
use super::simd;

/// Candidates collected per chunk and round.
pub const CAP: usize = 4096;
/// Histogram buckets per round.
const BUCKETS: usize = 2048;
/// Sample: one run of `SAMPLE_RUN` elements every `stride` elements, `stride` a power of two
/// between `SAMPLE_STRIDE` and `SAMPLE_STRIDE_MAX` aiming at `SAMPLE_RUNS` runs (so the
/// sample holds at most about 200K keys: selecting in it stays cheap), in pools of at least
/// `SAMPLE_MIN` alive elements. A run is a KiB of weights: runs far apart each cost a trip
/// to memory and a page walk, which shorter runs spread over fewer keys
/// (`docs/benchmarks/kernels.md`).
const SAMPLE_RUN: usize = 256;
const SAMPLE_STRIDE: usize = 4096;
const SAMPLE_STRIDE_MAX: usize = 131072;
const SAMPLE_RUNS: usize = 768;
const SAMPLE_MIN: usize = 65536;
/// The first key range reaches this many standard deviations of the sampled rank above the
/// estimated cut, and `SPECULATE_BELOW` (single-pass pools) or `ABOVE_SIGMAS` below it.
const ABOVE_SIGMAS: f64 = 3.5;
const SPECULATE_BELOW: f64 = 4.5;

/// Scans with the score kernel and the vectorised classification instead of the fused scan
/// kernel (for comparisons: `scan_bound` times both).
static BLOCKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether scans go block by block: [`force_blocked_scan`], or `PRUNEC_KERNEL_BLOCKED=1`.
fn blocked_scan() -> bool {
    static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    BLOCKED.load(std::sync::atomic::Ordering::Relaxed)
        || *ENV.get_or_init(|| std::env::var_os("PRUNEC_KERNEL_BLOCKED").is_some())
}

/// Makes global and per-tensor cuts scan block by block (score kernel, then vectorised
/// classification) instead of with the fused scan kernel (`true`), or go back (`false`).
/// The results are identical; `examples/scan_bound.rs` compares the speed.
pub fn force_blocked_scan(on: bool) {
    BLOCKED.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Candidate buffers (`CAP` entries) kept between calls, at most this many: a fresh buffer
/// costs a page fault on each page it fills, and at 100M weights those faults took longer
/// than resolving the cut from the candidates.
const POOLED: usize = 512;
static CAND_POOL: std::sync::Mutex<Vec<Vec<u64>>> = std::sync::Mutex::new(Vec::new());

/// A chunk's candidates, `key << 32 | local index`; the buffer goes back to a pool when
/// dropped.
#[derive(Clone, Debug, Default)]
pub struct CandBuf(Vec<u64>);

impl CandBuf {
    fn take() -> Self {
        let v = CAND_POOL.lock().ok().and_then(|mut p| p.pop());
        CandBuf(v.unwrap_or_else(|| Vec::with_capacity(CAP)))
    }
}

impl Drop for CandBuf {
    fn drop(&mut self) {
        if self.0.capacity() == CAP {
            let mut v = std::mem::take(&mut self.0);
            v.clear();
            if let Ok(mut p) = CAND_POOL.lock() {
                if p.len() < POOLED {
                    p.push(v);
                }
            }
        }
    }
}

impl std::ops::Deref for CandBuf {
    type Target = Vec<u64>;
    fn deref(&self) -> &Vec<u64> {
        &self.0
    }
}

impl std::ops::DerefMut for CandBuf {
    fn deref_mut(&mut self) -> &mut Vec<u64> {
        &mut self.0
    }
}

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
    /// Whether the first scan may zero the alive elements below the sampled range (single
    /// pass, see [`find_cuts`]). Only for pools whose guards cannot bind, since a guarded
    /// member may have to keep elements far below the pool's cut.
    pub speculate: bool,
}

/// How a resolved cut treats one chunk.
#[derive(Clone, Debug)]
pub struct ChunkCut {
    pub chunk: Chunk,
    /// Alive elements with key equal to the cut kept (the first ones in index order).
    pub quota: u64,
    /// When the cut was resolved from this round's candidates: all of them, as
    /// `key << 32 | local index` in index order. Those with key above the cut, then the first
    /// `quota` equal to it, are kept ([`ChunkCut::each_candidate`]); with the side bitmap of
    /// the same scan (alive elements above the range) they are the chunk's new mask, so
    /// applying needs no scoring.
    pub cands: Option<CandBuf>,
    /// `Some(above)` when the cut was resolved in a speculative first scan, which already
    /// zeroed the alive elements below the range and left the mask holding those in and
    /// above it (`above` of them above): applying only zeroes the candidates not kept and
    /// clears their mask bits.
    pub fixup: Option<u64>,
}

impl ChunkCut {
    /// Calls `f(local index, kept)` for every candidate, in index order, under cut `t`.
    pub fn each_candidate(&self, t: u32, mut f: impl FnMut(usize, bool)) {
        let mut q = self.quota;
        for &x in self.cands.iter().flat_map(|c| c.iter()) {
            let key = (x >> 32) as u32;
            let keep = key > t
                || (key == t && q > 0 && {
                    q -= 1;
                    true
                });
            f(x as u32 as usize, keep);
        }
    }
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
    cands: CandBuf,
}

/// Scans one chunk block by block: the fused scan kernel scores and classifies a block's
/// whole words in one loop ([`settle_fused`] then reads its bits); otherwise the JIT scores
/// the block into a cache-resident buffer and it is compared with the range in the float
/// domain ([`simd::count_words`]). Non-finite alive weights are counted only when `check` is
/// set.
///
/// With `zero_below` the scan also writes, block by block: the alive elements below the
/// range are zeroed and leave the mask (which keeps the alive ones in and above the range).
/// A block holding an alive non-finite weight (with `check`) stops the writing for the rest
/// of the chunk; the weight itself is never zeroed (the fused kernel may have zeroed others
/// of its block), so it stays where it was.
#[allow(clippy::too_many_arguments)]
fn scan_chunk(
    k: &CompiledKernel,
    raw: &RawTensor,
    c: Chunk,
    lo: u32,
    hi: u32,
    shift: u32,
    check: bool,
    zero_below: bool,
) -> ChunkScan {
    // Only a chunk whose candidates overflow keeps a histogram (of all its in-range keys);
    // the others' come from their candidates when needed.
    let mut hist: Vec<u32> = Vec::new();
    let mut cands = CandBuf::take();
    let (mut above, mut in_range, mut nonfinite) = (0u64, 0u64, 0u64);
    let mut writing = zero_below;
    // The fused scan kernel classifies (and zeroes) whole words in the JIT's own loop; the
    // elements after a block's last whole word, and tensors it cannot run on, take the score
    // buffer and the vectorised classification.
    let fused = k.fused_for(raw.cols) && !blocked_scan();
    let lo_f = simd::ge_bound(lo);
    let gt_f = simd::gt_bound(hi);
    with_scratch(|buf| {
        let mut bits = ScanBits::new();
        let mut b0 = c.start;
        while b0 < c.end {
            let b1 = (b0 + BLOCK).min(c.end);
            let whole = if fused { b0 + (b1 - b0) / 64 * 64 } else { b0 };
            // The part scored and classified by the fused kernel, then the rest.
            for (p0, p1, fuse) in [(b0, whole, true), (whole, b1, false)] {
                if p0 == p1 {
                    continue;
                }
                let base = p0 - c.start;
                // The candidates of word `wi`: their scores are `src`'s values with the bits
                // of `keep` (all of them, or all but the sign for weights' magnitudes).
                let mut on_in = |src: &[f32], keep: u32, wi: usize, inr: u64| {
                    let score = |j: usize| f32::from_bits(src[j].to_bits() & keep);
                    let n = inr.count_ones() as usize;
                    let mut m = inr;
                    if cands.len() + n <= CAP && hist.is_empty() {
                        // Common case: the word's candidates all fit.
                        while m != 0 {
                            let j = wi * 64 + m.trailing_zeros() as usize;
                            m &= m - 1;
                            let key = simd::key_of(score(j)) as u64;
                            cands.push((key << 32) | (base + j) as u64);
                        }
                    } else {
                        while m != 0 {
                            let j = wi * 64 + m.trailing_zeros() as usize;
                            m &= m - 1;
                            let key = simd::key_of(score(j));
                            if cands.len() < CAP {
                                cands.push(((key as u64) << 32) | (base + j) as u64);
                                continue;
                            }
                            if hist.is_empty() {
                                hist = vec![0u32; BUCKETS];
                                for &c in cands.iter() {
                                    hist[(((c >> 32) as u32 - lo) >> shift) as usize] += 1;
                                }
                            }
                            hist[((key - lo) >> shift) as usize] += 1;
                        }
                    }
                    in_range += n as u64;
                };
                // Alive non-finite weights of `[p0, p1)`: an error, and nothing more is
                // written in this chunk.
                let mut bad_in = |writing: &mut bool| -> bool {
                    // SAFETY: the calling worker owns the chunk; only read here.
                    let (w, mask) = unsafe {
                        (
                            raw.weights(p0, p1),
                            raw.mask_words(p0 / 64, p1.div_ceil(64)),
                        )
                    };
                    let bad = w
                        .iter()
                        .enumerate()
                        .filter(|&(j, x)| (mask[j / 64] >> (j % 64)) & 1 == 1 && !x.is_finite())
                        .count() as u64;
                    nonfinite += bad;
                    *writing &= bad == 0;
                    bad > 0
                };
                if fuse {
                    let range = ScanRange {
                        lo: lo_f.unwrap_or(f32::NEG_INFINITY),
                        gt: gt_f,
                        write: writing && lo_f.is_some(),
                        allow: !check,
                    };
                    buf.resize(p1 - p0, 0.0);
                    // SAFETY: this worker owns the chunk (it only writes with `writing`).
                    let settled = unsafe { raw.scan_into(k, p0, p1, &range, buf, &mut bits) };
                    // The AVX-512 kernels flag alive non-finite weights themselves; otherwise
                    // the block, in cache now, is checked.
                    let any_bad = check
                        && settled.map_or_else(
                            // SAFETY: as above.
                            || simd::any_nonfinite(unsafe { raw.weights(p0, p1) }),
                            |st| st.bad,
                        );
                    if any_bad && bad_in(&mut writing) {
                        // The kernel left the non-finite weights as they were, and alive (the
                        // round ends in an error, so this part's counts do not matter).
                        continue;
                    }
                    if let Some(st) = settled.filter(|_| range.write) {
                        // The AVX-512 kernel settled the mask and zeroed the weights itself. The
                        // magnitude's kept weights are as they were: their magnitudes are the
                        // scores (`Settled::scores`).
                        above += st.above;
                        let (src, keep) = if st.scores {
                            (&buf[..], !0)
                        } else {
                            // SAFETY: this worker owns the chunk; only read here.
                            (unsafe { raw.weights(p0, p1) }, 0x7fff_ffff)
                        };
                        for wi in 0..(p1 - p0) / 64 {
                            let inr = ScanBits::word(&bits.ge, wi);
                            if inr != 0 {
                                on_in(src, keep, wi, inr);
                            }
                        }
                        continue;
                    }
                    // SAFETY: this worker owns the chunk, its mask and side words.
                    above += unsafe {
                        settle_fused(
                            raw,
                            p0,
                            p1,
                            &bits,
                            range.write,
                            lo_f.is_some(),
                            |wi, inr| on_in(buf, !0, wi, inr),
                        )
                    };
                    continue;
                }
                raw.score_into(k.score_raw, p0, p1, buf);
                // SAFETY: nothing writes this part yet.
                if check && simd::any_nonfinite(unsafe { raw.weights(p0, p1) }) {
                    // Leave this part, and the rest of the chunk, as they are.
                    bad_in(&mut writing);
                }
                let buf = &buf[..];
                // SAFETY: as above.
                let ahead = unsafe { raw.weights(p1, (p1 + BLOCK).min(c.end)) };
                let on_in = |wi: usize, inr: u64| on_in(buf, !0, wi, inr);
                if writing {
                    // SAFETY: this worker owns the chunk, its weights and mask words.
                    let (w, mask) = unsafe {
                        (
                            raw.weights_mut(p0, p1),
                            raw.mask_words_mut(p0 / 64, p1.div_ceil(64)),
                        )
                    };
                    above += simd::count_zero_words(buf, w, mask, lo, hi, ahead, on_in) as u64;
                } else {
                    // SAFETY: nothing writes the tensor during a read-only scan; this worker
                    // owns the chunk's side words.
                    let (mask, side) = unsafe {
                        (
                            raw.mask_words(p0 / 64, p1.div_ceil(64)),
                            raw.side_words_mut(p0 / 64, p1.div_ceil(64)),
                        )
                    };
                    above += simd::count_words(buf, mask, lo, hi, ahead, side, on_in) as u64;
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

/// After a fused scan of `[p0, p1)` (whole words): counts the alive elements above the range
/// (returned), reports each word's alive elements inside it to `on_in(word, bits)`, and then,
/// if the scan wrote (`wrote`), makes the mask keep the alive elements in and above the range
/// and zeroes the pruned ones the kernel left (it zeroes by score only), or else, for a
/// read-only round, writes the above bits to the side words (if attached). Without a low end
/// (`has_lo` false) every key is at or above it.
///
/// # Safety
/// The calling worker owns the weights, mask and side words of `[p0, p1)`.
unsafe fn settle_fused(
    raw: &RawTensor,
    p0: usize,
    p1: usize,
    bits: &ScanBits,
    wrote: bool,
    has_lo: bool,
    mut on_in: impl FnMut(usize, u64),
) -> u64 {
    let words = (p1 - p0) / 64;
    // SAFETY: guaranteed by the caller.
    let (mask, side) = unsafe {
        (
            raw.mask_words_mut(p0 / 64, p1 / 64),
            raw.side_words_mut(p0 / 64, p1 / 64),
        )
    };
    let mut keeps = [0u64; BLOCK / 64];
    let (mut above, mut dead) = (0u64, false);
    for wi in 0..words {
        let g = ScanBits::word(&bits.ge, wi);
        let o = ScanBits::word(&bits.over, wi);
        let a = mask[wi];
        let keep = if has_lo { g & a } else { a };
        above += (o & a).count_ones() as u64;
        let inr = keep & !o;
        if inr != 0 {
            on_in(wi, inr);
        }
        if wrote {
            dead |= a != u64::MAX;
            keeps[wi] = keep;
        } else if !side.is_empty() {
            side[wi] = o & a;
        }
    }
    if wrote {
        if dead {
            // SAFETY: guaranteed by the caller.
            let w = unsafe { raw.weights_mut(p0, p1) };
            simd::zero_words(w, &keeps[..words], mask);
        } else {
            mask.copy_from_slice(&keeps[..words]);
        }
    }
    above
}

/// Adds a chunk's histogram of in-range keys (bucket `(key - lo) >> shift`) to `into`.
fn add_hist(into: &mut [usize], s: &ChunkScan, lo: u32, shift: u32) {
    if s.hist.is_empty() {
        for &c in s.cands.iter() {
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

/// Why [`find_cuts`] stopped.
pub enum CutError {
    /// An alive weight is NaN or infinite (the weights holding one are untouched).
    NonFinite,
    /// The speculative first scan of this pool zeroed elements that the cut keeps.
    SampleMissed(usize),
}

/// Finds the cut of every pool. Pools must not share tensors.
///
/// **Single pass.** For a pool with `speculate`, the first scan is also the apply pass for
/// most of the weights: it zeroes the alive elements below the sampled range (their mask
/// bits cleared), keeps the others' mask bits, and collects the candidates inside the range.
/// When the cut lies in the range (the sample's purpose), only the candidates remain to be
/// written ([`ChunkCut::fixup`]); when it lies above, the zeroed elements were below it
/// anyway and the search goes on with the read-only rounds; when it lies below, elements
/// the cut keeps are gone and the pool returns [`CutError::SampleMissed`]. The range is
/// therefore wider below ([`SPECULATE_BELOW`] standard deviations of the sampled rank,
/// estimated from the spread between sample runs) than above ([`ABOVE_SIGMAS`]), and a scan
/// writes only when the range is narrow enough to likely resolve in that round.
///
/// Side bitmaps are attached on demand: `sides[t]`, empty until a read-only round scans
/// tensor `t`, then `ceil(len / 64)` words attached to `raws[t]`. A single-pass cut that
/// resolves in its first round never needs one.
pub fn find_cuts(
    k: &CompiledKernel,
    raws: &mut [RawTensor],
    sides: &mut [Vec<u64>],
    pools: &[Pool],
    check_finite: bool,
) -> Result<Vec<Cut>, CutError> {
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
    let mut narrow = vec![false; pools.len()];
    let mut states: Vec<State> = pools
        .iter()
        .enumerate()
        .map(|(p, pool)| {
            let base: usize = pool.members.iter().map(|m| clamp(m, 0)).sum();
            if pool.keep <= base {
                State::Done(nothing_taken(pool, &pool_chunks[p]))
            } else {
                let t0 = std::time::Instant::now();
                let below = if pool.speculate {
                    SPECULATE_BELOW
                } else {
                    ABOVE_SIGMAS
                };
                let (lo, hi, band) = sample_range(k, raws, pool, &pool_chunks[p], below);
                #[cfg(any(test, feature = "test-hooks"))]
                let (lo, hi, band) = hooks::FORCE_RANGE
                    .with(|f| f.get())
                    .map_or((lo, hi, band), |(l, h)| (l, h, 0.0));
                // Writing only pays when the round will likely resolve from candidates;
                // otherwise the scan stays read-only and the cut takes two passes.
                narrow[p] = band * (CHUNK as f64) <= 0.75 * CAP as f64;
                super::raw::trace("sample", t0);
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
                        return Err(CutError::NonFinite);
                    }
                }
            }
        }
    }
    let mut first = check_finite;
    // Pools whose first scan writes: a sampled range that excludes something below it.
    let mut speculating: Vec<bool> = states
        .iter()
        .zip(pools)
        .zip(&narrow)
        .map(|((s, pool), &narrow)| {
            pool.speculate && narrow && matches!(s, State::Search { lo, .. } if *lo > 0)
        })
        .collect();
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
                    .enumerate()
                    .map(move |(ci, &(_, c))| (p, ci, c, lo, hi))
            })
            .collect();
        if work.is_empty() {
            break;
        }
        for (p, pool) in pools.iter().enumerate() {
            if speculating[p] || !matches!(states[p], State::Search { .. }) {
                continue;
            }
            for m in &pool.members {
                let t = m.tensor;
                if sides[t].is_empty() && raws[t].len > 0 {
                    sides[t] = vec![0u64; raws[t].len.div_ceil(64)];
                    raws[t].set_side(&mut sides[t]);
                }
            }
        }
        let raws: &[RawTensor] = raws;
        if super::raw::tracing() {
            for (p, s) in states.iter().enumerate() {
                if let State::Search { lo, hi } = s {
                    eprintln!("pool {p}: scan [{lo:#x}, {hi:#x}]");
                }
            }
        }
        let t0 = std::time::Instant::now();
        let (mut scans, narrowed) = scan_round(k, raws, pools, &work, &speculating, first);
        for (p, r) in narrowed.into_iter().enumerate() {
            if let Some((lo, hi)) = r {
                #[cfg(test)]
                tests::NARROWED.with(|c| c.set(c.get() + 1));
                states[p] = State::Search { lo, hi };
            }
        }
        if super::raw::tracing() {
            let inr: u64 = scans.iter().map(|s| s.in_range).sum();
            eprintln!("  round {:.6}s, in range {inr}", t0.elapsed().as_secs_f64());
        }
        if first {
            if scans.iter().any(|s| s.nonfinite > 0) {
                return Err(CutError::NonFinite);
            }
            first = false;
        }
        let t1 = std::time::Instant::now();
        // Results are in `work` order: pool by pool, chunk by chunk.
        let mut at = 0;
        for (p, pool) in pools.iter().enumerate() {
            let State::Search { lo, hi } = states[p] else {
                continue;
            };
            let n = pool_chunks[p].len();
            let sc = &mut scans[at..at + n];
            at += n;
            states[p] = step(pool, &pool_chunks[p], sc, lo, hi, speculating[p]);
            if speculating[p] {
                #[cfg(any(test, feature = "test-hooks"))]
                hooks::SPECULATED.with(|c| c.set(c.get() + 1));
                if let State::Search { hi: h, .. } = states[p] {
                    if h < lo {
                        return Err(CutError::SampleMissed(p));
                    }
                }
                speculating[p] = false;
            }
        }
        super::raw::trace("resolve", t1);
    }
    Ok(states
        .into_iter()
        .map(|s| match s {
            State::Done(c) => c,
            State::Search { .. } => unreachable!("loop ends when every pool is done"),
        })
        .collect())
}

/// One round's scans of `work` (pool, chunk index in the pool, chunk, range), in its order,
/// and per pool the narrower range the round ended with, if any.
///
/// A speculative pool of at least [`PHASE_ONE_MIN`] chunks is scanned in two phases. The
/// first scans an evenly spaced eighth of its chunks (at least 8, rounded up to the thread
/// count) with the sampled range; their candidates, with their alive and above counts, then
/// estimate the cut from that share of the weights, many times more than the sample's
/// keys, and so give a range several times narrower ([`narrower`]). The first phase's
/// chunks are brought to it (their candidates below it zeroed, those above it counted above,
/// see [`restrict`]) and the second phase scans the other chunks with it: fewer candidates
/// to collect and resolve, and fewer for the fixup to write, where each write is a cache
/// miss.
fn scan_round(
    k: &CompiledKernel,
    raws: &[RawTensor],
    pools: &[Pool],
    work: &[(usize, usize, Chunk, u32, u32)],
    speculating: &[bool],
    first: bool,
) -> (Vec<ChunkScan>, Vec<Option<(u32, u32)>>) {
    let scan = |i: usize, lo: u32, hi: u32| {
        let (p, _, c, ..) = work[i];
        let raw = &raws[c.tensor];
        scan_chunk(k, raw, c, lo, hi, shift_for(lo, hi), first, speculating[p])
    };
    // Per pool: its chunks this round, and how many the first phase scans (0: one phase).
    let mut counts = vec![0usize; pools.len()];
    for &(p, ..) in work {
        counts[p] += 1;
    }
    let threads = rayon::current_num_threads().max(1);
    let ones: Vec<usize> = counts
        .iter()
        .enumerate()
        .map(|(p, &n)| {
            if !speculating[p] || n < phase_one_min() {
                0
            } else {
                ((n / 8).max(phase_one_parts()).div_ceil(threads) * threads).min(n / 2)
            }
        })
        .collect();
    // Chunk `ci` of `n` is in the first phase when it is the first at or after `j * n / n1`
    // for some `j`.
    let in_one = |i: usize| {
        let (p, ci, ..) = work[i];
        let (n, n1) = (counts[p], ones[p]);
        n1 > 0 && (ci * n1).div_ceil(n) != ((ci + 1) * n1).div_ceil(n)
    };
    let one: Vec<usize> = (0..work.len()).filter(|&i| in_one(i)).collect();
    let mut ranges: Vec<Option<(u32, u32)>> = vec![None; pools.len()];
    let mut slots: Vec<Option<ChunkScan>> = (0..work.len()).map(|_| None).collect();
    if !one.is_empty() {
        let t0 = std::time::Instant::now();
        let mut firsts: Vec<(ChunkScan, usize)> = one
            .par_iter()
            .map(|&i| {
                let (_, _, c, lo, hi) = work[i];
                // The alive elements, counted before the scan changes the mask.
                let alive = alive_in(&raws[c.tensor], c);
                (scan(i, lo, hi), alive)
            })
            .collect();
        // Per pool, its first-phase scans (positions in `firsts`).
        let mut mine: Vec<Vec<usize>> = vec![Vec::new(); pools.len()];
        for (j, &i) in one.iter().enumerate() {
            mine[work[i].0].push(j);
        }
        for (p, pool) in pools.iter().enumerate() {
            let Some(&j0) = mine[p].first() else {
                continue;
            };
            let (.., lo, hi) = work[one[j0]];
            let parts: Vec<&(ChunkScan, usize)> = mine[p].iter().map(|&j| &firsts[j]).collect();
            ranges[p] = narrower(pool, lo, hi, &parts);
            if super::raw::tracing() {
                let (n, r) = (parts.len(), ranges[p]);
                eprintln!("pool {p}: first phase of {n} chunks, range {r:x?}");
            }
        }
        // Every pool's first-phase chunks brought to its narrower range, in one pass.
        firsts.par_iter_mut().zip(&one).for_each(|((s, _), &i)| {
            let (p, _, c, ..) = work[i];
            if let Some((lo2, hi2)) = ranges[p] {
                restrict(&raws[c.tensor], c, s, lo2, hi2);
            }
        });
        for (&i, (s, _)) in one.iter().zip(firsts) {
            slots[i] = Some(s);
        }
        super::raw::trace("first phase", t0);
    }
    let rest: Vec<usize> = (0..work.len()).filter(|&i| slots[i].is_none()).collect();
    let rest_scans: Vec<ChunkScan> = rest
        .par_iter()
        .map(|&i| {
            let (p, _, _, lo, hi) = work[i];
            let (lo, hi) = ranges[p].unwrap_or((lo, hi));
            scan(i, lo, hi)
        })
        .collect();
    for (&i, s) in rest.iter().zip(rest_scans) {
        slots[i] = Some(s);
    }
    let scans = slots
        .into_iter()
        .map(|s| s.expect("every chunk scanned"))
        .collect();
    (scans, ranges)
}

/// Pools of at least this many chunks are scanned in two phases (see [`scan_round`]).
const PHASE_ONE_MIN: usize = 16;
/// The first phase scans at least this many chunks: the spread between them is part of
/// the narrower range's width.
const PHASE_ONE_PARTS: usize = 8;

fn phase_one_min() -> usize {
    #[cfg(test)]
    if tests::SPLIT_ALWAYS.with(|s| s.get()) {
        return 4;
    }
    PHASE_ONE_MIN
}

fn phase_one_parts() -> usize {
    #[cfg(test)]
    if tests::SPLIT_ALWAYS.with(|s| s.get()) {
        return 2;
    }
    PHASE_ONE_PARTS
}

/// The alive elements of chunk `c` (which starts a mask word).
fn alive_in(raw: &RawTensor, c: Chunk) -> usize {
    // SAFETY: nothing writes the chunk's mask words during the call (its worker is here).
    let words = unsafe { raw.mask_words(c.start / 64, c.end.div_ceil(64)) };
    super::types::count_alive(words, c.end - c.start)
}

/// A range inside `[lo, hi]` from a speculative first phase's chunks (their scans with
/// `[lo, hi]` and alive counts), as [`sample_cut`] makes one from the sample: the estimated
/// cut is the candidate key where, counted from the top and with the elements above the
/// range, they reach the share of `keep` those chunks would hold in proportion to their
/// alive elements; the range reaches [`SPECULATE_BELOW`] standard deviations of that rank
/// below it and [`ABOVE_SIGMAS`] above, the deviation being the larger of the binomial one
/// and the one measured between the chunks. `None` where a chunk's candidates overflowed or
/// it met a non-finite weight, or the estimate falls outside the candidates.
fn narrower(pool: &Pool, lo: u32, hi: u32, parts: &[&(ChunkScan, usize)]) -> Option<(u32, u32)> {
    let m = parts.len();
    if pool.alive == 0
        || m < phase_one_parts()
        || parts
            .iter()
            .any(|(s, _)| !s.hist.is_empty() || s.nonfinite > 0)
    {
        return None;
    }
    let alive: usize = parts.iter().map(|(_, a)| a).sum();
    let above: u64 = parts.iter().map(|(s, _)| s.above).sum();
    let mut keys: Vec<u32> = parts
        .iter()
        .flat_map(|(s, _)| s.cands.iter().map(|&x| (x >> 32) as u32))
        .collect();
    let n = keys.len();
    let q = (pool.keep as f64 / pool.alive as f64).clamp(0.0, 1.0);
    let want = (q * alive as f64 - above as f64).round();
    if want < 1.0 || want > n as f64 {
        return None;
    }
    let at = want as usize - 1;
    let desc = |a: &u32, b: &u32| b.cmp(a);
    let kq = *keys.select_nth_unstable_by(at, desc).1;
    // How the count at or above the estimate varies between the chunks.
    let (mut ss, mut mf) = (0.0f64, 0.0f64);
    for (s, a) in parts {
        let c = s.above + s.cands.iter().filter(|&&x| (x >> 32) as u32 >= kq).count() as u64;
        let d = c as f64 - q * *a as f64;
        ss += d * d;
        mf += 1.0;
    }
    let cluster = (ss * mf / (mf - 1.0)).sqrt();
    let sigma = (alive as f64 * q * (1.0 - q)).sqrt().max(cluster);
    let slack = 0.0002 * alive as f64 + 16.0;
    let bottom = want + SPECULATE_BELOW * sigma + slack;
    let top = want - ABOVE_SIGMAS * sigma - slack;
    // The rank `r` (from 1) among the keys: those after `at` are at most `kq`, those
    // before it at least.
    let lo2 = if bottom >= n as f64 {
        lo
    } else {
        let r = bottom as usize - 1;
        *keys[at + 1..].select_nth_unstable_by(r - at - 1, desc).1
    };
    let hi2 = if top < 1.0 {
        hi
    } else {
        let r = top as usize - 1;
        *keys[..at].select_nth_unstable_by(r, desc).1
    };
    (lo <= lo2 && lo2 <= hi2 && hi2 <= hi).then_some((lo2, hi2))
}

/// Brings a first-phase chunk scanned speculatively with a wider range to `[lo, hi]`, as
/// if scanned with it: its candidates below it are zeroed and leave the mask, those above
/// it count as above.
fn restrict(raw: &RawTensor, c: Chunk, s: &mut ChunkScan, lo: u32, hi: u32) {
    let mut above = 0;
    s.cands.retain(|&x| {
        let key = (x >> 32) as u32;
        if key < lo {
            let i = c.start + x as u32 as usize;
            // SAFETY: the calling worker owns the chunk's weights and mask words.
            unsafe {
                raw.set_weight(i, 0.0);
                raw.set_mask_word(i / 64, raw.mask_word(i / 64) & !(1u64 << (i % 64)));
            }
        }
        above += (key > hi) as u64;
        lo <= key && key <= hi
    });
    s.above += above;
    s.in_range = s.cands.len() as u64;
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
            cands: None,
            fixup: None,
        });
    }
    Cut {
        t: u32::MAX,
        chunks: per,
        taken: vec![0; pool.members.len()],
    }
}

/// A first key range from a deterministic sample, wide enough to hold the cut with high
/// probability (the rounds correct it when it does not): `below` standard deviations of the
/// sampled rank under the estimated cut, [`ABOVE_SIGMAS`] above. The deviation is the larger
/// of the binomial one and the one measured between sample runs (neighbouring weights are
/// often alike, so a run of 256 can count for much less than 256 independent draws).
fn sample_range(
    k: &CompiledKernel,
    raws: &[RawTensor],
    pool: &Pool,
    chunks: &[(usize, Chunk)],
    below: f64,
) -> (u32, u32, f64) {
    if pool.alive < SAMPLE_MIN {
        return (0, u32::MAX, 1.0);
    }
    let t_s = std::time::Instant::now();
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
    // The keys go to a buffer kept between calls (a fresh one page-faults on every call).
    static KEYS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());
    let mut store = KEYS
        .lock()
        .map(|mut k| std::mem::take(&mut *k))
        .unwrap_or_default();
    // A few groups of runs per thread, each with its own histogram for `Ranks`. The range
    // does not depend on the grouping (so not on the thread count): the keys stay in run
    // order, and the histogram and counts are integer sums.
    let group = runs
        .len()
        .div_ceil(4 * rayon::current_num_threads().max(1))
        .max(1);
    store.resize(runs.len() * SAMPLE_RUN, 0);
    let groups: Vec<SampleGroup> = runs
        .par_chunks(group)
        .zip(store.par_chunks_mut(group * SAMPLE_RUN))
        .map(|(runs, out)| sample_group(k, raws, runs, out))
        .collect();
    super::raw::trace("sample keys", t_s);
    let keys: Vec<&[u32]> = store
        .chunks(group * SAMPLE_RUN)
        .zip(&groups)
        .map(|(k, g)| &k[..g.keys])
        .collect();
    let mut hist = vec![0u32; Ranks::BUCKETS];
    for g in &groups {
        for (h, &x) in hist.iter_mut().zip(&g.hist) {
            *h += x;
        }
    }
    let lens: Vec<&[u16]> = groups.iter().map(|g| &g.lens[..]).collect();
    let tensor_of: Vec<usize> = runs.iter().map(|r| r.tensor).collect();
    let result = sample_cut(
        pool,
        &keys,
        &lens,
        Ranks::from_hist(hist),
        &tensor_of,
        below,
    );
    if let Ok(mut k) = KEYS.lock() {
        *k = store;
    }
    super::raw::trace("sample select", t_s);
    result
}

/// One group of sample runs: its keys' count, each run's count and the keys' histogram.
struct SampleGroup {
    keys: usize,
    lens: Vec<u16>,
    hist: Vec<u32>,
}

/// The alive keys of `runs` (each starts at a multiple of 64, so it covers whole mask
/// words, and holds at most [`SAMPLE_RUN`] elements), in order, to the front of `out`.
fn sample_group(
    k: &CompiledKernel,
    raws: &[RawTensor],
    runs: &[Chunk],
    out: &mut [u32],
) -> SampleGroup {
    // Runs are far apart, so each costs a trip to memory: the weights and mask words of the
    // run `AHEAD` places on are prefetched while the current one is scored.
    const AHEAD: usize = 2;
    let mut buf = Vec::with_capacity(SAMPLE_RUN);
    let mut g = SampleGroup {
        keys: 0,
        lens: Vec::with_capacity(runs.len()),
        hist: vec![0; Ranks::BUCKETS],
    };
    for (i, &c) in runs.iter().enumerate() {
        if let Some(&n) = runs.get(i + AHEAD) {
            if n.start < n.end {
                let raw = &raws[n.tensor];
                // SAFETY: inside the tensor; nothing writes it during the search.
                unsafe {
                    let w = raw.weights(n.start, n.end);
                    for line in (0..w.len()).step_by(16) {
                        simd::prefetch(w.as_ptr().add(line) as *const u8);
                    }
                    let m = raw.mask_words(n.start / 64, n.end.div_ceil(64));
                    simd::prefetch(m.as_ptr() as *const u8);
                }
            }
        }
        let before = g.keys;
        if c.start < c.end {
            let raw = &raws[c.tensor];
            raw.score_into(k.score_raw, c.start, c.end, &mut buf);
            // SAFETY: nothing writes the tensor during the search.
            let words = unsafe { raw.mask_words(c.start / 64, c.end.div_ceil(64)) };
            for (xs, &word) in buf.chunks(64).zip(words) {
                let dst = &mut out[g.keys..g.keys + xs.len()];
                if word == u64::MAX && xs.len() == 64 {
                    // All alive: a loop the compiler vectorises.
                    for (d, &x) in dst.iter_mut().zip(xs) {
                        *d = score_key(x);
                    }
                    g.keys += 64;
                } else {
                    let mut n = 0;
                    for (j, &x) in xs.iter().enumerate() {
                        if (word >> j) & 1 == 1 {
                            dst[n] = score_key(x);
                            n += 1;
                        }
                    }
                    g.keys += n;
                }
            }
            for &key in &out[before..g.keys] {
                g.hist[Ranks::bucket(key)] += 1;
            }
        }
        g.lens.push((g.keys - before) as u16);
    }
    g
}

/// The sample's range from its keys (`keys`, in groups; `lens`, per group the alive keys of
/// each of its runs; `ranks`, built from all the keys; `tensor_of`, each run's tensor), see
/// [`sample_range`].
///
/// The deviation between runs is taken within each tensor, around that tensor's own share
/// of keys above the estimate: the runs cover every tensor in proportion to its size, so
/// tensors of different scales do not make the estimate less certain, and counting their
/// differences as noise made the range of a pool of unlike tensors too wide for the first
/// scan to write.
fn sample_cut(
    pool: &Pool,
    keys: &[&[u32]],
    lens: &[&[u16]],
    mut ranks: Ranks,
    tensor_of: &[usize],
    below: f64,
) -> (u32, u32, f64) {
    let len: usize = keys.iter().map(|k| k.len()).sum();
    if len < 1024 {
        return (0, u32::MAX, 1.0);
    }
    let n = len as f64;
    let q = (pool.keep as f64 / pool.alive as f64).clamp(0.0, 1.0);
    let pos = q * n;
    let last = len - 1;
    // The estimated cut, and how the share of keys above it varies between runs.
    let at = (pos as usize).min(last);
    let kq = ranks.key_at(keys, at);
    // Per run with keys: its tensor, keys above the estimate, keys.
    let mut counts: Vec<(usize, f64, f64)> = Vec::with_capacity(tensor_of.len());
    let mut run = 0;
    for (gk, gl) in keys.iter().zip(lens) {
        let mut at = 0;
        for &len in gl.iter() {
            let t = tensor_of[run];
            run += 1;
            if len == 0 {
                continue;
            }
            let r = &gk[at..at + len as usize];
            at += len as usize;
            let c = r.iter().filter(|&&x| x > kq).count() as f64;
            counts.push((t, c, len as f64));
        }
    }
    let tensors = tensor_of.iter().max().map_or(0, |&t| t + 1);
    let mut share = vec![(0.0f64, 0.0f64); tensors];
    for &(t, c, l) in &counts {
        share[t].0 += c;
        share[t].1 += l;
    }
    let (mut ss, mut m) = (0.0f64, 0.0f64);
    for &(t, c, l) in &counts {
        let d = c - share[t].0 / share[t].1 * l;
        ss += d * d;
        m += 1.0;
    }
    // One degree of freedom less per tensor with keys (its share is estimated).
    let strata = share.iter().filter(|s| s.1 > 0.0).count() as f64;
    let cluster = if m > strata + 1.0 {
        (ss * m / (m - strata)).sqrt()
    } else {
        0.0
    };
    let sigma = (n * q * (1.0 - q)).sqrt().max(cluster);
    let slack = 0.0002 * n + 16.0;
    let top = ((pos - ABOVE_SIGMAS * sigma - slack).max(0.0) as usize).min(last);
    let bottom = ((pos + below * sigma + slack) as usize).min(last);
    let lo = if bottom == last {
        0
    } else {
        ranks.key_at(keys, bottom)
    };
    let hi = if top == 0 {
        u32::MAX
    } else {
        ranks.key_at(keys, top)
    };
    (lo, hi, (bottom - top) as f64 / n)
}

/// Keys by rank in descending order, without sorting: a histogram of the top 12 bits (sign,
/// exponent and 3 mantissa bits of a score) finds the bucket holding a rank, and only that
/// bucket's keys are selected in. The keys come in parts (the sample's groups).
struct Ranks {
    /// `ge[b]`: how many keys lie in bucket `b` or above (non-increasing in `b`).
    ge: Vec<u32>,
    hist: Vec<u32>,
    /// The last bucket whose keys were gathered, and its keys (in any order).
    gathered: Option<(usize, Vec<u32>)>,
}

impl Ranks {
    const SHIFT: u32 = 20;
    const BUCKETS: usize = 1 << (32 - Self::SHIFT);

    fn bucket(key: u32) -> usize {
        (key >> Self::SHIFT) as usize
    }

    #[cfg(test)]
    fn new(parts: &[&[u32]]) -> Self {
        let mut hist = vec![0u32; Self::BUCKETS];
        for &k in parts.iter().flat_map(|p| p.iter()) {
            hist[Self::bucket(k)] += 1;
        }
        Self::from_hist(hist)
    }

    /// From the histogram of the keys' buckets ([`Ranks::bucket`]).
    fn from_hist(hist: Vec<u32>) -> Self {
        let mut ge = vec![0u32; hist.len()];
        let mut sum = 0u32;
        for b in (0..hist.len()).rev() {
            sum += hist[b];
            ge[b] = sum;
        }
        Ranks {
            ge,
            hist,
            gathered: None,
        }
    }

    /// The key at `rank` (0 = the largest) of the keys the histogram was built from.
    fn key_at(&mut self, parts: &[&[u32]], rank: usize) -> u32 {
        let r = rank as u32;
        assert!(r < self.ge[0], "rank {rank} of {} keys", self.ge[0]);
        // The highest bucket with more than `rank` keys at or above it holds the rank.
        let b = self.ge.partition_point(|&g| g > r) - 1;
        // Its keys, gathered once: the three ranks a sample needs often share a bucket.
        if self.gathered.as_ref().is_none_or(|(g, _)| *g != b) {
            let mut inside = self.gathered.take().map(|(_, v)| v).unwrap_or_default();
            inside.clear();
            let lo = (b as u32) << Self::SHIFT;
            let hi = lo | ((1 << Self::SHIFT) - 1);
            for p in parts {
                simd::keys_between(p, lo, hi, &mut inside);
            }
            self.gathered = Some((b, inside));
        }
        let inside = &mut self.gathered.as_mut().expect("gathered above").1;
        let i = (r - (self.ge[b] - self.hist[b])) as usize;
        *inside.select_nth_unstable_by(i, |a, b| b.cmp(a)).1
    }
}

/// One round's decision for a pool.
fn step(
    pool: &Pool,
    chunks: &[(usize, Chunk)],
    sc: &mut [ChunkScan],
    lo: u32,
    hi: u32,
    spec: bool,
) -> State {
    let nm = pool.members.len();
    let mut above = vec![0usize; nm];
    let mut inr = vec![0usize; nm];
    for (&(mi, _), s) in chunks.iter().zip(sc.iter()) {
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
        return State::Done(resolve_candidates(pool, chunks, sc, &above, lo, hi, spec));
    }
    if lo == hi {
        return State::Done(resolve_ties(pool, chunks, sc, &above, lo));
    }
    // Narrow to the bucket holding the end of the shortest prefix.
    let shift = shift_for(lo, hi);
    let hist = member_hists(nm, chunks, sc, lo, shift);
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

/// Per member, the histogram of its chunks' in-range keys (integer sums: any order gives
/// the same counts, so the chunks are summed in parallel). A member's histogram is allocated
/// only in the parallel pieces that meet one of its chunks: each piece zeroing and merging
/// every member's took longer than the counting itself.
fn member_hists(
    nm: usize,
    chunks: &[(usize, Chunk)],
    sc: &[ChunkScan],
    lo: u32,
    shift: u32,
) -> Vec<Vec<usize>> {
    let empty = || vec![Vec::new(); nm];
    let mut hists = chunks
        .par_iter()
        .zip(sc)
        .fold(empty, |mut h: Vec<Vec<usize>>, (&(mi, _), s)| {
            if h[mi].is_empty() {
                h[mi] = vec![0usize; BUCKETS];
            }
            add_hist(&mut h[mi], s, lo, shift);
            h
        })
        .reduce(empty, |mut a, b| {
            for (x, y) in a.iter_mut().zip(b) {
                if x.is_empty() {
                    *x = y;
                } else if !y.is_empty() {
                    x.iter_mut().zip(y).for_each(|(p, q)| *p += q);
                }
            }
            a
        });
    for h in hists.iter_mut().filter(|h| h.is_empty()) {
        *h = vec![0usize; BUCKETS];
    }
    hists
}

/// Resolves a cut that lies in the range from every chunk's candidates, which move into
/// the cut. With `spec` (the scan was speculative) every chunk is marked for the fixup.
fn resolve_candidates(
    pool: &Pool,
    chunks: &[(usize, Chunk)],
    sc: &mut [ChunkScan],
    above: &[usize],
    lo: u32,
    hi: u32,
    spec: bool,
) -> Cut {
    // The histogram finds the bucket where the prefix reaches `keep`; every candidate in a
    // higher bucket is taken, so only that bucket's candidates need ordering.
    let nm = pool.members.len();
    let shift = shift_for(lo, hi);
    let t0 = std::time::Instant::now();
    let hist = member_hists(nm, chunks, sc, lo, shift);
    super::raw::trace("hist", t0);
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
    // (key, chunk position) in chunk order, then index order: a stable sort by key keeps the
    // ranking order.
    let mut cands: Vec<(u32, usize)> = sc
        .par_iter()
        .enumerate()
        .flat_map_iter(|(ci, s)| {
            s.cands
                .iter()
                .map(move |&x| ((x >> 32) as u32, ci))
                .filter(|&(key, _)| in_bucket(key))
        })
        .collect();
    cands.sort_by_key(|c| std::cmp::Reverse(c.0));
    super::raw::trace("bucket", t0);
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
    #[cfg(test)]
    if spec {
        tests::FIXUPS.with(|c| c.set(c.get() + 1));
    }
    let cands: Vec<(CandBuf, Option<u64>)> = sc
        .iter_mut()
        .map(|s| (std::mem::take(&mut s.cands), spec.then_some(s.above)))
        .collect();
    finish(pool, chunks, t, quota, taken, Some(cands))
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
    cands: Option<Vec<(CandBuf, Option<u64>)>>,
) -> Cut {
    let mut per = vec![Vec::new(); pool.members.len()];
    let mut cands = cands.map(|k| k.into_iter());
    for (&(mi, c), q) in chunks.iter().zip(quota) {
        let (cands, fixup) = match cands.as_mut().and_then(|k| k.next()) {
            Some((k, f)) => (Some(k), f),
            None => (None, None),
        };
        per[mi].push(ChunkCut {
            chunk: c,
            quota: q,
            cands,
            fixup,
        });
    }
    Cut {
        t,
        chunks: per,
        taken,
    }
}

/// Thread-local hooks for tests, of this crate and (with the `test-hooks` feature) of the
/// prunec crate.
#[cfg(any(test, feature = "test-hooks"))]
pub(super) mod hooks {
    use std::cell::Cell;

    thread_local! {
        /// Replaces the sampled range of every pool (calling thread only).
        pub static FORCE_RANGE: Cell<Option<(u32, u32)>> = const { Cell::new(None) };
        /// Speculative scans run (calling thread only).
        pub static SPECULATED: Cell<usize> = const { Cell::new(0) };
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::cell::Cell;

    pub use super::hooks::{FORCE_RANGE, SPECULATED};

    use super::super::expr::score_key;
    use super::super::{
        full_mask, prune_jit_with, prune_reference, KExpr, KernelCache, KernelError, PruneOptions,
        Selection, TensorView,
    };

    thread_local! {
        /// Cuts resolved from a speculative scan's candidates (calling thread only).
        pub static FIXUPS: Cell<usize> = const { Cell::new(0) };
        /// Speculative scans of pools of four chunks or more run in two phases, the first
        /// on two chunks or more (calling thread only).
        pub static SPLIT_ALWAYS: Cell<bool> = const { Cell::new(false) };
        /// Rounds whose first phase narrowed the range (calling thread only).
        pub static NARROWED: Cell<usize> = const { Cell::new(0) };
        /// `prune` uses cranelift's scans only, not the AVX-512 ones (calling thread only).
        static NARROW: Cell<bool> = const { Cell::new(false) };
    }

    /// Runs `f` with each code generator for the scans: the AVX-512 one (where the host has
    /// it) and cranelift's.
    fn each_generator(mut f: impl FnMut()) {
        for narrow in [false, true] {
            NARROW.with(|n| n.set(narrow));
            f();
        }
        NARROW.with(|n| n.set(false));
    }

    #[derive(Clone)]
    struct T {
        rows: usize,
        cols: usize,
        w: Vec<f32>,
        mask: Vec<u64>,
    }

    /// Two tensors, 616K elements in all (enough for a sample), with holes in the masks and
    /// `levels` distinct magnitudes when non-zero (ties).
    fn data(seed: u64, levels: u32, row_scales: bool) -> Vec<T> {
        let mut next = crate::testing::xorshift64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        [(512usize, 640usize), (400, 720)]
            .iter()
            .map(|&(rows, cols)| {
                let n = rows * cols;
                let w = (0..n)
                    .map(|i| {
                        let r = next();
                        let u = (r >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                        // Rows of different scales, as in real layers.
                        let v = if row_scales {
                            u * (1.0 + (i / cols % 7) as f32)
                        } else {
                            u
                        };
                        if levels > 0 {
                            (v * levels as f32).round() / levels as f32
                        } else {
                            v
                        }
                    })
                    .collect();
                with_holes(rows, cols, w, 13)
            })
            .collect()
    }

    /// A tensor of weights `w` whose every `every`-th element is pruned.
    fn with_holes(rows: usize, cols: usize, w: Vec<f32>, every: usize) -> T {
        let mut mask = full_mask(w.len());
        for i in (0..w.len()).step_by(every) {
            mask[i / 64] &= !(1u64 << (i % 64));
        }
        T {
            rows,
            cols,
            w,
            mask,
        }
    }

    fn prune(ds: &mut [T], sel: &Selection, o: &PruneOptions, jit: bool) -> Result<String, String> {
        let mut views: Vec<TensorView> = ds
            .iter_mut()
            .enumerate()
            .map(|(i, t)| TensorView::new(&format!("t{i}"), t.rows, t.cols, &mut t.w, &mut t.mask))
            .collect();
        static NARROW_CACHE: std::sync::OnceLock<KernelCache> = std::sync::OnceLock::new();
        let cache = if NARROW.with(|n| n.get()) {
            NARROW_CACHE.get_or_init(KernelCache::narrow)
        } else {
            KernelCache::global()
        };
        let r = if jit {
            prune_jit_with(cache, &KExpr::magnitude(), sel, &mut views, o)
        } else {
            prune_reference(&KExpr::magnitude(), sel, &mut views, o)
        };
        r.map(|s| format!("{s:?}")).map_err(|e| e.to_string())
    }

    /// The alive keys of `ds` by magnitude, descending.
    fn keys(ds: &[T]) -> Vec<u32> {
        let mut k: Vec<u32> = ds
            .iter()
            .flat_map(|t| {
                (0..t.w.len())
                    .filter(|&i| (t.mask[i / 64] >> (i % 64)) & 1 == 1)
                    .map(|i| score_key(t.w[i].abs()))
            })
            .collect();
        k.sort_unstable_by(|a, b| b.cmp(a));
        k
    }

    fn single() -> PruneOptions {
        PruneOptions {
            single_pass: true,
            ..PruneOptions::default()
        }
    }

    /// Runs the single-pass JIT with `range` forced (or sampled) and checks it against the
    /// reference bit for bit; returns the number of speculative scans and of cuts resolved
    /// from their candidates.
    fn agrees(ds: &[T], sel: &Selection, range: Option<(u32, u32)>) -> (usize, usize) {
        let (mut a, mut b) = (ds.to_vec(), ds.to_vec());
        FORCE_RANGE.with(|f| f.set(range));
        SPECULATED.with(|c| c.set(0));
        FIXUPS.with(|c| c.set(0));
        let ra = prune(&mut a, sel, &single(), true);
        FORCE_RANGE.with(|f| f.set(None));
        let rb = prune(&mut b, sel, &single(), false);
        assert_eq!(ra, rb, "{sel:?} {range:x?}");
        for (x, y) in a.iter().zip(&b) {
            assert!(x.mask == y.mask, "{sel:?} {range:x?}");
            assert!(x
                .w
                .iter()
                .zip(&y.w)
                .all(|(p, q)| p.to_bits() == q.to_bits()));
        }
        (SPECULATED.with(|c| c.get()), FIXUPS.with(|c| c.get()))
    }

    fn global(keep: usize) -> Selection {
        Selection::Global {
            keep,
            min_keep: vec![],
            max_keep: vec![],
        }
    }

    #[test]
    fn speculative_scans_match_the_reference() {
        each_generator(speculative_scans_agree);
    }

    /// Eight tensors of one chunk each (2M elements), with holes in the masks; with
    /// `scaled`, rows of different scales in every other tensor; every other tensor `by`
    /// times larger.
    fn many(seed: u64, scaled: bool, by: f32) -> Vec<T> {
        let mut next = crate::testing::xorshift64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        (0..8)
            .map(|t| {
                let (rows, cols) = (256usize, 1024usize);
                let n = rows * cols;
                let w = (0..n)
                    .map(|i| {
                        let x = next();
                        let u = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                        let big = if t % 2 == 1 { by } else { 1.0 };
                        big * u * (1.0 + (scaled as usize * (t % 2) * (i / cols % 5)) as f32)
                    })
                    .collect();
                with_holes(rows, cols, w, 11)
            })
            .collect()
    }

    /// The sample's range is as narrow for a pool of tensors of different scales as for one
    /// of alike tensors (its deviation is taken within each tensor), so the first scan
    /// writes for both.
    #[test]
    fn tensors_of_different_scales_still_speculate() {
        for by in [1.0, 4.0] {
            let ds = many(9, false, by);
            let keep = keys(&ds).len() / 10;
            assert_eq!(agrees(&ds, &global(keep), None).0, 1, "{by}");
        }
    }

    /// Speculative scans in two phases: the first phase's chunks narrow the range for the
    /// others, whether it holds the cut (resolved from the candidates), lies under it (the
    /// search goes on upwards) or is too wide for the candidate buffers; bit for bit as the
    /// reference either way.
    #[test]
    fn two_phase_scans_match_the_reference() {
        SPLIT_ALWAYS.with(|s| s.set(true));
        each_generator(|| {
            // The first phase (two chunks of eight here) misjudges the cut when its chunks
            // are not like the others: the results are still exact.
            let ds = many(8, true, 1.0);
            let k = keys(&ds);
            for frac in [0.1, 0.5] {
                let keep = (k.len() as f64 * frac) as usize;
                let near = (k[keep - 1 + 12_000], k[keep - 1 - 6_000]);
                agrees(&ds, &global(keep), Some(near));
            }
            let ds = many(7, false, 1.0);
            let k = keys(&ds);
            for frac in [0.1, 0.5] {
                let keep = (k.len() as f64 * frac) as usize;
                NARROWED.with(|c| c.set(0));
                let near = (k[keep - 1 + 12_000], k[keep - 1 - 6_000]);
                assert_eq!(agrees(&ds, &global(keep), Some(near)), (1, 1), "{frac}");
                assert_eq!(NARROWED.with(|c| c.get()), 1, "{frac}");
                // Under the cut: everything zeroed was below it anyway.
                let low = (k[keep + 20_000], k[keep + 10_000]);
                assert_eq!(agrees(&ds, &global(keep), Some(low)), (1, 0));
                // Too wide for the buffers: the first phase does not narrow it.
                NARROWED.with(|c| c.set(0));
                let wide = (k[k.len() - 1].max(1), k[keep.saturating_sub(400_000)]);
                assert_eq!(agrees(&ds, &global(keep), Some(wide)), (1, 0));
                assert_eq!(NARROWED.with(|c| c.get()), 0, "{frac}");
            }
        });
        SPLIT_ALWAYS.with(|s| s.set(false));
    }

    fn speculative_scans_agree() {
        for (seed, levels, row_scales) in [(1, 0, false), (2, 0, true), (3, 40, false)] {
            let ds = data(seed, levels, row_scales);
            let k = keys(&ds);
            for frac in [0.1, 0.5, 0.93] {
                let keep = (k.len() as f64 * frac) as usize;
                // As sampled (a pool this small gets a sample too small for a range narrow
                // enough to write in the first scan).
                agrees(&ds, &global(keep), None);
                // A narrow range holding the cut, as a large sample gives: the scan writes,
                // and the cut resolves from its candidates (or ties, with few levels).
                let near = (k[keep - 1 + 1200], k[keep - 1 - 600]);
                let (spec, fix) = agrees(&ds, &global(keep), Some(near));
                assert_eq!((spec, fix), (1, usize::from(levels == 0)), "{seed} {frac}");
                // A range under the cut: the scan zeroed only elements below it, and the
                // search goes on upwards.
                let low = (k[keep + 2000], k[keep + 1000]);
                if low.1 < k[keep - 1] {
                    assert_eq!(agrees(&ds, &global(keep), Some(low)), (1, 0));
                }
                // A range too wide for the candidate buffers: the round narrows it.
                let wide = (k[k.len() - 1].max(1), k[keep.saturating_sub(200_000)]);
                assert_eq!(agrees(&ds, &global(keep), Some(wide)), (1, 0));
            }
            // Per-tensor cuts speculate per tensor, without a sample here (too small).
            let per = Selection::PerTensor {
                keep: vec![30_000, 100_000],
            };
            agrees(&ds, &per, None);
        }
    }

    #[test]
    fn a_range_above_the_cut_is_reported_and_two_passes_recover() {
        let ds = data(4, 0, true);
        let k = keys(&ds);
        let keep = k.len() / 2;
        // The cut lies below the forced range: elements it keeps were zeroed.
        let high = (k[keep - 5000], k[keep - 6000]);
        let mut a = ds.to_vec();
        FORCE_RANGE.with(|f| f.set(Some(high)));
        let r = prune(&mut a, &global(keep), &single(), true);
        let plain = prune(
            &mut ds.to_vec(),
            &global(keep),
            &PruneOptions::default(),
            true,
        );
        FORCE_RANGE.with(|f| f.set(None));
        assert_eq!(
            r,
            Err(KernelError::SampleMissed {
                tensor: "t0".into()
            }
            .to_string())
        );
        // Without single_pass a wrong range only costs rounds.
        assert_eq!(
            plain,
            prune(&mut ds.to_vec(), &global(keep), &single(), false)
        );
    }

    #[test]
    fn non_finite_weights_stop_the_writing_scan_where_they_are() {
        each_generator(non_finite_weights_stop_the_writing_scan);
    }

    fn non_finite_weights_stop_the_writing_scan() {
        let mut ds = data(5, 0, true);
        ds[1].w[70_001] = f32::NAN;
        ds[0].w[200_000] = f32::INFINITY;
        let keep = keys(&ds).len() / 10;
        let mut a = ds.to_vec();
        SPECULATED.with(|c| c.set(0));
        let r = prune(&mut a, &global(keep), &single(), true);
        let want = prune(&mut ds.to_vec(), &global(keep), &single(), false);
        assert!(want.is_err());
        assert_eq!(r, want);
        // They were not written.
        assert_eq!(a[0].w[200_000], f32::INFINITY);
        assert!(a[1].w[70_001].is_nan());
        // With allow_nonfinite they rank lowest and the single pass matches the reference.
        let o = PruneOptions {
            allow_nonfinite: true,
            ..single()
        };
        let mut a = ds.to_vec();
        let mut b = ds.to_vec();
        assert_eq!(
            prune(&mut a, &global(keep), &o, true),
            prune(&mut b, &global(keep), &o, false)
        );
        for (x, y) in a.iter().zip(&b) {
            assert!(x.mask == y.mask);
            assert!(x
                .w
                .iter()
                .zip(&y.w)
                .all(|(p, q)| p.to_bits() == q.to_bits()));
        }
    }

    #[test]
    fn guarded_pools_do_not_speculate() {
        let ds = data(6, 0, false);
        let n = keys(&ds).len();
        let sel = Selection::Global {
            keep: n / 10,
            min_keep: vec![40_000, 0],
            max_keep: vec![],
        };
        let k = keys(&ds);
        let near = (k[n / 10 + 1200], k[n / 10 - 600]);
        assert_eq!(agrees(&ds, &sel, Some(near)), (0, 0));
    }

    /// A sample group's keys are the alive scores of its runs, in order, counted per run and
    /// in the histogram: runs over whole alive words, over words with holes, and one cut
    /// short by the tensor's end.
    #[test]
    fn sample_groups_hold_the_alive_keys() {
        let n = 3 * 1000;
        let w: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let mut full = T {
            rows: 3,
            cols: 1000,
            w: w.clone(),
            mask: full_mask(n),
        };
        let mut holes = with_holes(3, 1000, w, 3);
        let k = KernelCache::global().get(&KExpr::magnitude()).unwrap();
        let scalars = std::sync::Arc::new(Vec::new());
        let mut views: Vec<TensorView> = [&mut full, &mut holes]
            .into_iter()
            .map(|t| TensorView::new("t", t.rows, t.cols, &mut t.w, &mut t.mask))
            .collect();
        let raws: Vec<super::RawTensor> = views
            .iter_mut()
            .map(|v| super::RawTensor::new(v, scalars.clone()))
            .collect();
        let runs: Vec<super::Chunk> = [(0, 0), (1, 64), (0, 2816), (1, 2816), (0, 1024), (1, 0)]
            .iter()
            .map(|&(tensor, start)| super::Chunk {
                tensor,
                start,
                end: (start + super::SAMPLE_RUN).min(n),
            })
            .collect();
        let mut out = vec![0u32; runs.len() * super::SAMPLE_RUN];
        let g = super::sample_group(&k, &raws, &runs, &mut out);
        let mut want = Vec::new();
        let mut lens = Vec::new();
        for c in &runs {
            let t = if c.tensor == 0 { &full } else { &holes };
            let before = want.len();
            for i in c.start..c.end {
                if (t.mask[i / 64] >> (i % 64)) & 1 == 1 {
                    want.push(score_key(t.w[i].abs()));
                }
            }
            lens.push((want.len() - before) as u16);
        }
        assert_eq!(&out[..g.keys], &want[..]);
        assert_eq!(g.lens, lens);
        let mut hist = vec![0u32; super::Ranks::BUCKETS];
        for &key in &want {
            hist[super::Ranks::bucket(key)] += 1;
        }
        assert_eq!(g.hist, hist);
    }

    #[test]
    fn ranks_match_a_sort() {
        let mut next = crate::testing::xorshift64(0x2545_f491_4f6c_dd1d);
        let sets: Vec<Vec<u32>> = vec![
            (0..5000).map(|_| next() as u32).collect(),
            // Few distinct keys (ties), many in one 12-bit bucket, and the extremes.
            (0..5000)
                .map(|_| match next() % 5 {
                    0 => 0,
                    1 => u32::MAX,
                    2 => 0x3f80_0000 + (next() % 3) as u32,
                    _ => 0x3f80_0000 | ((next() % 4) as u32) << 16,
                })
                .collect(),
            vec![7; 300],
            vec![42; 11],
        ];
        for keys in sets {
            let mut ranks = super::Ranks::new(&[&keys[..10], &keys[10..]]);
            let mut sorted = keys.clone();
            sorted.sort_unstable_by(|a, b| b.cmp(a));
            for r in (0..keys.len()).step_by(37).chain([0, keys.len() - 1]) {
                assert_eq!(
                    ranks.key_at(&[&keys[..10], &keys[10..]], r),
                    sorted[r],
                    "rank {r}"
                );
            }
        }
    }
}
