//! Dead-node elimination: declarations nothing reads.

use super::rebuild;
use crate::ir::{Ir, Op};
use petgraph::graph::NodeIndex;
use petgraph::Direction;
use prunec_lang::CheckedRecipe;
use std::collections::BTreeMap;

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
