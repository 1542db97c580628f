//! Selection and masking over score buffers, 64 elements (one mask word) at a time.
//!
//! The JIT writes a block of scores into a small buffer (`score_raw`); these routines then
//! compare the buffer against a key range and mask the weights. Key tests are done in the
//! float domain: for a score `s` that is not NaN, `score_key(s) >= k` is `s >= f` for the
//! float `f` of the smallest key at or above `k` that a score can have, and `score_key(s)
//! <= k` is `s <= f` for the largest such key at or below `k`; NaN (key 0) is handled by
//! the choice of ordered or unordered comparison. `-0.0 == +0.0` in float comparisons,
//! exactly as the two zeros share a key. The results are the same bits whichever
//! instruction set runs: AVX-512, AVX2 or the scalar code, which computes keys directly
//! and is the specification.

use std::sync::atomic::{AtomicU8, Ordering};

use super::expr::{key_score, score_key};

/// The key of `-inf`: keys `1..NEG_INF_KEY` belong to no score.
const NEG_INF_KEY: u32 = 0x007f_ffff;
/// The key of `+inf`: keys above it belong to no score.
const POS_INF_KEY: u32 = 0xff80_0000;
/// The key `-0.0` would have; `-0.0` takes the key of `+0.0`.
const NEG_ZERO_KEY: u32 = 0x7fff_ffff;

/// The smallest key `>= k` that some score has (0, NaN's key, counts), if any.
fn up(k: u32) -> Option<u32> {
    match k {
        0 => Some(0),
        1..=NEG_INF_KEY => Some(NEG_INF_KEY),
        NEG_ZERO_KEY => Some(NEG_ZERO_KEY + 1),
        k if k <= POS_INF_KEY => Some(k),
        _ => None,
    }
}

/// The largest key `<= k` that some score has.
fn down(k: u32) -> u32 {
    match k {
        0..NEG_INF_KEY => 0,
        NEG_ZERO_KEY => NEG_ZERO_KEY - 1,
        k if k >= POS_INF_KEY => POS_INF_KEY,
        k => k,
    }
}

/// How the in-range test is done.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// `lo_f <= s <= hi_f` (ordered below, so NaN is out).
    Range,
    /// `!(s > hi_f)`: every key from 0 (NaN) up.
    FromNan,
    /// NaN only.
    NanOnly,
}

/// Float-domain form of the tests `key > hi` and `lo <= key <= hi`.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// `key > hi` is `s >= gt` (ordered; NaN `gt` makes it always false).
    gt: f32,
    lo: f32,
    hi: f32,
    mode: Mode,
}

impl Bounds {
    pub fn new(lo: u32, hi: u32) -> Self {
        let gt = match hi.checked_add(1).and_then(up) {
            Some(k) => key_score(k),
            None => f32::NAN,
        };
        let d = down(hi);
        if lo == 0 {
            if d == 0 {
                return Bounds {
                    gt,
                    lo: f32::NAN,
                    hi: f32::NAN,
                    mode: Mode::NanOnly,
                };
            }
            return Bounds {
                gt,
                lo: f32::NAN,
                hi: key_score(d),
                mode: Mode::FromNan,
            };
        }
        match up(lo) {
            Some(u) if d != 0 && u <= d => Bounds {
                gt,
                lo: key_score(u),
                hi: key_score(d),
                mode: Mode::Range,
            },
            // No score has a key in the range: `s >= NaN` is never true.
            _ => Bounds {
                gt,
                lo: f32::NAN,
                hi: 0.0,
                mode: Mode::Range,
            },
        }
    }
}

/// The float form of `key >= lo` for `lo >= 1`: `s >= ge_bound(lo)` (ordered; NaN, key 0,
/// is below). `None` for `lo == 0`, which every key reaches.
pub fn ge_bound(lo: u32) -> Option<f32> {
    if lo == 0 {
        return None;
    }
    Some(up(lo).map_or(f32::NAN, key_score))
}

/// The float form of `key > hi`: `s >= gt_bound(hi)` (ordered; NaN means never).
pub fn gt_bound(hi: u32) -> f32 {
    Bounds::new(0, hi).gt
}

const ISA_UNKNOWN: u8 = 0;
const ISA_SCALAR: u8 = 1;
const ISA_AVX2: u8 = 2;
const ISA_AVX512: u8 = 3;

static ISA: AtomicU8 = AtomicU8::new(ISA_UNKNOWN);

fn detect() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::env::var_os("PRUNEC_KERNEL_SCALAR").is_some() {
            return ISA_SCALAR;
        }
        // The vector paths count with POPCNT too (every AVX2 or AVX-512 CPU has it).
        let popcnt = is_x86_feature_detected!("popcnt");
        if is_x86_feature_detected!("avx512f")
            && popcnt
            && std::env::var_os("PRUNEC_KERNEL_AVX2").is_none()
        {
            return ISA_AVX512;
        }
        if is_x86_feature_detected!("avx2") && popcnt {
            return ISA_AVX2;
        }
    }
    ISA_SCALAR
}

fn isa() -> u8 {
    match ISA.load(Ordering::Relaxed) {
        ISA_UNKNOWN => {
            let i = detect();
            ISA.store(i, Ordering::Relaxed);
            i
        }
        i => i,
    }
}

/// Which code the routines run: `"avx512"`, `"avx2"` or `"scalar"`.
pub fn isa_name() -> &'static str {
    match isa() {
        ISA_AVX512 => "avx512",
        ISA_AVX2 => "avx2",
        _ => "scalar",
    }
}

/// Forces the scalar code (`true`) or goes back to the best the CPU has (`false`). Results
/// are identical either way; tests use it to exercise both.
pub fn force_scalar(on: bool) {
    ISA.store(if on { ISA_SCALAR } else { detect() }, Ordering::Relaxed);
}

/// [`score_key`] without branches (for candidate loops).
#[inline(always)]
pub fn key_of(s: f32) -> u32 {
    let b = (s + 0.0).to_bits();
    let k = b ^ ((((b as i32) >> 31) as u32) | 0x8000_0000);
    if s.is_nan() {
        0
    } else {
        k
    }
}

/// The scalar tests of one (possibly partial) word: `(key > hi, lo <= key <= hi)` bits.
fn classify_scalar(s: &[f32], lo: u32, hi: u32) -> (u64, u64) {
    let (mut gt, mut inr) = (0u64, 0u64);
    for (j, &x) in s.iter().enumerate() {
        let k = score_key(x);
        gt |= ((k > hi) as u64) << j;
        inr |= ((lo <= k && k <= hi) as u64) << j;
    }
    (gt, inr)
}

fn zero_scalar(w: &mut [f32], keep: u64) {
    for (j, x) in w.iter_mut().enumerate() {
        if (keep >> j) & 1 == 0 {
            *x = 0.0;
        }
    }
}

/// Word-level operations of one instruction set.
trait Ops {
    /// `(key > hi, lo <= key <= hi)` bits of the 64 scores at `p`.
    ///
    /// # Safety
    /// `p` points at 64 readable scores.
    unsafe fn classify(&self, p: *const f32) -> (u64, u64);
    /// Zeroes (`+0.0`) the 64 weights at `p` whose keep bit is clear.
    ///
    /// # Safety
    /// `p` points at 64 writable weights.
    unsafe fn zero(&self, p: *mut f32, keep: u64);
    /// Starts loading the 64 weights at `p` into the cache.
    ///
    /// # Safety
    /// None needed: a prefetch never faults; `p` should be inside the caller's buffer.
    unsafe fn prefetch(&self, p: *const f32);
}

struct Scalar {
    lo: u32,
    hi: u32,
}

