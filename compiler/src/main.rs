//! The `prunec` command line: a thin layer over the library's entry points.

use clap::{Args, Parser, Subcommand, ValueEnum};
use prunec::driver::{self, SourceFile};
use prunec::exec::sweep::{SweepArg, SweepOutcome, Variant};
use prunec_lang::diag::Diagnostic;
use prunec_lang::Override;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit codes shared by every command.
mod exit {
    pub const OK: u8 = 0;
    pub const USER: u8 = 1;
    pub const ASSERT: u8 = 2;
    pub const INTERNAL: u8 = 3;
    pub const INTERRUPTED: u8 = 130;
}

#[derive(clap::Parser)]
#[command(name = "prunec", version, about = "A compiler for neural-network pruning recipes", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and check recipes without running anything; exit 1 with every diagnostic.
    Check(CheckArgs),
    /// Format recipes canonically (in place, or `--check` to only report).
    Fmt(FmtArgs),
    /// Describe a built-in: its parameters, types, defaults and ranges.
    Explain(ExplainArgs),
    /// Check and run a recipe: writes the model(s), report.json, report.md, plots and prune.lock.
    Run(RunArgs),
    /// Check the outputs beside a prune.lock against its hashes, then re-run the recipe and compare again.
    Verify(VerifyArgs),
    /// Print the pipeline IR as Graphviz DOT.
    Graph(GraphArgs),
    /// Print the resolved plan (per-layer targets, counts, data read) from file headers only.
    Plan(PlanArgs),
    /// Benchmarks, each against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Fused score+select+mask kernels vs. streaming bandwidth and a candle op chain.
    Kernels(BenchKernelsArgs),
    /// Classifier training (samples/s) next to PyTorch on the same data, same run.
    Train(BenchTrainArgs),
    /// SmolLM2 perplexity and whole-model Wanda 2:4 (tokens/s) next to PyTorch, same run.
    Llm(BenchLlmArgs),
}

/// Where the PyTorch side comes from and where the results go.
#[derive(Args)]
struct BenchTorchArgs {
    /// Python with torch for the PyTorch side (default: $PRUNEC_BENCH_PYTHON, else
    /// .venv-bench/bin/python made by scripts/bench-venv.sh; none: prunec only).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Skip the PyTorch side.
    #[arg(long)]
    no_torch: bool,
    /// Append the dated results to this Markdown log (e.g. docs/benchmarks/bench.md).
    #[arg(long)]
    record: Option<PathBuf>,
    /// Print JSON instead of a Markdown table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchTrainArgs {
    /// Models, comma-separated: lenet300, lenet5, digit_cnn.
    #[arg(long, default_value = "lenet300,lenet5", value_delimiter = ',')]
    models: Vec<String>,
    /// MNIST training samples in the timed epoch.
    #[arg(long, default_value_t = 60_000)]
    samples: usize,
    #[arg(long, default_value_t = 128)]
    batch: usize,
    #[command(flatten)]
    torch: BenchTorchArgs,
}

#[derive(Args)]
struct BenchLlmArgs {
    /// Evaluation windows (Moby-Dick).
    #[arg(long, default_value_t = 16)]
    eval_windows: usize,
    /// Calibration windows (State of the Union).
    #[arg(long, default_value_t = 32)]
    calib_windows: usize,
    /// Tokens per window.
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Windows per forward.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[command(flatten)]
    torch: BenchTorchArgs,
}

#[derive(Args)]
struct BenchKernelsArgs {
    /// Total parameters per case (spread over several tensors); repeatable.
    #[arg(long = "params", default_values_t = [10_000_000usize, 100_000_000])]
    params: Vec<usize>,
    /// Print JSON instead of a Markdown table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum IrStage {
    /// As lowered from the checked recipe.
    Lowered,
    /// After constant folding, CSE, fusion and dead-node elimination.
    Optimized,
}

#[derive(Args)]
struct GraphArgs {
    /// The recipe.
    file: PathBuf,
    /// Which IR to print.
    #[arg(long, value_enum, default_value = "optimized")]
    stage: IrStage,
    /// Override a param: `--set target=0.95` (repeatable).
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<Override>,
}

