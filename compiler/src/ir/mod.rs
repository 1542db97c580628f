//! The pipeline IR: a petgraph DAG of load, calibrate, score, select, mask,
//! train, evaluate, assert, export and report nodes; every node keeps the
//! recipe span it came from. `checked_to_ir` lowers, `passes` optimize,
//! `verify` checks the invariants, `to_dot` and `to_text` print it.

pub mod passes;

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use prunec_lang::ast::{Expr, ExprKind, Stage, StageKind};
use prunec_lang::check::{SymKind, Value};
use prunec_lang::resolved::{DataScore, Method, Metric, Pattern, Schedule, Scope, Unit};
use prunec_lang::{CheckedRecipe, Span};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// An expression of the recipe as the checker saw it, with its source text
/// for printing: passes work on `expr` and never parse `text` again.
#[derive(Clone, Debug, PartialEq)]
pub struct Written {
    pub expr: Expr,
    pub text: String,
}

impl std::fmt::Display for Written {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// What a node does.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    LoadModel {
        name: String,
        ctor: String,
    },
    LoadData {
        name: String,
        ctor: String,
    },
    /// Loss gradients of every targeted weight over `batches` batches.
    Gradients {
        data: String,
    },
    /// Per-input-column activation statistics (and Hessians for solvers).
    Calibrate {
        data: String,
        hessian: bool,
    },
    Score {
        criterion: Written,
    },
    /// `sparsities` is the target after each round, known before running once folded.
    Select {
        scope: Scope,
        pattern: Option<Pattern>,
        target: Option<Written>,
        sparsities: Vec<f64>,
        rounds: usize,
        /// Whole units are selected (`unit = ...`), not single weights.
        unit: Option<Unit>,
    },
    /// Removes the selected units and their dependent parameters: the
    /// model becomes smaller (in place of `Mask` for `unit = ...`).
    RemoveUnits {
        unit: Unit,
    },
    Mask,
    /// Score, select and mask fused into one kernel: the criterion as
    /// written and lowered to the kernel expression that runs.
    FusedPrune {
        criterion: Written,
        kernel: crate::lower::LoweredCriterion,
        scope: Scope,
        pattern: Option<Pattern>,
        sparsities: Vec<f64>,
    },
    Reconstruct {
        method: Method,
    },
    /// A study of the model's state (it is not changed) whose results go
    /// to the report: `analysis` is the call as written.
    Analyze {
        analysis: Written,
        data: String,
    },
    /// A data set keeps the samples a per-sample score ranks best: the
    /// data set's later readers read what it leaves.
    PruneData {
        data: String,
        score: DataScore,
        /// The model that scores (none for `random`).
        model: Option<String>,
    },
    Train {
        kind: StageKind,
        data: String,
    },
    Evaluate {
        data: String,
        metrics: Vec<Metric>,
        label: Option<String>,
        /// `kv_budget` / `kv_policy`: perplexity decoded with a bounded cache.
        kv: Option<KvCache>,
    },
    Assert {
        condition: Written,
    },
    /// `path`: the string as given, relative to the output folder.
    Export {
        path: String,
    },
    /// The metrics plotted per round, and the plot's path.
    Report {
        metrics: Vec<String>,
        path: Option<String>,
    },
}

/// Which pipeline stage a node belongs to: its position among the
/// pipeline's stages, and inside that stage's round block (or, one past
/// the block, the training a gradual prune runs `during`).
/// An evaluation's bounded key-value cache: the share of each window a
/// query may attend to and the policy choosing the kept tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct KvCache {
    pub budget: f64,
    pub policy: String,
}

