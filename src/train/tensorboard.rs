//! TensorBoard event files (`train.report_to = ["tensorboard"]`): every scalar of
//! `metrics.jsonl`, under its name and step, in `<train.out>/runs/`, so TensorBoard (and W&B
//! through its TensorBoard sync) shows refdpo runs beside TRL runs.
//!
//! The format, written here rather than through a crate (none maintained writes it): a file of
//! TFRecords (u64 length, its masked CRC-32C, the bytes, their masked CRC-32C), each an `Event`
//! protobuf: first `file_version = "brain.Event:2"`, then one `Summary` of `simple_value`s per
//! logged line. A resumed run writes a new file that opens with `SessionLog.START` at the first
//! step it rewrites, so readers drop the older file's events from that step on, as
//! `metrics.jsonl` drops its lines.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// An open event file.
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl EventWriter {
    /// A new event file in `dir` (created), named so that files sort in the order they were
    /// written; when `restart_at` is set, it opens with `SessionLog.START` at that step.
    pub fn create(dir: &Path, restart_at: Option<u64>) -> Result<Self> {
        crate::error::fs::create_dir_all(dir)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let path = dir.join(format!(
            "events.out.tfevents.{:010}.{:09}.refdpo.{}",
            now.as_secs(),
            now.subsec_nanos(),
            std::process::id()
        ));
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("cannot create", &path, e))?;
        let mut w = Self { path, file };
        w.record(&event(0, Payload::FileVersion("brain.Event:2")))?;
        if let Some(step) = restart_at {
            w.record(&event(step, Payload::SessionStart))?;
        }
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event at `step` holding every (tag, value), as f32 (TensorBoard's `simple_value`).
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        self.record(&event(step, Payload::Scalars(values)))
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file
            .write_all(&rec)
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io("cannot append to", &self.path, e))
    }
}

enum Payload<'a> {
    FileVersion(&'a str),
    SessionStart,
    Scalars(&'a [(String, f64)]),
}

/// An `Event` protobuf: wall_time (1, double), step (2, int64), then file_version (3, string),
/// summary (5) or session_log (7).
fn event(step: u64, payload: Payload<'_>) -> Vec<u8> {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let mut e = vec![0x09];
    e.extend_from_slice(&wall.to_le_bytes());
    e.push(0x10);
    varint(&mut e, step);
    match payload {
        Payload::FileVersion(v) => bytes_field(&mut e, 3, v.as_bytes()),
        // SessionLog { status (1, enum) = START (1) }
        Payload::SessionStart => bytes_field(&mut e, 7, &[0x08, 0x01]),
        Payload::Scalars(values) => {
            // Summary { repeated Value value = 1 }, Value { tag = 1, simple_value (2, float) }
            let mut summary = Vec::new();
            for (tag, v) in values {
                let mut value = Vec::new();
                bytes_field(&mut value, 1, tag.as_bytes());
                value.push(0x15);
                value.extend_from_slice(&(*v as f32).to_le_bytes());
                bytes_field(&mut summary, 1, &value);
            }
            bytes_field(&mut e, 5, &summary);
        }
    }
    e
}

/// A length-delimited field (wire type 2).
fn bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, field << 3 | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// CRC-32C (Castagnoli), as TFRecord checksums its length and data.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// TFRecord's masked CRC: rotated right by 15 and offset.
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_of_the_standard_check_string() {
        // RFC 3720's check value
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn varints_and_records_frame_as_protobuf_and_tfrecord_do() {
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), Some(4)).unwrap();
        w.scalars(5, &[("loss".into(), 0.5)]).unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        // three records, each framed by its length and two checksums
        let mut at = 0;
        let mut records = 0;
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            let crc_len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(crc_len, masked_crc(&bytes[at..at + 8]));
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(data));
            at += 16 + len;
            records += 1;
        }
        assert_eq!(records, 3);
        assert!(bytes.windows(13).any(|w| w == b"brain.Event:2"));
    }
}
