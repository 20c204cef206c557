//! Cache file checksums: xxh3-64 over every byte of a file (the header, the schema with its
//! fingerprint, all data pages and the footer), written into the footer's metadata as the file is
//! written and verified whenever a cache file is opened, so a flipped bit — in the data or in the
//! footer that says where the data is and what its columns are called — is refused by name
//! instead of training on a silently different id or log-prob.
//!
//! The value (`whole:<16 hex digits>`) is the hash of the file as written with
//! [`PLACEHOLDER`] in its place; the writer then puts it over the placeholder ([`seal`]), and a
//! reader hashes the file with the placeholder put back. Files written before (`<len>:<hex>`)
//! covered the bytes before their footer only, and are still read so.

use crate::error::{Error, Result};
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::Path;
use xxhash_rust::xxh3::Xxh3Default;

/// Key of the checksum in Arrow footer metadata and Parquet key-value metadata.
pub const CHECKSUM_KEY: &str = "refdpo.xxh3";

/// What a whole-file checksum value starts with.
const WHOLE: &str = "whole:";

/// The checksum value a file is written with, sealed over once the file is complete: as long as
/// the value (`whole:` and 16 hex digits), and never a valid one.
pub const PLACEHOLDER: &str = "whole:????????????????";

/// Where a cache file's footer is, from its length and its last 10 bytes (or all, if fewer): an
/// Arrow IPC file's flatbuffer footer (`<len: i32> ARROW1`), or a Parquet file's thrift metadata
/// (`<len: u32> PAR1`).
pub fn footer_range(len: u64, tail: &[u8]) -> Option<Range<u64>> {
    let n = tail.len();
    let (footer_len, trailer) = if tail.ends_with(b"ARROW1") && n >= 10 {
        let l = i32::from_le_bytes(tail[n - 10..n - 6].try_into().ok()?);
        (u64::try_from(l).ok()?, 10)
    } else if tail.ends_with(b"PAR1") && n >= 8 {
        let l = u32::from_le_bytes(tail[n - 8..n - 4].try_into().ok()?);
        (u64::from(l), 8)
    } else {
        return None;
    };
    let end = len.checked_sub(trailer)?;
    Some(end.checked_sub(footer_len)?..end)
}

/// The footer of the cache file `file` of `len` bytes ([`footer_range`]): where it starts, and its
/// bytes; `None` where the file ends in no footer.
fn read_footer(file: &mut std::fs::File, len: u64) -> std::io::Result<Option<(u64, Vec<u8>)>> {
    let tail_len = len.min(10);
    let mut tail = vec![0; tail_len as usize];
    file.seek(SeekFrom::Start(len - tail_len))?;
    file.read_exact(&mut tail)?;
    let Some(footer) = footer_range(len, &tail) else {
        return Ok(None);
    };
    let mut bytes = vec![0; (footer.end - footer.start) as usize];
    file.seek(SeekFrom::Start(footer.start))?;
    file.read_exact(&mut bytes)?;
    Ok(Some((footer.start, bytes)))
}

/// The one place `value` occurs in `footer` (an offset into it).
fn only_place(footer: &[u8], value: &str) -> Option<usize> {
    let mut at = footer
        .windows(value.len())
        .enumerate()
        .filter(|(_, w)| *w == value.as_bytes())
        .map(|(i, _)| i);
    let first = at.next()?;
    at.next().is_none().then_some(first)
}

/// Puts the whole-file checksum of `file` (written at `tmp` through a [`HashingWriter`] whose
/// checksum is `sum`, with [`PLACEHOLDER`] as its `refdpo.xxh3` value) over the placeholder.
pub fn seal(file: &mut std::fs::File, tmp: &Path, sum: Checksum) -> Result<()> {
    let io = |e| Error::io("cannot seal", tmp, e);
    let mut read = std::fs::File::open(tmp).map_err(io)?;
    let (start, bytes) = read_footer(&mut read, sum.len)
        .map_err(io)?
        .ok_or_else(|| corrupt(tmp, "no footer to seal"))?;
    let at = only_place(&bytes, PLACEHOLDER).ok_or_else(|| {
        Error::Config(format!(
            "`{}`: the checksum's placeholder is not once in its footer: does a dataset or model \
             id hold {PLACEHOLDER:?}?",
            tmp.display()
        ))
    })?;
    file.seek(SeekFrom::Start(start + at as u64))
        .and_then(|_| file.write_all(sum.whole_value().as_bytes()))
        .map_err(io)
}

