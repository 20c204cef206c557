//! Source files → one JSON object per row, in file order: Parquet (through Arrow, a record batch
//! at a time), JSON Lines (a line at a time, with line numbers), JSON (an array of objects; a
//! `.json` file holding JSON Lines is read as such, as `datasets` does).

use super::SkipReason;
use crate::error::{contain_panic, Error, Result};
use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::de::{Deserializer as _, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// One row of a source file: its fields, or why it cannot be a row.
pub struct Record {
    /// 1-based line in a JSON Lines file.
    pub line: Option<u64>,
    pub fields: std::result::Result<Map<String, Value>, SkipReason>,
}

/// The file formats `dataset.id` / `dataset.data_files` may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Parquet,
    JsonLines,
    Json,
}

impl Format {
    /// By extension; anything else is an error naming the supported ones.
    pub fn of(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("parquet") => Ok(Format::Parquet),
            Some("jsonl" | "ndjson") => Ok(Format::JsonLines),
            Some("json") => Ok(Format::Json),
            _ => Err(Error::schema(
                path,
                "unsupported file type: use .parquet, .jsonl (or .ndjson) or .json",
            )),
        }
    }
}

/// Calls `each` with every record of `path` in order, until it returns false. A record larger
/// than `max_bytes` (a JSON Lines line, or the text values of a Parquet or JSON array row) is a
/// `row_too_large` skip; a JSON Lines line of it is never held in memory. A Parquet column of a
/// type refdpo does not convert is an error when `read` says a mapping reads it, else null.
pub fn for_each(
    path: &Path,
    max_bytes: usize,
    read: &dyn Fn(&str) -> bool,
    each: &mut dyn FnMut(Record) -> bool,
) -> Result<()> {
    let mut bounded = |mut r: Record| {
        if r.fields.as_ref().is_ok_and(|f| object_bytes(f) > max_bytes) {
            r.fields = Err(SkipReason::RowTooLarge);
        }
        each(r)
    };
    match Format::of(path)? {
        Format::Parquet => parquet_records(path, read, &mut bounded),
        Format::JsonLines => json_lines(path, open(path)?, max_bytes, each),
        Format::Json => {
            let mut reader = open(path)?;
            let first = first_non_space(&mut reader, path)?;
            if first == Some(b'[') {
                json_array(path, reader, &mut bounded)
            } else {
                json_lines(path, reader, max_bytes, each)
            }
        }
    }
}

/// About how many bytes a row's values hold: its strings' lengths, 8 bytes per other value.
fn object_bytes(fields: &Map<String, Value>) -> usize {
    fn bytes(v: &Value) -> usize {
        match v {
            Value::String(s) => s.len(),
            Value::Array(a) => a.iter().map(bytes).sum(),
            Value::Object(o) => o.iter().map(|(k, v)| k.len() + bytes(v)).sum(),
            _ => 8,
        }
    }
    fields.iter().map(|(k, v)| k.len() + bytes(v)).sum()
}

/// Reads one line (through its `\n`) into `line`, keeping at most `max` bytes of it; returns
/// `None` at the end of the input, else whether the line was longer than `max`.
fn read_line_bounded(
    reader: &mut impl BufRead,
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<bool>> {
    line.clear();
    let (mut read, mut over) = (0usize, false);
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok((read > 0).then_some(over));
        }
        let (part, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        let n = part.len();
        read += n;
        if !over && line.len() + n <= max.saturating_add(1) {
            line.extend_from_slice(part);
        } else if !over {
            over = true;
            line.clear();
            line.shrink_to(0);
        }
        reader.consume(n);
        if done {
            return Ok(Some(over));
        }
    }
}

fn open(path: &Path) -> Result<BufReader<std::fs::File>> {
    let f = super::stamp::open(path)?;
    Ok(BufReader::with_capacity(1 << 20, f))
}

