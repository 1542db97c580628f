//! Data sets on the real fetched files: header-only metadata, loading, splits, seeded
//! batching, token windows, and clean errors for missing and corrupt files.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::{load, OrPanic};
use prunec_runtime::data::text::token_windows;
use prunec_runtime::paths::data_dir;
use prunec_runtime::{DatasetKind, DatasetSpec, RuntimeError, Split};

fn mnist_file(name: &str) -> PathBuf {
    let p = data_dir().join("mnist").join(name);
    assert!(
        p.is_file(),
        "missing {}: run `scripts/fetch-data.sh mnist`",
        p.display()
    );
    p
}

#[test]
fn meta_comes_from_headers_and_matches_loaded_data() {
    for (kind, train_len) in [
        (DatasetKind::Mnist, 60_000),
        (DatasetKind::FashionMnist, 60_000),
    ] {
        let spec = DatasetSpec::new(kind, Split::Train).validation(5000);
        let meta = spec.meta().or_panic();
        assert_eq!(meta.sample_shape, vec![1, 28, 28]);
        assert_eq!(meta.classes, 10);
        assert_eq!(meta.len, train_len - 5000);
        let val = DatasetSpec::new(kind, Split::Validation)
            .validation(5000)
            .meta()
            .or_panic();
        assert_eq!(val.len, 5000);
        let test = DatasetSpec::new(kind, Split::Test)
            .limit(123)
            .meta()
            .or_panic();
        assert_eq!(test.len, 123);
    }
    let digits = DatasetSpec::new(DatasetKind::Digits, Split::Test)
        .meta()
        .or_panic();
    assert_eq!(
        (digits.sample_shape.clone(), digits.classes, digits.len),
        (vec![1, 8, 8], 10, 360)
    );
}

#[test]
fn fashion_test_split_loads_gzipped_idx() {
    let d = load(DatasetKind::FashionMnist, Split::Test, 100, None);
    assert_eq!(d.inputs.dims(), &[10_000, 1, 28, 28]);
    assert_eq!(d.targets.dims(), &[10_000]);
    let labels = d.targets.to_vec1::<u32>().unwrap();
    // Fashion-MNIST's test set is balanced: 1000 per class.
    for c in 0..10 {
        assert_eq!(
            labels.iter().filter(|&&l| l == c).count(),
            1000,
            "class {c}"
        );
    }
    let max = d.inputs.max_all().unwrap().to_scalar::<f32>().unwrap();
    let min = d.inputs.min_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(
        min == 0.0 && max == 1.0,
        "pixels scaled to [0, 1], got {min}..{max}"
    );
}

#[test]
fn validation_split_is_the_tail_of_the_train_file_and_disjoint() {
    let spec = DatasetSpec::new(DatasetKind::Digits, Split::Train).validation(200);
    let train = spec.load(&Device::Cpu).or_panic();
    let mut vspec = spec.clone();
    vspec.split = Split::Validation;
    let val = vspec.load(&Device::Cpu).or_panic();
    assert_eq!((train.len(), val.len()), (1237, 200));
    let all = DatasetSpec::new(DatasetKind::Digits, Split::Train)
        .load(&Device::Cpu)
        .or_panic();
    let joined = Tensor::cat(&[&train.inputs, &val.inputs], 0).unwrap();
    let diff = joined
        .sub(&all.inputs)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn shuffling_is_seeded_per_epoch_and_covers_every_sample_once() {
    let d = load(DatasetKind::Digits, Split::Train, 100, Some(7));
    let again = load(DatasetKind::Digits, Split::Train, 100, Some(7));
    let e0 = d.epoch_order(0);
    assert_eq!(e0, again.epoch_order(0));
    assert_ne!(e0, d.epoch_order(1));
    let mut sorted = e0.clone();
    sorted.sort();
    assert_eq!(sorted, (0..d.len() as u32).collect::<Vec<_>>());
    let batches: Vec<_> = d.batches(0).map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 15);
    assert_eq!(batches[14].targets.dims(), &[37]);
    // The first batch holds the samples the permutation names, in that order.
    let labels = d.targets.to_vec1::<u32>().unwrap();
    let first: Vec<u32> = e0[..100].iter().map(|&i| labels[i as usize]).collect();
    assert_eq!(batches[0].targets.to_vec1::<u32>().unwrap(), first);
}

#[test]
fn token_windows_are_fixed_length_and_disjoint() {
    let tokens: Vec<u32> = (0..1000).collect();
    let w = token_windows(&tokens, 64, 0.2, &Device::Cpu).or_panic();
    assert_eq!(w.train.dims(), &[12, 64]); // 800 tokens -> 12 windows
    assert_eq!(w.heldout.dims(), &[3, 64]); // 200 tokens -> 3 windows
    let train = w.train.flatten_all().unwrap().to_vec1::<u32>().unwrap();
    let held = w.heldout.flatten_all().unwrap().to_vec1::<u32>().unwrap();
    assert_eq!(train[..3], [0, 1, 2]);
    assert_eq!(held[0], 800);
    assert!(train.iter().max() < held.iter().min());
    assert!(token_windows(&tokens, 0, 0.2, &Device::Cpu).is_err());
    assert!(token_windows(&tokens, 8, 1.0, &Device::Cpu).is_err());
}

