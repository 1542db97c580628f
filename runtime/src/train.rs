//! Masked training (cross-entropy, any optimizer and schedule, per-step gradient hooks)
//! and gradient collection over batches.

use candle_core::{backprop::GradStore, Tensor};

use crate::data::{Batch, Dataset};
use crate::error::{CandleContext, Result, RuntimeError};
use crate::masks::Masks;
use crate::model::Model;
use crate::optim::{LrSchedule, Optimizer, OptimizerSpec};

/// How to train.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    /// Passes over the data.
    pub epochs: usize,
    /// Stop after this many optimizer steps in total (`None`: all epochs).
    pub max_steps: Option<usize>,
    pub optimizer: OptimizerSpec,
    pub schedule: LrSchedule,
    /// Linear learning-rate warm-up over the first steps.
    pub warmup_steps: usize,
}

impl TrainConfig {
    /// `epochs` epochs with `optimizer`, constant rate, no warm-up.
    pub fn new(epochs: usize, optimizer: OptimizerSpec) -> Self {
        TrainConfig {
            epochs,
            max_steps: None,
            optimizer,
            schedule: LrSchedule::Constant,
            warmup_steps: 0,
        }
    }

    /// Uses `schedule`.
    pub fn schedule(mut self, schedule: LrSchedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// Warms up linearly over `steps` steps.
    pub fn warmup(mut self, steps: usize) -> Self {
        self.warmup_steps = steps;
        self
    }

    /// Stops after `steps` optimizer steps.
    pub fn max_steps(mut self, steps: usize) -> Self {
        self.max_steps = Some(steps);
        self
    }

    /// Total optimizer steps this config runs on `data`.
    pub fn total_steps(&self, data: &Dataset) -> usize {
        let all = self.epochs * data.num_batches();
        self.max_steps.map_or(all, |m| m.min(all))
    }
}

/// Where training is when a hook runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// 0-based epoch.
    pub epoch: usize,
    /// 0-based batch within the epoch.
    pub batch: usize,
    /// 0-based global optimizer step.
    pub step: usize,
    /// Learning rate of this step.
    pub lr: f64,
    /// Mean cross-entropy of this batch (before the update).
    pub loss: f32,
}

/// Whether training goes on after a hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    Stop,
}

/// Callbacks during [`train`]. Every method has a default that does nothing.
pub trait TrainHooks {
    /// After the backward pass, before the update: every parameter's gradient of the
    /// batch's mean loss, in model order, *unmasked* (criteria like Taylor or movement
    /// scores read them here).
    fn on_gradients(
        &mut self,
        _info: &StepInfo,
        _model: &Model,
        _grads: &[(String, Tensor)],
    ) -> Result<()> {
        Ok(())
    }

    /// After the optimizer step and mask re-application.
    fn after_step(&mut self, _info: &StepInfo, _model: &Model) -> Result<Control> {
        Ok(Control::Continue)
    }

    /// After `after_step` (when it did not stop training): may change the masks, e.g. to
    /// prune gradually during training. Return `true` when it did: the new masks are
    /// applied to the weights at once, and from then on the optimizer zeroes the
    /// gradients and state of every weight they prune.
    fn update_masks(
        &mut self,
        _info: &StepInfo,
        _model: &Model,
        _masks: &mut Masks,
    ) -> Result<bool> {
        Ok(false)
    }

    /// Before the forward pass of training step `step`: differentiable soft
    /// masks to train through (PDP), or `None`.
    fn soft_mask(&mut self, _step: usize) -> Option<SoftMask> {
        None
    }

    /// Whether [`TrainHooks::on_predictions`] is wanted (it costs a pass
    /// over the logits, and a forward pass on candle's path).
    fn reads_predictions(&self) -> bool {
        false
    }

    /// Each step's batch: its samples (file-order indices into the data
    /// set) and whether the model, before the step's update, classified
    /// each correctly (forgetting events).
    fn on_predictions(
        &mut self,
        _info: &StepInfo,
        _samples: &[u32],
        _correct: &[bool],
    ) -> Result<()> {
        Ok(())
    }

    /// After each epoch (`epoch` is 0-based): e.g. take a late-rewinding snapshot.
    fn after_epoch(&mut self, _epoch: usize, _model: &Model) -> Result<Control> {
        Ok(Control::Continue)
    }

