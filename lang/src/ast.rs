//! The typed syntax tree of a recipe; every node carries the byte span it came from.

use serde::Serialize;
use std::fmt;

/// A half-open byte range `[start, end)` into the recipe source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Self {
        Span { start, end }
    }

    /// The smallest span covering both.
    pub fn join(self, other: Span) -> Span {
        Span::new(self.start.min(other.start), self.end.max(other.end))
    }

    pub fn len(self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(self) -> bool {
        self.start == self.end
    }

    pub fn shifted(self, by: usize) -> Span {
        Span::new(self.start + by, self.end + by)
    }
}

impl From<Span> for miette::SourceSpan {
    fn from(s: Span) -> Self {
        (s.start, s.len()).into()
    }
}

/// A name as written, with its span.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// A whole recipe file.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Recipe {
    pub items: Vec<Item>,
    pub span: Span,
}

impl Recipe {
    pub fn header(&self) -> Option<&Header> {
        self.items.iter().find_map(|i| match i {
            Item::Header(h) => Some(h),
            _ => None,
        })
    }

    pub fn pipelines(&self) -> impl Iterator<Item = &Pipeline> {
        self.items.iter().filter_map(|i| match i {
            Item::Pipeline(p) => Some(p),
            _ => None,
        })
    }
}

/// One top-level item.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Item {
    Header(Header),
    Use(UseDecl),
    Param(ParamDecl),
    Decl(Decl),
    Constraints(ConstraintsDecl),
    Pipeline(Pipeline),
}

impl Item {
    pub fn span(&self) -> Span {
        match self {
            Item::Header(h) => h.span,
            Item::Use(u) => u.span,
            Item::Param(p) => p.span,
            Item::Decl(d) => d.span,
            Item::Constraints(c) => c.span,
            Item::Pipeline(p) => p.span,
        }
    }
}

/// `recipe NAME { version = 1, seed = 7 }`
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Header {
    pub name: Ident,
    pub fields: Vec<Field>,
    pub span: Span,
}

/// `key = value` inside braces.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Field {
    pub key: Ident,
    pub value: Expr,
    pub span: Span,
}

/// `use std.wanda` or `use std.{wanda, sparsegpt}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UseDecl {
    /// The module path, e.g. `std`.
    pub path: Vec<Ident>,
    /// The imported names.
    pub names: Vec<Ident>,
    /// Whether the names were written in braces.
    pub braced: bool,
    pub span: Span,
}

/// `param NAME = default`
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ParamDecl {
    pub name: Ident,
    pub value: Expr,
    pub span: Span,
}

/// What a `model` / `dataset` / `criterion` / `schedule` declaration declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum DeclKind {
    Model,
    Dataset,
    Criterion,
    Schedule,
}

impl DeclKind {
    pub fn keyword(self) -> &'static str {
        match self {
            DeclKind::Model => "model",
            DeclKind::Dataset => "dataset",
            DeclKind::Criterion => "criterion",
            DeclKind::Schedule => "schedule",
        }
    }
}

/// `model net = mlp(...)` and its siblings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decl {
    pub kind: DeclKind,
    pub name: Ident,
    pub value: Expr,
    pub span: Span,
}

/// `constraints NAME { key = value ... }`
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConstraintsDecl {
    pub name: Ident,
    pub fields: Vec<Field>,
    pub span: Span,
}

/// `pipeline { stage* }`
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Pipeline {
    pub stages: Vec<Stage>,
    pub span: Span,
}

/// The kind of a pipeline stage, named by its keyword.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum StageKind {
    Train,
    Finetune,
    Calibrate,
    Prune,
    Evaluate,
    Assert,
    Export,
    Report,
    /// A study of a model whose table and plot land in the report.
    Analyze,
}

impl StageKind {
    pub const ALL: [StageKind; 9] = [
        StageKind::Train,
        StageKind::Finetune,
        StageKind::Calibrate,
        StageKind::Prune,
        StageKind::Evaluate,
        StageKind::Assert,
        StageKind::Export,
        StageKind::Report,
        StageKind::Analyze,
    ];