impl Ops for Scalar {
    unsafe fn classify(&self, p: *const f32) -> (u64, u64) {
        // SAFETY: guaranteed by the caller.
        classify_scalar(
            unsafe { std::slice::from_raw_parts(p, 64) },
            self.lo,
            self.hi,
        )
    }
    unsafe fn zero(&self, p: *mut f32, keep: u64) {
        // SAFETY: guaranteed by the caller.
        zero_scalar(unsafe { std::slice::from_raw_parts_mut(p, 64) }, keep)
    }
    unsafe fn prefetch(&self, _: *const f32) {}
}

/// Counts the alive elements of the full words of `s` with key `> hi`, and calls
/// `on_in(word, bits)` for each word with alive elements inside `[lo, hi]`.
///
/// # Safety
/// `s` holds `full` words, `mask` at least `full`.
#[inline(always)]
unsafe fn count_core<O: Ops>(
    o: &O,
    s: &[f32],
    mask: &[u64],
    full: usize,
    ahead: &[f32],
    above_out: &mut [u64],
    on_in: &mut impl FnMut(usize, u64),
) -> usize {
    let mut above = 0usize;
    let write = !above_out.is_empty();
    for wi in 0..full {
        if 64 * wi + 64 <= ahead.len() {
            // SAFETY: inside `ahead`.
            unsafe { o.prefetch(ahead.as_ptr().add(64 * wi)) };
        }
        // SAFETY: word `wi < full` of `s`.
        let (g, i) = unsafe { o.classify(s.as_ptr().add(64 * wi)) };
        let a = mask[wi];
        if write {
            above_out[wi] = g & a;
        }
        above += (g & a).count_ones() as usize;
        let m = i & a;
        if m != 0 {
            on_in(wi, m);
        }
    }
    above
}

/// The full words of [`count_zero_words`].
///
/// # Safety
/// `s` and `w` hold `full` words, `mask` at least `full`.
// The word index also addresses `s`, `w` and `ahead` through pointers.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn count_zero_core<O: Ops>(
    o: &O,
    s: &[f32],
    w: &mut [f32],
    mask: &mut [u64],
    full: usize,
    ahead: &[f32],
    on_in: &mut impl FnMut(usize, u64),
) -> usize {
    let mut above = 0usize;
    for wi in 0..full {
        if 64 * wi + 64 <= ahead.len() {
            // SAFETY: inside `ahead`.
            unsafe { o.prefetch(ahead.as_ptr().add(64 * wi)) };
        }
        // SAFETY: word `wi < full` of `s`.
        let (g, i) = unsafe { o.classify(s.as_ptr().add(64 * wi)) };
        let a = mask[wi];
        above += (g & a).count_ones() as usize;
        let m = i & a;
        if m != 0 {
            on_in(wi, m);
        }
        let keep = (g | i) & a;
        mask[wi] = keep;
        if keep != u64::MAX {
            // SAFETY: word `wi < full` of `w`.
            unsafe { o.zero(w.as_mut_ptr().add(64 * wi), keep) };
        }
    }
    above
}

/// The masking of the full words of a block; see [`apply_words`].
///
/// # Safety
/// `s` and `w` hold `full` words, `mask` at least `full`.
// The word index also addresses `s`, `w` and `ahead` through pointers.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn apply_core<O: Ops>(
    o: &O,
    s: &[f32],
    w: &mut [f32],
    mask: &mut [u64],
    full: usize,
    quota: &mut u64,
    ahead: &[f32],
) -> usize {
    let mut kept = 0usize;
    let mut q = *quota;
    for wi in 0..full {
        if 64 * wi + 64 <= ahead.len() {
            // SAFETY: inside `ahead`.
            unsafe { o.prefetch(ahead.as_ptr().add(64 * wi)) };
        }
        // SAFETY: word `wi < full` of `s`.
        let (g, e) = unsafe { o.classify(s.as_ptr().add(64 * wi)) };
        let a = mask[wi];
        let mut keep = g & a;
        if q > 0 {
            let mut ties = e & a;
            while q > 0 && ties != 0 {
                keep |= ties & ties.wrapping_neg();
                ties &= ties - 1;
                q -= 1;
            }
        }
        mask[wi] = keep;
        kept += keep.count_ones() as usize;
        if keep != u64::MAX {
            // SAFETY: word `wi < full` of `w`.
            unsafe { o.zero(w.as_mut_ptr().add(64 * wi), keep) };
        }
    }
    *quota = q;
    kept
}

/// Counts the alive elements of `s` (scores; alive bits in `mask`, `ceil(len / 64)` words,
/// bits past the end ignored) whose key is `> hi`, and calls `on_in(word, bits)` for every
/// word with alive elements whose key lies in `[lo, hi]` (bit `j` = element `64 word + j`).
///
/// `ahead` is the memory the caller reads next (the next block's weights, or empty): it is
/// prefetched word by word while this buffer, already in cache, is compared, so memory
/// keeps streaming during the in-cache work. Unless `above_out` is empty (it then has as
/// many words as `mask`), the bits of the counted elements are written to it.
pub fn count_words(
    s: &[f32],
    mask: &[u64],
    lo: u32,
    hi: u32,
    ahead: &[f32],
    above_out: &mut [u64],
    mut on_in: impl FnMut(usize, u64),
) -> usize {
    assert_eq!(mask.len(), s.len().div_ceil(64));
    assert!(above_out.is_empty() || above_out.len() == mask.len());
    let full = s.len() / 64;
    let b = Bounds::new(lo, hi);
    let mut above = match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F and POPCNT (checked by `detect`); `s` holds `full`
        // words and `mask` more.
        ISA_AVX512 => unsafe { x86::count512(&b, s, mask, full, ahead, above_out, &mut on_in) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 and POPCNT (checked by `detect`); as above.
        ISA_AVX2 => unsafe { x86::count256(&b, s, mask, full, ahead, above_out, &mut on_in) },
        // SAFETY: as above.
        _ => unsafe {
            count_core(
                &Scalar { lo, hi },
                s,
                mask,
                full,
                ahead,
                above_out,
                &mut on_in,
            )
        },
    };
    if let Some((g, i)) = tail_word(s, mask, full, lo, hi) {
        above += g.count_ones() as usize;
        if !above_out.is_empty() {
            above_out[full] = g;
        }
        if i != 0 {
            on_in(full, i);
        }
    }
    above
}

/// The partial word after `full` whole words of `s`, if any: its alive elements above the
/// range and inside it.
fn tail_word(s: &[f32], mask: &[u64], full: usize, lo: u32, hi: u32) -> Option<(u64, u64)> {
    (full * 64 < s.len()).then(|| {
        let (g, i) = classify_scalar(&s[full * 64..], lo, hi);
        let a = mask[full] & ((1u64 << (s.len() % 64)) - 1);
        (g & a, i & a)
    })
}

/// [`count_words`] that also masks the block in the same loop: the alive elements below
/// `lo` are zeroed (`+0.0`, as are already-pruned ones) and their mask bits cleared, so the
/// mask keeps the alive elements in and above the range. `s` holds the scores of `w`.
/// Returns the number above the range.
pub fn count_zero_words(
    s: &[f32],
    w: &mut [f32],
    mask: &mut [u64],
    lo: u32,
    hi: u32,
    ahead: &[f32],
    mut on_in: impl FnMut(usize, u64),
) -> usize {
    assert_eq!(s.len(), w.len());
    assert_eq!(mask.len(), s.len().div_ceil(64));
    let full = s.len() / 64;
    let b = Bounds::new(lo, hi);
    let mut above = match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F and POPCNT are present; `s` and `w` hold `full` words.
        ISA_AVX512 => unsafe { x86::count_zero512(&b, s, w, mask, full, ahead, &mut on_in) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and POPCNT are present; as above.
        ISA_AVX2 => unsafe { x86::count_zero256(&b, s, w, mask, full, ahead, &mut on_in) },
        // SAFETY: as above.
        _ => unsafe { count_zero_core(&Scalar { lo, hi }, s, w, mask, full, ahead, &mut on_in) },
    };
    if let Some((g, i)) = tail_word(s, mask, full, lo, hi) {
        above += g.count_ones() as usize;
        if i != 0 {
            on_in(full, i);
        }
        mask[full] = g | i;
        zero_scalar(&mut w[full * 64..], g | i);
    }
    above
}

