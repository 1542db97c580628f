//! The execution plan: `ir_to_plan` turns the optimized IR into the ordered
//! steps `prunec run` executes, and the executor reads nothing else for what
//! to run, in which order, with which method, schedule, scope and per-round
//! sparsities. `prunec plan` prints these steps (`render`).

mod params;
mod render;

pub use render::render;

use crate::ir::{Ir, Op, StageRef, Written};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use prunec_lang::ast::{Stage, StageId, StageKind};
use prunec_lang::check::Value;
use prunec_lang::resolved::{DataScore, Method, Metric, Pattern, Schedule, Scope, Unit};
use prunec_lang::{CheckedRecipe, Span};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

/// The steps of one recipe, in execution order, and the stages the
/// optimizer dropped.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub dropped: Vec<Dropped>,
}

/// A stage that does not run: dead-code elimination found nothing that
/// reads its result.
#[derive(Clone, Debug, PartialEq)]
pub struct Dropped {
    /// The id it would have had.
    pub id: String,
    pub span: Span,
    pub kind: StageKind,
    pub why: String,
}

/// One step: a pipeline stage as the optimized IR lowered it.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// Stable id: the stage's position in the pipeline (`3`), and in its
    /// round block (`3.1`); `report.json` names each executed step by it.
    pub id: String,
    pub at: StageRef,
    /// The checked stage's id (it salts the random draws of `rand()`).
    pub stage: StageId,
    pub span: Span,
    /// The model it reads or changes (none for `assert` and `report`).
    pub model: Option<String>,
    pub action: Action,
    /// A prune stage's round block, run after each round.
    pub each_round: Vec<Step>,
    /// The optimized IR's nodes this step runs, in topological order.
    pub nodes: Vec<usize>,
    /// The stage's resolved options, with those of the constraint set it
    /// names (`constraints = guard`) where the stage does not set them:
    /// every option the executor reads.
    pub options: BTreeMap<String, Value>,
    /// Where its clauses are written: the executor reports every error at
    /// one of these spans and reads no stage text.
    pub site: Site,
    /// The data set its `on` clause names.
    pub on: Option<DataRef>,
    /// The params it reads, through the declarations it names: the variants
    /// of a sweep share the step where these have the same values.
    pub params: BTreeSet<String>,
}

/// Where a step's stage and its clauses are written.
#[derive(Clone, Debug, PartialEq)]
pub struct Site {
    pub kind: StageKind,
    pub keyword: Span,
    /// The subject: the model, or an assert's condition (the stage's span
    /// where it has none).
    pub subject: Span,
    pub by: Option<Span>,
    pub to: Option<Span>,
    pub out: Option<Span>,
    /// The value of the `targets` option.
    pub targets: Option<Span>,
}

/// A data set a clause or option names, and where.
#[derive(Clone, Debug, PartialEq)]
pub struct DataRef {
    pub name: String,
    pub span: Span,
}

/// What a step does.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Train {
        kind: StageKind,
        data: String,
    },
    Calibrate {
        data: String,
    },
    /// The statistics a one-round prune reads (loss gradients, activation
    /// norms), computed as a step of their own: they depend on the model
    /// state and the data, not on the target, so the variants of a sweep
    /// share them even where they prune differently.
    Statistics {
        /// The prune step that reads them (`3` for `3.stats`).
        for_step: String,
        gradients: Option<String>,
        activations: Option<String>,
    },
    Prune(Box<Prune>),
    /// A data set keeps the samples its score ranks best.
    PruneData(Box<DataPrune>),
    /// A study of the model whose results go to the report.
    Analyze(Box<Analysis>),
    Evaluate {
        data: String,
        metrics: Vec<Metric>,
        label: Option<String>,
        kv: Option<crate::ir::KvCache>,
    },
    Assert {
        condition: Written,
    },
    Export {
        path: String,
    },
    Report {
        metrics: Vec<String>,
        /// The plot it writes (`-> "curve.svg"`).
        path: Option<String>,
    },
}

/// A resolved `analyze` stage.
#[derive(Clone, Debug, PartialEq)]
pub struct Analysis {
    /// The analysis (`oracle`, `agreement`).
    pub name: String,
    /// The oracle study: where the loss right after pruning is measured and
    /// the copies retrain. Agreement: where gradients and activations come from.
    pub data: String,
    pub kind: AnalysisKind,
    /// The oracle study: the fraction of each layer's units a candidate
    /// removes. Agreement: the fraction each criterion would prune.
    pub fraction: f64,
    /// The scatter plot (`-> "oracle.svg"`), relative to the output folder.
    pub path: String,
    pub label: Option<String>,
}

/// What an `analyze` stage studies.
#[derive(Clone, Debug, PartialEq)]
pub enum AnalysisKind {
    Oracle {
        /// Where the accuracy after retraining is measured.
        test: String,
        candidates: usize,
        /// `neuron` or `channel`.
        unit: Unit,
    },
    /// Two criteria's scores of the same weights.
    Agreement { a: Box<Written>, b: Box<Written> },
    /// Each weight tensor pruned alone by `criterion` to each level.
    Sensitivity {
        criterion: Box<Written>,
        levels: Vec<f64>,
    },
    /// NSGA-II over a language model's per-block sparsities.
    Search {
        /// `wanda` or `magnitude`: the per-row selection masking candidates.
        criterion: String,
        population: usize,
        generations: usize,
        /// The lowest and highest sparsity of a block.
        range: (f64, f64),
    },
}

