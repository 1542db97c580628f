//! `prunec bench kernels`: JIT pruning throughput against streaming bandwidth and candle.
//!
//! For each size, weights of that many parameters are spread over 8 tensors of 4096
//! columns. Four cases run: magnitude and Wanda scores, each with a global cut and a per-row
//! cut, keeping 10% of the weights (global) or of every row (per-row). Each case reports the
//! best of its JIT runs (nine up to 20M parameters, five above), the bytes it must move
//! (weights read and written, mask read and written, statistics read), the plain read+write
//! streaming time of the same weights
//! measured in the same run, the same computation written as a chain of candle tensor ops,
//! and the peak extra resident memory during the JIT run.
//!
//! Each case's ratio to streaming is taken two ways: its best run against the best
//! streaming pass (`ratio_to_streaming`, the one the targets are judged by), and, per run,
//! against the streaming pass just before it (`paired_ratio_median`, the median over the
//! runs): the two agree when the machine's bandwidth held still during the case. A third
//! ratio (`ratio_to_prefetched_streaming`) is against the same read+write prefetching 8 KB
//! ahead as the kernels do: stricter on hosts whose hardware prefetcher alone leaves a plain
//! loop short of what memory can do.
//!
//! The timed runs use [`PruneOptions::single_pass`], as the executor does (it works on copies
//! of the weights). Each case also times the same call without it (`two_pass_seconds`): the
//! kernels then read every weight once before writing any, so that an error leaves the
//! tensors untouched, and `two_pass_bound` is the ratio to streaming of moving the case's
//! bytes in the time of one plain read pass plus one streaming pass, the best such a method
//! can reach on this machine.

use std::hint::black_box;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde_json::{json, Value};

use super::expr::KExpr;
use super::raw::CHUNK;
use super::types::{full_mask, PruneOptions, Selection, TensorView};
use super::{prune_jit, KernelCache};

const TENSORS: usize = 8;
const COLS: usize = 4096;
const KEEP: f64 = 0.1;
/// Runs per case (and streaming passes before the first case): more for small sizes, whose
/// calls take milliseconds and vary most from one call to the next; five above, as a slow
/// phase of the machine can last through several runs of a large case
/// (`docs/benchmarks/kernels.md`).
fn repeats(params: usize) -> usize {
    if params <= 20_000_000 {
        9
    } else {
        5
    }
}

struct Layer {
    rows: usize,
    w: Vec<f32>,
    col: Vec<f32>,
    mask: Vec<u64>,
}

/// Deterministic pseudo-normal weights (splitmix64, sum of four uniforms).
fn gen_layer(rows: usize, seed: u64) -> Layer {
    let n = rows * COLS;
    let mut w = vec![0.0f32; n];
    w.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        let mut s = seed ^ ((c as u64) << 32);
        let mut next = || {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
        };
        for x in out.iter_mut() {
            *x = next() + next() + next() + next() - 2.0;
        }
    });
    let col = (0..COLS).map(|j| 0.5 + (j % 17) as f32 * 0.1).collect();
    Layer {
        rows,
        w,
        col,
        mask: full_mask(n),
    }
}

fn views(layers: &mut [Layer]) -> Vec<TensorView<'_>> {
    layers
        .iter_mut()
        .enumerate()
        .map(|(i, l)| {
            let mut v = TensorView::new(
                &format!("layer{i}.weight"),
                l.rows,
                COLS,
                &mut l.w,
                &mut l.mask,
            );
            v.col_stats = vec![&l.col];
            v
        })
        .collect()
}

