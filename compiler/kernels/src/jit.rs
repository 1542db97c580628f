//! Cranelift code generation: one criterion expression becomes native loops over a range of
//! one tensor, f32x4 where possible: `score` (NaN scores canonical, for callers that report
//! scores) and `score_raw` (any NaN bits, for internal score buffers that are only compared),
//! whose buffers selection and masking read in [`super::simd`]; and three fused scans
//! (`scan_read`, `scan_zero`, `scan_zero_all`) that also classify each score against a key
//! range, record the bits per word and, for the last two, zero the weights below the range in
//! the same loop (see `docs/kernels.md`).
//!
//! A loop walks `[start, end)` in 64-element words of 16 groups of 4 lanes; elements after the
//! last full word, and whole ranges whose rows are not a multiple of 4 long while the
//! expression reads row or column statistics, use the scalar element code. With row or column
//! statistics, a word inside one row skips the per-group row bookkeeping.

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, I32, I32X4, I64, I8};
use cranelift_codegen::ir::{AbiParam, FuncRef, InstBuilder, Value};
use cranelift_codegen::settings::Configurable;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, Linkage, Module};
use std::mem::offset_of;

pub use super::abi::{KArgs, KernelFn};
use super::expr::{prunec_expf, prunec_logf, prunec_powf, KExpr, KInput, CANONICAL_NAN};
use super::translate::{mf, off, vmf, Gen};
use super::wide::WideScans;

/// The compiled loops for one expression.
#[derive(Clone, Copy, Debug)]
pub struct CompiledKernel {
    /// Scores of `[start, end)` into `out`, NaN scores as the canonical NaN.
    pub score: KernelFn,
    /// `score` without canonicalising NaN scores (any NaN bits may be written): for
    /// internal score buffers that are only compared, never reported.
    pub score_raw: KernelFn,
    /// `score_raw` fused with the classification against a key range (see [`KArgs::lo`] and
    /// the fields after it), in the same loop; reads the tensor only. Only for ranges of
    /// whole 64-element words, and only where [`Self::scan_ok`].
    pub scan_read: KernelFn,
    /// `scan_read` that also zeroes the finite weights below the range (callers check the
    /// block for non-finite weights afterwards: they are still there).
    pub scan_zero: KernelFn,
    /// `scan_read` that also zeroes every weight below the range, non-finite ones too.
    pub scan_zero_all: KernelFn,
    /// Whether the expression reads row or column statistics (the f32x4 loops then need
    /// rows a multiple of 4 long).
    pub uses_pos: bool,
    /// Whether the fused scans pay off: a fused loop over the weights alone (magnitude) beats
    /// scoring a block and classifying it with AVX-512; the 4-lane loop is bound by
    /// instructions, and with a second input stream (Wanda's column statistics: a load and a
    /// multiply more per four weights) it is slower than the blocked scan, so such
    /// expressions scan block by block (`docs/benchmarks/kernels.md`).
    pub fuse: bool,
    /// The same three scans in AVX-512 machine code ([`super::wide`]), and a row scan for
    /// per-row selections, on hosts with AVX-512 and for expressions in its subset; used
    /// instead of the cranelift scans wherever [`WideScans::ok`], and then worth fusing
    /// whatever the inputs.
    pub wide: Option<WideScans>,
}

impl CompiledKernel {
    /// Whether the scan kernels can run on a tensor of `cols` columns.
    pub fn scan_ok(&self, cols: usize) -> bool {
        !self.uses_pos || cols.is_multiple_of(4)
    }

    /// The AVX-512 scans, if there are any that run on a tensor of `cols` columns.
    pub fn wide_for(&self, cols: usize) -> Option<WideScans> {
        self.wide.filter(|w| w.ok(cols))
    }

