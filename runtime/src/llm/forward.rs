//! The language model's forward pass on plain `f32` slices: RMSNorm, fused
//! q/k/v and gate/up products on weights packed once, RoPE in place, causal
//! grouped-query attention read straight from the q/k/v rows (no head
//! transposes, no repeated k/v), SwiGLU, residual adds fused into the output
//! products, and the next-token losses without materialising a softmax.
//!
//! Every sum has one order: products through [`crate::gemm`] (one fused
//! multiply-add chain per output), norms and softmax sums left to right, so
//! the same inputs give the same bits at any thread count and vector width.

use super::error::Result;
use super::model::{Block, LinearInput, LinearWeight, LlamaModel, Proj, RopeStyle};
use crate::gemm::{gemm_packed, gemm_serial, Mat, PackedB};
use candle_core::{CpuStorage, Storage, Tensor, TensorId};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Weights packed for the products, by (layer, group); an entry is reused
/// while the tensors it was packed from are the model's current ones.
#[derive(Default)]
pub(crate) struct Packs {
    map: Mutex<HashMap<(usize, usize), Packed>>,
    /// Keep the packs of one layer only: a model stored narrower than f32
    /// is widened a block at a time instead of all at once.
    one_layer: std::sync::atomic::AtomicBool,
}

/// A packed product and the tensors it was packed from.
type Packed = (Vec<TensorId>, Arc<PackedB>);

/// Sees each linear layer's input: which one, the rows, their width.
pub(crate) type SliceSink<'a> = &'a mut dyn FnMut(LinearInput, &[f32], usize) -> Result<()>;

impl Clone for Packs {
    /// A clone starts empty (its weights may be replaced independently) and
    /// keeps the one-layer setting of a model stored narrower than f32.
    fn clone(&self) -> Self {
        let p = Packs::default();
        p.one_layer.store(
            self.one_layer.load(std::sync::atomic::Ordering::Relaxed),
            std::sync::atomic::Ordering::Relaxed,
        );
        p
    }
}

impl std::fmt::Debug for Packs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Packs")
    }
}

/// Adds to every row of `rows` (width `width`) the concatenated biases
/// (`mlp_bias` / `attention_bias` checkpoints and FLAP's compensation), when
/// the block has them: all of a product's biases, or none.
fn add_bias(rows: &mut [f32], width: usize, biases: &[&Option<Tensor>]) -> Result<()> {
    if biases.iter().all(|b| b.is_none()) {
        return Ok(());
    }
    let mut bias = Vec::with_capacity(width);
    for b in biases {
        match b {
            Some(t) => bias.extend(t.to_vec1::<f32>()?),
            None => {
                return Err(super::error::RuntimeError::Invalid(
                    "a block has some of the biases of one product but not all".into(),
                ))
            }
        }
    }
    rows.par_chunks_mut(width).for_each(|row| {
        for (v, b) in row.iter_mut().zip(&bias) {
            *v += *b;
        }
    });
    Ok(())
}

/// The products of a block that share an input, computed as one.
const QKV: usize = 0;
const O: usize = 1;
const GATE_UP: usize = 2;
const DOWN: usize = 3;
/// A mixture-of-experts block's router, and expert `e`'s fused gate/up
/// (`EXPERTS + 2e`) and down (`EXPERTS + 2e + 1`) products.
pub(super) const ROUTER: usize = 4;
pub(super) const EXPERTS: usize = 5;
/// The output projection's key (`layer` slot).
const HEAD: usize = usize::MAX;

impl Packs {
    /// Keeps at most one layer's packs from now on.
    pub(crate) fn keep_one_layer(&self) {
        self.one_layer
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.map.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// The distinct layers (the output projection counts as one) whose packs are held.
    #[cfg(test)]
    pub(crate) fn layers(&self) -> Vec<usize> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<usize> = map.keys().map(|k| k.0).collect();
        v.sort();
        v.dedup();
        v
    }

