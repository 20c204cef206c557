//! Broken and hostile inputs, each given to `refdpo precompute` on the demo as a user would: a
//! damaged model folder, tokenizer, template or data file is a clear `error:` naming the thing
//! (exit 1: no panic, no signal), or a counted skip with every good row kept. And a cache knows
//! its data: an edited local file is rescored by precompute and refused by train, by name.

use crate::common::{demo_config, ok, read_json, refdpo, train_with};
use candle_core::{DType, Device, Tensor};
use refdpo::model::weights;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The demo's assets under `dir` (made by a first precompute), and the pipeline naming them.
fn demo(dir: &Path) -> PathBuf {
    let cfg = demo_config(dir, "max_steps = 2");
    ok(
        &["precompute", "--config", cfg.to_str().unwrap(), "--quiet"],
        dir,
    );
    cfg
}

/// A copy of the demo model under `dir/<name>`, changed by `edit`.
pub(crate) fn model_copy(dir: &Path, name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let to = dir.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for f in std::fs::read_dir(dir.join("demo/model")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
    }
    edit(&to);
    to
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn edit_weights(dir: &Path, edit: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) {
    let file = dir.join("model.safetensors");
    let mut w = weights::load(std::slice::from_ref(&file), DType::F32, &Device::Cpu).unwrap();
    edit(&mut w);
    weights::save(&w, &file).unwrap();
}

/// `refdpo <cmd> --config CFG --quiet`, each of `sets` as `--set`.
fn args<'a>(cmd: &'a str, cfg: &'a Path, sets: &'a [String]) -> Vec<&'a str> {
    let mut args = vec![cmd, "--config", cfg.to_str().unwrap(), "--quiet"];
    for s in sets {
        args.extend(["--set", s.as_str()]);
    }
    args
}

/// precompute with `sets` fails as a program should: exit code 1 (a signal gives none), one
/// `error:` and no panic, naming every one of `names`. Returns stderr.
fn refused(cfg: &Path, cwd: &Path, sets: &[String], names: &[&str]) -> String {
    let out = refdpo(&args("precompute", cfg, sets), cwd);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{sets:?}: {err}");
    assert!(
        err.starts_with("error: ") && !err.contains("panicked"),
        "{sets:?}: {err}"
    );
    for n in names {
        assert!(err.contains(n), "{sets:?}: `{n}` is not named in: {err}");
    }
    err
}

/// The model folder `dir`, its cache beside it (`<dir>.cache`: a cache inside a model folder
/// is refused).
fn model_set(dir: &Path) -> Vec<String> {
    vec![
        format!("model.id={}", dir.display()),
        format!("precompute.out={}.cache", dir.display()),
    ]
}

