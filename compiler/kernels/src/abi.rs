//! The calling convention shared by both code generators: the argument block every kernel
//! receives ([`KArgs`]) and the kernels' function type ([`KernelFn`]). The cranelift JIT
//! ([`super::jit`]) and the AVX-512 emitter ([`super::wide`]) both depend on this module,
//! not on each other's.

/// The argument block every kernel receives (one pointer).
#[repr(C)]
#[derive(Debug)]
pub struct KArgs {
    pub w: *mut f32,
    pub grad: *const f32,
    pub init: *const f32,
    /// Pointers to the column statistics, indexed by slot.
    pub col_stats: *const *const f32,
    /// Pointers to the row statistics, indexed by slot.
    pub row_stats: *const *const f32,
    pub scalars: *const f32,
    /// Score output: `out[i - start]`.
    pub out: *mut f32,
    pub cols: u64,
    pub start: u64,
    pub end: u64,
    /// Scan kernels: a score `s` is at or above the range's low end iff `s >= lo`, above its
    /// high end iff `s >= gt` (ordered comparisons: NaN is neither); all lanes equal.
    pub lo: [f32; 4],
    pub gt: [f32; 4],
    /// Scan kernels: one `u16` per 16 elements of the range, bit `j` for element `16 k + j`:
    /// `ge` the elements at or above the low end, `over` those above the high end. (Read
    /// them as `u16`: wider loads of what narrower stores just wrote stall the CPU.)
    pub ge: *mut u16,
    pub over: *mut u16,
    /// The AVX-512 scans ([`super::wide`]): the mask word of element `start`, whose alive
    /// bits they read and the writing ones update in place.
    pub mask: *mut u64,
    /// Out, from the AVX-512 scans but the row scan: per lane, the alive elements above the
    /// range.
    pub above: [u32; 16],
    /// Out, from the AVX-512 scans: nonzero if an alive weight is not finite (not looked
    /// for by the writing scan that allows them).
    pub bad: u16,
    /// The AVX-512 row scan ([`super::wide::WideScans::collect`]): the scores of the alive
    /// elements inside the range, in order, with room for `end - start + 16` (it stores 16
    /// lanes at a time).
    pub cand_scores: *mut f32,
    /// Out, from the row scan: how many candidates it wrote.
    pub cands: u64,
}

impl KArgs {
    /// An argument block with every pointer null and every count zero.
    pub fn empty() -> Self {
        KArgs {
            w: std::ptr::null_mut(),
            grad: std::ptr::null(),
            init: std::ptr::null(),
            col_stats: std::ptr::null(),
            row_stats: std::ptr::null(),
            scalars: std::ptr::null(),
            out: std::ptr::null_mut(),
            cols: 0,
            start: 0,
            end: 0,
            lo: [0.0; 4],
            gt: [0.0; 4],
            ge: std::ptr::null_mut(),
            over: std::ptr::null_mut(),
            mask: std::ptr::null_mut(),
            above: [0; 16],
            bad: 0,
            cand_scores: std::ptr::null_mut(),
            cands: 0,
        }
    }
}

/// A native kernel: `fn(&mut KArgs)`.
pub type KernelFn = unsafe extern "C" fn(*mut KArgs);