#[derive(Args)]
struct PlanArgs {
    /// The recipe.
    file: PathBuf,
    /// Override a param: `--set target=0.95` (repeatable).
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<Override>,
    /// Print the steps as JSON (id, kind, model, line, each_round), the ids
    /// `report.json` names executed steps by.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RunArgs {
    /// The recipe.
    file: PathBuf,
    /// Override a param: `--set target=0.95` (repeatable).
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<Override>,
    /// Run one variant per value (`--sweep target=50%,70%,90%`; several make
    /// a grid): the work the variants share runs once, each variant's outputs
    /// go to `OUT/<variant>/`, and `OUT/sweep.md` compares them.
    #[arg(long = "sweep", value_name = "NAME=V1,V2,...")]
    sweep: Vec<SweepArg>,
    /// Output folder (default: `out/<recipe name>`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// No progress bars or per-stage lines.
    #[arg(long, short)]
    quiet: bool,
    /// Also write the token windows each language-model stage calibrates on
    /// to `OUT/calibration/<data set>.safetensors` (`input_ids`, i64
    /// `[samples, seq]`), to give another tool the same calibration.
    #[arg(long)]
    save_calibration: bool,
}

#[derive(Args)]
struct VerifyArgs {
    /// A `prune.lock` written by `prunec run`.
    lock: PathBuf,
    /// Check the re-run only, not the files beside the lock: for a lock kept
    /// without its outputs (the locks checked into `locks/`).
    #[arg(long)]
    rerun_only: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// Rendered for people, like rustc.
    Human,
    /// One JSON object per line: file, line, column, end, code, message, help.
    Json,
}

#[derive(Args)]
struct CheckArgs {
    /// Recipe files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Override a param: `--set target=0.95` (repeatable).
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<Override>,
    /// Output format of diagnostics.
    #[arg(long, value_enum, default_value = "human")]
    format: Format,
}

#[derive(Args)]
struct FmtArgs {
    /// Recipe files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Only report files that are not formatted; exit 1 if any.
    #[arg(long)]
    check: bool,
    /// Print the formatted text to stdout instead of rewriting the files.
    #[arg(long, conflicts_with = "check")]
    stdout: bool,
}

#[derive(Args)]
struct ExplainArgs {
    /// A built-in name, e.g. `mlp`, `iterative`, `wanda`, `keep_min`.
    #[arg(required_unless_present = "all")]
    name: Option<String>,
    /// List every built-in.
    #[arg(long)]
    all: bool,
}

/// Keeps freed buffers of up to 32 MB in the process instead of returning
/// them to the kernel: the training and forward loops free and allocate
/// the same activation sizes every step, and a fresh mapping costs a page
/// fault and a page of zeroing per 4 KB touched.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation thresholds; called
    // before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    // A command-line mistake is a user error (exit 1; clap's own 2 would
    // read as a failed assert); `--help` and `--version` exit 0.
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USER } else { exit::OK });
        }
    };
    let code = match cli.command {
        Command::Check(a) => cmd_check(a),
        Command::Fmt(a) => cmd_fmt(a),
        Command::Explain(a) => cmd_explain(a),
        Command::Run(a) => cmd_run(a),
        Command::Verify(a) => cmd_verify(a),
        Command::Graph(a) => cmd_graph(a),
        Command::Plan(a) => cmd_plan(a),
        Command::Bench(BenchCommand::Kernels(a)) => cmd_bench_kernels(a),
        Command::Bench(BenchCommand::Train(a)) => {
            let opts = prunec::bench::TrainBench {
                models: a.models.clone(),
                samples: a.samples.max(1),
                batch: a.batch.max(1),
            };
            cmd_bench(&a.torch, |t| prunec::bench::bench_train(&opts, t))
        }
        Command::Bench(BenchCommand::Llm(a)) => {
            let opts = prunec::bench::LlmBench {
                eval_windows: a.eval_windows.max(1),
                calib_windows: a.calib_windows.max(1),
                seq: a.seq.max(2),
                batch: a.batch.max(1),
            };
            cmd_bench(&a.torch, |t| prunec::bench::bench_llm(&opts, t))
        }
    };
    ExitCode::from(code)
}

fn color() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

fn report(file: &SourceFile, diags: &[Diagnostic], format: Format) {
    match format {
        Format::Human => {
            let text = driver::render(file, diags, color());
            let _ = std::io::stderr().write_all(text.as_bytes());
        }
        Format::Json => {
            let _ = std::io::stdout().write_all(driver::render_json(file, diags).as_bytes());
        }
    }
}

