//! The cache schema — the one definition of the stage-one → stage-two contract (SPEC.md) — and the
//! conversion between [`CacheRow`]s and Arrow record batches.

use crate::error::{Error, Result};
use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float64Array, ListArray, RecordBatch, StringArray,
    UInt32Array, UInt64Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef, UInt32Type, UInt64Type};
use std::path::Path;
use std::sync::Arc;

/// Rows per record batch (and Parquet row group) the writers hold at once.
pub const BATCH_ROWS: usize = 4096;

/// Key of the fingerprint in Parquet key-value metadata and Arrow schema metadata.
pub const FINGERPRINT_KEY: &str = "refdpo.fingerprint";

pub mod col {
    pub const PROMPT_ID: &str = "prompt_id";
    pub const ROW: &str = "row";
    pub const PROMPT_IDS: &str = "prompt_ids";
    pub const CHOSEN_IDS: &str = "chosen_ids";
    pub const REJECTED_IDS: &str = "rejected_ids";
    pub const REF_CHOSEN: &str = "ref_chosen_logps";
    pub const REF_REJECTED: &str = "ref_rejected_logps";
    pub const SCORE_CHOSEN: &str = "score_chosen";
    pub const SCORE_REJECTED: &str = "score_rejected";
    pub const CHOSEN_TRUNCATED: &str = "chosen_truncated";
    pub const REJECTED_TRUNCATED: &str = "rejected_truncated";
}

/// One kept pair as stage one writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheRow {
    pub prompt_id: String,
    pub row: u64,
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
    pub ref_chosen_logps: f64,
    pub ref_rejected_logps: f64,
    pub score_chosen: Option<f64>,
    pub score_rejected: Option<f64>,
    pub chosen_truncated: bool,
    pub rejected_truncated: bool,
}

fn ids_type() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::UInt32, false)))
}

/// The cache schema (without metadata).
pub fn schema() -> SchemaRef {
    use col::*;
    Arc::new(Schema::new(vec![
        Field::new(PROMPT_ID, DataType::Utf8, false),
        Field::new(ROW, DataType::UInt64, false),
        Field::new(PROMPT_IDS, ids_type(), false),
        Field::new(CHOSEN_IDS, ids_type(), false),
        Field::new(REJECTED_IDS, ids_type(), false),
        Field::new(REF_CHOSEN, DataType::Float64, false),
        Field::new(REF_REJECTED, DataType::Float64, false),
        Field::new(SCORE_CHOSEN, DataType::Float64, true),
        Field::new(SCORE_REJECTED, DataType::Float64, true),
        Field::new(CHOSEN_TRUNCATED, DataType::Boolean, false),
        Field::new(REJECTED_TRUNCATED, DataType::Boolean, false),
    ]))
}

/// The schema with the fingerprint in its metadata (what the Arrow IPC file carries).
pub fn schema_with_fingerprint(fingerprint_json: &str) -> SchemaRef {
    let meta: std::collections::HashMap<String, String> =
        [(FINGERPRINT_KEY.to_string(), fingerprint_json.to_string())].into();
    Arc::new(schema().as_ref().clone().with_metadata(meta))
}

fn ids_array<'a>(lists: impl Iterator<Item = &'a [u32]> + Clone) -> ArrayRef {
    let lengths = lists.clone().map(<[u32]>::len);
    let offsets = OffsetBuffer::from_lengths(lengths);
    let values = UInt32Array::from_iter_values(lists.flat_map(|l| l.iter().copied()));
    Arc::new(ListArray::new(
        Arc::new(Field::new("item", DataType::UInt32, false)),
        offsets,
        Arc::new(values),
        None,
    ))
}

/// Rows → one record batch with [`schema()`].
/// Groups a stream of rows into record batches of [`BATCH_ROWS`] (the last one shorter) and
/// hands each to `write`: the writers hold one batch at a time.
pub fn write_batches(
    rows: impl Iterator<Item = Result<CacheRow>>,
    schema: &SchemaRef,
    write: &mut dyn FnMut(&RecordBatch) -> Result<()>,
) -> Result<()> {
    let mut batch = Vec::with_capacity(BATCH_ROWS);
    let mut rows = rows.peekable();
    while let Some(row) = rows.next() {
        batch.push(row?);
        if batch.len() == BATCH_ROWS || rows.peek().is_none() {
            write(&to_batch(&batch, schema.clone())?)?;
            batch.clear();
        }
    }
    Ok(())
}

pub fn to_batch(rows: &[CacheRow], schema: SchemaRef) -> Result<RecordBatch> {
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.prompt_id.as_str()),
        )),
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.row))),
        ids_array(rows.iter().map(|r| r.prompt_ids.as_slice())),
        ids_array(rows.iter().map(|r| r.chosen_ids.as_slice())),
        ids_array(rows.iter().map(|r| r.rejected_ids.as_slice())),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|r| r.ref_chosen_logps),
        )),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|r| r.ref_rejected_logps),
        )),
        Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.score_chosen))),
        Arc::new(Float64Array::from_iter(
            rows.iter().map(|r| r.score_rejected),
        )),
        Arc::new(BooleanArray::from_iter(
            rows.iter().map(|r| Some(r.chosen_truncated)),
        )),
        Arc::new(BooleanArray::from_iter(
            rows.iter().map(|r| Some(r.rejected_truncated)),
        )),
    ];
    Ok(RecordBatch::try_new(schema, cols)?)
}

