//! The validated run configuration: TOML file + `--set` overrides → [`Config`], defaults in one
//! place. The closed choices are enums ([`choices`]), checked once when the file is read
//! ([`validate`]); `--set` and unknown keys are handled in [`keys`].

mod choices;
pub mod keys;
mod validate;

pub use choices::{
    Dtype, Losses, LrSchedule, Optim, RefMode, ReportTo, Role, Shard, StateDtype, TargetModules,
    Truncation, PROJECTIONS,
};
pub use keys::apply_override;

use crate::error::{fs, Error, Result};
use keys::{check_known_keys, Origin};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
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
    /// Hub dataset id, a local directory, or one local file (.parquet, .jsonl, .json: the train
    /// split).
    pub id: String,
    pub revision: String,
    pub train_split: String,
    pub test_split: String,
    /// First N rows of each split; 0 = all.
    pub limit: usize,
    /// Split name → file or glob relative to the dataset directory (default:
    /// `data/<split>-*.parquet`).
    pub data_files: BTreeMap<String, String>,
    /// > 0: a seeded test split of this fraction (< 1) or this many rows (>= 1) of train.
    pub test_size: f64,
    pub columns: Columns,
    pub message_keys: MessageKeys,
    /// Source role → chat role (ShareGPT: `{ human = "user", gpt = "assistant" }`).
    pub roles: BTreeMap<String, Role>,
}

/// Source column names for the contract's fields (`dataset.columns`); unset = the field's name.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Columns {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chosen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score_chosen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score_rejected: Option<String>,
}

/// Field names inside a message (`dataset.message_keys`); unset = `role` / `content`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct MessageKeys {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            revision: "main".into(),
            train_split: "train_prefs".into(),
            test_split: "test_prefs".into(),
            limit: 0,
            data_files: BTreeMap::new(),
            test_size: 0.0,
            columns: Columns::default(),
            message_keys: MessageKeys::default(),
            roles: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Hub model id, or a local directory in HF layout.
    pub id: String,
    pub revision: String,
    /// Compute dtype of the forward passes.
    pub dtype: Dtype,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            revision: "main".into(),
            dtype: Dtype::Bf16,
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
    /// "i/n": score only shard i of n of each split (one process per GPU or host).
    pub shard: Shard,
}

impl Default for PrecomputeConfig {
    fn default() -> Self {
        Self {
            batch_size: 16,
            out: PathBuf::from("data/cache/default"),
            chunk_pairs: 256,
            shard: Shard::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub out: PathBuf,
    /// Where the stage-one cache is read from; empty = `precompute.out`.
    pub cache: PathBuf,
    pub loss: Losses,
    /// One weight per `loss` entry (TRL's `loss_weights`); empty = 1 each.
    pub loss_weights: Vec<f64>,
    pub beta: f64,
    pub label_smoothing: f64,
    pub rpo_alpha: f64,
    /// SimPO's target reward margin γ (only for `loss = "simpo"`).
    pub simpo_gamma: f64,
    /// DiscoPOP's temperature τ (only for `loss = "discopop"`; TRL's `discopop_tau`).
    pub discopop_tau: f64,
    pub learning_rate: f64,
    pub lr_schedule: LrSchedule,
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
    #[serde(rename = "ref")]
    pub reference: RefMode,
    pub eval_every: usize,
    pub save_every: usize,
    pub log_every: usize,
    /// Recompute each block's activations during backward instead of keeping them.
    pub gradient_checkpointing: bool,
    /// The optimizer: torch's AdamW, or bitsandbytes' 8-bit AdamW (transformers' names).
    pub optim: Optim,
    /// Storage dtype of the gradients and AdamW moments (the moments not kept in 8 bits).
    pub state_dtype: StateDtype,
    /// Storage dtype of the trained weights (full fine-tuning): f32 masters (torch's), or bf16
    /// updated with stochastic rounding (2 fewer bytes per parameter, no compute copy).
    pub master_dtype: StateDtype,
    /// Write `final/` at the end (benchmarks and sweeps may skip it).
    pub save_final: bool,
    /// LoRA adapters on a frozen base (`r` = 0: full fine-tuning).
    pub lora: LoraConfig,
    /// Logs besides `metrics.jsonl`: `["tensorboard"]` writes event files under
    /// `<out>/runs/` (TRL's `report_to`).
    pub report_to: Vec<ReportTo>,
}

/// `[train.lora]`, with PEFT's meanings: ΔW = (alpha / r)·B·A (alpha / √r with `use_rslora`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Adapter rank; 0 = full fine-tuning.
    pub r: usize,
    pub alpha: f64,
    /// Dropout on the adapter's input (training only).
    pub dropout: f64,
    pub target_modules: TargetModules,
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 0,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: TargetModules::AllLinear,
            use_rslora: false,
        }
    }
}