fn cmd_check(a: CheckArgs) -> u8 {
    let mut worst = exit::OK;
    for path in a.files {
        let file = match driver::read_source(&path) {
            Ok(f) => f,
            Err(bad) => {
                let (file, d) = *bad;
                report(&file, &[d], a.format);
                worst = worst.max(exit::USER);
                continue;
            }
        };
        let overrides = a.set.clone();
        let checked = match driver::on_big_stack(move || {
            let c = driver::source_to_checked(file, &overrides);
            (c.file, c.result.err())
        }) {
            Ok(c) => c,
            Err(panic) => {
                eprintln!("internal error while checking {}: {panic}", path.display());
                return exit::INTERNAL;
            }
        };
        match checked {
            (file, Some(diags)) => {
                report(&file, &diags, a.format);
                if matches!(a.format, Format::Human) {
                    let n = diags.len();
                    eprintln!("{}: {n} error{}", file.name, if n == 1 { "" } else { "s" });
                }
                worst = worst.max(exit::USER);
            }
            (file, None) => {
                if matches!(a.format, Format::Human) {
                    eprintln!("{}: ok", file.name);
                }
            }
        }
    }
    worst
}

fn cmd_fmt(a: FmtArgs) -> u8 {
    let mut worst = exit::OK;
    for path in a.files {
        let file = match driver::read_source(&path) {
            Ok(f) => f,
            Err(bad) => {
                let (file, d) = *bad;
                report(&file, &[d], Format::Human);
                worst = worst.max(exit::USER);
                continue;
            }
        };
        let result = driver::on_big_stack(move || {
            let parsed = prunec_lang::source_to_ast(&file.text);
            let out = parsed
                .errors
                .is_empty()
                .then(|| prunec_lang::fmt::ast_to_source(&parsed.recipe, &file.text));
            (file, parsed.errors, out)
        });
        let (file, errors, formatted) = match result {
            Ok(r) => r,
            Err(panic) => {
                eprintln!(
                    "internal error while formatting {}: {panic}",
                    path.display()
                );
                return exit::INTERNAL;
            }
        };
        let Some(formatted) = formatted else {
            report(&file, &errors, Format::Human);
            eprintln!("{}: not formatted (fix the syntax errors first)", file.name);
            worst = worst.max(exit::USER);
            continue;
        };
        if a.stdout {
            print!("{formatted}");
        } else if formatted != file.text {
            if a.check {
                println!("{}: would reformat", file.name);
                worst = worst.max(exit::USER);
            } else if let Err(e) = prunec::io::write_atomic(&path, formatted.as_bytes()) {
                eprintln!("error: cannot write {}: {e}", path.display());
                worst = worst.max(exit::USER);
            } else {
                eprintln!("{}: formatted", file.name);
            }
        }
    }
    worst
}

fn cmd_explain(a: ExplainArgs) -> u8 {
    if a.all {
        for b in prunec_lang::builtins::BUILTINS {
            println!("{:<16} {}", b.name, b.kind.noun());
        }
        return exit::OK;
    }
    let name = a.name.unwrap_or_default();
    match prunec_lang::builtins::explain(&name) {
        Some(text) => {
            print!("{text}");
            exit::OK
        }
        None => {
            let names = prunec_lang::builtins::BUILTINS.iter().map(|b| b.name);
            let hint = prunec_lang::diag::did_you_mean(&name, names)
                .unwrap_or_else(|| "`prunec explain --all` lists them".into());
            eprintln!("error: `{name}` is not a built-in; {hint}");
            exit::USER
        }
    }
}

/// Reads and checks a recipe for `run`; diagnostics are printed here.
fn checked_recipe(
    path: &std::path::Path,
    set: &[Override],
) -> Result<(SourceFile, prunec_lang::CheckedRecipe), u8> {
    let file = match driver::read_source(path) {
        Ok(f) => f,
        Err(bad) => {
            let (file, d) = *bad;
            report(&file, &[d], Format::Human);
            return Err(exit::USER);
        }
    };
    let overrides = set.to_vec();
    match driver::on_big_stack(move || {
        let c = driver::source_to_checked(file, &overrides);
        (c.file, c.result)
    }) {
        Ok((file, Ok(recipe))) => Ok((file, recipe)),
        Ok((file, Err(diags))) => {
            report(&file, &diags, Format::Human);
            eprintln!(
                "{}: {} error{}; nothing was run",
                file.name,
                diags.len(),
                if diags.len() == 1 { "" } else { "s" }
            );
            Err(exit::USER)
        }
        Err(panic) => {
            eprintln!("internal error while checking {}: {panic}", path.display());
            Err(exit::INTERNAL)
        }
    }
}

