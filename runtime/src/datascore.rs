//! Data pruning: a score per training sample computed with a model, and the
//! samples a data set keeps by it.
//!
//! - EL2N (Paul et al. 2021): `‖softmax(f(x)) − onehot(y)‖₂`, the error of
//!   the model's prediction.
//! - GraNd (Paul et al. 2021): `‖∇θ ℓ(f(x), y)‖₂`, the norm of the
//!   sample's loss gradient over every parameter.
//! - Forgetting events (Toneva et al. 2019): how often a sample goes from
//!   classified correctly to misclassified between two presentations while
//!   a model trains on it; a sample never classified correctly counts as
//!   forgotten infinitely often.
//! - Random: a seeded uniform draw.
//!
//! Scores are computed in file order and serially per sample or batch, so
//! they do not depend on the thread count; ties are broken by a seeded
//! random key, never by position.

use candle_core::DType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::{Batch, Dataset};
use crate::error::{CandleContext, Result, RuntimeError};
use crate::masks::Masks;
use crate::model::Model;
use crate::optim::OptimizerSpec;

/// Which end of the ranking a data set keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// The highest scores: the hardest or least learned samples (the papers' choice).
    Hardest,
    /// The lowest scores: the easiest samples.
    Easiest,
}

/// Samples kept when the fraction `pruned` of `n` goes: `n - floor(n * pruned)`
/// (a tolerance absorbs the last bit of products such as `0.7 * 10`).
pub fn kept_count(n: usize, pruned: f64) -> usize {
    let gone = ((n as f64) * pruned + 1e-9).floor() as usize;
    n - gone.min(n)
}

/// How many samples each class keeps when `kept` of them stay per class:
/// each class its share `kept * count / n` rounded down, the remaining
/// samples to the largest remainders (ties to the lower class), so the
/// total is exactly `kept` and no class keeps more than it has.
pub fn class_quotas(counts: &[usize], kept: usize) -> Vec<usize> {
    let n: usize = counts.iter().sum();
    if n == 0 {
        return vec![0; counts.len()];
    }
    let exact: Vec<(usize, u128)> = counts
        .iter()
        .map(|&c| {
            let num = kept as u128 * c as u128;
            ((num / n as u128) as usize, num % n as u128)
        })
        .collect();
    let mut quotas: Vec<usize> = exact.iter().map(|e| e.0).collect();
    let mut left = kept - quotas.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..counts.len()).collect();
    order.sort_by(|&a, &b| exact[b].1.cmp(&exact[a].1).then(a.cmp(&b)));
    for c in order {
        if left == 0 {
            break;
        }
        if quotas[c] < counts[c] {
            quotas[c] += 1;
            left -= 1;
        }
    }
    quotas
}

