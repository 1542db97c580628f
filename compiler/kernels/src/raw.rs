//! Raw views of the tensors that JIT kernels run over, chunking, and the kernel cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use super::abi::{KArgs, KernelFn};
use super::expr::KExpr;
use super::jit::{compile_with, CompiledKernel};
use super::types::{KernelError, TensorView};
use super::wide::WideScans;

/// Elements per parallel work unit: fixed, so results never depend on the thread count.
/// A multiple of 64, so every chunk owns whole mask words.
pub const CHUNK: usize = 1 << 18;

/// Elements scored at a time into a cache-resident buffer before selection or masking: 8 KB
/// of scores, so buffer, weights and the next block (prefetched while this one is compared)
/// stay in the 32 KB L1. Larger blocks spread the per-block calls, smaller ones keep more in
/// L1; this size was the fastest of 1024, 2048 and 4096 (`docs/benchmarks/kernels.md`).
pub const BLOCK: usize = 1 << 11;

/// Whether `PRUNEC_TRACE_CUT` asks for timings on stderr.
pub fn tracing() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("PRUNEC_TRACE_CUT").is_some())
}

/// Prints `what` with the seconds since `since` when [`tracing`].
pub fn trace(what: &str, since: std::time::Instant) {
    if tracing() {
        eprintln!("  {what} {:.6}s", since.elapsed().as_secs_f64());
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's score buffer.
pub fn with_scratch<R>(f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut b) => f(&mut b),
        // Re-entered (a nested rayon job on this thread): use a fresh buffer.
        Err(_) => f(&mut Vec::new()),
    })
}

/// Compiled kernels, one set per distinct expression (keyed by its canonical text).
#[derive(Default)]
pub struct KernelCache {
    kernels: Mutex<HashMap<String, CompiledKernel>>,
    /// Never use the AVX-512 scans (for comparisons).
    narrow: bool,
}

