//! `prunec plan`: the resolved plan of a recipe from model and data file
//! headers only — per-layer targets, parameter and FLOP counts before and
//! after, and the data each stage reads.

use crate::exec::{model_spec, RunError};
use crate::ir::{Ir, Op};
use crate::lower::{glob_match, strings};
use prunec_lang::check::{SymKind, Value};
use prunec_lang::CheckedRecipe;
use prunec_runtime as rt;
use std::collections::BTreeMap;
use std::fmt::Write as _;

struct ModelInfo {
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
    let positions = match spec.resolve_architecture().and_then(|a| a.shape_check()) {
        Ok((costs, _)) => costs.into_iter().map(|c| (c.weight, c.positions)).collect(),
        Err(_) => BTreeMap::new(),
    };
    Ok(ModelInfo { shapes, positions })
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

/// Renders the plan of an optimized IR.
pub fn render(r: &CheckedRecipe, ir: &Ir) -> Result<String, RunError> {
    let mut out = format!("recipe {} (seed {})\n\n", r.name, r.seed);
    let mut infos = BTreeMap::new();
    for (name, sym) in &r.symbols {
        match sym.kind {
            SymKind::Model => {
                let ctor = sym
                    .value
                    .as_ref()
                    .and_then(|v| v.call_name())
                    .unwrap_or("?");
                if ctor == "gguf" {
                    let _ = writeln!(out, "model {name}: gguf language model (its shapes are not listed by `plan` yet)");
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
    out.push_str("\nstages (optimized IR):\n");
    let mut i = 0;
    for n in ir.graph.node_indices() {
        let node = &ir.graph[n];
        if matches!(node.op, Op::LoadModel { .. } | Op::LoadData { .. }) {
            continue;
        }
        i += 1;
        let (line, _) = prunec_lang::diag::line_col(&r.source, node.span.start);
        let _ = writeln!(out, "{i:>3}. [line {line}] {}", op_line(&node.op));
        if let Op::FusedPrune {
            scope,
            pattern,
            sparsities,
            ..
        }
        | Op::Select {
            scope,
            pattern,
            sparsities,
            ..
        } = &node.op
        {
            // The prune stage this node came from.
            let stage = r
                .pipeline()
                .stages
                .iter()
                .chain(
                    r.pipeline()
                        .stages
                        .iter()
                        .flat_map(|s| s.block.iter().flat_map(|b| b.stages.iter())),
                )
                .find(|s| s.span == node.span);
            if let Some(stage) = stage {
                let model = stage
                    .subject
                    .first()
                    .and_then(|e| e.as_name())
                    .map(|n| n.name.clone())
                    .unwrap_or_default();
                // A gradual schedule's final target, and when it prunes.
                let sched = r.option(stage, "schedule").map(|v| match v {
                    Value::Ref(name) => r
                        .symbols
                        .get(name)
                        .and_then(|s| s.value.clone())
                        .unwrap_or_else(|| v.clone()),
                    other => other.clone(),
                });
                let gradual = sched.filter(|v| v.call_name() == Some("gradual"));
                if let Some(g) = &gradual {
                    let arg = |k: &str, d: &str| {
                        g.arg(k).map(|v| v.to_string()).unwrap_or_else(|| d.into())
                    };
                    let _ = writeln!(
                        out,
                        "       gradual: from {} to {} between {} and {}, every {} ({}), during the training stage",
                        arg("from", "0%"),
                        arg("to", "?"),
                        arg("start", "step 0"),
                        arg("end", "?"),
                        arg("every", "100 steps"),
                        arg("curve", "cubic")
                    );
                }
                let last = sparsities
                    .last()
                    .copied()
                    .or_else(|| gradual.as_ref().and_then(|g| g.arg("to")?.as_f64()));
                if let Some(info) = infos.get(&model) {
                    out.push_str(&prune_table(r, stage, info, scope, *pattern, last));
                }
            }
        }
    }
    Ok(out)
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

fn op_line(op: &Op) -> String {
    match op {
        Op::FusedPrune {
            criterion,
            scope,
            pattern,
            sparsities,
        } => {
            let sel = match pattern {
                Some((n, m)) => format!("{n}:{m}"),
                None => format!("{scope} scope"),
            };
            let rounds: Vec<String> = sparsities
                .iter()
                .map(|s| format!("{:.2}%", s * 100.0))
                .collect();
            if rounds.is_empty() {
                format!(
                    "prune by `{criterion}` ({sel}), one fused kernel per round or pruning step"
                )
            } else {
                format!("prune by `{criterion}` ({sel}), one fused kernel per round; sparsity after each round: {}", rounds.join(", "))
            }
        }
        other => other.label(),
    }
}

fn prune_table(
    r: &CheckedRecipe,
    stage: &prunec_lang::ast::Stage,
    info: &ModelInfo,
    scope: &str,
    pattern: Option<(u64, u64)>,
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
            (Some((k, m)), _) => format!("{:.2}% ({k}:{m})", 100.0 * (1.0 - k as f64 / m as f64)),
            (None, Some(s)) if scope == "global" => {
                format!("{:.2}% overall; per layer decided at run time", s * 100.0)
            }
            (None, Some(s)) => format!("{:.2}% ({scope})", s * 100.0),
            (None, None) => "decided at run time".into(),
        };
        let frac = match (pattern, last) {
            (Some((k, m)), _) => k as f64 / m as f64,
            (None, Some(s)) => 1.0 - s,
            _ => 1.0,
        };
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
        if scope == "global" && pattern.is_none() {
            " (at uniform sparsity)"
        } else {
            ""
        }
    );
    out
}
