//! Mixture-of-experts feed-forward blocks (`Qwen3MoeForCausalLM`): routing,
//! the forward on slices and as candle operations (differentiable, for the
//! loss gradients HEAPr reads), the experts' calibration statistics, and
//! removing whole experts or atomic experts.
//!
//! A token's router logits are `router · h`; their softmax (f32) picks the
//! `top_k` most probable experts, whose probabilities (renormalised to sum
//! to one with `norm_topk_prob`) weight the experts' outputs. An atomic
//! expert is one intermediate neuron of an expert: row `i` of its gate and
//! up projections and column `i` of its down projection.

use super::config::LlamaConfig;
use super::error::{Result, RuntimeError};
use super::forward::{Packs, EXPERTS, ROUTER};
use super::model::{LlamaModel, MoeBlock};
use crate::gemm::{gemm_packed, gemm_serial, Mat};
use candle_core::{DType, Tensor, Var, D};
use rayon::prelude::*;

/// The experts chosen for each row (`top_k` per row, most probable first)
/// and their routing weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    pub experts: Vec<usize>,
    pub weights: Vec<f32>,
}

impl Routing {
    /// Routes `rows` rows of router logits (`n` experts each): softmax in
    /// f32 (summed left to right), the `top_k` largest probabilities (ties
    /// to the lower expert), renormalised when `norm`.
    pub fn from_logits(logits: &[f32], n: usize, top_k: usize, norm: bool) -> Routing {
        let rows = logits.len() / n.max(1);
        let mut experts = Vec::with_capacity(rows * top_k);
        let mut weights = Vec::with_capacity(rows * top_k);
        let mut probs = vec![0.0f32; n];
        for row in logits.chunks(n) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for (p, &v) in probs.iter_mut().zip(row) {
                *p = (v - max).exp();
                sum += *p;
            }
            for p in probs.iter_mut() {
                *p /= sum;
            }
            let chosen = top_k_of(&probs, top_k);
            let total: f32 = chosen.iter().fold(0.0f32, |acc, &e| acc + probs[e]);
            for e in chosen {
                experts.push(e);
                weights.push(if norm { probs[e] / total } else { probs[e] });
            }
        }
        Routing {
            top_k,
            experts,
            weights,
        }
    }

    /// Each expert's rows (ascending) and the weights they give it.
    pub fn by_expert(&self, n: usize) -> Vec<(Vec<usize>, Vec<f32>)> {
        let mut out = vec![(Vec::new(), Vec::new()); n];
        for (slot, (&e, &w)) in self.experts.iter().zip(&self.weights).enumerate() {
            out[e].0.push(slot / self.top_k);
            out[e].1.push(w);
        }
        out
    }
}