/// The indices (ascending) a data set keeps: the `kept_count(n, pruned)`
/// best by `scores` under `keep`, over all samples, or with `per_class`
/// within each class by [`class_quotas`]. Ties fall to a key drawn from `seed`.
pub fn select(
    scores: &[f64],
    labels: &[u32],
    classes: usize,
    pruned: f64,
    per_class: bool,
    keep: Keep,
    seed: u64,
) -> Result<Vec<u32>> {
    let n = scores.len();
    if labels.len() != n {
        return Err(RuntimeError::InvalidConfig(format!(
            "{n} scores for {} samples",
            labels.len()
        )));
    }
    if let Some(i) = scores.iter().position(|s| s.is_nan()) {
        return Err(RuntimeError::InvalidConfig(format!(
            "sample {i} scored NaN: the scoring model's outputs are not finite"
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let ties: Vec<u64> = (0..n).map(|_| rng.random()).collect();
    // Best first.
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.sort_by(|&a, &b| {
        let (sa, sb) = (scores[a as usize], scores[b as usize]);
        let by = match keep {
            Keep::Hardest => sb.total_cmp(&sa),
            Keep::Easiest => sa.total_cmp(&sb),
        };
        by.then(ties[a as usize].cmp(&ties[b as usize]))
    });
    let kept = kept_count(n, pruned);
    let mut out: Vec<u32> = if per_class {
        let mut counts = vec![0usize; classes];
        for &l in labels {
            let c = counts.get_mut(l as usize).ok_or_else(|| {
                RuntimeError::InvalidConfig(format!("label {l} is not below {classes}"))
            })?;
            *c += 1;
        }
        let mut left = class_quotas(&counts, kept);
        order
            .into_iter()
            .filter(|&i| {
                let q = &mut left[labels[i as usize] as usize];
                let take = *q > 0;
                *q -= take as usize;
                take
            })
            .collect()
    } else {
        order.truncate(kept);
        order
    };
    out.sort_unstable();
    Ok(out)
}

/// A seeded uniform score per sample: random data pruning.
pub fn random_scores(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random::<f64>()).collect()
}

/// EL2N of every sample of `data` (file order) under `model` as it is.
pub fn el2n(model: &Model, data: &Dataset) -> Result<Vec<f64>> {
    model.check_data(data)?;
    let n = data.len();
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    while start < n {
        let len = data.batch_size.min(n - start);
        let batch = data.slice(start, len)?;
        let ctx = || format!("EL2N of {} samples {start}..{}", data.name, start + len);
        let logits = model.forward(&batch.inputs)?;
        let p = candle_nn::ops::softmax(&logits.to_dtype(DType::F32).ctx(ctx)?, 1)
            .and_then(|p| p.to_vec2::<f32>())
            .ctx(ctx)?;
        let labels = batch.targets.to_vec1::<u32>().ctx(ctx)?;
        for (row, &y) in p.iter().zip(&labels) {
            let sq: f64 = row
                .iter()
                .enumerate()
                .map(|(c, &v)| {
                    let e = v as f64 - if c == y as usize { 1.0 } else { 0.0 };
                    e * e
                })
                .sum();
            out.push(sq.sqrt());
        }
        start += len;
    }
    Ok(out)
}

/// GraNd of every sample of `data` (file order) under `model` as it is: the
/// norm of the sample's own cross-entropy gradient over every parameter.
pub fn grand(model: &Model, data: &Dataset) -> Result<Vec<f64>> {
    model.check_data(data)?;
    let names: Vec<String> = model.params().iter().map(|p| p.name.clone()).collect();
    let update = OptimizerSpec::sgd(1.0, 0.0, 0.0);
    let n = data.len();
    let starts: Vec<usize> = (0..n).step_by(data.batch_size).collect();
    if crate::native::Native::new(model, &Masks::new(), &update)?.is_some() {
        // Native steps, one copy of the weights per batch in parallel: each
        // sample's norm is computed alone, so the bits do not depend on the
        // thread count.
        use rayon::prelude::*;
        let parts: Vec<Vec<f64>> = starts
            .par_iter()
            .map(|&start| {
                let len = data.batch_size.min(n - start);
                let batch = data.slice(start, len)?;
                let mut nv = crate::native::Native::new(model, &Masks::new(), &update)?
                    .ok_or_else(|| RuntimeError::InvalidConfig("no native step".into()))?;
                let (x, t) = crate::native::batch_values(&batch)?;
                let width = x.len() / len;
                let mut out = Vec::with_capacity(len);
                for s in 0..len {
                    nv.forward_backward(&x[s * width..(s + 1) * width], &t[s..s + 1]);
                    let mut sq = 0.0f64;
                    for name in &names {
                        let g = nv.grad_of(name).ok_or_else(|| {
                            RuntimeError::InvalidConfig(format!("no gradient for `{name}`"))
                        })?;
                        sq += g.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
                    }
                    out.push(sq.sqrt());
                }
                Ok(out)
            })
            .collect::<Result<_>>()?;
        return Ok(parts.into_iter().flatten().collect());
    }
    // Candle's autograd, one sample at a time.
    let mut out = Vec::with_capacity(n);
    for start in starts {
        let len = data.batch_size.min(n - start);
        let batch = data.slice(start, len)?;
        for s in 0..len {
            let ctx = || format!("GraNd of {} sample {}", data.name, start + s);
            let part = Batch {
                inputs: batch.inputs.narrow(0, s, 1).ctx(ctx)?,
                targets: batch.targets.narrow(0, s, 1).ctx(ctx)?,
            };
            let loss = crate::train::batch_loss(model, &part)?;
            let grads = loss.backward().ctx(ctx)?;
            let mut sq = 0.0f64;
            for (_, g) in crate::train::named_grads(model, &grads)? {
                sq += g
                    .to_dtype(DType::F64)
                    .and_then(|g| g.sqr())
                    .and_then(|g| g.sum_all())
                    .and_then(|g| g.to_scalar::<f64>())
                    .ctx(ctx)?;
            }
            out.push(sq.sqrt());
        }
    }
    Ok(out)
}

/// Counts forgetting events while a model trains on a data set: give it
/// every batch's samples (file-order indices) and whether the model
/// classified each correctly at that presentation.
#[derive(Clone, Debug)]
pub struct Forgetting {
    /// Whether the last presentation was correct (none before the first).
    last: Vec<Option<bool>>,
    learned: Vec<bool>,
    events: Vec<u32>,
}

impl Forgetting {
    pub fn new(samples: usize) -> Self {
        Forgetting {
            last: vec![None; samples],
            learned: vec![false; samples],
            events: vec![0; samples],
        }
    }

    /// One presentation of `samples`, each classified correctly or not.
    pub fn observe(&mut self, samples: &[u32], correct: &[bool]) {
        for (&i, &ok) in samples.iter().zip(correct) {
            let i = i as usize;
            if self.last[i] == Some(true) && !ok {
                self.events[i] += 1;
            }
            self.learned[i] |= ok;
            self.last[i] = Some(ok);
        }
    }

    /// Forgetting events per sample; infinite for a sample never learned.
    pub fn scores(&self) -> Vec<f64> {
        self.events
            .iter()
            .zip(&self.learned)
            .map(|(&e, &l)| if l { e as f64 } else { f64::INFINITY })
            .collect()
    }

    /// Samples never classified correctly.
    pub fn never_learned(&self) -> usize {
        self.learned.iter().filter(|l| !**l).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_counts_round_the_pruned_part_down() {
        assert_eq!(kept_count(10, 0.7), 3);
        assert_eq!(kept_count(60000, 0.9), 6000);
        assert_eq!(kept_count(7, 0.5), 4);
        assert_eq!(kept_count(5, 0.0), 5);
        assert_eq!(kept_count(3, 0.99), 1);
    }

    #[test]
    fn class_quotas_sum_to_the_kept_count_in_proportion() {
        assert_eq!(class_quotas(&[50, 30, 20], 10), vec![5, 3, 2]);
        // 7 of 10 split 5:3:2 → 3.5, 2.1, 1.4 → 3, 2, 1 and one to the largest remainder.
        assert_eq!(class_quotas(&[5, 3, 2], 7), vec![4, 2, 1]);
        for kept in 0..=10 {
            let q = class_quotas(&[5, 3, 2, 0], kept);
            assert_eq!(q.iter().sum::<usize>(), kept);
            assert!(q.iter().zip([5, 3, 2, 0]).all(|(a, b)| *a <= b));
        }
    }

    #[test]
    fn selection_keeps_the_chosen_end_globally_or_per_class() {
        let scores = [0.9, 0.1, 0.5, 0.7, 0.3, 0.2];
        let labels = [0, 0, 0, 1, 1, 1];
        // Half goes: the three hardest, then the three easiest.
        let hard = select(&scores, &labels, 2, 0.5, false, Keep::Hardest, 1).unwrap();
        assert_eq!(hard, vec![0, 2, 3]);
        let easy = select(&scores, &labels, 2, 0.5, false, Keep::Easiest, 1).unwrap();
        assert_eq!(easy, vec![1, 4, 5]);
        // Per class: 3 kept of 3 + 3 samples → 2 and 1 (larger remainder to class 0).
        let per = select(&scores, &labels, 2, 0.5, true, Keep::Hardest, 1).unwrap();
        assert_eq!(per, vec![0, 2, 3]);
        let per_easy = select(&scores, &labels, 2, 0.5, true, Keep::Easiest, 1).unwrap();
        assert_eq!(per_easy, vec![1, 2, 5]);
    }

    #[test]
    fn ties_fall_to_the_seed_not_the_position() {
        let scores = vec![1.0; 1000];
        let labels = vec![0u32; 1000];
        let a = select(&scores, &labels, 1, 0.9, false, Keep::Hardest, 7).unwrap();
        let b = select(&scores, &labels, 1, 0.9, false, Keep::Hardest, 7).unwrap();
        let c = select(&scores, &labels, 1, 0.9, false, Keep::Hardest, 8).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 100);
        // Not the first hundred: the draw spreads over the whole range.
        assert!(a.iter().any(|&i| i >= 500));
        let nan = select(&[0.0, f64::NAN], &[0, 0], 1, 0.5, false, Keep::Hardest, 1);
        assert!(nan.is_err());
    }

    fn toy() -> (Model, Dataset) {
        use candle_core::{Device, Tensor};
        let dev = Device::Cpu;
        let model = crate::model::ModelSpec::mlp(&[6, 5, 3], crate::model::Activation::Tanh)
            .build(3, &dev)
            .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let n = 11;
        let x: Vec<f32> = (0..n * 6).map(|_| rng.random_range(-1.0..1.0)).collect();
        let y: Vec<u32> = (0..n).map(|_| rng.random_range(0..3)).collect();
        let data = Dataset::from_tensors(
            "toy",
            Tensor::from_vec(x, (n, 6), &dev).unwrap(),
            Tensor::from_vec(y, n, &dev).unwrap(),
            3,
            4,
            None,
        )
        .unwrap();
        (model, data)
    }

    /// EL2N against the definition, one sample at a time through candle.
    #[test]
    fn el2n_is_the_error_norm_of_each_prediction() {
        let (model, data) = toy();
        let got = el2n(&model, &data).unwrap();
        let labels = data.labels().unwrap();
        for (i, &y) in labels.iter().enumerate() {
            let b = data.slice(i, 1).unwrap();
            let p: Vec<f32> = candle_nn::ops::softmax(&model.forward(&b.inputs).unwrap(), 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want = p
                .iter()
                .enumerate()
                .map(|(c, &v)| (v as f64 - (c == y as usize) as u8 as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(
                (got[i] - want).abs() < 1e-6,
                "sample {i}: {} vs {want}",
                got[i]
            );
        }
    }

    /// GraNd (native step) against candle's autograd of each sample's loss.
    #[test]
    fn grand_is_the_norm_of_each_samples_gradient() {
        let (model, data) = toy();
        let got = grand(&model, &data).unwrap();
        for (i, g) in got.iter().enumerate() {
            let loss = crate::train::batch_loss(&model, &data.slice(i, 1).unwrap()).unwrap();
            let grads = loss.backward().unwrap();
            let sq: f64 = crate::train::named_grads(&model, &grads)
                .unwrap()
                .into_iter()
                .map(|(_, t)| {
                    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                    v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>()
                })
                .sum();
            assert!(
                (g - sq.sqrt()).abs() < 1e-5 * (1.0 + g),
                "sample {i}: {g} vs {}",
                sq.sqrt()
            );
            assert!(*g > 0.0);
        }
        // Subsets keep the chosen samples in order.
        let sub = data.subset(&[1, 4, 10]).unwrap();
        assert_eq!(sub.len(), 3);
        let all = data.labels().unwrap();
        assert_eq!(sub.labels().unwrap(), vec![all[1], all[4], all[10]]);
        assert!(data.subset(&[4, 1]).is_err());
        assert!(data.subset(&[11]).is_err());
    }

    /// Training reports each batch's samples by their file-order index, a
    /// permutation per epoch, and whether the model classified each one
    /// correctly before the step's update.
    #[test]
    fn training_reports_each_presentation() {
        struct Seen(Vec<(usize, Vec<u32>, Vec<bool>)>);
        impl crate::train::TrainHooks for Seen {
            fn reads_predictions(&self) -> bool {
                true
            }
            fn on_predictions(
                &mut self,
                info: &crate::train::StepInfo,
                samples: &[u32],
                correct: &[bool],
            ) -> Result<()> {
                self.0
                    .push((info.epoch, samples.to_vec(), correct.to_vec()));
                Ok(())
            }
        }
        let (mut model, data) = toy();
        let mut data = data;
        data.shuffle_seed = Some(4);
        let before = model.snapshot().unwrap();
        let cfg = crate::train::TrainConfig::new(2, OptimizerSpec::sgd(0.5, 0.0, 0.0));
        let mut seen = Seen(Vec::new());
        crate::train::train(&mut model, &data, &cfg, &Masks::new(), &mut seen).unwrap();
        assert_eq!(seen.0.len(), 2 * data.num_batches());
        for epoch in 0..2 {
            let mut all: Vec<u32> = seen
                .0
                .iter()
                .filter(|s| s.0 == epoch)
                .flat_map(|s| s.1.clone())
                .collect();
            assert_eq!(all, data.epoch_order(epoch));
            all.sort_unstable();
            assert_eq!(all, (0..data.len() as u32).collect::<Vec<_>>());
        }
        // The first batch, judged by the untrained model.
        let trained = model.snapshot().unwrap();
        model.restore(&before).unwrap();
        let labels = data.labels().unwrap();
        for (&i, &ok) in seen.0[0].1.iter().zip(&seen.0[0].2) {
            let b = data.slice(i as usize, 1).unwrap();
            let p: Vec<u32> = model
                .forward(&b.inputs)
                .unwrap()
                .argmax(1)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(p[0] == labels[i as usize], ok, "sample {i}");
        }
        model.restore(&trained).unwrap();
    }

    #[test]
    fn forgetting_counts_correct_to_wrong_transitions() {
        let mut f = Forgetting::new(4);
        // Sample 0: right, wrong, right, wrong → 2 events; 1: always right;
        // 2: never right; 3: wrong then right → 0 events.
        let seq = [
            [true, true, false, false],
            [false, true, false, true],
            [true, true, false, true],
            [false, true, false, true],
        ];
        for row in seq {
            f.observe(&[0, 1, 2, 3], &row);
        }
        assert_eq!(f.scores(), vec![2.0, 0.0, f64::INFINITY, 0.0]);
        assert_eq!(f.never_learned(), 1);
    }
}
