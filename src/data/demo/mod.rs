//! The embedded default: a deterministic preference dataset in the exact
//! `HuggingFaceH4/ultrafeedback_binarized` layout, a word-level tokenizer with a ChatML template, and
//! a tiny Llama in HF layout — generated with no network, then read through the same code as hub data.
//!
//! The preference is learnable by a tiny model: chosen answers are built from "helpful" words,
//! rejected ones from "dismissive" words, so the policy can raise one vocabulary and lower the other;
//! chosen answers are also longer on average (the length bias real data has), and a few rows are
//! malformed on purpose so `report.json` shows counted skips. A reward model with hand-set weights
//! ([`reward`]) scores the share of helpful over dismissive words, for `make judge`.

pub mod reward;

use crate::config::DemoConfig;
use crate::error::{fs, Error, Result};
use crate::model::init;
use crate::outputs::Building;
use crate::rng::SplitMix;
use arrow::array::{ArrayRef, Float64Array, ListArray, RecordBatch, StringArray, StructArray};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Fields, Schema};
use parquet::arrow::ArrowWriter;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bump when the generated assets change, so old demo directories are regenerated.
const GENERATOR_VERSION: u32 = 2;

const TOPICS: &[&str] = &[
    "cats",
    "rivers",
    "bread",
    "stars",
    "trains",
    "gardens",
    "music",
    "bridges",
    "clouds",
    "forests",
    "oceans",
    "coffee",
    "books",
    "mountains",
    "bicycles",
    "bees",
    "glass",
    "winter",
    "maps",
    "clocks",
    "lamps",
    "boats",
    "tea",
    "robots",
    "islands",
    "paint",
    "wolves",
    "honey",
    "rain",
    "chess",
];
const ASKS: &[&str] = &[
    "tell me about",
    "explain",
    "what do you know about",
    "describe",
    "can you help me understand",
    "give me facts about",
    "write a note on",
    "teach me about",
];
const GOOD: &[&str] = &[
    "certainly",
    "here",
    "is",
    "a",
    "clear",
    "answer",
    "about",
    "detail",
    "helpful",
    "step",
    "first",
    "second",
    "example",
    "because",
    "useful",
    "kindly",
    "happy",
    "to",
    "help",
    "careful",
    "accurate",
    "explained",
    "together",
    "learn",
    "more",
    "summary",
    "good",
    "question",
    "thanks",
];
const BAD: &[&str] = &[
    "whatever",
    "no",
    "idea",
    "boring",
    "not",
    "my",
    "problem",
    "go",
    "away",
    "stop",
    "asking",
    "meh",
    "ugh",
    "dunno",
    "nothing",
    "pointless",
    "later",
    "busy",
    "ignore",
    "wrong",
    "bad",
    "lazy",
    "skip",
];
const PUNCT: &[&str] = &[".", ",", "!", "?"];
const SPECIAL: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"];
const ROLES: &[&str] = &["system", "user", "assistant"];

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Every word the tokenizer knows, special tokens first.
fn vocabulary() -> Vec<String> {
    let mut words: Vec<String> = SPECIAL.iter().chain(ROLES).map(|s| s.to_string()).collect();
    for w in TOPICS
        .iter()
        .chain(GOOD)
        .chain(BAD)
        .chain(PUNCT)
        .flat_map(|s| s.split(' '))
        .chain(ASKS.iter().flat_map(|s| s.split(' ')))
    {
        if !words.iter().any(|x| x == w) {
            words.push(w.to_string());
        }
    }
    words
}

/// Each demo token id's polarity, as the reward model's embedding holds it ([`reward::formula`]).
pub fn reward_polarity() -> Vec<f32> {
    polarity(&vocabulary())
}

/// Each vocabulary word's polarity: +1 helpful (a chosen answer's word), −1 dismissive, else 0.
fn polarity(vocab: &[String]) -> Vec<f32> {
    vocab
        .iter()
        .map(|w| {
            if GOOD.contains(&w.as_str()) {
                1.0
            } else if BAD.contains(&w.as_str()) {
                -1.0
            } else {
                0.0
            }
        })
        .collect()
}

fn sentence(rng: &mut SplitMix, topic: &str, words: &[&str], len: usize) -> String {
    let mut out = vec![topic.to_string()];
    for k in 0..len {
        out.push(rng.pick(words).to_string());
        if k % 6 == 5 {
            out.push(rng.pick(PUNCT).to_string());
        }
    }
    out.push(".".into());
    out.join(" ")
}

struct Row {
    prompt: String,
    chosen: String,
    rejected: String,
    score_chosen: f64,
    score_rejected: f64,
}

