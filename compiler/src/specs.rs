//! What declarations and schedules mean to the runtime, from a checked
//! recipe's values: the data set and model specs, the files a `text` data
//! set reads, and the steps of a gradual schedule. Shared by the header
//! checks (`shapes`), the plan and the executor.

use crate::error::{rt_err, RunError};
use prunec_lang::check::Value;
use prunec_lang::Span;
use prunec_runtime as rt;
use std::path::{Path, PathBuf};

/// The runtime spec of a `dataset` declaration's constructor call, checked
/// against the files' headers, and the files it reads.
pub fn dataset_spec(
    v: &Value,
    seed: u64,
    span: Span,
) -> Result<(rt::DatasetSpec, Vec<PathBuf>), RunError> {
    let kind = match v.call_name() {
        Some("mnist") => rt::DatasetKind::Mnist,
        Some("fashion_mnist") => rt::DatasetKind::FashionMnist,
        Some("digits") => rt::DatasetKind::Digits,
        Some("images") => rt::DatasetKind::Images,
        Some("tensors") => rt::DatasetKind::Tensors,
        other => {
            return Err(RunError::user(
                span,
                format!(
                    "`{}` data sets cannot be run by `prunec run` yet",
                    other.unwrap_or("?")
                ),
            ));
        }
    };
    // The files are read from exactly the folder (or file) the recipe names.
    let path = PathBuf::from(v.arg("path").and_then(|p| p.as_str()).unwrap_or(""));
    let split = match v.arg("split").and_then(|s| s.as_str()) {
        Some("test") => rt::Split::Test,
        Some("validation") => rt::Split::Validation,
        _ => rt::Split::Train,
    };
    let mut spec = rt::DatasetSpec::new(kind, split).files_at(&path);
    let str_arg = |k: &str| v.arg(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
    let float_arg = |k: &str, d: f64| v.arg(k).and_then(|x| x.as_f64()).unwrap_or(d);
    // A number, or a list of numbers (one per channel).
    let floats_arg = |k: &str, d: f64| -> Vec<f32> {
        match v.arg(k) {
            Some(Value::List(items)) => items
                .iter()
                .map(|x| x.as_f64().unwrap_or(d) as f32)
                .collect(),
            _ => vec![float_arg(k, d) as f32],
        }
    };
    match kind {
        rt::DatasetKind::Images => {
            let size = match v.arg("size") {
                Some(Value::List(hw)) if hw.len() == 2 => {
                    let dim = |i: usize| hw[i].as_i64().unwrap_or(1).max(1) as usize;
                    Some((dim(0), dim(1)))
                }
                _ => None,
            };
            spec = spec.image_options(rt::ImageOptions {
                size,
                gray: str_arg("color") == "gray",
                mean: floats_arg("mean", 0.0),
                std: floats_arg("std", 1.0),
            });
        }
        rt::DatasetKind::Tensors => spec = spec.arrays(str_arg("inputs"), str_arg("labels")),
        _ => {}
    }
    if matches!(kind, rt::DatasetKind::Images | rt::DatasetKind::Tensors) {
        spec = spec.test_fraction(float_arg("test", 0.0));
    }
    if let Some(b) = v.arg("batch").and_then(|b| b.as_i64()) {
        spec = spec.batch_size(b.max(1) as usize);
    }
    if matches!(v.arg("shuffle"), Some(Value::Bool(true))) {
        spec = spec.shuffled(seed);
    }
    // The hold-out is a fraction of the whole train file; `limit` then takes
    // the first samples of whichever part the split reads.
    if let Some(f) = v
        .arg("validation")
        .and_then(|f| f.as_f64())
        .filter(|f| *f > 0.0)
    {
        let mut whole = spec.clone();
        whole.split = rt::Split::Train;
        let len = whole.meta().map_err(rt_err(span, ""))?.len;
        spec = spec.validation(((len as f64) * f).round() as usize);
    }
    if let Some(l) = v.arg("limit").and_then(|l| l.as_i64()).filter(|l| *l > 0) {
        spec = spec.limit(l as usize);
    }
    // Missing or malformed files are reported (with the fetch command) before hashing.
    spec.meta().map_err(rt_err(span, ""))?;
    // The files this data set reads.
    let files = spec.files().map_err(rt_err(span, "data set"))?;
    Ok((spec, files))
}

/// The runtime spec of a `model` declaration's constructor call.
pub fn model_spec(v: &Value, span: Span) -> Result<rt::ModelSpec, RunError> {
    let name = v.call_name().unwrap_or("");
    let int = |k: &str| v.arg(k).and_then(|x| x.as_i64()).unwrap_or(0).max(0) as usize;
    Ok(match name {
        "mlp" => {
            let mut widths = vec![int("inputs")];
            if let Some(Value::List(h)) = v.arg("hidden") {
                widths.extend(h.iter().filter_map(|x| x.as_i64()).map(|x| x as usize));
            }
            widths.push(int("classes"));
            let act = match v.arg("act").and_then(|a| a.as_str()).unwrap_or("relu") {
                "tanh" => rt::Activation::Tanh,
                "sigmoid" => rt::Activation::Sigmoid,
                "gelu" => rt::Activation::Gelu,
                _ => rt::Activation::Relu,
            };
            rt::ModelSpec::mlp(&widths, act)
        }
        "lenet5" => rt::ModelSpec::lenet5_for(int("classes")),
        "pretrained_cnn" => rt::ModelSpec::pretrained_cnn_from(v.arg("path").and_then(|p| p.as_str()).unwrap_or("")),
        "safetensors" => rt::ModelSpec::safetensors(v.arg("path").and_then(|p| p.as_str()).unwrap_or("")),
        "onnx" => rt::ModelSpec::onnx(v.arg("path").and_then(|p| p.as_str()).unwrap_or("")),
        other => {
            return Err(RunError::User {
                span: Some(span),
                message: format!("`{other}` models cannot be run by `prunec run` yet"),
                help: Some("language models are pruned through the runtime's LLM driver (docs/llm.md); the recipe executor runs mlp, lenet5, pretrained_cnn, safetensors and onnx classifiers".into()),
            })
        }
    })
}

/// The `(step, sparsity)` pruning steps of a `gradual(...)` schedule for a
/// training run of `total` steps with `batches` per epoch; an error (at `span`)
/// when the schedule does not fit the run.
pub fn gradual_plan(
    sched: &Value,
    batches: usize,
    total: usize,
    span: Span,
) -> Result<Vec<(usize, f64)>, RunError> {
    let frac = |k: &str, d: f64| sched.arg(k).and_then(|v| v.as_f64()).unwrap_or(d);
    let steps = |k: &str, d: usize| -> Result<usize, RunError> {
        match sched.arg(k) {
            None => Ok(d),
            Some(Value::Duration { count, unit }) => match unit {
                prunec_lang::ast::Unit::Step => Ok(*count as usize),
                prunec_lang::ast::Unit::Epoch => Ok(*count as usize * batches),
                prunec_lang::ast::Unit::Round => Err(RunError::user(
                    span,
                    format!(
                        "`{k}` of a gradual schedule is counted in steps or epochs, not rounds"
                    ),
                )),
            },
            Some(v) => Ok(v.as_i64().unwrap_or(0).max(0) as usize),
        }
    };
    let (s_i, s_f) = (frac("from", 0.0), frac("to", 0.0));
    let t0 = steps("start", 0)?;
    let t_end = steps("end", total.saturating_sub(1))?;
    // PDP moves its soft masks' threshold every step.
    let every = if sched.call_name() == Some("pdp") {
        1
    } else {
        100
    };
    let dt = steps("every", every)?.max(1);
    let cubic = sched.arg("curve").and_then(|c| c.as_str()) != Some("linear");
    if t_end < t0 {
        return Err(RunError::user(
            span,
            format!("the gradual schedule ends (step {t_end}) before it starts (step {t0})"),
        ));
    }
    if t_end >= total {
        return Err(RunError::User {
            span: Some(span),
            message: format!(
                "the gradual schedule's last pruning step is step {t_end}, but the training stage runs only {total} steps (0 to {})",
                total.saturating_sub(1)
            ),
            help: Some("train for more epochs or steps, or end the schedule earlier".into()),
        });
    }
    let at = |t: usize| -> f64 {
        if t_end == t0 {
            return s_f;
        }
        let x = (t - t0) as f64 / (t_end - t0) as f64;
        if cubic {
            s_f + (s_i - s_f) * (1.0 - x).powi(3)
        } else {
            s_i + (s_f - s_i) * x
        }
    };
    let mut plan: Vec<(usize, f64)> = (t0..=t_end).step_by(dt).map(|t| (t, at(t))).collect();
    if plan.last().map(|p| p.0) != Some(t_end) {
        plan.push((t_end, s_f));
    }
    Ok(plan)
}

/// The files of a `text` data set: one file, or the `.txt` files of a folder in name order.
pub fn text_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "txt"))
            .collect();
        v.sort();
        Ok(v)
    } else {
        std::fs::metadata(path)?;
        Ok(vec![path.to_path_buf()])
    }
}
