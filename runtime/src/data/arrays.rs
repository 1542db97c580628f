//! Arrays data sets: an inputs tensor and a labels tensor named in one
//! `.safetensors` file. The header is read alone; the labels (one number
//! per sample) are read to count the classes; the inputs only when loaded.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::error::{Result, RuntimeError};

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct Entry {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data_offsets: (u64, u64),
}

/// The tensors of a safetensors file and where their data starts.
#[derive(Debug, Clone)]
pub struct Header {
    pub tensors: BTreeMap<String, Entry>,
    /// Byte offset of the data section.
    data_start: u64,
}

const MAX_HEADER: u64 = 100 << 20;

fn element_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "U8" | "I8" | "BOOL" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

/// Reads the header of a safetensors file (never its data).
pub fn read_header(path: &Path) -> Result<Header> {
    let mut f = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => RuntimeError::MissingNamedFile {
            path: path.to_path_buf(),
        },
        _ => RuntimeError::io("cannot read", path, e),
    })?;
    let file_len = f
        .metadata()
        .map_err(|e| RuntimeError::io("cannot read", path, e))?
        .len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| RuntimeError::corrupt(path, "too short for a safetensors header"))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER || 8 + n > file_len {
        return Err(RuntimeError::corrupt(
            path,
            format!("the safetensors header claims {n} bytes; the file has {file_len}"),
        ));
    }
    let mut json = vec![0u8; n as usize];
    f.read_exact(&mut json)
        .map_err(|e| RuntimeError::io("cannot read", path, e))?;
    let raw: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&json)
        .map_err(|e| RuntimeError::corrupt(path, format!("bad safetensors header: {e}")))?;
    let mut tensors = BTreeMap::new();
    for (name, v) in raw {
        if name == "__metadata__" {
            continue;
        }
        let e: Entry = serde_json::from_value(v).map_err(|e| {
            RuntimeError::corrupt(path, format!("bad header entry for `{name}`: {e}"))
        })?;
        // Sizes come from the file: overflow is a corrupt header, not a panic.
        let elems = e
            .shape
            .iter()
            .try_fold(1usize, |acc, d| acc.checked_mul(*d));
        let size = match (element_size(&e.dtype), elems) {
            (Some(s), Some(elems)) => Some(s.checked_mul(elems)),
            (None, Some(_)) => None,
            (_, None) => Some(None),
        };
        let (a, b) = e.data_offsets;
        let sized_wrong = match size {
            Some(Some(s)) => b.checked_sub(a) != Some(s as u64),
            Some(None) => true,
            None => false,
        };
        if sized_wrong || (8 + n).checked_add(b).is_none_or(|end| end > file_len) {
            return Err(RuntimeError::corrupt(
                path,
                format!("the data of `{name}` does not match its header (truncated file?)"),
            ));
        }
        tensors.insert(name, e);
    }
    Ok(Header {
        tensors,
        data_start: 8 + n,
    })
}

impl Header {
    /// The entry of `name`, or an error listing the file's tensors.
    pub fn entry(&self, path: &Path, name: &str) -> Result<&Entry> {
        self.tensors.get(name).ok_or_else(|| {
            let names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
            RuntimeError::TensorNotFound {
                name: name.to_string(),
                context: format!("{} (it holds: {})", path.display(), names.join(", ")),
            }
        })
    }