fn rows(seed: u64, n: usize) -> Vec<Row> {
    let mut rng = SplitMix::new(seed);
    (0..n)
        .map(|i| {
            let topic = rng.pick(TOPICS);
            let prompt = format!("{} {topic} ?", rng.pick(ASKS));
            let chosen_len = 6 + rng.below(14);
            let rejected_len = 4 + rng.below(12);
            let mut chosen = sentence(&mut rng, topic, GOOD, chosen_len);
            let mut rejected = sentence(&mut rng, topic, BAD, rejected_len);
            // A few malformed rows, so the report shows counted skips.
            match i % 97 {
                13 => chosen = " ".into(),
                41 => rejected = chosen.clone(),
                _ => {}
            }
            let score_chosen = 6.0 + rng.below(5) as f64;
            let tie = rng.unit() < 0.05;
            let score_rejected = if tie {
                score_chosen
            } else {
                1.0 + rng.below(5) as f64
            };
            Row {
                prompt,
                chosen,
                rejected,
                score_chosen,
                score_rejected,
            }
        })
        .collect()
}

/// list<struct<content, role>> of [user, assistant] conversations.
fn conversations(rows: &[Row], answer: impl Fn(&Row) -> &str) -> ArrayRef {
    let fields = Fields::from(vec![
        Field::new("content", DataType::Utf8, true),
        Field::new("role", DataType::Utf8, true),
    ]);
    let contents: Vec<&str> = rows
        .iter()
        .flat_map(|r| [r.prompt.as_str(), answer(r)])
        .collect();
    let roles: Vec<&str> = rows.iter().flat_map(|_| ["user", "assistant"]).collect();
    let values = StructArray::new(
        fields.clone(),
        vec![
            Arc::new(StringArray::from(contents)) as ArrayRef,
            Arc::new(StringArray::from(roles)) as ArrayRef,
        ],
        None,
    );
    let item = Arc::new(Field::new("item", DataType::Struct(fields), true));
    Arc::new(ListArray::new(
        item,
        OffsetBuffer::from_lengths(std::iter::repeat_n(2, rows.len())),
        Arc::new(values),
        None,
    ))
}

fn write_split(path: &Path, rows: &[Row]) -> Result<()> {
    let prompt_ids: Vec<String> = rows
        .iter()
        .map(|r| format!("{:x}", Sha256::digest(r.prompt.as_bytes())))
        .collect();
    let cols: Vec<(&str, ArrayRef)> = vec![
        (
            "prompt",
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.prompt.as_str()),
            )),
        ),
        ("prompt_id", Arc::new(StringArray::from(prompt_ids))),
        ("chosen", conversations(rows, |r| &r.chosen)),
        ("rejected", conversations(rows, |r| &r.rejected)),
        ("messages", conversations(rows, |r| &r.chosen)),
        (
            "score_chosen",
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.score_chosen),
            )),
        ),
        (
            "score_rejected",
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.score_rejected),
            )),
        ),
    ];
    let schema = Arc::new(Schema::new(
        cols.iter()
            .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ));
    let batch = RecordBatch::try_new(schema.clone(), cols.into_iter().map(|(_, a)| a).collect())?;
    let file = std::fs::File::create(path).map_err(|e| Error::io("cannot create", path, e))?;
    let mut w = ArrowWriter::try_new(file, schema, None)?;
    w.write(&batch)?;
    w.close()?;
    Ok(())
}

fn tokenizer_json(vocab: &[String]) -> serde_json::Value {
    let added: Vec<_> = SPECIAL
        .iter()
        .enumerate()
        .map(|(id, t)| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let map: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), json!(i)))
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordLevel", "vocab": map, "unk_token": "[UNK]"}
    })
}

/// Generates the demo assets into `cfg.dir` unless an identical generation is already there.
pub fn ensure(cfg: &DemoConfig) -> Result<()> {
    let stamp = json!({"generator": GENERATOR_VERSION, "seed": cfg.seed,
                       "train_rows": cfg.train_rows, "test_rows": cfg.test_rows});
    let stamp_path = cfg.dir.join("demo.json");
    let made = || {
        crate::error::fs::read_to_string(&stamp_path).is_ok_and(|t| {
            serde_json::from_str::<serde_json::Value>(&t).ok() == Some(stamp.clone())
        })
    };
    if made() {
        return Ok(());
    }
    replaceable(&cfg.dir)?;
    // Another process generating them (two commands started together): wait for it, then
    // find them made; the generation is deterministic, so either one's is the same.
    let started = std::time::Instant::now();
    let building = loop {
        match Building::start(&cfg.dir, "demo") {
            Err(Error::Locked { .. }) if started.elapsed().as_secs() < 600 => {
                std::thread::sleep(std::time::Duration::from_millis(100))
            }
            b => break b?,
        }
    };
    if made() {
        building.abandon();
        return Ok(());
    }
    let generated = generate(cfg, &stamp, building.path());
    if generated.is_err() {
        building.abandon();
        return generated;
    }
    if let Some(parent) = cfg.dir.parent() {
        fs::create_dir_all(parent)?;
    }
    if cfg.dir.exists() {
        // an earlier demo's folder holds only what a demo makes: a file put inside it (notes in
        // `model/`) is the user's, not the demo's to delete
        let made = files_under(building.path());
        if let Some(other) = files_under(&cfg.dir)
            .into_iter()
            .find(|f| !made.contains(f))
        {
            building.abandon();
            return Err(Error::Config(format!(
                "demo.dir `{}` holds `{}`, which the demo did not make: generating the demo \
                 would replace that folder. Set demo.dir to a new folder, or move the file out \
                 (or delete the folder, if all of it is an older demo's)",
                cfg.dir.display(),
                other.display()
            )));
        }
        std::fs::remove_dir_all(&cfg.dir).map_err(|e| Error::io("cannot replace", &cfg.dir, e))?;
    }
    building.publish(&cfg.dir)
}