/// A resolved data-set prune (`prune DATA by el2n(MODEL) to 90%`).
#[derive(Clone, Debug, PartialEq)]
pub struct DataPrune {
    pub data: String,
    pub score: DataScore,
    /// The model that scores (none for `random`); also the step's `model`.
    pub model: Option<String>,
    /// The fraction of the samples removed (`to`, params folded).
    pub fraction: f64,
    /// Every class keeps its share (`per_class = true`).
    pub per_class: bool,
    /// Keep the lowest scores (`keep = easiest`), not the highest.
    pub easiest: bool,
    /// The training whose presentations forgetting events are counted over.
    pub during_step: Option<Box<Step>>,
}

/// A resolved prune stage.
#[derive(Clone, Debug, PartialEq)]
pub struct Prune {
    pub method: Method,
    /// The criterion, for `Method::Criterion` (and SparseGPT's call as written).
    pub by: Written,
    /// Score, select and mask run as one fused kernel.
    pub fused: bool,
    /// The criterion lowered to the kernel expression that runs (from the
    /// fused IR node); none for methods, or where it does not lower (the
    /// executor then reports why, with its span).
    pub kernel: Option<crate::lower::LoweredCriterion>,
    pub scope: Scope,
    pub pattern: Option<Pattern>,
    /// Whole units removed (`unit = ...`): the model shrinks.
    pub unit: Option<Unit>,
    pub schedule: Schedule,
    /// The target fraction (`to 90%`, params folded); none for an N:M
    /// target (`to 2:4` is the pattern) or a stage without `to`.
    pub target: Option<f64>,
    /// A built-in method's arguments, defaults filled in (SparseGPT's
    /// `block` and `damp`, SAP's `p`, `q`, `eta`, `gamma`, `beta`).
    pub args: BTreeMap<String, f64>,
    /// Where its criterion reads statistics from: `calibrate = D`, else `on D`.
    pub stats_data: Option<DataRef>,
    /// Sparsity after each round, folded from the target (empty when the
    /// stage has no numeric target: a pattern alone, SAP, or gradual).
    pub sparsities: Vec<f64>,
    /// The statistics the criterion reads that this stage computes itself,
    /// and the data they come from (none where the optimized IR shares them
    /// with an earlier `calibrate` stage on the same model state).
    pub gradients: Option<String>,
    pub activations: Option<String>,
    /// Round one reads the statistics of step `ID.stats`, run earlier.
    pub stats_step: bool,
    /// The earlier step whose statistics it reads (an explicit `calibrate`).
    pub reads_from: Option<String>,
    /// A language model: pruned layer by layer, each layer calibrated on
    /// the outputs of the layers pruned before it (the runtime's
    /// sequential driver, not the fused kernels).
    pub layerwise: bool,
    /// The training a gradual schedule prunes during, as the step the
    /// pruning runs inside (same id as the prune step: not a step of its own).
    pub during_step: Option<Box<Step>>,
}

/// The checked stage a step runs (for the plan's own rendering; the
/// executor reads the step).
fn stage_of<'r>(step: &Step, r: &'r CheckedRecipe) -> &'r Stage {
    step.at
        .stage(r)
        .expect("a plan step refers to a stage of its recipe")
}

