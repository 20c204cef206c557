//! Users' own data against TRL 1.16: the same 24 real UltraFeedback pairs written in each of
//! TRL's layouts (conversational or standard, explicit or implicit prompt), in JSON Lines, JSON
//! and Parquet files, plus a multi-turn ShareGPT-style file read through `dataset.columns`,
//! `message_keys` and `roles`. Token ids must equal what TRL's own `_prepare_dataset` stores, and
//! reference log-probs (the formula-initialized fixture Llama) TRL's `precompute_ref_log_probs`
//! within 1e-4 relative (tests/fixtures/trl_layouts.json, made by gen_layout_fixtures.py). The
//! files are written here from ../shared/realdata at test time; only numbers are committed.

use super::{close, fixture, ids, model_config, real_rows};
use crate::common::realdata;
use arrow::array::{ArrayRef, StringArray};
use arrow::record_batch::RecordBatch;
use candle_core::Device;
use refdpo::config::{Columns, DatasetConfig, MessageKeys, Role, Truncation};
use refdpo::data::{DataSource, Turns};
use refdpo::logprobs;
use refdpo::model::{init, Transformer, TransformerConfig};
use refdpo::tokenize::PairTokenizer;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;

fn msg(role: &str, content: &str) -> Value {
    json!({"role": role, "content": content})
}

fn write_jsonl(path: &Path, records: &[Value]) {
    let text: Vec<String> = records.iter().map(Value::to_string).collect();
    std::fs::write(path, text.join("\n") + "\n").unwrap();
}

