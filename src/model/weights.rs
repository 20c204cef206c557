//! Safetensors in and out: a model directory (single file or sharded with an index) → named tensors,
//! and named tensors → an HF-layout `model.safetensors` plus a hash of the weights for fingerprints.

use crate::error::{fs, Error, Result};
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The safetensors files of a model directory: `model.safetensors`, or the shards its index names.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v: serde_json::Value = fs::read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                Error::Model(format!("`{}` has no `weight_map` object", index.display()))
            })?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        // A shard is a file beside the index: never a path out of the model folder.
        if let Some(bad) = files.iter().find(|f| !is_plain_name(f)) {
            return Err(Error::Model(format!(
                "`{}` names the shard {bad:?}, which is not a file name in the model folder: \
                 the index is damaged",
                index.display()
            )));
        }
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    Err(Error::Model(format!(
        "no weights in `{}`: expected model.safetensors or model.safetensors.index.json",
        dir.display()
    )))
}

/// Whether `name` is one plain file name: no separator, not `.` or `..`, not empty.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
}

/// One tensor of a safetensors header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// The safetensors dtype name (`F32`, `BF16`, …).
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Where its bytes are in the file (from its start).
    pub bytes: std::ops::Range<u64>,
}

/// A safetensors file's header: its tensors, read without the data.
#[derive(Debug, Clone)]
pub struct Header {
    pub path: PathBuf,
    pub tensors: Vec<TensorInfo>,
}

/// Headers larger than this are refused rather than read (safetensors' own limit).
const MAX_HEADER: u64 = 100_000_000;

/// Reads and checks `path`'s header: its size within the file, valid JSON, and every tensor's
/// byte range inside the data and as long as its dtype and shape say.
pub fn read_header(path: &Path) -> Result<Header> {
    use std::io::Read;
    let bad = |msg: String| {
        Error::Model(format!(
            "`{}` is not a valid safetensors file: {msg}",
            path.display()
        ))
    };
    let mut f = crate::error::fs::open(path)?;
    let len = f
        .metadata()
        .map_err(|e| Error::io("cannot read", path, e))?
        .len();
    let mut size = [0u8; 8];
    f.read_exact(&mut size)
        .map_err(|_| bad(format!("{len} bytes, shorter than the 8-byte header size")))?;
    let n = u64::from_le_bytes(size);
    if n > MAX_HEADER || n > len.saturating_sub(8) {
        return Err(bad(format!(
            "its header claims {n} bytes of a {len}-byte file (the file is truncated or damaged)"
        )));
    }
    let mut text = vec![0u8; n as usize];
    f.read_exact(&mut text)
        .map_err(|e| Error::io("cannot read", path, e))?;
    let json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&text)
        .map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
    let data_len = len - 8 - n;
    let mut tensors = Vec::with_capacity(json.len());
    for (name, v) in json {
        if name == "__metadata__" {
            continue;
        }
        let dtype = v.get("dtype").and_then(|d| d.as_str());
        let shape: Option<Vec<usize>> = v.get("shape").and_then(|s| {
            s.as_array()?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect()
        });
        let offsets = v
            .get("data_offsets")
            .and_then(|o| match o.as_array()?.as_slice() {
                [s, e] => Some((s.as_u64()?, e.as_u64()?)),
                _ => None,
            });
        let (Some(dtype), Some(shape), Some((start, end))) = (dtype, shape, offsets) else {
            return Err(bad(format!(
                "tensor `{name}` lacks a dtype, a shape or two data offsets"
            )));
        };
        let width = match dtype {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "BF16" | "F16" | "I16" | "U16" => 2,
            "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
            other => return Err(bad(format!("tensor `{name}` has unknown dtype {other:?}"))),
        };
        let bytes = shape
            .iter()
            .try_fold(width as u64, |acc, &d| acc.checked_mul(d as u64));
        if start > end || end > data_len || bytes != Some(end - start) {
            return Err(bad(format!(
                "tensor `{name}` ({dtype} {shape:?}) claims bytes {start}..{end} of {data_len} \
                 (the file is truncated or damaged)"
            )));
        }
        tensors.push(TensorInfo {
            name,
            dtype: dtype.to_string(),
            shape,
            bytes: 8 + n + start..8 + n + end,
        });
    }
    // the tensors tile the data end to end, as the safetensors crate requires (its error names
    // whichever tensor it reached, not the damaged one)
    let mut order: Vec<&TensorInfo> = tensors.iter().collect();
    order.sort_by_key(|t| (t.bytes.start, t.bytes.end));
    let mut at = 8 + n;
    let mut last: Option<&str> = None;
    for t in order {
        let after = last.map_or_else(String::new, |l| format!(" (after tensor `{l}`)"));
        if t.bytes.start < at {
            return Err(bad(format!(
                "tensor `{}` claims bytes {}..{}, which overlap the tensor before it{after}: the \
                 file is damaged",
                t.name,
                t.bytes.start - 8 - n,
                t.bytes.end - 8 - n
            )));
        }
        if t.bytes.start > at {
            return Err(bad(format!(
                "data bytes {}..{} belong to no tensor{after}, before tensor `{}`: the file is \
                 damaged",
                at - 8 - n,
                t.bytes.start - 8 - n,
                t.name
            )));
        }
        at = t.bytes.end;
        last = Some(&t.name);
    }
    if at != len {
        return Err(bad(format!(
            "data bytes {}..{data_len} belong to no tensor (after the last one): the file is \
             damaged",
            at - 8 - n
        )));
    }
    Ok(Header {
        path: path.to_path_buf(),
        tensors,
    })
}