/// [`seal`] on a file in memory whose `refdpo.xxh3` value is a whole-file one (its own, or the
/// placeholder): the checksum of its bytes as they are now, put in place (a test crafts damaged
/// files that still pass it). False where it holds no such value.
pub fn reseal(bytes: &mut [u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(10)..];
    let Some(footer) = footer_range(bytes.len() as u64, tail) else {
        return false;
    };
    let footer = footer.start as usize..footer.end as usize;
    let Some(at) = bytes[footer.clone()]
        .windows(PLACEHOLDER.len())
        .position(|w| w.starts_with(WHOLE.as_bytes()))
    else {
        return false;
    };
    let at = footer.start + at;
    let place = at..at + PLACEHOLDER.len();
    bytes[place.clone()].copy_from_slice(PLACEHOLDER.as_bytes());
    let sum = Checksum::of(bytes);
    bytes[place].copy_from_slice(sum.whole_value().as_bytes());
    true
}

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

    /// `<len>:<hex>`: the value of a checksum over the bytes before a footer (files written
    /// before whole-file checksums; tests craft them).
    pub fn to_metadata(self) -> String {
        format!("{}:{:016x}", self.len, self.xxh3)
    }

    /// `whole:<hex>`, as a whole-file checksum is stored.
    fn whole_value(self) -> String {
        format!("{WHOLE}{:016x}", self.xxh3)
    }

    /// The 64-bit value of a `whole:<hex>` one.
    fn parse_whole(text: &str, path: &Path) -> Result<u64> {
        text.strip_prefix(WHOLE)
            .filter(|hex| hex.len() == 16)
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .ok_or_else(|| corrupt(path, format!("unreadable checksum {text:?}")))
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

    /// Checks a whole file's bytes, whose footer is `footer`, against `stored` (the metadata
    /// value; `None` when the file has none).
    pub fn verify_bytes(
        stored: Option<&str>,
        bytes: &[u8],
        footer: Range<usize>,
        path: &Path,
    ) -> Result<()> {
        let stored = stored.ok_or_else(|| missing(path))?;
        if stored.starts_with(WHOLE) {
            let want = Self::parse_whole(stored, path)?;
            let at = bytes
                .get(footer.clone())
                .and_then(|f| only_place(f, stored))
                .ok_or_else(|| corrupt(path, "its checksum is not once in its footer"))?
                + footer.start;
            let mut h = Xxh3Default::new();
            h.update(&bytes[..at]);
            h.update(PLACEHOLDER.as_bytes());
            h.update(&bytes[at + stored.len()..]);
            let got = Self {
                len: bytes.len() as u64,
                xxh3: h.digest(),
            };
            let want = Self {
                len: got.len,
                xxh3: want,
            };
            return Self::compare(want, got, path);
        }
        let want = Self::parse(stored, path)?;
        let covered = usize::try_from(want.len)
            .ok()
            .and_then(|n| bytes.get(..n))
            .ok_or_else(|| corrupt(path, "shorter than its checksum says"))?;
        Self::compare(want, Self::of(covered), path)
    }

    /// Like [`Checksum::verify_bytes`], streaming the file from disk.
    pub fn verify_file(stored: Option<&str>, path: &Path) -> Result<()> {
        let stored = stored.ok_or_else(|| missing(path))?;
        if stored.starts_with(WHOLE) {
            return Self::verify_whole_file(stored, path);
        }
        let want = Self::parse(stored, path)?;
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

    /// A whole-file checksum, the file streamed from disk with the placeholder hashed in the
    /// value's place.
    fn verify_whole_file(stored: &str, path: &Path) -> Result<()> {
        let want = Self::parse_whole(stored, path)?;
        let io = |e| Error::io("cannot read", path, e);
        let mut file = crate::error::fs::open(path)?;
        let len = file.metadata().map_err(io)?.len();
        let (start, bytes) = read_footer(&mut file, len)
            .map_err(io)?
            .ok_or_else(|| corrupt(path, "no footer"))?;
        let at = only_place(&bytes, stored)
            .ok_or_else(|| corrupt(path, "its checksum is not once in its footer"))?
            as u64
            + start;
        let mut h = Xxh3Default::new();
        let mut buf = vec![0u8; 1 << 20];
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        hash_from(&mut file, at, &mut h, &mut buf).map_err(io)?;
        h.update(PLACEHOLDER.as_bytes());
        file.seek(SeekFrom::Current(stored.len() as i64))
            .map_err(io)?;
        let rest = len - at - stored.len() as u64;
        hash_from(&mut file, rest, &mut h, &mut buf).map_err(io)?;
        let got = Self {
            len,
            xxh3: h.digest(),
        };
        Self::compare(Self { len, xxh3: want }, got, path)
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

/// Hashes the next `n` bytes of `file` into `h`, through `buf`.
fn hash_from(
    file: &mut std::fs::File,
    mut n: u64,
    h: &mut Xxh3Default,
    buf: &mut [u8],
) -> std::io::Result<()> {
    while n > 0 {
        let k = n.min(buf.len() as u64) as usize;
        file.read_exact(&mut buf[..k])?;
        h.update(&buf[..k]);
        n -= k as u64;
    }
    Ok(())
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
        let footer = data.len()..data.len();
        Checksum::verify_bytes(Some(&meta), &data, footer.clone(), p).unwrap();
        let mut flipped = data.clone();
        flipped[150_000] ^= 0x10;
        let err = Checksum::verify_bytes(Some(&meta), &flipped, footer.clone(), p)
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
        assert!(Checksum::verify_bytes(None, &data, footer, p).is_err());
    }

    /// A whole-file checksum: sealed over its placeholder, it passes as written, and a flip
    /// anywhere — data or footer — fails, in memory and streamed; `reseal` makes a damaged file
    /// pass again (for the tests that craft them).
    #[test]
    fn a_whole_file_checksum_covers_the_footer_too() {
        // a file shaped as Parquet's: data, then a footer holding the value, its length, PAR1
        let mut file: Vec<u8> = (0..5000u32).map(|i| (i * 13 % 251) as u8).collect();
        let footer_start = file.len();
        file.extend_from_slice(b"meta:");
        file.extend_from_slice(PLACEHOLDER.as_bytes());
        file.extend_from_slice(b":more");
        let footer_len = (file.len() - footer_start) as u32;
        file.extend_from_slice(&footer_len.to_le_bytes());
        file.extend_from_slice(b"PAR1");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.parquet");
        std::fs::write(&path, &file).unwrap();
        let sum = Checksum::of(&file);
        let mut handle = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        seal(&mut handle, &path, sum).unwrap();
        drop(handle);
        let sealed = std::fs::read(&path).unwrap();
        let stored = format!("whole:{:016x}", sum.xxh3);
        let footer = footer_start..sealed.len() - 8;
        Checksum::verify_bytes(Some(&stored), &sealed, footer.clone(), &path).unwrap();
        Checksum::verify_file(Some(&stored), &path).unwrap();
        for at in [10, footer_start + 2, sealed.len() - 14] {
            let mut bad = sealed.clone();
            bad[at] ^= 1;
            assert!(Checksum::verify_bytes(Some(&stored), &bad, footer.clone(), &path).is_err());
            std::fs::write(&path, &bad).unwrap();
            assert!(
                Checksum::verify_file(Some(&stored), &path).is_err(),
                "flip at {at}"
            );
            assert!(reseal(&mut bad));
            let now = String::from_utf8(bad[footer_start + 5..footer_start + 27].to_vec()).unwrap();
            Checksum::verify_bytes(Some(&now), &bad, footer.clone(), &path).unwrap();
        }
    }
}
