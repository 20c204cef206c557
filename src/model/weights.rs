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
        let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&index)?)?;
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
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    Err(Error::Model(format!(
        "no weights in `{}`: expected model.safetensors or model.safetensors.index.json",
        dir.display()
    )))
}

/// Loads every tensor of `files`, cast to `dtype`, onto `device`.
pub fn load(files: &[PathBuf], dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for file in files {
        let bytes = fs::read(file)?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| Error::Model(format!("cannot read `{}`: {e}", file.display())))?;
        for (name, t) in tensors {
            out.insert(name, t.to_dtype(dtype)?.to_device(device)?);
        }
    }
    Ok(out)
}

/// SHA-256 over the weight files' bytes (in name order): the model part of a cache fingerprint.
pub fn hash_files(files: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    for file in files {
        let mut f = std::fs::File::open(file).map_err(|e| Error::io("cannot open", file, e))?;
        std::io::copy(&mut f, &mut h).map_err(|e| Error::io("cannot read", file, e))?;
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Writes named tensors as one safetensors file (temporary name, fsync, rename).
pub fn save(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let cpu: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    fs::write_path_atomic(path, |tmp| Ok(candle_core::safetensors::save(&cpu, tmp)?))
}
