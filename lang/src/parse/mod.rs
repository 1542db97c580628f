//! Source text → AST: the pest grammar (`recipe.pest`), one `build_*` function per rule.
//!
//! The parser never fails: [`source_to_ast`] returns the recipe it could build
//! together with every syntax error found (see `recover.rs` for how a file is
//! cut into independently parsed declarations and stages).

mod errors;
mod recover;

use crate::ast::*;
use crate::diag::{Code, Diagnostic};
use pest::iterators::Pair;
use pest::Parser as _;

#[derive(pest_derive::Parser)]
#[grammar = "parse/recipe.pest"]
pub(crate) struct RecipeParser;

/// The largest recipe file accepted, in bytes. Recipes are small; anything
/// larger is almost certainly the wrong file.
pub const MAX_SOURCE_BYTES: usize = 4 * 1024 * 1024;

/// The deepest nesting of brackets accepted in one expression.
pub const MAX_NESTING: usize = 200;

/// The result of parsing: the recipe as far as it could be built, and every
/// syntax error, sorted by position.
#[derive(Debug)]
pub struct Parsed {
    pub recipe: Recipe,
    pub errors: Vec<Diagnostic>,
}

/// Decodes raw bytes as UTF-8, reporting the first invalid byte.
pub fn bytes_to_source(bytes: &[u8]) -> Result<&str, Diagnostic> {
    if bytes.len() > MAX_SOURCE_BYTES {
        return Err(Diagnostic::new(
            Code::TooLarge,
            format!(
                "the recipe is {} bytes; recipes larger than {} bytes are refused",
                bytes.len(),
                MAX_SOURCE_BYTES
            ),
        )
        .with_label(Span::new(0, 0), "this file")
        .with_help("is this the right file? A recipe is a short text file ending in `.prune`"));
    }
    std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        Diagnostic::new(
            Code::NotUtf8,
            format!(
                "the recipe is not valid UTF-8 (invalid byte 0x{:02x} at offset {at})",
                bytes[at]
            ),
        )
        .with_label(Span::new(at, at), "invalid UTF-8 starts here")
        .with_help("save the recipe as UTF-8 text")
    })
}

/// Parses recipe source into an AST, recovering at declaration and stage
/// boundaries so that every syntax error is reported.
pub fn source_to_ast(src: &str) -> Parsed {
    pest::set_error_detail(true);
    let mut errors = Vec::new();
    if src.len() > MAX_SOURCE_BYTES {
        errors.push(bytes_to_source(src.as_bytes()).unwrap_err());
        return Parsed {
            recipe: Recipe {
                items: vec![],
                span: Span::new(0, 0),
            },
            errors,
        };
    }
    if let Some(d) = recover::nesting_error(src) {
        errors.push(d);
        return Parsed {
            recipe: Recipe {
                items: vec![],
                span: Span::new(0, src.len()),
            },
            errors,
        };
    }
    let mut items = recover::parse_items(src, &mut errors);
    crate::ast::number_stages(&mut items);
    if items.is_empty() && errors.is_empty() {
        errors.push(
            Diagnostic::new(Code::Empty, "the recipe is empty")
                .with_label(Span::new(0, src.len()), "nothing to run here")
                .with_help("a recipe starts with a header such as `recipe my_run { version = 1, seed = 0 }`"),
        );
    }
    errors.sort_by_key(|d| d.sort_key());
    Parsed {
        recipe: Recipe {
            items,
            span: Span::new(0, src.len()),
        },
        errors,
    }
}

/// The spans of the comments in `src`, in order (for the formatter).
pub fn comments(src: &str) -> Vec<Span> {
    recover::comment_spans(src)
}

/// Parses one expression on its own (used for `--set name=value`).
pub fn source_to_expr(src: &str) -> Result<Expr, Diagnostic> {
    pest::set_error_detail(true);
    if let Some(d) = recover::nesting_error(src) {
        return Err(d);
    }
    let mut pairs = RecipeParser::parse(Rule::expr_alone, src)
        .map_err(|e| errors::syntax_error(e, src, Span::new(0, src.len()), "a value"))?;
    let top = pairs.next().expect("expr_alone yields one pair");
    let expr = top.into_inner().next().expect("expr_alone holds an expr");
    Ok(build_expr(expr, 0))
}

