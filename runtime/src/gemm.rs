//! Matrix products whose every output has one fixed summation order, so the
//! same inputs give the same bits on any x86-64 machine, at any thread count
//! and vector width.
//!
//! `C[i][j] = fma(A[i][k-1], B[k-1][j], ... fma(A[i][0], B[0][j], C0[i][j]))`:
//! one fused multiply-add per term, in increasing `k`, starting from zero (or
//! from `C` when accumulating). Vector code only runs independent outputs
//! side by side (a row of `C` across lanes), blocking only decides which
//! outputs are computed together, and threads split the rows of `C`; none of
//! them changes an output's chain. The scalar code (`f32::mul_add`) is the
//! specification; AVX2+FMA and AVX-512 give the same bits
//! (`PRUNEC_KERNEL_AVX2=1` or `PRUNEC_KERNEL_SCALAR=1` force the narrower
//! paths, as for the pruning kernels).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::OnceLock;
use std::thread::LocalKey;

/// The summation contract of every product and reduction, recorded in
/// locks: it changes whenever an order of summation does, so `verify` can
/// tell a lock made under another contract from a real difference.
/// (2: the language model's norms, softmax and losses summed left to right
/// by prunec rather than by candle's vector kernels, its residual adds
/// fused into the output products, Wanda's column norms summed in `f64`.)
pub const NUMERICS: &str = "fixed-order-fma-2";

/// Rows of `C` one micro-kernel call computes.
const MR: usize = 6;
/// Row blocks (of `MR` rows) and column panels (of `nr` columns) per
/// parallel task.
const BLOCKS_PER_TASK: usize = 8;
const PANELS_PER_TASK: usize = 8;
/// Depth of one pass over a task's tiles: the `B` panels of one pass stay
/// in cache while every row block of the task reads them. A tile is stored
/// and reloaded between passes, which keeps each output's chain of `fma`s
/// (and so its bits) the same as in one pass.
const KC: usize = 256;
/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_WORK: usize = 1 << 18;
/// Below this many elements an operand is packed on the calling thread.
const PARALLEL_PACK: usize = 1 << 16;

/// The instruction set the products run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

/// The widest instruction set this machine has, capped by the environment.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        if std::env::var_os("PRUNEC_KERNEL_SCALAR").is_some() {
            Isa::Scalar
        } else if std::env::var_os("PRUNEC_KERNEL_AVX2").is_some() {
            Isa::Avx2.supported()
        } else {
            isa_detected()
        }
    })
}

/// The element types products run on: `f32` (training, inference) and
/// `f64` (the solvers' linear algebra).
pub trait Elem: Copy + Default + Send + Sync + 'static {
    /// Columns of `C` one micro-kernel call computes on `isa`.
    fn nr(isa: Isa) -> usize;
    /// `self * b + c` with one rounding.
    fn fma(self, b: Self, c: Self) -> Self;
    /// The `MR x nr` micro-kernel on `isa`: `tile[r][j]` continues its
    /// chain with `a_rows[r][kk * a_cs] * b[kk * b_rs + j]` for `kk < k`.
    ///
    /// # Safety
    /// The CPU has `isa`; every address read is inside its operand.
    unsafe fn kernel(
        isa: Isa,
        k: usize,
        a_rows: &[*const Self; MR],
        a_cs: usize,
        b: *const Self,
        b_rs: usize,
        tile: &mut [Self; TILE],
    );
    /// This thread's packing buffers for `A` and `B`, reused across calls.
    fn buffers() -> &'static LocalKey<[RefCell<Vec<Self>>; 2]>;
}

/// Room for the widest tile (`MR x 32` lanes of `f32`).
pub const TILE: usize = MR * 32;

macro_rules! elem {
    ($t:ty, $nr512:expr, $nr256:expr, $k512:ident, $k256:ident) => {
        impl Elem for $t {
            fn nr(isa: Isa) -> usize {
                match isa {
                    Isa::Avx512 => $nr512,
                    _ => $nr256,
                }
            }
            #[inline]
            fn fma(self, b: Self, c: Self) -> Self {
                self.mul_add(b, c)
            }
            unsafe fn kernel(
                isa: Isa,
                k: usize,
                a_rows: &[*const Self; MR],
                a_cs: usize,
                b: *const Self,
                b_rs: usize,
                tile: &mut [Self; TILE],
            ) {
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => x86::$k512(k, a_rows, a_cs, b, b_rs, tile),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => x86::$k256(k, a_rows, a_cs, b, b_rs, tile),
                    _ => kernel_scalar(k, a_rows, a_cs, b, b_rs, tile, Self::nr(isa)),
                }
            }
            fn buffers() -> &'static LocalKey<[RefCell<Vec<Self>>; 2]> {
                thread_local! {
                    static BUF: [RefCell<Vec<$t>>; 2] =
                        const { [RefCell::new(Vec::new()), RefCell::new(Vec::new())] };
                }
                &BUF
            }
        }
    };
}

