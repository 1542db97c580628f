//! IR passes, one module each: constant folding of targets and schedules
//! (`fold`), common-subexpression elimination of calibration and gradient
//! passes (`cse`), fusion of score → select → mask (`fuse`) and dead-node
//! elimination (`dce`). `optimize` runs them in order and verifies the IR
//! after each in debug builds.

mod cse;
mod dce;
mod fold;
mod fuse;

pub use cse::cse;
pub use dce::dce;
pub use fold::fold;
pub use fuse::fuse;

use super::{verify, Flow, Ir, Node};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
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

/// Rebuilds the graph keeping nodes where `keep` holds, sending the edges of
/// a removed node that `redirect` maps to its replacement, dropping edges
/// that would duplicate one already present.
pub(super) fn rebuild(
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

/// The node holding the model state `n` reads.
pub(super) fn model_source(ir: &Ir, n: NodeIndex) -> Option<NodeIndex> {
    ir.graph
        .edges_directed(n, Direction::Incoming)
        .find(|e| *e.weight() == Flow::Model)
        .map(|e| e.source())
}