impl Step {
    /// A one-line description.
    pub fn label(&self) -> String {
        let on = |m: &Option<String>| m.as_deref().unwrap_or("?").to_string();
        match &self.action {
            Action::Train { kind, data } => {
                let mut line = format!("{kind} {} on {data}", on(&self.model));
                if let Some(Value::Ref(t)) = self.options.get("distill") {
                    let f = |k: &str| {
                        self.options
                            .get(k)
                            .and_then(|v| v.as_f64())
                            .or_else(|| prunec_lang::builtins::default_number(k, None))
                            .unwrap_or(f64::NAN)
                    };
                    line.push_str(&format!(
                        ", distilled from {t} as it is then (T = {}, weight {})",
                        f("temperature"),
                        f("distill_weight")
                    ));
                }
                line
            }
            Action::Calibrate { data } => format!("calibrate {} on {data}", on(&self.model)),
            Action::Statistics {
                gradients,
                activations,
                ..
            } => {
                let mut what = Vec::new();
                if let Some(d) = gradients {
                    what.push(format!("loss gradients on {d}"));
                }
                if let Some(d) = activations {
                    what.push(format!("activation norms on {d}"));
                }
                format!("statistics of {}: {}", on(&self.model), what.join(", "))
            }
            Action::Prune(p) => {
                let what = match p.method {
                    Method::Criterion => format!("by `{}`", p.by),
                    Method::Sap => format!("by SAP `{}`", p.by),
                    Method::SparseGpt => format!("by SparseGPT `{}`", p.by),
                    Method::Armor => format!(
                        "by ARMOR `{}` (block-diagonal wrappers around the N:M result, fitted to each layer's calibration inputs)",
                        p.by
                    ),
                    Method::Heapr => format!(
                        "by HEAPr `{}` (second-order importance in each expert's output space, from one forward and one backward pass)",
                        p.by
                    ),
                    Method::Reap => format!("by REAP `{}` (routing weight × expert output norm)", p.by),
                    Method::Frequency => format!("by router frequency `{}`", p.by),
                    Method::WoodFisher | Method::MFac => {
                        let arg = |k: &str| p.args.get(k).copied().unwrap_or(0.0);
                        let data = match (&p.stats_data, &p.during_step) {
                            (Some(d), _) => d.name.clone(),
                            (None, Some(d)) => d.on.as_ref().map_or("?".into(), |d| d.name.clone()),
                            (None, None) => "?".into(),
                        };
                        format!(
                            "by {} `{}`, each {}'s Fisher from {} gradient(s) of {} sample(s) on {data}",
                            if p.method == Method::MFac { "M-FAC" } else { "WoodFisher" },
                            if p.during_step.is_some() { "pruning step" } else { "round" },
                            p.by,
                            arg("grads"),
                            arg("batch"),
                        )
                    }
                };
                let select = match (p.pattern, p.unit) {
                    (Some(pattern), _) => pattern.to_string(),
                    (None, Some(Unit::Expert)) => {
                        "experts removed, as many from every sparse block".to_string()
                    }
                    (None, Some(Unit::ExpertNeuron)) => "atomic experts removed".to_string(),
                    (None, Some(unit)) => format!(
                        "{} removed, {} scope",
                        match unit {
                            Unit::Ffn => "FFN neurons".to_string(),
                            Unit::KvGroup => "kv groups (with their query heads)".to_string(),
                            Unit::Head => "query heads (as many per kv group)".to_string(),
                            u => format!("{u}s"),
                        },
                        p.scope
                    ),
                    (None, None) => format!("{} scope", p.scope),
                };
                let mut line = format!("prune {} {what} ({select})", on(&self.model));
                if p.fused {
                    line.push_str(", one fused kernel per round");
                }
                if !p.sparsities.is_empty() {
                    let rounds: Vec<String> = p
                        .sparsities
                        .iter()
                        .map(|s| format!("{:.2}%", s * 100.0))
                        .collect();
                    line.push_str(&format!(
                        "; sparsity after each round: {}",
                        rounds.join(", ")
                    ));
                } else if let Some(r) = p.schedule.rounds().filter(|&r| r > 1) {
                    line.push_str(&format!("; {r} rounds"));
                }
                if let Some(u) = p.unit.filter(|u| u.of_experts()) {
                    let data = p.stats_data.as_ref().map_or("?".to_string(), |d| d.name.clone());
                    let equal = matches!(self.options.get("equal_widths"), Some(Value::Bool(true)));
                    let how = match (u, equal, p.scope) {
                        (Unit::Expert, _, _) => "the same number of experts kept in every sparse block",
                        (_, true, _) => "every expert losing the same share of its own atomic experts (one width: the export shrinks)",
                        (_, false, Scope::Global) => "atomic experts ranked across every sparse block's experts, each expert keeping one at least (the export pads every expert to the widest)",
                        _ => "atomic experts ranked across each sparse block's experts, each expert keeping one at least (the export pads every expert to the widest)",
                    };
                    line.push_str(&format!(
                        "; the experts' routing{} on {data} through the dense model, {how}",
                        if p.method == Method::Heapr { " and loss gradients" } else { "" },
                    ));
                } else if p.layerwise && p.unit.is_some() {
                    if let Some(d) = &p.activations {
                        line.push_str(&format!(
                            "; every block's units scored on {d} through the dense model, the same number kept in each"
                        ));
                    } else {
                        line.push_str("; the same number of units kept in every block");
                    }
                } else if p.layerwise {
                    line.push_str(", layer by layer");
                    if let Some(a) = self
                        .options
                        .get("allocation")
                        .filter(|a| a.call_name() == Some("pareto"))
                    {
                        let front = a.arg("front").and_then(|v| v.as_str()).unwrap_or("?");
                        if a.arg("pick").and_then(|v| v.as_str()) == Some("knee") {
                            line.push_str(&format!(
                                "; each block at its sparsity in the knee of the front `{front}`, the target the knee's"
                            ));
                        } else {
                            line.push_str(&format!(
                                "; each block at its sparsity in the front `{front}`'s point meeting the target with the lowest perplexity, shifted to average the target"
                            ));
                        }
                    } else if let Some(a) = self.options.get("allocation") {
                        let f = |k: &str| {
                            a.arg(k)
                                .and_then(|v| v.as_f64())
                                .or_else(|| prunec_lang::builtins::default_number("owl", Some(k)))
                                .unwrap_or(f64::NAN)
                        };
                        line.push_str(&format!(
                            "; each block at its own sparsity by OWL (m = {}, lambda = {}: blocks with more outliers keep more, averaging the target)",
                            f("m"),
                            f("lambda")
                        ));
                    }
                    if let Some(d) = &p.activations {
                        // The calibration flow the runtime's one-shot driver takes
                        // (`sequential`, `true_sequential`).
                        let sequential =
                            !matches!(self.options.get("sequential"), Some(Value::Bool(false)));
                        let by_group = matches!(
                            self.options.get("true_sequential"),
                            Some(Value::Bool(true))
                        );
                        line.push_str(&if sequential {
                            format!("; each block calibrated on {d} through the blocks pruned before it")
                        } else {
                            format!("; every block calibrated on {d} through the dense model")
                        });
                        line.push_str(if by_group {
                            ", its layers pruned group by group (q/k/v, o, gate/up, down), each group calibrated after the groups before it are pruned"
                        } else {
                            ", all its layers on the block's activations before any is pruned"
                        });
                    }
                } else if let Some(from) = &p.reads_from {
                    line.push_str(&format!("; activation norms from step {from}"));
                } else if p.stats_step {
                    line.push_str(&format!("; statistics from step {}.stats", self.id));
                } else {
                    if let Some(d) = &p.gradients {
                        line.push_str(&format!("; gradients on {d}, each round"));
                    }
                    if let Some(d) = &p.activations {
                        line.push_str(&format!("; activation norms on {d}, each round"));
                    }
                }
                if p.during_step.is_some() {
                    line.push_str(match &p.schedule {
                        Schedule::Gradual(g) if g.call_name() == Some("pdp") => {
                            "; soft masks while it trains (`during`)"
                        }
                        _ => "; pruning steps while it trains (`during`)",
                    });
                }
                line
            }
            Action::Analyze(a) => match &a.kind {
                AnalysisKind::Oracle { test, candidates, unit } => format!(
                    "analyze {} by oracle: {candidates} candidate masks, each removing a random {:.2}% of every layer's {unit}s from a copy; loss on {} right after pruning, accuracy on {test} after retraining the copy; Kendall's tau and a scatter plot to {:?}",
                    on(&self.model),
                    a.fraction * 100.0,
                    a.data,
                    a.path
                ),
                AnalysisKind::Sensitivity { criterion, levels } => format!(
                    "analyze {} by sensitivity: each weight tensor of a copy pruned alone by `{criterion}` to {}, accuracy and loss on {} right after pruning; a table and a plot to {:?}",
                    on(&self.model),
                    levels
                        .iter()
                        .map(|l| format!("{:.2}%", l * 100.0))
                        .collect::<Vec<_>>()
                        .join(", "),
                    a.data,
                    a.path
                ),
                AnalysisKind::Search {
                    criterion,
                    population,
                    generations,
                    range,
                } => format!(
                    "analyze {} by search: NSGA-II, {population} candidates over {generations} generations, each block at a sparsity in {:.2}% .. {:.2}%, masked per row by `{criterion}` scores of the dense weights (activations on {}); objectives perplexity on {} and kept weights; the Pareto front to the report, a plot to {:?}",
                    on(&self.model),
                    range.0 * 100.0,
                    range.1 * 100.0,
                    a.data,
                    a.data,
                    a.path
                ),
                AnalysisKind::Agreement { a: x, b: y } => format!(
                    "analyze {} by agreement: `{x}` and `{y}` score every weight tensor (statistics on {}); Spearman's rank correlation and the overlap of what each would prune at {:.2}%, per tensor and overall; a plot to {:?}",
                    on(&self.model),
                    a.data,
                    a.fraction * 100.0,
                    a.path
                ),
            },
            Action::PruneData(d) => {
                let by = match (&d.model, d.score) {
                    (Some(m), s) => format!("{}({m})", s.name()),
                    (None, s) => format!("{}()", s.name()),
                };
                let mut line = format!(
                    "prune data {} by {by}: {:.2}% of its samples removed, {}",
                    d.data,
                    d.fraction * 100.0,
                    if d.per_class {
                        "each class keeping its share"
                    } else {
                        "ranked over all classes"
                    }
                );
                if d.score != DataScore::Random {
                    line.push_str(if d.easiest {
                        ", keeping the lowest scores (easiest)"
                    } else {
                        ", keeping the highest scores (hardest)"
                    });
                }
                match (&d.during_step, &d.model) {
                    (Some(t), _) => line.push_str(&format!(
                        "; forgetting events counted at every presentation while `{}` runs (`during`)",
                        t.label()
                    )),
                    (None, Some(m)) => line.push_str(&format!("; scored by {m} as it is then")),
                    (None, None) => line.push_str("; a seeded draw"),
                }
                line
            }
            Action::Evaluate {
                data,
                metrics,
                label,
                kv,
            } => format!(
                "evaluate {} on {data} -> [{}]{}{}",
                on(&self.model),
                metrics
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                label
                    .as_ref()
                    .map(|l| format!(" as {l}"))
                    .unwrap_or_default(),
                kv.as_ref().map(crate::ir::KvCache::text).unwrap_or_default()
            ),
            Action::Assert { condition } => format!("assert {condition}"),
            Action::Export { path } => format!("export {} to {path:?}", on(&self.model)),
            Action::Report { metrics, path } => crate::ir::report_text(metrics, path.as_deref()),
        }
    }

