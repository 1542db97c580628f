//! ImageFolder data sets: one subfolder per class (classes in name order),
//! PNG or JPEG images in each, decoded, resized and normalised deterministically.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use rayon::prelude::*;

use crate::error::{Result, RuntimeError};

/// How images become samples.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImageOptions {
    /// `(height, width)` every image is resized to; `None` keeps the images'
    /// own size, which must then be the same for all of them.
    pub size: Option<(usize, usize)>,
    /// One channel (luma) instead of three (RGB).
    pub gray: bool,
    /// Pixels are scaled to `[0, 1]`, then become `(x - mean) / std`: one
    /// value for every channel, or one per channel.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions {
            size: None,
            gray: false,
            mean: vec![0.0],
            std: vec![1.0],
        }
    }
}

impl ImageOptions {
    /// Channels per sample.
    pub fn channels(&self) -> usize {
        if self.gray {
            1
        } else {
            3
        }
    }
}

/// The classes of an image folder and its images in serving order.
#[derive(Debug, Clone, PartialEq)]
pub struct FolderIndex {
    /// Class names (subfolder names), sorted; a label is an index into them.
    pub classes: Vec<String>,
    /// Every image with its label, classes interleaved in proportion to
    /// their sizes (each image placed at the middle of its share of its own
    /// class), so any prefix or suffix of the order holds each class in
    /// about its share, even when classes differ in size.
    pub images: Vec<(PathBuf, u32)>,
}

fn is_image(p: &Path) -> bool {
    let hidden = p
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'));
    let ext = p
        .extension()
        .and_then(|x| x.to_str())
        .map(|x| x.to_ascii_lowercase());
    !hidden && matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg")) && p.is_file()
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| RuntimeError::io("cannot read the folder", dir, e))?
        .map(|e| {
            e.map(|e| e.path())
                .map_err(|err| RuntimeError::io("cannot read the folder", dir, err))
        })
        .collect::<Result<_>>()?;
    v.sort();
    Ok(v)
}

/// Lists the classes and images of `root`; every class folder must hold an image.
pub fn index(root: &Path) -> Result<FolderIndex> {
    if !root.is_dir() {
        return Err(if root.exists() {
            RuntimeError::corrupt(
                root,
                "not a folder: an image data set is a folder with one subfolder per class",
            )
        } else {
            RuntimeError::MissingNamedFile {
                path: root.to_path_buf(),
            }
        });
    }
    let mut classes = Vec::new();
    let mut per_class: Vec<Vec<PathBuf>> = Vec::new();
    for dir in sorted_entries(root)? {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !dir.is_dir() || name.starts_with('.') {
            continue;
        }
        let images: Vec<PathBuf> = sorted_entries(&dir)?
            .into_iter()
            .filter(|p| is_image(p))
            .collect();
        if images.is_empty() {
            return Err(RuntimeError::corrupt(
                &dir,
                format!("the class folder `{name}` holds no PNG or JPEG image"),
            ));
        }
        classes.push(name.to_string());
        per_class.push(images);
    }
    if classes.is_empty() {
        return Err(RuntimeError::corrupt(
            root,
            "no class subfolder: an image data set holds one subfolder of PNG or JPEG images per class",
        ));
    }
    // Image i of a class of n sits at (2i + 1) / 2n; ties (equal positions
    // in equal classes) go by label, which for equal classes is round robin.
    let mut placed: Vec<(f64, u32, PathBuf)> = per_class
        .iter()
        .enumerate()
        .flat_map(|(label, files)| {
            let n = files.len();
            files
                .iter()
                .enumerate()
                .map(move |(i, f)| ((2 * i + 1) as f64 / (2 * n) as f64, label as u32, f.clone()))
        })
        .collect();
    placed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let images = placed.into_iter().map(|(_, l, f)| (f, l)).collect();
    Ok(FolderIndex { classes, images })
}

fn open(path: &Path) -> Result<image::ImageReader<std::io::BufReader<std::fs::File>>> {
    image::ImageReader::open(path)
        .map_err(|e| RuntimeError::io("cannot read", path, e))?
        .with_guessed_format()
        .map_err(|e| RuntimeError::io("cannot read", path, e))
}

