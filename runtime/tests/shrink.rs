//! Removing units: every dependency rule (linear → linear, conv → conv
//! through pooling, conv → flatten → linear) gives the outputs of the same
//! model with the unit's whole group zeroed but left in place, and the
//! smaller model saves, reloads, trains and carries its masks and snapshots.

mod common;

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use common::{load, max_abs_diff, OrPanic};
use prunec_runtime::model::{UnitKind, UnitRemoval};
use prunec_runtime::{
    evaluate, train, Activation, Architecture, DatasetKind, Masks, Model, ModelSpec, NoHooks,
    OptimizerSpec, Split, TrainConfig,
};

/// Zeroes the group of each removed unit in place (weight rows, bias
/// entries, the reader's input columns): the masked-but-unshrunk model.
fn zero_groups(model: &Model, kept: &BTreeMap<String, Vec<usize>>) {
    for u in model.unit_layers() {
        let Some(keep) = kept.get(&u.layer) else {
            continue;
        };
        let gone: Vec<usize> = (0..u.units).filter(|i| !keep.contains(i)).collect();
        let w = model.param(&u.weight()).or_panic().shape();
        let row: usize = w[1..].iter().product();
        let mut v = model.param_f32(&u.weight()).or_panic();
        let mut b = model.param_f32(&u.bias()).or_panic();
        for &g in &gone {
            v[g * row..(g + 1) * row].fill(0.0);
            b[g] = 0.0;
        }
        model.set_param_f32(&u.weight(), &v).or_panic();
        model.set_param_f32(&u.bias(), &b).or_panic();
        let r = model.param(&u.reader_weight()).or_panic().shape();
        let per_in: usize = r[2..].iter().product();
        let inputs = r[1];
        let mut rv = model.param_f32(&u.reader_weight()).or_panic();
        for o in 0..r[0] {
            for &g in &gone {
                for c in g * u.columns..(g + 1) * u.columns {
                    let at = (o * inputs + c) * per_in;
                    rv[at..at + per_in].fill(0.0);
                }
            }
        }
        model.set_param_f32(&u.reader_weight(), &rv).or_panic();
    }
}

/// Keeps every third unit but one in each listed layer.
fn keep_pattern(model: &Model, layers: &[&str]) -> BTreeMap<String, Vec<usize>> {
    model
        .unit_layers()
        .iter()
        .filter(|u| layers.contains(&u.layer.as_str()))
        .map(|u| {
            let keep: Vec<usize> = (0..u.units).filter(|i| i % 3 != 1).collect();
            (u.layer.clone(), keep)
        })
        .collect()
}

fn check_rule(spec: ModelSpec, input: &[usize], layers: &[&str]) {
    let dev = Device::Cpu;
    let dense = spec.build(7, &dev).or_panic();
    let kept = keep_pattern(&dense, layers);
    assert_eq!(kept.len(), layers.len(), "{layers:?}");
    let removal = UnitRemoval::new(dense.architecture(), kept.clone()).or_panic();
    let small = dense.without_units(&removal).or_panic();
    assert!(small.param_count() < dense.param_count());
    assert!(small.flops() < dense.flops());
    let masked = dense.fork().or_panic();
    zero_groups(&masked, &kept);
    let mut shape = vec![5];
    shape.extend_from_slice(input);
    let x = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev).unwrap();
    let a = small.forward(&x).or_panic();
    let b = masked.forward(&x).or_panic();
    assert_eq!(a.dims(), b.dims());
    let d = max_abs_diff(&a, &b);
    assert!(d <= 1e-5, "{layers:?}: shrunk and masked differ by {d}");
    // The dense model differs: the units did contribute.
    assert!(max_abs_diff(&dense.forward(&x).or_panic(), &b) > 1e-4);
}

#[test]
fn linear_to_linear_removes_rows_biases_and_the_next_columns() {
    for act in [Activation::Relu, Activation::Sigmoid, Activation::Tanh] {
        // Sigmoid(0) = 0.5: without the reader's columns the outputs would differ.
        check_rule(ModelSpec::mlp(&[12, 9, 7, 4], act), &[12], &["fc1"]);
        check_rule(ModelSpec::mlp(&[12, 9, 7, 4], act), &[12], &["fc1", "fc2"]);
    }
}

#[test]
fn conv_to_conv_through_pooling_removes_filters_and_input_channels() {
    check_rule(ModelSpec::lenet5(), &[1, 28, 28], &["conv1"]);
    let cnn = ModelSpec::lenet5().with_architecture(Architecture::DigitCnn);
    check_rule(cnn, &[1, 28, 28], &["conv_layers.0", "conv_layers.3"]);
}

#[test]
fn conv_to_flatten_to_linear_removes_each_channels_positions() {
    let spec = ModelSpec::lenet5();
    let m = spec.build(0, &Device::Cpu).or_panic();
    let conv2 = m
        .unit_layers()
        .into_iter()
        .find(|u| u.layer == "conv2")
        .unwrap();
    assert_eq!(
        (conv2.kind, conv2.reader.as_str(), conv2.columns),
        (UnitKind::Channel, "fc1", 25)
    );
    check_rule(spec, &[1, 28, 28], &["conv2"]);
    check_rule(
        ModelSpec::lenet5(),
        &[1, 28, 28],
        &["conv1", "conv2", "fc1", "fc2"],
    );
}