/// Masks one block: keeps alive elements with key `> t`, then the first `quota` alive ones
/// with key `== t` (in index order; `quota` is decremented), zeroes (`+0.0`) every other
/// weight and writes the new mask words. `s` holds the scores of `w`; `mask` has
/// `ceil(len / 64)` words, the bits after the last element are cleared. Returns the number
/// kept. `ahead` is prefetched as in [`count_words`].
pub fn apply_words(
    s: &[f32],
    w: &mut [f32],
    mask: &mut [u64],
    t: u32,
    quota: &mut u64,
    ahead: &[f32],
) -> usize {
    assert_eq!(s.len(), w.len());
    assert_eq!(mask.len(), s.len().div_ceil(64));
    let n = s.len();
    let full = n / 64;
    let b = Bounds::new(t, t);
    let mut kept = match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F and POPCNT are present; `s` and `w` hold `full` words.
        ISA_AVX512 => unsafe { x86::apply512(&b, s, w, mask, full, quota, ahead) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and POPCNT are present; as above.
        ISA_AVX2 => unsafe { x86::apply256(&b, s, w, mask, full, quota, ahead) },
        // SAFETY: as above.
        _ => unsafe { apply_core(&Scalar { lo: t, hi: t }, s, w, mask, full, quota, ahead) },
    };
    if full * 64 < n {
        let (g, e) = classify_scalar(&s[full * 64..], t, t);
        let a = mask[full] & ((1u64 << (n % 64)) - 1);
        let mut keep = g & a;
        let mut ties = e & a;
        while *quota > 0 && ties != 0 {
            keep |= ties & ties.wrapping_neg();
            ties &= ties - 1;
            *quota -= 1;
        }
        mask[full] = keep;
        kept += keep.count_ones() as usize;
        zero_scalar(&mut w[full * 64..], keep);
    }
    kept
}

/// Masks `w` by precomputed keep bits: writes `mask[i] = keep[i]` (bits after the last
/// element cleared) and zeroes (`+0.0`) every weight whose bit is clear. Returns the number
/// kept. The keep bits must already exclude pruned elements.
pub fn zero_words(w: &mut [f32], keep: &[u64], mask: &mut [u64]) -> usize {
    let n = w.len();
    assert_eq!(keep.len(), n.div_ceil(64));
    assert_eq!(mask.len(), keep.len());
    let full = n / 64;
    let mut kept = match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F and POPCNT are present; `w` holds `full` words.
        ISA_AVX512 => unsafe { x86::zero512(w, keep, mask, full) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and POPCNT are present; as above.
        ISA_AVX2 => unsafe { x86::zero256(w, keep, mask, full) },
        // SAFETY: as above.
        _ => unsafe { zero_core(&Scalar { lo: 0, hi: 0 }, w, keep, mask, full) },
    };
    if full * 64 < n {
        let k = keep[full] & ((1u64 << (n % 64)) - 1);
        mask[full] = k;
        kept += k.count_ones() as usize;
        zero_scalar(&mut w[full * 64..], k);
    }
    kept
}

/// The full words of [`zero_words`].
///
/// # Safety
/// `w` holds `full` words, `keep` and `mask` at least `full`.
#[inline(always)]
unsafe fn zero_core<O: Ops>(
    o: &O,
    w: &mut [f32],
    keep: &[u64],
    mask: &mut [u64],
    full: usize,
) -> usize {
    let mut kept = 0usize;
    for wi in 0..full {
        let k = keep[wi];
        mask[wi] = k;
        kept += k.count_ones() as usize;
        if k != u64::MAX {
            // SAFETY: word `wi < full` of `w`.
            unsafe { o.zero(w.as_mut_ptr().add(64 * wi), k) };
        }
    }
    kept
}

/// The number of set bits in `words` (one thread), with POPCNT where the CPU has it.
pub fn popcount(words: &[u64]) -> usize {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has POPCNT when it has AVX2 or AVX-512.
        ISA_AVX512 | ISA_AVX2 => unsafe { x86::count_bits_popcnt(words) },
        _ => words.iter().map(|x| x.count_ones() as usize).sum(),
    }
}

/// The number of set bits in `words`, in parallel pieces, with the POPCNT instruction where
/// the CPU has it.
pub fn count_bits(words: &[u64]) -> usize {
    use rayon::prelude::*;
    words
        .par_chunks(1 << 16)
        .map(|w| match isa() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has POPCNT when it has AVX2 or AVX-512.
            ISA_AVX512 | ISA_AVX2 => unsafe { x86::count_bits_popcnt(w) },
            _ => w.iter().map(|x| x.count_ones() as usize).sum(),
        })
        .sum()
}

/// Starts loading the cache line at `p` (a hint: never faults, does nothing off x86-64).
#[inline(always)]
pub fn prefetch(p: *const u8) {
    prefetch_into::<false>(p)
}

/// [`prefetch`] into the second-level cache only (`prefetcht1`), as the AVX-512 scans do.
#[inline(always)]
pub fn prefetch_l2(p: *const u8) {
    prefetch_into::<true>(p)
}

