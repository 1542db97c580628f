//! A second code generator for the fused scans: x86-64 machine code with AVX-512, 16 lanes
//! per instruction where cranelift emits at most 4 (128-bit vectors on x86-64).
//!
//! The 4-lane fused scans are bound by the instructions they execute per weight and run
//! slower than a streaming pass, while the same loop 16 lanes wide runs at streaming speed
//! (`docs/benchmarks/kernels.md`). So on hosts with AVX-512F, the
//! three scan kernels of expressions in the subset below are also emitted here, directly as
//! machine code, with the same argument block ([`KArgs`]) and the same scores (by key) and
//! bits; they also do the work Rust did after cranelift's scans (see
//! [`super::raw::RawTensor::scan_into`]): the writing scans settle the mask and zero pruned
//! weights too, and all count the alive elements above the range and flag alive non-finite
//! weights. A fourth, the row scan of per-row selections, has no cranelift counterpart: it
//! packs the scores of the candidates (the alive elements inside the range) with
//! `vpcompressd` instead of storing every score (with a variant for rows whose elements are
//! all alive, which reads no mask). The property tests check the kernels
//! against the interpreter. Everything else (the score kernels, other expressions, hosts
//! without AVX-512) stays with cranelift.
//!
//! The subset: constants; the weight, gradient, initial weight, scalars, up to two column
//! statistics and one row statistic; `neg`, `abs`, `sq`, `sqrt`, `+`, `-`, `*`, `/`, `min`,
//! `max`, comparisons and `where`. Not `log`, `exp`, `pow` (calls into Rust) nor `sign`.
//! Expressions reading statistics run only on tensors whose rows are a multiple of 64 long,
//! so a 64-element word never crosses a row.
//!
//! The loop, per 64-element word (four groups of 16): prefetch, load the weights, evaluate
//! the score into vector registers, store it, compare it with the range's bounds into two
//! mask registers and load the alive bits; then either store, as `u16`, the alive elements
//! inside the range and those above it (reading) or store the new mask bits, the weights
//! with the other lanes cleared, and the kept elements inside the range (writing); count
//! per lane. The row scan stores no scores: it packs those of the elements inside the range
//! into a register, stores it 16 lanes wide at the candidates' end, and moves the end by
//! their count. The magnitude's writing scans store none either (the kept weights'
//! magnitudes are their scores, see [`WideScans::zero_stores_scores`]). Every scan prefetches
//! the weights ahead (see [`PREFETCH`]).

use std::mem::offset_of;

use super::abi::{KArgs, KernelFn};
use super::expr::{BinOp, CmpOp, KExpr, KInput, UnOp};

/// The three fused scans of one expression in AVX-512 machine code, and the row scan.
#[derive(Clone, Copy, Debug)]
pub struct WideScans {
    pub read: KernelFn,
    pub zero: KernelFn,
    pub zero_all: KernelFn,
    /// The read scan of one row for per-row selections: instead of every score, it writes
    /// the scores of the alive elements inside the range, packed in order (see
    /// [`KArgs::cand_scores`]), and the bits and the non-finite flag as `read` does, but
    /// not the count of elements above (the caller counts the `over` bits). Runs on
    /// `[start, end)` with `start` at a row's first column and `end` in the same row.
    pub collect: KernelFn,
    /// `collect` for a row whose elements are all alive: it reads no mask bits.
    pub collect_dense: KernelFn,
    /// Whether the expression reads row or column statistics.
    pub uses_pos: bool,
    /// Whether the writing scans (`zero`, `zero_all`) store the scores. The magnitude's do
    /// not: the scores a caller needs are those of the kept elements, whose weights the scan
    /// left as they were, so each is its weight's magnitude (bit for bit: the scan's
    /// absolute value also clears the sign bit), and storing a score per weight would cost
    /// the magnitude's global cut a noticeable share of its time.
    pub zero_stores_scores: bool,
}

impl WideScans {
    /// Whether the kernels can run on a tensor of `cols` columns.
    pub fn ok(&self, cols: usize) -> bool {
        !self.uses_pos || cols.is_multiple_of(64)
    }
}

/// Whether this host runs the AVX-512 scans: AVX-512F present and `PRUNEC_KERNEL_NARROW`
/// unset (which keeps every scan on cranelift's code, for comparisons).
pub fn available() -> bool {
    #[cfg(all(target_arch = "x86_64", unix))]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            // The row scan counts with `popcnt`, which every AVX-512 CPU has; checked anyway.
            std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("popcnt")
                && std::env::var_os("PRUNEC_KERNEL_NARROW").is_none()
        })
    }
    #[cfg(not(all(target_arch = "x86_64", unix)))]
    {
        false
    }
}

/// The AVX-512 scans of `expr`, or `None` when the host has no AVX-512 or the expression is
/// outside the subset (see the module's documentation).
pub fn compile(expr: &KExpr) -> Option<WideScans> {
    if !available() {
        return None;
    }
    let plan = Plan::of(expr)?;
    // The constants the kernels broadcast, for as long as their code lives.
    let pool: &'static [u32] = Box::leak(plan.consts.clone().into_boxed_slice());
    let mut fns = Vec::new();
    let mut code = Vec::new();
    for kind in [
        Kind::Read,
        Kind::Zero,
        Kind::ZeroAll,
        Kind::Collect,
        Kind::CollectDense,
    ] {
        while code.len() % 64 != 0 {
            code.push(0xcc);
        }
        fns.push(code.len());
        let mut a = Asm::default();
        emit(&mut a, &plan, pool, expr, kind)?;
        if std::env::var_os("PRUNEC_DUMP_JIT").is_some() {
            eprintln!("== AVX-512 {kind:?} of {expr}\n{}", hex(&a.code));
        }
        code.extend_from_slice(&a.code);
    }
    let base = install(&code)?;
    let get = |o: usize| {
        // SAFETY: `base + o` starts a function emitted above for `fn(*mut KArgs)` in the
        // System V calling convention, which `extern "C"` is on this target; the mapping is
        // executable and never unmapped.
        unsafe { std::mem::transmute::<*const u8, KernelFn>(base.add(o)) }
    };
    Some(WideScans {
        read: get(fns[0]),
        zero: get(fns[1]),
        zero_all: get(fns[2]),
        collect: get(fns[3]),
        collect_dense: get(fns[4]),
        uses_pos: plan.uses_pos,
        zero_stores_scores: !score_is_abs(expr),
    })
}