elem!(f32, 32, 16, kernel_avx512_f32, kernel_avx2_f32);
elem!(f64, 16, 8, kernel_avx512_f64, kernel_avx2_f64);

/// A read-only matrix: element `(i, j)` is `data[i * rs + j * cs]`, so a
/// transpose is a view with the strides swapped.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a, T = f32> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T: Copy> Mat<'a, T> {
    /// A row-major `rows x cols` matrix.
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "matrix data too short");
        Mat {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Mat {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Whether every element `(i, j)` lies inside `data` (the kernels read
    /// through raw pointers, so `gemm` checks this first).
    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1)
                .checked_mul(self.rs)
                .zip((self.cols - 1).checked_mul(self.cs))
                .and_then(|(r, c)| r.checked_add(c))
                .is_some_and(|last| last < self.data.len())
    }

    #[inline]
    fn at(&self, i: usize, j: usize) -> T {
        self.data[i * self.rs + j * self.cs]
    }
}

/// `C = A B` (or `C += A B` when `accumulate`), `C` row-major `m x n`.
pub fn gemm<T: Elem>(a: Mat<'_, T>, b: Mat<'_, T>, c: &mut [T], accumulate: bool) {
    gemm_on(isa(), a, b, c, accumulate)
}

/// [`gemm`] on a given instruction set (tests compare them; one the machine
/// lacks falls back to the next narrower).
pub fn gemm_on<T: Elem>(isa: Isa, a: Mat<'_, T>, b: Mat<'_, T>, c: &mut [T], accumulate: bool) {
    product(isa, a, b, c, accumulate, true)
}

/// Columns per panel of [`gram_upper`]: a multiple of every kernel width.
pub const GRAM_PANEL: usize = 128;

/// The upper part of `XᵀX` for a row-major `rows x cols` `X`, in half the
/// products of the full one: for each panel of [`GRAM_PANEL`] rows of the
/// output, `strip(i0, s)` receives its columns from `i0` on (`s` row-major,
/// `min(GRAM_PANEL, cols - i0) x (cols - i0)`), every value the same bits
/// as in `gemm(X.t(), X)` (each output keeps its chain over the rows of `X`).
/// The lower triangle is the mirror: `x_ki x_kj` and `x_kj x_ki` round alike.
pub fn gram_upper<T: Elem>(x: &[T], rows: usize, cols: usize, mut strip: impl FnMut(usize, &[T])) {
    assert!(x.len() >= rows * cols, "gram: X too short");
    let mut block = Vec::new();
    for i0 in (0..cols).step_by(GRAM_PANEL) {
        let (wi, wj) = (GRAM_PANEL.min(cols - i0), cols - i0);
        block.clear();
        block.resize(wi * wj, T::default());
        if rows > 0 {
            // Columns i0.. of X, transposed for A: a view, no copy.
            let a = Mat {
                data: &x[i0..],
                rows: wi,
                cols: rows,
                rs: 1,
                cs: cols,
            };
            let b = Mat {
                data: &x[i0..],
                rows,
                cols: wj,
                rs: cols,
                cs: 1,
            };
            gemm(a, b, &mut block, false);
        }
        strip(i0, &block);
    }
}

/// [`gemm`] on the calling thread only (the same bits), for small products
/// that run inside an outer parallel loop.
pub fn gemm_serial<T: Elem>(a: Mat<'_, T>, b: Mat<'_, T>, c: &mut [T], accumulate: bool) {
    product(isa(), a, b, c, accumulate, false)
}

