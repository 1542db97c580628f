//! AST → checked recipe: names, types, ranges, stage clauses and data needs,
//! all without a model file. Every problem is reported, not only the first.

mod data;
mod expr;
pub mod models;
mod stages;
pub mod value;

use crate::ast::*;
use crate::builtins::{self, Kind, Needs, Range, Ty};
use crate::diag::{did_you_mean, Code, Diagnostic};
use std::collections::BTreeMap;
pub use value::Value;

/// What a recipe-level name denotes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum SymKind {
    Param,
    Model,
    Dataset,
    Criterion,
    Schedule,
    Constraints,
}

impl SymKind {
    pub fn as_kind(self) -> Kind {
        match self {
            SymKind::Param => Kind::StageOption,
            SymKind::Model => Kind::Model,
            SymKind::Dataset => Kind::Dataset,
            SymKind::Criterion => Kind::Criterion,
            SymKind::Schedule => Kind::Schedule,
            SymKind::Constraints => Kind::Constraints,
        }
    }
}

/// A declared name.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Symbol {
    pub kind: SymKind,
    /// The span of the name where it is declared.
    pub span: Span,
    /// Its value, when it is a constant or a constructor call.
    pub value: Option<Value>,
}

/// A `--set name=value` override from the command line.
#[derive(Clone, Debug)]
pub struct Override {
    pub name: String,
    pub value: String,
}