fn span_of(p: &Pair<'_, Rule>, base: usize) -> Span {
    let s = p.as_span();
    let text = p.as_str();
    // pest lets a rule that ends in a repetition swallow the whitespace and
    // comments after it; spans end at the last real token.
    let len = if text.ends_with(|c: char| c.is_whitespace()) || text.contains('#') {
        end_of_tokens(text)
    } else {
        text.len()
    };
    Span::new(s.start() + base, s.start() + len + base)
}

/// The length of `text` up to the end of its last token (not whitespace,
/// not a comment), with strings taken whole.
fn end_of_tokens(text: &str) -> usize {
    let bytes = text.as_bytes();
    let mut end = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b' ' | b'\t' | b'\r' | b'\n' => i += 1,
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' && bytes[i] != b'\n' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i = (i + 1).min(bytes.len());
                end = i;
            }
            _ => {
                i += 1;
                end = i;
            }
        }
    }
    while !text.is_char_boundary(end) {
        end += 1;
    }
    end
}

fn build_ident(p: Pair<'_, Rule>, base: usize) -> Ident {
    Ident {
        name: p.as_str().to_string(),
        span: span_of(&p, base),
    }
}

pub(crate) fn build_item(p: Pair<'_, Rule>, base: usize) -> Item {
    match p.as_rule() {
        Rule::header => Item::Header(build_header(p, base)),
        Rule::use_decl => Item::Use(build_use(p, base)),
        Rule::param_decl => {
            let span = span_of(&p, base);
            let mut it = p.into_inner().filter(|q| q.as_rule() != Rule::kw_param);
            let name = build_ident(it.next().unwrap(), base);
            let value = build_expr(it.next().unwrap(), base);
            Item::Param(ParamDecl { name, value, span })
        }
        Rule::decl => {
            let span = span_of(&p, base);
            let mut it = p.into_inner();
            let kind = match it.next().unwrap().as_str() {
                "model" => DeclKind::Model,
                "dataset" => DeclKind::Dataset,
                "criterion" => DeclKind::Criterion,
                _ => DeclKind::Schedule,
            };
            let name = build_ident(it.next().unwrap(), base);
            let value = build_expr(it.next().unwrap(), base);
            Item::Decl(Decl {
                kind,
                name,
                value,
                span,
            })
        }
        Rule::constraints_decl => {
            let span = span_of(&p, base);
            let mut it = p
                .into_inner()
                .filter(|q| q.as_rule() != Rule::kw_constraints);
            let name = build_ident(it.next().unwrap(), base);
            let fields = build_fields(it.next().unwrap(), base);
            Item::Constraints(ConstraintsDecl { name, fields, span })
        }
        Rule::pipeline => {
            let span = span_of(&p, base);
            let stages = p
                .into_inner()
                .filter(|q| q.as_rule() == Rule::stage)
                .map(|q| build_stage(q, base))
                .collect();
            Item::Pipeline(Pipeline { stages, span })
        }
        r => unreachable!("not an item: {r:?}"),
    }
}

fn build_header(p: Pair<'_, Rule>, base: usize) -> Header {
    let span = span_of(&p, base);
    let mut it = p.into_inner().filter(|q| q.as_rule() != Rule::kw_recipe);
    let name = build_ident(it.next().unwrap(), base);
    let fields = build_fields(it.next().unwrap(), base);
    Header { name, fields, span }
}

fn build_fields(p: Pair<'_, Rule>, base: usize) -> Vec<Field> {
    p.into_inner()
        .map(|f| {
            let span = span_of(&f, base);
            let mut it = f.into_inner();
            let key = build_ident(it.next().unwrap(), base);
            let value = build_expr(it.next().unwrap(), base);
            Field { key, value, span }
        })
        .collect()
}

fn build_use(p: Pair<'_, Rule>, base: usize) -> UseDecl {
    let span = span_of(&p, base);
    let path_pair = p
        .into_inner()
        .find(|q| q.as_rule() == Rule::use_path)
        .unwrap();
    let mut path = Vec::new();
    let mut names = Vec::new();
    let mut braced = false;
    for q in path_pair.into_inner() {
        match q.as_rule() {
            Rule::ident => path.push(build_ident(q, base)),
            Rule::use_set => {
                braced = true;
                names.extend(q.into_inner().map(|i| build_ident(i, base)));
            }
            _ => {}
        }
    }
    if !braced {
        // `use std.wanda`: the last segment is the imported name.
        if let Some(last) = path.pop() {
            names.push(last);
        }
    }
    UseDecl {
        path,
        names,
        braced,
        span,
    }
}