fn product<T: Elem>(
    isa: Isa,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    c: &mut [T],
    accumulate: bool,
    threads: bool,
) {
    let isa = isa.supported();
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(b.fits(), "a matrix view reaches past its data");
    let Some(c) = output(a, b.rows, n, c, accumulate) else {
        return;
    };
    // A narrow `C` (few columns, many rows) is computed as `Cᵀ = Bᵀ Aᵀ`, so
    // the vector lanes run along its long side: each output is the same
    // chain (`fma(a, b, c)` and `fma(b, a, c)` round alike).
    // Only where that packs no more than the direct product would.
    let packed = |b_cs: usize, k: usize, n: usize| if b_cs == 1 { 0 } else { k * n };
    if n < 32 && m >= 4 * n && packed(a.rs, k, m) <= packed(b.cs, k, n) {
        let mut ct = vec![T::default(); n * m];
        if accumulate {
            for i in 0..m {
                for j in 0..n {
                    ct[j * m + i] = c[i * n + j];
                }
            }
        }
        product(isa, b.t(), a.t(), &mut ct, accumulate, threads);
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = ct[j * m + i];
            }
        }
        return;
    }
    let isa = tile_isa::<T>(isa, n);
    let nr = T::nr(isa);
    // The buffers leave their thread-local slot while in use: a rayon worker
    // waiting for this product may run another one meanwhile.
    // `B` is read in place where its rows are contiguous; other panels
    // (and a last partial one, zero-padded) are packed. `A` is read in place.
    let direct = b.cs == 1;
    let parallel = threads && m * n * k >= PARALLEL_WORK && rayon::current_num_threads() > 1;
    let mut buf_b = T::buffers().with(|b| b[1].take());
    pack_b(
        &b,
        nr,
        direct,
        &mut buf_b,
        parallel && k * n >= PARALLEL_PACK,
    );
    let bp = Shared(b.data.as_ptr());
    let pb = &buf_b[..];
    tiles(isa, a, k, n, c, accumulate, parallel, |p| {
        let ccount = nr.min(n - p * nr);
        if direct && ccount == nr {
            (bp.get().wrapping_add(p * nr), b.rs)
        } else {
            let at = if direct { 0 } else { p * k * nr };
            (pb[at..at + k * nr].as_ptr(), nr)
        }
    });
    T::buffers().with(|b| b[1].replace(buf_b));
}

/// The instruction set the tiles of an `n`-column product run on: narrow
/// outputs waste half of a wide tile, and the narrower kernel gives the
/// same bits.
fn tile_isa<T: Elem>(isa: Isa, n: usize) -> Isa {
    match isa {
        Isa::Avx512 if n <= T::nr(Isa::Avx2) => Isa::Avx2,
        other => other,
    }
}

/// `B` packed once into the column panels the micro-kernels read, for
/// operands used in many products (a model's weights): [`gemm_packed`]
/// then gives the same bits as [`gemm`] without packing on every call.
#[derive(Clone, Debug)]
pub struct PackedB<T = f32> {
    k: usize,
    n: usize,
    isa: Isa,
    data: Vec<T>,
}

impl<T: Elem> PackedB<T> {
    /// Packs `b` (`k x n`, any strides) for this machine's instruction set.
    pub fn new(b: Mat<'_, T>) -> Self {
        assert!(b.fits(), "a matrix view reaches past its data");
        let isa = tile_isa::<T>(isa().supported(), b.cols);
        let mut data = Vec::new();
        if b.rows > 0 && b.cols > 0 {
            pack_b(
                &b,
                T::nr(isa),
                false,
                &mut data,
                b.rows * b.cols >= PARALLEL_PACK,
            );
        }
        PackedB {
            k: b.rows,
            n: b.cols,
            isa,
            data,
        }
    }

    /// `[W_1; W_2; ...]ᵀ` packed, each `W_i` row-major with `k` columns
    /// (weights of linear layers that read the same input, as one product
    /// whose output columns are their outputs side by side).
    pub fn from_stacked_rows(parts: &[&[T]], k: usize) -> Self {
        let rows: Vec<&[T]> = parts
            .iter()
            .flat_map(|p| {
                assert_eq!(
                    p.len() % k.max(1),
                    0,
                    "a weight is not a whole number of rows"
                );
                p.chunks_exact(k.max(1))
            })
            .collect();
        let n = if k == 0 { 0 } else { rows.len() };
        let isa = tile_isa::<T>(isa().supported(), n);
        let nr = T::nr(isa);
        let mut data = vec![T::default(); n.div_ceil(nr) * k * nr];
        let pack = |(p, dst): (usize, &mut [T])| {
            let cb = p * nr;
            for k0 in (0..k).step_by(16) {
                let k1 = (k0 + 16).min(k);
                for (j, row) in rows[cb..(cb + nr).min(n)].iter().enumerate() {
                    for (kk, v) in (k0..k1).zip(&row[k0..k1]) {
                        dst[kk * nr + j] = *v;
                    }
                }
            }
        };
        if k > 0 {
            data.par_chunks_mut(k * nr).enumerate().for_each(pack);
        }
        PackedB { k, n, isa, data }
    }

    /// Rows and columns of the packed matrix.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }
}

/// `C = A B` (or `C += A B`) with `B` packed beforehand: the same bits as
/// [`gemm`] on the unpacked `B`.
pub fn gemm_packed<T: Elem>(a: Mat<'_, T>, b: &PackedB<T>, c: &mut [T], accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.n);
    let Some(c) = output(a, b.k, n, c, accumulate) else {
        return;
    };
    let nr = T::nr(b.isa);
    let data = &b.data[..];
    let parallel = m * n * k >= PARALLEL_WORK && rayon::current_num_threads() > 1;
    tiles(b.isa, a, k, n, c, accumulate, parallel, |p| {
        (data[p * k * nr..(p + 1) * k * nr].as_ptr(), nr)
    });
}