    pub fn keyword(self) -> &'static str {
        match self {
            StageKind::Train => "train",
            StageKind::Finetune => "finetune",
            StageKind::Calibrate => "calibrate",
            StageKind::Prune => "prune",
            StageKind::Evaluate => "evaluate",
            StageKind::Assert => "assert",
            StageKind::Export => "export",
            StageKind::Report => "report",
            StageKind::Analyze => "analyze",
        }
    }

    /// "a `train`", "an `evaluate`": the keyword with its article.
    pub fn a(self) -> String {
        let article = if matches!(
            self,
            StageKind::Evaluate | StageKind::Export | StageKind::Assert | StageKind::Analyze
        ) {
            "an"
        } else {
            "a"
        };
        format!("{article} `{}`", self.keyword())
    }

    pub fn from_keyword(s: &str) -> Option<StageKind> {
        StageKind::ALL.into_iter().find(|k| k.keyword() == s)
    }
}

impl fmt::Display for StageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.keyword())
    }
}

/// One pipeline stage: a keyword, an optional subject and clauses.
///
/// Every stage has the same shape (`KEYWORD subject [on X] [by X] [to X]
/// [-> X] [as NAME] [(args)] [{ each round: stages }] [during stage]`); which
/// clauses a stage kind accepts is checked by the checker, not the grammar.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stage {
    /// Stable id: the stage's position among the recipe's stages in source
    /// order (nested round-block and `during` stages after their parent).
    /// Checked options are keyed by it; it does not move when layout does.
    pub id: StageId,
    pub kind: StageKind,
    pub keyword_span: Span,
    pub subject: Vec<Expr>,
    pub on: Option<Expr>,
    pub by: Option<Expr>,
    pub to: Option<Expr>,
    pub out: Option<Expr>,
    pub label: Option<Ident>,
    pub args: Option<Args>,
    pub block: Option<Block>,
    pub during: Option<Box<Stage>>,
    pub span: Span,
}

impl Stage {
    /// The named argument `key = value` of the stage's parentheses, if written.
    pub fn arg(&self, key: &str) -> Option<&Arg> {
        self.args.as_ref().and_then(|a| a.named(key))
    }

    /// Where argument `key`'s value is written, or the stage keyword when it is not.
    pub fn value_span(&self, key: &str) -> Span {
        self.arg(key).map_or(self.keyword_span, |a| a.value.span)
    }
}

/// The id of a stage, see [`Stage::id`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct StageId(pub u32);

/// Numbers every stage of `items` in source order (see [`Stage::id`]).
pub fn number_stages(items: &mut [Item]) {
    fn walk(s: &mut Stage, next: &mut u32) {
        s.id = StageId(*next);
        *next += 1;
        if let Some(b) = &mut s.block {
            b.stages.iter_mut().for_each(|i| walk(i, next));
        }
        if let Some(d) = &mut s.during {
            walk(d, next);
        }
    }
    let mut next = 0;
    for item in items {
        if let Item::Pipeline(p) = item {
            p.stages.iter_mut().for_each(|s| walk(s, &mut next));
        }
    }
}

/// `{ each round: stage* }`
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Block {
    pub each: Option<Ident>,
    pub stages: Vec<Stage>,
    pub span: Span,
}

/// A parenthesised argument list.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Args {
    pub items: Vec<Arg>,
    pub span: Span,
}

impl Args {
    pub fn named(&self, key: &str) -> Option<&Arg> {
        self.items
            .iter()
            .find(|a| a.name.as_ref().is_some_and(|n| n.name == key))
    }

    /// The criteria an analysis call compares or prunes by, as written:
    /// its first `count` parameters, `a` (and `b`).
    pub fn criteria(&self, count: usize) -> impl Iterator<Item = &Arg> {
        ["a", "b"]
            .into_iter()
            .take(count)
            .enumerate()
            .filter_map(|(i, k)| self.get(k, i))
    }

    /// The argument of the parameter `key`, the `index`-th of its built-in:
    /// written `key = value`, or the `index`-th positional argument (the
    /// checker binds positional arguments to parameters in order).
    pub fn get(&self, key: &str, index: usize) -> Option<&Arg> {
        self.named(key)
            .or_else(|| self.items.iter().filter(|a| a.name.is_none()).nth(index))
    }
}

/// One argument, positional or `name = value`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Arg {
    pub name: Option<Ident>,
    pub value: Expr,
    pub span: Span,
}

/// An expression with its span.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

/// Unary operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum UnaryOp {
    Neg,
    Not,
}

