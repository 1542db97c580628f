//! How fast can the single-pass scan of a global cut be on this machine?
//!
//! On the same weights (magnitude scores; 90% of them fall below the key range and are
//! zeroed, a band of about 1% is collected as candidates) it times:
//!
//! - `streaming`: a plain in-place read+write (`x *= 1`), the bound;
//! - `fused avx512`: one hand-written AVX-512 loop per 16 weights (load, `abs`, two compares,
//!   masked zero store, mask and band bits): what a 16-lane code generator could emit;
//! - `fused sse`: the same fused loop 4 lanes at a time, packing the compare results into bit
//!   words as a 128-bit JIT must (cranelift's widest vectors on x86-64);
//! - `jit blocks`: the blocked design: the JIT scores 2048 weights into a buffer that stays in
//!   cache, then `simd::count_zero_words` classifies and zeroes them and candidates are
//!   collected, after the finiteness check;
//! - `wide fused`: the fused scan from the AVX-512 code generator (`prunec_kernels::wide`), which
//!   settles the mask and counts in its loop, so Rust only collects the candidates (what
//!   global and per-tensor cuts run on such hosts);
//! - `prune_jit`: the whole single-pass call (sample, scan, resolution, fixup) on the same
//!   data, for the fixed costs;
//! - `  (blocked)`: the same call with the blocked scan (`force_blocked_scan`);
//! - `score only` and `blocks, no writes`: parts of `jit blocks`, to see where its time goes:
//!   the JIT scoring each block into the buffer and nothing else (the part that streams the
//!   weights in), then that plus the finiteness check and the classification without the
//!   zeroing writes (`simd::count_words`) or candidates.
//!
//! The variants run interleaved, 12 times each; it prints the minimum and the median in ms.
//! `cargo run --release -p prunec-kernels --example scan_bound [-- PARAMS]` (default 100M). Needs an
//! x86-64 CPU with AVX-512F; see `docs/benchmarks/kernels.md` for results.

use std::hint::black_box;
use std::time::Instant;

use prunec_kernels::jit::{compile, KArgs};
use prunec_kernels::{prune_jit, simd, KExpr, PruneOptions, Selection, TensorView};
use rayon::prelude::*;