#[inline(always)]
fn prefetch_into<const L2: bool>(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults, whatever the address.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
        if L2 {
            _mm_prefetch::<_MM_HINT_T1>(p as *const i8)
        } else {
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// A row's cut among its candidates' scores (`scores`, in offset order, none NaN): of the
/// `need` highest by key ([`key_of`]; `-0.0` and `+0.0` tie), the earlier of equal keys
/// first (`1 <= need <= scores.len()`), returns the smallest key and sets bit `i % 64` of
/// word `i / 64` of `kept` for each (`kept` is resized to `scores.len() / 64 + 2` words,
/// the last always zero, see [`merge_kept`]). Without NaN, scores compare as floats in the
/// order of their keys, so the vector code compares the scores themselves, against the
/// floats that bound keys ([`ge_bound`], [`gt_bound`]); the key is found by narrowing the
/// keys' range with counts ([`narrow_cut`]), which vectorise, rather than by partitioning.
pub fn top_scores(scores: &[f32], need: usize, kept: &mut Vec<u64>) -> u32 {
    assert!(need >= 1 && need <= scores.len());
    debug_assert!(!scores.iter().any(|s| s.is_nan()));
    kept.clear();
    kept.resize(scores.len() / 64 + 2, 0);
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F (and POPCNT with it).
        ISA_AVX512 => unsafe { x86::top_scores512(scores, need, kept) },
        _ => {
            let keys: Vec<u32> = scores.iter().map(|&s| key_of(s)).collect();
            top_keys_scalar(&keys, need, kept)
        }
    }
}

/// [`top_scores`] on the scores' keys, in plain Rust (`kept` already zeroed and sized).
fn top_keys_scalar(keys: &[u32], need: usize, kept: &mut [u64]) -> u32 {
    let (lo, hi) = keys
        .iter()
        .fold((u32::MAX, 0), |(a, b), &k| (a.min(k), b.max(k)));
    let count = |x: u32| keys.iter().filter(|&&k| k >= x).count();
    let (lo, hi, above) = narrow_cut(keys.len(), need, lo, hi, |a, b| (count(a), count(b)));
    let t = if lo == hi {
        lo
    } else {
        // The `need - above`-th largest of the few keys inside `[lo, hi]`.
        let mut few: Vec<u32> = keys
            .iter()
            .copied()
            .filter(|&k| k >= lo && k <= hi)
            .collect();
        few.sort_unstable_by(|a, b| b.cmp(a));
        few[need - above - 1]
    };
    let mut ties = need;
    for (i, &k) in keys.iter().enumerate() {
        kept[i / 64] |= u64::from(k > t) << (i % 64);
        ties -= usize::from(k > t);
    }
    for (i, &k) in keys.iter().enumerate() {
        if ties == 0 {
            break;
        }
        if k == t {
            kept[i / 64] |= 1 << (i % 64);
            ties -= 1;
        }
    }
    t
}

/// At most this many keys are left inside the range [`narrow_cut`] returns (unless they are
/// all equal).
const FEW: usize = 16;

/// Narrows the range `[lo, hi]` holding all `n` keys to one holding the `need`-th largest
/// key (`1 <= need <= n`): returns `(lo, hi, above)` with `above` keys above `hi`, and
/// either `lo == hi` or at most [`FEW`] keys inside. `count_ge2(a, b)`, `a <= b`, counts
/// the keys at or above `a` and at or above `b` in one pass. A row's candidates are spread
/// about evenly across their bracket, so each pass counts at two keys interpolated either
/// side of where the `need`-th would be if they were, about one standard deviation of that
/// guess apart (172 candidates: 7 ranks either side): the cut usually falls between them and
/// the next pass finishes. The fourth and later passes bisect instead, so that keys spread
/// unevenly cost a bounded number of passes.
#[inline(always)]
fn narrow_cut(
    n: usize,
    need: usize,
    mut lo: u32,
    mut hi: u32,
    count_ge2: impl Fn(u32, u32) -> (usize, usize),
) -> (u32, u32, usize) {
    // Keys at or above `lo`, and above `hi`: `c_lo >= need > c_hi`.
    let (mut c_lo, mut c_hi) = (n, 0usize);
    let mut pass = 0u32;
    while lo < hi && c_lo - c_hi > FEW {
        let (m, span) = ((c_lo - c_hi) as u64, (hi - lo) as u64);
        let (a, b) = if pass < 3 {
            // Where `r` of the keys inside would be at or above, if evenly spread.
            let at = |r: u64| (hi as u64 - span * r.min(m) / m) as u32;
            let (r, d) = ((need - c_hi) as u64, (m as f64).sqrt() as u64 / 2 + 1);
            (at(r + d), at(r.saturating_sub(d)))
        } else {
            let mid = lo + (hi - lo).div_ceil(2);
            (mid, mid)
        };
        pass += 1;
        // Points inside `(lo, hi]`, so that each count narrows the range.
        let a = a.clamp(lo + 1, hi);
        let b = b.clamp(a, hi);
        let (ca, cb) = count_ge2(a, b);
        for (x, c) in [(a, ca), (b, cb)] {
            if x > lo && x <= hi {
                if c >= need {
                    (lo, c_lo) = (x, c);
                } else {
                    (hi, c_hi) = (x - 1, c);
                }
            }
        }
    }
    (lo, hi, c_hi)
}

/// A row's new mask words: `side[w] = above[w]` plus those of the elements in `inside[w]`
/// (the candidates, in order: the `i`-th set bit of `inside` is candidate `i`) whose bit
/// in `kept` is set ([`top_scores`]' flags, with a zero word after the last candidate's).
pub fn merge_kept(side: &mut [u64], above: &[u64], inside: &[u64], kept: &[u64]) {
    assert!(side.len() == above.len() && side.len() == inside.len());
    // Checked in debug builds only: it would count the row's candidates again per row, and
    // the indexing below is bounds-checked anyway.
    debug_assert!(kept.len() > popcount(inside) / 64 + 1);
    #[cfg(target_arch = "x86_64")]
    if isa() != ISA_SCALAR && is_x86_feature_detected!("bmi2") {
        // SAFETY: the CPU has BMI2 and POPCNT (checked with the vector paths); the function
        // indexes its slices with bounds checks.
        unsafe { x86::merge_kept_pdep(side, above, inside, kept) };
        return;
    }
    merge_kept_scalar(side, above, inside, kept);
}

/// [`merge_kept`] and [`zero_words`] in one pass over a row of whole words: each word's
/// keep bits are `above[w]` plus those of its candidates whose flag in `kept` is set; they
/// become the mask word, and the weights whose bit is clear are zeroed. Returns the kept
/// count.
pub fn zero_merged(
    w: &mut [f32],
    mask: &mut [u64],
    above: &[u64],
    inside: &[u64],
    kept: &[u64],
) -> usize {
    let words = mask.len();
    assert!(w.len() == 64 * words && above.len() == words && inside.len() == words);
    debug_assert!(kept.len() > popcount(inside) / 64 + 1);
    #[cfg(target_arch = "x86_64")]
    if isa() == ISA_AVX512 && is_x86_feature_detected!("bmi2") {
        // SAFETY: the CPU has AVX-512F, BMI2 and POPCNT; `w` holds a word of weights per
        // mask word, and `kept` is indexed with bounds checks.
        return unsafe { x86::zero_merged512(w, mask, above, inside, kept) };
    }
    let mut i = 0usize;
    let mut n = 0;
    for (wi, (mw, (&a, &m))) in mask.iter_mut().zip(above.iter().zip(inside)).enumerate() {
        let k = merged_word(a, m, kept, &mut i);
        n += zero_words(
            &mut w[64 * wi..64 * wi + 64],
            &[k],
            std::slice::from_mut(mw),
        );
    }
    n
}

/// [`merge_kept`] in plain Rust, bit by bit.
fn merge_kept_scalar(side: &mut [u64], above: &[u64], inside: &[u64], kept: &[u64]) {
    let mut i = 0usize;
    for ((s, &a), &m) in side.iter_mut().zip(above).zip(inside) {
        *s = merged_word(a, m, kept, &mut i);
    }
}

/// One word of [`merge_kept`], bit by bit: `above` plus the candidates of `inside` whose
/// flag in `kept` is set, the word's first candidate being candidate `*i` (moved past the
/// word's).
#[inline(always)]
fn merged_word(above: u64, inside: u64, kept: &[u64], i: &mut usize) -> u64 {
    let (mut w, mut b) = (above, inside);
    while b != 0 {
        if (kept[*i / 64] >> (*i % 64)) & 1 == 1 {
            w |= b & b.wrapping_neg();
        }
        b &= b - 1;
        *i += 1;
    }
    w
}

/// Appends the keys of `keys` inside `[lo, hi]` to `out`, in order.
pub fn keys_between(keys: &[u32], lo: u32, hi: u32, out: &mut Vec<u32>) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F.
        ISA_AVX512 => unsafe { x86::keys_between512(keys, lo, hi, out) },
        _ => out.extend(keys.iter().filter(|&&k| k >= lo && k <= hi)),
    }
}

/// Whether any of `w` is NaN or infinite (alive or not).
pub fn any_nonfinite(w: &[f32]) -> bool {
    let m = match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F.
        ISA_AVX512 => unsafe { x86::max_bits512(w) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2.
        ISA_AVX2 => unsafe { x86::max_bits256(w) },
        _ => max_bits(w),
    };
    m >= 0x7f80_0000
}

