//! Checked recipe → runtime values: criterion expressions to kernel expressions,
//! constructor calls to runtime specs, globs to parameter selections.

use crate::error::RunError;
use prunec_kernels::{BinOp, CmpOp, KExpr, KInput, UnOp};
use prunec_lang::ast::{BinaryOp, Expr, ExprKind, UnaryOp};
use prunec_lang::check::{SymKind, Value};
use prunec_lang::diag::{Code, Diagnostic};
use prunec_lang::{CheckedRecipe, Span};

/// A criterion that does not lower: a user error at `span`.
fn err<T>(span: Span, message: impl Into<String>) -> Result<T, RunError> {
    Err(RunError::user(span, message))
}

/// A per-element input the executor computes outside the scoring kernel and
/// feeds through its gradient slot (`KInput::Grad`).
#[derive(Clone, Debug, PartialEq)]
pub enum Side {
    /// `rand()`: a seeded uniform draw in [0, 1) per weight (every `rand()` of
    /// one criterion reads the same draw).
    Rand,
    /// `accumulate(e)`: the sum of `e` (which may read `grad(w)`) over the
    /// training steps since pruning began.
    Accumulate(KExpr),
}

/// A criterion ready for the kernels: the per-element expression, the
/// expressions whose per-output-row sums it reads as `RowStat(i)` (channel
/// criteria such as `sum(abs(w), over = out_channel)`), and the side input
/// its `KInput::Grad` stands for, if not the loss gradient.
#[derive(Clone, Debug, PartialEq)]
pub struct LoweredCriterion {
    pub expr: KExpr,
    pub row_sums: Vec<KExpr>,
    /// How each `row_sums` expression's values become its row statistic.
    pub row_reduce: Vec<RowReduce>,
    pub side: Option<Side>,
}

/// How a per-element expression becomes one value per output row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowReduce {
    /// `sum(e, over = out_channel)`: the row's sum.
    Sum,
    /// `dist(e, over = out_channel)`: the sum of Euclidean distances from
    /// the row to every row of the tensor (FPGM, He et al. 2019: a row near
    /// the geometric median scores low).
    Dist,
}

impl RowReduce {
    /// The statistic of every row of `values` (`rows x cols`, row-major), in
    /// f64 in a fixed order: the same bits at any thread count.
    pub fn apply(self, values: &[f32], cols: usize) -> Vec<f32> {
        let rows: Vec<&[f32]> = values.chunks(cols.max(1)).collect();
        match self {
            RowReduce::Sum => rows
                .iter()
                .map(|r| r.iter().map(|&x| x as f64).sum::<f64>() as f32)
                .collect(),
            RowReduce::Dist => rows
                .iter()
                .map(|a| {
                    rows.iter()
                        .map(|b| {
                            a.iter()
                                .zip(b.iter())
                                .map(|(&x, &y)| {
                                    let d = x as f64 - y as f64;
                                    d * d
                                })
                                .sum::<f64>()
                                .sqrt()
                        })
                        .sum::<f64>() as f32
                })
                .collect(),
        }
    }
}

impl LoweredCriterion {
    /// Whether the criterion reads loss gradients, in its expression or in
    /// a per-row sum it reads (`sum(w * grad(w), over = out_channel)`).
    pub fn needs_grad(&self) -> bool {
        self.expr.needs_grad() || self.row_sums.iter().any(KExpr::needs_grad)
    }

    /// Whether it reads the weights' initial values anywhere.
    pub fn needs_init(&self) -> bool {
        self.expr.needs_init() || self.row_sums.iter().any(KExpr::needs_init)
    }

    /// Whether it reads per-input-column activation statistics anywhere.
    pub fn reads_acts(&self) -> bool {
        !self.expr.col_stats().is_empty() || self.row_sums.iter().any(|e| !e.col_stats().is_empty())
    }
}

/// What lowering collects besides the expression.
#[derive(Default)]
struct Cx {
    sums: Vec<KExpr>,
    reduce: Vec<RowReduce>,
    side: Option<(Side, Span)>,
    /// A `grad(w)` outside `accumulate(...)`.
    grad: Option<Span>,
}

/// Lowers a criterion expression (as written after `by`, or a declared or
/// standard criterion) for the kernels.
pub fn criterion_to_kernel(recipe: &CheckedRecipe, e: &Expr) -> Result<LoweredCriterion, RunError> {
    let mut cx = Cx::default();
    let expr = lower(recipe, e, 0, &mut cx)?;
    if let (Some((side, span)), Some(_)) = (&cx.side, cx.grad) {
        let what = match side {
            Side::Rand => "`rand()`",
            Side::Accumulate(_) => "`accumulate(...)`",
        };
        return err(
            *span,
            format!("a criterion with {what} cannot also read `grad(w)` outside it (both use the kernel's one per-weight side input)"),
        );
    }
    Ok(LoweredCriterion {
        expr,
        row_sums: cx.sums,
        row_reduce: cx.reduce,
        side: cx.side.map(|(s, _)| s),
    })
}

