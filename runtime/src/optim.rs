//! Optimizers (SGD with momentum and weight decay, Adam, AdamW) and learning-rate schedules,
//! written on candle tensors and aware of masks.

use candle_core::{backprop::GradStore, Tensor};

use crate::error::{CandleContext, Result, RuntimeError};
use crate::masks::{mask_values, Masks};
use crate::model::Model;

/// Optimizer and its hyper-parameters; `lr` is the base rate the schedule scales.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OptimizerSpec {
    /// PyTorch's SGD: `g += wd * w; buf = momentum * buf + g; w -= lr * (nesterov ? g + momentum * buf : buf)`.
    Sgd {
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        nesterov: bool,
    },
    /// Adam with L2 weight decay added to the gradient.
    Adam {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
    /// AdamW: decoupled weight decay `w *= 1 - lr * wd`.
    AdamW {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
}

impl OptimizerSpec {
    /// SGD with momentum and weight decay.
    pub fn sgd(lr: f64, momentum: f64, weight_decay: f64) -> Self {
        OptimizerSpec::Sgd {
            lr,
            momentum,
            weight_decay,
            nesterov: false,
        }
    }

    /// Adam with the usual betas (0.9, 0.999) and eps 1e-8.
    pub fn adam(lr: f64) -> Self {
        OptimizerSpec::Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }

    /// AdamW with the usual betas and eps and decoupled decay `weight_decay`.
    pub fn adamw(lr: f64, weight_decay: f64) -> Self {
        OptimizerSpec::AdamW {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        }
    }

    /// The base learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            OptimizerSpec::Sgd { lr, .. }
            | OptimizerSpec::Adam { lr, .. }
            | OptimizerSpec::AdamW { lr, .. } => *lr,
        }
    }

    pub(crate) fn check(&self) -> Result<()> {
        let bad = |m: String| {
            Err(RuntimeError::InvalidConfig(format!(
                "optimizer {self:?}: {m}"
            )))
        };
        let lr = self.lr();
        if !(lr.is_finite() && lr > 0.0) {
            return bad("learning rate must be a positive number".into());
        }
        match self {
            OptimizerSpec::Sgd {
                momentum,
                weight_decay,
                nesterov,
                ..
            } => {
                if !(0.0..1.0).contains(momentum) || *weight_decay < 0.0 {
                    return bad("momentum must be in [0, 1) and weight decay >= 0".into());
                }
                if *nesterov && *momentum == 0.0 {
                    return bad("nesterov needs momentum > 0".into());
                }
            }
            OptimizerSpec::Adam {
                beta1,
                beta2,
                eps,
                weight_decay,
                ..
            }
            | OptimizerSpec::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay,
                ..
            } => {
                if !(0.0..1.0).contains(beta1)
                    || !(0.0..1.0).contains(beta2)
                    || *eps <= 0.0
                    || *weight_decay < 0.0
                {
                    return bad("betas must be in [0, 1), eps > 0, weight decay >= 0".into());
                }
            }
        }
        Ok(())
    }
}

/// How the learning rate changes over training (after the optional linear warm-up).
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LrSchedule {
    /// The base rate throughout.
    #[default]
    Constant,
    /// Multiply by `gamma` every `every_steps` optimizer steps.
    Step { every_steps: usize, gamma: f64 },
    /// Cosine annealing from the base rate to `min_lr` over the remaining steps.
    Cosine { min_lr: f64 },
}

