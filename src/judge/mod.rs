//! `refdpo judge` (SPEC, "Judging generations"): did DPO help, beyond length? A reward model
//! scores each prompt's reference and policy continuation from `generate`'s file, and the
//! split's own chosen/rejected pair of the same prompt (does the judge agree with the
//! annotators?); [`winrate`] turns the rewards and lengths into the win rate, its bootstrap
//! interval, the length-controlled win rate and the quintiles.

pub mod plot;
pub mod report;
pub mod score;
pub mod winrate;

use crate::config::{Config, Truncation};
use crate::data::{self, DataSource, PreferenceRow};
use crate::dirs::RunDir;
use crate::error::{fs, Error, Result};
use crate::generate::GenerationLine;
use crate::model::reward::RewardModel;
use crate::tokenize::PairTokenizer;
use candle_core::{DType, Device};
pub use report::{JudgeLine, Judgement};
use score::{Answer, Reader};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What `refdpo judge` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// A run: `<run>/generations-<split>.jsonl` is judged, `<run>/judge-<split>.jsonl` written.
    pub run: Option<PathBuf>,
    /// Or a generations file (judged beside itself).
    pub generations: Option<PathBuf>,
    /// Default: the test split.
    pub split: Option<String>,
    /// Hub id or directory of a `*ForSequenceClassification` model with one label.
    pub reward_model: String,
    pub out: Option<PathBuf>,
    pub plot: Option<PathBuf>,
    /// Bootstrap seed.
    pub seed: u64,
}

/// Reads a generations file; every line must hold the policy's continuation.
fn read_generations(path: &Path) -> Result<Vec<GenerationLine>> {
    if !path.exists() {
        return Err(Error::Config(format!(
            "no generations at `{}`: make them first with `refdpo generate --run RUN` (the \
             run's trained policy and the reference, on the split judged)",
            path.display()
        )));
    }
    let mut lines = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (n, line) in crate::generate::line::read_lines(path)? {
        if line.policy.is_none() {
            return Err(Error::Config(format!(
                "`{}` line {n}: no policy continuation to judge: generate with the trained \
                 policy (`refdpo generate --run DIR`)",
                path.display(),
            )));
        }
        let at = format!("`{}` line {n}", path.display());
        for (model, c) in [
            ("reference", Some(&line.reference)),
            ("policy", line.policy.as_ref()),
        ] {
            if let Some(c) = c.filter(|c| c.tokens != c.ids.len()) {
                return Err(Error::Config(format!(
                    "{at}: the {model} continuation counts {} tokens but holds {} ids: the file \
                     is edited or damaged; generate it again",
                    c.tokens,
                    c.ids.len()
                )));
            }
        }
        if !seen.insert(line.row) {
            return Err(Error::Config(format!(
                "{at}: row {} again: each prompt is judged once; generate the file again",
                line.row
            )));
        }
        lines.push(line);
    }
    if lines.is_empty() {
        return Err(Error::Config(format!(
            "`{}` holds no generations",
            path.display()
        )));
    }
    Ok(lines)
}

/// Each continuation's text is its ids as `generate` decoded them (the pipeline model's
/// tokenizer, special tokens left out): the reward model reads the text, so a text edited apart
/// from its ids would be judged as what the policy never wrote.
fn check_texts(cfg: &Config, path: &Path, lines: &[GenerationLine]) -> Result<()> {
    let dir = crate::hub::model(&cfg.model.id, &cfg.model.revision)?.dir;
    let tokenizer =
        PairTokenizer::from_dir(&dir, cfg.tokenize.max_length, cfg.tokenize.truncation)?.tokenizer;
    for (n, line) in lines.iter().enumerate() {
        for (model, c) in [
            ("reference", Some(&line.reference)),
            ("policy", line.policy.as_ref()),
        ] {
            let Some(c) = c else { continue };
            let decoded = tokenizer.decode(&c.ids, true).map_err(|e| {
                Error::Config(format!(
                    "`{}` line {}: the {model} continuation's ids do not decode ({e})",
                    path.display(),
                    n + 1
                ))
            })?;
            if decoded != c.text {
                return Err(Error::Config(format!(
                    "`{}` line {}: the {model} continuation's text is not its ids decoded by \
                     `{}`'s tokenizer: the file is edited, or was generated with another model; \
                     generate it again with this config",
                    path.display(),
                    n + 1,
                    dir.display()
                )));
            }
        }
    }
    Ok(())
}

/// The split's rows by row index, as `generate`'s cache read them.
fn split_rows(cfg: &Config, split: &str) -> Result<HashMap<u64, PreferenceRow>> {
    if cfg.demo.generate {
        data::demo::ensure(&cfg.demo)?;
    }
    let mut source = DataSource::resolve(&cfg.dataset, &[split])?;
    source.max_row_bytes = data::max_row_bytes(cfg.tokenize.max_length);
    let read = data::read_split(&source, split, cfg.dataset.limit)?;
    Ok(read.rows.into_iter().map(|r| (r.row, r)).collect())
}