pub(crate) fn build_stage(p: Pair<'_, Rule>, base: usize) -> Stage {
    let span = span_of(&p, base);
    let mut it = p.into_inner();
    let kw = it.next().unwrap();
    let kind = StageKind::from_keyword(kw.as_str()).expect("stage keyword");
    let mut stage = Stage {
        id: StageId::default(),
        kind,
        keyword_span: span_of(&kw, base),
        subject: vec![],
        on: None,
        by: None,
        to: None,
        out: None,
        label: None,
        args: None,
        block: None,
        during: None,
        span,
    };
    for q in it {
        match q.as_rule() {
            Rule::subject => stage.subject = q.into_inner().map(|e| build_expr(e, base)).collect(),
            Rule::on_clause => stage.on = Some(clause_expr(q, base)),
            Rule::by_clause => stage.by = Some(clause_expr(q, base)),
            Rule::to_clause => stage.to = Some(clause_expr(q, base)),
            Rule::out_clause => stage.out = Some(clause_expr(q, base)),
            Rule::as_clause => {
                let id = q.into_inner().find(|r| r.as_rule() == Rule::ident).unwrap();
                stage.label = Some(build_ident(id, base));
            }
            Rule::args => stage.args = Some(build_args(q, base)),
            Rule::during_clause => {
                let s = q.into_inner().find(|r| r.as_rule() == Rule::stage).unwrap();
                stage.during = Some(Box::new(build_stage(s, base)));
            }
            Rule::block => stage.block = Some(build_block(q, base)),
            r => unreachable!("not a clause: {r:?}"),
        }
    }
    stage
}

fn clause_expr(p: Pair<'_, Rule>, base: usize) -> Expr {
    let e = p.into_inner().find(|r| r.as_rule() == Rule::expr).unwrap();
    build_expr(e, base)
}

fn build_block(p: Pair<'_, Rule>, base: usize) -> Block {
    let span = span_of(&p, base);
    let mut each = None;
    let mut stages = Vec::new();
    for q in p.into_inner() {
        match q.as_rule() {
            Rule::each_label => {
                let id = q.into_inner().find(|r| r.as_rule() == Rule::ident).unwrap();
                each = Some(build_ident(id, base));
            }
            Rule::stage => stages.push(build_stage(q, base)),
            _ => {}
        }
    }
    Block { each, stages, span }
}

fn build_args(p: Pair<'_, Rule>, base: usize) -> Args {
    let span = span_of(&p, base);
    let items = p
        .into_inner()
        .map(|a| {
            let aspan = span_of(&a, base);
            let mut name = None;
            let mut value = None;
            for q in a.into_inner() {
                match q.as_rule() {
                    Rule::arg_name => name = Some(build_ident(q, base)),
                    Rule::expr => value = Some(build_expr(q, base)),
                    _ => {}
                }
            }
            Arg {
                name,
                value: value.unwrap(),
                span: aspan,
            }
        })
        .collect();
    Args { items, span }
}

/// Builds an expression with precedence climbing over the flat
/// `prefix* postfixed (infix prefix* postfixed)*` sequence of the grammar.
pub(crate) fn build_expr(p: Pair<'_, Rule>, base: usize) -> Expr {
    // Operands (each with its prefixes applied) and operators, in order.
    let mut operands: Vec<Expr> = Vec::new();
    let mut ops: Vec<BinaryOp> = Vec::new();
    let mut prefixes: Vec<(UnaryOp, Span)> = Vec::new();
    for q in p.into_inner() {
        match q.as_rule() {
            Rule::prefix => {
                let op = if q.as_str() == "-" {
                    UnaryOp::Neg
                } else {
                    UnaryOp::Not
                };
                prefixes.push((op, span_of(&q, base)));
            }
            Rule::postfixed => {
                let mut e = build_postfixed(q, base);
                while let Some((op, s)) = prefixes.pop() {
                    e = Expr {
                        span: s.join(e.span),
                        kind: ExprKind::Unary {
                            op,
                            operand: Box::new(e),
                        },
                    };
                }
                operands.push(e);
            }
            Rule::infix => ops.push(BinaryOp::from_symbol(q.as_str()).expect("infix symbol")),
            r => unreachable!("not part of an expression: {r:?}"),
        }
    }
    climb(
        &mut operands.into_iter(),
        &mut ops.into_iter().peekable(),
        0,
    )
}