#[test]
fn text_corpus_reads_and_missing_corpus_names_the_fetch_command() {
    let moby =
        prunec_runtime::data::text::read_corpus(&data_dir().join("text").join("moby-dick.txt"))
            .or_panic();
    assert!(moby.len() > 1_000_000 && moby.contains("Ishmael"));
    let err = prunec_runtime::data::text::read_corpus(Path::new("/nonexistent/x.txt"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("/nonexistent/x.txt") && err.contains("scripts/fetch-data.sh text"),
        "{err}"
    );
}

// ---- missing and corrupt files: each one a clean error naming the file -------------

fn copy_mnist_test_into(dir: &Path) -> (PathBuf, PathBuf) {
    let m = dir.join("mnist");
    std::fs::create_dir_all(&m).unwrap();
    let imgs = m.join("t10k-images-idx3-ubyte");
    let lbls = m.join("t10k-labels-idx1-ubyte");
    std::fs::copy(mnist_file("t10k-images-idx3-ubyte"), &imgs).unwrap();
    std::fs::copy(mnist_file("t10k-labels-idx1-ubyte"), &lbls).unwrap();
    (imgs, lbls)
}

fn load_test_from(dir: &Path) -> Result<usize, RuntimeError> {
    DatasetSpec::new(DatasetKind::Mnist, Split::Test)
        .data_dir(dir)
        .load(&Device::Cpu)
        .map(|d| d.len())
}

fn meta_test_from(dir: &Path) -> Result<usize, RuntimeError> {
    DatasetSpec::new(DatasetKind::Mnist, Split::Test)
        .data_dir(dir)
        .meta()
        .map(|m| m.len)
}

fn assert_corrupt(r: Result<usize, RuntimeError>, file: &Path, words: &str) {
    match r {
        Err(e @ RuntimeError::CorruptFile { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&file.display().to_string()),
                "message must name {}: {msg}",
                file.display()
            );
            assert!(
                msg.contains(words),
                "message should mention `{words}`: {msg}"
            );
        }
        other => panic!(
            "expected a corrupt-file error for {}, got {other:?}",
            file.display()
        ),
    }
}

#[test]
fn copied_files_load_and_missing_files_name_the_fetch_script() {
    let dir = tempfile::tempdir().unwrap();
    let (imgs, _) = copy_mnist_test_into(dir.path());
    assert_eq!(load_test_from(dir.path()).or_panic(), 10_000);
    std::fs::remove_file(&imgs).unwrap();
    let err = load_test_from(dir.path()).unwrap_err();
    assert!(matches!(err, RuntimeError::MissingFile { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("t10k-images-idx3-ubyte") && msg.contains("scripts/fetch-data.sh mnist"),
        "{msg}"
    );
    let err = DatasetSpec::new(DatasetKind::Digits, Split::Train)
        .data_dir(dir.path())
        .meta()
        .unwrap_err();
    assert!(
        err.to_string().contains("scripts/fetch-data.sh digits"),
        "{err}"
    );
}

#[test]
fn bad_magic_is_a_clean_error() {
    let dir = tempfile::tempdir().unwrap();
    let (imgs, _) = copy_mnist_test_into(dir.path());
    let mut bytes = std::fs::read(&imgs).unwrap();
    bytes[2] = 0x0d; // claims float data
    std::fs::write(&imgs, &bytes).unwrap();
    assert_corrupt(load_test_from(dir.path()), &imgs, "magic");
    assert_corrupt(meta_test_from(dir.path()), &imgs, "magic");
    bytes[2] = 0x08;
    bytes[3] = 0x01; // rank 1 where images need rank 3
    std::fs::write(&imgs, &bytes).unwrap();
    assert_corrupt(load_test_from(dir.path()), &imgs, "rank");
}

#[test]
fn truncated_files_are_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (imgs, lbls) = copy_mnist_test_into(dir.path());
    let bytes = std::fs::read(&imgs).unwrap();
    std::fs::write(&imgs, &bytes[..bytes.len() - 100]).unwrap();
    assert_corrupt(load_test_from(dir.path()), &imgs, "truncated");
    std::fs::write(&imgs, &bytes[..10]).unwrap();
    assert_corrupt(load_test_from(dir.path()), &imgs, "ends inside");
    assert_corrupt(meta_test_from(dir.path()), &imgs, "ends inside");
    std::fs::write(&imgs, []).unwrap();
    assert_corrupt(load_test_from(dir.path()), &imgs, "magic");
    // Trailing garbage is also reported.
    let mut long = bytes.clone();
    long.extend_from_slice(&[1, 2, 3]);
    std::fs::write(&imgs, &long).unwrap();
    assert_corrupt(load_test_from(dir.path()), &imgs, "trailing");
    std::fs::write(&imgs, &bytes).unwrap();
    let lb = std::fs::read(&lbls).unwrap();
    std::fs::write(&lbls, &lb[..lb.len() - 1]).unwrap();
    assert_corrupt(load_test_from(dir.path()), &lbls, "truncated");
}

#[test]
fn label_and_image_count_mismatch_is_a_clean_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_, lbls) = copy_mnist_test_into(dir.path());
    let lb = std::fs::read(&lbls).unwrap();
    // Header says 9999 labels and the file holds exactly 9999.
    let mut short = lb[..lb.len() - 1].to_vec();
    short[4..8].copy_from_slice(&9999u32.to_be_bytes());
    std::fs::write(&lbls, &short).unwrap();
    assert_corrupt(load_test_from(dir.path()), &lbls, "9999 labels");
    assert_corrupt(meta_test_from(dir.path()), &lbls, "9999 labels");
    // A label outside 0..9.
    let mut bad = lb.clone();
    bad[8 + 17] = 42;
    std::fs::write(&lbls, &bad).unwrap();
    assert_corrupt(load_test_from(dir.path()), &lbls, "label 42");
}

