//! Evaluation: accuracy and loss, sparsity, the PQ index, and dense vs kept parameter/FLOP counts.

use candle_core::{DType, Tensor};

use crate::data::Dataset;
use crate::error::{CandleContext, Result, RuntimeError};
use crate::model::Model;

/// Accuracy and loss of a model on a data set.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Metrics {
    /// Fraction of samples whose arg-max class is the label.
    pub accuracy: f64,
    /// Mean cross-entropy per sample.
    pub loss: f64,
    pub correct: usize,
    pub samples: usize,
    /// sha256 of the predicted classes (arg-max, first on ties) as
    /// little-endian `u32`s in sample order: two evaluations predict the
    /// same top-1 class for every sample exactly when these agree.
    pub predictions_sha256: [u8; 32],
}

/// Evaluates `model` on every sample of `data`, in file order (no shuffle), batch by
/// batch; per-batch sums are added in a fixed order, so the result is deterministic.
pub fn evaluate(model: &Model, data: &Dataset) -> Result<Metrics> {
    model.check_data(data)?;
    use sha2::Digest;
    let (mut correct, mut loss_sum) = (0usize, 0.0f64);
    let mut predictions = sha2::Sha256::new();
    let n = data.len();
    let mut start = 0;
    while start < n {
        let len = data.batch_size.min(n - start);
        let batch = data.slice(start, len)?;
        let ctx = || {
            format!(
                "evaluating on {} samples {start}..{}",
                data.name,
                start + len
            )
        };
        let logits = model.forward(&batch.inputs)?;
        let log_p = candle_nn::ops::log_softmax(&logits, 1).ctx(ctx)?;
        let picked = log_p
            .gather(&batch.targets.unsqueeze(1).ctx(ctx)?, 1)
            .ctx(ctx)?;
        loss_sum -= picked
            .to_dtype(DType::F64)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.to_scalar::<f64>())
            .ctx(ctx)?;
        let predicted = logits.argmax(1).ctx(ctx)?;
        for class in predicted.to_vec1::<u32>().ctx(ctx)? {
            predictions.update(class.to_le_bytes());
        }
        let hits = predicted
            .eq(&batch.targets)
            .and_then(|e| e.to_dtype(DType::U32))
            .and_then(|e| e.sum_all())
            .and_then(|e| e.to_scalar::<u32>())
            .ctx(ctx)?;
        correct += hits as usize;
        start += len;
    }
    Ok(Metrics {
        accuracy: correct as f64 / n as f64,
        loss: loss_sum / n as f64,
        correct,
        samples: n,
        predictions_sha256: predictions.finalize().into(),
    })
}

/// Number of exactly-zero entries of a tensor.
pub fn count_zeros(t: &Tensor) -> Result<usize> {
    t.eq(0f32)
        .and_then(|z| z.to_dtype(DType::F64))
        .and_then(|z| z.sum_all())
        .and_then(|z| z.to_scalar::<f64>())
        .map(|z| z as usize)
        .ctx(|| format!("counting zeros of a {:?} tensor", t.dims()))
}

/// Fraction of exactly-zero entries of a tensor.
pub fn sparsity(t: &Tensor) -> Result<f64> {
    let n = t.elem_count();
    if n == 0 {
        return Ok(0.0);
    }
    Ok(count_zeros(t)? as f64 / n as f64)
}

/// Per-tensor and total sparsity (zeros / entries) of the parameters `select` accepts.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SparsityReport {
    /// (name, zeros, entries) in model order.
    pub per_tensor: Vec<(String, usize, usize)>,
    /// Zeros / entries over all selected tensors.
    pub total: f64,
}

/// Sparsity of each parameter accepted by `select` and over all of them.
pub fn model_sparsity(model: &Model, select: impl Fn(&str) -> bool) -> Result<SparsityReport> {
    let mut per_tensor = Vec::new();
    let (mut zeros, mut total) = (0usize, 0usize);
    for p in model.params().iter().filter(|p| select(&p.name)) {
        let z = count_zeros(p.var.as_tensor())?;
        per_tensor.push((p.name.clone(), z, p.numel()));
        zeros += z;
        total += p.numel();
    }
    Ok(SparsityReport {
        per_tensor,
        total: if total == 0 {
            0.0
        } else {
            zeros as f64 / total as f64
        },
    })
}

/// `sum |w|^p` over the entries of `w` (in f64) and the number of non-zero entries.
fn power_sum(w: &Tensor, p: f64) -> Result<(f64, usize)> {
    let ctx = || format!("PQ index of a {:?} tensor", w.dims());
    let s = w
        .to_dtype(DType::F64)
        .and_then(|a| a.abs())
        .and_then(|a| a.powf(p))
        .and_then(|a| a.sum_all())
        .and_then(|a| a.to_scalar::<f64>())
        .ctx(ctx)?;
    let kept = w.elem_count() - count_zeros(w)?;
    Ok((s, kept))
}