impl LrSchedule {
    /// The rate at global `step` (0-based) of `total_steps`, with a linear
    /// warm-up over the first `warmup_steps` steps.
    pub fn lr_at(&self, base: f64, step: usize, total_steps: usize, warmup_steps: usize) -> f64 {
        if step < warmup_steps {
            return base * (step + 1) as f64 / warmup_steps as f64;
        }
        match self {
            LrSchedule::Constant => base,
            LrSchedule::Step { every_steps, gamma } => {
                base * gamma.powi((step / (*every_steps).max(1)) as i32)
            }
            LrSchedule::Cosine { min_lr } => {
                let span = total_steps.saturating_sub(warmup_steps).max(1) as f64;
                let t = (step - warmup_steps) as f64 / span;
                min_lr + (base - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
struct ParamState {
    /// SGD momentum buffer or Adam first moment.
    first: Option<Tensor>,
    /// Adam second moment.
    second: Option<Tensor>,
}

/// An optimizer with per-parameter state.
#[derive(Debug, Clone)]
pub struct Optimizer {
    spec: OptimizerSpec,
    state: Vec<ParamState>,
    steps: usize,
}

impl Optimizer {
    /// A fresh optimizer for `model` (state starts at zero).
    pub fn new(spec: OptimizerSpec, model: &Model) -> Result<Self> {
        spec.check()?;
        Ok(Optimizer {
            spec,
            state: vec![ParamState::default(); model.params().len()],
            steps: 0,
        })
    }

    /// One update with learning rate `lr`. Gradients of masked parameters are masked
    /// first; after the update the weights and the optimizer state are masked again,
    /// so pruned weights are exactly 0.0 and their state cannot revive them.
    pub fn step(&mut self, model: &Model, grads: &GradStore, masks: &Masks, lr: f64) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        for (i, p) in model.params().iter().enumerate() {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let ctx = || format!("optimizer step on `{}`", p.name);
            let mask = masks.get(&p.name);
            let g = match mask {
                Some(m) => g.mul(m).ctx(ctx)?,
                None => g.clone(),
            };
            let w = &p.var.as_detached_tensor();
            let state = &mut self.state[i];
            let new_w = match &self.spec {
                OptimizerSpec::Sgd {
                    momentum,
                    weight_decay,
                    nesterov,
                    ..
                } => {
                    let g = if *weight_decay > 0.0 {
                        g.add(&w.affine(*weight_decay, 0.0).ctx(ctx)?).ctx(ctx)?
                    } else {
                        g
                    };
                    let d = if *momentum > 0.0 {
                        let buf = match &state.first {
                            None => g.clone(),
                            Some(b) => b.affine(*momentum, 0.0).ctx(ctx)?.add(&g).ctx(ctx)?,
                        };
                        let d = if *nesterov {
                            g.add(&buf.affine(*momentum, 0.0).ctx(ctx)?).ctx(ctx)?
                        } else {
                            buf.clone()
                        };
                        state.first = Some(buf);
                        d
                    } else {
                        g
                    };
                    w.sub(&d.affine(lr, 0.0).ctx(ctx)?).ctx(ctx)?
                }
                OptimizerSpec::Adam {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    ..
                }
                | OptimizerSpec::AdamW {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    ..
                } => {
                    let decoupled = matches!(self.spec, OptimizerSpec::AdamW { .. });
                    let (g, w0) = if *weight_decay > 0.0 {
                        if decoupled {
                            (g, w.affine(1.0 - lr * weight_decay, 0.0).ctx(ctx)?)
                        } else {
                            (
                                g.add(&w.affine(*weight_decay, 0.0).ctx(ctx)?).ctx(ctx)?,
                                w.clone(),
                            )
                        }
                    } else {
                        (g, w.clone())
                    };
                    let m = match &state.first {
                        None => g.affine(1.0 - beta1, 0.0).ctx(ctx)?,
                        Some(m) => m
                            .affine(*beta1, 0.0)
                            .ctx(ctx)?
                            .add(&g.affine(1.0 - beta1, 0.0).ctx(ctx)?)
                            .ctx(ctx)?,
                    };
                    let g2 = g.sqr().ctx(ctx)?;
                    let v = match &state.second {
                        None => g2.affine(1.0 - beta2, 0.0).ctx(ctx)?,
                        Some(v) => v
                            .affine(*beta2, 0.0)
                            .ctx(ctx)?
                            .add(&g2.affine(1.0 - beta2, 0.0).ctx(ctx)?)
                            .ctx(ctx)?,
                    };
                    let bc1 = 1.0 - beta1.powi(t);
                    let bc2 = 1.0 - beta2.powi(t);
                    // lr * m_hat / (sqrt(v_hat) + eps)
                    let denom = v
                        .affine(1.0 / bc2, 0.0)
                        .ctx(ctx)?
                        .sqrt()
                        .ctx(ctx)?
                        .affine(1.0, *eps)
                        .ctx(ctx)?;
                    let update = m.affine(lr / bc1, 0.0).ctx(ctx)?.div(&denom).ctx(ctx)?;
                    state.first = Some(m);
                    state.second = Some(v);
                    w0.sub(&update).ctx(ctx)?
                }
            };
            let new_w = match mask {
                Some(m) => {
                    if let Some(f) = &state.first {
                        state.first = Some(mask_values(f, m).ctx(ctx)?);
                    }
                    if let Some(s) = &state.second {
                        state.second = Some(mask_values(s, m).ctx(ctx)?);
                    }
                    mask_values(&new_w, m).ctx(ctx)?
                }
                None => new_w,
            };
            p.var.set(&new_w).ctx(ctx)?;
        }
        Ok(())
    }
}
