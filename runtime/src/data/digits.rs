//! The 8x8 digits CSV (scikit-learn's `digits.csv.gz`): 64 pixel values 0..16 then the label.

use std::path::Path;

use crate::error::{Result, RuntimeError};

/// Pixels (scaled to 0..1, row-major 8x8 per sample) and labels of the whole file.
pub struct DigitsData {
    pub pixels: Vec<f32>,
    pub labels: Vec<u32>,
}

/// Parses the whole CSV; every malformed line is reported with its line number.
pub fn read(path: &Path) -> Result<DigitsData> {
    let bytes = crate::paths::read_maybe_gz(path)?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| RuntimeError::corrupt(path, format!("not UTF-8 text: {e}")))?;
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != 65 {
            return Err(RuntimeError::corrupt(
                path,
                format!(
                    "line {}: expected 65 comma-separated values (64 pixels + label), found {}",
                    i + 1,
                    fields.len()
                ),
            ));
        }
        for (j, f) in fields.iter().enumerate() {
            let v: f32 = f.trim().parse().map_err(|_| {
                RuntimeError::corrupt(
                    path,
                    format!("line {}, column {}: `{f}` is not a number", i + 1, j + 1),
                )
            })?;
            if j < 64 {
                if !(0.0..=16.0).contains(&v) {
                    return Err(RuntimeError::corrupt(
                        path,
                        format!("line {}, column {}: pixel {v} outside 0..16", i + 1, j + 1),
                    ));
                }
                pixels.push(v / 16.0);
            } else {
                if v.fract() != 0.0 || !(0.0..10.0).contains(&v) {
                    return Err(RuntimeError::corrupt(
                        path,
                        format!("line {}: label {v} is not a digit 0..9", i + 1),
                    ));
                }
                labels.push(v as u32);
            }
        }
    }
    if labels.is_empty() {
        return Err(RuntimeError::corrupt(path, "no samples"));
    }
    Ok(DigitsData { pixels, labels })
}