#[test]
fn damaged_models_and_tokenizers_are_refused_naming_the_key_or_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo(tmp.path());
    let t = tmp.path();
    let config_edit = |name: &str, key: &str, value: Value| {
        model_copy(t, name, |d| {
            edit_json(&d.join("config.json"), |v| v[key] = value)
        })
    };
    let heads = config_edit("heads0", "num_attention_heads", json!(0));
    refused(
        &cfg,
        t,
        &model_set(&heads),
        &["`num_attention_heads` = 0", "config.json"],
    );
    let layers = config_edit("layers", "num_hidden_layers", json!(-2));
    refused(
        &cfg,
        t,
        &model_set(&layers),
        &["`num_hidden_layers`", "config.json"],
    );
    // JSON files that do not parse are named: the chat template's, a shard index
    let template = model_copy(t, "template", |d| {
        std::fs::write(d.join("tokenizer_config.json"), "garbage{").unwrap()
    });
    refused(
        &cfg,
        t,
        &model_set(&template),
        &["tokenizer_config.json` is not valid JSON"],
    );
    let index = model_copy(t, "index", |d| {
        let shard = d.join("model-00001-of-00001.safetensors");
        std::fs::rename(d.join("model.safetensors"), shard).unwrap();
        std::fs::write(d.join("model.safetensors.index.json"), "{\"weight_map\": ").unwrap()
    });
    refused(
        &cfg,
        t,
        &model_set(&index),
        &["model.safetensors.index.json` is not valid JSON"],
    );
    // a special token its post-processor adds, past the embedding (a candle index error before)
    let post = model_copy(t, "post", |d| {
        edit_json(&d.join("tokenizer.json"), |v| {
            let special = json!({"SpecialToken": {"id": "<x>", "type_id": 0}});
            let seq = |id: &str| json!({"Sequence": {"id": id, "type_id": 0}});
            v["post_processor"] = json!({
                "type": "TemplateProcessing",
                "single": [special, seq("A")],
                "pair": [special, seq("A"), seq("B")],
                "special_tokens": {"<x>": {"id": "<x>", "ids": [1_000_000], "tokens": ["<x>"]}}
            });
        })
    });
    refused(
        &cfg,
        t,
        &model_set(&post),
        &["largest id is 1000000", "post_processor", "tokenizer.json"],
    );
    // a normalizer that multiplies every text (it aborted for memory) and a BPE dropout (ids
    // different on every run)
    let bomb = model_copy(t, "bomb", |d| {
        edit_json(&d.join("tokenizer.json"), |v| {
            let grow = json!({"type": "Replace", "pattern": {"String": " "}, "content": " ".repeat(100_000)});
            v["normalizer"] = json!({"type": "Sequence", "normalizers": [grow, grow, grow]});
        })
    });
    refused(
        &cfg,
        t,
        &model_set(&bomb),
        &["tokenizer.json", "normalizer can make a text"],
    );
    let doubling = model_copy(t, "doubling", |d| {
        edit_json(&d.join("tokenizer.json"), |v| {
            let byte_level = json!({"type": "ByteLevel"});
            v["normalizer"] = json!({"type": "Sequence", "normalizers": vec![byte_level; 40]});
        })
    });
    refused(
        &cfg,
        t,
        &model_set(&doubling),
        &["tokenizer.json", "40 steps"],
    );
    let dropout = model_copy(t, "dropout", |d| {
        edit_json(&d.join("tokenizer.json"), |v| {
            v["model"]["dropout"] = json!(0.5)
        })
    });
    refused(
        &cfg,
        t,
        &model_set(&dropout),
        &["tokenizer.json", "BPE `dropout` is 0.5"],
    );
    // a count no weights could hold: refused before anything is listed or allocated per layer
    let many = config_edit("many", "num_hidden_layers", json!(1_000_000_000));
    refused(
        &cfg,
        t,
        &model_set(&many),
        &["`num_hidden_layers` = 1000000000 is beyond", "config.json"],
    );
    let hidden = config_edit("hidden", "hidden_size", json!(4096));
    refused(
        &cfg,
        t,
        &model_set(&hidden),
        &[
            "tensor `model.embed_tokens.weight` has shape",
            "4096]",
            "hidden_size 4096",
        ],
    );
    let narrow = model_copy(t, "narrow", |d| {
        edit_weights(d, |w| {
            let name = "model.layers.0.self_attn.q_proj.weight";
            let q = w[name].clone();
            let cols = q.dim(1).unwrap();
            w.insert(name.into(), q.narrow(1, 0, cols - 1).unwrap());
        })
    });
    refused(
        &cfg,
        t,
        &model_set(&narrow),
        &[
            "tensor `model.layers.0.self_attn.q_proj.weight` has shape [64, 63]",
            "implies [64, 64]",
        ],
    );
    let missing = model_copy(t, "missing", |d| {
        edit_weights(d, |w| {
            w.remove("model.layers.1.mlp.down_proj.weight");
        })
    });
    refused(
        &cfg,
        t,
        &model_set(&missing),
        &["tensor `model.layers.1.mlp.down_proj.weight` is missing"],
    );
    let nan = model_copy(t, "nan", |d| {
        edit_weights(d, |w| {
            let name = "model.layers.1.mlp.up_proj.weight";
            let mut v: Vec<f32> = w[name].flatten_all().unwrap().to_vec1().unwrap();
            v[5] = f32::NAN;
            let shape = w[name].dims().to_vec();
            w.insert(
                name.into(),
                Tensor::from_vec(v, shape, &Device::Cpu).unwrap(),
            );
        })
    });
    refused(
        &cfg,
        t,
        &model_set(&nan),
        &[
            "tensor `model.layers.1.mlp.up_proj.weight`",
            "NaN or Inf at element 5",
        ],
    );
    assert!(
        !nan.with_extension("cache")
            .join("train_prefs.arrow")
            .exists(),
        "no cache of NaN log-probs"
    );
    let vocab = model_copy(t, "vocab", |d| {
        let size = read_json(&d.join("config.json"))["vocab_size"]
            .as_u64()
            .unwrap();
        edit_json(&d.join("tokenizer.json"), |v| {
            v["model"]["vocab"]["zebra"] = json!(size + 5);
        })
    });
    refused(
        &cfg,
        t,
        &model_set(&vocab),
        &["largest id is", "\"zebra\"", "vocab_size", "tokenizer.json"],
    );
}