    /// Whether `on_gradients`, `after_step` or `update_masks` look at the
    /// model or the gradients at every step. When they do not, the native
    /// trainer hands them empty gradients and updates the model's tensors
    /// only at epoch ends and when training stops.
    fn reads_every_step(&self) -> bool {
        true
    }
}

/// PDP's soft masks for one step (Cho et al. 2023): each targeted weight
/// enters the forward pass as `w · sigmoid((w² − t²) / tau)`, with `t²`
/// halfway between the largest pruned and the smallest kept `w²` at
/// `sparsity` (over all targeted weights, per tensor, or per group of `m`
/// consecutive weights of a row keeping `n`); gradients flow through the mask.
#[derive(Debug, Clone, PartialEq)]
pub struct SoftMask {
    pub params: Vec<String>,
    pub sparsity: f64,
    pub tau: f64,
    pub scope: SoftScope,
}

/// Where a soft mask's threshold is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SoftScope {
    Global,
    Layer,
    NM { n: usize, m: usize },
}

/// Hooks that do nothing.
pub struct NoHooks;

impl TrainHooks for NoHooks {
    fn reads_every_step(&self) -> bool {
        false
    }
}

/// What a training run did.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// Optimizer steps taken.
    pub steps: usize,
    /// Mean batch loss of each epoch run (a partial last epoch included).
    pub epoch_losses: Vec<f64>,
    /// Learning rate of the last step.
    pub final_lr: f64,
    /// True when a hook asked to stop.
    pub stopped_by_hook: bool,
}

/// Mean cross-entropy of a batch (logits `[b, classes]`, targets `[b]` u32).
pub fn batch_loss(model: &Model, batch: &Batch) -> Result<Tensor> {
    let logits = model.forward(&batch.inputs)?;
    candle_nn::loss::cross_entropy(&logits, &batch.targets).ctx(|| {
        format!(
            "cross-entropy of logits {:?} against targets {:?}",
            logits.dims(),
            batch.targets.dims()
        )
    })
}

pub(crate) fn named_grads(model: &Model, grads: &GradStore) -> Result<Vec<(String, Tensor)>> {
    model
        .params()
        .iter()
        .map(|p| {
            let g = match grads.get(p.var.as_tensor()) {
                Some(g) => g.clone(),
                None => p
                    .var
                    .zeros_like()
                    .ctx(|| format!("gradient of `{}`", p.name))?,
            };
            Ok((p.name.clone(), g))
        })
        .collect()
}

fn check_masks(model: &Model, masks: &Masks) -> Result<()> {
    for name in masks.names() {
        model.param(name)?;
    }
    Ok(())
}

/// Trains `model` on `data` (batches and shuffling as the data set says) with
/// cross-entropy. Masks are applied before the first step and after every step,
/// gradients and optimizer state of pruned weights are zeroed. Deterministic for a
/// given seed and data set, whatever the thread count. The masks stay as given:
/// hooks that prune during training need [`train_masked`].
pub fn train(
    model: &mut Model,
    data: &Dataset,
    cfg: &TrainConfig,
    masks: &Masks,
    hooks: &mut dyn TrainHooks,
) -> Result<TrainReport> {
    train_masked(model, data, cfg, &mut masks.clone(), hooks)
}

/// Knowledge distillation (Hinton et al. 2015): the loss of every step is
/// `(1 - weight) CE + weight T² KL(softmax(t/T) ‖ softmax(z/T))` with the
/// teacher's logits `t` on the same batch.
pub struct Distill<'a> {
    pub teacher: &'a Model,
    pub temperature: f64,
    pub weight: f64,
}

/// The distillation loss of logits `[b, classes]` against the teacher's.
pub fn distill_loss(
    logits: &Tensor,
    targets: &Tensor,
    teacher: &Tensor,
    temperature: f64,
    weight: f64,
) -> Result<Tensor> {
    let ctx = || "distillation loss".to_string();
    let ce = candle_nn::loss::cross_entropy(logits, targets).ctx(ctx)?;
    let b = logits.dims2().ctx(ctx)?.0 as f64;
    let log_p = candle_nn::ops::log_softmax(&(logits / temperature).ctx(ctx)?, 1).ctx(ctx)?;
    let log_q = candle_nn::ops::log_softmax(&(teacher / temperature).ctx(ctx)?, 1).ctx(ctx)?;
    let q = log_q.exp().ctx(ctx)?;
    let kl = (q * (log_q - log_p).ctx(ctx)?)
        .ctx(ctx)?
        .sum_all()
        .ctx(ctx)?;
    let kd = (kl * (weight * temperature * temperature / b)).ctx(ctx)?;
    ((ce * (1.0 - weight)).ctx(ctx)? + kd).ctx(ctx)
}