/// The first byte that is not whitespace, left unread in the buffer.
fn first_non_space(reader: &mut BufReader<std::fs::File>, path: &Path) -> Result<Option<u8>> {
    loop {
        let buf = reader
            .fill_buf()
            .map_err(|e| Error::io("cannot read", path, e))?;
        if buf.is_empty() {
            return Ok(None);
        }
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => {
                let b = buf[i];
                reader.consume(i);
                return Ok(Some(b));
            }
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    }
}

fn json_lines(
    path: &Path,
    mut reader: impl BufRead,
    max_bytes: usize,
    each: &mut dyn FnMut(Record) -> bool,
) -> Result<()> {
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        let over = read_line_bounded(&mut reader, &mut line, max_bytes)
            .map_err(|e| Error::io("cannot read", path, e))?;
        let Some(over) = over else { break };
        number += 1;
        let fields = if over {
            Err(SkipReason::RowTooLarge)
        } else {
            // a byte-order mark opens some exported files
            let bytes = match number {
                1 => line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&line),
                _ => &line,
            };
            if bytes.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match std::str::from_utf8(bytes) {
                Err(_) => Err(SkipReason::BadUtf8),
                // serde_json refuses nesting past 128 levels, NUL and other raw control bytes
                Ok(text) => match serde_json::from_str::<Value>(text) {
                    Ok(Value::Object(m)) => Ok(m),
                    _ => Err(SkipReason::BadJson),
                },
            }
        };
        let record = Record {
            line: Some(number),
            fields,
        };
        if !each(record) {
            break;
        }
    }
    Ok(())
}

/// A JSON array of objects, parsed one element at a time: neither the whole text nor the whole
/// tree is ever in memory.
fn json_array(path: &Path, reader: impl Read, each: &mut dyn FnMut(Record) -> bool) -> Result<()> {
    struct Elements<'a>(&'a mut dyn FnMut(Record) -> bool);
    impl<'de> Visitor<'de> for Elements<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an array of objects")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
            while let Some(item) = seq.next_element::<Value>()? {
                let fields = match item {
                    Value::Object(m) => Ok(m),
                    _ => Err(SkipReason::WrongType),
                };
                if !(self.0)(Record { line: None, fields }) {
                    // Enough rows: the rest is neither parsed nor checked.
                    return Err(serde::de::Error::custom(STOPPED));
                }
            }
            Ok(())
        }
    }
    const STOPPED: &str = "refdpo: enough rows";
    let mut de = serde_json::Deserializer::from_reader(reader);
    // `de.end()`: nothing but whitespace after the array, as Python's json.load requires
    match de.deserialize_seq(Elements(each)).and_then(|()| de.end()) {
        Ok(()) => Ok(()),
        Err(e) if e.to_string().starts_with(STOPPED) => Ok(()),
        // one row too deep fails the whole array: in JSON Lines it is one `bad_json` skip
        Err(e) if e.to_string().starts_with("recursion limit exceeded") => Err(Error::schema(
            path,
            format!(
                "a row nests deeper than 128 levels ({e}); a .json array is read as one value, \
                 so one such row fails the file: write the rows as JSON Lines (one object a \
                 line, named .jsonl), where it is one `bad_json` skip"
            ),
        )),
        Err(e) => Err(Error::schema(
            path,
            format!("not valid JSON ({e}); for one object a line, name it .jsonl"),
        )),
    }
}