/// Runs the micro-kernels over every `MR x nr` tile of `C` (`m x n`,
/// row-major), in parallel rectangles of tiles when the product is large;
/// `panel(p)` gives where column panel `p` of `B` starts and its row stride.
#[allow(clippy::too_many_arguments)]
fn tiles<T: Elem>(
    isa: Isa,
    a: Mat<'_, T>,
    k: usize,
    n: usize,
    c: &mut [T],
    accumulate: bool,
    parallel: bool,
    panel: impl Fn(usize) -> (*const T, usize) + Sync,
) {
    let m = a.rows;
    let nr = T::nr(isa);
    let (blocks, panels) = (m.div_ceil(MR), n.div_ceil(nr));
    let threads = rayon::current_num_threads();
    // Tasks: rectangles of `bpt x ppt` tiles, each written by one task only;
    // smaller rectangles until every thread has a few.
    let (mut bpt, mut ppt) = (BLOCKS_PER_TASK, PANELS_PER_TASK);
    let count = |bpt: usize, ppt: usize| blocks.div_ceil(bpt) * panels.div_ceil(ppt);
    while parallel && count(bpt, ppt) < 4 * threads && (bpt > 1 || ppt > 1) {
        if bpt >= ppt {
            bpt = bpt.div_ceil(2);
        } else {
            ppt = ppt.div_ceil(2);
        }
    }
    let row_tasks = blocks.div_ceil(bpt);
    let tasks = count(bpt, ppt);
    let out = SharedOut(c.as_mut_ptr());
    let ap = Shared(a.data.as_ptr());
    let run = |task: usize| {
        let (rt, pt) = (task % row_tasks, task / row_tasks);
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            for blk in rt * bpt..((rt + 1) * bpt).min(blocks) {
                let rb = blk * MR;
                let rcount = MR.min(m - rb);
                // Rows past the end repeat the last row (their results are dropped).
                let a_rows: [*const T; MR] = std::array::from_fn(|r| {
                    ap.get()
                        .wrapping_add((rb + r).min(m - 1) * a.rs + k0 * a.cs)
                });
                for p in pt * ppt..((pt + 1) * ppt).min(panels) {
                    let cb = p * nr;
                    let ccount = nr.min(n - cb);
                    let (bsrc, b_rs) = panel(p);
                    let bsrc = bsrc.wrapping_add(k0 * b_rs);
                    let mut tile = [T::default(); TILE];
                    // SAFETY: this task alone reads and writes rows
                    // `rb..rb + rcount`, columns `cb..cb + ccount` of `c`; the
                    // operands' addresses stay inside their data (`Mat::new`
                    // checks the length, `gemm` the views; packed panels hold
                    // `k * nr` values, and `k0 + kc <= k`); `supported` chose
                    // an instruction set the CPU has.
                    unsafe {
                        if accumulate || k0 > 0 {
                            for r in 0..rcount {
                                let src = out.row(rb + r, n, cb, ccount);
                                tile[r * nr..r * nr + ccount].copy_from_slice(src);
                            }
                        }
                        T::kernel(isa, kc, &a_rows, a.cs, bsrc, b_rs, &mut tile);
                        for r in 0..rcount {
                            out.row(rb + r, n, cb, ccount)
                                .copy_from_slice(&tile[r * nr..r * nr + ccount]);
                        }
                    }
                }
            }
        }
    };
    if parallel {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
}

/// Checks a product's shapes and `A`'s view and returns the `m x n` output,
/// or `None` when there is nothing to multiply (an empty output, or `k = 0`:
/// then `C` is zeroed unless accumulating).
fn output<'c, T: Elem>(
    a: Mat<'_, T>,
    b_rows: usize,
    n: usize,
    c: &'c mut [T],
    accumulate: bool,
) -> Option<&'c mut [T]> {
    let (m, k) = (a.rows, a.cols);
    assert_eq!(b_rows, k, "inner dimensions differ");
    assert!(a.fits(), "a matrix view reaches past its data");
    assert!(c.len() >= m * n, "output too short");
    let c = &mut c[..m * n];
    if m == 0 || n == 0 {
        return None;
    }
    if k == 0 {
        if !accumulate {
            c.fill(T::default());
        }
        return None;
    }
    Some(c)
}

/// An operand's data, read by every task.
struct Shared<T>(*const T);

// SAFETY: only read while the product runs.
unsafe impl<T: Sync> Sync for Shared<T> {}