const CHUNK: usize = 1 << 18;
const BLOCK: usize = 2048;
const COLS: usize = 4096;
const REPEATS: usize = 12;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Fused AVX-512 scan: zeroes weights whose magnitude is below `lo`, keeps the mask bits
    /// of the others; returns (kept above `hi`, in the band).
    ///
    /// # Safety
    /// The CPU has AVX-512F and POPCNT; `mask` holds `w.len() / 64` words.
    #[target_feature(enable = "avx512f,popcnt")]
    pub unsafe fn fused512(w: &mut [f32], mask: &mut [u64], lo: f32, hi: f32) -> (u64, u64) {
        let absm = _mm512_set1_epi32(0x7fff_ffff);
        let (l, h) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
        let (mut above, mut band) = (0u64, 0u64);
        for (wi, m) in mask.iter_mut().enumerate() {
            let (mut below, mut over) = (0u64, 0u64);
            for q in 0..4 {
                // SAFETY: word `wi` of `w` holds 64 weights.
                unsafe {
                    let p = w.as_mut_ptr().add(wi * 64 + q * 16);
                    let s = _mm512_castsi512_ps(_mm512_and_si512(
                        _mm512_loadu_si512(p as *const _),
                        absm,
                    ));
                    let b = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(s, l);
                    _mm512_mask_storeu_ps(p, b, _mm512_setzero_ps());
                    below |= (b as u64) << (16 * q);
                    over |= (_mm512_cmp_ps_mask::<_CMP_GT_OQ>(s, h) as u64) << (16 * q);
                }
            }
            let keep = !below & *m;
            *m = keep;
            above += (keep & over).count_ones() as u64;
            band += (keep & !over).count_ones() as u64;
        }
        (above, band)
    }

    /// The same scan 4 lanes at a time, as a 128-bit JIT could emit it: the scores also go
    /// to a block buffer (for the candidates' keys), a running maximum of the magnitudes'
    /// bits detects non-finite weights, which are never zeroed, and the compare results are
    /// packed into bit words. Returns (kept above `hi`, in the band, maximum magnitude bits).
    ///
    /// # Safety
    /// The CPU has SSE4.1 and POPCNT; `mask` holds `w.len() / 64` words.
    #[target_feature(enable = "sse4.1,popcnt")]
    pub unsafe fn fused128(
        w: &mut [f32],
        mask: &mut [u64],
        scores: &mut [f32; 2048],
        lo: f32,
        hi: f32,
    ) -> (u64, u64, u32) {
        let absm = _mm_set1_epi32(0x7fff_ffff);
        let inf = _mm_set1_epi32(0x7f80_0000);
        let (l, h) = (_mm_set1_ps(lo), _mm_set1_ps(hi));
        let mut top = _mm_setzero_si128();
        let (mut above, mut band) = (0u64, 0u64);
        for (wi, m) in mask.iter_mut().enumerate() {
            let (mut below, mut over) = (0u64, 0u64);
            for q in 0..4 {
                let mut b = [_mm_setzero_si128(); 4];
                let mut o = [_mm_setzero_si128(); 4];
                for g in 0..4 {
                    let i = wi * 64 + q * 16 + 4 * g;
                    // SAFETY: word `wi` of `w` holds 64 weights; `i % 2048` is in `scores`.
                    unsafe {
                        let p = w.as_mut_ptr().add(i);
                        let v = _mm_loadu_si128(p as *const __m128i);
                        let bits = _mm_and_si128(v, absm);
                        let s = _mm_castsi128_ps(bits);
                        _mm_storeu_ps(scores.as_mut_ptr().add(i % 2048), s);
                        top = _mm_max_epu32(top, bits);
                        b[g] = _mm_castps_si128(_mm_cmplt_ps(s, l));
                        o[g] = _mm_castps_si128(_mm_cmpgt_ps(s, h));
                        let zero = _mm_and_si128(b[g], _mm_cmplt_epi32(bits, inf));
                        _mm_storeu_si128(p as *mut __m128i, _mm_andnot_si128(zero, v));
                    }
                }
                let pack = |x: [__m128i; 4]| {
                    _mm_movemask_epi8(_mm_packs_epi16(
                        _mm_packs_epi32(x[0], x[1]),
                        _mm_packs_epi32(x[2], x[3]),
                    )) as u32 as u64
                };
                below |= pack(b) << (16 * q);
                over |= pack(o) << (16 * q);
            }
            let keep = !below & *m;
            *m = keep;
            above += (keep & over).count_ones() as u64;
            band += (keep & !over).count_ones() as u64;
        }
        let mut t = [0u32; 4];
        // SAFETY: 16 bytes into a 16-byte array.
        unsafe { _mm_storeu_si128(t.as_mut_ptr() as *mut __m128i, top) };
        (above, band, t.into_iter().max().unwrap_or(0))
    }
}

/// Kernel arguments for weights `[b0, b1)` of a chunk, scores into `buf`.
fn block_args(w: &mut [f32], b0: usize, b1: usize, buf: &mut [f32]) -> KArgs {
    let mut a = KArgs::empty();
    a.w = w[b0..].as_mut_ptr();
    a.out = buf.as_mut_ptr();
    a.cols = COLS as u64;
    a.end = (b1 - b0) as u64;
    a
}

/// [`block_args`] for a scan kernel: the range's bounds and the `ge` bits.
fn scan_block_args(
    w: &mut [f32],
    (b0, b1): (usize, usize),
    buf: &mut [f32],
    (lo, gt): (f32, f32),
    ge: &mut [u16],
) -> KArgs {
    let mut a = block_args(w, b0, b1, buf);
    a.lo = [lo; 4];
    a.gt = [gt; 4];
    a.ge = ge.as_mut_ptr();
    a
}

