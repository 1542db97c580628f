//! Cranelift code generation: one criterion expression becomes three native loops over a chunk
//! (score, scan = count + histogram + candidates, apply = mask + zero), f32x4 where possible.
//!
//! Every loop walks a chunk `[start, end)` of one tensor, `start % 64 == 0`, in 64-element
//! mask words of 16 groups of 4 lanes. A group takes the vector path unless one of its lanes
//! needs per-element work (an in-range key in `scan`, a tie with quota left in `apply`); then
//! the group runs the scalar element code four times. Elements after the last full word, and
//! whole chunks whose rows are not a multiple of 4 long while the expression reads row or
//! column statistics, use the scalar element code.

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, I32, I32X4, I64, I8};
use cranelift_codegen::ir::{AbiParam, FuncRef, InstBuilder, Value};
use cranelift_codegen::settings::Configurable;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, Linkage, Module};
use std::mem::offset_of;

use super::expr::{prunec_expf, prunec_logf, prunec_powf, KExpr, KInput, CANONICAL_NAN};
use super::translate::{mf, off, Gen};

/// The argument block every kernel receives (one pointer); outputs are written back into it.
#[repr(C)]
#[derive(Debug)]
pub struct KArgs {
    pub w: *mut f32,
    pub grad: *const f32,
    pub init: *const f32,
    /// Pointers to the column statistics, indexed by slot.
    pub col_stats: *const *const f32,
    /// Pointers to the row statistics, indexed by slot.
    pub row_stats: *const *const f32,
    pub scalars: *const f32,
    pub mask: *mut u64,
    /// Score output: `out[i - start]`.
    pub out: *mut f32,
    /// Histogram of in-range keys: bucket `(key - lo) >> shift`.
    pub hist: *mut u32,
    /// Candidates: `(key << 32) | (i - start)` for the first `cap` in-range elements.
    pub cands: *mut u64,
    pub cols: u64,
    pub start: u64,
    pub end: u64,
    pub cap: u64,
    /// Scan range as unsigned keys, inclusive.
    pub lo: u32,
    pub hi: u32,
    pub shift: u32,
    /// Apply: keep keys above `t`, and the first `quota` alive keys equal to `t`.
    pub t: u32,
    pub quota: u64,
    /// Out (scan): alive elements with key > hi.
    pub above: u64,
    /// Out (scan): alive elements with lo <= key <= hi.
    pub in_range: u64,
    /// Out (scan): alive elements whose weight is NaN or infinite.
    pub nonfinite: u64,
    /// [`ALIVE_LANES`]: the i32x4 lane masks of each 4-bit mask nibble.
    pub lut: *const [i32; 4],
}

/// Lane masks (`-1` = alive) for each value of a 4-bit nibble of the mask.
pub static ALIVE_LANES: [[i32; 4]; 16] = {
    let mut t = [[0i32; 4]; 16];
    let mut n = 0;
    while n < 16 {
        let mut l = 0;
        while l < 4 {
            t[n][l] = if (n >> l) & 1 == 1 { -1 } else { 0 };
            l += 1;
        }
        n += 1;
    }
    t
};

impl KArgs {
    /// An argument block with every pointer null and every count zero.
    pub fn empty() -> Self {
        KArgs {
            w: std::ptr::null_mut(),
            grad: std::ptr::null(),
            init: std::ptr::null(),
            col_stats: std::ptr::null(),
            row_stats: std::ptr::null(),
            scalars: std::ptr::null(),
            mask: std::ptr::null_mut(),
            out: std::ptr::null_mut(),
            hist: std::ptr::null_mut(),
            cands: std::ptr::null_mut(),
            cols: 0,
            start: 0,
            end: 0,
            cap: 0,
            lo: 0,
            hi: 0,
            shift: 0,
            t: 0,
            quota: 0,
            above: 0,
            in_range: 0,
            nonfinite: 0,
            lut: ALIVE_LANES.as_ptr(),
        }
    }
}

/// A native kernel: `fn(&mut KArgs)`.
pub type KernelFn = unsafe extern "C" fn(*mut KArgs);

/// The three compiled loops for one expression.
#[derive(Clone, Copy, Debug)]
pub struct CompiledKernel {
    pub score: KernelFn,
    /// `score` without canonicalising NaN scores (any NaN bits may be written): for
    /// internal score buffers that are only compared, never reported.
    pub score_raw: KernelFn,
    pub scan: KernelFn,
    pub apply: KernelFn,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Score,
    ScoreRaw,
    Scan,
    Apply,
}