/// Whether the expression is the magnitude of the weight, `abs(w)`.
fn score_is_abs(expr: &KExpr) -> bool {
    matches!(expr, KExpr::Unary(UnOp::Abs, x) if **x == KExpr::weight())
}

fn hex(code: &[u8]) -> String {
    code.chunks(32)
        .map(|c| c.iter().map(|b| format!("{b:02x}")).collect::<String>())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Copies `code` into a fresh executable mapping that lives for the rest of the process.
#[cfg(all(target_arch = "x86_64", unix))]
fn install(code: &[u8]) -> Option<*const u8> {
    let len = code.len().next_multiple_of(4096);
    // SAFETY: a fresh private anonymous mapping of `len` bytes, written only here before it
    // becomes read+execute; nothing else aliases it.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return None;
        }
        std::ptr::copy_nonoverlapping(code.as_ptr(), p as *mut u8, code.len());
        if libc::mprotect(p, len, libc::PROT_READ | libc::PROT_EXEC) != 0 {
            libc::munmap(p, len);
            return None;
        }
        Some(p as *const u8)
    }
}

#[cfg(not(all(target_arch = "x86_64", unix)))]
fn install(_code: &[u8]) -> Option<*const u8> {
    None
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Read,
    Zero,
    ZeroAll,
    /// The row scan that collects the candidates (`WideScans::collect`).
    Collect,
    /// The same for a row whose elements are all alive (`WideScans::collect_dense`).
    CollectDense,
}

// General-purpose registers.
const RAX: u8 = 0;
const RCX: u8 = 1;
const RDX: u8 = 2;
const RBX: u8 = 3;
const RSP: u8 = 4;
const RBP: u8 = 5;
const RSI: u8 = 6;
const RDI: u8 = 7;
const R8: u8 = 8;
const R9: u8 = 9;
const R10: u8 = 10;
const R11: u8 = 11;
const R12: u8 = 12;
const R13: u8 = 13;
const R14: u8 = 14;
const R15: u8 = 15;
const SAVED: [u8; 6] = [RBX, RBP, R12, R13, R14, R15];

// Vector registers with fixed roles; the rest, from `Plan::temp`, hold the scan's scratch
// value and an expression's values.
const ZW: u8 = 0;
const ZLO: u8 = 1;
const ZGT: u8 = 2;
const ZROW: u8 = 3;
/// The per-lane count of alive elements above the range.
const ZCNT: u8 = 4;
/// Constants and scalars, broadcast once before the loop.
const ZCONST: u8 = 5;

/// How far ahead the loop prefetches the weights, in bytes, into L2 (`prefetcht1`):
/// prefetching into L1 evicts the column statistics, which are then read again, and
/// without prefetching a scan with a second input stream (Wanda's) falls well behind the
/// magnitude's; shorter distances were slower, longer ones no faster.
///
/// Every scan prefetches, the magnitude's writing scans too, though a lone stream read and
/// written in place is one the hardware prefetcher can follow on its own: how well it does
/// depends on the host. Where one core's bandwidth is bound by how many misses it keeps in
/// flight, the prefetch saves much more than it costs where the hardware prefetcher keeps
/// up, so it stays (measurements in `docs/benchmarks/kernels.md`).
const PREFETCH: i32 = 8192;

// `vcmpps` predicates (quiet: exceptions are masked anyway).
const GE_OQ: u8 = 0x1d;

/// Register assignments for one expression.
struct Plan {
    uses_pos: bool,
    grad: bool,
    init: bool,
    /// Column statistic slots, in r13 and r14.
    col_slots: Vec<u8>,
    /// The row statistic slot, in r15 and broadcast into `ZROW` per word.
    row_slot: Option<u8>,
    /// Scalar slots, each broadcast into a register from `ZCONST`.
    scalars: Vec<u8>,
    /// Constant bit patterns, broadcast into the registers after the scalars'.
    consts: Vec<u32>,
    /// The scan's scratch register; the expression's temporaries follow it (`Cx::temp`).
    temp: u8,
}

const ABS: u32 = 0x7fff_ffff;
const SIGN: u32 = 0x8000_0000;
/// The largest finite magnitude's bits: a weight whose magnitude bits are above is not
/// finite.
const FINITE: u32 = 0x7f7f_ffff;
const ONE: u32 = 0x3f80_0000;
const ZERO: u32 = 0;
const ALL: u32 = 0xffff_ffff;

impl Plan {
    fn of(expr: &KExpr) -> Option<Plan> {
        if !supported(expr) {
            return None;
        }
        let inputs = expr.inputs();
        let mut col_slots = Vec::new();
        let mut row_slot = None;
        let mut scalars = Vec::new();
        for i in &inputs {
            match *i {
                KInput::ColStat(s) if !col_slots.contains(&s) => col_slots.push(s),
                KInput::RowStat(s) => {
                    if row_slot.is_some_and(|r| r != s) {
                        return None;
                    }
                    row_slot = Some(s);
                }
                KInput::Scalar(s) if !scalars.contains(&s) => scalars.push(s),
                _ => {}
            }
        }
        if col_slots.len() > 2 {
            return None;
        }
        let mut consts = vec![ABS, SIGN, FINITE, ONE, ZERO, ALL];
        collect_consts(expr, &mut consts);
        let temp = ZCONST as usize + scalars.len() + consts.len();
        if temp + 4 > 32 {
            return None;
        }
        Some(Plan {
            uses_pos: !col_slots.is_empty() || row_slot.is_some(),
            grad: inputs.contains(&KInput::Grad),
            init: inputs.contains(&KInput::Init),
            col_slots,
            row_slot,
            scalars,
            consts,
            temp: temp as u8,
        })
    }

