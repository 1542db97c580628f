//! `prunec bench train` and `prunec bench llm`: prunec's training and
//! language-model throughput next to the same work in PyTorch, measured in
//! the same run by `scripts/bench_torch.py` when a Python with `torch` is at
//! hand, and the ratio of the two.

use prunec_runtime::llm::{self, SparsityPattern};
use prunec_runtime::{
    train, DatasetKind, DatasetSpec, Masks, ModelSpec, NoHooks, OptimizerSpec, Split, TrainConfig,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// One measured case: prunec's time, PyTorch's when it ran.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Case {
    pub name: String,
    /// What the items are (`samples`, `tokens`).
    pub unit: &'static str,
    pub items: usize,
    pub prunec_seconds: f64,
    pub torch_seconds: Option<f64>,
    /// A check printed beside the timing (e.g. both perplexities).
    pub note: String,
}

impl Case {
    /// prunec's rate over PyTorch's (above 1: prunec is faster).
    pub fn ratio(&self) -> Option<f64> {
        self.torch_seconds.map(|t| t / self.prunec_seconds)
    }
}

/// The PyTorch side: which Python runs the script, and what it said about itself.
#[derive(Debug, Clone)]
pub struct Torch {
    pub python: PathBuf,
    pub script: PathBuf,
    pub threads: usize,
}

/// A bench run's results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Bench {
    pub what: String,
    pub threads: usize,
    pub cpu: String,
    /// `torch` version, or why PyTorch did not run.
    pub torch: String,
    pub cases: Vec<Case>,
}

/// Where to find a Python with torch: `--python`, `$PRUNEC_BENCH_PYTHON`,
/// else the virtual environment `scripts/bench-venv.sh` makes.
pub fn find_python(explicit: Option<PathBuf>) -> Option<PathBuf> {
    explicit
        .or_else(|| std::env::var_os("PRUNEC_BENCH_PYTHON").map(PathBuf::from))
        .or_else(|| {
            let venv = workspace().join(".venv-bench/bin/python");
            venv.exists().then_some(venv)
        })
}

/// The script run on the PyTorch side.
pub fn torch_script() -> PathBuf {
    workspace().join("scripts/bench_torch.py")
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// The CPU's model name (for the log).
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Runs the PyTorch script and returns its JSON lines (the first says which torch ran).
fn run_torch(torch: &Torch, args: &[String]) -> Result<Vec<serde_json::Value>, String> {
    let out = Command::new(&torch.python)
        .arg(&torch.script)
        .arg("--threads")
        .arg(torch.threads.to_string())
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", torch.python.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty());
        return Err(format!(
            "{} {} failed: {}",
            torch.python.display(),
            torch.script.display(),
            last.unwrap_or("no message")
        ));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).map_err(|e| format!("bad line from the script: {e}")))
        .collect()
}

fn torch_version(lines: &[serde_json::Value]) -> String {
    lines
        .iter()
        .find(|v| v["case"] == "torch")
        .map(|v| {
            format!(
                "torch {} ({} threads)",
                v["version"].as_str().unwrap_or("?"),
                v["threads"]
            )
        })
        .unwrap_or_else(|| "torch ?".into())
}

fn torch_case<'a>(lines: &'a [serde_json::Value], name: &str) -> Option<&'a serde_json::Value> {
    lines.iter().find(|v| v["case"] == name)
}

/// The classifiers `bench train` knows, by the names the script uses.
pub const TRAIN_MODELS: [&str; 3] = ["lenet300", "lenet5", "digit_cnn"];

/// Options of `bench train`.
#[derive(Debug, Clone)]
pub struct TrainBench {
    pub models: Vec<String>,
    pub samples: usize,
    pub batch: usize,
}

