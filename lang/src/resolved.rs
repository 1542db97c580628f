//! Typed forms of the choices a checked recipe makes with names: where a
//! prune stage compares scores, which method prunes, which schedule reaches
//! the target. Later stages match on these enums, never on the names.

use crate::ast::{Expr, ExprKind};
use crate::builtins::{self, Kind};
use crate::check::{CheckedRecipe, Value};
use crate::Span;
use std::collections::BTreeMap;

/// Where a prune stage compares scores (`scope = ...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// One threshold over every targeted weight.
    Global,
    /// One threshold per tensor.
    Layer,
    /// One threshold per output row (`row`, or its synonym `neuron`).
    Row,
}

impl Scope {
    /// The scope as written, else `row` for criteria that read `act(x)`
    /// (Wanda compares within each output row, as in the paper) and
    /// `global` for the others.
    pub fn of(written: Option<&Value>, reads_acts: bool) -> Scope {
        Scope::of_stage(written, reads_acts, None)
    }

    /// As [`Scope::of`], for a stage that may remove whole units: those are
    /// compared per layer unless the stage says otherwise.
    pub fn of_stage(written: Option<&Value>, reads_acts: bool, unit: Option<Unit>) -> Scope {
        match written.and_then(|v| v.as_str()) {
            Some("layer") => Scope::Layer,
            Some("row" | "neuron") => Scope::Row,
            Some(_) => Scope::Global,
            None if unit.is_some() => Scope::Layer,
            None if reads_acts => Scope::Row,
            None => Scope::Global,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::Layer => "layer",
            Scope::Row => "row",
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a prune stage removes whole (`unit = ...`): a linear layer's output
/// neuron or a convolution's output channel, each with the parameters that
/// move with it; the model becomes physically smaller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    Neuron,
    Channel,
    /// A language model's FFN neuron (every block alike).
    Ffn,
    /// A language model's key/value head with its query heads.
    KvGroup,
    /// A language model's query head (each kv group keeps as many).
    Head,
    /// A mixture-of-experts block's expert (every sparse block alike).
    Expert,
    /// One intermediate neuron of an expert (an atomic expert).
    ExpertNeuron,
}

impl Unit {
    /// The unit a `unit = ...` option names.
    pub fn of(written: Option<&Value>) -> Option<Unit> {
        match written.and_then(|v| v.as_str())? {
            "neuron" => Some(Unit::Neuron),
            "channel" => Some(Unit::Channel),
            "ffn" => Some(Unit::Ffn),
            "kv_group" => Some(Unit::KvGroup),
            "head" => Some(Unit::Head),
            "expert" => Some(Unit::Expert),
            "expert_neuron" => Some(Unit::ExpertNeuron),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Neuron => "neuron",
            Unit::Channel => "channel",
            Unit::Ffn => "ffn",
            Unit::KvGroup => "kv_group",
            Unit::Head => "head",
            Unit::Expert => "expert",
            Unit::ExpertNeuron => "expert_neuron",
        }
    }

    /// Whether it is a language model's unit.
    pub fn of_language_models(self) -> bool {
        matches!(
            self,
            Unit::Ffn | Unit::KvGroup | Unit::Head | Unit::Expert | Unit::ExpertNeuron
        )
    }

    /// Whether it is a mixture-of-experts unit (scored by the expert scores).
    pub fn of_experts(self) -> bool {
        matches!(self, Unit::Expert | Unit::ExpertNeuron)
    }
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What prunes: a scoring criterion, or one of the built-in methods that
/// decide what to remove themselves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Criterion,
    /// SparseGPT: OBS reconstruction of language-model linear layers.
    SparseGpt,
    /// SAP: PQ-index-driven adaptive pruning.
    Sap,
    /// WoodFisher: OBS with a block-diagonal empirical Fisher inverse.
    WoodFisher,
    /// M-FAC: OBS with matrix-free inverse-Fisher products.
    MFac,
    /// ARMOR: block-diagonal wrappers around an N:M-pruned layer.
    Armor,
    /// HEAPr: second-order importance of (atomic) experts.
    Heapr,
    /// REAP: routing weight × expert output norm.
    Reap,
    /// How often the router picks an expert.
    Frequency,
}

impl Method {
    /// The scores of mixture-of-experts units (`heapr`, `reap`, `frequency`).
    pub fn scores_experts(self) -> bool {
        matches!(self, Method::Heapr | Method::Reap | Method::Frequency)
    }

    /// OBS pruning with an empirical Fisher (`woodfisher`, `mfac`).
    pub fn is_obs(self) -> bool {
        matches!(self, Method::WoodFisher | Method::MFac)
    }

    /// The built-in's name as a recipe writes it.
    pub fn name(self) -> &'static str {
        match self {
            Method::Criterion => "criterion",
            Method::SparseGpt => "sparsegpt",
            Method::Sap => "sap",
            Method::WoodFisher => "woodfisher",
            Method::MFac => "mfac",
            Method::Armor => "armor",
            Method::Heapr => "heapr",
            Method::Reap => "reap",
            Method::Frequency => "frequency",
        }
    }

    /// The method a `by` expression names.
    pub fn of(r: &CheckedRecipe, by: &Expr) -> Method {
        let name = match &by.kind {
            ExprKind::Call { callee, .. } => &callee.name,
            ExprKind::Name(id) if !r.symbols.contains_key(&id.name) => &id.name,
            _ => return Method::Criterion,
        };
        Method::named(name).unwrap_or(Method::Criterion)
    }

    /// A built-in method's numeric arguments as the call gives them
    /// (`sparsegpt(block = 64)`, `sap(0.5, 1.0)`): positional ones named by
    /// the built-in's signature, unwritten ones at their defaults, params
    /// folded. None for a criterion; `Err` with the span of an argument
    /// that is not a constant number.
    pub fn arguments(r: &CheckedRecipe, by: &Expr) -> Result<BTreeMap<String, f64>, Span> {
        let (name, args) = match &by.kind {
            ExprKind::Call { callee, args } => (&callee.name, Some(args)),
            ExprKind::Name(id) => (&id.name, None),
            _ => return Ok(BTreeMap::new()),
        };
        if Method::of(r, by) == Method::Criterion {
            return Ok(BTreeMap::new());
        }
        let Some(b) = builtins::lookup(name) else {
            return Ok(BTreeMap::new());
        };
        let positional: Vec<&Expr> = args
            .into_iter()
            .flat_map(|a| a.items.iter())
            .filter(|a| a.name.is_none())
            .map(|a| &a.value)
            .collect();
        let mut out = BTreeMap::new();
        for (i, p) in b.params.iter().enumerate() {
            // Words (`init = wanda`) are read from the call itself.
            if matches!(p.ty, builtins::Ty::Enum(_)) {
                continue;
            }
            let written = args
                .and_then(|a| a.named(p.name))
                .map(|a| &a.value)
                .or_else(|| positional.get(i).copied());
            let value = match written {
                Some(e) => r.constant(e).ok_or(e.span)?,
                None => match p.default.and_then(|d| crate::parse::source_to_expr(d).ok()) {
                    Some(d) => r.constant(&d).ok_or(by.span)?,
                    None => continue,
                },
            };
            out.insert(p.name.to_string(), value);
        }
        Ok(out)
    }

    /// A built-in method's word argument (`armor(init = wanda)`), by name or
    /// position, a param holding the word resolved, its default when
    /// unwritten; none for a criterion or a parameter that is not a word.
    pub fn word_argument(r: &CheckedRecipe, by: &Expr, key: &str) -> Option<String> {
        let (name, args) = match &by.kind {
            ExprKind::Call { callee, args } => (&callee.name, Some(args)),
            ExprKind::Name(id) => (&id.name, None),
            _ => return None,
        };
        if Method::of(r, by) == Method::Criterion {
            return None;
        }
        let b = builtins::lookup(name)?;
        let i = b.params.iter().position(|p| p.name == key)?;
        if !matches!(b.params[i].ty, builtins::Ty::Enum(_)) {
            return None;
        }
        match args.and_then(|a| a.get(key, i)) {
            Some(a) => {
                let word = match &a.value.kind {
                    ExprKind::Str(w) => return Some(w.clone()),
                    _ => a.value.as_name()?.name.clone(),
                };
                Some(match r.param(&word).and_then(|v| v.as_str()) {
                    Some(w) => w.to_string(),
                    None => word,
                })
            }
            None => b.params[i].default.map(String::from),
        }
    }

    /// The built-in method of this name (`sparsegpt`, `sap`), if it is one.
    pub fn named(name: &str) -> Option<Method> {
        match builtins::lookup(name)
            .filter(|b| b.kind == Kind::Method)?
            .name
        {
            "sparsegpt" => Some(Method::SparseGpt),
            "sap" => Some(Method::Sap),
            "woodfisher" => Some(Method::WoodFisher),
            "mfac" => Some(Method::MFac),
            "armor" => Some(Method::Armor),
            "heapr" => Some(Method::Heapr),
            "reap" => Some(Method::Reap),
            "frequency" => Some(Method::Frequency),
            _ => None,
        }
    }
}

/// What a data set is pruned by: a per-sample score computed with a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataScore {
    El2n,
    Grand,
    Forgetting,
    Random,
}