/// The JIT's score kernel block by block over a chunk, each block's scores into one buffer;
/// `then(w, b0, b1, scores)` runs after each block.
fn score_blocks(
    score: prunec_kernels::jit::KernelFn,
    w: &mut [f32],
    mut then: impl FnMut(&mut [f32], usize, usize, &[f32]),
) {
    let mut buf = vec![0.0f32; BLOCK];
    let len = w.len();
    for b0 in (0..len).step_by(BLOCK) {
        let b1 = (b0 + BLOCK).min(len);
        let mut a = block_args(w, b0, b1, &mut buf);
        // SAFETY: the kernel reads `b1 - b0` weights and writes as many scores into `buf`.
        unsafe { score(&mut a) };
        then(w, b0, b1, &buf[..b1 - b0]);
    }
}

/// prunec's blocked scan over one chunk: JIT scores per block, then classify and zero.
fn jit_blocks(
    score: prunec_kernels::jit::KernelFn,
    w: &mut [f32],
    mask: &mut [u64],
    lo: u32,
    hi: u32,
) -> u64 {
    let mut cands: Vec<u64> = Vec::with_capacity(4096);
    let mut above = 0u64;
    score_blocks(score, w, |w, b0, b1, s| {
        assert!(!simd::any_nonfinite(&w[b0..b1]));
        let (head, tail) = w.split_at_mut(b1);
        let ahead = &tail[..BLOCK.min(tail.len())];
        above += simd::count_zero_words(
            s,
            &mut head[b0..],
            &mut mask[b0 / 64..b1 / 64],
            lo,
            hi,
            ahead,
            |wi, bits| {
                let mut m = bits;
                while m != 0 && cands.len() < cands.capacity() {
                    let j = wi * 64 + m.trailing_zeros() as usize;
                    m &= m - 1;
                    cands.push(((simd::key_of(s[j]) as u64) << 32) | (b0 + j) as u64);
                }
            },
        ) as u64;
    });
    above + cands.len() as u64
}

/// Parts of [`jit_blocks`]: the JIT scores each block into the buffer; with `classify`
/// the block is also checked for non-finite weights and classified against the range
/// (`simd::count_words`, which prefetches the next block as `jit_blocks` does), without
/// zeroing anything or collecting candidates. Returns the in-range count (0 without
/// `classify`).
fn jit_blocks_read(
    score: prunec_kernels::jit::KernelFn,
    w: &mut [f32],
    mask: &[u64],
    lo: u32,
    hi: u32,
    classify: bool,
) -> u64 {
    let mut side = [0u64; BLOCK / 64];
    let mut inr = 0u64;
    score_blocks(score, w, |w, b0, b1, s| {
        if !classify {
            return;
        }
        assert!(!simd::any_nonfinite(&w[b0..b1]));
        let ahead = &w[b1..(b1 + BLOCK).min(w.len())];
        let m = &mask[b0 / 64..b1 / 64];
        simd::count_words(s, m, lo, hi, ahead, &mut side[..m.len()], |_, bits| {
            inr += bits.count_ones() as u64
        });
    });
    inr
}

/// Word `wi` of bits stored as one `u16` per 16 elements.
fn bits_word(h: &[u16], wi: usize) -> u64 {
    (0..4).fold(0u64, |x, q| x | (h[4 * wi + q] as u64) << (16 * q))
}

/// Collects the candidates `band` of word `wi` of the block at `b0` (`score(j)` gives the
/// score of the block's element `j`: from the score buffer, or a kept weight's magnitude), as
/// far as `cands` has room.
fn collect(
    cands: &mut Vec<u64>,
    score: impl Fn(usize) -> f32,
    b0: usize,
    wi: usize,
    mut band: u64,
) {
    while band != 0 && cands.len() < cands.capacity() {
        let j = wi * 64 + band.trailing_zeros() as usize;
        band &= band - 1;
        cands.push(((simd::key_of(score(j)) as u64) << 32) | (b0 + j) as u64);
    }
}

