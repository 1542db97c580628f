//! Checks of declarations and pipeline stages: clauses, options, data needs, metrics.

use super::{Checker, SymKind, Value};
use crate::ast::*;
use crate::builtins::{self, Kind, Needs, Range, Ty};
use crate::diag::{did_you_mean, Code, Diagnostic};
use crate::resolved::{Method, Metric, ScheduleKind};
use std::collections::{BTreeMap, BTreeSet};

/// The type of a param, inferred from its default.
fn param_type(v: &Value) -> Option<Ty> {
    Some(match v {
        Value::Int(_) => Ty::Int,
        Value::Float(_) => Ty::Float,
        Value::Fraction(_) => Ty::Fraction,
        Value::Bool(_) => Ty::Bool,
        Value::Str(_) => Ty::Str,
        Value::Pattern { .. } => Ty::Pattern,
        Value::Duration { .. } => Ty::Duration,
        Value::PerUnit(..) => Ty::FractionOrCount,
        _ => return None,
    })
}

/// What the pipeline has evaluated so far, for `assert`.
#[derive(Default)]
struct Evaluated {
    /// Metric → the stage that first evaluated it.
    metrics: BTreeMap<String, Span>,
    /// Label (`as dense`) → its metrics.
    labels: BTreeMap<String, (Span, BTreeSet<String>)>,
    /// Models a `calibrate` stage collected activation statistics of.
    calibrated: BTreeSet<String>,
    /// Per model: epochs trained by the top-level stages so far, and whether
    /// that count is exact (no `steps`, no training inside blocks or `during`).
    trained: BTreeMap<String, (u64, bool)>,
    /// Output paths the stages write so far (exports and plots), and where.
    outputs: BTreeMap<String, Span>,
}

