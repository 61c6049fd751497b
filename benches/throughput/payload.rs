//! The bytes every client sends, the untimed page-cache warm-up, and the check of every
//! uploaded file against what was sent.

use std::path::Path;

use bytes::Bytes;

use crate::Error;

/// Writes `total` bytes (rounded up to whole payloads) to a scratch file and deletes it,
/// untimed.
///
/// On a VM whose host takes back idle guest memory, the first `total` bytes of page cache
/// written after a pause cost a host page fault each: `dd` of 1 GiB runs at ~450 MB/s the
/// first time and ~5 GB/s right after. Without this, whichever server is measured first pays
/// for it.
pub(crate) fn warm_up(dir: &Path, total: u64, payload: &Bytes) -> Result<(), Error> {
    use std::io::Write as _;
    let path = dir.join("warm-up.tmp");
    let mut file = std::fs::File::create(&path)?;
    for _ in 0..total.div_ceil(payload.len() as u64) {
        file.write_all(payload)?;
    }
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(())
}

/// The uploaded file must be `chunk` repeated, cut at `total` bytes.
pub(crate) fn verify(path: &Path, total: u64, chunk: &[u8]) -> Result<(), Error> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let len = file.metadata()?.len();
    if len != total {
        return Err(format!("{}: {len} bytes, expected {total}", path.display()).into());
    }
    let mut buffer = vec![0; chunk.len()];
    let mut offset = 0u64;
    while offset < total {
        let n = usize::try_from((total - offset).min(chunk.len() as u64))?;
        file.read_exact(&mut buffer[..n])?;
        if buffer[..n] != chunk[..n] {
            return Err(format!(
                "{}: the bytes at {offset} differ from what was sent",
                path.display()
            )
            .into());
        }
        offset += n as u64;
    }
    Ok(())
}

/// Deterministic incompressible bytes (xorshift64).
pub(crate) fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