impl DataScore {
    pub fn named(name: &str) -> Option<DataScore> {
        Some(match builtins::data_score(name)?.name {
            "el2n" => DataScore::El2n,
            "grand" => DataScore::Grand,
            "forgetting" => DataScore::Forgetting,
            "random" => DataScore::Random,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            DataScore::El2n => "el2n",
            DataScore::Grand => "grand",
            DataScore::Forgetting => "forgetting",
            DataScore::Random => "random",
        }
    }

    /// The score and the model it reads, from a `by` clause as checked
    /// (`el2n(net)`, `random()` or `random`).
    pub fn of(by: &Expr) -> Option<(DataScore, Option<String>)> {
        match &by.kind {
            ExprKind::Call { callee, args } => {
                let score = DataScore::named(&callee.name)?;
                let model = args
                    .items
                    .first()
                    .and_then(|a| a.value.as_name())
                    .map(|n| n.name.clone());
                Some((score, model))
            }
            ExprKind::Name(id) => Some((DataScore::named(&id.name)?, None)),
            _ => None,
        }
    }
}

/// Which schedule a `schedule = ...` value names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    OneShot,
    Iterative,
    Gradual,
}

impl ScheduleKind {
    /// The schedule constructor of this name.
    pub fn named(name: &str) -> Option<ScheduleKind> {
        match builtins::lookup(name)
            .filter(|b| b.kind == Kind::Schedule)?
            .name
        {
            "oneshot" => Some(ScheduleKind::OneShot),
            "iterative" => Some(ScheduleKind::Iterative),
            // PDP runs during training like `gradual`, with soft masks.
            "gradual" | "pdp" => Some(ScheduleKind::Gradual),
            _ => None,
        }
    }
}