/// Compiles the three kernels of `expr` into a fresh JIT module.
pub fn compile(expr: &KExpr) -> Result<CompiledKernel, String> {
    let mut flags = cranelift_codegen::settings::builder();
    flags.set("opt_level", "speed").map_err(|e| e.to_string())?;
    flags
        .set("use_colocated_libcalls", "false")
        .map_err(|e| e.to_string())?;
    flags.set("is_pic", "false").map_err(|e| e.to_string())?;
    let isa = cranelift_native::builder()
        .map_err(|e| e.to_string())?
        .finish(cranelift_codegen::settings::Flags::new(flags))
        .map_err(|e| e.to_string())?;
    let mut jb = JITBuilder::with_isa(isa, default_libcall_names());
    jb.symbol("prunec_logf", prunec_logf as *const u8);
    jb.symbol("prunec_expf", prunec_expf as *const u8);
    jb.symbol("prunec_powf", prunec_powf as *const u8);
    let mut module = JITModule::new(jb);
    let ptr = module.target_config().pointer_type();
    let mut un_sig = module.make_signature();
    un_sig.params.push(AbiParam::new(F32));
    un_sig.returns.push(AbiParam::new(F32));
    let mut bin_sig = un_sig.clone();
    bin_sig.params.push(AbiParam::new(F32));
    let ids = [
        module.declare_function("prunec_logf", Linkage::Import, &un_sig),
        module.declare_function("prunec_expf", Linkage::Import, &un_sig),
        module.declare_function("prunec_powf", Linkage::Import, &bin_sig),
    ];
    let ids: Vec<_> = ids
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let mut sig = module.make_signature();
    sig.params.push(AbiParam::new(ptr));
    let tcfg = module.target_config();
    let mut ctx = module.make_context();
    let mut fctx = FunctionBuilderContext::new();
    let mut fids = Vec::new();
    for (n, kind) in [Kind::Score, Kind::Scan, Kind::Apply, Kind::ScoreRaw]
        .into_iter()
        .enumerate()
    {
        let fid = module
            .declare_function(&format!("kernel{n}"), Linkage::Local, &sig)
            .map_err(|e| e.to_string())?;
        ctx.func.signature = sig.clone();
        {
            let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
            let calls = [
                module.declare_func_in_func(ids[0], b.func),
                module.declare_func_in_func(ids[1], b.func),
                module.declare_func_in_func(ids[2], b.func),
            ];
            build(kind, expr, &mut b, calls);
            b.seal_all_blocks();
            b.finalize(tcfg);
        }
        let dump = std::env::var_os("PRUNEC_DUMP_JIT").is_some();
        ctx.set_disasm(dump);
        module
            .define_function(fid, &mut ctx)
            .map_err(|e| format!("{e:?}"))?;
        if dump {
            if let Some(code) = ctx.compiled_code().and_then(|c| c.vcode.clone()) {
                eprintln!("== {kind:?} of {expr}\n{code}");
            }
        }
        module.clear_context(&mut ctx);
        fids.push(fid);
    }
    module.finalize_definitions().map_err(|e| e.to_string())?;
    let get = |f| {
        let p = module.get_finalized_function(f);
        // SAFETY: `p` points at a finalized function compiled above with the signature
        // `fn(*mut KArgs)` in the host's default calling convention.
        unsafe { std::mem::transmute::<*const u8, KernelFn>(p) }
    };
    let k = CompiledKernel {
        score: get(fids[0]),
        scan: get(fids[1]),
        apply: get(fids[2]),
        score_raw: get(fids[3]),
    };
    // The module's code memory must outlive every copy of the function pointers; the kernel
    // cache keeps them for the whole program, so the module is deliberately never freed.
    std::mem::forget(module);
    Ok(k)
}

/// Mutable per-call counters kept in variables.
struct Counters {
    above_v: Variable,
    nonfin_v: Variable,
    above: Variable,
    in_range: Variable,
    nonfin: Variable,
    quota: Variable,
}

struct Consts {
    lo: Value,
    hi: Value,
    t: Value,
    lo_u: Value,
    shift: Value,
    cap: Value,
    hist: Value,
    cands: Value,
    out: Value,
    lo_v: Value,
    hi_v: Value,
    t_v: Value,
    expm_v: Value,
    lut: Value,
}