/// The integer maximum of the magnitudes' bits: at least the bits of `+inf` iff some value
/// is non-finite.
#[inline(always)]
fn max_bits(w: &[f32]) -> u32 {
    w.iter().fold(0u32, |m, x| m.max(x.to_bits() & 0x7fff_ffff))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{apply_core, count_core, count_zero_core, zero_core, Bounds, Mode, Ops};

    /// [`super::top_scores`] with 16 scores per compare (the last group masked).
    #[target_feature(enable = "avx512f,popcnt")]
    pub unsafe fn top_scores512(s: &[f32], need: usize, kept: &mut [u64]) -> u32 {
        let n = s.len();
        let groups = n.div_ceil(16);
        let lanes = |g: usize| -> u16 {
            let rem = n - 16 * g;
            if rem >= 16 {
                u16::MAX
            } else {
                (1u16 << rem) - 1
            }
        };
        // SAFETY: group `g < groups` holds `lanes(g)` scores from `16 g`; the masked load
        // reads no others.
        let load = |g: usize| unsafe { _mm512_maskz_loadu_ps(lanes(g), s.as_ptr().add(16 * g)) };
        // Keys at or above `k`: scores at or above its bound (all of them without one).
        let ge = |k: u32| _mm512_set1_ps(super::ge_bound(k).unwrap_or(f32::NEG_INFINITY));
        let (mut mn, mut mx) = (
            _mm512_set1_ps(f32::INFINITY),
            _mm512_set1_ps(f32::NEG_INFINITY),
        );
        for g in 0..groups {
            let v = load(g);
            mn = _mm512_mask_min_ps(mn, lanes(g), mn, v);
            mx = _mm512_mask_max_ps(mx, lanes(g), mx, v);
        }
        let (lo, hi) = (
            super::key_of(_mm512_reduce_min_ps(mn)),
            super::key_of(_mm512_reduce_max_ps(mx)),
        );
        let count_ge2 = |a: u32, b: u32| {
            let (fa, fb) = (ge(a), ge(b));
            let one = _mm512_set1_epi32(1);
            let (mut ca, mut cb) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for g in 0..groups {
                let v = load(g);
                let ma = _mm512_mask_cmp_ps_mask::<_CMP_GE_OQ>(lanes(g), v, fa);
                let mb = _mm512_mask_cmp_ps_mask::<_CMP_GE_OQ>(lanes(g), v, fb);
                ca = _mm512_mask_add_epi32(ca, ma, ca, one);
                cb = _mm512_mask_add_epi32(cb, mb, cb, one);
            }
            (
                _mm512_reduce_add_epi32(ca) as usize,
                _mm512_reduce_add_epi32(cb) as usize,
            )
        };
        let (lo, hi, above) = super::narrow_cut(n, need, lo, hi, count_ge2);
        let t = if lo == hi {
            lo
        } else {
            // The keys inside `[lo, hi]`, at most 16: packed in a register and stored 16
            // lanes wide (`few` has room for 16 more; compressing into memory is slow).
            let (l, h) = (ge(lo), _mm512_set1_ps(super::gt_bound(hi)));
            let mut few = [0f32; 32];
            let mut k = 0usize;
            for g in 0..groups {
                let v = load(g);
                let m = _mm512_mask_cmp_ps_mask::<_CMP_GE_OQ>(lanes(g), v, l);
                let m = _mm512_mask_cmp_ps_mask::<_CMP_NGE_UQ>(m, v, h);
                // At most `FEW` keys lie inside `[lo, hi]` (`narrow_cut`); checked, as the
                // store relies on it.
                assert!(k <= super::FEW);
                // SAFETY: `k <= 16` before the store, so `few[k..k + 16]` is in bounds.
                unsafe {
                    _mm512_storeu_ps(few.as_mut_ptr().add(k), _mm512_maskz_compress_ps(m, v))
                };
                k += m.count_ones() as usize;
            }
            rank16(&few, k, need - above - 1)
        };
        // The scores above `t`, then the first ties at it.
        let (gt, at) = (_mm512_set1_ps(super::gt_bound(t)), ge(t));
        let mut ties = need;
        for g in 0..groups {
            let m = _mm512_mask_cmp_ps_mask::<_CMP_GE_OQ>(lanes(g), load(g), gt);
            kept[g / 4] |= u64::from(m) << (16 * (g % 4));
            ties -= m.count_ones() as usize;
        }
        for g in 0..groups {
            if ties == 0 {
                break;
            }
            let v = load(g);
            let m = _mm512_mask_cmp_ps_mask::<_CMP_GE_OQ>(lanes(g), v, at);
            let mut eq = _mm512_mask_cmp_ps_mask::<_CMP_NGE_UQ>(m, v, gt);
            while ties > 0 && eq != 0 {
                kept[g / 4] |= u64::from(eq & eq.wrapping_neg()) << (16 * (g % 4));
                eq &= eq - 1;
                ties -= 1;
            }
        }
        t
    }

    /// The key of rank `r` (0: the largest) among the first `n` of `few` (`r < n <= 16`),
    /// without branching on the data: per lane, the count of the others above it and at or
    /// above it, and the lane whose counts bracket `r`.
    #[target_feature(enable = "avx512f")]
    unsafe fn rank16(few: &[f32; 32], n: usize, r: usize) -> u32 {
        debug_assert!(r < n && n <= 16);
        let valid = ((1u32 << n) - 1) as u16;
        // The keys of the scores (`key_of`, branch-free: none is NaN).
        let b = _mm512_castps_si512(_mm512_add_ps(
            _mm512_maskz_loadu_ps(valid, few.as_ptr()),
            _mm512_setzero_ps(),
        ));
        let flip = _mm512_or_si512(_mm512_srai_epi32::<31>(b), _mm512_set1_epi32(i32::MIN));
        let keys = _mm512_xor_si512(b, flip);
        let one = _mm512_set1_epi32(1);
        let (mut gt, mut ge) = (_mm512_setzero_si512(), _mm512_setzero_si512());
        let mut kbuf = [0u32; 16];
        // SAFETY: 16 lanes into 16 words.
        unsafe { _mm512_storeu_si512(kbuf.as_mut_ptr() as *mut _, keys) };
        for &kj in &kbuf[..n] {
            let bj = _mm512_set1_epi32(kj as i32);
            gt = _mm512_mask_add_epi32(gt, _mm512_mask_cmplt_epu32_mask(valid, keys, bj), gt, one);
            ge = _mm512_mask_add_epi32(ge, _mm512_mask_cmple_epu32_mask(valid, keys, bj), ge, one);
        }
        let rv = _mm512_set1_epi32(r as i32);
        let hit = _mm512_mask_cmpgt_epu32_mask(_mm512_mask_cmple_epu32_mask(valid, gt, rv), ge, rv);
        kbuf[hit.trailing_zeros() as usize]
    }

    /// [`super::keys_between`], 16 keys per compare, packed in a register and stored 16
    /// lanes wide (compressing into memory is slow).
    #[target_feature(enable = "avx512f,popcnt")]
    pub unsafe fn keys_between512(keys: &[u32], lo: u32, hi: u32, out: &mut Vec<u32>) {
        let (l, h) = (_mm512_set1_epi32(lo as i32), _mm512_set1_epi32(hi as i32));
        let full = keys.len() / 16;
        let mut n = out.len();
        out.reserve(keys.len() + 16);
        let dst = out.as_mut_ptr();
        for g in 0..full {
            // SAFETY: group `g` of 16 keys is inside `keys`; `out` has room for all of them
            // and 16 more past its length.
            unsafe {
                let k = _mm512_loadu_si512(keys.as_ptr().add(16 * g) as *const _);
                let m = _mm512_mask_cmple_epu32_mask(_mm512_cmpge_epu32_mask(k, l), k, h);
                _mm512_storeu_si512(dst.add(n) as *mut _, _mm512_maskz_compress_epi32(m, k));
                n += m.count_ones() as usize;
            }
        }
        // SAFETY: the first `n` entries are written.
        unsafe { out.set_len(n) };
        out.extend(keys[16 * full..].iter().filter(|&&k| k >= lo && k <= hi));
    }

    /// [`super::zero_merged`] with `pdep` and masked stores.
    #[target_feature(enable = "avx512f,bmi2,popcnt")]
    pub unsafe fn zero_merged512(
        w: &mut [f32],
        mask: &mut [u64],
        above: &[u64],
        inside: &[u64],
        kept: &[u64],
    ) -> usize {
        let o = Avx512::<RANGE>::new(&Bounds::new(0, 0));
        let (mut pos, mut n) = (0usize, 0usize);
        for (wi, (mw, (&a, &m))) in mask.iter_mut().zip(above.iter().zip(inside)).enumerate() {
            let k = merged_word_pdep(a, m, kept, &mut pos);
            *mw = k;
            n += k.count_ones() as usize;
            if k != u64::MAX {
                // SAFETY: word `wi` of `w` holds 64 weights (checked by the caller).
                unsafe { o.zero(w.as_mut_ptr().add(64 * wi), k) };
            }
        }
        n
    }

    /// [`super::merge_kept`]: each word's candidates take their flags with `pdep`.
    #[target_feature(enable = "bmi2,popcnt")]
    pub unsafe fn merge_kept_pdep(side: &mut [u64], above: &[u64], inside: &[u64], kept: &[u64]) {
        let mut pos = 0usize;
        for ((s, &a), &m) in side.iter_mut().zip(above).zip(inside) {
            *s = merged_word_pdep(a, m, kept, &mut pos);
        }
    }

    /// [`super::merged_word`] with `pdep`: the word's candidates take flags `*pos..` at once.
    #[target_feature(enable = "bmi2,popcnt")]
    #[inline]
    fn merged_word_pdep(above: u64, inside: u64, kept: &[u64], pos: &mut usize) -> u64 {
        let (q, r) = (*pos / 64, *pos % 64);
        // Flags `pos..pos + 64`; the word after the last candidate's is zero.
        let flags = (kept[q] >> r) | ((kept[q + 1] << 1) << (63 - r));
        *pos += inside.count_ones() as usize;
        above | _pdep_u64(flags, inside)
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn max_bits256(w: &[f32]) -> u32 {
        super::max_bits(w)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn max_bits512(w: &[f32]) -> u32 {
        let m = _mm512_set1_epi32(0x7fff_ffff);
        let mut acc = _mm512_setzero_si512();
        let chunks = w.chunks_exact(16);
        let rest = chunks.remainder();
        for c in chunks {
            let x = _mm512_loadu_si512(c.as_ptr() as *const _);
            acc = _mm512_max_epu32(acc, _mm512_and_si512(x, m));
        }
        _mm512_reduce_max_epu32(acc).max(super::max_bits(rest))
    }

    /// Prefetching 8 KB ahead into L2, as the scans do: it helps on hosts whose cores are
    /// bound by the misses they keep in flight (`docs/benchmarks/kernels.md`).
    #[target_feature(enable = "popcnt")]
    pub unsafe fn count_bits_popcnt(w: &[u64]) -> usize {
        const AHEAD: usize = 1024;
        let mut n = 0;
        for (i, line) in w.chunks(8).enumerate() {
            _mm_prefetch::<_MM_HINT_T1>(w.as_ptr().wrapping_add(8 * i + AHEAD) as *const i8);
            n += line.iter().map(|x| x.count_ones() as usize).sum::<usize>();
        }
        n
    }

    const RANGE: u8 = 0;
    const FROM_NAN: u8 = 1;
    const NAN_ONLY: u8 = 2;

    #[inline(always)]
    unsafe fn prefetch_line4(p: *const f32) {
        let p = p as *const i8;
        for l in 0..4 {
            _mm_prefetch::<_MM_HINT_T0>(p.add(64 * l));
        }
    }

    struct Avx512<const M: u8> {
        gt: __m512,
        lo: __m512,
        hi: __m512,
    }

    impl<const M: u8> Avx512<M> {
        #[inline(always)]
        unsafe fn new(b: &Bounds) -> Self {
            Avx512 {
                gt: _mm512_set1_ps(b.gt),
                lo: _mm512_set1_ps(b.lo),
                hi: _mm512_set1_ps(b.hi),
            }
        }
    }

    impl<const M: u8> Ops for Avx512<M> {
        #[inline(always)]
        unsafe fn classify(&self, p: *const f32) -> (u64, u64) {
            let (mut g, mut i) = (0u64, 0u64);
            for q in 0..4 {
                let x = _mm512_loadu_ps(p.add(16 * q));
                let gm = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, self.gt);
                let im = match M {
                    // For a score that is not NaN, `s <= hi` is `!(s >= gt)` (no score has a
                    // key between them); NaN fails `s >= lo`.
                    RANGE => _mm512_mask_cmp_ps_mask::<_CMP_GE_OQ>(!gm, x, self.lo),
                    FROM_NAN => _mm512_cmp_ps_mask::<_CMP_NGT_UQ>(x, self.hi),
                    _ => _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x),
                };
                g |= (gm as u64) << (16 * q);
                i |= (im as u64) << (16 * q);
            }
            (g, i)
        }

        #[inline(always)]
        unsafe fn zero(&self, p: *mut f32, keep: u64) {
            for q in 0..4 {
                let a = p.add(16 * q);
                let m = (keep >> (16 * q)) as u16;
                _mm512_mask_storeu_ps(a, !m, _mm512_setzero_ps());
            }
        }

        #[inline(always)]
        unsafe fn prefetch(&self, p: *const f32) {
            prefetch_line4(p)
        }
    }

    struct Avx2<const M: u8> {
        gt: __m256,
        lo: __m256,
        hi: __m256,
        lane_bits: __m256i,
    }

    impl<const M: u8> Avx2<M> {
        #[inline(always)]
        unsafe fn new(b: &Bounds) -> Self {
            Avx2 {
                gt: _mm256_set1_ps(b.gt),
                lo: _mm256_set1_ps(b.lo),
                hi: _mm256_set1_ps(b.hi),
                lane_bits: _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128),
            }
        }
    }

    impl<const M: u8> Ops for Avx2<M> {
        #[inline(always)]
        unsafe fn classify(&self, p: *const f32) -> (u64, u64) {
            let (mut g, mut i) = (0u64, 0u64);
            for q in 0..8 {
                let x = _mm256_loadu_ps(p.add(8 * q));
                let gm = _mm256_cmp_ps::<_CMP_GE_OQ>(x, self.gt);
                let im = match M {
                    // As for AVX-512: `s <= hi` is `!(s >= gt)` when `s >= lo`.
                    RANGE => _mm256_andnot_ps(gm, _mm256_cmp_ps::<_CMP_GE_OQ>(x, self.lo)),
                    FROM_NAN => _mm256_cmp_ps::<_CMP_NGT_UQ>(x, self.hi),
                    _ => _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x),
                };
                g |= (_mm256_movemask_ps(gm) as u32 as u64) << (8 * q);
                i |= (_mm256_movemask_ps(im) as u32 as u64) << (8 * q);
            }
            (g, i)
        }

        #[inline(always)]
        unsafe fn zero(&self, p: *mut f32, keep: u64) {
            for q in 0..8 {
                // Lane j keeps its weight when bit j of this byte of `keep` is set.
                let byte = _mm256_set1_epi32(((keep >> (8 * q)) & 0xff) as i32);
                let m = _mm256_cmpeq_epi32(_mm256_and_si256(byte, self.lane_bits), self.lane_bits);
                let a = p.add(8 * q);
                _mm256_storeu_ps(a, _mm256_and_ps(_mm256_loadu_ps(a), _mm256_castsi256_ps(m)));
            }
        }

        #[inline(always)]
        unsafe fn prefetch(&self, p: *const f32) {
            prefetch_line4(p)
        }
    }

    macro_rules! by_mode {
        ($ops:ident, $b:expr, $f:ident($($arg:expr),*)) => {
            match $b.mode {
                Mode::Range => $f(&$ops::<RANGE>::new($b), $($arg),*),
                Mode::FromNan => $f(&$ops::<FROM_NAN>::new($b), $($arg),*),
                Mode::NanOnly => $f(&$ops::<NAN_ONLY>::new($b), $($arg),*),
            }
        };
    }

    /// Defines `$n512` (AVX-512) and `$n256` (AVX2), which run `$core` with the operations of
    /// the bounds' mode; `b: &Bounds` comes first, then the core's own arguments.
    macro_rules! per_isa {
        ($n512:ident, $n256:ident, $core:ident($($a:ident: $t:ty),*)) => {
            #[target_feature(enable = "avx512f,popcnt")]
            pub unsafe fn $n512(b: &Bounds, $($a: $t),*) -> usize {
                by_mode!(Avx512, b, $core($($a),*))
            }

            #[target_feature(enable = "avx2,popcnt")]
            pub unsafe fn $n256(b: &Bounds, $($a: $t),*) -> usize {
                by_mode!(Avx2, b, $core($($a),*))
            }
        };
    }

    per_isa!(count512, count256, count_core(
        s: &[f32],
        mask: &[u64],
        full: usize,
        ahead: &[f32],
        above_out: &mut [u64],
        on_in: &mut impl FnMut(usize, u64)
    ));

    per_isa!(count_zero512, count_zero256, count_zero_core(
        s: &[f32],
        w: &mut [f32],
        mask: &mut [u64],
        full: usize,
        ahead: &[f32],
        on_in: &mut impl FnMut(usize, u64)
    ));

    per_isa!(apply512, apply256, apply_core(
        s: &[f32],
        w: &mut [f32],
        mask: &mut [u64],
        full: usize,
        quota: &mut u64,
        ahead: &[f32]
    ));

    #[target_feature(enable = "avx512f,popcnt")]
    pub unsafe fn zero512(w: &mut [f32], keep: &[u64], mask: &mut [u64], full: usize) -> usize {
        let b = Bounds::new(0, 0);
        zero_core(&Avx512::<RANGE>::new(&b), w, keep, mask, full)
    }

    #[target_feature(enable = "avx2,popcnt")]
    pub unsafe fn zero256(w: &mut [f32], keep: &[u64], mask: &mut [u64], full: usize) -> usize {
        let b = Bounds::new(0, 0);
        zero_core(&Avx2::<RANGE>::new(&b), w, keep, mask, full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scores around every special key, plus ordinary ones.
    fn specials() -> Vec<f32> {
        let mut v = vec![
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7fc0_0001),
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::from_bits(0x8000_0001),
            f32::MAX,
            f32::MIN,
            1.0,
            -1.0,
            0.5,
            2.5,
            -3.25,
        ];
        let mut x = 0x1234_5678u32;
        while v.len() < 64 * 3 + 17 {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            v.push(f32::from_bits(x));
            v.push(v[(x as usize >> 7) % 18]);
        }
        v
    }

    fn keys_of_interest(s: &[f32]) -> Vec<u32> {
        let mut k: Vec<u32> = s.iter().map(|&x| score_key(x)).collect();
        for b in [
            0,
            1,
            NEG_INF_KEY - 1,
            NEG_INF_KEY,
            NEG_INF_KEY + 1,
            NEG_ZERO_KEY - 1,
            NEG_ZERO_KEY,
            NEG_ZERO_KEY + 1,
            POS_INF_KEY - 1,
            POS_INF_KEY,
            POS_INF_KEY + 1,
            u32::MAX - 1,
            u32::MAX,
        ] {
            k.push(b);
        }
        let extra: Vec<u32> = k
            .iter()
            .flat_map(|&x| [x.wrapping_sub(1), x.wrapping_add(1)])
            .collect();
        k.extend(extra);
        k.sort_unstable();
        k.dedup();
        k
    }

    /// Runs `f` under every instruction set this CPU has.
    fn all_isas(f: impl Fn()) {
        let best = detect();
        for i in [ISA_SCALAR, ISA_AVX2, ISA_AVX512] {
            if i <= best {
                ISA.store(i, Ordering::Relaxed);
                f();
            }
        }
        ISA.store(best, Ordering::Relaxed);
    }

    #[test]
    fn bits_are_counted_at_every_length() {
        let mut next = crate::testing::xorshift64(0x9e37_79b9_7f4a_7c15);
        let words: Vec<u64> = (0..70_000 + 13)
            .map(|i| {
                let x = next();
                // Some all-set and all-clear words among the random ones.
                match i % 7 {
                    0 => u64::MAX,
                    1 => 0,
                    _ => x,
                }
            })
            .collect();
        let naive = |w: &[u64]| w.iter().map(|x| x.count_ones() as usize).sum::<usize>();
        // Lengths around the 8-word lines and the parallel pieces (65536 words).
        for n in (0..40).chain([1023, 1024, 1025, 65535, 65536, 65537, words.len()]) {
            assert_eq!(count_bits(&words[..n]), naive(&words[..n]), "{n} words");
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("popcnt") {
                // SAFETY: the CPU has POPCNT.
                let c = unsafe { x86::count_bits_popcnt(&words[3..n.max(3)]) };
                assert_eq!(c, naive(&words[3..n.max(3)]), "{n} words from the third");
            }
        }
    }

    #[test]
    fn count_matches_keys() {
        let s = specials();
        let ks = keys_of_interest(&s);
        let mask: Vec<u64> = (0..s.len().div_ceil(64))
            .map(|i| 0xfff7_7fff_ffbf_ffffu64.rotate_left(i as u32 * 7))
            .collect();
        all_isas(|| {
            for (i, &lo) in ks.iter().enumerate().step_by(3) {
                for &hi in ks[i..].iter().step_by(5).chain([&u32::MAX]) {
                    let mut want_above = 0;
                    let mut want_in = vec![0u64; mask.len()];
                    for (j, &x) in s.iter().enumerate() {
                        let k = score_key(x);
                        if (mask[j / 64] >> (j % 64)) & 1 == 1 {
                            want_above += (k > hi) as usize;
                            want_in[j / 64] |= ((lo <= k && k <= hi) as u64) << (j % 64);
                        }
                    }
                    let mut got_in = vec![0u64; mask.len()];
                    let mut got_above = vec![0u64; mask.len()];
                    let above = count_words(&s, &mask, lo, hi, &[], &mut got_above, |w, bits| {
                        got_in[w] = bits
                    });
                    assert_eq!(above, want_above, "{} lo {lo:#x} hi {hi:#x}", isa_name());
                    let bits: usize = got_above.iter().map(|w| w.count_ones() as usize).sum();
                    assert_eq!(bits, want_above);
                    for (j, &x) in s.iter().enumerate() {
                        let alive = (mask[j / 64] >> (j % 64)) & 1 == 1;
                        let bit = (got_above[j / 64] >> (j % 64)) & 1 == 1;
                        assert_eq!(bit, alive && score_key(x) > hi);
                    }
                    assert_eq!(got_in, want_in, "{} lo {lo:#x} hi {hi:#x}", isa_name());
                }
            }
        });
    }

    #[test]
    fn apply_matches_keys() {
        let s = specials();
        let ks = keys_of_interest(&s);
        all_isas(|| {
            for &t in ks.iter().step_by(2) {
                for quota in [0u64, 1, 3, 1000] {
                    let mut w: Vec<f32> = (0..s.len()).map(|i| i as f32 - 7.5).collect();
                    let mut mask: Vec<u64> = (0..s.len().div_ceil(64))
                        .map(|i| 0xfff7_7fff_ffbf_ffffu64.rotate_left(i as u32 * 7))
                        .collect();
                    let (w0, m0) = (w.clone(), mask.clone());
                    let mut q = quota;
                    let kept = apply_words(&s, &mut w, &mut mask, t, &mut q, &[]);
                    // Reference: keys directly, element by element.
                    let mut rq = quota;
                    let mut n = 0;
                    for (i, &x) in s.iter().enumerate() {
                        let alive = (m0[i / 64] >> (i % 64)) & 1 == 1;
                        let k = score_key(x);
                        let keep = alive
                            && (k > t
                                || (k == t && rq > 0 && {
                                    rq -= 1;
                                    true
                                }));
                        n += keep as usize;
                        assert_eq!(
                            (mask[i / 64] >> (i % 64)) & 1 == 1,
                            keep,
                            "{} t {t:#x} i {i}",
                            isa_name()
                        );
                        let want = if keep { w0[i] } else { 0.0 };
                        assert_eq!(w[i].to_bits(), want.to_bits());
                    }
                    let last = s.len() % 64;
                    assert_eq!(mask[mask.len() - 1] >> last, 0);
                    assert_eq!((kept, q), (n, rq));
                }
            }
        });
    }

    #[test]
    fn zero_words_follow_bits() {
        all_isas(|| {
            for n in [0usize, 5, 64, 100, 257] {
                let w0: Vec<f32> = (0..n).map(|i| i as f32 - 3.5).collect();
                let keep: Vec<u64> = (0..n.div_ceil(64))
                    .map(|i| 0x0123_4567_89ab_cdefu64.rotate_left(i as u32 * 13) | (i as u64))
                    .collect();
                let mut w = w0.clone();
                let mut mask = vec![u64::MAX; keep.len()];
                let kept = zero_words(&mut w, &keep, &mut mask);
                let mut want = 0;
                for i in 0..n {
                    let k = (keep[i / 64] >> (i % 64)) & 1 == 1;
                    want += k as usize;
                    assert_eq!(w[i].to_bits(), if k { w0[i] } else { 0.0 }.to_bits());
                    assert_eq!((mask[i / 64] >> (i % 64)) & 1 == 1, k);
                }
                if n % 64 != 0 {
                    assert_eq!(mask[n / 64] >> (n % 64), 0);
                }
                assert_eq!(kept, want);
            }
        });
    }

    /// `top_scores` and `merge_kept`, every implementation this host runs, against sorting:
    /// random candidates with few or many equal keys (`-0.0` and `+0.0` among them).
    #[test]
    fn row_cut_helpers_match_sorting() {
        let mut next = crate::testing::xorshift32(0x2545_f491);
        for case in 0..1500 {
            let n = 1 + next() as usize % 300;
            let spread = [1u32, 3, 50, 1 << 20, u32::MAX][case % 5];
            // Keys of scores that are not NaN: from `-inf`'s to `+inf`'s.
            let span = POS_INF_KEY - NEG_INF_KEY;
            let base = if case % 7 == 0 {
                // About zero.
                NEG_ZERO_KEY + 1 - spread.min(64) / 2
            } else {
                NEG_INF_KEY + next() % span
            };
            let scores: Vec<f32> = (0..n)
                .map(|_| {
                    let k = NEG_INF_KEY
                        + (base - NEG_INF_KEY)
                            .saturating_add(next() % spread)
                            .min(span);
                    let s = key_score(k);
                    // Some zeros negative: they tie with the positive ones.
                    if s == 0.0 && next().is_multiple_of(2) {
                        -0.0
                    } else {
                        s
                    }
                })
                .collect();
            let keys: Vec<u32> = scores.iter().map(|&s| score_key(s)).collect();
            let need = 1 + next() as usize % n;
            // The reference: by key, higher first, then the earlier.
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| keys[b].cmp(&keys[a]).then(a.cmp(&b)));
            let t_want = keys[order[need - 1]];
            let mut want = vec![0u64; n / 64 + 2];
            for &i in &order[..need] {
                want[i / 64] |= 1 << (i % 64);
            }
            all_isas(|| {
                let mut kept = Vec::new();
                assert_eq!(top_scores(&scores, need, &mut kept), t_want, "case {case}");
                assert_eq!(kept, want, "case {case}");
            });

            // Spread the candidates over a row's words, beside elements above them.
            let words = n.div_ceil(64) + 1 + next() as usize % 4;
            let mut inside = vec![0u64; words];
            let mut placed = 0;
            while placed < n {
                let b = next() as usize % (64 * words);
                if inside[b / 64] >> (b % 64) & 1 == 0 {
                    inside[b / 64] |= 1 << (b % 64);
                    placed += 1;
                }
            }
            let above: Vec<u64> = inside
                .iter()
                .map(|&m| !m & (u64::from(next()) << 32 | u64::from(next())))
                .collect();
            let mut expect = above.clone();
            let mut i = 0;
            for b in 0..64 * words {
                if inside[b / 64] >> (b % 64) & 1 == 1 {
                    if want[i / 64] >> (i % 64) & 1 == 1 {
                        expect[b / 64] |= 1 << (b % 64);
                    }
                    i += 1;
                }
            }
            let mut side = vec![0u64; words];
            merge_kept(&mut side, &above, &inside, &want);
            assert_eq!(side, expect, "case {case}");
            let mut side = vec![0u64; words];
            merge_kept_scalar(&mut side, &above, &inside, &want);
            assert_eq!(side, expect, "case {case}");

            // Merged while masking: the mask words become the keep bits, the other weights
            // are zeroed.
            let w0: Vec<f32> = (0..64 * words).map(|i| i as f32 - 7.5).collect();
            all_isas(|| {
                let (mut w, mut mask) = (w0.clone(), vec![u64::MAX; words]);
                let n = zero_merged(&mut w, &mut mask, &above, &inside, &want);
                assert_eq!(mask, expect, "case {case}");
                assert_eq!(n, popcount(&expect), "case {case}");
                for (i, (&a, &b)) in w.iter().zip(&w0).enumerate() {
                    let k = expect[i / 64] >> (i % 64) & 1 == 1;
                    assert_eq!(
                        a.to_bits(),
                        if k { b } else { 0.0 }.to_bits(),
                        "case {case}"
                    );
                }
            });
        }
    }

    /// `keys_between` keeps the keys of the range, bounds included, in order, after what the
    /// output held; lengths that are not a multiple of 16 included.
    #[test]
    fn keys_between_filters_in_order() {
        let mut x = 0x9e37_79b9u32;
        for n in [0usize, 1, 15, 16, 17, 100, 1000] {
            let keys: Vec<u32> = (0..n)
                .map(|i| {
                    x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    [0, u32::MAX, 500, 1000, x % 2000][i % 5]
                })
                .collect();
            for (lo, hi) in [
                (500, 1000),
                (0, 0),
                (0, u32::MAX),
                (1001, 999),
                (u32::MAX, u32::MAX),
            ] {
                let mut out = vec![9, 9];
                keys_between(&keys, lo, hi, &mut out);
                let mut want = vec![9, 9];
                want.extend(keys.iter().filter(|&&k| k >= lo && k <= hi));
                assert_eq!(out, want, "{n} keys in [{lo}, {hi}]");
            }
        }
    }

    #[test]
    fn key_of_is_score_key() {
        let mut x = 0x9e37_79b9u32;
        for &s in specials().iter() {
            assert_eq!(key_of(s), score_key(s), "{s:?}");
        }
        for _ in 0..100_000 {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let s = f32::from_bits(x);
            assert_eq!(key_of(s), score_key(s), "{:#x}", x);
        }
    }

    #[test]
    fn nonfinite_found() {
        all_isas(|| {
            let mut w = vec![1.0f32; 1000];
            assert!(!any_nonfinite(&w));
            // Inside the vector loops, and in the tail after the last whole vector.
            for at in [0, 777, 995, 999] {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN] {
                    w[at] = bad;
                    assert!(any_nonfinite(&w), "{at}");
                }
                w[at] = f32::MAX;
                assert!(!any_nonfinite(&w));
            }
        });
    }
}