/// Checks that `found` has every cache column with its type; names the first that does not.
pub fn check(found: &Schema, path: &Path) -> Result<()> {
    for field in schema().fields() {
        let Ok(f) = found.field_with_name(field.name()) else {
            return Err(Error::schema(
                path,
                format!(
                    "cache column `{}` is missing: re-run `refdpo precompute`",
                    field.name()
                ),
            ));
        };
        let ok = f.data_type() == field.data_type()
            || matches!(
                (field.name().as_str(), f.data_type()),
                (col::REF_CHOSEN | col::REF_REJECTED, DataType::Float32)
            );
        if !ok {
            return Err(Error::schema(
                path,
                format!(
                    "cache column `{}` has type {}, expected {}: re-run `refdpo precompute`",
                    field.name(),
                    f.data_type(),
                    field.data_type()
                ),
            ));
        }
    }
    Ok(())
}

/// Typed, zero-copy access to one cache record batch.
#[derive(Debug, Clone)]
pub struct CacheBatch {
    batch: RecordBatch,
}

impl CacheBatch {
    /// Wraps a batch whose schema passed [`check`].
    pub fn new(batch: RecordBatch) -> Self {
        Self { batch }
    }

    pub fn len(&self) -> usize {
        self.batch.num_rows()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn col(&self, name: &str) -> &ArrayRef {
        self.batch.column_by_name(name).expect("schema checked")
    }

    fn ids(&self, name: &str, i: usize) -> &[u32] {
        let list = self.col(name).as_list::<i32>();
        let offsets = list.value_offsets();
        let values = list.values().as_primitive::<UInt32Type>().values();
        &values[offsets[i] as usize..offsets[i + 1] as usize]
    }

    fn float(&self, name: &str, i: usize) -> Option<f64> {
        let c = self.col(name);
        if c.is_null(i) {
            return None;
        }
        Some(match c.data_type() {
            DataType::Float32 => {
                f64::from(c.as_primitive::<arrow::datatypes::Float32Type>().value(i))
            }
            _ => c.as_primitive::<Float64Type>().value(i),
        })
    }

    pub fn prompt_ids(&self, i: usize) -> &[u32] {
        self.ids(col::PROMPT_IDS, i)
    }
    pub fn chosen_ids(&self, i: usize) -> &[u32] {
        self.ids(col::CHOSEN_IDS, i)
    }
    pub fn rejected_ids(&self, i: usize) -> &[u32] {
        self.ids(col::REJECTED_IDS, i)
    }
    pub fn ref_chosen(&self, i: usize) -> f64 {
        self.float(col::REF_CHOSEN, i).unwrap_or(f64::NAN)
    }
    pub fn ref_rejected(&self, i: usize) -> f64 {
        self.float(col::REF_REJECTED, i).unwrap_or(f64::NAN)
    }
    pub fn prompt_id(&self, i: usize) -> &str {
        self.col(col::PROMPT_ID).as_string::<i32>().value(i)
    }
    pub fn row(&self, i: usize) -> u64 {
        self.col(col::ROW).as_primitive::<UInt64Type>().value(i)
    }

    /// The largest token id in the batch's id columns (None for a batch without tokens).
    pub fn max_token_id(&self) -> Option<u32> {
        [col::PROMPT_IDS, col::CHOSEN_IDS, col::REJECTED_IDS]
            .iter()
            .filter_map(|name| {
                let list = self.col(name).as_list::<i32>();
                let values = list.values().as_primitive::<UInt32Type>().values();
                values.iter().copied().max()
            })
            .max()
    }

    /// Materializes row `i` (for tests, `show` and small tools; stage two reads the slices).
    pub fn to_row(&self, i: usize) -> CacheRow {
        let flag = |name: &str| self.col(name).as_boolean().value(i);
        CacheRow {
            prompt_id: self
                .col(col::PROMPT_ID)
                .as_string::<i32>()
                .value(i)
                .to_string(),
            row: self.row(i),
            prompt_ids: self.prompt_ids(i).to_vec(),
            chosen_ids: self.chosen_ids(i).to_vec(),
            rejected_ids: self.rejected_ids(i).to_vec(),
            ref_chosen_logps: self.ref_chosen(i),
            ref_rejected_logps: self.ref_rejected(i),
            score_chosen: self.float(col::SCORE_CHOSEN, i),
            score_rejected: self.float(col::SCORE_REJECTED, i),
            chosen_truncated: flag(col::CHOSEN_TRUNCATED),
            rejected_truncated: flag(col::REJECTED_TRUNCATED),
        }
    }
}
