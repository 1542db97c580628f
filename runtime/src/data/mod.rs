//! Image-classification data sets (MNIST, Fashion-MNIST, 8x8 digits, image
//! folders, arrays in safetensors), splits, seeded batching; and token windows for text.

pub mod arrays;
pub mod digits;
pub mod folder;
pub mod idx;
pub mod text;

pub use folder::ImageOptions;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{CandleContext, Result, RuntimeError};
use crate::paths::{data_dir, require_file, require_named};

/// Which data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DatasetKind {
    /// MNIST handwritten digits, 28x28, 60k train / 10k test.
    Mnist,
    /// Fashion-MNIST, 28x28, 60k train / 10k test.
    FashionMnist,
    /// scikit-learn's 8x8 digits (1797 samples): the first 1437 form the
    /// "train file", the last 360 the test split. A small fixture for fast tests.
    Digits,
    /// An ImageFolder: one subfolder of PNG/JPEG images per class.
    Images,
    /// An inputs and a labels tensor of one `.safetensors` file.
    Tensors,
}

/// Which part of a data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Split {
    /// The train file minus its last `validation` samples.
    Train,
    /// The last `validation` samples of the train file.
    Validation,
    /// The test file.
    Test,
}

/// Number of digits samples in the "train file"; the rest are the test split.
pub const DIGITS_TRAIN: usize = 1437;

/// What a data set is and how it is served: the executor builds one per use.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DatasetSpec {
    pub kind: DatasetKind,
    pub split: Split,
    /// Samples held back from the end of the train file as the validation split.
    pub validation: usize,
    /// Keep only the first `limit` samples of the split.
    pub limit: Option<usize>,
    /// Samples per batch.
    pub batch_size: usize,
    /// Seed of the per-epoch shuffle; `None` serves samples in file order.
    pub shuffle_seed: Option<u64>,
    /// Folder holding the fetched data; `None` means [`data_dir`].
    pub data_dir: Option<PathBuf>,
    /// The exact folder of the IDX files (or the digits CSV file, or its
    /// folder), whatever it is named; overrides `data_dir`'s layout.
    #[serde(default)]
    pub files_at: Option<PathBuf>,
    /// How images become samples (`Images`).
    #[serde(default)]
    pub images: ImageOptions,
    /// The inputs and labels tensors (`Tensors`).
    #[serde(default)]
    pub arrays: Option<ArrayNames>,
    /// `Images` and `Tensors` have one pool of samples: this last fraction of
    /// it is the test split and the rest the train file (0: both are the whole pool).
    #[serde(default)]
    pub test_fraction: f64,
}

/// The tensors of a `Tensors` data set.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ArrayNames {
    pub inputs: String,
    pub labels: String,
}

/// A data set's whole pool of samples, as its headers describe it.
struct Pool {
    len: usize,
    sample_shape: Vec<usize>,
    classes: usize,
    class_names: Vec<String>,
}

/// What can be known about a data set from file headers alone.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DatasetMeta {
    /// Shape of one sample: `[channels, height, width]`.
    pub sample_shape: Vec<usize>,
    /// Number of classes.
    pub classes: usize,
    /// Number of samples in the split (after `validation` and `limit`).
    pub len: usize,
    /// The classes' names in label order, where the data names them (image folders).
    #[serde(default)]
    pub class_names: Vec<String>,
}

impl DatasetSpec {
    /// A spec with batch size 64, no shuffle, no validation split, no limit.
    pub fn new(kind: DatasetKind, split: Split) -> Self {
        DatasetSpec {
            kind,
            split,
            validation: 0,
            limit: None,
            batch_size: 64,
            shuffle_seed: None,
            data_dir: None,
            files_at: None,
            images: ImageOptions::default(),
            arrays: None,
            test_fraction: 0.0,
        }
    }

    /// Sets how images become samples.
    pub fn image_options(mut self, options: ImageOptions) -> Self {
        self.images = options;
        self
    }