/// How a prune stage reaches its target (`schedule = ...`), its arguments
/// resolved to values.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub enum Schedule {
    /// Everything at once (also `rounds = k` without a schedule: `k` rounds).
    OneShot { rounds: usize },
    /// `iterative(rounds, rewind)`: the target in `rounds` geometric steps.
    Iterative {
        rounds: usize,
        rewind: Option<Value>,
    },
    /// `gradual(...)`: pruning steps during a training stage.
    Gradual(Value),
}

impl Schedule {
    /// The schedule of a prune stage, following a named schedule declaration.
    pub fn of(r: &CheckedRecipe, stage: &crate::ast::Stage) -> Schedule {
        let written = r.option(stage, "schedule").map(|v| match v {
            Value::Ref(name) => r
                .symbols
                .get(name)
                .and_then(|s| s.value.clone())
                .unwrap_or_else(|| v.clone()),
            other => other.clone(),
        });
        let count = |v: Option<&Value>| v.and_then(|r| r.as_i64()).unwrap_or(1).max(1) as usize;
        match written
            .as_ref()
            .and_then(|v| v.call_name())
            .and_then(ScheduleKind::named)
        {
            Some(ScheduleKind::Iterative) => {
                let v = written.as_ref().expect("a call");
                Schedule::Iterative {
                    rounds: count(v.arg("rounds")),
                    rewind: v.arg("rewind").cloned(),
                }
            }
            Some(ScheduleKind::Gradual) => Schedule::Gradual(written.expect("a call")),
            _ => Schedule::OneShot {
                rounds: count(r.option(stage, "rounds")),
            },
        }
    }

