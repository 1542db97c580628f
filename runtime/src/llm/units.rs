//! Structured pruning of language models: FFN neurons and key/value head
//! groups removed from every block, so the model and its Hugging Face
//! configuration become smaller.
//!
//! An FFN neuron `j` is row `j` of `gate_proj` and `up_proj` and column `j`
//! of `down_proj`. A kv group `g` is key/value head `g` (rows of `k_proj` and
//! `v_proj`, and their biases) with the query heads that attend through it
//! (rows of `q_proj`, its bias, and the matching columns of `o_proj`). A
//! query head alone is its `q_proj` rows and bias and its `o_proj` columns;
//! every kv group keeps the same number of query heads. The
//! configuration holds one size for every block, so every block keeps the
//! same number of units.
//!
//! Units are scored on the weights that read them, `down_proj` or `o_proj`,
//! with the activations that weight reads on the dense model: a unit's
//! score is the mean of the score function over its columns.

use super::config::LlamaConfig;
use super::error::{Result, RuntimeError};
use super::model::{linear_name, LinearInput, LinearWeight, LlamaModel, Proj};
use super::prune::{LayerStats, StatsNeeds};
use candle_core::{Tensor, D};

/// What a language-model unit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlmUnit {
    /// One FFN neuron (`intermediate_size` per block).
    Ffn,
    /// One key/value head with its query heads (`num_key_value_heads` per block).
    KvGroup,
    /// One query head (`num_attention_heads` per block); every kv group
    /// keeps the same number of them.
    Head,
}

impl LlmUnit {
    /// Units per block.
    pub fn count(self, c: &LlamaConfig) -> usize {
        match self {
            LlmUnit::Ffn => c.intermediate_size,
            LlmUnit::KvGroup => c.num_key_value_heads,
            LlmUnit::Head => c.num_attention_heads,
        }
    }

    /// Units that share a key/value head and must keep equal numbers
    /// (query heads per kv group); 0 when the units are independent.
    pub fn group(self, c: &LlamaConfig) -> usize {
        match self {
            LlmUnit::Head => c.num_attention_heads / c.num_key_value_heads.max(1),
            _ => 0,
        }
    }

    /// The projection that reads the units, and its input.
    pub fn reader(self) -> (Proj, LinearInput) {
        match self {
            LlmUnit::Ffn => (Proj::Down, LinearInput::MlpDown),
            LlmUnit::KvGroup | LlmUnit::Head => (Proj::O, LinearInput::AttentionOutput),
        }
    }

    /// Consecutive input columns of the reader each unit owns.
    pub fn columns(self, c: &LlamaConfig) -> usize {
        match self {
            LlmUnit::Ffn => 1,
            LlmUnit::KvGroup => c.num_attention_heads / c.num_key_value_heads.max(1) * c.head_dim(),
            LlmUnit::Head => c.head_dim(),
        }
    }
}

/// One vector per block.
pub type PerBlock = Vec<Vec<f32>>;

/// Scores each column of a reader weight's elements: `(name, weight, rows,
/// cols, input column norms (empty when not collected), scores out)`.
pub type ScoreFn<'a> = dyn FnMut(&str, &[f32], usize, usize, &[f32], &mut [f32]) -> Result<()> + 'a;