    /// Whether cuts should scan a tensor of `cols` columns with a fused scan kernel.
    pub fn fused_for(&self, cols: usize) -> bool {
        self.wide_for(cols).is_some() || (self.fuse && self.scan_ok(cols))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Score,
    ScoreRaw,
    /// The scans: read only, zeroing the finite weights below the range, zeroing all of them.
    ScanRead,
    ScanZero,
    ScanZeroAll,
}

/// Whether inputs read row or column statistics, so the loops track rows and columns.
fn reads_position(inputs: &[KInput]) -> bool {
    inputs
        .iter()
        .any(|i| matches!(i, KInput::ColStat(_) | KInput::RowStat(_)))
}

/// Compiles the kernels of `expr` into a fresh JIT module, with the AVX-512 scans where the
/// host has them.
pub fn compile(expr: &KExpr) -> Result<CompiledKernel, String> {
    compile_with(expr, true)
}

/// [`compile`], with the AVX-512 scans only if `wide` (and the host has them).
pub fn compile_with(expr: &KExpr, wide: bool) -> Result<CompiledKernel, String> {
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
    let kinds = [
        Kind::Score,
        Kind::ScoreRaw,
        Kind::ScanRead,
        Kind::ScanZero,
        Kind::ScanZeroAll,
    ];
    for (n, kind) in kinds.into_iter().enumerate() {
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
    let inputs = expr.inputs();
    let uses_pos = reads_position(&inputs);
    let fuse = inputs
        .iter()
        .all(|i| matches!(i, KInput::Weight | KInput::Scalar(_)));
    let k = CompiledKernel {
        score: get(fids[0]),
        score_raw: get(fids[1]),
        scan_read: get(fids[2]),
        scan_zero: get(fids[3]),
        scan_zero_all: get(fids[4]),
        uses_pos,
        fuse,
        wide: if wide {
            super::wide::compile(expr)
        } else {
            None
        },
    };
    // The module's code memory must outlive every copy of the function pointers; the kernel
    // cache keeps them for the whole program, so the module is deliberately never freed.
    std::mem::forget(module);
    Ok(k)
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
    let ncol = max_slot(&|i| match i {
        KInput::ColStat(s) => Some(*s),
        _ => None,
    });
    let nrow = max_slot(&|i| match i {
        KInput::RowStat(s) => Some(*s),
        _ => None,
    });
    let nsc = max_slot(&|i| match i {
        KInput::Scalar(s) => Some(*s),
        _ => None,
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
    let out = ld(b, I64, offset_of!(KArgs, out));
    // The output of element `i` is at `out + 4 (i - start)`, the offset computed where it is
    // used: a base `out - 4 start` computed here would be recomputed in every iteration, as
    // cranelift rematerialises a shift by a constant in each block that uses it.
    let uses_pos = reads_position(&inputs);
    let canonical = kind == Kind::Score;

    let iv = b.declare_var(I64);
    let colv = b.declare_var(I64);
    let rowv = b.declare_var(I64);
    b.def_var(iv, start);
    let z64 = b.ins().iconst(I64, 0);
    if uses_pos {
        let r = b.ins().udiv(start, cols);
        let c = b.ins().urem(start, cols);
        b.def_var(rowv, r);
        b.def_var(colv, c);
    } else {
        b.def_var(rowv, z64);
        b.def_var(colv, z64);
    }
    let vec_ok = if uses_pos {
        let three = b.ins().iconst(I64, 3);
        let r = b.ins().band(cols, three);
        b.ins().icmp(IntCC::Equal, r, z64)
    } else {
        b.ins().iconst(I8, 1)
    };
    let g = b.declare_var(I64);
    b.def_var(g, z64);
    let abs_c = b.ins().iconst(I32, 0x7fff_ffff);
    let abs_mask = b.ins().splat(I32X4, abs_c);
    let sign_c = b.ins().iconst(I32, i32::MIN as i64);
    let sign_mask = b.ins().splat(I32X4, sign_c);
    let scan_kind = matches!(kind, Kind::ScanRead | Kind::ScanZero | Kind::ScanZeroAll);
    let scan = scan_kind.then(|| {
        // Vectors loaded once (not splats, which cranelift would redo in the loop).
        let lo = b.ins().load(F32X4, vmf(), a, off(offset_of!(KArgs, lo)));
        let gt = b.ins().load(F32X4, vmf(), a, off(offset_of!(KArgs, gt)));
        let fin_c = b.ins().iconst(I32, 0x7f7f_ffff);
        let below_inf = b.ins().splat(I32X4, fin_c);
        let ge = ld(b, I64, offset_of!(KArgs, ge));
        let over = ld(b, I64, offset_of!(KArgs, over));
        Scan {
            kind,
            lo,
            gt,
            below_inf,
            ge,
            over,
        }
    });

    let mut gen = Gen {
        b,
        calls,
        w,
        grad,
        init,
        col_ptrs,
        row_ptrs,
        scalars,
        i: iv,
        col: colv,
        row: rowv,
        uses_pos,
        abs_mask,
        sign_mask,
        off: 0,
        w_loaded: None,
    };
    let word_head = gen.b.create_block();
    let word_body = gen.b.create_block();
    let wrap_head = gen.b.create_block();
    let wrap_body = gen.b.create_block();
    let row_head = gen.b.create_block();
    let row_body = gen.b.create_block();
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
    gen.b.def_var(g, z64);
    if uses_pos {
        // A word inside one row takes the loop without the per-group row wrap.
        let c = gen.b.use_var(colv);
        let c64 = gen.ic(I64, 64);
        let ce = gen.b.ins().iadd(c, c64);
        let inrow = gen.b.ins().icmp(IntCC::UnsignedLessThanOrEqual, ce, cols);
        gen.b.ins().brif(inrow, row_head, &[], wrap_head, &[]);
    } else {
        gen.b.ins().jump(row_head, &[]);
    }

    let loops: &[(_, _, bool)] = if uses_pos {
        &[(row_head, row_body, false), (wrap_head, wrap_body, true)]
    } else {
        &[(row_head, row_body, false)]
    };
    for &(head, body, wrap) in loops {
        gen.b.switch_to_block(head);
        let gv = gen.b.use_var(g);
        let two = gen.ic(I64, 2);
        let more = gen.b.ins().icmp(IntCC::UnsignedLessThan, gv, two);
        gen.b.ins().brif(more, body, &[], word_end, &[]);

        gen.b.switch_to_block(body);
        // Eight groups of four lanes per iteration, two iterations per word. Without row
        // wraps the groups share one position and address their lanes by offsets.
        let i0 = gen.b.use_var(iv);
        // Scan: the lane masks of the current four groups, and where the iteration's bits
        // go (its 32 elements start a multiple of 32 after `start`).
        let mut masks: Vec<(Value, Value)> = Vec::new();
        let bits_at = scan.as_ref().map(|_| {
            let rel = gen.b.ins().isub(i0, start);
            let three = gen.ic(I64, 3);
            gen.b.ins().ushr(rel, three)
        });
        let mut quad = 0;
        let mut shared = None;
        for g in 0..8 {
            let (i, c, r) = match shared {
                Some(p) => p,
                None => gen.positions(),
            };
            if !wrap {
                shared = Some((i, c, r));
                gen.off = 16 * g;
            }
            // A scan loads the group's weights first, and the score reuses them.
            let wv = scan.as_ref().map(|_| {
                let wa = gen.addr4(gen.w, i);
                let wv = gen.b.ins().load(I32X4, vmf(), wa, gen.off);
                gen.w_loaded = Some((i, gen.off, wv));
                (wa, wv)
            });
            let s = gen.v_eval(expr, i, c, r);
            gen.w_loaded = None;
            let s = if canonical {
                let nan = gen.b.ins().fcmp(FloatCC::Unordered, s, s);
                let cn = gen.vf(f32::from_bits(CANONICAL_NAN));
                gen.vsel(nan, cn, s)
            } else {
                s
            };
            let rel = gen.b.ins().isub(i, start);
            let a = gen.addr4(out, rel);
            gen.b.ins().store(mf(), s, a, gen.off);
            if let (Some(sc), Some(at)) = (&scan, bits_at) {
                let (wa, wv) = wv.expect("loaded for a scan");
                masks.push(scan_group(&mut gen, sc, s, wa, wv));
                if masks.len() == 4 {
                    // Stored per quad: the stores pin the packing here, so few vectors stay
                    // live (cranelift places pure instructions at their first use).
                    scan_quad(&mut gen, sc, &masks, at, quad);
                    masks.clear();
                    quad += 1;
                }
            }
            if wrap {
                advance(&mut gen, 4, cols, true);
            }
        }
        if !wrap {
            gen.off = 0;
            advance(&mut gen, 32, cols, false);
        }
        let gv = gen.b.use_var(g);
        let one = gen.ic(I64, 1);
        let gn = gen.b.ins().iadd(gv, one);
        gen.b.def_var(g, gn);
        gen.b.ins().jump(head, &[]);
    }

    gen.b.switch_to_block(word_end);
    if uses_pos {
        // After an in-row word the column may have reached the row's end.
        let c = gen.b.use_var(colv);
        let r = gen.b.use_var(rowv);
        let at_end = gen.b.ins().icmp(IntCC::Equal, c, cols);
        let z = gen.ic(I64, 0);
        let nc = gen.b.ins().select(at_end, z, c);
        let inc = gen.b.ins().uextend(I64, at_end);
        let nr = gen.b.ins().iadd(r, inc);
        gen.b.def_var(colv, nc);
        gen.b.def_var(rowv, nr);
    }
    gen.b.ins().jump(word_head, &[]);

    // scalar tail
    gen.b.switch_to_block(tail_head);
    let i = gen.b.use_var(iv);
    let lt = gen.b.ins().icmp(IntCC::UnsignedLessThan, i, end);
    gen.b.ins().brif(lt, tail_body, &[], exit, &[]);

    gen.b.switch_to_block(tail_body);
    let (i, c, r) = gen.positions();
    let mut s = gen.s_eval(expr, i, c, r);
    if canonical {
        let nan = gen.b.ins().fcmp(FloatCC::Unordered, s, s);
        let cn = gen.b.ins().f32const(f32::from_bits(CANONICAL_NAN));
        s = gen.b.ins().select(nan, cn, s);
    }
    let rel = gen.b.ins().isub(i, start);
    let a = gen.addr4(out, rel);
    gen.b.ins().store(mf(), s, a, 0);
    advance(&mut gen, 1, cols, true);
    gen.b.ins().jump(tail_head, &[]);

    gen.b.switch_to_block(exit);
    gen.b.ins().return_(&[]);
}

/// The values a scan kernel keeps in registers.
struct Scan {
    kind: Kind,
    lo: Value,
    gt: Value,
    /// The largest finite magnitude bits.
    below_inf: Value,
    ge: Value,
    over: Value,
}

/// One group of a scan: classifies the scores `s` of four elements (weights `wv`, loaded from
/// `wa` at the current offset) and zeroes their weights below the range if the kind says so
/// (`ScanZero` keeps the non-finite ones). Returns the lane masks `s >= lo` and `s >= gt`.
fn scan_group(gen: &mut Gen, sc: &Scan, s: Value, wa: Value, wv: Value) -> (Value, Value) {
    let ge = gen.b.ins().fcmp(FloatCC::GreaterThanOrEqual, s, sc.lo);
    let over = gen.b.ins().fcmp(FloatCC::GreaterThanOrEqual, s, sc.gt);
    let keep = match sc.kind {
        Kind::ScanZero => {
            let mag = gen.b.ins().band(wv, gen.abs_mask);
            let bad = gen
                .b
                .ins()
                .icmp(IntCC::SignedGreaterThan, mag, sc.below_inf);
            Some(gen.b.ins().bor(ge, bad))
        }
        Kind::ScanZeroAll => Some(ge),
        _ => None,
    };
    if let Some(keep) = keep {
        let nw = gen.b.ins().band(wv, keep);
        gen.b.ins().store(vmf(), nw, wa, gen.off);
    }
    (ge, over)
}

/// After four groups of a scan: stores their `ge` and `over` bits (16 each, as `u16` number
/// `quad` of the iteration's bits at byte `at`).
fn scan_quad(gen: &mut Gen, sc: &Scan, m: &[(Value, Value)], at: Value, quad: i32) {
    for (base, pick) in [(sc.ge, 0), (sc.over, 1)] {
        let v: Vec<Value> = m
            .iter()
            .map(|x| if pick == 0 { x.0 } else { x.1 })
            .collect();
        let a = gen.b.ins().snarrow(v[0], v[1]);
        let b = gen.b.ins().snarrow(v[2], v[3]);
        let c = gen.b.ins().snarrow(a, b);
        let bits = gen.b.ins().vhigh_bits(I32, c);
        let addr = gen.b.ins().iadd(base, at);
        gen.b.ins().istore16(mf(), bits, addr, 2 * quad);
    }
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
        let at_end = gen.b.ins().icmp(IntCC::Equal, nc, cols);
        let z = gen.ic(I64, 0);
        let nc = gen.b.ins().select(at_end, z, nc);
        let inc = gen.b.ins().uextend(I64, at_end);
        let nr = gen.b.ins().iadd(r, inc);
        gen.b.def_var(gen.col, nc);
        gen.b.def_var(gen.row, nr);
    }
}