fn parquet_records(
    path: &Path,
    read: &dyn Fn(&str) -> bool,
    each: &mut dyn FnMut(Record) -> bool,
) -> Result<()> {
    let file = super::stamp::open(path)?;
    // parquet-rs panics on some damaged files: each call into it is contained
    let mut reader = contain_panic(path, "reading the parquet footer", || {
        Ok(ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| Error::parquet(path, e))?
            .build()?)
    })?;
    while let Some(batch) = contain_panic(path, "decoding a parquet row group", || {
        reader
            .next()
            .transpose()
            .map_err(|e| Error::parquet(path, e))
    })? {
        let schema = batch.schema();
        let columns = batch
            .columns()
            .iter()
            .zip(schema.fields())
            .map(|(c, f)| match values(c.as_ref()) {
                Ok(v) => Ok(v),
                // a column no mapping reads (embeddings, image bytes) is not converted
                Err(_) if !read(f.name()) => Ok(vec![Value::Null; c.len()]),
                Err(t) => Err(unsupported(path, f.name(), &t)),
            })
            .collect::<Result<Vec<_>>>()?;
        let mut columns: Vec<_> = columns.into_iter().map(Vec::into_iter).collect();
        for _ in 0..batch.num_rows() {
            let fields: Map<String, Value> = schema
                .fields()
                .iter()
                .zip(columns.iter_mut())
                .map(|(f, c)| (f.name().clone(), c.next().unwrap_or(Value::Null)))
                .collect();
            if !each(Record {
                line: None,
                fields: Ok(fields),
            }) {
                return Ok(());
            }
        }
    }
    Ok(())
}

fn unsupported(path: &Path, column: &str, t: &DataType) -> Error {
    Error::schema(
        path,
        format!("column `{column}` has a type refdpo cannot read ({t})"),
    )
}

/// An Arrow column as JSON values (null entries as `null`); the type it cannot convert otherwise.
fn values(col: &dyn Array) -> std::result::Result<Vec<Value>, DataType> {
    let valid = |i: usize| col.is_valid(i);
    let n = col.len();
    let out = match col.data_type() {
        DataType::Null => vec![Value::Null; n],
        DataType::Boolean => {
            let b = col.as_boolean();
            (0..n)
                .map(|i| {
                    if valid(i) {
                        Value::Bool(b.value(i))
                    } else {
                        Value::Null
                    }
                })
                .collect()
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let c =
                arrow::compute::cast(col, &DataType::Utf8).map_err(|_| col.data_type().clone())?;
            let s = c.as_string::<i32>();
            (0..n)
                .map(|i| {
                    if valid(i) {
                        Value::String(s.value(i).to_string())
                    } else {
                        Value::Null
                    }
                })
                .collect()
        }
        t if t.is_integer() => {
            let c = arrow::compute::cast(col, &DataType::Int64).map_err(|_| t.clone())?;
            let v = c.as_primitive::<Int64Type>();
            (0..n)
                .map(|i| {
                    if valid(i) {
                        Value::from(v.value(i))
                    } else {
                        Value::Null
                    }
                })
                .collect()
        }
        t if t.is_floating() => {
            let c = arrow::compute::cast(col, &DataType::Float64).map_err(|_| t.clone())?;
            let v = c.as_primitive::<Float64Type>();
            (0..n)
                .map(|i| {
                    valid(i)
                        .then(|| serde_json::Number::from_f64(v.value(i)).map(Value::Number))
                        .flatten()
                        .unwrap_or(Value::Null)
                })
                .collect()
        }
        DataType::List(_) => {
            let l = col.as_list::<i32>();
            let offsets = l.value_offsets().iter().map(|&o| o as usize);
            lists(offsets, values(l.values().as_ref())?, &valid)
        }
        DataType::LargeList(_) => {
            let l = col.as_list::<i64>();
            let offsets = l.value_offsets().iter().map(|&o| o as usize);
            lists(offsets, values(l.values().as_ref())?, &valid)
        }
        DataType::Struct(fields) => {
            let s = col.as_struct();
            // each child's values are moved into the rows, not copied
            let mut children = s
                .columns()
                .iter()
                .map(|c| values(c.as_ref()).map(Vec::into_iter))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            (0..n)
                .map(|i| {
                    let row: Map<String, Value> = fields
                        .iter()
                        .zip(children.iter_mut())
                        .map(|(f, c)| (f.name().clone(), c.next().unwrap_or(Value::Null)))
                        .collect();
                    if valid(i) {
                        Value::Object(row)
                    } else {
                        Value::Null
                    }
                })
                .collect()
        }
        // a pandas category column: its values
        DataType::Dictionary(_, value) => {
            let c = arrow::compute::cast(col, value).map_err(|_| col.data_type().clone())?;
            return values(c.as_ref());
        }
        // timestamps, dates, decimals: as text, as `datasets` prints them
        other => match arrow::compute::cast(col, &DataType::Utf8) {
            Ok(c) => return values(c.as_ref()),
            Err(_) => return Err(other.clone()),
        },
    };
    Ok(out)
}

