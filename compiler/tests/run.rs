//! End-to-end runs of `prunec run` and `prunec verify` on real data: outputs,
//! report schema, determinism across thread counts, exit codes and faults.
//! Needs `scripts/fetch-data.sh digits mnist` (the tests say so when it is missing).

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
        "timings",
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
fn outputs_are_identical_with_one_and_two_threads() {
    require_data("digits/digits.csv.gz", "digits");
    let dir = tempfile::tempdir().unwrap();
    let mut hashes = Vec::new();
    for threads in ["1", "2"] {
        let out = dir.path().join(threads);
        let (code, text) = prunec(
            &["run", "-q", RECIPE, "--out", out.to_str().unwrap()],
            &[
                ("RAYON_NUM_THREADS", threads),
                ("CANDLE_NUM_THREADS", threads),
            ],
        );
        assert_eq!(code, 0, "{text}");
        hashes.push(std::fs::read_to_string(out.join("prune.lock")).unwrap());
    }
    assert_eq!(hashes[0], hashes[1]);
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
    let (code, text) = prunec(
        &[
            "run",
            "-q",
            recipe.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
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
    let (code, text) = prunec(
        &[
            "run",
            "-q",
            recipe.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
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
    let mut guard_binds = false;
    for l in report["layers"].as_array().unwrap() {
        if !l["name"].as_str().unwrap().ends_with(".weight") {
            continue;
        }
        let kept = l["kept"].as_f64().unwrap() / l["total"].as_f64().unwrap();
        if l["model"] == "guarded" {
            assert!(kept >= 0.01 - 1e-9, "{l}");
        } else if kept < 0.01 {
            guard_binds = true;
        }
    }
    assert!(
        guard_binds,
        "the unguarded run keeps every layer above 1%: the comparison shows nothing"
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
    let (code, text) = prunec(
        &[
            "run",
            "-q",
            recipe.to_str().unwrap(),
            "--out",
            out2.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("fc2.weight") && text.contains("NaN"),
        "{text}"
    );
    assert!(files_in(&out2).is_empty(), "{:?}", files_in(&out2));
    // The input model was not modified.
    assert_eq!(std::fs::read(&model).unwrap(), bytes);
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