#[test]
fn an_overflowing_forward_is_an_error_naming_the_row_never_a_cache_of_nan() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo(tmp.path());
    let t = tmp.path();
    // finite f32 weights whose logits pass f32's 3.4e38
    let huge = model_copy(t, "huge", |d| {
        edit_weights(d, |w| {
            let head = &w["lm_head.weight"];
            let max = head.abs().unwrap().max_all().unwrap();
            // two products: the one factor would itself pass f32's range
            let unit = (head / f64::from(max.to_scalar::<f32>().unwrap())).unwrap();
            let head = (unit * 3e38).unwrap();
            w.insert("lm_head.weight".into(), head);
        })
    });
    refused(
        &cfg,
        t,
        &model_set(&huge),
        &[
            "source row",
            "not finite numbers",
            "no cache is written",
            "even in f32",
        ],
    );
    assert!(!huge
        .with_extension("cache")
        .join("train_prefs.arrow")
        .exists());
    // weights within f16's range whose logits pass its 65504: the CPU computes in f32 over the
    // weights rounded to f16, so the log-probs are finite (a GPU computing in f16 refuses them,
    // naming f16's range: `non_finite`'s hint), and far below any forward's (about -4e5 per
    // token): refused too, by row, as no training could learn from them
    let loud = model_copy(t, "loud", |d| {
        edit_weights(d, |w| {
            let head = (&w["lm_head.weight"] * 1e6).unwrap();
            w.insert("lm_head.weight".into(), head);
        })
    });
    let mut sets = model_set(&loud);
    sets.push("model.dtype=f16".into());
    refused(
        &cfg,
        t,
        &sets,
        &["source row", "-10000 per token", "no cache is written"],
    );
    assert!(!loud
        .with_extension("cache")
        .join("train_prefs.arrow")
        .exists());
    // weights past f16's range are refused by name when they are cast
    let past = model_copy(t, "past", |d| {
        edit_weights(d, |w| {
            let name = "model.layers.1.mlp.up_proj.weight";
            let up = (&w[name] * 1e7).unwrap();
            w.insert(name.into(), up);
        })
    });
    let mut sets = model_set(&past);
    sets.push("model.dtype=f16".into());
    refused(
        &cfg,
        t,
        &sets,
        &[
            "tensor `model.layers.1.mlp.up_proj.weight`",
            "beyond f16's range",
            "bf16",
        ],
    );
}