/// Resident and peak-resident memory in bytes, from `/proc/self/status` (Linux only).
fn rss() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = s.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time (user + system, all threads) this process has used, in seconds (Linux only).
fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let f: Vec<&str> = s.rsplit(')').next()?.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Resets the peak-resident counter so the next reading covers only what follows.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Evicts the weights from the caches before each timed pass, so that every pass, the
/// streaming baseline as much as the kernels, moves its bytes to and from memory: it reads a
/// buffer twice the size of the last-level cache (64 MiB at least), one byte per cache line.
/// Without it, a pass right after the weights were restored from the pristine copy finds
/// part of them still in the last-level cache when they are not much larger than it: the
/// streaming baseline is then partly the cache's bandwidth, and how much of that a kernel
/// gets depends on the order in which it reads the weights rather than on how fast it
/// moves them (`docs/benchmarks/kernels.md`).
struct Evict {
    junk: Vec<u8>,
}

impl Evict {
    fn new() -> Self {
        let llc = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index3/size")
            .ok()
            .and_then(|s| cache_bytes(&s))
            .unwrap_or(32 << 20);
        Evict {
            // Non-zero, so every page is really allocated (not the shared zero page).
            junk: vec![1u8; (2 * llc).max(64 << 20)],
        }
    }

    fn run(&self) {
        let sum: u64 = self
            .junk
            .par_chunks(1 << 20)
            .map(|c| c.iter().step_by(64).map(|&x| x as u64).sum::<u64>())
            .sum();
        black_box(sum);
    }
}

/// A cache size as sysfs writes it (`32768K`, `1M`, or bytes).
fn cache_bytes(s: &str) -> Option<usize> {
    let s = s.trim();
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: usize = n.parse().ok()?;
    match unit {
        "K" => Some(n << 10),
        "M" => Some(n << 20),
        "" => Some(n),
        _ => None,
    }
}

/// Plain parallel read+write of every weight, in the same chunks the kernels use.
fn stream(layers: &mut [Layer]) -> f64 {
    let f = black_box(1.0f32);
    let t = Instant::now();
    for l in layers.iter_mut() {
        l.w.par_chunks_mut(CHUNK).for_each(|c| {
            for x in c.iter_mut() {
                *x *= f;
            }
        });
    }
    t.elapsed().as_secs_f64()
}

/// The same read+write, each line prefetched 8 KB ahead into the second-level cache as the
/// kernels' scans do (`wide::PREFETCH`): a stricter baseline than [`stream`] on hosts where
/// the hardware prefetcher alone leaves a plain loop short of what memory can do (where one
/// core's bandwidth is bound by the misses it keeps in flight; `docs/benchmarks/kernels.md`).
fn stream_prefetched(layers: &mut [Layer]) -> f64 {
    const AHEAD: usize = 8192 / 4;
    let f = black_box(1.0f32);
    let t = Instant::now();
    for l in layers.iter_mut() {
        l.w.par_chunks_mut(CHUNK).for_each(|c| {
            let base = c.as_ptr();
            for (i, line) in c.chunks_mut(16).enumerate() {
                // Past the chunk's end it prefetches the next chunk or nothing: a hint.
                super::simd::prefetch_l2(base.wrapping_add(16 * i + AHEAD) as *const u8);
                for x in line {
                    *x *= f;
                }
            }
        });
    }
    t.elapsed().as_secs_f64()
}

/// Plain parallel read of every weight (a max-reduction), in the same chunks: what one
/// reading pass over the weights costs at best.
fn read_pass(layers: &[Layer]) -> f64 {
    let t = Instant::now();
    let mut m = 0.0f32;
    for l in layers {
        m = m.max(
            l.w.par_chunks(CHUNK)
                .map(|c| c.iter().fold(0.0f32, |a, &x| a.max(x)))
                .reduce(|| 0.0, f32::max),
        );
    }
    black_box(m);
    t.elapsed().as_secs_f64()
}

