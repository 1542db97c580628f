//! End-to-end runs of `prunec run` and `prunec verify` on real data: outputs,
//! report schema, determinism across thread counts, exit codes and faults.
//! Needs `scripts/fetch-data.sh digits mnist` (the tests say so when it is missing).

mod fixtures;

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

fn require_data(rel: &str, fetch: &str) {
    let p = root().join("data").join(rel);
    assert!(
        p.exists(),
        "missing {}: run `scripts/fetch-data.sh {fetch}` first",
        p.display()
    );
}

fn prunec(args: &[&str], envs: &[(&str, &str)]) -> (i32, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_prunec"));
    c.args(args).current_dir(root());
    for (k, v) in envs {
        c.env(k, v);
    }
    let out = c.output().expect("run prunec");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// `prunec run -q RECIPE --out OUT`: exit code and output.
fn run_into(recipe: &Path, out: &Path) -> (i32, String) {
    prunec(
        &[
            "run",
            "-q",
            recipe.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    )
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

const RECIPE: &str = "tests/recipes/run/digits_imp.prune";

#[test]
fn a_run_writes_its_outputs_and_verifies() {
    require_data("digits/digits.csv.gz", "digits");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (code, text) = prunec(&["run", RECIPE, "--out", out.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        files_in(&out),
        [
            "net.safetensors",
            "prune.lock",
            "report.json",
            "report.md",
            "rounds.svg",
            "sparsity.svg"
        ]
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    for key in [
        "prunec_version",
        "recipe",
        "seed",
        "params",
        "inputs",
        "evaluations",
        "rounds",
        "layers",
        "final",
        "outputs",
        "steps",
    ] {
        assert!(report.get(key).is_some(), "report.json lacks `{key}`");
    }
    assert_eq!(report["rounds"].as_array().unwrap().len(), 2);
    let sparsity = report["final"]["sparsity"].as_f64().unwrap();
    assert!((sparsity - 0.8).abs() < 1e-3, "final sparsity {sparsity}");
    // The guard: every pruned layer keeps at least 5%.
    for l in report["layers"].as_array().unwrap() {
        let kept = l["kept"].as_f64().unwrap() / l["total"].as_f64().unwrap();
        assert!(kept >= 0.05, "{l}");
    }
    let dense = report["evaluations"][0]["metrics"]["accuracy"]
        .as_f64()
        .unwrap();
    assert!(dense > 0.85, "dense accuracy {dense}");
    // The exported weights are exactly zero where pruned: 80% of the weights.
    let st = std::fs::read(out.join("net.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&st).unwrap();
    let (mut zeros, mut total) = (0usize, 0usize);
    for name in ["fc1.weight", "fc2.weight"] {
        let t = tensors.tensor(name).unwrap();
        for c in t.data().chunks_exact(4) {
            total += 1;
            zeros += (f32::from_le_bytes([c[0], c[1], c[2], c[3]]) == 0.0) as usize;
        }
    }
    assert_eq!(zeros, (total as f64 * 0.8).round() as usize);
    let lock = out.join("prune.lock");
    let (code, text) = prunec(&["verify", lock.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{text}");
    // An output beside the lock with one byte changed fails before any
    // re-run, naming the file and both hashes; a missing one fails too.
    let model = out.join("net.safetensors");
    let good = std::fs::read(&model).unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    std::fs::write(&model, &bad).unwrap();
    let (code, text) = prunec(&["verify", lock.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("net.safetensors differs from the lock: expected sha256 "),
        "{text}"
    );
    std::fs::remove_file(&model).unwrap();
    let (code, text) = prunec(&["verify", lock.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("net.safetensors is missing"), "{text}");
    std::fs::write(&model, &good).unwrap();
    let (code, text) = prunec(&["verify", lock.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{text}");
    // A lock whose output hash differs fails, naming the output.
    let tampered =
        std::fs::read_to_string(&lock)
            .unwrap()
            .replacen("\"sha256\": \"", "\"sha256\": \"00", 2);
    std::fs::write(&lock, tampered).unwrap();
    let (code, text) = prunec(&["verify", lock.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("net.safetensors") || text.contains("input"),
        "{text}"
    );
}

#[test]
fn a_run_removes_staging_folders_of_killed_runs_but_not_of_live_ones() {
    require_data("digits/digits.csv.gz", "digits");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // What a killed run leaves: a staging folder with a partial output.
    let stale = out.join(".prunec-staging-abc");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("net.safetensors"), "partial").unwrap();
    // A run still alive holds a lock on its staging folder.
    let live = out.join(".prunec-staging-live");
    std::fs::create_dir_all(&live).unwrap();
    std::fs::write(live.join("net.safetensors"), "in progress").unwrap();
    let held = std::fs::File::open(&live).unwrap();
    // SAFETY: `flock` on a descriptor this test owns.
    let r = unsafe {
        libc::flock(
            std::os::unix::io::AsRawFd::as_raw_fd(&held),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    // Unrelated entries, some with similar names.
    std::fs::create_dir_all(out.join("other")).unwrap();
    std::fs::write(out.join("other/file.txt"), "x").unwrap();
    std::fs::create_dir_all(out.join("prunec-staging-abc")).unwrap();
    std::fs::write(out.join(".prunec-staging-file"), "a file, not a folder").unwrap();
    std::fs::write(out.join("keep.txt"), "earlier output").unwrap();
    let (code, text) = run_into(&root().join(RECIPE), &out);
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        files_in(&out),
        [
            ".prunec-staging-file",
            ".prunec-staging-live",
            "keep.txt",
            "net.safetensors",
            "other",
            "prune.lock",
            "prunec-staging-abc",
            "report.json",
            "report.md",
            "rounds.svg",
            "sparsity.svg"
        ]
    );
    assert_eq!(
        std::fs::read_to_string(live.join("net.safetensors")).unwrap(),
        "in progress"
    );
    assert!(out.join("other/file.txt").exists());
    drop(held);
}

#[test]
fn outputs_are_identical_with_one_and_two_threads() {
    require_data("digits/digits.csv.gz", "digits");
    let dir = tempfile::tempdir().unwrap();
    // Iterative magnitude pruning; random, Wanda, movement (gradual),
    // late-rewinding and block pruning; OBS; data pruning by every score.
    for recipe in [
        RECIPE,
        "tests/recipes/run/digits_methods.prune",
        "tests/recipes/run/digits_obs.prune",
        "tests/recipes/run/digits_data_pruning.prune",
        "tests/recipes/run/digits_oracle.prune",
        "tests/recipes/run/digits_agreement.prune",
    ] {
        let mut hashes = Vec::new();
        for threads in ["1", "2"] {
            let out = dir
                .path()
                .join(format!("{}-{threads}", recipe.replace('/', "_")));
            let (code, text) = prunec(
                &["run", "-q", recipe, "--out", out.to_str().unwrap()],
                &[
                    ("RAYON_NUM_THREADS", threads),
                    ("CANDLE_NUM_THREADS", threads),
                ],
            );
            assert_eq!(code, 0, "{text}");
            hashes.push(std::fs::read_to_string(out.join("prune.lock")).unwrap());
        }
        assert_eq!(hashes[0], hashes[1], "{recipe}");
    }
}

#[test]
fn a_failed_assert_exits_2_with_the_values() {
    require_data("digits/digits.csv.gz", "digits");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (code, text) = prunec(
        &[
            "run",
            "-q",
            RECIPE,
            "--set",
            "floor=99.9%",
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("assertion failed") && text.contains("accuracy = 0."),
        "{text}"
    );
    // The stages after the assert did not run: no model was exported.
    assert!(!out.join("net.safetensors").exists());
}

#[test]
fn faults_are_clean_errors_and_leave_no_outputs() {
    require_data("digits/digits.csv.gz", "digits");
    let dir = tempfile::tempdir().unwrap();
    // Missing data file.
    let recipe = dir.path().join("missing.prune");
    let text = std::fs::read_to_string(root().join(RECIPE))
        .unwrap()
        .replace("data/digits/digits.csv.gz", "nowhere/digits/digits.csv.gz");
    std::fs::write(&recipe, text).unwrap();
    let out = dir.path().join("out_missing");
    let (code, text) = run_into(&recipe, &out);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("nowhere/digits/digits.csv.gz") && text.contains("scripts/fetch-"),
        "{text}"
    );
    assert!(files_in(&out).is_empty(), "{:?}", files_in(&out));
    // Corrupt (truncated) data file.
    let bad = dir.path().join("bad/digits");
    std::fs::create_dir_all(&bad).unwrap();
    let good = std::fs::read(root().join("data/digits/digits.csv.gz")).unwrap();
    std::fs::write(bad.join("digits.csv.gz"), &good[..good.len() / 2]).unwrap();
    let recipe = dir.path().join("corrupt.prune");
    let text = std::fs::read_to_string(root().join(RECIPE))
        .unwrap()
        .replace(
            "data/digits/digits.csv.gz",
            &bad.join("digits.csv.gz").display().to_string(),
        );
    std::fs::write(&recipe, text).unwrap();
    let out = dir.path().join("out_corrupt");
    let (code, text) = run_into(&recipe, &out);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("digits.csv.gz"), "{text}");
    assert!(files_in(&out).is_empty());
    // An output folder that cannot be created.
    let file = dir.path().join("a_file");
    std::fs::write(&file, "x").unwrap();
    let (code, text) = prunec(
        &[
            "run",
            "-q",
            RECIPE,
            "--out",
            file.join("sub").to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("output folder"), "{text}");
    // A recipe error is caught before any compute.
    let (code, text) = prunec(&["run", RECIPE, "--set", "target=1.5"], &[]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("P024") && text.contains("nothing was run"),
        "{text}"
    );
}

#[test]
fn lenet300_magnitude_reduced_keeps_accuracy_at_92_percent_sparsity() {
    require_data("mnist/train-images-idx3-ubyte", "mnist");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (code, text) = prunec(
        &[
            "run",
            "-q",
            "examples/lenet300_magnitude.prune",
            "--set",
            "epochs=1",
            "--set",
            "retrain=1",
            "--set",
            "final_epochs=1",
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{text}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let evals = report["evaluations"].as_array().unwrap();
    let dense = evals[0]["metrics"]["accuracy"].as_f64().unwrap();
    let last = evals.last().unwrap()["metrics"]["accuracy"]
        .as_f64()
        .unwrap();
    assert!(dense > 0.9, "dense {dense}");
    assert!(last >= dense - 0.003, "pruned {last} vs dense {dense}");
    assert!((report["final"]["sparsity"].as_f64().unwrap() - 0.92).abs() < 1e-3);
}

#[test]
fn global_mp_keepmin_reduced_guard_keeps_every_layer_at_its_minimum() {
    require_data("mnist/train-images-idx3-ubyte", "mnist");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (code, text) = prunec(
        &[
            "run",
            "-q",
            "examples/global_mp_keepmin.prune",
            "--set",
            "epochs=1",
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{text}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    // The two copies are declared and trained alike: one trains, the other
    // takes its weights.
    let trains: Vec<&serde_json::Value> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kind"] == "train")
        .collect();
    assert_eq!(trains.len(), 2);
    assert!(trains[0]["copied_from"].is_null(), "{}", trains[0]);
    assert_eq!(trains[1]["model"], "unguarded");
    assert_eq!(trains[1]["copied_from"], "guarded");
    let mut guard_binds = false;
    for l in report["layers"].as_array().unwrap() {
        if !l["name"].as_str().unwrap().ends_with(".weight") {
            continue;
        }
        let kept = l["kept"].as_f64().unwrap() / l["total"].as_f64().unwrap();
        if l["model"] == "guarded" {
            assert!(kept >= 0.015 - 1e-9, "{l}");
        } else if kept < 0.015 {
            guard_binds = true;
        }
    }
    assert!(
        guard_binds,
        "the unguarded run keeps every layer above 1.5%: the comparison shows nothing"
    );
    let labels: Vec<&str> = report["evaluations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["with_guard", "without_guard"]);
}

#[test]
fn nan_weights_stop_the_run_naming_the_tensor() {
    require_data("digits/digits.csv.gz", "digits");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (code, text) = prunec(&["run", "-q", RECIPE, "--out", out.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{text}");
    // Poison one weight of fc2 with NaN.
    let mut bytes = std::fs::read(out.join("net.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let start = header["fc2.weight"]["data_offsets"][0].as_u64().unwrap() as usize + 8 + n;
    bytes[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let model = dir.path().join("nan.safetensors");
    std::fs::write(&model, &bytes).unwrap();
    let recipe = dir.path().join("nan.prune");
    std::fs::write(
        &recipe,
        format!(
            "recipe nan {{ version = 1, seed = 1 }}\nuse std.magnitude\nmodel net = safetensors(\"{}\")\npipeline {{\n  prune net by magnitude to 50%\n  export net to \"x.safetensors\"\n}}\n",
            model.display()
        ),
    )
    .unwrap();
    let out2 = dir.path().join("out2");
    let (code, text) = run_into(&recipe, &out2);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("fc2.weight") && text.contains("NaN"),
        "{text}"
    );
    assert!(files_in(&out2).is_empty(), "{:?}", files_in(&out2));
    // The input model was not modified.
    assert_eq!(std::fs::read(&model).unwrap(), bytes);
    // With `allow_nonfinite = true` the NaN scores lowest and is pruned.
    let text = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace("to 50%", "to 50% (allow_nonfinite = true)");
    std::fs::write(&recipe, text).unwrap();
    let out3 = dir.path().join("out3");
    let (code, text) = run_into(&recipe, &out3);
    assert_eq!(code, 0, "{text}");
    let pruned = tensor_f32(&out3.join("x.safetensors"), "fc2.weight");
    assert_eq!(pruned[0], 0.0, "the NaN weight is pruned");
    assert!(pruned.iter().all(|v| v.is_finite()));
}

#[test]
fn channel_criteria_remove_whole_rows() {
    require_data("digits/digits.csv.gz", "digits");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (code, text) = prunec(
        &[
            "run",
            "-q",
            "tests/recipes/run/digits_channels.prune",
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{text}");
    let st = std::fs::read(out.join("net.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&st).unwrap();
    let t = tensors.tensor("fc1.weight").unwrap();
    let vals: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let rows: Vec<&[f32]> = vals.chunks(64).collect();
    let zero_rows = rows.iter().filter(|r| r.iter().all(|&v| v == 0.0)).count();
    let partial = rows
        .iter()
        .filter(|r| r.contains(&0.0) && !r.iter().all(|&v| v == 0.0))
        .count();
    assert_eq!(zero_rows, 32, "half of the 64 rows go");
    assert_eq!(partial, 0, "rows are kept or removed whole");
}

#[test]
fn llm_recipe_prunes_smollm2_with_the_compiled_wanda_criterion() {
    require_data("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2");
    require_data("text/moby-dick.txt", "text");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (code, text) = prunec(
        &[
            "run",
            "-q",
            "examples/llm_wanda_sparsegpt.prune",
            "--set",
            "calib_samples=2",
            "--set",
            "eval_samples=2",
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{text}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let evals = report["evaluations"].as_array().unwrap();
    let dense = evals[0]["metrics"]["perplexity"].as_f64().unwrap();
    let pruned = evals[1]["metrics"]["perplexity"].as_f64().unwrap();
    assert!(
        dense > 1.0 && dense < pruned,
        "dense {dense}, pruned {pruned}"
    );
    // 2:4 zeroes half of every block linear; a few dequantized weights were zero already.
    let sparsity = evals[1]["metrics"]["sparsity"].as_f64().unwrap();
    assert!((0.5..0.51).contains(&sparsity), "sparsity {sparsity}");
    for f in ["model.safetensors", "config.json", "tokenizer.json"] {
        assert!(out.join("model").join(f).is_file(), "{f} missing");
    }
}

/// Writes each recipe text to a file of a fresh folder and runs it (with
/// progress on stderr) into a folder of its own; expects success and returns
/// the folder and, per text, its output folder and log.
fn run_texts(texts: &[String]) -> (tempfile::TempDir, Vec<(PathBuf, String)>) {
    let dir = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let file = dir.path().join(format!("r{i}.prune"));
        std::fs::write(&file, text).unwrap();
        let out = dir.path().join(format!("out{i}"));
        let (code, log) = prunec(
            &[
                "run",
                file.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
            &[],
        );
        assert_eq!(code, 0, "{log}");
        runs.push((out, log));
    }
    (dir, runs)
}

/// Runs `prunec run -q` with `args` into a fresh folder; expects success and
/// returns the folder and the parsed report.
fn run_ok(args: &[&str]) -> (tempfile::TempDir, PathBuf, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut all = vec!["run", "-q"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--out", out.to_str().unwrap()]);
    let (code, text) = prunec(&all, &[]);
    assert_eq!(code, 0, "{text}");
    let report =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_steps_follow_the_plan(args, &report);
    (dir, out, report)
}

/// The steps a run executed (`report.json` `steps`, by id) are exactly those
/// `prunec plan --json` lists for the same recipe and `--set`s, in its
/// order: a round block's steps once per round, before their prune step.
fn assert_steps_follow_the_plan(args: &[&str], report: &serde_json::Value) {
    let mut plan_args = vec!["plan", "--json", args[0]];
    for pair in args[1..].windows(2) {
        if pair[0] == "--set" {
            plan_args.extend_from_slice(pair);
        }
    }
    let (code, text) = prunec(&plan_args, &[]);
    assert_eq!(code, 0, "{text}");
    let plan: serde_json::Value = serde_json::from_str(&text).unwrap();
    fn expand(step: &serde_json::Value, out: &mut Vec<String>) {
        let inner = step["each_round"].as_array().unwrap();
        let rounds = if inner.is_empty() {
            0
        } else {
            step["rounds"].as_u64().unwrap()
        };
        for _ in 0..rounds {
            inner.iter().for_each(|s| expand(s, out));
        }
        out.push(step["id"].as_str().unwrap().to_string());
    }
    let mut planned = Vec::new();
    plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .for_each(|s| expand(s, &mut planned));
    let executed: Vec<String> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert!(!executed.is_empty());
    assert_eq!(executed, planned, "{}", args[0]);
}

fn tensor_f32(file: &Path, name: &str) -> Vec<f32> {
    let st = std::fs::read(file).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&st).unwrap();
    tensors
        .tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The steps that copied a twin's state instead of training: (model, twin).
fn copied_steps(report: &serde_json::Value) -> Vec<(String, String)> {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| !s["copied_from"].is_null())
        .map(|s| {
            (
                s["model"].as_str().unwrap_or("?").to_string(),
                s["copied_from"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn evaluation(report: &serde_json::Value, label: &str, metric: &str) -> f64 {
    report["evaluations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["label"] == label)
        .unwrap_or_else(|| panic!("no evaluation `{label}`"))["metrics"][metric]
        .as_f64()
        .unwrap()
}

#[test]
fn random_wanda_movement_late_rewinding_and_blocks_run() {
    require_data("digits/digits.csv.gz", "digits");
    let (_dir, out, report) = run_ok(&["tests/recipes/run/digits_methods.prune"]);
    // The recipe's own asserts passed (exit 0); check what they cannot see.
    let layer_kept = |model: &str, name: &str| -> (u64, u64) {
        let l = report["layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["model"] == model && l["name"] == name)
            .unwrap();
        (l["kept"].as_u64().unwrap(), l["total"].as_u64().unwrap())
    };
    // Random, per layer: exactly half of every weight matrix.
    assert_eq!(layer_kept("rnd", "fc1.weight"), (2048, 4096));
    assert_eq!(layer_kept("rnd", "fc2.weight"), (320, 640));
    // Wanda per row: every row of fc1 keeps 32 of 64.
    let wan = tensor_f32(&out.join("random.safetensors"), "fc1.weight");
    assert_eq!(wan.len(), 4096);
    // Random pruning does not follow magnitude: some kept weight is smaller
    // than the largest pruned one would have to be for a magnitude cut, i.e.
    // the kept magnitudes are not all above a common threshold per layer.
    let mut kept: Vec<f32> = wan.iter().filter(|v| **v != 0.0).map(|v| v.abs()).collect();
    kept.sort_by(f32::total_cmp);
    assert!(
        kept[0] < 0.01,
        "smallest kept |w| {}: looks like a magnitude cut",
        kept[0]
    );
    // Blocks: fc1 of `blk` is zero or non-zero in whole 4x4 blocks, half of them.
    let blk = tensor_f32(&out.join("block.safetensors"), "fc1.weight");
    let (mut zero_blocks, mut mixed) = (0, 0);
    for br in 0..16 {
        for bc in 0..16 {
            let vals: Vec<f32> = (0..4)
                .flat_map(|r| (0..4).map(move |c| (br * 4 + r) * 64 + bc * 4 + c))
                .map(|i| blk[i])
                .collect();
            let zeros = vals.iter().filter(|v| **v == 0.0).count();
            if zeros == 16 {
                zero_blocks += 1;
            } else if zeros > 0 {
                mixed += 1;
            }
        }
    }
    assert_eq!((zero_blocks, mixed), (128, 0));
    // Movement pruned gradually: one round record per pruning step, the
    // sparsity never decreasing and ending at the target.
    let rounds = report["rounds"].as_array().unwrap();
    let steps: Vec<&serde_json::Value> = rounds
        .iter()
        .filter(|r| r["metrics"]["step"].is_number())
        .collect();
    assert_eq!(steps.len(), 15, "pruning steps at 0, 20, ..., 280 and 282");
    let sp: Vec<f64> = steps
        .iter()
        .map(|r| r["sparsity"].as_f64().unwrap())
        .collect();
    assert!(sp.windows(2).all(|w| w[1] >= w[0]), "{sp:?}");
    assert!((sp.last().unwrap() - 0.7).abs() < 1e-3, "{sp:?}");
    assert!((evaluation(&report, "movement", "sparsity") - 0.7).abs() < 1e-3);
    assert!((evaluation(&report, "rewound", "sparsity") - 0.6).abs() < 2e-3);
}

#[test]
fn agp_cubic_reduced_reaches_its_target_gradually() {
    require_data("mnist/train-images-idx3-ubyte", "mnist");
    let (_dir, out, report) = run_ok(&[
        "examples/agp_cubic.prune",
        "--set",
        "samples=6000",
        "--set",
        "epochs=7",
    ]);
    let rounds = report["rounds"].as_array().unwrap();
    // 47 batches per epoch, end = epoch 5 = step 235: steps 0, 50, ..., 200, 235.
    let steps: Vec<u64> = rounds
        .iter()
        .map(|r| r["metrics"]["step"].as_f64().unwrap() as u64)
        .collect();
    assert_eq!(steps, vec![0, 50, 100, 150, 200, 235]);
    let targets: Vec<f64> = rounds
        .iter()
        .map(|r| r["metrics"]["target_sparsity"].as_f64().unwrap())
        .collect();
    // Cubic: s_t = 0.9 * (1 - (1 - t / 235)^3).
    for (t, s) in steps.iter().zip(&targets) {
        let want = 0.9 * (1.0 - (1.0 - *t as f64 / 235.0).powi(3));
        assert!((s - want).abs() < 1e-9, "step {t}: {s} vs {want}");
    }
    let acc = evaluation(&report, "net on test", "accuracy");
    assert!(acc > 0.85, "accuracy {acc}");
    assert!((report["final"]["sparsity"].as_f64().unwrap() - 0.9).abs() < 1e-3);
    assert!(out.join("agp.svg").exists());
}

#[test]
fn sap_pqi_reduced_prunes_less_as_the_pq_index_falls() {
    require_data("mnist/train-images-idx3-ubyte", "mnist");
    let (_dir, out, report) = run_ok(&[
        "examples/sap_pqi.prune",
        "--set",
        "samples=3000",
        "--set",
        "rounds=3",
        "--set",
        "epochs=2",
        "--set",
        "retrain=1",
    ]);
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    let ratio: Vec<f64> = rounds
        .iter()
        .map(|r| r["metrics"]["prune_ratio"].as_f64().unwrap())
        .collect();
    let sparsity: Vec<f64> = rounds
        .iter()
        .map(|r| r["sparsity"].as_f64().unwrap())
        .collect();
    assert!(ratio.iter().all(|r| *r > 0.0 && *r <= 0.9), "{ratio:?}");
    assert!(sparsity.windows(2).all(|w| w[1] > w[0]), "{sparsity:?}");
    assert!(rounds.iter().all(|r| r["pqi"].as_f64().unwrap() > 0.0));
    assert!(out.join("sap.svg").exists());
}

#[test]
fn a_write_failure_mid_run_leaves_the_output_folder_as_it_was() {
    require_data("digits/digits.csv.gz", "digits");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "earlier output").unwrap();
    // A file-size limit makes the model export fail the way a full disk does
    // (the write returns an error); SIGXFSZ is ignored so the error reaches prunec.
    let script = format!(
        "trap '' XFSZ; ulimit -f 8; exec '{}' run -q {RECIPE} --out '{}'",
        env!("CARGO_BIN_EXE_prunec"),
        out.display()
    );
    let o = Command::new("sh")
        .args(["-c", &script])
        .current_dir(root())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains("export failed"), "{text}");
    assert!(text.contains("no output was written"), "{text}");
    assert_eq!(files_in(&out), vec!["keep.txt".to_string()]);
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "earlier output"
    );
}

#[test]
fn from_scratch_reduced_compares_finetuning_with_scratch_training() {
    require_data("mnist/train-images-idx3-ubyte", "mnist");
    let (_dir, out, report) = run_ok(&["examples/from_scratch.prune", "--set", "epochs=1"]);
    let finetuned = evaluation(&report, "finetuned", "accuracy");
    let scratch = evaluation(&report, "scratch", "accuracy");
    assert!(finetuned > 0.9 && scratch > 0.9, "{finetuned} {scratch}");
    // The scratch run kept the mask: the same 150 of 300 fc1 rows are gone.
    let w = tensor_f32(&out.join("net.safetensors"), "fc1.weight");
    let zero_rows = w
        .chunks(784)
        .filter(|r| r.iter().all(|&v| v == 0.0))
        .count();
    assert_eq!(zero_rows, 150);
}

#[test]
fn pretrained_cnn_24_reduced_is_two_four_sparse_after_finetuning() {
    require_data("mnist/train-images-idx3-ubyte", "mnist cnn");
    require_data("digit-recognizer/handwriting_model.pth", "cnn");
    let (_dir, out, report) =
        run_ok(&["examples/pretrained_cnn_24.prune", "--set", "samples=2000"]);
    let dense = evaluation(&report, "dense", "accuracy");
    assert!(dense > 0.98, "{dense}");
    let w = tensor_f32(&out.join("cnn.safetensors"), "fc_layers.0.weight");
    for group in w.chunks(4) {
        assert!(group.iter().filter(|v| **v == 0.0).count() >= 2);
    }
}

#[test]
fn lenet5_lottery_reduced_rewinds_to_init_each_round() {
    require_data("mnist/train-images-idx3-ubyte", "mnist");
    let (_dir, _out, report) = run_ok(&[
        "examples/lenet5_lottery.prune",
        "--set",
        "epochs=3",
        "--set",
        "rounds=2",
        "--set",
        "samples=8000",
    ]);
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    let sp: Vec<f64> = rounds
        .iter()
        .map(|r| r["sparsity"].as_f64().unwrap())
        .collect();
    assert!(sp[0] > 0.5 && (sp[1] - 0.8).abs() < 0.01, "{sp:?}");
    for r in rounds {
        assert!(r["metrics"]["accuracy"].as_f64().unwrap() > 0.8, "{r}");
    }
}

#[test]
fn a_truncated_model_file_is_reported_before_any_compute() {
    require_data("digits/digits.csv.gz", "digits");
    // A real model file first: the exported model of a small run.
    let (dir, out, _) = run_ok(&[RECIPE]);
    let good = std::fs::read(out.join("net.safetensors")).unwrap();
    let model = dir.path().join("model.safetensors");
    let recipe = dir.path().join("t.prune");
    std::fs::write(
        &recipe,
        format!(
            "recipe t {{ version = 1, seed = 0 }}\nuse std.magnitude\nmodel net = safetensors(\"{}\")\n\
             dataset test = digits(\"data/digits/digits.csv.gz\", split = \"test\", batch = 360)\n\
             pipeline {{\n  prune net by magnitude to 50%\n  evaluate net on test -> [accuracy]\n  export net to \"n.safetensors\"\n}}\n",
            model.display()
        ),
    )
    .unwrap();
    let run = |tag: &str| {
        let o = dir.path().join(tag);
        let (code, text) = prunec(
            &[
                "run",
                "-q",
                recipe.to_str().unwrap(),
                "--out",
                o.to_str().unwrap(),
            ],
            &[],
        );
        (code, text, o)
    };
    // The intact file runs and the pruned copy loses half its weights.
    std::fs::write(&model, &good).unwrap();
    let (code, text, o) = run("intact");
    assert_eq!(code, 0, "{text}");
    assert!(o.join("n.safetensors").exists());
    // Truncated: P060 naming the file, nothing run, no output folder content.
    std::fs::write(&model, &good[..good.len() / 3]).unwrap();
    let (code, text, o) = run("truncated");
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("P060")
            && text.contains("model.safetensors")
            && text.contains("nothing was run"),
        "{text}"
    );
    assert!(files_in(&o).is_empty());
    // The input is never modified.
    assert_eq!(std::fs::read(&model).unwrap(), &good[..good.len() / 3]);
}

#[test]
fn a_truncated_gguf_or_missing_text_is_a_check_error() {
    require_data("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2");
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("cut.gguf");
    let full = std::fs::read(root().join("data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    // The header is intact; the weights stop two thirds of the way in.
    std::fs::write(&model, &full[..full.len() * 2 / 3]).unwrap();
    let recipe = dir.path().join("t.prune");
    let text = dir.path().join("no-such-text");
    std::fs::write(
        &recipe,
        format!(
            "recipe t {{ version = 1, seed = 0 }}\nmodel lm = gguf(\"{}\")\n\
             dataset words = text(\"{}\", tokenizer = lm, seq = 32)\n\
             pipeline {{\n  evaluate lm on words -> [perplexity]\n}}\n",
            model.display(),
            text.display()
        ),
    )
    .unwrap();
    let (code, out) = prunec(&["check", recipe.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("P060") && out.contains("cut.gguf") && out.contains("truncated"),
        "{out}"
    );
    assert!(
        out.contains("P063") && out.contains("no-such-text"),
        "{out}"
    );
    // An empty folder holds no text either.
    std::fs::create_dir(&text).unwrap();
    let (code, out) = prunec(&["check", recipe.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("holds no .txt file"), "{out}");
}

#[test]
fn a_diverging_loss_stops_the_run_naming_the_stage() {
    require_data("digits/digits.csv.gz", "digits");
    let dir = tempfile::tempdir().unwrap();
    // A learning rate of 1e12 blows the loss up within a few steps.
    let recipe = dir.path().join("diverge.prune");
    std::fs::write(
        &recipe,
        "recipe d { version = 1, seed = 1 }\nmodel net = mlp(inputs = 64, hidden = [64], classes = 10)\n\
         dataset train = digits(\"data/digits/digits.csv.gz\", split = \"train\", batch = 32)\n\
         pipeline {\n  train net on train (epochs = 3, optimizer = sgd(lr = 1000000000000))\n  export net to \"x.safetensors\"\n}\n",
    )
    .unwrap();
    let out2 = dir.path().join("out2");
    let (code, text) = run_into(&recipe, &out2);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("diverged")
            && text.contains("train net on train")
            && text.contains("lower the learning rate"),
        "{text}"
    );
    assert!(files_in(&out2).is_empty(), "{:?}", files_in(&out2));
}

#[test]
fn rewinding_to_an_epoch_not_trained_yet_is_a_clear_error() {
    require_data("digits/digits.csv.gz", "digits");
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("rewind.prune");
    let write = |train: &str| {
        std::fs::write(
            &recipe,
            format!(
                "recipe r {{ version = 1, seed = 1 }}\nuse std.magnitude\nmodel net = mlp(inputs = 64, hidden = [64], classes = 10)\n\
                 dataset train = digits(\"data/digits/digits.csv.gz\", split = \"train\", batch = 32)\n\
                 pipeline {{\n  train net on train ({train})\n  prune net by magnitude to 50% (schedule = iterative(rounds = 2, rewind = epoch 2)) {{\n    each round: train net on train (epochs = 1)\n  }}\n  export net to \"x.safetensors\"\n}}\n"
            ),
        )
        .unwrap();
    };
    // Known epochs: `check` refuses it before any compute.
    write("epochs = 1");
    let out = dir.path().join("out");
    let (code, text) = run_into(&recipe, &out);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("P024")
            && text.contains("past the 1 epoch")
            && text.contains("nothing was run"),
        "{text}"
    );
    // `steps` (60 steps: one full epoch of 45 batches and part of another):
    // only the run can tell, and stops at the prune stage.
    write("steps = 60");
    let (code, text) = run_into(&recipe, &out);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("rewind = epoch 2") && text.contains("trained only 1"),
        "{text}"
    );
    assert!(files_in(&out).is_empty());
}

#[test]
fn a_gradual_schedule_longer_than_its_training_is_caught_by_check() {
    require_data("mnist/train-images-idx3-ubyte", "mnist");
    // 4 epochs of 469 batches end before the schedule's `end = epoch 5`.
    let (code, text) = prunec(
        &["check", "--set", "epochs=4", "examples/agp_cubic.prune"],
        &[],
    );
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("P024") && text.contains("step 2345") && text.contains("1876 steps"),
        "{text}"
    );
    // The data's `limit` shortens epochs, and the check follows it.
    let (code, text) = prunec(
        &[
            "check",
            "--set",
            "epochs=5",
            "--set",
            "samples=6000",
            "examples/agp_cubic.prune",
        ],
        &[],
    );
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("step 235") && text.contains("235 steps"),
        "{text}"
    );
    let (code, text) = prunec(&["check", "examples/agp_cubic.prune"], &[]);
    assert_eq!(code, 0, "{text}");
}

/// A model declared and trained like another takes its weights instead of
/// training again, and they are the weights its own training gives.
#[test]
fn a_twin_model_copies_the_training_it_shares_bit_for_bit() {
    require_data("digits/digits.csv.gz", "digits");
    let dir = tempfile::tempdir().unwrap();
    let head = "recipe twins { version = 1, seed = 5 }\n\
        model a = mlp(inputs = 64, hidden = [32], classes = 10)\n\
        model b = mlp(inputs = 64, hidden = [32], classes = 10)\n\
        dataset train = digits(\"data/digits/digits.csv.gz\", split = \"train\", batch = 32, shuffle = true)\n";
    let fit = |m: &str, epochs: u32| {
        format!("  train {m} on train (epochs = {epochs}, optimizer = sgd(lr = 0.05, momentum = 0.9))\n")
    };
    let cases = [
        // b's training is a's: copied.
        (
            "twin",
            format!(
                "{}{}  export b to \"b.safetensors\"\n",
                fit("a", 3),
                fit("b", 3)
            ),
            Some("a"),
        ),
        // b alone: trained.
        (
            "alone",
            format!("{}  export b to \"b.safetensors\"\n", fit("b", 3)),
            None,
        ),
        // b trains differently: trained, and its weights differ.
        (
            "other",
            format!(
                "{}{}  export b to \"b.safetensors\"\n",
                fit("a", 3),
                fit("b", 2)
            ),
            None,
        ),
    ];
    let mut hashes = Vec::new();
    for (name, pipeline, copied) in &cases {
        let recipe = dir.path().join(format!("{name}.prune"));
        std::fs::write(&recipe, format!("{head}pipeline {{\n{pipeline}}}\n")).unwrap();
        let out = dir.path().join(name);
        let (code, text) = run_into(&recipe, &out);
        assert_eq!(code, 0, "{name}: {text}");
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap())
                .unwrap();
        let last = report["steps"]
            .as_array()
            .unwrap()
            .iter()
            .rfind(|s| s["kind"] == "train")
            .unwrap()
            .clone();
        assert_eq!(last["copied_from"].as_str(), *copied, "{name}: {last}");
        hashes.push(std::fs::read(out.join("b.safetensors")).unwrap());
    }
    assert!(
        hashes[0] == hashes[1],
        "the copied weights differ from b's own training"
    );
    assert!(hashes[0] != hashes[2]);
}

#[test]
fn every_run_fixture_executes_exactly_the_steps_its_plan_lists() {
    require_data("digits/digits.csv.gz", "digits");
    let mut fixtures: Vec<PathBuf> = std::fs::read_dir(root().join("tests/recipes/run"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "prune"))
        .collect();
    fixtures.sort();
    assert!(fixtures.len() >= 4);
    for f in fixtures {
        let rel = f
            .strip_prefix(root())
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        // `run_ok` compares the executed steps with `prunec plan --json`.
        let (_dir, _out, report) = run_ok(&[&rel]);
        let kinds: Vec<&str> = report["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["kind"].as_str().unwrap())
            .collect();
        if rel.ends_with("digits_stats.prune") {
            // Taylor's gradients and Wanda's activation norms: a step each.
            assert_eq!(kinds.iter().filter(|k| **k == "statistics").count(), 2);
        }
    }
}

#[test]
fn layout_and_comments_do_not_change_what_a_run_writes() {
    require_data("digits/digits.csv.gz", "digits");
    // Random pruning draws from a generator salted by the stage: by its id,
    // not by where it sits in the file.
    let recipe = r#"recipe layout { version = 1, seed = 5 }
use std.random
model net = mlp(inputs = 64, hidden = [32], classes = 10)
dataset train = digits("data/digits/digits.csv.gz", split = "train", batch = 32)
pipeline {
  train net on train (epochs = 1, optimizer = sgd(lr = 0.05))
  prune net by random to 50% (scope = layer)
  export net to "net.safetensors"
}
"#;
    let moved = format!(
        "# The same recipe, moved down by a comment\n\n\n{}",
        recipe.replace("  prune", "\n      prune")
    );
    let (_dir, runs) = run_texts(&[recipe.to_string(), moved]);
    let hashes: Vec<Vec<u8>> = runs
        .iter()
        .map(|(out, _)| std::fs::read(out.join("net.safetensors")).unwrap())
        .collect();
    assert!(
        hashes[0] == hashes[1],
        "the moved recipe pruned other weights"
    );
}

#[test]
fn a_calibration_nothing_reads_is_dropped_and_reported() {
    require_data("digits/digits.csv.gz", "digits");
    // Magnitude reads no activations: the `calibrate` stage is dead. The
    // second model's Wanda reads the statistics of its `calibrate`: kept.
    let recipe = r#"recipe dead { version = 1, seed = 6 }
use std.{magnitude, wanda}
model a = mlp(inputs = 64, hidden = [32], classes = 10)
model b = mlp(inputs = 64, hidden = [16], classes = 10)
dataset train = digits("data/digits/digits.csv.gz", split = "train", batch = 32)
pipeline {
  train a on train (epochs = 1, optimizer = sgd(lr = 0.05))
  calibrate a on train
  prune a by magnitude to 50%
  calibrate b on train
  prune b by wanda to 50%
}
"#;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dead.prune");
    std::fs::write(&file, recipe).unwrap();
    let (code, text) = prunec(&["plan", file.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("2. [line 8] calibrate: no prune step reads the statistics"),
        "{text}"
    );
    let (_d, out, report) = run_ok(&[file.to_str().unwrap()]);
    let dropped = report["dropped"].as_array().unwrap();
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert_eq!(dropped[0]["id"], "2");
    assert_eq!(dropped[0]["kind"], "calibrate");
    let ran: Vec<(&str, &str)> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap(), s["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(
        ran,
        vec![
            ("1", "train"),
            ("3", "prune"),
            ("4", "calibrate"),
            ("5", "prune")
        ]
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("## Not run"), "{md}");
}

#[test]
fn a_language_model_prunes_with_one_global_threshold_under_guards() {
    require_data("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2");
    let (_dir, out, _report) = run_ok(&["tests/recipes/valid/llm_global_magnitude.prune"]);
    let bytes = std::fs::read(out.join("model/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (mut zeros, mut total, mut spread) = (0usize, 0usize, Vec::new());
    for (name, t) in st.tensors() {
        if !name.starts_with("model.layers.") || !name.ends_with("proj.weight") {
            continue;
        }
        let w: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let z = w.iter().filter(|x| **x == 0.0).count();
        let kept = 1.0 - z as f64 / w.len() as f64;
        assert!(kept >= 0.4 - 1e-6, "{name} keeps {kept}");
        spread.push(kept);
        zeros += z;
        total += w.len();
    }
    // One threshold over all 210 linears: 50% overall, unevenly spread.
    assert_eq!(spread.len(), 210);
    let sparsity = zeros as f64 / total as f64;
    assert!((0.5..0.505).contains(&sparsity), "sparsity {sparsity}");
    let (lo, hi) = spread
        .iter()
        .fold((1.0f64, 0.0f64), |(l, h), k| (l.min(*k), h.max(*k)));
    assert!(hi - lo > 0.05, "layers kept {lo}..{hi}: not a global cut");
}

#[test]
fn llm_table_reduced_ranks_the_calibrated_methods_above_magnitude() {
    require_data("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2");
    require_data("text/moby-dick.txt", "text");
    // One variant of the README's table sweep, on little text.
    let (_dir, _out, report) = run_ok(&[
        "examples/llm_table.prune",
        "--set",
        "target=2:4",
        "--set",
        "calib_samples=2",
        "--set",
        "eval_samples=1",
    ]);
    let ppl = |label: &str| evaluation(&report, label, "perplexity");
    let (dense, mag) = (ppl("dense"), ppl("magnitude"));
    assert!(dense < ppl("wanda") && dense < ppl("sparsegpt"), "{report}");
    assert!(ppl("wanda") < mag && ppl("sparsegpt") < mag, "{report}");
    for m in ["magnitude", "wanda", "sparsegpt"] {
        let s = evaluation(&report, m, "sparsity");
        assert!((0.5..0.51).contains(&s), "{m}: sparsity {s}");
    }
}

#[test]
fn a_prune_reuses_the_statistics_of_a_calibrate_stage_on_the_same_state() {
    require_data("digits/digits.csv.gz", "digits");
    // `calibrate net on train` and Wanda's `calibrate = train` read the same
    // model state and data: CSE merges them and the run calibrates once,
    // pruning exactly as the recipe without the `calibrate` stage does.
    let with = r#"recipe shared { version = 1, seed = 8 }
use std.wanda
model net = mlp(inputs = 64, hidden = [32], classes = 10)
dataset train = digits("data/digits/digits.csv.gz", split = "train", batch = 32)
pipeline {
  train net on train (epochs = 1, optimizer = sgd(lr = 0.05))
  calibrate net on train
  prune net by wanda to 50% (calibrate = train)
  export net to "net.safetensors"
}
"#;
    let without = with.replace("  calibrate net on train\n", "");
    let (dir, runs) = run_texts(&[with.to_string(), without]);
    let mut weights = Vec::new();
    for (out, log) in &runs {
        let passes = log.lines().filter(|l| l.starts_with("calibrate ")).count();
        assert_eq!(passes, 1, "{log}");
        weights.push(std::fs::read(out.join("net.safetensors")).unwrap());
    }
    assert!(weights[0] == weights[1]);
    let (code, plan) = prunec(
        &["plan", dir.path().join("r0.prune").to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 0, "{plan}");
    assert!(plan.contains("activation norms from step 2"), "{plan}");
}

#[test]
fn statistics_computed_for_one_step_are_read_by_no_other() {
    require_data("digits/digits.csv.gz", "digits");
    // `b` copies `a`'s training (twins); `a`'s Wanda norms on `train` are a
    // step of their own right after that training. `b`'s two-round Wanda
    // calibrates on one test sample itself (norms far from `train`'s) and
    // must prune as it does without `a`.
    let twins = r#"recipe twins { version = 1, seed = 9 }
use std.wanda
model a = mlp(inputs = 64, hidden = [32], classes = 10)
model b = mlp(inputs = 64, hidden = [32], classes = 10)
dataset train = digits("data/digits/digits.csv.gz", split = "train", batch = 32)
dataset one = digits("data/digits/digits.csv.gz", split = "test", batch = 1, limit = 1)
pipeline {
  train a on train (epochs = 1, optimizer = sgd(lr = 0.05))
  train b on train (epochs = 1, optimizer = sgd(lr = 0.05))
  prune a by wanda to 50% (calibrate = train)
  prune b by wanda to 50% (calibrate = one, schedule = iterative(rounds = 2))
  export b to "b.safetensors"
}
"#;
    let alone = twins
        .replace(
            "  train a on train (epochs = 1, optimizer = sgd(lr = 0.05))\n",
            "",
        )
        .replace("  prune a by wanda to 50% (calibrate = train)\n", "");
    let (_dir, runs) = run_texts(&[twins.to_string(), alone]);
    let b: Vec<Vec<u8>> = runs
        .iter()
        .map(|(out, _)| std::fs::read(out.join("b.safetensors")).unwrap())
        .collect();
    assert!(b[0] == b[1], "`b` pruned on statistics computed for `a`");
}

/// `prunec run -q RECIPE --out OUT` with `env`; expects success and returns `out`.
fn run_with_env(recipe: &Path, out: &Path, env: &[(&str, &str)]) -> PathBuf {
    let args = [
        "run",
        "-q",
        recipe.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let (code, text) = prunec(&args, env);
    assert_eq!(code, 0, "{text}");
    out.to_path_buf()
}

/// A language-model run gives the same bytes whichever vector width the
/// products run at (SparseGPT: calibration forwards, the f64 solver,
/// evaluation), once with the widest instruction set of this machine and
/// once with AVX2 forced (`PRUNEC_KERNEL_AVX2=1`). On a machine without AVX-512
/// both runs use AVX2; the unit tests of `prunec_runtime::gemm` compare
/// scalar, AVX2 and AVX-512 bit for bit on any machine that has them.
#[test]
fn language_model_runs_are_the_same_bytes_at_every_vector_width() {
    require_data("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2");
    require_data("text/moby-dick.txt", "text");
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("lm.prune");
    std::fs::write(
        &recipe,
        r#"recipe lm_widths { version = 1, seed = 0 }
use std.sparsegpt
model a = gguf("data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
dataset calib = text("data/text/sotu", tokenizer = a, seq = 32, samples = 2)
dataset heldout = text("data/text/moby-dick.txt", tokenizer = a, seq = 32, samples = 2)
pipeline {
  prune a by sparsegpt() to 50% (calibrate = calib)
  evaluate a on heldout -> [perplexity]
  export a to "a" (format = hf)
}
"#,
    )
    .unwrap();
    let run = |env: &[(&str, &str)], name: &str| {
        let out = run_with_env(&recipe, &dir.path().join(name), env);
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap())
                .unwrap();
        let ppl: Vec<f64> = report["evaluations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["metrics"]["perplexity"].as_f64().unwrap())
            .collect();
        let weights = std::fs::read(out.join("a").join("model.safetensors")).unwrap();
        (ppl, weights)
    };
    let (wide, wide_weights) = run(&[], "widest");
    let (avx2, avx2_weights) = run(&[("PRUNEC_KERNEL_AVX2", "1")], "avx2");
    assert_eq!(wide, avx2, "perplexities differ");
    assert!(wide_weights == avx2_weights, "pruned weights differ");
}

/// Training a fully connected classifier gives the same bytes whichever
/// vector width the products run at and with any thread count: the widest
/// instruction set of this machine, AVX2 forced, the scalar code forced, one
/// thread. Covers the native training step (SGD with momentum, Adam), the
/// loss gradients a Taylor criterion reads and the masked fine-tuning.
#[test]
fn classifier_training_is_the_same_bytes_at_every_vector_width() {
    require_data("digits/digits.csv.gz", "digits");
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("widths.prune");
    std::fs::write(
        &recipe,
        r#"recipe widths { version = 1, seed = 3 }
use std.taylor
model net = mlp(inputs = 64, hidden = [48, 32], classes = 10)
dataset train = digits("data/digits/digits.csv.gz", split = "train", batch = 32, shuffle = true)
pipeline {
  train net on train (epochs = 2, optimizer = sgd(lr = 0.05, momentum = 0.9, weight_decay = 0.0001))
  prune net by taylor on train to 70%
  finetune net on train (epochs = 1, optimizer = adam(lr = 0.001))
  export net to "net.safetensors"
}
"#,
    )
    .unwrap();
    let weights = |env: &[(&str, &str)], name: &str| {
        let out = run_with_env(&recipe, &dir.path().join(name), env);
        std::fs::read(out.join("net.safetensors")).unwrap()
    };
    let widest = weights(&[], "widest");
    for (env, what) in [
        (("PRUNEC_KERNEL_AVX2", "1"), "AVX2"),
        (("PRUNEC_KERNEL_SCALAR", "1"), "scalar"),
        (("RAYON_NUM_THREADS", "1"), "one thread"),
    ] {
        assert!(weights(&[env], what) == widest, "{what} differs");
    }
}

/// The locks checked into `locks/` (reduced runs made on the development
/// machine) verify by re-running here; a lock whose output hash was changed
/// does not.
#[test]
fn checked_in_locks_verify_by_rerunning() {
    require_data("mnist/train-images-idx3-ubyte", "mnist");
    require_data("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2");
    let mut locks: Vec<PathBuf> = std::fs::read_dir(root().join("locks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "lock"))
        .collect();
    locks.sort();
    assert_eq!(locks.len(), 3, "{locks:?}");
    for lock in &locks {
        let (code, text) = prunec(&["verify", "--rerun-only", lock.to_str().unwrap()], &[]);
        assert_eq!(code, 0, "{}: {text}", lock.display());
        assert!(text.contains("in a re-run"), "{text}");
    }
    // One output hash changed: the re-run no longer matches.
    let dir = tempfile::tempdir().unwrap();
    let tampered = dir.path().join("tampered.lock");
    let mut lock: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("locks/lenet300_magnitude.lock")).unwrap(),
    )
    .unwrap();
    lock["outputs"][0]["sha256"] = serde_json::Value::String("0".repeat(64));
    std::fs::write(&tampered, serde_json::to_string_pretty(&lock).unwrap()).unwrap();
    let (code, text) = prunec(&["verify", "--rerun-only", tampered.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("differs from the lock"), "{text}");
    // The message says what made the lock and what ran here.
    assert!(
        text.contains(&format!("numerics {}", prunec_runtime::gemm::NUMERICS))
            && text.contains("products on"),
        "{text}"
    );
    // Without `--rerun-only` the outputs must be beside the lock.
    let (code, text) = prunec(&["verify", tampered.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("missing beside the lock"), "{text}");
}

/// `prunec bench train` times prunec alone when told not to run PyTorch,
/// and says why when the Python it is given cannot run; an unknown model
/// is a user error.
#[test]
fn bench_train_reports_throughput_and_explains_a_missing_python() {
    let (code, text) = prunec(
        &[
            "bench",
            "train",
            "--no-torch",
            "--models",
            "lenet300",
            "--samples",
            "512",
        ],
        &[],
    );
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("| lenet300 training, MNIST, batch 128 |"),
        "{text}"
    );
    assert!(
        text.contains("samples/s") && text.contains("PyTorch: not run"),
        "{text}"
    );
    let (code, text) = prunec(
        &[
            "bench",
            "train",
            "--models",
            "lenet300",
            "--samples",
            "256",
            "--python",
            "/nonexistent/python",
        ],
        &[],
    );
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("cannot run /nonexistent/python"), "{text}");
    let (code, text) = prunec(
        &[
            "bench",
            "train",
            "--no-torch",
            "--models",
            "resnet",
            "--samples",
            "256",
        ],
        &[],
    );
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("unknown model `resnet`"), "{text}");
}

/// `dir/t.prune`: the perplexity of `ctor(model)` on the tiny test text.
fn perplexity_recipe(dir: &Path, ctor: &str, model: &Path) -> PathBuf {
    let recipe = dir.join("t.prune");
    std::fs::write(
        &recipe,
        format!(
            "recipe t {{ version = 1, seed = 0 }}\nmodel lm = {ctor}(\"{}\")\n\
             dataset words = text(\"{}\", tokenizer = lm, seq = 16)\n\
             pipeline {{\n  evaluate lm on words -> [perplexity]\n}}\n",
            model.display(),
            root().join("tests/models/tiny.txt").display()
        ),
    )
    .unwrap();
    recipe
}

#[test]
fn save_calibration_writes_the_token_windows_the_prune_stage_calibrated_on() {
    let set = "model_dir=\"tests/models/tiny-llama\"";
    let recipe = "tests/recipes/run/tiny_llm_hf.prune";
    let (_dir, out, _) = run_ok(&[recipe, "--set", set, "--save-calibration"]);
    let bytes = std::fs::read(out.join("calibration/calib.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("input_ids").unwrap();
    assert_eq!(format!("{:?}", t.dtype()), "I64");
    // `samples = 8` windows of `seq = 32` tokens.
    assert_eq!(t.shape(), [8, 32]);
    let ids: Vec<u32> = t
        .data()
        .chunks(8)
        .map(|b| u32::try_from(i64::from_le_bytes(b.try_into().unwrap())).unwrap())
        .collect();
    // Each window is a run of the text's tokens, and they are not all one.
    let model = prunec_runtime::llm::load_hf(&root().join("tests/models/tiny-llama")).unwrap();
    let text = std::fs::read_to_string(root().join("tests/models/tiny.txt")).unwrap();
    let tokens = model.tokenizer.unwrap().encode(&text).unwrap();
    let windows: Vec<&[u32]> = ids.chunks(32).collect();
    for w in &windows {
        assert!(
            tokens.windows(32).any(|t| t == *w),
            "{w:?} is not in the text"
        );
    }
    assert!(windows.iter().any(|w| *w != windows[0]));
    // The same run without the flag writes no calibration, and the same model.
    let (_dir2, plain, _) = run_ok(&[recipe, "--set", set]);
    assert!(!plain.join("calibration").exists());
    assert_eq!(
        std::fs::read(plain.join("model/model.safetensors")).unwrap(),
        std::fs::read(out.join("model/model.safetensors")).unwrap()
    );
    // A calibration of other windows (another seed) prunes differently:
    // these windows are the ones the stage read.
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("seed1.prune");
    let src = std::fs::read_to_string(root().join(recipe)).unwrap();
    std::fs::write(&other, src.replace("seed = 0", "seed = 1")).unwrap();
    let (_dir3, reseeded, _) =
        run_ok(&[other.to_str().unwrap(), "--set", set, "--save-calibration"]);
    assert_ne!(
        std::fs::read(reseeded.join("calibration/calib.safetensors")).unwrap(),
        bytes
    );
    // A run without language-model calibration says the flag wrote nothing.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (code, text) = prunec(
        &[
            "run",
            "-q",
            "--save-calibration",
            RECIPE,
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("--save-calibration wrote nothing"), "{text}");
    assert!(!out.join("calibration").exists());
}

#[test]
fn hf_checkpoints_of_four_architectures_prune_and_export_like_their_source() {
    for arch in ["llama", "mistral", "qwen2", "qwen3"] {
        let set = format!("model_dir=\"tests/models/tiny-{arch}\"");
        let (_dir, out, report) = run_ok(&["tests/recipes/run/tiny_llm_hf.prune", "--set", &set]);
        let sparsity = evaluation(&report, "pruned", "sparsity");
        assert!((sparsity - 0.5).abs() < 1e-9, "{arch}: {sparsity}");
        let model = out.join("model");
        let src = root().join(format!("tests/models/tiny-{arch}"));
        // The same weight files as the source (shards included), the
        // tokenizer carried over, the recipe and the lock inside.
        let weights = |d: &Path| -> Vec<String> {
            files_in(d)
                .into_iter()
                .filter(|f| f.starts_with("model") && f.contains(".safetensors"))
                .collect()
        };
        assert_eq!(weights(&src), weights(&model), "{arch}");
        for f in ["config.json", "tokenizer.json", "generation_config.json"] {
            assert!(model.join(f).is_file(), "{arch}: no {f}");
        }
        assert_eq!(
            std::fs::read_to_string(model.join("prune.lock")).unwrap(),
            std::fs::read_to_string(out.join("prune.lock")).unwrap()
        );
        assert_eq!(
            std::fs::read_to_string(model.join("recipe.prune")).unwrap(),
            std::fs::read_to_string(root().join("tests/recipes/run/tiny_llm_hf.prune")).unwrap()
        );
        // The source's dtype: the Qwen3 checkpoint is bf16.
        let dtype = if arch == "qwen3" { "BF16" } else { "F32" };
        for w in weights(&model)
            .iter()
            .filter(|w| w.ends_with(".safetensors"))
        {
            let bytes = std::fs::read(model.join(w)).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for (name, t) in st.tensors() {
                assert_eq!(format!("{:?}", t.dtype()), dtype, "{arch}: {name}");
            }
        }
        let exports = report["exports"].as_array().unwrap();
        assert_eq!(exports.len(), 1);
        let total: u64 = files_in(&model)
            .iter()
            .map(|f| std::fs::metadata(model.join(f)).unwrap().len())
            .sum::<u64>()
            - std::fs::metadata(model.join("prune.lock")).unwrap().len();
        assert_eq!(exports[0]["bytes"].as_u64(), Some(total), "{arch}");
        assert!(report["peak_memory_bytes"].as_u64().unwrap() > 1 << 20);
        let (code, text) = prunec(&["verify", out.join("prune.lock").to_str().unwrap()], &[]);
        assert_eq!(code, 0, "{arch}: {text}");
    }
}

#[test]
fn a_broken_hf_checkpoint_is_a_check_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    std::fs::create_dir(&model).unwrap();
    let src = root().join("tests/models/tiny-qwen3");
    for f in files_in(&src) {
        std::fs::copy(src.join(&f), model.join(&f)).unwrap();
    }
    let shard = model.join("model-00003-of-00004.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let recipe = perplexity_recipe(dir.path(), "hf", &model);
    let (code, out) = prunec(&["check", recipe.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("P060") && out.contains("model-00003-of-00004") && out.contains("truncated"),
        "{out}"
    );
    assert!(
        !out.contains("backtrace") && !out.contains("candle"),
        "{out}"
    );
    std::fs::remove_file(&shard).unwrap();
    let (code, out) = prunec(&["check", recipe.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("missing file") && out.contains("model-00003"),
        "{out}"
    );
    // An architecture prunec does not run is named.
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    std::fs::write(
        model.join("config.json"),
        config.replace("Qwen3ForCausalLM", "Qwen2MoeForCausalLM"),
    )
    .unwrap();
    let (code, out) = prunec(&["check", recipe.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("`Qwen2MoeForCausalLM` is not supported"),
        "{out}"
    );
    // A mixture-of-experts class without its routing fields is named too.
    std::fs::write(
        model.join("config.json"),
        config.replace("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
    )
    .unwrap();
    let (code, out) = prunec(&["check", recipe.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("P060") && out.contains("`num_local_experts`"),
        "{out}"
    );
}

#[test]
fn a_gguf_cut_inside_its_header_is_a_check_error_without_a_backtrace() {
    require_data("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2");
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("cut.gguf");
    let full = std::fs::read(root().join("data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    std::fs::write(&model, &full[..3000]).unwrap();
    let recipe = perplexity_recipe(dir.path(), "gguf", &model);
    // candle attaches a backtrace to its errors when RUST_BACKTRACE is set.
    let (code, out) = prunec(
        &["check", recipe.to_str().unwrap()],
        &[("RUST_BACKTRACE", "1")],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("P060") && out.contains("cut.gguf"), "{out}");
    assert!(
        !out.contains("candle-core") && !out.contains(".rs:") && !out.contains(" 0: "),
        "{out}"
    );
}

/// Runs a recipe text written into `dir` with the given thread count; the
/// output folder and the parsed report.
fn run_text_in(dir: &Path, tag: &str, text: &str, threads: &str) -> (PathBuf, serde_json::Value) {
    let recipe = dir.join(format!("{tag}.prune"));
    std::fs::write(&recipe, text).unwrap();
    let out = dir.join(format!("out-{tag}"));
    let (code, log) = prunec(
        &[
            "run",
            "-q",
            recipe.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[
            ("RAYON_NUM_THREADS", threads),
            ("CANDLE_NUM_THREADS", threads),
        ],
    );
    assert_eq!(code, 0, "{log}");
    let report =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    (out, report)
}

#[test]
fn an_image_folder_trains_and_evaluates_classifiers_the_same_at_any_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    // A folder named like no data set, with class folders `k0` .. `k9`.
    let folder = fixtures::image_folder(dir.path(), "scans", 1797);
    let recipe = format!(
        r#"recipe folder {{ version = 1, seed = 3 }}
use std.magnitude
model net = mlp(inputs = 64, hidden = [32], classes = 10)
model cnn = lenet5(classes = 10)
dataset train = images({p:?}, split = "train", test = 20%, color = gray, batch = 32, shuffle = true)
dataset test = images({p:?}, split = "test", test = 20%, color = gray, batch = 360)
dataset train28 = images({p:?}, split = "train", test = 20%, size = [28, 28], color = gray, mean = 0.1, std = 0.3, batch = 32, limit = 600)
dataset test28 = images({p:?}, split = "test", test = 20%, size = [28, 28], color = gray, mean = 0.1, std = 0.3, batch = 360)
pipeline {{
  train net on train (epochs = 10, optimizer = sgd(lr = 0.05, momentum = 0.9))
  prune net by magnitude to 50%
  evaluate net on test -> [accuracy, sparsity] as mlp
  train cnn on train28 (epochs = 6, optimizer = sgd(lr = 0.05, momentum = 0.9))
  evaluate cnn on test28 -> [accuracy] as conv
  export net to "net.safetensors"
}}
"#,
        p = folder.display().to_string()
    );
    let (out1, report) = run_text_in(dir.path(), "one", &recipe, "1");
    let (out2, _) = run_text_in(dir.path(), "two", &recipe, "2");
    // The same bytes with one and two threads (decoding, resizing, training).
    let outputs = |out: &Path| -> serde_json::Value {
        let lock = std::fs::read_to_string(out.join("prune.lock")).unwrap();
        serde_json::from_str::<serde_json::Value>(&lock).unwrap()["outputs"].take()
    };
    let (a, b) = (outputs(&out1), outputs(&out2));
    assert!(a == b, "outputs differ: {a} vs {b}");
    let accuracy = evaluation(&report, "mlp", "accuracy");
    assert!(accuracy > 0.85, "mlp accuracy {accuracy}");
    let cnn = evaluation(&report, "conv", "accuracy");
    assert!(cnn > 0.6, "lenet5 accuracy {cnn}");
    // The classes are the sorted folder names, recorded in the report.
    let names: Vec<String> = (0..10).map(fixtures::class_name).collect();
    for d in ["train", "test", "train28", "test28"] {
        assert_eq!(report["classes"][d], serde_json::json!(names), "{d}");
    }
    // Every image read is a hashed input.
    let images = report["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["path"].as_str().unwrap().contains("scans"))
        .count();
    assert_eq!(images, 1797);
}

#[test]
fn a_safetensors_file_trains_and_evaluates_a_classifier() {
    let dir = tempfile::tempdir().unwrap();
    let file = fixtures::digits_safetensors(dir.path(), "arrays.safetensors", false);
    let recipe = |labels: &str| {
        format!(
            r#"recipe arrays {{ version = 1, seed = 3 }}
model net = mlp(inputs = 64, hidden = [32], classes = 10)
dataset train = tensors({p:?}, inputs = "x", labels = "y", test = 20%, validation = 10%, batch = 32, shuffle = true)
dataset test = tensors({p:?}, inputs = "x", labels = {labels:?}, split = "test", test = 20%, batch = 360)
pipeline {{
  train net on train (epochs = 10, optimizer = sgd(lr = 0.05, momentum = 0.9))
  evaluate net on test -> [accuracy] as dense
}}
"#,
            p = file.display().to_string()
        )
    };
    // Integer labels `[n]` and the same labels as f32 `[n, 1]` read alike.
    let (_, a) = run_text_in(dir.path(), "int", &recipe("y"), "2");
    let (_, b) = run_text_in(dir.path(), "float", &recipe("yf"), "2");
    let accuracy = evaluation(&a, "dense", "accuracy");
    assert!(accuracy > 0.85, "accuracy {accuracy}");
    assert_eq!(accuracy, evaluation(&b, "dense", "accuracy"));
    // Shifted labels: the same inputs, other classes, so chance accuracy.
    let (_, c) = run_text_in(dir.path(), "shifted", &recipe("y2"), "2");
    assert!(evaluation(&c, "dense", "accuracy") < 0.3);
}

#[test]
fn jsonl_text_reads_the_field_of_each_record_like_the_same_text_file() {
    require_data("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2");
    require_data("text/moby-dick.txt", "text");
    let dir = tempfile::tempdir().unwrap();
    let book = std::fs::read_to_string(root().join("data/text/moby-dick.txt")).unwrap();
    let paragraphs: Vec<&str> = book
        .split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .take(200)
        .collect();
    let mut jsonl = String::new();
    for (i, p) in paragraphs.iter().enumerate() {
        let record = serde_json::json!({"id": i, "body": p});
        jsonl.push_str(&format!("{record}\n"));
    }
    let records = dir.path().join("book.jsonl");
    std::fs::write(&records, jsonl).unwrap();
    // The records joined by a blank line, as `text` joins them.
    let plain = dir.path().join("book.txt");
    std::fs::write(&plain, paragraphs.join("\n\n")).unwrap();
    let recipe = |data: &str, batch: usize| {
        format!(
            r#"recipe lines {{ version = 1, seed = 1 }}
use std.wanda
model lm = gguf("data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
dataset calib = text({data}, tokenizer = lm, seq = 32, samples = 2)
dataset heldout = text({data}, tokenizer = lm, seq = 32, samples = 3, offset = 64, batch = {batch})
pipeline {{
  evaluate lm on heldout -> [perplexity] as dense
  prune lm by wanda (pattern = 2:4, targets = ["model.layers.0.*"], calibrate = calib)
  evaluate lm on heldout -> [perplexity] as pruned
}}
"#
        )
    };
    let jsonl_data = format!("{:?}, field = \"body\"", records.display().to_string());
    let (_, a) = run_text_in(dir.path(), "jsonl", &recipe(&jsonl_data, 1), "2");
    let (_, b) = run_text_in(
        dir.path(),
        "txt",
        &recipe(&format!("{:?}", plain.display().to_string()), 1),
        "2",
    );
    for label in ["dense", "pruned"] {
        let p = evaluation(&a, label, "perplexity");
        assert!(p > 1.0, "{label} perplexity {p}");
        assert_eq!(p, evaluation(&b, label, "perplexity"), "{label}");
    }
    // `batch` is how many windows run per forward: the perplexity is the same.
    let (_, c) = run_text_in(dir.path(), "batched", &recipe(&jsonl_data, 3), "2");
    for label in ["dense", "pruned"] {
        assert_eq!(
            evaluation(&a, label, "perplexity"),
            evaluation(&c, label, "perplexity"),
            "{label}"
        );
    }
}

#[test]
fn a_data_set_folder_may_have_any_name() {
    require_data("mnist/t10k-images-idx3-ubyte", "mnist");
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("handwriting");
    std::os::unix::fs::symlink(root().join("data/mnist"), &folder).unwrap();
    let recipe = dir.path().join("r.prune");
    std::fs::write(
        &recipe,
        format!(
            "recipe r {{ version = 1, seed = 0 }}\nmodel net = mlp(inputs = 784, classes = 10)\ndataset test = mnist({:?}, split = \"test\", limit = 100)\npipeline {{\n  evaluate net on test -> [accuracy]\n}}\n",
            folder.display().to_string()
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let (code, text) = run_into(&recipe, &out);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn each_model_measures_sparsity_over_its_own_targets() {
    require_data("digits/digits.csv.gz", "digits");
    // `b` is pruned on fc2 only, then `a` on fc1 only: `b`'s sparsity is
    // measured over fc2 (its own last targets), not over `a`'s fc1.
    let text = "recipe two { version = 1, seed = 0 }\nuse std.magnitude\n\
        model a = mlp(inputs = 64, hidden = [32], classes = 10)\n\
        model b = mlp(inputs = 64, hidden = [32], classes = 10)\n\
        dataset test = digits(\"data/digits/digits.csv.gz\", split = \"test\", batch = 360)\n\
        pipeline {\n\
          prune b by magnitude to 50% (targets = [\"fc2.weight\"], scope = layer)\n\
          prune a by magnitude to 50% (targets = [\"fc1.weight\"], scope = layer)\n\
          evaluate b on test -> [sparsity] as b_after\n\
          evaluate a on test -> [sparsity] as a_after\n\
        }\n"
    .to_string();
    let (_dir, runs) = run_texts(&[text]);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runs[0].0.join("report.json")).unwrap())
            .unwrap();
    assert!((evaluation(&report, "b_after", "sparsity") - 0.5).abs() < 0.01);
    assert!((evaluation(&report, "a_after", "sparsity") - 0.5).abs() < 0.01);
}

#[test]
fn text_cut_by_an_hf_model_without_a_tokenizer_is_a_check_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    std::fs::create_dir(&model).unwrap();
    let src = root().join("tests/models/tiny-llama");
    for f in files_in(&src).iter().filter(|f| *f != "tokenizer.json") {
        std::fs::copy(src.join(f), model.join(f)).unwrap();
    }
    let recipe = perplexity_recipe(dir.path(), "hf", &model);
    let (code, out) = prunec(&["check", recipe.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("P060") && out.contains("holds no tokenizer.json"),
        "{out}"
    );
    // With the tokenizer beside it the same recipe checks.
    std::fs::copy(src.join("tokenizer.json"), model.join("tokenizer.json")).unwrap();
    let (code, out) = prunec(&["check", recipe.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}");
}

/// Writes `text` as a recipe into `dir` and runs it (`run_ok`): its report.
fn report_of_text(dir: &Path, name: &str, text: String) -> serde_json::Value {
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap();
    run_ok(&[file.to_str().unwrap()]).2
}

fn shape_of(file: &Path, name: &str) -> Vec<usize> {
    let st = std::fs::read(file).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&st).unwrap();
    tensors.tensor(name).unwrap().shape().to_vec()
}

#[test]
fn removing_units_exports_a_smaller_model_that_reloads_with_the_same_predictions() {
    require_data("digits/digits.csv.gz", "digits");
    let (dir, out, report) = run_ok(&["tests/recipes/run/digits_units.prune"]);
    let file = out.join("net.safetensors");
    assert_eq!(shape_of(&file, "fc1.weight"), [32, 64]);
    assert_eq!(shape_of(&file, "fc1.bias"), [32]);
    assert_eq!(shape_of(&file, "fc2.weight"), [16, 32]);
    assert_eq!(shape_of(&file, "fc3.weight"), [10, 16]);
    let shrink = &report["units_removed"][0];
    assert_eq!(shrink["unit"], "neuron");
    assert_eq!(shrink["params_after"], 2778);
    assert_eq!(evaluation(&report, "shrunk", "params"), 2778.0);
    assert!(evaluation(&report, "dense", "flops") > evaluation(&report, "shrunk", "flops"));
    // The file alone describes the new widths: read back, it predicts the same.
    let back = report_of_text(
        dir.path(),
        "reload.prune",
        format!(
            "recipe reload {{ version = 1, seed = 0 }}\n\
             model net = safetensors({:?})\n\
             dataset test = digits(\"data/digits/digits.csv.gz\", split = \"test\", batch = 360)\n\
             pipeline {{\n  evaluate net on test -> [accuracy, params] as back\n}}\n",
            file.display().to_string()
        ),
    );
    assert_eq!(
        evaluation(&back, "back", "accuracy"),
        evaluation(&report, "finetuned", "accuracy")
    );
    assert_eq!(evaluation(&back, "back", "params"), 2778.0);
    let pred = |r: &serde_json::Value, label: &str| {
        r["evaluations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["label"] == label)
            .unwrap()["predictions_sha256"]
            .clone()
    };
    assert_eq!(pred(&back, "back"), pred(&report, "finetuned"));
}

#[test]
fn units_in_rounds_with_a_global_guard_and_timed_forward_passes() {
    require_data("digits/digits.csv.gz", "digits");
    let text = "recipe units_rounds { version = 1, seed = 3 }\n\
        use std.taylor\n\
        model net = mlp(inputs = 64, hidden = [64, 32], classes = 10)\n\
        dataset train = digits(\"data/digits/digits.csv.gz\", split = \"train\", batch = 32, shuffle = true)\n\
        dataset test = digits(\"data/digits/digits.csv.gz\", split = \"test\", batch = 360)\n\
        pipeline {\n\
          train net on train (epochs = 3, optimizer = sgd(lr = 0.05, momentum = 0.9))\n\
          evaluate net on test -> [accuracy, latency, throughput] as dense\n\
          prune net by taylor to 75% (unit = neuron, scope = global, keep_min = 20% per layer, schedule = iterative(rounds = 2)) on train {\n\
            each round:\n\
              finetune net on train (epochs = 1, optimizer = sgd(lr = 0.02, momentum = 0.9))\n\
              evaluate net on test -> [accuracy, params]\n\
          }\n\
          evaluate net on test -> [accuracy, latency, throughput] as pruned\n\
          export net to \"net.safetensors\"\n\
        }\n"
        .to_string();
    let (_dir, runs) = run_texts(&[text]);
    let (out, _) = &runs[0];
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let layers = report["units_removed"][0]["layers"].as_array().unwrap();
    let after: Vec<u64> = layers
        .iter()
        .map(|l| l["after"].as_u64().unwrap())
        .collect();
    // 96 units, 75% of them removed in all: 72, each layer keeping 20%.
    assert_eq!(after.iter().sum::<u64>(), 24, "{layers:?}");
    assert!(after[0] >= 13 && after[1] >= 7, "{after:?}");
    assert_eq!(report["rounds"].as_array().unwrap().len(), 2);
    let file = out.join("net.safetensors");
    assert_eq!(shape_of(&file, "fc1.weight"), [after[0] as usize, 64]);
    assert_eq!(
        shape_of(&file, "fc2.weight"),
        [after[1] as usize, after[0] as usize]
    );
    assert_eq!(shape_of(&file, "fc3.weight"), [10, after[1] as usize]);
    // Timings: positive, and throughput is the batch over the latency.
    for label in ["dense", "pruned"] {
        let ms = evaluation(&report, label, "latency");
        let tp = evaluation(&report, label, "throughput");
        assert!(ms > 0.0 && tp > 0.0);
        assert!((tp * ms / 1e3 - 360.0).abs() < 1e-6 * 360.0, "{tp} {ms}");
    }
}

#[test]
fn language_model_units_shrink_every_block_and_the_export_reads_back_alike() {
    let (dir, out, report) = run_ok(&[
        "tests/recipes/run/tiny_llm_units.prune",
        "--set",
        "model_dir=\"tests/models/tiny-qwen2\"",
    ]);
    let units: Vec<(String, u64, u64)> = report["units_removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let l = &s["layers"][0];
            (
                s["unit"].as_str().unwrap().to_string(),
                l["before"].as_u64().unwrap(),
                l["after"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        units,
        [
            ("ffn".to_string(), 64, 48),
            ("kv_group".to_string(), 2, 1),
            ("head".to_string(), 2, 1)
        ]
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["intermediate_size"], 48);
    assert_eq!(config["num_key_value_heads"], 1);
    assert_eq!(config["num_attention_heads"], 1);
    assert!(evaluation(&report, "pruned", "params") < evaluation(&report, "dense", "params"));
    // The exported folder, read back by a recipe, gives the same perplexity.
    let back = report_of_text(
        dir.path(),
        "again.prune",
        format!(
            "recipe again {{ version = 1, seed = 0 }}\n\
             model lm = hf({:?})\n\
             dataset heldout = text(\"tests/models/tiny.txt\", tokenizer = lm, seq = 32, samples = 8, offset = 1024)\n\
             pipeline {{\n  evaluate lm on heldout -> [perplexity, params] as back\n}}\n",
            out.join("model").display().to_string()
        ),
    );
    assert_eq!(
        evaluation(&back, "back", "perplexity"),
        evaluation(&report, "pruned", "perplexity")
    );
    assert_eq!(
        evaluation(&back, "back", "params"),
        evaluation(&report, "pruned", "params")
    );
}

#[test]
fn experts_and_atomic_experts_leave_a_smaller_moe_that_reads_back_alike() {
    let (dir, out, report) = run_ok(&["tests/recipes/run/tiny_llm_moe.prune"]);
    let units: Vec<(String, Vec<(u64, u64)>)> = report["units_removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let layers = s["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| (l["before"].as_u64().unwrap(), l["after"].as_u64().unwrap()))
                .collect();
            (s["unit"].as_str().unwrap().to_string(), layers)
        })
        .collect();
    let expert = |v: Vec<(u64, u64)>| ("expert".to_string(), v);
    let atomic = |v: Vec<(u64, u64)>| ("expert_neuron".to_string(), v);
    assert_eq!(
        units,
        [
            // heapr: 2 of 8 experts, then 24 of the 96 atomic experts left per block.
            expert(vec![(8, 6)]),
            atomic(vec![(96, 72), (96, 72)]),
            // by_frequency, by_reap: the baselines on copies.
            expert(vec![(8, 6)]),
            atomic(vec![(128, 96), (128, 96)]),
        ]
    );
    // Parameters: 2 experts of 3 x 16 x 32 and the router rows in each of
    // the 2 sparse blocks, then 24 atomic experts of 3 x 32 per block.
    let dense = evaluation(&report, "dense", "params");
    assert_eq!(
        dense - evaluation(&report, "by_frequency", "params"),
        2.0 * 2.0 * (3.0 * 16.0 * 32.0 + 32.0)
    );
    // (`params` counts non-zero weights: Wanda's zeros in the attention
    // count too, half of q, k, v, o: 64 x 32, 2 x 32 x 32, 32 x 64 per block.)
    let attention = 3.0 * (2048.0 + 2.0 * 1024.0 + 2048.0);
    assert_eq!(
        evaluation(&report, "by_frequency", "params") - evaluation(&report, "heapr", "params"),
        2.0 * 24.0 * 96.0 + attention / 2.0
    );
    assert_eq!(
        dense - evaluation(&report, "by_reap", "params"),
        2.0 * 32.0 * 96.0
    );
    // The export holds 6 experts padded to one width (the ranking left
    // some expert whole, so 16); read back, it gives the same perplexity.
    let config_of = |dir: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join(dir).join("config.json")).unwrap())
            .unwrap()
    };
    let config = config_of("model");
    assert_eq!(config["num_local_experts"], 6);
    assert_eq!(config["moe_intermediate_size"], 16);
    assert_eq!(config["architectures"][0], "Qwen3MoeForCausalLM");
    // `equal_widths = true`: every expert lost 4 of its 16 atomic experts,
    // and the export is that much smaller.
    let equal = config_of("equal");
    assert_eq!(equal["num_local_experts"], 8);
    assert_eq!(equal["moe_intermediate_size"], 12);
    let shapes = |dir: &str, experts: usize| -> Vec<Vec<usize>> {
        let bytes = std::fs::read(out.join(dir).join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        (0..experts)
            .map(|e| {
                st.tensor(&format!("model.layers.2.mlp.experts.{e}.down_proj.weight"))
                    .unwrap()
                    .shape()
                    .to_vec()
            })
            .collect()
    };
    assert!(shapes("equal", 8).iter().all(|s| s == &[32, 12]));
    assert!(shapes("model", 6).iter().all(|s| s == &[32, 16]));
    assert_eq!(
        read_back_perplexity(dir.path(), &out.join("model")),
        evaluation(&report, "heapr", "perplexity")
    );
}

/// The perplexity of an exported tiny model read back by a recipe, on the
/// tiny runs' held-out windows.
fn read_back_perplexity(dir: &Path, model: &Path) -> f64 {
    let back = report_of_text(
        dir,
        "again.prune",
        format!(
            "recipe again {{ version = 1, seed = 0 }}\n\
             model lm = hf({:?})\n\
             dataset heldout = text(\"tests/models/tiny.txt\", tokenizer = lm, seq = 32, samples = 8, offset = 1024)\n\
             pipeline {{\n  evaluate lm on heldout -> [perplexity] as back\n}}\n",
            model.display().to_string()
        ),
    );
    evaluation(&back, "back", "perplexity")
}

/// The same stages on the tiny Mixtral (every block sparse, its own tensor
/// names, a sliding window): 6 of 8 experts stay, and the export reads back
/// with the same perplexity.
#[test]
fn mixtral_experts_are_removed_and_the_export_reads_back_alike() {
    let (dir, out, report) = run_ok(&[
        "tests/recipes/run/tiny_llm_moe.prune",
        "--set",
        "model_dir=\"tests/models/tiny-mixtral\"",
    ]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"][0], "MixtralForCausalLM");
    assert_eq!(config["num_local_experts"], 6);
    assert_eq!(config["intermediate_size"], 16);
    let removed: Vec<u64> = report["units_removed"][0]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["after"].as_u64().unwrap())
        .collect();
    assert_eq!(removed, [6]);
    assert_eq!(
        read_back_perplexity(dir.path(), &out.join("model")),
        evaluation(&report, "heapr", "perplexity")
    );
}

/// The README's expert table (examples/llm_moe.prune on the small trained
/// MoE, seconds): every score removes the same number of parameters, and
/// atomic experts cost less than whole experts.
#[test]
fn expert_scores_on_a_trained_moe_give_the_readme_table() {
    let (_dir, _out, report) = run_ok(&["examples/llm_moe.prune", "--set", "target=50%"]);
    let ppl = |l: &str| evaluation(&report, l, "perplexity");
    let params = |l: &str| evaluation(&report, l, "params");
    for l in ["reap_experts", "frequency_experts"] {
        assert_eq!(params(l), params("heapr_experts"));
    }
    for l in ["reap_atomic", "heapr_global", "heapr_equal", "reap_equal"] {
        assert_eq!(params(l), params("heapr_atomic"));
    }
    assert!(params("heapr_atomic") < 0.7 * params("dense"));
    // Recorded in the README: at half the experts, frequency 3.5938,
    // HEAPr 3.9949, REAP 8.9138; half the atomic experts: HEAPr 1.5909,
    // REAP 1.6146, HEAPr across all blocks 1.5612, with equal widths HEAPr
    // 1.8059, REAP 1.8446 (dense 1.5321).
    let table = [
        ("dense", 1.5321),
        ("heapr_experts", 3.9949),
        ("reap_experts", 8.9138),
        ("frequency_experts", 3.5938),
        ("heapr_atomic", 1.5909),
        ("reap_atomic", 1.6146),
        ("heapr_global", 1.5612),
        ("heapr_equal", 1.8059),
        ("reap_equal", 1.8446),
    ];
    for (label, want) in table {
        assert!(
            (ppl(label) - want).abs() < 5e-4,
            "{label}: {} (README {want})",
            ppl(label)
        );
    }
}

#[test]
fn lenet5_channels_reduced_halves_every_width_and_times_both_models() {
    require_data("mnist/train-images-idx3-ubyte", "mnist");
    let (_dir, out, report) = run_ok(&[
        "examples/lenet5_channels.prune",
        "--set",
        "samples=8000",
        "--set",
        "epochs=2",
        "--set",
        "finetune_epochs=1",
        "--set",
        "max_drop=5%",
    ]);
    let file = out.join("lenet5_channels.safetensors");
    assert_eq!(shape_of(&file, "conv1.weight"), [3, 1, 5, 5]);
    assert_eq!(shape_of(&file, "conv2.weight"), [8, 3, 5, 5]);
    assert_eq!(shape_of(&file, "fc1.weight"), [60, 200]);
    assert_eq!(shape_of(&file, "fc2.weight"), [42, 60]);
    assert_eq!(shape_of(&file, "fc3.weight"), [10, 42]);
    assert_eq!(evaluation(&report, "pruned", "params"), 15738.0);
    assert_eq!(evaluation(&report, "pruned", "flops"), 267480.0);
    for label in ["dense_speed", "pruned_speed"] {
        assert!(evaluation(&report, label, "latency") > 0.0);
    }
}

#[test]
fn scratch_vs_finetune_reduced_trains_the_shrunk_architecture_three_ways() {
    require_data("mnist/train-images-idx3-ubyte", "mnist");
    let (_dir, out, report) = run_ok(&[
        "examples/scratch_vs_finetune.prune",
        "--set",
        "samples=8000",
        "--set",
        "epochs=2",
        "--set",
        "finetune_epochs=1",
        "--set",
        "scratch_b_epochs=4",
        "--set",
        "margin_b=5%",
        "--set",
        "margin_e=5%",
    ]);
    // Three models, pruned alike: the same widths, different weights.
    for label in ["fine_tuned", "scratch_E", "scratch_B"] {
        assert_eq!(evaluation(&report, label, "params"), 15738.0);
        assert!(evaluation(&report, label, "accuracy") > 0.8, "{label}");
    }
    let a = tensor_f32(&out.join("fine_tuned.safetensors"), "conv1.weight");
    let b = tensor_f32(&out.join("scratch_b.safetensors"), "conv1.weight");
    assert_eq!(a.len(), b.len());
    assert_ne!(a, b);
    // The dense training was run once and copied to the other two models.
    let copied = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| !s["copied_from"].is_null())
        .count();
    assert_eq!(copied, 2);
}

#[test]
fn llm_ffn_heads_reduced_exports_smollm2_with_smaller_sizes() {
    require_data("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2");
    require_data("text/moby-dick.txt", "text");
    let (_dir, out, report) = run_ok(&[
        "examples/llm_ffn_heads.prune",
        "--set",
        "calib_samples=2",
        "--set",
        "eval_samples=1",
        "--set",
        "timing_windows=1",
    ]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["intermediate_size"], 1229);
    assert_eq!(config["num_key_value_heads"], 2);
    assert_eq!(config["num_attention_heads"], 6);
    assert_eq!(config["head_dim"], 64);
    assert_eq!(config["mlp_bias"], true);
    assert_eq!(config["attention_bias"], true);
    let dense = evaluation(&report, "dense", "params");
    let pruned = evaluation(&report, "pruned", "params");
    // 30 blocks lose 307 FFN neurons (3 x 576 each) and 3 query and 1 kv head
    // (576 x 64 x (2 x 3 + 2)), and gain the compensation's down and o biases
    // (2 x 576; the zero gate/up/q/k/v biases count nothing).
    let removed = 30.0 * (307.0 * 3.0 * 576.0 + 576.0 * 64.0 * 8.0 - 2.0 * 576.0);
    assert!((dense - pruned - removed).abs() < 1e5, "{dense} {pruned}");
    assert!(evaluation(&report, "pruned_speed", "latency") > 0.0);
}

#[test]
fn normalizing_unit_scores_per_layer_changes_what_a_global_ranking_keeps() {
    require_data("digits/digits.csv.gz", "digits");
    let text = |normalize: &str| {
        format!(
            "recipe norm {{ version = 1, seed = 4 }}\n\
             use std.l1_channel\n\
             model net = mlp(inputs = 64, hidden = [64, 32], classes = 10)\n\
             dataset train = digits(\"data/digits/digits.csv.gz\", split = \"train\", batch = 32, shuffle = true)\n\
             pipeline {{\n\
               train net on train (epochs = 2, optimizer = sgd(lr = 0.05, momentum = 0.9))\n\
               prune net by l1_channel to 50% (unit = neuron, scope = global, normalize = {normalize})\n\
             }}\n"
        )
    };
    let widths = |out: &Path| -> Vec<u64> {
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap())
                .unwrap();
        report["units_removed"][0]["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["after"].as_u64().unwrap())
            .collect()
    };
    let (_dir, runs) = run_texts(&[text("none"), text("max"), text("mean")]);
    let w: Vec<Vec<u64>> = runs.iter().map(|(out, _)| widths(out)).collect();
    // 96 neurons, 48 removed whichever way they are ranked.
    for x in &w {
        assert_eq!(x.iter().sum::<u64>(), 48, "{w:?}");
    }
    // fc1's 64-input rows have larger L1 norms than fc2's: raw scores spare
    // fc1, per-layer scales share the cut.
    assert_ne!(w[0], w[1], "{w:?}");
}

#[test]
fn reinit_draws_fresh_weights_for_a_model_read_from_a_file_too() {
    require_data("digits/digits.csv.gz", "digits");
    let (dir, out, report) = run_ok(&["tests/recipes/run/digits_units.prune"]);
    assert!(evaluation(&report, "finetuned", "accuracy") > 0.8);
    let fresh = report_of_text(
        dir.path(),
        "reinit.prune",
        format!(
            "recipe reinit {{ version = 1, seed = 0 }}\n\
             model net = safetensors({:?})\n\
             dataset train = digits(\"data/digits/digits.csv.gz\", split = \"train\", batch = 32)\n\
             dataset test = digits(\"data/digits/digits.csv.gz\", split = \"test\", batch = 360)\n\
             pipeline {{\n\
               train net on train (steps = 1, optimizer = sgd(lr = 0.0001), reinit = true)\n\
               evaluate net on test -> [accuracy, params] as fresh\n\
             }}\n",
            out.join("net.safetensors").display().to_string()
        ),
    );
    // The file's (shrunk) widths, but not its trained weights.
    assert_eq!(evaluation(&fresh, "fresh", "params"), 2778.0);
    assert!(evaluation(&fresh, "fresh", "accuracy") < 0.3);
}

#[test]
fn flap_compensation_puts_the_removed_units_mean_into_exported_biases() {
    let (_d1, out, with) = run_ok(&["tests/recipes/run/tiny_llm_flap.prune"]);
    let (_d2, _o2, without) = run_ok(&[
        "tests/recipes/run/tiny_llm_flap.prune",
        "--set",
        "compensate=false",
    ]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["mlp_bias"], true);
    assert_eq!(config["attention_bias"], true);
    let names: Vec<String> = {
        let st = std::fs::read(out.join("model/model.safetensors")).unwrap();
        let t = safetensors::SafeTensors::deserialize(&st).unwrap();
        t.names().into_iter().map(String::from).collect()
    };
    for n in [
        "model.layers.1.mlp.down_proj.bias",
        "model.layers.1.mlp.gate_proj.bias",
        "model.layers.1.self_attn.o_proj.bias",
        "model.layers.1.self_attn.q_proj.bias",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} missing");
    }
    // On this checkpoint the compensated model is the closer to dense.
    let dense = evaluation(&with, "dense", "perplexity");
    let (a, b) = (
        evaluation(&with, "pruned", "perplexity"),
        evaluation(&without, "pruned", "perplexity"),
    );
    assert!((a - dense).abs() < (b - dense).abs(), "{dense} {a} {b}");
}

#[test]
fn removing_units_cuts_calibration_statistics_and_rewind_points_too() {
    require_data("digits/digits.csv.gz", "digits");
    // A `calibrate` stage's per-input norms and the initial weights are held
    // per parameter: after units go they must fit the smaller tensors.
    let text = "recipe cuts { version = 1, seed = 2 }\n\
        use std.{l1_channel, wanda}\n\
        model net = mlp(inputs = 64, hidden = [48, 24], classes = 10)\n\
        dataset train = digits(\"data/digits/digits.csv.gz\", split = \"train\", batch = 32, shuffle = true)\n\
        dataset test = digits(\"data/digits/digits.csv.gz\", split = \"test\", batch = 360)\n\
        pipeline {\n\
          train net on train (epochs = 2, optimizer = sgd(lr = 0.05, momentum = 0.9))\n\
          calibrate net on train\n\
          prune net by l1_channel to 50% (unit = neuron, schedule = iterative(rounds = 2, rewind = init)) {\n\
            each round:\n\
              train net on train (epochs = 1, optimizer = sgd(lr = 0.05, momentum = 0.9))\n\
          }\n\
          prune net by wanda to 50% (unit = neuron)\n\
          prune net by wanda to 50%\n\
          evaluate net on test -> [accuracy, params, sparsity]\n\
          export net to \"net.safetensors\"\n\
        }\n"
        .to_string();
    let (_dir, runs) = run_texts(&[text]);
    let file = runs[0].0.join("net.safetensors");
    // 48 -> 24 -> 12 and 24 -> 12 -> 6 neurons.
    assert_eq!(shape_of(&file, "fc1.weight"), [12, 64]);
    assert_eq!(shape_of(&file, "fc2.weight"), [6, 12]);
}

#[test]
fn a_query_head_alone_is_refused_where_each_has_its_own_key_value_head() {
    // tiny-llama with 2 query heads over 2 key/value heads (q and o cut to
    // their first two heads): multi-head attention, nothing shared.
    let dir = tempfile::tempdir().unwrap();
    let src = root().join("tests/models/tiny-llama");
    for f in ["tokenizer.json", "generation_config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["num_attention_heads"] = 2.into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in st.tensors() {
        let (shape, data) = (t.shape().to_vec(), t.data().to_vec());
        let (shape, data) = if name.ends_with("q_proj.weight") {
            // First 16 rows of [32, 32] f32.
            (vec![16, shape[1]], data[..16 * shape[1] * 4].to_vec())
        } else if name.ends_with("o_proj.weight") {
            // First 16 columns of every row.
            let cols = shape[1];
            let kept: Vec<u8> = data
                .chunks(cols * 4)
                .flat_map(|row| row[..16 * 4].to_vec())
                .collect();
            (vec![shape[0], 16], kept)
        } else {
            (shape, data)
        };
        out.push((name, shape, data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = out
        .iter()
        .map(|(n, s, d)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                .unwrap();
            (n.clone(), v)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    let recipe = dir.path().join("heads.prune");
    let model = dir.path().display().to_string();
    std::fs::write(
        &recipe,
        format!(
            "recipe heads {{ version = 1, seed = 0 }}\n\
             use std.wanda\n\
             model lm = hf({model:?})\n\
             dataset calib = text(\"tests/models/tiny.txt\", tokenizer = lm, seq = 32, samples = 2)\n\
             pipeline {{\n  prune lm by wanda to 50% (unit = UNIT, calibrate = calib)\n  export lm to \"model\"\n}}\n"
        ),
    )
    .unwrap();
    let text = std::fs::read_to_string(&recipe).unwrap();
    std::fs::write(&recipe, text.replace("UNIT", "head")).unwrap();
    let (code, out) = prunec(&["check", recipe.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("has its own key/value head"), "{out}");
    // The same model loses whole heads with their key/value heads.
    std::fs::write(&recipe, text.replace("UNIT", "kv_group")).unwrap();
    let result = dir.path().join("out");
    let (code, out) = prunec(
        &[
            "run",
            "-q",
            recipe.to_str().unwrap(),
            "--out",
            result.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(result.join("model/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["num_attention_heads"], 1);
    assert_eq!(config["num_key_value_heads"], 1);
}

/// WoodFisher and M-FAC against magnitude pruning of the same trained
/// network: the pruned weights are zero at the target, the survivors moved
/// (the OBS update), and the loss right after pruning is lower.
#[test]
fn obs_methods_update_the_survivors_and_lose_less_than_magnitude() {
    require_data("digits/digits.csv.gz", "digits");
    let text = |by: &str| {
        format!(
            r#"recipe obs {{ version = 1, seed = 4 }}
use std.{{magnitude, woodfisher, mfac}}
model net = mlp(inputs = 64, hidden = [64, 32], classes = 10)
dataset train = digits("{root}/data/digits/digits.csv.gz", split = "train", batch = 32, shuffle = true)
dataset test = digits("{root}/data/digits/digits.csv.gz", split = "test", batch = 360)
pipeline {{
  train net on train (epochs = 10, optimizer = sgd(lr = 0.05, momentum = 0.9))
  export net to "dense.safetensors"
  prune net by {by} to 85% on train (targets = ["*.weight"], scope = global)
  evaluate net on test -> [loss, sparsity] as pruned
  export net to "pruned.safetensors"
}}
"#,
            root = root().display()
        )
    };
    let (_dir, runs) = run_texts(&[
        text("magnitude"),
        text("woodfisher(block = 64, damp = 1e-4, grads = 300)"),
        text("mfac(grads = 48, block = 1024, damp = 1e-4)"),
    ]);
    // Per run: the loss after pruning, and the share of fc1's survivors
    // whose value changed.
    let mut losses = Vec::new();
    let mut moved = Vec::new();
    for (out, _log) in &runs {
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap())
                .unwrap();
        assert!((evaluation(&report, "pruned", "sparsity") - 0.85).abs() < 1e-3);
        losses.push(evaluation(&report, "pruned", "loss"));
        let dense = tensor_f32(&out.join("dense.safetensors"), "fc1.weight");
        let pruned = tensor_f32(&out.join("pruned.safetensors"), "fc1.weight");
        let changed = dense
            .iter()
            .zip(&pruned)
            .filter(|(d, p)| **p != 0.0 && d != p)
            .count();
        let kept = pruned.iter().filter(|p| **p != 0.0).count();
        moved.push(changed as f64 / kept as f64);
    }
    // Magnitude keeps its survivors as they were; OBS moves nearly all.
    assert_eq!(moved[0], 0.0);
    assert!(moved[1] > 0.9 && moved[2] > 0.9, "{moved:?}");
    assert!(
        losses[1] < losses[0],
        "WoodFisher {} vs magnitude {}",
        losses[1],
        losses[0]
    );
    assert!(
        losses[2] < losses[0],
        "M-FAC {} vs magnitude {}",
        losses[2],
        losses[0]
    );
}

#[test]
fn obs_lenet300_reduced_beats_magnitude() {
    require_data("mnist/train-images-idx3-ubyte", "mnist");
    let (_dir, out, report) = run_ok(&[
        "examples/obs_lenet300.prune",
        "--set",
        "samples=12000",
        "--set",
        "epochs=2",
        "--set",
        "grads=200",
        "--set",
        "m=64",
        "--set",
        "margin=0%",
    ]);
    for label in ["magnitude", "woodfisher", "m_fac"] {
        assert!((evaluation(&report, label, "sparsity") - 0.95).abs() < 1e-3);
    }
    let w = tensor_f32(&out.join("woodfisher.safetensors"), "fc1.weight");
    let zeros = w.iter().filter(|x| **x == 0.0).count() as f64 / w.len() as f64;
    assert!(zeros > 0.9, "{zeros}");
}

/// Distillation changes training, and a teacher's state is part of what a
/// twin copy must share: the same distilled fine-tuning is copied while the
/// teacher is unchanged, and run anew once the teacher has trained further.
#[test]
fn distillation_reads_the_teacher_in_its_current_state() {
    require_data("digits/digits.csv.gz", "digits");
    let text = format!(
        r#"recipe kd {{ version = 1, seed = 6 }}
model teacher = mlp(inputs = 64, hidden = [48], classes = 10)
model a = mlp(inputs = 64, hidden = [32], classes = 10)
model b = mlp(inputs = 64, hidden = [32], classes = 10)
model c = mlp(inputs = 64, hidden = [32], classes = 10)
model d = mlp(inputs = 64, hidden = [32], classes = 10)
dataset train = digits("{root}/data/digits/digits.csv.gz", split = "train", batch = 32, limit = 300)
dataset test = digits("{root}/data/digits/digits.csv.gz", split = "test", batch = 360)
pipeline {{
  train teacher on train (epochs = 3, optimizer = sgd(lr = 0.05, momentum = 0.9))
  train a on train (epochs = 2, optimizer = sgd(lr = 0.05, momentum = 0.9), distill = teacher, distill_weight = 0.8)
  train b on train (epochs = 2, optimizer = sgd(lr = 0.05, momentum = 0.9), distill = teacher, distill_weight = 0.8)
  train d on train (epochs = 2, optimizer = sgd(lr = 0.05, momentum = 0.9))
  train teacher on train (epochs = 3, optimizer = sgd(lr = 0.05, momentum = 0.9))
  train c on train (epochs = 2, optimizer = sgd(lr = 0.05, momentum = 0.9), distill = teacher, distill_weight = 0.8)
  export a to "a.safetensors"
  export b to "b.safetensors"
  export c to "c.safetensors"
  export d to "d.safetensors"
}}
"#,
        root = root().display()
    );
    let (_dir, runs) = run_texts(&[text]);
    let out = &runs[0].0;
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let copied = copied_steps(&report);
    assert_eq!(copied, [("b".to_string(), "a".to_string())], "{copied:?}");
    let w = |m: &str| tensor_f32(&out.join(format!("{m}.safetensors")), "fc1.weight");
    assert_eq!(w("a"), w("b"));
    // The teacher trained further: c distilled from a different teacher.
    assert_ne!(w("a"), w("c"));
    // Without distillation the same training gives other weights.
    assert_ne!(w("a"), w("d"));
}

#[test]
fn distill_data_pruning_reduced_trains_teacher_and_students() {
    require_data("mnist/train-images-idx3-ubyte", "mnist");
    let (_dir, out, report) = run_ok(&[
        "examples/distill_data_pruning.prune",
        "--set",
        "epochs=1",
        "--set",
        "keep=2000",
        "--set",
        "student_epochs=4",
    ]);
    // The recipe's own assert (distillation wins back a quarter of the
    // lost accuracy) holds at this size too.
    for label in ["full_data", "pruned_data", "pruned_data_kd"] {
        assert!(evaluation(&report, label, "accuracy") > 0.7, "{label}");
    }
    assert_eq!(
        tensor_f32(&out.join("distilled.safetensors"), "fc1.weight").len(),
        784 * 300
    );
}

/// PDP hardens its soft masks after training: per layer at the target, and
/// as an exact 2:4 pattern (every group of four keeps at most two).
#[test]
fn pdp_hardens_soft_masks_per_layer_and_as_n_m() {
    require_data("digits/digits.csv.gz", "digits");
    let (_dir, out, report) = run_ok(&["tests/recipes/run/digits_pdp.prune"]);
    assert!((evaluation(&report, "layer_pdp", "sparsity") - 0.8).abs() < 1e-3);
    assert!(evaluation(&report, "layer_pdp", "accuracy") > 0.7);
    for name in ["fc1.weight", "fc2.weight", "fc3.weight"] {
        let w = tensor_f32(&out.join("a.safetensors"), name);
        let zeros = w.iter().filter(|x| **x == 0.0).count() as f64 / w.len() as f64;
        assert!((zeros - 0.8).abs() < 0.01, "{name}: {zeros}");
    }
    for name in ["fc1.weight", "fc2.weight"] {
        let w = tensor_f32(&out.join("b.safetensors"), name);
        for g in w.chunks(4) {
            assert!(
                g.iter().filter(|x| **x != 0.0).count() <= 2,
                "{name}: {g:?}"
            );
        }
    }
    let fc3 = tensor_f32(&out.join("b.safetensors"), "fc3.weight");
    assert!(fc3.iter().all(|x| *x != 0.0), "fc3 is not targeted");
}

#[test]
fn pdp_vs_agp_reduced_reaches_the_target() {
    require_data("mnist/train-images-idx3-ubyte", "mnist");
    let (_dir, out, report) = run_ok(&[
        "examples/pdp_vs_agp.prune",
        "--set",
        "samples=12000",
        "--set",
        "epochs=3",
        "--set",
        "ramp=epoch 2",
    ]);
    // The recipe's own assert (PDP within `margin` of AGP) holds here too.
    for label in ["agp", "pdp"] {
        assert!(
            (evaluation(&report, label, "sparsity") - 0.95).abs() < 1e-3,
            "{label}"
        );
        assert!(evaluation(&report, label, "accuracy") > 0.8, "{label}");
    }
    let w = tensor_f32(&out.join("pdp.safetensors"), "fc1.weight");
    let zeros = w.iter().filter(|x| **x == 0.0).count() as f64 / w.len() as f64;
    assert!((zeros - 0.95).abs() < 0.01, "{zeros}");
}

/// Data pruning keeps `n - floor(n * drop)` samples by each score, each
/// class its share where asked; the kept indices are in the report, in a
/// file of one index per line and (hashed) in the lock; later stages read
/// only what is kept (the recipe asserts the probe's loss on the hardest
/// samples it kept is above its loss on all, on the easiest below); the
/// run re-verifies and, with another `drop`, keeps other samples.
#[test]
fn data_pruning_keeps_what_each_score_ranks_best() {
    require_data("digits/digits.csv.gz", "digits");
    let recipe = "tests/recipes/run/digits_data_pruning.prune";
    let (_dir, out, report) = run_ok(&[recipe]);
    let pruned = report["data_pruned"].as_array().unwrap();
    let names: Vec<&str> = pruned.iter().map(|d| d["data"].as_str().unwrap()).collect();
    assert_eq!(names, ["by_el2n", "by_grand", "by_forgetting", "at_random"]);
    let lock: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("prune.lock")).unwrap()).unwrap();
    let mut sets = Vec::new();
    for (d, l) in pruned.iter().zip(lock["data_pruned"].as_array().unwrap()) {
        let kept: Vec<u64> = d["kept_indices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        // 1437 training digits, floor(1437 * 0.7) = 1005 pruned.
        assert_eq!(d["samples"], 1437);
        assert_eq!(kept.len(), 432, "{}", d["data"]);
        assert!(kept.windows(2).all(|w| w[0] < w[1]) && kept[431] < 1437);
        let file = std::fs::read_to_string(out.join(d["file"].as_str().unwrap())).unwrap();
        let listed: Vec<u64> = file.lines().map(|l| l.parse().unwrap()).collect();
        assert_eq!(listed, kept);
        use sha2::Digest;
        let sha: String = sha2::Sha256::digest(file.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(l["indices_sha256"].as_str().unwrap(), sha);
        assert_eq!(l["kept"], 432);
        let classes = d["classes"].as_array().unwrap();
        let after: Vec<u64> = classes
            .iter()
            .map(|c| c["after"].as_u64().unwrap())
            .collect();
        assert_eq!(after.iter().sum::<u64>(), 432);
        if d["per_class"].as_bool().unwrap() {
            // Each class its share, off by less than one sample.
            for c in classes {
                let share = c["before"].as_f64().unwrap() * 432.0 / 1437.0;
                assert!((c["after"].as_f64().unwrap() - share).abs() < 1.0, "{c}");
            }
        }
        sets.push(kept);
    }
    // Four scores, four different selections.
    for i in 0..sets.len() {
        for j in i + 1..sets.len() {
            assert_ne!(sets[i], sets[j], "{} and {}", names[i], names[j]);
        }
    }
    // Ranked over all classes, GraNd's easiest samples are not balanced.
    let grand = pruned[1]["classes"].as_array().unwrap();
    let spread: Vec<u64> = grand.iter().map(|c| c["after"].as_u64().unwrap()).collect();
    assert!(
        spread.iter().max().unwrap() - spread.iter().min().unwrap() > 20,
        "{spread:?}"
    );
    assert!(pruned[2]["never_learned"].as_u64().is_some());
    assert!(evaluation(&report, "el2n_kept", "accuracy") > 0.7);
    let lock_path = out.join("prune.lock");
    let (code, text) = prunec(&["verify", lock_path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{text}");
    // Pruning less keeps more, and other samples.
    let (_dir2, _, other) = run_ok(&[recipe, "--set", "drop=50%"]);
    let kept = other["data_pruned"][0]["kept_indices"].as_array().unwrap();
    assert_eq!(kept.len(), 1437 - 718);
}

/// The oracle study retrains copies of the model: each candidate's loss
/// after pruning and accuracy after retraining are in the report, the
/// recipe's `kendall_tau` is τ-b over them (recomputed here), the scatter
/// plot is a locked output, and the model itself is unchanged (the recipe
/// asserts its accuracy after the study equals the one before).
#[test]
fn an_oracle_study_reports_every_candidate_and_their_kendall_tau() {
    require_data("digits/digits.csv.gz", "digits");
    let (_dir, out, report) = run_ok(&["tests/recipes/run/digits_oracle.prune"]);
    let a = &report["analyses"][0];
    assert_eq!(a["analysis"], "oracle");
    assert_eq!(a["label"], "study");
    let rows = a["candidates"].as_array().unwrap();
    assert_eq!(rows.len(), 12);
    let loss: Vec<f64> = rows
        .iter()
        .map(|r| r["loss_after_pruning"].as_f64().unwrap())
        .collect();
    let acc: Vec<f64> = rows
        .iter()
        .map(|r| r["accuracy_after_retraining"].as_f64().unwrap())
        .collect();
    // Random halves of the hidden neurons: the losses differ from copy to copy.
    assert!(loss.windows(2).any(|w| w[0] != w[1]));
    assert!(acc.iter().all(|&x| x > 0.3 && x <= 1.0));
    let mut c = 0i64;
    let (mut d, mut tx, mut ty) = (0i64, 0i64, 0i64);
    for i in 0..12 {
        for j in i + 1..12 {
            let (sx, sy) = (loss[i].total_cmp(&loss[j]), acc[i].total_cmp(&acc[j]));
            match (sx.is_eq(), sy.is_eq()) {
                (true, true) => {}
                (true, false) => tx += 1,
                (false, true) => ty += 1,
                _ if sx == sy => c += 1,
                _ => d += 1,
            }
        }
    }
    let tau = (c - d) as f64 / (((c + d + ty) * (c + d + tx)) as f64).sqrt();
    let reported = a["kendall_tau"].as_f64().unwrap();
    assert!((reported - tau).abs() < 1e-12, "{reported} vs {tau}");
    let svg = std::fs::read_to_string(out.join("oracle.svg")).unwrap();
    assert_eq!(svg.matches("<circle").count(), 12);
    let outputs = report["outputs"].as_array().unwrap();
    assert!(outputs.iter().any(|o| o["path"] == "oracle.svg"));
    assert_eq!(
        evaluation(&report, "dense", "accuracy"),
        evaluation(&report, "unchanged", "accuracy")
    );
}

/// The data-pruning example, reduced (12,000 images, short trainings): every
/// score keeps a tenth of the images, each class its share, and every
/// distilled student beats its twin trained on the labels alone. (The
/// ranking reversal the full-size recipe asserts needs its full size.)
#[test]
fn data_pruning_example_reduced_distillation_helps_every_score() {
    require_data("mnist/train-images-idx3-ubyte", "mnist");
    let (_dir, out, report) = run_ok(&[
        "examples/data_pruning.prune",
        "--set",
        "samples=12000",
        "--set",
        "epochs=3",
        "--set",
        "watch_epochs=2",
        "--set",
        "student_epochs=10",
        "--set",
        "recovered=25%",
        "--set",
        "margin=-100%",
    ]);
    let pruned = report["data_pruned"].as_array().unwrap();
    assert_eq!(pruned.len(), 4);
    for d in pruned {
        assert_eq!(d["samples"], 12000);
        assert_eq!(d["kept"], 1200);
        let listed = std::fs::read_to_string(out.join(d["file"].as_str().unwrap())).unwrap();
        assert_eq!(listed.lines().count(), 1200);
    }
    for score in ["el2n", "grand", "forgetting", "random"] {
        let labels = evaluation(&report, score, "accuracy");
        let kd = evaluation(&report, &format!("{score}_distilled"), "accuracy");
        assert!(kd > labels, "{score}: {kd} vs {labels}");
    }
}

/// Criterion agreement: per tensor and overall, Spearman's ρ within
/// [-1, 1] and the pruned-set overlap within [0, 1]; a criterion against a
/// monotone transform of itself agrees exactly (the recipe asserts it); the
/// plots are locked outputs and the model is not pruned.
#[test]
fn criterion_agreement_compares_scores_tensor_by_tensor() {
    require_data("digits/digits.csv.gz", "digits");
    let (_dir, out, report) = run_ok(&["tests/recipes/run/digits_agreement.prune"]);
    let studies = report["agreements"].as_array().unwrap();
    assert_eq!(studies.len(), 3);
    for a in studies {
        assert_eq!(a["analysis"], "agreement");
        let tensors = a["tensors"].as_array().unwrap();
        let names: Vec<&str> = tensors
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["fc1.weight", "fc2.weight", "fc3.weight"]);
        for t in tensors.iter().chain(std::iter::once(a)) {
            let (rho, o) = (
                t["spearman"].as_f64().unwrap(),
                t["overlap"].as_f64().unwrap(),
            );
            assert!(
                (-1.0..=1.0).contains(&rho) && (0.0..=1.0).contains(&o),
                "{t}"
            );
        }
        let plot = a["plot"].as_str().unwrap();
        assert!(out.join(plot).is_file());
        assert!(report["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["path"] == plot));
    }
    // Magnitude and Taylor rank the weights differently, but not at random.
    let taylor = &studies[0];
    assert_eq!(taylor["a"], "magnitude");
    assert_eq!(taylor["b"], "taylor");
    let rho = taylor["spearman"].as_f64().unwrap();
    assert!(rho > 0.2 && rho < 0.99, "{rho}");
    for l in report["layers"].as_array().unwrap() {
        assert_eq!(l["sparsity"].as_f64().unwrap(), 0.0, "{l}");
    }
    // Sensitivity: every tensor at every level; 90% of any one layer's
    // weights cost accuracy on the test data.
    let s = &report["sensitivities"][0];
    assert_eq!(s["criterion"], "magnitude");
    let dense = s["dense"]["accuracy"].as_f64().unwrap();
    let tensors = s["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 3);
    for t in tensors {
        let levels: Vec<f64> = t["levels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["sparsity"].as_f64().unwrap())
            .collect();
        assert_eq!(levels, [0.3, 0.6, 0.9]);
        let at90 = t["levels"][2]["accuracy"].as_f64().unwrap();
        assert!(at90 < dense, "{t}");
    }
    assert!(out.join("sensitivity.svg").is_file());
}

/// The oracle-study example, reduced: six candidates, each with half of both
/// hidden layers' neurons masked, retrained on 2,000 images.
#[test]
fn oracle_study_reduced_studies_every_candidate() {
    require_data("mnist/train-images-idx3-ubyte", "mnist");
    let (_dir, out, report) = run_ok(&[
        "examples/oracle_study.prune",
        "--set",
        "epochs=1",
        "--set",
        "candidates=6",
        "--set",
        "retrain=2000",
        "--set",
        "tau_max=1",
    ]);
    let a = &report["analyses"][0];
    assert_eq!(a["candidates"].as_array().unwrap().len(), 6);
    assert_eq!(a["fraction"], 0.5);
    assert!(out.join("oracle.svg").is_file());
    assert!(evaluation(&report, "dense", "accuracy") > 0.9);
}

/// OWL on the two-block tiny Llama: the blocks' outlier ratios scaled to
/// [0, 2 lambda] put one block at the target − lambda and the other at the
/// target + lambda (the one with more outliers keeps more); every layer of
/// a block is pruned to its block's sparsity; without `allocation` both
/// blocks are at the target.
#[test]
fn owl_allocation_spreads_the_target_over_the_blocks() {
    let text = |alloc: &str| {
        format!(
            r#"recipe owl {{ version = 1, seed = 0 }}
use std.wanda
model lm = hf("{root}/tests/models/tiny-llama")
dataset calib = text("{root}/tests/models/tiny.txt", tokenizer = lm, seq = 32, samples = 8)
pipeline {{
  prune lm by wanda to 50% (targets = ["model.layers.*"], calibrate = calib{alloc})
  evaluate lm on calib -> [sparsity]
  export lm to "model" (format = hf)
}}
"#,
            root = root().display()
        )
    };
    let (_dir, runs) = run_texts(&[text(", allocation = owl(lambda = 0.1)"), text("")]);
    let block_sparsity = |out: &Path| -> Vec<f64> {
        let file = out.join("model/model.safetensors");
        let bytes = std::fs::read(&file).unwrap();
        let names: Vec<String> = safetensors::SafeTensors::deserialize(&bytes)
            .unwrap()
            .names()
            .into_iter()
            .map(String::from)
            .collect();
        (0..2)
            .map(|b| {
                let prefix = format!("model.layers.{b}.");
                let (mut total, mut zeros) = (0usize, 0usize);
                for n in names
                    .iter()
                    .filter(|n| n.starts_with(&prefix) && n.ends_with("proj.weight"))
                {
                    let w = tensor_f32(&file, n);
                    total += w.len();
                    zeros += w.iter().filter(|v| **v == 0.0).count();
                }
                zeros as f64 / total as f64
            })
            .collect()
    };
    let owl = block_sparsity(&runs[0].0);
    let uniform = block_sparsity(&runs[1].0);
    let mut sorted = owl.clone();
    sorted.sort_by(f64::total_cmp);
    assert!(
        (sorted[0] - 0.4).abs() < 0.01 && (sorted[1] - 0.6).abs() < 0.01,
        "{owl:?}"
    );
    assert!(
        uniform.iter().all(|s| (s - 0.5).abs() < 0.01),
        "{uniform:?}"
    );
    assert!(runs[0].1.contains("OWL outlier ratios"), "{}", runs[0].1);
}

/// The OWL example, reduced (11 blocks of SmolLM2, two calibration
/// windows): the allocation changes what Wanda and SparseGPT leave, at the
/// same overall sparsity.
#[test]
fn llm_owl_reduced_allocates_and_keeps_the_sparsity() {
    require_data("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2");
    let (_dir, _out, report) = run_ok(&[
        "examples/llm_owl.prune",
        "--set",
        "calib_samples=2",
        "--set",
        "eval_samples=1",
        "--set",
        "pruned=\"model.layers.2*\"",
    ]);
    for (uniform, owl) in [("wanda", "wanda_owl"), ("sparsegpt", "sparsegpt_owl")] {
        let (a, b) = (
            evaluation(&report, uniform, "perplexity"),
            evaluation(&report, owl, "perplexity"),
        );
        assert!(
            a.is_finite() && b.is_finite() && a != b,
            "{uniform}: {a} vs {b}"
        );
        let (sa, sb) = (
            evaluation(&report, uniform, "sparsity"),
            evaluation(&report, owl, "sparsity"),
        );
        assert!((sa - sb).abs() < 1e-3, "{sa} vs {sb}");
    }
}

/// Twin models share a training only while its data is the same: trained
/// on a data set before and after it is pruned, two identically declared
/// models train anew; after the prune, a third copies the second.
#[test]
fn twin_trainings_see_a_pruned_data_set_as_other_data() {
    require_data("digits/digits.csv.gz", "digits");
    let text = format!(
        r#"recipe twins {{ version = 1, seed = 2 }}
model a = mlp(inputs = 64, hidden = [16], classes = 10)
model b = mlp(inputs = 64, hidden = [16], classes = 10)
model c = mlp(inputs = 64, hidden = [16], classes = 10)
dataset train = digits("{root}/data/digits/digits.csv.gz", split = "train", batch = 32)
pipeline {{
  train a on train (epochs = 1)
  prune train by random() to 50%
  train b on train (epochs = 1)
  train c on train (epochs = 1)
  export a to "a.safetensors"
  export b to "b.safetensors"
  export c to "c.safetensors"
}}
"#,
        root = root().display()
    );
    let (_dir, runs) = run_texts(&[text]);
    let out = &runs[0].0;
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let copied = copied_steps(&report);
    assert_eq!(copied, [("c".to_string(), "b".to_string())], "{copied:?}");
    let w = |m: &str| tensor_f32(&out.join(format!("{m}.safetensors")), "fc1.weight");
    assert_ne!(w("a"), w("b"));
    assert_eq!(w("b"), w("c"));
}

#[test]
fn a_bounded_key_value_cache_evaluates_perplexity_under_each_policy() {
    let recipe = root().join("tests/recipes/run/tiny_llm_kv.prune");
    let dir = tempfile::tempdir().unwrap();
    let mut reports = Vec::new();
    for threads in ["1", "2"] {
        let out = run_with_env(
            &recipe,
            &dir.path().join(threads),
            &[("RAYON_NUM_THREADS", threads)],
        );
        let text = std::fs::read_to_string(out.join("report.json")).unwrap();
        reports.push(serde_json::from_str::<serde_json::Value>(&text).unwrap());
    }
    let report = &reports[0];
    let ppl = |label: &str| evaluation(report, label, "perplexity");
    // The whole window evicts nothing: the plain evaluation's bits (the
    // recipe asserts it too).
    assert_eq!(ppl("whole"), ppl("dense"));
    // A quarter of the window changes the result, differently per policy.
    let bounded = [ppl("recent"), ppl("h2o"), ppl("kvcrush")];
    for (i, p) in bounded.iter().enumerate() {
        assert_ne!(*p, ppl("dense"), "policy {i}");
        assert!(bounded[..i].iter().all(|q| q != p), "policy {i}");
    }
    // The report says which cache each evaluation ran with.
    let kv = |label: &str| {
        report["evaluations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["label"] == label)
            .unwrap()["kv_cache"]
            .clone()
    };
    assert_eq!(kv("dense"), serde_json::Value::Null);
    assert_eq!(kv("h2o")["keys"], 8);
    assert_eq!(kv("h2o")["window"], 32);
    assert_eq!(kv("kvcrush")["policy"], "kvcrush");
    assert_eq!(kv("whole")["keys"], 32);
    // One thread or two: the same numbers.
    assert_eq!(reports[0]["evaluations"], reports[1]["evaluations"]);
}

/// The key-value cache example, reduced (two 64-token windows): every
/// bounded evaluation decodes with its share of the window, and the
/// policies that read attention keep SmolLM2 far closer to the full cache
/// than the recent window does.
#[test]
fn llm_kv_reduced_bounds_every_evaluation() {
    require_data("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2");
    let (_dir, _out, report) = run_ok(&[
        "examples/llm_kv.prune",
        "--set",
        "eval_samples=2",
        "--set",
        "window=64",
        "--set",
        "margin=0%",
    ]);
    let evaluations = report["evaluations"].as_array().unwrap();
    assert_eq!(evaluations.len(), 7);
    for e in &evaluations[1..] {
        let kv = &e["kv_cache"];
        let label = e["label"].as_str().unwrap();
        let keys = if label.ends_with("small") { 16 } else { 32 };
        assert_eq!(kv["keys"], keys, "{label}");
        assert_eq!(kv["window"], 64, "{label}");
        assert!(label.starts_with(kv["policy"].as_str().unwrap()), "{label}");
    }
    let full = evaluation(&report, "full", "perplexity");
    for label in ["h2o_small", "kvcrush_small", "recent_small"] {
        assert!(evaluation(&report, label, "perplexity") > full, "{label}");
    }
}

/// Each block's sparsity in a report's layers of `model`.
fn block_sparsities(report: &serde_json::Value, model: &str, blocks: usize) -> Vec<f64> {
    (0..blocks)
        .map(|l| {
            let prefix = format!("model.layers.{l}.");
            let (kept, total) = report["layers"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|x| x["model"] == model && x["name"].as_str().unwrap().starts_with(&prefix))
                .fold((0.0, 0.0), |(k, t), x| {
                    (
                        k + x["kept"].as_f64().unwrap(),
                        t + x["total"].as_f64().unwrap(),
                    )
                });
            1.0 - kept / total
        })
        .collect()
}

#[test]
fn a_searched_front_gives_later_prunes_their_block_sparsities() {
    let recipe = root().join("tests/recipes/run/tiny_llm_search.prune");
    let dir = tempfile::tempdir().unwrap();
    let mut reports = Vec::new();
    for threads in ["1", "2"] {
        let out = run_with_env(
            &recipe,
            &dir.path().join(threads),
            &[("RAYON_NUM_THREADS", threads)],
        );
        let svg = std::fs::read_to_string(out.join("front.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("polyline"));
        let text = std::fs::read_to_string(out.join("report.json")).unwrap();
        reports.push(serde_json::from_str::<serde_json::Value>(&text).unwrap());
    }
    // Seeded: one thread or two, the same candidates and front.
    assert_eq!(reports[0]["searches"], reports[1]["searches"]);
    let report = &reports[0];
    let search = &report["searches"][0];
    let front = search["front"].as_array().unwrap();
    assert!(front.len() >= 2);
    assert_eq!(
        search["evaluated"],
        search["candidates"].as_array().unwrap().len()
    );
    let num = |v: &serde_json::Value| v.as_f64().unwrap();
    let blocks = |p: &serde_json::Value| -> Vec<f64> {
        p["blocks"].as_array().unwrap().iter().map(num).collect()
    };
    // Sorted by perplexity, sparsity rising along it: a front.
    for w in front.windows(2) {
        assert!(num(&w[0]["perplexity"]) < num(&w[1]["perplexity"]));
        assert!(num(&w[0]["sparsity"]) < num(&w[1]["sparsity"]));
    }
    // `pick = target`: the least-perplexity point at least 50% sparse, every
    // block moved by the same amount to average 50% (equal-sized blocks).
    let chosen = front
        .iter()
        .filter(|p| num(&p["sparsity"]) >= 0.5 - 1e-9)
        .min_by(|a, b| num(&a["perplexity"]).total_cmp(&num(&b["perplexity"])))
        .unwrap();
    let b = blocks(chosen);
    let shift = 0.5 - b.iter().sum::<f64>() / b.len() as f64;
    let got = block_sparsities(report, "at_target", b.len());
    // Per-row counts are floors over rows of 32 or 64 weights.
    for (g, s) in got.iter().zip(&b) {
        assert!(
            (g - (s + shift)).abs() < 1.0 / 32.0,
            "{got:?} vs {b:?} + {shift}"
        );
    }
    assert!((evaluation(report, "target", "sparsity") - 0.5).abs() < 0.01);
    // `pick = knee`: the knee's own sparsities.
    let knee = &front[search["knee"].as_u64().unwrap() as usize];
    let got = block_sparsities(report, "at_knee", b.len());
    for (g, s) in got.iter().zip(blocks(knee)) {
        assert!((g - s).abs() < 1.0 / 32.0, "{got:?} vs {knee}");
    }
    // The label's metrics, as the recipe's assert reads them.
    assert!(report["failed_assert"].is_null());
}

/// The searched-allocation example, reduced (four candidates of one
/// 64-token window, two calibration windows): the search's front is in
/// the report, and Wanda and SparseGPT prune to 50% with its blocks'
/// uneven sparsities.
#[test]
fn llm_search_reduced_prunes_with_a_point_of_the_front() {
    require_data("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2");
    let (_dir, out, report) = run_ok(&[
        "examples/llm_search.prune",
        "--set",
        "population=4",
        "--set",
        "generations=1",
        "--set",
        "search_samples=1",
        "--set",
        "calib_samples=2",
        "--set",
        "eval_samples=1",
        "--set",
        "seq=64",
    ]);
    assert!(out.join("front.svg").exists());
    let search = &report["searches"][0];
    assert_eq!(search["block_weights"].as_array().unwrap().len(), 30);
    assert!(!search["front"].as_array().unwrap().is_empty());
    for model in ["wan", "sgpt"] {
        let blocks = block_sparsities(&report, model, 30);
        let mean = blocks.iter().sum::<f64>() / 30.0;
        assert!((mean - 0.5).abs() < 1e-3, "{model}: {blocks:?}");
        let (lo, hi) = blocks
            .iter()
            .fold((1.0f64, 0.0f64), |(l, h), b| (l.min(*b), h.max(*b)));
        assert!(hi - lo > 0.01, "{model}: uniform {blocks:?}");
    }
}

#[test]
fn armor_refines_sparsegpt_at_2_4_and_reports_its_sparse_core() {
    let recipe = root().join("tests/recipes/run/tiny_llm_armor.prune");
    let dir = tempfile::tempdir().unwrap();
    let out = run_with_env(&recipe, &dir.path().join("out"), &[]);
    let text = std::fs::read_to_string(out.join("report.json")).unwrap();
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    // The recipe asserts ARMOR's perplexity below SparseGPT's.
    assert!(report["failed_assert"].is_null());
    assert!(
        evaluation(&report, "armor", "perplexity") < evaluation(&report, "sparsegpt", "perplexity")
    );
    // Every layer's calibration loss fell, as the report records it.
    let armor = &report["armor"][0];
    assert_eq!(armor["layers"].as_array().unwrap().len(), 14);
    for l in armor["layers"].as_array().unwrap() {
        assert!(
            l["loss_after"].as_f64().unwrap() < l["loss_before"].as_f64().unwrap(),
            "{l}"
        );
    }
    // The sparse core keeps the pattern: 50% of every block linear.
    assert!((evaluation(&report, "armor", "sparsity") - 0.5).abs() < 1e-9);
    for l in report["layers"].as_array().unwrap() {
        if l["model"] == "wrapped" {
            assert_eq!(
                l["kept"].as_u64().unwrap() * 2,
                l["total"].as_u64().unwrap(),
                "{l}"
            );
        }
    }
    // Parameters count the wrappers: at most 8 x (rows + cols) more per layer.
    let wrappers: f64 = report["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["model"] == "wrapped")
        .map(|l| {
            let s = l["shape"].as_array().unwrap();
            8.0 * (s[0].as_f64().unwrap() + s[1].as_f64().unwrap())
        })
        .sum();
    let params = evaluation(&report, "armor", "params");
    let dense = 26784.0;
    let core = dense
        - report["layers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["model"] == "wrapped")
            .map(|l| l["total"].as_f64().unwrap() / 2.0)
            .sum::<f64>();
    assert!(
        params > core && params <= core + wrappers,
        "{params} vs {core} + {wrappers}"
    );
    // `init` through a param: Wanda's result is another (worse) start.
    let out = dir.path().join("wanda");
    let (code, text) = prunec(
        &[
            "run",
            "-q",
            recipe.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--set",
            "init_method=wanda",
        ],
        &[],
    );
    assert_eq!(code, 0, "{text}");
    let text = std::fs::read_to_string(out.join("report.json")).unwrap();
    let with_wanda: serde_json::Value = serde_json::from_str(&text).unwrap();
    let start = |r: &serde_json::Value| r["armor"][0]["loss_before"].as_f64().unwrap();
    assert!(start(&with_wanda) > start(&report));
}

/// The ARMOR example, reduced to the first block and one round, with the
/// full calibration (ARMOR fits the layers' calibration inputs: with eight
/// windows it ended slightly above SparseGPT on held-out text): ARMOR's
/// held-out perplexity below SparseGPT's, the recipe's own assert.
#[test]
fn llm_armor_reduced_beats_the_sparsegpt_it_starts_from() {
    require_data("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2");
    let (_dir, _out, report) = run_ok(&[
        "examples/llm_armor.prune",
        "--set",
        "pruned=\"model.layers.0.*\"",
        "--set",
        "iters=1",
        "--set",
        "calib_samples=32",
        "--set",
        "eval_samples=2",
    ]);
    assert!(report["failed_assert"].is_null());
    let (armor, sparsegpt) = (
        evaluation(&report, "armor", "perplexity"),
        evaluation(&report, "sparsegpt", "perplexity"),
    );
    assert!(armor < sparsegpt, "{armor} vs {sparsegpt}");
}
