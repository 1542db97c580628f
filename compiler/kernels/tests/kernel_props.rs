//! Property tests: the JIT kernels and the reference interpreter agree bit for bit.

use proptest::prelude::*;
use prunec_kernels::{
    full_mask, prune_jit, prune_reference, score_jit, score_reference, BinOp, CmpOp, KExpr, KInput,
    PruneOptions, PruneSummary, Selection, TensorView, UnOp,
};

/// Owned data for one tensor.
#[derive(Clone, Debug)]
struct Data {
    rows: usize,
    cols: usize,
    w: Vec<f32>,
    grad: Vec<f32>,
    init: Vec<f32>,
    col: Vec<f32>,
    row: Vec<f32>,
    mask: Vec<u64>,
}

impl Data {
    fn view(&mut self, i: usize) -> TensorView<'_> {
        let mut v = TensorView::new(
            &format!("t{i}"),
            self.rows,
            self.cols,
            &mut self.w,
            &mut self.mask,
        );
        v.grad = Some(&self.grad);
        v.init = Some(&self.init);
        v.col_stats = vec![&self.col];
        v.row_stats = vec![&self.row];
        v
    }
}

/// Values with many ties, signed zeros, infinities and NaN (when `nonfinite`).
fn value(nonfinite: bool) -> impl Strategy<Value = f32> {
    let special = if nonfinite {
        prop_oneof![
            Just(f32::NAN),
            Just(f32::INFINITY),
            Just(f32::NEG_INFINITY),
            Just(0.0f32),
            Just(-0.0f32),
        ]
        .boxed()
    } else {
        prop_oneof![Just(0.0f32), Just(-0.0f32), Just(1.5f32), Just(-1.5f32)].boxed()
    };
    prop_oneof![
        3 => -4.0f32..4.0,
        2 => (-3i32..4).prop_map(|x| x as f32 * 0.5),
        1 => special,
    ]
}

fn data(rows: usize, cols: usize, nonfinite: bool) -> impl Strategy<Value = Data> {
    let n = rows * cols;
    (
        prop::collection::vec(value(nonfinite), n),
        prop::collection::vec(value(nonfinite), n),
        prop::collection::vec(-2.0f32..2.0, n),
        prop::collection::vec(value(nonfinite), cols),
        prop::collection::vec(0.0f32..3.0, rows),
        prop::collection::vec(prop::bool::weighted(0.8), n),
        any::<bool>(),
    )
        .prop_map(move |(w, grad, init, col, row, alive, dense)| {
            // Dense masks take the kernels' fully-alive word path.
            let mut mask = full_mask(n);
            for (i, a) in alive.iter().enumerate() {
                if !a && !dense {
                    mask[i / 64] &= !(1u64 << (i % 64));
                }
            }
            Data {
                rows,
                cols,
                w,
                grad,
                init,
                col,
                row,
                mask,
            }
        })
}

fn tensors(
    max_tensors: usize,
    nonfinite: bool,
    col_mult: usize,
) -> impl Strategy<Value = Vec<Data>> {
    prop::collection::vec((1usize..24, 1usize..40), 1..=max_tensors).prop_flat_map(move |shapes| {
        shapes
            .into_iter()
            .map(|(r, c)| data(r, c * col_mult, nonfinite))
            .collect::<Vec<_>>()
    })
}

fn leaf() -> impl Strategy<Value = KExpr> {
    prop_oneof![
        3 => Just(KExpr::Input(KInput::Weight)),
        1 => Just(KExpr::Input(KInput::Grad)),
        1 => Just(KExpr::Input(KInput::Init)),
        1 => Just(KExpr::Input(KInput::ColStat(0))),
        1 => Just(KExpr::Input(KInput::RowStat(0))),
        1 => Just(KExpr::Input(KInput::Scalar(0))),
        1 => prop_oneof![Just(0.0f32), Just(-0.0), Just(1.0), Just(0.5), Just(f32::INFINITY)].prop_map(KExpr::Const),
    ]
}

