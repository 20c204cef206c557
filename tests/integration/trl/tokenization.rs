//! Stage one against TRL: token ids byte-identical, log-probs within 1e-4 relative, chat templates
//! rendered as transformers renders them.

use super::{close, fixture, ids, model_config, model_dir, real_rows};
use crate::common::{ok, read_json, realdata};
use candle_core::{DType, Device};
use refdpo::config::Truncation;
use refdpo::data::{Message, PreferenceRow};
use refdpo::logprobs;
use refdpo::model::{weights, Transformer, TransformerConfig};
use refdpo::tokenize::PairTokenizer;
use serde_json::Value;

/// Stage one through the CLI on real rows: ids byte-identical to TRL, log-probs within 1e-4 relative.
#[test]
#[cfg_attr(realdata_absent, ignore = "needs ../shared/realdata")]
fn precompute_matches_trl_on_real_rows() {
    let real = realdata();
    let fx = fixture("trl_smollm2_llama.json");
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path(), &real, &fx);
    let dataset = real.join("ultrafeedback_binarized_sample");
    for case in fx["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let rows = ids(&case["rows"]);
        let out = tmp.path().join(name);
        let cfg = tmp.path().join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[dataset]\nid = {:?}\nlimit = {}\n[model]\nid = {:?}\ndtype = \"f32\"\n[tokenize]\nmax_length = {}\ntruncation = {:?}\n[precompute]\nbatch_size = 4\nout = {:?}\n",
                dataset.display().to_string(),
                rows.len(),
                model.display().to_string(),
                case["max_length"],
                case["truncation"].as_str().unwrap(),
                out.display().to_string()
            ),
        )
        .unwrap();
        ok(
            &["precompute", "--config", cfg.to_str().unwrap(), "--quiet"],
            tmp.path(),
        );
        let cached =
            refdpo::cache::parquet::read(&refdpo::cache::parquet_path(&out, "train_prefs"))
                .unwrap();
        let kept = case["kept"].as_array().unwrap();
        assert_eq!(cached.len(), kept.len(), "{name}: kept rows");
        let max_length = case["max_length"].as_u64().unwrap() as usize;
        let mode = if case["truncation"] == "keep_end" {
            Truncation::KeepEnd
        } else {
            Truncation::KeepStart
        };
        for (got, want) in cached.iter().zip(kept) {
            let row = want["row"].as_u64().unwrap();
            assert_eq!(got.row, row, "{name}");
            if mode == Truncation::KeepStart {
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
            } else {
                // keep_end: each side's sequence is cut from the left; compare what the model sees.
                for (side, completion) in
                    [("chosen", &got.chosen_ids), ("rejected", &got.rejected_ids)]
                {
                    assert_eq!(
                        *completion,
                        ids(&want[format!("{side}_ids")]),
                        "{name} row {row} {side}"
                    );
                    let (ctx, scored) =
                        refdpo::tokenize::window(&got.prompt_ids, completion, max_length, mode);
                    let seen: Vec<u32> = ctx.iter().chain(scored).copied().collect();
                    let want_seen: Vec<u32> = ids(&want[format!("{side}_prompt_ids")])
                        .into_iter()
                        .chain(ids(&want[format!("{side}_ids")]))
                        .collect();
                    assert_eq!(seen, want_seen, "{name} row {row} {side} sequence");
                    assert_eq!(
                        scored.len() as u64,
                        want[format!("{side}_scored_tokens")].as_u64().unwrap()
                    );
                }
            }
            assert_eq!(
                got.chosen_truncated,
                want["chosen_truncated"].as_bool().unwrap(),
                "{name} row {row}"
            );
            assert_eq!(
                got.rejected_truncated,
                want["rejected_truncated"].as_bool().unwrap(),
                "{name} row {row}"
            );
            for (g, w) in [
                (got.ref_chosen_logps, &want["ref_chosen_logps"]),
                (got.ref_rejected_logps, &want["ref_rejected_logps"]),
            ] {
                let w = w.as_f64().unwrap();
                assert!(
                    (g - w).abs() <= 1e-4 * w.abs(),
                    "{name} row {row}: ref logp {g} vs TRL {w}"
                );
            }
        }
        let report = read_json(&out.join("report.json"));
        let dropped = ids(&case["dropped_rows"]).len() as u64;
        assert_eq!(
            report["train_prefs"]["dropped"]["prompt_too_long"]
                .as_u64()
                .unwrap_or(0),
            dropped,
            "{name}"
        );
    }
}

