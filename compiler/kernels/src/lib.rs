//! Fused score → select → mask kernels: reference interpreter and cranelift JIT.
//!
//! A criterion lowers to a [`KExpr`]. [`prune_jit`] compiles it (once per distinct
//! expression, see [`KernelCache`]) into native loops over raw `f32` buffers and prunes a set
//! of [`TensorView`]s according to a [`Selection`]; [`prune_reference`] does the same by
//! interpreting the expression and sorting, and both give bit-identical masks and weights.
//! Results never depend on the number of threads: work is cut into fixed chunks
//! ([`raw::CHUNK`] elements) and merged in order. See `docs/kernels.md`.

pub mod abi;
pub mod bench;
mod cut;
pub mod expr;
pub mod jit;
pub mod raw;
pub mod reference;
mod rows;
pub mod simd;
#[cfg(test)]
mod testing;
mod translate;
pub mod types;
pub mod wide;

use std::sync::Arc;

use rayon::prelude::*;

pub use bench::{bench_kernels, bench_table};
pub use expr::{BinOp, CmpOp, KExpr, KInput, UnOp};
pub use raw::KernelCache;
pub use reference::{prune_reference, score_reference};
pub use types::{
    full_mask, mask_bit, mask_words, KernelError, PruneOptions, PruneSummary, Selection,
    TensorSummary, TensorView,
};

pub use cut::force_blocked_scan;
use cut::{find_cuts, Cut, CutError, Member, Pool};
use expr::key_score;
use raw::{chunks_of, with_scratch, RawTensor};
use types::{check_finite, count_alive, global_guards, validate};

/// Test hook: replaces the sampled key range of every global or per-tensor cut made on the
/// calling thread (`None`: sample as usual).
#[cfg(any(test, feature = "test-hooks"))]
#[doc(hidden)]
pub fn force_sample_range(range: Option<(u32, u32)>) {
    cut::hooks::FORCE_RANGE.with(|f| f.set(range));
}

/// Test hook: the writing (single-pass) scans run on the calling thread since the last call.
#[cfg(any(test, feature = "test-hooks"))]
#[doc(hidden)]
pub fn take_speculated() -> usize {
    cut::hooks::SPECULATED.with(|c| c.replace(0))
}

/// Scores every element of `t` (pruned ones included) with the JIT; NaN scores are canonical.
pub fn score_jit(
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
    let k = KernelCache::global().get(expr)?;
    let raw = RawTensor::read_only(t, Arc::new(opts.scalars.clone()));
    let mut out = vec![0.0f32; raw.len];
    let chunks: Vec<_> = chunks_of(0, raw.len).collect();
    out.par_chunks_mut(raw::CHUNK)
        .zip(chunks.par_iter())
        .for_each(|(o, c)| {
            let mut a = raw.args(c.start, c.end);
            a.out = o.as_mut_ptr();
            // SAFETY: score only reads the tensor and writes `end - start` values into `o`.
            unsafe { raw.run(k.score, &mut a) };
        });
    Ok(out)
}

/// Prunes `tensors` by `expr` under `sel` with JIT-compiled kernels from the global cache.
pub fn prune_jit(
    expr: &KExpr,
    sel: &Selection,
    tensors: &mut [TensorView],
    opts: &PruneOptions,
) -> Result<PruneSummary, KernelError> {
    prune_jit_with(KernelCache::global(), expr, sel, tensors, opts)
}

/// [`prune_jit`] with an explicit kernel cache.
///
/// Called from outside the thread pool, the whole call moves onto one of its workers (and
/// the caller waits): each parallel step then starts on a worker, instead of handing its
/// work to the pool and being woken at its end, a round trip per step, and a global cut
/// takes five or six steps (`docs/benchmarks/kernels.md`). The unit tests (and callers
/// with the `test-hooks` feature) keep the calling thread: their hooks are thread-local.
pub fn prune_jit_with(
    cache: &KernelCache,
    expr: &KExpr,
    sel: &Selection,
    tensors: &mut [TensorView],
    opts: &PruneOptions,
) -> Result<PruneSummary, KernelError> {
    if cfg!(any(test, feature = "test-hooks")) || rayon::current_thread_index().is_some() {
        prune_here(cache, expr, sel, tensors, opts)
    } else {
        rayon::scope(|_| prune_here(cache, expr, sel, tensors, opts))
    }
}

