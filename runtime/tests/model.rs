//! Models: names, shapes (header-only), counts, seeded init, raw f32 access, snapshots,
//! save/load through safetensors, and the pretrained CNN's accuracy on MNIST.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{load, OrPanic};
use prunec_runtime::eval::model_counts;
use prunec_runtime::{
    evaluate, Activation, Architecture, DatasetKind, InitScheme, Masks, ModelSpec, RuntimeError,
    Split,
};

#[test]
fn lenet_300_100_names_shapes_and_counts() {
    let spec = ModelSpec::lenet_300_100();
    let shapes = spec.param_shapes().or_panic();
    let names: Vec<_> = shapes.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "fc1.weight",
            "fc1.bias",
            "fc2.weight",
            "fc2.bias",
            "fc3.weight",
            "fc3.bias"
        ]
    );
    assert_eq!(shapes[0].1, vec![300, 784]);
    let model = spec.build(0, &Device::Cpu).or_panic();
    assert_eq!(model.param_count(), 266_610);
    assert_eq!(model.flops(), 2 * (784 * 300 + 300 * 100 + 100 * 10));
    let out = model
        .forward(&Tensor::zeros((5, 1, 28, 28), DType::F32, &Device::Cpu).unwrap())
        .or_panic();
    assert_eq!(out.dims(), &[5, 10]);
}

#[test]
fn lenet5_and_cnn_flops() {
    let m = ModelSpec::lenet5().build(0, &Device::Cpu).or_panic();
    assert_eq!(m.param_count(), 61_706);
    // conv1: 6*25 weights at 28*28 positions; conv2: 16*6*25 at 10*10; fc 400*120 + 120*84 + 84*10.
    let macs = 150 * 784 + 2400 * 100 + 400 * 120 + 120 * 84 + 84 * 10;
    assert_eq!(m.flops(), 2 * macs as u64);
    let cnn = ModelSpec::pretrained_cnn()
        .build(0, &Device::Cpu)
        .or_panic();
    let macs = 288 * 784 + 18_432 * 196 + 73_728 * 49 + 294_912 + 2560;
    assert_eq!(cnn.flops(), 2 * macs as u64);
    assert_eq!(cnn.classes(), 10);
}

#[test]
fn bad_architectures_are_config_errors() {
    let tiny = ModelSpec {
        architecture: Some(Architecture::Lenet5 {
            input_shape: vec![1, 8, 8],
            classes: 10,
            activation: Activation::Relu,
        }),
        weights: prunec_runtime::model::WeightSource::Init(InitScheme::default()),
    };
    let err = tiny.build(0, &Device::Cpu).unwrap_err();
    assert!(matches!(err, RuntimeError::InvalidConfig(_)), "{err}");
    assert!(ModelSpec::mlp(&[784], Activation::Relu)
        .param_shapes()
        .is_err());
}

#[test]
fn init_is_seeded_and_follows_the_scheme_bounds() {
    let a = ModelSpec::lenet_300_100().build(3, &Device::Cpu).or_panic();
    let b = ModelSpec::lenet_300_100().build(3, &Device::Cpu).or_panic();
    let c = ModelSpec::lenet_300_100().build(4, &Device::Cpu).or_panic();
    assert_eq!(a.weights_sha256().or_panic(), b.weights_sha256().or_panic());
    assert_ne!(a.weights_sha256().or_panic(), c.weights_sha256().or_panic());
    let w = a.param_f32("fc1.weight").or_panic();
    let bound = 1.0 / 784f32.sqrt();
    assert!(w.iter().all(|v| v.abs() <= bound));
    let mean_abs = w.iter().map(|v| v.abs() as f64).sum::<f64>() / w.len() as f64;
    assert!(
        (mean_abs - bound as f64 / 2.0).abs() < 0.01 * bound as f64,
        "uniform mean |w| {mean_abs}"
    );
    for (scheme, std) in [
        (InitScheme::KaimingNormal, (2.0f64 / 784.0).sqrt()),
        (InitScheme::KaimingUniform, (2.0f64 / 784.0).sqrt()),
        (InitScheme::XavierUniform, (2.0f64 / (784.0 + 300.0)).sqrt()),
    ] {
        let m = ModelSpec::lenet_300_100()
            .with_init(scheme)
            .build(1, &Device::Cpu)
            .or_panic();
        let w = m.param_f32("fc1.weight").or_panic();
        let var = w.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / w.len() as f64;
        assert!(
            (var.sqrt() / std - 1.0).abs() < 0.02,
            "{scheme:?}: std {} vs {std}",
            var.sqrt()
        );
        assert!(m.param_f32("fc1.bias").or_panic().iter().all(|&b| b == 0.0));
    }
}

#[test]
fn a_fork_owns_its_values_and_a_clone_shares_them() {
    let m = ModelSpec::mlp(&[4, 3, 2], Activation::Tanh)
        .build(0, &Device::Cpu)
        .or_panic();
    let before = m.param_f32("fc1.weight").or_panic();
    let fork = m.fork().or_panic();
    let shared = m.clone();
    let vals: Vec<f32> = (0..12).map(|i| i as f32).collect();
    m.set_param_f32("fc1.weight", &vals).or_panic();
    assert_eq!(fork.param_f32("fc1.weight").or_panic(), before);
    assert_eq!(shared.param_f32("fc1.weight").or_panic(), vals);
    fork.set_param_f32("fc2.weight", &[0.5; 6]).or_panic();
    assert_ne!(m.param_f32("fc2.weight").or_panic(), vec![0.5; 6]);
}