/// One epoch of SGD with momentum on MNIST for each model, prunec then PyTorch.
pub fn bench_train(opts: &TrainBench, torch: Option<&Torch>) -> Result<Bench, String> {
    let (lr, momentum, decay) = (0.05, 0.9, 1e-4);
    let data = DatasetSpec::new(DatasetKind::Mnist, Split::Train)
        .limit(opts.samples)
        .batch_size(opts.batch)
        .shuffled(0)
        .load(&candle_core::Device::Cpu)
        .map_err(|e| e.to_string())?;
    let mut cases = Vec::new();
    for name in &opts.models {
        let spec = match name.as_str() {
            "lenet300" => ModelSpec::lenet_300_100(),
            "lenet5" => ModelSpec::lenet5(),
            "digit_cnn" => ModelSpec::pretrained_cnn(),
            other => {
                return Err(format!(
                    "unknown model `{other}` (one of {})",
                    TRAIN_MODELS.join(", ")
                ))
            }
        };
        let mut model = spec
            .build(0, &candle_core::Device::Cpu)
            .map_err(|e| e.to_string())?;
        let sgd = OptimizerSpec::sgd(lr, momentum, decay);
        let masks = Masks::new();
        // A short warm-up (buffers, thread pool), then the timed epoch.
        train(
            &mut model,
            &data,
            &TrainConfig::new(1, sgd.clone()).max_steps(4),
            &masks,
            &mut NoHooks,
        )
        .map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let report = train(
            &mut model,
            &data,
            &TrainConfig::new(1, sgd),
            &masks,
            &mut NoHooks,
        )
        .map_err(|e| e.to_string())?;
        cases.push(Case {
            name: format!("{name} training, MNIST, batch {}", opts.batch),
            unit: "samples",
            items: data.len(),
            prunec_seconds: t0.elapsed().as_secs_f64(),
            torch_seconds: None,
            note: format!(
                "mean loss {:.3}",
                report.epoch_losses.last().copied().unwrap_or(f64::NAN)
            ),
        });
    }
    let mut torch_line = "not run (no Python with torch: scripts/bench-venv.sh)".to_string();
    if let Some(t) = torch {
        let mnist = prunec_runtime::paths::data_dir().join("mnist");
        let lines = run_torch(
            t,
            &[
                "train".into(),
                "--mnist".into(),
                mnist.display().to_string(),
                "--models".into(),
                opts.models.join(","),
                "--samples".into(),
                opts.samples.to_string(),
                "--batch".into(),
                opts.batch.to_string(),
                "--lr".into(),
                lr.to_string(),
                "--momentum".into(),
                momentum.to_string(),
                "--weight-decay".into(),
                decay.to_string(),
            ],
        )?;
        torch_line = torch_version(&lines);
        for (case, name) in cases.iter_mut().zip(&opts.models) {
            if let Some(v) = torch_case(&lines, name) {
                case.torch_seconds = v["seconds"].as_f64();
                if let Some(l) = v["loss"].as_f64() {
                    case.note.push_str(&format!(" (torch {l:.3})"));
                }
            }
        }
    }
    Ok(Bench {
        what: "train".into(),
        threads: rayon::current_num_threads(),
        cpu: cpu_name(),
        torch: torch_line,
        cases,
    })
}

/// Options of `bench llm`.
#[derive(Debug, Clone)]
pub struct LlmBench {
    /// Evaluation windows of `seq` tokens (Moby-Dick).
    pub eval_windows: usize,
    /// Calibration windows of `seq` tokens (State of the Union).
    pub calib_windows: usize,
    pub seq: usize,
    /// Sequences per forward.
    pub batch: usize,
}

