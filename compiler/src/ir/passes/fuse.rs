//! Fusion of score → select → mask into one kernel node.

use super::rebuild;
use crate::ir::{Flow, Ir, Node, Op};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use prunec_lang::CheckedRecipe;
use std::collections::BTreeMap;

/// Fuses score → select → mask into one kernel node when the criterion
/// compiles to a kernel expression and the selection is one the kernels run.
pub fn fuse(ir: &mut Ir, r: &CheckedRecipe) {
    let mut redirect = BTreeMap::new();
    let mut fused = Vec::new();
    for score in ir.graph.node_indices() {
        let Op::Score { criterion } = &ir.graph[score].op else {
            continue;
        };
        let Ok(kernel) = crate::lower::criterion_to_kernel(r, &criterion.expr) else {
            continue;
        };
        let Some(select) = ir
            .graph
            .edges_directed(score, Direction::Outgoing)
            .find(|e| *e.weight() == Flow::Scores)
            .map(|e| e.target())
        else {
            continue;
        };
        // Removing units shrinks the model: no fused mask kernel.
        let Op::Select {
            scope,
            pattern,
            sparsities,
            unit: None,
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
                kernel,
                scope,
                pattern,
                sparsities,
            },
        ));
    }
    for (score, select, mask, op) in fused {
        // The mask node becomes the fused node; score and select fold into it.
        let (span, stage) = (ir.graph[select].span, ir.graph[select].stage);
        ir.graph[mask] = Node { op, span, stage };
        redirect.insert(score, mask);
        redirect.insert(select, mask);
    }
    if !redirect.is_empty() {
        let removed = redirect.clone();
        rebuild(ir, |n| !removed.contains_key(&n), &redirect);
    }
}