    /// Names the inputs and labels tensors.
    pub fn arrays(mut self, inputs: impl Into<String>, labels: impl Into<String>) -> Self {
        self.arrays = Some(ArrayNames {
            inputs: inputs.into(),
            labels: labels.into(),
        });
        self
    }

    /// Holds out this last fraction of the pool as the test split.
    pub fn test_fraction(mut self, fraction: f64) -> Self {
        self.test_fraction = fraction;
        self
    }

    /// Sets the batch size.
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// Shuffles every epoch with this seed.
    pub fn shuffled(mut self, seed: u64) -> Self {
        self.shuffle_seed = Some(seed);
        self
    }

    /// Keeps only the first `limit` samples.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Holds back the last `validation` samples of the train file.
    pub fn validation(mut self, validation: usize) -> Self {
        self.validation = validation;
        self
    }

    /// Reads data from `dir` instead of [`data_dir`].
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Reads the files from exactly `path`: the folder holding the IDX files,
    /// or the digits CSV (or the folder holding `digits.csv.gz`).
    pub fn files_at(mut self, path: impl Into<PathBuf>) -> Self {
        self.files_at = Some(path.into());
        self
    }

    fn root(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(data_dir)
    }

    fn fetch_name(&self) -> &'static str {
        match self.kind {
            DatasetKind::Mnist => "mnist",
            DatasetKind::FashionMnist => "fashion",
            DatasetKind::Digits => "digits",
            DatasetKind::Images => "images",
            DatasetKind::Tensors => "tensors",
        }
    }

    /// The (images, labels) files of the train or test file set.
    pub fn idx_files(&self, test_file: bool) -> Result<(PathBuf, PathBuf)> {
        let (folder, gz) = match self.kind {
            DatasetKind::Mnist => ("mnist", false),
            DatasetKind::FashionMnist => ("fashion-mnist", true),
            _ => {
                return Err(RuntimeError::InvalidConfig(format!(
                    "the {:?} data set is not held in IDX files",
                    self.kind
                )))
            }
        };
        let stem = if test_file { "t10k" } else { "train" };
        let dir = match &self.files_at {
            Some(d) => d.clone(),
            None => self.root().join(folder),
        };
        let pick = |name: String| -> Result<PathBuf> {
            let plain = dir.join(&name);
            let zipped = dir.join(format!("{name}.gz"));
            let (first, second) = if gz { (zipped, plain) } else { (plain, zipped) };
            if second.is_file() && !first.is_file() {
                Ok(second)
            } else if self.files_at.is_some() {
                require_named(first)
            } else {
                require_file(first, self.fetch_name())
            }
        };
        Ok((
            pick(format!("{stem}-images-idx3-ubyte"))?,
            pick(format!("{stem}-labels-idx1-ubyte"))?,
        ))
    }

    /// The digits CSV file this spec reads.
    pub fn digits_file(&self) -> Result<PathBuf> {
        match &self.files_at {
            Some(p) if p.is_dir() => require_named(p.join("digits.csv.gz")),
            Some(p) => require_named(p.clone()),
            None => require_file(self.root().join("digits").join("digits.csv.gz"), "digits"),
        }
    }

    /// The folder (`Images`) or file (`Tensors`) this spec reads.
    fn source(&self) -> Result<PathBuf> {
        self.files_at.clone().ok_or_else(|| {
            RuntimeError::InvalidConfig(format!("the {:?} data set needs a path", self.kind))
        })
    }

    fn array_names(&self) -> Result<&ArrayNames> {
        self.arrays.as_ref().ok_or_else(|| {
            RuntimeError::InvalidConfig(
                "a tensors data set needs its inputs and labels named".into(),
            )
        })
    }

    /// The whole pool of an `Images` or `Tensors` data set, from headers
    /// (and, for `Tensors`, the labels).
    fn pool(&self) -> Result<(Pool, Vec<u32>)> {
        let path = self.source()?;
        match self.kind {
            DatasetKind::Images => {
                let ix = folder::index(&path)?;
                let shape = folder::sample_shape(&ix, &self.images)?;
                let labels = ix.images.iter().map(|(_, l)| *l).collect();
                let pool = Pool {
                    len: ix.images.len(),
                    sample_shape: shape,
                    classes: ix.classes.len(),
                    class_names: ix.classes,
                };
                Ok((pool, labels))
            }
            _ => {
                let names = self.array_names()?;
                let header = arrays::read_header(&path)?;
                let (shape, labels) =
                    arrays::check_pair(&path, &header, &names.inputs, &names.labels)?;
                let pool = Pool {
                    len: labels.len(),
                    sample_shape: shape,
                    classes: labels.iter().max().map_or(0, |m| *m as usize + 1),
                    class_names: vec![],
                };
                Ok((pool, labels))
            }
        }
    }

    /// The part of a pool of `pool_len` samples that the split's file covers:
    /// `(first sample, samples)`.
    fn pool_file(&self, pool_len: usize) -> Result<(usize, usize)> {
        if self.test_fraction <= 0.0 {
            return Ok((0, pool_len));
        }
        let test = ((pool_len as f64) * self.test_fraction).round() as usize;
        if test == 0 || test >= pool_len {
            return Err(RuntimeError::InvalidConfig(format!(
                "a test hold-out of {:.4}% of {} samples leaves {}",
                self.test_fraction * 100.0,
                pool_len,
                if test == 0 {
                    "no test sample"
                } else {
                    "no train sample"
                }
            )));
        }
        Ok(if self.split == Split::Test {
            (pool_len - test, test)
        } else {
            (0, pool_len - test)
        })
    }

    /// Every file this spec reads, for hashing.
    pub fn files(&self) -> Result<Vec<PathBuf>> {
        Ok(match self.kind {
            DatasetKind::Digits => vec![self.digits_file()?],
            DatasetKind::Mnist | DatasetKind::FashionMnist => {
                let (a, b) = self.idx_files(self.split == Split::Test)?;
                vec![a, b]
            }
            DatasetKind::Images => folder::index(&self.source()?)?
                .images
                .into_iter()
                .map(|(p, _)| p)
                .collect(),
            DatasetKind::Tensors => vec![require_named(self.source()?)?],
        })
    }

    fn check(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(RuntimeError::InvalidConfig("batch size must be > 0".into()));
        }
        if self.split == Split::Test && self.validation > 0 {
            // Harmless, but almost certainly a mistake in a recipe.
            return Err(RuntimeError::InvalidConfig(
                "a validation hold-out applies to the train file, not to the test split".into(),
            ));
        }
        Ok(())
    }

    /// Range of samples of the file this split covers, given the file's length.
    fn range(&self, file_len: usize) -> Result<std::ops::Range<usize>> {
        if self.split != Split::Test && self.validation >= file_len {
            return Err(RuntimeError::InvalidConfig(format!(
                "validation hold-out of {} samples leaves nothing of the {file_len}-sample train file",
                self.validation
            )));
        }
        let (start, end) = match self.split {
            Split::Train => (0, file_len - self.validation),
            Split::Validation => (file_len - self.validation, file_len),
            Split::Test => (0, file_len),
        };
        let end = match self.limit {
            Some(limit) => end.min(start + limit),
            None => end,
        };
        Ok(start..end)
    }

    /// Sample shape, class count and split length, from the IDX headers only
    /// (for digits, whose CSV has no header, the fixed 1797-sample layout).
    pub fn meta(&self) -> Result<DatasetMeta> {
        self.check()?;
        let mut classes = 10;
        let mut class_names = vec![];
        let (shape, file_len) = match self.kind {
            DatasetKind::Images | DatasetKind::Tensors => {
                let (pool, _) = self.pool()?;
                classes = pool.classes;
                class_names = pool.class_names;
                (pool.sample_shape, self.pool_file(pool.len)?.1)
            }
            DatasetKind::Digits => {
                self.digits_file()?;
                let len = if self.split == Split::Test {
                    1797 - DIGITS_TRAIN
                } else {
                    DIGITS_TRAIN
                };
                (vec![1, 8, 8], len)
            }
            _ => {
                let (images, labels) = self.idx_files(self.split == Split::Test)?;
                let ih = idx::read_header(&images, 3)?;
                let lh = idx::read_header(&labels, 1)?;
                if ih.dims[0] != lh.dims[0] {
                    return Err(RuntimeError::corrupt(
                        &labels,
                        format!(
                            "{} labels but {} holds {} images",
                            lh.dims[0],
                            images.display(),
                            ih.dims[0]
                        ),
                    ));
                }
                (vec![1, ih.dims[1], ih.dims[2]], ih.dims[0])
            }
        };
        let range = self.range(file_len)?;
        Ok(DatasetMeta {
            sample_shape: shape,
            classes,
            len: range.len(),
            class_names,
        })
    }

    /// Reads the split into memory on `device`: images as f32 in `[0, 1]`
    /// shaped `[n, 1, h, w]`, labels as u32.
    pub fn load(&self, device: &Device) -> Result<Dataset> {
        self.check()?;
        let mut classes = 10;
        let mut class_names = vec![];
        let (pixels, labels, shape, label_path) = match self.kind {
            DatasetKind::Images | DatasetKind::Tensors => {
                let path = self.source()?;
                let (pool, all_labels) = self.pool()?;
                classes = pool.classes;
                let (offset, len) = self.pool_file(pool.len)?;
                let r = self.range(len)?;
                let (a, b) = (offset + r.start, offset + r.end);
                let values = if self.kind == DatasetKind::Images {
                    let ix = folder::index(&path)?;
                    let hw = (pool.sample_shape[1], pool.sample_shape[2]);
                    folder::decode_all(&ix.images[a..b], &self.images, hw)?
                } else {
                    let names = self.array_names()?;
                    let header = arrays::read_header(&path)?;
                    arrays::read_inputs(&path, &header, &names.inputs, a, b)?
                };
                let mut dims = vec![b - a];
                dims.extend_from_slice(&pool.sample_shape);
                let px = Tensor::from_vec(values, dims, device)
                    .ctx(|| format!("loading {}", path.display()))?;
                class_names = pool.class_names;
                (px, all_labels[a..b].to_vec(), pool.sample_shape, path)
            }
            DatasetKind::Digits => {
                let path = self.digits_file()?;
                let d = digits::read(&path)?;
                if d.labels.len() != 1797 {
                    return Err(RuntimeError::corrupt(
                        &path,
                        format!("expected 1797 samples, found {}", d.labels.len()),
                    ));
                }
                let (lo, hi) = if self.split == Split::Test {
                    (DIGITS_TRAIN, 1797)
                } else {
                    (0, DIGITS_TRAIN)
                };
                let r = self.range(hi - lo)?;
                let (a, b) = (lo + r.start, lo + r.end);
                let px = Tensor::from_slice(&d.pixels[a * 64..b * 64], (b - a, 1, 8, 8), device)
                    .ctx(|| format!("loading {}", path.display()))?;
                (px, d.labels[a..b].to_vec(), vec![1, 8, 8], path)
            }
            _ => {
                let (image_path, label_path) = self.idx_files(self.split == Split::Test)?;
                let (ih, images) = idx::read_u8(&image_path, 3)?;
                let (lh, labels) = idx::read_u8(&label_path, 1)?;
                if ih.dims[0] != lh.dims[0] {
                    return Err(RuntimeError::corrupt(
                        &label_path,
                        format!(
                            "{} labels but {} holds {} images",
                            lh.dims[0],
                            image_path.display(),
                            ih.dims[0]
                        ),
                    ));
                }
                if let Some(pos) = labels.iter().position(|&l| l >= 10) {
                    return Err(RuntimeError::corrupt(
                        &label_path,
                        format!("label {} of sample {pos} is not a class 0..9", labels[pos]),
                    ));
                }
                let (h, w) = (ih.dims[1], ih.dims[2]);
                let r = self.range(ih.dims[0])?;
                let px = &images[r.start * h * w..r.end * h * w];
                let ctx = || format!("loading {}", image_path.display());
                // Conversion to f32 runs inside candle (optimised), not in a Rust loop here.
                let px = Tensor::from_slice(px, (r.len(), 1, h, w), device)
                    .ctx(ctx)?
                    .to_dtype(DType::F32)
                    .ctx(ctx)?
                    .affine(1.0 / 255.0, 0.0)
                    .ctx(ctx)?;
                let labels = labels[r].iter().map(|&l| l as u32).collect();
                (px, labels, vec![1, h, w], label_path)
            }
        };
        let n = labels.len();
        if n == 0 {
            return Err(RuntimeError::InvalidConfig(format!(
                "the {:?} split of {:?} is empty",
                self.split, self.kind
            )));
        }
        let label_tensor = Tensor::from_vec(labels, n, device)
            .ctx(|| format!("loading {}", label_path.display()))?;
        Ok(Dataset {
            name: format!("{:?}/{:?}", self.kind, self.split),
            inputs: pixels,
            targets: label_tensor,
            batch_size: self.batch_size,
            shuffle_seed: self.shuffle_seed,
            meta: DatasetMeta {
                sample_shape: shape,
                classes,
                len: n,
                class_names,
            },
        })
    }
}

