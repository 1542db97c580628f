//! Constant folding: params into prune targets, schedules into per-round sparsities.

use crate::ir::{Ir, Op};
use prunec_lang::CheckedRecipe;

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
            if let Some(fixed) = pattern.and_then(|p| p.fixed_sparsity()) {
                *sparsities = vec![fixed];
            } else if let Some(s) = target.as_ref().and_then(|t| r.constant(&t.expr)) {
                let rr = *rounds as f64;
                *sparsities = (1..=*rounds)
                    .map(|i| 1.0 - (1.0 - s).powf(i as f64 / rr))
                    .collect();
            }
        }
    }
}