    fn scalar_reg(&self, s: u8) -> u8 {
        let i = self.scalars.iter().position(|&x| x == s).expect("planned");
        ZCONST + i as u8
    }

    fn const_reg(&self, bits: u32) -> u8 {
        let i = self
            .consts
            .iter()
            .position(|&x| x == bits)
            .expect("planned");
        ZCONST + (self.scalars.len() + i) as u8
    }
}

fn supported(e: &KExpr) -> bool {
    match e {
        KExpr::Const(_) | KExpr::Input(_) => true,
        KExpr::Unary(op, a) => {
            matches!(op, UnOp::Neg | UnOp::Abs | UnOp::Sq | UnOp::Sqrt) && supported(a)
        }
        KExpr::Binary(op, a, b) => *op != BinOp::Pow && supported(a) && supported(b),
        KExpr::Cmp(_, a, b) => supported(a) && supported(b),
        KExpr::Where(c, a, b) => supported(c) && supported(a) && supported(b),
    }
}

fn collect_consts(e: &KExpr, into: &mut Vec<u32>) {
    match e {
        KExpr::Const(c) => {
            if !into.contains(&c.to_bits()) {
                into.push(c.to_bits());
            }
        }
        KExpr::Input(_) => {}
        KExpr::Unary(_, a) => collect_consts(a, into),
        KExpr::Binary(_, a, b) | KExpr::Cmp(_, a, b) => {
            collect_consts(a, into);
            collect_consts(b, into);
        }
        KExpr::Where(c, a, b) => {
            collect_consts(c, into);
            collect_consts(a, into);
            collect_consts(b, into);
        }
    }
}

/// A memory operand `[base + index * 2^scale + disp]`.
#[derive(Clone, Copy)]
struct Mem {
    base: u8,
    index: Option<(u8, u8)>,
    disp: i32,
}

fn at(base: u8, disp: usize) -> Mem {
    Mem {
        base,
        index: None,
        disp: disp as i32,
    }
}

fn at_idx(base: u8, index: u8, scale: u8, disp: i32) -> Mem {
    Mem {
        base,
        index: Some((index, scale)),
        disp,
    }
}

/// A ModRM operand: a register or memory.
#[derive(Clone, Copy)]
enum Rm {
    Reg(u8),
    Mem(Mem),
}

/// A minimal x86-64 assembler: the few instructions the scans need.
#[derive(Default)]
struct Asm {
    code: Vec<u8>,
}

impl Asm {
    fn byte(&mut self, b: u8) {
        self.code.push(b);
    }

    /// ModRM (and SIB and a 32-bit displacement for memory: always that form, which every
    /// base register accepts).
    fn modrm(&mut self, reg: u8, rm: Rm) {
        match rm {
            Rm::Reg(r) => self.byte(0xc0 | (reg & 7) << 3 | (r & 7)),
            Rm::Mem(m) => {
                self.byte(0x80 | (reg & 7) << 3 | 4);
                let (idx, ss) = m.index.map_or((4, 0), |(i, s)| (i & 7, s));
                self.byte(ss << 6 | idx << 3 | (m.base & 7));
                self.code.extend_from_slice(&m.disp.to_le_bytes());
            }
        }
    }

    /// The high bits of an operand's index (or, for a register, bit 4) and base (bit 3).
    fn xb(rm: Rm) -> (u8, u8) {
        match rm {
            Rm::Reg(r) => ((r >> 4) & 1, (r >> 3) & 1),
            Rm::Mem(m) => (m.index.map_or(0, |(i, _)| (i >> 3) & 1), (m.base >> 3) & 1),
        }
    }

    /// A general-purpose instruction: optional REX (`w` for 64 bits), opcode bytes, ModRM.
    fn op(&mut self, w: bool, opcode: &[u8], reg: u8, rm: Rm) {
        let (x, b) = Self::xb(rm);
        let rex = (w as u8) << 3 | ((reg >> 3) & 1) << 2 | x << 1 | b;
        if rex != 0 {
            self.byte(0x40 | rex);
        }
        self.code.extend_from_slice(opcode);
        self.modrm(reg, rm);
    }

    /// An EVEX-encoded 512-bit instruction: `map` 1 = 0F, 2 = 0F38; `pp` 0 = none, 1 = 66;
    /// `k` the mask register, `z` zeroing.
    #[allow(clippy::too_many_arguments)]
    fn evex(&mut self, map: u8, pp: u8, opcode: u8, reg: u8, vvvv: u8, rm: Rm, k: u8, z: bool) {
        self.evex_l(0b10, map, pp, opcode, reg, vvvv, rm, k, z);
    }

    /// [`Self::evex`] with the vector length `ll` (`0b01`: 256 bits, `0b10`: 512).
    #[allow(clippy::too_many_arguments)]
    fn evex_l(
        &mut self,
        ll: u8,
        map: u8,
        pp: u8,
        op: u8,
        reg: u8,
        vvvv: u8,
        rm: Rm,
        k: u8,
        z: bool,
    ) {
        let (x, b) = Self::xb(rm);
        let r = (reg >> 3) & 1;
        let r2 = (reg >> 4) & 1;
        self.byte(0x62);
        self.byte((r ^ 1) << 7 | (x ^ 1) << 6 | (b ^ 1) << 5 | (r2 ^ 1) << 4 | map);
        self.byte((!vvvv & 0xf) << 3 | 4 | pp);
        self.byte((z as u8) << 7 | ll << 5 | (((vvvv >> 4) & 1) ^ 1) << 3 | k);
        self.byte(op);
        self.modrm(reg, rm);
    }

