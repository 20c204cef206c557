//! `refdpo merge`: a LoRA adapter folded into its base (W + s·B·A) and written as a full HF
//! checkpoint (f32 `model.safetensors`, the base's `config.json` and tokenizer files).

use super::checkpoint;
use crate::config::Config;
use crate::error::{fs, Error, Result};
use crate::inputs::ModelSource;
use crate::model::lora;
use candle_core::Device;
use std::path::Path;

/// Where an adapter's base model is: `base` if given, else the model of the run holding the
/// adapter (`<run>/config.toml`, revision included), else the adapter's `base_model_name_or_path`.
fn resolve_base(adapter: &Path, base: Option<&str>) -> Result<ModelSource> {
    if let Some(id) = base {
        let named = lora::read_config_base(adapter);
        if let Some(named) = named.filter(|n| !same_model(n, id)) {
            // PEFT merges into whatever base it is given too; a model of the same shapes but
            // other weights gives a wrong merged model, so say which was asked for
            eprintln!(
                "note: the adapter names `{named}` as its base (`base_model_name_or_path`); \
                 merging it into `{id}` as --base asks"
            );
        }
        return ModelSource::resolve(id, "main");
    }
    let run_config = adapter
        .parent()
        .map(|run| crate::dirs::RunDir::new(run).config());
    if let Some(path) = run_config.filter(|p| p.exists()) {
        let cfg = Config::load(&path, &[])?;
        return ModelSource::resolve(&cfg.model.id, &cfg.model.revision);
    }
    match lora::read(adapter)?.base_model {
        Some(id) if !id.is_empty() => ModelSource::resolve(&id, "main"),
        _ => Err(Error::Model(format!(
            "`{}` names no base model (`base_model_name_or_path`): pass --base with the model's \
             id or directory",
            adapter.join(lora::CONFIG_FILE).display()
        ))),
    }
}

/// Whether two model ids or directories name the same model: the same last path component
/// (`HuggingFaceTB/SmolLM2-135M-Instruct` and `./models/SmolLM2-135M-Instruct/`), case aside.
fn same_model(a: &str, b: &str) -> bool {
    let last = |s: &str| {
        Path::new(s.trim_end_matches('/'))
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
    };
    last(a).is_some() && last(a) == last(b)
}

/// Merges the adapter in `adapter` into its base ([`resolve_base`] of `base`) and writes the
/// result into `out` (a new or empty directory; written under a temporary name and renamed).
/// Returns the base it used.
pub fn merge(adapter: &Path, base: Option<&str>, out: &Path) -> Result<ModelSource> {
    if !lora::is_adapter(adapter) {
        return Err(Error::Model(format!(
            "`{}` holds no LoRA adapter (no {}): pass a run's `final/` or `checkpoint-N/` trained \
             with train.lora.r > 0",
            adapter.display(),
            lora::CONFIG_FILE
        )));
    }
    let occupied = std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some());
    if occupied || out.is_file() {
        return Err(Error::Model(format!(
            "`{}` is not empty: choose a new --out directory",
            out.display()
        )));
    }
    // Inside the adapter's folder, a merged model would be taken for a checkpoint's weights.
    let inside = |dir: &Path| -> Option<bool> {
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty())?;
        Some(
            parent
                .canonicalize()
                .ok()?
                .starts_with(dir.canonicalize().ok()?),
        )
    };
    if inside(adapter) == Some(true) {
        return Err(Error::Model(format!(
            "--out `{}` is inside the adapter's folder `{}`: choose a directory outside it",
            out.display(),
            adapter.display()
        )));
    }
    let base = resolve_base(adapter, base)?;
    let (_, tensors) = checkpoint::load_model(adapter, &base, &Device::Cpu)?;
    let tmp = fs::tmp_path(out);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io("cannot remove", &tmp, e))?;
    }
    fs::create_dir_all(&tmp)?;
    checkpoint::write_model(&tmp, &tensors, &base.dir)?;
    if out.exists() {
        std::fs::remove_dir(out).map_err(|e| Error::io("cannot replace", out, e))?;
    }
    fs::rename(&tmp, out)?;
    Ok(base)
}