fn prune_here(
    cache: &KernelCache,
    expr: &KExpr,
    sel: &Selection,
    tensors: &mut [TensorView],
    opts: &PruneOptions,
) -> Result<PruneSummary, KernelError> {
    let start = std::time::Instant::now();
    validate(expr, sel, tensors, opts)?;
    let k = cache.get(expr)?;
    raw::trace("validate", start);
    // All tensors at once: one parallel loop each left the threads idle at every end.
    let alive: Vec<usize> = tensors
        .par_iter()
        .map(|t| count_alive(t.mask, t.len()))
        .collect();
    raw::trace("alive", start);
    let scalars = Arc::new(opts.scalars.clone());
    let names: Vec<String> = tensors.iter().map(|t| t.name.clone()).collect();
    let shapes: Vec<(usize, usize)> = tensors.iter().map(|t| (t.rows, t.cols)).collect();
    let mut thresholds: Vec<Option<u32>> = vec![None; tensors.len()];
    let check = !opts.allow_nonfinite;
    let row_local = matches!(
        sel,
        Selection::PerRow { .. } | Selection::NM { .. } | Selection::Block { .. }
    );
    // Per-row selections on rows of whole mask words run in two passes: the first reads
    // (checking finiteness as it goes) and writes the new masks to side bitmaps, the second
    // applies them. Other row-local selections are checked before anything is written.
    let two_pass: Vec<bool> = tensors
        .iter()
        .map(|t| matches!(sel, Selection::PerRow { .. }) && rows::per_row_aligned(t.cols))
        .collect();
    if row_local && check {
        let others = tensors
            .iter()
            .zip(&two_pass)
            .filter(|&(_, &tp)| !tp)
            .any(|(t, _)| t.weights.par_chunks(raw::CHUNK).any(simd::any_nonfinite));
        if others {
            check_finite(tensors)?;
        }
    }
    // Global and per-tensor guards are validated before anything is read.
    let mut pools: Vec<Pool> = Vec::new();
    match sel {
        Selection::Global {
            keep,
            min_keep,
            max_keep,
        } => {
            let guards = global_guards(*keep, min_keep, max_keep, tensors, &alive)?;
            let unguarded = guards
                .iter()
                .zip(&alive)
                .all(|(&(min, max), &a)| min == 0 && max >= a);
            pools.push(Pool {
                members: guards
                    .iter()
                    .enumerate()
                    .map(|(t, &(min, max))| Member {
                        tensor: t,
                        min,
                        max,
                    })
                    .collect(),
                keep: *keep,
                alive: alive.iter().sum(),
                speculate: opts.single_pass && unguarded,
            });
        }
        Selection::PerTensor { keep } => {
            for t in 0..tensors.len() {
                if keep[t] > alive[t] {
                    return Err(KernelError::KeepTooLarge {
                        tensor: names[t].clone(),
                        keep: keep[t],
                        alive: alive[t],
                    });
                }
                pools.push(single(t, keep[t], alive[t], opts.single_pass));
            }
        }
        _ => {}
    }
    raw::trace("pools", start);
    // Side bitmaps (1/32 of the weights' size) for the two-pass per-row selections (single-pass
    // rows use a row buffer); global and per-tensor cuts attach theirs when a round needs them.
    let needs_side: Vec<bool> = two_pass.iter().map(|&tp| tp && !opts.single_pass).collect();
    let mut sides: Vec<Vec<u64>> = tensors
        .iter()
        .zip(&needs_side)
        .map(|(t, &ns)| {
            if ns {
                vec![0u64; t.len().div_ceil(64)]
            } else {
                Vec::new()
            }
        })
        .collect();
    let mut raws: Vec<RawTensor> = tensors
        .iter_mut()
        .zip(sides.iter_mut())
        .zip(&needs_side)
        .map(|((t, side), &ns)| {
            let mut r = RawTensor::new(t, scalars.clone());
            if ns {
                r.set_side(side);
            }
            r
        })
        .collect();
    let mut kept = vec![0usize; raws.len()];
    raw::trace("setup", start);
    if row_local {
        if let Selection::PerRow { keep_per_row } = *sel {
            let which: Vec<(usize, usize)> = (0..raws.len())
                .filter(|&t| two_pass[t])
                .map(|t| (t, shapes[t].0))
                .collect();
            let single = opts.single_pass;
            let Ok(counts) = rows::per_row_select(&k, &raws, &which, keep_per_row, check, single)
            else {
                // Rows holding a non-finite weight are never written, so the check finds the
                // same first one as on untouched tensors.
                drop(raws);
                check_finite(tensors)?;
                unreachable!("a per-row pass saw a non-finite weight that the check did not");
            };
            let ts: Vec<usize> = which.iter().map(|&(t, _)| t).collect();
            let counts = if single {
                counts
            } else {
                rows::apply_sides(&raws, &ts)
            };
            for (&t, n) in ts.iter().zip(counts) {
                kept[t] = n;
            }
        }
        for (t, raw) in raws.iter().enumerate() {
            let rows = shapes[t].0;
            if two_pass[t] {
                continue;
            }
            kept[t] = match *sel {
                Selection::PerRow { keep_per_row } => rows::per_row(&k, raw, rows, keep_per_row),
                Selection::NM { n, m } => rows::n_m(&k, raw, rows, n, m),
                Selection::Block {
                    rows: br,
                    cols: bc,
                    keep,
                } => rows::blocks(&k, raw, rows, br, bc, keep),
                _ => unreachable!(),
            };
        }
    } else {
        let cuts = match find_cuts(&k, &mut raws, &mut sides, &pools, check) {
            Ok(c) => c,
            Err(CutError::NonFinite) => {
                // Non-finite weights are never written (the scans stop writing at the block
                // holding one, and never zero it), so the check finds the same first one as
                // on untouched tensors.
                drop(raws);
                check_finite(tensors)?;
                unreachable!("a scan saw a non-finite weight that the check did not");
            }
            Err(CutError::SampleMissed(p)) => {
                let t = pools[p].members[0].tensor;
                return Err(KernelError::SampleMissed {
                    tensor: names[t].clone(),
                });
            }
        };
        raw::trace("cuts", start);
        // Members whose prefix count was clamped by a guard select their own top count.
        let mut plan: Vec<(Cut, Vec<usize>)> = Vec::new();
        let mut second: Vec<Pool> = Vec::new();
        for (pool, cut) in pools.iter().zip(cuts) {
            let mut direct = Vec::new();
            for (mi, m) in pool.members.iter().enumerate() {
                let want = cut.taken[mi].clamp(m.min, m.max);
                if want == cut.taken[mi] {
                    direct.push(mi);
                } else {
                    second.push(single(m.tensor, want, alive[m.tensor], false));
                }
            }
            let tensors_of: Vec<usize> = pool.members.iter().map(|m| m.tensor).collect();
            plan.push((cut, direct.iter().map(|&mi| tensors_of[mi]).collect()));
            let last = plan.last_mut().expect("just pushed");
            last.0.chunks = direct
                .iter()
                .map(|&mi| std::mem::take(&mut last.0.chunks[mi]))
                .collect();
        }
        if !second.is_empty() {
            let cuts = find_cuts(&k, &mut raws, &mut sides, &second, false)
                .unwrap_or_else(|_| unreachable!("no check and no speculation"));
            for (pool, cut) in second.iter().zip(cuts) {
                plan.push((cut, vec![pool.members[0].tensor]));
            }
        }
        let mut work = Vec::new();
        for (cut, ts) in &plan {
            for (t, chunks) in ts.iter().zip(&cut.chunks) {
                thresholds[*t] = Some(cut.t);
                for cc in chunks {
                    work.push((cc, cut.t));
                }
            }
        }
        let t0 = std::time::Instant::now();
        raw::trace("plan", start);
        // Backwards: the chunks the scan read last may still be in the last-level cache.
        let counts: Vec<(usize, usize)> = work
            .par_iter()
            .rev()
            .map(|&(cc, t)| {
                let c = cc.chunk;
                let raw = &raws[c.tensor];
                if let Some(above) = cc.fixup {
                    // The speculative scan zeroed the elements below the range and left the
                    // mask holding those in and above it: only dropped candidates remain.
                    let mut n = above as usize;
                    cc.each_candidate(t, |j, keep| {
                        let i = c.start + j;
                        if keep {
                            n += 1;
                        } else {
                            // SAFETY: element `i` and its mask word lie in this worker's chunk.
                            unsafe {
                                raw.set_weight(i, 0.0);
                                let m = raw.mask_word(i / 64) & !(1u64 << (i % 64));
                                raw.set_mask_word(i / 64, m);
                            }
                        }
                    });
                    return (c.tensor, n);
                }
                if cc.cands.is_some() {
                    // Resolved from this chunk's candidates: the scan's side bits (alive,
                    // above the range) plus the kept candidates are the new mask.
                    let (w0, w1) = (c.start / 64, c.end.div_ceil(64));
                    // SAFETY: chunks are disjoint, start at multiples of 64 and each appears
                    // once, so this worker owns the chunk, its mask and side words.
                    let (w, m, side) = unsafe {
                        (
                            raw.weights_mut(c.start, c.end),
                            raw.mask_words_mut(w0, w1),
                            raw.side_words_mut(w0, w1),
                        )
                    };
                    cc.each_candidate(t, |j, keep| {
                        if keep {
                            side[j / 64] |= 1u64 << (j % 64);
                        }
                    });
                    return (c.tensor, simd::zero_words(w, side, m));
                }
                let mut quota = cc.quota;
                let mut n = 0;
                with_scratch(|buf| {
                    let mut b0 = c.start;
                    while b0 < c.end {
                        let b1 = (b0 + raw::BLOCK).min(c.end);
                        raw.score_into(k.score_raw, b0, b1, buf);
                        // SAFETY: chunks are disjoint, start at multiples of 64 and each
                        // appears once, so this worker owns the block and its mask words.
                        let (w, m, ahead) = unsafe {
                            (
                                raw.weights_mut(b0, b1),
                                raw.mask_words_mut(b0 / 64, b1.div_ceil(64)),
                                raw.weights(b1, (b1 + raw::BLOCK).min(c.end)),
                            )
                        };
                        n += simd::apply_words(buf, w, m, t, &mut quota, ahead);
                        b0 = b1;
                    }
                });
                (c.tensor, n)
            })
            .collect();
        raw::trace("apply", t0);
        for (t, n) in counts {
            kept[t] += n;
        }
    }
    drop(raws);
    drop(sides);
    raw::trace("total", start);
    Ok(PruneSummary {
        tensors: (0..names.len())
            .map(|t| TensorSummary {
                name: names[t].clone(),
                total: shapes[t].0 * shapes[t].1,
                alive_before: alive[t],
                kept: kept[t],
                threshold: if kept[t] > 0 {
                    thresholds[t].map(key_score)
                } else {
                    None
                },
            })
            .collect(),
    })
}

fn single(t: usize, keep: usize, alive: usize, speculate: bool) -> Pool {
    Pool {
        members: vec![Member {
            tensor: t,
            min: 0,
            max: usize::MAX,
        }],
        keep,
        alive,
        speculate,
    }
}