impl<T> Shared<T> {
    fn get(&self) -> *const T {
        self.0
    }
}

/// The output of a product, shared by tasks that write disjoint tiles.
struct SharedOut<T>(*mut T);

// SAFETY: tasks only touch disjoint parts (see `gemm_on`).
unsafe impl<T: Send> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    /// Columns `cb..cb + len` of row `r` of a row-major matrix with `n` columns.
    ///
    /// # Safety
    /// The range is inside the matrix and no other task uses it meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, r: usize, n: usize, cb: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(r * n + cb), len)
    }
}

impl Isa {
    /// This instruction set, or the widest narrower one the machine has.
    fn supported(self) -> Isa {
        match (self, isa_detected()) {
            (Isa::Avx512, Isa::Avx512) => Isa::Avx512,
            (Isa::Avx512 | Isa::Avx2, Isa::Avx512 | Isa::Avx2) => Isa::Avx2,
            _ => Isa::Scalar,
        }
    }
}

/// What the machine has, ignoring the environment (detected once).
fn isa_detected() -> Isa {
    static DETECTED: OnceLock<Isa> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    })
}

/// Packs `B` into column panels of width `nr`: for each panel, `k` rows of
/// `nr` values (zero beyond the last column). With `last_only`, only the
/// last panel, if it is partial (the others are read in place).
fn pack_b<T: Elem>(b: &Mat<'_, T>, nr: usize, last_only: bool, out: &mut Vec<T>, parallel: bool) {
    let (k, n) = (b.rows, b.cols);
    let panels = n.div_ceil(nr);
    let first = match last_only {
        true if n % nr == 0 => panels,
        true => panels - 1,
        false => 0,
    };
    out.clear();
    out.resize((panels - first) * k * nr, T::default());
    let pack = |(i, dst): (usize, &mut [T])| {
        let cb = (first + i) * nr;
        let cc = nr.min(n - cb);
        if b.rs == 1 && b.cs != 1 {
            // A transposed row-major matrix (a weight `W` read as `Wᵀ`):
            // its columns are contiguous, so copy strips of 16 rows column
            // by column (reads along a cache line, writes within 16 rows).
            for k0 in (0..k).step_by(16) {
                let k1 = (k0 + 16).min(k);
                for j in 0..cc {
                    let src = &b.data[(cb + j) * b.cs + k0..(cb + j) * b.cs + k1];
                    for (kk, v) in (k0..k1).zip(src) {
                        dst[kk * nr + j] = *v;
                    }
                }
            }
            return;
        }
        for kk in 0..k {
            let row = &mut dst[kk * nr..kk * nr + cc];
            if b.cs == 1 {
                let s = kk * b.rs + cb;
                row.copy_from_slice(&b.data[s..s + cc]);
            } else {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = b.at(kk, cb + j);
                }
            }
        }
    };
    if parallel {
        out.par_chunks_mut(k * nr).enumerate().for_each(pack);
    } else {
        out.chunks_mut(k * nr).enumerate().for_each(pack);
    }
}

/// The specification: one fused multiply-add per term, in increasing `k`,
/// for an `MR x nr` tile (row stride `nr`) starting from its values.
///
/// # Safety
/// As [`Elem::kernel`].
unsafe fn kernel_scalar<T: Elem>(
    k: usize,
    a_rows: &[*const T; MR],
    a_cs: usize,
    b: *const T,
    b_rs: usize,
    tile: &mut [T; TILE],
    nr: usize,
) {
    for kk in 0..k {
        for (r, ar) in a_rows.iter().enumerate() {
            let av = *ar.add(kk * a_cs);
            let row = &mut tile[r * nr..r * nr + nr];
            for (j, c) in row.iter_mut().enumerate() {
                *c = av.fma(*b.add(kk * b_rs + j), *c);
            }
        }
    }
}

