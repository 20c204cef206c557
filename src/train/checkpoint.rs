//! Checkpoints in HF layout (`model.safetensors` with HF tensor names, `config.json`, tokenizer
//! files), or with LoRA a PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`), plus
//! `trainer_state.json`, `optimizer.safetensors` and `training_config.toml` for `--resume`. A checkpoint is written into
//! `<name>.tmp/` and renamed when complete, so a kill mid-save leaves the previous one.

use super::optim::AdamW;
use super::policy::Policy;
use crate::dirs::RunDir;
use crate::error::{fs, Error, Result};
use crate::inputs::ModelSource;
use crate::model::{lora, weights, TransformerConfig};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The base model a checkpoint belongs to: its files (tokenizer, config) and its `model.id`.
pub struct Base<'a> {
    pub dir: &'a Path,
    pub id: &'a str,
    /// `model.revision` (an adapter records it for PEFT).
    pub revision: &'a str,
}

/// Where training stands: enough to continue with the same data order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub global_step: usize,
    pub max_steps: usize,
    /// Epoch and next micro-batch within it.
    pub epoch: usize,
    pub batch_in_epoch: usize,
}

/// The base's files every saved model carries beside its weights and config: the tokenizer's,
/// and `generation_config.json` (the stop ids and sampling settings transformers' `generate`
/// reads; without it they fall back to config.json's).
const MODEL_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
];

/// transformers' folder of named chat templates (`<name>.jinja`), copied whole where the base has it.
const TEMPLATES_DIR: &str = "additional_chat_templates";

/// Writes `dir` (atomically) from the policy, the optimizer and the model's own files. On an error
/// (a full disk…) the partial `<dir>.tmp` is removed and an existing `dir` is left as it was.
/// `settings`: the resolved configuration (TOML) the run trains under.
pub fn save(
    dir: &Path,
    policy: &Policy,
    optim: &AdamW,
    state: &TrainerState,
    base: &Base,
    settings: &str,
) -> Result<()> {
    let tmp = fs::tmp_path(dir);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io("cannot remove", &tmp, e))?;
    }
    let written = write_into(&tmp, policy, optim, state, base)
        .and_then(|()| fs::write_atomic(&RunDir::training_config(&tmp), settings.as_bytes()));
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written?;
    // Replace an existing checkpoint without a moment where neither is complete: the old one
    // steps aside (`<name>.old`, which `latest` still finds) until the new one is in place.
    let old = old_path(dir);
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io("cannot remove", &old, e))?;
        }
        fs::rename(dir, &old)?;
    }
    fs::rename(&tmp, dir)?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io("cannot remove", &old, e))?;
    }
    Ok(())
}

fn write_into(
    tmp: &Path,
    policy: &Policy,
    optim: &AdamW,
    state: &TrainerState,
    base: &Base,
) -> Result<()> {
    fs::create_dir_all(tmp)?;
    match &policy.lora {
        Some(l) => {
            lora::write(
                tmp,
                l,
                &policy.cfg,
                base.id,
                base.revision,
                &policy.tensors(),
            )?;
            copy_model_files(tmp, base.dir)?;
        }
        None => write_model(tmp, &policy.tensors(), base.dir)?,
    }
    optim.save(policy, &RunDir::optimizer(tmp))?;
    fs::write_atomic(
        &RunDir::trainer_state(tmp),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )
}

/// A full HF model in `dir`: the weights as `model.safetensors` (f32, or bf16 from bf16
/// masters), the base's `config.json` (with the saved dtype) and its tokenizer files.
pub fn write_model(dir: &Path, tensors: &HashMap<String, Tensor>, model_dir: &Path) -> Result<()> {
    weights::save(tensors, &dir.join("model.safetensors"))?;
    let mut config: serde_json::Value = fs::read_json(&model_dir.join("config.json"))?;
    let saved = if tensors.values().all(|t| t.dtype() == DType::BF16) {
        "bfloat16"
    } else {
        "float32"
    };
    if let Some(obj) = config.as_object_mut() {
        obj.insert("torch_dtype".into(), saved.into());
        if obj.contains_key("dtype") {
            obj.insert("dtype".into(), saved.into());
        }
    }
    fs::write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    copy_model_files(dir, model_dir)
}

fn copy_model_files(dir: &Path, model_dir: &Path) -> Result<()> {
    let copy = |src: &Path, dst: &Path| {
        std::fs::copy(src, dst).map_err(|e| Error::io("cannot copy into", dst, e))
    };
    for f in MODEL_FILES {
        let src = model_dir.join(f);
        if src.is_file() {
            copy(&src, &dir.join(f))?;
        }
    }
    let templates = model_dir.join(TEMPLATES_DIR);
    if templates.is_dir() {
        let into = dir.join(TEMPLATES_DIR);
        fs::create_dir_all(&into)?;
        let entries =
            std::fs::read_dir(&templates).map_err(|e| Error::io("cannot read", &templates, e))?;
        for entry in entries {
            let src = entry
                .map_err(|e| Error::io("cannot read", &templates, e))?
                .path();
            if src.is_file() && src.extension().is_some_and(|x| x == "jinja") {
                copy(&src, &into.join(src.file_name().unwrap_or_default()))?;
            }
        }
    }
    Ok(())
}

/// The trained tensors of a checkpoint (HF names, or PEFT's for an adapter), f32 on `device`.
pub fn load_trained(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let file = if lora::is_adapter(dir) {
        dir.join(lora::WEIGHTS_FILE)
    } else {
        dir.join("model.safetensors")
    };
    weights::load(&[file], DType::F32, device)
}