#[test]
#[cfg_attr(realdata_absent, ignore = "needs ../shared/realdata")]
fn tokenization_matches_trl_on_more_rows_and_edge_cases() {
    let real = realdata();
    let fx = fixture("trl_smollm2_llama.json");
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path(), &real, &fx);
    let tok = PairTokenizer::from_dir(&model, 1024, Truncation::KeepStart).unwrap();
    let more = &fx["tokenization_only"];
    let rows = real_rows(&real, 64);
    let kept: Vec<&Value> = more["kept"].as_array().unwrap().iter().collect();
    let mut k = 0;
    for row in &rows[16..] {
        match tok.tokenize(row) {
            Ok(p) => {
                let want = kept[k];
                k += 1;
                assert_eq!(p.row, want["row"].as_u64().unwrap());
                assert_eq!(p.prompt_ids, ids(&want["prompt_ids"]), "row {}", p.row);
                assert_eq!(p.chosen_ids, ids(&want["chosen_ids"]), "row {}", p.row);
                assert_eq!(p.rejected_ids, ids(&want["rejected_ids"]), "row {}", p.row);
            }
            Err(reason) => {
                assert_eq!(reason.as_str(), "prompt_too_long");
                assert!(
                    ids(&more["dropped_rows"]).contains(&(row.row as u32)),
                    "row {} dropped",
                    row.row
                );
            }
        }
    }
    assert_eq!(k, kept.len());

    // Synthetic edge cases: whitespace merging at the boundary, a system turn, special-token text.
    let cfg = TransformerConfig::from_json(&model_config(&fx).to_string()).unwrap();
    let w = weights::load(
        &weights::weight_files(&model).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let m = Transformer::new(&cfg, &w).unwrap();
    for case in fx["synthetic"]["kept"].as_array().unwrap() {
        let conv = |v: &Value| -> Vec<Message> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
                .collect()
        };
        let row = PreferenceRow::conversation(
            case["row"].as_u64().unwrap(),
            conv(&case["chosen"]),
            conv(&case["rejected"]),
        );
        let name = case["name"].as_str().unwrap();
        let p = match tok.tokenize(&row) {
            Ok(p) => p,
            Err(r) => {
                // TRL scores an empty answer; refdpo skips and counts it (issue #2's rule).
                assert_eq!(
                    (name, r.as_str()),
                    ("empty_response", "empty_assistant_turn")
                );
                continue;
            }
        };
        assert_eq!(p.prompt_ids, ids(&case["prompt_ids"]), "{name}");
        assert_eq!(p.chosen_ids, ids(&case["chosen_ids"]), "{name}");
        assert_eq!(p.rejected_ids, ids(&case["rejected_ids"]), "{name}");
        let s = logprobs::score_pairs(
            &m,
            &[(&p.prompt_ids, &p.chosen_ids, &p.rejected_ids)],
            1024,
            Truncation::KeepStart,
            &Device::Cpu,
        )
        .unwrap();
        let (c, r) = (
            case["ref_chosen_logps"].as_f64().unwrap(),
            case["ref_rejected_logps"].as_f64().unwrap(),
        );
        assert!(
            close(s[0].0, c, 1e-4) && close(s[0].1, r, 1e-4),
            "{name}: {:?} vs ({c}, {r})",
            s[0]
        );
    }
}

/// Qwen2.5's template (default system prompt, tool branches) and SmolLM2's ChatML, rendered by
/// minijinja exactly as transformers renders them (tests/fixtures/gen_template_fixtures.py).
#[test]
#[cfg_attr(realdata_absent, ignore = "needs ../shared/realdata")]
fn chat_templates_render_like_transformers() {
    let real = realdata();
    let fx = fixture("chat_templates.json");
    for case in fx["cases"].as_array().unwrap() {
        if case.get("bos_token").is_some() {
            continue; // the other families' templates: the test below
        }
        let dir = match case["template"].as_str().unwrap() {
            "qwen2.5" => real.join("tokenizers/qwen2.5-config-only"),
            _ => real.join("tokenizers/smollm2-135m"),
        };
        let t = refdpo::tokenize::ChatTemplate::from_dir(&dir).unwrap();
        let msgs: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let got = t
            .render(&msgs, case["add_generation_prompt"].as_bool().unwrap())
            .unwrap();
        assert_eq!(
            got,
            case["rendered"].as_str().unwrap(),
            "{} {}",
            case["template"],
            case["conversation"]
        );
    }
}