/// The one F64 value of tensor `name` in `path`, read alone (an optimizer's step count, without
/// its moments); None where the file has no such scalar.
pub fn read_f64_scalar(path: &Path, name: &str) -> Result<Option<f64>> {
    use std::io::{Read, Seek, SeekFrom};
    let header = read_header(path)?;
    let Some(t) = header
        .tensors
        .iter()
        .find(|t| t.name == name && t.dtype == "F64" && t.shape.iter().product::<usize>() == 1)
    else {
        return Ok(None);
    };
    let mut f = crate::error::fs::open(path)?;
    let mut b = [0u8; 8];
    f.seek(SeekFrom::Start(t.bytes.start))
        .and_then(|_| f.read_exact(&mut b))
        .map_err(|e| Error::io("cannot read", path, e))?;
    Ok(Some(f64::from_le_bytes(b)))
}

/// The first element of `t` (on the CPU) that is NaN or ±Inf, if any: one f32 sum in candle's
/// optimized kernels (a NaN or an Inf makes it non-finite), and only when it is, the element
/// itself (a finite tensor whose sum overflows then comes out clean).
pub fn non_finite_at(t: &Tensor) -> Result<Option<usize>> {
    if t.dtype() == DType::F64 {
        // in f64: a finite value past f32's range is not a NaN or an Inf (the cast says so)
        let t = t.flatten_all()?;
        if t.sum_all()?.to_scalar::<f64>()?.is_finite() {
            return Ok(None);
        }
        return Ok(t.to_vec1::<f64>()?.iter().position(|x| !x.is_finite()));
    }
    let t = t.flatten_all()?.to_dtype(DType::F32)?;
    if t.sum_all()?.to_scalar::<f32>()?.is_finite() {
        return Ok(None);
    }
    Ok(t.to_vec1::<f32>()?.iter().position(|x| !x.is_finite()))
}

/// Loads every tensor of `files`, cast to `dtype`, onto `device`. A tensor holding a NaN or an
/// Inf is refused, naming the file, the tensor and the element: such weights would fill a cache
/// with NaN log-probs.
pub fn load(files: &[PathBuf], dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for file in files {
        read_header(file)?;
        let bytes = fs::read(file)?;
        let bad = |e: &dyn std::fmt::Display| {
            Error::Model(format!("cannot read `{}`: {e}", file.display()))
        };
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(&e))?;
        for (name, view) in st.tensors() {
            let t =
                candle_core::safetensors::Load::load(&view, &Device::Cpu).map_err(|e| bad(&e))?;
            if let Some(at) = non_finite_at(&t)? {
                return Err(Error::Model(format!(
                    "`{}`: tensor `{name}` ({:?}) holds a NaN or Inf at element {at}: the \
                     checkpoint is damaged{REFETCH}",
                    file.display(),
                    view.shape()
                )));
            }
            let cast = t.to_dtype(dtype)?;
            if cast.dtype() != t.dtype() {
                if let Some(at) = non_finite_at(&cast)? {
                    let why = match dtype {
                        DType::F16 => "beyond f16's range (65504): set `model.dtype = \"bf16\"` \
                                       (or \"f32\")"
                            .to_string(),
                        other => format!(
                            "finite in the file's {:?} and beyond {other:?}'s range (3.4e38): no \
                             model's weight is that large, the checkpoint is damaged{REFETCH}",
                            t.dtype()
                        ),
                    };
                    return Err(Error::Model(format!(
                        "`{}`: tensor `{name}` element {at} is {why}",
                        file.display()
                    )));
                }
            }
            out.insert(name, cast.to_device(device)?);
        }
    }
    Ok(out)
}

/// SHA-256 over the weight files' bytes (in name order): the model part of a cache fingerprint.
pub fn hash_files(files: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    for file in files {
        let mut f = crate::error::fs::open(file)?;
        std::io::copy(&mut f, &mut h).map_err(|e| Error::io("cannot read", file, e))?;
    }
    Ok(format!("{:x}", h.finalize()))
}

/// The way on from a damaged weights file of a model as downloaded or converted (a run's own
/// checkpoint has another: `--resume` says it instead).
pub const REFETCH: &str = " (re-download or re-convert it)";