impl KvCache {
    /// ` (kv_budget = 25%, kv_policy = h2o)`, for plans.
    pub fn text(&self) -> String {
        format!(
            " (kv_budget = {:.2}%, kv_policy = {})",
            self.budget * 100.0,
            self.policy
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StageRef {
    pub top: usize,
    pub inner: Option<usize>,
}

impl StageRef {
    /// The stage itself in the checked recipe.
    pub fn stage(self, r: &CheckedRecipe) -> Option<&Stage> {
        let s = r.pipeline().stages.get(self.top)?;
        match self.inner {
            None => Some(s),
            Some(j) => {
                let block = s.block.as_ref().map_or(&[][..], |b| &b.stages[..]);
                match block.get(j) {
                    Some(inner) => Some(inner),
                    None if j == block.len() => s.during.as_deref(),
                    None => None,
                }
            }
        }
    }
}

/// A node: an operation, the recipe span it came from and the pipeline
/// stage it belongs to (none for declarations).
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub span: Span,
    pub stage: Option<StageRef>,
}

/// What flows along an edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// The model's state, threaded through every stage that reads or changes it.
    Model,
    Data,
    Stats,
    Scores,
    Mask,
}

/// The IR of one recipe.
#[derive(Clone, Debug)]
pub struct Ir {
    pub graph: DiGraph<Node, Flow>,
}

impl Op {
    /// A one-line description.
    pub fn label(&self) -> String {
        match self {
            Op::LoadModel { name, ctor } => format!("load model {name} = {ctor}(..)"),
            Op::LoadData { name, ctor } => format!("load data {name} = {ctor}(..)"),
            Op::Gradients { data } => format!("gradients on {data}"),
            Op::Calibrate { data, hessian } => format!(
                "calibrate on {data}{}",
                if *hessian { " (+hessian)" } else { "" }
            ),
            Op::Score { criterion } => format!("score {criterion}"),
            Op::Select {
                scope,
                pattern,
                target,
                sparsities,
                rounds,
                unit,
            } => {
                let to = target.as_ref().map_or("?", |t| t.text.as_str());
                let what = match (pattern, unit) {
                    (Some(p @ Pattern::NM { .. }), _) => p.to_string(),
                    (Some(p), _) => format!("{p} to {to}"),
                    (None, Some(u)) => format!("{u}s, {scope} to {to}"),
                    (None, None) => format!("{scope} to {to}"),
                };
                if sparsities.is_empty() {
                    format!("select {what}, {rounds} round(s)")
                } else {
                    format!("select {what}, rounds at {}", fmt_fracs(sparsities))
                }
            }
            Op::Mask => "mask".to_string(),
            Op::RemoveUnits { unit } => format!("remove {unit}s (the model shrinks)"),
            Op::FusedPrune {
                criterion,
                scope,
                pattern,
                sparsities,
                ..
            } => {
                let what = match pattern {
                    Some(p) => p.to_string(),
                    None => scope.to_string(),
                };
                format!(
                    "fused score+select+mask {criterion} ({what}) at {}",
                    fmt_fracs(sparsities)
                )
            }
            Op::Reconstruct { method } => format!("reconstruct ({method:?})"),
            Op::Analyze { analysis, data } => format!("analyze on {data} by {analysis}"),
            Op::PruneData { data, score, model } => format!(
                "prune data {data} by {}({})",
                score.name(),
                model.as_deref().unwrap_or("")
            ),
            Op::Train { kind, data } => format!("{kind} on {data}"),
            Op::Evaluate {
                data,
                metrics,
                label,
                kv,
            } => {
                format!(
                    "evaluate on {data} -> [{}]{}{}",
                    metrics
                        .iter()
                        .map(|m| m.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    label
                        .as_ref()
                        .map(|l| format!(" as {l}"))
                        .unwrap_or_default(),
                    kv.as_ref().map(KvCache::text).unwrap_or_default()
                )
            }
            Op::Assert { condition } => format!("assert {condition}"),
            Op::Export { path } => format!("export to {path:?}"),
            Op::Report { metrics, path } => report_text(metrics, path.as_deref()),
        }
    }
}

fn fmt_fracs(v: &[f64]) -> String {
    let parts: Vec<String> = v.iter().map(|s| format!("{:.2}%", s * 100.0)).collect();
    format!("[{}]", parts.join(", "))
}

impl Ir {
    /// A stable text dump, one node per line in index order, with its inputs.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for n in self.graph.node_indices() {
            let node = &self.graph[n];
            let mut ins: Vec<String> = self
                .graph
                .edges_directed(n, Direction::Incoming)
                .map(|e| format!("{:?} from %{}", e.weight(), e.source().index()))
                .collect();
            ins.sort();
            let _ = writeln!(
                out,
                "%{} = {}  @{}..{}{}",
                n.index(),
                node.op.label(),
                node.span.start,
                node.span.end,
                if ins.is_empty() {
                    String::new()
                } else {
                    format!("  <- {}", ins.join(", "))
                }
            );
        }
        out
    }

