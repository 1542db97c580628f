//! Common-subexpression elimination of gradient and calibration passes.

use super::{model_source, rebuild};
use crate::ir::{Ir, Op};
use petgraph::graph::NodeIndex;
use petgraph::visit::EdgeRef;
use prunec_lang::CheckedRecipe;
use std::collections::BTreeMap;

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
        // The data's source too: a data set pruned in between is other data.
        let data = ir
            .graph
            .edges_directed(n, petgraph::Direction::Incoming)
            .find(|e| *e.weight() == crate::ir::Flow::Data)
            .map(|e| e.source().index());
        let k = (
            model_source(ir, n).map(|m| m.index()),
            format!("{key} {data:?}"),
        );
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