#[test]
fn corrupt_gzip_and_csv_are_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("fashion-mnist");
    std::fs::create_dir_all(&f).unwrap();
    let src = data_dir().join("fashion-mnist");
    for name in ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"] {
        let p = src.join(name);
        assert!(
            p.is_file(),
            "missing {}: run `scripts/fetch-data.sh fashion`",
            p.display()
        );
        std::fs::copy(&p, f.join(name)).unwrap();
    }
    let gz = f.join("t10k-images-idx3-ubyte.gz");
    let bytes = std::fs::read(&gz).unwrap();
    std::fs::write(&gz, &bytes[..bytes.len() / 2]).unwrap();
    let r = DatasetSpec::new(DatasetKind::FashionMnist, Split::Test)
        .data_dir(dir.path())
        .load(&Device::Cpu)
        .map(|d| d.len());
    assert_corrupt(r, &gz, "");

    let d = dir.path().join("digits");
    std::fs::create_dir_all(&d).unwrap();
    let csv = d.join("digits.csv.gz");
    let write_csv = |text: &str| {
        let mut enc = flate2::write::GzEncoder::new(
            std::fs::File::create(&csv).unwrap(),
            flate2::Compression::fast(),
        );
        enc.write_all(text.as_bytes()).unwrap();
        enc.finish().unwrap();
    };
    let spec = DatasetSpec::new(DatasetKind::Digits, Split::Train).data_dir(dir.path());
    write_csv("1,2,3\n");
    assert_corrupt(spec.load(&Device::Cpu).map(|d| d.len()), &csv, "line 1");
    let mut line = vec!["0"; 64];
    line.push("x");
    write_csv(&line.join(","));
    assert_corrupt(
        spec.load(&Device::Cpu).map(|d| d.len()),
        &csv,
        "not a number",
    );
    line[64] = "3";
    write_csv(&line.join(","));
    assert_corrupt(spec.load(&Device::Cpu).map(|d| d.len()), &csv, "1797");
}

#[test]
fn invalid_specs_are_config_errors() {
    let too_big = DatasetSpec::new(DatasetKind::Digits, Split::Train)
        .validation(5000)
        .meta();
    assert!(matches!(too_big, Err(RuntimeError::InvalidConfig(_))));
    let zero_batch = DatasetSpec::new(DatasetKind::Digits, Split::Train)
        .batch_size(0)
        .load(&Device::Cpu);
    assert!(matches!(zero_batch, Err(RuntimeError::InvalidConfig(_))));
}

#[test]
fn text_spec_serves_windows_of_a_real_corpus() {
    use prunec_runtime::data::text::{TextPart, TextSpec};
    // A stand-in tokenizer (bytes); the LLM code passes its BPE tokenizer instead.
    let bytes =
        |s: &str| -> prunec_runtime::Result<Vec<u32>> { Ok(s.bytes().map(u32::from).collect()) };
    let mut spec = TextSpec {
        path: data_dir().join("text").join("moby-dick.txt"),
        seq_len: 256,
        heldout_fraction: 0.1,
        part: TextPart::Heldout,
        limit: Some(8),
    };
    let held = spec.load(bytes, &Device::Cpu).or_panic();
    assert_eq!(held.dims(), &[8, 256]);
    spec.part = TextPart::Train;
    spec.limit = None;
    let train = spec.load(bytes, &Device::Cpu).or_panic();
    let len = std::fs::read(&spec.path).unwrap().len();
    assert_eq!(
        train.dims(),
        &[(len as f64 * 0.9).floor() as usize / 256, 256]
    );
    spec.seq_len = 10_000_000;
    assert!(spec.load(bytes, &Device::Cpu).is_err());
}
