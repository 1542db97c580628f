//! Sequential layer-wise one-shot pruning: calibrate block l on the already-pruned blocks' outputs, then prune its linears.

use super::error::{Result, RuntimeError};
use super::model::{linear_name, LinearInput, LlamaModel, Proj};
use super::select::{
    apply_pruned, choose_pruned, glob_match, magnitude_scores, wanda_scores, Scope, SparsityPattern,
};
use super::sparsegpt::{sparsegpt_prune, SparseGptConfig};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::time::Instant;

/// The calibration statistics a pruner asks the driver to collect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsNeeds {
    /// Per-input-column squared norms `sum_t x_tj²` (Wanda).
    pub col_norms: bool,
    /// The Gram matrix `XᵀX` (SparseGPT's Hessian up to 2/n).
    pub hessian: bool,
}

impl StatsNeeds {
    fn any(self) -> bool {
        self.col_norms || self.hessian
    }
}

/// Statistics of one linear layer's calibration input X (tokens, cols), accumulated in f64.
#[derive(Debug, Clone)]
pub struct LayerStats {
    /// Number of calibration tokens (rows of X) seen.
    pub tokens: usize,
    /// `sum_t x_tj²` per input column (empty unless requested).
    pub col_sq_norms: Vec<f64>,
    /// `XᵀX`, row-major (cols, cols) (empty unless requested). Only the
    /// entries on and above the diagonal are summed by [`Self::add`] (the
    /// matrix is symmetric); [`Self::xtx_full`] gives the whole of it.
    pub xtx: Vec<f64>,
}

impl LayerStats {
    /// Empty statistics for a layer with `cols` inputs.
    pub fn new(cols: usize, needs: StatsNeeds) -> Self {
        LayerStats {
            tokens: 0,
            col_sq_norms: if needs.col_norms {
                vec![0.0; cols]
            } else {
                Vec::new()
            },
            xtx: if needs.hessian {
                vec![0.0; cols * cols]
            } else {
                Vec::new()
            },
        }
    }

    /// Adds a chunk of inputs (tokens, cols). Chunks are added in a fixed order, so the sums do
    /// not depend on the number of threads.
    pub fn add(&mut self, x: &Tensor) -> Result<()> {
        let (n, cols) = x.dims2()?;
        let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
        self.add_rows(&v, n, cols);
        Ok(())
    }

    /// [`Self::add`] on a row-major `(n, cols)` slice: squares summed in
    /// `f64` row after row, `XᵀX` as one fixed-order product added in `f64`.
    pub fn add_rows(&mut self, x: &[f32], n: usize, cols: usize) {
        use rayon::prelude::*;
        self.tokens += n;
        if !self.col_sq_norms.is_empty() {
            for row in x.chunks_exact(cols).take(n) {
                for (acc, &v) in self.col_sq_norms.iter_mut().zip(row) {
                    let v = v as f64;
                    *acc += v * v;
                }
            }
        }
        if !self.xtx.is_empty() {
            let xtx = &mut self.xtx;
            crate::gemm::gram_upper(&x[..n * cols], n, cols, |i0, strip| {
                let w = cols - i0;
                xtx[i0 * cols..]
                    .par_chunks_mut(cols)
                    .zip(strip.par_chunks(w))
                    .for_each(|(acc, g)| {
                        for (a, v) in acc[i0..].iter_mut().zip(g) {
                            *a += *v as f64;
                        }
                    });
            });
        }
    }

    /// `XᵀX` with both triangles: the upper one as summed, mirrored below.
    pub fn xtx_full(&self) -> Vec<f64> {
        let n = (self.xtx.len() as f64).sqrt().round() as usize;
        let mut full = self.xtx.clone();
        if n * n != full.len() {
            // Not square: left for the caller's shape check to report.
            return full;
        }
        // In tiles, so the transposed reads stay in cache.
        const T: usize = 64;
        for bi in (0..n).step_by(T) {
            for bj in (0..bi + 1).step_by(T) {
                for i in bi..(bi + T).min(n) {
                    for j in bj..(bj + T).min(i) {
                        full[i * n + j] = self.xtx[j * n + i];
                    }
                }
            }
        }
        full
    }

