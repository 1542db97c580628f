//! Model I/O: safetensors in and out (names, dtypes and metadata preserved), header-only
//! shape reads (safetensors, PyTorch `.pth`), atomic writes and sha256 of every output.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use crate::error::{CandleContext, Result, RuntimeError};

/// Name, dtype and shape of one tensor stored in a file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorHeader {
    pub name: String,
    /// The file's dtype name (`F32`, `BF16`, ... for safetensors; candle's names for `.pth`).
    pub dtype: String,
    pub shape: Vec<usize>,
}

/// What a safetensors header says: tensors in file order plus the free-form metadata.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SafetensorsHeader {
    pub tensors: Vec<TensorHeader>,
    pub metadata: BTreeMap<String, String>,
}

/// Upper bound on a safetensors JSON header we are willing to read (same as the format's).
const MAX_HEADER: u64 = 100_000_000;

/// Reads only the JSON header of a safetensors file (not the weights).
pub fn read_safetensors_header(path: &Path) -> Result<SafetensorsHeader> {
    let mut file =
        std::fs::File::open(path).map_err(|e| RuntimeError::io("cannot open", path, e))?;
    let file_len = file
        .metadata()
        .map_err(|e| RuntimeError::io("cannot stat", path, e))?
        .len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|_| {
        RuntimeError::corrupt(path, "shorter than the 8-byte safetensors header length")
    })?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER || n + 8 > file_len {
        return Err(RuntimeError::corrupt(
            path,
            format!("safetensors header length {n} does not fit the {file_len}-byte file"),
        ));
    }
    let mut json = vec![0u8; n as usize];
    file.read_exact(&mut json).map_err(|e| {
        RuntimeError::corrupt(path, format!("cannot read the safetensors header: {e}"))
    })?;
    let value: serde_json::Value = serde_json::from_slice(&json)
        .map_err(|e| RuntimeError::corrupt(path, format!("safetensors header is not JSON: {e}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| RuntimeError::corrupt(path, "safetensors header is not a JSON object"))?;
    let mut header = SafetensorsHeader::default();
    let mut with_offsets = Vec::new();
    let data_len = file_len - 8 - n;
    for (name, entry) in obj {
        if name == "__metadata__" {
            if let Some(m) = entry.as_object() {
                for (k, v) in m {
                    if let Some(s) = v.as_str() {
                        header.metadata.insert(k.clone(), s.to_string());
                    }
                }
            }
            continue;
        }
        let bad = |what: &str| RuntimeError::corrupt(path, format!("tensor `{name}`: {what}"));
        let dtype = entry["dtype"]
            .as_str()
            .ok_or_else(|| bad("no dtype"))?
            .to_string();
        let shape = entry["shape"]
            .as_array()
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| {
                d.as_u64()
                    .map(|d| d as usize)
                    .ok_or_else(|| bad("bad shape"))
            })
            .collect::<Result<Vec<_>>>()?;
        let offsets = entry["data_offsets"]
            .as_array()
            .filter(|o| o.len() == 2)
            .ok_or_else(|| bad("no data_offsets"))?;
        let start = offsets[0].as_u64().ok_or_else(|| bad("bad data_offsets"))?;
        let end = offsets[1].as_u64().ok_or_else(|| bad("bad data_offsets"))?;
        if start > end || end > data_len {
            return Err(bad(&format!(
                "data range {start}..{end} outside the {data_len} data bytes (truncated file?)"
            )));
        }
        with_offsets.push((
            start,
            TensorHeader {
                name: name.clone(),
                dtype,
                shape,
            },
        ));
    }
    with_offsets.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
    header.tensors = with_offsets.into_iter().map(|(_, t)| t).collect();
    Ok(header)
}

/// Reads tensor names, dtypes and shapes of a PyTorch `.pth` (zip) state dict
/// without loading the weights.
pub fn read_pth_header(path: &Path) -> Result<Vec<TensorHeader>> {
    let infos = candle_core::pickle::read_pth_tensor_info(path, false, None).map_err(|e| {
        RuntimeError::corrupt(path, format!("not a readable PyTorch state dict: {e}"))
    })?;
    let mut out: Vec<TensorHeader> = infos
        .into_iter()
        .map(|i| TensorHeader {
            name: i.name,
            dtype: format!("{:?}", i.dtype).to_uppercase(),
            shape: i.layout.shape().dims().to_vec(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Loads every tensor of a `.pth` state dict, by name.
pub fn load_pth(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let all = candle_core::pickle::read_all(path).map_err(|e| {
        RuntimeError::corrupt(path, format!("not a readable PyTorch state dict: {e}"))
    })?;
    all.into_iter()
        .map(|(name, t)| {
            let t = t
                .to_device(device)
                .ctx(|| format!("moving `{name}` of {}", path.display()))?;
            Ok((name, t))
        })
        .collect()
}

/// A safetensors file in memory: tensors in file order (names and dtypes as stored) and metadata.
#[derive(Debug, Clone)]
pub struct LoadedTensors {
    pub tensors: Vec<(String, Tensor)>,
    pub metadata: BTreeMap<String, String>,
}

impl LoadedTensors {
    /// The tensor called `name`, or an error naming the file.
    pub fn get(&self, name: &str, path: &Path) -> Result<&Tensor> {
        self.tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| RuntimeError::TensorNotFound {
                name: name.to_string(),
                context: path.display().to_string(),
            })
    }
}

/// Loads a whole safetensors file onto `device`, keeping names, dtypes, file order and metadata.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<LoadedTensors> {
    let header = read_safetensors_header(path)?;
    let bytes = std::fs::read(path).map_err(|e| RuntimeError::io("cannot read", path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| RuntimeError::corrupt(path, format!("invalid safetensors file: {e}")))?;
    let mut tensors = Vec::with_capacity(header.tensors.len());
    for h in &header.tensors {
        let view = st
            .tensor(&h.name)
            .map_err(|e| RuntimeError::corrupt(path, format!("tensor `{}`: {e}", h.name)))?;
        let t = view
            .load(device)
            .map_err(|_| RuntimeError::UnsupportedDType {
                name: h.name.clone(),
                context: path.display().to_string(),
                dtype: h.dtype.clone(),
            })?;
        tensors.push((h.name.clone(), t));
    }
    Ok(LoadedTensors {
        tensors,
        metadata: header.metadata,
    })
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).map_err(|e| RuntimeError::io("cannot open", path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| RuntimeError::io("cannot read", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The absolute, symlink-resolved form of a path that may not exist yet.
fn resolved(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let parent = parent.canonicalize().unwrap_or(parent);
    match path.file_name() {
        Some(name) => parent.join(name),
        None => parent,
    }
}

/// Refuses when `output` is (after resolving links) one of `inputs`.
pub fn check_not_input(output: &Path, inputs: &[&Path]) -> Result<()> {
    let out = resolved(output);
    if inputs.iter().any(|i| resolved(i) == out) {
        return Err(RuntimeError::OutputIsInput {
            path: output.to_path_buf(),
        });
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder,
/// flushed and synced, then renamed into place. A reader never sees a
/// half-written file. Refuses to overwrite any of `inputs`. Returns the sha256.
pub fn write_atomic(path: &Path, bytes: &[u8], inputs: &[&Path]) -> Result<String> {
    check_not_input(path, inputs)?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".prunec-")
        .suffix(".partial")
        .tempfile_in(&dir)
        .map_err(|e| RuntimeError::io("cannot create a temporary file in", &dir, e))?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .map_err(|e| RuntimeError::io("cannot write", tmp.path().to_path_buf(), e))?;
    tmp.persist(path)
        .map_err(|e| RuntimeError::io("cannot rename into", path, e.error))?;
    Ok(sha256_hex(bytes))
}

/// Saves named tensors (any dtype; names and dtypes kept) and string metadata as
/// safetensors, atomically, refusing to overwrite any of `inputs`. Returns the file's sha256.
pub fn save_safetensors_atomic(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
    inputs: &[&Path],
) -> Result<String> {
    check_not_input(path, inputs)?;
    let mut seen = std::collections::HashSet::new();
    for (name, _) in tensors {
        if !seen.insert(name.as_str()) {
            return Err(RuntimeError::InvalidConfig(format!(
                "tensor name `{name}` appears twice in the output {}",
                path.display()
            )));
        }
    }
    let meta: Option<HashMap<String, String>> = if metadata.is_empty() {
        None
    } else {
        Some(
            metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    };
    // Tensors on another device, or non-contiguous, are copied to contiguous CPU memory first.
    let host: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| {
            let t = t
                .to_device(&Device::Cpu)
                .and_then(|t| t.contiguous())
                .ctx(|| format!("preparing `{n}` for {}", path.display()))?;
            Ok((n.clone(), t))
        })
        .collect::<Result<_>>()?;
    let bytes =
        safetensors::serialize(host.iter().map(|(n, t)| (n.as_str(), t)), meta).map_err(|e| {
            RuntimeError::InvalidConfig(format!("cannot serialise {}: {e}", path.display()))
        })?;
    write_atomic(path, &bytes, inputs)
}