/// The same pruning as a chain of candle ops (scores, threshold, compare, multiply, copy
/// back). candle has no k-th value op: the global threshold is taken from the scores with
/// `select_nth_unstable` in Rust, which favours the baseline; per-row uses `sort_last_dim`.
fn candle_chain(layers: &mut [Layer], wanda: bool, global: bool) -> candle_core::Result<f64> {
    let dev = Device::Cpu;
    let t = Instant::now();
    let mut ws = Vec::new();
    let mut scores = Vec::new();
    for l in layers.iter() {
        let w = Tensor::from_slice(&l.w, (l.rows, COLS), &dev)?;
        let mut s = w.abs()?;
        if wanda {
            let c = Tensor::from_slice(&l.col, (1, COLS), &dev)?;
            s = s.broadcast_mul(&c)?;
        }
        ws.push(w);
        scores.push(s);
    }
    let masks: Vec<Tensor> = if global {
        let flat: Vec<Tensor> = scores
            .iter()
            .map(|s| s.flatten_all())
            .collect::<Result<_, _>>()?;
        let all = Tensor::cat(&flat, 0)?;
        let mut v = all.to_vec1::<f32>()?;
        let keep = ((v.len() as f64) * KEEP) as usize;
        let (_, th, _) = v.select_nth_unstable_by(keep.max(1) - 1, |a, b| b.total_cmp(a));
        let th = *th;
        scores
            .iter()
            .map(|s| s.ge(th as f64))
            .collect::<Result<_, _>>()?
    } else {
        let k = ((COLS as f64) * KEEP) as usize;
        scores
            .iter()
            .map(|s| {
                let (sorted, _) = s.sort_last_dim(false)?;
                let th = sorted.narrow(1, k - 1, 1)?;
                s.broadcast_ge(&th)
            })
            .collect::<Result<_, _>>()?
    };
    for ((l, w), m) in layers.iter_mut().zip(&ws).zip(&masks) {
        let pruned = w.mul(&m.to_dtype(DType::F32)?)?;
        l.w = pruned.flatten_all()?.to_vec1::<f32>()?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Runs the kernel benchmark at each total parameter count in `sizes`.
pub fn bench_kernels(sizes: &[usize], json: bool) -> Result<Value, String> {
    let _ = json; // The caller chooses the rendering: JSON as is, or `bench_table`.
    let threads = rayon::current_num_threads();
    let evict = Evict::new();
    let mut cases = Vec::new();
    for &size in sizes {
        let rows = (size / TENSORS).div_ceil(COLS).max(1);
        let mut pristine: Vec<Layer> = (0..TENSORS)
            .map(|i| gen_layer(rows, 1000 + i as u64))
            .collect();
        let params = rows * COLS * TENSORS;
        let weight_bytes = (params * 4) as u64;
        let mut work: Vec<Layer> = (0..TENSORS)
            .map(|i| gen_layer(rows, 1000 + i as u64))
            .collect();
        let restore = |work: &mut [Layer], pristine: &[Layer]| {
            for (a, b) in work.iter_mut().zip(pristine) {
                a.w.par_chunks_mut(CHUNK)
                    .zip(b.w.par_chunks(CHUNK))
                    .for_each(|(x, y)| x.copy_from_slice(y));
                a.mask.copy_from_slice(&b.mask);
            }
        };
        // Streaming is measured again next to every case's runs: a machine's bandwidth can
        // drift, and each ratio compares times taken in the same moments.
        let runs = repeats(params);
        let first_stream = (0..runs)
            .map(|_| {
                evict.run();
                stream(&mut work)
            })
            .fold(f64::INFINITY, f64::min);
        let first_pf = (0..runs)
            .map(|_| {
                evict.run();
                stream_prefetched(&mut work)
            })
            .fold(f64::INFINITY, f64::min);
        let single = PruneOptions {
            single_pass: true,
            ..PruneOptions::default()
        };
        let read_s = (0..runs)
            .map(|_| {
                evict.run();
                read_pass(&work)
            })
            .fold(f64::INFINITY, f64::min);
        for (name, expr) in [
            ("magnitude", KExpr::magnitude()),
            ("wanda", KExpr::wanda(0)),
        ] {
            KernelCache::global()
                .get(&expr)
                .map_err(|e| e.to_string())?;
            for global in [true, false] {
                let sel = if global {
                    Selection::Global {
                        keep: ((params as f64) * KEEP) as usize,
                        min_keep: vec![],
                        max_keep: vec![],
                    }
                } else {
                    Selection::PerRow {
                        keep_per_row: ((COLS as f64) * KEEP) as usize,
                    }
                };
                let mut best = f64::INFINITY;
                let mut two_pass = f64::INFINITY;
                let mut best_cpu: Option<f64> = None;
                let mut peak_extra = None;
                let mut kept = 0;
                let mut stream_s = first_stream;
                let mut pf_s = first_pf;
                // Per run: the streaming pass just before it over the run's time.
                let mut paired = Vec::with_capacity(runs);
                for _ in 0..runs {
                    evict.run();
                    let stream_now = stream(&mut work);
                    stream_s = stream_s.min(stream_now);
                    evict.run();
                    pf_s = pf_s.min(stream_prefetched(&mut work));
                    restore(&mut work, &pristine);
                    evict.run();
                    let before = rss();
                    let reset = reset_peak();
                    let t = Instant::now();
                    let c0 = cpu_seconds();
                    let s = {
                        let mut v = views(&mut work);
                        prune_jit(&expr, &sel, &mut v, &single)
                            .map_err(|e| format!("{name}: {e}"))?
                    };
                    let run_s = t.elapsed().as_secs_f64();
                    best = best.min(run_s);
                    paired.push(stream_now / run_s);
                    if let (Some(a), Some(b)) = (c0, cpu_seconds()) {
                        best_cpu = Some(best_cpu.map_or(b - a, |x: f64| x.min(b - a)));
                    }
                    kept = s.kept();
                    if let (true, Some((rss0, _)), Some((_, hwm))) = (reset, before, rss()) {
                        let extra = hwm.saturating_sub(rss0);
                        peak_extra = Some(peak_extra.map_or(extra, |p: u64| p.max(extra)));
                    }
                    restore(&mut work, &pristine);
                    evict.run();
                    let t = Instant::now();
                    let s2 = {
                        let mut v = views(&mut work);
                        prune_jit(&expr, &sel, &mut v, &PruneOptions::default())
                            .map_err(|e| format!("{name}: {e}"))?
                    };
                    two_pass = two_pass.min(t.elapsed().as_secs_f64());
                    if s2 != s {
                        return Err(format!("{name}: one and two passes disagree"));
                    }
                }
                restore(&mut work, &pristine);
                evict.run();
                let candle_s =
                    candle_chain(&mut work, name == "wanda", global).map_err(|e| e.to_string())?;
                let mask_bytes = (params as u64).div_ceil(8);
                let stat_bytes = if name == "wanda" {
                    (TENSORS * COLS * 4) as u64
                } else {
                    0
                };
                let bytes = 2 * weight_bytes + 2 * mask_bytes + stat_bytes;
                let gbs = bytes as f64 / best / 1e9;
                paired.sort_by(f64::total_cmp);
                let paired_ratio =
                    paired[paired.len() / 2] * bytes as f64 / (2 * weight_bytes) as f64;
                let stream_gbs = 2.0 * weight_bytes as f64 / stream_s / 1e9;
                let pf_gbs = 2.0 * weight_bytes as f64 / pf_s / 1e9;
                cases.push(json!({
                    "params": params,
                    "tensors": TENSORS,
                    "criterion": name,
                    "selection": if global { "global" } else { "per-row" },
                    "kept": kept,
                    "runs": runs,
                    "seconds": best,
                    "cpu_seconds": best_cpu,
                    "bytes_moved": bytes,
                    "gb_per_s": gbs,
                    "streaming_seconds": stream_s,
                    "streaming_gb_per_s": stream_gbs,
                    "ratio_to_streaming": gbs / stream_gbs,
                    "paired_ratio_median": paired_ratio,
                    "prefetched_streaming_seconds": pf_s,
                    "prefetched_streaming_gb_per_s": pf_gbs,
                    "ratio_to_prefetched_streaming": gbs / pf_gbs,
                    "read_seconds": read_s,
                    "two_pass_seconds": two_pass,
                    "two_pass_ratio": bytes as f64 / two_pass / 1e9 / stream_gbs,
                    // The same bytes moved in one plain read pass plus one streaming pass.
                    "two_pass_bound": bytes as f64 / (read_s + stream_s) / 1e9 / stream_gbs,
                    "candle_seconds": candle_s,
                    "speedup_vs_candle": candle_s / best,
                    "weights_bytes": weight_bytes,
                    "peak_extra_bytes": peak_extra,
                    "peak_extra_fraction": peak_extra.map(|p| p as f64 / weight_bytes as f64),
                }));
            }
        }
        drop(pristine.drain(..));
    }
    let load = std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| {
        l.split_whitespace()
            .next()
            .and_then(|x| x.parse::<f64>().ok())
    });
    // Which code the scans and the selection ran: the AVX-512 scans of `super::wide` (where
    // the host has them; otherwise cranelift's) and the vectorised Rust of `super::simd`.
    let scans = if super::wide::available() {
        "avx512"
    } else {
        "cranelift"
    };
    Ok(json!({
        "threads": threads,
        "evicted_bytes": evict.junk.len(),
        "keep_fraction": KEEP,
        "load_average": load,
        "scan_code": scans,
        "selection_code": super::simd::isa_name(),
        "cases": cases,
    }))
}

/// A Markdown table of a [`bench_kernels`] result.
pub fn bench_table(v: &Value) -> String {
    let mut s = String::from(
        "| params | criterion | selection | seconds | cpu s | GB/s | streaming GB/s | ratio | paired ratio | pf streaming GB/s | pf ratio | 2-pass s | 2-pass ratio | 2-pass bound | candle s | speedup | peak extra |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for c in v["cases"].as_array().into_iter().flatten() {
        let f = |k: &str| c[k].as_f64().unwrap_or(f64::NAN);
        s.push_str(&format!(
            "| {} | {} | {} | {:.4} | {:.2} | {:.1} | {:.1} | {:.0}% | {:.0}% | {:.1} | {:.0}% | {:.4} | {:.0}% | {:.0}% | {:.3} | {:.1}x | {} |\n",
            c["params"],
            c["criterion"].as_str().unwrap_or(""),
            c["selection"].as_str().unwrap_or(""),
            f("seconds"),
            f("cpu_seconds"),
            f("gb_per_s"),
            f("streaming_gb_per_s"),
            100.0 * f("ratio_to_streaming"),
            100.0 * f("paired_ratio_median"),
            f("prefetched_streaming_gb_per_s"),
            100.0 * f("ratio_to_prefetched_streaming"),
            f("two_pass_seconds"),
            100.0 * f("two_pass_ratio"),
            100.0 * f("two_pass_bound"),
            f("candle_seconds"),
            f("speedup_vs_candle"),
            match c["peak_extra_fraction"].as_f64() {
                Some(p) => format!(
                    "{:.1} MB ({:.1}% of weights)",
                    f("peak_extra_bytes") / 1e6,
                    100.0 * p
                ),
                None => "n/a".to_string(),
            },
        ));
    }
    s.push_str(&format!(
        "\nScans: {} code; selection: {} code; {} threads; caches evicted before every timed \
         pass ({:.0} MB read).\n",
        v["scan_code"].as_str().unwrap_or("?"),
        v["selection_code"].as_str().unwrap_or("?"),
        v["threads"],
        v["evicted_bytes"].as_f64().unwrap_or(0.0) / 1e6,
    ));
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn cache_sizes_parse_as_sysfs_writes_them() {
        assert_eq!(super::cache_bytes("32768K\n"), Some(32 << 20));
        assert_eq!(super::cache_bytes("1M"), Some(1 << 20));
        assert_eq!(super::cache_bytes("4096"), Some(4096));
        assert_eq!(super::cache_bytes("12G"), None);
        assert_eq!(super::cache_bytes(""), None);
    }
}