    /// Graphviz DOT.
    pub fn to_dot(&self, title: &str) -> String {
        let mut out = format!(
            "digraph \"{}\" {{\n  rankdir=TB;\n  node [shape=box, fontname=\"monospace\"];\n",
            title.replace('"', "'")
        );
        for n in self.graph.node_indices() {
            let label = self.graph[n]
                .op
                .label()
                .replace('\\', "\\\\")
                .replace('"', "\\\"");
            let _ = writeln!(out, "  n{} [label=\"{}\"];", n.index(), label);
        }
        for e in self.graph.edge_references() {
            let style = match e.weight() {
                Flow::Model => "solid",
                Flow::Data => "dashed",
                _ => "bold",
            };
            let _ = writeln!(
                out,
                "  n{} -> n{} [label=\"{:?}\", style={style}];",
                e.source().index(),
                e.target().index(),
                e.weight()
            );
        }
        out.push_str("}\n");
        out
    }
}

struct Lowerer<'a> {
    r: &'a CheckedRecipe,
    g: DiGraph<Node, Flow>,
    /// The latest node holding each model's state.
    model_head: BTreeMap<String, NodeIndex>,
    data: BTreeMap<String, NodeIndex>,
    src: &'a str,
    /// The stage being lowered.
    at: Option<StageRef>,
    /// The latest `calibrate` stage's node of each model: a prune whose
    /// criterion reads activations without data of its own reads them.
    calibrations: BTreeMap<String, NodeIndex>,
}

/// Lowers a checked recipe to the IR, one chain of model-state edges per model.
pub fn checked_to_ir(r: &CheckedRecipe, src: &str) -> Ir {
    let mut l = Lowerer {
        r,
        g: DiGraph::new(),
        model_head: BTreeMap::new(),
        data: BTreeMap::new(),
        src,
        at: None,
        calibrations: BTreeMap::new(),
    };
    for (name, sym) in &r.symbols {
        let ctor = sym
            .value
            .as_ref()
            .and_then(|v| v.call_name())
            .unwrap_or("?")
            .to_string();
        match sym.kind {
            SymKind::Model => {
                let n = l.g.add_node(Node {
                    op: Op::LoadModel {
                        name: name.clone(),
                        ctor,
                    },
                    span: sym.span,
                    stage: None,
                });
                l.model_head.insert(name.clone(), n);
            }
            SymKind::Dataset => {
                let n = l.g.add_node(Node {
                    op: Op::LoadData {
                        name: name.clone(),
                        ctor,
                    },
                    span: sym.span,
                    stage: None,
                });
                l.data.insert(name.clone(), n);
            }
            _ => {}
        }
    }
    for (top, s) in r.pipeline().stages.iter().enumerate() {
        l.at = Some(StageRef { top, inner: None });
        l.stage(s);
    }
    Ir { graph: l.g }
}

