//! Translation of a kernel expression into cranelift IR, per element (f32) and per f32x4 group.

use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::types::{F32, F32X4, I32X4, I64};
use cranelift_codegen::ir::{Endianness, FuncRef, InstBuilder, MemFlagsData, Value};
use cranelift_frontend::{FunctionBuilder, Variable};

use super::expr::{BinOp, CmpOp, KExpr, KInput, UnOp};

pub(super) fn off(o: usize) -> i32 {
    o as i32
}

pub(super) fn mf() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

pub(super) fn vmf() -> MemFlagsData {
    MemFlagsData::new().with_endianness(Endianness::Little)
}

pub(super) struct Gen<'a, 'b> {
    pub(super) b: &'a mut FunctionBuilder<'b>,
    pub(super) calls: [FuncRef; 3],
    pub(super) w: Value,
    pub(super) grad: Value,
    pub(super) init: Value,
    pub(super) col_ptrs: Vec<Option<Value>>,
    pub(super) row_ptrs: Vec<Option<Value>>,
    pub(super) scalars: Vec<Option<Value>>,
    pub(super) i: Variable,
    pub(super) col: Variable,
    pub(super) row: Variable,
    pub(super) uses_pos: bool,
    /// f32x4 constants made once in the entry block (loops reuse the register).
    pub(super) abs_mask: Value,
    pub(super) sign_mask: Value,
    /// Byte offset added to the f32x4 loads of element and column inputs: in the unrolled
    /// loop that does not wrap rows, the groups of one iteration share the position values
    /// and differ by this immediate (an address mode, not an instruction).
    pub(super) off: i32,
    /// The weights of the current group when a scan kernel has loaded them already (for
    /// position `i` at offset `off`): the score reuses them instead of loading again.
    pub(super) w_loaded: Option<(Value, i32, Value)>,
}

impl Gen<'_, '_> {
    pub(super) fn ic(&mut self, ty: cranelift_codegen::ir::Type, v: i64) -> Value {
        self.b.ins().iconst(ty, v)
    }

    pub(super) fn vf(&mut self, x: f32) -> Value {
        let s = self.b.ins().f32const(x);
        self.b.ins().splat(F32X4, s)
    }

    /// `base + idx * 4`.
    pub(super) fn addr4(&mut self, base: Value, idx: Value) -> Value {
        let two = self.ic(I64, 2);
        let o = self.b.ins().ishl(idx, two);
        self.b.ins().iadd(base, o)
    }

    pub(super) fn as_i(&mut self, v: Value) -> Value {
        self.cast(I32X4, v)
    }

    pub(super) fn as_f(&mut self, v: Value) -> Value {
        self.cast(F32X4, v)
    }

    /// `v` as `ty`, looking through a bitcast (so equal values stay equal to cranelift).
    fn cast(&mut self, ty: cranelift_codegen::ir::Type, v: Value) -> Value {
        let dfg = &self.b.func.dfg;
        if dfg.value_type(v) == ty {
            return v;
        }
        if let cranelift_codegen::ir::ValueDef::Result(inst, _) = dfg.value_def(v) {
            if let cranelift_codegen::ir::InstructionData::LoadNoOffset {
                opcode: cranelift_codegen::ir::Opcode::Bitcast,
                arg,
                ..
            } = dfg.insts[inst]
            {
                if dfg.value_type(arg) == ty {
                    return arg;
                }
            }
        }
        self.b.ins().bitcast(ty, vmf(), v)
    }

    /// Lane-wise `mask ? a : b` on f32x4 values with an i32x4 mask.
    pub(super) fn vsel(&mut self, mask: Value, a: Value, b: Value) -> Value {
        let (ai, bi) = (self.as_i(a), self.as_i(b));
        let r = self.b.ins().bitselect(mask, ai, bi);
        self.as_f(r)
    }

    pub(super) fn input_ptr(&mut self, inp: KInput) -> (Value, bool) {
        match inp {
            KInput::Weight => (self.w, false),
            KInput::Grad => (self.grad, false),
            KInput::Init => (self.init, false),
            KInput::ColStat(s) => (self.col_ptrs[s as usize].expect("declared"), true),
            KInput::RowStat(s) => (self.row_ptrs[s as usize].expect("declared"), true),
            KInput::Scalar(_) => unreachable!("scalars are values"),
        }
    }