    /// Per-column L2 norms `||X_:j||` (Wanda's activation norm).
    pub fn col_norms(&self) -> Vec<f32> {
        self.col_sq_norms.iter().map(|v| v.sqrt() as f32).collect()
    }
}

/// One linear layer handed to a pruner: its name, its weight (rows = outputs, cols = inputs,
/// row-major, edited in place) and its calibration statistics.
pub struct LayerToPrune<'a> {
    pub name: &'a str,
    pub rows: usize,
    pub cols: usize,
    pub weight: &'a mut [f32],
    pub stats: &'a LayerStats,
    pub pattern: SparsityPattern,
}

/// Decides and applies the mask of one linear layer (and may update the kept weights).
///
/// The sequential driver calls it once per targeted layer, after collecting the statistics
/// [`LayerPruner::needs`] asks for. Returns the number of pruned weights.
pub trait LayerPruner {
    /// A short name for reports (`magnitude`, `wanda`, `sparsegpt`, ...).
    fn method(&self) -> &str;
    /// The statistics the driver must collect before calling [`LayerPruner::prune_layer`].
    fn needs(&self) -> StatsNeeds;
    /// Prunes one layer in place.
    fn prune_layer(&mut self, layer: LayerToPrune<'_>) -> Result<usize>;
    /// The ARMOR factors of the layer just pruned, for the driver to install
    /// in place of its plain weight (none for every other method).
    fn take_armor(&mut self) -> Option<super::armor::Armor> {
        None
    }
}

/// Magnitude pruning: score `|w|`, one threshold per layer (N:M per group).
#[derive(Debug, Clone, Copy, Default)]
pub struct MagnitudePruner;

impl LayerPruner for MagnitudePruner {
    fn method(&self) -> &str {
        "magnitude"
    }
    fn needs(&self) -> StatsNeeds {
        StatsNeeds::default()
    }
    fn prune_layer(&mut self, layer: LayerToPrune<'_>) -> Result<usize> {
        let scores = magnitude_scores(layer.weight);
        let pruned = choose_pruned(&scores, layer.rows, layer.cols, layer.pattern, Scope::Layer)?;
        Ok(apply_pruned(layer.weight, &pruned))
    }
}

/// Wanda: score `|w_ij| * ||X_j||`, compared per output row (N:M per group).
#[derive(Debug, Clone, Copy, Default)]
pub struct WandaPruner;

impl LayerPruner for WandaPruner {
    fn method(&self) -> &str {
        "wanda"
    }
    fn needs(&self) -> StatsNeeds {
        StatsNeeds {
            col_norms: true,
            hessian: false,
        }
    }
    fn prune_layer(&mut self, layer: LayerToPrune<'_>) -> Result<usize> {
        let scores = wanda_scores(layer.weight, layer.cols, &layer.stats.col_norms())?;
        let pruned = choose_pruned(&scores, layer.rows, layer.cols, layer.pattern, Scope::Row)?;
        Ok(apply_pruned(layer.weight, &pruned))
    }
}

/// SparseGPT: mask and OBS weight update from the layer Hessian.
#[derive(Debug, Clone, Copy, Default)]
pub struct SparseGptPruner {
    pub config: SparseGptConfig,
}

impl LayerPruner for SparseGptPruner {
    fn method(&self) -> &str {
        "sparsegpt"
    }
    fn needs(&self) -> StatsNeeds {
        StatsNeeds {
            col_norms: false,
            hessian: true,
        }
    }
    fn prune_layer(&mut self, layer: LayerToPrune<'_>) -> Result<usize> {
        sparsegpt_prune(layer, self.config)
    }
}

/// A pruner from any score function (for example a criterion compiled to a kernel):
/// `score(name, weight, rows, cols, col_norms, scores_out)` fills one score per weight; the
/// lowest scores are pruned within `scope` (N:M patterns always compare within groups).
pub struct ScoredPruner<F> {
    pub method: String,
    pub needs: StatsNeeds,
    pub scope: Scope,
    pub score: F,
}

impl<F> LayerPruner for ScoredPruner<F>
where
    F: FnMut(&str, &[f32], usize, usize, &[f32], &mut [f32]) -> Result<()>,
{
    fn method(&self) -> &str {
        &self.method
    }
    fn needs(&self) -> StatsNeeds {
        self.needs
    }
    fn prune_layer(&mut self, layer: LayerToPrune<'_>) -> Result<usize> {
        let mut scores = vec![0.0f32; layer.weight.len()];
        let norms = layer.stats.col_norms();
        (self.score)(
            layer.name,
            layer.weight,
            layer.rows,
            layer.cols,
            &norms,
            &mut scores,
        )?;
        let pruned = choose_pruned(&scores, layer.rows, layer.cols, layer.pattern, self.scope)?;
        Ok(apply_pruned(layer.weight, &pruned))
    }
}

/// What to prune and how the calibration data is batched.
#[derive(Debug, Clone)]
pub struct OneShotConfig {
    pub pattern: SparsityPattern,
    /// Globs over parameter names; a layer is pruned when it matches one and no `skip` glob.
    pub targets: Vec<String>,
    /// Globs of names left dense. Embeddings and `lm_head` are skipped by default.
    pub skip: Vec<String>,
    /// Calibration sequences per forward chunk (a fixed chunking keeps sums thread-independent).
    pub batch: usize,
    /// Calibrate each block on the outputs of the already-pruned blocks before it (`true`),
    /// or every block on the dense model's activations (`false`).
    pub sequential: bool,
    /// Within each block, prune the linear layers group by group in the order
    /// the block runs them (q, k, v; o; gate, up; down), each group calibrated
    /// on the outputs of the groups pruned before it (SparseGPT's "true
    /// sequential" mode), instead of every layer on the block's dense
    /// activations (`false`, llm-compressor's flow). One forward per group.
    pub true_sequential: bool,
    /// Per block, the unstructured sparsity to prune it to in place of the
    /// pattern's (a per-layer allocation such as OWL's).
    pub block_sparsity: Option<Vec<f64>>,
}

impl OneShotConfig {
    /// Every block linear layer at `pattern`, embeddings and `lm_head` left dense.
    pub fn new(pattern: SparsityPattern) -> Self {
        OneShotConfig {
            pattern,
            targets: vec!["*".into()],
            skip: vec!["model.embed_tokens.weight".into(), "lm_head.weight".into()],
            batch: 8,
            sequential: true,
            true_sequential: false,
            block_sparsity: None,
        }
    }