/// The vector micro-kernels: two registers of `C` per row, `MR` rows.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, TILE};
    use std::arch::x86_64::*;

    macro_rules! kernel {
        ($name:ident, $t:ty, $feat:literal, $reg:ty, $lanes:expr,
         $zero:ident, $load:ident, $store:ident, $splat:expr, $fmadd:ident) => {
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $name(
                k: usize,
                a_rows: &[*const $t; MR],
                a_cs: usize,
                bp: *const $t,
                b_rs: usize,
                tile: &mut [$t; TILE],
            ) {
                const NR: usize = 2 * $lanes;
                let t = tile.as_mut_ptr();
                let mut acc: [[$reg; 2]; MR] = [[$zero(); 2]; MR];
                for (r, row) in acc.iter_mut().enumerate() {
                    row[0] = $load(t.add(r * NR));
                    row[1] = $load(t.add(r * NR + $lanes));
                }
                for kk in 0..k {
                    let b0 = $load(bp.add(kk * b_rs));
                    let b1 = $load(bp.add(kk * b_rs + $lanes));
                    for (r, row) in acc.iter_mut().enumerate() {
                        let av = $splat(*a_rows[r].add(kk * a_cs));
                        row[0] = $fmadd(av, b0, row[0]);
                        row[1] = $fmadd(av, b1, row[1]);
                    }
                }
                for (r, row) in acc.iter().enumerate() {
                    $store(t.add(r * NR), row[0]);
                    $store(t.add(r * NR + $lanes), row[1]);
                }
            }
        };
    }

    kernel!(
        kernel_avx2_f32,
        f32,
        "avx2,fma",
        __m256,
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps
    );
    kernel!(
        kernel_avx512_f32,
        f32,
        "avx512f",
        __m512,
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps
    );
    kernel!(
        kernel_avx2_f64,
        f64,
        "avx2,fma",
        __m256d,
        4,
        _mm256_setzero_pd,
        _mm256_loadu_pd,
        _mm256_storeu_pd,
        _mm256_set1_pd,
        _mm256_fmadd_pd
    );
    kernel!(
        kernel_avx512_f64,
        f64,
        "avx512f",
        __m512d,
        8,
        _mm512_setzero_pd,
        _mm512_loadu_pd,
        _mm512_storeu_pd,
        _mm512_set1_pd,
        _mm512_fmadd_pd
    );
}

/// `a.matmul(b)` with this module's products on CPU tensors of `f32` or
/// `f64` (any strides, equal batch dimensions), back-propagating through
/// the same products; other devices and types use candle's.
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let cpu = a.device().is_cpu() && b.device().is_cpu();
    let float = matches!(
        (a.dtype(), b.dtype()),
        (DType::F32, DType::F32) | (DType::F64, DType::F64)
    );
    if cpu && float {
        a.apply_op2(b, MatMul)
    } else {
        a.matmul(b)
    }
}

/// The candle op behind [`matmul`].
struct MatMul;

/// The batch dimensions, `m`, `k`, `n` of a product, checked.
fn product_dims(
    l1: &Layout,
    l2: &Layout,
) -> candle_core::Result<(Vec<usize>, usize, usize, usize)> {
    let (d1, d2) = (l1.dims(), l2.dims());
    let r = d1.len();
    if r < 2 || d2.len() != r || d1[..r - 2] != d2[..r - 2] || d1[r - 1] != d2[r - 2] {
        return Err(candle_core::Error::Msg(format!(
            "matmul of shapes {d1:?} and {d2:?}"
        )));
    }
    Ok((d1[..r - 2].to_vec(), d1[r - 2], d1[r - 1], d2[r - 1]))
}

/// The offset of batch item `i` (row-major over `dims`) in a layout.
fn batch_offset(l: &Layout, dims: &[usize], mut i: usize) -> usize {
    let stride = l.stride();
    let mut off = l.start_offset();
    for d in (0..dims.len()).rev() {
        off += (i % dims[d]) * stride[d];
        i /= dims[d];
    }
    off
}

fn batched<T: Elem>(
    v1: &[T],
    l1: &Layout,
    v2: &[T],
    l2: &Layout,
) -> candle_core::Result<(Vec<T>, Shape)> {
    let (batch, m, k, n) = product_dims(l1, l2)?;
    let count: usize = batch.iter().product();
    let r = batch.len() + 2;
    let (s1, s2) = (l1.stride(), l2.stride());
    let mut out = vec![T::default(); count * m * n];
    for (i, c) in out.chunks_mut((m * n).max(1)).enumerate().take(count) {
        let a = Mat {
            data: &v1[batch_offset(l1, &batch, i)..],
            rows: m,
            cols: k,
            rs: s1[r - 2],
            cs: s1[r - 1],
        };
        let b = Mat {
            data: &v2[batch_offset(l2, &batch, i)..],
            rows: k,
            cols: n,
            rs: s2[r - 2],
            cs: s2[r - 1],
        };
        gemm(a, b, c, false);
    }
    let mut dims = batch;
    dims.extend([m, n]);
    Ok((out, Shape::from(dims)))
}