    /// Rounds of pruning before the stage ends (gradual: decided by training).
    pub fn rounds(&self) -> Option<usize> {
        match self {
            Schedule::OneShot { rounds } | Schedule::Iterative { rounds, .. } => Some(*rounds),
            Schedule::Gradual(_) => None,
        }
    }
}

/// What an `evaluate` stage measures (`-> [accuracy, sparsity]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    Accuracy,
    Loss,
    Perplexity,
    Sparsity,
    Pqi,
    Params,
    Flops,
    /// Median wall time of one forward pass over a batch (a timing).
    Latency,
    /// Samples per second of that forward pass (a timing).
    Throughput,
    /// Kendall's τ of an oracle study (an `analyze` stage's result).
    KendallTau,
    /// Criterion agreement: rank correlation and pruned-set overlap.
    Spearman,
    Overlap,
}

impl Metric {
    /// A wall-time measurement: different on every run and machine.
    pub fn is_timing(self) -> bool {
        matches!(self, Metric::Latency | Metric::Throughput)
    }

    /// A result of an `analyze` stage, not something `evaluate` measures.
    pub fn is_study(self) -> bool {
        matches!(
            self,
            Metric::KendallTau | Metric::Spearman | Metric::Overlap
        )
    }

    /// The built-in metric of this name.
    pub fn named(name: &str) -> Option<Metric> {
        Some(
            match builtins::lookup(name)
                .filter(|b| b.kind == Kind::Metric)?
                .name
            {
                "accuracy" => Metric::Accuracy,
                "loss" => Metric::Loss,
                "perplexity" => Metric::Perplexity,
                "sparsity" => Metric::Sparsity,
                "pqi" => Metric::Pqi,
                "params" => Metric::Params,
                "flops" => Metric::Flops,
                "latency" => Metric::Latency,
                "throughput" => Metric::Throughput,
                "kendall_tau" => Metric::KendallTau,
                "spearman" => Metric::Spearman,
                "overlap" => Metric::Overlap,
                _ => return None,
            },
        )
    }

