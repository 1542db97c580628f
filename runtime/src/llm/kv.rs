//! Perplexity with a bounded key-value cache: the windows are decoded one
//! token at a time, every query attending to its own key and at most
//! `budget - 1` keys kept from before; after each step a policy chooses,
//! per sequence and layer, which earlier tokens stay (every head of a layer
//! keeps the same tokens).
//!
//! - `recent`: the latest tokens (a sliding window of `budget` keys).
//! - `h2o` (Zhang et al. 2023): half the kept slots for the latest tokens,
//!   the other half for the "heavy hitters", the tokens that have received
//!   the most attention so far (summed over the layer's heads and every
//!   query that saw them).
//! - `kvcrush` (Jha et al. 2025): a quarter of the kept slots go to
//!   representatives of the tokens H2O would evict. Each token gets one bit
//!   per head (its accumulated attention at or above that head's mean over
//!   the cache); the candidates are sorted by Hamming distance to an anchor
//!   (each head's majority bit among them), cut into as many buckets as
//!   there are representative slots, and each bucket keeps its most
//!   attended token. The rest of the slots are chosen as H2O chooses.
//!
//! The sums keep one order (products through [`crate::gemm`], softmax and
//! accumulated attention left to right), so a run gives the same bits at any
//! thread count; with a budget of the whole window nothing is evicted and
//! the negative log-likelihoods are those of [`LlamaModel::next_token_nll`].

use super::error::{Result, RuntimeError};
use super::forward::{causal_softmax, token_nll};
use super::model::LlamaModel;
use crate::gemm::{gemm_serial, Mat};
use rayon::prelude::*;

/// Which earlier tokens a bounded cache keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvPolicy {
    Recent,
    H2o,
    KvCrush,
}

impl KvPolicy {
    pub const ALL: [KvPolicy; 3] = [KvPolicy::Recent, KvPolicy::H2o, KvPolicy::KvCrush];

    pub fn as_str(self) -> &'static str {
        match self {
            KvPolicy::Recent => "recent",
            KvPolicy::H2o => "h2o",
            KvPolicy::KvCrush => "kvcrush",
        }
    }

    pub fn named(name: &str) -> Option<KvPolicy> {
        KvPolicy::ALL.into_iter().find(|p| p.as_str() == name)
    }
}

/// The keys each query may attend to (its own included) and how the cache
/// chooses them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvBudget {
    pub keys: usize,
    pub policy: KvPolicy,
}

/// One sequence's cache in one layer: its tokens in position order.
#[derive(Clone, Default)]
struct Cache {
    /// Each kept token's position.
    pos: Vec<usize>,
    /// Keys and values, one row of `kv_dim` per token.
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention each token has received, one value per query head.
    acc: Vec<f32>,
}

impl Cache {
    fn len(&self) -> usize {
        self.pos.len()
    }

    /// Keeps only the tokens at `keep` (ascending indices).
    fn retain(&mut self, keep: &[usize], kv: usize, heads: usize) {
        for (to, &from) in keep.iter().enumerate() {
            self.pos[to] = self.pos[from];
            self.k.copy_within(from * kv..(from + 1) * kv, to * kv);
            self.v.copy_within(from * kv..(from + 1) * kv, to * kv);
            self.acc
                .copy_within(from * heads..(from + 1) * heads, to * heads);
        }
        let n = keep.len();
        self.pos.truncate(n);
        self.k.truncate(n * kv);
        self.v.truncate(n * kv);
        self.acc.truncate(n * heads);
    }

    /// Each token's attention summed over the heads (left to right).
    fn importance(&self, heads: usize) -> Vec<f32> {
        self.acc
            .chunks(heads)
            .map(|a| a.iter().fold(0.0f32, |s, v| s + v))
            .collect()
    }
}

/// The `count` indices of `among` with the highest `score`, the earlier
/// index first on ties.
fn top(among: &[usize], score: &[f32], count: usize) -> Vec<usize> {
    let mut order = among.to_vec();
    order.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
    order.truncate(count);
    order
}

/// H2O's choice of `keep` of `n` tokens: the latest `keep - keep / 2`, and
/// the `keep / 2` others with the highest `importance`. Ascending indices.
fn h2o(importance: &[f32], keep: usize) -> Vec<usize> {
    let n = importance.len();
    let recent = keep - keep / 2;
    let older: Vec<usize> = (0..n - recent).collect();
    let mut kept = top(&older, importance, keep / 2);
    kept.extend(n - recent..n);
    kept.sort_unstable();
    kept
}

