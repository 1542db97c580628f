//! `prunec run --sweep`: the variants share the stages they run alike, fork
//! where a swept param is first read, each writes what its run alone writes,
//! and the sweep's lock replays them all. Needs `scripts/fetch-data.sh digits
//! mnist`.

use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const DIGITS: &str = "tests/recipes/run/digits_imp.prune";

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

fn prunec(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_prunec"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("run prunec");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn json(path: &Path) -> Json {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// A lock's outputs: path → sha256.
fn lock_outputs(lock: &Path) -> BTreeMap<String, String> {
    json(lock)["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["path"].as_str().unwrap().to_string(),
                o["sha256"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Every evaluation's metrics of a report, in order.
fn evaluations(report: &Json) -> Vec<Json> {
    report["evaluations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["metrics"].clone())
        .collect()
}

/// The steps of `sweep.json` of one kind: the variants each ran for.
fn steps_of(sweep: &Json, kind: &str) -> Vec<Vec<String>> {
    sweep["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kind"] == kind)
        .map(|s| {
            s["variants"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        })
        .collect()
}

/// Runs `recipe` alone with `set` and checks that the variant folder `dir`
/// holds the same outputs (by the locks' hashes) and the same evaluations.
fn assert_same_as_solo(recipe: &str, set: &[&str], dir: &Path, scratch: &Path) {
    let solo = scratch.join(format!(
        "solo-{}",
        dir.file_name().unwrap().to_string_lossy()
    ));
    let mut args = vec!["run", "-q", recipe, "--out", solo.to_str().unwrap()];
    for s in set {
        args.extend(["--set", s]);
    }
    let (code, text) = prunec(&args);
    assert!(code == 0 || code == 2, "{text}");
    let (a, b) = (
        lock_outputs(&dir.join("prune.lock")),
        lock_outputs(&solo.join("prune.lock")),
    );
    assert!(!a.is_empty());
    assert_eq!(a, b, "{} differs from its run alone", dir.display());
    assert_eq!(
        evaluations(&json(&dir.join("report.json"))),
        evaluations(&json(&solo.join("report.json")))
    );
    assert_eq!(
        json(&dir.join("report.json"))["params"],
        json(&solo.join("report.json"))["params"]
    );
}

#[test]
fn a_sweep_trains_once_forks_at_the_prune_and_matches_each_run_alone() {
    require_data("digits/digits.csv.gz", "digits");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sweep");
    let (code, text) = prunec(&[
        "run",
        "-q",
        DIGITS,
        "--sweep",
        "target=80%,85%,90%",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");
    let names = ["target-80pct", "target-85pct", "target-90pct"];
    for f in ["sweep.md", "sweep.svg", "sweep.json", "prune.lock"] {
        assert!(out.join(f).is_file(), "no {f}");
    }
    for n in names {
        for f in ["net.safetensors", "report.json", "prune.lock", "rounds.svg"] {
            assert!(out.join(n).join(f).is_file(), "no {n}/{f}");
        }
    }
    let sweep = json(&out.join("sweep.json"));
    // One dense training and one dense evaluation for all three; then each
    // variant prunes (its round block inside), asserts and exports alone.
    let all: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    assert_eq!(steps_of(&sweep, "train"), vec![all.clone()]);
    // The round blocks' evaluations are steps of each variant alone.
    let evals = steps_of(&sweep, "evaluate");
    assert_eq!(evals[0], all);
    assert!(evals[1..].iter().all(|v| v.len() == 1), "{evals:?}");
    let prunes = steps_of(&sweep, "prune");
    assert_eq!(
        prunes,
        names
            .iter()
            .map(|n| vec![n.to_string()])
            .collect::<Vec<_>>()
    );
    assert_eq!(steps_of(&sweep, "export").len(), 3);
    // Each variant's report lists the shared training among its steps.
    let report = json(&out.join("target-85pct/report.json"));
    let train = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["kind"] == "train")
        .unwrap();
    assert_eq!(train["variants"].as_array().unwrap().len(), 3);
    assert_eq!(report["params"]["target"].as_f64(), Some(0.85));
    // The comparison has one row per variant, with its sparsity.
    let rows = sweep["variants"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for (row, want) in rows.iter().zip([0.80, 0.85, 0.90]) {
        let s = row["metrics"]["final.sparsity"].as_f64().unwrap();
        assert!((s - want).abs() < 1e-3, "{row}");
    }
    let md = std::fs::read_to_string(out.join("sweep.md")).unwrap();
    assert!(
        md.contains("| [target-90pct](target-90pct/report.md) | 90% |"),
        "{md}"
    );
    // Bit-identical to the runs alone: a forked branch and the last one.
    assert_same_as_solo(
        DIGITS,
        &["target=80%"],
        &out.join("target-80pct"),
        tmp.path(),
    );
    assert_same_as_solo(
        DIGITS,
        &["target=90%"],
        &out.join("target-90pct"),
        tmp.path(),
    );
    // The sweep's lock replays every variant; a variant's lock replays it alone.
    let lock = out.join("prune.lock");
    let locked = lock_outputs(&lock);
    assert!(
        locked.contains_key("target-85pct/net.safetensors"),
        "{locked:?}"
    );
    assert!(locked.contains_key("sweep.svg"));
    let (code, text) = prunec(&["verify", lock.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    let (code, text) = prunec(&[
        "verify",
        out.join("target-85pct/prune.lock").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");
    // A tampered variant output fails the sweep's verify, named.
    let model = out.join("target-85pct/net.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&model, bytes).unwrap();
    let (code, text) = prunec(&["verify", lock.to_str().unwrap()]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("target-85pct/net.safetensors"), "{text}");
}

#[test]
fn a_grid_forks_where_each_param_is_first_read() {
    require_data("digits/digits.csv.gz", "digits");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("grid");
    // `floor` is read by the assert only: the prune steps are shared by the
    // two floors of each target; `floor = 99%` fails its assert.
    let (code, text) = prunec(&[
        "run",
        "-q",
        DIGITS,
        "--sweep",
        "target=80%,90%",
        "--sweep",
        "floor=0%,99%",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("in the variant target-80pct_floor-99pct"),
        "{text}"
    );
    assert!(
        text.contains("in the variant target-90pct_floor-99pct"),
        "{text}"
    );
    assert!(
        !text.contains("in the variant target-80pct_floor-0pct"),
        "{text}"
    );
    let sweep = json(&out.join("sweep.json"));
    assert_eq!(steps_of(&sweep, "train").len(), 1);
    assert_eq!(
        steps_of(&sweep, "prune"),
        vec![
            vec!["target-80pct_floor-0pct", "target-80pct_floor-99pct"],
            vec!["target-90pct_floor-0pct", "target-90pct_floor-99pct"],
        ]
    );
    assert_eq!(steps_of(&sweep, "assert").len(), 4);
    // The failed variants stop at their assert: no export of theirs.
    assert_eq!(steps_of(&sweep, "export").len(), 2);
    assert!(!out
        .join("target-80pct_floor-99pct/net.safetensors")
        .exists());
    let failed = json(&out.join("target-80pct_floor-99pct/report.json"));
    assert!(failed["failed_assert"].is_string());
    assert_same_as_solo(
        DIGITS,
        &["target=90%", "floor=99%"],
        &out.join("target-90pct_floor-99pct"),
        tmp.path(),
    );
}

#[test]
fn sweep_mistakes_are_refused_before_any_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let o = out.to_str().unwrap();
    for (args, want) in [
        (vec!["--sweep", "nope=1,2"], "nope"),
        (vec!["--sweep", "target=80%,150%"], "target-150pct"),
        (vec!["--sweep", "target=1,,2"], "empty value"),
        (
            vec!["--set", "target=80%", "--sweep", "target=80%,90%"],
            "both set",
        ),
        (
            vec!["--sweep", "target=80%", "--sweep", "target=90%"],
            "given twice",
        ),
    ] {
        let mut all = vec!["run", "-q", DIGITS, "--out", o];
        all.extend(args.iter().copied());
        let (code, text) = prunec(&all);
        assert_eq!(code, 1, "{args:?}: {text}");
        assert!(text.contains(want), "{args:?}: {text}");
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
}

#[test]
fn lenet300_magnitude_sweep_reduced_trains_the_dense_network_once() {
    require_data("mnist", "mnist");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lenet");
    let recipe = "examples/lenet300_magnitude.prune";
    let reduced = ["epochs=1", "retrain=1", "final_epochs=1"];
    let mut args = vec!["run", "-q", recipe, "--out", out.to_str().unwrap()];
    for s in &reduced {
        args.extend(["--set", s]);
    }
    args.extend(["--sweep", "target=50%,70%,90%"]);
    let (code, text) = prunec(&args);
    assert_eq!(code, 0, "{text}");
    let sweep = json(&out.join("sweep.json"));
    let trains = steps_of(&sweep, "train");
    assert_eq!(trains.len(), 1, "{sweep}");
    assert_eq!(trains[0].len(), 3);
    assert_eq!(steps_of(&sweep, "prune").len(), 3);
    // The lock pins the reduction as `--set` overrides.
    assert_eq!(json(&out.join("prune.lock"))["params_text"]["epochs"], "1");
    let mut solo = reduced.to_vec();
    solo.push("target=70%");
    assert_same_as_solo(recipe, &solo, &out.join("target-70pct"), tmp.path());
}

#[test]
fn a_sweep_computes_the_statistics_its_variants_share_once() {
    require_data("digits/digits.csv.gz", "digits");
    const STATS: &str = "tests/recipes/run/digits_stats.prune";
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("stats");
    let (code, text) = prunec(&[
        "run",
        "-q",
        STATS,
        "--sweep",
        "target=40%,70%",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");
    let sweep = json(&out.join("sweep.json"));
    let both = vec!["target-40pct".to_string(), "target-70pct".to_string()];
    // Gradients (Taylor) and activation norms (Wanda): each once, for both
    // variants; the prunes that read them fork by target.
    assert_eq!(steps_of(&sweep, "statistics"), vec![both.clone(), both]);
    assert_eq!(steps_of(&sweep, "prune").len(), 4);
    for (v, set) in [
        ("target-40pct", "target=40%"),
        ("target-70pct", "target=70%"),
    ] {
        assert_same_as_solo(STATS, &[set], &out.join(v), tmp.path());
    }
}

/// The sensitivity analysis example as a grid sweep (reduced): one dense
/// training for all, each layer pruned alone; pruning a layer harder costs
/// accuracy, and the plot's curves are per layer against the sparsity.
#[test]
fn sensitivity_example_sweeps_each_layer_alone() {
    require_data("mnist/train-images-idx3-ubyte", "mnist");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sens");
    let (code, text) = prunec(&[
        "run",
        "-q",
        "examples/sensitivity.prune",
        "--set",
        "samples=3000",
        "--set",
        "epochs=2",
        "--sweep",
        "target=50%,98%",
        "--sweep",
        "tensor=\"fc1.weight\",\"fc2.weight\",\"fc3.weight\"",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");
    let sweep = json(&out.join("sweep.json"));
    assert_eq!(steps_of(&sweep, "train").len(), 1);
    let variants = sweep["variants"].as_array().unwrap();
    assert_eq!(variants.len(), 6);
    let acc = |target: &str, tensor: &str| {
        variants
            .iter()
            .find(|v| {
                v["values"]["target"].as_str() == Some(target)
                    && v["values"]["tensor"].as_str() == Some(tensor)
            })
            .unwrap_or_else(|| panic!("no variant {target} {tensor}: {variants:?}"))["metrics"]
            ["pruned.accuracy"]
            .as_f64()
            .unwrap()
    };
    for tensor in ["\"fc1.weight\"", "\"fc2.weight\"", "\"fc3.weight\""] {
        assert!(acc("98%", tensor) < acc("50%", tensor), "{tensor}");
    }
    let svg = std::fs::read_to_string(out.join("sweep.svg")).unwrap();
    assert!(svg.contains("pruned.accuracy against target"));
    assert!(svg.contains("tensor=&quot;fc3.weight&quot;"));
}
