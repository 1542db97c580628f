//! AST → canonical source text (`prunec fmt`): idempotent, meaning-preserving, keeps comments.
//!
//! Layout: one item per line, a blank line kept where the source had one,
//! two-space indentation, options broken one per line when a stage is wider
//! than [`MAX_WIDTH`]. Comments stay before (or at the end of) the item,
//! field or stage they were written at; a comment inside an expression moves
//! to just after the line that holds the expression.

use crate::ast::*;
use crate::parse::escape;

/// Lines longer than this are broken at stage options.
pub const MAX_WIDTH: usize = 100;

struct Comment {
    start: usize,
    end: usize,
    text: String,
    used: bool,
}

struct Printer<'a> {
    src: &'a str,
    out: String,
    comments: Vec<Comment>,
}

/// Formats a parsed recipe. `src` is the text it was parsed from (for comments
/// and blank lines).
pub fn ast_to_source(recipe: &Recipe, src: &str) -> String {
    let comments = crate::parse::comments(src)
        .into_iter()
        .map(|s| Comment {
            start: s.start,
            end: s.end,
            text: src[s.start..s.end].trim_end().to_string(),
            used: false,
        })
        .collect();
    let mut p = Printer {
        src,
        out: String::new(),
        comments,
    };
    let mut prev_end: Option<usize> = None;
    for item in &recipe.items {
        let span = item.span();
        if let Some(end) = prev_end {
            if p.blank_line_between(end, span.start) {
                p.out.push('\n');
            }
        }
        p.leading(span.start, 0);
        p.item(item);
        p.trailing(span.end);
        p.out.push('\n');
        prev_end = Some(span.end);
    }
    p.leading(src.len() + 1, 0);
    p.out
}

impl Printer<'_> {
    /// Whether the source has an empty line between two positions.
    fn blank_line_between(&self, a: usize, b: usize) -> bool {
        let between = &self.src[a.min(self.src.len())..b.min(self.src.len())];
        between.lines().skip(1).any(|l| l.trim().is_empty()) && between.matches('\n').count() >= 2
    }

    /// Emits the unused comments that start before `pos`, one per line.
    fn leading(&mut self, pos: usize, indent: usize) {
        for i in 0..self.comments.len() {
            if !self.comments[i].used && self.comments[i].start < pos {
                self.comments[i].used = true;
                let text = self.comments[i].text.clone();
                self.indent(indent);
                self.out.push_str(&text);
                self.out.push('\n');
            }
        }
    }

    /// Appends a comment that follows `end` on the same source line.
    fn trailing(&mut self, end: usize) {
        for c in &mut self.comments {
            if c.used || c.start < end {
                continue;
            }
            let between = &self.src[end.min(self.src.len())..c.start];
            if between.chars().all(|ch| ch == ' ' || ch == '\t') {
                c.used = true;
                self.out.push(' ');
                self.out.push_str(&c.text);
            }
            break;
        }
        // Comments inside the element just printed move right after it.
        let pending: Vec<usize> = (0..self.comments.len())
            .filter(|&i| !self.comments[i].used && self.comments[i].end <= end)
            .collect();
        for i in pending {
            self.comments[i].used = true;
            let text = self.comments[i].text.clone();
            let indent = self.current_indent();
            self.out.push('\n');
            self.out.push_str(&" ".repeat(indent));
            self.out.push_str(&text);
        }
    }

    fn current_indent(&self) -> usize {
        let line = self.out.rsplit('\n').next().unwrap_or("");
        line.len() - line.trim_start().len()
    }

    fn indent(&mut self, level: usize) {
        self.out.push_str(&"  ".repeat(level));
    }

    fn item(&mut self, item: &Item) {
        match item {
            Item::Header(h) => {
                let fields: Vec<String> = h
                    .fields
                    .iter()
                    .map(|f| format!("{} = {}", f.key.name, expr(&f.value)))
                    .collect();
                self.out.push_str(&format!(
                    "recipe {} {{ {} }}",
                    h.name.name,
                    fields.join(", ")
                ));
            }
            Item::Use(u) => {
                let mut path: Vec<&str> = u.path.iter().map(|i| i.name.as_str()).collect();
                let names: Vec<&str> = u.names.iter().map(|i| i.name.as_str()).collect();
                if u.braced {
                    self.out
                        .push_str(&format!("use {}.{{{}}}", path.join("."), names.join(", ")));
                } else {
                    path.extend(names);
                    self.out.push_str(&format!("use {}", path.join(".")));
                }
            }
            Item::Param(p) => {
                self.out
                    .push_str(&format!("param {} = {}", p.name.name, expr(&p.value)))
            }
            Item::Decl(d) => self.out.push_str(&format!(
                "{} {} = {}",
                d.kind.keyword(),
                d.name.name,
                expr(&d.value)
            )),
            Item::Constraints(c) => {
                self.out
                    .push_str(&format!("constraints {} {{\n", c.name.name));
                for f in &c.fields {
                    self.leading(f.span.start, 1);
                    self.indent(1);
                    self.out
                        .push_str(&format!("{} = {}", f.key.name, expr(&f.value)));
                    self.trailing(f.span.end);
                    self.out.push('\n');
                }
                self.leading(c.span.end, 1);
                self.out.push('}');
            }
            Item::Pipeline(p) => {
                self.out.push_str("pipeline {\n");
                self.stages(&p.stages, 1);
                self.leading(p.span.end, 1);
                self.out.push('}');
            }
        }
    }

    fn stages(&mut self, stages: &[Stage], level: usize) {
        for s in stages {
            self.leading(s.span.start, level);
            self.indent(level);
            self.stage(s, level);
            self.trailing(s.span.end);
            self.out.push('\n');
        }
    }

    /// Prints one stage starting at the current position (already indented).
    fn stage(&mut self, s: &Stage, level: usize) {
        let head = stage_head(s);
        let one_line = match &s.args {
            Some(a) => format!("{head} {}", args(a)),
            None => head.clone(),
        };
        if "  ".len() * level + one_line.len() <= MAX_WIDTH
            || s.args.as_ref().is_none_or(|a| a.items.is_empty())
        {
            self.out.push_str(&one_line);
        } else {
            self.out.push_str(&head);
            self.out.push_str(" (\n");
            for a in &s.args.as_ref().unwrap().items {
                self.indent(level + 1);
                self.out.push_str(&arg(a));
                self.out.push_str(",\n");
            }
            self.indent(level);
            self.out.push(')');
        }
        if let Some(b) = &s.block {
            self.out.push_str(" {\n");
            let single = b.stages.len() == 1 && !self.has_comments_in(b.span);
            match (&b.each, single) {
                (Some(each), true) => {
                    self.indent(level + 1);
                    self.out.push_str(&format!("each {}: ", each.name));
                    self.stage(&b.stages[0], level + 1);
                    self.trailing(b.stages[0].span.end);
                    self.out.push('\n');
                }
                (Some(each), false) => {
                    self.leading(each.span.start, level + 1);
                    self.indent(level + 1);
                    self.out.push_str(&format!("each {}:\n", each.name));
                    self.stages(&b.stages, level + 2);
                }
                (None, _) => self.stages(&b.stages, level + 1),
            }
            self.leading(b.span.end, level + 1);
            self.indent(level);
            self.out.push('}');
        }
        if let Some(d) = &s.during {
            self.out.push_str(" during\n");
            self.leading(d.span.start, level + 1);
            self.indent(level + 1);
            self.stage(d, level + 1);
        }
    }

    fn has_comments_in(&self, span: Span) -> bool {
        self.comments
            .iter()
            .any(|c| !c.used && c.start >= span.start && c.end <= span.end)
    }
}

