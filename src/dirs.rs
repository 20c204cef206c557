//! Every file name of a cache directory ([`CacheDir`]) and of a run directory ([`RunDir`]), in
//! one place: the stages build paths through these, never by formatting names themselves.

use crate::config::Shard;
use std::path::{Path, PathBuf};

/// A stage-one output directory (`precompute.out`, `train.cache`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheDir(pub PathBuf);

impl CacheDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self(root.into())
    }

    pub fn root(&self) -> &Path {
        &self.0
    }

    /// The file stem of a split, or of shard i of n of it (`train_prefs.shard-0-of-4`).
    pub fn stem(split: &str, shard: Shard) -> String {
        if shard.is_whole() {
            split.to_string()
        } else {
            format!("{split}.shard-{}-of-{}", shard.index, shard.count)
        }
    }

    /// The shard a file name of `split` with extension `ext` holds, if it is one.
    pub fn shard_of(name: &str, split: &str, ext: &str) -> Option<Shard> {
        let rest = name
            .strip_prefix(split)?
            .strip_prefix(".shard-")?
            .strip_suffix(ext)?
            .strip_suffix('.')?;
        let (i, n) = rest.split_once("-of-")?;
        let shard = Shard::parse(&format!("{i}/{n}")).ok()?;
        // only the name refdpo writes (`01` or `+1` is another file, not this shard again)
        (format!("{}-of-{}", shard.index, shard.count) == rest).then_some(shard)
    }

    /// `<stem>.parquet`
    pub fn parquet(&self, stem: &str) -> PathBuf {
        self.0.join(format!("{stem}.parquet"))
    }

    /// `<stem>.arrow`
    pub fn arrow(&self, stem: &str) -> PathBuf {
        self.0.join(format!("{stem}.arrow"))
    }

    /// `report.json`, or a shard's `report.shard-<i>-of-<n>.json`.
    pub fn report(&self, shard: Shard) -> PathBuf {
        self.0.join(Self::report_name(shard))
    }

    fn report_name(shard: Shard) -> String {
        match shard.is_whole() {
            true => "report.json".into(),
            false => format!("report.shard-{}-of-{}.json", shard.index, shard.count),
        }
    }

    /// The report beside a split's Parquet file (whole or a shard's).
    pub fn report_beside(parquet: &Path, split: &str) -> PathBuf {
        let name = parquet
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let shard = Self::shard_of(name, split, "parquet").unwrap_or_default();
        parquet.with_file_name(Self::report_name(shard))
    }

    /// The lock name of a stage-one process (each shard holds its own).
    pub fn lock_name(shard: Shard) -> String {
        match shard.is_whole() {
            true => "precompute".into(),
            false => format!("precompute.shard-{}-of-{}", shard.index, shard.count),
        }
    }

    /// `config.toml`: the resolved configuration the cache was made with.
    pub fn config(&self) -> PathBuf {
        self.0.join("config.toml")
    }

    /// `.partial-<stem>/`: the finished chunks of an unfinished split.
    pub fn partial(&self, stem: &str) -> PathBuf {
        self.0.join(format!(".partial-{stem}"))
    }

    /// Chunk `c` of a partial split.
    pub fn chunk(partial: &Path, c: usize) -> PathBuf {
        partial.join(format!("chunk-{c:05}.arrow"))
    }

    /// The partial split's fingerprint.
    pub fn partial_fingerprint(partial: &Path) -> PathBuf {
        partial.join("fingerprint.json")
    }

    /// `generations-<split>.jsonl` (`generate` without a run writes beside the cache).
    pub fn generations(&self, split: &str) -> PathBuf {
        self.0.join(generations_name(split))
    }
}

fn generations_name(split: &str) -> String {
    format!("generations-{split}.jsonl")
}