fn lower(r: &CheckedRecipe, e: &Expr, depth: usize, cx: &mut Cx) -> Result<KExpr, RunError> {
    if depth > 32 {
        return err(e.span, "criteria refer to each other too deeply");
    }
    Ok(match &e.kind {
        ExprKind::Number { value, .. } => KExpr::Const(*value as f32),
        ExprKind::Percent { value, .. } => KExpr::Const(*value as f32),
        ExprKind::Paren(inner) => lower(r, inner, depth, cx)?,
        ExprKind::Unary {
            op: UnaryOp::Neg,
            operand,
        } => KExpr::un(UnOp::Neg, lower(r, operand, depth, cx)?),
        ExprKind::Unary {
            op: UnaryOp::Not,
            operand,
        } => KExpr::cmp(CmpOp::Eq, lower(r, operand, depth, cx)?, KExpr::Const(0.0)),
        ExprKind::Binary { op, lhs, rhs } => {
            let a = lower(r, lhs, depth, cx)?;
            let b = lower(r, rhs, depth, cx)?;
            match op {
                BinaryOp::Add => KExpr::bin(BinOp::Add, a, b),
                BinaryOp::Sub => KExpr::bin(BinOp::Sub, a, b),
                BinaryOp::Mul => KExpr::bin(BinOp::Mul, a, b),
                BinaryOp::Div => KExpr::bin(BinOp::Div, a, b),
                BinaryOp::Pow => KExpr::bin(BinOp::Pow, a, b),
                BinaryOp::Lt => KExpr::cmp(CmpOp::Lt, a, b),
                BinaryOp::Le => KExpr::cmp(CmpOp::Le, a, b),
                BinaryOp::Gt => KExpr::cmp(CmpOp::Gt, a, b),
                BinaryOp::Ge => KExpr::cmp(CmpOp::Ge, a, b),
                BinaryOp::Eq => KExpr::cmp(CmpOp::Eq, a, b),
                BinaryOp::Ne => KExpr::cmp(CmpOp::Ne, a, b),
                // Truth values are 1.0 / 0.0.
                BinaryOp::And => KExpr::bin(
                    BinOp::Min,
                    KExpr::cmp(CmpOp::Ne, a, KExpr::Const(0.0)),
                    KExpr::cmp(CmpOp::Ne, b, KExpr::Const(0.0)),
                ),
                BinaryOp::Or => KExpr::bin(
                    BinOp::Max,
                    KExpr::cmp(CmpOp::Ne, a, KExpr::Const(0.0)),
                    KExpr::cmp(CmpOp::Ne, b, KExpr::Const(0.0)),
                ),
            }
        }
        ExprKind::Name(id) => match id.name.as_str() {
            "w" => KExpr::Input(KInput::Weight),
            "step" => KExpr::Input(KInput::Scalar(0)),
            name => match r.symbols.get(name) {
                Some(sym) if sym.kind == SymKind::Param => {
                    match sym.value.as_ref().and_then(|v| v.as_f64()) {
                        Some(v) => KExpr::Const(v as f32),
                        None => return err(id.span, format!("param `{name}` is not a number")),
                    }
                }
                Some(sym) if sym.kind == SymKind::Criterion => {
                    let decl = r
                        .ast
                        .items
                        .iter()
                        .find_map(|i| match i {
                            prunec_lang::ast::Item::Decl(d) if d.name.name == name => {
                                Some(&d.value)
                            }
                            _ => None,
                        })
                        .ok_or_else(|| {
                            RunError::user(id.span, format!("criterion `{name}` has no definition"))
                        })?;
                    lower(r, decl, depth + 1, cx)?
                }
                _ => match prunec_lang::stdlib::criterion(name) {
                    Some(def) => lower(r, def, depth + 1, cx).map_err(|e| {
                        RunError::user(
                            id.span,
                            format!("in the standard criterion `{name}`: {}", e.message()),
                        )
                    })?,
                    None => return err(id.span, format!("`{name}` is not a criterion")),
                },
            },
        },
        ExprKind::Call { callee, args } => {
            let mut arg = |i: usize| -> Result<KExpr, RunError> {
                match args.items.get(i) {
                    Some(a) => lower(r, &a.value, depth, cx),
                    None => err(
                        args.span,
                        format!("`{}` needs {} argument(s)", callee.name, i + 1),
                    ),
                }
            };
            match callee.name.as_str() {
                "grad" => {
                    cx.grad.get_or_insert(e.span);
                    KExpr::Input(KInput::Grad)
                }
                "rand" => {
                    match &cx.side {
                        None => cx.side = Some((Side::Rand, e.span)),
                        Some((Side::Rand, _)) => {}
                        Some(_) => {
                            return err(
                                e.span,
                                "a criterion cannot combine `rand()` with `accumulate(...)`",
                            )
                        }
                    }
                    KExpr::Input(KInput::Grad)
                }
                "accumulate" => {
                    let Some(a) = args.items.first() else {
                        return err(args.span, "`accumulate` needs the per-step score to sum");
                    };
                    let mut inner = Cx::default();
                    let step = lower(r, &a.value, depth, &mut inner)?;
                    if !inner.sums.is_empty() || inner.side.is_some() {
                        return err(a.value.span, "the per-step score of `accumulate` is elementwise: no group sums, `rand()` or nested `accumulate`");
                    }
                    if cx.side.is_some() {
                        return err(e.span, "a criterion can hold one `accumulate(...)` (and no `rand()` beside it)");
                    }
                    cx.side = Some((Side::Accumulate(step), e.span));
                    KExpr::Input(KInput::Grad)
                }
                "init" => KExpr::Input(KInput::Init),
                "act" => {
                    let stat = args
                        .named("stat")
                        .and_then(|a| a.value.as_name())
                        .map(|n| n.name.as_str())
                        .unwrap_or("norm");
                    if stat != "norm" {
                        return err(e.span, format!("`act(x, stat = {stat})` is not supported by the runtime yet; `norm` is"));
                    }
                    KExpr::Input(KInput::ColStat(0))
                }
                "abs" => KExpr::un(UnOp::Abs, arg(0)?),
                "sq" => KExpr::un(UnOp::Sq, arg(0)?),
                "sqrt" => KExpr::un(UnOp::Sqrt, arg(0)?),
                "log" => KExpr::un(UnOp::Log, arg(0)?),
                "exp" => KExpr::un(UnOp::Exp, arg(0)?),
                "sign" => KExpr::un(UnOp::Sign, arg(0)?),
                "min" => KExpr::bin(BinOp::Min, arg(0)?, arg(1)?),
                "max" => KExpr::bin(BinOp::Max, arg(0)?, arg(1)?),
                "where" => KExpr::select(arg(0)?, arg(1)?, arg(2)?),
                f @ ("sum" | "dist") => {
                    let over = args
                        .named("over")
                        .and_then(|a| a.value.as_name())
                        .map(|n| n.name.as_str())
                        .unwrap_or("all");
                    if !matches!(over, "out_channel" | "row") {
                        return err(e.span, format!("`{f}(..., over = {over})` is not supported by the kernels yet; `over = out_channel` is"));
                    }
                    let inner = arg(0)?;
                    let mut nested = Vec::new();
                    inner.visit_inputs(&mut |i| nested.push(i));
                    if nested.iter().any(|i| matches!(i, KInput::RowStat(_))) {
                        return err(e.span, "group sums cannot be nested");
                    }
                    let slot = cx.sums.len();
                    if slot > u8::MAX as usize {
                        return err(e.span, "too many group sums in one criterion");
                    }
                    cx.sums.push(inner);
                    cx.reduce.push(if f == "dist" {
                        RowReduce::Dist
                    } else {
                        RowReduce::Sum
                    });
                    KExpr::Input(KInput::RowStat(slot as u8))
                }
                other => {
                    return err(
                        e.span,
                        format!("`{other}(...)` cannot be compiled into a scoring kernel"),
                    )
                }
            }
        }
        _ => return err(e.span, "this is not part of a criterion"),
    })
}

