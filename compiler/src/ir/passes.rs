//! IR passes, one function each: constant folding of targets and schedules,
//! common-subexpression elimination of calibration and gradient passes,
//! fusion of score → select → mask, and dead-node elimination. `optimize`
//! runs them in order and verifies the IR after each in debug builds.

use super::{verify, Flow, Ir, Node, Op};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use prunec_lang::ast::{BinaryOp, ExprKind, UnaryOp};
use prunec_lang::CheckedRecipe;
use std::collections::BTreeMap;

/// Runs every pass.
pub fn optimize(ir: &mut Ir, r: &CheckedRecipe) -> Result<(), String> {
    for (name, pass) in [
        ("fold", fold as fn(&mut Ir, &CheckedRecipe)),
        ("cse", cse),
        ("fuse", fuse),
        ("dce", dce),
    ] {
        pass(ir, r);
        if cfg!(debug_assertions) {
            verify(ir).map_err(|e| format!("after the `{name}` pass: {e}"))?;
        }
    }
    Ok(())
}

/// Evaluates a constant target such as `92%`, `target` or `1 - keep`.
fn constant(r: &CheckedRecipe, text: &str) -> Option<f64> {
    fn eval(r: &CheckedRecipe, e: &prunec_lang::ast::Expr) -> Option<f64> {
        Some(match &e.kind {
            ExprKind::Number { value, .. } | ExprKind::Percent { value, .. } => *value,
            ExprKind::Paren(i) => eval(r, i)?,
            ExprKind::Unary {
                op: UnaryOp::Neg,
                operand,
            } => -eval(r, operand)?,
            ExprKind::Name(id) => r.param(&id.name)?.as_f64()?,
            ExprKind::Binary { op, lhs, rhs } => {
                let (a, b) = (eval(r, lhs)?, eval(r, rhs)?);
                match op {
                    BinaryOp::Add => a + b,
                    BinaryOp::Sub => a - b,
                    BinaryOp::Mul => a * b,
                    BinaryOp::Div => a / b,
                    BinaryOp::Pow => a.powf(b),
                    _ => return None,
                }
            }
            _ => return None,
        })
    }
    eval(r, &prunec_lang::parse::source_to_expr(text).ok()?)
}

/// Folds params into prune targets and expands schedules: the sparsity
/// after every round is known before running (IMP removes the same fraction
/// of the survivors each round; N:M is exactly 1 - N/M).
pub fn fold(ir: &mut Ir, r: &CheckedRecipe) {
    for n in ir.graph.node_indices() {
        if let Op::Select {
            pattern,
            target,
            sparsities,
            rounds,
            ..
        } = &mut ir.graph[n].op
        {
            if let Some((k, m)) = pattern {
                *sparsities = vec![1.0 - *k as f64 / *m as f64];
            } else if let Some(s) = target.as_deref().and_then(|t| constant(r, t)) {
                let rr = *rounds as f64;
                *sparsities = (1..=*rounds)
                    .map(|i| 1.0 - (1.0 - s).powf(i as f64 / rr))
                    .collect();
            }
        }
    }
}

/// Rebuilds the graph keeping nodes where `keep` holds, sending the edges of
/// a removed node that `redirect` maps to its replacement, dropping edges
/// that would duplicate one already present.
fn rebuild(
    ir: &mut Ir,
    keep: impl Fn(NodeIndex) -> bool,
    redirect: &BTreeMap<NodeIndex, NodeIndex>,
) {
    let old = &ir.graph;
    let mut g: DiGraph<Node, Flow> = DiGraph::new();
    let mut map = BTreeMap::new();
    for n in old.node_indices().filter(|n| keep(*n)) {
        map.insert(n, g.add_node(old[n].clone()));
    }
    let resolve = |n: NodeIndex| -> Option<NodeIndex> {
        let mut n = n;
        while let Some(&m) = redirect.get(&n) {
            n = m;
        }
        map.get(&n).copied()
    };
    for e in old.edge_references() {
        if let (Some(a), Some(b)) = (resolve(e.source()), resolve(e.target())) {
            if a != b && !g.edges_connecting(a, b).any(|x| x.weight() == e.weight()) {
                g.add_edge(a, b, *e.weight());
            }
        }
    }
    ir.graph = g;
}