fn write_parquet(path: &Path, columns: &[(&str, Vec<String>)]) {
    let arrays: Vec<(&str, ArrayRef)> = columns
        .iter()
        .map(|(n, v)| (*n, Arc::new(StringArray::from(v.clone())) as ArrayRef))
        .collect();
    let batch = RecordBatch::try_from_iter(arrays).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

#[test]
#[cfg_attr(realdata_absent, ignore = "needs ../shared/realdata")]
fn every_layout_tokenizes_as_trl_does() {
    let real = realdata();
    let fx = fixture("trl_layouts.json");
    let tmp = tempfile::tempdir().unwrap();
    let rows = real_rows(&real, 24);
    assert_eq!(rows.len(), 24);
    // (user question, chosen answer, rejected answer) of each source row
    let parts: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| {
            let (Some(Turns::Messages(c)), Some(Turns::Messages(rj))) = (&r.chosen, &r.rejected)
            else {
                panic!("UltraFeedback rows are conversations")
            };
            (
                c[0].content.text(),
                c[1].content.text(),
                rj[1].content.text(),
            )
        })
        .collect();
    let d = tmp.path();
    let mut layouts: Vec<(&str, std::path::PathBuf, DatasetConfig)> = Vec::new();
    let plain = |file: &Path| DatasetConfig {
        id: file.to_string_lossy().into_owned(),
        ..DatasetConfig::default()
    };

    let f = d.join("conversational_explicit.jsonl");
    let recs: Vec<Value> = parts
        .iter()
        .map(|(q, c, r)| json!({"prompt": [msg("user", q)], "chosen": [msg("assistant", c)], "rejected": [msg("assistant", r)]}))
        .collect();
    write_jsonl(&f, &recs);
    layouts.push(("conversational_explicit", f.clone(), plain(&f)));

    let f = d.join("conversational_implicit.json");
    let recs: Vec<Value> = parts
        .iter()
        .map(|(q, c, r)| json!({"chosen": [msg("user", q), msg("assistant", c)], "rejected": [msg("user", q), msg("assistant", r)]}))
        .collect();
    std::fs::write(&f, Value::Array(recs).to_string()).unwrap();
    layouts.push(("conversational_implicit", f.clone(), plain(&f)));

    let f = d.join("standard_explicit.parquet");
    let col = |i: usize| -> Vec<String> {
        parts
            .iter()
            .map(|p| [&p.0, &p.1, &p.2][i].clone())
            .collect()
    };
    write_parquet(
        &f,
        &[("prompt", col(0)), ("chosen", col(1)), ("rejected", col(2))],
    );
    layouts.push(("standard_explicit", f.clone(), plain(&f)));

    let f = d.join("standard_implicit.jsonl");
    let recs: Vec<Value> = parts
        .iter()
        .map(|(q, c, r)| json!({"chosen": format!("{q} {c}"), "rejected": format!("{q} {r}")}))
        .collect();
    write_jsonl(&f, &recs);
    layouts.push(("standard_implicit", f.clone(), plain(&f)));

    // Multi-turn, ShareGPT names: a system turn, row a's exchange, then row b's question.
    let f = d.join("multi_turn_sharegpt.jsonl");
    let sg = |from: &str, value: &str| json!({"from": from, "value": value});
    let recs: Vec<Value> = parts
        .chunks(2)
        .map(|ab| {
            let ((qa, ca, _), (qb, cb, rb)) = (&ab[0], &ab[1]);
            json!({
                "conversations": [sg("system", "You are a helpful assistant."), sg("human", qa), sg("gpt", ca), sg("human", qb)],
                "chosen": sg("gpt", cb),
                "rejected": sg("gpt", rb),
            })
        })
        .collect();
    write_jsonl(&f, &recs);
    let sharegpt = DatasetConfig {
        columns: Columns {
            prompt: Some("conversations".into()),
            ..Columns::default()
        },
        message_keys: MessageKeys {
            role: Some("from".into()),
            content: Some("value".into()),
        },
        roles: [("human", Role::User), ("gpt", Role::Assistant)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        ..plain(&f)
    };
    layouts.push(("multi_turn", f.clone(), sharegpt));

    // The fixture Llama (the formula's weights, f32) that TRL scored the same ids with.
    let mcfg = TransformerConfig::from_json(&model_config(&fx).to_string()).unwrap();
    let weights = init::init_weights(
        &mcfg,
        fx["model"]["seed"].as_u64().unwrap(),
        fx["model"]["init_std"].as_f64().unwrap(),
    )
    .unwrap();
    let model = Transformer::new(&mcfg, &weights).unwrap();
    let tok = PairTokenizer::from_dir(
        &real.join("tokenizers/smollm2-135m"),
        4096,
        Truncation::KeepStart,
    )
    .unwrap();
    for (name, file, cfg) in layouts {
        let source = DataSource::resolve(&cfg, &[&cfg.train_split.clone()]).unwrap();
        let read = refdpo::data::read_split(&source, &cfg.train_split, 0).unwrap();
        assert!(read.skipped.is_empty(), "{name}: {:?}", read.skipped);
        let (pairs, skipped): (Vec<_>, Vec<_>) = tok
            .tokenize_batch(&read.rows)
            .into_iter()
            .partition(Result::is_ok);
        let pairs: Vec<_> = pairs.into_iter().map(Result::unwrap).collect();
        assert!(
            skipped.is_empty(),
            "{name} ({}): {skipped:?}",
            file.display()
        );
        let want = fx["layouts"][name].as_array().unwrap();
        assert_eq!(pairs.len(), want.len(), "{name}");
        for (got, want) in pairs.iter().zip(want) {
            let row = got.row;
            assert_eq!(
                got.prompt_ids,
                ids(&want["prompt_ids"]),
                "{name} row {row} prompt"
            );
            assert_eq!(
                got.chosen_ids,
                ids(&want["chosen_ids"]),
                "{name} row {row} chosen"
            );
            assert_eq!(
                got.rejected_ids,
                ids(&want["rejected_ids"]),
                "{name} row {row} rejected"
            );
            assert!(!got.chosen_truncated && !got.rejected_truncated);
            assert_eq!(
                got.prompt_id.len(),
                64,
                "{name}: a SHA-256 prompt_id without the column"
            );
        }
        // Reference log-probs of the first 6 pairs (CPU time), 3 pairs a forward.
        for (chunk, want) in pairs[..6].chunks(3).zip(want[..6].chunks(3)) {
            let ids: Vec<_> = chunk
                .iter()
                .map(|p| (&p.prompt_ids[..], &p.chosen_ids[..], &p.rejected_ids[..]))
                .collect();
            let got =
                logprobs::score_pairs(&model, &ids, 4096, Truncation::KeepStart, &Device::Cpu)
                    .unwrap();
            for ((c, r), w) in got.iter().zip(want) {
                let (wc, wr) = (
                    w["ref_chosen_logps"].as_f64().unwrap(),
                    w["ref_rejected_logps"].as_f64().unwrap(),
                );
                assert!(
                    close(*c, wc, 1e-4) && close(*r, wr, 1e-4),
                    "{name}: ({c}, {r}) vs TRL ({wc}, {wr})"
                );
            }
        }
    }
}

/// What a chat template sees of a row besides `role` and `content`, as TRL 1.16 passes it to
/// transformers 5.24 (tests/fixtures/template_inputs.json, made by
/// gen_template_inputs_fixtures.py): the `tools` column (a list, or a JSON string of one), the
/// `chat_template_kwargs` column (Qwen3's `enable_thinking`, any variable), each message whole
/// (`tool_calls`, `name`, reasoning fields under transformers' aliases) and every named special
/// token the tokenizer sets, a `content` given as a list of parts (Gemma 3's template reads
/// them; one that prints the list prints Python's repr, as every list, dict and float a template
/// prints). The rendered prompt and prompt + chosen equal transformers' texts; where transformers
/// raises (SmolLM2's template adds a list to a string), refdpo's rendering fails too.
#[test]
fn rows_with_tools_and_template_kwargs_render_like_trl() {
    let fx = super::fixture("template_inputs.json");
    let mapping = refdpo::data::Mapping::new(&refdpo::config::DatasetConfig::default());
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 9);
    let mut errors = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            case["tokenizer_config"].to_string(),
        )
        .unwrap();
        let t = refdpo::tokenize::ChatTemplate::from_dir(dir.path()).unwrap();
        let row = mapping
            .row(0, None, case["row"].as_object().unwrap())
            .unwrap_or_else(|r| panic!("{name}: skipped as {}", r.as_str()));
        let Ok(refdpo::tokenize::pairs::Pair::Chat(conv)) =
            refdpo::tokenize::pairs::split_pair(&row, t.eos_token())
        else {
            panic!("{name}: not a conversational pair")
        };
        let prompt = t.render_with(conv.prompt, true, &row.template);
        let full = [conv.prompt, conv.chosen].concat();
        let full = t.render_with(&full, false, &row.template);
        if let Some(error) = case.get("error") {
            // transformers raised (TRL fails on the row): a `template_error` skip here
            assert!(
                prompt.is_err() && full.is_err(),
                "{name}: {error} in transformers"
            );
            errors += 1;
            continue;
        }
        assert_eq!(
            prompt.unwrap(),
            case["prompt_text"].as_str().unwrap(),
            "{name}"
        );
        assert_eq!(
            full.unwrap(),
            case["prompt_chosen_text"].as_str().unwrap(),
            "{name}"
        );
    }
    assert_eq!(errors, 1, "SmolLM2's `+` on a list of parts");
}