#[test]
fn a_template_error_on_some_rows_is_a_skip_with_the_template_message() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo(tmp.path());
    let t = tmp.path();
    let picky = model_copy(t, "picky", |d| {
        edit_json(&d.join("tokenizer_config.json"), |v| {
            let chatml = v["chat_template"].as_str().unwrap().to_string();
            v["chat_template"] = json!(format!(
                "{{% for m in messages %}}{{% if 'zebra' in m.content %}}{{{{ raise_exception('no zebras, please') }}}}{{% endif %}}{{% endfor %}}{chatml}"
            ));
        })
    });
    let file = t.join("zebra.jsonl");
    let mut lines = good_lines();
    lines[7] = json!({
        "prompt": [{"role": "user", "content": "tell me about a zebra"}],
        "chosen": [{"role": "assistant", "content": "useful"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    })
    .to_string()
    .into_bytes();
    std::fs::write(&file, lines.join(&b'\n')).unwrap();
    let sets = [
        model_set(&picky),
        vec![format!("dataset.id={}", file.display())],
    ]
    .concat();
    ok(&args("precompute", &cfg, &sets), t);
    let report = read_json(&picky.with_extension("cache").join("report.json"));
    let skipped = &report["train_prefs"]["skipped_rows"];
    assert_eq!(skipped.as_array().unwrap().len(), 1, "{report}");
    assert_eq!(skipped[0]["line"], 8);
    assert_eq!(skipped[0]["reason"], "template_error");
    assert!(
        skipped[0]["detail"]
            .as_str()
            .unwrap()
            .contains("no zebras, please"),
        "{report}"
    );
}

#[test]
fn runaway_templates_are_errors_that_quote_the_template_message() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo(tmp.path());
    let t = tmp.path();
    let template = |name: &str, source: &str| {
        model_copy(t, name, |d| {
            edit_json(&d.join("tokenizer_config.json"), |v| {
                v["chat_template"] = json!(source)
            })
        })
    };
    let recursing = template(
        "recursing",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    );
    refused(
        &cfg,
        t,
        &model_set(&recursing),
        &[
            "no row survived",
            "template_error",
            "recursion limit exceeded",
        ],
    );
    let writing = template(
        "writing",
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ messages[0].content }}{% endfor %}{% endfor %}",
    );
    refused(
        &cfg,
        t,
        &model_set(&writing),
        &[
            "no row survived",
            "template_error",
            "wrote more than 2097152 bytes",
        ],
    );
    // Values that double without being written, where neither the fuel nor the output limit
    // nor a filter's check sees them: they aborted the process for memory (signal 6 at ~5 GB);
    // and a list materialized whole on each of 100,000 turns ran for hours.
    for (name, source) in [
        (
            "macro",
            "{% macro d(s, n) %}{% if n > 0 %}{{ d(s ~ s, n - 1) }}{% endif %}{% endmacro %}\
             {{ d('ab', 40) }}",
        ),
        (
            "namespace",
            "{% set ns = namespace(s='ab') %}{% for i in range(40) %}\
             {% set ns.s = ns.s + ns.s %}{% endfor %}",
        ),
        (
            "loop",
            "{% for x in ['ab'] recursive %}{% if x|length < 10**11 %}{{ loop([x ~ x]) }}\
             {% endif %}{% endfor %}",
        ),
        (
            "list",
            "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}\
             {% set ns.l = ns.l + ['x'] %}{% endfor %}{{ ns.l|length }}",
        ),
        (
            "strings",
            "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}\
             {% set ns.l = ns.l + ['x' * (90000000 + i)] %}{% endfor %}{{ ns.l|length }}",
        ),
    ] {
        let started = std::time::Instant::now();
        let err = refused(
            &cfg,
            t,
            &model_set(&template(name, source)),
            &["the chat template ran away", "chat_template.jinja"],
        );
        let bound = match name {
            "list" => "(it ran past 15 s)",
            _ => "(it kept more than 256 MiB)",
        };
        assert!(err.contains(bound), "{name}: {err}");
        assert!(started.elapsed().as_secs() < 60, "{name}");
    }
}

/// 30 good conversational rows, each a JSON line.
fn good_lines() -> Vec<Vec<u8>> {
    (0..30)
        .map(|i| {
            json!({
                "prompt": [{"role": "user", "content": format!("tell me about good {i}")}],
                "chosen": [{"role": "assistant", "content": "useful clear answer"}],
                "rejected": [{"role": "assistant", "content": "go away"}],
            })
            .to_string()
            .into_bytes()
        })
        .collect()
}