/// Width and height of one image, from its header.
pub fn dimensions(path: &Path) -> Result<(u32, u32)> {
    open(path)?
        .into_dimensions()
        .map_err(|e| RuntimeError::corrupt(path, format!("not a readable PNG or JPEG image: {e}")))
}

/// The `[channels, height, width]` of every sample, from the image headers
/// only: every header must be readable, and without `size` every image must
/// have the same dimensions.
pub fn sample_shape(index: &FolderIndex, opts: &ImageOptions) -> Result<Vec<usize>> {
    let dims: Vec<(u32, u32)> = index
        .images
        .par_iter()
        .map(|(p, _)| dimensions(p))
        .collect::<Result<_>>()?;
    let (h, w) = match opts.size {
        Some(hw) => hw,
        None => {
            let (w0, h0) = dims[0];
            if let Some(i) = dims.iter().position(|d| *d != (w0, h0)) {
                let (w1, h1) = dims[i];
                return Err(RuntimeError::corrupt(
                    &index.images[i].0,
                    format!(
                        "the image is {w1}x{h1} but {} is {w0}x{h0}; give `size = [HEIGHT, WIDTH]` to resize every image",
                        index.images[0].0.display()
                    ),
                ));
            }
            (h0 as usize, w0 as usize)
        }
    };
    Ok(vec![opts.channels(), h, w])
}

/// Decodes one image into `channels * height * width` values (channel-major).
pub fn decode(path: &Path, opts: &ImageOptions, (h, w): (usize, usize)) -> Result<Vec<f32>> {
    let img = open(path)?
        .decode()
        .map_err(|e| RuntimeError::corrupt(path, format!("cannot decode the image: {e}")))?;
    let (h32, w32) = (h as u32, w as u32);
    // Channel c's scale and shift (a single value applies to every channel).
    let pick = |v: &[f32], c: usize| v.get(c).or(v.last()).copied().unwrap_or(0.0);
    let scale = |c: usize| 1.0 / (255.0 * pick(&opts.std, c));
    let shift = |c: usize| pick(&opts.mean, c) / pick(&opts.std, c);
    let mut out = vec![0.0f32; opts.channels() * h * w];
    if opts.gray {
        let mut px = img.to_luma8();
        if px.dimensions() != (w32, h32) {
            px = image::imageops::resize(&px, w32, h32, FilterType::Triangle);
        }
        let (a, b) = (scale(0), shift(0));
        for (o, p) in out.iter_mut().zip(px.as_raw()) {
            *o = *p as f32 * a - b;
        }
    } else {
        let mut px = img.to_rgb8();
        if px.dimensions() != (w32, h32) {
            px = image::imageops::resize(&px, w32, h32, FilterType::Triangle);
        }
        let plane = h * w;
        let (a, b) = (
            [scale(0), scale(1), scale(2)],
            [shift(0), shift(1), shift(2)],
        );
        for (i, rgb) in px.as_raw().chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + i] = rgb[c] as f32 * a[c] - b[c];
            }
        }
    }
    Ok(out)
}

