//! The params a step reads: the names in its stage's clauses and options,
//! followed through the declarations they name. A sweep forks where the
//! variants give these params different values.

use prunec_lang::ast::{Expr, ExprKind, Item, Stage};
use prunec_lang::check::SymKind;
use prunec_lang::CheckedRecipe;
use std::collections::{BTreeMap, BTreeSet};

fn expr_names(e: &Expr, out: &mut BTreeSet<String>) {
    match &e.kind {
        ExprKind::Name(id) => {
            out.insert(id.name.clone());
        }
        ExprKind::List(items) => items.iter().for_each(|i| expr_names(i, out)),
        ExprKind::Call { callee, args } => {
            out.insert(callee.name.clone());
            args.items.iter().for_each(|a| expr_names(&a.value, out));
        }
        ExprKind::Member { base, .. } => expr_names(base, out),
        ExprKind::Per { base, .. } => expr_names(base, out),
        ExprKind::Unary { operand, .. } => expr_names(operand, out),
        ExprKind::Binary { lhs, rhs, .. } => {
            expr_names(lhs, out);
            expr_names(rhs, out);
        }
        ExprKind::Paren(i) => expr_names(i, out),
        ExprKind::Number { .. }
        | ExprKind::Percent { .. }
        | ExprKind::Pattern { .. }
        | ExprKind::Duration { .. }
        | ExprKind::Str(_)
        | ExprKind::Bool(_) => {}
    }
}

fn stage_names(s: &Stage, out: &mut BTreeSet<String>) {
    let clauses = s.subject.iter().chain(
        [&s.on, &s.by, &s.to, &s.out]
            .into_iter()
            .filter_map(|c| c.as_ref()),
    );
    clauses.for_each(|e| expr_names(e, out));
    if let Some(args) = &s.args {
        args.items.iter().for_each(|a| expr_names(&a.value, out));
    }
    if let Some(b) = &s.block {
        b.stages.iter().for_each(|i| stage_names(i, out));
    }
    if let Some(d) = &s.during {
        stage_names(d, out);
    }
}

/// The params a stage reads: the names in its clauses and options, followed
/// through the declarations (params, models, data sets, criteria, schedules,
/// constraint sets) they name.
pub(super) fn stage_params(r: &CheckedRecipe, s: &Stage) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    stage_names(s, &mut seen);
    params_of(r, seen)
}

/// The params among `names` and the declarations they name, transitively.
pub(super) fn params_of(r: &CheckedRecipe, mut seen: BTreeSet<String>) -> BTreeSet<String> {
    let mut decls: BTreeMap<&str, Vec<&Expr>> = BTreeMap::new();
    for item in &r.ast.items {
        match item {
            Item::Param(p) => decls.entry(&p.name.name).or_default().push(&p.value),
            Item::Decl(d) => decls.entry(&d.name.name).or_default().push(&d.value),
            Item::Constraints(c) => decls
                .entry(&c.name.name)
                .or_default()
                .extend(c.fields.iter().map(|f| &f.value)),
            _ => {}
        }
    }
    let mut todo: Vec<String> = seen.iter().cloned().collect();
    while let Some(n) = todo.pop() {
        for e in decls.get(n.as_str()).into_iter().flatten() {
            let mut found = BTreeSet::new();
            expr_names(e, &mut found);
            for f in found {
                if seen.insert(f.clone()) {
                    todo.push(f);
                }
            }
        }
    }
    seen.into_iter()
        .filter(|n| r.symbols.get(n).is_some_and(|s| s.kind == SymKind::Param))
        .collect()
}