/// The `k` most probable experts of one row, most probable first (ties to
/// the lower expert): the choice both forwards make.
fn top_k_of(probs: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

/// A tensor's values as f32.
fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

fn routing_of(
    c: &LlamaConfig,
    moe: &MoeBlock,
    packs: &Packs,
    layer: usize,
    h: &[f32],
    rows: usize,
) -> Result<Routing> {
    let mc = c.moe.as_ref().ok_or_else(|| {
        RuntimeError::Invalid("a block holds experts but the model has no routing".into())
    })?;
    let (d, n) = (c.hidden_size, moe.experts.len());
    let router = packs.get((layer, ROUTER), &[&moe.router])?;
    let mut logits = vec![0.0f32; rows * n];
    gemm_packed(Mat::new(h, rows, d), &router, &mut logits, false);
    Ok(Routing::from_logits(
        &logits,
        n,
        mc.top_k,
        mc.norm_topk_prob,
    ))
}

/// Expert `e`'s output rows for the input rows `x` (`rows x hidden`), from
/// its weights packed once in the model's cache (as the dense products are).
fn expert_rows(
    packs: &Packs,
    layer: usize,
    e: usize,
    expert: &super::model::Expert,
    x: &[f32],
    rows: usize,
    d: usize,
) -> Result<Vec<f32>> {
    let w = expert.width();
    let gate_up = packs.get((layer, EXPERTS + 2 * e), &[&expert.gate, &expert.up])?;
    let down = packs.get((layer, EXPERTS + 2 * e + 1), &[&expert.down])?;
    let mut gu = vec![0.0f32; rows * 2 * w];
    gemm_packed(Mat::new(x, rows, d), &gate_up, &mut gu, false);
    let mut act = vec![0.0f32; rows * w];
    for (a, gu) in act.chunks_mut(w).zip(gu.chunks(2 * w)) {
        let (g, u) = gu.split_at(w);
        for ((o, &gv), &uv) in a.iter_mut().zip(g).zip(u) {
            *o = gv / (1.0 + (-gv).exp()) * uv;
        }
    }
    let mut out = vec![0.0f32; rows * d];
    gemm_packed(Mat::new(&act, rows, w), &down, &mut out, false);
    Ok(out)
}

/// Adds the block's experts' output for the normalised rows `h` (`rows x
/// hidden`) to the residual rows `x`. Experts run in parallel; their
/// weighted outputs are summed in expert order, then added to `x`, so the
/// bits do not depend on the thread count.
pub(crate) fn moe_slices(
    c: &LlamaConfig,
    moe: &MoeBlock,
    packs: &Packs,
    layer: usize,
    h: &[f32],
    rows: usize,
    x: &mut [f32],
) -> Result<()> {
    let d = c.hidden_size;
    let routing = routing_of(c, moe, packs, layer, h, rows)?;
    let groups = routing.by_expert(moe.experts.len());
    let outs: Vec<Option<Vec<f32>>> = moe
        .experts
        .par_iter()
        .enumerate()
        .zip(&groups)
        .map(|((e, expert), (tokens, _))| -> Result<Option<Vec<f32>>> {
            if tokens.is_empty() {
                return Ok(None);
            }
            let gathered: Vec<f32> = tokens
                .iter()
                .flat_map(|&t| h[t * d..(t + 1) * d].iter().copied())
                .collect();
            Ok(Some(expert_rows(
                packs,
                layer,
                e,
                expert,
                &gathered,
                tokens.len(),
                d,
            )?))
        })
        .collect::<Result<_>>()?;
    let mut y = vec![0.0f32; rows * d];
    for ((tokens, weights), out) in groups.iter().zip(&outs) {
        let Some(out) = out else { continue };
        for (i, (&t, &w)) in tokens.iter().zip(weights).enumerate() {
            for (yv, ov) in y[t * d..(t + 1) * d]
                .iter_mut()
                .zip(&out[i * d..(i + 1) * d])
            {
                *yv += ov * w;
            }
        }
    }
    for (xv, yv) in x.iter_mut().zip(&y) {
        *xv += yv;
    }
    Ok(())
}

/// What one expert saw in a candle forward: its rows, their routing
/// weights, activations (`rows x width`) and output norms.
#[derive(Debug, Clone, Default)]
pub struct ExpertRecord {
    pub tokens: Vec<usize>,
    pub weights: Vec<f32>,
    pub acts: Vec<f32>,
    pub out_norms: Vec<f32>,
}

/// The block's experts' output (`rows x hidden`) for the normalised rows
/// `h`, as candle operations: differentiable through the router's weights
/// and the experts (the choice of experts is not) when `diff`; `record`
/// receives what each expert saw.
pub(crate) fn moe_forward_candle(
    c: &LlamaConfig,
    moe: &MoeBlock,
    h: &Tensor,
    diff: bool,
    record: Option<&mut Vec<ExpertRecord>>,
) -> Result<Tensor> {
    let mc = c.moe.as_ref().ok_or_else(|| {
        RuntimeError::Invalid("a block holds experts but the model has no routing".into())
    })?;
    let (rows, d) = h.dims2()?;
    let n = moe.experts.len();
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32);
    let logits = crate::gemm::matmul(h, &f32_of(&moe.router)?.t()?)?;
    let probs = if diff {
        candle_nn::ops::softmax(&logits, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&logits)?
    };
    // The choice (not differentiable) from the same probabilities.
    let pv = probs.flatten_all()?.to_vec1::<f32>()?;
    let mut chosen = Vec::with_capacity(rows * mc.top_k);
    for row in pv.chunks(n) {
        chosen.extend(top_k_of(row, mc.top_k).into_iter().map(|e| e as u32));
    }
    let idx = Tensor::from_vec(chosen.clone(), (rows, mc.top_k), h.device())?;
    let mut w = probs.gather(&idx, 1)?;
    if mc.norm_topk_prob {
        w = w.broadcast_div(&w.sum_keepdim(1)?)?;
    }
    let w_flat = w.flatten_all()?;
    let wv = w_flat.to_vec1::<f32>()?;
    let routing = Routing {
        top_k: mc.top_k,
        experts: chosen.iter().map(|&e| e as usize).collect(),
        weights: wv,
    };
    let groups = routing.by_expert(n);
    let mut slots: Vec<Vec<u32>> = vec![Vec::new(); n];
    for (slot, &e) in routing.experts.iter().enumerate() {
        slots[e].push(slot as u32);
    }
    let mut y = Tensor::zeros((rows, d), DType::F32, h.device())?;
    let mut records = Vec::with_capacity(n);
    for (e, ((tokens, weights), slot)) in groups.iter().zip(&slots).enumerate() {
        if tokens.is_empty() {
            records.push(ExpertRecord::default());
            continue;
        }
        let x = &moe.experts[e];
        let t_idx = Tensor::from_vec(
            tokens.iter().map(|&t| t as u32).collect::<Vec<_>>(),
            tokens.len(),
            h.device(),
        )?;
        let xe = h.index_select(&t_idx, 0)?;
        let g = crate::gemm::matmul(&xe, &f32_of(&x.gate)?.t()?)?;
        let u = crate::gemm::matmul(&xe, &f32_of(&x.up)?.t()?)?;
        let a = (g.silu()? * u)?;
        let o = crate::gemm::matmul(&a, &f32_of(&x.down)?.t()?)?;
        let we =
            w_flat.index_select(&Tensor::from_vec(slot.clone(), slot.len(), h.device())?, 0)?;
        let weighted = o.broadcast_mul(&we.unsqueeze(1)?)?;
        y = y.index_add(&t_idx, &weighted, 0)?;
        if record.is_some() {
            records.push(ExpertRecord {
                tokens: tokens.clone(),
                weights: weights.clone(),
                acts: a.flatten_all()?.to_vec1::<f32>()?,
                out_norms: o.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?,
            });
        }
    }
    if let Some(r) = record {
        *r = records;
    }
    Ok(y)
}