fn run_recipe(
    file: &SourceFile,
    recipe: &prunec_lang::CheckedRecipe,
    path: &std::path::Path,
    out: PathBuf,
    quiet: bool,
    save_calibration: bool,
) -> Result<prunec::exec::RunOutcome, u8> {
    let opts = prunec::exec::RunOptions {
        out_dir: out,
        progress: !quiet,
        save_calibration,
    };
    prunec::exec::run(recipe, path, &file.text, &opts).map_err(|e| run_error(file, e))
}

/// Prints why a run stopped; its exit code.
fn run_error(file: &SourceFile, e: prunec::error::RunError) -> u8 {
    match e {
        prunec::error::RunError::User {
            span,
            message,
            help,
        } => {
            let mut d = Diagnostic::new(prunec_lang::Code::StageClause, message.clone());
            match span {
                Some(s) => {
                    d = d.with_label(s, "while running this");
                    if let Some(h) = help {
                        d = d.with_help(h);
                    }
                    eprint!("{}", driver::render_run_error(file, &d, color()));
                }
                None => {
                    eprintln!("error: {message}");
                    if let Some(h) = help {
                        eprintln!("  help: {h}");
                    }
                }
            }
            eprintln!("{}: the run stopped; no output was written", file.name);
            exit::USER
        }
        prunec::error::RunError::Interrupted => {
            eprintln!("interrupted: no output was written");
            exit::INTERRUPTED
        }
        prunec::error::RunError::Internal(m) => {
            eprintln!("internal error: {m}");
            exit::INTERNAL
        }
        prunec::error::RunError::Assert { .. } => {
            unreachable!("asserts end the run with outputs")
        }
    }
}

/// Checks every variant of a sweep, runs them together into `out` and
/// writes the comparison and the sweep's lock; diagnostics are printed here.
fn run_sweep(
    path: &std::path::Path,
    set: &[Override],
    sweep: &[SweepArg],
    out: Option<PathBuf>,
    quiet: bool,
    save_calibration: bool,
) -> Result<(SourceFile, PathBuf, Vec<String>, SweepOutcome), u8> {
    for a in sweep {
        if set.iter().any(|o| o.name == a.name) {
            eprintln!(
                "error: `{}` is both set (`--set`) and swept (`--sweep`); give it one way",
                a.name
            );
            return Err(exit::USER);
        }
    }
    let grid = prunec::exec::sweep::sweep_grid(sweep).map_err(|m| {
        eprintln!("error: {m}");
        exit::USER
    })?;
    let mut checked = Vec::with_capacity(grid.len());
    for (name, values) in &grid {
        let mut overrides = set.to_vec();
        overrides.extend(values.iter().map(|(k, v)| Override {
            name: k.clone(),
            value: v.clone(),
        }));
        match checked_recipe(path, &overrides) {
            Ok(x) => checked.push(x),
            Err(code) => {
                eprintln!("(in the sweep's variant {name})");
                return Err(code);
            }
        }
    }
    let file = checked[0].0.clone();
    let recipe_name = checked[0].1.name.clone();
    let out = out.unwrap_or_else(|| PathBuf::from("out").join(recipe_name));
    let variants: Vec<Variant<'_>> = grid
        .iter()
        .zip(&checked)
        .map(|((name, values), (_, recipe))| Variant {
            name: name.clone(),
            values: values.clone(),
            recipe,
        })
        .collect();
    let spec = prunec::report::SweepSpec {
        swept: sweep
            .iter()
            .map(|a| (a.name.clone(), a.values.clone()))
            .collect(),
        set: set
            .iter()
            .map(|o| (o.name.clone(), o.value.clone()))
            .collect(),
    };
    let opts = prunec::exec::RunOptions {
        out_dir: out.clone(),
        progress: !quiet,
        save_calibration,
    };
    let write = |dir: &std::path::Path, o: &SweepOutcome| {
        let rows: Vec<prunec::report::SweepRow<'_>> = variants
            .iter()
            .zip(&o.variants)
            .map(|(v, r)| prunec::report::SweepRow {
                name: &v.name,
                values: &v.values,
                report: &r.report,
            })
            .collect();
        prunec::report::write_sweep(dir, &spec, &rows, &o.steps)
    };
    match prunec::exec::run_sweep(&variants, path, &file.text, &opts, &write) {
        Ok(o) => Ok((file, out, grid.into_iter().map(|(n, _)| n).collect(), o)),
        Err(e) => Err(run_error(&file, e)),
    }
}

