//! Command-line flags (clap derive; doc comments are the help text). Nothing here is validated.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Offline DPO: cache the reference model's log-probs once, then train only the policy.
#[derive(Debug, Parser)]
#[command(name = "refdpo", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stage one: tokenize the dataset and cache the frozen reference's log-probs.
    Precompute {
        #[command(flatten)]
        run: RunArgs,
        /// Score only shard I of N of each split (0-based; one process per GPU or host);
        /// the same as `--set precompute.shard=I/N`.
        #[arg(long, value_name = "I/N")]
        shard: Option<String>,
    },
    /// Stage two: DPO-train the policy from the cached reference log-probs.
    Train {
        #[command(flatten)]
        run: RunArgs,
        /// Continue the run in `train.out` from its last checkpoint (optimizer and data order included).
        #[arg(long, conflicts_with = "overwrite")]
        resume: bool,
    },
    /// Pair statistics and length bias over a cache.
    Stats(StatsArgs),
    /// Check the device against the CPU f32 reference: fused ops, backward, a tiny model per family.
    Selftest {
        /// cpu, cuda or cuda:N (default: cuda if built with it and present, else cpu).
        #[arg(long)]
        device: Option<String>,
    },
    /// Training and eval curves of one or more runs, overlaid (one SVG per metric).
    Plot {
        /// A run directory (`train.out`); repeat for several.
        #[arg(long, required = true)]
        run: Vec<PathBuf>,
        /// Where the SVG files go.
        #[arg(long)]
        out: PathBuf,
    },
    /// Continue the split's prompts with the reference model (and, with --run, the trained policy).
    Generate(GenerateArgs),
    /// Score the reference's and the policy's generations with a reward model: win rate and
    /// length-controlled win rate.
    Judge(JudgeArgs),
    /// Fold a LoRA adapter into its base model and write a full HF checkpoint.
    Merge {
        /// The adapter: a LoRA run's `final/` or `checkpoint-N/`, or any PEFT LoRA adapter.
        #[arg(long)]
        adapter: PathBuf,
        /// Where the merged model goes (a new or empty directory).
        #[arg(long)]
        out: PathBuf,
        /// The base model (hub id or directory); default: the run's model, else the adapter's
        /// `base_model_name_or_path`.
        #[arg(long)]
        base: Option<String>,
        /// The base's hub revision; default: the run's `model.revision`, else the adapter's
        /// `revision` (for its own base), else main.
        #[arg(long)]
        revision: Option<String>,
    },
    /// Print one example as raw messages, rendered chat text and token counts.
    Show {
        #[command(flatten)]
        config: ConfigArgs,
        /// Row index in the source split.
        #[arg(long, default_value_t = 0)]
        index: usize,
        /// Which split (default: dataset.train_split).
        #[arg(long)]
        split: Option<String>,
    },
}

/// `--config FILE` plus `--set section.key=value` overrides.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Pipeline file (TOML).
    #[arg(long, short = 'c', default_value = crate::config::DEFAULT_PIPELINE)]
    pub config: PathBuf,
    /// Override a config key, e.g. `--set dataset.limit=64` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub dev: DeviceArgs,
    /// Delete another run's outputs (train) or a cache made from other inputs (precompute) in the
    /// output directory first, instead of refusing.
    #[arg(long)]
    pub overwrite: bool,
    /// Print where the time went, by phase (embedding, attention, MLP, norms, log-probs,
    /// backward, optimizer). Syncs the device at every phase boundary, so it runs slower.
    #[arg(long)]
    pub profile: bool,
}

/// Where a command runs, and whether it shows progress.
#[derive(Debug, Args)]
pub struct DeviceArgs {
    /// cpu, cuda or cuda:N (default: cuda if built with it and present, else cpu).
    #[arg(long)]
    pub device: Option<String>,
    /// No progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub dev: DeviceArgs,
    /// A training run (full or LoRA): its `final/` is the policy, generated beside the reference.
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// Which cache split's prompts (default: dataset.test_split).
    #[arg(long)]
    pub split: Option<String>,
    /// First N prompts (0 = all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// New tokens at most per prompt (a row also stops at an EOS token).
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Nucleus sampling: the most likely tokens holding this share of the probability (default:
    /// the model's `generation_config.json` `top_p`, else 1, as transformers).
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f64>,
    /// Sampling from the K most likely tokens only; 0 = all (default: the model's
    /// `generation_config.json` `top_k`, else 50, as transformers).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// transformers' repetition penalty, greedy too; 1 = none (default: the model's
    /// `generation_config.json` `repetition_penalty`, else 1).
    #[arg(long, allow_negative_numbers = true)]
    pub repetition_penalty: Option<f64>,
    /// Sampling seed (with each prompt's place in the split: the same continuation in any batch).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// JSONL output (default: <run>/generations-<split>.jsonl, else in the cache directory).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the generated-length chart into this directory.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct JudgeArgs {
    /// A training run: judges `<run>/generations-<split>.jsonl` (from `refdpo generate --run`)
    /// with the run's own config.
    #[arg(long, required_unless_present = "generations")]
    pub run: Option<PathBuf>,
    /// Or a generations file, with the pipeline file it was made from (--config).
    #[arg(long, requires = "config")]
    pub generations: Option<PathBuf>,
    /// Pipeline file (TOML); default with --run: the run's `config.toml`.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. `--set dataset.limit=64` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
    /// The reward model (hub id or directory): a `*ForSequenceClassification` checkpoint with
    /// one label, read with its own tokenizer and chat template.
    #[arg(long)]
    pub reward_model: String,
    /// Which split's generations (default: dataset.test_split).
    #[arg(long)]
    pub split: Option<String>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// One line per prompt (default: `judge-<split>.jsonl` beside the generations).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write SVG charts into this directory.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Seed of the win rate's bootstrap interval.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub dev: DeviceArgs,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// A cache directory (its train split) or one `<split>.parquet`.
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Or a pipeline file: its `precompute.out` and train split.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Overrides for `--config`.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Which split of a cache directory (default: the train split).
    #[arg(long)]
    pub split: Option<String>,
    /// A training run directory: score its final policy on the split `--split` names (the train
    /// split by default; `--split test_prefs` for held-out pairs), for the length bias after training.
    /// The run's own `config.toml` sets the model, β and tokenization; `--config` and `--set`
    /// only choose the cache.
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Write SVG charts into this directory.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// cpu, cuda or cuda:N, for `--run`.
    #[arg(long)]
    pub device: Option<String>,
}