    /// A VEX-encoded instruction (three-byte form), map 0F, no prefix, W0: the mask
    /// register instructions.
    fn vex(&mut self, l: bool, opcode: u8, reg: u8, vvvv: u8, rm: Rm) {
        let (x, b) = Self::xb(rm);
        self.byte(0xc4);
        self.byte((((reg >> 3) & 1) ^ 1) << 7 | (x ^ 1) << 6 | (b ^ 1) << 5 | 1);
        self.byte((!vvvv & 0xf) << 3 | (l as u8) << 2);
        self.byte(opcode);
        self.modrm(reg, rm);
    }

    fn mov_load(&mut self, dst: u8, m: Mem) {
        self.op(true, &[0x8b], dst, Rm::Mem(m));
    }

    fn lea(&mut self, dst: u8, m: Mem) {
        self.op(true, &[0x8d], dst, Rm::Mem(m));
    }

    fn sub(&mut self, dst: u8, src: u8) {
        self.op(true, &[0x29], src, Rm::Reg(dst));
    }

    fn cmp(&mut self, a: u8, b: u8) {
        self.op(true, &[0x39], b, Rm::Reg(a));
    }

    /// `cmp r, imm8` (sign-extended).
    fn cmp_imm8(&mut self, r: u8, imm: i8) {
        self.op(true, &[0x83], 7, Rm::Reg(r));
        self.byte(imm as u8);
    }

    fn test(&mut self, a: u8) {
        self.op(true, &[0x85], a, Rm::Reg(a));
    }

    fn zero(&mut self, r: u8) {
        self.op(false, &[0x31], r, Rm::Reg(r));
    }

    fn add_imm(&mut self, r: u8, imm: i32) {
        self.op(true, &[0x81], 0, Rm::Reg(r));
        self.code.extend_from_slice(&imm.to_le_bytes());
    }

    fn inc(&mut self, r: u8) {
        self.op(true, &[0xff], 0, Rm::Reg(r));
    }

    fn mov_imm64(&mut self, r: u8, v: u64) {
        self.byte(0x48 | (r >> 3) & 1);
        self.byte(0xb8 | (r & 7));
        self.code.extend_from_slice(&v.to_le_bytes());
    }

    fn push(&mut self, r: u8) {
        if r >= 8 {
            self.byte(0x41);
        }
        self.byte(0x50 | (r & 7));
    }

    fn pop(&mut self, r: u8) {
        if r >= 8 {
            self.byte(0x41);
        }
        self.byte(0x58 | (r & 7));
    }

    /// A conditional jump (`cc` as in `0F 8x`) with a 32-bit displacement to be patched;
    /// returns where the displacement is.
    fn jcc(&mut self, cc: u8) -> usize {
        self.byte(0x0f);
        self.byte(0x80 | cc);
        self.code.extend_from_slice(&[0; 4]);
        self.code.len() - 4
    }

    /// Points the jump whose displacement is at `at` to `target`.
    fn patch(&mut self, at: usize, target: usize) {
        let d = target as i64 - (at as i64 + 4);
        self.code[at..at + 4].copy_from_slice(&(d as i32).to_le_bytes());
    }

    fn vload(&mut self, dst: u8, m: Mem) {
        self.evex(1, 0, 0x10, dst, 0, Rm::Mem(m), 0, false);
    }

    fn vstore(&mut self, m: Mem, src: u8) {
        self.evex(1, 0, 0x11, src, 0, Rm::Mem(m), 0, false);
    }

    /// Stores the low 256 bits (eight lanes) of `src`.
    fn vstore256(&mut self, m: Mem, src: u8) {
        self.evex_l(0b01, 1, 0, 0x11, src, 0, Rm::Mem(m), 0, false);
    }

    fn vbroadcast(&mut self, dst: u8, m: Mem) {
        self.evex(2, 1, 0x18, dst, 0, Rm::Mem(m), 0, false);
    }

    fn vmov(&mut self, dst: u8, src: u8) {
        self.evex(1, 0, 0x28, dst, 0, Rm::Reg(src), 0, false);
    }

    /// `dst = k ? src : 0` per lane.
    fn vmov_zeroing(&mut self, dst: u8, src: u8, k: u8) {
        self.evex(1, 0, 0x28, dst, 0, Rm::Reg(src), k, true);
    }

    /// A three-operand packed-single instruction of map 0F (`vaddps` 58, `vmulps` 59,
    /// `vsubps` 5C, `vminps` 5D, `vdivps` 5E, `vmaxps` 5F, `vsqrtps` 51 with `a` unused).
    fn vps(&mut self, opcode: u8, dst: u8, a: u8, b: u8) {
        self.evex(1, 0, opcode, dst, a, Rm::Reg(b), 0, false);
    }

    /// A three-operand dword instruction of map 66 0F (`vpandd` DB, `vpord` EB, `vpxord` EF).
    fn vpd(&mut self, opcode: u8, dst: u8, a: u8, b: u8) {
        self.evex(1, 1, opcode, dst, a, Rm::Reg(b), 0, false);
    }

    /// `k = cmp(a, b) & m` per lane with a `vcmpps` predicate (`m` 0: no mask).
    fn vcmp(&mut self, k: u8, a: u8, b: u8, pred: u8, m: u8) {
        self.evex(1, 0, 0xc2, k, a, Rm::Reg(b), m, false);
        self.byte(pred);
    }