/// A stage-two output directory (`train.out`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub const LOCK: &'static str = "train";
    pub(crate) const METRICS: &'static str = "metrics.jsonl";
    pub(crate) const CONFIG: &'static str = "config.toml";
    const FINAL: &'static str = "final";
    const CHECKPOINT: &'static str = "checkpoint-";
    const TENSORBOARD: &'static str = "runs";

    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self(root.into())
    }

    pub fn root(&self) -> &Path {
        &self.0
    }

    /// `metrics.jsonl`
    pub fn metrics(&self) -> PathBuf {
        self.0.join(Self::METRICS)
    }

    /// `config.toml`: the run's resolved configuration.
    pub fn config(&self) -> PathBuf {
        self.0.join(Self::CONFIG)
    }

    /// `runs/`: TensorBoard event files (`train.report_to = ["tensorboard"]`).
    pub fn tensorboard(&self) -> PathBuf {
        self.0.join(Self::TENSORBOARD)
    }

    /// `final/`
    pub fn final_dir(&self) -> PathBuf {
        self.0.join(Self::FINAL)
    }

    /// `checkpoint-<step>/`
    pub fn checkpoint(&self, step: u64) -> PathBuf {
        self.0.join(format!("{}{step}", Self::CHECKPOINT))
    }

    /// The step of a `checkpoint-<step>` name.
    pub fn checkpoint_step(name: &str) -> Option<u64> {
        name.strip_prefix(Self::CHECKPOINT)?.parse().ok()
    }

    /// Whether a directory entry is one of a run's outputs (or its temporary or old copy),
    /// `generate`'s and `judge`'s files of its policy included.
    pub fn is_output(name: &str) -> bool {
        let base = name
            .strip_suffix(".tmp")
            .or_else(|| name.strip_suffix(".old"))
            .unwrap_or(name);
        let of_policy = |prefix: &str| {
            base.strip_prefix(prefix)
                .is_some_and(|rest| rest.ends_with(".jsonl"))
        };
        matches!(
            base,
            Self::CONFIG | Self::METRICS | Self::FINAL | Self::TENSORBOARD
        ) || Self::checkpoint_step(base).is_some()
            || of_policy("generations-")
            || of_policy("judge-")
    }

    /// `trainer_state.json` of a checkpoint.
    pub fn trainer_state(checkpoint: &Path) -> PathBuf {
        checkpoint.join("trainer_state.json")
    }

    /// `training_config.toml` of a checkpoint: the resolved configuration that trained it (the
    /// run's `config.toml` is its latest start's).
    pub fn training_config(checkpoint: &Path) -> PathBuf {
        checkpoint.join("training_config.toml")
    }

    /// `optimizer.safetensors` of a checkpoint.
    pub fn optimizer(checkpoint: &Path) -> PathBuf {
        checkpoint.join("optimizer.safetensors")
    }

    /// `generations-<split>.jsonl`
    pub fn generations(&self, split: &str) -> PathBuf {
        self.0.join(generations_name(split))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let s = Shard { index: 2, count: 4 };
        assert_eq!(CacheDir::stem("train_prefs", s), "train_prefs.shard-2-of-4");
        assert_eq!(
            CacheDir::stem("train_prefs", Shard::default()),
            "train_prefs"
        );
        assert_eq!(
            CacheDir::shard_of("train_prefs.shard-2-of-4.arrow", "train_prefs", "arrow"),
            Some(s)
        );
        assert_eq!(
            CacheDir::shard_of("train_prefs.shard-4-of-4.arrow", "train_prefs", "arrow"),
            None
        );
        // a name refdpo never writes is no shard (fuzzer: a copy named `01` was read as shard 1
        // again)
        for odd in ["shard-02-of-4", "shard-2-of-04", "shard-+2-of-4"] {
            let name = format!("train_prefs.{odd}.arrow");
            assert_eq!(
                CacheDir::shard_of(&name, "train_prefs", "arrow"),
                None,
                "{odd}"
            );
        }
        let c = CacheDir::new("c");
        assert_eq!(
            CacheDir::report_beside(&c.parquet("t.shard-1-of-2"), "t"),
            Path::new("c/report.shard-1-of-2.json")
        );
        assert_eq!(
            CacheDir::report_beside(&c.parquet("t"), "t"),
            Path::new("c/report.json")
        );
        assert_eq!(c.report(s), Path::new("c/report.shard-2-of-4.json"));
        assert_eq!(CacheDir::lock_name(s), "precompute.shard-2-of-4");
        let r = RunDir::new("r");
        assert_eq!(RunDir::checkpoint_step("checkpoint-32"), Some(32));
        assert_eq!(r.checkpoint(32), Path::new("r/checkpoint-32"));
        for name in [
            "config.toml",
            "metrics.jsonl",
            "final",
            "checkpoint-32",
            "checkpoint-64.old",
            "final.tmp",
            "runs",
            "generations-test_prefs.jsonl",
            "judge-test_prefs.jsonl.tmp",
        ] {
            assert!(RunDir::is_output(name), "{name}");
        }
        for name in [
            "checkpoint-x",
            "notes.txt",
            ".refdpo-train.lock",
            "generations.txt",
        ] {
            assert!(!RunDir::is_output(name), "{name}");
        }
    }
}
