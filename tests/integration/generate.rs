//! `refdpo generate`: greedy decoding token for token as transformers' `generate(do_sample=False)`
//! for every family (fixtures from tests/fixtures/gen_generate_fixtures.py, prompts batched with
//! left padding) and on the real-data tiny Llama golden; seeded sampling reproducible and
//! independent of the batch; the command's JSONL, summary and chart on the demo.

use super::common::{fails, ok, precomputed, read_json, realdata, refdpo, repo, train_with};
use candle_core::{DType, Device};
use refdpo::generate::decode::{generate, Sampling};
use refdpo::model::{init, weights, Transformer, TransformerConfig};
use serde_json::Value;
use std::path::Path;

const GREEDY: Sampling = Sampling::GREEDY;

fn load(dir: &Path) -> Transformer {
    let cfg = TransformerConfig::from_file(&dir.join("config.json")).unwrap();
    let w = weights::load(
        &weights::weight_files(dir).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    Transformer::new(&cfg, &w).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Greedy continuations of `cases` (all in one left-padded batch) against their fixture ids.
fn check_greedy(model: &Transformer, cases: &[Value], max_new: usize, eos: &[u32], what: &str) {
    check_decoding(model, cases, max_new, eos, &GREEDY, what)
}

/// Continuations of `cases` under `sampling` (all in one left-padded batch) against their fixture ids.
fn check_decoding(
    model: &Transformer,
    cases: &[Value],
    max_new: usize,
    eos: &[u32],
    sampling: &Sampling,
    what: &str,
) {
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_ids"])).collect();
    let batch: Vec<(u64, &[u32])> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| (i as u64, p.as_slice()))
        .collect();
    let got = generate(
        model,
        &batch,
        max_new,
        eos,
        sampling,
        &Device::Cpu,
        &mut |_| {},
    )
    .unwrap();
    for (g, c) in got.iter().zip(cases) {
        let want = ids(&c["generated_ids"]);
        assert_eq!(g.ids, want, "{what}: prompt {:?}", c["prompt_ids"]);
        assert_eq!(
            g.finished,
            want.last().is_some_and(|t| eos.contains(t)),
            "{what}"
        );
    }
}

#[test]
fn greedy_decoding_matches_transformers_for_every_family() {
    let fx = read_json(&repo().join("tests/fixtures/generate.json"));
    let max_new = fx["max_new_tokens"].as_u64().unwrap() as usize;
    let families = fx["families"].as_object().unwrap();
    assert_eq!(families.len(), 6);
    for (family, f) in families {
        let model = load(&repo().join("tests/fixtures/families").join(family));
        // no EOS in the config (qwen3's fixture) or one outside the vocabulary: never stops early
        let eos: Vec<u32> = f["eos_token_id"]
            .as_u64()
            .map(|e| e as u32)
            .into_iter()
            .collect();
        check_greedy(
            &model,
            f["cases"].as_array().unwrap(),
            max_new,
            &eos,
            family,
        );
        // transformers' repetition penalty, which its greedy decoding applies too
        let penalty = Sampling {
            repetition_penalty: fx["repetition_penalty"].as_f64(),
            ..GREEDY
        };
        assert!(penalty.repetition_penalty.is_some());
        check_decoding(
            &model,
            f["penalty_cases"].as_array().unwrap(),
            max_new,
            &eos,
            &penalty,
            &format!("{family} with repetition_penalty"),
        );
    }
}

#[test]
#[cfg_attr(realdata_absent, ignore = "needs ../shared/realdata")]
fn greedy_decoding_matches_the_tiny_llama_golden() {
    let dir = realdata().join("models/tiny-llama");
    let golden = read_json(&dir.join("expected/generate.json"));
    let max_new = golden["max_new_tokens"].as_u64().unwrap() as usize;
    // the golden suppresses EOS, so every case runs to the limit
    check_greedy(
        &load(&dir),
        golden["cases"].as_array().unwrap(),
        max_new,
        &[],
        "tiny-llama",
    );
}

#[test]
fn seeded_sampling_is_reproducible_and_independent_of_the_batch() {
    let cfg = TransformerConfig::from_json(
        r#"{"model_type":"llama","vocab_size":64,"hidden_size":16,"intermediate_size":24,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
        "rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":false}"#,
    )
    .unwrap();
    let model = Transformer::new(&cfg, &init::init_weights(&cfg, 3, 0.3).unwrap()).unwrap();
    let (a, b) = (vec![5u32, 9, 12, 3], vec![7u32, 7]);
    let s = |seed| Sampling {
        temperature: 1.0,
        top_p: Some(0.9),
        top_k: Some(50),
        seed,
        ..Sampling::GREEDY
    };
    let run = |prompts: &[(u64, &[u32])], seed| {
        generate(
            &model,
            prompts,
            20,
            &[],
            &s(seed),
            &Device::Cpu,
            &mut |_| {},
        )
        .unwrap()
    };
    let both = run(&[(0, &a), (1, &b)], 3);
    assert_eq!(both, run(&[(0, &a), (1, &b)], 3), "same seed, same tokens");
    assert_eq!(run(&[(1, &b)], 3)[0], both[1], "alone or in a batch");
    assert_ne!(run(&[(0, &a), (1, &b)], 4), both, "another seed");
    assert_eq!(both[0].ids.len(), 20);
}