    /// This step and its round block's steps, depth first.
    pub fn all(&self) -> Vec<&Step> {
        let mut v = vec![self];
        for s in &self.each_round {
            v.extend(s.all());
        }
        v
    }
}

impl Plan {
    /// Every step, round blocks included, depth first.
    pub fn all(&self) -> Vec<&Step> {
        self.steps.iter().flat_map(|s| s.all()).collect()
    }

    /// The epochs its prune steps rewind to (`rewind = epoch k`), by model:
    /// training keeps the weights after each of them.
    pub fn rewind_epochs(&self) -> BTreeMap<String, BTreeSet<usize>> {
        let mut out: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
        for step in self.all() {
            let (Some(model), Action::Prune(p)) = (&step.model, &step.action) else {
                continue;
            };
            if let Schedule::Iterative {
                rewind:
                    Some(Value::Duration {
                        count,
                        unit: prunec_lang::ast::Unit::Epoch,
                    }),
                ..
            } = &p.schedule
            {
                if *count > 0 {
                    out.entry(model.clone())
                        .or_default()
                        .insert(*count as usize);
                }
            }
        }
        out
    }
}

/// The optimized IR's nodes in execution order: topological, smallest node
/// index first, so the pipeline's order wherever the data flow does not
/// force another.
fn topological(ir: &Ir) -> Vec<petgraph::graph::NodeIndex> {
    let g = &ir.graph;
    let mut indeg: Vec<usize> = g
        .node_indices()
        .map(|n| g.edges_directed(n, Direction::Incoming).count())
        .collect();
    let mut ready: BinaryHeap<Reverse<usize>> = g
        .node_indices()
        .filter(|n| indeg[n.index()] == 0)
        .map(|n| Reverse(n.index()))
        .collect();
    let mut order = Vec::with_capacity(g.node_count());
    while let Some(Reverse(i)) = ready.pop() {
        let n = petgraph::graph::NodeIndex::new(i);
        for e in g.edges_directed(n, Direction::Outgoing) {
            let t = e.target().index();
            indeg[t] -= 1;
            if indeg[t] == 0 {
                ready.push(Reverse(t));
            }
        }
        order.push(n);
    }
    order
}