/// [`train`] with masks that [`TrainHooks::update_masks`] may change between steps
/// (gradual pruning); `masks` holds the last masks when it returns.
pub fn train_masked(
    model: &mut Model,
    data: &Dataset,
    cfg: &TrainConfig,
    masks: &mut Masks,
    hooks: &mut dyn TrainHooks,
) -> Result<TrainReport> {
    train_distilled(model, data, cfg, masks, hooks, None)
}

/// [`train_masked`], distilling from a teacher when `distill` is given.
pub fn train_distilled(
    model: &mut Model,
    data: &Dataset,
    cfg: &TrainConfig,
    masks: &mut Masks,
    hooks: &mut dyn TrainHooks,
    distill: Option<&Distill>,
) -> Result<TrainReport> {
    if let Some(d) = distill {
        d.teacher.check_data(data)?;
        if d.teacher.classes() != model.classes() {
            return Err(RuntimeError::InvalidConfig(format!(
                "the teacher has {} classes, the student {}",
                d.teacher.classes(),
                model.classes()
            )));
        }
    }
    if cfg.epochs == 0 {
        return Err(RuntimeError::InvalidConfig(
            "training needs at least one epoch".into(),
        ));
    }
    check_masks(model, masks)?;
    model.check_data(data)?;
    // Checks the optimizer's settings for both paths; steps only candle's.
    let mut optimizer = Optimizer::new(cfg.optimizer.clone(), model)?;
    masks.apply(model)?;
    // The native step where it covers the model (CPU, built-in layers).
    let mut native = crate::native::Native::new(model, masks, &cfg.optimizer)?;
    let every_step = hooks.reads_every_step();
    let total = cfg.total_steps(data);
    let base = cfg.optimizer.lr();
    let mut report = TrainReport {
        steps: 0,
        epoch_losses: Vec::new(),
        final_lr: base,
        stopped_by_hook: false,
    };
    let predictions = hooks.reads_predictions();
    'epochs: for epoch in 0..cfg.epochs {
        let mut loss_sum = 0.0f64;
        let mut batches = 0usize;
        // Which samples each batch holds, for `on_predictions`.
        let order = predictions.then(|| data.epoch_order(epoch));
        let mut first = 0usize;
        for (b, batch) in data.batches(epoch).enumerate() {
            if report.steps >= total {
                break 'epochs;
            }
            let batch = batch?;
            let lr = cfg
                .schedule
                .lr_at(base, report.steps, total, cfg.warmup_steps);
            if let Some(soft) = hooks.soft_mask(report.steps) {
                match native.as_mut() {
                    Some(n) => n.set_soft(&soft)?,
                    None => return Err(RuntimeError::InvalidConfig(
                        "soft masks (PDP) train on the native step: built-in classifiers on CPU"
                            .into(),
                    )),
                }
            }
            let teacher = match distill {
                Some(d) => Some(
                    d.teacher
                        .forward(&batch.inputs)?
                        .detach()
                        .to_dtype(candle_core::DType::F32)
                        .ctx(|| "teacher logits".to_string())?,
                ),
                None => None,
            };
            let (loss_value, grads) = match native.as_mut() {
                Some(n) => {
                    let (x, t) = crate::native::batch_values(&batch)?;
                    let value = match (&teacher, distill) {
                        (Some(tl), Some(d)) => {
                            let tl = tl
                                .flatten_all()
                                .and_then(|t| t.to_vec1::<f32>())
                                .ctx(|| "teacher logits".to_string())?;
                            n.forward_backward_with(
                                &x,
                                &t,
                                Some((&tl, d.temperature as f32, d.weight as f32)),
                            )
                        }
                        _ => n.forward_backward(&x, &t),
                    };
                    (value, None)
                }
                None => {
                    let loss = match (&teacher, distill) {
                        (Some(tl), Some(d)) => {
                            let logits = model.forward(&batch.inputs)?;
                            distill_loss(&logits, &batch.targets, tl, d.temperature, d.weight)?
                        }
                        _ => batch_loss(model, &batch)?,
                    };
                    let value = loss
                        .to_scalar::<f32>()
                        .ctx(|| "reading the loss".to_string())?;
                    (value, Some(loss))
                }
            };
            if !loss_value.is_finite() {
                return Err(RuntimeError::Diverged {
                    epoch,
                    step: report.steps,
                    loss: loss_value,
                });
            }
            let info = StepInfo {
                epoch,
                batch: b,
                step: report.steps,
                lr,
                loss: loss_value,
            };
            if let Some(order) = &order {
                let targets = batch
                    .targets
                    .to_vec1::<u32>()
                    .ctx(|| "batch targets".to_string())?;
                let predicted = match native.as_ref() {
                    Some(n) => n.last_predictions(targets.len()),
                    None => model
                        .forward(&batch.inputs)?
                        .argmax(1)
                        .and_then(|p| p.to_vec1::<u32>())
                        .ctx(|| "predictions of the batch".to_string())?,
                };
                let correct: Vec<bool> = predicted
                    .iter()
                    .zip(&targets)
                    .map(|(p, t)| p == t)
                    .collect();
                hooks.on_predictions(&info, &order[first..first + targets.len()], &correct)?;
                first += targets.len();
            }
            match (native.as_mut(), grads) {
                (Some(n), _) => {
                    if every_step {
                        hooks.on_gradients(&info, model, &n.named_grads(model)?)?;
                    }
                    n.update(lr);
                    if every_step {
                        n.write_back(model)?;
                    }
                }
                (None, Some(loss)) => {
                    let grads = loss
                        .backward()
                        .ctx(|| format!("backward pass at step {}", report.steps))?;
                    hooks.on_gradients(&info, model, &named_grads(model, &grads)?)?;
                    optimizer.step(model, &grads, masks, lr)?;
                }
                (None, None) => unreachable!("candle steps keep their loss"),
            }
            report.steps += 1;
            report.final_lr = lr;
            loss_sum += loss_value as f64;
            batches += 1;
            if hooks.after_step(&info, model)? == Control::Stop {
                report.epoch_losses.push(loss_sum / batches as f64);
                report.stopped_by_hook = true;
                if let Some(n) = &native {
                    n.write_back(model)?;
                }
                return Ok(report);
            }
            if hooks.update_masks(&info, model, masks)? {
                check_masks(model, masks)?;
                masks.apply(model)?;
                if let Some(n) = native.as_mut() {
                    n.reload(model, masks)?;
                }
            }
        }
        if batches > 0 {
            report.epoch_losses.push(loss_sum / batches as f64);
        }
        if let Some(n) = &native {
            n.write_back(model)?;
        }
        if hooks.after_epoch(epoch, model)? == Control::Stop {
            report.stopped_by_hook = true;
            break;
        }
    }
    // A run cut short by `max_steps` ends mid-epoch.
    if let Some(n) = &native {
        n.write_back(model)?;
    }
    Ok(report)
}