/// Scores the generations of `opts` with the reward model and writes the per-prompt file (and
/// charts); returns the figures.
pub fn run(cfg: &Config, opts: &Options, device: &Device, quiet: bool) -> Result<Judgement> {
    if let Some(out) = &opts.out {
        crate::outputs::check_jsonl_out(out, |l| {
            serde_json::from_str::<report::JudgeLine>(l).is_ok()
        })?;
    }
    let split = opts
        .split
        .clone()
        .unwrap_or_else(|| cfg.dataset.test_split.clone());
    let generations = match (&opts.generations, &opts.run) {
        (Some(g), _) => g.clone(),
        (None, Some(run)) => RunDir::new(run).generations(&split),
        (None, None) => {
            return Err(Error::Config(
                "judge needs --run DIR or --generations FILE".into(),
            ))
        }
    };
    let out = opts.out.clone().unwrap_or_else(|| {
        generations
            .parent()
            .unwrap_or(Path::new(""))
            .join(format!("judge-{split}.jsonl"))
    });
    let lines = read_generations(&generations)?;
    if let Some(run) = &opts.run {
        crate::generate::line::check_current(&RunDir::new(run), &generations, &lines)?;
    }
    check_texts(cfg, &generations, &lines)?;
    let rows = split_rows(cfg, &split)?;

    let rm_dir = crate::hub::model(&opts.reward_model, "main")?.dir;
    let dtype = if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    };
    let model = RewardModel::load(&rm_dir, dtype, device)?;
    let reader = Reader {
        tokenizer: PairTokenizer::from_dir(
            &rm_dir,
            model.max_positions.min(1 << 20),
            Truncation::KeepStart,
        )?,
        max_positions: model.max_positions,
    };
    reader
        .tokenizer
        .check_vocabulary(&rm_dir, model.vocab_size())?;

    // Four sequences per prompt: reference, policy, chosen, rejected. A prompt with one longer
    // than the reward model reads is left out of every figure, counted.
    let mut seqs = Vec::with_capacity(lines.len() * 4);
    let mut kept = Vec::with_capacity(lines.len());
    for (i, g) in lines.iter().enumerate() {
        let row = rows.get(&g.row).ok_or_else(|| {
            Error::Config(format!(
                "`{}` line {}: row {} is not in split `{split}` of `{}` (limit {}): judge with \
                 the config the generations were made with",
                generations.display(),
                i + 1,
                g.row,
                cfg.dataset.id,
                cfg.dataset.limit
            ))
        })?;
        // A source without `prompt_id`s has stage one's hashes of the prompts in the cache.
        let row_id = crate::tokenize::pairs::prompt_id(row).unwrap_or_default();
        if row_id != g.prompt_id {
            return Err(Error::Config(format!(
                "`{}` line {}: prompt_id {} but row {} of split `{split}` has {}: the \
                 generations come from another dataset or split",
                generations.display(),
                i + 1,
                g.prompt_id,
                g.row,
                row_id
            )));
        }
        let policy = g.policy.as_ref().expect("checked when read");
        let four = [
            Answer::Text(&g.reference.text),
            Answer::Text(&policy.text),
            Answer::Chosen,
            Answer::Rejected,
        ]
        .into_iter()
        .map(|answer| reader.ids(row, answer))
        .collect::<Result<Vec<_>>>()?;
        if four.iter().all(|ids| reader.fits(ids)) {
            seqs.extend(four);
            kept.push(g);
        }
    }
    let too_long = lines.len() - kept.len();
    if kept.is_empty() {
        return Err(Error::Config(format!(
            "every prompt of `{}` is longer than the reward model reads ({} positions, its \
             max_position_embeddings): judge with a reward model of a longer context",
            generations.display(),
            reader.max_positions
        )));
    }
    let batch = cfg.precompute.batch_size.max(1);
    let r = score::score_all(&model, &seqs, batch, quiet)?;
    let judged = kept
        .iter()
        .zip(r.chunks(4))
        .map(|(g, r)| JudgeLine {
            row: g.row,
            prompt_id: g.prompt_id.clone(),
            reference_reward: r[0],
            policy_reward: r[1],
            reference_tokens: g.reference.tokens,
            policy_tokens: g.policy.as_ref().map_or(0, |p| p.tokens),
            win: winrate::win(r[1], r[0]),
            chosen_reward: r[2],
            rejected_reward: r[3],
        })
        .collect();
    let mut j = Judgement::of(
        judged,
        opts.seed,
        split,
        generations,
        opts.reward_model.clone(),
        out.clone(),
    );
    j.too_long = (too_long, reader.max_positions);
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    fs::write_atomic(&out, j.jsonl()?.as_bytes())?;
    if let Some(dir) = &opts.plot {
        plot::write_all(dir, &j)?;
    }
    Ok(j)
}