/// Every block's unit scores on the dense model: the mean of `score` over
/// each unit's reader columns; and, when `calibration` ran, the mean of each
/// reader input column over the calibration tokens (FLAP's compensation).
/// `calibration` (equal-length sequences, in chunks of `batch`) is run only
/// when `acts` asks for input statistics.
pub fn unit_scores(
    model: &LlamaModel,
    calibration: &[Vec<u32>],
    unit: LlmUnit,
    acts: bool,
    batch: usize,
    score: &mut ScoreFn<'_>,
) -> Result<(PerBlock, PerBlock)> {
    let c = &model.config;
    let (reader, input) = unit.reader();
    let per_unit = unit.columns(c);
    let mut chunks: Vec<Tensor> = Vec::new();
    if acts {
        let len = calibration.first().map_or(0, Vec::len);
        if len == 0 || calibration.iter().any(|s| s.len() != len) {
            return Err(RuntimeError::Invalid(
                "scoring units by activations needs calibration sequences of one length".into(),
            ));
        }
        for group in calibration.chunks(batch.max(1)) {
            let flat: Vec<u32> = group.iter().flatten().copied().collect();
            let ids = Tensor::from_vec(flat, (group.len(), len), model.device())?;
            chunks.push(model.embed_tokens(&ids)?);
        }
    }
    let mut out = Vec::with_capacity(model.num_layers());
    let mut means = Vec::new();
    for l in 0..model.num_layers() {
        let mut stats: Option<LayerStats> = None;
        let mut sums: Vec<f64> = Vec::new();
        for x in chunks.iter_mut() {
            let mut sink = |i: LinearInput, a: &Tensor| -> Result<()> {
                if i == input {
                    let cols = a.dim(1)?;
                    let needs = StatsNeeds {
                        col_norms: true,
                        hessian: false,
                    };
                    stats
                        .get_or_insert_with(|| LayerStats::new(cols, needs))
                        .add(a)?;
                    // Column sums in f64, row after row: thread-independent.
                    sums.resize(cols, 0.0);
                    let v: Vec<f32> = a.flatten_all()?.to_vec1()?;
                    for row in v.chunks_exact(cols) {
                        for (acc, &x) in sums.iter_mut().zip(row) {
                            *acc += x as f64;
                        }
                    }
                }
                Ok(())
            };
            *x = model.block_forward(l, x, Some(&mut sink))?;
        }
        if let Some(st) = &stats {
            let n = st.tokens.max(1) as f64;
            means.push(sums.iter().map(|s| (s / n) as f32).collect());
        }
        let norms = stats.map(|s| s.col_norms()).unwrap_or_default();
        let w = model.linear_weight(l, reader)?;
        let (rows, cols) = w.dims2()?;
        let values: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let mut scores = vec![0f32; rows * cols];
        score(
            &linear_name(l, reader),
            &values,
            rows,
            cols,
            &norms,
            &mut scores,
        )?;
        let units = cols / per_unit.max(1);
        // f64 sums in row order: the same value at any thread count.
        let mut sums = vec![0f64; units];
        for row in scores.chunks_exact(cols) {
            for (u, s) in sums.iter_mut().enumerate() {
                *s += row[u * per_unit..(u + 1) * per_unit]
                    .iter()
                    .map(|&v| v as f64)
                    .sum::<f64>();
            }
        }
        let n = (rows * per_unit) as f64;
        out.push(sums.into_iter().map(|s| (s / n) as f32).collect());
    }
    Ok((out, means))
}