/// The fused JIT scan over one chunk: the kernel classifies and zeroes each block in its
/// own loop; Rust then updates the mask words and collects the candidates.
fn jit_fused(
    scan: prunec_kernels::jit::KernelFn,
    w: &mut [f32],
    mask: &mut [u64],
    lo: f32,
    gt: f32,
) -> u64 {
    let mut buf = vec![0.0f32; BLOCK];
    let mut ge = [0u16; BLOCK / 16];
    let mut over = [0u16; BLOCK / 16];
    let mut cands: Vec<u64> = Vec::with_capacity(4096);
    let mut above = 0u64;
    let mut nonfinite = false;
    for b0 in (0..w.len()).step_by(BLOCK) {
        let b1 = (b0 + BLOCK).min(w.len());
        let mut a = scan_block_args(w, (b0, b1), &mut buf, (lo, gt), &mut ge);
        a.over = over.as_mut_ptr();
        // SAFETY: the kernel reads and writes `b1 - b0` weights (whole words), writes as many
        // scores into `buf` and one bit per element into `ge` and `over`.
        unsafe { scan(&mut a) };
        nonfinite |= simd::any_nonfinite(&w[b0..b1]);
        for (wi, m) in mask[b0 / 64..b1 / 64].iter_mut().enumerate() {
            let (g, o) = (bits_word(&ge, wi), bits_word(&over, wi));
            let keep = g & *m;
            above += (o & *m).count_ones() as u64;
            *m = keep;
            collect(&mut cands, |j| buf[j], b0, wi, keep & !o);
        }
    }
    assert!(!nonfinite);
    above + cands.len() as u64
}