fn build(kind: Kind, expr: &KExpr, b: &mut FunctionBuilder, calls: [FuncRef; 3]) {
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    let a = b.block_params(entry)[0];
    let ld = |b: &mut FunctionBuilder, ty, o: usize| b.ins().load(ty, mf(), a, off(o));
    let w = ld(b, I64, offset_of!(KArgs, w));
    let grad = ld(b, I64, offset_of!(KArgs, grad));
    let init = ld(b, I64, offset_of!(KArgs, init));
    let colp = ld(b, I64, offset_of!(KArgs, col_stats));
    let rowp = ld(b, I64, offset_of!(KArgs, row_stats));
    let scal = ld(b, I64, offset_of!(KArgs, scalars));
    let inputs = expr.inputs();
    let max_slot = |f: &dyn Fn(&KInput) -> Option<u8>| -> usize {
        inputs
            .iter()
            .filter_map(f)
            .map(|s| s as usize + 1)
            .max()
            .unwrap_or(0)
    };
    let ncol = max_slot(&|i| {
        if let KInput::ColStat(s) = i {
            Some(*s)
        } else {
            None
        }
    });
    let nrow = max_slot(&|i| {
        if let KInput::RowStat(s) = i {
            Some(*s)
        } else {
            None
        }
    });
    let nsc = max_slot(&|i| {
        if let KInput::Scalar(s) = i {
            Some(*s)
        } else {
            None
        }
    });
    let mut col_ptrs = vec![None; ncol];
    let mut row_ptrs = vec![None; nrow];
    let mut scalars = vec![None; nsc];
    for inp in &inputs {
        match *inp {
            KInput::ColStat(s) => {
                col_ptrs[s as usize] = Some(b.ins().load(I64, mf(), colp, off(8 * s as usize)))
            }
            KInput::RowStat(s) => {
                row_ptrs[s as usize] = Some(b.ins().load(I64, mf(), rowp, off(8 * s as usize)))
            }
            KInput::Scalar(s) => {
                scalars[s as usize] = Some(b.ins().load(F32, mf(), scal, off(4 * s as usize)))
            }
            _ => {}
        }
    }
    let cols = ld(b, I64, offset_of!(KArgs, cols));
    let start = ld(b, I64, offset_of!(KArgs, start));
    let end = ld(b, I64, offset_of!(KArgs, end));
    let cap = ld(b, I64, offset_of!(KArgs, cap));
    let lo_u = ld(b, I32, offset_of!(KArgs, lo));
    let hi_u = ld(b, I32, offset_of!(KArgs, hi));
    let t_u = ld(b, I32, offset_of!(KArgs, t));
    let shift = ld(b, I32, offset_of!(KArgs, shift));
    let quota0 = ld(b, I64, offset_of!(KArgs, quota));
    let mask = ld(b, I64, offset_of!(KArgs, mask));
    let out = ld(b, I64, offset_of!(KArgs, out));
    let hist = ld(b, I64, offset_of!(KArgs, hist));
    let cands = ld(b, I64, offset_of!(KArgs, cands));
    let flip = b.ins().iconst(I32, i32::MIN as i64);
    let lo = b.ins().bxor(lo_u, flip);
    let hi = b.ins().bxor(hi_u, flip);
    let t = b.ins().bxor(t_u, flip);
    let lut = ld(b, I64, offset_of!(KArgs, lut));
    let lo_v = b.ins().splat(I32X4, lo);
    let hi_v = b.ins().splat(I32X4, hi);
    let t_v = b.ins().splat(I32X4, t);
    let expc = b.ins().iconst(I32, 0x7f80_0000);
    let expm_v = b.ins().splat(I32X4, expc);
    let is_score = matches!(kind, Kind::Score | Kind::ScoreRaw);
    let uses_pos = inputs
        .iter()
        .any(|i| matches!(i, KInput::ColStat(_) | KInput::RowStat(_)));

    let iv = b.declare_var(I64);
    let colv = b.declare_var(I64);
    let rowv = b.declare_var(I64);
    b.def_var(iv, start);
    if uses_pos {
        let r = b.ins().udiv(start, cols);
        let c = b.ins().urem(start, cols);
        b.def_var(rowv, r);
        b.def_var(colv, c);
    } else {
        let z = b.ins().iconst(I64, 0);
        b.def_var(rowv, z);
        b.def_var(colv, z);
    }
    let z64 = b.ins().iconst(I64, 0);
    let z32 = b.ins().iconst(I32, 0);
    let zv = b.ins().splat(I32X4, z32);
    let ctr = Counters {
        above_v: b.declare_var(I32X4),
        nonfin_v: b.declare_var(I32X4),
        above: b.declare_var(I64),
        in_range: b.declare_var(I64),
        nonfin: b.declare_var(I64),
        quota: b.declare_var(I64),
    };
    b.def_var(ctr.above_v, zv);
    b.def_var(ctr.nonfin_v, zv);
    b.def_var(ctr.above, z64);
    b.def_var(ctr.in_range, z64);
    b.def_var(ctr.nonfin, z64);
    b.def_var(ctr.quota, quota0);
    let k = Consts {
        lo,
        hi,
        t,
        lo_u,
        shift,
        cap,
        hist,
        cands,
        out,
        lo_v,
        hi_v,
        t_v,
        expm_v,
        lut,
    };
    let vec_ok = if uses_pos {
        let three = b.ins().iconst(I64, 3);
        let r = b.ins().band(cols, three);
        b.ins().icmp(IntCC::Equal, r, z64)
    } else {
        b.ins().iconst(I8, 1)
    };
    let acc = b.declare_var(I64);
    let g = b.declare_var(I64);
    let old = b.declare_var(I64);
    b.def_var(acc, z64);
    b.def_var(g, z64);
    b.def_var(old, z64);

    let abs_c = b.ins().iconst(I32, 0x7fff_ffff);
    let abs_mask = b.ins().splat(I32X4, abs_c);
    let sign_c = b.ins().iconst(I32, i32::MIN as i64);
    let sign_mask = b.ins().splat(I32X4, sign_c);
    let mut gen = Gen {
        b,
        expr,
        calls,
        w,
        grad,
        init,
        col_ptrs,
        row_ptrs,
        scalars,
        start,
        i: iv,
        col: colv,
        row: rowv,
        uses_pos,
        abs_mask,
        sign_mask,
    };
    let word_head = gen.b.create_block();
    let word_body = gen.b.create_block();
    let group_head = gen.b.create_block();
    let group_body = gen.b.create_block();
    let word_end = gen.b.create_block();
    let tail_head = gen.b.create_block();
    let tail_body = gen.b.create_block();
    let exit = gen.b.create_block();
    gen.b.ins().jump(word_head, &[]);

    // while vec_ok && i + 64 <= end
    gen.b.switch_to_block(word_head);
    let i = gen.b.use_var(iv);
    let i64c = gen.ic(I64, 64);
    let next = gen.b.ins().iadd(i, i64c);
    let fits = gen.b.ins().icmp(IntCC::UnsignedLessThanOrEqual, next, end);
    let go = gen.b.ins().band(fits, vec_ok);
    gen.b.ins().brif(go, word_body, &[], tail_head, &[]);

    gen.b.switch_to_block(word_body);
    let i = gen.b.use_var(iv);
    let dense_head = gen.b.create_block();
    let dense_body = gen.b.create_block();
    gen.b.def_var(acc, z64);
    gen.b.def_var(g, z64);
    if !is_score {
        let six = gen.ic(I64, 6);
        let wi = gen.b.ins().ushr(i, six);
        let three = gen.ic(I64, 3);
        let wo = gen.b.ins().ishl(wi, three);
        let wa = gen.b.ins().iadd(mask, wo);
        let ow = gen.b.ins().load(I64, mf(), wa, 0);
        gen.b.def_var(old, ow);
        // A fully alive word takes the loop without per-lane alive masks.
        let all = gen.ic(I64, -1);
        let dense = gen.b.ins().icmp(IntCC::Equal, ow, all);
        gen.b.ins().brif(dense, dense_head, &[], group_head, &[]);
    } else if gen.uses_pos {
        // A word inside one row takes the loop without the per-group row wrap.
        let c = gen.b.use_var(colv);
        let c64 = gen.ic(I64, 64);
        let ce = gen.b.ins().iadd(c, c64);
        let inrow = gen.b.ins().icmp(IntCC::UnsignedLessThanOrEqual, ce, cols);
        gen.b.ins().brif(inrow, dense_head, &[], group_head, &[]);
    } else {
        gen.b.ins().jump(group_head, &[]);
    }

    let loops = [
        (group_head, group_body, false),
        (dense_head, dense_body, true),
    ];
    let n_loops = if is_score && !gen.uses_pos { 1 } else { 2 };
    for &(head, body, dense) in &loops[..n_loops] {
        gen.b.switch_to_block(head);
        let gv = gen.b.use_var(g);
        let four = gen.ic(I64, 4);
        let more = gen.b.ins().icmp(IntCC::UnsignedLessThan, gv, four);
        gen.b.ins().brif(more, body, &[], word_end, &[]);

        gen.b.switch_to_block(body);
        // Four groups of four lanes per iteration, four iterations per mask word.
        for _ in 0..4 {
            vector_group(&mut gen, kind, &k, &ctr, old, acc, dense);
            advance(&mut gen, 4, cols, !(is_score && dense));
        }
        let gv = gen.b.use_var(g);
        let one = gen.ic(I64, 1);
        let gn = gen.b.ins().iadd(gv, one);
        gen.b.def_var(g, gn);
        gen.b.ins().jump(head, &[]);
    }

    gen.b.switch_to_block(word_end);
    if is_score && gen.uses_pos {
        // After an in-row word the column may have reached the row's end.
        let c = gen.b.use_var(colv);
        let r = gen.b.use_var(rowv);
        let wrap = gen.b.ins().icmp(IntCC::Equal, c, cols);
        let z = gen.ic(I64, 0);
        let nc = gen.b.ins().select(wrap, z, c);
        let inc = gen.b.ins().uextend(I64, wrap);
        let nr = gen.b.ins().iadd(r, inc);
        gen.b.def_var(colv, nc);
        gen.b.def_var(rowv, nr);
    }
    if kind == Kind::Apply {
        // i has advanced by 64: the word is the previous one.
        let i = gen.b.use_var(iv);
        let c64 = gen.ic(I64, 64);
        let ws = gen.b.ins().isub(i, c64);
        let six = gen.ic(I64, 6);
        let wi = gen.b.ins().ushr(ws, six);
        let three = gen.ic(I64, 3);
        let wo = gen.b.ins().ishl(wi, three);
        let wa = gen.b.ins().iadd(mask, wo);
        let av = gen.b.use_var(acc);
        gen.b.ins().store(mf(), av, wa, 0);
    }
    gen.b.ins().jump(word_head, &[]);

    // scalar tail
    gen.b.switch_to_block(tail_head);
    let i = gen.b.use_var(iv);
    let lt = gen.b.ins().icmp(IntCC::UnsignedLessThan, i, end);
    gen.b.ins().brif(lt, tail_body, &[], exit, &[]);

    gen.b.switch_to_block(tail_body);
    let (i, c, r) = gen.positions();
    match kind {
        Kind::Score | Kind::ScoreRaw => scalar_score(&mut gen, &k, i, c, r, kind == Kind::Score),
        Kind::Scan => {
            let wa = word_addr(&mut gen, mask, i);
            let ow = gen.b.ins().load(I64, mf(), wa, 0);
            scalar_scan(&mut gen, &k, &ctr, i, c, r, ow);
        }
        Kind::Apply => {
            let wa = word_addr(&mut gen, mask, i);
            let ow = gen.b.ins().load(I64, mf(), wa, 0);
            let keep = scalar_apply(&mut gen, &k, &ctr, i, c, r, ow);
            let m63 = gen.ic(I64, 63);
            let sh = gen.b.ins().band(i, m63);
            let one = gen.ic(I64, 1);
            let bit = gen.b.ins().ishl(one, sh);
            let clr = gen.b.ins().band_not(ow, bit);
            let kb = gen.b.ins().ishl(keep, sh);
            let nw = gen.b.ins().bor(clr, kb);
            gen.b.ins().store(mf(), nw, wa, 0);
        }
    }
    advance(&mut gen, 1, cols, true);
    gen.b.ins().jump(tail_head, &[]);

    gen.b.switch_to_block(exit);
    if kind == Kind::Scan {
        let sum_lanes = |gen: &mut Gen, v: Variable| -> Value {
            let v = gen.b.use_var(v);
            let mut s = gen.ic(I64, 0);
            for l in 0..4u8 {
                let x = gen.b.ins().extractlane(v, l);
                let x = gen.b.ins().uextend(I64, x);
                s = gen.b.ins().iadd(s, x);
            }
            s
        };
        let av = sum_lanes(&mut gen, ctr.above_v);
        let nv = sum_lanes(&mut gen, ctr.nonfin_v);
        let a1 = gen.b.use_var(ctr.above);
        let n1 = gen.b.use_var(ctr.nonfin);
        let at = gen.b.ins().iadd(av, a1);
        let nt = gen.b.ins().iadd(nv, n1);
        let ir = gen.b.use_var(ctr.in_range);
        gen.b
            .ins()
            .store(mf(), at, a, off(offset_of!(KArgs, above)));
        gen.b
            .ins()
            .store(mf(), nt, a, off(offset_of!(KArgs, nonfinite)));
        gen.b
            .ins()
            .store(mf(), ir, a, off(offset_of!(KArgs, in_range)));
    }
    if kind == Kind::Apply {
        let q = gen.b.use_var(ctr.quota);
        gen.b.ins().store(mf(), q, a, off(offset_of!(KArgs, quota)));
    }
    gen.b.ins().return_(&[]);
}