/// The plan of an optimized IR: one step per pipeline stage that has nodes,
/// in the order of their first node; a prune stage's round block becomes its
/// `each_round` steps, and the training it runs `during` part of the step.
pub fn ir_to_plan(ir: &Ir, r: &CheckedRecipe) -> Result<Plan, String> {
    let order = topological(ir);
    if order.len() != ir.graph.node_count() {
        return Err("the IR has a cycle".into());
    }
    // Nodes by stage, stages in order of their first node.
    let mut tops: Vec<usize> = Vec::new();
    let mut by_stage: BTreeMap<StageRef, Vec<usize>> = BTreeMap::new();
    let mut inner_order: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for n in &order {
        let Some(at) = ir.graph[*n].stage else {
            continue;
        };
        if !tops.contains(&at.top) {
            tops.push(at.top);
        }
        by_stage.entry(at).or_default().push(n.index());
        if let Some(j) = at.inner {
            let inner = inner_order.entry(at.top).or_default();
            if !inner.contains(&j) {
                inner.push(j);
            }
        }
    }
    let mut steps = Vec::new();
    for top in tops {
        let at = StageRef { top, inner: None };
        let mut step = step_of(ir, r, at, &by_stage, id_of(at))?;
        for j in inner_order.get(&top).into_iter().flatten() {
            let inner = StageRef {
                top,
                inner: Some(*j),
            };
            // A stage's `during` training is lowered one past its round block.
            let stage = stage_of(&step, r);
            let block_len = stage.block.as_ref().map_or(0, |b| b.stages.len());
            if stage.during.is_some() && *j == block_len {
                // The training a gradual prune runs during: its nodes are this step's.
                let during = step_of(ir, r, inner, &by_stage, step.id.clone())?;
                step.nodes.extend(by_stage[&inner].iter().copied());
                match &mut step.action {
                    Action::Prune(p) => p.during_step = Some(Box::new(during)),
                    Action::PruneData(d) => d.during_step = Some(Box::new(during)),
                    _ => {}
                }
                continue;
            }
            step.each_round
                .push(step_of(ir, r, inner, &by_stage, id_of(inner))?);
        }
        // Language models calibrate layer by layer inside their prune step
        // (each layer's inputs come from the layers pruned before it).
        let llm = step
            .model
            .as_ref()
            .and_then(|m| r.symbols.get(m)?.value.as_ref()?.call_name())
            .is_some_and(prunec_lang::check::models::is_language_model_constructor);
        if let Some(mut stats) = split_statistics(ir, &mut step, llm) {
            // It reads only the model's state (shared by the group that
            // reaches it) and the data sets.
            if let Action::Statistics {
                gradients,
                activations,
                ..
            } = &stats.action
            {
                let data = gradients.iter().chain(activations).cloned().collect();
                stats.params = params::params_of(r, data);
            }
            // Statistics read only their model's state and immutable data:
            // they run as soon as that state exists, right after the last
            // step on the same model, so that the variants of a sweep that
            // fork at an earlier step still share them.
            // Nor before a data set they read is pruned.
            let reads: Vec<&String> = match &stats.action {
                Action::Statistics {
                    gradients,
                    activations,
                    ..
                } => gradients.iter().chain(activations).collect(),
                _ => vec![],
            };
            let at = steps
                .iter()
                .rposition(|s: &Step| {
                    s.model == stats.model
                        || matches!(&s.action, Action::PruneData(d) if reads.contains(&&d.data))
                })
                .map_or(0, |i| i + 1);
            steps.insert(at, stats);
        }
        steps.push(step);
    }
    Ok(Plan {
        steps,
        dropped: dropped(r, &by_stage),
    })
}

/// The pipeline's stages that have no node left in the optimized IR.
fn dropped(r: &CheckedRecipe, by_stage: &BTreeMap<StageRef, Vec<usize>>) -> Vec<Dropped> {
    let mut out = Vec::new();
    let mut visit = |at: StageRef, s: &Stage| {
        if !by_stage.contains_key(&at) {
            out.push(Dropped {
                id: id_of(at),
                span: s.span,
                kind: s.kind,
                why: match s.kind {
                    StageKind::Calibrate => {
                        "no prune step reads the statistics it would compute".into()
                    }
                    _ => "nothing reads its result".into(),
                },
            });
        }
    };
    for (top, s) in r.pipeline().stages.iter().enumerate() {
        visit(StageRef { top, inner: None }, s);
        for (j, inner) in s.block.iter().flat_map(|b| b.stages.iter()).enumerate() {
            let at = StageRef {
                top,
                inner: Some(j),
            };
            visit(at, inner);
        }
    }
    out
}

