//! ONNX classifier graphs against onnxruntime's outputs (written by
//! `scripts/interop/make_onnx_model.py` into `tests/models/`), their checks, their
//! gradients and activation statistics, and the write-back of pruned initializers.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use prunec_runtime::onnx::OnnxGraph;
use prunec_runtime::{Dataset, ModelSpec, RuntimeError};

fn models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/models")
}

/// The inputs and onnxruntime's outputs of a model's `.expected.json`.
fn expected(name: &str) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let text = std::fs::read_to_string(models().join(format!("{name}.expected.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rows = |k: &str| -> Vec<Vec<f32>> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect()
    };
    (rows("inputs"), rows("logits"))
}

fn forward_matches(name: &str) {
    let model = ModelSpec::onnx(models().join(format!("{name}.onnx")))
        .build(0, &Device::Cpu)
        .unwrap();
    let (inputs, want) = expected(name);
    let n = inputs.len();
    let x = Tensor::from_vec(inputs.concat(), (n, 64), &Device::Cpu).unwrap();
    let mut y = model.forward(&x).unwrap();
    if name == "ops_mix" {
        // The graph ends with a Softmax, which prunec leaves to its loss.
        y = candle_nn::ops::softmax(&y, 1).unwrap();
    }
    let got: Vec<Vec<f32>> = y.to_vec2().unwrap();
    let mut worst = 0f32;
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.len(), w.len());
        for (a, b) in g.iter().zip(w) {
            worst = worst.max((a - b).abs());
        }
    }
    assert!(
        worst <= 1e-4,
        "{name}: largest difference from onnxruntime {worst}"
    );
}

#[test]
fn the_digit_cnn_gives_onnxruntimes_logits() {
    forward_matches("digits_cnn");
}

#[test]
fn the_op_mix_gives_onnxruntimes_outputs() {
    forward_matches("ops_mix");
}

#[test]
fn parameters_are_the_layer_weights_and_biases_in_prunecs_layout() {
    let g = OnnxGraph::open(&models().join("digits_cnn.onnx")).unwrap();
    let names: Vec<(&str, &[usize], bool)> = g
        .params()
        .iter()
        .map(|p| (p.name.as_str(), p.shape.as_slice(), p.transposed))
        .collect();
    assert_eq!(
        names,
        [
            ("conv1.weight", &[8, 1, 3, 3][..], false),
            ("conv1.bias", &[8][..], false),
            ("conv2.weight", &[16, 8, 3, 3][..], false),
            ("conv2.bias", &[16][..], false),
            ("conv3.weight", &[16, 16, 3, 3][..], false),
            ("conv3.bias", &[16][..], false),
            ("fc1.weight", &[32, 64][..], false),
            ("fc1.bias", &[32][..], false),
            // MatMul's [in, out] weight, held as [out, in].
            ("fc2.weight", &[10, 32][..], true),
            ("fc2.bias", &[10][..], false),
        ]
    );
    assert_eq!(g.input_shape(), [1, 8, 8]);
    assert_eq!(g.classes(), 10);
    let positions: Vec<usize> = g.costs().iter().map(|c| c.positions).collect();
    assert_eq!(positions, [64, 16, 16, 1, 1]);
    // Gemm with transB = 0 is transposed too.
    let ops = OnnxGraph::open(&models().join("ops_mix.onnx")).unwrap();
    let gemm = ops
        .params()
        .iter()
        .find(|p| p.name == "gemm.weight")
        .unwrap();
    assert_eq!(
        (gemm.shape.as_slice(), gemm.transposed),
        (&[6, 4][..], true)
    );
}