fn word_addr(gen: &mut Gen, mask: Value, i: Value) -> Value {
    let six = gen.ic(I64, 6);
    let wi = gen.b.ins().ushr(i, six);
    let three = gen.ic(I64, 3);
    let wo = gen.b.ins().ishl(wi, three);
    gen.b.ins().iadd(mask, wo)
}

/// `i += n`, and column / row bookkeeping (a group of 4 never crosses a row when used);
/// without `wrap` the column only moves on (the caller knows the row does not end).
fn advance(gen: &mut Gen, n: i64, cols: Value, wrap: bool) {
    let i = gen.b.use_var(gen.i);
    let nv = gen.ic(I64, n);
    let ni = gen.b.ins().iadd(i, nv);
    gen.b.def_var(gen.i, ni);
    if gen.uses_pos && !wrap {
        let c = gen.b.use_var(gen.col);
        let nc = gen.b.ins().iadd(c, nv);
        gen.b.def_var(gen.col, nc);
    } else if gen.uses_pos {
        let c = gen.b.use_var(gen.col);
        let r = gen.b.use_var(gen.row);
        let nc = gen.b.ins().iadd(c, nv);
        let wrap = gen.b.ins().icmp(IntCC::Equal, nc, cols);
        let z = gen.ic(I64, 0);
        let nc = gen.b.ins().select(wrap, z, nc);
        let inc = gen.b.ins().uextend(I64, wrap);
        let nr = gen.b.ins().iadd(r, inc);
        gen.b.def_var(gen.col, nc);
        gen.b.def_var(gen.row, nr);
    }
}