/// Whether `by` names a method (`sparsegpt`, `sap`) rather than a criterion.
pub fn is_method(r: &CheckedRecipe, by: &Expr) -> bool {
    prunec_lang::resolved::Method::of(r, by) != prunec_lang::resolved::Method::Criterion
}

/// Lowers every prune stage's criterion the way a run will, so that a
/// criterion that does not compile into a kernel, or reads what its model
/// cannot provide, is a `check` error (P045) with its span, before any compute.
pub fn check_criteria(r: &CheckedRecipe) -> Vec<Diagnostic> {
    let mut diags = Vec::new();
    for s in &r.pipeline().stages {
        // The criteria an agreement study compares compile like a prune's.
        if let (prunec_lang::ast::StageKind::Analyze, Some(by)) = (s.kind, &s.by) {
            if let ExprKind::Call { callee, args } = &by.kind {
                if callee.name == "agreement" || callee.name == "sensitivity" {
                    let count = if callee.name == "agreement" { 2 } else { 1 };
                    for a in args.criteria(count) {
                        if let Err(e) = criterion_to_kernel(r, &a.value) {
                            diags.push(
                                Diagnostic::new(Code::Unsupported, e.message())
                                    .with_label(
                                        e.span().unwrap_or(a.value.span),
                                        "cannot be compiled into a scoring kernel",
                                    )
                                    .with_help("see `prunec explain` for what each criterion function supports"),
                            );
                        }
                    }
                }
            }
            continue;
        }
        if s.kind != prunec_lang::ast::StageKind::Prune || r.is_data_prune(s) {
            continue;
        }
        let Some(by) = &s.by else { continue };
        if is_method(r, by) {
            continue;
        }
        let model = s
            .subject
            .first()
            .and_then(|e| e.as_name())
            .map(|n| n.name.clone())
            .unwrap_or_default();
        let lowered = match criterion_to_kernel(r, by) {
            Ok(l) => l,
            Err(e) => {
                diags.push(
                    Diagnostic::new(Code::Unsupported, e.message())
                        .with_label(
                            e.span().unwrap_or(by.span),
                            "cannot be compiled into a scoring kernel",
                        )
                        .with_help(
                            "see `prunec explain` for what each criterion function supports",
                        ),
                );
                continue;
            }
        };
        let mut reads_step = false;
        lowered
            .expr
            .visit_inputs(&mut |i| reads_step |= i == KInput::Scalar(0));
        if let Some(Side::Accumulate(step)) = &lowered.side {
            step.visit_inputs(&mut |i| reads_step |= i == KInput::Scalar(0));
        }
        let lm = prunec_lang::check::models::is_language_model(&r.symbols, &model);
        let mut unsupported = |what: &str, help: &str| {
            diags.push(
                Diagnostic::new(
                    Code::Unsupported,
                    format!(
                        "this criterion reads {what}, which {}",
                        if lm {
                            format!(
                                "one-shot pruning of the language model `{model}` does not provide"
                            )
                        } else {
                            "only a `during` stage provides".to_string()
                        }
                    ),
                )
                .with_label(by.span, format!("reads {what}"))
                .with_help(help),
            );
        };
        if lm {
            let grad = lowered.side.is_none() && lowered.expr.needs_grad();
            let read: [(bool, &str); 6] = [
                (grad, "`grad(w)`"),
                (lowered.expr.needs_init(), "`init(w)`"),
                (!lowered.row_sums.is_empty(), "a group sum"),
                (matches!(lowered.side, Some(Side::Rand)), "`rand()`"),
                (
                    matches!(lowered.side, Some(Side::Accumulate(_))),
                    "`accumulate(...)`",
                ),
                (reads_step, "`step`"),
            ];
            for (_, what) in read.iter().filter(|(on, _)| *on) {
                unsupported(
                    what,
                    "language-model criteria read the weight `w` and `act(x)` only",
                );
            }
        } else if reads_step && s.during.is_none() {
            unsupported("`step`", "`step` counts the training steps of `prune ... during train ...`; outside training it would always be 0");
        }
    }
    diags
}