/// `--save-calibration` on a run where no language-model stage calibrated.
const NO_CALIBRATION: &str = "note: --save-calibration wrote nothing: no language-model stage of this run calibrates on text";

fn cmd_run_sweep(a: RunArgs) -> u8 {
    let (file, out, names, outcome) = match run_sweep(
        &a.file,
        &a.set,
        &a.sweep,
        a.out,
        a.quiet,
        a.save_calibration,
    ) {
        Ok(x) => x,
        Err(code) => return code,
    };
    if !a.quiet {
        eprintln!(
            "wrote {} ({} variants in their folders; sweep.md, sweep.svg, sweep.json and prune.lock)",
            out.display(),
            outcome.variants.len()
        );
    }
    if a.save_calibration
        && outcome
            .variants
            .iter()
            .all(|v| v.saved_calibrations.is_empty())
    {
        eprintln!("{NO_CALIBRATION}");
    }
    let mut code = exit::OK;
    for (name, v) in names.iter().zip(&outcome.variants) {
        if let Some((span, message)) = &v.failed_assert {
            let d = Diagnostic::new(prunec_lang::Code::StageClause, message.clone())
                .with_label(*span, "this assertion does not hold");
            eprintln!("in the variant {name}:");
            eprint!("{}", driver::render_run_error(&file, &d, color()));
            code = exit::ASSERT;
        }
    }
    code
}

fn cmd_run(a: RunArgs) -> u8 {
    if !a.sweep.is_empty() {
        return cmd_run_sweep(a);
    }
    let (file, recipe) = match checked_recipe(&a.file, &a.set) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let out = a
        .out
        .unwrap_or_else(|| PathBuf::from("out").join(&recipe.name));
    let outcome = match run_recipe(
        &file,
        &recipe,
        &a.file,
        out.clone(),
        a.quiet,
        a.save_calibration,
    ) {
        Ok(o) => o,
        Err(code) => return code,
    };
    if !a.quiet {
        eprintln!(
            "wrote {} (report.json, report.md, prune.lock and {} more file(s))",
            out.display(),
            outcome.report.outputs.len()
        );
    }
    if a.save_calibration && outcome.saved_calibrations.is_empty() {
        eprintln!("{NO_CALIBRATION}");
    }
    if let Some((span, message)) = outcome.failed_assert {
        let d = Diagnostic::new(prunec_lang::Code::StageClause, message)
            .with_label(span, "this assertion does not hold");
        eprint!("{}", driver::render_run_error(&file, &d, color()));
        return exit::ASSERT;
    }
    exit::OK
}