fn scalar_score(gen: &mut Gen, k: &Consts, i: Value, c: Value, r: Value, canonical: bool) {
    let e = gen.expr;
    let mut s = gen.s_eval(e, i, c, r);
    if canonical {
        let nan = gen.b.ins().fcmp(FloatCC::Unordered, s, s);
        let cn = gen.b.ins().f32const(f32::from_bits(CANONICAL_NAN));
        s = gen.b.ins().select(nan, cn, s);
    }
    let rel = gen.b.ins().isub(i, gen.start);
    let a = gen.addr4(k.out, rel);
    gen.b.ins().store(mf(), s, a, 0);
}

/// One element of `scan`; `ow` is the element's mask word.
fn scalar_scan(gen: &mut Gen, k: &Consts, ctr: &Counters, i: Value, c: Value, r: Value, ow: Value) {
    let body = gen.b.create_block();
    let rec = gen.b.create_block();
    let done = gen.b.create_block();
    let alive = gen.bit_of(ow, i);
    gen.b.ins().brif(alive, body, &[], done, &[]);

    gen.b.switch_to_block(body);
    let e = gen.expr;
    let s = gen.s_eval(e, i, c, r);
    let key = gen.s_key(s);
    let wa = gen.addr4(gen.w, i);
    let wbits = gen.b.ins().load(I32, mf(), wa, 0);
    let expm = gen.ic(I32, 0x7f80_0000);
    let ex = gen.b.ins().band(wbits, expm);
    let nf = gen.b.ins().icmp(IntCC::Equal, ex, expm);
    let nf = gen.b.ins().uextend(I64, nf);
    let n0 = gen.b.use_var(ctr.nonfin);
    let n1 = gen.b.ins().iadd(n0, nf);
    gen.b.def_var(ctr.nonfin, n1);
    let gt = gen.b.ins().icmp(IntCC::SignedGreaterThan, key, k.hi);
    let gt64 = gen.b.ins().uextend(I64, gt);
    let a0 = gen.b.use_var(ctr.above);
    let a1 = gen.b.ins().iadd(a0, gt64);
    gen.b.def_var(ctr.above, a1);
    let ge = gen.b.ins().icmp(IntCC::SignedGreaterThanOrEqual, key, k.lo);
    let le = gen.b.ins().icmp(IntCC::SignedLessThanOrEqual, key, k.hi);
    let inr = gen.b.ins().band(ge, le);
    gen.b.ins().brif(inr, rec, &[], done, &[]);

    gen.b.switch_to_block(rec);
    let flip = gen.ic(I32, i32::MIN as i64);
    let uk = gen.b.ins().bxor(key, flip);
    let d = gen.b.ins().isub(uk, k.lo_u);
    let bucket = gen.b.ins().ushr(d, k.shift);
    let bucket = gen.b.ins().uextend(I64, bucket);
    let ha = gen.addr4(k.hist, bucket);
    let h = gen.b.ins().load(I32, mf(), ha, 0);
    let one32 = gen.ic(I32, 1);
    let h1 = gen.b.ins().iadd(h, one32);
    gen.b.ins().store(mf(), h1, ha, 0);
    let n = gen.b.use_var(ctr.in_range);
    let room = gen.b.ins().icmp(IntCC::UnsignedLessThan, n, k.cap);
    let rel = gen.b.ins().isub(i, gen.start);
    let uk64 = gen.b.ins().uextend(I64, uk);
    let c32 = gen.ic(I64, 32);
    let hi_part = gen.b.ins().ishl(uk64, c32);
    let cand = gen.b.ins().bor(hi_part, rel);
    // Write slot min(n, cap - 1) when there is room; the caller sizes `cands` >= 1.
    let capm1 = {
        let one = gen.ic(I64, 1);
        gen.b.ins().isub(k.cap, one)
    };
    let slot = gen.b.ins().select(room, n, capm1);
    let three = gen.ic(I64, 3);
    let so = gen.b.ins().ishl(slot, three);
    let ca = gen.b.ins().iadd(k.cands, so);
    let prev = gen.b.ins().load(I64, mf(), ca, 0);
    let val = gen.b.ins().select(room, cand, prev);
    gen.b.ins().store(mf(), val, ca, 0);
    let one = gen.ic(I64, 1);
    let n1 = gen.b.ins().iadd(n, one);
    gen.b.def_var(ctr.in_range, n1);
    gen.b.ins().jump(done, &[]);

    gen.b.switch_to_block(done);
}