/// Gemma 2 and 3, Phi-3, Mistral v0.3, Qwen3 and OLMo 2's hub templates
/// (tests/fixtures/templates/, sources in SOURCES.md) render as transformers renders them, and
/// fail where their own `raise_exception` makes transformers fail (Gemma 2's system message,
/// roles that do not alternate), with the template's message.
#[test]
fn family_chat_templates_render_like_transformers() {
    let fx = fixture("chat_templates.json");
    let mut checked = std::collections::BTreeSet::new();
    for case in fx["cases"].as_array().unwrap() {
        let (Some(bos), Some(eos)) = (case["bos_token"].as_str(), case["eos_token"].as_str())
        else {
            continue;
        };
        let name = case["template"].as_str().unwrap();
        let source = std::fs::read_to_string(
            super::super::common::repo().join(format!("tests/fixtures/templates/{name}.jinja")),
        )
        .unwrap();
        let t = refdpo::tokenize::ChatTemplate::new(&source, bos, eos).unwrap();
        let msgs: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let got = t.render(&msgs, case["add_generation_prompt"].as_bool().unwrap());
        let what = format!(
            "{name} {} {}",
            case["conversation"], case["add_generation_prompt"]
        );
        match (got, case["rendered"].as_str(), case["error"].as_str()) {
            (Ok(text), Some(want), _) => assert_eq!(text, want, "{what}"),
            (Err(e), None, Some(msg)) => {
                assert!(e.to_string().contains(msg), "{what}: {e} lacks {msg:?}")
            }
            (got, _, _) => panic!("{what}: {got:?} against {case}"),
        }
        checked.insert(name.to_string());
    }
    assert_eq!(checked.len(), 6, "{checked:?}");
}

/// All 100 real test rows (rows never used to develop the tokenizer): refdpo's precompute gives
/// TRL's token ids (compared by hash) and log-probs; row 43 (identical answers) is skipped by design.
#[test]
#[cfg_attr(realdata_absent, ignore = "needs ../shared/realdata")]
fn precompute_matches_trl_on_the_real_test_split() {
    use sha2::{Digest, Sha256};
    let real = realdata();
    let fx = fixture("trl_smollm2_llama.json");
    let stats = fixture("stats_test_split.json");
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path(), &real, &fx);
    let out = tmp.path().join("cache");
    let cfg = tmp.path().join("p.toml");
    std::fs::write(
        &cfg,
        format!(
            "[dataset]\nid = {:?}\ntrain_split = \"test_prefs\"\n[model]\nid = {:?}\ndtype = \"f32\"\n[tokenize]\nmax_length = 512\n[precompute]\nbatch_size = 8\nout = {:?}\n",
            real.join("ultrafeedback_binarized_sample").display().to_string(),
            model.display().to_string(),
            out.display().to_string()
        ),
    )
    .unwrap();
    ok(
        &["precompute", "--config", cfg.to_str().unwrap(), "--quiet"],
        tmp.path(),
    );
    let cached =
        refdpo::cache::parquet::read(&refdpo::cache::parquet_path(&out, "test_prefs")).unwrap();
    let report = read_json(&out.join("report.json"));
    assert_eq!(report["test_prefs"]["dropped"]["identical_responses"], 1);
    assert_eq!(
        report["test_prefs"]["dropped"]["prompt_too_long"]
            .as_u64()
            .unwrap(),
        ids(&stats["dropped_rows"]).len() as u64
    );
    let want: Vec<&Value> = stats["kept"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["row"] != 43)
        .collect();
    assert_eq!(cached.len(), want.len());
    for (got, w) in cached.iter().zip(want) {
        assert_eq!(got.row, w["row"].as_u64().unwrap());
        let json =
            serde_json::to_string(&(&got.prompt_ids, &got.chosen_ids, &got.rejected_ids)).unwrap();
        assert_eq!(
            format!("{:x}", Sha256::digest(json.as_bytes())),
            w["ids_sha256"].as_str().unwrap(),
            "row {}",
            got.row
        );
        for (g, x) in [
            (got.ref_chosen_logps, &w["ref_chosen_logps"]),
            (got.ref_rejected_logps, &w["ref_rejected_logps"]),
        ] {
            let x = x.as_f64().unwrap();
            assert!(
                (g - x).abs() <= 1e-4 * x.abs(),
                "row {}: {g} vs TRL {x}",
                got.row
            );
        }
    }
}
