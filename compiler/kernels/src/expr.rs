//! The kernel expression type that criteria lower into, with its exact f32 semantics.
//!
//! Every operation is defined so that the reference interpreter ([`KExpr::eval`]) and the
//! cranelift JIT produce the same bits:
//!
//! - No fused multiply-add anywhere; every operation rounds once, as IEEE 754 binary32.
//! - `sq(x)` is `x * x`; `sqrt` is the correctly rounded IEEE square root.
//! - `log`, `exp` and `pow` call the same Rust functions (`f32::ln`, `f32::exp`,
//!   `f32::powf`) from both paths.
//! - `sign(x)` is `1.0` for `x > 0`, `-1.0` for `x < 0`, `+0.0` for `±0` and NaN for NaN.
//! - `min` / `max` return NaN when either operand is NaN; `-0.0` is smaller than `+0.0`.
//! - Comparisons are ordered (`false`, hence `0.0`, when an operand is NaN), except `!=`,
//!   which is `true` for NaN. They yield `1.0` or `0.0`.
//! - `where(c, a, b)` takes `a` when `c` is neither `±0` nor NaN, else `b`.
//! - A score that is NaN is reported as the canonical quiet NaN (`0x7fc0_0000`).
//!
//! Scores are ranked by [`score_key`]: a total order where NaN ranks below `-inf` (so NaN
//! scores are pruned first) and `-0.0` ties with `+0.0`.

use std::fmt;

/// One input an expression reads, per weight element.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KInput {
    /// The weight itself (`w`).
    Weight,
    /// The gradient of the loss with respect to the weight (`grad(w)`).
    Grad,
    /// The weight at initialisation (`init(w)`, for lottery tickets).
    Init,
    /// A per-input-column statistic, e.g. Wanda's activation L2 norm (`act(x)`), by slot.
    ColStat(u8),
    /// A per-output-row statistic, by slot.
    RowStat(u8),
    /// A runtime scalar (e.g. the training step), by slot in [`super::PruneOptions::scalars`].
    Scalar(u8),
}

/// Elementwise unary operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnOp {
    Neg,
    Abs,
    Sq,
    Sqrt,
    Log,
    Exp,
    Sign,
}

/// Elementwise binary operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Min,
    Max,
    Pow,
}

/// Comparisons; they yield `1.0` (true) or `0.0` (false).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

/// A criterion expression evaluated once per weight element; higher scores are kept.
#[derive(Clone, Debug, PartialEq)]
pub enum KExpr {
    Const(f32),
    Input(KInput),
    Unary(UnOp, Box<KExpr>),
    Binary(BinOp, Box<KExpr>, Box<KExpr>),
    Cmp(CmpOp, Box<KExpr>, Box<KExpr>),
    Where(Box<KExpr>, Box<KExpr>, Box<KExpr>),
}

/// The values an expression reads for one element.
#[derive(Clone, Copy, Debug, Default)]
pub struct ElemInputs<'a> {
    pub weight: f32,
    pub grad: f32,
    pub init: f32,
    pub col_stats: &'a [f32],
    pub row_stats: &'a [f32],
    pub scalars: &'a [f32],
}

impl KExpr {
    /// `w`.
    pub fn weight() -> Self {
        KExpr::Input(KInput::Weight)
    }

    /// `abs(w)`: magnitude pruning.
    pub fn magnitude() -> Self {
        KExpr::un(UnOp::Abs, KExpr::weight())
    }

    /// `abs(w) * col_stat[slot]`: Wanda's score when the slot holds the input-column L2 norms.
    pub fn wanda(slot: u8) -> Self {
        KExpr::bin(
            BinOp::Mul,
            KExpr::magnitude(),
            KExpr::Input(KInput::ColStat(slot)),
        )
    }

    pub fn un(op: UnOp, a: KExpr) -> Self {
        KExpr::Unary(op, Box::new(a))
    }

    pub fn bin(op: BinOp, a: KExpr, b: KExpr) -> Self {
        KExpr::Binary(op, Box::new(a), Box::new(b))
    }