impl Lowerer<'_> {
    /// The text of a name or expression as written (node labels).
    fn text(&self, e: &Expr) -> String {
        self.src
            .get(e.span.start..e.span.end)
            .unwrap_or("?")
            .to_string()
    }

    fn written(&self, e: &Expr) -> Written {
        Written {
            expr: e.clone(),
            text: self.text(e),
        }
    }

    fn name_of(e: Option<&Expr>) -> String {
        e.and_then(|e| e.as_name())
            .map(|n| n.name.clone())
            .unwrap_or_default()
    }

    /// Adds a node fed by the model's current state (and optionally data); it becomes the new head.
    fn on_model(
        &mut self,
        model: &str,
        node: Node,
        data: Option<&str>,
        advances: bool,
    ) -> NodeIndex {
        let n = self.g.add_node(node);
        if let Some(&h) = self.model_head.get(model) {
            self.g.add_edge(h, n, Flow::Model);
        }
        if let Some(d) = data.and_then(|d| self.data.get(d)) {
            self.g.add_edge(*d, n, Flow::Data);
        }
        if advances {
            self.model_head.insert(model.to_string(), n);
        }
        n
    }

    fn option(&self, s: &Stage, key: &str) -> Option<Value> {
        self.r.option(s, key).cloned()
    }

    fn stage(&mut self, s: &Stage) {
        let model = Self::name_of(s.subject.first());
        match s.kind {
            StageKind::Train | StageKind::Finetune | StageKind::Calibrate => {
                let data = Self::name_of(s.on.as_ref());
                // Calibration reads the model; training changes it.
                let calibrate = s.kind == StageKind::Calibrate;
                let op = if calibrate {
                    Op::Calibrate {
                        data: data.clone(),
                        hessian: false,
                    }
                } else {
                    Op::Train {
                        kind: s.kind,
                        data: data.clone(),
                    }
                };
                let n = self.on_model(
                    &model,
                    Node {
                        op,
                        span: s.span,
                        stage: self.at,
                    },
                    Some(&data),
                    !calibrate,
                );
                if calibrate {
                    self.calibrations.insert(model.clone(), n);
                }
            }
            StageKind::Prune if self.r.is_data_prune(s) => self.prune_data(s, &model),
            StageKind::Analyze => {
                let data = Self::name_of(s.on.as_ref());
                let Some(by) = s.by.as_ref() else { return };
                let analysis = self.written(by);
                // Data sets named in the call (`test = D`) flow in too.
                let mut named = Vec::new();
                if let ExprKind::Call { args, .. } = &by.kind {
                    for a in &args.items {
                        if let Some(id) = a.value.as_name() {
                            if self.data.contains_key(&id.name) {
                                named.push(id.name.clone());
                            }
                        }
                    }
                }
                let n = self.on_model(
                    &model,
                    Node {
                        op: Op::Analyze {
                            analysis,
                            data: data.clone(),
                        },
                        span: s.span,
                        stage: self.at,
                    },
                    Some(&data),
                    false,
                );
                for d in named.iter().filter(|d| **d != data) {
                    let src = self.data[d];
                    self.g.add_edge(src, n, Flow::Data);
                }
            }
            StageKind::Prune => self.prune(s, &model),
            StageKind::Evaluate => {
                let data = Self::name_of(s.on.as_ref());
                // The checker resolved every name to a built-in metric.
                let names: Vec<&Expr> = match s.out.as_ref() {
                    Some(Expr {
                        kind: ExprKind::List(items),
                        ..
                    }) => items.iter().collect(),
                    Some(e) => vec![e],
                    None => vec![],
                };
                let metrics = names
                    .into_iter()
                    .filter_map(|e| Metric::named(&e.as_name()?.name))
                    .collect();
                let label = s.label.as_ref().map(|l| l.name.clone());
                let kv = self
                    .option(s, "kv_budget")
                    .and_then(|v| v.as_f64())
                    .map(|budget| KvCache {
                        budget,
                        policy: self
                            .option(s, "kv_policy")
                            .and_then(|v| v.as_str().map(String::from))
                            .unwrap_or_else(|| "recent".into()),
                    });
                self.on_model(
                    &model,
                    Node {
                        op: Op::Evaluate {
                            data: data.clone(),
                            metrics,
                            label,
                            kv,
                        },
                        span: s.span,
                        stage: self.at,
                    },
                    Some(&data),
                    false,
                );
            }
            StageKind::Assert => {
                let Some(condition) = s.subject.first().map(|e| self.written(e)) else {
                    return;
                };
                self.g.add_node(Node {
                    op: Op::Assert { condition },
                    span: s.span,
                    stage: self.at,
                });
            }
            StageKind::Export => {
                let path = s.to.as_ref().and_then(string).unwrap_or_default();
                self.on_model(
                    &model,
                    Node {
                        op: Op::Export { path },
                        span: s.span,
                        stage: self.at,
                    },
                    None,
                    false,
                );
            }
            StageKind::Report => {
                // Metric names: every report is `per round`.
                let metrics = s
                    .subject
                    .iter()
                    .map(|e| match &e.kind {
                        ExprKind::Per { base, .. } => self.text(base),
                        _ => self.text(e),
                    })
                    .collect();
                let path = s.out.as_ref().and_then(string);
                self.g.add_node(Node {
                    op: Op::Report { metrics, path },
                    span: s.span,
                    stage: self.at,
                });
            }
        }
    }

    /// `prune DATA by SCORE(MODEL) to F`: the training it watches (for
    /// forgetting events) first, then the node that reads the model's state
    /// and the data set and becomes the data set's source for later stages.
    fn prune_data(&mut self, s: &Stage, data: &str) {
        let Some((score, model)) = s.by.as_ref().and_then(DataScore::of) else {
            return;
        };
        if let Some(d) = &s.during {
            let outer = self.at;
            self.at = outer.map(|a| StageRef {
                top: a.top,
                inner: Some(0),
            });
            self.stage(d);
            self.at = outer;
        }
        let node = Node {
            op: Op::PruneData {
                data: data.to_string(),
                score,
                model: model.clone(),
            },
            span: s.span,
            stage: self.at,
        };
        let n = match &model {
            Some(m) => self.on_model(m, node, Some(data), false),
            None => {
                let n = self.g.add_node(node);
                if let Some(&d) = self.data.get(data) {
                    self.g.add_edge(d, n, Flow::Data);
                }
                n
            }
        };
        self.data.insert(data.to_string(), n);
    }

    fn prune(&mut self, s: &Stage, model: &str) {
        let Some(by) = s.by.as_ref() else { return };
        let criterion = self.written(by);
        let method = Method::of(self.r, by);
        let needs = prunec_lang::check::expr_needs(self.r, by);
        let calib = match self.option(s, "calibrate") {
            Some(Value::Ref(d)) => Some(d),
            _ => {
                s.on.as_ref()
                    .and_then(|e| e.as_name())
                    .map(|n| n.name.clone())
            }
        };
        // Statistics first: they read the model's current state.
        let mut stats = Vec::new();
        // OBS methods read per-sample gradients themselves, each round.
        if needs.grad && !method.is_obs() {
            if let Some(d) =
                s.on.as_ref()
                    .and_then(|e| e.as_name())
                    .map(|n| n.name.clone())
            {
                stats.push(self.on_model(
                    model,
                    Node {
                        op: Op::Gradients { data: d.clone() },
                        span: by.span,
                        stage: self.at,
                    },
                    Some(&d),
                    false,
                ));
            }
        }
        if needs.activations {
            if let Some(d) = &calib {
                let hessian = matches!(method, Method::SparseGpt | Method::Armor);
                stats.push(self.on_model(
                    model,
                    Node {
                        op: Op::Calibrate {
                            data: d.clone(),
                            hessian,
                        },
                        span: by.span,
                        stage: self.at,
                    },
                    Some(d),
                    false,
                ));
            }
        }
        let unit = Unit::of(self.option(s, "unit").as_ref());
        let scope = Scope::of_stage(self.option(s, "scope").as_ref(), needs.activations, unit);
        let pattern = self.option(s, "pattern").as_ref().and_then(Pattern::of);
        let rounds = Schedule::of(self.r, s).rounds().unwrap_or(1);
        // `to 2:4` is the stage's N:M pattern (the checker records it so), not a fraction.
        let target =
            s.to.as_ref()
                .filter(|_| !matches!(pattern, Some(Pattern::NM { .. })))
                .map(|e| self.written(e));
        let score = self.on_model(
            model,
            Node {
                op: Op::Score {
                    criterion: criterion.clone(),
                },
                span: by.span,
                stage: self.at,
            },
            None,
            false,
        );
        for st in stats {
            self.g.add_edge(st, score, Flow::Stats);
        }
        if needs.activations && calib.is_none() {
            // The statistics of the model's latest `calibrate` stage.
            if let Some(&c) = self.calibrations.get(model) {
                self.g.add_edge(c, score, Flow::Stats);
            }
        }
        let select = self.g.add_node(Node {
            op: Op::Select {
                scope,
                pattern,
                target,
                sparsities: vec![],
                rounds,
                unit,
            },
            span: s.span,
            stage: self.at,
        });
        self.g.add_edge(score, select, Flow::Scores);
        let mask = self.on_model(
            model,
            Node {
                op: match unit {
                    Some(unit) => Op::RemoveUnits { unit },
                    None => Op::Mask,
                },
                span: s.span,
                stage: self.at,
            },
            None,
            true,
        );
        self.g.add_edge(select, mask, Flow::Mask);
        if matches!(method, Method::SparseGpt | Method::Armor) || method.is_obs() {
            let m = method;
            let rec = self.on_model(
                model,
                Node {
                    op: Op::Reconstruct { method: m },
                    span: by.span,
                    stage: self.at,
                },
                None,
                true,
            );
            let _ = rec;
        }
        let outer = self.at;
        let block = s.block.as_ref().map_or(&[][..], |b| &b.stages[..]);
        for (j, inner) in block.iter().enumerate() {
            self.at = outer.map(|a| StageRef {
                top: a.top,
                inner: Some(j),
            });
            self.stage(inner);
        }
        if let Some(d) = &s.during {
            self.at = outer.map(|a| StageRef {
                top: a.top,
                inner: Some(block.len()),
            });
            self.stage(d);
        }
        self.at = outer;
    }
}