/// KVCrush's choice of `keep` tokens (see the module's documentation).
/// Ascending indices.
fn kvcrush(acc: &[f32], heads: usize, importance: &[f32], keep: usize) -> Vec<usize> {
    let n = importance.len();
    let reps = keep / 4;
    let mut kept = h2o(importance, keep - reps);
    let candidates: Vec<usize> = (0..n).filter(|i| kept.binary_search(i).is_err()).collect();
    if candidates.len() <= reps {
        kept.extend(candidates);
    } else if reps > 0 {
        // Each head's mean accumulated attention over the cache.
        let mut mean = vec![0.0f32; heads];
        for row in acc.chunks(heads) {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += v;
            }
        }
        for m in &mut mean {
            *m /= n as f32;
        }
        let bit = |i: usize, h: usize| acc[i * heads + h] >= mean[h];
        let anchor: Vec<bool> = (0..heads)
            .map(|h| 2 * candidates.iter().filter(|&&i| bit(i, h)).count() >= candidates.len())
            .collect();
        let distance = |i: usize| (0..heads).filter(|&h| bit(i, h) != anchor[h]).count();
        let mut order: Vec<(usize, usize)> = candidates.iter().map(|&i| (distance(i), i)).collect();
        order.sort_unstable();
        let m = order.len();
        for b in 0..reps {
            let bucket: Vec<usize> = order[b * m / reps..(b + 1) * m / reps]
                .iter()
                .map(|&(_, i)| i)
                .collect();
            kept.extend(top(&bucket, importance, 1));
        }
    }
    kept.sort_unstable();
    kept
}

/// Which of the cache's tokens stay so that at most `keep` remain.
fn choose(cache: &Cache, keep: usize, policy: KvPolicy, heads: usize) -> Option<Vec<usize>> {
    let n = cache.len();
    if n <= keep {
        return None;
    }
    Some(match policy {
        KvPolicy::Recent => (n - keep..n).collect(),
        KvPolicy::H2o => h2o(&cache.importance(heads), keep),
        KvPolicy::KvCrush => kvcrush(&cache.acc, heads, &cache.importance(heads), keep),
    })
}

impl LlamaModel {
    /// Negative log-likelihood of each next token of `b` sequences of `t`
    /// ids decoded with the bounded cache `budget`, in the order of
    /// [`LlamaModel::next_token_nll`].
    pub fn next_token_nll_kv(
        &self,
        ids: &[u32],
        b: usize,
        t: usize,
        budget: KvBudget,
    ) -> Result<Vec<f64>> {
        if !self.runs_on_slices() {
            return Err(RuntimeError::Invalid(
                "a bounded key-value cache needs a model with dense f32 weights".into(),
            ));
        }
        if budget.keys == 0 {
            return Err(RuntimeError::Invalid(
                "a key-value cache budget must hold at least one key".into(),
            ));
        }
        let c = &self.config;
        let hd = c.head_dim();
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let (qd, kv) = (c.q_dim(), c.kv_dim());
        let (width, group) = (qd + 2 * kv, nh / nkv);
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let vocab = c.vocab_size;
        let mut caches = vec![vec![Cache::default(); b]; self.blocks.len()];
        let mut nll = vec![0.0f64; b * (t - 1)];
        for p in 0..t {
            let step: Vec<u32> = (0..b).map(|s| ids[s * t + p]).collect();
            let mut x = self.embed_slices(&step)?;
            for (layer, caches) in caches.iter_mut().enumerate() {
                let mut attend = |qkv: &[f32]| -> Result<Vec<f32>> {
                    for (s, cache) in caches.iter_mut().enumerate() {
                        let row = &qkv[s * width..(s + 1) * width];
                        cache.pos.push(p);
                        cache.k.extend_from_slice(&row[qd..qd + kv]);
                        cache.v.extend_from_slice(&row[qd + kv..]);
                        cache.acc.extend(std::iter::repeat_n(0.0, nh));
                    }
                    // One task per (sequence, head): scores over the cache,
                    // softmax, output row; the attention weights come back
                    // to be accumulated.
                    let caches_ref = &*caches;
                    let outs: Vec<(Vec<f32>, Vec<f32>)> = (0..b * nh)
                        .into_par_iter()
                        .map(|task| {
                            let (s, head) = (task / nh, task % nh);
                            let g = head / group;
                            let cache = &caches_ref[s];
                            let n = cache.len();
                            let q = Mat {
                                data: &qkv[s * width + head * hd..],
                                rows: 1,
                                cols: hd,
                                rs: width,
                                cs: 1,
                            };
                            let kt = Mat {
                                data: &cache.k[g * hd..],
                                rows: hd,
                                cols: n,
                                rs: 1,
                                cs: kv,
                            };
                            let mut scores = vec![0.0f32; n];
                            gemm_serial(q, kt, &mut scores, false);
                            causal_softmax(&mut scores, n, n - 1, scale, usize::MAX);
                            let v = Mat {
                                data: &cache.v[g * hd..],
                                rows: n,
                                cols: hd,
                                rs: kv,
                                cs: 1,
                            };
                            let mut out = vec![0.0f32; hd];
                            gemm_serial(Mat::new(&scores, 1, n), v, &mut out, false);
                            (out, scores)
                        })
                        .collect();
                    let mut att = vec![0.0f32; b * qd];
                    for (task, (out, weights)) in outs.iter().enumerate() {
                        let (s, head) = (task / nh, task % nh);
                        att[s * qd + head * hd..s * qd + (head + 1) * hd].copy_from_slice(out);
                        let acc = &mut caches[s].acc;
                        for (j, w) in weights.iter().enumerate() {
                            acc[j * nh + head] += w;
                        }
                    }
                    // The next query adds its own key: keep `keys - 1`.
                    caches.par_iter_mut().for_each(|cache| {
                        if let Some(keep) = choose(cache, budget.keys - 1, budget.policy, nh) {
                            cache.retain(&keep, kv, nh);
                        }
                    });
                    Ok(att)
                };
                self.block_with(layer, &mut x, b, None, None, &|_| p, &mut attend)?;
            }
            if p + 1 < t {
                let logits = self.head_slices(&x, b)?;
                for s in 0..b {
                    nll[s * (t - 1) + p] =
                        token_nll(&logits[s * vocab..(s + 1) * vocab], ids[s * t + p + 1]);
                }
            }
        }
        Ok(nll)
    }
}