/// `count` gradients of the cross-entropy, each the mean over `per`
/// consecutive samples of `data` (epoch 0 order), of each parameter in
/// `names`: for parameter `k`, a `count x numel` row-major matrix (an
/// empirical Fisher's factors). The weights are not changed. Fails when
/// `data` holds fewer than `count * per` samples.
pub fn sample_gradients(
    model: &Model,
    data: &Dataset,
    count: usize,
    per: usize,
    names: &[String],
) -> Result<Vec<Vec<f32>>> {
    if count == 0 || per == 0 {
        return Err(RuntimeError::InvalidConfig(
            "sample gradients need at least one gradient of one sample".into(),
        ));
    }
    if data.len() < count * per {
        return Err(RuntimeError::InvalidConfig(format!(
            "{count} gradients of {per} sample(s) need {} samples; data set {} has {}",
            count * per,
            data.name,
            data.len()
        )));
    }
    model.check_data(data)?;
    let sizes: Vec<usize> = names
        .iter()
        .map(|n| model.param(n).map(|p| p.numel()))
        .collect::<Result<_>>()?;
    let mut out: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&d| Vec::with_capacity(count * d))
        .collect();
    let update = OptimizerSpec::sgd(1.0, 0.0, 0.0);
    let mut native = crate::native::Native::new(model, &Masks::new(), &update)?;
    let mut done = 0usize;
    'batches: for batch in data.batches(0) {
        let batch = batch?;
        let b = batch.targets.dims1().ctx(|| "batch targets".to_string())?;
        let values = match native {
            Some(_) => Some(crate::native::batch_values(&batch)?),
            None => None,
        };
        // A gradient never spans two batches: a batch's tail shorter than
        // `per` is skipped (the data set's batch size decides where).
        for start in (0..b).step_by(per).filter(|s| s + per <= b) {
            if done == count {
                break 'batches;
            }
            match (native.as_mut(), &values) {
                (Some(nv), Some((x, t))) => {
                    let width = x.len() / b;
                    nv.forward_backward(
                        &x[start * width..(start + per) * width],
                        &t[start..start + per],
                    );
                    for (k, n) in names.iter().enumerate() {
                        let g = nv.grad_of(n).ok_or_else(|| {
                            RuntimeError::InvalidConfig(format!("no gradient for `{n}`"))
                        })?;
                        out[k].extend_from_slice(g);
                    }
                }
                _ => {
                    let part = Batch {
                        inputs: batch
                            .inputs
                            .narrow(0, start, per)
                            .ctx(|| "slicing a batch".to_string())?,
                        targets: batch
                            .targets
                            .narrow(0, start, per)
                            .ctx(|| "slicing a batch".to_string())?,
                    };
                    let loss = batch_loss(model, &part)?;
                    let grads = loss
                        .backward()
                        .ctx(|| "backward pass for gradients".to_string())?;
                    let named = named_grads(model, &grads)?;
                    for (k, n) in names.iter().enumerate() {
                        let (_, g) = named.iter().find(|(m, _)| m == n).ok_or_else(|| {
                            RuntimeError::InvalidConfig(format!("no gradient for `{n}`"))
                        })?;
                        let v = g
                            .flatten_all()
                            .and_then(|t| t.to_dtype(candle_core::DType::F32))
                            .and_then(|t| t.to_vec1::<f32>())
                            .ctx(|| format!("gradient of `{n}`"))?;
                        out[k].extend_from_slice(&v);
                    }
                }
            }
            done += 1;
        }
    }
    if done < count {
        return Err(RuntimeError::InvalidConfig(format!(
            "data set {} gave {done} gradients of {per} sample(s), {count} were asked (batches of its size leave remainders)",
            data.name
        )));
    }
    Ok(out)
}