/// Checks the IR's invariants: a DAG; every model-state edge comes from a
/// model node and model chains do not fork into two state-changing nodes;
/// data edges come from data loads; every node has a span.
pub fn verify(ir: &Ir) -> Result<(), String> {
    if petgraph::algo::is_cyclic_directed(&ir.graph) {
        return Err("the IR has a cycle".into());
    }
    for e in ir.graph.edge_references() {
        let src = &ir.graph[e.source()].op;
        match e.weight() {
            Flow::Data if !matches!(src, Op::LoadData { .. } | Op::PruneData { .. }) => {
                return Err(format!("data edge from `{}`", src.label()))
            }
            Flow::Scores if !matches!(src, Op::Score { .. }) => {
                return Err(format!("scores edge from `{}`", src.label()))
            }
            Flow::Stats if !matches!(src, Op::Gradients { .. } | Op::Calibrate { .. }) => {
                return Err(format!("stats edge from `{}`", src.label()))
            }
            _ => {}
        }
    }
    for n in ir.graph.node_indices() {
        let advancing = ir
            .graph
            .edges_directed(n, Direction::Outgoing)
            .filter(|e| *e.weight() == Flow::Model && changes_model(&ir.graph[e.target()].op))
            .count();
        if advancing > 1 {
            return Err(format!(
                "model state of `{}` feeds {advancing} state-changing nodes",
                ir.graph[n].op.label()
            ));
        }
        let node = &ir.graph[n];
        if node.span.is_empty() && !matches!(node.op, Op::Mask) {
            return Err(format!("`{}` has no recipe span", node.op.label()));
        }
    }
    Ok(())
}

/// Whether an operation changes the model's weights or mask.
pub fn changes_model(op: &Op) -> bool {
    matches!(
        op,
        Op::Train { .. }
            | Op::Mask
            | Op::RemoveUnits { .. }
            | Op::FusedPrune { .. }
            | Op::Reconstruct { .. }
    )
}

/// The value of a string literal (`"model.safetensors"`).
fn string(e: &Expr) -> Option<String> {
    match &e.kind {
        ExprKind::Str(s) => Some(s.clone()),
        _ => None,
    }
}

/// A report step as it reads: `report accuracy, pqi per round -> "rounds.svg"`.
pub(crate) fn report_text(metrics: &[String], path: Option<&str>) -> String {
    format!(
        "report {} per round{}",
        metrics.join(", "),
        path.map(|p| format!(" -> {p:?}")).unwrap_or_default()
    )
}