impl<'a> Checker<'a> {
    pub(super) fn check_decls(&mut self, recipe: &Recipe) {
        for item in &recipe.items {
            match item {
                Item::Param(p) => self.check_param(p),
                Item::Decl(d) => {
                    let value = match d.kind {
                        DeclKind::Criterion => {
                            self.criterion_stack.push(d.name.name.clone());
                            let mut needs = Needs::default();
                            self.check_score(&d.value, &mut needs, 0);
                            self.criterion_stack.pop();
                            Some(Value::Score(self.text(d.value.span).to_string()))
                        }
                        DeclKind::Model => self.eval(&d.value, Ty::Of(Kind::Model), Range::any()),
                        DeclKind::Dataset => {
                            self.eval(&d.value, Ty::Of(Kind::Dataset), Range::any())
                        }
                        DeclKind::Schedule => {
                            self.eval(&d.value, Ty::Of(Kind::Schedule), Range::any())
                        }
                    };
                    if let Some(s) = self.symbols.get_mut(&d.name.name) {
                        if s.span == d.name.span {
                            s.value = value;
                        }
                    }
                }
                Item::Constraints(c) => {
                    let opts = self.check_options(
                        &c.fields
                            .iter()
                            .map(|f| (&f.key, &f.value, f.span))
                            .collect::<Vec<_>>(),
                        &builtins::CONSTRAINT_FIELDS,
                        "a constraint set",
                    );
                    let value = Value::Call {
                        name: "constraints".into(),
                        args: opts.into_iter().collect(),
                    };
                    if let Some(s) = self.symbols.get_mut(&c.name.name) {
                        if s.span == c.name.span {
                            s.value = Some(value);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    fn check_param(&mut self, p: &ParamDecl) {
        let default = match &p.value.kind {
            ExprKind::Name(id) => Some(Value::Word(id.name.clone())),
            ExprKind::List(items) if items.iter().all(|i| matches!(i.kind, ExprKind::Str(_))) => {
                self.eval(&p.value, Ty::Globs, Range::any())
            }
            ExprKind::List(_) => self.eval(&p.value, Ty::Ints, Range::any()),
            ExprKind::Percent { .. } => self.eval(&p.value, Ty::Fraction, Range::any()),
            ExprKind::Number { value, .. } if value.fract() == 0.0 => {
                self.eval(&p.value, Ty::Int, Range::any())
            }
            ExprKind::Str(_) => self.eval(&p.value, Ty::Str, Range::any()),
            ExprKind::Bool(_) => self.eval(&p.value, Ty::Bool, Range::any()),
            ExprKind::Pattern { .. } => self.eval(&p.value, Ty::Pattern, Range::any()),
            ExprKind::Duration { .. } => self.eval(&p.value, Ty::Duration, Range::any()),
            ExprKind::Per { .. } => self.eval(&p.value, Ty::FractionOrCount, Range::any()),
            ExprKind::Call { .. } | ExprKind::Member { .. } => {
                self.push(
                    Diagnostic::new(Code::WrongType, format!("param `{}` must be a constant", p.name.name))
                        .with_label(p.value.span, "not a constant")
                        .with_help("params hold numbers, percentages, strings, booleans, patterns, durations, words or lists; declare models, data and schedules with their own keywords"),
                );
                None
            }
            _ => self.eval(&p.value, Ty::Float, Range::any()),
        };
        let mut value = default.clone();
        if let Some(text) = self.overrides.get(&p.name.name).copied() {
            value = self.override_value(p, text, default.as_ref());
        }
        if let Some(s) = self.symbols.get_mut(&p.name.name) {
            if s.span == p.name.span {
                s.value = value;
            }
        }
    }

    /// Type-checks a `--set` value against the param's default.
    fn override_value(
        &mut self,
        p: &ParamDecl,
        text: &'a str,
        default: Option<&Value>,
    ) -> Option<Value> {
        let default = default?;
        let fail = |this: &mut Self, why: String| {
            this.push(
                Diagnostic::new(
                    Code::Override,
                    format!("`--set {}={}`: {why}", p.name.name, text),
                )
                .with_label(
                    p.name.span,
                    format!(
                        "`{}` is declared here as {}",
                        p.name.name,
                        default.type_name()
                    ),
                )
                .with_help(match default {
                    // A path typed bare parses as arithmetic; the shell eats plain quotes.
                    Value::Str(_) if !text.trim_start().starts_with('"') => format!(
                        "a string is quoted, and the quotes protected from the shell: `--set '{}=\"{}\"'`",
                        p.name.name,
                        text.trim()
                    ),
                    _ => format!("give a value like the default, `{default}`"),
                }),
            );
            None
        };
        let expr = match crate::parse::source_to_expr(text) {
            Ok(e) => e,
            Err(d) => return fail(self, format!("not a value ({})", d.message)),
        };
        let v = match (&expr.kind, default) {
            (ExprKind::Name(id), Value::Word(_)) => Some(Value::Word(id.name.clone())),
            (_, Value::Word(_)) => None,
            (_, d) => {
                // A sparsity target is a fraction or an N:M pattern (`to 50%`,
                // `to 2:4`): a param declared as one takes the other too; a use
                // that needs the declared kind reports the mismatch there.
                let target = match (&expr.kind, d) {
                    (ExprKind::Pattern { .. }, Value::Fraction(_)) => Some(Ty::Pattern),
                    (ExprKind::Percent { .. } | ExprKind::Number { .. }, Value::Pattern { .. }) => {
                        Some(Ty::Fraction)
                    }
                    _ => None,
                };
                let ty = target.or(param_type(d)).or(match d {
                    Value::List(items) if items.iter().all(|i| matches!(i, Value::Str(_))) => {
                        Some(Ty::Globs)
                    }
                    Value::List(_) => Some(Ty::Ints),
                    _ => None,
                });
                match ty {
                    Some(ty) => {
                        // Evaluate against the override's own text (the spans of `expr` index
                        // it), reporting in its terms.
                        let before = self.diags.len();
                        let saved = std::mem::replace(&mut self.src, text);
                        let v = self.eval(&expr, ty, Range::any());
                        self.src = saved;
                        let errs: Vec<Diagnostic> = self.diags.drain(before..).collect();
                        match (v, errs.first()) {
                            (Some(v), None) => Some(v),
                            (_, Some(e)) => return fail(self, e.message.clone()),
                            (None, None) => None,
                        }
                    }
                    None => None,
                }
            }
        };
        match v {
            Some(v) => Some(v),
            None => fail(self, format!("expected {}", default.type_name())),
        }
    }

    /// Checks `key = value` options against the stage-option table.
    fn check_options(
        &mut self,
        opts: &[(&Ident, &Expr, Span)],
        allowed: &[&str],
        what: &str,
    ) -> BTreeMap<String, Value> {
        let mut out = BTreeMap::new();
        let mut seen: BTreeMap<String, Span> = BTreeMap::new();
        for (key, value, span) in opts {
            if let Some(prev) = seen.insert(key.name.clone(), key.span) {
                self.push(
                    Diagnostic::new(
                        Code::DuplicateArgument,
                        format!("`{}` is given twice", key.name),
                    )
                    .with_label(*span, "given again here")
                    .with_label(prev, "first given here"),
                );
                continue;
            }
            let Some(opt) =
                builtins::stage_option(&key.name).filter(|_| allowed.contains(&key.name.as_str()))
            else {
                self.push(
                    Diagnostic::new(
                        Code::UnknownArgument,
                        format!("`{}` is not an option of {what}", key.name),
                    )
                    .with_label(key.span, "unknown option")
                    .with_help(
                        did_you_mean(&key.name, allowed.iter().copied()).unwrap_or_else(|| {
                            if allowed.is_empty() {
                                format!("{what} takes no options")
                            } else {
                                format!("its options are: {}", allowed.join(", "))
                            }
                        }),
                    ),
                );
                continue;
            };
            let p = opt.params[0];
            if let Some(v) = self.eval(value, p.ty, p.range) {
                out.insert(key.name.clone(), v);
            }
        }
        out
    }

    pub(super) fn check_pipeline(&mut self, p: &Pipeline) {
        if p.stages.is_empty() {
            self.push(
                Diagnostic::new(Code::StageClause, "the pipeline is empty")
                    .with_label(
                        Span::new(p.span.start, p.span.start + "pipeline".len()),
                        "no stages",
                    )
                    .with_help("add stages such as `train net on data (epochs = 1)`"),
            );
        }
        let mut evaluated = Evaluated::default();
        for s in &p.stages {
            self.check_stage(s, &mut evaluated, None);
        }
    }

    /// The model named by a stage's subject.
    fn expect_model(&mut self, s: &Stage) {
        match s.subject.as_slice() {
            [] => self.push(
                Diagnostic::new(Code::StageClause, format!("`{}` needs a model", s.kind))
                    .with_label(s.keyword_span, format!("write `{} MODEL ...`", s.kind)),
            ),
            [m] => {
                self.eval(m, Ty::Of(Kind::Model), Range::any());
            }
            [_, second, ..] => self.push(
                Diagnostic::new(
                    Code::StageClause,
                    format!("`{}` works on one model", s.kind),
                )
                .with_label(second.span, "unexpected second subject"),
            ),
        }
    }

    /// A stage whose (first) subject names a declared data set.
    fn subject_is_dataset(&self, s: &Stage) -> bool {
        s.subject
            .first()
            .and_then(|e| e.as_name())
            .and_then(|n| self.symbols.get(&n.name))
            .is_some_and(|sym| sym.kind == SymKind::Dataset)
    }

    fn forbid(&mut self, s: &Stage, clause: &str, present: Option<Span>) {
        if let Some(span) = present {
            self.push(
                Diagnostic::new(
                    Code::StageClause,
                    format!("{} stage takes no `{clause}` clause", s.kind.a()),
                )
                .with_label(span, "not allowed here")
                .with_help(stage_usage(s.kind)),
            );
        }
    }

    pub(super) fn require(&mut self, s: &Stage, clause: &str, present: bool) -> bool {
        if !present {
            self.push(
                Diagnostic::new(
                    Code::StageClause,
                    format!("{} stage needs `{clause}`", s.kind.a()),
                )
                .with_label(
                    s.keyword_span
                        .join(s.subject.last().map(|e| e.span).unwrap_or(s.keyword_span)),
                    format!("`{clause}` is missing"),
                )
                .with_help(stage_usage(s.kind)),
            );
        }
        present
    }

    fn check_stage(&mut self, s: &Stage, ev: &mut Evaluated, parent: Option<&Stage>) {
        use StageKind::*;
        let clause_span = |e: &Option<Expr>| e.as_ref().map(|e| e.span);
        // Clauses each kind accepts.
        let (on, by, to, out, label) = match s.kind {
            Train | Finetune | Calibrate => (true, false, false, false, false),
            Prune => (true, true, true, false, false),
            Evaluate => (true, false, false, true, true),
            Assert => (false, false, false, false, false),
            Export => (false, false, true, false, false),
            Report => (false, false, false, true, false),
            Analyze => (true, true, true, true, true),
        };
        if !on {
            self.forbid(s, "on", clause_span(&s.on));
        }
        if !by {
            self.forbid(s, "by", clause_span(&s.by));
        }
        if !to {
            self.forbid(s, "to", clause_span(&s.to));
        }
        if !out {
            self.forbid(s, "->", clause_span(&s.out));
        }
        if !label {
            self.forbid(s, "as", s.label.as_ref().map(|l| l.span));
        }
        if s.kind != Prune {
            self.forbid(s, "during", s.during.as_ref().map(|d| d.keyword_span));
            if let Some(b) = &s.block {
                self.push(
                    Diagnostic::new(
                        Code::StageBlock,
                        format!("{} stage cannot hold a block", s.kind.a()),
                    )
                    .with_label(
                        Span::new(b.span.start, b.span.start + 1),
                        "block not allowed here",
                    )
                    .with_help("`{ each round: ... }` belongs to a `prune` stage with rounds"),
                );
            }
        }
        // Options.
        let allowed = builtins::stage_options(s.kind);
        let opts: Vec<(&Ident, &Expr, Span)> = match &s.args {
            Some(args) => {
                let mut v = Vec::new();
                for a in &args.items {
                    match &a.name {
                        Some(n) => v.push((n, &a.value, a.span)),
                        None => self.push(
                            Diagnostic::new(
                                Code::StageClause,
                                "stage options are written `name = value`",
                            )
                            .with_label(a.span, "an option without a name")
                            .with_help(if allowed.is_empty() {
                                format!("{} stage takes no options", s.kind.a())
                            } else {
                                format!("options of `{}`: {}", s.kind, allowed.join(", "))
                            }),
                        ),
                    }
                }
                v
            }
            None => vec![],
        };
        let what = format!("{} stage", s.kind.a());
        let mut options = self.check_options(&opts, allowed, &what);

        match s.kind {
            Train | Finetune | Calibrate => {
                self.expect_model(s);
                if s.kind == Calibrate {
                    if let Some(m) = s.subject.first().and_then(|e| e.as_name()) {
                        ev.calibrated.insert(m.name.clone());
                    }
                }
                if self.require(s, "on DATASET", s.on.is_some()) {
                    self.eval(s.on.as_ref().unwrap(), Ty::Of(Kind::Dataset), Range::any());
                }
                if options.contains_key("epochs") && options.contains_key("steps") {
                    self.push(
                        Diagnostic::new(Code::StageClause, "give `epochs` or `steps`, not both")
                            .with_label(s.args.as_ref().unwrap().span, "both given"),
                    );
                }
                if let (false, Some(m)) = (
                    s.kind == Calibrate,
                    s.subject.first().and_then(|e| e.as_name()),
                ) {
                    let t = ev.trained.entry(m.name.clone()).or_insert((0, true));
                    let epochs = options.get("epochs").and_then(|v| v.as_i64());
                    match (parent, epochs, options.contains_key("steps")) {
                        (None, Some(n), false) => t.0 += n.max(0) as u64,
                        (None, None, false) => t.0 += 1,
                        _ => t.1 = false,
                    }
                }
            }
            Prune if self.subject_is_dataset(s) => {
                self.check_prune_data(s, &options, parent, &mut |c, d| {
                    c.check_stage(d, ev, Some(s))
                });
            }
            Prune => {
                self.forbid_data_options(s, &options);
                self.check_prune(s, &mut options, ev, parent)
            }
            Evaluate => {
                self.expect_model(s);
                if self.require(s, "on DATASET", s.on.is_some()) {
                    self.eval(s.on.as_ref().unwrap(), Ty::Of(Kind::Dataset), Range::any());
                }
                let mut metrics = BTreeSet::new();
                if self.require(s, "-> [METRICS]", s.out.is_some()) {
                    let out = s.out.as_ref().unwrap();
                    let list = match &out.kind {
                        ExprKind::List(_) => self.eval(out, Ty::Metrics, Range::any()),
                        _ => self.eval(
                            &Expr {
                                kind: ExprKind::List(vec![out.clone()]),
                                span: out.span,
                            },
                            Ty::Metrics,
                            Range::any(),
                        ),
                    };
                    if let Some(Value::List(items)) = list {
                        for m in items {
                            if let Value::Word(m) = m {
                                if Metric::named(&m).is_some_and(Metric::is_study) {
                                    self.push(
                                        Diagnostic::new(Code::Unsupported, format!("`{m}` is what an `analyze` stage measures, not an evaluation"))
                                            .with_label(out.span, "not evaluated")
                                            .with_help("run `analyze MODEL on DATA by oracle(test = DATA) to F as LABEL` and read `LABEL.kendall_tau`"),
                                    );
                                    continue;
                                }
                                ev.metrics.entry(m.clone()).or_insert(s.span);
                                metrics.insert(m);
                            }
                        }
                    }
                }
                if let Some(l) = &s.label {
                    self.register_label(l, ev, metrics);
                }
            }
            Assert => match s.subject.as_slice() {
                [] => {
                    self.require(s, "a condition", false);
                }
                [cond] => self.check_condition(cond, ev),
                [_, extra, ..] => self.push(
                    Diagnostic::new(Code::StageClause, "an `assert` takes one condition")
                        .with_label(extra.span, "join conditions with `and`"),
                ),
            },
            Analyze => self.check_analyze(s, ev, parent),
            Export => {
                self.expect_model(s);
                if self.require(s, "to \"PATH\"", s.to.is_some()) {
                    let to = s.to.as_ref().unwrap();
                    if let Some(Value::Str(path)) = self.eval(to, Ty::Str, Range::any()) {
                        self.check_export_path(to, &path);
                        self.claim_output(ev, &path, to.span);
                    }
                }
            }
            Report => {
                if s.subject.is_empty() {
                    self.require(s, "metrics to report", false);
                }
                for m in &s.subject {
                    let (base, per) = match &m.kind {
                        ExprKind::Per { base, unit } => (base.as_ref(), Some(unit)),
                        _ => (m, None),
                    };
                    if let Some(u) = per {
                        if u.name != "round" {
                            self.push(
                                Diagnostic::new(
                                    Code::WrongType,
                                    format!("reports are `per round`, not `per {}`", u.name),
                                )
                                .with_label(u.span, "expected `round`"),
                            );
                        }
                    }
                    if let Some(Value::List(items)) = self.eval(
                        &Expr {
                            kind: ExprKind::List(vec![base.clone()]),
                            span: base.span,
                        },
                        Ty::Metrics,
                        Range::any(),
                    ) {
                        for item in items {
                            if let Value::Word(name) = item {
                                if Metric::named(&name).is_some_and(Metric::is_study) {
                                    self.push(
                                        Diagnostic::new(Code::Unsupported, format!("`{name}` is an analysis result, not measured per round"))
                                            .with_label(base.span, "not plotted")
                                            .with_help("the `analyze` stage plots its own study (`-> \"PLOT.svg\"`)"),
                                    );
                                    continue;
                                }
                                if Metric::named(&name).is_some_and(Metric::is_timing) {
                                    self.push(
                                        Diagnostic::new(Code::Unsupported, format!("`{name}` is a timing, different on every run: a plot of it cannot be locked for `prunec verify`"))
                                            .with_label(base.span, "not plotted")
                                            .with_help("evaluate it (`-> [latency]`): the report lists it beside the other metrics"),
                                    );
                                    continue;
                                }
                                // Measured on the model at any time, unlike data metrics.
                                let structural = matches!(
                                    Metric::named(&name),
                                    Some(
                                        Metric::Sparsity
                                            | Metric::Pqi
                                            | Metric::Params
                                            | Metric::Flops
                                    )
                                );
                                if !ev.metrics.contains_key(&name) && !structural {
                                    self.push(
                                        Diagnostic::new(Code::MetricNotEvaluated, format!("`{name}` is reported but never evaluated"))
                                            .with_label(base.span, "no earlier stage evaluates it")
                                            .with_help(format!("add `evaluate MODEL on DATA -> [{name}]` before this stage (or in the round block)")),
                                    );
                                }
                            }
                        }
                    }
                }
                if let Some(out) = &s.out {
                    if let Some(Value::Str(path)) = self.eval(out, Ty::Str, Range::any()) {
                        self.check_export_path(out, &path);
                        self.claim_output(ev, &path, out.span);
                    }
                }
            }
        }
        self.stage_options.insert(s.id, options);
    }

    fn check_prune(
        &mut self,
        s: &Stage,
        options: &mut BTreeMap<String, Value>,
        ev: &mut Evaluated,
        parent: Option<&Stage>,
    ) {
        self.expect_model(s);
        self.check_rewind(s, options, ev);
        if let Some(p) = parent {
            self.push(
                Diagnostic::new(
                    Code::StageBlock,
                    "a `prune` stage cannot be nested in another",
                )
                .with_label(s.keyword_span, "nested prune")
                .with_label(p.keyword_span, "inside this one"),
            );
        }
        if let Some(on) = &s.on {
            self.eval(on, Ty::Of(Kind::Dataset), Range::any());
        }
        // The constraint set may carry options too.
        let mut all = options.clone();
        if let Some(Value::Ref(cname)) = options.get("constraints") {
            if let Some(Value::Call { args, .. }) =
                self.symbols.get(cname).and_then(|s| s.value.clone())
            {
                for (k, v) in args {
                    all.entry(k).or_insert(v);
                }
            }
        }
        // What the method reads.
        let mut needs = Needs::default();
        let mut method: Option<Method> = None;
        if self.require(s, "by CRITERION", s.by.is_some()) {
            let by = s.by.as_ref().unwrap();
            match &by.kind {
                ExprKind::Call { callee, args }
                    if builtins::lookup(&callee.name).is_some_and(|b| b.kind == Kind::Method) =>
                {
                    let bi = builtins::lookup(&callee.name).unwrap();
                    if bi.stdlib && !self.imports.contains_key(bi.name) {
                        self.undefined(callee, Some(Kind::Criterion));
                    } else if let Some(resolved) = self.check_args(bi, args, callee.span) {
                        self.check_method_args(bi.name, by, &resolved);
                    }
                    needs = bi.needs;
                    method = Method::named(bi.name);
                }
                ExprKind::Name(id)
                    if builtins::lookup(&id.name).is_some_and(|b| b.kind == Kind::Method)
                        && !self.symbols.contains_key(&id.name) =>
                {
                    let bi = builtins::lookup(&id.name).unwrap();
                    if bi.stdlib && !self.imports.contains_key(bi.name) {
                        self.undefined(id, Some(Kind::Criterion));
                    }
                    needs = bi.needs;
                    method = Method::named(bi.name);
                }
                _ => self.check_score(by, &mut needs, 0),
            }
        }
        if needs.activations {
            self.stage_reads_acts.insert(s.id);
        }
        // Target.
        let written = |key: &str| s.arg(key).is_some();
        // An N:M pattern fixes the sparsity; a block pattern takes a `to` target.
        let block_written = s
            .arg("pattern")
            .is_some_and(|a| matches!(a.value.kind, ExprKind::Call { .. }));
        let has_pattern = match all.get("pattern") {
            Some(Value::Call { .. }) => false,
            Some(_) => true,
            None => written("pattern") && !block_written,
        };
        let gradual = matches!(options.get("schedule"), Some(v) if self.schedule_kind(v) == Some(ScheduleKind::Gradual));
        // `allocation = pareto(front, pick = knee)`: the knee gives the amount.
        let knee = all.get("allocation").is_some_and(|a| {
            a.call_name() == Some("pareto")
                && a.arg("pick").and_then(|v| v.as_str()) == Some("knee")
        });
        // `to 2:4` (or `to p` with `param p = 2:4`) prunes to an N:M pattern:
        // the same as `pattern = 2:4`, recorded as that option.
        let to_pattern = s.to.as_ref().is_some_and(|to| match &to.kind {
            ExprKind::Pattern { .. } => true,
            ExprKind::Name(id) => matches!(
                self.symbols
                    .get(&id.name)
                    .map(|s| (s.kind, s.value.as_ref())),
                Some((SymKind::Param, Some(Value::Pattern { .. })))
            ),
            _ => false,
        });
        if let (true, Some(to)) = (to_pattern, &s.to) {
            let v = self.eval(to, Ty::Pattern, Range::any());
            if written("pattern") || all.contains_key("pattern") {
                self.push(
                    Diagnostic::new(
                        Code::StageClause,
                        "the pattern is given twice: as the target and as `pattern`",
                    )
                    .with_label(to.span, "the target is an N:M pattern")
                    .with_label(
                        match s.arg("pattern") {
                            Some(a) => a.value.span,
                            None => s.value_span("constraints"),
                        },
                        "and so is this",
                    )
                    .with_help("keep one: `to 2:4`, or `pattern = 2:4` without `to`"),
                );
            } else if let Some(v) = v {
                options.insert("pattern".into(), v);
            }
        } else if let Some(to) = &s.to {
            self.eval(to, Ty::Fraction, Range::sparsity());
            if has_pattern {
                self.push(
                    Diagnostic::new(
                        Code::StageClause,
                        "a prune stage with an N:M `pattern` takes no `to` target",
                    )
                    .with_label(to.span, "the pattern fixes the sparsity")
                    .with_help("remove `to ...`: `2:4` means 50% sparsity"),
                );
            }
        } else if !has_pattern
            && !gradual
            && !written("schedule")
            && method != Some(Method::Sap)
            && !knee
        {
            self.push(
                Diagnostic::new(
                    Code::StageClause,
                    "this `prune` stage has no target sparsity",
                )
                .with_label(
                    s.keyword_span
                        .join(s.by.as_ref().map(|e| e.span).unwrap_or(s.keyword_span)),
                    "how much should it prune?",
                )
                .with_help("add `to 90%` (block patterns too), an N:M `pattern = 2:4`, or a gradual schedule"),
            );
        }
        // Data for what the criterion reads.
        let has_data = s.on.is_some();
        let calibrated = s
            .subject
            .first()
            .and_then(|e| e.as_name())
            .is_some_and(|m| ev.calibrated.contains(&m.name));
        let has_calib = all.contains_key("calibrate") || has_data || calibrated;
        let training = s.during.is_some();
        let by_span = s.by.as_ref().map(|e| e.span).unwrap_or(s.keyword_span);
        if needs.grad && !has_data && s.during.is_none() {
            let (what, label) = match method {
                Some(m) if m.is_obs() => (
                    format!("`{}`", m.name()),
                    "reads per-sample gradients for its Fisher",
                ),
                _ => ("this criterion".to_string(), "reads `grad(w)`"),
            };
            self.push(
                Diagnostic::new(
                    Code::MissingData,
                    format!("{what} reads gradients, but the stage is given no data"),
                )
                .with_label(by_span, label)
                .with_label(s.keyword_span, "no `on DATASET` here")
                .with_help("add `on DATASET` to the prune stage so gradients can be computed"),
            );
        }
        if needs.activations && !has_calib {
            self.push(
                Diagnostic::new(Code::MissingData, "this criterion reads activation statistics, but the stage is given no calibration data")
                    .with_label(by_span, "reads layer inputs")
                    .with_label(s.keyword_span, "no calibration data here")
                    .with_help("add `calibrate = DATASET` to the stage options (or `on DATASET`), or a `calibrate MODEL on DATASET` stage before it"),
            );
        }
        // Calibration data, and calibrating layer after layer, feed criteria
        // that read activations; for any other they would do nothing.
        if !needs.activations {
            for key in ["calibrate", "sequential", "true_sequential"] {
                // OWL's outlier ratios read the calibration data themselves.
                let read = key == "calibrate" && all.contains_key("allocation");
                if all.contains_key(key) && !read {
                    let span = match s.arg(key) {
                        Some(a) => a.value.span,
                        None => s.value_span("constraints"),
                    };
                    self.push(
                        Diagnostic::new(
                            Code::Unsupported,
                            format!("`{key}` has no effect: this criterion reads no activations"),
                        )
                        .with_label(span, "no effect here")
                        .with_label(by_span, "reads no `act(x)`")
                        .with_help(format!("remove `{key}`, or prune by a criterion that reads `act(x)` (such as `std.wanda`)")),
                    );
                }
            }
        }
        if needs.training && !training {
            self.push(
                Diagnostic::new(
                    Code::MissingData,
                    "this criterion accumulates over training steps, but the stage does not train",
                )
                .with_label(by_span, "accumulates during training")
                .with_help("prune `during` a `train`/`finetune` stage: `prune ... (schedule = gradual(...)) during train ...`"),
            );
        }
        // Rounds and blocks.
        let rounds = options.get("rounds").is_some()
            || method == Some(Method::Sap)
            || matches!(options.get("schedule"), Some(v) if self.schedule_kind(v) == Some(ScheduleKind::Iterative));
        if let Some(b) = &s.block {
            if !rounds {
                self.push(
                    Diagnostic::new(
                        Code::StageBlock,
                        "a round block needs a schedule with rounds",
                    )
                    .with_label(
                        Span::new(b.span.start, b.span.start + 1),
                        "runs once per round",
                    )
                    .with_help("use `schedule = iterative(rounds = N)` or `rounds = N`"),
                );
            }
            match &b.each {
                Some(e) if e.name != "round" => self.push(
                    Diagnostic::new(
                        Code::StageBlock,
                        format!("blocks run `each round`, not `each {}`", e.name),
                    )
                    .with_label(e.span, "expected `round`"),
                ),
                None => self.push(
                    Diagnostic::new(
                        Code::StageBlock,
                        "a block inside a prune stage starts with `each round:`",
                    )
                    .with_label(
                        Span::new(b.span.start, b.span.start + 1),
                        "add `each round:` here",
                    ),
                ),
                _ => {}
            }
            for inner in &b.stages {
                if !matches!(
                    inner.kind,
                    StageKind::Train
                        | StageKind::Finetune
                        | StageKind::Evaluate
                        | StageKind::Report
                        | StageKind::Calibrate
                ) {
                    self.push(
                        Diagnostic::new(Code::StageBlock, format!("{} stage cannot run each round", inner.kind.a()))
                            .with_label(inner.keyword_span, "not allowed in a round block")
                            .with_help("round blocks hold `train`, `finetune`, `calibrate`, `evaluate` and `report` stages"),
                    );
                }
                self.check_stage(inner, ev, Some(s));
            }
        }
        if let Some(d) = &s.during {
            if !matches!(d.kind, StageKind::Train | StageKind::Finetune) {
                self.push(
                    Diagnostic::new(
                        Code::StageBlock,
                        format!(
                            "pruning runs during `train` or `finetune`, not `{}`",
                            d.kind
                        ),
                    )
                    .with_label(d.keyword_span, "expected `train` or `finetune`"),
                );
            }
            if rounds {
                self.push(
                    Diagnostic::new(
                        Code::StageBlock,
                        "a prune stage with rounds cannot also run `during` training",
                    )
                    .with_label(d.keyword_span, "here")
                    .with_help("use a gradual schedule with `during`, or rounds with a block"),
                );
            }
            self.check_stage(d, ev, Some(s));
        } else if gradual {
            self.push(
                Diagnostic::new(
                    Code::StageBlock,
                    "a gradual schedule prunes during training",
                )
                .with_label(s.keyword_span, "add `during train MODEL on DATA (...)`"),
            );
        }
    }

    /// `analyze MODEL on DATA by oracle(...) to F -> "PLOT.svg" as LABEL`.
    fn check_analyze(&mut self, s: &Stage, ev: &mut Evaluated, parent: Option<&Stage>) {
        self.expect_model(s);
        if let Some(p) = parent {
            self.push(
                Diagnostic::new(
                    Code::StageBlock,
                    "an `analyze` stage runs at the top level of the pipeline",
                )
                .with_label(s.keyword_span, "nested analysis")
                .with_label(p.keyword_span, "inside this stage"),
            );
        }
        if self.require(s, "on DATASET", s.on.is_some()) {
            self.eval(s.on.as_ref().unwrap(), Ty::Of(Kind::Dataset), Range::any());
        }
        if self.require(s, "by ANALYSIS", s.by.is_some()) {
            let by = s.by.as_ref().unwrap();
            let analysis = match &by.kind {
                ExprKind::Call { callee, .. } | ExprKind::Name(callee) => {
                    builtins::lookup(&callee.name).filter(|b| b.kind == Kind::Analysis)
                }
                _ => None,
            };
            match (analysis, &by.kind) {
                (Some(bi), ExprKind::Call { args, .. }) => {
                    self.check_args(bi, args, by.span);
                    if bi.name != "oracle" {
                        self.check_agreement(s, args);
                    }
                    // The oracle study's accuracy is measured on labelled samples.
                    let test = args.get("test", 0);
                    if let (true, Some(t)) = (bi.name == "oracle", test) {
                        let text = t
                            .value
                            .as_name()
                            .and_then(|n| self.symbols.get(&n.name))
                            .and_then(|sym| sym.value.as_ref())
                            .and_then(|v| v.call_name())
                            == Some("text");
                        if text {
                            self.push(
                                Diagnostic::new(Code::Unsupported, "the oracle study measures accuracy on labelled samples, not text")
                                    .with_label(t.value.span, "text data")
                                    .with_help("give `test` an image or feature data set"),
                            );
                        }
                    }
                }
                (Some(bi), _) => {
                    // A bare name: its required arguments are missing.
                    self.check_args(
                        bi,
                        &Args {
                            items: vec![],
                            span: by.span,
                        },
                        by.span,
                    );
                }
                (None, _) => {
                    let names: Vec<String> = builtins::of_kind(Kind::Analysis)
                        .map(|b| format!("`{}(...)`", b.name))
                        .collect();
                    self.push(
                        Diagnostic::new(Code::WrongKind, "an `analyze` stage runs an analysis")
                            .with_label(by.span, "not an analysis")
                            .with_help(format!("analyses: {}", names.join(", "))),
                    );
                }
            }
        }
        let named = |n: &str| {
            s.by.as_ref().is_some_and(|b| match &b.kind {
                ExprKind::Call { callee, .. } => callee.name == n,
                _ => false,
            })
        };
        if named("search") {
            self.check_search(s);
            if let Some(to) = &s.to {
                self.push(
                    Diagnostic::new(
                        Code::StageClause,
                        "a search spans the sparsities of its `range`, not one `to`",
                    )
                    .with_label(to.span, "not for `search`")
                    .with_help("write the span as `search(wanda, range = [30%, 70%])`; a later prune picks its point with `allocation = pareto(LABEL)`"),
                );
            }
        } else if named("sensitivity") {
            if let Some(to) = &s.to {
                self.push(
                    Diagnostic::new(
                        Code::StageClause,
                        "a sensitivity analysis prunes to its `levels`, not to one `to`",
                    )
                    .with_label(to.span, "not for `sensitivity`")
                    .with_help(
                        "write the sparsities as `sensitivity(CRITERION, levels = [50%, 90%])`",
                    ),
                );
            }
        } else if self.require(s, "to FRACTION", s.to.is_some()) {
            self.eval(s.to.as_ref().unwrap(), Ty::Fraction, Range::sparsity());
        }
        if let Some(out) = &s.out {
            if let Some(Value::Str(path)) = self.eval(out, Ty::Str, Range::any()) {
                self.check_export_path(out, &path);
                self.claim_output(ev, &path, out.span);
                if !path.ends_with(".svg") {
                    self.push(
                        Diagnostic::new(Code::StageClause, "an analysis plots to an `.svg` file")
                            .with_label(out.span, "not `.svg`")
                            .with_help("write `-> \"oracle.svg\"`"),
                    );
                }
            }
        }
        let agreement =
            s.by.as_ref()
                .and_then(|b| match &b.kind {
                    ExprKind::Call { callee, .. } => Some(callee.name == "agreement"),
                    _ => None,
                })
                .unwrap_or(false);
        let results: BTreeSet<String> = if agreement {
            ["spearman", "overlap"].map(String::from).into()
        } else if named("sensitivity") {
            BTreeSet::new()
        } else if named("search") {
            ["points", "knee_perplexity", "knee_sparsity"]
                .map(String::from)
                .into()
        } else {
            BTreeSet::from(["kendall_tau".to_string()])
        };
        for m in &results {
            ev.metrics.entry(m.clone()).or_insert(s.span);
        }
        if let Some(l) = &s.label {
            self.register_label(l, ev, results);
        }
    }

    /// `search(...)`: a range of two increasing sparsities, and the label a
    /// later `allocation = pareto(LABEL)` reads the front by.
    fn check_search(&mut self, s: &Stage) {
        let Some(ExprKind::Call { args, .. }) = s.by.as_ref().map(|b| &b.kind) else {
            return;
        };
        // The range as written, else the built-in's default.
        let written = args.get("range", 3).map(|a| a.value.clone());
        let default = builtins::lookup("search")
            .and_then(|b| b.params.iter().find(|p| p.name == "range"))
            .and_then(|p| p.default)
            .and_then(|d| crate::parse::source_to_expr(d).ok());
        let range = match written.clone().or(default).map(|e| e.kind) {
            Some(ExprKind::List(items)) => {
                let vals: Option<Vec<f64>> =
                    items.iter().map(|i| self.constant_number(i)).collect();
                match (vals.as_deref(), &written) {
                    (Some([lo, hi]), _) if lo < hi => Some((*lo, *hi)),
                    (Some(v), Some(w)) => {
                        self.push(
                            Diagnostic::new(
                                Code::OutOfRange,
                                "a search range is two sparsities, the lower first",
                            )
                            .with_label(
                                w.span,
                                format!("{} value(s), not two increasing sparsities", v.len()),
                            )
                            .with_help("write `range = [30%, 70%]`"),
                        );
                        None
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        let model = s
            .subject
            .first()
            .and_then(|e| e.as_name())
            .map(|n| n.name.clone());
        if let (Some(l), Some(model)) = (&s.label, model) {
            self.fronts.insert(
                l.name.clone(),
                super::Front {
                    stage: s.span,
                    model,
                    range,
                },
            );
        }
    }

    /// An output path a stage writes: not one the run writes itself, and not
    /// one an earlier stage writes (the later file would replace it).
    fn claim_output(&mut self, ev: &mut Evaluated, path: &str, span: Span) {
        let key = path.trim_start_matches("./").to_string();
        if ["sparsity.svg", "report.json", "report.md", "prune.lock"].contains(&key.as_str()) {
            self.push(
                Diagnostic::new(
                    Code::StageClause,
                    format!("`{key}` is a file every run writes"),
                )
                .with_label(span, "would be overwritten")
                .with_help("choose another name"),
            );
        } else if let Some(prev) = ev.outputs.get(&key) {
            let prev = *prev;
            self.push(
                Diagnostic::new(Code::StageClause, format!("two stages write `{key}`"))
                    .with_label(span, "written again here")
                    .with_label(prev, "first written here")
                    .with_help("give each output its own path"),
            );
        } else {
            ev.outputs.insert(key, span);
        }
    }

    /// A stage's `as LABEL` with the metrics it gives: a label is used once
    /// and is not a declared name.
    fn register_label(&mut self, l: &Ident, ev: &mut Evaluated, metrics: BTreeSet<String>) {
        if let Some((prev, _)) = ev.labels.get(&l.name) {
            let prev = *prev;
            self.push(
                Diagnostic::new(
                    Code::Duplicate,
                    format!("the label `{}` is used twice", l.name),
                )
                .with_label(l.span, "used again here")
                .with_label(prev, "first used here"),
            );
        } else if self.symbols.contains_key(&l.name) {
            let prev = self.symbols[&l.name].span;
            self.push(
                Diagnostic::new(
                    Code::Duplicate,
                    format!("`{}` is already a declared name", l.name),
                )
                .with_label(l.span, "label")
                .with_label(prev, "declared here"),
            );
        } else {
            ev.labels.insert(l.name.clone(), (l.span, metrics));
        }
    }

    /// Criterion agreement and sensitivity score the model as it is: no
    /// training options, and no criterion that sums over training steps.
    fn check_agreement(&mut self, s: &Stage, args: &Args) {
        let name = match s.by.as_ref().map(|b| &b.kind) {
            Some(ExprKind::Call { callee, .. }) => callee.name.clone(),
            _ => String::new(),
        };
        for key in ["epochs", "steps", "optimizer", "lr_schedule"] {
            if let Some(a) = s.arg(key) {
                self.push(
                    Diagnostic::new(
                        Code::StageClause,
                        format!("`{key}` retrains an oracle study's candidates; `{name}` trains nothing"),
                    )
                    .with_label(a.value.span, format!("not for `{name}`"))
                    .with_help(format!("remove `{key}`")),
                );
            }
        }
        let count = if name == "agreement" { 2 } else { 1 };
        for a in args.criteria(count) {
            // What it reads (its own errors were reported with the arguments).
            let mut needs = Needs::default();
            let reported = self.diags.len();
            self.check_score(&a.value, &mut needs, 0);
            self.diags.truncate(reported);
            if needs.training {
                self.push(
                    Diagnostic::new(
                        Code::Unsupported,
                        format!("`accumulate(...)` sums a score over training steps: `{name}` scores the model as it is"),
                    )
                    .with_label(a.value.span, "needs training")
                    .with_help("compare criteria that read the weights, `grad(w)` or `act(x)`"),
                );
            }
        }
    }

    /// `rewind = epoch k` needs `k` epochs of training before the stage.
    fn check_rewind(&mut self, s: &Stage, options: &BTreeMap<String, Value>, ev: &Evaluated) {
        let sched = match options.get("schedule") {
            Some(Value::Ref(r)) => self.symbols.get(r).and_then(|s| s.value.clone()),
            other => other.cloned(),
        };
        let Some(Value::Duration {
            count: k,
            unit: Unit::Epoch,
        }) = sched.as_ref().and_then(|v| v.arg("rewind"))
        else {
            return;
        };
        let Some(m) = s.subject.first().and_then(|e| e.as_name()) else {
            return;
        };
        let (n, exact) = ev.trained.get(&m.name).copied().unwrap_or((0, true));
        if exact && *k > n {
            let span = s.value_span("schedule");
            self.push(
                Diagnostic::new(
                    Code::OutOfRange,
                    format!(
                        "`rewind = epoch {k}` is past the {n} epoch(s) `{}` trains before this stage",
                        m.name
                    ),
                )
                .with_label(span, "rewinds to weights that never exist")
                .with_help("rewind to an epoch the model reaches before pruning (late rewinding uses a small k), or `rewind = init`"),
            );
        }
    }

    fn schedule_kind(&self, v: &Value) -> Option<ScheduleKind> {
        let name = match v {
            Value::Call { name, .. } => Some(name.as_str()),
            Value::Ref(r) => self
                .symbols
                .get(r)
                .and_then(|s| s.value.as_ref())
                .and_then(|v| v.call_name()),
            _ => None,
        };
        name.and_then(ScheduleKind::named)
    }

    /// Checks an `assert` condition: comparisons over evaluated metrics.
    fn check_condition(&mut self, e: &Expr, ev: &Evaluated) {
        match &e.kind {
            ExprKind::Paren(inner) => self.check_condition(inner, ev),
            ExprKind::Unary {
                op: UnaryOp::Not,
                operand,
            } => self.check_condition(operand, ev),
            ExprKind::Binary {
                op: BinaryOp::And | BinaryOp::Or,
                lhs,
                rhs,
            } => {
                self.check_condition(lhs, ev);
                self.check_condition(rhs, ev);
            }
            ExprKind::Binary { op, lhs, rhs } if op.is_comparison() => {
                self.check_quantity(lhs, ev);
                self.check_quantity(rhs, ev);
            }
            _ => {
                self.push(
                    Diagnostic::new(Code::WrongType, "an `assert` needs a comparison")
                        .with_label(e.span, "not a condition")
                        .with_help("for example `assert accuracy >= 97.5%`"),
                );
            }
        }
    }

    /// A number in an assert: a literal, a param, a metric or `label.metric`.
    fn check_quantity(&mut self, e: &Expr, ev: &Evaluated) {
        match &e.kind {
            ExprKind::Number { .. } | ExprKind::Percent { .. } => {}
            ExprKind::Paren(inner)
            | ExprKind::Unary {
                op: UnaryOp::Neg,
                operand: inner,
            } => self.check_quantity(inner, ev),
            ExprKind::Binary { op, lhs, rhs }
                if !op.is_comparison() && !matches!(op, BinaryOp::And | BinaryOp::Or) =>
            {
                self.check_quantity(lhs, ev);
                self.check_quantity(rhs, ev);
            }
            ExprKind::Name(id) => {
                if let Some(sym) = self.symbols.get(&id.name) {
                    if sym.kind == SymKind::Param
                        && matches!(
                            sym.value,
                            Some(Value::Int(_) | Value::Float(_) | Value::Fraction(_))
                        )
                    {
                        return;
                    }
                    if sym.kind == SymKind::Param {
                        let span = sym.span;
                        // Name the value it has, which an override may have changed.
                        let declared = match (self.overrides.get(&id.name), &sym.value) {
                            (Some(text), _) => {
                                format!("declared here; `{text}` on the command line")
                            }
                            (None, Some(v)) => format!("declared here as {}", v.type_name()),
                            (None, None) => "declared here".into(),
                        };
                        self.push(
                            Diagnostic::new(
                                Code::WrongType,
                                format!("param `{}` is not a number", id.name),
                            )
                            .with_label(id.span, "compared here")
                            .with_label(span, declared),
                        );
                        return;
                    }
                }
                let is_metric = builtins::lookup(&id.name).is_some_and(|b| b.kind == Kind::Metric);
                if !is_metric {
                    let metrics = builtins::of_kind(Kind::Metric).map(|b| b.name);
                    self.push(
                        Diagnostic::new(
                            Code::UnknownMetric,
                            format!("`{}` is not a metric or a numeric param", id.name),
                        )
                        .with_label(id.span, "unknown")
                        .with_help_opt(did_you_mean(&id.name, metrics)),
                    );
                } else if !ev.metrics.contains_key(&id.name) {
                    self.push(
                        Diagnostic::new(
                            Code::MetricNotEvaluated,
                            format!(
                                "`{}` is asserted but no earlier stage evaluates it",
                                id.name
                            ),
                        )
                        .with_label(id.span, "never evaluated before this assert")
                        .with_help(format!(
                            "add `{}` to an earlier `evaluate ... -> [...]`",
                            id.name
                        )),
                    );
                }
            }
            ExprKind::Member { base, member } => {
                let Some(label) = base.as_name() else {
                    self.mismatch(e, Ty::Float, "a nested member");
                    return;
                };
                match ev.labels.get(&label.name) {
                    None => {
                        let labels = ev.labels.keys().map(|s| s.as_str());
                        self.push(
                            Diagnostic::new(Code::Undefined, format!("no earlier evaluation is labelled `{}`", label.name))
                                .with_label(label.span, "unknown label")
                                .with_help(did_you_mean(&label.name, labels).unwrap_or_else(|| {
                                    format!("label an evaluation with `evaluate MODEL on DATA -> [{}] as {}`", member.name, label.name)
                                })),
                        );
                    }
                    Some((lspan, metrics)) => {
                        if !metrics.contains(&member.name) {
                            let lspan = *lspan;
                            self.push(
                                Diagnostic::new(
                                    Code::MetricNotEvaluated,
                                    format!(
                                        "the evaluation `{}` does not measure `{}`",
                                        label.name, member.name
                                    ),
                                )
                                .with_label(member.span, "not among its metrics")
                                .with_label(lspan, "labelled here"),
                            );
                        }
                    }
                }
            }
            _ => {
                self.mismatch(e, Ty::Float, "something that is not a number");
            }
        }
    }
}

/// How a stage is written, for help lines.
fn stage_usage(kind: StageKind) -> String {
    let usage = match kind {
        StageKind::Train => "train MODEL on DATASET (epochs = N, optimizer = sgd(lr = 0.1))",
        StageKind::Finetune => "finetune MODEL on DATASET (epochs = N)",
        StageKind::Calibrate => "calibrate MODEL on DATASET",
        StageKind::Prune => {
            "prune MODEL by CRITERION to TARGET (schedule = ..., scope = ...) [{ each round: ... }]"
        }
        StageKind::Evaluate => "evaluate MODEL on DATASET -> [metrics] [as LABEL]",
        StageKind::Assert => "assert CONDITION",
        StageKind::Export => "export MODEL to \"PATH\" (format = safetensors)",
        StageKind::Report => "report METRIC, ... [per round] -> \"PATH.svg\"",
        StageKind::Analyze => {
            "analyze MODEL on DATASET by oracle(test = DATASET, candidates = N) to FRACTION -> \"PATH.svg\" [as LABEL] (epochs = N, optimizer = ...)"
        }
    };
    format!("usage: `{usage}`")
}

impl Checker<'_> {
    /// An export path stays inside the output folder: relative, no `..`.
    fn check_export_path(&mut self, to: &Expr, path: &str) {
        let p = std::path::Path::new(path);
        let escapes = p.is_absolute()
            || path.starts_with('/')
            || path.starts_with('\\')
            || p.components()
                .any(|c| matches!(c, std::path::Component::ParentDir));
        if path.is_empty() || escapes {
            self.push(
                Diagnostic::new(
                    Code::StageClause,
                    "export paths are relative to the output folder and stay inside it",
                )
                .with_label(to.span, "not a path inside the output folder")
                .with_help("write a relative path such as \"model.safetensors\"; choose the folder with `--out DIR`"),
            );
        }
    }

    /// Constraints between a built-in method's arguments that their
    /// ranges alone do not express (SAP's `p < q`).
    fn check_method_args(&mut self, name: &str, by: &Expr, args: &[(String, Value)]) {
        let get = |k: &str| {
            args.iter()
                .find(|(n, _)| n == k)
                .and_then(|(_, v)| v.as_f64())
        };
        if let ("sap", Some(p), Some(q)) = (name, get("p"), get("q")) {
            if p >= q {
                self.push(
                    Diagnostic::new(
                        Code::OutOfRange,
                        format!("SAP needs p < q, got p = {p}, q = {q}"),
                    )
                    .with_label(by.span, "the PQ index compares norms with p < q")
                    .with_help("the paper uses p = 0.5, q = 1 (the defaults)"),
                );
            }
        }
    }
}