impl LoraConfig {
    pub fn enabled(&self) -> bool {
        self.r > 0
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            out: PathBuf::from("data/runs/default"),
            cache: PathBuf::new(),
            loss: Losses::default(),
            loss_weights: Vec::new(),
            beta: 0.1,
            label_smoothing: 0.0,
            rpo_alpha: 0.0,
            simpo_gamma: 0.5,
            discopop_tau: 0.05,
            learning_rate: 5e-7,
            lr_schedule: LrSchedule::Cosine,
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
            reference: RefMode::Cached,
            eval_every: 0,
            save_every: 0,
            log_every: 1,
            gradient_checkpointing: true,
            optim: Optim::AdamwTorch,
            state_dtype: StateDtype::F32,
            master_dtype: StateDtype::F32,
            save_final: true,
            lora: LoraConfig::default(),
            report_to: Vec::new(),
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

/// The `--config` of a command given none: the demo pipeline, in the checkout.
pub const DEFAULT_PIPELINE: &str = "pipelines/demo.toml";

impl Config {
    /// Reads `path`, applies `--set section.key=value` overrides, validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        // the default `--config` is the checkout's demo pipeline, relative to the directory
        if !path.exists() && path == Path::new(DEFAULT_PIPELINE) {
            return Err(Error::Config(format!(
                "no `{DEFAULT_PIPELINE}` here ({}): run from the refdpo checkout, or pass \
                 `--config FILE` (a pipeline TOML; every key has a default, see the README's \
                 \"Configuration\")",
                std::env::current_dir().unwrap_or_default().display()
            )));
        }
        // a pipeline is a few kB: a file past this is not one (it had been read whole, 1 GB)
        const MAX_BYTES: u64 = 4 << 20;
        if let Some(n) = std::fs::metadata(path)
            .ok()
            .map(|m| m.len())
            .filter(|&n| n > MAX_BYTES)
        {
            return Err(Error::Config(format!(
                "`{}` is {n} bytes, not a pipeline file (at most {MAX_BYTES} bytes): check \
                 --config",
                path.display()
            )));
        }
        let text = fs::read_to_string(path)?;
        let mut table: toml::Table = text
            .parse()
            .map_err(|e| Error::Config(format!("`{}` is not valid TOML: {e}", path.display())))?;
        let set = overrides
            .iter()
            .map(|item| apply_override(&mut table, item))
            .collect::<Result<Vec<_>>>()?;
        let file = path.display().to_string();
        Self::build(
            table,
            &Origin {
                file: &file,
                set: &set,
            },
        )
    }

    /// Builds a config from a TOML table; `origin` names it in errors.
    pub fn from_table(table: toml::Table, origin: &str) -> Result<Self> {
        Self::build(
            table,
            &Origin {
                file: origin,
                set: &[],
            },
        )
    }

    fn build(table: toml::Table, origin: &Origin) -> Result<Self> {
        check_known_keys(&table, origin)?;
        let cfg: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                let message = e.inner().message();
                Error::Config(format!(
                    "`{key}` {}: {message}{}",
                    origin.of(&key),
                    origin.hint(&key, message)
                ))
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The resolved configuration as TOML, saved beside every output.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dpo::LossKind;

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
        assert_eq!(c.train.reference, RefMode::Cached);
        assert_eq!(c.train.loss.first(), LossKind::Sigmoid);
        assert_eq!(c.train.lr_schedule, LrSchedule::Cosine);
        assert_eq!(c.train.state_dtype, StateDtype::F32);
        assert_eq!(c.model.dtype, Dtype::Bf16);
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
    fn a_set_key_is_named_as_given_by_set_not_as_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, "[dataset]\nid='d'\n[model]\nid='m'\n").unwrap();
        let load = |set: &str| {
            Config::load(&path, &[set.to_string()])
                .unwrap_err()
                .to_string()
        };
        let err = load("dataset.limt=3");
        assert!(
            err.contains("`dataset.limt` given by `--set dataset.limt=…`")
                && !err.contains("run.toml"),
            "{err}"
        );
        let err = load("model.revision=1234567");
        assert!(
            err.contains("given by `--set model.revision=…`") && err.contains("quote a string"),
            "{err}"
        );
        let err = load("train.ld_alpha=0.5");
        assert!(
            err.contains("`ld_alpha` is TRL's DPOConfig option: refdpo does not implement it"),
            "{err}"
        );
        let err = load("train.truncation_mode=keep_end");
        assert!(err.contains("refdpo's is `tokenize.truncation`"), "{err}");
        for (set, hint) in [
            ("train.eval_steps=10", "`train.eval_every`"),
            ("train.warmup_steps=10", "`train.warmup_ratio`"),
            ("train.bf16=true", "`model.dtype = \"bf16\"`"),
            ("train.report_to=tensorboard", "so write a list"),
        ] {
            let err = load(set);
            assert!(err.contains(hint), "{set}: {err}");
        }
        let err = load("trian.beta=1");
        assert!(
            err.contains("`[trian]` given by `--set trian.beta=…`"),
            "{err}"
        );
        std::fs::write(&path, "[dataset]\nid='d'\nlimt=3\n[model]\nid='m'\n").unwrap();
        let err = load("train.beta=0.2");
        assert!(
            err.contains("`dataset.limt` in `") && err.contains("run.toml"),
            "{err}"
        );
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