/// SmolLM2-135M: perplexity over the evaluation windows, then whole-model
/// sequential Wanda 2:4 on the calibration windows; prunec then PyTorch on the
/// same dequantized weights and the same token ids.
pub fn bench_llm(opts: &LlmBench, torch: Option<&Torch>) -> Result<Bench, String> {
    let err = |e: llm::RuntimeError| e.to_string();
    let dense = llm::load_gguf(&llm::data::smollm2_gguf().map_err(err)?).map_err(err)?;
    let tok = dense
        .tokenizer
        .clone()
        .ok_or("the GGUF file has no tokenizer")?;
    let text = llm::data::read_text(&llm::data::moby_dick().map_err(err)?).map_err(err)?;
    let tokens = llm::leading_tokens(&tok, &text, opts.eval_windows * opts.seq).map_err(err)?;
    let calib = llm::calibration_windows(
        &tok,
        &llm::data::sotu_files().map_err(err)?,
        opts.calib_windows,
        opts.seq,
        0,
    )
    .map_err(err)?;
    let eval_tokens = tokens.len() / opts.seq * opts.seq;
    let pattern = SparsityPattern::NofM { n: 2, m: 4 };

    // Warm-up on one window, then the timed runs.
    llm::perplexity(&dense, &tokens[..opts.seq], opts.seq, 1).map_err(err)?;
    let t0 = Instant::now();
    let ppl = llm::perplexity(&dense, &tokens, opts.seq, opts.batch).map_err(err)?;
    let eval_s = t0.elapsed().as_secs_f64();
    let mut pruned = dense.clone();
    let mut config = llm::OneShotConfig::new(pattern);
    config.batch = opts.batch;
    let t0 = Instant::now();
    let report =
        llm::prune_one_shot(&mut pruned, &calib, &config, &mut llm::WandaPruner).map_err(err)?;
    let wanda_s = t0.elapsed().as_secs_f64();
    let pruned_ppl = llm::perplexity(&pruned, &tokens, opts.seq, opts.batch).map_err(err)?;
    drop(pruned);

    let mut cases = vec![
        Case {
            name: format!(
                "SmolLM2-135M perplexity, {} x {} tokens",
                eval_tokens / opts.seq,
                opts.seq
            ),
            unit: "tokens",
            items: eval_tokens,
            prunec_seconds: eval_s,
            torch_seconds: None,
            note: format!("ppl {ppl:.3}"),
        },
        Case {
            name: format!(
                "SmolLM2-135M Wanda 2:4, whole model, {} x {} calibration tokens",
                calib.len(),
                opts.seq
            ),
            unit: "tokens",
            items: calib.len() * opts.seq,
            prunec_seconds: wanda_s,
            torch_seconds: None,
            note: format!(
                "forwards {:.1} s, masks {:.1} s; ppl after {pruned_ppl:.3}",
                report.calibration_seconds, report.solve_seconds
            ),
        },
    ];
    let mut torch_line = "not run (no Python with torch: scripts/bench-venv.sh)".to_string();
    if let Some(t) = torch {
        let dir = tempfile::tempdir().map_err(|e| format!("cannot make a temp folder: {e}"))?;
        llm::save_hf(&dense, dir.path()).map_err(err)?;
        drop(dense);
        let windows: Vec<&[u32]> = tokens.chunks_exact(opts.seq).collect();
        let ids = serde_json::json!({ "eval": windows, "calib": calib });
        let ids_path = dir.path().join("tokens.json");
        std::fs::write(&ids_path, ids.to_string())
            .map_err(|e| format!("cannot write {}: {e}", ids_path.display()))?;
        let lines = run_torch(
            t,
            &[
                "llm".into(),
                "--model".into(),
                dir.path().display().to_string(),
                "--tokens".into(),
                ids_path.display().to_string(),
                "--eval-batch".into(),
                opts.batch.to_string(),
                "--calib-batch".into(),
                opts.batch.to_string(),
                "--pattern".into(),
                "2:4".into(),
            ],
        )?;
        torch_line = torch_version(&lines);
        for (case, key) in cases.iter_mut().zip(["perplexity", "wanda"]) {
            if let Some(v) = torch_case(&lines, key) {
                case.torch_seconds = v["seconds"].as_f64();
                if let Some(p) = v["perplexity"].as_f64() {
                    case.note.push_str(&format!(" (torch {p:.3})"));
                }
            }
        }
    }
    Ok(Bench {
        what: "llm".into(),
        threads: rayon::current_num_threads(),
        cpu: cpu_name(),
        torch: torch_line,
        cases,
    })
}

/// The results as a Markdown table.
pub fn table(b: &Bench) -> String {
    let mut s = format!(
        "prunec bench {} — {}, {} threads; PyTorch: {}\n\n",
        b.what, b.cpu, b.threads, b.torch
    );
    s.push_str("| work | prunec | PyTorch | prunec / PyTorch | check |\n|---|---|---|---|---|\n");
    for c in &b.cases {
        let rate = |secs: f64| format!("{:.0} {}/s ({secs:.2} s)", c.items as f64 / secs, c.unit);
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            c.name,
            rate(c.prunec_seconds),
            c.torch_seconds.map_or("—".into(), rate),
            c.ratio().map_or("—".into(), |r| format!("{r:.2}x")),
            c.note
        ));
    }
    s
}

/// Appends a dated entry (CPU, threads, command, table) to `log`.
pub fn record(b: &Bench, log: &Path, command: &str) -> std::io::Result<()> {
    use std::io::Write;
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    writeln!(f, "\n## {date}: `{command}`\n\n{}", table(b))
}