/// Writes named tensors as one safetensors file (temporary name, fsync, rename).
pub fn save(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let cpu: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    fs::write_path_atomic(path, |tmp| {
        candle_core::safetensors::save(&cpu, tmp)?;
        fs::as_created(tmp)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Saved weights get the mode any file created here gets (0666 less the umask), not
    /// safetensors' 0600: a teammate or a serving job under another user reads the policy.
    #[cfg(target_os = "linux")]
    #[test]
    fn saved_weights_are_as_readable_as_other_outputs() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let other = tmp.path().join("config.json");
        std::fs::write(&other, "{}").unwrap();
        let path = tmp.path().join("model.safetensors");
        let t = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        save(&HashMap::from([("w".to_string(), t)]), &path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), mode(&other));
    }

    #[test]
    fn an_index_naming_a_path_out_of_the_folder_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let index = tmp.path().join("model.safetensors.index.json");
        for shard in [
            "../secret.safetensors",
            "/etc/passwd",
            "sub/x.safetensors",
            "..",
        ] {
            let map = serde_json::json!({ "weight_map": { "w": shard } });
            std::fs::write(&index, map.to_string()).unwrap();
            let e = weight_files(tmp.path()).unwrap_err().to_string();
            assert!(e.contains("is not a file name in the model folder"), "{e}");
        }
        let map = serde_json::json!({ "weight_map": { "w": "model-00001-of-00001.safetensors" } });
        std::fs::write(&index, map.to_string()).unwrap();
        assert_eq!(weight_files(tmp.path()).unwrap().len(), 1);
    }

    #[test]
    fn nan_and_inf_are_found_in_every_float_dtype_and_an_overflowing_sum_is_not_one() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for (bad, at) in [(f32::NAN, 3), (f32::INFINITY, 0), (f32::NEG_INFINITY, 6)] {
                let mut v = vec![0.5f32; 7];
                v[at] = bad;
                let t = Tensor::new(v, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                assert_eq!(non_finite_at(&t).unwrap(), Some(at), "{dtype:?} {bad}");
            }
        }
        // finite values whose sum overflows f32 are fine
        let t = Tensor::new(vec![3e38f32, 3e38, -1.0], &Device::Cpu).unwrap();
        assert_eq!(non_finite_at(&t).unwrap(), None);
        let t = Tensor::new(vec![6e4f32; 4], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        assert_eq!(non_finite_at(&t).unwrap(), None);
    }

    /// A finite f64 weight past f32's range is not called a NaN or an Inf: the cast to the compute
    /// dtype names its range (fuzzer: "holds a NaN or Inf" for 1e300).
    #[test]
    fn a_finite_f64_weight_past_f32s_range_is_named_as_such() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("model.safetensors");
        let t = Tensor::new(vec![1.0f64, 1e300, 2.0], &Device::Cpu).unwrap();
        assert_eq!(non_finite_at(&t).unwrap(), None);
        save(&HashMap::from([("w".to_string(), t)]), &path).unwrap();
        let e = load(std::slice::from_ref(&path), DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tensor `w` element 1 is finite in the file's F64 and beyond F32's range"),
            "{e}"
        );
        let nan = Tensor::new(vec![1.0f64, f64::NAN], &Device::Cpu).unwrap();
        assert_eq!(non_finite_at(&nan).unwrap(), Some(1));
    }

    /// Tensors whose bytes overlap, leave a gap, or stop short of the file's end are refused by
    /// name (the safetensors crate named whichever tensor it reached).
    #[test]
    fn tensors_that_do_not_tile_the_data_are_refused_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("model.safetensors");
        let write = |header: serde_json::Value, data: usize| {
            let h = header.to_string().into_bytes();
            let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
            bytes.extend(h);
            bytes.extend(vec![0u8; data]);
            std::fs::write(&path, bytes).unwrap();
            read_header(&path).map(|_| ()).map_err(|e| e.to_string())
        };
        let t = |s: u64, e: u64| serde_json::json!({"dtype": "F32", "shape": [(e - s) / 4], "data_offsets": [s, e]});
        let ok = write(serde_json::json!({"a": t(0, 8), "b": t(8, 16)}), 16);
        assert!(ok.is_ok(), "{ok:?}");
        let e = write(
            serde_json::json!({"a": t(0, 8), "b": t(4, 12), "c": t(12, 16)}),
            16,
        )
        .unwrap_err();
        assert!(
            e.contains("tensor `b` claims bytes 4..12, which overlap")
                && e.contains("after tensor `a`"),
            "{e}"
        );
        let e = write(serde_json::json!({"a": t(0, 8), "b": t(12, 16)}), 16).unwrap_err();
        assert!(
            e.contains("data bytes 8..12 belong to no tensor") && e.contains("before tensor `b`"),
            "{e}"
        );
        let e = write(serde_json::json!({"a": t(0, 8)}), 16).unwrap_err();
        assert!(e.contains("data bytes 8..16 belong to no tensor"), "{e}");
    }
}