    pub fn cmp(op: CmpOp, a: KExpr, b: KExpr) -> Self {
        KExpr::Cmp(op, Box::new(a), Box::new(b))
    }

    pub fn select(c: KExpr, a: KExpr, b: KExpr) -> Self {
        KExpr::Where(Box::new(c), Box::new(a), Box::new(b))
    }

    /// Calls `f` on every input the expression reads (with repetitions).
    pub fn visit_inputs(&self, f: &mut impl FnMut(KInput)) {
        match self {
            KExpr::Const(_) => {}
            KExpr::Input(i) => f(*i),
            KExpr::Unary(_, a) => a.visit_inputs(f),
            KExpr::Binary(_, a, b) | KExpr::Cmp(_, a, b) => {
                a.visit_inputs(f);
                b.visit_inputs(f);
            }
            KExpr::Where(c, a, b) => {
                c.visit_inputs(f);
                a.visit_inputs(f);
                b.visit_inputs(f);
            }
        }
    }

    /// The distinct inputs the expression reads, sorted.
    pub fn inputs(&self) -> Vec<KInput> {
        let mut v = Vec::new();
        self.visit_inputs(&mut |i| v.push(i));
        v.sort();
        v.dedup();
        v
    }

    /// Whether the expression reads `grad(w)`.
    pub fn needs_grad(&self) -> bool {
        self.inputs().contains(&KInput::Grad)
    }

    /// Whether the expression reads `init(w)`.
    pub fn needs_init(&self) -> bool {
        self.inputs().contains(&KInput::Init)
    }

