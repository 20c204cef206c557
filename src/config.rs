//! The validated run configuration: TOML file + `--set` overrides → [`Config`], defaults in one place.

use crate::error::{fs, Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One pipeline = one TOML file. Every key has a default except `dataset.id` and `model.id`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub dataset: DatasetConfig,
    pub model: ModelConfig,
    pub tokenize: TokenizeConfig,
    pub precompute: PrecomputeConfig,
    pub train: TrainConfig,
    pub demo: DemoConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatasetConfig {
    /// Hub dataset id, or a local directory holding `data/<split>-*.parquet`.
    pub id: String,
    pub revision: String,
    pub train_split: String,
    pub test_split: String,
    /// First N rows of each split; 0 = all.
    pub limit: usize,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            revision: "main".into(),
            train_split: "train_prefs".into(),
            test_split: "test_prefs".into(),
            limit: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Hub model id, or a local directory in HF layout.
    pub id: String,
    pub revision: String,
    /// Compute dtype of the forward passes: f32 | bf16 | f16.
    pub dtype: String,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            revision: "main".into(),
            dtype: "bf16".into(),
        }
    }
}

/// How prompt + completion are cut to `max_length`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Keep the start of prompt + completion: cut completion tokens from the end.
    #[default]
    KeepStart,
    /// Keep the end: cut prompt tokens from the start.
    KeepEnd,
}

