//! A LoRA adapter on disk as PEFT has it: `adapter_config.json` (its settings, read back with
//! every PEFT setting refdpo does not implement refused by name) and
//! `adapter_model.safetensors` (A and B of each adapted module, PEFT's names).

use super::target_modules;
use crate::config::{LoraConfig, TargetModules, PROJECTIONS};
use crate::error::{fs, Error, Result};
use crate::model::config::TransformerConfig;
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// An adapter directory read back: its settings and its tensors (f32, on the CPU).
pub struct SavedAdapter {
    pub lora: LoraConfig,
    pub tensors: HashMap<String, Tensor>,
}

/// Whether `dir` holds a PEFT adapter rather than full weights.
pub fn is_adapter(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).exists()
}

/// The base an adapter names: PEFT's `base_model_name_or_path` and `revision` (none: the hub's
/// default branch), as `AutoPeftModelForCausalLM` loads it.
pub struct NamedBase {
    pub id: String,
    pub revision: Option<String>,
}

/// The base `dir`'s adapter config names, if it names one.
pub fn named_base(dir: &Path) -> Result<Option<NamedBase>> {
    let v = read_config(dir)?;
    let text = |k: &str| v[k].as_str().filter(|s| !s.is_empty()).map(String::from);
    Ok(text("base_model_name_or_path").map(|id| NamedBase {
        id,
        revision: text("revision"),
    }))
}

fn read_config(dir: &Path) -> Result<Value> {
    let path = dir.join(CONFIG_FILE);
    serde_json::from_str(&fs::read_to_string(&path)?)
        .map_err(|e| Error::Model(format!("`{}` is not JSON: {e}", path.display())))
}

/// `init_lora_weights` values that leave the base as it is. PiSSA, OLoRA, CorDA and LoftQ
/// rewrite the base's weights when PEFT loads the adapter, so merging into the plain base would
/// give another model.
const PLAIN_INITS: [&str; 4] = ["gaussian", "orthogonal", "eva", "mica"];