fn climb(
    operands: &mut impl Iterator<Item = Expr>,
    ops: &mut std::iter::Peekable<impl Iterator<Item = BinaryOp>>,
    min_prec: u8,
) -> Expr {
    // Iterative for left-associative chains; recursion depth is bounded by the
    // number of distinct precedence levels (and `^` chains, which are short).
    let mut lhs = operands.next().expect("an operand");
    while let Some(&op) = ops.peek() {
        if op.precedence() < min_prec {
            break;
        }
        ops.next();
        let next_min = if op.right_assoc() {
            op.precedence()
        } else {
            op.precedence() + 1
        };
        let rhs = climb(operands, ops, next_min);
        lhs = Expr {
            span: lhs.span.join(rhs.span),
            kind: ExprKind::Binary {
                op,
                lhs: Box::new(lhs),
                rhs: Box::new(rhs),
            },
        };
    }
    lhs
}

fn build_postfixed(p: Pair<'_, Rule>, base: usize) -> Expr {
    let mut it = p.into_inner();
    let mut e = build_primary(it.next().unwrap(), base);
    for post in it {
        let inner = post.into_inner().next().unwrap();
        let ps = span_of(&inner, base);
        match inner.as_rule() {
            Rule::member => {
                let id = inner.into_inner().next().unwrap();
                e = Expr {
                    span: e.span.join(ps),
                    kind: ExprKind::Member {
                        base: Box::new(e),
                        member: build_ident(id, base),
                    },
                };
            }
            Rule::per_unit => {
                let id = inner
                    .into_inner()
                    .find(|r| r.as_rule() == Rule::ident)
                    .unwrap();
                e = Expr {
                    span: e.span.join(ps),
                    kind: ExprKind::Per {
                        base: Box::new(e),
                        unit: build_ident(id, base),
                    },
                };
            }
            r => unreachable!("not a postfix: {r:?}"),
        }
    }
    e
}

fn parse_digits(s: &str) -> u64 {
    s.chars()
        .filter(|c| *c != '_')
        .try_fold(0u64, |acc, c| {
            acc.checked_mul(10)?.checked_add(c as u64 - '0' as u64)
        })
        .unwrap_or(u64::MAX)
}

fn build_primary(p: Pair<'_, Rule>, base: usize) -> Expr {
    let span = span_of(&p, base);
    let kind = match p.as_rule() {
        Rule::number => {
            let text = p.as_str().to_string();
            let value = text
                .replace('_', "")
                .parse::<f64>()
                .unwrap_or(f64::INFINITY);
            ExprKind::Number { value, text }
        }
        Rule::percent => {
            let text = p.as_str().trim_end_matches('%').to_string();
            let value = text
                .replace('_', "")
                .parse::<f64>()
                .unwrap_or(f64::INFINITY)
                / 100.0;
            ExprKind::Percent { value, text }
        }
        Rule::pattern => {
            let (n, m) = p.as_str().split_once(':').unwrap();
            ExprKind::Pattern {
                n: parse_digits(n),
                m: parse_digits(m),
            }
        }
        Rule::duration => {
            let mut count = 0;
            let mut unit = Unit::Step;
            let mut prefix = false;
            for (i, q) in p.into_inner().enumerate() {
                match q.as_rule() {
                    Rule::digits => count = parse_digits(q.as_str()),
                    Rule::unit => {
                        prefix = i == 0;
                        unit = match q.as_str().trim_end_matches('s') {
                            "step" => Unit::Step,
                            "epoch" => Unit::Epoch,
                            _ => Unit::Round,
                        };
                    }
                    _ => {}
                }
            }
            ExprKind::Duration {
                count,
                unit,
                prefix,
            }
        }
        Rule::string => {
            let raw = p.into_inner().next().map(|q| q.as_str()).unwrap_or("");
            ExprKind::Str(unescape(raw))
        }
        Rule::boolean => ExprKind::Bool(p.as_str() == "true"),
        Rule::list => ExprKind::List(p.into_inner().map(|q| build_expr(q, base)).collect()),
        Rule::call => {
            let mut it = p.into_inner();
            let callee = build_ident(it.next().unwrap(), base);
            let args = build_args(it.next().unwrap(), base);
            ExprKind::Call { callee, args }
        }
        Rule::paren => ExprKind::Paren(Box::new(build_expr(p.into_inner().next().unwrap(), base))),
        Rule::name => ExprKind::Name(build_ident(p.into_inner().next().unwrap(), base)),
        r => unreachable!("not a primary: {r:?}"),
    };
    Expr { kind, span }
}

/// Resolves the escapes `\"`, `\\`, `\n`, `\t`; any other escaped character stands for itself.
fn unescape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(other) => out.push(other),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Writes a string literal with the escapes [`unescape`] reads.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests;