/// What a demo folder holds: a folder with anything else is not refdpo's to replace.
const DEMO_ENTRIES: [&str; 4] = ["dataset", "model", "reward_model", "demo.json"];

/// Files a desktop's file manager leaves in a folder it has shown (macOS Finder's `.DS_Store`
/// and `._*`, Windows Explorer's `Thumbs.db` and `desktop.ini`): not the user's work, so they
/// do not keep an earlier demo's folder from being replaced.
fn litter(name: &str) -> bool {
    matches!(name, ".DS_Store" | "Thumbs.db" | "desktop.ini") || name.starts_with("._")
}

/// Refuses to replace `dir` unless it is absent, empty, or an earlier demo's folder (its
/// `demo.json` stamp and nothing but the demo's own entries): `demo.dir` set to a model, a data
/// folder or `.` must not be deleted to make room for the demo.
fn replaceable(dir: &Path) -> Result<()> {
    let refuse = |why: String| {
        Err(Error::Config(format!(
            "demo.dir `{}` {why}: generating the demo would replace that folder. Set demo.dir \
             to a new folder (or an earlier demo's), or set demo.generate = false",
            dir.display()
        )))
    };
    if !dir.exists() {
        return Ok(());
    }
    if !dir.is_dir() {
        return refuse("exists and is not a folder".into());
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io("cannot read", dir, e))? {
        let entry = entry.map_err(|e| Error::io("cannot read", dir, e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    if names.is_empty() {
        return Ok(());
    }
    names.retain(|n| !litter(n));
    if names.is_empty() {
        return Ok(());
    }
    if let Some(other) = names.iter().find(|n| !DEMO_ENTRIES.contains(&n.as_str())) {
        return refuse(format!("holds `{other}`, which the demo did not make"));
    }
    let stamped = crate::error::fs::read_to_string(dir.join("demo.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v.get("generator").is_some());
    if !stamped {
        return refuse("has no demo stamp (`demo.json`) of an earlier demo".into());
    }
    Ok(())
}

/// Every file and link below `dir` (relative to it; links not followed), refdpo's lock files
/// and a file manager's [`litter`] left out.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(at) = todo.pop() {
        for entry in std::fs::read_dir(&at).into_iter().flatten().flatten() {
            let path = entry.path();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_dir {
                todo.push(path);
            } else if !(name.starts_with(".refdpo-") && name.ends_with(".lock") || litter(&name)) {
                found.push(path.strip_prefix(dir).unwrap_or(&path).to_path_buf());
            }
        }
    }
    found
}

/// The demo assets into `tmp`, `demo.json` last.
fn generate(cfg: &DemoConfig, stamp: &serde_json::Value, tmp: &Path) -> Result<()> {
    let (data, model) = (tmp.join("dataset/data"), tmp.join("model"));
    fs::create_dir_all(&data)?;
    fs::create_dir_all(&model)?;
    write_split(
        &data.join("train_prefs-00000-of-00001.parquet"),
        &rows(cfg.seed, cfg.train_rows),
    )?;
    write_split(
        &data.join("test_prefs-00000-of-00001.parquet"),
        &rows(cfg.seed ^ 0x7e57, cfg.test_rows),
    )?;

    let vocab = vocabulary();
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).expect("json");
    fs::write_atomic(
        &model.join("tokenizer.json"),
        pretty(&tokenizer_json(&vocab)).as_bytes(),
    )?;
    let tok_cfg = json!({
        "chat_template": CHATML,
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "[UNK]",
        "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": false
    });
    fs::write_atomic(
        &model.join("tokenizer_config.json"),
        pretty(&tok_cfg).as_bytes(),
    )?;
    init::write_model(
        &model,
        &init::tiny_llama_config(vocab.len()),
        cfg.seed,
        0.02,
    )?;
    // The reward model reads text with the same tokenizer and template.
    let rm = tmp.join("reward_model");
    fs::create_dir_all(&rm)?;
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        fs::write_atomic(&rm.join(f), &fs::read(model.join(f))?)?;
    }
    reward::write(&rm, &polarity(&vocab))?;
    fs::write_atomic(&tmp.join("demo.json"), pretty(stamp).as_bytes())
}

#[cfg(test)]
mod tests;