#[test]
fn raw_f32_access_snapshots_and_restore() {
    let m = ModelSpec::mlp(&[4, 3, 2], Activation::Tanh)
        .build(0, &Device::Cpu)
        .or_panic();
    let snap = m.snapshot().or_panic();
    let vals: Vec<f32> = (0..12).map(|i| i as f32).collect();
    m.set_param_f32("fc1.weight", &vals).or_panic();
    assert_eq!(m.param_f32("fc1.weight").or_panic(), vals);
    let err = m
        .set_param_f32("fc1.weight", &vals[..5])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fc1.weight") && err.contains("[3, 4]"),
        "{err}"
    );
    let err = m.param_f32("fc9.weight").unwrap_err().to_string();
    assert!(err.contains("fc9.weight"), "{err}");
    m.restore(&snap).or_panic();
    assert_eq!(
        m.param_f32("fc1.weight").or_panic(),
        snap.tensors()[0]
            .1
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    );
}

#[test]
fn save_and_reload_through_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let m = ModelSpec::lenet5().build(5, &Device::Cpu).or_panic();
    let path = dir.path().join("lenet5.safetensors");
    let sha = m.save(&path, &[]).or_panic();
    assert_eq!(sha, prunec_runtime::io::sha256_file(&path).or_panic());
    // The architecture comes back from the metadata; shapes from the header only.
    let spec = ModelSpec::safetensors(&path);
    assert_eq!(
        spec.param_shapes().or_panic(),
        m.architecture().param_shapes()
    );
    let back = spec.build(0, &Device::Cpu).or_panic();
    assert_eq!(back.architecture(), m.architecture());
    assert_eq!(
        back.weights_sha256().or_panic(),
        m.weights_sha256().or_panic()
    );
    // Saving over the file it was loaded from is refused.
    assert!(matches!(
        back.save(&path, &[]),
        Err(RuntimeError::OutputIsInput { .. })
    ));
    // A file without our metadata: an MLP is inferred from fc1, fc2, ...
    let mlp = ModelSpec::mlp(&[6, 5, 3], Activation::Relu)
        .build(1, &Device::Cpu)
        .or_panic();
    let plain = dir.path().join("plain.safetensors");
    prunec_runtime::save_safetensors_atomic(&plain, &mlp.named_tensors(), &Default::default(), &[])
        .or_panic();
    let inferred = ModelSpec::safetensors(&plain)
        .build(0, &Device::Cpu)
        .or_panic();
    assert_eq!(
        inferred.architecture(),
        &Architecture::Mlp {
            widths: vec![6, 5, 3],
            activation: Activation::Relu
        }
    );
    // Wrong architecture for the file: the error names the tensor, the file and both shapes.
    let err = ModelSpec::safetensors(&plain)
        .with_architecture(Architecture::Mlp {
            widths: vec![6, 4, 3],
            activation: Activation::Relu,
        })
        .param_shapes()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fc1.weight")
            && err.contains("plain.safetensors")
            && err.contains("[4, 6]")
            && err.contains("[5, 6]"),
        "{err}"
    );
    let err = ModelSpec::safetensors(dir.path().join("none.safetensors"))
        .build(0, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("none.safetensors"), "{err}");
}

#[test]
fn half_precision_files_keep_their_dtype_when_saved_again() {
    let dir = tempfile::tempdir().unwrap();
    let mlp = ModelSpec::mlp(&[6, 5, 3], Activation::Relu)
        .build(1, &Device::Cpu)
        .or_panic();
    let half: Vec<_> = mlp
        .named_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.to_dtype(DType::BF16).unwrap()))
        .collect();
    let src = dir.path().join("half.safetensors");
    prunec_runtime::save_safetensors_atomic(&src, &half, &Default::default(), &[]).or_panic();
    let m = ModelSpec::safetensors(&src)
        .build(0, &Device::Cpu)
        .or_panic();
    assert_eq!(m.param("fc1.weight").or_panic().var.dtype(), DType::F32);
    let out = dir.path().join("out.safetensors");
    m.save(&out, &[]).or_panic();
    let h = prunec_runtime::io::read_safetensors_header(&out).or_panic();
    assert!(h.tensors.iter().all(|t| t.dtype == "BF16"), "{h:?}");
}

#[test]
fn pretrained_cnn_scores_at_least_99_percent_on_mnist_test() {
    let test = load(DatasetKind::Mnist, Split::Test, 500, None);
    let cnn = ModelSpec::pretrained_cnn()
        .build(0, &Device::Cpu)
        .or_panic();
    let m = evaluate(&cnn, &test).or_panic();
    eprintln!(
        "pretrained CNN: accuracy {:.4}, loss {:.4}",
        m.accuracy, m.loss
    );
    assert_eq!(m.samples, 10_000);
    assert!(m.accuracy >= 0.99, "accuracy {}", m.accuracy);
    let counts = model_counts(&cnn).or_panic();
    assert_eq!(counts.params_dense, cnn.param_count());
    assert!(counts.params_kept <= counts.params_dense && counts.flops_kept <= counts.flops_dense);
    // Pruning half of fc_layers.0 halves that layer's kept FLOPs.
    let mut masks = Masks::new();
    let keep: Vec<u8> = (0..294_912).map(|i| (i % 2) as u8).collect();
    masks
        .insert_u8(&cnn, "fc_layers.0.weight", &keep)
        .or_panic();
    masks.apply(&cnn).or_panic();
    let after = model_counts(&cnn).or_panic();
    assert_eq!(counts.flops_kept - after.flops_kept, 294_912); // 2 * 147_456 removed multiply-adds
}