    /// `k = (a > b) & m` as signed dwords (`m` 0: no mask).
    fn vpcmpgtd(&mut self, k: u8, a: u8, b: u8, m: u8) {
        self.evex(1, 1, 0x66, k, a, Rm::Reg(b), m, false);
    }

    /// `dst = k ? b : a` per lane.
    fn vblend(&mut self, dst: u8, k: u8, a: u8, b: u8) {
        self.evex(2, 1, 0x65, dst, a, Rm::Reg(b), k, false);
    }

    /// `dst = op(a, b)` merged into the lanes of `k` only (others keep `dst`).
    fn vps_masked(&mut self, opcode: u8, dst: u8, k: u8, a: u8, b: u8) {
        self.evex(1, 0, opcode, dst, a, Rm::Reg(b), k, false);
    }

    /// `dst = max(a, b)` as unsigned dwords, in the lanes of `k` only.
    fn vpmaxud_masked(&mut self, dst: u8, k: u8, a: u8, b: u8) {
        self.evex(2, 1, 0x3f, dst, a, Rm::Reg(b), k, false);
    }

    /// `dst = a - b` as dwords, in the lanes of `k` only.
    fn vpsubd_masked(&mut self, dst: u8, k: u8, a: u8, b: u8) {
        self.evex(1, 1, 0xfa, dst, a, Rm::Reg(b), k, false);
    }

    /// `prefetcht1`: into the second-level cache, not the first, where it would evict the
    /// column statistics the loop keeps reading.
    fn prefetch(&mut self, m: Mem) {
        self.op(false, &[0x0f, 0x18], 2, Rm::Mem(m));
    }

    fn kload(&mut self, k: u8, m: Mem) {
        self.vex(false, 0x90, k, 0, Rm::Mem(m));
    }

    /// `dst = !a & b`.
    fn kandn(&mut self, dst: u8, a: u8, b: u8) {
        self.vex(true, 0x42, dst, a, Rm::Reg(b));
    }

    fn kxor(&mut self, dst: u8, a: u8, b: u8) {
        self.vex(true, 0x47, dst, a, Rm::Reg(b));
    }

    fn kstore(&mut self, m: Mem, k: u8) {
        self.vex(false, 0x91, k, 0, Rm::Mem(m));
    }

    fn kor(&mut self, dst: u8, a: u8, b: u8) {
        self.vex(true, 0x45, dst, a, Rm::Reg(b));
    }

    /// `kmovw r32, k`.
    fn kmov_to_gp(&mut self, r: u8, k: u8) {
        self.vex(false, 0x93, r, 0, Rm::Reg(k));
    }

    /// `vpcompressd dst{k}{z}, src`: the lanes of `k`, packed into the low lanes of `dst`,
    /// the rest zero. (The register form: compressing into memory is much slower.)
    fn vcompress(&mut self, dst: u8, src: u8, k: u8) {
        self.evex(2, 1, 0x8b, src, 0, Rm::Reg(dst), k, true);
    }

    fn popcnt(&mut self, dst: u8, src: u8) {
        self.byte(0xf3);
        self.op(true, &[0x0f, 0xb8], dst, Rm::Reg(src));
    }

    fn add(&mut self, dst: u8, src: u8) {
        self.op(true, &[0x01], src, Rm::Reg(dst));
    }

    fn mov_store(&mut self, m: Mem, src: u8) {
        self.op(true, &[0x89], src, Rm::Mem(m));
    }
}

