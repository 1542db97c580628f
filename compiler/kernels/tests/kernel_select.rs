//! Selection tests at sizes that exercise every round of the JIT cut (sampling, narrowing,
//! candidate overflow, massive ties), thread-count independence, and the error messages.

use std::cell::Cell;

use prunec_kernels::{
    full_mask, mask_bit, prune_jit_with, prune_reference, KExpr, KInput, KernelCache, KernelError,
    PruneOptions, PruneSummary, Selection, TensorView,
};

thread_local! {
    /// The JIT runs use cranelift's scans only, not the AVX-512 ones (this thread).
    static NARROW: Cell<bool> = const { Cell::new(false) };
}

/// The kernel cache the JIT runs use (see [`NARROW`]).
fn cache() -> &'static KernelCache {
    static NARROW_CACHE: std::sync::OnceLock<KernelCache> = std::sync::OnceLock::new();
    if NARROW.with(|n| n.get()) {
        NARROW_CACHE.get_or_init(KernelCache::narrow)
    } else {
        KernelCache::global()
    }
}

/// Runs `f` with each code generator for the scans: the AVX-512 one (where the host has it)
/// and cranelift's.
fn each_generator(mut f: impl FnMut()) {
    for narrow in [false, true] {
        NARROW.with(|n| n.set(narrow));
        f();
    }
    NARROW.with(|n| n.set(false));
}

/// A small deterministic generator (splitmix64), so tests need no data files.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Roughly normal (sum of uniforms).
    fn normal(&mut self) -> f32 {
        let mut s = 0.0f32;
        for _ in 0..4 {
            s += (self.next() >> 40) as f32 / (1u64 << 24) as f32;
        }
        s - 2.0
    }
}

#[derive(Clone)]
struct Data {
    name: String,
    rows: usize,
    cols: usize,
    w: Vec<f32>,
    grad: Vec<f32>,
    col: Vec<f32>,
    mask: Vec<u64>,
}

impl Data {
    fn new(name: &str, rows: usize, cols: usize, seed: u64, f: impl Fn(&mut Rng) -> f32) -> Self {
        let mut r = Rng(seed);
        let n = rows * cols;
        Data {
            name: name.to_string(),
            rows,
            cols,
            w: (0..n).map(|_| f(&mut r)).collect(),
            grad: (0..n).map(|_| r.normal()).collect(),
            col: (0..cols).map(|_| r.normal().abs()).collect(),
            mask: full_mask(n),
        }
    }

    fn view(&mut self) -> TensorView<'_> {
        let mut v = TensorView::new(
            &self.name,
            self.rows,
            self.cols,
            &mut self.w,
            &mut self.mask,
        );
        v.grad = Some(&self.grad);
        v.col_stats = vec![&self.col];
        v
    }
}

fn run(
    ds: &mut [Data],
    e: &KExpr,
    sel: &Selection,
    jit: bool,
) -> Result<PruneSummary, KernelError> {
    run_with(ds, e, sel, jit, &PruneOptions::default())
}

fn run_with(
    ds: &mut [Data],
    e: &KExpr,
    sel: &Selection,
    jit: bool,
    o: &PruneOptions,
) -> Result<PruneSummary, KernelError> {
    let mut views: Vec<TensorView> = ds.iter_mut().map(|d| d.view()).collect();
    if jit {
        prune_jit_with(cache(), e, sel, &mut views, o)
    } else {
        prune_reference(e, sel, &mut views, o)
    }
}

/// JIT (with and without `single_pass`) and reference give the same summary, masks and
/// weight bits; returns the JIT summary.
fn check_same(ds: &[Data], e: &KExpr, sel: &Selection) -> PruneSummary {
    let mut b = ds.to_vec();
    let sb = run(&mut b, e, sel, false).expect("reference");
    let mut out = None;
    each_generator(|| {
        for single_pass in [false, true] {
            let mut a = ds.to_vec();
            let o = PruneOptions {
                single_pass,
                ..PruneOptions::default()
            };
            let sa = run_with(&mut a, e, sel, true, &o).expect("jit");
            let narrow = NARROW.with(|n| n.get());
            assert_eq!(
                format!("{sa:?}"),
                format!("{sb:?}"),
                "{e} {sel:?} single pass {single_pass} narrow {narrow}"
            );
            assert_same_bits(
                &a,
                &b,
                &format!("single pass {single_pass} narrow {narrow}"),
            );
            out = Some(sa);
        }
    });
    out.expect("ran")
}

