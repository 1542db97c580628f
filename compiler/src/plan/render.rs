//! `prunec plan`: the steps `prunec run` executes, with what model and data
//! file headers alone tell — per-layer targets, parameter and FLOP counts
//! before and after, and the data each step reads.

use super::{Action, Plan, Step};
use crate::error::RunError;
use crate::lower::{glob_match, strings};
use crate::specs::model_spec;
use prunec_lang::check::{SymKind, Value};
use prunec_lang::resolved::{Pattern, Schedule, Scope};
use prunec_lang::CheckedRecipe;
use prunec_runtime as rt;
use std::collections::BTreeMap;
use std::fmt::Write as _;

struct ModelInfo {
    /// The architecture (none for ONNX graphs and language models).
    arch: Option<rt::Architecture>,
    shapes: Vec<(String, Vec<usize>)>,
    /// Weight name → output positions per sample (FLOPs = 2 * numel * positions).
    positions: BTreeMap<String, usize>,
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn model_info(r: &CheckedRecipe, name: &str) -> Result<ModelInfo, RunError> {
    let sym = &r.symbols[name];
    let value = sym.value.clone().unwrap_or(Value::Ref(name.into()));
    let spec = model_spec(&value, sym.span)?;
    let err = |e: rt::RuntimeError| RunError::User {
        span: Some(sym.span),
        message: format!("model `{name}`: {e}"),
        help: None,
    };
    let shapes = spec.param_shapes().map_err(err)?;
    let arch = spec.resolve_architecture().ok();
    Ok(info_of(arch, shapes))
}

fn info_of(arch: Option<rt::Architecture>, shapes: Vec<(String, Vec<usize>)>) -> ModelInfo {
    let positions = match arch.as_ref().map(|a| a.shape_check()) {
        Some(Ok((costs, _))) => costs.into_iter().map(|c| (c.weight, c.positions)).collect(),
        _ => BTreeMap::new(),
    };
    let arch = arch.filter(|a| !matches!(a, rt::Architecture::Onnx { .. }));
    ModelInfo {
        arch,
        shapes,
        positions,
    }
}

fn flops(info: &ModelInfo, kept: &BTreeMap<String, f64>) -> (u64, u64) {
    let (mut dense, mut after) = (0u64, 0u64);
    for (n, shape) in &info.shapes {
        if let Some(p) = info.positions.get(n) {
            let f = 2 * numel(shape) as u64 * *p as u64;
            dense += f;
            after += (f as f64 * kept.get(n).copied().unwrap_or(1.0)).round() as u64;
        }
    }
    (dense, after)
}

/// One line on a Hugging Face model, read from its folder's headers.
fn hf_summary(v: Option<&prunec_lang::check::Value>) -> String {
    let path = v
        .and_then(|v| v.arg("path"))
        .and_then(|p| p.as_str())
        .unwrap_or("");
    match prunec_runtime::llm::inspect_hf(std::path::Path::new(path)) {
        Ok(h) => {
            let c = &h.config;
            let params: usize = h
                .tensors
                .values()
                .map(|t| t.shape.iter().product::<usize>())
                .sum();
            let mut dtypes: Vec<&str> = h.tensors.values().map(|t| t.dtype.as_str()).collect();
            dtypes.sort();
            dtypes.dedup();
            let experts = match &c.moe {
                Some(m) => format!(
                    ", {} experts of {} (top {}) in {} of the blocks",
                    m.num_experts,
                    m.moe_intermediate_size,
                    m.top_k,
                    m.sparse.iter().filter(|&&s| s).count()
                ),
                None => String::new(),
            };
            format!(
                "hf language model {}, {} layers, hidden {}, {} heads ({} key/value){experts}, {params} parameters ({})",
                c.architecture.class_name(),
                c.num_hidden_layers,
                c.hidden_size,
                c.num_attention_heads,
                c.num_key_value_heads,
                dtypes.join(", ")
            )
        }
        Err(e) => format!("hf language model, unreadable: {e}"),
    }
}

/// A language model's configuration as its header gives it (none when it
/// cannot be read: `check` reports that).
fn lm_config(v: Option<&prunec_lang::check::Value>) -> Option<rt::llm::LlamaConfig> {
    let v = v?;
    let path = std::path::Path::new(v.arg("path").and_then(|p| p.as_str()).unwrap_or(""));
    match v.call_name()? {
        "hf" => rt::llm::inspect_hf(path).ok().map(|h| h.config),
        "gguf" => rt::llm::gguf::GgufFile::open(path)
            .and_then(|f| f.check())
            .ok(),
        _ => None,
    }
}

/// The widths a language-model unit stage leaves, per block, and the
/// configuration after it (every block alike).
fn llm_units_table(
    c: &mut rt::llm::LlamaConfig,
    unit: prunec_lang::resolved::Unit,
    last: Option<f64>,
) -> String {
    use prunec_lang::resolved::Unit;
    let Some(s) = last else {
        return String::new();
    };
    let (what, count) = match unit {
        Unit::Ffn => ("FFN neurons", c.intermediate_size),
        Unit::KvGroup => ("kv groups", c.num_key_value_heads),
        Unit::Head => ("query heads", c.num_attention_heads),
        _ => return String::new(),
    };
    let Some((per_group, kept_in_group, after)) = crate::units::llm_kept(c, unit, s) else {
        return String::new();
    };
    let kept = kept_in_group * (count / per_group.max(1));
    let before = (
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
    );
    *c = after;
    format!(
        "       | unit | per block | kept |\n       | {what} | {count} | {kept} |\n       every one of the {} blocks: FFN {} → {}, heads {} → {} ({} → {} key/value)\n",
        c.num_hidden_layers,
        before.0,
        c.intermediate_size,
        before.1,
        c.num_attention_heads,
        before.2,
        c.num_key_value_heads
    )
}

/// Renders the plan of an optimized IR.
pub fn render(r: &CheckedRecipe, plan: &Plan) -> Result<String, RunError> {
    let mut out = format!("recipe {} (seed {})\n\n", r.name, r.seed);
    let mut infos = BTreeMap::new();
    let mut lms = BTreeMap::new();
    for (name, sym) in &r.symbols {
        match sym.kind {
            SymKind::Model => {
                let ctor = sym
                    .value
                    .as_ref()
                    .and_then(|v| v.call_name())
                    .unwrap_or("?");
                if prunec_lang::check::models::is_language_model_constructor(ctor) {
                    let config = lm_config(sym.value.as_ref());
                    if ctor == "hf" {
                        let _ = writeln!(out, "model {name}: {}", hf_summary(sym.value.as_ref()));
                    } else if let Some(c) = &config {
                        let _ = writeln!(
                            out,
                            "model {name}: {ctor} language model, {} layers, hidden {}, FFN {}, {} heads ({} key/value)",
                            c.num_hidden_layers,
                            c.hidden_size,
                            c.intermediate_size,
                            c.num_attention_heads,
                            c.num_key_value_heads
                        );
                    } else {
                        let _ = writeln!(out, "model {name}: {ctor} language model");
                    }
                    if let Some(c) = config {
                        lms.insert(name.clone(), c);
                    }
                    continue;
                }
                let info = model_info(r, name)?;
                let params: usize = info.shapes.iter().map(|(_, s)| numel(s)).sum();
                let (f, _) = flops(&info, &BTreeMap::new());
                let _ = writeln!(
                    out,
                    "model {name}: {} tensors, {params} parameters, {f} forward FLOPs per sample",
                    info.shapes.len()
                );
                infos.insert(name.clone(), info);
            }
            SymKind::Dataset => {
                let ctor = sym
                    .value
                    .as_ref()
                    .and_then(|v| v.call_name())
                    .unwrap_or("?");
                let _ = writeln!(out, "data {name}: {}", data_line(sym.value.as_ref(), ctor));
            }
            _ => {}
        }
    }
    out.push_str("\nsteps (what `prunec run` executes, in order):\n");
    for step in &plan.steps {
        render_step(r, step, (&mut infos, &mut lms), "", &mut out);
        if !step.each_round.is_empty() {
            let rounds = match &step.action {
                Action::Prune(p) => p.schedule.rounds().unwrap_or(1),
                _ => 1,
            };
            let _ = writeln!(out, "       after each of its {rounds} round(s):");
            for inner in &step.each_round {
                render_step(r, inner, (&mut infos, &mut lms), "    ", &mut out);
            }
        }
    }
    if !plan.dropped.is_empty() {
        out.push_str("\ndropped by dead-code elimination (not run):\n");
        for d in &plan.dropped {
            let (line, _) = prunec_lang::diag::line_col(&r.source, d.span.start);
            let _ = writeln!(out, "{:>8}. [line {line}] {}: {}", d.id, d.kind, d.why);
        }
    }
    Ok(out)
}

fn render_step(
    r: &CheckedRecipe,
    step: &Step,
    (infos, lms): (
        &mut BTreeMap<String, ModelInfo>,
        &mut BTreeMap<String, rt::llm::LlamaConfig>,
    ),
    indent: &str,
    out: &mut String,
) {
    let (line, _) = prunec_lang::diag::line_col(&r.source, step.span.start);
    let _ = writeln!(
        out,
        "{indent}{:>8}. [line {line}] {}",
        step.id,
        step.label()
    );
    let Action::Prune(p) = &step.action else {
        return;
    };
    let stage = super::stage_of(step, r);
    // A gradual schedule's final target, and when it prunes.
    let gradual = match &p.schedule {
        Schedule::Gradual(g) => Some(g),
        _ => None,
    };
    if let Some(g) = gradual.filter(|g| g.call_name() == Some("pdp")) {
        let arg = |k: &str, d: &str| g.arg(k).map(|v| v.to_string()).unwrap_or_else(|| d.into());
        let _ = writeln!(
            out,
            "{indent}       pdp: soft masks (tau {}) {}, hardened by magnitude after the training stage",
            g.arg("tau").map(|v| v.to_string()).unwrap_or_else(|| {
                prunec_lang::builtins::default_number("pdp", Some("tau"))
                    .map_or("?".into(), |t| t.to_string())
            }),
            match p.pattern {
                Some(prunec_lang::resolved::Pattern::NM { n, m }) => {
                    format!("keeping {n} of every {m} from the first step")
                }
                _ => format!(
                    "from {} to {} between {} and {} ({})",
                    arg("from", "0%"),
                    arg("to", "?"),
                    arg("start", "step 0"),
                    arg("end", "?"),
                    arg("curve", "cubic")
                ),
            }
        );
    } else if let Some(g) = gradual {
        let arg = |k: &str, d: &str| g.arg(k).map(|v| v.to_string()).unwrap_or_else(|| d.into());
        let _ = writeln!(
            out,
            "{indent}       gradual: from {} to {} between {} and {}, every {} ({}), during the training stage",
            arg("from", "0%"),
            arg("to", "?"),
            arg("start", "step 0"),
            arg("end", "?"),
            arg("every", "100 steps"),
            arg("curve", "cubic")
        );
    }
    let last = p
        .sparsities
        .last()
        .copied()
        .or_else(|| gradual.and_then(|g| g.arg("to")?.as_f64()));
    if let (Some(unit), Some(m)) = (p.unit, step.model.as_ref()) {
        if let Some(c) = lms.get_mut(m) {
            out.push_str(&llm_units_table(c, unit, last));
        }
        if let Some(info) = infos.get_mut(m) {
            out.push_str(&units_table(r, stage, info, unit, p.scope, last));
        }
        return;
    }
    if let Some(info) = step.model.as_ref().and_then(|m| infos.get(m)) {
        out.push_str(&prune_table(r, stage, info, p.scope, p.pattern, last));
    }
}

fn data_line(v: Option<&Value>, ctor: &str) -> String {
    let Some(v) = v else { return ctor.to_string() };
    let split = v.arg("split").and_then(|s| s.as_str()).unwrap_or("train");
    let path = v.arg("path").and_then(|p| p.as_str()).unwrap_or("");
    format!(
        "{ctor}(\"{path}\") {split} split, batch {}",
        v.arg("batch").map(|b| b.to_string()).unwrap_or_default()
    )
}

/// The layers a `unit = ...` stage shrinks and the widths it leaves; per
/// layer those are known now, and later steps see the smaller model.
fn units_table(
    r: &CheckedRecipe,
    stage: &prunec_lang::ast::Stage,
    info: &mut ModelInfo,
    unit: prunec_lang::resolved::Unit,
    scope: Scope,
    last: Option<f64>,
) -> String {
    let Some(arch) = info.arch.clone() else {
        return String::new();
    };
    let targets = r.option(stage, "targets").map(|v| strings(Some(v)));
    let skip = strings(r.option(stage, "skip"));
    let Ok(layers) = crate::units::unit_targets(&arch, targets.as_deref(), &skip, unit) else {
        return String::new();
    };
    let mut out = format!("       | layer | {unit}s | kept |\n");
    let mut kept = BTreeMap::new();
    for u in &layers {
        let k = match (scope, last) {
            (Scope::Global, Some(s)) => {
                format!(
                    "{:.2}% of all targeted {unit}s overall; per layer decided at run time",
                    100.0 * (1.0 - s)
                )
            }
            (_, Some(s)) => {
                let k = crate::units::kept_per_layer(u.units, s);
                kept.insert(u.layer.clone(), k);
                k.to_string()
            }
            (_, None) => "decided at run time".into(),
        };
        let _ = writeln!(out, "       | {} | {} | {k} |", u.layer, u.units);
    }
    if scope != Scope::Global && kept.len() == layers.len() {
        if let Ok(small) = arch.with_units(&kept) {
            let before: usize = info.shapes.iter().map(|(_, s)| numel(s)).sum();
            let (fd, _) = flops(info, &BTreeMap::new());
            *info = info_of(Some(small.clone()), small.param_shapes());
            let after: usize = info.shapes.iter().map(|(_, s)| numel(s)).sum();
            let (fa, _) = flops(info, &BTreeMap::new());
            let _ = writeln!(
                out,
                "       parameters {before} → {after}, forward FLOPs {fd} → {fa} (the model shrinks)"
            );
        }
    }
    out
}

fn prune_table(
    r: &CheckedRecipe,
    stage: &prunec_lang::ast::Stage,
    info: &ModelInfo,
    scope: Scope,
    pattern: Option<Pattern>,
    last: Option<f64>,
) -> String {
    let targets = match r.option(stage, "targets") {
        Some(v) => strings(Some(v)),
        None => vec!["*.weight".into()],
    };
    let skip = strings(r.option(stage, "skip"));
    let selected: Vec<&(String, Vec<usize>)> = info
        .shapes
        .iter()
        .filter(|(n, _)| {
            targets.iter().any(|t| glob_match(t, n)) && !skip.iter().any(|k| glob_match(k, n))
        })
        .collect();
    let mut out = String::from("       | parameter | shape | weights | target sparsity |\n");
    let mut kept = BTreeMap::new();
    for (n, shape) in &selected {
        let target = match (pattern, last) {
            (Some(p @ Pattern::NM { .. }), Some(s)) => format!("{:.2}% ({p})", s * 100.0),
            (Some(p), Some(s)) => format!("{:.2}% of its blocks ({p})", s * 100.0),
            (None, Some(s)) if scope == Scope::Global => {
                format!("{:.2}% overall; per layer decided at run time", s * 100.0)
            }
            (None, Some(s)) => format!("{:.2}% ({scope})", s * 100.0),
            (_, None) => "decided at run time".into(),
        };
        let frac = last.map_or(1.0, |s| 1.0 - s);
        kept.insert(n.clone(), frac);
        let _ = writeln!(
            out,
            "       | {n} | {shape:?} | {} | {target} |",
            numel(shape)
        );
    }
    let total: usize = info.shapes.iter().map(|(_, s)| numel(s)).sum();
    let after: f64 = info
        .shapes
        .iter()
        .map(|(n, s)| numel(s) as f64 * kept.get(n).copied().unwrap_or(1.0))
        .sum();
    let (fd, fa) = flops(info, &kept);
    let guard = match r.option(stage, "keep_min") {
        Some(v) => format!("; keep_min {v}"),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "       parameters {total} → {:.0}, forward FLOPs {fd} → {fa}{}{guard}",
        after,
        if scope == Scope::Global && pattern.is_none() {
            " (at uniform sparsity)"
        } else {
            ""
        }
    );
    out
}