/// A stage without its options, block and `during` part.
fn stage_head(s: &Stage) -> String {
    let mut out = s.kind.keyword().to_string();
    if !s.subject.is_empty() {
        out.push(' ');
        out.push_str(&s.subject.iter().map(expr).collect::<Vec<_>>().join(", "));
    }
    for (kw, e) in [("on", &s.on), ("by", &s.by), ("to", &s.to), ("->", &s.out)] {
        if let Some(e) = e {
            out.push_str(&format!(" {kw} {}", expr(e)));
        }
    }
    if let Some(l) = &s.label {
        out.push_str(&format!(" as {}", l.name));
    }
    out
}

fn args(a: &Args) -> String {
    format!(
        "({})",
        a.items.iter().map(arg).collect::<Vec<_>>().join(", ")
    )
}

fn arg(a: &Arg) -> String {
    match &a.name {
        Some(n) => format!("{} = {}", n.name, expr(&a.value)),
        None => expr(&a.value),
    }
}

/// Prints an expression; parentheses appear exactly where the AST has them.
pub fn expr(e: &Expr) -> String {
    match &e.kind {
        ExprKind::Number { text, .. } => text.clone(),
        ExprKind::Percent { text, .. } => format!("{text}%"),
        ExprKind::Pattern { n, m } => format!("{n}:{m}"),
        ExprKind::Duration {
            count,
            unit,
            prefix,
        } => {
            if *prefix {
                format!("{} {count}", unit.singular())
            } else if *count == 1 {
                format!("1 {}", unit.singular())
            } else {
                format!("{count} {}", unit.plural())
            }
        }
        ExprKind::Str(s) => escape(s),
        ExprKind::Bool(b) => b.to_string(),
        ExprKind::Name(i) => i.name.clone(),
        ExprKind::List(items) => format!(
            "[{}]",
            items.iter().map(expr).collect::<Vec<_>>().join(", ")
        ),
        ExprKind::Call { callee, args: a } => format!("{}{}", callee.name, args(a)),
        ExprKind::Member { base, member } => format!("{}.{}", expr(base), member.name),
        ExprKind::Per { base, unit } => format!("{} per {}", expr(base), unit.name),
        ExprKind::Unary {
            op: UnaryOp::Neg,
            operand,
        } => format!("-{}", expr(operand)),
        ExprKind::Unary {
            op: UnaryOp::Not,
            operand,
        } => format!("not {}", expr(operand)),
        ExprKind::Binary { op, lhs, rhs } => format!("{} {} {}", expr(lhs), op.symbol(), expr(rhs)),
        ExprKind::Paren(inner) => format!("({})", expr(inner)),
    }
}