/// Perplexity of the model on `tokens` cut into windows of `window` tokens
/// as [`super::perplexity`] cuts them, each decoded with the bounded cache
/// `budget`; `batch` windows are decoded side by side.
pub fn perplexity_kv(
    model: &LlamaModel,
    tokens: &[u32],
    window: usize,
    batch: usize,
    budget: KvBudget,
) -> Result<f64> {
    super::eval::over_windows(tokens, window, batch, |chunk, b| {
        model.next_token_nll_kv(chunk, b, window, budget)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache_with(acc: &[f32], heads: usize) -> Cache {
        let n = acc.len() / heads;
        Cache {
            pos: (0..n).collect(),
            k: (0..n).map(|i| i as f32).collect(),
            v: (0..n).map(|i| -(i as f32)).collect(),
            acc: acc.to_vec(),
        }
    }

    #[test]
    fn recent_keeps_the_latest_tokens() {
        let c = cache_with(&[5.0, 1.0, 0.0, 2.0, 3.0], 1);
        assert_eq!(choose(&c, 3, KvPolicy::Recent, 1), Some(vec![2, 3, 4]));
        assert_eq!(choose(&c, 5, KvPolicy::Recent, 1), None);
    }

    #[test]
    fn h2o_keeps_the_latest_half_and_the_heaviest_others() {
        // Two heads; importance = [3, 1, 9, 2, 0, 4, 1, 1].
        let acc = [
            1.0, 2.0, 0.5, 0.5, 4.0, 5.0, 1.0, 1.0, 0.0, 0.0, 2.0, 2.0, 0.5, 0.5, 0.0, 1.0,
        ];
        let c = cache_with(&acc, 2);
        // keep 5: the latest 3 (5, 6, 7) and the 2 heaviest before them (2, 0).
        assert_eq!(choose(&c, 5, KvPolicy::H2o, 2), Some(vec![0, 2, 5, 6, 7]));
        // Ties go to the earlier token.
        assert_eq!(h2o(&[1.0, 1.0, 1.0, 0.0], 2), vec![0, 3]);
    }

    #[test]
    fn kvcrush_keeps_one_representative_per_bucket() {
        // keep 8: 2 representatives, 6 by H2O (the latest 3 and the 3 heaviest).
        // Two heads. Tokens 0..=2 heavy, 9..=11 latest; the candidates
        // 3..=8 split by their head bits into two groups.
        let acc: Vec<f32> = [
            (9.0, 9.0),
            (8.0, 8.0),
            (7.0, 7.0),
            (0.0, 3.0), // attends head 1: bits 01
            (0.0, 2.5),
            (0.0, 2.0),
            (3.0, 0.0), // head 0: bits 10
            (2.5, 0.0),
            (2.0, 0.0),
            (0.0, 0.0),
            (0.0, 0.0),
            (0.0, 0.0),
        ]
        .iter()
        .flat_map(|&(a, b)| [a, b])
        .collect();
        let c = cache_with(&acc, 2);
        // Head means are 31.5/12 = 2.625 for both: bits 3 -> 01, 4 -> 00
        // (2.5 < 2.625), 5 -> 00, 6 -> 10, 7 -> 00, 8 -> 00. The anchor is
        // the majority bit of each head among the candidates: 00. Sorted by
        // distance: 4, 5, 7, 8 (0), then 3, 6 (1): buckets [4, 5, 7] and
        // [8, 3, 6], their most attended tokens 4 and 3 (each tied with a
        // later token: the earlier one).
        assert_eq!(
            choose(&c, 8, KvPolicy::KvCrush, 2),
            Some(vec![0, 1, 2, 3, 4, 9, 10, 11])
        );
        // With fewer than four slots there are no representatives: H2O.
        assert_eq!(
            choose(&c, 3, KvPolicy::KvCrush, 2),
            choose(&c, 3, KvPolicy::H2o, 2)
        );
    }

    #[test]
    fn retain_moves_every_row() {
        let mut c = cache_with(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2);
        c.retain(&[0, 2], 1, 2);
        assert_eq!(c.pos, vec![0, 2]);
        assert_eq!(c.k, vec![0.0, 2.0]);
        assert_eq!(c.v, vec![0.0, -2.0]);
        assert_eq!(c.acc, vec![1.0, 2.0, 5.0, 6.0]);
    }
}
