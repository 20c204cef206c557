//! `refdpo merge`: a LoRA adapter folded into its base (W + s·B·A) and written as a full HF
//! checkpoint (f32 `model.safetensors`, the base's `config.json` and tokenizer files).

use super::checkpoint;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::inputs::ModelSource;
use crate::model::lora;
use crate::outputs::Building;
use candle_core::Device;
use std::path::Path;

/// Where an adapter's base model is: `base` if given, else the model of the run holding the
/// adapter (`<run>/config.toml`, revision included), else the adapter's `base_model_name_or_path`
/// at its `revision`, as PEFT's `AutoPeftModelForCausalLM` loads it. `revision` overrides the
/// revision; without it, `base` is read at the adapter's revision when it is the adapter's own
/// base, else at `main`.
fn resolve_base(adapter: &Path, base: Option<&str>, revision: Option<&str>) -> Result<ModelSource> {
    let named = lora::named_base(adapter)?;
    let config = adapter.join(lora::CONFIG_FILE);
    if let Some(id) = base {
        let own = named.as_ref().filter(|n| same_model(&n.id, id));
        if let (Some(n), None) = (&named, own) {
            // PEFT merges into whatever base it is given too; a model of the same shapes but
            // other weights gives a wrong merged model, so say which was asked for
            crate::error::note!(
                "note: the adapter names `{}` as its base (`base_model_name_or_path`); merging \
                 it into `{id}` as --base asks",
                n.id
            );
        }
        let rev = revision
            .or(own.and_then(|n| n.revision.as_deref()))
            .unwrap_or("main");
        return ModelSource::resolve(id, rev);
    }
    let run_config = adapter
        .parent()
        .map(|run| crate::dirs::RunDir::new(run).config());
    if let Some(path) = run_config.filter(|p| p.exists()) {
        let cfg = Config::load(&path, &[])?;
        let rev = revision.unwrap_or(&cfg.model.revision);
        let from = format!("`model.id` of the run's `{}`", path.display());
        return ModelSource::resolve(&cfg.model.id, rev).map_err(not_found(&cfg.model.id, from));
    }
    match named {
        Some(n) => {
            let rev = revision.or(n.revision.as_deref()).unwrap_or("main");
            let from = format!("`base_model_name_or_path` of `{}`", config.display());
            ModelSource::resolve(&n.id, rev).map_err(not_found(&n.id, from))
        }
        None => Err(Error::Model(format!(
            "`{}` names no base model (`base_model_name_or_path`): pass --base with the model's \
             id or directory",
            config.display()
        ))),
    }
}

/// An error opening the base model `id`, which `from` named, with the way out.
fn not_found(id: &str, from: String) -> impl FnOnce(Error) -> Error + '_ {
    move |e| {
        Error::Model(format!(
            "the base model `{id}` ({from}) cannot be opened: {e}; pass --base with the base \
             model's id or directory"
        ))
    }
}

/// Whether the adapter's base `named` and `--base` name the same model: the same directory when
/// both are directories here, the same id when neither is, else (a local copy of a hub model)
/// the same last path component (`HuggingFaceTB/SmolLM2-135M-Instruct` and
/// `./models/SmolLM2-135M-Instruct/`), case aside.
fn same_model(named: &str, base: &str) -> bool {
    let dir = |s: &str| {
        Path::new(s)
            .is_dir()
            .then(|| Path::new(s).canonicalize().ok())
    };
    let last = |s: &str| {
        Path::new(s.trim_end_matches('/'))
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
    };
    match (dir(named), dir(base)) {
        (Some(a), Some(b)) => a.is_some() && a == b,
        (None, None) => named.trim_end_matches('/') == base.trim_end_matches('/'),
        _ => last(named).is_some() && last(named) == last(base),
    }
}

/// Merges the adapter in `adapter` into its base ([`resolve_base`] of `base`) and writes the
/// result into `out` (a new or empty directory; written under a temporary name and renamed).
/// Returns the base it used.
pub fn merge(
    adapter: &Path,
    base: Option<&str>,
    revision: Option<&str>,
    out: &Path,
) -> Result<ModelSource> {
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
        let what = if occupied {
            "is not empty"
        } else {
            "is a file"
        };
        return Err(Error::Model(format!(
            "`{}` {what}: choose a new --out directory",
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
    let base = resolve_base(adapter, base, revision)?;
    let (_, tensors) =
        checkpoint::load_model(adapter, &base, candle_core::DType::F32, &Device::Cpu)?;
    // One merge into `out` at a time: its temporary folder holds a lock, so a second merge is
    // refused instead of writing into the same folder (whichever renamed it could publish the
    // other's weights). The lock moves with the folder and is removed once it is in place.
    let building = Building::start(out, "merge")?;
    if let Err(e) = checkpoint::write_model(building.path(), &tensors, &base.dir) {
        building.abandon(); // a full disk leaves nothing behind
        return Err(e);
    }
    building.publish(out)?;
    Ok(base)
}
