//! Tensor views, selections, options, summaries and errors shared by both kernel paths.

use super::expr::{KExpr, KInput};

/// One weight tensor to prune, as raw f32 buffers. Conv weights are flattened to
/// `(out, in * kh * kw)`.
#[derive(Debug)]
pub struct TensorView<'a> {
    /// The parameter name, used in every error message.
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    /// The weights, row-major; pruned weights are set to `+0.0` in place.
    pub weights: &'a mut [f32],
    pub grad: Option<&'a [f32]>,
    pub init: Option<&'a [f32]>,
    /// Per-input-column statistics (`cols` values each), indexed by `KInput::ColStat` slot.
    pub col_stats: Vec<&'a [f32]>,
    /// Per-output-row statistics (`rows` values each), indexed by `KInput::RowStat` slot.
    pub row_stats: Vec<&'a [f32]>,
    /// The packed mask, bit `i % 64` of word `i / 64` for element `i`; 1 = kept.
    /// In: the existing mask (weights already pruned stay pruned and count as pruned).
    /// Out: the new mask. Bits past the last element are written as 0.
    pub mask: &'a mut [u64],
}

impl<'a> TensorView<'a> {
    /// A view with no gradient, init weights or statistics.
    pub fn new(
        name: &str,
        rows: usize,
        cols: usize,
        weights: &'a mut [f32],
        mask: &'a mut [u64],
    ) -> Self {
        TensorView {
            name: name.to_string(),
            rows,
            cols,
            weights,
            grad: None,
            init: None,
            col_stats: Vec::new(),
            row_stats: Vec::new(),
            mask,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The number of `u64` words a mask over `n` elements needs.
pub fn mask_words(n: usize) -> usize {
    n.div_ceil(64)
}

/// A dense mask (every element kept) over `n` elements.
pub fn full_mask(n: usize) -> Vec<u64> {
    let mut m = vec![u64::MAX; mask_words(n)];
    if !n.is_multiple_of(64) {
        if let Some(last) = m.last_mut() {
            *last = (1u64 << (n % 64)) - 1;
        }
    }
    m
}

/// Whether element `i` is kept in `mask`.
pub fn mask_bit(mask: &[u64], i: usize) -> bool {
    (mask[i / 64] >> (i % 64)) & 1 == 1
}

/// Which scores are dropped.
///
/// Ties between equal scores break by position: the element that comes first (lower tensor
/// index, then lower flat index `row * cols + col`) is kept first. Elements already pruned
/// by the input mask are never kept and never counted as kept.
#[derive(Clone, Debug, PartialEq)]
pub enum Selection {
    /// One cut over all tensors keeping exactly `keep` unpruned weights in total, with
    /// per-tensor guards: tensor `t` keeps at least `min_keep[t]` and at most `max_keep[t]`
    /// (empty vectors mean no guard). With guards, the cut is the shortest prefix of the
    /// global ranking whose clamped per-tensor counts sum to `keep`; tensors whose count was
    /// clamped then keep their own top `min_keep` / `max_keep`.
    Global {
        keep: usize,
        min_keep: Vec<usize>,
        max_keep: Vec<usize>,
    },
    /// Tensor `t` keeps exactly `keep[t]` of its unpruned weights.
    PerTensor { keep: Vec<usize> },
    /// Every row keeps its top `keep_per_row` unpruned weights (all of them when it has fewer).
    PerRow { keep_per_row: usize },
    /// In every group of `m` consecutive weights along a row, keep the top `n` unpruned ones.
    NM { n: usize, m: usize },
    /// Blocks of `rows x cols` weights scored by the sum of their unpruned elements' scores
    /// (summed row by row, left to right); each tensor keeps `round(keep * blocks)` blocks
    /// with the highest scores. Weights already pruned inside a kept block stay pruned.
    Block { rows: usize, cols: usize, keep: f64 },
}

/// Options for one pruning call.
#[derive(Clone, Debug, Default)]
pub struct PruneOptions {
    /// Values of `KInput::Scalar` slots.
    pub scalars: Vec<f32>,
    /// Accept NaN / infinite weights (NaN scores rank lowest) instead of reporting an error.
    pub allow_nonfinite: bool,
    /// Read the weights once where the selection allows, writing while reading: per-row
    /// selections on rows of whole mask words mask each row while it is in cache, and global
    /// and per-tensor cuts without guards zero the weights below a sampled key range in their
    /// first scan (see `docs/kernels.md`). The results are identical; what changes is the
    /// state of the views after an error: **with `single_pass`, any error may leave the
    /// weights and masks partly written** (never a non-finite weight itself, so the error
    /// names the same one), so the caller must work on copies it can discard.
    /// A global or per-tensor cut whose sample proved wrong in the one direction that cannot
    /// be undone returns [`KernelError::SampleMissed`]: retry on fresh copies without
    /// `single_pass`.
    pub single_pass: bool,
}

/// What happened to one tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSummary {
    pub name: String,
    /// Elements in the tensor.
    pub total: usize,
    /// Unpruned elements before this call.
    pub alive_before: usize,
    /// Unpruned elements after this call.
    pub kept: usize,
    /// The score of the cut that decided this tensor: higher scores were kept, equal ones in
    /// index order up to the count. For a global cut it is the global cut score (the lowest
    /// kept score over all tensors the guards did not clamp); for a per-tensor or clamped
    /// cut, the tensor's own lowest kept score. `None` when nothing was kept, and for
    /// per-row, N:M and block selections, which have no single threshold.
    pub threshold: Option<f32>,
}

/// The result of a pruning call.
#[derive(Clone, Debug, PartialEq)]
pub struct PruneSummary {
    pub tensors: Vec<TensorSummary>,
}

impl PruneSummary {
    /// Total kept weights over all tensors.
    pub fn kept(&self) -> usize {
        self.tensors.iter().map(|t| t.kept).sum()
    }
}

/// Errors a caller can cause; every one names the tensor involved.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KernelError {
    #[error(
        "tensor `{tensor}`: {what} has {got} values, but the {rows}x{cols} weight needs {want}"
    )]
    BadLength {
        tensor: String,
        what: String,
        rows: usize,
        cols: usize,
        got: usize,
        want: usize,
    },
    #[error(
        "tensor `{tensor}`: the criterion `{expr}` reads {input} but no such data was supplied"
    )]
    MissingInput {
        tensor: String,
        expr: String,
        input: String,
    },
    #[error(
        "the criterion `{expr}` reads scalar slot {slot} but only {given} scalars were supplied"
    )]
    MissingScalar {
        expr: String,
        slot: u8,
        given: usize,
    },
    #[error("tensor `{tensor}`: weight {index} (row {row}, col {col}) is {value}; pass allow_nonfinite to prune anyway")]
    NonFinite {
        tensor: String,
        index: usize,
        row: usize,
        col: usize,
        value: f32,
    },
    #[error(
        "tensor `{tensor}`: {cols} columns is not a multiple of m = {m} for N:M pruning ({n}:{m})"
    )]
    NmShape {
        tensor: String,
        cols: usize,
        n: usize,
        m: usize,
    },
    #[error(
        "tensor `{tensor}`: its {rows}x{cols} shape is not a multiple of the {brows}x{bcols} block"
    )]
    BlockShape {
        tensor: String,
        rows: usize,
        cols: usize,
        brows: usize,
        bcols: usize,
    },
    #[error("tensor `{tensor}`: cannot keep {keep} weights, only {alive} are unpruned")]
    KeepTooLarge {
        tensor: String,
        keep: usize,
        alive: usize,
    },
    #[error("tensor `{tensor}`: keep_min {min} is larger than keep_max {max} or than its {alive} unpruned weights")]
    BadGuard {
        tensor: String,
        min: usize,
        max: usize,
        alive: usize,
    },
    #[error("global keep of {keep} is infeasible: the per-tensor guards allow between {lo} and {hi} kept weights (tightest: `{tensor}`)")]
    Infeasible {
        keep: usize,
        lo: usize,
        hi: usize,
        tensor: String,
    },
    #[error("the sampled key range of the single-pass cut over `{tensor}` was too high (the cut lies below it); the weights were partly written, retry on fresh copies without single_pass")]
    SampleMissed { tensor: String },
    #[error("selection is malformed: {0}")]
    BadSelection(String),
    #[error("kernel compilation failed for `{expr}`: {reason}")]
    Compile { expr: String, reason: String },
}