    /// The metric's name, as recipes and reports write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::Loss => "loss",
            Metric::Perplexity => "perplexity",
            Metric::Sparsity => "sparsity",
            Metric::Pqi => "pqi",
            Metric::Params => "params",
            Metric::Flops => "flops",
            Metric::Latency => "latency",
            Metric::Throughput => "throughput",
            Metric::KendallTau => "kendall_tau",
            Metric::Spearman => "spearman",
            Metric::Overlap => "overlap",
        }
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_metric_has_a_variant_with_its_name() {
        let metrics: Vec<&str> = builtins::BUILTINS
            .iter()
            .filter(|b| b.kind == Kind::Metric)
            .map(|b| b.name)
            .collect();
        assert!(metrics.len() >= 7);
        for name in metrics {
            let m = Metric::named(name).unwrap_or_else(|| panic!("no variant for `{name}`"));
            assert_eq!(m.as_str(), name);
        }
        assert_eq!(Metric::named("nope"), None);
    }

    fn prune_args(by: &str) -> BTreeMap<String, f64> {
        let src = format!(
            "recipe t {{ version = 1, seed = 1 }}\nuse std.{{sap, magnitude}}\nparam q = 2\n\
             model net = mlp(inputs = 784, hidden = [30], classes = 10)\n\
             pipeline {{\n  prune net by {by} (rounds = 2)\n}}\n"
        );
        let parsed = crate::source_to_ast(&src);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let r = crate::ast_to_checked(&parsed.recipe, &src, &[]).expect("checks");
        let stage = &r.pipeline().stages[0];
        Method::arguments(&r, stage.by.as_ref().unwrap()).unwrap()
    }

    #[test]
    fn method_arguments_are_named_folded_and_defaulted() {
        let a = prune_args("sap(0.25, q, gamma = 1.5)");
        assert_eq!(a["p"], 0.25, "positional, by the signature's order");
        assert_eq!(a["q"], 2.0, "a param, folded");
        assert_eq!(a["gamma"], 1.5, "named");
        assert_eq!((a["eta"], a["beta"]), (0.001, 0.9), "defaults");
        assert_eq!(prune_args("sap")["q"], 1.0, "without a call: all defaults");
        assert!(
            prune_args("magnitude to 50%").is_empty(),
            "a criterion has none"
        );
    }

    #[test]
    fn word_arguments_resolve_params_strings_and_defaults() {
        let word = |by: &str| {
            let src = format!(
                "recipe t {{ version = 1, seed = 1 }}\nuse std.armor\nparam how = wanda\n\
                 model lm = gguf(\"m.gguf\")\n\
                 dataset calib = text(\"t.txt\", tokenizer = lm)\n\
                 pipeline {{\n  prune lm by {by} to 2:4 (calibrate = calib)\n}}\n"
            );
            let parsed = crate::source_to_ast(&src);
            let r = crate::ast_to_checked(&parsed.recipe, &src, &[]).expect("checks");
            let stage = &r.pipeline().stages[0];
            Method::word_argument(&r, stage.by.as_ref().unwrap(), "init")
        };
        assert_eq!(word("armor(init = wanda)").as_deref(), Some("wanda"));
        assert_eq!(
            word("armor(init = how)").as_deref(),
            Some("wanda"),
            "a param"
        );
        assert_eq!(word("armor(init = \"wanda\")").as_deref(), Some("wanda"));
        assert_eq!(
            word("armor(8, 2, wanda)").as_deref(),
            Some("wanda"),
            "positional"
        );
        assert_eq!(word("armor()").as_deref(), Some("sparsegpt"), "the default");
        assert_eq!(word("armor").as_deref(), Some("sparsegpt"));
    }
}

/// How a prune stage groups what it keeps (`pattern = ...`, or `to 2:4`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Pattern {
    /// Keep the `n` highest-scoring of every `m` consecutive weights along a row.
    NM { n: u64, m: u64 },
    /// Keep or prune whole `rows x cols` blocks, to the stage's target.
    Block { rows: usize, cols: usize },
}

impl Pattern {
    /// The pattern a resolved `pattern` value names.
    pub fn of(v: &Value) -> Option<Pattern> {
        match v {
            Value::Pattern { n, m } => Some(Pattern::NM { n: *n, m: *m }),
            Value::Call { name, .. } if name == "block" => {
                let side = |k: &str| v.arg(k).and_then(|x| x.as_i64()).unwrap_or(1).max(1) as usize;
                Some(Pattern::Block {
                    rows: side("rows"),
                    cols: side("cols"),
                })
            }
            _ => None,
        }
    }

    /// The sparsity an N:M pattern fixes (`1 - n/m`); none for blocks,
    /// which prune to the stage's target.
    pub fn fixed_sparsity(self) -> Option<f64> {
        match self {
            Pattern::NM { n, m } => Some(1.0 - n as f64 / m as f64),
            Pattern::Block { .. } => None,
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::NM { n, m } => write!(f, "{n}:{m}"),
            Pattern::Block { rows, cols } => write!(f, "block({rows}, {cols})"),
        }
    }
}