impl KernelCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty cache whose kernels only ever run cranelift's code (no AVX-512 scans), for
    /// comparisons of the two code generators in one process.
    pub fn narrow() -> Self {
        KernelCache {
            narrow: true,
            ..Self::default()
        }
    }

    /// The process-wide cache `prune_jit` uses.
    pub fn global() -> &'static KernelCache {
        static CACHE: OnceLock<KernelCache> = OnceLock::new();
        CACHE.get_or_init(KernelCache::new)
    }

    /// The kernels for `expr`, compiling them on first use.
    pub fn get(&self, expr: &KExpr) -> Result<CompiledKernel, KernelError> {
        let key = expr.cache_key();
        let mut map = self.kernels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = map.get(&key) {
            return Ok(*k);
        }
        let k = compile_with(expr, !self.narrow).map_err(|reason| KernelError::Compile {
            expr: expr.to_string(),
            reason,
        })?;
        map.insert(key, k);
        Ok(k)
    }

    /// Number of compiled expressions.
    pub fn len(&self) -> usize {
        self.kernels.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether nothing has been compiled yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The float-domain range a fused scan classifies against (see [`RawTensor::scan_into`]).
#[derive(Clone, Copy, Debug)]
pub struct ScanRange {
    /// Scores `s >= lo` are at or above the range's low end (ordered: not NaN).
    pub lo: f32,
    /// Scores `s >= gt` are above its high end.
    pub gt: f32,
    /// Zero the weights below the range.
    pub write: bool,
    /// Zero non-finite weights below the range too (otherwise they are left as they are).
    pub allow: bool,
}

/// What an AVX-512 scan of a block counted (see [`RawTensor::scan_into`]).
#[derive(Clone, Copy, Debug)]
pub struct Settled {
    /// Alive elements above the range.
    pub above: u64,
    /// Whether an alive weight is not finite (the writing scans that allow them do not look).
    pub bad: bool,
    /// Whether the scores were stored. When not (the magnitude's writing scans, see
    /// [`super::wide::WideScans::zero_stores_scores`]), a kept element's score is the magnitude of
    /// its weight, which the scan left as it was.
    pub scores: bool,
}

impl Settled {
    /// What an AVX-512 scan left in its arguments.
    fn of(a: &KArgs, scores: bool) -> Self {
        Settled {
            above: a.above.iter().map(|&x| x as u64).sum(),
            bad: a.bad != 0,
            scores,
        }
    }
}

/// What a fused scan of at most one block writes besides the scores: per 16 elements one
/// `u16` (bit `j` for element `16 k + j`) of those at or above the range (`ge`) and above it
/// (`over`).
pub struct ScanBits {
    pub ge: [u16; BLOCK / 16],
    pub over: [u16; BLOCK / 16],
}

impl ScanBits {
    pub fn new() -> Self {
        ScanBits {
            ge: [0; BLOCK / 16],
            over: [0; BLOCK / 16],
        }
    }

    /// Word `wi` (64 elements) of a bit array.
    #[inline(always)]
    pub fn word(h: &[u16], wi: usize) -> u64 {
        let q = &h[4 * wi..4 * wi + 4];
        q[0] as u64 | (q[1] as u64) << 16 | (q[2] as u64) << 32 | (q[3] as u64) << 48
    }
}

impl Default for ScanBits {
    fn default() -> Self {
        Self::new()
    }
}

/// Raw pointers to one tensor's buffers, shared by the parallel workers.
///
/// Workers only ever write disjoint element ranges that start at a multiple of 64 (so they
/// also own disjoint mask words), and the pointers come from slices that outlive the call.
pub struct RawTensor {
    w: *mut f32,
    grad: *const f32,
    init: *const f32,
    col_ptrs: Vec<*const f32>,
    row_ptrs: Vec<*const f32>,
    scalars: Arc<Vec<f32>>,
    mask: *mut u64,
    /// Optional side bitmap (one bit per element, like the mask) for two-pass selections.
    side: *mut u64,
    pub cols: usize,
    pub len: usize,
}

// SAFETY: see the type's documentation: concurrent users touch disjoint ranges only.
unsafe impl Send for RawTensor {}
// SAFETY: as above.
unsafe impl Sync for RawTensor {}

impl RawTensor {
    pub fn new(t: &mut TensorView, scalars: Arc<Vec<f32>>) -> Self {
        let mut r = Self::read_only(t, scalars);
        r.w = t.weights.as_mut_ptr();
        r.mask = t.mask.as_mut_ptr();
        r
    }

    /// A view for kernels that never write (`score`, `scan`): the pointers are only read.
    pub fn read_only(t: &TensorView, scalars: Arc<Vec<f32>>) -> Self {
        RawTensor {
            w: t.weights.as_ptr() as *mut f32,
            grad: t.grad.map_or(std::ptr::null(), |g| g.as_ptr()),
            init: t.init.map_or(std::ptr::null(), |g| g.as_ptr()),
            col_ptrs: t.col_stats.iter().map(|c| c.as_ptr()).collect(),
            row_ptrs: t.row_stats.iter().map(|c| c.as_ptr()).collect(),
            scalars,
            mask: t.mask.as_ptr() as *mut u64,
            side: std::ptr::null_mut(),
            cols: t.cols,
            len: t.len(),
        }
    }

    /// Arguments for a kernel over `[start, end)`.
    pub fn args(&self, start: usize, end: usize) -> KArgs {
        let mut a = KArgs::empty();
        a.w = self.w;
        a.grad = self.grad;
        a.init = self.init;
        a.col_stats = self.col_ptrs.as_ptr();
        a.row_stats = self.row_ptrs.as_ptr();
        a.scalars = self.scalars.as_ptr();
        a.cols = self.cols as u64;
        a.start = start as u64;
        a.end = end as u64;
        a
    }

    /// Runs `f` on `args`.
    ///
    /// # Safety
    /// `args` must come from [`RawTensor::args`] with `start <= end <= len` and `out` sized
    /// for `end - start` scores; kernels only read the tensor.
    pub unsafe fn run(&self, f: KernelFn, args: &mut KArgs) {
        debug_assert!(args.start <= args.end && args.end as usize <= self.len);
        // SAFETY: guaranteed by the caller, see above.
        unsafe { f(args) }
    }

    /// Scores elements `[start, end)` with `f` (a score kernel) into `buf`, resized to fit.
    pub fn score_into(&self, f: KernelFn, start: usize, end: usize, buf: &mut Vec<f32>) {
        assert!(start <= end && end <= self.len);
        buf.clear();
        buf.reserve(end - start);
        let mut a = self.args(start, end);
        a.out = buf.as_mut_ptr();
        // SAFETY: a score kernel only reads the tensor and writes all `end - start` values,
        // which the capacity holds; after it they are initialised.
        unsafe {
            self.run(f, &mut a);
            buf.set_len(end - start);
        }
    }

    /// Runs the fused scan kernel of `k` that `range` asks for on `[start, end)`, a whole
    /// number of 64-element words, at most a block: scores go to `out` (`end - start` of
    /// them), the classification against `range` to `bits`; with `range.write` the weights
    /// below the range are zeroed (non-finite ones only with `range.allow`: otherwise they
    /// stay, for the caller's check). Returns `None` for cranelift's scans.
    ///
    /// The AVX-512 scans (see [`super::wide`]) run where the tensor allows and return
    /// `Some` with what they also counted: the alive elements above the range, and whether
    /// an alive weight is not finite (the writing scan with `range.allow` does not look);
    /// the magnitude's writing scans leave `out` alone ([`Settled::scores`]).
    /// Their bits only hold alive elements: the read scan leaves in `bits.ge` those inside
    /// the range (at or above its low end, not above its high end) and in `bits.over` those
    /// above it, which is what [`ScanBits`] readers derive from cranelift's bits and the mask
    /// anyway. Their writing scans also settle the mask (alive elements at or above the
    /// range, and alive non-finite ones, stay), zero every other weight (pruned ones too) and
    /// leave in `bits.ge` the kept elements inside the range (`bits.over` is not written).
    ///
    /// # Safety
    /// With `range.write`, the calling worker owns the weights and mask words of
    /// `[start, end)`.
    pub unsafe fn scan_into(
        &self,
        k: &CompiledKernel,
        start: usize,
        end: usize,
        range: &ScanRange,
        out: &mut [f32],
        bits: &mut ScanBits,
    ) -> Option<Settled> {
        assert!(start <= end && end <= self.len && (end - start).is_multiple_of(64));
        assert!(end - start <= BLOCK && out.len() == end - start);
        let wide = k.wide_for(self.cols);
        assert!(
            wide.is_some() || k.scan_ok(self.cols),
            "a scan kernel on rows it cannot walk"
        );
        let (ge, over) = (bits.ge.as_mut_ptr(), bits.over.as_mut_ptr());
        let mut a = self.scan_args(start, end, range.lo, range.gt, out.as_mut_ptr(), ge, over);
        let f = match (range.write, range.allow, wide) {
            (false, _, Some(w)) => w.read,
            (true, false, Some(w)) => w.zero,
            (true, true, Some(w)) => w.zero_all,
            (false, _, None) => k.scan_read,
            (true, false, None) => k.scan_zero,
            (true, true, None) => k.scan_zero_all,
        };
        // SAFETY: the scan kernel reads the tensor, writes `end - start` scores to `out` and
        // one bit per element to `bits`, and writes weights (and, AVX-512, mask words) of
        // `[start, end)` only with `write`, which the caller owns then.
        unsafe { self.run(f, &mut a) };
        wide.map(|w| Settled::of(&a, !range.write || w.zero_stores_scores))
    }

    /// Arguments for a scan kernel over `[start, end)` (`start` a multiple of 64): the
    /// range's float bounds, the score and bit outputs, and the mask word of `start`, which
    /// the AVX-512 scans read (cranelift's ignore it).
    #[allow(clippy::too_many_arguments)]
    fn scan_args(
        &self,
        start: usize,
        end: usize,
        lo: f32,
        gt: f32,
        out: *mut f32,
        ge: *mut u16,
        over: *mut u16,
    ) -> KArgs {
        let mut a = self.args(start, end);
        a.out = out;
        a.lo = [lo; 4];
        a.gt = [gt; 4];
        a.ge = ge;
        a.over = over;
        // SAFETY: `start <= len` is a multiple of 64, so this is at most one past the last
        // mask word.
        a.mask = unsafe { self.mask.add(start / 64) };
        a
    }

    /// Checks an AVX-512 read or row scan's range (whole 64-element words) and bits (a word
    /// per 64 elements of each) and builds its arguments.
    #[allow(clippy::too_many_arguments)]
    fn wide_args(
        &self,
        w: &WideScans,
        start: usize,
        end: usize,
        lo: f32,
        gt: f32,
        out: *mut f32,
        inside: &mut [u64],
        above: &mut [u64],
    ) -> KArgs {
        assert!(start <= end && end <= self.len && (end - start).is_multiple_of(64));
        assert!(w.ok(self.cols) && start.is_multiple_of(64));
        let words = (end - start) / 64;
        assert!(inside.len() == words && above.len() == words);
        // The kernel stores a `u16` per 16 elements: in little-endian order, the words.
        let (ge, over) = (
            inside.as_mut_ptr() as *mut u16,
            above.as_mut_ptr() as *mut u16,
        );
        self.scan_args(start, end, lo, gt, out, ge, over)
    }

    /// Runs the read-only AVX-512 scan of `w` on `[start, end)`, whole 64-element words of
    /// any number: the scores go to `out` (resized to fit), and one bit per element, as
    /// words like the mask's, of the alive elements with `lo <= s < gt` to `inside` and of
    /// those with `s >= gt` to `above`; returns the counts (see [`Self::scan_into`]).
    #[allow(clippy::too_many_arguments)]
    pub fn scan_wide_read(
        &self,
        w: &WideScans,
        start: usize,
        end: usize,
        lo: f32,
        gt: f32,
        out: &mut Vec<f32>,
        inside: &mut [u64],
        above: &mut [u64],
    ) -> Settled {
        let n = end - start;
        out.clear();
        out.reserve(n);
        let mut a = self.wide_args(w, start, end, lo, gt, out.as_mut_ptr(), inside, above);
        // SAFETY: the read-only scan reads the tensor and its mask, writes `n` scores (the
        // capacity holds them; after it they are initialised) and `n / 64` words of each
        // bits.
        unsafe {
            self.run(w.read, &mut a);
            out.set_len(n);
        }
        Settled::of(&a, true)
    }

    /// Runs the AVX-512 row scan `w.collect` on `[start, end)`, whole 64-element words of
    /// one row from its first column: the scores of the alive elements with `lo <= s < gt`
    /// go to `scores` (resized to hold them, in order), and one bit per element, as words
    /// like the mask's, of those same elements to `inside` and of the alive ones with
    /// `s >= gt` to `above`; returns the counts (see [`Self::scan_into`]). With `dense`
    /// (every element of the range alive) it runs `w.collect_dense`.
    #[allow(clippy::too_many_arguments)]
    pub fn scan_wide_collect(
        &self,
        w: &WideScans,
        dense: bool,
        start: usize,
        end: usize,
        lo: f32,
        gt: f32,
        scores: &mut Vec<f32>,
        inside: &mut [u64],
        above: &mut [u64],
    ) -> Settled {
        assert!(start <= end && start.is_multiple_of(self.cols.max(1)));
        assert!(end - start <= self.cols);
        let n = end - start;
        // The kernel stores 16 lanes at a time, up to 15 past the last candidate.
        scores.clear();
        scores.reserve(n + 16);
        let null = std::ptr::null_mut();
        let mut a = self.wide_args(w, start, end, lo, gt, null, inside, above);
        a.cand_scores = scores.as_mut_ptr();
        // SAFETY: the row scan reads the tensor and its mask, writes `n / 64` words of each
        // bits and at most `n + 16` scores, of which the first `cands` are initialised after
        // it; it does not write `out`.
        unsafe {
            self.run(if dense { w.collect_dense } else { w.collect }, &mut a);
            assert!(a.cands as usize <= n);
            scores.set_len(a.cands as usize);
        }
        // The row scan leaves the count of the elements above to its bits.
        Settled {
            above: super::simd::popcount(above) as u64,
            bad: a.bad != 0,
            scores: true,
        }
    }

    /// The weights `[start, end)`.
    ///
    /// # Safety
    /// `start <= end <= len`, and nothing writes them while the slice lives.
    pub unsafe fn weights(&self, start: usize, end: usize) -> &[f32] {
        debug_assert!(start <= end && end <= self.len);
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts(self.w.add(start), end - start) }
    }

    /// The weights `[start, end)`, writable.
    ///
    /// # Safety
    /// `start <= end <= len`, and the calling worker owns them while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn weights_mut(&self, start: usize, end: usize) -> &mut [f32] {
        debug_assert!(start <= end && end <= self.len);
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts_mut(self.w.add(start), end - start) }
    }

    /// Mask words `[w0, w1)`.
    ///
    /// # Safety
    /// `w0 <= w1 <= ceil(len / 64)`, and nothing writes them while the slice lives.
    pub unsafe fn mask_words(&self, w0: usize, w1: usize) -> &[u64] {
        debug_assert!(w0 <= w1 && w1 <= self.len.div_ceil(64));
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts(self.mask.add(w0), w1 - w0) }
    }

    /// Mask words `[w0, w1)`, writable.
    ///
    /// # Safety
    /// `w0 <= w1 <= ceil(len / 64)`, and the calling worker owns them while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn mask_words_mut(&self, w0: usize, w1: usize) -> &mut [u64] {
        debug_assert!(w0 <= w1 && w1 <= self.len.div_ceil(64));
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts_mut(self.mask.add(w0), w1 - w0) }
    }

    /// Attaches a side bitmap of `ceil(len / 64)` words, which must outlive every use.
    pub fn set_side(&mut self, side: &mut [u64]) {
        assert_eq!(side.len(), self.len.div_ceil(64));
        self.side = side.as_mut_ptr();
    }

    /// Side bitmap words `[w0, w1)`, or an empty slice when no side bitmap is attached.
    ///
    /// # Safety
    /// `w0 <= w1 <= ceil(len / 64)`, and the calling worker owns those words while the slice
    /// lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn side_words_mut(&self, w0: usize, w1: usize) -> &mut [u64] {
        if self.side.is_null() {
            return &mut [];
        }
        debug_assert!(w0 <= w1 && w1 <= self.len.div_ceil(64));
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts_mut(self.side.add(w0), w1 - w0) }
    }

    /// The weight at `i`.
    ///
    /// # Safety
    /// `i < len`, and no kernel writes element `i` concurrently.
    pub unsafe fn weight(&self, i: usize) -> f32 {
        // SAFETY: guaranteed by the caller.
        unsafe { *self.w.add(i) }
    }

    /// Sets the weight at `i`.
    ///
    /// # Safety
    /// `i < len`, and the calling worker owns element `i`.
    pub unsafe fn set_weight(&self, i: usize, v: f32) {
        // SAFETY: guaranteed by the caller.
        unsafe { *self.w.add(i) = v }
    }

    /// The mask word `wi`.
    ///
    /// # Safety
    /// `wi < ceil(len / 64)`, and no worker writes it concurrently.
    pub unsafe fn mask_word(&self, wi: usize) -> u64 {
        // SAFETY: guaranteed by the caller.
        unsafe { *self.mask.add(wi) }
    }

    /// Sets the mask word `wi`.
    ///
    /// # Safety
    /// `wi < ceil(len / 64)`, and the calling worker owns the word.
    pub unsafe fn set_mask_word(&self, wi: usize, v: u64) {
        // SAFETY: guaranteed by the caller.
        unsafe { *self.mask.add(wi) = v }
    }
}

/// A piece of one tensor: elements `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub tensor: usize,
    pub start: usize,
    pub end: usize,
}

/// The fixed chunks of a tensor of `len` elements.
pub fn chunks_of(tensor: usize, len: usize) -> impl Iterator<Item = Chunk> {
    (0..len.div_ceil(CHUNK)).map(move |c| Chunk {
        tensor,
        start: c * CHUNK,
        end: ((c + 1) * CHUNK).min(len),
    })
}
