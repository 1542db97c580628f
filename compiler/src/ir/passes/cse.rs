//! Common-subexpression elimination of gradient and calibration passes.

use super::{model_source, rebuild};
use crate::ir::{Ir, Op};
use petgraph::graph::NodeIndex;
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