    /// The pattern block `layer` is pruned to.
    pub fn pattern_of(&self, layer: usize) -> SparsityPattern {
        match (&self.block_sparsity, self.pattern) {
            (Some(s), SparsityPattern::Unstructured(_)) if layer < s.len() => {
                SparsityPattern::Unstructured(s[layer])
            }
            (_, p) => p,
        }
    }

    /// The linear layers it prunes, by block; an error when it targets the
    /// embedding or `lm_head` (one-shot methods prune block linears only) or
    /// selects no layer at all.
    pub fn targeted(&self, model: &LlamaModel) -> Result<Vec<Vec<Proj>>> {
        for special in ["model.embed_tokens.weight", "lm_head.weight"] {
            if self.selects(special) {
                return Err(RuntimeError::Invalid(format!(
                    "`{special}` is targeted, but one-shot methods prune the blocks' linear layers only; add it to skip"
                )));
            }
        }
        let targets: Vec<Vec<Proj>> = (0..model.num_layers())
            .map(|l| {
                model.blocks[l]
                    .projs()
                    .iter()
                    .copied()
                    .filter(|&p| self.selects(&linear_name(l, p)))
                    .collect()
            })
            .collect();
        if targets.iter().all(|t| t.is_empty()) {
            return Err(RuntimeError::Invalid(format!(
                "no layer matches targets {:?} minus skip {:?}",
                self.targets, self.skip
            )));
        }
        Ok(targets)
    }