/// The whole model a checkpoint stands for, f32 on `device`: its own weights, or the adapter
/// merged into `base` (the run's model) with the base's weights first rounded to `base_dtype`
/// (`model.dtype`), as PEFT adds an f32 adapter to a base loaded in that dtype.
pub fn load_model(
    dir: &Path,
    base: &ModelSource,
    base_dtype: DType,
    device: &Device,
) -> Result<(TransformerConfig, HashMap<String, Tensor>)> {
    if !lora::is_adapter(dir) {
        let mut cfg = TransformerConfig::from_file(&dir.join("config.json"))?;
        let files = weights::weight_files(dir)?;
        crate::model::shapes::check_files(&mut cfg, &files, dir)?;
        return Ok((cfg, weights::load(&files, DType::F32, device)?));
    }
    let adapter = lora::read(dir)?;
    let mut tensors = weights::load(&base.weight_files, base_dtype, device)?
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    lora::merge(&mut tensors, &base.cfg, &adapter)?;
    Ok((base.cfg.clone(), tensors))
}

fn old_path(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".old");
    dir.with_file_name(name)
}

/// The state `final/` under `out` was saved at, when it holds at least `total` steps: a run with
/// nothing left to train (`final/` is written after the final evaluation, so that is logged too).
pub fn finished(out: &Path, total: usize) -> Option<TrainerState> {
    let state = read_state(&RunDir::new(out).final_dir()).ok()?;
    (state.global_step >= total).then_some(state)
}

/// Where `--resume` continues from: the newest complete checkpoint, or `final/` (or the
/// `final.old/` a kill left while replacing it) when it holds more steps (a finished run given
/// more steps, or one that saved no checkpoint before it).
pub fn resumable(out: &Path) -> Result<Option<(PathBuf, TrainerState)>> {
    let latest = latest(out)?;
    let last = RunDir::new(out).final_dir();
    // `final.old/`: a kill while `final/` was replaced (the complete new one may still be
    // `final.tmp/`, which is never trusted)
    let found = [last.clone(), last.with_extension("old")]
        .into_iter()
        .find_map(|dir| read_state(&dir).ok().map(|s| (dir, s)));
    let Some((last, state)) = found else {
        return Ok(latest);
    };
    let newer = latest
        .as_ref()
        .is_none_or(|(_, l)| state.global_step > l.global_step);
    Ok(if newer && RunDir::optimizer(&last).is_file() {
        Some((last, state))
    } else {
        latest
    })
}

/// Removes the `checkpoint-N.tmp/` and `final.tmp/` folders under `out`: saves a second Ctrl-C
/// or a kill cut short, never complete, never read (the caller holds the run's lock).
pub fn remove_unfinished(out: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(());
    };
    let final_name = RunDir::new(out).final_dir();
    let final_name = final_name.file_name().and_then(|n| n.to_str());
    for p in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let Some(saved) = name.strip_suffix(".tmp") else {
            continue;
        };
        let of_a_save = RunDir::checkpoint_step(saved).is_some() || Some(saved) == final_name;
        // a folder, not a link to one: only what a save made is removed
        if of_a_save && p.symlink_metadata().is_ok_and(|m| m.is_dir()) {
            std::fs::remove_dir_all(&p).map_err(|e| Error::io("cannot remove", &p, e))?;
        }
    }
    Ok(())
}

/// The step a checkpoint (or `final/`) was saved at, if its state reads.
pub fn final_step(dir: &Path) -> Option<usize> {
    read_state(dir).ok().map(|s| s.global_step)
}

/// A checkpoint's `trainer_state.json`, or why it cannot be read.
fn read_state(checkpoint: &Path) -> std::result::Result<TrainerState, String> {
    let text = crate::error::fs::read_to_string(RunDir::trainer_state(checkpoint))
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| e.to_string())
}

/// The complete checkpoint with the highest step under `out`, if any (a `checkpoint-N.old` left
/// by a kill during a replacement counts, after a complete `checkpoint-N`). A `checkpoint-N`
/// appears only by the rename of a complete one, so one whose `trainer_state.json` cannot be
/// read is damaged: an error naming it, not a fresh start over the run. A `.old` one may have
/// been half removed by a kill: it is passed over.
pub fn latest(out: &Path) -> Result<Option<(PathBuf, TrainerState)>> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(None);
    };
    let mut found = Vec::new();
    for p in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        let Some(name) = p.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            continue;
        };
        let current = name.strip_suffix(".old").unwrap_or(&name);
        if RunDir::checkpoint_step(current).is_none() {
            continue;
        }
        let path = RunDir::trainer_state(&p);
        // a state of another step than the folder's name is as damaged as one that does not
        // read: passed over, an earlier checkpoint would be resumed unsaid
        let named = RunDir::checkpoint_step(current);
        let state = read_state(&p)
            .map_err(|why| format!("cannot be read ({why})"))
            .and_then(|s| match named == Some(s.global_step as u64) {
                true => Ok(s),
                false => Err(format!("says step {}", s.global_step)),
            });
        match state {
            Ok(state) => found.push((p, state, !name.ends_with(".old"))),
            Err(_) if name.ends_with(".old") => {}
            Err(why) => {
                return Err(Error::Train(format!(
                    "`{}` {why}: checkpoint `{}` is damaged. Delete it to resume \
                     from an earlier checkpoint, or train without --resume (with --overwrite).",
                    path.display(),
                    p.display()
                )))
            }
        }
    }
    Ok(found
        .into_iter()
        .max_by_key(|(_, s, current)| (s.global_step, *current))
        .map(|(p, s, _)| (p, s)))
}