/// Emits one scan kernel `fn(*mut KArgs)` (`pool` holds `p.consts` and outlives the code);
/// `None` when the expression needs more registers than there are.
fn emit(a: &mut Asm, p: &Plan, pool: &'static [u32], expr: &KExpr, kind: Kind) -> Option<()> {
    for r in SAVED {
        a.push(r);
    }
    // The stack: the row length at [rsp] (the row scan puts the range's length there once
    // it has its row), the arguments at [rsp + 8] (for the counts written at the end). rdi: the arguments until the loop, where it becomes the bits' byte offset
    // (2 per 16 elements, which is also the mask words' byte offset).
    a.push(RDI);
    a.op(false, &[0xff], 6, Rm::Mem(at(RDI, offset_of!(KArgs, cols))));
    a.mov_load(RAX, at(RDI, offset_of!(KArgs, start)));
    a.mov_load(RCX, at(RDI, offset_of!(KArgs, end)));
    a.sub(RCX, RAX);
    // rsi, r8, r9: the weights, gradients and initial weights of element `start`.
    for (use_it, reg, field) in [
        (true, RSI, offset_of!(KArgs, w)),
        (p.grad, R8, offset_of!(KArgs, grad)),
        (p.init, R9, offset_of!(KArgs, init)),
    ] {
        if use_it {
            a.mov_load(reg, at(RDI, field));
            a.lea(reg, at_idx(reg, RAX, 2, 0));
        }
    }
    // r10: the mask words; r11, r12: the `ge` and `over` bits, where writing scans leave the
    // kept elements inside the range in `ge` (and do not write `over`).
    a.mov_load(R10, at(RDI, offset_of!(KArgs, mask)));
    a.mov_load(R11, at(RDI, offset_of!(KArgs, ge)));
    a.mov_load(R12, at(RDI, offset_of!(KArgs, over)));
    if p.uses_pos {
        // rbx: the column, rbp: the row.
        a.zero(RDX);
        a.op(true, &[0xf7], 6, Rm::Mem(at(RSP, 0))); // div qword [rsp]
        a.op(true, &[0x89], RAX, Rm::Reg(RBP));
        a.op(true, &[0x89], RDX, Rm::Reg(RBX));
        if !p.col_slots.is_empty() {
            a.mov_load(RAX, at(RDI, offset_of!(KArgs, col_stats)));
            for (&s, reg) in p.col_slots.iter().zip([R13, R14]) {
                a.mov_load(reg, at(RAX, 8 * s as usize));
            }
        }
        if let Some(s) = p.row_slot {
            a.mov_load(R15, at(RDI, offset_of!(KArgs, row_stats)));
            a.mov_load(R15, at(R15, 8 * s as usize));
        }
    }
    let collect = matches!(kind, Kind::Collect | Kind::CollectDense);
    // The mask register of the alive lanes (none: all are).
    let alive = if kind == Kind::CollectDense { 0 } else { 5 };
    if collect {
        // One row from its first column: the column is the element offset (rax), and the row
        // statistic is broadcast once. rbp: the candidates' scores; rbx: how many there are.
        if p.row_slot.is_some() {
            a.vbroadcast(ZROW, at_idx(R15, RBP, 2, 0));
        }
        a.mov_load(RBP, at(RDI, offset_of!(KArgs, cand_scores)));
        a.zero(RBX);
        // The length moves to the stack (the row length is not needed again): rcx counts
        // each group's candidates.
        a.mov_store(at(RSP, 0), RCX);
    } else {
        // rdx: the score output.
        a.mov_load(RDX, at(RDI, offset_of!(KArgs, out)));
    }
    a.vbroadcast(ZLO, at(RDI, offset_of!(KArgs, lo)));
    a.vbroadcast(ZGT, at(RDI, offset_of!(KArgs, gt)));
    if !p.scalars.is_empty() {
        a.mov_load(RAX, at(RDI, offset_of!(KArgs, scalars)));
        for &s in &p.scalars {
            a.vbroadcast(p.scalar_reg(s), at(RAX, 4 * s as usize));
        }
    }
    a.mov_imm64(RAX, pool.as_ptr() as u64);
    for (i, &c) in p.consts.iter().enumerate() {
        a.vbroadcast(p.const_reg(c), at(RAX, 4 * i));
    }
    // Counts: alive above the range per lane, alive non-finite weights.
    a.vpd(0xef, ZCNT, ZCNT, ZCNT);
    a.kxor(7, 7, 7);
    // rax: the element offset from `start`.
    a.zero(RAX);
    a.zero(RDI);
    a.test(RCX);
    let skip = a.jcc(0x4); // je
    let top = a.code.len();
    if p.row_slot.is_some() && !collect {
        a.vbroadcast(ZROW, at_idx(R15, RBP, 2, 0));
    }
    let cx = Cx {
        p,
        group: 0,
        col: if collect { RAX } else { RBX },
    };
    // The magnitude's score is what the finiteness check needs.
    let score_is_abs = score_is_abs(expr);
    // The scores go out but from the row scan (which packs the candidates' own) and the
    // magnitude's writing scans (see `WideScans::zero_stores_scores`).
    let store_scores = !collect && (kind == Kind::Read || !score_is_abs);
    for g in 0..4 {
        let cx = Cx { group: g, ..cx };
        let off = 64 * g;
        // One line per group, 8 KB ahead into L2 (see `PREFETCH`): the hardware prefetcher
        // alone left the loop waiting on memory.
        a.prefetch(at_idx(RSI, RAX, 2, off + PREFETCH));
        a.vload(ZW, at_idx(RSI, RAX, 2, off));
        let s = cx.eval(a, expr, 0)?;
        if store_scores {
            a.vstore(at_idx(RDX, RAX, 2, off), s);
        }
        // k5: alive; compared under it (the lanes outside it come out clear), k1: alive and
        // at or above the range's low end, k2: alive and above its high end. The dense row
        // scan runs on rows whose elements are all alive: it loads no mask bits and
        // compares every lane, one mask-register load per group fewer.
        let mask = at_idx(R10, RDI, 0, 2 * g);
        let ge = at_idx(R11, RDI, 0, 2 * g);
        if alive != 0 {
            a.kload(5, mask);
        }
        a.vcmp(1, s, ZLO, GE_OQ, alive);
        a.vcmp(2, s, ZGT, GE_OQ, alive);
        let t = p.temp;
        // k3: alive and not finite (`ZeroAll` allows them: not counted). The row scan needs
        // no lanes, only whether there are any: it keeps the largest magnitude of the alive
        // weights per lane (in `ZCNT`, which it does not count in) and compares once at the
        // end, one vector operation per group instead of a compare into a mask register and
        // an `or` of masks.
        if kind != Kind::ZeroAll {
            let mag = if score_is_abs {
                s
            } else {
                a.vpd(0xdb, t, ZW, p.const_reg(ABS));
                t
            };
            if collect {
                a.vpmaxud_masked(ZCNT, alive, ZCNT, mag);
            } else {
                a.vpcmpgtd(3, mag, p.const_reg(FINITE), 5);
                a.kor(7, 7, 3);
            }
        }
        match kind {
            Kind::Read | Kind::Collect | Kind::CollectDense => {
                // Inside the range: alive, at or above its low end and not above it.
                a.kandn(6, 2, 1);
                a.kstore(ge, 6);
                if collect {
                    // Their scores, packed, then the count moves past them. Stored eight
                    // lanes wide, and sixteen only when there are more than eight, which
                    // is rare (the buffer has room either way): CPUs that run 512-bit
                    // operations as two 256-bit halves then do half the work
                    // (`docs/benchmarks/kernels.md`).
                    a.vcompress(t, s, 6);
                    a.vstore256(at_idx(RBP, RBX, 2, 0), t);
                    a.kmov_to_gp(RCX, 6);
                    a.popcnt(RCX, RCX);
                    a.cmp_imm8(RCX, 8);
                    let few = a.jcc(0x6); // jbe
                    a.vstore(at_idx(RBP, RBX, 2, 0), t);
                    let here = a.code.len();
                    a.patch(few, here);
                    a.add(RBX, RCX);
                }
            }
            Kind::Zero | Kind::ZeroAll => {
                // k4: kept, i.e. alive and at or above the range, or (`Zero`) not finite.
                let kept = if kind == Kind::Zero {
                    a.kor(4, 1, 3);
                    4
                } else {
                    1
                };
                a.kstore(mask, kept);
                a.vmov_zeroing(t, ZW, kept);
                a.vstore(at_idx(RSI, RAX, 2, off), t);
                // Inside the range: kept and not above it.
                a.kandn(6, 2, kept);
                a.kstore(ge, 6);
            }
        }
        // Alive and above the range: stored by the read and row scans, counted per lane by
        // all but the row scan (whose caller counts the stored bits).
        if kind == Kind::Read || collect {
            a.kstore(at_idx(R12, RDI, 0, 2 * g), 2);
        }
        if !collect {
            a.vpsubd_masked(ZCNT, 2, ZCNT, p.const_reg(ALL));
        }
    }
    a.add_imm(RAX, 64);
    a.add_imm(RDI, 8);
    if p.uses_pos && !collect {
        a.add_imm(RBX, 64);
        a.op(true, &[0x3b], RBX, Rm::Mem(at(RSP, 0))); // cmp rbx, [rsp]
        let same_row = a.jcc(0x5); // jne
        a.zero(RBX);
        a.inc(RBP);
        let here = a.code.len();
        a.patch(same_row, here);
    }
    if collect {
        a.op(true, &[0x3b], RAX, Rm::Mem(at(RSP, 0))); // cmp rax, [rsp]
    } else {
        a.cmp(RAX, RCX);
    }
    let back = a.jcc(0x2); // jb
    a.patch(back, top);
    let exit = a.code.len();
    a.patch(skip, exit);
    a.pop(RDI);
    a.pop(RDI);
    if collect {
        a.vpcmpgtd(7, ZCNT, p.const_reg(FINITE), 0);
    } else {
        a.vstore(at(RDI, offset_of!(KArgs, above)), ZCNT);
    }
    a.kstore(at(RDI, offset_of!(KArgs, bad)), 7);
    if collect {
        a.mov_store(at(RDI, offset_of!(KArgs, cands)), RBX);
    }
    // vzeroupper: no penalty for SSE code after the kernel.
    a.code.extend_from_slice(&[0xc5, 0xf8, 0x77]);
    for r in SAVED.iter().rev() {
        a.pop(*r);
    }
    a.byte(0xc3);
    Some(())
}