fn cmd_verify(a: VerifyArgs) -> u8 {
    let fail = |m: String| {
        eprintln!("error: {m}");
        exit::USER
    };
    let text = match std::fs::read_to_string(&a.lock) {
        Ok(t) => t,
        Err(e) => return fail(format!("cannot read {}: {e}", a.lock.display())),
    };
    let lock: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => return fail(format!("{} is not a prune.lock: {e}", a.lock.display())),
    };
    if !a.rerun_only {
        if let Err(m) = check_outputs_beside(&a.lock, &lock) {
            eprintln!("verify: {m}");
            return exit::USER;
        }
    }
    let recipe_path = PathBuf::from(lock["recipe"]["path"].as_str().unwrap_or(""));
    let recipe_hash = lock["recipe"]["sha256"].as_str().unwrap_or("");
    match std::fs::read(&recipe_path) {
        Ok(bytes) => {
            use sha2::Digest;
            let h: String = sha2::Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            if h != recipe_hash {
                return fail(format!(
                    "the recipe {} changed since the lock was written",
                    recipe_path.display()
                ));
            }
        }
        Err(e) => {
            return fail(format!(
                "cannot read the recipe {}: {e}",
                recipe_path.display()
            ))
        }
    }
    for input in lock["inputs"].as_array().into_iter().flatten() {
        let p = PathBuf::from(input["path"].as_str().unwrap_or(""));
        match prunec_runtime::io::sha256_file(&p) {
            Ok(h) if Some(h.as_str()) == input["sha256"].as_str() => {}
            Ok(_) => {
                return fail(format!(
                    "the input {} changed since the lock was written",
                    p.display()
                ))
            }
            Err(e) => return fail(format!("input {}: {e}", p.display())),
        }
    }
    let set: Vec<Override> = lock["params_text"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| {
            v.as_str().map(|v| Override {
                name: k.clone(),
                value: v.to_string(),
            })
        })
        .collect();
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => return fail(format!("cannot create a temporary folder: {e}")),
    };
    let fresh: std::collections::BTreeMap<String, String> = match lock.get("sweep") {
        Some(sweep) => {
            // A sweep's lock: replay every variant, then compare what the
            // re-run's own lock lists.
            let sweep: Vec<SweepArg> = sweep
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| SweepArg {
                    name: e["param"].as_str().unwrap_or("").to_string(),
                    values: e["values"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect(),
                })
                .collect();
            if let Err(code) = run_sweep(
                &recipe_path,
                &set,
                &sweep,
                Some(dir.path().to_path_buf()),
                true,
                false,
            ) {
                return code;
            }
            let relock: serde_json::Value =
                match std::fs::read_to_string(dir.path().join("prune.lock"))
                    .map_err(|e| e.to_string())
                    .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
                {
                    Ok(v) => v,
                    Err(e) => return fail(format!("cannot read the re-run's lock: {e}")),
                };
            relock["outputs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|o| {
                    (
                        o["path"].as_str().unwrap_or("").to_string(),
                        o["sha256"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        }
        None => {
            let (file, recipe) = match checked_recipe(&recipe_path, &set) {
                Ok(x) => x,
                Err(code) => return code,
            };
            match run_recipe(
                &file,
                &recipe,
                &recipe_path,
                dir.path().to_path_buf(),
                true,
                false,
            ) {
                Ok(o) => o.report.outputs.into_iter().collect(),
                Err(code) => return code,
            }
        }
    };
    for out in lock["outputs"].as_array().into_iter().flatten() {
        let p = out["path"].as_str().unwrap_or("");
        let expected = out["sha256"].as_str().unwrap_or("");
        match fresh.get(p).map(String::as_str) {
            Some(h) if h == expected => {}
            Some(h) => {
                eprintln!(
                    "verify: the re-run's {p} differs from the lock: expected sha256 {}…, found {}…",
                    sha_prefix(expected),
                    sha_prefix(h)
                );
                eprintln!("{}", mismatch_context(&lock));
                return exit::USER;
            }
            None => {
                eprintln!("verify: the re-run wrote no {p}, which the lock lists");
                return exit::USER;
            }
        }
    }
    eprintln!(
        "verify: all {} outputs match {}, {}",
        fresh.len(),
        a.lock.display(),
        if a.rerun_only {
            "in a re-run"
        } else {
            "both the files beside it and a re-run"
        }
    );
    exit::OK
}

/// What explains a re-run that differs from its lock: which prunec and
/// which summation contract made the lock, which run here, and on which
/// instruction set.
fn mismatch_context(lock: &serde_json::Value) -> String {
    let made = |k: &str| lock[k].as_str().unwrap_or("not recorded").to_string();
    let numerics = made("numerics");
    let mut m = format!(
        "  the lock: prunec {}, numerics {numerics}; this run: prunec {}, numerics {}, products on {:?}",
        made("prunec_version"),
        env!("CARGO_PKG_VERSION"),
        prunec_runtime::gemm::NUMERICS,
        prunec_runtime::gemm::isa(),
    );
    if numerics != prunec_runtime::gemm::NUMERICS {
        m.push_str("\n  help: the lock was made under another summation contract: re-make it with this prunec");
    } else {
        m.push_str("\n  help: the same contract gives the same bytes on every instruction set (try PRUNEC_KERNEL_AVX2=1 or PRUNEC_KERNEL_SCALAR=1); a difference means the recipe's code path or an input changed");
    }
    m
}

/// The first 16 characters of a hash, for messages.
fn sha_prefix(h: &str) -> String {
    h.chars().take(16).collect()
}

/// Checks that every output the lock lists is in the lock's folder with its
/// locked sha256; the message names the first that is missing or differs.
fn check_outputs_beside(
    lock_path: &std::path::Path,
    lock: &serde_json::Value,
) -> Result<(), String> {
    let dir = match lock_path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    for out in lock["outputs"].as_array().into_iter().flatten() {
        let rel = std::path::Path::new(out["path"].as_str().unwrap_or(""));
        let expected = out["sha256"].as_str().unwrap_or("");
        if rel.as_os_str().is_empty()
            || rel.is_absolute()
            || rel
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(format!(
                "the lock lists an output `{}` that is not a path inside its folder",
                rel.display()
            ));
        }
        let path = dir.join(rel);
        if !path.is_file() {
            return Err(format!(
                "{} is missing beside the lock (expected sha256 {}…)",
                path.display(),
                sha_prefix(expected)
            ));
        }
        match prunec_runtime::io::sha256_file(&path) {
            Ok(h) if h == expected => {}
            Ok(h) => {
                return Err(format!(
                    "{} differs from the lock: expected sha256 {}…, found {}…",
                    path.display(),
                    sha_prefix(expected),
                    sha_prefix(&h)
                ))
            }
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    Ok(())
}

fn optimized_ir(
    recipe: &prunec_lang::CheckedRecipe,
    file: &SourceFile,
    optimize: bool,
) -> Result<prunec::ir::Ir, u8> {
    let mut ir = prunec::ir::checked_to_ir(recipe, &file.text);
    if optimize {
        if let Err(e) = prunec::ir::passes::optimize(&mut ir, recipe) {
            eprintln!("internal error: {e}");
            return Err(exit::INTERNAL);
        }
    }
    Ok(ir)
}

fn cmd_graph(a: GraphArgs) -> u8 {
    let (file, recipe) = match checked_recipe(&a.file, &a.set) {
        Ok(x) => x,
        Err(code) => return code,
    };
    match optimized_ir(&recipe, &file, matches!(a.stage, IrStage::Optimized)) {
        Ok(ir) => {
            print!("{}", ir.to_dot(&recipe.name));
            exit::OK
        }
        Err(code) => code,
    }
}

fn cmd_plan(a: PlanArgs) -> u8 {
    let (file, recipe) = match checked_recipe(&a.file, &a.set) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let ir = match optimized_ir(&recipe, &file, true) {
        Ok(ir) => ir,
        Err(code) => return code,
    };
    let plan = match prunec::plan::ir_to_plan(&ir, &recipe) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("internal error: {e}");
            return exit::INTERNAL;
        }
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&plan.to_json(&recipe)).unwrap_or_default()
        );
        return exit::OK;
    }
    match prunec::plan::render(&recipe, &plan) {
        Ok(text) => {
            print!("{text}");
            exit::OK
        }
        Err(prunec::error::RunError::User {
            span,
            message,
            help,
        }) => {
            let mut d = Diagnostic::new(prunec_lang::Code::StageClause, message.clone());
            if let Some(s) = span {
                d = d.with_label(s, "here");
            }
            if let Some(h) = help {
                d = d.with_help(h);
            }
            eprint!("{}", driver::render_run_error(&file, &d, color()));
            exit::USER
        }
        Err(e) => {
            eprintln!("internal error: {e:?}");
            exit::INTERNAL
        }
    }
}

fn cmd_bench(
    a: &BenchTorchArgs,
    run: impl FnOnce(Option<&prunec::bench::Torch>) -> Result<prunec::bench::Bench, String>,
) -> u8 {
    let torch = if a.no_torch {
        None
    } else {
        prunec::bench::find_python(a.python.clone()).map(|python| prunec::bench::Torch {
            python,
            script: prunec::bench::torch_script(),
            threads: rayon::current_num_threads(),
        })
    };
    let bench = match run(torch.as_ref()) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USER;
        }
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&bench).unwrap_or_default()
        );
    } else {
        print!("{}", prunec::bench::table(&bench));
    }
    if let Some(log) = &a.record {
        let command: Vec<String> = std::env::args().skip(1).collect();
        if let Err(e) = prunec::bench::record(&bench, log, &format!("prunec {}", command.join(" ")))
        {
            eprintln!("error: cannot append to {}: {e}", log.display());
            return exit::USER;
        }
    }
    exit::OK
}

fn cmd_bench_kernels(a: BenchKernelsArgs) -> u8 {
    match prunec_kernels::bench_kernels(&a.params, a.json) {
        Ok(v) => {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!("{}", prunec_kernels::bench_table(&v));
            }
            exit::OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit::USER
        }
    }
}