/// A data set held in memory as two tensors.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// A short name for messages, e.g. `Mnist/Test`.
    pub name: String,
    /// `[n, ...sample_shape]`, f32.
    pub inputs: Tensor,
    /// `[n]` class indices, u32.
    pub targets: Tensor,
    /// Samples per batch.
    pub batch_size: usize,
    /// Seed of the per-epoch shuffle, if any.
    pub shuffle_seed: Option<u64>,
    meta: DatasetMeta,
}

/// One batch: inputs `[b, ...]` and targets `[b]`.
#[derive(Debug, Clone)]
pub struct Batch {
    pub inputs: Tensor,
    pub targets: Tensor,
}

impl Dataset {
    /// Builds a data set from tensors already in memory (inputs `[n, ...]` f32, targets `[n]` u32).
    pub fn from_tensors(
        name: impl Into<String>,
        inputs: Tensor,
        targets: Tensor,
        classes: usize,
        batch_size: usize,
        shuffle_seed: Option<u64>,
    ) -> Result<Self> {
        let name = name.into();
        let n = inputs.dims().first().copied().unwrap_or(0);
        if targets.dims() != [n] {
            return Err(RuntimeError::ShapeMismatch {
                name: "targets".into(),
                context: format!("data set {name}"),
                expected: vec![n],
                found: targets.dims().to_vec(),
            });
        }
        if batch_size == 0 || n == 0 {
            return Err(RuntimeError::InvalidConfig(format!(
                "data set {name}: needs samples and a batch size > 0"
            )));
        }
        let max_label = targets
            .max_all()
            .and_then(|m| m.to_scalar::<u32>())
            .ctx(|| format!("data set {name}: targets must be u32 class indices"))?;
        if max_label as usize >= classes {
            return Err(RuntimeError::InvalidConfig(format!(
                "data set {name}: label {max_label} is not below the class count {classes}"
            )));
        }
        let meta = DatasetMeta {
            sample_shape: inputs.dims()[1..].to_vec(),
            classes,
            len: n,
            class_names: vec![],
        };
        Ok(Dataset {
            name,
            inputs,
            targets,
            batch_size,
            shuffle_seed,
            meta,
        })
    }

