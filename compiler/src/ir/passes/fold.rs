//! Constant folding: params into prune targets, schedules into per-round sparsities.

use crate::ir::{Ir, Op};
use prunec_lang::ast::{BinaryOp, ExprKind, UnaryOp};
use prunec_lang::CheckedRecipe;

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