#[test]
fn bad_bytes_and_oversized_rows_are_counted_skips_and_every_good_row_is_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo(tmp.path());
    let file = tmp.path().join("scraped.jsonl");
    let mut lines = good_lines();
    lines.insert(
        4,
        b"{\"prompt\": \"caf\xe9\", \"chosen\": \" a\", \"rejected\": \" b\"}".to_vec(),
    );
    lines.insert(
        9,
        b"{\"prompt\": \"x\x00y\", \"chosen\": \" a\", \"rejected\": \" b\"}".to_vec(),
    );
    lines.insert(
        14,
        format!(
            "{{\"prompt\": {}\"p\"{}}}",
            "[".repeat(200),
            "]".repeat(200)
        )
        .into_bytes(),
    );
    let huge = json!({"prompt": "tell me", "chosen": "x".repeat(40 << 20), "rejected": " no"});
    lines.insert(20, huge.to_string().into_bytes());
    std::fs::write(&file, lines.join(&b'\n')).unwrap();
    let cfg_s = cfg.to_str().unwrap();
    let id = format!("dataset.id={}", file.display());
    let out = format!("precompute.out={}/scraped-cache", tmp.path().display());
    ok(
        &[
            "precompute",
            "--config",
            cfg_s,
            "--quiet",
            "--set",
            &id,
            "--set",
            &out,
        ],
        tmp.path(),
    );
    let report = read_json(&tmp.path().join("scraped-cache/report.json"));
    let train = &report["train_prefs"];
    assert_eq!(train["rows_read"], 34, "{report}");
    assert_eq!(train["rows_kept"], 30, "every good row is kept: {report}");
    assert_eq!(
        train["dropped"],
        json!({"bad_json": 2, "bad_utf8": 1, "row_too_large": 1}),
        "{report}"
    );
    let lines: Vec<(u64, &str)> = train["skipped_rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["line"].as_u64().unwrap(), s["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(
        lines,
        [
            (5, "bad_utf8"),
            (10, "bad_json"),
            (15, "bad_json"),
            (21, "row_too_large")
        ]
    );
}

#[test]
fn an_edited_data_file_is_rescored_by_precompute_and_refused_by_train() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo(tmp.path());
    let cfg_s = cfg.to_str().unwrap();
    let file = tmp.path().join("pairs.jsonl");
    std::fs::write(&file, good_lines().join(&b'\n')).unwrap();
    let sets = [
        format!("dataset.id={}", file.display()),
        format!("precompute.out={}/own-cache", tmp.path().display()),
        format!("train.out={}/own-run", tmp.path().display()),
    ];
    let with = |cmd: &'static str| args(cmd, &cfg, &sets);
    ok(&with("precompute"), tmp.path());
    let report = tmp.path().join("own-cache/report.json");
    assert_eq!(read_json(&report)["train_prefs"]["up_to_date"], false);
    ok(&with("precompute"), tmp.path());
    assert_eq!(read_json(&report)["train_prefs"]["up_to_date"], true);
    let fp =
        refdpo::cache::parquet::read_fingerprint(&tmp.path().join("own-cache/train_prefs.parquet"))
            .unwrap();
    assert_eq!(fp.data_sha256.keys().collect::<Vec<_>>(), ["pairs.jsonl"]);

    // one answer edited: the old cache no longer matches its data
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        text.replacen("useful clear answer", "useful clear reply", 1),
    )
    .unwrap();
    let out = refdpo(&with("train"), tmp.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("pairs.jsonl") && err.contains("before an edit") && err.contains("precompute"),
        "{err}"
    );
    ok(&with("precompute"), tmp.path());
    assert_eq!(
        read_json(&report)["train_prefs"]["up_to_date"],
        false,
        "rescored"
    );
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    train_with(cfg_s, tmp.path(), &sets);
    assert!(tmp.path().join("own-run/final").exists());
}
