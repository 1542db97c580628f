//! Where fetched data lives (`PRUNEC_DATA`, else `<workspace>/data`) and how a missing file is reported.

use std::path::{Path, PathBuf};

use crate::error::{Result, RuntimeError};

/// The data folder: `$PRUNEC_DATA` when set, else `data/` at the workspace root.
pub fn data_dir() -> PathBuf {
    match std::env::var_os("PRUNEC_DATA") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(|root| root.join("data"))
            .unwrap_or_else(|| PathBuf::from("data")),
    }
}

/// Returns `path` if it exists, else a [`RuntimeError::MissingFile`] naming it and
/// the `scripts/fetch-data.sh` argument (`fetch`) that provides it.
pub fn require_file(path: PathBuf, fetch: &str) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(RuntimeError::MissingFile {
            path,
            fetch: fetch.to_string(),
        })
    }
}

/// Returns `path` if it exists, else a [`RuntimeError::MissingNamedFile`]: for
/// paths a user wrote, where no fetch command or data folder applies.
pub fn require_named(path: PathBuf) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(RuntimeError::MissingNamedFile { path })
    }
}

/// Reads a whole file, gunzipping it when its name ends in `.gz`.
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| RuntimeError::io("cannot read", path, e))?;
    if path.extension().is_some_and(|ext| ext == "gz") {
        use std::io::Read;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| RuntimeError::corrupt(path, format!("bad gzip stream: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}
