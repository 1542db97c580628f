//! The kernel benchmark, as `prunec bench kernels` runs it: JIT pruning throughput against
//! streaming bandwidth and a candle op chain (see [`prunec_kernels::bench`]).
//!
//! `cargo bench -p prunec-kernels [-- --params N]... [--json]`: without `--params`, the
//! CLI's default sizes (10M and 100M parameters per case); `--json` prints the JSON report
//! instead of the Markdown table. Other arguments (cargo passes `--bench`) are ignored.

use std::process::ExitCode;

use prunec_kernels::{bench_kernels, bench_table};

/// `prunec bench kernels`'s default sizes.
const DEFAULT_PARAMS: [usize; 2] = [10_000_000, 100_000_000];

fn main() -> ExitCode {
    let mut params = Vec::new();
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json = true,
            "--params" => match args.next().map(|n| n.replace('_', "").parse()) {
                Some(Ok(n)) => params.push(n),
                _ => {
                    eprintln!("error: --params needs a number of parameters");
                    return ExitCode::FAILURE;
                }
            },
            _ => {}
        }
    }
    if params.is_empty() {
        params.extend(DEFAULT_PARAMS);
    }
    match bench_kernels(&params, json) {
        Ok(v) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!("{}", bench_table(&v));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
