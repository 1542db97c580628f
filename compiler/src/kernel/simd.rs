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
        if is_x86_feature_detected!("avx512f") && std::env::var_os("PRUNEC_KERNEL_AVX2").is_none() {
            return ISA_AVX512;
        }
        if is_x86_feature_detected!("avx2") {
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

/// Calls `f(word, gt, in)` for every 64-element word of `s` (the last may be partial, its
/// missing lanes 0): `gt` has bit `j` set when `score_key(s[64 * word + j]) > hi`, `in` when
/// `lo <= key <= hi`.
///
/// `ahead` is the memory the caller reads next (the next block's weights, or empty): it is
/// prefetched word by word while this buffer, already in cache, is compared, so the memory
/// keeps streaming during the in-cache work.
#[inline(always)]
pub fn classify_words(
    s: &[f32],
    lo: u32,
    hi: u32,
    ahead: &[f32],
    mut f: impl FnMut(usize, u64, u64),
) {
    let full = s.len() / 64;
    let b = Bounds::new(lo, hi);
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F (checked by `detect`); the slice holds `full` words.
        ISA_AVX512 => unsafe { x86::classify512(&s[..full * 64], &b, ahead, &mut f) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 (checked by `detect`); the slice holds `full` words.
        ISA_AVX2 => unsafe { x86::classify256(&s[..full * 64], &b, ahead, &mut f) },
        _ => {
            for w in 0..full {
                let (g, i) = classify_scalar(&s[w * 64..w * 64 + 64], lo, hi);
                f(w, g, i);
            }
        }
    }
    if full * 64 < s.len() {
        let (g, i) = classify_scalar(&s[full * 64..], lo, hi);
        f(full, g, i);
    }
}

/// Masks one block: keeps alive elements with key `> t`, then the first `quota` alive ones
/// with key `== t` (in index order; `quota` is decremented), zeroes (`+0.0`) every other
/// weight and writes the new mask words. `s` holds the scores of `w`; `mask` has
/// `ceil(len / 64)` words, the bits after the last element are cleared. Returns the number
/// kept. `ahead` is prefetched as in [`classify_words`].
pub fn apply_words(
    s: &[f32],
    w: &mut [f32],
    mask: &mut [u64],
    t: u32,
    quota: &mut u64,
    ahead: &[f32],
) -> usize {
    debug_assert_eq!(s.len(), w.len());
    debug_assert_eq!(mask.len(), s.len().div_ceil(64));
    let n = s.len();
    let mut kept = 0usize;
    let mut q = *quota;
    // Keep bits of one word from its comparison bits.
    let mut keep_bits = |wi: usize, gt: u64, eq: u64, mask: &mut [u64]| -> u64 {
        let valid = if (wi + 1) * 64 <= n {
            u64::MAX
        } else {
            (1u64 << (n % 64)) - 1
        };
        let alive = mask[wi] & valid;
        let mut keep = gt & alive;
        let mut ties = eq & alive;
        while q > 0 && ties != 0 {
            keep |= ties & ties.wrapping_neg();
            ties &= ties - 1;
            q -= 1;
        }
        mask[wi] = keep;
        kept += keep.count_ones() as usize;
        keep
    };
    let full = n / 64;
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F is present; `s` and `w` hold `full` words.
        ISA_AVX512 => unsafe {
            x86::apply512(
                &s[..full * 64],
                &mut w[..full * 64],
                t,
                ahead,
                &mut |wi, g, e| keep_bits(wi, g, e, mask),
            )
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 is present; `s` and `w` hold `full` words.
        ISA_AVX2 => unsafe {
            x86::apply256(
                &s[..full * 64],
                &mut w[..full * 64],
                t,
                ahead,
                &mut |wi, g, e| keep_bits(wi, g, e, mask),
            )
        },
        _ => {
            for wi in 0..full {
                let (g, e) = classify_scalar(&s[wi * 64..wi * 64 + 64], t, t);
                let keep = keep_bits(wi, g, e, mask);
                zero_scalar(&mut w[wi * 64..wi * 64 + 64], keep);
            }
        }
    }
    if full * 64 < n {
        let (g, e) = classify_scalar(&s[full * 64..], t, t);
        let keep = keep_bits(full, g, e, mask);
        zero_scalar(&mut w[full * 64..], keep);
    }
    *quota = q;
    kept
}

fn zero_scalar(w: &mut [f32], keep: u64) {
    for (j, x) in w.iter_mut().enumerate() {
        if (keep >> j) & 1 == 0 {
            *x = 0.0;
        }
    }
}

/// Whether any of `w` is NaN or infinite (alive or not).
pub fn any_nonfinite(w: &[f32]) -> bool {
    let m = match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 when the ISA is AVX2 or AVX-512.
        ISA_AVX512 | ISA_AVX2 => unsafe { x86::max_bits256(w) },
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

    use super::{Bounds, Mode};

    /// Prefetches the four cache lines of word `wi` of `ahead`, if it has that word.
    #[inline(always)]
    unsafe fn prefetch_word(ahead: &[f32], wi: usize) {
        if 64 * wi + 64 <= ahead.len() {
            let p = ahead.as_ptr().add(64 * wi) as *const i8;
            for l in 0..4 {
                _mm_prefetch::<_MM_HINT_T0>(p.add(64 * l));
            }
        }
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn max_bits256(w: &[f32]) -> u32 {
        super::max_bits(w)
    }

    /// The in-range lanes of one 16-lane vector.
    #[inline(always)]
    unsafe fn in512(x: __m512, lo: __m512, hi: __m512, mode: Mode) -> u16 {
        match mode {
            Mode::Range => {
                let h = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(x, hi);
                _mm512_mask_cmp_ps_mask::<_CMP_GE_OQ>(h, x, lo)
            }
            Mode::FromNan => _mm512_cmp_ps_mask::<_CMP_NGT_UQ>(x, hi),
            Mode::NanOnly => _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x),
        }
    }

    #[inline(always)]
    unsafe fn word512(p: *const f32, gt: __m512, lo: __m512, hi: __m512, mode: Mode) -> (u64, u64) {
        let (mut g, mut i) = (0u64, 0u64);
        for q in 0..4 {
            let x = _mm512_loadu_ps(p.add(16 * q));
            g |= (_mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, gt) as u64) << (16 * q);
            i |= (in512(x, lo, hi, mode) as u64) << (16 * q);
        }
        (g, i)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn classify512(
        s: &[f32],
        b: &Bounds,
        ahead: &[f32],
        f: &mut impl FnMut(usize, u64, u64),
    ) {
        let (gt, lo, hi) = (
            _mm512_set1_ps(b.gt),
            _mm512_set1_ps(b.lo),
            _mm512_set1_ps(b.hi),
        );
        let p = s.as_ptr();
        macro_rules! run {
            ($mode:expr) => {
                for w in 0..s.len() / 64 {
                    prefetch_word(ahead, w);
                    let (g, i) = word512(p.add(64 * w), gt, lo, hi, $mode);
                    f(w, g, i);
                }
            };
        }
        match b.mode {
            Mode::Range => run!(Mode::Range),
            Mode::FromNan => run!(Mode::FromNan),
            Mode::NanOnly => run!(Mode::NanOnly),
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn apply512(
        s: &[f32],
        w: &mut [f32],
        t: u32,
        ahead: &[f32],
        keep: &mut impl FnMut(usize, u64, u64) -> u64,
    ) {
        let b = Bounds::new(t, t);
        let (gt, lo, hi) = (
            _mm512_set1_ps(b.gt),
            _mm512_set1_ps(b.lo),
            _mm512_set1_ps(b.hi),
        );
        let zero = _mm512_setzero_ps();
        let (p, o) = (s.as_ptr(), w.as_mut_ptr());
        macro_rules! run {
            ($mode:expr) => {
                for wi in 0..s.len() / 64 {
                    prefetch_word(ahead, wi);
                    let (g, e) = word512(p.add(64 * wi), gt, lo, hi, $mode);
                    let k = !keep(wi, g, e);
                    for q in 0..4 {
                        let m = (k >> (16 * q)) as u16;
                        _mm512_mask_storeu_ps(o.add(64 * wi + 16 * q), m, zero);
                    }
                }
            };
        }
        match b.mode {
            Mode::Range => run!(Mode::Range),
            Mode::FromNan => run!(Mode::FromNan),
            Mode::NanOnly => run!(Mode::NanOnly),
        }
    }

    #[inline(always)]
    unsafe fn in256(x: __m256, lo: __m256, hi: __m256, mode: Mode) -> __m256 {
        match mode {
            Mode::Range => _mm256_and_ps(
                _mm256_cmp_ps::<_CMP_GE_OQ>(x, lo),
                _mm256_cmp_ps::<_CMP_LE_OQ>(x, hi),
            ),
            Mode::FromNan => _mm256_cmp_ps::<_CMP_NGT_UQ>(x, hi),
            Mode::NanOnly => _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x),
        }
    }

    #[inline(always)]
    unsafe fn word256(p: *const f32, gt: __m256, lo: __m256, hi: __m256, mode: Mode) -> (u64, u64) {
        let (mut g, mut i) = (0u64, 0u64);
        for q in 0..8 {
            let x = _mm256_loadu_ps(p.add(8 * q));
            let a = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(x, gt)) as u32 as u64;
            let b = _mm256_movemask_ps(in256(x, lo, hi, mode)) as u32 as u64;
            g |= a << (8 * q);
            i |= b << (8 * q);
        }
        (g, i)
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn classify256(
        s: &[f32],
        b: &Bounds,
        ahead: &[f32],
        f: &mut impl FnMut(usize, u64, u64),
    ) {
        let (gt, lo, hi) = (
            _mm256_set1_ps(b.gt),
            _mm256_set1_ps(b.lo),
            _mm256_set1_ps(b.hi),
        );
        let p = s.as_ptr();
        macro_rules! run {
            ($mode:expr) => {
                for w in 0..s.len() / 64 {
                    prefetch_word(ahead, w);
                    let (g, i) = word256(p.add(64 * w), gt, lo, hi, $mode);
                    f(w, g, i);
                }
            };
        }
        match b.mode {
            Mode::Range => run!(Mode::Range),
            Mode::FromNan => run!(Mode::FromNan),
            Mode::NanOnly => run!(Mode::NanOnly),
        }
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn apply256(
        s: &[f32],
        w: &mut [f32],
        t: u32,
        ahead: &[f32],
        keep: &mut impl FnMut(usize, u64, u64) -> u64,
    ) {
        let b = Bounds::new(t, t);
        let (gt, lo, hi) = (
            _mm256_set1_ps(b.gt),
            _mm256_set1_ps(b.lo),
            _mm256_set1_ps(b.hi),
        );
        // Lane j of the vector for bits 8q..8q+8 tests bit j of the shifted byte.
        let lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        let (p, o) = (s.as_ptr(), w.as_mut_ptr());
        macro_rules! run {
            ($mode:expr) => {
                for wi in 0..s.len() / 64 {
                    prefetch_word(ahead, wi);
                    let (g, e) = word256(p.add(64 * wi), gt, lo, hi, $mode);
                    let k = keep(wi, g, e);
                    for q in 0..8 {
                        let byte = _mm256_set1_epi32(((k >> (8 * q)) & 0xff) as i32);
                        let m = _mm256_cmpeq_epi32(_mm256_and_si256(byte, lane_bits), lane_bits);
                        let a = o.add(64 * wi + 8 * q);
                        let x = _mm256_loadu_ps(a);
                        _mm256_storeu_ps(a, _mm256_and_ps(x, _mm256_castsi256_ps(m)));
                    }
                }
            };
        }
        match b.mode {
            Mode::Range => run!(Mode::Range),
            Mode::FromNan => run!(Mode::FromNan),
            Mode::NanOnly => run!(Mode::NanOnly),
        }
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
    fn classify_matches_keys() {
        let s = specials();
        let ks = keys_of_interest(&s);
        all_isas(|| {
            for (i, &lo) in ks.iter().enumerate().step_by(3) {
                for &hi in ks[i..].iter().step_by(5).chain([&u32::MAX]) {
                    let mut seen = 0;
                    classify_words(&s, lo, hi, &[], |w, g, inr| {
                        let end = (w * 64 + 64).min(s.len());
                        let (eg, ei) = classify_scalar(&s[w * 64..end], lo, hi);
                        assert_eq!((g, inr), (eg, ei), "{} lo {lo:#x} hi {hi:#x}", isa_name());
                        seen += 1;
                    });
                    assert_eq!(seen, s.len().div_ceil(64));
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
    fn nonfinite_found() {
        all_isas(|| {
            let mut w = vec![1.0f32; 1000];
            assert!(!any_nonfinite(&w));
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN] {
                w[777] = bad;
                assert!(any_nonfinite(&w));
            }
            w[777] = f32::MAX;
            assert!(!any_nonfinite(&w));
        });
    }
}