    /// The scalar score of element `i` (column `col`, row `row`).
    pub(super) fn s_eval(&mut self, e: &KExpr, i: Value, col: Value, row: Value) -> Value {
        match e {
            KExpr::Const(c) => self.b.ins().f32const(*c),
            KExpr::Input(KInput::Scalar(s)) => self.scalars[*s as usize].expect("declared"),
            KExpr::Input(inp) => {
                let (base, _) = self.input_ptr(*inp);
                let idx = match inp {
                    KInput::ColStat(_) => col,
                    KInput::RowStat(_) => row,
                    _ => i,
                };
                let a = self.addr4(base, idx);
                self.b.ins().load(F32, mf(), a, 0)
            }
            KExpr::Unary(op, a) => {
                let x = self.s_eval(a, i, col, row);
                self.s_un(*op, x)
            }
            KExpr::Binary(op, a, b) => {
                let x = self.s_eval(a, i, col, row);
                let y = self.s_eval(b, i, col, row);
                self.s_bin(*op, x, y)
            }
            KExpr::Cmp(op, a, b) => {
                let x = self.s_eval(a, i, col, row);
                let y = self.s_eval(b, i, col, row);
                let c = self.b.ins().fcmp(float_cc(*op), x, y);
                let one = self.b.ins().f32const(1.0);
                let zero = self.b.ins().f32const(0.0);
                self.b.ins().select(c, one, zero)
            }
            KExpr::Where(c, a, b) => {
                let cv = self.s_eval(c, i, col, row);
                let x = self.s_eval(a, i, col, row);
                let y = self.s_eval(b, i, col, row);
                let zero = self.b.ins().f32const(0.0);
                let t = self.b.ins().fcmp(FloatCC::OrderedNotEqual, cv, zero);
                self.b.ins().select(t, x, y)
            }
        }
    }

    pub(super) fn s_un(&mut self, op: UnOp, x: Value) -> Value {
        match op {
            UnOp::Neg => self.b.ins().fneg(x),
            UnOp::Abs => self.b.ins().fabs(x),
            UnOp::Sq => self.b.ins().fmul(x, x),
            UnOp::Sqrt => self.b.ins().sqrt(x),
            UnOp::Log => self.call1(0, x),
            UnOp::Exp => self.call1(1, x),
            UnOp::Sign => {
                let zero = self.b.ins().f32const(0.0);
                let one = self.b.ins().f32const(1.0);
                let mone = self.b.ins().f32const(-1.0);
                let pos = self.b.ins().fcmp(FloatCC::GreaterThan, x, zero);
                let neg = self.b.ins().fcmp(FloatCC::LessThan, x, zero);
                let nan = self.b.ins().fcmp(FloatCC::Unordered, x, x);
                let z = self.b.ins().select(nan, x, zero);
                let n = self.b.ins().select(neg, mone, z);
                self.b.ins().select(pos, one, n)
            }
        }
    }

    pub(super) fn s_bin(&mut self, op: BinOp, x: Value, y: Value) -> Value {
        match op {
            BinOp::Add => self.b.ins().fadd(x, y),
            BinOp::Sub => self.b.ins().fsub(x, y),
            BinOp::Mul => self.b.ins().fmul(x, y),
            BinOp::Div => self.b.ins().fdiv(x, y),
            BinOp::Min => self.b.ins().fmin(x, y),
            BinOp::Max => self.b.ins().fmax(x, y),
            BinOp::Pow => {
                let c = self.b.ins().call(self.calls[2], &[x, y]);
                self.b.inst_results(c)[0]
            }
        }
    }

    pub(super) fn call1(&mut self, which: usize, x: Value) -> Value {
        let c = self.b.ins().call(self.calls[which], &[x]);
        self.b.inst_results(c)[0]
    }

