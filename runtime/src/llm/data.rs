//! Where the fetched data lives, and the text corpora used for calibration and evaluation.

use super::error::{Result, RuntimeError};
use std::path::{Path, PathBuf};

/// The data folder: `$PRUNEC_DATA`, else `<workspace root>/data`.
pub fn data_dir() -> PathBuf {
    match std::env::var_os("PRUNEC_DATA") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join("data"),
    }
}

/// `data_dir()/relative`, or an error naming the file and the fetch command for `package`.
pub fn require_data_file(relative: &str, package: &str) -> Result<PathBuf> {
    let path = data_dir().join(relative);
    if path.exists() {
        Ok(path)
    } else {
        Err(RuntimeError::MissingFile {
            path,
            fetch: package.to_string(),
        })
    }
}

/// The SmolLM2-135M-Instruct GGUF file.
pub fn smollm2_gguf() -> Result<PathBuf> {
    require_data_file("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")
}

/// Moby-Dick, the held-out evaluation text.
pub fn moby_dick() -> Result<PathBuf> {
    require_data_file("text/moby-dick.txt", "text")
}

/// The State of the Union addresses (calibration text), sorted by file name.
pub fn sotu_files() -> Result<Vec<PathBuf>> {
    let dir = require_data_file("text/sotu", "text")?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| RuntimeError::io("reading", &dir, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(RuntimeError::MissingFile {
            path: dir.join("*.txt"),
            fetch: "text".into(),
        });
    }
    Ok(files)
}

/// Reads a whole text file.
pub fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| RuntimeError::io("reading", path, e))
}