/// Rows of a list column from its `offsets` (n + 1 of them) and its flattened `items`, which
/// are moved into the rows in order.
fn lists(
    mut offsets: impl Iterator<Item = usize>,
    items: Vec<Value>,
    valid: &dyn Fn(usize) -> bool,
) -> Vec<Value> {
    let mut items = items.into_iter();
    let mut start = offsets.next().unwrap_or(0);
    // a sliced column's rows start past its first items
    items.by_ref().take(start).for_each(drop);
    let mut out = Vec::new();
    for (i, end) in offsets.enumerate() {
        let row: Vec<Value> = items.by_ref().take(end - start).collect();
        out.push(if valid(i) {
            Value::Array(row)
        } else {
            Value::Null
        });
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(path: &Path) -> Vec<Record> {
        let mut out = Vec::new();
        for_each(path, 1 << 20, &|_| true, &mut |r| {
            out.push(r);
            true
        })
        .unwrap();
        out
    }

    #[test]
    fn json_lines_keep_line_numbers_and_mark_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        std::fs::write(&p, "{\"a\":1}\n\nnot json\n[1]\n{\"a\":2}\n").unwrap();
        let r = collect(&p);
        let lines: Vec<_> = r.iter().map(|r| r.line.unwrap()).collect();
        assert_eq!(lines, [1, 3, 4, 5]);
        assert!(r[0].fields.is_ok() && r[3].fields.is_ok());
        assert_eq!(r[1].fields.as_ref().unwrap_err(), &SkipReason::BadJson);
        assert_eq!(r[2].fields.as_ref().unwrap_err(), &SkipReason::BadJson);
        // The same lines in a .json file are read as JSON Lines; an array as an array.
        let j = dir.path().join("b.json");
        std::fs::write(&j, "{\"a\":1}\n{\"a\":2}\n").unwrap();
        assert_eq!(collect(&j).len(), 2);
        std::fs::write(&j, " [{\"a\":1}, 3, {\"a\":2}]").unwrap();
        let r = collect(&j);
        assert_eq!(r.len(), 3);
        assert_eq!(r[1].fields.as_ref().unwrap_err(), &SkipReason::WrongType);
        assert!(Format::of(&dir.path().join("c.csv")).is_err());
        // one row nested past serde's 128 levels fails an array whole: the error says so, and
        // that JSON Lines would skip it (not "name it .jsonl" for a file that is an array)
        std::fs::write(
            &j,
            format!(
                "[{{\"a\":1}}, {{\"a\":{}1{}}}]",
                "[".repeat(200),
                "]".repeat(200)
            ),
        )
        .unwrap();
        let err = for_each(&j, 1 << 20, &|_| true, &mut |_| true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nests deeper than 128 levels") && err.contains("JSON Lines"),
            "{err}"
        );
    }

    #[test]
    fn any_bytes_on_a_line_are_one_counted_skip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        let mut text =
            b"\xEF\xBB\xBF{\"a\":1}\n{\"a\":\"\xff\xfe\"}\n{\"a\":\"x\x00y\"}\n".to_vec();
        text.extend(format!("{{\"a\":{}1{}}}\n", "[".repeat(500), "]".repeat(500)).bytes());
        text.extend(format!("{{\"a\":\"{}\"}}\n", "x".repeat(3 << 20)).bytes());
        text.extend(b"{\"a\":2}");
        std::fs::write(&p, text).unwrap();
        let r = collect(&p);
        let got: Vec<_> = r
            .iter()
            .map(|r| (r.line.unwrap(), r.fields.as_ref().err().copied()))
            .collect();
        assert_eq!(
            got,
            [
                (1, None),
                (2, Some(SkipReason::BadUtf8)),
                (3, Some(SkipReason::BadJson)),
                (4, Some(SkipReason::BadJson)),
                (5, Some(SkipReason::RowTooLarge)),
                (6, None),
            ]
        );
        // the last line has no newline and is still read; a short limit skips by size alone
        let j = dir.path().join("b.json");
        std::fs::write(
            &j,
            format!("[{{\"a\":\"{}\"}}, {{\"a\":1}}]", "y".repeat(2000)),
        )
        .unwrap();
        let mut sizes = Vec::new();
        for_each(&j, 1000, &|_| true, &mut |r| {
            sizes.push(r.fields.err());
            true
        })
        .unwrap();
        assert_eq!(sizes, [Some(SkipReason::RowTooLarge), None]);
        // whitespace may follow the array; anything else is refused, as Python's json.load does
        std::fs::write(&j, "[{\"a\": 1}]\n \n").unwrap();
        assert!(for_each(&j, 1000, &|_| true, &mut |_| true).is_ok());
        std::fs::write(&j, "[{\"a\": 1}] garbage").unwrap();
        let e = for_each(&j, 1000, &|_| true, &mut |_| true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("b.json") && e.contains("trailing characters"),
            "{e}"
        );
    }

    /// Columns of types refdpo does not convert as such: a category column is its values, a
    /// timestamp or decimal its text; one no mapping reads (embeddings, image bytes) is null,
    /// not an unreadable file. `datasets` reads them all.
    #[test]
    fn odd_parquet_column_types_are_read_or_left_out() {
        use arrow::array::{
            ArrayRef, BinaryArray, DictionaryArray, FixedSizeListArray, Int8Array, StringArray,
            TimestampMicrosecondArray,
        };
        use arrow::datatypes::Int8Type;
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("odd.parquet");
        let keys = Int8Array::from(vec![0, 1]);
        let category = DictionaryArray::<Int8Type>::try_new(
            keys,
            Arc::new(StringArray::from(vec!["web", "book"])),
        )
        .unwrap();
        let embedding = FixedSizeListArray::from_iter_primitive::<
            arrow::datatypes::Float32Type,
            _,
            _,
        >(vec![Some(vec![Some(1.0f32), Some(2.0)]), None], 2);
        let columns: Vec<(&str, ArrayRef)> = vec![
            ("prompt", Arc::new(category)),
            (
                "when",
                Arc::new(TimestampMicrosecondArray::from(vec![0, 1_000_000])),
            ),
            (
                "image",
                Arc::new(BinaryArray::from(vec![&b"\xff"[..], b"x"])),
            ),
            ("embedding", Arc::new(embedding)),
        ];
        let batch = arrow::record_batch::RecordBatch::try_from_iter(columns).unwrap();
        let file = std::fs::File::create(&p).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let read = |used: &dyn Fn(&str) -> bool| {
            let mut rows = Vec::new();
            for_each(&p, 1 << 20, used, &mut |r| {
                rows.push(r.fields.unwrap());
                true
            })
            .map(|_| rows)
        };
        let rows = read(&|c| c == "prompt" || c == "when").unwrap();
        assert_eq!(rows[1]["prompt"], "book");
        assert_eq!(rows[1]["when"], "1970-01-01T00:00:01");
        assert!(rows[0]["embedding"].is_null() && rows[0]["image"].is_null());
        // a column a mapping reads that cannot be converted still names itself
        let e = read(&|c| c == "embedding").unwrap_err().to_string();
        assert!(e.contains("column `embedding`"), "{e}");
    }
}