    /// The per-column statistic slots read, sorted.
    pub fn col_stats(&self) -> Vec<u8> {
        self.inputs()
            .into_iter()
            .filter_map(|i| match i {
                KInput::ColStat(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    /// The per-row statistic slots read, sorted.
    pub fn row_stats(&self) -> Vec<u8> {
        self.inputs()
            .into_iter()
            .filter_map(|i| match i {
                KInput::RowStat(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    /// The runtime scalar slots read, sorted.
    pub fn scalars(&self) -> Vec<u8> {
        self.inputs()
            .into_iter()
            .filter_map(|i| match i {
                KInput::Scalar(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    /// Whether any operation has no f32x4 instruction (log, exp, pow call Rust per lane).
    pub fn has_calls(&self) -> bool {
        match self {
            KExpr::Const(_) | KExpr::Input(_) => false,
            KExpr::Unary(op, a) => matches!(op, UnOp::Log | UnOp::Exp) || a.has_calls(),
            KExpr::Binary(op, a, b) => *op == BinOp::Pow || a.has_calls() || b.has_calls(),
            KExpr::Cmp(_, a, b) => a.has_calls() || b.has_calls(),
            KExpr::Where(c, a, b) => c.has_calls() || a.has_calls() || b.has_calls(),
        }
    }

    /// A canonical text form, used as the cache key (constants by their exact bits).
    pub fn cache_key(&self) -> String {
        let mut s = String::new();
        self.write_key(&mut s);
        s
    }

    fn write_key(&self, s: &mut String) {
        use std::fmt::Write;
        match self {
            KExpr::Const(c) => {
                let _ = write!(s, "c{:08x}", c.to_bits());
            }
            KExpr::Input(i) => {
                let _ = write!(s, "{i:?}");
            }
            KExpr::Unary(op, a) => {
                let _ = write!(s, "{op:?}(");
                a.write_key(s);
                s.push(')');
            }
            KExpr::Binary(op, a, b) => {
                let _ = write!(s, "{op:?}(");
                a.write_key(s);
                s.push(',');
                b.write_key(s);
                s.push(')');
            }
            KExpr::Cmp(op, a, b) => {
                let _ = write!(s, "{op:?}(");
                a.write_key(s);
                s.push(',');
                b.write_key(s);
                s.push(')');
            }
            KExpr::Where(c, a, b) => {
                s.push_str("Where(");
                c.write_key(s);
                s.push(',');
                a.write_key(s);
                s.push(',');
                b.write_key(s);
                s.push(')');
            }
        }
    }

    /// Evaluates the expression for one element (the reference semantics), before NaN
    /// canonicalisation; see [`canonical_score`].
    pub fn eval(&self, x: &ElemInputs) -> f32 {
        match self {
            KExpr::Const(c) => *c,
            KExpr::Input(i) => match i {
                KInput::Weight => x.weight,
                KInput::Grad => x.grad,
                KInput::Init => x.init,
                KInput::ColStat(s) => x.col_stats[*s as usize],
                KInput::RowStat(s) => x.row_stats[*s as usize],
                KInput::Scalar(s) => x.scalars[*s as usize],
            },
            KExpr::Unary(op, a) => un_f32(*op, a.eval(x)),
            KExpr::Binary(op, a, b) => bin_f32(*op, a.eval(x), b.eval(x)),
            KExpr::Cmp(op, a, b) => {
                if cmp_f32(*op, a.eval(x), b.eval(x)) {
                    1.0
                } else {
                    0.0
                }
            }
            KExpr::Where(c, a, b) => {
                let c = c.eval(x);
                let (a, b) = (a.eval(x), b.eval(x));
                if !(c == 0.0 || c.is_nan()) {
                    a
                } else {
                    b
                }
            }
        }
    }
}

impl fmt::Display for KExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KExpr::Const(c) => write!(f, "{c:?}"),
            KExpr::Input(i) => match i {
                KInput::Weight => write!(f, "w"),
                KInput::Grad => write!(f, "grad(w)"),
                KInput::Init => write!(f, "init(w)"),
                KInput::ColStat(s) => write!(f, "col_stat{s}"),
                KInput::RowStat(s) => write!(f, "row_stat{s}"),
                KInput::Scalar(s) => write!(f, "scalar{s}"),
            },
            KExpr::Unary(op, a) => {
                let name = format!("{op:?}").to_lowercase();
                write!(f, "{name}({a})")
            }
            KExpr::Binary(op, a, b) => match op {
                BinOp::Add => write!(f, "({a} + {b})"),
                BinOp::Sub => write!(f, "({a} - {b})"),
                BinOp::Mul => write!(f, "({a} * {b})"),
                BinOp::Div => write!(f, "({a} / {b})"),
                BinOp::Min => write!(f, "min({a}, {b})"),
                BinOp::Max => write!(f, "max({a}, {b})"),
                BinOp::Pow => write!(f, "pow({a}, {b})"),
            },
            KExpr::Cmp(op, a, b) => {
                let s = match op {
                    CmpOp::Lt => "<",
                    CmpOp::Le => "<=",
                    CmpOp::Gt => ">",
                    CmpOp::Ge => ">=",
                    CmpOp::Eq => "==",
                    CmpOp::Ne => "!=",
                };
                write!(f, "({a} {s} {b})")
            }
            KExpr::Where(c, a, b) => write!(f, "where({c}, {a}, {b})"),
        }
    }
}

/// `ln`, called by both the interpreter and JIT code.
pub extern "C" fn prunec_logf(x: f32) -> f32 {
    x.ln()
}

/// `exp`, called by both the interpreter and JIT code.
pub extern "C" fn prunec_expf(x: f32) -> f32 {
    x.exp()
}

/// `pow`, called by both the interpreter and JIT code.
pub extern "C" fn prunec_powf(x: f32, y: f32) -> f32 {
    x.powf(y)
}

/// The reference semantics of a unary operation.
pub fn un_f32(op: UnOp, a: f32) -> f32 {
    match op {
        UnOp::Neg => -a,
        UnOp::Abs => a.abs(),
        UnOp::Sq => a * a,
        UnOp::Sqrt => a.sqrt(),
        UnOp::Log => prunec_logf(a),
        UnOp::Exp => prunec_expf(a),
        UnOp::Sign => {
            if a > 0.0 {
                1.0
            } else if a < 0.0 {
                -1.0
            } else if a.is_nan() {
                a
            } else {
                0.0
            }
        }
    }
}

/// The reference semantics of a binary operation.
pub fn bin_f32(op: BinOp, a: f32, b: f32) -> f32 {
    match op {
        BinOp::Add => a + b,
        BinOp::Sub => a - b,
        BinOp::Mul => a * b,
        BinOp::Div => a / b,
        BinOp::Min => {
            if a.is_nan() || b.is_nan() {
                f32::NAN
            } else if a < b {
                a
            } else if b < a {
                b
            } else {
                // Equal: only ±0 differ in bits; the negative zero is the minimum.
                f32::from_bits(a.to_bits() | b.to_bits())
            }
        }
        BinOp::Max => {
            if a.is_nan() || b.is_nan() {
                f32::NAN
            } else if a > b {
                a
            } else if b > a {
                b
            } else {
                f32::from_bits(a.to_bits() & b.to_bits())
            }
        }
        BinOp::Pow => prunec_powf(a, b),
    }
}

/// The reference semantics of a comparison.
pub fn cmp_f32(op: CmpOp, a: f32, b: f32) -> bool {
    match op {
        CmpOp::Lt => a < b,
        CmpOp::Le => a <= b,
        CmpOp::Gt => a > b,
        CmpOp::Ge => a >= b,
        CmpOp::Eq => a == b,
        CmpOp::Ne => a != b,
    }
}

/// The canonical quiet NaN every NaN score is reported as.
pub const CANONICAL_NAN: u32 = 0x7fc0_0000;

/// Maps every NaN to [`CANONICAL_NAN`]; other values are unchanged.
pub fn canonical_score(s: f32) -> f32 {
    if s.is_nan() {
        f32::from_bits(CANONICAL_NAN)
    } else {
        s
    }
}

/// The rank of a score as an unsigned key: larger key = higher score = kept first.
/// NaN maps to 0 (below `-inf`), and `-0.0` and `+0.0` share one key.
pub fn score_key(s: f32) -> u32 {
    if s.is_nan() {
        return 0;
    }
    let b = (s + 0.0).to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// The score a key stands for (`+0.0` for the zero key, NaN for key 0).
pub fn key_score(k: u32) -> f32 {
    if k == 0 {
        f32::from_bits(CANONICAL_NAN)
    } else if k & 0x8000_0000 != 0 {
        f32::from_bits(k & 0x7fff_ffff)
    } else {
        f32::from_bits(!k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_score_order() {
        let xs = [
            f32::NEG_INFINITY,
            -3.5,
            -1e-40,
            -0.0,
            0.0,
            1e-40,
            2.0,
            f32::INFINITY,
        ];
        for w in xs.windows(2) {
            assert!(score_key(w[0]) <= score_key(w[1]), "{w:?}");
        }
        assert_eq!(score_key(-0.0), score_key(0.0));
        assert_eq!(score_key(f32::NAN), 0);
        assert!(score_key(f32::NEG_INFINITY) > 0);
        for x in xs {
            assert_eq!(score_key(key_score(score_key(x))), score_key(x));
        }
    }

    #[test]
    fn sign_min_max_are_defined_at_zero_and_nan() {
        assert_eq!(un_f32(UnOp::Sign, -0.0).to_bits(), 0);
        assert!(un_f32(UnOp::Sign, f32::NAN).is_nan());
        assert_eq!(
            bin_f32(BinOp::Min, 0.0, -0.0).to_bits(),
            (-0.0f32).to_bits()
        );
        assert_eq!(bin_f32(BinOp::Max, -0.0, 0.0).to_bits(), 0);
        assert!(bin_f32(BinOp::Min, 1.0, f32::NAN).is_nan());
    }

    #[test]
    fn inputs_are_reported() {
        let e = KExpr::bin(BinOp::Mul, KExpr::wanda(1), KExpr::Input(KInput::Grad));
        assert!(e.needs_grad());
        assert!(!e.needs_init());
        assert_eq!(e.col_stats(), vec![1]);
        assert_eq!(e.to_string(), "((abs(w) * col_stat1) * grad(w))");
    }
}