#[test]
fn the_output_layer_and_onnx_graphs_have_no_units() {
    let arch = Architecture::lenet5();
    let names: Vec<String> = arch.unit_layers().into_iter().map(|u| u.layer).collect();
    assert_eq!(names, ["conv1", "conv2", "fc1", "fc2"]);
    assert_eq!(
        arch.why_no_units("fc3.weight"),
        Some(prunec_runtime::model::NoUnits::Output)
    );
    assert_eq!(arch.why_no_units("fc2"), None);
    let bad = BTreeMap::from([("fc3".to_string(), vec![0])]);
    assert!(UnitRemoval::new(&arch, bad).is_err());
    let none = BTreeMap::from([("fc1".to_string(), vec![])]);
    assert!(UnitRemoval::new(&arch, none).is_err());
    let beyond = BTreeMap::from([("fc1".to_string(), vec![3, 120])]);
    assert!(UnitRemoval::new(&arch, beyond).is_err());
}

#[test]
fn a_shrunk_model_saves_reloads_trains_and_cuts_its_masks_and_snapshots() {
    let dev = Device::Cpu;
    let dense = ModelSpec::lenet5().build(3, &dev).or_panic();
    let kept = keep_pattern(&dense, &["conv1", "fc1"]);
    let removal = UnitRemoval::new(dense.architecture(), kept).or_panic();
    let small = dense.without_units(&removal).or_panic();
    assert_eq!(small.param("conv1.weight").or_panic().shape(), [4, 1, 5, 5]);
    assert_eq!(
        small.param("conv2.weight").or_panic().shape(),
        [16, 4, 5, 5]
    );
    assert_eq!(small.param("fc1.weight").or_panic().shape(), [80, 400]);
    assert_eq!(small.param("fc2.weight").or_panic().shape(), [84, 80]);

    // Masks and snapshots are cut like the weights.
    let masks = Masks::from_nonzero(&dense, |n| n.ends_with(".weight")).or_panic();
    let cut = masks.without_units(&removal).or_panic();
    assert_eq!(cut.get("fc2.weight").unwrap().dims(), &[84, 80]);
    let snap = dense
        .snapshot()
        .or_panic()
        .without_units(&removal)
        .or_panic();
    small.restore(&snap).or_panic();

    // Saved with the new widths in its metadata; reloaded from the file alone.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("small.safetensors");
    small.save(&path, &[]).or_panic();
    let back = ModelSpec::safetensors(&path).build(0, &dev).or_panic();
    assert!(matches!(
        back.architecture(),
        Architecture::Sequential { .. }
    ));
    let x = Tensor::randn(0f32, 1.0, (3, 1, 28, 28), &dev).unwrap();
    assert_eq!(
        max_abs_diff(&back.forward(&x).or_panic(), &small.forward(&x).or_panic()),
        0.0
    );
    assert_eq!(back.unit_layers().len(), 4);
}

#[test]
fn a_shrunk_mlp_trains_on_digits() {
    let data = load(DatasetKind::Digits, Split::Train, 32, Some(1));
    let dense = ModelSpec::mlp(&[64, 48, 10], Activation::Relu)
        .build(1, &Device::Cpu)
        .or_panic();
    let kept = BTreeMap::from([("fc1".to_string(), (0..48).step_by(2).collect())]);
    let removal = UnitRemoval::new(dense.architecture(), kept).or_panic();
    let mut small = dense.without_units(&removal).or_panic();
    assert_eq!(small.param("fc2.weight").or_panic().shape(), [10, 24]);
    let opt = OptimizerSpec::Sgd {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 0.0,
        nesterov: false,
    };
    train(
        &mut small,
        &data,
        &TrainConfig::new(1, opt),
        &Masks::new(),
        &mut NoHooks,
    )
    .or_panic();
    let acc = evaluate(&small, &data).or_panic().accuracy;
    assert!(acc > 0.5, "accuracy {acc}");
}

#[test]
fn a_sequential_architecture_from_a_file_is_checked_before_use() {
    use prunec_runtime::model::Layer;
    let lin = |name: &str, inputs, outputs| Layer::Linear {
        name: name.into(),
        inputs,
        outputs,
    };
    let seq = |layers: Vec<Layer>| Architecture::Sequential {
        input_shape: vec![1, 4, 4],
        layers,
    };
    let conv = |kernel| Layer::Conv2d {
        name: "c".into(),
        in_channels: 1,
        out_channels: 2,
        kernel,
        padding: 0,
    };
    // A zero pool or kernel, a zero width, a name used twice: errors, not panics.
    for bad in [
        seq(vec![Layer::MaxPool2d(0), Layer::Flatten, lin("f", 16, 2)]),
        seq(vec![conv(0), Layer::Flatten, lin("f", 32, 2)]),
        seq(vec![Layer::Flatten, lin("f", 16, 0), lin("g", 0, 2)]),
        seq(vec![Layer::Flatten, lin("f", 16, 4), lin("f", 4, 2)]),
    ] {
        assert!(bad.shape_check().is_err(), "{bad:?}");
    }
    assert!(seq(vec![conv(3), Layer::Flatten, lin("f", 8, 2)])
        .shape_check()
        .is_ok());
}
