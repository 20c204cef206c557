//! One place that resolves a run's inputs — the dataset directory, the model and its tokenizer +
//! chat template — and the cache fingerprint they imply. `precompute`, `train`, `show` and
//! `stats` all resolve through here, so a cache and the run that reads it agree by construction.

use crate::cache::fingerprint::DatasetOptions;
use crate::cache::Fingerprint;
use crate::config::Config;
use crate::data::{self, DataSource};
use crate::error::Result;
use crate::hub;
use crate::model::{shapes, weights, Transformer, TransformerConfig};
use crate::tokenize::PairTokenizer;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// A resolved model: its directory (hub snapshot or local), config and weight files.
pub struct ModelSource {
    pub dir: PathBuf,
    /// `local` for a directory, else the revision asked for.
    pub revision: String,
    pub cfg: TransformerConfig,
    pub weight_files: Vec<PathBuf>,
    pub weights_sha256: String,
    /// SHA-256 of `config.json`.
    pub config_sha256: String,
    /// The hub commit the revision resolved to; `None` for a local directory.
    pub commit: Option<String>,
}

impl ModelSource {
    /// A hub model id at `revision`, or a local directory.
    pub fn resolve(id: &str, revision: &str) -> Result<Self> {
        Self::open(hub::model(id, revision)?)
    }

    fn open(m: hub::RepoDir) -> Result<Self> {
        let mut cfg = TransformerConfig::from_file(&m.dir.join("config.json"))?;
        let weight_files = weights::weight_files(&m.dir)?;
        shapes::check_files(&mut cfg, &weight_files, &m.dir)?;
        let weights_sha256 = weights::hash_files(&weight_files)?;
        let config_sha256 = crate::error::fs::sha256(&m.dir.join("config.json"))?;
        Ok(Self {
            dir: m.dir,
            revision: m.revision,
            cfg,
            weight_files,
            weights_sha256,
            config_sha256,
            commit: m.commit,
        })
    }

    /// The frozen model with its weights as `dtype` (`model.dtype`) holds them, on `device`,
    /// computing in [`compute_dtype`], built from plain (untracked) tensors.
    pub fn load(&self, dtype: DType, device: &Device) -> Result<Transformer> {
        Transformer::new(&self.cfg, &self.tensors(dtype, device)?)
    }

    /// The weights rounded to `dtype`, stored in [`compute_dtype`] on `device`.
    pub fn tensors(&self, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
        let tensors = weights::load(&self.weight_files, dtype, device)?;
        let compute = compute_dtype(dtype, device);
        if compute == dtype {
            return Ok(tensors);
        }
        tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(compute)?)))
            .collect()
    }
}

/// The dtype a forward over weights in `dtype` computes in on `device`: that dtype on an
/// accelerator; f32 on the CPU, whose kernels and matmuls are f32 (bf16 scoring took twice as
/// long there). Both stages compute alike, over the same rounded weights, so a CPU's reference
/// is the policy at step 0 and the first loss is ln 2.
pub fn compute_dtype(dtype: DType, device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        dtype
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
        let mut source = DataSource::resolve(&cfg.dataset, splits)?;
        source.max_row_bytes = data::max_row_bytes(cfg.tokenize.max_length);
        Ok((source, Self::open(cfg)?))
    }

    fn open(cfg: &Config) -> Result<Self> {
        let model = ModelSource::resolve(&cfg.model.id, &cfg.model.revision)?;
        let tokenizer =
            PairTokenizer::from_dir(&model.dir, cfg.tokenize.max_length, cfg.tokenize.truncation)?;
        tokenizer.check_vocabulary(&model.dir, model.cfg.vocab_size)?;
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
            model_config_sha256: self.model.config_sha256.clone(),
            tokenizer_config_sha256: self.tokenizer.tokenizer_config_sha256().to_string(),
            max_length: cfg.tokenize.max_length,
            truncation: cfg.tokenize.truncation,
            shard: None,
            dtype: cfg.model.dtype,
            refdpo_version: env!("CARGO_PKG_VERSION").to_string(),
            scoring: crate::cache::fingerprint::SCORING,
            // what stage one reads with the data: `precompute` fills the first two
            data_sha256: Default::default(),
            dataset_commit: String::new(),
            model_commit: self.model.commit.clone().unwrap_or_default(),
            shard_pairs: None,
        }
    }
}

/// `cached` with the fields a config declares set from `cfg` (the dataset, its revision, limit
/// and options; the model's id; the tokenization and the dtype): what a cache made under `cfg`
/// records, as far as that is known without reading the model or the data.
pub fn declared(cfg: &Config, cached: &Fingerprint) -> Fingerprint {
    Fingerprint {
        dataset_id: cfg.dataset.id.clone(),
        dataset_revision: hub::revision_label(&cfg.dataset.id, &cfg.dataset.revision),
        limit: cfg.dataset.limit,
        dataset_options: dataset_options(&cfg.dataset),
        model_id: cfg.model.id.clone(),
        max_length: cfg.tokenize.max_length,
        truncation: cfg.tokenize.truncation,
        dtype: cfg.model.dtype,
        ..cached.clone()
    }
}

/// What else decides a split's rows (`data_files`, `test_size`, the column, message-key and role
/// mappings); `None` when all are defaults, as caches made before these keys existed record it.
fn dataset_options(d: &crate::config::DatasetConfig) -> Option<DatasetOptions> {
    let defaults = crate::config::DatasetConfig::default();
    let is_default = d.data_files == defaults.data_files
        && d.test_size == defaults.test_size
        && d.columns == defaults.columns
        && d.message_keys == defaults.message_keys
        && d.roles == defaults.roles;
    (!is_default).then(|| DatasetOptions {
        data_files: d.data_files.clone(),
        test_size: d.test_size,
        columns: d.columns.clone(),
        message_keys: d.message_keys.clone(),
        roles: d.roles.clone(),
    })
}
