//! `<split>.arrow`: the cache as an uncompressed Arrow IPC file, written by stage one and read by
//! stage two through a memory map, zero-copy (after arrow-rs `examples/zero_copy_ipc.rs`).

use super::checksum::{corrupt, seal, Checksum, HashingWriter, CHECKSUM_KEY, PLACEHOLDER};
use super::fingerprint::Fingerprint;
use super::schema::{self, CacheBatch, CacheRow, FINGERPRINT_KEY};
use crate::error::{fs, Error, Result};
use arrow::buffer::Buffer;
use arrow::ipc::convert::try_fb_to_schema;
use arrow::ipc::reader::{read_footer_length, FileDecoder};
use arrow::ipc::writer::FileWriter;
use arrow::ipc::{root_as_footer, Block};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Writes `rows` as an Arrow IPC file (temporary name, fsync, rename), with the checksum of the
/// whole file in the footer's metadata.
pub fn write(path: &Path, rows: &[CacheRow], fingerprint: &Fingerprint) -> Result<()> {
    write_rows(path, rows.iter().cloned().map(Ok), fingerprint)
}

/// [`write`] from a stream of rows, a record batch of [`schema::BATCH_ROWS`] in memory at a time.
pub fn write_rows(
    path: &Path,
    rows: impl Iterator<Item = Result<CacheRow>>,
    fingerprint: &Fingerprint,
) -> Result<()> {
    fs::write_file_atomic(path, |file, tmp| {
        let schema = schema::schema_with_fingerprint(&fingerprint.to_json());
        let mut writer = FileWriter::try_new_buffered(HashingWriter::new(file), &schema)?;
        schema::write_batches(rows, &schema, &mut |b| Ok(writer.write(b)?))?;
        writer.write_metadata(CHECKSUM_KEY, PLACEHOLDER);
        let buffered = writer.into_inner()?;
        let hashing = buffered
            .into_inner()
            .map_err(|e| Error::io("cannot flush", tmp, e.into_error()))?;
        let sum = hashing.checksum();
        let mut file = hashing.into_inner();
        seal(&mut file, tmp, sum)?;
        Ok(file)
    })
}

/// A memory-mapped cache: record batches whose buffers point into the mapped file.
#[derive(Debug)]
pub struct MappedCache {
    pub path: PathBuf,
    pub fingerprint: Fingerprint,
    batches: Vec<CacheBatch>,
    /// (batch, row) of each global row index.
    index: Vec<(u32, u32)>,
}