/// The tensors of `a` and `b` have the same masks and weight bits.
fn assert_same_bits(a: &[Data], b: &[Data], what: &str) {
    for (x, y) in a.iter().zip(b) {
        assert!(x.mask == y.mask, "mask of {} differs ({what})", x.name);
        assert!(
            x.w.iter()
                .zip(&y.w)
                .all(|(p, q)| p.to_bits() == q.to_bits()),
            "weights of {} differ ({what})",
            x.name
        );
    }
}

/// The JIT gives the same summary, weights and masks with 1, 2 and 3 threads, with and
/// without `single_pass`.
fn assert_thread_independent(ds: &[Data], e: &KExpr, sel: &Selection) {
    for single_pass in [false, true] {
        let o = PruneOptions {
            single_pass,
            ..PruneOptions::default()
        };
        let mut outs = Vec::new();
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut d = ds.to_vec();
            let s = pool.install(|| run_with(&mut d, e, sel, true, &o)).unwrap();
            outs.push((format!("{s:?}"), d));
        }
        for w in outs.windows(2) {
            assert_eq!(w[0].0, w[1].0, "{sel:?} single pass {single_pass}");
            assert_same_bits(
                &w[0].1,
                &w[1].1,
                &format!("{sel:?} single pass {single_pass}"),
            );
        }
    }
}

fn model(f: impl Fn(&mut Rng) -> f32 + Copy) -> Vec<Data> {
    vec![
        Data::new("fc1.weight", 300, 1000, 1, f),
        Data::new("fc2.weight", 500, 700, 2, f),
        Data::new("head.weight", 10, 333, 3, f),
    ]
}

fn alive(ds: &[Data]) -> usize {
    ds.iter()
        .map(|d| {
            (0..d.rows * d.cols)
                .filter(|&i| mask_bit(&d.mask, i))
                .count()
        })
        .sum()
}

#[test]
fn global_magnitude_matches_reference_and_hits_the_count() {
    let ds = model(|r| r.normal());
    let total = alive(&ds);
    for frac in [0.1, 0.5, 0.93] {
        let keep = (total as f64 * frac) as usize;
        let sel = Selection::Global {
            keep,
            min_keep: vec![],
            max_keep: vec![],
        };
        let s = check_same(&ds, &KExpr::magnitude(), &sel);
        assert_eq!(s.kept(), keep);
    }
}

#[test]
fn massive_ties_keep_the_first_elements() {
    // Every weight equal: the cut is one key with far more ties than can be collected.
    let ds = model(|_| 0.25);
    let total = alive(&ds);
    let keep = total * 3 / 5;
    let sel = Selection::Global {
        keep,
        min_keep: vec![],
        max_keep: vec![],
    };
    let mut a = ds.clone();
    let s = run(&mut a, &KExpr::magnitude(), &sel, true).unwrap();
    assert_eq!(s.kept(), keep);
    // Ties break by position: fc1 (300k) is kept whole, then the start of fc2.
    assert_eq!(s.tensors[0].kept, 300_000);
    assert_eq!(s.tensors[1].kept, keep - 300_000);
    assert!(mask_bit(&a[1].mask, keep - 300_001) && !mask_bit(&a[1].mask, keep - 300_000));
    check_same(&ds, &KExpr::magnitude(), &sel);
}

#[test]
fn few_distinct_values_and_guards() {
    // Seven distinct values: candidate lists overflow, the range narrows to a single key.
    let ds = model(|r| (r.next() % 7) as f32 - 3.0);
    let total = alive(&ds);
    let sel = Selection::Global {
        keep: total / 3,
        min_keep: vec![0, 0, 0],
        max_keep: vec![],
    };
    check_same(&ds, &KExpr::magnitude(), &sel);
    // Guards that bind: the head keeps at least half, fc1 at most 20k.
    let sel = Selection::Global {
        keep: total / 10,
        min_keep: vec![0, 0, 1665],
        max_keep: vec![20_000, usize::MAX, usize::MAX],
    };
    let s = check_same(&ds, &KExpr::magnitude(), &sel);
    assert_eq!(s.kept(), total / 10);
    assert!(s.tensors[2].kept >= 1665 && s.tensors[0].kept <= 20_000);
}

#[test]
fn guarded_normal_weights_match_reference() {
    let ds = model(|r| r.normal());
    let total = alive(&ds);
    let sel = Selection::Global {
        keep: total / 20,
        min_keep: vec![6000, 7000, 1000],
        max_keep: vec![9000, usize::MAX, 3000],
    };
    let s = check_same(&ds, &KExpr::magnitude(), &sel);
    assert_eq!(s.kept(), total / 20);
}