/// Binary operators, loosest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum BinaryOp {
    Or,
    And,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
    Pow,
}

impl BinaryOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinaryOp::Or => "or",
            BinaryOp::And => "and",
            BinaryOp::Eq => "==",
            BinaryOp::Ne => "!=",
            BinaryOp::Lt => "<",
            BinaryOp::Le => "<=",
            BinaryOp::Gt => ">",
            BinaryOp::Ge => ">=",
            BinaryOp::Add => "+",
            BinaryOp::Sub => "-",
            BinaryOp::Mul => "*",
            BinaryOp::Div => "/",
            BinaryOp::Pow => "^",
        }
    }

    /// Binding power: higher binds tighter.
    pub fn precedence(self) -> u8 {
        match self {
            BinaryOp::Or => 1,
            BinaryOp::And => 2,
            BinaryOp::Eq | BinaryOp::Ne => 3,
            BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge => 4,
            BinaryOp::Add | BinaryOp::Sub => 5,
            BinaryOp::Mul | BinaryOp::Div => 6,
            BinaryOp::Pow => 8,
        }
    }

    pub fn right_assoc(self) -> bool {
        matches!(self, BinaryOp::Pow)
    }

    pub fn is_comparison(self) -> bool {
        matches!(
            self,
            BinaryOp::Eq | BinaryOp::Ne | BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge
        )
    }

    pub fn from_symbol(s: &str) -> Option<BinaryOp> {
        Some(match s {
            "or" => BinaryOp::Or,
            "and" => BinaryOp::And,
            "==" => BinaryOp::Eq,
            "!=" => BinaryOp::Ne,
            "<" => BinaryOp::Lt,
            "<=" => BinaryOp::Le,
            ">" => BinaryOp::Gt,
            ">=" => BinaryOp::Ge,
            "+" => BinaryOp::Add,
            "-" => BinaryOp::Sub,
            "*" => BinaryOp::Mul,
            "/" => BinaryOp::Div,
            "^" => BinaryOp::Pow,
            _ => return None,
        })
    }
}

/// Time units of durations such as `100 steps` or `epoch 3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Unit {
    Step,
    Epoch,
    Round,
}

impl Unit {
    pub fn plural(self) -> &'static str {
        match self {
            Unit::Step => "steps",
            Unit::Epoch => "epochs",
            Unit::Round => "rounds",
        }
    }

    pub fn singular(self) -> &'static str {
        match self {
            Unit::Step => "step",
            Unit::Epoch => "epoch",
            Unit::Round => "round",
        }
    }
}

/// The kinds of expressions.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum ExprKind {
    /// A number as written (`128`, `0.05`, `1e-3`); `text` keeps the spelling.
    Number {
        value: f64,
        text: String,
    },
    /// `92%`, stored as the fraction 0.92; `text` keeps the spelling without `%`.
    Percent {
        value: f64,
        text: String,
    },
    /// `2:4`
    Pattern {
        n: u64,
        m: u64,
    },
    /// `100 steps` (`prefix = false`) or `step 0` (`prefix = true`).
    Duration {
        count: u64,
        unit: Unit,
        prefix: bool,
    },
    Str(String),
    Bool(bool),
    Name(Ident),
    List(Vec<Expr>),
    Call {
        callee: Ident,
        args: Args,
    },
    Member {
        base: Box<Expr>,
        member: Ident,
    },
    /// `2% per layer`
    Per {
        base: Box<Expr>,
        unit: Ident,
    },
    Unary {
        op: UnaryOp,
        operand: Box<Expr>,
    },
    Binary {
        op: BinaryOp,
        lhs: Box<Expr>,
        rhs: Box<Expr>,
    },
    Paren(Box<Expr>),
}

impl Expr {
    /// The name if this expression is a bare name.
    pub fn as_name(&self) -> Option<&Ident> {
        match &self.kind {
            ExprKind::Name(i) => Some(i),
            ExprKind::Paren(e) => e.as_name(),
            _ => None,
        }
    }

    /// A dotted path such as `dense.perplexity`, if the expression is one.
    pub fn as_path(&self) -> Option<Vec<&Ident>> {
        match &self.kind {
            ExprKind::Name(i) => Some(vec![i]),
            ExprKind::Member { base, member } => {
                let mut p = base.as_path()?;
                p.push(member);
                Some(p)
            }
            _ => None,
        }
    }
}
