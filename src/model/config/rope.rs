//! RoPE settings from config.json, resolved as transformers 5.24 resolves them
//! (`RotaryEmbeddingConfigMixin.convert_rope_params_to_dict`, and Gemma 3's own):
//! - a legacy `rope_scaling` object, when set and not empty, replaces `rope_parameters`;
//! - the base is the settings' `rope_theta`, else the top-level one, else the family's default;
//! - Llama-3 scaling's `original_max_position_embeddings` is the top-level key where there is one
//!   (transformers gives it priority), else the settings';
//! - Gemma 3 has one set per layer kind: `full_attention` (a legacy `rope_scaling` is merged into
//!   it; its base defaults to the top-level `rope_theta`, then 1e6) and `sliding_attention` (its
//!   base: `rope_local_base_freq`, then 1e4). A flat `rope_parameters` is ignored there, as
//!   transformers ignores it.

use serde_json::{Map, Value};

/// Llama-3 style RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: f32,
}

/// How the inverse frequencies are scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `linear`: every inverse frequency divided by `factor` (positions interpolated).
    Linear {
        factor: f32,
    },
    Llama3(Llama3Scaling),
}

/// One set of RoPE settings: the base and its scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f32,
    pub scaling: Option<RopeScaling>,
}

/// The RoPE keys of config.json.
pub(super) struct RopeKeys<'a> {
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<&'a Value>,
    pub rope_parameters: Option<&'a Value>,
    pub rope_local_base_freq: Option<f64>,
    pub partial_rotary_factor: Option<&'a Value>,
    pub original_max_position_embeddings: Option<&'a Value>,
}

/// Settings for every layer, and for Gemma 3 the sliding-window layers' own.
pub(super) fn resolve(
    keys: &RopeKeys,
    gemma3: bool,
    default_theta: f64,
) -> Result<(RopeConfig, Option<RopeConfig>), String> {
    if gemma3 {
        let nested = keys.rope_parameters.and_then(Value::as_object);
        let entry = |kind: &str| -> Result<Map<String, Value>, String> {
            match nested.and_then(|p| p.get(kind)) {
                None | Some(Value::Null) => Ok(Map::new()),
                Some(Value::Object(m)) => Ok(m.clone()),
                Some(v) => Err(format!(
                    "`rope_parameters.{kind}` = {v}: it must be an object of RoPE settings \
                     (`rope_type`, `rope_theta`, …)"
                )),
            }
        };
        let mut full = entry("full_attention")?;
        if let Some(legacy) = keys.rope_scaling.and_then(Value::as_object) {
            full.extend(legacy.clone());
        }
        let mut sliding = entry("sliding_attention")?;
        let base = |m: &mut Map<String, Value>, fallback: f64| {
            if !m.contains_key("rope_theta") {
                m.insert("rope_theta".into(), fallback.into());
            }
        };
        base(&mut full, keys.rope_theta.unwrap_or(default_theta));
        base(&mut sliding, keys.rope_local_base_freq.unwrap_or(10_000.0));
        let global = one(&full, "rope_parameters.full_attention", keys, true)?;
        let local = one(&sliding, "rope_parameters.sliding_attention", keys, true)?;
        return Ok((global, Some(local)));
    }
    // `rope_scaling or rope_parameters`: an empty or null legacy object gives way
    let legacy = keys
        .rope_scaling
        .and_then(Value::as_object)
        .filter(|m| !m.is_empty());
    let (mut params, name) = match (legacy, keys.rope_parameters.and_then(Value::as_object)) {
        (Some(m), _) => (m.clone(), "rope_scaling"),
        (None, Some(m)) => (m.clone(), "rope_parameters"),
        (None, None) => (Map::new(), "rope_parameters"),
    };
    for kind in ["full_attention", "sliding_attention"] {
        if params.contains_key(kind) {
            return Err(format!(
                "`{name}.{kind}`: RoPE settings per layer kind are Gemma 3's; this family has one \
                 set (put its keys directly in `{name}`)"
            ));
        }
    }
    if !params.contains_key("rope_theta") {
        params.insert(
            "rope_theta".into(),
            keys.rope_theta.unwrap_or(default_theta).into(),
        );
    }
    Ok((one(&params, name, keys, false)?, None))
}

/// One set of settings, `at` naming where they came from in config.json.
fn one(
    m: &Map<String, Value>,
    at: &str,
    keys: &RopeKeys,
    nested: bool,
) -> Result<RopeConfig, String> {
    let theta = m["rope_theta"].as_f64().ok_or_else(|| {
        format!(
            "`{at}.rope_theta` = {}: it must be a number",
            m["rope_theta"]
        )
    })?;
    if !super::positive_f32(theta) {
        let key = if at == "rope_parameters.sliding_attention" {
            "local rope_theta"
        } else {
            "rope_theta"
        };
        return Err(format!(
            "`{key}` = {}: it must be a number above 0 within f32's range (1.2e-38 to \
             3.4e38)",
            m["rope_theta"]
        ));
    }
    // Phi-3.5/Phi-4-mini rotate only part of each head (transformers 5 writes the factor into
    // the settings, 4.x at the top level).
    let partial = [
        (
            format!("{at}.partial_rotary_factor"),
            m.get("partial_rotary_factor"),
        ),
        (
            "partial_rotary_factor".to_string(),
            keys.partial_rotary_factor,
        ),
    ];
    if let Some((key, f)) = partial
        .iter()
        .find_map(|(k, v)| Some((k, v.filter(|v| !v.is_null())?)))
    {
        if f.as_f64() != Some(1.0) {
            return Err(format!(
                "`{key}` = {f}: the model rotates part of each head, which refdpo does not \
                 implement"
            ));
        }
    }
    // transformers reads `rope_type`, else `type`, and refuses a name it lacks (null too)
    let kind = match m
        .get("rope_type")
        .map(|v| ("rope_type", v))
        .or_else(|| m.get("type").map(|v| ("type", v)))
    {
        None => "default",
        Some((_, Value::String(kind))) => kind.as_str(),
        Some((key, v)) => {
            return Err(format!(
                "`{at}.{key}` = {v}: it must name a RoPE type (\"default\", \"linear\", \
                 \"llama3\", …)"
            ))
        }
    };
    let num = |k: &str, v: Option<&Value>| -> Result<f32, String> {
        let x = v
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("`{at}` ({kind} RoPE scaling) lacks `{k}`"))?;
        if !super::positive_f32(x) {
            return Err(format!(
                "`{at}.{k}` = {x}: it must be a finite number above 0 within f32's range"
            ));
        }
        Ok(x as f32)
    };
    let field = |k: &str| num(k, m.get(k));
    let scaling = match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: field("factor")?,
        }),
        "llama3" => {
            // transformers lets a top-level value win over the settings' (not per layer kind)
            let top = keys.original_max_position_embeddings.filter(|_| !nested);
            let orig = match top.filter(|v| !v.is_null()) {
                Some(v) => num("original_max_position_embeddings", Some(v))?,
                None => field("original_max_position_embeddings")?,
            };
            Some(RopeScaling::Llama3(Llama3Scaling {
                factor: field("factor")?,
                low_freq_factor: field("low_freq_factor")?,
                high_freq_factor: field("high_freq_factor")?,
                original_max_position_embeddings: orig,
            }))
        }
        other => {
            return Err(format!(
                "`{at}.rope_type` = {other:?} is not supported: refdpo implements default, linear \
                 and llama3"
            ))
        }
    };
    Ok(RopeConfig {
        theta: theta as f32,
        scaling,
    })
}
