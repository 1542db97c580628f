//! Model I/O: safetensors round trips (names, dtypes, metadata), header-only shapes,
//! atomic writes, refusal to overwrite inputs, sha256 of outputs.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::OrPanic;
use prunec_runtime::io::{read_pth_header, read_safetensors_header, sha256_file, write_atomic};
use prunec_runtime::paths::data_dir;
use prunec_runtime::{load_safetensors, save_safetensors_atomic, ModelSpec, RuntimeError};

fn sample_tensors() -> Vec<(String, Tensor)> {
    let d = Device::Cpu;
    let f = Tensor::arange(0f32, 12.0, &d)
        .unwrap()
        .reshape((3, 4))
        .unwrap();
    vec![
        ("z.last".to_string(), f.clone()),
        ("a.half".to_string(), f.to_dtype(DType::F16).unwrap()),
        ("m.bf16".to_string(), f.to_dtype(DType::BF16).unwrap()),
        ("mask".to_string(), Tensor::new(&[1u8, 0, 1], &d).unwrap()),
        ("ids".to_string(), Tensor::new(&[7u32, 8], &d).unwrap()),
    ]
}

#[test]
fn round_trip_keeps_names_dtypes_values_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let tensors = sample_tensors();
    let mut meta = BTreeMap::new();
    meta.insert("who".to_string(), "prunec".to_string());
    let sha = save_safetensors_atomic(&path, &tensors, &meta, &[]).or_panic();
    assert_eq!(sha, sha256_file(&path).or_panic());
    assert_eq!(sha.len(), 64);
    let loaded = load_safetensors(&path, &Device::Cpu).or_panic();
    assert_eq!(loaded.metadata, meta);
    assert_eq!(loaded.tensors.len(), tensors.len());
    for (name, t) in &tensors {
        let l = loaded.get(name, &path).or_panic();
        assert_eq!(l.dtype(), t.dtype(), "{name}");
        assert_eq!(l.dims(), t.dims(), "{name}");
        let a = l
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let b = t
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert_eq!(a, b, "{name}");
    }
    let header = read_safetensors_header(&path).or_panic();
    let names: Vec<_> = header.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names.len(), 5);
    assert_eq!(
        header
            .tensors
            .iter()
            .find(|t| t.name == "a.half")
            .unwrap()
            .dtype,
        "F16"
    );
    // Same content, same bytes.
    let p2 = dir.path().join("m2.safetensors");
    assert_eq!(
        save_safetensors_atomic(&p2, &tensors, &meta, &[]).or_panic(),
        sha
    );
    let err = loaded.get("nope", &path).unwrap_err().to_string();
    assert!(
        err.contains("nope") && err.contains("m.safetensors"),
        "{err}"
    );
}

#[test]
fn writes_are_atomic_and_never_overwrite_an_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    save_safetensors_atomic(&input, &sample_tensors(), &BTreeMap::new(), &[]).or_panic();
    let before = std::fs::read(&input).unwrap();
    // Same path, and the same path spelled differently.
    let spelled = dir.path().join(".").join("in.safetensors");
    for out in [&input, &spelled] {
        let err = save_safetensors_atomic(out, &sample_tensors()[..1], &BTreeMap::new(), &[&input])
            .unwrap_err();
        assert!(matches!(err, RuntimeError::OutputIsInput { .. }), "{err}");
        assert!(err.to_string().contains("in.safetensors"));
    }
    assert_eq!(std::fs::read(&input).unwrap(), before);
    // A replaced file is whole; no temporary file is left behind.
    let out = dir.path().join("out.bin");
    write_atomic(&out, b"first", &[]).or_panic();
    let sha = write_atomic(&out, b"second version", &[&input]).or_panic();
    assert_eq!(std::fs::read(&out).unwrap(), b"second version");
    assert_eq!(sha, sha256_file(&out).or_panic());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // A folder that does not exist is a clean error naming it.
    let err = write_atomic(&dir.path().join("no/such/dir/x.bin"), b"x", &[]).unwrap_err();
    assert!(err.to_string().contains("no/such/dir"), "{err}");
}

#[test]
fn corrupt_safetensors_are_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    save_safetensors_atomic(&path, &sample_tensors(), &BTreeMap::new(), &[]).or_panic();
    let bytes = std::fs::read(&path).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("short", bytes[..4].to_vec()),
        ("truncated data", bytes[..bytes.len() - 3].to_vec()),
        ("huge header", {
            let mut b = bytes.clone();
            b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
            b
        }),
        ("not json", {
            let mut b = bytes.clone();
            b[8] = b'#';
            b
        }),
    ];
    for (what, b) in cases {
        std::fs::write(&path, &b).unwrap();
        let err = load_safetensors(&path, &Device::Cpu).unwrap_err();
        assert!(
            matches!(err, RuntimeError::CorruptFile { .. }),
            "{what}: {err:?}"
        );
        assert!(err.to_string().contains("m.safetensors"), "{what}: {err}");
        assert!(read_safetensors_header(&path).is_err(), "{what}");
    }
}

#[test]
fn pth_header_lists_the_pretrained_cnn_without_loading_weights() {
    let pth = data_dir()
        .join("digit-recognizer")
        .join("handwriting_model.pth");
    assert!(
        pth.is_file(),
        "missing {}: run `scripts/fetch-data.sh cnn`",
        pth.display()
    );
    let h = read_pth_header(&pth).or_panic();
    let get = |n: &str| {
        h.iter()
            .find(|t| t.name == n)
            .unwrap_or_else(|| panic!("{n} not in {h:?}"))
            .shape
            .clone()
    };
    assert_eq!(get("conv_layers.0.weight"), vec![32, 1, 3, 3]);
    assert_eq!(get("conv_layers.6.weight"), vec![128, 64, 3, 3]);
    assert_eq!(get("fc_layers.0.weight"), vec![256, 1152]);
    assert_eq!(get("fc_layers.2.bias"), vec![10]);
    let shapes = ModelSpec::pretrained_cnn().param_shapes().or_panic();
    assert_eq!(shapes.len(), 10);
    assert_eq!(
        shapes[0],
        ("conv_layers.0.weight".to_string(), vec![32, 1, 3, 3])
    );
    let bad = read_pth_header(Path::new("/nonexistent.pth")).unwrap_err();
    assert!(bad.to_string().contains("/nonexistent.pth"), "{bad}");
}