    /// Whether the layer `name` is pruned: it matches a target glob and no skip glob.
    pub fn selects(&self, name: &str) -> bool {
        self.targets.iter().any(|g| glob_match(g, name))
            && !self.skip.iter().any(|g| glob_match(g, name))
    }
}

/// What happened to one layer.
#[derive(Debug, Clone)]
pub struct LayerReport {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub pruned: usize,
    pub seconds: f64,
}

/// The outcome of a one-shot run.
#[derive(Debug, Clone, Default)]
pub struct PruneReport {
    pub method: String,
    pub layers: Vec<LayerReport>,
    pub calibration_tokens: usize,
    /// Time in block forwards and statistic accumulation.
    pub calibration_seconds: f64,
    /// Time inside the pruner.
    pub solve_seconds: f64,
    pub total_seconds: f64,
}

impl PruneReport {
    /// Pruned fraction over the pruned layers.
    pub fn sparsity(&self) -> f64 {
        let total: usize = self.layers.iter().map(|l| l.rows * l.cols).sum();
        let pruned: usize = self.layers.iter().map(|l| l.pruned).sum();
        pruned as f64 / total.max(1) as f64
    }
}

/// One-shot prunes `model` in place: block by block, calibrated on the outputs of the already
/// pruned blocks before it (`calibration` = equal-length token sequences).
///
/// Memory is bounded by one block's activations for the calibration set plus the statistics of
/// that block's four distinct linear inputs. Pruners that need no statistics run without any
/// forward pass.
pub fn prune_one_shot(
    model: &mut LlamaModel,
    calibration: &[Vec<u32>],
    config: &OneShotConfig,
    pruner: &mut dyn LayerPruner,
) -> Result<PruneReport> {
    let start = Instant::now();
    config.pattern.validate(None)?;
    for l in 0..model.config.num_hidden_layers {
        config.pattern_of(l).validate(None)?;
    }
    let targets = config.targeted(model)?;
    let needs = pruner.needs();
    let mut report = PruneReport {
        method: pruner.method().to_string(),
        ..Default::default()
    };

    // The calibration residual stream, one tensor per chunk of sequences.
    let mut chunks: Vec<Tensor> = Vec::new();
    if needs.any() {
        let t0 = Instant::now();
        chunks = calibration_chunks(model, calibration, config.batch, pruner.method())?;
        report.calibration_tokens = calibration.iter().map(|s| s.len()).sum();
        report.calibration_seconds += t0.elapsed().as_secs_f64();
    }

    // Blocks after the last targeted one need no forward at all.
    let last = targets.iter().rposition(|t| !t.is_empty()).unwrap_or(0);
    for (l, block_targets) in targets.iter().enumerate().take(last + 1) {
        if !needs.any() {
            for &proj in block_targets {
                prune_linear(
                    model,
                    l,
                    proj,
                    None,
                    config.pattern_of(l),
                    pruner,
                    &mut report,
                )?;
            }
            continue;
        }
        if block_targets.is_empty() {
            let t0 = Instant::now();
            for x in chunks.iter_mut() {
                *x = model.block_forward(l, x, None)?;
            }
            report.calibration_seconds += t0.elapsed().as_secs_f64();
            continue;
        }
        let t0 = Instant::now();
        let wanted: Vec<LinearInput> = {
            let mut v: Vec<LinearInput> = block_targets.iter().map(|p| p.input()).collect();
            v.dedup();
            v
        };
        if config.true_sequential {
            // The dense outputs feed the next block when it is not sequential.
            let dense_next = if config.sequential || l == last {
                None
            } else {
                Some(
                    chunks
                        .iter()
                        .map(|x| model.block_forward(l, x, None))
                        .collect::<Result<Vec<_>>>()?,
                )
            };
            report.calibration_seconds += t0.elapsed().as_secs_f64();
            // `wanted` follows the block's order (the targets' order).
            for &input in &wanted {
                let t0 = Instant::now();
                let stats =
                    forward_collecting(model, l, &mut chunks, needs, false, |i| i == input)?;
                report.calibration_seconds += t0.elapsed().as_secs_f64();
                for &proj in block_targets.iter().filter(|p| p.input() == input) {
                    let s = stats.get(&input);
                    prune_linear(model, l, proj, s, config.pattern_of(l), pruner, &mut report)?;
                }
            }
            if let Some(next) = dense_next {
                chunks = next;
                continue;
            }
        } else {
            // Without `sequential`, the next block calibrates on this block's
            // dense outputs; with it, on its pruned outputs (below).
            let stats =
                forward_collecting(model, l, &mut chunks, needs, !config.sequential, |i| {
                    wanted.contains(&i)
                })?;
            report.calibration_seconds += t0.elapsed().as_secs_f64();
            for &proj in block_targets {
                let s = stats.get(&proj.input());
                prune_linear(model, l, proj, s, config.pattern_of(l), pruner, &mut report)?;
            }
        }
        if l == last || !config.sequential {
            continue;
        }
        // Feed the next block with this block's pruned outputs.
        let t0 = Instant::now();
        for x in chunks.iter_mut() {
            *x = model.block_forward(l, x, None)?;
        }
        report.calibration_seconds += t0.elapsed().as_secs_f64();
    }
    report.total_seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Runs block `l` over every chunk, collecting the statistics `needs` of
/// the layer inputs `wanted` accepts; `advance` replaces each chunk by the
/// block's output (the next block's input).
pub(crate) fn forward_collecting(
    model: &LlamaModel,
    l: usize,
    chunks: &mut [Tensor],
    needs: StatsNeeds,
    advance: bool,
    wanted: impl Fn(LinearInput) -> bool,
) -> Result<BTreeMap<LinearInput, LayerStats>> {
    let mut stats: BTreeMap<LinearInput, LayerStats> = BTreeMap::new();
    // Without `advance`, the block runs only as far as its last wanted input.
    let last = LinearInput::ALL.into_iter().filter(|&i| wanted(i)).last();
    for x in chunks.iter_mut() {
        let mut sink = |input: LinearInput, a: &Tensor| -> Result<()> {
            if wanted(input) {
                let cols = a.dim(1)?;
                stats
                    .entry(input)
                    .or_insert_with(|| LayerStats::new(cols, needs))
                    .add(a)?;
            }
            Ok(())
        };
        match last {
            Some(last) if !advance => model.block_inputs(l, x, last, &mut sink)?,
            _ => {
                let out = model.block_forward(l, x, Some(&mut sink))?;
                if advance {
                    *x = out;
                }
            }
        }
    }
    Ok(stats)
}

/// The embedded calibration sequences (equal-length token ids), one tensor
/// per chunk of `batch` sequences; `what` names the method in errors.
pub(crate) fn calibration_chunks(
    model: &LlamaModel,
    calibration: &[Vec<u32>],
    batch: usize,
    what: &str,
) -> Result<Vec<Tensor>> {
    let len = calibration.first().map(|s| s.len()).unwrap_or(0);
    if len == 0 {
        return Err(RuntimeError::Invalid(format!(
            "`{what}` needs calibration data, but none (or an empty sequence) was given"
        )));
    }
    if let Some(bad) = calibration.iter().position(|s| s.len() != len) {
        return Err(RuntimeError::Invalid(format!(
            "calibration sequence {bad} has {} tokens, the first has {len}; all must be equal",
            calibration[bad].len()
        )));
    }
    let vocab = model.config.vocab_size as u32;
    if let Some(t) = calibration.iter().flatten().find(|&&t| t >= vocab) {
        return Err(RuntimeError::Invalid(format!(
            "calibration token id {t} is outside the vocabulary of {vocab}"
        )));
    }
    let mut chunks = Vec::new();
    for group in calibration.chunks(batch.max(1)) {
        let flat: Vec<u32> = group.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (group.len(), len), model.device())?;
        chunks.push(model.embed_tokens(&ids)?);
    }
    Ok(chunks)
}

fn prune_linear(
    model: &mut LlamaModel,
    layer: usize,
    proj: Proj,
    stats: Option<&LayerStats>,
    pattern: SparsityPattern,
    pruner: &mut dyn LayerPruner,
    report: &mut PruneReport,
) -> Result<()> {
    let t0 = Instant::now();
    let name = linear_name(layer, proj);
    let w = model.linear_weight(layer, proj)?;
    let (rows, cols) = w.dims2()?;
    pattern.validate(Some((&name, cols)))?;
    let mut weight: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let empty = LayerStats::new(0, StatsNeeds::default());
    let pruned = pruner.prune_layer(LayerToPrune {
        name: &name,
        rows,
        cols,
        weight: &mut weight,
        stats: stats.unwrap_or(&empty),
        pattern,
    })?;
    let device = model.device().clone();
    match pruner.take_armor() {
        Some(armor) => model.set_armor(layer, proj, &armor)?,
        None => model.set_linear_weight(
            layer,
            proj,
            Tensor::from_vec(weight, (rows, cols), &device)?,
        )?,
    }
    let seconds = t0.elapsed().as_secs_f64();
    report.solve_seconds += seconds;
    report.layers.push(LayerReport {
        name,
        rows,
        cols,
        pruned,
        seconds,
    });
    Ok(())
}
