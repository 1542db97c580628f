//! The `prunec` command line: a thin layer over the library's entry points.

use clap::{Args, Parser, Subcommand, ValueEnum};
use prunec::driver::{self, SourceFile};
use prunec_lang::diag::Diagnostic;
use prunec_lang::Override;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit codes shared by every command.
mod exit {
    pub const OK: u8 = 0;
    pub const USER: u8 = 1;
    pub const INTERNAL: u8 = 3;
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Check(a) => cmd_check(a),
        Command::Fmt(a) => cmd_fmt(a),
        Command::Explain(a) => cmd_explain(a),
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
            Err((file, d)) => {
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
            Err((file, d)) => {
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
