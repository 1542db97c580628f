//! Type checking of expressions against the built-in table, computing constant values.

use super::{Checker, SymKind};
use crate::ast::*;
use crate::builtins::{self, Builtin, Kind, Needs, Param, Range, Ty};
use crate::check::value::Value;
use crate::diag::{did_you_mean, Code, Diagnostic};

impl Checker<'_> {
    /// Checks `e` against `ty`, returning its constant value when it has one.
    pub(super) fn eval(&mut self, e: &Expr, ty: Ty, range: Range) -> Option<Value> {
        if ty == Ty::Score {
            let mut needs = Needs::default();
            self.check_score(e, &mut needs, 0);
            return Some(Value::Score(self.text(e.span).to_string()));
        }
        if ty == Ty::Fractions {
            return match &e.kind {
                ExprKind::List(items) if !items.is_empty() => items
                    .iter()
                    .map(|i| self.eval(i, Ty::Fraction, range))
                    .collect::<Vec<_>>()
                    .into_iter()
                    .collect::<Option<Vec<_>>>()
                    .map(Value::List),
                ExprKind::List(_) => self.mismatch(e, ty, "an empty list"),
                _ => self.mismatch(e, ty, "not a list"),
            };
        }
        if ty == Ty::Floats {
            // One number, or a list of them, each in range.
            return match &e.kind {
                ExprKind::List(items) if items.is_empty() => self.mismatch(e, ty, "an empty list"),
                ExprKind::List(items) => {
                    let vals: Vec<Option<Value>> = items
                        .iter()
                        .map(|i| self.eval(i, Ty::Float, range))
                        .collect();
                    vals.into_iter()
                        .collect::<Option<Vec<_>>>()
                        .map(Value::List)
                }
                _ => self.eval(e, Ty::Float, range),
            };
        }
        let v = self.eval_inner(e, ty)?;
        self.check_range(e, &v, range);
        Some(v)
    }

    fn eval_inner(&mut self, e: &Expr, ty: Ty) -> Option<Value> {
        match &e.kind {
            ExprKind::Paren(inner) => self.eval_inner(inner, ty),
            ExprKind::Name(id) => self.eval_name(id, e, ty),
            ExprKind::Call { callee, args } => self.eval_call(callee, args, e, ty),
            ExprKind::Number { value, .. } => self.number(*value, e, ty),
            ExprKind::Percent { value, .. } => match ty {
                Ty::Fraction | Ty::FractionOrCount => Some(Value::Fraction(*value)),
                Ty::Float => Some(Value::Float(*value)),
                _ => self.mismatch(e, ty, "a percentage"),
            },
            ExprKind::Unary {
                op: UnaryOp::Neg,
                operand,
            } => {
                let v = self.eval_inner(operand, ty)?;
                match v {
                    Value::Int(i) => Some(Value::Int(-i)),
                    Value::Float(f) => Some(Value::Float(-f)),
                    Value::Fraction(f) => Some(Value::Fraction(-f)),
                    other => self.mismatch(e, ty, other.type_name()),
                }
            }
            ExprKind::Binary { op, lhs, rhs }
                if !op.is_comparison() && !matches!(op, BinaryOp::And | BinaryOp::Or) =>
            {
                self.arith(*op, lhs, rhs, e, ty)
            }
            ExprKind::Str(s) => match ty {
                Ty::Str => Some(Value::Str(s.clone())),
                Ty::Enum(words) if words.contains(&s.as_str()) => Some(Value::Word(s.clone())),
                Ty::Enum(words) => {
                    self.push(
                        Diagnostic::new(Code::WrongType, format!("\"{s}\" is not {ty}"))
                            .with_label(e.span, "unknown option")
                            .with_help_opt(did_you_mean(s, words.iter().copied())),
                    );
                    None
                }
                _ => self.mismatch(e, ty, "a string"),
            },
            ExprKind::Bool(b) => match ty {
                Ty::Bool => Some(Value::Bool(*b)),
                _ => self.mismatch(e, ty, "a boolean"),
            },
            ExprKind::Pattern { n, m } => match ty {
                Ty::Pattern => {
                    if *n == 0 || n >= m || *m > 64 {
                        self.push(
                            Diagnostic::new(Code::BadPattern, format!("`{n}:{m}` is not a valid N:M pattern"))
                                .with_label(e.span, "N must be at least 1 and less than M (M at most 64)")
                                .with_help("N:M keeps the N largest of every M consecutive weights, e.g. `2:4`"),
                        );
                        return None;
                    }
                    Some(Value::Pattern { n: *n, m: *m })
                }
                _ => self.mismatch(e, ty, "an N:M pattern"),
            },
            ExprKind::Duration { count, unit, .. } => match ty {
                Ty::Duration => Some(Value::Duration {
                    count: *count,
                    unit: *unit,
                }),
                Ty::Enum(words) if *unit == Unit::Epoch && words.contains(&"init") => {
                    Some(Value::Duration {
                        count: *count,
                        unit: *unit,
                    })
                }
                _ => self.mismatch(e, ty, "a duration"),
            },
            ExprKind::List(items) => match ty {
                Ty::Globs => {
                    let vals = items
                        .iter()
                        .map(|i| self.eval_inner(i, Ty::Str))
                        .collect::<Vec<_>>();
                    vals.into_iter()
                        .collect::<Option<Vec<_>>>()
                        .map(Value::List)
                }
                Ty::Ints => {
                    let vals = items
                        .iter()
                        .map(|i| self.eval(i, Ty::Int, Range::at_least(1.0)))
                        .collect::<Vec<_>>();
                    vals.into_iter()
                        .collect::<Option<Vec<_>>>()
                        .map(Value::List)
                }
                Ty::Metrics => {
                    let mut out = Vec::new();
                    for i in items {
                        out.push(self.eval_inner(i, Ty::Metrics)?);
                    }
                    Some(Value::List(out))
                }
                _ => self.mismatch(e, ty, "a list"),
            },
            ExprKind::Per { base, unit } => {
                match ty {
                    Ty::FractionOrCount => {
                        if unit.name != "layer" {
                            self.push(
                            Diagnostic::new(Code::WrongType, format!("`per {}` is not supported here", unit.name))
                                .with_label(unit.span, "expected `per layer`")
                                .with_help("per-layer limits are written `2% per layer` or `100 per layer`"),
                        );
                            return None;
                        }
                        let v = self.eval_inner(base, ty)?;
                        Some(Value::PerUnit(Box::new(v), unit.name.clone()))
                    }
                    _ => self.mismatch(e, ty, "a `per` amount"),
                }
            }
            ExprKind::Member { .. } => self.mismatch(e, ty, "a dotted name"),
            ExprKind::Unary { .. } | ExprKind::Binary { .. } => self.mismatch(e, ty, "a condition"),
        }
    }

    fn number(&mut self, value: f64, e: &Expr, ty: Ty) -> Option<Value> {
        let integral = value.fract() == 0.0 && value.abs() < 9.0e15;
        match ty {
            Ty::Int | Ty::Duration if integral => Some(if ty == Ty::Int {
                Value::Int(value as i64)
            } else {
                Value::Duration {
                    count: value as u64,
                    unit: Unit::Step,
                }
            }),
            Ty::Int | Ty::Duration => {
                self.push(
                    Diagnostic::new(
                        Code::WrongType,
                        format!("expected {ty}, found `{}`", self.text(e.span)),
                    )
                    .with_label(e.span, "not a whole number"),
                );
                None
            }
            Ty::Float => Some(Value::Float(value)),
            Ty::Fraction => Some(Value::Fraction(value)),
            Ty::FractionOrCount => Some(if value >= 1.0 && integral {
                Value::Int(value as i64)
            } else {
                Value::Fraction(value)
            }),
            _ => self.mismatch(e, ty, "a number"),
        }
    }

    /// Constant arithmetic on numbers and numeric params (`1.5 * base`).
    fn arith(&mut self, op: BinaryOp, lhs: &Expr, rhs: &Expr, e: &Expr, ty: Ty) -> Option<Value> {
        let numeric = matches!(
            ty,
            Ty::Int | Ty::Float | Ty::Fraction | Ty::FractionOrCount | Ty::Duration
        );
        if !numeric {
            return self.mismatch(e, ty, "an arithmetic expression");
        }
        let operand_ty = if ty == Ty::Int { Ty::Int } else { Ty::Float };
        let a = self.eval_inner(lhs, operand_ty)?.as_f64()?;
        let b = self.eval_inner(rhs, operand_ty)?.as_f64()?;
        let Some(r) = crate::eval::arith(op, a, b) else {
            return self.mismatch(e, ty, "a condition");
        };
        if !r.is_finite() {
            self.push(
                Diagnostic::new(Code::OutOfRange, "this arithmetic has no finite value")
                    .with_label(e.span, format!("evaluates to {r}")),
            );
            return None;
        }
        self.number(r, e, ty)
    }

    fn eval_name(&mut self, id: &Ident, e: &Expr, ty: Ty) -> Option<Value> {
        if let Some(sym) = self.symbols.get(&id.name).cloned() {
            match sym.kind {
                SymKind::Param => {
                    let v = sym.value.clone()?;
                    return self.coerce_param(v, e, ty, &id.name);
                }
                kind => {
                    let wanted = match ty {
                        Ty::Of(k) => Some(k),
                        _ => None,
                    };
                    if wanted == Some(kind.as_kind()) {
                        return Some(Value::Ref(id.name.clone()));
                    }
                    if let Ty::Enum(words) = ty {
                        if words.contains(&id.name.as_str()) {
                            return Some(Value::Word(id.name.clone()));
                        }
                    }
                    self.push(
                        Diagnostic::new(
                            Code::WrongKind,
                            format!(
                                "`{}` is {}, but {} is expected here",
                                id.name,
                                kind.as_kind().article(),
                                ty
                            ),
                        )
                        .with_label(id.span, format!("{} `{}`", kind.as_kind().noun(), id.name))
                        .with_label(sym.span, "declared here"),
                    );
                    return None;
                }
            }
        }
        match ty {
            // Whether an earlier stage has the label is the stage's check.
            Ty::Label => Some(Value::Word(id.name.clone())),
            Ty::Enum(words) => {
                if words.contains(&id.name.as_str()) {
                    return Some(Value::Word(id.name.clone()));
                }
                self.push(
                    Diagnostic::new(Code::WrongType, format!("`{}` is not {ty}", id.name))
                        .with_label(id.span, "unknown option")
                        .with_help_opt(did_you_mean(&id.name, words.iter().copied())),
                );
                None
            }
            Ty::Metrics => {
                if builtins::lookup(&id.name).is_some_and(|b| b.kind == Kind::Metric) {
                    return Some(Value::Word(id.name.clone()));
                }
                let metrics = builtins::of_kind(Kind::Metric).map(|b| b.name);
                self.push(
                    Diagnostic::new(Code::UnknownMetric, format!("unknown metric `{}`", id.name))
                        .with_label(id.span, "not a metric")
                        .with_help(did_you_mean(&id.name, metrics).unwrap_or_else(|| {
                            "the metrics are accuracy, loss, perplexity, sparsity, pqi, params, flops".to_string()
                        })),
                );
                None
            }
            Ty::Of(kind) => {
                // A built-in with no required parameters may be named bare.
                if let Some(bi) = builtins::lookup(&id.name).filter(|b| {
                    b.kind == kind || (kind == Kind::Criterion && b.kind == Kind::Method)
                }) {
                    if bi.stdlib && !self.imports.contains_key(bi.name) {
                        self.not_imported(id, bi);
                        return None;
                    }
                    if let Some(missing) = bi.params.iter().find(|p| p.default.is_none()) {
                        self.push(
                            Diagnostic::new(
                                Code::MissingArgument,
                                format!("`{}` needs `{}`", bi.name, missing.name),
                            )
                            .with_label(
                                id.span,
                                format!("write `{}({} = ...)`", bi.name, missing.name),
                            ),
                        );
                        return None;
                    }
                    return Some(Value::Call {
                        name: bi.name.to_string(),
                        args: self.defaults(bi),
                    });
                }
                self.undefined(id, Some(kind));
                None
            }
            _ => {
                self.undefined(id, None);
                None
            }
        }
    }

    /// Uses a param's value where `ty` is expected.
    fn coerce_param(&mut self, v: Value, e: &Expr, ty: Ty, name: &str) -> Option<Value> {
        let ok = match (&v, ty) {
            (
                Value::Int(_),
                Ty::Int | Ty::Float | Ty::Fraction | Ty::FractionOrCount | Ty::Duration,
            ) => true,
            (
                Value::Float(_) | Value::Fraction(_),
                Ty::Float | Ty::Fraction | Ty::FractionOrCount,
            ) => true,
            (Value::Bool(_), Ty::Bool)
            | (Value::Str(_), Ty::Str)
            | (Value::Pattern { .. }, Ty::Pattern) => true,
            (Value::Duration { .. }, Ty::Duration) => true,
            (Value::List(_), Ty::Globs | Ty::Ints | Ty::Floats | Ty::Fractions) => true,
            (Value::Int(_) | Value::Float(_), Ty::Floats) => true,
            (Value::Word(w), Ty::Enum(words)) => words.contains(&w.as_str()),
            (Value::PerUnit(..), Ty::FractionOrCount) => true,
            _ => false,
        };
        if !ok {
            self.push(
                Diagnostic::new(
                    Code::WrongType,
                    format!(
                        "param `{name}` is {}, but {ty} is expected here",
                        v.type_name()
                    ),
                )
                .with_label(e.span, format!("`{name}` = {v}")),
            );
            return None;
        }
        Some(match (v, ty) {
            (Value::Int(i), Ty::Float) => Value::Float(i as f64),
            (Value::Int(i), Ty::Fraction) => Value::Fraction(i as f64),
            (Value::Float(f), Ty::Fraction) => Value::Fraction(f),
            (Value::Fraction(f), Ty::Float) => Value::Float(f),
            (Value::Int(i), Ty::Duration) => Value::Duration {
                count: i.max(0) as u64,
                unit: Unit::Step,
            },
            (v, _) => v,
        })
    }

    fn eval_call(&mut self, callee: &Ident, args: &Args, e: &Expr, ty: Ty) -> Option<Value> {
        if let Some(sym) = self.symbols.get(&callee.name) {
            if builtins::lookup(&callee.name).is_none() {
                let noun = sym.kind.as_kind().noun();
                self.push(
                    Diagnostic::new(
                        Code::UnknownFunction,
                        format!("`{}` is a {noun}, not a function", callee.name),
                    )
                    .with_label(callee.span.join(args.span), "read as a call")
                    .with_help(format!(
                        "stage options need a space before the parenthesis: `{} (...)`",
                        callee.name
                    )),
                );
                return None;
            }
        }
        let Some(bi) = builtins::lookup(&callee.name) else {
            let kind = match ty {
                Ty::Of(k) => Some(k),
                _ => None,
            };
            let candidates: Vec<&str> = builtins::BUILTINS
                .iter()
                .filter(|b| kind.is_none_or(|k| b.kind == k))
                .map(|b| b.name)
                .collect();
            self.push(
                Diagnostic::new(
                    Code::UnknownFunction,
                    format!("unknown function `{}`", callee.name),
                )
                .with_label(callee.span, "not a built-in")
                .with_help(
                    did_you_mean(&callee.name, candidates.iter().copied()).unwrap_or_else(|| {
                        match kind {
                            Some(k) => format!(
                                "the {} constructors are: {}",
                                k.noun(),
                                builtins::of_kind(k)
                                    .map(|b| b.name)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                            None => "`prunec explain --all` lists the built-ins".to_string(),
                        }
                    }),
                ),
            );
            return None;
        };
        let fits = match ty {
            Ty::Of(k) => bi.kind == k || (k == Kind::Criterion && bi.kind == Kind::Method),
            Ty::Pattern => bi.kind == Kind::Pattern,
            _ => false,
        };
        if !fits {
            self.push(
                Diagnostic::new(
                    Code::WrongKind,
                    format!(
                        "`{}` is {}, but {ty} is expected here",
                        bi.name,
                        bi.kind.article()
                    ),
                )
                .with_label(e.span, format!("this makes {}", bi.kind.article())),
            );
            return None;
        }
        if bi.stdlib && !self.imports.contains_key(bi.name) {
            self.not_imported(callee, bi);
            return None;
        }
        let resolved = self.check_args(bi, args, callee.span)?;
        Some(Value::Call {
            name: bi.name.to_string(),
            args: resolved,
        })
    }

    /// Checks call arguments against a built-in's parameters; fills defaults.
    pub(super) fn check_args(
        &mut self,
        bi: &Builtin,
        args: &Args,
        at: Span,
    ) -> Option<Vec<(String, Value)>> {
        let mut given: Vec<Option<(&Arg, &Param)>> = vec![None; bi.params.len()];
        let mut ok = true;
        let mut positional = 0usize;
        for a in &args.items {
            let idx = match &a.name {
                None => {
                    let i = positional;
                    positional += 1;
                    if i >= bi.params.len() {
                        self.push(
                            Diagnostic::new(
                                Code::TooManyArguments,
                                format!(
                                    "`{}` takes at most {} positional argument(s)",
                                    bi.name,
                                    bi.params.len()
                                ),
                            )
                            .with_label(a.span, "one too many"),
                        );
                        ok = false;
                        continue;
                    }
                    i
                }
                Some(n) => match bi.params.iter().position(|p| p.name == n.name) {
                    Some(i) => i,
                    None => {
                        let names: Vec<&str> = bi.params.iter().map(|p| p.name).collect();
                        self.push(
                            Diagnostic::new(
                                Code::UnknownArgument,
                                format!("`{}` has no parameter `{}`", bi.name, n.name),
                            )
                            .with_label(n.span, "unknown parameter")
                            .with_help(
                                did_you_mean(&n.name, names.iter().copied()).unwrap_or_else(|| {
                                    if names.is_empty() {
                                        format!("`{}` takes no parameters", bi.name)
                                    } else {
                                        format!("its parameters are: {}", names.join(", "))
                                    }
                                }),
                            ),
                        );
                        ok = false;
                        continue;
                    }
                },
            };
            if let Some((prev, _)) = given[idx] {
                self.push(
                    Diagnostic::new(
                        Code::DuplicateArgument,
                        format!("`{}` is given twice", bi.params[idx].name),
                    )
                    .with_label(a.span, "given again here")
                    .with_label(prev.span, "first given here"),
                );
                ok = false;
                continue;
            }
            given[idx] = Some((a, &bi.params[idx]));
        }
        let mut out = Vec::new();
        for (i, p) in bi.params.iter().enumerate() {
            match given[i] {
                Some((a, p)) => match self.eval(&a.value, p.ty, p.range) {
                    Some(v) => out.push((p.name.to_string(), v)),
                    None => ok = false,
                },
                None => match p.default {
                    Some(d) => out.push((p.name.to_string(), default_value(d, p.ty))),
                    None => {
                        self.push(
                            Diagnostic::new(
                                Code::MissingArgument,
                                format!("`{}` needs `{}`", bi.name, p.name),
                            )
                            .with_label(at, format!("`{}` is missing", p.name))
                            .with_help(format!(
                                "{}: {}{}",
                                p.name,
                                p.ty,
                                if p.doc.is_empty() {
                                    String::new()
                                } else {
                                    format!(" — {}", p.doc)
                                }
                            )),
                        );
                        ok = false;
                    }
                },
            }
        }
        ok.then_some(out)
    }

    fn defaults(&mut self, bi: &Builtin) -> Vec<(String, Value)> {
        bi.params
            .iter()
            .filter_map(|p| {
                p.default
                    .map(|d| (p.name.to_string(), default_value(d, p.ty)))
            })
            .collect()
    }

    fn check_range(&mut self, e: &Expr, v: &Value, range: Range) {
        if range.is_any() {
            return;
        }
        let x = match v {
            Value::PerUnit(inner, _) => inner.as_f64(),
            other => other.as_f64(),
        };
        let Some(x) = x else { return };
        if !range.contains(x) {
            let shown = match v {
                Value::Fraction(f) => format!("{} ({}%)", f, (f * 100.0 * 1e6).round() / 1e6),
                other => other.to_string(),
            };
            self.push(
                Diagnostic::new(Code::OutOfRange, format!("{shown} is out of range"))
                    .with_label(e.span, format!("must be in {range}"))
                    .with_help_opt((range == Range::sparsity()).then(|| {
                        "a sparsity is a fraction of weights removed: at least 0% and below 100%".to_string()
                    })),
            );
        }
    }

    pub(super) fn mismatch(&mut self, e: &Expr, ty: Ty, found: &str) -> Option<Value> {
        self.push(
            Diagnostic::new(Code::WrongType, format!("expected {ty}, found {found}"))
                .with_label(e.span, format!("this is {found}")),
        );
        None
    }

    fn not_imported(&mut self, id: &Ident, bi: &Builtin) {
        self.push(
            Diagnostic::new(
                Code::Undefined,
                format!("`{}` is in the standard library but not imported", bi.name),
            )
            .with_label(id.span, "not imported")
            .with_help(format!(
                "add `use std.{}` at the top of the recipe",
                bi.name
            )),
        );
    }

    pub(super) fn undefined(&mut self, id: &Ident, kind: Option<Kind>) {
        let mut candidates: Vec<String> = self
            .symbols
            .iter()
            .filter(|(_, s)| kind.is_none_or(|k| s.kind.as_kind() == k))
            .map(|(n, _)| n.clone())
            .collect();
        if let Some(k) = kind {
            candidates.extend(builtins::of_kind(k).map(|b| b.name.to_string()));
        }
        let help = did_you_mean(&id.name, candidates.iter().map(|s| s.as_str())).or_else(|| {
            builtins::lookup(&id.name)
                .filter(|b| b.stdlib)
                .map(|b| format!("add `use std.{}` at the top of the recipe", b.name))
        });
        let what = kind.map(|k| format!(" {}", k.noun())).unwrap_or_default();
        self.push(
            Diagnostic::new(Code::Undefined, format!("undefined{what} `{}`", id.name))
                .with_label(id.span, "not defined")
                .with_help_opt(help),
        );
    }

    /// Checks a criterion expression, collecting what it reads into `needs`.
    pub(super) fn check_score(&mut self, e: &Expr, needs: &mut Needs, depth: usize) {
        match &e.kind {
            ExprKind::Number { .. } | ExprKind::Percent { .. } => {}
            ExprKind::Paren(inner) => self.check_score(inner, needs, depth),
            ExprKind::Unary { operand, .. } => self.check_score(operand, needs, depth),
            ExprKind::Binary { lhs, rhs, .. } => {
                self.check_score(lhs, needs, depth);
                self.check_score(rhs, needs, depth);
            }
            ExprKind::Name(id) => self.score_name(id, needs, depth),
            ExprKind::Call { callee, args } => {
                let Some(bi) = builtins::lookup(&callee.name).filter(|b| b.kind == Kind::ScoreFn)
                else {
                    let fns = builtins::of_kind(Kind::ScoreFn).map(|b| b.name);
                    self.push(
                        Diagnostic::new(Code::UnknownFunction, format!("unknown criterion function `{}`", callee.name))
                            .with_label(callee.span, "not a criterion function")
                            .with_help(did_you_mean(&callee.name, fns).unwrap_or_else(|| {
                                "criterion functions: abs, sq, sqrt, log, exp, sign, min, max, where, sum, dist, grad, act, init, accumulate, rand".to_string()
                            })),
                    );
                    return;
                };
                needs.grad |= bi.needs.grad;
                needs.activations |= bi.needs.activations;
                needs.training |= bi.needs.training;
                let n_required = bi.params.iter().filter(|p| p.default.is_none()).count();
                let positional: Vec<&Arg> =
                    args.items.iter().filter(|a| a.name.is_none()).collect();
                if positional.len() < n_required || positional.len() > bi.params.len() {
                    self.push(
                        Diagnostic::new(
                            Code::TooManyArguments,
                            format!(
                                "`{}` takes {} argument(s), found {}",
                                bi.name,
                                n_required,
                                positional.len()
                            ),
                        )
                        .with_label(args.span, "wrong number of arguments"),
                    );
                }
                match bi.name {
                    "grad" | "init" => self.expect_input(args, "w", bi.name),
                    "act" => self.expect_input(args, "x", bi.name),
                    _ => {}
                }
                for (i, a) in args.items.iter().enumerate() {
                    let param = match &a.name {
                        Some(n) => bi.params.iter().find(|p| p.name == n.name),
                        None => bi.params.get(i),
                    };
                    match param {
                        Some(p) if p.ty == Ty::Score => {
                            if !matches!(bi.name, "grad" | "init" | "act") {
                                self.check_score(&a.value, needs, depth);
                            }
                        }
                        Some(p) => {
                            self.eval(&a.value, p.ty, p.range);
                        }
                        None => {
                            let name = a.name.as_ref().map(|n| n.name.clone()).unwrap_or_default();
                            self.push(
                                Diagnostic::new(
                                    Code::UnknownArgument,
                                    format!("`{}` has no parameter `{}`", bi.name, name),
                                )
                                .with_label(a.span, "unknown parameter"),
                            );
                        }
                    }
                }
            }
            _ => {
                let found = match &e.kind {
                    ExprKind::Str(_) => "a string",
                    ExprKind::List(_) => "a list",
                    ExprKind::Bool(_) => "a boolean",
                    ExprKind::Pattern { .. } => "an N:M pattern",
                    ExprKind::Duration { .. } => "a duration",
                    _ => "this",
                };
                self.push(
                    Diagnostic::new(Code::WrongType, format!("{found} cannot be part of a criterion"))
                        .with_label(e.span, "not a score")
                        .with_help("a criterion is an arithmetic expression over `w`, `grad(w)`, `act(x)` and numbers"),
                );
            }
        }
    }

    fn expect_input(&mut self, args: &Args, input: &str, func: &str) {
        if let Some(a) = args.items.first() {
            if a.value.as_name().is_none_or(|n| n.name != input) {
                self.push(
                    Diagnostic::new(Code::WrongType, format!("`{func}` applies to `{input}`"))
                        .with_label(a.value.span, format!("write `{func}({input})`")),
                );
            }
        }
    }

    fn score_name(&mut self, id: &Ident, needs: &mut Needs, depth: usize) {
        if matches!(id.name.as_str(), "w" | "step") {
            return;
        }
        if id.name == "x" {
            self.push(
                Diagnostic::new(
                    Code::WrongType,
                    "`x` (the layer input) is only readable through `act(x)`",
                )
                .with_label(id.span, "write `act(x)` for its per-column norm"),
            );
            return;
        }
        if let Some(sym) = self.symbols.get(&id.name).cloned() {
            match sym.kind {
                SymKind::Param => {
                    if !matches!(
                        sym.value,
                        Some(Value::Int(_) | Value::Float(_) | Value::Fraction(_))
                    ) {
                        self.push(
                            Diagnostic::new(
                                Code::WrongType,
                                format!("param `{}` is not a number", id.name),
                            )
                            .with_label(id.span, "used in a criterion"),
                        );
                    }
                }
                SymKind::Criterion => {
                    if depth > 16 || self.criterion_stack.contains(&id.name) {
                        self.push(
                            Diagnostic::new(
                                Code::WrongKind,
                                format!("criterion `{}` refers to itself", id.name),
                            )
                            .with_label(id.span, "circular reference")
                            .with_label(sym.span, "defined here"),
                        );
                        return;
                    }
                    let n = self.criterion_needs(&id.name, depth + 1);
                    needs.grad |= n.grad;
                    needs.activations |= n.activations;
                    needs.training |= n.training;
                }
                other => {
                    self.push(
                        Diagnostic::new(
                            Code::WrongKind,
                            format!(
                                "`{}` is {}, not a number or a criterion",
                                id.name,
                                other.as_kind().article()
                            ),
                        )
                        .with_label(id.span, "used in a criterion")
                        .with_label(sym.span, "declared here"),
                    );
                }
            }
            return;
        }
        if let Some(bi) = builtins::lookup(&id.name).filter(|b| b.kind == Kind::Criterion) {
            if !self.imports.contains_key(bi.name) {
                self.not_imported(id, bi);
                return;
            }
            needs.grad |= bi.needs.grad;
            needs.activations |= bi.needs.activations;
            needs.training |= bi.needs.training;
            return;
        }
        self.undefined(id, Some(Kind::Criterion));
    }
}