#[test]
fn generate_writes_both_models_lines_a_summary_and_a_chart() {
    let (tmp, cfg) = precomputed("max_steps = 10");
    let cfg_s = cfg.to_str().unwrap();
    train_with(cfg_s, tmp.path(), &[]);
    let run = tmp.path().join("run");
    let plots = tmp.path().join("plots");
    let stdout = ok(
        &[
            "generate",
            "--config",
            cfg_s,
            "--quiet",
            "--run",
            run.to_str().unwrap(),
            "--limit",
            "6",
            "--max-new-tokens",
            "12",
            "--plot",
            plots.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(
        stdout.contains("reference") && stdout.contains("policy longer than the reference"),
        "{stdout}"
    );
    assert!(plots.join("generation_lengths.svg").exists());
    let text = std::fs::read_to_string(run.join("generations-test_prefs.jsonl")).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    for l in &lines {
        assert!(l["row"].is_u64() && l["prompt_id"].is_string() && l["prompt_ids"].is_array());
        for m in ["reference", "policy"] {
            let g = &l[m];
            let n = g["ids"].as_array().unwrap().len();
            assert_eq!(g["tokens"].as_u64().unwrap() as usize, n, "{l}");
            assert!((1..=12).contains(&n), "{l}");
            assert!(g["text"].is_string() && g["finished"].is_boolean(), "{l}");
            if n < 12 {
                assert_eq!(g["finished"], true, "stopped early only at EOS: {l}");
            }
        }
    }
    // stats --run reads the generations beside the run
    let stats = ok(
        &[
            "stats",
            "--config",
            cfg_s,
            "--split",
            "test_prefs",
            "--run",
            run.to_str().unwrap(),
            "--json",
        ],
        tmp.path(),
    );
    let json: Value = serde_json::from_str(&stats).unwrap();
    assert!(
        json["generations"]["policy_vs_reference"]["policy_longer_frac"].is_number(),
        "{json}"
    );
    // past the model's `max_position_embeddings` (the demo's 512): said, as transformers says
    // it (fuzzer: it decoded on without a word); within it, nothing is said
    let max_position = read_json(&tmp.path().join("demo/model/config.json"))
        ["max_position_embeddings"]
        .as_u64()
        .unwrap();
    for (tokens, warned) in [(max_position, true), (8, false)] {
        let tokens = tokens.to_string();
        let out = tmp.path().join(format!("gen-{tokens}.jsonl"));
        let args = [
            "generate",
            "--config",
            cfg_s,
            "--quiet",
            "--limit",
            "1",
            "--max-new-tokens",
            &tokens,
            "--out",
            out.to_str().unwrap(),
        ];
        let o = refdpo(&args, tmp.path());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert_eq!(
            err.contains("pass the model's `max_position_embeddings` (512)"),
            warned,
            "{tokens}: {err}"
        );
    }
}

/// The EOS ids of `generation_config.json` are token ids or an error naming the file: never one
/// wrapped to 32 bits (4294967298 would stop at id 2) or silently dropped; a file that is not
/// an object of settings is refused too.
#[test]
fn eos_ids_that_are_not_token_ids_are_refused_by_file() {
    let (tmp, cfg) = precomputed("");
    let cfg_s = cfg.to_str().unwrap();
    let gen = tmp.path().join("demo/model/generation_config.json");
    let run = |text: &str| {
        std::fs::write(&gen, text).unwrap();
        let args = [
            "generate",
            "--config",
            cfg_s,
            "--quiet",
            "--limit",
            "2",
            "--max-new-tokens",
            "2",
        ];
        super::common::refdpo(&args, tmp.path())
    };
    for (text, said) in [
        (
            r#"{"eos_token_id": 4294967298}"#,
            "`eos_token_id` 4294967298 is not a token id",
        ),
        (
            r#"{"eos_token_id": [2, -1]}"#,
            "`eos_token_id` -1 is not a token id",
        ),
        (
            r#"{"eos_token_id": "x"}"#,
            "`eos_token_id` \"x\" is not a token id",
        ),
        ("garbage{", "is not valid JSON"),
        // what transformers' GenerationConfig refuses too
        ("[1, 2]", "holds a list, not an object"),
        ("null", "holds null, not an object"),
    ] {
        let out = run(text);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{text}: {err}");
        assert!(
            err.contains(said) && err.contains("generation_config.json"),
            "{text}: {err}"
        );
    }
    assert!(run(r#"{"eos_token_id": [2]}"#).status.success());
}

/// The model's `generation_config.json`: its `repetition_penalty` applies (transformers' greedy
/// decoding applies it), `--repetition-penalty` overrides it, and a setting refdpo does not apply
/// is named in a warning.
#[test]
fn generate_takes_the_models_repetition_penalty_and_names_what_it_does_not_apply() {
    let (tmp, cfg) = precomputed("");
    let cfg_s = cfg.to_str().unwrap();
    let generated = |extra: &[&str], name: &str| -> (Vec<Value>, String) {
        let out = tmp.path().join(format!("{name}.jsonl"));
        let mut args = vec!["generate", "--config", cfg_s, "--quiet", "--limit", "6"];
        args.extend(["--max-new-tokens", "24", "--out", out.to_str().unwrap()]);
        let r = refdpo(&[&args[..], extra].concat(), tmp.path());
        let err = String::from_utf8_lossy(&r.stderr).into_owned();
        assert!(r.status.success(), "{err}");
        let ids = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["reference"]["ids"].clone())
            .collect();
        (ids, err)
    };
    let (plain, _) = generated(&[], "plain");
    let (flag, _) = generated(&["--repetition-penalty", "1.5"], "flag");
    assert_ne!(plain, flag, "the penalty changed nothing");
    std::fs::write(
        tmp.path().join("demo/model/generation_config.json"),
        r#"{"repetition_penalty": 1.5, "no_repeat_ngram_size": 3, "num_beams": 4,
            "suppress_tokens": [], "typical_p": 1.0, "epsilon_cutoff": 1.0,
            "encoder_repetition_penalty": 3.0, "encoder_no_repeat_ngram_size": 0,
            "stop_strings": ["Conversation"]}"#,
    )
    .unwrap();
    let (model, err) = generated(&[], "model");
    assert_eq!(model, flag);
    // named as transformers applies them: the off values (an empty list, a typical_p of 1, an
    // epsilon_cutoff outside (0, 1)) are not
    assert!(
        err.contains("generation_config.json")
            && err.contains("no_repeat_ngram_size = 3")
            && err.contains("num_beams = 4")
            && err.contains("encoder_repetition_penalty = 3.0")
            && err.contains("stop_strings = [\"Conversation\"]")
            && !err.contains("encoder_no_repeat_ngram_size")
            && !err.contains("suppress_tokens")
            && !err.contains("typical_p")
            && !err.contains("epsilon_cutoff"),
        "{err}"
    );
    let (off, _) = generated(&["--repetition-penalty", "1"], "off");
    assert_eq!(off, plain);
    // the file's top_p too: a nucleus of one token samples the greedy tokens
    std::fs::write(
        tmp.path().join("demo/model/generation_config.json"),
        r#"{"repetition_penalty": 1.5, "top_p": 0.001}"#,
    )
    .unwrap();
    let (sampled, _) = generated(&["--temperature", "1"], "sampled");
    assert_eq!(sampled, flag);
    // a whole number: transformers refuses any but 1
    for (penalty, refused) in [("2", true), ("1", false), ("2.0", false)] {
        std::fs::write(
            tmp.path().join("demo/model/generation_config.json"),
            format!(r#"{{"repetition_penalty": {penalty}}}"#),
        )
        .unwrap();
        let out = tmp.path().join(format!("penalty-{penalty}.jsonl"));
        let args = [
            "generate", "--config", cfg_s, "--quiet", "--limit", "1", "--out",
        ];
        let r = refdpo(&[&args[..], &[out.to_str().unwrap()]].concat(), tmp.path());
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(!r.status.success(), refused, "{penalty}: {err}");
        assert!(!refused || err.contains("write 2.0 for 2"), "{err}");
    }
    // A file that samples by default is said to; its top_k and top_p are checked only where
    // they are used (as transformers: greedy decoding ignores them, valid or not).
    std::fs::write(
        tmp.path().join("demo/model/generation_config.json"),
        r#"{"do_sample": true, "temperature": 0.7, "top_k": 50.0, "top_p": 0}"#,
    )
    .unwrap();
    let (greedy, err) = generated(&[], "greedy");
    assert_eq!(greedy, plain);
    assert!(
        err.contains("do_sample = true") && err.contains("decodes greedily unless --temperature"),
        "{err}"
    );
    let err = fails(
        &[
            "generate",
            "--config",
            cfg_s,
            "--limit",
            "1",
            "--temperature",
            "1",
        ],
        tmp.path(),
    );
    assert!(err.contains("`top_k` is 50.0"), "{err}");
}
