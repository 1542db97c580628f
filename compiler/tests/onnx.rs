//! `onnx(...)` models end to end: the example runs, its evaluation agrees with
//! onnxruntime's accuracy (`tests/models/digits_cnn.expected.json`), the export is
//! the source graph with only the pruned values changed, and every criterion that
//! needs no training runs on a graph (Wanda's 2:4 groups along each weight's input,
//! also for a weight the file stores as `[in, out]`).

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use prost::Message;
use prunec_runtime::onnx::proto::ModelProto;
use prunec_runtime::ModelSpec;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn require_digits() {
    assert!(
        root().join("data/digits/digits.csv.gz").exists(),
        "data/digits is missing: run `scripts/fetch-data.sh digits`"
    );
}

/// `prunec run -q RECIPE --out DIR/out` with `threads` threads; expects success, returns
/// the output folder and report.
fn run_with(recipe: &str, dir: &Path, threads: &str) -> (PathBuf, serde_json::Value) {
    let out = dir.join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_prunec"))
        .args(["run", "-q", recipe, "--out", out.to_str().unwrap()])
        .env("RAYON_NUM_THREADS", threads)
        .env("CANDLE_NUM_THREADS", threads)
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let report =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    (out, report)
}

fn run(recipe: &str, dir: &Path) -> (PathBuf, serde_json::Value) {
    run_with(recipe, dir, "2")
}

fn accuracy(report: &serde_json::Value, label: &str) -> f64 {
    report["evaluations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["label"] == label)
        .unwrap_or_else(|| panic!("no evaluation `{label}`"))["metrics"]["accuracy"]
        .as_f64()
        .unwrap()
}

#[test]
fn the_onnx_example_exports_the_same_graph_with_its_pruned_weights() {
    require_digits();
    let dir = tempfile::tempdir().unwrap();
    let (out, report) = run("examples/onnx_digits.prune", dir.path());
    // prunec's dense accuracy is onnxruntime's (make_onnx_model.py).
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/models/digits_cnn.expected.json")).unwrap(),
    )
    .unwrap();
    let dense = accuracy(&report, "dense");
    assert!(
        (dense - expected["accuracy"].as_f64().unwrap()).abs() < 1e-9,
        "{dense}"
    );

    let src = root().join("tests/models/digits_cnn.onnx");
    let exported = out.join("digits_cnn_pruned.onnx");
    let (a, b) = (
        std::fs::read(&src).unwrap(),
        std::fs::read(&exported).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    // The pruned values, in prunec's layout: each zero or the source's value.
    let before = ModelSpec::onnx(&src).build(0, &Device::Cpu).unwrap();
    let after = ModelSpec::onnx(&exported).build(0, &Device::Cpu).unwrap();
    let mut zeroed = 0;
    for p in before.params() {
        let (x, y) = (
            before.param_f32(&p.name).unwrap(),
            after.param_f32(&p.name).unwrap(),
        );
        let layer = report["layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == p.name.as_str())
            .unwrap();
        let kept = y.iter().filter(|v| **v != 0.0).count();
        assert_eq!(kept as u64, layer["kept"].as_u64().unwrap(), "{}", p.name);
        for (u, v) in x.iter().zip(&y) {
            assert!(*v == 0.0 || v == u, "{}: {u} became {v}", p.name);
            zeroed += usize::from(*v == 0.0 && *u != 0.0);
        }
        if p.name == "conv1.weight" || p.is_bias() {
            assert_eq!(x, y, "{} is skipped", p.name);
        }
    }
    assert!(zeroed > 2000, "{zeroed}");
    // Nothing but those values' bytes changed...
    let changed = a.iter().zip(&b).filter(|(u, v)| u != v).count();
    assert!(changed <= 4 * zeroed, "{changed} bytes changed");
    // ...and the decoded graph equals the source's once the weights are put back.
    let (ma, mut mb) = (
        ModelProto::decode(a.as_slice()).unwrap(),
        ModelProto::decode(b.as_slice()).unwrap(),
    );
    let ga = ma.graph.as_ref().unwrap();
    for (ta, tb) in ga
        .initializer
        .iter()
        .zip(&mut mb.graph.as_mut().unwrap().initializer)
    {
        tb.raw_data = ta.raw_data.clone();
    }
    assert_eq!(ma, mb);

    // The same recipe and inputs give the same bytes.
    let again = tempfile::tempdir().unwrap();
    let (out2, _) = run("examples/onnx_digits.prune", again.path());
    assert_eq!(
        std::fs::read(out2.join("digits_cnn_pruned.onnx")).unwrap(),
        b
    );
    let verify = Command::new(env!("CARGO_BIN_EXE_prunec"))
        .args(["verify", out.join("prune.lock").to_str().unwrap()])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

#[test]
fn every_criterion_without_training_prunes_an_onnx_graph() {
    require_digits();
    let dir = tempfile::tempdir().unwrap();
    let (out, report) = run("tests/recipes/run/onnx_criteria.prune", dir.path());
    // The recipe's asserts held (exit 0); Wanda 2:4 along every weight's input,
    // fc2 included, which the file stores as [in, out] for a MatMul.
    assert!(accuracy(&report, "wanda") >= 0.8);
    let m = ModelSpec::onnx(out.join("wanda.onnx"))
        .build(0, &Device::Cpu)
        .unwrap();
    for name in ["conv2.weight", "conv3.weight", "fc1.weight", "fc2.weight"] {
        let w = m.param_f32(name).unwrap();
        for group in w.chunks(4) {
            assert_eq!(group.iter().filter(|v| **v == 0.0).count(), 2, "{name}");
        }
    }
    assert_eq!(m.param("fc2.weight").unwrap().shape(), [10, 32]);
    // Gradients through the graph, activation statistics and selections give the same
    // bytes with one thread.
    let one = tempfile::tempdir().unwrap();
    let (out1, _) = run_with("tests/recipes/run/onnx_criteria.prune", one.path(), "1");
    assert_eq!(
        std::fs::read_to_string(out1.join("prune.lock")).unwrap(),
        std::fs::read_to_string(out.join("prune.lock")).unwrap()
    );
}