fn expr() -> impl Strategy<Value = KExpr> {
    // `prop_oneof!` unions, as when the regression file's seeds were recorded: the same seed
    // must keep generating the same expression.
    let un = prop_oneof![
        Just(UnOp::Neg),
        Just(UnOp::Abs),
        Just(UnOp::Sq),
        Just(UnOp::Sqrt),
        Just(UnOp::Log),
        Just(UnOp::Exp),
        Just(UnOp::Sign)
    ];
    let bin = prop_oneof![
        Just(BinOp::Add),
        Just(BinOp::Sub),
        Just(BinOp::Mul),
        Just(BinOp::Div),
        Just(BinOp::Min),
        Just(BinOp::Max),
        Just(BinOp::Pow)
    ];
    exprs(un.boxed(), bin.boxed())
}

/// Expressions in the AVX-512 scans' subset (no `log`, `exp`, `sign`, `pow`).
fn wide_expr() -> impl Strategy<Value = KExpr> {
    let un = prop_oneof![
        Just(UnOp::Neg),
        Just(UnOp::Abs),
        Just(UnOp::Sq),
        Just(UnOp::Sqrt)
    ];
    let bin = prop_oneof![
        Just(BinOp::Add),
        Just(BinOp::Sub),
        Just(BinOp::Mul),
        Just(BinOp::Div),
        Just(BinOp::Min),
        Just(BinOp::Max)
    ];
    exprs(un.boxed(), bin.boxed())
}

/// Random expressions with unary and binary operations drawn from `un` and `bin`.
fn exprs(un: BoxedStrategy<UnOp>, bin: BoxedStrategy<BinOp>) -> impl Strategy<Value = KExpr> {
    let cmp = prop_oneof![
        Just(CmpOp::Lt),
        Just(CmpOp::Le),
        Just(CmpOp::Gt),
        Just(CmpOp::Ge),
        Just(CmpOp::Eq),
        Just(CmpOp::Ne)
    ];
    leaf().prop_recursive(4, 16, 3, move |inner| {
        prop_oneof![
            (un.clone(), inner.clone()).prop_map(|(o, a)| KExpr::un(o, a)),
            (bin.clone(), inner.clone(), inner.clone()).prop_map(|(o, a, b)| KExpr::bin(o, a, b)),
            (cmp.clone(), inner.clone(), inner.clone()).prop_map(|(o, a, b)| KExpr::cmp(o, a, b)),
            (inner.clone(), inner.clone(), inner.clone())
                .prop_map(|(c, a, b)| KExpr::select(c, a, b)),
        ]
    })
}

type Outcome = (Result<String, String>, Vec<Vec<u32>>, Vec<Vec<u64>>);

fn run(ds: &[Data], e: &KExpr, sel: &Selection, opts: &PruneOptions, jit: bool) -> Outcome {
    let mut ds = ds.to_vec();
    let res = {
        let mut views: Vec<TensorView> =
            ds.iter_mut().enumerate().map(|(i, d)| d.view(i)).collect();
        if jit {
            prune_jit(e, sel, &mut views, opts)
        } else {
            prune_reference(e, sel, &mut views, opts)
        }
    };
    (
        res.map(|s: PruneSummary| format!("{s:?}"))
            .map_err(|e| e.to_string()),
        ds.iter()
            .map(|d| d.w.iter().map(|x| x.to_bits()).collect())
            .collect(),
        ds.iter().map(|d| d.mask.clone()).collect(),
    )
}

/// The JIT, with and without `single_pass`, agrees with the reference: same summary or
/// error, same masks and weights (after an error, only the two-pass JIT promises untouched
/// tensors).
fn same(ds: &[Data], e: &KExpr, sel: &Selection, opts: &PruneOptions) -> Result<(), TestCaseError> {
    let b = run(ds, e, sel, opts, false);
    for single_pass in [false, true] {
        let o = PruneOptions {
            single_pass,
            ..opts.clone()
        };
        let a = run(ds, e, sel, &o, true);
        prop_assert_eq!(
            &a.0,
            &b.0,
            "summary for {} under {:?} (single pass {})",
            e,
            sel,
            single_pass
        );
        if a.0.is_ok() || !single_pass {
            prop_assert_eq!(&a.2, &b.2, "mask for {} (single pass {})", e, single_pass);
            prop_assert_eq!(
                &a.1,
                &b.1,
                "weights for {} (single pass {})",
                e,
                single_pass
            );
        }
    }
    Ok(())
}