#[test]
fn wanda_rows_taylor_and_iterative_rounds_match_reference() {
    let mut ds = model(|r| r.normal());
    check_same(
        &ds,
        &KExpr::wanda(0),
        &Selection::PerRow { keep_per_row: 150 },
    );
    let taylor = KExpr::un(
        prunec_kernels::UnOp::Abs,
        KExpr::bin(
            prunec_kernels::BinOp::Mul,
            KExpr::weight(),
            KExpr::Input(KInput::Grad),
        ),
    );
    let keep: Vec<usize> = ds.iter().map(|d| d.rows * d.cols / 2).collect();
    check_same(&ds, &taylor, &Selection::PerTensor { keep });
    // Round 1 then round 2: pruned weights stay pruned and are not counted as kept.
    let total = alive(&ds);
    let sel = |keep| Selection::Global {
        keep,
        min_keep: vec![],
        max_keep: vec![],
    };
    run(&mut ds, &KExpr::magnitude(), &sel(total * 8 / 10), true).unwrap();
    let before: Vec<Vec<u64>> = ds.iter().map(|d| d.mask.clone()).collect();
    let s = check_same(&ds, &KExpr::magnitude(), &sel(total * 6 / 10));
    assert_eq!(s.kept(), total * 6 / 10);
    assert_eq!(
        s.tensors.iter().map(|t| t.alive_before).sum::<usize>(),
        total * 8 / 10
    );
    let mut after = ds.clone();
    run(&mut after, &KExpr::magnitude(), &sel(total * 6 / 10), true).unwrap();
    for (d, b) in after.iter().zip(&before) {
        for (nw, ow) in d.mask.iter().zip(b) {
            assert_eq!(nw & !ow, 0, "a pruned weight of {} came back", d.name);
        }
    }
    check_same(&ds[..2], &KExpr::wanda(0), &Selection::NM { n: 2, m: 4 });
    check_same(
        &ds,
        &KExpr::magnitude(),
        &Selection::Block {
            rows: 10,
            cols: 1,
            keep: 0.3,
        },
    );
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let ds = model(|r| r.normal());
    let total = alive(&ds);
    let sels = [
        Selection::Global {
            keep: total / 7,
            min_keep: vec![],
            max_keep: vec![],
        },
        Selection::PerRow { keep_per_row: 99 },
    ];
    for sel in &sels {
        assert_thread_independent(&ds, &KExpr::wanda(0), sel);
    }
}

fn err(ds: &mut [Data], e: &KExpr, sel: &Selection) -> String {
    let a = run(&mut ds.to_vec(), e, sel, true).unwrap_err();
    let b = run(ds, e, sel, false).unwrap_err();
    assert_eq!(a.to_string(), b.to_string());
    a.to_string()
}