/// One sparse block's calibration statistics, per expert.
#[derive(Debug, Clone, Default)]
pub struct MoeLayerStats {
    /// Calibration tokens routed to each expert (its top-k choices).
    pub frequency: Vec<f64>,
    /// REAP (Lasby et al. 2025): the mean over an expert's tokens of
    /// routing weight × the norm of its output.
    pub reap: Vec<f64>,
    /// The atomic form of REAP: mean over the expert's tokens of routing
    /// weight × |a_i| × ‖d_i‖ (per expert, per atomic expert).
    pub reap_atomic: Vec<Vec<f64>>,
    /// HEAPr's atomic-expert importance (per expert, per atomic expert):
    /// `½ · mean_t(a_ti²) · Σ_t (w_te · d_iᵀ g_t)²`, `g_t` the loss gradient
    /// at the block's output; empty without gradients.
    pub heapr: Vec<Vec<f64>>,
    /// HEAPr's term for a whole expert (per expert): its whole output
    /// removed, `½ · Σ_t (w_te · o_tᵀ g_t)²` (the cross terms between its
    /// atomic experts kept); empty without gradients.
    pub heapr_expert: Vec<f64>,
}

/// Sums over the calibration tokens, turned into [`MoeLayerStats`] at the end.
#[derive(Default)]
struct Sums {
    count: Vec<f64>,
    reap: Vec<f64>,
    reap_atomic: Vec<Vec<f64>>,
    a2: Vec<Vec<f64>>,
    proj2: Vec<Vec<f64>>,
    whole: Vec<f64>,
}