    /// Shape, classes and length.
    pub fn meta(&self) -> &DatasetMeta {
        &self.meta
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.meta.len
    }

    /// Always false: empty data sets are rejected when built.
    pub fn is_empty(&self) -> bool {
        self.meta.len == 0
    }

    /// Number of batches per epoch (the last one may be partial).
    pub fn num_batches(&self) -> usize {
        self.len().div_ceil(self.batch_size)
    }

    /// The sample order of `epoch`: a seeded permutation, or file order.
    pub fn epoch_order(&self, epoch: usize) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.len() as u32).collect();
        if let Some(seed) = self.shuffle_seed {
            let mixed = seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(mixed));
        }
        order
    }

    /// The batches of `epoch`, in order.
    pub fn batches(&self, epoch: usize) -> Batches<'_> {
        Batches {
            data: self,
            order: if self.shuffle_seed.is_some() {
                Some(self.epoch_order(epoch))
            } else {
                None
            },
            next: 0,
        }
    }

    /// The samples at `kept` (indices into this data set's file order,
    /// ascending), as a data set of their own with the same batch size and
    /// shuffle seed: what a data-pruning stage leaves.
    pub fn subset(&self, kept: &[u32]) -> Result<Dataset> {
        let ctx = || format!("keeping {} samples of {}", kept.len(), self.name);
        if kept.is_empty() {
            return Err(RuntimeError::InvalidConfig(format!(
                "data set {}: pruning would keep no sample",
                self.name
            )));
        }
        if kept.windows(2).any(|w| w[0] >= w[1]) || kept[kept.len() - 1] as usize >= self.len() {
            return Err(RuntimeError::InvalidConfig(format!(
                "data set {}: kept indices must ascend below {}",
                self.name,
                self.len()
            )));
        }
        let idx = Tensor::from_slice(kept, kept.len(), self.inputs.device()).ctx(ctx)?;
        let mut meta = self.meta.clone();
        meta.len = kept.len();
        Ok(Dataset {
            name: self.name.clone(),
            inputs: self.inputs.index_select(&idx, 0).ctx(ctx)?,
            targets: self.targets.index_select(&idx, 0).ctx(ctx)?,
            batch_size: self.batch_size,
            shuffle_seed: self.shuffle_seed,
            meta,
        })
    }

    /// Every sample's class index, in file order.
    pub fn labels(&self) -> Result<Vec<u32>> {
        self.targets
            .to_vec1::<u32>()
            .ctx(|| format!("labels of {}", self.name))
    }

    /// The samples `[start, start + len)` of the file order, as one batch.
    pub fn slice(&self, start: usize, len: usize) -> Result<Batch> {
        let ctx = || format!("slicing data set {}", self.name);
        Ok(Batch {
            inputs: self.inputs.narrow(0, start, len).ctx(ctx)?,
            targets: self.targets.narrow(0, start, len).ctx(ctx)?,
        })
    }
}

/// Iterator over the batches of one epoch.
pub struct Batches<'a> {
    data: &'a Dataset,
    order: Option<Vec<u32>>,
    next: usize,
}

impl Iterator for Batches<'_> {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        let n = self.data.len();
        if self.next >= n {
            return None;
        }
        let start = self.next;
        let len = self.data.batch_size.min(n - start);
        self.next += len;
        Some(match &self.order {
            None => self.data.slice(start, len),
            Some(order) => (|| {
                let ctx = || format!("batching data set {}", self.data.name);
                let device = self.data.inputs.device();
                let idx = Tensor::from_slice(&order[start..start + len], len, device).ctx(ctx)?;
                Ok(Batch {
                    inputs: self.data.inputs.index_select(&idx, 0).ctx(ctx)?,
                    targets: self.data.targets.index_select(&idx, 0).ctx(ctx)?,
                })
            })(),
        })
    }
}
