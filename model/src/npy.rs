//! A small reader and writer for NumPy `.npy` files: integer token arrays in, f32 arrays out.
//!
//! Invariant: only C-order, little-endian (or single-byte) arrays are accepted; anything else is an error that
//! names the file and the offending header field, never a panic.

use crate::{ModelError, Result};
use std::path::Path;

/// An `.npy` array converted to i64 (integer dtypes) with its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyInts {
    /// The array's shape.
    pub shape: Vec<usize>,
    /// The values in C order.
    pub data: Vec<i64>,
}

fn err(path: &str, reason: impl Into<String>) -> ModelError {
    ModelError::Npy {
        path: path.to_string(),
        reason: reason.into(),
    }
}

/// Parses the header; returns (descr, shape, offset of the data).
fn parse_header(path: &str, bytes: &[u8]) -> Result<(String, Vec<usize>, usize)> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(err(path, "missing \\x93NUMPY magic"));
    }
    let major = bytes[6];
    let (hlen, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(err(path, "truncated header"));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(err(path, format!("unsupported format version {v}"))),
    };
    let end = start + hlen;
    if bytes.len() < end {
        return Err(err(path, "truncated header"));
    }
    let header =
        std::str::from_utf8(&bytes[start..end]).map_err(|_| err(path, "header is not UTF-8"))?;
    let field = |key: &str| -> Result<&str> {
        let at = header
            .find(&format!("'{key}'"))
            .ok_or_else(|| err(path, format!("header lacks '{key}'")))?;
        let rest = &header[at + key.len() + 2..];
        let colon = rest
            .find(':')
            .ok_or_else(|| err(path, format!("malformed '{key}'")))?;
        Ok(rest[colon + 1..].trim_start())
    };
    let descr_field = field("descr")?;
    let descr = descr_field
        .strip_prefix('\'')
        .and_then(|s| s.split('\'').next())
        .ok_or_else(|| err(path, "malformed 'descr'"))?
        .to_string();
    if field("fortran_order")?.starts_with("True") {
        return Err(err(path, "Fortran-order arrays are not supported"));
    }
    let shape_field = field("shape")?;
    let open = shape_field
        .strip_prefix('(')
        .ok_or_else(|| err(path, "malformed 'shape'"))?;
    let close = open
        .find(')')
        .ok_or_else(|| err(path, "malformed 'shape'"))?;
    let mut shape = Vec::new();
    for part in open[..close].split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        shape.push(
            part.parse::<usize>()
                .map_err(|_| err(path, format!("bad shape entry {part:?}")))?,
        );
    }
    Ok((descr, shape, end))
}

/// Reads an integer `.npy` array (i1/i2/i4/i8, u1/u2/u4/u8) into i64.
pub fn read_ints(path: impl AsRef<Path>) -> Result<NpyInts> {
    let path_ref = path.as_ref();
    let p = path_ref.display().to_string();
    let bytes = std::fs::read(path_ref).map_err(|source| ModelError::Io {
        path: p.clone(),
        source,
    })?;
    parse_ints(&p, &bytes)
}

/// Parses integer `.npy` bytes (see [`read_ints`]); `path` is used in error messages only.
pub fn parse_ints(path: &str, bytes: &[u8]) -> Result<NpyInts> {
    let (descr, shape, off) = parse_header(path, bytes)?;
    let n: usize = shape.iter().product();
    let body = &bytes[off..];
    let (kind, width) = {
        let d = descr.as_str();
        let d = d
            .strip_prefix('<')
            .or_else(|| d.strip_prefix('|'))
            .unwrap_or(d);
        if d.starts_with('>') {
            return Err(err(
                path,
                format!("big-endian dtype {descr} is not supported"),
            ));
        }
        let (k, w) = d.split_at(1);
        (
            k.to_string(),
            w.parse::<usize>()
                .map_err(|_| err(path, format!("unsupported dtype {descr}")))?,
        )
    };
    if body.len() < n * width {
        return Err(err(
            path,
            format!("data has {} bytes, shape needs {}", body.len(), n * width),
        ));
    }
    let mut data = Vec::with_capacity(n);
    for c in body[..n * width].chunks_exact(width) {
        let v = match (kind.as_str(), width) {
            ("i", 1) => c[0] as i8 as i64,
            ("u", 1) => c[0] as i64,
            ("i", 2) => i16::from_le_bytes([c[0], c[1]]) as i64,
            ("u", 2) => u16::from_le_bytes([c[0], c[1]]) as i64,
            ("i", 4) => i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64,
            ("u", 4) => u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64,
            ("i", 8) | ("u", 8) => {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                i64::from_le_bytes(b)
            }
            _ => {
                return Err(err(
                    path,
                    format!("unsupported dtype {descr} (need an integer array)"),
                ));
            }
        };
        data.push(v);
    }
    Ok(NpyInts { shape, data })
}

/// Encodes an f32 array as `.npy` (format 1.0, little-endian, C order).
pub fn encode_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_txt = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // Pad so that magic + version + length + header is a multiple of 64, ending in a newline.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Writes an f32 array as `.npy`.
pub fn write_f32(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> Result<()> {
    let path = path.as_ref();
    std::fs::write(path, encode_f32(shape, data)).map_err(|source| ModelError::Io {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_golden_tokens() {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/golden/v3-tiny/tokens.npy"
        );
        let a = read_ints(p).unwrap();
        assert_eq!(a.shape, vec![2, 32]);
        assert!(a.data.iter().all(|&t| (0..512).contains(&t)));
    }

    #[test]
    fn f32_header_is_aligned_and_parses() {
        let bytes = encode_f32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let (descr, shape, off) = parse_header("mem", &bytes).unwrap();
        assert_eq!((descr.as_str(), shape, off % 64), ("<f4", vec![2, 3], 0));
        assert!(parse_ints("mem", &bytes).is_err());
        assert!(parse_ints("mem", b"nope").is_err());
    }
}