/// One element of `apply`: writes the weight, returns the keep bit (i64 0/1).
fn scalar_apply(
    gen: &mut Gen,
    k: &Consts,
    ctr: &Counters,
    i: Value,
    c: Value,
    r: Value,
    ow: Value,
) -> Value {
    let alive = gen.bit_of(ow, i);
    let e = gen.expr;
    let s = gen.s_eval(e, i, c, r);
    let key = gen.s_key(s);
    let gt = gen.b.ins().icmp(IntCC::SignedGreaterThan, key, k.t);
    let eq = gen.b.ins().icmp(IntCC::Equal, key, k.t);
    let q = gen.b.use_var(ctr.quota);
    let z = gen.ic(I64, 0);
    let has_q = gen.b.ins().icmp(IntCC::UnsignedGreaterThan, q, z);
    let tie = gen.b.ins().band(eq, has_q);
    let tie = gen.b.ins().uextend(I64, tie);
    let tie = gen.b.ins().band(tie, alive);
    let q1 = gen.b.ins().isub(q, tie);
    gen.b.def_var(ctr.quota, q1);
    let gt = gen.b.ins().uextend(I64, gt);
    let any = gen.b.ins().bor(gt, tie);
    let keep = gen.b.ins().band(any, alive);
    let wa = gen.addr4(gen.w, i);
    let wv = gen.b.ins().load(F32, mf(), wa, 0);
    let zf = gen.b.ins().f32const(0.0);
    let nw = gen.b.ins().select(keep, wv, zf);
    gen.b.ins().store(mf(), nw, wa, 0);
    keep
}

