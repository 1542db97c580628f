//! IDX files (MNIST, Fashion-MNIST), gzipped or not: header-only reads and full u8 reads.

use std::io::Read;
use std::path::Path;

use crate::error::{Result, RuntimeError};

/// The header of an IDX file of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxHeader {
    /// Dimensions, outermost first (e.g. `[60000, 28, 28]`).
    pub dims: Vec<usize>,
}

impl IdxHeader {
    /// Number of header bytes (magic + dims).
    pub fn header_len(&self) -> usize {
        4 + 4 * self.dims.len()
    }

    /// Number of data bytes the header announces.
    pub fn data_len(&self) -> usize {
        self.dims.iter().product()
    }
}

fn open_stream(path: &Path) -> Result<Box<dyn Read>> {
    let file = std::fs::File::open(path).map_err(|e| RuntimeError::io("cannot open", path, e))?;
    let reader = std::io::BufReader::new(file);
    if path.extension().is_some_and(|ext| ext == "gz") {
        Ok(Box::new(flate2::read::GzDecoder::new(reader)))
    } else {
        Ok(Box::new(reader))
    }
}

fn read_exact_or_corrupt(r: &mut dyn Read, buf: &mut [u8], path: &Path, what: &str) -> Result<()> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            RuntimeError::corrupt(path, format!("file ends inside the {what}"))
        } else {
            RuntimeError::corrupt(path, format!("cannot read the {what}: {e}"))
        }
    })
}

fn parse_header(r: &mut dyn Read, path: &Path, expected_rank: usize) -> Result<IdxHeader> {
    let mut magic = [0u8; 4];
    read_exact_or_corrupt(r, &mut magic, path, "IDX magic number")?;
    if magic[0] != 0 || magic[1] != 0 || magic[2] != 0x08 {
        return Err(RuntimeError::corrupt(
            path,
            format!(
                "bad IDX magic {:02x}{:02x}{:02x}{:02x} (expected 000008{:02x}: unsigned bytes, rank {expected_rank})",
                magic[0], magic[1], magic[2], magic[3], expected_rank
            ),
        ));
    }
    let rank = magic[3] as usize;
    if rank != expected_rank {
        return Err(RuntimeError::corrupt(
            path,
            format!("IDX rank is {rank}, expected {expected_rank}"),
        ));
    }
    let mut dims = Vec::with_capacity(rank);
    for _ in 0..rank {
        let mut d = [0u8; 4];
        read_exact_or_corrupt(r, &mut d, path, "IDX dimensions")?;
        dims.push(u32::from_be_bytes(d) as usize);
    }
    Ok(IdxHeader { dims })
}

/// Reads only the header of an IDX file of rank `expected_rank` (decompressing
/// just its first bytes when gzipped).
pub fn read_header(path: &Path, expected_rank: usize) -> Result<IdxHeader> {
    let mut stream = open_stream(path)?;
    parse_header(stream.as_mut(), path, expected_rank)
}

/// Reads a whole IDX file: its header and exactly the announced data bytes.
/// A short file or trailing bytes are reported as corruption.
pub fn read_u8(path: &Path, expected_rank: usize) -> Result<(IdxHeader, Vec<u8>)> {
    let mut stream = open_stream(path)?;
    let header = parse_header(stream.as_mut(), path, expected_rank)?;
    let n = header.data_len();
    let mut data = Vec::with_capacity(n);
    stream
        .as_mut()
        .take(n as u64)
        .read_to_end(&mut data)
        .map_err(|e| RuntimeError::corrupt(path, format!("cannot read the data: {e}")))?;
    if data.len() != n {
        return Err(RuntimeError::corrupt(
            path,
            format!(
                "truncated: header {:?} announces {n} data bytes, file holds {}",
                header.dims,
                data.len()
            ),
        ));
    }
    let mut extra = [0u8; 1];
    let trailing = stream
        .read(&mut extra)
        .map_err(|e| RuntimeError::corrupt(path, format!("cannot read past the data: {e}")))?;
    if trailing != 0 {
        return Err(RuntimeError::corrupt(
            path,
            format!(
                "trailing bytes after the {n} data bytes announced by header {:?}",
                header.dims
            ),
        ));
    }
    Ok((header, data))
}