/// The mean over the first `batches` batches (epoch 0 order of `data`) of each
/// parameter's gradient of the batch-mean cross-entropy, in model order. The
/// weights are not changed. With `batches` larger than the data set, all batches are used.
pub fn gradients(model: &Model, data: &Dataset, batches: usize) -> Result<Vec<(String, Tensor)>> {
    if batches == 0 {
        return Err(RuntimeError::InvalidConfig(
            "gradients need at least one batch".into(),
        ));
    }
    model.check_data(data)?;
    // The same step as training, so a criterion reads the gradients training sees.
    let update = OptimizerSpec::sgd(1.0, 0.0, 0.0);
    let mut native = crate::native::Native::new(model, &Masks::new(), &update)?;
    let mut sum: Option<Vec<(String, Tensor)>> = None;
    let mut n = 0usize;
    for batch in data.batches(0).take(batches) {
        let batch = batch?;
        let named = match native.as_mut() {
            Some(nv) => {
                let (x, t) = crate::native::batch_values(&batch)?;
                nv.forward_backward(&x, &t);
                nv.named_grads(model)?
            }
            None => {
                let loss = batch_loss(model, &batch)?;
                let grads = loss
                    .backward()
                    .ctx(|| "backward pass for gradients".to_string())?;
                named_grads(model, &grads)?
            }
        };
        sum = Some(match sum {
            None => named,
            Some(acc) => acc
                .into_iter()
                .zip(named)
                .map(|((name, a), (_, g))| {
                    let s = a.add(&g).ctx(|| format!("summing gradients of `{name}`"))?;
                    Ok((name, s))
                })
                .collect::<Result<_>>()?,
        });
        n += 1;
    }
    let sum = sum.ok_or_else(|| {
        RuntimeError::InvalidConfig(format!("data set {} has no batches", data.name))
    })?;
    sum.into_iter()
        .map(|(name, s)| {
            let m = s
                .affine(1.0 / n as f64, 0.0)
                .ctx(|| format!("averaging gradients of `{name}`"))?;
            Ok((name, m))
        })
        .collect()
}
