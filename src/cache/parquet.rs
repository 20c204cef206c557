//! `<split>.parquet`: the user-facing copy of the cache (zstd), with the fingerprint in its key-value
//! metadata. Writer and reader in one place.

use super::checksum::{seal, Checksum, HashingWriter, CHECKSUM_KEY, PLACEHOLDER};
use super::fingerprint::Fingerprint;
use super::schema::{self, CacheBatch, CacheRow, FINGERPRINT_KEY};
use crate::error::{fs, Error, Result};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use std::path::Path;

/// Writes `rows` to `path` (temporary name, fsync, rename), with the checksum of the whole file
/// in the key-value metadata.
pub fn write(path: &Path, rows: &[CacheRow], fingerprint: &Fingerprint) -> Result<()> {
    write_rows(path, rows.iter().cloned().map(Ok), fingerprint)
}

/// [`write`] from a stream of rows, a row group of [`BATCH_ROWS`] in memory at a time.
pub fn write_rows(
    path: &Path,
    rows: impl Iterator<Item = Result<CacheRow>>,
    fingerprint: &Fingerprint,
) -> Result<()> {
    fs::write_file_atomic(path, |file, tmp| {
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            // no min/max of the dataset's own strings in the footer: the checksum's placeholder
            // must occur there once, whatever a `prompt_id` holds
            .set_column_statistics_enabled(
                ColumnPath::from(schema::col::PROMPT_ID),
                EnabledStatistics::None,
            )
            .set_key_value_metadata(Some(vec![KeyValue::new(
                FINGERPRINT_KEY.to_string(),
                fingerprint.to_json(),
            )]))
            .build();
        let schema = schema::schema();
        let mut writer =
            ArrowWriter::try_new(HashingWriter::new(file), schema.clone(), Some(props))?;
        schema::write_batches(rows, &schema, &mut |b| {
            writer.write(b)?;
            Ok(writer.flush()?) // one row group per batch: nothing more is buffered
        })?;
        writer.flush()?; // the last row group
        writer.append_key_value_metadata(KeyValue::new(
            CHECKSUM_KEY.to_string(),
            PLACEHOLDER.to_string(),
        ));
        let hashing = writer.into_inner()?;
        let sum = hashing.checksum();
        let mut file = hashing.into_inner();
        seal(&mut file, tmp, sum)?;
        Ok(file)
    })
}

/// Checks the file against the checksum in its metadata (reads the whole file once).
pub fn verify(path: &Path) -> Result<()> {
    let builder = open(path)?;
    let meta = builder.metadata().file_metadata().key_value_metadata();
    let stored = meta
        .and_then(|kv| kv.iter().find(|k| k.key == CHECKSUM_KEY))
        .and_then(|k| k.value.as_deref());
    Checksum::verify_file(stored, path)
}

/// The fingerprint stored in a cache parquet file.
pub fn read_fingerprint(path: &Path) -> Result<Fingerprint> {
    let builder = open(path)?;
    let meta = builder.metadata().file_metadata().key_value_metadata();
    let text = meta
        .and_then(|kv| kv.iter().find(|k| k.key == FINGERPRINT_KEY))
        .and_then(|k| k.value.clone())
        .ok_or_else(|| Error::StaleCache {
            path: path.to_path_buf(),
            msg: format!(
                "no `{FINGERPRINT_KEY}` metadata: not a refdpo cache, re-run `refdpo precompute`"
            ),
        })?;
    Fingerprint::from_json(&text, path)
}

fn open(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<std::fs::File>> {
    let file = crate::error::fs::open(path)?;
    crate::error::contain_panic(path, "reading the parquet footer", || {
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| Error::parquet(path, e))
    })
}

/// Reads every row of a cache parquet file (checksum and schema checked).
pub fn read(path: &Path) -> Result<Vec<CacheRow>> {
    verify(path)?;
    let builder = open(path)?;
    schema::check(builder.schema(), path)?;
    let mut rows = Vec::new();
    for batch in builder.build()? {
        let batch = CacheBatch::new(batch?);
        rows.extend((0..batch.len()).map(|i| batch.to_row(i)));
    }
    Ok(rows)
}