fn opts(nonfinite: bool) -> PruneOptions {
    PruneOptions {
        scalars: vec![0.75],
        allow_nonfinite: nonfinite,
        single_pass: false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    #[test]
    fn scores_agree(ds in tensors(1, true, 1), e in expr()) {
        let mut d = ds[0].clone();
        let o = opts(true);
        let a = score_jit(&e, &d.view(0), &o).unwrap();
        let b = score_reference(&e, &d.view(0), &o).unwrap();
        let (a, b): (Vec<u32>, Vec<u32>) = (a.iter().map(|x| x.to_bits()).collect(), b.iter().map(|x| x.to_bits()).collect());
        prop_assert_eq!(a, b, "{}", e);
    }

    #[test]
    fn global_agrees(ds in tensors(4, true, 1), e in expr(), frac in 0.0f64..=1.0, guard in 0usize..4) {
        let alive: Vec<usize> = ds.iter().map(|d| d.mask.iter().map(|w| w.count_ones() as usize).sum()).collect();
        let total: usize = alive.iter().sum();
        let keep = (total as f64 * frac) as usize;
        let (min_keep, max_keep) = match guard {
            0 => (vec![], vec![]),
            1 => (alive.iter().map(|a| a / 3).collect(), vec![]),
            2 => (vec![], alive.iter().map(|a| a * 2 / 3 + 1).collect()),
            _ => (alive.iter().map(|a| a / 4).collect(), alive.iter().map(|a| a * 3 / 4 + 1).collect()),
        };
        same(&ds, &e, &Selection::Global { keep, min_keep, max_keep }, &opts(true))?;
    }

    #[test]
    fn per_tensor_and_rows_agree(ds in tensors(3, true, 1), e in expr(), frac in 0.0f64..=1.0, k in 0usize..12) {
        let keep: Vec<usize> = ds.iter().map(|d| (d.mask.iter().map(|w| w.count_ones() as usize).sum::<usize>() as f64 * frac) as usize).collect();
        same(&ds, &e, &Selection::PerTensor { keep }, &opts(true))?;
        same(&ds, &e, &Selection::PerRow { keep_per_row: k }, &opts(true))?;
    }

    #[test]
    fn n_m_and_blocks_agree(ds in tensors(3, true, 4), e in expr(), n in 0usize..=4, frac in 0.0f64..=1.0) {
        same(&ds, &e, &Selection::NM { n, m: 4 }, &opts(true))?;
        same(&ds, &e, &Selection::Block { rows: 1, cols: 2, keep: frac }, &opts(true))?;
        same(&ds, &e, &Selection::Block { rows: 2, cols: 4, keep: frac }, &opts(true))?;
    }

    #[test]
    fn nonfinite_errors_agree(ds in tensors(3, true, 1), frac in 0.0f64..=1.0) {
        let e = KExpr::magnitude();
        let total: usize = ds.iter().map(|d| d.rows * d.cols).sum();
        let keep = ((total as f64 * frac) as usize).min(ds.iter().map(|d| d.mask.iter().map(|w| w.count_ones() as usize).sum::<usize>()).sum());
        same(&ds, &e, &Selection::Global { keep, min_keep: vec![], max_keep: vec![] }, &opts(false))?;
        same(&ds, &e, &Selection::PerRow { keep_per_row: 2 }, &opts(false))?;
    }
}

/// Checks the fused scan kernels on `d` against the interpreter's scores: the scores (by
/// key), the `ge` / `over` bits and, when writing, the zeroed weights; on rows of whole
/// words, also the AVX-512 row scan (its candidates' scores, bits and counts).
fn scan_agrees(d: &Data, e: &KExpr, lo: u32, hi: u32) -> Result<(), TestCaseError> {
    use prunec_kernels::expr::score_key;
    use prunec_kernels::raw::{RawTensor, ScanBits, ScanRange, BLOCK};
    use prunec_kernels::{simd, KernelCache};
    let o = opts(true);
    let k = KernelCache::global().get(e).unwrap();
    // Both code generators: the AVX-512 scans where this host has them, and cranelift's.
    let narrow = prunec_kernels::jit::CompiledKernel { wide: None, ..k };
    let mut kernels = vec![];
    if k.wide_for(d.cols).is_some() {
        kernels.push(k);
    }
    if narrow.scan_ok(d.cols) {
        kernels.push(narrow);
    }
    let want = score_reference(e, &d.clone().view(0), &o).unwrap();
    let whole = d.w.len() / 64 * 64;
    for (k, write, allow) in kernels
        .iter()
        .flat_map(|k| [(k, false, false), (k, true, false), (k, true, true)])
    {
        let mut dd = d.clone();
        let raw = RawTensor::new(&mut dd.view(0), std::sync::Arc::new(o.scalars.clone()));
        let range = ScanRange {
            lo: simd::ge_bound(lo).expect("lo >= 1"),
            gt: simd::gt_bound(hi),
            write,
            allow,
        };
        // The AVX-512 writing scans also settle the mask: alive elements at or above the
        // range stay, and alive non-finite ones (unless allowed); all other weights become
        // +0.0; `ge` then holds the kept elements not above the range.
        let wide = k.wide_for(d.cols).is_some();
        let settles = write && wide;
        let alive = |i: usize| (d.mask[i / 64] >> (i % 64)) & 1 == 1;
        let kept = |i: usize| {
            alive(i) && (score_key(want[i]) >= lo || (settles && !allow && !d.w[i].is_finite()))
        };
        let mut bits = ScanBits::new();
        let mut out = vec![0.0f32; BLOCK];
        for p0 in (0..whole).step_by(BLOCK) {
            let p1 = (p0 + BLOCK).min(whole);
            // SAFETY: this test owns the tensor.
            let st = unsafe { raw.scan_into(k, p0, p1, &range, &mut out[..p1 - p0], &mut bits) };
            // The AVX-512 scans count, whether they write or not.
            prop_assert_eq!(st.is_some(), wide);
            if let Some(st) = st {
                let above = (p0..p1)
                    .filter(|&i| alive(i) && score_key(want[i]) > hi)
                    .count();
                let bad = (p0..p1).any(|i| alive(i) && !d.w[i].is_finite());
                prop_assert_eq!(st.above, above as u64, "{} above", e);
                prop_assert_eq!(st.bad, bad && !allow, "{} bad", e);
            }
            for j in 0..p1 - p0 {
                let i = p0 + j;
                let key = score_key(want[i]);
                let bit = |h: &[u16; BLOCK / 16]| (h[j / 16] >> (j % 16)) & 1 == 1;
                // The magnitude's writing scans store no scores: a kept element's is its
                // weight's magnitude.
                if st.is_none_or(|st| st.scores) {
                    prop_assert_eq!(score_key(out[j]), key, "{} score {}", e, i);
                } else if kept(i) {
                    prop_assert_eq!(score_key(dd.w[i].abs()), key, "{} kept {}", e, i);
                }
                if settles {
                    prop_assert_eq!(bit(&bits.ge), kept(i) && key <= hi, "{} in {}", e, i);
                    continue;
                }
                if wide {
                    // The AVX-512 read scan's bits hold alive elements only: inside, above.
                    let inside = alive(i) && key >= lo && key <= hi;
                    prop_assert_eq!(bit(&bits.ge), inside, "{} inside {}", e, i);
                    prop_assert_eq!(bit(&bits.over), alive(i) && key > hi, "{} above {}", e, i);
                    continue;
                }
                prop_assert_eq!(bit(&bits.ge), key >= lo, "{} ge {} key {:#x}", e, i, key);
                prop_assert_eq!(bit(&bits.over), key > hi, "{} over {}", e, i);
            }
        }
        // The AVX-512 row scan (read only): per row, and per first word of a row; its
        // variant for ranges of alive elements only on those.
        if let (Some(wk), false, true) = (k.wide_for(d.cols), write, d.cols.is_multiple_of(64)) {
            let alive = |i: usize| (d.mask[i / 64] >> (i % 64)) & 1 == 1;
            let ranges = (0..d.rows).flat_map(|r| [(r, d.cols), (r, 64)]);
            let runs = ranges.flat_map(|(r, len)| {
                let s0 = r * d.cols;
                let dense = (s0..s0 + len).all(alive);
                [(r, len, false), (r, len, true)]
                    .into_iter()
                    .filter(move |x| !x.2 || dense)
            });
            for (r, len, dense) in runs {
                let (s0, s1) = (r * d.cols, r * d.cols + len);
                let (mut scores, mut inside, mut above) =
                    (vec![], vec![0u64; len / 64], vec![0u64; len / 64]);
                let st = raw.scan_wide_collect(
                    &wk,
                    dense,
                    s0,
                    s1,
                    range.lo,
                    range.gt,
                    &mut scores,
                    &mut inside,
                    &mut above,
                );
                let inr: Vec<usize> = (s0..s1)
                    .filter(|&i| alive(i) && score_key(want[i]) >= lo && score_key(want[i]) <= hi)
                    .collect();
                let got: Vec<u32> = scores.iter().map(|&x| score_key(x)).collect();
                let exp: Vec<u32> = inr.iter().map(|&i| score_key(want[i])).collect();
                prop_assert_eq!(got, exp, "{} row {} candidates", e, r);
                for j in 0..len {
                    let (i, key) = (s0 + j, score_key(want[s0 + j]));
                    let bit = |w: &[u64]| (w[j / 64] >> (j % 64)) & 1 == 1;
                    prop_assert_eq!(bit(&inside), inr.contains(&i), "{} row inside {}", e, i);
                    prop_assert_eq!(bit(&above), alive(i) && key > hi, "{} row above {}", e, i);
                }
                let n_above = (s0..s1)
                    .filter(|&i| alive(i) && score_key(want[i]) > hi)
                    .count();
                prop_assert_eq!(st.above, n_above as u64, "{} row above", e);
                let bad = (s0..s1).any(|i| alive(i) && !d.w[i].is_finite());
                prop_assert_eq!(st.bad, bad, "{} row bad", e);
            }
        }
        drop(raw);
        for (i, ((&w0, &w1), &s)) in d.w.iter().zip(&dd.w).zip(&want).enumerate() {
            let zeroed = if settles {
                i < whole && !kept(i)
            } else {
                write && i < whole && score_key(s) < lo && (allow || w0.is_finite())
            };
            let expect = if zeroed { 0.0f32 } else { w0 };
            prop_assert_eq!(w1.to_bits(), expect.to_bits(), "{} weight {}", e, i);
            let m = (dd.mask[i / 64] >> (i % 64)) & 1 == 1;
            let want_m = if settles && i < whole {
                kept(i)
            } else {
                alive(i)
            };
            prop_assert_eq!(m, want_m, "{} mask {}", e, i);
        }
    }
    Ok(())
}

/// Tensors whose rows are a multiple of 64 long, where the AVX-512 scans also run
/// expressions reading row and column statistics.
fn wide_tensors(max_tensors: usize) -> impl Strategy<Value = Vec<Data>> {
    prop::collection::vec((1usize..6, 1usize..4), 1..=max_tensors).prop_flat_map(|shapes| {
        shapes
            .into_iter()
            .map(|(r, c)| data(r, c * 64, true))
            .collect::<Vec<_>>()
    })
}

/// A key range around keys the scores of `e` on `d` have (`pick` 0), arbitrary (1), or one
/// arbitrary key (2).
fn scan_range(d: &Data, e: &KExpr, a: u32, b: u32, pick: usize) -> (u32, u32) {
    let keys: Vec<u32> = {
        let o = opts(true);
        let mut k: Vec<u32> = score_reference(e, &d.clone().view(0), &o)
            .unwrap()
            .iter()
            .map(|&s| prunec_kernels::expr::score_key(s))
            .collect();
        k.sort_unstable();
        k
    };
    let (lo, hi) = match pick {
        0 => (keys[a as usize % keys.len()], keys[b as usize % keys.len()]),
        1 => (a, b),
        _ => (a, a),
    };
    (lo.min(hi).max(1), lo.max(hi).max(1))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn wide_scan_kernels_agree(ds in wide_tensors(1), e in wide_expr(), a in any::<u32>(), b in any::<u32>(), pick in 0usize..3) {
        let (lo, hi) = scan_range(&ds[0], &e, a, b, pick);
        scan_agrees(&ds[0], &e, lo, hi)?;
    }

    /// The magnitude's writing scans store no scores (the kept weights' magnitudes are):
    /// always checked, not only when the random expressions happen on `abs(w)`.
    #[test]
    fn magnitude_scans_agree(ds in wide_tensors(1), a in any::<u32>(), b in any::<u32>(), pick in 0usize..3) {
        let e = KExpr::magnitude();
        let (lo, hi) = scan_range(&ds[0], &e, a, b, pick);
        scan_agrees(&ds[0], &e, lo, hi)?;
    }

    #[test]
    fn wide_cuts_agree(ds in wide_tensors(3), e in wide_expr(), frac in 0.0f64..=1.0) {
        let alive: Vec<usize> = ds.iter().map(|d| d.mask.iter().map(|w| w.count_ones() as usize).sum()).collect();
        let keep = (alive.iter().sum::<usize>() as f64 * frac) as usize;
        same(&ds, &e, &Selection::Global { keep, min_keep: vec![], max_keep: vec![] }, &opts(true))?;
        let keep = alive.iter().map(|&a| (a as f64 * frac) as usize).collect();
        same(&ds, &e, &Selection::PerTensor { keep }, &opts(true))?;
        let cols = ds.iter().map(|d| d.cols).min().unwrap_or(0);
        let keep_per_row = (cols as f64 * frac) as usize;
        same(&ds, &e, &Selection::PerRow { keep_per_row }, &opts(true))?;
        same(&ds, &e, &Selection::PerRow { keep_per_row }, &opts(false))?;
        let keep = ds.iter().map(|d| d.mask.iter().map(|w| w.count_ones() as usize).sum::<usize>()).sum::<usize>() * 9 / 10;
        same(&ds, &e, &Selection::Global { keep, min_keep: vec![], max_keep: vec![] }, &opts(false))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    #[test]
    fn scan_kernels_agree(ds in tensors(1, true, 4), e in expr(), a in any::<u32>(), b in any::<u32>(), pick in 0usize..3) {
        let d = &ds[0];
        let (lo, hi) = scan_range(d, &e, a, b, pick);
        scan_agrees(d, &e, lo, hi)?;
    }
}

/// `min` / `max` order `-0 < +0` and return NaN for NaN in both code generators: visible
/// through `1 / min(w, -w)` (`-inf` for either zero) and `1 / max(w, -w)` (`+inf`).
#[test]
fn min_max_signed_zeros_and_nan() {
    let n = 128;
    let w: Vec<f32> = (0..n)
        .map(|i| [0.0, -0.0, f32::NAN, 1.5, -2.0, f32::INFINITY][i % 6])
        .collect();
    let d = Data {
        rows: 2,
        cols: 64,
        grad: w.iter().rev().copied().collect(),
        init: vec![0.0; n],
        col: vec![1.0; 64],
        row: vec![1.0; 2],
        mask: full_mask(n),
        w,
    };
    let neg_w = KExpr::un(UnOp::Neg, KExpr::weight());
    for op in [BinOp::Min, BinOp::Max] {
        let m = KExpr::bin(op, KExpr::weight(), neg_w.clone());
        let e = KExpr::bin(BinOp::Div, KExpr::Const(1.0), m);
        scan_agrees(&d, &e, 1, u32::MAX - 1).unwrap();
        let g = KExpr::bin(op, KExpr::Input(KInput::Grad), KExpr::weight());
        let e = KExpr::bin(BinOp::Div, KExpr::Const(1.0), g);
        scan_agrees(&d, &e, 0x8000_0000, 0xff00_0000).unwrap();
    }
}