    /// `[W_1; W_2; ...]ᵀ` packed (the weights stacked by rows, read
    /// transposed), cached under `key`.
    pub(super) fn get(&self, key: (usize, usize), weights: &[&Tensor]) -> Result<Arc<PackedB>> {
        let ids: Vec<TensorId> = weights.iter().map(|w| w.id()).collect();
        if let Some((have, p)) = self.map.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            if *have == ids {
                return Ok(p.clone());
            }
        }
        let cols = weights[0].dim(1)?;
        // Read in place where a weight is a contiguous f32 CPU tensor, else
        // (a view) through one copy.
        let guards: Vec<_> = weights.iter().map(|w| w.storage_and_layout()).collect();
        let mut copies = Vec::new();
        for (w, (storage, layout)) in weights.iter().zip(&guards) {
            let direct = matches!(
                (&**storage, layout.contiguous_offsets()),
                (Storage::Cpu(CpuStorage::F32(_)), Some(_))
            );
            copies.push(if direct {
                None
            } else {
                Some(
                    w.to_dtype(candle_core::DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                )
            });
        }
        let parts: Vec<&[f32]> = guards
            .iter()
            .zip(&copies)
            .map(|((storage, layout), copy)| {
                match (copy, &**storage, layout.contiguous_offsets()) {
                    (Some(v), _, _) => &v[..],
                    (None, Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
                    _ => unreachable!("checked above"),
                }
            })
            .collect();
        let packed = Arc::new(PackedB::from_stacked_rows(&parts, cols));
        drop(parts);
        drop(guards);
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if self.one_layer.load(std::sync::atomic::Ordering::Relaxed) {
            map.retain(|k, _| k.0 == key.0);
        }
        map.insert(key, (ids, packed.clone()));
        Ok(packed)
    }
}

/// `y = x Wᵀ` (or `y += x Wᵀ`) for `rows` rows of `x`.
fn linear(x: &[f32], rows: usize, w: &PackedB, y: &mut [f32], accumulate: bool) {
    let (k, _) = w.dims();
    gemm_packed(Mat::new(x, rows, k), w, y, accumulate);
}

/// Row-wise RMSNorm: `y = x / sqrt(mean(x²) + eps) * g`, the mean summed left to right.
fn rms_norm(x: &[f32], g: &[f32], eps: f32, y: &mut [f32]) {
    let d = g.len();
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(yr, xr)| {
            let sum2 = xr.iter().fold(0.0f32, |acc, v| acc + v * v);
            let m = (sum2 / d as f32 + eps).sqrt();
            for ((o, v), a) in yr.iter_mut().zip(xr).zip(g) {
                *o = *v / m * *a;
            }
        });
}

/// Rotates `heads` heads of `hd` values starting at each row's `offset`
/// (row `r` is at position `pos(r)`), in place.
#[allow(clippy::too_many_arguments)]
fn rope(
    x: &mut [f32],
    row_len: usize,
    offset: usize,
    heads: usize,
    hd: usize,
    pos: &(dyn Fn(usize) -> usize + Sync),
    style: RopeStyle,
    cos: &[f32],
    sin: &[f32],
) {
    let half = hd / 2;
    x.par_chunks_mut(row_len).enumerate().for_each(|(r, row)| {
        let p = pos(r);
        let (c, s) = (
            &cos[p * half..(p + 1) * half],
            &sin[p * half..(p + 1) * half],
        );
        for h in 0..heads {
            let v = &mut row[offset + h * hd..offset + (h + 1) * hd];
            for i in 0..half {
                let (i1, i2) = match style {
                    RopeStyle::HalfSplit => (i, i + half),
                    RopeStyle::AdjacentPairs => (2 * i, 2 * i + 1),
                };
                let (a, b) = (v[i1], v[i2]);
                v[i1] = a * c[i] - b * s[i];
                v[i2] = a * s[i] + b * c[i];
            }
        }
    });
}

/// Query rows per attention block.
const ATT_ROWS: usize = 64;

/// Causal softmax of score rows of `keys` entries, the first row being
/// query `first`: row `i` over `j <= first + i` (and `j > first + i - w`
/// with a sliding window `w`) after scaling; other entries become zero.
pub(crate) fn causal_softmax(
    scores: &mut [f32],
    keys: usize,
    first: usize,
    scale: f32,
    window: usize,
) {
    for (i, row) in scores.chunks_mut(keys).enumerate() {
        let (live, dead) = row.split_at_mut(first + i + 1);
        let start = (first + i + 1).saturating_sub(window);
        let (before, live) = live.split_at_mut(start);
        before.fill(0.0);
        let mut max = f32::NEG_INFINITY;
        for v in live.iter_mut() {
            *v *= scale;
            max = max.max(*v);
        }
        let mut sum = 0.0f32;
        for v in live.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        for v in live.iter_mut() {
            *v /= sum;
        }
        dead.fill(0.0);
    }
}