#[test]
fn user_errors_name_the_tensor() {
    let small = || {
        vec![
            Data::new("a.weight", 4, 8, 1, |r| r.normal()),
            Data::new("b.weight", 3, 6, 2, |r| r.normal()),
        ]
    };
    let mut ds = small();
    let m = err(&mut ds, &KExpr::magnitude(), &Selection::NM { n: 2, m: 4 });
    assert!(m.contains("`b.weight`") && m.contains("6 columns"), "{m}");

    let mut ds = small();
    ds[1].w[7] = f32::NAN;
    let sel = Selection::Global {
        keep: 10,
        min_keep: vec![],
        max_keep: vec![],
    };
    let m = err(&mut ds, &KExpr::magnitude(), &sel);
    assert!(
        m.contains("`b.weight`") && m.contains("weight 7 (row 1, col 1) is NaN"),
        "{m}"
    );

    let mut ds = small();
    let sel = Selection::Global {
        keep: 10,
        min_keep: vec![20, 0],
        max_keep: vec![],
    };
    let m = err(&mut ds, &KExpr::magnitude(), &sel);
    assert!(m.contains("infeasible") && m.contains("`a.weight`"), "{m}");

    let mut ds = small();
    let m = err(
        &mut ds,
        &KExpr::magnitude(),
        &Selection::PerTensor { keep: vec![1, 19] },
    );
    assert!(
        m.contains("`b.weight`: cannot keep 19 weights, only 18"),
        "{m}"
    );

    let mut ds = small();
    let mut views: Vec<TensorView> = ds.iter_mut().map(|d| d.view()).collect();
    views[0].grad = None;
    let e = KExpr::Input(KInput::Grad);
    let m = prunec_kernels::prune_jit(
        &e,
        &Selection::PerRow { keep_per_row: 1 },
        &mut views,
        &PruneOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(m.contains("`a.weight`") && m.contains("grad(w)"), "{m}");
}

#[test]
fn edge_counts_empty_tensors_and_unaligned_statistics() {
    let mut ds = model(|r| r.normal());
    // An empty tensor takes part without effect.
    ds.push(Data::new("empty.weight", 0, 5, 9, |r| r.normal()));
    let total = alive(&ds);
    for keep in [0, 1, total - 1, total] {
        let sel = Selection::Global {
            keep,
            min_keep: vec![],
            max_keep: vec![],
        };
        let s = check_same(&ds, &KExpr::magnitude(), &sel);
        assert_eq!(s.kept(), keep);
    }
    // Wanda reads column statistics; head.weight has 333 columns (not a multiple of 4), so
    // its chunks take the scalar loop.
    let sel = Selection::Global {
        keep: total / 4,
        min_keep: vec![],
        max_keep: vec![],
    };
    check_same(&ds, &KExpr::wanda(0), &sel);
}

/// Rows a multiple of 64 long take the bracketed per-row path: rows whose scale jumps (the
/// bracket learnt from the previous row misses), heavy ties, partly pruned rows, rows with
/// fewer alive weights than `keep`, under the vector code and the scalar code.
#[test]
fn aligned_rows_with_shifting_scales_ties_and_holes() {
    let mut ds = vec![
        Data::new("a.weight", 97, 4096, 11, |r| r.normal()),
        Data::new("b.weight", 130, 128, 12, |r| {
            (r.normal() * 4.0).round() / 4.0
        }),
        Data::new("c.weight", 64, 64, 13, |r| r.normal()),
    ];
    // Scale jumps by row and pruned holes of every density.
    let mut r = Rng(99);
    for d in ds.iter_mut() {
        for row in 0..d.rows {
            let scale = [1.0f32, 1e-3, 50.0, 1.0, 0.0][(row / 3) % 5];
            for c in 0..d.cols {
                d.w[row * d.cols + c] *= scale;
            }
        }
        for (wi, word) in d.mask.iter_mut().enumerate() {
            let density = (wi / 5) % 4;
            for _ in 0..density * 20 {
                *word &= !(1u64 << (r.next() % 64));
            }
        }
    }
    for scalar in [false, true] {
        prunec_kernels::simd::force_scalar(scalar);
        for keep in [0, 1, 7, 40, 409, 1000, 5000] {
            check_same(
                &ds,
                &KExpr::wanda(0),
                &Selection::PerRow { keep_per_row: keep },
            );
            check_same(
                &ds,
                &KExpr::magnitude(),
                &Selection::PerRow { keep_per_row: keep },
            );
        }
        let total = alive(&ds);
        for frac in [0.0, 0.1, 0.5, 0.97, 1.0] {
            check_same(
                &ds,
                &KExpr::magnitude(),
                &Selection::Global {
                    keep: (total as f64 * frac) as usize,
                    min_keep: vec![],
                    max_keep: vec![],
                },
            );
        }
    }
    prunec_kernels::simd::force_scalar(false);
}

/// The two-pass per-row path checks finiteness in its reading pass: an alive non-finite
/// weight in any tensor is reported (the first in order, as by the reference) and nothing is
/// modified; a pruned one is ignored. Results do not depend on the thread count.
#[test]
fn aligned_rows_nonfinite_and_threads() {
    let base = vec![
        Data::new("a.weight", 40, 128, 21, |r| r.normal()),
        Data::new("b.weight", 33, 64, 22, |r| r.normal()),
    ];
    let sel = Selection::PerRow { keep_per_row: 9 };
    each_generator(|| aligned_rows_nonfinite(&base, &sel));
    assert_thread_independent(&base, &KExpr::magnitude(), &sel);
}

fn aligned_rows_nonfinite(base: &[Data], sel: &Selection) {
    for (t, i, alive) in [(1usize, 700usize, true), (0, 5000, true), (1, 3, false)] {
        let mut ds = base.to_vec();
        ds[t].w[i] = if i % 2 == 0 { f32::NAN } else { f32::INFINITY };
        if !alive {
            ds[t].mask[i / 64] &= !(1u64 << (i % 64));
        }
        let (mut a, mut b) = (ds.clone(), ds.clone());
        let ra = run(&mut a, &KExpr::wanda(0), sel, true).map_err(|e| e.to_string());
        let rb = run(&mut b, &KExpr::wanda(0), sel, false).map_err(|e| e.to_string());
        assert_eq!(ra.is_err(), alive);
        assert_eq!(format!("{ra:?}"), format!("{rb:?}"));
        assert_same_bits(&a, &b, "jit and reference");
        if alive {
            // Nothing was modified.
            assert_same_bits(&a, &ds, "untouched on error");
        }
    }
}