impl Truncation {
    pub fn as_str(self) -> &'static str {
        match self {
            Truncation::KeepStart => "keep_start",
            Truncation::KeepEnd => "keep_end",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TokenizeConfig {
    pub max_length: usize,
    pub truncation: Truncation,
}

impl Default for TokenizeConfig {
    fn default() -> Self {
        Self {
            max_length: 1024,
            truncation: Truncation::KeepStart,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PrecomputeConfig {
    /// Pairs per reference forward (each pair is two sequences).
    pub batch_size: usize,
    pub out: PathBuf,
    /// Pairs per resumable chunk: an interrupted run redoes at most one chunk.
    pub chunk_pairs: usize,
}

impl Default for PrecomputeConfig {
    fn default() -> Self {
        Self {
            batch_size: 16,
            out: PathBuf::from("data/cache/default"),
            chunk_pairs: 256,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub out: PathBuf,
    /// Where the stage-one cache is read from; empty = `precompute.out`.
    pub cache: PathBuf,
    pub loss: String,
    pub beta: f64,
    pub label_smoothing: f64,
    pub rpo_alpha: f64,
    /// SimPO's target reward margin γ (only for `loss = "simpo"`).
    pub simpo_gamma: f64,
    pub learning_rate: f64,
    pub lr_schedule: String,
    pub warmup_ratio: f64,
    pub epochs: usize,
    pub max_steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub seed: u64,
    pub r#ref: String,
    pub eval_every: usize,
    pub save_every: usize,
    pub log_every: usize,
    /// Recompute each block's activations during backward instead of keeping them.
    pub gradient_checkpointing: bool,
    /// Storage dtype of the gradients and AdamW moments: f32 (torch's AdamW) or bf16 (half
    /// their memory; moments rounded stochastically). Master weights stay f32 either way.
    pub state_dtype: String,
    /// Write `final/` at the end (benchmarks and sweeps may skip it).
    pub save_final: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            out: PathBuf::from("data/runs/default"),
            cache: PathBuf::new(),
            loss: "sigmoid".into(),
            beta: 0.1,
            label_smoothing: 0.0,
            rpo_alpha: 0.0,
            simpo_gamma: 0.5,
            learning_rate: 5e-7,
            lr_schedule: "cosine".into(),
            warmup_ratio: 0.1,
            epochs: 1,
            max_steps: 0,
            batch_size: 8,
            grad_accum: 1,
            max_grad_norm: 10.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            seed: 42,
            r#ref: "cached".into(),
            eval_every: 0,
            save_every: 0,
            log_every: 1,
            gradient_checkpointing: true,
            state_dtype: "f32".into(),
            save_final: true,
        }
    }
}

/// The embedded default: generate a dataset, tokenizer and tiny model before stage one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DemoConfig {
    /// Generate the demo assets into `dir` (if missing) before running.
    pub generate: bool,
    pub dir: PathBuf,
    pub seed: u64,
    pub train_rows: usize,
    pub test_rows: usize,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            generate: false,
            dir: PathBuf::from("data/demo"),
            seed: 7,
            train_rows: 512,
            test_rows: 128,
        }
    }
}

impl TrainConfig {
    /// The cache directory stage two reads.
    pub fn cache_dir<'a>(&'a self, precompute: &'a PrecomputeConfig) -> &'a Path {
        if self.cache.as_os_str().is_empty() {
            &precompute.out
        } else {
            &self.cache
        }
    }
}

impl Config {
    /// Reads `path`, applies `--set section.key=value` overrides, validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = fs::read_to_string(path)?;
        let mut table: toml::Table = text
            .parse()
            .map_err(|e| Error::Config(format!("`{}` is not valid TOML: {e}", path.display())))?;
        for item in overrides {
            apply_override(&mut table, item)?;
        }
        Self::from_table(table, &path.display().to_string())
    }

    /// Builds a config from a TOML table; `origin` names it in errors.
    pub fn from_table(table: toml::Table, origin: &str) -> Result<Self> {
        check_known_keys(&table, origin)?;
        let cfg: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e| Error::Config(format!("in `{origin}`: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that serde cannot: required keys, enumerations, ranges.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::Config(format!("`{key}` {msg}")));
        if self.dataset.id.is_empty() && !self.demo.generate {
            return bad(
                "dataset.id",
                "is required: a hub dataset id or a local directory".into(),
            );
        }
        if self.model.id.is_empty() && !self.demo.generate {
            return bad(
                "model.id",
                "is required: a hub model id or a local directory".into(),
            );
        }
        if !matches!(self.model.dtype.as_str(), "f32" | "bf16" | "f16") {
            return bad(
                "model.dtype",
                format!("= {:?}: use f32, bf16 or f16", self.model.dtype),
            );
        }
        if self.tokenize.max_length < 2 {
            return bad("tokenize.max_length", "must be at least 2".into());
        }
        if self.precompute.batch_size == 0 || self.precompute.chunk_pairs == 0 {
            return bad(
                "precompute.batch_size",
                "and precompute.chunk_pairs must be > 0".into(),
            );
        }
        let t = &self.train;
        if crate::dpo::LossKind::parse(&t.loss).is_none() {
            return bad(
                "train.loss",
                format!(
                    "= {:?}: use one of {}",
                    t.loss,
                    crate::dpo::LossKind::NAMES.join(", ")
                ),
            );
        }
        if !matches!(t.lr_schedule.as_str(), "constant" | "linear" | "cosine") {
            return bad(
                "train.lr_schedule",
                format!("= {:?}: use constant, linear or cosine", t.lr_schedule),
            );
        }
        if !matches!(t.r#ref.as_str(), "cached" | "live") {
            return bad("train.ref", format!("= {:?}: use cached or live", t.r#ref));
        }
        if t.batch_size == 0 || t.grad_accum == 0 || t.log_every == 0 {
            return bad(
                "train.batch_size",
                "train.grad_accum and train.log_every must be > 0".into(),
            );
        }
        if !(0.0..=1.0).contains(&t.warmup_ratio) {
            return bad(
                "train.warmup_ratio",
                format!("= {} must be in [0, 1]", t.warmup_ratio),
            );
        }
        if !(0.0..0.5).contains(&t.label_smoothing) {
            return bad(
                "train.label_smoothing",
                format!("= {} must be in [0, 0.5)", t.label_smoothing),
            );
        }
        if !matches!(t.state_dtype.as_str(), "f32" | "bf16") {
            return bad(
                "train.state_dtype",
                format!("= {:?}: use f32 or bf16", t.state_dtype),
            );
        }
        if t.beta <= 0.0 {
            return bad("train.beta", format!("= {} must be > 0", t.beta));
        }
        Ok(())
    }

    /// The resolved configuration as TOML, saved beside every output.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

/// Applies one `section.key=value` override; the value is read as TOML, else taken as a string.
pub fn apply_override(table: &mut toml::Table, item: &str) -> Result<()> {
    let (key, raw) = item
        .split_once('=')
        .ok_or_else(|| Error::Config(format!("--set `{item}`: expected section.key=value")))?;
    let (section, name) = key.trim().split_once('.').ok_or_else(|| {
        Error::Config(format!(
            "--set `{item}`: the key must be section.key, e.g. train.beta"
        ))
    })?;
    let value = parse_value(raw.trim());
    let entry = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(sec) = entry else {
        return Err(Error::Config(format!("`{section}` is not a section")));
    };
    sec.insert(name.to_string(), value);
    Ok(())
}

fn parse_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

/// Unknown keys are an error that names the key and lists the known ones.
fn check_known_keys(table: &toml::Table, origin: &str) -> Result<()> {
    let defaults = toml::Value::try_from(Config::default()).expect("default config serializes");
    let toml::Value::Table(known) = defaults else {
        unreachable!()
    };
    for (section, value) in table {
        let Some(toml::Value::Table(known_keys)) = known.get(section) else {
            let names: Vec<_> = known.keys().map(String::as_str).collect();
            return Err(Error::Config(format!(
                "unknown section `[{section}]` in `{origin}`; known sections: {}",
                names.join(", ")
            )));
        };
        let toml::Value::Table(keys) = value else {
            return Err(Error::Config(format!(
                "`{section}` in `{origin}` must be a table"
            )));
        };
        for key in keys.keys() {
            if !known_keys.contains_key(key) {
                let names: Vec<_> = known_keys.keys().map(String::as_str).collect();
                return Err(Error::Config(format!(
                    "unknown key `{section}.{key}` in `{origin}`; known keys of [{section}]: {}",
                    names.join(", ")
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(s: &str) -> toml::Table {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_match_spec() {
        let c = Config::from_table(table("[dataset]\nid='d'\n[model]\nid='m'"), "t").unwrap();
        assert_eq!(c.dataset.train_split, "train_prefs");
        assert_eq!(c.tokenize.max_length, 1024);
        assert_eq!(c.train.beta, 0.1);
        assert_eq!(c.train.learning_rate, 5e-7);
        assert_eq!(c.train.r#ref, "cached");
        assert_eq!(c.model.dtype, "bf16");
    }

    #[test]
    fn overrides_parse_toml_or_string() {
        let mut t = table("[dataset]\nid='d'\n[model]\nid='m'");
        apply_override(&mut t, "dataset.limit=64").unwrap();
        apply_override(&mut t, "model.id=path/to/dir").unwrap();
        apply_override(&mut t, "tokenize.truncation=keep_end").unwrap();
        let c = Config::from_table(t, "t").unwrap();
        assert_eq!(c.dataset.limit, 64);
        assert_eq!(c.model.id, "path/to/dir");
        assert_eq!(c.tokenize.truncation, Truncation::KeepEnd);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_table(table("[train]\nbetta=0.1"), "x.toml").unwrap_err();
        assert!(err.to_string().contains("`train.betta`"), "{err}");
        let err = Config::from_table(table("[trian]\nbeta=0.1"), "x.toml").unwrap_err();
        assert!(err.to_string().contains("`[trian]`"), "{err}");
    }

    #[test]
    fn missing_ids_and_bad_values_are_refused() {
        let err = Config::from_table(table("[model]\nid='m'"), "t").unwrap_err();
        assert!(err.to_string().contains("dataset.id"), "{err}");
        let err = Config::from_table(
            table("[dataset]\nid='d'\n[model]\nid='m'\n[train]\nloss='nope'"),
            "t",
        )
        .unwrap_err();
        assert!(err.to_string().contains("train.loss"), "{err}");
    }
}