/// The AVX-512 code generator's writing scan (`prunec_kernels::wide`), block by block: it also
/// settles the mask and counts, so Rust only collects the candidates. The magnitude's
/// writing scan stores no scores (`WideScans::zero_stores_scores`): the candidates' keys come from
/// the magnitudes of their weights, which it left as they were.
fn wide_fused(
    scan: prunec_kernels::jit::KernelFn,
    w: &mut [f32],
    mask: &mut [u64],
    lo: f32,
    gt: f32,
) -> u64 {
    let mut buf = vec![0.0f32; BLOCK];
    let mut ge = [0u16; BLOCK / 16];
    let mut cands: Vec<u64> = Vec::with_capacity(4096);
    let (mut above, mut bad) = (0u64, false);
    for b0 in (0..w.len()).step_by(BLOCK) {
        let b1 = (b0 + BLOCK).min(w.len());
        let mut a = scan_block_args(w, (b0, b1), &mut buf, (lo, gt), &mut ge);
        a.mask = mask[b0 / 64..].as_mut_ptr();
        // SAFETY: the kernel reads and writes `b1 - b0` weights (whole words) and their mask
        // words and writes one bit per element into `ge`.
        unsafe { scan(&mut a) };
        bad |= a.bad != 0;
        above += a.above.iter().map(|&x| x as u64).sum::<u64>();
        for wi in 0..(b1 - b0) / 64 {
            collect(&mut cands, |j| w[b0 + j].abs(), b0, wi, bits_word(&ge, wi));
        }
    }
    assert!(!bad);
    above + cands.len() as u64
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    let ok = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("popcnt");
    #[cfg(not(target_arch = "x86_64"))]
    let ok = false;
    if !ok {
        eprintln!("scan_bound needs an x86-64 CPU with AVX-512F");
        return;
    }
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("PARAMS: a number"))
        .unwrap_or(100_000_000);
    let n = (n / CHUNK).max(1) * CHUNK;
    // Uniform in [-1, 1): 90% have a magnitude below 0.9, 1% lie in [0.9, 0.91].
    let pristine: Vec<f32> = (0..n)
        .into_par_iter()
        .map(|i| {
            let h = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
            h as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect();
    let (lo, hi) = (0.9f32, 0.91f32);
    let (lo_k, hi_k) = (simd::key_of(lo), simd::key_of(hi));
    let mut w = pristine.clone();
    let mut mask = vec![!0u64; n / 64];
    let kernel = compile(&KExpr::magnitude()).expect("compiles");
    let score = kernel.score_raw;
    let wide = prunec_kernels::wide::compile(&KExpr::magnitude()).expect("AVX-512F detected");
    // `wide_fused` takes the candidates' keys from their weights.
    assert!(
        !wide.zero_stores_scores,
        "the magnitude's writing scan stores no scores"
    );
    let (lo_f, gt_f) = (
        simd::ge_bound(lo_k).expect("above zero"),
        simd::gt_bound(hi_k),
    );
    let names = [
        "streaming",
        "fused avx512",
        "fused sse",
        "jit blocks",
        "jit fused",
        "wide fused",
        "prune_jit",
        "  (blocked)",
        "score only",
        "blocks, no writes",
    ];
    let mut times = vec![Vec::new(); names.len()];
    for _ in 0..REPEATS {
        for (v, t) in times.iter_mut().enumerate() {
            w.par_chunks_mut(CHUNK)
                .zip(pristine.par_chunks(CHUNK))
                .for_each(|(a, b)| a.copy_from_slice(b));
            mask.iter_mut().for_each(|m| *m = !0);
            let start = Instant::now();
            let kept: u64 = match v {
                0 => {
                    let f = black_box(1.0f32);
                    w.par_chunks_mut(CHUNK)
                        .for_each(|c| c.iter_mut().for_each(|x| *x *= f));
                    0
                }
                // SAFETY: AVX-512F and POPCNT were detected; chunks hold whole words.
                1 => w
                    .par_chunks_mut(CHUNK)
                    .zip(mask.par_chunks_mut(CHUNK / 64))
                    .map(|(c, m)| unsafe { x86::fused512(c, m, lo, hi).0 })
                    .sum::<u64>(),
                // SAFETY: as above (AVX-512F implies SSE4.1).
                2 => w
                    .par_chunks_mut(CHUNK)
                    .zip(mask.par_chunks_mut(CHUNK / 64))
                    .map(|(c, m)| {
                        let mut scores = [0.0f32; 2048];
                        // SAFETY: as above.
                        let (a, _, top) = unsafe { x86::fused128(c, m, &mut scores, lo, hi) };
                        assert!(top < 0x7f80_0000);
                        a
                    })
                    .sum::<u64>(),
                3 => w
                    .par_chunks_mut(CHUNK)
                    .zip(mask.par_chunks_mut(CHUNK / 64))
                    .map(|(c, m)| jit_blocks(score, c, m, lo_k, hi_k))
                    .sum::<u64>(),
                4 => w
                    .par_chunks_mut(CHUNK)
                    .zip(mask.par_chunks_mut(CHUNK / 64))
                    .map(|(c, m)| jit_fused(kernel.scan_zero, c, m, lo_f, gt_f))
                    .sum::<u64>(),
                5 => w
                    .par_chunks_mut(CHUNK)
                    .zip(mask.par_chunks_mut(CHUNK / 64))
                    .map(|(c, m)| wide_fused(wide.zero, c, m, lo_f, gt_f))
                    .sum::<u64>(),
                8 | 9 => w
                    .par_chunks_mut(CHUNK)
                    .zip(mask.par_chunks_mut(CHUNK / 64))
                    .map(|(c, m)| jit_blocks_read(score, c, m, lo_k, hi_k, v == 9))
                    .sum::<u64>(),
                _ => {
                    prunec_kernels::force_blocked_scan(v == 7);
                    let mut views = vec![TensorView::new("w", n / COLS, COLS, &mut w, &mut mask)];
                    let sel = Selection::Global {
                        keep: n / 10,
                        min_keep: vec![],
                        max_keep: vec![],
                    };
                    let opts = PruneOptions {
                        single_pass: true,
                        ..PruneOptions::default()
                    };
                    let s = prune_jit(&KExpr::magnitude(), &sel, &mut views, &opts);
                    s.expect("prunes").kept() as u64
                }
            };
            black_box(kept);
            t.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    println!(
        "{n} weights: {} MB read and written per pass",
        (n * 4) >> 20
    );
    for (name, t) in names.iter().zip(&mut times) {
        t.sort_by(f64::total_cmp);
        println!(
            "{name:>17}: min {:6.2} ms   median {:6.2} ms",
            t[0],
            t[t.len() / 2]
        );
    }
}