impl CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        "prunec-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match (s1, s2) {
            (CpuStorage::F32(v1), CpuStorage::F32(v2)) => {
                let (out, shape) = batched(v1, l1, v2, l2)?;
                Ok((CpuStorage::F32(out), shape))
            }
            (CpuStorage::F64(v1), CpuStorage::F64(v2)) => {
                let (out, shape) = batched(v1, l1, v2, l2)?;
                Ok((CpuStorage::F64(out), shape))
            }
            _ => Err(candle_core::Error::Msg(
                "prunec-matmul takes two f32 or two f64 tensors".into(),
            )),
        }
    }

    /// `dA = dC Bᵀ`, `dB = Aᵀ dC`, through the same products.
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let ga = matmul(grad, &b.t()?)?;
        let gb = matmul(&a.t()?, grad)?;
        Ok((Some(ga), Some(gb)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition, element by element.
    fn reference<T: Elem>(a: Mat<'_, T>, b: Mat<'_, T>, c0: Option<&[T]>) -> Vec<T> {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        let mut c = vec![T::default(); m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = c0.map_or(T::default(), |c0| c0[i * n + j]);
                for kk in 0..k {
                    acc = a.at(i, kk).fma(b.at(kk, j), acc);
                }
                c[i * n + j] = acc;
            }
        }
        c
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn gram_upper_gives_the_bits_of_the_full_product(
            rows in 0usize..40, cols in 1usize..300, seed in any::<u64>()
        ) {
            let x = values(rows * cols, seed);
            let m = Mat::new(&x, rows, cols);
            let mut want = vec![0f32; cols * cols];
            gemm(m.t(), m, &mut want, false);
            let mut seen = vec![false; cols * cols];
            gram_upper(&x, rows, cols, |i0, s| {
                let w = cols - i0;
                for (r, row) in s.chunks_exact(w).enumerate() {
                    for (dj, v) in row.iter().enumerate() {
                        let at = (i0 + r) * cols + i0 + dj;
                        assert_eq!(v.to_bits(), want[at].to_bits(), "({}, {})", i0 + r, i0 + dj);
                        seen[at] = true;
                    }
                }
            });
            // Every entry on and above the diagonal came once.
            prop_assert!((0..cols).all(|i| (i..cols).all(|j| seen[i * cols + j])));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn every_isa_computes_the_reference_bits(
            m in 1usize..40, k in 0usize..70, n in 1usize..70,
            ta in any::<bool>(), tb in any::<bool>(), accumulate in any::<bool>(), seed in any::<u64>()
        ) {
            let (av, bv, c0) = (values(m * k, seed), values(k * n, seed ^ 1), values(m * n, seed ^ 2));
            let a = if ta { Mat::new(&av, k, m).t() } else { Mat::new(&av, m, k) };
            let b = if tb { Mat::new(&bv, n, k).t() } else { Mat::new(&bv, k, n) };
            let want = reference(a, b, accumulate.then_some(&c0[..]));
            let wide = |v: &[f32]| v.iter().map(|&x| x as f64 * 1.000_000_1).collect::<Vec<f64>>();
            let (av64, bv64, c064) = (wide(&av), wide(&bv), wide(&c0));
            let a64 = if ta { Mat::new(&av64, k, m).t() } else { Mat::new(&av64, m, k) };
            let b64 = if tb { Mat::new(&bv64, n, k).t() } else { Mat::new(&bv64, k, n) };
            let want64 = reference(a64, b64, accumulate.then_some(&c064[..]));
            for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
                let mut c = c0.clone();
                gemm_on(isa, a, b, &mut c, accumulate);
                let same = c.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits());
                prop_assert!(same, "f32 on {isa:?} differs for {m}x{k}x{n}");
                let mut c = c064.clone();
                gemm_on(isa, a64, b64, &mut c, accumulate);
                let same = c.iter().zip(&want64).all(|(x, y)| x.to_bits() == y.to_bits());
                prop_assert!(same, "f64 on {isa:?} differs for {m}x{k}x{n}");
            }
            // Packed once beforehand, on this machine's instruction set.
            let mut c = c0.clone();
            gemm_packed(a, &PackedB::new(b), &mut c, accumulate);
            let same = c.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits());
            prop_assert!(same, "packed f32 differs for {m}x{k}x{n}");
            // `B` as the transpose of two weights stacked by rows.
            if k > 0 {
                let w: Vec<f32> = (0..n * k).map(|i| b.at(i % k, i / k)).collect();
                let split = (n / 3) * k;
                let packed = PackedB::from_stacked_rows(&[&w[..split], &w[split..]], k);
                let mut c = c0.clone();
                gemm_packed(a, &packed, &mut c, accumulate);
                let same = c.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits());
                prop_assert!(same, "stacked f32 differs for {m}x{k}x{n}");
            }
        }
    }

    /// Products deeper than one pass (`KC`) keep every output's chain: the
    /// reference bits on every instruction set, transposed or not, packed or
    /// read in place, accumulating or not.
    #[test]
    fn deep_products_split_into_passes_keep_the_reference_bits() {
        let (m, k, n) = (13, 2 * KC + 37, 45);
        let (av, bv, c0) = (values(m * k, 1), values(k * n, 2), values(m * n, 3));
        for (ta, tb, accumulate) in [
            (false, false, false),
            (true, false, true),
            (true, true, false),
            (false, true, true),
        ] {
            let a = if ta {
                Mat::new(&av, k, m).t()
            } else {
                Mat::new(&av, m, k)
            };
            let b = if tb {
                Mat::new(&bv, n, k).t()
            } else {
                Mat::new(&bv, k, n)
            };
            let want = reference(a, b, accumulate.then_some(&c0[..]));
            for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
                let mut c = c0.clone();
                gemm_on(isa, a, b, &mut c, accumulate);
                assert!(
                    c.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{isa:?} {ta} {tb}"
                );
            }
            let mut c = c0.clone();
            gemm_packed(a, &PackedB::new(b), &mut c, accumulate);
            assert!(
                c.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()),
                "packed {ta} {tb}"
            );
        }
        // XᵀX over many rows, as calibration statistics of long sequences.
        let (rows, cols) = (3 * KC + 5, 40);
        let x = values(rows * cols, 4);
        let xm = Mat::new(&x, rows, cols);
        let want = reference(xm.t(), xm, None);
        gram_upper(&x, rows, cols, |i0, strip| {
            let w = cols - i0;
            for (r, row) in strip.chunks_exact(w).enumerate() {
                for (dj, v) in row.iter().enumerate() {
                    assert_eq!(v.to_bits(), want[(i0 + r) * cols + i0 + dj].to_bits());
                }
            }
        });
    }

    /// A strided view that reaches past its data is refused before any
    /// kernel reads through it.
    #[test]
    #[should_panic(expected = "reaches past its data")]
    fn a_view_past_its_data_is_refused() {
        let (a, b) = (vec![1.0f32; 6], vec![1.0f32; 6]);
        let bad = Mat {
            data: &a,
            rows: 3,
            cols: 2,
            rs: 3,
            cs: 1,
        };
        let mut c = vec![0.0; 9];
        gemm(bad, Mat::new(&b, 2, 3), &mut c, false);
    }

    #[test]
    fn large_products_are_the_same_bits_at_any_thread_count() {
        let (m, k, n) = (300, 257, 190);
        let (av, bv) = (values(m * k, 5), values(k * n, 6));
        let (a, b) = (Mat::new(&av, m, k), Mat::new(&bv, k, n));
        let want = reference(a, b, None);
        // The same product with `B` stored transposed (a weight read as
        // `Wᵀ`), packed per call and packed once.
        let bt: Vec<f32> = (0..n * k).map(|i| bv[(i % k) * n + i / k]).collect();
        let b_t = Mat::new(&bt, n, k).t();
        let packed = PackedB::new(b_t);
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut c = vec![0.0; m * n];
            pool.install(|| gemm(a, b, &mut c, false));
            assert!(
                c.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{threads} threads"
            );
            let mut c = vec![0.0; m * n];
            pool.install(|| gemm(a, b_t, &mut c, false));
            assert!(
                c.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{threads} threads, transposed B"
            );
            let mut c = vec![0.0; m * n];
            pool.install(|| gemm_packed(a, &packed, &mut c, false));
            assert!(
                c.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{threads} threads, packed B"
            );
        }
    }

    #[test]
    fn the_candle_op_matches_candle_forward_and_backward() {
        use candle_core::{Device, Var};
        let dev = Device::Cpu;
        let a = Var::from_vec(values(2 * 5 * 7, 1), (2, 5, 7), &dev).unwrap();
        let b = Var::from_vec(values(2 * 9 * 7, 2), (2, 9, 7), &dev).unwrap();
        // b transposed: a strided operand.
        let ours = matmul(a.as_tensor(), &b.as_tensor().t().unwrap()).unwrap();
        let theirs = a.as_tensor().matmul(&b.as_tensor().t().unwrap()).unwrap();
        let close = |x: &Tensor, y: &Tensor| {
            let d = (x - y).unwrap().abs().unwrap().flatten_all().unwrap();
            d.max(0).unwrap().to_scalar::<f32>().unwrap()
        };
        assert_eq!(ours.dims(), &[2, 5, 9]);
        assert!(close(&ours, &theirs) < 1e-5);
        let (g1, g2) = (
            ours.sqr().unwrap().sum_all().unwrap().backward().unwrap(),
            theirs.sqr().unwrap().sum_all().unwrap().backward().unwrap(),
        );
        for v in [&a, &b] {
            let (x, y) = (g1.get(v).unwrap(), g2.get(v).unwrap());
            assert!(close(x, y) < 1e-4, "gradients differ");
        }
    }
}