/// Splits the statistics nodes of a one-round criterion prune into a step
/// of their own (`3.stats` for step `3`).
fn split_statistics(ir: &Ir, step: &mut Step, llm: bool) -> Option<Step> {
    let Action::Prune(p) = &mut step.action else {
        return None;
    };
    if llm {
        p.layerwise = true;
        p.fused = false;
        return None;
    }
    let one_round = p.schedule.rounds() == Some(1) && step.each_round.is_empty();
    if p.method != Method::Criterion
        || !one_round
        || p.during_step.is_some()
        || (p.gradients.is_none() && p.activations.is_none())
    {
        return None;
    }
    p.stats_step = true;
    let (stats, rest): (Vec<usize>, Vec<usize>) = step.nodes.iter().partition(|&&i| {
        matches!(
            ir.graph[petgraph::graph::NodeIndex::new(i)].op,
            Op::Gradients { .. } | Op::Calibrate { .. }
        )
    });
    step.nodes = rest;
    Some(Step {
        id: format!("{}.stats", step.id),
        at: step.at,
        stage: step.stage,
        span: step.span,
        model: step.model.clone(),
        action: Action::Statistics {
            for_step: step.id.clone(),
            gradients: p.gradients.clone(),
            activations: p.activations.clone(),
        },
        each_round: vec![],
        nodes: stats,
        options: step.options.clone(),
        site: step.site.clone(),
        on: step.on.clone(),
        params: BTreeSet::new(),
    })
}

/// The id of a stage: `3`, or `3.1` inside stage 3's round block.
fn id_of(at: StageRef) -> String {
    match at.inner {
        None => format!("{}", at.top + 1),
        Some(j) => format!("{}.{}", at.top + 1, j + 1),
    }
}