/// Reads a PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`). Settings
/// refdpo does not implement (DoRA, per-module ranks, trained biases, extra saved modules) are
/// refused by name.
pub fn read(dir: &Path) -> Result<SavedAdapter> {
    let path = dir.join(CONFIG_FILE);
    let v = read_config(dir)?;
    let bad = |field: &str, why: &str| {
        Error::Model(format!(
            "`{}`: `{field}` {why}; refdpo reads plain LoRA adapters (PEFT `peft_type` LORA, no \
             DoRA, one rank and alpha for all modules, bias \"none\")",
            path.display()
        ))
    };
    if v["peft_type"] != "LORA" {
        return Err(bad("peft_type", &format!("is {}", v["peft_type"])));
    }
    // PEFT reads these with Python's truthiness (1, "false" are true there): refdpo reads the
    // booleans PEFT writes, and refuses anything else by name rather than guess
    let flag = |field: &str| match &v[field] {
        Value::Null => Ok(false),
        Value::Bool(b) => Ok(*b),
        other => Err(bad(field, &format!("is {other}, not true or false"))),
    };
    if flag("use_dora")? {
        return Err(bad("use_dora", "is true"));
    }
    let use_rslora = flag("use_rslora")?;
    for field in ["rank_pattern", "alpha_pattern"] {
        match &v[field] {
            Value::Null => {}
            Value::Object(m) if m.is_empty() => {}
            Value::Object(_) => return Err(bad(field, "is not empty")),
            other => return Err(bad(field, &format!("is {other}, not an object"))),
        }
    }
    if !v["bias"].is_null() && v["bias"] != "none" {
        return Err(bad("bias", &format!("is {}", v["bias"])));
    }
    let init = &v["init_lora_weights"];
    let plain_init = init.is_null()
        || init.is_boolean()
        || init.as_str().is_some_and(|s| PLAIN_INITS.contains(&s));
    if !plain_init {
        return Err(Error::Model(format!(
            "`{}`: `init_lora_weights` is {init}, an initialization that rewrites the base \
             model's weights when PEFT loads the adapter, so it cannot be merged into the plain \
             base; save it converted to plain LoRA with PEFT (`save_pretrained(..., \
             path_initial_model_for_weight_conversion=...)`) and merge that",
            path.display()
        )));
    }
    if v["modules_to_save"]
        .as_array()
        .map_or(!v["modules_to_save"].is_null(), |m| !m.is_empty())
    {
        return Err(bad("modules_to_save", "is set"));
    }
    // PEFT settings that change which weights adapt or how: null, false or empty by default
    for field in [
        "layers_to_transform",
        "layers_pattern",
        "exclude_modules",
        "trainable_token_indices",
        "layer_replication",
        "target_parameters",
        "alora_invocation_tokens",
        "fan_in_fan_out",
        "lora_bias",
        "use_qalora",
        "use_bdlora",
        // PEFT 0.21's LoRA variants (`is_lora_variant` in its `LoraConfig`)
        "kasa_config",
        "velora_config",
        "monteclora_config",
        "arrow_config",
    ] {
        let x = &v[field];
        let unset = x.is_null() || *x == false || x.as_array().is_some_and(Vec::is_empty);
        if !unset {
            return Err(bad(field, &format!("is {x}")));
        }
    }
    let r = v["r"]
        .as_u64()
        .filter(|&r| r > 0)
        .ok_or_else(|| bad("r", "is not a positive integer"))? as usize;
    let alpha = v["lora_alpha"]
        .as_f64()
        .ok_or_else(|| bad("lora_alpha", "is not a number"))?;
    if alpha.abs() > f64::from(f32::MAX) {
        // its scale (alpha / r) would be beyond the f32 weights it multiplies
        return Err(bad(
            "lora_alpha",
            &format!("is {}, beyond f32's range (3.4e38)", v["lora_alpha"]),
        ));
    }
    let targets = match &v["target_modules"] {
        Value::String(s) if s == "all-linear" => TargetModules::AllLinear,
        Value::Array(items) => {
            if let Some(other) = items.iter().find(|t| !t.is_string()) {
                return Err(bad(
                    "target_modules",
                    &format!("holds {other}, not a module name"),
                ));
            }
            let mut names: Vec<String> = items
                .iter()
                .filter_map(|t| t.as_str())
                .map(|t| t.rsplit('.').next().unwrap_or(t).to_string())
                .collect();
            names.sort();
            names.dedup();
            if let Some(other) = names.iter().find(|n| !PROJECTIONS.contains(&n.as_str())) {
                return Err(bad(
                    "target_modules",
                    &format!(
                        "names `{other}`: refdpo adapts the decoder layers' linear projections \
                         ({}) only",
                        PROJECTIONS.join(", ")
                    ),
                ));
            }
            TargetModules::Names(names)
        }
        other => {
            return Err(bad(
                "target_modules",
                &format!(
                    "is {other}, a regular expression: list the projections it selects by name \
                     instead (e.g. [\"q_proj\", \"v_proj\"])"
                ),
            ))
        }
    };
    let weights = dir.join(WEIGHTS_FILE);
    if !weights.exists() && dir.join("adapter_model.bin").exists() {
        return Err(Error::Model(format!(
            "`{}` holds `adapter_model.bin` (a pickle) but no `{WEIGHTS_FILE}`: refdpo reads \
             safetensors only; resave it with PEFT: `PeftModel.from_pretrained(base, dir)\
             .save_pretrained(dir, safe_serialization=True)`",
            dir.display()
        )));
    }
    // checked as model weights are (header, NaN or Inf, a float dtype), then each tensor's
    // shape in `merge`
    let header = crate::model::weights::read_header(&weights)?;
    if let Some(t) = header
        .tensors
        .iter()
        .find(|t| !matches!(t.dtype.as_str(), "F32" | "BF16" | "F16" | "F64"))
    {
        return Err(Error::Model(format!(
            "`{}`: tensor `{}` is {}, not a float: a LoRA factor is F32, BF16 or F16; the \
             adapter is damaged or not a LoRA adapter",
            weights.display(),
            t.name,
            t.dtype
        )));
    }
    let tensors =
        crate::model::weights::load(std::slice::from_ref(&weights), DType::F32, &Device::Cpu)?;
    Ok(SavedAdapter {
        lora: LoraConfig {
            r,
            alpha,
            dropout: v["lora_dropout"].as_f64().unwrap_or(0.0),
            target_modules: targets,
            use_rslora,
        },
        tensors,
    })
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` (each atomically).
pub fn write(
    dir: &Path,
    lora: &LoraConfig,
    cfg: &TransformerConfig,
    base_model: &str,
    revision: &str,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    let mut projections: Vec<String> = target_modules(cfg, &lora.target_modules)
        .iter()
        .filter_map(|(m, _, _)| m.rsplit('.').next().map(String::from))
        .collect();
    projections.sort();
    projections.dedup();
    let config = json!({
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": lora.r,
        "rank_pattern": {},
        "alpha_pattern": {},
        // PEFT's `AutoPeftModel` loads the base at this revision (none: the hub's default)
        "revision": (revision != "main").then_some(revision),
        "target_modules": projections,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": lora.use_rslora,
    });
    fs::write_atomic(
        &dir.join(CONFIG_FILE),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    crate::model::weights::save(tensors, &dir.join(WEIGHTS_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain PEFT adapter config, with `edit` applied, and an empty weights file.
    fn adapter(edit: impl FnOnce(&mut Value)) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut v = json!({
            "peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
            "target_modules": ["q_proj", "v_proj"], "bias": "none",
            "init_lora_weights": true, "modules_to_save": null,
            "base_model_name_or_path": "org/base", "revision": null,
        });
        edit(&mut v);
        std::fs::write(dir.path().join(CONFIG_FILE), v.to_string()).unwrap();
        crate::model::weights::save(&HashMap::new(), &dir.path().join(WEIGHTS_FILE)).unwrap();
        dir
    }

    fn refusal(edit: impl FnOnce(&mut Value)) -> String {
        match read(adapter(edit).path()) {
            Ok(_) => panic!("read"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn initializations_that_rewrite_the_base_are_refused_and_the_plain_ones_read() {
        for init in ["pissa", "pissa_niter_4", "olora", "corda", "loftq"] {
            let e = refusal(|v| v["init_lora_weights"] = json!(init));
            assert!(
                e.contains("init_lora_weights") && e.contains("path_initial_model_for_weight"),
                "{e}"
            );
        }
        for init in [json!(true), json!(false), json!("gaussian"), json!("eva")] {
            read(adapter(|v| v["init_lora_weights"] = init).path()).unwrap();
        }
    }

    #[test]
    fn peft_variants_and_targets_outside_the_projections_are_refused_by_name() {
        let e = refusal(|v| v["kasa_config"] = json!({"x": 1}));
        assert!(e.contains("`kasa_config`"), "{e}");
        for target in ["lm_head", "embed_tokens"] {
            let e = refusal(|v| v["target_modules"] = json!(["q_proj", target]));
            assert!(e.contains(&format!("names `{target}`")), "{e}");
        }
        let e = refusal(|v| v["target_modules"] = json!(".*\\.(q_proj|v_proj)"));
        assert!(e.contains("a regular expression"), "{e}");
        // PEFT's empty list is no module to save
        read(adapter(|v| v["modules_to_save"] = json!([])).path()).unwrap();
        assert!(refusal(|v| v["modules_to_save"] = json!(["lm_head"])).contains("modules_to_save"));
    }

    /// PEFT reads `use_rslora` and `use_dora` with Python's truthiness (`1` and `"false"` are
    /// true): a value other than a boolean is refused by name, never merged at alpha / r (fuzzer).
    #[test]
    fn rslora_and_dora_flags_are_booleans_or_refused() {
        for field in ["use_rslora", "use_dora"] {
            for odd in [json!(1), json!("false"), json!("true"), json!([true])] {
                let e = refusal(|v| v[field] = odd.clone());
                assert!(
                    e.contains(&format!("`{field}` is {odd}, not true or false")),
                    "{e}"
                );
            }
        }
        assert!(refusal(|v| v["use_dora"] = json!(true)).contains("`use_dora` is true"));
        let rs = read(adapter(|v| v["use_rslora"] = json!(true)).path()).unwrap();
        assert!(rs.lora.use_rslora);
        let plain = read(adapter(|v| v["use_rslora"] = json!(null)).path()).unwrap();
        assert!(!plain.lora.use_rslora);
    }

    /// Values PEFT would refuse or read otherwise, and factors that are not floats, are refused
    /// by name (fuzzer: `rank_pattern: ["x"]` ignored, an I32 factor cast and merged, an alpha of
    /// 1e39 merged into weights of 5e36).
    #[test]
    fn odd_patterns_alphas_targets_and_integer_factors_are_refused_by_name() {
        for (field, odd, said) in [
            (
                "rank_pattern",
                json!(["x"]),
                "`rank_pattern` is [\"x\"], not an object",
            ),
            (
                "alpha_pattern",
                json!("x"),
                "`alpha_pattern` is \"x\", not an object",
            ),
            (
                "lora_alpha",
                json!(1e39),
                "`lora_alpha` is 1e+39, beyond f32's range",
            ),
            (
                "target_modules",
                json!(["q_proj", 3]),
                "`target_modules` holds 3",
            ),
        ] {
            let e = refusal(|v| v[field] = odd.clone());
            assert!(e.contains(said), "{e}");
        }
        read(adapter(|v| v["rank_pattern"] = json!({})).path()).unwrap();
        let dir = adapter(|_| {});
        let factor = Tensor::zeros((4, 8), DType::I64, &Device::Cpu).unwrap();
        let name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
        crate::model::weights::save(
            &HashMap::from([(name.to_string(), factor)]),
            &dir.path().join(WEIGHTS_FILE),
        )
        .unwrap();
        let e = read(dir.path()).err().unwrap().to_string();
        assert!(
            e.contains(&format!("tensor `{name}` is I64, not a float")),
            "{e}"
        );
    }

    #[test]
    fn a_pickled_adapter_is_named_with_the_way_to_resave_it() {
        let dir = adapter(|_| {});
        std::fs::remove_file(dir.path().join(WEIGHTS_FILE)).unwrap();
        std::fs::write(dir.path().join("adapter_model.bin"), b"pickle").unwrap();
        let e = read(dir.path()).err().unwrap().to_string();
        assert!(
            e.contains("adapter_model.bin") && e.contains("safe_serialization"),
            "{e}"
        );
    }

    #[test]
    fn the_named_base_carries_the_adapters_revision() {
        let dir = adapter(|v| v["revision"] = json!("v2"));
        let n = named_base(dir.path()).unwrap().unwrap();
        assert_eq!(
            (n.id.as_str(), n.revision.as_deref()),
            ("org/base", Some("v2"))
        );
        let dir = adapter(|v| v["base_model_name_or_path"] = json!(""));
        assert!(named_base(dir.path()).unwrap().is_none());
    }
}
