//! Cache file checksums: xxh3-64 over every byte before a file's footer (the header, the schema
//! with its fingerprint, and all data pages), written into the footer's metadata as the file is
//! written and verified whenever a cache file is opened, so a flipped bit is refused by name
//! instead of training on a silently different id or log-prob.

use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::path::Path;
use xxhash_rust::xxh3::Xxh3Default;

/// Key of the checksum in Arrow footer metadata and Parquet key-value metadata.
pub const CHECKSUM_KEY: &str = "refdpo.xxh3";

/// How many leading bytes of the file are covered, and their xxh3-64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checksum {
    pub len: u64,
    pub xxh3: u64,
}

impl Checksum {
    /// The checksum of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        let mut h = Xxh3Default::new();
        h.update(bytes);
        Self {
            len: bytes.len() as u64,
            xxh3: h.digest(),
        }
    }

    /// `<len>:<hex>`, as stored in the metadata.
    pub fn to_metadata(self) -> String {
        format!("{}:{:016x}", self.len, self.xxh3)
    }

    fn parse(text: &str, path: &Path) -> Result<Self> {
        text.split_once(':')
            .and_then(|(len, hex)| {
                Some(Self {
                    len: len.parse().ok()?,
                    xxh3: u64::from_str_radix(hex, 16).ok()?,
                })
            })
            .ok_or_else(|| corrupt(path, format!("unreadable checksum {text:?}")))
    }

    /// Checks a file's bytes (all of them, or at least the covered prefix) against `stored`
    /// (the metadata value; `None` when the file has none).
    pub fn verify_bytes(stored: Option<&str>, bytes: &[u8], path: &Path) -> Result<()> {
        let want = Self::parse(stored.ok_or_else(|| missing(path))?, path)?;
        let covered = usize::try_from(want.len)
            .ok()
            .and_then(|n| bytes.get(..n))
            .ok_or_else(|| corrupt(path, "shorter than its checksum says"))?;
        Self::compare(want, Self::of(covered), path)
    }

    /// Like [`Checksum::verify_bytes`], streaming the file from disk.
    pub fn verify_file(stored: Option<&str>, path: &Path) -> Result<()> {
        let want = Self::parse(stored.ok_or_else(|| missing(path))?, path)?;
        let file = crate::error::fs::open(path)?;
        let mut h = Xxh3Default::new();
        let mut reader = file.take(want.len);
        let mut buf = vec![0u8; 1 << 20];
        let mut len = 0u64;
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| Error::io("cannot read", path, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            len += n as u64;
        }
        if len < want.len {
            return Err(corrupt(path, "shorter than its checksum says"));
        }
        Self::compare(
            want,
            Self {
                len,
                xxh3: h.digest(),
            },
            path,
        )
    }

    fn compare(want: Self, got: Self, path: &Path) -> Result<()> {
        if want == got {
            Ok(())
        } else {
            Err(corrupt(
                path,
                format!(
                    "checksum mismatch over its first {} bytes (stored {:016x}, computed {:016x})",
                    want.len, want.xxh3, got.xxh3
                ),
            ))
        }
    }
}

/// The error for a cache file that fails a check: it names the file and the fix.
pub fn corrupt(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::CorruptCache {
        path: path.to_path_buf(),
        msg: format!("{what}; delete it and re-run `refdpo precompute`"),
    }
}

fn missing(path: &Path) -> Error {
    corrupt(
        path,
        format!("no `{CHECKSUM_KEY}` checksum (written by an older refdpo)"),
    )
}

/// A writer that hashes every byte on its way to `inner`.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Xxh3Default,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Xxh3Default::new(),
            len: 0,
        }
    }

    /// The checksum of everything written so far.
    pub fn checksum(&self) -> Checksum {
        Checksum {
            len: self.len,
            xxh3: self.hasher.digest(),
        }
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_and_whole_checksums_agree_and_catch_a_flip() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut w = HashingWriter::new(Vec::new());
        for chunk in data.chunks(977) {
            w.write_all(chunk).unwrap();
        }
        let sum = w.checksum();
        assert_eq!(sum, Checksum::of(&data));
        let meta = sum.to_metadata();
        let p = Path::new("x.arrow");
        Checksum::verify_bytes(Some(&meta), &data, p).unwrap();
        let mut flipped = data.clone();
        flipped[150_000] ^= 0x10;
        let err = Checksum::verify_bytes(Some(&meta), &flipped, p)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x.arrow") && err.contains("refdpo precompute"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, &data).unwrap();
        Checksum::verify_file(Some(&meta), &f).unwrap();
        std::fs::write(&f, &flipped).unwrap();
        assert!(Checksum::verify_file(Some(&meta), &f).is_err());
        std::fs::write(&f, &data[..1000]).unwrap();
        assert!(Checksum::verify_file(Some(&meta), &f).is_err());
        assert!(Checksum::verify_bytes(None, &data, p).is_err());
    }
}