fn check_pq(p: f64, q: f64) -> Result<()> {
    if !(p > 0.0 && q > p) {
        return Err(RuntimeError::InvalidConfig(format!(
            "PQ index needs 0 < p < q, got p = {p}, q = {q}"
        )));
    }
    Ok(())
}

/// The PQ index from `sp = sum |w|^p`, `sq = sum |w|^q` over `d` kept weights;
/// 0 for no weight. Mathematically in [0, 1); rounding below 0 (equal
/// magnitudes) is clamped to 0.
pub fn pqi_from_sums(sp: f64, sq: f64, d: usize, p: f64, q: f64) -> f64 {
    if d == 0 || sq == 0.0 {
        return 0.0;
    }
    let d = d as f64;
    let norm_p = sp.powf(1.0 / p);
    let norm_q = sq.powf(1.0 / q);
    (1.0 - d.powf(1.0 / q - 1.0 / p) * norm_p / norm_q).max(0.0)
}

/// PQ index of the kept (non-zero) weights of `w` (METHODS.md, Diao et al. 2023):
/// `I(w) = 1 - d^(1/q - 1/p) * ||w||_p / ||w||_q`, d = number of kept weights.
/// 0 for a tensor with no kept weight.
pub fn pqi(w: &Tensor, p: f64, q: f64) -> Result<f64> {
    check_pq(p, q)?;
    let (sp, d) = power_sum(w, p)?;
    let (sq, _) = power_sum(w, q)?;
    Ok(pqi_from_sums(sp, sq, d, p, q))
}

/// PQ index per selected parameter (model order) and over all of them at once (global).
pub fn model_pqi(
    model: &Model,
    p: f64,
    q: f64,
    select: impl Fn(&str) -> bool,
) -> Result<(Vec<(String, f64)>, f64)> {
    check_pq(p, q)?;
    let (mut sp_all, mut sq_all, mut d_all) = (0.0, 0.0, 0usize);
    let mut per = Vec::new();
    for prm in model.params().iter().filter(|x| select(&x.name)) {
        let w = prm.var.as_tensor();
        let (sp, d) = power_sum(w, p)?;
        let (sq, _) = power_sum(w, q)?;
        per.push((prm.name.clone(), pqi_from_sums(sp, sq, d, p, q)));
        sp_all += sp;
        sq_all += sq;
        d_all += d;
    }
    Ok((per, pqi_from_sums(sp_all, sq_all, d_all, p, q)))
}

/// Parameter and FLOP counts, dense and kept (kept = non-zero weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelCounts {
    pub params_dense: usize,
    pub params_kept: usize,
    /// Forward FLOPs per sample (2 x multiply-adds of linear/conv layers).
    pub flops_dense: u64,
    pub flops_kept: u64,
}

/// Counts every parameter (weights and biases) and the forward FLOPs per sample,
/// dense and counting only non-zero weights.
pub fn model_counts(model: &Model) -> Result<ModelCounts> {
    let mut c = ModelCounts {
        params_dense: 0,
        params_kept: 0,
        flops_dense: 0,
        flops_kept: 0,
    };
    for p in model.params() {
        let kept = p.numel() - count_zeros(p.var.as_tensor())?;
        c.params_dense += p.numel();
        c.params_kept += kept;
        if let Some(cost) = model.layer_costs().iter().find(|lc| lc.weight == p.name) {
            c.flops_dense += 2 * (p.numel() * cost.positions) as u64;
            c.flops_kept += 2 * (kept * cost.positions) as u64;
        }
    }
    Ok(c)
}

/// Wall time of the model's forward pass on one batch of `data` (its
/// batch size, its first samples): the median of `runs` timed passes after
/// `warmup` untimed ones, in seconds, with the batch size. A timing of this
/// machine as it is: it belongs in reports, never in a locked output.
pub fn forward_latency(
    model: &Model,
    data: &Dataset,
    warmup: usize,
    runs: usize,
) -> Result<(f64, usize)> {
    model.check_data(data)?;
    let len = data.batch_size.min(data.len()).max(1);
    let batch = data.slice(0, len)?;
    let median = median_seconds(warmup, runs, || {
        std::hint::black_box(model.forward(&batch.inputs)?);
        Ok::<(), crate::RuntimeError>(())
    })?;
    Ok((median, len))
}

/// The median wall time of `runs` calls of `f` (at least one) after
/// `warmup` untimed ones, in seconds.
pub(crate) fn median_seconds<E>(
    warmup: usize,
    runs: usize,
    mut f: impl FnMut() -> std::result::Result<(), E>,
) -> std::result::Result<f64, E> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(runs.max(1));
    for _ in 0..runs.max(1) {
        let t0 = std::time::Instant::now();
        f()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let mid = times.len() / 2;
    Ok(if times.len() % 2 == 1 {
        times[mid]
    } else {
        (times[mid - 1] + times[mid]) / 2.0
    })
}