fn step_of(
    ir: &Ir,
    r: &CheckedRecipe,
    at: StageRef,
    by_stage: &BTreeMap<StageRef, Vec<usize>>,
    id: String,
) -> Result<Step, String> {
    let s = at
        .stage(r)
        .ok_or_else(|| format!("an IR node refers to a stage the recipe lacks ({at:?})"))?;
    let nodes = by_stage.get(&at).cloned().unwrap_or_default();
    let ops: Vec<&Op> = nodes
        .iter()
        .map(|&i| &ir.graph[petgraph::graph::NodeIndex::new(i)].op)
        .collect();
    let data_prune = r.is_data_prune(s);
    let model = match s.kind {
        StageKind::Prune if data_prune => s.by.as_ref().and_then(DataScore::of).and_then(|d| d.1),
        StageKind::Assert | StageKind::Report => None,
        _ => s
            .subject
            .first()
            .and_then(|e| e.as_name())
            .map(|n| n.name.clone()),
    };
    let missing = |what: &str| format!("the IR of stage {id} has no {what} node");
    let action = match s.kind {
        StageKind::Train | StageKind::Finetune => match ops.as_slice() {
            [Op::Train { kind, data }] => Action::Train {
                kind: *kind,
                data: data.clone(),
            },
            _ => return Err(missing("train")),
        },
        StageKind::Calibrate => match ops.as_slice() {
            [Op::Calibrate { data, .. }] => Action::Calibrate { data: data.clone() },
            _ => return Err(missing("calibrate")),
        },
        StageKind::Evaluate => match ops.as_slice() {
            [Op::Evaluate {
                data,
                metrics,
                label,
                kv,
            }] => Action::Evaluate {
                data: data.clone(),
                metrics: metrics.clone(),
                label: label.clone(),
                kv: kv.clone(),
            },
            _ => return Err(missing("evaluate")),
        },
        StageKind::Assert => match ops.as_slice() {
            [Op::Assert { condition }] => Action::Assert {
                condition: condition.clone(),
            },
            _ => return Err(missing("assert")),
        },
        StageKind::Export => match ops.as_slice() {
            [Op::Export { path }] => Action::Export { path: path.clone() },
            _ => return Err(missing("export")),
        },
        StageKind::Report => match ops.as_slice() {
            [Op::Report { metrics, path }] => Action::Report {
                metrics: metrics.clone(),
                path: path.clone(),
            },
            _ => return Err(missing("report")),
        },
        StageKind::Analyze => match ops.as_slice() {
            [Op::Analyze { analysis, data }] => {
                let name = match &analysis.expr.kind {
                    prunec_lang::ast::ExprKind::Call { callee, .. } => callee.name.clone(),
                    _ => analysis.text.clone(),
                };
                // An argument by name, or by its position in the table.
                let arg = |k: &str, i: usize| match &analysis.expr.kind {
                    prunec_lang::ast::ExprKind::Call { args, .. } => {
                        args.get(k, i).map(|a| a.value.clone())
                    }
                    _ => None,
                };
                // The criteria as written: the call's text cut at their spans.
                let base = analysis.expr.span.start;
                let written = |e: prunec_lang::ast::Expr| {
                    let text = analysis
                        .text
                        .get(e.span.start - base..e.span.end - base)
                        .unwrap_or("?")
                        .to_string();
                    Written { expr: e, text }
                };
                let kind = if name == "sensitivity" {
                    let criterion = arg("a", 0)
                        .ok_or_else(|| format!("stage {id}: `sensitivity` needs a criterion"))?;
                    let levels = match arg("levels", 1) {
                        Some(e) => e,
                        None => prunec_lang::builtins::lookup(&name)
                            .and_then(|b| b.params.iter().find(|p| p.name == "levels"))
                            .and_then(|p| p.default)
                            .and_then(|d| prunec_lang::parse::source_to_expr(d).ok())
                            .ok_or_else(|| format!("stage {id}: no levels"))?,
                    };
                    let levels = match &levels.kind {
                        prunec_lang::ast::ExprKind::List(items) => items
                            .iter()
                            .map(|i| r.constant(i))
                            .collect::<Option<Vec<f64>>>(),
                        _ => None,
                    }
                    .ok_or_else(|| format!("stage {id}: the levels are not constants"))?;
                    AnalysisKind::Sensitivity {
                        criterion: Box::new(written(criterion)),
                        levels,
                    }
                } else if name == "search" {
                    let default = |k: &str| {
                        prunec_lang::builtins::lookup(&name)
                            .and_then(|b| b.params.iter().find(|p| p.name == k))
                            .and_then(|p| p.default)
                            .and_then(|d| prunec_lang::parse::source_to_expr(d).ok())
                    };
                    let criterion = arg("a", 0)
                        .and_then(|e| e.as_name().map(|n| n.name.clone()))
                        .ok_or_else(|| format!("stage {id}: `search` needs a criterion"))?;
                    let number = |k: &str, i: usize| {
                        arg(k, i)
                            .or_else(|| default(k))
                            .and_then(|e| r.constant(&e))
                            .ok_or_else(|| format!("stage {id}: `{k}` is not a constant"))
                    };
                    let range = match arg("range", 3).or_else(|| default("range")).map(|e| e.kind) {
                        Some(prunec_lang::ast::ExprKind::List(items)) => {
                            match items
                                .iter()
                                .map(|i| r.constant(i))
                                .collect::<Option<Vec<f64>>>()
                            {
                                Some(v) if v.len() == 2 => (v[0], v[1]),
                                _ => {
                                    return Err(format!(
                                        "stage {id}: the range is not two constants"
                                    ))
                                }
                            }
                        }
                        _ => return Err(format!("stage {id}: no range")),
                    };
                    AnalysisKind::Search {
                        criterion,
                        population: number("population", 1)? as usize,
                        generations: number("generations", 2)? as usize,
                        range,
                    }
                } else if name == "agreement" {
                    let (x, y) = arg("a", 0)
                        .zip(arg("b", 1))
                        .ok_or_else(|| format!("stage {id}: `agreement` needs two criteria"))?;
                    AnalysisKind::Agreement {
                        a: Box::new(written(x)),
                        b: Box::new(written(y)),
                    }
                } else {
                    let test = arg("test", 0)
                        .and_then(|e| e.as_name().map(|n| n.name.clone()))
                        .ok_or_else(|| format!("stage {id}: no `test` data"))?;
                    let default = |k: &str| {
                        prunec_lang::builtins::lookup(&name)
                            .and_then(|b| b.params.iter().find(|p| p.name == k))
                            .and_then(|p| p.default)
                            .map(String::from)
                    };
                    let candidates = match arg("candidates", 1) {
                        Some(e) => r.constant(&e),
                        None => default("candidates").and_then(|d| d.parse().ok()),
                    }
                    .ok_or_else(|| format!("stage {id}: `candidates` is not a constant"))?;
                    let unit_word = match arg("unit", 2) {
                        Some(e) => e.as_name().map(|n| n.name.clone()),
                        None => default("unit"),
                    };
                    let unit = Unit::of(unit_word.map(Value::Word).as_ref())
                        .ok_or_else(|| format!("stage {id}: no unit"))?;
                    AnalysisKind::Oracle {
                        test,
                        candidates: candidates as usize,
                        unit,
                    }
                };
                let fraction = match (&kind, &s.to) {
                    (AnalysisKind::Sensitivity { .. } | AnalysisKind::Search { .. }, None) => 0.0,
                    (_, to) => to
                        .as_ref()
                        .and_then(|e| r.constant(e))
                        .ok_or_else(|| format!("stage {id}: the fraction is not a constant"))?,
                };
                let path = s
                    .out
                    .as_ref()
                    .and_then(|e| match &e.kind {
                        prunec_lang::ast::ExprKind::Str(p) => Some(p.clone()),
                        _ => None,
                    })
                    .unwrap_or_else(|| format!("{name}_step{id}.svg"));
                Action::Analyze(Box::new(Analysis {
                    name,
                    data: data.clone(),
                    kind,
                    fraction,
                    path,
                    label: s.label.as_ref().map(|l| l.name.clone()),
                }))
            }
            _ => return Err(missing("analyze")),
        },
        StageKind::Prune if data_prune => match ops.last() {
            Some(Op::PruneData { data, score, model }) => {
                let fraction =
                    s.to.as_ref().and_then(|e| r.constant(e)).ok_or_else(|| {
                        format!("stage {id}: the data fraction is not a constant")
                    })?;
                let option = |k: &str| r.option(s, k);
                Action::PruneData(Box::new(DataPrune {
                    data: data.clone(),
                    score: *score,
                    model: model.clone(),
                    fraction,
                    per_class: matches!(option("per_class"), Some(Value::Bool(true))),
                    easiest: option("keep").and_then(|v| v.as_str()) == Some("easiest"),
                    during_step: None,
                }))
            }
            _ => return Err(missing("data prune")),
        },
        StageKind::Prune => {
            let mut p = prune_of(r, s, &ops).ok_or_else(|| missing("prune"))?;
            p.args = Method::arguments(r, &p.by.expr).map_err(|span| {
                format!(
                    "stage {id}: the argument at {}..{} is not a constant number",
                    span.start, span.end
                )
            })?;
            p.stats_data = s
                .arg("calibrate")
                .map(|a| &a.value)
                .or(s.on.as_ref())
                .and_then(data_ref);
            // Statistics flowing in from another stage's node.
            p.reads_from = nodes.iter().find_map(|&i| {
                ir.graph
                    .edges_directed(petgraph::graph::NodeIndex::new(i), Direction::Incoming)
                    .filter(|e| *e.weight() == crate::ir::Flow::Stats)
                    .filter_map(|e| ir.graph[e.source()].stage)
                    .find(|from| *from != at)
                    .map(id_of)
            });
            Action::Prune(Box::new(p))
        }
    };
    Ok(Step {
        id,
        at,
        stage: s.id,
        span: s.span,
        model,
        action,
        each_round: vec![],
        nodes,
        options: r.resolved_options(s),
        site: Site {
            kind: s.kind,
            keyword: s.keyword_span,
            subject: s.subject.first().map_or(s.span, |e| e.span),
            by: s.by.as_ref().map(|e| e.span),
            to: s.to.as_ref().map(|e| e.span),
            out: s.out.as_ref().map(|e| e.span),
            targets: s.arg("targets").map(|a| a.value.span),
        },
        on: s.on.as_ref().and_then(data_ref),
        params: params::stage_params(r, s),
    })
}