impl std::str::FromStr for Override {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, value) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}` is not of the form name=value"))?;
        Ok(Override {
            name: name.trim().to_string(),
            value: value.trim().to_string(),
        })
    }
}

/// A recipe that passed every static check, with its names resolved.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CheckedRecipe {
    pub ast: Recipe,
    /// The source text the spans index.
    #[serde(skip)]
    pub source: String,
    pub name: String,
    pub version: i64,
    pub seed: u64,
    /// Every declared name with its resolved value (params after overrides).
    pub symbols: BTreeMap<String, Symbol>,
    /// Imported standard-library names.
    pub imports: Vec<String>,
    /// Resolved stage options, by the id of the stage they belong to.
    pub stage_options: BTreeMap<StageId, BTreeMap<String, Value>>,
}

impl CheckedRecipe {
    pub fn pipeline(&self) -> &Pipeline {
        self.ast
            .pipelines()
            .next()
            .expect("a checked recipe has a pipeline")
    }

    pub fn param(&self, name: &str) -> Option<&Value> {
        self.symbols
            .get(name)
            .filter(|s| s.kind == SymKind::Param)
            .and_then(|s| s.value.as_ref())
    }

    /// The value of a constant numeric expression (`92%`, `target`,
    /// `1 - keep`): the one constant evaluator, names resolved to numeric
    /// params; none where it reads anything else.
    pub fn constant(&self, e: &Expr) -> Option<f64> {
        let mut params = |x: &Expr| {
            x.as_name()
                .and_then(|id| self.param(&id.name))
                .and_then(|v| v.as_f64())
                .ok_or(())
        };
        crate::eval::number(e, &mut params).ok()
    }

    /// A `prune` stage whose subject is a data set (data pruning).
    pub fn is_data_prune(&self, stage: &Stage) -> bool {
        stage.kind == crate::ast::StageKind::Prune
            && stage
                .subject
                .first()
                .and_then(|e| e.as_name())
                .and_then(|n| self.symbols.get(&n.name))
                .is_some_and(|s| s.kind == SymKind::Dataset)
    }

    /// The resolved options of a stage.
    pub fn options(&self, stage: &Stage) -> Option<&BTreeMap<String, Value>> {
        self.stage_options.get(&stage.id)
    }

    /// One option of a stage, falling back to the constraint set it names
    /// (`constraints = guard`).
    pub fn option(&self, stage: &Stage, key: &str) -> Option<&Value> {
        self.options(stage)?.get(key).or_else(|| {
            self.constraint_args(stage)
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)
        })
    }

    /// Every option of a stage, those of the constraint set it names
    /// included where the stage does not set them.
    pub fn resolved_options(&self, stage: &Stage) -> BTreeMap<String, Value> {
        let mut options = self.options(stage).cloned().unwrap_or_default();
        for (k, v) in self.constraint_args(stage) {
            options.entry(k.clone()).or_insert_with(|| v.clone());
        }
        options
    }

    /// The options of the constraint set a stage names, if it names one.
    fn constraint_args(&self, stage: &Stage) -> &[(String, Value)] {
        let c = match self.options(stage).and_then(|o| o.get("constraints")) {
            Some(Value::Ref(c)) => c,
            _ => return &[],
        };
        match self.symbols.get(c).and_then(|s| s.value.as_ref()) {
            Some(Value::Call { args, .. }) => args,
            _ => &[],
        }
    }
}

/// The checker's working state.
pub(crate) struct Checker<'a> {
    pub(crate) src: &'a str,
    pub(crate) symbols: BTreeMap<String, Symbol>,
    pub(crate) imports: BTreeMap<String, Span>,
    pub(crate) diags: Vec<Diagnostic>,
    pub(crate) criterion_stack: Vec<String>,
    criteria: BTreeMap<String, Expr>,
    pub(crate) stage_options: BTreeMap<StageId, BTreeMap<String, Value>>,
    /// `--set` values by param name, as written.
    pub(crate) overrides: BTreeMap<String, &'a str>,
    /// Prune stages whose criterion reads `act(x)`.
    pub(crate) stage_reads_acts: std::collections::BTreeSet<StageId>,
    /// Models a `compensate = true` stage gave biases, in pipeline order.
    pub(crate) compensated: std::collections::BTreeSet<String>,
    /// Labels of `search` analyses: the fronts a prune stage may pick from.
    pub(crate) fronts: BTreeMap<String, Front>,
    /// Models an ARMOR stage wrapped, in pipeline order.
    pub(crate) armored: std::collections::BTreeSet<String>,
}

/// A `search` analysis a later `allocation = pareto(LABEL)` reads.
#[derive(Clone, Debug)]
pub(crate) struct Front {
    /// The analyze stage (its position orders it before its readers).
    pub(crate) stage: Span,
    pub(crate) model: String,
    /// The sparsity range its candidates searched, when constant.
    pub(crate) range: Option<(f64, f64)>,
}

/// Checks a parsed recipe; returns the checked recipe or every diagnostic.
pub fn ast_to_checked<'a>(
    recipe: &Recipe,
    src: &'a str,
    overrides: &'a [Override],
) -> Result<CheckedRecipe, Vec<Diagnostic>> {
    let mut c = Checker {
        src,
        symbols: BTreeMap::new(),
        imports: BTreeMap::new(),
        diags: Vec::new(),
        criterion_stack: Vec::new(),
        criteria: BTreeMap::new(),
        stage_options: BTreeMap::new(),
        overrides: BTreeMap::new(),
        stage_reads_acts: Default::default(),
        compensated: Default::default(),
        fronts: Default::default(),
        armored: Default::default(),
    };
    let (name, version, seed) = c.check_header(recipe);
    c.collect(recipe);
    c.apply_overrides(overrides);
    c.check_decls(recipe);
    let pipelines: Vec<&Pipeline> = recipe.pipelines().collect();
    match pipelines.as_slice() {
        [] => c.push(
            Diagnostic::new(Code::StageClause, "the recipe has no pipeline")
                .with_label(Span::new(0, 0), "nothing would run")
                .with_help("add `pipeline { ... }` with the stages to run"),
        ),
        [p] => {
            c.check_pipeline(p);
            c.check_model_kinds(p);
        }
        [first, rest @ ..] => {
            for p in rest {
                c.push(
                    Diagnostic::new(Code::Duplicate, "a recipe has one pipeline")
                        .with_label(
                            Span::new(p.span.start, p.span.start + "pipeline".len()),
                            "second pipeline",
                        )
                        .with_label(
                            Span::new(first.span.start, first.span.start + "pipeline".len()),
                            "first pipeline",
                        ),
                );
            }
            c.check_pipeline(first);
        }
    }
    if !c.diags.is_empty() {
        let mut d = c.diags;
        d.sort_by_key(|d| d.sort_key());
        d.dedup_by(|a, b| a.sort_key() == b.sort_key());
        return Err(d);
    }
    Ok(CheckedRecipe {
        ast: recipe.clone(),
        source: src.to_string(),
        name,
        version,
        seed,
        symbols: c.symbols,
        imports: c.imports.into_keys().collect(),
        stage_options: c.stage_options,
    })
}

/// Checks the declarations of a library file (no header or pipeline) and
/// returns what the criterion `name` reads; `Err` holds the diagnostics.
pub fn library_needs(src: &str, name: &str) -> Result<Needs, Vec<Diagnostic>> {
    let parsed = crate::parse::source_to_ast(src);
    if !parsed.errors.is_empty() {
        return Err(parsed.errors);
    }
    let mut c = Checker {
        src,
        symbols: BTreeMap::new(),
        imports: BTreeMap::new(),
        diags: Vec::new(),
        criterion_stack: Vec::new(),
        criteria: BTreeMap::new(),
        stage_options: BTreeMap::new(),
        overrides: BTreeMap::new(),
        stage_reads_acts: Default::default(),
        compensated: Default::default(),
        fronts: Default::default(),
        armored: Default::default(),
    };
    c.collect(&parsed.recipe);
    c.check_decls(&parsed.recipe);
    if !c.diags.is_empty() {
        return Err(c.diags);
    }
    Ok(c.criterion_needs(name, 0))
}

/// What an expression after `by` reads: a declared or standard criterion, a
/// method call, or an inline criterion expression of a checked recipe.
pub fn expr_needs(r: &CheckedRecipe, e: &Expr) -> Needs {
    if let ExprKind::Call { callee, .. } = &e.kind {
        if let Some(b) = builtins::lookup(&callee.name).filter(|b| b.kind == Kind::Method) {
            return b.needs;
        }
    }
    let src = String::new();
    let mut c = Checker {
        src: &src,
        symbols: r.symbols.clone(),
        imports: r
            .imports
            .iter()
            .map(|n| (n.clone(), Span::default()))
            .collect(),
        diags: Vec::new(),
        criterion_stack: Vec::new(),
        criteria: r
            .ast
            .items
            .iter()
            .filter_map(|i| match i {
                Item::Decl(d) if d.kind == DeclKind::Criterion => {
                    Some((d.name.name.clone(), d.value.clone()))
                }
                _ => None,
            })
            .collect(),
        stage_options: BTreeMap::new(),
        overrides: BTreeMap::new(),
        stage_reads_acts: Default::default(),
        compensated: Default::default(),
        fronts: Default::default(),
        armored: Default::default(),
    };
    let mut needs = Needs::default();
    c.check_score(e, &mut needs, 0);
    needs
}

impl<'a> Checker<'a> {
    pub(crate) fn push(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    /// The value of a constant numeric expression, params read from their
    /// declarations (none where it reads anything else).
    pub(crate) fn constant_number(&self, e: &Expr) -> Option<f64> {
        let mut params = |x: &Expr| {
            x.as_name()
                .and_then(|id| self.symbols.get(&id.name))
                .and_then(|sym| sym.value.as_ref())
                .and_then(|v| v.as_f64())
                .ok_or(())
        };
        crate::eval::number(e, &mut params).ok()
    }

    pub(crate) fn text(&self, s: Span) -> &str {
        self.src.get(s.start..s.end).unwrap_or("")
    }

    fn check_header(&mut self, recipe: &Recipe) -> (String, i64, u64) {
        let headers: Vec<&Header> = recipe
            .items
            .iter()
            .filter_map(|i| match i {
                Item::Header(h) => Some(h),
                _ => None,
            })
            .collect();
        let Some(h) = headers.first() else {
            let at = recipe.items.first().map(|i| i.span()).unwrap_or_default();
            self.push(
                Diagnostic::new(Code::Header, "the recipe has no header")
                    .with_label(
                        Span::new(at.start, at.start),
                        "expected `recipe NAME { version = 1, seed = 0 }` first",
                    )
                    .with_help("every recipe starts with its name, language version and seed"),
            );
            return (String::new(), 1, 0);
        };
        for extra in &headers[1..] {
            self.push(
                Diagnostic::new(Code::Header, "a recipe has one header")
                    .with_label(extra.name.span, "second header")
                    .with_label(h.name.span, "first header"),
            );
        }
        let mut version = None;
        let mut seed = 0u64;
        let mut seen: BTreeMap<&str, Span> = BTreeMap::new();
        for f in &h.fields {
            if let Some(prev) = seen.insert(&f.key.name, f.key.span) {
                self.push(
                    Diagnostic::new(Code::Duplicate, format!("`{}` is set twice", f.key.name))
                        .with_label(f.key.span, "set again here")
                        .with_label(prev, "first set here"),
                );
                continue;
            }
            match f.key.name.as_str() {
                "version" => {
                    if let Some(Value::Int(v)) = self.eval(&f.value, Ty::Int, Range::any()) {
                        if v != 1 {
                            self.push(
                                Diagnostic::new(
                                    Code::Header,
                                    format!("language version {v} is not supported"),
                                )
                                .with_label(f.value.span, "this prunec reads version 1")
                                .with_help("write `version = 1`"),
                            );
                        }
                        version = Some(v);
                    }
                }
                "seed" => {
                    if let Some(Value::Int(s)) = self.eval(&f.value, Ty::Int, Range::non_negative())
                    {
                        seed = s.max(0) as u64;
                    }
                }
                other => self.push(
                    Diagnostic::new(Code::Header, format!("unknown header field `{other}`"))
                        .with_label(f.key.span, "not a header field")
                        .with_help(
                            did_you_mean(other, ["version", "seed"])
                                .unwrap_or_else(|| "the header holds `version` and `seed`".into()),
                        ),
                ),
            }
        }
        if version.is_none() && !seen.contains_key("version") {
            self.push(
                Diagnostic::new(Code::Header, "the header does not say the language version")
                    .with_label(h.name.span, "add `version = 1` to this header"),
            );
        }
        (h.name.name.clone(), version.unwrap_or(1), seed)
    }

    /// Collects imports and declared names (reporting duplicates).
    fn collect(&mut self, recipe: &Recipe) {
        for item in &recipe.items {
            let (name, kind) = match item {
                Item::Use(u) => {
                    self.check_use(u);
                    continue;
                }
                Item::Param(p) => (&p.name, SymKind::Param),
                Item::Decl(d) => (
                    &d.name,
                    match d.kind {
                        DeclKind::Model => SymKind::Model,
                        DeclKind::Dataset => SymKind::Dataset,
                        DeclKind::Criterion => SymKind::Criterion,
                        DeclKind::Schedule => SymKind::Schedule,
                    },
                ),
                Item::Constraints(c) => (&c.name, SymKind::Constraints),
                Item::Header(_) | Item::Pipeline(_) => continue,
            };
            if let Some(prev) = self.symbols.get(&name.name) {
                let prev_span = prev.span;
                self.push(
                    Diagnostic::new(Code::Duplicate, format!("`{}` is defined twice", name.name))
                        .with_label(name.span, "defined again here")
                        .with_label(prev_span, "first defined here")
                        .with_help("give each declaration its own name"),
                );
                continue;
            }
            if matches!(name.name.as_str(), "w" | "x" | "step") {
                self.push(
                    Diagnostic::new(
                        Code::Duplicate,
                        format!("`{}` is reserved for criterion inputs", name.name),
                    )
                    .with_label(name.span, "choose another name"),
                );
            }
            if let Item::Decl(d) = item {
                if d.kind == DeclKind::Criterion {
                    self.criteria.insert(d.name.name.clone(), d.value.clone());
                }
            }
            self.symbols.insert(
                name.name.clone(),
                Symbol {
                    kind,
                    span: name.span,
                    value: None,
                },
            );
        }
    }

    fn check_use(&mut self, u: &UseDecl) {
        let path: Vec<&str> = u.path.iter().map(|i| i.name.as_str()).collect();
        if path != ["std"] {
            let span = u
                .path
                .first()
                .map(|f| f.span.join(u.path.last().unwrap().span))
                .unwrap_or(u.span);
            self.push(
                Diagnostic::new(
                    Code::UnknownImport,
                    format!("unknown module `{}`", path.join(".")),
                )
                .with_label(span, "only `std` can be imported")
                .with_help("write `use std.NAME` or `use std.{A, B}`"),
            );
            return;
        }
        for n in &u.names {
            let ok = builtins::lookup(&n.name).is_some_and(|b| b.stdlib);
            if ok {
                self.imports.insert(n.name.clone(), n.span);
            } else {
                let std_names = builtins::BUILTINS
                    .iter()
                    .filter(|b| b.stdlib)
                    .map(|b| b.name);
                self.push(
                    Diagnostic::new(Code::UnknownImport, format!("the standard library has no `{}`", n.name))
                        .with_label(n.span, "not in std")
                        .with_help(did_you_mean(&n.name, std_names).unwrap_or_else(|| {
                            "std has: magnitude, taylor, snip, movement, wanda, random, l1_channel, l2_channel, fpgm, taylor_channel, sparsegpt, sap, woodfisher, mfac".into()
                        })),
                );
            }
        }
    }

    fn apply_overrides(&mut self, overrides: &'a [Override]) {
        for o in overrides {
            let Some(sym) = self.symbols.get(&o.name).cloned() else {
                let names: Vec<&str> = self
                    .symbols
                    .iter()
                    .filter(|(_, s)| s.kind == SymKind::Param)
                    .map(|(n, _)| n.as_str())
                    .collect();
                self.push(
                    Diagnostic::new(
                        Code::Override,
                        format!("`--set {}`: the recipe has no param `{}`", o.name, o.name),
                    )
                    .with_label(Span::new(0, 0), "in this recipe")
                    .with_help(
                        did_you_mean(&o.name, names.iter().copied()).unwrap_or_else(|| {
                            if names.is_empty() {
                                "this recipe declares no params".into()
                            } else {
                                format!("its params are: {}", names.join(", "))
                            }
                        }),
                    ),
                );
                continue;
            };
            if sym.kind != SymKind::Param {
                self.push(
                    Diagnostic::new(
                        Code::Override,
                        format!("`--set {}`: `{}` is not a param", o.name, o.name),
                    )
                    .with_label(
                        sym.span,
                        format!("a {} declaration", sym.kind.as_kind().noun()),
                    )
                    .with_help("only `param` values can be overridden"),
                );
                continue;
            }
            self.overrides.insert(o.name.clone(), &o.value);
        }
    }
}

impl Checker<'_> {
    /// The needs of a declared criterion (memoised through the stack guard).
    pub(crate) fn criterion_needs(&mut self, name: &str, depth: usize) -> Needs {
        let Some(e) = self.criteria.get(name).cloned() else {
            return builtins::lookup(name).map(|b| b.needs).unwrap_or_default();
        };
        self.criterion_stack.push(name.to_string());
        let mut needs = Needs::default();
        // Diagnostics for the body are reported at its declaration only.
        let before = self.diags.len();
        self.check_score(&e, &mut needs, depth);
        self.diags.truncate(before);
        self.criterion_stack.pop();
        needs
    }
}

#[cfg(test)]
mod tests;