/// The value of a default as written in the built-in table.
pub(super) fn default_value(text: &str, ty: Ty) -> Value {
    let expr = crate::parse::source_to_expr(text).expect("built-in defaults parse");
    literal_value(&expr, ty).unwrap_or_else(|| Value::Str(text.to_string()))
}

/// The value of a literal expression without a checker (defaults, overrides).
fn literal_value(e: &Expr, ty: Ty) -> Option<Value> {
    Some(match (&e.kind, ty) {
        (ExprKind::Number { value, .. }, Ty::Int) => Value::Int(*value as i64),
        (ExprKind::Number { value, .. }, Ty::Fraction) => Value::Fraction(*value),
        (ExprKind::Number { value, .. }, Ty::FractionOrCount) if *value >= 1.0 => {
            Value::Int(*value as i64)
        }
        (ExprKind::Number { value, .. }, Ty::FractionOrCount) => Value::Fraction(*value),
        (ExprKind::Number { value, .. }, Ty::Duration) => Value::Duration {
            count: *value as u64,
            unit: Unit::Step,
        },
        (ExprKind::Number { value, .. }, _) => Value::Float(*value),
        (ExprKind::Percent { value, .. }, _) => Value::Fraction(*value),
        (ExprKind::Bool(b), _) => Value::Bool(*b),
        (ExprKind::Str(s), _) => Value::Str(s.clone()),
        (ExprKind::Duration { count, unit, .. }, _) => Value::Duration {
            count: *count,
            unit: *unit,
        },
        (ExprKind::List(items), Ty::Globs) => Value::List(
            items
                .iter()
                .filter_map(|i| literal_value(i, Ty::Str))
                .collect(),
        ),
        (ExprKind::List(items), _) => Value::List(
            items
                .iter()
                .filter_map(|i| literal_value(i, Ty::Int))
                .collect(),
        ),
        (ExprKind::Name(id), _) => Value::Word(id.name.clone()),
        (ExprKind::Call { callee, args }, _) => {
            let bi = builtins::lookup(&callee.name)?;
            let mut out: Vec<(String, Value)> = Vec::new();
            for p in bi.params {
                let given = args
                    .items
                    .iter()
                    .find(|a| a.name.as_ref().is_some_and(|n| n.name == p.name));
                match (given, p.default) {
                    (Some(a), _) => out.push((p.name.to_string(), literal_value(&a.value, p.ty)?)),
                    (None, Some(d)) => out.push((p.name.to_string(), default_value(d, p.ty))),
                    (None, None) => return None,
                }
            }
            Value::Call {
                name: bi.name.to_string(),
                args: out,
            }
        }
        _ => return None,
    })
}
