//! The fused scan kernels alone, both code generators: cranelift's 4-lane loops and the
//! AVX-512 machine code of `prunec_kernels::wide`, for magnitude and Wanda scores.
//!
//! On 100M weights (8 tensors of 4096 columns, pseudo-normal) it scans every block of every
//! chunk in parallel against a fixed key range, as a global cut's first round does, and
//! prints the minimum and median of 11 interleaved runs per variant, in ms. With `--write`
//! the kernels also zero the weights below the range (cranelift's leave the mask to Rust;
//! the AVX-512 ones settle it themselves). Compare with a streaming pass from `scan_bound`.
//!
//! `cargo run --release -p prunec-kernels --example scan_kernels [-- --write]`; needs AVX-512F for
//! the `wide` rows (they print as missing otherwise).

use prunec_kernels::raw::{RawTensor, ScanBits, ScanRange, BLOCK, CHUNK};
use prunec_kernels::{full_mask, simd, KExpr, KernelCache, TensorView};
use rayon::prelude::*;

const COLS: usize = 4096;
const TENSORS: usize = 8;
const RUNS: usize = 12;

fn main() {
    let write = std::env::args().any(|a| a == "--write");
    let n = 100_007_936 / TENSORS;
    let weights = |seed: u64| -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = |k: u32| ((s >> k) & 0xffff) as f32 / 65536.0;
                u(0) + u(16) + u(32) + u(48) - 2.0
            })
            .collect()
    };
    let mut ws: Vec<Vec<f32>> = (0..TENSORS as u64).map(|t| weights(t + 1)).collect();
    let mut masks: Vec<Vec<u64>> = (0..TENSORS).map(|_| full_mask(n)).collect();
    let stat: Vec<f32> = (0..COLS).map(|i| 0.5 + (i % 13) as f32 * 0.1).collect();
    let (wide, narrow) = (KernelCache::new(), KernelCache::narrow());
    let exprs = [
        ("magnitude", KExpr::magnitude()),
        ("wanda", KExpr::wanda(0)),
    ];
    let range = ScanRange {
        lo: simd::ge_bound(0x3f00_0000).expect("above zero"),
        gt: simd::gt_bound(0x3f10_0000),
        write,
        allow: false,
    };
    let mut times = vec![Vec::new(); 4];
    for run in 0..RUNS {
        for (ei, (_, e)) in exprs.iter().enumerate() {
            for (ci, cache) in [&narrow, &wide].into_iter().enumerate() {
                let k = cache.get(e).expect("compiles");
                if ci == 1 && k.wide_for(COLS).is_none() {
                    continue;
                }
                let start = std::time::Instant::now();
                let mut above = 0u64;
                for (w, m) in ws.iter_mut().zip(masks.iter_mut()) {
                    let mut v = TensorView::new("w", n / COLS, COLS, w, m);
                    v.col_stats = vec![&stat];
                    let raw = RawTensor::new(&mut v, std::sync::Arc::new(vec![]));
                    let starts: Vec<usize> = (0..n).step_by(CHUNK).collect();
                    above += starts
                        .par_iter()
                        .map(|&c0| {
                            let mut out = vec![0.0f32; BLOCK];
                            let mut bits = ScanBits::new();
                            let mut sum = 0u64;
                            let c1 = (c0 + CHUNK).min(n);
                            for b0 in (c0..c1).step_by(BLOCK) {
                                let b1 = (b0 + BLOCK).min(c1);
                                // SAFETY: this worker owns the chunk.
                                let st = unsafe {
                                    raw.scan_into(
                                        &k,
                                        b0,
                                        b1,
                                        &range,
                                        &mut out[..b1 - b0],
                                        &mut bits,
                                    )
                                };
                                sum += st.map_or(bits.over[0] as u64, |s| s.above);
                            }
                            sum
                        })
                        .sum::<u64>();
                }
                std::hint::black_box(above);
                if run > 0 {
                    times[2 * ei + ci].push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
    }
    let what = if write { "writing" } else { "read-only" };
    println!("{} weights, {what} scans", n * TENSORS);
    for (i, t) in times.iter_mut().enumerate() {
        let name = format!("{} {}", exprs[i / 2].0, ["cranelift", "wide"][i % 2]);
        if t.is_empty() {
            println!("{name:>20}: missing (no AVX-512 on this host)");
            continue;
        }
        t.sort_by(f64::total_cmp);
        println!(
            "{name:>20}: min {:6.2} ms   median {:6.2} ms",
            t[0],
            t[t.len() / 2]
        );
    }
}