    /// The values of `name`, converted to f64, elements `[from, to)` of the flattened tensor.
    pub fn read_f64(&self, path: &Path, name: &str, from: usize, to: usize) -> Result<Vec<f64>> {
        let e = self.entry(path, name)?;
        let size = element_size(&e.dtype).ok_or_else(|| RuntimeError::UnsupportedDType {
            name: name.to_string(),
            context: path.display().to_string(),
            dtype: e.dtype.clone(),
        })?;
        let mut f =
            std::fs::File::open(path).map_err(|e| RuntimeError::io("cannot read", path, e))?;
        f.seek(SeekFrom::Start(
            self.data_start + e.data_offsets.0 + (from * size) as u64,
        ))
        .map_err(|e| RuntimeError::io("cannot read", path, e))?;
        let mut bytes = vec![0u8; (to - from) * size];
        f.read_exact(&mut bytes)
            .map_err(|e| RuntimeError::io("cannot read", path, e))?;
        let conv = |c: &[u8]| -> f64 {
            match e.dtype.as_str() {
                "U8" | "BOOL" => c[0] as f64,
                "I8" => c[0] as i8 as f64,
                "U16" => u16::from_le_bytes([c[0], c[1]]) as f64,
                "I16" => i16::from_le_bytes([c[0], c[1]]) as f64,
                "F16" => half::f16::from_le_bytes([c[0], c[1]]).to_f64(),
                "BF16" => half::bf16::from_le_bytes([c[0], c[1]]).to_f64(),
                "U32" => u32::from_le_bytes(c.try_into().unwrap()) as f64,
                "I32" => i32::from_le_bytes(c.try_into().unwrap()) as f64,
                "F32" => f32::from_le_bytes(c.try_into().unwrap()) as f64,
                "U64" => u64::from_le_bytes(c.try_into().unwrap()) as f64,
                "I64" => i64::from_le_bytes(c.try_into().unwrap()) as f64,
                _ => f64::from_le_bytes(c.try_into().unwrap()),
            }
        };
        Ok(bytes.chunks_exact(size).map(conv).collect())
    }
}

/// Checks the pair of tensors and reads the labels: `(sample shape, labels)`.
/// Inputs are `[n, ...]` of a numeric dtype; labels are `[n]` or `[n, 1]`,
/// integers (or integral floats) from 0.
pub fn check_pair(
    path: &Path,
    header: &Header,
    inputs: &str,
    labels: &str,
) -> Result<(Vec<usize>, Vec<u32>)> {
    let x = header.entry(path, inputs)?;
    let y = header.entry(path, labels)?;
    for (name, e) in [(inputs, x), (labels, y)] {
        if element_size(&e.dtype).is_none() || e.dtype == "BOOL" {
            return Err(RuntimeError::UnsupportedDType {
                name: name.to_string(),
                context: path.display().to_string(),
                dtype: e.dtype.clone(),
            });
        }
    }
    if x.shape.is_empty() || x.shape[0] == 0 {
        return Err(RuntimeError::corrupt(
            path,
            format!(
                "the inputs `{inputs}` have shape {:?}: one row per sample is needed",
                x.shape
            ),
        ));
    }
    let n = x.shape[0];
    if !(y.shape == [n] || y.shape == [n, 1]) {
        return Err(RuntimeError::ShapeMismatch {
            name: labels.to_string(),
            context: format!(
                "{}: one label per sample of `{inputs}` {:?}",
                path.display(),
                x.shape
            ),
            expected: vec![n],
            found: y.shape.clone(),
        });
    }
    let values = header.read_f64(path, labels, 0, n)?;
    let mut out = Vec::with_capacity(n);
    for (i, v) in values.into_iter().enumerate() {
        if v.fract() != 0.0 || !(0.0..=u32::MAX as f64).contains(&v) {
            return Err(RuntimeError::corrupt(
                path,
                format!("label {v} of sample {i} in `{labels}` is not a class index (an integer from 0)"),
            ));
        }
        // The class count is the largest label + 1: a stray huge label
        // would make the model's output layer that wide.
        if v >= MAX_CLASSES as f64 {
            return Err(RuntimeError::corrupt(
                path,
                format!("label {v} of sample {i} in `{labels}` is not below {MAX_CLASSES} classes"),
            ));
        }
        out.push(v as u32);
    }
    Ok((x.shape[1..].to_vec(), out))
}

/// The most classes a `tensors` data set may have.
pub const MAX_CLASSES: usize = 1 << 20;

/// Samples `[from, to)` of the inputs, as f32.
pub fn read_inputs(
    path: &Path,
    header: &Header,
    inputs: &str,
    from: usize,
    to: usize,
) -> Result<Vec<f32>> {
    let x = header.entry(path, inputs)?;
    let per: usize = x.shape[1..].iter().product();
    let v = header.read_f64(path, inputs, from * per, to * per)?;
    Ok(v.into_iter().map(|v| v as f32).collect())
}