impl LlamaModel {
    /// Whether every weight is dense `f32` (the slice forward's condition;
    /// quantized reference models run on candle's kernels).
    pub(crate) fn runs_on_slices(&self) -> bool {
        self.lm_head_quantized.is_none()
            && !matches!(self.lm_head, Some(LinearWeight::Quantized(_)))
            && self.blocks.iter().all(|b| {
                b.projs()
                    .iter()
                    .all(|&p| matches!(b.linear(p), LinearWeight::Dense(_)))
            })
    }

    fn dense(block: &Block, p: Proj) -> &Tensor {
        match block.linear(p) {
            LinearWeight::Dense(w) => w,
            LinearWeight::Quantized(_) => unreachable!("checked by runs_on_slices"),
        }
    }

    /// Block `layer` on the residual stream `x` (`b` sequences of `t`
    /// tokens, row-major `(b t) x hidden`), in place; `sink` sees each
    /// linear layer's input as a `(b t) x features` matrix.
    pub(crate) fn block_slices(
        &self,
        layer: usize,
        x: &mut [f32],
        b: usize,
        t: usize,
        sink: Option<SliceSink<'_>>,
        stop: Option<LinearInput>,
    ) -> Result<()> {
        let window = self.config.sliding_window.unwrap_or(usize::MAX);
        self.block_with(layer, x, b * t, sink, stop, &|r| r % t, &mut |qkv| {
            Ok(self.causal_attention(qkv, b, t, window))
        })
    }

