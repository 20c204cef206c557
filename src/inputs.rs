//! One place that resolves a run's inputs — the dataset directory, the model and its tokenizer +
//! chat template — and the cache fingerprint they imply. `precompute`, `train`, `show` and
//! `stats` all resolve through here, so a cache and the run that reads it agree by construction.

use crate::cache::Fingerprint;
use crate::config::Config;
use crate::data::{self, DataSource};
use crate::error::Result;
use crate::hub;
use crate::model::{weights, Transformer, TransformerConfig};
use crate::tokenize::PairTokenizer;
use candle_core::{DType, Device};
use std::path::PathBuf;

/// A resolved model: its directory (hub snapshot or local), config and weight files.
pub struct ModelSource {
    pub dir: PathBuf,
    /// `local` for a directory, else the revision asked for.
    pub revision: String,
    pub cfg: TransformerConfig,
    pub weight_files: Vec<PathBuf>,
    pub weights_sha256: String,
}

impl ModelSource {
    /// A hub model id at `revision`, or a local directory.
    pub fn resolve(id: &str, revision: &str) -> Result<Self> {
        Self::open(hub::model(id, revision)?)
    }

    fn open(m: hub::RepoDir) -> Result<Self> {
        let cfg = TransformerConfig::from_file(&m.dir.join("config.json"))?;
        let weight_files = weights::weight_files(&m.dir)?;
        let weights_sha256 = weights::hash_files(&weight_files)?;
        Ok(Self {
            dir: m.dir,
            revision: m.revision,
            cfg,
            weight_files,
            weights_sha256,
        })
    }

    /// The frozen model in `dtype` on `device`, built from plain (untracked) tensors.
    pub fn load(&self, dtype: DType, device: &Device) -> Result<Transformer> {
        let tensors = weights::load(&self.weight_files, dtype, device)?;
        Transformer::new(&self.cfg, &tensors)
    }
}

/// The model and its tokenizer, as a configuration names them.
pub struct Inputs {
    pub model: ModelSource,
    pub tokenizer: PairTokenizer,
}

impl Inputs {
    /// The model and tokenizer only (stage two and `stats --run` read no dataset). Generates the
    /// demo assets first when the config asks for them.
    pub fn resolve(cfg: &Config) -> Result<Self> {
        if cfg.demo.generate {
            data::demo::ensure(&cfg.demo)?;
        }
        Self::open(cfg)
    }

    /// The dataset directory holding `splits`, then the model and tokenizer. The dataset is
    /// resolved first, so its errors come first.
    pub fn with_dataset(cfg: &Config, splits: &[&str]) -> Result<(DataSource, Self)> {
        if cfg.demo.generate {
            data::demo::ensure(&cfg.demo)?;
        }
        let source = DataSource::resolve(&cfg.dataset, splits)?;
        Ok((source, Self::open(cfg)?))
    }

    fn open(cfg: &Config) -> Result<Self> {
        let model = ModelSource::resolve(&cfg.model.id, &cfg.model.revision)?;
        let tokenizer =
            PairTokenizer::from_dir(&model.dir, cfg.tokenize.max_length, cfg.tokenize.truncation)?;
        Ok(Self { model, tokenizer })
    }

    /// What a cache of `split` made from these inputs under `cfg` records (and what a run checks).
    pub fn fingerprint(&self, cfg: &Config, split: &str) -> Fingerprint {
        Fingerprint {
            dataset_id: cfg.dataset.id.clone(),
            dataset_revision: hub::revision_label(&cfg.dataset.id, &cfg.dataset.revision),
            split: split.to_string(),
            limit: cfg.dataset.limit,
            dataset_options: dataset_options(&cfg.dataset),
            model_id: cfg.model.id.clone(),
            model_revision: self.model.revision.clone(),
            weights_sha256: self.model.weights_sha256.clone(),
            tokenizer_sha256: self.tokenizer.tokenizer_sha256().to_string(),
            chat_template_sha256: self.tokenizer.template.sha256(),
            max_length: cfg.tokenize.max_length,
            truncation: cfg.tokenize.truncation,
            shard: String::new(),
            dtype: cfg.model.dtype,
            refdpo_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// What else decides a split's rows (`data_files`, `test_size`, the column, message-key and role
/// mappings) as one JSON string; empty when all are defaults, as caches made before these keys
/// existed record it.
fn dataset_options(d: &crate::config::DatasetConfig) -> String {
    let options = serde_json::json!({
        "data_files": d.data_files,
        "test_size": d.test_size,
        "columns": d.columns,
        "message_keys": d.message_keys,
        "roles": d.roles,
    });
    let defaults = crate::config::DatasetConfig::default();
    if d.data_files == defaults.data_files
        && d.test_size == defaults.test_size
        && d.columns == defaults.columns
        && d.message_keys == defaults.message_keys
        && d.roles == defaults.roles
    {
        String::new()
    } else {
        options.to_string()
    }
}