/// Every sparse block's expert statistics on the calibration windows
/// (equal-length token sequences, in chunks of `batch`), on the model as it
/// is. With `grads`, the mean next-token loss over all windows is
/// differentiated at every sparse block's output (one forward and one
/// backward per chunk) for HEAPr's importances. Indexed by block (`None`
/// for dense blocks).
pub fn moe_statistics(
    model: &LlamaModel,
    windows: &[Vec<u32>],
    batch: usize,
    grads: bool,
) -> Result<Vec<Option<MoeLayerStats>>> {
    let c = &model.config;
    let len = windows.first().map_or(0, Vec::len);
    if len < 2 || windows.iter().any(|w| w.len() != len) {
        return Err(RuntimeError::Invalid(
            "expert statistics need calibration sequences of one length, at least two tokens"
                .into(),
        ));
    }
    let total_targets = (windows.len() * (len - 1)) as f64;
    let d = c.hidden_size;
    let mut sums: Vec<Option<Sums>> = model
        .blocks
        .iter()
        .map(|b| {
            b.moe.as_ref().map(|m| {
                let widths: Vec<usize> = m.experts.iter().map(|e| e.width()).collect();
                let zeros = || widths.iter().map(|&w| vec![0.0; w]).collect::<Vec<_>>();
                Sums {
                    count: vec![0.0; widths.len()],
                    reap: vec![0.0; widths.len()],
                    reap_atomic: zeros(),
                    a2: zeros(),
                    proj2: zeros(),
                    whole: vec![0.0; widths.len()],
                }
            })
        })
        .collect();
    for chunk in windows.chunks(batch.max(1)) {
        let (b, t) = (chunk.len(), len);
        let flat: Vec<u32> = chunk.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (b, t), model.device())?;
        let mut x = model.embed_tokens(&ids)?;
        let mut taps: Vec<(usize, Var, Vec<ExpertRecord>)> = Vec::new();
        for l in 0..model.num_layers() {
            x = model.block_candle(l, &x, None, grads, &mut |l, y, rec| {
                let z = Var::zeros(y.dims(), DType::F32, y.device())?;
                let out = (y + z.as_tensor())?;
                taps.push((l, z, rec));
                Ok(out)
            })?;
        }
        let grad_rows: Vec<Option<Vec<f32>>> = if grads {
            let logits = model.head_candle(&x, true)?;
            let v = c.vocab_size;
            let inputs = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
            let targets = ids.narrow(1, 1, t - 1)?.flatten_all()?;
            let logp = candle_nn::ops::log_softmax(&inputs, D::Minus1)?;
            let picked = logp.gather(&targets.unsqueeze(1)?, 1)?;
            let loss = (picked.sum_all()? * (-1.0 / total_targets))?;
            let store = loss.backward()?;
            taps.iter()
                .map(|(_, z, _)| {
                    store
                        .get(z.as_tensor())
                        .map(|g| g.flatten_all().and_then(|g| g.to_vec1::<f32>()))
                        .transpose()
                })
                .collect::<candle_core::Result<_>>()?
        } else {
            vec![None; taps.len()]
        };
        for ((l, _, records), g) in taps.iter().zip(grad_rows) {
            let s = sums[*l].as_mut().expect("taps are sparse blocks");
            let moe = model.blocks[*l]
                .moe
                .as_ref()
                .expect("taps are sparse blocks");
            for (e, r) in records.iter().enumerate() {
                let n = r.tokens.len();
                if n == 0 {
                    continue;
                }
                let w = moe.experts[e].width();
                s.count[e] += n as f64;
                for (j, (&wt, &on)) in r.weights.iter().zip(&r.out_norms).enumerate() {
                    s.reap[e] += wt as f64 * on as f64;
                    let acts = &r.acts[j * w..(j + 1) * w];
                    for (i, &a) in acts.iter().enumerate() {
                        let a = a as f64;
                        // Σ w |a_i|; times ‖d_i‖ once, at the end.
                        s.reap_atomic[e][i] += wt as f64 * a.abs();
                        s.a2[e][i] += a * a;
                    }
                }
                if let Some(g) = &g {
                    // One expert's down projection in f32 at a time.
                    let down = &values(&moe.experts[e].down)?;
                    // (w_te g_t)ᵀ D: each atomic expert's output direction
                    // against the weighted loss gradient.
                    let gw: Vec<f32> = r
                        .tokens
                        .iter()
                        .zip(&r.weights)
                        .flat_map(|(&t, &wt)| g[t * d..(t + 1) * d].iter().map(move |v| v * wt))
                        .collect();
                    let mut proj = vec![0.0f32; n * w];
                    gemm_serial(Mat::new(&gw, n, d), Mat::new(down, d, w), &mut proj, false);
                    for (j, p) in proj.iter().enumerate() {
                        s.proj2[e][j % w] += (*p as f64).powi(2);
                    }
                    // w_te o_tᵀ g_t = Σ_i a_ti (w_te d_iᵀ g_t).
                    for (pr, ar) in proj.chunks(w).zip(r.acts.chunks(w)) {
                        let st: f64 = pr.iter().zip(ar).map(|(p, a)| *p as f64 * *a as f64).sum();
                        s.whole[e] += 0.5 * st * st;
                    }
                }
            }
        }
    }
    // ‖d_i‖ of every atomic expert, for REAP's atomic form.
    let col_norms = |l: usize| -> Result<Vec<Vec<f64>>> {
        let moe = model.blocks[l].moe.as_ref().expect("a sparse block");
        moe.experts
            .iter()
            .map(|x| {
                let (w, down) = (x.width(), values(&x.down)?);
                Ok((0..w)
                    .map(|i| {
                        (0..d)
                            .map(|k| (down[k * w + i] as f64).powi(2))
                            .sum::<f64>()
                            .sqrt()
                    })
                    .collect())
            })
            .collect()
    };
    for (l, s) in sums.iter_mut().enumerate() {
        if let Some(s) = s {
            for (r, norms) in s.reap_atomic.iter_mut().zip(col_norms(l)?) {
                for (v, n) in r.iter_mut().zip(norms) {
                    *v *= n;
                }
            }
        }
    }
    Ok(sums
        .into_iter()
        .map(|s| {
            s.map(|s| {
                let per = |v: &[f64], n: f64| -> Vec<f64> {
                    v.iter()
                        .map(|x| if n > 0.0 { x / n } else { 0.0 })
                        .collect()
                };
                MoeLayerStats {
                    reap: s
                        .reap
                        .iter()
                        .zip(&s.count)
                        .map(|(r, &n)| if n > 0.0 { r / n } else { 0.0 })
                        .collect(),
                    reap_atomic: s
                        .reap_atomic
                        .iter()
                        .zip(&s.count)
                        .map(|(r, &n)| per(r, n))
                        .collect(),
                    heapr: if grads {
                        s.a2.iter()
                            .zip(&s.proj2)
                            .zip(&s.count)
                            .map(|((a2, p2), &n)| {
                                a2.iter()
                                    .zip(p2)
                                    .map(|(a, p)| if n > 0.0 { 0.5 * a / n * p } else { 0.0 })
                                    .collect()
                            })
                            .collect()
                    } else {
                        Vec::new()
                    },
                    heapr_expert: if grads { s.whole } else { Vec::new() },
                    frequency: s.count,
                }
            })
        })
        .collect())
}