    /// Block `layer` on `rows` rows of the residual stream `x`, in place,
    /// row `r` at position `pos(r)`: `attend` turns the fused, rotated
    /// `q | k | v` rows into the attention's output rows (`rows x q_dim`);
    /// everything else (norms, products, biases, SwiGLU) is the same for
    /// every way of attending. With `stop`, it returns as soon as that
    /// input has gone to `sink`, leaving `x` part-way (for passes that only
    /// collect layer inputs).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn block_with(
        &self,
        layer: usize,
        x: &mut [f32],
        rows: usize,
        mut sink: Option<SliceSink<'_>>,
        stop: Option<LinearInput>,
        pos: &(dyn Fn(usize) -> usize + Sync),
        attend: &mut dyn FnMut(&[f32]) -> Result<Vec<f32>>,
    ) -> Result<()> {
        let c = &self.config;
        let blk = &self.blocks[layer];
        let (d, hd) = (c.hidden_size, c.head_dim());
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let (qd, kv, inter) = (c.q_dim(), c.kv_dim(), c.intermediate_size);
        let eps = c.rms_norm_eps as f32;
        let mut observe = |input: LinearInput, a: &[f32], cols: usize| -> Result<()> {
            match sink.as_mut() {
                Some(s) => s(input, a, cols),
                None => Ok(()),
            }
        };
        let packs = &self.packs;
        let w = |p: Proj| Self::dense(blk, p);

        // Attention.
        let mut h = vec![0.0f32; rows * d];
        rms_norm(x, &blk.attn_norm.to_vec1::<f32>()?, eps, &mut h);
        observe(LinearInput::Attention, &h, d)?;
        if stop == Some(LinearInput::Attention) {
            return Ok(());
        }
        let qkv_w = packs.get((layer, QKV), &[w(Proj::Q), w(Proj::K), w(Proj::V)])?;
        let width = qd + 2 * kv;
        let mut qkv = vec![0.0f32; rows * width];
        linear(&h, rows, &qkv_w, &mut qkv, false);
        drop(h);
        self.qkv_extras(&blk.extra, &mut qkv, width, qd, kv, hd, eps)?;
        for (offset, heads) in [(0, nh), (qd, nkv)] {
            rope(
                &mut qkv,
                width,
                offset,
                heads,
                hd,
                pos,
                self.rope,
                &self.cos_v,
                &self.sin_v,
            );
        }
        let att = attend(&qkv)?;
        drop(qkv);
        observe(LinearInput::AttentionOutput, &att, qd)?;
        if stop == Some(LinearInput::AttentionOutput) {
            return Ok(());
        }
        let o_w = packs.get((layer, O), &[w(Proj::O)])?;
        linear(&att, rows, &o_w, x, true);
        add_bias(x, d, &[&blk.extra.o_bias])?;

        // SwiGLU feed-forward.
        let mut h = att;
        h.resize(rows * d, 0.0);
        rms_norm(x, &blk.ffn_norm.to_vec1::<f32>()?, eps, &mut h);
        observe(LinearInput::Mlp, &h, d)?;
        if stop == Some(LinearInput::Mlp) {
            return Ok(());
        }
        if let Some(moe) = &blk.moe {
            return super::moe::moe_slices(c, moe, packs, layer, &h, rows, x);
        }
        let gu_w = packs.get((layer, GATE_UP), &[w(Proj::Gate), w(Proj::Up)])?;
        let mut gu = vec![0.0f32; rows * 2 * inter];
        linear(&h, rows, &gu_w, &mut gu, false);
        add_bias(
            &mut gu,
            2 * inter,
            &[&blk.extra.gate_bias, &blk.extra.up_bias],
        )?;
        let mut act = vec![0.0f32; rows * inter];
        act.par_chunks_mut(inter)
            .zip(gu.par_chunks(2 * inter))
            .for_each(|(a, gu)| {
                let (g, u) = gu.split_at(inter);
                for ((o, &gv), &uv) in a.iter_mut().zip(g).zip(u) {
                    *o = gv / (1.0 + (-gv).exp()) * uv;
                }
            });
        drop(gu);
        observe(LinearInput::MlpDown, &act, inter)?;
        if stop == Some(LinearInput::MlpDown) {
            return Ok(());
        }
        let down_w = packs.get((layer, DOWN), &[w(Proj::Down)])?;
        linear(&act, rows, &down_w, x, true);
        add_bias(x, d, &[&blk.extra.down_bias])?;
        Ok(())
    }

    /// Causal grouped-query attention of `b` sequences of `t` fused
    /// `q | k | v` rows (keys within the last `window` positions): the
    /// output rows, `(b t) x q_dim`.
    fn causal_attention(&self, qkv: &[f32], b: usize, t: usize, window: usize) -> Vec<f32> {
        let c = &self.config;
        let hd = c.head_dim();
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let (qd, kv) = (c.q_dim(), c.kv_dim());
        let width = qd + 2 * kv;
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let group = nh / nkv;
        // One task per (sequence, head, block of query rows): its scores,
        // softmax and output rows. A block sees only the keys up to its
        // last row (the causal mask), so masked scores are never computed;
        // the products over the kept keys are the same chains (a masked
        // weight is an exact zero). Products run serially inside a task.
        let blocks = t.div_ceil(ATT_ROWS);
        let heads: Vec<Vec<f32>> = (0..b * nh * blocks)
            .into_par_iter()
            .map(|task| {
                let (s, head, i0) = (
                    task / (nh * blocks),
                    task / blocks % nh,
                    task % blocks * ATT_ROWS,
                );
                let g = head / group;
                let base = &qkv[s * t * width..(s + 1) * t * width];
                let view = |offset: usize, rows: usize, cols: usize, rs: usize, cs: usize| Mat {
                    data: &base[offset..],
                    rows,
                    cols,
                    rs,
                    cs,
                };
                let (rows, keys) = (ATT_ROWS.min(t - i0), (i0 + ATT_ROWS).min(t));
                let q = view(i0 * width + head * hd, rows, hd, width, 1);
                let kt = view(qd + g * hd, hd, keys, 1, width);
                let v = view(qd + kv + g * hd, keys, hd, width, 1);
                let mut scores = vec![0.0f32; rows * keys];
                gemm_serial(q, kt, &mut scores, false);
                causal_softmax(&mut scores, keys, i0, scale, window);
                let mut out = vec![0.0f32; rows * hd];
                gemm_serial(Mat::new(&scores, rows, keys), v, &mut out, false);
                out
            })
            .collect();
        let mut att = vec![0.0f32; b * t * qd];
        for (task, out) in heads.iter().enumerate() {
            let (s, head, i0) = (
                task / (nh * blocks),
                task / blocks % nh,
                task % blocks * ATT_ROWS,
            );
            for (i, src) in out.chunks(hd).enumerate() {
                let at = (s * t + i0 + i) * qd + head * hd;
                att[at..at + hd].copy_from_slice(src);
            }
        }
        att
    }

    /// Adds the q/k/v biases and normalises each q and k head, in place on
    /// the fused `q | k | v` rows, where the architecture has them.
    #[allow(clippy::too_many_arguments)]
    fn qkv_extras(
        &self,
        e: &super::model::AttnExtras,
        qkv: &mut [f32],
        width: usize,
        qd: usize,
        kv: usize,
        hd: usize,
        eps: f32,
    ) -> Result<()> {
        if let (Some(qb), Some(kb), Some(vb)) = (&e.q_bias, &e.k_bias, &e.v_bias) {
            let mut bias = qb.to_vec1::<f32>()?;
            bias.extend(kb.to_vec1::<f32>()?);
            bias.extend(vb.to_vec1::<f32>()?);
            qkv.par_chunks_mut(width).for_each(|row| {
                for (v, b) in row.iter_mut().zip(&bias) {
                    *v += *b;
                }
            });
        }
        if let (Some(qn), Some(kn)) = (&e.q_norm, &e.k_norm) {
            let (qn, kn) = (qn.to_vec1::<f32>()?, kn.to_vec1::<f32>()?);
            qkv.par_chunks_mut(width).for_each(|row| {
                for (range, g) in [(0..qd, &qn), (qd..qd + kv, &kn)] {
                    for head in row[range].chunks_mut(hd) {
                        let sum2 = head.iter().fold(0.0f32, |acc, v| acc + v * v);
                        let m = (sum2 / hd as f32 + eps).sqrt();
                        for (v, a) in head.iter_mut().zip(g.iter()) {
                            *v = *v / m * *a;
                        }
                    }
                }
            });
        }
        Ok(())
    }

    /// The residual stream of token ids (`b` sequences of `t`), row-major.
    pub(crate) fn embed_slices(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let t = Tensor::from_slice(ids, (1, ids.len()), self.device())?;
        Ok(self.embed_tokens(&t)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// The final norm and output projection of `rows` rows of `x`: logits, row-major.
    pub(crate) fn head_slices(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let c = &self.config;
        let mut h = vec![0.0f32; rows * c.hidden_size];
        rms_norm(
            x,
            &self.norm.to_vec1::<f32>()?,
            c.rms_norm_eps as f32,
            &mut h,
        );
        let head = match &self.lm_head {
            Some(LinearWeight::Dense(w)) => w,
            _ => &self.embed,
        };
        let packed = self.packs.get((HEAD, 0), &[head])?;
        let mut logits = vec![0.0f32; rows * c.vocab_size];
        linear(&h, rows, &packed, &mut logits, false);
        Ok(logits)
    }

    /// The whole forward of `b` sequences of `t` token ids: logits `(b t) x vocab`.
    pub(crate) fn logits_slices(&self, ids: &[u32], b: usize, t: usize) -> Result<Vec<f32>> {
        let mut x = self.embed_slices(ids)?;
        for l in 0..self.blocks.len() {
            self.block_slices(l, &mut x, b, t, None, None)?;
        }
        self.head_slices(&x, b * t)
    }

    /// Negative log-likelihood of each next token: for `b` sequences of
    /// `t` ids, the `b (t - 1)` values `logsumexp(logits) - logit[next]`
    /// (the sum of exponentials in `f64`, left to right).
    pub fn next_token_nll(&self, ids: &[u32], b: usize, t: usize) -> Result<Vec<f64>> {
        let vocab = self.config.vocab_size;
        let logits = if self.runs_on_slices() {
            self.logits_slices(ids, b, t)?
        } else {
            let ids = Tensor::from_slice(ids, (b, t), self.device())?;
            self.forward(&ids)?.flatten_all()?.to_vec1::<f32>()?
        };
        let nll: Vec<f64> = (0..b * t)
            .into_par_iter()
            .filter(|r| r % t != t - 1)
            .map(|r| token_nll(&logits[r * vocab..(r + 1) * vocab], ids[r + 1]))
            .collect();
        Ok(nll)
    }
}

/// `logsumexp(row) - row[next]`, the sum of exponentials in `f64`, left to right.
pub(crate) fn token_nll(row: &[f32], next: u32) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    let sum = row.iter().fold(0.0f64, |a, &v| a + (v - max).exp() as f64);
    max as f64 + sum.ln() - row[next as usize] as f64
}