impl MappedCache {
    /// Maps `path`, verifies its checksum and decodes its batches without copying the data.
    pub fn open(path: &Path) -> Result<Self> {
        let file = crate::error::fs::open(path)?;
        // SAFETY: the map is read-only and refdpo never writes a cache in place: stage one writes a
        // temporary file and renames it, so the mapped inode is not modified while we hold it. The
        // one remaining hazard — another program truncating the file under us — ends the process
        // with an error naming the file (`signals::mapped`), as the README says.
        let mmap =
            unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io("cannot map", path, e))?;
        let mmap = crate::signals::mapped::watch(mmap, path);
        let buffer = Buffer::from(bytes::Bytes::from_owner(mmap));
        Self::from_buffer(path, buffer)
    }

    fn from_buffer(path: &Path, buffer: Buffer) -> Result<Self> {
        let len = buffer.len();
        if len < 16 || &buffer[..6] != b"ARROW1" {
            return Err(corrupt(path, "no ARROW1 header"));
        }
        let trailer: [u8; 10] = buffer[len - 10..].try_into().expect("10 bytes");
        let footer_len = read_footer_length(trailer).map_err(|e| corrupt(path, e))?;
        if footer_len + 10 > len {
            return Err(corrupt(path, "footer length past the start of the file"));
        }
        let footer = root_as_footer(&buffer[len - 10 - footer_len..len - 10])
            .map_err(|e| corrupt(path, e))?;
        let stored = footer.custom_metadata().and_then(|kvs| {
            kvs.iter()
                .find(|kv| kv.key() == Some(CHECKSUM_KEY))
                .and_then(|kv| kv.value())
        });
        Checksum::verify_bytes(stored, &buffer, len - 10 - footer_len..len - 10, path)?;
        let fb_schema = footer
            .schema()
            .ok_or_else(|| corrupt(path, "no schema in the footer"))?;
        let schema = Arc::new(try_fb_to_schema(fb_schema).map_err(|e| corrupt(path, e))?);
        schema::check(&schema, path)?;
        let fp_json = schema
            .metadata()
            .get(FINGERPRINT_KEY)
            .ok_or_else(|| Error::StaleCache {
                path: path.to_path_buf(),
                msg: format!(
                    "no `{FINGERPRINT_KEY}` in the schema metadata: re-run `refdpo precompute`"
                ),
            })?;
        let fingerprint = Fingerprint::from_json(fp_json, path)?;
        let decoder = FileDecoder::new(schema, footer.version());
        let blocks: Vec<Block> = footer
            .recordBatches()
            .map(|b| b.iter().copied().collect())
            .unwrap_or_default();
        let mut batches = Vec::with_capacity(blocks.len());
        let mut index = Vec::new();
        for (b, block) in blocks.iter().enumerate() {
            let start = usize::try_from(block.offset()).map_err(|e| corrupt(path, e))?;
            let block_len = block.bodyLength() as usize + block.metaDataLength() as usize;
            if start.checked_add(block_len).is_none_or(|end| end > len) {
                return Err(corrupt(
                    path,
                    format!("record batch {b} lies past the end of the file"),
                ));
            }
            let data = buffer.slice_with_length(start, block_len);
            // arrow's decoder panics on some crafted buffers (past the checksum only by design)
            let batch =
                crate::error::contain_panic(path, "decoding an Arrow record batch", || {
                    decoder
                        .read_record_batch(block, &data)
                        .map_err(|e| corrupt(path, e))?
                        .ok_or_else(|| corrupt(path, format!("record batch {b} is empty")))
                })?;
            let batch = CacheBatch::new(batch);
            index.extend((0..batch.len()).map(|r| (b as u32, r as u32)));
            batches.push(batch);
        }
        Ok(Self {
            path: path.to_path_buf(),
            fingerprint,
            batches,
            index,
        })
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// One cache of several (a split's shards, in order), with the first's path and the whole
    /// split's fingerprint (the first's, its `shard` cleared).
    pub fn concat(parts: Vec<MappedCache>) -> Self {
        let mut parts = parts.into_iter();
        let mut out = parts.next().expect("at least one part");
        out.fingerprint.shard = None;
        out.fingerprint.shard_pairs = None;
        for p in parts {
            let base = out.batches.len() as u32;
            out.index
                .extend(p.index.iter().map(|&(b, r)| (base + b, r)));
            out.batches.extend(p.batches);
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The batch and in-batch row of global row `i`.
    pub fn locate(&self, i: usize) -> (&CacheBatch, usize) {
        let (b, r) = self.index[i];
        (&self.batches[b as usize], r as usize)
    }

    /// The largest token id in the cache.
    pub fn max_token_id(&self) -> Option<u32> {
        self.batches
            .iter()
            .filter_map(CacheBatch::max_token_id)
            .max()
    }

    pub fn to_row(&self, i: usize) -> CacheRow {
        let (b, r) = self.locate(i);
        b.to_row(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::fingerprint::sample;

    fn rows() -> Vec<CacheRow> {
        (0..5)
            .map(|i| CacheRow {
                prompt_id: format!("p{i}"),
                row: i * 2,
                prompt_ids: vec![1, 2, i as u32],
                chosen_ids: (0..i as u32).collect(),
                rejected_ids: vec![9; 3],
                ref_chosen_logps: -1.5 * i as f64,
                ref_rejected_logps: -2.25,
                score_chosen: (i % 2 == 0).then_some(8.0),
                score_rejected: Some(4.5),
                chosen_truncated: i == 3,
                rejected_truncated: false,
            })
            .collect()
    }

    #[test]
    fn arrow_and_parquet_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (arrow_path, pq_path) = (dir.path().join("t.arrow"), dir.path().join("t.parquet"));
        let rows = rows();
        write(&arrow_path, &rows, &sample()).unwrap();
        super::super::parquet::write(&pq_path, &rows, &sample()).unwrap();
        let mapped = MappedCache::open(&arrow_path).unwrap();
        assert_eq!(mapped.fingerprint, sample());
        let back: Vec<_> = (0..mapped.len()).map(|i| mapped.to_row(i)).collect();
        assert_eq!(back, rows);
        assert_eq!(super::super::parquet::read(&pq_path).unwrap(), rows);
        assert_eq!(
            super::super::parquet::read_fingerprint(&pq_path).unwrap(),
            sample()
        );
        assert!(!fs::tmp_path(&arrow_path).exists());
    }

    #[test]
    fn truncated_or_garbage_files_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.arrow");
        write(&path, &rows(), &sample()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        for cut in [0, 5, 20, bytes.len() / 2, bytes.len() - 11, bytes.len() - 1] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let err = MappedCache::open(&path).unwrap_err().to_string();
            assert!(
                err.contains("re-run") || err.contains("corrupt"),
                "cut {cut}: {err}"
            );
        }
        // One flipped bit anywhere before the footer is refused by name.
        for at in [7, bytes.len() / 3, bytes.len() / 2, bytes.len() - 400] {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x04;
            std::fs::write(&path, &flipped).unwrap();
            let err = MappedCache::open(&path).unwrap_err().to_string();
            assert!(
                err.contains("t.arrow") && err.contains("refdpo precompute"),
                "bit at {at}: {err}"
            );
        }
    }
}