/// Keeps the experts `keep[l]` (ascending) of every sparse block `l` (`None`
/// for dense blocks), with their router rows; every sparse block keeps the
/// same number, at least `top_k`.
pub fn remove_experts(model: &mut LlamaModel, keep: &[Option<Vec<usize>>]) -> Result<()> {
    let mc = model
        .config
        .moe
        .clone()
        .ok_or_else(|| RuntimeError::Invalid("the model has no experts to remove".into()))?;
    if keep.len() != model.num_layers() {
        return Err(RuntimeError::Invalid(format!(
            "{} kept-expert lists for {} blocks",
            keep.len(),
            model.num_layers()
        )));
    }
    let mut kept = None;
    for (l, k) in keep.iter().enumerate() {
        let n = model.blocks[l].moe.as_ref().map(|m| m.experts.len());
        match (k, n) {
            (None, None) => {}
            (Some(k), Some(n)) => {
                if k.len() < mc.top_k
                    || kept.is_some_and(|c| c != k.len())
                    || k.windows(2).any(|w| w[0] >= w[1])
                    || k.last().is_some_and(|&e| e >= n)
                {
                    return Err(RuntimeError::Invalid(format!(
                        "block {l}: kept experts {k:?} must be ascending, below {n}, at least {} and as many in every sparse block",
                        mc.top_k
                    )));
                }
                kept = Some(k.len());
            }
            _ => {
                return Err(RuntimeError::Invalid(format!(
                    "block {l}: kept experts given for a block without experts, or missing"
                )))
            }
        }
    }
    for (l, k) in keep.iter().enumerate() {
        let (Some(k), Some(moe)) = (k, model.blocks[l].moe.as_mut()) else {
            continue;
        };
        let ids: Vec<u32> = k.iter().map(|&e| e as u32).collect();
        let idx = Tensor::from_vec(ids, k.len(), moe.router.device())?;
        moe.router = moe.router.index_select(&idx, 0)?.contiguous()?;
        moe.experts = k.iter().map(|&e| moe.experts[e].clone()).collect();
    }
    let widest = model
        .blocks
        .iter()
        .filter_map(|b| b.moe.as_ref())
        .flat_map(|m| m.experts.iter().map(|e| e.width()))
        .max();
    if let (Some(k), Some(m)) = (kept, model.config.moe.as_mut()) {
        m.num_experts = k;
        m.moe_intermediate_size = widest.unwrap_or(m.moe_intermediate_size);
    }
    Ok(())
}