/// Decodes `images` (in order, in parallel: each image alone, so the result
/// does not depend on the thread count) into one buffer.
pub fn decode_all(
    images: &[(PathBuf, u32)],
    opts: &ImageOptions,
    hw: (usize, usize),
) -> Result<Vec<f32>> {
    let per: Vec<Vec<f32>> = images
        .par_iter()
        .map(|(p, _)| decode(p, opts, hw))
        .collect::<Result<_>>()?;
    Ok(per.concat())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{DatasetKind, DatasetSpec, Split};

    fn write(dir: &Path, class: &str, name: &str, value: u8) {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        image::GrayImage::from_pixel(4, 2, image::Luma([value]))
            .save(dir.join(class).join(name))
            .unwrap();
    }

    #[test]
    fn classes_are_sorted_names_and_interleaved_and_splits_do_not_overlap() {
        let dir = tempfile::tempdir().unwrap();
        for (i, v) in [10u8, 20, 30].into_iter().enumerate() {
            write(dir.path(), "zebra", &format!("{i}.png"), v);
        }
        write(dir.path(), "ant", "a.png", 200);
        std::fs::write(dir.path().join("ant").join("readme.txt"), "not an image").unwrap();
        let ix = index(dir.path()).unwrap();
        assert_eq!(ix.classes, ["ant", "zebra"]);
        let labels: Vec<u32> = ix.images.iter().map(|(_, l)| *l).collect();
        // zebra's three at 1/6, 3/6, 5/6 of the order, ant's one at 1/2.
        assert_eq!(labels, [1, 0, 1, 1]);
        let opts = ImageOptions {
            gray: true,
            ..ImageOptions::default()
        };
        assert_eq!(sample_shape(&ix, &opts).unwrap(), [1, 2, 4]);
        let spec = |split| {
            DatasetSpec::new(DatasetKind::Images, split)
                .files_at(dir.path())
                .image_options(opts.clone())
                .test_fraction(0.25)
        };
        let device = candle_core::Device::Cpu;
        let train = spec(Split::Train).load(&device).unwrap();
        let test = spec(Split::Test).load(&device).unwrap();
        assert_eq!((train.len(), test.len()), (3, 1));
        assert_eq!(train.meta().class_names, ["ant", "zebra"]);
        // The test split is the last image of the order: zebra's third.
        let px: Vec<f32> = test.inputs.flatten_all().unwrap().to_vec1().unwrap();
        assert!(px.iter().all(|p| (*p - 30.0 / 255.0).abs() < 1e-6));
        // Resizing and normalising.
        let resized = DatasetSpec::new(DatasetKind::Images, Split::Train)
            .files_at(dir.path())
            .image_options(ImageOptions {
                size: Some((4, 8)),
                gray: false,
                mean: vec![0.5],
                std: vec![0.5],
            })
            .load(&device)
            .unwrap();
        assert_eq!(resized.meta().sample_shape, [3, 4, 8]);
        let first: Vec<f32> = resized
            .inputs
            .get(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // The first image of the order is zebra's first (10).
        let want = (10.0 / 255.0 - 0.5) / 0.5;
        assert!(first.iter().all(|p| (*p - want).abs() < 1e-5), "{first:?}");
        // One mean and std per channel (planes of 4 x 8 values).
        let (mean, std) = ([0.5f32, 0.25, 0.0], [0.5f32, 0.25, 2.0]);
        let per = DatasetSpec::new(DatasetKind::Images, Split::Train)
            .files_at(dir.path())
            .image_options(ImageOptions {
                size: Some((4, 8)),
                gray: false,
                mean: mean.to_vec(),
                std: std.to_vec(),
            })
            .load(&device)
            .unwrap();
        let first: Vec<f32> = per
            .inputs
            .get(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (c, plane) in first.chunks(32).enumerate() {
            let want = (10.0 / 255.0 - mean[c]) / std[c];
            assert!(
                plane.iter().all(|p| (*p - want).abs() < 1e-5),
                "channel {c}: {plane:?}"
            );
        }
    }

    #[test]
    fn a_suffix_of_unequal_classes_holds_each_class() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..10 {
            write(dir.path(), "many", &format!("{i}.png"), 1);
        }
        for i in 0..2 {
            write(dir.path(), "few", &format!("{i}.png"), 2);
        }
        let ix = index(dir.path()).unwrap();
        // The last and first thirds (4 images) hold the small class too
        // (round robin put both of its images among the first four).
        let tail: Vec<u32> = ix.images[8..].iter().map(|(_, l)| *l).collect();
        assert!(tail.contains(&0) && tail.contains(&1), "{tail:?}");
        let head: Vec<u32> = ix.images[..4].iter().map(|(_, l)| *l).collect();
        assert!(head.contains(&0) && head.contains(&1), "{head:?}");
    }

    #[test]
    fn images_of_different_sizes_need_a_size() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a", "0.png", 1);
        std::fs::create_dir_all(dir.path().join("b")).unwrap();
        image::GrayImage::new(3, 3)
            .save(dir.path().join("b").join("0.png"))
            .unwrap();
        let ix = index(dir.path()).unwrap();
        let err = sample_shape(&ix, &ImageOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("3x3") && err.contains("size = ["), "{err}");
        let sized = ImageOptions {
            size: Some((5, 5)),
            ..ImageOptions::default()
        };
        assert_eq!(sample_shape(&ix, &sized).unwrap(), [3, 5, 5]);
    }
}