/// Expression evaluation for one group of 16 lanes.
#[derive(Clone, Copy)]
struct Cx<'a> {
    p: &'a Plan,
    /// The group within the word (its byte offset is `64 * group`).
    group: i32,
    /// The register holding the column of the word's first element.
    col: u8,
}

impl Cx<'_> {
    /// The temporary register `n`, if there is one.
    fn temp(&self, n: u8) -> Option<u8> {
        let r = self.p.temp + 1 + n;
        (r < 32).then_some(r)
    }

    /// Evaluates `e` into a register (fixed or temporary `free` and above); returns it.
    fn eval(&self, a: &mut Asm, e: &KExpr, free: u8) -> Option<u8> {
        let off = 64 * self.group;
        let d = self.temp(free)?;
        // The next free temporary after a value in `r`.
        let after = |r: u8| if r == d { free + 1 } else { free };
        Some(match e {
            KExpr::Const(c) => self.p.const_reg(c.to_bits()),
            KExpr::Input(inp) => match *inp {
                KInput::Weight => ZW,
                KInput::Grad => {
                    a.vload(d, at_idx(R8, RAX, 2, off));
                    d
                }
                KInput::Init => {
                    a.vload(d, at_idx(R9, RAX, 2, off));
                    d
                }
                KInput::ColStat(s) => {
                    let i = self.p.col_slots.iter().position(|&x| x == s)?;
                    a.vload(d, at_idx([R13, R14][i], self.col, 2, off));
                    d
                }
                KInput::RowStat(_) => ZROW,
                KInput::Scalar(s) => self.p.scalar_reg(s),
            },
            KExpr::Unary(op, x) => {
                let x = self.eval(a, x, free)?;
                match op {
                    UnOp::Neg => a.vpd(0xef, d, x, self.p.const_reg(SIGN)),
                    UnOp::Abs => a.vpd(0xdb, d, x, self.p.const_reg(ABS)),
                    UnOp::Sq => a.vps(0x59, d, x, x),
                    UnOp::Sqrt => a.vps(0x51, d, 0, x),
                    UnOp::Log | UnOp::Exp | UnOp::Sign => return None,
                }
                d
            }
            KExpr::Binary(op, x, y) => {
                let x = self.eval(a, x, free)?;
                let y = self.eval(a, y, after(x))?;
                match op {
                    BinOp::Add => a.vps(0x58, d, x, y),
                    BinOp::Sub => a.vps(0x5c, d, x, y),
                    BinOp::Mul => a.vps(0x59, d, x, y),
                    BinOp::Div => a.vps(0x5e, d, x, y),
                    BinOp::Min | BinOp::Max => self.min_max(a, *op == BinOp::Min, d, x, y, free)?,
                    BinOp::Pow => return None,
                }
                d
            }
            KExpr::Cmp(op, x, y) => {
                let x = self.eval(a, x, free)?;
                let y = self.eval(a, y, after(x))?;
                let pred = match op {
                    CmpOp::Lt => 0x11,
                    CmpOp::Le => 0x12,
                    CmpOp::Gt => 0x1e,
                    CmpOp::Ge => GE_OQ,
                    CmpOp::Eq => 0x00,
                    // NEQ_UQ: true when either side is NaN.
                    CmpOp::Ne => 0x04,
                };
                a.vcmp(4, x, y, pred, 0);
                a.vmov_zeroing(d, self.p.const_reg(ONE), 4);
                d
            }
            KExpr::Where(c, x, y) => {
                let c = self.eval(a, c, free)?;
                let f1 = after(c);
                let x = self.eval(a, x, f1)?;
                let f2 = if Some(x) == self.temp(f1) { f1 + 1 } else { f1 };
                let y = self.eval(a, y, f2)?;
                // NEQ_OQ: `c` neither ±0 nor NaN.
                a.vcmp(4, c, self.p.const_reg(ZERO), 0x0c, 0);
                a.vblend(d, 4, y, x);
                d
            }
        })
    }

    /// `min` / `max` with the interpreter's semantics: NaN when either side is NaN, and
    /// `-0 < +0`. `vminps` / `vmaxps` return their second operand when either is NaN or both
    /// are zeros, so both orders are combined: for zeros, `or` of the two mins gives `-0` if
    /// either is `-0`, `and` of the two maxes `+0` if either is `+0`; then lanes where
    /// either side is NaN take `x + y`, which is NaN.
    fn min_max(&self, a: &mut Asm, min: bool, d: u8, x: u8, y: u8, free: u8) -> Option<()> {
        // `d` may be `x` or `y`, which the last step still reads: work in two temporaries.
        let (t, u) = (self.temp(free + 2)?, self.temp(free + 3)?);
        let op = if min { 0x5d } else { 0x5f };
        a.vps(op, t, y, x);
        a.vps(op, u, x, y);
        a.vpd(if min { 0xeb } else { 0xdb }, t, t, u);
        a.vcmp(5, x, y, 0x03, 0); // UNORD_Q
        a.vps_masked(0x58, t, 5, x, y);
        a.vmov(d, t);
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether this host should have the AVX-512 scans.
    fn expected() -> bool {
        #[cfg(all(target_arch = "x86_64", unix))]
        {
            std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("popcnt")
                && std::env::var_os("PRUNEC_KERNEL_NARROW").is_none()
        }
        #[cfg(not(all(target_arch = "x86_64", unix)))]
        {
            false
        }
    }

    #[test]
    fn subset_compiles_where_the_host_allows() {
        let wanda = KExpr::wanda(0);
        let log = KExpr::un(UnOp::Log, KExpr::magnitude());
        for (e, fits) in [(KExpr::magnitude(), true), (wanda, true), (log, false)] {
            let w = compile(&e);
            assert_eq!(w.is_some(), fits && expected(), "{e}");
        }
        if let Some(w) = compile(&KExpr::wanda(0)) {
            assert!(w.uses_pos && w.ok(128) && !w.ok(96));
        }
        if let Some(w) = compile(&KExpr::magnitude()) {
            assert!(!w.uses_pos && w.ok(3));
        }
    }

    #[test]
    fn encodings_match_the_manual() {
        // Checked against the Intel SDM's encodings (and objdump).
        let mut a = Asm::default();
        a.vload(ZW, at_idx(RSI, RAX, 2, 64));
        assert_eq!(
            a.code,
            [0x62, 0xf1, 0x7c, 0x48, 0x10, 0x84, 0x86, 0x40, 0, 0, 0]
        );
        let mut a = Asm::default();
        a.vcmp(1, 17, ZLO, GE_OQ, 0);
        // vcmpps k1, zmm17, zmm1, 0x1d
        assert_eq!(a.code, [0x62, 0xf1, 0x74, 0x40, 0xc2, 0xc9, 0x1d]);
        let mut a = Asm::default();
        a.kstore(at_idx(R10, RDI, 0, 2), 1);
        // kmovw [r10 + rdi + 2], k1
        assert_eq!(a.code, [0xc4, 0xc1, 0x78, 0x91, 0x8c, 0x3a, 2, 0, 0, 0]);
        let mut a = Asm::default();
        a.mov_load(R13, at(RAX, 8));
        // mov r13, [rax + 8]
        assert_eq!(a.code, [0x4c, 0x8b, 0xac, 0x20, 8, 0, 0, 0]);
        let mut a = Asm::default();
        a.vcmp(1, 12, ZLO, GE_OQ, 5);
        // vcmpps k1{k5}, zmm12, zmm1, 0x1d
        assert_eq!(a.code, [0x62, 0xf1, 0x1c, 0x4d, 0xc2, 0xc9, 0x1d]);
        let mut a = Asm::default();
        a.vcompress(11, 12, 6);
        // vpcompressd zmm11{k6}{z}, zmm12
        assert_eq!(a.code, [0x62, 0x52, 0x7d, 0xce, 0x8b, 0xe3]);
        let mut a = Asm::default();
        a.vstore256(at_idx(RBP, RBX, 2, 0x1234_5678), 17);
        // vmovups ymmword ptr [rbp + rbx*4 + 0x12345678], ymm17
        assert_eq!(
            a.code,
            [0x62, 0xe1, 0x7c, 0x28, 0x11, 0x8c, 0x9d, 0x78, 0x56, 0x34, 0x12]
        );
        let mut a = Asm::default();
        a.vpmaxud_masked(4, 5, 4, 12);
        a.cmp_imm8(RCX, 8);
        // vpmaxud zmm4{k5}, zmm4, zmm12; cmp rcx, 8
        assert_eq!(
            a.code,
            [0x62, 0xd2, 0x5d, 0x4d, 0x3f, 0xe4, 0x48, 0x83, 0xf9, 0x08]
        );
        let mut a = Asm::default();
        a.kmov_to_gp(RCX, 6);
        a.popcnt(RCX, RCX);
        a.add(RBX, RCX);
        // kmovw ecx, k6; popcnt rcx, rcx; add rbx, rcx
        assert_eq!(
            a.code,
            [0xc4, 0xe1, 0x78, 0x93, 0xce, 0xf3, 0x48, 0x0f, 0xb8, 0xc9, 0x48, 0x01, 0xcb]
        );
    }
}
