//! Reproduces docs/llm.md's table: SmolLM2-135M perplexity after one-shot magnitude / Wanda / SparseGPT pruning.
//!
//! usage: cargo run --release -p prunec-runtime --example llm_table -- [--calib 32] [--calib-len 256]
//!        [--eval-tokens 16384] [--window 256] [--methods magnitude,wanda,sparsegpt]
//!        [--patterns 50%,2:4,4:8] [--seed 0] [--out FILE]
//! Calibration: `--calib` windows of `--calib-len` tokens from the State of the Union addresses
//! (seeded); evaluation: the first `--eval-tokens` tokens of Moby-Dick in `--window` windows.

use prunec_runtime::llm::{self, data, LayerPruner, OneShotConfig, SparsityPattern};
use std::time::Instant;

struct Args {
    calib: usize,
    calib_len: usize,
    eval_tokens: usize,
    window: usize,
    methods: Vec<String>,
    patterns: Vec<String>,
    seed: u64,
    out: Option<std::path::PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        calib: 32,
        calib_len: 256,
        eval_tokens: 16_384,
        window: 256,
        methods: vec!["magnitude".into(), "wanda".into(), "sparsegpt".into()],
        patterns: vec!["50%".into(), "2:4".into(), "4:8".into()],
        seed: 0,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: String| {
            v.parse::<usize>()
                .map_err(|_| format!("{flag}: `{v}` is not a count"))
        };
        match flag.as_str() {
            "--calib" => a.calib = num(value()?)?,
            "--calib-len" => a.calib_len = num(value()?)?,
            "--eval-tokens" => a.eval_tokens = num(value()?)?,
            "--window" => a.window = num(value()?)?,
            "--seed" => a.seed = num(value()?)? as u64,
            "--methods" => {
                a.methods = value()?
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            "--patterns" => a.patterns = value()?.split(',').map(str::to_string).collect(),
            "--out" => a.out = Some(value()?.into()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(a)
}

fn pruner(method: &str) -> Result<Box<dyn LayerPruner>, String> {
    Ok(match method {
        "magnitude" => Box::new(llm::MagnitudePruner),
        "wanda" => Box::new(llm::WandaPruner),
        "sparsegpt" => Box::new(llm::SparseGptPruner::default()),
        other => {
            return Err(format!(
                "unknown method `{other}` (magnitude, wanda, sparsegpt)"
            ))
        }
    })
}

fn main() {
    if let Err(e) = run() {
        eprintln!("llm_table: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let started = Instant::now();
    let t = Instant::now();
    let dense = llm::load_gguf(&data::smollm2_gguf()?)?;
    let tok = dense
        .tokenizer
        .clone()
        .ok_or("the GGUF file has no tokenizer")?;
    let load_s = t.elapsed().as_secs_f64();
    let text = data::read_text(&data::moby_dick()?)?;
    let eval = llm::leading_tokens(&tok, &text, args.eval_tokens)?;
    let calib = llm::calibration_windows(
        &tok,
        &data::sotu_files()?,
        args.calib,
        args.calib_len,
        args.seed,
    )?;
    let threads = rayon::current_num_threads();
    eprintln!(
        "loaded in {load_s:.1}s; {} eval tokens, {} x {} calibration tokens, {threads} threads",
        eval.len(),
        calib.len(),
        args.calib_len
    );

    let t = Instant::now();
    let dense_ppl = llm::perplexity(&dense, &eval, args.window, 4)?;
    let dense_eval_s = t.elapsed().as_secs_f64();
    eprintln!("dense: ppl {dense_ppl:.2} (eval {dense_eval_s:.1}s)");

    let mut rows: Vec<Row> = Vec::new();
    for pattern_text in &args.patterns {
        let pattern = SparsityPattern::parse(pattern_text)?;
        for method in &args.methods {
            let mut model = dense.clone();
            let mut p = pruner(method)?;
            let report =
                llm::prune_one_shot(&mut model, &calib, &OneShotConfig::new(pattern), p.as_mut())?;
            let t = Instant::now();
            let ppl = llm::perplexity(&model, &eval, args.window, 4)?;
            let eval_s = t.elapsed().as_secs_f64();
            eprintln!(
                "{method} {pattern}: ppl {ppl:.2}, sparsity {:.4}, prune {:.1}s (calibration {:.1}s, solve {:.1}s), eval {eval_s:.1}s",
                report.sparsity(), report.total_seconds, report.calibration_seconds, report.solve_seconds
            );
            rows.push((pattern, method.clone(), ppl, report));
            if let Some(out) = &args.out {
                let partial = render(
                    &args,
                    calib.len(),
                    eval.len(),
                    threads,
                    dense_ppl,
                    &rows,
                    "\n(partial: run in progress)\n",
                );
                llm::hf::write_atomic(out, partial.as_bytes())?;
            }
        }
    }

    let footer = format!(
        "\nModel load {load_s:.1} s; one evaluation {dense_eval_s:.1} s; whole run {:.0} s.\n",
        started.elapsed().as_secs_f64()
    );
    let md = render(
        &args,
        calib.len(),
        eval.len(),
        threads,
        dense_ppl,
        &rows,
        &footer,
    );
    print!("{md}");
    if let Some(out) = &args.out {
        llm::hf::write_atomic(out, md.as_bytes())?;
    }
    Ok(())
}

fn render(
    args: &Args,
    calib: usize,
    eval: usize,
    threads: usize,
    dense_ppl: f64,
    rows: &[Row],
    footer: &str,
) -> String {
    let mut md = String::new();
    md.push_str(&format!(
        "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to f32); calibration {calib} x {} tokens of State of the Union addresses (seed {}); perplexity on the first {eval} tokens of Moby-Dick in {}-token windows; {threads} threads.\n\n",
        args.calib_len, args.seed, args.window
    ));
    md.push_str("| method | pattern | sparsity | perplexity | prune time (s) | of which calibration (s) | of which solve (s) |\n|---|---|---|---|---|---|---|\n");
    md.push_str(&format!("| dense | - | 0 | {dense_ppl:.2} | - | - | - |\n"));
    for (pattern, method, ppl, r) in rows {
        md.push_str(&format!(
            "| {method} | {pattern} | {:.4} | {ppl:.2} | {:.1} | {:.1} | {:.1} |\n",
            r.sparsity(),
            r.total_seconds,
            r.calibration_seconds,
            r.solve_seconds
        ));
    }
    md.push_str(footer);
    md
}

type Row = (SparsityPattern, String, f64, llm::PruneReport);