#[test]
fn unreadable_and_unsupported_graphs_are_errors_naming_the_problem() {
    let e = OnnxGraph::open(&models().join("unsupported_op.onnx")).unwrap_err();
    assert!(matches!(e, RuntimeError::UnsupportedModel { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("`erf_0`") && msg.contains("`Erf`"), "{msg}");
    let e = OnnxGraph::open(&models().join("truncated.onnx")).unwrap_err();
    assert!(matches!(e, RuntimeError::CorruptFile { .. }), "{e}");
    let e = OnnxGraph::open(&models().join("missing.onnx")).unwrap_err();
    assert!(matches!(e, RuntimeError::Io { .. }), "{e}");
}

/// Eight digits with their labels, as a data set.
fn digits_sample() -> Dataset {
    let (inputs, _) = expected("digits_cnn");
    let n = inputs.len();
    let x = Tensor::from_vec(inputs.concat(), (n, 64), &Device::Cpu).unwrap();
    let y = Tensor::from_vec(
        (0..n as u32).map(|i| i % 10).collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )
    .unwrap();
    Dataset::from_tensors("digits sample", x, y, 10, 4, None).unwrap()
}

#[test]
fn gradients_and_activation_statistics_cover_every_weight() {
    let model = ModelSpec::onnx(models().join("digits_cnn.onnx"))
        .build(0, &Device::Cpu)
        .unwrap();
    let data = digits_sample();
    let grads = prunec_runtime::gradients(&model, &data, 2).unwrap();
    assert_eq!(grads.len(), model.params().len());
    for (name, g) in &grads {
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "gradient of {name}: {norm}");
        assert_eq!(g.dims(), model.param(name).unwrap().var.dims());
    }
    let stats = prunec_runtime::activation_stats(&model, &data, 2).unwrap();
    let summary: Vec<(&str, usize, usize)> = stats
        .iter()
        .map(|s| (s.name.as_str(), s.rows, s.sum_sq.len()))
        .collect();
    assert_eq!(
        summary,
        [
            ("conv1.weight", 8 * 64, 9),
            ("conv2.weight", 8 * 16, 72),
            ("conv3.weight", 8 * 16, 144),
            ("fc1.weight", 8, 64),
            ("fc2.weight", 8, 32),
        ]
    );
    // conv1 sees the images: interior columns sum the squared pixels of every window.
    let (inputs, _) = expected("digits_cnn");
    let total: f64 = inputs.iter().flatten().map(|v| f64::from(*v).powi(2)).sum();
    let centre = stats[0].sum_sq[4];
    assert!((centre - total).abs() < 1e-3 * total, "{centre} vs {total}");
}

#[test]
fn pruned_weights_are_written_into_the_same_graph() {
    let src = models().join("digits_cnn.onnx");
    let model = ModelSpec::onnx(&src).build(0, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Unchanged, the export is the file itself.
    let same = dir.path().join("same.onnx");
    model.save_onnx(&same, &[]).unwrap();
    assert_eq!(std::fs::read(&same).unwrap(), std::fs::read(&src).unwrap());
    // Zero every other value of every weight (fc2.weight is transposed in the file).
    let mut pruned = std::collections::BTreeMap::new();
    for p in model.params().iter().filter(|p| !p.is_bias()) {
        let mut v = model.param_f32(&p.name).unwrap();
        v.iter_mut().step_by(2).for_each(|x| *x = 0.0);
        model.set_param_f32(&p.name, &v).unwrap();
        pruned.insert(p.name.clone(), v);
    }
    let out = dir.path().join("pruned.onnx");
    model.save_onnx(&out, &[]).unwrap();
    assert_eq!(
        std::fs::metadata(&out).unwrap().len(),
        std::fs::metadata(&src).unwrap().len()
    );
    let (a, b) = (
        OnnxGraph::open(&src).unwrap(),
        OnnxGraph::open(&out).unwrap(),
    );
    for (ca, cb) in a.constants().iter().zip(b.constants()) {
        assert_eq!((&ca.name, &ca.dims), (&cb.name, &cb.dims));
        if !pruned.contains_key(&ca.name) {
            assert_eq!(ca.values, cb.values, "{} changed", ca.name);
        }
    }
    let back = ModelSpec::onnx(&out).build(0, &Device::Cpu).unwrap();
    for (name, v) in &pruned {
        assert_eq!(&back.param_f32(name).unwrap(), v, "{name}");
    }
    // The export refuses to overwrite its source.
    assert!(model.save_onnx(&src, &[]).is_err());
}

#[test]
fn damaged_files_are_errors_or_graphs_never_panics() {
    let good = std::fs::read(models().join("digits_cnn.onnx")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("damaged.onnx");
    let open = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        // An error is fine (a panic fails the test); a graph that opens must run.
        if let Ok(g) = OnnxGraph::open(&path) {
            let model = ModelSpec::onnx(&path).build(0, &Device::Cpu).unwrap();
            let size: usize = g.input_shape().iter().product();
            let x = Tensor::zeros((3, size), candle_core::DType::F32, &Device::Cpu).unwrap();
            let y = model.forward(&x).unwrap();
            assert_eq!(y.dims(), [3, model.classes()]);
        }
    };
    for len in (0..good.len()).step_by(211) {
        open(&good[..len]);
    }
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..600 {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let mut bytes = good.clone();
        let at = (s >> 16) as usize % bytes.len();
        bytes[at] ^= 1 << (s % 8);
        if s.is_multiple_of(3) {
            bytes[at] = 0xff;
        }
        open(&bytes);
    }
}
