//! The one constant evaluator: arithmetic and comparisons over numbers,
//! percentages and whatever a caller resolves names to. The checker folds
//! params with it, the IR folds prune targets with it, and the executor
//! evaluates asserts with it (names there are params, metrics and labels).

use crate::ast::{BinaryOp, Expr, ExprKind, UnaryOp};
use crate::Span;

/// `a op b` for an arithmetic operator; `None` for any other operator.
pub fn arith(op: BinaryOp, a: f64, b: f64) -> Option<f64> {
    Some(match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Pow => a.powf(b),
        _ => return None,
    })
}

/// `a op b` for a comparison; `None` for any other operator.
pub fn compare(op: BinaryOp, a: f64, b: f64) -> Option<bool> {
    Some(match op {
        BinaryOp::Lt => a < b,
        BinaryOp::Le => a <= b,
        BinaryOp::Gt => a > b,
        BinaryOp::Ge => a >= b,
        BinaryOp::Eq => a == b,
        BinaryOp::Ne => a != b,
        _ => return None,
    })
}

/// Why an expression has no number.
#[derive(Debug, Clone, PartialEq)]
pub enum EvalError<E> {
    /// Not a numeric expression (a string, a call, a condition...).
    NotNumeric(Span),
    /// What the caller's name lookup said.
    Lookup(E),
}

/// The value of a numeric expression: numbers, percentages (as fractions),
/// parentheses, negation and arithmetic; names and `label.metric` members go
/// to `leaf`.
pub fn number<E>(
    e: &Expr,
    leaf: &mut dyn FnMut(&Expr) -> Result<f64, E>,
) -> Result<f64, EvalError<E>> {
    match &e.kind {
        ExprKind::Number { value, .. } | ExprKind::Percent { value, .. } => Ok(*value),
        ExprKind::Paren(inner) => number(inner, leaf),
        ExprKind::Unary {
            op: UnaryOp::Neg,
            operand,
        } => Ok(-number(operand, leaf)?),
        ExprKind::Binary { op, lhs, rhs } => {
            let (a, b) = (number(lhs, leaf)?, number(rhs, leaf)?);
            arith(*op, a, b).ok_or(EvalError::NotNumeric(e.span))
        }
        ExprKind::Name(_) | ExprKind::Member { .. } => leaf(e).map_err(EvalError::Lookup),
        _ => Err(EvalError::NotNumeric(e.span)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Expr {
        crate::parse::source_to_expr(s).unwrap()
    }

    #[test]
    fn numbers_percentages_and_names_fold() {
        let mut params = |e: &Expr| match e.as_name().map(|n| n.name.as_str()) {
            Some("keep") => Ok(0.25),
            _ => Err(e.span),
        };
        assert_eq!(number(&parse("1 - keep"), &mut params), Ok(0.75));
        assert_eq!(number(&parse("(50% + 0.1) * 2"), &mut params), Ok(1.2));
        assert_eq!(number(&parse("-(2 ^ 3)"), &mut params), Ok(-8.0));
        assert!(matches!(
            number(&parse("nope + 1"), &mut params),
            Err(EvalError::Lookup(_))
        ));
        assert!(matches!(
            number(&parse("\"x\""), &mut params),
            Err(EvalError::NotNumeric(_))
        ));
        assert_eq!(compare(BinaryOp::Ge, 1.0, 1.0), Some(true));
        assert_eq!(arith(BinaryOp::Lt, 1.0, 2.0), None);
    }
}
