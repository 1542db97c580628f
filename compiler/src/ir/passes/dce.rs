//! Dead-node elimination: what no output or assert needs.

use super::rebuild;
use crate::ir::{Flow, Ir, Op};
use petgraph::graph::NodeIndex;
use petgraph::Direction;
use prunec_lang::CheckedRecipe;
use std::collections::BTreeMap;

/// Drops declarations nothing reads (a dataset or model no stage uses) and
/// calibration passes whose statistics no prune reads (a `calibrate` stage
/// followed by criteria that read no activations, or that calibrate on data
/// of their own). Every other stage changes a model or writes to the report.
pub fn dce(ir: &mut Ir, _r: &CheckedRecipe) {
    // Until nothing changes: a data set only a dropped calibration read is dead too.
    loop {
        let dead: Vec<NodeIndex> = ir
            .graph
            .node_indices()
            .filter(|&n| match ir.graph[n].op {
                Op::LoadData { .. } | Op::LoadModel { .. } => ir
                    .graph
                    .edges_directed(n, Direction::Outgoing)
                    .next()
                    .is_none(),
                Op::Calibrate { .. } => !ir
                    .graph
                    .edges_directed(n, Direction::Outgoing)
                    .any(|e| *e.weight() == Flow::Stats),
                _ => false,
            })
            .collect();
        if dead.is_empty() {
            return;
        }
        rebuild(ir, |n| !dead.contains(&n), &BTreeMap::new());
    }
}
