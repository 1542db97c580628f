//! Constant values the checker computes from expressions (params, options, arguments).

use crate::ast::Unit;
use serde::Serialize;
use std::fmt;

/// A checked constant.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum Value {
    Int(i64),
    Float(f64),
    /// A fraction written as a percentage or a number in a fraction slot.
    Fraction(f64),
    /// `2% per layer`: a fraction or count with its qualifier.
    PerUnit(Box<Value>, String),
    Bool(bool),
    Str(String),
    Pattern {
        n: u64,
        m: u64,
    },
    Duration {
        count: u64,
        unit: Unit,
    },
    List(Vec<Value>),
    /// A word from a fixed set (`relu`, `global`, `cubic`).
    Word(String),
    /// A call to a built-in with its arguments resolved (defaults filled in).
    Call {
        name: String,
        args: Vec<(String, Value)>,
    },
    /// A reference to a declaration (`net`, `train`, `guard`).
    Ref(String),
    /// A criterion expression, kept as source text (the AST is in the recipe).
    Score(String),
}

impl Value {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) | Value::Fraction(f) => Some(*f),
            Value::Duration { count, .. } => Some(*count as f64),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Duration { count, .. } => i64::try_from(*count).ok(),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) | Value::Word(s) | Value::Ref(s) => Some(s),
            _ => None,
        }
    }

    /// An argument of a resolved call.
    pub fn arg(&self, name: &str) -> Option<&Value> {
        match self {
            Value::Call { args, .. } => args.iter().find(|(k, _)| k == name).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The name of a resolved call.
    pub fn call_name(&self) -> Option<&str> {
        match self {
            Value::Call { name, .. } => Some(name),
            _ => None,
        }
    }

    /// A short description of the value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Fraction(_) => "a fraction",
            Value::PerUnit(..) => "a per-unit amount",
            Value::Bool(_) => "a boolean",
            Value::Str(_) => "a string",
            Value::Pattern { .. } => "an N:M pattern",
            Value::Duration { .. } => "a duration",
            Value::List(_) => "a list",
            Value::Word(_) => "a word",
            Value::Call { .. } => "a call",
            Value::Ref(_) => "a name",
            Value::Score(_) => "a criterion expression",
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Fraction(x) => write!(f, "{}%", (x * 100.0 * 1e6).round() / 1e6),
            Value::PerUnit(v, u) => write!(f, "{v} per {u}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Str(s) => write!(f, "{}", crate::parse::escape(s)),
            Value::Pattern { n, m } => write!(f, "{n}:{m}"),
            Value::Duration { count, unit } => write!(f, "{count} {}", unit.plural()),
            Value::List(items) => {
                f.write_str("[")?;
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str("]")
            }
            Value::Word(w) | Value::Ref(w) => f.write_str(w),
            Value::Call { name, args } => {
                write!(f, "{name}(")?;
                for (i, (k, v)) in args.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k} = {v}")?;
                }
                f.write_str(")")
            }
            Value::Score(s) => f.write_str(s),
        }
    }
}