/// Whether a parameter name matches a glob (`*` matches any run of characters).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Iterative matcher with backtracking to the last `*`.
    let (mut i, mut j) = (0usize, 0usize);
    let (mut star, mut mark) = (None::<usize>, 0usize);
    while j < n.len() {
        if i < p.len() && (p[i] == n[j] || p[i] == '?') {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some(i);
            mark = j;
            i += 1;
        } else if let Some(s) = star {
            i = s + 1;
            mark += 1;
            j = mark;
        } else {
            return false;
        }
    }
    while i < p.len() && p[i] == '*' {
        i += 1;
    }
    i == p.len()
}

/// Strings of a resolved list value.
pub fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::List(items)) => items
            .iter()
            .filter_map(|i| i.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*.weight", "fc1.weight"));
        assert!(glob_match("layers.*.weight", "layers.3.mlp.up.weight"));
        assert!(!glob_match("*.weight", "fc1.bias"));
        assert!(glob_match("fc3.*", "fc3.bias"));
        assert!(glob_match("*embed*", "model.embed_tokens.weight"));
        assert!(!glob_match("fc1.weight", "fc1.weightx"));
    }

    #[test]
    fn row_statistics_are_sums_or_summed_distances_to_every_row() {
        // Rows (0, 0), (3, 4), (6, 8): distances 5 and 10 from the first,
        // 5 and 5 from the middle one (the geometric median), 10 and 5 from the last.
        let v = [0.0, 0.0, 3.0, 4.0, 6.0, 8.0];
        assert_eq!(RowReduce::Sum.apply(&v, 2), [0.0, 7.0, 14.0]);
        assert_eq!(RowReduce::Dist.apply(&v, 2), [15.0, 10.0, 15.0]);
    }
}