/// FLAP's bias compensation (An et al. 2024): before the units outside
/// `keep[l]` are removed, their mean contribution over the calibration
/// tokens, `W[:, removed] · mean(X[:, removed])`, is added to the bias of
/// the weight that reads them (`down_proj` for FFN neurons, `o_proj` for
/// heads), so the block's mean output stays what it was. Biases the model
/// lacks are created as zeros (`mlp_bias` / `attention_bias`); the
/// architecture must be able to hold them (Llama; Qwen3 for attention).
pub fn compensate(
    model: &mut LlamaModel,
    unit: LlmUnit,
    keep: &[Vec<usize>],
    means: &[Vec<f32>],
) -> Result<()> {
    let c = model.config.clone();
    use super::config::Architecture;
    let holds = match unit {
        LlmUnit::Ffn => c.architecture == Architecture::Llama,
        _ => matches!(c.architecture, Architecture::Llama | Architecture::Qwen3),
    };
    if !holds {
        return Err(RuntimeError::Invalid(format!(
            "a {} cannot hold the bias FLAP's compensation adds to `{}`",
            c.architecture.class_name(),
            unit.reader().0.hf_module()
        )));
    }
    let (reader, _) = unit.reader();
    let per_unit = unit.columns(&c);
    // Everything is checked before the first bias changes.
    let count = unit.count(&c);
    let reader_cols = count * per_unit;
    if means.len() != model.num_layers()
        || keep.len() != model.num_layers()
        || means.iter().any(|m| m.len() != reader_cols)
    {
        return Err(RuntimeError::Invalid(format!(
            "compensation needs {reader_cols} calibration means for each of the {} blocks",
            model.num_layers()
        )));
    }
    if let Some((l, kl)) = keep.iter().enumerate().find(|(_, kl)| {
        kl.is_empty()
            || kl.windows(2).any(|w| w[0] >= w[1])
            || kl.last().is_some_and(|&u| u >= count)
    }) {
        return Err(RuntimeError::Invalid(format!(
            "block {l}: kept units {kl:?} must be ascending and below {count}"
        )));
    }
    let device = model.device().clone();
    let zeros = |n: usize| Tensor::zeros(n, candle_core::DType::F32, &device);
    for (l, kl) in keep.iter().enumerate() {
        let w = model.linear_weight(l, reader)?;
        let (rows, cols) = w.dims2()?;
        if means[l].len() != cols {
            return Err(RuntimeError::Invalid(format!(
                "block {l}: {} calibration means for {cols} columns",
                means[l].len()
            )));
        }
        let values: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let mut kept = vec![false; count];
        for &u in kl {
            kept[u] = true;
        }
        let removed: Vec<usize> = (0..cols / per_unit.max(1))
            .filter(|&u| !kept[u])
            .flat_map(|u| u * per_unit..(u + 1) * per_unit)
            .collect();
        let delta: Vec<f32> = values
            .chunks_exact(cols)
            .map(|row| {
                removed
                    .iter()
                    .map(|&j| row[j] as f64 * means[l][j] as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        let delta = Tensor::from_vec(delta, rows, &device)?;
        let e = &mut model.blocks[l].extra;
        match unit {
            LlmUnit::Ffn => {
                let inter = c.intermediate_size;
                for b in [&mut e.gate_bias, &mut e.up_bias] {
                    if b.is_none() {
                        *b = Some(zeros(inter)?);
                    }
                }
                let base = match e.down_bias.take() {
                    Some(b) => b,
                    None => zeros(rows)?,
                };
                e.down_bias = Some((base + delta)?);
            }
            _ => {
                for (b, n) in [
                    (&mut e.q_bias, c.q_dim()),
                    (&mut e.k_bias, c.kv_dim()),
                    (&mut e.v_bias, c.kv_dim()),
                ] {
                    if b.is_none() {
                        *b = Some(zeros(n)?);
                    }
                }
                let base = match e.o_bias.take() {
                    Some(b) => b,
                    None => zeros(rows)?,
                };
                e.o_bias = Some((base + delta)?);
            }
        }
    }
    match unit {
        LlmUnit::Ffn => model.config.mlp_bias = true,
        _ => model.config.attention_bias = true,
    }
    Ok(())
}

/// Keeps the units `keep[l]` (ascending indices) of every block, cutting
/// every tensor they span, and updates the configuration. Every block must
/// keep the same number.
pub fn remove_units(model: &mut LlamaModel, unit: LlmUnit, keep: &[Vec<usize>]) -> Result<()> {
    let c = model.config.clone();
    let count = unit.count(&c);
    if keep.len() != model.num_layers() {
        return Err(RuntimeError::Invalid(format!(
            "{} kept-unit lists for {} blocks",
            keep.len(),
            model.num_layers()
        )));
    }
    let k = keep.first().map_or(0, Vec::len);
    for (l, kl) in keep.iter().enumerate() {
        if kl.len() != k || k == 0 {
            return Err(RuntimeError::Invalid(format!(
                "block {l} keeps {} units; every block keeps the same number, at least one",
                kl.len()
            )));
        }
        if kl.windows(2).any(|w| w[0] >= w[1]) || kl.last().is_some_and(|&u| u >= count) {
            return Err(RuntimeError::Invalid(format!(
                "block {l}: kept units {kl:?} must be ascending and below {count}"
            )));
        }
    }
    let hd = c.head_dim();
    let group = c.num_attention_heads / c.num_key_value_heads.max(1);
    if unit == LlmUnit::Head {
        // Every kv group keeps the same number of its query heads.
        for (l, kl) in keep.iter().enumerate() {
            let per: Vec<usize> = (0..c.num_key_value_heads)
                .map(|g| kl.iter().filter(|&&h| h / group == g).count())
                .collect();
            if per.iter().any(|&n| n != per[0] || n == 0) {
                return Err(RuntimeError::Invalid(format!(
                    "block {l} keeps {per:?} query heads per kv group; each group keeps the same number, at least one"
                )));
            }
        }
    }
    let device = model.device().clone();
    let idx = |v: Vec<u32>| Tensor::from_vec(v.clone(), v.len(), &device);
    for (l, kl) in keep.iter().enumerate() {
        // Rows (or columns) of each tensor kept.
        let (rows_q, rows_kv): (Vec<u32>, Vec<u32>) = match unit {
            LlmUnit::Ffn => (Vec::new(), Vec::new()),
            LlmUnit::Head => (
                kl.iter()
                    .flat_map(|&h| (h * hd..(h + 1) * hd).map(|i| i as u32))
                    .collect(),
                Vec::new(),
            ),
            LlmUnit::KvGroup => (
                kl.iter()
                    .flat_map(|&g| (g * group * hd..(g + 1) * group * hd).map(|i| i as u32))
                    .collect(),
                kl.iter()
                    .flat_map(|&g| (g * hd..(g + 1) * hd).map(|i| i as u32))
                    .collect(),
            ),
        };
        let ffn: Vec<u32> = kl.iter().map(|&j| j as u32).collect();
        let ffn_ids = ffn.clone();
        let cuts: Vec<(Proj, usize, Vec<u32>)> = match unit {
            LlmUnit::Ffn => vec![
                (Proj::Gate, 0, ffn.clone()),
                (Proj::Up, 0, ffn.clone()),
                (Proj::Down, 1, ffn),
            ],
            LlmUnit::KvGroup => vec![
                (Proj::Q, 0, rows_q.clone()),
                (Proj::K, 0, rows_kv.clone()),
                (Proj::V, 0, rows_kv.clone()),
                (Proj::O, 1, rows_q.clone()),
            ],
            LlmUnit::Head => vec![(Proj::Q, 0, rows_q.clone()), (Proj::O, 1, rows_q.clone())],
        };
        for (proj, dim, ids) in cuts {
            let w = model.stored_linear(l, proj)?;
            let cut = w.index_select(&idx(ids)?, dim)?.contiguous()?;
            model.blocks[l].set_linear_unchecked(proj, LinearWeight::Dense(cut));
            // A cut ARMOR layer is its cut product: the wrappers no longer fit.
            model.armor.remove(&linear_name(l, proj));
        }
        if unit == LlmUnit::Ffn {
            let e = &mut model.blocks[l].extra;
            for b in [&mut e.gate_bias, &mut e.up_bias] {
                if let Some(t) = b.as_mut() {
                    *t = t.index_select(&idx(ffn_ids.clone())?, 0)?.contiguous()?;
                }
            }
        }
        if unit != LlmUnit::Ffn {
            let e = &mut model.blocks[l].extra;
            for (bias, ids) in [
                (&mut e.q_bias, &rows_q),
                (&mut e.k_bias, &rows_kv),
                (&mut e.v_bias, &rows_kv),
            ] {
                if ids.is_empty() {
                    continue;
                }
                if let Some(b) = bias.as_mut() {
                    *b = b
                        .index_select(&idx(ids.clone())?, D::Minus1)?
                        .contiguous()?;
                }
            }
        }
    }
    let mut config = c;
    match unit {
        LlmUnit::Ffn => config.intermediate_size = k,
        LlmUnit::KvGroup => {
            config.head_dim = Some(hd);
            config.num_key_value_heads = k;
            config.num_attention_heads = k * group;
        }
        LlmUnit::Head => {
            config.head_dim = Some(hd);
            config.num_attention_heads = k;
        }
    }
    model.config = config;
    Ok(())
}