/// The lanes of `old >> (i & 63)` as an i32x4 mask.
fn alive_lanes(gen: &mut Gen, k: &Consts, ow: Value, i: Value) -> Value {
    let m63 = gen.ic(I64, 63);
    let sh = gen.b.ins().band(i, m63);
    let x = gen.b.ins().ushr(ow, sh);
    let m15 = gen.ic(I64, 15);
    let nib = gen.b.ins().band(x, m15);
    let four = gen.ic(I64, 4);
    let off = gen.b.ins().ishl(nib, four);
    let a = gen.b.ins().iadd(k.lut, off);
    gen.b.ins().load(I32X4, mf(), a, 0)
}

/// `mask & alive`, or `mask` itself in a fully alive word.
fn and_alive(gen: &mut Gen, mask: Value, alive: Option<Value>) -> Value {
    match alive {
        Some(a) => gen.b.ins().band(mask, a),
        None => mask,
    }
}

fn vector_group(
    gen: &mut Gen,
    kind: Kind,
    k: &Consts,
    ctr: &Counters,
    old: Variable,
    acc: Variable,
    dense: bool,
) {
    let (i, c, r) = gen.positions();
    let e = gen.expr;
    let s = gen.v_eval(e, i, c, r);
    match kind {
        Kind::Score | Kind::ScoreRaw => {
            let s = if kind == Kind::Score {
                let nan = gen.b.ins().fcmp(FloatCC::Unordered, s, s);
                let cn = gen.vf(f32::from_bits(CANONICAL_NAN));
                gen.vsel(nan, cn, s)
            } else {
                s
            };
            let rel = gen.b.ins().isub(i, gen.start);
            let a = gen.addr4(k.out, rel);
            gen.b.ins().store(mf(), s, a, 0);
        }
        Kind::Scan => {
            let ow = gen.b.use_var(old);
            let key = gen.v_key(s);
            let alive = if dense {
                None
            } else {
                Some(alive_lanes(gen, k, ow, i))
            };
            let (lo, hi) = (k.lo_v, k.hi_v);
            let ge = gen.b.ins().icmp(IntCC::SignedGreaterThanOrEqual, key, lo);
            let le = gen.b.ins().icmp(IntCC::SignedLessThanOrEqual, key, hi);
            let inr = gen.b.ins().band(ge, le);
            let inr = and_alive(gen, inr, alive);
            let any = gen.b.ins().vany_true(inr);
            let slow = gen.b.create_block();
            let fast = gen.b.create_block();
            let cont = gen.b.create_block();
            gen.b.ins().brif(any, slow, &[], fast, &[]);

            gen.b.switch_to_block(fast);
            let gt = gen.b.ins().icmp(IntCC::SignedGreaterThan, key, hi);
            let gt = and_alive(gen, gt, alive);
            let av = gen.b.use_var(ctr.above_v);
            let av = gen.b.ins().isub(av, gt);
            gen.b.def_var(ctr.above_v, av);
            let wa = gen.addr4(gen.w, i);
            let wv = gen.b.ins().load(I32X4, mf(), wa, 0);
            let expm = k.expm_v;
            let ex = gen.b.ins().band(wv, expm);
            let nf = gen.b.ins().icmp(IntCC::Equal, ex, expm);
            let nf = and_alive(gen, nf, alive);
            let nv = gen.b.use_var(ctr.nonfin_v);
            let nv = gen.b.ins().isub(nv, nf);
            gen.b.def_var(ctr.nonfin_v, nv);
            gen.b.ins().jump(cont, &[]);

            gen.b.switch_to_block(slow);
            for l in 0..4 {
                let (i, c, r) = gen.positions();
                let lv = gen.ic(I64, l);
                let il = gen.b.ins().iadd(i, lv);
                let cl = if gen.uses_pos {
                    gen.b.ins().iadd(c, lv)
                } else {
                    il
                };
                let rl = if gen.uses_pos { r } else { il };
                scalar_scan(gen, k, ctr, il, cl, rl, ow);
            }
            gen.b.ins().jump(cont, &[]);
            gen.b.switch_to_block(cont);
        }
        Kind::Apply => {
            let ow = gen.b.use_var(old);
            let key = gen.v_key(s);
            let alive = if dense {
                None
            } else {
                Some(alive_lanes(gen, k, ow, i))
            };
            let t = k.t_v;
            let eq = gen.b.ins().icmp(IntCC::Equal, key, t);
            let eq = and_alive(gen, eq, alive);
            let any = gen.b.ins().vany_true(eq);
            let q = gen.b.use_var(ctr.quota);
            let z = gen.ic(I64, 0);
            let has_q = gen.b.ins().icmp(IntCC::UnsignedGreaterThan, q, z);
            let go_slow = gen.b.ins().band(any, has_q);
            let slow = gen.b.create_block();
            let fast = gen.b.create_block();
            let cont = gen.b.create_block();
            gen.b.ins().brif(go_slow, slow, &[], fast, &[]);

            gen.b.switch_to_block(fast);
            let gt = gen.b.ins().icmp(IntCC::SignedGreaterThan, key, t);
            let keep = and_alive(gen, gt, alive);
            let wa = gen.addr4(gen.w, i);
            let wv = gen.b.ins().load(I32X4, mf(), wa, 0);
            let nw = gen.b.ins().band(wv, keep);
            gen.b.ins().store(mf(), nw, wa, 0);
            let bits = gen.b.ins().vhigh_bits(I64, keep);
            let m63 = gen.ic(I64, 63);
            let sh = gen.b.ins().band(i, m63);
            let bits = gen.b.ins().ishl(bits, sh);
            let a0 = gen.b.use_var(acc);
            let a1 = gen.b.ins().bor(a0, bits);
            gen.b.def_var(acc, a1);
            gen.b.ins().jump(cont, &[]);

            gen.b.switch_to_block(slow);
            for l in 0..4 {
                let (i, c, r) = gen.positions();
                let lv = gen.ic(I64, l);
                let il = gen.b.ins().iadd(i, lv);
                let cl = if gen.uses_pos {
                    gen.b.ins().iadd(c, lv)
                } else {
                    il
                };
                let rl = if gen.uses_pos { r } else { il };
                let keep = scalar_apply(gen, k, ctr, il, cl, rl, ow);
                let m63 = gen.ic(I64, 63);
                let sh = gen.b.ins().band(il, m63);
                let kb = gen.b.ins().ishl(keep, sh);
                let a0 = gen.b.use_var(acc);
                let a1 = gen.b.ins().bor(a0, kb);
                gen.b.def_var(acc, a1);
            }
            gen.b.ins().jump(cont, &[]);
            gen.b.switch_to_block(cont);
        }
    }
}
