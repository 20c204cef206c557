//! Reads a split (`data/<split>-*.parquet`) of a dataset in the HuggingFaceH4/ultrafeedback_binarized
//! layout into [`PreferenceRow`]s, checking the schema and naming the file and column on mismatch.

use super::{Message, PreferenceRow};
use crate::error::{Error, Result};
use arrow::array::{Array, AsArray, StructArray};
use arrow::datatypes::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::path::{Path, PathBuf};

/// The parquet files of `split` under `<dir>/data/`, sorted (`<split>-00000-of-00002.parquet`, …).
pub fn split_files(dir: &Path, split: &str) -> Result<Vec<PathBuf>> {
    let data = dir.join("data");
    let entries = std::fs::read_dir(&data).map_err(|e| Error::io("cannot list", &data, e))?;
    let prefix = format!("{split}-");
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with(&prefix) && name.ends_with(".parquet")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::schema(
            &data,
            format!(
                "no `{split}-*.parquet` files: check `dataset.train_split` / `dataset.test_split`"
            ),
        ));
    }
    Ok(files)
}

/// Reads the first `limit` rows (0 = all) of a split spread over `files`.
pub fn read_split(files: &[PathBuf], limit: usize) -> Result<Vec<PreferenceRow>> {
    let mut rows = Vec::new();
    for file in files {
        read_file(file, limit, &mut rows)?;
        if limit > 0 && rows.len() >= limit {
            break;
        }
    }
    Ok(rows)
}

fn read_file(path: &Path, limit: usize, rows: &mut Vec<PreferenceRow>) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io("cannot open", path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| Error::schema(path, format!("not a readable parquet file: {e}")))?;
    let schema = builder.schema().clone();
    for name in ["prompt_id", "chosen", "rejected"] {
        if schema.field_with_name(name).is_err() {
            let found: Vec<_> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            return Err(Error::schema(
                path,
                format!(
                    "column `{name}` is missing (found: {}); expected the ultrafeedback_binarized layout",
                    found.join(", ")
                ),
            ));
        }
    }
    let reader = builder.build()?;
    for batch in reader {
        let batch = batch?;
        let prompt_id = string_column(
            path,
            batch.column_by_name("prompt_id").unwrap(),
            "prompt_id",
        )?;
        let chosen = messages_column(path, batch.column_by_name("chosen").unwrap(), "chosen")?;
        let rejected =
            messages_column(path, batch.column_by_name("rejected").unwrap(), "rejected")?;
        let score = |name: &str| -> Result<Vec<Option<f64>>> {
            match batch.column_by_name(name) {
                Some(col) => float_column(path, col, name),
                None => Ok(vec![None; batch.num_rows()]),
            }
        };
        let (sc, sr) = (score("score_chosen")?, score("score_rejected")?);
        for i in 0..batch.num_rows() {
            if limit > 0 && rows.len() >= limit {
                return Ok(());
            }
            rows.push(PreferenceRow {
                row: rows.len() as u64,
                prompt_id: prompt_id[i].clone().unwrap_or_default(),
                chosen: chosen[i].clone(),
                rejected: rejected[i].clone(),
                score_chosen: sc[i],
                score_rejected: sr[i],
            });
        }
    }
    Ok(())
}

fn type_error(path: &Path, name: &str, expected: &str, found: &DataType) -> Error {
    Error::schema(
        path,
        format!("column `{name}` should be {expected}, found {found}"),
    )
}

fn string_column(path: &Path, col: &dyn Array, name: &str) -> Result<Vec<Option<String>>> {
    let col = match col.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            arrow::compute::cast(col, &DataType::Utf8)?
        }
        other => return Err(type_error(path, name, "a string", other)),
    };
    let s = col.as_string::<i32>();
    Ok((0..s.len())
        .map(|i| s.is_valid(i).then(|| s.value(i).to_string()))
        .collect())
}

fn float_column(path: &Path, col: &dyn Array, name: &str) -> Result<Vec<Option<f64>>> {
    if !col.data_type().is_numeric() {
        return Err(type_error(path, name, "numeric", col.data_type()));
    }
    let col = arrow::compute::cast(col, &DataType::Float64)?;
    let f = col.as_primitive::<arrow::datatypes::Float64Type>();
    Ok((0..f.len())
        .map(|i| f.is_valid(i).then(|| f.value(i)))
        .collect())
}

/// list<struct<content: string, role: string>> → per row Some(messages) or None (null).
fn messages_column(path: &Path, col: &dyn Array, name: &str) -> Result<Vec<Option<Vec<Message>>>> {
    const EXPECTED: &str = "list<struct<content: string, role: string>>";
    let (offsets, values): (Vec<usize>, &StructArray) = match col.data_type() {
        DataType::List(_) => {
            let l = col.as_list::<i32>();
            let s = l.values().as_struct_opt();
            let s = s.ok_or_else(|| type_error(path, name, EXPECTED, col.data_type()))?;
            (l.value_offsets().iter().map(|&o| o as usize).collect(), s)
        }
        DataType::LargeList(_) => {
            let l = col.as_list::<i64>();
            let s = l.values().as_struct_opt();
            let s = s.ok_or_else(|| type_error(path, name, EXPECTED, col.data_type()))?;
            (l.value_offsets().iter().map(|&o| o as usize).collect(), s)
        }
        other => return Err(type_error(path, name, EXPECTED, other)),
    };
    let field = |f: &str| -> Result<Vec<Option<String>>> {
        let child = values
            .column_by_name(f)
            .ok_or_else(|| type_error(path, name, EXPECTED, col.data_type()))?;
        string_column(path, child.as_ref(), &format!("{name}.{f}"))
    };
    let (content, role) = (field("content")?, field("role")?);
    let mut out = Vec::with_capacity(col.len());
    for i in 0..col.len() {
        if col.is_null(i) {
            out.push(None);
            continue;
        }
        let mut msgs = Vec::new();
        let mut ok = true;
        for j in offsets[i]..offsets[i + 1] {
            match (&role[j], &content[j]) {
                (Some(r), Some(c)) => msgs.push(Message::new(r, c)),
                _ => ok = false,
            }
        }
        out.push(ok.then_some(msgs));
    }
    Ok(out)
}