/// Checks buffer lengths, that every input the expression reads is present, and the
/// per-selection shape rules. Does not look at values.
pub fn validate(
    expr: &KExpr,
    sel: &Selection,
    tensors: &[TensorView],
    opts: &PruneOptions,
) -> Result<(), KernelError> {
    for s in expr.scalars() {
        if s as usize >= opts.scalars.len() {
            return Err(KernelError::MissingScalar {
                expr: expr.to_string(),
                slot: s,
                given: opts.scalars.len(),
            });
        }
    }
    for t in tensors {
        let n = t.len();
        let bad = |what: &str, got: usize, want: usize| KernelError::BadLength {
            tensor: t.name.clone(),
            what: what.to_string(),
            rows: t.rows,
            cols: t.cols,
            got,
            want,
        };
        if t.weights.len() != n {
            return Err(bad("the weight buffer", t.weights.len(), n));
        }
        if t.mask.len() != mask_words(n) {
            return Err(bad("the mask (u64 words)", t.mask.len(), mask_words(n)));
        }
        let missing = |input: &str| KernelError::MissingInput {
            tensor: t.name.clone(),
            expr: expr.to_string(),
            input: input.to_string(),
        };
        for input in expr.inputs() {
            match input {
                KInput::Weight | KInput::Scalar(_) => {}
                KInput::Grad => match t.grad {
                    None => return Err(missing("grad(w)")),
                    Some(g) if g.len() != n => return Err(bad("grad(w)", g.len(), n)),
                    _ => {}
                },
                KInput::Init => match t.init {
                    None => return Err(missing("init(w)")),
                    Some(g) if g.len() != n => return Err(bad("init(w)", g.len(), n)),
                    _ => {}
                },
                KInput::ColStat(s) => match t.col_stats.get(s as usize) {
                    None => return Err(missing(&format!("column statistic {s}"))),
                    Some(c) if c.len() != t.cols => {
                        return Err(bad(&format!("column statistic {s}"), c.len(), t.cols))
                    }
                    _ => {}
                },
                KInput::RowStat(s) => match t.row_stats.get(s as usize) {
                    None => return Err(missing(&format!("row statistic {s}"))),
                    Some(c) if c.len() != t.rows => {
                        return Err(bad(&format!("row statistic {s}"), c.len(), t.rows))
                    }
                    _ => {}
                },
            }
        }
    }
    match sel {
        Selection::Global {
            min_keep, max_keep, ..
        } => {
            for (what, v) in [("min_keep", min_keep), ("max_keep", max_keep)] {
                if !v.is_empty() && v.len() != tensors.len() {
                    return Err(KernelError::BadSelection(format!(
                        "{what} has {} entries for {} tensors",
                        v.len(),
                        tensors.len()
                    )));
                }
            }
        }
        Selection::PerTensor { keep } => {
            if keep.len() != tensors.len() {
                return Err(KernelError::BadSelection(format!(
                    "keep has {} entries for {} tensors",
                    keep.len(),
                    tensors.len()
                )));
            }
        }
        Selection::PerRow { .. } => {}
        Selection::NM { n, m } => {
            if *m == 0 || n > m {
                return Err(KernelError::BadSelection(format!(
                    "N:M needs 0 <= n <= m and m > 0, got {n}:{m}"
                )));
            }
            for t in tensors {
                if t.cols % m != 0 {
                    return Err(KernelError::NmShape {
                        tensor: t.name.clone(),
                        cols: t.cols,
                        n: *n,
                        m: *m,
                    });
                }
            }
        }
        Selection::Block { rows, cols, keep } => {
            if *rows == 0 || *cols == 0 || !(0.0..=1.0).contains(keep) {
                return Err(KernelError::BadSelection(format!(
                    "block {rows}x{cols} with keep fraction {keep}: blocks must be non-empty and 0 <= keep <= 1"
                )));
            }
            for t in tensors {
                if t.rows % rows != 0 || t.cols % cols != 0 {
                    return Err(KernelError::BlockShape {
                        tensor: t.name.clone(),
                        rows: t.rows,
                        cols: t.cols,
                        brows: *rows,
                        bcols: *cols,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Reports the first alive non-finite weight (tensor order, then index), if any.
pub fn check_finite(tensors: &[TensorView]) -> Result<(), KernelError> {
    for t in tensors {
        let n = t.len();
        for (wi, &word) in t.mask.iter().enumerate() {
            let base = wi * 64;
            let end = (base + 64).min(n);
            if t.weights[base..end].iter().all(|x| x.is_finite()) {
                continue;
            }
            for i in base..end {
                if (word >> (i - base)) & 1 == 1 && !t.weights[i].is_finite() {
                    return Err(KernelError::NonFinite {
                        tensor: t.name.clone(),
                        index: i,
                        row: i / t.cols.max(1),
                        col: i % t.cols.max(1),
                        value: t.weights[i],
                    });
                }
            }
        }
    }
    Ok(())
}

/// Number of kept (1) bits among the first `n` elements of `mask`.
pub fn count_alive(mask: &[u64], n: usize) -> usize {
    let full = n / 64;
    let mut c = super::simd::count_bits(&mask[..full]);
    if !n.is_multiple_of(64) {
        c += (mask[full] & ((1u64 << (n % 64)) - 1)).count_ones() as usize;
    }
    c
}

/// Per-tensor guards and their feasibility for a global selection: `(min, max)` per tensor.
pub fn global_guards(
    keep: usize,
    min_keep: &[usize],
    max_keep: &[usize],
    tensors: &[TensorView],
    alive: &[usize],
) -> Result<Vec<(usize, usize)>, KernelError> {
    let mut g = Vec::with_capacity(tensors.len());
    for (t, tv) in tensors.iter().enumerate() {
        let min = min_keep.get(t).copied().unwrap_or(0);
        let max = max_keep.get(t).copied().unwrap_or(usize::MAX).min(alive[t]);
        if min > max {
            return Err(KernelError::BadGuard {
                tensor: tv.name.clone(),
                min,
                max: max_keep.get(t).copied().unwrap_or(usize::MAX),
                alive: alive[t],
            });
        }
        g.push((min, max));
    }
    let lo: usize = g.iter().map(|x| x.0).sum();
    let hi: usize = g.iter().map(|x| x.1).sum();
    if keep < lo || keep > hi {
        // Name the tensor whose guard binds hardest in the failing direction.
        let tight = if keep < lo {
            (0..g.len()).max_by_key(|&t| g[t].0)
        } else {
            (0..g.len()).min_by_key(|&t| alive[t] - g[t].1)
        };
        return Err(KernelError::Infeasible {
            keep,
            lo,
            hi,
            tensor: tight.map(|t| tensors[t].name.clone()).unwrap_or_default(),
        });
    }
    Ok(g)
}

/// Number of blocks a tensor keeps under `Selection::Block`.
pub fn blocks_to_keep(n_blocks: usize, keep: f64) -> usize {
    ((n_blocks as f64) * keep).round().min(n_blocks as f64) as usize
}