/// Keeps the atomic experts `keep[l][e]` (ascending, at least one) of every
/// expert `e` of every sparse block `l` (`None` for dense blocks); the
/// configuration's `moe_intermediate_size` becomes the widest expert's width.
pub fn remove_atomic_experts(
    model: &mut LlamaModel,
    keep: &[Option<Vec<Vec<usize>>>],
) -> Result<()> {
    if model.config.moe.is_none() || keep.len() != model.num_layers() {
        return Err(RuntimeError::Invalid(
            "kept atomic experts must be given for every block of a mixture-of-experts model"
                .into(),
        ));
    }
    for (l, k) in keep.iter().enumerate() {
        let blk = &model.blocks[l];
        match (k, &blk.moe) {
            (None, None) => {}
            (Some(k), Some(moe)) if k.len() == moe.experts.len() => {
                for (e, (ke, x)) in k.iter().zip(&moe.experts).enumerate() {
                    if ke.is_empty()
                        || ke.windows(2).any(|w| w[0] >= w[1])
                        || ke.last().is_some_and(|&i| i >= x.width())
                    {
                        return Err(RuntimeError::Invalid(format!(
                            "block {l}, expert {e}: kept atomic experts {ke:?} must be ascending, below {}, at least one",
                            x.width()
                        )));
                    }
                }
            }
            _ => {
                return Err(RuntimeError::Invalid(format!(
                    "block {l}: kept atomic experts do not match its experts"
                )))
            }
        }
    }
    let mut widest = 0;
    for (l, k) in keep.iter().enumerate() {
        let (Some(k), Some(moe)) = (k, model.blocks[l].moe.as_mut()) else {
            continue;
        };
        for (ke, x) in k.iter().zip(moe.experts.iter_mut()) {
            let idx = Tensor::from_vec(
                ke.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                ke.len(),
                x.gate.device(),
            )?;
            x.gate = x.gate.index_select(&idx, 0)?.contiguous()?;
            x.up = x.up.index_select(&idx, 0)?.contiguous()?;
            x.down = x.down.index_select(&idx, 1)?.contiguous()?;
            widest = widest.max(ke.len());
        }
    }
    if let Some(m) = model.config.moe.as_mut() {
        m.moe_intermediate_size = widest;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_takes_the_most_probable_and_renormalises() {
        let logits = [0.0f32, 2.0, 1.0, 2.0, -1.0, 0.5];
        let r = Routing::from_logits(&logits, 3, 2, true);
        // Row 0: experts 1 then 2; row 1: expert 0 (2.0) then 2 (0.5).
        assert_eq!(r.experts, vec![1, 2, 0, 2]);
        let (e1, e2) = (1.0f32.exp(), 0.0f32.exp());
        assert!((r.weights[0] - e1 / (e1 + e2)).abs() < 1e-6);
        assert!((r.weights[0] + r.weights[1] - 1.0).abs() < 1e-6);
        let raw = Routing::from_logits(&logits, 3, 2, false);
        let z = 1.0 + 2.0f32.exp() + 1.0f32.exp();
        assert!((raw.weights[0] - 2.0f32.exp() / z).abs() < 1e-6);
        // Ties go to the lower expert.
        let tie = Routing::from_logits(&[1.0, 1.0, 0.0], 3, 1, true);
        assert_eq!(tie.experts, vec![0]);
        assert_eq!(tie.weights, vec![1.0]);
        let groups = r.by_expert(3);
        assert_eq!(groups[2].0, vec![0, 1]);
        assert!(groups[0].0 == vec![1] && groups[1].0 == vec![0]);
    }
}