    /// The f32x4 scores of elements `i..i + 4` (same row).
    pub(super) fn v_eval(&mut self, e: &KExpr, i: Value, col: Value, row: Value) -> Value {
        match e {
            KExpr::Const(c) => self.vf(*c),
            KExpr::Input(KInput::Scalar(s)) => {
                let v = self.scalars[*s as usize].expect("declared");
                self.b.ins().splat(F32X4, v)
            }
            KExpr::Input(KInput::RowStat(_)) => {
                let s = self.s_eval(e, i, col, row);
                self.b.ins().splat(F32X4, s)
            }
            KExpr::Input(KInput::Weight)
                if self
                    .w_loaded
                    .is_some_and(|(at, o, _)| at == i && o == self.off) =>
            {
                let v = self.w_loaded.expect("checked").2;
                self.as_f(v)
            }
            KExpr::Input(inp) => {
                let (base, _) = self.input_ptr(*inp);
                let idx = if matches!(inp, KInput::ColStat(_)) {
                    col
                } else {
                    i
                };
                let a = self.addr4(base, idx);
                self.b.ins().load(F32X4, mf(), a, self.off)
            }
            KExpr::Unary(op, a) => {
                let x = self.v_eval(a, i, col, row);
                match op {
                    // Bitwise, like fneg / fabs, with the masks hoisted out of the loops.
                    UnOp::Neg => {
                        let xi = self.as_i(x);
                        let r = self.b.ins().bxor(xi, self.sign_mask);
                        self.as_f(r)
                    }
                    UnOp::Abs => {
                        let xi = self.as_i(x);
                        let r = self.b.ins().band(xi, self.abs_mask);
                        self.as_f(r)
                    }
                    UnOp::Sq => self.b.ins().fmul(x, x),
                    UnOp::Sqrt => self.b.ins().sqrt(x),
                    UnOp::Log => self.per_lane1(0, x),
                    UnOp::Exp => self.per_lane1(1, x),
                    UnOp::Sign => {
                        let zero = self.vf(0.0);
                        let one = self.vf(1.0);
                        let mone = self.vf(-1.0);
                        let pos = self.b.ins().fcmp(FloatCC::GreaterThan, x, zero);
                        let neg = self.b.ins().fcmp(FloatCC::LessThan, x, zero);
                        let nan = self.b.ins().fcmp(FloatCC::Unordered, x, x);
                        let z = self.vsel(nan, x, zero);
                        let n = self.vsel(neg, mone, z);
                        self.vsel(pos, one, n)
                    }
                }
            }
            KExpr::Binary(op, a, b) => {
                let x = self.v_eval(a, i, col, row);
                let y = self.v_eval(b, i, col, row);
                match op {
                    BinOp::Add => self.b.ins().fadd(x, y),
                    BinOp::Sub => self.b.ins().fsub(x, y),
                    BinOp::Mul => self.b.ins().fmul(x, y),
                    BinOp::Div => self.b.ins().fdiv(x, y),
                    BinOp::Min => self.b.ins().fmin(x, y),
                    BinOp::Max => self.b.ins().fmax(x, y),
                    BinOp::Pow => {
                        let mut r = x;
                        for l in 0..4u8 {
                            let xl = self.b.ins().extractlane(x, l);
                            let yl = self.b.ins().extractlane(y, l);
                            let c = self.b.ins().call(self.calls[2], &[xl, yl]);
                            let v = self.b.inst_results(c)[0];
                            r = self.b.ins().insertlane(r, v, l);
                        }
                        r
                    }
                }
            }
            KExpr::Cmp(op, a, b) => {
                let x = self.v_eval(a, i, col, row);
                let y = self.v_eval(b, i, col, row);
                let c = self.b.ins().fcmp(float_cc(*op), x, y);
                let one = self.vf(1.0);
                let zero = self.vf(0.0);
                self.vsel(c, one, zero)
            }
            KExpr::Where(c, a, b) => {
                let cv = self.v_eval(c, i, col, row);
                let x = self.v_eval(a, i, col, row);
                let y = self.v_eval(b, i, col, row);
                let zero = self.vf(0.0);
                // x64 has no vector `one`: ordered-not-equal = not-equal and ordered.
                let ne = self.b.ins().fcmp(FloatCC::NotEqual, cv, zero);
                let ord = self.b.ins().fcmp(FloatCC::Ordered, cv, cv);
                let t = self.b.ins().band(ne, ord);
                self.vsel(t, x, y)
            }
        }
    }

    pub(super) fn per_lane1(&mut self, which: usize, x: Value) -> Value {
        let mut r = x;
        for l in 0..4u8 {
            let xl = self.b.ins().extractlane(x, l);
            let v = self.call1(which, xl);
            r = self.b.ins().insertlane(r, v, l);
        }
        r
    }

    pub(super) fn positions(&mut self) -> (Value, Value, Value) {
        let i = self.b.use_var(self.i);
        if self.uses_pos {
            (i, self.b.use_var(self.col), self.b.use_var(self.row))
        } else {
            (i, i, i)
        }
    }
}

fn float_cc(op: CmpOp) -> FloatCC {
    match op {
        CmpOp::Lt => FloatCC::LessThan,
        CmpOp::Le => FloatCC::LessThanOrEqual,
        CmpOp::Gt => FloatCC::GreaterThan,
        CmpOp::Ge => FloatCC::GreaterThanOrEqual,
        CmpOp::Eq => FloatCC::Equal,
        CmpOp::Ne => FloatCC::NotEqual,
    }
}