fn model_source(ir: &Ir, n: NodeIndex) -> Option<NodeIndex> {
    ir.graph
        .edges_directed(n, Direction::Incoming)
        .find(|e| *e.weight() == Flow::Model)
        .map(|e| e.source())
}

/// Merges gradient and calibration passes that read the same model state
/// and the same data: two criteria that need the same statistics share one
/// pass over the data.
pub fn cse(ir: &mut Ir, _r: &CheckedRecipe) {
    let mut seen: BTreeMap<(Option<usize>, String), NodeIndex> = BTreeMap::new();
    let mut redirect = BTreeMap::new();
    for n in ir.graph.node_indices() {
        let key = match &ir.graph[n].op {
            Op::Gradients { data } => format!("grad {data}"),
            Op::Calibrate { data, hessian } => format!("calib {data} {hessian}"),
            _ => continue,
        };
        let k = (model_source(ir, n).map(|m| m.index()), key);
        match seen.get(&k) {
            Some(&first) => {
                redirect.insert(n, first);
            }
            None => {
                seen.insert(k, n);
            }
        }
    }
    if !redirect.is_empty() {
        let removed = redirect.clone();
        rebuild(ir, |n| !removed.contains_key(&n), &redirect);
    }
}

/// Fuses score → select → mask into one kernel node when the criterion
/// compiles to a kernel expression and the selection is one the kernels run.
pub fn fuse(ir: &mut Ir, r: &CheckedRecipe) {
    let mut redirect = BTreeMap::new();
    let mut fused = Vec::new();
    for score in ir.graph.node_indices() {
        let Op::Score { criterion } = &ir.graph[score].op else {
            continue;
        };
        let Ok(expr) = prunec_lang::parse::source_to_expr(criterion) else {
            continue;
        };
        if crate::lower::criterion_to_kexpr(r, &expr).is_err() {
            continue;
        }
        let Some(select) = ir
            .graph
            .edges_directed(score, Direction::Outgoing)
            .find(|e| *e.weight() == Flow::Scores)
            .map(|e| e.target())
        else {
            continue;
        };
        let Op::Select {
            scope,
            pattern,
            sparsities,
            ..
        } = ir.graph[select].op.clone()
        else {
            continue;
        };
        let Some(mask) = ir
            .graph
            .edges_directed(select, Direction::Outgoing)
            .find(|e| *e.weight() == Flow::Mask)
            .map(|e| e.target())
        else {
            continue;
        };
        fused.push((
            score,
            select,
            mask,
            Op::FusedPrune {
                criterion: criterion.clone(),
                scope,
                pattern,
                sparsities,
            },
        ));
    }
    for (score, select, mask, op) in fused {
        // The mask node becomes the fused node; score and select fold into it.
        let span = ir.graph[select].span;
        ir.graph[mask] = Node { op, span };
        redirect.insert(score, mask);
        redirect.insert(select, mask);
    }
    if !redirect.is_empty() {
        let removed = redirect.clone();
        rebuild(ir, |n| !removed.contains_key(&n), &redirect);
    }
}

/// Drops declarations nothing reads (a dataset or model no stage uses).
pub fn dce(ir: &mut Ir, _r: &CheckedRecipe) {
    let dead: Vec<NodeIndex> = ir
        .graph
        .node_indices()
        .filter(|&n| matches!(ir.graph[n].op, Op::LoadData { .. } | Op::LoadModel { .. }))
        .filter(|&n| {
            ir.graph
                .edges_directed(n, Direction::Outgoing)
                .next()
                .is_none()
        })
        .collect();
    if !dead.is_empty() {
        rebuild(ir, |n| !dead.contains(&n), &BTreeMap::new());
    }
}