/// The data set a clause names.
fn data_ref(e: &prunec_lang::ast::Expr) -> Option<DataRef> {
    e.as_name().map(|id| DataRef {
        name: id.name.clone(),
        span: e.span,
    })
}

/// A prune stage from its nodes: the fused kernel (or score, select, mask),
/// the statistics it reads, and the reconstruction of a solver.
fn prune_of(r: &CheckedRecipe, s: &Stage, ops: &[&Op]) -> Option<Prune> {
    let by = s.by.as_ref()?;
    let mut p = Prune {
        method: Method::of(r, by),
        by: Written {
            expr: by.clone(),
            text: r
                .source
                .get(by.span.start..by.span.end)
                .unwrap_or("?")
                .to_string(),
        },
        fused: false,
        kernel: None,
        scope: Scope::Global,
        pattern: None,
        unit: None,
        schedule: Schedule::of(r, s),
        // `to 2:4` is the pattern (check recorded it as that option).
        target: s.to.as_ref().and_then(|to| r.constant(to)),
        args: BTreeMap::new(),
        stats_data: None,
        sparsities: vec![],
        gradients: None,
        activations: None,
        stats_step: false,
        reads_from: None,
        layerwise: false,
        during_step: None,
    };
    let mut selects = false;
    for op in ops {
        match op {
            Op::FusedPrune {
                kernel,
                scope,
                pattern,
                sparsities,
                ..
            } => {
                p.fused = true;
                p.kernel = Some(kernel.clone());
                (p.scope, p.pattern, p.sparsities) = (*scope, *pattern, sparsities.clone());
                selects = true;
            }
            Op::Select {
                scope,
                pattern,
                sparsities,
                unit,
                ..
            } => {
                (p.scope, p.pattern, p.sparsities) = (*scope, *pattern, sparsities.clone());
                p.unit = *unit;
                selects = true;
            }
            Op::Gradients { data } => p.gradients = Some(data.clone()),
            Op::Calibrate { data, .. } => p.activations = Some(data.clone()),
            _ => {}
        }
    }
    selects.then_some(p)
}

impl Step {
    /// The step as JSON: id, kind, model, line, label and its round block.
    pub fn to_json(&self, r: &CheckedRecipe) -> serde_json::Value {
        let (line, _) = prunec_lang::diag::line_col(&r.source, self.span.start);
        serde_json::json!({
            "id": self.id,
            "kind": match self.action {
                Action::Statistics { .. } => "statistics",
                _ => self.site.kind.keyword(),
            },
            "model": self.model,
            "line": line,
            "label": self.label(),
            "each_round": self.each_round.iter().map(|s| s.to_json(r)).collect::<Vec<_>>(),
            "rounds": match &self.action {
                Action::Prune(p) => p.schedule.rounds(),
                _ => None,
            },
        })
    }
}

impl Plan {
    /// The plan as JSON: `{"steps": [...], "dropped": [...]}`.
    pub fn to_json(&self, r: &CheckedRecipe) -> serde_json::Value {
        serde_json::json!({
            "steps": self.steps.iter().map(|s| s.to_json(r)).collect::<Vec<_>>(),
            "dropped": self.dropped_json(r),
        })
    }

    /// The dropped stages as JSON: id, kind, line and why.
    pub fn dropped_json(&self, r: &CheckedRecipe) -> serde_json::Value {
        self.dropped
            .iter()
            .map(|d| {
                let (line, _) = prunec_lang::diag::line_col(&r.source, d.span.start);
                serde_json::json!({"id": d.id, "kind": d.kind.keyword(), "line": line, "why": d.why})
            })
            .collect()
    }
}
